//! Strangers nearby, the parts outside a connection: the key of strangers'
//! aliases and the opt-in (`/v1/me/discoverable`, and the WebSocket's
//! `discoverable` frame, which share [`set_discoverable`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use hmac::{Hmac, Mac};
use nearby_core::UserId;
use nearby_ports::{BusMessage, GHOST_FOREVER};
use nearby_proto::rest::DiscoverableUpdate;
use nearby_proto::ws::DiscoverableState;
use rand::RngCore;
use sha2::Sha256;

use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::rest::JsonBody;
use crate::state::{now_ms, AppState};

/// The key strangers' aliases are derived with: HMAC-SHA256 over the
/// viewer, the UTC day and the stranger. Without the key, an alias says
/// nothing of the user id; two viewers get unrelated aliases for one
/// stranger, and one viewer a new alias every day.
#[derive(Clone)]
pub struct AliasKey(Hmac<Sha256>);

impl AliasKey {
    /// From a configured secret, or a random key.
    pub fn new(secret: Option<&str>) -> Self {
        let key: Vec<u8> = match secret {
            Some(s) => s.as_bytes().to_vec(),
            None => {
                let mut k = vec![0u8; 32];
                rand::thread_rng().fill_bytes(&mut k);
                k
            }
        };
        Self(Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes keys of any length"))
    }

    /// `stranger`'s alias for `viewer` on `day`: `s` and 16 hex digits
    /// (64 bits), never a user id.
    pub fn alias(&self, viewer: UserId, day: i64, stranger: UserId) -> String {
        use std::fmt::Write;
        let mut mac = self.0.clone();
        mac.update(b"nearby stranger alias v1");
        mac.update(&viewer.0.to_le_bytes());
        mac.update(&day.to_le_bytes());
        mac.update(&stranger.0.to_le_bytes());
        let out = mac.finalize().into_bytes();
        let mut s = String::with_capacity(17);
        s.push('s');
        for b in &out[..8] {
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

type St = State<Arc<AppState>>;

pub(crate) fn state_of(until: Option<i64>) -> DiscoverableState {
    DiscoverableState {
        enabled: until.is_some(),
        until: until.filter(|u| *u != GHOST_FOREVER),
    }
}

/// Turns `me`'s discoverability on (until `until`, or for good) or off,
/// in the store, then asks `me`'s sessions on every node to re-read it:
/// they join or leave their cells (leaving tells every listener at once).
pub(crate) async fn set_discoverable(
    st: &AppState,
    me: UserId,
    enabled: bool,
    until: Option<i64>,
) -> ApiResult<DiscoverableState> {
    let until = if enabled {
        crate::rest::check_until(until, now_ms())?;
        Some(until.unwrap_or(GHOST_FOREVER))
    } else {
        None
    };
    crate::rest::limit_change(st, me)?;
    st.backends.users.set_discoverable(me, until).await?;
    crate::rest::announce(st, &[(me, BusMessage::FriendVisible { friend: me })]).await;
    Ok(state_of(until))
}

/// `GET /v1/me/discoverable`: whether strangers nearby see you (and you
/// them), and until when.
pub async fn discoverable(State(st): St, me: AuthUser) -> ApiResult<Json<DiscoverableState>> {
    let until = st
        .backends
        .users
        .discoverable_until(me.id, now_ms())
        .await?;
    Ok(Json(state_of(until)))
}

/// `PUT /v1/me/discoverable`: be shown to discoverable strangers nearby
/// (as an alias and a distance band between ~5 km cells), and see them.
pub async fn start_discoverable(
    State(st): St,
    me: AuthUser,
    JsonBody(body): JsonBody<DiscoverableUpdate>,
) -> ApiResult<Json<DiscoverableState>> {
    Ok(Json(set_discoverable(&st, me.id, true, body.until).await?))
}

/// `DELETE /v1/me/discoverable`: vanish from every stranger at once.
pub async fn end_discoverable(State(st): St, me: AuthUser) -> Result<StatusCode, ApiError> {
    set_discoverable(&st, me.id, false, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_differ_per_viewer_day_and_key_and_are_no_user_id() {
        let key = AliasKey::new(Some("a secret of sixteen+"));
        let (v1, v2, s) = (UserId(1), UserId(2), UserId(3));
        let a = key.alias(v1, 100, s);
        assert_eq!(a, key.alias(v1, 100, s), "stable within a day");
        assert_ne!(a, key.alias(v2, 100, s), "per viewer");
        assert_ne!(a, key.alias(v1, 101, s), "per day");
        assert_ne!(a, AliasKey::new(None).alias(v1, 100, s), "per key");
        assert_eq!(a.len(), 17);
        assert!(a.parse::<i64>().is_err());
    }
}

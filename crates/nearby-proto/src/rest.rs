//! REST request and response bodies. `docs/openapi.json` describes the same.

use nearby_core::{FriendStatus, Precision, UserId};
use serde::{Deserialize, Serialize};

/// `POST /v1/users` and `POST /v1/sessions` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// 3–32 of `a-z A-Z 0-9 _ - .`.
    pub username: String,
    /// 8–128 characters.
    pub password: String,
}

/// A user as others see them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserView {
    /// Opaque id.
    pub id: UserId,
    /// Unique name.
    pub username: String,
}

/// `POST /v1/sessions` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionCreated {
    /// Bearer token for `Authorization: Bearer …` or `?token=`.
    pub token: String,
    /// The logged-in user.
    pub user_id: UserId,
    /// When the token stops working, Unix milliseconds.
    pub expires_at: i64,
}

/// `POST /v1/ws-ticket` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WsTicket {
    /// Opens one WebSocket as `GET /v1/ws?ticket=…`, once.
    pub ticket: String,
    /// When it stops working if unused, Unix milliseconds.
    pub expires_at: i64,
}

/// One row of `GET /v1/friends`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FriendView {
    /// The other user.
    pub id: UserId,
    /// Their name; `null` for the caller's own requests until they are
    /// accepted, so that asking ids at random reveals no names.
    pub username: Option<String>,
    /// Relation, from the caller's side.
    pub status: FriendStatus,
    /// Whether the caller shares their location with this user now.
    pub sharing: bool,
    /// When the caller's sharing ends by itself, Unix ms; absent when it
    /// does not (or is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharing_until: Option<i64>,
    /// What this user may learn of the caller while sharing is on; absent
    /// when `precise`.
    #[serde(default, skip_serializing_if = "Precision::is_precise")]
    pub sharing_precision: Precision,
    /// Whether this user shares their location with the caller now (only
    /// ever true between friends). Absent from older servers.
    #[serde(default)]
    pub shares_with_you: bool,
    /// When their sharing with the caller ends by itself, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares_with_you_until: Option<i64>,
    /// What the caller learns of this user while they share; absent when
    /// `precise`.
    #[serde(default, skip_serializing_if = "Precision::is_precise")]
    pub shares_with_you_precision: Precision,
}

impl FriendView {
    /// The name to show: the username, or `#id` while it is withheld.
    pub fn display_name(&self) -> String {
        self.username
            .clone()
            .unwrap_or_else(|| format!("#{}", self.id))
    }
}

/// `GET /v1/friends` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FriendList {
    /// Friends and pending requests, by username.
    pub friends: Vec<FriendView>,
}

/// `PUT /v1/friends/{id}/sharing` body.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharingUpdate {
    /// Share my location with this friend?
    pub enabled: bool,
    /// When sharing ends by itself, Unix ms in the future; absent or null:
    /// until turned off. Only with `enabled: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// `precise` or `approximate`; absent: keep the current one (new
    /// friendships start precise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
}

/// `PUT /v1/me/ghost` body.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct GhostUpdate {
    /// When ghost mode ends by itself, Unix ms (in the future); absent or
    /// null: until `DELETE /v1/me/ghost`.
    #[serde(default)]
    pub until: Option<i64>,
}

/// `PUT /v1/me/discoverable` body.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverableUpdate {
    /// When it ends by itself, Unix ms (in the future); absent or null:
    /// until `DELETE /v1/me/discoverable`.
    #[serde(default)]
    pub until: Option<i64>,
}

/// `GET`/`PUT /v1/me/ghost` answer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GhostState {
    /// Whether you are hidden from every friend now.
    pub ghost: bool,
    /// When it ends by itself, Unix ms; null: on until turned off (or off).
    pub until: Option<i64>,
}

/// One stored location.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// When it was accepted, Unix milliseconds.
    pub ts: i64,
}

/// `GET /v1/me/history` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    /// Oldest first.
    pub points: Vec<HistoryPoint>,
}

/// The body of every REST error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code.
    pub code: String,
    /// Human-readable detail.
    pub message: String,
}

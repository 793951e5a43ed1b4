//! REST handlers: one small function per route. Friend and sharing changes
//! are written to the user store first, then announced on the users' inbox
//! channels so live sessions on any node act on them at once.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nearby_core::session::Session;
use nearby_core::{account, FriendStatus, LeftReason, UserId};
use nearby_ports::{BusMessage, Channel, Subscription};
use nearby_proto::rest::{
    Credentials, FriendList, FriendView, GhostState, GhostUpdate, History, HistoryPoint,
    SessionCreated, SharingUpdate, UserView,
};
use nearby_proto::ws::ServerFrame;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::auth::{self, AuthUser, Lane};
use crate::error::{ApiError, ApiResult};
use crate::listen::ClientIp;
use crate::state::{now_ms, AppState};

type St = State<Arc<AppState>>;

/// A JSON object body whose rejections are [`ApiError`]s with JSON bodies,
/// not axum's plain-text ones. Only an object is taken (serde would read a
/// struct from an array too, `["name", "pw"]`); a call without a body needs
/// no `Content-Type` and is answered `400 bad_json`, one with a body must
/// say it is JSON (`415` otherwise).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .map(|v| is_json_type(v.to_str().unwrap_or_default()));
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(rej) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::new(rej.status(), "too_large", rej.body_text()))
            }
            Err(rej) => return Err(ApiError::bad_request("bad_json", rej.body_text())),
        };
        let body = bytes.trim_ascii_start();
        if body.is_empty() {
            return Err(ApiError::bad_request(
                "bad_json",
                "this call needs a JSON object body",
            ));
        }
        if json_type != Some(true) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body with `Content-Type: application/json`",
            ));
        }
        if body.first() != Some(&b'{') {
            return Err(ApiError::bad_request(
                "bad_json",
                "the body must be a JSON object",
            ));
        }
        serde_json::from_slice(body)
            .map(Self)
            .map_err(|e| ApiError::bad_request("bad_json", format!("bad JSON body: {e}")))
    }
}

/// `application/json`, or `application/<anything>+json`, with any
/// parameters.
fn is_json_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or_default().trim();
    let essence = essence.to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// One path parameter, whose rejection (percent-encoding that does not
/// decode to UTF-8) is a JSON `400 bad_path`, not axum's plain text.
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(Self(v)),
            Err(_) => Err(ApiError::bad_request(
                "bad_path",
                "the path does not decode to UTF-8 text",
            )),
        }
    }
}

/// `GET /healthz`: the process is up.
pub async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 when every backend answers within a second, 503
/// naming the ones that do not (or while the node drains).
pub async fn readyz(State(st): St) -> Response {
    if st.draining.is_cancelled() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this node is shutting down",
        )
        .into_response();
    }
    let b = &st.backends;
    let limit = std::time::Duration::from_secs(1);
    // Which backend failed is said; why is logged, not shown: the details
    // name hosts and databases, and this endpoint needs no token.
    let check = |name: &'static str, f| async move {
        match tokio::time::timeout(limit, f).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                tracing::warn!(backend = name, error = %e, "readiness check failed");
                Some(name)
            }
            Err(_) => {
                tracing::warn!(backend = name, "readiness check timed out");
                Some(name)
            }
        }
    };
    let (users, history, cache, bus) = tokio::join!(
        check("users", b.users.ping()),
        check("history", b.history.ping()),
        check("cache", b.cache.ping()),
        check("bus", b.bus.ping()),
    );
    let failed: Vec<&str> = [users, history, cache, bus].into_iter().flatten().collect();
    if failed.is_empty() {
        if b.bus.stats().ring_stale {
            // Still serving, on the last ring it knew: a ring change made
            // meanwhile is not seen until etcd answers again.
            return Json(serde_json::json!({
                "status": "ready",
                "warnings": ["ring membership (etcd) unreachable: routing on the last known ring"],
            }))
            .into_response();
        }
        Json(serde_json::json!({ "status": "ready" })).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("not ready: {}", failed.join(", ")),
        )
        .into_response()
    }
}

/// Any unknown route.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// A known route with a method it does not take.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

fn busy(e: auth::HasherBusy) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        e.to_string(),
    )
}

/// `POST /v1/users`: sign up. The name is stored in its canonical form
/// (see [`account::canonical_username`]), the password hashed after NFKC.
pub async fn sign_up(
    State(st): St,
    ip: ClientIp,
    JsonBody(c): JsonBody<Credentials>,
) -> ApiResult<Response> {
    let username = account::canonical_username(&c.username)
        .map_err(|e| ApiError::bad_request("invalid_username", e.to_string()))?;
    let password = account::normalize_password(&c.password);
    account::validate_password(&password)
        .map_err(|e| ApiError::bad_request("invalid_password", e.to_string()))?;
    st.guards.signup(ip.0, now_ms()).map_err(|wait| {
        ApiError::too_many(
            "too_many_signups",
            "too many sign-ups from your address; try again later",
            wait,
        )
    })?;
    let hash = st
        .hasher
        .run(Lane::SignUp, move || auth::hash_password(&password))
        .await
        .map_err(busy)?
        .map_err(ApiError::internal)?;
    let id = st
        .backends
        .users
        .create_user(&username, &hash)
        .await
        .map_err(|e| match e {
            nearby_ports::StoreError::Conflict(m) => {
                ApiError::new(StatusCode::CONFLICT, "username_taken", m)
            }
            other => other.into(),
        })?;
    Ok((StatusCode::CREATED, Json(UserView { id, username })).into_response())
}

/// `GET /v1/users/by-name/{username}`: find a user to befriend. Exact match
/// only, and only for a logged-in caller, so the user list cannot be paged
/// through.
pub async fn user_by_name(
    State(st): St,
    _me: AuthUser,
    PathParam(username): PathParam,
) -> ApiResult<Json<UserView>> {
    let found = match account::canonical_username(&username) {
        Ok(name) => st.backends.users.user_by_name(&name).await?,
        Err(_) => None,
    };
    let user = found.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_user",
            format!(
                "no user named {:?}",
                username.chars().take(40).collect::<String>()
            ),
        )
    })?;
    Ok(Json(UserView {
        id: user.id,
        username: user.username,
    }))
}

/// A valid argon2 hash of a password nobody has: login for an unknown user
/// verifies against it so that the reply takes as long as for a known user.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| auth::hash_password("decoy password, never valid").unwrap_or_default())
}

fn bad_credentials() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "bad_credentials",
        "wrong username or password",
    )
}

/// `POST /v1/sessions`: log in, get a bearer token. Throttled per account
/// and address, per address and per account (see [`crate::abuse`]); a
/// throttled attempt is a 429 with `Retry-After` and its password is not
/// checked.
pub async fn log_in(
    State(st): St,
    ip: ClientIp,
    JsonBody(c): JsonBody<Credentials>,
) -> ApiResult<Json<SessionCreated>> {
    let user = verify_credentials(&st, ip, c).await?;
    let (token, hash) = auth::new_token();
    let ttl_ms = i64::try_from(st.cfg.token_ttl.as_millis()).unwrap_or(i64::MAX);
    let expires_at = now_ms().saturating_add(ttl_ms);
    st.backends
        .users
        .create_token(&hash, user.id, expires_at)
        .await?;
    Ok(Json(SessionCreated {
        token,
        user_id: user.id,
        expires_at,
    }))
}

/// The user these credentials name, if the password is theirs: what a
/// login checks, with its throttling of failed attempts.
async fn verify_credentials(
    st: &AppState,
    ip: ClientIp,
    c: Credentials,
) -> ApiResult<nearby_ports::UserRecord> {
    // Lengths are checked before hashing so a megabyte password costs nothing.
    let password = account::normalize_password(&c.password);
    let (Ok(username), Ok(())) = (
        account::canonical_username(&c.username),
        account::validate_password(&password),
    ) else {
        return Err(bad_credentials());
    };
    let attempt = st
        .guards
        .login_begin(&username, ip.0, now_ms())
        .map_err(|wait| {
            ApiError::too_many(
                "too_many_attempts",
                "too many failed logins; wait before trying again",
                wait,
            )
        })?;
    let user = st.backends.users.user_by_name(&username).await?;
    let phc = user.as_ref().map(|u| u.password_hash.clone());
    let raw = c.password;
    let verified = st
        .hasher
        .run(Lane::Login, move || {
            let phc = phc.as_deref().unwrap_or_else(|| decoy_hash());
            // Hashes made before passwords were normalized were of the
            // password as typed.
            auth::verify_password(&password, phc)
                || (raw != password && auth::verify_password(&raw, phc))
        })
        .await;
    let ok = match verified {
        Ok(ok) => ok,
        Err(e) => {
            st.guards.login_abandoned(attempt);
            return Err(busy(e));
        }
    };
    let user = match user {
        Some(u) if ok => u,
        _ => return Err(bad_credentials()),
    };
    st.guards.login_succeeded(attempt, now_ms());
    Ok(user)
}

/// `DELETE /v1/me` body `{"username", "password"}`: deletes the account and
/// everything tied to it. The credentials confirm it (a stolen token alone
/// cannot). Friends and requesters get `friend_left` (`unfriended`) and
/// `friend_removed`; the user's live sessions close (their token is gone);
/// the cached position and the history go, the name is free again.
pub async fn delete_me(
    State(st): St,
    me: AuthUser,
    ip: ClientIp,
    JsonBody(c): JsonBody<Credentials>,
) -> ApiResult<StatusCode> {
    let user = verify_credentials(&st, ip, c).await?;
    if user.id != me.id {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_you",
            "those credentials are another user's: give your own to delete your account",
        ));
    }
    let b = &st.backends;
    let others = b.users.delete_user(me.id).await?;
    // From here this node keeps no new point of the account's.
    st.history.refuse(me.id);
    if let Err(e) = b.cache.remove(me.id).await {
        tracing::warn!(user = %me.id, error = %e, "could not remove a deleted user's position");
    }
    let mut msgs = Vec::with_capacity(others.len() * 2 + 1);
    for other in others {
        msgs.push((
            other,
            BusMessage::FriendHidden {
                friend: me.id,
                reason: LeftReason::Unfriended,
            },
        ));
        msgs.push((other, BusMessage::FriendsChanged { friend: me.id }));
    }
    // The user's own sessions re-read their token, find it gone and close.
    msgs.push((me.id, BusMessage::FriendVisible { friend: me.id }));
    announce(&st, &msgs).await;
    if let Err(e) = delete_history_twice(&st, me.id).await {
        // The account is gone; the points go at the second try, or by
        // retention.
        tracing::warn!(user = %me.id, error = %e, "deleting a deleted user's history failed");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v1/sessions`: log out (revoke the token used).
pub async fn log_out(State(st): St, me: AuthUser) -> ApiResult<StatusCode> {
    st.backends.users.delete_token(&me.token_hash).await?;
    let tag = nearby_ports::token_tag(&me.token_hash);
    announce(&st, &[(me.id, BusMessage::TokenRevoked { tag })]).await;
    hide_after_logout(st, me.id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// How long a logout waits for another device of the user to put its
/// position back before friends are told the user went quiet.
const LOGOUT_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

/// Logout hides you: the cached position goes, and unless another of the
/// user's sessions (on any node) still reports and puts its own back within
/// [`LOGOUT_GRACE`], friends get `friend_left` (`inactive`) and keep
/// following the user (their next position shows them again). A dropped
/// connection does none of this: the TTL ages the position out.
async fn hide_after_logout(st: Arc<AppState>, me: UserId) {
    if let Err(e) = st.backends.cache.remove(me).await {
        tracing::warn!(user = %me, error = %e, "could not remove a logged-out position");
        return;
    }
    announce(&st, &[(me, BusMessage::PresenceCheck)]).await;
    // After the reply: the logout itself does not wait for the grace.
    tokio::spawn(async move {
        tokio::time::sleep(LOGOUT_GRACE).await;
        match st.backends.cache.get(me).await {
            Ok(None) => {}
            Ok(Some(_)) => return, // another device still reports
            Err(e) => {
                tracing::warn!(user = %me, error = %e, "could not check for another device after logout");
                return;
            }
        }
        match viewers(&st, me).await {
            Ok(list) => {
                let quiet = BusMessage::FriendQuiet { friend: me };
                let msgs: Vec<(UserId, BusMessage)> =
                    list.into_iter().map(|v| (v, quiet)).collect();
                announce(&st, &msgs).await;
            }
            Err(e) => tracing::warn!(user = %me, error = %e, "could not tell friends of a logout"),
        }
    });
}

/// `GET /v1/friends`. The user's own pending requests come last, by id,
/// without the other's name: neither the name nor its place in the order
/// reveals anything until the request is accepted.
pub async fn list_friends(State(st): St, me: AuthUser) -> ApiResult<Json<FriendList>> {
    let mut friends: Vec<FriendView> = st
        .backends
        .users
        .friends(me.id)
        .await?
        .into_iter()
        .map(|f| friend_view(f, now_ms()))
        .collect();
    // Stable: the others keep the store's order by username.
    friends.sort_by_key(|f| (f.status == FriendStatus::Outgoing).then_some(f.id));
    Ok(Json(FriendList { friends }))
}

/// A stored relation as the user sees it (REST and `friend_update`).
/// Sharing that ran out shows as off (the store keeps the row as set).
pub(crate) fn friend_view(f: nearby_ports::FriendEntry, now_ms: i64) -> FriendView {
    let (mine, theirs) = (f.sharing, f.shares_with_me);
    let (sharing, shares_with_you) = (mine.active_at(now_ms), theirs.active_at(now_ms));
    FriendView {
        id: f.id,
        // A request made by id reveals nothing until it is accepted.
        username: (f.status != FriendStatus::Outgoing).then_some(f.username),
        status: f.status,
        sharing,
        sharing_until: mine.until_ms.filter(|_| sharing),
        sharing_precision: mine.precision,
        shares_with_you,
        shares_with_you_until: theirs.until_ms.filter(|_| shares_with_you),
        shares_with_you_precision: theirs.precision,
    }
}

/// A `bad_until` unless `until` is absent or in the future.
pub(crate) fn check_until(until: Option<i64>, now: i64) -> ApiResult<()> {
    if until.is_some_and(|u| u <= now) {
        return Err(ApiError::bad_request(
            "bad_until",
            format!("`until` must be in the future (Unix ms; now is {now}), or null for no end"),
        ));
    }
    Ok(())
}

/// The relation between `a` and `b` changed: both users' sessions push
/// the new row (`friend_update` or `friend_removed`).
fn relation_changed(a: UserId, b: UserId) -> [(UserId, BusMessage); 2] {
    [
        (a, BusMessage::FriendsChanged { friend: b }),
        (b, BusMessage::FriendsChanged { friend: a }),
    ]
}

fn other_user(raw: &str, me: AuthUser) -> ApiResult<UserId> {
    let id: UserId = raw.parse().map_err(|_| ApiError::unknown_user(raw))?;
    if id == me.id {
        return Err(ApiError::bad_request("self", "that is your own id"));
    }
    Ok(id)
}

/// Publishes control messages; a failure is logged and counted, not
/// returned: the store already holds the change, which is the truth.
/// Sessions read it again when the bus comes back (every session re-reads
/// its friends and token after a broker reconnect) and, whatever happened
/// to the message, within one revalidation period.
pub(crate) async fn announce(st: &AppState, msgs: &[(UserId, BusMessage)]) {
    for (to, msg) in msgs {
        if let Err(e) = st.backends.bus.publish(Channel::Inbox(*to), *msg).await {
            st.metrics.announce_failures.increment(1);
            tracing::warn!(error = %e, user = %to, "could not announce a friend change");
        }
    }
}

/// `PUT /v1/friends/{id}`: request friendship, or accept a pending request.
pub async fn request_friend(
    State(st): St,
    me: AuthUser,
    PathParam(raw): PathParam,
) -> ApiResult<Json<serde_json::Value>> {
    let other = other_user(&raw, me)?;
    limit_change(&st, me.id)?;
    let before = st
        .backends
        .users
        .request_friend(me.id, other)
        .await
        .map_err(|e| match e {
            nearby_ports::StoreError::NotFound(_) => ApiError::unknown_user(&raw),
            e => e.into(),
        })?;
    let after = FriendStatus::after_request(before);
    if Some(after) != before {
        announce(&st, &relation_changed(me.id, other)).await;
    }
    if after == FriendStatus::Friends && before != Some(FriendStatus::Friends) {
        // Accepting starts sharing both ways (the default): each side's
        // sessions start following the other.
        announce(
            &st,
            &[
                (me.id, BusMessage::FriendVisible { friend: other }),
                (other, BusMessage::FriendVisible { friend: me.id }),
            ],
        )
        .await;
    }
    Ok(Json(serde_json::json!({ "id": other, "status": after })))
}

/// `DELETE /v1/friends/{id}`: unfriend, decline or cancel.
pub async fn remove_friend(
    State(st): St,
    me: AuthUser,
    PathParam(raw): PathParam,
) -> ApiResult<StatusCode> {
    let other = other_user(&raw, me)?;
    limit_change(&st, me.id)?;
    match st.backends.users.remove_friend(me.id, other).await? {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_friends",
            format!("no friendship or request with {other}"),
        )),
        Some(before) => {
            if before == FriendStatus::Friends {
                let reason = LeftReason::Unfriended;
                announce(
                    &st,
                    &[
                        (
                            me.id,
                            BusMessage::FriendHidden {
                                friend: other,
                                reason,
                            },
                        ),
                        (
                            other,
                            BusMessage::FriendHidden {
                                friend: me.id,
                                reason,
                            },
                        ),
                    ],
                )
                .await;
            }
            announce(&st, &relation_changed(me.id, other)).await;
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

/// `PUT /v1/friends/{id}/sharing`: share my location with this friend
/// (for good or until a moment, precisely or approximately), or stop.
/// Viewers' sessions end a timed grant by themselves; this only announces
/// what changed now.
pub async fn set_sharing(
    State(st): St,
    me: AuthUser,
    PathParam(raw): PathParam,
    JsonBody(body): JsonBody<SharingUpdate>,
) -> ApiResult<Json<serde_json::Value>> {
    let other = other_user(&raw, me)?;
    limit_change(&st, me.id)?;
    let now = now_ms();
    check_until(body.until, now)?;
    if body.until.is_some() && !body.enabled {
        return Err(ApiError::bad_request(
            "bad_until",
            "`until` goes with `enabled: true` (sharing that is off has no end)",
        ));
    }
    let change = nearby_ports::ShareChange {
        enabled: body.enabled,
        until_ms: body.until,
        precision: body.precision,
    };
    let (before, after) = st
        .backends
        .users
        .set_sharing(me.id, other, change)
        .await
        .map_err(|e| match e {
            nearby_ports::StoreError::NotFound(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_friends",
                format!("{other} is not your friend"),
            ),
            e => e.into(),
        })?;
    if before != after {
        let msg = if after.active_at(now) {
            // Shown again, or new terms (an end, a precision): the
            // friend's sessions read them from the store.
            BusMessage::FriendVisible { friend: me.id }
        } else {
            BusMessage::FriendHidden {
                friend: me.id,
                reason: LeftReason::Unshared,
            }
        };
        announce(&st, &[(other, msg)]).await;
        announce(&st, &relation_changed(me.id, other)).await;
    }
    let sharing = after.active_at(now);
    // The row's fields, with the same defaults left out.
    let mut reply = serde_json::json!({ "id": other, "sharing": sharing });
    if let (true, Some(until)) = (sharing, after.until_ms) {
        reply["sharing_until"] = until.into();
    }
    if !after.precision.is_precise() {
        reply["sharing_precision"] = after.precision.as_str().into();
    }
    Ok(Json(reply))
}

/// The friends who may see `me` when `me` is not hidden: mutual friends
/// `me` shares with.
async fn viewers(st: &AppState, me: UserId) -> Result<Vec<UserId>, nearby_ports::StoreError> {
    let list = st.backends.users.friends(me).await?;
    Ok(viewers_in(&list, now_ms()).map(|(id, _)| id).collect())
}

/// The friends in `list` who may see its owner at `now` (mutual friends
/// the owner shares with), with when that ends.
pub(crate) fn viewers_in(
    list: &[nearby_ports::FriendEntry],
    now: i64,
) -> impl Iterator<Item = (UserId, Option<i64>)> + '_ {
    list.iter()
        .filter(move |f| f.status == FriendStatus::Friends && f.sharing.active_at(now))
        .map(|f| (f.id, f.sharing.until_ms))
}

/// Tells `me`'s viewers to re-read the store (it shows `me` again), and
/// `me`'s own sessions too (they read their ghost mode there).
pub(crate) async fn announce_shown(
    st: &AppState,
    me: UserId,
) -> Result<(), nearby_ports::StoreError> {
    let grant = BusMessage::FriendVisible { friend: me };
    let mut msgs: Vec<(UserId, BusMessage)> = viewers(st, me)
        .await?
        .into_iter()
        .map(|v| (v, grant))
        .collect();
    msgs.push((me, grant));
    announce(st, &msgs).await;
    Ok(())
}

fn ghost_state(until: Option<i64>) -> GhostState {
    GhostState {
        ghost: until.is_some(),
        until: until.filter(|u| *u != nearby_ports::GHOST_FOREVER),
    }
}

/// `GET /v1/me/ghost`: whether you are hidden, and until when.
pub async fn ghost(State(st): St, me: AuthUser) -> ApiResult<Json<GhostState>> {
    let until = st.backends.users.ghost_until(me.id, now_ms()).await?;
    Ok(Json(ghost_state(until)))
}

/// `PUT /v1/me/ghost`: hide from every friend at once, until `until` or
/// until turned off. The cached position goes, viewers get `friend_left`
/// (`inactive`: the same as going quiet), and the user's own sessions stop
/// caching and publishing (they keep recording history).
pub async fn start_ghost(
    State(st): St,
    me: AuthUser,
    JsonBody(body): JsonBody<GhostUpdate>,
) -> ApiResult<Json<GhostState>> {
    check_until(body.until, now_ms())?;
    limit_change(&st, me.id)?;
    let until = body.until.unwrap_or(nearby_ports::GHOST_FOREVER);
    let users = &st.backends.users;
    users.set_ghost(me.id, Some(until)).await?;
    // Own sessions first: they stop publishing before friends are told.
    announce(&st, &[(me.id, BusMessage::FriendVisible { friend: me.id })]).await;
    if let Err(e) = st.backends.cache.remove(me.id).await {
        // Friends cannot read it anyway: visibility comes from the store.
        tracing::warn!(user = %me.id, error = %e, "could not remove a ghost's cached location");
    }
    let hidden = BusMessage::FriendHidden {
        friend: me.id,
        reason: LeftReason::Inactive,
    };
    let msgs: Vec<(UserId, BusMessage)> = viewers(&st, me.id)
        .await?
        .into_iter()
        .map(|v| (v, hidden))
        .collect();
    announce(&st, &msgs).await;
    Ok(Json(ghost_state(Some(until))))
}

/// `DELETE /v1/me/ghost`: be seen again (from the next position sent).
pub async fn end_ghost(State(st): St, me: AuthUser) -> ApiResult<StatusCode> {
    limit_change(&st, me.id)?;
    st.backends.users.set_ghost(me.id, None).await?;
    announce_shown(&st, me.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Reads what a session starts from: the visible friends and, in one batch,
/// their latest locations and the user's own. Shared by `GET /v1/nearby`
/// and the WebSocket, which passes its subscription: it is subscribed to the
/// friends' channels *before* their locations are read, so no update falls
/// between the read and the subscription. On an error the subscription
/// holds no friend's channel.
pub async fn start_session(
    st: &AppState,
    me: UserId,
    subscription: Option<&mut Subscription>,
) -> Result<(Session, Vec<nearby_core::session::Nearby>), nearby_ports::StoreError> {
    let friends = st.backends.users.visible_friends(me, now_ms()).await?;
    let channels: Vec<Channel> = friends.iter().map(|f| Channel::Location(f.id)).collect();
    let mut subscription = subscription;
    if let Some(sub) = subscription.as_deref_mut() {
        sub.add(&channels).await?;
    }
    let mut ids: Vec<UserId> = friends.iter().map(|f| f.id).collect();
    ids.push(me);
    let mut locs = match st.backends.cache.get_many(&ids).await {
        Ok(locs) => locs,
        Err(e) => {
            if let Some(sub) = subscription {
                sub.remove(&channels);
            }
            return Err(e);
        }
    };
    let own = locs.pop().flatten();
    Ok(Session::start(
        me,
        st.cfg.session(),
        own,
        friends.into_iter().zip(locs),
        now_ms(),
    ))
}

/// `GET /v1/nearby`: the snapshot a WebSocket gets on connect.
pub async fn nearby(State(st): St, me: AuthUser) -> ApiResult<Json<ServerFrame>> {
    let (session, snapshot) = start_session(&st, me.id, None).await?;
    Ok(Json(ServerFrame::Snapshot {
        friends: snapshot.into_iter().map(Into::into).collect(),
        self_location: session.own_location().map(Into::into),
        interval_ms: None,
        relations: None,
        discoverable: None,
    }))
}

/// Query of `GET /v1/me/history`.
#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    /// Start, inclusive, Unix ms (default: 24 h ago).
    pub from: Option<i64>,
    /// End, exclusive, Unix ms (default: now).
    pub to: Option<i64>,
    /// At most this many points (default and maximum 10 000); any whole
    /// number is accepted and clamped into 1–10 000.
    pub limit: Option<String>,
    /// `json` (the default) or `geojson` (a FeatureCollection of points).
    pub format: Option<String>,
}

/// Most points one history request returns.
pub const HISTORY_LIMIT: u32 = 10_000;

/// `limit` as documented: any whole number, clamped into 1–[`HISTORY_LIMIT`]
/// however large or negative; anything else is a `bad_query`.
fn clamp_limit(raw: Option<&str>) -> ApiResult<u32> {
    let Some(raw) = raw else {
        return Ok(HISTORY_LIMIT);
    };
    let (negative, digits) = match raw.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, raw.strip_prefix('+').unwrap_or(raw)),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::bad_query("`limit` must be a whole number"));
    }
    if negative {
        return Ok(1);
    }
    // Too many digits for u64 is simply large.
    let n = digits.parse::<u64>().unwrap_or(u64::MAX);
    Ok(u32::try_from(n.clamp(1, u64::from(HISTORY_LIMIT))).unwrap_or(HISTORY_LIMIT))
}

/// `GET /v1/me/history?from=MS&to=MS`: my own stored locations.
pub async fn history(
    State(st): St,
    me: AuthUser,
    q: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|_| {
        ApiError::bad_query("`from` and `to` must be whole numbers (Unix milliseconds)")
    })?;
    let now = now_ms();
    let to = q.to.unwrap_or(now + 1);
    let from = q.from.unwrap_or(now - 24 * 3600 * 1000);
    if from > to {
        return Err(ApiError::bad_query("`from` is after `to`"));
    }
    let limit = clamp_limit(q.limit.as_deref())?;
    let geojson = match q.format.as_deref() {
        None | Some("json") => false,
        Some("geojson") => true,
        Some(_) => return Err(ApiError::bad_query("`format` is `json` or `geojson`")),
    };
    let points: Vec<HistoryPoint> = st
        .backends
        .history
        .range(me.id, from, to, limit)
        .await?
        .into_iter()
        .map(|l| HistoryPoint {
            lat: l.point.lat(),
            lon: l.point.lon(),
            ts: l.ts_ms,
        })
        .collect();
    if !geojson {
        return Ok(Json(History { points }).into_response());
    }
    // RFC 7946: one Point feature per location, [lon, lat], its time in
    // the properties.
    let features: Vec<serde_json::Value> = points
        .iter()
        .map(|p| {
            serde_json::json!({
                "type": "Feature",
                "geometry": { "type": "Point", "coordinates": [p.lon, p.lat] },
                "properties": { "ts": p.ts },
            })
        })
        .collect();
    let body = serde_json::json!({ "type": "FeatureCollection", "features": features });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/geo+json")],
        body.to_string(),
    )
        .into_response())
}

/// Another node's history queue may still hold points when they are
/// deleted (this node's is emptied first): the delete runs again once such
/// a queue has been flushed.
const HISTORY_REDELETE: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a history delete waits for this node's writer to land the batch
/// it holds (it may be retrying against a store that is down).
const HISTORY_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Spends one of `me`'s state changes (`--changes-per-min`), or answers
/// `429 too_many_changes` with `Retry-After`.
pub(crate) fn limit_change(st: &AppState, me: UserId) -> ApiResult<()> {
    st.guards.change(me, now_ms()).map_err(|wait| {
        ApiError::too_many(
            "too_many_changes",
            "too many changes (friends, sharing, ghost mode, discoverable) in a short time; wait a little",
            wait,
        )
    })
}

/// `DELETE /v1/me/history`: deletes all of the caller's history.
pub async fn delete_history(State(st): St, me: AuthUser) -> ApiResult<Json<serde_json::Value>> {
    limit_change(&st, me.id)?;
    let deleted = delete_history_twice(&st, me.id).await?;
    Ok(Json(serde_json::json!({ "deleted": deleted })))
}

/// Deletes `user`'s history now (how many points), after this node's queued
/// points are dropped and its writer's batch in flight has landed; and
/// again after [`HISTORY_REDELETE`], for points still queued on other nodes.
async fn delete_history_twice(
    st: &Arc<AppState>,
    user: UserId,
) -> Result<u64, nearby_ports::StoreError> {
    if !st.history.discard(user, HISTORY_SETTLE).await {
        tracing::warn!(%user, "the history writer is stuck; the second delete will follow");
    }
    let later = st.clone();
    tokio::spawn(async move {
        tokio::time::sleep(HISTORY_REDELETE).await;
        if let Err(e) = later.backends.history.delete_user(user).await {
            tracing::warn!(%user, error = %e, "second history delete failed");
        }
    });
    st.backends.history.delete_user(user).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_clamp_whatever_their_size() {
        assert_eq!(clamp_limit(None).ok(), Some(HISTORY_LIMIT));
        assert_eq!(clamp_limit(Some("5")).ok(), Some(5));
        assert_eq!(clamp_limit(Some("0")).ok(), Some(1));
        assert_eq!(clamp_limit(Some("-1")).ok(), Some(1));
        assert_eq!(clamp_limit(Some("+20")).ok(), Some(20));
        assert_eq!(
            clamp_limit(Some("99999999999999999999")).ok(),
            Some(HISTORY_LIMIT)
        );
        for bad in ["", "-", "1.5", "ten", "1e3"] {
            assert!(clamp_limit(Some(bad)).is_err(), "{bad:?}");
        }
    }
}

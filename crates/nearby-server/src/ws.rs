//! The WebSocket endpoint: one task per connection.
//!
//! The task selects over four inputs: frames from the client, messages from
//! the bus (its friends' channels and its own inbox, all on one bounded
//! queue), the next friend-expiry deadline, and the token's expiry; plus the
//! shutdown signal. The domain [`Session`] decides what each input means; the
//! task does the I/O. Frames produced by one wake-up (and by the bus messages
//! already queued, up to [`BUS_DRAIN`]) are fed to the socket and flushed
//! once, so a burst of deliveries costs one write, not one per frame.
//!
//! Idle connections are kept small: a 4 KiB read buffer instead of
//! tungstenite's 128 KiB default, an 8 KiB write-coalescing target.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use nearby_core::pace::Pace;
use nearby_core::rate::TokenBucket;
use nearby_core::session::Session;
use nearby_core::{FriendStatus, Grant, LeftReason, Location, Point, UserId};
use nearby_ports::{
    BusMessage, Channel, HistoryEntry, Mail, Mailbox, StoreResult, Subscriber, Subscription,
};
use nearby_proto::ws::{parse_client_frame, ClientFrame, ServerFrame};
use rand::Rng;

use crate::abuse::SocketSlot;
use crate::auth::AuthUser;
use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::listen::Peer;
use crate::rest::start_session;
use crate::state::{now_ms, AppState};

mod discovery;

/// Bus messages handled per wake-up before the frames are flushed.
pub const BUS_DRAIN: usize = 64;

/// Closes of a draining node are spread over this share of `--drain-secs`;
/// the rest is margin for the last closing handshakes.
const DRAIN_SPREAD: f64 = 0.8;

/// Closes are grouped in batches this far apart (never all in one tick).
const DRAIN_BATCH: Duration = Duration::from_millis(100);

/// The `reconnect_after_ms` suggested to a drained session: up to this,
/// at random, so the clients closed in one batch do not come back at once.
const RECONNECT_AFTER_MAX_MS: u64 = 1000;

/// When, after a drain starts, a session is told to go: a uniformly random
/// batch over the first [`DRAIN_SPREAD`] of the drain window.
fn drain_turn_after(drain: Duration) -> Duration {
    let batches = (drain.mul_f64(DRAIN_SPREAD).as_millis() / DRAIN_BATCH.as_millis()) as u32;
    DRAIN_BATCH * rand::thread_rng().gen_range(0..=batches)
}

/// A write (feed + flush) that takes longer than this means the client is
/// not reading: the connection is dropped rather than left holding memory.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a closing handshake may take before the socket is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Close codes (RFC 6455 and the IANA registry).
mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const RESTART: u16 = 1012;
}

/// After a failed re-read of the user store, the next attempt comes after
/// a random delay in this range (instead of a whole revalidation period
/// later; random, so that sessions failing together do not retry together).
const REVALIDATE_RETRY_MS: std::ops::Range<u64> = 1000..3000;

/// `GET /v1/ws`: authenticates, then upgrades. A missing or bad token is a
/// 401 before any upgrade; a request that is not a WebSocket handshake is a
/// 400 with a JSON body.
pub async fn upgrade(
    State(st): State<Arc<AppState>>,
    me: AuthUser,
    peer: Option<axum::Extension<Peer>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    use axum::http::StatusCode;
    let ws = match ws {
        Ok(ws) => ws,
        Err(rej) => {
            return ApiError::new(rej.status(), "not_websocket", rej.body_text()).into_response()
        }
    };
    if st.draining.is_cancelled() {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this node is shutting down; connect again (another node will answer)",
        );
        e.retry_after_secs = Some(1);
        return e.into_response();
    }
    if peer.is_some_and(|p| p.reserved) {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_full",
            "this node holds all the WebSockets it may; retry later or elsewhere",
        );
        e.retry_after_secs = Some(5);
        return e.into_response();
    }
    let Some(slot) = st.guards.open_socket(me.id, now_ms()) else {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sockets",
            format!(
                "at most {} WebSockets per user on one node; close one first",
                st.cfg.max_sockets_per_user
            ),
        )
        .into_response();
    };
    let hard = ServerConfig::hard_frame_limit();
    let tracker = st.sessions.clone();
    // Small buffers: clients send ~100-byte frames every few seconds, and
    // every idle connection holds its read buffer (larger frames still
    // arrive, in several reads).
    ws.read_buffer_size(512)
        .write_buffer_size(8 * 1024)
        .max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| tracker.track_future(run(st, me, slot, socket)))
}

fn until(deadline_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(deadline_ms.saturating_sub(now_ms())).unwrap_or(0))
}

/// Whether the token `me` was authenticated with is still valid now.
async fn token_valid(st: &AppState, me: &AuthUser) -> StoreResult<bool> {
    let found = st
        .backends
        .users
        .token_user(&me.token_hash, now_ms())
        .await?;
    Ok(found.is_some_and(|(id, _)| id == me.id))
}

async fn run(st: Arc<AppState>, me: AuthUser, slot: SocketSlot, mut socket: WebSocket) {
    let (sub, mut mailbox) = Subscriber::new(st.cfg.session_queue);
    // Every channel the session takes is held by this guard: however the
    // task ends (closed, panicked, aborted), dropping it leaves the hub.
    let mut sub = Subscription::new(st.backends.bus.clone(), sub);
    let user = me.id;
    tracing::debug!(%user, "session open");
    let opened = std::time::Instant::now();
    // The user's own channels first: a friendship change or a logout made
    // while the session starts is queued, not lost, and so are the moves
    // the user's other devices report.
    let own = [Channel::Inbox(user), Channel::Location(user)];
    let started = match sub.add(&own).await {
        // The token is checked again now that the inbox is subscribed: a
        // logout that raced the upgrade either deleted the token before
        // this read, or publishes its revocation after the subscription.
        Ok(()) => match token_valid(&st, &me).await {
            Ok(true) => match start_session(&st, user, Some(&mut sub)).await {
                // Ghost mode and the friend list, read after the inbox is
                // subscribed: a change made meanwhile is queued there.
                // The token once more at the end: a logout that raced the
                // whole start is caught here even if its notice was not
                // (the race test saw, rarely under load, a session start
                // and never hear of its token's logout).
                Ok(started) => match own_state(&st, user).await {
                    Ok(own) => match token_valid(&st, &me).await {
                        Ok(true) => Ok(Some((started, own))),
                        Ok(false) => Ok(None),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let mut conn = match started {
        Ok(Some(((session, snapshot), (ghost_until, discoverable_until, list)))) => {
            crate::metrics::observe(&st.metrics.session_start, opened);
            st.metrics.connections.increment(1.0);
            let now = now_ms();
            let mut pace = Pace::new(st.cfg.pace());
            pace.set_viewers(crate::rest::viewers_in(&list, now));
            pace.set_hidden(ghost_until.is_some_and(|u| now < u));
            pace.decide(session.shown(), now);
            let discovery = discovery::Discovery::new(user, &st.cfg, discoverable_until);
            let frame = ServerFrame::Snapshot {
                friends: snapshot.into_iter().map(Into::into).collect(),
                self_location: session.own_location().map(Into::into),
                interval_ms: Some(pace.interval_ms()),
                relations: Some(
                    list.into_iter()
                        .map(|f| crate::rest::friend_view(f, now))
                        .collect(),
                ),
                discoverable: Some(discovery.told()),
            };
            let mut conn = Conn {
                pace,
                bucket: TokenBucket::new(st.cfg.updates_per_sec, st.cfg.update_burst, now_ms()),
                st: st.clone(),
                session,
                sub,
                limited: false,
                out: Outbox::from(frame),
                token_hash: me.token_hash,
                closing: None,
                revalidate_failed: false,
                slot,
                ghost_until,
                last_reported: None,
                discovery,
            };
            conn.sub.subscriber().limit_strangers(st.cfg.stranger_cap);
            conn.sync_discovery(now).await;
            conn
        }
        Ok(None) => {
            let frame = ServerFrame::error("token_revoked", "you logged out with this token");
            let _ = socket.send(Message::Text(frame.to_json().into())).await;
            let _ = send_close(&mut socket, close::POLICY, "token revoked").await;
            return;
        }
        Err(e) => {
            tracing::warn!(%user, error = %e, "session start failed");
            let frame = ServerFrame::error(
                "unavailable",
                "could not load your friends; reconnect later",
            );
            let _ = socket.send(Message::Text(frame.to_json().into())).await;
            let _ = send_close(&mut socket, close::INTERNAL, "backend unavailable").await;
            return;
        }
    };
    if conn.flush(&mut socket).await.is_ok() {
        conn.serve(&mut socket, &mut mailbox, me.expires_at).await;
    }
    conn.leave_discovery().await;
    drop(conn);
    st.metrics.connections.decrement(1.0);
    tracing::debug!(%user, "session closed");
}

/// The user's ghost mode, discoverability and friend list.
type OwnState = (Option<i64>, Option<i64>, Vec<nearby_ports::FriendEntry>);

/// Reads [`OwnState`].
async fn own_state(st: &AppState, user: UserId) -> StoreResult<OwnState> {
    let users = &st.backends.users;
    Ok((
        users.ghost_until(user, now_ms()).await?,
        users.discoverable_until(user, now_ms()).await?,
        users.friends(user).await?,
    ))
}

/// The close code for a read error that is the client's protocol
/// violation; `None` for I/O errors (the connection is gone anyway).
fn violation_close(e: axum::Error) -> Option<(u16, &'static str)> {
    use tungstenite::Error as WsError;
    match e.into_inner().downcast_ref::<WsError>()? {
        WsError::Capacity(_) => Some((close::TOO_BIG, "frame too large")),
        WsError::Protocol(_) => Some((close::PROTOCOL, "protocol violation")),
        WsError::Utf8(_) => Some((close::INVALID_DATA, "text frame is not UTF-8")),
        _ => None,
    }
}

/// Starts the closing handshake and waits (briefly) for the client's reply,
/// so the close frame is read before the TCP connection goes away.
async fn send_close(
    socket: &mut WebSocket,
    code: u16,
    reason: &'static str,
) -> Result<(), axum::Error> {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    tokio::time::timeout(CLOSE_WAIT, socket.send(Message::Close(Some(frame))))
        .await
        .map_err(|_| axum::Error::new("close timed out"))??;
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    Ok(())
}

/// Frames waiting for the next flush, already serialized: a queued
/// `ServerFrame` is a few hundred bytes, and the queue's capacity stays
/// with the connection for its life.
#[derive(Default)]
struct Outbox {
    frames: Vec<String>,
    /// How many of `frames` are `friend_location` deliveries.
    deliveries: u64,
    /// When the oldest of those deliveries reached this node.
    arrived: Option<std::time::Instant>,
    /// A friend was shown or updated / left since the pace last looked.
    shown_any: bool,
    left_any: bool,
}

impl Outbox {
    fn push(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::FriendLocation(_) => {
                self.deliveries += 1;
                self.shown_any = true;
            }
            ServerFrame::FriendLeft { .. } => self.left_any = true,
            _ => {}
        }
        self.frames.push(frame.to_json());
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

impl From<ServerFrame> for Outbox {
    fn from(frame: ServerFrame) -> Self {
        let mut out = Self::default();
        out.push(frame);
        out
    }
}

impl Extend<ServerFrame> for Outbox {
    fn extend<I: IntoIterator<Item = ServerFrame>>(&mut self, frames: I) {
        for frame in frames {
            self.push(frame);
        }
    }
}

/// One live connection's state besides the socket.
struct Conn {
    st: Arc<AppState>,
    session: Session,
    /// The session's channels; dropped with the connection.
    sub: Subscription,
    bucket: TokenBucket,
    /// A `rate_limited` error was sent for the current run of refused frames.
    limited: bool,
    /// Frames waiting for the next flush.
    out: Outbox,
    /// The hash of the token this connection was opened with.
    token_hash: [u8; 32],
    /// Set when the connection must close after the next flush.
    closing: Option<(u16, &'static str)>,
    /// The last re-read of the user store failed: retry soon.
    revalidate_failed: bool,
    /// This socket's place among its user's sockets on this node, and
    /// their shared update bucket.
    slot: SocketSlot,
    /// The user's ghost mode, as last read from the store: while now is
    /// before it, positions are neither cached nor published.
    ghost_until: Option<i64>,
    /// The latest position this connection reported and published.
    last_reported: Option<Location>,
    /// The update interval suggested to the client.
    pace: Pace,
    /// Strangers nearby.
    discovery: discovery::Discovery,
}

impl Conn {
    async fn serve(
        &mut self,
        socket: &mut WebSocket,
        mailbox: &mut Mailbox,
        token_expires_at: i64,
    ) {
        let token_expiry = tokio::time::sleep(until(token_expires_at));
        tokio::pin!(token_expiry);
        let shutdown = self.st.shutdown.clone();
        // Draining: this session's turn to be told to go comes at a random
        // point of the spread (see `drain_turn`).
        let draining = self.st.draining.clone();
        let drain_turn = tokio::time::sleep(Duration::from_secs(365 * 86_400));
        tokio::pin!(drain_turn);
        let mut drain_armed = false;
        let start = tokio::time::Instant::now();
        // Ping after a third of the idle limit of silence; give up at the limit.
        let idle_limit = self.st.cfg.idle_timeout;
        let ping_after = idle_limit / 3;
        let mut keepalive = tokio::time::interval_at(start + ping_after, ping_after);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = start;
        // One timer for friends going stale, moved only when the session's
        // next expiry changes (not re-created per message).
        let friend_expiry = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(friend_expiry);
        let mut armed: Option<i64> = None;
        // The friend set and the token are re-read from the user store every
        // period (first at a random point of it, so that sessions opened
        // together do not re-read together): the bound on how long a
        // revocation whose bus message was lost can go unnoticed.
        let period = self.st.cfg.revalidate;
        let first = period.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
        let mut revalidate = tokio::time::interval_at(start + first, period);
        revalidate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_expiry = [self.session.next_expiry(), self.discovery.deadline()]
                .into_iter()
                .flatten()
                .min();
            if next_expiry != armed {
                if let Some(t) = next_expiry {
                    friend_expiry
                        .as_mut()
                        .reset(tokio::time::Instant::now() + until(t));
                }
                armed = next_expiry;
            }
            tokio::select! {
                _ = draining.cancelled(), if !drain_armed => {
                    drain_armed = true;
                    let turn = drain_turn_after(self.st.cfg.drain);
                    drain_turn.as_mut().reset(tokio::time::Instant::now() + turn);
                }
                _ = &mut drain_turn, if drain_armed => {
                    let after = rand::thread_rng().gen_range(0..RECONNECT_AFTER_MAX_MS);
                    self.out.push(ServerFrame::going_away(after));
                    self.closing = Some((close::RESTART, "server draining"));
                }
                _ = shutdown.cancelled() => {
                    self.out.push(ServerFrame::going_away(0));
                    let _ = self.flush(socket).await;
                    let _ = send_close(socket, close::RESTART, "server shutting down").await;
                    return;
                }
                _ = &mut token_expiry => {
                    self.out.push(ServerFrame::error("token_expired", "your token expired; log in again"));
                    let _ = self.flush(socket).await;
                    let _ = send_close(socket, close::POLICY, "token expired").await;
                    return;
                }
                _ = keepalive.tick() => {
                    let silent = last_heard.elapsed();
                    if silent >= idle_limit {
                        let _ = send_close(socket, close::GOING_AWAY, "idle").await;
                        return;
                    }
                    if silent >= ping_after {
                        let ping = socket.send(Message::Ping(Default::default()));
                        if !matches!(tokio::time::timeout(WRITE_TIMEOUT, ping).await, Ok(Ok(()))) {
                            return;
                        }
                    }
                }
                frame = socket.recv() => {
                    last_heard = tokio::time::Instant::now();
                    if !self.on_frame(socket, frame).await {
                        return;
                    }
                }
                Some(mail) = mailbox.recv() => {
                    self.on_mail(mail, mailbox.arrived()).await;
                    for _ in 1..BUS_DRAIN {
                        if self.closing.is_some() {
                            break;
                        }
                        match mailbox.try_recv() {
                            Some(mail) => self.on_mail(mail, mailbox.arrived()).await,
                            None => break,
                        }
                    }
                }
                _ = revalidate.tick() => self.revalidate().await,
                _ = &mut friend_expiry, if armed.is_some() => {
                    armed = None;
                    let now = now_ms();
                    let events = self.session.on_tick(now);
                    self.out.extend(events.into_iter().map(ServerFrame::from));
                    self.end_expired_grants(now).await;
                    self.discovery_tick(now).await;
                }
            }
            let (shown, left) = (
                std::mem::take(&mut self.out.shown_any),
                std::mem::take(&mut self.out.left_any),
            );
            if self.pace.may_change(shown, left) {
                self.decide_pace();
            }
            if !self.out.is_empty() && self.flush(socket).await.is_err() {
                return;
            }
            if let Some((code, reason)) = self.closing {
                let _ = send_close(socket, code, reason).await;
                return;
            }
            if std::mem::take(&mut self.revalidate_failed) {
                let ms = rand::thread_rng().gen_range(REVALIDATE_RETRY_MS);
                revalidate.reset_after(Duration::from_millis(ms));
            }
        }
    }

    /// Handles one read from the socket; false when the connection is over.
    async fn on_frame(
        &mut self,
        socket: &mut WebSocket,
        frame: Option<Result<Message, axum::Error>>,
    ) -> bool {
        match frame {
            None | Some(Ok(Message::Close(_))) => false,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket read failed");
                // A frame the WebSocket layer refused (over the hard size
                // limit, malformed, or text that is not UTF-8) gets the
                // close code that names the violation.
                if let Some((code, reason)) = violation_close(e) {
                    let _ = send_close(socket, code, reason).await;
                }
                false
            }
            Some(Ok(Message::Text(text))) => {
                self.on_text(text.as_str()).await;
                true
            }
            Some(Ok(Message::Binary(_))) => {
                if self.admit() {
                    self.out.push(ServerFrame::error(
                        "unsupported_frame",
                        "binary frames are not supported; send JSON text frames",
                    ));
                }
                true
            }
            Some(Ok(_)) => true, // ping/pong: answered by the library
        }
    }

    /// Writes the pending frames with one flush. A client that does not
    /// read for [`WRITE_TIMEOUT`] is treated as gone.
    async fn flush(&mut self, socket: &mut WebSocket) -> Result<(), axum::Error> {
        let out = &mut self.out;
        let deliveries = std::mem::take(&mut out.deliveries);
        if deliveries > 0 {
            self.st.metrics.deliveries_out.increment(deliveries);
        }
        let arrived = out.arrived.take();
        let write = async {
            for json in out.frames.drain(..) {
                socket.feed(Message::Text(json.into())).await?;
            }
            socket.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(result) => {
                // One sample per written batch: its oldest delivery.
                if let (Ok(()), Some(at)) = (&result, arrived) {
                    crate::metrics::observe(&self.st.metrics.node_to_socket, at);
                }
                result
            }
            Err(_) => Err(axum::Error::new(
                "write timed out: the client is not reading",
            )),
        }
    }

    /// Flood control: true if this frame may be handled. The first refused
    /// frame of a run gets one `rate_limited` error; the rest are dropped
    /// silently so a flood cannot make the server flood back.
    fn admit(&mut self) -> bool {
        if self.bucket.try_take(now_ms()) {
            self.limited = false;
            return true;
        }
        if !self.limited {
            self.limited = true;
            let cfg = &self.st.cfg;
            self.out.push(ServerFrame::error(
                "rate_limited",
                format!(
                    "at most {} messages per second (burst {}); frames dropped",
                    cfg.updates_per_sec, cfg.update_burst
                ),
            ));
        }
        false
    }

    async fn on_text(&mut self, text: &str) {
        if !self.admit() {
            return;
        }
        let max = self.st.cfg.max_frame_bytes;
        if text.len() > max {
            self.out.push(ServerFrame::error(
                "frame_too_large",
                format!("text frames are limited to {max} bytes"),
            ));
            return;
        }
        match parse_client_frame(text) {
            Err(e) => self.out.push(ServerFrame::error(e.code(), e.to_string())),
            Ok(ClientFrame::Location { lat, lon }) => self.on_location(lat, lon).await,
            Ok(ClientFrame::Discoverable { enabled, until }) => {
                self.on_discoverable(enabled, until).await
            }
        }
    }

    /// The location-update flow: validate, tell this user about friends it
    /// brought in or out of range, write the cache, queue history, publish.
    async fn on_location(&mut self, lat: f64, lon: f64) {
        let accepted = std::time::Instant::now();
        let point = match Point::new(lat, lon) {
            Ok(p) => p,
            Err(e) => {
                self.out
                    .push(ServerFrame::error("invalid_location", e.to_string()));
                return;
            }
        };
        let now = now_ms();
        if !self.slot.take_update(now) {
            let cfg = &self.st.cfg;
            self.out.push(ServerFrame::error(
                "rate_limited",
                format!(
                    "at most {} updates per second over all your connections (burst {}); update dropped",
                    cfg.user_updates_per_sec, cfg.user_update_burst
                ),
            ));
            return;
        }
        let user = self.session.user();
        // Stamped after the user's latest position, so that two reports of
        // this connection never share a millisecond: the bus echoes each
        // back on the user's own channel, and an echo of an earlier report
        // must read as older, not as another device's move (which would
        // put this session back where it was).
        let ts_ms = self
            .session
            .own_location()
            .map_or(now, |o| now.max(o.ts_ms.saturating_add(1)));
        let loc = Location { point, ts_ms };
        let events = self.session.on_own_location(loc, now);
        self.out.extend(events.into_iter().map(ServerFrame::from));
        self.st.metrics.updates_in.increment(1);
        self.st.history.push(HistoryEntry { user, loc });
        match self.ghost_until {
            // Hidden: the user's own view moves, nobody else learns of it.
            Some(until) if now < until => return,
            Some(_) => {
                // Ghost mode ran out: friends re-read the store, which
                // shows this user again from this position on.
                self.ghost_until = None;
                if let Err(e) = crate::rest::announce_shown(&self.st, user).await {
                    tracing::warn!(%user, error = %e, "could not announce the end of ghost mode");
                }
            }
            None => {}
        }
        self.last_reported = Some(loc);
        let (b, m) = (&self.st.backends, &self.st.metrics);
        let started = std::time::Instant::now();
        if let Err(e) = b.cache.put(user, loc, self.st.cfg.location_ttl).await {
            tracing::warn!(%user, error = %e, "location cache write failed");
        }
        crate::metrics::observe(&m.cache_put, started);
        let started = std::time::Instant::now();
        let published = b
            .bus
            .publish(Channel::Location(user), BusMessage::Location { user, loc })
            .await;
        crate::metrics::observe(&m.publish, started);
        crate::metrics::observe(&m.accept_to_publish, accepted);
        if let Err(e) = published {
            tracing::warn!(%user, error = %e, "publish failed");
            self.out.push(ServerFrame::error(
                "unavailable",
                "your location was saved but friends may not see it yet",
            ));
        }
        self.sync_discovery(now).await;
    }

    /// Decides the suggested interval again; an `interval` frame if it
    /// changed.
    fn decide_pace(&mut self) {
        if let Some(interval_ms) = self.pace.decide(self.session.shown(), now_ms()) {
            self.out.push(ServerFrame::Interval { interval_ms });
        }
    }

    /// Friends whose sharing with this user ran out leave as `unshared`,
    /// their channels are dropped, and their rows are pushed again (they
    /// no longer share): no message is needed, every node does this alone.
    async fn end_expired_grants(&mut self, now: i64) {
        let (events, ended) = self.session.end_expired(now);
        if ended.is_empty() {
            return;
        }
        self.out.extend(events.into_iter().map(ServerFrame::from));
        let channels: Vec<Channel> = ended.iter().copied().map(Channel::Location).collect();
        self.sub.remove(&channels);
        self.push_relations(&ended).await;
    }

    /// Pushes the user's relations with `friends` as the store holds them
    /// now, from one read:
    /// the row of `GET /v1/friends`, or its removal. On a store failure the
    /// client is told to re-read the list.
    async fn push_relations(&mut self, friends: &[UserId]) {
        let me = self.session.user();
        match self.st.backends.users.friends(me).await {
            Ok(list) => {
                let now = now_ms();
                // What the user shares may have changed too.
                self.pace.set_viewers(crate::rest::viewers_in(&list, now));
                self.decide_pace();
                for &friend in friends {
                    let frame = match list.iter().find(|f| f.id == friend) {
                        Some(f) => {
                            ServerFrame::FriendUpdate(crate::rest::friend_view(f.clone(), now))
                        }
                        None => ServerFrame::FriendRemoved { id: friend },
                    };
                    self.out.push(frame);
                }
            }
            Err(e) => {
                tracing::warn!(user = %me, error = %e, "could not read a changed friend");
                self.out.push(ServerFrame::error(
                    "unavailable",
                    "your friend list changed; read it again with GET /v1/friends",
                ));
            }
        }
    }

    /// Another device of this user logged out and its position was
    /// removed: if this connection still reports (its latest report is
    /// fresh, it is not closing, not hidden), that report goes back in the
    /// cache and on the bus, and friends keep seeing the user.
    async fn reassert(&mut self, now: i64) {
        let ttl = self.st.cfg.location_ttl;
        let Some(loc) = self.last_reported else {
            return;
        };
        let age = Duration::from_millis(u64::try_from(now.saturating_sub(loc.ts_ms)).unwrap_or(0));
        let hidden = self.ghost_until.is_some_and(|u| now < u);
        if self.closing.is_some() || hidden || age >= ttl {
            return;
        }
        let (user, b) = (self.session.user(), &self.st.backends);
        if let Err(e) = b.cache.put(user, loc, ttl - age).await {
            tracing::warn!(%user, error = %e, "location cache write failed");
        }
        if let Err(e) = b
            .bus
            .publish(Channel::Location(user), BusMessage::Location { user, loc })
            .await
        {
            tracing::warn!(%user, error = %e, "publish failed");
        }
    }

    /// `arrived`: when the mail, if a location update, reached this node.
    async fn on_mail(&mut self, mail: Mail, arrived: Option<std::time::Instant>) {
        match mail {
            Mail::Message(msg) => self.on_bus(msg, arrived).await,
            Mail::Resync => {
                self.st.metrics.resyncs.increment(1);
                self.revalidate().await;
            }
        }
    }

    /// Closes the session: its token is no longer valid.
    fn revoke(&mut self) {
        if self.closing.is_none() {
            self.out.push(ServerFrame::error(
                "token_revoked",
                "you logged out with this token",
            ));
            self.closing = Some((close::POLICY, "token revoked"));
        }
    }

    /// Re-reads the token and the visible friends from the user store and
    /// brings the session in line: friends no longer visible leave (and
    /// their channels are dropped), newly visible ones are subscribed and
    /// shown. On a store failure nothing changes and a retry is scheduled.
    async fn revalidate(&mut self) {
        let users = &self.st.backends.users;
        let me = self.session.user();
        let read = async {
            let token = users.token_user(&self.token_hash, now_ms()).await?;
            let valid = token.is_some_and(|(id, _)| id == me);
            let (visible, ghost, discoverable) = if valid {
                let now = now_ms();
                (
                    users.visible_friends(me, now).await?,
                    users.ghost_until(me, now).await?,
                    users.discoverable_until(me, now).await?,
                )
            } else {
                (Vec::new(), None, None)
            };
            StoreResult::Ok((valid, visible, ghost, discoverable))
        };
        match read.await {
            Ok((false, ..)) => {
                // A token gone with its account: say which.
                if matches!(users.user_exists(me).await, Ok(false)) {
                    self.out.push(ServerFrame::error(
                        "account_deleted",
                        "your account was deleted",
                    ));
                    self.closing = Some((close::POLICY, "account deleted"));
                }
                self.revoke();
            }
            Ok((true, visible, ghost, discoverable)) => {
                // A ghost mode that ran out is kept until the next position,
                // which tells friends to look again (see `on_location`).
                let lapsed = self.ghost_until.filter(|u| *u <= now_ms());
                self.ghost_until = ghost.or(lapsed);
                self.apply_visible(visible).await;
                let now = now_ms();
                self.pace.set_hidden(ghost.is_some_and(|u| now < u));
                self.decide_pace();
                self.discovery.until = discoverable;
                self.sync_discovery(now).await;
                self.recheck_strangers().await;
            }
            Err(e) => {
                tracing::warn!(user = %me, error = %e, "re-reading the user store failed; retrying soon");
                self.revalidate_failed = true;
            }
        }
    }

    /// Makes the tracked friends exactly `visible` (as read from the
    /// store), on the terms of their grants.
    async fn apply_visible(&mut self, mut visible: Vec<Grant>) {
        visible.sort_unstable_by_key(|g| g.id);
        let me = self.session.user();
        let gone: Vec<UserId> = self
            .session
            .tracked()
            .filter(|f| visible.binary_search_by_key(f, |g| g.id).is_err())
            .collect();
        let now = now_ms();
        let mut new = Vec::new();
        for g in visible {
            match self.session.grant(g.id) {
                // New terms of a friend already followed (an end, a precision).
                Some(old) if old != g => {
                    let event = self.session.add_friend(g, None, now);
                    self.out.extend(event.map(ServerFrame::from));
                }
                Some(_) => {}
                None if g.id != me => new.push(g),
                None => {}
            }
        }
        let b = &self.st.backends;
        if !gone.is_empty() {
            // Still a friend means they stopped sharing; otherwise the
            // friendship is gone. Either way they leave.
            let still_friends: Vec<UserId> = match b.users.friends(me).await {
                Ok(list) => list
                    .into_iter()
                    .filter(|f| f.status == FriendStatus::Friends)
                    .map(|f| f.id)
                    .collect(),
                Err(_) => Vec::new(),
            };
            let now = now_ms();
            for f in &gone {
                let reason = if !still_friends.contains(f) {
                    LeftReason::Unfriended
                } else if matches!(b.users.ghost_until(*f, now).await, Ok(Some(_))) {
                    // Ghost mode looks like going quiet, nothing more.
                    LeftReason::Inactive
                } else {
                    LeftReason::Unshared
                };
                let event = self.session.remove_friend(*f, reason);
                self.out.extend(event.map(ServerFrame::from));
            }
            let channels: Vec<Channel> = gone.iter().copied().map(Channel::Location).collect();
            self.sub.remove(&channels);
        }
        if new.is_empty() {
            return;
        }
        let channels: Vec<Channel> = new.iter().map(|g| Channel::Location(g.id)).collect();
        if let Err(e) = self.sub.add(&channels).await {
            // Neither tracked nor held (the guard released what the bus did
            // not confirm): the next re-read tries again.
            tracing::warn!(user = %me, error = %e, "subscribe failed");
            self.revalidate_failed = true;
            return;
        }
        let ids: Vec<UserId> = new.iter().map(|g| g.id).collect();
        let locs = b.cache.get_many(&ids).await.unwrap_or_else(|e| {
            tracing::warn!(user = %me, error = %e, "location cache read failed");
            vec![None; new.len()]
        });
        // Visibility again, after the location read: a revocation made
        // between the first read and now must not let a location reported
        // after it through. (One made later is queued on the inbox, which
        // was subscribed all along, and applies next.)
        let still = match b.users.visible_friends(me, now_ms()).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(user = %me, error = %e, "re-reading visible friends failed");
                self.sub.remove(&channels);
                self.revalidate_failed = true;
                return;
            }
        };
        let now = now_ms();
        let mut dropped = Vec::new();
        for (g, last) in new.into_iter().zip(locs) {
            // On the terms read last.
            let Some(g) = still.iter().find(|s| s.id == g.id).copied() else {
                dropped.push(Channel::Location(g.id));
                continue;
            };
            let event = self.session.add_friend(g, last, now);
            self.out.extend(event.map(ServerFrame::from));
        }
        self.sub.remove(&dropped);
    }

    async fn on_bus(&mut self, msg: BusMessage, arrived: Option<std::time::Instant>) {
        let now = now_ms();
        let event = match msg {
            BusMessage::Location { user, loc } if user == self.session.user() => {
                // The user's own channel: a move reported by another of
                // their devices. This connection's own echo is no news, nor
                // is anything older; a different position stamped in the
                // same millisecond is (two devices, or one device reporting
                // twice within a millisecond, happen: the test of this
                // failed about one run in two on a fast machine).
                if self
                    .session
                    .own_location()
                    .is_none_or(|o| o.ts_ms < loc.ts_ms || (o.ts_ms == loc.ts_ms && o != loc))
                {
                    let events = self.session.on_own_location(loc, now);
                    self.out.push(ServerFrame::SelfLocation(loc.into()));
                    self.out.extend(events.into_iter().map(ServerFrame::from));
                    // The user's cell among strangers follows too.
                    self.sync_discovery(now).await;
                }
                None
            }
            BusMessage::Location { user, loc } => {
                // Accepted (the publisher's wall clock, ms) to this node's
                // hub: now, less the time it has waited here since.
                let waited = arrived.map_or(Duration::ZERO, |a| a.elapsed());
                let lag_s = now.saturating_sub(loc.ts_ms).max(0) as f64 / 1000.0;
                let to_node = (lag_s - waited.as_secs_f64()).max(0.0);
                self.st.metrics.bus_to_node.record(to_node);
                let event = self.session.on_friend_location(user, loc, now);
                if let (Some(_), Some(at)) = (&event, arrived) {
                    self.out.arrived.get_or_insert(at);
                }
                event
            }
            // Whatever grants visibility is confirmed from the user store
            // (a stale grant queued behind a revocation must not undo it);
            // whatever revokes it applies at once.
            BusMessage::FriendVisible { .. } => {
                self.revalidate().await;
                None
            }
            BusMessage::FriendHidden { friend, reason } => {
                let tracked = self.session.tracks(friend);
                let event = self.session.remove_friend(friend, reason);
                if tracked {
                    self.sub.remove(&[Channel::Location(friend)]);
                }
                event
            }
            BusMessage::TokenRevoked { tag } => {
                if tag == nearby_ports::token_tag(&self.token_hash) {
                    self.revoke();
                }
                None
            }
            BusMessage::PresenceCheck => {
                self.reassert(now).await;
                None
            }
            BusMessage::FriendQuiet { friend } => self.session.forget_location(friend),
            BusMessage::FriendsChanged { friend } => {
                self.push_relations(&[friend]).await;
                None
            }
            BusMessage::Stranger { user, cell, stamp } => {
                self.on_stranger(user, cell, stamp);
                None
            }
        };
        self.out.extend(event.map(ServerFrame::from));
    }
}

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
use nearby_core::rate::TokenBucket;
use nearby_core::session::Session;
use nearby_core::{Location, Point};
use nearby_ports::{BusMessage, Channel, HistoryEntry, Subscriber};
use nearby_proto::ws::{parse_client_frame, ClientFrame, ServerFrame};
use tokio::sync::mpsc;

use crate::auth::AuthUser;
use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::rest::start_session;
use crate::state::{now_ms, AppState};

/// Bus messages handled per wake-up before the frames are flushed.
pub const BUS_DRAIN: usize = 64;

/// A write (feed + flush) that takes longer than this means the client is
/// not reading: the connection is dropped rather than left holding memory.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a closing handshake may take before the socket is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Close codes (RFC 6455 and the IANA registry).
mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const RESTART: u16 = 1012;
}

/// `GET /v1/ws`: authenticates, then upgrades. A missing or bad token is a
/// 401 before any upgrade; a request that is not a WebSocket handshake is a
/// 400 with a JSON body.
pub async fn upgrade(
    State(st): State<Arc<AppState>>,
    me: AuthUser,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rej) => {
            return ApiError::new(rej.status(), "not_websocket", rej.body_text()).into_response()
        }
    };
    if st.shutdown.is_cancelled() {
        return ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this node is shutting down",
        )
        .into_response();
    }
    let hard = ServerConfig::hard_frame_limit();
    let tracker = st.sessions.clone();
    // Small buffers: clients send ~100-byte frames every few seconds, and
    // every idle connection holds its read buffer (larger frames still
    // arrive, in several reads).
    ws.read_buffer_size(512)
        .write_buffer_size(8 * 1024)
        .max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| tracker.track_future(run(st, me, socket)))
}

fn until(deadline_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(deadline_ms.saturating_sub(now_ms())).unwrap_or(0))
}

async fn run(st: Arc<AppState>, me: AuthUser, mut socket: WebSocket) {
    let (sub, mut inbox) = Subscriber::new(st.cfg.session_queue);
    let user = me.id;
    tracing::debug!(%user, "session open");
    let opened = std::time::Instant::now();
    // The inbox first: a friendship change made while the session starts is
    // queued, not lost.
    let started = match st
        .backends
        .bus
        .subscribe(&sub, &[Channel::Inbox(user)])
        .await
    {
        Ok(()) => start_session(&st, user, Some(&sub)).await,
        Err(e) => Err(e),
    };
    let mut conn = match started {
        Ok((session, snapshot)) => {
            crate::metrics::observe(&st.metrics.session_start, opened);
            st.metrics.connections.increment(1.0);
            let frame = ServerFrame::Snapshot {
                friends: snapshot.into_iter().map(Into::into).collect(),
            };
            Conn {
                bucket: TokenBucket::new(st.cfg.updates_per_sec, st.cfg.update_burst, now_ms()),
                st: st.clone(),
                session,
                sub,
                limited: false,
                out: Outbox::from(frame),
                token_tag: nearby_ports::token_tag(&me.token_hash),
                closing: None,
            }
        }
        Err(e) => {
            tracing::warn!(%user, error = %e, "session start failed");
            let frame = ServerFrame::error(
                "unavailable",
                "could not load your friends; reconnect later",
            );
            let _ = socket.send(Message::Text(frame.to_json().into())).await;
            let _ = send_close(&mut socket, close::INTERNAL, "backend unavailable").await;
            let _ = st
                .backends
                .bus
                .unsubscribe(&sub, &[Channel::Inbox(user)])
                .await;
            return;
        }
    };
    if conn.flush(&mut socket).await.is_ok() {
        conn.serve(&mut socket, &mut inbox, me.expires_at).await;
    }
    let mut channels: Vec<Channel> = conn.session.tracked().map(Channel::Location).collect();
    channels.push(Channel::Inbox(user));
    if let Err(e) = st.backends.bus.unsubscribe(&conn.sub, &channels).await {
        tracing::warn!(%user, error = %e, "unsubscribe failed");
    }
    st.metrics.connections.decrement(1.0);
    tracing::debug!(%user, "session closed");
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
}

impl Outbox {
    fn push(&mut self, frame: ServerFrame) {
        if matches!(frame, ServerFrame::FriendLocation(_)) {
            self.deliveries += 1;
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
    sub: Subscriber,
    bucket: TokenBucket,
    /// A `rate_limited` error was sent for the current run of refused frames.
    limited: bool,
    /// Frames waiting for the next flush.
    out: Outbox,
    /// The tag of the token this connection was opened with.
    token_tag: u64,
    /// Set when the connection must close after the next flush.
    closing: Option<(u16, &'static str)>,
}

impl Conn {
    async fn serve(
        &mut self,
        socket: &mut WebSocket,
        inbox: &mut mpsc::Receiver<BusMessage>,
        token_expires_at: i64,
    ) {
        let token_expiry = tokio::time::sleep(until(token_expires_at));
        tokio::pin!(token_expiry);
        let shutdown = self.st.shutdown.clone();
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
        loop {
            let next_expiry = self.session.next_expiry();
            if next_expiry != armed {
                if let Some(t) = next_expiry {
                    friend_expiry
                        .as_mut()
                        .reset(tokio::time::Instant::now() + until(t));
                }
                armed = next_expiry;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.out.push(ServerFrame::error("going_away", "the server is shutting down; reconnect"));
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
                Some(msg) = inbox.recv() => {
                    self.on_bus(msg).await;
                    for _ in 1..BUS_DRAIN {
                        match inbox.try_recv() {
                            Ok(msg) => self.on_bus(msg).await,
                            Err(_) => break,
                        }
                    }
                }
                _ = &mut friend_expiry, if armed.is_some() => {
                    armed = None;
                    let events = self.session.on_tick(now_ms());
                    self.out.extend(events.into_iter().map(ServerFrame::from));
                }
            }
            if !self.out.is_empty() && self.flush(socket).await.is_err() {
                return;
            }
            if let Some((code, reason)) = self.closing {
                let _ = send_close(socket, code, reason).await;
                return;
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
                // tungstenite refuses frames over the hard limit without
                // buffering them; say so in the close code.
                if e.to_string().contains("too long") {
                    let _ = send_close(socket, close::TOO_BIG, "frame too large").await;
                }
                tracing::debug!(error = %e, "websocket read failed");
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
        let write = async {
            for json in out.frames.drain(..) {
                socket.feed(Message::Text(json.into())).await?;
            }
            socket.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(result) => result,
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
        }
    }

    /// The location-update flow: validate, tell this user about friends it
    /// brought in or out of range, write the cache, queue history, publish.
    async fn on_location(&mut self, lat: f64, lon: f64) {
        let point = match Point::new(lat, lon) {
            Ok(p) => p,
            Err(e) => {
                self.out
                    .push(ServerFrame::error("invalid_location", e.to_string()));
                return;
            }
        };
        let now = now_ms();
        let user = self.session.user();
        let loc = Location { point, ts_ms: now };
        let events = self.session.on_own_location(loc, now);
        self.out.extend(events.into_iter().map(ServerFrame::from));
        let (b, m) = (&self.st.backends, &self.st.metrics);
        m.updates_in.increment(1);
        let started = std::time::Instant::now();
        if let Err(e) = b.cache.put(user, loc, self.st.cfg.location_ttl).await {
            tracing::warn!(%user, error = %e, "location cache write failed");
        }
        crate::metrics::observe(&m.cache_put, started);
        self.st.history.push(HistoryEntry { user, loc });
        let started = std::time::Instant::now();
        let published = b
            .bus
            .publish(Channel::Location(user), BusMessage::Location { user, loc })
            .await;
        crate::metrics::observe(&m.publish, started);
        if let Err(e) = published {
            tracing::warn!(%user, error = %e, "publish failed");
            self.out.push(ServerFrame::error(
                "unavailable",
                "your location was saved but friends may not see it yet",
            ));
        }
    }

    async fn on_bus(&mut self, msg: BusMessage) {
        let now = now_ms();
        let event = match msg {
            BusMessage::Location { user, loc } => {
                let lag_ms = now.saturating_sub(loc.ts_ms).max(0);
                self.st.metrics.bus_lag.record(lag_ms as f64 / 1000.0);
                self.session.on_friend_location(user, loc, now)
            }
            BusMessage::FriendVisible { friend } => {
                let b = &self.st.backends;
                if !self.session.tracks(friend) {
                    if let Err(e) = b
                        .bus
                        .subscribe(&self.sub, &[Channel::Location(friend)])
                        .await
                    {
                        tracing::warn!(%friend, error = %e, "subscribe failed");
                    }
                }
                let last = b.cache.get(friend).await.unwrap_or_else(|e| {
                    tracing::warn!(%friend, error = %e, "location cache read failed");
                    None
                });
                self.session.add_friend(friend, last, now)
            }
            BusMessage::FriendHidden { friend, reason } => {
                if self.session.tracks(friend) {
                    if let Err(e) = self
                        .st
                        .backends
                        .bus
                        .unsubscribe(&self.sub, &[Channel::Location(friend)])
                        .await
                    {
                        tracing::warn!(%friend, error = %e, "unsubscribe failed");
                    }
                }
                self.session.remove_friend(friend, reason)
            }
            BusMessage::TokenRevoked { tag } => {
                if tag == self.token_tag && self.closing.is_none() {
                    self.out.push(ServerFrame::error(
                        "token_revoked",
                        "you logged out with this token",
                    ));
                    self.closing = Some((close::POLICY, "token revoked"));
                }
                None
            }
        };
        self.out.extend(event.map(ServerFrame::from));
    }
}

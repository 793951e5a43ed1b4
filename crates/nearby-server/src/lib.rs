//! The `nearby` service: the REST API and the WebSocket endpoint in one axum
//! router, over whatever backends it is given.
//!
//! * [`config`] — the one settings struct, validated once.
//! * [`state`] — [`AppState`]: settings, backends, the history queue, the
//!   shutdown signal; built once, shared as an `Arc`.
//! * [`auth`] — password hashing, bearer tokens, the [`auth::AuthUser`] extractor.
//! * [`rest`] — small handlers, one per route; friend and sharing changes
//!   publish the callbacks that live sessions act on.
//! * [`ws`] — one task per connection, selecting over the socket, the
//!   session's bus queue and its timers; the domain's `Session` decides.
//! * [`metrics`] — Prometheus instruments and `GET /metrics`.
//! * [`history`] — the bounded drop-oldest queue and its batching writer.
//! * [`strangers`] — strangers nearby: the aliases' key and the opt-in.
//! * [`web`] — the browser client, embedded in the binary.
//! * [`error`] — the one error type every handler returns.
//!
//! **Architecture invariant:** this crate knows the ports, never an adapter;
//! the binary chooses the backends.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod abuse;
pub mod auth;
pub mod config;
pub mod error;
pub mod history;
pub mod listen;
pub mod metrics;
pub mod rest;
pub mod state;
pub mod strangers;
pub mod web;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use tokio::net::TcpListener;

use crate::error::ApiError;

pub use config::ServerConfig;
pub use state::{AppState, Backends};

/// Largest REST request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// Longest request target (path and query) accepted, bytes.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Most request header bytes (names and values) accepted.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Most request headers accepted.
pub const MAX_HEADERS: usize = 64;

/// Most request headers the HTTP layer parses (above it, hyper answers an
/// empty 431 before the request reaches [`guard`]); well above
/// [`MAX_HEADERS`], so a client with too many is told so in JSON. The other
/// limits of the HTTP layer itself, which answer with an empty body: a
/// request target over 65 534 bytes (414) and a head over about 400 KiB
/// (431); `docs/protocol.md` says so.
pub const HTTP_MAX_HEADERS: usize = 512;

/// Refuses oversized request heads with a JSON body (414, 431), and gives
/// every request `request_timeout` to be answered, body read included
/// (408 otherwise), so a slow body cannot hold a connection.
async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if req.uri().to_string().len() > MAX_URI_BYTES {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is limited to {MAX_URI_BYTES} bytes"),
        )
        .into_response();
    }
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("at most {MAX_HEADERS} headers and {MAX_HEADER_BYTES} bytes of them"),
        )
        .into_response();
    }
    match tokio::time::timeout(st.cfg.request_timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request was not received and answered in time",
        )
        .into_response(),
    }
}
/// The whole HTTP surface.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(rest::healthz))
        .route("/readyz", get(rest::readyz))
        .route("/metrics", get(metrics::render))
        .route("/v1/users", axum::routing::post(rest::sign_up))
        .route("/v1/users/by-name/{username}", get(rest::user_by_name))
        .route(
            "/v1/sessions",
            axum::routing::post(rest::log_in).delete(rest::log_out),
        )
        .route("/v1/friends", get(rest::list_friends))
        .route(
            "/v1/friends/{id}",
            put(rest::request_friend).delete(rest::remove_friend),
        )
        .route("/v1/friends/{id}/sharing", put(rest::set_sharing))
        .route("/v1/nearby", get(rest::nearby))
        .route("/v1/me", axum::routing::delete(rest::delete_me))
        .route(
            "/v1/me/history",
            get(rest::history).delete(rest::delete_history),
        )
        .route(
            "/v1/me/ghost",
            get(rest::ghost)
                .put(rest::start_ghost)
                .delete(rest::end_ghost),
        )
        .route(
            "/v1/me/discoverable",
            get(strangers::discoverable)
                .put(strangers::start_discoverable)
                .delete(strangers::end_discoverable),
        )
        .route("/v1/ws", get(ws::upgrade))
        .route("/v1/ws-ticket", axum::routing::post(auth::ws_ticket))
        .route("/v1/web-config", get(web::config))
        .route("/", get(web::index))
        .route("/assets/{*path}", get(web::asset))
        .fallback(rest::not_found)
        .method_not_allowed_fallback(rest::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Drains the node: from now on `/readyz` answers 503 `draining`, new
/// WebSockets are refused with 503, REST keeps answering, and every session
/// is told to reconnect (`going_away` with a `reconnect_after_ms`, close
/// 1012) at a random batch over the first 80 % of `--drain-secs`. Returns,
/// having fired the shutdown signal, when the last session is gone, at the
/// end of the drain window, or when `now` completes (a second signal),
/// whichever comes first.
pub async fn drain(state: &AppState, now: impl std::future::Future<Output = ()>) {
    state.draining.cancel();
    let sessions = state.sessions.len();
    tracing::info!(
        sessions,
        drain_secs = state.cfg.drain.as_secs(),
        "draining: not ready, refusing new WebSockets, asking sessions to reconnect elsewhere"
    );
    // Closed only for `wait`: upgrades are refused while draining anyway.
    state.sessions.close();
    tokio::select! {
        () = state.sessions.wait() => tracing::info!("drained: every session is gone"),
        () = tokio::time::sleep(state.cfg.drain) => tracing::warn!(
            left = state.sessions.len(),
            "drain window over; closing the sessions left"
        ),
        () = now => tracing::info!(
            left = state.sessions.len(),
            "second signal: stopping now"
        ),
    }
    state.shutdown.cancel();
}

/// Serves until the state's shutdown signal fires, then closes every live
/// session (clients are told to reconnect), waits for them up to
/// `grace`, and flushes the history queue. Connections are admitted and
/// timed by [`listen`].
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    grace: Duration,
) -> std::io::Result<()> {
    let limits = state.admission.limits();
    tracing::info!(
        max_connections = limits.max,
        per_ip = limits.per_ip,
        reserve = limits.reserve,
        "connection limits"
    );
    listen::accept_loop(
        listener,
        router(state.clone()),
        state.admission.clone(),
        &state.cfg,
        state.shutdown.clone(),
        grace,
    )
    .await;
    // Upgraded WebSockets are tracked separately and see the same signal.
    state.sessions.close();
    if tokio::time::timeout(grace, state.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = state.sessions.len(),
            "sessions still open after the grace period"
        );
    }
    state.history.close_and_flush(grace).await;
    Ok(())
}

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
//! * [`web`] — the browser client, embedded in the binary.
//! * [`error`] — the one error type every handler returns.
//!
//! **Architecture invariant:** this crate knows the ports, never an adapter;
//! the binary chooses the backends.
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod error;
pub mod history;
pub mod metrics;
pub mod rest;
pub mod state;
pub mod web;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, put};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;

pub use config::ServerConfig;
pub use state::{AppState, Backends};

/// Largest REST request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

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
        .route("/v1/me/history", get(rest::history))
        .route("/v1/ws", get(ws::upgrade))
        .route("/", get(web::index))
        .route("/assets/{*path}", get(web::asset))
        .fallback(rest::not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves until the state's shutdown signal fires, then closes every live
/// session (clients are told to reconnect), waits for them up to
/// `grace`, and flushes the history queue.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    grace: Duration,
) -> std::io::Result<()> {
    let shutdown = state.shutdown.clone();
    // Frames are already coalesced per wake-up (see `ws`); Nagle's algorithm
    // would only hold the next small write until the peer's delayed ACK,
    // which put a ~40 ms floor under the latency tail.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    // axum's graceful shutdown does not wait for upgraded WebSockets: they
    // are tracked separately and see the same signal.
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

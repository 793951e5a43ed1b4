//! Prometheus metrics: `GET /metrics` in the text exposition format.
//!
//! Hot-path instruments are resolved once into [`Metrics`] (no registry
//! lookup per update); counters that adapters and the history queue keep in
//! their own atomics are copied in at scrape time.
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `nearby_ws_connections` | gauge | live WebSocket sessions on this node |
//! | `nearby_updates_in_total` | counter | location updates accepted |
//! | `nearby_deliveries_out_total` | counter | `friend_location` frames written to sockets |
//! | `nearby_stage_seconds{stage}` | histogram | `session_start`, `cache_put`, `publish`, `history_write` |
//! | `nearby_hop_seconds{hop}` | histogram | where a delivery's time goes, hop by hop (below) |
//! | `nearby_history_queue_depth` | gauge | entries waiting to be written |
//! | `nearby_history_dropped_total` / `_written_total` | counter | history entries dropped (queue full) / written |
//! | `nearby_bus_delivered_total` / `_dropped_total` | counter | bus messages handed to / dropped for local sessions |
//! | `nearby_bus_conflated_total` | counter | location updates replaced in a slow session's queue by the same friend's newer one |
//! | `nearby_bus_channels` | gauge | channels with a local subscriber |
//! | `nearby_strangers_gated_total` | counter | stranger notices a session with a full table of strangers filtered out (the hot-cell cap) |
//! | `nearby_redis_reconnects_total` | counter | broker connections re-established |
//! | `nearby_session_resyncs_total` | counter | sessions that re-read the user store because the bus may have lost messages |
//! | `nearby_announce_failures_total` | counter | friend/sharing/logout changes stored but not published (sessions catch up on resync or revalidation) |
//! | `nearby_connections_refused_total` | counter | connections refused at accept (`listen`) |
//!
//! The hops of `nearby_hop_seconds`, in a delivery's order:
//! - `accept_to_publish`: a location frame read from the socket to its
//!   publish returning (validation, cache write, publish), one sample per
//!   accepted update;
//! - `bus_to_node`: the update's acceptance (its `updated_at`, the
//!   publishing node's wall clock, ms resolution) to its arrival in this
//!   node's hub: in Redis mode the trip through Redis, plus any clock skew
//!   between the nodes; one sample per delivery;
//! - `node_to_socket`: arrival in the hub to the socket write returning
//!   (the session's queue, its turn on a worker, serialization, the
//!   write), one sample per written batch, timed from its oldest delivery.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::state::AppState;

/// Histogram buckets, seconds: 100 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The process-wide recorder, installed on first use. `None` if another
/// recorder was installed first (metrics then go there).
pub fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let installed = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .and_then(|b| b.install_recorder());
            match installed {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// Instruments of the hot paths, resolved once.
pub struct Metrics {
    /// Live sessions.
    pub connections: Gauge,
    /// Accepted updates.
    pub updates_in: Counter,
    /// `friend_location` frames written.
    pub deliveries_out: Counter,
    /// Session start (subscribe + friends + one batched cache read).
    pub session_start: Histogram,
    /// Cache write of an update.
    pub cache_put: Histogram,
    /// Publish of an update.
    pub publish: Histogram,
    /// One history batch write.
    pub history_write: Histogram,
    /// Hop: a location frame read to its publish returning.
    pub accept_to_publish: Histogram,
    /// Hop: an update's acceptance to its arrival in this node's hub.
    pub bus_to_node: Histogram,
    /// Hop: arrival in the hub to the socket write returning.
    pub node_to_socket: Histogram,
    /// Store re-reads asked by the bus.
    pub resyncs: Counter,
    /// Control messages that could not be published.
    pub announce_failures: Counter,
}

impl Metrics {
    /// Installs the recorder if needed and resolves the instruments.
    pub fn new() -> Self {
        let _ = handle();
        let stage = |s: &'static str| histogram!("nearby_stage_seconds", "stage" => s);
        let hop = |h: &'static str| histogram!("nearby_hop_seconds", "hop" => h);
        Self {
            connections: gauge!("nearby_ws_connections"),
            updates_in: counter!("nearby_updates_in_total"),
            deliveries_out: counter!("nearby_deliveries_out_total"),
            session_start: stage("session_start"),
            cache_put: stage("cache_put"),
            publish: stage("publish"),
            history_write: stage("history_write"),
            accept_to_publish: hop("accept_to_publish"),
            bus_to_node: hop("bus_to_node"),
            node_to_socket: hop("node_to_socket"),
            resyncs: counter!("nearby_session_resyncs_total"),
            announce_failures: counter!("nearby_announce_failures_total"),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Records the time since `started` in `h`.
pub fn observe(h: &Histogram, started: Instant) {
    h.record(started.elapsed().as_secs_f64());
}

/// Drains histogram samples even when nobody scrapes, so they cannot pile
/// up in memory. Runs until the process ends.
pub async fn upkeep() {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        if let Some(h) = handle() {
            h.run_upkeep();
        }
    }
}

/// `GET /metrics`.
pub async fn render(State(st): State<Arc<AppState>>) -> Response {
    let bus = st.backends.bus.stats();
    gauge!("nearby_history_queue_depth").set(st.history.depth() as f64);
    counter!("nearby_history_dropped_total").absolute(st.history.dropped());
    counter!("nearby_history_written_total").absolute(st.history.written());
    counter!("nearby_bus_delivered_total").absolute(bus.delivered);
    counter!("nearby_bus_dropped_total").absolute(bus.dropped);
    counter!("nearby_bus_conflated_total").absolute(nearby_ports::conflated_total());
    counter!("nearby_strangers_gated_total").absolute(nearby_ports::gated_total());
    counter!("nearby_redis_reconnects_total").absolute(bus.reconnects);
    gauge!("nearby_bus_channels").set(bus.channels as f64);
    gauge!("nearby_ring_members").set(bus.ring_members as f64);
    counter!("nearby_ring_channels_moved_total").absolute(bus.ring_channels_moved);
    gauge!("nearby_ring_stale").set(if bus.ring_stale { 1.0 } else { 0.0 });
    let body = handle().map(|h| h.render()).unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

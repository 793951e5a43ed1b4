//! Shared state, built once at start-up.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nearby_ports::{HistoryStore, LocationCache, PubSub, UserStore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConfigError, ServerConfig};
use crate::history::HistoryQueue;
use crate::metrics::Metrics;

/// Most password-hashing threads (fewer on machines with fewer cores).
pub const HASHING_SLOTS: usize = 4;

/// The four ports, filled by whichever adapters the binary chose.
#[derive(Clone)]
pub struct Backends {
    /// Users, tokens, friendships, sharing.
    pub users: Arc<dyn UserStore>,
    /// Location history.
    pub history: Arc<dyn HistoryStore>,
    /// Latest locations with TTL.
    pub cache: Arc<dyn LocationCache>,
    /// Per-user channels.
    pub bus: Arc<dyn PubSub>,
}

/// What every handler and session shares.
pub struct AppState {
    /// Validated settings.
    pub cfg: ServerConfig,
    /// The backends.
    pub backends: Backends,
    /// Accepted locations waiting to be written to history.
    pub history: Arc<HistoryQueue>,
    /// Fires once, when the node starts draining: no new WebSockets,
    /// `/readyz` 503, sessions told to reconnect elsewhere over the drain
    /// window. REST keeps answering.
    pub draining: CancellationToken,
    /// Fires once, on shutdown: the accept loop stops and the sessions
    /// still open close at once. Always after (or with) `draining`.
    pub shutdown: CancellationToken,
    /// Live WebSocket sessions, so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// The argon2 threads (each hash takes ~19 MiB and tens of
    /// milliseconds): a flood of logins queues here instead of spawning
    /// hundreds of blocking threads and gigabytes of hashing memory.
    pub hasher: crate::auth::Hasher,
    /// Hot-path instruments.
    pub metrics: Arc<Metrics>,
    /// The key of strangers' aliases.
    pub aliases: crate::strangers::AliasKey,
    /// Login, sign-up and per-user limits.
    pub guards: Arc<crate::abuse::Guards>,
    /// Open connections against their limits.
    pub admission: Arc<crate::listen::Admission>,
}

impl AppState {
    /// Validates `cfg` and starts the history writer. Needs a tokio runtime.
    pub fn new(cfg: ServerConfig, backends: Backends) -> Result<Arc<Self>, ConfigError> {
        cfg.validate()?;
        let metrics = Arc::new(Metrics::new());
        tokio::spawn(crate::metrics::upkeep());
        let history = HistoryQueue::start(
            backends.history.clone(),
            cfg.history_queue,
            cfg.history_batch,
            cfg.history_linger,
            metrics.clone(),
        );
        let admission = crate::listen::Admission::new(crate::listen::Limits::resolve(&cfg));
        let guards = crate::abuse::Guards::new(&cfg);
        tokio::spawn(crate::abuse::sweeper(guards.clone()));
        Ok(Arc::new(Self {
            admission,
            guards,
            aliases: crate::strangers::AliasKey::new(cfg.stranger_secret.as_deref()),
            cfg,
            backends,
            history,
            draining: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
            hasher: crate::auth::Hasher::new(
                std::thread::available_parallelism().map_or(1, |n| n.get().min(HASHING_SLOTS)),
            ),
            metrics,
        }))
    }
}

/// Wall-clock now, Unix milliseconds: the timestamp of accepted updates.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

//! The history path: sessions push accepted locations into a bounded queue
//! without waiting; one writer task drains it in batches.
//!
//! When the store is slow or down, the writer keeps retrying its current
//! batch with backoff while the queue fills; once full, each push drops the
//! oldest entry and counts it. Live updates never wait on history.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nearby_ports::{HistoryEntry, HistoryStore};
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// Bounded, drop-oldest queue of history entries with its writer.
pub struct HistoryQueue {
    queue: Mutex<VecDeque<HistoryEntry>>,
    capacity: usize,
    batch: usize,
    /// How long a partial batch waits for more entries.
    linger: Duration,
    wake: Notify,
    done: Notify,
    closed: AtomicBool,
    dropped: AtomicU64,
    written: AtomicU64,
}

impl HistoryQueue {
    /// Creates the queue and spawns its writer over `store`.
    pub fn start(
        store: Arc<dyn HistoryStore>,
        capacity: usize,
        batch: usize,
        linger: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let q = Arc::new(Self {
            queue: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity: capacity.max(1),
            batch: batch.max(1),
            linger,
            wake: Notify::new(),
            done: Notify::new(),
            closed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
        });
        tokio::spawn(write_loop(q.clone(), store, metrics));
        q
    }

    /// Queues one entry; never waits. Drops the oldest entry if full.
    pub fn push(&self, entry: HistoryEntry) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.capacity {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(entry);
        drop(q);
        self.wake.notify_one();
    }

    /// Entries waiting.
    pub fn depth(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Entries dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Entries written to the store.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Asks the writer to write what is queued and stop; waits up to `grace`.
    pub async fn close_and_flush(&self, grace: Duration) {
        let finished = self.done.notified();
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
        if tokio::time::timeout(grace, finished).await.is_err() {
            tracing::warn!(
                left = self.depth(),
                "history not fully flushed before shutdown"
            );
        }
    }

    fn take_batch(&self) -> Vec<HistoryEntry> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let n = q.len().min(self.batch);
        q.drain(..n).collect()
    }
}

async fn write_loop(q: Arc<HistoryQueue>, store: Arc<dyn HistoryStore>, metrics: Arc<Metrics>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        // A partial batch waits `linger` for more (unless shutting down):
        // fewer, larger transactions.
        if !q.linger.is_zero() && q.depth() < q.batch && !q.closed.load(Ordering::Acquire) {
            tokio::time::sleep(q.linger).await;
        }
        let batch = q.take_batch();
        if batch.is_empty() {
            if q.closed.load(Ordering::Acquire) {
                q.done.notify_waiters();
                return;
            }
            q.wake.notified().await;
            continue;
        }
        // Retry this batch until it lands; meanwhile pushes keep filling
        // (and, when full, trimming) the queue.
        loop {
            let started = std::time::Instant::now();
            match store.append(&batch).await {
                Ok(()) => {
                    crate::metrics::observe(&metrics.history_write, started);
                    q.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    backoff = Duration::from_millis(50);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, batch = batch.len(), "history write failed; retrying");
                    if q.closed.load(Ordering::Acquire) {
                        q.done.notify_waiters();
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

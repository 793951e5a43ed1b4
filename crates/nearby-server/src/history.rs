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

use nearby_core::UserId;
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
    /// Batches taken by the writer, and those it finished with (written,
    /// or given up at shutdown): [`HistoryQueue::forget`] waits for the
    /// batch in flight.
    taken: AtomicU64,
    settled: AtomicU64,
    settle: Notify,
    /// Accounts deleted lately on this node, whose points are refused
    /// (a session may report between the delete and its close).
    forgotten: Mutex<Vec<(UserId, std::time::Instant)>>,
    any_forgotten: AtomicBool,
}

/// How long a deleted account's points are refused by [`HistoryQueue::push`]:
/// far longer than its sessions take to learn of the deletion.
const FORGET_FOR: Duration = Duration::from_secs(120);

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
            taken: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            settle: Notify::new(),
            forgotten: Mutex::new(Vec::new()),
            any_forgotten: AtomicBool::new(false),
        });
        tokio::spawn(write_loop(q.clone(), store, metrics));
        q
    }

    /// Queues one entry; never waits. Drops the oldest entry if full.
    pub fn push(&self, entry: HistoryEntry) {
        if self.any_forgotten.load(Ordering::Acquire) && self.is_forgotten(entry.user) {
            return;
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.capacity {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(entry);
        drop(q);
        self.wake.notify_one();
    }

    fn is_forgotten(&self, user: UserId) -> bool {
        self.forgotten_now(|f| f.iter().any(|(u, _)| *u == user))
    }

    /// Runs `f` on the accounts still refused, the expired ones dropped.
    fn forgotten_now<R>(&self, f: impl FnOnce(&mut Vec<(UserId, std::time::Instant)>) -> R) -> R {
        let mut list = self.forgotten.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|(_, at)| at.elapsed() < FORGET_FOR);
        let r = f(&mut list);
        self.any_forgotten
            .store(!list.is_empty(), Ordering::Release);
        r
    }

    /// An account was deleted: from now on (for [`FORGET_FOR`]) its points
    /// are refused, whichever session of this node still reports them.
    pub fn refuse(&self, user: UserId) {
        self.forgotten_now(|f| f.push((user, std::time::Instant::now())));
    }

    /// `user`'s queued points go, and this waits (up to `wait`) for the
    /// batch the writer holds to land, so that a delete of the user's
    /// history made after this returns leaves nothing of this node's behind.
    /// Returns whether the writer settled in time.
    pub async fn discard(&self, user: UserId, wait: Duration) -> bool {
        let target = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.retain(|e| e.user != user);
            self.taken.load(Ordering::Acquire)
        };
        let settled = async {
            loop {
                let notified = self.settle.notified();
                if self.settled.load(Ordering::Acquire) >= target {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(wait, settled).await.is_ok()
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
        if n > 0 {
            // Under the queue's lock: `forget` sees the batch as taken or
            // still queued, never neither.
            self.taken.fetch_add(1, Ordering::AcqRel);
        }
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
        q.settled.fetch_add(1, Ordering::AcqRel);
        q.settle.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_core::Location;

    fn at(user: i64, ts: i64) -> HistoryEntry {
        HistoryEntry {
            user: UserId(user),
            loc: Location::new(37.5, 127.0, ts).expect("valid"),
        }
    }

    /// A deleted account: its queued points are dropped, the writer's batch
    /// in flight lands before `discard` returns, and its later points are
    /// refused, while another user's are all kept.
    #[tokio::test]
    async fn a_deleted_account_leaves_nothing_behind_in_the_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(
            nearby_store_sqlite::SqliteHistoryStore::open(&dir.path().join("h.db"))
                .await
                .expect("open"),
        );
        let q = HistoryQueue::start(
            store.clone(),
            1000,
            7,
            Duration::from_millis(5),
            Arc::new(Metrics::new()),
        );
        for ts in 1..=100 {
            q.push(at(1, ts));
            q.push(at(2, ts));
        }
        q.refuse(UserId(1));
        assert!(q.discard(UserId(1), Duration::from_secs(5)).await);
        store.delete_user(UserId(1)).await.expect("delete");
        for ts in 101..=150 {
            q.push(at(1, ts));
            q.push(at(2, ts));
        }
        q.close_and_flush(Duration::from_secs(5)).await;
        let points = |u| store.range(UserId(u), 0, i64::MAX, 10_000);
        assert!(points(1).await.expect("range").is_empty());
        assert_eq!(points(2).await.expect("range").len(), 150);
    }
}

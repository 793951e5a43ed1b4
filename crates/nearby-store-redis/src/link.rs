//! One Redis pub/sub server as a node sees it: a pool for publishing and a
//! fixed number of subscriber connections, each owned by a task that
//! reconciles its subscriptions with the hub.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::{Client, ClientLike, EventInterface, Pool, PubsubInterface, Value};
use nearby_hub::Hub;
use nearby_ports::{BusMessage, Channel, StoreError, StoreResult};
use nearby_ring::Ring;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::{backend, builder, codec, connected, RedisConfig};

/// Whether this server should carry a channel now (besides the hub having
/// a local subscriber for it): always for a lone server, "the ring places
/// it here" for a ring member.
pub(crate) type Placement = Arc<dyn Fn(Channel) -> bool + Send + Sync>;

/// Wait before retrying a failed resubscription after a reconnect.
const RESYNC_RETRY: Duration = Duration::from_millis(500);

/// Least time between two lag-triggered re-read requests.
const LAG_RESYNC_EVERY: Duration = Duration::from_secs(1);

/// Messages a subscriber connection may hold for its shard task.
const SUBSCRIBER_BACKLOG: usize = 8192;

/// Channels per SUBSCRIBE/UNSUBSCRIBE command.
const CHANNELS_PER_COMMAND: usize = 1024;

type Waiter = oneshot::Sender<Result<(), String>>;

/// What a shard task has to do next; requests coalesce here, so the queue
/// is bounded by the channels that exist, however many sessions ask.
#[derive(Default)]
struct Pending {
    /// Channels whose subscription may be out of line with the hub.
    dirty: HashSet<Channel>,
    /// Callers waiting for the next pass to finish.
    waiters: Vec<Waiter>,
    /// The connection was re-established: Redis has forgotten everything.
    resync: bool,
    /// The shard task has stopped (the link closed).
    closed: bool,
}

struct ShardHandle {
    pending: Mutex<Pending>,
    wake: Notify,
}

impl ShardHandle {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, channels: impl IntoIterator<Item = Channel>, waiter: Option<Waiter>) {
        let mut p = self.pending();
        if p.closed {
            drop(p);
            if let Some(w) = waiter {
                let _ = w.send(Err("redis link closed".into()));
            }
            return;
        }
        p.dirty.extend(channels);
        p.waiters.extend(waiter);
        drop(p);
        self.wake.notify_one();
    }

    fn resync(&self) {
        self.pending().resync = true;
        self.wake.notify_one();
    }
}

/// One Redis server's connections.
pub(crate) struct Link {
    pool: Pool,
    shards: Vec<Arc<ShardHandle>>,
    /// Which subscriber connection carries a channel: rendezvous over the
    /// connections' indices, stable for the link's life.
    picker: Ring,
    prefix: Arc<str>,
    stop: CancellationToken,
    clients: Vec<Client>,
}

impl Link {
    /// Connects to the server in `cfg` and starts the shard tasks. Messages
    /// arriving go to `hub`; `placement` says which channels this server
    /// carries. `reconnects` counts re-established connections.
    pub(crate) async fn connect(
        cfg: &RedisConfig,
        hub: Arc<Hub>,
        placement: Placement,
        reconnects: Arc<AtomicU64>,
    ) -> StoreResult<Self> {
        let pool = builder(cfg)?
            .build_pool(cfg.pool_size.max(1))
            .map_err(backend)?;
        pool.init().await.map_err(backend)?;
        let stop = CancellationToken::new();
        for client in pool.clients() {
            watch_reconnects(client, reconnects.clone(), None, stop.clone());
        }
        let prefix: Arc<str> = cfg.prefix.clone().into();
        let n = cfg.subscriber_connections.max(1);
        let mut shards = Vec::with_capacity(n);
        let mut clients = Vec::with_capacity(n);
        for idx in 0..n {
            let mut b = builder(cfg)?;
            // Pub/sub messages reach the reader task through a broadcast
            // channel: room for bursts so the node lags rarely (lags are
            // counted). Only here: fred sizes all of a client's event
            // channels with this, and slots are preallocated (65 536 on
            // every client cost ~300 MB).
            b.with_performance_config(|p| p.broadcast_channel_capacity = SUBSCRIBER_BACKLOG);
            let client = b.build().map_err(backend)?;
            if let Err(e) = client.init().await {
                stop.cancel();
                let _ = pool.quit().await;
                for c in &clients {
                    let _ = ClientLike::quit(c).await;
                }
                return Err(backend(e));
            }
            let handle = Arc::new(ShardHandle {
                pending: Mutex::default(),
                wake: Notify::new(),
            });
            watch_reconnects(
                &client,
                reconnects.clone(),
                Some(handle.clone()),
                stop.clone(),
            );
            tokio::spawn(read_messages(
                client.clone(),
                hub.clone(),
                prefix.clone(),
                stop.clone(),
            ));
            let task = ShardTask {
                client: client.clone(),
                hub: hub.clone(),
                placement: placement.clone(),
                prefix: prefix.clone(),
                idx,
                picker: Ring::new((0..n).map(|i| i.to_string())),
                upstream: HashSet::new(),
                handle: handle.clone(),
            };
            tokio::spawn(task.run(stop.clone()));
            shards.push(handle);
            clients.push(client);
        }
        Ok(Self {
            pool,
            shards,
            picker: Ring::new((0..n).map(|i| i.to_string())),
            prefix,
            stop,
            clients,
        })
    }

    /// Asks each affected shard to reconcile `channels` and returns at
    /// once.
    pub(crate) fn queue(&self, channels: &[Channel]) {
        self.dispatch(channels, false);
    }

    /// Asks each affected shard to reconcile `channels` and returns once
    /// Redis has confirmed the subscriptions.
    pub(crate) async fn confirm(&self, channels: &[Channel]) -> StoreResult<()> {
        for rx in self.dispatch(channels, true) {
            rx.await
                .map_err(|_| backend("redis shard task stopped"))?
                .map_err(StoreError::unavailable)?;
        }
        Ok(())
    }

    fn dispatch(
        &self,
        channels: &[Channel],
        wait: bool,
    ) -> Vec<oneshot::Receiver<Result<(), String>>> {
        let n = self.shards.len();
        let mut per_shard: Vec<Vec<Channel>> = vec![Vec::new(); n];
        for ch in channels {
            per_shard[shard_of(&self.picker, *ch)].push(*ch);
        }
        let mut waits = Vec::new();
        for (shard, chans) in self.shards.iter().zip(per_shard) {
            if chans.is_empty() {
                continue;
            }
            let waiter = if wait {
                let (tx, rx) = oneshot::channel();
                waits.push(rx);
                Some(tx)
            } else {
                None
            };
            shard.push(chans, waiter);
        }
        waits
    }

    /// Publishes an encoded message; fails at once while disconnected.
    pub(crate) async fn publish(&self, channel: Channel, msg: &BusMessage) -> StoreResult<()> {
        let payload = codec::encode_message(msg);
        connected(self.pool.next())?
            .publish::<(), _, _>(codec::channel_name(&self.prefix, channel), payload)
            .await
            .map_err(backend)
    }

    /// Answers when the server does.
    pub(crate) async fn ping(&self) -> StoreResult<()> {
        self.pool.next().ping::<()>(None).await.map_err(backend)
    }

    /// Channels of this bus's prefix the server has subscribers for, from
    /// any node (`PUBSUB CHANNELS`).
    pub(crate) async fn upstream_channels(&self) -> StoreResult<Vec<String>> {
        let pattern = format!("{}*", self.prefix);
        self.pool
            .next()
            .pubsub_channels(pattern)
            .await
            .map_err(backend)
    }

    /// Stops the tasks and closes the connections (the server left the
    /// ring). In-flight waiters are told the link closed.
    pub(crate) async fn close(&self) {
        self.stop.cancel();
        for s in &self.shards {
            s.wake.notify_one();
        }
        let quit = async {
            let _ = self.pool.quit().await;
            for c in &self.clients {
                let _ = ClientLike::quit(c).await;
            }
        };
        // A dead server would make QUIT wait out its timeout: bounded.
        let _ = tokio::time::timeout(Duration::from_secs(2), quit).await;
    }
}

fn shard_of(picker: &Ring, ch: Channel) -> usize {
    let mut buf = [0u8; 32];
    picker
        .owner(crate::ring_key(ch, &mut buf))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Counts reconnects of `client` (the first connection is not one) and,
/// for a subscriber, tells its shard to resubscribe everything.
fn watch_reconnects(
    client: &Client,
    reconnects: Arc<AtomicU64>,
    shard: Option<Arc<ShardHandle>>,
    stop: CancellationToken,
) {
    let mut events = client.reconnect_rx();
    let id = client.id().to_owned();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                ev = events.recv() => {
                    if ev.is_err() {
                        break;
                    }
                }
            }
            reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(client = %id, "redis connection re-established");
            if let Some(shard) = &shard {
                shard.resync();
            }
        }
    });
}

/// Owns one subscriber connection's subscription set.
struct ShardTask {
    client: Client,
    hub: Arc<Hub>,
    placement: Placement,
    prefix: Arc<str>,
    idx: usize,
    picker: Ring,
    /// What Redis has confirmed on this connection.
    upstream: HashSet<Channel>,
    handle: Arc<ShardHandle>,
}

impl ShardTask {
    async fn run(mut self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.handle.wake.notified() => {}
            }
            // Everything queued meanwhile is handled in the same pass.
            let (mut dirty, waiters, resync) = {
                let mut p = self.handle.pending();
                (
                    std::mem::take(&mut p.dirty),
                    std::mem::take(&mut p.waiters),
                    std::mem::take(&mut p.resync),
                )
            };
            if resync {
                self.upstream.clear();
                let (idx, picker, placement) = (self.idx, &self.picker, &self.placement);
                dirty.extend(
                    self.hub
                        .channels_where(|c| shard_of(picker, c) == idx && placement(c)),
                );
            }
            let result = self.apply(dirty).await;
            if resync {
                match &result {
                    Ok(()) => {
                        // Messages published while the connection was down
                        // are lost, control messages among them: now that
                        // they can be received again, the sessions on this
                        // connection's channels re-read the user store.
                        let upstream = &self.upstream;
                        let asked = self.hub.resync_where(|c| upstream.contains(&c));
                        tracing::info!(
                            shard = self.idx,
                            sessions = asked,
                            "resubscribed; sessions re-read the user store"
                        );
                    }
                    Err(_) => {
                        // Resubscribing failed: the whole resync again
                        // shortly (the re-reads wait until it succeeds).
                        let handle = self.handle.clone();
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(RESYNC_RETRY).await;
                            if !stop.is_cancelled() {
                                handle.resync();
                            }
                        });
                    }
                }
            }
            for w in waiters {
                let _ = w.send(result.clone());
            }
        }
        // Closed: whoever still waits, or asks later, learns it.
        let waiters = {
            let mut p = self.handle.pending();
            p.closed = true;
            std::mem::take(&mut p.waiters)
        };
        for w in waiters {
            let _ = w.send(Err("redis link closed".into()));
        }
    }

    async fn apply(&mut self, dirty: HashSet<Channel>) -> Result<(), String> {
        let (want, drop): (Vec<Channel>, Vec<Channel>) = dirty
            .into_iter()
            .partition(|c| self.hub.contains(*c) && (self.placement)(*c));
        let want: Vec<Channel> = want
            .into_iter()
            .filter(|c| !self.upstream.contains(c))
            .collect();
        let drop: Vec<Channel> = drop
            .into_iter()
            .filter(|c| self.upstream.contains(c))
            .collect();
        let mut result = Ok(());
        for chunk in want.chunks(CHANNELS_PER_COMMAND) {
            let names = self.names(chunk);
            match self.client.subscribe(names).await {
                Ok(()) => self.upstream.extend(chunk.iter().copied()),
                Err(e) => {
                    tracing::warn!(error = %e, channels = chunk.len(), "redis SUBSCRIBE failed");
                    result = Err(format!("redis subscribe failed: {e}"));
                }
            }
        }
        for chunk in drop.chunks(CHANNELS_PER_COMMAND) {
            let names = self.names(chunk);
            match self.client.unsubscribe(names).await {
                Ok(()) => {
                    for c in chunk {
                        self.upstream.remove(c);
                    }
                }
                // Left as subscribed: its messages find no local subscriber,
                // and the next resync settles it.
                Err(e) => tracing::warn!(error = %e, "redis UNSUBSCRIBE failed"),
            }
        }
        result
    }

    fn names(&self, chans: &[Channel]) -> Vec<String> {
        chans
            .iter()
            .map(|c| codec::channel_name(&self.prefix, *c))
            .collect()
    }
}

/// Decodes what a subscriber connection receives and fans it out locally.
async fn read_messages(client: Client, hub: Arc<Hub>, prefix: Arc<str>, stop: CancellationToken) {
    use tokio::sync::broadcast::error::RecvError;
    let mut rx = client.message_rx();
    let mut last_resync: Option<tokio::time::Instant> = None;
    loop {
        let got = tokio::select! {
            _ = stop.cancelled() => break,
            got = rx.recv() => got,
        };
        match got {
            Ok(m) => match parse_message(&prefix, &m.channel, &m.value) {
                Some((ch, msg)) => {
                    hub.fan_out(ch, msg);
                }
                None => {
                    tracing::warn!(channel = %&*m.channel, "undecodable bus message ignored")
                }
            },
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(lost = n, "fell behind the redis subscriber connection");
                hub.count_lost(n);
                // Some of the lost messages may have been control messages.
                // A lag is a sign of load: the re-read is asked at most
                // once per second (requests coalesce per session anyway).
                if last_resync.is_none_or(|t| t.elapsed() >= LAG_RESYNC_EVERY) {
                    last_resync = Some(tokio::time::Instant::now());
                    hub.resync_all();
                }
            }
            Err(RecvError::Closed) => break,
        }
    }
}

fn parse_message(prefix: &str, channel: &str, value: &Value) -> Option<(Channel, BusMessage)> {
    let ch = codec::parse_channel(prefix, channel)?;
    let msg = codec::decode_message(value.as_bytes()?)?;
    Some((ch, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_core::UserId;

    #[test]
    fn subscriber_connections_share_channels_evenly_and_stably() {
        let picker = Ring::new((0..4).map(|i| i.to_string()));
        let mut counts = [0usize; 4];
        for id in 0..4000 {
            let s = shard_of(&picker, Channel::Location(UserId(id)));
            assert_eq!(s, shard_of(&picker, Channel::Location(UserId(id))));
            counts[s] += 1;
        }
        assert!(counts.iter().all(|c| *c > 800), "{counts:?}");
        let one = Ring::new(["0"]);
        assert_eq!(shard_of(&one, Channel::Inbox(UserId(7))), 0);
    }
}

//! Production location cache and bus on Redis, through `fred`.
//!
//! * [`RedisCache`]: one key per user, `SET key value PX ttl`; a session's
//!   friends are read with one `MGET`.
//! * [`RedisBus`]: one Redis channel per user channel. A node holds a fixed
//!   number of subscriber connections (shards), whatever its session count;
//!   each channel lives on one shard (by hash). Local sessions register in a
//!   [`LocalHub`], which reference-counts them: Redis is asked to subscribe
//!   when a channel gets its first local subscriber and to unsubscribe when
//!   it loses its last. Messages from Redis fan out locally through the hub.
//!
//! Each shard has one task that owns its connection's subscription set and
//! *reconciles* it with the hub: given channels that may have changed, it
//! subscribes those the hub wants and Redis lacks, and unsubscribes the
//! reverse, in one command per batch. Because it reads the hub's state at
//! that moment rather than replaying add/remove events, racing sessions
//! cannot leave a channel subscribed or unsubscribed wrongly. After any
//! reconnect the shard forgets what Redis had and reconciles every channel
//! the hub holds, so sessions keep working across a Redis restart without
//! reconnecting.
//!
//! Publishing and cache writes go through a small pool of connections on
//! which fred pipelines concurrent commands. While a connection is down they
//! fail at once instead of queueing, so a live session is never stalled on
//! Redis.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{
    Builder, Client, ClientLike, Config, EventInterface, Expiration, KeysInterface, Pool,
    PubsubInterface, ReconnectPolicy, Value,
};
use nearby_core::{Location, UserId};
use nearby_ports::{
    BusMessage, BusStats, Channel, LocationCache, PubSub, StoreError, StoreResult, Subscriber,
};
use nearby_store_memory::LocalHub;
use tokio::sync::{mpsc, oneshot};

/// How to reach Redis and how many connections to hold.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]`.
    pub url: String,
    /// Prepended to every key and channel name (several deployments, or
    /// tests, can share one Redis).
    pub prefix: String,
    /// Subscriber connections per node.
    pub subscriber_connections: usize,
    /// Connections for cache reads/writes and publishing.
    pub pool_size: usize,
    /// Longest wait for one command.
    pub command_timeout: Duration,
}

impl RedisConfig {
    /// Defaults for `url`: prefix `nearby:`, 4 subscriber connections, a
    /// pool of 4, 2 s command timeout.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "nearby:".into(),
            subscriber_connections: 4,
            pool_size: 4,
            command_timeout: Duration::from_secs(2),
        }
    }
}

fn backend(e: impl Into<nearby_ports::BoxError>) -> StoreError {
    StoreError::unavailable(e)
}

fn builder(cfg: &RedisConfig) -> StoreResult<Builder> {
    let config = Config::from_url(&cfg.url).map_err(|e| backend(format!("bad redis url: {e}")))?;
    let mut b = Builder::from_config(config);
    let timeout = cfg.command_timeout;
    b.with_connection_config(|c| {
        c.connection_timeout = timeout;
        c.internal_command_timeout = timeout;
    })
    .with_performance_config(|p| {
        p.default_command_timeout = timeout;
    })
    // Retry forever, 100 ms doubling to 2 s between attempts.
    .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    Ok(b)
}

/// Connects the pool and the subscriber shards, and starts the shard tasks.
/// Needs a tokio runtime.
pub async fn connect(cfg: &RedisConfig) -> StoreResult<(Arc<RedisCache>, Arc<RedisBus>)> {
    let pool = builder(cfg)?
        .build_pool(cfg.pool_size.max(1))
        .map_err(backend)?;
    pool.init().await.map_err(backend)?;
    let reconnects = Arc::new(AtomicU64::new(0));
    for client in pool.clients() {
        count_reconnects(client, reconnects.clone(), None);
    }
    let hub = Arc::new(LocalHub::default());
    let prefix: Arc<str> = cfg.prefix.clone().into();
    let n = cfg.subscriber_connections.max(1);
    let mut shards = Vec::with_capacity(n);
    for idx in 0..n {
        let mut b = builder(cfg)?;
        // Pub/sub messages reach the shard task through a broadcast channel:
        // room for bursts so the node lags rarely (lags are counted). Only
        // here: fred sizes all of a client's event channels with this, and
        // slots are preallocated (65 536 on every client cost ~300 MB).
        b.with_performance_config(|p| p.broadcast_channel_capacity = SUBSCRIBER_BACKLOG);
        let client = b.build().map_err(backend)?;
        client.init().await.map_err(backend)?;
        let (tx, rx) = mpsc::channel(SHARD_QUEUE);
        count_reconnects(&client, reconnects.clone(), Some(tx.clone()));
        tokio::spawn(read_messages(client.clone(), hub.clone(), prefix.clone()));
        let shard = ShardTask {
            client,
            hub: hub.clone(),
            prefix: prefix.clone(),
            idx,
            n,
            upstream: HashSet::new(),
            requests: tx.clone(),
        };
        tokio::spawn(shard.run(rx));
        shards.push(tx);
    }
    let cache = Arc::new(RedisCache {
        pool: pool.clone(),
        prefix: prefix.clone(),
    });
    let bus = Arc::new(RedisBus {
        pool,
        shards,
        hub,
        prefix,
        reconnects,
    });
    Ok((cache, bus))
}

/// Counts reconnects of `client` (the first connection is not one) and,
/// for a subscriber, tells its shard to resubscribe everything.
fn count_reconnects(
    client: &Client,
    reconnects: Arc<AtomicU64>,
    shard: Option<mpsc::Sender<ShardRequest>>,
) {
    let mut events = client.reconnect_rx();
    let id = client.id().to_owned();
    tokio::spawn(async move {
        while events.recv().await.is_ok() {
            reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(client = %id, "redis connection re-established");
            if let Some(shard) = &shard {
                if shard.send(ShardRequest::Resync).await.is_err() {
                    break;
                }
            }
        }
    });
}

/// Fails at once while `client` is disconnected: callers on a live session's
/// path must not wait out a reconnect.
fn connected(client: &Client) -> StoreResult<&Client> {
    if client.is_connected() {
        Ok(client)
    } else {
        Err(StoreError::unavailable("redis is disconnected"))
    }
}

/// Latest location per user in Redis keys with a TTL.
pub struct RedisCache {
    pool: Pool,
    prefix: Arc<str>,
}

impl RedisCache {
    fn key(&self, user: UserId) -> String {
        format!("{}loc:{}", self.prefix, user)
    }
}

#[async_trait]
impl LocationCache for RedisCache {
    async fn put(&self, user: UserId, loc: Location, ttl: Duration) -> StoreResult<()> {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let value = codec::encode_location(&loc);
        connected(self.pool.next())?
            .set::<(), _, _>(
                self.key(user),
                &value[..],
                Some(Expiration::PX(ms)),
                None,
                false,
            )
            .await
            .map_err(backend)
    }

    async fn get_many(&self, users: &[UserId]) -> StoreResult<Vec<Option<Location>>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = users.iter().map(|u| self.key(*u)).collect();
        let values: Vec<Value> = connected(self.pool.next())?
            .mget(keys)
            .await
            .map_err(backend)?;
        if values.len() != users.len() {
            return Err(backend(format!(
                "MGET returned {} values for {} keys",
                values.len(),
                users.len()
            )));
        }
        Ok(values
            .iter()
            .map(|v| v.as_bytes().and_then(codec::decode_location))
            .collect())
    }

    async fn ping(&self) -> StoreResult<()> {
        self.pool.next().ping::<()>(None).await.map_err(backend)
    }
}

/// Per-user channels over Redis pub/sub, multiplexed over a few connections.
pub struct RedisBus {
    pool: Pool,
    shards: Vec<mpsc::Sender<ShardRequest>>,
    hub: Arc<LocalHub>,
    prefix: Arc<str>,
    reconnects: Arc<AtomicU64>,
}

fn shard_of(ch: Channel, n: usize) -> usize {
    let (kind, user) = match ch {
        Channel::Location(u) => (0u64, u),
        Channel::Inbox(u) => (1u64, u),
    };
    // Fibonacci hashing spreads consecutive ids over the shards.
    let h = (user.0 as u64 ^ kind).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h >> 32) % n as u64) as usize
}

impl RedisBus {
    /// Asks each affected shard to reconcile `channels`; with `wait`, returns
    /// once Redis has confirmed the subscriptions.
    async fn reconcile(&self, channels: &[Channel], wait: bool) -> StoreResult<()> {
        let n = self.shards.len();
        let mut per_shard: Vec<Vec<Channel>> = vec![Vec::new(); n];
        for ch in channels {
            per_shard[shard_of(*ch, n)].push(*ch);
        }
        let mut waits = Vec::new();
        for (shard, chans) in self.shards.iter().zip(per_shard) {
            if chans.is_empty() {
                continue;
            }
            let (done, rx) = if wait {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            shard
                .send(ShardRequest::Sync {
                    channels: chans,
                    done,
                })
                .await
                .map_err(|_| backend("redis shard task stopped"))?;
            waits.extend(rx);
        }
        for rx in waits {
            rx.await
                .map_err(|_| backend("redis shard task stopped"))?
                .map_err(StoreError::unavailable)?;
        }
        Ok(())
    }

    /// Channels this node is subscribed to on Redis, as Redis reports them
    /// (`PUBSUB CHANNELS` filtered by this bus's prefix), for tests and
    /// operators.
    pub async fn upstream_channels(&self) -> StoreResult<Vec<String>> {
        let pattern = format!("{}*", self.prefix);
        self.pool
            .next()
            .pubsub_channels(pattern)
            .await
            .map_err(backend)
    }
}

#[async_trait]
impl PubSub for RedisBus {
    async fn publish(&self, channel: Channel, msg: BusMessage) -> StoreResult<()> {
        let payload = codec::encode_message(&msg);
        connected(self.pool.next())?
            .publish::<(), _, _>(codec::channel_name(&self.prefix, channel), payload)
            .await
            .map_err(backend)
    }

    async fn subscribe(&self, sub: &Subscriber, channels: &[Channel]) -> StoreResult<()> {
        for ch in channels {
            self.hub.add(*ch, sub);
        }
        // Wait even for channels other sessions opened: their SUBSCRIBE may
        // still be in flight, and the caller reads the cache right after.
        self.reconcile(channels, true).await
    }

    async fn unsubscribe(&self, sub: &Subscriber, channels: &[Channel]) -> StoreResult<()> {
        let emptied: Vec<Channel> = channels
            .iter()
            .copied()
            .filter(|ch| self.hub.remove(*ch, sub))
            .collect();
        self.reconcile(&emptied, false).await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.pool.next().ping::<()>(None).await.map_err(backend)
    }

    fn stats(&self) -> BusStats {
        BusStats {
            reconnects: self.reconnects.load(Ordering::Relaxed),
            ..self.hub.stats()
        }
    }
}

enum ShardRequest {
    /// Bring these channels' Redis subscriptions in line with the hub.
    Sync {
        channels: Vec<Channel>,
        done: Option<oneshot::Sender<Result<(), String>>>,
    },
    /// The connection was re-established: Redis has forgotten everything.
    Resync,
}

/// Owns one subscriber connection's subscription set.
struct ShardTask {
    client: Client,
    hub: Arc<LocalHub>,
    prefix: Arc<str>,
    idx: usize,
    n: usize,
    /// What Redis has confirmed on this connection.
    upstream: HashSet<Channel>,
    /// This task's own queue, to retry a failed resync.
    requests: mpsc::Sender<ShardRequest>,
}

/// Wait before retrying a failed resubscription after a reconnect.
const RESYNC_RETRY: Duration = Duration::from_millis(500);

/// Least time between two lag-triggered re-read requests.
const LAG_RESYNC_EVERY: Duration = Duration::from_secs(1);

/// Requests waiting for one shard task; a full queue makes subscribing
/// sessions wait (back-pressure) instead of growing without bound.
const SHARD_QUEUE: usize = 4096;

/// Messages a subscriber connection may hold for its shard task.
const SUBSCRIBER_BACKLOG: usize = 8192;

/// Channels per SUBSCRIBE/UNSUBSCRIBE command.
const CHANNELS_PER_COMMAND: usize = 1024;

impl ShardTask {
    async fn run(mut self, mut rx: mpsc::Receiver<ShardRequest>) {
        while let Some(first) = rx.recv().await {
            // Everything queued meanwhile is handled in the same pass.
            let mut dirty: HashSet<Channel> = HashSet::new();
            let mut waiters = Vec::new();
            let mut resync = false;
            let mut next = Some(first);
            while let Some(req) = next {
                match req {
                    ShardRequest::Sync { channels, done } => {
                        dirty.extend(channels);
                        waiters.extend(done);
                    }
                    ShardRequest::Resync => resync = true,
                }
                next = rx.try_recv().ok();
            }
            if resync {
                self.upstream.clear();
                let (idx, n) = (self.idx, self.n);
                dirty.extend(self.hub.channels_where(|c| shard_of(c, n) == idx));
            }
            let result = self.apply(dirty).await;
            if resync {
                match &result {
                    Ok(()) => {
                        // Messages published while the connection was down
                        // are lost, control messages among them: now that
                        // they can be received again, every session re-reads
                        // the user store.
                        let asked = self.hub.resync_all();
                        tracing::info!(
                            shard = self.idx,
                            sessions = asked,
                            "resubscribed; sessions re-read the user store"
                        );
                    }
                    Err(_) => {
                        // Resubscribing failed: the whole resync again
                        // shortly (the re-reads wait until it succeeds).
                        let again = self.requests.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(RESYNC_RETRY).await;
                            let _ = again.send(ShardRequest::Resync).await;
                        });
                    }
                }
            }
            for w in waiters {
                let _ = w.send(result.clone());
            }
        }
    }

    async fn apply(&mut self, dirty: HashSet<Channel>) -> Result<(), String> {
        let (want, drop): (Vec<Channel>, Vec<Channel>) =
            dirty.into_iter().partition(|c| self.hub.contains(*c));
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
async fn read_messages(client: Client, hub: Arc<LocalHub>, prefix: Arc<str>) {
    use tokio::sync::broadcast::error::RecvError;
    let mut rx = client.message_rx();
    let mut last_resync: Option<tokio::time::Instant> = None;
    loop {
        match rx.recv().await {
            Ok(m) => {
                let decoded = parse_message(&prefix, &m.channel, &m.value);
                match decoded {
                    Some((ch, msg)) => {
                        hub.fan_out(ch, msg);
                    }
                    None => {
                        tracing::warn!(channel = %&*m.channel, "undecodable bus message ignored")
                    }
                }
            }
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

    #[test]
    fn shards_spread_and_are_stable() {
        let n = 4;
        let mut counts = [0usize; 4];
        for id in 0..4000 {
            let s = shard_of(Channel::Location(UserId(id)), n);
            assert_eq!(s, shard_of(Channel::Location(UserId(id)), n));
            counts[s] += 1;
        }
        assert!(counts.iter().all(|c| *c > 800), "{counts:?}");
        assert_eq!(shard_of(Channel::Inbox(UserId(7)), 1), 0);
    }
}

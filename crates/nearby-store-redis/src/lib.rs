//! Production location cache and bus brokers on Redis, through `fred`.
//!
//! * [`RedisCache`]: one key per user, `SET key value PX ttl`; a session's
//!   friends are read with one `MGET`. [`ShardedCache`] spreads users over
//!   several cache servers by the ring, one `MGET` per server.
//! * [`RedisBroker`]: the [`Broker`] of one Redis pub/sub server, one Redis
//!   channel per user channel. A node holds a fixed number of subscriber
//!   connections, whatever its session count; each channel lives on one of
//!   them (rendezvous over their indices). The node's [`Hub`] reference-
//!   counts local sessions: Redis is asked to subscribe when a channel gets
//!   its first local subscriber and to unsubscribe when it loses its last.
//! * [`RingBroker`]: the same over a ring of Redis servers. Each channel is
//!   published and subscribed on the server the ring places it on; a ring
//!   change resubscribes only the channels that move, at the new owner
//!   before the old one lets go.
//!
//! Each subscriber connection has one task that owns its subscription set
//! and *reconciles* it with the hub: given channels that may have changed,
//! it subscribes those the hub wants (and the ring places on this server)
//! and Redis lacks, and unsubscribes the reverse, in one command per batch.
//! Because it reads the hub's state at that moment rather than replaying
//! add/remove events, racing sessions cannot leave a channel subscribed or
//! unsubscribed wrongly, and a ring change is one more reconcile. After any
//! reconnect the task forgets what Redis had and reconciles every channel
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
mod link;
mod ring;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{
    Builder, Client, ClientLike, Config, Expiration, KeysInterface, Pool, ReconnectPolicy, Value,
};
use nearby_core::{Location, UserId};
use nearby_hub::{Broker, Bus, Hub};
use nearby_ports::{BusMessage, BusStats, Channel, LocationCache, StoreError, StoreResult};

use link::Link;
pub use ring::{Member, RingBroker};

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

/// The ring key of a channel: its name without prefix (`loc:42`), written
/// into `buf`. Every node, whatever its prefix, places a channel alike.
pub(crate) fn ring_key(ch: Channel, buf: &mut [u8; 32]) -> &[u8] {
    use std::io::Write;
    let mut w = &mut buf[..];
    let _ = match ch {
        Channel::Location(u) => write!(w, "loc:{}", u.0),
        Channel::Inbox(u) => write!(w, "inbox:{}", u.0),
        Channel::Cell(c) => write!(w, "cell:{c}"),
    };
    let left = w.len();
    &buf[..32 - left]
}

/// Connects the location cache's pool.
pub async fn connect_cache(cfg: &RedisConfig) -> StoreResult<Arc<RedisCache>> {
    let pool = builder(cfg)?
        .build_pool(cfg.pool_size.max(1))
        .map_err(backend)?;
    pool.init().await.map_err(backend)?;
    Ok(Arc::new(RedisCache {
        pool,
        prefix: cfg.prefix.clone().into(),
    }))
}

/// Connects a bus whose broker is the one Redis server of `cfg`.
pub async fn connect_bus(cfg: &RedisConfig) -> StoreResult<(Arc<Bus>, Arc<RedisBroker>)> {
    let hub = Arc::new(Hub::default());
    let broker = Arc::new(RedisBroker::connect(cfg, hub.clone()).await?);
    let bus = Arc::new(Bus::new(hub, broker.clone()));
    Ok((bus, broker))
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

    async fn remove(&self, user: UserId) -> StoreResult<()> {
        connected(self.pool.next())?
            .del::<(), _>(self.key(user))
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

/// The broker of one Redis pub/sub server: every channel on it.
pub struct RedisBroker {
    link: Link,
    reconnects: Arc<AtomicU64>,
}

impl RedisBroker {
    /// Connects to the server of `cfg`; what arrives goes to `hub`.
    pub async fn connect(cfg: &RedisConfig, hub: Arc<Hub>) -> StoreResult<Self> {
        let reconnects = Arc::new(AtomicU64::new(0));
        let link = Link::connect(cfg, hub, Arc::new(|_| true), reconnects.clone()).await?;
        Ok(Self { link, reconnects })
    }

    /// Channels of this bus's prefix that Redis has subscribers for, from
    /// any node (`PUBSUB CHANNELS`), for tests and operators.
    pub async fn upstream_channels(&self) -> StoreResult<Vec<String>> {
        self.link.upstream_channels().await
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, channel: Channel, msg: BusMessage) -> StoreResult<()> {
        self.link.publish(channel, &msg).await
    }

    async fn subscribe(&self, channels: &[Channel]) -> StoreResult<()> {
        self.link.confirm(channels).await
    }

    fn unsubscribe(&self, channels: &[Channel]) {
        self.link.queue(channels);
    }

    fn stats(&self) -> BusStats {
        BusStats {
            reconnects: self.reconnects.load(Ordering::Relaxed),
            ..BusStats::default()
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        self.link.ping().await
    }
}

/// The location cache over several Redis servers: each user's key lives on
/// the server the ring (static members, named by URL) places it on.
///
/// A session start reads its friends with one `MGET` per server, all at
/// once. A server that fails makes its users look inactive (no location)
/// until it answers again and they report; reads of the other servers'
/// users go on.
pub struct ShardedCache {
    ring: nearby_ring::Ring,
    shards: std::collections::HashMap<String, Arc<RedisCache>>,
}

impl ShardedCache {
    /// Connects to every URL (each must answer at start); `cfg` gives the
    /// prefix and the pool size.
    pub async fn connect(cfg: &RedisConfig, urls: &[String]) -> StoreResult<Arc<Self>> {
        let mut shards = std::collections::HashMap::new();
        for url in urls {
            let mut c = cfg.clone();
            c.url = url.clone();
            shards.insert(url.clone(), connect_cache(&c).await?);
        }
        Ok(Arc::new(Self {
            ring: nearby_ring::Ring::new(urls.iter().cloned()),
            shards,
        }))
    }

    /// The server (its URL) that holds `user`'s location.
    pub fn shard_of(&self, user: UserId) -> Option<&str> {
        let key = user.0.to_string();
        self.ring.owner(key.as_bytes())
    }

    fn shard(&self, user: UserId) -> StoreResult<&Arc<RedisCache>> {
        self.shard_of(user)
            .and_then(|s| self.shards.get(s))
            .ok_or_else(|| StoreError::unavailable("no cache server"))
    }
}

#[async_trait]
impl LocationCache for ShardedCache {
    async fn put(&self, user: UserId, loc: Location, ttl: Duration) -> StoreResult<()> {
        self.shard(user)?.put(user, loc, ttl).await
    }

    async fn remove(&self, user: UserId) -> StoreResult<()> {
        self.shard(user)?.remove(user).await
    }

    async fn get_many(&self, users: &[UserId]) -> StoreResult<Vec<Option<Location>>> {
        let mut by_shard: std::collections::BTreeMap<&str, (Vec<usize>, Vec<UserId>)> =
            std::collections::BTreeMap::new();
        for (i, u) in users.iter().enumerate() {
            let s = self
                .shard_of(*u)
                .ok_or_else(|| StoreError::unavailable("no cache server"))?;
            let e = by_shard.entry(s).or_default();
            e.0.push(i);
            e.1.push(*u);
        }
        let reads = by_shard.into_iter().map(|(s, (at, ids))| async move {
            let result = match self.shards.get(s) {
                Some(c) => c.get_many(&ids).await,
                None => Err(StoreError::unavailable("no cache server")),
            };
            (s, at, result)
        });
        let mut out = vec![None; users.len()];
        let (mut answered, mut failure) = (false, None);
        for (shard, at, result) in futures_util::future::join_all(reads).await {
            match result {
                Ok(locs) => {
                    answered = true;
                    for (i, loc) in at.into_iter().zip(locs) {
                        out[i] = loc;
                    }
                }
                Err(e) => {
                    tracing::warn!(%shard, error = %e, users = at.len(), "cache server failed; its users look inactive");
                    failure = Some(e);
                }
            }
        }
        match failure {
            // Not one server answered: the cache is down, as with one server.
            Some(e) if !answered => Err(e),
            _ => Ok(out),
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        // Ready while any server answers (one lost shard costs its users'
        // positions until they report, not the node).
        let pings = self.shards.values().map(|c| c.ping());
        let results = futures_util::future::join_all(pings).await;
        if results.iter().any(Result::is_ok) {
            Ok(())
        } else {
            Err(StoreError::unavailable("no cache server answers"))
        }
    }
}

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use nearby_core::{Location, UserId};
use nearby_ports::{LocationCache, StoreResult};
use tokio::time::Instant;

const SHARDS: usize = 16;

type Shard = RwLock<HashMap<UserId, (Location, Instant)>>;

/// In-process location cache with TTL. Sharded so that concurrent sessions
/// writing their own locations rarely contend; no lock is held across an
/// await (there are none inside).
pub struct MemoryCache {
    shards: Vec<Shard>,
    hasher: RandomState,
}

impl MemoryCache {
    /// Creates the cache and starts its sweeper, which drops expired entries
    /// every `sweep_every` until the cache is dropped. Needs a tokio runtime.
    pub fn new(sweep_every: Duration) -> Arc<Self> {
        let cache = Arc::new(Self {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
        });
        tokio::spawn(sweep(Arc::downgrade(&cache), sweep_every));
        cache
    }

    fn shard(&self, user: UserId) -> &Shard {
        &self.shards[self.hasher.hash_one(user) as usize % SHARDS]
    }

    /// Removes expired entries; returns how many.
    pub fn sweep_expired(&self) -> usize {
        let now = Instant::now();
        let mut removed = 0;
        for shard in &self.shards {
            let mut map = shard.write().unwrap_or_else(|e| e.into_inner());
            let before = map.len();
            map.retain(|_, (_, deadline)| *deadline > now);
            removed += before - map.len();
        }
        removed
    }

    /// Entries held, expired or not.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

async fn sweep(cache: Weak<MemoryCache>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match cache.upgrade() {
            Some(c) => {
                c.sweep_expired();
            }
            None => return,
        }
    }
}

#[async_trait]
impl LocationCache for MemoryCache {
    async fn put(&self, user: UserId, loc: Location, ttl: Duration) -> StoreResult<()> {
        let deadline = Instant::now() + ttl;
        let mut map = self.shard(user).write().unwrap_or_else(|e| e.into_inner());
        map.insert(user, (loc, deadline));
        Ok(())
    }

    async fn remove(&self, user: UserId) -> StoreResult<()> {
        let mut map = self.shard(user).write().unwrap_or_else(|e| e.into_inner());
        map.remove(&user);
        Ok(())
    }

    async fn get_many(&self, users: &[UserId]) -> StoreResult<Vec<Option<Location>>> {
        let now = Instant::now();
        Ok(users
            .iter()
            .map(|u| {
                let map = self.shard(*u).read().unwrap_or_else(|e| e.into_inner());
                map.get(u)
                    .filter(|(_, deadline)| *deadline > now)
                    .map(|(loc, _)| *loc)
            })
            .collect())
    }
}

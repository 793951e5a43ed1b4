//! A ring of Redis pub/sub servers as one broker.
//!
//! Each channel lives on the server the ring (rendezvous hashing, see
//! `nearby-ring`) places it on: publishers send there, and a node with a
//! local subscriber subscribes there. The members come from a static list
//! or from etcd; a change is applied by one task, in this order:
//!
//! 1. Connect to the new servers (an unreachable one is logged, skipped and
//!    retried every few seconds).
//! 2. Subscribe every local channel that moves at its new owner, while the
//!    old owner still carries it, and wait for Redis to confirm.
//! 3. Switch publishers to the new ring at once. For the *handover* (2 s by
//!    default) they publish a moved channel's messages at its old owner
//!    too: other nodes learn of the change a little earlier or later, and
//!    one still subscribed only at the old owner must not miss anything.
//! 4. After the handover, unsubscribe the moved channels at their old
//!    owners and close the servers that left.
//! 5. If a server left, messages on its channels may have been lost while
//!    it failed: the sessions on those channels re-read the user store.
//!
//! Only moved channels are touched. A node subscribed at both owners during
//! the handover gets those messages twice; the session's timestamp guard
//! drops the second copy.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use nearby_hub::{Broker, Hub};
use nearby_ports::{BusMessage, BusStats, Channel, StoreError, StoreResult};
use nearby_ring::Ring;
use tokio::sync::watch;

use crate::link::{Link, Placement};
use crate::{ring_key, RedisConfig};

/// A pub/sub server in the ring: its ring name and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    /// The name every node places channels by (stable across restarts).
    pub name: String,
    /// `redis://host:port`.
    pub url: String,
}

/// How often members that could not be connected are tried again.
const RETRY_MEMBERS: Duration = Duration::from_secs(3);

/// Longest wait for a new server's first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What publishers and shard tasks read.
#[derive(Default)]
struct RingState {
    /// Where publishers send and subscriptions live.
    ring: Ring,
    /// During a change, the ring being moved to: its owners subscribe too.
    next: Option<Ring>,
    /// During the handover after a change, the ring moved from: its owners
    /// still carry their channels and get every publication too.
    previous: Option<Ring>,
    links: HashMap<String, Arc<Link>>,
}

type Shared = Arc<RwLock<Arc<RingState>>>;

fn current(state: &Shared) -> Arc<RingState> {
    state.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn set(state: &Shared, new: RingState) {
    *state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
}

fn owner_of(ring: &Ring, ch: Channel) -> Option<&str> {
    let mut buf = [0u8; 32];
    ring.owner(ring_key(ch, &mut buf))
}

impl RingState {
    /// The rings whose owners carry a channel now: the one in use, and the
    /// one moved to or from during a change.
    fn rings(&self) -> impl Iterator<Item = &Ring> {
        std::iter::once(&self.ring)
            .chain(self.next.as_ref())
            .chain(self.previous.as_ref())
    }
}

/// The broker over a ring of Redis servers.
pub struct RingBroker {
    state: Shared,
    /// Members asked for, with a generation number.
    desired: watch::Sender<(u64, Vec<Member>)>,
    /// The generation last applied.
    applied: watch::Receiver<u64>,
    moved: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
    stale: AtomicBool,
}

impl RingBroker {
    /// Starts the broker with `members`; `cfg` gives the prefix and the
    /// connection sizes used for every server (its `url` is ignored).
    /// Returns once the initial members are connected (or skipped).
    pub async fn start(
        cfg: &RedisConfig,
        handover: Duration,
        hub: Arc<Hub>,
        members: Vec<Member>,
    ) -> Arc<Self> {
        let state: Shared = Arc::default();
        let (desired, desired_rx) = watch::channel((0, Vec::new()));
        let (applied_tx, applied) = watch::channel(0);
        let moved = Arc::new(AtomicU64::new(0));
        let reconnects = Arc::new(AtomicU64::new(0));
        let manager = Manager {
            cfg: cfg.clone(),
            handover,
            hub,
            state: state.clone(),
            moved: moved.clone(),
            reconnects: reconnects.clone(),
            warned: Default::default(),
        };
        tokio::spawn(manager.run(desired_rx, applied_tx));
        let broker = Arc::new(Self {
            state,
            desired,
            applied,
            moved,
            reconnects,
            stale: AtomicBool::new(false),
        });
        broker.set_members(members).await;
        broker
    }

    /// Makes the ring exactly `members` (by name; a member whose URL changed
    /// is reconnected). Returns once the change is applied.
    pub async fn set_members(&self, members: Vec<Member>) {
        let mut generation = 0;
        self.desired.send_modify(|(g, m)| {
            *g += 1;
            generation = *g;
            *m = members;
        });
        let mut applied = self.applied.clone();
        let _ = applied.wait_for(|g| *g >= generation).await;
    }

    /// The names of the members publishers route by now.
    pub fn members(&self) -> Vec<String> {
        current(&self.state)
            .ring
            .members()
            .map(str::to_owned)
            .collect()
    }

    /// The member that carries `channel` now.
    pub fn owner(&self, channel: Channel) -> Option<String> {
        owner_of(&current(&self.state).ring, channel).map(str::to_owned)
    }

    /// Marks the membership source as unreachable (or back): the ring in use
    /// is the last one known.
    pub fn set_stale(&self, stale: bool) {
        self.stale.store(stale, Ordering::Relaxed);
    }

    /// Channels of this bus's prefix subscribed on `member`'s server, by any
    /// node (`PUBSUB CHANNELS`).
    pub async fn upstream_channels(&self, member: &str) -> StoreResult<Vec<String>> {
        let link = current(&self.state).links.get(member).cloned();
        match link {
            Some(l) => l.upstream_channels().await,
            None => Err(StoreError::unavailable(format!(
                "{member} is not in the ring"
            ))),
        }
    }
}

#[async_trait]
impl Broker for RingBroker {
    async fn publish(&self, channel: Channel, msg: BusMessage) -> StoreResult<()> {
        let s = current(&self.state);
        let owner = owner_of(&s.ring, channel);
        let Some(link) = owner.and_then(|o| s.links.get(o)) else {
            return Err(StoreError::unavailable("no pub/sub server in the ring"));
        };
        // During a handover, the old owner too (if it differs and is still
        // connected); success if either took it.
        let old = s
            .previous
            .as_ref()
            .and_then(|r| owner_of(r, channel))
            .filter(|o| Some(*o) != owner)
            .and_then(|o| s.links.get(o));
        match old {
            None => link.publish(channel, &msg).await,
            Some(old) => {
                let (a, b) = tokio::join!(link.publish(channel, &msg), old.publish(channel, &msg));
                a.or(b)
            }
        }
    }

    async fn subscribe(&self, channels: &[Channel]) -> StoreResult<()> {
        let s = current(&self.state);
        if s.ring.is_empty() {
            return Err(StoreError::unavailable("no pub/sub server in the ring"));
        }
        // Ask the owner under the ring in use and, during a change, under
        // the one moved to or from (each task only subscribes what it
        // carries).
        let mut by_owner: BTreeMap<&str, Vec<Channel>> = BTreeMap::new();
        for ch in channels {
            for ring in s.rings() {
                if let Some(o) = owner_of(ring, *ch) {
                    by_owner.entry(o).or_default().push(*ch);
                }
            }
        }
        let confirms = by_owner.iter().filter_map(|(o, chans)| {
            let link = s.links.get(*o)?;
            Some(async move { link.confirm(chans).await })
        });
        for r in futures_util::future::join_all(confirms).await {
            r?;
        }
        Ok(())
    }

    fn unsubscribe(&self, channels: &[Channel]) {
        // Every server reconciles: a channel is let go wherever it was held,
        // whatever the ring said when it was taken.
        let s = current(&self.state);
        for link in s.links.values() {
            link.queue(channels);
        }
    }

    fn stats(&self) -> BusStats {
        BusStats {
            reconnects: self.reconnects.load(Ordering::Relaxed),
            ring_members: current(&self.state).ring.len() as u64,
            ring_channels_moved: self.moved.load(Ordering::Relaxed),
            ring_stale: self.stale.load(Ordering::Relaxed),
            ..BusStats::default()
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        // Ready while any member answers: one failed server is the ring's
        // business (its members leave it), not a reason to take every node
        // out of the load balancer.
        let links: Vec<Arc<Link>> = current(&self.state).links.values().cloned().collect();
        if links.is_empty() {
            return Err(StoreError::unavailable("no pub/sub server in the ring"));
        }
        let pings = links.iter().map(|l| l.ping());
        let results = futures_util::future::join_all(pings).await;
        if results.iter().any(Result::is_ok) {
            Ok(())
        } else {
            Err(StoreError::unavailable(
                "no pub/sub server in the ring answers",
            ))
        }
    }
}

/// Applies membership changes, one at a time.
struct Manager {
    cfg: RedisConfig,
    /// How long publishers keep publishing moved channels at their old
    /// owners after a change.
    handover: Duration,
    hub: Arc<Hub>,
    state: Shared,
    moved: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
    /// Members already reported unreachable.
    warned: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
}

impl Manager {
    async fn run(
        self,
        mut desired: watch::Receiver<(u64, Vec<Member>)>,
        applied: watch::Sender<u64>,
    ) {
        // URL of each connected member.
        let mut urls: HashMap<String, String> = HashMap::new();
        loop {
            let (generation, members) = desired.borrow_and_update().clone();
            let missing = self.apply(&members, &mut urls).await;
            applied.send_replace(generation);
            if missing {
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_MEMBERS) => {}
                    r = desired.changed() => if r.is_err() { break },
                }
            } else if desired.changed().await.is_err() {
                break;
            }
        }
        // The broker is gone: close every server.
        let s = current(&self.state);
        for link in s.links.values() {
            link.close().await;
        }
    }

    /// Brings the ring to `members`. Returns whether some member could not
    /// be connected (to retry).
    async fn apply(&self, members: &[Member], urls: &mut HashMap<String, String>) -> bool {
        let old = current(&self.state);
        let mut links = old.links.clone();
        let mut closing: Vec<Arc<Link>> = Vec::new();
        let wanted: HashMap<&str, &str> = members
            .iter()
            .map(|m| (m.name.as_str(), m.url.as_str()))
            .collect();
        // Gone, or moved to another URL: closed after the switch.
        links.retain(|name, link| {
            let keep = wanted.get(name.as_str()) == urls.get(name).map(String::as_str).as_ref();
            if !keep {
                closing.push(link.clone());
                urls.remove(name);
            }
            keep
        });
        // New servers are connected concurrently: one that does not
        // answer delays the change by CONNECT_TIMEOUT at most.
        let joining = members
            .iter()
            .filter(|m| !links.contains_key(&m.name))
            .map(|m| async move {
                let mut cfg = self.cfg.clone();
                cfg.url = m.url.clone();
                let placement = self.placement(&m.name);
                let connect =
                    Link::connect(&cfg, self.hub.clone(), placement, self.reconnects.clone());
                (m, tokio::time::timeout(CONNECT_TIMEOUT, connect).await)
            });
        let mut missing = false;
        for (m, result) in futures_util::future::join_all(joining).await {
            let why = match result {
                Ok(Ok(link)) => {
                    tracing::info!(member = %m.name, url = %m.url, "pub/sub server joined the ring");
                    links.insert(m.name.clone(), Arc::new(link));
                    urls.insert(m.name.clone(), m.url.clone());
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer".to_owned(),
            };
            missing = true;
            // Said once per member and URL; the retries every few seconds
            // are logged at debug.
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            if warned.insert((m.name.clone(), m.url.clone())) {
                tracing::warn!(member = %m.name, url = %m.url, error = %why, "pub/sub server unreachable; left out of the ring, retried every 3 s");
            } else {
                tracing::debug!(member = %m.name, url = %m.url, error = %why, "pub/sub server still unreachable");
            }
        }
        let ring = Ring::new(links.keys().cloned());
        if ring == old.ring && closing.is_empty() && links.len() == old.links.len() {
            return missing;
        }
        // Local channels whose owner changes.
        let moved = self
            .hub
            .channels_where(|c| owner_of(&old.ring, c) != owner_of(&ring, c));
        // 2. New owners subscribe while old owners still carry them.
        set(
            &self.state,
            RingState {
                ring: old.ring.clone(),
                next: Some(ring.clone()),
                previous: None,
                links: links.clone(),
            },
        );
        let mut by_new: BTreeMap<String, Vec<Channel>> = BTreeMap::new();
        for ch in &moved {
            if let Some(o) = owner_of(&ring, *ch) {
                by_new.entry(o.to_owned()).or_default().push(*ch);
            }
        }
        // A member reconnected at a new URL keeps its channels: its new
        // connections take all of them.
        for name in ring.members() {
            if old.links.contains_key(name) && !Arc::ptr_eq(&old.links[name], &links[name]) {
                let own = self
                    .hub
                    .channels_where(|c| owner_of(&ring, c) == Some(name));
                by_new.entry(name.to_owned()).or_default().extend(own);
            }
        }
        let confirms = by_new.iter().filter_map(|(o, chans)| {
            let link = links.get(o)?.clone();
            Some(async move { (o.clone(), link.confirm(chans).await) })
        });
        for (member, r) in futures_util::future::join_all(confirms).await {
            if let Err(e) = r {
                // Its shard tasks resubscribe on reconnect; meanwhile its
                // channels are dark, as on any server failure.
                tracing::warn!(%member, error = %e, "subscribing moved channels failed");
            }
        }
        // 3. Publishers switch, and publish at the old owners too for the
        // handover (departed servers stay connected until it ends).
        let mut during = links.clone();
        for (name, link) in &old.links {
            during.entry(name.clone()).or_insert_with(|| link.clone());
        }
        set(
            &self.state,
            RingState {
                ring: ring.clone(),
                next: None,
                previous: Some(old.ring.clone()),
                links: during,
            },
        );
        tokio::time::sleep(self.handover).await;
        // 4. Old owners let go; departed servers close.
        set(
            &self.state,
            RingState {
                ring: ring.clone(),
                next: None,
                previous: None,
                links: links.clone(),
            },
        );
        // Computed again: sessions that subscribed during the handover took
        // their channels at the old owners too.
        let leaving = self
            .hub
            .channels_where(|c| owner_of(&old.ring, c) != owner_of(&ring, c));
        for (name, link) in &old.links {
            if links.contains_key(name) {
                link.queue(&leaving);
            }
        }
        let departed = !closing.is_empty();
        for link in closing {
            link.close().await;
        }
        self.moved.fetch_add(moved.len() as u64, Ordering::Relaxed);
        tracing::info!(
            members = ring.len(),
            moved = moved.len(),
            "pub/sub ring changed"
        );
        // 5. A server that left may have lost messages before it was
        // noticed: the sessions on its channels re-read the user store.
        if departed && !moved.is_empty() {
            let moved: std::collections::HashSet<Channel> = moved.into_iter().collect();
            self.hub.resync_where(|c| moved.contains(&c));
        }
        missing
    }

    /// The channels `member` carries: those the ring in use, or the ring
    /// moved to or from, places on it.
    fn placement(&self, member: &str) -> Placement {
        let state = self.state.clone();
        let member: Arc<str> = member.into();
        Arc::new(move |ch| {
            let s = current(&state);
            let carried = s.rings().any(|r| owner_of(r, ch) == Some(&*member));
            carried
        })
    }
}

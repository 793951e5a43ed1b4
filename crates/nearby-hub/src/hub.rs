use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Instant;

use nearby_ports::{BusMessage, Channel, Subscriber};

/// Lock shards of a hub: a power of two, well above the cores that fan out
/// at once, so two busy channels rarely share a lock.
const SHARDS: usize = 64;

/// One shard: its channels and its own counters, on its own cache lines so
/// that fan-outs on different shards do not bounce one line between cores.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    channels: RwLock<HashMap<Channel, Vec<Subscriber>>>,
    delivered: AtomicU64,
    dropped: AtomicU64,
}

/// Node-local fan-out: which local subscribers want which channel.
///
/// Channels are spread over 64 lock shards by hash. Publishing takes one
/// shard's read lock and hands the message to each subscriber's queue
/// without waiting ([`Subscriber::deliver`]); a full queue drops the message
/// for that subscriber only and counts it in [`Hub::dropped`].
pub struct Hub {
    shards: Box<[Shard]>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

fn shard_index(ch: Channel) -> usize {
    let (kind, user) = match ch {
        Channel::Location(u) => (0u64, u.0 as u64),
        Channel::Inbox(u) => (0x5bd1_e995u64, u.0 as u64),
        Channel::Cell(c) => (0x2545_f491_4f6c_dd1du64, u64::from(c)),
    };
    // Fibonacci hashing: consecutive ids land on different shards. In-process
    // only, so it need not be stable across builds.
    let h = (user ^ kind).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> (64 - SHARDS.trailing_zeros())) as usize
}

impl Hub {
    fn shard(&self, ch: Channel) -> &Shard {
        &self.shards[shard_index(ch)]
    }

    /// Adds `sub` to `channel`. Returns true if the channel had no local
    /// subscriber before.
    pub fn add(&self, channel: Channel, sub: &Subscriber) -> bool {
        let mut map = write(self.shard(channel));
        let subs = map.entry(channel).or_default();
        let first = subs.is_empty();
        if !subs.iter().any(|s| s.id() == sub.id()) {
            subs.push(sub.clone());
        }
        first
    }

    /// Removes `sub` from `channel`. Returns true if that left the channel
    /// with no local subscriber.
    pub fn remove(&self, channel: Channel, sub: &Subscriber) -> bool {
        let mut map = write(self.shard(channel));
        let Some(subs) = map.get_mut(&channel) else {
            return false;
        };
        let Some(at) = subs.iter().position(|s| s.id() == sub.id()) else {
            return false;
        };
        subs.swap_remove(at);
        if subs.is_empty() {
            map.remove(&channel);
            true
        } else {
            false
        }
    }

    /// Hands `msg` to every local subscriber of `channel`; returns how many
    /// took it.
    pub fn fan_out(&self, channel: Channel, msg: BusMessage) -> usize {
        let shard = self.shard(channel);
        let map = read(shard);
        let Some(subs) = map.get(&channel) else {
            return 0;
        };
        let total = subs.len();
        let arrived = Instant::now();
        let ok = subs.iter().filter(|s| s.deliver_at(msg, arrived)).count();
        drop(map);
        shard.delivered.fetch_add(ok as u64, Ordering::Relaxed);
        if ok < total {
            shard
                .dropped
                .fetch_add((total - ok) as u64, Ordering::Relaxed);
        }
        ok
    }

    /// Whether `channel` has a local subscriber.
    pub fn contains(&self, channel: Channel) -> bool {
        read(self.shard(channel)).contains_key(&channel)
    }

    /// Every channel with a local subscriber that `keep` accepts.
    pub fn channels_where(&self, keep: impl Fn(Channel) -> bool) -> Vec<Channel> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(read(shard).keys().copied().filter(|c| keep(*c)));
        }
        out
    }

    /// Asks every local subscriber of a channel that `affected` accepts to
    /// re-read its friends and token from the user store (see
    /// [`Subscriber::resync`]): called when messages on those channels may
    /// have been lost, once they can be received again. Returns how many
    /// subscribers were asked.
    pub fn resync_where(&self, affected: impl Fn(Channel) -> bool) -> usize {
        let mut seen = HashSet::new();
        let mut subs = Vec::new();
        for shard in self.shards.iter() {
            let map = read(shard);
            for (ch, list) in map.iter() {
                if affected(*ch) {
                    subs.extend(list.iter().filter(|s| seen.insert(s.id())).cloned());
                }
            }
        }
        for s in &subs {
            s.resync();
        }
        subs.len()
    }

    /// [`Hub::resync_where`] for every channel.
    pub fn resync_all(&self) -> usize {
        self.resync_where(|_| true)
    }

    /// Counts messages that never reached the hub (lost upstream).
    pub fn count_lost(&self, n: u64) {
        self.shards[0].dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Channels with at least one local subscriber.
    pub fn channel_count(&self) -> usize {
        self.shards.iter().map(|s| read(s).len()).sum()
    }

    /// Messages handed to local subscribers so far.
    pub fn delivered(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.delivered.load(Ordering::Relaxed))
            .sum()
    }

    /// Messages dropped because a subscriber's queue was full or closed, or
    /// lost upstream.
    pub fn dropped(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.dropped.load(Ordering::Relaxed))
            .sum()
    }
}

type Map = HashMap<Channel, Vec<Subscriber>>;

fn read(shard: &Shard) -> std::sync::RwLockReadGuard<'_, Map> {
    shard.channels.read().unwrap_or_else(|e| e.into_inner())
}

fn write(shard: &Shard) -> std::sync::RwLockWriteGuard<'_, Map> {
    shard.channels.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loc;
    use nearby_core::UserId;
    use nearby_ports::Mail;
    use proptest::prelude::*;

    fn msg(friend: i64) -> BusMessage {
        BusMessage::FriendVisible {
            friend: UserId(friend),
        }
    }

    #[test]
    fn reference_counts_local_subscribers() {
        let hub = Hub::default();
        let ch = Channel::Location(UserId(1));
        let (a, _ra) = Subscriber::new(4);
        let (b, _rb) = Subscriber::new(4);
        assert!(hub.add(ch, &a), "first subscriber opens the channel");
        assert!(!hub.add(ch, &b));
        assert!(!hub.add(ch, &a), "re-adding is idempotent");
        assert!(!hub.remove(ch, &a));
        assert!(hub.remove(ch, &b), "last subscriber closes the channel");
        assert!(!hub.remove(ch, &b));
        assert_eq!(hub.channel_count(), 0);
    }

    #[test]
    fn full_queues_drop_and_count_without_blocking() {
        let hub = Hub::default();
        let ch = Channel::Inbox(UserId(1));
        let (slow, mut slow_rx) = Subscriber::new(1);
        let (fast, mut fast_rx) = Subscriber::new(8);
        hub.add(ch, &slow);
        hub.add(ch, &fast);
        // Two different friends' updates: the second does not replace the
        // first, so the one-slot queue overflows.
        assert_eq!(hub.fan_out(ch, loc(1)), 2);
        assert_eq!(hub.fan_out(ch, loc(2)), 1);
        assert_eq!((hub.delivered(), hub.dropped()), (3, 1));
        assert_eq!(slow_rx.try_recv(), Some(Mail::Message(loc(1))));
        assert!(slow_rx.try_recv().is_none());
        assert_eq!(fast_rx.try_recv(), Some(Mail::Message(loc(1))));
        assert_eq!(fast_rx.try_recv(), Some(Mail::Message(loc(2))));
        assert_eq!(hub.fan_out(Channel::Inbox(UserId(9)), msg(3)), 0);
    }

    #[test]
    fn resync_reaches_each_affected_subscriber_once() {
        let hub = Hub::default();
        let (a, mut ra) = Subscriber::new(4);
        let (b, mut rb) = Subscriber::new(4);
        let (c, mut rc) = Subscriber::new(4);
        hub.add(Channel::Inbox(UserId(1)), &a);
        hub.add(Channel::Location(UserId(2)), &a);
        hub.add(Channel::Location(UserId(2)), &b);
        hub.add(Channel::Location(UserId(3)), &c);
        let moved = |ch: Channel| ch != Channel::Location(UserId(3));
        assert_eq!(hub.resync_where(moved), 2);
        assert_eq!(ra.try_recv(), Some(Mail::Resync));
        assert_eq!(ra.try_recv(), None);
        assert_eq!(rb.try_recv(), Some(Mail::Resync));
        assert_eq!(rc.try_recv(), None, "c holds no affected channel");
        assert_eq!(hub.resync_all(), 3);
    }

    #[test]
    fn a_hot_channel_with_thousands_of_subscribers() {
        let hub = Hub::default();
        let ch = Channel::Location(UserId(1));
        let subs: Vec<_> = (0..5000).map(|_| Subscriber::new(4)).collect();
        for (s, _) in &subs {
            hub.add(ch, s);
        }
        assert_eq!(hub.fan_out(ch, loc(1)), 5000);
        for (s, _) in subs.iter().rev() {
            hub.remove(ch, s);
        }
        assert_eq!(hub.channel_count(), 0);
    }

    proptest! {
        /// Any interleaving of adds and removes leaves the hub holding
        /// exactly the pairs added and not removed since, and `add`/`remove`
        /// report the first and last subscriber of a channel truthfully.
        #[test]
        fn holds_exactly_what_was_added_and_not_removed(
            ops in prop::collection::vec((any::<bool>(), 0usize..4, 0i64..6, any::<bool>()), 0..200)
        ) {
            let hub = Hub::default();
            let subs: Vec<_> = (0..4).map(|_| Subscriber::new(4)).collect();
            let mut model: HashMap<Channel, HashSet<usize>> = HashMap::new();
            for (add, s, user, inbox) in ops {
                let ch = if inbox { Channel::Inbox(UserId(user)) } else { Channel::Location(UserId(user)) };
                let set = model.entry(ch).or_default();
                if add {
                    let first = set.is_empty();
                    set.insert(s);
                    prop_assert_eq!(hub.add(ch, &subs[s].0), first);
                } else {
                    let last = set.len() == 1 && set.contains(&s);
                    set.remove(&s);
                    prop_assert_eq!(hub.remove(ch, &subs[s].0), last);
                }
            }
            model.retain(|_, s| !s.is_empty());
            prop_assert_eq!(hub.channel_count(), model.len());
            for ch in model.keys() {
                prop_assert!(hub.contains(*ch));
            }
        }
    }
}

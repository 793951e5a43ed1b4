use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use async_trait::async_trait;
use nearby_ports::{BusMessage, BusStats, Channel, PubSub, StoreResult, Subscriber};

/// Node-local fan-out: which local subscribers want which channel.
///
/// Publishing takes a read lock and hands the message to each subscriber's
/// queue without waiting ([`Subscriber::deliver`]); a full queue drops the
/// message for that subscriber only and counts it in [`LocalHub::dropped`].
#[derive(Default)]
pub struct LocalHub {
    channels: RwLock<HashMap<Channel, Vec<Subscriber>>>,
    delivered: AtomicU64,
    dropped: AtomicU64,
}

impl LocalHub {
    /// Adds `sub` to `channel`. Returns true if the channel had no local
    /// subscriber before (a broker adapter then subscribes upstream).
    pub fn add(&self, channel: Channel, sub: &Subscriber) -> bool {
        let mut map = self.channels.write().unwrap_or_else(|e| e.into_inner());
        let subs = map.entry(channel).or_default();
        let first = subs.is_empty();
        if !subs.iter().any(|s| s.id() == sub.id()) {
            subs.push(sub.clone());
        }
        first
    }

    /// Removes `sub` from `channel`. Returns true if that left the channel
    /// with no local subscriber (a broker adapter then unsubscribes upstream).
    pub fn remove(&self, channel: Channel, sub: &Subscriber) -> bool {
        let mut map = self.channels.write().unwrap_or_else(|e| e.into_inner());
        let Some(subs) = map.get_mut(&channel) else {
            return false;
        };
        let before = subs.len();
        subs.retain(|s| s.id() != sub.id());
        if subs.is_empty() {
            map.remove(&channel);
            before > 0
        } else {
            false
        }
    }

    /// Hands `msg` to every local subscriber of `channel`; returns how many
    /// took it.
    pub fn fan_out(&self, channel: Channel, msg: BusMessage) -> usize {
        let map = self.channels.read().unwrap_or_else(|e| e.into_inner());
        let Some(subs) = map.get(&channel) else {
            return 0;
        };
        let total = subs.len();
        let arrived = std::time::Instant::now();
        let ok = subs.iter().filter(|s| s.deliver_at(msg, arrived)).count();
        drop(map);
        self.delivered.fetch_add(ok as u64, Ordering::Relaxed);
        if ok < total {
            self.dropped
                .fetch_add((total - ok) as u64, Ordering::Relaxed);
        }
        ok
    }

    /// Whether `channel` has a local subscriber.
    pub fn contains(&self, channel: Channel) -> bool {
        self.channels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&channel)
    }

    /// Every channel with a local subscriber that `keep` accepts.
    pub fn channels_where(&self, keep: impl Fn(Channel) -> bool) -> Vec<Channel> {
        let map = self.channels.read().unwrap_or_else(|e| e.into_inner());
        map.keys().copied().filter(|c| keep(*c)).collect()
    }

    /// Asks every local subscriber to re-read its friends and token from
    /// the user store (see [`Subscriber::resync`]): called when the broker
    /// may have lost messages, after they can be received again. Returns how
    /// many subscribers were asked.
    pub fn resync_all(&self) -> usize {
        let subs: HashMap<u64, Subscriber> = {
            let map = self.channels.read().unwrap_or_else(|e| e.into_inner());
            map.values()
                .flatten()
                .map(|s| (s.id(), s.clone()))
                .collect()
        };
        for s in subs.values() {
            s.resync();
        }
        subs.len()
    }

    /// Counts a message that never reached the hub (lost upstream).
    pub fn count_lost(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Delivered, dropped and channel counts; `reconnects` is the adapter's.
    pub fn stats(&self) -> BusStats {
        BusStats {
            delivered: self.delivered(),
            dropped: self.dropped(),
            reconnects: 0,
            channels: self.channel_count() as u64,
        }
    }

    /// Channels with at least one local subscriber.
    pub fn channel_count(&self) -> usize {
        self.channels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Messages handed to local subscribers so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Messages dropped because a subscriber's queue was full or closed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The embedded bus: publishing fans out directly through a [`LocalHub`].
#[derive(Default)]
pub struct MemoryBus {
    hub: LocalHub,
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// The hub behind the bus, for metrics.
    pub fn hub(&self) -> &LocalHub {
        &self.hub
    }
}

#[async_trait]
impl PubSub for MemoryBus {
    async fn publish(&self, channel: Channel, msg: BusMessage) -> StoreResult<()> {
        self.hub.fan_out(channel, msg);
        Ok(())
    }

    async fn subscribe(&self, sub: &Subscriber, channels: &[Channel]) -> StoreResult<()> {
        for ch in channels {
            self.hub.add(*ch, sub);
        }
        Ok(())
    }

    async fn unsubscribe(&self, sub: &Subscriber, channels: &[Channel]) -> StoreResult<()> {
        for ch in channels {
            self.hub.remove(*ch, sub);
        }
        Ok(())
    }

    fn stats(&self) -> BusStats {
        self.hub.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_core::{Location, UserId};
    use nearby_ports::Mail;

    fn loc(user: i64) -> BusMessage {
        BusMessage::Location {
            user: UserId(user),
            loc: Location::new(1.0, 2.0, 0).expect("valid"),
        }
    }

    fn msg(friend: i64) -> BusMessage {
        BusMessage::FriendVisible {
            friend: UserId(friend),
        }
    }

    #[test]
    fn reference_counts_local_subscribers() {
        let hub = LocalHub::default();
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
        let hub = LocalHub::default();
        let ch = Channel::Inbox(UserId(1));
        let (slow, mut slow_rx) = Subscriber::new(1);
        let (fast, mut fast_rx) = Subscriber::new(8);
        hub.add(ch, &slow);
        hub.add(ch, &fast);
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
    fn resync_reaches_each_subscriber_once() {
        let hub = LocalHub::default();
        let (a, mut ra) = Subscriber::new(4);
        let (b, mut rb) = Subscriber::new(4);
        hub.add(Channel::Inbox(UserId(1)), &a);
        hub.add(Channel::Location(UserId(2)), &a);
        hub.add(Channel::Location(UserId(2)), &b);
        assert_eq!(hub.resync_all(), 2);
        assert_eq!(ra.try_recv(), Some(Mail::Resync));
        assert_eq!(ra.try_recv(), None);
        assert_eq!(rb.try_recv(), Some(Mail::Resync));
    }
}

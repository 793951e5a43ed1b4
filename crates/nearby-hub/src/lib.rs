//! A node's half of the bus.
//!
//! * [`Hub`]: node-local fan-out, channel → local subscribers. Sharded by
//!   channel, so a hot channel and a cold one never share a lock.
//! * [`Broker`]: the node's upstream, shaped like Centrifuge's broker: the
//!   node publishes on channels and subscribes to and unsubscribes from
//!   them; what arrives is handed to the hub. Three implementations: the
//!   in-process [`LocalBroker`] here, and in `nearby-store-redis` one Redis
//!   server or a ring of them.
//! * [`Bus`]: the hub plus a broker, which is the [`PubSub`] the server
//!   uses. The hub reference-counts local subscribers: the broker is asked
//!   to subscribe when a channel gets its first local subscriber and to
//!   unsubscribe when it loses its last.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod hub;

pub use hub::Hub;

use std::sync::Arc;

use async_trait::async_trait;
use nearby_ports::{BusMessage, BusStats, Channel, PubSub, StoreResult, Subscriber};

/// A node's upstream: where its publications go and its subscriptions come
/// from. Messages that arrive are handed to the [`Hub`] the broker was built
/// with.
///
/// Brokers *reconcile* rather than replay: `subscribe` and `unsubscribe` say
/// which channels may have changed, and the broker brings its upstream
/// subscriptions in line with what the hub holds at that moment.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publishes `msg` on `channel`, to every node subscribed to it.
    async fn publish(&self, channel: Channel, msg: BusMessage) -> StoreResult<()>;
    /// `channels` got local subscribers: returns once upstream delivers them.
    async fn subscribe(&self, channels: &[Channel]) -> StoreResult<()>;
    /// `channels` lost their last local subscriber. Never waits.
    fn unsubscribe(&self, channels: &[Channel]);
    /// Upstream's own counters (`delivered`, `dropped` and `channels` are
    /// the hub's and are filled in by [`Bus`]).
    fn stats(&self) -> BusStats {
        BusStats::default()
    }
    /// Answers when upstream is reachable.
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}

/// The embedded broker: publishing is local fan-out; there is no upstream
/// to subscribe to.
pub struct LocalBroker {
    hub: Arc<Hub>,
}

impl LocalBroker {
    /// A broker that hands every publication to `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

#[async_trait]
impl Broker for LocalBroker {
    async fn publish(&self, channel: Channel, msg: BusMessage) -> StoreResult<()> {
        self.hub.fan_out(channel, msg);
        Ok(())
    }

    async fn subscribe(&self, _channels: &[Channel]) -> StoreResult<()> {
        Ok(())
    }

    fn unsubscribe(&self, _channels: &[Channel]) {}
}

/// The hub and its broker: the bus the server talks to.
pub struct Bus {
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
}

impl Bus {
    /// `broker` must have been built with `hub`.
    pub fn new(hub: Arc<Hub>, broker: Arc<dyn Broker>) -> Self {
        Self { hub, broker }
    }

    /// The embedded bus: a hub and a [`LocalBroker`].
    pub fn in_process() -> Self {
        let hub = Arc::new(Hub::default());
        let broker = Arc::new(LocalBroker::new(hub.clone()));
        Self::new(hub, broker)
    }

    /// The hub, for tests and metrics.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }
}

#[async_trait]
impl PubSub for Bus {
    async fn publish(&self, channel: Channel, msg: BusMessage) -> StoreResult<()> {
        self.broker.publish(channel, msg).await
    }

    async fn subscribe(&self, sub: &Subscriber, channels: &[Channel]) -> StoreResult<()> {
        for ch in channels {
            self.hub.add(*ch, sub);
        }
        // All of them, not only those this call opened: another session's
        // subscription of the same channel may still be in flight upstream,
        // and the caller reads the cache right after.
        self.broker.subscribe(channels).await
    }

    fn unsubscribe(&self, sub: &Subscriber, channels: &[Channel]) {
        let emptied: Vec<Channel> = channels
            .iter()
            .copied()
            .filter(|ch| self.hub.remove(*ch, sub))
            .collect();
        if !emptied.is_empty() {
            self.broker.unsubscribe(&emptied);
        }
    }

    fn stats(&self) -> BusStats {
        BusStats {
            delivered: self.hub.delivered(),
            dropped: self.hub.dropped(),
            channels: self.hub.channel_count() as u64,
            ..self.broker.stats()
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        self.broker.ping().await
    }
}

/// A location update of `user`, for tests.
#[cfg(test)]
pub(crate) fn loc(user: i64) -> BusMessage {
    BusMessage::Location {
        user: nearby_core::UserId(user),
        loc: nearby_core::Location::new(1.0, 2.0, 0).expect("valid"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_core::UserId;
    use nearby_ports::{Mail, Subscription};

    #[tokio::test]
    async fn dropping_a_subscription_empties_the_hub() {
        let bus = Arc::new(Bus::in_process());
        let (sub, mut mailbox) = Subscriber::new(8);
        let dynbus: Arc<dyn PubSub> = bus.clone();
        let mut guard = Subscription::new(dynbus, sub);
        let chans = [Channel::Location(UserId(1)), Channel::Inbox(UserId(2))];
        guard.add(&chans).await.expect("subscribe");
        assert_eq!(bus.hub().channel_count(), 2);
        bus.publish(chans[0], loc(1)).await.expect("publish");
        assert_eq!(mailbox.try_recv(), Some(Mail::Message(loc(1))));
        guard.remove(&[chans[1], Channel::Inbox(UserId(99))]);
        assert_eq!(guard.channels(), &chans[..1]);
        assert_eq!(bus.hub().channel_count(), 1);
        drop(guard);
        assert_eq!(bus.hub().channel_count(), 0);
    }

    #[tokio::test]
    async fn a_session_task_that_panics_leaves_nothing_behind() {
        let bus = Arc::new(Bus::in_process());
        let dynbus: Arc<dyn PubSub> = bus.clone();
        let task = tokio::spawn(async move {
            let (sub, _mailbox) = Subscriber::new(8);
            let mut guard = Subscription::new(dynbus, sub);
            guard
                .add(&[Channel::Location(UserId(7))])
                .await
                .expect("subscribe");
            panic!("the session's task dies with its guard held");
        });
        assert!(task.await.is_err(), "the task panicked");
        assert_eq!(bus.hub().channel_count(), 0);
    }

    /// A broker whose upstream refuses subscriptions.
    struct Refusing;

    #[async_trait]
    impl Broker for Refusing {
        async fn publish(&self, _: Channel, _: BusMessage) -> StoreResult<()> {
            Ok(())
        }
        async fn subscribe(&self, _: &[Channel]) -> StoreResult<()> {
            Err(nearby_ports::StoreError::unavailable("upstream is down"))
        }
        fn unsubscribe(&self, _: &[Channel]) {}
    }

    #[tokio::test]
    async fn a_failed_subscribe_holds_nothing_new() {
        let hub = Arc::new(Hub::default());
        let bus: Arc<dyn PubSub> = Arc::new(Bus::new(hub.clone(), Arc::new(Refusing)));
        let (sub, _mailbox) = Subscriber::new(8);
        let mut guard = Subscription::new(bus, sub);
        let err = guard.add(&[Channel::Location(UserId(3))]).await;
        assert!(err.is_err());
        assert!(guard.channels().is_empty());
        assert_eq!(hub.channel_count(), 0, "the hub kept a refused channel");
    }

    #[tokio::test]
    async fn in_process_bus_conforms() {
        let bus = Bus::in_process();
        nearby_conformance::pubsub(&bus, 0).await;
        assert_eq!(
            bus.hub().channel_count(),
            0,
            "unsubscribing left channels behind"
        );
    }
}

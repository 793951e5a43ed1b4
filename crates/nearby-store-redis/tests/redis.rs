//! The Redis cache and bus against the shared adapter contract and against
//! real failures, on real `redis-server` processes.
use std::time::Duration;

use nearby_conformance::services::{self, RedisProcess};
use nearby_core::{Location, Point, UserId};
use nearby_hub::Bus;
use nearby_ports::{BusMessage, Channel, LocationCache, Mail, Mailbox, PubSub, Subscriber};
use nearby_store_redis::{connect_bus, connect_cache, RedisBroker, RedisCache, RedisConfig};
use std::sync::Arc;

async fn connect(
    cfg: &RedisConfig,
) -> Result<(Arc<RedisCache>, Arc<Bus>, Arc<RedisBroker>), nearby_ports::StoreError> {
    let cache = connect_cache(cfg).await?;
    let (bus, broker) = connect_bus(cfg).await?;
    Ok((cache, bus, broker))
}

async fn shared(tag: &str) -> Option<(Arc<RedisCache>, Arc<Bus>)> {
    let url = services::redis_url();
    if let Err(e) = services::reachable(&url) {
        services::missing("Redis", e);
        return None;
    }
    let mut cfg = RedisConfig::new(url);
    cfg.prefix = services::unique(tag) + ":";
    cfg.subscriber_connections = 2;
    let (cache, bus, _) = connect(&cfg).await.expect("connect to redis");
    Some((cache, bus))
}

fn msg(user: i64, lat: f64) -> BusMessage {
    BusMessage::Location {
        user: UserId(user),
        loc: Location {
            point: Point::new(lat, 10.0).expect("point"),
            ts_ms: 1,
        },
    }
}

/// The next message (re-read requests are counted in `resyncs`, not
/// returned), or `None` after `within`.
async fn recv_counting(
    r: &mut Mailbox,
    within: Duration,
    resyncs: &mut usize,
) -> Option<BusMessage> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, r.recv())
            .await
            .ok()
            .flatten()?
        {
            Mail::Message(m) => return Some(m),
            Mail::Resync => *resyncs += 1,
        }
    }
}

async fn recv(r: &mut Mailbox, within: Duration) -> Option<BusMessage> {
    recv_counting(r, within, &mut 0).await
}

#[tokio::test]
async fn redis_cache_conforms() {
    let Some((cache, _)) = shared("cache").await else {
        return;
    };
    nearby_conformance::location_cache(cache.as_ref(), 0).await;
}

#[tokio::test]
async fn redis_bus_conforms() {
    let Some((_, bus)) = shared("bus").await else {
        return;
    };
    nearby_conformance::pubsub(bus.as_ref(), 0).await;
}

#[tokio::test]
async fn two_nodes_share_channels_and_subscribe_once_per_node() {
    let url = services::redis_url();
    if let Err(e) = services::reachable(&url) {
        return services::missing("Redis", e);
    }
    let mut cfg = RedisConfig::new(url);
    cfg.prefix = services::unique("nodes") + ":";
    let (_, node_a, upstream_a) = connect(&cfg).await.expect("node a");
    let (_, node_b, _) = connect(&cfg).await.expect("node b");
    let ch = Channel::Location(UserId(1));

    // Three sessions on node A want the same channel: Redis sees one
    // subscription from A.
    let subs: Vec<_> = (0..3).map(|_| Subscriber::new(8)).collect();
    for (s, _) in &subs {
        node_a.subscribe(s, &[ch]).await.expect("subscribe");
    }
    assert_eq!(node_a.stats().channels, 1);
    let upstream = upstream_a
        .upstream_channels()
        .await
        .expect("pubsub channels");
    assert_eq!(upstream, vec![format!("{}loc:1", cfg.prefix)]);

    // A message published on node B reaches all three sessions on A, once.
    node_b.publish(ch, msg(1, 1.0)).await.expect("publish");
    let mut rxs: Vec<_> = subs.into_iter().collect();
    for (_, rx) in rxs.iter_mut() {
        assert_eq!(recv(rx, Duration::from_secs(5)).await, Some(msg(1, 1.0)));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (_, rx) in rxs.iter_mut() {
        assert!(rx.try_recv().is_none(), "delivered twice");
    }

    // The last local session leaving unsubscribes the node from Redis.
    for (s, _) in &rxs {
        node_a.unsubscribe(s, &[ch]);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !upstream_a
        .upstream_channels()
        .await
        .expect("channels")
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still subscribed upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(node_a.stats().channels, 0);
}

#[tokio::test]
async fn sessions_keep_receiving_after_redis_restarts() {
    let mut redis = match RedisProcess::start() {
        Ok(r) => r,
        Err(e) => return services::missing("redis-server", e),
    };
    let mut cfg = RedisConfig::new(redis.url());
    cfg.subscriber_connections = 3;
    let (cache, bus, _) = connect(&cfg).await.expect("connect");
    let (sub, mut rx) = Subscriber::new(64);
    let channels: Vec<Channel> = (1..=12).map(|u| Channel::Location(UserId(u))).collect();
    bus.subscribe(&sub, &channels).await.expect("subscribe");
    bus.publish(channels[0], msg(1, 1.0))
        .await
        .expect("publish");
    assert_eq!(
        recv(&mut rx, Duration::from_secs(5)).await,
        Some(msg(1, 1.0))
    );

    redis.kill();
    // While Redis is down, calls fail fast with a backend error.
    let started = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(bus.publish(channels[1], msg(2, 2.0)).await.is_err());
    assert!(cache.get(UserId(1)).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(2));

    redis.restart().expect("restart redis");
    // The session never re-subscribed: the bus did it for every channel.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut seen = std::collections::HashSet::new();
    let mut resyncs = 0;
    while seen.len() < channels.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {} channels flow again after the restart",
            seen.len(),
            channels.len()
        );
        for (i, ch) in channels.iter().enumerate() {
            if !seen.contains(&i) {
                let _ = bus.publish(*ch, msg(i as i64 + 1, 3.0)).await;
            }
        }
        while let Some(m) = recv_counting(&mut rx, Duration::from_millis(200), &mut resyncs).await {
            if let BusMessage::Location { user, .. } = m {
                seen.insert(user.0 as usize - 1);
            }
        }
    }
    assert!(bus.stats().reconnects >= 1, "{:?}", bus.stats());
    // Messages may have been lost while Redis was down: the subscriber was
    // asked to re-read the store once it could receive again.
    assert!(resyncs >= 1, "no resync after the reconnect");
    cache
        .put(
            UserId(1),
            Location {
                point: Point::new(5.0, 5.0).expect("p"),
                ts_ms: 9,
            },
            Duration::from_secs(9),
        )
        .await
        .expect("cache works again");
}

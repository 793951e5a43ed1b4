//! The ring broker on real `redis-server` processes: channels live only on
//! their owner, a member added or lost moves only its share, and nothing
//! published after a switch is lost. And the sharded location cache losing
//! a shard.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use nearby_conformance::services::{self, RedisProcess};
use nearby_core::{Location, Point, UserId};
use nearby_hub::{Bus, Hub};
use nearby_ports::{BusMessage, Channel, LocationCache, Mail, Mailbox, PubSub, Subscriber};
use nearby_store_redis::{Member, RedisConfig, RingBroker, ShardedCache};

const HANDOVER: Duration = Duration::from_millis(500);

fn servers(n: usize) -> Option<Vec<RedisProcess>> {
    let mut out = Vec::new();
    for _ in 0..n {
        match RedisProcess::start() {
            Ok(r) => out.push(r),
            Err(e) => {
                services::missing("redis-server", e);
                return None;
            }
        }
    }
    Some(out)
}

fn members(servers: &[RedisProcess]) -> Vec<Member> {
    servers
        .iter()
        .enumerate()
        .map(|(i, r)| Member {
            name: format!("r{i}"),
            url: r.url(),
        })
        .collect()
}

struct Node {
    bus: Arc<Bus>,
    ring: Arc<RingBroker>,
}

async fn node(prefix: &str, members: Vec<Member>) -> Node {
    let mut cfg = RedisConfig::new("redis://unused");
    cfg.prefix = prefix.to_owned();
    cfg.subscriber_connections = 2;
    cfg.pool_size = 2;
    let hub = Arc::new(Hub::default());
    let ring = RingBroker::start(&cfg, HANDOVER, hub.clone(), members).await;
    let bus = Arc::new(Bus::new(hub, ring.clone()));
    Node { bus, ring }
}

fn update(user: i64, ts: i64) -> BusMessage {
    BusMessage::Location {
        user: UserId(user),
        loc: Location {
            point: Point::new(1.0, 2.0).expect("point"),
            ts_ms: ts,
        },
    }
}

/// Every location update that arrives within `within`, by user.
async fn drain(rx: &mut Mailbox, within: Duration) -> HashMap<i64, HashSet<i64>> {
    let mut got: HashMap<i64, HashSet<i64>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(mail)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        if let Mail::Message(BusMessage::Location { user, loc }) = mail {
            got.entry(user.0).or_default().insert(loc.ts_ms);
        }
    }
    got
}

/// Which server each of the prefix's channels is subscribed on.
async fn placement(ring: &RingBroker, names: &[&str]) -> HashMap<String, Vec<String>> {
    let mut at: HashMap<String, Vec<String>> = HashMap::new();
    for name in names {
        for ch in ring.upstream_channels(name).await.expect("PUBSUB CHANNELS") {
            at.entry(ch).or_default().push((*name).to_owned());
        }
    }
    at
}

const USERS: i64 = 300;

#[tokio::test]
async fn channels_live_on_their_owner_and_move_only_their_share() {
    let Some(mut redis) = servers(4) else {
        return;
    };
    let prefix = services::unique("ring") + ":";
    let three = members(&redis[..3]);
    let subscriber = node(&prefix, three.clone()).await;
    let publisher = node(&prefix, three.clone()).await;
    assert_eq!(subscriber.ring.members(), vec!["r0", "r1", "r2"]);

    let (sub, mut rx) = Subscriber::new(4096);
    let channels: Vec<Channel> = (1..=USERS).map(|u| Channel::Location(UserId(u))).collect();
    subscriber
        .bus
        .subscribe(&sub, &channels)
        .await
        .expect("subscribe");

    // 1. Each channel is subscribed on exactly one server: its owner.
    let at = placement(&subscriber.ring, &["r0", "r1", "r2"]).await;
    assert_eq!(at.len(), USERS as usize);
    for ch in &channels {
        let name = format!("{prefix}{}", ch.name());
        let owner = subscriber.ring.owner(*ch).expect("owner");
        assert_eq!(at.get(&name), Some(&vec![owner.clone()]), "{name}");
        assert_eq!(publisher.ring.owner(*ch), Some(owner), "nodes disagree");
    }
    for u in 1..=USERS {
        publisher
            .bus
            .publish(Channel::Location(UserId(u)), update(u, 1))
            .await
            .expect("publish");
    }
    let got = drain(&mut rx, Duration::from_secs(2)).await;
    assert_eq!(got.len(), USERS as usize, "every channel delivers");

    // 2. A fourth server joins while updates flow: the publisher learns of
    // it first (the worst order), the subscriber later. The mailbox keeps
    // only each friend's latest update, so it is read all along.
    let four = members(&redis);
    let reading = tokio::spawn(async move {
        let got = drain(&mut rx, Duration::from_secs(4)).await;
        (rx, got)
    });
    let publishing = {
        let bus = publisher.bus.clone();
        tokio::spawn(async move {
            for ts in 2..=11 {
                for u in 1..=USERS {
                    let _ = bus
                        .publish(Channel::Location(UserId(u)), update(u, ts))
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The subscriber learns 200 ms after the publisher switched (nodes
    // watching etcd see a change at slightly different times; the
    // handover covers such a skew).
    let switching = {
        let ring = publisher.ring.clone();
        let four = four.clone();
        tokio::spawn(async move { ring.set_members(four).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    subscriber.ring.set_members(four.clone()).await;
    switching.await.expect("publisher's change");
    publishing.await.expect("publisher");
    let (mut rx, got) = reading.await.expect("reader");
    let mut lost = 0;
    for u in 1..=USERS {
        for ts in 2..=11 {
            if !got.get(&u).is_some_and(|s| s.contains(&ts)) {
                lost += 1;
            }
        }
    }
    assert_eq!(lost, 0, "updates lost across the change");
    let moved = subscriber.bus.stats().ring_channels_moved;
    // 1/4 of 300 is 75; the binomial spread (sd ~7.5) stays well inside
    // 45..=105.
    assert!(
        (45..=105).contains(&moved),
        "moved {moved} of {USERS} channels"
    );
    let at = placement(&subscriber.ring, &["r0", "r1", "r2", "r3"]).await;
    let on_new = at.values().filter(|v| v == &&vec!["r3".to_owned()]).count();
    assert_eq!(on_new as u64, moved, "what moved went to the new server");
    assert!(
        at.values().all(|v| v.len() == 1),
        "a channel on two servers"
    );
    assert_eq!(subscriber.bus.stats().ring_members, 4);

    // 3. A server dies and leaves: its channels come back on the others.
    redis[1].kill();
    let without: Vec<Member> = four.iter().filter(|m| m.name != "r1").cloned().collect();
    publisher.ring.set_members(without.clone()).await;
    subscriber.ring.set_members(without).await;
    for u in 1..=USERS {
        let _ = publisher
            .bus
            .publish(Channel::Location(UserId(u)), update(u, 20))
            .await;
    }
    let got = drain(&mut rx, Duration::from_secs(2)).await;
    let back = (1..=USERS)
        .filter(|u| got.get(u).is_some_and(|s| s.contains(&20)))
        .count();
    assert_eq!(back, USERS as usize, "channels of the dead server are dark");
    let at = placement(&subscriber.ring, &["r0", "r2", "r3"]).await;
    assert_eq!(at.len(), USERS as usize);

    // Leaving the bus empties every server of this node's subscriptions.
    subscriber.bus.unsubscribe(&sub, &channels);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !placement(&subscriber.ring, &["r0", "r2", "r3"])
        .await
        .is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline, "still subscribed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_unreachable_member_is_skipped_and_joins_once_it_answers() {
    let Some(mut redis) = servers(2) else {
        return;
    };
    let prefix = services::unique("ring-bad") + ":";
    let mut list = members(&redis);
    redis[1].kill();
    list.push(Member {
        name: "bogus".into(),
        url: "redis://127.0.0.1:1".into(),
    });
    let n = node(&prefix, list).await;
    assert_eq!(n.ring.members(), vec!["r0"], "only the reachable one");
    let (sub, mut rx) = Subscriber::new(64);
    let ch = Channel::Inbox(UserId(5));
    n.bus.subscribe(&sub, &[ch]).await.expect("subscribe");
    n.bus.publish(ch, update(5, 1)).await.expect("publish");
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(2), rx.recv()).await,
        Ok(Some(Mail::Message(_)))
    ));
    redis[1].restart().expect("restart");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while n.ring.members() != vec!["r0", "r1"] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "r1 never joined: {:?}",
            n.ring.members()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn losing_a_cache_shard_hides_only_its_users() {
    let Some(mut redis) = servers(2) else {
        return;
    };
    let urls: Vec<String> = redis.iter().map(RedisProcess::url).collect();
    let mut cfg = RedisConfig::new(urls[0].clone());
    cfg.prefix = services::unique("shards") + ":";
    let cache = ShardedCache::connect(&cfg, &urls).await.expect("connect");
    let users: Vec<UserId> = (1..=40).map(UserId).collect();
    let at = |ts| Location {
        point: Point::new(1.0, 2.0).expect("point"),
        ts_ms: ts,
    };
    for u in &users {
        cache
            .put(*u, at(u.0), Duration::from_secs(60))
            .await
            .expect("put");
    }
    // Spread over both servers, and one MGET per server reads them all back.
    let on_first: Vec<UserId> = users
        .iter()
        .copied()
        .filter(|u| cache.shard_of(*u) == Some(urls[0].as_str()))
        .collect();
    assert!((10..=30).contains(&on_first.len()), "{}", on_first.len());
    let all = cache.get_many(&users).await.expect("get_many");
    assert!(all.iter().all(Option::is_some));

    redis[1].kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The other server's users are still there; the lost one's look
    // inactive (no position), and reading does not fail.
    let got = cache
        .get_many(&users)
        .await
        .expect("get_many with a shard down");
    for (u, loc) in users.iter().zip(&got) {
        assert_eq!(loc.is_some(), on_first.contains(u), "user {u}");
    }
    cache
        .ping()
        .await
        .expect("ready while a cache server answers");
    let first = on_first[0];
    cache
        .put(first, at(99), Duration::from_secs(60))
        .await
        .expect("writes to the live shard");
    let lost = users.iter().copied().find(|u| !on_first.contains(u));
    if let Some(u) = lost {
        assert!(cache.put(u, at(99), Duration::from_secs(60)).await.is_err());
    }

    // Back (empty): its users reappear with their next report (once every
    // connection of the shard's pool is back: the pool takes turns).
    redis[1].restart().expect("restart");
    if let Some(u) = lost {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let put = cache.put(u, at(100), Duration::from_secs(60)).await;
            let got = cache.get(u).await;
            if put.is_ok() && matches!(got, Ok(Some(l)) if l == at(100)) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "shard never came back: {put:?} {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

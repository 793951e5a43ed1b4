//! The behaviour every adapter of a port must show, as async functions that
//! panic on the first violation. An adapter crate's tests build its store and
//! call the matching suite, so the embedded and the production adapters are
//! held to one contract.
//!
//! Suites use user ids and names derived from `ns` so that they can run
//! against a shared, non-empty database.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod services;

use std::time::Duration;

use nearby_core::{FriendStatus, Grant, LeftReason, Location, Point, Precision, Share, UserId};
use nearby_ports::{
    BusMessage, Channel, HistoryEntry, HistoryStore, LocationCache, Mail, Mailbox, PubSub,
    ShareChange, StoreError, Subscriber, UserStore, GHOST_FOREVER,
};

fn loc(lat: f64, ts_ms: i64) -> Location {
    Location {
        point: Point::new(lat, 10.0).expect("valid test coordinate"),
        ts_ms,
    }
}

/// Turns sharing off.
const OFF: ShareChange = ShareChange {
    enabled: false,
    until_ms: None,
    precision: None,
};

/// The ids of visible friends.
fn grant_ids(grants: Vec<Grant>) -> Vec<UserId> {
    grants.into_iter().map(|g| g.id).collect()
}

/// [`LocationCache`]: latest wins, batch reads keep order, entries expire.
pub async fn location_cache(cache: &dyn LocationCache, ns: i64) {
    let (a, b, c) = (UserId(ns + 1), UserId(ns + 2), UserId(ns + 3));
    let long = Duration::from_secs(60);
    cache.put(a, loc(1.0, 1), long).await.expect("put");
    cache.put(a, loc(2.0, 2), long).await.expect("put");
    cache.put(b, loc(3.0, 3), long).await.expect("put");
    let got = cache.get_many(&[b, c, a]).await.expect("get_many");
    assert_eq!(got, vec![Some(loc(3.0, 3)), None, Some(loc(2.0, 2))]);
    assert_eq!(cache.get(a).await.expect("get"), Some(loc(2.0, 2)));
    assert_eq!(cache.get_many(&[]).await.expect("empty batch"), vec![]);
    cache.remove(b).await.expect("remove");
    assert_eq!(cache.get(b).await.expect("get"), None, "removed at once");
    cache.remove(b).await.expect("removing nothing is fine");
    assert_eq!(
        cache.get(a).await.expect("get"),
        Some(loc(2.0, 2)),
        "others stay"
    );

    cache
        .put(c, loc(4.0, 4), Duration::from_millis(1100))
        .await
        .expect("put");
    assert_eq!(cache.get(c).await.expect("get"), Some(loc(4.0, 4)));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        cache.get(c).await.expect("get"),
        None,
        "entry outlived its TTL"
    );
}

/// [`PubSub`]: per-channel delivery, one subscription however often asked,
/// unsubscribe stops delivery, other channels are not seen.
pub async fn pubsub(bus: &dyn PubSub, ns: i64) {
    let (u1, u2) = (UserId(ns + 1), UserId(ns + 2));
    let (s1, mut r1) = Subscriber::new(16);
    let (s2, mut r2) = Subscriber::new(16);
    let ch = Channel::Location(u1);
    bus.subscribe(&s1, &[ch, ch]).await.expect("subscribe");
    bus.subscribe(&s2, &[ch, Channel::Inbox(u2)])
        .await
        .expect("subscribe");
    let m1 = BusMessage::Location {
        user: u1,
        loc: loc(1.0, 1),
    };
    let m2 = BusMessage::FriendHidden {
        friend: u1,
        reason: LeftReason::Unshared,
    };
    bus.publish(ch, m1).await.expect("publish");
    bus.publish(Channel::Inbox(u2), m2).await.expect("publish");
    bus.publish(Channel::Inbox(u1), m2)
        .await
        .expect("publish to a channel nobody wants");

    assert_eq!(recv(&mut r1).await, Some(m1));
    // Control messages overtake location updates; each arrives once.
    let got = [recv(&mut r2).await, recv(&mut r2).await];
    assert!(
        got == [Some(m1), Some(m2)] || got == [Some(m2), Some(m1)],
        "{got:?}"
    );

    bus.unsubscribe(&s1, &[ch]);
    let m3 = BusMessage::Location {
        user: u1,
        loc: loc(2.0, 2),
    };
    bus.publish(ch, m3).await.expect("publish");
    assert_eq!(recv(&mut r2).await, Some(m3));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        r1.try_recv().is_none(),
        "delivered after unsubscribe, or twice"
    );
    assert!(r2.try_recv().is_none(), "delivered a message twice");
    bus.unsubscribe(&s2, &[ch, Channel::Inbox(u2)]);
}

/// The next message, past the re-read requests a revocation queues behind
/// itself (`Mail::Resync`, not a message of the bus).
async fn recv(r: &mut Mailbox) -> Option<BusMessage> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), r.recv()).await {
            Ok(Some(Mail::Message(m))) => return Some(m),
            Ok(Some(Mail::Resync)) => continue,
            _ => return None,
        }
    }
}

/// The clock of [`user_store`]'s visibility reads, Unix ms.
const NOW: i64 = 1_000_000;

/// [`UserStore`]: unique names, token expiry, the friend-request state
/// machine on both edges, sharing, visibility.
pub async fn user_store(store: &dyn UserStore, ns: &str) {
    let name = |s: &str| format!("{s}_{ns}");
    let alice = store
        .create_user(&name("alice"), "hash-a")
        .await
        .expect("create");
    let bob = store
        .create_user(&name("bob"), "hash-b")
        .await
        .expect("create");
    let carol = store
        .create_user(&name("carol"), "hash-c")
        .await
        .expect("create");
    assert!(matches!(
        store.create_user(&name("alice"), "x").await,
        Err(StoreError::Conflict(_))
    ));
    let rec = store
        .user_by_name(&name("alice"))
        .await
        .expect("lookup")
        .expect("exists");
    assert_eq!((rec.id, rec.password_hash.as_str()), (alice, "hash-a"));
    assert!(store
        .user_by_name(&name("nobody"))
        .await
        .expect("lookup")
        .is_none());
    assert!(store.user_exists(bob).await.expect("exists"));
    assert!(!store.user_exists(UserId(i64::MAX)).await.expect("exists"));

    let tok = format!("token-{ns}").into_bytes();
    store.create_token(&tok, alice, 1_000).await.expect("token");
    assert_eq!(
        store.token_user(&tok, 999).await.expect("token"),
        Some((alice, 1_000))
    );
    assert_eq!(
        store.token_user(&tok, 1_000).await.expect("token"),
        None,
        "expired token accepted"
    );
    store.delete_token(&tok).await.expect("delete");
    assert_eq!(store.token_user(&tok, 0).await.expect("token"), None);

    // WebSocket tickets: used once, until they expire, gone with their token.
    let tok = format!("token2-{ns}").into_bytes();
    store.create_token(&tok, alice, 1_000).await.expect("token");
    let ticket = |n: u8| format!("ticket{n}-{ns}").into_bytes();
    store
        .create_ticket(&ticket(1), &tok, 500)
        .await
        .expect("ticket");
    assert_eq!(
        store.take_ticket(&ticket(1), 499).await.expect("take"),
        Some(tok.clone())
    );
    assert_eq!(
        store.take_ticket(&ticket(1), 499).await.expect("take"),
        None,
        "single use"
    );
    store
        .create_ticket(&ticket(2), &tok, 500)
        .await
        .expect("ticket");
    assert_eq!(
        store.take_ticket(&ticket(2), 500).await.expect("take"),
        None,
        "expired"
    );
    assert!(store.purge_expired_tokens(500).await.expect("purge") >= 1);
    store
        .create_ticket(&ticket(3), &tok, 900)
        .await
        .expect("ticket");
    store.delete_token(&tok).await.expect("delete");
    assert_eq!(
        store.take_ticket(&ticket(3), 0).await.expect("take"),
        None,
        "gone with its token"
    );

    assert!(matches!(
        store.request_friend(alice, UserId(i64::MAX)).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.request_friend(alice, alice).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.request_friend(alice, bob).await.expect("request"),
        None
    );
    assert_eq!(
        store.request_friend(alice, bob).await.expect("again"),
        Some(FriendStatus::Outgoing)
    );
    let bobs = store.friends(bob).await.expect("list");
    assert_eq!(bobs.len(), 1);
    assert_eq!(
        (bobs[0].id, bobs[0].status, bobs[0].shares_with_me.enabled),
        (alice, FriendStatus::Incoming, false),
        "nobody shares through a pending request"
    );
    assert!(
        store
            .visible_friends(bob, NOW)
            .await
            .expect("visible")
            .is_empty(),
        "pending is not friends"
    );
    assert!(matches!(
        store.set_sharing(alice, bob, OFF).await,
        Err(StoreError::NotFound(_))
    ));

    assert_eq!(
        store.request_friend(bob, alice).await.expect("accept"),
        Some(FriendStatus::Incoming)
    );
    let alices = store.friends(alice).await.expect("list");
    assert_eq!(alices[0].username, name("bob"));
    assert_eq!(
        (
            alices[0].status,
            alices[0].sharing,
            alices[0].shares_with_me
        ),
        (FriendStatus::Friends, Share::DEFAULT, Share::DEFAULT)
    );
    assert_eq!(
        grant_ids(store.visible_friends(bob, NOW).await.expect("visible")),
        vec![alice]
    );
    assert_eq!(
        grant_ids(store.visible_friends(alice, NOW).await.expect("visible")),
        vec![bob]
    );

    // Ghost mode hides Alice from every friend, until it ends.
    store.set_ghost(alice, Some(NOW + 5)).await.expect("ghost");
    assert_eq!(
        store.ghost_until(alice, NOW).await.expect("ghost"),
        Some(NOW + 5)
    );
    assert!(store
        .visible_friends(bob, NOW)
        .await
        .expect("visible")
        .is_empty());
    assert_eq!(
        grant_ids(store.visible_friends(bob, NOW + 5).await.expect("visible")),
        vec![alice],
        "ghost mode ends by itself"
    );
    assert_eq!(
        store.ghost_until(alice, NOW + 5).await.expect("ghost"),
        None
    );
    assert_eq!(
        grant_ids(store.visible_friends(alice, NOW).await.expect("visible")),
        vec![bob],
        "one-way"
    );
    store
        .set_ghost(alice, Some(GHOST_FOREVER))
        .await
        .expect("ghost");
    assert!(store
        .visible_friends(bob, i64::MAX - 1)
        .await
        .expect("visible")
        .is_empty());
    store.set_ghost(alice, None).await.expect("end ghost");
    assert_eq!(store.ghost_until(alice, NOW).await.expect("ghost"), None);
    assert_eq!(
        grant_ids(store.visible_friends(bob, NOW).await.expect("visible")),
        vec![alice]
    );
    assert!(matches!(
        store.set_ghost(UserId(i64::MAX), None).await,
        Err(StoreError::NotFound(_))
    ));

    // Discoverable by strangers: off by default, on for a while or for
    // good, read one by one and in batches.
    let both = [alice, bob, UserId(i64::MAX)];
    assert_eq!(
        store.discoverable_until(alice, NOW).await.expect("read"),
        None
    );
    assert!(store
        .discoverable_among(&both, NOW)
        .await
        .expect("among")
        .is_empty());
    store
        .set_discoverable(alice, Some(NOW + 5))
        .await
        .expect("discoverable");
    store
        .set_discoverable(bob, Some(GHOST_FOREVER))
        .await
        .expect("discoverable");
    assert_eq!(
        store.discoverable_until(alice, NOW).await.expect("read"),
        Some(NOW + 5)
    );
    let mut among = store.discoverable_among(&both, NOW).await.expect("among");
    among.sort_unstable();
    assert_eq!(among, vec![alice, bob]);
    assert_eq!(
        store
            .discoverable_among(&both, NOW + 5)
            .await
            .expect("among"),
        vec![bob],
        "ends by itself"
    );
    assert!(store
        .discoverable_among(&[], NOW)
        .await
        .expect("among")
        .is_empty());
    store.set_discoverable(bob, None).await.expect("off");
    assert_eq!(
        store.discoverable_until(bob, NOW).await.expect("read"),
        None
    );
    store.set_discoverable(alice, None).await.expect("off");
    assert!(matches!(
        store.set_discoverable(UserId(i64::MAX), None).await,
        Err(StoreError::NotFound(_))
    ));

    // Sharing for a while, approximately: the grant's terms reach the
    // viewer, it ends by itself, and an omitted precision is kept.
    let timed = ShareChange {
        enabled: true,
        until_ms: Some(NOW + 10),
        precision: Some(Precision::Approximate),
    };
    let (before, after) = store.set_sharing(alice, bob, timed).await.expect("timed");
    assert_eq!(before, Share::DEFAULT);
    let want = Share {
        enabled: true,
        until_ms: Some(NOW + 10),
        precision: Precision::Approximate,
    };
    assert_eq!(after, want);
    assert_eq!(
        store.visible_friends(bob, NOW).await.expect("visible"),
        vec![Grant {
            id: alice,
            until_ms: Some(NOW + 10),
            precision: Precision::Approximate
        }]
    );
    assert!(
        store
            .visible_friends(bob, NOW + 10)
            .await
            .expect("visible")
            .is_empty(),
        "a timed grant ends by itself"
    );
    assert_eq!(store.friends(alice).await.expect("list")[0].sharing, want);
    assert_eq!(
        store.friends(bob).await.expect("list")[0].shares_with_me,
        want
    );
    let for_good = ShareChange {
        enabled: true,
        until_ms: None,
        precision: None,
    };
    let (_, after) = store
        .set_sharing(alice, bob, for_good)
        .await
        .expect("for good");
    assert_eq!(after.precision, Precision::Approximate, "precision kept");
    assert_eq!(after.until_ms, None);
    let precise = ShareChange {
        precision: Some(Precision::Precise),
        ..for_good
    };
    store
        .set_sharing(alice, bob, precise)
        .await
        .expect("precise");

    let (before, _) = store.set_sharing(alice, bob, OFF).await.expect("revoke");
    assert!(before.enabled);
    let (before, after) = store
        .set_sharing(alice, bob, OFF)
        .await
        .expect("revoke again");
    assert!(!before.enabled && !after.enabled);
    assert!(store
        .visible_friends(bob, NOW)
        .await
        .expect("visible")
        .is_empty());
    assert_eq!(
        grant_ids(store.visible_friends(alice, NOW).await.expect("visible")),
        vec![bob],
        "revoking is one-way"
    );
    assert!(!store.friends(alice).await.expect("list")[0].sharing.enabled);
    // Both directions: Bob still shares with Alice, Alice no longer with Bob.
    assert!(
        store.friends(alice).await.expect("list")[0]
            .shares_with_me
            .enabled
    );
    assert!(
        !store.friends(bob).await.expect("list")[0]
            .shares_with_me
            .enabled
    );

    store.request_friend(carol, alice).await.expect("request");
    assert_eq!(
        store.remove_friend(alice, carol).await.expect("decline"),
        Some(FriendStatus::Incoming)
    );
    assert_eq!(
        store.remove_friend(bob, alice).await.expect("unfriend"),
        Some(FriendStatus::Friends)
    );
    assert_eq!(store.remove_friend(bob, alice).await.expect("again"), None);
    assert!(store.friends(alice).await.expect("list").is_empty());
    assert!(store.friends(carol).await.expect("list").is_empty());
    assert!(store
        .visible_friends(alice, NOW)
        .await
        .expect("visible")
        .is_empty());

    // Deleting an account takes its tokens and both sides of every
    // relation, friends and requests alike; the name is free again.
    store.request_friend(alice, bob).await.expect("request");
    store.request_friend(bob, alice).await.expect("accept");
    store.request_friend(carol, alice).await.expect("request");
    let mut token = [7u8; 32];
    for (t, b) in token.iter_mut().zip(ns.bytes()) {
        *t = b;
    }
    store
        .create_token(&token, alice, NOW + 1000)
        .await
        .expect("token");
    let mut others = store.delete_user(alice).await.expect("delete");
    others.sort();
    let mut want = vec![bob, carol];
    want.sort();
    assert_eq!(others, want);
    assert!(!store.user_exists(alice).await.expect("exists"));
    assert_eq!(store.token_user(&token, NOW).await.expect("token"), None);
    assert!(store.friends(bob).await.expect("list").is_empty());
    assert!(store.friends(carol).await.expect("list").is_empty());
    assert!(matches!(
        store.delete_user(alice).await,
        Err(StoreError::NotFound(_))
    ));
    let again = store
        .create_user(&name("alice"), "phc")
        .await
        .expect("the name is free again");
    assert_ne!(again, alice, "a new account, a new id");

    // Ids are never reused, even the highest one given (SQLite's plain
    // rowid hands it out again): nothing keyed by a deleted account's id
    // can surface under the next sign-up.
    for round in 0..3 {
        let last = store
            .create_user(&name(&format!("last{round}")), "phc")
            .await
            .expect("create");
        store.delete_user(last).await.expect("delete");
        let next = store
            .create_user(&name(&format!("next{round}")), "phc")
            .await
            .expect("create");
        assert!(next.0 > last.0, "id {} given again as {}", last.0, next.0);
    }
}

/// [`HistoryStore`]: batches land whole, ranges are half-open, ordered and
/// limited, users do not see each other's points.
pub async fn history_store(store: &dyn HistoryStore, ns: i64) {
    let (a, b) = (UserId(ns + 1), UserId(ns + 2));
    let batch: Vec<HistoryEntry> = (0..1200)
        .map(|i| HistoryEntry {
            user: if i % 2 == 0 { a } else { b },
            loc: loc(f64::from(i % 90), 1000 + i64::from(i)),
        })
        .collect();
    store.append(&batch).await.expect("append");
    store.append(&[]).await.expect("empty append");
    let all = store.range(a, 0, i64::MAX, 10_000).await.expect("range");
    assert_eq!(all.len(), 600);
    assert!(
        all.windows(2).all(|w| w[0].ts_ms < w[1].ts_ms),
        "not oldest first"
    );
    let part = store.range(a, 1000, 1010, 100).await.expect("range");
    assert_eq!(
        part.iter().map(|l| l.ts_ms).collect::<Vec<_>>(),
        vec![1000, 1002, 1004, 1006, 1008]
    );
    assert_eq!(part[1], loc(2.0, 1002));
    assert_eq!(
        store.range(b, 0, i64::MAX, 7).await.expect("range").len(),
        7
    );
    assert!(store
        .range(UserId(ns + 3), 0, i64::MAX, 10)
        .await
        .expect("range")
        .is_empty());
    // Deleting one user's history leaves everyone else's.
    assert_eq!(store.delete_user(a).await.expect("delete"), 600);
    assert!(store
        .range(a, 0, i64::MAX, 10)
        .await
        .expect("range")
        .is_empty());
    assert_eq!(
        store
            .range(b, 0, i64::MAX, 10_000)
            .await
            .expect("range")
            .len(),
        600
    );
    assert_eq!(store.delete_user(a).await.expect("again"), 0);

    // Retention: everything before the cutoff goes, whoever's, over
    // several batches; what is newer stays.
    let c = UserId(ns + 3);
    let old: Vec<HistoryEntry> = (0..12_000)
        .map(|i| HistoryEntry {
            user: c,
            loc: loc(1.0, 10_000 + i64::from(i)),
        })
        .collect();
    store.append(&old).await.expect("append");
    let pruned = store.prune(21_000).await.expect("prune");
    // b's 600 points (ts < 2200) and c's first 11 000.
    assert_eq!(pruned.rows + pruned.partitions, 11_600, "{pruned:?}");
    let kept = store.range(c, 0, i64::MAX, 10_000).await.expect("range");
    assert_eq!(kept.len(), 1000);
    assert_eq!(kept[0].ts_ms, 21_000);
    assert!(store
        .range(b, 0, i64::MAX, 10)
        .await
        .expect("range")
        .is_empty());
    assert_eq!(
        store.prune(21_000).await.expect("again"),
        nearby_ports::Pruned::default()
    );
}

/// After an adapter's `bulk_insert(users, friendships)` returned `ids`: every
/// user exists, logs in with their token, and sees exactly their bulk
/// friends (mutual, sharing).
pub async fn bulk_loaded(
    store: &dyn UserStore,
    users: &[nearby_ports::BulkUser],
    friendships: &[(u32, u32)],
    ids: &[UserId],
) {
    assert_eq!(ids.len(), users.len());
    for (u, id) in users.iter().zip(ids) {
        let rec = store
            .user_by_name(&u.username)
            .await
            .expect("user_by_name")
            .expect("bulk user exists");
        assert_eq!(rec.id, *id);
        assert_eq!(rec.password_hash, u.password_hash);
        assert_eq!(
            store.token_user(&u.token_hash, 0).await.expect("token"),
            Some((*id, u.token_expires_at_ms))
        );
    }
    for (i, id) in ids.iter().enumerate() {
        let mut want: Vec<UserId> = friendships
            .iter()
            .filter_map(|&(a, b)| match (a as usize == i, b as usize == i) {
                (true, _) => Some(ids[b as usize]),
                (_, true) => Some(ids[a as usize]),
                _ => None,
            })
            .collect();
        want.sort();
        let mut got = grant_ids(store.visible_friends(*id, NOW).await.expect("visible"));
        got.sort();
        assert_eq!(got, want, "friends of user #{i}");
    }
}

/// Sample input for [`bulk_loaded`]: `n` users named from `ns`, a ring of
/// friendships.
pub fn bulk_sample(ns: &str, n: u32) -> (Vec<nearby_ports::BulkUser>, Vec<(u32, u32)>) {
    let users = (0..n)
        .map(|i| nearby_ports::BulkUser {
            username: format!("bulk{i}_{ns}"),
            password_hash: format!("hash-{i}"),
            token_hash: {
                let mut h = [0x5a; 32];
                h[..4].copy_from_slice(&i.to_le_bytes());
                h
            },
            token_expires_at_ms: 4_000_000_000_000 + i64::from(i),
        })
        .collect();
    let ring = (0..n).map(|i| (i, (i + 1) % n)).collect();
    (users, ring)
}

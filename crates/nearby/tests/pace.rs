//! The server-suggested update interval, against the real binary over real
//! WebSockets, embedded and across two nodes: slow while nobody who can see
//! you is near, fast while someone is, slow again in ghost mode; and never
//! an oracle: a friend who sees you but does not share back never makes it
//! fast, however near (a client walking about and reading its interval
//! could otherwise place them).
mod common;

use common::{north_of, Server, TwoNodes, Ws};
use reqwest::{Method, StatusCode};
use serde_json::json;

const FLAGS: [&str; 6] = [
    "--fast-interval-ms",
    "1000",
    "--slow-interval-ms",
    "30000",
    "--revalidate-secs",
    "1",
];
const SEOUL: (f64, f64) = (37.5665, 126.978);

#[tokio::test]
async fn the_interval_follows_who_can_see_you() {
    let server = Server::start(&FLAGS);
    pace(&server, &server).await;
}

#[tokio::test]
async fn the_interval_follows_who_can_see_you_across_nodes() {
    let Some(nodes) = TwoNodes::start_with(&FLAGS).await else {
        return;
    };
    pace(&nodes.a, &nodes.b).await;
}

async fn pace(one: &Server, two: &Server) {
    let (alice, bob) = one.friends("alice", "bob").await;
    let (mut a, snap) = alice.connect(one).await;
    // Nobody near: slow. The snapshot carries the friend list both ways.
    assert_eq!(snap["interval_ms"], 30000, "{snap}");
    assert_eq!(
        snap["relations"],
        json!([{ "id": bob.id, "username": "bob", "status": "friends", "sharing": true, "shares_with_you": true }]),
        "{snap}"
    );
    a.send_location(SEOUL.0, SEOUL.1).await;
    let (mut b, snap) = bob.connect(two).await;
    assert_eq!(snap["interval_ms"], 30000, "{snap}");

    // Bob comes near: each can see the other, both go fast.
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 500.0);
    b.send_location(lat, lon).await;
    assert_eq!(b.next_interval().await, 1000);
    assert_eq!(a.next_interval().await, 1000);

    // Bob leaves the radius: both slow.
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 20_000.0);
    b.send_location(lat, lon).await;
    assert_eq!(b.next_interval().await, 30000);
    assert_eq!(a.next_interval().await, 30000);
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 500.0);
    b.send_location(lat, lon).await;
    assert_eq!(b.next_interval().await, 1000);
    assert_eq!(a.next_interval().await, 1000);

    // Alice stops sharing with Bob: nobody near can see her, she goes
    // slow. Bob still shares with her and she is near, but he no longer
    // sees her: what he is told may not depend on where she is, so he
    // goes slow too.
    share_via(one, &alice, &bob, false).await;
    assert_eq!(a.next_interval().await, 30000);
    assert_eq!(b.next_interval().await, 30000, "Bob no longer sees Alice");
    // She shares again: both fast.
    share_via(one, &alice, &bob, true).await;
    assert_eq!(a.next_interval().await, 1000);
    assert_eq!(b.next_interval().await, 1000);

    // Ghost mode: nobody can see Bob, whoever is near.
    let (st, body) = common::call(
        &reqwest::Client::new(),
        Method::PUT,
        &format!("{}/v1/me/ghost", two.base),
        Some(&bob.token),
        Some(json!({})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(b.next_interval().await, 30000);
}

#[tokio::test]
async fn the_interval_never_locates_a_friend_who_does_not_share_back() {
    let server = Server::start(&FLAGS);
    oracle(&server, &server).await;
}

#[tokio::test]
async fn the_interval_never_locates_a_friend_who_does_not_share_back_across_nodes() {
    let Some(nodes) = TwoNodes::start_with(&FLAGS).await else {
        return;
    };
    oracle(&nodes.a, &nodes.b).await;
}

/// Turns `user`'s discoverability on or off by REST and waits for the
/// socket's `discoverable` frame: that frame comes from a full re-read of
/// the store by the session (the step where a position of a viewer who
/// does not share back used to be looked up), so every `interval` that
/// re-read caused has arrived before it.
async fn reread(server: &Server, user: &common::User, ws: &mut Ws, on: bool) {
    let method = if on { Method::PUT } else { Method::DELETE };
    let (st, body) = common::call(
        &reqwest::Client::new(),
        method,
        &format!("{}/v1/me/discoverable", server.base),
        Some(&user.token),
        on.then(|| json!({})),
    )
    .await;
    assert!(st.is_success(), "{st} {body}");
    loop {
        let f = ws.next_json().await;
        if f["type"] == "discoverable" && f["enabled"] == on {
            return;
        }
    }
}

/// The attack of the issue: Fay sees Alice but turned sharing off towards
/// her; Alice walks about, towards Fay and away, and reads only her own
/// `interval` frames. Whatever the server tells Alice must be the same
/// wherever Fay is: her interval stays slow at every step, near or far.
/// Then Fay shares again: Alice sees her, and goes fast (the walk can
/// tell fast when it is allowed to).
async fn oracle(one: &Server, two: &Server) {
    let (alice, fay) = one.friends("alice", "fay").await;
    share_via(two, &fay, &alice, false).await;
    let (mut f, _) = fay.connect(two).await;
    f.send_location(SEOUL.0, SEOUL.1).await;
    let (mut a, snap) = alice.connect(one).await;
    assert_eq!(snap["interval_ms"], 30000, "{snap}");
    // Near (300 m, 1 km, 100 m) and far (20 km, 50 km) from Fay, in turn.
    let walk = [300.0, 20_000.0, 1_000.0, 50_000.0, 100.0, 20_000.0];
    for (step, north_m) in walk.into_iter().enumerate() {
        let (lat, lon) = north_of(SEOUL.0, SEOUL.1, north_m);
        a.send_location(lat, lon).await;
        // Two full re-reads after the move (the second surely after it).
        reread(one, &alice, &mut a, true).await;
        reread(one, &alice, &mut a, false).await;
        assert!(
            a.intervals.is_empty(),
            "step {step} ({north_m} m from Fay): Alice was told {:?}",
            a.intervals
        );
    }
    // Fay shares again and Alice comes back near her: Alice sees her and
    // goes fast.
    share_via(two, &fay, &alice, true).await;
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 200.0);
    a.send_location(lat, lon).await;
    assert_eq!(a.next_interval().await, 1000, "Alice sees Fay near now");
    drop(f);
}

/// `user` turns sharing with `friend` on or off through `server`.
async fn share_via(server: &Server, user: &common::User, friend: &common::User, enabled: bool) {
    let (st, body) = common::call(
        &reqwest::Client::new(),
        Method::PUT,
        &format!("{}/v1/friends/{}/sharing", server.base, friend.id),
        Some(&user.token),
        Some(json!({ "enabled": enabled })),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
}

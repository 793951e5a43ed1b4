//! The server-suggested update interval, against the real binary over real
//! WebSockets, embedded and across two nodes: slow while nobody who can see
//! you is near, fast while someone is, slow again in ghost mode; a friend
//! who sees you without sharing back counts too.
mod common;

use std::time::Duration;

use common::{north_of, Server, TwoNodes};
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
    // slow. Bob still shares with her and she is near: he stays (or comes
    // back, once his node has read her cached position) fast.
    let (st, body) = common::call(
        &reqwest::Client::new(),
        Method::PUT,
        &format!("{}/v1/friends/{}/sharing", one.base, bob.id),
        Some(&alice.token),
        Some(json!({ "enabled": false })),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(a.next_interval().await, 30000);
    let mut last = 1000;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < deadline {
        let _ = b.next_message(Duration::from_millis(200)).await;
        if let Some(ms) = b.intervals.drain(..).next_back() {
            last = ms;
        }
    }
    assert_eq!(last, 1000, "Bob is seen by Alice, who is near");

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

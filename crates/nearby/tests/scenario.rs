//! The full nearby-friends scenario against the real binary over TCP:
//! three users, two friends, every enter/leave reason, a non-friend who sees
//! nothing, history and the REST views.
mod common;

use std::time::Duration;

use common::{assert_left, assert_location, north_of, Server, WAIT};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SEOUL: (f64, f64) = (37.5665, 126.9780);
const QUIET: Duration = Duration::from_millis(300);

const TTL_SECS: u64 = 4;

#[tokio::test]
async fn two_friends_see_each_other_and_every_reason_to_leave() {
    let server = Server::start(&["--location-ttl-secs", &TTL_SECS.to_string()]);
    full_scenario([&server, &server, &server]).await;
}

/// The same scenario with Alice, Bob and Carol each on their own node,
/// the nodes sharing Redis and PostgreSQL.
#[tokio::test]
async fn the_scenario_holds_across_three_nodes_on_redis_and_postgres() {
    let Some(shared) = common::Shared::get().await else {
        return;
    };
    let ttl = TTL_SECS.to_string();
    let nodes: Vec<Server> = (0..3)
        .map(|_| Server::start(&shared.flags(&["--location-ttl-secs", &ttl])))
        .collect();
    full_scenario([&nodes[0], &nodes[1], &nodes[2]]).await;
}

/// Alice uses `nodes[0]`, Bob `nodes[1]`, Carol `nodes[2]` (for REST and
/// the WebSocket alike).
async fn full_scenario(nodes: [&Server; 3]) {
    let ttl_secs = TTL_SECS;
    let [na, nb, nc] = nodes;
    let alice = na.user("alice").await;
    let bob = nb.user("bob").await;
    let carol = nc.user("carol").await;

    // Alice finds Bob by name (exact match only, logged-in callers only).
    let (st, found) = alice.req(Method::GET, "/v1/users/by-name/bob", None).await;
    assert_eq!(
        (st.as_u16(), &found),
        (200, &json!({ "id": bob.id, "username": "bob" }))
    );
    let (st, missing) = alice.req(Method::GET, "/v1/users/by-name/bo", None).await;
    assert_eq!(
        (st.as_u16(), &missing["code"]),
        (404, &json!("unknown_user"))
    );
    let (st, _) = na.get("/v1/users/by-name/bob", None).await;
    assert_eq!(st.as_u16(), 401);

    assert_eq!(alice.befriend(&bob).await["status"], "outgoing");
    let (_, list) = bob.req(Method::GET, "/v1/friends", None).await;
    assert_eq!(
        list,
        json!({ "friends": [{ "id": alice.id, "username": "alice", "status": "incoming", "sharing": true, "shares_with_you": false }] })
    );
    assert_eq!(bob.befriend(&alice).await["status"], "friends");

    let (mut a, snap) = alice.connect(na).await;
    assert_eq!(snap["friends"], json!([]));
    let (mut b, _) = bob.connect(nb).await;
    // Carol uses the browser form of the token.
    let url = format!("{}?token={}", nc.ws, carol.token);
    let (stream, _) = tokio_tungstenite::connect_async(url.into_client_request().unwrap())
        .await
        .expect("ws with ?token=");
    let mut c = common::Ws::new(stream);
    assert_eq!(c.next_json().await["type"], "snapshot");
    let (clat, clon) = north_of(SEOUL.0, SEOUL.1, 200.0);
    c.send_location(clat, clon).await;

    // Alice reports first; Bob has no position yet, so nothing to show.
    a.send_location(SEOUL.0, SEOUL.1).await;
    b.expect_silence(QUIET).await;

    // Bob reports 1 km north: he sees Alice at once (his own move), she sees him.
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 1000.0);
    b.send_location(lat, lon).await;
    let seen_by_bob = b.next_json().await;
    let seen_by_alice = a.next_json().await;
    assert_location(&seen_by_bob, &alice.id, 1000.0);
    assert_location(&seen_by_alice, &bob.id, 1000.0);
    // He is due north of her; she is due south of him.
    assert_eq!(seen_by_alice["bearing_deg"], 0.0, "{seen_by_alice}");
    assert_eq!(seen_by_bob["bearing_deg"], 180.0, "{seen_by_bob}");

    // Bob drives 20 km away: both lose each other, out of range.
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 20_000.0);
    b.send_location(lat, lon).await;
    assert_left(&a.next_json().await, &bob.id, "out_of_range");
    assert_left(&b.next_json().await, &alice.id, "out_of_range");

    // And back, 500 m away.
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 500.0);
    b.send_location(lat, lon).await;
    assert_location(&b.next_json().await, &alice.id, 500.0);
    assert_location(&a.next_json().await, &bob.id, 500.0);

    // The REST snapshot agrees with the live one.
    let (st, nearby) = alice.req(Method::GET, "/v1/nearby", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(nearby["type"], "snapshot");
    assert_eq!(nearby["friends"][0]["id"], bob.id.as_str());

    // Alice stops sharing with Bob: he loses her; she still sees him.
    alice.share(&bob, false).await;
    assert_left(&b.next_json().await, &alice.id, "unshared");
    let (_, list) = alice.req(Method::GET, "/v1/friends", None).await;
    assert_eq!(list["friends"][0]["sharing"], false);
    // Her moves no longer reach him (10 m is below the re-send threshold for her own view).
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 10.0);
    a.send_location(lat, lon).await;
    b.expect_silence(QUIET).await;
    a.expect_silence(Duration::from_millis(50)).await;

    // Sharing again: Bob sees her at once, from the cache.
    alice.share(&bob, true).await;
    assert_location(&b.next_json().await, &alice.id, 490.0);

    // Bob unfriends Alice: both sides lose each other.
    bob.unfriend(&alice).await;
    assert_left(&a.next_json().await, &bob.id, "unfriended");
    assert_left(&b.next_json().await, &alice.id, "unfriended");

    // Friends again: both appear at once, without anyone moving.
    alice.befriend(&bob).await;
    bob.befriend(&alice).await;
    assert_location(&a.next_json().await, &bob.id, 490.0);
    assert_location(&b.next_json().await, &alice.id, 490.0);

    // Nobody moves for the TTL: each goes inactive for the other, once.
    let wait = Duration::from_secs(ttl_secs) + WAIT;
    for (ws, other) in [(&mut a, &bob.id), (&mut b, &alice.id)] {
        match ws.next_message(wait).await {
            Some(tokio_tungstenite::tungstenite::Message::Text(t)) => assert_left(
                &serde_json::from_str(t.as_str()).unwrap(),
                other,
                "inactive",
            ),
            other => panic!("expected inactive, got {other:?}"),
        }
    }
    a.expect_silence(QUIET).await;
    b.expect_silence(QUIET).await;

    // Carol, who is nobody's friend, saw nothing at all, and her snapshot is empty.
    c.expect_silence(QUIET).await;
    let (_, nearby) = carol.req(Method::GET, "/v1/nearby", None).await;
    assert_eq!(nearby["friends"], json!([]));

    // History: Alice's two accepted updates, oldest first.
    let (st, hist) = alice
        .req(Method::GET, "/v1/me/history?from=0&to=99999999999999", None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let points = hist["points"].as_array().expect("points");
    assert_eq!(points.len(), 2, "{hist}");
    assert_eq!(points[0]["lat"], SEOUL.0);
    assert!(points[0]["ts"].as_i64() < points[1]["ts"].as_i64());
    let (_, hist) = bob
        .req(Method::GET, "/v1/me/history?from=0&to=99999999999999", None)
        .await;
    assert_eq!(hist["points"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn a_move_reaches_every_friend_and_no_one_else() {
    let server = Server::start(&[]);
    let hub = server.user("hub_user").await;
    let mut friends = Vec::new();
    for i in 0..5 {
        let f = server.user(&format!("friend{i}")).await;
        hub.befriend(&f).await;
        f.befriend(&hub).await;
        let (mut ws, _) = f.connect(&server).await;
        let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 100.0 * f64::from(i + 1));
        ws.send_location(lat, lon).await;
        friends.push((f, ws));
    }
    let stranger = server.user("stranger").await;
    let (mut s, _) = stranger.connect(&server).await;
    s.send_location(SEOUL.0, SEOUL.1).await;

    let (mut h, snap) = hub.connect(&server).await;
    assert_eq!(snap["friends"], json!([]), "hub has no position yet");
    h.send_location(SEOUL.0, SEOUL.1).await;
    // The hub's own first move shows all five friends at their distances.
    let mut seen = std::collections::HashMap::new();
    for _ in 0..5 {
        let f = h.next_json().await;
        assert_eq!(f["type"], "friend_location", "{f}");
        seen.insert(
            f["id"].as_str().unwrap().to_owned(),
            f["distance_m"].as_f64().unwrap(),
        );
    }
    for (i, (f, ws)) in friends.iter_mut().enumerate() {
        let expected = 100.0 * (i as f64 + 1.0);
        assert!((seen[&f.id] - expected).abs() <= 1.0, "{seen:?}");
        assert_location(&ws.next_json().await, &hub.id, expected);
    }
    // A reconnecting hub gets them in its snapshot, sorted by distance.
    let (_, snap) = hub.connect(&server).await;
    let ids: Vec<&str> = snap["friends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = friends.iter().map(|(f, _)| f.id.as_str()).collect();
    assert_eq!(ids, expected);
    s.expect_silence(QUIET).await;
}

//! Backends failing under live sessions: Redis killed and restarted (the
//! sessions keep working without reconnecting), PostgreSQL stopped (live
//! updates go on, history catches up when it is back). Each test runs its
//! own `redis-server` or PostgreSQL cluster on a free port.
mod common;

use std::time::Duration;

use common::{assert_location, north_of, until_seen, Server, TwoNodes, User, Ws, SEOUL};
use nearby_conformance::services::{self, PostgresCluster};
use reqwest::Method;
use serde_json::Value;

/// Alice on node A and Bob on node B, friends, both connected.
async fn friends_across(nodes: &TwoNodes) -> (User, User, Ws, Ws) {
    let alice = nodes.a.user("alice").await;
    let bob = nodes.b.user("bob").await;
    alice.befriend(&bob).await;
    bob.befriend(&alice).await;
    let (a, _) = alice.connect(&nodes.a).await;
    let (b, _) = bob.connect(&nodes.b).await;
    (alice, bob, a, b)
}

async fn metric(server: &Server, name: &str) -> f64 {
    server.metric(name).await.unwrap_or(0.0)
}

#[tokio::test]
async fn sessions_on_two_nodes_survive_a_redis_restart() {
    let Some(mut nodes) = TwoNodes::start().await else {
        return;
    };
    let (node_a, node_b) = (&nodes.a, &nodes.b);
    let (alice, bob, mut a, mut b) = friends_across(&nodes).await;
    a.send_location(SEOUL.0, SEOUL.1).await;
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 1000.0);
    b.send_location(lat, lon).await;
    assert_location(&b.next_json().await, &alice.id, 1000.0);
    assert_location(&a.next_json().await, &bob.id, 1000.0);

    nodes.redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (st, body) = node_a.get("/readyz", None).await;
    assert_eq!(
        (st.as_u16(), &body["code"]),
        (503, &Value::from("not_ready")),
        "{body}"
    );
    // An update while Redis is down: Bob is told his friends may not see it.
    b.send_location(lat, lon).await;
    b.expect_error("unavailable").await;

    nodes.redis.restart().expect("restart redis");
    // Neither client reconnects: both nodes resubscribe on their own.
    until_seen(&mut b, &mut a, &bob.id, Duration::from_secs(20)).await;
    until_seen(&mut a, &mut b, &alice.id, Duration::from_secs(20)).await;
    assert!(metric(node_a, "nearby_redis_reconnects_total").await >= 1.0);
    assert!(metric(node_b, "nearby_redis_reconnects_total").await >= 1.0);
    let (st, _) = node_a.get("/readyz", None).await;
    assert_eq!(st.as_u16(), 200);
}

#[tokio::test]
async fn live_updates_go_on_while_postgres_is_down_and_history_catches_up() {
    let mut pg = match PostgresCluster::start() {
        Ok(pg) => pg,
        Err(e) => return services::missing("PostgreSQL server binaries", e),
    };
    let url = pg.url();
    let node = Server::start(&["--database-url", &url]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    alice.befriend(&bob).await;
    bob.befriend(&alice).await;
    let (mut a, _) = alice.connect(&node).await;
    let (mut b, _) = bob.connect(&node).await;
    a.send_location(SEOUL.0, SEOUL.1).await;
    // Alice's update is in history before the database goes away.
    for _ in 0..100 {
        if metric(&node, "nearby_history_written_total").await == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    pg.stop().expect("stop postgres");
    let (st, body) = node.get("/readyz", None).await;
    assert_eq!(st.as_u16(), 503, "{body}");
    // Which backend failed is named; how (hosts, ports, the database) is
    // only logged: the endpoint needs no token.
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("users"), "{body}");
    assert!(
        !message.contains(&pg.url()) && !message.contains("postgres"),
        "{body}"
    );

    // Five moves while the database is down: Alice sees every one.
    for i in 0..5 {
        let d = 100.0 * f64::from(i + 1);
        let (lat, lon) = north_of(SEOUL.0, SEOUL.1, d);
        b.send_location(lat, lon).await;
        assert_location(&a.next_json().await, &bob.id, d);
        assert_location(&b.next_json().await, &alice.id, d);
    }
    assert_eq!(metric(&node, "nearby_history_written_total").await, 1.0);

    pg.restart().expect("restart postgres");
    // The writer retries with backoff; all six of Bob and Alice's updates
    // land, none dropped.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (st, hist) = bob
            .req(Method::GET, "/v1/me/history?from=0&to=99999999999999", None)
            .await;
        if st.is_success() && hist["points"].as_array().map(Vec::len) == Some(5) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history did not catch up: {st} {hist}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(metric(&node, "nearby_history_written_total").await, 6.0);
    assert_eq!(metric(&node, "nearby_history_dropped_total").await, 0.0);
    let (st, _) = node.get("/readyz", None).await;
    assert_eq!(st.as_u16(), 200);
}

#[tokio::test]
async fn each_hop_of_a_delivery_across_two_nodes_is_in_metrics() {
    let Some(nodes) = TwoNodes::start().await else {
        return;
    };
    let (node_a, node_b) = (&nodes.a, &nodes.b);
    let (alice, _bob, mut a, mut b) = friends_across(&nodes).await;
    b.send_location(SEOUL.0, SEOUL.1).await;
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 1000.0);
    a.send_location(lat, lon).await;
    assert_location(&b.next_json().await, &alice.id, 1000.0);

    let hop = |h: &str| format!("nearby_hop_seconds_count{{hop=\"{h}\"}}");
    let hop_sum = |h: &str| format!("nearby_hop_seconds_sum{{hop=\"{h}\"}}");
    // Alice's update was accepted and published on A...
    assert!(metric(node_a, &hop("accept_to_publish")).await >= 1.0);
    // ...crossed Redis to B, and was written to Bob's socket there.
    assert!(metric(node_b, &hop("bus_to_node")).await >= 1.0);
    assert!(metric(node_b, &hop("node_to_socket")).await >= 1.0);
    // Every sample is a duration of this test, not garbage.
    for (node, h) in [
        (node_a, "accept_to_publish"),
        (node_b, "bus_to_node"),
        (node_b, "node_to_socket"),
    ] {
        let sum = metric(node, &hop_sum(h)).await;
        assert!((0.0..5.0).contains(&sum), "{h}: {sum} s");
    }
}

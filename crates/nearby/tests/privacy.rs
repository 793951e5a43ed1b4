//! The privacy issue's features against the real binary over real
//! WebSockets, on the embedded setup and on two nodes over Redis and
//! PostgreSQL (the user's devices on different nodes).
mod common;

use std::time::Duration;

use common::{Server, TwoNodes, User};
use reqwest::StatusCode;
use serde_json::{json, Value};

const SEOUL: (f64, f64) = (37.5665, 126.978);
const QUIET: Duration = Duration::from_millis(300);

/// `user` logged in again (another device, its own token), on `server`.
async fn another_device(user: &User, server: &Server) -> User {
    let (st, login) = server
        .post(
            "/v1/sessions",
            None,
            json!({ "username": user.name, "password": "correct horse" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{login}");
    let mut device = user.clone();
    device.token = login["token"].as_str().expect("token").to_owned();
    device
}

fn assert_self_location(v: &Value, lat: f64, lon: f64) {
    assert!(
        (v["lat"].as_f64().unwrap_or(f64::NAN) - lat).abs() < 1e-9
            && (v["lon"].as_f64().unwrap_or(f64::NAN) - lon).abs() < 1e-9,
        "{v}"
    );
    assert!(v["updated_at"].as_i64().is_some_and(|t| t > 0), "{v}");
}

#[tokio::test]
async fn own_location_reaches_every_device_and_the_snapshot() {
    let server = Server::start(&[]);
    own_location_everywhere(&server, &server).await;
}

#[tokio::test]
async fn own_location_reaches_devices_on_another_node() {
    let Some(nodes) = TwoNodes::start().await else {
        return;
    };
    own_location_everywhere(&nodes.a, &nodes.b).await;
}

/// Alice's phone is on `one`, her laptop (and later tablet) on `two`; Bob,
/// her friend, on `one`.
async fn own_location_everywhere(one: &Server, two: &Server) {
    let (alice, bob) = one.friends("alice", "bob").await;
    let (mut phone, snap) = alice.connect(one).await;
    assert!(snap.get("self_location").is_none(), "none yet: {snap}");
    let laptop_user = another_device(&alice, two).await;
    let (mut laptop, snap) = laptop_user.connect(two).await;
    assert!(snap.get("self_location").is_none(), "{snap}");
    let (mut bob_ws, _) = bob.connect(one).await;
    bob_ws.send_location(SEOUL.0, SEOUL.1 + 0.001).await;

    phone.send_location(SEOUL.0, SEOUL.1).await;
    // The laptop is told where the phone put her, and nothing else of it.
    let moved = laptop.next_json().await;
    assert_eq!(moved["type"], "self_location", "{moved}");
    assert_self_location(&moved, SEOUL.0, SEOUL.1);
    // The phone hears no echo of its own move: only Bob, now in range.
    let first = phone.next_json().await;
    assert_eq!(first["type"], "friend_location", "{first}");
    assert_eq!(first["id"], bob.id.as_str(), "{first}");
    // Bob learns a distance, never Alice's coordinates.
    let seen = bob_ws.next_json().await;
    assert_eq!(seen["type"], "friend_location", "{seen}");
    assert!(
        seen.get("lat").is_none() && seen.get("lon").is_none(),
        "{seen}"
    );

    // A device that connects now (a reload, a tablet) starts from it.
    let tablet_user = another_device(&alice, two).await;
    let (_tablet, snap) = tablet_user.connect(two).await;
    assert_self_location(&snap["self_location"], SEOUL.0, SEOUL.1);
    // So does the REST snapshot.
    let (st, rest) = two.get("/v1/nearby", Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK, "{rest}");
    assert_self_location(&rest["self_location"], SEOUL.0, SEOUL.1);
    // And nobody else's snapshot carries Alice's position.
    let (st, theirs) = one.get("/v1/nearby", Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK, "{theirs}");
    assert_self_location(&theirs["self_location"], SEOUL.0, SEOUL.1 + 0.001);
    phone.expect_silence(QUIET).await;
}

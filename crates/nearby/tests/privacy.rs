//! The privacy issue's features against the real binary over real
//! WebSockets, on the embedded setup and on two nodes over Redis and
//! PostgreSQL (the user's devices on different nodes).
mod common;

use std::time::Duration;

use common::{assert_left, north_of, until_seen, Server, TwoNodes, User};
use reqwest::{Method, StatusCode};
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

/// `method path` on `server` with `user`'s token.
async fn on(
    server: &Server,
    user: &User,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    common::call(
        &reqwest::Client::new(),
        method,
        &format!("{}{path}", server.base),
        Some(&user.token),
        body,
    )
    .await
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[tokio::test]
async fn ghost_mode_hides_you_from_every_friend_until_it_ends() {
    let server = Server::start(&[]);
    ghost_mode(&server, &server).await;
}

#[tokio::test]
async fn ghost_mode_set_on_one_node_holds_for_a_viewer_on_another() {
    let Some(nodes) = TwoNodes::start().await else {
        return;
    };
    ghost_mode(&nodes.a, &nodes.b).await;
}

/// Alice's socket is on `one` and she turns ghost mode on through `two`;
/// Bob watches from `two`.
async fn ghost_mode(one: &Server, two: &Server) {
    let (alice, bob) = one.friends("alice", "bob").await;
    let (mut a, _) = alice.connect(one).await;
    let (mut b, _) = bob.connect(two).await;
    b.send_location(SEOUL.0, SEOUL.1).await;
    until_seen(&mut a, &mut b, &alice.id, Duration::from_secs(5)).await;

    // On, with no end: Bob is told Alice went quiet, nothing more.
    let (st, body) = on(two, &alice, Method::PUT, "/v1/me/ghost", Some(json!({}))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "ghost": true, "until": null }));
    let left = loop {
        let f = b.next_json().await;
        if f["type"] != "friend_location" {
            break f;
        }
    };
    assert_left(&left, &alice.id, "inactive");
    // Her moves reach nobody, and her position is gone from every view.
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 300.0);
    a.send_location(lat, lon).await;
    b.expect_silence(QUIET).await;
    let (st, near) = on(two, &bob, Method::GET, "/v1/nearby", None).await;
    assert_eq!(
        (st, &near["friends"]),
        (StatusCode::OK, &json!([])),
        "{near}"
    );
    let (_fresh, snap) = bob.connect(two).await;
    assert_eq!(
        snap["friends"],
        json!([]),
        "a new session does not see her: {snap}"
    );
    // Her own session still works: she sees Bob move.
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 100.0);
    b.send_location(lat, lon).await;
    let seen = loop {
        let f = a.next_json().await;
        if f["type"] == "friend_location" && f["id"] == bob.id.as_str() {
            break f;
        }
    };
    assert!(seen["distance_m"].as_f64().is_some(), "{seen}");
    let (st, state) = on(one, &alice, Method::GET, "/v1/me/ghost", None).await;
    assert_eq!(
        (st, state),
        (StatusCode::OK, json!({ "ghost": true, "until": null }))
    );

    // Off: Bob sees her again from her next position.
    let (st, _) = on(one, &alice, Method::DELETE, "/v1/me/ghost", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    until_seen(&mut a, &mut b, &alice.id, Duration::from_secs(5)).await;

    // For a while: it ends by itself, on every node.
    let until = now_ms() + 1500;
    let (st, body) = on(
        one,
        &alice,
        Method::PUT,
        "/v1/me/ghost",
        Some(json!({ "until": until })),
    )
    .await;
    assert_eq!(
        (st, body),
        (StatusCode::OK, json!({ "ghost": true, "until": until }))
    );
    let left = loop {
        let f = b.next_json().await;
        if f["type"] != "friend_location" {
            break f;
        }
    };
    assert_left(&left, &alice.id, "inactive");
    a.send_location(SEOUL.0, SEOUL.1).await;
    b.expect_silence(QUIET).await;
    tokio::time::sleep(Duration::from_millis(
        u64::try_from(until - now_ms()).unwrap_or(0) + 100,
    ))
    .await;
    until_seen(&mut a, &mut b, &alice.id, Duration::from_secs(5)).await;
    let (st, state) = on(two, &alice, Method::GET, "/v1/me/ghost", None).await;
    assert_eq!(
        (st, state),
        (StatusCode::OK, json!({ "ghost": false, "until": null }))
    );

    // Bad input: a clear error, nothing changed.
    let (st, body) = on(
        one,
        &alice,
        Method::PUT,
        "/v1/me/ghost",
        Some(json!({ "until": now_ms() - 1 })),
    )
    .await;
    assert_eq!(
        (st, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_until")),
        "{body}"
    );
    let (st, body) = on(
        one,
        &alice,
        Method::PUT,
        "/v1/me/ghost",
        Some(json!({ "until": "soon" })),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    let (st, state) = on(one, &alice, Method::GET, "/v1/me/ghost", None).await;
    assert_eq!(
        (st, state),
        (StatusCode::OK, json!({ "ghost": false, "until": null }))
    );
    until_seen(&mut a, &mut b, &alice.id, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn logout_hides_you_unless_another_device_still_reports() {
    let server = Server::start(&[]);
    logout_hides(&server, &server).await;
}

#[tokio::test]
async fn logout_hides_you_across_nodes() {
    let Some(nodes) = TwoNodes::start().await else {
        return;
    };
    logout_hides(&nodes.a, &nodes.b).await;
}

/// Alice's phone is on `one`, her laptop and Bob on `two`.
async fn logout_hides(one: &Server, two: &Server) {
    let (alice, bob) = one.friends("alice", "bob").await;
    let (mut b, _) = bob.connect(two).await;
    b.send_location(SEOUL.0, SEOUL.1).await;

    // A dropped connection does not hide her: the TTL's job.
    let (mut phone, _) = alice.connect(one).await;
    until_seen(&mut phone, &mut b, &alice.id, Duration::from_secs(5)).await;
    drop(phone);
    b.expect_silence(Duration::from_millis(800)).await;
    let (_, snap) = bob.connect(two).await;
    assert_eq!(snap["friends"][0]["id"], alice.id.as_str(), "{snap}");

    // Two devices report; the phone logs out: the laptop keeps her seen.
    let phone_user = another_device(&alice, one).await;
    let (mut phone, _) = phone_user.connect(one).await;
    let laptop_user = another_device(&alice, two).await;
    let (mut laptop, _) = laptop_user.connect(two).await;
    until_seen(&mut laptop, &mut b, &alice.id, Duration::from_secs(5)).await;
    until_seen(&mut phone, &mut b, &alice.id, Duration::from_secs(5)).await;
    let (st, _) = on(one, &phone_user, Method::DELETE, "/v1/sessions", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    // Only positions (her laptop putting its own back), never a departure.
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(1000);
    while let Some(m) = b
        .next_message(quiet_until - tokio::time::Instant::now())
        .await
    {
        let text = m.into_text().expect("text");
        let f: Value = serde_json::from_str(text.as_str()).expect("json");
        assert_eq!(f["type"], "friend_location", "{f}");
    }
    let (_, snap) = bob.connect(two).await;
    assert_eq!(snap["friends"][0]["id"], alice.id.as_str(), "{snap}");

    // The last reporting device logs out: friends see her go at once.
    let (st, _) = on(two, &laptop_user, Method::DELETE, "/v1/sessions", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let left = loop {
        let f = b.next_json().await;
        if f["type"] != "friend_location" {
            break f;
        }
    };
    assert_left(&left, &alice.id, "inactive");
    let (st, near) = on(two, &bob, Method::GET, "/v1/nearby", None).await;
    assert_eq!(
        (st, &near["friends"]),
        (StatusCode::OK, &json!([])),
        "{near}"
    );
    let (_, snap) = bob.connect(two).await;
    assert_eq!(snap["friends"], json!([]), "{snap}");
    drop(laptop);

    // Logging in again and reporting shows her again, to the same session.
    let (mut back, _) = alice.connect(one).await;
    until_seen(&mut back, &mut b, &alice.id, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn friend_requests_and_sharing_changes_are_pushed() {
    let server = Server::start(&[]);
    account_events(&server, &server).await;
}

#[tokio::test]
async fn friend_requests_and_sharing_changes_are_pushed_across_nodes() {
    let Some(nodes) = TwoNodes::start().await else {
        return;
    };
    account_events(&nodes.a, &nodes.b).await;
}

/// Alice on `one`, Bob on `two`; each change is made over REST on the
/// asker's node and pushed to both.
async fn account_events(one: &Server, two: &Server) {
    let alice = one.user("alice").await;
    let bob = two.user("bob").await;
    let (mut a, _) = alice.connect(one).await;
    let (mut b, _) = bob.connect(two).await;
    let row = |id: &str, name: Value, status: &str, sharing: bool, theirs: bool| {
        json!({ "type": "friend_update", "id": id, "username": name, "status": status,
                "sharing": sharing, "shares_with_you": theirs })
    };

    let (st, _) = on(
        one,
        &alice,
        Method::PUT,
        &format!("/v1/friends/{}", bob.id),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        b.next_account().await,
        row(&alice.id, json!("alice"), "incoming", true, false)
    );
    // Her own row withholds his name until he accepts, as GET does.
    assert_eq!(
        a.next_account().await,
        row(&bob.id, Value::Null, "outgoing", true, false)
    );

    let (st, _) = on(
        two,
        &bob,
        Method::PUT,
        &format!("/v1/friends/{}", alice.id),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        a.next_account().await,
        row(&bob.id, json!("bob"), "friends", true, true)
    );
    assert_eq!(
        b.next_account().await,
        row(&alice.id, json!("alice"), "friends", true, true)
    );

    let (st, _) = on(
        one,
        &alice,
        Method::PUT,
        &format!("/v1/friends/{}/sharing", bob.id),
        Some(json!({ "enabled": false })),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        b.next_account().await,
        row(&alice.id, json!("alice"), "friends", true, false)
    );
    assert_eq!(
        a.next_account().await,
        row(&bob.id, json!("bob"), "friends", false, true)
    );
    let (_, list) = on(two, &bob, Method::GET, "/v1/friends", None).await;
    assert_eq!(list["friends"][0]["shares_with_you"], false, "{list}");

    let (st, _) = on(
        two,
        &bob,
        Method::DELETE,
        &format!("/v1/friends/{}", alice.id),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(
        a.next_account().await,
        json!({ "type": "friend_removed", "id": bob.id })
    );
    assert_eq!(
        b.next_account().await,
        json!({ "type": "friend_removed", "id": alice.id })
    );
    // A third user, not a friend, hears none of it.
    let carol = one.user("carol").await;
    let (mut c, _) = carol.connect(two).await;
    let (st, _) = on(
        one,
        &alice,
        Method::PUT,
        &format!("/v1/friends/{}", bob.id),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(b.next_account().await["status"], "incoming");
    c.expect_silence(QUIET).await;
    assert!(c.account.is_empty(), "{:?}", c.account);
}

#[tokio::test]
async fn history_is_yours_to_export_and_delete() {
    let server = Server::start(&[]);
    history_controls(&server).await;
}

#[tokio::test]
async fn history_controls_on_postgres() {
    let Some(nodes) = TwoNodes::start().await else {
        return;
    };
    history_controls(&nodes.a).await;
}

async fn history_controls(server: &Server) {
    let (alice, bob) = server.friends("alice", "bob").await;
    let (mut a, _) = alice.connect(server).await;
    a.send_location(SEOUL.0, SEOUL.1).await;
    // Written asynchronously: within about a second.
    let mut points = Value::Null;
    for _ in 0..50 {
        let (st, body) = on(server, &alice, Method::GET, "/v1/me/history", None).await;
        assert_eq!(st, StatusCode::OK, "{body}");
        if body["points"].as_array().is_some_and(|p| !p.is_empty()) {
            points = body["points"].clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(points[0]["lat"], SEOUL.0, "{points}");
    // Nobody else reads it: a friend's own history call is about them.
    let (st, theirs) = on(server, &bob, Method::GET, "/v1/me/history", None).await;
    assert_eq!(
        (st, &theirs["points"]),
        (StatusCode::OK, &json!([])),
        "{theirs}"
    );

    // GeoJSON export: [lon, lat] points with their time.
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/me/history?format=geojson", server.base))
        .bearer_auth(&alice.token)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/geo+json")
    );
    let geo: Value = resp.json().await.expect("json");
    assert_eq!(geo["type"], "FeatureCollection", "{geo}");
    assert_eq!(
        geo["features"][0]["geometry"],
        json!({ "type": "Point", "coordinates": [SEOUL.1, SEOUL.0] }),
        "{geo}"
    );
    assert_eq!(
        geo["features"][0]["properties"]["ts"], points[0]["ts"],
        "{geo}"
    );
    let (st, body) = on(
        server,
        &alice,
        Method::GET,
        "/v1/me/history?format=kml",
        None,
    )
    .await;
    assert_eq!(
        (st, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_query")),
        "{body}"
    );

    // Deleting: all of it, and only hers.
    b_moves_once(server, &bob).await;
    let (st, body) = on(server, &alice, Method::DELETE, "/v1/me/history", None).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body["deleted"].as_u64().is_some_and(|n| n >= 1), "{body}");
    let (_, after) = on(server, &alice, Method::GET, "/v1/me/history", None).await;
    assert_eq!(after["points"], json!([]), "{after}");
    let (_, theirs) = on(server, &bob, Method::GET, "/v1/me/history", None).await;
    assert_eq!(
        theirs["points"].as_array().map(Vec::len),
        Some(1),
        "{theirs}"
    );
}

/// Bob reports one position and it reaches his history.
async fn b_moves_once(server: &Server, bob: &User) {
    let (mut b, _) = bob.connect(server).await;
    b.send_location(SEOUL.0, SEOUL.1 + 0.01).await;
    for _ in 0..50 {
        let (_, body) = on(server, bob, Method::GET, "/v1/me/history", None).await;
        if body["points"].as_array().is_some_and(|p| !p.is_empty()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("bob's position never reached his history");
}

//! What a user grants one friend, against the real binary over real
//! WebSockets, on the embedded setup and on two nodes over Redis and
//! PostgreSQL: sharing for a while (it ends on the viewer's node by itself,
//! even with the bus down) and sharing an approximate position, with an
//! attacker who walks around an approximate friend to trilaterate her.
mod common;

use std::time::Duration;

use common::{assert_left, until_seen, Server, TwoNodes, User, Ws};
use nearby_geo::{Point, CELL_DEG};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const SEOUL: (f64, f64) = (37.5665, 126.978);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `PUT /v1/friends/{friend}/sharing` by `user` on `server`.
async fn share(server: &Server, user: &User, friend: &User, body: Value) -> (StatusCode, Value) {
    common::call(
        &reqwest::Client::new(),
        Method::PUT,
        &format!("{}/v1/friends/{}/sharing", server.base, friend.id),
        Some(&user.token),
        Some(body),
    )
    .await
}

/// The next frame that is not a `friend_location`.
async fn next_other(ws: &mut Ws) -> Value {
    loop {
        let f = ws.next_json().await;
        if f["type"] != "friend_location" {
            return f;
        }
    }
}

#[tokio::test]
async fn sharing_for_a_while_ends_by_itself() {
    let server = Server::start(&[]);
    timed_sharing(&server, &server, None).await;
}

#[tokio::test]
async fn sharing_set_on_one_node_ends_for_a_viewer_on_another_without_the_bus() {
    let Some(mut nodes) = TwoNodes::start().await else {
        return;
    };
    let TwoNodes { a, b, redis, .. } = &mut nodes;
    timed_sharing(a, b, Some(redis)).await;
}

/// Alice (on `one`) shares with Bob (on `two`) for two seconds. With
/// `redis`, the bus is killed once the grant is announced: nothing can
/// carry its end, which Bob's node must enforce by itself.
async fn timed_sharing(
    one: &Server,
    two: &Server,
    redis: Option<&mut nearby_conformance::services::RedisProcess>,
) {
    let (alice, bob) = one.friends("alice", "bob").await;
    let (mut a, _) = alice.connect(one).await;
    let (mut b, _) = bob.connect(two).await;
    b.send_location(SEOUL.0, SEOUL.1).await;
    until_seen(&mut a, &mut b, &alice.id, Duration::from_secs(5)).await;

    // Bad terms: a clear error, nothing changed.
    for (body, code) in [
        (
            json!({ "enabled": true, "until": now_ms() - 1 }),
            "bad_until",
        ),
        (
            json!({ "enabled": false, "until": now_ms() + 60_000 }),
            "bad_until",
        ),
        (json!({ "enabled": true, "until": "soon" }), "bad_json"),
        (json!({ "enabled": true, "precision": "fuzzy" }), "bad_json"),
        (
            json!({ "enabled": true, "precison": "approximate" }),
            "bad_json",
        ),
    ] {
        let (st, err) = share(one, &alice, &bob, body.clone()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{body}: {err}");
        assert!(
            err["code"].is_string() && err["message"].is_string(),
            "{err}"
        );
        if code == "bad_until" {
            assert_eq!(err["code"], code, "{body}: {err}");
        }
    }
    assert!(b.account.is_empty(), "nothing changed: {:?}", b.account);

    let until = now_ms() + 2_000;
    let (st, body) = share(
        one,
        &alice,
        &bob,
        json!({ "enabled": true, "until": until }),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({ "id": bob.id, "sharing": true, "sharing_until": until })
    );
    // Both see the new terms, each from their side.
    let row = b.next_account().await;
    assert_eq!(
        (
            &row["type"],
            &row["shares_with_you"],
            &row["shares_with_you_until"]
        ),
        (&json!("friend_update"), &json!(true), &json!(until)),
        "{row}"
    );
    let row = a.next_account().await;
    assert_eq!(row["sharing_until"], until, "{row}");
    let (st, list) = two.get("/v1/friends", Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list["friends"][0]["shares_with_you_until"], until, "{list}");
    // Still shown meanwhile.
    until_seen(&mut a, &mut b, &alice.id, Duration::from_secs(5)).await;
    // Give Bob's node time to read the terms, then take the bus away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bus_down = redis.is_some();
    if let Some(r) = redis {
        r.kill();
    }

    let left = next_other(&mut b).await;
    let at = now_ms();
    assert_left(&left, &alice.id, "unshared");
    assert!(
        at >= until - 5 && at < until + 1_500,
        "ended at {at}, {} ms after `until`",
        at - until
    );
    // And Bob's row says so (read from the store, not from a message).
    let row = b.next_account().await;
    assert_eq!(row["shares_with_you"], false, "{row}");
    assert!(row.get("shares_with_you_until").is_none(), "{row}");
    let (st, list) = two.get("/v1/friends", Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list["friends"][0]["shares_with_you"], false, "{list}");
    let (st, list) = one.get("/v1/friends", Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list["friends"][0]["sharing"], false, "{list}");
    if !bus_down {
        // Her moves no longer reach him, and a new session of his does not
        // see her.
        a.send_location(SEOUL.0 + 0.001, SEOUL.1).await;
        b.expect_silence(Duration::from_millis(300)).await;
        let (_fresh, snap) = bob.connect(two).await;
        assert_eq!(snap["friends"], json!([]), "{snap}");
        // Turned on again for good: shown again.
        let (st, body) = share(one, &alice, &bob, json!({ "enabled": true })).await;
        assert_eq!(
            (st, body),
            (StatusCode::OK, json!({ "id": bob.id, "sharing": true }))
        );
        until_seen(&mut a, &mut b, &alice.id, Duration::from_secs(5)).await;
    }
}

const FAST: [&str; 8] = [
    "--updates-per-sec",
    "1000",
    "--update-burst",
    "1000",
    "--user-updates-per-sec",
    "1000",
    "--user-update-burst",
    "1000",
];

#[tokio::test]
async fn an_approximate_friend_cannot_be_trilaterated() {
    let server = Server::start(&FAST);
    approximate(&server, &server).await;
}

#[tokio::test]
async fn an_approximate_friend_cannot_be_trilaterated_across_nodes() {
    let Some(nodes) = TwoNodes::start_with(&FAST).await else {
        return;
    };
    approximate(&nodes.a, &nodes.b).await;
}

/// What the attacker's client shows of Alice after each of its moves:
/// `(distance_m, bearing_deg)`, or `None` while she is not shown.
type Observation = ((f64, f64), Option<(f64, f64)>);

/// Bob walks `steps`, reporting each position; after each, a frame the
/// server must answer (an unknown type) marks the end of what that move
/// produced. Returns what his client shows of `alice` after each move.
async fn walk(b: &mut Ws, alice: &str, steps: &[(f64, f64)]) -> Vec<Observation> {
    let mut shown: Option<(f64, f64)> = None;
    let mut seen = Vec::new();
    for &(lat, lon) in steps {
        b.send_location(lat, lon).await;
        b.send_text(r#"{"type":"sync"}"#).await;
        loop {
            let f = b.next_json().await;
            match f["type"].as_str() {
                Some("error") if f["code"] == "unknown_type" => break,
                Some("friend_location") if f["id"] == alice => {
                    shown = Some((
                        f["distance_m"].as_f64().expect("distance"),
                        f["bearing_deg"].as_f64().expect("bearing"),
                    ));
                }
                Some("friend_left") if f["id"] == alice => shown = None,
                _ => panic!("unexpected frame during the walk: {f}"),
            }
        }
        seen.push(((lat, lon), shown));
    }
    seen
}

/// The attacker's estimate: the candidate point (on a 50 m grid over
/// ±6 km) whose distances to Bob's positions best fit the distances
/// shown, by least squares. Observations where she was not shown are
/// skipped.
fn trilaterate(seen: &[Observation], around: (f64, f64)) -> (f64, f64) {
    let mut best = (f64::INFINITY, around);
    for c in common::grid(around, 241, 50.0) {
        let err: f64 = seen
            .iter()
            .filter_map(|(me, shown)| shown.map(|(d, _)| (common::dist(*me, c) - d).powi(2)))
            .sum();
        if err < best.0 {
            best = (err, c);
        }
    }
    best.1
}

/// Alice (on `one`) shares approximately with Bob (on `two`), who walks a
/// 9 × 9 grid 1 km apart around her, twice: once with Alice at one corner
/// of her cell and once at the opposite corner, 3 km away. Everything his
/// client is shown must be identical both times, so no estimate can place
/// her better than her cell; with precise sharing, the same walk places her
/// within metres.
async fn approximate(one: &Server, two: &Server) {
    let (alice, bob) = one.friends("alice", "bob").await;
    let (mut a, _) = alice.connect(one).await;
    let (mut b, _) = bob.connect(two).await;
    let cell = Point::new(SEOUL.0, SEOUL.1).expect("seoul").cell_centre();
    let half_lon = {
        let cols = (cell.lat().to_radians().cos() * 360.0 / CELL_DEG).floor();
        180.0 / cols
    };
    let corner = |s: f64| {
        (
            cell.lat() + s * 0.4 * CELL_DEG,
            cell.lon() + s * 0.4 * 2.0 * half_lon,
        )
    };
    let (p1, p2) = (corner(-1.0), corner(1.0));
    let apart = common::dist(p1, p2);
    assert!(apart > 3_000.0, "{apart}");
    let steps = common::grid((cell.lat(), cell.lon()), 9, 1_000.0);

    // Precise first: the attacker is competent.
    b.send_location(cell.lat(), cell.lon()).await;
    a.send_location(p1.0, p1.1).await;
    let first_seen = b.next_json().await;
    assert_eq!(
        (&first_seen["type"], &first_seen["id"]),
        (&json!("friend_location"), &json!(alice.id)),
        "{first_seen}"
    );
    let precise = walk(&mut b, &alice.id, &steps).await;
    assert!(precise.iter().all(|(_, s)| s.is_some()), "all within 8 km");
    let guess = trilaterate(&precise, (cell.lat(), cell.lon()));
    let precise_error = common::dist(guess, p1);
    assert!(precise_error < 100.0, "precise: off by {precise_error} m");

    let (st, body) = share(
        one,
        &alice,
        &bob,
        json!({ "enabled": true, "precision": "approximate" }),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["sharing_precision"], "approximate", "{body}");
    // Bob's view of her and his row change at once (the row is set aside
    // as it arrives, after the view).
    let redrawn = b.next_json().await;
    assert_eq!(redrawn["type"], "friend_location", "{redrawn}");
    assert_eq!(redrawn["approximate"], true, "{redrawn}");
    let row = b.next_account().await;
    assert_eq!(row["shares_with_you_precision"], "approximate", "{row}");

    let first = walk(&mut b, &alice.id, &steps).await;
    a.send_location(p2.0, p2.1).await;
    // Her move shows (its time changed), as an approximate row.
    let moved = b.next_json().await;
    assert_eq!(
        (&moved["type"], &moved["approximate"]),
        (&json!("friend_location"), &json!(true)),
        "{moved}"
    );
    let second = walk(&mut b, &alice.id, &steps).await;
    let shown = first.iter().filter(|(_, s)| s.is_some()).count();
    assert!(shown > 40, "she was shown after {shown} of 81 moves");
    for ((me, one_view), (_, two_view)) in first.iter().zip(&second) {
        assert_eq!(
            one_view, two_view,
            "from {me:?}, Alice {apart:.0} m apart looked different"
        );
        if let Some((d, bearing)) = one_view {
            assert_eq!(d % 1000.0, 0.0, "whole kilometres: {d}");
            assert_eq!(bearing % 45.0, 0.0, "eighths: {bearing}");
        }
    }
    let guess = trilaterate(&first, (cell.lat(), cell.lon()));
    let (e1, e2) = (common::dist(guess, p1), common::dist(guess, p2));
    eprintln!(
        "attacker: precise estimate {precise_error:.0} m off; approximate estimate \
         {e1:.0} m from her first spot, {e2:.0} m from her second ({apart:.0} m apart, \
         same observations)"
    );
    assert!(e1.max(e2) >= apart / 2.0 - 1.0);
}

/// Changes as fast as the race needs them.
const UNLIMITED: [&str; 2] = ["--changes-per-min", "1000000"];

#[tokio::test]
async fn the_last_sharing_toggle_wins_at_once() {
    let server = Server::start(&UNLIMITED);
    last_toggle_wins(&server, &server).await;
}

#[tokio::test]
async fn the_last_sharing_toggle_wins_at_once_across_nodes() {
    let Some(nodes) = TwoNodes::start_with(&UNLIMITED).await else {
        return;
    };
    last_toggle_wins(&nodes.a, &nodes.b).await;
}

/// The issue's race, 500 rounds: Alice turns sharing with Bob on and off
/// four times at once (concurrent calls, through both nodes when there are
/// two). Then Carol, a third user, asks Bob to be friends (or cancels it):
/// her row reaches Bob's socket after everything the toggles sent him, so
/// by then what his socket shows of Alice must be what the store says,
/// read back by Alice, in both directions.
async fn last_toggle_wins(one: &Server, two: &Server) {
    let (alice, bob) = one.friends("alice", "bob").await;
    let carol = one.user("carol").await;
    let (mut a, _) = alice.connect(one).await;
    let (mut b, _) = bob.connect(two).await;
    b.send_location(SEOUL.0, SEOUL.1).await;
    until_seen(&mut a, &mut b, &alice.id, Duration::from_secs(5)).await;
    let mut shown = true;
    let mut on_store = 0;
    for round in 0..500 {
        let toggles = (0..4).map(|i| {
            let server = if i % 2 == 0 { one } else { two };
            share(
                server,
                &alice,
                &bob,
                json!({ "enabled": (round + i) % 2 == 0 }),
            )
        });
        for (st, body) in futures_util::future::join_all(toggles).await {
            assert_eq!(st, StatusCode::OK, "round {round}: {body}");
        }
        let (_, list) = one.get("/v1/friends", Some(&alice.token)).await;
        let truth = list["friends"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["id"] == bob.id.as_str()))
            .and_then(|f| f["sharing"].as_bool())
            .unwrap_or_else(|| panic!("round {round}: {list}"));
        on_store += usize::from(truth);
        // The barrier: Carol's change, published after all of the above.
        let (st, body) = if round % 2 == 0 {
            carol
                .req(Method::PUT, &format!("/v1/friends/{}", bob.id), None)
                .await
        } else {
            carol
                .req(Method::DELETE, &format!("/v1/friends/{}", bob.id), None)
                .await
        };
        assert!(st.is_success(), "round {round}: {st} {body}");
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        'barrier: loop {
            while let Some(row) = b.account.pop_front() {
                if row["id"] == carol.id.as_str() {
                    break 'barrier;
                }
            }
            let now = tokio::time::Instant::now();
            assert!(now < end, "round {round}: Carol's row never came");
            if let Some(Message::Text(t)) = b.next_message_or_account(end - now).await {
                let f: Value = serde_json::from_str(t.as_str()).expect("json");
                if f["id"] == alice.id.as_str() {
                    match f["type"].as_str() {
                        Some("friend_location") => shown = true,
                        Some("friend_left") => shown = false,
                        _ => {}
                    }
                }
            }
        }
        assert_eq!(
            shown,
            truth,
            "round {round}: sharing is {} in the store, Bob's socket shows her {}",
            if truth { "on" } else { "off" },
            if shown { "shown" } else { "hidden" },
        );
        while a.next_message(Duration::ZERO).await.is_some() {}
        a.account.clear();
    }
    println!("500 rounds, sharing on after {on_store} of them");
}

//! A revocation (unfriend, sharing off, logout) is never lost: not when the
//! viewer's socket stalls and its queue fills, not when Redis is down while
//! it is made, not when a logout races the WebSocket handshake. Each test
//! drives the real binary; the Redis and race cases run on two nodes.
mod common;

use std::time::Duration;

use common::{north_of, until_seen, Server, Shared, TwoNodes, User, Ws, SEOUL};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

/// A WebSocket for `user` whose receive buffer is tiny, so that once the
/// test stops reading, the server's writes to it block within a few frames.
async fn small_buffer_ws(server: &Server, user: &User) -> Ws {
    let addr = server
        .base
        .strip_prefix("http://")
        .expect("http base")
        .parse()
        .expect("socket address");
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(2048).expect("SO_RCVBUF");
    let tcp = sock.connect(addr).await.expect("connect");
    let mut req = server.ws.as_str().into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", user.token).parse().expect("header"),
    );
    let (stream, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp))
        .await
        .expect("ws handshake");
    let mut ws = Ws::new(stream);
    assert_eq!(ws.next_json().await["type"], "snapshot");
    ws
}

/// Every text frame until `quiet` passes without one (or the stream ends),
/// and whether the stream ended with a close frame (its code).
async fn drain(ws: &mut Ws, quiet: Duration) -> (Vec<Value>, Option<u16>) {
    let mut frames = Vec::new();
    loop {
        match tokio::time::timeout(quiet, ws.stream.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                frames.push(serde_json::from_str(t.as_str()).expect("json"))
            }
            Ok(Some(Ok(Message::Close(c)))) => {
                return (frames, Some(c.map_or(1005, |c| u16::from(c.code))))
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) | Err(_) => return (frames, None),
        }
    }
}

fn is_location_of(f: &Value, id: &str) -> bool {
    f["type"] == "friend_location" && f["id"] == id
}

#[tokio::test]
async fn a_stalled_viewer_still_gets_the_unfriend_and_nothing_after_it() {
    // A short queue, small socket buffers and no flood limit on the friend:
    // the viewer's session blocks within a few frames of her not reading,
    // and her queue overflows.
    let server = Server::start(&[
        "--session-queue",
        "8",
        "--updates-per-sec",
        "2000",
        "--update-burst",
        "2000",
        "--user-updates-per-sec",
        "2000",
        "--user-update-burst",
        "2000",
        "--socket-send-buffer",
        "4096",
    ]);
    let (alice, bob) = server.friends("alice", "bob").await;
    let mut a = small_buffer_ws(&server, &alice).await;
    let (mut b, _) = bob.connect(&server).await;
    a.send_location(SEOUL.0, SEOUL.1).await;
    // Bob's moves stay within 25 m of each other, so Bob himself is told
    // nothing after the first; Alice gets one frame per move, which she
    // does not read. Near moves are 500 m away, far ones 3 km.
    let mv = |metres: f64| north_of(SEOUL.0, SEOUL.1, metres);
    // Paced, so that Alice's session forwards them (a burst would only
    // overflow her queue) until her socket's buffers are full and her
    // session blocks writing to it.
    for i in 0..3000 {
        let (lat, lon) = mv(500.0 + f64::from(i % 10));
        b.send_location(lat, lon).await;
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The precondition: Alice's queue overflowed (her socket is stalled).
    bob.unfriend(&alice).await;
    // Bob keeps moving, now 3 km away, while Alice starts reading again.
    let mover = tokio::spawn(async move {
        for i in 0..300 {
            let (lat, lon) = mv(3000.0 + f64::from(i % 10));
            b.send_location(lat, lon).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        b
    });
    let (frames, _) = drain(&mut a, Duration::from_secs(3)).await;
    mover.await.expect("mover");
    assert!(
        frames.len() < 1000,
        "the viewer's socket never stalled ({} frames)",
        frames.len()
    );
    let left = frames
        .iter()
        .position(|f| f["type"] == "friend_left" && f["id"] == bob.id.as_str())
        .unwrap_or_else(|| panic!("no friend_left among {} frames", frames.len()));
    assert_eq!(frames[left]["reason"], "unfriended", "{}", frames[left]);
    let after = frames[left..]
        .iter()
        .filter(|f| is_location_of(f, &bob.id))
        .count();
    let far = frames
        .iter()
        .filter(|f| is_location_of(f, &bob.id))
        .filter(|f| f["distance_m"].as_f64().unwrap_or(0.0) > 2000.0)
        .count();
    assert_eq!(
        (after, far),
        (0, 0),
        "locations of a former friend after the unfriend"
    );
}

#[tokio::test]
async fn revocations_made_while_redis_is_down_take_effect_when_it_returns() {
    let Some(mut nodes) = TwoNodes::start().await else {
        return;
    };
    let (node_a, node_b) = (&nodes.a, &nodes.b);
    let viewer = node_a.user("viewer").await;
    let unfriender = node_b.user("unfriender").await;
    let unsharer = node_b.user("unsharer").await;
    let leaver = node_a.user("leaver").await;
    for f in [&unfriender, &unsharer] {
        viewer.befriend(f).await;
        f.befriend(&viewer).await;
    }
    let (mut v, _) = viewer.connect(node_a).await;
    let (mut l, _) = leaver.connect(node_a).await;
    let (mut f1, _) = unfriender.connect(node_b).await;
    let (mut f2, _) = unsharer.connect(node_b).await;
    v.send_location(SEOUL.0, SEOUL.1).await;
    until_seen(&mut f1, &mut v, &unfriender.id, Duration::from_secs(5)).await;
    until_seen(&mut f2, &mut v, &unsharer.id, Duration::from_secs(5)).await;

    nodes.redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // All three are stored; none can be announced.
    unfriender.unfriend(&viewer).await;
    unsharer.share(&viewer, false).await;
    let (st, body) = leaver.req(Method::DELETE, "/v1/sessions", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let (v_before, _) = drain(&mut v, Duration::from_millis(500)).await;
    assert!(
        !v_before.iter().any(|f| f["type"] == "friend_left"),
        "nothing can be announced while Redis is down: {v_before:?}"
    );

    nodes.redis.restart().expect("restart redis");
    // Both nodes reconnect by themselves; the sessions re-read the store.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut left = Vec::new();
    while left.len() < 2 && tokio::time::Instant::now() < deadline {
        let (frames, _) = drain(&mut v, Duration::from_millis(500)).await;
        left.extend(frames.into_iter().filter(|f| f["type"] == "friend_left"));
    }
    let mut reasons: Vec<(String, String)> = left
        .iter()
        .map(|f| (f["id"].to_string(), f["reason"].to_string()))
        .collect();
    reasons.sort();
    let mut expected = vec![
        (
            json!(unfriender.id).to_string(),
            "\"unfriended\"".to_owned(),
        ),
        (json!(unsharer.id).to_string(), "\"unshared\"".to_owned()),
    ];
    expected.sort();
    assert_eq!(reasons, expected, "{left:?}");
    let (frames, code) = drain(&mut l, Duration::from_secs(10)).await;
    assert!(
        frames.iter().any(|f| f["code"] == "token_revoked"),
        "{frames:?}"
    );
    assert_eq!(code, Some(1008));

    // The two former sharers keep moving; the viewer sees none of it.
    for i in 0..10 {
        let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 300.0 + 50.0 * f64::from(i));
        f1.send_location(lat, lon).await;
        f2.send_location(lat, lon).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (frames, _) = drain(&mut v, Duration::from_secs(1)).await;
    assert!(
        !frames
            .iter()
            .any(|f| is_location_of(f, &unfriender.id) || is_location_of(f, &unsharer.id)),
        "{frames:?}"
    );
}

/// Logs in `name` again (a new token for the same account).
async fn log_in(server: &Server, name: &str) -> String {
    let creds = json!({ "username": name, "password": "correct horse" });
    let (st, body) = server.post("/v1/sessions", None, creds).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    body["token"].as_str().expect("token").to_owned()
}

#[tokio::test]
async fn a_logout_racing_the_handshake_never_leaves_a_socket_open() {
    let Some(shared) = Shared::get().await else {
        return;
    };
    let flags = shared.flags(&[]);
    let (node_a, node_b) = (Server::start(&flags), Server::start(&flags));
    const USERS: usize = 10;
    const ROUNDS: usize = 20;
    let mut names = Vec::new();
    for i in 0..USERS {
        names.push(node_a.user(&format!("racer{i}")).await.name);
    }
    let (mut opened, mut refused) = (0usize, 0usize);
    for round in 0..ROUNDS {
        let mut trials = Vec::new();
        for name in &names {
            let token = log_in(&node_b, name).await;
            let ws_url = node_a.ws.clone();
            let logout_url = format!("{}/v1/sessions", node_b.base);
            // Spread the logout over the handshake's duration.
            let delay = Duration::from_micros(((round * 7 + trials.len() * 13) % 40) as u64 * 100);
            trials.push(tokio::spawn(async move {
                let mut req = ws_url.as_str().into_client_request().expect("request");
                req.headers_mut().insert(
                    "authorization",
                    format!("Bearer {token}").parse().expect("header"),
                );
                let connect = tokio::spawn(tokio_tungstenite::connect_async(req));
                tokio::time::sleep(delay).await;
                let resp = reqwest::Client::new()
                    .delete(&logout_url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("logout");
                assert_eq!(resp.status(), StatusCode::NO_CONTENT);
                match connect.await.expect("join") {
                    Err(_) => None,
                    Ok((stream, _)) => {
                        let mut ws = Ws::new(stream);
                        Some(drain(&mut ws, Duration::from_secs(5)).await)
                    }
                }
            }));
        }
        for t in trials {
            match t.await.expect("trial") {
                None => refused += 1,
                Some((frames, code)) => {
                    opened += 1;
                    assert!(
                        frames.iter().any(|f| f["code"] == "token_revoked"),
                        "a socket outlived its token's logout (close {code:?}): {frames:?}"
                    );
                    assert_eq!(code, Some(1008), "{frames:?}");
                }
            }
        }
    }
    assert_eq!(opened + refused, USERS * ROUNDS);
    eprintln!("handshake race: {opened} sockets opened and closed, {refused} refused");
}

#[tokio::test]
async fn a_friend_toggling_sharing_cannot_disconnect_you() {
    // The per-user change limit is lifted: this is about a control queue
    // overflowing (many friends' changes at once do that too).
    let server = Server::start(&["--changes-per-min", "1000000"]);
    let (alice, bob) = server.friends("alice", "bob").await;
    let (mut a, _) = alice.connect(&server).await;
    let (mut b, _) = bob.connect(&server).await;
    a.send_location(SEOUL.0, SEOUL.1).await;
    until_seen(&mut b, &mut a, &bob.id, Duration::from_secs(5)).await;
    // 300 toggles, 30 at a time, far more than a session's control queue.
    let path = format!("/v1/friends/{}/sharing", alice.id);
    for round in 0..10 {
        let mut calls = Vec::new();
        for i in 0..30 {
            let (bob, path) = (bob.clone(), path.clone());
            calls.push(tokio::spawn(async move {
                let enabled = (round * 30 + i) % 2 == 0;
                bob.req(Method::PUT, &path, Some(json!({ "enabled": enabled })))
                    .await
                    .0
            }));
        }
        for c in calls {
            assert_eq!(c.await.expect("toggle"), StatusCode::OK);
        }
    }
    bob.share(&alice, false).await;
    // Alice's socket is still open and ends up not seeing Bob.
    let (frames, code) = drain(&mut a, Duration::from_secs(2)).await;
    assert_eq!(code, None, "closed: {frames:?}");
    for i in 0..5 {
        let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 100.0 * f64::from(i + 1));
        b.send_location(lat, lon).await;
    }
    let (frames, code) = drain(&mut a, Duration::from_secs(1)).await;
    assert_eq!(code, None);
    assert!(
        !frames.iter().any(|f| is_location_of(f, &bob.id)),
        "{frames:?}"
    );
    let (st, near) = alice.req(Method::GET, "/v1/nearby", None).await;
    assert_eq!((st, near["friends"].clone()), (StatusCode::OK, json!([])));
}

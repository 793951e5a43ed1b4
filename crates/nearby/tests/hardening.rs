//! Findings of the adversarial review (issue 10), each against the real
//! binary: multi-device views, contract mismatches, limits.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{assert_location, north_of, Server, SEOUL};
use reqwest::StatusCode;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn every_socket_of_a_user_sees_what_a_fresh_one_would() {
    let server = Server::start(&[]);
    let (alice, bob) = server.friends("alice", "bob").await;
    // Alice's tablet connects before her phone has ever reported.
    let (mut tablet, snap) = alice.connect(&server).await;
    assert_eq!(snap["friends"], json!([]));
    let (mut phone, _) = alice.connect(&server).await;
    let (mut b, _) = bob.connect(&server).await;
    phone.send_location(SEOUL.0, SEOUL.1).await;
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 700.0);
    b.send_location(lat, lon).await;
    assert_location(&phone.next_json().await, &bob.id, 700.0);
    // The tablet is told where the phone put her, then sees Bob from there.
    let moved = tablet.next_json().await;
    assert_eq!(moved["type"], "self_location", "{moved}");
    assert_eq!(moved["lat"], SEOUL.0, "{moved}");
    assert_location(&tablet.next_json().await, &bob.id, 700.0);
    // And the REST view agrees.
    let (st, near) = alice.req(reqwest::Method::GET, "/v1/nearby", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(near["friends"][0]["id"], bob.id.as_str());
    // The phone moves 2 km further north: the tablet is told too.
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 2700.0);
    phone.send_location(lat, lon).await;
    assert_location(&phone.next_json().await, &bob.id, 2000.0);
    let moved = tablet.next_json().await;
    assert_eq!(moved["type"], "self_location", "{moved}");
    assert_eq!(moved["lat"], lat, "{moved}");
    assert_location(&tablet.next_json().await, &bob.id, 2000.0);
    tablet.expect_silence(Duration::from_millis(300)).await;
}

fn addr(server: &Server) -> String {
    server
        .base
        .strip_prefix("http://")
        .expect("http")
        .to_owned()
}

/// A client whose requests come from `ip` (a loopback alias).
fn client_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(ip))
        .build()
        .expect("client")
}

async fn post_from(
    http: &reqwest::Client,
    server: &Server,
    path: &str,
    body: serde_json::Value,
) -> (StatusCode, Option<String>, serde_json::Value) {
    let resp = http
        .post(format!("{}{path}", server.base))
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, retry, body)
}

/// Reads until the server closes the connection; false if it is still open
/// after `within`.
async fn closed_within(tcp: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn slow_headers_are_cut_off_and_health_answers_with_descriptors_short() {
    use tokio::io::AsyncWriteExt;
    // 256 descriptors: the node derives 160 normal connections and keeps
    // its reserve of 64 and 32 descriptors of its own apart.
    let server = Server::start_with_nofile(
        256,
        &[
            "--header-timeout-secs",
            "3",
            "--max-connections-per-ip",
            "0",
        ],
    );
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..276 {
        let mut tcp = tokio::net::TcpStream::connect(addr(&server))
            .await
            .expect("connect");
        // Half a request: a slowloris client, or an upgrade trickled in.
        let half = if i % 2 == 0 {
            "GET /healthz HTTP/1.1\r\nHo"
        } else {
            "GET /v1/ws HTTP/1.1\r\nUpgrade: websocket\r\nConn"
        };
        tcp.write_all(half.as_bytes()).await.expect("write");
        held.push(tcp);
    }
    // Health, metrics and login keep answering: at once, or as soon as a
    // reserve slot frees (2 s at most).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    loop {
        let creds = json!({ "username": "alice", "password": "correct horse" });
        let sent = reqwest::Client::new()
            .post(format!("{}/v1/users", server.base))
            .json(&creds)
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == StatusCode::CREATED => break,
            Ok(r) => {
                assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
                let v: serde_json::Value = r.json().await.expect("JSON refusal");
                assert_eq!(v["code"], "too_many_connections", "{v}");
            }
            Err(e) => panic!("no answer at all: {e}"),
        }
        refused += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room for a sign-up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for path in ["/healthz", "/metrics"] {
        let (st, _) = server.get(path, None).await;
        assert_eq!(st, StatusCode::OK, "{path}");
    }
    let (st, _) = server
        .post(
            "/v1/sessions",
            None,
            json!({ "username": "alice", "password": "correct horse" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    // Every half-sent request is closed by the header timeout (3 s) or
    // refused outright.
    for tcp in &mut held {
        assert!(
            closed_within(tcp, Duration::from_secs(6)).await,
            "a half-sent request outlived the header timeout"
        );
    }
    eprintln!("health during the attack: {refused} refusals before it answered");
}

#[tokio::test]
async fn refusals_past_the_caps_are_json_and_the_per_ip_cap_holds() {
    use tokio::io::AsyncReadExt;
    let server = Server::start(&["--max-connections-per-ip", "5", "--limit-loopback", "true"]);
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(
            tokio::net::TcpStream::connect(addr(&server))
                .await
                .expect("connect"),
        );
    }
    let mut sixth = tokio::net::TcpStream::connect(addr(&server))
        .await
        .expect("connect");
    let mut reply = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), sixth.read_to_string(&mut reply)).await;
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply:?}");
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    assert_eq!(v["code"], "too_many_connections", "{v}");
    // Another address is not affected.
    let (st, _, _) = post_from(
        &client_from([127, 0, 0, 2]),
        &server,
        "/v1/users",
        json!({ "username": "bob", "password": "correct horse" }),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
}

#[tokio::test]
async fn guessing_is_throttled_without_locking_the_owner_out() {
    let server = Server::start(&[
        "--limit-loopback",
        "true",
        "--login-account-failures-per-hour",
        "20",
    ]);
    let owner = client_from([127, 0, 0, 1]);
    let creds = json!({ "username": "victim", "password": "correct horse" });
    let (st, _, _) = post_from(&owner, &server, "/v1/users", creds.clone()).await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _, _) = post_from(&owner, &server, "/v1/sessions", creds.clone()).await;
    assert_eq!(st, StatusCode::OK, "the owner's address is now known");

    // One guesser: five wrong passwords, then 429 with Retry-After, and
    // the right password from there is not even checked.
    let guesser = client_from([127, 0, 0, 2]);
    let wrong = json!({ "username": "victim", "password": "wrong password" });
    for _ in 0..5 {
        let (st, _, body) = post_from(&guesser, &server, "/v1/sessions", wrong.clone()).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
    }
    let (st, retry, body) = post_from(&guesser, &server, "/v1/sessions", wrong.clone()).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["code"], "too_many_attempts");
    assert!(retry
        .and_then(|r| r.parse::<u64>().ok())
        .is_some_and(|s| s >= 1));
    let (st, _, _) = post_from(&guesser, &server, "/v1/sessions", creds.clone()).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);

    // Many guessers exhaust the account's budget for unknown addresses…
    for i in 3..20u8 {
        let g = client_from([127, 0, 0, i]);
        let _ = post_from(&g, &server, "/v1/sessions", wrong.clone()).await;
    }
    let (st, _, _) = post_from(
        &client_from([127, 0, 0, 99]),
        &server,
        "/v1/sessions",
        creds.clone(),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::TOO_MANY_REQUESTS,
        "an unknown address waits"
    );
    // …but the owner, from an address that logged in before, is not held back.
    let (st, _, body) = post_from(&owner, &server, "/v1/sessions", creds).await;
    assert_eq!(st, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn sign_ups_are_limited_per_address() {
    let server = Server::start(&["--limit-loopback", "true", "--signups-per-ip-per-hour", "8"]);
    let http = client_from([127, 0, 0, 3]);
    for name in ["su1", "su2"] {
        let body = json!({ "username": name, "password": "correct horse" });
        let (st, _, _) = post_from(&http, &server, "/v1/users", body).await;
        assert_eq!(st, StatusCode::CREATED);
    }
    let body = json!({ "username": "su3", "password": "correct horse" });
    let (st, retry, v) = post_from(&http, &server, "/v1/users", body).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("too_many_signups"))
    );
    assert!(retry.is_some());
}

#[tokio::test]
async fn logins_overtake_a_flood_of_sign_ups() {
    let server = Server::start(&[]);
    let _ = server.user("regular").await;
    let base = server.base.clone();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    const FLOOD: usize = 40;
    let mut flood = Vec::new();
    for i in 0..FLOOD {
        let (base, done) = (base.clone(), done.clone());
        flood.push(tokio::spawn(async move {
            let _ = reqwest::Client::new()
                .post(format!("{base}/v1/users"))
                .json(&json!({ "username": format!("flood{i}"), "password": "correct horse" }))
                .send()
                .await;
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (st, _) = server
        .post(
            "/v1/sessions",
            None,
            json!({ "username": "regular", "password": "correct horse" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let before = done.load(std::sync::atomic::Ordering::SeqCst);
    for f in flood {
        f.await.expect("sign-up");
    }
    assert!(
        before < FLOOD / 2,
        "the login waited behind {before} of {FLOOD} sign-ups queued before it"
    );
}

#[tokio::test]
async fn a_request_by_id_reveals_no_name_until_accepted() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    alice.befriend(&bob).await;
    let (_, list) = alice.req(reqwest::Method::GET, "/v1/friends", None).await;
    assert_eq!(list["friends"][0]["status"], "outgoing");
    assert_eq!(
        list["friends"][0]["username"],
        serde_json::Value::Null,
        "{list}"
    );
    // Bob sees who asked (Alice chose to reveal herself), and accepts.
    let (_, list) = bob.req(reqwest::Method::GET, "/v1/friends", None).await;
    assert_eq!(list["friends"][0]["username"], "alice");
    bob.befriend(&alice).await;
    let (_, list) = alice.req(reqwest::Method::GET, "/v1/friends", None).await;
    assert_eq!(list["friends"][0]["username"], "bob");
}

#[tokio::test]
async fn usernames_fold_case_and_passwords_normalise() {
    let server = Server::start(&[]);
    let nfc = "caf\u{e9} au lait";
    let nfd = "cafe\u{301} au lait";
    let (st, body) = server
        .post(
            "/v1/users",
            None,
            json!({ "username": "Alice", "password": nfc }),
        )
        .await;
    assert_eq!(
        (st, &body["username"]),
        (StatusCode::CREATED, &json!("alice"))
    );
    for look_alike in ["ALICE", "alice", "ａｌｉｃｅ"] {
        let (st, body) = server
            .post(
                "/v1/users",
                None,
                json!({ "username": look_alike, "password": nfc }),
            )
            .await;
        assert_eq!(st, StatusCode::CONFLICT, "{look_alike}: {body}");
    }
    let (st, body) = server
        .post(
            "/v1/users",
            None,
            json!({ "username": "\u{430}lice", "password": nfc }),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "Cyrillic a: {body}");
    let (st, body) = server
        .post(
            "/v1/sessions",
            None,
            json!({ "username": "aLiCe", "password": nfd }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_token_in_the_url_opens_only_websockets() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let (st, body) = server
        .get(&format!("/v1/friends?token={}", alice.token), None)
        .await;
    assert_eq!(
        (st, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let url = format!("{}?token={}", server.ws, alice.token);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    use futures_util::StreamExt;
    let first = ws.next().await.expect("frame").expect("ok");
    assert!(first.to_text().unwrap_or_default().contains("snapshot"));
}

#[tokio::test]
async fn one_user_cannot_flood_through_many_sockets() {
    let server = Server::start(&["--max-sockets-per-user", "3"]);
    let alice = server.user("alice").await;
    let mut socks = Vec::new();
    for _ in 0..3 {
        socks.push(alice.connect(&server).await.0);
    }
    let mut req = server.ws.as_str().into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", alice.token).parse().expect("header"),
    );
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS)
        }
        other => panic!("a fourth socket: {other:?}"),
    }
    // Three sockets, 10 updates each at once: 30, against a shared burst
    // of 20 (each socket alone allows 10).
    for ws in &mut socks {
        for i in 0..10 {
            let (lat, lon) = north_of(SEOUL.0, SEOUL.1, f64::from(i));
            ws.send_location(lat, lon).await;
        }
    }
    let mut limited = 0;
    for ws in &mut socks {
        while let Some(m) = ws.next_message(Duration::from_millis(300)).await {
            if m.to_text()
                .unwrap_or_default()
                .contains("over all your connections")
            {
                limited += 1;
            }
        }
    }
    assert!(limited >= 5, "only {limited} updates refused");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, hist) = alice
        .req(
            reqwest::Method::GET,
            "/v1/me/history?from=0&to=99999999999999",
            None,
        )
        .await;
    let stored = hist["points"].as_array().map_or(0, Vec::len);
    assert!((20..=25).contains(&stored), "{stored} updates stored");
}

#[tokio::test]
async fn contract_refusals_have_json_bodies() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let http = reqwest::Client::new();
    let check = |st: StatusCode, body: &str, want: u16, code: &str| {
        assert_eq!(st.as_u16(), want, "{body}");
        let v: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|_| panic!("{body:?}"));
        assert_eq!(v["code"], code, "{v}");
    };
    for (method, path) in [("PATCH", "/v1/friends"), ("GET", "/v1/users")] {
        let resp = http
            .request(
                method.parse().expect("method"),
                format!("{}{path}", server.base),
            )
            .bearer_auth(&alice.token)
            .send()
            .await
            .expect("send");
        let st = resp.status();
        check(
            st,
            &resp.text().await.expect("body"),
            405,
            "method_not_allowed",
        );
    }
    // A percent-encoding that is not UTF-8 (found by the fuzz target).
    let resp = http
        .put(format!("{}/v1/friends/%AA", server.base))
        .bearer_auth(&alice.token)
        .send()
        .await
        .expect("send");
    let st = resp.status();
    check(st, &resp.text().await.expect("body"), 400, "bad_path");
    let resp = http
        .get(format!("{}/v1/friends/{}", server.base, "9".repeat(10_000)))
        .send()
        .await
        .expect("send");
    let st = resp.status();
    check(st, &resp.text().await.expect("body"), 414, "uri_too_long");
    // Past the HTTP layer's own default of 100 headers too: still our JSON.
    for n in [70, 120, 200, 500] {
        let mut req = http.get(format!("{}/healthz", server.base));
        for i in 0..n {
            req = req.header(format!("x-h{i}"), "v");
        }
        let resp = req.send().await.expect("send");
        let st = resp.status();
        check(
            st,
            &resp.text().await.expect("body"),
            431,
            "headers_too_large",
        );
    }
    for limit in ["-1", "99999999999999999999", "0"] {
        let (st, body) = alice
            .req(
                reqwest::Method::GET,
                &format!("/v1/me/history?limit={limit}"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK, "limit={limit}: {body}");
    }
}

#[tokio::test]
async fn protocol_violations_close_with_their_codes() {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    // An unmasked client frame (RFC 6455 5.1: 1002); a masked text frame
    // that is not UTF-8 (1007).
    let unmasked = vec![0x81u8, 0x02, b'h', b'i'];
    let mut bad_utf8 = vec![0x81u8, 0x82, 0, 0, 0, 0];
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    for (raw, want) in [(unmasked, 1002u16), (bad_utf8, 1007)] {
        let (mut ws, _) = alice.connect(&server).await;
        match ws.stream.get_mut() {
            tokio_tungstenite::MaybeTlsStream::Plain(tcp) => {
                tcp.write_all(&raw).await.expect("raw frame")
            }
            _ => unreachable!("plain TCP"),
        }
        let code = loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.stream.next()).await {
                Ok(Some(Ok(Message::Close(c)))) => break c.map(|c| u16::from(c.code)),
                Ok(Some(Ok(_))) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        };
        assert_eq!(code, Some(want));
    }
}

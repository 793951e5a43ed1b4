//! WebSocket tickets, against the real binary: a browser trades its token
//! for a single-use ticket valid seconds (`POST /v1/ws-ticket`) and opens
//! the socket with `?ticket=`, so the long-lived token never sits in a URL.
//! Embedded and across two nodes over Redis and PostgreSQL.
mod common;

use std::time::Duration;

use common::{Server, TwoNodes, User, Ws};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;

async fn ticket(server: &Server, user: &User) -> String {
    let (st, body) = common::call(
        &reqwest::Client::new(),
        Method::POST,
        &format!("{}/v1/ws-ticket", server.base),
        Some(&user.token),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body["expires_at"].as_i64().is_some(), "{body}");
    body["ticket"].as_str().expect("ticket").to_owned()
}

/// Opens `GET /v1/ws?ticket=…`: the socket and its snapshot, or the
/// refusal's HTTP status.
async fn open(server: &Server, ticket: &str) -> Result<(Ws, Value), StatusCode> {
    let url = format!("{}?ticket={ticket}", server.ws);
    match tokio_tungstenite::connect_async(url).await {
        Ok((stream, _)) => {
            let mut ws = Ws::new(stream);
            let snap = ws.next_json().await;
            assert_eq!(snap["type"], "snapshot", "{snap}");
            Ok((ws, snap))
        }
        Err(tungstenite::Error::Http(resp)) => {
            Err(StatusCode::from_u16(resp.status().as_u16()).expect("status"))
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

#[tokio::test]
async fn a_ticket_opens_one_websocket_once() {
    let server = Server::start(&["--ws-ticket-secs", "1"]);
    tickets(&server, &server).await;
}

#[tokio::test]
async fn a_ticket_from_one_node_opens_a_websocket_on_another_once() {
    let Some(nodes) = TwoNodes::start_with(&["--ws-ticket-secs", "1"]).await else {
        return;
    };
    tickets(&nodes.a, &nodes.b).await;
}

/// Tickets are issued by `one` and used on `two`.
async fn tickets(one: &Server, two: &Server) {
    let alice = one.user("alice").await;
    // Used once: the second try is refused, on either node.
    let t = ticket(one, &alice).await;
    let (mut ws, _) = open(two, &t).await.expect("the ticket opens a socket");
    assert_eq!(open(two, &t).await.err(), Some(StatusCode::UNAUTHORIZED));
    assert_eq!(open(one, &t).await.err(), Some(StatusCode::UNAUTHORIZED));
    // Malformed, unknown, expired: refused.
    for bad in ["nope", &"0".repeat(64)] {
        assert_eq!(open(two, bad).await.err(), Some(StatusCode::UNAUTHORIZED));
    }
    let late = ticket(one, &alice).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(open(two, &late).await.err(), Some(StatusCode::UNAUTHORIZED));
    // Only a token buys a ticket, and only from the header.
    let (st, _) = common::call(
        &reqwest::Client::new(),
        Method::POST,
        &format!("{}/v1/ws-ticket?token={}", one.base, alice.token),
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // The socket is the token's: logging the token out closes it, and a
    // ticket bought before the logout opens nothing after it.
    let spare = ticket(one, &alice).await;
    let (st, _) = alice.req(Method::DELETE, "/v1/sessions", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    ws.expect_error("token_revoked").await;
    assert_eq!(
        open(two, &spare).await.err(),
        Some(StatusCode::UNAUTHORIZED)
    );
    let (st, body) = one.get("/v1/friends", Some(&alice.token)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["code"], json!("unauthorized"));
}

/// Tickets are store writes: one user gets `--ws-tickets-per-min` of them
/// (burst half of it), then `429 too_many_tickets` with a `Retry-After`;
/// another user is not held back.
#[tokio::test]
async fn tickets_per_user_are_limited() {
    let server = Server::start(&["--ws-tickets-per-min", "4"]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    for _ in 0..2 {
        ticket(&server, &alice).await;
    }
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/ws-ticket", server.base))
        .bearer_auth(&alice.token)
        .send()
        .await
        .expect("ticket request");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=15).contains(&retry), "Retry-After {retry}");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["code"], "too_many_tickets", "{body}");
    // Bob's are his own.
    let t = ticket(&server, &bob).await;
    assert!(open(&server, &t).await.is_ok());
}

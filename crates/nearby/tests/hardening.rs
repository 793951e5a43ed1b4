//! Findings of the adversarial review (issue 10), each against the real
//! binary: multi-device views, contract mismatches, limits.
mod common;

use std::time::Duration;

use common::{assert_location, north_of, Server, SEOUL};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn every_socket_of_a_user_sees_what_a_fresh_one_would() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    alice.befriend(&bob).await;
    bob.befriend(&alice).await;
    // Alice's tablet connects before her phone has ever reported.
    let (mut tablet, snap) = alice.connect(&server).await;
    assert_eq!(snap["friends"], json!([]));
    let (mut phone, _) = alice.connect(&server).await;
    let (mut b, _) = bob.connect(&server).await;
    phone.send_location(SEOUL.0, SEOUL.1).await;
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 700.0);
    b.send_location(lat, lon).await;
    assert_location(&phone.next_json().await, &bob.id, 700.0);
    assert_location(&tablet.next_json().await, &bob.id, 700.0);
    // And the REST view agrees.
    let (st, near) = alice.req(reqwest::Method::GET, "/v1/nearby", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(near["friends"][0]["id"], bob.id.as_str());
    // The phone moves 2 km further north: the tablet is told too.
    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 2700.0);
    phone.send_location(lat, lon).await;
    assert_location(&phone.next_json().await, &bob.id, 2000.0);
    assert_location(&tablet.next_json().await, &bob.id, 2000.0);
    tablet.expect_silence(Duration::from_millis(300)).await;
}

//! History the user controls, against the real binary: retention on both
//! stores, and deleting the account (embedded, and two nodes over Redis
//! and PostgreSQL with the friends on the other node).
mod common;

use std::time::Duration;

use common::{assert_left, until_seen, Server, Shared, TwoNodes, User};
use nearby_ports::{HistoryEntry, HistoryStore};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const DAY_MS: i64 = 86_400_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `user`'s history timestamps on `server`, all of it.
async fn history_ts(server: &Server, user: &User) -> Vec<i64> {
    let (st, body) = server.get("/v1/me/history?from=0", Some(&user.token)).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    body["points"]
        .as_array()
        .unwrap_or_else(|| panic!("points: {body}"))
        .iter()
        .map(|p| p["ts"].as_i64().expect("ts"))
        .collect()
}

/// Points of `user` 40 and 10 days old, written straight to `store`.
async fn old_points(store: &dyn HistoryStore, user: &User) -> [i64; 2] {
    let id = nearby_core::UserId(user.id.parse().expect("numeric id"));
    let ts = [now_ms() - 40 * DAY_MS, now_ms() - 10 * DAY_MS];
    let entries: Vec<HistoryEntry> = ts
        .iter()
        .map(|&t| HistoryEntry {
            user: id,
            loc: nearby_core::Location::new(37.5, 127.0, t).expect("point"),
        })
        .collect();
    store.append(&entries).await.expect("append old points");
    ts
}

/// Reports one position and waits until history holds it.
async fn one_new_point(server: &Server, user: &User) -> i64 {
    let (mut ws, _) = user.connect(server).await;
    ws.send_location(37.5665, 126.978).await;
    for _ in 0..50 {
        if let Some(t) = history_ts(server, user).await.into_iter().max() {
            if t > now_ms() - 60_000 {
                return t;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the new point never reached history");
}

/// Polls until `user`'s history on `server` is exactly `want`.
async fn history_becomes(server: &Server, user: &User, want: &[i64]) {
    let mut got = Vec::new();
    for _ in 0..100 {
        got = history_ts(server, user).await;
        if got == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("history is {got:?}, expected {want:?}");
}

#[tokio::test]
async fn retention_deletes_old_history_on_sqlite() {
    let server = Server::start(&[]);
    let alice = server.user("alice").await;
    let new = one_new_point(&server, &alice).await;
    let dir = server.stop_keeping_data();
    let store = nearby_store_sqlite::SqliteHistoryStore::open(&dir.path().join("history.db"))
        .await
        .expect("open history.db");
    let old = old_points(&store, &alice).await;
    drop(store);

    // Kept for a year: all three are there.
    let server = Server::start_in(dir, &["--history-retention-days", "365"]);
    history_becomes(&server, &alice, &[old[0], old[1], new]).await;
    let dir = server.stop_keeping_data();
    // Kept for 30 days (the default): the 40-day-old point goes at start.
    let server = Server::start_in(dir, &[]);
    history_becomes(&server, &alice, &[old[1], new]).await;
    let dir = server.stop_keeping_data();
    // One day: only today's remains.
    let server = Server::start_in(dir, &["--history-retention-days", "1"]);
    history_becomes(&server, &alice, &[new]).await;
}

#[tokio::test]
async fn retention_deletes_old_history_on_postgres() {
    let Some(shared) = Shared::get().await else {
        return;
    };
    let (_, store) = nearby_store_postgres::connect(&shared.db.url, 2)
        .await
        .expect("connect");
    // Day partitions from ten days ago, as a node running then made them.
    store
        .ensure_partitions(now_ms() - 10 * DAY_MS)
        .await
        .expect("partitions");
    let flags = shared.flags(&["--history-retention-days", "365"]);
    let server = Server::start(&flags);
    let alice = server.user("alice").await;
    let new = one_new_point(&server, &alice).await;
    let old = old_points(&store, &alice).await;
    history_becomes(&server, &alice, &[old[0], old[1], new]).await;
    drop(server);
    let flags = shared.flags(&["--history-retention-days", "5"]);
    let server = Server::start(&flags);
    history_becomes(&server, &alice, &[new]).await;
    let (partitions,): (i64,) = sqlx_count(
        &shared.db.url,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'location_history'::regclass",
    )
    .await;
    assert_eq!(partitions, 6, "the old days' partitions were dropped");
}

async fn sqlx_count(url: &str, sql: &str) -> (i64,) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query_as(sql)
        .fetch_one(&mut conn)
        .await
        .expect("query")
}

#[tokio::test]
async fn deleting_your_account_takes_everything_and_tells_your_friends() {
    let server = Server::start(&[]);
    delete_account(&server, &server).await;
}

#[tokio::test]
async fn deleting_your_account_reaches_friends_on_another_node() {
    let Some(nodes) = TwoNodes::start().await else {
        return;
    };
    delete_account(&nodes.a, &nodes.b).await;
}

/// Alice deletes her account on `one`, where her socket is; Bob (a friend)
/// and Carol (who asked her) watch from `two`.
async fn delete_account(one: &Server, two: &Server) {
    let (alice, bob) = one.friends("alice", "bob").await;
    let carol = two.user("carol").await;
    carol.befriend(&alice).await;
    let (mut a, _) = alice.connect(one).await;
    let (mut b, _) = bob.connect(two).await;
    let (mut c, _) = carol.connect(two).await;
    b.send_location(37.5665, 126.978).await;
    until_seen(&mut a, &mut b, &alice.id, Duration::from_secs(5)).await;
    one_new_point(one, &alice).await;

    let delete = |body: Option<Value>| {
        let alice = alice.clone();
        async move { alice.req(Method::DELETE, "/v1/me", body).await }
    };
    // Confirmation is required, and must be hers: nothing happens otherwise.
    let (st, err) = delete(None).await;
    assert_eq!(
        (st, &err["code"]),
        (StatusCode::BAD_REQUEST, &json!("bad_json")),
        "a call without a body needs no Content-Type: {err}"
    );
    let (st, err) = delete(Some(json!({ "password": "correct horse" }))).await;
    assert_eq!(
        (st, &err["code"]),
        (StatusCode::BAD_REQUEST, &json!("bad_json")),
        "{err}"
    );
    let (st, err) = delete(Some(
        json!({ "username": "alice", "password": "wrong horse" }),
    ))
    .await;
    assert_eq!(
        (st, &err["code"]),
        (StatusCode::UNAUTHORIZED, &json!("bad_credentials")),
        "{err}"
    );
    let (st, err) = delete(Some(
        json!({ "username": "bob", "password": "correct horse" }),
    ))
    .await;
    assert_eq!(
        (st, &err["code"]),
        (StatusCode::FORBIDDEN, &json!("not_you")),
        "{err}"
    );
    let (st, list) = one.get("/v1/friends", Some(&alice.token)).await;
    assert_eq!(
        (st, list["friends"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(2))
    );

    let (st, body) = delete(Some(
        json!({ "username": "alice", "password": "correct horse" }),
    ))
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    // Her friend sees her go as unfriended, and both rows go.
    let left = loop {
        let f = b.next_json().await;
        if f["type"] != "friend_location" {
            break f;
        }
    };
    assert_left(&left, &alice.id, "unfriended");
    assert_eq!(
        b.next_account().await,
        json!({ "type": "friend_removed", "id": alice.id })
    );
    assert_eq!(
        c.next_account().await,
        json!({ "type": "friend_removed", "id": alice.id })
    );
    // Her own socket is told and closed.
    let told = loop {
        // (Her other device's report reached this one as self_location.)
        let f = a.next_json().await;
        if !matches!(
            f["type"].as_str(),
            Some("self_location" | "friend_location")
        ) {
            break f;
        }
    };
    assert_eq!(told["code"], "account_deleted", "{told}");
    match a.next_message(Duration::from_secs(5)).await {
        Some(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1008),
        other => panic!("expected a close frame, got {other:?}"),
    }
    // Her token is dead everywhere, nobody lists her, and the name is free.
    for server in [one, two] {
        let (st, _) = server.get("/v1/friends", Some(&alice.token)).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }
    let (_, list) = two.get("/v1/friends", Some(&bob.token)).await;
    assert_eq!(list["friends"], json!([]), "{list}");
    let (_, list) = two.get("/v1/friends", Some(&carol.token)).await;
    assert_eq!(list["friends"], json!([]), "{list}");
    let (st, _) = two.get("/v1/users/by-name/alice", Some(&bob.token)).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let again = one.user("alice").await;
    assert_ne!(again.id, alice.id);
    assert!(
        history_ts(one, &again).await.is_empty(),
        "a new account starts clean"
    );
    let (st, list) = one.get("/v1/friends", Some(&again.token)).await;
    assert_eq!((st, &list["friends"]), (StatusCode::OK, &json!([])));
}

#[tokio::test]
async fn a_deleted_account_leaves_nothing_for_the_next_sign_up() {
    let server = Server::start(&FAST);
    let dir = server.data_dir().join("history.db");
    leaves_nothing(&server, &server, Leftovers::Sqlite(dir)).await;
}

#[tokio::test]
async fn a_deleted_account_leaves_nothing_for_the_next_sign_up_on_two_nodes() {
    let Some(nodes) = TwoNodes::start_with(&FAST).await else {
        return;
    };
    let url = nodes.db.url.clone();
    leaves_nothing(&nodes.a, &nodes.b, Leftovers::Postgres(url)).await;
}

/// Reports as fast as a user may.
const FAST: [&str; 4] = ["--user-updates-per-sec", "100", "--updates-per-sec", "100"];

/// Where to count the points a deleted id still has, behind the API.
enum Leftovers {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Leftovers {
    async fn points_of(&self, id: &str) -> i64 {
        let id: i64 = id.parse().expect("numeric id");
        match self {
            Self::Sqlite(path) => {
                use sqlx::Connection;
                let opts = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .read_only(true);
                let mut conn = sqlx::SqliteConnection::connect_with(&opts)
                    .await
                    .expect("open history.db");
                let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM history WHERE user_id = ?")
                    .bind(id)
                    .fetch_one(&mut conn)
                    .await
                    .expect("count");
                n
            }
            Self::Postgres(url) => {
                sqlx_count(
                    url,
                    &format!("SELECT count(*) FROM location_history WHERE user_id = {id}"),
                )
                .await
                .0
            }
        }
    }
}

/// The rounds: an account reporting right up to its deletion (its
/// socket on `two`, the delete through `one`), then a new sign-up. The new
/// account never gets the old id, and nothing of the old one (history,
/// cached position, relations, discoverability, tokens) ever shows under
/// it; the old id's history is gone when the delete answers on the node
/// that holds the socket, and within the second pass elsewhere.
async fn leaves_nothing(one: &Server, two: &Server, leftovers: Leftovers) {
    let watcher = one.user("watcher").await;
    for round in 0..4 {
        let victim = two.user(&format!("victim{round}")).await;
        victim.befriend(&watcher).await;
        watcher.befriend(&victim).await;
        let (st, body) = victim
            .req(Method::PUT, "/v1/me/discoverable", Some(json!({})))
            .await;
        assert_eq!(st, StatusCode::OK, "{body}");
        let (mut ws, _) = victim.connect(two).await;
        // Reporting until the socket is closed under it.
        let reporter = tokio::spawn(async move {
            for i in 0..u32::MAX {
                let north = 10.0 * f64::from(i % 50);
                let (lat, lon) = common::north_of(37.5665, 126.978, north);
                if futures_util::SinkExt::send(
                    &mut ws.stream,
                    Message::text(
                        json!({ "type": "location", "lat": lat, "lon": lon }).to_string(),
                    ),
                )
                .await
                .is_err()
                {
                    return i;
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            u32::MAX
        });
        // Some points are written before the delete.
        let mut before = Vec::new();
        for _ in 0..50 {
            before = history_ts(two, &victim).await;
            if !before.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!before.is_empty(), "round {round}: no point written");
        let (st, body) = victim
            .req(
                Method::DELETE,
                "/v1/me",
                Some(json!({ "username": victim.name, "password": "correct horse" })),
            )
            .await;
        assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
        if std::ptr::eq(one, two) {
            // One node: complete when it answers, and stays so while the
            // socket still reports until it learns.
            assert_eq!(leftovers.points_of(&victim.id).await, 0, "round {round}");
        }
        let newbie = one.user(&format!("newbie{round}")).await;
        let (old, new): (i64, i64) = (
            victim.id.parse().expect("id"),
            newbie.id.parse().expect("id"),
        );
        assert!(new > old, "round {round}: id {old} given again as {new}");
        let sent = tokio::time::timeout(Duration::from_secs(10), reporter)
            .await
            .expect("the deleted account's socket is closed")
            .expect("reporter");
        assert!(sent > 0);
        // Nothing of the old account under the new one.
        assert!(history_ts(one, &newbie).await.is_empty(), "round {round}");
        let (mut ws, snap) = newbie.connect(one).await;
        assert!(snap["self_location"].is_null(), "round {round}: {snap}");
        assert_eq!(snap["relations"], json!([]), "round {round}: {snap}");
        assert_eq!(snap["discoverable"]["enabled"], false, "{snap}");
        let (_, list) = one.get("/v1/friends", Some(&watcher.token)).await;
        assert!(
            list["friends"].as_array().is_some_and(|f| f
                .iter()
                .all(|f| f["id"] != newbie.id && f["id"] != victim.id)),
            "round {round}: {list}"
        );
        let (st, _) = one.get("/v1/friends", Some(&victim.token)).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        // The old id's points are gone for good (the second pass covers a
        // queue on another node), and the newcomer's own are kept.
        ws.send_location(37.5665, 126.978).await;
        let mut left = -1;
        for _ in 0..100 {
            left = leftovers.points_of(&victim.id).await;
            if left == 0 && history_ts(one, &newbie).await.len() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(left, 0, "round {round}: the deleted id keeps points");
        assert_eq!(history_ts(one, &newbie).await.len(), 1, "round {round}");
    }
}

//! The SQLite stores against the shared adapter contract, on real files.
use nearby_ports::UserStore;
use nearby_store_sqlite::{SqliteHistoryStore, SqliteUserStore};

#[tokio::test]
async fn sqlite_user_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("users.db");
    let store = SqliteUserStore::open(&path).await.expect("open");
    nearby_conformance::user_store(&store, "t1").await;
    // Reopening runs no migration twice and keeps the data.
    drop(store);
    let store = SqliteUserStore::open(&path).await.expect("reopen");
    nearby_conformance::user_store(&store, "t2").await;
    assert_eq!(
        store.purge_expired_tokens(i64::MAX).await.expect("purge"),
        0
    );
}

#[tokio::test]
async fn sqlite_history_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteHistoryStore::open(&dir.path().join("history.db"))
        .await
        .expect("open");
    nearby_conformance::history_store(&store, 0).await;
}

#[tokio::test]
async fn sqlite_bulk_insert_loads_users_tokens_and_friends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteUserStore::open(&dir.path().join("users.db"))
        .await
        .expect("open");
    let (users, ring) = nearby_conformance::bulk_sample("s", 50);
    let ids = store.bulk_insert(&users, &ring).await.expect("bulk");
    nearby_conformance::bulk_loaded(&store, &users, &ring, &ids).await;
    assert!(
        store.bulk_insert(&users[..1], &[]).await.is_err(),
        "names are unique"
    );
}

#[tokio::test]
async fn a_large_bulk_insert_is_read_by_primary_key_and_leaves_checks_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("users.db");
    let store = SqliteUserStore::open(&path).await.expect("open");
    // 60 000 users in a ring: 120 000 edge rows.
    let (users, ring) = nearby_conformance::bulk_sample("big", 60_000);
    let ids = store.bulk_insert(&users, &ring).await.expect("bulk");
    for i in [0usize, 1, 30_000, 59_999] {
        let mut got = store.visible_friends(ids[i]).await.expect("visible");
        got.sort();
        let mut want = vec![ids[(i + 1) % 60_000], ids[(i + 59_999) % 60_000]];
        want.sort();
        assert_eq!(got, want, "friends of #{i}");
    }
    // Sharing is read from the friend's own edge.
    assert!(store
        .set_sharing(ids[1], ids[0], false)
        .await
        .expect("share"));
    assert_eq!(
        store.visible_friends(ids[0]).await.expect("visible"),
        vec![ids[59_999]]
    );
    // The load turned foreign-key checks off on the single writer
    // connection; they are back on: a token for nobody is refused.
    assert!(store
        .create_token(b"orphan", nearby_core::UserId(i64::MAX), i64::MAX)
        .await
        .is_err());
    drop(store);
    let conn = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'friend_edges_reverse'",
    )
    .fetch_one(&conn)
    .await
    .expect("query");
    assert_eq!(n, 0, "the second migration dropped the reverse index");
}

//! The SQLite stores against the shared adapter contract, on real files.
use nearby_ports::{BulkLoad, UserStore};
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
        let visible = store.visible_friends(ids[i], 0).await.expect("visible");
        let mut got: Vec<_> = visible.into_iter().map(|g| g.id).collect();
        got.sort();
        let mut want = vec![ids[(i + 1) % 60_000], ids[(i + 59_999) % 60_000]];
        want.sort();
        assert_eq!(got, want, "friends of #{i}");
    }
    // Sharing is read from the friend's own edge.
    let off = nearby_ports::ShareChange {
        enabled: false,
        until_ms: None,
        precision: None,
    };
    let (before, _) = store.set_sharing(ids[1], ids[0], off).await.expect("share");
    assert!(before.enabled);
    assert_eq!(
        store.visible_friends(ids[0], 0).await.expect("visible"),
        vec![nearby_core::Grant::precise(ids[59_999])]
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

/// A `users.db` written before migration 3 (friend status as text) opens
/// with every relation, its status and its sharing flag intact.
#[tokio::test]
async fn a_database_with_text_statuses_migrates_to_status_codes() {
    use nearby_core::{FriendStatus, UserId};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("users.db");
    {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true);
        let old = sqlx::SqlitePool::connect_with(opts).await.expect("create");
        // The schema as migrations 1 and 2 left it.
        sqlx::raw_sql(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT NOT NULL UNIQUE,
                 password_hash TEXT NOT NULL, created_at INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE tokens (token_hash BLOB PRIMARY KEY,
                 user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                 expires_at INTEGER NOT NULL) WITHOUT ROWID;
             CREATE INDEX tokens_expiry ON tokens(expires_at);
             CREATE TABLE friend_edges (
                 user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                 friend_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                 status TEXT NOT NULL CHECK (status IN ('friends', 'incoming', 'outgoing')),
                 sharing INTEGER NOT NULL DEFAULT 1,
                 PRIMARY KEY (user_id, friend_id)) WITHOUT ROWID;
             INSERT INTO users (id, username, password_hash) VALUES
                 (1, 'ann', 'x'), (2, 'bob', 'x'), (3, 'cy', 'x');
             INSERT INTO friend_edges VALUES
                 (1, 2, 'friends', 1), (2, 1, 'friends', 0),
                 (1, 3, 'outgoing', 1), (3, 1, 'incoming', 1);
             PRAGMA user_version = 2;",
        )
        .execute(&old)
        .await
        .expect("old schema");
        old.close().await;
    }
    let store = SqliteUserStore::open(&path).await.expect("migrate");
    let seen = |user: i64| {
        let store = store.clone();
        async move {
            store
                .friends(UserId(user))
                .await
                .expect("friends")
                .into_iter()
                .map(|f| (f.id.0, f.status, f.sharing.enabled))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        seen(1).await,
        vec![
            (2, FriendStatus::Friends, true),
            (3, FriendStatus::Outgoing, true)
        ]
    );
    assert_eq!(seen(2).await, vec![(1, FriendStatus::Friends, false)]);
    assert_eq!(seen(3).await, vec![(1, FriendStatus::Incoming, true)]);
    // Bob does not share with Ann; Ann shares with Bob.
    assert!(store
        .visible_friends(UserId(1), 0)
        .await
        .expect("v")
        .is_empty());
    assert_eq!(
        store.visible_friends(UserId(2), 0).await.expect("v"),
        vec![nearby_core::Grant::precise(UserId(1))]
    );
    // The migrated table takes new relations: Cy accepts.
    assert_eq!(
        store
            .request_friend(UserId(3), UserId(1))
            .await
            .expect("accept"),
        Some(FriendStatus::Incoming)
    );
    assert_eq!(seen(3).await, vec![(1, FriendStatus::Friends, true)]);
}

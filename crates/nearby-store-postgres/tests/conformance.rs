//! The PostgreSQL stores against the shared adapter contract, on a fresh
//! database of the machine's PostgreSQL.
use nearby_conformance::services::{self, TempDatabase};
use nearby_ports::{BulkLoad, HistoryEntry, HistoryStore, UserStore};

async fn fresh() -> Option<TempDatabase> {
    match TempDatabase::create(&services::postgres_url()).await {
        Ok(db) => Some(db),
        Err(e) => {
            services::missing("PostgreSQL", e);
            None
        }
    }
}

#[tokio::test]
async fn postgres_user_store_conforms() {
    let Some(db) = fresh().await else { return };
    let (users, _) = nearby_store_postgres::connect(&db.url, 4)
        .await
        .expect("connect");
    nearby_conformance::user_store(&users, "t1").await;
    // Connecting again runs no migration twice and keeps the data.
    drop(users);
    let (users, _) = nearby_store_postgres::connect(&db.url, 4)
        .await
        .expect("reconnect");
    nearby_conformance::user_store(&users, "t2").await;
    assert_eq!(
        users.purge_expired_tokens(i64::MAX).await.expect("purge"),
        0
    );
}

#[tokio::test]
async fn postgres_history_store_conforms() {
    let Some(db) = fresh().await else { return };
    let (_, history) = nearby_store_postgres::connect(&db.url, 4)
        .await
        .expect("connect");
    nearby_conformance::history_store(&history, 0).await;
}

#[tokio::test]
async fn history_lands_in_daily_partitions_and_a_batch_is_one_statement() {
    let Some(db) = fresh().await else { return };
    let (_, history) = nearby_store_postgres::connect(&db.url, 4)
        .await
        .expect("connect");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let batch: Vec<HistoryEntry> = (0..5000)
        .map(|i| HistoryEntry {
            user: nearby_core::UserId(i % 7),
            loc: nearby_core::Location {
                point: nearby_core::Point::new(37.0, 127.0).expect("point"),
                ts_ms: now + i,
            },
        })
        .collect();
    history.append(&batch).await.expect("append");
    let got = history
        .range(nearby_core::UserId(3), now, now + 5000, 10_000)
        .await
        .expect("range");
    assert_eq!(got.len(), batch.iter().filter(|e| e.user.0 == 3).count());

    // The rows sit in today's partition, not in the default one.
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("conn");
    let (in_default,): (i64,) = sqlx::query_as("SELECT count(*) FROM location_history_default")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    let (partitions,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'location_history'::regclass",
    )
    .fetch_one(&mut conn)
    .await
    .expect("partitions");
    assert_eq!(in_default, 0);
    assert!(
        partitions >= 5,
        "yesterday..+3 days and default: {partitions}"
    );
}

#[tokio::test]
async fn retention_drops_whole_day_partitions_and_deletes_the_rest_in_batches() {
    const DAY: i64 = 86_400_000;
    let Some(db) = fresh().await else { return };
    let (_, history) = nearby_store_postgres::connect(&db.url, 4)
        .await
        .expect("connect");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    // Partitions around ten days ago (days -11 to -7), as a node running
    // then made them; points in each, and today.
    history
        .ensure_partitions(now - 10 * DAY)
        .await
        .expect("partitions");
    let at = |ts_ms: i64| HistoryEntry {
        user: nearby_core::UserId(1),
        loc: nearby_core::Location {
            point: nearby_core::Point::new(37.0, 127.0).expect("point"),
            ts_ms,
        },
    };
    let old: Vec<HistoryEntry> = (0..5).map(|d| at(now - (11 - d) * DAY)).collect();
    history.append(&old).await.expect("append old");
    // Older than any partition: the default one, deleted row by row.
    history
        .append(&[at(now - 40 * DAY), at(now)])
        .await
        .expect("append");

    let pruned = history.prune(now - 5 * DAY).await.expect("prune");
    assert_eq!(pruned.partitions, 5, "{pruned:?}");
    assert_eq!(pruned.rows, 1, "{pruned:?}");
    let left = history
        .range(nearby_core::UserId(1), 0, i64::MAX, 100)
        .await
        .expect("range");
    assert_eq!(left.iter().map(|l| l.ts_ms).collect::<Vec<_>>(), [now]);
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("conn");
    let (partitions,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'location_history'::regclass",
    )
    .fetch_one(&mut conn)
    .await
    .expect("partitions");
    assert_eq!(partitions, 6, "yesterday..+3 days and default remain");
    // Appending after a prune still works (today's partition is there).
    history.append(&[at(now + 1)]).await.expect("append");
}

#[tokio::test]
async fn postgres_bulk_insert_loads_users_tokens_and_friends() {
    let Some(db) = fresh().await else { return };
    let (users, _) = nearby_store_postgres::connect(&db.url, 4)
        .await
        .expect("connect");
    let (bulk, ring) = nearby_conformance::bulk_sample("p", 50);
    let ids = users.bulk_insert(&bulk, &ring).await.expect("bulk");
    nearby_conformance::bulk_loaded(&users, &bulk, &ring, &ids).await;
    assert!(
        users.bulk_insert(&bulk[..1], &[]).await.is_err(),
        "names are unique"
    );
}

#[tokio::test]
async fn a_large_bulk_insert_copies_edges_and_puts_the_foreign_keys_back() {
    let Some(db) = fresh().await else { return };
    let (users, _) = nearby_store_postgres::connect(&db.url, 4)
        .await
        .expect("connect");
    // 30 000 users in a ring: 60 000 edge rows, past the COPY threshold,
    // with a pair listed twice (written once).
    let (bulk, mut ring) = nearby_conformance::bulk_sample("big", 30_000);
    ring.push((1, 0));
    let ids = users.bulk_insert(&bulk, &ring).await.expect("bulk");
    for i in [0usize, 1, 15_000, 29_999] {
        let visible = users.visible_friends(ids[i], 0).await.expect("visible");
        let mut got: Vec<_> = visible.into_iter().map(|g| g.id).collect();
        got.sort();
        let mut want = vec![ids[(i + 1) % 30_000], ids[(i + 29_999) % 30_000]];
        want.sort();
        assert_eq!(got, want, "friends of #{i}");
    }
    let pool = sqlx::PgPool::connect(&db.url).await.expect("pool");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM friend_edges")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 60_000);
    // Both foreign keys are back, validated, and still cascade.
    let fks: Vec<String> = sqlx::query_scalar(
        "SELECT conname::text FROM pg_constraint
         WHERE conrelid = 'friend_edges'::regclass AND contype = 'f' AND convalidated
         ORDER BY conname",
    )
    .fetch_all(&pool)
    .await
    .expect("constraints");
    assert_eq!(
        fks,
        ["friend_edges_friend_id_fkey", "friend_edges_user_id_fkey"]
    );
    let orphan = sqlx::query("INSERT INTO friend_edges VALUES ($1, $2, 'friends', true)")
        .bind(ids[0].0)
        .bind(i64::MAX)
        .execute(&pool)
        .await;
    assert!(orphan.is_err(), "an edge to nobody is refused");
    sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(ids[0].0)
        .execute(&pool)
        .await
        .expect("delete");
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM friend_edges WHERE user_id = $1 OR friend_id = $1",
    )
    .bind(ids[0].0)
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(left, 0, "deleting a user cascades to their edges");
}

//! Production storage on PostgreSQL, through sqlx: [`PgUserStore`] (users,
//! tokens, friendships, sharing) and [`PgHistoryStore`] (location history),
//! sharing one connection pool.
//!
//! * **Migrations** are numbered scripts applied at connect, inside one
//!   transaction that holds an advisory lock, so several nodes starting at
//!   once migrate exactly once. The applied version is kept in
//!   `nearby_schema`.
//! * **History** is a table partitioned by day on `ts` (Unix ms). The store
//!   creates the partitions for yesterday to a few days ahead at connect and
//!   whenever [`PgHistoryStore::ensure_partitions`] is called (the binary does
//!   so hourly); a default partition catches anything outside them, so an
//!   insert never fails for want of a partition. Old partitions can be
//!   dropped whole (`DROP TABLE location_history_YYYYMMDD`).
//! * **Batches** are one `INSERT … SELECT FROM UNNEST($1, $2, $3, $4)`: four
//!   array parameters, one round trip, whatever the batch size.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod history;
mod users;

use std::time::Duration;

use nearby_ports::StoreError;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub use history::PgHistoryStore;
pub use users::PgUserStore;

/// Key of the advisory lock that serialises migrations across nodes.
const MIGRATION_LOCK: i64 = 0x6e65_6172_6279; // "nearby"

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE users (
    id            BIGSERIAL PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE tokens (
    token_hash BYTEA PRIMARY KEY,
    user_id    BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_at BIGINT NOT NULL
);
CREATE INDEX tokens_expiry ON tokens(expires_at);
-- One directed edge per side of a relation: (user_id, friend_id) holds
-- user_id's view (status) and whether user_id shares with friend_id.
CREATE TABLE friend_edges (
    user_id   BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    friend_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    status    TEXT NOT NULL CHECK (status IN ('friends', 'incoming', 'outgoing')),
    sharing   BOOLEAN NOT NULL DEFAULT TRUE,
    PRIMARY KEY (user_id, friend_id)
);
-- visible_friends(viewer): the edges pointing at the viewer that share.
CREATE INDEX friend_edges_visible ON friend_edges(friend_id) WHERE status = 'friends' AND sharing;
CREATE TABLE location_history (
    user_id BIGINT NOT NULL,
    ts      BIGINT NOT NULL,
    lat     DOUBLE PRECISION NOT NULL,
    lon     DOUBLE PRECISION NOT NULL
) PARTITION BY RANGE (ts);
CREATE INDEX location_history_user_ts ON location_history(user_id, ts);
CREATE TABLE location_history_default PARTITION OF location_history DEFAULT;
"#,
    // Usernames in their canonical (lower-case) form; pairs that differ only by
    // case are left for an operator.
    "UPDATE users SET username = lower(username)
 WHERE username <> lower(username)
   AND id IN (SELECT min(id) FROM users GROUP BY lower(username) HAVING count(*) = 1);",
    // Ghost mode: hidden from every friend while `now < ghost_until`
    // (`GHOST_FOREVER` until turned off); NULL when off.
    "ALTER TABLE users ADD COLUMN ghost_until BIGINT;",
    // Sharing for a while (`share_until`, NULL: until turned off) and only
    // an approximate position (`approximate`), per granting edge.
    "ALTER TABLE friend_edges ADD COLUMN share_until BIGINT;
     ALTER TABLE friend_edges ADD COLUMN approximate BOOLEAN NOT NULL DEFAULT FALSE;",
    // Discoverable by strangers nearby while `now < discoverable_until`
    // (`GHOST_FOREVER` until turned off); NULL (the default) when not.
    "ALTER TABLE users ADD COLUMN discoverable_until BIGINT;",
    // WebSocket tickets: single-use stand-ins for a token in a browser's
    // WebSocket URL; gone with their token.
    "CREATE TABLE ws_tickets (
    ticket_hash BYTEA PRIMARY KEY,
    token_hash  BYTEA NOT NULL REFERENCES tokens(token_hash) ON DELETE CASCADE,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX ws_tickets_token ON ws_tickets(token_hash);",
];

/// Connects to `url` (`postgres://…`), runs pending migrations, and returns
/// both stores on one pool of at most `max_connections`.
pub async fn connect(
    url: &str,
    max_connections: u32,
) -> Result<(PgUserStore, PgHistoryStore), StoreError> {
    let opts: PgConnectOptions = url
        .parse()
        .map_err(|e| StoreError::unavailable(format!("bad database url: {e}")))?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections.max(2))
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(opts)
        .await
        .map_err(backend)?;
    migrate(&pool).await?;
    let history = PgHistoryStore::new(pool.clone());
    history.ensure_partitions(history::now_ms()).await?;
    Ok((PgUserStore::new(pool), history))
}

async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(backend)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS nearby_schema (version INT NOT NULL)")
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    let (version,): (i64,) =
        sqlx::query_as("SELECT COALESCE(MAX(version), 0)::BIGINT FROM nearby_schema")
            .fetch_one(&mut *tx)
            .await
            .map_err(backend)?;
    let done = usize::try_from(version).unwrap_or(0);
    for (i, script) in MIGRATIONS.iter().enumerate().skip(done) {
        sqlx::raw_sql(script)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        sqlx::query("INSERT INTO nearby_schema (version) VALUES ($1)")
            .bind(i32::try_from(i + 1).unwrap_or(i32::MAX))
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        tracing::info!(version = i + 1, "postgres schema migrated");
    }
    tx.commit().await.map_err(backend)
}

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::unavailable(e)
}

async fn ping(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map_err(backend)?;
    Ok(())
}

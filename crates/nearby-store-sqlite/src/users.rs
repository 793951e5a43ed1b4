use std::path::Path;

use async_trait::async_trait;
use nearby_core::{FriendStatus, Grant, Share, UserId};
use nearby_ports::{
    BulkLoad, BulkUser, FriendEntry, ShareChange, StoreError, StoreResult, UserRecord, UserStore,
};
use nearby_store_sql::{entry_of, grant_of, share_of, EdgeTx, EntryRow, ShareRow};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};

/// Rows per statement of [`BulkLoad::bulk_insert`] (at most 3
/// variables each).
const BULK_ROWS: usize = 8000;

use crate::{backend, Pools};

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL DEFAULT (unixepoch() * 1000)
);
CREATE TABLE tokens (
    token_hash BLOB PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX tokens_expiry ON tokens(expires_at);
-- One directed edge per side of a relation: (user_id, friend_id) holds
-- user_id's view (status) and whether user_id shares with friend_id.
CREATE TABLE friend_edges (
    user_id   INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    friend_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    status    TEXT NOT NULL CHECK (status IN ('friends', 'incoming', 'outgoing')),
    sharing   INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (user_id, friend_id)
) WITHOUT ROWID;
CREATE INDEX friend_edges_reverse ON friend_edges(friend_id, status, sharing);
"#,
    // Who shares with a viewer is read through the primary key of the reverse
    // edges (see `visible_friends`); the index cost a third of the file and of
    // every edge write, and half of a bulk load's time. No user is ever deleted,
    // so the cascade on friend_id never needs it.
    "DROP INDEX friend_edges_reverse;",
    // The status as a small integer (see `status_code`): SQLite stores 0 and
    // 1 in the record header alone, so an edge row shrinks from about 20
    // bytes to 12, and a bulk load of 40 M rows writes a third less.
    r#"
CREATE TABLE friend_edges_v3 (
    user_id   INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    friend_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    status    INTEGER NOT NULL CHECK (status IN (0, 1, 2)),
    sharing   INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (user_id, friend_id)
) WITHOUT ROWID;
INSERT INTO friend_edges_v3 (user_id, friend_id, status, sharing)
    SELECT user_id, friend_id,
           CASE status WHEN 'friends' THEN 0 WHEN 'incoming' THEN 1 ELSE 2 END,
           sharing
    FROM friend_edges ORDER BY user_id, friend_id;
DROP TABLE friend_edges;
ALTER TABLE friend_edges_v3 RENAME TO friend_edges;
"#,
    // Usernames are stored in their canonical form (lower case; see
    // `nearby_core::account::canonical_username`). Names from before are
    // lowered unless two of them differ only by case: those are left for an
    // operator (the lower-case one, if any, keeps the name).
    "UPDATE users SET username = lower(username)
 WHERE username <> lower(username)
   AND id IN (SELECT min(id) FROM users GROUP BY lower(username) HAVING count(*) = 1);",
    // Ghost mode: hidden from every friend while `now < ghost_until`
    // (`GHOST_FOREVER` until turned off); NULL when off.
    "ALTER TABLE users ADD COLUMN ghost_until INTEGER;",
    // Sharing for a while (`share_until`, NULL: until turned off) and only
    // an approximate position (`approximate`), per granting edge.
    "ALTER TABLE friend_edges ADD COLUMN share_until INTEGER;
     ALTER TABLE friend_edges ADD COLUMN approximate INTEGER NOT NULL DEFAULT 0;",
    // Discoverable by strangers nearby while `now < discoverable_until`
    // (`GHOST_FOREVER` until turned off); NULL (the default) when not.
    "ALTER TABLE users ADD COLUMN discoverable_until INTEGER;",
    // WebSocket tickets: single-use stand-ins for a token in a browser's
    // WebSocket URL; gone with their token.
    "CREATE TABLE ws_tickets (
    ticket_hash BLOB PRIMARY KEY,
    token_hash  BLOB NOT NULL REFERENCES tokens(token_hash) ON DELETE CASCADE,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX ws_tickets_token ON ws_tickets(token_hash);",
    // Ids are never reused: a plain `INTEGER PRIMARY KEY` hands a deleted
    // account's id (when it was the highest) to the next sign-up, and with
    // it whatever of the old account still pointed at the id (history
    // points written after the delete, stranger aliases). AUTOINCREMENT
    // keeps the highest id ever given in `sqlite_sequence`. Rebuilt with
    // foreign keys off (SQLite's own procedure for a changed table), so
    // dropping the old table cascades nothing.
    r#"-- foreign keys off
CREATE TABLE users_v10 (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    username           TEXT NOT NULL UNIQUE,
    password_hash      TEXT NOT NULL,
    created_at         INTEGER NOT NULL DEFAULT (unixepoch() * 1000),
    ghost_until        INTEGER,
    discoverable_until INTEGER
);
INSERT INTO users_v10 (id, username, password_hash, created_at, ghost_until, discoverable_until)
    SELECT id, username, password_hash, created_at, ghost_until, discoverable_until
    FROM users ORDER BY id;
DROP TABLE users;
ALTER TABLE users_v10 RENAME TO users;
"#,
];

/// `friend_edges.status` of a mutual friendship (migration 3), spelled as
/// `0` in the SQL below.
const FRIENDS: i64 = 0;

/// `friend_edges.status` of a relation (migration 3).
fn status_code(status: FriendStatus) -> i64 {
    match status {
        FriendStatus::Friends => FRIENDS,
        FriendStatus::Incoming => 1,
        FriendStatus::Outgoing => 2,
    }
}

/// The relation of a `friend_edges.status` value.
fn status_of(code: i64) -> StoreResult<FriendStatus> {
    match code {
        FRIENDS => Ok(FriendStatus::Friends),
        1 => Ok(FriendStatus::Incoming),
        2 => Ok(FriendStatus::Outgoing),
        other => Err(StoreError::Invalid(format!("bad friend status {other}"))),
    }
}

/// Users, tokens, friendships and sharing permissions in a SQLite file.
#[derive(Clone)]
pub struct SqliteUserStore {
    db: Pools,
}

impl SqliteUserStore {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        Ok(Self {
            db: Pools::open(path, MIGRATIONS).await?,
        })
    }
}

/// A hundred thousand rows a second, in one transaction.
#[async_trait]
impl BulkLoad for SqliteUserStore {
    async fn bulk_insert(
        &self,
        users: &[BulkUser],
        friendships: &[(u32, u32)],
    ) -> StoreResult<Vec<UserId>> {
        // A connection of its own, with foreign-key checks off for the
        // load: every edge names two users inserted just before (checked
        // below), and the checks were two B-tree lookups per edge row.
        let mut conn = self.db.writer.acquire().await.map_err(backend)?;
        sqlx::query("PRAGMA foreign_keys = OFF")
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        let loaded = bulk_load(&mut conn, users, friendships).await;
        let restored = sqlx::query("PRAGMA foreign_keys = ON")
            .execute(&mut *conn)
            .await;
        if restored.is_err() {
            // Never hand a connection without the checks back to the pool.
            conn.close_on_drop();
        }
        let ids = loaded?;
        restored.map_err(backend)?;
        Ok(ids)
    }
}

/// The body of [`BulkLoad::bulk_insert`] for SQLite, in one transaction on `conn`.
async fn bulk_load(
    conn: &mut sqlx::SqliteConnection,
    users: &[BulkUser],
    friendships: &[(u32, u32)],
) -> StoreResult<Vec<UserId>> {
    use sqlx::Connection;
    let mut tx = conn.begin().await.map_err(backend)?;
    let mut ids = Vec::with_capacity(users.len());
    // Multi-row statements, well under SQLite's 32 766 variables each.
    for chunk in users.chunks(BULK_ROWS) {
        let mut q = QueryBuilder::<Sqlite>::new("INSERT INTO users (username, password_hash) ");
        q.push_values(chunk, |mut row, u| {
            row.push_bind(&u.username).push_bind(&u.password_hash);
        });
        q.push(" RETURNING id, username");
        let rows = q.build().fetch_all(&mut *tx).await.map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                StoreError::Conflict("a username is taken".into())
            }
            e => backend(e),
        })?;
        let returned = rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<Vec<(i64, String)>, sqlx::Error>>()
            .map_err(backend)?;
        ids.extend(nearby_store_sql::ids_in_order(chunk, returned)?);
    }
    let with_ids: Vec<(&BulkUser, UserId)> = users.iter().zip(ids.iter().copied()).collect();
    for chunk in with_ids.chunks(BULK_ROWS) {
        let mut q =
            QueryBuilder::<Sqlite>::new("INSERT INTO tokens (token_hash, user_id, expires_at) ");
        q.push_values(chunk, |mut row, (u, id)| {
            row.push_bind(&u.token_hash[..])
                .push_bind(id.0)
                .push_bind(u.token_expires_at_ms);
        });
        q.build().execute(&mut *tx).await.map_err(backend)?;
    }
    let edges = nearby_store_sql::mutual_edges(&ids, friendships)?;
    for chunk in edges.chunks(BULK_ROWS) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT OR IGNORE INTO friend_edges (user_id, friend_id, status) ",
        );
        q.push_values(chunk, |mut row, (from, to)| {
            row.push_bind(from.0).push_bind(to.0).push(FRIENDS);
        });
        q.build().execute(&mut *tx).await.map_err(backend)?;
    }
    tx.commit().await.map_err(backend)?;
    Ok(ids)
}

/// The friend graph's statements in one SQLite transaction. The database
/// has one writer, so the pair needs no lock.
struct Tx<'a>(Transaction<'a, Sqlite>);

#[async_trait]
impl EdgeTx for Tx<'_> {
    async fn lock_pair(&mut self, a: UserId, b: UserId) -> StoreResult<usize> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE id IN (?, ?)")
            .bind(a.0)
            .bind(b.0)
            .fetch_one(&mut *self.0)
            .await
            .map_err(backend)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    async fn edge_status(&mut self, from: UserId, to: UserId) -> StoreResult<Option<FriendStatus>> {
        let code: Option<i64> = sqlx::query_scalar(
            "SELECT status FROM friend_edges WHERE user_id = ? AND friend_id = ?",
        )
        .bind(from.0)
        .bind(to.0)
        .fetch_optional(&mut *self.0)
        .await
        .map_err(backend)?;
        code.map(status_of).transpose()
    }

    async fn set_edge(
        &mut self,
        from: UserId,
        to: UserId,
        status: FriendStatus,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO friend_edges (user_id, friend_id, status) VALUES (?, ?, ?)
             ON CONFLICT (user_id, friend_id) DO UPDATE SET status = excluded.status",
        )
        .bind(from.0)
        .bind(to.0)
        .bind(status_code(status))
        .execute(&mut *self.0)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn delete_pair(&mut self, a: UserId, b: UserId) -> StoreResult<()> {
        sqlx::query(
            "DELETE FROM friend_edges WHERE (user_id = ?1 AND friend_id = ?2) OR (user_id = ?2 AND friend_id = ?1)",
        )
        .bind(a.0)
        .bind(b.0)
        .execute(&mut *self.0)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn sharing(&mut self, from: UserId, to: UserId) -> StoreResult<Option<Share>> {
        let row: Option<ShareRow> = sqlx::query_as(
            "SELECT sharing, share_until, approximate FROM friend_edges
             WHERE user_id = ? AND friend_id = ? AND status = 0",
        )
        .bind(from.0)
        .bind(to.0)
        .fetch_optional(&mut *self.0)
        .await
        .map_err(backend)?;
        Ok(row.map(share_of))
    }

    async fn set_sharing(&mut self, from: UserId, to: UserId, share: Share) -> StoreResult<()> {
        sqlx::query(
            "UPDATE friend_edges SET sharing = ?, share_until = ?, approximate = ?
             WHERE user_id = ? AND friend_id = ?",
        )
        .bind(share.enabled)
        .bind(share.until_ms)
        .bind(share.precision == nearby_core::Precision::Approximate)
        .bind(from.0)
        .bind(to.0)
        .execute(&mut *self.0)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn execute_for(&mut self, sql: &str, user: UserId) -> StoreResult<u64> {
        let done = sqlx::query(sql)
            .bind(user.0)
            .execute(&mut *self.0)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected())
    }

    async fn ids_for(&mut self, sql: &str, user: UserId) -> StoreResult<Vec<UserId>> {
        let ids: Vec<i64> = sqlx::query_scalar(sql)
            .bind(user.0)
            .fetch_all(&mut *self.0)
            .await
            .map_err(backend)?;
        Ok(ids.into_iter().map(UserId).collect())
    }
}

impl SqliteUserStore {
    async fn begin(&self) -> StoreResult<Tx<'static>> {
        Ok(Tx(self.db.writer.begin().await.map_err(backend)?))
    }
}

#[async_trait]
impl UserStore for SqliteUserStore {
    async fn create_user(&self, username: &str, password_hash: &str) -> StoreResult<UserId> {
        let res = sqlx::query("INSERT INTO users (username, password_hash) VALUES (?, ?)")
            .bind(username)
            .bind(password_hash)
            .execute(&self.db.writer)
            .await;
        match res {
            Ok(done) => Ok(UserId(done.last_insert_rowid())),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict(
                format!("username {username:?} is taken"),
            )),
            Err(e) => Err(backend(e)),
        }
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserRecord>> {
        let row = sqlx::query("SELECT id, username, password_hash FROM users WHERE username = ?")
            .bind(username)
            .fetch_optional(&self.db.reader)
            .await
            .map_err(backend)?;
        row.map(|r| {
            Ok(UserRecord {
                id: UserId(r.try_get(0).map_err(backend)?),
                username: r.try_get(1).map_err(backend)?,
                password_hash: r.try_get(2).map_err(backend)?,
            })
        })
        .transpose()
    }

    async fn user_exists(&self, id: UserId) -> StoreResult<bool> {
        let row = sqlx::query("SELECT 1 FROM users WHERE id = ?")
            .bind(id.0)
            .fetch_optional(&self.db.reader)
            .await
            .map_err(backend)?;
        Ok(row.is_some())
    }

    async fn create_token(
        &self,
        token_hash: &[u8],
        user: UserId,
        expires_at_ms: i64,
    ) -> StoreResult<()> {
        sqlx::query("INSERT INTO tokens (token_hash, user_id, expires_at) VALUES (?, ?, ?)")
            .bind(token_hash)
            .bind(user.0)
            .bind(expires_at_ms)
            .execute(&self.db.writer)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn token_user(
        &self,
        token_hash: &[u8],
        now_ms: i64,
    ) -> StoreResult<Option<(UserId, i64)>> {
        let row = sqlx::query(
            "SELECT user_id, expires_at FROM tokens WHERE token_hash = ? AND expires_at > ?",
        )
        .bind(token_hash)
        .bind(now_ms)
        .fetch_optional(&self.db.reader)
        .await
        .map_err(backend)?;
        row.map(|r| {
            Ok((
                UserId(r.try_get(0).map_err(backend)?),
                r.try_get(1).map_err(backend)?,
            ))
        })
        .transpose()
    }

    async fn purge_expired_tokens(&self, now_ms: i64) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM tokens WHERE expires_at <= ?")
            .bind(now_ms)
            .execute(&self.db.writer)
            .await
            .map_err(backend)?;
        let tickets = sqlx::query("DELETE FROM ws_tickets WHERE expires_at <= ?")
            .bind(now_ms)
            .execute(&self.db.writer)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() + tickets.rows_affected())
    }

    async fn create_ticket(
        &self,
        ticket_hash: &[u8],
        token_hash: &[u8],
        expires_at: i64,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO ws_tickets (ticket_hash, token_hash, expires_at) VALUES (?, ?, ?)",
        )
        .bind(ticket_hash)
        .bind(token_hash)
        .bind(expires_at)
        .execute(&self.db.writer)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn take_ticket(&self, ticket_hash: &[u8], now_ms: i64) -> StoreResult<Option<Vec<u8>>> {
        sqlx::query_scalar(
            "DELETE FROM ws_tickets WHERE ticket_hash = ? AND expires_at > ? RETURNING token_hash",
        )
        .bind(ticket_hash)
        .bind(now_ms)
        .fetch_optional(&self.db.writer)
        .await
        .map_err(backend)
    }

    async fn delete_token(&self, token_hash: &[u8]) -> StoreResult<()> {
        sqlx::query("DELETE FROM tokens WHERE token_hash = ?")
            .bind(token_hash)
            .execute(&self.db.writer)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn request_friend(&self, from: UserId, to: UserId) -> StoreResult<Option<FriendStatus>> {
        let mut tx = self.begin().await?;
        let before = nearby_store_sql::request_friend(&mut tx, from, to).await?;
        tx.0.commit().await.map_err(backend)?;
        Ok(before)
    }

    async fn remove_friend(&self, a: UserId, b: UserId) -> StoreResult<Option<FriendStatus>> {
        let mut tx = self.begin().await?;
        let before = nearby_store_sql::remove_friend(&mut tx, a, b).await?;
        tx.0.commit().await.map_err(backend)?;
        Ok(before)
    }

    async fn set_sharing(
        &self,
        from: UserId,
        to: UserId,
        change: ShareChange,
    ) -> StoreResult<(Share, Share)> {
        let mut tx = self.begin().await?;
        let done = nearby_store_sql::set_sharing(&mut tx, from, to, change).await?;
        tx.0.commit().await.map_err(backend)?;
        Ok(done)
    }

    async fn friends(&self, user: UserId) -> StoreResult<Vec<FriendEntry>> {
        let rows: Vec<EntryRow<i64>> = sqlx::query_as(
            "SELECT e.friend_id, u.username, e.status, e.sharing, e.share_until, e.approximate,
                    e.status = 0 AND coalesce(r.status = 0 AND r.sharing = 1, 0),
                    CASE WHEN e.status = 0 THEN r.share_until END,
                    coalesce(r.approximate, 0)
             FROM friend_edges e JOIN users u ON u.id = e.friend_id
             LEFT JOIN friend_edges r ON r.user_id = e.friend_id AND r.friend_id = e.user_id
             WHERE e.user_id = ? ORDER BY u.username",
        )
        .bind(user.0)
        .fetch_all(&self.db.reader)
        .await
        .map_err(backend)?;
        rows.into_iter().map(|r| entry_of(r, status_of)).collect()
    }

    async fn visible_friends(&self, viewer: UserId, now_ms: i64) -> StoreResult<Vec<Grant>> {
        let rows: Vec<(i64, Option<i64>, bool)> = sqlx::query_as(
            // The viewer's friends whose own edge back shares (and has not
            // ended) and who are not in ghost mode: all three by primary key.
            "SELECT e.friend_id, r.share_until, r.approximate FROM friend_edges e
             JOIN friend_edges r ON r.user_id = e.friend_id AND r.friend_id = e.user_id
             JOIN users u ON u.id = e.friend_id
             WHERE e.user_id = ?1 AND e.status = 0 AND r.status = 0 AND r.sharing = 1
               AND (r.share_until IS NULL OR r.share_until > ?2)
               AND (u.ghost_until IS NULL OR u.ghost_until <= ?2)",
        )
        .bind(viewer.0)
        .bind(now_ms)
        .fetch_all(&self.db.reader)
        .await
        .map_err(backend)?;
        Ok(rows.into_iter().map(grant_of).collect())
    }
    async fn set_ghost(&self, user: UserId, until_ms: Option<i64>) -> StoreResult<()> {
        let done = sqlx::query("UPDATE users SET ghost_until = ? WHERE id = ?")
            .bind(until_ms)
            .bind(user.0)
            .execute(&self.db.writer)
            .await
            .map_err(backend)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("user {user}")));
        }
        Ok(())
    }

    async fn delete_user(&self, user: UserId) -> StoreResult<Vec<UserId>> {
        let mut tx = self.begin().await?;
        let others = nearby_store_sql::delete_user(&mut tx, user).await?;
        tx.0.commit().await.map_err(backend)?;
        Ok(others)
    }

    async fn ghost_until(&self, user: UserId, now_ms: i64) -> StoreResult<Option<i64>> {
        let until: Option<Option<i64>> =
            sqlx::query_scalar("SELECT ghost_until FROM users WHERE id = ?")
                .bind(user.0)
                .fetch_optional(&self.db.reader)
                .await
                .map_err(backend)?;
        Ok(until.flatten().filter(|u| *u > now_ms))
    }

    async fn set_discoverable(&self, user: UserId, until_ms: Option<i64>) -> StoreResult<()> {
        let done = sqlx::query("UPDATE users SET discoverable_until = ? WHERE id = ?")
            .bind(until_ms)
            .bind(user.0)
            .execute(&self.db.writer)
            .await
            .map_err(backend)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("user {user}")));
        }
        Ok(())
    }

    async fn discoverable_until(&self, user: UserId, now_ms: i64) -> StoreResult<Option<i64>> {
        let until: Option<Option<i64>> =
            sqlx::query_scalar("SELECT discoverable_until FROM users WHERE id = ?")
                .bind(user.0)
                .fetch_optional(&self.db.reader)
                .await
                .map_err(backend)?;
        Ok(until.flatten().filter(|u| *u > now_ms))
    }

    async fn discoverable_among(&self, users: &[UserId], now_ms: i64) -> StoreResult<Vec<UserId>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        // The ids as one JSON array: one statement whatever their number.
        let ids = format!(
            "[{}]",
            users
                .iter()
                .map(|u| u.0.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let rows: Vec<i64> = sqlx::query_scalar(
            "SELECT u.id FROM json_each(?1) j JOIN users u ON u.id = j.value
             WHERE u.discoverable_until > ?2",
        )
        .bind(ids)
        .bind(now_ms)
        .fetch_all(&self.db.reader)
        .await
        .map_err(backend)?;
        Ok(rows.into_iter().map(UserId).collect())
    }
}

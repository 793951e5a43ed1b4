use async_trait::async_trait;
use nearby_core::{FriendStatus, Grant, Precision, Share, UserId};
use nearby_ports::{
    BulkLoad, BulkUser, FriendEntry, ShareChange, StoreError, StoreResult, UserRecord, UserStore,
};
use nearby_store_sql::{entry_of, grant_of, share_of, EdgeTx, EntryRow, ShareRow};
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Row, Transaction};

use crate::backend;

/// Users, tokens, friendships and sharing permissions in PostgreSQL.
#[derive(Clone)]
pub struct PgUserStore {
    pool: PgPool,
}

impl PgUserStore {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

/// Edge rows from which a bulk load uses `COPY` with the foreign keys
/// checked once at the end, instead of array inserts checked row by row.
const COPY_FROM_ROWS: usize = 50_000;

/// Bytes of `COPY` data sent per message.
const COPY_CHUNK: usize = 1 << 20;

/// Users and tokens by array parameters; friendships by `COPY`. A large
/// load (at least [`COPY_FROM_ROWS`] edge rows) drops `friend_edges`'
/// foreign keys for the transaction and adds them back at its end, which
/// checks every row in one join instead of two trigger lookups per row
/// (half of the old insert's time, by `EXPLAIN ANALYZE`). That holds an
/// exclusive lock on `friend_edges` until the commit: a running server's
/// friend queries wait for the load.
#[async_trait]
impl BulkLoad for PgUserStore {
    async fn bulk_insert(
        &self,
        users: &[BulkUser],
        friendships: &[(u32, u32)],
    ) -> StoreResult<Vec<UserId>> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let names: Vec<&str> = users.iter().map(|u| u.username.as_str()).collect();
        let hashes: Vec<&str> = users.iter().map(|u| u.password_hash.as_str()).collect();
        let rows = sqlx::query(
            "INSERT INTO users (username, password_hash)
             SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[])
             RETURNING id, username",
        )
        .bind(&names)
        .bind(&hashes)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| match e {
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
        let user_ids = nearby_store_sql::ids_in_order(users, returned)?;
        let ids: Vec<i64> = user_ids.iter().map(|u| u.0).collect();
        let token_hashes: Vec<Vec<u8>> = users.iter().map(|u| u.token_hash.to_vec()).collect();
        let expiries: Vec<i64> = users.iter().map(|u| u.token_expires_at_ms).collect();
        sqlx::query(
            "INSERT INTO tokens (token_hash, user_id, expires_at)
             SELECT * FROM UNNEST($1::BYTEA[], $2::BIGINT[], $3::BIGINT[])",
        )
        .bind(&token_hashes)
        .bind(&ids)
        .bind(&expiries)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        // COPY has no ON CONFLICT: the edges come deduplicated.
        let edges = nearby_store_sql::mutual_edges(&user_ids, friendships)?;
        let large = edges.len() >= COPY_FROM_ROWS;
        if large {
            sqlx::query(
                "ALTER TABLE friend_edges
                   DROP CONSTRAINT friend_edges_user_id_fkey,
                   DROP CONSTRAINT friend_edges_friend_id_fkey",
            )
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        let mut copy = tx
            .copy_in_raw("COPY friend_edges (user_id, friend_id, status) FROM STDIN")
            .await
            .map_err(backend)?;
        let mut buf = String::with_capacity(COPY_CHUNK + 64);
        for (a, b) in &edges {
            use std::fmt::Write as _;
            let _ = writeln!(buf, "{}\t{}\tfriends", a.0, b.0);
            if buf.len() >= COPY_CHUNK {
                copy.send(buf.as_bytes()).await.map_err(backend)?;
                buf.clear();
            }
        }
        if !buf.is_empty() {
            copy.send(buf.as_bytes()).await.map_err(backend)?;
        }
        copy.finish().await.map_err(backend)?;
        if large {
            sqlx::query(
                "ALTER TABLE friend_edges
                   ADD CONSTRAINT friend_edges_user_id_fkey
                     FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE,
                   ADD CONSTRAINT friend_edges_friend_id_fkey
                     FOREIGN KEY (friend_id) REFERENCES users(id) ON DELETE CASCADE",
            )
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(user_ids)
    }
}

/// The friend graph's statements in one PostgreSQL transaction.
struct Tx<'a>(Transaction<'a, Postgres>);

#[async_trait]
impl EdgeTx for Tx<'_> {
    /// Locks both users' rows, in id order: two requests crossing between
    /// the same pair (A asks B while B asks A) then apply one after the
    /// other instead of both seeing "no relation".
    async fn lock_pair(&mut self, a: UserId, b: UserId) -> StoreResult<usize> {
        let rows = sqlx::query("SELECT id FROM users WHERE id IN ($1, $2) ORDER BY id FOR UPDATE")
            .bind(a.0)
            .bind(b.0)
            .fetch_all(&mut *self.0)
            .await
            .map_err(backend)?;
        Ok(rows.len())
    }

    async fn edge_status(&mut self, from: UserId, to: UserId) -> StoreResult<Option<FriendStatus>> {
        let s: Option<String> = sqlx::query_scalar(
            "SELECT status FROM friend_edges WHERE user_id = $1 AND friend_id = $2",
        )
        .bind(from.0)
        .bind(to.0)
        .fetch_optional(&mut *self.0)
        .await
        .map_err(backend)?;
        s.map(|s| parse_status(&s)).transpose()
    }

    async fn set_edge(
        &mut self,
        from: UserId,
        to: UserId,
        status: FriendStatus,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO friend_edges (user_id, friend_id, status) VALUES ($1, $2, $3)
             ON CONFLICT (user_id, friend_id) DO UPDATE SET status = excluded.status",
        )
        .bind(from.0)
        .bind(to.0)
        .bind(status.as_str())
        .execute(&mut *self.0)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn delete_pair(&mut self, a: UserId, b: UserId) -> StoreResult<()> {
        sqlx::query(
            "DELETE FROM friend_edges WHERE (user_id = $1 AND friend_id = $2) OR (user_id = $2 AND friend_id = $1)",
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
             WHERE user_id = $1 AND friend_id = $2 AND status = 'friends'",
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
            "UPDATE friend_edges SET sharing = $1, share_until = $2, approximate = $3
             WHERE user_id = $4 AND friend_id = $5",
        )
        .bind(share.enabled)
        .bind(share.until_ms)
        .bind(share.precision == Precision::Approximate)
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

/// A `friend_edges.status` value.
fn parse_status(s: &str) -> StoreResult<FriendStatus> {
    FriendStatus::parse(s).ok_or_else(|| StoreError::Invalid(format!("bad status {s:?}")))
}

impl PgUserStore {
    async fn begin(&self) -> StoreResult<Tx<'static>> {
        Ok(Tx(self.pool.begin().await.map_err(backend)?))
    }
}

#[async_trait]
impl UserStore for PgUserStore {
    async fn create_user(&self, username: &str, password_hash: &str) -> StoreResult<UserId> {
        let res =
            sqlx::query("INSERT INTO users (username, password_hash) VALUES ($1, $2) RETURNING id")
                .bind(username)
                .bind(password_hash)
                .fetch_one(&self.pool)
                .await;
        match res {
            Ok(row) => Ok(UserId(row.try_get(0).map_err(backend)?)),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict(
                format!("username {username:?} is taken"),
            )),
            Err(e) => Err(backend(e)),
        }
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserRecord>> {
        let row = sqlx::query("SELECT id, username, password_hash FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(&self.pool)
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
        let row = sqlx::query("SELECT 1 FROM users WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
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
        sqlx::query("INSERT INTO tokens (token_hash, user_id, expires_at) VALUES ($1, $2, $3)")
            .bind(token_hash)
            .bind(user.0)
            .bind(expires_at_ms)
            .execute(&self.pool)
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
            "SELECT user_id, expires_at FROM tokens WHERE token_hash = $1 AND expires_at > $2",
        )
        .bind(token_hash)
        .bind(now_ms)
        .fetch_optional(&self.pool)
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
        let done = sqlx::query("DELETE FROM tokens WHERE expires_at <= $1")
            .bind(now_ms)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        let tickets = sqlx::query("DELETE FROM ws_tickets WHERE expires_at <= $1")
            .bind(now_ms)
            .execute(&self.pool)
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
            "INSERT INTO ws_tickets (ticket_hash, token_hash, expires_at) VALUES ($1, $2, $3)",
        )
        .bind(ticket_hash)
        .bind(token_hash)
        .bind(expires_at)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn take_ticket(&self, ticket_hash: &[u8], now_ms: i64) -> StoreResult<Option<Vec<u8>>> {
        sqlx::query_scalar(
            "DELETE FROM ws_tickets WHERE ticket_hash = $1 AND expires_at > $2 RETURNING token_hash",
        )
        .bind(ticket_hash)
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)
    }

    async fn delete_token(&self, token_hash: &[u8]) -> StoreResult<()> {
        sqlx::query("DELETE FROM tokens WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.pool)
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
        let rows: Vec<EntryRow<String>> = sqlx::query_as(
            "SELECT e.friend_id, u.username, e.status, e.sharing, e.share_until, e.approximate,
                    e.status = 'friends' AND coalesce(r.status = 'friends' AND r.sharing, false),
                    CASE WHEN e.status = 'friends' THEN r.share_until END,
                    coalesce(r.approximate, false)
             FROM friend_edges e JOIN users u ON u.id = e.friend_id
             LEFT JOIN friend_edges r ON r.user_id = e.friend_id AND r.friend_id = e.user_id
             WHERE e.user_id = $1 ORDER BY u.username COLLATE \"C\"",
        )
        .bind(user.0)
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.into_iter()
            .map(|r| entry_of(r, |code| parse_status(&code)))
            .collect()
    }

    async fn visible_friends(&self, viewer: UserId, now_ms: i64) -> StoreResult<Vec<Grant>> {
        let rows: Vec<(i64, Option<i64>, bool)> = sqlx::query_as(
            "SELECT e.user_id, e.share_until, e.approximate
             FROM friend_edges e JOIN users u ON u.id = e.user_id
             WHERE e.friend_id = $1 AND e.status = 'friends' AND e.sharing
               AND (e.share_until IS NULL OR e.share_until > $2)
               AND (u.ghost_until IS NULL OR u.ghost_until <= $2)",
        )
        .bind(viewer.0)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        Ok(rows.into_iter().map(grant_of).collect())
    }

    async fn set_ghost(&self, user: UserId, until_ms: Option<i64>) -> StoreResult<()> {
        let done = sqlx::query("UPDATE users SET ghost_until = $1 WHERE id = $2")
            .bind(until_ms)
            .bind(user.0)
            .execute(&self.pool)
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
            sqlx::query_scalar("SELECT ghost_until FROM users WHERE id = $1")
                .bind(user.0)
                .fetch_optional(&self.pool)
                .await
                .map_err(backend)?;
        Ok(until.flatten().filter(|u| *u > now_ms))
    }

    async fn set_discoverable(&self, user: UserId, until_ms: Option<i64>) -> StoreResult<()> {
        let done = sqlx::query("UPDATE users SET discoverable_until = $1 WHERE id = $2")
            .bind(until_ms)
            .bind(user.0)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("user {user}")));
        }
        Ok(())
    }

    async fn discoverable_until(&self, user: UserId, now_ms: i64) -> StoreResult<Option<i64>> {
        let until: Option<Option<i64>> =
            sqlx::query_scalar("SELECT discoverable_until FROM users WHERE id = $1")
                .bind(user.0)
                .fetch_optional(&self.pool)
                .await
                .map_err(backend)?;
        Ok(until.flatten().filter(|u| *u > now_ms))
    }

    async fn discoverable_among(&self, users: &[UserId], now_ms: i64) -> StoreResult<Vec<UserId>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = users.iter().map(|u| u.0).collect();
        let rows: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM users WHERE id = ANY($1) AND discoverable_until > $2",
        )
        .bind(ids)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        Ok(rows.into_iter().map(UserId).collect())
    }

    async fn ping(&self) -> StoreResult<()> {
        crate::ping(&self.pool).await
    }
}

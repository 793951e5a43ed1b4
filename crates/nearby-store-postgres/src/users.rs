use async_trait::async_trait;
use nearby_core::{FriendStatus, UserId};
use nearby_ports::{BulkUser, FriendEntry, StoreError, StoreResult, UserRecord, UserStore};
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

    /// Creates `users` (with their tokens) and the mutual friendships
    /// `friendships` (indexes into `users`, sharing on both ways) in one
    /// transaction, a few array-parameter statements for the lot; returns
    /// the new ids in order. For load tests and imports.
    pub async fn bulk_insert(
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
        // RETURNING's order is not promised: match ids back by name.
        let mut by_name = std::collections::HashMap::with_capacity(rows.len());
        for r in &rows {
            let id: i64 = r.try_get(0).map_err(backend)?;
            let name: String = r.try_get(1).map_err(backend)?;
            by_name.insert(name, id);
        }
        let ids: Vec<i64> = users
            .iter()
            .map(|u| {
                by_name.get(&u.username).copied().ok_or_else(|| {
                    StoreError::Invalid(format!("no id returned for {:?}", u.username))
                })
            })
            .collect::<StoreResult<_>>()?;
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
        let mut from = Vec::with_capacity(friendships.len() * 2);
        let mut to = Vec::with_capacity(friendships.len() * 2);
        for &(a, b) in friendships {
            let (Some(a), Some(b)) = (ids.get(a as usize), ids.get(b as usize)) else {
                return Err(StoreError::NotFound(format!(
                    "friendship ({a}, {b}) names no user"
                )));
            };
            from.extend([*a, *b]);
            to.extend([*b, *a]);
        }
        for (f, t) in from.chunks(100_000).zip(to.chunks(100_000)) {
            sqlx::query(
                "INSERT INTO friend_edges (user_id, friend_id, status)
                 SELECT f, t, 'friends' FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS x(f, t)
                 ON CONFLICT DO NOTHING",
            )
            .bind(f)
            .bind(t)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(ids.into_iter().map(UserId).collect())
    }
}

/// Locks both users' rows, in id order, for the rest of the transaction:
/// two requests crossing between the same pair (A asks B while B asks A)
/// then apply one after the other instead of both seeing "no relation".
/// Returns how many of the two exist.
async fn lock_pair(tx: &mut Transaction<'_, Postgres>, a: UserId, b: UserId) -> StoreResult<usize> {
    let rows = sqlx::query("SELECT id FROM users WHERE id IN ($1, $2) ORDER BY id FOR UPDATE")
        .bind(a.0)
        .bind(b.0)
        .fetch_all(&mut **tx)
        .await
        .map_err(backend)?;
    Ok(rows.len())
}

async fn edge_status(
    tx: &mut Transaction<'_, Postgres>,
    from: UserId,
    to: UserId,
) -> StoreResult<Option<FriendStatus>> {
    let row = sqlx::query("SELECT status FROM friend_edges WHERE user_id = $1 AND friend_id = $2")
        .bind(from.0)
        .bind(to.0)
        .fetch_optional(&mut **tx)
        .await
        .map_err(backend)?;
    row.map(|r| {
        let s: String = r.try_get(0).map_err(backend)?;
        FriendStatus::parse(&s).ok_or_else(|| StoreError::Invalid(format!("bad status {s:?}")))
    })
    .transpose()
}

async fn set_edge(
    tx: &mut Transaction<'_, Postgres>,
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
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    Ok(())
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
        Ok(done.rows_affected())
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
        if from == to {
            return Err(StoreError::Conflict("cannot befriend yourself".into()));
        }
        let mut tx = self.pool.begin().await.map_err(backend)?;
        if lock_pair(&mut tx, from, to).await? < 2 {
            return Err(StoreError::NotFound(format!("user {to}")));
        }
        let before = edge_status(&mut tx, from, to).await?;
        let after = FriendStatus::after_request(before);
        if Some(after) != before {
            set_edge(&mut tx, from, to, after).await?;
            set_edge(&mut tx, to, from, after.mirrored()).await?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(before)
    }

    async fn remove_friend(&self, a: UserId, b: UserId) -> StoreResult<Option<FriendStatus>> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        lock_pair(&mut tx, a, b).await?;
        let before = edge_status(&mut tx, a, b).await?;
        sqlx::query(
            "DELETE FROM friend_edges WHERE (user_id = $1 AND friend_id = $2) OR (user_id = $2 AND friend_id = $1)",
        )
        .bind(a.0)
        .bind(b.0)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(before)
    }

    async fn set_sharing(&self, from: UserId, to: UserId, enabled: bool) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let row = sqlx::query(
            "SELECT sharing FROM friend_edges WHERE user_id = $1 AND friend_id = $2 AND status = 'friends'",
        )
        .bind(from.0)
        .bind(to.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!("user {to} is not a friend")));
        };
        let before: bool = row.try_get(0).map_err(backend)?;
        if before != enabled {
            sqlx::query(
                "UPDATE friend_edges SET sharing = $1 WHERE user_id = $2 AND friend_id = $3",
            )
            .bind(enabled)
            .bind(from.0)
            .bind(to.0)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(before)
    }

    async fn friends(&self, user: UserId) -> StoreResult<Vec<FriendEntry>> {
        let rows = sqlx::query(
            "SELECT e.friend_id, u.username, e.status, e.sharing
             FROM friend_edges e JOIN users u ON u.id = e.friend_id
             WHERE e.user_id = $1 ORDER BY u.username COLLATE \"C\"",
        )
        .bind(user.0)
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.into_iter()
            .map(|r| {
                let status: String = r.try_get(2).map_err(backend)?;
                Ok(FriendEntry {
                    id: UserId(r.try_get(0).map_err(backend)?),
                    username: r.try_get(1).map_err(backend)?,
                    status: FriendStatus::parse(&status)
                        .ok_or_else(|| StoreError::Invalid(format!("bad status {status:?}")))?,
                    sharing: r.try_get(3).map_err(backend)?,
                })
            })
            .collect()
    }

    async fn visible_friends(&self, viewer: UserId) -> StoreResult<Vec<UserId>> {
        let rows = sqlx::query(
            "SELECT user_id FROM friend_edges WHERE friend_id = $1 AND status = 'friends' AND sharing",
        )
        .bind(viewer.0)
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.into_iter()
            .map(|r| r.try_get(0).map(UserId).map_err(backend))
            .collect()
    }

    async fn ping(&self) -> StoreResult<()> {
        crate::ping(&self.pool).await
    }
}

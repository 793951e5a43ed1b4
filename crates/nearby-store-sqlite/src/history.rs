use std::path::Path;

use async_trait::async_trait;
use nearby_core::{Location, UserId};
use nearby_ports::{HistoryEntry, HistoryStore, Pruned, StoreError, StoreResult};
use sqlx::{QueryBuilder, Sqlite};

use crate::{backend, Pools};

const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE history (
    user_id INTEGER NOT NULL,
    ts      INTEGER NOT NULL,
    lat     REAL NOT NULL,
    lon     REAL NOT NULL
);
CREATE INDEX history_user_ts ON history(user_id, ts);
"#];

/// Rows per INSERT: 4 parameters each stays far below SQLite's limit.
const ROWS_PER_STATEMENT: usize = 500;

/// Append-only location history in a SQLite file.
#[derive(Clone)]
pub struct SqliteHistoryStore {
    db: Pools,
}

impl SqliteHistoryStore {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        Ok(Self {
            db: Pools::open(path, MIGRATIONS).await?,
        })
    }
}

#[async_trait]
impl HistoryStore for SqliteHistoryStore {
    async fn append(&self, batch: &[HistoryEntry]) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.writer.begin().await.map_err(backend)?;
        for chunk in batch.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new("INSERT INTO history (user_id, ts, lat, lon) ");
            q.push_values(chunk, |mut row, e| {
                row.push_bind(e.user.0)
                    .push_bind(e.loc.ts_ms)
                    .push_bind(e.loc.point.lat())
                    .push_bind(e.loc.point.lon());
            });
            q.build().execute(&mut *tx).await.map_err(backend)?;
        }
        tx.commit().await.map_err(backend)
    }

    async fn range(
        &self,
        user: UserId,
        from_ms: i64,
        to_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<Location>> {
        let rows: Vec<(i64, f64, f64)> = sqlx::query_as(
            "SELECT ts, lat, lon FROM history WHERE user_id = ? AND ts >= ? AND ts < ? ORDER BY ts LIMIT ?",
        )
        .bind(user.0)
        .bind(from_ms)
        .bind(to_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.db.reader)
        .await
        .map_err(backend)?;
        rows.into_iter()
            .map(|(ts, lat, lon)| {
                Location::new(lat, lon, ts).map_err(|e| StoreError::Invalid(e.to_string()))
            })
            .collect()
    }

    async fn delete_user(&self, user: UserId) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM history WHERE user_id = ?")
            .bind(user.0)
            .execute(&self.db.writer)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected())
    }

    /// Batches of [`PRUNE_BATCH`] rows, oldest rowid first. History is
    /// appended in time order, so the expired rows sit at the front of the
    /// table and each batch stops after reading about its own rows: no
    /// index on `ts` is needed (one would slow every append). The single
    /// writer is free for appends between batches.
    async fn prune(&self, before_ms: i64) -> StoreResult<Pruned> {
        let mut pruned = Pruned::default();
        loop {
            let done = sqlx::query(
                "DELETE FROM history WHERE rowid IN
                   (SELECT rowid FROM history WHERE ts < ? ORDER BY rowid LIMIT ?)",
            )
            .bind(before_ms)
            .bind(PRUNE_BATCH)
            .execute(&self.db.writer)
            .await
            .map_err(backend)?;
            pruned.rows += done.rows_affected();
            if done.rows_affected() < PRUNE_BATCH as u64 {
                return Ok(pruned);
            }
        }
    }
}

/// Rows deleted per statement by [`HistoryStore::prune`].
const PRUNE_BATCH: i64 = 5000;

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use nearby_core::{Location, UserId};
use nearby_ports::{HistoryEntry, HistoryStore, Pruned, StoreError, StoreResult};
use sqlx::postgres::PgPool;

use crate::backend;

const DAY_MS: i64 = 86_400_000;
/// Days of partitions kept ready ahead of today.
const DAYS_AHEAD: i64 = 3;

/// Location history in a day-partitioned PostgreSQL table.
#[derive(Clone)]
pub struct PgHistoryStore {
    pool: PgPool,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `location_history_YYYYMMDD` for the UTC day starting at `day_start_ms`.
fn partition_name(day_start_ms: i64) -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = day_start_ms.div_euclid(DAY_MS) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("location_history_{y:04}{m:02}{d:02}")
}

/// The UTC day a `location_history_YYYYMMDD` partition holds, as the Unix
/// ms of its start (the inverse of [`partition_name`]).
fn partition_day(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("location_history_")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (y, m, d): (i64, i64, i64) = (
        digits[..4].parse().ok()?,
        digits[4..6].parse().ok()?,
        digits[6..].parse().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days since the epoch from a civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let start = (era * 146_097 + doe - 719_468) * DAY_MS;
    // A name that is not a real date (Feb 30) does not round-trip.
    (partition_name(start) == name).then_some(start)
}

/// Rows deleted per statement by [`HistoryStore::prune`].
const PRUNE_BATCH: i64 = 5000;

impl PgHistoryStore {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Creates the daily partitions from the day before `now_ms` to
    /// [`DAYS_AHEAD`] days after it, if missing. Safe to call from several
    /// nodes at once.
    pub async fn ensure_partitions(&self, now_ms: i64) -> StoreResult<()> {
        let today = now_ms.div_euclid(DAY_MS) * DAY_MS;
        for day in -1..=DAYS_AHEAD {
            self.create_partition(today + day * DAY_MS).await?;
        }
        Ok(())
    }

    /// A transaction holding the schema lock (migrations, partitions), so
    /// that nodes changing partitions at once take turns.
    async fn ddl_tx(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(crate::MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        Ok(tx)
    }

    async fn create_partition(&self, start: i64) -> StoreResult<()> {
        let name = partition_name(start);
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {name} PARTITION OF location_history \
             FOR VALUES FROM ({start}) TO ({})",
            start + DAY_MS
        );
        let mut tx = self.ddl_tx().await?;
        // `query`, not `raw_sql`: the latter's executor bounds make the
        // future fail the `Send` check of callers that spawn this.
        if let Err(e) = sqlx::query(&ddl).execute(&mut *tx).await {
            // Rows for that day already sit in the default partition:
            // keep serving from there rather than fail.
            tracing::warn!(partition = %name, error = %e, "cannot create history partition");
            return Ok(());
        }
        tx.commit().await.map_err(backend)
    }
}

#[async_trait]
impl HistoryStore for PgHistoryStore {
    async fn append(&self, batch: &[HistoryEntry]) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut users = Vec::with_capacity(batch.len());
        let mut ts = Vec::with_capacity(batch.len());
        let mut lat = Vec::with_capacity(batch.len());
        let mut lon = Vec::with_capacity(batch.len());
        for e in batch {
            users.push(e.user.0);
            ts.push(e.loc.ts_ms);
            lat.push(e.loc.point.lat());
            lon.push(e.loc.point.lon());
        }
        sqlx::query(
            "INSERT INTO location_history (user_id, ts, lat, lon)
             SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::FLOAT8[], $4::FLOAT8[])",
        )
        .bind(users)
        .bind(ts)
        .bind(lat)
        .bind(lon)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn range(
        &self,
        user: UserId,
        from_ms: i64,
        to_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<Location>> {
        let rows: Vec<(i64, f64, f64)> = sqlx::query_as(
            "SELECT ts, lat, lon FROM location_history
             WHERE user_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts LIMIT $4",
        )
        .bind(user.0)
        .bind(from_ms)
        .bind(to_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.into_iter()
            .map(|(ts, lat, lon)| {
                Location::new(lat, lon, ts).map_err(|e| StoreError::Invalid(e.to_string()))
            })
            .collect()
    }

    async fn delete_user(&self, user: UserId) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM location_history WHERE user_id = $1")
            .bind(user.0)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected())
    }

    /// Day partitions wholly before `before_ms` are dropped (no row by row
    /// delete, no bloat); what remains older, in the default partition and
    /// the day the cutoff falls in, is deleted in batches.
    async fn prune(&self, before_ms: i64) -> StoreResult<Pruned> {
        let mut pruned = Pruned::default();
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::TEXT FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'location_history'::regclass",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        for name in names {
            let Some(start) = partition_day(&name) else {
                continue; // the default partition, or one an operator made
            };
            if start + DAY_MS > before_ms {
                continue;
            }
            let mut tx = self.ddl_tx().await?;
            // The name comes from the catalogue and matched the pattern.
            sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            tx.commit().await.map_err(backend)?;
            pruned.partitions += 1;
        }
        loop {
            let done = sqlx::query(
                "DELETE FROM location_history WHERE (tableoid, ctid) IN
                   (SELECT tableoid, ctid FROM location_history WHERE ts < $1 LIMIT $2)",
            )
            .bind(before_ms)
            .bind(PRUNE_BATCH)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
            pruned.rows += done.rows_affected();
            if done.rows_affected() < PRUNE_BATCH as u64 {
                return Ok(pruned);
            }
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        crate::ping(&self.pool).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_named_by_utc_day() {
        assert_eq!(partition_name(0), "location_history_19700101");
        assert_eq!(partition_name(951_782_400_000), "location_history_20000229");
        assert_eq!(
            partition_name(1_795_564_800_000),
            "location_history_20261125"
        );
        assert_eq!(partition_name(-DAY_MS), "location_history_19691231");
    }

    #[test]
    fn partition_names_read_back_as_their_day() {
        // Every day from 1900 to 2200 round-trips.
        for day in -25_567..84_000 {
            let start = day * DAY_MS;
            assert_eq!(
                partition_day(&partition_name(start)),
                Some(start),
                "day {day}"
            );
        }
        for other in [
            "location_history_default",
            "location_history_20260230",
            "location_history_2026113",
            "location_history_2026-1-1",
            "users",
        ] {
            assert_eq!(partition_day(other), None, "{other}");
        }
    }
}

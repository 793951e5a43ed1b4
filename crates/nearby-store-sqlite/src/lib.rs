//! Embedded storage on SQLite, through sqlx: [`SqliteUserStore`] (users,
//! tokens, friendships, sharing) and [`SqliteHistoryStore`] (location
//! history), each in its own database file so that history batches never
//! queue behind account writes.
//!
//! Each file is opened in WAL mode with a busy timeout, through two pools: a
//! single-connection writer (SQLite has one writer; serialising writes in the
//! pool instead of in SQLite avoids `SQLITE_BUSY` under load) and a small
//! reader pool (WAL readers do not block the writer).
//!
//! Schema changes are numbered scripts applied in order at open, tracked in
//! `PRAGMA user_version`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod history;
mod users;

use std::path::Path;
use std::time::Duration;

use nearby_ports::StoreError;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub use history::SqliteHistoryStore;
pub use users::SqliteUserStore;

/// A writer and readers on one database file.
#[derive(Clone)]
struct Pools {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl Pools {
    async fn open(path: &Path, migrations: &[&str]) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await
            .map_err(backend)?;
        migrate(&writer, migrations).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.read_only(true))
            .await
            .map_err(backend)?;
        Ok(Self { writer, reader })
    }
}

async fn migrate(pool: &SqlitePool, migrations: &[&str]) -> Result<(), StoreError> {
    let (version,): (i64,) = sqlx::query_as("PRAGMA user_version")
        .fetch_one(pool)
        .await
        .map_err(backend)?;
    for (i, script) in migrations.iter().enumerate().skip(version.max(0) as usize) {
        // A script that rebuilds a parent table runs with foreign keys off
        // (a pragma that only takes effect outside a transaction, on the
        // pool's one writer connection) and checks them before committing.
        let fk_off = script.starts_with(FOREIGN_KEYS_OFF);
        if fk_off {
            sqlx::raw_sql("PRAGMA foreign_keys = OFF")
                .execute(pool)
                .await
                .map_err(backend)?;
        }
        let mut tx = pool.begin().await.map_err(backend)?;
        sqlx::raw_sql(script)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        if fk_off {
            let broken = sqlx::query("PRAGMA foreign_key_check")
                .fetch_all(&mut *tx)
                .await
                .map_err(backend)?;
            if !broken.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "migration {} would break {} foreign key(s)",
                    i + 1,
                    broken.len()
                )));
            }
        }
        sqlx::raw_sql(&format!("PRAGMA user_version = {}", i + 1))
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        if fk_off {
            sqlx::raw_sql("PRAGMA foreign_keys = ON")
                .execute(pool)
                .await
                .map_err(backend)?;
        }
    }
    Ok(())
}

/// The first line of a migration that must run with foreign keys off.
const FOREIGN_KEYS_OFF: &str = "-- foreign keys off";

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::unavailable(e)
}

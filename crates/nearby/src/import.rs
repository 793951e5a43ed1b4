//! The bulk path of `nearby bench --bulk-sqlite / --bulk-postgres`: users,
//! tokens and friendships written straight into a user store through its
//! [`BulkLoad`] adapter, with the server's own password hashing and token
//! code, so that the bench re-implements neither.

use std::path::Path;
use std::sync::Arc;

use nearby_bench::{BenchError, Import};
use nearby_ports::{BulkLoad, BulkUser};
use nearby_server::auth::{hash_password, new_token};
use nearby_server::state::now_ms;

/// An importer over one user store.
pub struct StoreImport {
    store: Arc<dyn BulkLoad>,
    /// How long the tokens it creates live, ms (the server's default).
    token_ttl_ms: i64,
}

impl StoreImport {
    /// The importer for `nearby bench`'s bulk flags, if one is given.
    pub async fn for_bench(
        sqlite: Option<&Path>,
        postgres: Option<&str>,
    ) -> anyhow::Result<Option<Box<dyn Import>>> {
        let store: Arc<dyn BulkLoad> = match (sqlite, postgres) {
            (Some(path), _) => Arc::new(nearby_store_sqlite::SqliteUserStore::open(path).await?),
            (None, Some(url)) => Arc::new(nearby_store_postgres::connect(url, 2).await?.0),
            (None, None) => return Ok(None),
        };
        let ttl = nearby_server::ServerConfig::default().token_ttl;
        Ok(Some(Box::new(StoreImport {
            store,
            token_ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
        })))
    }
}

fn setup(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

#[async_trait::async_trait]
impl Import for StoreImport {
    async fn import(
        &self,
        usernames: &[String],
        password: &str,
        friendships: &[(u32, u32)],
    ) -> Result<Vec<(String, String)>, BenchError> {
        // One argon2 hash for everyone: they share the password, and a hash
        // per user would take minutes for a hundred thousand.
        let phc = hash_password(password).map_err(setup)?;
        let expires = now_ms().saturating_add(self.token_ttl_ms);
        let mut tokens = Vec::with_capacity(usernames.len());
        let users: Vec<BulkUser> = usernames
            .iter()
            .map(|name| {
                let (token, token_hash) = new_token();
                tokens.push(token);
                BulkUser {
                    username: name.clone(),
                    password_hash: phc.clone(),
                    token_hash,
                    token_expires_at_ms: expires,
                }
            })
            .collect();
        let ids = self
            .store
            .bulk_insert(&users, friendships)
            .await
            .map_err(setup)?;
        Ok(ids
            .into_iter()
            .map(|id| id.to_string())
            .zip(tokens)
            .collect())
    }
}

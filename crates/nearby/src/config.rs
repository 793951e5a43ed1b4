//! `nearby serve` settings: flags, then environment (`NEARBY_*`), then a TOML
//! file (`--config`), then defaults. Each source may set any subset.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use nearby_server::ServerConfig;
use nearby_store_redis::RedisConfig;
use serde::Deserialize;

/// Options of `nearby serve`. In the TOML file the keys are the flag names
/// with `_` for `-` (e.g. `radius_m = 5000`).
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of these settings.
    #[arg(long, env = "NEARBY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080; port 0 picks a free port].
    #[arg(long, env = "NEARBY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory of the embedded databases [default: ./nearby-data].
    #[arg(long, env = "NEARBY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Nearby radius in metres [default: 8047, five miles].
    #[arg(long, env = "NEARBY_RADIUS_M")]
    pub radius_m: Option<f64>,
    /// Seconds without an update before a user is inactive [default: 600].
    #[arg(long, env = "NEARBY_LOCATION_TTL_SECS")]
    pub location_ttl_secs: Option<u64>,
    /// Lifetime of a login token in seconds [default: 604800, 7 days].
    #[arg(long, env = "NEARBY_TOKEN_TTL_SECS")]
    pub token_ttl_secs: Option<u64>,
    /// Re-send a friend's distance on the user's own move only past this change, metres [default: 25].
    #[arg(long, env = "NEARBY_DISTANCE_EPSILON_M")]
    pub distance_epsilon_m: Option<f64>,
    /// Messages per second a connection may send on average [default: 5].
    #[arg(long, env = "NEARBY_UPDATES_PER_SEC")]
    pub updates_per_sec: Option<f64>,
    /// Burst allowed above that rate [default: 10].
    #[arg(long, env = "NEARBY_UPDATE_BURST")]
    pub update_burst: Option<u32>,
    /// Largest client text frame handled, bytes [default: 1024].
    #[arg(long, env = "NEARBY_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Close a WebSocket silent for this long, pinging it after a third [default: 90].
    #[arg(long, env = "NEARBY_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// Bus messages queued per session before drops [default: 256].
    #[arg(long, env = "NEARBY_SESSION_QUEUE")]
    pub session_queue: Option<usize>,
    /// History entries queued before the oldest are dropped [default: 100000].
    #[arg(long, env = "NEARBY_HISTORY_QUEUE")]
    pub history_queue: Option<usize>,
    /// History entries per write [default: 1000].
    #[arg(long, env = "NEARBY_HISTORY_BATCH")]
    pub history_batch: Option<usize>,
    /// Milliseconds the history writer waits for a batch to fill before writing a partial one [default: 200].
    #[arg(long, env = "NEARBY_HISTORY_LINGER_MS")]
    pub history_linger_ms: Option<u64>,
    /// Seconds between re-reads of each session's friends and token from the user store [default: 60].
    #[arg(long, env = "NEARBY_REVALIDATE_SECS")]
    pub revalidate_secs: Option<u64>,
    /// Days of location history kept; older points are deleted every hour (0: keep for ever) [default: 30].
    #[arg(long, env = "NEARBY_HISTORY_RETENTION_DAYS")]
    pub history_retention_days: Option<u32>,
    /// Update interval suggested to a client while a friend who can see them is active nearby, ms [default: 5000].
    #[arg(long, env = "NEARBY_FAST_INTERVAL_MS")]
    pub fast_interval_ms: Option<u32>,
    /// Update interval suggested to a client nobody nearby can see, ms [default: 60000].
    #[arg(long, env = "NEARBY_SLOW_INTERVAL_MS")]
    pub slow_interval_ms: Option<u32>,
    /// Seconds a WebSocket ticket (`POST /v1/ws-ticket`) stays usable [default: 30].
    #[arg(long, env = "NEARBY_WS_TICKET_SECS")]
    pub ws_ticket_secs: Option<u64>,
    /// Strangers one session is shown at most; past it newcomers wait for a place [default: 20].
    #[arg(long, env = "NEARBY_STRANGER_CAP")]
    pub stranger_cap: Option<usize>,
    /// How often a discoverable session re-announces its cell, ms; a stranger silent for 3 of these leaves [default: 10000].
    #[arg(long, env = "NEARBY_STRANGER_HEARTBEAT_MS")]
    pub stranger_heartbeat_ms: Option<u64>,
    /// Key of strangers' per-viewer, per-day aliases (16+ characters; give every node the same) [default: random per process].
    #[arg(long, env = "NEARBY_STRANGER_SECRET", hide_env_values = true)]
    pub stranger_secret: Option<String>,
    /// The page's street-map tiles, a URL template with {z}, {x}, {y}; "" shows only the radar view [default: OpenStreetMap's].
    #[arg(long, env = "NEARBY_TILE_URL")]
    pub tile_url: Option<String>,
    /// The map's credit line (HTML), as the tile provider asks [default: OpenStreetMap's].
    #[arg(long, env = "NEARBY_TILE_ATTRIBUTION")]
    pub tile_attribution: Option<String>,
    /// Connections served normally [default: 0, derived from the open-file limit].
    #[arg(long, env = "NEARBY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections from one IP address [default: 4096; 0: no cap].
    #[arg(long, env = "NEARBY_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Connections past --max-connections still served one quick request each, no WebSocket [default: 64].
    #[arg(long, env = "NEARBY_CONNECTION_RESERVE")]
    pub connection_reserve: Option<usize>,
    /// Seconds a client has to send its request headers [default: 10].
    #[arg(long, env = "NEARBY_HEADER_TIMEOUT_SECS")]
    pub header_timeout_secs: Option<u64>,
    /// Seconds a REST request may take, body included [default: 30].
    #[arg(long, env = "NEARBY_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<u64>,
    /// Client address from the last X-Forwarded-For entry (only behind a proxy that sets it) [default: false].
    #[arg(long, env = "NEARBY_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: Option<bool>,
    /// WebSockets one user may hold on one node [default: 16].
    #[arg(long, env = "NEARBY_MAX_SOCKETS_PER_USER")]
    pub max_sockets_per_user: Option<usize>,
    /// Location updates per second one user may send over all their WebSockets on a node [default: 10].
    #[arg(long, env = "NEARBY_USER_UPDATES_PER_SEC")]
    pub user_updates_per_sec: Option<f64>,
    /// Burst above --user-updates-per-sec [default: 20].
    #[arg(long, env = "NEARBY_USER_UPDATE_BURST")]
    pub user_update_burst: Option<u32>,
    /// Failed logins per account and address before each attempt waits (1 s doubling to 15 min) [default: 5].
    #[arg(long, env = "NEARBY_LOGIN_FREE_FAILURES")]
    pub login_free_failures: Option<u32>,
    /// Failed logins per minute from one address, all accounts (burst 3x) [default: 10].
    #[arg(long, env = "NEARBY_LOGIN_IP_FAILURES_PER_MIN")]
    pub login_ip_failures_per_min: Option<u32>,
    /// Failed logins per hour per account from addresses that never logged into it [default: 100].
    #[arg(long, env = "NEARBY_LOGIN_ACCOUNT_FAILURES_PER_HOUR")]
    pub login_account_failures_per_hour: Option<u32>,
    /// Sign-ups per hour from one address (burst a quarter of it) [default: 20].
    #[arg(long, env = "NEARBY_SIGNUPS_PER_IP_PER_HOUR")]
    pub signups_per_ip_per_hour: Option<u32>,
    /// WebSocket tickets per minute per user (burst half of it); each is a store write [default: 60].
    #[arg(long, env = "NEARBY_WS_TICKETS_PER_MIN")]
    pub ws_tickets_per_min: Option<u32>,
    /// State changes per minute per user (burst half of it): friend requests, sharing, ghost, discoverable, history deletes [default: 60].
    #[arg(long, env = "NEARBY_CHANGES_PER_MIN")]
    pub changes_per_min: Option<u32>,
    /// SO_SNDBUF of accepted sockets in bytes; caps kernel memory per client that stops reading [default: 0, kernel autotuning].
    #[arg(long, env = "NEARBY_SOCKET_SEND_BUFFER")]
    pub socket_send_buffer: Option<usize>,
    /// Apply per-address limits to loopback clients too [default: false].
    #[arg(long, env = "NEARBY_LIMIT_LOOPBACK")]
    pub limit_loopback: Option<bool>,
    /// Seconds a drain (first SIGTERM) may take: sessions are told to reconnect elsewhere over 80 % of it [default: 30].
    #[arg(long, env = "NEARBY_DRAIN_SECS")]
    pub drain_secs: Option<u64>,
    /// Seconds to wait for sessions and history on shutdown [default: 10].
    #[arg(long, env = "NEARBY_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Redis for the location cache, and the bus unless --pubsub-redis-urls or --etcd is given (`redis://host:port`; several, comma-separated, shard the cache); without it both are in-process.
    #[arg(long, env = "NEARBY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Pub/sub servers of the bus as a static ring, comma-separated `redis://` URLs (each URL is its member name); needs --redis-url.
    #[arg(long, env = "NEARBY_PUBSUB_REDIS_URLS")]
    pub pubsub_redis_urls: Option<String>,
    /// etcd endpoints (comma-separated `http://host:port`) holding the bus's ring of pub/sub servers, watched for changes; needs --redis-url.
    #[arg(long, env = "NEARBY_ETCD")]
    pub etcd: Option<String>,
    /// Key prefix of the ring in etcd [default: "/nearby/ring/"].
    #[arg(long, env = "NEARBY_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    /// After a ring change, milliseconds during which moved channels are published at both their old and new server [default: 2000].
    #[arg(long, env = "NEARBY_RING_HANDOVER_MS")]
    pub ring_handover_ms: Option<u64>,
    /// Prefix of every Redis key and channel [default: "nearby:"].
    #[arg(long, env = "NEARBY_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Redis subscriber connections per node [default: 4].
    #[arg(long, env = "NEARBY_REDIS_SUBSCRIBERS")]
    pub redis_subscribers: Option<usize>,
    /// PostgreSQL for users, friendships and history (`postgres://user@host/db`); without it, SQLite in --data-dir.
    #[arg(long, env = "NEARBY_DATABASE_URL")]
    pub database_url: Option<String>,
    /// PostgreSQL connections per node [default: 16].
    #[arg(long, env = "NEARBY_DATABASE_MAX_CONNECTIONS")]
    pub database_max_connections: Option<u32>,
}

/// The settings after merging, ready to use.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub grace: Duration,
    pub server: ServerConfig,
    /// Redis cache and bus, if configured (the first cache URL's).
    pub redis: Option<RedisConfig>,
    /// Every cache server (one unless the cache is sharded).
    pub cache_urls: Vec<String>,
    /// Where the bus's pub/sub servers come from.
    pub pubsub: Pubsub,
    /// PostgreSQL URL and pool size, if configured.
    pub database: Option<(String, u32)>,
}

impl ServeArgs {
    /// Fills every unset option from `other`.
    fn or(self, other: Self) -> Self {
        macro_rules! merge {
            ($($f:ident),*) => { Self { $($f: self.$f.or(other.$f)),* } };
        }
        merge!(
            config,
            listen,
            data_dir,
            radius_m,
            location_ttl_secs,
            token_ttl_secs,
            distance_epsilon_m,
            updates_per_sec,
            update_burst,
            max_frame_bytes,
            idle_timeout_secs,
            session_queue,
            history_queue,
            history_batch,
            history_linger_ms,
            revalidate_secs,
            history_retention_days,
            fast_interval_ms,
            slow_interval_ms,
            ws_ticket_secs,
            stranger_cap,
            stranger_heartbeat_ms,
            stranger_secret,
            tile_url,
            tile_attribution,
            max_connections,
            max_connections_per_ip,
            connection_reserve,
            header_timeout_secs,
            request_timeout_secs,
            trust_forwarded_for,
            max_sockets_per_user,
            user_updates_per_sec,
            user_update_burst,
            login_free_failures,
            login_ip_failures_per_min,
            login_account_failures_per_hour,
            signups_per_ip_per_hour,
            ws_tickets_per_min,
            changes_per_min,
            socket_send_buffer,
            limit_loopback,
            drain_secs,
            shutdown_grace_secs,
            redis_url,
            pubsub_redis_urls,
            etcd,
            etcd_prefix,
            ring_handover_ms,
            redis_prefix,
            redis_subscribers,
            database_url,
            database_max_connections
        )
    }

    /// Merges with the TOML file, if any, then defaults; validates.
    pub fn resolve(self) -> anyhow::Result<Settings> {
        let merged = match &self.config {
            Some(path) => self.clone().or(read_file(path)?),
            None => self,
        };
        let d = ServerConfig::default();
        let server = ServerConfig {
            radius_m: merged.radius_m.unwrap_or(d.radius_m),
            location_ttl: merged
                .location_ttl_secs
                .map_or(d.location_ttl, Duration::from_secs),
            token_ttl: merged
                .token_ttl_secs
                .map_or(d.token_ttl, Duration::from_secs),
            distance_epsilon_m: merged.distance_epsilon_m.unwrap_or(d.distance_epsilon_m),
            updates_per_sec: merged.updates_per_sec.unwrap_or(d.updates_per_sec),
            update_burst: merged.update_burst.unwrap_or(d.update_burst),
            max_frame_bytes: merged.max_frame_bytes.unwrap_or(d.max_frame_bytes),
            idle_timeout: merged
                .idle_timeout_secs
                .map_or(d.idle_timeout, Duration::from_secs),
            session_queue: merged.session_queue.unwrap_or(d.session_queue),
            history_queue: merged.history_queue.unwrap_or(d.history_queue),
            history_batch: merged.history_batch.unwrap_or(d.history_batch),
            history_linger: merged
                .history_linger_ms
                .map_or(d.history_linger, Duration::from_millis),
            revalidate: merged
                .revalidate_secs
                .map_or(d.revalidate, Duration::from_secs),
            history_retention_days: merged
                .history_retention_days
                .unwrap_or(d.history_retention_days),
            fast_interval_ms: merged.fast_interval_ms.unwrap_or(d.fast_interval_ms),
            slow_interval_ms: merged.slow_interval_ms.unwrap_or(d.slow_interval_ms),
            ws_ticket_ttl: merged
                .ws_ticket_secs
                .map_or(d.ws_ticket_ttl, Duration::from_secs),
            stranger_cap: merged.stranger_cap.unwrap_or(d.stranger_cap),
            stranger_heartbeat: merged
                .stranger_heartbeat_ms
                .map_or(d.stranger_heartbeat, Duration::from_millis),
            stranger_secret: merged.stranger_secret.clone(),
            tile_url: merged.tile_url.clone().unwrap_or(d.tile_url),
            tile_attribution: merged
                .tile_attribution
                .clone()
                .unwrap_or(d.tile_attribution),
            demo: false,
            drain: merged.drain_secs.map_or(d.drain, Duration::from_secs),
            max_connections: merged.max_connections.unwrap_or(d.max_connections),
            max_connections_per_ip: merged
                .max_connections_per_ip
                .unwrap_or(d.max_connections_per_ip),
            connection_reserve: merged.connection_reserve.unwrap_or(d.connection_reserve),
            header_timeout: merged
                .header_timeout_secs
                .map_or(d.header_timeout, Duration::from_secs),
            request_timeout: merged
                .request_timeout_secs
                .map_or(d.request_timeout, Duration::from_secs),
            trust_forwarded_for: merged.trust_forwarded_for.unwrap_or(d.trust_forwarded_for),
            max_sockets_per_user: merged
                .max_sockets_per_user
                .unwrap_or(d.max_sockets_per_user),
            user_updates_per_sec: merged
                .user_updates_per_sec
                .unwrap_or(d.user_updates_per_sec),
            user_update_burst: merged.user_update_burst.unwrap_or(d.user_update_burst),
            login_free_failures: merged.login_free_failures.unwrap_or(d.login_free_failures),
            login_ip_failures_per_min: merged
                .login_ip_failures_per_min
                .unwrap_or(d.login_ip_failures_per_min),
            login_account_failures_per_hour: merged
                .login_account_failures_per_hour
                .unwrap_or(d.login_account_failures_per_hour),
            signups_per_ip_per_hour: merged
                .signups_per_ip_per_hour
                .unwrap_or(d.signups_per_ip_per_hour),
            ws_tickets_per_min: merged.ws_tickets_per_min.unwrap_or(d.ws_tickets_per_min),
            changes_per_min: merged.changes_per_min.unwrap_or(d.changes_per_min),
            socket_send_buffer: merged.socket_send_buffer.unwrap_or(d.socket_send_buffer),
            limit_loopback: merged.limit_loopback.unwrap_or(d.limit_loopback),
        };
        server.validate()?;
        let cache_urls: Vec<String> = merged
            .redis_url
            .as_deref()
            .map(split_urls)
            .unwrap_or_default();
        for url in &cache_urls {
            check_redis_url("redis_url", url)?;
        }
        let redis = match cache_urls.first() {
            None => None,
            Some(url) => {
                let mut cfg = RedisConfig::new(url.clone());
                if let Some(p) = merged.redis_prefix {
                    cfg.prefix = p;
                }
                let n = merged
                    .redis_subscribers
                    .unwrap_or(cfg.subscriber_connections);
                anyhow::ensure!(
                    (1..=64).contains(&n),
                    "redis_subscribers must be between 1 and 64, got {n}"
                );
                cfg.subscriber_connections = n;
                Some(cfg)
            }
        };
        let handover = Duration::from_millis(merged.ring_handover_ms.unwrap_or(2000));
        anyhow::ensure!(
            handover <= Duration::from_secs(60),
            "ring_handover_ms must be at most 60000"
        );
        let pubsub = match (merged.pubsub_redis_urls, merged.etcd) {
            (Some(_), Some(_)) => {
                anyhow::bail!("give either pubsub_redis_urls or etcd, not both")
            }
            (Some(list), None) => {
                let urls = split_urls(&list);
                anyhow::ensure!(!urls.is_empty(), "pubsub_redis_urls lists no URL");
                for url in &urls {
                    check_redis_url("pubsub_redis_urls", url)?;
                }
                Pubsub::Static { urls, handover }
            }
            (None, Some(list)) => {
                let endpoints = split_urls(&list);
                anyhow::ensure!(!endpoints.is_empty(), "etcd lists no endpoint");
                let prefix = merged
                    .etcd_prefix
                    .unwrap_or_else(|| nearby_etcd::DEFAULT_PREFIX.to_owned());
                anyhow::ensure!(
                    prefix.starts_with('/') && prefix.ends_with('/'),
                    "etcd_prefix must start and end with '/'"
                );
                Pubsub::Etcd {
                    endpoints,
                    prefix,
                    handover,
                }
            }
            (None, None) => Pubsub::Single,
        };
        anyhow::ensure!(
            redis.is_some() || matches!(pubsub, Pubsub::Single),
            "a ring of pub/sub servers needs redis_url for the location cache"
        );
        let database = match merged.database_url {
            None => None,
            Some(url) => {
                anyhow::ensure!(
                    url.starts_with("postgres://") || url.starts_with("postgresql://"),
                    "database_url must start with postgres:// or postgresql://"
                );
                let n = merged.database_max_connections.unwrap_or(16);
                anyhow::ensure!(
                    (2..=1000).contains(&n),
                    "database_max_connections must be between 2 and 1000, got {n}"
                );
                Some((url, n))
            }
        };
        Ok(Settings {
            redis,
            cache_urls,
            pubsub,
            database,
            listen: merged
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            data_dir: merged
                .data_dir
                .unwrap_or_else(|| PathBuf::from("nearby-data")),
            grace: Duration::from_secs(merged.shutdown_grace_secs.unwrap_or(10)),
            server,
        })
    }
}

/// Where a node's pub/sub servers come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Pubsub {
    /// The one Redis of `--redis-url` (or in-process without it).
    Single,
    /// A ring with static members, named by their URLs.
    Static {
        urls: Vec<String>,
        handover: Duration,
    },
    /// A ring whose members are in etcd.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        handover: Duration,
    },
}

/// A comma-separated list, trimmed, empty items dropped.
pub fn split_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn check_redis_url(what: &str, url: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        url.starts_with("redis://") || url.starts_with("rediss://"),
        "{what} must start with redis:// or rediss://, got {url:?}"
    );
    Ok(())
}

fn read_file(path: &Path) -> anyhow::Result<ServeArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let dir = std::env::temp_dir().join(format!("nearby-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("nearby.toml");
        std::fs::write(&file, "radius_m = 500.0\nlocation_ttl_secs = 30\n").unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            radius_m: Some(900.0),
            ..Default::default()
        };
        let s = args.resolve().unwrap();
        assert_eq!(s.server.radius_m, 900.0);
        assert_eq!(s.server.location_ttl, Duration::from_secs(30));
        assert_eq!(s.server.update_burst, ServerConfig::default().update_burst);

        std::fs::write(&file, "radius = 1\n").unwrap();
        let err = ServeArgs {
            config: Some(file.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");

        let err = ServeArgs {
            radius_m: Some(-5.0),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("radius_m"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn backends_are_chosen_by_url_and_checked() {
        let s = ServeArgs::default().resolve().unwrap();
        assert!(
            s.redis.is_none() && s.database.is_none(),
            "embedded by default"
        );
        let s = ServeArgs {
            redis_url: Some("redis://127.0.0.1:6379".into()),
            redis_subscribers: Some(2),
            database_url: Some("postgres://u@h/db".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(s.redis.map(|r| r.subscriber_connections), Some(2));
        assert_eq!(s.database, Some(("postgres://u@h/db".into(), 16)));
        for bad in [
            ServeArgs {
                redis_url: Some("http://x".into()),
                ..Default::default()
            },
            ServeArgs {
                database_url: Some("mysql://x".into()),
                ..Default::default()
            },
            ServeArgs {
                redis_url: Some("redis://x".into()),
                redis_subscribers: Some(0),
                ..Default::default()
            },
            ServeArgs {
                pubsub_redis_urls: Some("redis://a:1".into()),
                ..Default::default()
            },
            ServeArgs {
                redis_url: Some("redis://x".into()),
                pubsub_redis_urls: Some("redis://a:1".into()),
                etcd: Some("http://e:2379".into()),
                ..Default::default()
            },
            ServeArgs {
                redis_url: Some("redis://x".into()),
                etcd: Some("http://e:2379".into()),
                etcd_prefix: Some("nearby".into()),
                ..Default::default()
            },
        ] {
            assert!(bad.resolve().is_err());
        }
    }

    #[test]
    fn the_ring_and_the_sharded_cache_are_lists() {
        let s = ServeArgs {
            redis_url: Some("redis://c1:1, redis://c2:2".into()),
            pubsub_redis_urls: Some("redis://p1:1,redis://p2:2,".into()),
            ring_handover_ms: Some(500),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(s.cache_urls, vec!["redis://c1:1", "redis://c2:2"]);
        assert_eq!(
            s.pubsub,
            Pubsub::Static {
                urls: vec!["redis://p1:1".into(), "redis://p2:2".into()],
                handover: Duration::from_millis(500),
            }
        );
        let s = ServeArgs {
            redis_url: Some("redis://c1:1".into()),
            etcd: Some("http://e1:2379,http://e2:2379".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            s.pubsub,
            Pubsub::Etcd {
                endpoints: vec!["http://e1:2379".into(), "http://e2:2379".into()],
                prefix: "/nearby/ring/".into(),
                handover: Duration::from_secs(2),
            }
        );
    }
}

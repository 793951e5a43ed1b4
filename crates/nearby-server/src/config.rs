//! Settings of the service, validated once at start-up.

use std::time::Duration;

use nearby_core::session::SessionConfig;

const SECOND: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// OpenStreetMap's standard tiles (<https://operations.osmfoundation.org/policies/tiles/>).
pub const DEFAULT_TILE_URL: &str = "https://tile.openstreetmap.org/{z}/{x}/{y}.png";
/// The credit OpenStreetMap's licence asks for.
pub const DEFAULT_TILE_ATTRIBUTION: &str =
    "&copy; <a href=\"https://www.openstreetmap.org/copyright\">OpenStreetMap</a> contributors";

/// Everything the service needs to know besides its backends.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Nearby radius, metres (default 8047: five miles).
    pub radius_m: f64,
    /// A location older than this means inactive (default 600 s).
    pub location_ttl: Duration,
    /// Lifetime of a login token (default 7 days).
    pub token_ttl: Duration,
    /// Minimum change of a shown friend's distance worth re-sending when the
    /// user moves (default 25 m).
    pub distance_epsilon_m: f64,
    /// Location updates a connection may send per second on average (default 5).
    pub updates_per_sec: f64,
    /// Burst above that rate (default 10).
    pub update_burst: u32,
    /// Largest client text frame handled; larger ones get an error frame
    /// (default 1024 bytes). Frames over [`ServerConfig::hard_frame_limit`]
    /// close the connection.
    pub max_frame_bytes: usize,
    /// A connection silent this long is closed with 1001; the server pings
    /// after a third of it (default 90 s).
    pub idle_timeout: Duration,
    /// Bus messages queued per session before drops (default 256).
    pub session_queue: usize,
    /// History entries queued before the oldest are dropped (default 100 000).
    pub history_queue: usize,
    /// History entries per write (default 1000).
    pub history_batch: usize,
    /// How long the history writer waits for a batch to fill before it
    /// writes a partial one (default 200 ms): one transaction per update at
    /// a few thousand updates/s cost the embedded node a tenth of its CPU.
    pub history_linger: Duration,
    /// Every session re-reads its friends, sharing and token from the user
    /// store this often (default 60 s): the longest a revocation whose bus
    /// message was lost can go unnoticed.
    pub revalidate: Duration,
    /// Days of location history kept (default 30; 0: for ever): every hour
    /// older points are deleted (PostgreSQL drops whole day partitions).
    pub history_retention_days: u32,
    /// The update interval suggested to a client while a friend who can
    /// see them is active within the radius (default 5000 ms).
    pub fast_interval_ms: u32,
    /// The update interval suggested otherwise (default 60 000 ms).
    pub slow_interval_ms: u32,
    /// How long a WebSocket ticket (`POST /v1/ws-ticket`) stays usable
    /// (default 30 s).
    pub ws_ticket_ttl: Duration,
    /// Strangers one session is shown at most (default 20): past it,
    /// newcomers wait for a place (the hot-cell cap).
    pub stranger_cap: usize,
    /// A discoverable session re-announces its cell this often (default
    /// 10 s); a stranger not heard of for three of these leaves.
    pub stranger_heartbeat: Duration,
    /// The key of strangers' aliases (HMAC-SHA256 of viewer, day and
    /// stranger). Nodes sharing a bus should share it, or a viewer who
    /// reconnects to another node sees new aliases; `None`: a random key
    /// per process.
    pub stranger_secret: Option<String>,
    /// The page's street map: a tile URL template with `{z}`, `{x}`, `{y}`
    /// (and optionally `{s}`, `{r}`), fetched by the browser. Empty: the
    /// page shows only its radar view. Default: OpenStreetMap's tiles,
    /// whose usage policy suits light use; a busy deployment runs or buys
    /// its own.
    pub tile_url: String,
    /// What the map credits (HTML, shown in its corner), as the tile
    /// provider's terms require.
    pub tile_attribution: String,
    /// Started by `nearby demo`: the page says how to log in to it.
    pub demo: bool,
    /// How long a drain (the first SIGTERM) may take: sessions are told to
    /// go, spread over the first 80 % of it, and the process exits when the
    /// last is gone or at its end (default 30 s; 0: all at once).
    pub drain: Duration,
    /// Connections served normally; 0 (default) derives it from the
    /// open-file limit (see [`crate::listen::Limits::resolve`]).
    pub max_connections: usize,
    /// Connections from one IP address (default 4096; 0: no cap).
    pub max_connections_per_ip: usize,
    /// Connections past `max_connections` still served one quick request
    /// each, no WebSocket (default 64).
    pub connection_reserve: usize,
    /// Request headers must arrive within this (default 10 s).
    pub header_timeout: Duration,
    /// A REST request must be received and answered within this (default 30 s).
    pub request_timeout: Duration,
    /// Take the client's address from the last `X-Forwarded-For` entry
    /// (only behind a proxy that sets it; default off).
    pub trust_forwarded_for: bool,
    /// WebSockets one user may hold on one node (default 16).
    pub max_sockets_per_user: usize,
    /// Location updates per second one user may send over all their
    /// WebSockets on one node (default 10, burst 20).
    pub user_updates_per_sec: f64,
    /// Burst above `user_updates_per_sec` (default 20).
    pub user_update_burst: u32,
    /// Failed logins for one account from one address before each further
    /// attempt must wait (1 s, doubling to 15 min; default 5).
    pub login_free_failures: u32,
    /// Failed logins one address may make per minute, over all accounts
    /// (default 10, burst 30).
    pub login_ip_failures_per_min: u32,
    /// Failed logins per hour per account from addresses that never logged
    /// into it (default 100); addresses that did are not held back.
    pub login_account_failures_per_hour: u32,
    /// Sign-ups per hour from one address (default 20, burst 5).
    pub signups_per_ip_per_hour: u32,
    /// WebSocket tickets (`POST /v1/ws-ticket`) per minute per user
    /// (default 60, burst half of it): each is a store write.
    pub ws_tickets_per_min: u32,
    /// State changes per minute per user (default 60, burst half of it):
    /// friend requests and removals, sharing, ghost mode, discoverable
    /// (REST and the WebSocket frame), history deletes. Each is a store
    /// write and pushes frames to other people.
    pub changes_per_min: u32,
    /// `SO_SNDBUF` of accepted sockets, bytes (default 0: the kernel's
    /// autotuning, which lets a client that stops reading hold megabytes).
    pub socket_send_buffer: usize,
    /// Apply the per-address limits (connections, sign-ups, failed logins
    /// per address) to loopback clients too (default off: the node's own
    /// host runs the bench, the demo and health probes).
    pub limit_loopback: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            radius_m: 8047.0,
            location_ttl: Duration::from_secs(600),
            token_ttl: Duration::from_secs(7 * 24 * 3600),
            distance_epsilon_m: 25.0,
            updates_per_sec: 5.0,
            update_burst: 10,
            max_frame_bytes: 1024,
            idle_timeout: Duration::from_secs(90),
            session_queue: 256,
            history_queue: 100_000,
            history_batch: 1000,
            history_linger: Duration::from_millis(200),
            revalidate: Duration::from_secs(60),
            history_retention_days: 30,
            fast_interval_ms: 5_000,
            slow_interval_ms: 60_000,
            ws_ticket_ttl: Duration::from_secs(30),
            stranger_cap: 20,
            stranger_heartbeat: Duration::from_secs(10),
            stranger_secret: None,
            tile_url: DEFAULT_TILE_URL.to_owned(),
            tile_attribution: DEFAULT_TILE_ATTRIBUTION.to_owned(),
            demo: false,
            drain: Duration::from_secs(30),
            max_connections: 0,
            max_connections_per_ip: 4096,
            connection_reserve: 64,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            trust_forwarded_for: false,
            max_sockets_per_user: 16,
            user_updates_per_sec: 10.0,
            user_update_burst: 20,
            login_free_failures: 5,
            login_ip_failures_per_min: 10,
            login_account_failures_per_hour: 100,
            signups_per_ip_per_hour: 20,
            ws_tickets_per_min: 60,
            changes_per_min: 60,
            socket_send_buffer: 0,
            limit_loopback: false,
        }
    }
}

/// A setting out of its allowed range, named.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid setting {name} = {value}: {rule}")]
pub struct ConfigError {
    /// The setting.
    pub name: &'static str,
    /// Its value, as text.
    pub value: String,
    /// What it must be.
    pub rule: &'static str,
}

impl ServerConfig {
    /// Checks every setting; the first bad one is named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn check(
            ok: bool,
            name: &'static str,
            value: impl ToString,
            rule: &'static str,
        ) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError {
                    name,
                    value: value.to_string(),
                    rule,
                })
            }
        }
        check(
            self.radius_m.is_finite() && self.radius_m > 0.0 && self.radius_m <= 20_037_509.0,
            "radius_m",
            self.radius_m,
            "between 0 and half the Earth's circumference",
        )?;
        check(
            (SECOND..=30 * DAY).contains(&self.location_ttl),
            "location_ttl_secs",
            self.location_ttl.as_secs(),
            "between 1 and 2592000 (30 days)",
        )?;
        check(
            (SECOND..=366 * DAY).contains(&self.token_ttl),
            "token_ttl_secs",
            self.token_ttl.as_secs(),
            "between 1 and 31622400 (366 days)",
        )?;
        check(
            (SECOND..=DAY).contains(&self.idle_timeout),
            "idle_timeout_secs",
            self.idle_timeout.as_secs(),
            "between 1 and 86400 (a day)",
        )?;
        check(
            self.distance_epsilon_m.is_finite() && self.distance_epsilon_m >= 0.0,
            "distance_epsilon_m",
            self.distance_epsilon_m,
            "0 or more",
        )?;
        check(
            self.updates_per_sec.is_finite() && self.updates_per_sec > 0.0,
            "updates_per_sec",
            self.updates_per_sec,
            "more than 0",
        )?;
        check(
            self.update_burst >= 1,
            "update_burst",
            self.update_burst,
            "at least 1",
        )?;
        check(
            (64..=Self::hard_frame_limit()).contains(&self.max_frame_bytes),
            "max_frame_bytes",
            self.max_frame_bytes,
            "between 64 and 65536",
        )?;
        check(
            (1..=65_536).contains(&self.session_queue),
            "session_queue",
            self.session_queue,
            "between 1 and 65536",
        )?;
        check(
            (1..=10_000_000).contains(&self.history_queue),
            "history_queue",
            self.history_queue,
            "between 1 and 10000000",
        )?;
        check(
            self.drain <= Duration::from_secs(3600),
            "drain_secs",
            self.drain.as_secs(),
            "at most 3600",
        )?;
        check(
            self.tile_url.is_empty()
                || ((self.tile_url.starts_with("https://")
                    || self.tile_url.starts_with("http://"))
                    && ["{z}", "{x}", "{y}"]
                        .iter()
                        .all(|p| self.tile_url.contains(p))),
            "tile_url",
            &self.tile_url,
            "empty, or an http(s) URL with {z}, {x} and {y}",
        )?;
        check(
            (100..=3_600_000).contains(&self.fast_interval_ms),
            "fast_interval_ms",
            self.fast_interval_ms,
            "between 100 and 3600000 (an hour)",
        )?;
        check(
            (self.fast_interval_ms..=3_600_000).contains(&self.slow_interval_ms),
            "slow_interval_ms",
            self.slow_interval_ms,
            "between --fast-interval-ms and 3600000 (an hour)",
        )?;
        check(
            (SECOND..=Duration::from_secs(3600)).contains(&self.ws_ticket_ttl),
            "ws_ticket_secs",
            self.ws_ticket_ttl.as_secs(),
            "between 1 and 3600",
        )?;
        check(
            (1..=1000).contains(&self.stranger_cap),
            "stranger_cap",
            self.stranger_cap,
            "between 1 and 1000",
        )?;
        check(
            (Duration::from_millis(100)..=Duration::from_secs(3600))
                .contains(&self.stranger_heartbeat),
            "stranger_heartbeat_ms",
            self.stranger_heartbeat.as_millis(),
            "between 100 and 3600000 (an hour)",
        )?;
        check(
            self.stranger_secret.as_ref().is_none_or(|s| s.len() >= 16),
            "stranger_secret",
            "(hidden)",
            "at least 16 characters",
        )?;
        check(
            self.history_retention_days <= 36_500,
            "history_retention_days",
            self.history_retention_days,
            "at most 36500 (a hundred years), or 0 to keep history for ever",
        )?;
        check(
            (SECOND..=DAY).contains(&self.revalidate),
            "revalidate_secs",
            self.revalidate.as_secs(),
            "between 1 and 86400 (a day)",
        )?;
        check(
            (SECOND..=Duration::from_secs(3600)).contains(&self.header_timeout),
            "header_timeout_secs",
            self.header_timeout.as_secs(),
            "between 1 and 3600",
        )?;
        check(
            (SECOND..=Duration::from_secs(3600)).contains(&self.request_timeout),
            "request_timeout_secs",
            self.request_timeout.as_secs(),
            "between 1 and 3600",
        )?;
        check(
            self.connection_reserve <= 100_000,
            "connection_reserve",
            self.connection_reserve,
            "at most 100000",
        )?;
        check(
            (1..=100_000).contains(&self.max_sockets_per_user),
            "max_sockets_per_user",
            self.max_sockets_per_user,
            "between 1 and 100000",
        )?;
        check(
            self.user_updates_per_sec.is_finite() && self.user_updates_per_sec > 0.0,
            "user_updates_per_sec",
            self.user_updates_per_sec,
            "more than 0",
        )?;
        check(
            self.user_update_burst >= 1,
            "user_update_burst",
            self.user_update_burst,
            "at least 1",
        )?;
        check(
            self.login_ip_failures_per_min >= 1
                && self.login_account_failures_per_hour >= 1
                && self.signups_per_ip_per_hour >= 1
                && self.ws_tickets_per_min >= 1
                && self.changes_per_min >= 1,
            "login_ip_failures_per_min, login_account_failures_per_hour, signups_per_ip_per_hour, ws_tickets_per_min, changes_per_min",
            "0",
            "at least 1",
        )?;
        check(
            (1..=100_000).contains(&self.history_batch),
            "history_batch",
            self.history_batch,
            "between 1 and 100000",
        )?;
        check(
            self.history_linger <= Duration::from_secs(10),
            "history_linger",
            self.history_linger.as_millis(),
            "at most 10000 ms",
        )?;
        Ok(())
    }

    /// Frames above this many bytes are a protocol violation: the WebSocket
    /// layer refuses to buffer them and the connection closes with 1009.
    pub const fn hard_frame_limit() -> usize {
        64 * 1024
    }

    /// Whether per-address limits apply to `ip`.
    pub fn limits_address(&self, ip: std::net::IpAddr) -> bool {
        self.limit_loopback || !ip.is_loopback()
    }

    /// The suggested update intervals.
    pub fn pace(&self) -> nearby_core::pace::PaceConfig {
        nearby_core::pace::PaceConfig {
            fast_ms: self.fast_interval_ms,
            slow_ms: self.slow_interval_ms,
        }
    }

    /// The domain's view of these settings.
    pub fn session(&self) -> SessionConfig {
        SessionConfig {
            radius_m: self.radius_m,
            ttl_ms: i64::try_from(self.location_ttl.as_millis()).unwrap_or(i64::MAX),
            distance_epsilon_m: self.distance_epsilon_m,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert_eq!(ServerConfig::default().validate(), Ok(()));
        let bad = ServerConfig {
            radius_m: -1.0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().name, "radius_m");
        // Huge durations would overflow deadline arithmetic, and a zero
        // idle timeout would make a zero-period timer: refused up front.
        let bad = ServerConfig {
            location_ttl: Duration::from_secs(u64::MAX),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().name, "location_ttl_secs");
        let bad = ServerConfig {
            idle_timeout: Duration::ZERO,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().name, "idle_timeout_secs");
        let bad = ServerConfig {
            max_frame_bytes: 1 << 20,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().name, "max_frame_bytes");
    }
}

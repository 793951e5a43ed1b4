//! Settings of the service, validated once at start-up.

use std::time::Duration;

use nearby_core::session::SessionConfig;

const SECOND: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(24 * 3600);

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
            (1..=100_000).contains(&self.history_batch),
            "history_batch",
            self.history_batch,
            "between 1 and 100000",
        )?;
        Ok(())
    }

    /// Frames above this many bytes are a protocol violation: the WebSocket
    /// layer refuses to buffer them and the connection closes with 1009.
    pub const fn hard_frame_limit() -> usize {
        64 * 1024
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

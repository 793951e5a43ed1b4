//! When to reconnect: the rule of `docs/protocol.md` ("Reconnecting"), for
//! every client of ours.
//!
//! Wait the server's `reconnect_after_ms` (from its last `going_away`
//! frame), then a uniformly random delay between 0 and
//! `min(cap, base × 2^n)` ("full jitter"), `n` being the failed attempts
//! since the last successful handshake.

use std::time::Duration;

/// The protocol's base delay.
pub const BASE: Duration = Duration::from_millis(500);
/// The protocol's cap.
pub const CAP: Duration = Duration::from_secs(20);

/// Reconnection state of one client.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// Failed attempts since the last successful handshake.
    failures: u32,
    /// The server's suggestion, used once.
    after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BASE, CAP)
    }
}

impl Backoff {
    /// A backoff of `base` doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            failures: 0,
            after: Duration::ZERO,
        }
    }

    /// The server asked to wait `ms` before reconnecting (`going_away`).
    pub fn server_asked(&mut self, ms: u64) {
        self.after = Duration::from_millis(ms.min(60_000));
    }

    /// The longest jittered part of the next delay.
    pub fn ceiling(&self) -> Duration {
        let doubled = self
            .base
            .saturating_mul(1u32.checked_shl(self.failures.min(20)).unwrap_or(u32::MAX));
        doubled.min(self.cap)
    }

    /// The delay before the next attempt, given a uniform draw `unit` in
    /// [0, 1]; consumes the server's suggestion.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let jitter = self.ceiling().mul_f64(unit.clamp(0.0, 1.0));
        std::mem::take(&mut self.after) + jitter
    }

    /// [`Backoff::next_delay`] with a random draw.
    pub fn next_random_delay(&mut self) -> Duration {
        self.next_delay(rand::random::<f64>())
    }

    /// An attempt failed: the next ceiling doubles.
    pub fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }

    /// A handshake succeeded: back to the base.
    pub fn connected(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        assert_eq!(b.ceiling(), BASE);
        assert_eq!(b.next_delay(0.0), Duration::ZERO);
        assert_eq!(b.next_delay(1.0), BASE);
        for _ in 0..3 {
            b.failed();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(4));
        for _ in 0..100 {
            b.failed();
        }
        assert_eq!(b.ceiling(), CAP);
        assert_eq!(b.next_delay(0.5), CAP / 2);
        b.connected();
        assert_eq!(b.ceiling(), BASE);
    }

    #[test]
    fn the_servers_suggestion_comes_first_and_once() {
        let mut b = Backoff::default();
        b.server_asked(700);
        assert_eq!(b.next_delay(0.0), Duration::from_millis(700));
        assert_eq!(b.next_delay(0.0), Duration::ZERO);
        b.server_asked(u64::MAX);
        assert_eq!(b.next_delay(0.0), Duration::from_secs(60));
    }

    #[test]
    fn random_delays_stay_within_the_ceiling() {
        let mut b = Backoff::default();
        b.failed();
        for _ in 0..1000 {
            assert!(b.next_random_delay() <= Duration::from_secs(1));
        }
    }
}

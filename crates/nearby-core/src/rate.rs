//! Flood control: a token bucket per connection.
//!
//! Time is passed in (milliseconds), so the bucket is exact and testable.

/// Allows `rate` events per second on average and bursts of up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_ms: f64,
    burst: f64,
    tokens: f64,
    last_ms: i64,
}

impl TokenBucket {
    /// A full bucket at time `now_ms`. A non-positive or non-finite `rate`
    /// means "one per second"; `burst` is at least 1.
    pub fn new(rate_per_sec: f64, burst: u32, now_ms: i64) -> Self {
        let rate = if rate_per_sec.is_finite() && rate_per_sec > 0.0 {
            rate_per_sec
        } else {
            1.0
        };
        let burst = f64::from(burst.max(1));
        Self {
            rate_per_ms: rate / 1000.0,
            burst,
            tokens: burst,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: i64) {
        let elapsed = now_ms.saturating_sub(self.last_ms).max(0) as f64;
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed * self.rate_per_ms).min(self.burst);
    }

    /// Milliseconds until a token is available (0: one is available now).
    /// Takes nothing.
    pub fn wait_ms(&mut self, now_ms: i64) -> i64 {
        self.refill(now_ms);
        if self.tokens >= 1.0 {
            0
        } else {
            ((1.0 - self.tokens) / self.rate_per_ms).ceil() as i64
        }
    }

    /// Puts back a token taken for something that turned out not to count
    /// (up to the burst).
    pub fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }

    /// Whether the bucket is full at `now_ms` (nothing to remember).
    pub fn is_full(&mut self, now_ms: i64) -> bool {
        self.refill(now_ms);
        self.tokens >= self.burst
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now_ms: i64) -> bool {
        self.refill(now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn waits_are_exact_and_refunds_are_capped() {
        let mut b = TokenBucket::new(2.0, 1, 0);
        assert_eq!(b.wait_ms(0), 0);
        assert!(b.try_take(0));
        assert_eq!(b.wait_ms(0), 500);
        assert_eq!(b.wait_ms(400), 100);
        assert!(!b.is_full(400));
        b.refund();
        b.refund();
        assert!(b.is_full(400), "refunds never exceed the burst");
        assert!(b.try_take(400) && !b.try_take(400));
    }

    #[test]
    fn bursts_then_refills_at_rate() {
        let mut b = TokenBucket::new(10.0, 3, 0);
        assert!(b.try_take(0) && b.try_take(0) && b.try_take(0));
        assert!(!b.try_take(0));
        assert!(!b.try_take(99));
        assert!(b.try_take(100));
        assert!(!b.try_take(100));
        // A long pause refills only up to the burst.
        assert!((0..3).all(|_| b.try_take(60_000)));
        assert!(!b.try_take(60_000));
    }

    #[test]
    fn clock_going_backwards_grants_nothing() {
        let mut b = TokenBucket::new(1.0, 1, 10_000);
        assert!(b.try_take(10_000));
        assert!(!b.try_take(0));
        assert!(!b.try_take(10_500));
        assert!(b.try_take(11_000));
    }

    proptest! {
        /// Over any schedule, accepted events never exceed burst + rate × time.
        #[test]
        fn never_exceeds_the_budget(rate in 0.5f64..50.0, burst in 1u32..20, gaps in proptest::collection::vec(0i64..500, 1..300)) {
            let mut b = TokenBucket::new(rate, burst, 0);
            let (mut now, mut taken) = (0i64, 0u32);
            for g in gaps {
                now += g;
                if b.try_take(now) { taken += 1; }
            }
            let budget = f64::from(burst) + rate * now as f64 / 1000.0;
            prop_assert!(f64::from(taken) <= budget + 1e-9, "{} > {}", taken, budget);
        }
    }
}

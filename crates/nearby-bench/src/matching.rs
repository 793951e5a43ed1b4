//! Which send a delivery answers, so that its latency is measured from that
//! send however far behind the server is, and it counts for the step the
//! send belongs to even if it arrives after the step ended.
//!
//! Every client logs its last [`LOG`] sends (number, step, monotonic µs; 16
//! bytes each, 2 KiB per client). A `friend_location` carries `updated_at`, the server's clock
//! when it accepted the friend's update. For one receiver and one friend,
//! deliveries arrive in send order (the server handles a user's frames in
//! order, the bus keeps one publisher's order) and each send causes at most
//! one. So the send a delivery answers is the one after the previous
//! delivery's, and never one made after the server stamped the delivery.
//! The first delivery of a pair in a step takes the latest such send.
//!
//! A delivery the server dropped (a full queue) shifts the pair's later
//! matches to older sends until the next step: latencies then read high,
//! never low, and the step is not clean anyway (fewer received than
//! expected). The bench and the server must share a clock (same machine,
//! or synchronised): `updated_at` is compared with the bench's wall clock.

use std::sync::atomic::{AtomicU64, Ordering};

/// Sends remembered per client: a delivery more than this many sends
/// behind is not matched (counted as unmatched): 12.8 s at 100 ms.
pub const LOG: usize = 128;

/// Slack for the server's millisecond rounding of `updated_at`.
pub const CLOCK_SLACK_MS: i64 = 1;

/// One remembered send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Monotonic, µs since the bench process's origin (whose wall-clock
    /// time the caller knows: the wall clock of a send is that plus this).
    pub mono_us: u64,
    /// The step it was sent in (0: not measured; at most 65 535).
    pub step: u16,
}

/// One client's last sends, written by its task, read by its friends'.
#[derive(Debug)]
pub struct SendLog {
    /// Number of the latest send (0: none yet).
    latest: AtomicU64,
    /// Per slot: the send number (high 48 bits) and step (low 16), then
    /// the monotonic time.
    slots: Vec<[AtomicU64; 2]>,
}

impl Default for SendLog {
    fn default() -> Self {
        Self {
            latest: AtomicU64::new(0),
            slots: (0..LOG).map(|_| Default::default()).collect(),
        }
    }
}

impl SendLog {
    /// Logs the next send; returns its number.
    pub fn push(&self, sent: Sent) -> u64 {
        let seq = self.latest.load(Ordering::Relaxed) + 1;
        let slot = &self.slots[(seq as usize) % LOG];
        slot[0].store(0, Ordering::Release); // being written
        slot[1].store(sent.mono_us, Ordering::Release);
        slot[0].store(seq << 16 | u64::from(sent.step), Ordering::Release);
        self.latest.store(seq, Ordering::Release);
        seq
    }

    /// The latest send's number (0: none).
    pub fn latest(&self) -> u64 {
        self.latest.load(Ordering::Acquire)
    }

    /// Send `seq`, if still in the log.
    pub fn get(&self, seq: u64) -> Option<Sent> {
        if seq == 0 {
            return None;
        }
        let slot = &self.slots[(seq as usize) % LOG];
        let head = slot[0].load(Ordering::Acquire);
        if head >> 16 != seq {
            return None;
        }
        let mono_us = slot[1].load(Ordering::Acquire);
        // Overwritten meanwhile: too old.
        (slot[0].load(Ordering::Acquire) == head).then_some(Sent {
            mono_us,
            step: (head & 0xffff) as u16,
        })
    }
}

/// The send a delivery stamped `stamped_ms` answers, given the pair's
/// previous match `last` (see the module doc). `None` if the friend had
/// sent nothing by then (or it is no longer known when).
pub fn match_send(
    last: Option<u64>,
    latest: u64,
    stamped_ms: i64,
    sent_ms: impl Fn(u64) -> Option<i64>,
) -> Option<u64> {
    let mut upper = latest;
    // Never a send made after the server stamped the delivery.
    while upper > 0 && sent_ms(upper).is_some_and(|t| t > stamped_ms + CLOCK_SLACK_MS) {
        upper -= 1;
    }
    if upper == 0 {
        return None;
    }
    // After deliveries the server dropped, `last + 1` trails the truth; once
    // it trails by the whole log, take the oldest send still logged (one to
    // spare for a send being logged meanwhile) rather than give up on the
    // pair for good: latencies read high, never low.
    let oldest = latest.saturating_sub(LOG as u64 - 2).max(1);
    Some(last.map_or(upper, |l| (l + 1).max(oldest).min(upper)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A log of sends at these wall-clock ms (the origin is at 0 ms).
    fn log_of(times: &[i64]) -> SendLog {
        let log = SendLog::default();
        for t in times {
            log.push(Sent {
                mono_us: *t as u64 * 1000,
                step: 1,
            });
        }
        log
    }

    fn wall(log: &SendLog, seq: u64) -> Option<i64> {
        log.get(seq).map(|s| (s.mono_us / 1000) as i64)
    }

    #[test]
    fn a_late_delivery_is_measured_from_its_own_send() {
        // Sends every second; the server is 2.5 s behind.
        let log = log_of(&[1000, 2000, 3000, 4000, 5000]);
        let at = |s| wall(&log, s);
        // The first delivery of a pair takes the latest plausible send…
        assert_eq!(match_send(None, 3, 1500, at), Some(1));
        // …then each next one the send after, even when newer sends exist:
        // the delivery stamped 3500 answers send 2, made at 2000, not send
        // 3 (3000) which the latest-send rule would have picked.
        assert_eq!(match_send(Some(1), 5, 3500, at), Some(2));
        assert_eq!(match_send(Some(2), 5, 4500, at), Some(3));
    }

    #[test]
    fn never_a_send_made_after_the_stamp() {
        let log = log_of(&[1000, 2000, 3000]);
        let at = |s| wall(&log, s);
        assert_eq!(match_send(Some(1), 3, 1800, at), Some(1), "a repeat stays");
        assert_eq!(match_send(None, 3, 998, at), None, "nothing sent yet");
        assert_eq!(match_send(None, 3, 2001, at), Some(2), "1 ms of slack");
    }

    #[test]
    fn a_pair_left_behind_by_dropped_deliveries_is_matched_again() {
        // 300 sends a second apart; the pair's last match is send 5, far
        // older than the log, because the server dropped many deliveries.
        let times: Vec<i64> = (1..=300).map(|i| i * 1000).collect();
        let log = log_of(&times);
        let at = |s| wall(&log, s);
        let m = match_send(Some(5), 300, 299_500, at).expect("matched");
        assert!(log.get(m).is_some(), "a send still in the log: {m}");
        assert!(m <= 299, "never after the stamp: {m}");
        assert_eq!(
            m,
            300 - LOG as u64 + 2,
            "the oldest logged, so latency reads high"
        );
    }

    #[test]
    fn the_log_forgets_old_sends() {
        let times: Vec<i64> = (1..=(LOG as i64 + 5)).map(|i| i * 1000).collect();
        let log = log_of(&times);
        assert_eq!(log.latest(), LOG as u64 + 5);
        assert!(log.get(1).is_none());
        assert_eq!(wall(&log, LOG as u64 + 5), Some((LOG as i64 + 5) * 1000));
        assert_eq!(log.get(LOG as u64 + 5).map(|s| s.step), Some(1));
        assert!(log.get(0).is_none());
    }

    proptest! {
        /// With every delivery received, each one is matched to exactly the
        /// send that caused it, whatever the server's (in-order) lag.
        #[test]
        fn in_order_deliveries_match_their_sends_exactly(
            first in 0i64..1000,
            rest in proptest::collection::vec(0i64..5000, 0..29),
        ) {
            // The run starts idle (the bench waits for set-up): the first
            // delivery comes within an interval of its send; later ones lag
            // up to five intervals.
            let lags: Vec<i64> = std::iter::once(first).chain(rest).collect();
            let n = lags.len();
            let sends: Vec<i64> = (0..n as i64).map(|i| 10_000 + i * 1000).collect();
            // The server accepts in order: accept_j = max(send_j + lag_j, accept_{j-1}).
            let mut accepted = Vec::with_capacity(n);
            for (j, lag) in lags.iter().enumerate() {
                let a = (sends[j] + lag).max(accepted.last().copied().unwrap_or(0));
                accepted.push(a);
            }
            let log = log_of(&sends);
            let at = |s| wall(&log, s);
            let mut last = None;
            for (j, stamp) in accepted.iter().enumerate() {
                // Sends made by the time this delivery arrives: all with
                // send time <= its stamp (the rest are excluded anyway).
                let latest = sends.iter().filter(|t| **t <= *stamp).count().max(j + 1) as u64;
                let m = match_send(last, latest, *stamp, at);
                prop_assert_eq!(m, Some(j as u64 + 1));
                last = m;
            }
        }
    }
}

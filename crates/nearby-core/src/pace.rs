//! The update interval the server suggests to a client.
//!
//! A phone spends battery on every report, and a report only matters to
//! friends who can see it. [`Pace`] says *fast* while the user's session
//! shows at least one friend the user shares with (a friend who shares
//! back, active within the radius), and *slow* otherwise, or while the user
//! is hidden (ghost mode).
//!
//! **The privacy property.** The answer is a function of the user's own
//! grants, the user's ghost mode and the set of friends the session shows
//! the user, nothing else. So the interval tells the user nothing they are
//! not already shown: it never depends on the position of anyone who does
//! not share with them. A viewer who does not share back therefore never
//! makes the pace fast, however near they are (an earlier rule did, and
//! let a client locate such a friend by moving and watching its interval).
//!
//! Cheap on the hot path: [`Pace::may_change`] tells, from what a batch of
//! events did, whether the answer can have changed at all (while slow, only
//! a friend newly shown; while fast, only a friend leaving), so the full
//! check over the shown friends runs on those transitions only.

use crate::UserId;

/// Fast and slow intervals, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaceConfig {
    /// While a viewer is near.
    pub fast_ms: u32,
    /// While nobody who can see the user is near.
    pub slow_ms: u32,
}

impl Default for PaceConfig {
    fn default() -> Self {
        Self {
            fast_ms: 5_000,
            slow_ms: 60_000,
        }
    }
}

/// One connection's suggested interval and what it is decided from.
#[derive(Debug, Clone)]
pub struct Pace {
    cfg: PaceConfig,
    /// The friends the user shares with, sorted, each with when that
    /// sharing ends (`i64::MAX`: it does not).
    viewers: Vec<(UserId, i64)>,
    hidden: bool,
    fast: bool,
}

impl Pace {
    /// Slow, with no viewers yet.
    pub fn new(cfg: PaceConfig) -> Self {
        Self {
            cfg,
            viewers: Vec::new(),
            hidden: false,
            fast: false,
        }
    }

    /// The interval to suggest now, milliseconds.
    pub fn interval_ms(&self) -> u32 {
        if self.fast {
            self.cfg.fast_ms
        } else {
            self.cfg.slow_ms
        }
    }

    /// The friends the user shares with, and until when (`None`: for good).
    pub fn set_viewers(&mut self, viewers: impl IntoIterator<Item = (UserId, Option<i64>)>) {
        let mut v: Vec<(UserId, i64)> = viewers
            .into_iter()
            .map(|(id, until)| (id, until.unwrap_or(i64::MAX)))
            .collect();
        v.sort_unstable();
        v.dedup_by_key(|(id, _)| *id);
        v.shrink_to_fit();
        self.viewers = v;
    }

    /// Whether the user is hidden from everyone (ghost mode).
    pub fn set_hidden(&mut self, hidden: bool) {
        self.hidden = hidden;
    }

    /// Whether `id` may see the user at `now_ms`.
    pub fn is_viewer(&self, id: UserId, now_ms: i64) -> bool {
        self.viewers
            .binary_search_by_key(&id, |(v, _)| *v)
            .is_ok_and(|i| now_ms < self.viewers[i].1)
    }

    /// Whether events that showed someone (`shown_any`) or dropped someone
    /// (`left_any`) can change the answer: only a friend newly shown while
    /// slow, or a friend leaving while fast.
    pub fn may_change(&self, shown_any: bool, left_any: bool) -> bool {
        if self.fast {
            left_any
        } else {
            shown_any
        }
    }

    /// Decides again from the friends the session shows now (the only
    /// input about other people's positions). Returns the new interval if
    /// it changed.
    pub fn decide(&mut self, mut shown: impl Iterator<Item = UserId>, now_ms: i64) -> Option<u32> {
        let fast = !self.hidden && shown.any(|id| self.is_viewer(id, now_ms));
        (std::mem::replace(&mut self.fast, fast) != fast).then(|| self.interval_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pace() -> Pace {
        let mut p = Pace::new(PaceConfig {
            fast_ms: 5,
            slow_ms: 60,
        });
        p.set_viewers([(UserId(2), None), (UserId(3), Some(100))]);
        p
    }

    #[test]
    fn fast_only_while_a_viewer_is_shown_and_the_user_is_not_hidden() {
        let mut p = pace();
        assert_eq!(p.interval_ms(), 60);
        // A friend shown who cannot see the user changes nothing.
        assert_eq!(p.decide([UserId(9)].into_iter(), 0), None);
        assert_eq!(p.decide([UserId(9), UserId(2)].into_iter(), 0), Some(5));
        assert_eq!(p.decide([UserId(2)].into_iter(), 0), None, "no change");
        p.set_hidden(true);
        assert_eq!(p.decide([UserId(2)].into_iter(), 0), Some(60));
        p.set_hidden(false);
        // A grant that ended no longer counts.
        assert_eq!(p.decide([UserId(3)].into_iter(), 50), Some(5));
        assert_eq!(p.decide([UserId(3)].into_iter(), 100), Some(60));
        // Nobody shown: slow, whoever else exists.
        assert_eq!(p.decide(std::iter::empty(), 0), None);
    }

    #[test]
    fn only_the_transitions_that_can_matter_ask_for_a_decision() {
        let mut p = pace();
        assert!(p.may_change(true, false));
        assert!(!p.may_change(false, true));
        p.decide([UserId(2)].into_iter(), 0);
        assert!(p.may_change(false, true));
        assert!(!p.may_change(true, false));
    }

    proptest! {
        /// Whatever the sequence, the answer is exactly "not hidden, and a
        /// viewer is shown", and `decide` reports each change once.
        #[test]
        fn decide_matches_the_rule(steps in proptest::collection::vec(
            (proptest::collection::vec(0i64..6, 0..4), any::<bool>()), 0..30)
        ) {
            let mut p = pace();
            let mut last = p.interval_ms();
            for (shown, hidden) in steps {
                p.set_hidden(hidden);
                let changed = p.decide(shown.iter().map(|i| UserId(*i)), 0);
                let want_fast = !hidden && shown.iter().any(|i| *i == 2 || *i == 3);
                let want = if want_fast { 5 } else { 60 };
                prop_assert_eq!(p.interval_ms(), want);
                prop_assert_eq!(changed, (want != last).then_some(want));
                last = want;
            }
        }
    }
}

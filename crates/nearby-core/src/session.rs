//! The nearby-friends state machine of one live connection.
//!
//! A [`Session`] knows the user's own latest location and, for every friend
//! who shares their location with the user, that friend's latest known
//! location and whether the client currently shows them. Every input returns
//! the events to push, so the rule "the client never shows a ghost" lives in
//! one place:
//!
//! * a friend is *shown* when both locations are known, the friend's is
//!   fresher than the TTL, and they are within the radius;
//! * every transition from hidden to shown emits [`FriendEvent::Location`];
//!   every transition from shown to hidden emits exactly one
//!   [`FriendEvent::Left`] with its reason; a friend who is not shown never
//!   gets a `Left` (the client has nothing to remove);
//! * while shown, a friend's own move always emits a `Location` (their
//!   `updated_at` changed); the user's own move emits one only when the
//!   distance changed by at least [`SessionConfig::distance_epsilon_m`], which
//!   keeps a walking user from re-sending every friend's row each update;
//! * a friend who shares [`Precision::Approximate`] is seen only through
//!   both users' cells ([`crate::Point::cell_centre`]): the distance between
//!   the centres rounded to the kilometre decides the radius and is what
//!   the client gets, with a bearing in eighths of a circle. Everything
//!   the client learns is a function of the two cells, so no sequence of
//!   the viewer's own moves narrows the friend down below their cell;
//! * a friend's grant that ends by itself ([`Grant::until_ms`]) ends here:
//!   [`Session::end_expired`] drops them as `unshared`, without waiting for
//!   any message.

use crate::{Grant, LeftReason, Location, Point, Precision, UserId};

/// The knobs of the nearby rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionConfig {
    /// Friends farther than this (metres) are not nearby.
    pub radius_m: f64,
    /// A location older than this (milliseconds) means the friend is inactive.
    pub ttl_ms: i64,
    /// On the user's own move, re-send a shown friend's distance only if it
    /// changed by at least this many metres.
    pub distance_epsilon_m: f64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            radius_m: 8047.0,
            ttl_ms: 600_000,
            distance_epsilon_m: 25.0,
        }
    }
}

/// A friend the client should show: who, how far, how recent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nearby {
    /// The friend.
    pub id: UserId,
    /// Great-circle distance from the user, metres.
    pub distance_m: f64,
    /// Direction from the user, degrees clockwise from north.
    pub bearing_deg: f64,
    /// When the friend's location was accepted, Unix milliseconds.
    pub updated_at: i64,
    /// The friend shares an approximate position: `distance_m` is whole
    /// kilometres between cell centres, `bearing_deg` a multiple of 45.
    pub approximate: bool,
}

/// What the client must be told.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FriendEvent {
    /// Show (or update) this friend.
    Location(Nearby),
    /// Stop showing this friend, for this reason.
    Left {
        /// The friend.
        id: UserId,
        /// Why.
        reason: LeftReason,
    },
}

#[derive(Debug, Clone, Copy)]
struct Tracked {
    last: Option<Location>,
    /// The distance last sent to the client, if the client shows the friend.
    shown: Option<f64>,
    /// When the friend's grant ends; `i64::MAX` when it does not.
    until_ms: i64,
    /// The friend shares only an approximate position.
    approximate: bool,
}

impl Default for Tracked {
    fn default() -> Self {
        Self {
            last: None,
            shown: None,
            until_ms: i64::MAX,
            approximate: false,
        }
    }
}

impl Tracked {
    fn new(grant: Grant, last: Option<Location>) -> Self {
        let mut t = Self {
            last,
            ..Self::default()
        };
        t.set_terms(grant);
        t
    }

    /// Takes the grant's terms; true if the precision changed.
    fn set_terms(&mut self, grant: Grant) -> bool {
        let approximate = grant.precision == Precision::Approximate;
        self.until_ms = grant.until_ms.unwrap_or(i64::MAX);
        std::mem::replace(&mut self.approximate, approximate) != approximate
    }
}

/// What the viewer at `own` learns of a friend at `friend`: distance (m)
/// and bearing (degrees). For an approximate friend both come from the two
/// cell centres only.
fn view(own: Point, friend: Point, approximate: bool) -> (f64, f64) {
    if !approximate {
        return (own.distance_m(friend), own.bearing_deg(friend));
    }
    let (a, b) = (own.cell_centre(), friend.cell_centre());
    let distance_m = (a.distance_m(b) / 1000.0).round() * 1000.0;
    let bearing_deg = if a == b {
        0.0
    } else {
        ((a.bearing_deg(b) / 45.0).round() * 45.0).rem_euclid(360.0)
    };
    (distance_m, bearing_deg)
}

/// The tracked friends, sorted by id in a vector of exactly their number:
/// a session lives as long as its connection and most of its friends never
/// change, so lookups by binary search over a tight array cost a third of
/// the memory of a hash map (64 buckets and control bytes for 40 friends)
/// and leave no freed buckets behind from growing.
#[derive(Debug, Clone, Default)]
struct Friends(Vec<(UserId, Tracked)>);

impl Friends {
    /// From `(id, tracked)` pairs in any order; for a repeated id the last
    /// pair wins, as with repeated inserts.
    fn from_unsorted(mut v: Vec<(UserId, Tracked)>) -> Self {
        // Stable, so equal ids keep their order and the last is kept below.
        v.sort_by_key(|(id, _)| *id);
        v.reverse();
        v.dedup_by_key(|(id, _)| *id);
        v.reverse();
        v.shrink_to_fit();
        Self(v)
    }

    fn find(&self, id: UserId) -> Result<usize, usize> {
        self.0.binary_search_by_key(&id, |(k, _)| *k)
    }

    fn contains_key(&self, id: UserId) -> bool {
        self.find(id).is_ok()
    }

    fn get_mut(&mut self, id: UserId) -> Option<&mut Tracked> {
        let i = self.find(id).ok()?;
        Some(&mut self.0[i].1)
    }

    /// The entry of `id`, inserted as default if missing.
    fn entry_or_default(&mut self, id: UserId) -> &mut Tracked {
        let i = match self.find(id) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (id, Tracked::default()));
                i
            }
        };
        &mut self.0[i].1
    }

    fn remove(&mut self, id: UserId) -> Option<Tracked> {
        let i = self.find(id).ok()?;
        Some(self.0.remove(i).1)
    }

    fn iter(&self) -> impl Iterator<Item = (UserId, &Tracked)> + '_ {
        self.0.iter().map(|(id, t)| (*id, t))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (UserId, &mut Tracked)> + '_ {
        self.0.iter_mut().map(|(id, t)| (*id, t))
    }
}

/// One user's live view of their friends. See the module docs for the rules.
#[derive(Debug, Clone)]
pub struct Session {
    me: UserId,
    cfg: SessionConfig,
    own: Option<Location>,
    friends: Friends,
    /// No later than the moment the next shown friend goes stale (see
    /// [`Session::next_expiry`]); lowered as friends are shown, made exact
    /// by [`Session::on_tick`].
    expiry_hint: Option<i64>,
    /// The earliest end of a tracked friend's grant, exact.
    grant_expiry: Option<i64>,
}

impl Session {
    /// Starts a session from what storage knows: the user's own cached
    /// location and each sharing friend's grant and cached location. Returns
    /// the session and the snapshot to send first, nearest friend first.
    pub fn start(
        me: UserId,
        cfg: SessionConfig,
        own: Option<Location>,
        friends: impl IntoIterator<Item = (Grant, Option<Location>)>,
        now_ms: i64,
    ) -> (Self, Vec<Nearby>) {
        let friends = friends
            .into_iter()
            .filter(|(g, _)| g.id != me)
            .map(|(g, last)| (g.id, Tracked::new(g, last)))
            .collect();
        let mut session = Self {
            me,
            cfg,
            own,
            friends: Friends::from_unsorted(friends),
            expiry_hint: None,
            grant_expiry: None,
        };
        session.grant_expiry = session.exact_grant_expiry();
        let (cfg, hint) = (&session.cfg, &mut session.expiry_hint);
        let mut snapshot = Vec::new();
        for (id, t) in session.friends.iter_mut() {
            if let Some(FriendEvent::Location(n)) =
                evaluate_hinted(cfg, own, hint, id, t, true, now_ms)
            {
                snapshot.push(n);
            }
        }
        snapshot.sort_by(|a, b| a.distance_m.total_cmp(&b.distance_m));
        (session, snapshot)
    }

    /// The user this session belongs to.
    pub fn user(&self) -> UserId {
        self.me
    }

    /// The user's own latest location, if known.
    pub fn own_location(&self) -> Option<Location> {
        self.own
    }

    /// Whether `id` is a friend who shares with this user (so the session
    /// listens to their channel).
    pub fn tracks(&self, id: UserId) -> bool {
        self.friends.contains_key(id)
    }

    /// The friends this session listens to.
    pub fn tracked(&self) -> impl Iterator<Item = UserId> + '_ {
        self.friends.iter().map(|(id, _)| id)
    }

    /// The friends the client currently shows.
    pub fn shown(&self) -> impl Iterator<Item = UserId> + '_ {
        self.friends
            .iter()
            .filter(|(_, t)| t.shown.is_some())
            .map(|(id, _)| id)
    }

    /// The user moved. Returns the friends who entered or left the radius
    /// and the shown friends whose distance changed noticeably.
    pub fn on_own_location(&mut self, loc: Location, now_ms: i64) -> Vec<FriendEvent> {
        if self.own.is_some_and(|o| o.ts_ms > loc.ts_ms) {
            return Vec::new();
        }
        self.own = Some(loc);
        let (cfg, own, hint) = (&self.cfg, self.own, &mut self.expiry_hint);
        self.friends
            .iter_mut()
            .filter_map(|(id, t)| evaluate_hinted(cfg, own, hint, id, t, false, now_ms))
            .collect()
    }

    /// A friend's update arrived from the bus. Updates from users this
    /// session does not track, and updates strictly older than the one
    /// known, are ignored (a late message must not move a friend back in time).
    pub fn on_friend_location(
        &mut self,
        id: UserId,
        loc: Location,
        now_ms: i64,
    ) -> Option<FriendEvent> {
        let t = self.friends.get_mut(id)?;
        // Strictly older, or the very same update again (a ring change
        // delivers the messages of its overlap through two servers): two
        // different updates in the same millisecond are both news, and the
        // bus delivers one publisher's messages in order.
        if t.last.is_some_and(|l| l.ts_ms > loc.ts_ms || l == loc) {
            return None;
        }
        t.last = Some(loc);
        self.evaluate(id, true, now_ms)
    }

    /// A friend became visible (friendship accepted or sharing granted), with
    /// their cached location if any. Returns the event if they are nearby.
    /// For a friend already tracked this takes the grant's new terms, and
    /// re-sends their row only if the precision changed.
    pub fn add_friend(
        &mut self,
        grant: Grant,
        last: Option<Location>,
        now_ms: i64,
    ) -> Option<FriendEvent> {
        let id = grant.id;
        if id == self.me {
            return None;
        }
        let new = !self.friends.contains_key(id);
        let t = self.friends.entry_or_default(id);
        let precision_changed = t.set_terms(grant);
        if let Some(l) = last {
            if t.last.is_none_or(|old| old.ts_ms < l.ts_ms) {
                t.last = Some(l);
            }
        }
        self.grant_expiry = self.exact_grant_expiry();
        self.evaluate(id, new || precision_changed, now_ms)
    }

    /// The terms a tracked friend's grant has now, if tracked.
    pub fn grant(&self, id: UserId) -> Option<Grant> {
        let i = self.friends.find(id).ok()?;
        let t = &self.friends.0[i].1;
        Some(Grant {
            id,
            until_ms: (t.until_ms != i64::MAX).then_some(t.until_ms),
            precision: if t.approximate {
                Precision::Approximate
            } else {
                Precision::Precise
            },
        })
    }

    /// A friend stopped being visible (unshared or unfriended). Returns the
    /// `Left` event if the client was showing them.
    pub fn remove_friend(&mut self, id: UserId, reason: LeftReason) -> Option<FriendEvent> {
        let t = self.friends.remove(id)?;
        if self.grant_expiry == Some(t.until_ms) {
            self.grant_expiry = self.exact_grant_expiry();
        }
        t.shown.map(|_| FriendEvent::Left { id, reason })
    }

    /// Grants that ran out by `now_ms` end: those friends are no longer
    /// tracked, and leave as `unshared` if shown. Returns the events and
    /// every friend dropped (whose channels the caller leaves).
    pub fn end_expired(&mut self, now_ms: i64) -> (Vec<FriendEvent>, Vec<UserId>) {
        if self.grant_expiry.is_none_or(|e| now_ms < e) {
            return (Vec::new(), Vec::new());
        }
        let ended: Vec<UserId> = self
            .friends
            .iter()
            .filter(|(_, t)| t.until_ms <= now_ms)
            .map(|(id, _)| id)
            .collect();
        let events = ended
            .iter()
            .filter_map(|id| self.remove_friend(*id, LeftReason::Unshared))
            .collect();
        self.grant_expiry = self.exact_grant_expiry();
        (events, ended)
    }

    fn exact_grant_expiry(&self) -> Option<i64> {
        self.friends
            .iter()
            .map(|(_, t)| t.until_ms)
            .filter(|u| *u != i64::MAX)
            .min()
    }

    /// A friend's position is gone (they logged out): they leave as
    /// `inactive` if shown, as if it had gone stale, and stay followed, so
    /// their next update shows them again.
    pub fn forget_location(&mut self, id: UserId) -> Option<FriendEvent> {
        let t = self.friends.get_mut(id)?;
        t.last = None;
        t.shown.take().map(|_| FriendEvent::Left {
            id,
            reason: LeftReason::Inactive,
        })
    }

    /// When to call [`Session::on_tick`] and [`Session::end_expired`]
    /// next, Unix milliseconds: never later than the moment the next shown
    /// friend goes stale or the next grant ends, possibly earlier (a tick
    /// that finds nothing to do is harmless). O(1), so a connection can ask
    /// after every message; `None` while nobody is shown and no grant ends.
    pub fn next_expiry(&self) -> Option<i64> {
        match (self.expiry_hint, self.grant_expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The exact moment the next shown friend goes stale. O(friends).
    fn exact_expiry(&self) -> Option<i64> {
        self.friends
            .iter()
            .map(|(_, t)| t)
            .filter(|t| t.shown.is_some())
            .filter_map(|t| t.last.map(|l| l.ts_ms.saturating_add(self.cfg.ttl_ms)))
            .min()
    }

    /// Time passed: friends whose location went stale leave as `inactive`.
    pub fn on_tick(&mut self, now_ms: i64) -> Vec<FriendEvent> {
        let (cfg, own) = (&self.cfg, self.own);
        let events = self
            .friends
            .iter_mut()
            .filter(|(_, t)| t.shown.is_some() && !is_fresh(cfg, t.last, now_ms))
            .filter_map(|(id, t)| evaluate(cfg, own, id, t, false, now_ms))
            .collect();
        self.expiry_hint = self.exact_expiry();
        events
    }

    /// The friends the client shows right now, nearest first.
    pub fn snapshot(&self) -> Vec<Nearby> {
        let mut v: Vec<Nearby> = self
            .friends
            .iter()
            .filter_map(|(id, t)| {
                let last = t.last?;
                Some(Nearby {
                    id,
                    distance_m: t.shown?,
                    bearing_deg: self
                        .own
                        .map_or(0.0, |o| view(o.point, last.point, t.approximate).1),
                    updated_at: last.ts_ms,
                    approximate: t.approximate,
                })
            })
            .collect();
        v.sort_by(|a, b| a.distance_m.total_cmp(&b.distance_m));
        v
    }

    /// Re-decides whether friend `id` is shown and returns the transition,
    /// if any (see [`evaluate`]).
    fn evaluate(&mut self, id: UserId, friend_moved: bool, now_ms: i64) -> Option<FriendEvent> {
        let t = self.friends.get_mut(id)?;
        evaluate_hinted(
            &self.cfg,
            self.own,
            &mut self.expiry_hint,
            id,
            t,
            friend_moved,
            now_ms,
        )
    }
}

/// [`evaluate`], then [`lower_hint`]: every re-decision that may show a
/// friend keeps the expiry hint sound.
fn evaluate_hinted(
    cfg: &SessionConfig,
    own: Option<Location>,
    hint: &mut Option<i64>,
    id: UserId,
    t: &mut Tracked,
    friend_moved: bool,
    now_ms: i64,
) -> Option<FriendEvent> {
    let ev = evaluate(cfg, own, id, t, friend_moved, now_ms);
    lower_hint(hint, cfg, t);
    ev
}

/// Keeps `hint` no later than `t`'s expiry if `t` is shown. The true next
/// expiry only moves earlier when a friend is (re)shown, which always passes
/// here; it moves later as friends send news, which the hint ignores until
/// the next tick makes it exact.
fn lower_hint(hint: &mut Option<i64>, cfg: &SessionConfig, t: &Tracked) {
    if let (Some(_), Some(l)) = (t.shown, t.last) {
        let e = l.ts_ms.saturating_add(cfg.ttl_ms);
        *hint = Some(hint.map_or(e, |h| h.min(e)));
    }
}

fn is_fresh(cfg: &SessionConfig, loc: Option<Location>, now_ms: i64) -> bool {
    loc.is_some_and(|l| now_ms.saturating_sub(l.ts_ms) < cfg.ttl_ms)
}

/// The rule of the module docs for one friend: updates `t.shown` and returns
/// the transition, if any. `friend_moved` forces a `Location` for a shown
/// friend (their timestamp changed even if the distance did not). A free
/// function over one entry so that callers can sweep the whole map with
/// `iter_mut` without collecting ids first.
fn evaluate(
    cfg: &SessionConfig,
    own: Option<Location>,
    id: UserId,
    t: &mut Tracked,
    friend_moved: bool,
    now_ms: i64,
) -> Option<FriendEvent> {
    let fresh = is_fresh(cfg, t.last, now_ms);
    let seen = match (own, t.last) {
        (Some(o), Some(l)) => Some(view(o.point, l.point, t.approximate)),
        _ => None,
    };
    // An approximate friend's radius is decided on the rounded distance
    // too: the exact edge of the radius would give them away.
    let in_range = match seen {
        Some((d, _)) if fresh => (d <= cfg.radius_m).then_some(d),
        _ => None,
    };
    let updated_at = t.last.map_or(0, |l| l.ts_ms);
    let bearing_deg = seen.map_or(0.0, |(_, b)| b);
    let approximate = t.approximate;
    let show = |t: &mut Tracked, distance_m: f64| {
        t.shown = Some(distance_m);
        Some(FriendEvent::Location(Nearby {
            id,
            distance_m,
            bearing_deg,
            updated_at,
            approximate,
        }))
    };
    match (t.shown, in_range) {
        (None, Some(d)) => show(t, d),
        (Some(prev), Some(d)) if friend_moved || (d - prev).abs() >= cfg.distance_epsilon_m => {
            show(t, d)
        }
        (Some(_), None) => {
            t.shown = None;
            let reason = if fresh {
                LeftReason::OutOfRange
            } else {
                t.last = None;
                LeftReason::Inactive
            };
            Some(FriendEvent::Left { id, reason })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Point;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    pub(super) const ME: UserId = UserId(1);
    pub(super) const BOB: UserId = UserId(2);
    const CAROL: UserId = UserId(3);

    fn cfg() -> SessionConfig {
        SessionConfig {
            radius_m: 1000.0,
            ttl_ms: 10_000,
            distance_epsilon_m: 25.0,
        }
    }

    /// A location `north_m` metres north of (0, 0) at time `ts`.
    fn at(north_m: f64, ts: i64) -> Location {
        let lat = north_m / nearby_geo::EARTH_RADIUS_M;
        Location {
            point: Point::new(lat.to_degrees(), 0.0).unwrap(),
            ts_ms: ts,
        }
    }

    /// A session whose friends all share precisely, for good.
    fn start(
        me: UserId,
        cfg: SessionConfig,
        own: Option<Location>,
        friends: impl IntoIterator<Item = (UserId, Option<Location>)>,
        now_ms: i64,
    ) -> (Session, Vec<Nearby>) {
        let friends = friends.into_iter().map(|(id, l)| (Grant::precise(id), l));
        Session::start(me, cfg, own, friends, now_ms)
    }

    fn left(id: UserId, reason: LeftReason) -> Option<FriendEvent> {
        Some(FriendEvent::Left { id, reason })
    }

    fn distance(ev: Option<FriendEvent>) -> f64 {
        match ev {
            Some(FriendEvent::Location(n)) => n.distance_m,
            other => panic!("expected a location event, got {other:?}"),
        }
    }

    #[test]
    fn snapshot_holds_only_fresh_friends_in_range_nearest_first() {
        let friends = [
            (BOB, Some(at(800.0, 0))),
            (CAROL, Some(at(300.0, 0))),
            (UserId(4), Some(at(5000.0, 0))),
            (UserId(5), None),
            (UserId(6), Some(at(10.0, -20_000))),
        ];
        let (s, snap) = start(ME, cfg(), Some(at(0.0, 0)), friends, 1);
        let ids: Vec<_> = snap.iter().map(|n| n.id).collect();
        assert_eq!(ids, vec![CAROL, BOB]);
        assert!((snap[0].distance_m - 300.0).abs() < 0.01);
        assert_eq!(s.snapshot(), snap);
        assert_eq!(s.tracked().count(), 5);
    }

    #[test]
    fn no_own_location_means_empty_snapshot_until_the_first_move() {
        let (mut s, snap) = start(ME, cfg(), None, [(BOB, Some(at(100.0, 0)))], 0);
        assert!(snap.is_empty());
        let evs = s.on_own_location(at(0.0, 1), 1);
        assert_eq!(evs.len(), 1);
        assert!((distance(evs.first().copied()) - 100.0).abs() < 0.01);
    }

    #[test]
    fn friend_moving_out_and_back_in() {
        let (mut s, _) = start(ME, cfg(), Some(at(0.0, 0)), [(BOB, None)], 0);
        assert!((distance(s.on_friend_location(BOB, at(500.0, 1), 1)) - 500.0).abs() < 0.01);
        // A shown friend's move always emits, even a tiny one.
        assert!(s.on_friend_location(BOB, at(501.0, 2), 2).is_some());
        assert_eq!(
            s.on_friend_location(BOB, at(1500.0, 3), 3),
            left(BOB, LeftReason::OutOfRange)
        );
        // Out of range and still out: nothing, not a second `Left`.
        assert_eq!(s.on_friend_location(BOB, at(2000.0, 4), 4), None);
        assert!(s.on_friend_location(BOB, at(10.0, 5), 5).is_some());
    }

    #[test]
    fn a_forgotten_friend_leaves_as_inactive_and_comes_back_on_the_next_move() {
        let (mut s, _) = start(ME, cfg(), Some(at(0.0, 0)), [(BOB, None)], 0);
        assert!(s.on_friend_location(BOB, at(100.0, 10), 10).is_some());
        assert_eq!(s.forget_location(BOB), left(BOB, LeftReason::Inactive));
        assert!(s.snapshot().is_empty());
        assert_eq!(s.forget_location(BOB), None, "not shown: no second Left");
        assert_eq!(
            s.on_own_location(at(10.0, 11), 11),
            vec![],
            "no position to show"
        );
        assert!(s.tracks(BOB), "still followed");
        assert!(s.on_friend_location(BOB, at(200.0, 12), 12).is_some());
        assert_eq!(s.forget_location(CAROL), None, "not a friend");
    }

    #[test]
    fn the_same_update_twice_is_news_once() {
        let (mut s, _) = start(ME, cfg(), Some(at(0.0, 0)), [(BOB, None)], 0);
        assert!(s.on_friend_location(BOB, at(100.0, 10), 10).is_some());
        assert_eq!(s.on_friend_location(BOB, at(100.0, 10), 11), None);
        assert!(s.on_friend_location(BOB, at(120.0, 10), 12).is_some());
    }

    #[test]
    fn stale_and_foreign_updates_are_ignored() {
        let (mut s, _) = start(ME, cfg(), Some(at(0.0, 0)), [(BOB, None)], 0);
        assert!(s.on_friend_location(BOB, at(100.0, 10), 10).is_some());
        assert_eq!(s.on_friend_location(BOB, at(2000.0, 5), 11), None);
        // Same millisecond, later in bus order: still news.
        assert!(s.on_friend_location(BOB, at(120.0, 10), 12).is_some());
        assert_eq!(s.snapshot().len(), 1);
        assert_eq!(s.on_friend_location(CAROL, at(1.0, 12), 12), None);
    }

    #[test]
    fn own_move_brings_friends_in_and_out_at_once() {
        let friends = [(BOB, Some(at(1500.0, 0))), (CAROL, Some(at(-500.0, 0)))];
        let (mut s, snap) = start(ME, cfg(), Some(at(0.0, 0)), friends, 0);
        assert_eq!(snap.len(), 1);
        let evs = s.on_own_location(at(900.0, 1), 1);
        assert_eq!(evs.len(), 2, "{evs:?}");
        assert!(evs.contains(&FriendEvent::Left {
            id: CAROL,
            reason: LeftReason::OutOfRange
        }));
        assert!(evs
            .iter()
            .any(|e| matches!(e, FriendEvent::Location(n) if n.id == BOB)));
    }

    #[test]
    fn own_small_moves_do_not_resend_distances() {
        let (mut s, _) = start(ME, cfg(), Some(at(0.0, 0)), [(BOB, Some(at(500.0, 0)))], 0);
        assert!(s.on_own_location(at(10.0, 1), 1).is_empty());
        assert!(s.on_own_location(at(20.0, 2), 2).is_empty());
        // 30 m from the distance last sent: re-sent.
        let evs = s.on_own_location(at(30.0, 3), 3);
        assert!((distance(evs.first().copied()) - 470.0).abs() < 0.01);
    }

    #[test]
    fn inactive_friends_leave_once_at_their_expiry() {
        let (mut s, _) = start(
            ME,
            cfg(),
            Some(at(0.0, 0)),
            [(BOB, Some(at(10.0, 100)))],
            100,
        );
        assert_eq!(s.next_expiry(), Some(10_100));
        assert!(s.on_tick(10_099).is_empty());
        assert_eq!(
            s.on_tick(10_100),
            vec![FriendEvent::Left {
                id: BOB,
                reason: LeftReason::Inactive
            }]
        );
        assert!(s.on_tick(20_000).is_empty());
        assert_eq!(s.next_expiry(), None);
        // Back with a fresh update: shown again.
        assert!(s
            .on_friend_location(BOB, at(10.0, 20_001), 20_001)
            .is_some());
    }

    #[test]
    fn removal_emits_only_for_shown_friends() {
        let friends = [(BOB, Some(at(10.0, 0))), (CAROL, Some(at(5000.0, 0)))];
        let (mut s, _) = start(ME, cfg(), Some(at(0.0, 0)), friends, 0);
        assert_eq!(
            s.remove_friend(BOB, LeftReason::Unshared),
            left(BOB, LeftReason::Unshared)
        );
        assert_eq!(s.remove_friend(BOB, LeftReason::Unfriended), None);
        assert_eq!(s.remove_friend(CAROL, LeftReason::Unfriended), None);
        assert!(!s.tracks(CAROL));
        assert_eq!(s.on_friend_location(BOB, at(1.0, 1), 1), None);
    }

    #[test]
    fn added_friend_shows_at_once_when_near() {
        let (mut s, _) = start(ME, cfg(), Some(at(0.0, 0)), [], 0);
        assert!(s
            .add_friend(Grant::precise(BOB), Some(at(10.0, 0)), 1)
            .is_some());
        assert_eq!(s.add_friend(Grant::precise(ME), Some(at(0.0, 0)), 1), None);
        assert!(s.tracks(BOB) && !s.tracks(ME));
    }

    #[derive(Debug, Clone)]
    enum Input {
        Own(f64),
        Friend(u8, f64),
        Tick,
        Remove(u8),
        Add(u8, f64),
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            (-3000.0f64..3000.0).prop_map(Input::Own),
            (0u8..4, -3000.0f64..3000.0).prop_map(|(f, m)| Input::Friend(f, m)),
            Just(Input::Tick),
            (0u8..4).prop_map(Input::Remove),
            (0u8..4, -3000.0f64..3000.0).prop_map(|(f, m)| Input::Add(f, m)),
        ]
    }

    proptest! {
        /// Whatever happens, the events form a valid show/hide sequence per
        /// friend (no `Left` for a hidden friend), the client's reconstructed
        /// list equals the session's snapshot, and every shown friend is fresh
        /// and within the radius.
        #[test]
        fn events_replay_to_the_snapshot(inputs in proptest::collection::vec((input(), 0i64..4000), 1..60)) {
            let friends = (0..4).map(|i| (UserId(10 + i), None));
            let (mut s, snap) = start(ME, cfg(), Some(at(0.0, 0)), friends, 0);
            let mut client: HashMap<UserId, f64> = snap.iter().map(|n| (n.id, n.distance_m)).collect();
            let mut now = 0i64;
            for (inp, dt) in inputs {
                now += dt;
                let evs: Vec<FriendEvent> = match inp {
                    Input::Own(m) => s.on_own_location(at(m, now), now),
                    Input::Friend(f, m) => s.on_friend_location(UserId(10 + f as i64), at(m, now), now).into_iter().collect(),
                    Input::Tick => s.on_tick(now),
                    Input::Remove(f) => s.remove_friend(UserId(10 + f as i64), LeftReason::Unfriended).into_iter().collect(),
                    Input::Add(f, m) => s.add_friend(Grant::precise(UserId(10 + f as i64)), Some(at(m, now)), now).into_iter().collect(),
                };
                for ev in evs {
                    match ev {
                        FriendEvent::Location(n) => { client.insert(n.id, n.distance_m); }
                        FriendEvent::Left { id, .. } => prop_assert!(client.remove(&id).is_some(), "left for a friend not shown"),
                    }
                }
                let expiry = s.next_expiry();
                // The hint is never later than the truth.
                match (expiry, s.exact_expiry()) {
                    (Some(h), Some(e)) => prop_assert!(h <= e, "hint {} after {}", h, e),
                    (None, Some(e)) => prop_assert!(false, "no hint, expiry {}", e),
                    _ => {}
                }
                if expiry.is_some_and(|e| e <= now) {
                    for ev in s.on_tick(now) {
                        let inactive = matches!(ev, FriendEvent::Left { reason: LeftReason::Inactive, .. });
                        prop_assert!(inactive, "tick emitted {:?}", ev);
                        if let FriendEvent::Left { id, .. } = ev { prop_assert!(client.remove(&id).is_some()); }
                    }
                }
                let snap: HashMap<UserId, f64> = s.snapshot().iter().map(|n| (n.id, n.distance_m)).collect();
                prop_assert_eq!(&snap, &client);
                for n in s.snapshot() {
                    prop_assert!(n.distance_m <= cfg().radius_m);
                    prop_assert!(now - n.updated_at < cfg().ttl_ms);
                }
            }
        }
    }

    proptest! {
        /// The sorted friend table answers like an ordered map under any
        /// mix of loads, inserts, lookups and removals.
        #[test]
        fn friend_table_behaves_like_a_map(
            initial in proptest::collection::vec((0i64..40, any::<bool>()), 0..30),
            ops in proptest::collection::vec((0u8..3, 0i64..40), 0..60),
        ) {
            let tracked = |shown: bool| Tracked { shown: shown.then_some(1.0), ..Tracked::default() };
            let mut model: BTreeMap<UserId, Option<f64>> = BTreeMap::new();
            for (id, shown) in &initial {
                model.insert(UserId(*id), tracked(*shown).shown);
            }
            let mut table = Friends::from_unsorted(
                initial.iter().map(|(id, shown)| (UserId(*id), tracked(*shown))).collect(),
            );
            for (op, id) in ops {
                let id = UserId(id);
                match op {
                    0 => {
                        table.entry_or_default(id).shown = Some(2.0);
                        model.insert(id, Some(2.0));
                    }
                    1 => {
                        let removed = table.remove(id).map(|t| t.shown);
                        prop_assert_eq!(removed, model.remove(&id));
                    }
                    _ => {
                        prop_assert_eq!(table.contains_key(id), model.contains_key(&id));
                        prop_assert_eq!(table.get_mut(id).map(|t| t.shown), model.get(&id).copied());
                    }
                }
            }
            let got: Vec<(UserId, Option<f64>)> = table.iter().map(|(id, t)| (id, t.shown)).collect();
            let want: Vec<(UserId, Option<f64>)> = model.into_iter().collect();
            prop_assert_eq!(got, want);
        }
    }
}

#[cfg(test)]
mod grant_tests {
    use super::tests::{BOB, ME};
    use super::*;
    use crate::Point;
    use proptest::prelude::*;

    /// The default radius: an approximate friend is kilometres away.
    fn cfg() -> SessionConfig {
        SessionConfig {
            radius_m: 8000.0,
            ttl_ms: 600_000,
            distance_epsilon_m: 25.0,
        }
    }

    fn loc(lat: f64, lon: f64, ts: i64) -> Location {
        Location::new(lat, lon, ts).unwrap()
    }

    fn grant(until_ms: Option<i64>, precision: Precision) -> Grant {
        Grant {
            id: BOB,
            until_ms,
            precision,
        }
    }

    fn shown(ev: Option<FriendEvent>) -> Nearby {
        match ev {
            Some(FriendEvent::Location(n)) => n,
            other => panic!("expected a location event, got {other:?}"),
        }
    }

    #[test]
    fn a_grant_ends_by_itself_as_unshared() {
        let bob = (
            grant(Some(5_000), Precision::Precise),
            Some(loc(52.0, 13.0, 0)),
        );
        let (mut s, snap) = Session::start(ME, cfg(), Some(loc(52.001, 13.0, 0)), [bob], 1);
        assert_eq!(snap.len(), 1);
        assert!(s.next_expiry().is_some_and(|t| t <= 5_000));
        assert_eq!(s.end_expired(4_999), (vec![], vec![]));
        assert!(s.tracks(BOB));
        let left = FriendEvent::Left {
            id: BOB,
            reason: LeftReason::Unshared,
        };
        assert_eq!(s.end_expired(5_000), (vec![left], vec![BOB]));
        assert!(!s.tracks(BOB));
        assert_eq!(s.next_expiry().filter(|t| *t <= 5_000), None);
        // A friend who is not shown ends silently, and is dropped all the same.
        let far = (
            grant(Some(7_000), Precision::Precise),
            Some(loc(10.0, 13.0, 0)),
        );
        let (mut s, _) = Session::start(ME, cfg(), Some(loc(52.0, 13.0, 0)), [far], 1);
        assert_eq!(s.end_expired(7_000), (vec![], vec![BOB]));
    }

    #[test]
    fn new_terms_take_effect_and_only_a_precision_change_resends() {
        let bob = (Grant::precise(BOB), Some(loc(52.0, 13.0, 0)));
        let (mut s, _) = Session::start(ME, cfg(), Some(loc(52.01, 13.0, 0)), [bob], 1);
        assert_eq!(s.next_expiry().filter(|t| *t < 600_000), None);
        // Until-only change: no row, but the session now ends it at 9 000.
        assert_eq!(
            s.add_friend(grant(Some(9_000), Precision::Precise), None, 2),
            None
        );
        assert_eq!(s.grant(BOB), Some(grant(Some(9_000), Precision::Precise)));
        assert!(s.next_expiry().is_some_and(|t| t <= 9_000));
        let n = shown(s.add_friend(grant(None, Precision::Approximate), None, 3));
        assert!(n.approximate);
        assert_eq!(n.distance_m % 1000.0, 0.0);
        assert_eq!(s.snapshot(), vec![n]);
        let back = shown(s.add_friend(Grant::precise(BOB), None, 4));
        assert!(!back.approximate);
        assert!(
            (back.distance_m - 1112.0).abs() < 5.0,
            "{}",
            back.distance_m
        );
    }

    #[test]
    fn an_approximate_friend_is_shown_in_kilometres_and_eighths() {
        let bob = (
            grant(None, Precision::Approximate),
            Some(loc(48.8566, 2.3522, 0)),
        );
        let (mut s, snap) = Session::start(ME, cfg(), Some(loc(48.80, 2.30, 0)), [bob], 1);
        let n = snap[0];
        assert!(n.approximate);
        assert_eq!(n.distance_m % 1000.0, 0.0);
        assert_eq!(n.bearing_deg % 45.0, 0.0);
        // Walking within one's own cell changes nothing the viewer sees.
        let c = Point::new(48.80, 2.30).unwrap().cell_centre();
        assert_eq!(s.on_own_location(loc(c.lat(), c.lon(), 2), 2), vec![]);
        assert_eq!(s.snapshot(), vec![n]);
    }

    proptest! {
        /// What a viewer learns of an approximate friend depends only on
        /// the two cells: any two positions of each within their cells give
        /// the same row (the basis of the trilateration defence).
        #[test]
        fn the_view_is_a_function_of_the_cells(
            lat in -60.0..60.0f64, lon in -170.0..170.0f64,
            dlat in -0.1..0.1f64, dlon in -0.1..0.1f64,
            a in 0.0..1.0f64, b in 0.0..1.0f64, c in 0.0..1.0f64, d in 0.0..1.0f64,
        ) {
            let me = Point::new(lat, lon).unwrap().cell_centre();
            let friend = Point::new(lat + dlat, lon + dlon).unwrap().cell_centre();
            // Two points inside each cell (within 40 % of the centre).
            let jitter = |p: Point, x: f64, y: f64| {
                let cols = (p.lat().to_radians().cos() * 360.0 / nearby_geo::CELL_DEG).floor();
                let w = 360.0 / cols;
                Point::new(p.lat() + (x - 0.5) * 0.8 * nearby_geo::CELL_DEG, p.lon() + (y - 0.5) * 0.8 * w).unwrap()
            };
            let one = view(jitter(me, a, b), jitter(friend, c, d), true);
            let two = view(jitter(me, b, a), jitter(friend, d, c), true);
            prop_assert_eq!(one, two);
            prop_assert_eq!(one, view(me, friend, true));
        }
    }
}

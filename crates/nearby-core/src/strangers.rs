//! Strangers nearby: the discoverable users a discoverable session is shown,
//! besides its friends.
//!
//! Everything a viewer learns of a stranger follows from two geohash-5 cells
//! (about 4.9 km × 4.9 km at the equator): the viewer's and the stranger's
//! *home* cell, the cell each one's position settled in
//! ([`GeoCell::settle`], with hysteresis). A stranger is shown with the band
//! of the distance between the two cells' centres ([`Bucket`]) and the
//! bearing between them in eighths of a circle (none in the same cell).
//! Two positions of a stranger in one cell give a viewer exactly the same
//! rows, wherever the viewer stands: no number of observations narrows a
//! stranger down below their cell, which rounded or noisy distances did
//! not (trilateration).
//!
//! **Relations change nothing here.** Who is shown, and under which alias,
//! depends on the strangers' own notices, the viewer's cell, the time and
//! the cap, never on the viewer's friends or requests: a friend who is
//! discoverable is shown like anyone else. Hiding relations let a viewer
//! name the account behind an alias (send a request: the alias that
//! vanishes was that user; cancel it: the alias comes back), and any rule
//! that hides on a relation the viewer can make or unmake alone leaks the
//! same way.
//!
//! The table is a pure state machine like [`crate::session::Session`]: it
//! takes "I settled in a cell", "a notice arrived", "time passed", and
//! returns what to show. Aliases are the
//! caller's: an event names the stranger's user id and the day its alias
//! belongs to, and the caller turns both into an id that is never the user
//! id. The table shows at most `cap` strangers: once full, newcomers are
//! not shown until a place frees up (a stranger leaves, moves away, or
//! stops sending heartbeats for `ttl_ms`).

use nearby_geo::GeoCell;

use crate::{Point, UserId};

/// Distance bands between two cells' centres, in whole kilometres: a
/// stranger is shown as `[lo, hi)` of the band the centre distance falls
/// in. Bands finer than a cell would claim what cells cannot know (two
/// people in one cell may be 0 or 6 km apart), so with cells of about
/// 5 km the same cell and the side neighbours are "0–5 km" and the
/// corner neighbours "5–10 km"; the bearing tells which neighbour.
pub const BANDS_KM: [u32; 4] = [0, 5, 10, 20];

/// A distance band, `lo_km ≤ d < hi_km`, between two cells' centres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Lower bound, km.
    pub lo_km: u32,
    /// Upper bound, km.
    pub hi_km: u32,
}

impl Bucket {
    /// The band of a distance in metres (the last band for anything past it).
    pub fn of_m(d: f64) -> Self {
        let km = d / 1000.0;
        let last = BANDS_KM.len() - 1;
        let i = (1..last)
            .find(|&i| km < f64::from(BANDS_KM[i]))
            .unwrap_or(last);
        Bucket {
            lo_km: BANDS_KM[i - 1],
            hi_km: BANDS_KM[i],
        }
    }
}

/// What a viewer is shown of a stranger: a function of the two cells only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    /// The band of the distance between the cells' centres.
    pub bucket: Bucket,
    /// From the viewer's cell's centre to the stranger's, degrees, a
    /// multiple of 45; `None` in the same cell.
    pub bearing_deg: Option<f64>,
}

/// The view between a viewer's home cell and a stranger's.
pub fn view(mine: GeoCell, theirs: GeoCell) -> View {
    let (a, b) = (mine.centre(), theirs.centre());
    View {
        bucket: Bucket::of_m(a.distance_m(b)),
        bearing_deg: (mine != theirs)
            .then(|| ((a.bearing_deg(b) / 45.0).round() * 45.0).rem_euclid(360.0)),
    }
}

/// Milliseconds in a UTC day: aliases change at midnight UTC.
pub const DAY_MS: i64 = 86_400_000;

/// The UTC day of a Unix time in ms.
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// What the client is told.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StrangerEvent {
    /// Shown (new) or its view changed.
    Nearby {
        /// Who (for the alias only; never sent).
        user: UserId,
        /// The day the alias belongs to.
        day: i64,
        /// What is shown.
        view: View,
    },
    /// No longer shown.
    Left {
        /// Who (for the alias only; never sent).
        user: UserId,
        /// The day of the alias the client knows them by.
        day: i64,
    },
}

/// How the session's listening moved (see [`Strangers::settle`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Moved {
    /// The home cell before, if any (announce the move there).
    pub from: Option<GeoCell>,
    /// The home cell now.
    pub to: Option<GeoCell>,
    /// Cells to start listening to.
    pub subscribe: Vec<GeoCell>,
    /// Cells to stop listening to.
    pub unsubscribe: Vec<GeoCell>,
}

#[derive(Debug, Clone, Copy)]
struct Shown {
    user: UserId,
    cell: GeoCell,
    stamp: i64,
    heard_ms: i64,
    day: i64,
    view: View,
}

/// One session's strangers.
#[derive(Debug, Clone)]
pub struct Strangers {
    me: UserId,
    cap: usize,
    ttl_ms: i64,
    home: Option<GeoCell>,
    listening: Vec<GeoCell>,
    shown: Vec<Shown>,
}

impl Strangers {
    /// A table for `me` showing at most `cap` strangers, each until
    /// `ttl_ms` passes without news of them.
    pub fn new(me: UserId, cap: usize, ttl_ms: i64) -> Self {
        Self {
            me,
            cap,
            ttl_ms,
            home: None,
            listening: Vec::new(),
            shown: Vec::new(),
        }
    }

    /// The home cell, once a position is known.
    pub fn home(&self) -> Option<GeoCell> {
        self.home
    }

    /// The cells listened to: the home cell's neighbourhood.
    pub fn listening(&self) -> &[GeoCell] {
        &self.listening
    }

    /// Whether the table holds `cap` strangers (newcomers are not shown).
    pub fn is_full(&self) -> bool {
        self.shown.len() >= self.cap
    }

    /// The strangers shown.
    pub fn shown(&self) -> impl Iterator<Item = UserId> + '_ {
        self.shown.iter().map(|s| s.user)
    }

    /// The user is at `p`: the home cell settles (with hysteresis) and,
    /// when it changed, the listening moves and every stranger shown is
    /// seen again from the new cell (those out of the new neighbourhood
    /// leave).
    pub fn settle(&mut self, p: Point) -> (Moved, Vec<StrangerEvent>) {
        let to = GeoCell::settle(self.home, p);
        if self.home == Some(to) {
            return (Moved::default(), Vec::new());
        }
        let from = self.home.replace(to);
        let now_listening = to.neighbourhood();
        let moved = Moved {
            from,
            to: Some(to),
            subscribe: diff(&now_listening, &self.listening),
            unsubscribe: diff(&self.listening, &now_listening),
        };
        self.listening = now_listening;
        let mut events = Vec::new();
        let listening = &self.listening;
        self.shown.retain_mut(|s| {
            if !listening.contains(&s.cell) {
                events.push(StrangerEvent::Left {
                    user: s.user,
                    day: s.day,
                });
                return false;
            }
            let v = view(to, s.cell);
            if v != s.view {
                s.view = v;
                events.push(StrangerEvent::Nearby {
                    user: s.user,
                    day: s.day,
                    view: v,
                });
            }
            true
        });
        (moved, events)
    }

    /// Stops listening: every stranger leaves, the home cell is forgotten
    /// (opted out, hidden, or gone). Returns the listening it ends.
    pub fn clear(&mut self) -> (Moved, Vec<StrangerEvent>) {
        let moved = Moved {
            from: self.home.take(),
            to: None,
            subscribe: Vec::new(),
            unsubscribe: std::mem::take(&mut self.listening),
        };
        let events = self.shown.drain(..).map(left).collect();
        (moved, events)
    }

    /// A notice: as of `stamp`, `user` is discoverable in `cell` (or, if
    /// `None`, no longer discoverable). Notices older than the last one
    /// taken from the same user are ignored, whatever channel they came by.
    pub fn on_notice(
        &mut self,
        user: UserId,
        cell: Option<u32>,
        stamp: i64,
        now_ms: i64,
    ) -> Option<StrangerEvent> {
        let home = self.home?;
        if user == self.me {
            return None;
        }
        let cell = cell
            .and_then(GeoCell::from_id)
            .filter(|c| self.listening.contains(c));
        let at = self.shown.iter().position(|s| s.user == user);
        match (at, cell) {
            (Some(i), _) if self.shown[i].stamp >= stamp => None,
            (Some(i), Some(cell)) => {
                let s = &mut self.shown[i];
                s.stamp = stamp;
                s.heard_ms = now_ms;
                s.cell = cell;
                let v = view(home, cell);
                (v != s.view).then(|| {
                    s.view = v;
                    StrangerEvent::Nearby {
                        user,
                        day: s.day,
                        view: v,
                    }
                })
            }
            (Some(i), None) => Some(left(self.shown.swap_remove(i))),
            (None, Some(cell)) if !self.is_full() => {
                let s = Shown {
                    user,
                    cell,
                    stamp,
                    heard_ms: now_ms,
                    day: day_of(now_ms),
                    view: view(home, cell),
                };
                self.shown.push(s);
                Some(StrangerEvent::Nearby {
                    user,
                    day: s.day,
                    view: s.view,
                })
            }
            (None, _) => None,
        }
    }

    /// Time passed: strangers not heard of for `ttl_ms` leave, and at a new
    /// UTC day every stranger shown leaves under yesterday's alias and comes
    /// back under today's.
    pub fn on_tick(&mut self, now_ms: i64) -> Vec<StrangerEvent> {
        let ttl = self.ttl_ms;
        let today = day_of(now_ms);
        let mut events = Vec::new();
        self.shown.retain_mut(|s| {
            if now_ms.saturating_sub(s.heard_ms) >= ttl {
                events.push(left(*s));
                return false;
            }
            if s.day != today {
                events.push(left(*s));
                s.day = today;
                events.push(StrangerEvent::Nearby {
                    user: s.user,
                    day: today,
                    view: s.view,
                });
            }
            true
        });
        events
    }

    /// When [`Strangers::on_tick`] next has something to do.
    pub fn next_expiry(&self) -> Option<i64> {
        self.shown
            .iter()
            .map(|s| {
                s.heard_ms
                    .saturating_add(self.ttl_ms)
                    .min((s.day + 1).saturating_mul(DAY_MS))
            })
            .min()
    }

    /// Keeps only the strangers in `discoverable` (read from the store):
    /// the bound on how long a lost opt-out notice can leave someone shown.
    pub fn retain(&mut self, discoverable: &[UserId]) -> Vec<StrangerEvent> {
        let mut events = Vec::new();
        self.shown.retain(|s| {
            let keep = discoverable.contains(&s.user);
            if !keep {
                events.push(left(*s));
            }
            keep
        });
        events
    }
}

fn left(s: Shown) -> StrangerEvent {
    StrangerEvent::Left {
        user: s.user,
        day: s.day,
    }
}

/// The cells of `a` not in `b`.
fn diff(a: &[GeoCell], b: &[GeoCell]) -> Vec<GeoCell> {
    a.iter().filter(|c| !b.contains(c)).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TTL: i64 = 60_000;
    const ME: UserId = UserId(1);

    fn at(lat: f64, lon: f64) -> Point {
        Point::new(lat, lon).expect("valid")
    }

    fn settled(p: Point) -> Strangers {
        let mut t = Strangers::new(ME, 3, TTL);
        let (moved, events) = t.settle(p);
        assert_eq!(moved.subscribe.len(), 9);
        assert!(events.is_empty());
        t
    }

    fn cell(p: Point) -> Option<u32> {
        Some(GeoCell::of(p).id())
    }

    #[test]
    fn bands_cover_every_distance() {
        assert_eq!(Bucket::of_m(0.0), Bucket { lo_km: 0, hi_km: 5 });
        assert_eq!(Bucket::of_m(4_900.0), Bucket { lo_km: 0, hi_km: 5 });
        assert_eq!(
            Bucket::of_m(6_900.0),
            Bucket {
                lo_km: 5,
                hi_km: 10
            }
        );
        assert_eq!(
            Bucket::of_m(1e9),
            Bucket {
                lo_km: 10,
                hi_km: 20
            }
        );
    }

    #[test]
    fn newcomers_show_until_the_cap_then_wait_for_a_place() {
        let here = at(48.85, 2.35);
        let mut t = settled(here);
        for u in 2..=4 {
            assert!(matches!(
                t.on_notice(UserId(u), cell(here), 1, 0),
                Some(StrangerEvent::Nearby { .. })
            ));
        }
        assert!(t.is_full());
        assert_eq!(t.on_notice(UserId(5), cell(here), 1, 0), None, "full");
        assert_eq!(
            t.on_notice(UserId(2), None, 2, 0),
            Some(StrangerEvent::Left {
                user: UserId(2),
                day: 0
            })
        );
        assert!(t.on_notice(UserId(5), cell(here), 2, 0).is_some());
    }

    #[test]
    fn older_notices_and_self_are_ignored() {
        let here = at(48.85, 2.35);
        let mut t = settled(here);
        assert!(t.on_notice(UserId(2), cell(here), 10, 0).is_some());
        assert_eq!(t.on_notice(UserId(2), None, 9, 0), None, "older");
        assert_eq!(t.on_notice(ME, cell(here), 1, 0), None);
    }

    #[test]
    fn a_move_announced_on_the_old_cell_keeps_the_stranger() {
        let here = at(48.85, 2.35);
        let mut t = settled(here);
        let home = GeoCell::of(here);
        let west = t
            .listening()
            .iter()
            .copied()
            .find(|c| *c != home)
            .expect("a neighbour");
        assert!(t.on_notice(UserId(2), Some(home.id()), 1, 0).is_some());
        // The notice on the old cell names the new one: a changed view,
        // never a leave.
        match t.on_notice(UserId(2), Some(west.id()), 2, 0) {
            Some(StrangerEvent::Nearby { view, .. }) => assert!(view.bearing_deg.is_some()),
            other => panic!("expected a new view, got {other:?}"),
        }
        // The same notice on the new cell: no news.
        assert_eq!(t.on_notice(UserId(2), Some(west.id()), 2, 0), None);
    }

    #[test]
    fn strangers_go_quiet_and_change_alias_at_midnight() {
        let here = at(48.85, 2.35);
        let mut t = settled(here);
        let late = DAY_MS - 1000;
        assert!(t.on_notice(UserId(2), cell(here), 1, late).is_some());
        assert_eq!(t.next_expiry(), Some(DAY_MS));
        let events = t.on_tick(DAY_MS);
        assert_eq!(
            events,
            vec![
                StrangerEvent::Left {
                    user: UserId(2),
                    day: 0
                },
                StrangerEvent::Nearby {
                    user: UserId(2),
                    day: 1,
                    view: view(GeoCell::of(here), GeoCell::of(here))
                }
            ]
        );
        assert_eq!(t.on_tick(late + TTL).len(), 1, "quiet for the TTL");
        assert!(t.next_expiry().is_none());
    }

    proptest! {
        /// The trilateration guarantee: what a viewer is shown depends on
        /// the two cells only, so two positions of a stranger in one cell
        /// are indistinguishable from anywhere.
        #[test]
        fn the_view_is_a_function_of_the_cells(
            lat in -80.0f64..80.0, lon in -179.0f64..179.0,
            d1 in (0.0f64..1.0, 0.0f64..1.0), d2 in (0.0f64..1.0, 0.0f64..1.0),
            off in (-1i32..=1, -1i32..=1),
        ) {
            let viewer = at(lat, lon);
            let home = GeoCell::of(viewer);
            let theirs = GeoCell::of(at(
                (lat + f64::from(off.0) * 0.04).clamp(-89.0, 89.0),
                lon + f64::from(off.1) * 0.04,
            ));
            let spot = |d: (f64, f64)| {
                let c = theirs.centre();
                at(c.lat() + (d.0 - 0.5) * 0.04, c.lon() + (d.1 - 0.5) * 0.04)
            };
            // Two spots anywhere in the stranger's cell: one view.
            let (a, b) = (spot(d1), spot(d2));
            if GeoCell::of(a) == theirs && GeoCell::of(b) == theirs {
                prop_assert_eq!(view(home, GeoCell::of(a)), view(home, GeoCell::of(b)));
            }
            // And the view is symmetric in distance.
            prop_assert_eq!(view(home, theirs).bucket, view(theirs, home).bucket);
        }

        /// Whatever the notices, the table never shows more than the cap,
        /// never shows the viewer, and its events rebuild exactly who is
        /// shown.
        #[test]
        fn events_rebuild_the_table(
            notices in proptest::collection::vec((2i64..12, proptest::option::of(0usize..12), 0i64..50, 0i64..200_000), 1..80),
        ) {
            let here = at(10.0, 20.0);
            let mut t = settled(here);
            let cells: Vec<u32> = t.listening().iter().map(|c| c.id())
                .chain([GeoCell::of(at(30.0, 20.0)).id(), 1 << 25, 7]).collect();
            let mut shown = std::collections::BTreeSet::new();
            let mut now = 0;
            for (user, c, stamp, dt) in notices {
                now += dt;
                let mut events = t.on_tick(now);
                events.extend(t.on_notice(UserId(user), c.map(|i| cells[i]), stamp, now));
                for e in events {
                    match e {
                        StrangerEvent::Nearby { user, .. } => { shown.insert(user); }
                        StrangerEvent::Left { user, .. } => { prop_assert!(shown.remove(&user)); }
                    }
                }
                let table: std::collections::BTreeSet<UserId> = t.shown().collect();
                prop_assert_eq!(&table, &shown);
                prop_assert!(table.len() <= 3);
                prop_assert!(!table.contains(&ME));
            }
        }
    }
}

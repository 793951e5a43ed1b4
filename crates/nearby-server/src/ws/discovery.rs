//! A connection's strangers nearby: its cells on the bus, its heartbeat, and
//! what its user is shown (the domain's [`Strangers`] decides).
//!
//! While the user is discoverable (opted in, not past its end, not in ghost
//! mode) and the session knows their position, the session listens to the
//! 9 cells around its home cell and announces the home cell on its own
//! channel: on joining, every `--stranger-heartbeat-ms`, and on leaving
//! (a move is announced on the old cell too, naming the new one; turning
//! discoverability off or closing announces "gone"). Listeners show at most
//! `--stranger-cap` strangers, dropping those not heard of for three
//! heartbeats and, at every store re-read, those the store no longer holds
//! discoverable.

use nearby_core::strangers::{Moved, StrangerEvent, Strangers};
use nearby_core::UserId;
use nearby_geo::GeoCell;
use nearby_ports::{BusMessage, Channel};
use nearby_proto::ws::{DiscoverableState, ServerFrame, StrangerView};

use super::Conn;
use crate::config::ServerConfig;
use crate::state::now_ms;
use crate::strangers::state_of;

/// A stranger silent for this many heartbeats leaves.
const QUIET_BEATS: u32 = 3;

/// One connection's discovery state.
pub(super) struct Discovery {
    pub(super) table: Strangers,
    /// Discoverable until, as last read from the store (`None`: off).
    pub(super) until: Option<i64>,
    /// The last stamp announced: strictly increasing.
    stamp: i64,
    /// When the next heartbeat is due, while announcing.
    next_beat: Option<i64>,
    /// What the client was last told.
    told: DiscoverableState,
}

impl Discovery {
    pub(super) fn new(me: UserId, cfg: &ServerConfig, until: Option<i64>) -> Self {
        let ttl = cfg.stranger_heartbeat * QUIET_BEATS;
        Self {
            table: Strangers::new(
                me,
                cfg.stranger_cap,
                i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
            ),
            until,
            stamp: 0,
            next_beat: None,
            told: state_of(until),
        }
    }

    /// The next time something is due: a stranger going quiet, a new day's
    /// aliases, the heartbeat, or the end of discoverability.
    pub(super) fn deadline(&self) -> Option<i64> {
        let end = self.until.filter(|_| self.table.home().is_some());
        [self.table.next_expiry(), self.next_beat, end]
            .into_iter()
            .flatten()
            .min()
    }

    /// What the client is told first (in the snapshot).
    pub(super) fn told(&self) -> DiscoverableState {
        self.told
    }

    fn stamp(&mut self, now: i64) -> i64 {
        self.stamp = now.max(self.stamp.saturating_add(1));
        self.stamp
    }
}

fn channels(cells: &[GeoCell]) -> Vec<Channel> {
    cells.iter().map(|c| Channel::Cell(c.id())).collect()
}

impl Conn {
    /// Opted in, not past its end, and not hidden.
    fn discoverable_now(&self, now: i64) -> bool {
        let hidden = self.ghost_until.is_some_and(|u| now < u);
        self.discovery.until.is_some_and(|u| now < u) && !hidden
    }

    /// The state as the client should know it now.
    fn discoverable_state(&self, now: i64) -> DiscoverableState {
        state_of(self.discovery.until.filter(|u| now < *u))
    }

    /// Sends `discoverable` if the state changed since the client was told.
    fn tell_discoverable(&mut self, now: i64) {
        let state = self.discoverable_state(now);
        if state != self.discovery.told {
            self.discovery.told = state;
            self.out.push(ServerFrame::Discoverable(state));
        }
    }

    /// Brings the cells listened to and announced in line with whether the
    /// user is discoverable and where they are.
    pub(super) async fn sync_discovery(&mut self, now: i64) {
        self.tell_discoverable(now);
        let on = self.discoverable_now(now);
        let table = &mut self.discovery.table;
        let (moved, events) = match self.session.own_location() {
            Some(own) if on => table.settle(own.point),
            _ if !on && table.home().is_some() => table.clear(),
            _ => return,
        };
        self.show_strangers(events);
        if moved != Moved::default() {
            self.apply_move(moved, now).await;
        }
    }

    /// Stops announcing and listening (the connection ends): listeners drop
    /// the user at once.
    pub(super) async fn leave_discovery(&mut self) {
        self.discovery.until = None;
        let now = now_ms();
        let (moved, _) = self.discovery.table.clear();
        if moved.from.is_some() {
            self.apply_move(moved, now).await;
        }
    }

    async fn apply_move(&mut self, moved: Moved, now: i64) {
        let user = self.session.user();
        let subscribe = channels(&moved.subscribe);
        if let Err(e) = self.sub.add(&subscribe).await {
            // Nothing new is held; listen nowhere until the next re-read
            // (or position) tries again.
            tracing::warn!(%user, error = %e, "subscribing to cells failed");
            let (cleared, events) = self.discovery.table.clear();
            self.show_strangers(events);
            self.sub.remove(&channels(&cleared.unsubscribe));
            self.sub.remove(&channels(&moved.unsubscribe));
            self.discovery.next_beat = None;
            self.revalidate_failed = true;
            return;
        }
        let stamp = self.discovery.stamp(now);
        let notice = BusMessage::Stranger {
            user,
            cell: moved.to.map(GeoCell::id),
            stamp,
        };
        // The new cell first: a listener of both never misses the user.
        let targets = moved.to.into_iter().chain(moved.from);
        for cell in targets {
            if let Err(e) = self
                .st
                .backends
                .bus
                .publish(Channel::Cell(cell.id()), notice)
                .await
            {
                tracing::warn!(%user, error = %e, "announcing a cell failed");
            }
        }
        self.discovery.next_beat = moved.to.map(|_| now.saturating_add(self.heartbeat_ms()));
        self.sub.remove(&channels(&moved.unsubscribe));
    }

    fn heartbeat_ms(&self) -> i64 {
        i64::try_from(self.st.cfg.stranger_heartbeat.as_millis()).unwrap_or(i64::MAX)
    }

    /// Time passed: quiet strangers leave, aliases roll over at midnight,
    /// the heartbeat goes out, and discoverability may have ended.
    pub(super) async fn discovery_tick(&mut self, now: i64) {
        let events = self.discovery.table.on_tick(now);
        self.show_strangers(events);
        if self.discovery.until.is_some_and(|u| u <= now) {
            self.sync_discovery(now).await;
        }
        let (Some(home), Some(due)) = (self.discovery.table.home(), self.discovery.next_beat)
        else {
            return;
        };
        if now < due {
            return;
        }
        self.discovery.next_beat = Some(now.saturating_add(self.heartbeat_ms()));
        let user = self.session.user();
        let notice = BusMessage::Stranger {
            user,
            cell: Some(home.id()),
            stamp: self.discovery.stamp(now),
        };
        if let Err(e) = self
            .st
            .backends
            .bus
            .publish(Channel::Cell(home.id()), notice)
            .await
        {
            tracing::debug!(%user, error = %e, "heartbeat failed");
        }
    }

    /// A notice on one of the cells listened to.
    pub(super) fn on_stranger(&mut self, user: UserId, cell: Option<u32>, stamp: i64) {
        let event = self.discovery.table.on_notice(user, cell, stamp, now_ms());
        self.show_strangers(event);
    }

    /// Drops the strangers shown whom the store no longer holds
    /// discoverable (their notice may have been lost).
    pub(super) async fn recheck_strangers(&mut self) {
        let shown: Vec<UserId> = self.discovery.table.shown().collect();
        if shown.is_empty() {
            return;
        }
        match self
            .st
            .backends
            .users
            .discoverable_among(&shown, now_ms())
            .await
        {
            Ok(still) => {
                let events = self.discovery.table.retain(&still);
                self.show_strangers(events);
            }
            Err(e) => {
                tracing::debug!(user = %self.session.user(), error = %e, "re-reading strangers failed");
                self.revalidate_failed = true;
            }
        }
    }

    /// The `discoverable` frame: the same as the REST call, then applied
    /// here at once (the user's other sessions re-read the store). Always
    /// answered: a `discoverable` frame with the state, even if it did not
    /// change, or an `error`.
    pub(super) async fn on_discoverable(&mut self, enabled: bool, until: Option<i64>) {
        let me = self.session.user();
        match crate::strangers::set_discoverable(&self.st, me, enabled, until).await {
            Ok(state) => {
                self.discovery.until = match (state.enabled, state.until) {
                    (false, _) => None,
                    (true, until) => Some(until.unwrap_or(nearby_ports::GHOST_FOREVER)),
                };
                let now = now_ms();
                if self.discoverable_state(now) == self.discovery.told {
                    self.out
                        .push(ServerFrame::Discoverable(self.discovery.told));
                }
                self.sync_discovery(now).await;
            }
            Err(e) => self.out.push(ServerFrame::error(e.code, e.message)),
        }
    }

    /// Turns table events into frames (with this viewer's aliases), and
    /// tells the hub which notices the session still takes.
    fn show_strangers(&mut self, events: impl IntoIterator<Item = StrangerEvent>) {
        let me = self.session.user();
        let mut any = false;
        for event in events {
            any = true;
            let frame = match event {
                StrangerEvent::Nearby { user, day, view } => {
                    ServerFrame::StrangerNearby(StrangerView {
                        id: self.st.aliases.alias(me, day, user),
                        bucket_km: [view.bucket.lo_km, view.bucket.hi_km],
                        bearing_deg: view.bearing_deg,
                    })
                }
                StrangerEvent::Left { user, day } => ServerFrame::StrangerLeft {
                    id: self.st.aliases.alias(me, day, user),
                },
            };
            self.out.push(frame);
        }
        if any {
            let table = &self.discovery.table;
            self.sub
                .subscriber()
                .gate_strangers(table.is_full(), table.shown());
        }
    }
}

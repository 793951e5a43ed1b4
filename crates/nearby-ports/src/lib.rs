//! The seams of `nearby`: role-named traits that the server talks to and the
//! storage adapters implement.
//!
//! | trait | role | embedded adapter | production adapter |
//! |---|---|---|---|
//! | [`LocationCache`] | latest location per user, with TTL | `nearby-store-memory` | Redis |
//! | [`PubSub`] | one channel per user, node-local fan-out | `nearby-hub` with its in-process broker | `nearby-hub` over Redis, or a ring of Redis servers |
//! | [`UserStore`] | users, tokens, friendships, sharing | `nearby-store-sqlite` | PostgreSQL |
//! | [`HistoryStore`] | append-only location history | `nearby-store-sqlite` | PostgreSQL |
//!
//! **Architecture invariant:** traits and plain data only. The only runtime
//! type used is an `AtomicWaker`, with two mutex-guarded queues the hand-off
//! from a bus to a session; [`Subscription`] is the RAII guard of a
//! session's channels.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::task::AtomicWaker;
use nearby_core::{FriendStatus, Grant, LeftReason, Location, Precision, Share, UserId};

/// What every adapter may fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was broken (e.g. the username is taken).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The thing acted upon does not exist (unknown user, not friends).
    #[error("not found: {0}")]
    NotFound(String),
    /// The backend failed or is unreachable; the operation may be retried.
    #[error("backend unavailable: {source}")]
    Unavailable {
        /// What failed, as the backend's client reported it.
        #[source]
        source: BoxError,
    },
    /// The store holds data this code cannot read (a bug, or a schema from
    /// another version); retrying will not help.
    #[error("invalid data in the store: {0}")]
    Invalid(String),
}

/// A boxed error from a backend's client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl StoreError {
    /// A backend failure, keeping its cause.
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            source: source.into(),
        }
    }

    /// Whether the same call may succeed later (the backend was down or
    /// overloaded), as opposed to a refusal or bad data.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// Result of an adapter call.
pub type StoreResult<T> = Result<T, StoreError>;

/// Latest location per user; an entry older than its TTL is gone (the user is
/// inactive).
#[async_trait]
pub trait LocationCache: Send + Sync + 'static {
    /// Stores `loc` as the user's latest location, expiring after `ttl`.
    async fn put(&self, user: UserId, loc: Location, ttl: Duration) -> StoreResult<()>;
    /// Reads many users' latest locations in one round trip, in the order asked.
    async fn get_many(&self, users: &[UserId]) -> StoreResult<Vec<Option<Location>>>;
    /// Forgets the user's latest location at once (ghost mode, logout):
    /// friends who start a session see nothing until the next `put`.
    async fn remove(&self, user: UserId) -> StoreResult<()>;
    /// Reads one user's latest location.
    async fn get(&self, user: UserId) -> StoreResult<Option<Location>> {
        Ok(self.get_many(&[user]).await?.pop().flatten())
    }

    /// Answers when the backend is reachable (for readiness checks).
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}

/// A channel on the bus. Each user has two: `Location(u)` carries u's moves to
/// the sessions of u's friends; `Inbox(u)` carries friendship and sharing
/// changes to u's own sessions (the callback of the design). Each geohash-5
/// cell has one, `Cell(id)`, where discoverable users announce themselves
/// to the discoverable sessions around (strangers nearby).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// The user's location updates.
    Location(UserId),
    /// Control messages for the user's sessions.
    Inbox(UserId),
    /// The discoverable users in one geohash-5 cell (its 25-bit id).
    Cell(u32),
}

impl Channel {
    /// The channel's name on an external broker (`loc:42`, `inbox:42`,
    /// `cell:1234567`).
    pub fn name(self) -> String {
        match self {
            Self::Location(u) => format!("loc:{u}"),
            Self::Inbox(u) => format!("inbox:{u}"),
            Self::Cell(c) => format!("cell:{c}"),
        }
    }
}

/// A message on the bus.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BusMessage {
    /// `user` moved (published on `Location(user)`).
    Location {
        /// Who moved.
        user: UserId,
        /// Where, when.
        loc: Location,
    },
    /// `friend` now shares with the inbox's owner (published on `Inbox`).
    FriendVisible {
        /// The friend now visible.
        friend: UserId,
    },
    /// `friend` no longer shares with the inbox's owner (published on `Inbox`).
    FriendHidden {
        /// The friend now hidden.
        friend: UserId,
        /// `Unshared` or `Unfriended`.
        reason: LeftReason,
    },
    /// The inbox owner logged out a token: sessions opened with it close
    /// (published on `Inbox`).
    TokenRevoked {
        /// [`token_tag`] of the revoked token's hash.
        tag: u64,
    },
    /// The inbox owner logged out and their cached position was removed:
    /// each of their sessions that still reports puts its latest report
    /// back (published on `Inbox`, after `TokenRevoked`).
    PresenceCheck,
    /// The inbox owner's relation with `friend` changed (a request, an
    /// acceptance, a removal, sharing either way): their sessions read the
    /// row from the store and push it (published on `Inbox`).
    FriendsChanged {
        /// The other user of the relation.
        friend: UserId,
    },
    /// `friend` logged out and none of their devices reports: drop their
    /// position as if it had gone stale (`inactive`), and keep following
    /// them (published on the viewer's `Inbox`).
    FriendQuiet {
        /// Who went quiet.
        friend: UserId,
    },
    /// A discoverable user's cell, as of `stamp` (published on `Cell`):
    /// `Some(cell)` they are there (on joining it, and as a heartbeat),
    /// `None` they left discovery. Published on the old cell when they
    /// move too, naming the new one, so that a listener of both never sees
    /// them leave. The latest `stamp` of a user wins, whatever channel it
    /// came by.
    Stranger {
        /// Who (never shown to anyone: sessions show a per-viewer alias).
        user: UserId,
        /// Where they are discoverable now, if anywhere.
        cell: Option<u32>,
        /// The publisher's clock, ms, strictly increasing per user.
        stamp: i64,
    },
}

/// A short, non-secret tag of a token hash: enough to tell one user's tokens
/// apart on the bus without publishing the hash itself.
pub fn token_tag(token_hash: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&token_hash[..8]);
    u64::from_le_bytes(first)
}

impl BusMessage {
    /// Whether this message changes what a session may see (friendship,
    /// sharing, tokens). Control messages travel on their own queue and are
    /// never dropped to make room for location updates.
    pub fn is_control(&self) -> bool {
        !matches!(self, Self::Location { .. })
    }

    /// Who moved, for a location update.
    pub fn location_user(&self) -> Option<UserId> {
        match self {
            Self::Location { user, .. } => Some(*user),
            _ => None,
        }
    }

    /// What a newer message replaces in a queue: a user's move, or a
    /// stranger's cell (kept apart: a friend's move never replaces the
    /// same user's stranger notice).
    fn conflation_key(&self) -> Option<(bool, UserId)> {
        match self {
            Self::Location { user, .. } => Some((false, *user)),
            Self::Stranger { user, .. } => Some((true, *user)),
            _ => None,
        }
    }
}

/// Control messages one session may have pending. Past that, the session
/// is asked to re-read its friends and token from the user store instead:
/// the store holds every change the dropped messages announced.
pub const CONTROL_QUEUE: usize = 64;

/// What a session's control queue carries.
#[derive(Debug)]
enum Control {
    Message(BusMessage),
    Resync,
}

/// A session's end of the bus: messages for every channel it subscribed to
/// arrive on its [`Mailbox`]. Delivery never blocks the publisher.
///
/// Location updates and control messages have separate bounded queues.
/// Location updates are *conflated*: a friend's update replaces that
/// friend's update still waiting in the queue (in its place), so a session
/// that falls behind sends each friend's latest position, not a backlog of
/// stale ones ([`conflated_total`] counts the replaced). When the location
/// queue is full (a stalled client) the update is dropped and counted: a
/// friend's next move replaces it. A control message is never
/// dropped for location updates; if even the control queue is full, the
/// session is asked to re-read everything from the user store (which holds
/// what the message announced) before it forwards anything else. A grant
/// (`FriendVisible`) is always delivered as such a re-read request: a grant
/// is confirmed from the store anyway, and requests coalesce, so a flood of
/// grants takes one slot.
///
/// **The last change wins.** A re-read request coalesces only with one at
/// the *back* of the control queue, never with one queued before a
/// revocation, and every revocation (`FriendHidden`) is followed by a
/// re-read: so whatever order grants and revocations arrive in (two nodes
/// may publish them in either order), the last thing a session does about
/// them is read the store, after every revocation was applied. Coalescing
/// a grant into an earlier pending re-read let a quick off/on leave the
/// friend hidden while the store said shared.
#[derive(Debug, Clone)]
pub struct Subscriber {
    id: u64,
    shared: Arc<Shared>,
}

/// The queues, shared by a subscriber (and its clones in the hub) and its
/// mailbox. Both are `VecDeque`s allocated on first use and released when
/// they drain after growing: an idle connection carries no queue memory
/// (a tokio `mpsc` channel preallocated a block of 32 slots, plus its
/// padded state: about 3 KB a session).
#[derive(Debug)]
struct Shared {
    overflowed: AtomicBool,
    gate: StrangerGate,
    /// The mailbox was dropped: the session is gone.
    closed: AtomicBool,
    capacity: usize,
    queues: Mutex<Queues>,
    waker: AtomicWaker,
}

#[derive(Debug, Default)]
struct Queues {
    control: VecDeque<Control>,
    /// Each update with the instant it reached this node (the hub's
    /// dispatch), for the node-to-socket latency.
    locations: VecDeque<(BusMessage, Instant)>,
}

/// Queue capacity kept after a queue drains; more is released.
const KEEP: usize = 8;

/// The oldest entry of `q`; once that empties a queue grown past [`KEEP`],
/// its memory goes too.
fn pop_front_releasing<T>(q: &mut VecDeque<T>) -> Option<T> {
    let item = q.pop_front()?;
    if q.is_empty() && q.capacity() > KEEP {
        *q = VecDeque::new();
    }
    Some(item)
}

static CONFLATED: AtomicU64 = AtomicU64::new(0);
static GATED: AtomicU64 = AtomicU64::new(0);

/// Which stranger notices a session still takes. While its table of
/// strangers is full (the per-session cap), only notices of the strangers
/// it shows: a 256-bit Bloom filter of their ids (two bits each), checked
/// without the queue's lock, so a hot cell costs a full session a few
/// atomic loads per notice. A false positive (about 2 % with 20 shown; a
/// 64-bit, one-bit filter let 27 % through, and each woke the session)
/// passes and the session ignores it.
#[derive(Debug)]
struct StrangerGate {
    full: AtomicBool,
    bits: [AtomicU64; GATE_WORDS],
    /// Stranger notices the queue holds at most (the session's cap).
    room: AtomicUsize,
}

impl Default for StrangerGate {
    fn default() -> Self {
        Self {
            full: AtomicBool::new(false),
            bits: Default::default(),
            room: AtomicUsize::new(usize::MAX),
        }
    }
}

const GATE_WORDS: usize = 4;

/// The filter's two bits of `user`: `(word, mask)` each.
fn gate_bits(user: UserId) -> [(usize, u64); 2] {
    let h = (user.0 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    [h >> 56, (h >> 48) & 0xff].map(|b| ((b / 64) as usize, 1u64 << (b % 64)))
}

impl StrangerGate {
    fn admits(&self, user: UserId) -> bool {
        !self.full.load(Ordering::Acquire)
            || gate_bits(user)
                .iter()
                .all(|&(w, m)| self.bits[w].load(Ordering::Acquire) & m != 0)
    }
}

/// Stranger notices not queued because the session's table was full (the
/// hot-cell cap at work), over every subscriber of this process.
pub fn gated_total() -> u64 {
    GATED.load(Ordering::Relaxed)
}

/// Location updates replaced in a session's queue by a newer one of the same
/// friend before the session sent them, in this process: each is a stale
/// position a slow session skipped.
pub fn conflated_total() -> u64 {
    CONFLATED.load(Ordering::Relaxed)
}

impl Shared {
    fn queues(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a session takes from its [`Mailbox`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mail {
    /// A message from a subscribed channel.
    Message(BusMessage),
    /// Re-read friends, sharing and the token from the user store: a grant
    /// arrived, the bus may have lost messages (a broker reconnect, the node
    /// fell behind), or a control message could not be queued.
    Resync,
}

/// The receiving end of a [`Subscriber`]: control messages first, then
/// location updates.
#[derive(Debug)]
pub struct Mailbox {
    shared: Arc<Shared>,
    /// When the last location update taken reached this node.
    arrived: Option<Instant>,
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
    }
}

impl Subscriber {
    /// A new subscriber with a queue of `capacity` location updates (and
    /// [`CONTROL_QUEUE`] control messages), and its mailbox.
    pub fn new(capacity: usize) -> (Self, Mailbox) {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let shared = Arc::new(Shared {
            overflowed: AtomicBool::new(false),
            gate: StrangerGate::default(),
            closed: AtomicBool::new(false),
            capacity: capacity.max(1),
            queues: Mutex::default(),
            waker: AtomicWaker::new(),
        });
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let sub = Self {
            id,
            shared: shared.clone(),
        };
        let mailbox = Mailbox {
            shared,
            arrived: None,
        };
        (sub, mailbox)
    }

    /// Unique within the process; the key a bus keeps subscriptions under.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// At most `cap` stranger notices wait in this session's queue (the
    /// size of its table of strangers): past it, newcomers are filtered.
    pub fn limit_strangers(&self, cap: usize) {
        self.shared.gate.room.store(cap, Ordering::Relaxed);
    }

    /// Sets which stranger notices this session takes: all while `full` is
    /// false, else only those of `shown` (see [`gated_total`]).
    pub fn gate_strangers(&self, full: bool, shown: impl IntoIterator<Item = UserId>) {
        let mut words = [0u64; GATE_WORDS];
        for u in shown {
            for (w, m) in gate_bits(u) {
                words[w] |= m;
            }
        }
        let gate = &self.shared.gate;
        for (slot, w) in gate.bits.iter().zip(words) {
            slot.store(w, Ordering::Release);
        }
        gate.full.store(full, Ordering::Release);
    }

    /// Hands `msg` to the session without waiting. Returns false if it was
    /// not queued: a location update dropped (queue full or session gone),
    /// or a control message that overflowed (the session will re-read the
    /// store instead).
    pub fn deliver(&self, msg: BusMessage) -> bool {
        self.deliver_at(msg, Instant::now())
    }

    /// [`Subscriber::deliver`], for a message that reached this node at
    /// `arrived` (a hub fanning one message out reads the clock once).
    pub fn deliver_at(&self, msg: BusMessage, arrived: Instant) -> bool {
        match msg {
            BusMessage::Location { .. } => self.send_location(msg, arrived),
            BusMessage::Stranger { user, .. } => {
                if !self.shared.gate.admits(user) {
                    // Filtered as intended, not lost: counted apart.
                    GATED.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                self.send_location(msg, arrived)
            }
            BusMessage::FriendVisible { .. } => self.send_control(None),
            // A revocation is applied at once, then confirmed by a re-read
            // queued behind it (see `send_control`).
            _ => self.send_control(Some(msg)),
        }
    }

    /// Asks the session to re-read its friends and token from the user
    /// store (the bus may have lost messages). Requests coalesce with one
    /// still waiting at the back of the queue. Returns false if it
    /// overflowed.
    pub fn resync(&self) -> bool {
        self.send_control(None)
    }

    /// Queues `msg`, a move of `user` (or a stranger notice), in place of
    /// the same kind of message of `user` still waiting, if any.
    fn send_location(&self, msg: BusMessage, arrived: Instant) -> bool {
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return false;
        }
        let key = msg.conflation_key();
        let stranger = matches!(msg, BusMessage::Stranger { .. });
        let (queued, woken) = {
            let mut q = shared.queues();
            let mut strangers = 0;
            let mut waiting = None;
            for (i, (m, _)) in q.locations.iter().enumerate() {
                if m.conflation_key() == key {
                    waiting = Some(i);
                    break;
                }
                strangers += usize::from(matches!(m, BusMessage::Stranger { .. }));
            }
            if let Some(slot) = waiting.and_then(|i| q.locations.get_mut(i)) {
                *slot = (msg, arrived);
                CONFLATED.fetch_add(1, Ordering::Relaxed);
                (true, true)
            } else if stranger && strangers >= shared.gate.room.load(Ordering::Relaxed) {
                // More newcomers than the table could take: they never
                // crowd friends' updates out of the queue (a crowd opting
                // in at once filled it before any table was full).
                GATED.fetch_add(1, Ordering::Relaxed);
                (true, false)
            } else if q.locations.len() < shared.capacity {
                q.locations.push_back((msg, arrived));
                (true, true)
            } else {
                (false, false)
            }
        };
        // Woken outside the lock: the session may run at once.
        if woken {
            shared.waker.wake();
        }
        queued
    }

    /// Queues `msg` (`None`: a re-read request), and after a revocation a
    /// re-read; a re-read already at the back of the queue takes the new
    /// request.
    fn send_control(&self, msg: Option<BusMessage>) -> bool {
        if self.shared.closed.load(Ordering::Acquire) {
            return false; // the session is gone
        }
        let reread = matches!(msg, None | Some(BusMessage::FriendHidden { .. }));
        let queued = {
            let mut q = self.shared.queues();
            let mut ok = true;
            if let Some(m) = msg {
                ok = push_control(&mut q.control, Control::Message(m));
            }
            if ok && reread && !matches!(q.control.back(), Some(Control::Resync)) {
                ok = push_control(&mut q.control, Control::Resync);
            }
            if !ok {
                self.shared.overflowed.store(true, Ordering::Release);
            }
            ok
        };
        self.shared.waker.wake();
        queued
    }
}

/// Queues `c` if the control queue has room.
fn push_control(q: &mut VecDeque<Control>, c: Control) -> bool {
    let room = q.len() < CONTROL_QUEUE;
    if room {
        q.push_back(c);
    }
    room
}

impl Mailbox {
    /// An overflow first (as a re-read request: the flag is cleared before
    /// the session reads the store, so an overflow during the read asks
    /// again; and a second re-read goes behind the control messages still
    /// queued, so the last word is the store's), then the oldest control
    /// message, then the oldest location update.
    fn next(&mut self) -> Option<Mail> {
        if self.shared.overflowed.swap(false, Ordering::AcqRel) {
            let mut q = self.shared.queues();
            if !q.control.is_empty() && !matches!(q.control.back(), Some(Control::Resync)) {
                // Room was made by the overflow's own drop: at most one over.
                q.control.push_back(Control::Resync);
            }
            return Some(Mail::Resync);
        }
        let mut q = self.shared.queues();
        if let Some(c) = pop_front_releasing(&mut q.control) {
            drop(q);
            return Some(match c {
                Control::Message(m) => Mail::Message(m),
                Control::Resync => Mail::Resync,
            });
        }
        let (msg, at) = pop_front_releasing(&mut q.locations)?;
        drop(q);
        self.arrived = Some(at);
        Some(Mail::Message(msg))
    }

    /// The next mail: a re-read after an overflow first, then control
    /// messages in order, then location updates. Waits while both queues
    /// are empty.
    pub async fn recv(&mut self) -> Option<Mail> {
        std::future::poll_fn(|cx| {
            // Registered before looking, so a message queued meanwhile wakes us.
            self.shared.waker.register(cx.waker());
            match self.next() {
                Some(m) => Poll::Ready(Some(m)),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// When the last location update taken from this mailbox reached the
    /// node.
    pub fn arrived(&self) -> Option<Instant> {
        self.arrived
    }

    /// The next mail if one is ready, without waiting (same order as
    /// [`Mailbox::recv`]).
    pub fn try_recv(&mut self) -> Option<Mail> {
        self.next()
    }
}

#[cfg(test)]
mod mailbox_tests {
    use super::*;

    fn loc(user: i64) -> BusMessage {
        BusMessage::Location {
            user: UserId(user),
            loc: Location::new(1.0, 2.0, user).expect("valid"),
        }
    }

    const HIDDEN: BusMessage = BusMessage::FriendHidden {
        friend: UserId(7),
        reason: LeftReason::Unfriended,
    };

    #[test]
    fn control_is_never_dropped_for_locations_and_comes_first() {
        let (sub, mut mb) = Subscriber::new(2);
        assert!(sub.deliver(loc(1)));
        assert!(sub.deliver(loc(2)));
        assert!(!sub.deliver(loc(3)), "the location queue is full");
        assert!(sub.deliver(HIDDEN), "control has its own queue");
        assert_eq!(mb.try_recv(), Some(Mail::Message(HIDDEN)));
        assert_eq!(mb.try_recv(), Some(Mail::Resync));
        assert_eq!(mb.try_recv(), Some(Mail::Message(loc(1))));
        assert_eq!(mb.try_recv(), Some(Mail::Message(loc(2))));
        assert_eq!(mb.try_recv(), None);
    }

    const CHANGED: BusMessage = BusMessage::FriendsChanged { friend: UserId(7) };

    #[test]
    fn a_full_control_queue_asks_for_a_re_read_first_and_last() {
        let (sub, mut mb) = Subscriber::new(1);
        for _ in 0..CONTROL_QUEUE {
            assert!(sub.deliver(CHANGED));
        }
        assert!(!sub.deliver(CHANGED));
        assert_eq!(mb.try_recv(), Some(Mail::Resync), "before the queued ones");
        for _ in 0..CONTROL_QUEUE {
            assert_eq!(mb.try_recv(), Some(Mail::Message(CHANGED)));
        }
        assert_eq!(mb.try_recv(), Some(Mail::Resync), "and after them");
        assert_eq!(mb.try_recv(), None);
    }

    #[test]
    fn grants_are_coalesced_re_read_requests() {
        let (sub, mut mb) = Subscriber::new(1);
        let grant = BusMessage::FriendVisible { friend: UserId(3) };
        for _ in 0..1000 {
            assert!(sub.deliver(grant));
        }
        assert!(sub.deliver(HIDDEN));
        assert_eq!(mb.try_recv(), Some(Mail::Resync));
        assert_eq!(mb.try_recv(), Some(Mail::Message(HIDDEN)));
        assert_eq!(mb.try_recv(), Some(Mail::Resync), "a revocation is re-read");
        assert_eq!(mb.try_recv(), None);
    }

    /// Off/on/off/on… in any order: whatever arrives, the last mail is a
    /// re-read that comes after every revocation (the sharing race: a grant
    /// coalesced into a re-read queued before a revocation was lost).
    #[test]
    fn the_last_word_on_grants_and_revocations_is_a_re_read() {
        let grant = BusMessage::FriendVisible { friend: UserId(7) };
        for pattern in 0u32..256 {
            let (sub, mut mb) = Subscriber::new(1);
            for bit in 0..8 {
                assert!(sub.deliver(if pattern >> bit & 1 == 1 {
                    grant
                } else {
                    HIDDEN
                }));
            }
            let mut mails = Vec::new();
            while let Some(m) = mb.try_recv() {
                mails.push(m);
            }
            let last_hidden = mails.iter().rposition(|m| *m == Mail::Message(HIDDEN));
            let last_reread = mails.iter().rposition(|m| *m == Mail::Resync);
            assert!(last_reread.is_some(), "{pattern:08b}: {mails:?}");
            assert!(last_hidden < last_reread, "{pattern:08b}: {mails:?}");
            assert!(
                mails
                    .windows(2)
                    .all(|w| w[0] != Mail::Resync || w[1] != Mail::Resync),
                "re-reads side by side coalesce: {mails:?}"
            );
        }
    }

    #[test]
    fn resync_requests_coalesce_until_taken() {
        let (sub, mut mb) = Subscriber::new(1);
        assert!(sub.resync());
        assert!(sub.resync());
        assert_eq!(mb.try_recv(), Some(Mail::Resync));
        assert_eq!(mb.try_recv(), None, "two requests, one re-read");
        assert!(sub.resync());
        assert_eq!(mb.try_recv(), Some(Mail::Resync));
    }

    #[test]
    fn queues_hold_no_memory_until_used_and_release_it_once_drained() {
        let (sub, mut mb) = Subscriber::new(32);
        assert_eq!(mb.shared.queues().locations.capacity(), 0, "idle: nothing");
        for i in 0..32 {
            assert!(sub.deliver(loc(i)));
        }
        assert!(mb.shared.queues().locations.capacity() >= 32);
        for i in 0..32 {
            assert_eq!(mb.try_recv(), Some(Mail::Message(loc(i))), "in order");
        }
        assert_eq!(mb.try_recv(), None);
        assert!(mb.shared.queues().locations.capacity() <= KEEP);
        assert!(mb
            .arrived()
            .is_some_and(|a| a.elapsed() < Duration::from_secs(5)));
    }

    #[test]
    fn a_friends_newer_update_replaces_the_one_still_queued() {
        let (sub, mut mb) = Subscriber::new(2);
        let before = conflated_total();
        let moved = |user: i64, ts: i64| BusMessage::Location {
            user: UserId(user),
            loc: Location::new(1.0, 2.0, ts).expect("valid"),
        };
        assert!(sub.deliver(moved(1, 10)));
        assert!(sub.deliver(moved(2, 10)));
        // The queue is full, but friend 1's newer position takes the place
        // of the stale one instead of being dropped.
        assert!(sub.deliver(moved(1, 20)));
        assert!(sub.deliver(moved(1, 30)));
        assert!(!sub.deliver(moved(3, 10)), "a third friend: full");
        assert!(conflated_total() >= before + 2);
        assert_eq!(
            mb.try_recv(),
            Some(Mail::Message(moved(1, 30))),
            "in 1's place"
        );
        assert_eq!(mb.try_recv(), Some(Mail::Message(moved(2, 10))));
        assert_eq!(mb.try_recv(), None);
        // Control messages are never conflated.
        assert!(sub.deliver(CHANGED));
        assert!(sub.deliver(CHANGED));
        assert_eq!(mb.try_recv(), Some(Mail::Message(CHANGED)));
        assert_eq!(mb.try_recv(), Some(Mail::Message(CHANGED)));
    }

    #[test]
    fn stranger_notices_conflate_apart_from_moves_and_pass_the_gate() {
        let (sub, mut mb) = Subscriber::new(8);
        let moved = BusMessage::Location {
            user: UserId(1),
            loc: Location::new(1.0, 2.0, 5).expect("valid"),
        };
        let here = |user: i64, stamp: i64| BusMessage::Stranger {
            user: UserId(user),
            cell: Some(7),
            stamp,
        };
        assert!(sub.deliver(moved));
        assert!(sub.deliver(here(1, 10)));
        assert!(sub.deliver(here(1, 11)));
        assert_eq!(mb.try_recv(), Some(Mail::Message(moved)), "not replaced");
        assert_eq!(mb.try_recv(), Some(Mail::Message(here(1, 11))));
        assert_eq!(mb.try_recv(), None);
        // Full: only the strangers shown pass (some ids may collide in
        // the filter, so look for ones that do not).
        sub.gate_strangers(true, [UserId(1)]);
        let before = gated_total();
        let other = (2..100)
            .find(|u| gate_bits(UserId(*u)) != gate_bits(UserId(1)))
            .expect("different bits");
        assert!(sub.deliver(here(1, 12)));
        assert!(sub.deliver(here(other, 12)), "filtered, not a drop");
        assert!(gated_total() > before);
        assert_eq!(mb.try_recv(), Some(Mail::Message(here(1, 12))));
        assert_eq!(mb.try_recv(), None, "the other was not queued");
        sub.gate_strangers(false, []);
        assert!(sub.deliver(here(other, 13)));
        assert_eq!(mb.try_recv(), Some(Mail::Message(here(other, 13))));
        // No more queued notices than the table takes: a friend's move
        // still finds room.
        sub.limit_strangers(2);
        for u in 10..20 {
            assert!(sub.deliver(here(u, 1)));
        }
        assert!(sub.deliver(moved));
        let mut got = Vec::new();
        while let Some(Mail::Message(m)) = mb.try_recv() {
            got.push(m);
        }
        assert_eq!(got, vec![here(10, 1), here(11, 1), moved]);
    }

    #[test]
    fn the_gate_lets_few_strangers_through_who_are_not_shown() {
        let (sub, _mb) = Subscriber::new(8);
        let shown: Vec<UserId> = (1..=20).map(|u| UserId(u * 7919)).collect();
        sub.gate_strangers(true, shown.iter().copied());
        let gate = &sub.shared.gate;
        assert!(shown.iter().all(|u| gate.admits(*u)), "no false negative");
        let passed = (100_000..110_000)
            .filter(|u| gate.admits(UserId(*u)))
            .count();
        assert!(passed < 500, "{passed} of 10 000 others passed");
    }

    #[test]
    fn nothing_is_queued_for_a_session_that_is_gone() {
        let (sub, mb) = Subscriber::new(4);
        drop(mb);
        assert!(!sub.deliver(loc(1)));
        assert!(!sub.deliver(HIDDEN));
        assert_eq!(sub.shared.queues().locations.len(), 0);
    }

    #[tokio::test]
    async fn recv_waits_for_either_queue() {
        let (sub, mut mb) = Subscriber::new(4);
        let waiter = tokio::spawn(async move { (mb.recv().await, mb) });
        tokio::task::yield_now().await;
        assert!(sub.deliver(loc(5)));
        let (got, mut mb) = waiter.await.expect("join");
        assert_eq!(got, Some(Mail::Message(loc(5))));
        let waiter = tokio::spawn(async move { mb.recv().await });
        tokio::task::yield_now().await;
        assert!(
            sub.deliver(HIDDEN),
            "a control message wakes the session too"
        );
        assert_eq!(waiter.await.ok().flatten(), Some(Mail::Message(HIDDEN)));
    }
}

/// Counters a bus keeps, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Messages handed to local sessions.
    pub delivered: u64,
    /// Messages dropped because a session's queue was full, or lost because
    /// the node fell behind its broker connection.
    pub dropped: u64,
    /// Times a broker connection was re-established.
    pub reconnects: u64,
    /// Channels with at least one local subscriber.
    pub channels: u64,
    /// Pub/sub servers in the ring this node routes on (0: no ring).
    pub ring_members: u64,
    /// Channel subscriptions this node moved to another server because the
    /// ring changed.
    pub ring_channels_moved: u64,
    /// The ring's membership source (etcd) cannot be reached: the node
    /// routes on the last ring it knew.
    pub ring_stale: bool,
}

/// The routing layer: publish to a channel; subscribers of that channel, on
/// any node, receive it.
#[async_trait]
pub trait PubSub: Send + Sync + 'static {
    /// Publishes `msg` on `channel`. Fire and forget: success means the bus
    /// accepted it, not that anyone received it.
    async fn publish(&self, channel: Channel, msg: BusMessage) -> StoreResult<()>;
    /// Adds `sub` to each channel; returns once the bus delivers them. On an
    /// error some of them may be held: the caller removes them (a
    /// [`Subscription`] does).
    async fn subscribe(&self, sub: &Subscriber, channels: &[Channel]) -> StoreResult<()>;
    /// Removes `sub` from each channel (unknown ones are ignored). Never
    /// waits: it runs from [`Subscription`]'s `Drop`.
    fn unsubscribe(&self, sub: &Subscriber, channels: &[Channel]);

    /// Counters so far.
    fn stats(&self) -> BusStats {
        BusStats::default()
    }

    /// Answers when the backend is reachable (for readiness checks).
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}

/// A session's channels on a bus, held for as long as the guard lives:
/// dropping it (the session ended, panicked or was aborted) removes them
/// all, so no subscriber outlives its session in a hub.
pub struct Subscription {
    bus: Arc<dyn PubSub>,
    sub: Subscriber,
    /// Sorted, no duplicates.
    held: Vec<Channel>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("subscriber", &self.sub.id())
            .field("held", &self.held.len())
            .finish()
    }
}

impl Subscription {
    /// A guard for `sub` on `bus`, holding nothing yet.
    pub fn new(bus: Arc<dyn PubSub>, sub: Subscriber) -> Self {
        Self {
            bus,
            sub,
            held: Vec::new(),
        }
    }

    /// The session's end of the bus.
    pub fn subscriber(&self) -> &Subscriber {
        &self.sub
    }

    /// Whether `channel` is held.
    pub fn holds(&self, channel: Channel) -> bool {
        self.held.binary_search(&channel).is_ok()
    }

    /// The channels held, sorted.
    pub fn channels(&self) -> &[Channel] {
        &self.held
    }

    /// Subscribes to `channels`. On an error, those that were not held
    /// before are released again, so the guard never holds a channel the
    /// bus did not confirm.
    pub async fn add(&mut self, channels: &[Channel]) -> StoreResult<()> {
        let mut fresh: Vec<Channel> = channels
            .iter()
            .copied()
            .filter(|c| !self.holds(*c))
            .collect();
        fresh.sort_unstable();
        fresh.dedup();
        match self.bus.subscribe(&self.sub, channels).await {
            Ok(()) => {
                self.held.extend(fresh);
                self.held.sort_unstable();
                Ok(())
            }
            Err(e) => {
                self.bus.unsubscribe(&self.sub, &fresh);
                Err(e)
            }
        }
    }

    /// Unsubscribes from those of `channels` that are held.
    pub fn remove(&mut self, channels: &[Channel]) {
        let gone: Vec<Channel> = channels
            .iter()
            .copied()
            .filter(|c| self.holds(*c))
            .collect();
        if gone.is_empty() {
            return;
        }
        self.held.retain(|c| !gone.contains(c));
        self.bus.unsubscribe(&self.sub, &gone);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.held.is_empty() {
            self.bus.unsubscribe(&self.sub, &self.held);
        }
    }
}

/// A user as stored, for login.
#[derive(Debug, Clone)]
pub struct UserRecord {
    /// Id.
    pub id: UserId,
    /// Unique name.
    pub username: String,
    /// PHC-format password hash.
    pub password_hash: String,
}

/// A user to create in bulk (load tests, imports), with one login token.
#[derive(Debug, Clone)]
pub struct BulkUser {
    /// Unique name.
    pub username: String,
    /// PHC-format password hash.
    pub password_hash: String,
    /// SHA-256 of a token to create for the user.
    pub token_hash: [u8; 32],
    /// When that token expires, Unix ms.
    pub token_expires_at_ms: i64,
}

/// Writes many users, their tokens and their friendships at once: load
/// tests and imports, where the REST path would cost an argon2 hash per
/// user and a request per friendship. Implemented by the SQL user stores.
#[async_trait]
pub trait BulkLoad: Send + Sync {
    /// Creates `users` (each with its token) and the mutual friendships
    /// `friendships` (indexes into `users`, sharing on both ways) in one
    /// transaction; returns the new ids in order. All or nothing: a taken
    /// username is a [`StoreError::Conflict`], a friendship naming no user
    /// [`StoreError::NotFound`].
    async fn bulk_insert(
        &self,
        users: &[BulkUser],
        friendships: &[(u32, u32)],
    ) -> StoreResult<Vec<UserId>>;
}

/// One row of a user's friend list.
#[derive(Debug, Clone, PartialEq)]
pub struct FriendEntry {
    /// The other user.
    pub id: UserId,
    /// Their name.
    pub username: String,
    /// Relation, from the owner's side.
    pub status: FriendStatus,
    /// What the owner grants this user (as stored: an `until` in the past
    /// means it has ended, see [`Share::active_at`]).
    pub sharing: Share,
    /// What this user grants the owner (disabled unless mutual friends).
    /// Ghost mode does not show here: it must look like going quiet.
    pub shares_with_me: Share,
}

/// A change of what one user grants a friend
/// ([`UserStore::set_sharing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareChange {
    /// On or off.
    pub enabled: bool,
    /// When it ends by itself (only while on; ignored when off).
    pub until_ms: Option<i64>,
    /// The new precision; `None` keeps the current one.
    pub precision: Option<Precision>,
}

/// Users, bearer tokens, friendships and sharing permissions.
///
/// A friendship is stored as two directed edges so that each side has its own
/// status and its own sharing flag; adapters keep both edges in one
/// transaction.
#[async_trait]
pub trait UserStore: Send + Sync + 'static {
    /// Creates a user. `Conflict` if the name is taken.
    async fn create_user(&self, username: &str, password_hash: &str) -> StoreResult<UserId>;
    /// Finds a user by name.
    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserRecord>>;
    /// Whether the user exists.
    async fn user_exists(&self, id: UserId) -> StoreResult<bool>;
    /// Stores a token (by its hash) for `user`, valid until `expires_at_ms`.
    async fn create_token(
        &self,
        token_hash: &[u8],
        user: UserId,
        expires_at_ms: i64,
    ) -> StoreResult<()>;
    /// The user a token belongs to and when it expires, if it exists and has
    /// not expired at `now_ms`.
    async fn token_user(
        &self,
        token_hash: &[u8],
        now_ms: i64,
    ) -> StoreResult<Option<(UserId, i64)>>;
    /// Deletes a token (logout). Unknown tokens are ignored.
    async fn delete_token(&self, token_hash: &[u8]) -> StoreResult<()>;
    /// Deletes tokens expired at `now_ms` (they are already refused on
    /// read; this keeps the table small). Returns how many.
    async fn purge_expired_tokens(&self, now_ms: i64) -> StoreResult<u64>;
    /// `from` asks `to` to be friends, or accepts `to`'s pending request
    /// (the transition is [`FriendStatus::after_request`]). Returns the
    /// relation before, from `from`'s side. `NotFound` if `to` does not exist,
    /// `Conflict` if `from == to`.
    async fn request_friend(&self, from: UserId, to: UserId) -> StoreResult<Option<FriendStatus>>;
    /// Removes the relation between `a` and `b` whatever its state (unfriend,
    /// decline or cancel). Returns what it was, from `a`'s side.
    async fn remove_friend(&self, a: UserId, b: UserId) -> StoreResult<Option<FriendStatus>>;
    /// Changes what `from` grants friend `to`. Returns the grant before and
    /// after; `NotFound` unless they are mutual friends.
    async fn set_sharing(
        &self,
        from: UserId,
        to: UserId,
        change: ShareChange,
    ) -> StoreResult<(Share, Share)>;
    /// The user's friends and pending requests, ordered by username.
    async fn friends(&self, user: UserId) -> StoreResult<Vec<FriendEntry>>;
    /// The friends whose locations `viewer` may see at `now_ms`, with the
    /// terms of their grant: mutual friends whose sharing with `viewer` is
    /// on and has not ended, and who are not in ghost mode.
    async fn visible_friends(&self, viewer: UserId, now_ms: i64) -> StoreResult<Vec<Grant>>;
    /// Ghost mode: hides `user` from every friend until `until_ms`
    /// ([`GHOST_FOREVER`]: until turned off), or ends it (`None`).
    /// `NotFound` if the user does not exist.
    async fn set_ghost(&self, user: UserId, until_ms: Option<i64>) -> StoreResult<()>;
    /// When `user`'s ghost mode ends, if it is on at `now_ms`.
    async fn ghost_until(&self, user: UserId, now_ms: i64) -> StoreResult<Option<i64>>;
    /// Stores a WebSocket ticket: the SHA-256 of a short-lived, single-use
    /// secret, standing for the token `token_hash` until `expires_at` (a
    /// browser puts it in the WebSocket URL instead of its token).
    async fn create_ticket(
        &self,
        ticket_hash: &[u8],
        token_hash: &[u8],
        expires_at: i64,
    ) -> StoreResult<()>;
    /// Takes a ticket: the hash of the token it stands for, if it exists and
    /// has not expired at `now_ms`. It is gone afterwards, so a ticket is
    /// used once, on whichever node. Logging the token out deletes its
    /// tickets; `purge_expired_tokens` deletes expired ones.
    async fn take_ticket(&self, ticket_hash: &[u8], now_ms: i64) -> StoreResult<Option<Vec<u8>>>;
    /// Makes `user` discoverable by strangers nearby until `until_ms`
    /// ([`GHOST_FOREVER`]: until turned off), or not (`None`).
    /// `NotFound` for an unknown user.
    async fn set_discoverable(&self, user: UserId, until_ms: Option<i64>) -> StoreResult<()>;
    /// Until when `user` is discoverable, if they are at `now_ms`.
    async fn discoverable_until(&self, user: UserId, now_ms: i64) -> StoreResult<Option<i64>>;
    /// Which of `users` are discoverable at `now_ms` (any order; unknown
    /// ids are left out).
    async fn discoverable_among(&self, users: &[UserId], now_ms: i64) -> StoreResult<Vec<UserId>>;
    /// Deletes the account and everything tied to it in this store (its
    /// tokens, both sides of every relation), in one transaction; the
    /// name is free again. Returns the users it had a relation with (to
    /// tell them); `NotFound` if there is no such user.
    async fn delete_user(&self, user: UserId) -> StoreResult<Vec<UserId>>;

    /// Answers when the backend is reachable (for readiness checks).
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}

/// The `until` of a ghost mode (or of being discoverable) that lasts until
/// it is turned off.
pub const GHOST_FOREVER: i64 = i64::MAX;

/// One location to append to history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistoryEntry {
    /// Whose.
    pub user: UserId,
    /// Where, when.
    pub loc: Location,
}

/// What [`HistoryStore::prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Whole day partitions dropped (PostgreSQL).
    pub partitions: u64,
    /// Rows deleted one batch at a time.
    pub rows: u64,
}

/// Append-only location history.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Appends a batch atomically (all or nothing).
    async fn append(&self, batch: &[HistoryEntry]) -> StoreResult<()>;
    /// The user's locations with `from_ms <= ts < to_ms`, oldest first, at
    /// most `limit`.
    async fn range(
        &self,
        user: UserId,
        from_ms: i64,
        to_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<Location>>;
    /// Deletes every location of `user` (the user asked); returns how many.
    async fn delete_user(&self, user: UserId) -> StoreResult<u64>;
    /// Retention: deletes every location older than `before_ms`, in
    /// batches short enough not to hold up appends.
    async fn prune(&self, before_ms: i64) -> StoreResult<Pruned>;

    /// Answers when the backend is reachable (for readiness checks).
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}

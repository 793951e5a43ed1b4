//! The `nearby` domain, free of I/O.
//!
//! This crate decides; it never waits. It owns the vocabulary shared by every
//! other crate ([`UserId`], [`Location`], [`FriendStatus`], [`LeftReason`],
//! what a friend grants: [`Share`], [`Grant`], [`Precision`]),
//! the account rules ([`account`]) and the heart of the product, the
//! per-connection [`session::Session`] state machine that turns "my friend
//! moved", "I moved", "time passed" and "a friendship changed" into the events
//! a client sees. The server crate feeds it and does the I/O.
//!
//! **Architecture invariant:** no dependency on tokio, a network or a database
//! crate; everything here is a pure function of its inputs (time included,
//! which is always passed in as Unix milliseconds).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod account;
pub mod pace;
pub mod rate;
pub mod session;
pub mod strangers;

mod ids;

pub use ids::{ParseUserIdError, UserId};
pub use nearby_geo::{CoordError, Point};

use serde::{Deserialize, Serialize};

/// A user's position at an instant: what the location cache stores, what the
/// bus carries and what history appends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Location {
    /// Where.
    pub point: Point,
    /// When the server accepted it, Unix milliseconds.
    pub ts_ms: i64,
}

impl Location {
    /// A location with validated coordinates (what stores re-check when
    /// reading rows or bytes back).
    pub fn new(lat: f64, lon: f64, ts_ms: i64) -> Result<Self, CoordError> {
        Ok(Self {
            point: Point::new(lat, lon)?,
            ts_ms,
        })
    }
}

/// How a user relates to another user in the friend graph, seen from one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FriendStatus {
    /// Mutual friendship.
    Friends,
    /// The other user asked me; I have not answered.
    Incoming,
    /// I asked the other user; they have not answered.
    Outgoing,
}

impl FriendStatus {
    /// The same relation seen from the other side.
    pub fn mirrored(self) -> Self {
        match self {
            Self::Friends => Self::Friends,
            Self::Incoming => Self::Outgoing,
            Self::Outgoing => Self::Incoming,
        }
    }

    /// Stable text form, as stored and as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Friends => "friends",
            Self::Incoming => "incoming",
            Self::Outgoing => "outgoing",
        }
    }

    /// The relation after `me` sends a friend request (`PUT /v1/friends/{id}`)
    /// while the relation was `before`: a new request is outgoing, a request
    /// to someone who already asked me accepts it, anything else is unchanged.
    pub fn after_request(before: Option<Self>) -> Self {
        match before {
            None => Self::Outgoing,
            Some(Self::Incoming) => Self::Friends,
            Some(other) => other,
        }
    }

    /// Parses [`FriendStatus::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "friends" => Some(Self::Friends),
            "incoming" => Some(Self::Incoming),
            "outgoing" => Some(Self::Outgoing),
            _ => None,
        }
    }
}

/// How precisely a user shares their position with one friend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Distance to the metre and the exact bearing.
    #[default]
    Precise,
    /// Only what follows from both users' cells of about 3 km
    /// ([`Point::cell_centre`]): the distance between the two centres,
    /// rounded to the kilometre, and a bearing in eighths of a circle.
    Approximate,
}

impl Precision {
    /// The wire name (`precise`, `approximate`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Precise => "precise",
            Self::Approximate => "approximate",
        }
    }

    /// Whether this is the default, [`Precision::Precise`] (wire formats
    /// leave it out).
    pub fn is_precise(&self) -> bool {
        *self == Self::Precise
    }

    /// Parses [`Precision::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "precise" => Some(Self::Precise),
            "approximate" => Some(Self::Approximate),
            _ => None,
        }
    }
}

/// What one user grants one friend: whether they share, until when, and
/// how precisely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Share {
    /// Sharing is on (it still ends at `until_ms`).
    pub enabled: bool,
    /// When sharing ends by itself, Unix ms; `None`: until turned off.
    pub until_ms: Option<i64>,
    /// What the friend may learn.
    pub precision: Precision,
}

impl Share {
    /// Sharing as a new friendship starts: on, precise, for good.
    pub const DEFAULT: Self = Self {
        enabled: true,
        until_ms: None,
        precision: Precision::Precise,
    };

    /// Whether the friend may see the user at `now_ms`.
    pub fn active_at(&self, now_ms: i64) -> bool {
        self.enabled && self.until_ms.is_none_or(|u| now_ms < u)
    }
}

/// A friend a viewer may see right now, with the terms of the friend's
/// grant: the session ends it by itself at `until_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The friend.
    pub id: UserId,
    /// When the friend's sharing ends, Unix ms, if it ends by itself.
    pub until_ms: Option<i64>,
    /// What the viewer may learn of the friend.
    pub precision: Precision,
}

impl Grant {
    /// Sharing for good, precisely (what a new friendship grants).
    pub fn precise(id: UserId) -> Self {
        Self {
            id,
            until_ms: None,
            precision: Precision::Precise,
        }
    }
}

/// Why a friend disappeared from a user's nearby list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeftReason {
    /// The friend (or the user) moved and they are now farther apart than the radius.
    OutOfRange,
    /// The friend's latest location is older than the location TTL.
    Inactive,
    /// The friend stopped sharing their location with the user.
    Unshared,
    /// The friendship was removed (by either side).
    Unfriended,
}

#[cfg(test)]
mod tests {
    use super::FriendStatus::{self, *};

    #[test]
    fn requests_accept_pending_requests_and_are_idempotent() {
        assert_eq!(FriendStatus::after_request(None), Outgoing);
        assert_eq!(FriendStatus::after_request(Some(Incoming)), Friends);
        assert_eq!(FriendStatus::after_request(Some(Outgoing)), Outgoing);
        assert_eq!(FriendStatus::after_request(Some(Friends)), Friends);
        for s in [Friends, Incoming, Outgoing] {
            assert_eq!(s.mirrored().mirrored(), s);
            assert_eq!(FriendStatus::parse(s.as_str()), Some(s));
        }
    }
}

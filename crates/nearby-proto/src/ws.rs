//! WebSocket frames. Every frame is a JSON object with a `type` field.

use std::borrow::Cow;

use nearby_core::session::{FriendEvent, Nearby};
use nearby_core::{LeftReason, UserId};
use serde::{Deserialize, Serialize};

/// A frame from the client, parsed and ready to act on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClientFrame {
    /// `{"type":"location","lat":..,"lon":..}`. The coordinates are not yet
    /// range-checked: that is the domain's job, and its error is clearer.
    Location {
        /// Latitude, degrees.
        lat: f64,
        /// Longitude, degrees.
        lon: f64,
    },
    /// `{"type":"discoverable","enabled":true,"until":..}`: be shown to
    /// (and shown) strangers nearby, until `until` (Unix ms) or until
    /// turned off; `enabled: false` turns it off at once.
    Discoverable {
        /// On or off.
        enabled: bool,
        /// When it ends by itself (only with `enabled: true`).
        until: Option<i64>,
    },
}

/// Why a client frame could not be understood. Each maps to an `error` frame
/// with [`FrameError::code`]; the connection stays open.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    /// Not JSON, or a field has the wrong JSON type.
    #[error("malformed JSON: {0}")]
    BadJson(String),
    /// Valid JSON with a `type` this server does not know.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A known type lacking a required field.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
}

impl FrameError {
    /// The stable machine-readable code of the `error` frame.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadJson(_) => "bad_json",
            Self::UnknownType(_) => "unknown_type",
            Self::MissingField(_) => "missing_field",
        }
    }
}

#[derive(Deserialize)]
struct RawClientFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    lat: Option<f64>,
    lon: Option<f64>,
    enabled: Option<bool>,
    until: Option<i64>,
}

/// Parses one client text frame. Unknown fields are ignored (so clients can
/// be newer than the server); unknown types are an error.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let raw: RawClientFrame<'_> =
        serde_json::from_str(text).map_err(|e| FrameError::BadJson(e.to_string()))?;
    match raw.kind.as_ref() {
        "location" => Ok(ClientFrame::Location {
            lat: raw.lat.ok_or(FrameError::MissingField("lat"))?,
            lon: raw.lon.ok_or(FrameError::MissingField("lon"))?,
        }),
        "discoverable" => Ok(ClientFrame::Discoverable {
            enabled: raw.enabled.ok_or(FrameError::MissingField("enabled"))?,
            until: raw.until,
        }),
        other => Err(FrameError::UnknownType(other.chars().take(64).collect())),
    }
}

/// One friend in a snapshot, and the body of `friend_location`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NearbyFriend {
    /// The friend's user id.
    pub id: UserId,
    /// Distance from the receiving user, metres (one decimal).
    pub distance_m: f64,
    /// Direction from the receiving user, degrees clockwise from north (one
    /// decimal). Absent in frames of servers that predate it.
    #[serde(default)]
    pub bearing_deg: f64,
    /// When the friend's location was accepted, Unix milliseconds.
    pub updated_at: i64,
    /// The friend shares only an approximate position: `distance_m` is
    /// whole kilometres between the centres of both users' ~3 km cells and
    /// `bearing_deg` a multiple of 45. Absent when precise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approximate: bool,
}

impl From<Nearby> for NearbyFriend {
    fn from(n: Nearby) -> Self {
        Self {
            id: n.id,
            distance_m: crate::round_distance(n.distance_m),
            // One decimal, and 359.96 must not round to 360.
            bearing_deg: Some(crate::round_distance(n.bearing_deg))
                .filter(|b| *b < 360.0)
                .unwrap_or(0.0),
            updated_at: n.updated_at,
            approximate: n.approximate,
        }
    }
}

/// The user's own latest location, as the server holds it: in a snapshot,
/// and the body of `self_location` (a move another of the user's devices
/// reported). Only ever sent to the user it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SelfLocation {
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// When it was accepted, Unix milliseconds.
    pub updated_at: i64,
}

impl From<nearby_core::Location> for SelfLocation {
    fn from(l: nearby_core::Location) -> Self {
        Self {
            lat: l.point.lat(),
            lon: l.point.lon(),
            updated_at: l.ts_ms,
        }
    }
}

/// A stranger nearby, as `stranger_nearby` shows them: everything follows
/// from the two users' geohash-5 cells (~4.9 km), never their positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrangerView {
    /// An alias for this viewer, today (UTC): another viewer sees another
    /// one, and it changes at midnight UTC. Never a user id.
    pub id: String,
    /// `[lo, hi)` km: the band of the distance between the two cells'
    /// centres (0–5, 5–10, 10–20).
    pub bucket_km: [u32; 2],
    /// From the viewer's cell's centre to the stranger's, degrees, a
    /// multiple of 45; absent in the same cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearing_deg: Option<f64>,
}

/// Whether the user is discoverable by strangers nearby: in a snapshot,
/// the body of `discoverable`, and `GET /v1/me/discoverable`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DiscoverableState {
    /// Shown to strangers, and shown them, now.
    pub enabled: bool,
    /// When it ends by itself, Unix ms; null: until turned off (or off).
    pub until: Option<i64>,
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame after the handshake: the friends nearby now, nearest first.
    Snapshot {
        /// Nearby friends.
        friends: Vec<NearbyFriend>,
        /// The user's own latest location, if the server holds one (absent
        /// before the first update, after the TTL, and from older servers).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        self_location: Option<SelfLocation>,
        /// How often the client should report its location now,
        /// milliseconds (WebSocket only; see `interval`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        interval_ms: Option<u32>,
        /// The user's friend list, as `GET /v1/friends` returns it: both
        /// directions of sharing (WebSocket only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        relations: Option<Vec<crate::rest::FriendView>>,
        /// Whether the user is discoverable by strangers (WebSocket only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        discoverable: Option<DiscoverableState>,
    },
    /// The user's discoverability changed (by this or another device, or
    /// its end passed).
    Discoverable(DiscoverableState),
    /// A discoverable stranger is near (in the 9 cells around the user's),
    /// or their bucket or bearing changed.
    StrangerNearby(StrangerView),
    /// A stranger is no longer shown (moved away, stopped being
    /// discoverable, went quiet, or the day's aliases changed).
    StrangerLeft {
        /// The alias they were shown under.
        id: String,
    },
    /// The interval the client should report its location at changed:
    /// fast while a friend who can see the user is active nearby, slow
    /// otherwise.
    Interval {
        /// Milliseconds between two reports.
        interval_ms: u32,
    },
    /// Another of the user's devices reported this position.
    SelfLocation(SelfLocation),
    /// A row of `GET /v1/friends` changed or appeared: a request to or from
    /// this user, an acceptance, or sharing turned on or off either way.
    FriendUpdate(crate::rest::FriendView),
    /// A friendship or request is gone (removed, declined or cancelled, by
    /// either side).
    FriendRemoved {
        /// The other user.
        id: UserId,
    },
    /// A friend is nearby (entered the radius, moved, or the user moved).
    FriendLocation(NearbyFriend),
    /// A friend is no longer nearby.
    FriendLeft {
        /// The friend's user id.
        id: UserId,
        /// Why.
        reason: LeftReason,
    },
    /// Something the client sent was refused, or the server is about to close.
    Error {
        /// Stable machine-readable code.
        code: Cow<'static, str>,
        /// Human-readable detail.
        message: String,
        /// With `going_away`: how long the client should wait before it
        /// reconnects (then backs off as after any close).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reconnect_after_ms: Option<u64>,
    },
}

impl ServerFrame {
    /// An `error` frame.
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self::Error {
            code: Cow::Borrowed(code),
            message: message.into(),
            reconnect_after_ms: None,
        }
    }

    /// The `going_away` error frame of a draining node: reconnect (through
    /// the load balancer, to another node) after `reconnect_after_ms`.
    pub fn going_away(reconnect_after_ms: u64) -> Self {
        Self::Error {
            code: Cow::Borrowed("going_away"),
            message: "this node is shutting down; reconnect".into(),
            reconnect_after_ms: Some(reconnect_after_ms),
        }
    }

    /// Serializes to the JSON text of the frame.
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: no maps with non-string keys,
        // no failing custom serializers. Fall back to a fixed frame anyway.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal","message":"serialization failed"}"#.to_owned()
        })
    }
}

impl From<FriendEvent> for ServerFrame {
    fn from(ev: FriendEvent) -> Self {
        match ev {
            FriendEvent::Location(n) => Self::FriendLocation(n.into()),
            FriendEvent::Left { id, reason } => Self::FriendLeft { id, reason },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_location_and_ignores_extra_fields() {
        assert_eq!(
            parse_client_frame(r#"{"type":"location","lat":1.5,"lon":-2,"accuracy":5}"#),
            Ok(ClientFrame::Location {
                lat: 1.5,
                lon: -2.0
            })
        );
    }

    #[test]
    fn classifies_bad_frames() {
        let code = |t: &str| parse_client_frame(t).unwrap_err().code();
        assert_eq!(code("{not json"), "bad_json");
        assert_eq!(code(r#"{"type":"location","lat":"x","lon":1}"#), "bad_json");
        assert_eq!(code(r#"{"lat":1,"lon":1}"#), "bad_json");
        assert_eq!(code(r#"[1,2]"#), "bad_json");
        assert_eq!(code(r#"{"type":"teleport"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"location","lat":1}"#), "missing_field");
        assert_eq!(code(r#"{"type":"discoverable"}"#), "missing_field");
        assert_eq!(
            code(r#"{"type":"discoverable","enabled":"yes"}"#),
            "bad_json"
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"discoverable","enabled":true,"until":5}"#),
            Ok(ClientFrame::Discoverable {
                enabled: true,
                until: Some(5)
            })
        );
    }

    #[test]
    fn server_frames_match_the_documented_shapes() {
        let f = ServerFrame::FriendLocation(NearbyFriend {
            id: UserId(7),
            distance_m: 12.3,
            bearing_deg: 45.0,
            updated_at: 1000,
            approximate: false,
        });
        assert_eq!(
            f.to_json(),
            r#"{"type":"friend_location","id":"7","distance_m":12.3,"bearing_deg":45.0,"updated_at":1000}"#
        );
        let f = ServerFrame::FriendLeft {
            id: UserId(7),
            reason: LeftReason::OutOfRange,
        };
        assert_eq!(
            f.to_json(),
            r#"{"type":"friend_left","id":"7","reason":"out_of_range"}"#
        );
        let f = ServerFrame::Snapshot {
            friends: vec![],
            self_location: None,
            interval_ms: None,
            relations: None,
            discoverable: None,
        };
        assert_eq!(f.to_json(), r#"{"type":"snapshot","friends":[]}"#);
        let me = SelfLocation {
            lat: 37.5,
            lon: 127.25,
            updated_at: 7,
        };
        let f = ServerFrame::Snapshot {
            friends: vec![],
            self_location: Some(me),
            interval_ms: None,
            relations: None,
            discoverable: None,
        };
        assert_eq!(
            f.to_json(),
            r#"{"type":"snapshot","friends":[],"self_location":{"lat":37.5,"lon":127.25,"updated_at":7}}"#
        );
        assert_eq!(
            ServerFrame::SelfLocation(me).to_json(),
            r#"{"type":"self_location","lat":37.5,"lon":127.25,"updated_at":7}"#
        );
        assert_eq!(
            ServerFrame::Interval {
                interval_ms: 60_000
            }
            .to_json(),
            r#"{"type":"interval","interval_ms":60000}"#
        );
        let stranger = StrangerView {
            id: "s0123456789abcdef".into(),
            bucket_km: [2, 5],
            bearing_deg: Some(45.0),
        };
        assert_eq!(
            ServerFrame::StrangerNearby(stranger).to_json(),
            r#"{"type":"stranger_nearby","id":"s0123456789abcdef","bucket_km":[2,5],"bearing_deg":45.0}"#
        );
        assert_eq!(
            ServerFrame::StrangerLeft {
                id: "s0123456789abcdef".into()
            }
            .to_json(),
            r#"{"type":"stranger_left","id":"s0123456789abcdef"}"#
        );
        assert_eq!(
            ServerFrame::Discoverable(DiscoverableState {
                enabled: true,
                until: None
            })
            .to_json(),
            r#"{"type":"discoverable","enabled":true,"until":null}"#
        );
        let row = ServerFrame::FriendUpdate(crate::rest::FriendView {
            id: UserId(3),
            username: Some("bob".into()),
            status: nearby_core::FriendStatus::Incoming,
            sharing: true,
            sharing_until: Some(9),
            sharing_precision: nearby_core::Precision::Approximate,
            shares_with_you: false,
            shares_with_you_until: None,
            shares_with_you_precision: nearby_core::Precision::Precise,
        });
        assert_eq!(
            row.to_json(),
            r#"{"type":"friend_update","id":"3","username":"bob","status":"incoming","sharing":true,"sharing_until":9,"sharing_precision":"approximate","shares_with_you":false}"#
        );
        assert_eq!(
            serde_json::from_str::<ServerFrame>(&row.to_json()).ok(),
            Some(row)
        );
        assert_eq!(
            ServerFrame::FriendRemoved { id: UserId(3) }.to_json(),
            r#"{"type":"friend_removed","id":"3"}"#
        );
        let f = ServerFrame::error("bad_json", "x");
        assert_eq!(
            f.to_json(),
            r#"{"type":"error","code":"bad_json","message":"x"}"#
        );
        let back: ServerFrame = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(back, f);
    }

    proptest! {
        #[test]
        fn parser_never_panics(s in ".{0,200}") {
            let _ = parse_client_frame(&s);
        }

        #[test]
        fn location_round_trips(lat in -90_000_000i64..=90_000_000, lon in -180_000_000i64..=180_000_000) {
            // Phones send about six decimals; JSON text of those parses back
            // to within an ulp (serde_json's fast float path).
            let (lat, lon) = (lat as f64 / 1e6, lon as f64 / 1e6);
            let text = format!(r#"{{"type":"location","lat":{lat},"lon":{lon}}}"#);
            match parse_client_frame(&text) {
                Ok(ClientFrame::Location { lat: a, lon: b }) => {
                    prop_assert!((a - lat).abs() <= 1e-12 && (b - lon).abs() <= 1e-12, "{} {} vs {} {}", a, b, lat, lon);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}

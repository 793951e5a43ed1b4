//! Bytes on Redis: cache values, bus payloads and channel names.
//!
//! Payloads are fixed little-endian layouts, not JSON: a location message is
//! 33 bytes and decodes without allocating. Every decoder checks lengths and
//! coordinate ranges and returns `None` on anything else, so a stray message
//! on a channel cannot panic a node.

use nearby_core::{LeftReason, Location, UserId};
use nearby_ports::{BusMessage, Channel};

const LOCATION: u8 = 1;
const VISIBLE: u8 = 2;
const HIDDEN: u8 = 3;
const REVOKED: u8 = 4;
const PRESENCE: u8 = 5;
const QUIET: u8 = 6;
const CHANGED: u8 = 7;
const STRANGER: u8 = 8;
/// A `Stranger` notice's cell when they left discovery (ids are 25 bits).
const NO_CELL: u32 = u32::MAX;

/// Size of an encoded [`Location`].
pub const LOCATION_LEN: usize = 24;

/// `lat`, `lon` (f64) and `ts_ms` (i64), little-endian.
pub fn encode_location(loc: &Location) -> [u8; LOCATION_LEN] {
    let mut out = [0u8; LOCATION_LEN];
    out[..8].copy_from_slice(&loc.point.lat().to_le_bytes());
    out[8..16].copy_from_slice(&loc.point.lon().to_le_bytes());
    out[16..].copy_from_slice(&loc.ts_ms.to_le_bytes());
    out
}

fn word(b: &[u8], at: usize) -> Option<[u8; 8]> {
    b.get(at..at + 8)?.try_into().ok()
}

/// The inverse of [`encode_location`]; `None` unless exactly a valid one.
pub fn decode_location(b: &[u8]) -> Option<Location> {
    if b.len() != LOCATION_LEN {
        return None;
    }
    let lat = f64::from_le_bytes(word(b, 0)?);
    let lon = f64::from_le_bytes(word(b, 8)?);
    let ts_ms = i64::from_le_bytes(word(b, 16)?);
    Location::new(lat, lon, ts_ms).ok()
}

fn reason_code(r: LeftReason) -> u8 {
    match r {
        LeftReason::OutOfRange => 0,
        LeftReason::Inactive => 1,
        LeftReason::Unshared => 2,
        LeftReason::Unfriended => 3,
    }
}

fn reason_from(code: u8) -> Option<LeftReason> {
    Some(match code {
        0 => LeftReason::OutOfRange,
        1 => LeftReason::Inactive,
        2 => LeftReason::Unshared,
        3 => LeftReason::Unfriended,
        _ => return None,
    })
}

/// A tag byte, then the fields.
pub fn encode_message(msg: &BusMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 8 + LOCATION_LEN);
    match *msg {
        BusMessage::Location { user, loc } => {
            out.push(LOCATION);
            out.extend_from_slice(&user.0.to_le_bytes());
            out.extend_from_slice(&encode_location(&loc));
        }
        BusMessage::FriendVisible { friend } => {
            out.push(VISIBLE);
            out.extend_from_slice(&friend.0.to_le_bytes());
        }
        BusMessage::FriendHidden { friend, reason } => {
            out.push(HIDDEN);
            out.extend_from_slice(&friend.0.to_le_bytes());
            out.push(reason_code(reason));
        }
        BusMessage::TokenRevoked { tag } => {
            out.push(REVOKED);
            out.extend_from_slice(&tag.to_le_bytes());
        }
        BusMessage::PresenceCheck => out.push(PRESENCE),
        BusMessage::FriendsChanged { friend } => {
            out.push(CHANGED);
            out.extend_from_slice(&friend.0.to_le_bytes());
        }
        BusMessage::FriendQuiet { friend } => {
            out.push(QUIET);
            out.extend_from_slice(&friend.0.to_le_bytes());
        }
        BusMessage::Stranger { user, cell, stamp } => {
            out.push(STRANGER);
            out.extend_from_slice(&user.0.to_le_bytes());
            out.extend_from_slice(&stamp.to_le_bytes());
            out.extend_from_slice(&cell.unwrap_or(NO_CELL).to_le_bytes());
        }
    }
    out
}

/// The inverse of [`encode_message`]; `None` for anything malformed.
pub fn decode_message(b: &[u8]) -> Option<BusMessage> {
    let (&tag, rest) = b.split_first()?;
    let id = || word(rest, 0).map(|w| UserId(i64::from_le_bytes(w)));
    match (tag, rest.len()) {
        (LOCATION, 32) => Some(BusMessage::Location {
            user: id()?,
            loc: decode_location(rest.get(8..)?)?,
        }),
        (VISIBLE, 8) => Some(BusMessage::FriendVisible { friend: id()? }),
        (HIDDEN, 9) => Some(BusMessage::FriendHidden {
            friend: id()?,
            reason: reason_from(*rest.get(8)?)?,
        }),
        (REVOKED, 8) => Some(BusMessage::TokenRevoked {
            tag: u64::from_le_bytes(word(rest, 0)?),
        }),
        (PRESENCE, 0) => Some(BusMessage::PresenceCheck),
        (QUIET, 8) => Some(BusMessage::FriendQuiet { friend: id()? }),
        (CHANGED, 8) => Some(BusMessage::FriendsChanged { friend: id()? }),
        (STRANGER, 20) => {
            let cell = u32::from_le_bytes(rest.get(16..20)?.try_into().ok()?);
            Some(BusMessage::Stranger {
                user: id()?,
                stamp: i64::from_le_bytes(word(rest, 8)?),
                cell: (cell != NO_CELL).then_some(cell),
            })
        }
        _ => None,
    }
}

/// `{prefix}loc:42` / `{prefix}inbox:42` / `{prefix}cell:1234567`.
pub fn channel_name(prefix: &str, ch: Channel) -> String {
    format!("{prefix}{}", ch.name())
}

/// The inverse of [`channel_name`].
pub fn parse_channel(prefix: &str, name: &str) -> Option<Channel> {
    let rest = name.strip_prefix(prefix)?;
    if let Some(id) = rest.strip_prefix("loc:") {
        return id.parse().ok().map(|u| Channel::Location(UserId(u)));
    }
    if let Some(id) = rest.strip_prefix("cell:") {
        return id.parse().ok().map(Channel::Cell);
    }
    let id = rest.strip_prefix("inbox:")?;
    id.parse().ok().map(|u| Channel::Inbox(UserId(u)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_core::Point;
    use proptest::prelude::*;

    fn location() -> impl Strategy<Value = Location> {
        (-90.0..=90.0f64, -180.0..=180.0f64, any::<i64>()).prop_map(|(lat, lon, ts_ms)| Location {
            point: Point::new(lat, lon).expect("in range"),
            ts_ms,
        })
    }

    fn message() -> impl Strategy<Value = BusMessage> {
        let id = any::<i64>().prop_map(UserId);
        let reason = prop_oneof![
            Just(LeftReason::OutOfRange),
            Just(LeftReason::Inactive),
            Just(LeftReason::Unshared),
            Just(LeftReason::Unfriended),
        ];
        prop_oneof![
            (id.clone(), location()).prop_map(|(user, loc)| BusMessage::Location { user, loc }),
            id.clone()
                .prop_map(|friend| BusMessage::FriendVisible { friend }),
            (id, reason).prop_map(|(friend, reason)| BusMessage::FriendHidden { friend, reason }),
            any::<u64>().prop_map(|tag| BusMessage::TokenRevoked { tag }),
            Just(BusMessage::PresenceCheck),
            any::<i64>().prop_map(|f| BusMessage::FriendQuiet { friend: UserId(f) }),
            any::<i64>().prop_map(|f| BusMessage::FriendsChanged { friend: UserId(f) }),
            (
                any::<i64>(),
                proptest::option::of(0u32..1 << 25),
                any::<i64>()
            )
                .prop_map(|(u, cell, stamp)| BusMessage::Stranger {
                    user: UserId(u),
                    cell,
                    stamp
                }),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip(msg in message()) {
            prop_assert_eq!(decode_message(&encode_message(&msg)), Some(msg));
        }

        #[test]
        fn locations_round_trip(loc in location()) {
            prop_assert_eq!(decode_location(&encode_location(&loc)), Some(loc));
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_message(&bytes);
            let _ = decode_location(&bytes);
        }

        #[test]
        fn truncated_or_extended_messages_are_refused(msg in message(), cut in 1usize..8) {
            let bytes = encode_message(&msg);
            prop_assert_eq!(decode_message(&bytes[..bytes.len() - cut.min(bytes.len())]), None);
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert_eq!(decode_message(&longer), None);
        }

        #[test]
        fn channel_names_round_trip(id in any::<i64>(), kind in 0u8..3) {
            let ch = match kind {
                0 => Channel::Inbox(UserId(id)),
                1 => Channel::Location(UserId(id)),
                _ => Channel::Cell(id as u32 & ((1 << 25) - 1)),
            };
            prop_assert_eq!(parse_channel("p:", &channel_name("p:", ch)), Some(ch));
            prop_assert_eq!(parse_channel("q:", &channel_name("p:", ch)), None);
        }
    }

    #[test]
    fn out_of_range_coordinates_are_refused() {
        let mut b = encode_location(&Location {
            point: Point::new(1.0, 2.0).expect("point"),
            ts_ms: 3,
        });
        b[..8].copy_from_slice(&91.0f64.to_le_bytes());
        assert_eq!(decode_location(&b), None);
        b[..8].copy_from_slice(&f64::NAN.to_le_bytes());
        assert_eq!(decode_location(&b), None);
    }
}

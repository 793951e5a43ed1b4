//! How the command line shows things to people: one line per frame, friend
//! lists as a table. Pure functions, so the wording is tested here.

use std::collections::HashMap;

use nearby_core::{FriendStatus, LeftReason, Precision, UserId};
use nearby_proto::rest::FriendView;
use nearby_proto::ws::ServerFrame;

/// Usernames by id, for frames (which carry ids only).
#[derive(Debug, Default)]
pub(crate) struct Names {
    by_id: HashMap<UserId, String>,
}

impl Names {
    pub(crate) fn from_friends(friends: &[FriendView]) -> Self {
        Self {
            by_id: friends.iter().map(|f| (f.id, f.display_name())).collect(),
        }
    }

    pub(crate) fn knows(&self, id: UserId) -> bool {
        self.by_id.contains_key(&id)
    }

    fn name(&self, id: UserId) -> String {
        self.by_id
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("user {id}"))
    }
}

/// The user ids a frame mentions.
pub(crate) fn ids(frame: &ServerFrame) -> Vec<UserId> {
    match frame {
        ServerFrame::Snapshot { friends, .. } => friends.iter().map(|f| f.id).collect(),
        ServerFrame::FriendLocation(f) => vec![f.id],
        ServerFrame::FriendLeft { id, .. } => vec![*id],
        ServerFrame::SelfLocation(_)
        | ServerFrame::FriendUpdate(_)
        | ServerFrame::FriendRemoved { .. }
        | ServerFrame::Interval { .. }
        | ServerFrame::Discoverable(_)
        | ServerFrame::StrangerNearby(_)
        | ServerFrame::StrangerLeft { .. }
        | ServerFrame::Error { .. } => vec![],
    }
}

/// One line for one frame. `now_ms` is the local clock, to say how old a
/// location is when it is not fresh.
pub(crate) fn frame_line(frame: &ServerFrame, names: &Names, now_ms: i64) -> String {
    match frame {
        ServerFrame::Snapshot { friends, .. } if friends.is_empty() => {
            "nearby now: nobody".to_owned()
        }
        ServerFrame::Snapshot { friends, .. } => {
            let list: Vec<String> = friends
                .iter()
                .map(|f| {
                    format!(
                        "{} {}{}",
                        names.name(f.id),
                        distance(f),
                        age(f.updated_at, now_ms)
                    )
                })
                .collect();
            format!("nearby now: {}", list.join(", "))
        }
        ServerFrame::FriendLocation(f) => format!(
            "{} is {} away{}",
            names.name(f.id),
            distance(f),
            age(f.updated_at, now_ms)
        ),
        ServerFrame::FriendLeft { id, reason } => {
            let why = match reason {
                LeftReason::OutOfRange => "out of range",
                LeftReason::Inactive => "inactive (no recent location)",
                LeftReason::Unshared => "stopped sharing with you",
                LeftReason::Unfriended => "no longer friends",
            };
            format!("{} left: {why}", names.name(*id))
        }
        ServerFrame::SelfLocation(me) => format!(
            "you are at {:.5}, {:.5}, as another of your devices reported{}",
            me.lat,
            me.lon,
            age(me.updated_at, now_ms)
        ),
        ServerFrame::FriendUpdate(f) => {
            let name = f.display_name();
            match f.status {
                FriendStatus::Friends => {
                    format!("{name}: friends; {}", sharing_both_ways(f, now_ms))
                }
                FriendStatus::Incoming => {
                    format!("{name} asked to be your friend (`friends accept {name}`)")
                }
                FriendStatus::Outgoing => format!("you asked {name} to be your friend"),
            }
        }
        ServerFrame::FriendRemoved { id } => {
            format!("{} is no longer a friend or request", names.name(*id))
        }
        ServerFrame::Interval { interval_ms } => format!(
            "the server suggests reporting every {}",
            span_words(*interval_ms)
        ),
        ServerFrame::Discoverable(d) => match (d.enabled, d.until) {
            (false, _) => "you are not discoverable by strangers".to_owned(),
            (true, None) => "you are discoverable by strangers nearby".to_owned(),
            (true, Some(until)) => format!(
                "you are discoverable by strangers nearby for {} more",
                remaining(until, now_ms)
            ),
        },
        ServerFrame::StrangerNearby(s) => {
            let way = s.bearing_deg.map_or(String::from(", in your cell"), |b| {
                format!(" to the {}", compass(b))
            });
            format!(
                "stranger {} is {}–{} km away{way}",
                s.id, s.bucket_km[0], s.bucket_km[1]
            )
        }
        ServerFrame::StrangerLeft { id } => format!("stranger {id} is no longer nearby"),
        ServerFrame::Error { code, message, .. } => format!("server error {code}: {message}"),
    }
}

/// The eight winds of a bearing that is a multiple of 45.
fn compass(bearing_deg: f64) -> &'static str {
    const WINDS: [&str; 8] = [
        "north",
        "north-east",
        "east",
        "south-east",
        "south",
        "south-west",
        "west",
        "north-west",
    ];
    WINDS[((bearing_deg / 45.0).round() as usize) % 8]
}

/// "5 s", "1 min", "1.5 s".
fn span_words(ms: u32) -> String {
    match ms {
        ms if ms % 60_000 == 0 => format!("{} min", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{} s", ms / 1000),
        ms => format!("{:.1} s", f64::from(ms) / 1000.0),
    }
}

/// Distances as the page shows them: "72 m", "5.56 km", "12.3 km".
pub(crate) fn metres(m: f64) -> String {
    match m {
        m if m < 1000.0 => format!("{m:.0} m"),
        m if m < 10_000.0 => format!("{:.2} km", m / 1000.0),
        m => format!("{:.1} km", m / 1000.0),
    }
}

/// "12.3 m", or "about 3 km" for a friend who shares approximately.
fn distance(f: &nearby_proto::ws::NearbyFriend) -> String {
    match (f.approximate, f.distance_m) {
        (false, m) => metres(m),
        (true, m) if m < 1000.0 => "within about 3 km".into(),
        (true, m) => format!("about {:.0} km", m / 1000.0),
    }
}

/// "you share: yes, approximately, for 25 min more, they share with you: no".
fn sharing_both_ways(f: &FriendView, now_ms: i64) -> String {
    format!(
        "you share: {}, they share with you: {}",
        share_text(f.sharing, f.sharing_until, f.sharing_precision, now_ms),
        share_text(
            f.shares_with_you,
            f.shares_with_you_until,
            f.shares_with_you_precision,
            now_ms
        )
    )
}

/// "no", "yes", "yes, approximately", "yes, for 2 h more", …
fn share_text(on: bool, until: Option<i64>, precision: Precision, now_ms: i64) -> String {
    if !on {
        return "no".into();
    }
    let mut s = String::from("yes");
    if precision == Precision::Approximate {
        s.push_str(", approximately");
    }
    if let Some(u) = until {
        s.push_str(&format!(", for {} more", remaining(u, now_ms)));
    }
    s
}

/// "42 s", "25 min", "3 h": the time left until `until`.
fn remaining(until: i64, now_ms: i64) -> String {
    let secs = until.saturating_sub(now_ms).max(0) / 1000;
    match secs {
        ..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        _ => format!("{} h", secs / 3600),
    }
}

/// " (seen 42 s ago)" for a location older than a few seconds, else "".
fn age(updated_at: i64, now_ms: i64) -> String {
    let secs = now_ms.saturating_sub(updated_at) / 1000;
    match secs {
        ..=4 => String::new(),
        5..=119 => format!(" (seen {secs} s ago)"),
        120..=7199 => format!(" (seen {} min ago)", secs / 60),
        _ => format!(" (seen {} h ago)", secs / 3600),
    }
}

/// The friend list as aligned rows: name, relation, sharing both ways.
pub(crate) fn friends_table(friends: &[FriendView], now_ms: i64) -> Vec<String> {
    if friends.is_empty() {
        return vec!["no friends yet: add one with `nearby client friends add NAME`".to_owned()];
    }
    let width = friends
        .iter()
        .map(|f| f.display_name().len())
        .max()
        .unwrap_or(0);
    friends
        .iter()
        .map(|f| {
            let (status, sharing) = match f.status {
                FriendStatus::Friends => ("friends", sharing_both_ways(f, now_ms)),
                FriendStatus::Incoming => ("incoming", "asked you: `friends accept` them".into()),
                FriendStatus::Outgoing => ("outgoing", "you asked; waiting for them".into()),
            };
            format!("{:<width$}  {status:<8}  {sharing}", f.display_name())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_proto::ws::NearbyFriend;

    /// A row of `name`, sharing precisely for good where on.
    fn view(name: &str, status: FriendStatus, sharing: bool, shares_with_you: bool) -> FriendView {
        FriendView {
            id: UserId(2),
            username: Some(name.into()),
            status,
            sharing,
            sharing_until: None,
            sharing_precision: Precision::Precise,
            shares_with_you,
            shares_with_you_until: None,
            shares_with_you_precision: Precision::Precise,
        }
    }

    fn names() -> Names {
        Names::from_friends(&[view("bob", FriendStatus::Friends, true, true)])
    }

    #[test]
    fn frames_read_as_sentences() {
        let now = 1_700_000_000_000;
        let near = |id, d, t| NearbyFriend {
            id: UserId(id),
            distance_m: d,
            bearing_deg: 0.0,
            updated_at: t,
            approximate: false,
        };
        let n = names();
        let line = |f: ServerFrame| frame_line(&f, &n, now);
        assert_eq!(
            line(ServerFrame::Snapshot {
                friends: vec![],
                self_location: None,
                interval_ms: None,
                relations: None,
                discoverable: None,
            }),
            "nearby now: nobody"
        );
        assert_eq!(
            line(ServerFrame::Snapshot {
                friends: vec![near(2, 999.64, now), near(9, 12.0, now - 90_000)],
                self_location: None,
                interval_ms: None,
                relations: None,
                discoverable: None,
            }),
            "nearby now: bob 1000 m, user 9 12 m (seen 90 s ago)"
        );
        assert_eq!(
            line(ServerFrame::StrangerNearby(
                nearby_proto::ws::StrangerView {
                    id: "s1".into(),
                    bucket_km: [5, 10],
                    bearing_deg: Some(135.0),
                }
            )),
            "stranger s1 is 5–10 km away to the south-east"
        );
        assert_eq!(
            line(ServerFrame::StrangerNearby(
                nearby_proto::ws::StrangerView {
                    id: "s1".into(),
                    bucket_km: [0, 5],
                    bearing_deg: None,
                }
            )),
            "stranger s1 is 0–5 km away, in your cell"
        );
        assert_eq!(
            line(ServerFrame::FriendLocation(near(2, 1000.0, now - 1000))),
            "bob is 1.00 km away"
        );
        assert_eq!(
            line(ServerFrame::FriendLocation(near(2, 5.0, now - 600_000))),
            "bob is 5 m away (seen 10 min ago)"
        );
        let approx = NearbyFriend {
            approximate: true,
            ..near(2, 4000.0, now)
        };
        assert_eq!(
            line(ServerFrame::FriendLocation(approx)),
            "bob is about 4 km away"
        );
        assert_eq!(
            line(ServerFrame::FriendLeft {
                id: UserId(2),
                reason: LeftReason::Unshared
            }),
            "bob left: stopped sharing with you"
        );
        assert_eq!(
            line(ServerFrame::SelfLocation(nearby_proto::ws::SelfLocation {
                lat: 37.566_53,
                lon: 126.978_04,
                updated_at: now - 30_000
            })),
            "you are at 37.56653, 126.97804, as another of your devices reported (seen 30 s ago)"
        );
        let row = |status, sharing, shares_with_you| {
            ServerFrame::FriendUpdate(view("bob", status, sharing, shares_with_you))
        };
        assert_eq!(
            line(row(FriendStatus::Incoming, true, false)),
            "bob asked to be your friend (`friends accept bob`)"
        );
        assert_eq!(
            line(row(FriendStatus::Friends, true, false)),
            "bob: friends; you share: yes, they share with you: no"
        );
        let timed = FriendView {
            sharing_until: Some(now + 25 * 60_000),
            sharing_precision: Precision::Approximate,
            ..view("bob", FriendStatus::Friends, true, true)
        };
        assert_eq!(
            line(ServerFrame::FriendUpdate(timed)),
            "bob: friends; you share: yes, approximately, for 25 min more, they share with you: yes"
        );
        assert_eq!(
            line(ServerFrame::FriendRemoved { id: UserId(2) }),
            "bob is no longer a friend or request"
        );
        assert_eq!(
            line(ServerFrame::error("rate_limited", "slow down")),
            "server error rate_limited: slow down"
        );
    }

    #[test]
    fn the_friend_table_is_aligned() {
        let rows = friends_table(
            &[
                view("bob", FriendStatus::Friends, false, true),
                view("carolyn", FriendStatus::Incoming, true, true),
            ],
            0,
        );
        assert_eq!(
            rows,
            [
                "bob      friends   you share: no, they share with you: yes",
                "carolyn  incoming  asked you: `friends accept` them"
            ]
        );
        assert!(friends_table(&[], 0)[0].starts_with("no friends yet"));
    }
}

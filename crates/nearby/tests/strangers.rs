//! Strangers nearby, against the real binary over real WebSockets, on the
//! embedded setup and on two nodes over Redis and PostgreSQL: who sees
//! whom (opt-in both ways, friends like anyone else, opting out), moving
//! across a cell border (the subscriptions on the bus, no stranger dropped
//! or doubled, no flapping along the border), per-viewer aliases, an
//! attacker who walks around a victim to trilaterate her, and the per-
//! session cap under a burst in one hot cell.
mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use common::{Server, TwoNodes, User, Ws};
use nearby_geo::{GeoCell, Point};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const SEOUL: (f64, f64) = (37.5665, 126.978);

/// Heartbeats every 200 ms: a stranger shows within that of listening.
const HEARTBEAT_MS: u64 = 200;

const FLAGS: [&str; 10] = [
    "--stranger-heartbeat-ms",
    "200",
    "--updates-per-sec",
    "1000",
    "--update-burst",
    "1000",
    "--user-updates-per-sec",
    "1000",
    "--user-update-burst",
    "1000",
];

/// Cell size in degrees (geohash length 5: 12 bits of latitude, 13 of
/// longitude).
const CELL_H: f64 = 180.0 / 4096.0;
const CELL_W: f64 = 360.0 / 8192.0;

/// The centre of the cell `rows` north and `cols` east of the one holding
/// `p`.
fn cell_centre(p: (f64, f64), rows: i32, cols: i32) -> (f64, f64) {
    let c = GeoCell::of(Point::new(p.0, p.1).expect("valid")).centre();
    (
        c.lat() + f64::from(rows) * CELL_H,
        c.lon() + f64::from(cols) * CELL_W,
    )
}

fn cell_id(p: (f64, f64)) -> u32 {
    GeoCell::of(Point::new(p.0, p.1).expect("valid")).id()
}

/// A client's view of its strangers, rebuilt from the frames it gets.
struct Eye {
    ws: Ws,
    /// Alias → the last `stranger_nearby` for it.
    shown: BTreeMap<String, Value>,
    /// The most shown at once.
    max_shown: usize,
    /// Every stranger frame, in order.
    log: Vec<Value>,
    /// The last `discoverable` state (from the snapshot on).
    discoverable: Value,
}

impl Eye {
    async fn connect(user: &User, server: &Server) -> Self {
        let (ws, snap) = user.connect(server).await;
        Self {
            ws,
            shown: BTreeMap::new(),
            max_shown: 0,
            log: Vec::new(),
            discoverable: snap["discoverable"].clone(),
        }
    }

    fn apply(&mut self, f: Value) {
        match f["type"].as_str() {
            Some("stranger_nearby") => {
                let id = f["id"].as_str().expect("alias").to_owned();
                self.shown.insert(id, f.clone());
                self.max_shown = self.max_shown.max(self.shown.len());
                self.log.push(f);
            }
            Some("stranger_left") => {
                let id = f["id"].as_str().expect("alias");
                assert!(
                    self.shown.remove(id).is_some(),
                    "stranger_left for {id}, never shown: {f}"
                );
                self.log.push(f);
            }
            Some("discoverable") => self.discoverable = f,
            Some("error") => panic!("unexpected error frame {f}"),
            _ => {}
        }
    }

    /// Reads frames for `d`.
    async fn pump(&mut self, d: Duration) {
        let end = tokio::time::Instant::now() + d;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            match self.ws.next_message(left).await {
                Some(Message::Text(t)) => {
                    self.apply(serde_json::from_str(t.as_str()).expect("json"))
                }
                Some(_) => {}
                None => return,
            }
        }
    }

    /// Reads frames until `done` holds; panics after 5 s.
    async fn until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done(self) {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "{what}: not within 5 s; shown {:?}",
                self.shown
            );
            if let Some(Message::Text(t)) = self.ws.next_message(left).await {
                self.apply(serde_json::from_str(t.as_str()).expect("json"));
            }
        }
    }

    async fn at(&mut self, p: (f64, f64)) {
        self.ws.send_location(p.0, p.1).await;
    }

    async fn opt(&mut self, enabled: bool) {
        self.ws
            .send_text(json!({ "type": "discoverable", "enabled": enabled }).to_string())
            .await;
    }

    /// The alias shown with `bearing` (`None`: in the same cell).
    fn alias_at(&self, bearing: Option<f64>) -> Option<String> {
        self.shown
            .iter()
            .find(|(_, f)| f["bearing_deg"].as_f64() == bearing)
            .map(|(id, _)| id.clone())
    }
}

async fn rest_opt(server: &Server, user: &User, enabled: bool) -> (StatusCode, Value) {
    let method = if enabled { Method::PUT } else { Method::DELETE };
    common::call(
        &reqwest::Client::new(),
        method,
        &format!("{}/v1/me/discoverable", server.base),
        Some(&user.token),
        enabled.then(|| json!({})),
    )
    .await
}

#[tokio::test]
async fn strangers_see_each_other_only_by_consent() {
    let server = Server::start(&FLAGS);
    visibility(&server, &server).await;
}

#[tokio::test]
async fn strangers_see_each_other_only_by_consent_across_nodes() {
    let Some(nodes) = TwoNodes::start_with(&FLAGS).await else {
        return;
    };
    visibility(&nodes.a, &nodes.b).await;
}

/// Alice and Carol (on `one`) stand in one cell; Bob in the cell north of
/// it, Dave north-east, Erin (Alice's friend) in Alice's cell (on `two`).
/// All but Carol opt in.
async fn visibility(one: &Server, two: &Server) {
    let home = cell_centre(SEOUL, 0, 0);
    let (alice, carol) = (one.user("alice").await, one.user("carol").await);
    let (bob, dave, erin) = (
        two.user("bob").await,
        two.user("dave").await,
        two.user("erin").await,
    );
    alice.befriend(&erin).await;
    erin.befriend(&alice).await;
    let ids: HashSet<String> = [&alice, &bob, &carol, &dave, &erin]
        .iter()
        .map(|u| u.id.clone())
        .collect();

    let mut a = Eye::connect(&alice, one).await;
    let mut c = Eye::connect(&carol, one).await;
    let mut b = Eye::connect(&bob, two).await;
    let mut d = Eye::connect(&dave, two).await;
    let mut e = Eye::connect(&erin, two).await;
    for eye in [&a, &b, &c, &d, &e] {
        let off = json!({ "enabled": false, "until": null });
        assert_eq!(eye.discoverable, off, "off by default");
    }
    // Bad opt-ins are refused, clearly, and change nothing.
    c.ws.send_text(r#"{"type":"discoverable","enabled":true,"until":1}"#)
        .await;
    c.ws.expect_error("bad_until").await;
    c.ws.send_text(r#"{"type":"discoverable"}"#).await;
    c.ws.expect_error("missing_field").await;
    let (st, body) = common::call(
        &reqwest::Client::new(),
        Method::PUT,
        &format!("{}/v1/me/discoverable", one.base),
        Some(&carol.token),
        Some(json!({ "untill": 1 })),
    )
    .await;
    assert_eq!(
        (st, &body["code"]),
        (StatusCode::BAD_REQUEST, &json!("bad_json")),
        "{body}"
    );
    let (st, body) = common::call(
        &reqwest::Client::new(),
        Method::PUT,
        &format!("{}/v1/me/discoverable", one.base),
        None,
        Some(json!({})),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
    a.at(home).await;
    c.at((home.0 + 0.001, home.1)).await;
    b.at(cell_centre(SEOUL, 1, 0)).await;
    d.at(cell_centre(SEOUL, 1, 1)).await;
    e.at((home.0 - 0.001, home.1)).await;
    // By the frame (Alice, Dave) and by REST (Bob, Erin).
    a.opt(true).await;
    d.opt(true).await;
    let (st, body) = rest_opt(two, &bob, true).await;
    assert_eq!(
        (st, body),
        (StatusCode::OK, json!({ "enabled": true, "until": null }))
    );
    let (st, _) = rest_opt(two, &erin, true).await;
    assert_eq!(st, StatusCode::OK);
    let (st, body) = common::call(
        &reqwest::Client::new(),
        Method::GET,
        &format!("{}/v1/me/discoverable", one.base),
        Some(&carol.token),
        None,
    )
    .await;
    assert_eq!(
        (st, body),
        (StatusCode::OK, json!({ "enabled": false, "until": null }))
    );

    // Alice: Bob (north), Dave (north-east) and Erin, her friend, under an
    // alias like anyone (relations never change who is shown); never
    // Carol, who did not opt in.
    a.until("alice sees bob, dave, erin", |a| a.shown.len() == 3)
        .await;
    b.until("bob sees alice, dave, erin", |b| b.shown.len() == 3)
        .await;
    d.until("dave sees alice, bob, erin", |d| d.shown.len() == 3)
        .await;
    e.until("erin sees alice, bob, dave", |e| e.shown.len() == 3)
        .await;
    for eye in [&mut a, &mut b, &mut c, &mut d, &mut e] {
        eye.pump(Duration::from_millis(4 * HEARTBEAT_MS)).await;
    }
    assert_eq!(a.discoverable["enabled"], true, "{}", a.discoverable);
    assert_eq!(a.shown.len(), 3, "{:?}", a.shown);
    assert_eq!(e.shown.len(), 3, "a friend like anyone: {:?}", e.shown);
    assert!(c.log.is_empty(), "carol sees nobody: {:?}", c.log);
    for (eye, n) in [(&a, 3), (&b, 3), (&d, 3), (&e, 3)] {
        assert_eq!(
            eye.shown.len(),
            n,
            "carol is seen by nobody: {:?}",
            eye.shown
        );
    }
    // What Alice is shown of Bob: the band and bearing between the cells.
    let bob_for_alice = a.alias_at(Some(0.0)).expect("bob, north");
    let dave_for_alice = a.alias_at(Some(45.0)).expect("dave, north-east");
    assert_eq!(a.shown[&bob_for_alice]["bucket_km"], json!([0, 5]));
    assert_eq!(a.shown[&dave_for_alice]["bucket_km"], json!([5, 10]));
    // Aliases: per viewer, never a user id.
    let bob_for_dave = d.alias_at(Some(270.0)).expect("bob, west of dave");
    assert_ne!(bob_for_alice, bob_for_dave, "per viewer");
    for eye in [&a, &b, &d, &e] {
        for alias in eye.shown.keys() {
            assert!(!ids.contains(alias), "{alias} is a user id");
            assert!(alias.parse::<i64>().is_err(), "{alias}");
        }
    }
    let every: BTreeSet<&String> = [&a, &b, &d, &e]
        .iter()
        .flat_map(|eye| eye.shown.keys())
        .collect();
    assert_eq!(
        every.len(),
        3 + 3 + 3 + 3,
        "no alias is shared by two views"
    );

    // Alice's second device, on the other node: the same aliases (the
    // nodes share the key), for the same day.
    let mut a2 = Eye::connect(&alice, two).await;
    assert_eq!(a2.discoverable["enabled"], true);
    a2.at(home).await;
    a2.until("alice's second device", |a| a.shown.len() == 3)
        .await;
    assert_eq!(a2.alias_at(Some(0.0)), Some(bob_for_alice.clone()));
    drop(a2);

    // Bob opts out by REST: gone from Alice and Dave at once (well within
    // one heartbeat of the bus: the notice, not the quiet timeout).
    let started = std::time::Instant::now();
    let (st, _) = rest_opt(two, &bob, false).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    a.until("bob leaves alice", |a| {
        !a.shown.contains_key(&bob_for_alice)
    })
    .await;
    d.until("bob leaves dave", |d| !d.shown.contains_key(&bob_for_dave))
        .await;
    println!("opt-out reached both viewers in {:?}", started.elapsed());
    b.until("bob sees nobody", |b| b.shown.is_empty()).await;
    // Dave opts out by the frame: he and Alice part both ways.
    d.opt(false).await;
    a.until("dave leaves alice (erin stays)", |a| {
        a.shown.len() == 1 && !a.shown.contains_key(&dave_for_alice)
    })
    .await;
    d.until("dave sees nobody", |d| {
        d.shown.is_empty() && d.discoverable["enabled"] == false
    })
    .await;
    // And stays gone through heartbeats.
    a.pump(Duration::from_millis(4 * HEARTBEAT_MS)).await;
    assert_eq!(a.shown.len(), 1, "{:?}", a.shown);
}

#[tokio::test]
async fn walking_across_a_border_moves_the_cells() {
    let server = Server::start(&FLAGS);
    border(&server, &server, None).await;
}

#[tokio::test]
async fn walking_across_a_border_moves_the_cells_across_nodes() {
    let Some(nodes) = TwoNodes::start_with(&FLAGS).await else {
        return;
    };
    border(&nodes.a, &nodes.b, Some(&nodes.redis)).await;
}

/// The cell channels subscribed on the bus: on Redis, `PUBSUB CHANNELS`.
fn cells_on_redis(redis: &nearby_conformance::services::RedisProcess) -> BTreeSet<u32> {
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "PUBSUB",
            "CHANNELS",
            "*cell:*",
        ])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.rsplit_once("cell:")?.1.parse().ok())
        .collect()
}

fn neighbourhood(p: (f64, f64)) -> BTreeSet<u32> {
    GeoCell::of(Point::new(p.0, p.1).expect("valid"))
        .neighbourhood()
        .into_iter()
        .map(GeoCell::id)
        .collect()
}

/// Alice stands in a cell; Bob walks east from it into the next one, first
/// to and fro along the border (within the hysteresis: nothing moves), then
/// well past it.
async fn border(
    one: &Server,
    two: &Server,
    redis: Option<&nearby_conformance::services::RedisProcess>,
) {
    let home = cell_centre(SEOUL, 0, 0);
    let border_lon = home.1 + CELL_W / 2.0;
    // Metres to degrees of longitude here.
    let m = |metres: f64| metres / (111_320.0 * home.0.to_radians().cos());
    let (alice, bob) = (one.user("alice").await, two.user("bob").await);
    let mut a = Eye::connect(&alice, one).await;
    let mut b = Eye::connect(&bob, two).await;
    a.at(home).await;
    a.opt(true).await;
    let start = (home.0, border_lon - m(300.0));
    b.at(start).await;
    b.opt(true).await;
    a.until("alice sees bob", |a| a.shown.len() == 1).await;
    let alias = a.shown.keys().next().expect("bob").clone();
    assert!(a.shown[&alias]["bearing_deg"].is_null(), "same cell");
    // Both listen around the same cell: 9 channels on the bus.
    let before = neighbourhood(home);
    let on_bus = || async {
        match redis {
            Some(r) => cells_on_redis(r),
            None => {
                // In-process: every channel with a local subscriber, less
                // the two users' own two channels each.
                let n = one.metric("nearby_bus_channels").await.expect("metric") as usize;
                (0..n.saturating_sub(4) as u32).collect()
            }
        }
    };
    let wanted = |cells: &BTreeSet<u32>| match redis {
        Some(_) => cells.clone(),
        None => (0..cells.len() as u32).collect(),
    };
    assert_eq!(on_bus().await, wanted(&before));
    // To and fro across the border, within 10 % of the cell (~390 m here).
    for metres in [150.0, -150.0, 250.0, -250.0, 300.0, 0.0] {
        b.at((home.0, border_lon + m(metres))).await;
        a.pump(Duration::from_millis(HEARTBEAT_MS)).await;
    }
    a.pump(Duration::from_millis(2 * HEARTBEAT_MS)).await;
    assert_eq!(a.log.len(), 1, "no flapping: {:?}", a.log);
    assert_eq!(on_bus().await, wanted(&before), "still the same cells");
    // Well past it: Bob's home is the next cell east.
    let east = (home.0, border_lon + m(800.0));
    b.at(east).await;
    a.until("bob is east", |a| {
        a.shown
            .get(&alias)
            .is_some_and(|f| f["bearing_deg"] == 90.0)
    })
    .await;
    a.pump(Duration::from_millis(3 * HEARTBEAT_MS)).await;
    let after: BTreeSet<u32> = before.union(&neighbourhood(east)).copied().collect();
    assert_eq!(after.len(), 12, "a column of three more cells");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while on_bus().await != wanted(&after) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bus: {:?}",
            on_bus().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Never dropped nor doubled: one alias, shown all along.
    let aliases: BTreeSet<&str> = a.log.iter().filter_map(|f| f["id"].as_str()).collect();
    assert_eq!(aliases.len(), 1, "{:?}", a.log);
    assert!(
        a.log.iter().all(|f| f["type"] == "stranger_nearby"),
        "no stranger_left on the way: {:?}",
        a.log
    );
    assert_eq!(a.log.len(), 2, "one change: {:?}", a.log);
    // Bob sees Alice west of him now, under one alias too.
    b.pump(Duration::from_millis(HEARTBEAT_MS)).await;
    assert_eq!(b.shown.len(), 1);
    assert_eq!(
        b.shown.values().next().expect("alice")["bearing_deg"],
        270.0
    );
    // Bob walks back: the east column goes from the bus again.
    b.at(home).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while on_bus().await != wanted(&before) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bus: {:?}",
            on_bus().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Leaving: every cell channel goes.
    drop(a);
    drop(b);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !on_bus().await.is_empty()
        || redis.is_none() && { one.metric("nearby_bus_channels").await != Some(0.0) }
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bus: {:?}",
            on_bus().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_stranger_cannot_be_trilaterated() {
    let server = Server::start(&attack_flags());
    attack(&server, &server).await;
}

#[tokio::test]
async fn a_stranger_cannot_be_trilaterated_across_nodes() {
    let Some(nodes) = TwoNodes::start_with(&attack_flags()).await else {
        return;
    };
    attack(&nodes.a, &nodes.b).await;
}

/// The attack's heartbeat: the fastest the server takes, since the walk
/// waits out a few of them at each step (an absence cannot be waited for
/// as a condition).
const ATTACK_HEARTBEAT_MS: u64 = 100;

fn attack_flags() -> [&'static str; 10] {
    let mut f = FLAGS;
    assert_eq!(f[0], "--stranger-heartbeat-ms");
    f[1] = "100";
    f
}

/// What the attacker's client shows after each of its moves: its position
/// and the victim's `(bucket_km, bearing_deg)`, or `None` while she is not
/// shown.
type Observation = ((f64, f64), Option<(Value, Value)>);

/// The attacker walks `steps`; after each move it waits out three and a
/// half heartbeats (the victim, if now listened to, has announced
/// herself), then a frame the server must answer (an unknown type) marks
/// the end of what it was sent.
async fn walk(m: &mut Eye, steps: &[(f64, f64)]) -> Vec<Observation> {
    let mut seen = Vec::new();
    for &p in steps {
        m.at(p).await;
        m.pump(Duration::from_millis(ATTACK_HEARTBEAT_MS * 7 / 2))
            .await;
        m.ws.send_text(r#"{"type":"sync"}"#).await;
        loop {
            let f = m.ws.next_json().await;
            if f["type"] == "error" && f["code"] == "unknown_type" {
                break;
            }
            m.apply(f);
        }
        assert!(m.shown.len() <= 1, "only the victim: {:?}", m.shown);
        let view = m
            .shown
            .values()
            .next()
            .map(|f| (f["bucket_km"].clone(), f["bearing_deg"].clone()));
        seen.push((p, view));
    }
    seen
}

/// The attacker's estimate: each sighting puts the victim at the middle of
/// the band along the bearing shown (on the attacker's spot when in the
/// same cell); the estimate is their mean.
fn estimate(seen: &[Observation]) -> Option<(f64, f64)> {
    let mut points = Vec::new();
    for (p, view) in seen {
        let Some((band, bearing)) = view else {
            continue;
        };
        let mid_m = (band[0].as_f64().expect("lo") + band[1].as_f64().expect("hi")) * 500.0;
        let (dn, de) = match bearing.as_f64() {
            Some(b) => (mid_m * b.to_radians().cos(), mid_m * b.to_radians().sin()),
            None => (0.0, 0.0),
        };
        let dlat = (dn / nearby_geo::EARTH_RADIUS_M).to_degrees();
        let dlon = (de / nearby_geo::EARTH_RADIUS_M).to_degrees() / p.0.to_radians().cos();
        points.push((p.0 + dlat, p.1 + dlon));
    }
    let n = points.len() as f64;
    (n > 0.0).then(|| {
        let (la, lo) = points
            .iter()
            .fold((0.0, 0.0), |(a, b), p| (a + p.0, b + p.1));
        (la / n, lo / n)
    })
}

/// The victim (on `one`) stands at one corner of her cell, then at the
/// opposite one; each time a fresh attacker session (on `two`) walks a
/// 5 × 5 grid 2.25 km apart around her cell, reporting every spot.
///
/// The bound: what a viewer is shown is a function of the two users'
/// cells (the property test in `nearby_core::strangers` proves it for any
/// spots), so the attacker's observations for the two spots are identical,
/// whatever it does with them its estimate is one point, and it is at
/// least half the distance between the spots (here 90 % of the cell's
/// diagonal: ~5.6 km at Seoul) from one of them. No estimator beats the
/// cell.
async fn attack(one: &Server, two: &Server) {
    let cell = cell_centre(SEOUL, 0, 0);
    let corner = |s: f64| (cell.0 + s * 0.45 * CELL_H, cell.1 + s * 0.45 * CELL_W);
    let spots = [corner(-1.0), corner(1.0)];
    assert_eq!(cell_id(spots[0]), cell_id(spots[1]), "one cell");
    let (victim, attacker) = (one.user("victim").await, two.user("attacker").await);
    let steps = common::grid(cell, 5, 2250.0);
    let mut walks = Vec::new();
    for spot in spots {
        let mut v = Eye::connect(&victim, one).await;
        v.at(spot).await;
        v.opt(true).await;
        let mut m = Eye::connect(&attacker, two).await;
        m.opt(true).await;
        let seen = walk(&mut m, &steps).await;
        v.opt(false).await;
        v.until("the victim leaves", |v| v.discoverable["enabled"] == false)
            .await;
        m.until("the attacker sees her go", |m| m.shown.is_empty())
            .await;
        m.opt(false).await;
        m.until("the attacker leaves", |m| {
            m.discoverable["enabled"] == false
        })
        .await;
        walks.push(seen);
    }
    let views: Vec<_> = walks[0].iter().map(|(_, v)| v).collect();
    let distinct: BTreeSet<String> = views.iter().map(|v| format!("{v:?}")).collect();
    assert!(
        distinct.len() >= 4,
        "the walk saw her from several sides: {distinct:?}"
    );
    assert!(
        walks[0] == walks[1],
        "the same walk sees both spots alike:\n{:?}\n{:?}",
        walks[0],
        walks[1]
    );
    let guess = estimate(&walks[0]).expect("she was seen");
    let errors = [common::dist(guess, spots[0]), common::dist(guess, spots[1])];
    let apart = common::dist(spots[0], spots[1]);
    println!(
        "attacker: {} sightings in {} moves; estimate {:.0} m and {:.0} m from the two spots \
         ({apart:.0} m apart; bound: at least {:.0} m from one)",
        walks[0].iter().filter(|(_, v)| v.is_some()).count(),
        steps.len(),
        errors[0],
        errors[1],
        apart / 2.0
    );
    assert!(errors[0].max(errors[1]) >= apart / 2.0 - 1.0);
}

#[tokio::test]
async fn a_hot_cell_never_floods_a_session() {
    let server = Server::start(&[&FLAGS[..], &["--stranger-cap", "5"]].concat());
    hot_cell(&[&server]).await;
}

#[tokio::test]
async fn a_hot_cell_never_floods_a_session_across_nodes() {
    let flags = [&FLAGS[..], &["--stranger-cap", "5"]].concat();
    let Some(nodes) = TwoNodes::start_with(&flags).await else {
        return;
    };
    hot_cell(&[&nodes.a, &nodes.b]).await;
}

/// 30 users in one cell opt in in one burst; each is shown exactly 5
/// strangers (the cap) and never more, and keeps them (no churn while
/// they beat): a handful of frames each, whatever the crowd.
async fn hot_cell(servers: &[&Server]) {
    const CROWD: usize = 30;
    const CAP: usize = 5;
    let cell = cell_centre(SEOUL, 0, 0);
    let mut eyes = Vec::new();
    for i in 0..CROWD {
        let server = servers[i % servers.len()];
        let user = server.user(&format!("fan{i}")).await;
        eyes.push(Eye::connect(&user, server).await);
    }
    // The burst: every position and opt-in frame at once.
    for (i, eye) in eyes.iter_mut().enumerate() {
        eye.at((
            cell.0 + 0.0005 * (i % 7) as f64,
            cell.1 + 0.0005 * (i / 7) as f64,
        ))
        .await;
        eye.opt(true).await;
    }
    // Until everyone shows a full table, then a second more.
    let full_by = tokio::time::Instant::now() + Duration::from_secs(10);
    while eyes.iter().any(|e| e.shown.len() < CAP) {
        assert!(tokio::time::Instant::now() < full_by, "tables never filled");
        for eye in eyes.iter_mut() {
            eye.pump(Duration::from_millis(10)).await;
        }
    }
    let settle = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < settle {
        for eye in eyes.iter_mut() {
            eye.pump(Duration::from_millis(10)).await;
        }
    }
    let most = eyes.iter().map(|e| e.log.len()).max().unwrap_or(0);
    println!("most stranger frames one fan got: {most}");
    for (i, eye) in eyes.iter().enumerate() {
        assert_eq!(eye.shown.len(), CAP, "fan{i}: {:?}", eye.shown);
        assert_eq!(eye.max_shown, CAP, "fan{i} never saw more");
        // Each table fills once and keeps its strangers while they beat;
        // a little churn is allowed for a loaded machine that delays
        // heartbeats past the quiet timeout.
        assert!(
            eye.log.len() <= 4 * CAP,
            "fan{i} got {} stranger frames: {:?}",
            eye.log.len(),
            eye.log
        );
    }
    let mut gated = 0.0;
    for s in servers {
        gated += s
            .metric("nearby_strangers_gated_total")
            .await
            .unwrap_or(0.0);
    }
    assert!(gated > 0.0, "full sessions filtered notices out");
    println!("{CROWD} fans, cap {CAP}: {gated} notices filtered out by full sessions");
}

/// Cell channels go through the bus like users' channels: on a ring of
/// three Redis servers, each is subscribed on exactly the member the ring
/// places it on, and strangers on two nodes see each other through it.
#[tokio::test]
async fn cell_channels_are_sharded_over_the_redis_ring() {
    use nearby_conformance::services::{self, RedisProcess, TempDatabase};
    let mut ring = Vec::new();
    for _ in 0..4 {
        match RedisProcess::start() {
            Ok(r) => ring.push(r),
            Err(e) => return services::missing("redis-server", e),
        }
    }
    let cache = ring.pop().expect("four");
    let db = match TempDatabase::create(&services::postgres_url()).await {
        Ok(db) => db,
        Err(e) => return services::missing("PostgreSQL", e),
    };
    let urls: Vec<String> = ring.iter().map(RedisProcess::url).collect();
    let (cache_url, members) = (cache.url(), urls.join(","));
    let mut flags = vec![
        "--redis-url",
        &cache_url,
        "--pubsub-redis-urls",
        &members,
        "--database-url",
        &db.url,
        "--stranger-secret",
        "the ring test's shared key",
    ];
    flags.extend_from_slice(&FLAGS);
    let (one, two) = (Server::start(&flags), Server::start(&flags));
    let (alice, bob) = (one.user("alice").await, two.user("bob").await);
    let mut a = Eye::connect(&alice, &one).await;
    let mut b = Eye::connect(&bob, &two).await;
    let (here, north) = (cell_centre(SEOUL, 0, 0), cell_centre(SEOUL, 1, 0));
    a.at(here).await;
    b.at(north).await;
    a.opt(true).await;
    b.opt(true).await;
    a.until("alice sees bob", |a| a.shown.len() == 1).await;
    b.until("bob sees alice", |b| b.shown.len() == 1).await;
    assert_eq!(a.shown.values().next().expect("bob")["bearing_deg"], 0.0);

    let want: BTreeSet<u32> = neighbourhood(here)
        .union(&neighbourhood(north))
        .copied()
        .collect();
    let owners = nearby_ring::Ring::new(urls.iter().map(String::as_str));
    let mut seen = BTreeSet::new();
    for (url, redis) in urls.iter().zip(&ring) {
        for cell in cells_on_redis(redis) {
            let key = format!("cell:{cell}");
            assert_eq!(
                owners.owner(key.as_bytes()),
                Some(url.as_str()),
                "{key} is subscribed on {url}, not on its owner"
            );
            assert!(seen.insert(cell), "{key} on two members");
        }
    }
    assert_eq!(seen, want, "every cell listened to, on the ring");
    assert!(cells_on_redis(&cache).is_empty(), "no cell on the cache");
    let spread: BTreeSet<&str> = seen
        .iter()
        .filter_map(|c| owners.owner(format!("cell:{c}").as_bytes()))
        .collect();
    assert!(spread.len() > 1, "{} cells on one member only", seen.len());
}

#[tokio::test]
async fn relations_never_tell_who_is_behind_an_alias() {
    let server = Server::start(&FLAGS);
    linking(&server, &server).await;
}

#[tokio::test]
async fn relations_never_tell_who_is_behind_an_alias_across_nodes() {
    let Some(nodes) = TwoNodes::start_with(&FLAGS).await else {
        return;
    };
    linking(&nodes.a, &nodes.b).await;
}

impl Eye {
    /// Reads frames until the relation with someone changes on this socket
    /// (`friend_update` or `friend_removed`): every stranger frame that
    /// change caused was sent before it.
    async fn until_relation_changed(&mut self, what: &str) -> Value {
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(v) = self.ws.account.pop_front() {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "{what}: no account event"
            );
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            if let Some(Message::Text(t)) = self.ws.next_message_or_account(left).await {
                self.apply(serde_json::from_str(t.as_str()).expect("json"));
            }
        }
    }
}

/// The attack of the issue: Mallory sees one alias near her and wants to
/// know whether it is Vic. She sends Vic a friend request, cancels it,
/// sends it again; Vic accepts, Mallory unfriends; Vic asks, Mallory
/// declines. After each step Mallory's view of strangers is what it was:
/// the same alias, never a `stranger_left`. What she is shown does not
/// depend on her relations, so none of them confirms an identity.
async fn linking(one: &Server, two: &Server) {
    let home = cell_centre(SEOUL, 0, 0);
    let (mallory, vic) = (one.user("mallory").await, two.user("vic").await);
    let mut m = Eye::connect(&mallory, one).await;
    let mut v = Eye::connect(&vic, two).await;
    m.at(home).await;
    v.at((home.0 + 0.001, home.1)).await;
    m.opt(true).await;
    v.opt(true).await;
    m.until("mallory sees one stranger", |m| m.shown.len() == 1)
        .await;
    let alias = m.shown.keys().next().expect("vic").clone();
    let seen = m.log.len();
    let path = format!("/v1/friends/{}", vic.id);
    let back = format!("/v1/friends/{}", mallory.id);
    let steps: [(&User, Method, &str, &str); 6] = [
        (&mallory, Method::PUT, &path, "request"),
        (&mallory, Method::DELETE, &path, "cancel"),
        (&mallory, Method::PUT, &path, "request again"),
        (&vic, Method::PUT, &back, "accept"),
        (&mallory, Method::DELETE, &path, "unfriend"),
        (&vic, Method::PUT, &back, "vic asks"),
    ];
    for (who, method, p, what) in steps {
        let (st, body) = who.req(method, p, None).await;
        assert!(st.is_success(), "{what}: {st} {body}");
        m.until_relation_changed(what).await;
        assert_eq!(
            m.shown.keys().collect::<Vec<_>>(),
            [&alias],
            "{what}: {:?}",
            m.log
        );
        let same = |f: &Value| f["type"] == "stranger_nearby" && f["id"] == alias.as_str();
        assert!(
            m.log[seen..].iter().all(same),
            "{what}: {:?}",
            &m.log[seen..]
        );
    }
    let (st, body) = mallory.req(Method::DELETE, &path, None).await;
    assert!(st.is_success(), "decline: {st} {body}");
    m.until_relation_changed("decline").await;
    assert_eq!(m.shown.keys().collect::<Vec<_>>(), [&alias]);
    assert!(
        m.log[seen..].iter().all(|f| f["type"] == "stranger_nearby"),
        "decline: {:?}",
        &m.log[seen..]
    );
    // Vic sees Mallory the same way throughout.
    v.pump(Duration::from_millis(2 * HEARTBEAT_MS)).await;
    assert_eq!(v.shown.len(), 1, "{:?}", v.log);
    assert!(
        v.log.iter().all(|f| f["type"] == "stranger_nearby"),
        "{:?}",
        v.log
    );
}

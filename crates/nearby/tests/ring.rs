//! The bus on a ring of Redis pub/sub servers whose members live in etcd,
//! under live WebSocket sessions: a real `etcd`, four `redis-server`s (three
//! in the ring at first), one more Redis for the location cache, two nodes,
//! and `nearby ring join` agents, all on free loopback ports.
mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{north_of, until_seen, Server, User, Ws, SEOUL};
use futures_util::StreamExt;
use nearby_conformance::services::{self, EtcdProcess, RedisProcess, TempDatabase};
use serde_json::Value;

const LEASE_TTL: Duration = Duration::from_secs(2);
const ETCD_PREFIX: &str = "/it/ring/";

/// A `nearby ring join` agent, killed on drop.
struct Agent(Child);

impl Agent {
    fn join(etcd: &EtcdProcess, redis: &RedisProcess, name: &str) -> Self {
        Self::join_for(etcd, redis, name, LEASE_TTL)
    }

    fn join_for(etcd: &EtcdProcess, redis: &RedisProcess, name: &str, ttl: Duration) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nearby"))
            .args([
                "ring",
                "join",
                "--etcd",
                &etcd.url(),
                "--etcd-prefix",
                ETCD_PREFIX,
            ])
            .args(["--redis-url", &redis.url(), "--name", name])
            .args(["--lease-ttl-secs", &ttl.as_secs().to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nearby ring join");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the agent's first line");
        assert!(line.starts_with("joining the ring as"), "{line:?}");
        Self(child)
    }

    /// SIGTERM: the agent revokes its lease and exits 0.
    fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let exit = self.0.wait().expect("wait");
        assert!(exit.success(), "agent exited {exit}");
    }

    /// SIGKILL: the agent dies with its server; the lease must expire.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn metric(server: &Server, name: &str) -> f64 {
    server.metric(name).await.unwrap_or(-1.0)
}

async fn until_metric(server: &Server, name: &str, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = metric(server, name).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {got}, not {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The channels of `prefix` subscribed on one Redis, by anyone.
fn subscribed(redis: &RedisProcess, prefix: &str) -> HashSet<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "PUBSUB", "CHANNELS"])
        .arg(format!("{prefix}*"))
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

/// `PUBSUB NUMSUB` of `channels` on one Redis.
fn numsub(redis: &RedisProcess, channels: &[&String]) -> Vec<(String, u64)> {
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "PUBSUB", "NUMSUB"])
        .args(channels.iter().map(|c| c.as_str()))
        .output()
        .expect("redis-cli");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .map(|p| {
            (
                p[0].to_owned(),
                p.get(1).and_then(|n| n.parse().ok()).unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// Which ring member each subscribed channel of `prefix` is on.
fn placement(servers: &[(&str, &RedisProcess)], prefix: &str) -> HashMap<String, Vec<String>> {
    let mut at: HashMap<String, Vec<String>> = HashMap::new();
    for (name, r) in servers {
        for ch in subscribed(r, prefix) {
            at.entry(ch).or_default().push((*name).to_owned());
        }
    }
    at
}

const PAIRS: usize = 40;

/// `PAIRS` friend pairs, one of each on each node, all connected.
async fn pairs(a: &Server, b: &Server) -> Vec<(User, User, Ws, Ws)> {
    // A few at a time: each sign-up and login is a full argon2id hash.
    futures_util::stream::iter(0..PAIRS)
        .map(|i| async move {
            let x = a.user(&format!("xx{i}")).await;
            let y = b.user(&format!("yy{i}")).await;
            x.befriend(&y).await;
            y.befriend(&x).await;
            let (mut wx, _) = x.connect(a).await;
            let (mut wy, _) = y.connect(b).await;
            // Both have a position, so each can see the other.
            wx.send_location(SEOUL.0, SEOUL.1).await;
            wy.send_location(SEOUL.0, SEOUL.1).await;
            (x, y, wx, wy)
        })
        .buffered(8)
        .collect()
        .await
}

/// Every pair delivers both ways within `within` (each side moves until the
/// other sees it).
async fn all_pairs_deliver(pairs: &mut [(User, User, Ws, Ws)], within: Duration) {
    for (x, y, wx, wy) in pairs.iter_mut() {
        until_seen(wx, wy, &x.id, within).await;
        until_seen(wy, wx, &y.id, within).await;
    }
}

/// Distances of the `friend_location` frames about `id` in what `ws` got
/// within `d`.
async fn distances(ws: &mut Ws, id: &str, d: Duration) -> Vec<f64> {
    let deadline = tokio::time::Instant::now() + d;
    let mut got = Vec::new();
    while let Some(m) = ws
        .next_message(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            let f: Value = serde_json::from_str(t.as_str()).expect("json");
            if f["type"] == "friend_location" && f["id"] == id {
                got.push(f["distance_m"].as_f64().unwrap_or(-1.0));
            }
        }
    }
    got
}

#[tokio::test]
async fn the_bus_runs_on_a_ring_from_etcd_under_live_sessions() {
    let mut etcd = match EtcdProcess::start() {
        Ok(e) => e,
        Err(e) => return services::missing("etcd", e),
    };
    let mut redis = Vec::new();
    for _ in 0..4 {
        match RedisProcess::start() {
            Ok(r) => redis.push(r),
            Err(e) => return services::missing("redis-server", e),
        }
    }
    let cache = match RedisProcess::start() {
        Ok(r) => r,
        Err(e) => return services::missing("redis-server", e),
    };
    let db = match TempDatabase::create(&services::postgres_url()).await {
        Ok(db) => db,
        Err(e) => return services::missing("PostgreSQL", e),
    };
    let names = ["r0", "r1", "r2", "r3"];
    let mut agents: Vec<Option<Agent>> = (0..3)
        .map(|i| Some(Agent::join(&etcd, &redis[i], names[i])))
        .chain(std::iter::once(None))
        .collect();
    let prefix = services::unique("ring") + ":";
    let (etcd_url, cache_url) = (etcd.url(), cache.url());
    let flags = [
        "--redis-url",
        &cache_url,
        "--redis-prefix",
        &prefix,
        "--database-url",
        &db.url,
        "--etcd",
        &etcd_url,
        "--etcd-prefix",
        ETCD_PREFIX,
        "--ring-handover-ms",
        "500",
    ];
    let (a, b) = (Server::start(&flags), Server::start(&flags));
    for node in [&a, &b] {
        until_metric(node, "nearby_ring_members", 3.0, Duration::from_secs(10)).await;
    }
    let mut pairs = pairs(&a, &b).await;

    // 1. Every pair delivers, and each channel is on its owner only.
    all_pairs_deliver(&mut pairs, Duration::from_secs(5)).await;
    let ring3 = nearby_ring::Ring::new(["r0", "r1", "r2"]);
    let servers: Vec<(&str, &RedisProcess)> = names.iter().copied().zip(redis.iter()).collect();
    let at = placement(&servers, &prefix);
    // Per node: x's or y's own inbox and location, and the friend's location.
    assert_eq!(at.len(), PAIRS * 4, "{at:?}");
    for (channel, on) in &at {
        let key = channel.strip_prefix(&prefix).expect("prefixed");
        let owner = ring3.owner(key.as_bytes()).expect("owner");
        assert_eq!(on, &vec![owner.to_owned()], "{channel}");
    }
    assert!(subscribed(&cache, &prefix).is_empty(), "bus on the cache");
    // PUBSUB NUMSUB on every server: a location channel has one subscriber
    // per node (the mover's own node, and its friend's), an inbox one (its
    // owner's node), all on the owner and none elsewhere.
    let names_of: Vec<&String> = at.keys().collect();
    for (name, r) in &servers[..3] {
        let counts = numsub(r, &names_of);
        for (channel, n) in counts {
            let key = channel.strip_prefix(&prefix).expect("prefixed");
            let want = match (
                ring3.owner(key.as_bytes()) == Some(*name),
                key.starts_with("loc:"),
            ) {
                (false, _) => 0,
                (true, true) => 2,
                (true, false) => 1,
            };
            assert_eq!(n, want, "NUMSUB {channel} on {name}");
        }
    }

    // 2. A fourth server joins while every x reports: each update reaches
    // its y, nobody reconnects. The ys stand at Seoul, so an x at
    // 100 + step metres north is seen at exactly that distance.
    for (_, _, _, wy) in pairs.iter_mut() {
        wy.send_location(SEOUL.0, SEOUL.1).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (_, _, wx, wy) in pairs.iter_mut() {
        while wx.next_message(Duration::from_millis(5)).await.is_some() {}
        while wy.next_message(Duration::from_millis(5)).await.is_some() {}
    }
    let channels_a = metric(&a, "nearby_bus_channels").await;
    const STEPS: u32 = 12;
    for step in 0..STEPS {
        if step == 2 {
            // A long lease: when it leaves below, only its revocation can
            // explain it.
            agents[3] = Some(Agent::join_for(
                &etcd,
                &redis[3],
                "r3",
                Duration::from_secs(60),
            ));
        }
        for (_, _, wx, _) in pairs.iter_mut() {
            let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 100.0 + f64::from(step));
            wx.send_location(lat, lon).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut received = Vec::new();
    for (x, _, _, wy) in pairs.iter_mut() {
        received.push(distances(wy, &x.id, Duration::from_millis(300)).await);
    }
    let mut lost = 0;
    for got in &received {
        for step in 0..STEPS {
            let want = 100.0 + f64::from(step);
            if !got.iter().any(|d| (d - want).abs() < 0.5) {
                lost += 1;
            }
        }
    }
    assert_eq!(lost, 0, "of {} updates", PAIRS * STEPS as usize);
    for node in [&a, &b] {
        until_metric(node, "nearby_ring_members", 4.0, Duration::from_secs(5)).await;
    }
    let moved_a = metric(&a, "nearby_ring_channels_moved_total").await;
    // 160 channels on node A; a quarter is 40 (sd ~5.5): 20..=60.
    assert!(
        (channels_a * 0.125..=channels_a * 0.375).contains(&moved_a),
        "moved {moved_a} of {channels_a}"
    );
    let ring4 = nearby_ring::Ring::new(names);
    let at = placement(&servers, &prefix);
    for (channel, on) in &at {
        let key = channel.strip_prefix(&prefix).expect("prefixed");
        assert_eq!(
            on,
            &vec![ring4.owner(key.as_bytes()).expect("owner").to_owned()]
        );
    }

    // 3. r1 and its agent die (SIGKILL): after the lease TTL its channels
    // are on the others and every pair receives again, without reconnects.
    redis[1].kill();
    if let Some(mut agent) = agents[1].take() {
        agent.kill();
    }
    let killed = Instant::now();
    all_pairs_deliver(&mut pairs, LEASE_TTL + Duration::from_secs(2)).await;
    let back_after = killed.elapsed();
    eprintln!("every pair delivered again {back_after:?} after r1 was killed");
    for node in [&a, &b] {
        assert_eq!(metric(node, "nearby_ring_members").await, 3.0);
    }

    // 4. etcd stops: the nodes deliver on the last ring, and say so.
    etcd.kill();
    all_pairs_deliver(&mut pairs[..5], Duration::from_secs(3)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (st, body) = a.get("/readyz", None).await;
        if body["warnings"].is_array() {
            assert_eq!(st.as_u16(), 200, "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "readyz never said etcd is gone");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // It comes back; a member added afterwards is picked up.
    etcd.restart().expect("restart etcd");
    redis[1].restart().expect("restart r1");
    agents[1] = Some(Agent::join(&etcd, &redis[1], "r1"));
    for node in [&a, &b] {
        until_metric(node, "nearby_ring_members", 4.0, Duration::from_secs(20)).await;
        until_metric(node, "nearby_ring_stale", 0.0, Duration::from_secs(5)).await;
    }
    all_pairs_deliver(&mut pairs, Duration::from_secs(5)).await;

    // 5. Bad entries: malformed JSON and an unreachable server are logged
    // and skipped; the nodes keep serving.
    let bad = format!("{ETCD_PREFIX}members/bad");
    etcd.ctl(&["put", &bad, "not json"]).expect("put");
    let dead = format!("{ETCD_PREFIX}members/dead");
    etcd.ctl(&["put", &dead, r#"{"url":"redis://127.0.0.1:1"}"#])
        .expect("put");
    tokio::time::sleep(Duration::from_secs(4)).await;
    for node in [&a, &b] {
        assert_eq!(metric(node, "nearby_ring_members").await, 4.0);
        let (st, _) = node.get("/readyz", None).await;
        assert_eq!(st.as_u16(), 200);
    }
    all_pairs_deliver(&mut pairs, Duration::from_secs(5)).await;

    // SIGTERM to an agent revokes its lease: the member leaves at once, not
    // after its 60 s TTL.
    if let Some(mut agent) = agents[3].take() {
        let stopped = Instant::now();
        agent.terminate();
        for node in [&a, &b] {
            until_metric(node, "nearby_ring_members", 3.0, Duration::from_secs(5)).await;
        }
        eprintln!("r3 left {:?} after SIGTERM to its agent", stopped.elapsed());
    }
    all_pairs_deliver(&mut pairs, Duration::from_secs(5)).await;

    // `nearby ring list` and `leave`.
    let list = Command::new(env!("CARGO_BIN_EXE_nearby"))
        .args([
            "ring",
            "list",
            "--etcd",
            &etcd.url(),
            "--etcd-prefix",
            ETCD_PREFIX,
        ])
        .output()
        .expect("ring list");
    let text = String::from_utf8_lossy(&list.stdout);
    for name in ["r0", "r1", "r2"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{name} redis://"))),
            "{text}"
        );
    }
    assert!(
        !text.contains("r3 "),
        "r3 still listed after it left: {text}"
    );
    assert!(text.lines().any(|l| l.starts_with("dead ")), "{text}");
    assert!(!text.contains("bad "), "malformed entry listed: {text}");
    let leave = Command::new(env!("CARGO_BIN_EXE_nearby"))
        .args([
            "ring",
            "leave",
            "--etcd",
            &etcd.url(),
            "--etcd-prefix",
            ETCD_PREFIX,
        ])
        .args(["--name", "dead"])
        .status()
        .expect("ring leave");
    assert!(leave.success());
    assert_eq!(etcd.ctl(&["get", &dead]).expect("get").trim(), "");
}

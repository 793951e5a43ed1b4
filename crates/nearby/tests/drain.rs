//! Draining a node behind a real load balancer: Debian's nginx and HAProxy,
//! each run with the shipped `deploy/` configuration (addresses rewritten to
//! free loopback ports) in front of three nodes sharing Redis and
//! PostgreSQL, with a few hundred WebSocket clients that reconnect the way
//! `docs/protocol.md` asks.
mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{north_of, Server, Shared, User, SEOUL};
use futures_util::{SinkExt, StreamExt};
use nearby_conformance::services::{self, free_port};
use rand::Rng;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const DRAIN_SECS: u64 = 3;
/// Backoff of the test's clients (the protocol's rule: full jitter).
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(20);

/// A load balancer process of the test's own, killed on drop.
struct Lb {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Lb {
    /// SIGTERM first: nginx's master stops its workers before it exits,
    /// where a SIGKILL left them running (holding the port and the test's
    /// output pipe) after every run. SIGKILL if it is not gone in 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn deploy(file: &str) -> String {
    let path = format!("{}/../../deploy/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The shipped config with the nodes' and the front's addresses replaced.
fn rewrite(conf: &str, nodes: &[&Server], port: u16) -> String {
    let mut conf = conf.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    for (i, n) in nodes.iter().enumerate() {
        let addr = n.base.trim_start_matches("http://");
        conf = conf.replace(&format!("127.0.0.1:808{}", i + 1), addr);
    }
    conf
}

fn wait_port(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Writes `conf` (the shipped file `name`, rewritten) into a fresh
/// directory and runs `program` on it (`args(dir, conf_path)`), waiting
/// until it listens on `port`.
fn launch(
    program: &str,
    name: &str,
    conf: String,
    port: u16,
    args: impl FnOnce(&std::path::Path, &std::path::Path) -> Vec<std::ffi::OsString>,
) -> Option<Lb> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    std::fs::write(&path, conf).expect("write");
    let spawned = Command::new(program)
        .args(args(dir.path(), &path))
        .stdout(Stdio::null())
        .spawn();
    let child = match spawned {
        Ok(c) => c,
        Err(e) => {
            services::missing(program, e);
            return None;
        }
    };
    let lb = Lb {
        child,
        port,
        _dir: dir,
    };
    assert!(wait_port(port), "{program} did not listen");
    Some(lb)
}

fn nginx(nodes: &[&Server]) -> Option<Lb> {
    let port = free_port();
    let conf = rewrite(&deploy("nginx.conf"), nodes, port);
    launch("nginx", "nginx.conf", conf, port, |dir, path| {
        vec![
            "-p".into(),
            dir.into(),
            "-c".into(),
            path.into(),
            "-g".into(),
            "daemon off; error_log stderr warn; pid nginx.pid;".into(),
        ]
    })
}

fn haproxy(nodes: &[&Server]) -> Option<Lb> {
    let port = free_port();
    // Its maxconn needs twice as many open files as this machine allows a
    // process (20 000): sized down, the rest as shipped.
    let conf =
        rewrite(&deploy("haproxy.cfg"), nodes, port).replace("maxconn 100000", "maxconn 4000");
    launch("haproxy", "haproxy.cfg", conf, port, |_, path| {
        vec!["-f".into(), path.into(), "-db".into()]
    })
}

/// What one simulated phone has seen, shared with the test.
#[derive(Default)]
struct Phone {
    /// Successful WebSocket handshakes.
    connects: AtomicUsize,
    /// When its friend's last `friend_location` arrived (ms since `epoch`).
    last_delivery_ms: AtomicU64,
}

/// A phone: connects through the load balancer, reports a position every
/// 500 ms, and on any close reconnects after the server's
/// `reconnect_after_ms` plus full-jitter backoff, as the protocol asks.
async fn phone(
    url: String,
    token: String,
    friend: String,
    me: Arc<Phone>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    north_m: f64,
) {
    // Failed attempts since the last connection; `None` before the first.
    let mut attempt: Option<u32> = None;
    let mut after = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        if let Some(n) = attempt {
            let cap = BACKOFF_CAP.min(BACKOFF_BASE * 2u32.saturating_pow(n.min(10)));
            let jitter = rand::thread_rng().gen_range(0..=cap.as_millis() as u64);
            tokio::time::sleep(after + Duration::from_millis(jitter)).await;
        }
        after = Duration::ZERO;
        let mut req = url.as_str().into_client_request().expect("request");
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(req).await else {
            attempt = Some(attempt.map_or(0, |n| n + 1));
            continue;
        };
        me.connects.fetch_add(1, Ordering::Relaxed);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut step = 0u32;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            tokio::select! {
                _ = tick.tick() => {
                    step += 1;
                    let (lat, lon) = north_of(SEOUL.0, SEOUL.1, north_m + f64::from(step % 2));
                    let frame = json!({"type": "location", "lat": lat, "lon": lon}).to_string();
                    if ws.send(Message::Text(frame.into())).await.is_err() {
                        break;
                    }
                }
                msg = ws.next() => {
                    let Some(Ok(msg)) = msg else { break };
                    let Message::Text(t) = msg else { continue };
                    let f: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    if f["type"] == "friend_location" && f["id"] == friend.as_str() {
                        me.last_delivery_ms.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                    }
                    if f["code"] == "going_away" {
                        after = Duration::from_millis(f["reconnect_after_ms"].as_u64().unwrap_or(0));
                    }
                }
            }
        }
        // Closed: the server's suggestion, then backoff from the start.
        attempt = Some(0);
    }
}

async fn ws_connections(node: &Server) -> f64 {
    node.metric("nearby_ws_connections").await.unwrap_or(0.0)
}

const PAIRS: usize = 100;

/// Pairs signed up at once (the server's sign-up queue holds 64).
const SIGN_UPS_AT_ONCE: usize = 8;

/// Three nodes behind `lb`; drain node 0 under load and check what the
/// clients felt.
async fn drain_through(lb_name: &str, start_lb: fn(&[&Server]) -> Option<Lb>) {
    let Some(shared) = Shared::get().await else {
        return;
    };
    let drain = DRAIN_SECS.to_string();
    let flags = shared.flags(&["--drain-secs", &drain, "--trust-forwarded-for", "true"]);
    let nodes: Vec<Server> = (0..3).map(|_| Server::start(&flags)).collect();
    let refs: Vec<&Server> = nodes.iter().collect();
    let Some(lb) = start_lb(&refs) else {
        return;
    };
    let base = format!("http://127.0.0.1:{}", lb.port);
    let url = format!("ws://127.0.0.1:{}/v1/ws", lb.port);

    // Friend pairs (signed up on one node: they share the database), a
    // few at a time: each sign-up and login is a full argon2id hash, and
    // the node hashes on several threads.
    let node = &nodes[1];
    let users: Vec<(User, User)> = futures_util::stream::iter(0..PAIRS)
        .map(|i| async move {
            let a = node.user(&format!("{lb_name}a{i}")).await;
            let b = node.user(&format!("{lb_name}b{i}")).await;
            a.befriend(&b).await;
            b.befriend(&a).await;
            (a, b)
        })
        .buffered(SIGN_UPS_AT_ONCE)
        .collect()
        .await;
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut phones: Vec<Arc<Phone>> = Vec::new();
    let mut tasks = Vec::new();
    for (a, b) in &users {
        for (me, friend, north) in [(a, b, 100.0), (b, a, 300.0)] {
            let p = Arc::new(Phone::default());
            phones.push(p.clone());
            tasks.push(tokio::spawn(phone(
                url.clone(),
                me.token.clone(),
                friend.id.clone(),
                p,
                epoch,
                stop.clone(),
                north,
            )));
        }
    }

    // 1. Every phone is connected, and every node holds some.
    let deadline = Instant::now() + Duration::from_secs(20);
    let held = loop {
        let mut held = Vec::new();
        for n in &nodes {
            held.push(ws_connections(n).await);
        }
        let all = phones
            .iter()
            .all(|p| p.connects.load(Ordering::Relaxed) > 0);
        if all && held.iter().sum::<f64>() as usize == PAIRS * 2 {
            break held;
        }
        assert!(
            Instant::now() < deadline,
            "not every phone connected: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(held.iter().all(|h| *h > 0.0), "a node holds none: {held:?}");
    let drained = held[0] as usize;

    // REST through the load balancer all along the drain.
    let rest_stop = Arc::new(AtomicBool::new(false));
    let rest = {
        let (stop, token, base) = (rest_stop.clone(), users[0].0.token.clone(), base.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let (mut calls, mut errors) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let r = http
                    .get(format!("{base}/v1/friends"))
                    .bearer_auth(&token)
                    .send()
                    .await;
                calls += 1;
                match r {
                    Ok(r) if r.status().is_server_error() => errors.push(r.status().as_u16()),
                    Ok(_) => {}
                    Err(e) => errors.push(if e.is_connect() { 1 } else { 2 }),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (calls, errors)
        })
    };

    // 2. Drain node 0 while every phone reports.
    let drain_started = Instant::now();
    let drained_at_ms = epoch.elapsed().as_millis() as u64;
    let mut node0 = nodes.into_iter();
    let mut n0 = node0.next().expect("node 0");
    let others: Vec<Server> = node0.collect();
    Command::new(env!("CARGO_BIN_EXE_nearby"))
        .args(["drain", "--pid", &n0.child.id().to_string()])
        .status()
        .expect("nearby drain");
    let status = loop {
        if let Some(s) = n0.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            drain_started.elapsed() < Duration::from_secs(DRAIN_SECS + 2),
            "the drained node did not exit within its drain window"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let exited_after = drain_started.elapsed();
    assert!(status.success(), "drained node exited {status}");
    assert!(
        exited_after <= Duration::from_secs(DRAIN_SECS),
        "exited after {exited_after:?}"
    );

    // Every phone of the drained node is back, on another node, once.
    let bound = Duration::from_secs(DRAIN_SECS) + Duration::from_secs(3);
    let deadline = drain_started + bound;
    loop {
        let reconnects: usize = phones
            .iter()
            .map(|p| p.connects.load(Ordering::Relaxed) - 1)
            .sum();
        let mut held = 0.0;
        for n in &others {
            held += ws_connections(n).await;
        }
        if reconnects >= drained && held as usize == PAIRS * 2 {
            assert_eq!(reconnects, drained, "phones of other nodes reconnected too");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{reconnects} of {drained} reconnected; the others hold {held}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let twice = phones
        .iter()
        .filter(|p| p.connects.load(Ordering::Relaxed) > 2)
        .count();
    assert_eq!(twice, 0, "phones that reconnected more than once");

    // Each pair receives again within the same bound.
    loop {
        let stale = phones
            .iter()
            .filter(|p| {
                p.last_delivery_ms.load(Ordering::Relaxed)
                    <= drained_at_ms + exited_after.as_millis() as u64
            })
            .count();
        if stale == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(1),
            "{stale} phones get nothing since the drain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{lb_name}: {drained} phones drained, node exited after {exited_after:?}, all back and receiving after {:?}",
        drain_started.elapsed()
    );

    rest_stop.store(true, Ordering::Relaxed);
    let (calls, errors) = rest.await.expect("rest task");
    assert!(calls > 20, "{calls} REST calls");
    assert!(
        errors.is_empty(),
        "REST failures through {lb_name} during the drain: {errors:?}"
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    drop(others);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_behind_nginx_moves_everyone_once() {
    drain_through("nginx", nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_behind_haproxy_moves_everyone_once() {
    drain_through("haproxy", haproxy).await;
}

#[tokio::test]
async fn a_second_signal_stops_at_once() {
    let mut node = Server::start(&["--drain-secs", "60"]);
    let alice = node.user("alice").await;
    let (mut ws, _) = alice.connect(&node).await;
    let pid = node.child.id().to_string();
    let kill = || {
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success());
    };
    kill();
    // Draining: not ready, no new WebSockets, REST still answers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (st, body) = node.get("/readyz", None).await;
    assert_eq!((st.as_u16(), &body["code"]), (503, &json!("draining")));
    let (st, _) = alice.req(reqwest::Method::GET, "/v1/friends", None).await;
    assert_eq!(st.as_u16(), 200);
    let started = Instant::now();
    kill();
    let status = loop {
        if let Some(s) = node.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still running after the second signal"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    // The session was told to go, then closed.
    let f = ws.next_json().await;
    assert_eq!(f["code"], "going_away", "{f}");
}

//! Test helpers: start the real `nearby` binary on a free port with its own
//! data directory, and talk to it over real TCP (reqwest, tokio-tungstenite).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Redis and PostgreSQL shared by the nodes of one test: the machine's
/// Redis under a prefix of the test's own, and a fresh database.
pub struct Shared {
    pub redis_url: String,
    pub prefix: String,
    pub db: nearby_conformance::services::TempDatabase,
}

impl Shared {
    /// `None` (after reporting, which fails under `CI=true`) if either
    /// service is unreachable.
    pub async fn get() -> Option<Self> {
        use nearby_conformance::services;
        let redis_url = services::redis_url();
        if let Err(e) = services::reachable(&redis_url) {
            services::missing("Redis", e);
            return None;
        }
        let db = match services::TempDatabase::create(&services::postgres_url()).await {
            Ok(db) => db,
            Err(e) => {
                services::missing("PostgreSQL", e);
                return None;
            }
        };
        Some(Self {
            redis_url,
            prefix: services::unique("it") + ":",
            db,
        })
    }

    /// `nearby serve` flags for a node on these services, then `extra`.
    pub fn flags<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut f = vec![
            "--redis-url",
            self.redis_url.as_str(),
            "--redis-prefix",
            self.prefix.as_str(),
            "--database-url",
            self.db.url.as_str(),
        ];
        f.extend_from_slice(extra);
        f
    }
}

/// A running `nearby serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub ws: String,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts the binary with `--listen 127.0.0.1:0` and `extra` flags, and
    /// waits for its "listening" line.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"), extra)
    }

    /// Like [`Server::start`], on an existing data directory (a restart).
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        Self::start_at(dir, "127.0.0.1:0", extra)
    }

    /// Like [`Server::start_in`], on a given address (a restart that
    /// clients must find again).
    pub fn start_at(dir: tempfile::TempDir, listen: &str, extra: &[&str]) -> Self {
        Self::spawn_at(
            Command::new(env!("CARGO_BIN_EXE_nearby")),
            dir,
            listen,
            extra,
        )
    }

    /// Like [`Server::start`], with the open-file limit (soft and hard) set
    /// to `nofile` by `prlimit`.
    pub fn start_with_nofile(nofile: u32, extra: &[&str]) -> Self {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_nearby"));
        Self::spawn(cmd, tempfile::tempdir().expect("tempdir"), extra)
    }

    fn spawn(cmd: Command, dir: tempfile::TempDir, extra: &[&str]) -> Self {
        Self::spawn_at(cmd, dir, "127.0.0.1:0", extra)
    }

    fn spawn_at(mut cmd: Command, dir: tempfile::TempDir, listen: &str, extra: &[&str]) -> Self {
        let mut child = cmd
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nearby");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read listening line");
        let addr = line
            .trim()
            .strip_prefix("nearby listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Self {
            child,
            base: format!("http://{addr}"),
            ws: format!("ws://{addr}/v1/ws"),
            _dir: dir,
        }
    }

    /// The value of an unlabelled metric in `/metrics`, `None` if absent.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics", None).await;
        body.as_str()
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    }

    /// The server's `--data-dir`.
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Stops the process (SIGTERM) and hands back its data directory.
    pub fn stop_keeping_data(mut self) -> tempfile::TempDir {
        assert!(self.terminate().success());
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self._dir, dir)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not exit within 10 s of SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A signed-up, logged-in user.
#[derive(Clone)]
pub struct User {
    pub id: String,
    pub name: String,
    pub token: String,
    http: reqwest::Client,
    base: String,
}

pub async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = http.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("http request");
    let status = resp.status();
    let plain = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    let text = resp.text().await.expect("body");
    let value = if text.is_empty() {
        Value::Null
    } else if plain {
        Value::String(text)
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON body {text:?}"))
    };
    (status, value)
}

impl Server {
    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        call(
            &reqwest::Client::new(),
            reqwest::Method::POST,
            &format!("{}{path}", self.base),
            token,
            Some(body),
        )
        .await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        call(
            &reqwest::Client::new(),
            reqwest::Method::GET,
            &format!("{}{path}", self.base),
            token,
            None,
        )
        .await
    }

    /// Signs up and logs in `name`.
    pub async fn user(&self, name: &str) -> User {
        let creds = json!({ "username": name, "password": "correct horse" });
        let (st, body) = self.post("/v1/users", None, creds.clone()).await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
        let (st, login) = self.post("/v1/sessions", None, creds).await;
        assert_eq!(st, StatusCode::OK, "{login}");
        assert_eq!(login["user_id"], body["id"]);
        User {
            id: body["id"].as_str().expect("id").to_owned(),
            name: name.to_owned(),
            token: login["token"].as_str().expect("token").to_owned(),
            http: reqwest::Client::new(),
            base: self.base.clone(),
        }
    }
}

impl Server {
    /// Signs up and logs in `a` and `b`, and makes them friends (each
    /// shares with the other, the default).
    pub async fn friends(&self, a: &str, b: &str) -> (User, User) {
        let (a, b) = (self.user(a).await, self.user(b).await);
        a.befriend(&b).await;
        b.befriend(&a).await;
        (a, b)
    }
}

/// Two nodes on a `redis-server` of their own (which the test may kill and
/// restart) and a fresh PostgreSQL database.
pub struct TwoNodes {
    pub a: Server,
    pub b: Server,
    pub db: nearby_conformance::services::TempDatabase,
    pub redis: nearby_conformance::services::RedisProcess,
}

impl TwoNodes {
    /// `None` (after reporting, which fails under `CI=true`) if a service
    /// is missing.
    pub async fn start() -> Option<Self> {
        Self::start_with(&[]).await
    }

    /// Like [`TwoNodes::start`], with `extra` flags on both nodes.
    pub async fn start_with(extra: &[&str]) -> Option<Self> {
        use nearby_conformance::services::{self, RedisProcess, TempDatabase};
        let redis = match RedisProcess::start() {
            Ok(r) => r,
            Err(e) => {
                services::missing("redis-server", e);
                return None;
            }
        };
        let db = match TempDatabase::create(&services::postgres_url()).await {
            Ok(db) => db,
            Err(e) => {
                services::missing("PostgreSQL", e);
                return None;
            }
        };
        let url = redis.url();
        let mut flags = vec![
            "--redis-url",
            url.as_str(),
            "--database-url",
            db.url.as_str(),
            // One key of strangers' aliases for both, as operators set.
            "--stranger-secret",
            "the two test nodes share this",
        ];
        flags.extend_from_slice(extra);
        let (a, b) = (Server::start(&flags), Server::start(&flags));
        Some(Self { a, b, db, redis })
    }
}

impl User {
    pub async fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        call(
            &self.http,
            method,
            &format!("{}{path}", self.base),
            Some(&self.token),
            body,
        )
        .await
    }

    pub async fn befriend(&self, other: &User) -> Value {
        let (st, body) = self
            .req(
                reqwest::Method::PUT,
                &format!("/v1/friends/{}", other.id),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{body}");
        body
    }

    pub async fn unfriend(&self, other: &User) {
        let (st, body) = self
            .req(
                reqwest::Method::DELETE,
                &format!("/v1/friends/{}", other.id),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    }

    pub async fn share(&self, other: &User, enabled: bool) {
        let path = format!("/v1/friends/{}/sharing", other.id);
        let (st, body) = self
            .req(
                reqwest::Method::PUT,
                &path,
                Some(json!({ "enabled": enabled })),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{body}");
        assert_eq!(body["sharing"], enabled);
    }

    /// Connects a WebSocket with the token in the header and returns it with
    /// its first frame, which must be the snapshot.
    pub async fn connect(&self, server: &Server) -> (Ws, Value) {
        let mut req = server.ws.as_str().into_client_request().expect("request");
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.token).parse().expect("header"),
        );
        let (stream, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("ws connect");
        let mut ws = Ws::new(stream);
        let snap = ws.next_json().await;
        assert_eq!(snap["type"], "snapshot", "{snap}");
        (ws, snap)
    }
}

/// A client WebSocket. Account events (`friend_update`, `friend_removed`)
/// are set aside in `account` as they arrive, and suggested intervals
/// (`interval`) in `intervals`, so tests of locations see only what they
/// test; tests of account events read them with [`Ws::next_account`] and
/// check `account` is empty where nothing is owed, tests of the interval
/// with [`Ws::next_interval`].
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub account: std::collections::VecDeque<Value>,
    pub intervals: std::collections::VecDeque<u64>,
}

/// `text` parsed, if it is an account event.
fn account_event(text: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(text).ok()?;
    matches!(v["type"].as_str(), Some("friend_update" | "friend_removed")).then_some(v)
}

/// What [`Ws`] sets aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aside {
    Account,
    Interval,
}

/// The interval of `text`, if it is an `interval` frame.
fn interval_frame(text: &str) -> Option<u64> {
    let v: Value = serde_json::from_str(text).ok()?;
    (v["type"] == "interval").then(|| v["interval_ms"].as_u64())?
}

pub const WAIT: Duration = Duration::from_secs(5);

impl Ws {
    pub fn new(stream: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Self {
        Self {
            stream,
            account: Default::default(),
            intervals: Default::default(),
        }
    }

    /// The next suggested interval (other frames on the way are skipped);
    /// panics after [`WAIT`].
    pub async fn next_interval(&mut self) -> u64 {
        self.next_aside(Aside::Interval, |ws| ws.intervals.pop_front())
            .await
    }

    /// The next account event (other frames on the way are skipped);
    /// panics after [`WAIT`].
    pub async fn next_account(&mut self) -> Value {
        self.next_aside(Aside::Account, |ws| ws.account.pop_front())
            .await
    }

    /// The next frame of `kind` that [`Ws`] sets aside, by `pop`.
    async fn next_aside<T>(&mut self, kind: Aside, pop: impl Fn(&mut Self) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(v) = pop(self) {
                return v;
            }
            let now = tokio::time::Instant::now();
            assert!(now < deadline, "no {kind:?} frame within {WAIT:?}");
            self.next_until(deadline - now, Some(kind)).await;
        }
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.stream
            .send(Message::text(text.into()))
            .await
            .expect("ws send");
    }

    pub async fn send_location(&mut self, lat: f64, lon: f64) {
        self.send_text(json!({ "type": "location", "lat": lat, "lon": lon }).to_string())
            .await;
    }

    /// The next message of any kind, or None on timeout / end of stream.
    pub async fn next_message(&mut self, within: Duration) -> Option<Message> {
        self.next_until(within, None).await
    }

    /// Like [`Ws::next_message`], but also returns (`None`) as soon as an
    /// account event is set aside in `account`.
    pub async fn next_message_or_account(&mut self, within: Duration) -> Option<Message> {
        self.next_until(within, Some(Aside::Account)).await
    }

    /// The next message, or (with `stop_at`) the next account event or
    /// interval (set aside, `None` returned), or `None` at `within`.
    async fn next_until(&mut self, within: Duration, stop_at: Option<Aside>) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(Some(Ok(Message::Text(t)))) => {
                    if let Some(ms) = interval_frame(t.as_str()) {
                        self.intervals.push_back(ms);
                        if stop_at == Some(Aside::Interval) {
                            return None;
                        }
                    } else if let Some(v) = account_event(t.as_str()) {
                        self.account.push_back(v);
                        if stop_at == Some(Aside::Account) {
                            return None;
                        }
                    } else {
                        return Some(Message::Text(t));
                    }
                }
                Ok(Some(Ok(m))) => return Some(m),
                _ => return None,
            }
        }
    }

    /// The next text frame as JSON; panics on timeout or anything else.
    pub async fn next_json(&mut self) -> Value {
        match self.next_message(WAIT).await {
            Some(Message::Text(t)) => {
                serde_json::from_str(t.as_str()).expect("server sent non-JSON")
            }
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Asserts nothing arrives for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Some(m) = self.next_message(d).await {
            panic!("expected silence, got {m:?}");
        }
    }

    /// The next frame, which must be an `error` with `code`.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let f = self.next_json().await;
        assert_eq!(
            (f["type"].as_str(), f["code"].as_str()),
            (Some("error"), Some(code)),
            "{f}"
        );
        assert!(f["message"].as_str().is_some_and(|m| !m.is_empty()), "{f}");
        f
    }
}

/// A point `north_m` metres north of `(lat, lon)`.
pub fn north_of(lat: f64, lon: f64, north_m: f64) -> (f64, f64) {
    (lat + (north_m / 6_371_008.8).to_degrees(), lon)
}

/// Asserts a `friend_location` for `id` at `distance` ± 1 m.
pub fn assert_location(frame: &Value, id: &str, distance: f64) {
    assert_eq!(frame["type"], "friend_location", "{frame}");
    assert_eq!(frame["id"], id, "{frame}");
    let d = frame["distance_m"].as_f64().expect("distance_m");
    let b = frame["bearing_deg"].as_f64().expect("bearing_deg");
    assert!((0.0..360.0).contains(&b), "{frame}");
    assert!(
        (d - distance).abs() <= 1.0,
        "distance {d}, expected {distance}: {frame}"
    );
    assert!(
        frame["updated_at"]
            .as_i64()
            .is_some_and(|t| t > 1_600_000_000_000),
        "{frame}"
    );
}

/// Asserts a `friend_left` for `id` with `reason`.
pub fn assert_left(frame: &Value, id: &str, reason: &str) {
    assert_eq!(
        (
            frame["type"].as_str(),
            frame["id"].as_str(),
            frame["reason"].as_str()
        ),
        (Some("friend_left"), Some(id), Some(reason)),
        "{frame}"
    );
}

/// Seoul city hall, where the tests' users stand.
pub const SEOUL: (f64, f64) = (37.5665, 126.9780);

/// Sends `mover`'s position `metres` north of Seoul, alternating between two
/// spots, until `watcher` gets a `friend_location` for `id` (other frames
/// are skipped). Panics after `within`.
pub async fn until_seen(mover: &mut Ws, watcher: &mut Ws, id: &str, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    let mut step = 0u32;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no friend_location for {id} within {within:?}"
        );
        let (lat, lon) = north_of(SEOUL.0, SEOUL.1, 600.0 + 100.0 * f64::from(step % 2));
        step += 1;
        mover.send_location(lat, lon).await;
        // Whatever the mover is told (e.g. `unavailable` while Redis is
        // down) is read so its socket never backs up.
        while mover.next_message(Duration::from_millis(1)).await.is_some() {}
        let wait = tokio::time::Instant::now() + Duration::from_millis(400);
        while let Some(m) = watcher
            .next_message(wait - tokio::time::Instant::now())
            .await
        {
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                let f: Value = serde_json::from_str(t.as_str()).expect("json");
                if f["type"] == "friend_location" && f["id"] == id {
                    return f;
                }
            }
        }
    }
}

/// A square grid of `n` × `n` points `step_m` apart, centred on `c`.
pub fn grid(c: (f64, f64), n: usize, step_m: f64) -> Vec<(f64, f64)> {
    let dlat = (step_m / nearby_geo::EARTH_RADIUS_M).to_degrees();
    let dlon = dlat / c.0.to_radians().cos();
    let half = (n as f64 - 1.0) / 2.0;
    let mut v = Vec::new();
    for i in 0..n {
        for j in 0..n {
            v.push((
                c.0 + (i as f64 - half) * dlat,
                c.1 + (j as f64 - half) * dlon,
            ));
        }
    }
    v
}

/// Great-circle distance in metres between two (latitude, longitude).
pub fn dist(a: (f64, f64), b: (f64, f64)) -> f64 {
    nearby_geo::haversine_m(a.0, a.1, b.0, b.1)
}

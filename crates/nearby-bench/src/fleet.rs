//! The simulated phones, in this process or in several.
//!
//! One process cannot hold more connections than its open-file limit, so
//! with `--procs N` the bench re-runs its own binary N times as workers
//! (`nearby bench --worker PLAN --worker-index I`). Each worker connects the
//! online users of whole cities, so every delivery's sender and receiver are
//! in the same process (friends in other cities are out of range) and
//! latency is still measured on one clock. The coordinator steers them over
//! their stdin and reads counters and histograms from their stdout, one JSON
//! line each.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::matching::{match_send, SendLog, Sent};
use crate::{offset, BenchError, WANDER_M};

/// The node (index into the URLs) user `u` connects to, of `nodes`.
pub(crate) fn node_of(u: u32, nodes: usize) -> usize {
    u as usize % nodes.max(1)
}

/// Everything a worker needs to play its share of the users.
#[derive(Serialize, Deserialize)]
pub(crate) struct Population {
    /// Server base URLs (`http://…`); user `u` connects to `urls[node_of(u, len)]`.
    pub urls: Vec<String>,
    /// `(id, token)` of every user, by index.
    pub accounts: Vec<(String, String)>,
    /// Home of every user.
    pub homes: Vec<(f64, f64)>,
    /// Online friends in range of every user: deliveries per update.
    pub online_friends: Vec<u32>,
    /// Where in the interval each user sends, as a fraction.
    pub phases: Vec<f64>,
    /// Which users opt in to strangers nearby (`--discoverable`).
    #[serde(default)]
    pub discoverable: Vec<bool>,
    /// Online users of each process.
    pub members: Vec<Vec<u32>>,
    /// Local addresses to connect from, in turn (empty: the system's
    /// choice).
    pub source_ips: Vec<IpAddr>,
    pub seed: u64,
    pub rounds: Option<u64>,
    pub interval_us: u64,
    pub connect_concurrency: usize,
    /// `--ceiling`: plain TCP to the bare fan-out server, frames of this
    /// many bytes, instead of WebSockets to `nearby`.
    pub ceiling_frame_bytes: Option<usize>,
}

/// Counts of the current step.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Counters {
    pub updates: u64,
    pub expected: u64,
    pub deliveries: u64,
    pub errors: u64,
    pub disconnects: u64,
    /// Deliveries not matched to a logged send (run total).
    pub unmatched: u64,
    /// Frames received before `go`: the placements of set-up (run total).
    pub settling: u64,
    /// Phones that reconnected after their connection closed (run total).
    #[serde(default)]
    pub reconnects: u64,
    /// The longest any phone with online friends went without a delivery
    /// while steps were measured, µs (run maximum).
    #[serde(default)]
    pub max_gap_us: u64,
    /// `stranger_nearby` and `stranger_left` frames received.
    #[serde(default)]
    pub strangers: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Self) {
        self.updates += o.updates;
        self.expected += o.expected;
        self.deliveries += o.deliveries;
        self.errors += o.errors;
        self.disconnects += o.disconnects;
        self.unmatched += o.unmatched;
        self.settling += o.settling;
        self.reconnects += o.reconnects;
        self.max_gap_us = self.max_gap_us.max(o.max_gap_us);
        self.strangers += o.strangers;
    }
}

/// What the coordinator tells a worker.
#[derive(Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Cmd {
    Go,
    Interval { us: u64 },
    Begin { step: usize },
    End,
    Counters,
    StopSending,
    StartSending,
    Hist { step: usize },
    Reconnects,
    Finish,
}

/// A histogram as `(value, count)` pairs of its non-empty buckets.
type Buckets = Vec<(u64, u64)>;

fn buckets(h: &Histogram<u64>) -> Buckets {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn histogram(b: &Buckets) -> Histogram<u64> {
    let mut h = new_histogram();
    for (v, c) in b {
        let _ = h.record_n(*v, *c);
    }
    h
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits: constant, valid bounds.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

/// Latency histogram shards per process.
const SHARDS: usize = 16;

/// Counters shared by every client task of one process.
pub(crate) struct Shared {
    /// Each user's last sends, to match deliveries to them.
    sends: Vec<SendLog>,
    /// user id (as the server spells it) → index.
    index: HashMap<String, u32>,
    /// Online friends in range of each user.
    pub(crate) online_friends: Vec<u32>,
    t0: std::time::Instant,
    /// The wall clock at `t0`, Unix ms.
    t0_wall_ms: i64,
    /// Current step, from 1; deliveries are recorded against it (0 = not
    /// measuring).
    step: AtomicUsize,
    /// Current interval between a client's sends, µs.
    interval_us: AtomicU64,
    /// Per-step latency, in [`SHARDS`] shards so the clients of different
    /// threads rarely wait for one another. (A histogram per client was
    /// 135 KB each: 2.7 GB for 20 000 clients.)
    hists: Vec<std::sync::Mutex<Vec<Histogram<u64>>>>,
    measuring: AtomicBool,
    pub(crate) sending: AtomicBool,
    pub(crate) updates: AtomicU64,
    pub(crate) expected: AtomicU64,
    pub(crate) deliveries: AtomicU64,
    errors: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    /// Deliveries no logged send could be matched to.
    unmatched: AtomicU64,
    /// Frames received before `go`.
    settling: AtomicU64,
    /// Reconnections, and how long each took (close to new handshake, µs).
    reconnects: AtomicU64,
    reconnect_hist: std::sync::Mutex<Histogram<u64>>,
    /// See [`Counters::max_gap_us`].
    max_gap_us: AtomicU64,
    /// See [`Counters::strangers`].
    strangers: AtomicU64,
}

impl Shared {
    fn counters(&self) -> Counters {
        Counters {
            updates: self.updates.load(Ordering::SeqCst),
            expected: self.expected.load(Ordering::SeqCst),
            deliveries: self.deliveries.load(Ordering::SeqCst),
            errors: self.errors.load(Ordering::SeqCst),
            disconnects: self.disconnects.load(Ordering::SeqCst),
            unmatched: self.unmatched.load(Ordering::SeqCst),
            settling: self.settling.load(Ordering::SeqCst),
            reconnects: self.reconnects.load(Ordering::SeqCst),
            max_gap_us: self.max_gap_us.load(Ordering::SeqCst),
            strangers: self.strangers.load(Ordering::SeqCst),
        }
    }

    /// How long reconnections took so far, µs.
    fn reconnect_hist(&self) -> Histogram<u64> {
        self.reconnect_hist
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn begin(&self, step: usize) {
        for c in [
            &self.updates,
            &self.expected,
            &self.deliveries,
            &self.errors,
            &self.strangers,
        ] {
            c.store(0, Ordering::SeqCst);
        }
        for shard in &self.hists {
            let mut hists = shard.lock().unwrap_or_else(|p| p.into_inner());
            while hists.len() <= step {
                hists.push(new_histogram());
            }
        }
        self.step.store(step, Ordering::SeqCst);
        self.measuring.store(true, Ordering::SeqCst);
    }

    fn end(&self) {
        self.measuring.store(false, Ordering::SeqCst);
        self.step.store(0, Ordering::SeqCst);
    }

    /// The latency recorded against `step`, all shards merged.
    fn hist(&self, step: usize) -> Histogram<u64> {
        let mut sum = new_histogram();
        for shard in &self.hists {
            let hists = shard.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(h) = hists.get(step) {
                let _ = sum.add(h);
            }
        }
        sum
    }

    /// µs since this process's clients started: the send stamp.
    pub(crate) fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// The interval between a client's sends now (zero: each client
    /// follows the interval its server suggests, see [`Shared::interval_for`]).
    fn interval(&self) -> Duration {
        Duration::from_micros(self.interval_us.load(Ordering::Relaxed))
    }

    /// A client's interval: the step's, or in a step that follows the
    /// server (interval 0) the one the server suggested to this client
    /// last (until it says, [`FOLLOW_UNTIL_TOLD`]).
    fn interval_for(&self, suggested: Option<Duration>) -> Duration {
        let iv = self.interval();
        if iv.is_zero() {
            suggested.unwrap_or(FOLLOW_UNTIL_TOLD)
        } else {
            iv
        }
    }

    /// The step a send made now belongs to (0: not measured).
    pub fn sending_step(&self) -> u16 {
        if self.measuring.load(Ordering::Relaxed) {
            u16::try_from(self.step.load(Ordering::Relaxed)).unwrap_or(u16::MAX)
        } else {
            0
        }
    }

    /// Records a delivery's latency against the step of the send that
    /// caused it.
    pub(crate) fn record(&self, me: usize, step: usize, latency_us: u64) {
        let mut hists = self.hists[me % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(h) = hists.get_mut(step) {
            let _ = h.record(latency_us.max(1));
        }
    }
}

/// The clients of one process.
pub(crate) struct Local {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    go: CancellationToken,
    stop: CancellationToken,
}

impl Local {
    /// Connects `members`, each placing itself at home once.
    async fn connect(pop: &Population, members: &[u32]) -> Result<Self, BenchError> {
        let shared = Arc::new(Shared {
            sends: (0..pop.accounts.len())
                .map(|_| SendLog::default())
                .collect(),
            index: pop
                .accounts
                .iter()
                .enumerate()
                .map(|(i, (id, _))| (id.clone(), i as u32))
                .collect(),
            online_friends: pop.online_friends.clone(),
            t0: std::time::Instant::now(),
            t0_wall_ms: wall_ms(),
            step: AtomicUsize::new(0),
            interval_us: AtomicU64::new(pop.interval_us),
            hists: (0..SHARDS)
                .map(|_| std::sync::Mutex::new(vec![new_histogram()]))
                .collect(),
            measuring: AtomicBool::new(false),
            sending: AtomicBool::new(true),
            updates: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            unmatched: AtomicU64::new(0),
            settling: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            reconnect_hist: std::sync::Mutex::new(new_histogram()),
            max_gap_us: AtomicU64::new(0),
            strangers: AtomicU64::new(0),
        });
        let mut addrs = Vec::with_capacity(pop.urls.len());
        for url in &pop.urls {
            addrs.push(resolve(url).await?);
        }
        let go = CancellationToken::new();
        let stop = CancellationToken::new();
        let ceiling = pop.ceiling_frame_bytes;
        let connected = futures_util::stream::iter(members.iter().copied())
            .map(|u| {
                let i = u as usize;
                let node = node_of(u, pop.urls.len());
                let (addr, url) = (addrs[node], &pop.urls[node]);
                let source =
                    (!pop.source_ips.is_empty()).then(|| pop.source_ips[i % pop.source_ips.len()]);
                let token = &pop.accounts[i].1;
                async move {
                    let conn = match ceiling {
                        Some(_) => Conn::Bare(crate::ceiling::open(addr, source, u).await?),
                        None => Conn::Ws(Box::new(open(addr, source, url, token).await?)),
                    };
                    Ok::<_, BenchError>((u, conn))
                }
            })
            .buffer_unordered(pop.connect_concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        let mut tasks = Vec::with_capacity(members.len());
        for c in connected {
            let (u, conn) = c?;
            let ws = match (conn, ceiling) {
                (Conn::Ws(ws), _) => *ws,
                (Conn::Bare(stream), frame_bytes) => {
                    tasks.push(tokio::spawn(crate::ceiling::client(
                        stream,
                        u,
                        pop.phases[u as usize],
                        frame_bytes.unwrap_or(crate::ceiling::UPDATE_BYTES),
                        shared.clone(),
                        go.clone(),
                        stop.clone(),
                    )));
                    continue;
                }
            };
            let i = u as usize;
            let node = node_of(u, pop.urls.len());
            let plan = Plan {
                user: u,
                home: pop.homes[i],
                phase: pop.phases[i],
                rounds: pop.rounds,
                seed: pop.seed.wrapping_add(u64::from(u)),
                discoverable: pop.discoverable.get(i).copied().unwrap_or(false),
                dial: Dial {
                    addr: addrs[node],
                    source: (!pop.source_ips.is_empty())
                        .then(|| pop.source_ips[i % pop.source_ips.len()]),
                    url: pop.urls[node].clone(),
                    token: pop.accounts[i].1.clone(),
                },
            };
            tasks.push(tokio::spawn(client(
                ws,
                plan,
                shared.clone(),
                go.clone(),
                stop.clone(),
            )));
        }
        Ok(Self {
            shared,
            tasks,
            go,
            stop,
        })
    }

    async fn finish(self) -> Vec<Histogram<u64>> {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let steps = self.shared.hists[0]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        (0..steps).map(|i| self.shared.hist(i)).collect()
    }
}

/// One worker process.
pub(crate) struct Worker {
    clients: usize,
    child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Worker {
    async fn send(&mut self, cmd: &Cmd) -> Result<(), BenchError> {
        let mut line = serde_json::to_vec(cmd).unwrap_or_default();
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn reply<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T, BenchError> {
        let line = self
            .stdout
            .next_line()
            .await?
            .ok_or_else(|| BenchError::Setup("a worker exited".into()))?;
        serde_json::from_str(&line)
            .map_err(|e| BenchError::Setup(format!("worker said {line:?}: {e}")))
    }

    async fn ask<T: for<'de> Deserialize<'de>>(&mut self, cmd: &Cmd) -> Result<T, BenchError> {
        self.send(cmd).await?;
        self.reply().await
    }
}

/// The simulated phones, local or in worker processes.
pub(crate) enum Fleet {
    Local(Local),
    Remote(Vec<Worker>),
}

impl Fleet {
    /// Connects every online user: here, or in `pop.members.len()` workers
    /// when there are several.
    pub async fn start(pop: Population, plan_dir: &Path) -> Result<Self, BenchError> {
        if pop.members.len() <= 1 {
            let members = pop.members.first().cloned().unwrap_or_default();
            return Ok(Self::Local(Local::connect(&pop, &members).await?));
        }
        let plan = plan_dir.join("nearby-bench-plan.json");
        std::fs::write(&plan, serde_json::to_vec(&pop).unwrap_or_default())?;
        let exe = std::env::current_exe()?;
        let mut workers = Vec::with_capacity(pop.members.len());
        for i in 0..pop.members.len() {
            let mut child = tokio::process::Command::new(&exe)
                .arg("bench")
                .arg("--worker")
                .arg(&plan)
                .args(["--worker-index", &i.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return Err(BenchError::Setup("worker pipes".into()));
            };
            workers.push(Worker {
                clients: 0,
                child,
                stdin,
                stdout: BufReader::new(stdout).lines(),
            });
        }
        // Each says how many it connected once it has.
        for (i, w) in workers.iter_mut().enumerate() {
            let n: usize = w.reply().await?;
            eprintln!("worker {i}: {n} clients connected");
            w.clients = n;
        }
        let _ = std::fs::remove_file(&plan);
        Ok(Self::Remote(workers))
    }

    /// Connected clients of each process.
    pub fn clients(&self) -> Vec<usize> {
        match self {
            Self::Local(l) => vec![l.tasks.len()],
            Self::Remote(ws) => ws.iter().map(|w| w.clients).collect(),
        }
    }

    async fn each(&mut self, cmd: Cmd) -> Result<(), BenchError> {
        if let Self::Remote(ws) = self {
            for w in ws {
                w.send(&cmd).await?;
            }
        }
        Ok(())
    }

    pub async fn go(&mut self) -> Result<(), BenchError> {
        if let Self::Local(l) = self {
            l.go.cancel();
        }
        self.each(Cmd::Go).await
    }

    pub async fn set_interval(&mut self, us: u64) -> Result<(), BenchError> {
        if let Self::Local(l) = self {
            l.shared.interval_us.store(us, Ordering::SeqCst);
        }
        self.each(Cmd::Interval { us }).await
    }

    /// Zeroes the counters and starts recording deliveries against `step`.
    pub async fn begin(&mut self, step: usize) -> Result<(), BenchError> {
        if let Self::Local(l) = self {
            l.shared.begin(step);
        }
        self.each(Cmd::Begin { step }).await
    }

    pub async fn end(&mut self) -> Result<(), BenchError> {
        if let Self::Local(l) = self {
            l.shared.end();
        }
        self.each(Cmd::End).await
    }

    pub async fn stop_sending(&mut self) -> Result<(), BenchError> {
        if let Self::Local(l) = self {
            l.shared.sending.store(false, Ordering::SeqCst);
        }
        self.each(Cmd::StopSending).await
    }

    /// Resumes sending after [`Fleet::stop_sending`].
    pub async fn start_sending(&mut self) -> Result<(), BenchError> {
        if let Self::Local(l) = self {
            l.shared.sending.store(true, Ordering::SeqCst);
        }
        self.each(Cmd::StartSending).await
    }

    pub async fn counters(&mut self) -> Result<Counters, BenchError> {
        match self {
            Self::Local(l) => Ok(l.shared.counters()),
            Self::Remote(ws) => {
                let mut sum = Counters::default();
                for w in ws {
                    sum += w.ask::<Counters>(&Cmd::Counters).await?;
                }
                Ok(sum)
            }
        }
    }

    /// How long the phones' reconnections took so far, µs.
    pub async fn reconnect_hist(&mut self) -> Result<Histogram<u64>, BenchError> {
        match self {
            Self::Local(l) => Ok(l.shared.reconnect_hist()),
            Self::Remote(ws) => {
                let mut sum = new_histogram();
                for w in ws {
                    let b: Buckets = w.ask(&Cmd::Reconnects).await?;
                    let _ = sum.add(histogram(&b));
                }
                Ok(sum)
            }
        }
    }

    /// The latency samples of `step` handed over so far.
    pub async fn hist(&mut self, step: usize) -> Result<Histogram<u64>, BenchError> {
        match self {
            Self::Local(l) => Ok(l.shared.hist(step)),
            Self::Remote(ws) => {
                let mut sum = new_histogram();
                for w in ws {
                    let b: Buckets = w.ask(&Cmd::Hist { step }).await?;
                    let _ = sum.add(histogram(&b));
                }
                Ok(sum)
            }
        }
    }

    /// Closes every client; the latency of every step, by step number.
    pub async fn finish(self) -> Result<Vec<Histogram<u64>>, BenchError> {
        match self {
            Self::Local(l) => Ok(l.finish().await),
            Self::Remote(ws) => {
                let mut all: Vec<Histogram<u64>> = Vec::new();
                for mut w in ws {
                    let steps: Vec<Buckets> = w.ask(&Cmd::Finish).await?;
                    for (i, b) in steps.iter().enumerate() {
                        if all.len() <= i {
                            all.push(new_histogram());
                        }
                        let _ = all[i].add(histogram(b));
                    }
                    let _ = w.child.wait().await;
                }
                Ok(all)
            }
        }
    }
}

/// `nearby bench --worker PLAN --worker-index I`: plays process I's users
/// of the plan, steered by JSON lines on stdin.
pub async fn worker(plan: &Path, index: usize) -> Result<(), BenchError> {
    let pop: Population = serde_json::from_slice(&std::fs::read(plan)?)
        .map_err(|e| BenchError::Args(format!("bad plan {}: {e}", plan.display())))?;
    let members = pop
        .members
        .get(index)
        .ok_or_else(|| BenchError::Args(format!("no worker {index} in the plan")))?;
    let local = Local::connect(&pop, members).await?;
    let mut out = tokio::io::stdout();
    let say = |v: serde_json::Value| {
        let mut line = v.to_string().into_bytes();
        line.push(b'\n');
        line
    };
    out.write_all(&say(json!(local.tasks.len()))).await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let cmd: Cmd = serde_json::from_str(&line)
            .map_err(|e| BenchError::Args(format!("bad command {line:?}: {e}")))?;
        let shared = &local.shared;
        let reply = match cmd {
            Cmd::Go => {
                local.go.cancel();
                None
            }
            Cmd::Interval { us } => {
                shared.interval_us.store(us, Ordering::SeqCst);
                None
            }
            Cmd::Begin { step } => {
                shared.begin(step);
                None
            }
            Cmd::End => {
                shared.end();
                None
            }
            Cmd::StopSending => {
                shared.sending.store(false, Ordering::SeqCst);
                None
            }
            Cmd::StartSending => {
                shared.sending.store(true, Ordering::SeqCst);
                None
            }
            Cmd::Counters => Some(json!(shared.counters())),
            Cmd::Hist { step } => Some(json!(buckets(&shared.hist(step)))),
            Cmd::Reconnects => Some(json!(buckets(&shared.reconnect_hist()))),
            Cmd::Finish => break,
        };
        if let Some(v) = reply {
            out.write_all(&say(v)).await?;
            out.flush().await?;
        }
    }
    let hists = local.finish().await;
    let all: Vec<Buckets> = hists.iter().map(buckets).collect();
    out.write_all(&say(json!(all))).await?;
    out.flush().await?;
    Ok(())
}

async fn resolve(url: &str) -> Result<SocketAddr, BenchError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| BenchError::Args(format!("{url}: the bench speaks plain http:// only")))?;
    let host = rest.split('/').next().unwrap_or(rest);
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:80")
    };
    let first = tokio::net::lookup_host(&host).await?.next();
    first.ok_or_else(|| BenchError::Args(format!("{host} resolves to nothing")))
}

type Ws = WebSocketStream<tokio::net::TcpStream>;

/// A client's connection: a WebSocket to `nearby`, or plain TCP to the
/// ceiling server.
enum Conn {
    Ws(Box<Ws>),
    Bare(tokio::net::TcpStream),
}

/// A TCP connection to `addr` from `source` (any port), with TCP_NODELAY:
/// a phone sends one small frame at a time.
pub(crate) async fn connect_from(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> Result<tokio::net::TcpStream, BenchError> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A WebSocket to `addr` from `source`, authenticated with `token`.
async fn open(
    addr: SocketAddr,
    source: Option<IpAddr>,
    url: &str,
    token: &str,
) -> Result<Ws, BenchError> {
    let stream = connect_from(addr, source).await?;
    let ws_url = format!(
        "{}/v1/ws",
        url.trim_end_matches('/').replacen("http", "ws", 1)
    );
    let mut req = ws_url.into_client_request()?;
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| BenchError::Setup("token is not a valid header value".into()))?;
    req.headers_mut().insert("authorization", value);
    // tungstenite's default buffers are 128 KiB each: 250 KiB a phone, and
    // 5 GB for 20 000 of them.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config)).await?;
    Ok(ws)
}

struct Plan {
    user: u32,
    home: (f64, f64),
    /// Where in the interval this client sends, as a fraction.
    phase: f64,
    rounds: Option<u64>,
    seed: u64,
    /// Opts in to strangers nearby once placed.
    discoverable: bool,
    /// How to connect again after a close.
    dial: Dial,
}

/// Where a phone connects, and as whom.
struct Dial {
    addr: SocketAddr,
    source: Option<IpAddr>,
    url: String,
    token: String,
}

#[derive(serde::Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    id: Option<&'a str>,
    /// When the server accepted the friend's update, Unix ms.
    updated_at: Option<i64>,
    /// An `error` frame's code.
    #[serde(borrow)]
    code: Option<&'a str>,
    /// With `going_away`: when to reconnect.
    reconnect_after_ms: Option<u64>,
    /// A snapshot's or an `interval` frame's suggested interval.
    interval_ms: Option<u64>,
}

/// Wall clock, Unix ms (the server stamps `updated_at` with the same).
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A following client's interval before its server suggested one (an
/// older server never does).
const FOLLOW_UNTIL_TOLD: Duration = Duration::from_secs(5);

/// When a client sends next: every interval (read live, so a ramp changes
/// it), at its own phase within the interval.
pub(crate) struct Schedule {
    pub next: tokio::time::Instant,
    last_iv: Duration,
    phase: f64,
}

impl Schedule {
    pub fn new(shared: &Shared, phase: f64) -> Self {
        Self::new_at(shared.interval(), phase)
    }

    /// Like [`Schedule::new`], at interval `iv`.
    pub fn new_at(iv: Duration, phase: f64) -> Self {
        Schedule {
            next: tokio::time::Instant::now() + iv.mul_f64(phase),
            last_iv: iv,
            phase,
        }
    }

    /// Called at `next`: moves `next` on and says whether to send now
    /// (`false` when the rate just changed and the client re-spreads).
    pub fn due(&mut self, shared: &Shared) -> bool {
        self.due_at(shared.interval())
    }

    /// Like [`Schedule::due`], at interval `iv` (a client's own).
    pub fn due_at(&mut self, iv: Duration) -> bool {
        let now = tokio::time::Instant::now();
        if iv != self.last_iv {
            // A new step's rate: spread the clients over the new interval by
            // their phase (kept from the old schedule, a longer interval had
            // them all in the first part of it, sending in bursts).
            self.last_iv = iv;
            self.next = now + iv.mul_f64(self.phase);
            return false;
        }
        self.next += iv;
        if self.next < now {
            // Fell behind: skip whole intervals, do not burst, and keep this
            // client's phase (restarting from `now` made every client that
            // fell behind together send together from then on).
            let behind = (now - self.next).as_nanos();
            let skip = behind / iv.as_nanos().max(1) + 1;
            self.next += iv * u32::try_from(skip).unwrap_or(u32::MAX);
        }
        true
    }
}

/// One simulated phone: sends on its timer, records what it receives.
async fn client(
    ws: Ws,
    plan: Plan,
    shared: Arc<Shared>,
    go: CancellationToken,
    stop: CancellationToken,
) {
    let (mut tx, mut rx) = ws.split();
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let place = |rng: &mut StdRng| {
        let (n, e) = (
            rng.gen_range(-WANDER_M..WANDER_M),
            rng.gen_range(-WANDER_M..WANDER_M),
        );
        let (lat, lon) = offset(plan.home, n, e);
        Message::text(json!({ "type": "location", "lat": lat, "lon": lon }).to_string())
    };
    // The interval the server suggested last (followed in steps of interval 0).
    let mut suggested: Option<Duration> = None;
    // Placed at home at once; the friends' first sightings are set-up, not load.
    if tx.send(place(&mut rng)).await.is_err() {
        shared.disconnects.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Discoverable users opt in once (the store keeps it across reconnects).
    if plan.discoverable {
        let opt_in = json!({ "type": "discoverable", "enabled": true }).to_string();
        if tx.send(Message::text(opt_in)).await.is_err() {
            shared.disconnects.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // Until `go`, only read (the friends' first sightings), counting them
    // so the coordinator can wait until they stop.
    loop {
        tokio::select! {
            _ = go.cancelled() => break,
            msg = rx.next() => if matches!(msg, Some(Ok(_))) {
                shared.settling.fetch_add(1, Ordering::Relaxed);
                if let Some(Ok(Message::Text(t))) = &msg {
                    if let Ok(f) = serde_json::from_str::<Frame>(t.as_str()) {
                        suggested = f.interval_ms.map(Duration::from_millis).or(suggested);
                    }
                }
                // A ping's pong is queued by the read but only written on
                // the next write or flush: a set-up of minutes (50 000
                // clients) otherwise looks silent to the server, which
                // closes at its idle timeout.
                if matches!(msg, Some(Ok(Message::Ping(_)))) && tx.flush().await.is_err() {
                    shared.disconnects.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            } else {
                shared.disconnects.fetch_add(1, Ordering::Relaxed);
                return;
            },
        }
    }
    let mut schedule = Schedule::new_at(shared.interval_for(suggested), plan.phase);
    let mut sent = 0u64;
    let me = plan.user as usize;
    // Per friend, the last of their sends a delivery was matched to.
    let mut matched: HashMap<u32, u64> = HashMap::new();
    // When this phone last got a delivery during a measured step (µs).
    let mut last_delivery: Option<u64> = None;
    // Reconnecting as docs/protocol.md asks.
    let mut backoff = nearby_client::backoff::Backoff::default();
    loop {
        // One connection's life.
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(schedule.next) => {
                    if !schedule.due_at(shared.interval_for(suggested)) {
                        continue;
                    }
                    if !shared.sending.load(Ordering::Relaxed) || plan.rounds.is_some_and(|r| sent >= r) {
                        continue;
                    }
                    let step = shared.sending_step();
                    shared.sends[me].push(Sent {
                        mono_us: shared.t0.elapsed().as_micros() as u64,
                        step,
                    });
                    if tx.send(place(&mut rng)).await.is_err() {
                        break;
                    }
                    sent += 1;
                    shared.updates.fetch_add(1, Ordering::Relaxed);
                    shared.expected.fetch_add(u64::from(shared.online_friends[me]), Ordering::Relaxed);
                }
                msg = rx.next() => {
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(_)) => continue,
                        _ => break,
                    };
                    let Ok(frame) = serde_json::from_str::<Frame>(text.as_str()) else {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    match (frame.kind, frame.id) {
                        ("friend_location", Some(id)) => {
                            shared.deliveries.fetch_add(1, Ordering::Relaxed);
                            let now_us = shared.t0.elapsed().as_micros() as u64;
                            if shared.sending_step() > 0 {
                                if let Some(prev) = last_delivery {
                                    shared.max_gap_us.fetch_max(now_us - prev, Ordering::Relaxed);
                                }
                                last_delivery = Some(now_us);
                            } else {
                                last_delivery = None;
                            }
                            let (Some(&f), Some(stamped)) = (shared.index.get(id), frame.updated_at) else {
                                shared.unmatched.fetch_add(1, Ordering::Relaxed);
                                continue;
                            };
                            // Measured from the send that caused it, for that
                            // send's step, however late it arrives.
                            let log = &shared.sends[f as usize];
                            let seq = match_send(matched.get(&f).copied(), log.latest(), stamped, |s| {
                                log.get(s).map(|x| shared.t0_wall_ms + (x.mono_us / 1000) as i64)
                            });
                            let Some((seq, sent)) = seq.and_then(|q| Some((q, log.get(q)?))) else {
                                shared.unmatched.fetch_add(1, Ordering::Relaxed);
                                continue;
                            };
                            matched.insert(f, seq);
                            if sent.step > 0 {
                                shared.record(me, sent.step as usize, now_us.saturating_sub(sent.mono_us));
                            }
                        }
                        ("stranger_nearby" | "stranger_left", _) => {
                            shared.strangers.fetch_add(1, Ordering::Relaxed);
                        }
                        ("snapshot" | "interval", _) => {
                            suggested = frame.interval_ms.map(Duration::from_millis).or(suggested);
                        }
                        // A draining node: not an error; reconnect when asked.
                        ("error", _) if frame.code == Some("going_away") => {
                            backoff.server_asked(frame.reconnect_after_ms.unwrap_or(0));
                        }
                        ("error", _) => {
                            shared.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
            }
        }
        // Closed: counted, then connected again (through the load balancer,
        // possibly to another node), the phone placing itself once more.
        if stop.is_cancelled() {
            return;
        }
        shared.disconnects.fetch_add(1, Ordering::Relaxed);
        let lost = std::time::Instant::now();
        let ws = loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_random_delay()) => {}
            }
            let d = &plan.dial;
            match open(d.addr, d.source, &d.url, &d.token).await {
                Ok(ws) => break ws,
                Err(_) => backoff.failed(),
            }
        };
        backoff.connected();
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        let took = lost.elapsed().as_micros() as u64;
        let _ = shared
            .reconnect_hist
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(took.max(1));
        (tx, rx) = ws.split();
        // What friends sent while this phone was away never arrives: the
        // matching of each pair starts over (a missed delivery would shift
        // every later one to an older send, a whole interval per miss).
        matched.clear();
        // Placed again, like at set-up: logged as an unmeasured send, so
        // the friends' deliveries it causes match it and count nowhere
        // (matched to the previous send they looked a whole interval late).
        shared.sends[me].push(Sent {
            mono_us: shared.t0.elapsed().as_micros() as u64,
            step: 0,
        });
        if tx.send(place(&mut rng)).await.is_err() {
            continue;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_survives_the_trip_to_buckets_and_back() {
        let mut h = new_histogram();
        for v in [1u64, 7, 250, 999, 1000, 1001, 48_000, 3_000_000] {
            h.record_n(v, v % 5 + 1).expect("in range");
        }
        let back = histogram(&buckets(&h));
        assert_eq!(back.len(), h.len());
        for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
            assert!(back.equivalent(back.value_at_quantile(q), h.value_at_quantile(q)));
        }
        assert_eq!(back.max(), h.max());
    }
}

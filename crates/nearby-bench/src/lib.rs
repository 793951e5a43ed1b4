//! `nearby bench`: plays many mobile users against a running server over
//! real WebSockets and measures what users feel.
//!
//! 1. **Population** — `--users` accounts (signed up and logged in over
//!    REST, or written straight into the store), befriended along a seeded
//!    heavy-tailed, clustered graph ([`graph`]), with homes in `--cities`
//!    city discs: friends in one city are in range, friends in two are not.
//! 2. **Load** — the `--online` share of them connect; each sends its
//!    position every `--interval-ms` (random phase), wandering within
//!    a box of ±[`WANDER_M`] around home: small enough that no pair's
//!    distance ever changes by the server's 25 m re-send threshold through
//!    the receiver's *own* moves, so every `friend_location` a client
//!    receives is a delivery of a friend's update.
//! 3. **Measurement** — after `--warmup-s`, for `--duration-s` (or exactly
//!    `--rounds` updates per client): updates sent, deliveries received and
//!    expected (the mover's online friends), and the latency from a mover's
//!    send to each friend's receipt, in an HDR histogram (µs). With
//!    `--server-pid` (repeatable), the first node's RSS and the summed CPU
//!    of every listed process (nodes, Redis, PostgreSQL) per delivery, beside
//!    the whole machine's busy CPU ([`procfs`]).
//! 4. **Ceiling** — `--ceiling` runs the same clients and ramp against a
//!    bare TCP fan-out server ([`ceiling`]): what the kernel allows at the
//!    workload's shape, in the same run.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod ceiling;
mod fleet;
pub mod graph;
mod matching;
pub mod procfs;
mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use crate::graph::Graph;

/// Half-width of the box each user wanders in, metres. Two users' distance
/// can change by at most 2 · 2√2 · this (22.6 m) between any two of their
/// positions: under the server's 25 m threshold for re-sending a distance on
/// one's own move. (At ±10 m, own-move re-sends were miscounted as
/// deliveries with up-to-one-interval "latency".)
pub const WANDER_M: f64 = 4.0;

/// Every simulated user's password.
const BENCH_PASSWORD: &str = "bench password";

/// Writes a population straight into a server's user store (`--bulk-sqlite`,
/// `--bulk-postgres`): the `nearby` binary implements it over the store
/// adapters' `BulkLoad` (`nearby-ports`) and the server's own password and
/// token code, so the bench depends on neither.
#[async_trait::async_trait]
pub trait Import: Send + Sync {
    /// Creates `usernames` with `password` and one login token each, and the
    /// mutual friendships `friendships` (indexes into `usernames`); returns
    /// each user's `(id, token)`, in order.
    async fn import(
        &self,
        usernames: &[String],
        password: &str,
        friendships: &[(u32, u32)],
    ) -> Result<Vec<(String, String)>, BenchError>;
}

/// What can stop a run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The server refused or failed a setup call.
    #[error("setup: {0}")]
    Setup(String),
    /// HTTP transport.
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// WebSocket handshake.
    #[error("websocket: {0}")]
    Ws(Box<tokio_tungstenite::tungstenite::Error>),
    /// Writing the result file.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Bad arguments.
    #[error("{0}")]
    Args(String),
}

impl From<tokio_tungstenite::tungstenite::Error> for BenchError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        Self::Ws(Box::new(e))
    }
}

/// The friend graph's model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GraphModel {
    /// Holme–Kim: preferential attachment with triad formation.
    PowerLaw,
    /// Watts–Strogatz.
    SmallWorld,
}

/// City centres (lat, lon), largest first; pairwise 25 km or more apart.
const CITIES: [(&str, f64, f64); 10] = [
    ("Seoul", 37.5665, 126.9780),
    ("Busan", 35.1796, 129.0756),
    ("Incheon", 37.4563, 126.7052),
    ("Daegu", 35.8714, 128.6014),
    ("Daejeon", 36.3504, 127.3845),
    ("Gwangju", 35.1595, 126.8526),
    ("Ulsan", 35.5384, 129.3114),
    ("Jeonju", 35.8242, 127.1480),
    ("Cheongju", 36.6424, 127.4890),
    ("Gangneung", 37.7519, 128.8761),
];

/// Options of `nearby bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Server(s) to load, comma-separated (`http://` only); user `u`
    /// connects to the `u mod n`-th. Set-up calls go to the first.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8080")]
    pub url: Vec<String>,
    /// Client processes: one process holds at most its open-file limit of
    /// connections, so more spread over workers (this binary re-run), each
    /// holding whole cities (needs `--cities` >= this).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Local addresses to connect from, comma-separated, in turn: each
    /// source address has its own ~28 000 ephemeral ports per server.
    #[arg(long, value_delimiter = ',')]
    pub source_ips: Vec<std::net::IpAddr>,
    /// Internal: run as worker of a multi-process run, from this plan.
    #[arg(long, hide = true)]
    pub worker: Option<PathBuf>,
    /// Internal: which worker.
    #[arg(long, hide = true, default_value_t = 0)]
    pub worker_index: usize,
    /// Users to create.
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    /// Mean friends per user.
    #[arg(long, default_value_t = 20)]
    pub friends: usize,
    /// Friend graph model: `power-law` (Holme–Kim: heavy-tailed degrees,
    /// clustered) or `small-world` (Watts–Strogatz: every degree near
    /// `--friends`).
    #[arg(long, value_enum, default_value_t = GraphModel::PowerLaw)]
    pub graph: GraphModel,
    /// Share of friendships made with a random user anywhere (in other
    /// cities, mostly) instead of locally: lattice edges rewired in
    /// `small-world`.
    #[arg(long, default_value_t = 0.1)]
    pub rewire: f64,
    /// `power-law`: chance that a friendship is made with a friend of the
    /// last friend (closes triangles).
    #[arg(long, default_value_t = 0.5)]
    pub triad: f64,
    /// `power-law`: most friends one user may have (the book's cap).
    #[arg(long, default_value_t = 5000)]
    pub max_friends: usize,
    /// Cities the users live in (up to 10, Zipf-sized, 25 km or more apart):
    /// friends in another city are out of range and get no deliveries.
    #[arg(long, default_value_t = 1)]
    pub cities: usize,
    /// Share of users online (connected).
    #[arg(long, default_value_t = 1.0)]
    pub online: f64,
    /// Share of online users who opt in to strangers nearby: they announce
    /// their ~5 km cell and are shown the others around (each at most the
    /// server's `--stranger-cap`); cities are a few cells, so dense.
    #[arg(long, default_value_t = 0.0)]
    pub discoverable: f64,
    /// Radius of each city's disc, metres (keep it under half the server's
    /// nearby radius, so everyone in a city is in range of everyone else).
    #[arg(long, default_value_t = 2000.0)]
    pub city_radius_m: f64,
    /// Milliseconds between a client's updates.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 3)]
    pub warmup_s: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 20)]
    pub duration_s: u64,
    /// Ramp: comma-separated intervals in ms (e.g. `2000,1000,500,250`; `0`:
    /// each client follows the interval its server suggests), each
    /// a step of `--warmup-s` + `--duration-s` at that rate with the same
    /// population, stopping at the first step whose p99 exceeds
    /// `--p99-bound-ms` or that is not clean, then searching between it and
    /// the last good one (`--search-steps`); the report gives each step and
    /// the node's capacity: the most deliveries/s of a clean step within the
    /// bound.
    #[arg(long, value_delimiter = ',')]
    pub ramp_ms: Vec<u64>,
    /// Latency bound of the capacity search, ms.
    #[arg(long, default_value_t = 50.0)]
    pub p99_bound_ms: f64,
    /// After the ramp's first bad step (p99 over the bound, or not clean)
    /// following a good one, at most this many more steps between the two,
    /// each at the midpoint in rate, until they are within 10 %.
    #[arg(long, default_value_t = 3)]
    pub search_steps: u32,
    /// A step is clean (and may count as capacity) only with no error frame
    /// and received deliveries within this share of the expected ones. The
    /// bench's own noise is about 0.1 %: friends near the radius wander in
    /// and out of it (±4 m), and a step's edges hold a few sends.
    #[arg(long, default_value_t = 0.005)]
    pub loss_tolerance: f64,
    /// Write a self-contained HTML report (SVG plots) here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Send exactly this many updates per client (no warm-up) instead of
    /// running for a duration.
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Most seconds to wait for in-flight deliveries after each step (the
    /// wait ends once none arrived for 200 ms; sending pauses meanwhile).
    /// After a saturated step the server may hold seconds of backlog: a
    /// short bound would start the next step on top of it.
    #[arg(long, default_value_t = 30)]
    pub drain_s: u64,
    /// Seed of the graph, homes and phases.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Create the population straight in the server's SQLite `users.db`
    /// (its `--data-dir`), in one transaction, instead of over REST: one
    /// argon2 hash for all, no request per friendship. Thousands of times
    /// faster; the server may be running.
    #[arg(long, conflicts_with = "bulk_postgres")]
    pub bulk_sqlite: Option<PathBuf>,
    /// The same, in the server's PostgreSQL (`--database-url`).
    #[arg(long)]
    pub bulk_postgres: Option<String>,
    /// Concurrent REST calls during set-up.
    #[arg(long, default_value_t = 32)]
    pub setup_concurrency: usize,
    /// Server processes on this machine, repeatable or comma-separated: the
    /// first is the node of the first `--url` (its RSS is read, and the
    /// per-connection figures divide by its clients); the CPU of all of them
    /// (the other nodes, Redis, PostgreSQL) is summed into the server CPU
    /// and the CPU per delivery.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Write the result as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Measure the ceiling instead of `nearby`: the same population,
    /// graph, clients and ramp against a bare TCP fan-out server (a child
    /// process of this binary, its CPU measured as the server's) that
    /// forwards each update to the mover's online friends in range as one
    /// `--ceiling-frame-bytes` frame, one `write` each. No `--url` is used.
    #[arg(long, conflicts_with_all = ["bulk_sqlite", "bulk_postgres"])]
    pub ceiling: bool,
    /// Frame size of `--ceiling`, bytes: a `friend_location` frame with a
    /// five-digit id is about 104 on the wire.
    #[arg(long, default_value_t = 104)]
    pub ceiling_frame_bytes: usize,
    /// Internal: run as the ceiling server, with this fan-out file.
    #[arg(long, hide = true)]
    pub ceiling_serve: Option<PathBuf>,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th.
    pub p90_ms: f64,
    /// 99th.
    pub p99_ms: f64,
    /// 99.9th.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

/// The outcome of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Users created, and online.
    pub users: usize,
    /// Online clients.
    pub online: usize,
    /// Clients connected by each bench process.
    pub clients_per_process: Vec<usize>,
    /// Online clients of the first `--url`'s node (user `u` connects to
    /// node `u` mod the number of URLs): what `--server-pid` carries.
    pub clients_on_measured_node: usize,
    /// Friendships.
    pub friendships: usize,
    /// The graph's model.
    pub graph: GraphModel,
    /// Cities.
    pub cities: usize,
    /// Most friends of one user.
    pub max_friends: usize,
    /// The processes whose CPU is summed (`--server-pid`).
    pub server_pids: Vec<u32>,
    /// Server RSS once every client was connected and placed, before the
    /// load, less the RSS before any connected, per connection (bytes).
    pub idle_bytes_per_connection: Option<u64>,
    /// Seconds the set-up took (sign-ups, friendships, connections).
    pub setup_s: f64,
    /// Connections that closed (a node draining or restarting, a network
    /// failure); each phone reconnects as `docs/protocol.md` asks.
    pub disconnects: u64,
    /// Reconnections that succeeded.
    pub reconnects: u64,
    /// How long they took, from the close to the new handshake.
    pub reconnect_time: Latency,
    /// The longest any phone with online friends went without a delivery
    /// while a step was measured, ms (it includes the friends' own send
    /// interval).
    pub max_delivery_gap_ms: f64,
    /// The last step, its fields at the top level of the JSON.
    #[serde(flatten)]
    pub last: Step,
    /// Every step (one unless `--ramp-ms`).
    pub steps: Vec<Step>,
    /// Most deliveries/s of a clean step with p99 within the bound.
    pub capacity_deliveries_per_s: Option<f64>,
    /// Deliveries that matched no logged send (a friend's placement at
    /// connect still arriving, a frame without `updated_at`): not in any
    /// step's figures.
    pub unmatched_deliveries: u64,
    /// The bound used, ms.
    pub p99_bound_ms: f64,
    /// `--loss-tolerance`: a clean step received at least this share less
    /// than all expected deliveries.
    pub loss_tolerance: f64,
}

/// One load level.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Interval between a client's updates, ms.
    pub interval_ms: u64,
    /// Seconds measured.
    pub window_s: f64,
    /// Updates offered per second.
    pub offered_updates_per_s: f64,
    /// Updates sent.
    pub updates: u64,
    /// Deliveries those updates should cause.
    pub expected_deliveries: u64,
    /// Deliveries received of this step's updates, whenever they arrived
    /// (the bench waits `--drain-s` after the last step).
    pub deliveries: u64,
    /// Achieved rates.
    pub updates_per_s: f64,
    /// Achieved rates.
    pub deliveries_per_s: f64,
    /// Error frames.
    pub errors: u64,
    /// `stranger_nearby` / `stranger_left` frames received per second
    /// (`--discoverable`).
    pub stranger_frames_per_s: f64,
    /// No error frame, and deliveries within `--loss-tolerance` of the
    /// expected: only a clean step may count as capacity.
    pub clean: bool,
    /// Latency of this step's deliveries, each from the send that caused it.
    pub latency: Latency,
    /// CPU of every `--server-pid` together over the step, cores.
    pub server_cpu_cores: Option<f64>,
    /// Each `--server-pid`'s share of it, cores, in the order given.
    pub server_cpu_cores_by_pid: Vec<Option<f64>>,
    /// That CPU per delivery of the step, µs.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// The whole machine's busy CPU over the step, cores (server, bench and
    /// anything else): a run disturbed by other load shows here.
    pub machine_cpu_cores: Option<f64>,
    /// Server RSS at the end of the step, bytes.
    pub server_rss_bytes: Option<u64>,
}

struct Account {
    id: String,
    token: String,
}

/// `nearby bench`: a run, or (with `--worker`) one worker process of a run.
/// `import` is the bulk path of `--bulk-sqlite` / `--bulk-postgres`.
pub async fn main(args: BenchArgs, import: Option<Box<dyn Import>>) -> Result<(), BenchError> {
    if let Some(fanout) = &args.ceiling_serve {
        return ceiling::serve(fanout, args.ceiling_frame_bytes).await;
    }
    match &args.worker {
        Some(plan) => fleet::worker(plan, args.worker_index).await,
        None => run(args, import.as_deref()).await.map(drop),
    }
}

/// Runs the benchmark and prints a summary; returns the report.
pub async fn run(args: BenchArgs, import: Option<&dyn Import>) -> Result<Report, BenchError> {
    let intervals: Vec<u64> = if args.ramp_ms.is_empty() || args.rounds.is_some() {
        vec![args.interval_ms]
    } else {
        args.ramp_ms.clone()
    };
    if args.users < 2
        || intervals
            .iter()
            .any(|i| *i < 100 && (*i != 0 || args.ceiling))
        || !(0.0..=1.0).contains(&args.online)
        || !(0.0..=1.0).contains(&args.discoverable)
        || (args.discoverable > 0.0 && args.ceiling)
        || !(1..=CITIES.len()).contains(&args.cities)
        || args.procs == 0
        || args.procs > args.cities
        || args.url.is_empty()
        || args.ceiling_frame_bytes < ceiling::UPDATE_BYTES
    {
        return Err(BenchError::Args(format!(
            "need --users >= 2, intervals >= 100 ms (or 0: follow the server, not with --ceiling), 0 <= --online <= 1, \
             0 <= --discoverable <= 1 (not with --ceiling), \
             1 <= --procs <= --cities <= {}, a --url, and --ceiling-frame-bytes >= 16",
            CITIES.len()
        )));
    }
    if let Some(fast) = intervals.iter().copied().filter(|i| *i > 0).min() {
        if fast < SERVER_MIN_INTERVAL_MS && !args.ceiling {
            eprintln!(
                "warning: an interval of {fast} ms is faster than a server's default limit of 5 updates/s per \
                 connection (`nearby serve --updates-per-sec`, `--user-updates-per-sec`): unless the server \
                 allows more, updates are refused with error frames and the step fails"
            );
        }
    }
    let setup_started = Instant::now();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.setup_concurrency)
        .build()?;
    let base = args.url[0].trim_end_matches('/').to_owned();
    let sizes = graph::city_sizes(args.users, args.cities);
    let graph = match args.graph {
        GraphModel::SmallWorld => {
            Graph::small_world(args.users, args.friends, args.rewire, args.seed)
        }
        GraphModel::PowerLaw => Graph::clustered_power_law(
            &sizes,
            args.friends,
            args.triad,
            args.rewire,
            args.max_friends,
            args.seed,
        ),
    };
    // city[u]: the city block user u lives in.
    let city: Vec<u8> = sizes
        .iter()
        .enumerate()
        .flat_map(|(c, s)| std::iter::repeat_n(c as u8, *s))
        .collect();
    let run_tag = format!("{:x}", rand::random::<u32>());
    eprintln!(
        "set-up: {} users, {} friendships, tag {run_tag}",
        args.users,
        graph.edges().count()
    );

    let accounts = if args.ceiling {
        // The bare server knows users by index only.
        (0..args.users)
            .map(|i| Account {
                id: i.to_string(),
                token: String::new(),
            })
            .collect()
    } else if args.bulk_sqlite.is_some() || args.bulk_postgres.is_some() {
        let import = import.ok_or_else(|| BenchError::Args("no bulk importer".into()))?;
        bulk_accounts(&run_tag, import, args.users, &graph).await?
    } else {
        let accounts = create_accounts(&http, &base, &run_tag, &args).await?;
        befriend_all(&http, &base, &accounts, &graph, args.setup_concurrency).await?;
        accounts
    };

    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x5eed);
    let mut order: Vec<u32> = (0..args.users as u32).collect();
    order.shuffle(&mut rng);
    let n_online = ((args.users as f64) * args.online).round() as usize;
    let on_measured_node = order[..n_online]
        .iter()
        .filter(|u| fleet::node_of(**u, if args.ceiling { 1 } else { args.url.len() }) == 0)
        .count();
    let mut online = vec![false; args.users];
    for u in &order[..n_online] {
        online[*u as usize] = true;
    }
    // Deliveries an update should cause: the mover's online friends in the
    // same city (other cities are out of range).
    let online_friends = graph
        .adj
        .iter()
        .enumerate()
        .map(|(u, l)| {
            l.iter()
                .filter(|f| online[**f as usize] && city[**f as usize] == city[u])
                .count() as u32
        })
        .collect();
    let homes: Vec<(f64, f64)> = (0..args.users)
        .map(|u| {
            let (_, lat, lon) = CITIES[usize::from(city[u])];
            home(&mut rng, (lat, lon), args.city_radius_m)
        })
        .collect();
    let phases = (0..args.users).map(|_| rng.gen::<f64>()).collect();
    // Drawn from their own stream: the same seed places everyone alike
    // whatever the share, so runs with and without strangers compare.
    let mut opt_rng = StdRng::seed_from_u64(args.seed ^ 0x5354_5241_4e47_4552);
    let discoverable: Vec<bool> = (0..args.users)
        .map(|_| opt_rng.gen::<f64>() < args.discoverable)
        .collect();
    // Whole cities per process, largest first onto the least loaded, so no
    // delivery crosses processes.
    let mut per_city = vec![Vec::new(); args.cities];
    for u in &order[..n_online] {
        per_city[usize::from(city[*u as usize])].push(*u);
    }
    per_city.sort_by_key(|c| std::cmp::Reverse(c.len()));
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); args.procs];
    for c in per_city {
        if let Some(m) = members.iter_mut().min_by_key(|m| m.len()) {
            m.extend(c);
        }
    }
    // --ceiling: the bare server, fanning out to exactly the deliveries a
    // node would make (online friends in the same city), measured as the
    // server.
    let mut server_pids = args.server_pid.clone();
    let mut urls = args.url.clone();
    let mut _ceiling_server = None;
    if args.ceiling {
        let fanout: ceiling::Fanout = graph
            .adj
            .iter()
            .enumerate()
            .map(|(u, l)| {
                l.iter()
                    .copied()
                    .filter(|f| online[*f as usize] && city[*f as usize] == city[u])
                    .collect()
            })
            .collect();
        let (child, addr) =
            ceiling::spawn_server(&fanout, args.ceiling_frame_bytes, &std::env::temp_dir()).await?;
        eprintln!("ceiling server at {addr}, pid {:?}", child.id());
        server_pids.extend(child.id());
        server_pids.rotate_right(1); // its RSS is the measured node's
        urls = vec![format!("http://{addr}")];
        _ceiling_server = Some(child);
    }
    let population = fleet::Population {
        urls: urls.clone(),
        accounts: accounts.into_iter().map(|a| (a.id, a.token)).collect(),
        homes,
        online_friends,
        phases,
        discoverable,
        members,
        source_ips: args.source_ips.clone(),
        seed: args.seed,
        rounds: args.rounds,
        interval_us: intervals[0] * 1000,
        connect_concurrency: args.setup_concurrency,
        ceiling_frame_bytes: args.ceiling.then_some(args.ceiling_frame_bytes),
    };

    // Connect everyone, each placed at home once, before any load.
    let measured_pid = server_pids.first().copied();
    let rss_before = measured_pid.and_then(procfs::rss_bytes);
    let mut fleet = fleet::Fleet::start(population, &std::env::temp_dir()).await?;
    // Every client placed itself on connecting; let those first sightings
    // arrive (until none for 200 ms, at most a minute) so they are not
    // counted as load: with 20 000 clients (800 000 sightings) a fixed
    // second was not enough, and hundreds of thousands of them landed in
    // the first step, unmatched, loading the server uncounted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drain(&mut fleet, Duration::from_secs(60)).await?;
    let idle_bytes_per_connection = rss_before
        .zip(measured_pid.and_then(procfs::rss_bytes))
        .map(|(before, after)| after.saturating_sub(before) / on_measured_node.max(1) as u64);
    let clients_per_process = fleet.clients();
    // With --rounds every send is measured, the first included: start
    // measuring before the clients may send.
    let rounds_cpu_before = procfs::CpuSample::now(&server_pids);
    if args.rounds.is_some() {
        fleet.begin(1).await?;
    }
    fleet.go().await?;
    let setup_s = setup_started.elapsed().as_secs_f64();
    eprintln!("set-up done in {setup_s:.1} s; {n_online} clients online");

    let mut steps = Vec::with_capacity(intervals.len());
    if let Some(rounds) = args.rounds {
        let cpu_before = rounds_cpu_before;
        let started = Instant::now();
        // Each client stops by itself after `rounds` sends.
        let limit = Duration::from_millis(args.interval_ms * (rounds + 2)) + Duration::from_secs(5);
        while fleet.counters().await?.updates < rounds * n_online as u64
            && started.elapsed() < limit
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        fleet.stop_sending().await?;
        drain(&mut fleet, Duration::from_secs(args.drain_s)).await?;
        let counters = fleet.counters().await?;
        steps.push(close_step(
            counters,
            args.interval_ms,
            n_online,
            started,
            &cpu_before,
            &server_pids,
        ));
    } else {
        // The listed steps first; after the first bad step that follows a
        // good one, up to --search-steps more between the two (bisection in
        // rate), so the capacity is known closer than the ramp's factor.
        let mut queue: std::collections::VecDeque<u64> = intervals.iter().copied().collect();
        let (mut good, mut bad): (Option<u64>, Option<u64>) = (None, None);
        let mut probes_left = args.search_steps;
        let mut i = 0;
        while let Some(iv) = queue.pop_front() {
            fleet.set_interval(iv * 1000).await?;
            fleet.start_sending().await?;
            let label = if iv == 0 {
                "suggested".to_owned()
            } else {
                format!("{iv} ms")
            };
            progress(
                &mut fleet,
                Duration::from_secs(args.warmup_s),
                &format!("warm {label}"),
            )
            .await?;
            let cpu_before = procfs::CpuSample::now(&server_pids);
            fleet.begin(i + 1).await?;
            let started = Instant::now();
            progress(&mut fleet, Duration::from_secs(args.duration_s), &label).await?;
            // Sending stops before the counters are read: a send between
            // the two was labelled with this step, so its deliveries landed
            // in the step's histogram without being expected (a run of the
            // smoke test found 202 of 200).
            fleet.stop_sending().await?;
            let counters = fleet.counters().await?;
            let step = close_step(counters, iv, n_online, started, &cpu_before, &server_pids);
            // The step's deliveries still in flight arrive before the next
            // step loads the server: sending stays paused until they stop
            // coming (at most --drain-s). Each is recorded against its
            // send's step.
            drain(&mut fleet, Duration::from_secs(args.drain_s)).await?;
            fleet.end().await?;
            let h = fleet.hist(i + 1).await?;
            let p99 = latency(&h).p99_ms;
            let within = p99 <= args.p99_bound_ms
                && is_clean(
                    step.errors,
                    step.expected_deliveries,
                    h.len(),
                    args.loss_tolerance,
                );
            steps.push(step);
            i += 1;
            if iv == 0 {
                // Following the server: reported, but it neither bounds
                // the capacity search nor ends the ramp.
            } else if within {
                good = Some(good.map_or(iv, |g| g.min(iv)));
            } else {
                bad = Some(bad.map_or(iv, |b| b.max(iv)));
                eprintln!(
                    "step at {iv} ms: p99 {p99:.1} ms (bound {} ms) or not clean",
                    args.p99_bound_ms
                );
                queue.clear(); // the ramp stops at its first bad step
            }
            if queue.is_empty() && probes_left > 0 {
                if let Some(next) = good.zip(bad).and_then(|(g, b)| next_probe(g, b)) {
                    probes_left -= 1;
                    queue.push_back(next);
                }
            }
        }
        fleet.stop_sending().await?;
        drain(&mut fleet, Duration::from_secs(args.drain_s)).await?;
    }
    let end_counters = fleet.counters().await?;
    let (disconnects, unmatched_deliveries) = (end_counters.disconnects, end_counters.unmatched);
    let reconnect_time = latency(&fleet.reconnect_hist().await?);
    // The clients flush their histograms as they close: fill in each step's
    // latency.
    let hists = fleet.finish().await?;
    for (i, step) in steps.iter_mut().enumerate() {
        if let Some(h) = hists.get(i + 1) {
            step.latency = latency(h);
            // Every delivery of the step's sends, in flight at its end
            // included: the histogram holds one sample per delivery.
            step.deliveries = h.len();
            step.deliveries_per_s = step.deliveries as f64 / step.window_s;
        }
        step.server_cpu_us_per_delivery =
            procfs::us_per_delivery(step.server_cpu_cores, step.deliveries_per_s);
        step.clean = is_clean(
            step.errors,
            step.expected_deliveries,
            step.deliveries,
            args.loss_tolerance,
        );
    }
    let last = steps
        .last()
        .cloned()
        .ok_or_else(|| BenchError::Args("no step ran".into()))?;
    let capacity_deliveries_per_s = capacity(&steps, args.p99_bound_ms);
    let report = Report {
        users: args.users,
        online: n_online,
        clients_on_measured_node: on_measured_node,
        clients_per_process,
        server_pids: server_pids.clone(),
        friendships: graph.edges().count(),
        graph: args.graph,
        cities: args.cities,
        max_friends: graph.adj.iter().map(Vec::len).max().unwrap_or(0),
        idle_bytes_per_connection,
        setup_s,
        disconnects,
        reconnects: end_counters.reconnects,
        reconnect_time,
        max_delivery_gap_ms: end_counters.max_gap_us as f64 / 1000.0,
        last,
        steps,
        capacity_deliveries_per_s,
        unmatched_deliveries,
        p99_bound_ms: args.p99_bound_ms,
        loss_tolerance: args.loss_tolerance,
    };
    if let Some(path) = &args.html {
        std::fs::write(path, report::html(&report))?;
        eprintln!("report written to {}", path.display());
    }
    print_summary(&report);
    if let Some(path) = &args.out {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        std::fs::write(path, text)?;
        eprintln!("result written to {}", path.display());
    }
    Ok(report)
}

/// The next interval to try between a `good` (slower) and a `bad` (faster)
/// one, ms: the midpoint in rate. `None` once they are within 10 % of each
/// other in rate.
fn next_probe(good_ms: u64, bad_ms: u64) -> Option<u64> {
    if bad_ms == 0 || bad_ms >= good_ms || good_ms as f64 / bad_ms as f64 <= 1.1 {
        return None;
    }
    let mid = (2.0 / (1.0 / good_ms as f64 + 1.0 / bad_ms as f64)).round() as u64;
    (bad_ms < mid && mid < good_ms).then_some(mid)
}

/// Waits until deliveries stop arriving (none for 200 ms) or `limit`.
async fn drain(fleet: &mut fleet::Fleet, limit: Duration) -> Result<(), BenchError> {
    let arrived = |c: fleet::Counters| c.deliveries + c.settling;
    let started = Instant::now();
    let mut seen = arrived(fleet.counters().await?);
    while started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = arrived(fleet.counters().await?);
        if now == seen {
            break;
        }
        seen = now;
    }
    Ok(())
}

/// A step counts only if nothing went wrong: no error frame, and the
/// deliveries received within `tolerance` (a share) of the expected ones,
/// in either direction.
fn is_clean(errors: u64, expected: u64, received: u64, tolerance: f64) -> bool {
    let slack = expected as f64 * tolerance.max(0.0);
    errors == 0 && expected > 0 && (received as f64 - expected as f64).abs() <= slack
}

/// The capacity: the most deliveries/s of a clean step whose p99 is
/// within the bound.
fn capacity(steps: &[Step], p99_bound_ms: f64) -> Option<f64> {
    steps
        .iter()
        .filter(|s| s.clean && s.latency.count > 0 && s.latency.p99_ms <= p99_bound_ms)
        .map(|s| s.deliveries_per_s)
        .fold(None, |m: Option<f64>, d| Some(m.map_or(d, |m| m.max(d))))
}

/// Reads the counters of the step that started at `started` (its latency is
/// filled in once the clients have flushed).
fn close_step(
    c: fleet::Counters,
    interval_ms: u64,
    online: usize,
    started: Instant,
    cpu_before: &procfs::CpuSample,
    pids: &[u32],
) -> Step {
    let window_s = started.elapsed().as_secs_f64().max(1e-9);
    let cpu = cpu_before.until(&procfs::CpuSample::now(pids), window_s);
    let (updates, deliveries) = (c.updates, c.deliveries);
    Step {
        interval_ms,
        window_s,
        // A step that follows the server offers what the server asks for:
        // what was sent.
        offered_updates_per_s: if interval_ms == 0 {
            updates as f64 / window_s
        } else {
            online as f64 * 1000.0 / interval_ms as f64
        },
        updates,
        expected_deliveries: c.expected,
        deliveries,
        updates_per_s: updates as f64 / window_s,
        deliveries_per_s: deliveries as f64 / window_s,
        errors: c.errors,
        stranger_frames_per_s: c.strangers as f64 / window_s,
        clean: false,
        latency: latency(&fleet::new_histogram()),
        server_cpu_cores: cpu.server_cores,
        server_cpu_cores_by_pid: cpu.per_pid_cores,
        // Once the step's deliveries are all in (`run`).
        server_cpu_us_per_delivery: None,
        machine_cpu_cores: cpu.machine_busy_cores,
        server_rss_bytes: pids.first().copied().and_then(procfs::rss_bytes),
    }
}

/// A uniformly random point in the disc around `centre`.
fn home(rng: &mut StdRng, centre: (f64, f64), radius_m: f64) -> (f64, f64) {
    let r = radius_m * rng.gen::<f64>().sqrt();
    let theta = rng.gen::<f64>() * std::f64::consts::TAU;
    offset(centre, r * theta.cos(), r * theta.sin())
}

/// `(lat, lon)` moved `north_m` north and `east_m` east.
fn offset((lat, lon): (f64, f64), north_m: f64, east_m: f64) -> (f64, f64) {
    let r = nearby_geo::EARTH_RADIUS_M;
    let dlat = (north_m / r).to_degrees();
    let dlon = (east_m / (r * lat.to_radians().cos())).to_degrees();
    (lat + dlat, lon + dlon)
}

async fn create_accounts(
    http: &reqwest::Client,
    base: &str,
    tag: &str,
    args: &BenchArgs,
) -> Result<Vec<Account>, BenchError> {
    let made = futures_util::stream::iter(0..args.users)
        .map(|i| {
            let creds = json!({ "username": format!("b{tag}_{i}"), "password": BENCH_PASSWORD });
            async move {
                let (st, body) = post(http, &format!("{base}/v1/users"), None, &creds).await?;
                if st != 201 {
                    return Err(BenchError::Setup(format!("sign-up: {st} {body}")));
                }
                let (st, login) = post(http, &format!("{base}/v1/sessions"), None, &creds).await?;
                let token = login["token"].as_str().unwrap_or_default().to_owned();
                let id = login["user_id"].as_str().unwrap_or_default().to_owned();
                if st != 200 || token.is_empty() || id.is_empty() {
                    return Err(BenchError::Setup(format!("login: {st} {login}")));
                }
                Ok((i, Account { id, token }))
            }
        })
        .buffer_unordered(args.setup_concurrency)
        .collect::<Vec<_>>()
        .await;
    let mut accounts: Vec<Option<Account>> = (0..args.users).map(|_| None).collect();
    for r in made {
        let (i, a) = r?;
        accounts[i] = Some(a);
    }
    Ok(accounts.into_iter().flatten().collect())
}

/// The population written straight into the user store, through the
/// importer the `nearby` binary hands over.
async fn bulk_accounts(
    tag: &str,
    import: &dyn Import,
    users: usize,
    graph: &Graph,
) -> Result<Vec<Account>, BenchError> {
    let started = Instant::now();
    let names: Vec<String> = (0..users).map(|i| format!("b{tag}_{i}")).collect();
    let edges: Vec<(u32, u32)> = graph.edges().collect();
    let made = import.import(&names, BENCH_PASSWORD, &edges).await?;
    eprintln!(
        "bulk-loaded {} users and {} friendships in {:.1} s",
        made.len(),
        edges.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(made
        .into_iter()
        .map(|(id, token)| Account { id, token })
        .collect())
}

async fn befriend_all(
    http: &reqwest::Client,
    base: &str,
    accounts: &[Account],
    graph: &Graph,
    concurrency: usize,
) -> Result<(), BenchError> {
    let results = futures_util::stream::iter(graph.edges())
        .map(|(a, b)| {
            let (a, b) = (&accounts[a as usize], &accounts[b as usize]);
            async move {
                for (from, to) in [(a, b), (b, a)] {
                    let url = format!("{base}/v1/friends/{}", to.id);
                    let resp = http.put(url).bearer_auth(&from.token).send().await?;
                    if !resp.status().is_success() {
                        let st = resp.status();
                        let body = resp.text().await.unwrap_or_default();
                        return Err(BenchError::Setup(format!("befriend: {st} {body}")));
                    }
                }
                Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect()
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> Result<(u16, Value), BenchError> {
    let mut req = http.post(url).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    let st = resp.status().as_u16();
    let v = resp.json().await.unwrap_or(Value::Null);
    Ok((st, v))
}

async fn progress(fleet: &mut fleet::Fleet, total: Duration, what: &str) -> Result<(), BenchError> {
    let started = Instant::now();
    let c = fleet.counters().await?;
    let mut last = (c.updates, c.deliveries);
    while started.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(1).min(total)).await;
        let c = fleet.counters().await?;
        let now = (c.updates, c.deliveries);
        let done = (started.elapsed().as_secs_f64() / total.as_secs_f64()).min(1.0);
        let bar: String = (0..30)
            .map(|i| if (i as f64) < done * 30.0 { '#' } else { '.' })
            .collect();
        eprintln!(
            "{what:>9} [{bar}] {:>5.1}s  updates/s {:>8}  deliveries/s {:>9}",
            started.elapsed().as_secs_f64(),
            now.0.saturating_sub(last.0),
            now.1.saturating_sub(last.1)
        );
        last = now;
    }
    Ok(())
}

fn latency(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.5)),
        p90_ms: ms(h.value_at_quantile(0.9)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// The one memory-per-connection figure, saying what it divides by.
pub(crate) fn memory_line(report: &Report) -> String {
    match report.idle_bytes_per_connection {
        Some(b) => format!(
            "memory: {b} B per connection (the measured node's RSS growth while its {} clients connected, divided by {})",
            report.clients_on_measured_node, report.clients_on_measured_node
        ),
        None => "memory per connection: not measured (no --server-pid)".to_owned(),
    }
}

/// The fastest interval a `nearby serve` with default limits accepts
/// from one connection (5 updates/s).
const SERVER_MIN_INTERVAL_MS: u64 = 200;

fn print_summary(report: &Report) {
    let r = &report.last;
    println!(
        "users {} (online {}) in {} cities, friendships {} ({:?}, most friends of one user {}), set-up {:.1} s",
        report.users,
        report.online,
        report.cities,
        report.friendships,
        report.graph,
        report.max_friends,
        report.setup_s
    );
    println!("{}", memory_line(report));
    println!(
        "window {:.1} s: updates {} ({:.0}/s, offered {:.0}/s), deliveries {} of {} expected ({:.0}/s)",
        r.window_s,
        r.updates,
        r.updates_per_s,
        r.offered_updates_per_s,
        r.deliveries,
        r.expected_deliveries,
        r.deliveries_per_s
    );
    let l = &r.latency;
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  ({} samples)",
        l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
    );
    if r.stranger_frames_per_s > 0.0 {
        println!(
            "strangers nearby: {:.1} stranger frames/s received",
            r.stranger_frames_per_s
        );
    }
    println!(
        "errors {}, disconnects {}, unmatched deliveries {}; the step {}",
        r.errors,
        report.disconnects,
        report.unmatched_deliveries,
        if r.clean {
            "is clean".to_owned()
        } else {
            format!(
                "FAILED (a clean step has no error frame and receives at least {:.1} % of the expected deliveries)",
                (1.0 - report.loss_tolerance) * 100.0
            )
        }
    );
    if report.disconnects > 0 {
        let t = &report.reconnect_time;
        println!(
            "reconnects {} of {} closes; time to reconnect ms: p50 {:.0}  p99 {:.0}  max {:.0}",
            report.reconnects, report.disconnects, t.p50_ms, t.p99_ms, t.max_ms
        );
    }
    println!(
        "longest a phone went without a delivery during a step: {:.0} ms",
        report.max_delivery_gap_ms
    );
    if report.steps.len() > 1 {
        println!(
            "interval_ms  offered_upd/s  upd/s  deliveries/s  p50_ms  p99_ms  p99.9_ms  \
             server_cores  us/delivery  machine_cores  clean"
        );
        let opt = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
        for s in &report.steps {
            println!(
                "{:>11}  {:>13.0}  {:>5.0}  {:>12.0}  {:>6.2}  {:>6.2}  {:>8.2}  {:>12}  {:>11}  {:>13}  {}",
                s.interval_ms,
                s.offered_updates_per_s,
                s.updates_per_s,
                s.deliveries_per_s,
                s.latency.p50_ms,
                s.latency.p99_ms,
                s.latency.p999_ms,
                opt(s.server_cpu_cores, 2),
                opt(s.server_cpu_us_per_delivery, 2),
                opt(s.machine_cpu_cores, 2),
                if s.clean { "yes" } else { "FAILED" }
            );
        }
        match report.capacity_deliveries_per_s {
            Some(c) => println!(
                "capacity (p99 <= {} ms): {c:.0} deliveries/s",
                report.p99_bound_ms
            ),
            None => println!(
                "capacity: no clean step kept p99 <= {} ms",
                report.p99_bound_ms
            ),
        }
    }
    if let Some(rss) = r.server_rss_bytes {
        println!("server RSS at the end {:.1} MiB", rss as f64 / 1048576.0);
    }
    if let Some(cores) = r.server_cpu_cores {
        println!(
            "server CPU (pids {:?}) {cores:.2} cores, {:.2} us per delivery; whole machine busy {} cores",
            report.server_pids,
            r.server_cpu_us_per_delivery.unwrap_or(f64::NAN),
            r.machine_cpu_cores.map_or("?".into(), |c| format!("{c:.2}")),
        );
    } else if let Some(m) = r.machine_cpu_cores {
        println!("whole machine busy {m:.2} cores");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(dps: f64, p99: f64, clean: bool) -> Step {
        Step {
            interval_ms: 1000,
            window_s: 10.0,
            offered_updates_per_s: 100.0,
            updates: 1000,
            expected_deliveries: 1000,
            deliveries: 1000,
            updates_per_s: 100.0,
            deliveries_per_s: dps,
            errors: 0,
            stranger_frames_per_s: 0.0,
            clean,
            latency: Latency {
                count: 1000,
                p50_ms: 1.0,
                p90_ms: 1.0,
                p99_ms: p99,
                p999_ms: p99,
                max_ms: p99,
            },
            server_cpu_cores: None,
            server_cpu_cores_by_pid: Vec::new(),
            server_cpu_us_per_delivery: None,
            machine_cpu_cores: None,
            server_rss_bytes: None,
        }
    }

    #[test]
    fn the_search_halves_the_rate_gap_until_within_ten_percent() {
        // 1 s good, 250 ms bad: 4 and 1 updates/s per client, midpoint 2.5/s.
        assert_eq!(next_probe(1000, 250), Some(400));
        assert_eq!(next_probe(400, 250), Some(308));
        assert_eq!(next_probe(275, 250), None, "within 10 %");
        assert_eq!(next_probe(250, 400), None, "bad slower than good");
        // Every probe lies strictly between, so the search ends.
        let (mut g, b) = (10_000u64, 100u64);
        let mut n = 0;
        while let Some(m) = next_probe(g, b) {
            assert!(b < m && m < g);
            g = m;
            n += 1;
        }
        assert!(n < 20, "{n} probes");
    }

    #[test]
    fn only_clean_steps_are_clean() {
        assert!(is_clean(0, 100_000, 100_000, 0.001));
        assert!(is_clean(0, 100_000, 99_900, 0.001), "within 0.1 %");
        assert!(!is_clean(0, 100_000, 99_899, 0.001), "missing deliveries");
        assert!(
            !is_clean(0, 100_000, 100_101, 0.001),
            "unexpected deliveries"
        );
        assert!(!is_clean(1, 100_000, 100_000, 0.001), "an error frame");
        assert!(!is_clean(0, 0, 0, 0.001), "nothing measured");
    }

    #[test]
    fn capacity_comes_from_a_clean_step_within_the_bound() {
        let steps = [
            step(10_000.0, 5.0, true),
            step(20_000.0, 30.0, true),
            step(40_000.0, 20.0, false), // fast, but lost deliveries
            step(80_000.0, 900.0, true),
        ];
        assert_eq!(capacity(&steps, 50.0), Some(20_000.0));
        assert_eq!(capacity(&steps[2..], 50.0), None);
    }

    #[test]
    fn cities_are_out_of_each_others_range() {
        // The default radius (8 047 m) plus two city discs of 2 km, with room.
        for (i, a) in CITIES.iter().enumerate() {
            for b in &CITIES[i + 1..] {
                let d = nearby_geo::haversine_m(a.1, a.2, b.1, b.2);
                assert!(d > 25_000.0, "{} to {}: {d} m", a.0, b.0);
            }
        }
    }
}

//! A short `nearby bench` run against the real binary, embedded and on
//! Redis + PostgreSQL: every expected delivery must arrive, with a latency
//! sample each, and nothing may error or disconnect.
mod common;

use std::process::Command;

use common::Server;
use serde_json::Value;

fn bench(server: &Server, extra: &[&str]) -> Value {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path().join("result.json");
    let run = Command::new(env!("CARGO_BIN_EXE_nearby"))
        .args(["bench", "--url", &server.base])
        .args(["--users", "40", "--friends", "6", "--rounds", "3"])
        .args([
            "--interval-ms",
            "300",
            "--drain-s",
            "1",
            "--setup-concurrency",
            "8",
        ])
        .args(["--server-pid", &server.child.id().to_string()])
        .args(extra)
        .arg("--out")
        .arg(&out)
        .arg("--html")
        .arg(out_dir.path().join("report.html"))
        .output()
        .expect("run nearby bench");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("latency ms: p50"), "{stdout}");
    let page = std::fs::read_to_string(out_dir.path().join("report.html")).expect("report");
    assert_eq!(page.matches("<svg").count(), 2, "{page}");
    serde_json::from_str(&std::fs::read_to_string(&out).expect("result file")).expect("json")
}

/// `expected`: the deliveries the run must report expecting, where the test
/// can tell (one city, every friend online and in range).
fn check(r: &Value, expected: Option<u64>) {
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {r}"));
    assert_eq!(n("online"), 40, "{r}");
    assert_eq!(n("updates"), 120, "3 rounds of 40 clients: {r}");
    if let Some(e) = expected {
        assert_eq!(n("expected_deliveries"), e, "{r}");
    } else {
        // At most every friendship's two sides, three rounds each.
        assert!(n("expected_deliveries") > 0, "{r}");
        assert!(n("expected_deliveries") <= 3 * 2 * n("friendships"), "{r}");
    }
    // The server delivers exactly to the in-range friends: none lost, none
    // to another city.
    assert_eq!(
        n("deliveries"),
        n("expected_deliveries"),
        "lost or extra deliveries: {r}"
    );
    assert_eq!(r["latency"]["count"].as_u64(), Some(n("deliveries")), "{r}");
    assert_eq!((n("errors"), n("disconnects")), (0, 0), "{r}");
    assert!(
        r["server_rss_bytes"].as_u64().is_some_and(|b| b > 1 << 20),
        "{r}"
    );
}

#[tokio::test]
async fn bench_smoke_embedded() {
    let server = Server::start(&[]);
    // Each of the 40 users has 6 friends, all online and in one city.
    check(&bench(&server, &["--graph", "small-world"]), Some(720));
}

/// The population written straight into the running server's `users.db`.
#[tokio::test]
async fn bench_smoke_bulk_loaded() {
    let server = Server::start(&[]);
    let db = server.data_dir().join("users.db");
    let r = bench(
        &server,
        &[
            "--bulk-sqlite",
            db.to_str().expect("utf-8 path"),
            "--cities",
            "3",
            "--rewire",
            "0.3",
        ],
    );
    check(&r, None);
    assert_eq!(r["cities"], 3, "{r}");
    // Friends in other cities are out of range: fewer deliveries than
    // friendship sides, and the server sent none of them.
    let sides = 3 * 2 * r["friendships"].as_u64().expect("friendships");
    assert!(r["expected_deliveries"].as_u64() < Some(sides), "{r}");
}

/// Two worker processes, a city each, connecting from two loopback
/// addresses: the counts and latencies of both add up.
#[tokio::test]
async fn bench_smoke_in_two_processes() {
    let server = Server::start(&[]);
    let db = server.data_dir().join("users.db");
    let r = bench(
        &server,
        &[
            "--bulk-sqlite",
            db.to_str().expect("utf-8 path"),
            "--cities",
            "2",
            "--procs",
            "2",
            "--source-ips",
            "127.0.0.1,127.0.0.2",
        ],
    );
    check(&r, None);
    let per: Vec<u64> = r["clients_per_process"]
        .as_array()
        .expect("clients_per_process")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(per.len(), 2, "{r}");
    assert_eq!(per.iter().sum::<u64>(), 40, "{r}");
    assert!(per.iter().all(|n| *n > 0), "{r}");
}

#[tokio::test]
async fn bench_smoke_on_redis_and_postgres() {
    let Some(shared) = common::Shared::get().await else {
        return;
    };
    let server = Server::start(&shared.flags(&[]));
    // Power-law degrees in one city: 20 friendships made per arrival of
    // 40 users, 6 per user at most here.
    let r = bench(
        &server,
        &["--bulk-postgres", &shared.db.url, "--max-friends", "6"],
    );
    check(&r, None);
    assert!(r["max_friends"].as_u64().is_some_and(|m| m <= 6), "{r}");
}

/// A step that follows the interval the server suggests (`--ramp-ms …,0`)
/// beside a fixed one, same population, same run: every expected delivery
/// arrives in both, and following never sends more than the fixed step at
/// the fast interval does.
#[test]
fn the_bench_follows_the_suggested_interval() {
    let server = Server::start(&["--fast-interval-ms", "400", "--slow-interval-ms", "4000"]);
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path().join("result.json");
    let run = Command::new(env!("CARGO_BIN_EXE_nearby"))
        .args(["bench", "--url", &server.base])
        .args(["--users", "60", "--friends", "3", "--online", "0.5"])
        .args(["--ramp-ms", "400,0", "--warmup-s", "2", "--duration-s", "4"])
        .args(["--drain-s", "1", "--setup-concurrency", "8"])
        .args(["--server-pid", &server.child.id().to_string()])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run nearby bench");
    assert!(
        run.status.success(),
        "bench failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("result file")).expect("json");
    let steps = r["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{r}");
    let (fixed, follow) = (&steps[0], &steps[1]);
    assert_eq!(follow["interval_ms"], 0, "{r}");
    for s in steps {
        assert_eq!(s["clean"], true, "{s}");
        assert_eq!(s["errors"], 0, "{s}");
    }
    let rate = |s: &Value| s["updates_per_s"].as_f64().expect("updates_per_s");
    assert!(
        rate(follow) <= rate(fixed) * 1.1,
        "following sent {} updates/s, the fixed 400 ms step {}",
        rate(follow),
        rate(fixed)
    );
    eprintln!(
        "fixed 400 ms: {:.1} updates/s; suggested: {:.1} updates/s",
        rate(fixed),
        rate(follow)
    );
}

/// The node restarts under the bench (on the same address and data): every
/// phone is told to go, reconnects by itself, and the run reports it.
#[test]
fn the_phones_come_back_after_a_restart() {
    let listen = format!("127.0.0.1:{}", nearby_conformance::services::free_port());
    let server = Server::start_at(
        tempfile::tempdir().expect("tempdir"),
        &listen,
        &["--drain-secs", "1"],
    );
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path().join("result.json");
    let mut run = Command::new(env!("CARGO_BIN_EXE_nearby"))
        .args(["bench", "--url", &server.base])
        .args(["--users", "20", "--friends", "4", "--graph", "small-world"])
        .args([
            "--interval-ms",
            "500",
            "--warmup-s",
            "1",
            "--duration-s",
            "14",
        ])
        .args(["--drain-s", "1", "--setup-concurrency", "8"])
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run nearby bench");
    // Into the measured window, the node drains and comes back.
    std::thread::sleep(std::time::Duration::from_secs(5));
    let data = server.stop_keeping_data();
    let _again = Server::start_at(data, &listen, &[]);
    let status = run.wait().expect("bench");
    assert!(status.success(), "bench failed");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("result file")).expect("json");
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {r}"));
    assert_eq!(n("disconnects"), 20, "every phone was closed once: {r}");
    assert_eq!(n("reconnects"), 20, "and came back once: {r}");
    assert_eq!(r["reconnect_time"]["count"].as_u64(), Some(20), "{r}");
    assert!(
        r["reconnect_time"]["max_ms"]
            .as_f64()
            .is_some_and(|ms| ms > 0.0),
        "{r}"
    );
    // The gap covers the restart: longer than the drain's spread.
    assert!(
        r["max_delivery_gap_ms"]
            .as_f64()
            .is_some_and(|ms| ms > 500.0),
        "{r}"
    );
    assert!(n("deliveries") > 0, "{r}");
}

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

fn check(r: &Value) {
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {r}"));
    assert_eq!(n("online"), 40, "{r}");
    assert_eq!(n("updates"), 120, "3 rounds of 40 clients: {r}");
    // Each of the 40 users has 6 friends, all online and in range.
    assert_eq!(n("expected_deliveries"), 720, "{r}");
    assert_eq!(
        n("deliveries"),
        n("expected_deliveries"),
        "lost or extra deliveries: {r}"
    );
    assert_eq!(r["latency"]["count"].as_u64(), Some(720), "{r}");
    assert_eq!((n("errors"), n("disconnects")), (0, 0), "{r}");
    assert!(
        r["server_rss_bytes"].as_u64().is_some_and(|b| b > 1 << 20),
        "{r}"
    );
}

#[tokio::test]
async fn bench_smoke_embedded() {
    let server = Server::start(&[]);
    check(&bench(&server, &[]));
}

/// The population written straight into the running server's `users.db`.
#[tokio::test]
async fn bench_smoke_bulk_loaded() {
    let server = Server::start(&[]);
    let db = server.data_dir().join("users.db");
    check(&bench(
        &server,
        &["--bulk-sqlite", db.to_str().expect("utf-8 path")],
    ));
}

#[tokio::test]
async fn bench_smoke_on_redis_and_postgres() {
    let Some(shared) = common::Shared::get().await else {
        return;
    };
    let server = Server::start(&shared.flags(&[]));
    check(&bench(&server, &["--bulk-postgres", &shared.db.url]));
}

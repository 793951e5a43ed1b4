//! Real services for tests: the machine's Redis and PostgreSQL, fresh
//! databases on them, and throwaway `redis-server` / `etcd` / PostgreSQL
//! processes on free ports for the tests that kill one.
//!
//! A test whose service is unreachable calls [`missing`]: under `CI=true`
//! that fails the test; elsewhere it prints why and the test returns early.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection;

/// Whether every service is required (`CI=true`).
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Reports an unreachable service: panics under `CI=true`, otherwise
/// prints a skip notice. The caller returns right after.
pub fn missing(what: &str, why: impl std::fmt::Display) {
    assert!(
        !required(),
        "{what} is required under CI=true but is unavailable: {why}"
    );
    eprintln!("SKIPPED: {what} is unavailable ({why}); under CI=true this fails");
}

/// The shared Redis (`NEARBY_TEST_REDIS_URL`, default the local one).
pub fn redis_url() -> String {
    std::env::var("NEARBY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The shared PostgreSQL's maintenance database
/// (`NEARBY_TEST_DATABASE_URL`, default the local `test` database).
pub fn postgres_url() -> String {
    std::env::var("NEARBY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Whether something accepts TCP connections at the host:port of `url`.
pub fn reachable(url: &str) -> Result<(), String> {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let host_port = rest.rsplit('@').next().unwrap_or(rest);
    let host_port = host_port.split('/').next().unwrap_or(host_port);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host_port)
        .map_err(|e| format!("{host_port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host_port}: no address"))?;
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map(drop)
        .map_err(|e| format!("{host_port}: {e}"))
}

/// A unique prefix for keys and channels, so tests sharing one Redis never
/// see each other's data.
pub fn unique(tag: &str) -> String {
    // The counter separates calls within this process (two tests starting
    // in the same clock tick collided on the time alone); pid and time
    // separate processes and runs.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{tag}{}x{nanos}x{n}", std::process::id())
}

/// A database created for one test on a PostgreSQL server, dropped (with
/// its connections) when this is dropped.
pub struct TempDatabase {
    /// URL of the new database.
    pub url: String,
    admin: String,
    name: String,
}

impl TempDatabase {
    /// Creates a fresh database on the server of `admin_url`.
    pub async fn create(admin_url: &str) -> Result<Self, String> {
        let name = unique("nearby_t_");
        let mut conn = sqlx::PgConnection::connect(admin_url)
            .await
            .map_err(|e| e.to_string())?;
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
        Ok(Self {
            url: format!("{base}/{name}"),
            admin: admin_url.to_owned(),
            name,
        })
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop may run inside a runtime: do the async work on a thread of
        // its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// A free loopback TCP port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn wait_for_port(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if reachable(&format!("x://127.0.0.1:{port}")).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A child process the test started: killed by PID (SIGKILL), and on drop.
#[derive(Default)]
struct Owned(Option<Child>);

impl Owned {
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Holds `child` once it listens on `port`; kills it if it does not.
    fn listening(
        &mut self,
        child: Child,
        what: &str,
        port: u16,
        within: Duration,
    ) -> Result<(), String> {
        self.0 = Some(child);
        if wait_for_port(port, within) {
            Ok(())
        } else {
            self.kill();
            Err(format!("{what} did not listen on {port}"))
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `redis-server` of the test's own on a free port, with no persistence;
/// it can be killed and started again on the same port.
pub struct RedisProcess {
    /// Its port.
    pub port: u16,
    child: Owned,
}

impl RedisProcess {
    /// Starts one; `Err` if `redis-server` is not installed or won't start.
    pub fn start() -> Result<Self, String> {
        let mut me = Self {
            port: free_port(),
            child: Owned::default(),
        };
        me.restart()?;
        Ok(me)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL: a crash, not a shutdown).
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Starts it again on the same port (killing it first if running).
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e}"))?;
        self.child
            .listening(child, "redis-server", self.port, Duration::from_secs(10))
    }
}

/// A single-member `etcd` (Debian's `etcd-server`) of the test's own, on
/// free loopback ports with a temporary data directory; it can be stopped
/// (SIGKILL) and started again on the same ports and data.
pub struct EtcdProcess {
    /// Its client port.
    pub port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    child: Owned,
}

impl EtcdProcess {
    /// Starts one; `Err` if `etcd` is not installed or won't start.
    pub fn start() -> Result<Self, String> {
        let mut me = Self {
            port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            child: Owned::default(),
        };
        me.restart()?;
        Ok(me)
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL).
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Starts it again on the same ports and data (killing it first if
    /// running).
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("etcd: {e}"))?;
        self.child
            .listening(child, "etcd", self.port, Duration::from_secs(15))
    }

    /// Runs `etcdctl` (v3 API) against it; its stdout, or why it failed.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.url()])
            .args(args)
            .output()
            .map_err(|e| format!("etcdctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

/// A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free port, run as
/// the `postgres` system user when the tests run as root. Trust auth.
pub struct PostgresCluster {
    /// Its port.
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    running: bool,
}

impl PostgresCluster {
    /// Creates and starts one; `Err` if the PostgreSQL server binaries are
    /// not installed.
    pub fn start() -> Result<Self, String> {
        let bin = pg_bin_dir().ok_or("no PostgreSQL server binaries (initdb) found")?;
        let dir = tempfile::Builder::new()
            .prefix("nearby-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let me = Self {
            port: free_port(),
            dir,
            bin,
            running: false,
        };
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(me.dir.path())
                .status()
                .map_err(|e| e.to_string())?;
            if !ok.success() {
                return Err("chown to postgres failed".into());
            }
        }
        let data = me.data();
        me.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        )?;
        let mut me = me;
        me.restart()?;
        Ok(me)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{tool}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops it immediately (`pg_ctl stop -m immediate`).
    pub fn stop(&mut self) -> Result<(), String> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        self.run(
            "pg_ctl",
            &["stop", "-D", &self.data(), "-m", "immediate", "-w"],
        )
    }

    /// Starts it (again) on the same port.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop()?;
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.run(
            "pg_ctl",
            &["start", "-D", &self.data(), "-l", &log, "-o", &opts, "-w"],
        )?;
        self.running = true;
        Ok(())
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn pg_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

//! `nearby`: the nearby-friends backend in one binary.
//!
//! The binary parses configuration, picks the adapters and calls
//! [`nearby_server::serve`]; it holds no logic of its own.
#![forbid(unsafe_code)]

mod config;
mod demo;
mod import;
mod ring;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nearby_hub::Bus;
use nearby_ports::{HistoryStore, LocationCache, PubSub, UserStore};
use nearby_server::state::now_ms;
use nearby_server::{AppState, Backends};
use nearby_store_memory::MemoryCache;
use nearby_store_sqlite::{SqliteHistoryStore, SqliteUserStore};
use tracing_subscriber::EnvFilter;

use crate::config::ServeArgs;

/// Live "nearby friends" backend: REST API + WebSocket, embedded storage.
#[derive(Parser)]
#[command(name = "nearby", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (REST + WebSocket): embedded storage in --data-dir, or Redis and PostgreSQL.
    Serve(Box<ServeArgs>),
    /// Load a running server with simulated users over WebSockets and measure latency and throughput.
    Bench(Box<nearby_bench::BenchArgs>),
    /// Talk to a running server: sign up, log in, manage friends, watch the live feed, move.
    Client(nearby_client::cli::ClientArgs),
    /// Run a server with a demo login and simulated friends walking around Seoul.
    Demo(demo::DemoArgs),
    /// Manage the ring of Redis pub/sub servers in etcd: join a server, list, remove.
    Ring(ring::RingArgs),
    /// Drain a running node: the same as sending it SIGTERM (see docs/operations.md, "Draining").
    Drain(DrainArgs),
}

#[derive(clap::Args)]
struct DrainArgs {
    /// Process id of the `nearby serve` to drain.
    #[arg(long)]
    pid: i32,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Every WebSocket is a file descriptor, and the usual soft limit (1024
    // from systemd and most shells) would cap a node, or a bench process, at
    // about a thousand connections: raise it to the hard limit, which needs
    // no privilege. Before the runtime, so its threads share the new limit.
    let nofile = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // One line with the whole cause chain, not a backtrace: these are
    // configuration and environment errors a person has to read.
    match runtime.block_on(run(cli, nofile)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, nofile: std::io::Result<u64>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: a log file or a
        // journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match nofile {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    match cli.cmd {
        Cmd::Serve(args) => serve(*args).await,
        Cmd::Bench(args) => {
            let import = import::StoreImport::for_bench(
                args.bulk_sqlite.as_deref(),
                args.bulk_postgres.as_deref(),
            )
            .await?;
            nearby_bench::main(*args, import).await.map_err(Into::into)
        }
        Cmd::Client(args) => nearby_client::cli::run(args).await.map_err(Into::into),
        Cmd::Demo(args) => demo::run(args).await,
        Cmd::Ring(args) => ring::run(args).await,
        Cmd::Drain(args) => {
            use nix::sys::signal::{kill, Signal};
            kill(nix::unistd::Pid::from_raw(args.pid), Signal::SIGTERM)
                .with_context(|| format!("signalling process {}", args.pid))?;
            println!("asked process {} to drain", args.pid);
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    serve_with(args.resolve()?, |_, _| {}).await
}

/// The embedded node's key of strangers' aliases: `stranger.key` in the
/// data dir, made (random, owner-only) on first start.
fn stranger_key(data_dir: &std::path::Path) -> anyhow::Result<String> {
    use rand::RngCore;
    let path = data_dir.join("stranger.key");
    match std::fs::read_to_string(&path) {
        Ok(key) if key.trim().len() >= 16 => return Ok(key.trim().to_owned()),
        Ok(_) => anyhow::bail!(
            "{} is too short; delete it to make a new one",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let key: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    std::io::Write::write_all(
        &mut opts
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?,
        key.as_bytes(),
    )?;
    Ok(key)
}

/// Runs the server on resolved settings until SIGTERM or Ctrl-C.
/// `on_listening` is called once the socket is bound (`nearby demo` starts
/// its simulated users there).
async fn serve_with(
    s: config::Settings,
    on_listening: impl FnOnce(std::net::SocketAddr, &AppState),
) -> anyhow::Result<()> {
    let (users, history): (Arc<dyn UserStore>, Arc<dyn HistoryStore>) = match &s.database {
        Some((url, max)) => {
            let (users, history) = nearby_store_postgres::connect(url, *max)
                .await
                .context("connecting to PostgreSQL")?;
            let h = history.clone();
            tokio::spawn(hourly("history partition upkeep", move || {
                let h = h.clone();
                async move { h.ensure_partitions(now_ms()).await.map(|()| 0) }
            }));
            (Arc::new(users), Arc::new(history))
        }
        None => {
            std::fs::create_dir_all(&s.data_dir)
                .with_context(|| format!("creating data dir {}", s.data_dir.display()))?;
            let users = SqliteUserStore::open(&s.data_dir.join("users.db"))
                .await
                .context("opening users.db")?;
            let history = SqliteHistoryStore::open(&s.data_dir.join("history.db"))
                .await
                .context("opening history.db")?;
            (Arc::new(users), Arc::new(history))
        }
    };
    if let Some(days) = std::num::NonZeroU32::new(s.server.history_retention_days) {
        let h = history.clone();
        let keep_ms = i64::from(days.get()) * 86_400_000;
        tokio::spawn(hourly("history retention", move || {
            let h = h.clone();
            async move {
                let pruned = h.prune(now_ms() - keep_ms).await?;
                Ok(pruned.rows + pruned.partitions)
            }
        }));
    }
    let u = users.clone();
    tokio::spawn(hourly("expired token purge", move || {
        let u = u.clone();
        async move { u.purge_expired_tokens(now_ms()).await }
    }));
    let (cache, bus): (Arc<dyn LocationCache>, Arc<dyn PubSub>) = match &s.redis {
        Some(cfg) => {
            let cache: Arc<dyn LocationCache> = if s.cache_urls.len() > 1 {
                nearby_store_redis::ShardedCache::connect(cfg, &s.cache_urls)
                    .await
                    .context("connecting to the Redis cache servers")?
            } else {
                nearby_store_redis::connect_cache(cfg)
                    .await
                    .context("connecting to Redis")?
            };
            (cache, ring::bus(cfg, &s.pubsub).await?)
        }
        None => {
            let sweep = s.server.location_ttl.min(Duration::from_secs(10));
            (MemoryCache::new(sweep), Arc::new(Bus::in_process()))
        }
    };
    let backends = Backends {
        users,
        history,
        cache,
        bus,
    };
    let mut server = s.server.clone();
    if server.stranger_secret.is_none() {
        if s.redis.is_none() {
            // One node (its bus is in-process): its own key, kept in its
            // data dir, so aliases hold across restarts.
            std::fs::create_dir_all(&s.data_dir)
                .with_context(|| format!("creating data dir {}", s.data_dir.display()))?;
            server.stranger_secret = Some(stranger_key(&s.data_dir)?);
        } else {
            tracing::warn!(
                "no --stranger-secret: strangers' aliases use a random key per node, \
                 so a viewer who reconnects to another node sees new ones; give every node the same"
            );
        }
    }
    let state = AppState::new(server, backends)?;

    let listener = tokio::net::TcpListener::bind(s.listen)
        .await
        .with_context(|| format!("binding {}", s.listen))?;
    let addr = listener.local_addr()?;
    // Scripts and tests read this line to learn the port when --listen ends in :0.
    println!("nearby listening on http://{addr}");
    let storage = if s.database.is_some() {
        "postgres".to_owned()
    } else {
        format!("sqlite in {}", s.data_dir.display())
    };
    let live = match (&s.redis, &s.pubsub) {
        (None, _) => "in-process",
        (Some(_), config::Pubsub::Single) => "redis",
        (Some(_), config::Pubsub::Static { .. }) => "redis, bus on a static ring",
        (Some(_), config::Pubsub::Etcd { .. }) => "redis, bus on a ring from etcd",
    };
    tracing::info!(%addr, %storage, cache_and_bus = live, radius_m = s.server.radius_m, "serving");
    on_listening(addr, &state);

    let st = state.clone();
    tokio::spawn(async move {
        // The first SIGTERM (or Ctrl-C) drains; a second one stops at once.
        wait_for_signal().await;
        nearby_server::drain(&st, wait_for_signal()).await;
    });
    nearby_server::serve(listener, state, s.grace).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Runs a maintenance job now and every hour; failures are logged and
/// retried at the next tick.
async fn hourly<F, Fut>(what: &'static str, job: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<u64, nearby_ports::StoreError>>,
{
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        match job().await {
            Ok(n) if n > 0 => tracing::info!(job = what, affected = n, "maintenance done"),
            Ok(_) => {}
            Err(e) => tracing::warn!(job = what, error = %e, "maintenance failed"),
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

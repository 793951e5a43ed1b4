//! `nearby`: the nearby-friends backend in one binary.
//!
//! The binary parses configuration, picks the adapters and calls
//! [`nearby_server::serve`]; it holds no logic of its own.
#![forbid(unsafe_code)]

mod config;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nearby_server::{AppState, Backends};
use nearby_store_memory::{MemoryBus, MemoryCache};
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
    /// Run the server (REST + WebSocket) with embedded storage in --data-dir.
    Serve(ServeArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // One line with the whole cause chain, not a backtrace: these are
    // configuration and environment errors a person has to read.
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Serve(args) => serve(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let s = args.resolve()?;
    std::fs::create_dir_all(&s.data_dir)
        .with_context(|| format!("creating data dir {}", s.data_dir.display()))?;
    let users = Arc::new(
        SqliteUserStore::open(&s.data_dir.join("users.db"))
            .await
            .context("opening users.db")?,
    );
    let history = SqliteHistoryStore::open(&s.data_dir.join("history.db"))
        .await
        .context("opening history.db")?;
    let sweep = s.server.location_ttl.min(Duration::from_secs(10));
    let backends = Backends {
        users: users.clone(),
        history: Arc::new(history),
        cache: MemoryCache::new(sweep),
        bus: Arc::new(MemoryBus::new()),
    };
    let state = AppState::new(s.server.clone(), backends)?;
    tokio::spawn(purge_tokens(users));

    let listener = tokio::net::TcpListener::bind(s.listen)
        .await
        .with_context(|| format!("binding {}", s.listen))?;
    let addr = listener.local_addr()?;
    // Scripts and tests read this line to learn the port when --listen ends in :0.
    println!("nearby listening on http://{addr}");
    tracing::info!(%addr, data_dir = %s.data_dir.display(), radius_m = s.server.radius_m, "serving with embedded storage");

    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining");
        shutdown.cancel();
    });
    nearby_server::serve(listener, state, s.grace).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Expired tokens are refused on read; this only keeps the table small.
async fn purge_tokens(users: Arc<SqliteUserStore>) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        match users.purge_expired_tokens(now).await {
            Ok(n) if n > 0 => tracing::info!(purged = n, "expired tokens removed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "token purge failed"),
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

//! The ring of Redis pub/sub servers: `nearby ring join|list|leave`, and the
//! bus a node builds from `--pubsub-redis-urls` or `--etcd`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use nearby_hub::{Bus, Hub};
use nearby_ports::{LocationCache, PubSub};
use nearby_store_redis::{Member, RedisConfig, RingBroker};
use tokio::sync::mpsc;

use crate::config::Pubsub;

/// `nearby ring`.
#[derive(Debug, Args)]
pub struct RingArgs {
    #[command(subcommand)]
    cmd: RingCmd,
}

#[derive(Debug, Subcommand)]
enum RingCmd {
    /// Register one Redis pub/sub server in the ring and keep it there while it answers PING; SIGTERM or Ctrl-C removes it.
    Join(JoinArgs),
    /// Print the ring's members, one `NAME URL` per line.
    List(EtcdArgs),
    /// Remove a member from the ring.
    Leave(LeaveArgs),
}

#[derive(Debug, Args)]
struct EtcdArgs {
    /// etcd endpoints, comma-separated (`http://host:port`).
    #[arg(long, env = "NEARBY_ETCD")]
    etcd: String,
    /// Key prefix of the ring in etcd.
    #[arg(long, env = "NEARBY_ETCD_PREFIX", default_value = nearby_etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
}

#[derive(Debug, Args)]
struct JoinArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The Redis server to register (`redis://host:port`).
    #[arg(long)]
    redis_url: String,
    /// Its ring name [default: the URL's host:port]. Keep it stable across restarts: channels are placed by name.
    #[arg(long)]
    name: Option<String>,
    /// Seconds the registration outlives its agent or its server [default: 5].
    #[arg(long, default_value_t = 5)]
    lease_ttl_secs: u64,
}

#[derive(Debug, Args)]
struct LeaveArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The member to remove.
    #[arg(long)]
    name: String,
}

async fn registry(a: &EtcdArgs) -> anyhow::Result<nearby_etcd::Registry> {
    nearby_etcd::Registry::connect(&crate::config::split_urls(&a.etcd), &a.etcd_prefix)
        .await
        .with_context(|| format!("connecting to etcd at {}", a.etcd))
}

/// Runs `nearby ring …`.
pub async fn run(args: RingArgs) -> anyhow::Result<()> {
    match args.cmd {
        RingCmd::List(a) => {
            let (members, _) = registry(&a).await?.list().await?;
            for m in members {
                println!("{} {}", m.name, m.url);
            }
            Ok(())
        }
        RingCmd::Leave(a) => {
            if registry(&a.etcd).await?.leave(&a.name).await? {
                println!("{} left the ring", a.name);
                Ok(())
            } else {
                anyhow::bail!("{} is not a member of the ring", a.name)
            }
        }
        RingCmd::Join(a) => join(a).await,
    }
}

async fn join(a: JoinArgs) -> anyhow::Result<()> {
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| nearby_etcd::default_name(&a.redis_url));
    nearby_etcd::validate_name(&name)?;
    nearby_etcd::validate_url(&a.redis_url)?;
    anyhow::ensure!(
        (1..=3600).contains(&a.lease_ttl_secs),
        "lease_ttl_secs must be between 1 and 3600"
    );
    let mut cfg = RedisConfig::new(a.redis_url.clone());
    cfg.pool_size = 1;
    cfg.command_timeout = Duration::from_secs(1);
    let redis = nearby_store_redis::connect_cache(&cfg)
        .await
        .with_context(|| format!("connecting to {}", a.redis_url))?;
    let healthy = || {
        let redis = redis.clone();
        async move {
            let ping = tokio::time::timeout(Duration::from_secs(1), redis.ping());
            matches!(ping.await, Ok(Ok(())))
        }
    };
    let mut reg = registry(&a.etcd).await?;
    // Scripts wait for this line.
    println!("joining the ring as {name} ({})", a.redis_url);
    reg.join(
        &name,
        &a.redis_url,
        Duration::from_secs(a.lease_ttl_secs),
        healthy,
        crate::wait_for_signal(),
    )
    .await?;
    Ok(())
}

/// The bus of a node with Redis: one server, or a ring.
pub async fn bus(cfg: &RedisConfig, pubsub: &Pubsub) -> anyhow::Result<Arc<dyn PubSub>> {
    match pubsub {
        Pubsub::Single => {
            let (bus, _) = nearby_store_redis::connect_bus(cfg)
                .await
                .context("connecting to Redis")?;
            Ok(bus)
        }
        Pubsub::Static { urls, handover } => {
            let members = urls
                .iter()
                .map(|u| Member {
                    name: u.clone(),
                    url: u.clone(),
                })
                .collect();
            let hub = Arc::new(Hub::default());
            let ring = RingBroker::start(cfg, *handover, hub.clone(), members).await;
            anyhow::ensure!(
                !ring.members().is_empty(),
                "no pub/sub server of --pubsub-redis-urls answers"
            );
            Ok(Arc::new(Bus::new(hub, ring)))
        }
        Pubsub::Etcd {
            endpoints,
            prefix,
            handover,
        } => {
            let hub = Arc::new(Hub::default());
            let ring = RingBroker::start(cfg, *handover, hub.clone(), Vec::new()).await;
            let (tx, mut rx) = mpsc::channel(16);
            tokio::spawn(nearby_etcd::follow(endpoints.clone(), prefix.clone(), tx));
            // Start on the ring etcd has now, if it answers soon; otherwise
            // serve (not ready) until it does.
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(nearby_etcd::Event::Members(m))) => {
                    ring.set_members(convert(m)).await;
                }
                _ => tracing::warn!("etcd did not answer at start; not ready until it does"),
            }
            let r = ring.clone();
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    match ev {
                        nearby_etcd::Event::Members(m) => {
                            tracing::info!(members = m.len(), "ring membership from etcd");
                            r.set_members(convert(m)).await;
                        }
                        nearby_etcd::Event::Stale(stale) => r.set_stale(stale),
                    }
                }
            });
            Ok(Arc::new(Bus::new(hub, ring)))
        }
    }
}

fn convert(members: Vec<nearby_etcd::Member>) -> Vec<Member> {
    members
        .into_iter()
        .map(|m| Member {
            name: m.name,
            url: m.url,
        })
        .collect()
}

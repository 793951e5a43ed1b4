//! `nearby demo`: the embedded server with a world to look at. It signs up
//! `demo` and a few friends of theirs, and the friends walk around Seoul as
//! ordinary clients (REST and WebSocket through `nearby-client`, like any
//! phone), some out of the nearby radius and back. Log in as `demo` from the
//! browser client at `/` or with `nearby client` to watch them.
//!
//! `demo` is placed at Seoul City Hall, and kept at its latest position
//! while nothing else reports one, so their friends see them and a new
//! connection's snapshot is never empty for lack of their own location.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use nearby_client::{Client, ClientError, UserId};
use nearby_server::state::now_ms;
use rand::Rng;

use crate::config::ServeArgs;

/// Options of `nearby demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Keep the accounts here and reuse them next time [default: a temporary directory, deleted on exit].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// How many simulated friends walk around.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(1..=8))]
    friends: u8,
    /// The page's street-map tiles, a URL template with {z}, {x}, {y}; "" shows only the radar view [default: OpenStreetMap's].
    #[arg(long, env = "NEARBY_TILE_URL")]
    tile_url: Option<String>,
}

/// Where `demo` stands until told otherwise: Seoul City Hall.
const CITY_HALL: (f64, f64) = (37.5665, 126.9780);

/// Time between two location updates of a walker until the server
/// suggests one (the snapshot's `interval_ms`, then `interval` frames,
/// which the walkers follow like any client of ours).
const STEP: Duration = Duration::from_secs(2);

/// A simulated friend: a name, a speed (demo time runs fast) and a loop of
/// waypoints (latitude, longitude).
struct Walker {
    name: &'static str,
    speed_mps: f64,
    route: &'static [(f64, f64)],
}

const GYEONGBOKGUNG: (f64, f64) = (37.5796, 126.9770);
const INSADONG: (f64, f64) = (37.5740, 126.9850);
const MYEONGDONG: (f64, f64) = (37.5636, 126.9827);
const NAMSAN_TOWER: (f64, f64) = (37.5512, 126.9882);
const ITAEWON: (f64, f64) = (37.5345, 126.9946);
const HONGDAE: (f64, f64) = (37.5563, 126.9236);
const YEOUIDO: (f64, f64) = (37.5219, 126.9245);
const DONGDAEMUN: (f64, f64) = (37.5663, 127.0092);
const SEONGSU: (f64, f64) = (37.5446, 127.0557);
// Both beyond the default 8 km radius from City Hall: friends going there
// leave the list (`out_of_range`) and come back.
const GANGNAM: (f64, f64) = (37.4979, 127.0276);
const JAMSIL: (f64, f64) = (37.5133, 127.1000);
const SEOUL_STATION: (f64, f64) = (37.5547, 126.9707);
const DAEHANGNO: (f64, f64) = (37.5822, 127.0020);

const WALKERS: [Walker; 8] = [
    Walker {
        name: "minji",
        speed_mps: 12.0,
        route: &[CITY_HALL, GYEONGBOKGUNG, INSADONG, MYEONGDONG],
    },
    Walker {
        name: "jisoo",
        speed_mps: 15.0,
        route: &[MYEONGDONG, NAMSAN_TOWER, ITAEWON, SEOUL_STATION],
    },
    Walker {
        name: "hyunwoo",
        speed_mps: 25.0,
        route: &[HONGDAE, YEOUIDO, SEOUL_STATION],
    },
    Walker {
        name: "seojun",
        speed_mps: 30.0,
        route: &[DONGDAEMUN, SEONGSU, GANGNAM, ITAEWON],
    },
    Walker {
        name: "yuna",
        speed_mps: 40.0,
        route: &[INSADONG, JAMSIL, DONGDAEMUN],
    },
    Walker {
        name: "doyoon",
        speed_mps: 10.0,
        route: &[DAEHANGNO, INSADONG, CITY_HALL],
    },
    Walker {
        name: "seoyeon",
        speed_mps: 20.0,
        route: &[YEOUIDO, NAMSAN_TOWER, HONGDAE],
    },
    Walker {
        name: "haneul",
        speed_mps: 35.0,
        route: &[GANGNAM, JAMSIL, SEONGSU, CITY_HALL],
    },
];

/// Runs the demo until SIGTERM or Ctrl-C.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let temp = match args.data_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("nearby-demo-")
                .tempdir()
                .context("creating a temporary data dir")?,
        ),
    };
    let data_dir = match (&args.data_dir, &temp) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_owned(),
        (None, None) => anyhow::bail!("no data dir"),
    };
    let mut settings = ServeArgs {
        listen: Some(args.listen),
        data_dir: Some(data_dir.clone()),
        // A single local node with nobody to hand its clients to: Ctrl-C
        // tells every session at once instead of spreading a drain.
        drain_secs: Some(0),
        tile_url: args.tile_url,
        ..ServeArgs::default()
    }
    .resolve()?;
    settings.server.demo = true; // the page says how to log in
    let ttl = settings.server.location_ttl;
    let friends = usize::from(args.friends);

    let failed = Arc::new(OnceLock::<String>::new());
    let failure = failed.clone();
    crate::serve_with(settings, move |addr, state| {
        let stop = state.shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = populate(addr, &data_dir, friends, ttl).await {
                let _ = failure.set(e.to_string());
                stop.cancel();
            }
        });
    })
    .await?;
    drop(temp);
    match failed.get() {
        Some(e) => anyhow::bail!("demo setup failed: {e}"),
        None => Ok(()),
    }
}

/// Creates the accounts and friendships, places `demo`, starts the walkers
/// and prints how to log in.
async fn populate(
    addr: SocketAddr,
    data_dir: &Path,
    friends: usize,
    ttl: Duration,
) -> Result<(), ClientError> {
    let base = format!("http://{}", reachable(addr));
    let password = password(data_dir)?;
    let anonymous = Client::new(&base)?;
    let (demo, demo_id) = account(&anonymous, "demo", &password).await?;
    let mut names = Vec::new();
    for (i, w) in WALKERS.iter().take(friends).enumerate() {
        let (client, id) = account(&anonymous, w.name, &password).await?;
        // They ask, demo accepts (both calls are no-ops on a second run).
        client.request_friend(demo_id).await?;
        demo.request_friend(id).await?;
        let phase = STEP * u32::try_from(i).unwrap_or(0) / 8;
        tokio::spawn(walk(client, w, phase));
        names.push(w.name);
    }
    place(&demo, CITY_HALL).await?;
    tokio::spawn(keep_placed(demo, ttl));

    println!("demo login: username demo, password {password}");
    println!("  browser:  {base}/");
    println!("  terminal: nearby client --server {base} login demo {password}");
    println!("            nearby client watch");
    println!(
        "{} friends of demo walk around Seoul (same password): {}",
        names.len(),
        names.join(", ")
    );
    println!(
        "demo stands at Seoul City Hall ({}, {}) until you send a location. Ctrl-C stops.",
        CITY_HALL.0, CITY_HALL.1
    );
    Ok(())
}

/// The address to call the server at: loopback if it listens on all interfaces.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// The demo accounts' password: made up on the first run, kept in the data
/// dir so a kept `--data-dir` logs in again next time.
fn password(data_dir: &Path) -> Result<String, ClientError> {
    let file = data_dir.join("demo-password.txt");
    let io = |e: std::io::Error| ClientError::Config {
        path: file.display().to_string(),
        detail: e.to_string(),
    };
    match std::fs::read_to_string(&file) {
        Ok(p) if p.trim().len() >= 8 => return Ok(p.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let p: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(12)
        .map(char::from)
        .collect();
    std::fs::write(&file, format!("{p}\n")).map_err(io)?;
    Ok(p)
}

/// Signs `name` up (or finds them there from an earlier run) and logs in.
async fn account(
    anonymous: &Client,
    name: &str,
    password: &str,
) -> Result<(Client, UserId), ClientError> {
    match anonymous.sign_up(name, password).await {
        Ok(_) => {}
        Err(e) if e.api_code() == Some("username_taken") => {}
        Err(e) => return Err(e),
    }
    let login = anonymous.log_in(name, password).await?;
    Ok((anonymous.clone().with_token(login.token), login.user_id))
}

/// Reports `at` as the user's location over a short-lived connection.
async fn place(client: &Client, at: (f64, f64)) -> Result<(), ClientError> {
    let mut live = client.connect().await?;
    live.recv().await?; // the snapshot
    live.send_location(at.0, at.1).await?;
    live.close().await;
    Ok(())
}

/// Re-sends `demo`'s latest location when it is half-way to expiring, so
/// it stays put (and visible to friends) while no client of theirs reports.
async fn keep_placed(demo: Client, ttl: Duration) {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval((ttl / 4).max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = now_ms();
        let points = match demo.history(Some(now.saturating_sub(ttl_ms)), None).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "demo: cannot read demo's history");
                continue;
            }
        };
        let last = points.last();
        if last.is_some_and(|p| now.saturating_sub(p.ts) < ttl_ms / 2) {
            continue;
        }
        let at = last.map_or(CITY_HALL, |p| (p.lat, p.lon));
        if let Err(e) = place(&demo, at).await {
            tracing::debug!(error = %e, "demo: cannot refresh demo's location");
        }
    }
}

/// One simulated friend: connects, reports a position along its route at
/// the interval the server suggests, reads (and otherwise ignores) what the
/// server sends, and reconnects with backoff when the connection drops.
async fn walk(client: Client, w: &'static Walker, phase: Duration) {
    tokio::time::sleep(phase).await;
    let mut pos = w.route[0];
    let mut leg = 1 % w.route.len();
    // The protocol's rule (docs/protocol.md, "Reconnecting").
    let mut backoff = nearby_client::backoff::Backoff::default();
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::time::sleep(backoff.next_random_delay()).await;
        }
        let mut live = match client.connect().await {
            Ok(l) => l,
            Err(e) if e.is_retryable() => {
                tracing::debug!(walker = w.name, error = %e, "demo: reconnecting");
                backoff.failed();
                continue;
            }
            Err(e) => {
                tracing::warn!(walker = w.name, error = %e, "demo: walker stopped");
                return;
            }
        };
        backoff.connected();
        let mut every = STEP;
        let mut tick = tokio::time::interval(every);
        let ended = loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = live.send_location(pos.0, pos.1).await {
                        break e;
                    }
                    (pos, leg) = advance(pos, leg, w.route, w.speed_mps * every.as_secs_f64());
                }
                r = live.recv() => match r {
                    Ok(inc) => {
                        use nearby_proto::ws::ServerFrame;
                        match inc.frame {
                            Some(ServerFrame::Error {
                                reconnect_after_ms: Some(ms),
                                ..
                            }) => backoff.server_asked(ms),
                            Some(ServerFrame::Snapshot {
                                interval_ms: Some(ms),
                                ..
                            })
                            | Some(ServerFrame::Interval { interval_ms: ms }) => {
                                let new = Duration::from_millis(u64::from(ms));
                                if new != every {
                                    every = new;
                                    tick = tokio::time::interval_at(
                                        tokio::time::Instant::now() + every,
                                        every,
                                    );
                                }
                            }
                            _ => {}
                        }
                    }
                    Err(e) => break e,
                },
            }
        };
        if !ended.is_retryable() {
            tracing::warn!(walker = w.name, error = %ended, "demo: walker stopped");
            return;
        }
    }
}

/// Moves `step_m` metres from `pos` towards `route[leg]`, turning to the
/// next waypoint on arrival. Flat-earth maths: fine within a city.
fn advance(pos: (f64, f64), leg: usize, route: &[(f64, f64)], step_m: f64) -> ((f64, f64), usize) {
    const M_PER_DEG: f64 = 111_195.0;
    let Some(&target) = route.get(leg) else {
        return (pos, 0);
    };
    let north = (target.0 - pos.0) * M_PER_DEG;
    let east = (target.1 - pos.1) * M_PER_DEG * pos.0.to_radians().cos();
    let dist = north.hypot(east);
    if dist <= step_m {
        (target, (leg + 1) % route.len())
    } else {
        let f = step_m / dist;
        (
            (
                pos.0 + (target.0 - pos.0) * f,
                pos.1 + (target.1 - pos.1) * f,
            ),
            leg,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walkers_follow_their_route_in_steps_of_the_right_length() {
        let route = [CITY_HALL, GYEONGBOKGUNG];
        let (p, leg) = advance(CITY_HALL, 1, &route, 100.0);
        assert_eq!(leg, 1);
        let d = flat_distance(CITY_HALL, p);
        assert!((d - 100.0).abs() < 1.0, "{d}");
        let (p, leg) = advance(p, 1, &route, 10_000.0);
        assert_eq!((p, leg), (GYEONGBOKGUNG, 0));
    }

    #[test]
    fn the_routes_leave_and_re_enter_the_default_radius() {
        let far = [GANGNAM, JAMSIL]
            .iter()
            .all(|&p| flat_distance(CITY_HALL, p) > 8047.0);
        assert!(far);
        // The default five start within sight of demo.
        for w in &WALKERS[..5] {
            assert!(flat_distance(CITY_HALL, w.route[0]) < 8047.0, "{}", w.name);
        }
    }

    /// Equirectangular distance, close to haversine at city scale.
    fn flat_distance(a: (f64, f64), b: (f64, f64)) -> f64 {
        let north = (b.0 - a.0) * 111_195.0;
        let east = (b.1 - a.1) * 111_195.0 * a.0.to_radians().cos();
        north.hypot(east)
    }
}

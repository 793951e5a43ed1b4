//! `nearby client …`: the command line over [`Client`] and [`Live`].
//!
//! Which server and which token: `--server` (or `NEARBY_SERVER`), else the
//! server saved by `login`, else `http://127.0.0.1:8080`; `--token` (or
//! `NEARBY_TOKEN`), else the saved token, but only if it was issued by that
//! same server. Output is one line per result or frame, for people, or with
//! `--json` the server's JSON exactly as received, one document per line.

mod show;

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use nearby_core::{FriendStatus, Precision, UserId};
use nearby_geo::Point;
use nearby_proto::rest::SharingUpdate;
use nearby_proto::ws::ServerFrame;
use tokio::time::Instant;

use crate::config::{ConfigFile, Saved};
use crate::live::{Incoming, Live};
use crate::{Client, ClientError};
use show::Names;

/// The server used when none is given or saved.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// How long to wait for the snapshot after connecting.
const FIRST_FRAME: Duration = Duration::from_secs(10);

/// Options of `nearby client`.
#[derive(Debug, Args)]
#[command(
    after_help = "The login is kept in $NEARBY_CLIENT_CONFIG, else ~/.config/nearby/client.json."
)]
pub struct ClientArgs {
    /// Server URL, or $NEARBY_SERVER [default: the one saved by `login`, else http://127.0.0.1:8080].
    #[arg(long, env = "NEARBY_SERVER", hide_env = true, global = true)]
    pub server: Option<String>,
    /// Bearer token to use instead of the saved login, or $NEARBY_TOKEN.
    #[arg(long, env = "NEARBY_TOKEN", hide_env = true, global = true)]
    pub token: Option<String>,
    /// Print the server's JSON as received, one document per line.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub cmd: ClientCmd,
}

/// The subcommands of `nearby client`.
#[derive(Debug, Subcommand)]
pub enum ClientCmd {
    /// Create an account (the password is read from stdin if not given).
    Signup {
        /// 3–32 of a-z A-Z 0-9 _ - .
        username: String,
        /// 8–128 characters.
        password: Option<String>,
    },
    /// Log in and save the token and server for the other commands.
    Login {
        /// Your username.
        username: String,
        /// Your password (read from stdin if not given).
        password: Option<String>,
    },
    /// Revoke the saved token and forget it.
    Logout,
    /// List, add, accept or remove friends.
    #[command(subcommand)]
    Friends(FriendsCmd),
    /// Share your location with a friend, or stop.
    Share {
        /// on or off.
        state: OnOff,
        /// The friend's username.
        name: String,
        /// Stop by itself after this long (`90s`, `30m`, `2h`, `1d`); only with `on`.
        #[arg(long = "for", value_parser = parse_span, value_name = "SPAN")]
        span: Option<Duration>,
        /// Let them see only an approximate position (which ~3 km cell you are in).
        #[arg(long, conflicts_with = "precise")]
        approximate: bool,
        /// Let them see your exact distance again.
        #[arg(long)]
        precise: bool,
    },
    /// Ghost mode: hide from every friend at once (`on`, optionally `--for`
    /// a while), be seen again (`off`), or show it (`status`).
    Ghost {
        /// on, off or status.
        state: GhostState,
        /// End by itself after this long (`90s`, `30m`, `2h`, `1d`); only with `on`.
        #[arg(long = "for", value_parser = parse_span, value_name = "SPAN")]
        span: Option<Duration>,
    },
    /// Strangers nearby: be shown to (and shown) discoverable strangers
    /// around you, as an alias and a distance band (`on`, optionally
    /// `--for` a while), vanish from them (`off`), or show it (`status`).
    Discoverable {
        /// on, off or status.
        state: GhostState,
        /// End by itself after this long (`90s`, `30m`, `2h`, `1d`); only with `on`.
        #[arg(long = "for", value_parser = parse_span, value_name = "SPAN")]
        span: Option<Duration>,
    },
    /// Your own location history: print it, export it, or delete it.
    History {
        /// How many days back [default: 1].
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: u32,
        /// Print it as GeoJSON (a FeatureCollection of points).
        #[arg(long, conflicts_with = "delete")]
        geojson: bool,
        /// Delete all of it instead.
        #[arg(long)]
        delete: bool,
    },
    /// Delete your account and everything tied to it (asks for the password on stdin if not given).
    DeleteAccount {
        /// Your username (confirms it, with the password).
        username: String,
        /// Your password.
        #[arg(long)]
        password: Option<String>,
    },
    /// Print the live feed of nearby friends until Ctrl-C.
    Watch,
    /// Report one location and print what comes back for a moment.
    #[command(allow_negative_numbers = true)]
    Move {
        /// Latitude, degrees.
        lat: f64,
        /// Longitude, degrees.
        lon: f64,
        /// How long to print frames after sending, milliseconds.
        #[arg(long, default_value_t = 1000)]
        wait_ms: u64,
    },
    /// Walk in a straight line, sending a location at every step.
    Walk {
        /// Start, as LAT,LON.
        #[arg(long, allow_hyphen_values = true)]
        from: LatLon,
        /// End, as LAT,LON.
        #[arg(long, allow_hyphen_values = true)]
        to: LatLon,
        /// Steps from start to end (steps + 1 locations are sent).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        steps: u32,
        /// Time between two locations, milliseconds [default: the interval the server suggests, which is slow while nobody who can see you is near].
        #[arg(long)]
        interval_ms: Option<u64>,
        /// How long to print frames after the last step, milliseconds.
        #[arg(long, default_value_t = 1000)]
        wait_ms: u64,
    },
}

/// `nearby client friends …`.
#[derive(Debug, Subcommand)]
pub enum FriendsCmd {
    /// Your friends and pending requests.
    List,
    /// Ask someone to be your friend (accepts if they asked you first).
    Add {
        /// Their username.
        name: String,
    },
    /// Accept a friend request.
    Accept {
        /// The username of who asked.
        name: String,
    },
    /// Unfriend, decline a request, or cancel yours.
    Remove {
        /// Their username.
        name: String,
    },
}

/// Walk steps when neither `--interval-ms` nor the server says (an older
/// server), milliseconds.
const WALK_INTERVAL_MS: u64 = 1000;

/// `90s`, `30m`, `2h`, `1d`: a positive whole number and a unit.
fn parse_span(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit, like 30m"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    if n == 0 {
        return Err(format!("{s:?}: must be more than nothing"));
    }
    n.checked_mul(secs)
        .filter(|t| *t <= 10 * 365 * 86_400)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?}: at most ten years"))
}

/// `ghost on|off|status`, `discoverable on|off|status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GhostState {
    /// Turn it on.
    On,
    /// Turn it off.
    Off,
    /// Show whether it is on.
    Status,
}

/// `share on|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Share.
    On,
    /// Stop sharing.
    Off,
}

/// A validated coordinate pair, written `LAT,LON`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatLon {
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
}

impl std::str::FromStr for LatLon {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (lat, lon) = s
            .split_once(',')
            .ok_or_else(|| format!("expected LAT,LON, got {s:?}"))?;
        let num = |t: &str| {
            t.trim()
                .parse::<f64>()
                .map_err(|_| format!("{:?} is not a number", t.trim()))
        };
        let (lat, lon) = (num(lat)?, num(lon)?);
        Point::new(lat, lon).map_err(|e| e.to_string())?;
        Ok(Self { lat, lon })
    }
}

/// Set once standard output is gone (e.g. `| head` exited): the command
/// then ends quietly instead of failing.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Runs one `nearby client` command.
pub async fn run(args: ClientArgs) -> Result<(), ClientError> {
    match execute(args).await {
        Err(ClientError::Output(_)) if STDOUT_CLOSED.load(Ordering::Relaxed) => Ok(()),
        // No login for a server that is down: say it is down, which is
        // what needs fixing first.
        Err(ClientError::NotLoggedIn { server }) => match Client::new(&server)?.healthz().await {
            Err(e @ ClientError::Unreachable { .. }) => Err(e),
            _ => Err(ClientError::NotLoggedIn { server }),
        },
        Err(ClientError::Api {
            status,
            code,
            message,
        }) if code == "unauthorized" => Err(ClientError::Api {
            status,
            code,
            message: format!("{message} (log in with `nearby client login USERNAME PASSWORD`)"),
        }),
        other => other,
    }
}

async fn execute(args: ClientArgs) -> Result<(), ClientError> {
    let file = ConfigFile::locate()?;
    // `login` replaces the file, so a damaged one must not stop it.
    let saved = match (file.load(), &args.cmd) {
        (Ok(s), _) => s,
        (Err(_), ClientCmd::Login { .. }) => None,
        (Err(e), _) => return Err(e),
    };
    let server = args
        .server
        .clone()
        .or_else(|| saved.as_ref().map(|s| s.server.clone()))
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
    let mut client = Client::new(&server)?;
    let token = args.token.clone().or_else(|| {
        saved
            .as_ref()
            .and_then(|s| s.token_for(&client.server()))
            .map(str::to_owned)
    });
    if let Some(t) = token {
        client = client.with_token(t);
    }
    let out = Out { json: args.json };

    match args.cmd {
        ClientCmd::Signup { username, password } => {
            let password = password_or_stdin(password)?;
            let user = client.sign_up(&username, &password).await?;
            out.value_or(&user, || {
                format!(
                    "signed up {} (id {}) on {}",
                    user.username,
                    user.id,
                    client.server()
                )
            })
        }
        ClientCmd::Login { username, password } => {
            let password = password_or_stdin(password)?;
            let created = client.log_in(&username, &password).await?;
            file.save(&Saved {
                server: client.server(),
                username: Some(username.clone()),
                user_id: Some(created.user_id.to_string()),
                token: Some(created.token.clone()),
                expires_at: Some(created.expires_at),
            })?;
            out.value_or(&created, || {
                format!(
                    "logged in as {username} on {}; token saved in {} (valid for {})",
                    client.server(),
                    file.path().display(),
                    duration_words(created.expires_at.saturating_sub(now_ms()))
                )
            })
        }
        ClientCmd::Logout => {
            let token = client.require_token()?.to_owned();
            let note = match client.log_out().await {
                Ok(()) => "logged out",
                // Expired or already revoked: nothing left to revoke.
                Err(e) if e.api_code() == Some("unauthorized") => {
                    "logged out (the token had already expired or been revoked)"
                }
                Err(e) => return Err(e),
            };
            if let Some(s) = saved.filter(|s| s.token.as_deref() == Some(token.as_str())) {
                file.save(&Saved {
                    server: s.server,
                    ..Saved::default()
                })?;
            }
            if out.json {
                Ok(())
            } else {
                out.line(note)
            }
        }
        ClientCmd::Friends(cmd) => friends(&client, &out, cmd).await,
        ClientCmd::Share {
            state,
            name,
            span,
            approximate,
            precise,
        } => {
            let enabled = state == OnOff::On;
            if span.is_some() && !enabled {
                return Err(ClientError::Invalid(
                    "--for goes with `share on` (sharing that is off has no end)".into(),
                ));
            }
            let user = client.user_by_name(&name).await?;
            let update = SharingUpdate {
                enabled,
                until: span.map(|d| now_ms().saturating_add(d.as_millis() as i64)),
                precision: match (approximate, precise) {
                    (true, _) => Some(Precision::Approximate),
                    (_, true) => Some(Precision::Precise),
                    _ => None,
                },
            };
            let answer = client.set_sharing(user.id, update).await?;
            out.value_or(&answer, || {
                let Some(true) = answer["sharing"].as_bool() else {
                    return format!("not sharing your location with {name} any more");
                };
                let mut line = format!("sharing your location with {name}");
                if answer["sharing_precision"] == "approximate" {
                    line.push_str(", approximately (which ~3 km cell you are in)");
                }
                if let Some(until) = answer["sharing_until"].as_i64() {
                    line.push_str(&format!(
                        ", for {}",
                        duration_words(until.saturating_sub(now_ms()))
                    ));
                }
                line
            })
        }
        ClientCmd::Ghost { state, span } => switch(&client, &out, &GHOST, state, span).await,
        ClientCmd::Discoverable { state, span } => {
            switch(&client, &out, &DISCOVERABLE, state, span).await
        }
        ClientCmd::History {
            days,
            geojson,
            delete,
        } => {
            if delete {
                let n = client.delete_history().await?;
                return out.value_or(&serde_json::json!({ "deleted": n }), || {
                    format!("deleted {n} point(s) of your history")
                });
            }
            let from = now_ms().saturating_sub(i64::from(days) * 86_400_000);
            if geojson {
                return out.line(client.history_geojson(Some(from)).await?);
            }
            let points = client.history(Some(from), None).await?;
            if out.json {
                return out.value(&serde_json::json!({ "points": points }));
            }
            if points.is_empty() {
                return out.line(format!("no history in the last {days} day(s)"));
            }
            for p in &points {
                out.line(format!(
                    "{:.5}, {:.5}  {} ago",
                    p.lat,
                    p.lon,
                    duration_words(now_ms().saturating_sub(p.ts))
                ))?;
            }
            Ok(())
        }
        ClientCmd::DeleteAccount { username, password } => {
            let password = password_or_stdin(password)?;
            client.delete_account(&username, &password).await?;
            if let Some(s) = saved.filter(|s| s.username.as_deref() == Some(username.as_str())) {
                file.save(&Saved {
                    server: s.server,
                    ..Saved::default()
                })?;
            }
            out.value_or(&serde_json::json!({ "deleted": username }), || {
                format!("deleted the account {username} and everything tied to it")
            })
        }
        ClientCmd::Watch => watch(&client, &out).await,
        ClientCmd::Move { lat, lon, wait_ms } => {
            Point::new(lat, lon).map_err(|e| ClientError::Invalid(e.to_string()))?;
            let mut feed = Feed::new(&client, &out).await?;
            let mut live = feed.connect().await?;
            live.send_location(lat, lon).await?;
            feed.drain(&mut live, Instant::now() + Duration::from_millis(wait_ms))
                .await?;
            live.close().await;
            feed.finish()
        }
        ClientCmd::Walk {
            from,
            to,
            steps,
            interval_ms,
            wait_ms,
        } => {
            let mut feed = Feed::new(&client, &out).await?;
            let mut live = feed.connect().await?;
            let points = path(from, to, steps);
            let mut next = Instant::now();
            for (i, p) in points.iter().enumerate() {
                // As given, else as the server suggests now.
                let interval = interval_ms.or(feed.suggested).unwrap_or(WALK_INTERVAL_MS);
                next += Duration::from_millis(if i + 1 == points.len() {
                    wait_ms
                } else {
                    interval
                });
                // A lost connection is reconnected and the step sent again.
                loop {
                    let sent = live.send_location(p.lat, p.lon).await;
                    let step = match sent {
                        Ok(()) => {
                            if !out.json {
                                out.line(format!(
                                    "at {:.6}, {:.6} (step {i}/{steps})",
                                    p.lat, p.lon
                                ))?;
                            }
                            feed.drain(&mut live, next).await
                        }
                        Err(e) => Err(e),
                    };
                    match step {
                        Ok(()) => break,
                        Err(e) if e.is_retryable() => match feed.reconnect(&e).await? {
                            Some(again) => live = again,
                            None => return feed.finish(),
                        },
                        Err(e) => return Err(e),
                    }
                }
            }
            live.close().await;
            feed.finish()
        }
    }
}

/// A setting of your own that is on (for good or for a while) or off:
/// `/v1/me/{name}`, its answer's `field`, and how it reads.
struct Switch {
    name: &'static str,
    field: &'static str,
    on: &'static str,
    off: &'static str,
}

const GHOST: Switch = Switch {
    name: "ghost",
    field: "ghost",
    on: "ghost mode: hidden from every friend",
    off: "ghost mode off: friends you share with see you",
};

const DISCOVERABLE: Switch = Switch {
    name: "discoverable",
    field: "enabled",
    on: "discoverable: strangers nearby who opted in see you (and you them)",
    off: "not discoverable: no stranger sees you, and you see none",
};

/// `ghost|discoverable on [--for SPAN] | off | status`.
async fn switch(
    client: &Client,
    out: &Out,
    sw: &Switch,
    state: GhostState,
    span: Option<Duration>,
) -> Result<(), ClientError> {
    if span.is_some() && state != GhostState::On {
        return Err(ClientError::Invalid(format!(
            "--for goes with `{} on`",
            sw.name
        )));
    }
    let answer = match state {
        GhostState::On => {
            let until = span.map(|d| now_ms().saturating_add(d.as_millis() as i64));
            client.switch(sw.name, Some(until)).await?
        }
        GhostState::Off => {
            client.end_switch(sw.name).await?;
            serde_json::json!({ sw.field: false, "until": null })
        }
        GhostState::Status => client.switch(sw.name, None).await?,
    };
    out.value_or(&answer, || {
        match (answer[sw.field].as_bool(), answer["until"].as_i64()) {
            (Some(true), Some(until)) => format!(
                "{} for {} more",
                sw.on,
                duration_words(until.saturating_sub(now_ms()))
            ),
            (Some(true), None) => format!("{} until `{} off`", sw.on, sw.name),
            _ => sw.off.into(),
        }
    })
}

async fn friends(client: &Client, out: &Out, cmd: FriendsCmd) -> Result<(), ClientError> {
    match cmd {
        FriendsCmd::List => {
            let list = client.friends().await?;
            if out.json {
                return out.value(&serde_json::json!({ "friends": list }));
            }
            for row in show::friends_table(&list, now_ms()) {
                out.line(row)?;
            }
            Ok(())
        }
        FriendsCmd::Add { name } => {
            let user = client.user_by_name(&name).await?;
            let status = match client.request_friend(user.id).await {
                Err(e) if e.api_code() == Some("self") => {
                    return Err(ClientError::Invalid("you cannot add yourself".into()))
                }
                other => other?,
            };
            out.value_or(
                &serde_json::json!({ "id": user.id, "status": status }),
                || match status {
                    FriendStatus::Friends => format!("you and {name} are friends"),
                    _ => format!("asked {name} to be your friend; they can `nearby client friends accept` you"),
                },
            )
        }
        FriendsCmd::Accept { name } => {
            // From the list, not by name: a PUT to someone who has not asked
            // would send them a request instead of accepting one.
            let list = client.friends().await?;
            let row = list
                .iter()
                .find(|f| f.username.as_deref() == Some(name.as_str()));
            match row.map(|f| (f.id, f.status)) {
                Some((id, FriendStatus::Incoming)) => {
                    let status = client.request_friend(id).await?;
                    out.value_or(&serde_json::json!({ "id": id, "status": status }), || {
                        format!("you and {name} are friends")
                    })
                }
                Some((id, FriendStatus::Friends)) => out.value_or(
                    &serde_json::json!({ "id": id, "status": FriendStatus::Friends }),
                    || format!("you and {name} are already friends"),
                ),
                Some((_, FriendStatus::Outgoing)) => Err(ClientError::Invalid(format!(
                    "{name} has not answered your own request yet; only they can accept it"
                ))),
                None => Err(ClientError::Invalid(format!(
                    "no friend request from {name:?}"
                ))),
            }
        }
        FriendsCmd::Remove { name } => {
            let user = client.user_by_name(&name).await?;
            client.remove_friend(user.id).await?;
            if out.json {
                Ok(())
            } else {
                out.line(format!("{name} is no longer a friend or a request"))
            }
        }
    }
}

async fn watch(client: &Client, out: &Out) -> Result<(), ClientError> {
    let mut feed = Feed::new(client, out).await?;
    feed.live = true;
    let mut live = feed.connect().await?;
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = live.recv() => match r {
                Ok(inc) => feed.show(inc).await?,
                // A restart, a drain, a network blip: come back by itself.
                Err(e) if e.is_retryable() => match feed.reconnect(&e).await? {
                    Some(again) => live = again,
                    None => return Ok(()),
                },
                Err(e) => return Err(e),
            },
            _ = &mut stop => {
                live.close().await;
                return Ok(());
            }
        }
    }
}

/// Prints the frames of one connection, resolving names as it goes, and
/// remembers the first `error` frame (a refused update makes the command fail).
struct Feed<'a> {
    client: &'a Client,
    out: &'a Out,
    names: Names,
    asked: std::collections::HashSet<UserId>,
    first_error: Option<(String, String)>,
    backoff: crate::backoff::Backoff,
    /// The update interval the server suggested last, milliseconds.
    suggested: Option<u64>,
    /// `watch`: each line starts with the local time, and a line the same
    /// as the one before is not printed again.
    live: bool,
    /// The last line printed (without its time).
    last_line: Option<String>,
}

impl<'a> Feed<'a> {
    async fn new(client: &'a Client, out: &'a Out) -> Result<Self, ClientError> {
        // Also checks the login before the WebSocket is opened.
        let names = if out.json {
            client.require_token()?;
            Names::default()
        } else {
            Names::from_friends(&client.friends().await?)
        };
        Ok(Self {
            client,
            out,
            names,
            asked: Default::default(),
            first_error: None,
            backoff: Default::default(),
            suggested: None,
            live: false,
            last_line: None,
        })
    }

    /// Prints one line for a person: with `watch`, stamped with the local
    /// time, and not when it repeats the line before.
    fn say(&mut self, text: String) -> Result<(), ClientError> {
        if !self.live {
            return self.out.line(text);
        }
        if self.last_line.as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        let stamped = format!("{} {text}", chrono::Local::now().format("%H:%M:%S"));
        self.last_line = Some(text);
        self.out.line(stamped)
    }

    /// After `lost` (a retryable error), reconnects the way
    /// `docs/protocol.md` asks, saying so on one line each time, until it
    /// works (the new snapshot is printed) or Ctrl-C (`None`).
    async fn reconnect(&mut self, lost: &ClientError) -> Result<Option<Live>, ClientError> {
        self.note(&format!("connection lost ({lost}); reconnecting"))?;
        loop {
            let wait = self.backoff.next_random_delay();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = tokio::signal::ctrl_c() => return Ok(None),
            }
            match self.open().await {
                Ok((live, first)) => {
                    self.backoff.connected();
                    self.note("reconnected")?;
                    // The view starts over from the new snapshot.
                    self.show(first).await?;
                    return Ok(Some(live));
                }
                Err(e) if e.is_retryable() => {
                    self.backoff.failed();
                    let next = self.backoff.ceiling();
                    self.note(&format!(
                        "still unreachable ({e}); next try within {next:?}"
                    ))?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A line about the connection itself: on stdout for people, on
    /// stderr with `--json` (stdout stays one frame per line).
    fn note(&mut self, text: &str) -> Result<(), ClientError> {
        if self.out.json {
            eprintln!("{text}");
            Ok(())
        } else {
            self.say(text.to_owned())
        }
    }

    /// Connects and prints the snapshot.
    async fn connect(&mut self) -> Result<Live, ClientError> {
        let (live, first) = self.open().await?;
        self.show(first).await?;
        Ok(live)
    }

    /// Connects and waits for the first frame (the snapshot).
    async fn open(&mut self) -> Result<(Live, Incoming), ClientError> {
        let mut live = self.client.connect().await?;
        match live.recv_until(Instant::now() + FIRST_FRAME).await? {
            Some(first) => Ok((live, first)),
            None => Err(ClientError::Unexpected {
                url: self.client.server(),
                detail: "no snapshot within 10 s of connecting".into(),
            }),
        }
    }

    async fn show(&mut self, inc: Incoming) -> Result<(), ClientError> {
        match &inc.frame {
            Some(ServerFrame::Snapshot {
                interval_ms: Some(ms),
                ..
            })
            | Some(ServerFrame::Interval { interval_ms: ms }) => {
                self.suggested = Some(u64::from(*ms));
            }
            _ => {}
        }
        if let Some(ServerFrame::Error {
            code,
            message,
            reconnect_after_ms,
        }) = &inc.frame
        {
            if code == "going_away" {
                // Not a refusal: the node drains; reconnect when asked (the
                // close that follows is said as "connection lost").
                self.backoff.server_asked(reconnect_after_ms.unwrap_or(0));
                if !self.out.json {
                    return Ok(());
                }
            } else {
                self.first_error
                    .get_or_insert_with(|| (code.to_string(), message.clone()));
            }
        }
        if self.out.json {
            return self.out.line(inc.text.trim_end());
        }
        let Some(frame) = inc.frame else {
            return self.say(inc.text.trim_end().to_owned());
        };
        // A friend added since the names were loaded: look again, once.
        let unknown: Vec<UserId> = show::ids(&frame)
            .into_iter()
            .filter(|id| !self.names.knows(*id) && !self.asked.contains(id))
            .collect();
        if !unknown.is_empty() {
            self.asked.extend(unknown);
            if let Ok(list) = self.client.friends().await {
                self.names = Names::from_friends(&list);
            }
        }
        let line = show::frame_line(&frame, &self.names, now_ms());
        self.say(line)
    }

    /// Prints frames until `deadline`.
    async fn drain(&mut self, live: &mut Live, deadline: Instant) -> Result<(), ClientError> {
        while let Some(inc) = live.recv_until(deadline).await? {
            self.show(inc).await?;
        }
        Ok(())
    }

    /// Fails if the server refused something that was sent.
    fn finish(self) -> Result<(), ClientError> {
        match self.first_error {
            None => Ok(()),
            Some((code, message)) => Err(ClientError::Invalid(format!(
                "the server refused an update: {code}: {message}"
            ))),
        }
    }
}

/// Standard output, for people or as JSON lines.
struct Out {
    json: bool,
}

impl Out {
    fn line(&self, text: impl std::fmt::Display) -> Result<(), ClientError> {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{text}")
            .and_then(|()| stdout.flush())
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    STDOUT_CLOSED.store(true, Ordering::Relaxed);
                }
                ClientError::Output(e.to_string())
            })
    }

    fn value(&self, v: &impl serde::Serialize) -> Result<(), ClientError> {
        let text = serde_json::to_string(v).map_err(|e| ClientError::Output(e.to_string()))?;
        self.line(text)
    }

    /// `v` as JSON with `--json`, else the sentence `human` makes.
    fn value_or(
        &self,
        v: &impl serde::Serialize,
        human: impl FnOnce() -> String,
    ) -> Result<(), ClientError> {
        if self.json {
            self.value(v)
        } else {
            self.line(human())
        }
    }
}

/// The password given, else one line of stdin (prompted for on a terminal).
fn password_or_stdin(given: Option<String>) -> Result<String, ClientError> {
    if let Some(p) = given {
        return Ok(p);
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("password (shown as you type): ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|e| ClientError::Invalid(format!("cannot read the password from stdin: {e}")))?;
    let p = line.trim_end_matches(['\r', '\n']).to_owned();
    if p.is_empty() {
        return Err(ClientError::Invalid(
            "no password: give it after the username, or on stdin".into(),
        ));
    }
    Ok(p)
}

/// `steps + 1` evenly spaced points from `from` to `to` (both included),
/// the short way round across the antimeridian. Straight in degrees, which
/// is close enough to a great circle at city scale.
pub(crate) fn path(from: LatLon, to: LatLon, steps: u32) -> Vec<LatLon> {
    let mut dlon = to.lon - from.lon;
    if dlon > 180.0 {
        dlon -= 360.0;
    } else if dlon < -180.0 {
        dlon += 360.0;
    }
    (0..=steps)
        .map(|i| {
            let f = f64::from(i) / f64::from(steps.max(1));
            let mut lon = from.lon + dlon * f;
            if lon > 180.0 {
                lon -= 360.0;
            } else if lon < -180.0 {
                lon += 360.0;
            }
            LatLon {
                lat: from.lat + (to.lat - from.lat) * f,
                lon,
            }
        })
        .collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// "7 days", "3 h", "12 min", rounded to the nearest unit.
fn duration_words(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        ..=5399 => format!("{} min", (s + 30) / 60),
        5400..=172_799 => format!("{} h", (s + 1800) / 3600),
        _ => format!("{} days", (s + 43_200) / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Top {
        #[command(flatten)]
        args: ClientArgs,
    }

    fn parse(argv: &[&str]) -> Result<ClientArgs, clap::Error> {
        Top::try_parse_from(std::iter::once("client").chain(argv.iter().copied())).map(|t| t.args)
    }

    #[test]
    fn coordinates_parse_with_signs_and_are_checked() {
        let a = parse(&["move", "-33.8568", "-151.2153", "--json"]).unwrap();
        assert!(a.json);
        assert!(
            matches!(a.cmd, ClientCmd::Move { lat, lon, .. } if lat == -33.8568 && lon == -151.2153)
        );
        let a = parse(&["walk", "--from", "-1,2", "--to", "3, -4", "--steps", "2"]).unwrap();
        let ClientCmd::Walk { from, to, .. } = a.cmd else {
            panic!("not a walk")
        };
        assert_eq!(
            (from, to),
            (
                LatLon {
                    lat: -1.0,
                    lon: 2.0
                },
                LatLon {
                    lat: 3.0,
                    lon: -4.0
                }
            )
        );
        for bad in [
            &["walk", "--from", "91,0", "--to", "0,0"][..],
            &["walk", "--from", "1", "--to", "0,0"],
            &["walk", "--from", "0,0", "--to", "0,0", "--steps", "0"],
            &["share", "maybe", "bob"],
            &["share", "on", "bob", "--for", "soon"],
            &["share", "on", "bob", "--for", "0m"],
            &["share", "on", "bob", "--approximate", "--precise"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths_include_both_ends_and_cross_the_antimeridian_the_short_way() {
        let p = path(
            LatLon { lat: 0.0, lon: 0.0 },
            LatLon { lat: 1.0, lon: 2.0 },
            2,
        );
        assert_eq!(
            p,
            [
                LatLon { lat: 0.0, lon: 0.0 },
                LatLon { lat: 0.5, lon: 1.0 },
                LatLon { lat: 1.0, lon: 2.0 }
            ]
        );
        let p = path(
            LatLon {
                lat: 0.0,
                lon: 179.0,
            },
            LatLon {
                lat: 0.0,
                lon: -179.0,
            },
            4,
        );
        assert!(p.iter().all(|q| q.lon.abs() >= 179.0 - 1e-9), "{p:?}");
        assert_eq!(p[2].lon.abs(), 180.0);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration_words(604_800_000), "7 days");
        assert_eq!(duration_words(604_799_000), "7 days");
        assert_eq!(duration_words(3 * 3_600_000), "3 h");
        assert_eq!(duration_words(12 * 60_000), "12 min");
        assert_eq!(duration_words(-5), "0 min");
    }
}

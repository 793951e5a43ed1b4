//! `nearby client` and `nearby demo` as a person uses them: the real binary
//! is the server and every client command, over real TCP; each user has
//! their own saved-login file.
mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{assert_left, assert_location, north_of, Server};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_nearby");
const SEOUL: (f64, f64) = (37.5665, 126.9780);
const PASSWORD: &str = "correct horse";
const WAIT: Duration = Duration::from_secs(10);

/// One user's terminal: `nearby client` with their own config file.
struct Term {
    server: String,
    config: PathBuf,
}

impl Term {
    fn new(server: &str, dir: &Path, name: &str) -> Self {
        Self {
            server: server.to_owned(),
            config: dir.join(format!("{name}.json")),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("client")
            .args(args)
            .env("NEARBY_CLIENT_CONFIG", &self.config)
            .env_remove("NEARBY_SERVER")
            .env_remove("NEARBY_TOKEN")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run nearby client")
    }

    /// Runs a command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = texts(&out);
        assert!(
            out.status.success(),
            "nearby client {args:?} failed: {stderr}{stdout}"
        );
        stdout
    }

    /// Runs a command that must fail; its stderr, which must be one line
    /// starting with `error: `.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = texts(&out);
        assert!(
            !out.status.success(),
            "nearby client {args:?} succeeded: {stdout}"
        );
        assert!(
            stderr.starts_with("error: ") && stderr.lines().count() == 1,
            "{args:?}: not a one-line error: {stderr:?}"
        );
        stderr.trim_end().to_owned()
    }

    /// `ok` with `--server` (for the commands before a login is saved).
    fn ok_on_server(&self, args: &[&str]) -> String {
        let mut all = vec!["--server", self.server.as_str()];
        all.extend_from_slice(args);
        self.ok(&all)
    }

    /// Starts a long-running command, its stdout read line by line.
    fn spawn(&self, args: &[&str]) -> Proc {
        Proc::spawn(self.command(args))
    }

    fn saved(&self) -> Value {
        let text = std::fs::read_to_string(&self.config).expect("saved login");
        serde_json::from_str(&text).expect("saved login is JSON")
    }

    fn user_id(&self) -> String {
        self.saved()["user_id"]
            .as_str()
            .expect("user_id")
            .to_owned()
    }
}

/// Alice and Bob, signed up, logged in and friends, each at a terminal
/// whose config lives in `dir`.
fn friends_at(server: &Server, dir: &Path) -> (Term, Term) {
    let alice = Term::new(&server.base, dir, "alice");
    let bob = Term::new(&server.base, dir, "bob");
    for (t, name) in [(&alice, "alice"), (&bob, "bob")] {
        t.ok_on_server(&["signup", name, PASSWORD]);
        t.ok_on_server(&["login", name, PASSWORD]);
    }
    alice.ok(&["friends", "add", "bob"]);
    bob.ok(&["friends", "accept", "alice"]);
    (alice, bob)
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A child process whose stdout lines arrive on a channel; killed on drop.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    fn line(&self) -> String {
        self.lines.recv_timeout(WAIT).expect("a line within 10 s")
    }

    /// The next line of `watch`, which starts with the local time
    /// (`HH:MM:SS `): the rest.
    fn watch_line(&self) -> String {
        let line = self.line();
        let (time, rest) = line.split_at_checked(9).unwrap_or(("", ""));
        let digits = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit());
        let parts: Vec<&str> = time.trim_end().split(':').collect();
        assert!(
            time.ends_with(' ') && parts.len() == 3 && parts.iter().all(|p| digits(p)),
            "no time at the start of {line:?}"
        );
        rest.to_owned()
    }

    /// The next JSON line that is not a suggested interval (`interval`
    /// frames come whenever a friend who can see the user comes or goes).
    fn json(&self) -> Value {
        loop {
            let line = self.line();
            let v: Value =
                serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line:?}"));
            if v["type"] != "interval" {
                return v;
            }
        }
    }

    /// Waits for the process to end by itself; its status and stderr.
    fn wait_exit(mut self) -> (std::process::ExitStatus, String) {
        for _ in 0..(WAIT.as_millis() / 50) {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (status, err);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("process did not exit");
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        for _ in 0..(WAIT.as_millis() / 50) {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("process did not exit within 10 s of SIGTERM");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn coords((lat, lon): (f64, f64)) -> [String; 2] {
    [lat.to_string(), lon.to_string()]
}

/// The distance in metres in a human line such as "alice is 1.00 km away"
/// or "alice is 604 m away".
fn distance_in(line: &str, name: &str) -> f64 {
    let rest = line
        .strip_prefix(&format!("{name} is "))
        .unwrap_or_else(|| panic!("{line:?} is not about {name}"));
    let mut words = rest.split(' ');
    let number: f64 = words
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no distance in {line:?}"));
    match words.next() {
        Some("km") => number * 1000.0,
        Some("m") => number,
        _ => panic!("no unit in {line:?}"),
    }
}

#[test]
fn two_users_befriend_share_and_watch_each_other_from_the_command_line() {
    // A short idle limit: `watch` must answer the server's pings to stay.
    let server = Server::start(&["--idle-timeout-secs", "3"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let alice = Term::new(&server.base, dir.path(), "alice");
    let bob = Term::new(&server.base, dir.path(), "bob");

    for (t, name) in [(&alice, "alice"), (&bob, "bob")] {
        let out = t.ok_on_server(&["signup", name, PASSWORD]);
        assert!(out.starts_with(&format!("signed up {name} (id ")), "{out}");
        let out = t.ok_on_server(&["login", name, PASSWORD]);
        assert!(
            out.starts_with(&format!("logged in as {name} on {}", server.base)),
            "{out}"
        );
        let saved = t.saved();
        assert_eq!(saved["server"], server.base.as_str());
        assert_eq!(saved["username"], name);
        assert!(
            saved["token"].as_str().is_some_and(|t| t.len() == 64),
            "{saved}"
        );
    }
    let (alice_id, bob_id) = (alice.user_id(), bob.user_id());

    // From here on the saved login names the server.
    let out = alice.ok(&["friends", "add", "bob"]);
    assert!(out.starts_with("asked bob to be your friend"), "{out}");
    let out = bob.ok(&["friends", "list"]);
    assert!(out.starts_with("alice  incoming"), "{out}");
    assert_eq!(
        bob.ok(&["friends", "accept", "alice"]).trim(),
        "you and alice are friends"
    );
    let list: Value =
        serde_json::from_str(&alice.ok(&["friends", "list", "--json"])).expect("JSON");
    assert_eq!(
        list,
        json!({ "friends": [{ "id": bob_id, "username": "bob", "status": "friends", "sharing": true, "shares_with_you": true }] })
    );

    // Alice stands in Seoul and watches.
    let [lat, lon] = coords(SEOUL);
    let out = alice.ok(&["move", &lat, &lon, "--wait-ms", "300"]);
    assert_eq!(out.lines().next(), Some("nearby now: nobody"), "{out}");
    let watch = alice.spawn(&["watch", "--json"]);
    let snap = watch.json();
    // Nobody near, and where she stands as the server holds it.
    assert_eq!(snap["friends"], json!([]), "{snap}");
    assert_eq!(
        (
            snap["self_location"]["lat"].as_f64(),
            snap["self_location"]["lon"].as_f64()
        ),
        (Some(SEOUL.0), Some(SEOUL.1)),
        "{snap}"
    );

    // Bob, 1 km north, sees her at once, and her watch shows him.
    let [lat, lon] = coords(north_of(SEOUL.0, SEOUL.1, 1000.0));
    let out = bob.ok(&["move", &lat, &lon]);
    let line = out
        .lines()
        .find(|l| l.starts_with("alice is"))
        .unwrap_or_else(|| panic!("bob's move did not show alice: {out}"));
    assert!((distance_in(line, "alice") - 1000.0).abs() <= 1.0, "{line}");
    assert_location(&watch.json(), &bob_id, 1000.0);

    // Longer than the idle limit with nothing to say: still connected.
    std::thread::sleep(Duration::from_secs(4));
    let half_km = north_of(SEOUL.0, SEOUL.1, 500.0);
    let [lat, lon] = coords(half_km);
    bob.ok(&["move", &lat, &lon, "--wait-ms", "200"]);
    assert_location(&watch.json(), &bob_id, 500.0);

    // Bob stops sharing with Alice, then shares again.
    let out = bob.ok(&["share", "off", "alice"]);
    assert_eq!(out.trim(), "not sharing your location with alice any more");
    // The watch shows him leave, and the pushed row of the friend list.
    let frames = [watch.json(), watch.json()];
    let of = |t: &str| {
        frames
            .iter()
            .find(|f| f["type"] == t)
            .unwrap_or_else(|| panic!("no {t} in {frames:?}"))
    };
    assert_left(of("friend_left"), &bob_id, "unshared");
    assert_eq!(of("friend_update")["shares_with_you"], false, "{frames:?}");
    let out = bob.ok(&["share", "on", "alice", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&out).expect("JSON"),
        json!({ "id": alice_id, "sharing": true })
    );
    let frames = [watch.json(), watch.json()];
    let of = |t: &str| {
        frames
            .iter()
            .find(|f| f["type"] == t)
            .unwrap_or_else(|| panic!("no {t} in {frames:?}"))
    };
    assert_location(of("friend_location"), &bob_id, 500.0);
    assert_eq!(of("friend_update")["shares_with_you"], true, "{frames:?}");

    // Bob walks north to 2 km in two steps; Alice sees each step.
    let from = format!("{},{}", half_km.0, half_km.1);
    let to_point = north_of(SEOUL.0, SEOUL.1, 2000.0);
    let to = format!("{},{}", to_point.0, to_point.1);
    let out = bob.ok(&[
        "walk",
        "--from",
        &from,
        "--to",
        &to,
        "--steps",
        "2",
        "--interval-ms",
        "300",
        "--wait-ms",
        "300",
        "--json",
    ]);
    let frames: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(frames[0]["type"], "snapshot", "{out}");
    assert_location(frames.last().expect("frames"), &alice_id, 2000.0);
    assert_location(&watch.json(), &bob_id, 500.0);
    assert_location(&watch.json(), &bob_id, 1250.0);
    assert_location(&watch.json(), &bob_id, 2000.0);

    // Alice logs out: the watch opened with that token is closed (1008).
    assert_eq!(alice.ok(&["logout"]).trim(), "logged out");
    assert_eq!(alice.saved(), json!({ "server": server.base }));
    let f = watch.json();
    assert_eq!(
        (f["type"].as_str(), f["code"].as_str()),
        (Some("error"), Some("token_revoked")),
        "{f}"
    );
    let (status, stderr) = watch.wait_exit();
    assert!(!status.success());
    assert!(
        stderr.starts_with("error: the server closed the connection: 1008"),
        "{stderr}"
    );
    let err = alice.fails(&["friends", "list"]);
    assert!(
        err.starts_with(&format!("error: not logged in to {}", server.base)),
        "{err}"
    );
}

#[test]
fn privacy_from_the_command_line_ghost_terms_history_and_account() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let (alice, bob) = friends_at(&server, dir.path());

    // Sharing terms, read back from both sides.
    let out = alice.ok(&["share", "on", "bob", "--for", "2h", "--approximate"]);
    assert_eq!(
        out.trim(),
        "sharing your location with bob, approximately (which ~3 km cell you are in), for 2 h"
    );
    let out = bob.ok(&["friends", "list"]);
    assert!(
        out.contains("they share with you: yes, approximately, for 119 min more")
            || out.contains("they share with you: yes, approximately, for 2 h more"),
        "{out}"
    );
    assert!(alice
        .fails(&["share", "off", "bob", "--for", "1h"])
        .contains("--for"));
    assert_eq!(
        alice.ok(&["share", "on", "bob", "--precise"]).trim(),
        "sharing your location with bob"
    );

    // Ghost mode on for a while, status, off.
    let out = alice.ok(&["ghost", "on", "--for", "30m"]);
    assert_eq!(
        out.trim(),
        "ghost mode: hidden from every friend for 30 min more"
    );
    let status: Value =
        serde_json::from_str(&alice.ok(&["--json", "ghost", "status"])).expect("JSON");
    assert_eq!(status["ghost"], true, "{status}");
    assert_eq!(
        alice.ok(&["ghost", "off"]).trim(),
        "ghost mode off: friends you share with see you"
    );
    assert_eq!(
        alice.ok(&["ghost", "status"]).trim(),
        "ghost mode off: friends you share with see you"
    );

    // History: one move, listed, exported, deleted.
    alice.ok(&["move", "37.5665", "126.978", "--wait-ms", "200"]);
    let mut listed = String::new();
    for _ in 0..50 {
        listed = alice.ok(&["history"]);
        if listed.starts_with("37.56650, 126.97800") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(listed.starts_with("37.56650, 126.97800"), "{listed}");
    let geo: Value = serde_json::from_str(&alice.ok(&["history", "--geojson"])).expect("GeoJSON");
    assert_eq!(geo["type"], "FeatureCollection", "{geo}");
    assert_eq!(
        geo["features"][0]["geometry"]["coordinates"],
        json!([126.978, 37.5665])
    );
    assert_eq!(
        alice.ok(&["history", "--delete"]).trim(),
        "deleted 1 point(s) of your history"
    );
    assert_eq!(
        alice.ok(&["history"]).trim(),
        "no history in the last 1 day(s)"
    );

    // The account: the wrong password changes nothing; the right one
    // deletes it, and bob's list no longer has her.
    let err = alice.fails(&["delete-account", "alice", "--password", "wrong horse"]);
    assert!(err.contains("bad_credentials"), "{err}");
    let out = alice.ok(&["delete-account", "alice", "--password", PASSWORD]);
    assert_eq!(
        out.trim(),
        "deleted the account alice and everything tied to it"
    );
    assert!(bob.ok(&["friends", "list"]).starts_with("no friends yet"));
    assert!(alice.fails(&["friends", "list"]).starts_with("error: "));
}

#[test]
fn strangers_from_the_command_line() {
    let server = Server::start(&["--stranger-heartbeat-ms", "200"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let [alice, carol] = ["alice", "carol"].map(|name| {
        let t = Term::new(&server.base, dir.path(), name);
        t.ok_on_server(&["signup", name, PASSWORD]);
        t.ok_on_server(&["login", name, PASSWORD]);
        t
    });
    let off = "not discoverable: no stranger sees you, and you see none";
    assert_eq!(alice.ok(&["discoverable", "status"]).trim(), off);
    assert!(alice
        .fails(&["discoverable", "off", "--for", "1h"])
        .contains("--for"));
    let out = alice.ok(&["discoverable", "on", "--for", "30m"]);
    assert_eq!(
        out.trim(),
        "discoverable: strangers nearby who opted in see you (and you them) for 30 min more"
    );
    let status: Value =
        serde_json::from_str(&carol.ok(&["--json", "discoverable", "on"])).expect("JSON");
    assert_eq!(status, json!({ "enabled": true, "until": null }));

    // Carol keeps a session (her watch) where another device put her;
    // Alice, 300 m south in the same cell, sees her as a stranger.
    let carol_watch = carol.spawn(&["watch"]);
    assert_eq!(carol_watch.watch_line(), "nearby now: nobody");
    let [lat, lon] = coords(SEOUL);
    carol.ok(&["move", &lat, &lon]);
    let watch = alice.spawn(&["watch"]);
    assert_eq!(watch.watch_line(), "nearby now: nobody");
    let [lat, lon] = coords(north_of(SEOUL.0, SEOUL.1, -300.0));
    alice.ok(&["move", &lat, &lon]);
    let seen = loop {
        let l = watch.watch_line();
        if l.starts_with("stranger ") {
            break l;
        }
    };
    let alias = seen
        .strip_prefix("stranger ")
        .and_then(|r| r.split_once(' '))
        .map(|(a, _)| a.to_owned())
        .expect("an alias");
    assert!(alias.starts_with('s') && alias.len() == 17, "{seen}");
    assert_eq!(
        seen,
        format!("stranger {alias} is 0–5 km away, in your cell")
    );

    // The same report twice from another device: `watch` says it once.
    let [lat, lon] = coords(north_of(SEOUL.0, SEOUL.1, -200.0));
    alice.ok(&["move", &lat, &lon]);
    alice.ok(&["move", &lat, &lon]);
    // Alice opts out: she is told, and her strangers go.
    assert_eq!(alice.ok(&["discoverable", "off"]).trim(), off);
    let mut lines = Vec::new();
    while !lines.contains(&format!("stranger {alias} is no longer nearby")) {
        lines.push(watch.watch_line());
    }
    assert!(
        lines.contains(&"you are not discoverable by strangers".to_owned()),
        "{lines:?}"
    );
    let moved = lines
        .iter()
        .filter(|l| l.starts_with("you are at "))
        .count();
    assert_eq!(moved, 1, "a repeated line is not printed again: {lines:?}");
    drop(carol_watch);
}

#[test]
fn walk_follows_the_interval_the_server_suggests() {
    // Nobody can see the walker: the slow interval, 1.5 s here.
    let server = Server::start(&["--slow-interval-ms", "1500", "--fast-interval-ms", "200"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let alice = Term::new(&server.base, dir.path(), "alice");
    alice.ok_on_server(&["signup", "alice", PASSWORD]);
    alice.ok_on_server(&["login", "alice", PASSWORD]);
    let started = std::time::Instant::now();
    let out = alice.ok(&[
        "walk",
        "--from",
        "37.5665,126.978",
        "--to",
        "37.5685,126.978",
        "--steps",
        "2",
        "--wait-ms",
        "0",
    ]);
    let took = started.elapsed();
    assert_eq!(
        out.lines().filter(|l| l.starts_with("at ")).count(),
        3,
        "{out}"
    );
    // Two gaps of the suggested 1.5 s at least (not the 1 s of old).
    assert!(
        took >= Duration::from_millis(3000),
        "walked 3 steps in {took:?}"
    );
}

#[test]
fn mistakes_give_one_line_errors_and_a_failure_status() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let carol = Term::new(&server.base, dir.path(), "carol");
    carol.ok_on_server(&["signup", "carol", PASSWORD]);
    carol.ok_on_server(&["login", "carol", PASSWORD]);

    let err = carol.fails(&["--server", &server.base, "login", "carol", "wrong password"]);
    assert_eq!(
        err,
        "error: 401 bad_credentials: wrong username or password"
    );
    // The failed login kept the saved one.
    assert!(carol.ok(&["friends", "list"]).starts_with("no friends yet"));

    let err = carol.fails(&["friends", "add", "nobody"]);
    assert_eq!(err, r#"error: 404 unknown_user: no user named "nobody""#);
    carol.fails(&["friends", "remove", "nobody"]);
    carol.fails(&["share", "on", "nobody"]);
    let err = carol.fails(&["friends", "accept", "carol"]);
    assert_eq!(err, r#"error: no friend request from "carol""#);
    let err = carol.fails(&["signup", "carol", PASSWORD]);
    assert!(err.starts_with("error: 409 username_taken: "), "{err}");
    let err = carol.fails(&["move", "91", "0"]);
    assert_eq!(err, "error: latitude 91 is out of range [-90, 90]");

    // `localhost` and a trailing slash name the same server as the
    // saved login; another server gets no token, and one that is down is
    // said to be down, not "not logged in".
    let same = format!("{}/", server.base.replace("127.0.0.1", "localhost"));
    assert!(carol
        .ok(&["--server", &same, "friends", "list"])
        .starts_with("no friends yet"));
    let other = server.base.replace("127.0.0.1", "127.0.0.2");
    let err = carol.fails(&["--server", &other, "friends", "list"]);
    assert!(
        err.starts_with(&format!("error: cannot reach {other}")),
        "{err}"
    );
    // Adding yourself is a sentence, not a code.
    assert_eq!(
        carol.fails(&["friends", "add", "carol"]),
        "error: you cannot add yourself"
    );
    // The help names the environment variable once, without a value.
    let help = carol.ok(&["--help"]);
    assert!(!help.contains("[env:"), "{help}");
    let err = carol.fails(&["--token", "0000", "friends", "list"]);
    assert!(err.starts_with("error: 401 unauthorized: "), "{err}");

    // Nothing listens on port 1.
    let err = carol.fails(&["--server", "http://127.0.0.1:1", "signup", "dave", PASSWORD]);
    assert!(
        err.starts_with("error: cannot reach http://127.0.0.1:1: "),
        "{err}"
    );

    let stranger = Term::new(&server.base, dir.path(), "nobody-yet");
    let err = stranger.fails(&["--server", &server.base, "watch"]);
    assert!(err.contains("not logged in"), "{err}");
}

#[test]
fn watch_keeps_running_across_a_server_restart() {
    let listen = format!("127.0.0.1:{}", nearby_conformance::services::free_port());
    let server = Server::start_at(
        tempfile::tempdir().expect("tempdir"),
        &listen,
        &["--drain-secs", "1"],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (alice, bob) = friends_at(&server, dir.path());
    let [lat, lon] = coords(SEOUL);
    alice.ok(&["move", &lat, &lon]);
    let watch = alice.spawn(&["watch"]);
    assert_eq!(watch.watch_line(), "nearby now: nobody");

    // The server restarts on the same address (SIGTERM: it drains).
    let data = server.stop_keeping_data();
    let lost = watch.watch_line();
    assert!(lost.starts_with("connection lost ("), "{lost}");
    assert!(lost.ends_with("; reconnecting"), "{lost}");
    let _server = Server::start_at(data, &listen, &[]);
    // Tries while it is down are said, one line each, then it is back.
    let back = loop {
        let l = watch.watch_line();
        if !l.starts_with("still unreachable (") {
            break l;
        }
    };
    assert_eq!(back, "reconnected");
    assert_eq!(watch.watch_line(), "nearby now: nobody");

    // And frames flow again. The embedded cache started empty: Alice
    // reports again (another device), then Bob, 1 km north, shows up.
    let [lat, lon] = coords(SEOUL);
    alice.ok(&["move", &lat, &lon]);
    // The watch is told where Alice's other device put her.
    let me = watch.watch_line();
    assert!(
        me.starts_with(&format!(
            "you are at {:.5}, {:.5}, as another of your devices reported",
            SEOUL.0, SEOUL.1
        )),
        "{me}"
    );
    let [lat, lon] = coords(north_of(SEOUL.0, SEOUL.1, 1000.0));
    bob.ok(&["move", &lat, &lon]);
    let seen = watch.watch_line();
    assert!(
        seen.starts_with("bob is ") && seen.contains(" away"),
        "{seen}"
    );
}

/// Starts `nearby demo` on a free port; its address and the printed password.
fn start_demo(data_dir: &Path) -> (Proc, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("RUST_LOG", "warn");
    let demo = Proc::spawn(cmd);
    let first = demo.line();
    let addr = first
        .strip_prefix("nearby listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    let login = (0..10)
        .map(|_| demo.line())
        .find(|l| l.starts_with("demo login:"))
        .expect("a login line");
    let password = login
        .strip_prefix("demo login: username demo, password ")
        .unwrap_or_else(|| panic!("unexpected login line {login:?}"))
        .to_owned();
    (demo, addr, password)
}

#[tokio::test]
async fn the_demo_user_sees_simulated_friends_walking_around() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut demo, addr, password) = start_demo(dir.path());
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let creds = json!({ "username": "demo", "password": password });
    let (st, login) = common::call(
        &http,
        Method::POST,
        &format!("{base}/v1/sessions"),
        None,
        Some(creds),
    )
    .await;
    assert_eq!(st.as_u16(), 200, "{login}");
    let token = login["token"].as_str().expect("token").to_owned();

    let (_, list) = common::call(
        &http,
        Method::GET,
        &format!("{base}/v1/friends"),
        Some(&token),
        None,
    )
    .await;
    let friends = list["friends"].as_array().expect("friends");
    assert_eq!(friends.len(), 5, "{list}");
    assert!(friends.iter().all(|f| f["status"] == "friends"), "{list}");
    let ids: Vec<&str> = friends.iter().filter_map(|f| f["id"].as_str()).collect();

    // The live feed shows at least three of them near, moving, within seconds.
    let mut req = format!("ws://{addr}/v1/ws")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("ws");
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < 3 {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await;
        let Ok(Some(Ok(Message::Text(t)))) = msg else {
            assert!(msg.is_ok(), "only {seen:?} seen within 10 s");
            continue;
        };
        let f: Value = serde_json::from_str(t.as_str()).expect("JSON");
        let near = match f["type"].as_str() {
            Some("snapshot") => f["friends"].as_array().cloned().unwrap_or_default(),
            Some("friend_location") => vec![f.clone()],
            _ => vec![],
        };
        for n in near {
            let id = n["id"].as_str().expect("id").to_owned();
            assert!(ids.contains(&id.as_str()), "{n} is not a friend of demo");
            assert!(n["distance_m"].as_f64().is_some_and(|d| d < 8047.0), "{n}");
            seen.insert(id);
        }
    }
    let (st, near) = common::call(
        &http,
        Method::GET,
        &format!("{base}/v1/nearby"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(st.as_u16(), 200);
    assert!(
        near["friends"].as_array().is_some_and(|f| !f.is_empty()),
        "{near}"
    );

    assert!(demo.terminate().success());
    drop(demo);

    // The same data dir again: same password, same accounts, no error.
    let (mut again, addr, password_again) = start_demo(dir.path());
    assert_eq!(password_again, password);
    let creds = json!({ "username": "demo", "password": password });
    let (st, _) = common::call(
        &http,
        Method::POST,
        &format!("http://{addr}/v1/sessions"),
        None,
        Some(creds),
    )
    .await;
    assert_eq!(st.as_u16(), 200);
    assert!(again.terminate().success());
}

#[test]
fn server_logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nearby serve");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("listening line");
    assert!(first.starts_with("nearby listening on "), "{first}");
    // SIGTERM: it logs "stopped" and exits, closing stderr.
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let mut log = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut log)
        .expect("stderr");
    let _ = child.wait();
    assert!(log.contains("serving"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log: {log:?}"
    );
}

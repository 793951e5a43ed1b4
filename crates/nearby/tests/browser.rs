//! The browser client end to end in Debian's headless Chromium, driven by
//! `web-test/browser.mjs` (playwright-core): two users sign up, befriend each
//! other and see each other's distance through the page; then the server
//! restarts on the same address (SIGTERM: it drains) and both pages must come
//! back by themselves. The screenshot is kept at
//! `target/artifacts/web-client.png`.
//!
//! A second test walks `nearby demo` as a newcomer would (`web-test/demo.mjs`):
//! the login hint, the walkers on the street map, a friend's details, the
//! radar, a phone; its screenshots are `target/artifacts/demo-*.png`.
//!
//! Needs `/usr/bin/chromium` and `web-test/node_modules` (`.ci/run` installs
//! both); without them these tests are skipped, or fail under `CI=true`.
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

use nearby_conformance::services;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// One Chromium at a time: this machine has two cores.
static CHROMIUM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Chromium and the script's packages are there (else the test is skipped,
/// or fails under `CI=true`).
fn browser_ready() -> bool {
    if !std::path::Path::new("/usr/bin/chromium").exists() {
        services::missing("Chromium", "/usr/bin/chromium not found");
        return false;
    }
    if !std::path::Path::new(&format!("{ROOT}/web-test/node_modules/playwright-core")).exists() {
        services::missing("playwright-core", "run `npm ci` in web-test/");
        return false;
    }
    true
}

#[test]
fn two_users_befriend_and_see_each_other_in_chromium() {
    let root = ROOT;
    if !browser_ready() {
        return;
    }
    let _one = CHROMIUM.lock().unwrap_or_else(|e| e.into_inner());
    let listen = format!("127.0.0.1:{}", services::free_port());
    // The street map's tiles come from a stand-in tile server that the
    // script runs on this port (this machine may be offline).
    let tiles_port = services::free_port().to_string();
    let tile_url = format!("http://127.0.0.1:{tiles_port}/{{z}}/{{x}}/{{y}}.svg");
    let mut server = Some(common::Server::start_at(
        tempfile::tempdir().expect("tempdir"),
        &listen,
        &[
            "--drain-secs",
            "1",
            "--stranger-heartbeat-ms",
            "500",
            "--tile-url",
            &tile_url,
        ],
    ));
    let base = server.as_ref().map(|s| s.base.clone()).unwrap_or_default();
    let artifacts = format!("{root}/target/artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let shot = format!("{artifacts}/web-client.png");
    let _ = std::fs::remove_file(&shot);
    let mut node = Command::new("node")
        .arg(format!("{root}/web-test/browser.mjs"))
        .args([base.as_str(), &shot, &tiles_port, "--restart-via-stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node must be installed");
    let mut stderr = node.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut stdin = Some(node.stdin.take().expect("stdin"));
    let mut stdout = String::new();
    let mut restarts = 0;
    for line in BufReader::new(node.stdout.take().expect("stdout")).lines() {
        let line = line.expect("node stdout");
        eprintln!("browser: {line}");
        if line == "RESTART SERVER" {
            // Same data, same address: the page must find it again.
            let data = server.take().expect("one restart").stop_keeping_data();
            server = Some(common::Server::start_at(
                data,
                &listen,
                &["--stranger-heartbeat-ms", "500", "--tile-url", &tile_url],
            ));
            if let Some(mut pipe) = stdin.take() {
                // Answered, then closed: node waits for nothing more.
                writeln!(pipe, "restarted").expect("answer node");
            }
            restarts += 1;
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = node.wait().expect("wait for node");
    let stderr = errors.join().expect("stderr reader");
    assert!(
        status.success(),
        "browser test failed ({status}):\n{stdout}\n{stderr}"
    );
    assert_eq!(restarts, 1, "{stdout}");
    assert!(stdout.contains("PASS"), "{stdout}");
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "not a real screenshot"
    );
}

/// A `nearby demo` process, killed (by PID, it is our child) on drop.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_demo_walks_in_chromium_on_a_desktop_and_a_phone() {
    if !browser_ready() {
        return;
    }
    let _one = CHROMIUM.lock().unwrap_or_else(|e| e.into_inner());
    let data = tempfile::tempdir().expect("tempdir");
    let tiles_port = services::free_port().to_string();
    let tile_url = format!("http://127.0.0.1:{tiles_port}/{{z}}/{{x}}/{{y}}.svg");
    let mut demo = Demo(
        Command::new(env!("CARGO_BIN_EXE_nearby"))
            .args([
                "demo",
                "--listen",
                "127.0.0.1:0",
                "--friends",
                "8",
                "--data-dir",
            ])
            .arg(data.path())
            .args(["--tile-url", &tile_url])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nearby demo"),
    );
    // What the demo tells a newcomer: the password and the page's address.
    let mut password = None;
    let mut base = None;
    let mut lines = BufReader::new(demo.0.stdout.take().expect("stdout")).lines();
    while base.is_none() {
        let line = lines
            .next()
            .expect("the demo printed its login and address")
            .expect("demo stdout");
        eprintln!("demo: {line}");
        if let Some(p) = line.strip_prefix("demo login: username demo, password ") {
            password = Some(p.trim().to_owned());
        }
        if let Some(b) = line.trim().strip_prefix("browser:") {
            base = Some(b.trim().trim_end_matches('/').to_owned());
        }
    }
    let (password, base) = (password.expect("a password line"), base.unwrap_or_default());
    // The rest of its output is not needed, but must not block it.
    std::thread::spawn(move || for _ in lines {});
    let artifacts = format!("{ROOT}/target/artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let shots = ["demo-desktop.png", "demo-phone.png"].map(|f| format!("{artifacts}/{f}"));
    for shot in &shots {
        let _ = std::fs::remove_file(shot);
    }
    let out = Command::new("node")
        .arg(format!("{ROOT}/web-test/demo.mjs"))
        .args([&base, &password, &artifacts, &tiles_port])
        .output()
        .expect("node must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "demo walk failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("PASS"), "{stdout}");
    for shot in &shots {
        let png = std::fs::read(shot).expect("screenshot written");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{shot} is not a real screenshot"
        );
    }
}

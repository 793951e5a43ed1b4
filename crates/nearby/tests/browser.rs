//! The browser client end to end in Debian's headless Chromium, driven by
//! `web-test/browser.mjs` (playwright-core): two users sign up, befriend each
//! other and see each other's distance through the page; then the server
//! restarts on the same address (SIGTERM: it drains) and both pages must come
//! back by themselves. The screenshot is kept at
//! `target/artifacts/web-client.png`.
//!
//! Needs `/usr/bin/chromium` and `web-test/node_modules` (`.ci/run` installs
//! both); without them this test is skipped, or fails under `CI=true`.
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

use nearby_conformance::services;

#[test]
fn two_users_befriend_and_see_each_other_in_chromium() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    if !std::path::Path::new("/usr/bin/chromium").exists() {
        return services::missing("Chromium", "/usr/bin/chromium not found");
    }
    if !std::path::Path::new(&format!("{root}/web-test/node_modules/playwright-core")).exists() {
        return services::missing("playwright-core", "run `npm ci` in web-test/");
    }
    let listen = format!("127.0.0.1:{}", services::free_port());
    let mut server = Some(common::Server::start_at(
        tempfile::tempdir().expect("tempdir"),
        &listen,
        &["--drain-secs", "1", "--stranger-heartbeat-ms", "500"],
    ));
    let base = server.as_ref().map(|s| s.base.clone()).unwrap_or_default();
    let artifacts = format!("{root}/target/artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let shot = format!("{artifacts}/web-client.png");
    let _ = std::fs::remove_file(&shot);
    let mut node = Command::new("node")
        .arg(format!("{root}/web-test/browser.mjs"))
        .args([base.as_str(), &shot, "--restart-via-stdio"])
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
                &["--stranger-heartbeat-ms", "500"],
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

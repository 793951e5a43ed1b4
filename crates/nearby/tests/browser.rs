//! The browser client end to end in Debian's headless Chromium, driven by
//! `web-test/browser.mjs` (playwright-core): two users sign up, befriend each
//! other and see each other's distance through the page. The screenshot is
//! kept at `target/artifacts/web-client.png`.
//!
//! Needs `/usr/bin/chromium` and `web-test/node_modules` (`.ci/run` installs
//! both); without them this test is skipped, or fails under `CI=true`.
mod common;

use std::process::Command;

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
    let server = common::Server::start(&[]);
    let artifacts = format!("{root}/target/artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let shot = format!("{artifacts}/web-client.png");
    let _ = std::fs::remove_file(&shot);
    let out = Command::new("node")
        .arg(format!("{root}/web-test/browser.mjs"))
        .args([&server.base, &shot])
        .output()
        .expect("node must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser test failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("PASS"), "{stdout}");
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "not a real screenshot"
    );
}

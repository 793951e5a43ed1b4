//! The binary raises its soft open-file limit to the hard limit at start, so
//! a node is not capped at the shell's default of about a thousand sockets.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// `(soft, hard)` "Max open files" of a running process, from /proc.
fn nofile(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut cols = line["Max open files".len()..].split_whitespace();
    let soft = cols.next().expect("soft").to_owned();
    let hard = cols.next().expect("hard").to_owned();
    (soft, hard)
}

#[test]
fn serve_raises_its_soft_open_file_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Start it from a shell whose soft limit is low, as systemd's is.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -Sn 256 && exec "$0" serve --listen 127.0.0.1:0 --data-dir "$1""#)
        .arg(env!("CARGO_BIN_EXE_nearby"))
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    assert!(line.starts_with("nearby listening on"), "{line:?}");
    let (soft, hard) = nofile(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_ne!(soft, "256", "the soft limit was not raised");
    assert_eq!(soft, hard);
}

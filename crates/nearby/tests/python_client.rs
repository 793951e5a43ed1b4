//! Runs `clients/python/scenario.py`, a client written from
//! `docs/protocol.md` alone, against the real binary: the document is
//! enough to build a working client. Needs `python3` with `websockets`
//! (`scripts/test` and `.ci/run` install it); without them this test fails.

use std::process::Command;

#[test]
fn a_client_written_from_the_protocol_doc_runs_the_scenario() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new("python3")
        .arg(format!("{root}/clients/python/scenario.py"))
        .arg(env!("CARGO_BIN_EXE_nearby"))
        .output()
        .expect("python3 must be installed (see README)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scenario.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    let (passed, failed) = last
        .split_once(" passed, ")
        .and_then(|(p, f)| {
            Some((
                p.trim().parse::<u32>().ok()?,
                f.trim_end_matches(" failed").parse::<u32>().ok()?,
            ))
        })
        .unwrap_or_else(|| panic!("unexpected last line {last:?}"));
    assert!(passed >= 20 && failed == 0, "{last}");
}

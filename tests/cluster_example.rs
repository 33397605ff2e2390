//! The cluster demo runs a cold start and its invariants hold: each digest is pulled from
//! the origin once, the failing one never succeeds, every node ends with every other one.

mod common;

use std::process::Command;

#[test]
fn cold_start_pulls_each_digest_from_the_origin_once() {
    let output = Command::new(common::example_binary("cluster"))
        .args(["--nodes", "4"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap();
    assert_eq!(last, "summary: digests=7 origin_pulls=6 failed=1 nodes=4");
    assert!(stdout.contains("failed (NotFound) on 4 nodes"), "{stdout}");
}

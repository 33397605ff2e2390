//! The examples run and end as they say: the cluster demo's cold start pulls each digest
//! from the origin once (the failing one never succeeds) and every node ends with the
//! rest; the file-sharing example finds the provider and learns it holds the blob.

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

#[test]
fn file_sharing_finds_the_provider_and_its_cached_blob() {
    let output = Command::new(common::example_binary("file_sharing"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let provider = stdout
        .lines()
        .find_map(|l| l.strip_prefix("provider: "))
        .expect("a provider was found");
    let last = stdout.lines().last().unwrap();
    assert!(last.starts_with("found sha256:2c26b46b"), "{last}");
    assert!(last.ends_with(&format!("cached at {provider}")), "{last}");
}

//! The examples run and end as they say: the cluster demo's cold start pulls each digest
//! from the origin once (the failing one never succeeds) and every node ends with the
//! rest; the file-sharing example finds the provider and learns it holds the blob.

mod common;

use std::process::Command;

/// Runs the cluster demo; its table rows (blob, kind, digest, puller, pulls, attempts,
/// first, all, result) and its last line.
fn cluster(args: &[&str]) -> (Vec<Vec<String>>, String, String) {
    let output = Command::new(common::example_binary("cluster"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows = stdout
        .lines()
        .skip_while(|l| !l.starts_with("blob "))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| {
            let mut cols: Vec<String> = l.split_whitespace().take(8).map(str::to_owned).collect();
            cols.push(l.split_whitespace().skip(8).collect::<Vec<_>>().join(" "));
            cols
        })
        .collect();
    let last = stdout.lines().last().unwrap().to_owned();
    (rows, last, stdout)
}

#[test]
fn cold_start_pulls_each_digest_from_the_origin_once() {
    let (rows, last, stdout) = cluster(&["--nodes", "4"]);
    assert_eq!(last, "summary: digests=7 origin_pulls=6 failed=1 nodes=4");
    assert!(stdout.contains("failed (NotFound) on 4 nodes"), "{stdout}");
    assert_eq!(rows.len(), 7, "{stdout}");
    for row in &rows {
        let pulls: u32 = row[4].parse().unwrap();
        if row[8].starts_with("failed") {
            assert_eq!(pulls, 0, "{row:?}");
        } else {
            assert_eq!(pulls, 1, "{row:?}");
            assert_eq!(row[8], "cached everywhere");
        }
    }
}

/// A fault on blob 3's designated puller: only blobs that node was to pull may see one
/// more origin pull, and every live node ends with every good blob.
fn survives(fault: &str, live: usize) {
    let (rows, last, stdout) = cluster(&[
        "--nodes",
        "6",
        "--transport",
        "memory",
        "--stall-ms",
        "1000",
        fault,
        "3",
    ]);
    let faulty = rows[3][3].clone();
    let mut extra = 0;
    for row in &rows {
        let pulls: u32 = row[4].parse().unwrap();
        if row[8].starts_with("failed") {
            assert_eq!(pulls, 0, "{row:?}");
            continue;
        }
        let allowed = if row[3] == faulty { 2 } else { 1 };
        assert!((1..=allowed).contains(&pulls), "{row:?}\n{stdout}");
        extra += pulls - 1;
        let everywhere = if live == 6 {
            "cached everywhere".to_owned()
        } else {
            format!("cached on all {live} live nodes")
        };
        assert_eq!(row[8], everywhere, "{stdout}");
    }
    assert!(last.starts_with("summary: digests=7 "), "{last}");
    assert!(
        last.contains(&format!("origin_pulls={} ", 6 + extra)),
        "{last}"
    );
}

#[test]
fn a_killed_designated_puller_costs_at_most_one_extra_pull_per_blob() {
    survives("--kill-puller", 5);
}

#[test]
fn a_stalled_designated_puller_is_taken_over() {
    survives("--stall-puller", 6);
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

/// The simulation of a small cluster against the in-process demo of the same size: both
/// drive the same cascade, so both pull each good blob once and send about as many
/// coordination messages per node and digest.
#[test]
fn the_simulation_of_eight_nodes_agrees_with_the_demo() {
    let (rows, _, demo) = cluster(&["--nodes", "8"]);
    let field = |text: &str, prefix: &str| -> f64 {
        let line = text.lines().find(|l| l.contains(prefix)).unwrap();
        let tail = &line[line.find(prefix).unwrap() + prefix.len()..];
        tail.split_whitespace().next().unwrap().parse().unwrap()
    };
    let demo_messages = field(&demo, "coordination messages per node-digest: ");
    let output = Command::new(common::example_binary("simulate"))
        .args(["--nodes", "8", "--spread-ms", "0"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let simulated = String::from_utf8_lossy(&output.stdout).into_owned();
    let last = simulated.lines().last().unwrap();
    assert!(
        last.starts_with("simulate: nodes=8 digests=4 origin_pulls=4 "),
        "{simulated}"
    );
    let good = rows.iter().filter(|r| !r[8].starts_with("failed")).count();
    assert!(rows
        .iter()
        .filter(|r| !r[8].starts_with("failed"))
        .all(|r| r[4] == "1"));
    assert_eq!(good, 6, "{demo}");
    let simulated_messages = field(last, "msgs_per_node_digest=");
    let ratio = simulated_messages / demo_messages;
    assert!(
        (0.75..=1.33).contains(&ratio),
        "simulated {simulated_messages} against the demo's {demo_messages} per node and digest"
    );
}

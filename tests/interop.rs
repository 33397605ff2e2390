//! Interop with an implementation this crate did not write: a js-libp2p peer (TCP, Noise,
//! Yamux) with its own protobuf encoding (`tests/interop/peer.mjs`) asks our node both RPC
//! families, and our node asks it. Needs Node.js; the packages are pinned by
//! `tests/interop/package-lock.json` and installed with `npm ci` when missing.

mod common;

use std::{path::PathBuf, process::Command};

use common::{hex_digest as digest, now_ms, spawn_announcing};
use serde_json::Value;

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// Runs `command` to the end and reads its output as one JSON value; a failed run fails
/// the test with what the command wrote to stderr.
fn json_output(command: &mut Command) -> Value {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn node_modules() {
    let dir = interop_dir();
    if !dir.join("node_modules/libp2p").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm is needed for the interop test");
        assert!(status.success(), "npm ci failed in {}", dir.display());
    }
}

#[test]
fn js_libp2p_asks_our_node_both_families() {
    node_modules();
    let (cached, pulling, failed, fresh) = (digest('a'), digest('b'), digest('c'), digest('d'));
    let failed_flag = format!("{failed}=rate-limited:60");
    let before = now_ms();
    let (_ours, announced) = spawn_announcing(Command::new(common::example_binary("node")).args([
        "--node-id",
        "node-a",
        "--cached",
        &cached,
        "--pulling",
        &pulling,
        "--failed",
        &failed_flag,
        "--origin-pull",
    ]));
    let addr = announced["listen"][0].as_str().unwrap();

    let v = json_output(
        Command::new("node")
            .arg(interop_dir().join("peer.mjs"))
            .args(["client", addr, &cached, &pulling, &failed, &fresh]),
    );
    let after = now_ms();

    let intents = v["pull_intent"].as_array().unwrap();
    let expect = |i: usize, cached: bool, in_flight: bool, failed: bool| {
        let intent = &intents[i];
        assert_eq!(intent["has_cached"], cached, "{intent}");
        assert_eq!(intent["in_flight"], in_flight, "{intent}");
        assert_eq!(intent["recently_failed"], failed, "{intent}");
        assert_eq!(intent["hrw_rank"], 0, "self is the only member: {intent}");
        assert_eq!(
            intent["started_at_unix_ms"].is_null(),
            !in_flight,
            "{intent}"
        );
        assert_eq!(
            intent["cooldown_until_unix_ms"].is_null(),
            !failed,
            "{intent}"
        );
        intent.clone()
    };
    expect(0, true, false, false);
    let in_flight = expect(1, false, true, false);
    let started = in_flight["started_at_unix_ms"].as_u64().unwrap();
    assert!(started >= before && started <= after);
    let recent = expect(2, false, false, true);
    assert_eq!(recent["failure_class"], 3, "FAILURE_CLASS_RATE_LIMITED");
    let until = recent["cooldown_until_unix_ms"].as_u64().unwrap();
    assert!(until >= before + 59_000 && until <= after + 60_000);
    expect(3, false, false, false);

    let results = v["please_pull"].as_array().unwrap();
    let digests: Vec<&str> = results
        .iter()
        .map(|r| r["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests, [&cached, &pulling, &failed, &fresh]);
    assert_eq!(results[1]["outcome"], 1, "OUTCOME_ALREADY_PULLING");
    assert_eq!(results[1]["started_at_unix_ms"].as_u64(), Some(started));
    assert_eq!(results[2]["outcome"], 3, "OUTCOME_RECENTLY_FAILED");
    assert_eq!(results[2]["cooldown_until_unix_ms"].as_u64(), Some(until));
    assert_eq!(results[2]["failure_class"], 3);
    assert_eq!(results[3]["outcome"], 2, "OUTCOME_STARTED");
    assert!(results[3]["started_at_unix_ms"].as_u64().unwrap() >= before);
    assert!(results[3]["cooldown_until_unix_ms"].is_null());
    assert!(
        v["wrong_body_reply"].is_null(),
        "a response body as a request gets no reply"
    );
    assert!(
        v["sha512_reply"].is_null(),
        "a sha512 digest is invalid input, as for the Go nodes: no reply"
    );
}

#[test]
fn our_node_asks_a_js_libp2p_responder() {
    node_modules();
    let (_js, announced) = spawn_announcing(
        Command::new("node")
            .arg(interop_dir().join("peer.mjs"))
            .arg("server"),
    );
    let addr = announced["addr"].as_str().unwrap();
    let started = announced["started_ms"].as_u64().unwrap();

    let ask = |args: &[&str]| json_output(Command::new(common::example_binary("node")).args(args));
    let before = now_ms();
    let intent = ask(&["--query", addr, "--digest", &digest('a')]);
    assert_eq!(intent["has_cached"], true);
    assert_eq!(intent["in_flight"], true);
    assert_eq!(intent["started_at_unix_ms"].as_u64(), Some(started));
    assert_eq!(intent["hrw_rank"], 3);
    assert_eq!(intent["recently_failed"], true);
    assert_eq!(intent["failure_class"], "rate-limited");
    // The responder claims a cooldown until 2100: the requester believes at most 10 min.
    let until = intent["cooldown_until_unix_ms"].as_u64().unwrap();
    assert!(
        until >= before + 599_000 && until <= now_ms() + 600_000,
        "{until}"
    );

    // An unranked responder writes hrw_rank = -1; our requester reads it as no rank.
    let unranked = ask(&["--query", addr, "--digest", &digest('f')]);
    assert_eq!(unranked["hrw_rank"], -1, "{unranked}");
    assert_eq!(unranked["has_cached"], false);
    assert_eq!(unranked["in_flight"], false);

    let (a, b) = (digest('a'), digest('b'));
    let outcomes = ask(&[
        "--please-pull",
        addr,
        "--registry",
        "docker.io",
        "--repository",
        "library/nginx",
        "--kind",
        "manifest",
        "--digest",
        &a,
        "--digest",
        &b,
        "--digest",
        &a,
        "--digest",
        &b,
    ]);
    let outcomes = outcomes.as_array().unwrap();
    let names: Vec<&str> = outcomes
        .iter()
        .map(|o| o["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "started",
            "already-pulling",
            "recently-failed",
            "unspecified"
        ]
    );
    let digests: Vec<&str> = outcomes
        .iter()
        .map(|o| o["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests, [&a, &b, &a, &b]);
    assert_eq!(outcomes[0]["started_at_unix_ms"].as_u64(), Some(started));
    assert_eq!(outcomes[1]["started_at_unix_ms"].as_u64(), Some(started));
    assert_eq!(outcomes[2]["failure_class"], "not-found");
    assert!(outcomes[2]["cooldown_until_unix_ms"].as_u64().unwrap() <= now_ms() + 600_000);
    assert!(outcomes[3]["started_at_unix_ms"].is_null());
}

//! Two `examples/node.rs` processes over TCP loopback: a server and a client, checking
//! every field of the replies they print.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;

mod common;

use common::{
    example_binary, hex_digest as digest, now_ms, sample_value, spawn_announcing, Killed,
};

fn example() -> PathBuf {
    example_binary("node")
}

fn start_server(args: &[&str]) -> (Killed, String) {
    let (server, announced) = start_server_json(args);
    (server, announced["listen"][0].as_str().unwrap().to_owned())
}

fn start_server_json(args: &[&str]) -> (Killed, Value) {
    let (server, announced) = spawn_announcing(Command::new(example()).args(args));
    let addr = announced["listen"][0].as_str().unwrap().to_owned();
    assert!(addr.starts_with("/ip4/127.0.0.1/tcp/"));
    assert!(addr.ends_with(&format!("/p2p/{}", announced["peer_id"].as_str().unwrap())));
    (server, announced)
}

/// Scrapes `/metrics` and returns the value of the sample named exactly `sample`.
fn scrape(metrics: &str, sample: &str) -> f64 {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(metrics).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    sample_value(&response, sample)
}

fn client(args: &[&str]) -> (bool, Value, String) {
    let output = Command::new(example())
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (
        output.status.success(),
        value,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn two_nodes_over_tcp_agree_on_every_field() {
    let (cached, pulling, failed, fresh) = (digest('a'), digest('b'), digest('c'), digest('d'));
    let before = now_ms();
    let failed_flag = format!("{failed}=rate-limited:60");
    let (_server, addr) = start_server(&[
        "--node-id",
        "node-a",
        "--cached",
        &cached,
        "--pulling",
        &pulling,
        "--failed",
        &failed_flag,
        "--origin-pull",
        "--pull-ms",
        "200",
    ]);

    let (ok, v, err) = client(&["--query", &addr, "--digest", &cached]);
    assert!(ok, "{err}");
    assert_eq!(v["has_cached"], true);
    assert_eq!(v["in_flight"], false);
    assert_eq!(v["started_at_unix_ms"], Value::Null);
    assert_eq!(v["hrw_rank"], 0, "self is the only member");
    assert_eq!(v["recently_failed"], false);
    assert_eq!(v["cooldown_until_unix_ms"], Value::Null);
    assert_eq!(v["failure_class"], "unspecified");

    let (ok, v, _) = client(&["--query", &addr, "--digest", &pulling]);
    assert!(ok);
    assert_eq!(v["has_cached"], false);
    assert_eq!(v["in_flight"], true);
    let started = v["started_at_unix_ms"].as_u64().unwrap();
    assert!(started >= before && started <= now_ms());

    let (ok, v, _) = client(&["--query", &addr, "--digest", &failed]);
    assert!(ok);
    assert_eq!(v["recently_failed"], true);
    assert_eq!(v["failure_class"], "rate-limited");
    let until = v["cooldown_until_unix_ms"].as_u64().unwrap();
    assert!(until >= before + 59_000 && until <= now_ms() + 60_000);

    let (ok, v, err) = client(&[
        "--please-pull",
        &addr,
        "--registry",
        "docker.io",
        "--repository",
        "library/nginx",
        "--kind",
        "blob",
        "--digest",
        &fresh,
        "--digest",
        &pulling,
        "--digest",
        &failed,
    ]);
    assert!(ok, "{err}");
    let outcomes = v.as_array().unwrap();
    assert_eq!(outcomes.len(), 3);
    assert_eq!(outcomes[0]["digest"], fresh.as_str());
    assert_eq!(outcomes[0]["outcome"], "started");
    assert!(outcomes[0]["started_at_unix_ms"].as_u64().unwrap() >= before);
    assert_eq!(outcomes[1]["digest"], pulling.as_str());
    assert_eq!(outcomes[1]["outcome"], "already-pulling");
    assert_eq!(outcomes[1]["started_at_unix_ms"].as_u64(), Some(started));
    assert_eq!(outcomes[2]["outcome"], "recently-failed");
    assert_eq!(outcomes[2]["failure_class"], "rate-limited");
    assert_eq!(outcomes[2]["cooldown_until_unix_ms"].as_u64(), Some(until));
    assert_eq!(outcomes[2]["started_at_unix_ms"], Value::Null);

    // The origin pull completes into the store.
    std::thread::sleep(Duration::from_millis(600));
    let (ok, v, _) = client(&["--query", &addr, "--digest", &fresh]);
    assert!(ok);
    assert_eq!(v["has_cached"], true);
    assert_eq!(v["in_flight"], false);
}

#[test]
fn enforce_mode_rejects_strangers_and_the_client_says_so() {
    let (_server, addr) = start_server(&["--authz", "enforce"]);
    let (ok, _, err) = client(&["--query", &addr, "--digest", &digest('a')]);
    assert!(!ok);
    assert!(err.contains("without a response"), "{err}");
}

#[test]
fn invalid_input_is_refused_before_sending() {
    let (ok, _, err) = client(&[
        "--query",
        "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWM5V13FgaqSvVeYKhJb5NFvc69iwHjPktmd46az7rt9fW",
        "--digest",
        "sha256:zz",
    ]);
    assert!(!ok);
    assert!(err.contains("invalid digest"), "{err}");
    let (ok, _, err) = client(&[
        "--please-pull",
        "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWM5V13FgaqSvVeYKhJb5NFvc69iwHjPktmd46az7rt9fW",
        "--registry",
        "docker.io",
        "--repository",
        "Bad/Name",
        "--kind",
        "blob",
        "--digest",
        &digest('a'),
    ]);
    assert!(!ok);
    assert!(err.contains("invalid repository"), "{err}");
}

#[test]
fn metrics_endpoint_moves_with_traffic() {
    let cached = digest('a');
    let (_server, announced) = start_server_json(&[
        "--metrics",
        "127.0.0.1:0",
        "--cached",
        &cached,
        "--origin-pull",
    ]);
    let addr = announced["listen"][0].as_str().unwrap();
    let metrics = announced["metrics"].as_str().unwrap();
    let served = r#"gantry_coord_requests_served_total{rpc="pull_intent"}"#;
    assert_eq!(scrape(metrics, served), 0.0);
    assert_eq!(scrape(metrics, "gantry_coord_open_inbound_streams"), 0.0);

    for _ in 0..2 {
        assert!(client(&["--query", addr, "--digest", &cached]).0);
    }
    let (ok, _, _) = client(&[
        "--please-pull",
        addr,
        "--registry",
        "docker.io",
        "--repository",
        "library/nginx",
        "--kind",
        "blob",
        "--digest",
        &digest('e'),
    ]);
    assert!(ok);
    assert_eq!(scrape(metrics, served), 2.0);
    assert_eq!(
        scrape(
            metrics,
            r#"gantry_coord_requests_served_total{rpc="please_pull"}"#
        ),
        1.0
    );
    assert_eq!(
        scrape(metrics, "gantry_coord_pull_intent_served_total"),
        2.0
    );
    assert_eq!(
        scrape(metrics, "gantry_coord_please_pull_served_total"),
        1.0
    );
    assert_eq!(scrape(metrics, "gantry_coord_moved_in_flight_total"), 1.0);
    assert_eq!(
        scrape(
            metrics,
            r#"gantry_coord_unauthorized_peers_total{reason="unrecognized"}"#
        ),
        3.0
    );
}

//! Delegated credentials never reach a log line, at any level, on either side.

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use common::*;
use gantry_coord::{
    Authorization, Config, Event, Member, NodeState, OriginRefKind, PleasePull, PullOrder,
    PullerPump, PumpDecision, StaticMembership,
};
use libp2p_swarm_test::SwarmExt;

const SECRET: &str = "Bearer TOPSECRET-7f3a9c";

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A pump that checks it was handed the credential, and drops it.
struct CheckingPump(Arc<Mutex<bool>>);

impl PullerPump for CheckingPump {
    fn start(&self, order: PullOrder<'_>) -> PumpDecision {
        *self.0.lock().unwrap() = order.authorization.map(|a| a.expose_secret()) == Some(SECRET);
        tracing::info!(?order, "pump asked");
        PumpDecision::Started
    }
}

#[tokio::test]
async fn authorization_appears_in_no_log_line() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let mut responder = coord(Config::default());
    let addr = listen(&mut responder).await;
    let target = *responder.local_peer_id();
    let handed = Arc::new(Mutex::new(false));
    let state = NodeState::builder(StaticMembership::new(
        "node-a",
        vec![Member::new("node-a", None)],
    ))
    .pump(CheckingPump(handed.clone()))
    .build();
    let mut events = spawn_coord(responder, move |behaviour, event| {
        tracing::info!(?event, "responder event");
        state.answer(behaviour, event)
    });

    let mut requester = coord(Config::default());
    requester.add_peer_address(target, addr);
    let request = PleasePull::new(
        "docker.io",
        "library/nginx",
        OriginRefKind::Blob,
        vec![digest(1)],
    )
    .unwrap()
    .with_authorization(Authorization::new(SECRET));
    tracing::info!(?request, "sending");
    requester.behaviour_mut().please_pull(target, &request);
    let reply = requester.next_behaviour_event().await;
    tracing::info!(?reply, "requester event");
    assert!(matches!(reply, Event::PleasePullResponse { .. }));
    assert!(matches!(
        next(&mut events).await,
        Event::ResponseSent { .. }
    ));
    assert!(*handed.lock().unwrap(), "the pump got the credential");

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("coord_inbound") && logs.contains("request read"),
        "logs were captured"
    );
    assert!(logs.contains("<redacted>"));
    assert!(
        !logs.contains("TOPSECRET"),
        "credential leaked into the logs"
    );
}

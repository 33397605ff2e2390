//! The async client handle, driven from tokio tasks while the swarm loop runs.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use gantry_coord::{
    Config, CoordinatorError, Member, MemoryStore, NodeId, NodeState, OriginRefKind,
    OutboundFailure, Outcome, PleasePull, StaticMembership,
};
use libp2p_swarm::SwarmEvent;
use libp2p_swarm_test::SwarmExt;

/// A responder answered by a node state that holds `digest(1)` and has no pump.
async fn responder() -> (libp2p_identity::PeerId, libp2p_core::Multiaddr) {
    let mut swarm = coord(Config::default());
    let addr = listen(&mut swarm).await;
    let peer = *swarm.local_peer_id();
    let store = MemoryStore::new();
    store.insert(digest(1));
    let membership = StaticMembership::new(
        "node-b",
        vec![
            Member::new("node-a", None),
            Member::new("node-b", Some(peer)),
        ],
    );
    let state = NodeState::builder(membership).store(store).build();
    // Unanswered events go to a receiver nobody reads; the loop keeps running.
    let events = spawn_coord(swarm, move |behaviour, event| {
        state.answer(behaviour, event)
    });
    std::mem::forget(events);
    (peer, addr)
}

#[tokio::test]
async fn queries_from_tasks_resolve_node_ids_three_ways() {
    let (target, addr) = responder().await;
    let mut requester = coord(Config::default());
    requester.add_peer_address(target, addr);
    let taught = requester.behaviour().coordinator();
    let resolved = requester
        .behaviour()
        .coordinator()
        .with_resolver(move |node| (node.as_str() == "by-resolver").then_some(target));
    tokio::spawn(requester.loop_on_next());

    // Parsed: the node id is the peer id's text.
    let intent = taught
        .pull_intent_query(NodeId::new(target.to_string()), &digest(1))
        .await
        .unwrap();
    assert!(intent.has_cached);
    assert_eq!(intent.in_flight_since, None);
    assert_eq!(intent.recently_failed, None);
    assert!(intent.hrw_rank.is_some());

    // Taught, on one clone; the others share it.
    taught.resolve_peer_id(NodeId::new("node-b"), target);
    let clone = taught.clone();
    let intent = tokio::spawn(async move {
        clone
            .pull_intent_query(NodeId::new("node-b"), &digest(2))
            .await
    })
    .await
    .unwrap()
    .unwrap();
    assert!(!intent.has_cached);

    // Resolver.
    let request = PleasePull::new(
        "docker.io",
        "library/nginx",
        OriginRefKind::Blob,
        vec![digest(3)],
    )
    .unwrap();
    let outcomes = resolved
        .please_pull(NodeId::new("by-resolver"), &request)
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].outcome, Outcome::Unspecified, "no pump");

    match taught
        .pull_intent_query(NodeId::new("nobody"), &digest(1))
        .await
    {
        Err(CoordinatorError::Unresolvable(node)) => assert_eq!(node.as_str(), "nobody"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_peer_that_never_completes_the_handshake_is_a_dial_timeout() {
    // A loopback TCP listener that accepts connections at the kernel and never speaks.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let stranger = libp2p_identity::PeerId::random();
    let mut requester = coord(Config::default().with_dial_timeout(Duration::from_millis(300)));
    requester.add_peer_address(
        stranger,
        format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap(),
    );
    let coordinator = requester.behaviour().coordinator();
    tokio::spawn(requester.loop_on_next());

    let started = std::time::Instant::now();
    let result = coordinator.pull_intent_query(stranger, &digest(1)).await;
    assert!(
        matches!(
            result,
            Err(CoordinatorError::Request(OutboundFailure::DialTimeout))
        ),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(silent);
}

#[tokio::test]
async fn a_dropped_call_is_cancelled_and_leaves_nothing_behind() {
    // A responder whose loop never answers.
    let mut silent = coord(Config::default().with_answer_timeout(Duration::from_secs(10)));
    let addr = listen(&mut silent).await;
    let target = *silent.local_peer_id();
    tokio::spawn(silent.loop_on_next());

    let mut requester = coord(Config::default().with_request_timeout(Duration::from_millis(400)));
    requester.add_peer_address(target, addr);
    let coordinator = requester.behaviour().coordinator();
    let call = tokio::spawn(async move { coordinator.pull_intent_query(target, &digest(1)).await });

    // Drive the requester until the request is on the wire, then drop the call.
    while requester.behaviour().pending_requests() == 0 {
        requester.next_swarm_event().await;
    }
    call.abort();
    // The request ends by its timeout, silently: no event leaks out for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while requester.behaviour().pending_requests() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request ends by its timeout"
        );
        let tick = tokio::time::sleep(Duration::from_millis(50));
        tokio::select! {
            event = requester.select_next_some() => {
                assert!(!matches!(event, SwarmEvent::Behaviour(_)), "{event:?}");
            }
            () = tick => {}
        }
    }
}

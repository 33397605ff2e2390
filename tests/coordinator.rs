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

/// A loopback TCP proxy to `target` that holds each connection for `delay` before it
/// passes a byte: a dial that takes that long.
async fn slow_proxy(target: std::net::SocketAddr, delay: Duration) -> libp2p_core::Multiaddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()
}

fn socket_addr(addr: &libp2p_core::Multiaddr) -> std::net::SocketAddr {
    use libp2p_core::multiaddr::Protocol;
    let mut ip = None;
    let mut port = None;
    for protocol in addr.iter() {
        match protocol {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Tcp(p) => port = Some(p),
            _ => {}
        }
    }
    std::net::SocketAddr::new(ip.unwrap(), port.unwrap())
}

#[tokio::test]
async fn one_budget_covers_the_dial_and_the_exchange() {
    // A responder whose loop holds every request unanswered.
    let mut holder = coord(Config::default().with_answer_timeout(Duration::from_secs(10)));
    let (_, tcp) = holder.listen().with_memory_addr_external().await;
    let target = *holder.local_peer_id();
    let held = spawn_coord(holder, |_, event| match event {
        gantry_coord::Event::PullIntentQuery { responder, .. } => Some(responder),
        _ => None,
    });
    let dial = Duration::from_millis(700);
    let budget = Duration::from_millis(1_000);
    let proxy = slow_proxy(socket_addr(&tcp), dial).await;

    let mut requester = coord(Config::default().with_request_timeout(budget));
    requester.add_peer_address(target, proxy);
    let coordinator = requester.behaviour().coordinator();
    tokio::spawn(requester.loop_on_next());
    let started = std::time::Instant::now();
    let result = coordinator.pull_intent_query(target, &digest(1)).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(
            result,
            Err(CoordinatorError::Timeout | CoordinatorError::Request(OutboundFailure::Timeout))
        ),
        "{result:?}"
    );
    // Dial and exchange share one budget: not dial + a fresh budget (1.7 s).
    assert!(elapsed >= budget, "{elapsed:?}");
    assert!(elapsed < budget + dial / 2, "{elapsed:?}");
    drop(held);
}

#[tokio::test]
async fn a_large_batch_is_split_into_requests_of_at_most_256() {
    // A responder that records the size of each request and starts nothing.
    let mut swarm = coord(Config::default());
    let addr = listen(&mut swarm).await;
    let target = *swarm.local_peer_id();
    let mut sizes = spawn_coord(swarm, |behaviour, event| match event {
        gantry_coord::Event::PleasePull {
            request, responder, ..
        } => {
            let outcomes = unspecified_outcomes(&request);
            behaviour.send_response(responder, outcomes).unwrap();
            Some(request.digests().len())
        }
        _ => None,
    });
    let mut requester = coord(Config::default());
    requester.add_peer_address(target, addr);
    let digests: Vec<_> = (0..600u32)
        .map(|n| gantry_coord::Digest::parse(&format!("sha256:{:064x}", n)).unwrap())
        .collect();
    let request = PleasePull::new(
        "docker.io",
        "library/nginx",
        OriginRefKind::Blob,
        digests.clone(),
    )
    .unwrap();

    // The behaviour alone refuses it, typed, and sends nothing.
    requester.behaviour_mut().please_pull(target, &request);
    match requester.next_behaviour_event().await {
        gantry_coord::Event::OutboundFailure { error, .. } => assert!(
            matches!(
                error,
                OutboundFailure::TooManyDigests {
                    count: 600,
                    max: 256
                }
            ),
            "{error:?}"
        ),
        other => panic!("unexpected {other:?}"),
    }

    let coordinator = requester.behaviour().coordinator();
    tokio::spawn(requester.loop_on_next());
    let outcomes = coordinator.please_pull(target, &request).await.unwrap();
    let answered: Vec<_> = outcomes.into_iter().map(|o| o.digest).collect();
    assert_eq!(answered, digests, "every digest, in request order");
    let mut seen = vec![
        next(&mut sizes).await,
        next(&mut sizes).await,
        next(&mut sizes).await,
    ];
    seen.sort_unstable();
    assert_eq!(seen, [88, 256, 256]);
}

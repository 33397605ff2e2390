//! Both RPC families end to end between two swarms on the memory transport, and the
//! typed failures a requester sees.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use futures::StreamExt;
use gantry_coord::{
    Authorization, Behaviour, Config, Event, FailureClass, InboundFailure, OriginRefKind,
    OutboundFailure, OutboundRequestId, Outcome, PleasePull, PleasePullOutcome, PullIntent,
    RecentFailure, Rpc,
};
use libp2p_swarm::Swarm;
use libp2p_swarm_test::SwarmExt;

/// What a test responder saw: an event it did not consume, or a please_pull it answered.
#[derive(Debug)]
enum Seen {
    Event(Event),
    PleasePull {
        request: PleasePull,
        skipped_digests: usize,
    },
}

fn sample_intent(now: SystemTime) -> PullIntent {
    PullIntent {
        has_cached: true,
        in_flight_since: Some(now - Duration::from_millis(1500)),
        hrw_rank: Some(2),
        recently_failed: Some(RecentFailure {
            cooldown_until: now + Duration::from_secs(30),
            class: FailureClass::RateLimited,
        }),
    }
}

fn outcomes_for(request: &PleasePull, now: SystemTime) -> Vec<PleasePullOutcome> {
    let kinds = [
        Outcome::Started { started_at: now },
        Outcome::AlreadyPulling {
            started_at: now - Duration::from_secs(3),
        },
        Outcome::RecentlyFailed(RecentFailure {
            cooldown_until: now + Duration::from_secs(10),
            class: FailureClass::NotFound,
        }),
        Outcome::Unspecified,
    ];
    request
        .digests()
        .iter()
        .zip(kinds.iter().cycle())
        .map(|(digest, outcome)| PleasePullOutcome {
            digest: *digest,
            outcome: *outcome,
        })
        .collect()
}

/// A responder that answers queries with `intent` and please_pull with one outcome per
/// digest, cycling through every outcome kind.
fn answering(
    intent: PullIntent,
    now: SystemTime,
) -> impl FnMut(&mut Behaviour, Event) -> Option<Seen> + Send + 'static {
    move |behaviour, event| match event {
        Event::PullIntentQuery { responder, .. } => {
            behaviour.send_response(responder, intent).unwrap();
            None
        }
        Event::PleasePull {
            request,
            skipped_digests,
            responder,
            ..
        } => {
            behaviour
                .send_response(responder, outcomes_for(&request, now))
                .unwrap();
            Some(Seen::PleasePull {
                request,
                skipped_digests,
            })
        }
        other => Some(Seen::Event(other)),
    }
}

/// A requester that knows the responder's address but is not connected to it.
async fn pair(
    responder_config: Config,
    requester_config: Config,
) -> (Swarm<Behaviour>, Swarm<Behaviour>) {
    let mut responder = coord(responder_config);
    let addr = listen(&mut responder).await;
    let mut requester = coord(requester_config);
    requester.add_peer_address(*responder.local_peer_id(), addr);
    (requester, responder)
}

/// Drives both swarms until the responder reports an inbound failure and the requester
/// an outbound one. Every other responder event goes to `on_responder_event`, with both
/// swarms; any other requester event fails the test.
async fn until_both_fail(
    requester: &mut Swarm<Behaviour>,
    responder: &mut Swarm<Behaviour>,
    mut on_responder_event: impl FnMut(Event, &mut Swarm<Behaviour>, &mut Swarm<Behaviour>),
) -> (InboundFailure, OutboundRequestId, OutboundFailure) {
    let (mut inbound, mut outbound) = (None, None);
    while inbound.is_none() || outbound.is_none() {
        tokio::select! {
            event = responder.next_behaviour_event() => match event {
                Event::InboundFailure { error, .. } => inbound = Some(error),
                other => on_responder_event(other, responder, requester),
            },
            event = requester.next_behaviour_event() => match event {
                Event::OutboundFailure { request_id, error, .. } => {
                    outbound = Some((request_id, error))
                }
                other => panic!("unexpected {other:?}"),
            },
        }
    }
    match (inbound, outbound) {
        (Some(inbound), Some((id, outbound))) => (inbound, id, outbound),
        _ => unreachable!("the loop ends once both are set"),
    }
}

#[tokio::test]
async fn pull_intent_round_trip_dials_and_carries_every_field() {
    let now = SystemTime::now();
    let (mut requester, responder) = pair(Config::default(), Config::default()).await;
    let target = *responder.local_peer_id();
    let mut seen = spawn_coord(responder, answering(sample_intent(now), now));

    let id = requester
        .behaviour_mut()
        .pull_intent_query(target, &digest(1));
    let event = requester
        .wait(|e| match e {
            libp2p_swarm::SwarmEvent::Behaviour(e) => Some(e),
            _ => None,
        })
        .await;
    match event {
        Event::PullIntentResponse {
            peer,
            request_id,
            intent,
        } => {
            assert_eq!((peer, request_id), (target, id));
            assert_eq!(intent, sample_intent(now));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(requester.behaviour().pending_requests(), 0);
    match next(&mut seen).await {
        Seen::Event(Event::ResponseSent { rpc, peer, .. }) => {
            assert_eq!(rpc, Rpc::PullIntent);
            assert_eq!(peer, *requester.local_peer_id());
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn pull_intent_of_an_unranked_idle_node() {
    let now = SystemTime::now();
    let (mut requester, responder) = pair(Config::default(), Config::default()).await;
    let target = *responder.local_peer_id();
    let _seen = spawn_coord(responder, answering(PullIntent::UNKNOWN, now));
    requester
        .behaviour_mut()
        .pull_intent_query(target, &digest(9));
    match requester.next_behaviour_event().await {
        Event::PullIntentResponse { intent, .. } => assert_eq!(intent, PullIntent::UNKNOWN),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn please_pull_round_trip_keeps_order_and_delegates_credentials() {
    let now = SystemTime::now();
    let (mut requester, responder) = pair(Config::default(), Config::default()).await;
    let target = *responder.local_peer_id();
    let mut seen = spawn_coord(responder, answering(PullIntent::UNKNOWN, now));

    let digests: Vec<_> = (1..=5).map(digest).collect();
    let request = PleasePull::new(
        "registry.example.com:5000",
        "library/nginx",
        OriginRefKind::Manifest,
        digests.clone(),
    )
    .unwrap()
    .with_authorization(Authorization::new("Bearer abc"));
    let id = requester.behaviour_mut().please_pull(target, &request);

    match requester.next_behaviour_event().await {
        Event::PleasePullResponse {
            peer,
            request_id,
            outcomes,
            skipped_results,
        } => {
            assert_eq!((peer, request_id), (target, id));
            assert_eq!(outcomes, outcomes_for(&request, now));
            assert_eq!(skipped_results, 0);
        }
        other => panic!("unexpected {other:?}"),
    }
    match next(&mut seen).await {
        Seen::PleasePull {
            request: received,
            skipped_digests,
        } => {
            assert_eq!(skipped_digests, 0);
            assert_eq!(received, request);
            assert_eq!(
                received.authorization().map(|a| a.expose_secret()),
                Some("Bearer abc")
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn peer_without_the_protocol_is_reported() {
    let mut other = Swarm::new_ephemeral_tokio(|_| libp2p_swarm::dummy::Behaviour);
    let addr = listen(&mut other).await;
    let target = *other.local_peer_id();
    tokio::spawn(other.loop_on_next());
    let mut requester = coord(Config::default());
    requester.add_peer_address(target, addr);

    let id = requester
        .behaviour_mut()
        .pull_intent_query(target, &digest(1));
    match requester.next_behaviour_event().await {
        Event::OutboundFailure {
            request_id,
            error: OutboundFailure::UnsupportedProtocols,
            ..
        } => assert_eq!(request_id, id),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn unreachable_peer_is_a_dial_failure() {
    let mut requester = coord(Config::default());
    let stranger = libp2p_identity::PeerId::random();
    let id = requester
        .behaviour_mut()
        .pull_intent_query(stranger, &digest(1));
    match requester.next_behaviour_event().await {
        Event::OutboundFailure {
            peer,
            request_id,
            error: OutboundFailure::DialFailure(_),
        } => assert_eq!((peer, request_id), (stranger, id)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(requester.behaviour().pending_requests(), 0);
}

#[tokio::test]
async fn unanswered_request_fails_on_both_sides_and_leaks_nothing() {
    let responder_config = Config::default().with_answer_timeout(Duration::from_millis(300));
    let requester_config = Config::default().with_request_timeout(Duration::from_secs(5));
    let (mut requester, mut responder) = pair(responder_config, requester_config).await;
    let target = *responder.local_peer_id();

    let id = requester
        .behaviour_mut()
        .pull_intent_query(target, &digest(1));
    // Drive both; the responder's loop holds the query and never answers.
    let mut held = None;
    let (responder_failure, request_id, requester_failure) =
        until_both_fail(&mut requester, &mut responder, |event, _, _| match event {
            Event::PullIntentQuery {
                responder: token, ..
            } => held = Some(token),
            other => panic!("unexpected {other:?}"),
        })
        .await;
    assert_eq!(request_id, id);
    assert!(held.is_some(), "the query arrived");
    assert_eq!(responder_failure, InboundFailure::AnswerTimeout);
    assert!(matches!(requester_failure, OutboundFailure::NoResponse));
    assert_eq!(responder.behaviour().pending_responses(), 0);
    assert_eq!(responder.behaviour().open_inbound_streams(), 0);
    assert_eq!(requester.behaviour().pending_requests(), 0);
}

#[tokio::test]
async fn requester_times_out_when_the_reply_is_late() {
    let requester_config = Config::default().with_request_timeout(Duration::from_millis(300));
    let (mut requester, mut responder) = pair(Config::default(), requester_config).await;
    let target = *responder.local_peer_id();
    let id = requester
        .behaviour_mut()
        .pull_intent_query(target, &digest(1));
    let mut held = None;
    loop {
        tokio::select! {
            event = responder.next_behaviour_event() => {
                if let Event::PullIntentQuery { responder: token, .. } = event {
                    held = Some(token);
                }
            }
            event = requester.next_behaviour_event() => match event {
                Event::OutboundFailure { request_id, error: OutboundFailure::Timeout, .. } => {
                    assert_eq!(request_id, id);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            },
        }
    }
    assert!(held.is_some(), "the responder saw the query");
    assert_eq!(requester.behaviour().pending_requests(), 0);
}

#[tokio::test]
async fn connection_closed_mid_request_fails_both_sides() {
    let (mut requester, mut responder) = pair(Config::default(), Config::default()).await;
    let target = *responder.local_peer_id();
    let id = requester
        .behaviour_mut()
        .pull_intent_query(target, &digest(1));

    let mut held = None;
    let (responder_failure, request_id, requester_failure) = until_both_fail(
        &mut requester,
        &mut responder,
        |event, _, requester| match event {
            Event::PullIntentQuery {
                responder: token, ..
            } => {
                held = Some(token);
                // The query is read and unanswered: now drop the connection.
                let _ = requester.disconnect_peer_id(target);
            }
            other => panic!("unexpected {other:?}"),
        },
    )
    .await;
    assert_eq!(request_id, id);
    assert!(matches!(
        requester_failure,
        OutboundFailure::ConnectionClosed
    ));
    assert_eq!(responder_failure, InboundFailure::ConnectionClosed);
    let token = held.expect("the query arrived");
    assert_eq!(
        responder
            .behaviour_mut()
            .send_response(token, PullIntent::UNKNOWN),
        Err(gantry_coord::ResponseError::Expired)
    );
    assert_eq!(responder.behaviour().pending_responses(), 0);
}

#[tokio::test]
async fn a_dropped_responder_closes_the_stream_at_once() {
    // Long deadlines: only the dropped token can end the request quickly.
    let (mut requester, mut responder) = pair(Config::default(), Config::default()).await;
    let target = *responder.local_peer_id();
    let started = std::time::Instant::now();
    requester
        .behaviour_mut()
        .pull_intent_query(target, &digest(1));
    let (responder_failure, _, requester_failure) =
        until_both_fail(&mut requester, &mut responder, |event, _, _| match event {
            Event::PullIntentQuery {
                responder: token, ..
            } => drop(token),
            other => panic!("unexpected {other:?}"),
        })
        .await;
    assert_eq!(responder_failure, InboundFailure::ResponseOmission);
    assert!(matches!(requester_failure, OutboundFailure::NoResponse));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "well before any deadline"
    );
    assert_eq!(responder.behaviour().pending_responses(), 0);
}

#[tokio::test]
async fn the_connection_is_kept_alive_while_pending_and_goes_idle_after() {
    use libp2p_swarm::SwarmEvent;
    // Connections close after 100 ms without a reason to stay; the answer takes 300 ms.
    let idle = Duration::from_millis(100);
    let mut responder = coord_idle(Config::default(), idle);
    responder.listen_on("/memory/0".parse().unwrap()).unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = responder.next_swarm_event().await {
            break address;
        }
    };
    let target = *responder.local_peer_id();
    let mut requester = coord_idle(Config::default(), idle);
    requester.add_peer_address(target, addr);
    requester
        .behaviour_mut()
        .pull_intent_query(target, &digest(1));

    let mut held = None;
    let answer_at = tokio::time::sleep(Duration::from_millis(300));
    tokio::pin!(answer_at);
    let mut replied = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        tokio::select! {
            event = responder.select_next_some() => {
                if let SwarmEvent::Behaviour(Event::PullIntentQuery { responder: token, .. }) = event {
                    held = Some(token);
                }
            }
            () = &mut answer_at, if held.is_some() => {
                let token = held.take().unwrap();
                responder.behaviour_mut().send_response(token, PullIntent::UNKNOWN).unwrap();
            }
            event = requester.select_next_some() => match event {
                SwarmEvent::Behaviour(Event::PullIntentResponse { .. }) => replied = true,
                SwarmEvent::Behaviour(other) => panic!("unexpected {other:?}"),
                SwarmEvent::ConnectionClosed { .. } => {
                    assert!(replied, "the connection stayed up while the request was pending");
                    break;
                }
                _ => {}
            },
            () = tokio::time::sleep_until(deadline) => panic!("the idle connection never closed"),
        }
    }
}

#[tokio::test]
async fn a_reply_over_the_cap_is_refused_and_the_stream_closed() {
    // A batch of 20 digests fits in 1,700 bytes; its 20 outcomes with timestamps do not.
    let cap = 1_700;
    let (mut requester, mut responder) = pair(
        Config::default().with_max_message_bytes(cap),
        Config::default(),
    )
    .await;
    let target = *responder.local_peer_id();
    let request = PleasePull::new(
        "registry.example.com",
        "library/demo",
        OriginRefKind::Blob,
        (1..=20).map(digest).collect(),
    )
    .unwrap();
    requester.behaviour_mut().please_pull(target, &request);
    let now = SystemTime::now();
    let mut refused = None;
    let (responder_failure, _, requester_failure) = until_both_fail(
        &mut requester,
        &mut responder,
        |event, responder, _| match event {
            Event::PleasePull {
                request,
                responder: token,
                ..
            } => {
                refused = Some(
                    responder
                        .behaviour_mut()
                        .send_response(token, outcomes_for(&request, now)),
                );
            }
            other => panic!("unexpected {other:?}"),
        },
    )
    .await;
    let Some(Err(gantry_coord::ResponseError::TooLarge { len, max })) = refused else {
        panic!("respond should refuse the reply, got {refused:?}");
    };
    assert!(len > cap as u64 && max == cap, "len {len}, max {max}");
    assert_eq!(responder_failure, InboundFailure::ResponseTooLarge { len });
    assert!(matches!(requester_failure, OutboundFailure::NoResponse));
    assert_eq!(responder.behaviour().pending_responses(), 0);
}

#[tokio::test]
async fn a_request_waits_for_a_dial_another_behaviour_started() {
    let now = SystemTime::now();
    let (mut requester, responder) = pair(Config::default(), Config::default()).await;
    let target = *responder.local_peer_id();
    let _seen = spawn_coord(responder, answering(PullIntent::UNKNOWN, now));
    // Someone else (Kademlia, say) dials the peer first: the behaviour's own dial is then
    // refused by the swarm's dial condition, and the request must wait, not fail.
    requester
        .dial(libp2p_swarm::dial_opts::DialOpts::peer_id(target).build())
        .unwrap();
    let id = requester
        .behaviour_mut()
        .pull_intent_query(target, &digest(3));
    match requester.next_behaviour_event().await {
        Event::PullIntentResponse { request_id, .. } => assert_eq!(request_id, id),
        other => panic!("unexpected {other:?}"),
    }
}

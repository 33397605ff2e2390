//! A hostile or broken peer over a real connection (memory transport): slowloris, stream
//! floods against the caps, and a responder that answers badly. Each attack is bounded,
//! costs the victim little, and leaves its bookkeeping at zero.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use gantry_coord::{
    Behaviour, Config, Event, FrameError, InboundFailure, OutboundFailure, PullIntent, StreamCap,
    PROTOCOL_NAME,
};
use libp2p_core::Multiaddr;
use libp2p_identity::PeerId;
use libp2p_swarm::{Swarm, SwarmEvent};
use libp2p_swarm_test::SwarmExt;
use wire::envelope::Msg;

/// What the victim saw.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Failure(PeerId, InboundFailure),
    Served(PeerId),
}

/// A coord node driven by the test itself, so the test can read its counters.
struct Victim {
    swarm: Swarm<Behaviour>,
    seen: Vec<Seen>,
    /// The most streams seen open at once, per peer and node-wide.
    max_open_from: std::collections::HashMap<PeerId, usize>,
    max_open: usize,
}

impl Victim {
    async fn new(config: Config) -> (Self, PeerId, Multiaddr) {
        let mut swarm = coord(config);
        let addr = listen(&mut swarm).await;
        let peer = *swarm.local_peer_id();
        let victim = Victim {
            swarm,
            seen: Vec::new(),
            max_open_from: Default::default(),
            max_open: 0,
        };
        (victim, peer, addr)
    }

    fn on_event(&mut self, event: SwarmEvent<Event>) {
        let SwarmEvent::Behaviour(event) = event else {
            return;
        };
        let behaviour = self.swarm.behaviour_mut();
        match event {
            Event::PullIntentQuery { responder, .. } => {
                let _ = behaviour.send_response(responder, PullIntent::UNKNOWN);
            }
            Event::PleasePull { responder, .. } => {
                let _ = behaviour.send_response(responder, Vec::new());
            }
            Event::InboundFailure { peer, error, .. } => self.seen.push(Seen::Failure(peer, error)),
            Event::ResponseSent { peer, .. } => self.seen.push(Seen::Served(peer)),
            _ => {}
        }
    }

    fn sample(&mut self, peers: &[PeerId]) {
        let behaviour = self.swarm.behaviour();
        self.max_open = self.max_open.max(behaviour.open_inbound_streams());
        for peer in peers {
            let open = behaviour.open_inbound_streams_from(peer);
            let max = self.max_open_from.entry(*peer).or_default();
            *max = (*max).max(open);
        }
    }

    /// Drives the victim until `done` holds, sampling its counters for `peers`.
    async fn run_until(
        &mut self,
        peers: &[PeerId],
        mut done: impl FnMut(&Behaviour, &[Seen]) -> bool,
    ) {
        let deadline = Instant::now() + TEST_TIMEOUT;
        loop {
            self.sample(peers);
            if done(self.swarm.behaviour(), &self.seen) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not reached; seen {:?}",
                self.seen
            );
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_event(event),
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    }

    fn assert_idle(&self) {
        let behaviour = self.swarm.behaviour();
        assert_eq!(behaviour.open_inbound_streams(), 0, "open streams");
        assert_eq!(behaviour.pending_responses(), 0, "pending answers");
    }
}

fn query_frame(n: u8) -> Vec<u8> {
    frame(Msg::PullIntentRequest(wire::PullIntentRequest {
        digest: digest(n).to_string(),
    }))
}

/// A well-behaved peer: `count` queries one after another, each must be answered.
fn spawn_good_peer(
    target: PeerId,
    addr: Multiaddr,
    count: usize,
) -> (PeerId, tokio::task::JoinHandle<usize>) {
    let (peer, mut control) = spawn_raw_peer(target, addr);
    let task = tokio::spawn(async move {
        let mut answered = 0;
        for n in 0..count {
            let reply = raw_exchange(&mut control, target, &query_frame(n as u8))
                .await
                .unwrap();
            assert!(matches!(
                unframe(&reply).msg,
                Some(Msg::PullIntentResponse(_))
            ));
            answered += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        answered
    });
    (peer, task)
}

#[tokio::test]
async fn slowloris_streams_die_at_the_handshake_deadline_while_others_are_served() {
    let deadline = Duration::from_millis(500);
    let config = Config::default()
        .with_handshake_timeout(deadline)
        .with_max_inbound_streams_per_peer(100);
    let (mut victim, target, addr) = Victim::new(config).await;
    let (attacker, mut control) = spawn_raw_peer(target, addr.clone());

    // 40 silent streams, 10 with half a length prefix, 10 with half a body.
    let attack = tokio::spawn(async move {
        let mut held = Vec::new();
        for i in 0..60 {
            let mut stream = control.open_stream(target, PROTOCOL_NAME).await.unwrap();
            match i {
                40..50 => stream.write_all(&[0x80]).await.unwrap(),
                50..60 => stream.write_all(&[0x10, 0x0a, 0x02, b's']).await.unwrap(),
                _ => {}
            }
            stream.flush().await.unwrap();
            held.push(stream);
        }
        let opened = Instant::now();
        // Hold them until the victim gives up on them.
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(held);
        opened
    });
    let (good, served) = spawn_good_peer(target, addr, 20);

    let timeout = Seen::Failure(attacker, InboundFailure::Timeout);
    victim
        .run_until(&[attacker], |_, seen| {
            seen.iter().filter(|s| **s == timeout).count() == 60
        })
        .await;
    let last_timeout = Instant::now();
    assert!(victim.max_open_from[&attacker] >= 50, "the attack was live");
    let good_served = Seen::Served(good);
    victim
        .run_until(&[], |_, seen| {
            served.is_finished() && seen.iter().filter(|s| **s == good_served).count() == 20
        })
        .await;
    assert_eq!(
        served.await.unwrap(),
        20,
        "the good peer was served throughout"
    );
    let opened = attack.await.unwrap();
    assert!(
        last_timeout.duration_since(opened) < Duration::from_secs(3),
        "no stream outlived its deadline by much"
    );
    victim
        .run_until(&[], |b, _| b.open_inbound_streams() == 0)
        .await;
    victim.assert_idle();
    assert_eq!(victim.seen.len(), 80, "{:?}", victim.seen);
}

/// Opens `count` silent streams; those over a cap are reset by the victim.
fn flood(
    control: libp2p_stream::Control,
    target: PeerId,
    count: usize,
) -> tokio::task::JoinHandle<Vec<libp2p_swarm::Stream>> {
    let mut control = control;
    tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..count {
            held.push(control.open_stream(target, PROTOCOL_NAME).await.unwrap());
        }
        held
    })
}

#[tokio::test]
async fn a_flooder_is_held_to_its_share_and_others_are_still_served() {
    let config = Config::default()
        .with_max_inbound_streams(16)
        .with_max_inbound_streams_per_peer(6)
        .with_handshake_timeout(Duration::from_secs(10));
    let (mut victim, target, addr) = Victim::new(config).await;
    let (flooder, control) = spawn_raw_peer(target, addr.clone());
    let held = flood(control, target, 20);
    let over_share = Seen::Failure(flooder, InboundFailure::StreamCap(StreamCap::Peer));
    victim
        .run_until(&[flooder], |_, seen| {
            seen.iter().filter(|s| **s == over_share).count() == 14
        })
        .await;
    assert_eq!(
        victim.swarm.behaviour().open_inbound_streams_from(&flooder),
        6
    );

    let (good, served) = spawn_good_peer(target, addr, 10);
    victim
        .run_until(&[flooder, good], |_, _| served.is_finished())
        .await;
    assert_eq!(served.await.unwrap(), 10);
    assert_eq!(
        victim.max_open_from[&flooder], 6,
        "never more than its share"
    );

    drop(held.await.unwrap());
    victim
        .run_until(&[], |b, _| b.open_inbound_streams() == 0)
        .await;
    victim.assert_idle();
}

#[tokio::test]
async fn floods_from_several_peers_never_pass_the_node_cap() {
    let config = Config::default()
        .with_max_inbound_streams(16)
        .with_max_inbound_streams_per_peer(6)
        .with_handshake_timeout(Duration::from_secs(10));
    let (mut victim, target, addr) = Victim::new(config).await;
    let mut peers = Vec::new();
    let mut floods = Vec::new();
    for _ in 0..4 {
        let (peer, control) = spawn_raw_peer(target, addr.clone());
        peers.push(peer);
        floods.push(flood(control, target, 10));
    }
    // 40 streams against a cap of 16: every one over it is reset and counted.
    victim
        .run_until(&peers, |_, seen| {
            seen.iter()
                .filter(|s| matches!(s, Seen::Failure(_, InboundFailure::StreamCap(_))))
                .count()
                == 24
        })
        .await;
    assert_eq!(victim.swarm.behaviour().open_inbound_streams(), 16);
    assert_eq!(victim.max_open, 16, "never over the node cap");
    assert!(victim.max_open_from.values().all(|&n| n <= 6));
    assert!(victim.seen.iter().any(|s| matches!(
        s,
        Seen::Failure(_, InboundFailure::StreamCap(StreamCap::Node))
    )));

    for flood in floods {
        drop(flood.await.unwrap());
    }
    victim
        .run_until(&[], |b, _| b.open_inbound_streams() == 0)
        .await;
    victim.assert_idle();
}

/// A raw responder that answers each stream with `reply`, or holds it open forever.
async fn raw_responder(reply: Option<Vec<u8>>) -> (PeerId, Multiaddr) {
    let (target, addr, mut incoming) = spawn_raw_responder().await;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((_, mut stream)) = incoming.next().await {
            let mut request = Vec::new();
            let _ = stream.read_to_end(&mut request).await;
            match &reply {
                Some(bytes) => {
                    let _ = stream.write_all(bytes).await;
                    let _ = stream.close().await;
                }
                None => held.push(stream),
            }
        }
    });
    (target, addr)
}

/// A requester against a raw responder that answers each stream with `reply`.
async fn requester_against(reply: Option<Vec<u8>>, timeout: Duration) -> OutboundFailure {
    let (target, addr) = raw_responder(reply).await;
    let mut requester = coord(Config::default().with_request_timeout(timeout));
    requester.add_peer_address(target, addr);
    let started = Instant::now();
    let id = requester
        .behaviour_mut()
        .pull_intent_query(target, &digest(1));
    let error = match requester.next_behaviour_event().await {
        Event::OutboundFailure {
            request_id, error, ..
        } => {
            assert_eq!(request_id, id);
            error
        }
        other => panic!("unexpected {other:?}"),
    };
    assert!(started.elapsed() < timeout + Duration::from_secs(1));
    assert_eq!(requester.behaviour().pending_requests(), 0);
    error
}

#[tokio::test]
async fn a_please_pull_result_with_a_bad_digest_is_skipped_and_the_rest_kept() {
    use wire::please_pull_response::{result::Outcome as W, Result as WireResult};
    let result = |digest: String| WireResult {
        digest,
        outcome: W::Started as i32,
        started_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        ..Default::default()
    };
    let reply = frame(Msg::PleasePullResponse(wire::PleasePullResponse {
        results: vec![
            result(digest(1).to_string()),
            result(format!("sha512:{}", "ab".repeat(64))),
            result(digest(2).to_string()),
        ],
    }));
    let (target, addr) = raw_responder(Some(reply)).await;
    let mut requester = coord(Config::default());
    requester.add_peer_address(target, addr);
    let request = gantry_coord::PleasePull::new(
        "docker.io",
        "library/nginx",
        gantry_coord::OriginRefKind::Blob,
        vec![digest(1), digest(2)],
    )
    .unwrap();
    requester.behaviour_mut().please_pull(target, &request);
    match requester.next_behaviour_event().await {
        Event::PleasePullResponse {
            outcomes,
            skipped_results,
            ..
        } => {
            let digests: Vec<_> = outcomes.into_iter().map(|o| o.digest).collect();
            assert_eq!(digests, [digest(1), digest(2)]);
            assert_eq!(skipped_results, 1);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn garbage_reply_is_malformed() {
    let error = requester_against(Some(vec![0x03, 0xff, 0xff, 0xff]), Duration::from_secs(2)).await;
    assert!(
        matches!(
            error,
            OutboundFailure::MalformedResponse(FrameError::Undecodable)
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn oversized_reply_is_refused_from_its_prefix() {
    let error = requester_against(Some(vec![0xff, 0xff, 0x7f]), Duration::from_secs(2)).await;
    assert!(
        matches!(
            error,
            OutboundFailure::MalformedResponse(FrameError::TooLarge { .. })
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn reply_of_the_wrong_family_is_unexpected() {
    let reply = frame(Msg::PleasePullResponse(wire::PleasePullResponse::default()));
    let error = requester_against(Some(reply), Duration::from_secs(2)).await;
    assert!(
        matches!(error, OutboundFailure::UnexpectedResponse),
        "{error:?}"
    );
}

#[tokio::test]
async fn closing_without_a_reply_is_a_rejection() {
    let error = requester_against(Some(Vec::new()), Duration::from_secs(2)).await;
    assert!(matches!(error, OutboundFailure::NoResponse), "{error:?}");
}

#[tokio::test]
async fn a_responder_that_never_answers_is_a_timeout() {
    let error = requester_against(None, Duration::from_millis(300)).await;
    assert!(matches!(error, OutboundFailure::Timeout), "{error:?}");
}

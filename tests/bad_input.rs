//! A peer that writes raw bytes on coord streams: each bad input is handled as
//! docs/protocol.md's responder table (§3) says, reported with its reason, and the node keeps serving.

mod common;

use std::time::Duration;

use common::*;
use futures::{AsyncReadExt, AsyncWriteExt};
use gantry_coord::{
    Behaviour, Config, DigestError, Event, FrameError, InboundFailure, Member, PullIntent,
    StaticMembership, StreamCap, PROTOCOL_NAME,
};
use libp2p_identity::PeerId;
use wire::envelope::Msg;

/// What the victim saw, in order.
#[derive(Debug, PartialEq)]
enum Seen {
    Failure(PeerId, InboundFailure),
    Query,
    PleasePull {
        digests: usize,
        skipped: usize,
    },
    /// A reply was written; with the victim's open streams and pending answers after it.
    Served {
        open: usize,
        pending: usize,
    },
    Unauthorized(PeerId),
}

/// A coord node that answers every request and reports what it saw.
async fn victim(
    config: Config,
) -> (
    PeerId,
    libp2p_core::Multiaddr,
    futures::channel::mpsc::UnboundedReceiver<Seen>,
) {
    victim_with(config, |_| {}).await
}

/// A victim whose behaviour `setup` may configure first.
async fn victim_with(
    config: Config,
    setup: impl FnOnce(&mut Behaviour),
) -> (
    PeerId,
    libp2p_core::Multiaddr,
    futures::channel::mpsc::UnboundedReceiver<Seen>,
) {
    let mut swarm = coord(config);
    setup(swarm.behaviour_mut());
    let addr = listen(&mut swarm).await;
    let peer = *swarm.local_peer_id();
    let rx = spawn_coord(swarm, |behaviour: &mut Behaviour, event| match event {
        Event::PullIntentQuery { responder, .. } => {
            behaviour
                .send_response(responder, PullIntent::UNKNOWN)
                .unwrap();
            Some(Seen::Query)
        }
        Event::PleasePull {
            request,
            skipped_digests,
            responder,
            ..
        } => {
            let outcomes = unspecified_outcomes(&request);
            behaviour.send_response(responder, outcomes).unwrap();
            Some(Seen::PleasePull {
                digests: request.digests().len(),
                skipped: skipped_digests,
            })
        }
        Event::InboundFailure { peer, error, .. } => Some(Seen::Failure(peer, error)),
        Event::ResponseSent { .. } => Some(Seen::Served {
            open: behaviour.open_inbound_streams(),
            pending: behaviour.pending_responses(),
        }),
        Event::UnauthorizedPeer { peer, .. } => Some(Seen::Unauthorized(peer)),
        _ => None,
    });
    (peer, addr, rx)
}

fn query(digest: &str) -> Vec<u8> {
    frame(Msg::PullIntentRequest(wire::PullIntentRequest {
        digest: digest.into(),
    }))
}

/// Sends `bytes`, expects the stream closed with no reply and the given failure, then
/// checks a good query on a fresh stream is still answered and nothing is left open.
async fn rejected(bytes: &[u8], want: InboundFailure) {
    let (target, addr, mut seen) = victim(Config::default()).await;
    let (me, mut control) = spawn_raw_peer(target, addr);
    let reply = raw_exchange(&mut control, target, bytes).await.unwrap();
    assert!(reply.is_empty(), "no reply to a rejected request");
    assert_eq!(next(&mut seen).await, Seen::Failure(me, want));

    let reply = raw_exchange(&mut control, target, &query(digest(7).encode().as_str()))
        .await
        .unwrap();
    assert!(matches!(unframe(&reply).msg, Some(Msg::PullIntentResponse(r)) if r.hrw_rank == -1));
    assert_eq!(next(&mut seen).await, Seen::Query);
    assert_eq!(
        next(&mut seen).await,
        Seen::Served {
            open: 0,
            pending: 0
        }
    );
}

#[tokio::test]
async fn oversized_length_prefix_is_rejected_before_reading() {
    // 1 MiB + 1, and no body at all: the cap is judged from the prefix alone.
    rejected(
        &[0x81, 0x80, 0x40],
        InboundFailure::Oversized { len: (1 << 20) + 1 },
    )
    .await;
}

#[tokio::test]
async fn non_minimal_varint_is_malformed() {
    rejected(
        &[0x80, 0x00],
        InboundFailure::Malformed(FrameError::NonMinimalLength),
    )
    .await;
}

#[tokio::test]
async fn garbage_bytes_are_malformed() {
    rejected(
        &[0x06, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        InboundFailure::Malformed(FrameError::Undecodable),
    )
    .await;
}

#[tokio::test]
async fn truncated_body_is_malformed() {
    rejected(
        &[0x10, 0x0a, 0x02],
        InboundFailure::Malformed(FrameError::Truncated),
    )
    .await;
}

#[tokio::test]
async fn empty_envelope_is_rejected() {
    rejected(&[0x00], InboundFailure::EmptyEnvelope).await;
}

#[tokio::test]
async fn response_body_sent_as_request_is_rejected() {
    let bytes = frame(Msg::PullIntentResponse(wire::PullIntentResponse {
        has_cached: true,
        ..Default::default()
    }));
    rejected(&bytes, InboundFailure::UnexpectedBody).await;
}

#[tokio::test]
async fn invalid_digest_is_rejected() {
    rejected(
        &query("sha256:not-hex"),
        InboundFailure::InvalidDigest(DigestError::InvalidLength),
    )
    .await;
}

#[tokio::test]
async fn please_pull_without_repository_is_rejected() {
    let bytes = frame(Msg::PleasePullRequest(wire::PleasePullRequest {
        digests: vec![digest(1).to_string()],
        upstream_registry: "docker.io".into(),
        ..Default::default()
    }));
    rejected(&bytes, InboundFailure::MissingOrigin).await;
}

#[tokio::test]
async fn batch_with_some_invalid_digests_answers_the_rest_in_order() {
    let (target, addr, mut seen) = victim(Config::default()).await;
    let (_, mut control) = spawn_raw_peer(target, addr);
    let digests = vec![
        digest(1).to_string(),
        "sha256:short".into(),
        digest(2).to_string(),
        "md5:d41d8cd98f00b204e9800998ecf8427e".into(),
        digest(3).to_string(),
    ];
    let bytes = frame(Msg::PleasePullRequest(wire::PleasePullRequest {
        digests,
        upstream_registry: "docker.io".into(),
        repository: "library/nginx".into(),
        ..Default::default()
    }));
    let reply = raw_exchange(&mut control, target, &bytes).await.unwrap();
    let Some(Msg::PleasePullResponse(response)) = unframe(&reply).msg else {
        panic!("expected a please_pull response");
    };
    let got: Vec<_> = response.results.iter().map(|r| r.digest.clone()).collect();
    assert_eq!(
        got,
        vec![
            digest(1).to_string(),
            digest(2).to_string(),
            digest(3).to_string()
        ]
    );
    assert_eq!(
        next(&mut seen).await,
        Seen::PleasePull {
            digests: 3,
            skipped: 2
        }
    );
}

#[tokio::test]
async fn please_pull_with_no_digests_gets_an_empty_reply() {
    let (target, addr, mut seen) = victim(Config::default()).await;
    let (_, mut control) = spawn_raw_peer(target, addr);
    let bytes = frame(Msg::PleasePullRequest(wire::PleasePullRequest {
        upstream_registry: "docker.io".into(),
        repository: "library/nginx".into(),
        ..Default::default()
    }));
    let reply = raw_exchange(&mut control, target, &bytes).await.unwrap();
    assert!(
        matches!(unframe(&reply).msg, Some(Msg::PleasePullResponse(r)) if r.results.is_empty())
    );
    assert_eq!(
        next(&mut seen).await,
        Seen::PleasePull {
            digests: 0,
            skipped: 0
        }
    );
}

/// Opens a stream and leaves it silent.
async fn open_silent(control: &mut libp2p_stream::Control, target: PeerId) -> libp2p_swarm::Stream {
    control.open_stream(target, PROTOCOL_NAME).await.unwrap()
}

#[tokio::test]
async fn node_cap_and_peer_share_hold_across_two_peers() {
    let config = Config::default()
        .with_max_inbound_streams(4)
        .with_max_inbound_streams_per_peer(3)
        .with_handshake_timeout(Duration::from_secs(15));
    let (target, addr, mut seen) = victim(config).await;
    let (a, mut control_a) = spawn_raw_peer(target, addr.clone());
    let (b, mut control_b) = spawn_raw_peer(target, addr);

    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open_silent(&mut control_a, target).await);
    }
    // A's fourth stream is over its share and reset before anything is read.
    let mut over_share = open_silent(&mut control_a, target).await;
    assert_eq!(
        next(&mut seen).await,
        Seen::Failure(a, InboundFailure::StreamCap(StreamCap::Peer))
    );
    // Reset, not closed: nothing to read, and the write side is gone too.
    let mut buf = [0u8; 1];
    assert!(matches!(over_share.read(&mut buf).await, Ok(0) | Err(_)));
    assert!(over_share
        .write_all(&query(digest(1).encode().as_str()))
        .await
        .is_err());

    // B gets the last node-wide slot; its second stream is over the node cap.
    held.push(open_silent(&mut control_b, target).await);
    let _over_cap = open_silent(&mut control_b, target).await;
    assert_eq!(
        next(&mut seen).await,
        Seen::Failure(b, InboundFailure::StreamCap(StreamCap::Node))
    );

    // A slot freed by A is usable by B again.
    let mut first = held.remove(0);
    first
        .write_all(&query(digest(1).encode().as_str()))
        .await
        .unwrap();
    first.close().await.unwrap();
    let mut reply = Vec::new();
    first.read_to_end(&mut reply).await.unwrap();
    assert_eq!(next(&mut seen).await, Seen::Query);
    assert!(matches!(next(&mut seen).await, Seen::Served { .. }));
    let reply = raw_exchange(&mut control_b, target, &query(digest(2).encode().as_str()))
        .await
        .unwrap();
    assert!(!reply.is_empty());
    assert_eq!(next(&mut seen).await, Seen::Query);
}

#[tokio::test]
async fn over_long_varint_is_malformed() {
    rejected(
        &[0xff; 10],
        InboundFailure::Malformed(FrameError::LengthOverflow),
    )
    .await;
}

#[tokio::test]
async fn newer_minor_chair_body_is_rejected_as_unexpected() {
    // Envelope field 6 (chair_offer_response, 1.1.0), length-delimited and empty.
    rejected(&[0x02, 0x32, 0x00], InboundFailure::UnexpectedBody).await;
}

#[tokio::test]
async fn please_pull_without_registry_is_rejected() {
    let bytes = frame(Msg::PleasePullRequest(wire::PleasePullRequest {
        digests: vec![digest(1).to_string()],
        repository: "library/nginx".into(),
        ..Default::default()
    }));
    rejected(&bytes, InboundFailure::MissingOrigin).await;
}

#[tokio::test]
async fn unknown_fields_and_enum_values_are_accepted() {
    let (target, addr, mut seen) = victim(Config::default()).await;
    let (_, mut control) = spawn_raw_peer(target, addr);
    // A query with an unknown field 9 (varint) appended to the request body.
    let mut request = prost::Message::encode_to_vec(&wire::PullIntentRequest {
        digest: digest(1).to_string(),
    });
    request.extend_from_slice(&[0x48, 0x07]);
    let mut envelope = vec![0x0a, request.len() as u8];
    envelope.extend_from_slice(&request);
    envelope.extend_from_slice(&[0x78, 0x01]); // unknown envelope field 15
    let mut bytes = vec![envelope.len() as u8];
    bytes.extend_from_slice(&envelope);
    let reply = raw_exchange(&mut control, target, &bytes).await.unwrap();
    assert!(matches!(
        unframe(&reply).msg,
        Some(Msg::PullIntentResponse(_))
    ));
    assert_eq!(next(&mut seen).await, Seen::Query);

    // A please_pull with a kind this version does not know reads as a blob pull.
    let bytes = frame(Msg::PleasePullRequest(wire::PleasePullRequest {
        digests: vec![digest(2).to_string()],
        upstream_registry: "docker.io".into(),
        repository: "library/nginx".into(),
        kind: 42,
        ..Default::default()
    }));
    let reply = raw_exchange(&mut control, target, &bytes).await.unwrap();
    assert!(
        matches!(unframe(&reply).msg, Some(Msg::PleasePullResponse(r)) if r.results.len() == 1)
    );
}

#[tokio::test]
async fn huge_batch_near_the_cap_is_answered_in_full() {
    let (target, addr, mut seen) = victim(Config::default()).await;
    let (_, mut control) = spawn_raw_peer(target, addr);
    let digests: Vec<String> = (0..13_000u32)
        .map(|n| format!("sha256:{:064x}", n))
        .collect();
    let bytes = frame(Msg::PleasePullRequest(wire::PleasePullRequest {
        digests,
        upstream_registry: "docker.io".into(),
        repository: "library/nginx".into(),
        ..Default::default()
    }));
    assert!(
        bytes.len() > 900_000 && bytes.len() < 1 << 20,
        "{}",
        bytes.len()
    );
    let reply = raw_exchange(&mut control, target, &bytes).await.unwrap();
    let Some(Msg::PleasePullResponse(response)) = unframe(&reply).msg else {
        panic!("expected a please_pull response");
    };
    assert_eq!(response.results.len(), 13_000);
    assert_eq!(
        response.results[12_999].digest,
        format!("sha256:{:064x}", 12_999)
    );
    assert_eq!(
        next(&mut seen).await,
        Seen::PleasePull {
            digests: 13_000,
            skipped: 0
        }
    );
    assert_eq!(
        next(&mut seen).await,
        Seen::Served {
            open: 0,
            pending: 0
        }
    );
}

/// Asks for `digest(1)` on a fresh stream; the raw reply.
async fn ask(control: &mut libp2p_stream::Control, target: PeerId) -> Vec<u8> {
    raw_exchange(control, target, &query(digest(1).encode().as_str()))
        .await
        .unwrap()
}

fn is_answer(reply: &[u8]) -> bool {
    matches!(unframe(reply).msg, Some(Msg::PullIntentResponse(_)))
}

fn enforcing() -> Config {
    Config::default().with_authorization_mode(gantry_coord::AuthorizationMode::Enforce)
}

fn membership(peers: &[PeerId]) -> StaticMembership {
    StaticMembership::new("victim", members(peers))
}

fn members(peers: &[PeerId]) -> Vec<Member> {
    peers
        .iter()
        .enumerate()
        .map(|(n, peer)| Member::new(format!("node-{n}"), Some(*peer)))
        .collect()
}

#[tokio::test]
async fn enforce_mode_checks_each_request_against_the_current_snapshot() {
    let member = PeerId::random();
    let view = membership(&[member]);
    let wired = view.clone();
    let (target, addr, mut seen) = victim_with(enforcing(), |b| b.authorize_with(wired)).await;
    let (me, mut control) = spawn_raw_peer(target, addr);
    assert!(ask(&mut control, target).await.is_empty());
    assert_eq!(next(&mut seen).await, Seen::Unauthorized(me));
    assert_eq!(
        next(&mut seen).await,
        Seen::Failure(
            me,
            InboundFailure::Unauthorized(gantry_coord::UnauthorizedReason::Unrecognized)
        )
    );

    // The node joins the membership: its next request is served, with nothing pushed
    // into the behaviour.
    view.set_members(members(&[member, me]));
    assert!(is_answer(&ask(&mut control, target).await));
    assert_eq!(next(&mut seen).await, Seen::Query);

    // And it leaves again: refused at once.
    view.set_members(members(&[member]));
    assert!(ask(&mut control, target).await.is_empty());
}

#[tokio::test]
async fn authorization_runs_before_validation() {
    let view = membership(&[PeerId::random()]);
    let (target, addr, mut seen) = victim_with(enforcing(), |b| b.authorize_with(view)).await;
    let (me, mut control) = spawn_raw_peer(target, addr);
    let reply = raw_exchange(&mut control, target, &query("sha256:bogus"))
        .await
        .unwrap();
    assert!(reply.is_empty());
    assert_eq!(next(&mut seen).await, Seen::Unauthorized(me));
    assert_eq!(
        next(&mut seen).await,
        Seen::Failure(
            me,
            InboundFailure::Unauthorized(gantry_coord::UnauthorizedReason::Unrecognized)
        ),
        "refused as a stranger, not as invalid input"
    );
}

#[tokio::test]
async fn enforce_mode_without_a_membership_allows_everyone() {
    let (target, addr, mut seen) = victim(enforcing()).await;
    let (_, mut control) = spawn_raw_peer(target, addr);
    assert!(is_answer(&ask(&mut control, target).await));
    assert_eq!(next(&mut seen).await, Seen::Query);
}

#[tokio::test]
async fn enforce_mode_refuses_while_unevaluable_and_observe_mode_stays_quiet() {
    let cold = || StaticMembership::new("victim", vec![Member::new("node-0", None)]);
    let (target, addr, mut seen) = victim_with(enforcing(), |b| b.authorize_with(cold())).await;
    let (me, mut control) = spawn_raw_peer(target, addr);
    assert!(ask(&mut control, target).await.is_empty());
    assert_eq!(next(&mut seen).await, Seen::Unauthorized(me));

    let (target, addr, mut seen) =
        victim_with(Config::default(), |b| b.authorize_with(cold())).await;
    let (_, mut control) = spawn_raw_peer(target, addr);
    assert!(is_answer(&ask(&mut control, target).await));
    assert_eq!(
        next(&mut seen).await,
        Seen::Query,
        "served, and no unauthorized report while nobody can be checked"
    );
}

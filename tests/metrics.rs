//! The behaviour's Prometheus instruments move with what happens on the wire.
#![cfg(feature = "metrics")]

mod common;

use common::*;
use gantry_coord::{Config, Event, PullIntent};
use libp2p_swarm_test::SwarmExt;
use prometheus_client::{encoding::text::encode, registry::Registry};

fn sample(registry: &Registry, name: &str) -> f64 {
    let mut text = String::new();
    encode(&mut text, registry).unwrap();
    sample_value(&text, name)
}

#[tokio::test]
async fn stream_errors_served_requests_and_latency_are_recorded() {
    let mut victim = coord(Config::default());
    let mut victim_registry = Registry::default();
    victim
        .behaviour_mut()
        .register_metrics(&mut victim_registry);
    let addr = listen(&mut victim).await;
    let target = *victim.local_peer_id();

    let mut requester = coord(Config::default());
    let mut requester_registry = Registry::default();
    requester
        .behaviour_mut()
        .register_metrics(&mut requester_registry);
    requester.add_peer_address(target, addr.clone());
    let (_, mut control) = spawn_raw_peer(target, addr);

    requester
        .behaviour_mut()
        .pull_intent_query(target, &digest(1));
    let bad = tokio::spawn(async move {
        for bytes in [&[0x03, 0xff, 0xff, 0xff][..], &[0x00]] {
            assert!(raw_exchange(&mut control, target, bytes)
                .await
                .unwrap()
                .is_empty());
        }
    });
    let mut replied = false;
    let mut errors = 0;
    let mut served = false;
    while !(replied && served && errors == 2) {
        tokio::select! {
            event = victim.next_behaviour_event() => match event {
                Event::PullIntentQuery { responder, .. } => {
                    victim.behaviour_mut().send_response(responder, PullIntent::UNKNOWN).unwrap();
                }
                Event::InboundFailure { .. } => errors += 1,
                Event::ResponseSent { .. } => served = true,
                _ => {}
            },
            event = requester.next_behaviour_event() => {
                assert!(matches!(event, Event::PullIntentResponse { .. }), "{event:?}");
                replied = true;
            }
        }
    }
    bad.await.unwrap();
    assert_eq!(
        sample(
            &victim_registry,
            r#"gantry_coord_stream_errors_total{reason="malformed"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &victim_registry,
            r#"gantry_coord_stream_errors_total{reason="empty"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &victim_registry,
            r#"gantry_coord_requests_served_total{rpc="pull_intent"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&victim_registry, "gantry_coord_open_inbound_streams"),
        0.0
    );
    assert_eq!(
        sample(
            &requester_registry,
            r#"gantry_coord_request_duration_seconds_count{rpc="pull_intent"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn an_enforced_rejection_counts_as_an_unauthorized_peer_not_a_stream_error() {
    use gantry_coord::{AuthorizationMode, Member, StaticMembership};
    let mut victim = coord(Config::default().with_authorization_mode(AuthorizationMode::Enforce));
    let mut registry = Registry::default();
    victim.behaviour_mut().register_metrics(&mut registry);
    let member = Member::new("member", Some(libp2p_identity::PeerId::random()));
    victim
        .behaviour_mut()
        .authorize_with(StaticMembership::new("victim", vec![member]));
    let addr = listen(&mut victim).await;
    let target = *victim.local_peer_id();
    let mut requester = coord(Config::default());
    requester.add_peer_address(target, addr);
    requester
        .behaviour_mut()
        .pull_intent_query(target, &digest(1));
    let mut failed = false;
    let mut refused = false;
    while !(failed && refused) {
        tokio::select! {
            event = victim.next_behaviour_event() => {
                if matches!(event, Event::InboundFailure { .. }) {
                    failed = true;
                }
            }
            event = requester.next_behaviour_event() => {
                assert!(
                    matches!(event, Event::OutboundFailure { error: gantry_coord::OutboundFailure::NoResponse, .. }),
                    "{event:?}"
                );
                refused = true;
            }
        }
    }
    assert_eq!(
        sample(
            &registry,
            r#"gantry_coord_unauthorized_peers_total{reason="unrecognized"}"#
        ),
        1.0
    );
    let mut text = String::new();
    encode(&mut text, &registry).unwrap();
    assert!(
        !text.contains("gantry_coord_stream_errors_total"),
        "no stream error for an authorization decision:\n{text}"
    );
}

//! rust-libp2p's `file-sharing` example, with coord in the place of `request-response`:
//! Kademlia provider records say who has a thing; coord asks a provider about it.
//!
//! `cargo run --example file_sharing` runs a provider and a getter in one process over
//! loopback TCP. The provider caches a blob and announces it; the getter finds the
//! provider through Kademlia, asks it with pull_intent_query whether it holds the blob
//! (and would ask it to pull from the origin with please_pull if nobody did), and exits.
//!
//! The swap is small: the behaviour field, one event arm, and the request and response
//! types, which are this crate's instead of a codec of your own.

mod common;

use std::time::Duration;

use common::{build_swarm, NodeBehaviour, NodeBehaviourEvent};
use futures::StreamExt;
use gantry_coord::{Config, Digest, Event, MemoryStore, NodeState, StaticMembership};
use libp2p::{
    identity::Keypair, kad, multiaddr::Protocol, swarm::SwarmEvent, Multiaddr, PeerId, Swarm,
};

/// The thing shared: a blob named by its digest (file-sharing names files by string).
fn blob() -> Digest {
    Digest::parse("sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae")
        .expect("a valid digest")
}

fn key(digest: &Digest) -> kad::RecordKey {
    kad::RecordKey::new(&digest.encode().as_str())
}

/// Runs a swarm's loop forever, answering coord requests from `state`.
async fn serve(mut swarm: Swarm<NodeBehaviour>, state: NodeState) {
    loop {
        if let SwarmEvent::Behaviour(NodeBehaviourEvent::Coord(event)) =
            swarm.select_next_some().await
        {
            // file-sharing answers `InboundRequest` with `send_response` here.
            state.answer(&mut swarm.behaviour_mut().coord, event);
        }
    }
}

async fn provider() -> Result<(PeerId, Multiaddr), Box<dyn std::error::Error>> {
    let mut swarm = build_swarm(Keypair::generate_ed25519(), Config::default())?;
    let peer = *swarm.local_peer_id();
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address.with(Protocol::P2p(peer));
        }
    };
    let store = MemoryStore::new();
    store.insert(blob());
    let membership = StaticMembership::new(peer.to_string().as_str(), vec![]);
    let state = NodeState::builder(membership).store(store).build();
    swarm.behaviour_mut().kad.start_providing(key(&blob()))?;
    tokio::spawn(serve(swarm, state));
    Ok((peer, addr))
}

async fn get(provider: PeerId, addr: Multiaddr) -> Result<PeerId, Box<dyn std::error::Error>> {
    let mut swarm = build_swarm(Keypair::generate_ed25519(), Config::default())?;
    swarm.behaviour_mut().kad.add_address(&provider, addr);
    swarm.behaviour_mut().kad.get_providers(key(&blob()));
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::Behaviour(NodeBehaviourEvent::Kad(
                kad::Event::OutboundQueryProgressed {
                    result:
                        kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                            providers,
                            ..
                        })),
                    ..
                },
            )) => {
                for peer in providers {
                    println!("provider: {peer}");
                    // file-sharing sends `FileRequest` with `send_request` here.
                    swarm.behaviour_mut().coord.pull_intent_query(peer, &blob());
                }
            }
            // file-sharing matches `request_response::Message::Response` here.
            SwarmEvent::Behaviour(NodeBehaviourEvent::Coord(Event::PullIntentResponse {
                peer,
                intent,
                ..
            })) => {
                if intent.has_cached {
                    return Ok(peer);
                }
                println!(
                    "{peer} does not hold it (in flight since {:?})",
                    intent.in_flight_since
                );
            }
            SwarmEvent::Behaviour(NodeBehaviourEvent::Coord(Event::OutboundFailure {
                peer,
                error,
                ..
            })) => {
                println!("asking {peer} failed: {error}");
            }
            _ => {}
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (peer, addr) = provider().await?;
    println!("providing {} from {addr}", blob());
    let holder = tokio::time::timeout(Duration::from_secs(20), get(peer, addr)).await??;
    println!("found {} cached at {holder}", blob());
    Ok(())
}

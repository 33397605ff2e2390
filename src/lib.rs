//! The Gantry coordination protocol, `/gantry/coord/1.0.0`, as a libp2p
//! [`NetworkBehaviour`](libp2p_swarm::NetworkBehaviour).
//!
//! Nodes of a cluster that spreads container images peer to peer ask each other "do you
//! have this digest, are you pulling it, did you just fail?" ([`Behaviour::pull_intent_query`])
//! and ask the one node that rendezvous hashing designates to pull from the origin
//! registry ([`Behaviour::please_pull`]), so the origin sees each blob once per cluster.
//! The wire format is that of the Go Gantry nodes, byte for byte; `docs/protocol.md` in
//! the repository is the contract (framing, limits, what a responder does with each input,
//! HRW, authorization, the cascade's rules and their Go sources).
//!
//! Inbound requests arrive as [`Event::PullIntentQuery`] and [`Event::PleasePull`]; the
//! swarm loop responds to each synchronously with [`Behaviour::send_response`] before the answer
//! deadline. Every outbound request id ends in exactly one response event or one
//! [`Event::OutboundFailure`].
//!
//! # Example
//!
//! Compose the behaviour beside others with `#[derive(NetworkBehaviour)]` and respond to
//! inbound queries from the swarm loop, here from a [`NodeState`]:
//!
//! ```no_run
//! use futures::StreamExt;
//! use gantry_coord::{Config, Digest, Event, Member, NodeState, StaticMembership};
//! use libp2p::{identify, swarm::{NetworkBehaviour, SwarmEvent}, Swarm};
//!
//! #[derive(NetworkBehaviour)]
//! struct Node {
//!     identify: identify::Behaviour,
//!     coord: gantry_coord::Behaviour,
//! }
//!
//! async fn run(mut swarm: Swarm<Node>, state: NodeState, peer: libp2p::PeerId) {
//!     let digest = Digest::parse(
//!         "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
//!     )
//!     .unwrap();
//!     // Ask a peer; the response comes back as an event with the same request id.
//!     let asked = swarm.behaviour_mut().coord.pull_intent_query(peer, &digest);
//!     loop {
//!         match swarm.select_next_some().await {
//!             SwarmEvent::Behaviour(NodeEvent::Coord(Event::PullIntentResponse {
//!                 request_id, intent, ..
//!             })) if request_id == asked => println!("{peer} says {intent:?}"),
//!             // Answers queries and please_pull requests; hands back every other event.
//!             SwarmEvent::Behaviour(NodeEvent::Coord(event)) => {
//!                 if let Some(other) = state.answer(&mut swarm.behaviour_mut().coord, event) {
//!                     println!("{other:?}");
//!                 }
//!             }
//!             _ => {}
//!         }
//!     }
//! }
//!
//! # fn node(key: &libp2p::identity::Keypair) -> Node {
//! #     let identify = identify::Behaviour::new(identify::Config::new("/app/1".into(), key.public()));
//! #     let coord = gantry_coord::Behaviour::new(Config::default());
//! #     let membership = StaticMembership::new("node-a", vec![Member::new("node-a", None)]);
//! #     let _state = NodeState::builder(membership).build();
//! #     Node { identify, coord }
//! # }
//! ```
//!
//! Without a [`NodeState`], respond with [`Behaviour::send_response`] directly: the event
//! carries a [`Responder`] whose type parameter is the response's type. Code outside the swarm loop
//! uses [`Behaviour::coordinator`], a cloneable async handle.

//! # Layers
//!
//! The protocol layer ([`Behaviour`], its [`Handler`], [`Coordinator`], the wire) speaks
//! `/gantry/coord/1.0.0` and decides nothing. The node layer decides: [`NodeState`]
//! answers from a content store, an in-flight map, a negative cache and the membership
//! (ranked by [`hrw`]); [`ColdStart`] resolves a digest the node lacks through the
//! cascade of the Go nodes ([`Cascade`], a state machine over answers and time), asking
//! peers through a [`Coordinator`] and providers through a [`ProviderLookup`]. The node
//! layer uses only the protocol layer's public API, so an application may replace any
//! of it and keep the protocol.
//!
//! ```no_run
//! # async fn cold(coordinator: gantry_coord::Coordinator, state: gantry_coord::NodeState,
//! #               digest: gantry_coord::Digest) {
//! use gantry_coord::{BlobRef, CascadeConfig, ColdStart, NoProviders, Origin, OriginRefKind};
//!
//! let resolver = ColdStart::new(coordinator, state, NoProviders, CascadeConfig::default());
//! let origin = Origin::new("docker.io", "library/nginx").unwrap();
//! let layer = BlobRef::new(digest, OriginRefKind::Blob);
//! let resolution = resolver.resolve(&origin, layer).await;
//! println!("{:?} decided: {:?}", resolution.rule, resolution.result);
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod authorize;
mod behaviour;
mod budget;
mod client;
mod codec;
mod config;
mod deadlines;
mod digest;
mod failure;
mod handler;
mod message;
#[cfg(feature = "metrics")]
mod metrics;
mod name;
mod node;
mod node_id;
mod protocol;
mod stream_set;
mod time;

/// Types generated from `proto/coord.proto`: never part of the public API; open to the
/// fuzz targets only, in cargo-fuzz's `cfg(fuzzing)` builds.
#[cfg(fuzzing)]
#[allow(missing_docs, clippy::all)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/gantry.coord.v1.rs"));
}
#[cfg(not(fuzzing))]
#[allow(clippy::all)]
mod wire {
    include!(concat!(env!("OUT_DIR"), "/gantry.coord.v1.rs"));
}

/// The fuzz targets' entry points: in cargo-fuzz's builds, and in the unit tests that run
/// their checks on seeds.
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzzing;

pub use authorize::PeerAuthorizer;
pub use behaviour::{Behaviour, Event, InboundRequestId, OutboundRequestId, Responder};
pub use budget::StreamCap;
pub use client::{Coordinator, CoordinatorError, Resolver, Target};
pub use codec::FrameError;
pub use config::{AuthorizationMode, Config};
pub use digest::{Digest, DigestError, EncodedDigest};
pub use failure::{InboundFailure, OutboundFailure, ResponseError, UnauthorizedReason};
pub use handler::Handler;
pub use message::{
    Authorization, FailureClass, Origin, OriginRefKind, Outcome, PleasePull, PleasePullError,
    PleasePullOutcome, PullIntent, RecentFailure, MAX_DIGESTS_PER_PLEASE_PULL,
};
pub use node::{
    hrw, stale_after, Action, BlobRef, Cascade, CascadeConfig, Claim, Clock, ColdStart,
    ColdStartError, ContentStore, Expansion, FailureCache, FallbackConfig, FallbackDeclined,
    FallbackPermit, Fetch, InFlightMap, InFlightPulls, Member, Membership, MemoryStore,
    NegativeCache, NoProviders, NodeState, NodeStateBuilder, Now, Obtained, OriginFallback,
    OriginRefused, OutOfTurn, ProbeAnswer, ProviderLookup, PullOrder, PullerPump, PumpDecision,
    Resolution, Rule, Signals, Source, Stalls, StaticMembership, StoreLookup, SystemClock,
};
#[cfg(feature = "kad")]
pub use node::{
    kad_config, kad_providers, provider_key, KadLookups, KadProviders, Lookup, KAD_PROTOCOL,
};
pub use node_id::NodeId;
pub use protocol::{Rpc, PROTOCOL_NAME};

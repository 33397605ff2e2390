//! The Gantry coordination protocol, `/gantry/coord/1.0.0`, as a libp2p
//! [`NetworkBehaviour`](libp2p_swarm::NetworkBehaviour).
//!
//! Nodes of a cluster that spreads container images peer to peer ask each other "do you
//! have this digest, are you pulling it, did you just fail?" ([`Behaviour::pull_intent_query`])
//! and ask the one node that rendezvous hashing designates to pull from the origin
//! registry ([`Behaviour::please_pull`]), so the origin sees each blob once per cluster.
//! The wire format is that of the Go Gantry nodes, byte for byte.
//!
//! Inbound requests arrive as [`Event::PullIntentQuery`] and [`Event::PleasePull`]; the
//! swarm loop answers each synchronously with [`Behaviour::respond`] before the answer
//! deadline. Every outbound request id ends in exactly one reply event or one
//! [`Event::OutboundFailure`].
//!
//! # Example
//!
//! A swarm loop that composes the behaviour and answers every query. `swarm` is any
//! [`Swarm`](libp2p_swarm::Swarm) whose behaviour holds a coord [`Behaviour`].
//!
//! ```no_run
//! use futures::StreamExt;
//! use gantry_coord::{Behaviour, Config, Event, PullIntent};
//! use libp2p_swarm::{Swarm, SwarmEvent};
//!
//! async fn serve(mut swarm: Swarm<Behaviour>) {
//!     loop {
//!         match swarm.select_next_some().await {
//!             SwarmEvent::Behaviour(Event::PullIntentQuery { digest, responder, .. }) => {
//!                 let intent = PullIntent {
//!                     has_cached: digest.algorithm() == "sha256",
//!                     ..PullIntent::UNKNOWN
//!                 };
//!                 // The request may have expired meanwhile; nothing else can fail here.
//!                 let _ = swarm.behaviour_mut().respond(responder, intent);
//!             }
//!             SwarmEvent::Behaviour(Event::PullIntentReply { peer, intent, .. }) => {
//!                 println!("{peer} answered {intent:?}");
//!             }
//!             _ => {}
//!         }
//!     }
//! }
//! # let _ = Behaviour::new(Config::default());
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod behaviour;
mod budget;
mod client;
mod codec;
mod config;
mod digest;
mod failure;
mod handler;
pub mod hrw;
mod inflight;
mod membership;
mod message;
mod negative_cache;
mod node;
mod store;

/// Types generated from `proto/coord.proto`; never part of the public API.
#[allow(missing_docs, clippy::all)]
mod wire {
    include!(concat!(env!("OUT_DIR"), "/gantry.coord.v1.rs"));
}

pub use behaviour::{
    Behaviour, Event, InboundRequestId, OutboundRequestId, PleasePullResponder,
    PullIntentResponder, Responder, Rpc,
};
pub use budget::StreamCap;
pub use client::{Coordinator, CoordinatorError, Resolver, Target};
pub use codec::FrameError;
pub use config::{AuthorizationMode, Config};
pub use digest::{Digest, DigestError};
pub use failure::{InboundFailure, OutboundFailure, RespondError, UnauthorizedReason};
pub use handler::Handler;
pub use inflight::{stale_after, InFlightMap, InFlightPulls};
pub use membership::{published_peer_ids, Member, Membership, NodeId, StaticMembership};
pub use message::{
    Authorization, FailureClass, OriginRefKind, Outcome, PleasePull, PleasePullError,
    PleasePullOutcome, PullIntent, RecentFailure, MAX_DIGESTS_PER_PLEASE_PULL,
};
pub use negative_cache::{FailureCache, NegativeCache};
pub use node::{
    Clock, NodeState, NodeStateBuilder, PullOrder, PullerPump, PumpDecision, Signals, SystemClock,
};
pub use store::{ContentStore, MemoryStore, StoreLookup};

/// The protocol this crate speaks.
pub const PROTOCOL_NAME: libp2p_swarm::StreamProtocol =
    libp2p_swarm::StreamProtocol::new("/gantry/coord/1.0.0");

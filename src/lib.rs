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
//! Compose the behaviour beside others with `#[derive(NetworkBehaviour)]` and answer
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
//!     // Ask a peer; the reply comes back as an event with the same request id.
//!     let asked = swarm.behaviour_mut().coord.pull_intent_query(peer, &digest);
//!     loop {
//!         match swarm.select_next_some().await {
//!             SwarmEvent::Behaviour(NodeEvent::Coord(Event::PullIntentReply {
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
//! Without a [`NodeState`], answer with [`Behaviour::respond`] directly: the event carries
//! a responder token whose reply type matches the request. Code outside the swarm loop
//! uses [`Behaviour::coordinator`], a cloneable async handle.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod authorize;
mod behaviour;
mod budget;
mod client;
mod codec;
mod config;
mod digest;
mod failure;
mod handler;
mod message;
#[cfg(feature = "metrics")]
mod metrics;
mod node;
mod node_id;
mod schedule;

/// Types generated from `proto/coord.proto`; never part of the public API.
#[allow(missing_docs, clippy::all)]
mod wire {
    include!(concat!(env!("OUT_DIR"), "/gantry.coord.v1.rs"));
}

pub use authorize::PeerAuthorizer;
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
pub use message::{
    Authorization, FailureClass, OriginRefKind, Outcome, PleasePull, PleasePullError,
    PleasePullOutcome, PullIntent, RecentFailure, MAX_DIGESTS_PER_PLEASE_PULL,
};
pub use node::{
    hrw, stale_after, Claim, Clock, ContentStore, FailureCache, InFlightMap, InFlightPulls, Member,
    Membership, MemoryStore, NegativeCache, NodeState, NodeStateBuilder, PullOrder, PullerPump,
    PumpDecision, Signals, StaticMembership, StoreLookup, SystemClock,
};
pub use node_id::NodeId;

/// Entry points for the fuzz targets in `fuzz/`; not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    use futures::AsyncRead;
    use prost::Message;

    use crate::{codec, message, wire, FrameError};

    /// The body length a frame's length prefix declares and the prefix's size, as the
    /// reader judges `bytes` one at a time under the cap `max`.
    pub fn length_prefix(bytes: &[u8], max: usize) -> Result<(usize, usize), FrameError> {
        let mut prefix = codec::LengthPrefix::default();
        for (i, &byte) in bytes.iter().enumerate() {
            if let Some(len) = prefix.push(byte, max)? {
                return Ok((len, i + 1));
            }
        }
        Err(FrameError::Truncated)
    }

    /// Reads `bytes` as a request stream would arrive, in chunks whose sizes come from the
    /// input, and checks the incremental reader agrees with the in-memory decoder.
    pub fn frame_decoder(data: &[u8]) {
        let Some((&chunk, bytes)) = data.split_first() else {
            return;
        };
        let max = 64 << 10;
        let mut reader = Chunked {
            bytes,
            chunk: usize::from(chunk % 16) + 1,
        };
        let mut frame = codec::FrameReader::default();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let streamed = match frame.poll_read(&mut reader, &mut cx, max) {
            Poll::Ready(result) => result,
            Poll::Pending => unreachable!("an in-memory reader never waits"),
        };
        // The reader never reads past its frame, so the bytes it consumed are the frame.
        let consumed = bytes.len() - reader.bytes.len();
        let whole = codec::decode_frame(&bytes[..consumed], max);
        match (streamed, whole) {
            (Ok((envelope, len)), Ok(expected)) => {
                assert_eq!(envelope, expected);
                assert!(len <= max && len < consumed);
            }
            (Err(codec::ReadError::Frame(a)), Err(b)) => assert_eq!(a, b),
            (Err(codec::ReadError::Closed), Err(codec::FrameError::Truncated)) => {
                assert_eq!(consumed, 0)
            }
            (streamed, whole) => panic!("disagree: {streamed:?} vs {whole:?}"),
        }
    }

    /// Judges `data` as a request envelope body; an accepted request re-encodes to a body
    /// that is judged the same way.
    pub fn request_validation(data: &[u8]) {
        let Ok(envelope) = wire::Envelope::decode(data) else {
            return;
        };
        let Ok(request) = message::WireRequest::from_wire(envelope, data.len()) else {
            return;
        };
        let again = match &request {
            message::WireRequest::PullIntent(digest) => message::pull_intent_request(digest),
            message::WireRequest::PleasePull { request, .. } => {
                message::please_pull_request(request)
            }
        };
        let body = again.encode_to_vec();
        match (request, message::WireRequest::from_wire(again, body.len())) {
            (message::WireRequest::PullIntent(a), Ok(message::WireRequest::PullIntent(b))) => {
                assert_eq!(a, b)
            }
            (
                message::WireRequest::PleasePull { request: a, .. },
                Ok(message::WireRequest::PleasePull {
                    request: b,
                    skipped_digests: 0,
                }),
            ) => assert_eq!(a, b),
            (a, b) => panic!("re-encoded request judged differently: {a:?} vs {b:?}"),
        }
    }

    /// Decodes `data` as a reply envelope body to either request, as a requester's
    /// connection does: a reply of the other family is refused, a please_pull reply keeps
    /// one outcome per valid result and counts the rest, and no time read from the peer
    /// lies beyond the bounds.
    pub fn reply_decoding(data: &[u8]) {
        use crate::{client::Reply, Outcome, Rpc};
        use std::time::{Duration, SystemTime};
        use wire::envelope::Msg;

        let Ok(envelope) = wire::Envelope::decode(data) else {
            return;
        };
        let max_cooldown = Duration::from_secs(3600);
        let results = match &envelope.msg {
            Some(Msg::PleasePullResponse(msg)) => msg.results.len(),
            _ => 0,
        };
        for rpc in [Rpc::PullIntent, Rpc::PleasePull] {
            let family_matches = matches!(
                (rpc, &envelope.msg),
                (Rpc::PullIntent, Some(Msg::PullIntentResponse(_)))
                    | (Rpc::PleasePull, Some(Msg::PleasePullResponse(_)))
            );
            let decoded = message::decode_reply(rpc, envelope.clone(), max_cooldown);
            let now = SystemTime::now();
            let latest_cooldown = now + max_cooldown;
            match decoded {
                Err(_) => {}
                Ok(_) if !family_matches => panic!("a {rpc:?} reply of the other family"),
                Ok(Reply::PullIntent(intent)) => {
                    assert!(intent.in_flight_since.is_none_or(|t| t <= now));
                    assert!(intent
                        .recently_failed
                        .is_none_or(|f| f.cooldown_until <= latest_cooldown));
                }
                Ok(Reply::PleasePull {
                    outcomes,
                    skipped_results,
                }) => {
                    assert_eq!(outcomes.len() + skipped_results, results);
                    for outcome in outcomes {
                        match outcome.outcome {
                            Outcome::Started { started_at }
                            | Outcome::AlreadyPulling { started_at } => assert!(started_at <= now),
                            Outcome::RecentlyFailed(f) => {
                                assert!(f.cooldown_until <= latest_cooldown)
                            }
                            Outcome::Unspecified => {}
                        }
                    }
                }
            }
        }
    }

    struct Chunked<'a> {
        bytes: &'a [u8],
        chunk: usize,
    }

    impl AsyncRead for Chunked<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = self.chunk.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Poll::Ready(Ok(n))
        }
    }
}

/// The protocol this crate speaks.
pub const PROTOCOL_NAME: libp2p_swarm::StreamProtocol =
    libp2p_swarm::StreamProtocol::new("/gantry/coord/1.0.0");

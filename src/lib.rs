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
#[cfg(feature = "metrics")]
mod metrics;
mod negative_cache;
mod node;
mod schedule;
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

/// Entry points for the fuzz targets in `fuzz/`; not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    use futures::AsyncRead;
    use prost::Message;

    use crate::{codec, message, wire};

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

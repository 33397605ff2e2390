//! The typed ways a request can fail, on either side.

use std::io;

use crate::{codec::FrameError, DigestError, StreamCap};

/// Why an outbound request ended without a response. Each request id ends in exactly one
/// response event or one of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboundFailure {
    /// The peer was not connected and dialing it failed.
    #[error("dial failed: {0}")]
    DialFailure(String),
    /// The peer was not connected and no connection came up within the dial timeout.
    #[error("dial timed out")]
    DialTimeout,
    /// The response did not arrive within the request timeout.
    #[error("request timed out")]
    Timeout,
    /// The connection closed before the response arrived.
    #[error("connection closed before the response")]
    ConnectionClosed,
    /// The peer does not speak `/gantry/coord/1.0.0`.
    #[error("peer does not support the coord protocol")]
    UnsupportedProtocols,
    /// The peer closed the stream without a response: how a responder rejects a request
    /// (invalid input, unauthorized, overloaded).
    #[error("peer closed the stream without a response (request rejected)")]
    NoResponse,
    /// The response could not be read as a frame.
    #[error("malformed response: {0}")]
    MalformedResponse(FrameError),
    /// The response is of the other RPC family, or carries an invalid digest.
    #[error("response does not answer the request")]
    UnexpectedResponse,
    /// The encoded request exceeds the message cap; nothing was sent.
    #[error("request of {len} bytes exceeds the cap of {max} bytes")]
    RequestTooLarge {
        /// Encoded body length.
        len: u64,
        /// The configured cap.
        max: usize,
    },
    /// The batch holds more digests than one request may carry; nothing was sent.
    /// [`Coordinator::please_pull`](crate::Coordinator::please_pull) splits such a batch.
    #[error("please_pull carries at most {max} digests, got {count}")]
    TooManyDigests {
        /// Digests in the batch.
        count: usize,
        /// The bound.
        max: usize,
    },
    /// The stream failed, for example because the peer reset it.
    #[error("stream error: {0}")]
    Io(#[source] io::Error),
}

/// Why an inbound stream ended without a normal response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InboundFailure {
    /// Over the node-wide cap or the peer's share of it: reset before any read.
    #[error("over the {0:?} inbound stream cap")]
    StreamCap(StreamCap),
    /// The handshake deadline passed before the exchange finished.
    #[error("handshake deadline passed")]
    Timeout,
    /// The swarm loop did not respond within the answer deadline.
    #[error("no response in time")]
    AnswerTimeout,
    /// The responder token was dropped without a response, so none can come.
    #[error("request dropped without a response")]
    ResponseOmission,
    /// The length prefix declared a body above the cap; nothing of it was read.
    #[error("request of {len} bytes exceeds the cap")]
    Oversized {
        /// Declared length.
        len: u64,
    },
    /// The bytes are not a frame of one protobuf envelope.
    #[error("malformed request: {0}")]
    Malformed(FrameError),
    /// An envelope with no body.
    #[error("empty envelope")]
    EmptyEnvelope,
    /// A response body, or a body this protocol version does not know, sent as a request.
    #[error("envelope body is not a request")]
    UnexpectedBody,
    /// A pull_intent_request with an invalid digest.
    #[error("invalid digest: {0}")]
    InvalidDigest(DigestError),
    /// A please_pull_request without registry or repository.
    #[error("please_pull without registry or repository")]
    MissingOrigin,
    /// The response given exceeded the message cap, so none was sent.
    #[error("response of {len} bytes exceeds the cap")]
    ResponseTooLarge {
        /// Encoded body length of the refused response.
        len: u64,
    },
    /// The peer is not authorized and authorization is enforced.
    #[error("unauthorized peer: {0}")]
    Unauthorized(UnauthorizedReason),
    /// The connection closed before the response was written.
    #[error("connection closed")]
    ConnectionClosed,
    /// The stream failed while reading or writing.
    #[error("stream error: {0:?}")]
    Io(io::ErrorKind),
}

impl From<FrameError> for InboundFailure {
    fn from(error: FrameError) -> Self {
        match error {
            FrameError::TooLarge { len, .. } => InboundFailure::Oversized { len },
            other => InboundFailure::Malformed(other),
        }
    }
}

/// Why a peer is not authorized by the membership's published peer ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum UnauthorizedReason {
    /// Members have published peer ids and this peer is not among them.
    #[error("unrecognized")]
    Unrecognized,
    /// No member has published a peer id yet, so the peer cannot be checked.
    #[error("unevaluable")]
    Unevaluable,
}

/// Why a response could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseError {
    /// The request is no longer waiting: its answer deadline passed or its connection closed.
    #[error("the request no longer awaits a response")]
    Expired,
    /// The encoded response exceeds the message cap; the stream was closed without a response.
    #[error("response of {len} bytes exceeds the cap of {max} bytes")]
    TooLarge {
        /// Encoded body length.
        len: u64,
        /// The configured cap.
        max: usize,
    },
}

//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz builds with `cfg(fuzzing)`) and
//! for the unit tests that run their checks on seeds: internals, with no stability promise.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures::AsyncRead;
use prost::Message;

use crate::{codec, protocol, wire, FrameError};

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
    let Ok(request) = protocol::InboundRequest::from_wire(envelope, data.len()) else {
        return;
    };
    let again = match &request {
        protocol::InboundRequest::PullIntent(digest) => protocol::pull_intent_request(digest),
        protocol::InboundRequest::PleasePull { request, .. } => {
            protocol::please_pull_request(request)
        }
    };
    let body = again.encode_to_vec();
    match (
        request,
        protocol::InboundRequest::from_wire(again, body.len()),
    ) {
        (protocol::InboundRequest::PullIntent(a), Ok(protocol::InboundRequest::PullIntent(b))) => {
            assert_eq!(a, b)
        }
        (
            protocol::InboundRequest::PleasePull { request: a, .. },
            Ok(protocol::InboundRequest::PleasePull {
                request: b,
                skipped_digests: 0,
            }),
        ) => assert_eq!(a, b),
        (a, b) => panic!("re-encoded request judged differently: {a:?} vs {b:?}"),
    }
}

/// Decodes `data` as a response envelope body to either request, as a requester's
/// connection does: a response of the other family is refused, a please_pull response keeps
/// one outcome per valid result and counts the rest, and no time read from the peer
/// lies beyond the bounds.
pub fn reply_decoding(data: &[u8]) {
    use crate::{
        protocol::{Response, Rpc},
        Outcome,
    };
    use std::time::Duration;
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
        let decoded = protocol::decode_response(rpc, envelope.clone(), max_cooldown);
        let now = crate::time::wall();
        let latest_cooldown = now + max_cooldown;
        match decoded {
            Err(_) => {}
            Ok(_) if !family_matches => panic!("a {rpc:?} response of the other family"),
            Ok(Response::PullIntent(intent)) => {
                assert!(intent.in_flight_since.is_none_or(|t| t <= now));
                assert!(intent
                    .recently_failed
                    .is_none_or(|f| f.cooldown_until <= latest_cooldown));
            }
            Ok(Response::PleasePull {
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

#[cfg(test)]
mod tests;

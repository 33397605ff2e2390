//! The workload: the same messages, with the same framing, for every stack.

use std::{
    io,
    time::{Duration, SystemTime},
};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use gantry_coord::{
    Digest, FailureClass, Outcome, PleasePull, PleasePullOutcome, PullIntent, RecentFailure,
};
use prost::Message;

use crate::wire;

/// The frame cap of the coord wire.
const MAX_MESSAGE: usize = 1 << 20;

pub fn digest(n: u32) -> Digest {
    Digest::parse(&format!("sha256:{n:064x}")).expect("a well-formed digest")
}

#[derive(Clone)]
pub enum Work {
    Query(Digest),
    Batch(PleasePull),
}

impl Work {
    pub fn name(&self) -> String {
        match self {
            Work::Query(_) => "pull_intent".into(),
            Work::Batch(r) => format!("please_pull x{}", r.digests().len()),
        }
    }

    /// The request as the wire envelope, for the stacks that carry envelopes themselves.
    pub fn request_envelope(&self) -> wire::Envelope {
        use wire::envelope::Msg;
        let msg = match self {
            Work::Query(d) => Msg::PullIntentRequest(wire::PullIntentRequest {
                digest: d.to_string(),
            }),
            Work::Batch(r) => Msg::PleasePullRequest(wire::PleasePullRequest {
                digests: r.digests().iter().map(Digest::to_string).collect(),
                upstream_registry: r.registry().into(),
                repository: r.repository().into(),
                kind: wire::please_pull_request::Kind::Blob as i32,
                authorization: String::new(),
            }),
        };
        wire::Envelope { msg: Some(msg) }
    }
}

pub fn answer_intent() -> PullIntent {
    PullIntent {
        has_cached: true,
        in_flight_since: None,
        hrw_rank: Some(1),
        recently_failed: Some(RecentFailure {
            cooldown_until: SystemTime::now() + Duration::from_secs(30),
            class: FailureClass::Transient,
        }),
    }
}

pub fn answer_outcomes(digests: impl Iterator<Item = Digest>) -> Vec<PleasePullOutcome> {
    let now = SystemTime::now();
    digests
        .map(|digest| PleasePullOutcome {
            digest,
            outcome: Outcome::Started { started_at: now },
        })
        .collect()
}

/// The response a responder sends, as the same wire envelope every stack uses.
pub fn answer_envelope(request: &wire::Envelope) -> wire::Envelope {
    use wire::envelope::Msg;
    let now = Some(prost_types::Timestamp::from(SystemTime::now()));
    let msg = match &request.msg {
        Some(Msg::PleasePullRequest(r)) => Msg::PleasePullResponse(wire::PleasePullResponse {
            results: r
                .digests
                .iter()
                .map(|d| wire::please_pull_response::Result {
                    digest: d.clone(),
                    outcome: wire::please_pull_response::result::Outcome::Started as i32,
                    started_at: now,
                    ..Default::default()
                })
                .collect(),
        }),
        _ => Msg::PullIntentResponse(wire::PullIntentResponse {
            has_cached: true,
            hrw_rank: 1,
            recently_failed: true,
            cooldown_until: Some(prost_types::Timestamp::from(
                SystemTime::now() + Duration::from_secs(30),
            )),
            failure_class: wire::FailureClass::Transient as i32,
            ..Default::default()
        }),
    };
    wire::Envelope { msg: Some(msg) }
}

/// One frame as the coord wire has it: uvarint length, then a capped protobuf body.
pub async fn read_frame<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut len: u64 = 0;
    for i in 0..9 {
        let mut byte = [0u8];
        io.read_exact(&mut byte).await?;
        len |= u64::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] & 0x80 == 0 {
            if len as usize > MAX_MESSAGE {
                return Err(io::ErrorKind::InvalidData.into());
            }
            let mut body = vec![0; len as usize];
            io.read_exact(&mut body).await?;
            return Ok(body);
        }
    }
    Err(io::ErrorKind::InvalidData.into())
}

pub async fn read_envelope<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<wire::Envelope> {
    let body = read_frame(io).await?;
    wire::Envelope::decode(body.as_slice()).map_err(|_| io::ErrorKind::InvalidData.into())
}

pub async fn write_envelope<T: AsyncWrite + Unpin>(
    io: &mut T,
    envelope: &wire::Envelope,
) -> io::Result<()> {
    io.write_all(&envelope.encode_length_delimited_to_vec())
        .await
}

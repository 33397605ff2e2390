//! What both sides of a stream share: the two RPC families, the request and response
//! as they cross the wire, and the conversions between wire messages and domain types.
//! Conversions from the wire apply what docs/protocol.md (§2, §3) says a responder or requester must
//! accept from a peer, and nothing stricter.

use std::time::{Duration, SystemTime};

use zeroize::Zeroize;

use crate::{
    wire, Authorization, Digest, FailureClass, InboundFailure, OriginRefKind, OutboundFailure,
    Outcome, PleasePull, PleasePullOutcome, PullIntent, RecentFailure,
};

/// The protocol this crate speaks.
pub const PROTOCOL_NAME: libp2p_swarm::StreamProtocol =
    libp2p_swarm::StreamProtocol::new("/gantry/coord/1.0.0");

/// The two RPC families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    /// pull_intent_query → pull_intent_response.
    PullIntent,
    /// please_pull → please_pull_response.
    PleasePull,
}

/// A response as a requester receives it, decoded and checked.
#[derive(Debug)]
pub(crate) enum Response {
    PullIntent(PullIntent),
    PleasePull {
        outcomes: Vec<PleasePullOutcome>,
        /// Results whose digest was invalid, skipped as the Go client skips them.
        skipped_results: usize,
    },
}

impl FailureClass {
    pub(crate) fn from_wire(value: i32) -> Self {
        match wire::FailureClass::try_from(value) {
            Ok(wire::FailureClass::Auth) => FailureClass::Auth,
            Ok(wire::FailureClass::NotFound) => FailureClass::NotFound,
            Ok(wire::FailureClass::RateLimited) => FailureClass::RateLimited,
            Ok(wire::FailureClass::Transient) => FailureClass::Transient,
            Ok(wire::FailureClass::Unspecified) | Err(_) => FailureClass::Unspecified,
        }
    }

    pub(crate) fn to_wire(self) -> i32 {
        match self {
            FailureClass::Unspecified => wire::FailureClass::Unspecified,
            FailureClass::Auth => wire::FailureClass::Auth,
            FailureClass::NotFound => wire::FailureClass::NotFound,
            FailureClass::RateLimited => wire::FailureClass::RateLimited,
            FailureClass::Transient => wire::FailureClass::Transient,
        }
        .into()
    }
}

impl OriginRefKind {
    pub(crate) fn from_wire(value: i32) -> Self {
        use wire::please_pull_request::Kind;
        match Kind::try_from(value) {
            Ok(Kind::Manifest) => OriginRefKind::Manifest,
            Ok(Kind::Config) => OriginRefKind::Config,
            Ok(Kind::Blob | Kind::Unspecified) | Err(_) => OriginRefKind::Blob,
        }
    }

    pub(crate) fn to_wire(self) -> i32 {
        use wire::please_pull_request::Kind;
        match self {
            OriginRefKind::Blob => Kind::Blob,
            OriginRefKind::Manifest => Kind::Manifest,
            OriginRefKind::Config => Kind::Config,
        }
        .into()
    }
}

/// How a requester bounds timestamps from another node's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClockBounds {
    pub(crate) now: SystemTime,
    pub(crate) max_cooldown: Duration,
}

impl ClockBounds {
    /// A start time in the future reads as now; a missing one as the epoch, as Go reads it.
    fn started_at(&self, ts: Option<prost_types::Timestamp>) -> SystemTime {
        read_time(ts).min(self.now)
    }

    /// A cooldown end further ahead than the longest cooldown is cut to it.
    fn cooldown_until(&self, ts: Option<prost_types::Timestamp>) -> SystemTime {
        let latest = self.now + self.max_cooldown;
        read_time(ts).min(latest)
    }
}

fn read_time(ts: Option<prost_types::Timestamp>) -> SystemTime {
    match ts {
        Some(ts) => SystemTime::try_from(ts)
            .unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX.into())),
        None => SystemTime::UNIX_EPOCH,
    }
}

fn write_time(time: SystemTime) -> Option<prost_types::Timestamp> {
    Some(time.into())
}

impl PullIntent {
    pub(crate) fn to_wire(self) -> wire::PullIntentResponse {
        let (recently_failed, cooldown_until, failure_class) = match self.recently_failed {
            Some(f) => (true, write_time(f.cooldown_until), f.class.to_wire()),
            None => (false, None, 0),
        };
        wire::PullIntentResponse {
            has_cached: self.has_cached,
            in_flight: self.in_flight_since.is_some(),
            started_at: self.in_flight_since.and_then(write_time),
            hrw_rank: self
                .hrw_rank
                .map_or(-1, |rank| i32::try_from(rank).unwrap_or(i32::MAX)),
            recently_failed,
            cooldown_until,
            failure_class,
        }
    }

    pub(crate) fn from_wire(msg: wire::PullIntentResponse, clock: ClockBounds) -> Self {
        PullIntent {
            has_cached: msg.has_cached,
            in_flight_since: msg.in_flight.then(|| clock.started_at(msg.started_at)),
            hrw_rank: u32::try_from(msg.hrw_rank).ok(),
            recently_failed: msg.recently_failed.then(|| RecentFailure {
                cooldown_until: clock.cooldown_until(msg.cooldown_until),
                class: FailureClass::from_wire(msg.failure_class),
            }),
        }
    }
}

impl PleasePullOutcome {
    pub(crate) fn into_wire(self) -> wire::please_pull_response::Result {
        use wire::please_pull_response::result::Outcome as W;
        let mut result = wire::please_pull_response::Result {
            digest: self.digest.into(),
            ..Default::default()
        };
        match self.outcome {
            Outcome::Unspecified => result.outcome = W::Unspecified.into(),
            Outcome::AlreadyPulling { started_at } => {
                result.outcome = W::AlreadyPulling.into();
                result.started_at = write_time(started_at);
            }
            Outcome::Started { started_at } => {
                result.outcome = W::Started.into();
                result.started_at = write_time(started_at);
            }
            Outcome::RecentlyFailed(failure) => {
                result.outcome = W::RecentlyFailed.into();
                result.cooldown_until = write_time(failure.cooldown_until);
                result.failure_class = failure.class.to_wire();
            }
        }
        result
    }

    pub(crate) fn from_wire(
        msg: wire::please_pull_response::Result,
        clock: ClockBounds,
    ) -> Result<Self, crate::DigestError> {
        use wire::please_pull_response::result::Outcome as W;
        let digest = Digest::parse(&msg.digest)?;
        let outcome = match W::try_from(msg.outcome) {
            Ok(W::AlreadyPulling) => Outcome::AlreadyPulling {
                started_at: clock.started_at(msg.started_at),
            },
            Ok(W::Started) => Outcome::Started {
                started_at: clock.started_at(msg.started_at),
            },
            Ok(W::RecentlyFailed) => Outcome::RecentlyFailed(RecentFailure {
                cooldown_until: clock.cooldown_until(msg.cooldown_until),
                class: FailureClass::from_wire(msg.failure_class),
            }),
            Ok(W::Unspecified) | Err(_) => Outcome::Unspecified,
        };
        Ok(PleasePullOutcome { digest, outcome })
    }
}

/// A request as a responder accepts it from the wire.
#[derive(Debug)]
pub(crate) enum InboundRequest {
    PullIntent(Digest),
    PleasePull {
        request: PleasePull,
        skipped_digests: usize,
    },
}

impl InboundRequest {
    /// Judges a request envelope; `body_len` tells an empty envelope from one whose body
    /// this version does not know (a newer minor's chair offer, say).
    pub(crate) fn from_wire(
        envelope: wire::Envelope,
        body_len: usize,
    ) -> Result<Self, InboundFailure> {
        use wire::envelope::Msg;
        match envelope.msg {
            None if body_len == 0 => Err(InboundFailure::EmptyEnvelope),
            None => Err(InboundFailure::UnexpectedBody),
            Some(Msg::PullIntentResponse(_) | Msg::PleasePullResponse(_)) => {
                Err(InboundFailure::UnexpectedBody)
            }
            Some(Msg::PullIntentRequest(msg)) => Digest::parse(&msg.digest)
                .map(InboundRequest::PullIntent)
                .map_err(InboundFailure::InvalidDigest),
            Some(Msg::PleasePullRequest(msg)) => {
                if msg.upstream_registry.is_empty() || msg.repository.is_empty() {
                    return Err(InboundFailure::MissingOrigin);
                }
                let total = msg.digests.len();
                let digests: Vec<Digest> = msg
                    .digests
                    .into_iter()
                    .filter_map(|d| Digest::parse(&d).ok())
                    .collect();
                let skipped_digests = total - digests.len();
                // As the Go responder: only registry and repository must be non-empty.
                let request = PleasePull::accepted(
                    msg.upstream_registry,
                    msg.repository,
                    OriginRefKind::from_wire(msg.kind),
                    digests,
                    (!msg.authorization.is_empty()).then(|| Authorization::new(msg.authorization)),
                );
                Ok(InboundRequest::PleasePull {
                    request,
                    skipped_digests,
                })
            }
        }
    }
}

pub(crate) fn pull_intent_request(digest: &Digest) -> wire::Envelope {
    wire::Envelope {
        msg: Some(wire::envelope::Msg::PullIntentRequest(
            wire::PullIntentRequest {
                digest: digest.to_string(),
            },
        )),
    }
}

pub(crate) fn please_pull_request(request: &PleasePull) -> wire::Envelope {
    wire::Envelope {
        msg: Some(wire::envelope::Msg::PleasePullRequest(
            wire::PleasePullRequest {
                digests: request.digests().iter().map(|d| d.to_string()).collect(),
                upstream_registry: request.registry().to_owned(),
                repository: request.repository().to_owned(),
                kind: request.kind().to_wire(),
                authorization: request
                    .authorization()
                    .map(|a| a.expose_secret().to_owned())
                    .unwrap_or_default(),
            },
        )),
    }
}

/// Whether an envelope carries delegated credentials.
pub(crate) fn holds_credentials(envelope: &wire::Envelope) -> bool {
    matches!(
        &envelope.msg,
        Some(wire::envelope::Msg::PleasePullRequest(request)) if !request.authorization.is_empty()
    )
}

/// Wipes the copy of the credentials a request envelope holds, once it is encoded.
pub(crate) fn wipe_authorization(envelope: &mut wire::Envelope) {
    if let Some(wire::envelope::Msg::PleasePullRequest(request)) = &mut envelope.msg {
        request.authorization.zeroize();
    }
}

pub(crate) fn pull_intent_response(intent: PullIntent) -> wire::Envelope {
    wire::Envelope {
        msg: Some(wire::envelope::Msg::PullIntentResponse(intent.to_wire())),
    }
}

pub(crate) fn please_pull_response(outcomes: Vec<PleasePullOutcome>) -> wire::Envelope {
    wire::Envelope {
        msg: Some(wire::envelope::Msg::PleasePullResponse(
            wire::PleasePullResponse {
                results: outcomes
                    .into_iter()
                    .map(PleasePullOutcome::into_wire)
                    .collect(),
            },
        )),
    }
}

/// Turns a response envelope into the domain response of the request it answers. Runs on
/// the connection's task: a please_pull response carries hundreds of digests to check.
pub(crate) fn decode_response(
    rpc: Rpc,
    envelope: wire::Envelope,
    max_cooldown: Duration,
) -> Result<Response, OutboundFailure> {
    use wire::envelope::Msg;
    let clock = ClockBounds {
        now: crate::time::wall(),
        max_cooldown,
    };
    match (rpc, envelope.msg) {
        (Rpc::PullIntent, Some(Msg::PullIntentResponse(msg))) => {
            Ok(Response::PullIntent(PullIntent::from_wire(msg, clock)))
        }
        (Rpc::PleasePull, Some(Msg::PleasePullResponse(msg))) => {
            // A result with a bad digest is skipped, as the Go client skips it; the rest
            // stand.
            let total = msg.results.len();
            let outcomes: Vec<_> = msg
                .results
                .into_iter()
                .filter_map(|result| PleasePullOutcome::from_wire(result, clock).ok())
                .collect();
            Ok(Response::PleasePull {
                skipped_results: total - outcomes.len(),
                outcomes,
            })
        }
        _ => Err(OutboundFailure::UnexpectedResponse),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::digest::sample as digest;

    #[test]
    fn authorization_is_wiped() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wiped_on_drop::<Authorization>();

        let request = PleasePull::new(
            "docker.io",
            "library/nginx",
            OriginRefKind::Blob,
            vec![digest(1)],
        )
        .unwrap()
        .with_authorization(Authorization::new("Bearer s3cr3t"));
        let mut envelope = please_pull_request(&request);
        wipe_authorization(&mut envelope);
        match envelope.msg {
            Some(wire::envelope::Msg::PleasePullRequest(msg)) => {
                assert!(msg.authorization.is_empty());
                assert_eq!(msg.digests, [digest(1).to_string()]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unranked_and_in_flight_are_always_written() {
        let now = SystemTime::now();
        let wire = PullIntent {
            has_cached: false,
            in_flight_since: Some(now),
            hrw_rank: None,
            recently_failed: Some(RecentFailure {
                cooldown_until: now,
                class: FailureClass::Transient,
            }),
        }
        .to_wire();
        assert_eq!(wire.hrw_rank, -1);
        assert!(wire.in_flight && wire.started_at.is_some());
        assert!(wire.recently_failed && wire.cooldown_until.is_some());
        assert_eq!(wire.failure_class, wire::FailureClass::Transient as i32);
        assert_eq!(PullIntent::UNKNOWN.to_wire().hrw_rank, -1);
    }

    #[test]
    fn received_times_are_clamped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = ClockBounds {
            now,
            max_cooldown: Duration::from_secs(600),
        };
        let far = write_time(now + Duration::from_secs(86_400));
        let msg = wire::PullIntentResponse {
            in_flight: true,
            started_at: far,
            recently_failed: true,
            cooldown_until: far,
            failure_class: 99,
            hrw_rank: -7,
            ..Default::default()
        };
        let intent = PullIntent::from_wire(msg, clock);
        assert_eq!(intent.in_flight_since, Some(now));
        assert_eq!(
            intent.recently_failed,
            Some(RecentFailure {
                cooldown_until: now + Duration::from_secs(600),
                class: FailureClass::Unspecified,
            })
        );
        assert_eq!(intent.hrw_rank, None);
        let missing = wire::PullIntentResponse {
            in_flight: true,
            ..Default::default()
        };
        assert_eq!(
            PullIntent::from_wire(missing, clock).in_flight_since,
            Some(SystemTime::UNIX_EPOCH)
        );
    }

    #[test]
    fn inbound_requests_are_judged_as_the_table_says() {
        use wire::envelope::Msg;
        let envelope = |msg| wire::Envelope { msg: Some(msg) };
        assert_eq!(
            InboundRequest::from_wire(wire::Envelope::default(), 0).unwrap_err(),
            InboundFailure::EmptyEnvelope
        );
        assert_eq!(
            InboundRequest::from_wire(wire::Envelope::default(), 2).unwrap_err(),
            InboundFailure::UnexpectedBody,
            "an unknown body, such as a 1.1.0 chair offer"
        );
        assert_eq!(
            InboundRequest::from_wire(envelope(Msg::PullIntentResponse(Default::default())), 2)
                .unwrap_err(),
            InboundFailure::UnexpectedBody
        );
        assert_eq!(
            InboundRequest::from_wire(
                envelope(Msg::PullIntentRequest(wire::PullIntentRequest {
                    digest: "sha256:00".into()
                })),
                11,
            )
            .unwrap_err(),
            InboundFailure::InvalidDigest(crate::DigestError::InvalidLength)
        );
        let please = |registry: &str, digests: Vec<String>| {
            envelope(Msg::PleasePullRequest(wire::PleasePullRequest {
                digests,
                upstream_registry: registry.into(),
                repository: "library/nginx".into(),
                kind: 42,
                authorization: String::new(),
            }))
        };
        assert_eq!(
            InboundRequest::from_wire(please("", vec![]), 20).unwrap_err(),
            InboundFailure::MissingOrigin
        );
        let mixed = vec![digest(1).to_string(), "bogus".into(), digest(2).to_string()];
        match InboundRequest::from_wire(please("docker.io", mixed), 200).unwrap() {
            InboundRequest::PleasePull {
                request,
                skipped_digests,
            } => {
                assert_eq!(skipped_digests, 1);
                assert_eq!(request.digests(), &[digest(1), digest(2)]);
                assert_eq!(request.kind(), OriginRefKind::Blob);
                assert_eq!(request.authorization(), None);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

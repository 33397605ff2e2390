//! Domain types of the two RPC families and their conversion to and from the wire.
//!
//! Constructors validate what a requester must check before sending (PROTOCOL.md,
//! "Digests"); conversions from the wire apply what a responder or requester must
//! accept from a peer, and nothing stricter.

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::{wire, Digest, DigestError};

/// Most digests one please_pull may carry, as the newer Go client sends.
pub const MAX_DIGESTS_PER_PLEASE_PULL: usize = 256;

/// Why the responder's last origin pull of a digest failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// The peer did not say (or sent a value this version does not know).
    Unspecified,
    /// The origin answered 401 or 403.
    Auth,
    /// The origin answered 404.
    NotFound,
    /// The origin answered 429.
    RateLimited,
    /// Connection failure, timeout, DNS failure or 5xx.
    Transient,
}

impl FailureClass {
    /// Failures a requester should trust and not retry elsewhere: the origin itself said no.
    pub fn is_trusted(self) -> bool {
        matches!(
            self,
            FailureClass::Auth | FailureClass::NotFound | FailureClass::RateLimited
        )
    }

    fn from_wire(value: i32) -> Self {
        match wire::FailureClass::try_from(value) {
            Ok(wire::FailureClass::Auth) => FailureClass::Auth,
            Ok(wire::FailureClass::NotFound) => FailureClass::NotFound,
            Ok(wire::FailureClass::RateLimited) => FailureClass::RateLimited,
            Ok(wire::FailureClass::Transient) => FailureClass::Transient,
            Ok(wire::FailureClass::Unspecified) | Err(_) => FailureClass::Unspecified,
        }
    }

    fn to_wire(self) -> i32 {
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

/// Which OCI URL family the origin pull fetches from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OriginRefKind {
    /// `/v2/<repo>/blobs/<digest>`; also what an unset kind from an older peer means.
    #[default]
    Blob,
    /// `/v2/<repo>/manifests/<digest>`.
    Manifest,
    /// The image config: the blobs URL family, distinct only for metrics.
    Config,
}

impl OriginRefKind {
    fn from_wire(value: i32) -> Self {
        use wire::please_pull_request::Kind;
        match Kind::try_from(value) {
            Ok(Kind::Manifest) => OriginRefKind::Manifest,
            Ok(Kind::Config) => OriginRefKind::Config,
            Ok(Kind::Blob | Kind::Unspecified) | Err(_) => OriginRefKind::Blob,
        }
    }

    fn to_wire(self) -> i32 {
        use wire::please_pull_request::Kind;
        match self {
            OriginRefKind::Blob => Kind::Blob,
            OriginRefKind::Manifest => Kind::Manifest,
            OriginRefKind::Config => Kind::Config,
        }
        .into()
    }
}

/// A negative-cache entry as a peer reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentFailure {
    /// When the cooldown ends and the digest may be tried again.
    pub cooldown_until: SystemTime,
    /// Why the pull failed.
    pub class: FailureClass,
}

/// A node's answer to "what do you know about this digest?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullIntent {
    /// The node's content store holds the digest.
    pub has_cached: bool,
    /// When the node's in-flight origin pull of the digest started, if one is in flight.
    pub in_flight_since: Option<SystemTime>,
    /// The node's own 0-based HRW rank for the digest in its membership view; `None`
    /// when it has no membership or is not in it.
    pub hrw_rank: Option<u32>,
    /// The node's negative-cache entry for the digest, if any.
    pub recently_failed: Option<RecentFailure>,
}

impl PullIntent {
    /// The answer of a node that knows nothing about the digest and has no rank.
    pub const UNKNOWN: PullIntent = PullIntent {
        has_cached: false,
        in_flight_since: None,
        hrw_rank: None,
        recently_failed: None,
    };
}

/// What a node did with one digest of a please_pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The node has no origin puller.
    Unspecified,
    /// A pull of the digest was already in flight.
    AlreadyPulling {
        /// When that pull started.
        started_at: SystemTime,
    },
    /// The node started pulling the digest.
    Started {
        /// When the pull started.
        started_at: SystemTime,
    },
    /// The digest failed recently and is in its cooldown.
    RecentlyFailed(RecentFailure),
}

/// One digest's result in a please_pull reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PleasePullOutcome {
    /// The digest this result is for.
    pub digest: Digest,
    /// What the node did with it.
    pub outcome: Outcome,
}

/// Delegated origin registry credentials (a `Basic ...` or `Bearer ...` value).
///
/// Neither `Debug` nor `Display` shows the value: it must never reach a log line. The
/// value is wiped from memory when the last copy is dropped, as are the frames and wire
/// messages that carried it.
#[derive(Clone, PartialEq, Eq)]
pub struct Authorization(String);

impl Drop for Authorization {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for Authorization {}

impl Authorization {
    /// Wraps a credential value.
    pub fn new(value: impl Into<String>) -> Self {
        Authorization(value.into())
    }

    /// The credential itself, for the code that contacts the origin and nothing else.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Authorization(<redacted>)")
    }
}

impl fmt::Display for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why a please_pull request cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PleasePullError {
    /// The registry is not a host name or IP literal with an optional `:port`.
    #[error("invalid upstream registry {0:?}")]
    InvalidRegistry(String),
    /// The repository does not follow the OCI distribution-spec name grammar.
    #[error("invalid repository {0:?}")]
    InvalidRepository(String),
    /// The batch has no digests.
    #[error("please_pull needs at least one digest")]
    NoDigests,
    /// One of the digests is invalid.
    #[error("invalid digest {digest:?}: {error}")]
    InvalidDigest {
        /// The offending input.
        digest: String,
        /// Why it is invalid.
        error: DigestError,
    },
}

/// A request that a node pull digests of one repository from the origin registry.
///
/// A batch may hold any number of digests; one request on the wire carries at most
/// [`MAX_DIGESTS_PER_PLEASE_PULL`], so [`Coordinator::please_pull`](crate::Coordinator::please_pull)
/// splits a larger one (see [`PleasePull::batches`]).
#[derive(Clone, PartialEq, Eq)]
pub struct PleasePull {
    registry: String,
    repository: String,
    kind: OriginRefKind,
    digests: Vec<Digest>,
    authorization: Option<Authorization>,
}

impl PleasePull {
    /// Builds a request, validated as a requester must before sending.
    pub fn new(
        registry: impl Into<String>,
        repository: impl Into<String>,
        kind: OriginRefKind,
        digests: Vec<Digest>,
    ) -> Result<Self, PleasePullError> {
        let registry = registry.into();
        let repository = repository.into();
        if !is_registry(&registry) {
            return Err(PleasePullError::InvalidRegistry(registry));
        }
        if !is_repository(&repository) {
            return Err(PleasePullError::InvalidRepository(repository));
        }
        if digests.is_empty() {
            return Err(PleasePullError::NoDigests);
        }
        Ok(PleasePull {
            registry,
            repository,
            kind,
            digests,
            authorization: None,
        })
    }

    /// Like [`PleasePull::new`], parsing the digests from strings.
    pub fn parse<S: AsRef<str>>(
        registry: impl Into<String>,
        repository: impl Into<String>,
        kind: OriginRefKind,
        digests: impl IntoIterator<Item = S>,
    ) -> Result<Self, PleasePullError> {
        let digests = digests
            .into_iter()
            .map(|s| {
                Digest::parse(s.as_ref()).map_err(|error| PleasePullError::InvalidDigest {
                    digest: s.as_ref().to_owned(),
                    error,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        PleasePull::new(registry, repository, kind, digests)
    }

    /// Attaches delegated origin credentials.
    pub fn with_authorization(mut self, authorization: Authorization) -> Self {
        self.authorization = Some(authorization);
        self
    }

    /// The origin registry host, such as `docker.io`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository, such as `library/nginx`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// Which OCI URL family to fetch from.
    pub fn kind(&self) -> OriginRefKind {
        self.kind
    }

    /// The digests to pull, in request order.
    pub fn digests(&self) -> &[Digest] {
        &self.digests
    }

    /// The delegated credentials, if the requester sent any.
    pub fn authorization(&self) -> Option<&Authorization> {
        self.authorization.as_ref()
    }

    /// The batch as requests of at most [`MAX_DIGESTS_PER_PLEASE_PULL`] digests each, in
    /// order, as the newer Go client splits it; each carries the same origin and
    /// credentials.
    pub fn batches(&self) -> impl Iterator<Item = PleasePull> + '_ {
        self.digests
            .chunks(MAX_DIGESTS_PER_PLEASE_PULL)
            .map(|digests| PleasePull {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
                kind: self.kind,
                digests: digests.to_vec(),
                authorization: self.authorization.clone(),
            })
    }
}

impl fmt::Debug for PleasePull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PleasePull")
            .field("registry", &self.registry)
            .field("repository", &self.repository)
            .field("kind", &self.kind)
            .field("digests", &self.digests)
            .field("authorization", &self.authorization)
            .finish()
    }
}

/// A host name, IPv4 or bracketed IPv6 literal, with an optional `:port`.
fn is_registry(s: &str) -> bool {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((ip, port)) = rest.split_once(']') else {
            return false;
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match port {
            "" => return true,
            _ => match port.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match s.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|n| n > 0)
    });
    let host_ok = s.starts_with('[')
        || (!host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    port_ok && host_ok
}

/// The OCI distribution-spec repository name grammar, at most 255 bytes.
fn is_repository(s: &str) -> bool {
    s.len() <= 255 && s.split('/').all(is_path_component)
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_path_component(component: &str) -> bool {
    let is_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    let mut i = 0;
    loop {
        let start = i;
        while i < bytes.len() && is_alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        let sep_start = i;
        while i < bytes.len() && !is_alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[sep_start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
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
    ) -> Result<Self, DigestError> {
        use wire::please_pull_response::result::Outcome as W;
        let digest = Digest::try_from(msg.digest)?;
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

/// Why an inbound request is rejected without a reply (PROTOCOL.md's responder table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RequestRejection {
    /// Zero-length envelope or one with no known body.
    Empty,
    /// A response body (or a newer version's body) where a request belongs.
    WrongBody,
    /// A pull_intent_request whose digest is invalid.
    InvalidDigest(DigestError),
    /// A please_pull_request without registry or repository.
    MissingOrigin,
}

/// A request as a responder accepts it from the wire (opaque outside the crate).
#[derive(Debug)]
pub enum WireRequest {
    PullIntent(Digest),
    PleasePull {
        request: PleasePull,
        skipped_digests: usize,
    },
}

impl WireRequest {
    /// Judges a request envelope; `body_len` tells an empty envelope from one whose body
    /// this version does not know (a newer minor's chair offer, say).
    pub(crate) fn from_wire(
        envelope: wire::Envelope,
        body_len: usize,
    ) -> Result<Self, RequestRejection> {
        use wire::envelope::Msg;
        match envelope.msg {
            None if body_len == 0 => Err(RequestRejection::Empty),
            None => Err(RequestRejection::WrongBody),
            Some(Msg::PullIntentResponse(_) | Msg::PleasePullResponse(_)) => {
                Err(RequestRejection::WrongBody)
            }
            Some(Msg::PullIntentRequest(msg)) => Digest::try_from(msg.digest)
                .map(WireRequest::PullIntent)
                .map_err(RequestRejection::InvalidDigest),
            Some(Msg::PleasePullRequest(msg)) => {
                if msg.upstream_registry.is_empty() || msg.repository.is_empty() {
                    return Err(RequestRejection::MissingOrigin);
                }
                let total = msg.digests.len();
                let digests: Vec<Digest> = msg
                    .digests
                    .into_iter()
                    .filter_map(|d| Digest::try_from(d).ok())
                    .collect();
                let skipped_digests = total - digests.len();
                let request = PleasePull {
                    registry: msg.upstream_registry,
                    repository: msg.repository,
                    kind: OriginRefKind::from_wire(msg.kind),
                    digests,
                    authorization: (!msg.authorization.is_empty())
                        .then_some(Authorization(msg.authorization)),
                };
                Ok(WireRequest::PleasePull {
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
                digest: digest.as_str().to_owned(),
            },
        )),
    }
}

pub(crate) fn please_pull_request(request: &PleasePull) -> wire::Envelope {
    wire::Envelope {
        msg: Some(wire::envelope::Msg::PleasePullRequest(
            wire::PleasePullRequest {
                digests: request
                    .digests
                    .iter()
                    .map(|d| d.as_str().to_owned())
                    .collect(),
                upstream_registry: request.registry.clone(),
                repository: request.repository.clone(),
                kind: request.kind.to_wire(),
                authorization: request
                    .authorization
                    .as_ref()
                    .map(|a| a.0.clone())
                    .unwrap_or_default(),
            },
        )),
    }
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

/// Turns a reply envelope into the domain reply of the request it answers. Runs on the
/// connection's task: a please_pull reply carries hundreds of digests to check.
pub(crate) fn decode_reply(
    rpc: crate::Rpc,
    envelope: wire::Envelope,
    max_cooldown: Duration,
) -> Result<crate::client::Reply, crate::OutboundFailure> {
    use crate::{client::Reply, OutboundFailure, Rpc};
    use wire::envelope::Msg;
    let clock = ClockBounds {
        now: SystemTime::now(),
        max_cooldown,
    };
    match (rpc, envelope.msg) {
        (Rpc::PullIntent, Some(Msg::PullIntentResponse(msg))) => {
            Ok(Reply::PullIntent(PullIntent::from_wire(msg, clock)))
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
            Ok(Reply::PleasePull {
                skipped_results: total - outcomes.len(),
                outcomes,
            })
        }
        _ => Err(OutboundFailure::UnexpectedReply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32))).unwrap()
    }

    #[test]
    fn registry_grammar() {
        for ok in [
            "docker.io",
            "registry.example.com",
            "localhost:5000",
            "10.0.0.1:443",
            "[::1]:5000",
            "[fe80::1]",
            "my-registry",
        ] {
            assert!(is_registry(ok), "{ok}");
        }
        for bad in [
            "",
            ":5000",
            "docker.io:",
            "docker.io:0",
            "docker.io:99999",
            "-bad.io",
            "a..b",
            "https://docker.io",
            "docker.io/library",
            "[::1",
            "[zz]:1",
            "host:12a",
        ] {
            assert!(!is_registry(bad), "{bad}");
        }
    }

    #[test]
    fn repository_grammar() {
        for ok in ["library/nginx", "a", "a.b_c__d---e/f0", "x/y/z"] {
            assert!(is_repository(ok), "{ok}");
        }
        for bad in [
            "",
            "Library/nginx",
            "a//b",
            "/a",
            "a/",
            "a..b",
            "a___b",
            "a.-b",
            "-a",
            "a_",
            &"a".repeat(256),
        ] {
            assert!(!is_repository(bad), "{bad}");
        }
    }

    #[test]
    fn please_pull_validates_before_sending() {
        let d = vec![digest(1)];
        assert!(
            PleasePull::new("docker.io", "library/nginx", OriginRefKind::Blob, d.clone()).is_ok()
        );
        assert_eq!(
            PleasePull::new("docker.io", "library/nginx", OriginRefKind::Blob, vec![]),
            Err(PleasePullError::NoDigests)
        );
        let large = PleasePull::new(
            "docker.io",
            "library/nginx",
            OriginRefKind::Blob,
            (0..=255u8).chain(0..=255).chain(0..3).map(digest).collect(),
        )
        .unwrap()
        .with_authorization(Authorization::new("Basic x"));
        let batches: Vec<_> = large.batches().collect();
        assert_eq!(
            batches
                .iter()
                .map(|b| b.digests().len())
                .collect::<Vec<_>>(),
            [256, 256, 3]
        );
        assert_eq!(
            batches
                .iter()
                .flat_map(|b| b.digests().iter().cloned())
                .collect::<Vec<_>>(),
            large.digests(),
            "in request order"
        );
        assert!(batches
            .iter()
            .all(|b| b.authorization() == large.authorization() && b.kind() == large.kind()));
        assert!(matches!(
            PleasePull::parse(
                "docker.io",
                "library/nginx",
                OriginRefKind::Blob,
                ["sha256:zz"]
            ),
            Err(PleasePullError::InvalidDigest { .. })
        ));
        assert!(matches!(
            PleasePull::new("", "library/nginx", OriginRefKind::Blob, d.clone()),
            Err(PleasePullError::InvalidRegistry(_))
        ));
        assert!(matches!(
            PleasePull::new("docker.io", "Library", OriginRefKind::Blob, d),
            Err(PleasePullError::InvalidRepository(_))
        ));
    }

    #[test]
    fn authorization_never_shows() {
        let secret = "Bearer s3cr3t-token";
        let request = PleasePull::new(
            "docker.io",
            "library/nginx",
            OriginRefKind::Blob,
            vec![digest(1)],
        )
        .unwrap()
        .with_authorization(Authorization::new(secret));
        assert!(!format!("{request:?}").contains("s3cr3t"));
        assert!(!format!("{:?}", request.authorization()).contains("s3cr3t"));
        assert!(!format!("{}", Authorization::new(secret)).contains("s3cr3t"));
        assert_eq!(request.authorization().unwrap().expose_secret(), secret);
    }

    #[test]
    fn authorization_is_wiped() {
        fn wiped_on_drop<T: ZeroizeOnDrop>() {}
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
            WireRequest::from_wire(wire::Envelope::default(), 0).unwrap_err(),
            RequestRejection::Empty
        );
        assert_eq!(
            WireRequest::from_wire(wire::Envelope::default(), 2).unwrap_err(),
            RequestRejection::WrongBody,
            "an unknown body, such as a 1.1.0 chair offer"
        );
        assert_eq!(
            WireRequest::from_wire(envelope(Msg::PullIntentResponse(Default::default())), 2)
                .unwrap_err(),
            RequestRejection::WrongBody
        );
        assert_eq!(
            WireRequest::from_wire(
                envelope(Msg::PullIntentRequest(wire::PullIntentRequest {
                    digest: "sha256:00".into()
                })),
                11,
            )
            .unwrap_err(),
            RequestRejection::InvalidDigest(DigestError::InvalidLength)
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
            WireRequest::from_wire(please("", vec![]), 20).unwrap_err(),
            RequestRejection::MissingOrigin
        );
        let mixed = vec![digest(1).to_string(), "bogus".into(), digest(2).to_string()];
        match WireRequest::from_wire(please("docker.io", mixed), 200).unwrap() {
            WireRequest::PleasePull {
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

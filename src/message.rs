//! Domain types of the two RPC families: what the public API speaks instead of wire types.
//!
//! Constructors validate what a requester must check before sending (docs/protocol.md §4
//! and §5); `protocol.rs` converts them to and from the wire.

use std::{fmt, time::SystemTime};

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::{
    name::{is_registry, is_repository},
    Digest, DigestError,
};

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

/// One digest's result in a please_pull response.
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

/// A repository at the origin registry, and the credentials to pull from it with:
/// everything a please_pull says beside the digests and their URL family. Validated
/// once; [`Origin::please_pull`] is the one place a request is built from it.
#[derive(Clone, PartialEq, Eq)]
pub struct Origin {
    registry: String,
    repository: String,
    authorization: Option<Authorization>,
}

impl Origin {
    /// A repository, validated as a requester must before sending: the registry a host
    /// name or IP literal with an optional `:port`, the repository an OCI name.
    pub fn new(
        registry: impl Into<String>,
        repository: impl Into<String>,
    ) -> Result<Self, PleasePullError> {
        let registry = registry.into();
        let repository = repository.into();
        if !is_registry(&registry) {
            return Err(PleasePullError::InvalidRegistry(registry));
        }
        if !is_repository(&repository) {
            return Err(PleasePullError::InvalidRepository(repository));
        }
        Ok(Origin {
            registry,
            repository,
            authorization: None,
        })
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

    /// The delegated credentials, if any.
    pub fn authorization(&self) -> Option<&Authorization> {
        self.authorization.as_ref()
    }

    /// A request that a node pull `digests` of `kind` from this origin.
    pub fn please_pull(
        &self,
        kind: OriginRefKind,
        digests: Vec<Digest>,
    ) -> Result<PleasePull, PleasePullError> {
        if digests.is_empty() {
            return Err(PleasePullError::NoDigests);
        }
        Ok(PleasePull {
            origin: self.clone(),
            kind,
            digests,
        })
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origin")
            .field("registry", &self.registry)
            .field("repository", &self.repository)
            .field("authorization", &self.authorization)
            .finish()
    }
}

/// A request that a node pull digests of one repository from the origin registry.
///
/// A batch may hold any number of digests; one request on the wire carries at most
/// [`MAX_DIGESTS_PER_PLEASE_PULL`], so [`Coordinator::please_pull`](crate::Coordinator::please_pull)
/// splits a larger one (see [`PleasePull::batches`]).
#[derive(Clone, PartialEq, Eq)]
pub struct PleasePull {
    origin: Origin,
    kind: OriginRefKind,
    digests: Vec<Digest>,
}

impl PleasePull {
    /// Builds a request, validated as a requester must before sending; the same as
    /// [`Origin::new`] then [`Origin::please_pull`].
    pub fn new(
        registry: impl Into<String>,
        repository: impl Into<String>,
        kind: OriginRefKind,
        digests: Vec<Digest>,
    ) -> Result<Self, PleasePullError> {
        Origin::new(registry, repository)?.please_pull(kind, digests)
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

    /// A request as a responder accepts it from a peer: the Go responder checks no more
    /// than that registry and repository are non-empty, nor does this one.
    pub(crate) fn accepted(
        registry: String,
        repository: String,
        kind: OriginRefKind,
        digests: Vec<Digest>,
        authorization: Option<Authorization>,
    ) -> Self {
        PleasePull {
            origin: Origin {
                registry,
                repository,
                authorization,
            },
            kind,
            digests,
        }
    }

    /// Attaches delegated origin credentials.
    pub fn with_authorization(mut self, authorization: Authorization) -> Self {
        self.origin.authorization = Some(authorization);
        self
    }

    /// The repository and credentials the request names.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The origin registry host, such as `docker.io`.
    pub fn registry(&self) -> &str {
        self.origin.registry()
    }

    /// The repository, such as `library/nginx`.
    pub fn repository(&self) -> &str {
        self.origin.repository()
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
        self.origin.authorization()
    }

    /// The batch as requests of at most [`MAX_DIGESTS_PER_PLEASE_PULL`] digests each, in
    /// order, as the newer Go client splits it; each carries the same origin and
    /// credentials.
    pub fn batches(&self) -> impl Iterator<Item = PleasePull> + '_ {
        self.digests
            .chunks(MAX_DIGESTS_PER_PLEASE_PULL)
            .map(|digests| PleasePull {
                origin: self.origin.clone(),
                kind: self.kind,
                digests: digests.to_vec(),
            })
    }
}

impl fmt::Debug for PleasePull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PleasePull")
            .field("registry", &self.origin.registry)
            .field("repository", &self.origin.repository)
            .field("kind", &self.kind)
            .field("digests", &self.digests)
            .field("authorization", &self.origin.authorization)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::digest::sample as digest;

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
}

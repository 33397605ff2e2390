//! The node layer: what a node answers with, as plain synchronous code over its content
//! store, in-flight map, negative cache and membership (with HRW ranking). The same code
//! serves inbound requests and the node's own local calls, so self answers exactly as a
//! remote peer would.
//!
//! This layer uses only the protocol layer's public API; the protocol layer never uses
//! it, so an application may replace any of it and keep the protocol.

mod cascade;
mod clock;
mod cold_start;
mod credentials;
mod fallback;
pub mod hrw;
mod in_flight;
#[cfg(feature = "kad")]
mod kad;
mod membership;
#[cfg(feature = "metrics")]
mod metrics;
mod negative_cache;
mod rank_cache;
mod store;

pub use cascade::{
    Action, BlobRef, Cascade, CascadeConfig, ColdStartError, Expansion, OutOfTurn, ProbeAnswer,
    Resolution, Rule, Source,
};
pub use clock::{Clock, Now, SystemClock};
pub use cold_start::{ColdStart, Fetch, NoProviders, Obtained, OriginRefused, ProviderLookup};
pub use fallback::{FallbackConfig, FallbackDeclined, FallbackPermit, OriginFallback};
pub use in_flight::{stale_after, Claim, InFlightMap, InFlightPulls, Stalls};
#[cfg(feature = "kad")]
pub use kad::{
    kad_config, kad_providers, provider_key, KadLookups, KadProviders, Lookup, KAD_PROTOCOL,
};
pub use membership::{Member, Membership, StaticMembership};
pub use negative_cache::{FailureCache, NegativeCache};
pub use store::{ContentStore, MemoryStore, StoreLookup};

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::SystemTime,
};

use crate::{
    Authorization, Behaviour, Digest, Event, FailureClass, OriginRefKind, Outcome, PleasePull,
    PleasePullOutcome, PullIntent, RecentFailure,
};

/// One digest of a please_pull, handed to the puller pump.
#[derive(Debug, Clone, Copy)]
pub struct PullOrder<'a> {
    /// Origin registry host.
    pub registry: &'a str,
    /// Repository.
    pub repository: &'a str,
    /// The digest to pull.
    pub digest: &'a Digest,
    /// Which URL family to fetch from.
    pub kind: OriginRefKind,
    /// Delegated credentials, to use for this pull only: never keep or log them.
    pub authorization: Option<&'a Authorization>,
}

/// What the pump did with a pull order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpDecision {
    /// The pull was started elsewhere (a task, a queue); report its end with
    /// [`NodeState::finish_pull`].
    Started,
    /// The pump already pulls the digest by other means, since `started_at`: the real
    /// start, so that a requester can tell a stalled pull from a fresh one. The digest
    /// stays in flight from then until [`NodeState::finish_pull`].
    AlreadyPulling {
        /// When that pull started.
        started_at: SystemTime,
    },
    /// The pump knows the digest failed recently.
    RecentlyFailed(RecentFailure),
    /// The pump refuses the pull for now (at its ceiling, shutting down): answered as
    /// `Unspecified`, as the Go nodes answer a declined pull.
    Declined,
}

/// Starts origin pulls. Runs on the swarm loop, so it must return promptly: it hands
/// the pull to something else and never waits for it.
pub trait PullerPump: Send + Sync + 'static {
    /// Starts pulling one digest.
    fn start(&self, order: PullOrder<'_>) -> PumpDecision;
}

/// The counts of the original's observability signals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Signals {
    /// pull_intent queries from peers answered; the node's own local calls are not wire
    /// traffic and do not count.
    pub pull_intent_served: u64,
    /// pull_intent answered "not cached" because the store was unavailable.
    pub storage_unavailable: u64,
    /// please_pull requests from peers answered; local calls do not count.
    pub please_pull_served: u64,
    /// Digests moved into the in-flight map.
    pub moved_in_flight: u64,
    /// Pulls declined for load: a full in-flight map or a pump that refused.
    pub declined_pulls: u64,
    /// Invalid digests dropped from inbound please_pull requests.
    pub skipped_digests: u64,
}

#[derive(Debug, Default)]
struct SignalCounters {
    pull_intent_served: AtomicU64,
    storage_unavailable: AtomicU64,
    please_pull_served: AtomicU64,
    moved_in_flight: AtomicU64,
    declined_pulls: AtomicU64,
    skipped_digests: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

struct Inner {
    membership: Arc<dyn Membership>,
    store: Box<dyn ContentStore>,
    secondary_store: Option<Box<dyn ContentStore>>,
    in_flight: Box<dyn InFlightPulls>,
    failures: Box<dyn FailureCache>,
    pump: Option<Box<dyn PullerPump>>,
    clock: Box<dyn Clock>,
    credentials: credentials::CredentialLedger,
    ranks: rank_cache::RankCache,
    signals: SignalCounters,
}

/// The state a node answers coord requests from. Cheap to clone; clones share state, so
/// the task that runs an origin pull can report its end with [`NodeState::finish_pull`].
#[derive(Clone)]
pub struct NodeState {
    inner: Arc<Inner>,
}

/// Builds a [`NodeState`]; every part has a ready default but the membership.
pub struct NodeStateBuilder {
    membership: Box<dyn Membership>,
    store: Option<Box<dyn ContentStore>>,
    secondary_store: Option<Box<dyn ContentStore>>,
    in_flight: Option<Box<dyn InFlightPulls>>,
    failures: Option<Box<dyn FailureCache>>,
    pump: Option<Box<dyn PullerPump>>,
    clock: Option<Box<dyn Clock>>,
}

impl NodeStateBuilder {
    /// The content store (default: an empty [`MemoryStore`](crate::MemoryStore)).
    pub fn store(mut self, store: impl ContentStore) -> Self {
        self.store = Some(Box::new(store));
        self
    }

    /// A second store consulted when the first misses or is unavailable (containerd's
    /// content store beside the node's own, say), as the Go nodes'
    /// `WithSecondaryBlobSource`, so a node whose blobs live in two places answers
    /// `has_cached` truthfully. Only pull_intent consults it; the puller pump checks the
    /// primary store, as Go's does.
    pub fn secondary_store(mut self, store: impl ContentStore) -> Self {
        self.secondary_store = Some(Box::new(store));
        self
    }

    /// The in-flight map (default: [`InFlightMap`]).
    pub fn in_flight(mut self, in_flight: impl InFlightPulls) -> Self {
        self.in_flight = Some(Box::new(in_flight));
        self
    }

    /// The negative cache (default: [`NegativeCache`]).
    pub fn failures(mut self, failures: impl FailureCache) -> Self {
        self.failures = Some(Box::new(failures));
        self
    }

    /// The puller pump; without one every please_pull outcome is `Unspecified`.
    pub fn pump(mut self, pump: impl PullerPump) -> Self {
        self.pump = Some(Box::new(pump));
        self
    }

    /// The clock (default: [`SystemClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Box::new(clock));
        self
    }

    /// Builds the state.
    pub fn build(self) -> NodeState {
        NodeState {
            inner: Arc::new(Inner {
                membership: self.membership.into(),
                store: self.store.unwrap_or_else(|| Box::new(MemoryStore::new())),
                secondary_store: self.secondary_store,
                in_flight: self
                    .in_flight
                    .unwrap_or_else(|| Box::new(InFlightMap::default())),
                failures: self
                    .failures
                    .unwrap_or_else(|| Box::new(NegativeCache::default())),
                pump: self.pump,
                clock: self.clock.unwrap_or_else(|| Box::new(SystemClock)),
                credentials: credentials::CredentialLedger::new(4096),
                ranks: rank_cache::RankCache::new(4096),
                signals: SignalCounters::default(),
            }),
        }
    }
}

impl NodeState {
    /// Starts building the state of a node with the given membership view.
    pub fn builder(membership: impl Membership) -> NodeStateBuilder {
        NodeStateBuilder {
            membership: Box::new(membership),
            store: None,
            secondary_store: None,
            in_flight: None,
            failures: None,
            pump: None,
            clock: None,
        }
    }

    /// The membership view.
    pub fn membership(&self) -> &dyn Membership {
        self.inner.membership.as_ref()
    }

    /// The clock the node's waits run on.
    pub fn clock(&self) -> &dyn Clock {
        self.inner.clock.as_ref()
    }

    /// Whether the (primary) content store holds `digest`.
    pub fn holds(&self, digest: &Digest) -> bool {
        self.inner.store.lookup(digest) == StoreLookup::Cached
    }

    pub(crate) fn membership_handle(&self) -> Arc<dyn Membership> {
        self.inner.membership.clone()
    }

    /// The membership as the behaviour's authorizer, for
    /// [`Behaviour::authorize_with`]: each request is checked against the snapshot the
    /// node answers from.
    pub fn peer_authorizer(&self) -> impl crate::PeerAuthorizer {
        self.inner.membership.clone()
    }

    /// This node's answer to a pull_intent query for `digest`, as a peer would get it.
    /// For the node's own cold-start decisions: it does not count as a query served.
    pub fn local_pull_intent(&self, digest: &Digest) -> PullIntent {
        let inner = &*self.inner;
        let now = inner.clock.now();
        let members = inner.membership.members();
        let local = inner.membership.local_id();
        PullIntent {
            has_cached: self.has_cached(digest),
            in_flight_since: inner.in_flight.started_at(digest),
            hrw_rank: inner.ranks.own_rank(&members, &local, digest),
            recently_failed: inner.failures.get(digest, now),
        }
    }

    /// The members a cold start on this node chooses among for `digest`, best first, at
    /// most `k` of them: with `zone_scope` its own zone's (all members when it has none).
    /// Kept per digest for the current membership snapshot, as the node's own rank is.
    pub fn ranking(&self, digest: &Digest, k: usize, zone_scope: bool) -> Vec<crate::NodeId> {
        let members = self.inner.membership.members();
        let local = self.inner.membership.local_id();
        self.inner
            .ranks
            .ranking(&members, &local, digest, k, zone_scope)
    }

    /// The primary store, then the secondary on a miss. Only a store that could not be
    /// asked, with no other store holding the digest, reads as "storage unavailable".
    fn has_cached(&self, digest: &Digest) -> bool {
        let inner = &*self.inner;
        let primary = inner.store.lookup(digest);
        if primary == StoreLookup::Cached {
            return true;
        }
        let secondary = inner.secondary_store.as_ref().map(|s| s.lookup(digest));
        if secondary == Some(StoreLookup::Cached) {
            return true;
        }
        if primary == StoreLookup::Unavailable || secondary == Some(StoreLookup::Unavailable) {
            bump(&inner.signals.storage_unavailable, 1);
            tracing::warn!(%digest, "content store unavailable; answering not cached");
        }
        false
    }

    /// This node's answer to a please_pull, as a peer would get it: one outcome per
    /// digest, in request order. For the node's own cold-start decisions (self is the
    /// designated puller): it does not count as a request served.
    pub fn start_local_pull(&self, request: &PleasePull) -> Vec<PleasePullOutcome> {
        request
            .digests()
            .iter()
            .map(|digest| PleasePullOutcome {
                digest: *digest,
                outcome: self.start_one(request, digest),
            })
            .collect()
    }

    /// The Go pump's order: the negative cache, then the content store (a held digest is
    /// reported as being pulled since now, so the requester looks for providers and finds
    /// this node instead of causing a second origin pull), then the in-flight map.
    ///
    /// An auth failure holds only for the credentials that failed ("none" counts as
    /// one): a request that brings others is pulled again with them.
    fn start_one(&self, request: &PleasePull, digest: &Digest) -> Outcome {
        let inner = &*self.inner;
        let Some(pump) = &inner.pump else {
            return Outcome::Unspecified;
        };
        let now = inner.clock.now();
        let credentials = inner.credentials.fingerprint(request.authorization());
        if let Some(failure) = inner.failures.get(digest, now) {
            if failure.class != FailureClass::Auth || inner.credentials.refused(digest, credentials)
            {
                return Outcome::RecentlyFailed(failure);
            }
            tracing::debug!(%digest, "an auth failure, and other credentials: pulling again");
        }
        if self.holds(digest) {
            return Outcome::AlreadyPulling { started_at: now };
        }
        match inner.in_flight.begin(digest, now) {
            Claim::Claimed => {}
            Claim::InFlightSince(started_at) => return Outcome::AlreadyPulling { started_at },
            Claim::Full => {
                bump(&inner.signals.declined_pulls, 1);
                return Outcome::Unspecified;
            }
        }
        let order = PullOrder {
            registry: request.registry(),
            repository: request.repository(),
            digest,
            kind: request.kind(),
            authorization: request.authorization(),
        };
        match pump.start(order) {
            PumpDecision::Started => {
                inner.credentials.started(digest, credentials);
                bump(&inner.signals.moved_in_flight, 1);
                tracing::debug!(%digest, "origin pull started");
                Outcome::Started { started_at: now }
            }
            PumpDecision::AlreadyPulling { started_at } => {
                // The pump's own pull is the one in flight: record its real start.
                let started_at = started_at.min(now);
                inner.in_flight.finish(digest);
                inner.in_flight.begin(digest, started_at);
                Outcome::AlreadyPulling { started_at }
            }
            PumpDecision::RecentlyFailed(failure) => {
                inner.in_flight.finish(digest);
                Outcome::RecentlyFailed(failure)
            }
            PumpDecision::Declined => {
                inner.in_flight.finish(digest);
                bump(&inner.signals.declined_pulls, 1);
                Outcome::Unspecified
            }
        }
    }

    /// Reports the end of an origin pull: success clears the negative cache; failure
    /// records it there with its class and a growing cooldown (an auth failure, with
    /// which credentials failed).
    pub fn finish_pull(&self, digest: &Digest, result: Result<(), FailureClass>) {
        let inner = &*self.inner;
        inner.in_flight.finish(digest);
        inner.credentials.finished(digest, result);
        match result {
            Ok(()) => inner.failures.clear(digest),
            Err(class) => {
                let failure = inner.failures.record(digest, class, inner.clock.now());
                tracing::debug!(%digest, ?class, until = ?failure.cooldown_until, "origin pull failed");
            }
        }
    }

    /// Answers an inbound request event through `behaviour`; hands back any other event.
    pub fn answer(&self, behaviour: &mut Behaviour, event: Event) -> Option<Event> {
        match event {
            Event::PullIntentQuery {
                digest, responder, ..
            } => {
                let intent = self.local_pull_intent(&digest);
                bump(&self.inner.signals.pull_intent_served, 1);
                if let Err(error) = behaviour.send_response(responder, intent) {
                    tracing::debug!(%error, "pull_intent response not sent");
                }
                None
            }
            Event::PleasePull {
                request,
                skipped_digests,
                responder,
                ..
            } => {
                bump(&self.inner.signals.skipped_digests, skipped_digests as u64);
                let outcomes = self.start_local_pull(&request);
                bump(&self.inner.signals.please_pull_served, 1);
                if let Err(error) = behaviour.send_response(responder, outcomes) {
                    tracing::debug!(%error, "please_pull response not sent");
                }
                None
            }
            other => Some(other),
        }
    }

    /// The signal counts so far.
    pub fn signals(&self) -> Signals {
        let s = &self.inner.signals;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Signals {
            pull_intent_served: get(&s.pull_intent_served),
            storage_unavailable: get(&s.storage_unavailable),
            please_pull_served: get(&s.please_pull_served),
            moved_in_flight: get(&s.moved_in_flight),
            declined_pulls: get(&s.declined_pulls),
            skipped_digests: get(&s.skipped_digests),
        }
    }
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState")
            .field("signals", &self.signals())
            .finish_non_exhaustive()
    }
}

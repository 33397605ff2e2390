//! The cold-start resolver: drives the [`Cascade`] for a digest this node lacks over the
//! network, through the protocol layer's [`Coordinator`] and a [`ProviderLookup`]
//! (Kademlia's providers, in practice), with this node answering itself locally.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use futures::{future::BoxFuture, FutureExt};
use hashlink::LruCache;
use libp2p_identity::PeerId;
use parking_lot::Mutex;

use super::{
    cascade::{
        Action, BlobRef, Cascade, CascadeConfig, ColdStartError, ProbeAnswer, Resolution, Rule,
        Source,
    },
    fallback::{FallbackConfig, FallbackDeclined, OriginFallback},
    Membership, NodeState,
};
use crate::{
    Coordinator, CoordinatorError, Digest, FailureClass, NodeId, Origin, OriginRefKind,
    OutboundFailure, Outcome, PleasePullOutcome,
};

/// Who provides a digest: the content-discovery side of a node (Kademlia's
/// `get_providers`, say). Gantry asks it first and runs the cascade on a miss; the
/// cascade asks it again while it waits for a pull to land.
pub trait ProviderLookup: Send + Sync + 'static {
    /// The peers that provide `digest`; empty when none is known (yet).
    fn providers(&self, digest: &Digest) -> BoxFuture<'static, Vec<PeerId>>;

    /// Whether lookups can be trusted to find a provider that exists (a routing table
    /// that is not empty, say). An unhealthy lookup widens the probe before anyone is
    /// asked to pull.
    fn is_healthy(&self) -> bool {
        true
    }
}

/// How a node gets a blob's bytes once a resolution named a source: the application's
/// own transfer protocol, which this crate leaves to it.
pub trait Fetch: Send + Sync {
    /// Fetches `blob` from `source` into the node's content store (the one its
    /// [`NodeState`] answers from); true once it is stored there.
    fn fetch<'a>(&'a self, blob: BlobRef, source: &'a Source) -> BoxFuture<'a, bool>;
}

/// How [`ColdStart::obtain`] got a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Obtained {
    /// The rule of the last resolution; `None` when the node held the blob already.
    pub rule: Option<Rule>,
    /// Resolutions run.
    pub resolutions: u32,
    /// Probes and please_pulls sent over the wire, over all of them.
    pub messages: u32,
}

/// Why [`ColdStart::obtain`] gave up: the origin refused the blob for a reason every
/// node would hear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the origin refused it ({0:?})")]
pub struct OriginRefused(pub FailureClass);

/// Digests whose transient failure is honoured locally, at most this many at once: the
/// least recently asked about make room.
const HONOUR_WINDOWS: usize = 4096;

/// Resolves digests this node lacks, one origin pull per blob for the whole cluster.
/// Cheap to clone; clones share the honour windows of transient failures.
#[derive(Clone)]
pub struct ColdStart {
    coordinator: Coordinator,
    state: NodeState,
    lookup: Arc<dyn ProviderLookup>,
    config: Arc<CascadeConfig>,
    /// Digests whose transient failure is honoured locally, until when.
    honour: Arc<Mutex<LruCache<Digest, Instant>>>,
    /// The gates of this node's direct origin pulls, the last resort.
    fallback: OriginFallback,
    #[cfg(feature = "metrics")]
    metrics: Option<Arc<super::metrics::ColdStartMetrics>>,
}

impl std::fmt::Debug for ColdStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColdStart")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ColdStart {
    /// A resolver that asks peers through `coordinator` (its node ids resolved through
    /// the state's membership), answers for this node from `state`, and looks for
    /// providers with `lookup`. Its waits run on the state's [`Clock`](crate::Clock).
    pub fn new(
        coordinator: Coordinator,
        state: NodeState,
        lookup: impl ProviderLookup,
        config: CascadeConfig,
    ) -> Self {
        let membership = state.membership_handle();
        let coordinator = coordinator.with_resolver(move |node: &NodeId| {
            membership
                .members()
                .iter()
                .find(|m| &m.id == node)
                .and_then(|m| m.peer_id)
        });
        let fallback = OriginFallback::new(FallbackConfig::default(), state.clock().instant());
        ColdStart {
            coordinator,
            state,
            lookup: Arc::new(lookup),
            config: Arc::new(config),
            honour: Arc::new(Mutex::new(LruCache::new(HONOUR_WINDOWS))),
            fallback,
            #[cfg(feature = "metrics")]
            metrics: None,
        }
    }

    /// The gates of [`ColdStart::fall_back`] (default: the Go agent's, see
    /// [`FallbackConfig`]); the bootstrap window counts from this call.
    pub fn with_fallback(mut self, config: FallbackConfig) -> Self {
        self.fallback = OriginFallback::new(config, self.state.clock().instant());
        self
    }

    /// Records the resolver's metrics in `registry` (names start with
    /// `gantry_coord_coldstart_`).
    #[cfg(feature = "metrics")]
    pub fn register_metrics(&mut self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics = Some(Arc::new(super::metrics::ColdStartMetrics::register(
            registry,
        )));
    }

    /// Finds where to get `blob` of the `origin` repository (whose please_pull carries
    /// its delegated credentials, if any). Ends in a [`Resolution`] that names the rule
    /// that decided it.
    pub async fn resolve(&self, origin: &Origin, blob: BlobRef) -> Resolution {
        let started = self.state.clock().instant();
        let resolution = self.run(origin, blob).await;
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            let elapsed = self
                .state
                .clock()
                .instant()
                .saturating_duration_since(started);
            metrics.record(blob.kind, &resolution, elapsed);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = started;
        resolution
    }

    /// Resolves and fetches `blob` until this node's content store holds it: first from
    /// the holders the provider lookup knows of, if any serve it; else each source a
    /// resolution names is handed to `fetch`; a transient failure is waited out; no source at all leads to the gated [`fall_back`](ColdStart::fall_back);
    /// anything else is retried after a backoff (see
    /// [`CascadeConfig::with_retry_backoff`]). Ends only when the blob is stored or the
    /// origin refused it; drop the future to stop.
    pub async fn obtain(
        &self,
        origin: &Origin,
        blob: BlobRef,
        fetch: &impl Fetch,
    ) -> Result<Obtained, OriginRefused> {
        let clock = self.state.clock();
        let (first, longest) = self.config.retry_backoff;
        let mut backoff = first;
        let mut obtained = Obtained::default();
        let mut ask_lookup_first = true;
        loop {
            if self.state.holds(&blob.digest) {
                return Ok(obtained);
            }
            // Holders the lookup knows of serve it without asking any member; only a
            // digest nobody advertises, or whose advertisers did not serve it, goes
            // through the cascade.
            if std::mem::replace(&mut ask_lookup_first, true) {
                let providers = self.lookup.providers(&blob.digest).await;
                tracing::debug!(digest = %blob.digest, providers = providers.len(), "looked up first");
                if !providers.is_empty() {
                    obtained.rule = Some(Rule::Advertised);
                    if fetch.fetch(blob, &Source::Providers(providers)).await {
                        continue;
                    }
                    ask_lookup_first = false;
                    continue;
                }
            }
            let resolution = self.resolve(origin, blob).await;
            tracing::debug!(digest = %blob.digest, rule = resolution.rule.as_str(), result = ?resolution.result, "resolved");
            obtained.rule = Some(resolution.rule);
            obtained.resolutions += 1;
            obtained.messages += resolution.probes_sent + resolution.please_pulls_sent;
            let progressed = match &resolution.result {
                Ok(source) => fetch.fetch(blob, source).await,
                Err(ColdStartError::Failed(class)) => return Err(OriginRefused(*class)),
                Err(ColdStartError::CoolingDown { until }) => {
                    clock.sleep_until(*until).await;
                    true
                }
                Err(
                    ColdStartError::NoneReachable
                    | ColdStartError::NoPuller
                    | ColdStartError::NoMembers,
                ) => self.fall_back(origin, blob).await.is_ok(),
                Err(ColdStartError::Stalled) => false,
            };
            if progressed {
                backoff = first;
            } else {
                clock.sleep_until(clock.instant() + backoff).await;
                backoff = (backoff * 2).min(longest);
            }
        }
    }

    async fn run(&self, origin: &Origin, blob: BlobRef) -> Resolution {
        let clock = self.state.clock();
        let digest = blob.digest;
        if let Some(until) = self.honoured_until(&digest, clock.instant()) {
            return unprobed(Rule::HonourWindow, ColdStartError::CoolingDown { until });
        }
        let Ok(single) = origin.please_pull(blob.kind, vec![digest]) else {
            // Never: the request holds one digest.
            return unprobed(Rule::NoCandidates, ColdStartError::NoPuller);
        };
        let local = self.state.membership().local_id();
        let ranked = self
            .state
            .ranking(&digest, 2 * self.config.top_k, self.config.zone_scope);
        let delegates = origin.authorization().is_some();
        let (mut cascade, mut action) =
            Cascade::from_ranking(self.config.clone(), ranked, &local, blob, delegates);
        loop {
            let next = match action {
                Action::Probe(nodes) => {
                    let answers = futures::future::join_all(nodes.into_iter().map(|node| async {
                        let intent = self.intent_of(&node, &local, &digest).await;
                        (node, intent)
                    }))
                    .await;
                    cascade.on_probe(answers, self.lookup.is_healthy(), clock.read())
                }
                Action::Retry { at } => {
                    clock.sleep_until(at).await;
                    cascade.on_retry(clock.read())
                }
                Action::PleasePull(node) => {
                    let outcome = if node == local {
                        first_outcome(Ok(self.state.start_local_pull(&single)), &digest)
                    } else {
                        first_outcome(
                            self.coordinator.please_pull(node.clone(), &single).await,
                            &digest,
                        )
                    };
                    cascade.on_please_pull(&node, outcome, clock.read())
                }
                Action::LookupProviders {
                    at,
                    watch,
                    probe_watched,
                } => {
                    clock.sleep_until(at).await;
                    let watched = async {
                        if probe_watched {
                            self.intent_of(&watch, &local, &digest).await.intent()
                        } else {
                            None
                        }
                    };
                    let (providers, watched) =
                        futures::join!(self.lookup.providers(&digest), watched);
                    cascade.on_providers(providers, watched, clock.read())
                }
                Action::Done(resolution) => {
                    if let Err(ColdStartError::CoolingDown { until }) = resolution.result {
                        self.honour.lock().insert(digest, until);
                    }
                    return resolution;
                }
            };
            // Each action is answered by its own call, so the cascade is always in turn.
            action = next.expect("the driver answers each action with the call it names");
        }
    }

    /// A node's answer to a pull_intent query: self answers locally, never over the wire.
    /// A stream closed unanswered is a refusal: for a valid query, what an enforcing
    /// member does to a peer it does not list.
    async fn intent_of(&self, node: &NodeId, local: &NodeId, digest: &Digest) -> ProbeAnswer {
        if node == local {
            return ProbeAnswer::Intent(self.state.local_pull_intent(digest));
        }
        match self
            .coordinator
            .pull_intent_query(node.clone(), digest)
            .await
        {
            Ok(intent) => ProbeAnswer::Intent(intent),
            Err(CoordinatorError::Request(OutboundFailure::NoResponse)) => {
                tracing::debug!(%node, %digest, "probe refused");
                ProbeAnswer::Refused
            }
            Err(error) => {
                tracing::debug!(%node, %digest, %error, "probe unanswered");
                ProbeAnswer::Silent
            }
        }
    }

    fn honoured_until(&self, digest: &Digest, now: Instant) -> Option<Instant> {
        let mut honour = self.honour.lock();
        match honour.get(digest).copied() {
            Some(until) if now < until => Some(until),
            Some(_) => {
                honour.remove(digest);
                None
            }
            None => None,
        }
    }

    /// Asks each designated puller to pull its share of `digests` of `kind` (the layers
    /// of one image), one please_pull per puller, as the Go `prefetch` does; this node's
    /// own share starts locally. The pulls then land while [`ColdStart::resolve`] finds
    /// them in flight. Returns the outcomes per puller, or why a puller could not be asked.
    pub async fn prefetch(
        &self,
        origin: &Origin,
        kind: OriginRefKind,
        digests: &[Digest],
    ) -> BTreeMap<NodeId, Result<Vec<PleasePullOutcome>, crate::CoordinatorError>> {
        let local = self.state.membership().local_id();
        let mut shares: BTreeMap<NodeId, Vec<Digest>> = BTreeMap::new();
        for digest in digests {
            // The puller the cascade would ask: zone scope included.
            let ranked = self.state.ranking(digest, 1, self.config.zone_scope);
            if let Some(puller) = ranked.into_iter().next() {
                shares.entry(puller).or_default().push(*digest);
            }
        }
        let asks = shares.into_iter().filter_map(|(puller, digests)| {
            let share = origin.please_pull(kind, digests).ok()?;
            let local = local.clone();
            Some(async move {
                let result = if puller == local {
                    Ok(self.state.start_local_pull(&share))
                } else {
                    self.coordinator.please_pull(puller.clone(), &share).await
                };
                (puller, result)
            })
        });
        futures::future::join_all(asks).await.into_iter().collect()
    }

    /// The last resort after a resolution found no source (nobody reachable, nobody
    /// willing, no members): this node pulls `blob` from the origin itself, if the
    /// [`OriginFallback`] gates admit it, after their jitter and a recheck that still
    /// finds no holder and no pull. Declined: wait, and resolve again.
    pub async fn fall_back(
        &self,
        origin: &Origin,
        blob: BlobRef,
    ) -> Result<Outcome, FallbackDeclined> {
        let result = self.try_fall_back(origin, blob).await;
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.record_fallback(result.as_ref().err().copied());
        }
        match &result {
            Ok(outcome) => tracing::info!(
                ?outcome,
                digest = %blob.digest,
                "no member has it or can pull it: pulling from the origin"
            ),
            Err(declined) => tracing::debug!(%declined, "direct origin pull not allowed yet"),
        }
        result
    }

    async fn try_fall_back(
        &self,
        origin: &Origin,
        blob: BlobRef,
    ) -> Result<Outcome, FallbackDeclined> {
        let clock = self.state.clock();
        let digest = blob.digest;
        let members = self.state.membership().members().len();
        let permit =
            self.fallback
                .admit(&digest, self.lookup.is_healthy(), members, clock.instant())?;
        clock.sleep_until(clock.instant() + permit.jitter()).await;
        if self.recheck(&digest).await {
            return Err(FallbackDeclined::RecheckHit);
        }
        let single = origin
            .please_pull(blob.kind, vec![digest])
            .map_err(|_| FallbackDeclined::RecheckHit)?;
        let outcome = first_outcome(Ok(self.state.start_local_pull(&single)), &digest)
            .unwrap_or(Outcome::Unspecified);
        drop(permit);
        Ok(outcome)
    }

    /// Whether a member that answers this node holds `digest` or pulls it now: this
    /// node, the top K, and the members the provider lookup names (up to K of them). A
    /// provider that refuses this node is no holder for it.
    async fn recheck(&self, digest: &Digest) -> bool {
        let membership = self.state.membership();
        let local = membership.local_id();
        let members = membership.members();
        let providers = self.lookup.providers(digest).await;
        let mut nodes = self
            .state
            .ranking(digest, self.config.top_k, self.config.zone_scope);
        let named = members
            .iter()
            .filter(|m| m.peer_id.is_some_and(|p| providers.contains(&p)))
            .map(|m| m.id.clone())
            .take(self.config.top_k);
        for node in named {
            if !nodes.contains(&node) {
                nodes.push(node);
            }
        }
        nodes.retain(|node| *node != local);
        let probes = nodes
            .iter()
            .map(|node| self.intent_of(node, &local, digest));
        let mut answers = futures::future::join_all(probes).await;
        answers.push(ProbeAnswer::Intent(self.state.local_pull_intent(digest)));
        finds_source(&answers)
    }
}

/// Whether a recheck found the blob or a pull of it.
fn finds_source(answers: &[ProbeAnswer]) -> bool {
    answers
        .iter()
        .filter_map(ProbeAnswer::intent)
        .any(|a| a.has_cached || a.in_flight_since.is_some())
}

fn first_outcome(
    outcomes: Result<Vec<PleasePullOutcome>, crate::CoordinatorError>,
    digest: &Digest,
) -> Option<Outcome> {
    outcomes
        .ok()?
        .into_iter()
        .find(|o| &o.digest == digest)
        .map(|o| o.outcome)
}

/// A resolution that ended before anyone was asked.
fn unprobed(rule: Rule, error: ColdStartError) -> Resolution {
    Resolution {
        rule,
        expansion: None,
        takeovers: 0,
        rank_mismatches: 0,
        probes_sent: 0,
        please_pulls_sent: 0,
        result: Err(error),
    }
}

/// A lookup that knows no providers: for nodes without content discovery, which then
/// rely on probes alone (rule 2 finds a holder on the next resolution).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProviders;

impl ProviderLookup for NoProviders {
    fn providers(&self, _: &Digest) -> BoxFuture<'static, Vec<PeerId>> {
        async { Vec::new() }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    use crate::{Clock as _, Member, PullIntent, StaticMembership};

    #[test]
    fn prefetch_asks_the_pullers_the_cascade_would_ask_zone_scope_included() {
        let zone = |z: &'static str, n: usize| {
            (1..=n).map(move |i| Member::new(format!("{z}-{i}"), None).with_zone(z))
        };
        let members: Vec<Member> = zone("a", 3).chain(zone("b", 6)).collect();
        let state = NodeState::builder(StaticMembership::new("a-1", members)).build();
        let behaviour = crate::Behaviour::new(crate::Config::default());
        let digests: Vec<Digest> = (0..32u32)
            .map(|i| Digest::parse(&format!("sha256:{i:064x}")).unwrap())
            .collect();
        let origin = Origin::new("registry.example.com", "library/app").unwrap();
        // Peers without peer ids cannot be reached: each share fails at once, keyed by
        // the puller it was meant for.
        let pullers = |zone_scope| {
            let config = CascadeConfig::default().with_zone_scope(zone_scope);
            let resolver =
                ColdStart::new(behaviour.coordinator(), state.clone(), NoProviders, config);
            let asked = futures::executor::block_on(resolver.prefetch(
                &origin,
                OriginRefKind::Blob,
                &digests,
            ));
            asked.into_keys().collect::<Vec<NodeId>>()
        };
        let scoped = pullers(true);
        assert!(
            scoped.iter().all(|n| n.as_str().starts_with("a-")),
            "{scoped:?}"
        );
        let everyone = pullers(false);
        assert!(
            everyone.iter().any(|n| n.as_str().starts_with("b-")),
            "{everyone:?}"
        );
    }

    #[test]
    fn a_recheck_finds_a_holder_or_a_pull_among_those_that_answer() {
        let idle = ProbeAnswer::Intent(PullIntent::UNKNOWN);
        assert!(!finds_source(&[
            idle,
            ProbeAnswer::Refused,
            ProbeAnswer::Silent
        ]));
        let holder = ProbeAnswer::Intent(PullIntent {
            has_cached: true,
            ..PullIntent::UNKNOWN
        });
        assert!(finds_source(&[idle, holder]));
        let pulling = ProbeAnswer::Intent(PullIntent {
            in_flight_since: Some(SystemTime::now()),
            ..PullIntent::UNKNOWN
        });
        assert!(finds_source(&[pulling, ProbeAnswer::Silent]));
    }

    /// Simulated time: every wait completes at once and moves both clocks to its end.
    #[derive(Clone)]
    struct FastForward(Arc<Mutex<crate::Now>>);

    impl FastForward {
        fn new() -> Self {
            FastForward(Arc::new(Mutex::new(crate::Now::system())))
        }
    }

    impl crate::Clock for FastForward {
        fn now(&self) -> SystemTime {
            self.0.lock().wall
        }

        fn instant(&self) -> Instant {
            self.0.lock().instant
        }

        fn sleep_until(&self, at: Instant) -> BoxFuture<'static, ()> {
            let mut now = self.0.lock();
            let ahead = at.saturating_duration_since(now.instant);
            *now = *now + ahead;
            futures::future::ready(()).boxed()
        }
    }

    /// A pump that starts every pull and lands it (in `store`) only if told to.
    struct Pump {
        store: crate::MemoryStore,
        lands: bool,
    }

    impl crate::PullerPump for Pump {
        fn start(&self, order: crate::PullOrder<'_>) -> crate::PumpDecision {
            if self.lands {
                self.store.insert(*order.digest);
            }
            crate::PumpDecision::Started
        }
    }

    /// A node alone in its membership, so it is every digest's designated puller.
    fn alone(clock: FastForward, lands: bool) -> (NodeState, ColdStart) {
        let store = crate::MemoryStore::new();
        let state = NodeState::builder(StaticMembership::new(
            "solo",
            vec![Member::new("solo", None)],
        ))
        .store(store.clone())
        .pump(Pump { store, lands })
        .clock(clock)
        .build();
        let behaviour = crate::Behaviour::new(crate::Config::default());
        let resolver = ColdStart::new(
            behaviour.coordinator(),
            state.clone(),
            NoProviders,
            CascadeConfig::default(),
        );
        (state, resolver)
    }

    fn origin() -> Origin {
        Origin::new("registry.example.com", "library/app").unwrap()
    }

    fn layer(n: u8) -> BlobRef {
        BlobRef::new(crate::digest::sample(n), OriginRefKind::Blob)
    }

    #[test]
    fn waits_run_on_the_states_clock() {
        let clock = FastForward::new();
        let (_, resolver) = alone(clock.clone(), false);
        let started = (Instant::now(), clock.instant());
        let resolution = futures::executor::block_on(resolver.resolve(&origin(), layer(1)));
        // The pull never lands: the wait lasts the stall threshold, on simulated time.
        let simulated = clock.instant() - started.1;
        let stall = crate::stale_after(OriginRefKind::Blob, None);
        assert!(simulated >= stall, "{simulated:?} simulated");
        assert!(started.0.elapsed() < stall / 4, "the waits did not sleep");
        assert_eq!(resolution.rule, Rule::ColdStart, "{resolution:?}");
    }

    #[test]
    fn honour_windows_are_bounded_and_honoured() {
        let clock = FastForward::new();
        let (state, resolver) = alone(clock, false);
        let digest = |i: u32| Digest::from_sha256(sha2::Sha256::digest(i.to_be_bytes()).into());
        use sha2::Digest as _;
        for i in 0..(HONOUR_WINDOWS as u32 + 100) {
            state.finish_pull(&digest(i), Err(FailureClass::Transient));
            let blob = BlobRef::new(digest(i), OriginRefKind::Blob);
            let resolution = futures::executor::block_on(resolver.resolve(&origin(), blob));
            assert_eq!(resolution.rule, Rule::TransientCooldown);
        }
        assert_eq!(resolver.honour.lock().len(), HONOUR_WINDOWS);
        let last = BlobRef::new(digest(HONOUR_WINDOWS as u32 + 99), OriginRefKind::Blob);
        let again = futures::executor::block_on(resolver.resolve(&origin(), last));
        assert_eq!(again.rule, Rule::HonourWindow, "nobody asked again");
    }

    /// Fetches from self: the pull that landed in the shared store.
    struct FromStore(NodeState);

    impl Fetch for FromStore {
        fn fetch<'a>(&'a self, blob: BlobRef, _: &'a Source) -> BoxFuture<'a, bool> {
            futures::future::ready(self.0.holds(&blob.digest)).boxed()
        }
    }

    #[test]
    fn obtain_resolves_fetches_and_stops_on_a_refusal() {
        let (state, resolver) = alone(FastForward::new(), true);
        let fetch = FromStore(state.clone());
        let got = futures::executor::block_on(resolver.obtain(&origin(), layer(1), &fetch));
        let got = got.expect("obtained");
        assert_eq!((got.resolutions, got.rule), (1, Some(Rule::ColdStart)));
        assert!(state.holds(&layer(1).digest));
        let held = futures::executor::block_on(resolver.obtain(&origin(), layer(1), &fetch));
        assert_eq!(held.map(|o| o.resolutions), Ok(0), "held already");
        state.finish_pull(&layer(2).digest, Err(FailureClass::NotFound));
        let refused = futures::executor::block_on(resolver.obtain(&origin(), layer(2), &fetch));
        assert_eq!(refused, Err(OriginRefused(FailureClass::NotFound)));
    }

    struct Advertises(PeerId);

    impl ProviderLookup for Advertises {
        fn providers(&self, _: &Digest) -> BoxFuture<'static, Vec<PeerId>> {
            futures::future::ready(vec![self.0]).boxed()
        }
    }

    /// Serves only from advertised providers, and only if told to; records what it got.
    struct Recording {
        store: crate::MemoryStore,
        serves: bool,
        asked: Mutex<Vec<Source>>,
    }

    impl Fetch for Recording {
        fn fetch<'a>(&'a self, blob: BlobRef, source: &'a Source) -> BoxFuture<'a, bool> {
            self.asked.lock().push(source.clone());
            let advertised = matches!(source, Source::Providers(_));
            if self.serves && advertised {
                // What a transfer does: the blob lands in the node's store.
                self.store.insert(blob.digest);
            }
            let held = crate::ContentStore::lookup(&self.store, &blob.digest)
                == crate::StoreLookup::Cached;
            futures::future::ready(held).boxed()
        }
    }

    #[test]
    fn obtain_asks_the_lookup_first_and_the_cascade_only_when_advertisers_fail() {
        let store = crate::MemoryStore::new();
        let state = NodeState::builder(StaticMembership::new(
            "solo",
            vec![Member::new("solo", None)],
        ))
        .store(store.clone())
        .pump(Pump {
            store: store.clone(),
            lands: true,
        })
        .clock(FastForward::new())
        .build();
        let behaviour = crate::Behaviour::new(crate::Config::default());
        let provider = PeerId::random();
        let resolver = ColdStart::new(
            behaviour.coordinator(),
            state.clone(),
            Advertises(provider),
            CascadeConfig::default(),
        );
        let origin = origin();
        // An advertiser that serves: no member asked, no resolution run.
        let serving = Recording {
            store: store.clone(),
            serves: true,
            asked: Mutex::default(),
        };
        let got = futures::executor::block_on(resolver.obtain(&origin, layer(1), &serving));
        let got = got.expect("obtained");
        assert_eq!((got.resolutions, got.rule), (0, Some(Rule::Advertised)));
        assert_eq!(
            *serving.asked.lock(),
            vec![Source::Providers(vec![provider])]
        );
        // Advertisers that do not serve: the cascade runs (self pulls, the pump lands it).
        let failing = Recording {
            store: store.clone(),
            serves: false,
            asked: Mutex::default(),
        };
        let got = futures::executor::block_on(resolver.obtain(&origin, layer(2), &failing));
        let got = got.expect("obtained");
        assert_eq!(got.resolutions, 1);
        assert_eq!(got.rule, Some(Rule::ColdStart));
        assert!(state.holds(&layer(2).digest));
    }
}

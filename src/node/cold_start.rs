//! The cold-start resolver: drives the [`Cascade`] for a digest this node lacks over the
//! network, through the protocol layer's [`Coordinator`] and a [`ProviderLookup`]
//! (Kademlia's providers, in practice), with this node answering itself locally.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Instant, SystemTime},
};

use futures::{future::BoxFuture, FutureExt};
use libp2p_identity::PeerId;
use parking_lot::Mutex;

use super::{
    cascade::{Action, Cascade, CascadeConfig, ColdStartError, ProbeAnswer, Resolution, Rule},
    fallback::{FallbackConfig, FallbackDeclined, OriginFallback},
    Membership, NodeState,
};
use crate::{
    Coordinator, CoordinatorError, Digest, NodeId, OutboundFailure, Outcome, PleasePull,
    PleasePullOutcome,
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

/// Resolves digests this node lacks, one origin pull per blob for the whole cluster.
/// Cheap to clone; clones share the honour windows of transient failures.
#[derive(Clone)]
pub struct ColdStart {
    coordinator: Coordinator,
    state: NodeState,
    lookup: Arc<dyn ProviderLookup>,
    config: Arc<CascadeConfig>,
    /// Digests whose transient failure is honoured locally, until when.
    honour: Arc<Mutex<HashMap<Digest, SystemTime>>>,
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
    /// providers with `lookup`.
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
        ColdStart {
            coordinator,
            state,
            lookup: Arc::new(lookup),
            config: Arc::new(config),
            honour: Arc::default(),
            fallback: OriginFallback::new(FallbackConfig::default(), Instant::now()),
            #[cfg(feature = "metrics")]
            metrics: None,
        }
    }

    /// The gates of [`ColdStart::fall_back`] (default: the Go agent's, see
    /// [`FallbackConfig`]); the bootstrap window counts from this call.
    pub fn with_fallback(mut self, config: FallbackConfig) -> Self {
        self.fallback = OriginFallback::new(config, Instant::now());
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

    /// Finds where to get the first digest of `request`, the please_pull this node would
    /// send for it (its registry, repository, kind and delegated credentials), whose
    /// expected size is `size` if known. Ends in a [`Resolution`] that names the rule
    /// that decided it.
    pub async fn resolve(&self, request: &PleasePull, size: Option<u64>) -> Resolution {
        let started = SystemTime::now();
        let Some(digest) = request.digests().first().cloned() else {
            return unprobed(Rule::NoCandidates, ColdStartError::NoPuller);
        };
        let resolution = self.run(request, &digest, size).await;
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.record(
                request.kind(),
                &resolution,
                started.elapsed().unwrap_or_default(),
            );
        }
        #[cfg(not(feature = "metrics"))]
        let _ = started;
        resolution
    }

    async fn run(&self, request: &PleasePull, digest: &Digest, size: Option<u64>) -> Resolution {
        let now = SystemTime::now();
        if let Some(until) = self.honoured_until(digest, now) {
            return unprobed(Rule::HonourWindow, ColdStartError::CoolingDown { until });
        }
        let local = self.state.membership().local_id();
        let ranked = self
            .state
            .ranking(digest, 2 * self.config.top_k, self.config.zone_scope);
        let (mut cascade, mut action) = Cascade::from_ranking(
            self.config.clone(),
            ranked,
            &local,
            *digest,
            request.kind(),
            size,
            request.authorization().is_some(),
        );
        let Some(single) = share(request, vec![*digest]) else {
            return unprobed(Rule::NoCandidates, ColdStartError::NoPuller);
        };
        loop {
            action = match action {
                Action::Probe(nodes) => {
                    let answers = futures::future::join_all(nodes.into_iter().map(|node| async {
                        let intent = self.intent_of(&node, &local, digest).await;
                        (node, intent)
                    }))
                    .await;
                    cascade.on_probe(answers, self.lookup.is_healthy(), SystemTime::now())
                }
                Action::Retry { at } => {
                    sleep_until(at).await;
                    cascade.on_retry(SystemTime::now())
                }
                Action::PleasePull(node) => {
                    let outcome = if node == local {
                        first_outcome(Ok(self.state.start_local_pull(&single)), digest)
                    } else {
                        first_outcome(
                            self.coordinator.please_pull(node.clone(), &single).await,
                            digest,
                        )
                    };
                    cascade.on_please_pull(&node, outcome, SystemTime::now())
                }
                Action::LookupProviders { at, watch } => {
                    sleep_until(at).await;
                    let (providers, watched) = futures::join!(
                        self.lookup.providers(digest),
                        self.intent_of(&watch, &local, digest)
                    );
                    cascade.on_providers(providers, watched.intent(), SystemTime::now())
                }
                Action::Done(resolution) => {
                    if let Err(ColdStartError::CoolingDown { until }) = resolution.result {
                        self.honour.lock().insert(*digest, until);
                    }
                    return resolution;
                }
            };
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

    fn honoured_until(&self, digest: &Digest, now: SystemTime) -> Option<SystemTime> {
        let mut honour = self.honour.lock();
        match honour.get(digest) {
            Some(until) if now < *until => Some(*until),
            Some(_) => {
                honour.remove(digest);
                None
            }
            None => None,
        }
    }

    /// Asks each designated puller to pull its share of `request`'s digests (the layers
    /// of one image), one please_pull per puller, as the Go `prefetch` does; this node's
    /// own share starts locally. The pulls then land while [`ColdStart::resolve`] finds
    /// them in flight. Returns the outcomes per puller, or why a puller could not be asked.
    pub async fn prefetch(
        &self,
        request: &PleasePull,
    ) -> BTreeMap<NodeId, Result<Vec<PleasePullOutcome>, crate::CoordinatorError>> {
        let local = self.state.membership().local_id();
        let mut shares: BTreeMap<NodeId, Vec<Digest>> = BTreeMap::new();
        for digest in request.digests() {
            // The puller the cascade would ask: zone scope included.
            let ranked = self.state.ranking(digest, 1, self.config.zone_scope);
            if let Some(puller) = ranked.into_iter().next() {
                shares.entry(puller).or_default().push(*digest);
            }
        }
        let asks = shares.into_iter().filter_map(|(puller, digests)| {
            let share = share(request, digests)?;
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
}

async fn sleep_until(at: SystemTime) {
    if let Ok(wait) = at.duration_since(SystemTime::now()) {
        futures_timer::Delay::new(wait).await;
    }
}

impl ColdStart {
    /// The last resort after a resolution found no source (nobody reachable, nobody
    /// willing, no members): this node pulls the first digest of `request` from the
    /// origin itself, if the [`OriginFallback`] gates admit it, after their jitter and
    /// a recheck that still finds no holder and no pull. Declined: wait, and resolve
    /// again.
    pub async fn fall_back(&self, request: &PleasePull) -> Result<Outcome, FallbackDeclined> {
        let result = self.try_fall_back(request).await;
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.record_fallback(result.as_ref().err().copied());
        }
        match &result {
            Ok(outcome) => tracing::info!(
                ?outcome,
                "no member has it or can pull it: pulling from the origin"
            ),
            Err(declined) => tracing::debug!(%declined, "direct origin pull not allowed yet"),
        }
        result
    }

    async fn try_fall_back(&self, request: &PleasePull) -> Result<Outcome, FallbackDeclined> {
        // Never empty: a PleasePull holds at least one digest.
        let Some(digest) = request.digests().first() else {
            return Err(FallbackDeclined::RecheckHit);
        };
        let members = self.state.membership().members().len();
        let permit =
            self.fallback
                .admit(digest, self.lookup.is_healthy(), members, Instant::now())?;
        futures_timer::Delay::new(permit.jitter()).await;
        if self.recheck(digest).await {
            return Err(FallbackDeclined::RecheckHit);
        }
        let single = share(request, vec![*digest]).ok_or(FallbackDeclined::RecheckHit)?;
        let outcome = first_outcome(Ok(self.state.start_local_pull(&single)), digest)
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

/// `request`'s registry, repository, kind and credentials, for these digests.
fn share(request: &PleasePull, digests: Vec<Digest>) -> Option<PleasePull> {
    let share = PleasePull::new(
        request.registry(),
        request.repository(),
        request.kind(),
        digests,
    )
    .ok()?;
    Some(match request.authorization() {
        Some(auth) => share.with_authorization(auth.clone()),
        None => share,
    })
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
    use crate::{Member, OriginRefKind, PullIntent, StaticMembership};

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
        let request = PleasePull::new(
            "registry.example.com",
            "library/app",
            OriginRefKind::Blob,
            digests,
        )
        .unwrap();
        // Peers without peer ids cannot be reached: each share fails at once, keyed by
        // the puller it was meant for.
        let pullers = |zone_scope| {
            let config = CascadeConfig::default().with_zone_scope(zone_scope);
            let resolver =
                ColdStart::new(behaviour.coordinator(), state.clone(), NoProviders, config);
            let asked = futures::executor::block_on(resolver.prefetch(&request));
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
}

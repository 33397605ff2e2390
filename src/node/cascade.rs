//! The cold-start cascade for one digest, as a state machine over answers and time: no
//! sockets, no sleeping. [`ColdStart`](super::ColdStart) drives it over the network; the
//! tests drive it on simulated time.
//!
//! The rules, in order, as the Go `coldstart` resolver applies them to the top K of the
//! requester's own HRW ranking:
//!
//! 1. a trusted failure class anywhere → fail at once with that class;
//! 2. a cached copy → its holder;
//! 3. a fresh in-flight pull → wait for a provider to appear (a stale one is taken over);
//! 4. a transient failure → honour it locally for min(cooldown, cap);
//! 5. nobody reachable → probe the top 2K;
//! 6. provider lookup unhealthy and nobody has it → probe the top 2K;
//! 7. otherwise ask the lowest-ranked reachable node (self locally) to pull, then wait
//!    for a provider. A node that cannot be reached, declines, or is stalled is never
//!    asked again in the same resolution: the next rank is.
//!
//! Two refinements keep churn from costing origin pulls. A member that refuses a probe
//! (closes the stream unanswered, as an enforcing node does to a peer its membership does
//! not list yet) is alive and behind: within the convergence window it is asked again
//! rather than passed over. And an auth failure is about credentials, not the blob: a
//! requester that delegates credentials asks the node that failed once more with them
//! before it gives up, and one that has none honours the failure like a transient one,
//! since a member with credentials may still pull the blob.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use libp2p_identity::PeerId;

use super::{hrw, Member, Now, Stalls};
use crate::{Digest, FailureClass, NodeId, OriginRefKind, Outcome, PullIntent, RecentFailure};

/// Settings of the cascade, with the Go resolver's defaults.
#[derive(Debug, Clone)]
pub struct CascadeConfig {
    pub(crate) top_k: usize,
    pub(crate) trusted: Vec<FailureClass>,
    pub(crate) transient_cap: Duration,
    pub(crate) poll_small: Duration,
    pub(crate) poll_layer: Duration,
    pub(crate) stalls: Stalls,
    pub(crate) zone_scope: bool,
    pub(crate) max_waits: u32,
    pub(crate) convergence_window: Duration,
    pub(crate) refusal_retry: Duration,
    pub(crate) retry_backoff: (Duration, Duration),
    pub(crate) cut_through: bool,
}

impl Default for CascadeConfig {
    fn default() -> Self {
        CascadeConfig {
            top_k: 3,
            trusted: vec![
                FailureClass::Auth,
                FailureClass::NotFound,
                FailureClass::RateLimited,
            ],
            transient_cap: Duration::from_secs(30),
            poll_small: Duration::from_millis(200),
            poll_layer: Duration::from_secs(1),
            stalls: Stalls::default(),
            zone_scope: false,
            max_waits: 2,
            convergence_window: Duration::from_secs(10),
            refusal_retry: Duration::from_millis(250),
            retry_backoff: (Duration::from_millis(100), Duration::from_secs(2)),
            cut_through: false,
        }
    }
}

impl CascadeConfig {
    /// Members probed first (default 3); the expansion probes twice as many.
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k.max(1);
        self
    }

    /// Failure classes that end a resolution at once (default auth, not found, rate
    /// limited: the origin itself said no, and every node would hear the same). An auth
    /// failure ends it only for a requester that brings credentials of its own.
    pub fn with_trusted_failures(
        mut self,
        classes: impl IntoIterator<Item = FailureClass>,
    ) -> Self {
        self.trusted = classes.into_iter().collect();
        self
    }

    /// Whether a failure of this class, reported by any candidate, is the origin's word
    /// for every node: the one place that decides it.
    pub fn trusts(&self, class: FailureClass) -> bool {
        self.trusted.contains(&class)
    }

    /// Longest a transient failure seen on a peer is honoured locally (default 30 s).
    pub fn with_transient_cap(mut self, cap: Duration) -> Self {
        self.transient_cap = cap;
        self
    }

    /// How often the provider lookup is asked while waiting: manifests and configs,
    /// then layers (default 200 ms and 1 s).
    pub fn with_poll_intervals(mut self, small: Duration, layer: Duration) -> Self {
        self.poll_small = small;
        self.poll_layer = layer;
        self
    }

    /// The stall thresholds: when an in-flight pull is taken over, and how long a wait
    /// for a provider lasts.
    pub fn with_stalls(mut self, stalls: Stalls) -> Self {
        self.stalls = stalls;
        self
    }

    /// Candidates are the members of the requester's zone (falling back to all members
    /// when it has none): one origin pull per zone, for clusters that pay for
    /// cross-zone traffic.
    pub fn with_zone_scope(mut self, zone_scope: bool) -> Self {
        self.zone_scope = zone_scope;
        self
    }

    /// Passes after the first in one resolution before it gives up (default 2): after a
    /// wait times out, or a please_pull goes unanswered, the cascade probes again (and
    /// takes over a stalled pull).
    pub fn with_max_waits(mut self, waits: u32) -> Self {
        self.max_waits = waits.max(1);
        self
    }

    /// How long members that refuse this node are taken for members whose view lags
    /// (default 10 s, from the first refusal in a resolution), and how often they are
    /// asked again meanwhile (default 250 ms). After the window they count as unreachable.
    pub fn with_convergence(mut self, window: Duration, retry: Duration) -> Self {
        self.convergence_window = window;
        self.refusal_retry = retry.max(Duration::from_millis(1));
        self
    }

    /// How long [`ColdStart::obtain`](crate::ColdStart::obtain) waits before it resolves
    /// again after a resolution that made no progress: `first`, doubling up to `longest`
    /// (default 100 ms to 2 s).
    pub fn with_retry_backoff(mut self, first: Duration, longest: Duration) -> Self {
        let first = first.max(Duration::from_millis(1));
        self.retry_backoff = (first, longest.max(first));
        self
    }

    /// Whether a resolution that finds a member pulling the digest ends at once with
    /// [`Source::Pulling`] (default off: it waits for the pull to land, as the Go
    /// resolver does). For a transfer that can take a pull's bytes as they arrive, so a
    /// waiter is done when the puller is, not one whole copy later. The wire is the same
    /// either way.
    pub fn with_cut_through(mut self, cut_through: bool) -> Self {
        self.cut_through = cut_through;
        self
    }

    fn poll_interval(&self, kind: OriginRefKind) -> Duration {
        match kind {
            OriginRefKind::Blob => self.poll_layer,
            OriginRefKind::Manifest | OriginRefKind::Config => self.poll_small,
        }
    }
}

/// The rule that decided a resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// The provider lookup named holders before any member was asked (what
    /// [`ColdStart::obtain`](crate::ColdStart::obtain) tries first, as the Go nodes run
    /// the cascade only for a digest nobody advertises).
    Advertised,
    /// A transient failure seen earlier is still honoured; nobody was asked.
    HonourWindow,
    /// Rule 1: a trusted failure class.
    TrustedFailure,
    /// Rule 2: a cached copy.
    CachedCopy,
    /// Rule 3: a fresh in-flight pull, waited on.
    InFlight,
    /// Rule 4: a transient failure, honoured locally.
    TransientCooldown,
    /// Rule 5, exhausted: nobody answered, even after widening the probe.
    Unreachable,
    /// Rule 7: a pull was asked for (or started locally) and waited on, or nobody
    /// reachable would pull.
    ColdStart,
    /// The membership offers no candidate at all.
    NoCandidates,
}

impl Rule {
    /// A short name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Advertised => "advertised",
            Rule::HonourWindow => "honour_window",
            Rule::TrustedFailure => "trusted_failure",
            Rule::CachedCopy => "cached_copy",
            Rule::InFlight => "in_flight",
            Rule::TransientCooldown => "transient_cooldown",
            Rule::Unreachable => "unreachable",
            Rule::ColdStart => "cold_start",
            Rule::NoCandidates => "no_candidates",
        }
    }
}

/// Why the probe was widened to the top 2K.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Expansion {
    /// Rule 5: no one in the top K answered.
    AllUnreachable,
    /// Rule 6: the provider lookup is unhealthy and no one in the top K has the digest.
    LookupUnhealthy,
    /// Some of the top K did not answer and no one who did has the digest or pulls it:
    /// one of the next K may already be pulling it (it was asked while those were down).
    SomeUnreachable,
}

impl Expansion {
    /// A short name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Expansion::AllUnreachable => "all_unreachable",
            Expansion::LookupUnhealthy => "lookup_unhealthy",
            Expansion::SomeUnreachable => "some_unreachable",
        }
    }
}

/// What a resolution is for: a digest, the URL family it is pulled from, and its size
/// when the manifest that names it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlobRef {
    /// The digest.
    pub digest: Digest,
    /// Manifest, config or layer: how long a wait for its pull lasts.
    pub kind: OriginRefKind,
    /// Its expected size in bytes, if known.
    pub size: Option<u64>,
}

impl BlobRef {
    /// A digest of `kind`, size unknown.
    pub fn new(digest: Digest, kind: OriginRefKind) -> Self {
        BlobRef {
            digest,
            kind,
            size: None,
        }
    }

    /// With its expected size.
    pub fn with_size(mut self, size: u64) -> Self {
        self.size = Some(size);
        self
    }
}

/// Where the digest can be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A member that said it holds the digest (rule 2).
    Holder(NodeId),
    /// Peers the provider lookup names (after a wait).
    Providers(Vec<PeerId>),
    /// A member pulling the digest now (rules 3 and 7), whose bytes can be taken as
    /// they arrive; only with [`CascadeConfig::with_cut_through`]. If the transfer
    /// fails, resolve again: the next probe sees how the pull ended.
    Pulling(NodeId),
}

/// A candidate's answer to a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// It answered.
    Intent(PullIntent),
    /// It is up and closed the stream unanswered: it refused this node, most likely
    /// because its membership has not caught up with this node's yet.
    Refused,
    /// No answer: unreachable, timed out.
    Silent,
}

impl ProbeAnswer {
    /// The answer, if there is one.
    pub fn intent(&self) -> Option<PullIntent> {
        match self {
            ProbeAnswer::Intent(intent) => Some(*intent),
            _ => None,
        }
    }
}

impl From<Option<PullIntent>> for ProbeAnswer {
    fn from(answer: Option<PullIntent>) -> Self {
        answer.map_or(ProbeAnswer::Silent, ProbeAnswer::Intent)
    }
}

/// Why a resolution found no source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ColdStartError {
    /// The origin refused the digest for a reason every node would hear: stop.
    #[error("the origin refused it ({0:?})")]
    Failed(FailureClass),
    /// A transient failure is being honoured until then: try again after it.
    #[error("cooling down after a transient failure")]
    CoolingDown {
        /// When the digest may be tried again, on the node's monotonic clock.
        until: Instant,
    },
    /// No candidate answered, even after widening the probe.
    #[error("no candidate reachable")]
    NoneReachable,
    /// Every reachable candidate was asked to pull and none would, or could.
    #[error("no candidate would pull it")]
    NoPuller,
    /// The pull waited on did not produce a provider in time.
    #[error("no provider appeared before the stall threshold")]
    Stalled,
    /// The membership is empty.
    #[error("no members to ask")]
    NoMembers,
}

/// How a resolution ended, and what decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The rule that decided it.
    pub rule: Rule,
    /// Whether the probe was widened, and why.
    pub expansion: Option<Expansion>,
    /// Stale in-flight pulls that were taken over.
    pub takeovers: u32,
    /// Responders whose own `hrw_rank` disagreed with the requester's ranking of them:
    /// their membership views differ.
    pub rank_mismatches: u32,
    /// Probe answers sent (over the wire; self answers locally and is not counted).
    pub probes_sent: u32,
    /// please_pull requests sent over the wire.
    pub please_pulls_sent: u32,
    /// The source, or why there is none.
    pub result: Result<Source, ColdStartError>,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask each node `pull_intent_query` (self locally), in parallel under one window,
    /// and hand the answers to [`Cascade::on_probe`].
    Probe(Vec<NodeId>),
    /// Members refused this node: at (or after) this time call [`Cascade::on_retry`],
    /// which probes them again.
    Retry {
        /// Not before this.
        at: Instant,
    },
    /// Ask this node to pull (self: start it locally), and hand the result to
    /// [`Cascade::on_please_pull`]; `None` when it could not be asked.
    PleasePull(NodeId),
    /// Ask the provider lookup at (or after) this time and, when `probe_watched` says
    /// so, the node whose pull is waited on its `pull_intent_query` (so a pull that fails
    /// is seen well before the stall threshold); hand both to [`Cascade::on_providers`].
    LookupProviders {
        /// Not before this.
        at: Instant,
        /// The node whose pull is waited on.
        watch: NodeId,
        /// Whether to probe it this time: at the 2nd, 4th and 8th look, then every 8th.
        /// The provider lookup is what tells a waiter the pull landed; the probe only
        /// catches a pull that failed, so thousands of waiters cost its node little.
        probe_watched: bool,
    },
    /// The resolution is over.
    Done(Resolution),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Probing,
    Retrying,
    Asking,
    Waiting {
        until: Instant,
        rule: Rule,
        watch: usize,
        /// Looks at the provider lookup so far in this wait.
        looks: u32,
    },
    Done,
}

impl Phase {
    /// The call this phase awaits.
    fn awaits(self) -> &'static str {
        match self {
            Phase::Probing => "on_probe",
            Phase::Retrying => "on_retry",
            Phase::Asking => "on_please_pull",
            Phase::Waiting { .. } => "on_providers",
            Phase::Done => "nothing (the resolution is over)",
        }
    }
}

/// A [`Cascade`] was handed an input it did not ask for: each [`Action`] has one call
/// that answers it, and only that call is accepted until then. A driver bug, never a
/// peer's doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Cascade::{called} called while the cascade awaits {awaits}")]
pub struct OutOfTurn {
    /// The call that was made.
    pub called: &'static str,
    /// The call the cascade awaits.
    pub awaits: &'static str,
}

/// One digest's cascade.
#[derive(Debug)]
pub struct Cascade {
    config: Arc<CascadeConfig>,
    digest: Digest,
    kind: OriginRefKind,
    size: Option<u64>,
    local: NodeId,
    /// Candidates in the requester's HRW order: index = the requester's rank of them.
    ranked: Vec<NodeId>,
    /// How many of `ranked` have been probed.
    probed: usize,
    /// The answer of each probed candidate, by rank.
    answers: Vec<ProbeAnswer>,
    /// Whether the requester delegates credentials of its own.
    delegates: bool,
    /// Whether a node that reported an auth failure was asked again with them.
    reasked: bool,
    /// When a member first refused this node in this resolution.
    first_refusal: Option<Instant>,
    /// Candidates that cannot be asked to pull again in this resolution.
    passed_over: HashSet<NodeId>,
    /// Candidates whose stale pull was taken over, each counted once.
    taken_over: HashSet<NodeId>,
    phase: Phase,
    /// Passes after the first: each looks again after a wait or an unanswered ask.
    passes: u32,
    expansion: Option<Expansion>,
    takeovers: u32,
    rank_mismatches: u32,
    probes_sent: u32,
    please_pulls_sent: u32,
}

/// The probed candidates that answered, by the requester's rank of them.
type Reachable = Vec<(usize, PullIntent)>;

impl Cascade {
    /// Starts a cascade for `digest` of `kind` (and expected `size`, if known) on the
    /// node `local` with the given membership snapshot; `delegates_credentials` says
    /// whether the requester's please_pull carries credentials of its own.
    pub fn start(
        config: Arc<CascadeConfig>,
        members: &[Member],
        local: &NodeId,
        blob: BlobRef,
        delegates_credentials: bool,
    ) -> (Self, Action) {
        let widest = 2 * config.top_k;
        let ranked = ranked_candidates(config.zone_scope, members, local, &blob.digest, widest);
        Self::from_ranking(config, ranked, local, blob, delegates_credentials)
    }

    /// As [`Cascade::start`], from the requester's ranking of the candidates, best first
    /// (its first 2K are all the cascade asks): for a node that keeps rankings per
    /// digest rather than hashing the membership for each resolution.
    pub fn from_ranking(
        config: Arc<CascadeConfig>,
        ranked: Vec<NodeId>,
        local: &NodeId,
        blob: BlobRef,
        delegates_credentials: bool,
    ) -> (Self, Action) {
        let mut cascade = Cascade {
            config,
            digest: blob.digest,
            kind: blob.kind,
            size: blob.size,
            local: local.clone(),
            ranked,
            probed: 0,
            answers: Vec::new(),
            delegates: delegates_credentials,
            reasked: false,
            first_refusal: None,
            passed_over: HashSet::new(),
            taken_over: HashSet::new(),
            phase: Phase::Probing,
            passes: 0,
            expansion: None,
            takeovers: 0,
            rank_mismatches: 0,
            probes_sent: 0,
            please_pulls_sent: 0,
        };
        if cascade.ranked.is_empty() {
            let action = cascade.done(Rule::NoCandidates, Err(ColdStartError::NoMembers));
            return (cascade, action);
        }
        let k = cascade.config.top_k;
        let action = cascade.probe_up_to(k);
        (cascade, action)
    }

    /// The digest being resolved.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The requester's ranking of the candidates it may ask (the top 2K), designated
    /// puller first.
    pub fn ranking(&self) -> &[NodeId] {
        &self.ranked
    }

    /// The answers to the last [`Action::Probe`], in any order; a node missing from
    /// `answers` did not answer. `lookup_healthy` says whether the provider lookup
    /// works (a Kademlia routing table that is not empty, say). The rules apply in the
    /// Go resolver's order; the first that decides, decides.
    pub fn on_probe(
        &mut self,
        answers: Vec<(NodeId, ProbeAnswer)>,
        lookup_healthy: bool,
        now: Now,
    ) -> Result<Action, OutOfTurn> {
        self.expect(Phase::Probing, "on_probe")?;
        self.record(answers);
        let reachable = self.reachable();
        let action = self
            .rule_1_trusted_failure(&reachable)
            .or_else(|| self.rule_2_cached_copy(&reachable))
            .or_else(|| self.rule_3_in_flight(&reachable, now))
            .or_else(|| self.rule_4_transient_failure(&reachable, now))
            .or_else(|| self.refusers_converging(now))
            .or_else(|| self.rules_5_and_6_widen(&reachable, lookup_healthy))
            .unwrap_or_else(|| self.rule_7_ask_to_pull(&reachable));
        Ok(action)
    }

    /// The time an [`Action::Retry`] named has come: probes the same members again.
    pub fn on_retry(&mut self, _now: Now) -> Result<Action, OutOfTurn> {
        self.expect(Phase::Retrying, "on_retry")?;
        Ok(self.probe_again())
    }

    /// The outcome of the last [`Action::PleasePull`] for this digest; `None` when the
    /// node could not be asked (unreachable, no response).
    pub fn on_please_pull(
        &mut self,
        node: &NodeId,
        outcome: Option<Outcome>,
        now: Now,
    ) -> Result<Action, OutOfTurn> {
        self.expect(Phase::Asking, "on_please_pull")?;
        self.passed_over.insert(node.clone());
        let action = match outcome {
            Some(Outcome::Started { .. }) => self.wait(Rule::ColdStart, node.clone(), now),
            Some(Outcome::AlreadyPulling { started_at })
                if now.age_of(started_at) > self.stall() =>
            {
                self.take_over(node);
                self.ask_next()
            }
            Some(Outcome::AlreadyPulling { .. }) => self.wait(Rule::ColdStart, node.clone(), now),
            Some(Outcome::RecentlyFailed(failure)) if self.trusts(failure.class) => self.done(
                Rule::TrustedFailure,
                Err(ColdStartError::Failed(failure.class)),
            ),
            Some(Outcome::RecentlyFailed(failure)) => self.cooldown(failure.cooldown_until, now),
            // Declined: the next rank is asked, never this node again.
            Some(Outcome::Unspecified) => self.ask_next(),
            // No response: it may have started all the same (a slow response is not a
            // refusal), so look again before anyone else pulls, as the Go resolver
            // ends its pass; the node is not asked again in this resolution.
            None => self.new_pass_or(Rule::ColdStart, ColdStartError::NoPuller),
        };
        Ok(action)
    }

    /// What the provider lookup found and what the watched node answered (`None`: no
    /// answer), asked as the last [`Action::LookupProviders`] said.
    pub fn on_providers(
        &mut self,
        providers: Vec<PeerId>,
        watched: Option<PullIntent>,
        now: Now,
    ) -> Result<Action, OutOfTurn> {
        let Phase::Waiting {
            until,
            rule,
            watch,
            looks,
        } = self.phase
        else {
            return Err(self.out_of_turn("on_providers"));
        };
        if !providers.is_empty() {
            return Ok(self.done(rule, Ok(Source::Providers(providers))));
        }
        let watched_node = self.ranked[watch].clone();
        if let Some(intent) = watched {
            if intent.has_cached {
                return Ok(self.done(rule, Ok(Source::Holder(watched_node))));
            }
            if let Some(failure) = standing_failure(&intent) {
                if self.trusts(failure.class) {
                    return Ok(self.origin_refused(watched_node, failure.class));
                }
                return Ok(self.cooldown(failure.cooldown_until, now));
            }
            if intent.in_flight_since.is_none() {
                // The pull ended and left no trace here: look again.
                return Ok(self.new_pass_or(rule, ColdStartError::Stalled));
            }
        }
        if now.instant < until {
            let at = (now.instant + self.config.poll_interval(self.kind)).min(until);
            return Ok(self.look(at, watched_node, rule, until, watch, looks + 1));
        }
        // The pull waited on stalled: a new pass takes it over.
        Ok(self.new_pass_or(rule, ColdStartError::Stalled))
    }

    /// Rule 1: a trusted failure class anywhere ends it (after one more ask with this
    /// requester's credentials, for an auth failure).
    fn rule_1_trusted_failure(&mut self, reachable: &Reachable) -> Option<Action> {
        let (rank, class) = reachable
            .iter()
            .filter_map(|(rank, a)| Some((*rank, standing_failure(a)?.class)))
            .find(|(_, class)| self.trusts(*class))?;
        let node = self.ranked[rank].clone();
        Some(self.origin_refused(node, class))
    }

    /// Rule 2: a cached copy names its holder.
    fn rule_2_cached_copy(&mut self, reachable: &Reachable) -> Option<Action> {
        let (rank, _) = reachable.iter().find(|(_, a)| a.has_cached)?;
        let holder = self.ranked[*rank].clone();
        Some(self.done(Rule::CachedCopy, Ok(Source::Holder(holder))))
    }

    /// Rule 3: a fresh in-flight pull is waited on; a stale one is taken over (its node
    /// is not asked again).
    fn rule_3_in_flight(&mut self, reachable: &Reachable, now: Now) -> Option<Action> {
        let stall = self.stall();
        let mut fresh = None;
        for (rank, answer) in reachable {
            let Some(started) = answer.in_flight_since else {
                continue;
            };
            let node = self.ranked[*rank].clone();
            if now.age_of(started) > stall {
                self.take_over(&node);
            } else if fresh.is_none() {
                fresh = Some(node);
            }
        }
        let puller = fresh?;
        Some(self.wait(Rule::InFlight, puller, now))
    }

    /// Rule 4: a transient failure is honoured locally, until the latest cooldown any
    /// candidate reports (at most the transient cap).
    fn rule_4_transient_failure(&mut self, reachable: &Reachable, now: Now) -> Option<Action> {
        let until = reachable
            .iter()
            .filter_map(|(_, a)| standing_failure(a))
            .filter(|f| !self.trusts(f.class))
            .map(|f| f.cooldown_until)
            .max()?;
        Some(self.cooldown(until, now))
    }

    /// Not a Go rule, and before rules 5 to 7: while the convergence window lasts, a
    /// member that refused this node and ranks before every member that could be asked
    /// to pull is asked again, not passed over: asking past it would start a second pull
    /// once its view catches up.
    fn refusers_converging(&mut self, now: Now) -> Option<Action> {
        let first_refused = self
            .answers
            .iter()
            .position(|a| *a == ProbeAnswer::Refused)?;
        let first_askable = self
            .answers
            .iter()
            .enumerate()
            .find(|(rank, a)| {
                matches!(a, ProbeAnswer::Intent(_))
                    && !self.passed_over.contains(&self.ranked[*rank])
            })
            .map(|(rank, _)| rank);
        if first_askable.is_some_and(|askable| askable < first_refused) {
            return None;
        }
        let since = *self.first_refusal.get_or_insert(now.instant);
        if now.instant.duration_since(since) >= self.config.convergence_window {
            return None;
        }
        self.phase = Phase::Retrying;
        Some(Action::Retry {
            at: now.instant + self.config.refusal_retry,
        })
    }

    /// Rules 5 and 6: widen the probe to the top 2K, once, when nobody in the top K
    /// answered (5), or when the provider lookup is unhealthy and nobody has it (6); and,
    /// beyond the Go rules, when some of the top K did not answer: while a designated
    /// puller is down (or not yet up, in a rollout), the pull was asked of a lower rank.
    fn rules_5_and_6_widen(
        &mut self,
        reachable: &Reachable,
        lookup_healthy: bool,
    ) -> Option<Action> {
        if self.expansion.is_some() || self.probed >= self.ranked.len() {
            return None;
        }
        let reason = if reachable.is_empty() {
            Expansion::AllUnreachable
        } else if !lookup_healthy {
            Expansion::LookupUnhealthy
        } else if self.answers.contains(&ProbeAnswer::Silent) {
            Expansion::SomeUnreachable
        } else {
            return None;
        };
        self.expansion = Some(reason);
        Some(self.probe_up_to(2 * self.config.top_k))
    }

    /// Rule 7: the best-ranked reachable node that has not been passed over is asked to
    /// pull (self locally), and waited on.
    fn rule_7_ask_to_pull(&mut self, reachable: &Reachable) -> Action {
        if reachable.is_empty() {
            return self.done(Rule::Unreachable, Err(ColdStartError::NoneReachable));
        }
        self.ask_next()
    }

    fn expect(&self, phase: Phase, called: &'static str) -> Result<(), OutOfTurn> {
        if self.phase == phase {
            Ok(())
        } else {
            Err(self.out_of_turn(called))
        }
    }

    fn out_of_turn(&self, called: &'static str) -> OutOfTurn {
        OutOfTurn {
            called,
            awaits: self.phase.awaits(),
        }
    }

    /// Keeps the answers of probed candidates, counting the responders whose own rank
    /// disagrees with the requester's ranking of them.
    fn record(&mut self, answers: Vec<(NodeId, ProbeAnswer)>) {
        for (node, answer) in answers {
            let Some(rank) = self.ranked[..self.probed].iter().position(|n| *n == node) else {
                continue;
            };
            if let ProbeAnswer::Intent(intent) = &answer {
                if intent.hrw_rank != Some(rank as u32) {
                    self.rank_mismatches += 1;
                }
            }
            self.answers[rank] = answer;
        }
    }

    fn reachable(&self) -> Reachable {
        self.answers
            .iter()
            .enumerate()
            .filter_map(|(rank, a)| a.intent().map(|a| (rank, a)))
            .collect()
    }

    fn stall(&self) -> Duration {
        self.config.stalls.stale_after(self.kind, self.size)
    }

    /// A stale pull of `node`'s is taken over: it is not asked again.
    fn take_over(&mut self, node: &NodeId) {
        self.passed_over.insert(node.clone());
        if self.taken_over.insert(node.clone()) {
            self.takeovers += 1;
        }
    }

    fn probe_up_to(&mut self, k: usize) -> Action {
        let end = k.min(self.ranked.len());
        let nodes: Vec<NodeId> = self.ranked[self.probed..end].to_vec();
        self.probes_sent += nodes.iter().filter(|n| **n != self.local).count() as u32;
        self.probed = end;
        self.answers.resize(end, ProbeAnswer::Silent);
        self.phase = Phase::Probing;
        Action::Probe(nodes)
    }

    /// Probes every candidate probed so far again, for a new pass after a wait.
    fn probe_again(&mut self) -> Action {
        let probed = self.probed;
        self.probed = 0;
        self.answers.clear();
        self.probe_up_to(probed)
    }

    fn done(&mut self, rule: Rule, result: Result<Source, ColdStartError>) -> Action {
        self.phase = Phase::Done;
        Action::Done(Resolution {
            rule,
            expansion: self.expansion,
            takeovers: self.takeovers,
            rank_mismatches: self.rank_mismatches,
            probes_sent: self.probes_sent,
            please_pulls_sent: self.please_pulls_sent,
            result,
        })
    }

    fn wait(&mut self, rule: Rule, watch: NodeId, now: Now) -> Action {
        if self.config.cut_through {
            return self.done(rule, Ok(Source::Pulling(watch)));
        }
        let watch_rank = self.ranked.iter().position(|n| *n == watch).unwrap_or(0);
        let until = now.instant + self.stall();
        self.look(now.instant, watch, rule, until, watch_rank, 0)
    }

    /// The `looks`-th look at the provider lookup in a wait (0 is the first).
    fn look(
        &mut self,
        at: Instant,
        watch: NodeId,
        rule: Rule,
        until: Instant,
        watch_rank: usize,
        looks: u32,
    ) -> Action {
        self.phase = Phase::Waiting {
            until,
            rule,
            watch: watch_rank,
            looks,
        };
        let probe_watched = matches!(looks, 2 | 4) || (looks >= 8 && looks.is_multiple_of(8));
        if probe_watched && watch != self.local {
            self.probes_sent += 1;
        }
        Action::LookupProviders {
            at,
            watch,
            probe_watched,
        }
    }

    /// Whether a failure of this class ends the resolution. An auth failure does not
    /// for a requester without credentials of its own: a member with some may pull it.
    fn trusts(&self, class: FailureClass) -> bool {
        self.config.trusts(class) && (class != FailureClass::Auth || self.delegates)
    }

    /// A trusted failure reported by `node`. Before an auth failure ends the
    /// resolution, the node is asked once more with this requester's credentials: it
    /// may have failed with none, or with other ones.
    fn origin_refused(&mut self, node: NodeId, class: FailureClass) -> Action {
        if class == FailureClass::Auth && self.delegates && !self.reasked {
            self.reasked = true;
            return self.ask(node);
        }
        self.done(Rule::TrustedFailure, Err(ColdStartError::Failed(class)))
    }

    /// A transient failure a peer reported, honoured until its (wall-clock) end, at most
    /// the transient cap from now.
    fn cooldown(&mut self, until: SystemTime, now: Now) -> Action {
        let until = now
            .instant_of(until)
            .min(now.instant + self.config.transient_cap);
        self.done(
            Rule::TransientCooldown,
            Err(ColdStartError::CoolingDown { until }),
        )
    }

    fn ask_next(&mut self) -> Action {
        let next = self
            .answers
            .iter()
            .enumerate()
            .filter(|(_, a)| matches!(a, ProbeAnswer::Intent(_)))
            .map(|(rank, _)| &self.ranked[rank])
            .find(|node| !self.passed_over.contains(*node))
            .cloned();
        match next {
            Some(node) => {
                if node != self.ranked[0] {
                    tracing::debug!(
                        digest = %self.digest,
                        puller = %node,
                        designated = %self.ranked[0],
                        passed_over = self.passed_over.len(),
                        designated_answer = ?self.answers.first(),
                        "asking past the designated puller"
                    );
                }
                self.ask(node)
            }
            None => self.done(Rule::ColdStart, Err(ColdStartError::NoPuller)),
        }
    }

    fn ask(&mut self, node: NodeId) -> Action {
        if node != self.local {
            self.please_pulls_sent += 1;
        }
        self.phase = Phase::Asking;
        Action::PleasePull(node)
    }

    fn new_pass_or(&mut self, rule: Rule, error: ColdStartError) -> Action {
        if self.passes < self.config.max_waits {
            self.passes += 1;
            return self.probe_again();
        }
        self.done(rule, Err(error))
    }
}

/// The failure a node reports, unless it is pulling the digest again (with other
/// credentials, after an auth failure): then the pull is what counts.
fn standing_failure(intent: &PullIntent) -> Option<RecentFailure> {
    intent
        .recently_failed
        .filter(|_| intent.in_flight_since.is_none())
}

/// The best `k` of the members a cascade on `local` chooses among, in HRW order for
/// `digest`: its zone's with zone scope (all members when its zone has none), else all.
pub(crate) fn ranked_candidates(
    zone_scope: bool,
    members: &[Member],
    local: &NodeId,
    digest: &Digest,
    k: usize,
) -> Vec<NodeId> {
    let zone = members
        .iter()
        .find(|m| &m.id == local)
        .and_then(|m| m.zone.as_deref());
    let in_zone: Vec<&Member> = match (zone_scope, zone) {
        (true, Some(zone)) => hrw::in_zone(members, zone).collect(),
        _ => Vec::new(),
    };
    let candidates: Vec<&Member> = if in_zone.is_empty() {
        members.iter().collect()
    } else {
        in_zone
    };
    hrw::top_k(candidates, digest, k)
        .into_iter()
        .map(|m| m.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    //! Each rule and each fault, on simulated time.

    use super::*;
    use crate::RecentFailure;

    fn digest() -> Digest {
        Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap()
    }

    fn members(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member::new(format!("node-{i}"), None))
            .collect()
    }

    /// The same simulated start for every call in a test run.
    fn t0() -> Now {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        Now {
            instant: *START.get_or_init(Instant::now),
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }

    /// The simulated time of a local instant the cascade named.
    fn when(instant: Instant) -> Now {
        t0() + instant.duration_since(t0().instant)
    }

    struct Sim {
        cascade: Cascade,
        action: Action,
    }

    /// A cascade on `local` among `n` members, for a layer of unknown size, by a
    /// requester that delegates credentials.
    fn sim(n: usize, local: &str, config: CascadeConfig) -> Sim {
        sim_with(n, local, config, true)
    }

    fn sim_with(n: usize, local: &str, config: CascadeConfig, credentials: bool) -> Sim {
        let (cascade, action) = Cascade::start(
            Arc::new(config),
            &members(n),
            &NodeId::new(local),
            BlobRef::new(digest(), OriginRefKind::Blob),
            credentials,
        );
        Sim { cascade, action }
    }

    fn idle(rank: usize) -> PullIntent {
        PullIntent {
            hrw_rank: Some(rank as u32),
            ..PullIntent::UNKNOWN
        }
    }

    impl Sim {
        fn rank(&self, i: usize) -> NodeId {
            self.cascade.ranking()[i].clone()
        }

        fn probed(&self) -> Vec<NodeId> {
            match &self.action {
                Action::Probe(nodes) => nodes.clone(),
                other => panic!("expected a probe, got {other:?}"),
            }
        }

        /// Answers the pending probe: `answer(rank)` for each probed node.
        fn answer(&mut self, now: Now, answer: impl Fn(usize) -> Option<PullIntent>) {
            let answers = self
                .probed()
                .into_iter()
                .map(|node| {
                    let rank = self
                        .cascade
                        .ranking()
                        .iter()
                        .position(|n| *n == node)
                        .unwrap();
                    (node, answer(rank).into())
                })
                .collect();
            self.action = self.cascade.on_probe(answers, true, now).expect("in turn");
        }

        /// Answers the pending probe with whatever `answer(rank)` says, refusals included.
        fn reply(&mut self, now: Now, answer: impl Fn(usize) -> ProbeAnswer) {
            let answers = self
                .probed()
                .into_iter()
                .map(|node| {
                    let rank = self.cascade.ranking().iter().position(|n| *n == node);
                    (node, answer(rank.unwrap()))
                })
                .collect();
            self.action = self.cascade.on_probe(answers, true, now).expect("in turn");
        }

        fn asked(&self) -> NodeId {
            match &self.action {
                Action::PleasePull(node) => node.clone(),
                other => panic!("expected a please_pull, got {other:?}"),
            }
        }

        fn pull(&mut self, outcome: Option<Outcome>, now: Now) {
            let node = self.asked();
            self.action = self
                .cascade
                .on_please_pull(&node, outcome, now)
                .expect("in turn");
        }

        /// The provider lookup finds `found`; the watched node still pulls.
        fn providers(&mut self, found: Vec<PeerId>, now: Now) {
            let pulling = PullIntent {
                in_flight_since: Some(now.wall),
                ..PullIntent::UNKNOWN
            };
            self.action = self
                .cascade
                .on_providers(found, Some(pulling), now)
                .expect("in turn");
        }

        fn watched(&self) -> NodeId {
            match &self.action {
                Action::LookupProviders { watch, .. } => watch.clone(),
                other => panic!("expected a wait, got {other:?}"),
            }
        }

        fn resolution(&self) -> &Resolution {
            match &self.action {
                Action::Done(resolution) => resolution,
                other => panic!("expected the end, got {other:?}"),
            }
        }
    }

    #[test]
    fn probes_the_top_k_of_the_requesters_ranking() {
        let s = sim(8, "node-5", CascadeConfig::default());
        let expected: Vec<NodeId> = hrw::top_k(&members(8), &digest(), 3)
            .into_iter()
            .map(|m| m.id.clone())
            .collect();
        assert_eq!(s.probed(), expected);
    }

    #[test]
    fn rule_1_a_trusted_failure_anywhere_ends_it() {
        let mut s = sim(8, "node-5", CascadeConfig::default());
        s.answer(t0(), |rank| {
            Some(PullIntent {
                has_cached: rank == 0,
                recently_failed: (rank == 2).then_some(RecentFailure {
                    cooldown_until: (t0() + Duration::from_secs(10)).wall,
                    class: FailureClass::NotFound,
                }),
                ..idle(rank)
            })
        });
        let r = s.resolution();
        assert_eq!(r.rule, Rule::TrustedFailure, "before the cached copy");
        assert_eq!(
            r.result,
            Err(ColdStartError::Failed(FailureClass::NotFound))
        );
    }

    #[test]
    fn rule_2_a_cached_copy_names_its_holder() {
        let mut s = sim(8, "node-5", CascadeConfig::default());
        s.answer(t0(), |rank| {
            Some(PullIntent {
                has_cached: rank == 1,
                ..idle(rank)
            })
        });
        let holder = s.rank(1);
        assert_eq!(s.resolution().rule, Rule::CachedCopy);
        assert_eq!(s.resolution().result, Ok(Source::Holder(holder)));
    }

    #[test]
    fn rule_3_a_fresh_pull_is_waited_on_until_a_provider_appears() {
        let mut s = sim(8, "node-5", CascadeConfig::default());
        s.answer(t0(), |rank| {
            Some(PullIntent {
                in_flight_since: (rank == 0).then_some(t0().wall - Duration::from_secs(5)),
                ..idle(rank)
            })
        });
        assert_eq!(
            s.action,
            Action::LookupProviders {
                at: t0().instant,
                watch: s.rank(0),
                probe_watched: false,
            }
        );
        s.providers(vec![], t0());
        // Layers are polled every second.
        assert_eq!(
            s.action,
            Action::LookupProviders {
                at: (t0() + Duration::from_secs(1)).instant,
                watch: s.rank(0),
                probe_watched: false,
            }
        );
        let provider = PeerId::random();
        s.providers(vec![provider], t0() + Duration::from_secs(1));
        assert_eq!(s.resolution().rule, Rule::InFlight);
        assert_eq!(s.resolution().result, Ok(Source::Providers(vec![provider])));
        assert_eq!(s.resolution().please_pulls_sent, 0);
    }

    #[test]
    fn a_waiter_probes_the_pull_it_waits_on_rarely_and_the_lookup_at_every_poll() {
        let mut s = sim(8, "outsider", CascadeConfig::default());
        s.answer(t0(), |rank| Some(idle(rank)));
        s.pull(
            Some(Outcome::Started {
                started_at: t0().wall,
            }),
            t0(),
        );
        let (mut looks, mut probes) = (0, Vec::new());
        while let Action::LookupProviders {
            at, probe_watched, ..
        } = s.action
        {
            if probe_watched {
                probes.push(looks);
            }
            looks += 1;
            s.providers(vec![], when(at));
        }
        // A layer of unknown size: 30 s of looks, one a second.
        assert_eq!(looks, 31);
        assert_eq!(probes, vec![2, 4, 8, 16, 24]);
        // The first probe of the top 3, the watches, and the new pass after the stall.
        assert_eq!(s.cascade.probes_sent, 3 + 5 + 3);
        assert!(matches!(s.action, Action::Probe(_)));
    }

    #[test]
    fn with_cut_through_a_pull_under_way_is_the_source_not_a_wait() {
        let config = CascadeConfig::default().with_cut_through(true);
        // Found pulling (rule 3).
        let mut s = sim(8, "node-5", config.clone());
        s.answer(t0(), |rank| {
            Some(PullIntent {
                in_flight_since: (rank == 1).then_some(t0().wall - Duration::from_secs(1)),
                ..idle(rank)
            })
        });
        assert_eq!(s.resolution().rule, Rule::InFlight);
        assert_eq!(s.resolution().result, Ok(Source::Pulling(s.rank(1))));
        // Asked to pull (rule 7): its pull is the source as soon as it started.
        let mut s = sim(8, "node-5", config);
        s.answer(t0(), |rank| Some(idle(rank)));
        let asked = s.asked();
        s.pull(
            Some(Outcome::Started {
                started_at: t0().wall,
            }),
            t0(),
        );
        assert_eq!(s.resolution().rule, Rule::ColdStart);
        assert_eq!(s.resolution().result, Ok(Source::Pulling(asked)));
    }

    #[test]
    fn rule_4_a_transient_failure_is_honoured_for_at_most_the_cap() {
        let mut s = sim(8, "node-5", CascadeConfig::default());
        s.answer(t0(), |rank| {
            Some(PullIntent {
                recently_failed: (rank == 0).then_some(RecentFailure {
                    cooldown_until: (t0() + Duration::from_secs(90)).wall,
                    class: FailureClass::Transient,
                }),
                ..idle(rank)
            })
        });
        assert_eq!(s.resolution().rule, Rule::TransientCooldown);
        assert_eq!(
            s.resolution().result,
            Err(ColdStartError::CoolingDown {
                until: (t0() + Duration::from_secs(30)).instant
            })
        );
    }

    #[test]
    fn rule_5_nobody_reachable_widens_to_2k_once() {
        let mut s = sim(8, "node-7", CascadeConfig::default());
        let top: Vec<NodeId> = (0..6).map(|i| s.rank(i)).collect();
        s.answer(t0(), |_| None);
        assert_eq!(s.probed(), top[3..6].to_vec(), "only the new ranks");
        assert_eq!(s.cascade.expansion, Some(Expansion::AllUnreachable));
        s.answer(t0(), |_| None);
        assert_eq!(s.resolution().result, Err(ColdStartError::NoneReachable));
        assert_eq!(s.resolution().rule, Rule::Unreachable);
        assert_eq!(s.resolution().expansion, Some(Expansion::AllUnreachable));
    }

    #[test]
    fn an_input_out_of_turn_is_a_typed_error_that_changes_nothing() {
        let mut s = sim(8, "node-5", CascadeConfig::default());
        let probe = s.action.clone();
        let early = s.cascade.on_retry(t0());
        assert_eq!(
            early,
            Err(OutOfTurn {
                called: "on_retry",
                awaits: "on_probe"
            })
        );
        let unasked = s.cascade.on_please_pull(&s.rank(0), None, t0());
        assert_eq!(unasked.map(|_| ()).unwrap_err().awaits, "on_probe");
        assert_eq!(s.action, probe);
        s.answer(t0(), |rank| Some(idle(rank)));
        assert_eq!(s.asked(), s.rank(0), "the probe still counts");
        s.pull(
            Some(Outcome::RecentlyFailed(RecentFailure {
                cooldown_until: t0().wall,
                class: FailureClass::NotFound,
            })),
            t0(),
        );
        let _ = s.resolution();
        let late = s.cascade.on_providers(vec![], None, t0());
        assert_eq!(late.unwrap_err().called, "on_providers");
    }

    #[test]
    fn rule_6_an_unhealthy_lookup_widens_before_anyone_pulls() {
        let mut s = sim(8, "node-5", CascadeConfig::default());
        let answers = s.probed().into_iter().map(|n| {
            let rank = s.cascade.ranking().iter().position(|m| *m == n).unwrap();
            (n, ProbeAnswer::Intent(idle(rank)))
        });
        s.action = s
            .cascade
            .on_probe(answers.collect(), false, t0())
            .expect("in turn");
        assert_eq!(s.cascade.expansion, Some(Expansion::LookupUnhealthy));
        assert_eq!(s.probed(), vec![s.rank(3), s.rank(4), s.rank(5)]);
        s.answer(t0(), |rank| Some(idle(rank)));
        assert_eq!(s.asked(), s.rank(0));
    }

    #[test]
    fn rule_7_the_best_ranked_reachable_node_pulls_and_is_waited_on() {
        let mut s = sim(8, "node-5", CascadeConfig::default());
        s.answer(t0(), |rank| Some(idle(rank)));
        assert_eq!(s.asked(), s.rank(0));
        s.pull(
            Some(Outcome::Started {
                started_at: t0().wall,
            }),
            t0(),
        );
        assert_eq!(s.watched(), s.rank(0));
        let provider = PeerId::random();
        s.providers(vec![provider], t0() + Duration::from_secs(3));
        assert_eq!(s.resolution().rule, Rule::ColdStart);
        assert_eq!(s.resolution().result, Ok(Source::Providers(vec![provider])));
    }

    #[test]
    fn an_unreachable_designated_puller_is_skipped_and_never_asked() {
        let mut s = sim(8, "node-5", CascadeConfig::default());
        s.answer(t0(), |rank| (rank != 0).then(|| idle(rank)));
        // One of the top K down: the next K are looked at before anyone pulls.
        assert_eq!(s.probed(), vec![s.rank(3), s.rank(4), s.rank(5)]);
        assert_eq!(s.cascade.expansion, Some(Expansion::SomeUnreachable));
        s.answer(t0(), |rank| Some(idle(rank)));
        assert_eq!(s.asked(), s.rank(1), "the next reachable rank");
    }

    #[test]
    fn a_pull_asked_of_a_lower_rank_while_the_designated_was_down_is_waited_on() {
        let mut s = sim(8, "outsider", CascadeConfig::default());
        // Ranks 0 and 2 came up after rank 4 was asked to pull; rank 1 is still down.
        s.answer(t0(), |rank| (rank != 1).then(|| idle(rank)));
        s.answer(t0(), |rank| {
            Some(PullIntent {
                in_flight_since: (rank == 4).then(|| t0().wall),
                ..idle(rank)
            })
        });
        assert_eq!(s.watched(), s.rank(4), "its pull is waited on");
        assert_eq!(s.cascade.please_pulls_sent, 0, "no second pull");
    }

    #[test]
    fn a_puller_that_dies_before_the_please_pull_is_not_asked_again() {
        // A requester outside the top 3, so every please_pull goes over the wire.
        let mut s = sim(8, "outsider", CascadeConfig::default());
        s.answer(t0(), |rank| Some(idle(rank)));
        assert_eq!(s.asked(), s.rank(0));
        // No response: look again first, since a slow response is not a refusal.
        s.pull(None, t0());
        assert_eq!(s.probed(), vec![s.rank(0), s.rank(1), s.rank(2)]);
        // It is gone now; the next rank is asked, and the dead node never again.
        s.answer(t0(), |rank| (rank != 0).then(|| idle(rank)));
        s.answer(t0(), |_| None);
        assert_eq!(s.asked(), s.rank(1));
        s.pull(Some(Outcome::Unspecified), t0());
        assert_eq!(
            s.asked(),
            s.rank(2),
            "a declining node passes to the next at once"
        );
        s.pull(None, t0());
        s.answer(t0(), |rank| (rank < 3).then(|| idle(rank)));
        assert_eq!(
            s.resolution().result,
            Err(ColdStartError::NoPuller),
            "each node asked once, then the end: no loop on a dead node"
        );
        assert_eq!(s.resolution().please_pulls_sent, 3);
    }

    #[test]
    fn a_slow_please_pull_response_does_not_start_a_second_pull() {
        let mut s = sim(8, "outsider", CascadeConfig::default());
        s.answer(t0(), |rank| Some(idle(rank)));
        s.pull(None, t0());
        // The designated puller did start: the next pass waits on it.
        s.answer(t0() + Duration::from_secs(2), |rank| {
            Some(PullIntent {
                in_flight_since: (rank == 0).then_some(t0().wall),
                ..idle(rank)
            })
        });
        assert_eq!(s.watched(), s.rank(0));
        assert_eq!(s.cascade.please_pulls_sent, 1);
    }

    #[test]
    fn a_stalled_puller_is_taken_over_after_the_stall_threshold() {
        let stalls = Stalls {
            floor: Duration::from_secs(2),
            multiplier: 1,
            ..Stalls::default()
        };
        let mut s = sim(8, "node-5", CascadeConfig::default().with_stalls(stalls));
        s.answer(t0(), |rank| Some(idle(rank)));
        let stalled = s.asked();
        assert_eq!(stalled, s.rank(0));
        s.pull(
            Some(Outcome::Started {
                started_at: t0().wall,
            }),
            t0(),
        );
        // Nothing appears until the threshold passes...
        let mut now = t0();
        while let Action::LookupProviders { at, .. } = s.action {
            now = when(at);
            s.providers(vec![], now);
        }
        assert_eq!(now, t0() + Duration::from_secs(2));
        // ...then a new pass: the stalled node still says it is pulling, since t0.
        let later = now + Duration::from_secs(1);
        s.answer(later, |rank| {
            Some(PullIntent {
                in_flight_since: (rank == 0).then_some(t0().wall),
                ..idle(rank)
            })
        });
        assert_eq!(s.asked(), s.rank(1), "the next rank takes over");
        assert_eq!(s.cascade.takeovers, 1);
    }

    #[test]
    fn a_pull_that_fails_while_waited_on_is_seen_at_the_next_poll() {
        let mut s = sim(8, "outsider", CascadeConfig::default());
        s.answer(t0(), |rank| Some(idle(rank)));
        s.pull(
            Some(Outcome::Started {
                started_at: t0().wall,
            }),
            t0(),
        );
        let watched = s.watched();
        let failed = PullIntent {
            recently_failed: Some(RecentFailure {
                cooldown_until: (t0() + Duration::from_secs(10)).wall,
                class: FailureClass::NotFound,
            }),
            ..PullIntent::UNKNOWN
        };
        s.action = s
            .cascade
            .on_providers(vec![], Some(failed), t0() + Duration::from_secs(1))
            .expect("in turn");
        assert_eq!(s.resolution().rule, Rule::TrustedFailure);
        assert_eq!(
            s.resolution().result,
            Err(ColdStartError::Failed(FailureClass::NotFound))
        );
        assert_eq!(watched, s.rank(0));
    }

    #[test]
    fn a_pull_that_landed_is_fetched_from_its_puller_even_before_the_lookup_knows() {
        let mut s = sim(8, "outsider", CascadeConfig::default());
        s.answer(t0(), |rank| Some(idle(rank)));
        s.pull(
            Some(Outcome::Started {
                started_at: t0().wall,
            }),
            t0(),
        );
        let landed = PullIntent {
            has_cached: true,
            ..PullIntent::UNKNOWN
        };
        s.action = s
            .cascade
            .on_providers(vec![], Some(landed), t0() + Duration::from_secs(1))
            .expect("in turn");
        assert_eq!(s.resolution().result, Ok(Source::Holder(s.rank(0))));
    }

    #[test]
    fn a_transient_failure_is_not_probed_again_within_its_window() {
        // The window is the driver's to keep; the cascade says until when.
        let mut s = sim(8, "node-5", CascadeConfig::default());
        s.answer(t0(), |rank| Some(idle(rank)));
        s.pull(
            Some(Outcome::RecentlyFailed(RecentFailure {
                cooldown_until: (t0() + Duration::from_secs(10)).wall,
                class: FailureClass::Transient,
            })),
            t0(),
        );
        assert_eq!(
            s.resolution().result,
            Err(ColdStartError::CoolingDown {
                until: (t0() + Duration::from_secs(10)).instant
            })
        );
    }

    #[test]
    fn a_requester_ranked_first_pulls_itself() {
        // Find a member set where node-0 ranks first, then resolve from node-0 and from
        // the second-ranked node: both pick node-0, so no two nodes delegate to each other.
        let ranking: Vec<NodeId> = hrw::top_k(&members(8), &digest(), 8)
            .into_iter()
            .map(|m| m.id.clone())
            .collect();
        let first = ranking[0].clone();
        let second = ranking[1].clone();
        for local in [&first, &second] {
            let mut s = sim(8, local.as_str(), CascadeConfig::default());
            s.answer(t0(), |rank| Some(idle(rank)));
            assert_eq!(s.asked(), first, "asked by {local}");
        }
        let mut s = sim(8, first.as_str(), CascadeConfig::default());
        s.answer(t0(), |rank| Some(idle(rank)));
        assert_eq!(s.asked(), first);
        assert_eq!(
            s.cascade.please_pulls_sent, 0,
            "self starts locally, not over the wire"
        );
    }

    #[test]
    fn a_rank_disagreement_is_counted() {
        let mut s = sim(8, "node-5", CascadeConfig::default());
        s.answer(t0(), |rank| {
            Some(PullIntent {
                has_cached: rank == 2,
                hrw_rank: Some(if rank == 1 { 4 } else { rank as u32 }),
                ..PullIntent::UNKNOWN
            })
        });
        assert_eq!(s.resolution().rank_mismatches, 1);
    }

    #[test]
    fn zone_scope_keeps_to_the_zone_and_falls_back_when_empty() {
        let mut members = members(6);
        for (i, m) in members.iter_mut().enumerate() {
            m.zone = Some(if i % 2 == 0 { "a" } else { "b" }.into());
        }
        let config = Arc::new(CascadeConfig::default().with_zone_scope(true));
        let (cascade, _) = Cascade::start(
            config.clone(),
            &members,
            &NodeId::new("node-1"),
            BlobRef::new(digest(), OriginRefKind::Blob),
            true,
        );
        assert_eq!(cascade.ranking().len(), 3);
        assert!(cascade
            .ranking()
            .iter()
            .all(|n| ["node-1", "node-3", "node-5"].contains(&n.as_str())));
        let (cascade, _) = Cascade::start(
            config,
            &members,
            &NodeId::new("outsider"),
            BlobRef::new(digest(), OriginRefKind::Blob),
            true,
        );
        assert_eq!(cascade.ranking().len(), 6, "no zone: the whole membership");
    }

    fn auth_failure() -> RecentFailure {
        RecentFailure {
            cooldown_until: (t0() + Duration::from_secs(10)).wall,
            class: FailureClass::Auth,
        }
    }

    #[test]
    fn a_refusing_designated_puller_is_asked_again_not_passed_over() {
        let mut s = sim(8, "outsider", CascadeConfig::default());
        // Rank 0's membership does not list us yet; ranks 1 and 2 answer.
        let refuse_first = |rank: usize| match rank {
            0 => ProbeAnswer::Refused,
            _ => ProbeAnswer::Intent(idle(rank)),
        };
        s.reply(t0(), refuse_first);
        let Action::Retry { at } = s.action else {
            panic!("expected a retry, got {:?}", s.action);
        };
        assert_eq!(at, (t0() + Duration::from_millis(250)).instant);
        s.action = s.cascade.on_retry(when(at)).expect("in turn");
        assert_eq!(s.probed().len(), 3, "the same members, probed again");
        // Its view caught up: it is the one asked, and nobody else was.
        s.answer(when(at), |rank| Some(idle(rank)));
        assert_eq!(s.asked(), s.rank(0));
        assert_eq!(s.cascade.please_pulls_sent, 1);
    }

    #[test]
    fn members_that_refuse_past_the_convergence_window_count_as_unreachable() {
        let config = CascadeConfig::default()
            .with_convergence(Duration::from_secs(2), Duration::from_millis(500));
        let mut s = sim(8, "outsider", config);
        let mut now = t0();
        let mut retries = 0;
        loop {
            s.reply(now, |_| ProbeAnswer::Refused);
            match s.action {
                Action::Retry { at } => {
                    retries += 1;
                    now = when(at);
                    s.action = s.cascade.on_retry(now).expect("in turn");
                }
                _ => break,
            }
        }
        assert_eq!(retries, 4, "every 500 ms for 2 s");
        // Then as if nobody answered: the probe widens, and ends with nobody reachable.
        assert_eq!(s.probed().len(), 3, "ranks 3 to 5");
        s.reply(now, |_| ProbeAnswer::Refused);
        assert_eq!(s.resolution().result, Err(ColdStartError::NoneReachable));
    }

    #[test]
    fn a_refusal_ranked_after_the_one_asked_changes_nothing() {
        let mut s = sim(8, "outsider", CascadeConfig::default());
        s.reply(t0(), |rank| match rank {
            2 => ProbeAnswer::Refused,
            _ => ProbeAnswer::Intent(idle(rank)),
        });
        assert_eq!(s.asked(), s.rank(0));
    }

    #[test]
    fn an_auth_failure_is_asked_once_more_with_the_requesters_credentials() {
        let mut s = sim(8, "outsider", CascadeConfig::default());
        s.answer(t0(), |rank| {
            Some(PullIntent {
                recently_failed: (rank == 0).then(auth_failure),
                ..idle(rank)
            })
        });
        // Rank 0 failed with its own credentials (or none): ours may do.
        assert_eq!(s.asked(), s.rank(0));
        s.pull(
            Some(Outcome::Started {
                started_at: t0().wall,
            }),
            t0(),
        );
        assert_eq!(s.watched(), s.rank(0));
        // If ours fail too, the watch sees it and the resolution ends: no second ask.
        let failed = PullIntent {
            recently_failed: Some(auth_failure()),
            ..PullIntent::UNKNOWN
        };
        s.action = s
            .cascade
            .on_providers(vec![], Some(failed), t0() + Duration::from_secs(1))
            .expect("in turn");
        assert_eq!(
            s.resolution().result,
            Err(ColdStartError::Failed(FailureClass::Auth))
        );
        assert_eq!(s.cascade.please_pulls_sent, 1);
    }

    #[test]
    fn a_pull_started_again_after_an_auth_failure_is_waited_on() {
        let mut s = sim(8, "outsider", CascadeConfig::default());
        // Another requester's credentials started it again; the failure is still cached.
        let retrying = |rank: usize| PullIntent {
            recently_failed: (rank == 0).then(auth_failure),
            in_flight_since: (rank == 0).then(|| t0().wall),
            ..idle(rank)
        };
        s.answer(t0(), |rank| Some(retrying(rank)));
        assert_eq!(s.watched(), s.rank(0));
        let later = t0() + Duration::from_secs(1);
        s.action = s
            .cascade
            .on_providers(vec![], Some(retrying(0)), later)
            .expect("in turn");
        assert_eq!(s.watched(), s.rank(0), "still waited on");
        assert_eq!(s.cascade.please_pulls_sent, 0);
    }

    #[test]
    fn the_same_credentials_failing_again_end_it() {
        let mut s = sim(8, "outsider", CascadeConfig::default());
        s.answer(t0(), |rank| {
            Some(PullIntent {
                recently_failed: (rank == 1).then(auth_failure),
                ..idle(rank)
            })
        });
        assert_eq!(s.asked(), s.rank(1), "the node that failed");
        s.pull(Some(Outcome::RecentlyFailed(auth_failure())), t0());
        assert_eq!(s.resolution().rule, Rule::TrustedFailure);
        assert_eq!(
            s.resolution().result,
            Err(ColdStartError::Failed(FailureClass::Auth))
        );
    }

    #[test]
    fn without_credentials_an_auth_failure_is_honoured_like_a_transient_one() {
        let mut s = sim_with(8, "outsider", CascadeConfig::default(), false);
        s.answer(t0(), |rank| {
            Some(PullIntent {
                recently_failed: (rank == 0).then(auth_failure),
                ..idle(rank)
            })
        });
        assert_eq!(s.resolution().rule, Rule::TransientCooldown);
        assert_eq!(
            s.resolution().result,
            Err(ColdStartError::CoolingDown {
                until: (t0() + Duration::from_secs(10)).instant
            })
        );
        assert_eq!(s.cascade.please_pulls_sent, 0);
    }
}

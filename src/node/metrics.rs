//! The node state's signals as Prometheus counters. Every name starts with `gantry_coord_`.

use std::time::Duration;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use super::{NodeState, Resolution, Rule};
use crate::OriginRefKind;

type Labels = Vec<(&'static str, &'static str)>;

/// The cold-start resolver's instruments.
#[derive(Debug)]
pub(crate) struct ColdStartMetrics {
    duration: Family<Labels, Histogram>,
    expansions: Family<Labels, Counter>,
    takeovers: Counter,
    rank_mismatches: Family<Labels, Counter>,
    probe_hits: Counter,
    fallbacks: Family<Labels, Counter>,
}

impl ColdStartMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let registry = registry.sub_registry_with_prefix("gantry_coord_coldstart");
        let metrics = ColdStartMetrics {
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 18))
            }),
            expansions: Family::default(),
            takeovers: Counter::default(),
            rank_mismatches: Family::default(),
            probe_hits: Counter::default(),
            fallbacks: Family::default(),
        };
        registry.register(
            "duration_seconds",
            "Time to resolve a digest, by kind and the rule that decided it",
            metrics.duration.clone(),
        );
        registry.register(
            "expansions",
            "Probes widened to the top 2K, by reason",
            metrics.expansions.clone(),
        );
        registry.register(
            "takeovers",
            "Stale in-flight pulls taken over",
            metrics.takeovers.clone(),
        );
        registry.register(
            "rank_mismatches",
            "Responders whose HRW rank disagreed with ours (membership divergence), by kind",
            metrics.rank_mismatches.clone(),
        );
        registry.register(
            "probe_hits",
            "Resolutions a probe answered: a cached copy or a fresh in-flight pull",
            metrics.probe_hits.clone(),
        );
        registry.register(
            "fallbacks",
            "Direct origin pulls, the last resort: started, or declined by reason",
            metrics.fallbacks.clone(),
        );
        metrics
    }

    pub(crate) fn record_fallback(&self, declined: Option<super::FallbackDeclined>) {
        let result = declined.map_or("pulled", super::FallbackDeclined::as_str);
        self.fallbacks
            .get_or_create(&vec![("result", result)])
            .inc();
    }

    pub(crate) fn record(&self, kind: OriginRefKind, resolution: &Resolution, took: Duration) {
        let kind = match kind {
            OriginRefKind::Manifest => "manifest",
            OriginRefKind::Config => "config",
            OriginRefKind::Blob => "layer",
        };
        let outcome = if resolution.result.is_ok() {
            "ok"
        } else {
            "failed"
        };
        self.duration
            .get_or_create(&vec![
                ("kind", kind),
                ("rule", resolution.rule.as_str()),
                ("outcome", outcome),
            ])
            .observe(took.as_secs_f64());
        if let Some(expansion) = resolution.expansion {
            self.expansions
                .get_or_create(&vec![("reason", expansion.as_str())])
                .inc();
        }
        self.takeovers.inc_by(resolution.takeovers.into());
        if resolution.rank_mismatches > 0 {
            self.rank_mismatches
                .get_or_create(&vec![("kind", kind)])
                .inc_by(resolution.rank_mismatches.into());
        }
        if matches!(resolution.rule, Rule::CachedCopy | Rule::InFlight) {
            self.probe_hits.inc();
        }
    }
}

/// Reads a node state's signal counts at scrape time.
#[derive(Debug)]
struct NodeSignals(NodeState);

impl Collector for NodeSignals {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let signals = self.0.signals();
        let counters = [
            (
                "pull_intent_served",
                "pull_intent queries from peers answered by the node state",
                signals.pull_intent_served,
            ),
            (
                "storage_unavailable",
                "pull_intent answered not cached because the content store was unavailable",
                signals.storage_unavailable,
            ),
            (
                "please_pull_served",
                "please_pull requests from peers answered by the node state",
                signals.please_pull_served,
            ),
            (
                "moved_in_flight",
                "Digests moved into the in-flight map",
                signals.moved_in_flight,
            ),
            (
                "declined_pulls",
                "Pulls declined for load: in-flight map full or pump refused",
                signals.declined_pulls,
            ),
            (
                "skipped_digests",
                "Invalid digests dropped from inbound please_pull requests",
                signals.skipped_digests,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

impl NodeState {
    /// Exposes the node's signal counts in `registry` (names start with `gantry_coord_`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry
            .sub_registry_with_prefix("gantry_coord")
            .register_collector(Box::new(NodeSignals(self.clone())));
    }
}

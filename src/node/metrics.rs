//! The node state's signals as Prometheus counters. Every name starts with `gantry_coord_`.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::counter::ConstCounter,
    registry::Registry,
};

use super::NodeState;

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

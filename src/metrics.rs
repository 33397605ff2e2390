//! The protocol layer's Prometheus metrics through a `prometheus-client` registry, as
//! `libp2p-metrics` does. Every name starts with `gantry_coord_`.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::ConstGauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::{Event, InboundFailure, OutboundFailure, Rpc, StreamCap, UnauthorizedReason};

type Label = [(&'static str, &'static str); 1];

/// The behaviour's instruments.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    stream_errors: Family<Label, Counter>,
    rejected_streams: Family<Label, Counter>,
    unauthorized: Family<Label, Counter>,
    served: Family<Label, Counter>,
    request_failures: Family<Label, Counter>,
    request_duration: Family<Label, Histogram>,
    skipped_results: Counter,
}

impl Metrics {
    pub(crate) fn register(registry: &mut Registry, open_inbound: Arc<AtomicUsize>) -> Self {
        let registry = registry.sub_registry_with_prefix("gantry_coord");
        let metrics = Metrics {
            stream_errors: Family::default(),
            rejected_streams: Family::default(),
            unauthorized: Family::default(),
            served: Family::default(),
            request_failures: Family::default(),
            request_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
            }),
            skipped_results: Counter::default(),
        };
        registry.register(
            "stream_errors",
            "Inbound streams dropped without a response, by reason",
            metrics.stream_errors.clone(),
        );
        registry.register(
            "rejected_streams",
            "Inbound streams reset over the node-wide cap or a peer's share",
            metrics.rejected_streams.clone(),
        );
        registry.register(
            "unauthorized_peers",
            "Requests from peers the membership does not vouch for, by reason",
            metrics.unauthorized.clone(),
        );
        registry.register(
            "requests_served",
            "Inbound requests responded to, by RPC family",
            metrics.served.clone(),
        );
        registry.register(
            "request_failures",
            "Outbound requests that ended without a response, by reason",
            metrics.request_failures.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Outbound request latency from send to response, by RPC family",
            metrics.request_duration.clone(),
        );
        registry.register(
            "response_results_skipped",
            "please_pull response results skipped for an invalid digest",
            metrics.skipped_results.clone(),
        );
        registry.register_collector(Box::new(OpenStreams(open_inbound)));
        // Series a dashboard rates from the start exist at zero before the first event.
        for rpc in [Rpc::PullIntent, Rpc::PleasePull] {
            let _ = metrics.served.get_or_create(&[("rpc", rpc_name(rpc))]);
        }
        for reason in [
            UnauthorizedReason::Unrecognized,
            UnauthorizedReason::Unevaluable,
        ] {
            let _ = metrics
                .unauthorized
                .get_or_create(&[("reason", unauthorized_reason(reason))]);
        }
        metrics
    }

    pub(crate) fn on_event(&self, event: &Event) {
        match event {
            // Counted once, as an unauthorized peer, and not as a stream error.
            Event::InboundFailure {
                error: InboundFailure::Unauthorized(_),
                ..
            } => {}
            Event::InboundFailure { error, .. } => {
                let reason = inbound_reason(error);
                self.stream_errors
                    .get_or_create(&[("reason", reason)])
                    .inc();
                if let InboundFailure::StreamCap(_) = error {
                    self.rejected_streams
                        .get_or_create(&[("reason", reason)])
                        .inc();
                }
            }
            Event::UnauthorizedPeer { reason, .. } => {
                self.unauthorized
                    .get_or_create(&[("reason", unauthorized_reason(*reason))])
                    .inc();
            }
            Event::ResponseSent { rpc, .. } => {
                self.served.get_or_create(&[("rpc", rpc_name(*rpc))]).inc();
            }
            _ => {}
        }
    }

    pub(crate) fn on_skipped_results(&self, skipped: usize) {
        self.skipped_results.inc_by(skipped as u64);
    }

    pub(crate) fn on_outbound(
        &self,
        rpc: Rpc,
        elapsed: Duration,
        failure: Option<&OutboundFailure>,
    ) {
        match failure {
            None => {
                self.request_duration
                    .get_or_create(&[("rpc", rpc_name(rpc))])
                    .observe(elapsed.as_secs_f64());
            }
            Some(error) => {
                self.request_failures
                    .get_or_create(&[("reason", outbound_reason(error))])
                    .inc();
            }
        }
    }
}

fn rpc_name(rpc: Rpc) -> &'static str {
    match rpc {
        Rpc::PullIntent => "pull_intent",
        Rpc::PleasePull => "please_pull",
    }
}

fn unauthorized_reason(reason: UnauthorizedReason) -> &'static str {
    match reason {
        UnauthorizedReason::Unrecognized => "unrecognized",
        UnauthorizedReason::Unevaluable => "unevaluable",
    }
}

fn inbound_reason(error: &InboundFailure) -> &'static str {
    match error {
        InboundFailure::StreamCap(StreamCap::Node) => "node_cap",
        InboundFailure::StreamCap(StreamCap::Peer) => "peer_cap",
        InboundFailure::Timeout => "deadline",
        InboundFailure::AnswerTimeout => "answer_timeout",
        InboundFailure::ResponseOmission => "response_omission",
        InboundFailure::Oversized { .. } => "oversize",
        InboundFailure::Malformed(_) => "malformed",
        InboundFailure::EmptyEnvelope => "empty",
        InboundFailure::UnexpectedBody => "wrong_body",
        InboundFailure::InvalidDigest(_) | InboundFailure::MissingOrigin => "invalid_input",
        InboundFailure::ResponseTooLarge { .. } => "response_too_large",
        InboundFailure::Unauthorized(_) => "unauthorized",
        InboundFailure::ConnectionClosed => "connection_closed",
        InboundFailure::Io(_) => "io",
    }
}

fn outbound_reason(error: &OutboundFailure) -> &'static str {
    match error {
        OutboundFailure::DialFailure(_) => "dial_failure",
        OutboundFailure::DialTimeout => "dial_timeout",
        OutboundFailure::Timeout => "timeout",
        OutboundFailure::ConnectionClosed => "connection_closed",
        OutboundFailure::UnsupportedProtocols => "unsupported",
        OutboundFailure::NoResponse => "no_response",
        OutboundFailure::MalformedResponse(_) => "malformed",
        OutboundFailure::UnexpectedResponse => "unexpected_response",
        OutboundFailure::RequestTooLarge { .. } => "too_large",
        OutboundFailure::TooManyDigests { .. } => "too_many_digests",
        OutboundFailure::Io(_) => "io",
    }
}

/// Reads the node-wide open stream count at scrape time.
#[derive(Debug)]
struct OpenStreams(Arc<AtomicUsize>);

impl Collector for OpenStreams {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let open = ConstGauge::new(self.0.load(Ordering::Acquire) as i64);
        let metric = encoder.encode_descriptor(
            "open_inbound_streams",
            "Inbound coord streams open across the node",
            None,
            open.metric_type(),
        )?;
        open.encode(metric)
    }
}

//! Limits and deadlines of the protocol, with the Go nodes' defaults.

use std::time::Duration;

/// Whether a peer absent from the membership's published peer ids is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthorizationMode {
    /// Serve everyone; report unrecognized peers.
    #[default]
    Observe,
    /// Close the stream of an unrecognized or unevaluable peer without a response.
    Enforce,
}

/// Configuration of a [`Behaviour`](crate::Behaviour).
///
/// Every default is the Go original's (docs/protocol.md §8).
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) max_inbound_streams: usize,
    pub(crate) max_inbound_streams_per_peer: usize,
    pub(crate) max_outbound_streams_per_connection: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) answer_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) dial_timeout: Duration,
    pub(crate) max_message_bytes: usize,
    pub(crate) max_cooldown: Duration,
    pub(crate) authorization_mode: AuthorizationMode,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_inbound_streams: 512,
            max_inbound_streams_per_peer: 128,
            max_outbound_streams_per_connection: 128,
            handshake_timeout: Duration::from_secs(5),
            answer_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            dial_timeout: Duration::from_secs(2),
            max_message_bytes: 1 << 20,
            max_cooldown: Duration::from_secs(600),
            authorization_mode: AuthorizationMode::Observe,
        }
    }
}

impl Config {
    /// Concurrent inbound streams for the whole node, across all connections (default 512).
    /// A stream over the cap is reset before anything is read.
    pub fn with_max_inbound_streams(mut self, max: usize) -> Self {
        self.max_inbound_streams = max;
        self
    }

    /// The share of the node-wide cap one peer may hold, across all its connections
    /// (default 128), so a single peer cannot starve the rest.
    pub fn with_max_inbound_streams_per_peer(mut self, max: usize) -> Self {
        self.max_inbound_streams_per_peer = max;
        self
    }

    /// Outbound streams one connection runs at once (default 128); further requests wait
    /// their turn within their own budget.
    pub fn with_max_outbound_streams_per_connection(mut self, max: usize) -> Self {
        self.max_outbound_streams_per_connection = max.max(1);
        self
    }

    /// Deadline for a whole inbound exchange, reading the request and writing the response,
    /// counted from the stream's opening (default 5 s).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How long the swarm loop has to respond to a request once it is read (default 2 s).
    pub fn with_answer_timeout(mut self, timeout: Duration) -> Self {
        self.answer_timeout = timeout;
        self
    }

    /// Deadline for an outbound request once its connection is up: opening the stream,
    /// writing the request and reading the response (default 2 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long a request for an unconnected peer waits for its connection (default 2 s).
    pub fn with_dial_timeout(mut self, timeout: Duration) -> Self {
        self.dial_timeout = timeout;
        self
    }

    /// Largest protobuf body read or written (default 1 MiB).
    pub fn with_max_message_bytes(mut self, max: usize) -> Self {
        self.max_message_bytes = max;
        self
    }

    /// Longest cooldown believed from a peer; a received `cooldown_until` further ahead
    /// is cut to now plus this (default 10 min, the negative cache's ceiling).
    pub fn with_max_cooldown(mut self, max: Duration) -> Self {
        self.max_cooldown = max;
        self
    }

    /// Observe (default) or enforce peer authorization.
    pub fn with_authorization_mode(mut self, mode: AuthorizationMode) -> Self {
        self.authorization_mode = mode;
        self
    }

    /// The handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// The outbound request deadline.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The message size cap.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }
}

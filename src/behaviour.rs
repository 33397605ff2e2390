//! The `NetworkBehaviour`: request ids, dialing, the stream budget, authorization, and
//! the events the swarm loop sees.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt,
    marker::PhantomData,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Instant,
};

use futures::{
    channel::{mpsc, oneshot},
    StreamExt,
};
use libp2p_core::{transport::PortUse, Endpoint, Multiaddr};
use libp2p_identity::PeerId;
use libp2p_swarm::{
    behaviour::{ConnectionClosed, ConnectionEstablished, DialFailure, PeerAddresses},
    dial_opts::DialOpts,
    ConnectionDenied, ConnectionId, DialError, FromSwarm, NetworkBehaviour, NotifyHandler,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};

use crate::{
    authorize::{PeerAuthorizer, WarningLimiter},
    budget::StreamBudget,
    client::{Command, Coordinator, Request as ClientRequest, ResponseSender},
    codec::encode_frame,
    deadlines::DeadlineQueue,
    handler::{Handler, HandlerEvent, HandlerEvents, HandlerIn, InboundResponse, OutboundRequest},
    protocol::{self, InboundRequest, Response, Rpc},
    time, wire, AuthorizationMode, Config, Digest, InboundFailure, OutboundFailure, PleasePull,
    PleasePullOutcome, PullIntent, ResponseError, UnauthorizedReason,
};

/// Identifies an outbound request; its response or failure event carries the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutboundRequestId(pub(crate) u64);

/// Identifies an inbound request (one inbound stream) across its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboundRequestId(pub(crate) u64);

impl fmt::Display for OutboundRequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "out-{}", self.0)
    }
}

impl fmt::Display for InboundRequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "in-{}", self.0)
    }
}

/// The token to send the response to one inbound request with
/// [`Behaviour::send_response`]; `T` is the response's type ([`PullIntent`] for a
/// pull_intent query, `Vec<PleasePullOutcome>` for a please_pull). Dropping it without a
/// response closes the request's stream without one.
pub struct Responder<T> {
    peer: PeerId,
    connection: ConnectionId,
    id: InboundRequestId,
    stream: oneshot::Sender<InboundResponse>,
    rpc: Rpc,
    to_wire: fn(T) -> wire::Envelope,
    _response: PhantomData<fn(T)>,
}

impl<T> Responder<T> {
    /// The id of the request this token answers.
    pub fn request_id(&self) -> InboundRequestId {
        self.id
    }

    /// The peer that asked.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Whether the request's stream still waits for the response: false once its
    /// deadline passed or its connection closed.
    pub fn is_open(&self) -> bool {
        !self.stream.is_canceled()
    }
}

impl<T> fmt::Debug for Responder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("peer", &self.peer)
            .field("request_id", &self.id)
            .field("rpc", &self.rpc)
            .finish()
    }
}

/// What the behaviour reports to the swarm loop.
#[derive(Debug)]
pub enum Event {
    /// A peer asks what this node knows about a digest; respond with
    /// [`Behaviour::send_response`] within the answer deadline.
    PullIntentQuery {
        /// The asking peer.
        peer: PeerId,
        /// The digest asked about.
        digest: Digest,
        /// Sends the response.
        responder: Responder<PullIntent>,
    },
    /// A peer asks this node to pull digests from the origin; respond with
    /// [`Behaviour::send_response`], one outcome per digest in request order.
    PleasePull {
        /// The asking peer.
        peer: PeerId,
        /// The request, with its invalid digests already dropped.
        request: PleasePull,
        /// How many digests of the request were invalid and dropped.
        skipped_digests: usize,
        /// Sends the response.
        responder: Responder<Vec<PleasePullOutcome>>,
    },
    /// The response to [`Behaviour::pull_intent_query`].
    PullIntentResponse {
        /// The peer that responded.
        peer: PeerId,
        /// The request this responds to.
        request_id: OutboundRequestId,
        /// Its answer, with timestamps clamped to this node's clock.
        intent: PullIntent,
    },
    /// The response to [`Behaviour::please_pull`].
    PleasePullResponse {
        /// The peer that responded.
        peer: PeerId,
        /// The request this responds to.
        request_id: OutboundRequestId,
        /// One outcome per digest it accepted, in request order.
        outcomes: Vec<PleasePullOutcome>,
        /// Results whose digest was invalid: skipped, as the Go client skips them, so
        /// the others still count.
        skipped_results: usize,
    },
    /// An outbound request failed.
    OutboundFailure {
        /// The peer asked.
        peer: PeerId,
        /// The request that failed.
        request_id: OutboundRequestId,
        /// Why.
        error: OutboundFailure,
    },
    /// An inbound stream ended without a response.
    InboundFailure {
        /// The peer that opened the stream.
        peer: PeerId,
        /// The stream's request id.
        request_id: InboundRequestId,
        /// Why.
        error: InboundFailure,
    },
    /// A response was written and its stream closed: the request was served.
    ResponseSent {
        /// The peer that asked.
        peer: PeerId,
        /// The request served.
        request_id: InboundRequestId,
        /// Its family.
        rpc: Rpc,
    },
    /// A request came from a peer that the membership does not vouch for. In observe
    /// mode it is served anyway; in enforce mode its stream is closed without a response.
    UnauthorizedPeer {
        /// The peer.
        peer: PeerId,
        /// Why it is not authorized.
        reason: UnauthorizedReason,
    },
}

/// Commands all [`Coordinator`] handles together may queue before their sends wait.
const COMMAND_QUEUE: usize = 256;

/// Peers whose addresses are remembered for dialing; the least recently used go first.
const MAX_REMEMBERED_PEERS: usize = 1024;

/// One connection to a peer, and the record of each request that lives and dies with
/// it: the only place a request handed to a connection is kept.
#[derive(Debug)]
struct Connection {
    id: ConnectionId,
    /// Outbound requests handed to this connection, until their response or failure.
    outbound: HashMap<OutboundRequestId, OutboundCall>,
    /// Inbound requests read on it and not yet responded to.
    inbound: HashSet<InboundRequestId>,
}

impl Connection {
    fn new(id: ConnectionId) -> Self {
        Connection {
            id,
            outbound: HashMap::new(),
            inbound: HashSet::new(),
        }
    }
}

/// What the behaviour keeps of an outbound request until it ends.
#[derive(Debug)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
struct OutboundCall {
    /// Family and start, for the latency metrics.
    rpc: Rpc,
    since: Instant,
    /// The [`Coordinator`] call waiting for the result; without one it goes out as an
    /// event.
    caller: Option<ResponseSender>,
}

/// A request waiting for its peer to connect, until its dial deadline: the only place
/// such a request is kept.
#[derive(Debug)]
struct Dialing {
    request: OutboundRequest,
    call: OutboundCall,
    deadline: Instant,
}

/// The `/gantry/coord/1.0.0` network behaviour.
pub struct Behaviour {
    config: Arc<Config>,
    next_outbound_id: u64,
    next_inbound_id: Arc<AtomicU64>,
    /// Inbound streams open across the whole node.
    open_inbound: Arc<AtomicUsize>,
    /// Inbound streams open per peer, across that peer's connections.
    open_inbound_per_peer: HashMap<PeerId, Arc<AtomicUsize>>,
    /// Each peer's connections, with their requests; requests go round them in turn.
    connections: HashMap<PeerId, Vec<Connection>>,
    next_connection: usize,
    /// Addresses learned through `Swarm::add_peer_address`, for dialing; bounded.
    addresses: PeerAddresses,
    /// Requests waiting for a connection to their peer.
    pending_dials: HashMap<PeerId, Vec<Dialing>>,
    /// Their dial deadlines.
    dial_deadlines: DeadlineQueue<(OutboundRequestId, PeerId)>,
    /// Commands from [`Coordinator`] handles.
    commands: mpsc::Receiver<Command>,
    command_sender: mpsc::Sender<Command>,
    /// The membership that vouches for peers; without one every peer is allowed.
    authorizer: Option<Box<dyn PeerAuthorizer>>,
    warnings: WarningLimiter,
    pending_events: VecDeque<ToSwarm<Event, HandlerIn>>,
    #[cfg(feature = "metrics")]
    metrics: Option<crate::metrics::Metrics>,
}

impl Behaviour {
    /// A behaviour with the given configuration.
    pub fn new(config: Config) -> Self {
        let (command_sender, commands) = mpsc::channel(COMMAND_QUEUE);
        Behaviour {
            config: Arc::new(config),
            next_outbound_id: 0,
            next_inbound_id: Arc::default(),
            open_inbound: Arc::default(),
            open_inbound_per_peer: HashMap::new(),
            connections: HashMap::new(),
            next_connection: 0,
            addresses: PeerAddresses::new(
                MAX_REMEMBERED_PEERS
                    .try_into()
                    .expect("the bound is not zero"),
            ),
            pending_dials: HashMap::new(),
            dial_deadlines: DeadlineQueue::default(),
            commands,
            command_sender,
            authorizer: None,
            warnings: WarningLimiter::default(),
            pending_events: VecDeque::new(),
            #[cfg(feature = "metrics")]
            metrics: None,
        }
    }

    /// Records this behaviour's metrics in `registry` (names start with `gantry_coord_`):
    /// stream errors and rejected streams by reason, unauthorized peers, requests served,
    /// outbound failures and latency, and the open inbound streams.
    #[cfg(feature = "metrics")]
    pub fn register_metrics(&mut self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics = Some(crate::metrics::Metrics::register(
            registry,
            self.open_inbound.clone(),
        ));
    }

    /// Asks `peer` what it knows about `digest`; dials it if not connected. Ends in one
    /// [`Event::PullIntentResponse`] or [`Event::OutboundFailure`] with the returned id.
    pub fn pull_intent_query(&mut self, peer: PeerId, digest: &Digest) -> OutboundRequestId {
        let deadline = time::now() + self.config.request_timeout;
        let envelope = protocol::pull_intent_request(digest);
        self.send_request(peer, Rpc::PullIntent, &envelope, None, deadline)
    }

    /// Asks `peer` to pull digests from the origin; dials it if not connected. Ends in
    /// one [`Event::PleasePullResponse`] or [`Event::OutboundFailure`] with the returned id.
    ///
    /// One request carries at most [`MAX_DIGESTS_PER_PLEASE_PULL`](crate::MAX_DIGESTS_PER_PLEASE_PULL)
    /// digests; a larger batch fails with [`OutboundFailure::TooManyDigests`] and nothing
    /// is sent. Send [`PleasePull::batches`] one by one, or use
    /// [`Coordinator::please_pull`], which splits.
    pub fn please_pull(&mut self, peer: PeerId, request: &PleasePull) -> OutboundRequestId {
        let deadline = time::now() + self.config.request_timeout;
        self.send_please_pull(peer, request, None, deadline)
    }

    /// Sends the response to an inbound request. Fails if the request's answer deadline
    /// has passed or its connection closed, or if the response exceeds the message cap; in
    /// that last case the stream is closed at once without a response, as the peer could
    /// not read it anyway.
    pub fn send_response<T>(
        &mut self,
        responder: Responder<T>,
        response: T,
    ) -> Result<(), ResponseError> {
        let Responder {
            peer,
            connection,
            id,
            stream,
            rpc,
            to_wire,
            ..
        } = responder;
        let awaited = self
            .connection_mut(peer, connection)
            .is_some_and(|c| c.inbound.remove(&id));
        if !awaited {
            return Err(ResponseError::Expired);
        }
        // Only the length is checked here; the stream's connection task encodes the
        // response, so the swarm loop does not spend its time on large batches.
        let envelope = to_wire(response);
        let max = self.config.max_message_bytes;
        let len = envelope_len(&envelope);
        let (decision, result) = if len > max as u64 {
            let reason = InboundFailure::ResponseTooLarge { len };
            (
                InboundResponse::Reject(reason),
                Err(ResponseError::TooLarge { len, max }),
            )
        } else {
            (InboundResponse::Send { rpc, envelope }, Ok(()))
        };
        // The stream may have just hit its deadline: then it is gone.
        stream.send(decision).map_err(|_| ResponseError::Expired)?;
        result
    }

    /// A cloneable async handle that sends requests through this behaviour from any task.
    /// Each call has one budget, the request timeout, that covers the queue, the dial
    /// and the exchange, as the Go client's RPC context does.
    pub fn coordinator(&self) -> Coordinator {
        Coordinator::new(self.command_sender.clone(), self.config.request_timeout)
    }

    /// Checks every inbound request against `authorizer` (the node's
    /// [`Membership`](crate::Membership), in practice), asked anew for each request so it
    /// always sees the current snapshot. In observe mode (the default) a peer no member
    /// published is served and reported as [`Event::UnauthorizedPeer`]; in enforce mode
    /// its stream is closed without a response. Without an authorizer every peer is
    /// allowed.
    pub fn authorize_with(&mut self, authorizer: impl PeerAuthorizer) {
        self.authorizer = Some(Box::new(authorizer));
    }

    /// Inbound streams open across the whole node.
    pub fn open_inbound_streams(&self) -> usize {
        self.open_inbound.load(Ordering::Acquire)
    }

    /// Inbound streams open from one peer, across its connections.
    pub fn open_inbound_streams_from(&self, peer: &PeerId) -> usize {
        self.open_inbound_per_peer
            .get(peer)
            .map_or(0, |n| n.load(Ordering::Acquire))
    }

    /// Inbound requests read and not yet responded to.
    pub fn pending_responses(&self) -> usize {
        self.connections
            .values()
            .flatten()
            .map(|c| c.inbound.len())
            .sum()
    }

    /// Outbound requests that have not yet ended.
    pub fn pending_requests(&self) -> usize {
        let sent: usize = self
            .connections
            .values()
            .flatten()
            .map(|c| c.outbound.len())
            .sum();
        sent + self.pending_dials.values().map(Vec::len).sum::<usize>()
    }

    fn send_please_pull(
        &mut self,
        peer: PeerId,
        request: &PleasePull,
        caller: Option<ResponseSender>,
        deadline: Instant,
    ) -> OutboundRequestId {
        let count = request.digests().len();
        let max = crate::MAX_DIGESTS_PER_PLEASE_PULL;
        if count > max {
            let (id, call) = self.new_outbound(Rpc::PleasePull, caller);
            let error = OutboundFailure::TooManyDigests { count, max };
            self.finish_outbound(peer, id, call, Err(error));
            return id;
        }
        let mut envelope = protocol::please_pull_request(request);
        let id = self.send_request(peer, Rpc::PleasePull, &envelope, caller, deadline);
        protocol::wipe_authorization(&mut envelope);
        id
    }

    fn new_outbound(
        &mut self,
        rpc: Rpc,
        caller: Option<ResponseSender>,
    ) -> (OutboundRequestId, OutboundCall) {
        let id = OutboundRequestId(self.next_outbound_id);
        self.next_outbound_id += 1;
        let call = OutboundCall {
            rpc,
            since: time::now(),
            caller,
        };
        (id, call)
    }

    /// Sends a request that must end by `deadline`, its one budget for dial and exchange;
    /// its result goes to the [`Coordinator`] call if there is one, else out as an event.
    fn send_request(
        &mut self,
        peer: PeerId,
        rpc: Rpc,
        envelope: &wire::Envelope,
        caller: Option<ResponseSender>,
        deadline: Instant,
    ) -> OutboundRequestId {
        let (id, call) = self.new_outbound(rpc, caller);
        let max = self.config.max_message_bytes;
        let Ok(frame) = encode_frame(envelope, max) else {
            let len = envelope_len(envelope);
            let error = OutboundFailure::RequestTooLarge { len, max };
            self.finish_outbound(peer, id, call, Err(error));
            return id;
        };
        let request = OutboundRequest {
            id,
            rpc,
            frame,
            secret: protocol::holds_credentials(envelope),
            deadline,
        };
        if self.connections.contains_key(&peer) {
            self.send_on_some_connection(peer, request, call);
            return id;
        }
        // The dial spends the request's budget; it never gets more than that.
        let deadline = deadline.min(time::now() + self.config.dial_timeout);
        let waiting = self.pending_dials.entry(peer).or_default();
        if waiting.is_empty() {
            self.pending_events.push_back(ToSwarm::Dial {
                opts: DialOpts::peer_id(peer).build(),
            });
        }
        waiting.push(Dialing {
            request,
            call,
            deadline,
        });
        self.dial_deadlines.insert((id, peer), deadline);
        id
    }

    /// Hands `request` to one of the peer's connections, each in turn.
    fn send_on_some_connection(
        &mut self,
        peer: PeerId,
        request: OutboundRequest,
        call: OutboundCall,
    ) {
        let Some(connections) = self.connections.get_mut(&peer).filter(|c| !c.is_empty()) else {
            // Callers check first; should it ever happen, the request still ends.
            self.finish_outbound(
                peer,
                request.id,
                call,
                Err(OutboundFailure::ConnectionClosed),
            );
            return;
        };
        self.next_connection = self.next_connection.wrapping_add(1);
        let at = self.next_connection % connections.len();
        let connection = &mut connections[at];
        connection.outbound.insert(request.id, call);
        self.pending_events.push_back(ToSwarm::NotifyHandler {
            peer_id: peer,
            handler: NotifyHandler::One(connection.id),
            event: HandlerIn::SendRequest(request),
        });
    }

    fn connection_mut(&mut self, peer: PeerId, id: ConnectionId) -> Option<&mut Connection> {
        self.connections
            .get_mut(&peer)?
            .iter_mut()
            .find(|c| c.id == id)
    }

    fn new_handler(&mut self, peer: PeerId) -> Handler {
        let per_peer = self.open_inbound_per_peer.entry(peer).or_default().clone();
        let budget = StreamBudget::new(
            self.open_inbound.clone(),
            self.config.max_inbound_streams,
            per_peer,
            self.config.max_inbound_streams_per_peer,
        );
        Handler::new(
            peer,
            self.config.clone(),
            budget,
            self.next_inbound_id.clone(),
        )
    }

    /// Why the request of `peer` is refused, if it is; reports it as docs/protocol.md §7 says.
    fn authorize(&mut self, peer: PeerId) -> Option<InboundFailure> {
        let reason = self.authorizer.as_ref()?.authorize(&peer).err()?;
        let enforce = self.config.authorization_mode == AuthorizationMode::Enforce;
        if !enforce && reason == UnauthorizedReason::Unevaluable {
            // Cold boot: nobody can be checked yet, and observe mode serves everyone.
            return None;
        }
        if self.warnings.allow(peer, time::now()) {
            tracing::warn!(%peer, %reason, enforce, "request from a peer the membership does not vouch for");
        } else {
            tracing::debug!(%peer, %reason, enforce, "request from unauthorized peer");
        }
        self.emit(Event::UnauthorizedPeer { peer, reason });
        enforce.then_some(InboundFailure::Unauthorized(reason))
    }

    fn on_inbound_request(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        id: InboundRequestId,
        request: Result<InboundRequest, InboundFailure>,
        stream: oneshot::Sender<InboundResponse>,
    ) {
        // Before the request is validated, as docs/protocol.md §7 says: a stranger is refused as
        // a stranger, whatever it sent.
        if let Some(rejection) = self.authorize(peer) {
            let _ = stream.send(InboundResponse::Reject(rejection));
            return;
        }
        let request = match request {
            Ok(request) => request,
            Err(invalid) => {
                let _ = stream.send(InboundResponse::Reject(invalid));
                return;
            }
        };
        let Some(open) = self.connection_mut(peer, connection) else {
            // The connection is gone; dropping the sender closes the stream.
            return;
        };
        open.inbound.insert(id);
        let event = match request {
            InboundRequest::PullIntent(digest) => Event::PullIntentQuery {
                peer,
                digest,
                responder: Responder {
                    peer,
                    connection,
                    id,
                    stream,
                    rpc: Rpc::PullIntent,
                    to_wire: protocol::pull_intent_response,
                    _response: PhantomData,
                },
            },
            InboundRequest::PleasePull {
                request,
                skipped_digests,
            } => Event::PleasePull {
                peer,
                request,
                skipped_digests,
                responder: Responder {
                    peer,
                    connection,
                    id,
                    stream,
                    rpc: Rpc::PleasePull,
                    to_wire: protocol::please_pull_response,
                    _response: PhantomData,
                },
            },
        };
        self.emit(event);
    }

    fn emit(&mut self, event: Event) {
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.on_event(&event);
        }
        self.pending_events.push_back(ToSwarm::GenerateEvent(event));
    }

    /// Ends an outbound request: its result goes to the waiting [`Coordinator`] call, or
    /// out as an event.
    fn finish_outbound(
        &mut self,
        peer: PeerId,
        id: OutboundRequestId,
        call: OutboundCall,
        result: Result<Response, OutboundFailure>,
    ) {
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            let elapsed = time::now().saturating_duration_since(call.since);
            metrics.on_outbound(call.rpc, elapsed, result.as_ref().err());
        }
        if let Ok(Response::PleasePull {
            skipped_results: skipped @ 1..,
            ..
        }) = &result
        {
            tracing::debug!(%peer, skipped, "please_pull response: results with a bad digest skipped");
            #[cfg(feature = "metrics")]
            if let Some(metrics) = &self.metrics {
                metrics.on_skipped_results(*skipped);
            }
        }
        if let Some(caller) = call.caller {
            // A dropped call no longer wants its result.
            let _ = caller.send(result);
            return;
        }
        let event = match result {
            Ok(Response::PullIntent(intent)) => Event::PullIntentResponse {
                peer,
                request_id: id,
                intent,
            },
            Ok(Response::PleasePull {
                outcomes,
                skipped_results,
            }) => Event::PleasePullResponse {
                peer,
                request_id: id,
                outcomes,
                skipped_results,
            },
            Err(error) => Event::OutboundFailure {
                peer,
                request_id: id,
                error,
            },
        };
        self.emit(event);
    }

    fn on_command(
        &mut self,
        Command {
            peer,
            request,
            response,
            deadline,
        }: Command,
    ) {
        match &request {
            ClientRequest::PullIntent(digest) => {
                let envelope = protocol::pull_intent_request(digest);
                self.send_request(peer, Rpc::PullIntent, &envelope, Some(response), deadline);
            }
            ClientRequest::PleasePull(request) => {
                self.send_please_pull(peer, request, Some(response), deadline);
            }
        }
    }

    /// Fails the requests whose peer did not connect before their dial deadline.
    fn poll_dial_deadlines(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(((id, peer), _)) = self.dial_deadlines.poll_expired(cx, time::now()) {
            let Some(waiting) = self.pending_dials.get_mut(&peer) else {
                continue;
            };
            let Some(at) = waiting.iter().position(|d| d.request.id == id) else {
                continue;
            };
            let expired = waiting.swap_remove(at);
            if waiting.is_empty() {
                self.pending_dials.remove(&peer);
            }
            self.finish_outbound(peer, id, expired.call, Err(OutboundFailure::DialTimeout));
        }
    }

    /// The requests waiting for `peer` to connect, their deadlines forgotten.
    fn take_dialing(&mut self, peer: PeerId) -> Vec<Dialing> {
        let waiting = self.pending_dials.remove(&peer).unwrap_or_default();
        for dialing in &waiting {
            self.dial_deadlines
                .remove((dialing.request.id, peer), dialing.deadline);
        }
        waiting
    }

    fn on_connection_established(&mut self, peer: PeerId, connection: ConnectionId) {
        self.connections
            .entry(peer)
            .or_default()
            .push(Connection::new(connection));
        for Dialing { request, call, .. } in self.take_dialing(peer) {
            self.send_on_some_connection(peer, request, call);
        }
    }

    /// Ends the requests of that one connection; the peer's others go on.
    fn on_connection_closed(&mut self, peer: PeerId, id: ConnectionId, remaining: usize) {
        let Some(connections) = self.connections.get_mut(&peer) else {
            return;
        };
        let Some(at) = connections.iter().position(|c| c.id == id) else {
            return;
        };
        let closed = connections.swap_remove(at);
        if connections.is_empty() {
            self.connections.remove(&peer);
        }
        if remaining == 0 {
            // A counter outlives its peer's connections while their streams wind down, so a
            // peer that reconnects at once still counts them against its share.
            if self
                .open_inbound_per_peer
                .get(&peer)
                .is_some_and(|open| open.load(Ordering::Acquire) == 0)
            {
                self.open_inbound_per_peer.remove(&peer);
            }
        }
        for (request, call) in closed.outbound {
            self.finish_outbound(peer, request, call, Err(OutboundFailure::ConnectionClosed));
        }
        for request in closed.inbound {
            self.emit(Event::InboundFailure {
                peer,
                request_id: request,
                error: InboundFailure::ConnectionClosed,
            });
        }
    }

    fn on_handler_event(&mut self, peer: PeerId, connection: ConnectionId, event: HandlerEvent) {
        match event {
            HandlerEvent::InboundRequest {
                id,
                request,
                response,
            } => self.on_inbound_request(peer, connection, id, request, response),
            HandlerEvent::ResponseSent { id, rpc } => self.emit(Event::ResponseSent {
                peer,
                request_id: id,
                rpc,
            }),
            HandlerEvent::InboundFailure { id, error } => {
                if let Some(c) = self.connection_mut(peer, connection) {
                    c.inbound.remove(&id);
                }
                self.emit(Event::InboundFailure {
                    peer,
                    request_id: id,
                    error,
                });
            }
            HandlerEvent::Response { id, response } => {
                self.end_outbound_on(peer, connection, id, Ok(response))
            }
            HandlerEvent::OutboundFailure { id, error } => {
                self.end_outbound_on(peer, connection, id, Err(error))
            }
        }
    }

    fn end_outbound_on(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        id: OutboundRequestId,
        result: Result<Response, OutboundFailure>,
    ) {
        // A request of a connection already closed has ended already.
        let call = self
            .connection_mut(peer, connection)
            .and_then(|c| c.outbound.remove(&id));
        if let Some(call) = call {
            self.finish_outbound(peer, id, call, result);
        }
    }

    fn on_dial_failure(&mut self, peer: PeerId, error: String) {
        if self.connections.contains_key(&peer) {
            return;
        }
        for Dialing { request, call, .. } in self.take_dialing(peer) {
            let error = OutboundFailure::DialFailure(error.clone());
            self.finish_outbound(peer, request.id, call, Err(error));
        }
    }
}

fn envelope_len(envelope: &wire::Envelope) -> u64 {
    prost::Message::encoded_len(envelope) as u64
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.new_handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.new_handler(peer))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(peer.map_or_else(Vec::new, |peer| self.addresses.get(&peer).collect()))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        // Learns addresses from `Swarm::add_peer_address`, forgets those that failed.
        self.addresses.on_swarm_event(&event);
        match event {
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id,
                connection_id,
                ..
            }) => self.on_connection_established(peer_id, connection_id),
            FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id,
                connection_id,
                remaining_established,
                ..
            }) => self.on_connection_closed(peer_id, connection_id, remaining_established),
            // Another behaviour's dial to the peer is under way: the requests wait for
            // that connection (or their deadline) instead of failing.
            FromSwarm::DialFailure(DialFailure {
                error: DialError::DialPeerConditionFalse(_),
                ..
            }) => {}
            FromSwarm::DialFailure(DialFailure {
                peer_id: Some(peer),
                error,
                ..
            }) => self.on_dial_failure(peer, error.to_string()),
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        HandlerEvents(events): THandlerOutEvent<Self>,
    ) {
        for event in events {
            self.on_handler_event(peer, connection, event);
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        loop {
            if let Some(event) = self.pending_events.pop_front() {
                return Poll::Ready(event);
            }
            self.poll_dial_deadlines(cx);
            if !self.pending_events.is_empty() {
                continue;
            }
            // The behaviour holds a sender itself, so the stream never ends.
            match self.commands.poll_next_unpin(cx) {
                Poll::Ready(Some(command)) => self.on_command(command),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::task::noop_waker;

    use super::*;
    use crate::digest::sample as digest;

    fn poll(behaviour: &mut Behaviour) -> Poll<ToSwarm<Event, HandlerIn>> {
        let waker = noop_waker();
        NetworkBehaviour::poll(behaviour, &mut Context::from_waker(&waker))
    }

    #[test]
    fn a_request_to_a_peer_that_never_connects_ends_at_its_dial_deadline() {
        let config = Config::default().with_dial_timeout(Duration::from_secs(10));
        let mut behaviour = Behaviour::new(config);
        let peer = PeerId::random();
        let id = behaviour.pull_intent_query(peer, &digest(1));
        assert!(matches!(
            poll(&mut behaviour),
            Poll::Ready(ToSwarm::Dial { .. })
        ));
        assert_eq!(behaviour.pending_requests(), 1);
        assert!(poll(&mut behaviour).is_pending());
        time::advance(Duration::from_secs(11));
        let Poll::Ready(ToSwarm::GenerateEvent(Event::OutboundFailure {
            request_id,
            error: OutboundFailure::DialTimeout,
            ..
        })) = poll(&mut behaviour)
        else {
            panic!("no dial timeout");
        };
        assert_eq!(request_id, id);
        assert_eq!(behaviour.pending_requests(), 0);
        assert!(poll(&mut behaviour).is_pending(), "it ended once");
    }

    #[test]
    fn requests_live_and_end_with_their_connection_once() {
        let mut behaviour = Behaviour::new(Config::default());
        let peer = PeerId::random();
        let waiting = behaviour.pull_intent_query(peer, &digest(1));
        let connection = ConnectionId::new_unchecked(7);
        behaviour.on_connection_established(peer, connection);
        let sent = behaviour.pull_intent_query(peer, &digest(2));
        assert_eq!(behaviour.pending_requests(), 2);
        assert_eq!(
            behaviour.dial_deadlines.len(),
            0,
            "the dial's deadline is gone"
        );
        behaviour.on_connection_closed(peer, connection, 0);
        assert_eq!(behaviour.pending_requests(), 0);
        let mut ended = Vec::new();
        while let Poll::Ready(event) = poll(&mut behaviour) {
            if let ToSwarm::GenerateEvent(Event::OutboundFailure {
                request_id,
                error: OutboundFailure::ConnectionClosed,
                ..
            }) = event
            {
                ended.push(request_id);
            }
        }
        ended.sort();
        assert_eq!(ended, vec![waiting, sent]);
        // A late handler event for an ended request is ignored.
        behaviour.end_outbound_on(peer, connection, sent, Err(OutboundFailure::Timeout));
        assert!(behaviour.pending_events.is_empty());
    }
}

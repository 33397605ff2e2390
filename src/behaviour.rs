//! The `NetworkBehaviour`: request ids, dialing, the stream budget, authorization, and
//! the events the swarm loop sees.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Instant,
};

use futures::{
    channel::{mpsc, oneshot},
    FutureExt, StreamExt,
};
use futures_timer::Delay;

use hashlink::LruCache;
use libp2p_core::{transport::PortUse, Endpoint, Multiaddr};
use libp2p_identity::PeerId;
use libp2p_swarm::{
    behaviour::{ConnectionClosed, ConnectionEstablished, DialFailure, NewExternalAddrOfPeer},
    dial_opts::DialOpts,
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};

use crate::{
    authorize::{PeerAuthorizer, WarningLimiter},
    budget::StreamBudget,
    client::{Command, Coordinator, Reply as ClientReply, ReplySender, Request as ClientRequest},
    codec::encode_frame,
    handler::{FromBehaviour, Handler, OutboundRequest, Report, ToBehaviour, Verdict},
    message::{self, WireRequest},
    wire, AuthorizationMode, Config, Digest, InboundFailure, OutboundFailure, PleasePull,
    PleasePullOutcome, PullIntent, RespondError, UnauthorizedReason,
};

/// Identifies an outbound request; its reply or failure event carries the same id.
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

/// The two RPC families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    /// pull_intent_query → pull_intent_response.
    PullIntent,
    /// please_pull → please_pull_response.
    PleasePull,
}

/// Where an answer goes: the stream of one inbound request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    peer: PeerId,
    connection: ConnectionId,
    id: InboundRequestId,
}

/// The token to answer one inbound pull_intent query with [`Behaviour::respond`].
/// Dropping it unanswered closes the request's stream without a reply.
#[derive(Debug)]
pub struct PullIntentResponder(Route, oneshot::Sender<Verdict>);

/// The token to answer one inbound please_pull with [`Behaviour::respond`].
/// Dropping it unanswered closes the request's stream without a reply.
#[derive(Debug)]
pub struct PleasePullResponder(Route, oneshot::Sender<Verdict>);

mod sealed {
    pub trait Sealed {
        fn into_reply(self, reply: Self::Reply) -> super::Answer
        where
            Self: super::Responder;
    }
}

/// A token that answers one inbound request; its `Reply` is the answer's type.
pub trait Responder: sealed::Sealed {
    /// What answers the request.
    type Reply;

    /// The id of the request this token answers.
    fn request_id(&self) -> InboundRequestId;

    /// The peer that asked.
    fn peer(&self) -> PeerId;
}

#[doc(hidden)]
pub struct Answer {
    route: Route,
    verdict: oneshot::Sender<Verdict>,
    rpc: crate::Rpc,
    envelope: wire::Envelope,
}

impl Responder for PullIntentResponder {
    type Reply = PullIntent;

    fn request_id(&self) -> InboundRequestId {
        self.0.id
    }

    fn peer(&self) -> PeerId {
        self.0.peer
    }
}

impl sealed::Sealed for PullIntentResponder {
    fn into_reply(self, reply: PullIntent) -> Answer {
        Answer {
            route: self.0,
            verdict: self.1,
            rpc: Rpc::PullIntent,
            envelope: message::pull_intent_response(reply),
        }
    }
}

impl Responder for PleasePullResponder {
    type Reply = Vec<PleasePullOutcome>;

    fn request_id(&self) -> InboundRequestId {
        self.0.id
    }

    fn peer(&self) -> PeerId {
        self.0.peer
    }
}

impl sealed::Sealed for PleasePullResponder {
    fn into_reply(self, reply: Vec<PleasePullOutcome>) -> Answer {
        Answer {
            route: self.0,
            verdict: self.1,
            rpc: Rpc::PleasePull,
            envelope: message::please_pull_response(reply),
        }
    }
}

/// What the behaviour reports to the swarm loop.
#[derive(Debug)]
pub enum Event {
    /// A peer asks what this node knows about a digest; answer with [`Behaviour::respond`]
    /// within the answer deadline.
    PullIntentQuery {
        /// The asking peer.
        peer: PeerId,
        /// The digest asked about.
        digest: Digest,
        /// Answers the query.
        responder: PullIntentResponder,
    },
    /// A peer asks this node to pull digests from the origin; answer with
    /// [`Behaviour::respond`], one outcome per digest in request order.
    PleasePull {
        /// The asking peer.
        peer: PeerId,
        /// The request, with its invalid digests already dropped.
        request: PleasePull,
        /// How many digests of the request were invalid and dropped.
        skipped_digests: usize,
        /// Answers the request.
        responder: PleasePullResponder,
    },
    /// The reply to [`Behaviour::pull_intent_query`].
    PullIntentReply {
        /// The peer that answered.
        peer: PeerId,
        /// The request this answers.
        request_id: OutboundRequestId,
        /// Its answer, with timestamps clamped to this node's clock.
        intent: PullIntent,
    },
    /// The reply to [`Behaviour::please_pull`].
    PleasePullReply {
        /// The peer that answered.
        peer: PeerId,
        /// The request this answers.
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
    /// An inbound stream ended without a normal reply.
    InboundFailure {
        /// The peer that opened the stream.
        peer: PeerId,
        /// The stream's request id.
        request_id: InboundRequestId,
        /// Why.
        error: InboundFailure,
    },
    /// A reply was written and its stream closed: the request was served.
    ResponseSent {
        /// The peer answered.
        peer: PeerId,
        /// The request served.
        request_id: InboundRequestId,
        /// Its family.
        rpc: Rpc,
    },
    /// A request came from a peer that the membership does not vouch for. In observe
    /// mode it is served anyway; in enforce mode its stream is closed without a reply.
    UnauthorizedPeer {
        /// The peer.
        peer: PeerId,
        /// Why it is not authorized.
        reason: UnauthorizedReason,
    },
}

/// Commands a [`Coordinator`] may queue before its sends wait.
const COMMAND_QUEUE: usize = 256;

/// Peers whose addresses are remembered for dialing; the least recently used go first.
const MAX_REMEMBERED_PEERS: usize = 1024;
/// Addresses remembered per peer.
const MAX_ADDRESSES_PER_PEER: usize = 8;

/// The `/gantry/coord/1.0.0` network behaviour.
pub struct Behaviour {
    config: Arc<Config>,
    next_outbound_id: u64,
    next_inbound_id: Arc<AtomicU64>,
    /// Inbound streams open across the whole node.
    open_inbound: Arc<AtomicUsize>,
    /// Inbound streams open per peer, across that peer's connections.
    open_inbound_per_peer: HashMap<PeerId, Arc<AtomicUsize>>,
    connections: HashMap<PeerId, Vec<ConnectionId>>,
    /// Addresses learned through `Swarm::add_peer_address`, for dialing; bounded.
    addresses: LruCache<PeerId, Vec<Multiaddr>>,
    /// Requests waiting for a connection to their peer, each until its dial deadline.
    awaiting_connection: HashMap<PeerId, Vec<(Instant, OutboundRequest)>>,
    /// Wakes the behaviour at the earliest dial deadline.
    dial_timer: Option<(Instant, Delay)>,
    /// Commands from [`Coordinator`] handles, and where their results go.
    commands: mpsc::Receiver<Command>,
    command_sender: mpsc::Sender<Command>,
    clients: HashMap<OutboundRequestId, ReplySender>,
    /// Outbound requests in flight: their peer, their connection once sent, their family
    /// and when they were asked for.
    outbound: HashMap<OutboundRequestId, Outstanding>,
    /// Inbound requests read and not yet answered.
    awaiting_answer: HashMap<InboundRequestId, Route>,
    /// The membership that vouches for peers; without one every peer is allowed.
    authorizer: Option<Box<dyn PeerAuthorizer>>,
    warnings: WarningLimiter,
    pending: VecDeque<ToSwarm<Event, FromBehaviour>>,
    #[cfg(feature = "metrics")]
    metrics: Option<crate::metrics::Metrics>,
}

/// An outbound request that has not ended.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
struct Outstanding {
    connection: Option<ConnectionId>,
    /// Family and start, for the latency metrics.
    rpc: Rpc,
    since: Instant,
}

impl Behaviour {
    /// A behaviour with the given configuration.
    pub fn new(config: Config) -> Self {
        let (command_sender, commands) = mpsc::channel(COMMAND_QUEUE);
        Behaviour {
            dial_timer: None,
            commands,
            command_sender,
            clients: HashMap::new(),
            config: Arc::new(config),
            next_outbound_id: 0,
            next_inbound_id: Arc::default(),
            open_inbound: Arc::default(),
            open_inbound_per_peer: HashMap::new(),
            connections: HashMap::new(),
            addresses: LruCache::new(MAX_REMEMBERED_PEERS),
            awaiting_connection: HashMap::new(),
            outbound: HashMap::new(),
            awaiting_answer: HashMap::new(),
            authorizer: None,
            warnings: WarningLimiter::default(),
            pending: VecDeque::new(),
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
    /// [`Event::PullIntentReply`] or [`Event::OutboundFailure`] with the returned id.
    pub fn pull_intent_query(&mut self, peer: PeerId, digest: &Digest) -> OutboundRequestId {
        let deadline = Instant::now() + self.config.request_timeout;
        self.send(
            peer,
            Rpc::PullIntent,
            &message::pull_intent_request(digest),
            None,
            deadline,
        )
    }

    /// Asks `peer` to pull digests from the origin; dials it if not connected. Ends in
    /// one [`Event::PleasePullReply`] or [`Event::OutboundFailure`] with the returned id.
    ///
    /// One request carries at most [`MAX_DIGESTS_PER_PLEASE_PULL`](crate::MAX_DIGESTS_PER_PLEASE_PULL)
    /// digests; a larger batch fails with [`OutboundFailure::TooManyDigests`] and nothing
    /// is sent. Send [`PleasePull::batches`] one by one, or use
    /// [`Coordinator::please_pull`], which splits.
    pub fn please_pull(&mut self, peer: PeerId, request: &PleasePull) -> OutboundRequestId {
        let deadline = Instant::now() + self.config.request_timeout;
        self.send_please_pull(peer, request, None, deadline)
    }

    fn send_please_pull(
        &mut self,
        peer: PeerId,
        request: &PleasePull,
        client: Option<ReplySender>,
        deadline: Instant,
    ) -> OutboundRequestId {
        let count = request.digests().len();
        let max = crate::MAX_DIGESTS_PER_PLEASE_PULL;
        if count > max {
            let id = self.new_outbound(Rpc::PleasePull, client);
            let error = OutboundFailure::TooManyDigests { count, max };
            self.finish_outbound(peer, id, Err(error));
            return id;
        }
        let mut envelope = message::please_pull_request(request);
        let id = self.send(peer, Rpc::PleasePull, &envelope, client, deadline);
        message::wipe_authorization(&mut envelope);
        id
    }

    /// Answers an inbound request. Fails if the request's answer deadline has passed or
    /// its connection closed, or if the reply exceeds the message cap; in that last case
    /// the stream is closed at once without a reply, as the peer could not read it anyway.
    pub fn respond<R: Responder>(
        &mut self,
        responder: R,
        reply: R::Reply,
    ) -> Result<(), RespondError> {
        let Answer {
            route,
            verdict,
            rpc,
            envelope,
        } = sealed::Sealed::into_reply(responder, reply);
        if self.awaiting_answer.remove(&route.id).is_none() {
            return Err(RespondError::Expired);
        }
        // Only the length is checked here; the stream's connection task encodes the
        // reply, so the swarm loop does not spend its time on large batches.
        let max = self.config.max_message_bytes;
        let len = envelope_len(&envelope);
        let (answer, result) = if len > max as u64 {
            let reason = InboundFailure::ReplyTooLarge { len };
            (
                Verdict::Reject(reason),
                Err(RespondError::TooLarge { len, max }),
            )
        } else {
            (Verdict::Reply { rpc, envelope }, Ok(()))
        };
        // The stream may have just hit its deadline: then it is gone.
        verdict.send(answer).map_err(|_| RespondError::Expired)?;
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
    /// its stream is closed without a reply. Without an authorizer every peer is allowed.
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

    /// Inbound requests read and not yet answered.
    pub fn pending_answers(&self) -> usize {
        self.awaiting_answer.len()
    }

    /// Outbound requests that have not yet ended.
    pub fn pending_requests(&self) -> usize {
        self.outbound.len()
    }

    fn new_outbound(&mut self, rpc: Rpc, client: Option<ReplySender>) -> OutboundRequestId {
        let id = OutboundRequestId(self.next_outbound_id);
        self.next_outbound_id += 1;
        if let Some(client) = client {
            self.clients.insert(id, client);
        }
        self.outbound.insert(
            id,
            Outstanding {
                connection: None,
                rpc,
                since: Instant::now(),
            },
        );
        id
    }

    /// Sends a request that must end by `deadline`, its one budget for dial and exchange;
    /// its result goes to `client` if given, else out as an event.
    fn send(
        &mut self,
        peer: PeerId,
        rpc: Rpc,
        envelope: &wire::Envelope,
        client: Option<ReplySender>,
        deadline: Instant,
    ) -> OutboundRequestId {
        let id = self.new_outbound(rpc, client);
        let max = self.config.max_message_bytes;
        let Ok(frame) = encode_frame(envelope, max) else {
            let len = envelope_len(envelope);
            self.finish_outbound(peer, id, Err(OutboundFailure::RequestTooLarge { len, max }));
            return id;
        };
        let request = OutboundRequest {
            id,
            rpc,
            frame,
            deadline,
        };
        match self.connections.get(&peer).and_then(|c| c.first()) {
            Some(&connection) => {
                self.sent_on(id, connection);
                self.pending.push_back(ToSwarm::NotifyHandler {
                    peer_id: peer,
                    handler: NotifyHandler::One(connection),
                    event: FromBehaviour::Send(request),
                });
            }
            None => {
                // The dial spends the request's budget; it never gets more than that.
                let dial_deadline = deadline.min(Instant::now() + self.config.dial_timeout);
                let waiting = self.awaiting_connection.entry(peer).or_default();
                if waiting.is_empty() {
                    self.pending.push_back(ToSwarm::Dial {
                        opts: DialOpts::peer_id(peer).build(),
                    });
                }
                waiting.push((dial_deadline, request));
            }
        }
        id
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

    /// Why the request of `peer` is refused, if it is; reports it as PROTOCOL.md says.
    fn authorize(&mut self, peer: PeerId) -> Option<InboundFailure> {
        let reason = self.authorizer.as_ref()?.authorize(&peer).err()?;
        let enforce = self.config.authorization_mode == AuthorizationMode::Enforce;
        if !enforce && reason == UnauthorizedReason::Unevaluable {
            // Cold boot: nobody can be checked yet, and observe mode serves everyone.
            return None;
        }
        if self.warnings.allow(peer, Instant::now()) {
            tracing::warn!(%peer, %reason, enforce, "request from a peer the membership does not vouch for");
        } else {
            tracing::debug!(%peer, %reason, enforce, "request from unauthorized peer");
        }
        self.emit(Event::UnauthorizedPeer { peer, reason });
        enforce.then_some(InboundFailure::Unauthorized(reason))
    }

    fn on_request(
        &mut self,
        route: Route,
        request: Result<WireRequest, InboundFailure>,
        verdict: oneshot::Sender<Verdict>,
    ) {
        // Before the request is validated, as PROTOCOL.md says: a stranger is refused as
        // a stranger, whatever it sent.
        if let Some(rejection) = self.authorize(route.peer) {
            let _ = verdict.send(Verdict::Reject(rejection));
            return;
        }
        let request = match request {
            Ok(request) => request,
            Err(invalid) => {
                let _ = verdict.send(Verdict::Reject(invalid));
                return;
            }
        };
        self.awaiting_answer.insert(route.id, route);
        let event = match request {
            WireRequest::PullIntent(digest) => Event::PullIntentQuery {
                peer: route.peer,
                digest,
                responder: PullIntentResponder(route, verdict),
            },
            WireRequest::PleasePull {
                request,
                skipped_digests,
            } => Event::PleasePull {
                peer: route.peer,
                request,
                skipped_digests,
                responder: PleasePullResponder(route, verdict),
            },
        };
        self.emit(event);
    }

    fn emit(&mut self, event: Event) {
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.on_event(&event);
        }
        self.pending.push_back(ToSwarm::GenerateEvent(event));
    }

    /// Ends an outbound request: its result goes to the waiting [`Coordinator`] call, or
    /// out as an event.
    fn finish_outbound(
        &mut self,
        peer: PeerId,
        id: OutboundRequestId,
        result: Result<ClientReply, OutboundFailure>,
    ) {
        let outstanding = self.outbound.remove(&id);
        #[cfg(feature = "metrics")]
        if let (Some(metrics), Some(o)) = (&self.metrics, outstanding) {
            metrics.on_outbound(o.rpc, o.since.elapsed(), result.as_ref().err());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = outstanding;
        if let Ok(ClientReply::PleasePull {
            skipped_results: skipped @ 1..,
            ..
        }) = &result
        {
            tracing::debug!(%peer, skipped, "please_pull reply: results with a bad digest skipped");
            #[cfg(feature = "metrics")]
            if let Some(metrics) = &self.metrics {
                metrics.on_skipped_results(*skipped);
            }
        }
        if let Some(client) = self.clients.remove(&id) {
            // A dropped call no longer wants its result.
            let _ = client.send(result);
            return;
        }
        let event = match result {
            Ok(ClientReply::PullIntent(intent)) => Event::PullIntentReply {
                peer,
                request_id: id,
                intent,
            },
            Ok(ClientReply::PleasePull {
                outcomes,
                skipped_results,
            }) => Event::PleasePullReply {
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
            reply,
            deadline,
        }: Command,
    ) {
        match &request {
            ClientRequest::PullIntent(digest) => {
                let envelope = message::pull_intent_request(digest);
                self.send(peer, Rpc::PullIntent, &envelope, Some(reply), deadline);
            }
            ClientRequest::PleasePull(request) => {
                self.send_please_pull(peer, request, Some(reply), deadline);
            }
        }
    }

    /// Fails the requests whose peer did not connect before their dial deadline.
    fn poll_dial_deadlines(&mut self, cx: &mut Context<'_>) {
        loop {
            let now = Instant::now();
            let mut expired = Vec::new();
            self.awaiting_connection.retain(|peer, waiting| {
                waiting.retain(|(deadline, request)| {
                    let due = *deadline <= now;
                    if due {
                        expired.push((*peer, request.id));
                    }
                    !due
                });
                !waiting.is_empty()
            });
            for (peer, id) in expired {
                self.finish_outbound(peer, id, Err(OutboundFailure::DialTimeout));
            }
            let next = self
                .awaiting_connection
                .values()
                .flatten()
                .map(|(deadline, _)| *deadline)
                .min();
            let Some(next) = next else {
                self.dial_timer = None;
                return;
            };
            let timer = match &mut self.dial_timer {
                Some((at, timer)) if *at == next => timer,
                slot => {
                    &mut slot
                        .insert((next, Delay::new(next.saturating_duration_since(now))))
                        .1
                }
            };
            if timer.poll_unpin(cx).is_pending() {
                return;
            }
            self.dial_timer = None;
        }
    }

    fn sent_on(&mut self, id: OutboundRequestId, connection: ConnectionId) {
        if let Some(outstanding) = self.outbound.get_mut(&id) {
            outstanding.connection = Some(connection);
        }
    }

    fn on_connection_established(&mut self, peer: PeerId, connection: ConnectionId) {
        self.connections.entry(peer).or_default().push(connection);
        let requests = self.awaiting_connection.remove(&peer).unwrap_or_default();
        for (_, request) in requests {
            self.sent_on(request.id, connection);
            self.pending.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::One(connection),
                event: FromBehaviour::Send(request),
            });
        }
    }

    fn on_connection_closed(&mut self, peer: PeerId, connection: ConnectionId, remaining: usize) {
        if let Some(connections) = self.connections.get_mut(&peer) {
            connections.retain(|c| *c != connection);
            if connections.is_empty() {
                self.connections.remove(&peer);
            }
        }
        if remaining == 0 {
            // A counter outlives its peer's connections while their streams wind down, so a
            // peer that reconnects at once still counts them against its share.
            let connections = &self.connections;
            self.open_inbound_per_peer.retain(|peer, open| {
                connections.contains_key(peer) || open.load(Ordering::Acquire) > 0
            });
        }
        let lost: Vec<_> = self
            .outbound
            .iter()
            .filter(|(_, o)| o.connection == Some(connection))
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.finish_outbound(peer, id, Err(OutboundFailure::ConnectionClosed));
        }
        let unanswered: Vec<_> = self
            .awaiting_answer
            .values()
            .filter(|route| route.connection == connection)
            .map(|route| route.id)
            .collect();
        for id in unanswered {
            self.awaiting_answer.remove(&id);
            self.emit(Event::InboundFailure {
                peer,
                request_id: id,
                error: InboundFailure::ConnectionClosed,
            });
        }
    }

    fn on_report(&mut self, peer: PeerId, connection: ConnectionId, report: Report) {
        match report {
            Report::Request {
                id,
                request,
                verdict,
            } => self.on_request(
                Route {
                    peer,
                    connection,
                    id,
                },
                request,
                verdict,
            ),
            Report::Answered { id, rpc } => self.emit(Event::ResponseSent {
                peer,
                request_id: id,
                rpc,
            }),
            Report::InboundFailed { id, error } => {
                self.awaiting_answer.remove(&id);
                self.emit(Event::InboundFailure {
                    peer,
                    request_id: id,
                    error,
                });
            }
            Report::Reply { id, reply } => {
                if self.outbound.contains_key(&id) {
                    self.finish_outbound(peer, id, Ok(reply));
                }
            }
            Report::OutboundFailed { id, error } => {
                if self.outbound.contains_key(&id) {
                    self.finish_outbound(peer, id, Err(error));
                }
            }
        }
    }

    fn remember_address(&mut self, peer: PeerId, addr: Multiaddr) {
        let addresses = match self.addresses.get_mut(&peer) {
            Some(addresses) => addresses,
            None => {
                self.addresses.insert(peer, Vec::new());
                self.addresses.get_mut(&peer).expect("just inserted")
            }
        };
        if !addresses.contains(&addr) {
            if addresses.len() == MAX_ADDRESSES_PER_PEER {
                addresses.remove(0);
            }
            addresses.push(addr);
        }
    }

    fn on_dial_failure(&mut self, peer: PeerId, error: String) {
        if self.connections.contains_key(&peer) {
            return;
        }
        let requests = self.awaiting_connection.remove(&peer).unwrap_or_default();
        for (_, request) in requests {
            let error = OutboundFailure::DialFailure(error.clone());
            self.finish_outbound(peer, request.id, Err(error));
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
        Ok(peer
            .and_then(|peer| self.addresses.get(&peer).cloned())
            .unwrap_or_default())
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::NewExternalAddrOfPeer(NewExternalAddrOfPeer { peer_id, addr }) => {
                self.remember_address(peer_id, addr.clone())
            }
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
        ToBehaviour(reports): THandlerOutEvent<Self>,
    ) {
        for report in reports {
            self.on_report(peer, connection, report);
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Poll::Ready(event);
            }
            self.poll_dial_deadlines(cx);
            if !self.pending.is_empty() {
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

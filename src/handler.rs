//! One handler per connection: drives every coord stream of that connection as an
//! explicit state machine and tells the behaviour what it read and what failed. It never
//! decides a response.
//!
//! | stream   | state              | what it waits for                  | deadline                                |
//! |----------|--------------------|------------------------------------|-----------------------------------------|
//! | inbound  | `Reading`          | the request frame                  | opened + handshake timeout (5 s)        |
//! | inbound  | `AwaitingResponse` | the behaviour's [`InboundResponse`] | read + answer timeout (2 s), at most the handshake deadline |
//! | inbound  | `Closing`          | the response written, or none      | the handshake deadline                  |
//! | outbound | `Writing`          | the request written, write side closed | the request's one budget            |
//! | outbound | `Reading`          | the response frame                 | the request's one budget                |
//!
//! A stream at its deadline ends; the [`StreamSet`] polls each stream only when its I/O
//! woke it or its deadline came.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Instant,
};

use futures::{channel::oneshot, AsyncRead, AsyncWrite, FutureExt};
use libp2p_core::upgrade::ReadyUpgrade;
use libp2p_identity::PeerId;
use libp2p_swarm::{
    handler::{ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound},
    ConnectionHandler, ConnectionHandlerEvent, Stream, StreamProtocol, StreamUpgradeError,
    SubstreamProtocol,
};

use crate::{
    budget::{StreamBudget, StreamPermit},
    codec::{FrameError, FrameReader, FrameWriter, ReadError},
    deadlines::DeadlineQueue,
    protocol::{decode_response, InboundRequest, Response, Rpc},
    stream_set::{Step, StreamMachine, StreamSet},
    time, wire, Config, InboundFailure, InboundRequestId, OutboundFailure, OutboundRequestId,
    PROTOCOL_NAME,
};

/// Events from the behaviour to a handler.
#[derive(Debug)]
pub enum HandlerIn {
    /// Open a stream and send this request on it.
    SendRequest(OutboundRequest),
}

/// What the behaviour decided for an inbound request. It goes straight to the waiting
/// stream through a oneshot, not through the swarm, so a response costs no extra hop.
#[derive(Debug)]
pub enum InboundResponse {
    /// Encode this response, write it and close. `send_response` checked it fits the cap.
    Send { rpc: Rpc, envelope: wire::Envelope },
    /// Close without a response.
    Reject(InboundFailure),
}

/// An outbound request on its way to a stream.
#[derive(Debug)]
pub struct OutboundRequest {
    pub(crate) id: OutboundRequestId,
    pub(crate) rpc: Rpc,
    pub(crate) frame: Vec<u8>,
    /// The frame carries delegated credentials, to be wiped once written.
    pub(crate) secret: bool,
    /// The end of the request's one budget, counted from when it was asked for: the
    /// dial, if any, already spent part of it.
    pub(crate) deadline: Instant,
}

/// Events from a handler to the behaviour, delivered in batches: each crossing from the
/// connection's task to the swarm's costs more than handling the event itself.
#[derive(Debug)]
pub struct HandlerEvents(pub(crate) Vec<HandlerEvent>);

/// A batch stops growing here, so the first event does not wait on too many more.
const MAX_BATCH: usize = 8;

/// One event from a handler to the behaviour.
#[derive(Debug)]
pub enum HandlerEvent {
    /// A request was read, valid or not; the behaviour owes the stream a response.
    InboundRequest {
        id: InboundRequestId,
        request: Result<InboundRequest, InboundFailure>,
        response: oneshot::Sender<InboundResponse>,
    },
    /// The response to an inbound request was written and the stream closed.
    ResponseSent { id: InboundRequestId, rpc: Rpc },
    /// An inbound stream ended without a response.
    InboundFailure {
        id: InboundRequestId,
        error: InboundFailure,
    },
    /// A response arrived and was decoded.
    Response {
        id: OutboundRequestId,
        response: Response,
    },
    /// An outbound request failed.
    OutboundFailure {
        id: OutboundRequestId,
        error: OutboundFailure,
    },
}

/// Names one stream of a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum StreamKey {
    Inbound(u64),
    Outbound(u64),
}

/// The connection handler of `/gantry/coord/1.0.0`.
pub struct Handler {
    peer: PeerId,
    config: Arc<Config>,
    budget: StreamBudget,
    next_inbound_id: Arc<AtomicU64>,
    streams: StreamSet<StreamKey, CoordStream>,
    /// Requests waiting for a stream slot, by id, in the order they came...
    pending_outbound: HashMap<OutboundRequestId, OutboundRequest>,
    pending_order: VecDeque<OutboundRequestId>,
    /// ...each failed at its deadline if no slot came first.
    pending_deadlines: DeadlineQueue<OutboundRequestId>,
    /// Outbound streams requested from the connection and not yet negotiated.
    opening: usize,
    /// Outbound streams in the set.
    open_outbound: usize,
    events: Vec<HandlerEvent>,
}

impl Handler {
    pub(crate) fn new(
        peer: PeerId,
        config: Arc<Config>,
        budget: StreamBudget,
        next_inbound_id: Arc<AtomicU64>,
    ) -> Self {
        Handler {
            peer,
            config,
            budget,
            next_inbound_id,
            streams: StreamSet::default(),
            pending_outbound: HashMap::new(),
            pending_order: VecDeque::new(),
            pending_deadlines: DeadlineQueue::default(),
            opening: 0,
            open_outbound: 0,
            events: Vec::new(),
        }
    }

    fn on_inbound_stream(&mut self, stream: Stream) {
        let id = InboundRequestId(self.next_inbound_id.fetch_add(1, Ordering::Relaxed));
        match self.budget.try_admit() {
            Ok(permit) => {
                let span = tracing::debug_span!("coord_inbound", peer = %self.peer, id = id.0);
                let inbound =
                    InboundStream::new(id, stream, time::now(), self.config.clone(), permit);
                self.streams.insert(
                    StreamKey::Inbound(id.0),
                    CoordStream::Inbound(inbound, span),
                );
            }
            Err(cap) => {
                // Dropping an open stream resets it: nothing is read.
                drop(stream);
                tracing::debug!(peer = %self.peer, ?cap, "inbound stream over the cap, reset");
                self.events.push(HandlerEvent::InboundFailure {
                    id,
                    error: InboundFailure::StreamCap(cap),
                });
            }
        }
    }

    fn on_outbound_stream(&mut self, stream: Stream, request: OutboundRequest) {
        self.opening -= 1;
        self.open_outbound += 1;
        tracing::trace!(peer = %self.peer, id = request.id.0, "stream negotiated");
        let span = tracing::debug_span!("coord_outbound", peer = %self.peer, id = request.id.0);
        let key = StreamKey::Outbound(request.id.0);
        let outbound = OutboundStream::new(request, stream, self.config.clone());
        self.streams
            .insert(key, CoordStream::Outbound(outbound, span));
    }

    fn on_dial_upgrade_error(
        &mut self,
        request: OutboundRequest,
        error: StreamUpgradeError<std::convert::Infallible>,
    ) {
        self.opening -= 1;
        let error = match error {
            StreamUpgradeError::Timeout => OutboundFailure::Timeout,
            StreamUpgradeError::NegotiationFailed => OutboundFailure::UnsupportedProtocols,
            StreamUpgradeError::Io(e) => OutboundFailure::Io(e),
            StreamUpgradeError::Apply(never) => match never {},
        };
        self.events.push(HandlerEvent::OutboundFailure {
            id: request.id,
            error,
        });
    }

    /// The oldest request still waiting for a slot; its deadline now rides on the stream.
    fn next_pending(&mut self) -> Option<OutboundRequest> {
        while let Some(id) = self.pending_order.pop_front() {
            // Ids of requests that already timed out are skipped.
            if let Some(request) = self.pending_outbound.remove(&id) {
                self.pending_deadlines.remove(id, request.deadline);
                return Some(request);
            }
        }
        None
    }

    fn flush_events(
        &mut self,
    ) -> ConnectionHandlerEvent<ReadyUpgrade<StreamProtocol>, OutboundRequest, HandlerEvents> {
        ConnectionHandlerEvent::NotifyBehaviour(HandlerEvents(std::mem::take(&mut self.events)))
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = HandlerIn;
    type ToBehaviour = HandlerEvents;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = OutboundRequest;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL_NAME), ())
    }

    fn on_behaviour_event(&mut self, HandlerIn::SendRequest(request): HandlerIn) {
        tracing::trace!(peer = %self.peer, id = request.id.0, "request queued");
        self.pending_deadlines.insert(request.id, request.deadline);
        self.pending_order.push_back(request.id);
        self.pending_outbound.insert(request.id, request);
    }

    fn connection_keep_alive(&self) -> bool {
        !self.streams.is_empty() || !self.pending_outbound.is_empty() || self.opening > 0
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, HandlerEvents>>
    {
        loop {
            // Local work first: streams for pending requests, then a full batch of events.
            let now = time::now();
            // A request that waited for a slot past its deadline fails then, not when a
            // slot frees.
            while let Poll::Ready((id, _)) = self.pending_deadlines.poll_expired(cx, now) {
                if self.pending_outbound.remove(&id).is_some() {
                    self.events.push(HandlerEvent::OutboundFailure {
                        id,
                        error: OutboundFailure::Timeout,
                    });
                }
            }
            // The ids of requests that timed out are dropped here, so the queue's order
            // never outgrows what still waits.
            if self.pending_order.len() > 2 * self.pending_outbound.len() + 64 {
                let waiting = &self.pending_outbound;
                self.pending_order.retain(|id| waiting.contains_key(id));
            }
            // Bounded, as every rust-libp2p protocol bounds them; the rest wait their turn.
            if self.opening + self.open_outbound < self.config.max_outbound_streams_per_connection {
                if let Some(request) = self.next_pending() {
                    self.opening += 1;
                    tracing::trace!(peer = %self.peer, id = request.id.0, "stream requested");
                    let timeout = request.deadline.saturating_duration_since(now);
                    let protocol =
                        SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL_NAME), request)
                            .with_timeout(timeout);
                    return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                        protocol,
                    });
                }
            }
            if self.events.len() >= MAX_BATCH {
                return Poll::Ready(self.flush_events());
            }
            match self.streams.poll_next(cx, now) {
                Poll::Ready((key, step)) => {
                    let event = match step {
                        Step::Done(event) if matches!(key, StreamKey::Outbound(_)) => {
                            self.open_outbound -= 1;
                            event
                        }
                        Step::Progress(event) | Step::Done(event) => event,
                    };
                    self.events.push(event);
                }
                Poll::Pending if self.events.is_empty() => return Poll::Pending,
                Poll::Pending => return Poll::Ready(self.flush_events()),
            }
        }
    }

    fn poll_close(&mut self, _: &mut Context<'_>) -> Poll<Option<HandlerEvents>> {
        // What the streams reported before the connection went is still delivered.
        Poll::Ready(
            (!self.events.is_empty()).then(|| HandlerEvents(std::mem::take(&mut self.events))),
        )
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), OutboundRequest>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: stream,
                ..
            }) => self.on_inbound_stream(stream),
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                info,
            }) => self.on_outbound_stream(stream, info),
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info, error }) => {
                self.on_dial_upgrade_error(info, error)
            }
            _ => {}
        }
    }
}

/// Either direction, each polled within its tracing span.
enum CoordStream<Io = Stream> {
    Inbound(InboundStream<Io>, tracing::Span),
    Outbound(OutboundStream<Io>, tracing::Span),
}

impl<Io: AsyncRead + AsyncWrite + Unpin> StreamMachine for CoordStream<Io> {
    type Output = HandlerEvent;

    fn poll(&mut self, cx: &mut Context<'_>, now: Instant) -> Poll<Step<HandlerEvent>> {
        match self {
            CoordStream::Inbound(stream, span) => span.in_scope(|| stream.poll(cx, now)),
            CoordStream::Outbound(stream, span) => {
                span.in_scope(|| stream.poll(cx, now).map(Step::Done))
            }
        }
    }

    fn deadline(&self) -> Instant {
        match self {
            CoordStream::Inbound(stream, _) => stream.deadline(),
            CoordStream::Outbound(stream, _) => stream.deadline,
        }
    }
}

/// An inbound stream: reading the request, awaiting the behaviour's response, then
/// writing it (or nothing, to reject) and closing.
struct InboundStream<Io> {
    id: InboundRequestId,
    io: Io,
    state: InboundState,
    /// The handshake deadline: the whole exchange, from the stream's opening.
    handshake_deadline: Instant,
    config: Arc<Config>,
    _permit: Option<StreamPermit>,
}

enum InboundState {
    Reading(FrameReader),
    AwaitingResponse {
        respond_by: Instant,
        response: oneshot::Receiver<InboundResponse>,
    },
    /// Writing the response (or nothing, to reject) and closing.
    Closing {
        writer: FrameWriter,
        outcome: ClosingOutcome,
    },
}

/// How a closing inbound stream ends.
enum ClosingOutcome {
    ResponseSent(Rpc),
    Rejected(InboundFailure),
}

impl<Io: AsyncRead + AsyncWrite + Unpin> InboundStream<Io> {
    fn new(
        id: InboundRequestId,
        io: Io,
        opened: Instant,
        config: Arc<Config>,
        permit: impl Into<Option<StreamPermit>>,
    ) -> Self {
        InboundStream {
            id,
            io,
            state: InboundState::Reading(FrameReader::default()),
            handshake_deadline: opened + config.handshake_timeout,
            config,
            _permit: permit.into(),
        }
    }

    fn deadline(&self) -> Instant {
        match self.state {
            InboundState::AwaitingResponse { respond_by, .. } => {
                respond_by.min(self.handshake_deadline)
            }
            _ => self.handshake_deadline,
        }
    }

    fn close_without_response(&mut self, reason: InboundFailure) {
        tracing::debug!(%reason, "closing inbound stream without a response");
        self.state = InboundState::Closing {
            writer: FrameWriter::close_only(),
            outcome: ClosingOutcome::Rejected(reason),
        };
    }

    fn failed(&self, error: InboundFailure) -> Poll<Step<HandlerEvent>> {
        Poll::Ready(Step::Done(HandlerEvent::InboundFailure {
            id: self.id,
            error,
        }))
    }

    fn poll(&mut self, cx: &mut Context<'_>, now: Instant) -> Poll<Step<HandlerEvent>> {
        loop {
            if now >= self.handshake_deadline {
                let error = match &self.state {
                    InboundState::Closing {
                        outcome: ClosingOutcome::Rejected(reason),
                        ..
                    } => reason.clone(),
                    _ => InboundFailure::Timeout,
                };
                return self.failed(error);
            }
            match &mut self.state {
                InboundState::Reading(reader) => {
                    let max = self.config.max_message_bytes;
                    match futures::ready!(reader.poll_read(&mut self.io, cx, max)) {
                        Ok((envelope, len)) => {
                            // An invalid request goes up too: the behaviour authorizes the
                            // peer before the request's validity counts.
                            let request = InboundRequest::from_wire(envelope, len);
                            tracing::trace!(?request, "request read");
                            let (response, receiver) = oneshot::channel();
                            self.state = InboundState::AwaitingResponse {
                                respond_by: now + self.config.answer_timeout,
                                response: receiver,
                            };
                            return Poll::Ready(Step::Progress(HandlerEvent::InboundRequest {
                                id: self.id,
                                request,
                                response,
                            }));
                        }
                        Err(ReadError::Closed) => self.close_without_response(
                            InboundFailure::Malformed(FrameError::Truncated),
                        ),
                        Err(ReadError::Frame(error)) => {
                            self.close_without_response(InboundFailure::from(error))
                        }
                        Err(ReadError::Io(error)) => {
                            return self.failed(InboundFailure::Io(error.kind()))
                        }
                    }
                }
                InboundState::AwaitingResponse {
                    respond_by,
                    response,
                } => {
                    if now >= *respond_by {
                        return self.failed(InboundFailure::AnswerTimeout);
                    }
                    match futures::ready!(response.poll_unpin(cx)) {
                        Ok(InboundResponse::Send { rpc, envelope }) => {
                            self.state = InboundState::Closing {
                                writer: FrameWriter::new(
                                    prost::Message::encode_length_delimited_to_vec(&envelope),
                                ),
                                outcome: ClosingOutcome::ResponseSent(rpc),
                            };
                        }
                        Ok(InboundResponse::Reject(reason)) => self.close_without_response(reason),
                        Err(oneshot::Canceled) => {
                            self.close_without_response(InboundFailure::ResponseOmission)
                        }
                    }
                }
                InboundState::Closing { writer, outcome } => {
                    let written = futures::ready!(writer.poll_write_and_close(&mut self.io, cx));
                    let event = match (outcome, written) {
                        (ClosingOutcome::Rejected(reason), _) => HandlerEvent::InboundFailure {
                            id: self.id,
                            error: reason.clone(),
                        },
                        (ClosingOutcome::ResponseSent(rpc), Ok(())) => {
                            tracing::trace!(?rpc, "response written");
                            HandlerEvent::ResponseSent {
                                id: self.id,
                                rpc: *rpc,
                            }
                        }
                        (ClosingOutcome::ResponseSent(_), Err(error)) => {
                            HandlerEvent::InboundFailure {
                                id: self.id,
                                error: InboundFailure::Io(error.kind()),
                            }
                        }
                    };
                    return Poll::Ready(Step::Done(event));
                }
            }
        }
    }
}

/// An outbound stream: writing the request and half-closing, then reading the response.
struct OutboundStream<Io> {
    id: OutboundRequestId,
    rpc: Rpc,
    io: Io,
    state: OutboundState,
    deadline: Instant,
    config: Arc<Config>,
}

enum OutboundState {
    Writing(FrameWriter),
    Reading(FrameReader),
}

impl<Io: AsyncRead + AsyncWrite + Unpin> OutboundStream<Io> {
    fn new(request: OutboundRequest, io: Io, config: Arc<Config>) -> Self {
        OutboundStream {
            id: request.id,
            rpc: request.rpc,
            io,
            state: OutboundState::Writing(if request.secret {
                FrameWriter::secret(request.frame)
            } else {
                FrameWriter::new(request.frame)
            }),
            deadline: request.deadline,
            config,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>, now: Instant) -> Poll<HandlerEvent> {
        let failed = |error| Poll::Ready(HandlerEvent::OutboundFailure { id: self.id, error });
        if now >= self.deadline {
            return failed(OutboundFailure::Timeout);
        }
        loop {
            match &mut self.state {
                OutboundState::Writing(writer) => {
                    match futures::ready!(writer.poll_write_and_close(&mut self.io, cx)) {
                        Ok(()) => {
                            tracing::trace!("request written");
                            self.state = OutboundState::Reading(FrameReader::default());
                        }
                        Err(error) => return failed(OutboundFailure::Io(error)),
                    }
                }
                OutboundState::Reading(reader) => {
                    let max = self.config.max_message_bytes;
                    return match futures::ready!(reader.poll_read(&mut self.io, cx, max)) {
                        Ok((envelope, _)) => {
                            tracing::trace!("response read");
                            match decode_response(self.rpc, envelope, self.config.max_cooldown) {
                                Ok(response) => Poll::Ready(HandlerEvent::Response {
                                    id: self.id,
                                    response,
                                }),
                                Err(error) => failed(error),
                            }
                        }
                        Err(ReadError::Closed) => failed(OutboundFailure::NoResponse),
                        Err(ReadError::Frame(error)) => {
                            failed(OutboundFailure::MalformedResponse(error))
                        }
                        Err(ReadError::Io(error)) => failed(OutboundFailure::Io(error)),
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The stream state machines on simulated time, over an in-memory stream.

    use std::{
        io,
        pin::Pin,
        time::{Duration, SystemTime},
    };

    use futures::task::noop_waker;

    use super::*;
    use crate::{protocol, Digest, PullIntent};

    /// One side of a stream: reads what the test queued, then waits (or ends, once the
    /// test closes it); keeps what was written.
    #[derive(Default)]
    struct MemoryIo {
        input: Vec<u8>,
        read: usize,
        input_closed: bool,
        output: Vec<u8>,
        output_closed: bool,
    }

    impl AsyncRead for MemoryIo {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let rest = &self.input[self.read..];
            if rest.is_empty() {
                return if self.input_closed {
                    Poll::Ready(Ok(0))
                } else {
                    Poll::Pending
                };
            }
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            self.read += n;
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for MemoryIo {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.output.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.output_closed = true;
            Poll::Ready(Ok(()))
        }
    }

    fn config() -> Arc<Config> {
        Arc::new(Config::default())
    }

    fn digest() -> Digest {
        Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap()
    }

    fn poll_inbound(
        stream: &mut InboundStream<MemoryIo>,
        now: Instant,
    ) -> Poll<Step<HandlerEvent>> {
        stream.poll(&mut Context::from_waker(&noop_waker()), now)
    }

    fn inbound(t0: Instant) -> InboundStream<MemoryIo> {
        InboundStream::new(InboundRequestId(1), MemoryIo::default(), t0, config(), None)
    }

    /// A stream opened at `t0` whose pull_intent request has been read at `t0`.
    fn read_request(t0: Instant) -> (InboundStream<MemoryIo>, oneshot::Sender<InboundResponse>) {
        let mut stream = inbound(t0);
        stream.io.input = protocol::pull_intent_request(&digest()).encode_length_delimited_to_vec();
        let Poll::Ready(Step::Progress(HandlerEvent::InboundRequest { response, .. })) =
            poll_inbound(&mut stream, t0)
        else {
            panic!("the request is read");
        };
        (stream, response)
    }

    #[test]
    fn a_silent_peer_is_cut_off_at_the_handshake_deadline() {
        let t0 = Instant::now();
        let mut stream = inbound(t0);
        assert!(poll_inbound(&mut stream, t0).is_pending());
        assert_eq!(stream.deadline(), t0 + Duration::from_secs(5));
        assert!(poll_inbound(&mut stream, t0 + Duration::from_millis(4_999)).is_pending());
        assert!(matches!(
            poll_inbound(&mut stream, t0 + Duration::from_secs(5)),
            Poll::Ready(Step::Done(HandlerEvent::InboundFailure {
                error: InboundFailure::Timeout,
                ..
            }))
        ));
    }

    #[test]
    fn a_request_waits_for_its_response_until_the_answer_deadline() {
        let t0 = Instant::now();
        let mut stream = inbound(t0);
        stream.io.input = protocol::pull_intent_request(&digest()).encode_length_delimited_to_vec();
        let read = t0 + Duration::from_secs(1);
        let Poll::Ready(Step::Progress(HandlerEvent::InboundRequest {
            request, response, ..
        })) = poll_inbound(&mut stream, read)
        else {
            panic!("the request is read");
        };
        assert!(matches!(request, Ok(InboundRequest::PullIntent(d)) if d == digest()));
        // The answer deadline is 2 s after the read, within the 5 s handshake deadline.
        assert_eq!(stream.deadline(), read + Duration::from_secs(2));
        assert!(poll_inbound(&mut stream, read + Duration::from_millis(1_999)).is_pending());
        assert!(matches!(
            poll_inbound(&mut stream, read + Duration::from_secs(2)),
            Poll::Ready(Step::Done(HandlerEvent::InboundFailure {
                error: InboundFailure::AnswerTimeout,
                ..
            }))
        ));
        drop(response);
    }

    #[test]
    fn a_response_is_written_and_the_stream_closed() {
        let t0 = Instant::now();
        let (mut stream, response) = read_request(t0);
        let envelope = protocol::pull_intent_response(PullIntent::UNKNOWN);
        response
            .send(InboundResponse::Send {
                rpc: Rpc::PullIntent,
                envelope: envelope.clone(),
            })
            .unwrap();
        assert!(matches!(
            poll_inbound(&mut stream, t0 + Duration::from_millis(10)),
            Poll::Ready(Step::Done(HandlerEvent::ResponseSent {
                rpc: Rpc::PullIntent,
                ..
            }))
        ));
        assert_eq!(stream.io.output, envelope.encode_length_delimited_to_vec());
        assert!(stream.io.output_closed);
    }

    #[test]
    fn a_dropped_responder_closes_without_a_response() {
        let t0 = Instant::now();
        let (mut stream, response) = read_request(t0);
        drop(response);
        assert!(matches!(
            poll_inbound(&mut stream, t0),
            Poll::Ready(Step::Done(HandlerEvent::InboundFailure {
                error: InboundFailure::ResponseOmission,
                ..
            }))
        ));
        assert!(stream.io.output.is_empty() && stream.io.output_closed);
    }

    fn outbound(deadline: Instant) -> OutboundStream<MemoryIo> {
        let frame = protocol::pull_intent_request(&digest()).encode_length_delimited_to_vec();
        let request = OutboundRequest {
            id: OutboundRequestId(9),
            rpc: Rpc::PullIntent,
            frame,
            secret: false,
            deadline,
        };
        OutboundStream::new(request, MemoryIo::default(), config())
    }

    fn poll_outbound(stream: &mut OutboundStream<MemoryIo>, now: Instant) -> Poll<HandlerEvent> {
        stream.poll(&mut Context::from_waker(&noop_waker()), now)
    }

    #[test]
    fn an_outbound_request_ends_at_its_one_deadline() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_millis(1_500);
        let mut stream = outbound(deadline);
        assert!(poll_outbound(&mut stream, t0).is_pending());
        assert!(
            stream.io.output_closed,
            "request written and write side closed"
        );
        assert!(poll_outbound(&mut stream, deadline - Duration::from_millis(1)).is_pending());
        assert!(matches!(
            poll_outbound(&mut stream, deadline),
            Poll::Ready(HandlerEvent::OutboundFailure {
                error: OutboundFailure::Timeout,
                ..
            })
        ));
    }

    #[test]
    fn an_outbound_request_reads_its_response_or_no_response() {
        let t0 = Instant::now();
        let mut stream = outbound(t0 + Duration::from_secs(2));
        stream.io.input = protocol::pull_intent_response(PullIntent {
            has_cached: true,
            in_flight_since: Some(SystemTime::UNIX_EPOCH),
            hrw_rank: Some(2),
            recently_failed: None,
        })
        .encode_length_delimited_to_vec();
        match poll_outbound(&mut stream, t0) {
            Poll::Ready(HandlerEvent::Response {
                response: Response::PullIntent(intent),
                ..
            }) => {
                assert!(intent.has_cached);
                assert_eq!(intent.hrw_rank, Some(2));
            }
            other => panic!("unexpected {other:?}"),
        }

        let mut stream = outbound(t0 + Duration::from_secs(2));
        stream.io.input_closed = true;
        assert!(matches!(
            poll_outbound(&mut stream, t0),
            Poll::Ready(HandlerEvent::OutboundFailure {
                error: OutboundFailure::NoResponse,
                ..
            })
        ));
    }

    use prost::Message as _;

    /// A handler whose connection opens at most one outbound stream at a time.
    fn one_slot_handler() -> Handler {
        use std::sync::atomic::AtomicUsize;
        let config = Config::default().with_max_outbound_streams_per_connection(1);
        let budget = StreamBudget::new(
            Arc::new(AtomicUsize::new(0)),
            16,
            Arc::new(AtomicUsize::new(0)),
            16,
        );
        Handler::new(PeerId::random(), Arc::new(config), budget, Arc::default())
    }

    fn queued(id: u64, deadline: Instant) -> OutboundRequest {
        OutboundRequest {
            id: OutboundRequestId(id),
            rpc: Rpc::PullIntent,
            frame: Vec::new(),
            secret: false,
            deadline,
        }
    }

    #[test]
    fn a_request_waiting_for_a_slot_fails_at_its_deadline_not_when_a_slot_frees() {
        let mut handler = one_slot_handler();
        let soon = time::now() + Duration::from_millis(40);
        handler.on_behaviour_event(HandlerIn::SendRequest(queued(
            1,
            soon + Duration::from_secs(9),
        )));
        handler.on_behaviour_event(HandlerIn::SendRequest(queued(2, soon)));
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let opened = handler.poll(&mut cx);
        assert!(matches!(
            opened,
            Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { .. })
        ));
        assert!(handler.poll(&mut cx).is_pending(), "the one slot is taken");
        // The first stream never opens; the second's deadline alone must wake the task.
        let started = Instant::now();
        let event = futures::executor::block_on(async {
            futures::select! {
                event = futures::future::poll_fn(|cx| handler.poll(cx)).fuse() => Some(event),
                () = futures_timer::Delay::new(Duration::from_secs(3)).fuse() => None,
            }
        });
        let Some(ConnectionHandlerEvent::NotifyBehaviour(HandlerEvents(events))) = event else {
            panic!("no wake-up at the deadline");
        };
        assert!(matches!(
            events.as_slice(),
            [HandlerEvent::OutboundFailure {
                id: OutboundRequestId(2),
                error: OutboundFailure::Timeout
            }]
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(handler.pending_outbound.is_empty());
    }

    #[test]
    fn a_request_queued_past_its_deadline_on_simulated_time_fails_at_the_next_poll() {
        let mut handler = one_slot_handler();
        let far = time::now() + Duration::from_secs(60);
        handler.on_behaviour_event(HandlerIn::SendRequest(queued(
            1,
            far + Duration::from_secs(60),
        )));
        handler.on_behaviour_event(HandlerIn::SendRequest(queued(2, far)));
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(handler.poll(&mut cx).is_ready(), "the first takes the slot");
        assert!(handler.poll(&mut cx).is_pending());
        time::advance(Duration::from_secs(61));
        let Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(HandlerEvents(events))) =
            handler.poll(&mut cx)
        else {
            panic!("the second request did not time out");
        };
        assert_eq!(events.len(), 1);
    }
}

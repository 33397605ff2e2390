//! One handler per connection: drives every coord stream of that connection as an
//! explicit state machine, each with its deadline, and reports to the behaviour what it
//! read and what failed. It never decides an answer.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Instant,
};

use futures::{channel::oneshot, FutureExt};
use libp2p_core::upgrade::ReadyUpgrade;
use libp2p_identity::PeerId;
use libp2p_swarm::{
    handler::{ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound},
    ConnectionHandler, ConnectionHandlerEvent, Stream, StreamUpgradeError, SubstreamProtocol,
};

use crate::{
    budget::{StreamBudget, StreamPermit},
    client,
    codec::{FrameError, FrameReader, FrameWriter, ReadError},
    message::{decode_reply, RequestRejection, WireRequest},
    schedule::{Schedule, StreamKey},
    wire, Config, InboundFailure, InboundRequestId, OutboundFailure, OutboundRequestId, Rpc,
    PROTOCOL_NAME,
};

/// Commands from the behaviour.
#[derive(Debug)]
pub enum FromBehaviour {
    /// Send an encoded request frame.
    Send(OutboundRequest),
}

/// What becomes of an inbound request once it is read. It goes straight to the waiting
/// stream, not through the swarm, so an answer costs no extra hop.
#[derive(Debug)]
pub enum Verdict {
    /// Encode this reply, write it and close. `respond` has checked it fits the cap.
    Reply { rpc: Rpc, envelope: wire::Envelope },
    /// Close without a reply.
    Reject(InboundFailure),
}

/// An outbound request on its way to a stream.
#[derive(Debug)]
pub struct OutboundRequest {
    pub(crate) id: OutboundRequestId,
    pub(crate) rpc: Rpc,
    pub(crate) frame: Vec<u8>,
    /// The end of the request's one budget, counted from when it was asked for: the
    /// dial, if any, already spent part of it.
    pub(crate) deadline: Instant,
}

/// Reports to the behaviour, delivered in batches: each crossing from the connection's
/// task to the swarm's costs more than handling the report itself.
#[derive(Debug)]
pub struct ToBehaviour(pub(crate) Vec<Report>);

/// Reports in a batch stop growing here, so the first does not wait on too many more.
const MAX_BATCH: usize = 8;

/// One report to the behaviour.
#[derive(Debug)]
pub enum Report {
    /// A request was read, or found invalid; the behaviour owes a verdict.
    Request {
        id: InboundRequestId,
        request: Result<WireRequest, InboundFailure>,
        verdict: oneshot::Sender<Verdict>,
    },
    /// The reply to an inbound request was written and the stream closed.
    Answered { id: InboundRequestId, rpc: Rpc },
    /// An inbound stream ended without a normal reply.
    InboundFailed {
        id: InboundRequestId,
        error: InboundFailure,
    },
    /// A reply arrived and was decoded.
    Reply {
        id: OutboundRequestId,
        reply: client::Reply,
    },
    /// An outbound request failed.
    OutboundFailed {
        id: OutboundRequestId,
        error: OutboundFailure,
    },
}

/// The connection handler of `/gantry/coord/1.0.0`.
pub struct Handler {
    peer: PeerId,
    config: Arc<Config>,
    budget: StreamBudget,
    next_inbound_id: Arc<AtomicU64>,
    inbound: HashMap<u64, InboundStream>,
    outbound: HashMap<u64, OutboundStream>,
    /// Requests waiting for a stream to be opened for them, with their deadlines.
    queued: VecDeque<(OutboundRequest, Instant)>,
    /// Streams requested from the connection and not yet negotiated.
    opening: usize,
    reports: Vec<Report>,
    /// Which streams to poll next, and the one timer for all their deadlines.
    schedule: Schedule,
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
            inbound: HashMap::new(),
            outbound: HashMap::new(),
            queued: VecDeque::new(),
            opening: 0,
            reports: Vec::new(),
            schedule: Schedule::default(),
        }
    }

    fn on_inbound_stream(&mut self, stream: Stream) {
        let id = InboundRequestId(self.next_inbound_id.fetch_add(1, Ordering::Relaxed));
        match self.budget.try_admit() {
            Ok(permit) => {
                let key = StreamKey::Inbound(id.0);
                let deadline = Instant::now() + self.config.handshake_timeout;
                self.inbound.insert(
                    id.0,
                    InboundStream {
                        id,
                        stream,
                        state: InboundState::Reading(FrameReader::default()),
                        deadline,
                        armed: Some(deadline),
                        waker: self.schedule.waker(key),
                        span: tracing::debug_span!("coord_inbound", peer = %self.peer, id = id.0),
                        _permit: permit,
                    },
                );
                self.schedule.reschedule(key, None, Some(deadline));
                self.schedule.wake(key);
            }
            Err(cap) => {
                // Dropping an open stream resets it: nothing is read.
                drop(stream);
                tracing::debug!(peer = %self.peer, ?cap, "inbound stream over the cap, reset");
                self.reports.push(Report::InboundFailed {
                    id,
                    error: InboundFailure::StreamCap(cap),
                });
            }
        }
    }

    fn on_outbound_stream(
        &mut self,
        stream: Stream,
        (request, deadline): (OutboundRequest, Instant),
    ) {
        self.opening -= 1;
        tracing::trace!(peer = %self.peer, id = request.id.0, "stream negotiated");
        let key = StreamKey::Outbound(request.id.0);
        self.outbound.insert(
            request.id.0,
            OutboundStream {
                id: request.id,
                rpc: request.rpc,
                stream,
                state: OutboundState::Writing(FrameWriter::new(request.frame)),
                deadline,
                waker: self.schedule.waker(key),
                span: tracing::debug_span!("coord_outbound", peer = %self.peer, id = request.id.0),
            },
        );
        self.schedule.reschedule(key, None, Some(deadline));
        self.schedule.wake(key);
    }

    fn on_dial_upgrade_error(
        &mut self,
        (request, _): (OutboundRequest, Instant),
        error: StreamUpgradeError<std::convert::Infallible>,
    ) {
        self.opening -= 1;
        let error = match error {
            StreamUpgradeError::Timeout => OutboundFailure::Timeout,
            StreamUpgradeError::NegotiationFailed => OutboundFailure::UnsupportedProtocols,
            StreamUpgradeError::Io(e) => OutboundFailure::Io(e),
            StreamUpgradeError::Apply(never) => match never {},
        };
        self.reports.push(Report::OutboundFailed {
            id: request.id,
            error,
        });
    }

    fn flush_reports(
        &mut self,
    ) -> ConnectionHandlerEvent<
        ReadyUpgrade<libp2p_swarm::StreamProtocol>,
        (OutboundRequest, Instant),
        ToBehaviour,
    > {
        ConnectionHandlerEvent::NotifyBehaviour(ToBehaviour(std::mem::take(&mut self.reports)))
    }

    /// Polls one stream that is due, queueing what it reports and dropping it once done.
    fn poll_stream(&mut self, key: StreamKey, now: Instant) {
        match key {
            StreamKey::Inbound(id) => {
                let Some(stream) = self.inbound.get_mut(&id) else {
                    return;
                };
                let _entered = stream.span.clone().entered();
                let waker = stream.waker.clone();
                let mut cx = Context::from_waker(&waker);
                let step = stream.poll(&mut cx, now, &self.config);
                let armed = stream.armed;
                match step {
                    Poll::Ready(InboundStep::Done(event)) => {
                        self.schedule.reschedule(key, armed, None);
                        self.inbound.remove(&id);
                        self.reports.push(event);
                    }
                    step => {
                        let next = stream.next_deadline();
                        stream.armed = Some(next);
                        self.schedule.reschedule(key, armed, Some(next));
                        if let Poll::Ready(InboundStep::Read(request, verdict)) = step {
                            // Poll it again so it waits on its verdict with its own waker.
                            self.schedule.wake(key);
                            self.reports.push(Report::Request {
                                id: stream.id,
                                request,
                                verdict,
                            });
                        }
                    }
                }
            }
            StreamKey::Outbound(id) => {
                let Some(stream) = self.outbound.get_mut(&id) else {
                    return;
                };
                let _entered = stream.span.clone().entered();
                let waker = stream.waker.clone();
                let mut cx = Context::from_waker(&waker);
                if let Poll::Ready(event) = stream.poll(&mut cx, now, &self.config) {
                    self.schedule.reschedule(key, Some(stream.deadline), None);
                    self.outbound.remove(&id);
                    self.reports.push(event);
                }
            }
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = FromBehaviour;
    type ToBehaviour = ToBehaviour;
    type InboundProtocol = ReadyUpgrade<libp2p_swarm::StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<libp2p_swarm::StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = (OutboundRequest, Instant);

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL_NAME), ())
    }

    fn on_behaviour_event(&mut self, event: FromBehaviour) {
        match event {
            FromBehaviour::Send(request) => {
                tracing::trace!(peer = %self.peer, id = request.id.0, "request queued");
                let deadline = request.deadline;
                self.queued.push_back((request, deadline));
            }
        }
    }

    fn connection_keep_alive(&self) -> bool {
        !self.inbound.is_empty()
            || !self.outbound.is_empty()
            || !self.queued.is_empty()
            || self.opening > 0
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, ToBehaviour>>
    {
        loop {
            // Local work first: streams for queued requests, then a full batch of reports.
            let now = Instant::now();
            if let Some((request, deadline)) = self.queued.pop_front() {
                if deadline <= now {
                    self.reports.push(Report::OutboundFailed {
                        id: request.id,
                        error: OutboundFailure::Timeout,
                    });
                    continue;
                }
                self.opening += 1;
                tracing::trace!(peer = %self.peer, id = request.id.0, "stream requested");
                let protocol =
                    SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL_NAME), (request, deadline))
                        .with_timeout(deadline - now);
                return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol });
            }

            if self.reports.len() >= MAX_BATCH {
                return Poll::Ready(self.flush_reports());
            }
            match self.schedule.poll_next_due(cx) {
                // A fresh `now`: the deadline that made the stream due may be later than
                // the one read at the top of the loop.
                Poll::Ready(key) => self.poll_stream(key, Instant::now()),
                Poll::Pending if self.reports.is_empty() => return Poll::Pending,
                Poll::Pending => return Poll::Ready(self.flush_reports()),
            }
        }
    }

    fn poll_close(&mut self, _: &mut Context<'_>) -> Poll<Option<ToBehaviour>> {
        // What the streams reported before the connection went is still delivered.
        Poll::Ready(
            (!self.reports.is_empty()).then(|| ToBehaviour(std::mem::take(&mut self.reports))),
        )
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            (),
            Self::OutboundOpenInfo,
        >,
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

/// An inbound stream: reading the request, awaiting the loop's answer, then writing the
/// reply (or only closing, to reject) and closing.
struct InboundStream {
    id: InboundRequestId,
    stream: Stream,
    state: InboundState,
    /// The handshake deadline: the whole exchange, from the stream's opening.
    deadline: Instant,
    /// The deadline registered with the schedule.
    armed: Option<Instant>,
    waker: std::task::Waker,
    span: tracing::Span,
    _permit: StreamPermit,
}

enum InboundState {
    Reading(FrameReader),
    AwaitingAnswer {
        answer_by: Instant,
        verdict: oneshot::Receiver<Verdict>,
    },
    /// Writing the reply (or nothing, to reject) and closing.
    Closing {
        writer: FrameWriter,
        ending: Ending,
    },
}

/// How an inbound stream that is closing ends.
enum Ending {
    Replied(Rpc),
    Rejected(InboundFailure),
}

enum InboundStep {
    /// A request was read, valid or not; the stream now waits for its verdict.
    Read(
        Result<WireRequest, InboundFailure>,
        oneshot::Sender<Verdict>,
    ),
    /// The stream is finished.
    Done(Report),
}

impl InboundStream {
    fn next_deadline(&self) -> Instant {
        match self.state {
            InboundState::AwaitingAnswer { answer_by, .. } => answer_by.min(self.deadline),
            _ => self.deadline,
        }
    }

    fn close_without_reply(&mut self, reason: InboundFailure) {
        tracing::debug!(%reason, "closing inbound stream without a reply");
        self.state = InboundState::Closing {
            writer: FrameWriter::close_only(),
            ending: Ending::Rejected(reason),
        };
    }

    fn done(&self, error: InboundFailure) -> Poll<InboundStep> {
        Poll::Ready(InboundStep::Done(Report::InboundFailed {
            id: self.id,
            error,
        }))
    }

    fn poll(&mut self, cx: &mut Context<'_>, now: Instant, config: &Config) -> Poll<InboundStep> {
        loop {
            if now >= self.deadline {
                let error = match &self.state {
                    InboundState::Closing {
                        ending: Ending::Rejected(reason),
                        ..
                    } => reason.clone(),
                    _ => InboundFailure::Timeout,
                };
                return self.done(error);
            }
            match &mut self.state {
                InboundState::Reading(reader) => {
                    match reader.poll_read(&mut self.stream, cx, config.max_message_bytes) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok((envelope, len))) => {
                            // An invalid request goes up too: the behaviour authorizes the
                            // peer before the request's validity counts.
                            let request = WireRequest::from_wire(envelope, len).map_err(Into::into);
                            tracing::trace!(?request, "request read");
                            let (verdict, receiver) = oneshot::channel();
                            self.state = InboundState::AwaitingAnswer {
                                answer_by: now + config.answer_timeout,
                                verdict: receiver,
                            };
                            return Poll::Ready(InboundStep::Read(request, verdict));
                        }
                        Poll::Ready(Err(ReadError::Closed)) => self
                            .close_without_reply(InboundFailure::Malformed(FrameError::Truncated)),
                        Poll::Ready(Err(ReadError::Frame(error))) => {
                            self.close_without_reply(InboundFailure::from(error))
                        }
                        Poll::Ready(Err(ReadError::Io(error))) => {
                            return self.done(InboundFailure::Io(error.kind()))
                        }
                    }
                }
                InboundState::AwaitingAnswer { answer_by, verdict } => {
                    if now >= *answer_by {
                        return self.done(InboundFailure::AnswerTimeout);
                    }
                    match verdict.poll_unpin(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(Verdict::Reply { rpc, envelope })) => {
                            self.state = InboundState::Closing {
                                writer: FrameWriter::new(
                                    prost::Message::encode_length_delimited_to_vec(&envelope),
                                ),
                                ending: Ending::Replied(rpc),
                            };
                        }
                        Poll::Ready(Ok(Verdict::Reject(reason))) => {
                            self.close_without_reply(reason)
                        }
                        Poll::Ready(Err(oneshot::Canceled)) => {
                            self.close_without_reply(InboundFailure::Unanswered)
                        }
                    }
                }
                InboundState::Closing { writer, ending } => {
                    let result = futures::ready!(writer.poll_write_and_close(&mut self.stream, cx));
                    let event = match (ending, result) {
                        (Ending::Rejected(reason), _) => Report::InboundFailed {
                            id: self.id,
                            error: reason.clone(),
                        },
                        (Ending::Replied(rpc), Ok(())) => {
                            tracing::trace!(?rpc, "reply written");
                            Report::Answered {
                                id: self.id,
                                rpc: *rpc,
                            }
                        }
                        (Ending::Replied(_), Err(error)) => Report::InboundFailed {
                            id: self.id,
                            error: InboundFailure::Io(error.kind()),
                        },
                    };
                    return Poll::Ready(InboundStep::Done(event));
                }
            }
        }
    }
}

impl From<RequestRejection> for InboundFailure {
    fn from(rejection: RequestRejection) -> Self {
        match rejection {
            RequestRejection::Empty => InboundFailure::EmptyEnvelope,
            RequestRejection::WrongBody => InboundFailure::UnexpectedBody,
            RequestRejection::InvalidDigest(error) => InboundFailure::InvalidDigest(error),
            RequestRejection::MissingOrigin => InboundFailure::MissingOrigin,
        }
    }
}

/// An outbound stream: writing the request and half-closing, then reading the reply.
struct OutboundStream {
    id: OutboundRequestId,
    rpc: Rpc,
    stream: Stream,
    state: OutboundState,
    deadline: Instant,
    waker: std::task::Waker,
    span: tracing::Span,
}

enum OutboundState {
    Writing(FrameWriter),
    Reading(FrameReader),
}

impl OutboundStream {
    fn poll(&mut self, cx: &mut Context<'_>, now: Instant, config: &Config) -> Poll<Report> {
        let failed = |error| Poll::Ready(Report::OutboundFailed { id: self.id, error });
        if now >= self.deadline {
            return failed(OutboundFailure::Timeout);
        }
        loop {
            match &mut self.state {
                OutboundState::Writing(writer) => {
                    match futures::ready!(writer.poll_write_and_close(&mut self.stream, cx)) {
                        Ok(()) => {
                            tracing::trace!("request written");
                            self.state = OutboundState::Reading(FrameReader::default());
                        }
                        Err(error) => return failed(OutboundFailure::Io(error)),
                    }
                }
                OutboundState::Reading(reader) => {
                    let max = config.max_message_bytes;
                    return match futures::ready!(reader.poll_read(&mut self.stream, cx, max)) {
                        Ok((envelope, _)) => {
                            tracing::trace!("reply read");
                            match decode_reply(self.rpc, envelope, config.max_cooldown) {
                                Ok(reply) => Poll::Ready(Report::Reply { id: self.id, reply }),
                                Err(error) => failed(error),
                            }
                        }
                        Err(ReadError::Closed) => failed(OutboundFailure::NoReply),
                        Err(ReadError::Frame(error)) => {
                            failed(OutboundFailure::MalformedReply(error))
                        }
                        Err(ReadError::Io(error)) => failed(OutboundFailure::Io(error)),
                    };
                }
            }
        }
    }
}

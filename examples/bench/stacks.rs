//! The three stacks, each behind one `Stack`, so one closed loop drives them all alike:
//! this crate's behaviour, `libp2p-request-response` carrying the same envelopes, and a
//! raw `libp2p-stream` exchange with no protocol logic (the limit, not a usable protocol).

use std::{
    hash::Hash,
    io,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::{future::BoxFuture, stream::FuturesUnordered, AsyncRead, AsyncReadExt, AsyncWrite};
use futures::{AsyncWriteExt, StreamExt};
use gantry_coord::{Config, PROTOCOL_NAME};

use crate::wire;
use libp2p::{request_response, swarm::SwarmEvent, Multiaddr, PeerId, StreamProtocol, Swarm};
use prost::Message;

use crate::{
    net::{connect, drive, listen, swarm, Net, Running},
    stats::{closed_loop, Samples},
    work::{
        answer_envelope, answer_intent, answer_outcomes, read_envelope, read_frame, write_envelope,
        Work,
    },
};

/// One way of carrying the workload: a server that answers it and a client that keeps
/// requests in flight.
pub trait Stack {
    /// The name `--stack` selects it by.
    const NAME: &'static str;
    /// The name in the table.
    const LABEL: &'static str;
    type Client;
    type Key: Hash + Eq + Copy;

    /// Starts a server that answers `work` until the returned handle is dropped.
    async fn serve(net: Net, work: &Work) -> Server;
    /// A fresh client connected to `server`.
    async fn connect(net: Net, server: &Server, work: &Work) -> Self::Client;
    /// Sends one request; returns what `next_response` will report when it completes.
    fn send(client: &mut Self::Client, work: &Work) -> Self::Key;
    /// Waits for the next completed request.
    async fn next_response(client: &mut Self::Client) -> Self::Key;
}

/// A listening server, stopped when dropped.
pub struct Server {
    addr: Multiaddr,
    peer: PeerId,
    _running: Running,
}

/// One closed loop of a `S` client against `server`.
pub async fn measure<S: Stack>(
    net: Net,
    server: &Server,
    work: &Work,
    concurrency: usize,
    duration: Duration,
) -> Samples {
    let mut client = S::connect(net, server, work).await;
    closed_loop(
        &mut client,
        concurrency,
        duration,
        |c| S::send(c, work),
        async |c| S::next_response(c).await,
    )
    .await
}

/// One closed loop of a `S` client against a fresh `S` server.
pub async fn bench<S: Stack>(
    net: Net,
    work: &Work,
    concurrency: usize,
    duration: Duration,
) -> Samples {
    let server = S::serve(net, work).await;
    measure::<S>(net, &server, work, concurrency, duration).await
}

pub fn coord_config() -> Config {
    // The default per-peer share (128) would reset a single client's 256 in flight, and
    // the default outbound bound (128) would queue half of them; request-response is
    // given 1024 concurrent streams alike.
    Config::default()
        .with_max_inbound_streams(1024)
        .with_max_inbound_streams_per_peer(1024)
        .with_max_outbound_streams_per_connection(1024)
        .with_request_timeout(Duration::from_secs(30))
        .with_answer_timeout(Duration::from_secs(30))
        .with_handshake_timeout(Duration::from_secs(60))
}

// ---------------------------------------------------------------------------------------

/// This crate's behaviour, the server answering from its swarm loop.
pub struct Coord;

pub struct CoordClient {
    swarm: Swarm<gantry_coord::Behaviour>,
    peer: PeerId,
}

impl Stack for Coord {
    const NAME: &'static str = "ours";
    const LABEL: &'static str = "coord (ours)";
    type Client = CoordClient;
    type Key = gantry_coord::OutboundRequestId;

    async fn serve(net: Net, _: &Work) -> Server {
        use gantry_coord::Event;
        let mut server = swarm(net, |_| gantry_coord::Behaviour::new(coord_config()));
        let addr = listen(&mut server, net).await;
        let peer = *server.local_peer_id();
        let task = tokio::spawn(async move {
            loop {
                let SwarmEvent::Behaviour(event) = server.select_next_some().await else {
                    continue;
                };
                match event {
                    Event::PullIntentQuery { responder, .. } => {
                        let _ = server
                            .behaviour_mut()
                            .send_response(responder, answer_intent());
                    }
                    Event::PleasePull {
                        request, responder, ..
                    } => {
                        let outcomes = answer_outcomes(request.digests().iter().cloned());
                        let _ = server.behaviour_mut().send_response(responder, outcomes);
                    }
                    _ => {}
                }
            }
        });
        Server {
            addr,
            peer,
            _running: Running(task),
        }
    }

    async fn connect(net: Net, server: &Server, _: &Work) -> CoordClient {
        let mut swarm = swarm(net, |_| gantry_coord::Behaviour::new(coord_config()));
        connect(&mut swarm, server.addr.clone()).await;
        CoordClient {
            swarm,
            peer: server.peer,
        }
    }

    fn send(client: &mut CoordClient, work: &Work) -> Self::Key {
        let coord = client.swarm.behaviour_mut();
        match work {
            Work::Query(d) => coord.pull_intent_query(client.peer, d),
            Work::Batch(r) => coord.please_pull(client.peer, r),
        }
    }

    async fn next_response(client: &mut CoordClient) -> Self::Key {
        use gantry_coord::Event;
        loop {
            match client.swarm.select_next_some().await {
                SwarmEvent::Behaviour(Event::PullIntentResponse { request_id, .. })
                | SwarmEvent::Behaviour(Event::PleasePullResponse { request_id, .. }) => {
                    return request_id
                }
                SwarmEvent::Behaviour(Event::OutboundFailure { error, .. }) => {
                    panic!("coord: {error}")
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------

/// `libp2p-request-response` with a codec that frames the same envelope the same way.
pub struct RequestResponse;

#[derive(Clone, Default)]
pub struct EnvelopeCodec;

impl request_response::Codec for EnvelopeCodec {
    type Protocol = StreamProtocol;
    type Request = wire::Envelope;
    type Response = wire::Envelope;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<wire::Envelope> {
        read_envelope(io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<wire::Envelope> {
        read_envelope(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: wire::Envelope,
    ) -> io::Result<()> {
        write_envelope(io, &request).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: wire::Envelope,
    ) -> io::Result<()> {
        write_envelope(io, &response).await
    }
}

pub type RrBehaviour = request_response::Behaviour<EnvelopeCodec>;

pub fn rr_behaviour() -> RrBehaviour {
    request_response::Behaviour::with_codec(
        EnvelopeCodec,
        [(PROTOCOL_NAME, request_response::ProtocolSupport::Full)],
        request_response::Config::default()
            .with_max_concurrent_streams(1024)
            .with_request_timeout(Duration::from_secs(30)),
    )
}

pub struct RrClient {
    swarm: Swarm<RrBehaviour>,
    peer: PeerId,
    request: wire::Envelope,
}

impl Stack for RequestResponse {
    const NAME: &'static str = "rr";
    const LABEL: &'static str = "request-response";
    type Client = RrClient;
    type Key = request_response::OutboundRequestId;

    async fn serve(net: Net, _: &Work) -> Server {
        use request_response::{Event, Message};
        let mut server = swarm(net, |_| rr_behaviour());
        let addr = listen(&mut server, net).await;
        let peer = *server.local_peer_id();
        let task = tokio::spawn(async move {
            loop {
                if let SwarmEvent::Behaviour(Event::Message {
                    message:
                        Message::Request {
                            request, channel, ..
                        },
                    ..
                }) = server.select_next_some().await
                {
                    let _ = server
                        .behaviour_mut()
                        .send_response(channel, answer_envelope(&request));
                }
            }
        });
        Server {
            addr,
            peer,
            _running: Running(task),
        }
    }

    async fn connect(net: Net, server: &Server, work: &Work) -> RrClient {
        let mut swarm = swarm(net, |_| rr_behaviour());
        connect(&mut swarm, server.addr.clone()).await;
        RrClient {
            swarm,
            peer: server.peer,
            request: work.request_envelope(),
        }
    }

    fn send(client: &mut RrClient, _: &Work) -> Self::Key {
        let request = client.request.clone();
        client
            .swarm
            .behaviour_mut()
            .send_request(&client.peer, request)
    }

    async fn next_response(client: &mut RrClient) -> Self::Key {
        use request_response::{Event, Message};
        loop {
            match client.swarm.select_next_some().await {
                SwarmEvent::Behaviour(Event::Message {
                    message: Message::Response { request_id, .. },
                    ..
                }) => return request_id,
                SwarmEvent::Behaviour(Event::OutboundFailure { error, .. }) => {
                    panic!("request-response: {error}")
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------

/// Open a stream, write the request bytes, close, read the response bytes to the end;
/// the server reads one frame and writes pre-encoded response bytes, one task per stream.
pub struct Raw;

pub struct RawClient {
    control: libp2p_stream::Control,
    peer: PeerId,
    request: Arc<[u8]>,
    exchanges: FuturesUnordered<BoxFuture<'static, u64>>,
    next_key: u64,
    redials: Arc<AtomicUsize>,
    _driving: Running,
}

impl Drop for RawClient {
    fn drop(&mut self) {
        let redials = self.redials.load(Ordering::Relaxed);
        if redials > 0 {
            eprintln!("raw baseline: the connection was lost and redialed {redials} times");
        }
    }
}

/// One exchange; a failed one (the connection went away) is retried after 1 ms, its
/// latency counting the wait.
async fn raw_exchange(mut control: libp2p_stream::Control, peer: PeerId, request: Arc<[u8]>) {
    loop {
        let exchange = async {
            let mut stream = control
                .open_stream(peer, PROTOCOL_NAME)
                .await
                .map_err(io::Error::other)?;
            stream.write_all(&request).await?;
            stream.close().await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            Ok::<_, io::Error>(response.len())
        };
        match exchange.await {
            Ok(len) if len > 0 => return,
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

impl Stack for Raw {
    const NAME: &'static str = "raw";
    const LABEL: &'static str = "raw libp2p-stream";
    type Client = RawClient;
    type Key = u64;

    async fn serve(net: Net, work: &Work) -> Server {
        let mut server = swarm(net, |_| libp2p_stream::Behaviour::new());
        let addr = listen(&mut server, net).await;
        let peer = *server.local_peer_id();
        let mut incoming = server
            .behaviour()
            .new_control()
            .accept(PROTOCOL_NAME)
            .expect("the protocol is not yet accepted");
        let response: Arc<[u8]> = answer_envelope(&work.request_envelope())
            .encode_length_delimited_to_vec()
            .into();
        let task = tokio::spawn(async move {
            let accept = async move {
                while let Some((_, mut stream)) = incoming.next().await {
                    let response = response.clone();
                    tokio::spawn(async move {
                        if read_frame(&mut stream).await.is_ok() {
                            let _ = stream.write_all(&response).await;
                            let _ = stream.close().await;
                        }
                    });
                }
            };
            let driving = drive(server);
            accept.await;
            drop(driving);
        });
        Server {
            addr,
            peer,
            _running: Running(task),
        }
    }

    async fn connect(net: Net, server: &Server, work: &Work) -> RawClient {
        let mut client = swarm(net, |_| libp2p_stream::Behaviour::new());
        connect(&mut client, server.addr.clone()).await;
        let control = client.behaviour().new_control();
        // Under heavy churn the yamux connection is sometimes torn down; dial again at
        // once and count it, so the baseline measures streams, not one lost connection.
        let redials = Arc::new(AtomicUsize::new(0));
        let counted = redials.clone();
        let addr = server.addr.clone();
        let driving = tokio::spawn(async move {
            loop {
                if let SwarmEvent::ConnectionClosed { .. } = client.select_next_some().await {
                    counted.fetch_add(1, Ordering::Relaxed);
                    let _ = client.dial(addr.clone());
                }
            }
        });
        RawClient {
            control,
            peer: server.peer,
            request: work
                .request_envelope()
                .encode_length_delimited_to_vec()
                .into(),
            exchanges: FuturesUnordered::new(),
            next_key: 0,
            redials,
            _driving: Running(driving),
        }
    }

    fn send(client: &mut RawClient, _: &Work) -> u64 {
        let key = client.next_key;
        client.next_key += 1;
        let exchange = raw_exchange(client.control.clone(), client.peer, client.request.clone());
        client.exchanges.push(Box::pin(async move {
            exchange.await;
            key
        }));
        key
    }

    async fn next_response(client: &mut RawClient) -> u64 {
        client
            .exchanges
            .next()
            .await
            .expect("next_response is only awaited with requests in flight")
    }
}

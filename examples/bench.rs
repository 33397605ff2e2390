//! Side-by-side benchmark, in one process and one run, of the same workload through:
//! (a) this crate's behaviour, (b) `libp2p-request-response` carrying the same protobuf
//! messages with the same framing, and (c) a raw `libp2p-stream` baseline that opens a
//! stream, writes the request bytes, reads the reply bytes and closes, with no protocol
//! logic. Over the memory transport and over TCP + Noise + Yamux on loopback.
//!
//! `cargo run --release --example bench [-- --quick]`. The last lines are
//! `ratio NAME VALUE`, each ours divided by the other (for latency and bytes, lower is
//! better; for throughput, higher is).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    io,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant, SystemTime},
};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use gantry_coord::{
    Config, Digest, FailureClass, OriginRefKind, Outcome, PleasePull, PleasePullOutcome,
    PullIntent, RecentFailure, PROTOCOL_NAME,
};
use libp2p::{
    core::{transport::MemoryTransport, upgrade::Version},
    identity::Keypair,
    noise, request_response,
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux, Multiaddr, StreamProtocol, Swarm, Transport,
};
use prost::Message;

/// The wire types, for the raw-stream baseline that frames requests by hand.
use gantry_coord::wire;

/// Counts live heap bytes, for the idle-stream measurement, and only while `COUNTING`
/// is set: a counter shared by every thread would otherwise bounce between the cores on
/// each allocation and tax whichever stack runs on more threads at once.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() && COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MAX_MESSAGE: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    Memory,
    Tcp,
}

impl Net {
    fn name(self) -> &'static str {
        match self {
            Net::Memory => "mem",
            Net::Tcp => "tcp",
        }
    }

    fn listen_addr(self) -> Multiaddr {
        match self {
            Net::Memory => "/memory/0".parse().unwrap(),
            Net::Tcp => "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Yamux ends a connection whose peer opens a stream past its limit (512), and closed
/// streams linger briefly before they are collected: at 256 in flight the raw baseline's
/// churn crossed it. The same higher limit for every stack.
fn yamux_config() -> yamux::Config {
    let mut config = yamux::Config::default();
    config.set_max_num_streams(4096);
    config
}

fn swarm<B: NetworkBehaviour>(net: Net, behaviour: impl FnOnce(&Keypair) -> B) -> Swarm<B> {
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(300));
    match net {
        Net::Tcp => libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux_config,
            )
            .expect("tcp")
            .with_behaviour(|key| behaviour(key))
            .expect("behaviour")
            .with_swarm_config(idle)
            .build(),
        Net::Memory => libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_other_transport(|key| {
                Ok::<_, BoxError>(
                    MemoryTransport::default()
                        .upgrade(Version::V1)
                        .authenticate(noise::Config::new(key)?)
                        .multiplex(yamux_config()),
                )
            })
            .expect("memory")
            .with_behaviour(|key| behaviour(key))
            .expect("behaviour")
            .with_swarm_config(idle)
            .build(),
    }
}

async fn listen<B: NetworkBehaviour>(swarm: &mut Swarm<B>, net: Net) -> Multiaddr {
    swarm.listen_on(net.listen_addr()).unwrap();
    loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            return address;
        }
    }
}

async fn connect<B: NetworkBehaviour>(swarm: &mut Swarm<B>, addr: Multiaddr) {
    swarm.dial(addr).unwrap();
    loop {
        if let SwarmEvent::ConnectionEstablished { .. } = swarm.select_next_some().await {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The workload: the same messages for all three stacks.

fn digest(n: u32) -> Digest {
    Digest::parse(&format!("sha256:{n:064x}")).unwrap()
}

#[derive(Clone)]
enum Work {
    Query(Digest),
    Batch(PleasePull),
}

impl Work {
    fn name(&self) -> String {
        match self {
            Work::Query(_) => "pull_intent".into(),
            Work::Batch(r) => format!("please_pull x{}", r.digests().len()),
        }
    }

    fn request_envelope(&self) -> wire::Envelope {
        use wire::envelope::Msg;
        let msg = match self {
            Work::Query(d) => Msg::PullIntentRequest(wire::PullIntentRequest {
                digest: d.to_string(),
            }),
            Work::Batch(r) => Msg::PleasePullRequest(wire::PleasePullRequest {
                digests: r.digests().iter().map(Digest::to_string).collect(),
                upstream_registry: r.registry().into(),
                repository: r.repository().into(),
                kind: wire::please_pull_request::Kind::Blob as i32,
                authorization: String::new(),
            }),
        };
        wire::Envelope { msg: Some(msg) }
    }
}

fn answer_intent() -> PullIntent {
    PullIntent {
        has_cached: true,
        in_flight_since: None,
        hrw_rank: Some(1),
        recently_failed: Some(RecentFailure {
            cooldown_until: SystemTime::now() + Duration::from_secs(30),
            class: FailureClass::Transient,
        }),
    }
}

fn answer_outcomes(digests: impl Iterator<Item = Digest>) -> Vec<PleasePullOutcome> {
    let now = SystemTime::now();
    digests
        .map(|digest| PleasePullOutcome {
            digest,
            outcome: Outcome::Started { started_at: now },
        })
        .collect()
}

/// The reply a responder sends, as the same wire envelope every stack uses.
fn answer_envelope(request: &wire::Envelope) -> wire::Envelope {
    use wire::envelope::Msg;
    let now = Some(prost_types::Timestamp::from(SystemTime::now()));
    let msg = match &request.msg {
        Some(Msg::PleasePullRequest(r)) => Msg::PleasePullResponse(wire::PleasePullResponse {
            results: r
                .digests
                .iter()
                .map(|d| wire::please_pull_response::Result {
                    digest: d.clone(),
                    outcome: wire::please_pull_response::result::Outcome::Started as i32,
                    started_at: now,
                    ..Default::default()
                })
                .collect(),
        }),
        _ => Msg::PullIntentResponse(wire::PullIntentResponse {
            has_cached: true,
            hrw_rank: 1,
            recently_failed: true,
            cooldown_until: Some(prost_types::Timestamp::from(
                SystemTime::now() + Duration::from_secs(30),
            )),
            failure_class: wire::FailureClass::Transient as i32,
            ..Default::default()
        }),
    };
    wire::Envelope { msg: Some(msg) }
}

// ---------------------------------------------------------------------------------------
// Framing shared by the request-response codec and the raw baseline: uvarint length and
// a protobuf body, capped, exactly as the coord wire.

async fn read_frame<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut len: u64 = 0;
    for i in 0..9 {
        let mut byte = [0u8];
        io.read_exact(&mut byte).await?;
        len |= u64::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] & 0x80 == 0 {
            if len as usize > MAX_MESSAGE {
                return Err(io::ErrorKind::InvalidData.into());
            }
            let mut body = vec![0; len as usize];
            io.read_exact(&mut body).await?;
            return Ok(body);
        }
    }
    Err(io::ErrorKind::InvalidData.into())
}

async fn read_envelope<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<wire::Envelope> {
    let body = read_frame(io).await?;
    wire::Envelope::decode(body.as_slice()).map_err(|_| io::ErrorKind::InvalidData.into())
}

async fn write_envelope<T: AsyncWrite + Unpin>(
    io: &mut T,
    envelope: &wire::Envelope,
) -> io::Result<()> {
    io.write_all(&envelope.encode_length_delimited_to_vec())
        .await
}

#[derive(Clone, Default)]
struct CoordCodec;

impl request_response::Codec for CoordCodec {
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
        req: wire::Envelope,
    ) -> io::Result<()> {
        write_envelope(io, &req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: wire::Envelope,
    ) -> io::Result<()> {
        write_envelope(io, &res).await
    }
}

type RrBehaviour = request_response::Behaviour<CoordCodec>;

fn rr_behaviour() -> RrBehaviour {
    request_response::Behaviour::with_codec(
        CoordCodec,
        [(PROTOCOL_NAME, request_response::ProtocolSupport::Full)],
        request_response::Config::default()
            .with_max_concurrent_streams(1024)
            .with_request_timeout(Duration::from_secs(30)),
    )
}

fn coord_config() -> Config {
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
// Measurements.

#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    tput: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_req: Duration,
}

fn process_cpu() -> Duration {
    // utime and stime, fields 14 and 15 of /proc/self/stat, in clock ticks (100 Hz).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    Duration::from_millis(fields.iter().sum::<u64>() * 10)
}

/// What one closed loop measured.
struct Samples {
    latencies: Vec<Duration>,
    elapsed: Duration,
    cpu: Duration,
}

impl Samples {
    fn summary(self) -> Cell {
        summarize(self.latencies, self.elapsed, self.cpu)
    }

    /// Pools another round of the same cell into this one.
    fn merge(&mut self, other: Samples) {
        self.latencies.extend(other.latencies);
        self.elapsed += other.elapsed;
        self.cpu += other.cpu;
    }
}

fn summarize(mut latencies: Vec<Duration>, elapsed: Duration, cpu: Duration) -> Cell {
    latencies.sort_unstable();
    let n = latencies.len().max(1);
    Cell {
        tput: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: latencies.get(n / 2).copied().unwrap_or_default(),
        p99: latencies.get(n * 99 / 100).copied().unwrap_or_default(),
        cpu_per_req: cpu / n as u32,
    }
}

/// Keeps `concurrency` requests in flight for `duration` (after a warm-up) and returns the
/// latencies and the measured span. `send` issues one request and returns its key;
/// `next_reply` awaits the key of the next completed request.
async fn closed_loop<K: std::hash::Hash + Eq + Copy, S>(
    state: &mut S,
    concurrency: usize,
    duration: Duration,
    mut send: impl FnMut(&mut S) -> K,
    mut next_reply: impl AsyncFnMut(&mut S) -> K,
) -> Samples {
    let warmup = duration / 5;
    let mut inflight: HashMap<K, Instant> = HashMap::new();
    for _ in 0..concurrency {
        inflight.insert(send(state), Instant::now());
    }
    let started = Instant::now();
    let mut measuring_since = None;
    let mut cpu_start = Duration::ZERO;
    let mut latencies = Vec::new();
    loop {
        let key = next_reply(state).await;
        let Some(sent) = inflight.remove(&key) else {
            continue;
        };
        let now = Instant::now();
        match measuring_since {
            None if now - started >= warmup => {
                measuring_since = Some(now);
                cpu_start = process_cpu();
            }
            Some(since) => {
                latencies.push(now - sent);
                if now - since >= duration {
                    let cpu = process_cpu().saturating_sub(cpu_start);
                    // Drain what is still in flight before the next cell.
                    while !inflight.is_empty() {
                        let key = next_reply(state).await;
                        inflight.remove(&key);
                    }
                    return Samples {
                        latencies,
                        elapsed: now - since,
                        cpu,
                    };
                }
            }
            None => {}
        }
        inflight.insert(send(state), Instant::now());
    }
}

/// A server, running in its own task until aborted.
struct Server {
    addr: Multiaddr,
    peer: libp2p::PeerId,
    task: tokio::task::JoinHandle<()>,
}

async fn serve_ours(net: Net) -> Server {
    use gantry_coord::Event;
    let mut server = swarm(net, |_| gantry_coord::Behaviour::new(coord_config()));
    let addr = listen(&mut server, net).await;
    let peer = *server.local_peer_id();
    let task = tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(event) = server.select_next_some().await {
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
        }
    });
    Server { addr, peer, task }
}

async fn serve_rr(net: Net) -> Server {
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
    Server { addr, peer, task }
}

async fn ask_ours(
    net: Net,
    server: &Server,
    work: &Work,
    concurrency: usize,
    duration: Duration,
) -> Samples {
    use gantry_coord::Event;
    let mut client = swarm(net, |_| gantry_coord::Behaviour::new(coord_config()));
    connect(&mut client, server.addr.clone()).await;
    let peer = server.peer;
    closed_loop(
        &mut client,
        concurrency,
        duration,
        |c| match work {
            Work::Query(d) => c.behaviour_mut().pull_intent_query(peer, d),
            Work::Batch(r) => c.behaviour_mut().please_pull(peer, r),
        },
        async |c| loop {
            match c.select_next_some().await {
                SwarmEvent::Behaviour(Event::PullIntentResponse { request_id, .. })
                | SwarmEvent::Behaviour(Event::PleasePullResponse { request_id, .. }) => {
                    return request_id
                }
                SwarmEvent::Behaviour(Event::OutboundFailure { error, .. }) => {
                    panic!("ours: {error}")
                }
                _ => {}
            }
        },
    )
    .await
}

async fn ask_rr(
    net: Net,
    server: &Server,
    work: &Work,
    concurrency: usize,
    duration: Duration,
) -> Samples {
    use request_response::{Event, Message};
    let mut client = swarm(net, |_| rr_behaviour());
    connect(&mut client, server.addr.clone()).await;
    let (peer, request) = (server.peer, work.request_envelope());
    closed_loop(
        &mut client,
        concurrency,
        duration,
        |c| c.behaviour_mut().send_request(&peer, request.clone()),
        async |c| loop {
            match c.select_next_some().await {
                SwarmEvent::Behaviour(Event::Message {
                    message: Message::Response { request_id, .. },
                    ..
                }) => return request_id,
                SwarmEvent::Behaviour(Event::OutboundFailure { error, .. }) => {
                    panic!("rr: {error}")
                }
                _ => {}
            }
        },
    )
    .await
}

async fn bench_ours(net: Net, work: &Work, concurrency: usize, duration: Duration) -> Samples {
    let server = serve_ours(net).await;
    let cell = ask_ours(net, &server, work, concurrency, duration).await;
    server.task.abort();
    cell
}

async fn bench_rr(net: Net, work: &Work, concurrency: usize, duration: Duration) -> Samples {
    let server = serve_rr(net).await;
    let cell = ask_rr(net, &server, work, concurrency, duration).await;
    server.task.abort();
    cell
}

/// Both stacks speak the same wire, so each can ask the other: this tells which side of
/// a difference between them is the client and which the server.
async fn cross(net: Net, work: &Work, concurrency: usize, duration: Duration) {
    let rr_server = serve_rr(net).await;
    let ours_to_rr = ask_ours(net, &rr_server, work, concurrency, duration)
        .await
        .summary();
    rr_server.task.abort();
    let ours_server = serve_ours(net).await;
    let rr_to_ours = ask_rr(net, &ours_server, work, concurrency, duration)
        .await
        .summary();
    ours_server.task.abort();
    for (pair, cell) in [
        ("coord client -> rr server", ours_to_rr),
        ("rr client -> coord server", rr_to_ours),
    ] {
        println!(
            "| {} | {} | {concurrency} | {pair} | {:.0} | {} | {} | {} |",
            net.name(),
            work.name(),
            cell.tput,
            ms(cell.p50),
            ms(cell.p99),
            us(cell.cpu_per_req)
        );
    }
}

async fn bench_raw(net: Net, work: &Work, concurrency: usize, duration: Duration) -> Samples {
    let mut server = swarm(net, |_| libp2p_stream::Behaviour::new());
    let addr = listen(&mut server, net).await;
    let server_peer = *server.local_peer_id();
    let mut incoming = server
        .behaviour()
        .new_control()
        .accept(PROTOCOL_NAME)
        .unwrap();
    let reply = answer_envelope(&work.request_envelope()).encode_length_delimited_to_vec();
    let serving = tokio::spawn(async move {
        let accept = async move {
            while let Some((_, mut stream)) = incoming.next().await {
                let reply = reply.clone();
                tokio::spawn(async move {
                    if read_frame(&mut stream).await.is_ok() {
                        let _ = stream.write_all(&reply).await;
                        let _ = stream.close().await;
                    }
                });
            }
        };
        let drive = async move {
            loop {
                server.select_next_some().await;
            }
        };
        futures::join!(accept, drive);
    });
    let mut client = swarm(net, |_| libp2p_stream::Behaviour::new());
    connect(&mut client, addr.clone()).await;
    let control = client.behaviour().new_control();
    // Under heavy churn the yamux connection is sometimes torn down; dial again at once
    // and count it, so the baseline measures streams, not one lost connection.
    let redials = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = redials.clone();
    let driving = tokio::spawn(async move {
        loop {
            if let SwarmEvent::ConnectionClosed { .. } = client.select_next_some().await {
                counted.fetch_add(1, Ordering::Relaxed);
                let _ = client.dial(addr.clone());
            }
        }
    });
    let request = work.request_envelope().encode_length_delimited_to_vec();
    // One closed loop per slot: open, write, close, read to end, again.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (samples_tx, mut samples_rx) =
        tokio::sync::mpsc::unbounded_channel::<(Instant, Duration)>();
    let slots: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut control, request, samples, stop) = (
                control.clone(),
                request.clone(),
                samples_tx.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let exchange = async {
                        let mut stream = control
                            .open_stream(server_peer, PROTOCOL_NAME)
                            .await
                            .map_err(io::Error::other)?;
                        stream.write_all(&request).await?;
                        stream.close().await?;
                        let mut reply = Vec::new();
                        stream.read_to_end(&mut reply).await?;
                        Ok::<_, io::Error>(reply.len())
                    };
                    match exchange.await {
                        Ok(len) if len > 0 => {
                            let now = Instant::now();
                            let _ = samples.send((now, now - sent));
                        }
                        // Not counted: wait for the connection to come back.
                        _ => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
            })
        })
        .collect();
    drop(samples_tx);
    tokio::time::sleep(duration / 5).await;
    let (start, cpu_start) = (Instant::now(), process_cpu());
    tokio::time::sleep(duration).await;
    let (end, cpu) = (Instant::now(), process_cpu().saturating_sub(cpu_start));
    stop.store(true, Ordering::Relaxed);
    for slot in slots {
        let _ = slot.await;
    }
    let mut latencies = Vec::new();
    while let Some((at, latency)) = samples_rx.recv().await {
        if at >= start && at <= end {
            latencies.push(latency);
        }
    }
    driving.abort();
    serving.abort();
    let redials = redials.load(Ordering::Relaxed);
    if redials > 0 {
        eprintln!(
            "raw baseline, {} {}: the connection was lost and redialed {redials} times",
            net.name(),
            work.name()
        );
    }
    Samples {
        latencies,
        elapsed: end - start,
        cpu,
    }
}

/// Heap bytes held per inbound stream that waits for its request: 512 idle streams from
/// one raw peer (memory transport), ours or request-response on the other side.
async fn idle_stream_bytes(ours: bool) -> f64 {
    const STREAMS: usize = 512;
    let net = Net::Memory;
    let (addr, serving) = if ours {
        let mut server = swarm(net, |_| gantry_coord::Behaviour::new(coord_config()));
        let addr = listen(&mut server, net).await;
        (
            addr,
            tokio::spawn(async move {
                loop {
                    server.select_next_some().await;
                }
            }),
        )
    } else {
        let mut server = swarm(net, |_| rr_behaviour());
        let addr = listen(&mut server, net).await;
        (
            addr,
            tokio::spawn(async move {
                loop {
                    server.select_next_some().await;
                }
            }),
        )
    };
    let mut client = swarm(net, |_| libp2p_stream::Behaviour::new());
    client.dial(addr).unwrap();
    let peer = loop {
        if let SwarmEvent::ConnectionEstablished { peer_id, .. } = client.select_next_some().await {
            break peer_id;
        }
    };
    let mut control = client.behaviour().new_control();
    let driving = tokio::spawn(async move {
        loop {
            client.select_next_some().await;
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Growth while counting is what the window allocated net of what it freed, whether
    // or not the freed blocks were allocated before it.
    COUNTING.store(true, Ordering::Relaxed);
    let before = LIVE.load(Ordering::Relaxed);
    let mut held = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        held.push(control.open_stream(peer, PROTOCOL_NAME).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = LIVE.load(Ordering::Relaxed);
    COUNTING.store(false, Ordering::Relaxed);
    drop(held);
    driving.abort();
    serving.abort();
    after.wrapping_sub(before) as isize as f64 / STREAMS as f64
}

/// One coord server, `peers` clients on the memory transport, each with `per_peer`
/// queries in flight: aggregate throughput and p99.
async fn scale(peers: usize, per_peer: usize, duration: Duration) -> Cell {
    use gantry_coord::Event;
    let net = Net::Memory;
    let mut server = swarm(net, |_| gantry_coord::Behaviour::new(coord_config()));
    let addr = listen(&mut server, net).await;
    let server_peer = *server.local_peer_id();
    let serving = tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(Event::PullIntentQuery { responder, .. }) =
                server.select_next_some().await
            {
                let _ = server
                    .behaviour_mut()
                    .send_response(responder, answer_intent());
            }
        }
    });
    let mut clients = Vec::new();
    for _ in 0..peers {
        let mut client = swarm(net, |_| gantry_coord::Behaviour::new(coord_config()));
        connect(&mut client, addr.clone()).await;
        clients.push(client);
    }
    let query = digest(7);
    let runs: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let query = query.clone();
            tokio::spawn(async move {
                closed_loop(
                    &mut client,
                    per_peer,
                    duration,
                    |c| c.behaviour_mut().pull_intent_query(server_peer, &query),
                    async |c| loop {
                        if let SwarmEvent::Behaviour(Event::PullIntentResponse {
                            request_id, ..
                        }) = c.select_next_some().await
                        {
                            return request_id;
                        }
                    },
                )
                .await
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut tput = 0.0;
    for run in runs {
        let samples = run.await.unwrap();
        tput += samples.latencies.len() as f64 / samples.elapsed.as_secs_f64();
        latencies.extend(samples.latencies);
    }
    serving.abort();
    let mut cell = summarize(latencies, Duration::from_secs(1), Duration::ZERO);
    cell.tput = tput;
    cell
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// The command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(about = "coord beside request-response and a raw libp2p-stream baseline")]
struct Args {
    /// Run everything on one thread: without cross-thread wake-ups, it shows what
    /// scheduling adds to the tails on the default two worker threads.
    #[arg(long)]
    single_thread: bool,
    /// 0.3 s per cell in one round, instead of 1.5 s in three.
    #[arg(long)]
    quick: bool,
    /// Run one cell, such as `mem_256` (for profiling), skipping memory and scale.
    #[arg(long)]
    only: Option<String>,
    /// Run one stack only (for profiling).
    #[arg(long, value_parser = ["ours", "rr", "raw"])]
    stack: Option<String>,
    /// Add the cross-stack rows: each client against the other's server.
    #[arg(long)]
    cross: bool,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let mut runtime = if args.single_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(2);
        builder
    };
    runtime
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(async { tokio::spawn(run(args)).await })
        .expect("the benchmark task");
}

async fn run(args: Args) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let quick = args.quick;
    let only = args.only.clone();
    let duration = Duration::from_millis(if quick { 300 } else { 1500 });
    let rounds: u32 = if quick { 1 } else { 3 };
    let query = Work::Query(digest(7));
    let batch = Work::Batch(
        PleasePull::new(
            "registry.example.com",
            "library/demo",
            OriginRefKind::Blob,
            (0..250).map(digest).collect(),
        )
        .unwrap(),
    );
    // A please_pull of 1,000 digests goes as 4 requests of 250 in flight at once: one
    // request carries at most 256, as the newer Go client sends.
    let cells: [(&Work, usize, &str); 4] = [
        (&query, 1, "1"),
        (&query, 16, "16"),
        (&query, 256, "256"),
        (&batch, 4, "pp1000"),
    ];
    let stack = args.stack.as_deref();
    let runs = |name: &str| stack.is_none_or(|s| s == name);
    let slice = duration / rounds;
    let started = Instant::now();
    let mut ratios: Vec<(String, f64)> = Vec::new();
    println!(
        "measuring {} ms per stack and cell, in {rounds} rounds after a warm-up each (2 cores, one process)",
        ms(duration)
    );
    println!();
    println!("| net | workload | in flight | stack | req/s | p50 ms | p99 ms | CPU µs/req |");
    println!("|---|---|---|---|---:|---:|---:|---:|");
    for net in [Net::Memory, Net::Tcp] {
        for (work, concurrency, label) in cells {
            if only
                .as_ref()
                .is_some_and(|o| *o != format!("{}_{label}", net.name()))
            {
                continue;
            }
            // Short rounds, each stack in turn and the order rotating, so that drift in
            // the machine's state (frequency, caches, other load) falls on all three alike.
            let mut pooled: [Option<Samples>; 3] = [None, None, None];
            for round in 0..rounds {
                for turn in 0..3 {
                    let which = (round as usize + turn) % 3;
                    if !runs(["ours", "rr", "raw"][which]) {
                        continue;
                    }
                    let samples = match which {
                        0 => bench_ours(net, work, concurrency, slice).await,
                        1 => bench_rr(net, work, concurrency, slice).await,
                        _ => bench_raw(net, work, concurrency, slice).await,
                    };
                    match &mut pooled[which] {
                        Some(pool) => pool.merge(samples),
                        slot => *slot = Some(samples),
                    }
                }
            }
            let [ours, rr, raw] =
                pooled.map(|samples| samples.map(Samples::summary).unwrap_or_default());
            for (stack, cell) in [
                ("coord (ours)", ours),
                ("request-response", rr),
                ("raw libp2p-stream", raw),
            ] {
                println!(
                    "| {} | {} | {concurrency} | {stack} | {:.0} | {} | {} | {} |",
                    net.name(),
                    work.name(),
                    cell.tput,
                    ms(cell.p50),
                    ms(cell.p99),
                    us(cell.cpu_per_req)
                );
            }
            let key = format!("{}_{label}", net.name());
            let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
            ratios.push((format!("tput_vs_rr_{key}"), div(ours.tput, rr.tput)));
            ratios.push((
                format!("p99_vs_rr_{key}"),
                div(ours.p99.as_secs_f64(), rr.p99.as_secs_f64()),
            ));
            ratios.push((
                format!("cpu_vs_rr_{key}"),
                div(ours.cpu_per_req.as_secs_f64(), rr.cpu_per_req.as_secs_f64()),
            ));
            ratios.push((format!("tput_vs_raw_{key}"), div(ours.tput, raw.tput)));
            ratios.push((
                format!("p99_vs_raw_{key}"),
                div(ours.p99.as_secs_f64(), raw.p99.as_secs_f64()),
            ));
        }
    }

    if args.cross {
        for net in [Net::Memory, Net::Tcp] {
            cross(net, &query, 16, duration).await;
        }
    }
    if only.is_some() {
        return;
    }
    let ours_bytes = idle_stream_bytes(true).await;
    let rr_bytes = idle_stream_bytes(false).await;
    println!();
    println!("idle inbound stream, heap bytes each (512 streams, memory transport): coord {ours_bytes:.0}, request-response {rr_bytes:.0}");
    ratios.push(("idle_stream_bytes_vs_rr".into(), ours_bytes / rr_bytes));

    let one = scale(1, 4, duration).await;
    let many = scale(200, 4, duration).await;
    println!(
        "scale, coord, 4 queries in flight per peer (memory transport): 1 peer {:.0} req/s p99 {} ms; 200 peers {:.0} req/s p99 {} ms",
        one.tput,
        ms(one.p99),
        many.tput,
        ms(many.p99)
    );
    ratios.push(("scale_tput_200_vs_1".into(), many.tput / one.tput));
    ratios.push((
        "scale_p99_200_vs_1".into(),
        many.p99.as_secs_f64() / one.p99.as_secs_f64(),
    ));

    println!();
    println!("finished in {:.1} s", started.elapsed().as_secs_f64());
    for (name, value) in ratios {
        println!("ratio {name} {value:.2}");
    }
}

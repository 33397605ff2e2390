//! Helpers shared by the integration tests: swarms on the memory transport, a
//! responder loop, and a raw peer that writes whatever bytes a test wants.
#![allow(dead_code)]

use std::time::Duration;

use futures::{channel::mpsc, AsyncReadExt, AsyncWriteExt, StreamExt};
use gantry_coord::{Behaviour, Config, Digest, Event, PROTOCOL_NAME};
use libp2p_core::Multiaddr;
use libp2p_identity::PeerId;
use libp2p_swarm::{Swarm, SwarmEvent};
use libp2p_swarm_test::SwarmExt;

/// The wire types, for tests that write raw frames: generated from the same schema by the
/// package's build script, as any other implementation of the protocol would generate them.
#[allow(clippy::all)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/gantry.coord.v1.rs"));
}

/// Every test is bounded in time.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(20);

pub fn digest(n: u8) -> Digest {
    Digest::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32))).unwrap()
}

pub fn coord(config: Config) -> Swarm<Behaviour> {
    Swarm::new_ephemeral_tokio(|_| Behaviour::new(config))
}

/// A coord swarm on the memory transport (Noise, Yamux) that closes a connection once it
/// has been idle for `idle`.
pub fn coord_idle(config: Config, idle: Duration) -> Swarm<Behaviour> {
    use libp2p::{core::transport::MemoryTransport, core::upgrade::Version, Transport};
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_other_transport(|key| {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                MemoryTransport::default()
                    .upgrade(Version::V1)
                    .authenticate(libp2p::noise::Config::new(key)?)
                    .multiplex(libp2p::yamux::Config::default()),
            )
        })
        .unwrap()
        .with_behaviour(|_| Behaviour::new(config))
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build()
}

/// Listens on a memory address and returns it.
pub async fn listen<B>(swarm: &mut Swarm<B>) -> Multiaddr
where
    B: libp2p_swarm::NetworkBehaviour + Send,
    B::ToSwarm: std::fmt::Debug,
{
    let (memory, _tcp) = swarm.listen().with_memory_addr_external().await;
    memory
}

/// Runs a coord swarm in the background: `answer` sees every behaviour event and may
/// respond through the behaviour; events it returns are forwarded to the receiver.
pub fn spawn_coord<F, T>(mut swarm: Swarm<Behaviour>, mut answer: F) -> mpsc::UnboundedReceiver<T>
where
    F: FnMut(&mut Behaviour, Event) -> Option<T> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = mpsc::unbounded();
    tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(event) = swarm.select_next_some().await {
                if let Some(event) = answer(swarm.behaviour_mut(), event) {
                    if tx.unbounded_send(event).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Gives the swarm the addresses a test knows, so raw streams can dial.
#[derive(Default)]
pub struct AddressBook(std::collections::HashMap<PeerId, Multiaddr>);

impl libp2p_swarm::NetworkBehaviour for AddressBook {
    type ConnectionHandler = libp2p_swarm::dummy::ConnectionHandler;
    type ToSwarm = std::convert::Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: libp2p_swarm::ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<libp2p_swarm::THandler<Self>, libp2p_swarm::ConnectionDenied> {
        Ok(libp2p_swarm::dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: libp2p_swarm::ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: libp2p_core::Endpoint,
        _: libp2p_core::transport::PortUse,
    ) -> Result<libp2p_swarm::THandler<Self>, libp2p_swarm::ConnectionDenied> {
        Ok(libp2p_swarm::dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: libp2p_swarm::ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: libp2p_core::Endpoint,
    ) -> Result<Vec<Multiaddr>, libp2p_swarm::ConnectionDenied> {
        Ok(peer
            .and_then(|p| self.0.get(&p).cloned())
            .into_iter()
            .collect())
    }

    fn on_swarm_event(&mut self, _: libp2p_swarm::FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: libp2p_swarm::ConnectionId,
        event: libp2p_swarm::THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<libp2p_swarm::ToSwarm<Self::ToSwarm, libp2p_swarm::THandlerInEvent<Self>>>
    {
        std::task::Poll::Pending
    }
}

/// A peer that speaks no protocol of its own but opens raw streams on demand.
#[derive(libp2p_swarm::NetworkBehaviour)]
#[behaviour(prelude = "libp2p_swarm::derive_prelude")]
pub struct RawPeer {
    pub addresses: AddressBook,
    pub streams: libp2p_stream::Behaviour,
}

fn raw_swarm() -> Swarm<RawPeer> {
    Swarm::new_ephemeral_tokio(|_| RawPeer {
        addresses: AddressBook::default(),
        streams: libp2p_stream::Behaviour::new(),
    })
}

/// Starts a raw peer in the background that knows how to reach `target`.
pub fn spawn_raw_peer(target: PeerId, addr: Multiaddr) -> (PeerId, libp2p_stream::Control) {
    let mut swarm = raw_swarm();
    swarm.behaviour_mut().addresses.0.insert(target, addr);
    let control = swarm.behaviour().streams.new_control();
    let peer = *swarm.local_peer_id();
    tokio::spawn(swarm.loop_on_next());
    (peer, control)
}

/// Starts a raw peer in the background that listens and hands every inbound coord
/// stream to the caller.
pub async fn spawn_raw_responder() -> (PeerId, Multiaddr, libp2p_stream::IncomingStreams) {
    let mut swarm = raw_swarm();
    let addr = listen(&mut swarm).await;
    let incoming = swarm
        .behaviour()
        .streams
        .new_control()
        .accept(PROTOCOL_NAME)
        .unwrap();
    let peer = *swarm.local_peer_id();
    tokio::spawn(swarm.loop_on_next());
    (peer, addr, incoming)
}

/// Opens a coord stream, writes `bytes`, half-closes and reads until the peer closes.
pub async fn raw_exchange(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    bytes: &[u8],
) -> std::io::Result<Vec<u8>> {
    let mut stream = control
        .open_stream(peer, PROTOCOL_NAME)
        .await
        .map_err(std::io::Error::other)?;
    stream.write_all(bytes).await?;
    stream.close().await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await?;
    Ok(reply)
}

/// Encodes an envelope as one frame.
pub fn frame(msg: wire::envelope::Msg) -> Vec<u8> {
    prost::Message::encode_length_delimited_to_vec(&wire::Envelope { msg: Some(msg) })
}

/// Decodes a one-frame reply.
pub fn unframe(bytes: &[u8]) -> wire::Envelope {
    prost::Message::decode_length_delimited(bytes).expect("a framed envelope")
}

/// Waits for the next event the receiver yields.
pub async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, rx.next())
        .await
        .expect("an event in time")
        .expect("the swarm task is running")
}

/// The path of an example binary; `cargo test` builds examples beside the test binaries.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let mut path = std::env::current_exe().unwrap();
    path.pop();
    path.pop();
    path.push("examples");
    path.push(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--example", name])
            .status()
            .unwrap();
        assert!(status.success());
    }
    path
}

/// A child process that is killed when the test ends, however it ends.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a process that announces itself with one JSON line on stdout; returns it, to be
/// killed when dropped, and that line.
pub fn spawn_announcing(command: &mut std::process::Command) -> (Killed, serde_json::Value) {
    use std::io::BufRead;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Killed(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let announced = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    (child, announced)
}

/// A digest of one repeated hex character, for tests that pass digests as text.
pub fn hex_digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

/// Now, in Unix milliseconds, as the examples print times.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The value of one sample in Prometheus text; a series that is not there fails the test,
/// so that a check for zero cannot pass on a metric that was never registered.
pub fn sample_value(text: &str, series: &str) -> f64 {
    let value = text
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"));
    value
        .parse()
        .unwrap_or_else(|_| panic!("{series} has value {value:?}"))
}

/// The answer of a node without a puller: `Unspecified` for every digest, in order.
pub fn unspecified_outcomes(
    request: &gantry_coord::PleasePull,
) -> Vec<gantry_coord::PleasePullOutcome> {
    request
        .digests()
        .iter()
        .map(|digest| gantry_coord::PleasePullOutcome {
            digest: *digest,
            outcome: gantry_coord::Outcome::Unspecified,
        })
        .collect()
}

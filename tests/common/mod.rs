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

/// The wire types, generated from the same `proto/coord.proto`, for tests that write raw frames.
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

/// A swarm that speaks no protocol of its own but opens raw streams on demand.
pub fn raw_peer() -> (Swarm<libp2p_stream::Behaviour>, libp2p_stream::Control) {
    let swarm = Swarm::new_ephemeral_tokio(|_| libp2p_stream::Behaviour::new());
    let control = swarm.behaviour().new_control();
    (swarm, control)
}

/// Starts a raw peer in the background that knows how to reach `target`.
pub fn spawn_raw_peer(target: PeerId, addr: Multiaddr) -> (PeerId, libp2p_stream::Control) {
    let (mut swarm, control) = raw_peer();
    swarm.add_peer_address(target, addr);
    let peer = *swarm.local_peer_id();
    tokio::spawn(swarm.loop_on_next());
    (peer, control)
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

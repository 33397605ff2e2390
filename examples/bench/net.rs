//! The two transports every stack runs on, with the same swarm settings for all.

use std::time::Duration;

use futures::StreamExt;
use libp2p::{
    core::{transport::MemoryTransport, upgrade::Version},
    identity::Keypair,
    noise,
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux, Multiaddr, Swarm, Transport,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    Memory,
    Tcp,
}

impl Net {
    pub fn name(self) -> &'static str {
        match self {
            Net::Memory => "mem",
            Net::Tcp => "tcp",
        }
    }

    fn listen_addr(self) -> Multiaddr {
        match self {
            Net::Memory => "/memory/0".parse().expect("a memory address"),
            Net::Tcp => "/ip4/127.0.0.1/tcp/0".parse().expect("a loopback address"),
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

pub fn swarm<B: NetworkBehaviour>(net: Net, behaviour: impl FnOnce(&Keypair) -> B) -> Swarm<B> {
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

pub async fn listen<B: NetworkBehaviour>(swarm: &mut Swarm<B>, net: Net) -> Multiaddr {
    swarm.listen_on(net.listen_addr()).expect("listen");
    loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            return address;
        }
    }
}

/// Dials and waits for the connection; returns the peer it reached.
pub async fn connect<B: NetworkBehaviour>(swarm: &mut Swarm<B>, addr: Multiaddr) -> libp2p::PeerId {
    swarm.dial(addr).expect("dial");
    loop {
        if let SwarmEvent::ConnectionEstablished { peer_id, .. } = swarm.select_next_some().await {
            return peer_id;
        }
    }
}

/// A swarm's event loop running in its own task, stopped when this is dropped.
pub struct Running(pub tokio::task::JoinHandle<()>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Drives a swarm, ignoring its events, until dropped.
pub fn drive<B: NetworkBehaviour + Send>(mut swarm: Swarm<B>) -> Running
where
    B::ToSwarm: Send,
{
    Running(tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    }))
}

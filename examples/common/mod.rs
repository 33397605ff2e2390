//! The swarm every example node runs: TCP + Noise + Yamux, Kademlia, Identify and coord.

#[allow(dead_code)] // the examples without metrics leave it unused
pub mod metrics;

use std::time::Duration;

use libp2p::{identify, identity::Keypair, kad, noise, swarm::NetworkBehaviour, tcp, yamux, Swarm};

#[derive(NetworkBehaviour)]
pub struct NodeBehaviour {
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub identify: identify::Behaviour,
    pub coord: gantry_coord::Behaviour,
}

#[allow(dead_code)] // the cluster demo picks its transport with `build_swarm_on`
pub fn build_swarm(
    keypair: Keypair,
    config: gantry_coord::Config,
) -> Result<Swarm<NodeBehaviour>, Box<dyn std::error::Error>> {
    build_swarm_on(keypair, config, false)
}

/// The same swarm on libp2p's in-memory transport with plaintext (`memory`), or on TCP
/// with Noise: a cluster of a hundred nodes in one process runs on memory, where no
/// socket, port or handshake cost is spent.
pub fn build_swarm_on(
    keypair: Keypair,
    config: gantry_coord::Config,
    memory: bool,
) -> Result<Swarm<NodeBehaviour>, Box<dyn std::error::Error>> {
    use libp2p::{core::transport::MemoryTransport, core::upgrade::Version, Transport};
    let builder = libp2p::SwarmBuilder::with_existing_identity(keypair).with_tokio();
    let swarm = if memory {
        builder
            .with_other_transport(|key| {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    MemoryTransport::default()
                        .upgrade(Version::V1)
                        // In one process there is nobody to hide from: plaintext spares
                        // a hundred nodes a thousand Noise handshakes on two cores.
                        .authenticate(libp2p::plaintext::Config::new(key))
                        .multiplex(yamux::Config::default()),
                )
            })?
            .with_behaviour(behaviour(config))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
            .build()
    } else {
        builder
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(behaviour(config))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
            .build()
    };
    Ok(swarm)
}

fn behaviour(config: gantry_coord::Config) -> impl FnOnce(&Keypair) -> NodeBehaviour {
    move |key| {
        let peer = key.public().to_peer_id();
        let mut kad = kad::Behaviour::with_config(
            peer,
            kad::store::MemoryStore::new(peer),
            gantry_coord::kad_config(),
        );
        kad.set_mode(Some(kad::Mode::Server));
        NodeBehaviour {
            kad,
            identify: identify::Behaviour::new(identify::Config::new(
                "/gantry/0.1.0".into(),
                key.public(),
            )),
            coord: gantry_coord::Behaviour::new(config),
        }
    }
}

//! The swarm every example node runs: TCP + Noise + Yamux, Kademlia, Identify and coord.

use std::time::Duration;

use libp2p::{identify, identity::Keypair, kad, noise, swarm::NetworkBehaviour, tcp, yamux, Swarm};

#[derive(NetworkBehaviour)]
pub struct NodeBehaviour {
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub identify: identify::Behaviour,
    pub coord: gantry_coord::Behaviour,
}

pub fn build_swarm(
    keypair: Keypair,
    config: gantry_coord::Config,
) -> Result<Swarm<NodeBehaviour>, Box<dyn std::error::Error>> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let mut kad = kad::Behaviour::new(peer, kad::store::MemoryStore::new(peer));
            kad.set_mode(Some(kad::Mode::Server));
            NodeBehaviour {
                kad,
                identify: identify::Behaviour::new(identify::Config::new(
                    "/gantry/0.1.0".into(),
                    key.public(),
                )),
                coord: gantry_coord::Behaviour::new(config),
            }
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build();
    Ok(swarm)
}

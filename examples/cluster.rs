//! A cold start on a small cluster, in one process over loopback TCP.
//!
//! `cargo run --example cluster [-- --nodes N]` starts N nodes (default 8), each a full
//! swarm of Kademlia + Identify + coord bootstrapped through the first. Every node then
//! needs the same image (a manifest, a config and several layers). For each digest a node
//! ranks the members by HRW, probes the top 3 with pull_intent_query (itself locally),
//! and asks the designated puller with please_pull until the digest is cached somewhere it
//! can fetch from. An in-process origin counts pulls per digest and fails one layer with
//! 404: its puller records it in the negative cache, and every other node sees
//! RECENTLY_FAILED and stops instead of pulling it again.
//!
//! The last line is `summary: digests=N origin_pulls=M failed=F nodes=K`.

mod common;

use std::{
    collections::{HashMap, HashSet},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{build_swarm, NodeBehaviourEvent};
use futures::{future::join_all, StreamExt};
use gantry_coord::{
    hrw, Config, Coordinator, Digest, FailureClass, Member, Membership, MemoryStore, NodeId,
    NodeState, OriginRefKind, PleasePull, PullIntent, PullOrder, PullerPump, PumpDecision,
    RecentFailure, StaticMembership,
};
use libp2p::{identify, identity::Keypair, kad, multiaddr::Protocol, swarm::SwarmEvent, Multiaddr};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

const REGISTRY: &str = "registry.example.com";
const REPOSITORY: &str = "library/demo";
/// Members probed per digest before asking anyone to pull.
const PROBE_K: usize = 3;

/// One blob of the image.
struct Blob {
    digest: Digest,
    kind: OriginRefKind,
    name: String,
    size: usize,
}

/// The origin registry, in process: it counts pulls per digest and fails some with 404.
struct Origin {
    blobs: HashMap<Digest, Vec<u8>>,
    missing: HashSet<Digest>,
    served: Mutex<HashMap<Digest, u32>>,
    attempts: Mutex<HashMap<Digest, u32>>,
}

impl Origin {
    async fn pull(&self, digest: &Digest) -> Result<Vec<u8>, FailureClass> {
        *self
            .attempts
            .lock()
            .unwrap()
            .entry(digest.clone())
            .or_default() += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
        if self.missing.contains(digest) {
            return Err(FailureClass::NotFound);
        }
        let bytes = self
            .blobs
            .get(digest)
            .cloned()
            .ok_or(FailureClass::NotFound)?;
        *self
            .served
            .lock()
            .unwrap()
            .entry(digest.clone())
            .or_default() += 1;
        Ok(bytes)
    }

    fn count(map: &Mutex<HashMap<Digest, u32>>, digest: &Digest) -> u32 {
        map.lock().unwrap().get(digest).copied().unwrap_or(0)
    }
}

fn sha256_digest(bytes: &[u8]) -> Digest {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Digest::parse(&format!("sha256:{hex}")).expect("a sha256 digest")
}

/// A manifest, a config and five layers with deterministic content.
fn image() -> Vec<(Blob, Vec<u8>)> {
    let mut blobs = Vec::new();
    let layer_sizes = [64 << 10, 256 << 10, 32 << 10, 512 << 10, 128 << 10];
    let mut layers = Vec::new();
    for (i, size) in layer_sizes.iter().enumerate() {
        let bytes: Vec<u8> = (0..*size).map(|n| (n * 31 + i * 7) as u8).collect();
        let digest = sha256_digest(&bytes);
        layers.push(digest.clone());
        blobs.push((
            Blob {
                digest,
                kind: OriginRefKind::Blob,
                name: format!("layer-{i}"),
                size: *size,
            },
            bytes,
        ));
    }
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let config_digest = sha256_digest(&config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"config":"{config_digest}","layers":[{}]}}"#,
        layers
            .iter()
            .map(|d| format!("\"{d}\""))
            .collect::<Vec<_>>()
            .join(",")
    )
    .into_bytes();
    blobs.insert(
        0,
        (
            Blob {
                digest: sha256_digest(&manifest),
                kind: OriginRefKind::Manifest,
                name: "manifest".into(),
                size: manifest.len(),
            },
            manifest,
        ),
    );
    blobs.insert(
        1,
        (
            Blob {
                digest: config_digest,
                kind: OriginRefKind::Config,
                name: "config".into(),
                size: config.len(),
            },
            config,
        ),
    );
    blobs
}

/// Hands pulls to a task that fetches from the origin and reports the end to the state.
struct OriginPump(mpsc::UnboundedSender<Digest>);

impl PullerPump for OriginPump {
    fn start(&self, order: PullOrder<'_>) -> PumpDecision {
        match self.0.send(order.digest.clone()) {
            Ok(()) => PumpDecision::Started,
            Err(_) => PumpDecision::RecentlyFailed(RecentFailure {
                cooldown_until: std::time::SystemTime::now() + Duration::from_secs(10),
                class: FailureClass::Transient,
            }),
        }
    }
}

enum Control {
    Dial(Multiaddr),
    Bootstrap(oneshot::Sender<usize>),
    Provide(Digest),
}

/// What the demo keeps of each node.
#[derive(Clone)]
struct Node {
    id: NodeId,
    state: NodeState,
    store: MemoryStore,
    coordinator: Coordinator,
    control: mpsc::UnboundedSender<Control>,
}

/// Starts one node's swarm task; returns its handle and its listen address.
async fn start_node(
    keypair: Keypair,
    id: NodeId,
    membership: StaticMembership,
    origin: Arc<Origin>,
) -> Result<(Node, Multiaddr), Box<dyn std::error::Error>> {
    let mut swarm = build_swarm(keypair, Config::default())?;
    let peer = *swarm.local_peer_id();
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address.with(Protocol::P2p(peer));
        }
    };
    let members = membership.clone();
    let store = MemoryStore::new();
    let (pulls, mut pulled) = mpsc::unbounded_channel::<Digest>();
    let state = NodeState::builder(membership)
        .store(store.clone())
        .pump(OriginPump(pulls))
        .build();
    let coordinator = swarm
        .behaviour()
        .coord
        .coordinator()
        .with_resolver(move |node| {
            members
                .members()
                .iter()
                .find(|m| &m.id == node)
                .and_then(|m| m.peer_id)
        });
    let (control, mut controls) = mpsc::unbounded_channel();
    let node = Node {
        id,
        state: state.clone(),
        store: store.clone(),
        coordinator,
        control: control.clone(),
    };

    // The origin side of the pump: pull, check the digest, store, report.
    let (finisher, announcer) = (state.clone(), control);
    tokio::spawn(async move {
        while let Some(digest) = pulled.recv().await {
            let (state, store, origin) = (finisher.clone(), store.clone(), origin.clone());
            let announcer = announcer.clone();
            tokio::spawn(async move {
                let result = match origin.pull(&digest).await {
                    Ok(bytes) if sha256_digest(&bytes) == digest => {
                        store.insert(digest.clone());
                        let _ = announcer.send(Control::Provide(digest.clone()));
                        Ok(())
                    }
                    Ok(_) => Err(FailureClass::Transient),
                    Err(class) => Err(class),
                };
                state.finish_pull(&digest, result);
            });
        }
    });

    tokio::spawn(async move {
        let mut bootstrap_waiters = Vec::new();
        loop {
            tokio::select! {
                event = swarm.select_next_some() => match event {
                    SwarmEvent::Behaviour(NodeBehaviourEvent::Coord(event)) => {
                        if let Some(event) = state.answer(&mut swarm.behaviour_mut().coord, event) {
                            tracing::debug!(?event, "coord");
                        }
                    }
                    SwarmEvent::Behaviour(NodeBehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                        for addr in info.listen_addrs {
                            swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                        }
                    }
                    SwarmEvent::Behaviour(NodeBehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                        result: kad::QueryResult::Bootstrap(result), step, ..
                    })) => {
                        let done = match result {
                            Ok(ok) => ok.num_remaining == 0 || step.last,
                            Err(_) => true,
                        };
                        if done {
                            let known = swarm.behaviour_mut().kad.kbuckets().map(|b| b.num_entries()).sum();
                            for waiter in bootstrap_waiters.drain(..) {
                                let _: Result<(), usize> = oneshot::Sender::send(waiter, known);
                            }
                        }
                    }
                    _ => {}
                },
                Some(control) = controls.recv() => match control {
                    Control::Dial(addr) => {
                        if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                        }
                        let _ = swarm.dial(addr);
                    }
                    Control::Bootstrap(waiter) => match swarm.behaviour_mut().kad.bootstrap() {
                        Ok(_) => bootstrap_waiters.push(waiter),
                        Err(_) => {
                            let _ = waiter.send(0);
                        }
                    },
                    Control::Provide(digest) => {
                        let key = kad::RecordKey::new(&digest.as_str());
                        let _ = swarm.behaviour_mut().kad.start_providing(key);
                    }
                },
            }
        }
    });
    Ok((node, addr))
}

/// How one node's cold start of one digest ended.
#[derive(Debug, Clone)]
enum Got {
    Cached { at: Duration },
    Failed { class: FailureClass },
}

/// The cold-start cascade for one digest on one node.
async fn cold_start(
    node: &Node,
    blob: &Blob,
    cluster: &HashMap<NodeId, Node>,
    members: &[Member],
    started: Instant,
) -> Got {
    let digest = &blob.digest;
    let top: Vec<NodeId> = hrw::top_k(members, digest, PROBE_K)
        .into_iter()
        .map(|m| m.id.clone())
        .collect();
    let designated = top[0].clone();
    loop {
        if node.store.lookup_cached(digest) {
            return Got::Cached {
                at: started.elapsed(),
            };
        }
        let probes = join_all(top.iter().map(|target| async move {
            let answer = if *target == node.id {
                Ok(node.state.local_pull_intent(digest))
            } else {
                node.coordinator.pull_intent_query(target, digest).await
            };
            (target.clone(), answer)
        }))
        .await;
        let answers: Vec<(NodeId, PullIntent)> = probes
            .into_iter()
            .filter_map(|(target, answer)| answer.ok().map(|a| (target, a)))
            .collect();

        if let Some(failure) = answers
            .iter()
            .filter_map(|(_, a)| a.recently_failed)
            .find(|f| f.class.is_trusted())
        {
            return Got::Failed {
                class: failure.class,
            };
        }
        if let Some((holder, _)) = answers.iter().find(|(_, a)| a.has_cached) {
            // Fetch from the holder: the transfer itself is another protocol's job.
            if cluster[holder].store.lookup_cached(digest) {
                node.store.insert(digest.clone());
                let _ = node.control.send(Control::Provide(digest.clone()));
                return Got::Cached {
                    at: started.elapsed(),
                };
            }
        }
        let fresh_pull = answers.iter().any(|(_, a)| {
            a.in_flight_since.is_some_and(|since| {
                since.elapsed().unwrap_or_default()
                    < gantry_coord::stale_after(blob.kind, Some(blob.size as u64))
            })
        });
        if !fresh_pull {
            let request = PleasePull::new(REGISTRY, REPOSITORY, blob.kind, vec![digest.clone()])
                .expect("a valid request");
            if designated == node.id {
                node.state.start_local_pull(&request);
            } else if let Err(error) = node.coordinator.please_pull(&designated, &request).await {
                tracing::warn!(%error, node = %node.id, "please_pull failed");
            }
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

trait CachedLookup {
    fn lookup_cached(&self, digest: &Digest) -> bool;
}

impl CachedLookup for MemoryStore {
    fn lookup_cached(&self, digest: &Digest) -> bool {
        use gantry_coord::ContentStore;
        self.lookup(digest) == gantry_coord::StoreLookup::Cached
    }
}

fn short(digest: &Digest) -> String {
    digest.as_str().chars().take(19).collect()
}

async fn run(nodes: usize) -> Result<bool, Box<dyn std::error::Error>> {
    let blobs = image();
    let failing = blobs
        .iter()
        .find(|(b, _)| b.name == "layer-2")
        .map(|(b, _)| b.digest.clone())
        .expect("layer-2 exists");
    let origin = Arc::new(Origin {
        blobs: blobs
            .iter()
            .map(|(b, bytes)| (b.digest.clone(), bytes.clone()))
            .collect(),
        missing: HashSet::from([failing]),
        served: Mutex::default(),
        attempts: Mutex::default(),
    });
    let blobs: Vec<Blob> = blobs.into_iter().map(|(b, _)| b).collect();

    // Identities first: the membership publishes every node's peer id.
    let keys: Vec<Keypair> = (0..nodes).map(|_| Keypair::generate_ed25519()).collect();
    let members: Vec<Member> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| Member::new(format!("node-{i}").as_str(), Some(k.public().to_peer_id())))
        .collect();

    println!("starting {nodes} nodes on loopback TCP");
    let mut cluster = HashMap::new();
    let mut order = Vec::new();
    let mut bootstrap_addr = None;
    for (i, key) in keys.into_iter().enumerate() {
        let id = NodeId::new(format!("node-{i}"));
        let membership = StaticMembership::new(id.clone(), members.clone());
        let (node, addr) = start_node(key, id.clone(), membership, origin.clone()).await?;
        match &bootstrap_addr {
            None => bootstrap_addr = Some(addr),
            Some(first) => {
                let _ = node.control.send(Control::Dial(first.clone()));
            }
        }
        order.push(id.clone());
        cluster.insert(id, node);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut known = Vec::new();
    for id in &order {
        let (tx, rx) = oneshot::channel();
        let _ = cluster[id].control.send(Control::Bootstrap(tx));
        known.push(
            tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0),
        );
    }
    println!("bootstrapped through node-0; routing-table sizes {known:?}");

    println!(
        "cold start: {} digests, every node needs all of them",
        blobs.len()
    );
    let started = Instant::now();
    let jobs = order.iter().flat_map(|id| {
        let node = &cluster[id];
        let (cluster, members) = (&cluster, &members);
        blobs.iter().map(move |blob| async move {
            let got = cold_start(node, blob, cluster, members, started).await;
            if let Got::Cached { at } = &got {
                tracing::debug!(node = %node.id, digest = %blob.digest, ?at, "cached");
            }
            (node.id.clone(), blob.digest.clone(), got)
        })
    });
    let progress = tokio::spawn({
        let stores: Vec<MemoryStore> = order.iter().map(|id| cluster[id].store.clone()).collect();
        let digests: Vec<Digest> = blobs.iter().map(|b| b.digest.clone()).collect();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let have: usize = stores
                    .iter()
                    .map(|s| digests.iter().filter(|d| s.lookup_cached(d)).count())
                    .sum();
                println!(
                    "progress: {have}/{} node-digests cached",
                    stores.len() * digests.len()
                );
            }
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(60), join_all(jobs)).await?;
    progress.abort();

    let mut ok = true;
    let mut failed = 0;
    let mut origin_pulls = 0;
    println!();
    println!(
        "{:<10} {:<9} {:<20} {:<9} {:>6} {:>9} {:>11} {:>9}  result",
        "blob", "kind", "digest", "puller", "pulls", "attempts", "first (ms)", "all (ms)"
    );
    for blob in &blobs {
        let puller = &hrw::top_k(&members, &blob.digest, 1)[0].id;
        let served = Origin::count(&origin.served, &blob.digest);
        let attempts = Origin::count(&origin.attempts, &blob.digest);
        origin_pulls += served;
        let got: Vec<&Got> = results
            .iter()
            .filter(|(_, d, _)| *d == blob.digest)
            .map(|(_, _, g)| g)
            .collect();
        let times: Vec<u128> = got
            .iter()
            .filter_map(|g| match g {
                Got::Cached { at } => Some(at.as_millis()),
                Got::Failed { .. } => None,
            })
            .collect();
        let failures: Vec<FailureClass> = got
            .iter()
            .filter_map(|g| match g {
                Got::Failed { class } => Some(*class),
                Got::Cached { .. } => None,
            })
            .collect();
        let result = if failures.is_empty() {
            ok &= served == 1 && times.len() == nodes;
            "cached everywhere".to_owned()
        } else {
            failed += 1;
            ok &= served == 0 && attempts == 1 && failures.len() == nodes;
            format!("failed ({:?}) on {} nodes", failures[0], failures.len())
        };
        let ms = |t: Option<&u128>| t.map_or("-".to_owned(), |t| t.to_string());
        println!(
            "{:<10} {:<9} {:<20} {:<9} {:>6} {:>9} {:>11} {:>9}  {result}",
            blob.name,
            format!("{:?}", blob.kind).to_lowercase(),
            short(&blob.digest),
            puller.as_str(),
            served,
            attempts,
            ms(times.iter().min()),
            ms(times.iter().max()),
        );
    }
    println!();
    if !ok {
        println!("error: the origin saw a digest more than once, or a node missed one");
    }
    println!(
        "summary: digests={} origin_pulls={origin_pulls} failed={failed} nodes={nodes}",
        blobs.len()
    );
    Ok(ok)
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let mut args = std::env::args().skip(1);
    let mut nodes = 8;
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next().map(|v| v.parse::<usize>())) {
            ("--nodes", Some(Ok(n))) if (1..=64).contains(&n) => nodes = n,
            _ => {
                eprintln!("usage: cluster [--nodes N]  (1 ≤ N ≤ 64)");
                return ExitCode::from(2);
            }
        }
    }
    match run(nodes).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

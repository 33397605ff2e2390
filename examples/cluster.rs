//! A cold start on a cluster in one process, through the crate's cold-start resolver.
//!
//! `cargo run --example cluster [-- --nodes N]` starts N nodes (default 8), each a full
//! swarm of Kademlia + Identify + coord bootstrapped through the first, on loopback TCP
//! (`--transport memory` for libp2p's in-memory transport, which a hundred nodes need,
//! with `--request-timeout-ms 5000`: a hundred swarms share two cores, and an answer can
//! take over a second to get through a busy swarm loop).
//! Every node then needs the same image (a manifest, a config and several layers) and
//! resolves each digest with [`ColdStart`]: HRW ranking, probes of the top 3, one
//! please_pull to the designated puller, and a wait for a Kademlia provider. An
//! in-process origin counts pulls per digest and fails one layer with 404: its puller
//! records it in the negative cache, and every other node stops instead of pulling again.
//!
//! Faults: `--kill-puller I` stops the swarm of blob I's designated puller 100 ms into
//! its origin pull; `--stall-puller I` makes that pull never finish while the node keeps
//! answering that it is pulling. `--stall-ms MS` shortens the stall thresholds so the
//! takeover comes quickly.
//!
//! The last line is `summary: digests=N origin_pulls=M failed=F nodes=K`.

mod common;

use std::{
    collections::{HashMap, HashSet},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use clap::Parser;
use common::{build_swarm_on, NodeBehaviourEvent};
use futures::{
    future::{join_all, BoxFuture},
    FutureExt, StreamExt,
};
use gantry_coord::{
    hrw, BlobRef, CascadeConfig, ColdStart, Config, ContentStore, Digest, FailureClass, Fetch,
    Member, MemoryStore, NodeId, NodeState, OriginRefKind, OriginRefused, PullOrder, PullerPump,
    PumpDecision, RecentFailure, Source, Stalls, StaticMembership, StoreLookup,
};
use libp2p::{
    identify, identity::Keypair, kad, multiaddr::Protocol, swarm::SwarmEvent, Multiaddr, PeerId,
};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

const REGISTRY: &str = "registry.example.com";
const REPOSITORY: &str = "library/demo";

/// The command line.
#[derive(Debug, Parser)]
#[command(about = "A cold start of one image on an in-process cluster")]
struct Args {
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    nodes: u16,
    /// tcp (loopback) or memory (libp2p's in-memory transport).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "memory"])]
    transport: String,
    /// Stop the designated puller of this blob (0-based, image order) 100 ms into its pull.
    #[arg(long)]
    kill_puller: Option<usize>,
    /// Make the designated puller of this blob never finish its pull.
    #[arg(long)]
    stall_puller: Option<usize>,
    /// The stall threshold for every kind, in milliseconds (default: the Go nodes').
    #[arg(long)]
    stall_ms: Option<u64>,
    /// Nodes start their cold start spread evenly over this many milliseconds.
    #[arg(long, default_value_t = 0)]
    spread_ms: u64,
    /// The budget of one coord request, dial included (the Go nodes' 2 s by default).
    /// A hundred swarms on two cores take up to a second and a half to get an answer
    /// through a busy swarm loop: a longer budget keeps a slow node from counting as
    /// down.
    #[arg(long, default_value_t = 2000)]
    request_timeout_ms: u64,
}

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
        *self.attempts.lock().unwrap().entry(*digest).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
        if self.missing.contains(digest) {
            return Err(FailureClass::NotFound);
        }
        let bytes = self
            .blobs
            .get(digest)
            .cloned()
            .ok_or(FailureClass::NotFound)?;
        *self.served.lock().unwrap().entry(*digest).or_default() += 1;
        Ok(bytes)
    }

    /// A pull the origin never finishes: the connection hangs.
    async fn hang(&self, digest: &Digest) {
        *self.attempts.lock().unwrap().entry(*digest).or_default() += 1;
        futures::future::pending::<()>().await;
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
        layers.push(digest);
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
        match self.0.send(*order.digest) {
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
    /// The members' addresses, as the membership publishes them.
    Addresses(Vec<(PeerId, Multiaddr)>),
    Bootstrap(oneshot::Sender<usize>),
    Provide(Digest),
}

/// A fault to inject into one node's pull of one digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Stall,
}

/// What the demo keeps of each node.
#[derive(Clone)]
struct Node {
    id: NodeId,
    peer: PeerId,
    store: MemoryStore,
    resolver: ColdStart,
    control: mpsc::UnboundedSender<Control>,
    dead: Arc<AtomicBool>,
}

/// Starts one node's swarm task; returns its handle and its listen address.
async fn start_node(
    keypair: Keypair,
    id: NodeId,
    membership: StaticMembership,
    origin: Arc<Origin>,
    args: &Args,
    fault: Option<(Digest, Fault)>,
) -> Result<(Node, Multiaddr), Box<dyn std::error::Error>> {
    let memory = args.transport == "memory";
    let config =
        Config::default().with_request_timeout(Duration::from_millis(args.request_timeout_ms));
    let mut swarm = build_swarm_on(keypair, config, memory)?;
    let peer = *swarm.local_peer_id();
    let listen = if memory {
        "/memory/0"
    } else {
        "/ip4/127.0.0.1/tcp/0"
    };
    swarm.listen_on(listen.parse()?)?;
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address.with(Protocol::P2p(peer));
        }
    };
    let store = MemoryStore::new();
    let (pulls, mut pulled) = mpsc::unbounded_channel::<Digest>();
    let state = NodeState::builder(membership)
        .store(store.clone())
        .pump(OriginPump(pulls))
        .build();
    let (control, mut controls) = mpsc::unbounded_channel();
    // Nodes in one process reach each other in microseconds: look again sooner.
    let mut cascade = CascadeConfig::default()
        .with_retry_backoff(Duration::from_millis(50), Duration::from_millis(800));
    if let Some(ms) = args.stall_ms {
        let stall = Duration::from_millis(ms);
        cascade = cascade.with_stalls(Stalls {
            manifest: stall,
            floor: stall,
            multiplier: 1,
            ..Stalls::default()
        });
    }
    // The resolver asks Kademlia for providers through the swarm loop below.
    let (providers, mut lookups) = gantry_coord::kad_providers();
    let resolver = ColdStart::new(
        swarm.behaviour().coord.coordinator(),
        state.clone(),
        providers,
        cascade,
    );
    let dead = Arc::new(AtomicBool::new(false));
    let (kill, mut killed) = oneshot::channel::<()>();
    let node = Node {
        id,
        peer,
        store: store.clone(),
        resolver,
        control: control.clone(),
        dead: dead.clone(),
    };

    // The origin side of the pump: pull, check the digest, store, report.
    let (finisher, announcer) = (state.clone(), control);
    let mut kill = Some(kill);
    tokio::spawn(async move {
        while let Some(digest) = pulled.recv().await {
            let fault = fault
                .as_ref()
                .filter(|(d, _)| *d == digest)
                .map(|(_, f)| *f);
            let (state, store, origin) = (finisher.clone(), store.clone(), origin.clone());
            let (announcer, dead) = (announcer.clone(), dead.clone());
            if fault == Some(Fault::Kill) {
                if let Some(kill) = kill.take() {
                    let dead = dead.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        dead.store(true, Ordering::SeqCst);
                        let _ = kill.send(());
                    });
                }
            }
            tokio::spawn(async move {
                if dead.load(Ordering::SeqCst) {
                    // A stopped node pulls nothing: its resolver may still be mid-way.
                    return;
                }
                if fault == Some(Fault::Stall) {
                    // In flight forever: the node keeps answering that it is pulling.
                    origin.hang(&digest).await;
                }
                let result = match origin.pull(&digest).await {
                    // A dead node stores nothing and reports nothing.
                    _ if dead.load(Ordering::SeqCst) => return,
                    Ok(bytes) if sha256_digest(&bytes) == digest => {
                        store.insert(digest);
                        let _ = announcer.send(Control::Provide(digest));
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
                _ = &mut killed => return,
                Some(lookup) = lookups.next_lookup() => {
                    lookups.start(lookup, &mut swarm.behaviour_mut().kad);
                }
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
                    SwarmEvent::Behaviour(NodeBehaviourEvent::Kad(event)) => {
                        if lookups.on_event(&event, &mut swarm.behaviour_mut().kad) {
                            continue;
                        }
                        if let kad::Event::OutboundQueryProgressed {
                            result: kad::QueryResult::Bootstrap(result), step, ..
                        } = event
                        {
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
                    Control::Addresses(addresses) => {
                        for (peer, addr) in addresses {
                            swarm.add_peer_address(peer, addr);
                        }
                    }
                    Control::Bootstrap(waiter) => match swarm.behaviour_mut().kad.bootstrap() {
                        Ok(_) => bootstrap_waiters.push(waiter),
                        Err(_) => {
                            let _ = waiter.send(0);
                        }
                    },
                    Control::Provide(digest) => {
                        let key = gantry_coord::provider_key(&digest);
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
    Cached {
        at: Duration,
    },
    Failed {
        class: FailureClass,
    },
    /// The node itself was stopped.
    Dead,
}

/// Resolves one digest on one node with the resolver's own resolve-fetch-retry loop,
/// until it is stored, a trusted failure says stop, or the node is dead.
async fn cold_start(
    node: &Node,
    blob: &Blob,
    cluster: &HashMap<PeerId, Node>,
    by_id: &HashMap<NodeId, PeerId>,
    started: Instant,
    messages: &AtomicU64,
) -> Got {
    let origin = gantry_coord::Origin::new(REGISTRY, REPOSITORY).expect("a valid origin");
    let wanted = BlobRef::new(blob.digest, blob.kind).with_size(blob.size as u64);
    let fetch = LookInto {
        node,
        cluster,
        by_id,
    };
    let dead = async {
        while !node.dead.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        obtained = node.resolver.obtain(&origin, wanted, &fetch) => match obtained {
            Ok(obtained) => {
                messages.fetch_add(u64::from(obtained.messages), Ordering::Relaxed);
                Got::Cached { at: started.elapsed() }
            }
            Err(OriginRefused(class)) => Got::Failed { class },
        },
        () = dead => Got::Dead,
    }
}

/// The transfer itself is another protocol's job: here, a look into the holder's store.
struct LookInto<'a> {
    node: &'a Node,
    cluster: &'a HashMap<PeerId, Node>,
    by_id: &'a HashMap<NodeId, PeerId>,
}

impl Fetch for LookInto<'_> {
    fn fetch<'a>(&'a self, blob: BlobRef, source: &'a Source) -> BoxFuture<'a, bool> {
        let holders: Vec<&Node> = match source {
            // The demo's transfer takes whole blobs: a pull under way is not one yet.
            Source::Holder(id) | Source::Pulling(id) => self
                .by_id
                .get(id)
                .and_then(|p| self.cluster.get(p))
                .into_iter()
                .collect(),
            Source::Providers(peers) => peers.iter().filter_map(|p| self.cluster.get(p)).collect(),
        };
        let found = holders
            .iter()
            .any(|h| !h.dead.load(Ordering::SeqCst) && cached(&h.store, &blob.digest));
        if found {
            self.node.store.insert(blob.digest);
            let _ = self.node.control.send(Control::Provide(blob.digest));
        }
        futures::future::ready(found).boxed()
    }
}

fn cached(store: &MemoryStore, digest: &Digest) -> bool {
    store.lookup(digest) == StoreLookup::Cached
}

fn short(digest: &Digest) -> String {
    digest.encode().as_str().chars().take(19).collect()
}

async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    let nodes = usize::from(args.nodes);
    let blobs = image();
    let failing = blobs
        .iter()
        .find(|(b, _)| b.name == "layer-2")
        .map(|(b, _)| b.digest)
        .expect("layer-2 exists");
    let origin = Arc::new(Origin {
        blobs: blobs
            .iter()
            .map(|(b, bytes)| (b.digest, bytes.clone()))
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
    let designated = |blob: &Blob| hrw::top_k(&members, &blob.digest, 1)[0].id.clone();
    let mut faults: HashMap<NodeId, (Digest, Fault)> = HashMap::new();
    for (index, fault) in [
        (args.kill_puller, Fault::Kill),
        (args.stall_puller, Fault::Stall),
    ] {
        if let Some(index) = index {
            let blob = blobs.get(index).ok_or("no blob with that index")?;
            faults.insert(designated(blob), (blob.digest, fault));
        }
    }

    println!(
        "starting {nodes} nodes on {}",
        match args.transport.as_str() {
            "memory" => "the in-memory transport",
            _ => "loopback TCP",
        }
    );
    let mut cluster = HashMap::new();
    let mut by_id = HashMap::new();
    let mut order = Vec::new();
    let mut bootstrap_addr = None;
    let mut addresses = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        let id = NodeId::new(format!("node-{i}"));
        let membership = StaticMembership::new(id.clone(), members.clone());
        let fault = faults.get(&id).cloned();
        let (node, addr) =
            start_node(key, id.clone(), membership, origin.clone(), &args, fault).await?;
        match &bootstrap_addr {
            None => bootstrap_addr = Some(addr.clone()),
            Some(first) => {
                let _ = node.control.send(Control::Dial(first.clone()));
            }
        }
        order.push(node.peer);
        by_id.insert(id, node.peer);
        addresses.push((node.peer, addr));
        cluster.insert(node.peer, node);
    }
    // Each node knows every member's address, as a membership view carries them: a
    // please_pull to the designated puller never waits on its routing table.
    for node in cluster.values() {
        let _ = node.control.send(Control::Addresses(addresses.clone()));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let known = join_all(order.iter().map(|peer| {
        let (tx, rx) = oneshot::channel();
        let _ = cluster[peer].control.send(Control::Bootstrap(tx));
        async move {
            tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0)
        }
    }))
    .await;
    let (least, most) = (known.iter().min(), known.iter().max());
    println!("bootstrapped through node-0; routing-table sizes {least:?} to {most:?}");

    println!(
        "cold start: {} digests, every node needs all of them",
        blobs.len()
    );
    let started = Instant::now();
    let messages = AtomicU64::new(0);
    let spread = Duration::from_millis(args.spread_ms);
    let jobs = order.iter().enumerate().flat_map(|(i, peer)| {
        let node = &cluster[peer];
        let (cluster, by_id, messages) = (&cluster, &by_id, &messages);
        // Nodes of a rollout start within `--spread-ms` of each other, not in lockstep.
        let delay = spread * i as u32 / nodes as u32;
        blobs.iter().map(move |blob| async move {
            tokio::time::sleep(delay).await;
            let got = cold_start(node, blob, cluster, by_id, started, messages).await;
            (node.id.clone(), blob.digest, got)
        })
    });
    let progress = tokio::spawn({
        let stores: Vec<MemoryStore> = order.iter().map(|p| cluster[p].store.clone()).collect();
        let digests: Vec<Digest> = blobs.iter().map(|b| b.digest).collect();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let have: usize = stores
                    .iter()
                    .map(|s| digests.iter().filter(|d| cached(s, d)).count())
                    .sum();
                println!(
                    "progress: {have}/{} node-digests cached",
                    stores.len() * digests.len()
                );
            }
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(240), join_all(jobs)).await?;
    progress.abort();

    let live: HashSet<NodeId> = order
        .iter()
        .map(|p| &cluster[p])
        .filter(|n| !n.dead.load(Ordering::SeqCst))
        .map(|n| n.id.clone())
        .collect();
    let alive = live.len();
    // Blobs whose designated puller is the killed or stalled node.
    let faulty: HashSet<&Digest> = blobs
        .iter()
        .filter(|b| faults.contains_key(&designated(b)))
        .map(|b| &b.digest)
        .collect();
    let mut ok = true;
    let mut failed = 0;
    let mut origin_pulls = 0;
    println!();
    println!(
        "{:<10} {:<9} {:<20} {:<9} {:>6} {:>9} {:>11} {:>9}  result",
        "blob", "kind", "digest", "puller", "pulls", "attempts", "first (ms)", "all (ms)"
    );
    for blob in &blobs {
        let puller = designated(blob);
        let served = Origin::count(&origin.served, &blob.digest);
        let attempts = Origin::count(&origin.attempts, &blob.digest);
        origin_pulls += served;
        // What the live nodes ended with: a stopped node's results do not count.
        let got: Vec<&Got> = results
            .iter()
            .filter(|(node, d, _)| *d == blob.digest && live.contains(node))
            .map(|(_, _, g)| g)
            .collect();
        let times: Vec<u128> = got
            .iter()
            .filter_map(|g| match g {
                Got::Cached { at } => Some(at.as_millis()),
                _ => None,
            })
            .collect();
        let failures: Vec<FailureClass> = got
            .iter()
            .filter_map(|g| match g {
                Got::Failed { class } => Some(*class),
                _ => None,
            })
            .collect();
        // One origin pull per blob; a blob whose puller was killed or stalled may see
        // one more, from the node that took over.
        let allowed = if faulty.contains(&blob.digest) { 2 } else { 1 };
        let result = if failures.is_empty() {
            ok &= (1..=allowed).contains(&served) && attempts <= allowed && times.len() == alive;
            if alive == nodes {
                "cached everywhere".to_owned()
            } else {
                format!("cached on all {alive} live nodes")
            }
        } else {
            failed += 1;
            ok &= served == 0 && attempts <= allowed && failures.len() == alive;
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
    let per = messages.load(Ordering::Relaxed) as f64 / (nodes * blobs.len()) as f64;
    println!("coordination messages per node-digest: {per:.2} (probes and please_pulls sent)");
    if !ok {
        println!("error: the origin saw a digest more often than allowed, or a node missed one");
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
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

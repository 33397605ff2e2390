//! The simulated cluster: each node's real `NodeState` (in-flight map, negative cache,
//! pump decisions) and real `Cascade`s, driven as `ColdStart::obtain` drives them, over a
//! simulated network, origin and provider lookup, all on simulated time.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use gantry_coord::{
    hrw, Action, BlobRef, Cascade, CascadeConfig, Clock, ColdStartError, Digest, FallbackConfig,
    FallbackPermit, Member, Membership, MemoryStore, NodeId, NodeState, Now, Origin,
    OriginFallback, OriginRefKind, Outcome, ProbeAnswer, PullIntent, PullOrder, PullerPump,
    PumpDecision, Resolution, Source,
};
use libp2p::PeerId;
use parking_lot::Mutex;

/// Simulated time, in microseconds since the first node could start.
pub type Micros = u64;

const MS: Micros = 1_000;
const SECOND: Micros = 1_000_000;

/// What a run is made of.
#[derive(Debug, Clone)]
pub struct Setup {
    pub nodes: usize,
    pub seed: u64,
    pub spread: Micros,
    pub dead: f64,
    pub kill_puller: Option<usize>,
    pub lag: Micros,
    pub lagging: f64,
    pub zones: usize,
    /// One-way latency of a message, and how much it varies (uniform, ±).
    pub latency: Micros,
    pub jitter: Micros,
    /// A message is lost with this probability (each direction).
    pub loss: f64,
    /// Inbound coord requests a node answers per second; beyond its answer deadline a
    /// queued request is dropped.
    pub inbound_cap: u32,
    /// The origin: its latency and link rate, per pull.
    pub origin_latency: Micros,
    pub origin_bytes_per_s: u64,
    /// Transfers between nodes.
    pub node_bytes_per_s: u64,
    /// The provider lookup: its latency and how often it finds nothing that exists.
    pub lookup_latency: Micros,
    pub lookup_empty: f64,
    /// How often the membership publishes a new snapshot.
    pub publish_every: Micros,
    /// A puller advertises a blob when its pull starts and serves it as it arrives (the
    /// transfer of issue-20 pieces), rather than once it holds all of it.
    pub partial_holders: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            nodes: 1000,
            seed: 1,
            spread: 10 * SECOND,
            dead: 0.0,
            kill_puller: None,
            lag: 2 * SECOND,
            lagging: 0.0,
            zones: 1,
            latency: 500,
            jitter: 250,
            loss: 0.0,
            inbound_cap: 20_000,
            origin_latency: 50 * MS,
            origin_bytes_per_s: 125_000_000,
            node_bytes_per_s: 1_250_000_000,
            lookup_latency: 20 * MS,
            lookup_empty: 0.05,
            publish_every: 200 * MS,
            partial_holders: false,
        }
    }
}

/// One blob of the image.
#[derive(Debug, Clone, Copy)]
pub struct Blob {
    pub digest: Digest,
    pub kind: OriginRefKind,
    pub size: u64,
}

/// The image every node pulls: its manifest first, then the rest at once.
pub fn image() -> Vec<Blob> {
    let blob = |name: &str, kind, size| Blob {
        digest: Digest::from_sha256(sha2_of(name.as_bytes())),
        kind,
        size,
    };
    vec![
        blob("manifest", OriginRefKind::Manifest, 2 << 10),
        blob("config", OriginRefKind::Config, 8 << 10),
        blob("layer-1", OriginRefKind::Blob, 30 << 20),
        blob("layer-2", OriginRefKind::Blob, 120 << 20),
    ]
}

fn sha2_of(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(bytes).into()
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Figures {
    pub nodes: usize,
    pub digests: usize,
    pub origin_pulls: u64,
    pub origin_pulls_per_digest: Vec<u64>,
    pub msgs_per_node_digest: f64,
    pub peak_inbound_per_s: u64,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub p100_ms: u64,
    /// Nodes that never got every blob (dead ones excluded).
    pub unfinished: usize,
    /// Blobs the killed puller was pulling when it died.
    pub killed_held: usize,
    pub events: u64,
    /// When each live node had every blob, in ms, sorted; for the plot.
    #[serde(skip)]
    pub done_ms: Vec<u64>,
    /// Live nodes.
    #[serde(skip)]
    pub live: usize,
}

/// A deterministic generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// The clock every node's `NodeState` reads: the simulation's.
#[derive(Clone)]
struct SimClock {
    now: Arc<AtomicU64>,
    base: Instant,
    wall: SystemTime,
}

impl SimClock {
    fn at(&self, t: Micros) -> Now {
        Now {
            instant: self.base + Duration::from_micros(t),
            wall: self.wall + Duration::from_micros(t),
        }
    }

    fn micros_of(&self, instant: Instant) -> Micros {
        instant.saturating_duration_since(self.base).as_micros() as Micros
    }
}

impl Clock for SimClock {
    fn now(&self) -> SystemTime {
        self.wall + Duration::from_micros(self.now.load(Ordering::Relaxed))
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_micros(self.now.load(Ordering::Relaxed))
    }
}

/// Snapshots the membership published, in time order. Every node of the cluster is a
/// member from the start (its node id and zone, as the cluster's node list has them); a
/// member's peer id appears in the snapshots published after it started (a dead member
/// published one before it went down). Shared by every node; a node sees the latest one
/// published by (now - its lag), and cannot reach a member whose peer id it has not seen.
struct Published {
    snapshots: Vec<(Micros, Arc<[Member]>)>,
}

impl Published {
    fn index_at(&self, t: Micros) -> Option<usize> {
        let after = self.snapshots.partition_point(|(at, _)| *at <= t);
        after.checked_sub(1)
    }
}

struct SimMembership {
    local: NodeId,
    published: Arc<Published>,
    lag: Micros,
    clock: SimClock,
}

impl SimMembership {
    fn snapshot(&self) -> Option<usize> {
        let now = self.clock.now.load(Ordering::Relaxed);
        self.published.index_at(now.saturating_sub(self.lag))
    }
}

impl Membership for SimMembership {
    fn local_id(&self) -> NodeId {
        self.local.clone()
    }

    fn members(&self) -> Arc<[Member]> {
        match self.snapshot() {
            Some(i) => self.published.snapshots[i].1.clone(),
            None => Arc::from(Vec::new()),
        }
    }
}

/// Starts every pull at once and tells the simulation, which lands it later.
struct SimPump {
    node: usize,
    started: Arc<Mutex<Vec<(usize, Digest)>>>,
}

impl PullerPump for SimPump {
    fn start(&self, order: PullOrder<'_>) -> PumpDecision {
        self.started.lock().push((self.node, *order.digest));
        PumpDecision::Started
    }
}

/// What a node's task for one blob waits for.
#[derive(Debug)]
enum Pending {
    /// The provider lookup asked before any member.
    LookupFirst,
    /// Answers to the probe of `asked` nodes.
    Probe {
        answers: Vec<(NodeId, ProbeAnswer)>,
        outstanding: usize,
    },
    PleasePull,
    /// A look at the provider lookup, and the watched node's answer if it was probed.
    Look {
        providers: Option<Vec<PeerId>>,
        watched: Option<Option<PullIntent>>,
    },
    Fetch,
    /// A timer: what to do when it fires.
    Sleep(Wake),
    Done,
}

#[derive(Debug, Clone, Copy)]
enum Wake {
    /// Start over: holds it? lookup, cascade.
    Begin,
    Retry,
    Look,
    /// The fallback's jitter has passed: recheck, then pull.
    FallBack,
}

struct Task {
    node: usize,
    blob: usize,
    cascade: Option<Cascade>,
    pending: Pending,
    /// Bumped whenever the task moves on, so stale events are dropped.
    round: u64,
    ask_lookup_first: bool,
    backoff: Micros,
    permit: Option<FallbackPermit>,
    watched_node: Option<NodeId>,
}

struct Node {
    id: NodeId,
    peer: PeerId,
    state: NodeState,
    store: MemoryStore,
    fallback: OriginFallback,
    /// Digests whose transient failure is honoured, until when.
    honour: HashMap<Digest, Micros>,
    start: Micros,
    dead: bool,
    dead_from_start: bool,
    /// When it first held every blob.
    finished: Option<Micros>,
    held: usize,
    /// Inbound coord requests per second of simulated time.
    inbound: Vec<u32>,
    /// When its inbound queue is next free.
    free_at: Micros,
    /// Tasks per blob, once started.
    tasks: Vec<Option<usize>>,
    /// Blobs it announced to the provider lookup.
    announced: Vec<bool>,
}

#[derive(Debug, Clone)]
enum Request {
    Probe(Digest),
    PleasePull(Digest),
}

#[derive(Debug, Clone)]
enum Reply {
    Intent(ProbeAnswer),
    Outcome(Option<Outcome>),
}

#[derive(Debug)]
enum Event {
    Start(usize),
    Timer {
        task: usize,
        round: u64,
    },
    /// A request reaches its node.
    Arrive {
        id: u64,
    },
    /// The node answers it.
    Serve {
        id: u64,
    },
    /// The answer reaches the requester.
    Answer {
        id: u64,
        reply: Reply,
    },
    /// The requester gives up on it.
    Expire {
        id: u64,
    },
    Lookup {
        task: usize,
        round: u64,
        providers: Vec<PeerId>,
    },
    PullLanded {
        node: usize,
        blob: usize,
    },
    Fetched {
        task: usize,
        round: u64,
        from: usize,
    },
    Kill(usize),
    Provide {
        node: usize,
        blob: usize,
    },
}

struct InFlightRequest {
    task: usize,
    round: u64,
    from: usize,
    to: usize,
    to_id: NodeId,
    request: Request,
    sent: Micros,
    /// The watched node's probe, not a probe round's.
    watch: bool,
}

pub struct Simulation {
    setup: Setup,
    config: Arc<CascadeConfig>,
    clock: SimClock,
    rng: Rng,
    queue: BinaryHeap<Reverse<(Micros, u64)>>,
    events: HashMap<u64, Event>,
    seq: u64,
    now: Micros,
    image: Vec<Blob>,
    nodes: Vec<Node>,
    by_id: HashMap<NodeId, usize>,
    by_peer: HashMap<PeerId, usize>,
    published: Arc<Published>,
    tasks: Vec<Task>,
    requests: HashMap<u64, InFlightRequest>,
    next_request: u64,
    started_pulls: Arc<Mutex<Vec<(usize, Digest)>>>,
    /// Nodes that announced each blob, in order.
    providers: Vec<Vec<usize>>,
    rankings: HashMap<(usize, Option<usize>), Vec<NodeId>>,
    origin_pulls: Vec<u64>,
    messages: u64,
    kill_armed: Option<usize>,
    lagging: Vec<bool>,
    /// Pulls under way: when each lands.
    landing: HashMap<(usize, usize), Micros>,
    killed_held: usize,
    handled: u64,
}

impl Simulation {
    pub fn new(setup: Setup) -> Self {
        let mut rng = Rng::new(setup.seed);
        let image = image();
        let clock = SimClock {
            now: Arc::default(),
            base: Instant::now(),
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        };
        let zone_scope = setup.zones > 1;
        let config = Arc::new(CascadeConfig::default().with_zone_scope(zone_scope));
        // Start times across the spread, and who is dead or lagging.
        let mut starts: Vec<Micros> = (0..setup.nodes)
            .map(|_| rng.below(setup.spread.max(1)))
            .collect();
        starts[0] = 0;
        let dead: Vec<bool> = (0..setup.nodes).map(|_| rng.unit() < setup.dead).collect();
        let lagging: Vec<bool> = (0..setup.nodes)
            .map(|_| rng.unit() < setup.lagging)
            .collect();
        let ids: Vec<NodeId> = (0..setup.nodes)
            .map(|i| NodeId::new(format!("node-{i:05}")))
            .collect();
        let peers: Vec<PeerId> = (0..setup.nodes).map(|i| peer_of(i as u64)).collect();
        let member = |i: usize| {
            let m = Member::new(ids[i].clone(), Some(peers[i]));
            if setup.zones > 1 {
                m.with_zone(format!("zone-{}", i % setup.zones))
            } else {
                m
            }
        };
        // A snapshot at every publication: the peer ids of the nodes started by then.
        let mut snapshots = Vec::new();
        let last = starts.iter().copied().max().unwrap_or(0);
        let mut at = 0;
        loop {
            let members: Vec<Member> = (0..setup.nodes)
                .map(|i| {
                    let mut m = member(i);
                    if !(dead[i] || starts[i] <= at) {
                        m.peer_id = None;
                    }
                    m
                })
                .collect();
            snapshots.push((at, Arc::<[Member]>::from(members)));
            if at > last {
                break;
            }
            at += setup.publish_every.max(MS);
        }
        let published = Arc::new(Published { snapshots });
        let started_pulls: Arc<Mutex<Vec<(usize, Digest)>>> = Arc::default();
        let nodes: Vec<Node> = (0..setup.nodes)
            .map(|i| {
                let store = MemoryStore::new();
                let membership = SimMembership {
                    local: ids[i].clone(),
                    published: published.clone(),
                    lag: if lagging[i] { setup.lag } else { 0 },
                    clock: clock.clone(),
                };
                let state = NodeState::builder(membership)
                    .store(store.clone())
                    .pump(SimPump {
                        node: i,
                        started: started_pulls.clone(),
                    })
                    .clock(clock.clone())
                    .build();
                let fallback = OriginFallback::with_seed(
                    FallbackConfig::default(),
                    clock.at(starts[i]).instant,
                    setup.seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
                );
                Node {
                    id: ids[i].clone(),
                    peer: peers[i],
                    state,
                    store,
                    fallback,
                    honour: HashMap::new(),
                    start: starts[i],
                    dead: dead[i],
                    dead_from_start: dead[i],
                    finished: None,
                    held: 0,
                    inbound: Vec::new(),
                    free_at: 0,
                    tasks: vec![None; image.len()],
                    announced: vec![false; image.len()],
                }
            })
            .collect();
        let by_id = ids.iter().cloned().zip(0..).collect();
        let by_peer = peers.iter().copied().zip(0..).collect();
        let mut sim = Simulation {
            kill_armed: setup.kill_puller,
            lagging: lagging.clone(),
            landing: HashMap::new(),
            origin_pulls: vec![0; image.len()],
            providers: vec![Vec::new(); image.len()],
            setup,
            config,
            clock,
            rng,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            now: 0,
            image,
            nodes,
            by_id,
            by_peer,
            published,
            tasks: Vec::new(),
            requests: HashMap::new(),
            next_request: 0,
            started_pulls,
            rankings: HashMap::new(),
            messages: 0,
            killed_held: 0,
            handled: 0,
        };
        for i in 0..sim.nodes.len() {
            if !sim.nodes[i].dead {
                let at = sim.nodes[i].start;
                sim.schedule(at, Event::Start(i));
            }
        }
        sim
    }

    fn schedule(&mut self, at: Micros, event: Event) {
        let seq = self.seq;
        self.seq += 1;
        self.events.insert(seq, event);
        self.queue.push(Reverse((at.max(self.now), seq)));
    }

    fn latency(&mut self) -> Micros {
        let jitter = self.setup.jitter;
        self.setup.latency + self.rng.below(2 * jitter + 1) - jitter.min(self.setup.latency)
    }

    fn lost(&mut self) -> bool {
        self.setup.loss > 0.0 && self.rng.unit() < self.setup.loss
    }

    /// Runs to the end: every live node has every blob, or nothing is left to happen.
    pub fn run(mut self) -> Figures {
        let limit = 600 * SECOND;
        while let Some(Reverse((at, seq))) = self.queue.pop() {
            if at > limit {
                break;
            }
            self.now = at;
            self.clock.now.store(at, Ordering::Relaxed);
            let Some(event) = self.events.remove(&seq) else {
                continue;
            };
            self.handled += 1;
            self.handle(event);
            self.land_started_pulls();
        }
        self.figures()
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Start(node) => self.start_task(node, 0),
            Event::Timer { task, round } => {
                if self.tasks[task].round != round {
                    return;
                }
                if let Pending::Sleep(wake) = self.tasks[task].pending {
                    self.wake(task, wake);
                }
            }
            Event::Arrive { id } => self.arrive(id),
            Event::Serve { id } => self.serve(id),
            Event::Answer { id, reply } => {
                if let Some(request) = self.requests.remove(&id) {
                    self.answered(request, reply);
                }
            }
            Event::Expire { id } => {
                if let Some(request) = self.requests.remove(&id) {
                    let reply = match request.request {
                        Request::Probe(_) => Reply::Intent(ProbeAnswer::Silent),
                        Request::PleasePull(_) => Reply::Outcome(None),
                    };
                    self.answered(request, reply);
                }
            }
            Event::Lookup {
                task,
                round,
                providers,
            } => self.looked_up(task, round, providers),
            Event::PullLanded { node, blob } => {
                if self.nodes[node].dead {
                    return;
                }
                let digest = self.image[blob].digest;
                self.landing.remove(&(node, blob));
                self.nodes[node].store.insert(digest);
                self.nodes[node].state.finish_pull(&digest, Ok(()));
                self.stored(node, blob);
            }
            Event::Fetched { task, round, from } => {
                if self.tasks[task].round != round {
                    return;
                }
                let (node, blob) = (self.tasks[task].node, self.tasks[task].blob);
                let digest = self.image[blob].digest;
                let held = !self.nodes[from].dead && self.holds(from, blob);
                if held {
                    self.nodes[node].store.insert(digest);
                    self.stored(node, blob);
                    self.finish_task(task);
                } else {
                    self.tasks[task].ask_lookup_first = false;
                    self.backoff(task);
                }
            }
            Event::Kill(node) => {
                self.nodes[node].dead = true;
                self.killed_held = (0..self.image.len())
                    .filter(|&b| {
                        self.nodes[node]
                            .state
                            .local_pull_intent(&self.image[b].digest)
                            .in_flight_since
                            .is_some()
                    })
                    .count();
            }
            Event::Provide { node, blob } => {
                if !self.nodes[node].dead && !self.nodes[node].announced[blob] {
                    self.nodes[node].announced[blob] = true;
                    self.providers[blob].push(node);
                }
            }
        }
    }

    fn holds(&self, node: usize, blob: usize) -> bool {
        self.nodes[node].state.holds(&self.image[blob].digest)
    }

    /// A node stored a blob: it announces it, and its next blobs start.
    fn stored(&mut self, node: usize, blob: usize) {
        let at = self.now + self.setup.lookup_latency;
        self.schedule(at, Event::Provide { node, blob });
        let n = &mut self.nodes[node];
        n.held += 1;
        if n.held == self.image.len() && n.finished.is_none() {
            n.finished = Some(self.now);
        }
        if blob == 0 {
            for next in 1..self.image.len() {
                self.start_task(node, next);
            }
        }
    }

    fn start_task(&mut self, node: usize, blob: usize) {
        if self.nodes[node].tasks[blob].is_some() {
            return;
        }
        let task = self.tasks.len();
        self.tasks.push(Task {
            node,
            blob,
            cascade: None,
            pending: Pending::Done,
            round: 0,
            ask_lookup_first: true,
            backoff: self.config_backoff().0,
            permit: None,
            watched_node: None,
        });
        self.nodes[node].tasks[blob] = Some(task);
        self.begin(task);
    }

    fn config_backoff(&self) -> (Micros, Micros) {
        (100 * MS, 2 * SECOND)
    }

    fn next_round(&mut self, task: usize) -> u64 {
        self.tasks[task].round += 1;
        self.tasks[task].round
    }

    fn sleep(&mut self, task: usize, until: Micros, wake: Wake) {
        let round = self.next_round(task);
        self.tasks[task].pending = Pending::Sleep(wake);
        self.schedule(until, Event::Timer { task, round });
    }

    fn backoff(&mut self, task: usize) {
        let wait = self.tasks[task].backoff;
        self.tasks[task].backoff = (wait * 2).min(self.config_backoff().1);
        self.sleep(task, self.now + wait, Wake::Begin);
    }

    fn finish_task(&mut self, task: usize) {
        self.next_round(task);
        self.tasks[task].pending = Pending::Done;
        self.tasks[task].cascade = None;
    }

    /// `ColdStart::obtain`'s loop: held? then the lookup, then a resolution.
    fn begin(&mut self, task: usize) {
        let (node, blob) = (self.tasks[task].node, self.tasks[task].blob);
        if self.nodes[node].dead {
            return;
        }
        if self.holds(node, blob) {
            self.finish_task(task);
            return;
        }
        if std::mem::replace(&mut self.tasks[task].ask_lookup_first, true) {
            let round = self.next_round(task);
            self.tasks[task].pending = Pending::LookupFirst;
            self.lookup(task, round);
            return;
        }
        self.resolve(task);
    }

    fn lookup(&mut self, task: usize, round: u64) {
        let blob = self.tasks[task].blob;
        let providers: Vec<PeerId> = if self.rng.unit() < self.setup.lookup_empty {
            Vec::new()
        } else {
            self.providers[blob]
                .iter()
                .filter(|&&p| !self.nodes[p].dead)
                .take(20)
                .map(|&p| self.nodes[p].peer)
                .collect()
        };
        let at = self.now + self.setup.lookup_latency;
        self.schedule(
            at,
            Event::Lookup {
                task,
                round,
                providers,
            },
        );
    }

    fn looked_up(&mut self, task: usize, round: u64, providers: Vec<PeerId>) {
        if self.tasks[task].round != round {
            return;
        }
        match &mut self.tasks[task].pending {
            Pending::LookupFirst => {
                if providers.is_empty() {
                    self.resolve(task);
                } else {
                    self.tasks[task].ask_lookup_first = false;
                    self.fetch(task, &Source::Providers(providers));
                }
            }
            Pending::Look {
                providers: slot, ..
            } => {
                *slot = Some(providers);
                self.look_complete(task);
            }
            _ => {}
        }
    }

    fn resolve(&mut self, task: usize) {
        let (node, blob) = (self.tasks[task].node, self.tasks[task].blob);
        let digest = self.image[blob].digest;
        if let Some(&until) = self.nodes[node].honour.get(&digest) {
            if self.now < until {
                self.sleep(task, until, Wake::Begin);
                return;
            }
            self.nodes[node].honour.remove(&digest);
        }
        let ranked = self.ranking(node, blob);
        let local = self.nodes[node].id.clone();
        let wanted = BlobRef::new(digest, self.image[blob].kind).with_size(self.image[blob].size);
        let (cascade, action) =
            Cascade::from_ranking(self.config.clone(), ranked, &local, wanted, false);
        self.tasks[task].cascade = Some(cascade);
        self.act(task, action);
    }

    /// The top 2K of the node's current view, shared by every node with the same view.
    fn ranking(&mut self, node: usize, blob: usize) -> Vec<NodeId> {
        // Every snapshot lists the same members, so the ranking is the same for all.
        let members = self.published.snapshots[0].1.clone();
        let zone = (self.setup.zones > 1).then_some(node % self.setup.zones);
        let key = (blob, zone);
        if let Some(ranked) = self.rankings.get(&key) {
            return ranked.clone();
        }
        let zone_name = zone.map(|z| format!("zone-{z}"));
        let in_zone: Vec<&Member> = match &zone_name {
            Some(z) => hrw::in_zone(members.iter(), z).collect(),
            None => Vec::new(),
        };
        let candidates: Vec<&Member> = if in_zone.is_empty() {
            members.iter().collect()
        } else {
            in_zone
        };
        let ranked: Vec<NodeId> = hrw::top_k(candidates, &self.image[blob].digest, 6)
            .into_iter()
            .map(|m| m.id.clone())
            .collect();
        self.rankings.insert(key, ranked.clone());
        ranked
    }

    fn act(&mut self, task: usize, action: Action) {
        let node = self.tasks[task].node;
        let local = self.nodes[node].id.clone();
        let blob = self.tasks[task].blob;
        let digest = self.image[blob].digest;
        match action {
            Action::Probe(asked) => {
                let round = self.next_round(task);
                let mut answers = Vec::new();
                let mut outstanding = 0;
                for target in asked {
                    if target == local {
                        let intent = self.nodes[node].state.local_pull_intent(&digest);
                        answers.push((target, ProbeAnswer::Intent(intent)));
                    } else {
                        outstanding += 1;
                        self.send(task, round, target, Request::Probe(digest), false);
                    }
                }
                self.tasks[task].pending = Pending::Probe {
                    answers,
                    outstanding,
                };
                if outstanding == 0 {
                    self.probe_complete(task);
                }
            }
            Action::Retry { at } => {
                let at = self.clock.micros_of(at);
                self.sleep(task, at, Wake::Retry);
            }
            Action::PleasePull(target) => {
                let round = self.next_round(task);
                self.tasks[task].pending = Pending::PleasePull;
                if target == local {
                    let outcome = self.local_pull(node, blob);
                    let now = self.clock.at(self.now);
                    let next = self.cascade(task).on_please_pull(&target, outcome, now);
                    self.next(task, next);
                } else {
                    self.send(task, round, target, Request::PleasePull(digest), false);
                }
            }
            Action::LookupProviders {
                at,
                watch,
                probe_watched,
            } => {
                let at = self.clock.micros_of(at);
                self.tasks[task].watched_node = probe_watched.then_some(watch);
                self.sleep(task, at, Wake::Look);
            }
            Action::Done(resolution) => self.resolved(task, resolution),
        }
    }

    fn cascade(&mut self, task: usize) -> &mut Cascade {
        self.tasks[task]
            .cascade
            .as_mut()
            .expect("a cascade runs while its actions are answered")
    }

    fn next(&mut self, task: usize, next: Result<Action, gantry_coord::OutOfTurn>) {
        match next {
            Ok(action) => self.act(task, action),
            Err(error) => panic!("the simulation drove the cascade out of turn: {error}"),
        }
    }

    fn wake(&mut self, task: usize, wake: Wake) {
        match wake {
            Wake::Begin => self.begin(task),
            Wake::Retry => {
                let now = self.clock.at(self.now);
                let next = self.cascade(task).on_retry(now);
                self.next(task, next);
            }
            Wake::Look => {
                let round = self.next_round(task);
                let node = self.tasks[task].node;
                let blob = self.tasks[task].blob;
                let digest = self.image[blob].digest;
                let watched = match self.tasks[task].watched_node.take() {
                    None => Some(None),
                    Some(watch) if watch == self.nodes[node].id => {
                        Some(Some(self.nodes[node].state.local_pull_intent(&digest)))
                    }
                    Some(watch) => {
                        self.send(task, round, watch, Request::Probe(digest), true);
                        None
                    }
                };
                self.tasks[task].pending = Pending::Look {
                    providers: None,
                    watched,
                };
                self.lookup(task, round);
            }
            Wake::FallBack => self.fall_back(task),
        }
    }

    fn local_pull(&mut self, node: usize, blob: usize) -> Option<Outcome> {
        let request = origin()
            .please_pull(self.image[blob].kind, vec![self.image[blob].digest])
            .ok()?;
        self.nodes[node]
            .state
            .start_local_pull(&request)
            .into_iter()
            .next()
            .map(|o| o.outcome)
    }

    fn send(&mut self, task: usize, round: u64, to_id: NodeId, request: Request, watch: bool) {
        let from = self.tasks[task].node;
        let Some(&to) = self.by_id.get(&to_id) else {
            return;
        };
        let id = self.next_request;
        self.next_request += 1;
        let known = self.knows_peer(from, to);
        self.requests.insert(
            id,
            InFlightRequest {
                task,
                round,
                from,
                to,
                to_id,
                request,
                sent: self.now,
                watch,
            },
        );
        if !known {
            // No peer id to dial: the call fails at once, nothing is sent.
            self.schedule(self.now, Event::Expire { id });
            return;
        }
        self.messages += 1;
        // The requester's one budget, as the Go client's.
        self.schedule(self.now + 2 * SECOND, Event::Expire { id });
        if self.nodes[to].dead || self.lost() {
            return;
        }
        let at = self.now + self.latency();
        self.schedule(at, Event::Arrive { id });
    }

    /// Whether `viewer`'s membership view has `target`'s peer id.
    fn knows_peer(&self, viewer: usize, target: usize) -> bool {
        let lag = if self.lagging[viewer] {
            self.setup.lag
        } else {
            0
        };
        let Some(i) = self.published.index_at(self.now.saturating_sub(lag)) else {
            return false;
        };
        let at = self.published.snapshots[i].0;
        self.nodes[target].dead_from_start || self.nodes[target].start <= at
    }

    fn arrive(&mut self, id: u64) {
        let Some(request) = self.requests.get(&id) else {
            return;
        };
        let to = request.to;
        if self.nodes[to].dead {
            return;
        }
        let second = (self.now / SECOND) as usize;
        let inbound = &mut self.nodes[to].inbound;
        if inbound.len() <= second {
            inbound.resize(second + 1, 0);
        }
        inbound[second] += 1;
        // One server per node, answering `inbound_cap` a second; a request that would
        // wait past the answer deadline is dropped (the requester times out).
        let service = SECOND / u64::from(self.setup.inbound_cap.max(1));
        let start = self.nodes[to].free_at.max(self.now);
        if start - self.now > 2 * SECOND {
            return;
        }
        self.nodes[to].free_at = start + service;
        self.schedule(start + service, Event::Serve { id });
    }

    fn serve(&mut self, id: u64) {
        let Some(request) = self.requests.get(&id) else {
            return;
        };
        let to = request.to;
        if self.nodes[to].dead {
            return;
        }
        let reply = match request.request.clone() {
            Request::Probe(digest) => Reply::Intent(ProbeAnswer::Intent(
                self.nodes[to].state.local_pull_intent(&digest),
            )),
            Request::PleasePull(digest) => {
                let blob = self
                    .image
                    .iter()
                    .position(|b| b.digest == digest)
                    .unwrap_or(0);
                Reply::Outcome(self.local_pull(to, blob))
            }
        };
        if self.lost() {
            return;
        }
        let at = self.now + self.latency();
        self.schedule(at, Event::Answer { id, reply });
    }

    fn answered(&mut self, request: InFlightRequest, reply: Reply) {
        let task = request.task;
        if self.tasks[task].round != request.round || self.nodes[request.from].dead {
            return;
        }
        let _ = request.sent;
        match (&mut self.tasks[task].pending, reply) {
            (
                Pending::Probe {
                    answers,
                    outstanding,
                },
                Reply::Intent(answer),
            ) if !request.watch => {
                answers.push((request.to_id, answer));
                *outstanding -= 1;
                if *outstanding == 0 {
                    self.probe_complete(task);
                }
            }
            (Pending::PleasePull, Reply::Outcome(outcome)) => {
                let now = self.clock.at(self.now);
                let next = self
                    .cascade(task)
                    .on_please_pull(&request.to_id, outcome, now);
                self.next(task, next);
            }
            (Pending::Look { watched, .. }, Reply::Intent(answer)) if request.watch => {
                *watched = Some(answer.intent());
                self.look_complete(task);
            }
            _ => {}
        }
    }

    fn probe_complete(&mut self, task: usize) {
        let Pending::Probe { answers, .. } =
            std::mem::replace(&mut self.tasks[task].pending, Pending::Done)
        else {
            return;
        };
        let now = self.clock.at(self.now);
        let next = self.cascade(task).on_probe(answers, true, now);
        self.next(task, next);
    }

    fn look_complete(&mut self, task: usize) {
        let Pending::Look {
            providers: Some(providers),
            watched: Some(watched),
        } = &self.tasks[task].pending
        else {
            return;
        };
        let (providers, watched) = (providers.clone(), *watched);
        self.tasks[task].pending = Pending::Done;
        let now = self.clock.at(self.now);
        let next = self.cascade(task).on_providers(providers, watched, now);
        self.next(task, next);
    }

    fn resolved(&mut self, task: usize, resolution: Resolution) {
        self.tasks[task].cascade = None;
        let node = self.tasks[task].node;
        let digest = self.image[self.tasks[task].blob].digest;
        match resolution.result {
            Ok(source) => self.fetch(task, &source),
            Err(ColdStartError::Failed(_)) => self.finish_task(task),
            Err(ColdStartError::CoolingDown { until }) => {
                let until = self.clock.micros_of(until);
                self.nodes[node].honour.insert(digest, until);
                self.sleep(task, until, Wake::Begin);
            }
            Err(
                ColdStartError::NoneReachable
                | ColdStartError::NoPuller
                | ColdStartError::NoMembers,
            ) => {
                let members = self.nodes[node].state.membership().members().len();
                let now = self.clock.at(self.now).instant;
                match self.nodes[node].fallback.admit(&digest, true, members, now) {
                    Ok(permit) => {
                        let jitter = permit.jitter().as_micros() as Micros;
                        self.tasks[task].permit = Some(permit);
                        self.sleep(task, self.now + jitter, Wake::FallBack);
                    }
                    Err(_) => self.backoff(task),
                }
            }
            Err(_) => self.backoff(task),
        }
    }

    /// After the jitter: a member holding or pulling it (or a provider) means no pull.
    fn fall_back(&mut self, task: usize) {
        let (node, blob) = (self.tasks[task].node, self.tasks[task].blob);
        let digest = self.image[blob].digest;
        let permit = self.tasks[task].permit.take();
        let ranked = self.ranking(node, blob);
        let found = !self.providers[blob].is_empty()
            || ranked.iter().take(3).any(|id| {
                let i = self.by_id[id];
                let intent = self.nodes[i].state.local_pull_intent(&digest);
                !self.nodes[i].dead && (intent.has_cached || intent.in_flight_since.is_some())
            });
        if !found {
            self.local_pull(node, blob);
        }
        drop(permit);
        self.begin(task);
    }

    fn fetch(&mut self, task: usize, source: &Source) {
        let node = self.tasks[task].node;
        let blob = self.tasks[task].blob;
        let candidates: Vec<usize> = match source {
            Source::Holder(id) | Source::Pulling(id) => {
                self.by_id.get(id).copied().into_iter().collect()
            }
            Source::Providers(peers) => peers
                .iter()
                .filter_map(|p| self.by_peer.get(p).copied())
                .collect(),
        };
        let from = candidates
            .into_iter()
            .filter(|&c| c != node)
            .find_map(|c| Some((c, self.ready_at(c, blob)?)));
        let round = self.next_round(task);
        self.tasks[task].pending = Pending::Fetch;
        match from {
            Some((from, ready)) => {
                let transfer = self.image[blob].size * SECOND / self.setup.node_bytes_per_s.max(1);
                let at = (self.now + transfer).max(ready) + 2 * self.latency();
                self.schedule(at, Event::Fetched { task, round, from });
            }
            None if self.holds(node, blob) => self.finish_task(task),
            None => {
                self.tasks[task].ask_lookup_first = false;
                self.backoff(task);
            }
        }
    }

    /// When `node` can have served all of `blob`: now if it holds it; with partial
    /// holders, when its pull lands; never if it is dead or has none of it.
    fn ready_at(&self, node: usize, blob: usize) -> Option<Micros> {
        if self.nodes[node].dead {
            return None;
        }
        if self.holds(node, blob) {
            return Some(self.now);
        }
        if self.setup.partial_holders {
            return self.landing.get(&(node, blob)).copied();
        }
        None
    }

    /// Origin pulls the pumps started since the last event: each lands after the
    /// origin's latency and transfer time.
    fn land_started_pulls(&mut self) {
        let started = std::mem::take(&mut *self.started_pulls.lock());
        for (node, digest) in started {
            let Some(blob) = self.image.iter().position(|b| b.digest == digest) else {
                continue;
            };
            let size = self.image[blob].size;
            // The agent's pump pulls through a member that already holds the blob, if
            // the lookup names one; the origin only when nobody does.
            let through = if self.rng.unit() >= self.setup.lookup_empty {
                self.providers[blob]
                    .iter()
                    .filter(|&&p| p != node)
                    .find_map(|&p| self.ready_at(p, blob))
            } else {
                None
            };
            let took = if let Some(ready) = through {
                let transfer = size * SECOND / self.setup.node_bytes_per_s.max(1);
                (self.now + self.setup.lookup_latency + transfer).max(ready) - self.now
                    + 2 * self.setup.latency
            } else {
                self.origin_pulls[blob] += 1;
                if std::env::var_os("SIMULATE_TRACE").is_some() {
                    let rank = self
                        .ranking(node, blob)
                        .iter()
                        .position(|n| *n == self.nodes[node].id);
                    eprintln!(
                        "t={}ms origin pull of blob {blob} by node {node} (rank {rank:?})",
                        self.now / MS
                    );
                }
                self.setup.origin_latency + size * SECOND / self.setup.origin_bytes_per_s.max(1)
            };
            self.schedule(self.now + took, Event::PullLanded { node, blob });
            self.landing.insert((node, blob), self.now + took);
            if self.setup.partial_holders {
                let at = self.now + self.setup.lookup_latency;
                self.schedule(at, Event::Provide { node, blob });
            }
            if self.kill_armed == Some(blob) {
                self.kill_armed = None;
                self.schedule(self.now + took / 2, Event::Kill(node));
            }
        }
    }

    fn figures(&self) -> Figures {
        if std::env::var_os("SIMULATE_TRACE").is_some() {
            if let Some((node, second, count)) = self
                .nodes
                .iter()
                .enumerate()
                .flat_map(|(i, n)| n.inbound.iter().enumerate().map(move |(s, c)| (i, s, *c)))
                .max_by_key(|x| x.2)
            {
                let ranks: Vec<Option<usize>> = (0..self.image.len())
                    .map(|b| {
                        self.rankings
                            .get(&(b, None))
                            .and_then(|r| r.iter().position(|n| *n == self.nodes[node].id))
                    })
                    .collect();
                eprintln!("peak: node {node} in second {second}: {count} (its ranks {ranks:?})");
                eprintln!("its seconds: {:?}", &self.nodes[node].inbound);
            }
        }
        let live: Vec<&Node> = self.nodes.iter().filter(|n| !n.dead).collect();
        let mut done: Vec<Micros> = live.iter().filter_map(|n| n.finished).collect();
        done.sort_unstable();
        let unfinished = live.len() - done.len();
        let pct = |p: f64| -> u64 {
            if done.is_empty() || unfinished > 0 && p >= 1.0 {
                return u64::MAX;
            }
            let total = live.len();
            let rank = ((p * total as f64).ceil() as usize).clamp(1, total);
            done.get(rank - 1).map_or(u64::MAX, |t| t / MS)
        };
        let counted = self.nodes.iter().filter(|n| n.start < Micros::MAX).count();
        Figures {
            nodes: self.nodes.len(),
            digests: self.image.len(),
            origin_pulls: self.origin_pulls.iter().sum(),
            origin_pulls_per_digest: self.origin_pulls.clone(),
            msgs_per_node_digest: self.messages as f64 / (counted * self.image.len()) as f64,
            peak_inbound_per_s: self
                .nodes
                .iter()
                .flat_map(|n| n.inbound.iter().copied())
                .max()
                .unwrap_or(0)
                .into(),
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            p100_ms: pct(1.0),
            unfinished,
            killed_held: self.killed_held,
            events: self.handled,
            done_ms: done.iter().map(|t| t / MS).collect(),
            live: live.len(),
        }
    }
}

/// The origin repository every please_pull names.
fn origin() -> Origin {
    Origin::new("registry.example.com", "library/app").expect("a valid origin")
}

/// A peer id for node `i`: an identity multihash of its index, so runs repeat.
fn peer_of(i: u64) -> PeerId {
    let mut bytes = vec![0x00, 8];
    bytes.extend_from_slice(&i.to_be_bytes());
    PeerId::from_bytes(&bytes).expect("an identity multihash is a peer id")
}

//! One node of an image-distribution cluster, composed as a rust-libp2p user would:
//! TCP + Noise + Yamux, Kademlia (providers), Identify, coord, and a blob-transfer
//! protocol between members. Origin pulls go to an OCI registry through `oci-client`;
//! blobs land in a content-addressed directory; which node pulls what is decided by the
//! crate's cold-start resolver ([`ColdStart`]).
//!
//! ```text
//! gantry-agent keygen --out FILE
//! gantry-agent run --key FILE --node-id NAME --listen MULTIADDR --members FILE --origin URL --store DIR
//!           [--origin-ca PEM] [--allow-registry HOST] [--credentials CONFIG.JSON]
//!           [--image [REGISTRY/]REPO@sha256:HEX] [--stall-manifest DURATION] [--stall-layer-floor DURATION]
//!           [--fallback-bootstrap DURATION] [--fallback-per-minute N]
//!           [--fallback-jitter-base DURATION] [--convergence-window DURATION]
//!           [--metrics ADDR]
//! ```
//!
//! A node pulls from the origin on its own, with no member asked, only as the gated last
//! resort ([`OriginFallback`](gantry_coord::OriginFallback)): never in its first 30 s, at
//! most 2 a minute, after a jitter and a recheck.
//!
//! Standard output is JSON lines (`listening`, one `blob` per blob stored, `error` for a
//! blob that ends failed, `image` once every blob is stored); logs go to standard error.
//! Registry credentials come from `--credentials` (a docker config.json) or
//! `AGENT_ORIGIN_AUTH` (`user:password`) and are delegated in please_pull to the peer
//! asked to pull.

mod config;
mod members;
mod metrics;
mod mirror;
mod origin;
mod pieces;
mod store;
mod transfer;
mod upstream;

use std::{
    collections::HashMap,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use futures::{future::BoxFuture, FutureExt, StreamExt};
use gantry_coord::{
    Authorization, AuthorizationMode, BlobRef, CascadeConfig, ColdStart, Config, Digest,
    FailureClass, FallbackConfig, Fetch, Membership, NodeId, NodeState, OriginRefKind,
    OriginRefused, PullOrder, PullerPump, PumpDecision, Rule, Source, Stalls, StaticMembership,
};
use libp2p::{
    identify, identity::Keypair, kad, noise, swarm::NetworkBehaviour, swarm::SwarmEvent, tcp,
    yamux, Multiaddr, PeerId,
};
use oci_client::secrets::RegistryAuth;
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::mpsc;

use config::{Credential, Credentials};
use origin::Origin;
use store::BlobDir;
use upstream::Upstreams;

/// The command line; other tools rely on its spelling.
#[derive(Debug, Parser)]
#[command(about = "A node of an image-distribution cluster")]
enum Command {
    /// Writes a new ed25519 key (libp2p protobuf encoding) and prints its peer id.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Runs the node.
    Run(Box<RunArgs>),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    node_id: String,
    #[arg(long)]
    listen: Multiaddr,
    /// JSON array of {"node_id", "peer_id", "addrs"}; re-read when it changes.
    #[arg(long)]
    members: PathBuf,
    /// An upstream registry: `https://HOST[:PORT][/PREFIX]` (`http://` for labs), or
    /// `NAME=URL` for a cache that answers for the registry NAME (e.g.
    /// `docker.io=https://cache.example.com/hub`); repeat for several (containerd's
    /// `?ns=` names one by its host). `_default`: every registry by its own name over
    /// HTTPS (docker.io at registry-1.docker.io). An `--image` without a registry comes
    /// from the first.
    #[arg(long, required = true)]
    origin: Vec<String>,
    /// A PEM file of CA certificates trusted for upstreams beside the system's roots;
    /// repeat for several.
    #[arg(long)]
    origin_ca: Vec<PathBuf>,
    /// Mirror only these registries (by name, e.g. docker.io); repeat for several.
    /// Without it, every listed upstream (or, with `_default`, every registry).
    #[arg(long)]
    allow_registry: Vec<String>,
    /// Where containerd reaches the mirror (its hosts.toml names it).
    #[arg(long, default_value = "127.0.0.1:5001")]
    mirror: std::net::SocketAddr,
    /// The longest a mirror request waits for a blob the node lacks before answering
    /// 503, so that containerd goes on to the origin (default 60s).
    #[arg(long, value_parser = parse_duration)]
    mirror_wait: Option<Duration>,
    /// Registry credentials as a docker config.json ("auths", per registry: a
    /// Kubernetes dockerconfigjson secret); never on the command line. A file that does
    /// not exist means anonymous pulls, with a warning.
    #[arg(long)]
    credentials: Option<PathBuf>,
    #[arg(long)]
    store: PathBuf,
    /// The manifest to cold-start, `[REGISTRY/]REPO@sha256:HEX` (without a registry,
    /// from the first upstream).
    #[arg(long)]
    image: Option<String>,
    /// A manifest pull counts as stalled after this long (default 5s).
    #[arg(long, value_parser = parse_duration)]
    stall_manifest: Option<Duration>,
    /// The least a blob pull is given before it counts as stalled (default 10s).
    #[arg(long, value_parser = parse_duration)]
    stall_layer_floor: Option<Duration>,
    /// No direct origin pull this long after the start (default 30s).
    #[arg(long, value_parser = parse_duration)]
    fallback_bootstrap: Option<Duration>,
    /// Direct origin pulls allowed per minute, and in a burst (default 2).
    #[arg(long)]
    fallback_per_minute: Option<u32>,
    /// A direct pull waits up to this × ln(members) before its recheck (default 3s).
    #[arg(long, value_parser = parse_duration)]
    fallback_jitter_base: Option<Duration>,
    /// How long members that refuse this node count as members whose view lags,
    /// asked again rather than passed over (default 10s).
    #[arg(long, value_parser = parse_duration)]
    convergence_window: Option<Duration>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
}

fn fallback_config(args: &RunArgs) -> FallbackConfig {
    let mut config = FallbackConfig::default();
    if let Some(window) = args.fallback_bootstrap {
        config = config.with_bootstrap_window(window);
    }
    if let Some(pulls) = args.fallback_per_minute {
        config = config.with_per_minute(pulls);
    }
    if let Some(base) = args.fallback_jitter_base {
        config = config.with_jitter_base(base);
    }
    config
}

/// `500ms`, `2s`, `1m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or("a unit is needed: ms, s or m")?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("not a number: {number}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("unknown unit {unit}: ms, s or m")),
    }
}

#[derive(NetworkBehaviour)]
struct Agent {
    kad: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
    coord: gantry_coord::Behaviour,
    blobs: libp2p_stream::Behaviour,
}

use members::{read_members, Addresses};

fn emit(line: serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn class_name(class: FailureClass) -> &'static str {
    match class {
        FailureClass::Auth => "auth",
        FailureClass::NotFound => "not-found",
        FailureClass::RateLimited => "rate-limited",
        _ => "transient",
    }
}

/// The largest manifest accepted from a peer.
const MAX_MANIFEST: u64 = 4 << 20;
/// The largest blob of unknown size accepted from a peer.
const MAX_BLOB: u64 = 64 << 30;

/// How long a node waits for its members' connections before its cold start.
const CONNECT_GRACE: Duration = Duration::from_secs(3);

/// What the swarm loop is asked to do from other tasks.
enum Control {
    Provide(Digest),
    Members(Addresses),
}

/// An origin pull handed from the pump to the pulling task.
struct PullJob {
    registry: String,
    repository: String,
    digest: Digest,
    kind: OriginRefKind,
    auth: RegistryAuth,
}

/// Hands each pull order to the pulling task; never waits.
struct OriginPump {
    jobs: mpsc::UnboundedSender<PullJob>,
    /// This node's own credentials, per registry.
    own: Arc<Credentials>,
    origin: Arc<Origin>,
}

impl PullerPump for OriginPump {
    fn start(&self, order: PullOrder<'_>) -> PumpDecision {
        // A registry this node has no upstream for is not pulled from anywhere else
        // (with the asker's credentials, at another registry).
        if !self.origin.serves(order.registry) {
            tracing::debug!(
                registry = order.registry,
                "please_pull declined: no upstream"
            );
            return PumpDecision::Declined;
        }
        // Delegated credentials serve this pull only; without them the node's own.
        let credential = match order.authorization {
            Some(auth) => Credential::from_delegated(auth.expose_secret()),
            None => self.own.get(order.registry).cloned(),
        };
        let auth = credential.map_or(RegistryAuth::Anonymous, |c| c.auth());
        let job = PullJob {
            registry: order.registry.to_owned(),
            repository: order.repository.to_owned(),
            digest: *order.digest,
            kind: order.kind,
            auth,
        };
        match self.jobs.send(job) {
            Ok(()) => PumpDecision::Started,
            Err(_) => PumpDecision::Declined,
        }
    }
}

/// How a blob came to be stored, for its `blob` line.
#[derive(Debug, Clone)]
struct Stored {
    source: &'static str,
    /// The member that delivered most of it.
    peer: Option<String>,
    bytes: u64,
    /// Pieces each member delivered.
    pieces_from: Vec<(String, u32)>,
}

/// The agent's transfer between members, for the resolver's sources.
struct FromMembers<'a> {
    node: &'a Node,
    /// The most bytes a member may send for the blob.
    max_len: u64,
}

impl Fetch for FromMembers<'_> {
    fn fetch<'a>(&'a self, blob: BlobRef, source: &'a Source) -> BoxFuture<'a, bool> {
        async move {
            let (peers, pulling) = match source {
                Source::Holder(node) => (self.node.peer_of(node).into_iter().collect(), false),
                Source::Providers(peers) => (peers.clone(), false),
                Source::Pulling(node) if *node == self.node.local => {
                    return self.node.own_pull(&blob.digest).await;
                }
                Source::Pulling(node) => (self.node.peer_of(node).into_iter().collect(), true),
            };
            let idle = match blob.kind {
                OriginRefKind::Manifest => self.node.stalls.manifest,
                _ => self.node.stalls.floor,
            };
            self.node
                .fetch_from(&peers, &blob.digest, self.max_len, pulling, idle)
                .await
        }
        .boxed()
    }
}

/// The mirror's way into the node: its store, and its resolve-fetch-retry loop.
struct NodeObtain(Arc<Node>);

impl mirror::Obtain for NodeObtain {
    fn store(&self) -> &BlobDir {
        &self.0.store
    }

    fn obtain(
        &self,
        registry: &str,
        wanted: mirror::Wanted,
    ) -> BoxFuture<'static, Result<(), FailureClass>> {
        let (node, registry) = (self.0.clone(), registry.to_owned());
        async move {
            let kind = if wanted.manifest {
                BlobKind::Manifest
            } else {
                BlobKind::Layer
            };
            node.obtain(&registry, &wanted.repository, &wanted.digest, kind, None)
                .await
                .map(|_| ())
        }
        .boxed()
    }
}

/// What every blob task shares.
struct Node {
    local: NodeId,
    local_peer: PeerId,
    /// When a pull counts as stalled; a fetch with no piece for as long gives up.
    stalls: Stalls,
    store: BlobDir,
    state: NodeState,
    membership: StaticMembership,
    resolver: ColdStart,
    control: mpsc::UnboundedSender<Control>,
    blobs: libp2p_stream::Control,
    /// The upstreams, and the clients kept for them.
    origin: Arc<Origin>,
    credentials: Arc<Credentials>,
    stored: Mutex<HashMap<Digest, Stored>>,
    /// Members this node is connected to, kept by the swarm loop.
    connected: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlobKind {
    Manifest,
    Config,
    Layer,
}

impl BlobKind {
    fn name(self) -> &'static str {
        match self {
            BlobKind::Manifest => "manifest",
            BlobKind::Config => "config",
            BlobKind::Layer => "layer",
        }
    }

    fn origin_kind(self) -> OriginRefKind {
        match self {
            BlobKind::Manifest => OriginRefKind::Manifest,
            BlobKind::Config => OriginRefKind::Config,
            BlobKind::Layer => OriginRefKind::Blob,
        }
    }
}

impl Node {
    /// The repository at an upstream, with the credentials this node delegates for it.
    fn upstream(&self, registry: &str, repository: &str) -> Option<gantry_coord::Origin> {
        let upstream = gantry_coord::Origin::new(registry, repository).ok()?;
        Some(match self.credentials.get(registry) {
            Some(credential) => {
                upstream.with_authorization(Authorization::new(credential.delegated()))
            }
            None => upstream,
        })
    }

    fn peer_of(&self, node: &NodeId) -> Option<PeerId> {
        self.membership
            .members()
            .iter()
            .find(|m| &m.id == node)
            .and_then(|m| m.peer_id)
    }

    /// Fetches `digest` in pieces from `peers` and the members they name (members
    /// only, never self), at most `max_len` bytes of it.
    async fn fetch_from(
        &self,
        peers: &[PeerId],
        digest: &Digest,
        max_len: u64,
        pulling: bool,
        idle: Duration,
    ) -> bool {
        tracing::debug!(%digest, ?peers, pulling, "fetch from members");
        let is_member = |peer: &PeerId| self.membership.check_peer(peer).is_ok();
        let net = transfer::Net {
            control: &self.blobs,
            store: &self.store,
            is_member: &is_member,
            local: self.local_peer,
        };
        let order = transfer::Order {
            digest: *digest,
            max_len,
            seeds: peers,
            pulling,
            idle,
        };
        match transfer::fetch(&net, order).await {
            Ok(fetched) => {
                let name = |peer: &PeerId| {
                    self.membership
                        .members()
                        .iter()
                        .find(|m| m.peer_id == Some(*peer))
                        .map_or_else(|| peer.to_string(), |m| m.id.to_string())
                };
                self.stored.lock().insert(
                    *digest,
                    Stored {
                        source: "peer",
                        peer: fetched.pieces_from.first().map(|(p, _)| name(p)),
                        bytes: fetched.bytes,
                        pieces_from: fetched
                            .pieces_from
                            .iter()
                            .map(|(p, n)| (name(p), *n))
                            .collect(),
                    },
                );
                let _ = self.control.send(Control::Provide(*digest));
                true
            }
            Err(transfer::FetchError::Preempted) => self.own_pull(digest).await,
            Err(error) => {
                tracing::debug!(%digest, %error, "fetch from members failed");
                false
            }
        }
    }

    /// Waits for this node's own origin pull of `digest` to end; true if it stored it.
    async fn own_pull(&self, digest: &Digest) -> bool {
        loop {
            if self.store.has(digest) {
                return true;
            }
            if self.store.receiving(digest).is_some() {
                return self.store.settled(digest).await;
            }
            if self
                .state
                .local_pull_intent(digest)
                .in_flight_since
                .is_none()
            {
                return self.store.has(digest);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Gets one blob: through the cascade, from a peer or by this node's own origin pull,
    /// retrying with backoff until it is stored or a trusted failure class says stop.
    async fn obtain(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        kind: BlobKind,
        size: Option<u64>,
    ) -> Result<u64, FailureClass> {
        let started = Instant::now();
        let Some(upstream) = self.upstream(registry, repository) else {
            return Err(FailureClass::NotFound);
        };
        // A peer sends no more than the manifest said, and a manifest no more than 4 MiB
        // (the limit registries apply): a peer cannot fill the disk.
        let max_len = size.unwrap_or(match kind {
            BlobKind::Manifest => MAX_MANIFEST,
            _ => MAX_BLOB,
        });
        let mut blob = BlobRef::new(*digest, kind.origin_kind());
        blob.size = size;
        let fetch = FromMembers {
            node: self,
            max_len,
        };
        let obtained = match self.resolver.obtain(&upstream, blob, &fetch).await {
            Ok(obtained) => obtained,
            Err(OriginRefused(class)) => {
                emit(json!({
                    "event": "error", "digest": digest.to_string(),
                    "class": class_name(class),
                    "error": format!("the origin refused it ({})", class_name(class)),
                }));
                return Err(class);
            }
        };
        let stored = self.stored.lock().get(digest).cloned().unwrap_or(Stored {
            source: "origin",
            peer: None,
            bytes: std::fs::metadata(self.store.path(digest)).map_or(0, |m| m.len()),
            pieces_from: Vec::new(),
        });
        let mut line = json!({
            "event": "blob", "digest": digest.to_string(), "kind": kind.name(),
            "source": stored.source, "bytes": stored.bytes,
            "ms": started.elapsed().as_millis() as u64,
            "rule": obtained.rule.map_or("stored", Rule::as_str),
        });
        if let Some(peer) = stored.peer {
            line["peer"] = json!(peer);
        }
        if !stored.pieces_from.is_empty() {
            line["pieces_from"] = json!(stored
                .pieces_from
                .iter()
                .map(|(node, n)| json!({"node": node, "pieces": n}))
                .collect::<Vec<_>>());
        }
        emit(line);
        Ok(stored.bytes)
    }

    /// The manifest, then its config and layers in parallel, with one batched
    /// please_pull per designated puller first.
    async fn cold_start(self: Arc<Self>, image: String) {
        let started = Instant::now();
        // A node that has just started asks its members before it has reached them, and
        // takes a member it has not dialled yet for one that is down. Give the
        // connections a moment, as a node that joins a cluster does.
        let others = self.membership.members().len().saturating_sub(1);
        while self.connected.load(std::sync::atomic::Ordering::Relaxed) < others
            && started.elapsed() < CONNECT_GRACE
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (registry, repository, digest) = match parse_image(&image, &self.origin.upstreams) {
            Ok(parsed) => parsed,
            Err(error) => {
                emit(
                    json!({"event": "error", "digest": image, "class": "not-found", "error": error}),
                );
                return;
            }
        };
        let Ok(manifest_bytes) = self
            .obtain(&registry, &repository, &digest, BlobKind::Manifest, None)
            .await
        else {
            return;
        };
        let blobs = match std::fs::read(self.store.path(&digest))
            .map_err(|e| e.to_string())
            .and_then(|bytes| parse_manifest(&bytes))
        {
            Ok(blobs) => blobs,
            Err(error) => {
                emit(
                    json!({"event": "error", "digest": digest.to_string(), "class": "transient", "error": error}),
                );
                return;
            }
        };
        let layers: Vec<Digest> = blobs
            .iter()
            .filter(|(_, kind, _)| *kind == BlobKind::Layer)
            .map(|(d, _, _)| *d)
            .filter(|d| !self.store.has(d))
            .collect();
        // A manifest that came from the origin is new to the cluster: ask each layer's
        // designated puller at once, one batch per puller. One a peer already held means
        // the image was pulled before, and its layers are found by probing instead: a
        // designated puller that joined late would otherwise pull them again.
        let new_to_cluster = self
            .stored
            .lock()
            .get(&digest)
            .is_some_and(|s| s.source == "origin");
        if let Some(upstream) = self.upstream(&registry, &repository) {
            if new_to_cluster && !layers.is_empty() && layers.len() <= 256 {
                self.resolver
                    .prefetch(&upstream, OriginRefKind::Blob, &layers)
                    .await;
            }
        }
        let results = futures::future::join_all(
            blobs
                .iter()
                .map(|(d, kind, size)| self.obtain(&registry, &repository, d, *kind, Some(*size))),
        )
        .await;
        if results.iter().all(Result::is_ok) {
            let bytes: u64 = manifest_bytes + results.iter().flatten().sum::<u64>();
            emit(json!({
                "event": "image", "blobs": blobs.len() + 1, "bytes": bytes,
                "ms": started.elapsed().as_millis() as u64,
            }));
        }
    }
}

/// `[REGISTRY/]REPO@sha256:HEX` as (registry, repository, digest): the first part of
/// the name is a registry when it looks like a host (a dot, a port, `localhost`), as
/// image references have it; otherwise the registry is the first upstream.
fn parse_image(image: &str, upstreams: &Upstreams) -> Result<(String, String, Digest), String> {
    let usage = "--image must be [REGISTRY/]REPO@sha256:HEX";
    let (name, digest) = image.split_once('@').ok_or(usage)?;
    let digest = Digest::parse(digest).map_err(|e| format!("{usage}: {e}"))?;
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            let registry = upstream::registry_name(first).ok_or(usage)?;
            let repository = if registry == upstream::DOCKER_HUB && !rest.contains('/') {
                format!("library/{rest}")
            } else {
                rest.to_owned()
            };
            (registry, repository)
        }
        _ => {
            let first = upstreams.first().ok_or(
                "--image needs a registry (REGISTRY/REPO@sha256:HEX) with --origin _default",
            )?;
            (first.name.clone(), name.to_owned())
        }
    };
    Ok((registry, repository, digest))
}

/// The config and layers an image manifest names, with their sizes.
fn parse_manifest(bytes: &[u8]) -> Result<Vec<(Digest, BlobKind, u64)>, String> {
    let manifest: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("manifest: {e}"))?;
    let descriptor = |v: &serde_json::Value, kind| -> Result<(Digest, BlobKind, u64), String> {
        let digest = v["digest"].as_str().ok_or("descriptor without a digest")?;
        let digest = Digest::parse(digest).map_err(|e| format!("descriptor digest: {e}"))?;
        Ok((digest, kind, v["size"].as_u64().unwrap_or(0)))
    };
    let mut blobs = vec![descriptor(&manifest["config"], BlobKind::Config)?];
    for layer in manifest["layers"]
        .as_array()
        .ok_or("manifest without layers")?
    {
        blobs.push(descriptor(layer, BlobKind::Layer)?);
    }
    Ok(blobs)
}

#[tokio::main]
async fn main() -> ExitCode {
    // reqwest, under oci-client, wants one even when the origin speaks plain HTTP.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let result = match Command::parse() {
        Command::Keygen { out } => keygen(&out),
        Command::Run(args) => run(*args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("agent: {error}");
            ExitCode::FAILURE
        }
    }
}

/// New mirror requests get 503; those under way finish, for at most 10 s.
async fn drain(
    draining: &std::sync::atomic::AtomicBool,
    drained: &tokio::sync::Notify,
    mirror: tokio::task::JoinHandle<()>,
) -> Result<(), Box<dyn std::error::Error>> {
    draining.store(true, std::sync::atomic::Ordering::Release);
    drained.notify_one();
    let _ = tokio::time::timeout(Duration::from_secs(10), mirror).await;
    Ok(())
}

fn keygen(out: &PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let key = Keypair::generate_ed25519();
    std::fs::write(out, key.to_protobuf_encoding()?)?;
    emit(json!({"peer_id": key.public().to_peer_id().to_string()}));
    Ok(())
}

async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    let key = Keypair::from_protobuf_encoding(&std::fs::read(&args.key)?)?;
    let local = NodeId::new(args.node_id.as_str());
    let (members, addresses) = read_members(&args.members)?;
    let started_with = (members.clone(), addresses.clone());
    let membership = StaticMembership::new(local.clone(), members);
    let store = BlobDir::open(&args.store)?;
    let upstreams = Upstreams::new(&args.origin, &args.allow_registry)?;
    let origin = Arc::new(Origin::new(upstreams, origin::read_roots(&args.origin_ca)?));
    let credentials = Arc::new(Credentials::load(args.credentials.as_deref())?);
    let (jobs, mut pulls) = mpsc::unbounded_channel::<PullJob>();
    let state = NodeState::builder(membership.clone())
        .store(store.clone())
        .pump(OriginPump {
            jobs,
            own: credentials.clone(),
            origin: origin.clone(),
        })
        .build();

    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let mut kad = kad::Behaviour::with_config(
                peer,
                kad::store::MemoryStore::new(peer),
                gantry_coord::kad_config(),
            );
            kad.set_mode(Some(kad::Mode::Server));
            Agent {
                kad,
                identify: identify::Behaviour::new(identify::Config::new(
                    "/gantry-agent/0.1.0".into(),
                    key.public(),
                )),
                coord: gantry_coord::Behaviour::new(
                    Config::default().with_authorization_mode(AuthorizationMode::Enforce),
                ),
                blobs: libp2p_stream::Behaviour::new(),
            }
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    // Membership is the security boundary: coord answers members only.
    swarm
        .behaviour_mut()
        .coord
        .authorize_with(membership.clone());
    let local_peer = *swarm.local_peer_id();
    swarm.listen_on(args.listen.clone())?;
    let listening = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };

    // Pieces are served while they arrive: a waiter takes a pull's bytes as it runs.
    let mut cascade = CascadeConfig::default().with_cut_through(true);
    if let Some(window) = args.convergence_window {
        cascade = cascade.with_convergence(window, Duration::from_millis(250));
    }
    let defaults = Stalls::default();
    let stalls = Stalls {
        manifest: args.stall_manifest.unwrap_or(defaults.manifest),
        floor: args.stall_layer_floor.unwrap_or(defaults.floor),
        ..defaults
    };
    cascade = cascade.with_stalls(stalls);
    let (providers, mut lookups) = gantry_coord::kad_providers();
    let mut resolver = ColdStart::new(
        swarm.behaviour().coord.coordinator(),
        state.clone(),
        providers,
        cascade,
    )
    .with_fallback(fallback_config(&args));
    let metrics = match args.metrics {
        Some(addr) => {
            let mut registry = prometheus_client::registry::Registry::default();
            swarm.behaviour_mut().coord.register_metrics(&mut registry);
            state.register_metrics(&mut registry);
            resolver.register_metrics(&mut registry);
            Some(metrics::serve(addr, registry).await?)
        }
        None => None,
    };
    let (control, mut controls) = mpsc::unbounded_channel();
    let node = Arc::new(Node {
        local: local.clone(),
        local_peer,
        stalls,
        store: store.clone(),
        state: state.clone(),
        membership: membership.clone(),
        resolver,
        control: control.clone(),
        blobs: swarm.behaviour().blobs.new_control(),
        origin: origin.clone(),
        credentials,
        stored: Mutex::default(),
        connected: Default::default(),
    });
    // The mirror: 503 until the node is ready, 503 again once it drains.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drained = Arc::new(tokio::sync::Notify::new());
    let (mirror_addr, mirror_task) = {
        let drained = drained.clone();
        mirror::serve(
            args.mirror,
            Arc::new(mirror::Mirror {
                obtain: Arc::new(NodeObtain(node.clone())),
                upstreams: origin.upstreams.clone(),
                ready: ready.clone(),
                draining: draining.clone(),
                wait: args.mirror_wait.unwrap_or(Duration::from_secs(60)),
            }),
            async move { drained.notified().await },
        )
        .await
        .map_err(|e| format!("cannot serve the mirror on {}: {e}", args.mirror))?
    };
    let mut line = json!({
        "event": "listening", "node_id": local.to_string(),
        "peer_id": local_peer.to_string(), "listen": [listening.to_string()],
        "mirror": mirror_addr.to_string(),
    });
    if let Some(addr) = metrics {
        line["metrics"] = json!(addr.to_string());
    }
    emit(line);
    // Ready once connected to its members, or when the grace has passed.
    {
        let (node, ready) = (node.clone(), ready.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let others = node.membership.members().len().saturating_sub(1);
            while node.connected.load(std::sync::atomic::Ordering::Relaxed) < others
                && started.elapsed() < CONNECT_GRACE
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ready.store(true, std::sync::atomic::Ordering::Release);
            emit(json!({"event": "ready"}));
        });
    }

    {
        let state = state.clone();
        tokio::spawn(transfer::serve(
            swarm.behaviour().blobs.new_control(),
            store.clone(),
            Arc::new(membership.clone()),
            Arc::new(move |digest: &Digest| {
                state.local_pull_intent(digest).in_flight_since.is_some()
            }),
        ));
    }

    // The pulling task: every origin pull this node makes, its own or asked for.
    {
        let (node, control) = (node.clone(), control.clone());
        tokio::spawn(async move {
            while let Some(job) = pulls.recv().await {
                let (node, control) = (node.clone(), control.clone());
                tokio::spawn(async move {
                    let began = Instant::now();
                    let wanted = origin::Wanted {
                        registry: &job.registry,
                        repository: &job.repository,
                        digest: &job.digest,
                        kind: job.kind,
                    };
                    let result = node.origin.pull(wanted, &job.auth, &node.store).await;
                    match result {
                        Ok(bytes) => {
                            tracing::debug!(digest = %job.digest, bytes, ms = began.elapsed().as_millis() as u64, "origin pull done");
                            node.stored.lock().insert(
                                job.digest,
                                Stored {
                                    source: "origin",
                                    peer: None,
                                    bytes,
                                    pieces_from: Vec::new(),
                                },
                            );
                            let _ = control.send(Control::Provide(job.digest));
                            node.state.finish_pull(&job.digest, Ok(()));
                        }
                        Err(error) => {
                            tracing::warn!(digest = %job.digest, %error, "origin pull failed");
                            node.state.finish_pull(&job.digest, Err(error.class));
                        }
                    }
                });
            }
        });
    }

    // The members file: re-read as soon as it changes.
    tokio::spawn(members::follow(
        args.members.clone(),
        started_with,
        membership.clone(),
        control.clone(),
    ));
    let _ = control.send(Control::Members(addresses));

    if let Some(image) = args.image.clone() {
        tokio::spawn(node.clone().cold_start(image));
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return drain(&draining, &drained, mirror_task).await,
            _ = terminate.recv() => return drain(&draining, &drained, mirror_task).await,
            Some(lookup) = lookups.next_lookup() => {
                lookups.start(lookup, &mut swarm.behaviour_mut().kad);
            }
            Some(control) = controls.recv() => match control {
                Control::Provide(digest) => {
                    let _ = swarm
                        .behaviour_mut()
                        .kad
                        .start_providing(gantry_coord::provider_key(&digest));
                }
                Control::Members(addresses) => {
                    for (peer, addr) in addresses {
                        if peer == local_peer {
                            continue;
                        }
                        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                        swarm.add_peer_address(peer, addr.clone());
                        if !swarm.is_connected(&peer) {
                            // From a port of its own: two members that start together
                            // and dial each other from their listening ports would
                            // otherwise meet in one TCP simultaneous open, which neither
                            // handshake survives.
                            let dial = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                                .addresses(vec![addr])
                                .allocate_new_port()
                                .build();
                            let _ = swarm.dial(dial);
                        }
                    }
                    let _ = swarm.behaviour_mut().kad.bootstrap();
                }
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { .. } | SwarmEvent::ConnectionClosed { .. } => {
                    if let SwarmEvent::ConnectionClosed { peer_id, cause, num_established, .. } = &event {
                        tracing::debug!(peer = %peer_id, ?cause, num_established, "connection closed");
                    }
                    let connected = swarm
                        .connected_peers()
                        .filter(|p| membership.check_peer(p).is_ok())
                        .count();
                    node.connected.store(connected, std::sync::atomic::Ordering::Relaxed);
                }
                SwarmEvent::Behaviour(AgentEvent::Coord(event)) => {
                    if let Some(event) = state.answer(&mut swarm.behaviour_mut().coord, event) {
                        tracing::debug!(?event, "coord");
                    }
                }
                SwarmEvent::Behaviour(AgentEvent::Kad(event)) => {
                    lookups.on_event(&event, &mut swarm.behaviour_mut().kad);
                }
                _ => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_with_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn an_image_names_its_registry_or_comes_from_the_first_upstream() {
        let hex = "a".repeat(64);
        let listed = Upstreams::new(&["http://10.0.0.1:5000".into()], &[]).unwrap();
        let every = Upstreams::new(&["_default".into()], &[]).unwrap();
        let parsed = |image: &str, upstreams: &Upstreams| {
            parse_image(image, upstreams).map(|(r, repo, d)| (r, repo, d.to_string()))
        };
        let digest = format!("sha256:{hex}");
        assert_eq!(
            parsed(&format!("demo/app@{digest}"), &listed),
            Ok(("10.0.0.1:5000".into(), "demo/app".into(), digest.clone()))
        );
        assert_eq!(
            parsed(&format!("ghcr.io/org/app@{digest}"), &every),
            Ok(("ghcr.io".into(), "org/app".into(), digest.clone()))
        );
        assert_eq!(
            parsed(&format!("docker.io/nginx@{digest}"), &every),
            Ok(("docker.io".into(), "library/nginx".into(), digest.clone()))
        );
        assert_eq!(
            parsed(&format!("localhost/app@{digest}"), &every),
            Ok(("localhost".into(), "app".into(), digest.clone()))
        );
        assert!(parsed(&format!("app@{digest}"), &every).is_err());
        assert!(parsed("app:latest", &listed).is_err());
        assert!(parsed("app@sha256:00", &listed).is_err());
    }

    #[test]
    fn a_manifest_names_its_config_then_its_layers() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "config": {"digest": d('c'), "size": 7},
            "layers": [{"digest": d('a'), "size": 10}, {"digest": d('b'), "size": 20}],
        });
        let blobs = parse_manifest(manifest.to_string().as_bytes()).unwrap();
        let kinds: Vec<_> = blobs
            .iter()
            .map(|(d, k, s)| (d.to_string(), *k, *s))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (d('c'), BlobKind::Config, 7),
                (d('a'), BlobKind::Layer, 10),
                (d('b'), BlobKind::Layer, 20),
            ]
        );
        assert!(parse_manifest(b"{}").is_err());
        let bad = serde_json::json!({"config": {"digest": "sha512:00"}, "layers": []});
        assert!(parse_manifest(bad.to_string().as_bytes()).is_err());
    }
}

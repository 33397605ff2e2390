//! A runnable coord node over TCP + Noise + Yamux, composed with Kademlia and Identify.
//!
//! Serve:  cargo run --example node -- --node-id node-a --cached sha256:<64 hex> --origin-pull
//!             [--metrics 127.0.0.1:9464]   (Prometheus text at http://127.0.0.1:9464/metrics)
//! Query:  cargo run --example node -- --query /ip4/127.0.0.1/tcp/PORT/p2p/PEER --digest sha256:<64 hex>
//! Ask:    cargo run --example node -- --please-pull /ip4/…/p2p/PEER --registry docker.io \
//!             --repository library/nginx --kind blob --digest sha256:<64 hex>
//!
//! A server prints one JSON line with its peer id and addresses, then serves until killed.
//! A client prints one JSON line with the reply and exits 0, or an error on stderr and
//! exits non-zero.

use std::{
    process::ExitCode,
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use gantry_coord::{
    AuthorizationMode, Config, Digest, FailureClass, InFlightMap, InFlightPulls, Member,
    MemoryStore, NegativeCache, NodeState, OriginRefKind, Outcome, PleasePull, PleasePullOutcome,
    PullIntent, PullOrder, PullerPump, PumpDecision, RecentFailure, StaticMembership,
};
use libp2p::{identify, multiaddr::Protocol, swarm::SwarmEvent, Multiaddr, PeerId};
use serde_json::{json, Value};
use tokio::sync::mpsc;

mod common;

use common::{build_swarm, NodeBehaviourEvent};

/// What the command line asks for: serve (the default), or ask a node with `--query`
/// or `--please-pull`.
#[derive(Debug, clap::Parser)]
#[command(about = "A coord node over TCP + Noise + Yamux, or a one-shot client")]
struct Args {
    /// Address to listen on (default: loopback, any port).
    #[arg(long)]
    listen: Option<Multiaddr>,
    /// This node's cluster id.
    #[arg(long)]
    node_id: Option<String>,
    /// Another member, as NAME=PEER_ID; repeat for each.
    #[arg(long = "member", value_parser = parse_member)]
    members: Vec<(String, PeerId)>,
    /// A digest the node's store holds; repeat for each.
    #[arg(long, value_parser = parse_digest)]
    cached: Vec<Digest>,
    /// A digest the node is pulling; repeat for each.
    #[arg(long, value_parser = parse_digest)]
    pulling: Vec<Digest>,
    /// A recently failed digest, as DIGEST=CLASS:SECONDS; repeat for each.
    #[arg(long, value_parser = parse_failed)]
    failed: Vec<(Digest, FailureClass, u64)>,
    /// Peer authorization: observe or enforce.
    #[arg(long, value_parser = parse_authz, default_value = "observe")]
    authz: AuthorizationMode,
    /// Pull from a fake origin when asked.
    #[arg(long)]
    origin_pull: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// How long a fake origin pull takes, in milliseconds.
    #[arg(long)]
    pull_ms: Option<u64>,
    /// Ask this node (a multiaddr ending in /p2p/PEER) about one --digest.
    #[arg(long, conflicts_with = "please_pull")]
    query: Option<Multiaddr>,
    /// Ask this node to pull the --digest values.
    #[arg(long)]
    please_pull: Option<Multiaddr>,
    /// The origin registry of --please-pull.
    #[arg(long)]
    registry: Option<String>,
    /// The repository of --please-pull.
    #[arg(long)]
    repository: Option<String>,
    /// blob, manifest or config.
    #[arg(long, value_parser = parse_kind)]
    kind: Option<OriginRefKind>,
    /// A digest to ask about; repeat for each.
    #[arg(long = "digest", value_parser = parse_digest)]
    digests: Vec<Digest>,
}

fn parse_member(v: &str) -> Result<(String, PeerId), String> {
    let (name, peer) = v
        .split_once('=')
        .ok_or_else(|| format!("--member takes NAME=PEER_ID, got {v:?}"))?;
    let peer = peer
        .parse()
        .map_err(|_| format!("invalid peer id: {peer:?}"))?;
    Ok((name.to_owned(), peer))
}

fn parse_failed(v: &str) -> Result<(Digest, FailureClass, u64), String> {
    let bad = || format!("--failed takes DIGEST=CLASS:SECONDS, got {v:?}");
    let (digest, rest) = v.split_once('=').ok_or_else(bad)?;
    let (class, secs) = rest.rsplit_once(':').ok_or_else(bad)?;
    Ok((
        parse_digest(digest)?,
        parse_class(class)?,
        secs.parse().map_err(|_| bad())?,
    ))
}

fn parse_authz(v: &str) -> Result<AuthorizationMode, String> {
    match v {
        "observe" => Ok(AuthorizationMode::Observe),
        "enforce" => Ok(AuthorizationMode::Enforce),
        other => Err(format!("--authz is observe or enforce, got {other:?}")),
    }
}

fn parse_kind(v: &str) -> Result<OriginRefKind, String> {
    match v {
        "blob" => Ok(OriginRefKind::Blob),
        "manifest" => Ok(OriginRefKind::Manifest),
        "config" => Ok(OriginRefKind::Config),
        other => Err(format!("--kind is blob, manifest or config, got {other:?}")),
    }
}

fn parse_digest(s: &str) -> Result<Digest, String> {
    Digest::parse(s).map_err(|e| format!("invalid digest {s:?}: {e}"))
}

fn parse_class(s: &str) -> Result<FailureClass, String> {
    Ok(match s {
        "auth" => FailureClass::Auth,
        "not-found" => FailureClass::NotFound,
        "rate-limited" => FailureClass::RateLimited,
        "transient" => FailureClass::Transient,
        "unspecified" => FailureClass::Unspecified,
        other => return Err(format!("unknown failure class {other:?}")),
    })
}

fn class_name(class: FailureClass) -> &'static str {
    match class {
        FailureClass::Auth => "auth",
        FailureClass::NotFound => "not-found",
        FailureClass::RateLimited => "rate-limited",
        FailureClass::Transient => "transient",
        FailureClass::Unspecified => "unspecified",
    }
}

fn unix_ms(time: Option<SystemTime>) -> Value {
    time.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(Value::Null, |d| json!(d.as_millis() as u64))
}

fn intent_json(intent: &PullIntent) -> Value {
    let failure = intent.recently_failed;
    json!({
        "has_cached": intent.has_cached,
        "in_flight": intent.in_flight_since.is_some(),
        "started_at_unix_ms": unix_ms(intent.in_flight_since),
        "hrw_rank": intent.hrw_rank.map_or(-1, i64::from),
        "recently_failed": failure.is_some(),
        "cooldown_until_unix_ms": unix_ms(failure.map(|f| f.cooldown_until)),
        "failure_class": class_name(failure.map_or(FailureClass::Unspecified, |f| f.class)),
    })
}

fn outcome_json(outcome: &PleasePullOutcome) -> Value {
    let (name, started, failure) = match outcome.outcome {
        Outcome::Started { started_at } => ("started", Some(started_at), None),
        Outcome::AlreadyPulling { started_at } => ("already-pulling", Some(started_at), None),
        Outcome::RecentlyFailed(failure) => ("recently-failed", None, Some(failure)),
        Outcome::Unspecified => ("unspecified", None, None),
    };
    json!({
        "digest": outcome.digest.encode().as_str(),
        "outcome": name,
        "started_at_unix_ms": unix_ms(started),
        "cooldown_until_unix_ms": unix_ms(failure.map(|f| f.cooldown_until)),
        "failure_class": class_name(failure.map_or(FailureClass::Unspecified, |f| f.class)),
    })
}

/// A pump that marks the digest in flight (the node state does) and completes it into
/// the store after a delay, on another task.
struct DelayedOrigin(mpsc::UnboundedSender<Digest>);

impl PullerPump for DelayedOrigin {
    fn start(&self, order: PullOrder<'_>) -> PumpDecision {
        match self.0.send(*order.digest) {
            Ok(()) => PumpDecision::Started,
            Err(_) => PumpDecision::RecentlyFailed(RecentFailure {
                cooldown_until: SystemTime::now() + Duration::from_secs(10),
                class: FailureClass::Transient,
            }),
        }
    }
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut swarm = build_swarm(
        libp2p::identity::Keypair::generate_ed25519(),
        Config::default().with_authorization_mode(args.authz),
    )?;
    let local_peer = *swarm.local_peer_id();
    let node_id = args.node_id.clone().unwrap_or_else(|| "node-0".into());

    let mut members: Vec<Member> = args
        .members
        .iter()
        .filter(|(name, _)| *name != node_id)
        .map(|(name, peer)| Member::new(name.as_str(), Some(*peer)))
        .collect();
    members.push(Member::new(node_id.as_str(), Some(local_peer)));
    let membership = StaticMembership::new(node_id.as_str(), members);
    // Every request is checked against the membership's current snapshot.
    swarm
        .behaviour_mut()
        .coord
        .authorize_with(membership.clone());

    let now = SystemTime::now();
    let store = MemoryStore::new();
    args.cached.iter().for_each(|d| store.insert(*d));
    let in_flight = InFlightMap::default();
    for digest in &args.pulling {
        let _ = in_flight.begin(digest, now);
    }
    let failures = NegativeCache::default();
    for (digest, class, secs) in &args.failed {
        let failure = RecentFailure {
            cooldown_until: now + Duration::from_secs(*secs),
            class: *class,
        };
        failures.insert(*digest, failure);
    }
    let mut builder = NodeState::builder(membership)
        .store(store.clone())
        .in_flight(in_flight)
        .failures(failures);
    let (pulls, mut pulled) = mpsc::unbounded_channel();
    if args.origin_pull {
        builder = builder.pump(DelayedOrigin(pulls));
    }
    let state = builder.build();
    let pull_time = Duration::from_millis(args.pull_ms.unwrap_or(500));
    let completer = state.clone();
    tokio::spawn(async move {
        while let Some(digest) = pulled.recv().await {
            let (state, store) = (completer.clone(), store.clone());
            tokio::spawn(async move {
                tokio::time::sleep(pull_time).await;
                store.insert(digest);
                state.finish_pull(&digest, Ok(()));
                tracing::info!(%digest, "origin pull complete");
            });
        }
    });

    let metrics = match args.metrics {
        Some(addr) => {
            let mut registry = prometheus_client::registry::Registry::default();
            swarm.behaviour_mut().coord.register_metrics(&mut registry);
            state.register_metrics(&mut registry);
            Some(common::metrics::serve(addr, registry).await?)
        }
        None => None,
    };

    let listen = args
        .listen
        .unwrap_or_else(|| "/ip4/127.0.0.1/tcp/0".parse().expect("a valid multiaddr"));
    swarm.listen_on(listen)?;

    let mut addresses = Vec::new();
    let mut announced = false;
    loop {
        let settle = tokio::time::sleep(Duration::from_millis(50));
        tokio::select! {
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    addresses.push(address.with(Protocol::P2p(local_peer)).to_string());
                }
                SwarmEvent::Behaviour(NodeBehaviourEvent::Coord(event)) => {
                    if let Some(event) = state.answer(&mut swarm.behaviour_mut().coord, event) {
                        tracing::info!(?event, "coord");
                    }
                }
                SwarmEvent::Behaviour(NodeBehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                    for addr in info.listen_addrs {
                        swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
                other => tracing::debug!(?other),
            },
            () = settle, if !announced && !addresses.is_empty() => {
                announced = true;
                let mut line = json!({ "peer_id": local_peer.to_string(), "listen": addresses });
                if let Some(addr) = metrics {
                    line["metrics"] = json!(addr.to_string());
                }
                println!("{line}");
            }
        }
    }
}

async fn ask(args: Args) -> Result<Value, Box<dyn std::error::Error>> {
    let target = args
        .query
        .as_ref()
        .or(args.please_pull.as_ref())
        .ok_or("no target")?;
    let Some(Protocol::P2p(peer)) = target.iter().last() else {
        return Err(format!("{target} does not end in /p2p/<peer id>").into());
    };
    let please_pull = match &args.please_pull {
        Some(_) => Some(PleasePull::new(
            args.registry
                .clone()
                .ok_or("--please-pull needs --registry")?,
            args.repository
                .clone()
                .ok_or("--please-pull needs --repository")?,
            args.kind.ok_or("--please-pull needs --kind")?,
            args.digests.clone(),
        )?),
        None => None,
    };
    if args.query.is_some() && args.digests.len() != 1 {
        return Err("--query needs exactly one --digest".into());
    }

    let mut swarm = build_swarm(
        libp2p::identity::Keypair::generate_ed25519(),
        Config::default(),
    )?;
    swarm.add_peer_address(peer, target.clone());
    let coordinator = swarm.behaviour().coord.coordinator();
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    Ok(match please_pull {
        Some(request) => {
            let outcomes = coordinator.please_pull(peer, &request).await?;
            Value::Array(outcomes.iter().map(outcome_json).collect())
        }
        None => intent_json(
            &coordinator
                .pull_intent_query(peer, &args.digests[0])
                .await?,
        ),
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let args = <Args as clap::Parser>::parse();
    if args.query.is_some() || args.please_pull.is_some() {
        return match ask(args).await {
            Ok(reply) => {
                println!("{reply}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        };
    }
    match serve(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

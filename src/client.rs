//! A cloneable async handle for code outside the swarm loop: it sends commands into the
//! behaviour and awaits typed results.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use futures::{
    channel::{mpsc, oneshot},
    lock::Mutex as AsyncMutex,
    FutureExt, SinkExt,
};
use hashlink::LruCache;
use libp2p_identity::PeerId;

use crate::{
    protocol::Response, Digest, NodeId, OutboundFailure, PleasePull, PleasePullOutcome, PullIntent,
};

/// Node ids whose peer ids a [`Coordinator`] remembers after being taught them.
const TAUGHT_PEERS: usize = 4096;

/// Resolves a cluster node id to a libp2p peer id.
pub type Resolver = Arc<dyn Fn(&NodeId) -> Option<PeerId> + Send + Sync>;

/// Who to ask: a cluster node (resolved to a peer id) or a peer id directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A cluster node id.
    Node(NodeId),
    /// A libp2p peer.
    Peer(PeerId),
}

impl From<NodeId> for Target {
    fn from(node: NodeId) -> Self {
        Target::Node(node)
    }
}

impl From<&NodeId> for Target {
    fn from(node: &NodeId) -> Self {
        Target::Node(node.clone())
    }
}

impl From<PeerId> for Target {
    fn from(peer: PeerId) -> Self {
        Target::Peer(peer)
    }
}

/// Why a [`Coordinator`] call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// No resolver, taught entry or parse turned the node id into a peer id.
    #[error("cannot resolve node {0} to a peer id")]
    Unresolvable(NodeId),
    /// The request failed on the network.
    #[error(transparent)]
    Request(#[from] OutboundFailure),
    /// The behaviour (and so its swarm) is gone.
    #[error("the swarm is no longer running")]
    Shutdown,
    /// No result within the request timeout, the one budget for queue, dial and exchange.
    #[error("no result in time")]
    Timeout,
}

pub(crate) enum Request {
    PullIntent(Digest),
    PleasePull(PleasePull),
}

pub(crate) type ResponseSender = oneshot::Sender<Result<Response, OutboundFailure>>;

pub(crate) struct Command {
    pub(crate) peer: PeerId,
    pub(crate) request: Request,
    pub(crate) response: ResponseSender,
    /// The end of the call's one budget.
    pub(crate) deadline: Instant,
}

/// A cloneable handle to a [`Behaviour`](crate::Behaviour), usable from any task while
/// the swarm loop runs. Get one with [`Behaviour::coordinator`](crate::Behaviour::coordinator).
/// Dropping a call's future cancels it: its result is discarded when it arrives.
#[derive(Clone)]
pub struct Coordinator {
    /// One sender shared by every clone, so the queue's bound holds for all of them
    /// together (each clone of a sender would get a slot of its own).
    commands: Arc<AsyncMutex<mpsc::Sender<Command>>>,
    resolver: Option<Resolver>,
    taught: Arc<Mutex<LruCache<NodeId, PeerId>>>,
    deadline: Duration,
}

impl fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coordinator")
            .field("resolver", &self.resolver.is_some())
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl Coordinator {
    pub(crate) fn new(commands: mpsc::Sender<Command>, deadline: Duration) -> Self {
        Coordinator {
            commands: Arc::new(AsyncMutex::new(commands)),
            resolver: None,
            taught: Arc::new(Mutex::new(LruCache::new(TAUGHT_PEERS))),
            deadline,
        }
    }

    /// Resolves node ids with `resolver` first (a membership lookup, say).
    pub fn with_resolver(
        mut self,
        resolver: impl Fn(&NodeId) -> Option<PeerId> + Send + Sync + 'static,
    ) -> Self {
        self.resolver = Some(Arc::new(resolver));
        self
    }

    /// Teaches the handle (and its clones) the peer id of a node.
    pub fn resolve_peer_id(&self, node: NodeId, peer: PeerId) {
        self.lock_taught().insert(node, peer);
    }

    /// The peer id of a node: from the resolver, then what was taught, then by parsing
    /// the node id as a peer id.
    pub fn resolve(&self, node: &NodeId) -> Result<PeerId, CoordinatorError> {
        if let Some(peer) = self.resolver.as_ref().and_then(|resolve| resolve(node)) {
            return Ok(peer);
        }
        if let Some(peer) = self.lock_taught().get(node) {
            return Ok(*peer);
        }
        node.as_str()
            .parse()
            .map_err(|_| CoordinatorError::Unresolvable(node.clone()))
    }

    /// Asks `target` what it knows about `digest`.
    pub async fn pull_intent_query(
        &self,
        target: impl Into<Target>,
        digest: &Digest,
    ) -> Result<PullIntent, CoordinatorError> {
        let peer = self.peer_of(target.into())?;
        let deadline = crate::time::now() + self.deadline;
        match self
            .call(peer, Request::PullIntent(*digest), deadline)
            .await?
        {
            Response::PullIntent(intent) => Ok(intent),
            Response::PleasePull { .. } => Err(OutboundFailure::UnexpectedResponse.into()),
        }
    }

    /// Asks `target` to pull the request's digests from the origin: one outcome per
    /// digest the peer accepted, in request order. A batch larger than one request may
    /// carry is split into requests of at most
    /// [`MAX_DIGESTS_PER_PLEASE_PULL`](crate::MAX_DIGESTS_PER_PLEASE_PULL), sent side by
    /// side under the one budget, as the newer Go client does; the first to fail fails
    /// the call.
    pub async fn please_pull(
        &self,
        target: impl Into<Target>,
        request: &PleasePull,
    ) -> Result<Vec<PleasePullOutcome>, CoordinatorError> {
        let peer = self.peer_of(target.into())?;
        let deadline = crate::time::now() + self.deadline;
        let calls = request.batches().map(|batch| async move {
            match self
                .call(peer, Request::PleasePull(batch), deadline)
                .await?
            {
                Response::PleasePull { outcomes, .. } => Ok(outcomes),
                Response::PullIntent(_) => {
                    Err(CoordinatorError::from(OutboundFailure::UnexpectedResponse))
                }
            }
        });
        let batches = futures::future::try_join_all(calls).await?;
        Ok(batches.into_iter().flatten().collect())
    }

    fn peer_of(&self, target: Target) -> Result<PeerId, CoordinatorError> {
        match target {
            Target::Peer(peer) => Ok(peer),
            Target::Node(node) => self.resolve(&node),
        }
    }

    async fn call(
        &self,
        peer: PeerId,
        request: Request,
        deadline: Instant,
    ) -> Result<Response, CoordinatorError> {
        let (response, result) = oneshot::channel();
        let command = Command {
            peer,
            request,
            response,
            deadline,
        };
        let exchange = async {
            self.commands
                .lock()
                .await
                .send(command)
                .await
                .map_err(|_| CoordinatorError::Shutdown)?;
            match result.await {
                Ok(result) => result.map_err(CoordinatorError::from),
                Err(oneshot::Canceled) => Err(CoordinatorError::Shutdown),
            }
        };
        let budget = deadline.saturating_duration_since(crate::time::now());
        futures::select! {
            result = exchange.fuse() => result,
            () = futures_timer::Delay::new(budget).fuse() => Err(CoordinatorError::Timeout),
        }
    }

    fn lock_taught(&self) -> parking_lot::MutexGuard<'_, LruCache<NodeId, PeerId>> {
        self.taught.lock()
    }
}

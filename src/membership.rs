//! Who is in the cluster: node ids, their published peer ids and zones.

use std::{
    fmt,
    sync::{Arc, RwLock},
};

use libp2p_identity::PeerId;

/// A node's stable cluster identity (the Kubernetes node or pod name); what HRW hashes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

impl NodeId {
    /// Wraps a node name.
    pub fn new(id: impl Into<String>) -> Self {
        NodeId(id.into())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

impl From<&str> for NodeId {
    fn from(id: &str) -> Self {
        NodeId::new(id)
    }
}

impl From<String> for NodeId {
    fn from(id: String) -> Self {
        NodeId(id)
    }
}

/// One member of the cluster as the membership view publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its node id.
    pub id: NodeId,
    /// Its libp2p peer id, once it has published one.
    pub peer_id: Option<PeerId>,
    /// Its availability zone, if known.
    pub zone: Option<String>,
}

impl Member {
    /// A member with a published peer id and no zone.
    pub fn new(id: impl Into<NodeId>, peer_id: Option<PeerId>) -> Self {
        Member {
            id: id.into(),
            peer_id,
            zone: None,
        }
    }

    /// Sets the zone.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }
}

/// A node's view of the cluster. Bring your own (an informer on the Kubernetes API, say)
/// or use [`StaticMembership`].
pub trait Membership: Send + Sync + 'static {
    /// This node's id.
    fn local_id(&self) -> NodeId;

    /// A snapshot of the members; empty when the node has no membership yet.
    fn members(&self) -> Arc<[Member]>;
}

/// A membership set by hand; clones share the same view.
#[derive(Debug, Clone)]
pub struct StaticMembership {
    local: NodeId,
    members: Arc<RwLock<Arc<[Member]>>>,
}

impl StaticMembership {
    /// A view with the given members (self may or may not be among them).
    pub fn new(local: impl Into<NodeId>, members: Vec<Member>) -> Self {
        StaticMembership {
            local: local.into(),
            members: Arc::new(RwLock::new(members.into())),
        }
    }

    /// Replaces the members.
    pub fn set_members(&self, members: Vec<Member>) {
        *self.members.write().unwrap_or_else(|e| e.into_inner()) = members.into();
    }
}

impl Membership for StaticMembership {
    fn local_id(&self) -> NodeId {
        self.local.clone()
    }

    fn members(&self) -> Arc<[Member]> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The peer ids members have published, for [`Behaviour::set_authorized_peers`](crate::Behaviour::set_authorized_peers).
pub fn published_peer_ids(members: &[Member]) -> impl Iterator<Item = PeerId> + '_ {
    members.iter().filter_map(|m| m.peer_id)
}

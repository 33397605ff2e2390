//! Who is in the cluster: node ids, their published peer ids and zones.

use std::{collections::HashSet, sync::Arc};

use parking_lot::RwLock;

use libp2p_identity::PeerId;

use crate::{NodeId, PeerAuthorizer, UnauthorizedReason};

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
///
/// Every membership vouches for peers ([`PeerAuthorizer`]): hand it to
/// [`Behaviour::authorize_with`](crate::Behaviour::authorize_with).
pub trait Membership: Send + Sync + 'static {
    /// This node's id.
    fn local_id(&self) -> NodeId;

    /// A snapshot of the members; empty when the node has no membership yet.
    fn members(&self) -> Arc<[Member]>;

    /// Whether a member of the current snapshot published `peer`; unevaluable while no
    /// member has published a peer id. The default scans the snapshot; a membership that
    /// keeps an index answers faster.
    fn check_peer(&self, peer: &PeerId) -> Result<(), UnauthorizedReason> {
        let members = self.members();
        let mut published = members.iter().filter_map(|m| m.peer_id).peekable();
        if published.peek().is_none() {
            return Err(UnauthorizedReason::Unevaluable);
        }
        if published.any(|p| p == *peer) {
            Ok(())
        } else {
            Err(UnauthorizedReason::Unrecognized)
        }
    }
}

impl<M: Membership + ?Sized> Membership for Arc<M> {
    fn local_id(&self) -> NodeId {
        (**self).local_id()
    }

    fn members(&self) -> Arc<[Member]> {
        (**self).members()
    }

    fn check_peer(&self, peer: &PeerId) -> Result<(), UnauthorizedReason> {
        (**self).check_peer(peer)
    }
}

impl<M: Membership> PeerAuthorizer for M {
    fn authorize(&self, peer: &PeerId) -> Result<(), UnauthorizedReason> {
        self.check_peer(peer)
    }
}

/// A membership set by hand; clones share the same view.
#[derive(Debug, Clone)]
pub struct StaticMembership {
    local: NodeId,
    snapshot: Arc<RwLock<Snapshot>>,
}

/// The members and, for the per-request authorization check, their published peer ids.
#[derive(Debug)]
struct Snapshot {
    members: Arc<[Member]>,
    peers: HashSet<PeerId>,
}

impl Snapshot {
    fn new(members: Vec<Member>) -> Self {
        Snapshot {
            peers: members.iter().filter_map(|m| m.peer_id).collect(),
            members: members.into(),
        }
    }
}

impl StaticMembership {
    /// A view with the given members (self may or may not be among them).
    pub fn new(local: impl Into<NodeId>, members: Vec<Member>) -> Self {
        StaticMembership {
            local: local.into(),
            snapshot: Arc::new(RwLock::new(Snapshot::new(members))),
        }
    }

    /// Replaces the members; the next request is checked against the new snapshot.
    pub fn set_members(&self, members: Vec<Member>) {
        let snapshot = Snapshot::new(members);
        *self.snapshot.write() = snapshot;
    }

    fn read(&self) -> parking_lot::RwLockReadGuard<'_, Snapshot> {
        self.snapshot.read()
    }
}

impl Membership for StaticMembership {
    fn local_id(&self) -> NodeId {
        self.local.clone()
    }

    fn members(&self) -> Arc<[Member]> {
        self.read().members.clone()
    }

    fn check_peer(&self, peer: &PeerId) -> Result<(), UnauthorizedReason> {
        let snapshot = self.read();
        if snapshot.peers.is_empty() {
            Err(UnauthorizedReason::Unevaluable)
        } else if snapshot.peers.contains(peer) {
            Ok(())
        } else {
            Err(UnauthorizedReason::Unrecognized)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A membership that keeps no index, so the trait's default check runs.
    struct Plain(Vec<Member>);

    impl Membership for Plain {
        fn local_id(&self) -> NodeId {
            NodeId::new("self")
        }
        fn members(&self) -> Arc<[Member]> {
            self.0.clone().into()
        }
    }

    #[test]
    fn both_checks_agree() {
        let (a, b, stranger) = (PeerId::random(), PeerId::random(), PeerId::random());
        let cases = [
            (vec![], a, Err(UnauthorizedReason::Unevaluable)),
            (
                vec![Member::new("x", None)],
                a,
                Err(UnauthorizedReason::Unevaluable),
            ),
            (
                vec![Member::new("x", None), Member::new("y", Some(a))],
                a,
                Ok(()),
            ),
            (
                vec![Member::new("x", Some(a)), Member::new("y", Some(b))],
                stranger,
                Err(UnauthorizedReason::Unrecognized),
            ),
        ];
        for (members, peer, want) in cases {
            assert_eq!(Plain(members.clone()).authorize(&peer), want);
            let indexed = StaticMembership::new("self", vec![]);
            indexed.set_members(members);
            assert_eq!(indexed.authorize(&peer), want);
            assert_eq!(Arc::new(indexed).authorize(&peer), want);
        }
    }
}

//! HRW answers kept per digest for one membership snapshot. Every pull_intent answer
//! carries the node's own rank and every resolution starts from a top K; computed
//! afresh, each hashes the whole membership (a millisecond at 10,000 members), and in a
//! rollout the same few digests are asked about thousands of times. A snapshot is an
//! `Arc` the membership hands out until it changes, so a cache tied to that `Arc` is
//! dropped by the first lookup after a change and can never answer from a stale view.

use std::sync::Arc;

use hashlink::LruCache;
use parking_lot::Mutex;

use super::{cascade::ranked_candidates, hrw, Member};
use crate::{Digest, NodeId};

/// Rankings longer than this are not kept: a caller that wants the whole order pays
/// for it each time, and the cache stays small (at most this many ids per entry).
const LONGEST_KEPT: usize = 64;

/// Up to this many members, hashing them all costs about what a cache miss adds (about
/// half a microsecond, a few SHA-256s): such rankings are computed, not kept.
const COMPUTED_UP_TO: usize = 64;

pub(crate) struct RankCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    /// The snapshot (and local id) the entries were computed from.
    view: Option<(Arc<[Member]>, NodeId)>,
    /// Keyed by the digest's bytes: no allocation per lookup or insert.
    entries: LruCache<[u8; 32], Entry>,
}

#[derive(Default, Clone)]
struct Entry {
    /// The local node's rank, once computed.
    own_rank: Option<Option<u32>>,
    /// Per zone scope (false, true): the best-ranked candidates, and how many were
    /// asked for when they were computed (more than the list holds: it is all of them).
    rankings: [Option<(usize, Arc<[NodeId]>)>; 2],
}

impl RankCache {
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        RankCache {
            capacity,
            inner: Mutex::new(Inner {
                view: None,
                entries: LruCache::new(capacity),
            }),
        }
    }

    /// `hrw::rank_of(members, local, digest)`, computed once per snapshot and digest.
    pub(crate) fn own_rank(
        &self,
        members: &Arc<[Member]>,
        local: &NodeId,
        digest: &Digest,
    ) -> Option<u32> {
        if members.len() <= COMPUTED_UP_TO {
            return hrw::rank_of(members.iter(), local.as_str(), digest);
        }
        if let Some(rank) = self.lookup(members, local, digest, |e| e.own_rank) {
            return rank;
        }
        // Computed outside the lock: answers on other tasks do not queue behind it.
        let rank = hrw::rank_of(members.iter(), local.as_str(), digest);
        self.store(members, local, digest, |e| e.own_rank = Some(rank));
        rank
    }

    /// The best `k` candidates of a cascade on `local` for `digest` (its zone's with
    /// `zone_scope`), computed once per snapshot, digest and scope for any `k` up to
    /// [`LONGEST_KEPT`].
    pub(crate) fn ranking(
        &self,
        members: &Arc<[Member]>,
        local: &NodeId,
        digest: &Digest,
        k: usize,
        zone_scope: bool,
    ) -> Vec<NodeId> {
        if members.len() <= COMPUTED_UP_TO {
            return ranked_candidates(zone_scope, members, local, digest, k);
        }
        let scope = usize::from(zone_scope);
        let kept = self.lookup(members, local, digest, |e| {
            e.rankings[scope]
                .clone()
                .filter(|(asked, ranked)| k <= *asked || ranked.len() < *asked)
        });
        if let Some((_, ranked)) = kept {
            return ranked[..k.min(ranked.len())].to_vec();
        }
        let ranked = ranked_candidates(zone_scope, members, local, digest, k);
        if k <= LONGEST_KEPT {
            let kept: Arc<[NodeId]> = ranked.clone().into();
            self.store(members, local, digest, |e| {
                e.rankings[scope] = Some((k, kept));
            });
        }
        ranked
    }

    fn lookup<T>(
        &self,
        members: &Arc<[Member]>,
        local: &NodeId,
        digest: &Digest,
        read: impl FnOnce(&Entry) -> Option<T>,
    ) -> Option<T> {
        let mut inner = self.inner.lock();
        if !inner.is_view(members, local) {
            return None;
        }
        inner.entries.get(&digest.to_bytes()).and_then(read)
    }

    fn store(
        &self,
        members: &Arc<[Member]>,
        local: &NodeId,
        digest: &Digest,
        write: impl FnOnce(&mut Entry),
    ) {
        let mut inner = self.inner.lock();
        if !inner.is_view(members, local) {
            // A new snapshot: what was kept belongs to the old one.
            inner.view = Some((members.clone(), local.clone()));
            inner.entries = LruCache::new(self.capacity);
        }
        let key = digest.to_bytes();
        match inner.entries.get_mut(&key) {
            Some(entry) => write(entry),
            None => {
                let mut entry = Entry::default();
                write(&mut entry);
                inner.entries.insert(key, entry);
            }
        }
    }
}

impl Inner {
    fn is_view(&self, members: &Arc<[Member]>, local: &NodeId) -> bool {
        // The entries hold their snapshot's `Arc`, so its address cannot be reused by
        // another snapshot while they live.
        self.view
            .as_ref()
            .is_some_and(|(kept, id)| Arc::ptr_eq(kept, members) && id == local)
    }
}

impl std::fmt::Debug for RankCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Membership, NodeState, StaticMembership};

    fn digest(i: u64) -> Digest {
        Digest::parse(&format!(
            "sha256:{:064x}",
            i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ))
        .unwrap()
    }

    /// The reference: the cascade's candidates ranked by `hrw::top_k` with no cache.
    fn reference(
        members: &[Member],
        local: &NodeId,
        d: &Digest,
        k: usize,
        zone: bool,
    ) -> Vec<NodeId> {
        let own_zone = members
            .iter()
            .find(|m| &m.id == local)
            .and_then(|m| m.zone.clone());
        let in_zone: Vec<&Member> = match (zone, &own_zone) {
            (true, Some(z)) => hrw::in_zone(members, z).collect(),
            _ => Vec::new(),
        };
        let candidates: Vec<&Member> = if in_zone.is_empty() {
            members.iter().collect()
        } else {
            in_zone
        };
        hrw::top_k(candidates, d, k)
            .into_iter()
            .map(|m| m.id.clone())
            .collect()
    }

    /// Joins, leaves (the local node's too) and zone moves on a random walk; after each
    /// change, every answer matches the reference functions for every member asked about.
    #[test]
    fn answers_match_the_reference_through_joins_leaves_and_zones() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let local = NodeId::new("node-0");
        let member = |i: u64, zone: u64| {
            let m = Member::new(format!("node-{i}"), None);
            if zone == 0 {
                m
            } else {
                m.with_zone(format!("z{zone}"))
            }
        };
        // Larger than what is computed rather than kept, and it stays so.
        let mut members: Vec<Member> = (0..COMPUTED_UP_TO as u64 + 40)
            .map(|i| member(i, i % 3))
            .collect();
        let membership = StaticMembership::new(local.clone(), members.clone());
        let state = NodeState::builder(membership.clone()).build();
        let digests: Vec<Digest> = (0..3).map(digest).collect();
        for step in 0..60 {
            match next(4) {
                0 => members.push(member(100 + step, next(3))),
                1 if members.len() > 1 => {
                    let gone = next(members.len() as u64) as usize;
                    members.remove(gone);
                }
                2 if !members.is_empty() => {
                    let moved = next(members.len() as u64) as usize;
                    let i = members[moved].id.clone();
                    members[moved] = Member::new(i, None).with_zone(format!("z{}", next(3)));
                }
                _ => {}
            }
            if step % 20 == 10 && !members.iter().any(|m| m.id == local) {
                members.push(member(0, next(3)));
            }
            membership.set_members(members.clone());
            let snapshot = membership.members();
            // Twice: the second pass is answered from the cache.
            for _ in 0..2 {
                for d in &digests {
                    assert_eq!(
                        state.local_pull_intent(d).hrw_rank,
                        hrw::rank_of(snapshot.iter(), local.as_str(), d),
                        "step {step}"
                    );
                    for k in [1, 3, 6, 64] {
                        for zone in [false, true] {
                            assert_eq!(
                                state.ranking(d, k, zone),
                                reference(&snapshot, &local, d, k, zone),
                                "step {step}, k {k}, zone scope {zone}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_new_snapshot_drops_what_was_kept() {
        let snapshot = |extra: Option<&str>| -> Arc<[Member]> {
            (0..=COMPUTED_UP_TO)
                .map(|i| Member::new(format!("m-{i}"), None))
                .chain(extra.map(|id| Member::new(id, None)))
                .collect::<Vec<_>>()
                .into()
        };
        let cache = RankCache::new(8);
        let local = NodeId::new("b");
        let d = digest(1);
        let with = snapshot(Some("b"));
        assert_eq!(
            cache.own_rank(&with, &local, &d),
            hrw::rank_of(with.iter(), "b", &d)
        );
        assert_eq!(cache.inner.lock().entries.len(), 1, "kept");
        // A new snapshot without this node: not the rank kept for the old one.
        let without = snapshot(None);
        assert_eq!(cache.own_rank(&without, &local, &d), None);
        let again = snapshot(Some("b"));
        assert_eq!(
            cache.own_rank(&again, &local, &d),
            hrw::rank_of(again.iter(), "b", &d)
        );
        // Bounded: more digests than the capacity still answer correctly.
        for i in 0..100 {
            let d = digest(i);
            assert_eq!(
                cache.own_rank(&again, &local, &d),
                hrw::rank_of(again.iter(), "b", &d)
            );
        }
        assert!(cache.inner.lock().entries.len() <= 8);
    }
}

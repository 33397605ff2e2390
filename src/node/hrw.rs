//! Rendezvous (highest random weight) ranking, identical to the Go nodes:
//! `score = SHA-256(node_id ‖ digest)`, compared as big-endian bytes, higher wins, and on
//! an equal score the lexicographically larger node id wins. Rank 0 is the designated puller.

use std::cmp::Ordering;

use sha2::{Digest as _, Sha256};

use crate::{Digest, Member};

/// The 32-byte rendezvous score of a node for a digest.
pub fn score(node_id: &str, digest: &Digest) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(node_id.as_bytes());
    hasher.update(digest.encode().as_bytes());
    hasher.finalize().into()
}

/// Whether `(a_score, a_id)` ranks ahead of `(b_score, b_id)`.
fn ahead(a: &([u8; 32], &str), b: &([u8; 32], &str)) -> bool {
    match a.0.cmp(&b.0) {
        Ordering::Equal => a.1 > b.1,
        order => order == Ordering::Greater,
    }
}

/// The 0-based rank of `node_id` among `members` for `digest`; `None` when it is not a member.
pub fn rank_of<'a>(
    members: impl IntoIterator<Item = &'a Member>,
    node_id: &str,
    digest: &Digest,
) -> Option<u32> {
    let own = (score(node_id, digest), node_id);
    let mut present = false;
    let mut rank = 0u32;
    for member in members {
        if member.id.as_str() == node_id {
            present = true;
            continue;
        }
        let other = (score(member.id.as_str(), digest), member.id.as_str());
        if ahead(&other, &own) {
            rank += 1;
        }
    }
    present.then_some(rank)
}

/// The `k` best-ranked members for `digest`, best first.
pub fn top_k<'a>(
    members: impl IntoIterator<Item = &'a Member>,
    digest: &Digest,
    k: usize,
) -> Vec<&'a Member> {
    let mut scored: Vec<([u8; 32], &Member)> = members
        .into_iter()
        .map(|m| (score(m.id.as_str(), digest), m))
        .collect();
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.id.cmp(&a.1.id)));
    scored.truncate(k);
    scored.into_iter().map(|(_, m)| m).collect()
}

/// Members in `zone`, for callers that keep the puller inside one availability zone.
pub fn in_zone<'a>(
    members: impl IntoIterator<Item = &'a Member>,
    zone: &'a str,
) -> impl Iterator<Item = &'a Member> {
    members
        .into_iter()
        .filter(move |m| m.zone.as_deref() == Some(zone))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;

    fn member(id: &str, zone: Option<&str>) -> Member {
        Member {
            id: NodeId::new(id),
            peer_id: None,
            zone: zone.map(str::to_owned),
        }
    }

    fn digest(byte: &str) -> Digest {
        Digest::parse(&format!("sha256:{}", byte.repeat(32))).unwrap()
    }

    const NODES: [&str; 7] = [
        "node-a", "node-b", "node-c", "node-d", "worker-1", "worker-2", "worker-3",
    ];

    /// Scores and orders computed independently (Python's hashlib over the same bytes),
    /// the same input a Go node hashes.
    #[test]
    fn fixed_vectors() {
        assert_eq!(
            hex(&score("node-a", &digest("ab"))),
            "29b49789e70b05a5a15dc53c1d6375b8405857bdbfa97adc0835417e04a8c1ac"
        );
        assert_eq!(
            hex(&score("worker-3", &digest("01"))),
            "cfc07c6a90279c292a7fc699ae0329bc1e4967a04c98437bf8f6d2daec2e6a72"
        );
        let members: Vec<_> = NODES.iter().map(|id| member(id, None)).collect();
        let order = |d: &Digest| -> Vec<&str> {
            top_k(&members, d, 7)
                .iter()
                .map(|m| m.id.as_str())
                .collect()
        };
        assert_eq!(
            order(&digest("ab")),
            ["worker-2", "node-c", "worker-1", "worker-3", "node-d", "node-a", "node-b"]
        );
        assert_eq!(
            order(&digest("01")),
            ["worker-3", "node-d", "node-a", "node-c", "worker-1", "worker-2", "node-b"]
        );
        assert_eq!(rank_of(&members, "worker-2", &digest("ab")), Some(0));
        assert_eq!(rank_of(&members, "node-b", &digest("ab")), Some(6));
        assert_eq!(rank_of(&members, "node-c", &digest("01")), Some(3));
        assert_eq!(rank_of(&members, "stranger", &digest("01")), None);
        assert_eq!(rank_of(&[], "node-a", &digest("01")), None);
        assert_eq!(top_k(&members, &digest("01"), 2).len(), 2);
    }

    #[test]
    fn equal_scores_go_to_the_larger_node_id() {
        let s = [7u8; 32];
        assert!(ahead(&(s, "node-b"), &(s, "node-a")));
        assert!(!ahead(&(s, "node-a"), &(s, "node-b")));
        let mut higher = s;
        higher[31] = 8;
        assert!(ahead(&(higher, "a"), &(s, "z")));
    }

    #[test]
    fn zone_filter_keeps_only_that_zone() {
        let members = [
            member("a", Some("z1")),
            member("b", Some("z2")),
            member("c", None),
            member("d", Some("z1")),
        ];
        let ids: Vec<_> = in_zone(&members, "z1").map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["a", "d"]);
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

//! Peer authorization: who may make requests, asked on every request.

use std::time::{Duration, Instant};

use hashlink::LruCache;
use libp2p_identity::PeerId;

use crate::UnauthorizedReason;

/// Vouches for peers on every request, from the membership's current snapshot, so that a
/// node that leaves the cluster is refused at once and one that joins is served at once.
///
/// Every [`Membership`](crate::Membership) is one: hand the node's membership to
/// [`Behaviour::authorize_with`](crate::Behaviour::authorize_with). An application with
/// its own notion of membership implements this directly.
pub trait PeerAuthorizer: Send + Sync + 'static {
    /// `Ok` when a member has published `peer`; [`UnauthorizedReason::Unevaluable`] when
    /// no member has published a peer id yet (cold boot), so nobody can be checked.
    fn authorize(&self, peer: &PeerId) -> Result<(), UnauthorizedReason>;
}

/// Peers whose last warning is remembered; the least recently warned go first.
const WARNED_PEERS: usize = 1024;
/// One warning per peer per this long; the rest go to debug.
const WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Rate-limits warnings per peer, so a misconfigured or hostile peer that retries in a
/// loop does not flood the log.
#[derive(Debug)]
pub(crate) struct WarningLimiter {
    last: LruCache<PeerId, Instant>,
}

impl Default for WarningLimiter {
    fn default() -> Self {
        WarningLimiter {
            last: LruCache::new(WARNED_PEERS),
        }
    }
}

impl WarningLimiter {
    /// Whether a warning about `peer` may be logged `now`; records it if so.
    pub(crate) fn allow(&mut self, peer: PeerId, now: Instant) -> bool {
        match self.last.get(&peer) {
            Some(last) if now.saturating_duration_since(*last) < WARNING_INTERVAL => false,
            _ => {
                self.last.insert(peer, now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_peer_per_interval() {
        let mut limiter = WarningLimiter::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        assert!(limiter.allow(a, t0));
        assert!(!limiter.allow(a, t0 + Duration::from_secs(1)));
        assert!(limiter.allow(b, t0 + Duration::from_secs(1)), "per peer");
        assert!(!limiter.allow(a, t0 + WARNING_INTERVAL - Duration::from_millis(1)));
        assert!(limiter.allow(a, t0 + WARNING_INTERVAL));
    }
}

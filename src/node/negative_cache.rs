//! Recently failed origin pulls, with a cooldown that grows on repeated failure.

use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use hashlink::LruCache;

use crate::{Digest, FailureClass, RecentFailure};

/// The negative cache a node answers from. Bring your own or use [`NegativeCache`].
pub trait FailureCache: Send + Sync + 'static {
    /// The live entry for `digest` (live while `now` ≤ its cooldown end); an entry found
    /// expired is dropped, so the next failure starts the ladder again.
    fn get(&self, digest: &Digest, now: SystemTime) -> Option<RecentFailure>;

    /// Records a failed pull and returns the entry with its new cooldown.
    fn record(&self, digest: &Digest, class: FailureClass, now: SystemTime) -> RecentFailure;

    /// Forgets `digest`, after a successful pull.
    fn clear(&self, digest: &Digest);
}

/// A bounded in-memory negative cache with the Go `negcache` cooldowns: 10 s, then ×3
/// per failure recorded while the entry lives, at most 10 min (10 s, 30 s, 90 s, 270 s,
/// 600 s). It heals itself as Go's does: an entry is live while now ≤ its cooldown end,
/// one found expired is dropped, and a failure after that starts again at 10 s. The
/// least recently used entry goes when the cache is full.
#[derive(Debug)]
pub struct NegativeCache {
    entries: Mutex<LruCache<Digest, Entry>>,
    base: Duration,
    max: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    failure: RecentFailure,
}

impl Default for NegativeCache {
    fn default() -> Self {
        NegativeCache::new(4096)
    }
}

impl NegativeCache {
    /// A cache of at most `capacity` digests with the default cooldowns.
    pub fn new(capacity: usize) -> Self {
        NegativeCache {
            entries: Mutex::new(LruCache::new(capacity.max(1))),
            base: Duration::from_secs(10),
            max: Duration::from_secs(600),
        }
    }

    /// Digests held, live or expired but not yet looked up.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Holds `failure` for `digest` as a first failure, whatever its cooldown: for nodes
    /// that restore state or tests that need a given cooldown.
    pub fn insert(&self, digest: Digest, failure: RecentFailure) {
        self.lock().insert(
            digest,
            Entry {
                failures: 1,
                failure,
            },
        );
    }

    /// The cooldown after the `failures`-th consecutive failure.
    pub fn cooldown(&self, failures: u32) -> Duration {
        let factor = 3u32.saturating_pow(failures.saturating_sub(1));
        self.base.saturating_mul(factor).min(self.max)
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, LruCache<Digest, Entry>> {
        self.entries.lock()
    }
}

impl FailureCache for NegativeCache {
    fn get(&self, digest: &Digest, now: SystemTime) -> Option<RecentFailure> {
        let mut entries = self.lock();
        let failure = entries.get(digest)?.failure;
        if now > failure.cooldown_until {
            entries.remove(digest);
            return None;
        }
        Some(failure)
    }

    fn record(&self, digest: &Digest, class: FailureClass, now: SystemTime) -> RecentFailure {
        let mut entries = self.lock();
        let live = entries
            .get(digest)
            .filter(|e| now <= e.failure.cooldown_until);
        let failures = live.map_or(0, |e| e.failures) + 1;
        let failure = RecentFailure {
            cooldown_until: now + self.cooldown(failures),
            class,
        };
        entries.insert(*digest, Entry { failures, failure });
        failure
    }

    fn clear(&self, digest: &Digest) {
        self.lock().remove(digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::digest::sample as digest;

    #[test]
    fn cooldown_grows_and_caps() {
        let cache = NegativeCache::new(8);
        let secs: Vec<u64> = (1..=7).map(|n| cache.cooldown(n).as_secs()).collect();
        assert_eq!(secs, [10, 30, 90, 270, 600, 600, 600]);
        assert_eq!(cache.cooldown(u32::MAX), Duration::from_secs(600));
    }

    #[test]
    fn escalates_only_while_the_entry_lives() {
        let cache = NegativeCache::new(8);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let first = cache.record(&digest(1), FailureClass::Transient, t0);
        assert_eq!(first.cooldown_until, t0 + Duration::from_secs(10));
        assert_eq!(
            cache.get(&digest(1), t0 + Duration::from_secs(9)),
            Some(first)
        );
        // Live up to and including its end, as Go's `Now().After(until)` test.
        assert_eq!(
            cache.get(&digest(1), t0 + Duration::from_secs(10)),
            Some(first)
        );
        let t1 = t0 + Duration::from_secs(5);
        let second = cache.record(&digest(1), FailureClass::NotFound, t1);
        assert_eq!(second.cooldown_until, t1 + Duration::from_secs(30));
        assert_eq!(second.class, FailureClass::NotFound);
        let t2 = t1 + Duration::from_secs(30);
        let third = cache.record(&digest(1), FailureClass::NotFound, t2);
        assert_eq!(third.cooldown_until, t2 + Duration::from_secs(90));
        cache.clear(&digest(1));
        assert_eq!(cache.get(&digest(1), t2), None);
        let after_success = cache.record(&digest(1), FailureClass::Auth, t2);
        assert_eq!(
            after_success.cooldown_until,
            t2 + Duration::from_secs(10),
            "count restarts after success"
        );
    }

    #[test]
    fn an_expired_entry_heals() {
        let cache = NegativeCache::new(8);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        cache.record(&digest(1), FailureClass::Transient, t0);
        cache.record(&digest(1), FailureClass::Transient, t0);
        let expired = t0 + Duration::from_secs(31);
        assert_eq!(cache.get(&digest(1), expired), None);
        assert_eq!(cache.len(), 0, "an entry found expired is dropped");
        let next = cache.record(&digest(1), FailureClass::Transient, expired);
        assert_eq!(next.cooldown_until, expired + Duration::from_secs(10));

        // Also when the failure comes in before anyone looked the entry up.
        cache.record(&digest(2), FailureClass::Transient, t0);
        let late = t0 + Duration::from_secs(11);
        let restarted = cache.record(&digest(2), FailureClass::Transient, late);
        assert_eq!(restarted.cooldown_until, late + Duration::from_secs(10));
    }

    #[test]
    fn bounded_by_capacity() {
        let cache = NegativeCache::new(3);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        for n in 0..10 {
            cache.record(&digest(n), FailureClass::Transient, t0);
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&digest(0), t0).is_none(), "oldest evicted");
        assert!(cache.get(&digest(9), t0).is_some());
    }
}

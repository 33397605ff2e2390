//! Origin pulls in flight, one per digest, and when each started.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use parking_lot::Mutex;

use crate::{Digest, OriginRefKind};

/// What claiming a digest for an origin pull came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The digest is now in flight, from the given time.
    Claimed,
    /// A pull of it was already in flight, since this time.
    InFlightSince(SystemTime),
    /// The node runs as many pulls as it will; this one is declined (load shedding).
    Full,
}

/// The in-flight map a node answers from. Bring your own or use [`InFlightMap`].
pub trait InFlightPulls: Send + Sync + 'static {
    /// Claims `digest` for an origin pull starting `now`, unless one is in flight already.
    fn begin(&self, digest: &Digest, now: SystemTime) -> Claim;

    /// When the in-flight pull of `digest` started, if one is in flight.
    fn started_at(&self, digest: &Digest) -> Option<SystemTime>;

    /// Ends the pull of `digest`, whatever its result.
    fn finish(&self, digest: &Digest);
}

/// An in-memory in-flight map, bounded by `max_entries`: a node does not run unbounded
/// origin pulls, so a full map declines new ones until some finish (as the Go pump does
/// at its concurrent-pull ceiling).
#[derive(Debug)]
pub struct InFlightMap {
    entries: Mutex<HashMap<Digest, SystemTime>>,
    max_entries: usize,
}

impl Default for InFlightMap {
    fn default() -> Self {
        InFlightMap::new(4096)
    }
}

impl InFlightMap {
    /// A map of at most `max_entries` pulls.
    pub fn new(max_entries: usize) -> Self {
        InFlightMap {
            entries: Mutex::default(),
            max_entries,
        }
    }

    /// Pulls in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no pull is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<Digest, SystemTime>> {
        self.entries.lock()
    }
}

impl InFlightPulls for InFlightMap {
    fn begin(&self, digest: &Digest, now: SystemTime) -> Claim {
        let mut entries = self.lock();
        if let Some(started) = entries.get(digest) {
            return Claim::InFlightSince(*started);
        }
        if entries.len() >= self.max_entries {
            return Claim::Full;
        }
        entries.insert(*digest, now);
        Claim::Claimed
    }

    fn started_at(&self, digest: &Digest) -> Option<SystemTime> {
        self.lock().get(digest).copied()
    }

    fn finish(&self, digest: &Digest) {
        self.lock().remove(digest);
    }
}

/// How long after its start an in-flight pull counts as stale, so that a requester may
/// take it over, as the Go `inflight.ResolveStall` computes it: manifests after 5 s;
/// every other kind, the image config included, after 3 × max(10 s, the whole seconds
/// it takes to move `size` bytes at 50 MiB/s). A config is not short: taking it over at
/// 5 s would start a second origin pull that the Go nodes still wait out.
pub fn stale_after(kind: OriginRefKind, size: Option<u64>) -> Duration {
    Stalls::default().stale_after(kind, size)
}

/// The stall thresholds of [`stale_after`], adjustable (a test cluster shortens them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalls {
    /// A manifest pull's bound (default 5 s).
    pub manifest: Duration,
    /// The least any other pull is given before the multiplier (default 10 s).
    pub floor: Duration,
    /// The origin rate assumed for the transfer time (default 50 MiB/s).
    pub bytes_per_sec: u64,
    /// How many times the expected time a pull may take (default 3).
    pub multiplier: u32,
}

impl Default for Stalls {
    fn default() -> Self {
        Stalls {
            manifest: Duration::from_secs(5),
            floor: Duration::from_secs(10),
            bytes_per_sec: 50 << 20,
            multiplier: 3,
        }
    }
}

impl Stalls {
    /// When an in-flight pull of `kind` and expected `size` counts as stale.
    pub fn stale_after(&self, kind: OriginRefKind, size: Option<u64>) -> Duration {
        match kind {
            OriginRefKind::Manifest => self.manifest,
            OriginRefKind::Config | OriginRefKind::Blob => {
                let secs = size.unwrap_or(0) / self.bytes_per_sec.max(1);
                Duration::from_secs(secs).max(self.floor) * self.multiplier
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::digest::sample as digest;

    #[test]
    fn dedupes_per_digest_and_remembers_the_start() {
        let map = InFlightMap::new(2);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(map.begin(&digest(1), t0), Claim::Claimed);
        assert_eq!(map.begin(&digest(1), t1), Claim::InFlightSince(t0));
        assert_eq!(map.started_at(&digest(1)), Some(t0));
        assert_eq!(map.begin(&digest(2), t1), Claim::Claimed);
        assert_eq!(map.begin(&digest(3), t1), Claim::Full);
        map.finish(&digest(1));
        assert_eq!(map.started_at(&digest(1)), None);
        assert_eq!(map.begin(&digest(3), t1), Claim::Claimed);
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn staleness_follows_kind_and_size() {
        assert_eq!(
            stale_after(OriginRefKind::Manifest, None),
            Duration::from_secs(5)
        );
        assert_eq!(
            stale_after(OriginRefKind::Config, None),
            Duration::from_secs(30),
            "only manifests take the short bound"
        );
        assert_eq!(
            stale_after(OriginRefKind::Config, Some(1 << 40)),
            Duration::from_secs(3 * ((1 << 40) / (50 << 20)))
        );
        assert_eq!(
            stale_after(OriginRefKind::Blob, Some(1 << 20)),
            Duration::from_secs(30)
        );
        assert_eq!(
            stale_after(OriginRefKind::Blob, Some(1000 << 20)),
            Duration::from_secs(60)
        );
        // Whole seconds, as Go's integer division: 20.4 s of transfer counts as 20 s.
        assert_eq!(
            stale_after(OriginRefKind::Blob, Some(1020 << 20)),
            Duration::from_secs(60)
        );
    }
}

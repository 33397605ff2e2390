//! The local content store check.

use std::{collections::HashSet, sync::Arc};

use parking_lot::Mutex;

use crate::Digest;

/// What the content store says about a digest. An unavailable store must never read as
/// cached: the answer is "not cached" and the storage-unavailable signal fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreLookup {
    /// The store holds the digest.
    Cached,
    /// The store answered and does not hold it.
    NotCached,
    /// The store could not be asked (down, timing out).
    Unavailable,
}

/// A local content store (containerd's content store, a directory of blobs). The check
/// runs on the swarm loop, so it must be quick: a stat, not a read.
pub trait ContentStore: Send + Sync + 'static {
    /// Whether the store holds `digest`.
    fn lookup(&self, digest: &Digest) -> StoreLookup;
}

/// An in-memory store; clones share the same contents.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    digests: Arc<Mutex<HashSet<Digest>>>,
    unavailable: Arc<std::sync::atomic::AtomicBool>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a digest as held.
    pub fn insert(&self, digest: Digest) {
        self.lock().insert(digest);
    }

    /// Forgets a digest.
    pub fn remove(&self, digest: &Digest) {
        self.lock().remove(digest);
    }

    /// Makes every lookup answer [`StoreLookup::Unavailable`], as a store that is down.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable
            .store(unavailable, std::sync::atomic::Ordering::Release);
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, HashSet<Digest>> {
        self.digests.lock()
    }
}

impl ContentStore for MemoryStore {
    fn lookup(&self, digest: &Digest) -> StoreLookup {
        if self.unavailable.load(std::sync::atomic::Ordering::Acquire) {
            StoreLookup::Unavailable
        } else if self.lock().contains(digest) {
            StoreLookup::Cached
        } else {
            StoreLookup::NotCached
        }
    }
}

//! A content-addressed directory: `DIR/sha256/<hex>`, each blob written to `DIR/tmp`
//! first and renamed into place only once its digest matched, so that a node killed
//! mid-write never leaves a bad blob behind.

use std::{
    collections::HashMap,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use gantry_coord::{ContentStore, Digest, StoreLookup};
use hashlink::LruCache;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::pieces::{Geometry, PieceHash, PieceSet};

/// Whole blobs whose piece hashes are kept in memory, for members that fetch them in
/// pieces; the rest are hashed again when asked for.
const HASHED_BLOBS: usize = 256;

#[derive(Debug, Clone)]
pub struct BlobDir {
    root: PathBuf,
    /// Blobs being received, by whatever writes them: readers follow their progress.
    live: Arc<Mutex<HashMap<Digest, Arc<Receiving>>>>,
    /// Counts every blob that began or ended being received.
    changes: Arc<watch::Sender<u64>>,
    hashes: Arc<Mutex<LruCache<Digest, Arc<[PieceHash]>>>>,
}

/// Why a blob was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Io(#[from] io::Error),
    #[error("content does not match its digest (got {actual})")]
    Mismatch { actual: String },
    #[error("more bytes than announced")]
    TooLong,
    #[error("fewer bytes than announced")]
    TooShort,
    #[error("the blob is being received already")]
    Busy,
    #[error("piece {0} is not one of the blob's")]
    NoSuchPiece(u32),
}

/// Where a blob being received stands; readers watch it change.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Known once the blob's length is.
    pub geometry: Option<Geometry>,
    /// Pieces in place: checked against their hash when they came from a member, or
    /// hashed here as the origin's bytes passed.
    pub have: PieceSet,
    /// Each present piece's hash (zero for the others).
    pub hashes: Vec<PieceHash>,
    /// Bytes in place from the start, for a reader that streams in order.
    pub contiguous: u64,
    pub end: Option<End>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Verified and in place.
    Whole,
    /// Given up: a reader looks for the blob elsewhere.
    Failed,
}

/// A blob that is arriving: its file (still under `tmp/`, or renamed into place once
/// whole) and its progress.
#[derive(Debug)]
pub struct Receiving {
    file: Arc<std::fs::File>,
    progress: watch::Sender<Progress>,
    /// Written in order: an origin pull.
    in_order: bool,
    /// Set when an origin pull of this node wants the blob a fetch from members has.
    preempted: watch::Sender<bool>,
}

impl Receiving {
    /// Resolves once an origin pull of this node asked for the blob: a fetch from
    /// members gives way to it.
    pub async fn preempted(&self) {
        let mut preempted = self.preempted.subscribe();
        let _ = preempted.wait_for(|p| *p).await;
    }

    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// The blob's length, once known.
    pub fn known_len(&self) -> Option<u64> {
        self.progress.borrow().geometry.map(|g| g.len)
    }

    /// `len` bytes at `offset`, which the caller has seen in place.
    pub async fn read_at(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        read_at(self.file.clone(), offset, len).await
    }
}

async fn read_at(file: Arc<std::fs::File>, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    })
    .await
    .map_err(io::Error::other)?
}

async fn write_at(file: Arc<std::fs::File>, offset: u64, bytes: Vec<u8>) -> io::Result<()> {
    tokio::task::spawn_blocking(move || file.write_all_at(&bytes, offset))
        .await
        .map_err(io::Error::other)?
}

impl BlobDir {
    pub fn open(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root.join("sha256"))?;
        // Whatever a killed run left half-written is of no use.
        let _ = std::fs::remove_dir_all(root.join("tmp"));
        std::fs::create_dir_all(root.join("tmp"))?;
        Ok(BlobDir {
            root: root.to_owned(),
            live: Arc::default(),
            changes: Arc::new(watch::channel(0).0),
            hashes: Arc::new(Mutex::new(LruCache::new(HASHED_BLOBS))),
        })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.encode().hex())
    }

    pub fn has(&self, digest: &Digest) -> bool {
        self.lookup(digest) == StoreLookup::Cached
    }

    /// The blob being received, if it is.
    pub fn receiving(&self, digest: &Digest) -> Option<Arc<Receiving>> {
        self.live.lock().get(digest).cloned()
    }

    /// Changes whenever a blob begins or ends being received.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Waits until `digest` is not being received, then says whether it is stored.
    pub async fn settled(&self, digest: &Digest) -> bool {
        let mut changes = self.changes();
        while self.receiving(digest).is_some() {
            if changes.changed().await.is_err() {
                break;
            }
        }
        self.has(digest)
    }

    /// A writer that takes the blob's bytes in order (an origin pull), its length
    /// known (`len`) or at most `max_len`.
    pub async fn writer(
        &self,
        digest: &Digest,
        len: Option<u64>,
        max_len: u64,
    ) -> Result<BlobWriter, StoreError> {
        let max_len = len.unwrap_or(max_len);
        // The node was asked to pull it: a fetch from members under way gives way (the
        // member it fetches from may be the puller that died).
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut changes = self.changes();
        loop {
            match self
                .begin(digest, len, max_len, Some(Sequential::default()))
                .await
            {
                Err(StoreError::Busy) => {}
                other => return other,
            }
            match self.receiving(digest) {
                Some(other) if other.in_order => return Err(StoreError::Busy),
                Some(other) => {
                    other.preempted.send_replace(true);
                }
                None => continue,
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(StoreError::Busy);
            }
        }
    }

    /// A writer that takes the pieces of a blob of `len` bytes in any order (a fetch
    /// from members).
    pub async fn piece_writer(&self, digest: &Digest, len: u64) -> Result<BlobWriter, StoreError> {
        self.begin(digest, Some(len), len, None).await
    }

    async fn begin(
        &self,
        digest: &Digest,
        len: Option<u64>,
        max_len: u64,
        sequential: Option<Sequential>,
    ) -> Result<BlobWriter, StoreError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}.{}",
            digest.encode().hex(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let geometry = len.map(Geometry::of);
        let count = geometry.map_or(0, |g| g.count());
        let receiving = Arc::new(Receiving {
            file: Arc::new(file),
            progress: watch::channel(Progress {
                geometry,
                have: PieceSet::new(count),
                hashes: vec![[0; 32]; count as usize],
                contiguous: 0,
                end: None,
            })
            .0,
            in_order: sequential.is_some(),
            preempted: watch::channel(false).0,
        });
        {
            let mut live = self.live.lock();
            if live.contains_key(digest) {
                drop(live);
                let _ = std::fs::remove_file(&tmp);
                return Err(StoreError::Busy);
            }
            live.insert(*digest, receiving.clone());
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(BlobWriter {
            dir: self.clone(),
            receiving,
            tmp,
            digest: *digest,
            written: 0,
            max_len,
            sequential,
            finished: false,
        })
    }

    /// A whole blob's piece hashes: kept from when it was received, or computed now.
    pub async fn piece_hashes(&self, digest: &Digest) -> io::Result<Arc<[PieceHash]>> {
        if let Some(hashes) = self.hashes.lock().get(digest) {
            return Ok(hashes.clone());
        }
        let path = self.path(digest);
        let hashes: Arc<[PieceHash]> = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(path)?;
            let geometry = Geometry::of(file.metadata()?.len());
            let mut hashes = Vec::with_capacity(geometry.count() as usize);
            let mut buf = vec![0u8; geometry.piece.min(geometry.len) as usize];
            for index in 0..geometry.count() {
                let (start, len) = geometry.span(index);
                let piece = &mut buf[..len as usize];
                file.read_exact_at(piece, start)?;
                hashes.push(Sha256::digest(piece).into());
            }
            io::Result::Ok(hashes.into())
        })
        .await
        .map_err(io::Error::other)??;
        self.hashes.lock().insert(*digest, hashes.clone());
        Ok(hashes)
    }

    /// `len` bytes at `offset` of a whole blob.
    pub async fn read_at(&self, digest: &Digest, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let file = std::fs::File::open(self.path(digest))?;
        read_at(Arc::new(file), offset, len).await
    }

    fn end(&self, digest: &Digest, receiving: &Arc<Receiving>) {
        let mut live = self.live.lock();
        if live
            .get(digest)
            .is_some_and(|current| Arc::ptr_eq(current, receiving))
        {
            live.remove(digest);
        }
        drop(live);
        self.changes.send_modify(|n| *n += 1);
    }
}

impl ContentStore for BlobDir {
    fn lookup(&self, digest: &Digest) -> StoreLookup {
        match std::fs::metadata(self.path(digest)) {
            Ok(meta) if meta.is_file() => StoreLookup::Cached,
            Ok(_) => StoreLookup::NotCached,
            Err(e) if e.kind() == io::ErrorKind::NotFound => StoreLookup::NotCached,
            Err(_) => StoreLookup::Unavailable,
        }
    }
}

/// The running hashes of a blob written in order.
#[derive(Default)]
struct Sequential {
    whole: Sha256,
    piece: Sha256,
}

/// Writes one blob, in order ([`BlobWriter::write`]) or piece by piece
/// ([`BlobWriter::put_piece`]); `finish` renames it into place if its digest matches.
/// Dropped unfinished, it removes its temporary file and tells its readers.
pub struct BlobWriter {
    dir: BlobDir,
    receiving: Arc<Receiving>,
    tmp: PathBuf,
    digest: Digest,
    written: u64,
    max_len: u64,
    sequential: Option<Sequential>,
    finished: bool,
}

impl BlobWriter {
    /// The next bytes of a blob written in order.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let offset = self.written;
        if offset + bytes.len() as u64 > self.max_len {
            return Err(StoreError::TooLong);
        }
        let Some(sequential) = self.sequential.as_mut() else {
            return Err(io::Error::from(io::ErrorKind::Unsupported).into());
        };
        sequential.whole.update(bytes);
        write_at(self.receiving.file.clone(), offset, bytes.to_vec()).await?;
        self.written += bytes.len() as u64;
        let written = self.written;
        // Hash the pieces this write completes, so members can take them now.
        let geometry = self.receiving.progress.borrow().geometry;
        let mut done = Vec::new();
        if let Some(geometry) = geometry {
            let mut at = offset;
            let mut rest = bytes;
            while !rest.is_empty() {
                let index = geometry.piece_at(at);
                let (start, len) = geometry.span(index);
                let take = ((start + len - at) as usize).min(rest.len());
                sequential.piece.update(&rest[..take]);
                at += take as u64;
                rest = &rest[take..];
                if at == start + len {
                    let hash: PieceHash = std::mem::take(&mut sequential.piece).finalize().into();
                    done.push((index, hash));
                }
            }
        }
        self.receiving.progress.send_modify(|p| {
            p.contiguous = written;
            for (index, hash) in done {
                p.have.insert(index);
                p.hashes[index as usize] = hash;
            }
        });
        Ok(())
    }

    /// Piece `index`, checked by the caller against its hash.
    pub async fn put_piece(
        &mut self,
        index: u32,
        bytes: Vec<u8>,
        hash: PieceHash,
    ) -> Result<(), StoreError> {
        let geometry = self
            .receiving
            .progress
            .borrow()
            .geometry
            .ok_or(StoreError::NoSuchPiece(index))?;
        let (start, len) = geometry.span(index);
        if index >= geometry.count() || bytes.len() as u64 != len {
            return Err(StoreError::NoSuchPiece(index));
        }
        write_at(self.receiving.file.clone(), start, bytes).await?;
        self.written += len;
        self.receiving.progress.send_modify(|p| {
            p.have.insert(index);
            p.hashes[index as usize] = hash;
            let first = p.have.first_missing();
            p.contiguous = (u64::from(first) * geometry.piece).min(geometry.len);
        });
        Ok(())
    }

    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.receiving.progress()
    }

    /// See [`Receiving::preempted`].
    pub async fn preempted(&self) {
        self.receiving.preempted().await
    }

    /// Checks the digest and moves the blob into place; returns its length.
    pub async fn finish(mut self) -> Result<u64, StoreError> {
        let progress = self.receiving.progress.borrow().clone();
        let actual = match self.sequential.take() {
            Some(sequential) => {
                if progress.geometry.is_some_and(|g| g.len != self.written) {
                    return Err(StoreError::TooShort);
                }
                Digest::from_sha256(sequential.whole.finalize().into())
            }
            None => {
                if !progress.have.is_full() {
                    return Err(StoreError::TooShort);
                }
                self.hash_back(self.written).await?
            }
        };
        if actual != self.digest {
            return Err(StoreError::Mismatch {
                actual: actual.to_string(),
            });
        }
        self.receiving.file.sync_all()?;
        tokio::fs::rename(&self.tmp, self.dir.path(&self.digest)).await?;
        self.finished = true;
        // The piece hashes of a blob that was written in order without a known length
        // are computed when first asked for.
        if progress.have.is_full() && progress.geometry.is_some() {
            self.dir
                .hashes
                .lock()
                .insert(self.digest, progress.hashes.clone().into());
        }
        self.receiving.progress.send_modify(|p| {
            if p.geometry.is_none() {
                let geometry = Geometry::of(self.written);
                p.geometry = Some(geometry);
                p.have = PieceSet::full(geometry.count());
                p.hashes = vec![[0; 32]; geometry.count() as usize];
            }
            p.contiguous = self.written;
            p.end = Some(End::Whole);
        });
        self.dir.end(&self.digest, &self.receiving);
        Ok(self.written)
    }

    async fn hash_back(&self, len: u64) -> io::Result<Digest> {
        let file = self.receiving.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < len {
                let n = (len - at).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], at)?;
                hasher.update(&buf[..n]);
                at += n as u64;
            }
            Ok(Digest::from_sha256(hasher.finalize().into()))
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
            self.receiving
                .progress
                .send_modify(|p| p.end = Some(End::Failed));
            self.dir.end(&self.digest, &self.receiving);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pieces::MIN_PIECE as P;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("agent-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn digest_of(bytes: &[u8]) -> Digest {
        Digest::parse(&format!("sha256:{:x}", Sha256::digest(bytes))).unwrap()
    }

    #[tokio::test]
    async fn a_blob_is_in_place_only_once_its_digest_matched() {
        let root = dir("match");
        let store = BlobDir::open(&root).unwrap();
        let digest = digest_of(b"hello layer");
        let mut writer = store.writer(&digest, None, 64).await.unwrap();
        writer.write(b"hello ").await.unwrap();
        assert!(!store.has(&digest), "not before it is finished");
        assert_eq!(store.lookup(&digest), StoreLookup::NotCached);
        writer.write(b"layer").await.unwrap();
        assert_eq!(writer.finish().await.unwrap(), 11);
        assert!(store.has(&digest));
        assert_eq!(store.lookup(&digest), StoreLookup::Cached);
        assert_eq!(std::fs::read(store.path(&digest)).unwrap(), b"hello layer");
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[tokio::test]
    async fn wrong_bytes_and_abandoned_writes_leave_nothing() {
        let root = dir("mismatch");
        let store = BlobDir::open(&root).unwrap();
        let digest = digest_of(b"the real bytes");
        let mut writer = store.writer(&digest, None, 64).await.unwrap();
        writer.write(b"other bytes").await.unwrap();
        assert!(matches!(
            writer.finish().await,
            Err(StoreError::Mismatch { .. })
        ));
        assert!(!store.has(&digest));

        let mut writer = store.writer(&digest, None, 4).await.unwrap();
        assert!(matches!(
            writer.write(b"too long").await,
            Err(StoreError::TooLong)
        ));
        drop(writer);
        // A writer dropped mid-way (a killed transfer) leaves no temporary file behind.
        let mut writer = store.writer(&digest, None, 64).await.unwrap();
        writer.write(b"the real").await.unwrap();
        drop(writer);
        assert!(!store.has(&digest));
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[tokio::test]
    async fn pieces_written_in_order_are_published_as_they_complete() {
        let root = dir("progress");
        let store = BlobDir::open(&root).unwrap();
        let bytes: Vec<u8> = (0..2 * P + 100).map(|i| (i % 251) as u8).collect();
        let digest = digest_of(&bytes);
        let mut writer = store
            .writer(&digest, Some(bytes.len() as u64), u64::MAX)
            .await
            .unwrap();
        let progress = writer.progress();
        assert!(matches!(
            store.writer(&digest, None, 10).await,
            Err(StoreError::Busy)
        ));
        writer.write(&bytes[..P as usize + 1]).await.unwrap();
        {
            let p = progress.borrow();
            assert_eq!(p.contiguous, P + 1);
            assert_eq!(p.have.iter().collect::<Vec<_>>(), vec![0]);
            assert_eq!(
                p.hashes[0],
                <[u8; 32]>::from(Sha256::digest(&bytes[..P as usize]))
            );
        }
        let receiving = store.receiving(&digest).unwrap();
        assert_eq!(receiving.read_at(10, 5).await.unwrap(), &bytes[10..15]);
        writer.write(&bytes[P as usize + 1..]).await.unwrap();
        assert_eq!(progress.borrow().have.present(), 3);
        writer.finish().await.unwrap();
        assert_eq!(progress.borrow().end, Some(End::Whole));
        assert!(store.receiving(&digest).is_none());
        assert!(store.settled(&digest).await);
        let hashes = store.piece_hashes(&digest).await.unwrap();
        assert_eq!(hashes.len(), 3);
        assert_eq!(
            hashes[2],
            <[u8; 32]>::from(Sha256::digest(&bytes[2 * P as usize..]))
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[tokio::test]
    async fn pieces_in_any_order_commit_only_whole_and_matching() {
        let root = dir("pieces");
        let store = BlobDir::open(&root).unwrap();
        let bytes: Vec<u8> = (0..3 * P - 7).map(|i| (i % 241) as u8).collect();
        let digest = digest_of(&bytes);
        let geometry = Geometry::of(bytes.len() as u64);
        let piece = |i: u32| {
            let (start, len) = geometry.span(i);
            bytes[start as usize..(start + len) as usize].to_vec()
        };
        let mut writer = store
            .piece_writer(&digest, bytes.len() as u64)
            .await
            .unwrap();
        let progress = writer.progress();
        writer.put_piece(2, piece(2), [2; 32]).await.unwrap();
        assert_eq!(progress.borrow().contiguous, 0, "nothing in order yet");
        writer.put_piece(0, piece(0), [0; 32]).await.unwrap();
        assert_eq!(progress.borrow().contiguous, P);
        assert!(matches!(
            writer.put_piece(1, vec![0; 3], [1; 32]).await,
            Err(StoreError::NoSuchPiece(1))
        ));
        assert!(matches!(
            writer.put_piece(3, piece(0), [1; 32]).await,
            Err(StoreError::NoSuchPiece(3))
        ));
        writer.put_piece(1, piece(1), [1; 32]).await.unwrap();
        assert_eq!(progress.borrow().contiguous, bytes.len() as u64);
        writer.finish().await.unwrap();
        assert_eq!(std::fs::read(store.path(&digest)).unwrap(), bytes);

        // Pieces that add up to other bytes are not committed, and readers hear of it.
        let other = digest_of(b"other");
        let mut writer = store.piece_writer(&other, 5).await.unwrap();
        let progress = writer.progress();
        writer
            .put_piece(0, b"OTHER".to_vec(), [0; 32])
            .await
            .unwrap();
        assert!(matches!(
            writer.finish().await,
            Err(StoreError::Mismatch { .. })
        ));
        assert_eq!(progress.borrow().end, Some(End::Failed));
        assert!(!store.has(&other));
        assert!(store.receiving(&other).is_none());
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[tokio::test]
    async fn an_origin_pull_preempts_a_fetch_from_members_not_another_pull() {
        let root = dir("preempt");
        let store = BlobDir::open(&root).unwrap();
        let digest = digest_of(b"contended");
        let fetch = store.piece_writer(&digest, 9).await.unwrap();
        let gave_way = tokio::spawn(async move {
            fetch.preempted().await;
            drop(fetch);
        });
        let pull = store.writer(&digest, Some(9), 9).await.unwrap();
        gave_way.await.unwrap();
        // A second pull does not preempt the first.
        assert!(matches!(
            store.writer(&digest, Some(9), 9).await,
            Err(StoreError::Busy)
        ));
        drop(pull);
        let _ = std::fs::remove_dir_all(&root);
    }
}

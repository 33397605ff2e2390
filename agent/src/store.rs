//! A content-addressed directory: `DIR/sha256/<hex>`, each blob written to `DIR/tmp`
//! first and renamed into place only once its digest matched, so that a node killed
//! mid-write never leaves a bad blob behind.

use std::{
    io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use gantry_coord::{ContentStore, Digest, StoreLookup};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

#[derive(Debug, Clone)]
pub struct BlobDir {
    root: PathBuf,
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
}

impl BlobDir {
    pub fn open(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root.join("sha256"))?;
        // Whatever a killed run left half-written is of no use.
        let _ = std::fs::remove_dir_all(root.join("tmp"));
        std::fs::create_dir_all(root.join("tmp"))?;
        Ok(BlobDir {
            root: root.to_owned(),
        })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.encode().hex())
    }

    pub fn has(&self, digest: &Digest) -> bool {
        self.lookup(digest) == StoreLookup::Cached
    }

    /// A writer for `digest`, at most `max_len` bytes long.
    pub async fn writer(&self, digest: &Digest, max_len: u64) -> io::Result<BlobWriter> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}.{}",
            self.path(digest)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("blob"),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = tokio::fs::File::create(&tmp).await?;
        Ok(BlobWriter {
            file: Some(file),
            hasher: Sha256::new(),
            tmp,
            target: self.path(digest),
            expected: *digest,
            written: 0,
            max_len,
        })
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

/// Hashes what it writes; `finish` renames the file into place if the digest matches.
/// Dropped unfinished, it removes its temporary file.
pub struct BlobWriter {
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    tmp: PathBuf,
    target: PathBuf,
    expected: Digest,
    written: u64,
    max_len: u64,
}

impl BlobWriter {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.written += bytes.len() as u64;
        if self.written > self.max_len {
            return Err(StoreError::TooLong);
        }
        self.hasher.update(bytes);
        let file = self
            .file
            .as_mut()
            .ok_or(io::Error::from(io::ErrorKind::BrokenPipe))?;
        file.write_all(bytes).await?;
        Ok(())
    }

    /// Checks the digest and moves the blob into place; returns its length.
    pub async fn finish(mut self) -> Result<u64, StoreError> {
        let actual = format!("sha256:{:x}", self.hasher.clone().finalize());
        if actual != self.expected.encode().as_str() {
            return Err(StoreError::Mismatch { actual });
        }
        let mut file = self
            .file
            .take()
            .ok_or(io::Error::from(io::ErrorKind::BrokenPipe))?;
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&self.tmp, &self.target).await?;
        Ok(self.written)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut writer = store.writer(&digest, 64).await.unwrap();
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
        let mut writer = store.writer(&digest, 64).await.unwrap();
        writer.write(b"other bytes").await.unwrap();
        assert!(matches!(
            writer.finish().await,
            Err(StoreError::Mismatch { .. })
        ));
        assert!(!store.has(&digest));

        let mut writer = store.writer(&digest, 4).await.unwrap();
        assert!(matches!(
            writer.write(b"too long").await,
            Err(StoreError::TooLong)
        ));
        drop(writer);
        // A writer dropped mid-way (a killed transfer) leaves no temporary file behind.
        let mut writer = store.writer(&digest, 64).await.unwrap();
        writer.write(b"the real").await.unwrap();
        drop(writer);
        assert!(!store.has(&digest));
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&root);
    }
}

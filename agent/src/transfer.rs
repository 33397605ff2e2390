//! The blob-transfer protocol between peers, `/gantry/blob/1.0.0`: the requester writes
//! the digest (one length byte, then the string), the server answers one status byte
//! and, if it serves, the length (8 bytes, big endian) and the bytes. Streams end to
//! end: neither side holds a whole blob in memory. Only members are served.

use std::{io, sync::Arc, time::Duration};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use gantry_coord::{Digest, Membership};
use libp2p::{PeerId, StreamProtocol};
use tokio::io::AsyncReadExt as _;

use crate::store::{BlobDir, StoreError};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/gantry/blob/1.0.0");

const SERVED: u8 = 0;
const NOT_HELD: u8 = 1;
const REFUSED: u8 = 2;

/// How long a peer may take to start answering.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a transfer may sit without a byte moving.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const CHUNK: usize = 64 << 10;

/// Why a peer did not deliver a blob.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the peer does not hold it")]
    NotHeld,
    #[error("the peer refused us")]
    Refused,
    #[error("stream: {0}")]
    Stream(#[from] io::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("no stream to the peer: {0}")]
    Open(String),
    #[error("the peer stopped sending")]
    Timeout,
}

/// Serves blobs to members until the control's streams end.
pub async fn serve(
    mut control: libp2p_stream::Control,
    store: BlobDir,
    membership: Arc<dyn Membership>,
) {
    let Ok(mut incoming) = control.accept(PROTOCOL) else {
        return;
    };
    while let Some((peer, stream)) = incoming.next().await {
        let (store, membership) = (store.clone(), membership.clone());
        tokio::spawn(async move {
            if let Err(error) = serve_one(peer, stream, &store, &*membership).await {
                tracing::debug!(%peer, %error, "blob not served");
            }
        });
    }
}

async fn serve_one(
    peer: PeerId,
    mut stream: libp2p::Stream,
    store: &BlobDir,
    membership: &dyn Membership,
) -> io::Result<()> {
    let digest = tokio::time::timeout(ANSWER_TIMEOUT, read_digest(&mut stream))
        .await
        .map_err(|_| io::ErrorKind::TimedOut)??;
    // Membership is the boundary: a private image's layers never leave through a peer.
    if membership.check_peer(&peer).is_err() {
        tracing::info!(%peer, "blob request from a peer outside the membership refused");
        stream.write_all(&[REFUSED]).await?;
        return stream.close().await;
    }
    let mut file = match tokio::fs::File::open(store.path(&digest)).await {
        Ok(file) => file,
        Err(_) => {
            stream.write_all(&[NOT_HELD]).await?;
            return stream.close().await;
        }
    };
    let len = file.metadata().await?.len();
    let mut head = [0u8; 9];
    head[0] = SERVED;
    head[1..].copy_from_slice(&len.to_be_bytes());
    stream.write_all(&head).await?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        tokio::time::timeout(IDLE_TIMEOUT, stream.write_all(&buf[..n]))
            .await
            .map_err(|_| io::ErrorKind::TimedOut)??;
    }
    stream.close().await
}

async fn read_digest(stream: &mut libp2p::Stream) -> io::Result<Digest> {
    let mut len = [0u8];
    stream.read_exact(&mut len).await?;
    let mut raw = vec![0u8; usize::from(len[0])];
    stream.read_exact(&mut raw).await?;
    let text = String::from_utf8(raw).map_err(|_| io::ErrorKind::InvalidData)?;
    Digest::parse(&text).map_err(|_| io::ErrorKind::InvalidData.into())
}

/// Fetches `digest` from `peer` into the store; at most `max_len` bytes are accepted.
pub async fn fetch(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    digest: &Digest,
    store: &BlobDir,
    max_len: u64,
) -> Result<u64, FetchError> {
    let mut stream = tokio::time::timeout(ANSWER_TIMEOUT, control.open_stream(peer, PROTOCOL))
        .await
        .map_err(|_| FetchError::Timeout)?
        .map_err(|e| FetchError::Open(e.to_string()))?;
    let text = digest.encode();
    let name = text.as_bytes();
    let mut request = Vec::with_capacity(name.len() + 1);
    request.push(name.len() as u8);
    request.extend_from_slice(name);
    stream.write_all(&request).await?;
    let mut status = [0u8];
    tokio::time::timeout(ANSWER_TIMEOUT, stream.read_exact(&mut status))
        .await
        .map_err(|_| FetchError::Timeout)??;
    match status[0] {
        SERVED => {}
        REFUSED => return Err(FetchError::Refused),
        _ => return Err(FetchError::NotHeld),
    }
    let mut len = [0u8; 8];
    stream.read_exact(&mut len).await?;
    let len = u64::from_be_bytes(len);
    if len > max_len {
        return Err(StoreError::TooLong.into());
    }
    let mut writer = store.writer(digest, len).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut buf[..want]))
            .await
            .map_err(|_| FetchError::Timeout)??;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        writer.write(&buf[..n]).await?;
        left -= n as u64;
    }
    Ok(writer.finish().await?)
}

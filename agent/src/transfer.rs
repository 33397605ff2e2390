//! The transfer between members, `/gantry/pieces/1.0.0`: a blob moves in pieces
//! ([`crate::pieces`]), fetched from several members at once, each serving the pieces
//! it has, also while it still receives the rest.
//!
//! One request per stream, 39 bytes: an operation (1), the digest (32), an argument (4,
//! big endian) and how long the server may wait (2, ms, at most 5 s): for the blob to
//! appear, or for the piece asked while the blob arrives. The answer starts with a status
//! byte: served; not held; refused; pulling (not held yet, but the server's own origin
//! pull of it is under way); busy (the server sends as many pieces as it will at once:
//! ask another holder); or sent to (that piece went out enough in the last two seconds,
//! once from its puller, twice from any other member: a count, 1, then a length byte and
//! a peer id each, the members it went to, which serve it as soon as they have it).
//!
//! - `STATUS`, the argument the first piece whose hash the asker wants: a watch. Frames
//!   follow on the stream, one at once and one whenever pieces arrived since (at most
//!   one per 20 ms), until the blob is whole (that frame is the last), it is gone, or
//!   30 s passed. A frame: the length (8), whether the blob is whole (1), the bitmap of
//!   present pieces, the hashes of the present pieces from that index on not sent before
//!   on this stream (a count, 4, then an index, 4, and a hash, 32, each), and up to 8
//!   members that asked for the blob lately and were not named before on it (a count,
//!   1, then a length byte and a peer id each), so that the nodes receiving one blob
//!   find each other without a tracker. A piece is announced to its watchers as it
//!   arrives, not at their next poll: a hop of the fan-out costs a round trip, not a
//!   polling period. A server holds at most 256 watches open; past that it sends one
//!   frame and ends, and the asker asks again.
//! - `PIECE`, the argument the piece's index: its bytes. A piece not there yet is
//!   waited for while the blob is still arriving, as long as the asker said.
//!
//! A new piece spreads as a tree: its puller sends it once, and whoever asks it after
//! hears where it went and asks there; a receiver asks a puller only for what no other
//! member it knows has. The fetcher checks each piece against its hash on arrival; a
//! member that sends a bad one is asked nothing more, one that stalls loses only the
//! piece it owed. The whole digest is checked before the blob is committed. Only
//! members are served, only members are asked.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    io,
    sync::Arc,
    time::Duration,
};

use futures::{
    future::BoxFuture, stream::FuturesUnordered, AsyncReadExt, AsyncWriteExt, FutureExt, StreamExt,
};
use gantry_coord::{Digest, Membership};
use hashlink::LruCache;
use libp2p::{PeerId, StreamProtocol};
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use crate::{
    pieces::{Geometry, Picker, PieceHash, PieceSet, MAX_PIECES},
    store::{BlobDir, BlobWriter, End, Progress, StoreError},
};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/gantry/pieces/1.0.0");

const STATUS: u8 = 0;
const PIECE: u8 = 1;

const SERVED: u8 = 0;
const NOT_HELD: u8 = 1;
const REFUSED: u8 = 2;
/// Not held yet, but this node's origin pull of it is under way.
const PULLING: u8 = 3;
/// Too many pieces go out at once: ask another holder.
const BUSY: u8 = 4;
/// This piece went out enough lately; it went to the members named, which serve it
/// as soon as they have it.
const SENT_TO: u8 = 5;

const REQUEST_LEN: usize = 39;
/// The longest a server waits for a blob to appear.
const MAX_APPEAR_WAIT: Duration = Duration::from_secs(5);
/// How long a piece asked of a member it was sent to may be waited for there: it is
/// on its way, or it is not coming.
const PROMISE_WAIT: Duration = Duration::from_secs(1);
/// How long a watch stays open; the asker opens another if it still wants the blob.
const WATCH_FOR: Duration = Duration::from_secs(30);
/// Frames of a watch at most this often: pieces that arrive together are told together.
const FRAME_GAP: Duration = Duration::from_millis(20);
/// Watches a server holds open at once.
const WATCHES: usize = 256;
/// How long a peer may take to start answering.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a transfer may sit without a byte moving.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Members named in a status answer.
const GOSSIP: usize = 8;
/// Blobs whose recent askers a server remembers.
const ASKED_BLOBS: usize = 4096;
/// Blobs whose pieces' recipients a server remembers: those it serves now.
const SENT_BLOBS: usize = 64;
/// Pieces a server sends at once (each held in memory until it is written): few, so
/// that each is whole at its receiver, and servable there, soon; three keep an uplink
/// busy between requests.
const SERVING: usize = 3;
/// Each piece goes out at most this many times per window from one server, so that a
/// new piece spreads as a tree (its first receivers serve the rest) instead of every
/// receiver's taking it from the one uplink that has it.
const FAN_OUT: u8 = 2;
/// A piece this node receives from the origin now goes out once per window.
const FAN_OUT_PULLING: u8 = 1;
const FAN_WINDOW: Duration = Duration::from_secs(2);

/// Peers one fetch asks, at most.
const MAX_PEERS: usize = 16;
/// Pieces asked of one peer at once.
const PER_PEER: usize = 3;
/// Pieces asked for at once, over all peers.
const IN_FLIGHT: usize = 16;
/// How far past the first missing piece the picker looks first (then further).
const WINDOW: u32 = 16;
/// How often a peer that is still receiving is asked for its status.
const REFRESH: Duration = Duration::from_millis(250);
/// Failures after which a peer is asked nothing more in this fetch.
const MAX_FAILURES: u32 = 3;
/// How long a piece a peer turned away is not asked of it again, and how many such
/// pieces are remembered per peer.
const TURNED_AWAY_FOR: Duration = Duration::from_millis(500);
const TURNED_AWAY: usize = 64;

/// Why a fetch did not deliver a blob.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no member asked holds it")]
    NotHeld,
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("no byte moved for {0:?}")]
    Stalled(Duration),
    #[error("this node's own origin pull of it began")]
    Preempted,
}

/// Why one request to one peer failed.
#[derive(Debug, thiserror::Error)]
enum AskError {
    #[error("not held")]
    NotHeld,
    #[error("not held yet: its pull is under way")]
    Pulling,
    #[error("too many pieces go out at once")]
    Busy,
    #[error("that piece went out enough lately, to {0:?}")]
    SentTo(Vec<PeerId>),
    #[error("refused")]
    Refused,
    #[error("stream: {0}")]
    Stream(#[from] io::Error),
    #[error("no stream: {0}")]
    Open(String),
    #[error("timed out")]
    Timeout,
    #[error("malformed answer")]
    Malformed,
    #[error("the watch ended")]
    Ended,
    /// Dropped before its answer began: a server takes in streams one at a time and
    /// drops those that come while it is busy with one, which says nothing of the peer.
    #[error("dropped unanswered: {0}")]
    Dropped(io::Error),
}

/// What a member says of a blob: one frame of its watch.
#[derive(Debug, Clone)]
struct Status {
    geometry: Geometry,
    whole: bool,
    have: PieceSet,
    /// Hashes of present pieces not told before, by index.
    hashes: Vec<(u32, PieceHash)>,
    others: Vec<PeerId>,
}

/// A watch the asker holds open; frames follow as the member's pieces arrive.
struct Watch {
    stream: libp2p::Stream,
    max_len: u64,
}

/// The members that asked lately for each blob: receivers, who will soon serve it too.
#[derive(Clone)]
struct Askers(Arc<Mutex<LruCache<Digest, VecDeque<PeerId>>>>);

impl Askers {
    /// Records `peer` as asking for `digest`.
    fn note(&self, digest: &Digest, peer: PeerId) {
        let mut askers = self.0.lock();
        let known = match askers.get_mut(digest) {
            Some(known) => known,
            None => {
                askers.insert(*digest, VecDeque::new());
                askers.get_mut(digest).expect("just inserted")
            }
        };
        if !known.contains(&peer) {
            if known.len() == GOSSIP {
                known.pop_front();
            }
            known.push_back(peer);
        }
    }

    /// The members that asked lately for `digest`, but `peer`.
    fn others(&self, digest: &Digest, peer: &PeerId) -> Vec<PeerId> {
        let mut askers = self.0.lock();
        askers.get(digest).map_or_else(Vec::new, |known| {
            known.iter().filter(|p| *p != peer).copied().collect()
        })
    }
}

/// Whether this node's own origin pull of a digest is under way.
pub type Pulling = Arc<dyn Fn(&Digest) -> bool + Send + Sync>;

/// Where each piece went lately, per blob.
#[derive(Clone)]
struct Sent(Arc<Mutex<LruCache<Digest, HashMap<u32, Window>>>>);

/// When a piece's window began, and whom it went to in it (at most [`FAN_OUT`]).
type Window = (Instant, Vec<PeerId>);

impl Sent {
    fn new() -> Self {
        Sent(Arc::new(Mutex::new(LruCache::new(SENT_BLOBS))))
    }

    /// Whether piece `index` may go out to `peer` now (then it counts), or the members
    /// it went to in this window.
    fn take(&self, digest: &Digest, index: u32, most: u8, peer: PeerId) -> Result<(), Vec<PeerId>> {
        let mut sent = self.0.lock();
        if sent.get(digest).is_none() {
            sent.insert(*digest, HashMap::new());
        }
        let Some(pieces) = sent.get_mut(digest) else {
            return Ok(());
        };
        let now = Instant::now();
        let entry = pieces.entry(index).or_insert((now, Vec::new()));
        if now.duration_since(entry.0) >= FAN_WINDOW {
            *entry = (now, Vec::new());
        }
        if entry.1.len() >= usize::from(most) {
            return Err(entry.1.clone());
        }
        entry.1.push(peer);
        Ok(())
    }

    /// Piece `index` did not reach `peer` after all: it is not named as a holder.
    fn forget(&self, digest: &Digest, index: u32, peer: &PeerId) {
        if let Some(entry) = self
            .0
            .lock()
            .get_mut(digest)
            .and_then(|p| p.get_mut(&index))
        {
            entry.1.retain(|p| p != peer);
        }
    }
}

/// Serves pieces to members until the control's streams end.
pub async fn serve(
    mut control: libp2p_stream::Control,
    store: BlobDir,
    membership: Arc<dyn Membership>,
    pulling: Pulling,
) {
    let Ok(mut incoming) = control.accept(PROTOCOL) else {
        return;
    };
    let askers = Askers(Arc::new(Mutex::new(LruCache::new(ASKED_BLOBS))));
    let serving = Arc::new(tokio::sync::Semaphore::new(SERVING));
    let watches = Arc::new(tokio::sync::Semaphore::new(WATCHES));
    let sent = Sent::new();
    while let Some((peer, stream)) = incoming.next().await {
        let (store, membership, askers) = (store.clone(), membership.clone(), askers.clone());
        let (pulling, serving, sent) = (pulling.clone(), serving.clone(), sent.clone());
        let watches = watches.clone();
        tokio::spawn(async move {
            let limits = Limits {
                serving: &serving,
                watches: &watches,
                sent: &sent,
            };
            let served = serve_one(
                peer,
                stream,
                &store,
                &*membership,
                &askers,
                &*pulling,
                limits,
            );
            if let Err(error) = served.await {
                tracing::debug!(%peer, %error, "piece request not served");
            }
        });
    }
}

async fn serve_one(
    peer: PeerId,
    mut stream: libp2p::Stream,
    store: &BlobDir,
    membership: &dyn Membership,
    askers: &Askers,
    pulling: &(dyn Fn(&Digest) -> bool + Send + Sync),
    limits: Limits<'_>,
) -> io::Result<()> {
    let mut request = [0u8; REQUEST_LEN];
    tokio::time::timeout(ANSWER_TIMEOUT, stream.read_exact(&mut request))
        .await
        .map_err(|_| io::ErrorKind::TimedOut)??;
    // Membership is the boundary: a private image's layers never leave through a peer.
    if membership.check_peer(&peer).is_err() {
        tracing::info!(%peer, "piece request from a peer outside the membership refused");
        stream.write_all(&[REFUSED]).await?;
        return stream.close().await;
    }
    let op = request[0];
    let digest = Digest::from_sha256(request[1..33].try_into().expect("32 bytes"));
    let arg = u32::from_be_bytes(request[33..37].try_into().expect("4 bytes"));
    let wait = Duration::from_millis(u64::from(u16::from_be_bytes([request[37], request[38]])))
        .min(MAX_APPEAR_WAIT);
    if op == STATUS {
        askers.note(&digest, peer);
        let watch = Watcher {
            peer,
            digest,
            hashes_from: arg,
            store,
            askers,
        };
        return watch.run(stream, wait, pulling, limits.watches).await;
    }
    if op != PIECE {
        return Err(io::ErrorKind::InvalidData.into());
    }
    // The puller's uplink is the only one with the pieces it receives from the origin:
    // each goes out once, and its receivers pass it on. An asker beyond the fan-out
    // hears where the piece went, and asks there.
    let most = if pulling(&digest) {
        FAN_OUT_PULLING
    } else {
        FAN_OUT
    };
    let (answer, _permit) = match limits.sent.take(&digest, arg, most, peer) {
        Ok(()) => match piece_answer(store, &digest, arg, wait, limits.serving).await {
            Ok(answer) => answer,
            Err(error) => {
                limits.sent.forget(&digest, arg, &peer);
                return Err(error);
            }
        },
        Err(to) => (sent_to(&to), None),
    };
    let written = tokio::time::timeout(IDLE_TIMEOUT, stream.write_all(&answer)).await;
    // Whoever hears where a piece went is not sent to a member that lacks it.
    let delivered = answer[0] == SERVED && matches!(written, Ok(Ok(())));
    if !delivered && answer[0] != SENT_TO {
        limits.sent.forget(&digest, arg, &peer);
    }
    written.map_err(|_| io::ErrorKind::TimedOut)??;
    stream.close().await
}

/// What bounds a server's piece answers.
#[derive(Clone, Copy)]
struct Limits<'a> {
    serving: &'a tokio::sync::Semaphore,
    watches: &'a tokio::sync::Semaphore,
    sent: &'a Sent,
}

/// Where a blob a member asks about stands here.
enum Here {
    /// Whole, or arriving with a known length.
    Servable,
    /// Not yet: this node's origin pull of it is under way.
    Pulling,
    NotHeld,
}

/// Waits at most `wait` for `digest` to be whole or arriving with a known length, while
/// this node's origin pull of it runs.
async fn appeared(
    store: &BlobDir,
    digest: &Digest,
    wait: Duration,
    pulling: &(dyn Fn(&Digest) -> bool + Send + Sync),
) -> Here {
    let deadline = Instant::now() + wait;
    let mut changes = store.changes();
    loop {
        if store.has(digest) {
            return Here::Servable;
        }
        if let Some(receiving) = store.receiving(digest) {
            let known = {
                let progress = receiving.progress();
                let p = progress.borrow();
                p.geometry.is_some() && p.end != Some(End::Failed)
            };
            if known {
                return Here::Servable;
            }
        } else if !pulling(digest) {
            return Here::NotHeld;
        }
        // A pull that has not begun receiving, or a length not known yet; looked at
        // again on any change and at least every 100 ms (a pull may end unreceived).
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Here::Pulling,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// One member's watch of one blob here, and what it was told already.
struct Watcher<'a> {
    peer: PeerId,
    digest: Digest,
    hashes_from: u32,
    store: &'a BlobDir,
    askers: &'a Askers,
}

/// What a watcher was told already on its stream.
#[derive(Default)]
struct Told {
    hashes: HashSet<u32>,
    others: HashSet<PeerId>,
}

impl Watcher<'_> {
    /// Answers the status byte, then frames until the blob is whole or gone, the watch
    /// is old, or the asker went away.
    async fn run(
        &self,
        mut stream: libp2p::Stream,
        wait: Duration,
        pulling: &(dyn Fn(&Digest) -> bool + Send + Sync),
        watches: &tokio::sync::Semaphore,
    ) -> io::Result<()> {
        let code = match appeared(self.store, &self.digest, wait, pulling).await {
            Here::Servable => SERVED,
            Here::Pulling => PULLING,
            Here::NotHeld => NOT_HELD,
        };
        stream.write_all(&[code]).await?;
        if code != SERVED {
            return stream.close().await;
        }
        // Without room for one more watch: one frame, and the asker asks again.
        let held = watches.try_acquire().ok();
        let until = Instant::now() + WATCH_FOR;
        let mut told = Told::default();
        loop {
            let Some((frame, whole, progress)) = self.frame(&mut told).await? else {
                break;
            };
            tokio::time::timeout(IDLE_TIMEOUT, stream.write_all(&frame))
                .await
                .map_err(|_| io::ErrorKind::TimedOut)??;
            let Some(mut progress) = progress.filter(|_| !whole && held.is_some()) else {
                break;
            };
            // The next piece, the end of this receiving (whole, or failed: looked at
            // again either way), or the watch's age.
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                _ = progress.changed() => {}
            }
            tokio::time::sleep(FRAME_GAP).await;
        }
        stream.close().await
    }

    /// The frame for what is here now, whether it is whole, and the progress to wait
    /// on for the next; `None` when the blob is gone.
    #[allow(clippy::type_complexity)]
    async fn frame(
        &self,
        told: &mut Told,
    ) -> io::Result<
        Option<(
            Vec<u8>,
            bool,
            Option<tokio::sync::watch::Receiver<Progress>>,
        )>,
    > {
        let digest = &self.digest;
        let (geometry, whole, have, fresh, progress) = if self.store.has(digest) {
            let hashes = self.store.piece_hashes(digest).await?;
            let len = std::fs::metadata(self.store.path(digest))?.len();
            let geometry = Geometry::of(len);
            let have = PieceSet::full(geometry.count());
            let fresh: Vec<(u32, PieceHash)> = (self.hashes_from..geometry.count())
                .filter(|i| !told.hashes.contains(i))
                .filter_map(|i| Some((i, *hashes.get(i as usize)?)))
                .collect();
            (geometry, true, have, fresh, None)
        } else {
            let Some(receiving) = self.store.receiving(digest) else {
                return Ok(None);
            };
            let mut progress = receiving.progress();
            let (geometry, have, fresh) = {
                let p = progress.borrow_and_update();
                let Some(geometry) = p.geometry else {
                    return Ok(None);
                };
                let fresh: Vec<(u32, PieceHash)> = p
                    .have
                    .iter()
                    .filter(|&i| i >= self.hashes_from && !told.hashes.contains(&i))
                    .map(|i| (i, p.hashes[i as usize]))
                    .collect();
                (geometry, p.have.clone(), fresh)
            };
            (geometry, false, have, fresh, Some(progress))
        };
        // A set no larger than the blob's pieces, and the members that ask for it.
        told.hashes.extend(fresh.iter().map(|(i, _)| *i));
        let others: Vec<PeerId> = self
            .askers
            .others(digest, &self.peer)
            .into_iter()
            .filter(|p| told.others.insert(*p))
            .collect();
        let mut out = Vec::with_capacity(14 + have.as_bytes().len() + fresh.len() * 36 + 400);
        out.extend_from_slice(&geometry.len.to_be_bytes());
        out.push(u8::from(whole));
        out.extend_from_slice(have.as_bytes());
        out.extend_from_slice(&(fresh.len() as u32).to_be_bytes());
        for (index, hash) in &fresh {
            out.extend_from_slice(&index.to_be_bytes());
            out.extend_from_slice(hash);
        }
        out.push(others.len() as u8);
        for peer in others {
            let bytes = peer.to_bytes();
            out.push(bytes.len() as u8);
            out.extend_from_slice(&bytes);
        }
        Ok(Some((out, whole, progress)))
    }
}

/// The answer naming the members a piece went to.
fn sent_to(to: &[PeerId]) -> Vec<u8> {
    let mut out = vec![SENT_TO, to.len() as u8];
    for peer in to {
        let bytes = peer.to_bytes();
        out.push(bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out
}

/// A piece, waited for at most `wait` while the blob is arriving, and the permit it
/// holds until it is written. An uplink that sends a few pieces at once finishes each
/// sooner, so that its receivers serve them sooner; a member that asks beyond that
/// asks another holder.
async fn piece_answer<'s>(
    store: &BlobDir,
    digest: &Digest,
    index: u32,
    wait: Duration,
    serving: &'s tokio::sync::Semaphore,
) -> io::Result<(Vec<u8>, Option<tokio::sync::SemaphorePermit<'s>>)> {
    let not_held = || Ok((vec![NOT_HELD], None));
    let busy = || Ok((vec![BUSY], None));
    let (bytes, permit) = if store.has(digest) {
        let geometry = Geometry::of(std::fs::metadata(store.path(digest))?.len());
        if index >= geometry.count() {
            return not_held();
        }
        let Ok(permit) = serving.try_acquire() else {
            return busy();
        };
        let (start, len) = geometry.span(index);
        (store.read_at(digest, start, len).await?, permit)
    } else {
        let Some(receiving) = store.receiving(digest) else {
            return not_held();
        };
        let mut progress = receiving.progress();
        let geometry = match tokio::time::timeout(
            wait,
            progress.wait_for(|p| p.have.contains(index) || p.end.is_some()),
        )
        .await
        {
            Ok(Ok(p)) if p.have.contains(index) => p.geometry,
            _ => None,
        };
        let Some(geometry) = geometry else {
            return not_held();
        };
        // Waited for without a permit: a piece on its way holds no uplink.
        let Ok(permit) = serving.try_acquire() else {
            return busy();
        };
        let (start, len) = geometry.span(index);
        (receiving.read_at(start, len).await?, permit)
    };
    let mut out = Vec::with_capacity(bytes.len() + 1);
    out.push(SERVED);
    out.extend_from_slice(&bytes);
    Ok((out, Some(permit)))
}

fn request(op: u8, digest: &Digest, arg: u32, wait: Duration) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0] = op;
    out[1..33].copy_from_slice(&digest.to_bytes());
    out[33..37].copy_from_slice(&arg.to_be_bytes());
    let wait = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    out[37..].copy_from_slice(&wait.to_be_bytes());
    out
}

/// Opens a stream, sends the request, reads the status byte.
async fn ask(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    request: &[u8],
    answer_within: Duration,
) -> Result<libp2p::Stream, AskError> {
    let mut stream = tokio::time::timeout(ANSWER_TIMEOUT, control.open_stream(peer, PROTOCOL))
        .await
        .map_err(|_| AskError::Timeout)?
        .map_err(|e| AskError::Open(e.to_string()))?;
    stream.write_all(request).await.map_err(AskError::Dropped)?;
    let mut code = [0u8];
    tokio::time::timeout(answer_within, stream.read_exact(&mut code))
        .await
        .map_err(|_| AskError::Timeout)?
        .map_err(AskError::Dropped)?;
    match code[0] {
        SERVED => Ok(stream),
        REFUSED => Err(AskError::Refused),
        PULLING => Err(AskError::Pulling),
        BUSY => Err(AskError::Busy),
        SENT_TO => Err(AskError::SentTo(read_peers(&mut stream, FAN_OUT).await?)),
        _ => Err(AskError::NotHeld),
    }
}

/// A count, then at most `most` peer ids, each after its length.
async fn read_peers(stream: &mut libp2p::Stream, most: u8) -> Result<Vec<PeerId>, AskError> {
    let mut count = [0u8];
    read_full(stream, &mut count).await?;
    if count[0] > most {
        return Err(AskError::Malformed);
    }
    let mut peers = Vec::new();
    for _ in 0..count[0] {
        let mut len = [0u8];
        read_full(stream, &mut len).await?;
        let mut raw = vec![0u8; usize::from(len[0])];
        read_full(stream, &mut raw).await?;
        if let Ok(peer) = PeerId::from_bytes(&raw) {
            peers.push(peer);
        }
    }
    Ok(peers)
}

/// Reads exactly `buf.len()` bytes, failing when nothing arrives for the idle timeout.
async fn read_full(stream: &mut libp2p::Stream, buf: &mut [u8]) -> Result<(), AskError> {
    let mut at = 0;
    while at < buf.len() {
        let n = tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut buf[at..]))
            .await
            .map_err(|_| AskError::Timeout)??;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        at += n;
    }
    Ok(())
}

/// Opens a watch of `digest` on `peer` and reads its first frame.
async fn open_watch(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    digest: Digest,
    hashes_from: u32,
    wait: Duration,
    max_len: u64,
) -> Result<(Status, Watch), AskError> {
    let req = request(STATUS, &digest, hashes_from, wait);
    let stream = ask(&mut control, peer, &req, ANSWER_TIMEOUT + wait).await?;
    next_frame(Watch { stream, max_len }, ANSWER_TIMEOUT).await
}

/// The watch's next frame, which begins within `within`.
async fn next_frame(mut watch: Watch, within: Duration) -> Result<(Status, Watch), AskError> {
    let stream = &mut watch.stream;
    let mut head = [0u8; 9];
    let first = tokio::time::timeout(within, stream.read(&mut head[..1]))
        .await
        .map_err(|_| AskError::Timeout)??;
    if first == 0 {
        return Err(AskError::Ended);
    }
    read_full(stream, &mut head[1..]).await?;
    let len = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
    if len > watch.max_len {
        return Err(AskError::Malformed);
    }
    let geometry = Geometry::of(len);
    let count = geometry.count();
    let mut bitmap = vec![0u8; count.div_ceil(8) as usize];
    read_full(stream, &mut bitmap).await?;
    let have = PieceSet::from_bytes(&bitmap, count).ok_or(AskError::Malformed)?;
    let mut n = [0u8; 4];
    read_full(stream, &mut n).await?;
    let n = u32::from_be_bytes(n);
    // Never more hashes than pieces: the length was capped, so is this.
    if u64::from(n) > MAX_PIECES || n > have.present() {
        return Err(AskError::Malformed);
    }
    let mut hashes = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let mut entry = [0u8; 36];
        read_full(stream, &mut entry).await?;
        let index = u32::from_be_bytes(entry[..4].try_into().expect("4 bytes"));
        if !have.contains(index) {
            return Err(AskError::Malformed);
        }
        hashes.push((index, entry[4..].try_into().expect("32 bytes")));
    }
    let others = read_peers(stream, GOSSIP as u8).await?;
    let status = Status {
        geometry,
        whole: head[8] == 1,
        have,
        hashes,
        others,
    };
    Ok((status, watch))
}

async fn ask_piece(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    digest: Digest,
    index: u32,
    len: u64,
    wait: Duration,
) -> Result<Vec<u8>, AskError> {
    let req = request(PIECE, &digest, index, wait);
    let mut stream = ask(&mut control, peer, &req, ANSWER_TIMEOUT + wait).await?;
    let mut bytes = vec![0u8; usize::try_from(len).map_err(|_| AskError::Malformed)?];
    read_full(&mut stream, &mut bytes).await?;
    Ok(bytes)
}

/// One fetch's view of one peer.
#[derive(Debug, Default)]
struct Peer {
    have: Option<PieceSet>,
    whole: bool,
    asked: usize,
    failures: u32,
    dropped: bool,
    /// A watch is open, or being opened.
    watching: bool,
    refreshed: Option<Instant>,
    /// Named as pulling the blob now: asked again while it has not started.
    pulling: bool,
    /// Named by the resolution (the puller, a holder, a provider): piece hashes are
    /// taken from seeds only, so a member found through gossip cannot poison them.
    seed: bool,
    /// Pieces it delivered.
    delivered: u32,
    /// Pieces it turned away lately, oldest first: asked of others meanwhile.
    turned_away: VecDeque<(u32, Instant)>,
    /// Pieces a holder said it sent it lately, oldest first: asked of it, to be
    /// waited for there a little.
    promised: VecDeque<(u32, Instant)>,
}

impl Peer {
    /// The pieces to ask it for now: those it has or was sent, not those it turned
    /// away lately.
    fn offers(&self, count: u32) -> PieceSet {
        let mut offers = self.have.clone().unwrap_or_else(|| PieceSet::new(count));
        for (index, at) in &self.promised {
            if at.elapsed() < FAN_WINDOW {
                offers.insert(*index);
            }
        }
        for (index, at) in &self.turned_away {
            if at.elapsed() < TURNED_AWAY_FOR {
                offers.remove(*index);
            }
        }
        offers
    }

    fn promised(&self, index: u32) -> bool {
        !self.have.as_ref().is_some_and(|h| h.contains(index))
            && self.promised.iter().any(|(i, _)| *i == index)
    }
}

/// Appends `index` to a per-peer memory, forgetting the oldest past its bound.
fn remember(memory: &mut VecDeque<(u32, Instant)>, index: u32) {
    memory.push_back((index, Instant::now()));
    if memory.len() > TURNED_AWAY {
        memory.pop_front();
    }
}

enum Answer {
    Status(PeerId, Box<Result<(Status, Watch), AskError>>),
    Piece(PeerId, u32, Result<Vec<u8>, AskError>),
}

/// How a fetch went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetched {
    pub bytes: u64,
    /// Pieces each member delivered, most first.
    pub pieces_from: Vec<(PeerId, u32)>,
    /// Members that sent a piece that did not match its hash.
    pub bad: Vec<PeerId>,
}

/// What a fetch needs of the node.
pub struct Net<'a> {
    pub control: &'a libp2p_stream::Control,
    pub store: &'a BlobDir,
    /// Only members are asked.
    pub is_member: &'a (dyn Fn(&PeerId) -> bool + Send + Sync),
    pub local: PeerId,
}

/// What to fetch, from whom.
#[derive(Debug, Clone)]
pub struct Order<'a> {
    pub digest: Digest,
    /// The most bytes accepted.
    pub max_len: u64,
    /// Named by the resolution: where piece hashes come from.
    pub seeds: &'a [PeerId],
    /// The seeds are pulling it now and may not have begun receiving.
    pub pulling: bool,
    /// The fetch gives up after this long without a piece (as a pull counts as
    /// stalled): a resolution run anew finds out what became of the pull.
    pub idle: Duration,
}

/// Fetches a blob in pieces from the seeds and the members they name; says who
/// delivered what once it is stored.
pub async fn fetch(net: &Net<'_>, wanted: Order<'_>) -> Result<Fetched, FetchError> {
    let mut fetch = Fetch::new(net, &wanted);
    for seed in wanted.seeds {
        fetch.add(*seed, wanted.pulling, true);
    }
    fetch.run().await
}

fn salt_of(peer: &PeerId) -> u64 {
    let bytes = peer.to_bytes();
    let tail = &bytes[bytes.len().saturating_sub(8)..];
    tail.iter().fold(0, |acc, b| (acc << 8) | u64::from(*b))
}

struct Fetch<'n, 'a> {
    net: &'n Net<'a>,
    digest: Digest,
    max_len: u64,
    idle: Duration,
    peers: HashMap<PeerId, Peer>,
    asks: FuturesUnordered<BoxFuture<'static, Answer>>,
    geometry: Option<Geometry>,
    /// Every piece's hash, as members told it (zero while unknown).
    hashes: Vec<PieceHash>,
    hashed: PieceSet,
    asked: PieceSet,
    writer: Option<BlobWriter>,
    salt: u64,
    last_progress: Instant,
    /// Peers that sent a bad piece.
    bad: HashSet<PeerId>,
}

impl<'n, 'a> Fetch<'n, 'a> {
    /// Nothing known yet: no peer, no length, no writer.
    fn new(net: &'n Net<'a>, order: &Order<'_>) -> Self {
        Fetch {
            net,
            digest: order.digest,
            max_len: order.max_len,
            idle: order.idle,
            peers: HashMap::new(),
            asks: FuturesUnordered::new(),
            geometry: None,
            hashes: Vec::new(),
            hashed: PieceSet::default(),
            asked: PieceSet::default(),
            writer: None,
            salt: salt_of(&net.local),
            last_progress: Instant::now(),
            bad: HashSet::new(),
        }
    }

    fn add(&mut self, peer: PeerId, pulling: bool, seed: bool) {
        if peer == self.net.local
            || self.peers.len() >= MAX_PEERS
            || self.peers.contains_key(&peer)
            || self.bad.contains(&peer)
            || !(self.net.is_member)(&peer)
        {
            return;
        }
        self.peers.insert(
            peer,
            Peer {
                pulling,
                seed,
                ..Peer::default()
            },
        );
        self.refresh(peer);
    }

    fn refresh(&mut self, peer: PeerId) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        state.watching = true;
        state.refreshed = Some(Instant::now());
        let wait = if state.pulling && state.have.is_none() {
            Duration::from_secs(3)
        } else {
            Duration::ZERO
        };
        let hashes_from = if state.seed {
            self.hashed.first_missing()
        } else {
            u32::MAX
        };
        let ask = open_watch(
            self.net.control.clone(),
            peer,
            self.digest,
            hashes_from,
            wait,
            self.max_len,
        );
        self.asks
            .push(async move { Answer::Status(peer, Box::new(ask.await)) }.boxed());
    }

    /// A broken stream or a timeout. A member found through gossip is dropped after a
    /// few in a row; a seed is kept (its hashes are the only ones taken), and the fetch
    /// ends if it stays silent past the idle bound.
    fn fail(&mut self, peer: PeerId) {
        if let Some(state) = self.peers.get_mut(&peer) {
            state.failures += 1;
            if state.failures >= MAX_FAILURES && !state.seed {
                state.dropped = true;
            }
        }
    }

    async fn on_status(
        &mut self,
        peer: PeerId,
        status: Result<Status, AskError>,
    ) -> Result<(), FetchError> {
        let Some(state) = self.peers.get_mut(&peer) else {
            return Ok(());
        };
        let status = match status {
            Ok(status) => status,
            // Asked again at the next refresh, until the fetch counts as stalled.
            Err(AskError::Pulling | AskError::Ended) => return Ok(()),
            // A member named by gossip may not have begun receiving yet: asked again at
            // the next refresh.
            Err(AskError::NotHeld) if !state.seed => return Ok(()),
            // Not held and not pulling: nothing to wait for.
            Err(error @ (AskError::NotHeld | AskError::Refused)) => {
                tracing::debug!(%peer, digest = %self.digest, %error, "status: nothing to get");
                state.dropped = true;
                return Ok(());
            }
            Err(AskError::Dropped(error)) => {
                tracing::debug!(%peer, digest = %self.digest, %error, "status request dropped");
                state.refreshed = None;
                return Ok(());
            }
            // A broken stream, a timeout: asked again at the next refresh, a few times.
            Err(error) => {
                tracing::debug!(%peer, digest = %self.digest, %error, "status not had");
                state.refreshed = None;
                self.fail(peer);
                return Ok(());
            }
        };
        match self.geometry {
            None => {
                self.writer = Some(
                    match self
                        .net
                        .store
                        .piece_writer(&self.digest, status.geometry.len)
                        .await
                    {
                        Ok(writer) => writer,
                        Err(StoreError::Busy) => {
                            // Another writer here has it under way; see `run`.
                            self.geometry = Some(status.geometry);
                            return Ok(());
                        }
                        Err(error) => return Err(error.into()),
                    },
                );
                let count = status.geometry.count();
                self.geometry = Some(status.geometry);
                self.hashes = vec![[0; 32]; count as usize];
                self.hashed = PieceSet::new(count);
                self.asked = PieceSet::new(count);
            }
            Some(geometry) if geometry != status.geometry => {
                tracing::debug!(%peer, digest = %self.digest, "a member disagrees on the length");
                state.dropped = true;
                return Ok(());
            }
            Some(_) => {}
        }
        // A seed's hashes are those of its present pieces from the first one not known
        // here when it was asked.
        if state.seed {
            for (index, hash) in &status.hashes {
                if !self.hashed.contains(*index) {
                    self.hashes[*index as usize] = *hash;
                    self.hashed.insert(*index);
                }
            }
        }
        tracing::trace!(%peer, digest = %self.digest, present = status.have.present(), whole = status.whole, others = status.others.len(), "status");
        state.failures = 0;
        state.whole = status.whole;
        state.have = Some(status.have);
        for other in status.others {
            self.add(other, false, false);
        }
        Ok(())
    }

    /// A frame of a watch, or why there is none; the watch is followed while the peer
    /// is not whole and still asked.
    async fn on_frame(
        &mut self,
        peer: PeerId,
        answer: Result<(Status, Watch), AskError>,
    ) -> Result<(), FetchError> {
        let (status, watch) = match answer {
            Ok((status, watch)) => (Ok(status), Some(watch)),
            Err(error) => (Err(error), None),
        };
        let whole = status.as_ref().is_ok_and(|s| s.whole);
        self.on_status(peer, status).await?;
        let Some(state) = self.peers.get_mut(&peer) else {
            return Ok(());
        };
        match watch {
            Some(watch) if !whole && !state.dropped => {
                let next = next_frame(watch, WATCH_FOR + ANSWER_TIMEOUT);
                self.asks
                    .push(async move { Answer::Status(peer, Box::new(next.await)) }.boxed());
            }
            _ => state.watching = false,
        }
        Ok(())
    }

    async fn on_piece(
        &mut self,
        peer: PeerId,
        index: u32,
        bytes: Result<Vec<u8>, AskError>,
    ) -> Result<(), FetchError> {
        self.asked.remove(index);
        let promised = self.peers.get(&peer).is_some_and(|s| s.promised(index));
        if let Some(state) = self.peers.get_mut(&peer) {
            state.asked = state.asked.saturating_sub(1);
        }
        let bytes = match bytes {
            Ok(bytes) => bytes,
            // Taken from another holder, or from this one after its next status.
            Err(AskError::Busy) => {
                tracing::debug!(%peer, digest = %self.digest, index, "busy");
                if let Some(state) = self.peers.get_mut(&peer) {
                    remember(&mut state.turned_away, index);
                }
                return Ok(());
            }
            // Asked of those it went to, who serve it once they have it.
            Err(AskError::SentTo(to)) => {
                tracing::debug!(%peer, digest = %self.digest, index, ?to, "sent to others");
                if let Some(state) = self.peers.get_mut(&peer) {
                    remember(&mut state.turned_away, index);
                }
                for other in to {
                    self.add(other, false, false);
                    // It has the piece, or soon: asked again even if it said earlier
                    // it had nothing (a member that sent a bad piece stays dropped).
                    if let Some(state) = self.peers.get_mut(&other) {
                        remember(&mut state.promised, index);
                        state.dropped &= self.bad.contains(&other);
                    }
                }
                return Ok(());
            }
            // Promised, it did not come in time: no fault of the member's.
            Err(AskError::NotHeld) if promised => {
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.promised.retain(|(i, _)| *i != index);
                }
                return Ok(());
            }
            // Asked again, of whoever has it, at once.
            Err(AskError::Dropped(error)) => {
                tracing::debug!(%peer, digest = %self.digest, index, %error, "piece request dropped");
                return Ok(());
            }
            Err(error) => {
                tracing::debug!(%peer, digest = %self.digest, index, %error, "piece not had");
                self.fail(peer);
                return Ok(());
            }
        };
        let hash: PieceHash = Sha256::digest(&bytes).into();
        if hash != self.hashes[index as usize] {
            tracing::warn!(%peer, digest = %self.digest, index, "a member sent a bad piece; it is asked nothing more");
            self.bad.insert(peer);
            if let Some(state) = self.peers.get_mut(&peer) {
                state.dropped = true;
            }
            return Ok(());
        }
        if let Some(writer) = self.writer.as_mut() {
            writer.put_piece(index, bytes, hash).await?;
        }
        if let Some(state) = self.peers.get_mut(&peer) {
            state.delivered += 1;
            state.failures = 0;
        }
        tracing::debug!(%peer, digest = %self.digest, index, "piece");
        self.last_progress = Instant::now();
        Ok(())
    }

    /// Asks each peer with room for the piece the picker chooses.
    fn ask_pieces(&mut self) {
        let (Some(geometry), Some(writer)) = (self.geometry, self.writer.as_ref()) else {
            return;
        };
        let have = writer.progress().borrow().have.clone();
        let count = geometry.count();
        let offers: HashMap<PeerId, PieceSet> = self
            .peers
            .iter()
            .filter(|(_, s)| !s.dropped)
            .map(|(p, s)| (*p, s.offers(count)))
            .collect();
        let mut availability = vec![0u16; count as usize];
        for theirs in offers.values() {
            for index in theirs.iter() {
                availability[index as usize] += 1;
            }
        }
        let mut in_flight = self.asked.present() as usize;
        let mut order: Vec<PeerId> = self.peers.keys().copied().collect();
        // Partial holders first: a whole holder's uplink is the one everybody wants.
        order.sort_by_key(|p| (self.peers[p].whole, self.peers[p].asked));
        for peer in order {
            loop {
                if in_flight >= IN_FLIGHT {
                    return;
                }
                let state = &self.peers[&peer];
                if state.dropped || state.asked >= PER_PEER {
                    break;
                }
                let Some(theirs) = offers.get(&peer) else {
                    break;
                };
                // A puller is asked only for what no other known member has: its
                // uplink is for the pieces it is the first to have.
                let sole;
                let theirs = if state.pulling && !state.whole {
                    let mut only = theirs.clone();
                    for i in theirs.iter().filter(|&i| availability[i as usize] > 1) {
                        only.remove(i);
                    }
                    sole = only;
                    &sole
                } else {
                    theirs
                };
                let picker = Picker {
                    have: &have,
                    asked: &self.asked,
                    hashed: &self.hashed,
                    availability: &availability,
                    window: WINDOW,
                    beyond: true,
                    salt: self.salt,
                };
                let Some(index) = picker.pick(theirs) else {
                    break;
                };
                self.asked.insert(index);
                in_flight += 1;
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.asked += 1;
                }
                let (_, len) = geometry.span(index);
                let wait = if self.peers[&peer].promised(index) {
                    PROMISE_WAIT
                } else {
                    MAX_APPEAR_WAIT
                };
                let control = self.net.control.clone();
                let ask = ask_piece(control, peer, self.digest, index, len, wait);
                self.asks
                    .push(async move { Answer::Piece(peer, index, ask.await) }.boxed());
            }
        }
    }

    fn done(&self) -> bool {
        self.writer
            .as_ref()
            .is_some_and(|w| w.progress().borrow().have.is_full())
    }

    fn report(&self, bytes: u64) -> Fetched {
        let mut pieces_from: Vec<(PeerId, u32)> = self
            .peers
            .iter()
            .filter(|(_, s)| s.delivered > 0)
            .map(|(p, s)| (*p, s.delivered))
            .collect();
        pieces_from.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut bad: Vec<PeerId> = self.bad.iter().copied().collect();
        bad.sort();
        Fetched {
            bytes,
            pieces_from,
            bad,
        }
    }

    async fn run(mut self) -> Result<Fetched, FetchError> {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.done() {
                let writer = self.writer.take().expect("done means a writer");
                let bytes = writer.finish().await?;
                return Ok(self.report(bytes));
            }
            if self.geometry.is_some() && self.writer.is_none() {
                // Another writer on this node has it under way: its outcome is ours.
                return if self.net.store.settled(&self.digest).await {
                    let len = std::fs::metadata(self.net.store.path(&self.digest));
                    Ok(self.report(len.map_or(0, |m| m.len())))
                } else {
                    Err(FetchError::NotHeld)
                };
            }
            self.ask_pieces();
            let live = self.peers.values().any(|s| !s.dropped);
            if !live && self.asks.is_empty() {
                return Err(FetchError::NotHeld);
            }
            if self.last_progress.elapsed() > self.idle {
                return Err(FetchError::Stalled(self.last_progress.elapsed()));
            }
            let preempted = async {
                match self.writer.as_ref() {
                    Some(writer) => writer.preempted().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = preempted => {
                    // Dropped, the writer makes room for the pull.
                    self.writer = None;
                    return Err(FetchError::Preempted);
                }
                Some(answer) = self.asks.next() => match answer {
                    Answer::Status(peer, answer) => self.on_frame(peer, *answer).await?,
                    Answer::Piece(peer, index, bytes) => self.on_piece(peer, index, bytes).await?,
                },
                _ = tick.tick() => {
                    let stale: Vec<PeerId> = self
                        .peers
                        .iter()
                        .filter(|(_, s)| {
                            // A whole holder is asked again only if it turned
                            // pieces away (their bits were cleared here).
                            let partial = !s.whole || s.have.as_ref().is_some_and(|h| !h.is_full());
                            !s.dropped
                                && partial
                                && !s.watching
                                && s.refreshed.is_none_or(|t| t.elapsed() >= REFRESH)
                        })
                        .map(|(p, _)| *p)
                        .collect();
                    for peer in stale {
                        self.refresh(peer);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use gantry_coord::{Member, StaticMembership};
    use libp2p::{noise, swarm::SwarmEvent, tcp, yamux, Multiaddr, Swarm};

    use super::*;
    use crate::pieces::MIN_PIECE as P;

    struct Node {
        peer: PeerId,
        addr: Multiaddr,
        swarm: Option<Swarm<libp2p_stream::Behaviour>>,
        control: libp2p_stream::Control,
        store: BlobDir,
        root: PathBuf,
    }

    impl Drop for Node {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    async fn node(name: &str) -> Node {
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|_| libp2p_stream::Behaviour::new())
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
            .build();
        swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break address;
            }
        };
        let root = std::env::temp_dir().join(format!(
            "agent-transfer-{name}-{}-{}",
            std::process::id(),
            swarm.local_peer_id()
        ));
        Node {
            peer: *swarm.local_peer_id(),
            addr,
            control: swarm.behaviour().new_control(),
            swarm: Some(swarm),
            store: BlobDir::open(&root).unwrap(),
            root,
        }
    }

    /// Connects every node to every other, starts them, and serves each store to
    /// `members`.
    async fn start(nodes: &mut [Node], members: &[PeerId]) {
        let book: Vec<(PeerId, Multiaddr)> =
            nodes.iter().map(|n| (n.peer, n.addr.clone())).collect();
        let members: Vec<Member> = members
            .iter()
            .enumerate()
            .map(|(i, p)| Member::new(format!("m{i}").as_str(), Some(*p)))
            .collect();
        let (connected, mut connections) = tokio::sync::mpsc::unbounded_channel();
        for (i, node) in nodes.iter_mut().enumerate() {
            let mut swarm = node.swarm.take().unwrap();
            for (peer, addr) in &book[i + 1..] {
                swarm.add_peer_address(*peer, addr.clone());
                swarm.dial(addr.clone()).unwrap();
            }
            let membership = StaticMembership::new("m0", members.clone());
            tokio::spawn(serve(
                swarm.behaviour().new_control(),
                node.store.clone(),
                Arc::new(membership),
                Arc::new(|_: &Digest| false),
            ));
            let connected = connected.clone();
            tokio::spawn(async move {
                loop {
                    if let SwarmEvent::ConnectionEstablished { .. } = swarm.select_next_some().await
                    {
                        let _ = connected.send(());
                    }
                }
            });
        }
        // Each connection is seen at both ends.
        for _ in 0..nodes.len() * (nodes.len() - 1) {
            tokio::time::timeout(Duration::from_secs(10), connections.recv())
                .await
                .expect("connected");
        }
    }

    fn blob(len: usize) -> (Vec<u8>, Digest) {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4099) as u8).collect();
        let digest = Digest::from_sha256(Sha256::digest(&bytes).into());
        (bytes, digest)
    }

    async fn store_whole(store: &BlobDir, digest: &Digest, bytes: &[u8]) {
        let mut writer = store
            .writer(digest, Some(bytes.len() as u64), u64::MAX)
            .await
            .unwrap();
        writer.write(bytes).await.unwrap();
        writer.finish().await.unwrap();
    }

    fn anyone(_: &PeerId) -> bool {
        true
    }

    /// A fetch's view of `node`, to which every peer is a member.
    fn net_of(node: &Node) -> Net<'_> {
        Net {
            control: &node.control,
            store: &node.store,
            is_member: &anyone,
            local: node.peer,
        }
    }

    /// A watch of `digest` from `asker` on `holder`, every hash from the first piece.
    async fn watch(
        asker: &Node,
        holder: PeerId,
        digest: &Digest,
    ) -> Result<(Status, Watch), AskError> {
        let control = asker.control.clone();
        open_watch(control, holder, *digest, 0, Duration::ZERO, 1 << 30).await
    }

    async fn fetch_into(
        node: &Node,
        seeds: &[PeerId],
        digest: &Digest,
        pulling: bool,
    ) -> Result<Fetched, FetchError> {
        let net = net_of(node);
        let order = Order {
            digest: *digest,
            max_len: 1 << 30,
            seeds,
            pulling,
            idle: Duration::from_secs(5),
        };
        fetch(&net, order).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_piece_drops_its_sender_and_is_fetched_elsewhere() {
        let (bytes, digest) = blob(6 * P as usize + 123);
        let mut nodes = vec![
            node("honest").await,
            node("liar").await,
            node("fetcher").await,
        ];
        // The liar holds wrong bytes under the right name.
        store_whole(&nodes[0].store, &digest, &bytes).await;
        let wrong: Vec<u8> = bytes.iter().map(|b| b ^ 1).collect();
        std::fs::write(nodes[1].store.path(&digest), &wrong).unwrap();
        let members: Vec<PeerId> = nodes.iter().map(|n| n.peer).collect();
        start(&mut nodes, &members).await;
        // The liar asked the honest holder lately, so the holder names it to the fetcher.
        watch(&nodes[1], nodes[0].peer, &digest).await.unwrap();
        let fetched = fetch_into(&nodes[2], &[nodes[0].peer], &digest, false)
            .await
            .unwrap();
        assert_eq!(fetched.bytes, bytes.len() as u64);
        assert_eq!(std::fs::read(nodes[2].store.path(&digest)).unwrap(), bytes);
        assert!(fetched.pieces_from.iter().all(|(p, _)| *p == nodes[0].peer));
        let total: u32 = fetched.pieces_from.iter().map(|(_, n)| n).sum();
        assert_eq!(total, 7);
    }

    #[tokio::test]
    async fn a_piece_that_does_not_match_its_hash_drops_its_sender_only() {
        let (bytes, digest) = blob(2 * P as usize + 10);
        let fetcher = node("checker").await;
        let net = net_of(&fetcher);
        let geometry = Geometry::of(bytes.len() as u64);
        let piece = |i: u32| {
            let (start, len) = geometry.span(i);
            bytes[start as usize..(start + len) as usize].to_vec()
        };
        let (seed, liar) = (PeerId::random(), PeerId::random());
        let order = Order {
            digest,
            max_len: 1 << 30,
            seeds: &[],
            pulling: false,
            idle: Duration::from_secs(5),
        };
        let mut fetch = Fetch::new(&net, &order);
        for (peer, seed) in [(seed, true), (liar, false)] {
            fetch.peers.insert(
                peer,
                Peer {
                    seed,
                    ..Peer::default()
                },
            );
        }
        let hashes: Vec<PieceHash> = (0..3).map(|i| Sha256::digest(piece(i)).into()).collect();
        let status = |hashes: Vec<PieceHash>| Status {
            geometry,
            whole: true,
            have: PieceSet::full(3),
            hashes: (0..).zip(hashes).collect(),
            others: vec![],
        };
        // The gossiped member's hashes are not taken; the seed's are.
        fetch
            .on_status(liar, Ok(status(vec![[7; 32]; 3])))
            .await
            .unwrap();
        assert_eq!(fetch.hashed.present(), 0);
        fetch.on_status(seed, Ok(status(hashes))).await.unwrap();
        assert!(fetch.hashed.is_full());
        fetch.asked.insert(0);
        fetch.peers.get_mut(&liar).unwrap().asked = 1;
        let mut wrong = piece(0);
        wrong[5] ^= 1;
        fetch.on_piece(liar, 0, Ok(wrong)).await.unwrap();
        assert_eq!(fetch.report(0).bad, vec![liar]);
        assert!(fetch.peers[&liar].dropped);
        assert!(!fetch.asked.contains(0), "the piece is wanted again");
        // A stalled or broken answer costs the peer that piece, not its place.
        fetch
            .on_piece(seed, 1, Err(AskError::Timeout))
            .await
            .unwrap();
        assert!(!fetch.peers[&seed].dropped);
        for i in 0..3 {
            fetch.on_piece(seed, i, Ok(piece(i))).await.unwrap();
        }
        assert!(fetch.done());
        let report = fetch.report(0);
        assert_eq!(report.pieces_from, vec![(seed, 3)]);
        let writer = fetch.writer.take().unwrap();
        assert_eq!(writer.finish().await.unwrap(), bytes.len() as u64);
        assert_eq!(std::fs::read(fetcher.store.path(&digest)).unwrap(), bytes);
    }

    #[tokio::test]
    async fn a_member_that_had_nothing_yet_is_asked_where_a_piece_went() {
        let fetcher = node("redirected").await;
        let net = net_of(&fetcher);
        let order = Order {
            digest: blob(10).1,
            max_len: 1 << 30,
            seeds: &[],
            pulling: true,
            idle: Duration::from_secs(5),
        };
        let mut fetch = Fetch::new(&net, &order);
        let (puller, receiver) = (PeerId::random(), PeerId::random());
        for (peer, seed) in [(puller, true), (receiver, false)] {
            let state = Peer {
                seed,
                pulling: seed,
                ..Peer::default()
            };
            fetch.peers.insert(peer, state);
        }
        // Asked before it began receiving, a member named by gossip stays in the fetch.
        fetch
            .on_status(receiver, Err(AskError::NotHeld))
            .await
            .unwrap();
        assert!(!fetch.peers[&receiver].dropped);
        fetch
            .on_status(puller, Err(AskError::NotHeld))
            .await
            .unwrap();
        assert!(fetch.peers[&puller].dropped, "a seed without it is done");
        fetch.peers.get_mut(&puller).unwrap().dropped = false;
        fetch.peers.get_mut(&receiver).unwrap().dropped = true;
        // The puller sent piece 3 to it: asked of it there, for a short wait.
        fetch.asked = PieceSet::new(8);
        fetch.asked.insert(3);
        fetch
            .on_piece(puller, 3, Err(AskError::SentTo(vec![receiver])))
            .await
            .unwrap();
        let state = &fetch.peers[&receiver];
        assert!(!state.dropped && state.promised(3));
        assert!(state.offers(8).contains(3));
        assert!(!fetch.peers[&puller].offers(8).contains(3), "turned away");
        // The wait there runs out: the member is not at fault.
        fetch
            .on_piece(receiver, 3, Err(AskError::NotHeld))
            .await
            .unwrap();
        let state = &fetch.peers[&receiver];
        assert_eq!((state.failures, state.promised(3)), (0, false));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pieces_come_from_a_pull_under_way() {
        let (bytes, digest) = blob(5 * P as usize);
        let mut nodes = vec![
            node("puller").await,
            node("first").await,
            node("second").await,
        ];
        let members: Vec<PeerId> = nodes.iter().map(|n| n.peer).collect();
        start(&mut nodes, &members).await;
        // The puller's origin pull: in order, slowly, and not committed until both
        // receivers are done, so that every piece they got came from a blob under way.
        let store = nodes[0].store.clone();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        // Begun (the origin answered) before anyone asks; no byte yet.
        let mut writer = store
            .writer(&digest, Some(bytes.len() as u64), u64::MAX)
            .await
            .unwrap();
        let pull = {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                for chunk in bytes.chunks(P as usize / 4) {
                    writer.write(chunk).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = released.await;
                writer.finish().await.unwrap()
            })
        };
        // Both receivers start before the pull has a byte.
        let seeds = [nodes[0].peer];
        let (first, second) = tokio::join!(fetch_into(&nodes[1], &seeds, &digest, true), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            fetch_into(&nodes[2], &seeds, &digest, true).await
        });
        assert!(!nodes[0].store.has(&digest), "the pull is still under way");
        let _ = release.send(());
        assert_eq!(pull.await.unwrap(), bytes.len() as u64);
        for (node, fetched) in [(&nodes[1], first), (&nodes[2], second)] {
            let fetched = fetched.unwrap();
            assert_eq!(std::fs::read(node.store.path(&digest)).unwrap(), bytes);
            assert!(fetched.bad.is_empty());
            assert_eq!(fetched.pieces_from.iter().map(|(_, n)| n).sum::<u32>(), 5);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_tells_each_piece_as_it_arrives_and_each_hash_once() {
        let (bytes, digest) = blob(4 * P as usize);
        let mut nodes = vec![node("arriving").await, node("watcher").await];
        let members: Vec<PeerId> = nodes.iter().map(|n| n.peer).collect();
        start(&mut nodes, &members).await;
        let mut writer = nodes[0]
            .store
            .writer(&digest, Some(bytes.len() as u64), u64::MAX)
            .await
            .unwrap();
        writer.write(&bytes[..P as usize]).await.unwrap();
        let (first, mut watch) = watch(&nodes[1], nodes[0].peer, &digest).await.unwrap();
        assert_eq!((first.have.present(), first.whole), (1, false));
        assert_eq!(first.hashes.len(), 1);
        let mut told: HashSet<u32> = first.hashes.iter().map(|(i, _)| *i).collect();
        let pull = {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                for piece in bytes[P as usize..].chunks(P as usize) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    writer.write(piece).await.unwrap();
                }
                writer.finish().await.unwrap()
            })
        };
        let mut frames = 1;
        let mut present = 1;
        loop {
            let (status, next) = next_frame(watch, Duration::from_secs(5)).await.unwrap();
            frames += 1;
            assert!(status.have.present() >= present, "never fewer pieces");
            present = status.have.present();
            for (index, hash) in &status.hashes {
                assert!(told.insert(*index), "piece {index}'s hash told twice");
                let (start, len) = Geometry::of(bytes.len() as u64).span(*index);
                let piece = &bytes[start as usize..(start + len) as usize];
                assert_eq!(*hash, <[u8; 32]>::from(Sha256::digest(piece)));
            }
            watch = next;
            if status.whole {
                break;
            }
        }
        assert_eq!(present, 4);
        assert!(
            frames >= 3,
            "pieces told as they came, not at the end: {frames} frames"
        );
        let ended = next_frame(watch, Duration::from_secs(5))
            .await
            .map(|(s, _)| s);
        assert!(matches!(ended, Err(AskError::Ended)), "{ended:?}");
        assert_eq!(pull.await.unwrap(), bytes.len() as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_piece_goes_out_twice_per_window_then_its_askers_hear_where_it_went() {
        let sent = Sent::new();
        let (_, digest) = blob(10);
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        assert_eq!(sent.take(&digest, 0, FAN_OUT, a), Ok(()));
        assert_eq!(sent.take(&digest, 0, FAN_OUT, b), Ok(()));
        assert_eq!(
            sent.take(&digest, 0, FAN_OUT, c),
            Err(vec![a, b]),
            "a third copy within the window"
        );
        assert_eq!(
            sent.take(&digest, 1, FAN_OUT, c),
            Ok(()),
            "each piece apart"
        );
        assert_eq!(sent.take(&digest, 1, 1, a), Err(vec![c]), "a puller's once");
        tokio::time::advance(FAN_WINDOW).await;
        assert_eq!(sent.take(&digest, 0, FAN_OUT, c), Ok(()), "a new window");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blob_nobody_holds_is_not_held_and_leaves_nothing() {
        let (_, digest) = blob(1000);
        let mut nodes = vec![node("empty").await, node("asker").await];
        let members: Vec<PeerId> = nodes.iter().map(|n| n.peer).collect();
        start(&mut nodes, &members).await;
        let result = fetch_into(&nodes[1], &[nodes[0].peer], &digest, false).await;
        assert!(matches!(result, Err(FetchError::NotHeld)), "{result:?}");
        assert!(!nodes[1].store.has(&digest));
        assert!(nodes[1].store.receiving(&digest).is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_outside_the_membership_is_refused() {
        let (bytes, digest) = blob(1000);
        let mut nodes = vec![node("holder").await, node("stranger").await];
        store_whole(&nodes[0].store, &digest, &bytes).await;
        let holder = nodes[0].peer;
        start(&mut nodes, &[holder]).await;
        let answer = watch(&nodes[1], holder, &digest).await;
        assert!(
            matches!(answer, Err(AskError::Refused)),
            "{:?}",
            answer.map(|a| a.0)
        );
        let result = fetch_into(&nodes[1], &[holder], &digest, false).await;
        assert!(matches!(result, Err(FetchError::NotHeld)), "{result:?}");
    }
}

//! The registry mirror containerd pulls through (`hosts.toml`): by-digest manifests and
//! blobs from this node's store, obtained through the cluster when missing; tags answered
//! 503 so that containerd resolves them at the origin.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET`/`HEAD /v2/` | 200, `{}` |
//! | `GET`/`HEAD /v2/<name>/manifests/<digest>`, `/v2/<name>/blobs/<digest>` | 200 / 206 with `Range`, 416 past the end; `Content-Length`, `Docker-Content-Digest`, a manifest's own media type |
//! | a tag | 503: containerd goes on to the origin |
//! | an `ns` no upstream has | 404 |
//! | the origin refused it: auth, not found, rate-limited, anything else | 401, 404, 429 with `Retry-After`, 503 |
//! | a malformed name, digest or path; another method | 400 / 404 / 405 |
//! | before the node is ready, while it drains, a blob not had within the wait | 503 |
//! | `/healthz`; `/readyz` | 200; 200 once ready, 503 before and while draining |
//!
//! Every answer says `Docker-Distribution-API-Version: registry/2.0`, as registries do.

use std::{
    io::SeekFrom,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    body::Body,
    extract::State,
    http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use futures::{future::BoxFuture, StreamExt};
use gantry_coord::{Digest, FailureClass};
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncSeekExt},
    sync::watch,
};

use crate::{
    store::{BlobDir, End},
    upstream::Upstreams,
};

/// A parsed by-digest request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub repository: String,
    pub digest: Digest,
    pub manifest: bool,
}

/// What a request path asks for, or why it cannot be served.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    Object(Wanted),
    /// A manifest by tag: resolved at the origin, not here.
    Tag,
    Invalid(StatusCode),
}

/// Parses `/v2/<name>/{manifests,blobs}/<reference>`, the name by the distribution
/// spec's grammar, the reference a sha256 digest (or, for manifests, a tag).
pub fn route(path: &str) -> Route {
    let Some(rest) = path.strip_prefix("/v2") else {
        return Route::Invalid(StatusCode::NOT_FOUND);
    };
    if rest.is_empty() || rest == "/" {
        return Route::Base;
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Route::Invalid(StatusCode::NOT_FOUND);
    };
    let (name, manifest, reference) = if let Some((name, r)) = rest.rsplit_once("/manifests/") {
        (name, true, r)
    } else if let Some((name, r)) = rest.rsplit_once("/blobs/") {
        (name, false, r)
    } else {
        return Route::Invalid(StatusCode::NOT_FOUND);
    };
    // The name grammar is the library's, as the please_pull it leads to needs it.
    if gantry_coord::Origin::new("mirror.invalid", name).is_err() {
        return Route::Invalid(StatusCode::BAD_REQUEST);
    }
    if let Ok(digest) = Digest::parse(reference) {
        return Route::Object(Wanted {
            repository: name.to_owned(),
            digest,
            manifest,
        });
    }
    if manifest && is_tag(reference) {
        return Route::Tag;
    }
    Route::Invalid(StatusCode::BAD_REQUEST)
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn is_tag(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The `ns` query parameter, percent-decoded (containerd sends `host%3Aport`), if present
/// and well formed.
pub fn namespace(query: Option<&str>) -> Option<String> {
    let raw = query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("ns="))?;
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
            }
            other => other,
        });
    }
    String::from_utf8(out).ok()
}

/// One byte range of a `Range` header, resolved against `len`: `Ok(None)` for none,
/// `Err(())` when it cannot be satisfied.
#[allow(clippy::result_unit_err)]
pub fn byte_range(header: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header else {
        return Ok(None);
    };
    let Some(spec) = spec.trim().strip_prefix("bytes=") else {
        return Err(());
    };
    if spec.contains(',') {
        return Err(());
    }
    let (start, end) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| ())?;
            if n == 0 || len == 0 {
                return Err(());
            }
            (len.saturating_sub(n), len - 1)
        }
        (start, "") => (start.parse().map_err(|_| ())?, len.saturating_sub(1)),
        (start, end) => {
            let (start, end): (u64, u64) =
                (start.parse().map_err(|_| ())?, end.parse().map_err(|_| ())?);
            (start, end.min(len.saturating_sub(1)))
        }
    };
    if start >= len || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// A manifest's media type: its own `mediaType`, else what its shape says.
pub fn media_type(manifest: &[u8]) -> &'static str {
    const KNOWN: &[&str] = &[
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ];
    let value: serde_json::Value = serde_json::from_slice(manifest).unwrap_or_default();
    if let Some(declared) = value["mediaType"].as_str() {
        if let Some(known) = KNOWN.iter().find(|k| **k == declared) {
            return known;
        }
    }
    if value.get("manifests").is_some() {
        KNOWN[0]
    } else {
        KNOWN[1]
    }
}

/// How the mirror gets what the store lacks: the node's cascade, fetch and retry.
pub trait Obtain: Send + Sync + 'static {
    /// The node's store, where blobs are whole or arriving.
    fn store(&self) -> &BlobDir;
    /// Obtains it from `registry` (through members, or the origin as the cascade
    /// decides).
    fn obtain(
        &self,
        registry: &str,
        wanted: Wanted,
    ) -> BoxFuture<'static, Result<(), FailureClass>>;
}

/// The mirror's state: what it serves from, and its gates.
pub struct Mirror {
    pub obtain: Arc<dyn Obtain>,
    /// The registries mirrored, as containerd's `ns` names them.
    pub upstreams: Upstreams,
    pub ready: Arc<AtomicBool>,
    pub draining: Arc<AtomicBool>,
    /// The longest a request waits for a blob the node lacks before it answers 503.
    pub wait: Duration,
}

impl Mirror {
    /// Ready, and not draining.
    fn serving(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }
}

/// Serves the mirror on `addr` until `shutdown` completes; in-flight responses finish.
pub async fn serve(
    addr: SocketAddr,
    mirror: Arc<Mirror>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().fallback(handle).with_state(mirror);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
    });
    Ok((bound, task))
}

fn status(code: StatusCode) -> Response {
    code.into_response()
}

async fn handle(
    State(mirror): State<Arc<Mirror>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let mut response = answer(&mirror, &method, &uri, &headers).await;
    tracing::debug!(%method, %uri, status = %response.status(), "mirror");
    response.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    response
}

async fn answer(mirror: &Mirror, method: &Method, uri: &Uri, headers: &HeaderMap) -> Response {
    if *method != Method::GET && *method != Method::HEAD {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    // Probes for the kubelet and the hosts.toml installer.
    match uri.path() {
        "/healthz" => return status(StatusCode::OK),
        "/readyz" if mirror.serving() => return status(StatusCode::OK),
        "/readyz" => return status(StatusCode::SERVICE_UNAVAILABLE),
        _ => {}
    }
    if !mirror.serving() {
        return status(StatusCode::SERVICE_UNAVAILABLE);
    }
    let wanted = match route(uri.path()) {
        Route::Base => {
            let mut ok = ([(header::CONTENT_TYPE, "application/json")], "{}").into_response();
            if *method == Method::HEAD {
                *ok.body_mut() = Body::empty();
            }
            return ok;
        }
        Route::Tag => return status(StatusCode::SERVICE_UNAVAILABLE),
        Route::Invalid(code) => return status(code),
        Route::Object(wanted) => wanted,
    };
    let registry = match mirror.upstreams.resolve(namespace(uri.query()).as_deref()) {
        Some(upstream) => upstream.name,
        None => return status(StatusCode::NOT_FOUND),
    };
    let store = mirror.obtain.store().clone();
    if store.has(&wanted.digest) {
        return respond(method, headers, &wanted, &store.path(&wanted.digest))
            .await
            .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR));
    }
    // The obtain runs on if the client goes away: containerd comes back for it.
    let (done_tx, mut done) = watch::channel(None);
    let obtaining = mirror.obtain.obtain(&registry, wanted.clone());
    tokio::spawn(async move {
        let _ = done_tx.send(Some(obtaining.await));
    });
    if wanted.manifest {
        // A manifest is small, and its media type is read from its bytes: it is served
        // whole.
        let outcome = match tokio::time::timeout(mirror.wait, done.wait_for(Option::is_some)).await
        {
            Ok(Ok(outcome)) => *outcome,
            _ => None,
        };
        return match outcome {
            Some(Ok(())) if store.has(&wanted.digest) => {
                respond(method, headers, &wanted, &store.path(&wanted.digest))
                    .await
                    .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR))
            }
            Some(Err(class)) => failed(class),
            _ => status(StatusCode::SERVICE_UNAVAILABLE),
        };
    }
    match arrival(&store, &wanted.digest, &mut done, mirror.wait).await {
        Arrival::Whole => respond(method, headers, &wanted, &store.path(&wanted.digest))
            .await
            .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR)),
        Arrival::Arriving(len) => {
            let follow = Follow {
                store,
                digest: wanted.digest,
                done,
                wait: mirror.wait,
            };
            stream_arriving(method, headers, &wanted, len, follow)
        }
        Arrival::Failed(class) => failed(class),
        Arrival::TimedOut => status(StatusCode::SERVICE_UNAVAILABLE),
    }
}

/// How long a client is told to wait after the origin rate-limited the cluster: the
/// cluster's first cooldown for the digest.
const RETRY_AFTER_SECS: &str = "10";

/// An obtain that ended refused, as the Go mirror answers it: containerd moves on to the
/// origin after each.
fn failed(class: FailureClass) -> Response {
    match class {
        FailureClass::Auth => status(StatusCode::UNAUTHORIZED),
        FailureClass::NotFound => status(StatusCode::NOT_FOUND),
        FailureClass::RateLimited => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, RETRY_AFTER_SECS)],
        )
            .into_response(),
        _ => status(StatusCode::SERVICE_UNAVAILABLE),
    }
}

type Outcome = Option<Result<(), FailureClass>>;

/// The first thing a blob request can be served from.
enum Arrival {
    Whole,
    /// Being received, this long.
    Arriving(u64),
    Failed(FailureClass),
    TimedOut,
}

/// Waits, at most `wait`, until `digest` is whole, or arriving with a known length
/// (from this node's origin pull or its fetch from members), or its obtain failed.
async fn arrival(
    store: &BlobDir,
    digest: &Digest,
    done: &mut watch::Receiver<Outcome>,
    wait: Duration,
) -> Arrival {
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = store.changes();
    loop {
        if store.has(digest) {
            return Arrival::Whole;
        }
        let outcome = *done.borrow();
        match outcome {
            Some(Err(class)) => return Arrival::Failed(class),
            Some(Ok(())) if store.receiving(digest).is_none() && !store.has(digest) => {
                // Obtained, then gone (removed under us): nothing to serve.
                return Arrival::TimedOut;
            }
            _ => {}
        }
        if let Some(len) = store.receiving(digest).and_then(|r| r.known_len()) {
            return Arrival::Arriving(len);
        }
        // Wake on a blob that begins or ends, a length that becomes known, the obtain's
        // end; the progress is looked at again at least every 50 ms.
        let tick = tokio::time::sleep(Duration::from_millis(50));
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Arrival::TimedOut,
            _ = changes.changed() => {}
            _ = done.changed() => {}
            _ = tick => {}
        }
    }
}

/// Where the bytes of a blob that is arriving are followed from.
struct Follow {
    store: BlobDir,
    digest: Digest,
    done: watch::Receiver<Outcome>,
    /// The longest a response waits for its next bytes.
    wait: Duration,
}

/// Why a streamed response was cut: the client sees the connection end early.
#[derive(Debug, thiserror::Error)]
enum Cut {
    #[error("no bytes for {0:?}")]
    Stalled(Duration),
    #[error("the blob could not be obtained")]
    Failed,
    #[error("the bytes did not match the digest")]
    Mismatch,
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
}

impl Follow {
    /// The next bytes at `at`, from the whole blob or from what has arrived.
    async fn next_at(&mut self, at: u64, end: u64) -> Result<Vec<u8>, Cut> {
        const CHUNK: u64 = 256 << 10;
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut changes = self.store.changes();
        loop {
            if self.store.has(&self.digest) {
                return Ok(self
                    .store
                    .read_at(&self.digest, at, (end - at).min(CHUNK))
                    .await?);
            }
            if let Some(receiving) = self.store.receiving(&self.digest) {
                let mut progress = receiving.progress();
                let contiguous = match tokio::time::timeout_at(
                    deadline,
                    progress.wait_for(|p| p.contiguous > at || p.end.is_some()),
                )
                .await
                {
                    Ok(Ok(p)) => (p.end != Some(End::Failed)).then_some(p.contiguous),
                    Ok(Err(_)) => None,
                    Err(_) => return Err(Cut::Stalled(self.wait)),
                };
                match contiguous {
                    Some(contiguous) if contiguous > at => {
                        let len = (contiguous.min(end) - at).min(CHUNK);
                        return Ok(receiving.read_at(at, len).await?);
                    }
                    // Whole now, or failed: look again.
                    _ => continue,
                }
            }
            if matches!(*self.done.borrow(), Some(Err(_))) {
                return Err(Cut::Failed);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Err(Cut::Stalled(self.wait)),
                _ = changes.changed() => {}
                _ = self.done.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

/// A blob that is still arriving, streamed in order as its bytes come in. A response
/// that covers the whole blob is hashed as it passes and cut if the digest does not
/// match: containerd never sees a clean end of wrong bytes.
fn stream_arriving(
    method: &Method,
    headers: &HeaderMap,
    wanted: &Wanted,
    len: u64,
    follow: Follow,
) -> Response {
    let (builder, start, count) = match head(headers, wanted, "application/octet-stream", len) {
        Ok(head) => head,
        Err(refused) => return unsatisfiable(refused),
    };
    let body = if *method == Method::HEAD {
        Body::empty()
    } else {
        let hasher = (start == 0 && count == len).then(Sha256::new);
        let state = (follow, start, start + count, hasher, false);
        let chunks = futures::stream::unfold(
            state,
            |(mut follow, at, end, mut hasher, over)| async move {
                if over || at == end {
                    return None;
                }
                let cut = match follow.next_at(at, end).await {
                    Ok(bytes) => {
                        let next = at + bytes.len() as u64;
                        if let Some(h) = hasher.as_mut() {
                            h.update(&bytes);
                        }
                        // The last bytes go out only once the whole digest matched.
                        let verified = next < end
                            || hasher.take().is_none_or(|h| {
                                Digest::from_sha256(h.finalize().into()) == follow.digest
                            });
                        if verified {
                            return Some((Ok(bytes), (follow, next, end, hasher, false)));
                        }
                        Cut::Mismatch
                    }
                    Err(cut) => cut,
                };
                tracing::info!(digest = %follow.digest, %cut, "streamed response cut");
                Some((Err(cut), (follow, at, end, hasher, true)))
            },
        );
        Body::from_stream(chunks.boxed())
    };
    builder
        .body(body)
        .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR))
}

/// A by-digest answer's status and headers for a blob of `len` bytes, with the range
/// asked for (its start and length), or the range cannot be served.
fn head(
    headers: &HeaderMap,
    wanted: &Wanted,
    content_type: &str,
    len: u64,
) -> Result<(axum::http::response::Builder, u64, u64), Unsatisfiable> {
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("Docker-Content-Digest", wanted.digest.to_string());
    let (code, start, count) = match byte_range(range, len) {
        Ok(None) => (StatusCode::OK, 0, len),
        Ok(Some((start, end))) => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        Err(()) => return Err(Unsatisfiable(len)),
    };
    let builder = builder
        .status(code)
        .header(header::CONTENT_LENGTH, HeaderValue::from(count));
    Ok((builder, start, count))
}

/// A range past the end of a blob of this length: 416.
struct Unsatisfiable(u64);

fn unsatisfiable(Unsatisfiable(len): Unsatisfiable) -> Response {
    Response::builder()
        .status(StatusCode::RANGE_NOT_SATISFIABLE)
        .header(header::CONTENT_RANGE, format!("bytes */{len}"))
        .body(Body::empty())
        .unwrap_or_else(|_| status(StatusCode::RANGE_NOT_SATISFIABLE))
}

async fn respond(
    method: &Method,
    headers: &HeaderMap,
    wanted: &Wanted,
    path: &std::path::Path,
) -> std::io::Result<Response> {
    let mut file = tokio::fs::File::open(path).await?;
    let len = file.metadata().await?.len();
    let content_type = if wanted.manifest {
        let mut bytes = Vec::new();
        (&mut file).take(4 << 20).read_to_end(&mut bytes).await?;
        file.seek(SeekFrom::Start(0)).await?;
        media_type(&bytes)
    } else {
        "application/octet-stream"
    };
    let (builder, start, count) = match head(headers, wanted, content_type, len) {
        Ok(head) => head,
        Err(refused) => return Ok(unsatisfiable(refused)),
    };
    let body = if *method == Method::HEAD {
        Body::empty()
    } else {
        file.seek(SeekFrom::Start(start)).await?;
        let chunks = futures::stream::unfold((file, count), |(mut file, left)| async move {
            if left == 0 {
                return None;
            }
            let mut buf = vec![0u8; (64 << 10).min(left as usize)];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(buf), (file, left - n as u64)))
                }
                Err(e) => Some((Err(e), (file, 0))),
            }
        });
        Body::from_stream(chunks.boxed())
    };
    Ok(builder
        .body(body)
        .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    #[test]
    fn paths_route_as_the_distribution_api_names_them() {
        assert_eq!(route("/v2/"), Route::Base);
        assert_eq!(route("/v2"), Route::Base);
        let Route::Object(w) = route(&format!("/v2/library/nginx/blobs/sha256:{HEX}")) else {
            panic!()
        };
        assert_eq!(
            (w.repository.as_str(), w.manifest),
            ("library/nginx", false)
        );
        let Route::Object(w) = route(&format!("/v2/a/b/c/manifests/sha256:{HEX}")) else {
            panic!()
        };
        assert_eq!((w.repository.as_str(), w.manifest), ("a/b/c", true));
        assert_eq!(route("/v2/library/nginx/manifests/1.27"), Route::Tag);
        for bad in [
            format!("/v2/Library/nginx/blobs/sha256:{HEX}"),
            format!("/v2/../etc/blobs/sha256:{HEX}"),
            "/v2/library/nginx/blobs/sha256:abc".to_owned(),
            format!("/v2/library/nginx/blobs/sha512:{HEX}{HEX}"),
            "/v2/library/nginx/blobs/latest".to_owned(),
            "/v2/library/nginx/manifests/-bad".to_owned(),
        ] {
            assert_eq!(
                route(&bad),
                Route::Invalid(StatusCode::BAD_REQUEST),
                "{bad}"
            );
        }
        assert_eq!(route("/v3/x"), Route::Invalid(StatusCode::NOT_FOUND));
        assert_eq!(
            route("/v2/x/tags/list"),
            Route::Invalid(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            namespace(Some("ns=registry.example.com")).as_deref(),
            Some("registry.example.com")
        );
        assert_eq!(namespace(Some("a=b&ns=r:5000")).as_deref(), Some("r:5000"));
        assert_eq!(
            namespace(Some("ns=10.0.0.1%3A5000")).as_deref(),
            Some("10.0.0.1:5000")
        );
        assert_eq!(namespace(Some("ns=bad%3")), None);
        assert_eq!(namespace(None), None);
    }

    #[test]
    fn ranges_resolve_as_rfc_9110_says() {
        assert_eq!(byte_range(None, 10), Ok(None));
        assert_eq!(byte_range(Some("bytes=0-3"), 10), Ok(Some((0, 3))));
        assert_eq!(byte_range(Some("bytes=4-"), 10), Ok(Some((4, 9))));
        assert_eq!(byte_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(byte_range(Some("bytes=5-100"), 10), Ok(Some((5, 9))));
        assert_eq!(byte_range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(byte_range(Some("bytes=5-2"), 10), Err(()));
        assert_eq!(byte_range(Some("bytes=0-1,4-5"), 10), Err(()));
        assert_eq!(byte_range(Some("items=0-1"), 10), Err(()));
        assert_eq!(byte_range(Some("bytes=-0"), 10), Err(()));
    }

    #[test]
    fn a_manifest_keeps_its_media_type() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert_eq!(media_type(index), "application/vnd.oci.image.index.v1+json");
        let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","layers":[]}"#;
        assert_eq!(
            media_type(docker),
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        let bare_index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(
            media_type(bare_index),
            "application/vnd.oci.image.index.v1+json"
        );
        let bare = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        assert_eq!(
            media_type(bare),
            "application/vnd.oci.image.manifest.v1+json"
        );
    }

    /// A node whose obtain never ends on its own: what arrives is what a test writes.
    struct Arriving(BlobDir);

    impl Obtain for Arriving {
        fn store(&self) -> &BlobDir {
            &self.0
        }

        fn obtain(&self, _: &str, _: Wanted) -> BoxFuture<'static, Result<(), FailureClass>> {
            Box::pin(futures::future::pending())
        }
    }

    async fn mirror_on(store: &BlobDir) -> SocketAddr {
        let mirror = Mirror {
            obtain: Arc::new(Arriving(store.clone())),
            upstreams: Upstreams::new(&["http://origin.test".into()], &[]).unwrap(),
            ready: Arc::new(AtomicBool::new(true)),
            draining: Arc::new(AtomicBool::new(false)),
            wait: Duration::from_secs(5),
        };
        let (addr, _) = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(mirror),
            futures::future::pending(),
        )
        .await
        .unwrap();
        addr
    }

    /// Sends a GET and returns the stream, with the response head and whatever body
    /// bytes came with it.
    async fn get(addr: SocketAddr, digest: &Digest) -> (tokio::net::TcpStream, String, Vec<u8>) {
        request(addr, &format!("/v2/demo/blobs/{digest}?ns=origin.test")).await
    }

    /// As [`get`], for any path.
    async fn request(addr: SocketAddr, path: &str) -> (tokio::net::TcpStream, String, Vec<u8>) {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        loop {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("the head within 5 s")
                .unwrap();
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_string();
                return (stream, head, got[end + 4..].to_vec());
            }
            assert!(n > 0, "closed before the head");
        }
    }

    /// Reads until `want` body bytes are in or the connection ends.
    async fn read_body(stream: &mut tokio::net::TcpStream, body: &mut Vec<u8>, want: usize) {
        while body.len() < want {
            let mut buf = vec![0u8; 64 << 10];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("bytes within 5 s")
                .unwrap_or(0);
            if n == 0 {
                return;
            }
            body.extend_from_slice(&buf[..n]);
        }
    }

    fn blob_of(len: usize, seed: u8) -> (Vec<u8>, Digest) {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        let digest = Digest::from_sha256(Sha256::digest(&bytes).into());
        (bytes, digest)
    }

    fn store(name: &str) -> (BlobDir, std::path::PathBuf) {
        let root = std::env::temp_dir().join(format!("agent-mirror-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        (BlobDir::open(&root).unwrap(), root)
    }

    #[tokio::test]
    async fn the_version_check_and_an_unknown_registry_are_answered_as_a_registry_would() {
        let (store, root) = store("v2");
        let addr = mirror_on(&store).await;
        let (mut stream, head, mut body) = request(addr, "/v2/").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(
            lower.contains("docker-distribution-api-version: registry/2.0"),
            "{head}"
        );
        assert!(lower.contains("content-type: application/json"), "{head}");
        read_body(&mut stream, &mut body, 2).await;
        assert_eq!(body, b"{}");
        let (digest, path) = (blob_of(10, 1).1, "/v2/demo/blobs");
        let (_, head, _) = request(addr, &format!("{path}/{digest}?ns=other.test")).await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        let (_, head, _) = request(addr, "/v2/demo/manifests/latest?ns=origin.test").await;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn refusals_of_the_origin_are_answered_as_the_go_mirror_answers_them() {
        let answer = |class| failed(class).status();
        assert_eq!(answer(FailureClass::Auth), StatusCode::UNAUTHORIZED);
        assert_eq!(answer(FailureClass::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            answer(FailureClass::Transient),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let limited = failed(FailureClass::RateLimited);
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.headers()[header::RETRY_AFTER], RETRY_AFTER_SECS);
    }

    #[tokio::test]
    async fn a_blob_under_way_is_streamed_as_it_arrives() {
        let (store, root) = store("stream");
        let (bytes, digest) = blob_of(3 << 20, 7);
        let mut writer = store
            .writer(&digest, Some(bytes.len() as u64), u64::MAX)
            .await
            .unwrap();
        writer.write(&bytes[..1 << 20]).await.unwrap();
        let addr = mirror_on(&store).await;
        let (mut stream, head, mut body) = get(addr, &digest).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("content-length: {}", bytes.len())),
            "{head}"
        );
        // The first MiB comes before the rest exists.
        read_body(&mut stream, &mut body, 1 << 20).await;
        assert_eq!(body, &bytes[..1 << 20]);
        writer.write(&bytes[1 << 20..]).await.unwrap();
        writer.finish().await.unwrap();
        read_body(&mut stream, &mut body, bytes.len() + 1).await;
        assert_eq!(body, bytes);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[tokio::test]
    async fn bytes_that_do_not_match_their_digest_never_end_cleanly() {
        let (store, root) = store("mismatch");
        let (bytes, digest) = blob_of(1 << 20, 3);
        let mut writer = store
            .writer(&digest, Some(bytes.len() as u64), u64::MAX)
            .await
            .unwrap();
        let wrong: Vec<u8> = bytes.iter().map(|b| b ^ 0x55).collect();
        writer.write(&wrong[..1000]).await.unwrap();
        let addr = mirror_on(&store).await;
        let (mut stream, head, mut body) = get(addr, &digest).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        writer.write(&wrong[1000..]).await.unwrap();
        read_body(&mut stream, &mut body, bytes.len() + 1).await;
        // The connection ends short of the length: the client sees a broken transfer.
        assert!(
            body.len() < bytes.len(),
            "{} of {} bytes",
            body.len(),
            bytes.len()
        );
        assert!(matches!(
            writer.finish().await,
            Err(crate::store::StoreError::Mismatch { .. })
        ));
        let _ = std::fs::remove_dir_all(&root);
    }
}

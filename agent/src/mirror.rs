//! The registry mirror containerd pulls through (`hosts.toml`): by-digest manifests and
//! blobs from this node's store, obtained through the cluster when missing; tags answered
//! 503 so that containerd resolves them at the origin.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET`/`HEAD /v2/` | 200 |
//! | `GET`/`HEAD /v2/<name>/manifests/<digest>`, `/v2/<name>/blobs/<digest>` | 200 / 206 with `Range`, 416 past the end; `Content-Length`, `Docker-Content-Digest`, a manifest's own media type |
//! | a tag | 503: containerd goes on to the origin |
//! | an `ns` no upstream has | 404 |
//! | a malformed name, digest or path; another method | 400 / 404 / 405 |
//! | before the node is ready, while it drains, a blob not had within the wait | 503 |
//! | `/healthz`; `/readyz` | 200; 200 once ready, 503 before and while draining |

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
use tokio::io::{AsyncReadExt, AsyncSeekExt};

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
    /// Whether the store holds it, and where.
    fn path(&self, digest: &Digest) -> Option<std::path::PathBuf>;
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
    /// `host[:port]` of each configured upstream, as containerd's `ns` names it.
    pub upstreams: Vec<String>,
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
    let response = answer(&mirror, &method, &uri, &headers).await;
    tracing::debug!(%method, %uri, status = %response.status(), "mirror");
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
        Route::Base => return status(StatusCode::OK),
        Route::Tag => return status(StatusCode::SERVICE_UNAVAILABLE),
        Route::Invalid(code) => return status(code),
        Route::Object(wanted) => wanted,
    };
    let registry = match namespace(uri.query()) {
        Some(ns) if mirror.upstreams.contains(&ns) => ns,
        None if mirror.upstreams.len() == 1 => mirror.upstreams[0].clone(),
        _ => return status(StatusCode::NOT_FOUND),
    };
    let path = match mirror.obtain.path(&wanted.digest) {
        Some(path) => path,
        None => {
            let obtaining = mirror.obtain.obtain(&registry, wanted.clone());
            match tokio::time::timeout(mirror.wait, obtaining).await {
                Ok(Ok(())) => match mirror.obtain.path(&wanted.digest) {
                    Some(path) => path,
                    None => return status(StatusCode::SERVICE_UNAVAILABLE),
                },
                Ok(Err(FailureClass::NotFound)) => return status(StatusCode::NOT_FOUND),
                // containerd moves on to the origin after any error: the bounded wait
                // keeps a pull from hanging on this node.
                Ok(Err(_)) => return status(StatusCode::BAD_GATEWAY),
                Err(_) => return status(StatusCode::SERVICE_UNAVAILABLE),
            }
        }
    };
    respond(method, headers, &wanted, &path)
        .await
        .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR))
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
        Err(()) => {
            return Ok(Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty())
                .unwrap_or_else(|_| status(StatusCode::RANGE_NOT_SATISFIABLE)));
        }
    };
    builder = builder
        .status(code)
        .header(header::CONTENT_LENGTH, HeaderValue::from(count));
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
}

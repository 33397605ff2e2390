//! Pulls from upstream registries over the distribution API, through `oci-client`.
//!
//! - HTTPS with the system's roots and the operator's CAs (`--origin-ca`); plain HTTP
//!   only where an upstream says `http://`.
//! - The distribution spec's auth, as `oci-client` does it: anonymous, basic where the
//!   registry asks for it, or the bearer-token flow. One client per upstream and
//!   credential, kept, so that its token (per repository, until it expires) serves every
//!   blob: one token request per repository and expiry, not per blob. A token the registry
//!   turns down mid-pull is asked for again once; a second refusal is the class `auth`.
//! - Credentials go only to the registry and to a token realm over HTTPS (or over HTTP
//!   when the upstream itself is HTTP).
//! - Every step is bounded: a TLS or connection failure, a token service that hangs, an
//!   origin that stops sending are errors naming the upstream, never a hang.

use std::{collections::HashSet, sync::Arc, time::Duration};

use futures::StreamExt;
use gantry_coord::{Digest, FailureClass, OriginRefKind};
use hashlink::LruCache;
use oci_client::{
    client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol},
    errors::OciDistributionError,
    secrets::RegistryAuth,
    Client, Reference, RegistryOperation,
};
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};

use crate::{
    store::{BlobDir, BlobWriter, StoreError},
    upstream::{Upstream, Upstreams},
    MAX_BLOB,
};

/// The manifest media types asked for: OCI and Docker, image and index.
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// A connection (TCP and TLS) to an upstream or its token realm.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest an upstream may send nothing while it answers.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The token step: the version check and the token request together.
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);
/// Clients kept, one per upstream and credential (delegated ones included).
const CLIENTS: usize = 64;

/// Why an origin pull failed, with the class every node would see.
#[derive(Debug, thiserror::Error)]
#[error("{class:?}: {message}")]
pub struct OriginError {
    pub class: FailureClass,
    pub message: String,
}

impl OriginError {
    fn new(class: FailureClass, message: impl Into<String>) -> Self {
        OriginError {
            class,
            message: message.into(),
        }
    }
}

impl From<StoreError> for OriginError {
    fn from(error: StoreError) -> Self {
        OriginError::new(FailureClass::Transient, error.to_string())
    }
}

/// Why the `--origin-ca` roots cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("cannot read the CA file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("the CA file {0} holds no PEM certificate")]
    Empty(String),
    #[error("the CA file {0} holds a certificate that cannot be read: {1}")]
    Invalid(String, String),
}

/// The PEM certificates of each file, checked now rather than at the first pull.
pub fn read_roots(files: &[std::path::PathBuf]) -> Result<Vec<Certificate>, RootsError> {
    let mut roots = Vec::new();
    for file in files {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(file).map_err(|e| RootsError::Read(name.clone(), e))?;
        let before = roots.len();
        const END: &str = "-----END CERTIFICATE-----";
        let mut rest = text.as_str();
        while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
            let Some(end) = rest[start..].find(END) else {
                return Err(RootsError::Invalid(name, "an unterminated block".into()));
            };
            let block = &rest[start..start + end + END.len()];
            reqwest::Certificate::from_pem(block.as_bytes())
                .map_err(|e| RootsError::Invalid(name.clone(), e.to_string()))?;
            roots.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data: format!("{block}\n").into_bytes(),
            });
            rest = &rest[start + end + END.len()..];
        }
        if roots.len() == before {
            return Err(RootsError::Empty(name));
        }
    }
    Ok(roots)
}

/// Every upstream this node pulls from, and the clients it keeps for them.
pub struct Origin {
    pub upstreams: Upstreams,
    roots: Vec<Certificate>,
    clients: Mutex<LruCache<[u8; 32], Arc<Session>>>,
    /// The token step's bound.
    auth_timeout: Duration,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("upstreams", &self.upstreams)
            .field("roots", &self.roots.len())
            .finish()
    }
}

/// One client for one upstream and credential: its token cache and its connections.
struct Session {
    upstream: Upstream,
    client: Client,
    /// A plain client for the version check that finds the token realm.
    probe: reqwest::Client,
    auth: RegistryAuth,
    auth_timeout: Duration,
    /// Repositories whose token (or basic credentials) the client holds; the lock makes
    /// concurrent first pulls of one repository wait for one token request.
    authorized: tokio::sync::Mutex<HashSet<String>>,
}

/// What a pull asks for.
pub struct Wanted<'a> {
    pub registry: &'a str,
    pub repository: &'a str,
    pub digest: &'a Digest,
    pub kind: OriginRefKind,
}

impl Origin {
    pub fn new(upstreams: Upstreams, roots: Vec<Certificate>) -> Self {
        Origin {
            upstreams,
            roots,
            clients: Mutex::new(LruCache::new(CLIENTS)),
            auth_timeout: AUTH_TIMEOUT,
        }
    }

    /// Whether this node has an upstream for the registry `name`.
    pub fn serves(&self, name: &str) -> bool {
        self.upstreams.resolve(Some(name)).is_some()
    }

    /// Pulls `wanted` into `store` with `auth`; returns its length.
    pub async fn pull(
        &self,
        wanted: Wanted<'_>,
        auth: &RegistryAuth,
        store: &BlobDir,
    ) -> Result<u64, OriginError> {
        let Some(upstream) = self.upstreams.resolve(Some(wanted.registry)) else {
            return Err(OriginError::new(
                FailureClass::NotFound,
                format!("no upstream for the registry {}", wanted.registry),
            ));
        };
        let (key, session) = self.session(&upstream, auth)?;
        let warm = session.is_authorized(wanted.repository).await;
        match session.pull(&wanted, store).await {
            // A token the client held and the registry turned down (expired early,
            // revoked): a new client asks for a new one, once.
            Err(error) if warm && error.class == FailureClass::Auth => {
                tracing::debug!(upstream = %upstream.url(), %error, "token refused: asking for a new one");
                self.clients.lock().remove(&key);
                let (_, session) = self.session(&upstream, auth)?;
                session.pull(&wanted, store).await
            }
            outcome => outcome,
        }
    }

    fn session(
        &self,
        upstream: &Upstream,
        auth: &RegistryAuth,
    ) -> Result<([u8; 32], Arc<Session>), OriginError> {
        let key = session_key(upstream, auth);
        // Made under the lock: concurrent first pulls share one client, and one token.
        let mut clients = self.clients.lock();
        if let Some(session) = clients.get(&key) {
            return Ok((key, session.clone()));
        }
        let failed = |e: String| {
            OriginError::new(
                FailureClass::Transient,
                format!("{}: cannot build a client: {e}", upstream.url()),
            )
        };
        let client = Client::try_from(ClientConfig {
            protocol: if upstream.tls {
                ClientProtocol::Https
            } else {
                ClientProtocol::Http
            },
            extra_root_certificates: self.roots.clone(),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            user_agent: concat!("gantry-agent/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
        .map_err(|e| failed(e.to_string()))?;
        let mut roots = Vec::new();
        for root in &self.roots {
            roots.push(
                reqwest::Certificate::from_pem(&root.data).map_err(|e| failed(e.to_string()))?,
            );
        }
        let probe = reqwest::Client::builder()
            .tls_certs_merge(roots)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(self.auth_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| failed(e.to_string()))?;
        let session = Arc::new(Session {
            upstream: upstream.clone(),
            client,
            probe,
            auth: auth.clone(),
            auth_timeout: self.auth_timeout,
            authorized: Default::default(),
        });
        clients.insert(key, session.clone());
        Ok((key, session))
    }
}

/// Which client serves an upstream and credential; the credential only as a hash.
fn session_key(upstream: &Upstream, auth: &RegistryAuth) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(upstream.url().as_bytes());
    match auth {
        RegistryAuth::Anonymous => hash.update(b"\0anonymous"),
        RegistryAuth::Basic(user, password) => {
            hash.update(b"\0basic\0");
            hash.update(user.as_bytes());
            hash.update(b"\0");
            hash.update(password.as_bytes());
        }
        RegistryAuth::Bearer(token) => {
            hash.update(b"\0bearer\0");
            hash.update(token.as_bytes());
        }
    }
    hash.finalize().into()
}

impl Session {
    fn reference(&self, repository: &str, digest: &Digest) -> Reference {
        Reference::with_digest(
            self.upstream.endpoint.clone(),
            repository.to_owned(),
            digest.to_string(),
        )
    }

    async fn is_authorized(&self, repository: &str) -> bool {
        self.authorized.lock().await.contains(repository)
    }

    /// Asks for the repository's token once per client (later ones as they expire are
    /// the client's own), with the error a failure deserves.
    async fn authorize(&self, reference: &Reference) -> Result<(), OriginError> {
        let mut authorized = self.authorized.lock().await;
        if authorized.contains(reference.repository()) {
            return Ok(());
        }
        let step = async {
            if matches!(self.auth, RegistryAuth::Basic(..)) {
                self.check_realm().await?;
            }
            self.client
                .auth(reference, &self.auth, RegistryOperation::Pull)
                .await
                .map_err(|e| self.classify(e))
        };
        match tokio::time::timeout(self.auth_timeout, step).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(OriginError::new(
                    FailureClass::Transient,
                    format!(
                        "{}: no token within {:?}",
                        self.upstream.url(),
                        self.auth_timeout
                    ),
                ))
            }
        }
        authorized.insert(reference.repository().to_owned());
        Ok(())
    }

    /// Credentials never travel in the clear to a realm the registry names: over HTTPS,
    /// or over HTTP only when the registry itself is reached over HTTP.
    async fn check_realm(&self) -> Result<(), OriginError> {
        if !self.upstream.tls {
            return Ok(());
        }
        let url = format!("{}/v2/", self.upstream.url());
        let response = self
            .probe
            .get(&url)
            .send()
            .await
            .map_err(|e| self.transport(&e))?;
        let challenge = response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        match realm_of(challenge) {
            Some(realm) if !realm.to_ascii_lowercase().starts_with("https://") => {
                Err(OriginError::new(
                    FailureClass::Auth,
                    format!(
                        "{}: the token realm {realm} is not https; credentials are not sent there",
                        self.upstream.url()
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    async fn pull(&self, wanted: &Wanted<'_>, store: &BlobDir) -> Result<u64, OriginError> {
        let reference = self.reference(wanted.repository, wanted.digest);
        self.authorize(&reference).await?;
        if wanted.kind == OriginRefKind::Manifest {
            return self.pull_manifest(&reference, wanted.digest, store).await;
        }
        match self.pull_blob(&reference, wanted.digest, store).await {
            // containerd asks for a manifest by digest under /blobs/ too; registries
            // serve it only under /manifests/.
            Err(error) if error.class == FailureClass::NotFound => {
                match self.pull_manifest(&reference, wanted.digest, store).await {
                    Ok(len) => Ok(len),
                    Err(_) => Err(error),
                }
            }
            outcome => outcome,
        }
    }

    async fn pull_manifest(
        &self,
        reference: &Reference,
        digest: &Digest,
        store: &BlobDir,
    ) -> Result<u64, OriginError> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(reference, &self.auth, MANIFEST_TYPES)
            .await
            .map_err(|e| self.classify(e))?;
        let Some(mut writer) = writer(store, digest, Some(bytes.len() as u64)).await? else {
            return settled(store, digest).await;
        };
        writer.write(&bytes).await?;
        Ok(writer.finish().await?)
    }

    async fn pull_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        store: &BlobDir,
    ) -> Result<u64, OriginError> {
        self.client
            .store_auth_if_needed(reference.resolve_registry(), &self.auth)
            .await;
        let mut stream = self
            .client
            .pull_blob_stream(reference, digest.encode().as_str())
            .await
            .map_err(|e| self.classify(e))?;
        // Pieces are published as they arrive when the length is known up front, which
        // the distribution API requires of a blob response.
        let len = stream.content_length.filter(|len| *len <= MAX_BLOB);
        let Some(mut writer) = writer(store, digest, len).await? else {
            return settled(store, digest).await;
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                OriginError::new(
                    FailureClass::Transient,
                    format!("{}: {}", self.upstream.url(), chain(&e)),
                )
            })?;
            writer.write(&chunk).await?;
        }
        Ok(writer.finish().await?)
    }

    fn transport(&self, error: &reqwest::Error) -> OriginError {
        OriginError::new(
            FailureClass::Transient,
            format!("{}: {}", self.upstream.url(), chain(error)),
        )
    }

    fn classify(&self, error: OciDistributionError) -> OriginError {
        let class = class_of(&error);
        OriginError::new(class, format!("{}: {}", self.upstream.url(), chain(&error)))
    }
}

/// An error and its causes, as one line: a TLS failure says why (`invalid peer
/// certificate: NotValidForName`), not only that a request failed.
fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// The class every node would see for an `oci-client` error.
fn class_of(error: &OciDistributionError) -> FailureClass {
    use OciDistributionError as E;
    match error {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => FailureClass::Auth,
        E::ImageManifestNotFoundError(_) => FailureClass::NotFound,
        E::ServerError { code, .. } => status_class(*code),
        E::RegistryError { envelope, .. } => {
            use oci_client::errors::OciErrorCode as C;
            let has = |codes: &[C]| envelope.errors.iter().any(|e| codes.contains(&e.code));
            if has(&[
                C::BlobUnknown,
                C::ManifestUnknown,
                C::NameUnknown,
                C::NotFound,
            ]) {
                FailureClass::NotFound
            } else if has(&[C::Unauthorized, C::Denied]) {
                FailureClass::Auth
            } else if has(&[C::Toomanyrequests]) {
                FailureClass::RateLimited
            } else {
                FailureClass::Transient
            }
        }
        _ => FailureClass::Transient,
    }
}

/// The class of an HTTP status an upstream answered with, as the Go agent classifies it.
pub fn status_class(code: u16) -> FailureClass {
    match code {
        401 | 403 => FailureClass::Auth,
        404 => FailureClass::NotFound,
        429 => FailureClass::RateLimited,
        _ => FailureClass::Transient,
    }
}

/// The `realm` of a `WWW-Authenticate: Bearer …` challenge.
fn realm_of(challenge: &str) -> Option<&str> {
    let (scheme, params) = challenge.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let at = params.to_ascii_lowercase().find("realm=")?;
    let value = &params[at + "realm=".len()..];
    match value.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => value.split(',').next().map(str::trim),
    }
}

/// A writer for the pull, or `None` when another writer on this node (a fetch from a
/// member) has the blob under way.
async fn writer(
    store: &BlobDir,
    digest: &Digest,
    len: Option<u64>,
) -> Result<Option<BlobWriter>, OriginError> {
    match store.writer(digest, len, MAX_BLOB).await {
        Ok(writer) => Ok(Some(writer)),
        Err(StoreError::Busy) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// The outcome of the other writer, as this pull's.
async fn settled(store: &BlobDir, digest: &Digest) -> Result<u64, OriginError> {
    if store.settled(digest).await {
        Ok(std::fs::metadata(store.path(digest)).map_or(0, |m| m.len()))
    } else {
        Err(OriginError::new(
            FailureClass::Transient,
            "the fetch this node had under way failed",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_challenge_names_its_realm() {
        assert_eq!(
            realm_of(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io""#),
            Some("https://auth.docker.io/token")
        );
        assert_eq!(
            realm_of(r#"bearer service="s",Realm="http://10.0.0.1/token""#),
            Some("http://10.0.0.1/token")
        );
        assert_eq!(
            realm_of("Bearer realm=https://a/t,service=s"),
            Some("https://a/t")
        );
        assert_eq!(realm_of(r#"Basic realm="registry""#), None);
        assert_eq!(realm_of(""), None);
    }

    #[test]
    fn statuses_are_classed_as_the_go_agent_classes_them() {
        assert_eq!(status_class(401), FailureClass::Auth);
        assert_eq!(status_class(403), FailureClass::Auth);
        assert_eq!(status_class(404), FailureClass::NotFound);
        assert_eq!(status_class(429), FailureClass::RateLimited);
        assert_eq!(status_class(500), FailureClass::Transient);
        assert_eq!(status_class(503), FailureClass::Transient);
    }

    #[test]
    fn each_credential_has_its_own_client() {
        let upstream = Upstream::parse("https://registry.example.com").unwrap();
        let other = Upstream::parse("https://other.example.com").unwrap();
        let basic = |p: &str| RegistryAuth::Basic("u".into(), p.into());
        let key = |u: &Upstream, a: &RegistryAuth| session_key(u, a);
        assert_eq!(key(&upstream, &basic("p")), key(&upstream, &basic("p")));
        assert_ne!(key(&upstream, &basic("p")), key(&upstream, &basic("q")));
        assert_ne!(key(&upstream, &basic("p")), key(&other, &basic("p")));
        assert_ne!(
            key(&upstream, &RegistryAuth::Anonymous),
            key(&upstream, &RegistryAuth::Bearer("p".into()))
        );
    }

    #[test]
    fn roots_are_read_from_pem_files_and_bad_ones_refused() {
        let dir = std::env::temp_dir().join(format!("gantry-roots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here").unwrap();
        assert!(matches!(read_roots(&[empty]), Err(RootsError::Empty(_))));
        let broken = dir.join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        assert!(matches!(
            read_roots(&[broken]),
            Err(RootsError::Invalid(..))
        ));
        assert!(matches!(
            read_roots(&[dir.join("missing.pem")]),
            Err(RootsError::Read(..))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The client against registries on loopback: a token service that counts, refuses and
/// hangs; TLS with the wrong name and with a private CA.
#[cfg(test)]
mod registry_tests {
    use std::{
        collections::HashMap,
        io::{Read, Write},
        net::SocketAddr,
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    use axum::{
        extract::{Path, State},
        http::{header, HeaderMap, StatusCode},
        response::{IntoResponse, Response},
        routing::get,
        Router,
    };

    use super::*;

    #[derive(Default)]
    struct Fake {
        addr: std::sync::OnceLock<SocketAddr>,
        issued: AtomicUsize,
        valid: Mutex<HashSet<String>>,
        /// Tokens issued from now on are refused by the registry.
        refuse_new: AtomicBool,
        hang: AtomicBool,
        blobs: HashMap<String, Vec<u8>>,
        manifests: HashMap<String, Vec<u8>>,
    }

    impl Fake {
        fn challenge(&self) -> Response {
            let realm = format!(
                r#"Bearer realm="http://{}/token",service="fake""#,
                self.addr.get().unwrap()
            );
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, realm)],
            )
                .into_response()
        }

        fn authorized(&self, headers: &HeaderMap) -> bool {
            let token = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            token.is_some_and(|t| self.valid.lock().contains(t))
        }
    }

    async fn token(State(fake): State<Arc<Fake>>) -> Response {
        if fake.hang.load(Ordering::SeqCst) {
            futures::future::pending::<()>().await;
        }
        let n = fake.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let token = format!("token-{n}");
        if !fake.refuse_new.load(Ordering::SeqCst) {
            fake.valid.lock().insert(token.clone());
        }
        (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({"token": token}).to_string(),
        )
            .into_response()
    }

    async fn object(
        State(fake): State<Arc<Fake>>,
        Path((kind, digest)): Path<(String, String)>,
        headers: HeaderMap,
    ) -> Response {
        if !fake.authorized(&headers) {
            return fake.challenge();
        }
        let found = match kind.as_str() {
            "blobs" => fake.blobs.get(&digest),
            _ => fake.manifests.get(&digest),
        };
        match found {
            Some(bytes) => (
                [(
                    header::CONTENT_TYPE,
                    "application/vnd.oci.image.manifest.v1+json",
                )],
                bytes.clone(),
            )
                .into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        }
    }

    fn digest_of(bytes: &[u8]) -> Digest {
        Digest::parse(&format!("sha256:{:x}", Sha256::digest(bytes))).unwrap()
    }

    async fn fake_registry(blobs: &[Vec<u8>], manifest: &[u8]) -> Arc<Fake> {
        let key = |b: &[u8]| digest_of(b).to_string();
        let fake = Arc::new(Fake {
            blobs: blobs.iter().map(|b| (key(b), b.clone())).collect(),
            manifests: [(key(manifest), manifest.to_vec())].into(),
            ..Fake::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        fake.addr.set(listener.local_addr().unwrap()).unwrap();
        let app = Router::new()
            .route(
                "/v2/",
                get(|State(fake): State<Arc<Fake>>| async move { fake.challenge() }),
            )
            .route("/token", get(token))
            .route("/v2/demo/{kind}/{digest}", get(object))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        fake
    }

    fn temp_store(name: &str) -> (BlobDir, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("gantry-origin-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (BlobDir::open(&dir).unwrap(), dir)
    }

    fn origin_of(url: &str, roots: Vec<Certificate>) -> Origin {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Origin::new(Upstreams::new(&[url.to_owned()], &[]).unwrap(), roots)
    }

    async fn pull(
        origin: &Origin,
        store: &BlobDir,
        digest: &Digest,
        kind: OriginRefKind,
        auth: &RegistryAuth,
    ) -> Result<u64, OriginError> {
        let registry = origin.upstreams.first().unwrap().name.clone();
        let wanted = Wanted {
            registry: &registry,
            repository: "demo",
            digest,
            kind,
        };
        origin.pull(wanted, auth, store).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_token_serves_every_blob_and_a_refused_one_is_asked_for_again_once() {
        let blobs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000 + usize::from(i)]).collect();
        let manifest = br#"{"schemaVersion":2,"layers":[]}"#;
        let fake = fake_registry(&blobs, manifest).await;
        let origin = origin_of(&format!("http://{}", fake.addr.get().unwrap()), Vec::new());
        let (store, dir) = temp_store("token");
        let anonymous = RegistryAuth::Anonymous;
        // Three first pulls at once, as a puller asked for a batch makes them.
        let origin = Arc::new(origin);
        let pulls = blobs[..3].iter().map(|blob| {
            let (origin, store, blob) = (origin.clone(), store.clone(), blob.clone());
            tokio::spawn(async move {
                let digest = digest_of(&blob);
                let anonymous = RegistryAuth::Anonymous;
                let len = pull(&origin, &store, &digest, OriginRefKind::Blob, &anonymous).await;
                assert_eq!(len.unwrap(), blob.len() as u64);
            })
        });
        for pulled in futures::future::join_all(pulls).await {
            pulled.unwrap();
        }
        assert_eq!(fake.issued.load(Ordering::SeqCst), 1, "a token per blob");

        // A manifest asked for as a blob, as containerd may: served from /manifests/.
        pull(
            &origin,
            &store,
            &digest_of(manifest),
            OriginRefKind::Blob,
            &anonymous,
        )
        .await
        .unwrap();
        assert!(store.has(&digest_of(manifest)));

        // The registry turns the token down: a new one, once, and the pull goes on.
        fake.valid.lock().clear();
        pull(
            &origin,
            &store,
            &digest_of(&blobs[3]),
            OriginRefKind::Blob,
            &anonymous,
        )
        .await
        .unwrap();
        assert_eq!(fake.issued.load(Ordering::SeqCst), 2);

        // Turned down again, and every new token too: one more request, then `auth`.
        fake.refuse_new.store(true, Ordering::SeqCst);
        fake.valid.lock().clear();
        let error = pull(
            &origin,
            &store,
            &digest_of(&blobs[4]),
            OriginRefKind::Blob,
            &anonymous,
        )
        .await
        .unwrap_err();
        assert_eq!(error.class, FailureClass::Auth, "{error}");
        assert_eq!(fake.issued.load(Ordering::SeqCst), 3);
        assert!(!store.has(&digest_of(&blobs[4])));

        // Not there at all: not found, for a blob and for a manifest.
        let absent = digest_of(b"absent");
        fake.refuse_new.store(false, Ordering::SeqCst);
        for kind in [OriginRefKind::Blob, OriginRefKind::Manifest] {
            let error = pull(&origin, &store, &absent, kind, &anonymous)
                .await
                .unwrap_err();
            assert_eq!(error.class, FailureClass::NotFound, "{error}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_token_service_that_hangs_and_an_upstream_that_is_down_fail_in_bounded_time() {
        const NONE: RegistryAuth = RegistryAuth::Anonymous;
        let blob = vec![7u8; 100];
        let fake = fake_registry(std::slice::from_ref(&blob), b"{}").await;
        fake.hang.store(true, Ordering::SeqCst);
        let mut origin = origin_of(&format!("http://{}", fake.addr.get().unwrap()), Vec::new());
        origin.auth_timeout = Duration::from_millis(500);
        let (store, dir) = temp_store("hang");
        let began = std::time::Instant::now();
        let error = pull(
            &origin,
            &store,
            &digest_of(&blob),
            OriginRefKind::Blob,
            &NONE,
        )
        .await
        .unwrap_err();
        assert_eq!(error.class, FailureClass::Transient, "{error}");
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{:?}",
            began.elapsed()
        );

        // Nothing listens there: refused at once, and the message names the upstream.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let origin = origin_of(&format!("http://{addr}"), Vec::new());
        let error = pull(
            &origin,
            &store,
            &digest_of(&blob),
            OriginRefKind::Blob,
            &NONE,
        )
        .await
        .unwrap_err();
        assert_eq!(error.class, FailureClass::Transient, "{error}");
        assert!(error.message.contains(&addr.to_string()), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// An HTTPS server on loopback with a certificate for `names`, answering `/v2/` with
    /// a bearer challenge whose realm is plain HTTP and everything else with 404.
    fn tls_server(names: &[&str]) -> (SocketAddr, Certificate) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let signed = rcgen::generate_simple_self_signed(names).unwrap();
        let pem = signed.cert.pem();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![signed.cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(signed.key_pair.serialize_der().into()),
            )
            .unwrap();
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let config = config.clone();
                std::thread::spawn(move || {
                    let Ok(connection) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(connection, tcp);
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let answer = if request.starts_with(b"GET /v2/ ") {
                        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:9/token\",service=\"s\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    } else {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    };
                    let _ = tls.write_all(answer.as_bytes());
                    let _ = tls.flush();
                });
            }
        });
        let root = Certificate {
            encoding: CertificateEncoding::Pem,
            data: pem.into_bytes(),
        };
        (addr, root)
    }

    #[tokio::test]
    async fn tls_is_checked_against_the_given_roots_and_credentials_never_go_to_a_plain_realm() {
        let (store, dir) = temp_store("tls");
        let digest = digest_of(b"anything");
        let basic = RegistryAuth::Basic("user".into(), "secret".into());

        // A certificate for another name: a TLS error naming the upstream, at once.
        let (addr, root) = tls_server(&["registry.other.example"]);
        let origin = origin_of(&format!("https://{addr}"), vec![root]);
        let error = pull(
            &origin,
            &store,
            &digest,
            OriginRefKind::Blob,
            &RegistryAuth::Anonymous,
        )
        .await
        .unwrap_err();
        assert_eq!(error.class, FailureClass::Transient, "{error}");
        assert!(error.message.contains(&addr.to_string()), "{error}");
        assert!(
            error.message.to_lowercase().contains("certificate"),
            "{error}"
        );

        // The right name, trusted only through the given root: the request is answered.
        let (addr, root) = tls_server(&["127.0.0.1"]);
        let trusted = origin_of(&format!("https://{addr}"), vec![root]);
        // Basic credentials are not sent to a realm over plain HTTP.
        let error = pull(&trusted, &store, &digest, OriginRefKind::Blob, &basic)
            .await
            .unwrap_err();
        assert_eq!(error.class, FailureClass::Auth, "{error}");
        assert!(error.message.contains("not https"), "{error}");
        // Without the root the same server is not trusted.
        let untrusted = origin_of(&format!("https://{addr}"), Vec::new());
        let error = pull(&untrusted, &store, &digest, OriginRefKind::Blob, &basic)
            .await
            .unwrap_err();
        assert_eq!(error.class, FailureClass::Transient, "{error}");
        assert!(
            error.message.to_lowercase().contains("certificate"),
            "{error}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}

//! The registry as public ones are: HTTPS with a certificate from a CA the lab makes, and
//! the distribution spec's bearer tokens, signed here and verified by the registry.
//!
//! The token service runs in the test process, on a thread that entered the registry's
//! namespace, over HTTPS with the registry's certificate. It checks basic credentials and
//! signs RS256 JWTs whose header carries the signing certificate (`x5c`); Distribution's
//! `auth: token` checks them against `rootcertbundle`. Anonymous askers get a token that
//! grants nothing, as registries do for a private repository.

use std::{
    io::{Read, Write},
    net::TcpListener,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;

use super::{run, PASSWORD, USER};

/// The token service's port on the registry's host.
pub const TOKEN_PORT: u16 = 5001;
pub const SERVICE: &str = "gantry-lab";
pub const ISSUER: &str = "gantry-lab-issuer";

/// The lab's CA, the registry's certificate (for its lab address and loopback), and the
/// token signer's key and self-signed certificate.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub signer_cert: PathBuf,
    signer_key: PathBuf,
    dir: PathBuf,
}

fn openssl(args: &[&str]) {
    run("openssl", args).unwrap();
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A new RSA key and a certificate for it that it signed itself.
fn self_signed(subject: &str, key: &Path, cert: &Path) {
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        subject,
        "-keyout",
        path(key),
        "-out",
        path(cert),
    ]);
}

impl Pki {
    /// Made with the openssl command line in `dir`; the registry's certificate names
    /// the IP addresses `ips`.
    pub fn new(dir: &Path, ips: &[&str]) -> Pki {
        let at = |name: &str| dir.join(name);
        let pki = Pki {
            ca: at("ca.pem"),
            cert: at("registry.pem"),
            key: at("registry.key"),
            signer_cert: at("signer.pem"),
            signer_key: at("signer.key"),
            dir: dir.to_owned(),
        };
        let ca_key = at("ca.key");
        self_signed("/CN=gantry-lab-ca", &ca_key, &pki.ca);
        let csr = at("registry.csr");
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=gantry-lab-registry",
            "-keyout",
            path(&pki.key),
            "-out",
            path(&csr),
        ]);
        let ext = at("san.ext");
        let names: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
        std::fs::write(&ext, format!("subjectAltName={}\n", names.join(","))).unwrap();
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            path(&csr),
            "-CA",
            path(&pki.ca),
            "-CAkey",
            path(&ca_key),
            "-CAcreateserial",
            "-extfile",
            path(&ext),
            "-out",
            path(&pki.cert),
        ]);
        self_signed(
            "/CN=gantry-lab-token-signer",
            &pki.signer_key,
            &pki.signer_cert,
        );
        pki
    }

    /// `file` (PEM) as DER, through openssl.
    fn der(&self, file: &Path, key: bool) -> Vec<u8> {
        let out = self.dir.join(format!(
            "{}.der",
            file.file_name().unwrap().to_str().unwrap()
        ));
        if key {
            openssl(&[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                path(file),
                "-outform",
                "der",
                "-out",
                path(&out),
            ]);
        } else {
            openssl(&[
                "x509",
                "-in",
                path(file),
                "-outform",
                "der",
                "-out",
                path(&out),
            ]);
        }
        std::fs::read(out).unwrap()
    }
}

/// Signs tokens as the registry's issuer.
pub struct Signer {
    key: ring::signature::RsaKeyPair,
    /// The signing certificate, base64 (standard) DER, for `x5c`.
    x5c: String,
    /// Tokens last this long.
    pub ttl: Duration,
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Signer {
    pub fn new(pki: &Pki, ttl: Duration) -> Signer {
        let key = ring::signature::RsaKeyPair::from_pkcs8(&pki.der(&pki.signer_key, true))
            .expect("the signer's key");
        let x5c =
            base64::engine::general_purpose::STANDARD.encode(pki.der(&pki.signer_cert, false));
        Signer { key, x5c, ttl }
    }

    /// A JWT granting `actions` on `repository` (none when `actions` is empty).
    pub fn token(&self, subject: &str, repository: &str, actions: &[&str]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        static ID: AtomicUsize = AtomicUsize::new(0);
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]});
        let access: Vec<_> = (!actions.is_empty())
            .then(|| serde_json::json!({"type": "repository", "name": repository, "actions": actions}))
            .into_iter()
            .collect();
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": subject, "aud": SERVICE,
            "exp": now + self.ttl.as_secs(), "nbf": now - 10, "iat": now,
            "jti": format!("lab-{}", ID.fetch_add(1, Ordering::Relaxed)),
            "access": access,
        });
        let signed = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signed.as_bytes(),
                &mut signature,
            )
            .unwrap();
        format!("{signed}.{}", b64url(&signature))
    }
}

/// What the token service was asked.
#[derive(Default)]
pub struct TokenCounts {
    /// Requests with the right credentials: tokens that grant a pull.
    pub granted: AtomicUsize,
    /// Requests with wrong credentials, answered 401.
    pub refused: AtomicUsize,
    /// Requests without credentials, answered with a token that grants nothing.
    pub anonymous: AtomicUsize,
}

/// The token service, stopped when dropped.
pub struct TokenService {
    pub counts: Arc<TokenCounts>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TokenService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl TokenService {
    /// Serves `https://<registry>:TOKEN_PORT/token` in the namespace `ns`.
    pub fn start(ns: &str, pki: &Pki, signer: Signer) -> TokenService {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![pki.der(&pki.cert, false).into()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(pki.der(&pki.key, true).into()),
            )
            .unwrap();
        let config = Arc::new(config);
        let counts = Arc::new(TokenCounts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let namespace = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        let (bound_tx, bound) = std::sync::mpsc::channel();
        let thread = {
            let (counts, stop) = (counts.clone(), stop.clone());
            std::thread::spawn(move || {
                // This thread, and the socket it makes, live in the registry's namespace.
                // SAFETY: setns on a descriptor this thread owns; it changes only this
                // thread's network namespace.
                let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
                let listener = TcpListener::bind(("0.0.0.0", TOKEN_PORT)).unwrap();
                listener.set_nonblocking(true).unwrap();
                bound_tx.send(()).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((tcp, _)) => {
                            let _ = tcp.set_nonblocking(false);
                            let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                            answer(tcp, &config, &signer, &counts);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        bound.recv_timeout(Duration::from_secs(5)).unwrap();
        TokenService {
            counts,
            stop,
            thread: Some(thread),
        }
    }
}

/// One request on one connection: `GET /token?scope=repository:NAME:pull&service=…`.
fn answer(
    tcp: std::net::TcpStream,
    config: &Arc<rustls::ServerConfig>,
    signer: &Signer,
    counts: &TokenCounts,
) {
    let Ok(connection) = rustls::ServerConnection::new(config.clone()) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 << 10 {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request).into_owned();
    let target = text.split_whitespace().nth(1).unwrap_or_default();
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let repository = query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("scope="))
        .map(|scope| scope.replace("%3A", ":").replace("%3a", ":"))
        .find_map(|scope| {
            let mut parts = scope.split(':');
            (parts.next() == Some("repository")).then(|| parts.next().map(str::to_owned))?
        })
        .unwrap_or_default();
    let basic = text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        (name.eq_ignore_ascii_case("authorization"))
            .then(|| value.strip_prefix("Basic "))
            .flatten()
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    });
    let right = format!("{USER}:{PASSWORD}");
    let (status, body) = match basic {
        Some(pair) if pair == right => {
            counts.granted.fetch_add(1, Ordering::SeqCst);
            (200, signer.token(USER, &repository, &["pull"]))
        }
        Some(_) => {
            counts.refused.fetch_add(1, Ordering::SeqCst);
            (401, String::new())
        }
        None => {
            counts.anonymous.fetch_add(1, Ordering::SeqCst);
            (200, signer.token("", &repository, &[]))
        }
    };
    let json = if status == 200 {
        serde_json::json!({"token": body, "access_token": body, "expires_in": signer.ttl.as_secs()})
            .to_string()
    } else {
        r#"{"details":"wrong credentials"}"#.to_owned()
    };
    let reason = if status == 200 { "OK" } else { "Unauthorized" };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    );
    let _ = tls.write_all(response.as_bytes());
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

//! A lab of network namespaces for the agent: each node an `agent` process in a
//! namespace of its own, joined by a bridge in another; the origin a real registry
//! (CNCF Distribution) in a third, its egress rate-limited with a `tbf` qdisc so that a
//! pull takes seconds. Origin pulls are counted from the registry's access log. Used by
//! `agent/tests/agent_cluster.rs` and `agent/examples/coldstart_bench.rs`; needs root, `ip netns`,
//! `docker-registry`, `htpasswd` and `openssl`.
#![allow(dead_code)]

pub mod containerd;
pub mod tokens;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{mpsc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine as _;
use gantry_coord::{hrw, Digest, Member};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// A child process that is killed when the lab ends, however it ends.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `gantry-agent` binary of the same build profile: cargo's own for the tests; for the
/// benchmark (an example), the one beside it, built first if missing.
pub fn agent_binary() -> PathBuf {
    if let Some(built) = option_env!("CARGO_BIN_EXE_gantry-agent") {
        return PathBuf::from(built);
    }
    // Built once per run (a stale binary would measure old code), before any agent
    // starts.
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let mut path = std::env::current_exe().unwrap();
            path.pop();
            if path.ends_with("deps") || path.ends_with("examples") {
                path.pop();
            }
            path.push(format!("gantry-agent{}", std::env::consts::EXE_SUFFIX));
            let mut build = Command::new(env!("CARGO"));
            build.args(["build", "-p", "gantry-agent", "--bin", "gantry-agent"]);
            if !cfg!(debug_assertions) {
                build.arg("--release");
            }
            assert!(build.status().unwrap().success(), "building the agent");
            path
        })
        .clone()
}

/// One scenario at a time: each starts a registry and six or more agents.
pub static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub const REGISTRY_HOST: u8 = 254;
pub const REPOSITORY: &str = "demo";
/// The registry's egress: 40 Mbit/s, so one copy of the image takes a few seconds.
pub const ORIGIN_RATE: &str = "40mbit";
/// The longest a packet waits in a shaped node's uplink queue.
pub const NODE_QUEUE: &str = "20ms";
pub const USER: &str = "gantry";
pub const PASSWORD: &str = "s3cret-pass";

pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether this machine can run the scenarios; under `CI=true` it must.
pub fn lab_available() -> bool {
    let missing = if run("id", &["-u"]).map(|u| u.trim() == "0") != Ok(true) {
        Some("not root")
    } else if run("docker-registry", &["--version"]).is_err() {
        Some("docker-registry is not installed")
    } else if run("htpasswd", &["-nbB", "a", "b"]).is_err() {
        Some("htpasswd (apache2-utils) is not installed")
    } else if run("openssl", &["version"]).is_err() {
        Some("openssl is not installed")
    } else {
        let probe = format!("gcprobe{}", std::process::id());
        let ok = run("ip", &["netns", "add", &probe]).is_ok();
        let _ = run("ip", &["netns", "del", &probe]);
        (!ok).then_some("network namespaces are not available")
    };
    match missing {
        None => true,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("the multi-host scenarios must run under CI=true, but: {why}")
        }
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// This scenario's turn, once the one before has ended; `None` when the machine cannot
/// run scenarios (and not under CI).
pub fn lab_turn() -> Option<std::sync::MutexGuard<'static, ()>> {
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    lab_available().then_some(turn)
}

/// Namespaces, processes and files of one scenario, all removed when it ends, however it
/// ends.
pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    pub namespaces: Vec<String>,
    pub processes: Vec<Killed>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.processes.clear();
        if std::env::var_os("GANTRY_KEEP_LAB").is_some() {
            eprintln!("kept {}", self.dir.display());
            for ns in self.namespaces.iter().rev() {
                let _ = run("ip", &["netns", "del", ns]);
            }
            return;
        }
        for ns in self.namespaces.iter().rev() {
            let _ = run("ip", &["netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn ip_of(host: u8) -> String {
    format!("10.231.0.{host}")
}

impl Lab {
    pub fn new(name: &str) -> Lab {
        let prefix = format!("gc{}{name}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut lab = Lab {
            prefix,
            dir,
            namespaces: Vec::new(),
            processes: Vec::new(),
        };
        let switch = lab.namespace("sw");
        lab.ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        lab.ip(&["-n", &switch, "link", "set", "br0", "up"]);
        lab
    }

    pub fn ip(&self, args: &[&str]) {
        run("ip", args).unwrap();
    }

    pub fn namespace(&mut self, name: &str) -> String {
        let ns = format!("{}{name}", self.prefix);
        self.ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        self.ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A host on the bridge with address `ip_of(host)`.
    pub fn host(&mut self, host: u8) -> String {
        let ns = self.namespace(&format!("h{host}"));
        let switch = format!("{}sw", self.prefix);
        let port = format!("p{host}");
        self.ip(&[
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
            &switch,
        ]);
        self.ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"]);
        let addr = format!("{}/24", ip_of(host));
        self.ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
        self.ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ns
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Limits the egress of the namespace's `eth0` to `rate` (a `tc` rate, e.g. `40mbit`),
/// with a queue of at most `queue` (a `tc` time: how long a packet may wait).
pub fn shape(ns: &str, rate: &str, queue: &str) {
    run(
        "ip",
        &[
            "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
            "burst", "64kb", "latency", queue,
        ],
    )
    .unwrap();
}

/// The image pushed into the registry: manifest, config and layers, with their bytes.
pub struct Image {
    pub manifest: Digest,
    pub config: Digest,
    pub layers: Vec<Digest>,
    pub bytes: HashMap<Digest, Vec<u8>>,
}

impl Image {
    pub fn largest_layer(&self) -> &Digest {
        self.layers
            .iter()
            .max_by_key(|d| self.bytes[*d].len())
            .unwrap()
    }

    pub fn all(&self) -> Vec<&Digest> {
        std::iter::once(&self.manifest)
            .chain(std::iter::once(&self.config))
            .chain(&self.layers)
            .collect()
    }
}

pub fn digest_of(bytes: &[u8]) -> Digest {
    Digest::parse(&format!("sha256:{:x}", Sha256::digest(bytes))).unwrap()
}

/// Random bytes from a seeded generator: no two layers alike, nothing to download.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// How the registry is reached, and whom it lets in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Plain HTTP, anyone.
    Open,
    /// Plain HTTP, basic auth (htpasswd).
    Basic,
    /// HTTPS with a certificate from the lab's CA, anyone.
    Https,
    /// HTTPS, basic auth.
    HttpsBasic,
    /// HTTPS, bearer tokens from the lab's token service (which checks basic
    /// credentials).
    Token,
}

impl Access {
    pub fn tls(self) -> bool {
        matches!(self, Access::Https | Access::HttpsBasic | Access::Token)
    }

    /// Whether a pull needs credentials.
    pub fn private(self) -> bool {
        matches!(self, Access::Basic | Access::HttpsBasic | Access::Token)
    }
}

pub struct Registry {
    pub ns: String,
    pub log: PathBuf,
    pub access: Access,
    /// The lab's CA and certificates, over HTTPS.
    pub pki: Option<tokens::Pki>,
    /// Signs the lab's own tokens (pushes), in token mode.
    signer: Option<tokens::Signer>,
    /// The token service, in token mode.
    pub tokens: Option<tokens::TokenService>,
}

impl Registry {
    pub fn start(lab: &mut Lab, access: Access) -> Registry {
        let ns = lab.host(REGISTRY_HOST);
        let pki = access
            .tls()
            .then(|| tokens::Pki::new(&lab.dir, &[&ip_of(REGISTRY_HOST), "127.0.0.1"]));
        let storage = lab.path("registry");
        std::fs::create_dir_all(&storage).unwrap();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 0.0.0.0:5000\n",
            storage.display()
        );
        if let Some(pki) = &pki {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                pki.cert.display(),
                pki.key.display()
            ));
        }
        let (mut signer, mut token_service) = (None, None);
        if access == Access::Token {
            let pki = pki.as_ref().unwrap();
            config.push_str(&format!(
                "auth:\n  token:\n    realm: https://{}:{}/token\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                ip_of(REGISTRY_HOST),
                tokens::TOKEN_PORT,
                tokens::SERVICE,
                tokens::ISSUER,
                pki.signer_cert.display()
            ));
            let ttl = Duration::from_secs(300);
            token_service = Some(tokens::TokenService::start(
                &ns,
                pki,
                tokens::Signer::new(pki, ttl),
            ));
            signer = Some(tokens::Signer::new(pki, ttl));
        }
        if matches!(access, Access::Basic | Access::HttpsBasic) {
            let line = run("htpasswd", &["-nbB", USER, PASSWORD]).unwrap();
            let file = lab.path("htpasswd");
            std::fs::write(&file, line.trim()).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: gantry\n    path: {}\n",
                file.display()
            ));
        }
        let config_path = lab.path("registry.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = lab.path("registry.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "docker-registry", "serve"])
            .arg(&config_path)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(lab.path("registry.err")).unwrap())
            .spawn()
            .unwrap();
        lab.processes.push(Killed(child));
        let registry = Registry {
            ns,
            log,
            access,
            pki,
            signer,
            tokens: token_service,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while registry.status("GET", None, "/v2/") == "000" {
            assert!(Instant::now() < deadline, "the registry did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        registry
    }

    /// The URL agents reach the registry at.
    pub fn url(&self) -> String {
        let scheme = if self.access.tls() { "https" } else { "http" };
        format!("{scheme}://{}:5000", ip_of(REGISTRY_HOST))
    }

    /// curl inside the registry's namespace, over its loopback (not rate-limited).
    pub fn curl(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.ns, "curl", "-s"];
        let credentials = format!("{USER}:{PASSWORD}");
        if matches!(self.access, Access::Basic | Access::HttpsBasic) {
            full.extend(["-u", &credentials]);
        }
        let ca = self.pki.as_ref().map(|p| p.ca.display().to_string());
        if let Some(ca) = &ca {
            full.extend(["--cacert", ca]);
        }
        let bearer = self.signer.as_ref().map(|s| {
            format!(
                "Authorization: Bearer {}",
                s.token("lab", REPOSITORY, &["pull", "push", "delete"])
            )
        });
        if let Some(bearer) = &bearer {
            full.extend(["-H", bearer]);
        }
        let (last, rest) = args.split_last().unwrap();
        full.extend(rest);
        let scheme = if self.access.tls() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:5000{last}");
        full.push(&url);
        run("ip", &full).unwrap_or_default()
    }

    /// The HTTP status of one request; `body` is a file to send as the body.
    pub fn status(
        &self,
        method: &str,
        body: Option<(&str, &std::path::Path)>,
        path: &str,
    ) -> String {
        let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}", "-X", method];
        let (header, data);
        if let Some((content_type, file)) = body {
            header = format!("Content-Type: {content_type}");
            data = format!("@{}", file.display());
            args.extend(["-H", &header, "--data-binary", &data]);
        }
        args.push(path);
        self.curl(&args)
    }

    pub fn push_blob(&self, lab: &Lab, bytes: &[u8]) -> Digest {
        let digest = digest_of(bytes);
        let file = lab.path("upload");
        std::fs::write(&file, bytes).unwrap();
        let location_of = |headers: &str| {
            headers.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .starts_with("location:")
                    .then(|| l[9..].trim().to_owned())
            })
        };
        // A registry just started may refuse the first upload; a few tries, then a reason.
        let mut headers = String::new();
        let mut location = None;
        for _ in 0..20 {
            headers = self.curl(&["-i", "-X", "POST", "/v2/demo/blobs/uploads/"]);
            location = location_of(&headers);
            if location.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let location = location.unwrap_or_else(|| panic!("no upload location: {headers}"));
        let path = location
            .strip_prefix("http://127.0.0.1:5000")
            .or_else(|| location.strip_prefix("https://127.0.0.1:5000"))
            .unwrap_or(&location);
        let separator = if path.contains('?') { '&' } else { '?' };
        let target = format!("{path}{separator}digest={digest}");
        let body = Some(("application/octet-stream", file.as_path()));
        let code = self.status("PUT", body, &target);
        assert_eq!(code, "201", "blob upload");
        digest
    }

    /// Pushes a config and layers of the given sizes, then the manifest naming them.
    pub fn push_image(&self, lab: &Lab, layer_sizes: &[usize]) -> Image {
        let mut bytes = HashMap::new();
        let config_bytes =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
                .to_vec();
        let config = self.push_blob(lab, &config_bytes);
        bytes.insert(config, config_bytes);
        let mut layers = Vec::new();
        for (i, size) in layer_sizes.iter().enumerate() {
            let layer_bytes = random_bytes(*size, i as u64 + 1 + std::process::id() as u64);
            let layer = self.push_blob(lab, &layer_bytes);
            bytes.insert(layer, layer_bytes);
            layers.push(layer);
        }
        let descriptor = |media: &str, d: &Digest, size: usize| serde_json::json!({"mediaType": media, "digest": d.to_string(), "size": size});
        let manifest_bytes = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", &config, bytes[&config].len()),
            "layers": layers.iter().map(|l| descriptor("application/vnd.oci.image.layer.v1.tar", l, bytes[l].len())).collect::<Vec<_>>(),
        }))
        .unwrap();
        let manifest = digest_of(&manifest_bytes);
        let file = lab.path("manifest.json");
        std::fs::write(&file, &manifest_bytes).unwrap();
        let body = Some(("application/vnd.oci.image.manifest.v1+json", file.as_path()));
        let code = self.status("PUT", body, &format!("/v2/demo/manifests/{manifest}"));
        assert_eq!(code, "201", "manifest upload");
        bytes.insert(manifest, manifest_bytes);
        // From now on the origin is slow, as a real upstream is.
        shape(&self.ns, ORIGIN_RATE, "400ms");
        Image {
            manifest,
            config,
            layers,
            bytes,
        }
    }

    pub fn delete_blob(&self, digest: &Digest) {
        let code = self.status("DELETE", None, &format!("/v2/demo/blobs/{digest}"));
        assert_eq!(code, "202", "blob delete");
    }

    /// The GET requests in the access log, read once.
    pub fn gets(&self) -> Gets {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default()
            + &std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default();
        let mut counts = HashMap::new();
        for line in log.lines() {
            let mut parts = line.split('"');
            let (Some(request), Some(rest)) = (parts.nth(1), parts.next()) else {
                continue;
            };
            let Some(path) = request.strip_prefix("GET ") else {
                continue;
            };
            let Some(last) = path
                .split_whitespace()
                .next()
                .and_then(|p| p.rsplit('/').next())
            else {
                continue;
            };
            let status = rest
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            *counts.entry((last.to_owned(), status)).or_insert(0) += 1;
        }
        Gets(counts)
    }
}

/// GET requests by the last segment of their path (a digest) and their status code.
pub struct Gets(HashMap<(String, u16), usize>);

impl Gets {
    /// Requests for `digest`, whatever their answer.
    pub fn requests(&self, digest: &Digest) -> usize {
        self.0
            .iter()
            .filter(|((d, _), _)| d == digest.encode().as_str())
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests for `digest` the origin served: pulls.
    pub fn pulls(&self, digest: &Digest) -> usize {
        self.0.get(&(digest.to_string(), 200)).copied().unwrap_or(0)
    }
}

/// A running agent and what it has printed so far.
pub struct Agent {
    pub index: u8,
    pub ns: String,
    pub store: PathBuf,
    pub events: mpsc::Receiver<(Instant, Value)>,
    pub seen: Vec<Value>,
    /// When its `image` line arrived.
    pub image_at: Option<Instant>,
    pub process: usize,
}

impl Agent {
    /// Waits until `done` holds for what the agent printed, or the deadline passes.
    pub fn wait_for(&mut self, deadline: Instant, done: impl Fn(&[Value]) -> bool) -> bool {
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((at, event)) => {
                    if event["event"] == "image" {
                        self.image_at = Some(at);
                    }
                    self.seen.push(event);
                }
                Err(_) => return false,
            }
        }
        true
    }

    pub fn blobs(&self) -> Vec<&Value> {
        self.seen.iter().filter(|e| e["event"] == "blob").collect()
    }

    pub fn error_for(&self, digest: &Digest) -> Option<&Value> {
        self.seen
            .iter()
            .find(|e| e["event"] == "error" && e["digest"] == digest.encode().as_str())
    }
}

pub fn has_image(events: &[Value]) -> bool {
    events.iter().any(|e| e["event"] == "image")
}

pub struct Cluster {
    pub lab: Lab,
    pub registry: Registry,
    pub image: Image,
    pub keys: Vec<(String, String, PathBuf)>,
    pub agents: Vec<Agent>,
    /// Arguments added to every agent started from now on.
    pub agent_args: Vec<String>,
    /// Whether agents cold-start the image themselves (`--image`); without, they only
    /// serve their mirror.
    pub with_image: bool,
    /// Every node's egress limited to this rate (a `tc` rate), as the origin's is.
    pub node_rate: Option<String>,
    /// Each node's namespace, once made.
    hosts: HashMap<u8, String>,
}

impl Cluster {
    /// A registry with the image and `members` keys; nothing runs yet.
    pub fn new(name: &str, members: u8, access: Access, layer_sizes: &[usize]) -> Cluster {
        let mut lab = Lab::new(name);
        let registry = Registry::start(&mut lab, access);
        let image = registry.push_image(&lab, layer_sizes);
        let mut cluster = Cluster {
            lab,
            registry,
            image,
            keys: Vec::new(),
            agents: Vec::new(),
            agent_args: Vec::new(),
            with_image: true,
            node_rate: None,
            hosts: HashMap::new(),
        };
        for i in 1..=members {
            cluster.keygen(i);
        }
        cluster.write_members("members.json", members);
        cluster
    }

    /// New node ids (HRW ranks by them) and the members file anew, until `wanted` holds
    /// for the cluster's designations (at most fifty tries).
    pub fn rename_until(&mut self, wanted: impl Fn(&Cluster) -> bool) -> bool {
        for attempt in 1..=50 {
            if wanted(self) {
                return true;
            }
            for (i, key) in self.keys.iter_mut().enumerate() {
                key.0 = format!("node-{}-{attempt}", i + 1);
            }
            self.write_members("members.json", self.keys.len() as u8);
        }
        wanted(self)
    }

    pub fn keygen(&mut self, index: u8) {
        let file = self.lab.path(&format!("key{index}"));
        let out = run(
            agent_binary().to_str().unwrap(),
            &["keygen", "--out", file.to_str().unwrap()],
        )
        .unwrap();
        let peer = serde_json::from_str::<Value>(&out).unwrap()["peer_id"]
            .as_str()
            .unwrap()
            .to_owned();
        self.keys.push((format!("node-{index}"), peer, file));
    }

    /// A members file naming the first `count` keys.
    pub fn write_members(&self, name: &str, count: u8) -> PathBuf {
        self.write_members_of(name, &(1..=count).collect::<Vec<u8>>())
    }

    /// A members file naming the nodes `indices`.
    pub fn write_members_of(&self, name: &str, indices: &[u8]) -> PathBuf {
        let entries: Vec<Value> = indices
            .iter()
            .map(|&i| {
                let (node, peer, _) = &self.keys[usize::from(i) - 1];
                serde_json::json!({"node_id": node, "peer_id": peer,
                    "addrs": [format!("/ip4/{}/tcp/4001", ip_of(i))]})
            })
            .collect();
        let path = self.lab.path(name);
        std::fs::write(&path, serde_json::to_vec(&entries).unwrap()).unwrap();
        path
    }

    /// A members file naming only node `index`: it pulls everything from the origin.
    pub fn write_solo(&self, index: u8) -> String {
        let (node, peer, _) = &self.keys[usize::from(index) - 1];
        let entry = serde_json::json!([{"node_id": node, "peer_id": peer,
            "addrs": [format!("/ip4/{}/tcp/4001", ip_of(index))]}]);
        let name = format!("solo{index}.json");
        std::fs::write(self.lab.path(&name), serde_json::to_vec(&entry).unwrap()).unwrap();
        name
    }

    /// The node HRW designates to pull `digest`, among the first `count` keys.
    pub fn designated(&self, digest: &Digest, count: u8) -> u8 {
        let members: Vec<Member> = self.keys[..usize::from(count)]
            .iter()
            .map(|(node, peer, _)| Member::new(node.as_str(), Some(peer.parse().unwrap())))
            .collect();
        let top = hrw::top_k(&members, digest, 1)[0].id.to_string();
        self.keys.iter().position(|(n, _, _)| *n == top).unwrap() as u8 + 1
    }

    /// Node `index`'s namespace, made (and shaped) on first use; a restart reuses it.
    pub fn host(&mut self, index: u8) -> String {
        if let Some(ns) = self.hosts.get(&index) {
            return ns.clone();
        }
        let ns = self.lab.host(index);
        // A node's uplink queues as a switch port or a cloud NIC does, briefly: one that
        // uploads at its link's rate still gets the acknowledgements of its own
        // downloads out.
        if let Some(rate) = &self.node_rate {
            shape(&ns, rate, NODE_QUEUE);
        }
        self.hosts.insert(index, ns.clone());
        ns
    }

    /// Starts node `index`'s agent; a restart reuses its namespace (and store).
    pub fn start(&mut self, index: u8, members_file: &str, credentials: Option<&str>) {
        let ns = self.host(index);
        let (node_id, _, key) = self.keys[usize::from(index) - 1].clone();
        let store = self.lab.path(&format!("store{index}"));
        let listen = format!("/ip4/{}/tcp/4001", ip_of(index));
        let origin = self.registry.url();
        let image = format!("{REPOSITORY}@{}", self.image.manifest);
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &ns])
            .arg(agent_binary())
            .args(["run", "--key"])
            .arg(&key)
            .args(["--node-id", &node_id, "--listen", &listen, "--members"])
            .arg(self.lab.path(members_file))
            .args(["--origin", &origin, "--store"])
            .arg(&store)
            .args(
                self.registry
                    .pki
                    .as_ref()
                    .map(|p| ["--origin-ca".into(), p.ca.clone().into_os_string()])
                    .into_iter()
                    .flatten(),
            )
            // Short enough that a takeover comes within the test, long enough that every
            // layer at once (18 MiB at 40 Mbit/s, about 4 s) is not taken for a stall.
            .args(["--stall-manifest", "2s", "--stall-layer-floor", "6s"])
            .args(
                self.with_image
                    .then_some(["--image", &image])
                    .into_iter()
                    .flatten(),
            )
            .args(&self.agent_args)
            .env(
                "RUST_LOG",
                std::env::var("GANTRY_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.lab.path(&format!("agent{index}.err"))).unwrap());
        // Over HTTPS, as a docker config.json (what a dockerconfigjson secret mounts);
        // over plain HTTP, from the environment.
        command.env_remove("AGENT_ORIGIN_AUTH");
        match credentials {
            Some(c) if self.registry.access.tls() => {
                let file = self.lab.path(&format!("config{index}.json"));
                let auth = base64::engine::general_purpose::STANDARD.encode(c);
                let key = format!("{}:5000", ip_of(REGISTRY_HOST));
                let json = serde_json::json!({"auths": {key: {"auth": auth}}});
                std::fs::write(&file, json.to_string()).unwrap();
                command.arg("--credentials").arg(file);
            }
            Some(c) => {
                command.env("AGENT_ORIGIN_AUTH", c);
            }
            None => {}
        };
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    if tx.send((Instant::now(), value)).is_err() {
                        return;
                    }
                }
            }
        });
        self.lab.processes.push(Killed(child));
        self.agents.push(Agent {
            index,
            ns,
            store,
            events,
            seen: Vec::new(),
            image_at: None,
            process: self.lab.processes.len() - 1,
        });
    }

    /// Starts nodes 1 to `count` with one members file and no credentials.
    pub fn start_nodes(&mut self, count: u8, members_file: &str) {
        for i in 1..=count {
            self.start(i, members_file, None);
        }
    }

    /// Waits until nodes 1 to `count` printed `image`.
    pub fn wait_first(&mut self, count: u8, within: Duration) {
        let all: Vec<u8> = (1..=count).collect();
        self.wait_images(&all, within);
    }

    /// The agent of node `index`: the one started last, after a restart.
    pub fn agent(&mut self, index: u8) -> &mut Agent {
        self.agents
            .iter_mut()
            .rev()
            .find(|a| a.index == index)
            .unwrap()
    }

    /// Waits until every listed agent printed `image`; panics with their stderr if not.
    pub fn wait_images(&mut self, indices: &[u8], within: Duration) {
        let deadline = Instant::now() + within;
        for &i in indices {
            if !self.agent(i).wait_for(deadline, has_image) {
                let err = std::fs::read_to_string(self.lab.path(&format!("agent{i}.err")))
                    .unwrap_or_default();
                let tail: Vec<&str> = err.lines().rev().take(30).collect();
                panic!(
                    "node-{i} did not finish the image: {:?}\n{}",
                    self.agent(i).seen,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }

    /// Every blob of the image is in the agent's store, with the right bytes.
    pub fn assert_store_complete(&self, index: u8, except: &[&Digest]) {
        let agent = self.agents.iter().find(|a| a.index == index).unwrap();
        for digest in self.image.all() {
            if except.contains(&digest) {
                continue;
            }
            let bytes = std::fs::read(agent.store.join("sha256").join(digest.encode().hex()))
                .unwrap_or_else(|_| panic!("node-{index} lacks {digest}"));
            assert_eq!(
                &digest_of(&bytes),
                digest,
                "node-{index}: bytes of {digest}"
            );
        }
    }

    /// Sends SIGTERM and returns the exit code, if the agent exits within five seconds.
    pub fn terminate(&mut self, index: u8) -> Option<i32> {
        let process = self.agent(index).process;
        let child = &mut self.lab.processes[process].0;
        run("kill", &["-TERM", &child.id().to_string()]).ok()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill(&mut self, index: u8) {
        let process = self.agent(index).process;
        let _ = self.lab.processes[process].0.kill();
    }

    pub fn pulls(&self) -> Vec<(String, usize)> {
        let gets = self.registry.gets();
        self.image
            .all()
            .into_iter()
            .map(|d| (d.to_string(), gets.pulls(d)))
            .collect()
    }
}

//! A real containerd per node namespace (its own root, state and socket, the CRI plugin
//! off, the native snapshotter), pulling through that node's agent as `hosts.toml` says,
//! and an OCI index of two platforms with real gzip tar layers to pull.

use std::{path::PathBuf, process::Command, time::Duration};

use gantry_coord::Digest;

use super::{
    digest_of, ip_of, random_bytes, run, Killed, Lab, Registry, REGISTRY_HOST, REPOSITORY,
};

/// The tag the index is pushed under.
pub const TAG: &str = "v1";

/// An image index and what it names, per platform.
pub struct OciImage {
    pub index: Digest,
    /// (architecture, manifest, config, layers)
    pub platforms: Vec<(String, Digest, Digest, Vec<Digest>)>,
    /// The sizes of what a linux/amd64 pull fetches: index, manifest, config, layers.
    pub sizes: Vec<u64>,
}

impl OciImage {
    /// The bytes a linux/amd64 pull fetches.
    pub fn amd64_bytes(&self) -> u64 {
        self.sizes.iter().sum()
    }

    /// What a pull for linux/amd64 fetches by digest: the index, that manifest, its
    /// config and layers.
    pub fn amd64_objects(&self) -> Vec<Digest> {
        let (_, manifest, config, layers) = &self.platforms[0];
        let mut all = vec![self.index, *manifest, *config];
        all.extend(layers);
        all
    }

    /// `host:port/repository:tag`.
    pub fn reference(&self) -> String {
        format!("{}:5000/{REPOSITORY}:{TAG}", ip_of(REGISTRY_HOST))
    }
}

/// Whether containerd and ctr are installed.
pub fn available() -> bool {
    run("containerd", &["--version"]).is_ok() && run("ctr", &["--version"]).is_ok()
}

/// A gzip tar of a directory of `files` random files of `size` bytes: (its diff id, the
/// compressed bytes).
fn layer(lab: &Lab, name: &str, files: usize, size: usize, seed: u64) -> (Digest, Vec<u8>) {
    let dir = lab.path(&format!("layer-{name}"));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    for i in 0..files {
        let bytes = random_bytes(size, seed * 100 + i as u64);
        std::fs::write(dir.join("data").join(format!("{name}-{i}.bin")), bytes).unwrap();
    }
    let tar = lab.path(&format!("layer-{name}.tar"));
    run(
        "tar",
        &[
            "-C",
            dir.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            "data",
        ],
    )
    .unwrap();
    let uncompressed = std::fs::read(&tar).unwrap();
    run("gzip", &["-n", "-f", tar.to_str().unwrap()]).unwrap();
    let compressed = std::fs::read(tar.with_extension("tar.gz")).unwrap();
    (digest_of(&uncompressed), compressed)
}

impl Registry {
    /// Pushes an OCI index of linux/amd64 and linux/arm64 images, each a config and two
    /// gzip tar layers (`small` and `large` bytes of files), and tags it [`TAG`].
    pub fn push_index(&self, lab: &Lab, small: usize, large: usize) -> OciImage {
        let mut platforms = Vec::new();
        let mut entries = Vec::new();
        let mut sizes = Vec::new();
        for (n, arch) in ["amd64", "arm64"].into_iter().enumerate() {
            let seed = 1000 + n as u64 * 10 + u64::from(std::process::id() % 1000);
            let (diff_a, gz_a) = layer(lab, &format!("{arch}-a"), 2, small / 2, seed);
            let (diff_b, gz_b) = layer(lab, &format!("{arch}-b"), 3, large / 3, seed + 1);
            let a = self.push_blob(lab, &gz_a);
            let b = self.push_blob(lab, &gz_b);
            let config_bytes = serde_json::to_vec(&serde_json::json!({
                "architecture": arch, "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [diff_a.to_string(), diff_b.to_string()]},
            }))
            .unwrap();
            let config = self.push_blob(lab, &config_bytes);
            let descriptor = |media: &str, d: &Digest, size: usize| serde_json::json!({"mediaType": media, "digest": d.to_string(), "size": size});
            let manifest_bytes = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": descriptor("application/vnd.oci.image.config.v1+json", &config, config_bytes.len()),
                "layers": [
                    descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &a, gz_a.len()),
                    descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &b, gz_b.len()),
                ],
            }))
            .unwrap();
            let manifest = self.put_manifest(
                lab,
                &manifest_bytes,
                "application/vnd.oci.image.manifest.v1+json",
                None,
            );
            entries.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest.to_string(), "size": manifest_bytes.len(),
                "platform": {"architecture": arch, "os": "linux"},
            }));
            if n == 0 {
                sizes.extend([
                    manifest_bytes.len(),
                    config_bytes.len(),
                    gz_a.len(),
                    gz_b.len(),
                ]);
            }
            platforms.push((arch.to_owned(), manifest, config, vec![a, b]));
        }
        let index_bytes = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }))
        .unwrap();
        let index = self.put_manifest(
            lab,
            &index_bytes,
            "application/vnd.oci.image.index.v1+json",
            Some(TAG),
        );
        sizes.push(index_bytes.len());
        OciImage {
            index,
            platforms,
            sizes: sizes.into_iter().map(|s| s as u64).collect(),
        }
    }

    /// PUTs a manifest by digest (and under `tag`); returns its digest.
    fn put_manifest(&self, lab: &Lab, bytes: &[u8], media: &str, tag: Option<&str>) -> Digest {
        let digest = digest_of(bytes);
        let file = lab.path("manifest-upload.json");
        std::fs::write(&file, bytes).unwrap();
        let references = [Some(digest.to_string()), tag.map(str::to_owned)];
        for reference in references.into_iter().flatten() {
            let path = format!("/v2/{REPOSITORY}/manifests/{reference}");
            let code = self.status("PUT", Some((media, file.as_path())), &path);
            assert_eq!(code, "201", "manifest upload {reference}");
        }
        digest
    }
}

/// One node's containerd.
pub struct Containerd {
    pub ns: String,
    pub socket: PathBuf,
    pub hosts: PathBuf,
    pub log: PathBuf,
    /// The origin as hosts.toml names it, and the CA it is trusted by over HTTPS.
    origin: (String, Option<PathBuf>),
}

impl Containerd {
    /// Starts containerd in `ns`, with a hosts.toml that sends by-digest requests for the
    /// registry to the agent's mirror first, and tag resolution to the origin (over
    /// HTTPS when `registry` is, trusting the lab's CA).
    pub fn start(lab: &mut Lab, ns: &str, index: u8, registry: &super::Registry) -> Containerd {
        let dir = lab.path(&format!("containerd{index}"));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n\
                 [ttrpc]\n  address = \"{sock}.ttrpc\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display(),
            ),
        )
        .unwrap();
        let origin = (registry.url(), registry.pki.as_ref().map(|p| p.ca.clone()));
        let server = Containerd::server(&origin);
        let registry = format!("{}:5000", ip_of(REGISTRY_HOST));
        let hosts = dir.join("certs.d");
        std::fs::create_dir_all(hosts.join(&registry)).unwrap();
        std::fs::write(
            hosts.join(&registry).join("hosts.toml"),
            format!(
                "{server}\n[host.\"http://127.0.0.1:5001\"]\n  \
                 capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
        let log = dir.join("containerd.log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "containerd", "--config"])
            .arg(&config)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("containerd.err")).unwrap())
            .spawn()
            .unwrap();
        lab.processes.push(Killed(child));
        let containerd = Containerd {
            ns: ns.to_owned(),
            socket,
            hosts,
            log,
            origin,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while containerd.ctr(&["version"]).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "containerd in {ns} did not start: {}",
                std::fs::read_to_string(dir.join("containerd.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        containerd
    }

    /// The `server` line for the origin, and its `ca` over HTTPS.
    fn server((url, ca): &(String, Option<PathBuf>)) -> String {
        match ca {
            Some(ca) => format!("server = \"{url}\"\nca = \"{}\"\n", ca.display()),
            None => format!("server = \"{url}\"\n"),
        }
    }

    /// `ctr` against this containerd, in its namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let socket = self.socket.to_string_lossy().into_owned();
        let mut full = vec!["netns", "exec", &self.ns, "ctr", "--address", &socket];
        full.extend(args);
        run("ip", &full)
    }

    /// Pulls (and unpacks) `reference` through the hosts directory.
    pub fn pull(&self, reference: &str) -> Result<String, String> {
        let hosts = self.hosts.to_string_lossy().into_owned();
        self.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            "native",
            reference,
        ])
    }

    /// Pulls `reference` straight from the origin, as containerd does without a mirror.
    pub fn pull_direct(&self, reference: &str) -> Result<String, String> {
        let registry = reference.split('/').next().unwrap_or_default();
        let direct = self.hosts.with_file_name("certs-direct");
        std::fs::create_dir_all(direct.join(registry)).unwrap();
        std::fs::write(
            direct.join(registry).join("hosts.toml"),
            format!(
                "{}\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{}",
                Containerd::server(&self.origin),
                self.origin.0,
                self.origin
                    .1
                    .as_ref()
                    .map_or(String::new(), |ca| format!("  ca = \"{}\"\n", ca.display())),
            ),
        )
        .unwrap();
        let hosts = direct.to_string_lossy().into_owned();
        self.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            "native",
            reference,
        ])
    }

    /// Whether the image is there, every blob of it present (containerd checked each
    /// digest as it wrote it).
    pub fn has_image(&self, reference: &str) -> bool {
        self.ctr(&["images", "check"]).is_ok_and(|out| {
            out.lines()
                .any(|l| l.starts_with(reference) && l.contains("complete"))
        })
    }

    /// Forgets the image and every blob it stored, as a node that lost its content does.
    pub fn forget(&self, reference: &str) {
        let _ = self.ctr(&["images", "rm", "--sync", reference]);
        if let Ok(out) = self.ctr(&["content", "ls", "-q"]) {
            for digest in out.lines().filter(|l| !l.is_empty()) {
                let _ = self.ctr(&["content", "rm", digest]);
            }
        }
    }
}

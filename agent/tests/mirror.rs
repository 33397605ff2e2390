//! The agent's registry mirror, asked as containerd asks it, in the namespace lab: by
//! digest with `?ns=`, `HEAD`, `Range`, media types, tags, and malformed requests; and a
//! blob the node lacks, obtained through its members while the request waits.

mod lab;

use std::time::Duration;

use lab::{digest_of, ip_of, lab_turn, run, Access, Cluster, REGISTRY_HOST, REPOSITORY};

/// Status, headers and body of one request to the mirror of the agent in `ns`.
fn ask(ns: &str, method: &str, path: &str, extra: &[&str]) -> (u16, String, Vec<u8>) {
    let headers = format!("/tmp/gantry-mirror-headers-{ns}");
    let body = format!("/tmp/gantry-mirror-body-{ns}");
    let url = format!("http://127.0.0.1:5001{path}");
    let mut args = vec!["netns", "exec", ns, "curl", "-s", "-g", "--path-as-is"];
    args.extend(["-D", &headers, "-o", &body, "-w", "%{http_code}"]);
    if method == "HEAD" {
        args.push("-I");
    } else {
        args.extend(["-X", method]);
    }
    args.extend(extra);
    args.push(&url);
    let code = run("ip", &args).unwrap_or_default();
    let head = std::fs::read_to_string(&headers).unwrap_or_default();
    let bytes = std::fs::read(&body).unwrap_or_default();
    let _ = std::fs::remove_file(&headers);
    let _ = std::fs::remove_file(&body);
    (code.trim().parse().unwrap_or(0), head.to_lowercase(), bytes)
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn the_mirror_answers_as_a_registry_does_and_obtains_what_it_lacks() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    let mut cluster = Cluster::new("mirror", 3, Access::Open, &[1 << 20, 3 << 20]);
    cluster.start_nodes(3, "members.json");
    cluster.wait_first(3, Duration::from_secs(90));
    let ns = cluster.agent(1).ns.clone();
    let upstream = format!("{}:5000", ip_of(REGISTRY_HOST));
    let q = format!("?ns={upstream}");
    let manifest = cluster.image.manifest;
    let layer = cluster.image.layers[0];
    let layer_bytes = cluster.image.bytes[&layer].clone();

    assert_eq!(ask(&ns, "GET", "/v2/", &[]).0, 200);
    assert_eq!(ask(&ns, "GET", "/healthz", &[]).0, 200);
    assert_eq!(ask(&ns, "GET", "/readyz", &[]).0, 200);
    // A manifest by digest: the origin's media type, its digest and length.
    let path = format!("/v2/{REPOSITORY}/manifests/{manifest}{q}");
    let (code, head, body) = ask(&ns, "GET", &path, &[]);
    assert_eq!(code, 200, "{head}");
    assert!(
        head.contains("content-type: application/vnd.oci.image.manifest.v1+json"),
        "{head}"
    );
    assert!(
        head.contains(&format!("docker-content-digest: {manifest}")),
        "{head}"
    );
    assert_eq!(digest_of(&body), manifest);
    let (code, head, body) = ask(&ns, "HEAD", &path, &[]);
    assert_eq!(code, 200);
    assert!(head.contains(&format!(
        "content-length: {}",
        cluster.image.bytes[&manifest].len()
    )));
    // curl writes the head itself where a body would go: no manifest follows it.
    assert!(!String::from_utf8_lossy(&body).contains("schemaVersion"));
    // A blob, whole and by range.
    let blob = format!("/v2/{REPOSITORY}/blobs/{layer}{q}");
    let (code, _, body) = ask(&ns, "GET", &blob, &[]);
    assert_eq!((code, digest_of(&body)), (200, layer));
    let (code, head, body) = ask(&ns, "GET", &blob, &["-H", "Range: bytes=10-19"]);
    assert_eq!(code, 206);
    assert!(
        head.contains(&format!("content-range: bytes 10-19/{}", layer_bytes.len())),
        "{head}"
    );
    assert_eq!(body, layer_bytes[10..20]);
    let past = format!("Range: bytes={}-", layer_bytes.len());
    assert_eq!(ask(&ns, "GET", &blob, &["-H", &past]).0, 416);
    // Tags resolve at the origin; nothing malformed or foreign is served.
    let tag = format!("/v2/{REPOSITORY}/manifests/latest{q}");
    assert_eq!(ask(&ns, "GET", &tag, &[]).0, 503);
    let foreign = format!("/v2/{REPOSITORY}/blobs/{layer}?ns=registry.example.com");
    assert_eq!(ask(&ns, "GET", &foreign, &[]).0, 404);
    for bad in [
        format!("/v2/{REPOSITORY}/blobs/sha256:1234{q}"),
        format!("/v2/Bad_Name/blobs/{layer}{q}"),
        format!("/v2/../../etc/blobs/{layer}{q}"),
    ] {
        let code = ask(&ns, "GET", &bad, &[]).0;
        assert!((400..500).contains(&code), "{bad}: {code}");
    }
    assert_eq!(ask(&ns, "GET", "/v2/../../etc/passwd", &[]).0, 404);
    assert_eq!(ask(&ns, "POST", &blob, &[]).0, 405);

    // A blob this node lost: the request waits while members serve it, not the origin.
    let before = cluster.pulls();
    std::fs::remove_file(
        cluster
            .agent(1)
            .store
            .join("sha256")
            .join(layer.encode().hex()),
    )
    .unwrap();
    let (code, _, body) = ask(&ns, "GET", &blob, &[]);
    assert_eq!((code, digest_of(&body)), (200, layer));
    assert_eq!(cluster.pulls(), before, "the origin served it again");
}

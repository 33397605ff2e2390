//! Whether this machine can run the agent's namespace lab: root, network namespaces,
//! CNCF Distribution, htpasswd and openssl (`cfg(lab)`), and containerd too (`cfg(containerd_lab)`).
//! Scenarios a machine cannot run are reported as ignored, with what they need; under
//! `CI=true` they always run, and fail if the machine lacks something.

use std::process::Command;

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(lab)");
    println!("cargo::rustc-check-cfg=cfg(containerd_lab)");
    println!("cargo::rerun-if-env-changed=CI");
    // Asked again when a tool is installed or removed: where packages put them. Not at
    // every build, which would rebuild the agent every time.
    for dir in ["/usr/bin", "/usr/sbin"] {
        println!("cargo::rerun-if-changed={dir}");
    }
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let lab = root
        && succeeds("ip", &["netns", "list"])
        && succeeds("docker-registry", &["--version"])
        && succeeds("htpasswd", &["-nbB", "a", "b"])
        && succeeds("openssl", &["version"]);
    let containerd = succeeds("containerd", &["--version"]) && succeeds("ctr", &["--version"]);
    if ci || lab {
        println!("cargo::rustc-cfg=lab");
    }
    if ci || (lab && containerd) {
        println!("cargo::rustc-cfg=containerd_lab");
    }
}

//! The deployment on paper, checked: every flag the DaemonSet passes is one the binary
//! accepts, and the hosts.toml the installer writes is the template's.

use std::{path::Path, process::Command};

fn deploy(file: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy")
            .join(file),
    )
    .unwrap()
}

fn help(subcommand: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_gantry-agent"))
        .args([subcommand, "--help"])
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The flags in a manifest's `args` lists and shell command lines.
fn flags(manifest: &str) -> Vec<String> {
    let mut flags = Vec::new();
    for line in manifest.lines() {
        let item = line.trim().trim_start_matches("- ").trim_matches('"');
        for word in item.split_whitespace() {
            if let Some(flag) = word.strip_prefix("--") {
                let flag = flag.split('=').next().unwrap();
                flags.push(format!("--{flag}"));
            }
        }
    }
    flags.sort();
    flags.dedup();
    flags
}

#[test]
fn every_flag_the_daemonset_passes_is_one_the_binary_accepts() {
    let daemonset = deploy("daemonset.yaml");
    let (run, keygen) = (help("run"), help("keygen"));
    let flags = flags(&daemonset);
    assert!(flags.len() >= 9, "{flags:?}");
    for flag in &flags {
        let known = |help: &str| {
            help.split_whitespace()
                .any(|w| w.trim_end_matches(',') == flag)
        };
        assert!(
            known(&run) || known(&keygen),
            "{flag} is not a gantry-agent flag"
        );
    }
    // And nothing secret on the command line.
    assert!(!daemonset.contains("AGENT_ORIGIN_AUTH"));
    assert!(daemonset.contains("--credentials"));
}

#[test]
fn the_installer_writes_the_template_and_the_image_ships_both() {
    let configmap = deploy("configmap.yaml");
    let template = deploy("hosts.toml");
    let body: String = template
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("    {l}\n").replace("    \n", "\n"))
        .collect();
    assert!(
        configmap.contains(body.trim_start_matches('\n').trim_end()),
        "configmap.yaml's hosts.toml differs from hosts.toml"
    );
    assert!(template.contains("capabilities = [\"pull\", \"resolve\"]"));
    assert!(template.contains("http://127.0.0.1:5001"));
    let dockerfile = deploy("Dockerfile");
    assert!(dockerfile.contains("install-hosts.sh") && dockerfile.contains("-p gantry-agent"));
    let installer = deploy("install-hosts.sh");
    assert!(
        installer.contains("/readyz"),
        "installs only once the agent is ready"
    );
}

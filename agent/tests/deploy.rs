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

/// The `args` of the DaemonSet's agent container.
fn agent_args(daemonset: &str) -> Vec<String> {
    let mut lines = daemonset
        .lines()
        .skip_while(|l| l.trim() != "- name: agent")
        .skip_while(|l| l.trim() != "args:")
        .skip(1);
    let mut args = Vec::new();
    for line in lines.by_ref() {
        let Some(arg) = line.trim().strip_prefix("- ") else {
            if line.trim().starts_with('#') {
                continue;
            }
            break;
        };
        args.push(arg.trim_matches('"').to_owned());
    }
    args
}

#[test]
fn the_daemonsets_command_line_starts_the_agent_against_an_https_upstream() {
    let daemonset = deploy("daemonset.yaml");
    let args = agent_args(&daemonset);
    let origin = args
        .iter()
        .skip_while(|a| *a != "--origin")
        .nth(1)
        .cloned()
        .unwrap_or_default();
    assert!(origin.starts_with("https://"), "{args:?}");

    // The same flags, the node's paths and addresses swapped for a test's own; the
    // credentials secret, optional, not mounted.
    let dir = std::env::temp_dir().join(format!("gantry-deploy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let binary = env!("CARGO_BIN_EXE_gantry-agent");
    let key = dir.join("key");
    let out = Command::new(binary)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    let peer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let members = dir.join("members.json");
    let entry = serde_json::json!([{"node_id": "node-a", "peer_id": peer["peer_id"],
        "addrs": ["/ip4/127.0.0.1/tcp/4001"]}]);
    std::fs::write(&members, entry.to_string()).unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let mut local = Vec::new();
    let mut given = args.iter();
    while let Some(arg) = given.next() {
        local.push(arg.clone());
        let value = match arg.as_str() {
            "--key" => path(&key),
            "--node-id" => "node-a".into(),
            "--listen" => "/ip4/127.0.0.1/tcp/0".into(),
            "--members" => path(&members),
            "--store" => path(&dir.join("store")),
            "--mirror" | "--metrics" => "127.0.0.1:0".into(),
            "--credentials" => path(&dir.join("not-mounted/.dockerconfigjson")),
            flag if flag.starts_with("--") => match given.clone().next() {
                Some(value) if !value.starts_with("--") => value.clone(),
                _ => continue,
            },
            _ => continue,
        };
        given.next();
        local.push(value);
    }
    let mut child = Command::new(binary)
        .args(&local)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let listening = lines
        .recv_timeout(std::time::Duration::from_secs(20))
        .unwrap_or_default();
    let exited = child.try_wait().unwrap();
    let _ = child.kill();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    use std::io::Read;
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        listening.contains("\"listening\"") && exited.is_none(),
        "{local:?}: {listening} ({status}) {stderr}"
    );
    // The missing secret is a warning, not an exit.
    assert!(
        stderr.contains("credentials file does not exist"),
        "{stderr}"
    );
}

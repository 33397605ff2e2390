//! The agent on separate hosts: each node is an `agent` process in a network namespace of
//! its own, joined by a bridge; the origin is a real registry (CNCF Distribution) in
//! another namespace whose egress is rate-limited with a `tbf` qdisc, so that a pull takes
//! seconds. Origin pulls are counted from the registry's access log.
//!
//! Needs root, `ip netns` and `docker-registry`; without them the tests say so and pass
//! locally, and fail under `CI=true`. The scenarios run one at a time.

mod lab;

use std::time::{Duration, Instant};

use gantry_coord::Digest;
use lab::{ip_of, lab_turn, Access, Cluster, PASSWORD, REGISTRY_HOST, USER};
use serde_json::Value;

const NODES: u8 = 6;
const LAYERS: [usize; 3] = [2 << 20, 4 << 20, 12 << 20];
const WITHIN: Duration = Duration::from_secs(90);

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn healthy_cluster_pulls_each_blob_once_and_a_late_joiner_only_from_peers() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    healthy("ok", Access::Open);
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn healthy_cluster_over_https_pulls_each_blob_once() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    healthy("oks", Access::Https);
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn healthy_cluster_behind_bearer_tokens_pulls_each_blob_once_with_a_token_per_puller() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    let cluster = healthy("okt", Access::Token);
    // One token per node that pulled from the origin (one repository, one credential,
    // tokens that outlast the run), not one per blob.
    let pullers = (1..=NODES)
        .filter(|&i| {
            let agent = cluster.agents.iter().find(|a| a.index == i).unwrap();
            agent.blobs().iter().any(|b| b["source"] == "origin")
        })
        .count();
    let counts = &cluster.registry.tokens.as_ref().unwrap().counts;
    let granted = counts.granted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=pullers).contains(&granted),
        "{granted} tokens for {pullers} nodes that pulled"
    );
    assert_eq!(counts.refused.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Every node pulls the image, each blob from the origin once; a node that joins later
/// (without credentials of its own) gets it from peers only; a node stops cleanly.
fn healthy(name: &str, access: Access) -> Cluster {
    let right = format!("{USER}:{PASSWORD}");
    let credentials = access.private().then_some(right.as_str());
    let mut cluster = Cluster::new(name, NODES + 1, access, &LAYERS);
    for i in 1..=NODES {
        cluster.start(i, "members.json", credentials);
    }
    cluster.wait_first(NODES, WITHIN);
    for i in 1..=NODES {
        cluster.assert_store_complete(i, &[]);
    }
    for (digest, pulls) in cluster.pulls() {
        assert_eq!(pulls, 1, "{digest} pulled from the origin {pulls} times");
    }

    // A node that joins once the image is cached cluster-wide gets it from peers only.
    let before = cluster.pulls();
    cluster.start(NODES + 1, "members.json", None);
    cluster.wait_images(&[NODES + 1], WITHIN);
    cluster.assert_store_complete(NODES + 1, &[]);
    let late = cluster.agent(NODES + 1);
    for blob in late.blobs() {
        assert_eq!(blob["source"], "peer", "late joiner: {blob}");
    }
    assert_eq!(
        cluster.pulls(),
        before,
        "the late joiner made the origin pull again"
    );

    // Done, a node keeps serving until it is told to stop, and then exits cleanly.
    assert_eq!(cluster.terminate(1), Some(0), "node-1 on SIGTERM");
    cluster
}

/// The designated puller of the largest layer fails mid-pull (`fault`): every other
/// node still ends with every blob; blobs it was to pull reach the origin at most twice.
fn puller_fault(name: &str, node_rate: Option<&str>, fault: impl FnOnce(&mut Cluster, u8)) {
    puller_fault_with(name, Access::Open, node_rate, fault);
}

fn puller_fault_with(
    name: &str,
    access: Access,
    node_rate: Option<&str>,
    fault: impl FnOnce(&mut Cluster, u8),
) {
    let right = format!("{USER}:{PASSWORD}");
    let credentials = access.private().then_some(right.as_str());
    let mut cluster = Cluster::new(name, NODES, access, &LAYERS);
    cluster.node_rate = node_rate.map(str::to_owned);
    // The fault is the largest layer's pull alone. A victim that also pulls the config
    // could be cut off during that pull too, and a designated puller that keeps failing
    // fast is honoured and asked again (rule 4, then 7), not taken over: another
    // scenario.
    let only_the_layer = |c: &Cluster| {
        let puller = c.designated(c.image.largest_layer(), NODES);
        puller != c.designated(&c.image.manifest, NODES)
            && puller != c.designated(&c.image.config, NODES)
    };
    assert!(
        cluster.rename_until(only_the_layer),
        "no fitting node ids in fifty tries"
    );
    let largest = *cluster.image.largest_layer();
    let victim = cluster.designated(&largest, NODES);
    for i in 1..=NODES {
        cluster.start(i, "members.json", credentials);
    }
    // Mid-pull: its manifest is in, so the batched please_pull for the layers has come.
    let deadline = Instant::now() + WITHIN;
    let manifest = cluster.image.manifest;
    assert!(cluster.agent(victim).wait_for(deadline, |seen| seen
        .iter()
        .any(|e| e["digest"] == manifest.encode().as_str())));
    std::thread::sleep(Duration::from_millis(700));
    fault(&mut cluster, victim);

    let others: Vec<u8> = (1..=NODES).filter(|i| *i != victim).collect();
    cluster.wait_images(&others, WITHIN);
    for &i in &others {
        cluster.assert_store_complete(i, &[]);
    }
    let gets = cluster.registry.gets();
    for digest in cluster.image.all() {
        let pulls = gets.pulls(digest);
        let allowed = if cluster.designated(digest, NODES) == victim {
            2
        } else {
            1
        };
        assert!(
            (1..=allowed).contains(&pulls),
            "{digest}: {pulls} origin pulls, allowed {allowed} (victim node-{victim})"
        );
    }
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn a_killed_puller_is_replaced() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    puller_fault("kill", None, |cluster, victim| cluster.kill(victim));
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn a_killed_puller_is_replaced_over_https() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    puller_fault_with("kills", Access::Https, None, |cluster, victim| {
        cluster.kill(victim)
    });
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn a_killed_puller_is_replaced_behind_bearer_tokens() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    puller_fault_with("killt", Access::Token, None, |cluster, victim| {
        cluster.kill(victim)
    });
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn a_killed_puller_is_replaced_when_every_uplink_is_as_slow_as_the_origin() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    // Its receivers hold pieces of what it was pulling, and lose them with the fetch.
    puller_fault("killr", Some(lab::ORIGIN_RATE), |cluster, victim| {
        cluster.kill(victim)
    });
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn a_puller_cut_off_from_the_origin_is_taken_over_after_the_stall_threshold() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    puller_fault("hole", None, cut_off);
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn a_puller_cut_off_is_taken_over_when_every_uplink_is_as_slow_as_the_origin() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    puller_fault("holes", Some(lab::ORIGIN_RATE), cut_off);
}

/// Blackholes the registry from the victim's namespace: its pull stalls, its streams to
/// members stay up.
fn cut_off(cluster: &mut Cluster, victim: u8) {
    let ns = cluster.agent(victim).ns.clone();
    let registry = format!("{}/32", ip_of(REGISTRY_HOST));
    cluster
        .lab
        .ip(&["-n", &ns, "route", "add", "blackhole", &registry]);
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn a_missing_layer_fails_everywhere_without_a_retry_storm() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    let mut cluster = Cluster::new("gone", NODES, Access::Open, &LAYERS);
    let missing = cluster.image.layers[0];
    cluster.registry.delete_blob(&missing);
    cluster.start_nodes(NODES, "members.json");
    let deadline = Instant::now() + WITHIN;
    let wanted: Vec<Digest> = cluster
        .image
        .all()
        .into_iter()
        .filter(|d| **d != missing)
        .cloned()
        .collect();
    for i in 1..=NODES {
        let done = |seen: &[Value]| {
            let stored = |d: &Digest| {
                seen.iter()
                    .any(|e| e["event"] == "blob" && e["digest"] == d.encode().as_str())
            };
            seen.iter()
                .any(|e| e["event"] == "error" && e["digest"] == missing.encode().as_str())
                && wanted.iter().all(stored)
        };
        assert!(
            cluster.agent(i).wait_for(deadline, done),
            "node-{i}: {:?}",
            cluster.agent(i).seen
        );
        let error = cluster.agent(i).error_for(&missing).unwrap().clone();
        assert_eq!(error["class"], "not-found", "{error}");
        cluster.assert_store_complete(i, &[&missing]);
    }
    let attempts: usize = cluster.registry.gets().requests(&missing);
    assert!(
        (1..=2).contains(&attempts),
        "the missing layer was asked for {attempts} times by {NODES} nodes"
    );
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn credentials_are_delegated_and_wrong_ones_stop_every_node() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    credentials("auth", Access::Basic);
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn credentials_over_https_are_delegated_and_wrong_ones_stop_every_node() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    credentials("auths", Access::HttpsBasic);
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn credentials_for_bearer_tokens_are_delegated_and_wrong_ones_stop_every_node() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    credentials("autht", Access::Token);
}

/// A node without credentials pulls with those its requesters delegate; wrong ones end
/// every node's pull with the class `auth`, without a storm of requests.
fn credentials(name: &str, access: Access) {
    let right = format!("{USER}:{PASSWORD}");
    let mut cluster = Cluster::new(name, NODES, access, &LAYERS);
    // One node has no credentials of its own: the largest layer's designated puller, so
    // long as it is not the manifest's or the config's (which it would pull for itself
    // before anyone asks it). It can pull only with what the requesters delegate.
    let bare = |c: &Cluster| {
        let puller = c.designated(c.image.largest_layer(), NODES);
        puller != c.designated(&c.image.manifest, NODES)
            && puller != c.designated(&c.image.config, NODES)
    };
    assert!(
        cluster.rename_until(bare),
        "no fitting node ids in fifty tries"
    );
    let without = cluster.designated(cluster.image.largest_layer(), NODES);
    for i in 1..=NODES {
        let credentials = (i != without).then_some(right.as_str());
        cluster.start(i, "members.json", credentials);
    }
    cluster.wait_first(NODES, WITHIN);
    for (digest, pulls) in cluster.pulls() {
        assert_eq!(pulls, 1, "{digest} pulled from the origin {pulls} times");
    }
    let largest = cluster.image.largest_layer().to_string();
    let pulled_by_bare = cluster
        .agent(without)
        .blobs()
        .iter()
        .any(|b| b["digest"] == largest.as_str() && b["source"] == "origin");
    assert!(
        pulled_by_bare,
        "node-{without}, without credentials, did not pull the layer it was asked to"
    );
    drop(cluster);

    let mut cluster = Cluster::new(&format!("{name}x"), NODES, access, &LAYERS);
    for i in 1..=NODES {
        cluster.start(i, "members.json", Some("gantry:wrong"));
    }
    let manifest = cluster.image.manifest;
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 1..=NODES {
        let agent = cluster.agent(i);
        assert!(
            agent.wait_for(deadline, |seen| seen.iter().any(|e| e["event"] == "error")),
            "node-{i}: {:?}",
            agent.seen
        );
        let error = agent.error_for(&manifest).cloned().unwrap_or_default();
        assert_eq!(error["class"], "auth", "node-{i}: {:?}", agent.seen);
    }
    let refused: usize = cluster.registry.gets().requests(&manifest);
    assert!(
        refused < usize::from(NODES),
        "{refused} refused manifest requests from {NODES} nodes"
    );
    if let Some(tokens) = &cluster.registry.tokens {
        let refused = tokens
            .counts
            .refused
            .load(std::sync::atomic::Ordering::SeqCst);
        let granted = tokens
            .counts
            .granted
            .load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(granted, 0);
        assert!(
            (1..usize::from(NODES)).contains(&refused),
            "{refused} refused token requests from {NODES} nodes"
        );
    }
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn an_outsider_gets_nothing_from_members() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    let mut cluster = Cluster::new("out", NODES + 1, Access::Open, &LAYERS);
    // The members know six; the outsider knows their addresses and itself.
    cluster.write_members("members6.json", NODES);
    cluster.start_nodes(NODES, "members6.json");
    cluster.wait_first(NODES, WITHIN);
    // Its last resort with short gates, so that the test is not minutes long.
    cluster.agent_args = [
        "--fallback-bootstrap",
        "3s",
        "--fallback-per-minute",
        "30",
        "--convergence-window",
        "2s",
    ]
    .map(String::from)
    .to_vec();
    cluster.start(NODES + 1, "members.json", None);
    cluster.wait_images(&[NODES + 1], WITHIN);
    cluster.assert_store_complete(NODES + 1, &[]);
    let outsider = cluster.agent(NODES + 1);
    for blob in outsider.blobs() {
        assert_eq!(blob["source"], "origin", "outsider: {blob}");
    }
    for i in 1..=NODES {
        let node = cluster.agent(i);
        assert!(
            node.blobs()
                .iter()
                .all(|b| b["peer"] != format!("node-{}", NODES + 1)),
            "node-{i} took a blob from the outsider"
        );
    }
    // The members pulled each blob once, and the outsider, alone, once more.
    for (digest, pulls) in cluster.pulls() {
        assert_eq!(pulls, 2, "{digest} pulled from the origin {pulls} times");
    }
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn a_member_announced_as_it_starts_is_served_by_peers_only() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    let mut cluster = Cluster::new("grow", NODES + 1, Access::Open, &LAYERS);
    cluster.write_members("members6.json", NODES);
    cluster.start_nodes(NODES, "members6.json");
    cluster.wait_first(NODES, WITHIN);
    let before = cluster.pulls();

    // The running members learn of node-7 from their file alone, as it starts: for a
    // moment they refuse it, and it waits for them rather than going to the origin.
    cluster.write_members("members6.json", NODES + 1);
    cluster.start(NODES + 1, "members6.json", None);
    cluster.wait_images(&[NODES + 1], WITHIN);
    cluster.assert_store_complete(NODES + 1, &[]);
    for blob in cluster.agent(NODES + 1).blobs() {
        assert_eq!(blob["source"], "peer", "the new member: {blob}");
    }
    assert_eq!(
        cluster.pulls(),
        before,
        "the new member pulled from the origin"
    );
}

#[test]
#[cfg_attr(
    not(lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd and openssl (apt-get install docker-registry apache2-utils openssl)"
)]
fn members_files_that_lag_by_a_second_still_pull_each_blob_once() {
    let Some(_turn) = lab_turn() else {
        return;
    };
    let mut cluster = Cluster::new("lag", NODES, Access::Open, &LAYERS);
    // Node-6 joins as the cluster starts, and the manifest's designated puller reads of
    // it a second late, refusing it meanwhile. Node-6 designates no blob, so the lagging
    // view names the same pullers as the others: only the refusals differ.
    let fits = |c: &Cluster| {
        let lagging = c.designated(&c.image.manifest, NODES);
        lagging != NODES
            && c.image
                .all()
                .into_iter()
                .all(|d| c.designated(d, NODES) != NODES)
    };
    assert!(
        cluster.rename_until(fits),
        "no fitting node ids in fifty tries"
    );
    let lagging = cluster.designated(&cluster.image.manifest, NODES);
    let without_the_newest: Vec<u8> = (1..NODES).collect();
    cluster.write_members_of("lagging.json", &without_the_newest);
    for i in 1..=NODES {
        let file = if i == lagging {
            "lagging.json"
        } else {
            "members.json"
        };
        cluster.start(i, file, None);
    }
    std::thread::sleep(Duration::from_secs(1));
    cluster.write_members("lagging.json", NODES);
    cluster.wait_first(NODES, WITHIN);
    for i in 1..=NODES {
        cluster.assert_store_complete(i, &[]);
    }
    for (digest, pulls) in cluster.pulls() {
        assert_eq!(
            pulls, 1,
            "{digest} pulled from the origin {pulls} times (node-{lagging} lagging)"
        );
    }
}

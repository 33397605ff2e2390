//! A real containerd on every node, pulling through its agent's mirror as `hosts.toml`
//! says (`ctr image pull --hosts-dir … --snapshotter native`), all nodes at once, against
//! the real registry: the image is an OCI index of two platforms with gzip tar layers.

mod lab;

use std::time::Duration;

use lab::{
    containerd::{self, Containerd},
    lab_turn, Access, Cluster,
};

const NODES: u8 = 6;

/// containerd and ctr, or under `CI=true` a failure saying they are missing.
fn containerd_turn() -> Option<std::sync::MutexGuard<'static, ()>> {
    let turn = lab_turn()?;
    if containerd::available() {
        return Some(turn);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("the containerd scenarios must run under CI=true, but containerd is not installed");
    }
    eprintln!("skipped: containerd is not installed");
    None
}

#[test]
#[cfg_attr(
    not(containerd_lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd, openssl and containerd (apt-get install docker-registry apache2-utils openssl containerd)"
)]
fn every_containerd_pulls_through_its_agent_and_the_origin_serves_each_object_once() {
    let Some(_turn) = containerd_turn() else {
        return;
    };
    let mut cluster = Cluster::new("ctrd", NODES, Access::Https, &[64 << 10]);
    cluster.with_image = false;
    let image = cluster.registry.push_index(&cluster.lab, 2 << 20, 6 << 20);
    cluster.start_nodes(NODES, "members.json");
    let mut runtimes = Vec::new();
    for i in 1..=NODES {
        let ns = cluster.agent(i).ns.clone();
        runtimes.push(Containerd::start(
            &mut cluster.lab,
            &ns,
            i,
            &cluster.registry,
        ));
    }
    for i in 1..=NODES {
        let ready = std::time::Instant::now() + Duration::from_secs(20);
        assert!(
            cluster
                .agent(i)
                .wait_for(ready, |events| events.iter().any(|e| e["event"] == "ready")),
            "node-{i} never ready"
        );
    }
    let reference = image.reference();
    let pull_all = |runtimes: &[Containerd]| {
        std::thread::scope(|scope| {
            let pulls: Vec<_> = runtimes
                .iter()
                .map(|c| scope.spawn(|| c.pull(&reference)))
                .collect();
            for (i, pull) in pulls.into_iter().enumerate() {
                let result = pull.join().unwrap();
                assert!(result.is_ok(), "node-{}: {result:?}", i + 1);
            }
        })
    };

    // 1. Healthy: every containerd has the image, each object came from the origin once.
    pull_all(&runtimes);
    for (i, c) in runtimes.iter().enumerate() {
        assert!(c.has_image(&reference), "node-{} lacks the image", i + 1);
    }
    let gets = cluster.registry.gets();
    for digest in image.amd64_objects() {
        assert_eq!(gets.pulls(&digest), 1, "{digest} from the origin");
    }

    // 2. Warm: every containerd forgets its content and pulls again: nothing by digest
    // from the origin.
    for c in &runtimes {
        c.forget(&reference);
    }
    pull_all(&runtimes);
    let again = cluster.registry.gets();
    for digest in image.amd64_objects() {
        assert_eq!(again.pulls(&digest), 1, "{digest} from the origin again");
    }
    for (i, c) in runtimes.iter().enumerate() {
        assert!(
            c.has_image(&reference),
            "node-{} lacks the image again",
            i + 1
        );
    }
    // 4. An agent restarted on the same store serves from disk: its containerd, having
    // forgotten everything, pulls again with nothing from the origin, and nothing asked
    // of members either (it would print a blob line for each).
    assert_eq!(
        cluster.terminate(1),
        Some(0),
        "node-1 drains and exits on SIGTERM"
    );
    cluster.start(1, "members.json", None);
    let ready = std::time::Instant::now() + Duration::from_secs(20);
    assert!(cluster
        .agent(1)
        .wait_for(ready, |events| events.iter().any(|e| e["event"] == "ready")));
    runtimes[0].forget(&reference);
    runtimes[0]
        .pull(&reference)
        .expect("node-1 pulls after its restart");
    assert!(runtimes[0].has_image(&reference));
    let after = cluster.registry.gets();
    for digest in image.amd64_objects() {
        assert_eq!(
            after.pulls(&digest),
            1,
            "{digest} from the origin after a restart"
        );
    }
    let fetched = cluster.agent(1).blobs().len();
    assert_eq!(fetched, 0, "the restarted agent fetched what it held");
}

#[test]
#[cfg_attr(
    not(containerd_lab),
    ignore = "needs root, ip netns, docker-registry, htpasswd, openssl and containerd (apt-get install docker-registry apache2-utils openssl containerd)"
)]
fn a_killed_puller_costs_its_blobs_at_most_one_more_origin_pull_and_every_node_gets_the_image() {
    let Some(_turn) = containerd_turn() else {
        return;
    };
    let mut cluster = Cluster::new("ctrk", NODES, Access::Https, &[64 << 10]);
    cluster.with_image = false;
    let image = cluster.registry.push_index(&cluster.lab, 1 << 20, 12 << 20);
    let (_, _, _, layers) = image.platforms[0].clone();
    let largest = layers[1];
    let victim = cluster.designated(&largest, NODES);
    cluster.start_nodes(NODES, "members.json");
    let mut runtimes = Vec::new();
    for i in 1..=NODES {
        let ns = cluster.agent(i).ns.clone();
        runtimes.push(Containerd::start(
            &mut cluster.lab,
            &ns,
            i,
            &cluster.registry,
        ));
    }
    for i in 1..=NODES {
        let ready = std::time::Instant::now() + Duration::from_secs(20);
        assert!(cluster
            .agent(i)
            .wait_for(ready, |events| events.iter().any(|e| e["event"] == "ready")));
    }
    let reference = image.reference();
    let tmp = cluster.agent(victim).store.join("tmp");
    let hex = largest.encode().hex().to_owned();
    let results = std::thread::scope(|scope| {
        let pulls: Vec<_> = runtimes
            .iter()
            .map(|c| scope.spawn(|| c.pull(&reference)))
            .collect();
        // Mid-pull: the victim has started writing the largest layer.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let started = loop {
            let writing = std::fs::read_dir(&tmp)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    e.file_name().to_string_lossy().starts_with(&hex)
                        && e.metadata().is_ok_and(|m| m.len() > 0)
                });
            if writing || std::time::Instant::now() > deadline {
                break writing;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(started, "node-{victim} never pulled the largest layer");
        cluster.kill(victim);
        pulls
            .into_iter()
            .map(|p| p.join().unwrap())
            .collect::<Vec<_>>()
    });
    for (i, result) in results.iter().enumerate() {
        let node = i as u8 + 1;
        if node == victim {
            continue;
        }
        assert!(result.is_ok(), "node-{node}: {result:?}");
        assert!(
            runtimes[i].has_image(&reference),
            "node-{node} lacks the image"
        );
    }
    // The victim's containerd, its mirror gone, gets the rest from the origin itself.
    let own = &runtimes[usize::from(victim) - 1];
    if !own.has_image(&reference) {
        own.pull(&reference)
            .expect("the victim's containerd, through the origin");
    }
    assert!(own.has_image(&reference));
    let gets = cluster.registry.gets();
    for digest in image.amd64_objects() {
        let agents = if cluster.designated(&digest, NODES) == victim {
            2
        } else {
            1
        };
        let pulls = gets.pulls(&digest);
        assert!(
            (1..=agents + 1).contains(&pulls),
            "{digest}: {pulls} origin pulls, allowed {agents} by agents and one by the victim's containerd"
        );
    }
}

//! A real containerd on every node, pulling through its agent's mirror as `hosts.toml`
//! says (`ctr image pull --hosts-dir … --snapshotter native`), all nodes at once, against
//! the real registry: the image is an OCI index of two platforms with gzip tar layers.

mod lab;

use std::time::Duration;

use lab::{
    containerd::{self, Containerd},
    lab_turn, Cluster,
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
fn every_containerd_pulls_through_its_agent_and_the_origin_serves_each_object_once() {
    let Some(_turn) = containerd_turn() else {
        return;
    };
    let mut cluster = Cluster::new("ctrd", NODES, false, &[64 << 10]);
    cluster.with_image = false;
    let image = cluster.registry.push_index(&cluster.lab, 2 << 20, 6 << 20);
    cluster.start_nodes(NODES, "members.json");
    let mut runtimes = Vec::new();
    for i in 1..=NODES {
        let ns = cluster.agent(i).ns.clone();
        runtimes.push(Containerd::start(&mut cluster.lab, &ns, i));
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

//! A soak of a few thousand mixed good and bad requests against one node: every good one
//! is answered, every bad one is counted, the bookkeeping ends at zero and live heap
//! memory ends where it was after a warm-up. Prints the figures it measured.

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use common::*;
use futures::StreamExt;
use gantry_coord::{Behaviour, Config, Event, OriginRefKind, PleasePull, PullIntent};
use libp2p_identity::PeerId;
use libp2p_swarm::{Swarm, SwarmEvent};
use libp2p_swarm_test::SwarmExt;
use wire::envelope::Msg;

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const ROUNDS: usize = 100;
const GOOD_PER_ROUND: usize = 16;
const BAD_PER_ROUND: usize = 16;

fn bad_input(n: usize) -> Vec<u8> {
    match n % 8 {
        0 => vec![0x81, 0x80, 0x40],
        1 => vec![0x05, 0xff, 0xff, 0xff, 0xff, 0xff],
        2 => vec![0x00],
        3 => frame(Msg::PullIntentResponse(wire::PullIntentResponse::default())),
        4 => frame(Msg::PullIntentRequest(wire::PullIntentRequest {
            digest: "sha256:nope".into(),
        })),
        5 => vec![0x20, 0x0a, 0x1e],
        6 => vec![0x02, 0x32, 0x00],
        _ => frame(Msg::PleasePullRequest(wire::PleasePullRequest {
            digests: vec![digest(1).to_string()],
            ..Default::default()
        })),
    }
}

/// Drives the victim, answering everything, until `done` holds.
async fn drive(
    victim: &mut Swarm<Behaviour>,
    counts: &mut (usize, usize),
    mut done: impl FnMut(&Behaviour, &(usize, usize)) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(victim.behaviour(), counts) {
        assert!(Instant::now() < deadline, "soak stalled at {counts:?}");
        tokio::select! {
            event = victim.select_next_some() => {
                if let SwarmEvent::Behaviour(event) = event {
                    let behaviour = victim.behaviour_mut();
                    match event {
                        Event::PullIntentQuery { responder, .. } => {
                            behaviour.send_response(responder, PullIntent::UNKNOWN).unwrap();
                        }
                        Event::PleasePull { request, responder, .. } => {
                            let outcomes = unspecified_outcomes(&request);
                            behaviour.send_response(responder, outcomes).unwrap();
                        }
                        Event::ResponseSent { .. } => counts.0 += 1,
                        Event::InboundFailure { .. } => counts.1 += 1,
                        _ => {}
                    }
                }
            }
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
}

async fn round(
    coordinator: &gantry_coord::Coordinator,
    target: PeerId,
    control: &mut libp2p_stream::Control,
    n: usize,
) {
    let good = futures::future::join_all((0..GOOD_PER_ROUND).map(|i| async move {
        let d = digest((n * GOOD_PER_ROUND + i) as u8);
        if i % 2 == 0 {
            coordinator.pull_intent_query(target, &d).await.map(|_| ())
        } else {
            let request =
                PleasePull::new("docker.io", "library/nginx", OriginRefKind::Blob, vec![d])
                    .unwrap();
            coordinator.please_pull(target, &request).await.map(|_| ())
        }
    }));
    let bad = async {
        for i in 0..BAD_PER_ROUND {
            let reply = raw_exchange(control, target, &bad_input(n * BAD_PER_ROUND + i))
                .await
                .unwrap();
            assert!(reply.is_empty());
        }
    };
    let (good, ()) = futures::join!(good, bad);
    assert!(good.iter().all(Result::is_ok), "{good:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_of_mixed_requests_ends_at_zero_with_flat_memory() {
    let mut victim = coord(Config::default());
    let addr = listen(&mut victim).await;
    let target = *victim.local_peer_id();
    let mut requester = coord(Config::default());
    requester.add_peer_address(target, addr.clone());
    let coordinator = requester.behaviour().coordinator();
    tokio::spawn(requester.loop_on_next());
    let (_, mut control) = spawn_raw_peer(target, addr);

    let load = tokio::spawn(async move {
        for n in 0..ROUNDS {
            round(&coordinator, target, &mut control, n).await;
        }
    });
    let mut counts = (0, 0);
    let warm = (ROUNDS / 10 + 1) * GOOD_PER_ROUND;
    drive(&mut victim, &mut counts, |_, c| c.0 >= warm).await;
    let baseline = LIVE.load(Ordering::Relaxed);

    let total_good = ROUNDS * GOOD_PER_ROUND;
    let total_bad = ROUNDS * BAD_PER_ROUND;
    // Until every request was reported once; then a quiet spell in which nothing more
    // may be reported and the bookkeeping must reach zero by itself. The checks after it
    // are not the condition the drive stopped on.
    drive(&mut victim, &mut counts, |_, c| {
        c.0 + c.1 >= total_good + total_bad
    })
    .await;
    load.await.unwrap();
    let settled = Instant::now() + Duration::from_millis(300);
    drive(&mut victim, &mut counts, |_, _| Instant::now() >= settled).await;
    // Let connection tasks finish closing before reading the heap.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let end = LIVE.load(Ordering::Relaxed);
    let peak = PEAK.load(Ordering::Relaxed);

    let behaviour = victim.behaviour();
    assert_eq!(behaviour.open_inbound_streams(), 0);
    assert_eq!(behaviour.pending_responses(), 0);
    assert_eq!(counts, (total_good, total_bad));
    println!(
        "soak: requests={} good={total_good} bad={total_bad} live_after_warmup={baseline} live_at_end={end} peak={peak} (bytes)",
        total_good + total_bad
    );
    assert!(
        end < baseline + (1 << 20),
        "live heap grew from {baseline} to {end} bytes"
    );
}

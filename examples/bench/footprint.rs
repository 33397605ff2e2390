//! Heap held per idle inbound stream, and one server under many clients.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::Duration,
};

use futures::StreamExt;
use gantry_coord::PROTOCOL_NAME;
use libp2p::swarm::SwarmEvent;

use crate::{
    net::{connect, drive, listen, swarm, Net},
    stacks::{coord_config, rr_behaviour},
    stats::{closed_loop, summarize, Cell},
    work::{answer_intent, digest},
};

/// Counts live heap bytes, and only while `COUNTING` is set: a counter shared by every
/// thread would otherwise bounce between the cores on each allocation and tax whichever
/// stack runs on more threads at once.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() && COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
    }
}

/// Heap bytes held per inbound stream that waits for its request: 512 idle streams from
/// one raw peer (memory transport), coord or request-response on the other side.
pub async fn idle_stream_bytes(coord: bool) -> f64 {
    const STREAMS: usize = 512;
    let net = Net::Memory;
    let (addr, _serving) = if coord {
        let mut server = swarm(net, |_| gantry_coord::Behaviour::new(coord_config()));
        (listen(&mut server, net).await, drive(server))
    } else {
        let mut server = swarm(net, |_| rr_behaviour());
        (listen(&mut server, net).await, drive(server))
    };
    let mut client = swarm(net, |_| libp2p_stream::Behaviour::new());
    let peer = connect(&mut client, addr).await;
    let mut control = client.behaviour().new_control();
    let _driving = drive(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Growth while counting is what the window allocated net of what it freed, whether
    // or not the freed blocks were allocated before it.
    COUNTING.store(true, Ordering::Relaxed);
    let before = LIVE.load(Ordering::Relaxed);
    let mut held = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        held.push(
            control
                .open_stream(peer, PROTOCOL_NAME)
                .await
                .expect("an idle stream"),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = LIVE.load(Ordering::Relaxed);
    COUNTING.store(false, Ordering::Relaxed);
    drop(held);
    after.wrapping_sub(before) as isize as f64 / STREAMS as f64
}

/// One coord server, `peers` clients on the memory transport, each with `per_peer`
/// queries in flight: aggregate throughput and p99.
pub async fn scale(peers: usize, per_peer: usize, duration: Duration) -> Cell {
    use gantry_coord::Event;
    let net = Net::Memory;
    let mut server = swarm(net, |_| gantry_coord::Behaviour::new(coord_config()));
    let addr = listen(&mut server, net).await;
    let server_peer = *server.local_peer_id();
    let serving = tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(Event::PullIntentQuery { responder, .. }) =
                server.select_next_some().await
            {
                let _ = server
                    .behaviour_mut()
                    .send_response(responder, answer_intent());
            }
        }
    });
    let mut clients = Vec::new();
    for _ in 0..peers {
        let mut client = swarm(net, |_| gantry_coord::Behaviour::new(coord_config()));
        connect(&mut client, addr.clone()).await;
        clients.push(client);
    }
    let query = digest(7);
    let runs: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                closed_loop(
                    &mut client,
                    per_peer,
                    duration,
                    |c| c.behaviour_mut().pull_intent_query(server_peer, &query),
                    async |c| loop {
                        if let SwarmEvent::Behaviour(Event::PullIntentResponse {
                            request_id, ..
                        }) = c.select_next_some().await
                        {
                            return request_id;
                        }
                    },
                )
                .await
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut tput = 0.0;
    for run in runs {
        let samples = run.await.expect("a client task");
        tput += samples.latencies.len() as f64 / samples.elapsed.as_secs_f64();
        latencies.extend(samples.latencies);
    }
    serving.abort();
    let mut cell = summarize(latencies, Duration::from_secs(1), Duration::ZERO);
    cell.tput = tput;
    cell
}

//! What a pull_intent answer and a cold start's ranking cost as the membership grows:
//! the node's own HRW rank in every answer (`NodeState::local_pull_intent`) and the top
//! K a resolution starts with (`NodeState::ranking`), each against the reference
//! functions `hrw::rank_of` / `hrw::top_k` timed in the same run.
//!
//! `cargo run --release --example hrw_bench` prints one `time_us` line per cell and
//! `ratio` lines: `*_vs_reference` (below 1: faster than computing it afresh) and
//! `*_10000_vs_10` (how the cost grows with the membership).

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use gantry_coord::{hrw, Digest, Member, NodeState, StaticMembership};

/// Each cell runs at least this long.
const WINDOW: Duration = Duration::from_millis(300);
/// Distinct digests cycled through: more than any bounded cache holds, so every call
/// of the distinct cells is a miss.
const DISTINCT: usize = 20_000;
/// Digests of the repeated cells, as during a rollout of one image.
const REPEATED: usize = 4;
/// The top K the cascade probes, widened.
const TOP: usize = 6;

fn members(n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| Member::new(format!("node-{i:05}"), None))
        .collect()
}

fn digests(count: usize) -> Vec<Digest> {
    (0..count as u64)
        .map(|i| {
            let mixed = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            Digest::parse(&format!("sha256:{mixed:016x}{i:048x}")).expect("valid digest")
        })
        .collect()
}

/// Mean time of one call of `f(i)`, over at least [`WINDOW`].
fn per_call(mut f: impl FnMut(usize)) -> Duration {
    for i in 0..16 {
        f(i);
    }
    let started = Instant::now();
    let mut calls = 0usize;
    while started.elapsed() < WINDOW {
        for _ in 0..16 {
            f(calls);
            calls += 1;
        }
    }
    started.elapsed() / calls as u32
}

fn main() {
    let distinct = digests(DISTINCT);
    let mut figures = Vec::new();
    for n in [10usize, 1_000, 10_000] {
        let members = members(n);
        let local = members[n / 2].id.clone();
        let state =
            NodeState::builder(StaticMembership::new(local.clone(), members.clone())).build();
        for (name, set) in [
            ("repeated", &distinct[..REPEATED]),
            ("distinct", &distinct[..]),
        ] {
            let pick = |i: usize| &set[i % set.len()];
            let answer = per_call(|i| {
                black_box(state.local_pull_intent(pick(i)));
            });
            let reference = per_call(|i| {
                black_box(hrw::rank_of(&members, local.as_str(), pick(i)));
            });
            let ranking = per_call(|i| {
                black_box(state.ranking(pick(i), TOP, false));
            });
            let top_reference = per_call(|i| {
                black_box(hrw::top_k(&members, pick(i), TOP));
            });
            for (cell, took) in [
                ("answer", answer),
                ("answer_reference", reference),
                ("ranking", ranking),
                ("ranking_reference", top_reference),
            ] {
                let us = took.as_secs_f64() * 1e6;
                println!("time_us {cell}_{name} members={n} {us:.3}");
                figures.push((format!("{cell}_{name}"), n, us));
            }
        }
    }
    let get = |cell: &str, n: usize| {
        figures
            .iter()
            .find(|(c, m, _)| c == cell && *m == n)
            .map_or(f64::NAN, |f| f.2)
    };
    for name in ["repeated", "distinct"] {
        for cell in ["answer", "ranking"] {
            for n in [10, 1_000, 10_000] {
                let ratio =
                    get(&format!("{cell}_{name}"), n) / get(&format!("{cell}_reference_{name}"), n);
                println!("ratio {cell}_{name}_vs_reference_{n} {ratio:.4}");
            }
            let growth =
                get(&format!("{cell}_{name}"), 10_000) / get(&format!("{cell}_{name}"), 10);
            println!("ratio {cell}_{name}_10000_vs_10 {growth:.2}");
        }
    }
}

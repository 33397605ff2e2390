//! A cluster cold-starting one image, simulated: every node's real `NodeState` and real
//! `Cascade`s, driven as `ColdStart::obtain` drives them, over a simulated network (latency,
//! loss, a cap on the requests a node answers per second), a simulated origin and a
//! simulated provider lookup, on simulated time and deterministic for a seed.
//!
//! ```text
//! cargo run --release --example simulate -- --nodes 10000 --spread-ms 10000
//! cargo run --release --example simulate -- --nodes 10000 --kill-puller 3
//! cargo run --release --example simulate -- --nodes 10000 --lagging 0.1 --lag-ms 2000
//! ```
//!
//! The last line reads
//! `simulate: nodes=N digests=D origin_pulls=P msgs_per_node_digest=M peak_inbound_per_s=R p99_ms=T`.

mod cluster;

use std::time::Instant;

use clap::Parser;

use cluster::{Figures, Setup, Simulation};

#[derive(Parser, Debug)]
#[command(about = "Simulates a cluster cold-starting one image through the cascade")]
struct Args {
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Seed of every random draw: the same seed gives the same figures.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The nodes' starts spread uniformly over this long, as a DaemonSet rollout does.
    #[arg(long, default_value_t = 10_000)]
    spread_ms: u64,
    /// Fraction of the members down from the start.
    #[arg(long, default_value_t = 0.0)]
    dead: f64,
    /// Kills the node that first pulls blob I (0 is the manifest) half-way through.
    #[arg(long)]
    kill_puller: Option<usize>,
    /// How late a lagging node's membership view is.
    #[arg(long, default_value_t = 2_000)]
    lag_ms: u64,
    /// Fraction of the nodes whose view lags.
    #[arg(long, default_value_t = 0.0)]
    lagging: f64,
    /// Availability zones (the cascade keeps to a node's zone when there are several).
    #[arg(long, default_value_t = 1)]
    zones: usize,
    /// Probability that a message is lost.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Coord requests a node answers per second.
    #[arg(long, default_value_t = 20_000)]
    inbound_cap: u32,
    /// Fraction of provider lookups that find nothing although a provider exists.
    #[arg(long, default_value_t = 0.05)]
    lookup_empty: f64,
    /// Pullers advertise a blob as soon as their pull starts and serve it as it arrives
    /// (partial holders, as pieces from many holders would have it).
    #[arg(long)]
    partial_holders: bool,
    /// Also runs the killed-puller (blob 3) and lagging-views (10 %, 2 s) variants of this
    /// setup and plots when the nodes had every blob, for all three, into this SVG file.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
    /// Prints the figures as JSON before the last line.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = Args::parse();
    let setup = Setup {
        nodes: args.nodes.max(1),
        seed: args.seed,
        spread: args.spread_ms * 1_000,
        dead: args.dead,
        kill_puller: args.kill_puller,
        lag: args.lag_ms * 1_000,
        lagging: args.lagging,
        zones: args.zones.max(1),
        loss: args.loss,
        inbound_cap: args.inbound_cap,
        lookup_empty: args.lookup_empty,
        partial_holders: args.partial_holders,
        ..Setup::default()
    };
    let started = Instant::now();
    let figures = Simulation::new(setup.clone()).run();
    let wall = started.elapsed();
    if let Some(path) = &args.svg {
        let killed = Simulation::new(Setup {
            kill_puller: Some(3),
            ..setup.clone()
        })
        .run();
        let lagging = Simulation::new(Setup {
            lagging: 0.1,
            lag: 2_000_000,
            ..setup.clone()
        })
        .run();
        let curves = [
            ("healthy", &figures, "#1f77b4"),
            ("puller of the largest layer killed", &killed, "#d62728"),
            ("10 % of the views 2 s late", &lagging, "#2ca02c"),
        ];
        if let Err(error) = std::fs::write(path, plot(setup.nodes, &curves)) {
            eprintln!("cannot write {}: {error}", path.display());
        }
    }
    report(&figures, wall.as_secs_f64(), args.json);
}

/// The share of live nodes holding every blob over time, one line per run.
fn plot(nodes: usize, curves: &[(&str, &Figures, &str)]) -> String {
    let (w, h, left, bottom) = (720.0, 400.0, 60.0, 40.0);
    let end = curves
        .iter()
        .filter_map(|(_, f, _)| f.done_ms.last().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |ms: f64| left + (w - left - 20.0) * ms / end;
    let y = |share: f64| (h - bottom) - (h - bottom - 20.0) * share;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"14\">{nodes} nodes: share holding every blob, by simulated time</text>\n"
    );
    svg += &format!(
        "<line x1=\"{left}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"20\" x2=\"{left}\" y2=\"{b}\" stroke=\"black\"/>\n",
        b = h - bottom,
        r = w - 20.0
    );
    let step = if end > 20_000.0 { 5_000.0 } else { 2_000.0 };
    let mut tick = 0.0;
    while tick <= end {
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{} s</text>\n",
            x(tick),
            h - bottom + 16.0,
            tick / 1000.0
        );
        tick += step;
    }
    for share in [0.0, 0.5, 0.99, 1.0] {
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}%</text>\n",
            left - 4.0,
            y(share) + 4.0,
            share * 100.0
        );
    }
    for (i, (name, figures, colour)) in curves.iter().enumerate() {
        let live = figures.live.max(1) as f64;
        let mut points = format!("{:.1},{:.1}", x(0.0), y(0.0));
        // At most about 500 points a line: the shape, not every node.
        let every = (figures.done_ms.len() / 500).max(1);
        let last = figures.done_ms.len().saturating_sub(1);
        for (n, ms) in figures.done_ms.iter().enumerate() {
            if n % every == 0 || n == last {
                points += &format!(" {:.1},{:.1}", x(*ms as f64), y((n + 1) as f64 / live));
            }
        }
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{points}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\">{name} (origin pulls {})</text>\n",
            left + 10.0,
            40.0 + 16.0 * i as f64,
            figures.origin_pulls
        );
    }
    svg + "</svg>\n"
}

fn report(f: &Figures, wall_s: f64, json: bool) {
    println!("origin pulls per digest: {:?}", f.origin_pulls_per_digest);
    println!(
        "coordination messages per node and digest: {:.2}",
        f.msgs_per_node_digest
    );
    println!(
        "busiest node's inbound coord requests: {} in one second",
        f.peak_inbound_per_s
    );
    println!(
        "every digest resolved: 50 % of the nodes by {} ms, 99 % by {} ms, all by {} ms ({} never)",
        f.p50_ms, f.p99_ms, f.p100_ms, f.unfinished
    );
    if f.killed_held > 0 {
        println!("the killed puller was pulling {} blobs", f.killed_held);
    }
    println!(
        "simulated {} events in {wall_s:.1} s of wall time",
        f.events
    );
    if json {
        let mut value = serde_json::to_value(f).unwrap_or_default();
        value["wall_s"] = serde_json::json!(wall_s);
        println!("{value}");
    }
    println!(
        "simulate: nodes={} digests={} origin_pulls={} msgs_per_node_digest={:.2} peak_inbound_per_s={} p99_ms={}",
        f.nodes, f.digests, f.origin_pulls, f.msgs_per_node_digest, f.peak_inbound_per_s, f.p99_ms
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> Setup {
        Setup {
            nodes: 300,
            seed,
            spread: 3_000_000,
            ..Setup::default()
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_figures() {
        let a = Simulation::new(small(7)).run();
        let b = Simulation::new(small(7)).run();
        assert_eq!(a, b);
        let other = Simulation::new(small(8)).run();
        assert_ne!(a.done_ms, other.done_ms, "another seed, another run");
    }

    #[test]
    fn a_healthy_cluster_pulls_each_blob_once_and_every_node_gets_all() {
        let figures = Simulation::new(small(1)).run();
        assert_eq!(figures.origin_pulls_per_digest, vec![1; figures.digests]);
        assert_eq!(figures.unfinished, 0);
        assert!(figures.p100_ms < 60_000, "{figures:?}");
    }

    #[test]
    fn a_killed_puller_costs_at_most_one_pull_per_blob_it_held() {
        let figures = Simulation::new(Setup {
            kill_puller: Some(3),
            ..small(1)
        })
        .run();
        assert!(figures.killed_held >= 1, "{figures:?}");
        let extra = figures.origin_pulls - figures.digests as u64;
        assert!(extra <= figures.killed_held as u64, "{figures:?}");
        assert_eq!(figures.unfinished, 0, "every live node gets every blob");
    }
}

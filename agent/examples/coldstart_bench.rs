//! What a user gets from the cascade: one image pulled by N agents (default 8), each in a
//! network namespace of its own, from a real registry behind a rate-limited link, and in
//! the same run the same image pulled by every node straight from the origin.
//!
//! `cargo run --release -p gantry-agent --example coldstart_bench [-- --nodes N --svg FILE]` (as root,
//! with `docker-registry` and `htpasswd` installed). Prints the per-node completion times
//! and `ratio coldstart_vs_origin_only VALUE` and `ratio coldstart_vs_limit VALUE`, where
//! the limit is the image's bytes over the origin's rate: one copy through its link.
//! Writes the per-node completion times as an SVG plot.
//!
//! With every node's uplink shaped like the origin's, at several cluster sizes, each
//! run several times (the figures of the pieces' section in `BENCHMARKS.md`):
//! `cargo run --release -p gantry-agent --example coldstart_bench -- --node-rate 40mbit
//! --sizes 4,8,12 --runs 5 --svg docs/coldstart_shaped.svg`.

#[path = "../tests/lab/mod.rs"]
mod lab;

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Parser;
use lab::{containerd::Containerd, lab_available, Access, Cluster};

/// The origin's link, as `lab::ORIGIN_RATE` shapes it: 40 Mbit/s.
const ORIGIN_BYTES_PER_SEC: f64 = 40e6 / 8.0;
const LAYERS: [usize; 3] = [4 << 20, 8 << 20, 16 << 20];

#[derive(Debug, Parser)]
#[command(about = "Cold start through the cascade against every node pulling from the origin")]
struct Args {
    /// Agents in the cluster.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(2..=60))]
    nodes: u8,
    /// Where to write the plot of per-node completion times.
    #[arg(long, default_value = "coldstart_bench.svg")]
    svg: PathBuf,
    /// Pull through a real containerd on every node (`ctr image pull` through its agent's
    /// mirror, then the same pulls straight to the origin) instead of the agents' own
    /// `--image` cold start.
    #[arg(long)]
    containerd: bool,
    /// Limit every node's egress to this rate too (a `tc` rate: `40mbit` is the
    /// origin's), so that the nodes' own links are the limit; prints
    /// `ratio coldstart_vs_limit_shaped` (`containerd_coldstart_vs_limit_shaped` with
    /// `--containerd`) and skips the origin-only run.
    #[arg(long)]
    node_rate: Option<String>,
    /// With `--node-rate`: cluster sizes to run instead of `--nodes` (`4,8,12`), each
    /// `--runs` times; prints each size's median ratio and the spread from the smallest
    /// to the largest, and plots each size's median run.
    #[arg(long, value_delimiter = ',', requires = "node_rate", conflicts_with = "containerd",
          value_parser = clap::value_parser!(u8).range(2..=60))]
    sizes: Vec<u8>,
    /// Runs of each size in `--sizes`.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=20))]
    runs: u8,
}

/// Every node's containerd pulls at once, through its agent's mirror, then (its content
/// forgotten, and unless every node's uplink is shaped) straight from the origin: each
/// node's time until its `ctr image pull` returned, and the bytes one pull fetches.
fn containerd_everywhere(
    nodes: u8,
    node_rate: Option<&str>,
) -> (Vec<Duration>, Option<Vec<Duration>>, u64) {
    let mut cluster = Cluster::new("bctr", nodes, Access::Open, &[64 << 10]);
    cluster.with_image = false;
    cluster.node_rate = node_rate.map(str::to_owned);
    let image = cluster.registry.push_index(&cluster.lab, 8 << 20, 20 << 20);
    cluster.start_nodes(nodes, "members.json");
    let mut runtimes = Vec::new();
    for i in 1..=nodes {
        let ns = cluster.agent(i).ns.clone();
        runtimes.push(Containerd::start(
            &mut cluster.lab,
            &ns,
            i,
            &cluster.registry,
        ));
    }
    for i in 1..=nodes {
        let ready = Instant::now() + Duration::from_secs(30);
        assert!(cluster
            .agent(i)
            .wait_for(ready, |events| events.iter().any(|e| e["event"] == "ready")));
    }
    let reference = image.reference();
    let timed = |direct: bool| -> Vec<Duration> {
        let started = Instant::now();
        std::thread::scope(|scope| {
            let pulls: Vec<_> = runtimes
                .iter()
                .map(|c| {
                    let reference = &reference;
                    scope.spawn(move || {
                        let pulled = if direct {
                            c.pull_direct(reference)
                        } else {
                            c.pull(reference)
                        };
                        pulled.expect("a pull");
                        started.elapsed()
                    })
                })
                .collect();
            pulls.into_iter().map(|p| p.join().unwrap()).collect()
        })
    };
    let through_agents = timed(false);
    let direct = node_rate.is_none().then(|| {
        for c in &runtimes {
            c.forget(&reference);
        }
        timed(true)
    });
    (through_agents, direct, image.amd64_bytes())
}

/// Starts `nodes` agents at once, each with the members file `members(i)` returns, and
/// returns each node's completion time since the first start, in node order.
fn pull_everywhere(
    name: &str,
    nodes: u8,
    node_rate: Option<&str>,
    members: impl Fn(&Cluster, u8) -> String,
) -> (Vec<Duration>, u64) {
    let mut cluster = Cluster::new(name, nodes, Access::Open, &LAYERS);
    cluster.node_rate = node_rate.map(str::to_owned);
    let image_bytes: u64 = cluster.image.bytes.values().map(|b| b.len() as u64).sum();
    // The namespaces are the lab's, not the cold start's: made before the clock starts.
    for i in 1..=nodes {
        cluster.host(i);
    }
    let started = Instant::now();
    for i in 1..=nodes {
        let file = members(&cluster, i);
        cluster.start(i, &file, None);
    }
    cluster.wait_first(nodes, Duration::from_secs(600));
    let times = (1..=nodes)
        .map(|i| cluster.agent(i).image_at.expect("an image line") - started)
        .collect();
    (times, image_bytes)
}

/// Both runs' completion times, sorted, as dots on one time axis.
fn plot(coldstart: &[Duration], origin_only: &[Duration], limit: Duration) -> String {
    let (width, height, left, right, top, bottom) = (720.0, 360.0, 70.0, 20.0, 40.0, 50.0);
    let max = coldstart
        .iter()
        .chain(origin_only)
        .chain([&limit])
        .map(Duration::as_secs_f64)
        .fold(1.0, f64::max)
        * 1.05;
    let n = coldstart.len().max(origin_only.len()) as f64;
    let x = |s: f64| left + s / max * (width - left - right);
    let y = |rank: f64| top + (rank + 0.5) / n * (height - top - bottom);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="24" font-size="14">Per-node completion of one image ({} nodes), seconds since start</text>
"#,
        coldstart.len()
    );
    let step = match max as u64 {
        0..=12 => 1,
        13..=30 => 2,
        31..=80 => 5,
        _ => 10,
    };
    svg += &grid(&x, max, step, top, height - bottom);
    svg += &marker(x(limit.as_secs_f64()), "limit", top, height - bottom);
    for (times, color, label, row) in [
        (coldstart, "#1f77b4", "cascade", 0.0),
        (origin_only, "#d62728", "origin only", 1.0),
    ] {
        if times.is_empty() {
            continue;
        }
        let mut sorted = times.to_vec();
        sorted.sort();
        for (rank, t) in sorted.iter().enumerate() {
            svg += &format!(
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"/>
"#,
                x(t.as_secs_f64()),
                y(rank as f64)
            );
        }
        svg += &format!(
            r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"/><text x="{:.1}" y="{:.1}">{label}</text>
"#,
            width - 120.0,
            12.0 + row * 14.0,
            width - 110.0,
            16.0 + row * 14.0
        );
    }
    svg += &format!(
        r#"<text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})">nodes, by completion</text>
</svg>
"#,
        height / 2.0,
        height / 2.0
    );
    svg
}

/// A vertical line every `step` seconds up to `max`, labelled below `floor`.
fn grid(x: &dyn Fn(f64) -> f64, max: f64, step: usize, top: f64, floor: f64) -> String {
    (0..=(max as u64))
        .step_by(step)
        .map(|tick| {
            let tx = x(tick as f64);
            format!(
                r##"<line x1="{tx:.1}" y1="{top}" x2="{tx:.1}" y2="{floor:.1}" stroke="#ddd"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle">{tick}</text>
"##,
                floor + 16.0
            )
        })
        .collect()
}

/// A dashed line at `lx`, labelled above `top`.
fn marker(lx: f64, label: &str, top: f64, floor: f64) -> String {
    format!(
        r##"<line x1="{lx:.1}" y1="{top}" x2="{lx:.1}" y2="{floor:.1}" stroke="#888" stroke-dasharray="4 3"/><text x="{lx:.1}" y="{:.1}" fill="#555">{label}</text>
"##,
        top - 4.0
    )
}

/// Each size's runs with every uplink shaped: their ratios, the median's, the spread,
/// and the median runs' per-node times plotted by size.
fn by_size(args: &Args, rate: &str) -> ExitCode {
    let mut medians = Vec::new();
    for &nodes in &args.sizes {
        let mut runs: Vec<(f64, Vec<Duration>)> = (0..args.runs)
            .map(|_| {
                let (times, bytes) =
                    pull_everywhere("shaped", nodes, Some(rate), |_, _| "members.json".into());
                let limit = bytes as f64 / ORIGIN_BYTES_PER_SEC;
                let last = times.iter().max().copied().unwrap_or_default();
                (last.as_secs_f64() / limit, times)
            })
            .collect();
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let ratios: Vec<String> = runs.iter().map(|(r, _)| format!("{r:.2}")).collect();
        let (median, times) = runs.swap_remove(runs.len() / 2);
        println!("{nodes} nodes: {} (median {median:.2})", ratios.join(", "));
        println!("ratio coldstart_vs_limit_shaped_{nodes} {median:.2}");
        medians.push((nodes, median, times));
    }
    if let (Some(first), Some(last)) = (medians.first(), medians.last()) {
        println!("ratio coldstart_shaped_spread {:.2}", last.1 - first.1);
    }
    let limit = Duration::from_secs_f64(LAYERS.iter().sum::<usize>() as f64 / ORIGIN_BYTES_PER_SEC);
    if let Err(error) = std::fs::write(&args.svg, plot_by_size(&medians, limit)) {
        eprintln!("{}: {error}", args.svg.display());
    }
    println!("plot: {}", args.svg.display());
    ExitCode::SUCCESS
}

/// Each size's per-node completion times, sorted, in a band of its own.
fn plot_by_size(sizes: &[(u8, f64, Vec<Duration>)], limit: Duration) -> String {
    let (width, height, left, right, top, bottom) = (720.0, 380.0, 70.0, 20.0, 40.0, 50.0);
    let max = sizes
        .iter()
        .flat_map(|(_, _, times)| times)
        .chain([&limit.mul_f64(1.5)])
        .map(Duration::as_secs_f64)
        .fold(1.0, f64::max)
        * 1.05;
    let x = |s: f64| left + s / max * (width - left - right);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="24" font-size="14">Per-node completion, every uplink shaped like the origin's, by cluster size (s)</text>
"#
    );
    svg += &grid(&x, max, 1, top, height - bottom);
    for (factor, label) in [(1.0, "limit"), (1.5, "1.5x")] {
        svg += &marker(x(limit.as_secs_f64() * factor), label, top, height - bottom);
    }
    let colors = ["#2ca02c", "#1f77b4", "#d62728", "#9467bd", "#ff7f0e"];
    let band = (height - top - bottom) / sizes.len().max(1) as f64;
    for (i, (nodes, _, times)) in sizes.iter().enumerate() {
        let y0 = top + i as f64 * band;
        svg += &format!(
            "<text x=\"8\" y=\"{:.1}\">N={nodes}</text>\n",
            y0 + band / 2.0
        );
        let mut sorted = times.clone();
        sorted.sort();
        for (rank, t) in sorted.iter().enumerate() {
            svg += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{}\"/>\n",
                x(t.as_secs_f64()),
                y0 + (rank as f64 + 0.5) / sorted.len() as f64 * band,
                colors[i % colors.len()]
            );
        }
    }
    svg + "</svg>\n"
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !lab_available() {
        return ExitCode::FAILURE;
    }
    if let (false, Some(rate)) = (args.sizes.is_empty(), args.node_rate.as_deref()) {
        return by_size(&args, rate);
    }
    let nodes = args.nodes;
    let rate = args.node_rate.as_deref();
    let (coldstart, origin_only, image_bytes) = if args.containerd {
        println!("containerd: {nodes} nodes, one registry behind a 40 Mbit/s link");
        containerd_everywhere(nodes, rate)
    } else if let Some(rate) = rate {
        println!("cascade: {nodes} agents, the registry's and every node's egress at {rate}");
        let (coldstart, image_bytes) =
            pull_everywhere("shaped", nodes, Some(rate), |_, _| "members.json".into());
        (coldstart, None, image_bytes)
    } else {
        println!("cascade: {nodes} agents, one registry behind a 40 Mbit/s link");
        let (coldstart, image_bytes) =
            pull_everywhere("bench", nodes, None, |_, _| "members.json".into());
        println!("origin only: the same {nodes} agents, each on its own");
        let (origin_only, _) =
            pull_everywhere("solo", nodes, None, |cluster, i| cluster.write_solo(i));
        (coldstart, Some(origin_only), image_bytes)
    };
    let limit = Duration::from_secs_f64(image_bytes as f64 / ORIGIN_BYTES_PER_SEC);
    let last = |times: &[Duration]| times.iter().max().copied().unwrap_or_default();
    let cascade = last(&coldstart);
    let seconds = |t: &Duration| format!("{:.2}", t.as_secs_f64());

    println!();
    match &origin_only {
        Some(origin_only) => {
            println!("| node | cascade s | origin only s |");
            println!("|---:|---:|---:|");
            for (i, (a, b)) in coldstart.iter().zip(origin_only).enumerate() {
                println!("| {} | {} | {} |", i + 1, seconds(a), seconds(b));
            }
        }
        None => {
            println!("| node | cascade s |");
            println!("|---:|---:|");
            for (i, a) in coldstart.iter().enumerate() {
                println!("| {} | {} |", i + 1, seconds(a));
            }
        }
    }
    println!();
    print!(
        "image {:.1} MiB; limit {:.2} s; cascade done in {:.2} s",
        image_bytes as f64 / f64::from(1 << 20),
        limit.as_secs_f64(),
        cascade.as_secs_f64(),
    );
    match &origin_only {
        Some(origin_only) => println!("; origin only in {:.2} s", last(origin_only).as_secs_f64()),
        None => println!(),
    }
    let svg = plot(
        &coldstart,
        origin_only.as_deref().unwrap_or_default(),
        limit,
    );
    if let Err(error) = std::fs::write(&args.svg, svg) {
        eprintln!("{}: {error}", args.svg.display());
    }
    println!("plot: {}", args.svg.display());
    let prefix = if args.containerd { "containerd_" } else { "" };
    let Some(origin_only) = origin_only else {
        println!(
            "ratio {prefix}coldstart_vs_limit_shaped {:.2}",
            cascade.as_secs_f64() / limit.as_secs_f64()
        );
        return ExitCode::SUCCESS;
    };
    println!(
        "ratio {prefix}coldstart_vs_origin_only {:.2}",
        cascade.as_secs_f64() / last(&origin_only).as_secs_f64()
    );
    println!(
        "ratio {prefix}coldstart_vs_limit {:.2}",
        cascade.as_secs_f64() / limit.as_secs_f64()
    );
    ExitCode::SUCCESS
}

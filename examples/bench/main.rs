//! Side-by-side benchmark, in one process and one run, of the same workload through:
//! (a) this crate's behaviour, (b) `libp2p-request-response` carrying the same protobuf
//! messages with the same framing, and (c) a raw `libp2p-stream` baseline that opens a
//! stream, writes the request bytes, reads the response bytes and closes, with no
//! protocol logic. Over the memory transport and over TCP + Noise + Yamux on loopback.
//! All three are driven by one closed loop (`stats::closed_loop`) through one `Stack`
//! trait, with the same warm-up and sampling window.
//!
//! `cargo run --release --example bench [-- --quick]`. The last lines are
//! `ratio NAME VALUE`, each ours divided by the other (for latency and bytes, lower is
//! better; for throughput, higher is).

mod footprint;
mod net;
mod stacks;
mod stats;
mod work;

/// The wire types, generated from the schema by the package's build script: the bench's
/// raw stacks speak them without the crate.
#[allow(clippy::all)]
mod wire {
    include!(concat!(env!("OUT_DIR"), "/gantry.coord.v1.rs"));
}

use std::time::{Duration, Instant};

use gantry_coord::{OriginRefKind, PleasePull};

use footprint::{idle_stream_bytes, scale, Counting};
use net::Net;
use stacks::{bench, measure, Coord, Raw, RequestResponse, Stack};
use stats::{ms, us, Cell, Samples};
use work::{digest, Work};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(about = "coord beside request-response and a raw libp2p-stream baseline")]
struct Args {
    /// Run everything on one thread: without cross-thread wake-ups, it shows what
    /// scheduling adds to the tails on the default two worker threads.
    #[arg(long)]
    single_thread: bool,
    /// 0.3 s per cell in one round, instead of 1.5 s in three.
    #[arg(long)]
    quick: bool,
    /// Run one cell, such as `mem_256` (for profiling), skipping memory and scale.
    #[arg(long)]
    only: Option<String>,
    /// Run one stack only (for profiling).
    #[arg(long, value_parser = [Coord::NAME, RequestResponse::NAME, Raw::NAME])]
    stack: Option<String>,
    /// Add the cross-stack rows: each client against the other's server.
    #[arg(long)]
    cross: bool,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let mut runtime = if args.single_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(2);
        builder
    };
    runtime
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(async { tokio::spawn(run(args)).await })
        .expect("the benchmark task");
}

/// One cell: a workload at a number of requests in flight, on one transport.
struct CellSpec<'a> {
    net: Net,
    work: &'a Work,
    concurrency: usize,
    label: &'a str,
}

impl CellSpec<'_> {
    fn key(&self) -> String {
        format!("{}_{}", self.net.name(), self.label)
    }

    fn print_row(&self, stack: &str, cell: Cell) {
        println!(
            "| {} | {} | {} | {stack} | {:.0} | {} | {} | {} |",
            self.net.name(),
            self.work.name(),
            self.concurrency,
            cell.tput,
            ms(cell.p50),
            ms(cell.p99),
            us(cell.cpu_per_req)
        );
    }
}

/// Measures one cell on every selected stack, in short rounds with each stack in turn
/// and the order rotating, so that drift in the machine's state (frequency, caches,
/// other load) falls on all three alike. Returns coord, request-response, raw.
async fn measure_cell(
    spec: &CellSpec<'_>,
    duration: Duration,
    rounds: u32,
    selected: impl Fn(&str) -> bool,
) -> [Cell; 3] {
    let slice = duration / rounds;
    let (net, work, concurrency) = (spec.net, spec.work, spec.concurrency);
    let mut pooled: [Option<Samples>; 3] = [None, None, None];
    for round in 0..rounds {
        for turn in 0..3 {
            let which = (round as usize + turn) % 3;
            let name = [Coord::NAME, RequestResponse::NAME, Raw::NAME][which];
            if !selected(name) {
                continue;
            }
            let samples = match which {
                0 => bench::<Coord>(net, work, concurrency, slice).await,
                1 => bench::<RequestResponse>(net, work, concurrency, slice).await,
                _ => bench::<Raw>(net, work, concurrency, slice).await,
            };
            match &mut pooled[which] {
                Some(pool) => pool.merge(samples),
                slot => *slot = Some(samples),
            }
        }
    }
    pooled.map(|samples| samples.map(Samples::summary).unwrap_or_default())
}

/// Both stacks speak the same wire, so each can ask the other: this tells which side of
/// a difference between them is the client and which the server.
async fn cross(spec: &CellSpec<'_>, duration: Duration) {
    let (net, work, concurrency) = (spec.net, spec.work, spec.concurrency);
    let rr_server = RequestResponse::serve(net, work).await;
    let coord_to_rr = measure::<Coord>(net, &rr_server, work, concurrency, duration).await;
    drop(rr_server);
    let coord_server = Coord::serve(net, work).await;
    let rr_to_coord =
        measure::<RequestResponse>(net, &coord_server, work, concurrency, duration).await;
    spec.print_row("coord client -> rr server", coord_to_rr.summary());
    spec.print_row("rr client -> coord server", rr_to_coord.summary());
}

fn ratios_of(key: &str, [coord, rr, raw]: [Cell; 3]) -> Vec<(String, f64)> {
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let secs = Duration::as_secs_f64;
    vec![
        (format!("tput_vs_rr_{key}"), div(coord.tput, rr.tput)),
        (
            format!("p99_vs_rr_{key}"),
            div(secs(&coord.p99), secs(&rr.p99)),
        ),
        (
            format!("cpu_vs_rr_{key}"),
            div(secs(&coord.cpu_per_req), secs(&rr.cpu_per_req)),
        ),
        (format!("tput_vs_raw_{key}"), div(coord.tput, raw.tput)),
        (
            format!("p99_vs_raw_{key}"),
            div(secs(&coord.p99), secs(&raw.p99)),
        ),
    ]
}

async fn run(args: Args) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let duration = Duration::from_millis(if args.quick { 300 } else { 1500 });
    let rounds: u32 = if args.quick { 1 } else { 3 };
    let query = Work::Query(digest(7));
    let batch = Work::Batch(
        PleasePull::new(
            "registry.example.com",
            "library/demo",
            OriginRefKind::Blob,
            (0..250).map(digest).collect(),
        )
        .expect("a valid batch"),
    );
    // A please_pull of 1,000 digests goes as 4 requests of 250 in flight at once: one
    // request carries at most 256, as the newer Go client sends.
    let workloads: [(&Work, usize, &str); 4] = [
        (&query, 1, "1"),
        (&query, 16, "16"),
        (&query, 256, "256"),
        (&batch, 4, "pp1000"),
    ];
    let selected = |name: &str| args.stack.as_deref().is_none_or(|s| s == name);
    let started = Instant::now();
    let mut ratios: Vec<(String, f64)> = Vec::new();
    println!(
        "measuring {} ms per stack and cell, in {rounds} rounds after a warm-up each (2 cores, one process)",
        ms(duration)
    );
    println!();
    println!("| net | workload | in flight | stack | req/s | p50 ms | p99 ms | CPU µs/req |");
    println!("|---|---|---|---|---:|---:|---:|---:|");
    for net in [Net::Memory, Net::Tcp] {
        for (work, concurrency, label) in workloads {
            let spec = CellSpec {
                net,
                work,
                concurrency,
                label,
            };
            if args.only.as_ref().is_some_and(|o| *o != spec.key()) {
                continue;
            }
            let cells = measure_cell(&spec, duration, rounds, selected).await;
            for (stack, cell) in [Coord::LABEL, RequestResponse::LABEL, Raw::LABEL]
                .into_iter()
                .zip(cells)
            {
                spec.print_row(stack, cell);
            }
            ratios.extend(ratios_of(&spec.key(), cells));
        }
    }

    if args.cross {
        for net in [Net::Memory, Net::Tcp] {
            let spec = CellSpec {
                net,
                work: &query,
                concurrency: 16,
                label: "16",
            };
            cross(&spec, duration).await;
        }
    }
    if args.only.is_some() {
        return;
    }
    let coord_bytes = idle_stream_bytes(true).await;
    let rr_bytes = idle_stream_bytes(false).await;
    println!();
    println!("idle inbound stream, heap bytes each (512 streams, memory transport): coord {coord_bytes:.0}, request-response {rr_bytes:.0}");
    ratios.push(("idle_stream_bytes_vs_rr".into(), coord_bytes / rr_bytes));

    let one = scale(1, 4, duration).await;
    let many = scale(200, 4, duration).await;
    println!(
        "scale, coord, 4 queries in flight per peer (memory transport): 1 peer {:.0} req/s p99 {} ms; 200 peers {:.0} req/s p99 {} ms",
        one.tput,
        ms(one.p99),
        many.tput,
        ms(many.p99)
    );
    ratios.push(("scale_tput_200_vs_1".into(), many.tput / one.tput));
    ratios.push((
        "scale_p99_200_vs_1".into(),
        many.p99.as_secs_f64() / one.p99.as_secs_f64(),
    ));

    println!();
    println!("finished in {:.1} s", started.elapsed().as_secs_f64());
    for (name, value) in ratios {
        println!("ratio {name} {value:.2}");
    }
}

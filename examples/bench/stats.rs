//! The closed loop every stack is driven by, and what it measures.

use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

#[derive(Debug, Clone, Copy, Default)]
pub struct Cell {
    pub tput: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub cpu_per_req: Duration,
}

/// The whole process's user and system time: fields 14 and 15 of /proc/self/stat, in
/// clock ticks (100 Hz).
pub fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// What one closed loop measured.
pub struct Samples {
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
    pub cpu: Duration,
}

impl Samples {
    pub fn summary(self) -> Cell {
        summarize(self.latencies, self.elapsed, self.cpu)
    }

    /// Pools another round of the same cell into this one.
    pub fn merge(&mut self, other: Samples) {
        self.latencies.extend(other.latencies);
        self.elapsed += other.elapsed;
        self.cpu += other.cpu;
    }
}

pub fn summarize(mut latencies: Vec<Duration>, elapsed: Duration, cpu: Duration) -> Cell {
    latencies.sort_unstable();
    let n = latencies.len().max(1);
    Cell {
        tput: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: latencies.get(n / 2).copied().unwrap_or_default(),
        p99: latencies.get(n * 99 / 100).copied().unwrap_or_default(),
        cpu_per_req: cpu / n as u32,
    }
}

/// Keeps `concurrency` requests in flight for `duration` (after a warm-up of a fifth of
/// it) and returns the latencies and the measured span. `send` issues one request and
/// returns its key; `next_response` awaits the key of the next completed request.
pub async fn closed_loop<K: Hash + Eq + Copy, S>(
    state: &mut S,
    concurrency: usize,
    duration: Duration,
    mut send: impl FnMut(&mut S) -> K,
    mut next_response: impl AsyncFnMut(&mut S) -> K,
) -> Samples {
    let warmup = duration / 5;
    let mut in_flight: HashMap<K, Instant> = HashMap::new();
    for _ in 0..concurrency {
        in_flight.insert(send(state), Instant::now());
    }
    let started = Instant::now();
    let mut measuring_since = None;
    let mut cpu_start = Duration::ZERO;
    let mut latencies = Vec::new();
    loop {
        let key = next_response(state).await;
        let Some(sent) = in_flight.remove(&key) else {
            continue;
        };
        let now = Instant::now();
        match measuring_since {
            None if now - started >= warmup => {
                measuring_since = Some(now);
                cpu_start = process_cpu();
            }
            Some(since) => {
                latencies.push(now - sent);
                if now - since >= duration {
                    let cpu = process_cpu().saturating_sub(cpu_start);
                    // Drain what is still in flight before the next cell.
                    while !in_flight.is_empty() {
                        let key = next_response(state).await;
                        in_flight.remove(&key);
                    }
                    return Samples {
                        latencies,
                        elapsed: now - since,
                        cpu,
                    };
                }
            }
            None => {}
        }
        in_flight.insert(send(state), Instant::now());
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

pub fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

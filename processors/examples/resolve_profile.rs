//! The resolve benchmark's workload without criterion, for profilers and quick comparisons.
//!
//! `cargo run --release -p processors --example resolve_profile -- [MIX] [WRITES]` creates the
//! documents of `benches/resolve.rs` (`BENCH_DOCS`, default 10,000), runs `WRITES` (default
//! 100,000) writes of `MIX` (`patch`, `set`, `mixed` or `patch_stale`; default `patch`) and
//! prints writes per second by wall clock and, on Linux, by the process's CPU time (steadier on a
//! shared machine). Only `workload::apply_writes` is the measured work, so callgrind can count it
//! alone: `valgrind --tool=callgrind --toggle-collect='*apply_writes*' <binary> patch 10000`
//! (it also runs one warm-up chunk, so divide by `WRITES + 1000`).

use std::time::{Duration, Instant};

use processors::{DiffContext, Limits};

#[path = "../benches/workload/mod.rs"]
mod workload;

use workload::{apply_writes, Mix, Workload, CHUNK};

/// User + system CPU time of this process in seconds, where `/proc` has it (10 ms ticks).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map_or("patch", String::as_str);
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let Some(mix) = Mix::named(name) else {
        eprintln!("unknown mix {name:?}: patch, set, mixed or patch_stale");
        std::process::exit(2);
    };
    let mut workload = Workload::new(mix);
    let limits = Limits::default();
    let mut clock = 10u64;
    let mut run = |workload: &mut Workload, n: usize| {
        let writes = workload.writes(n, clock);
        clock += n as u64;
        let ctx = DiffContext {
            limits: &limits,
            received_at_ms: clock,
            max_skew_ms: 60_000,
        };
        let cpu = cpu_seconds();
        let start = Instant::now();
        apply_writes(&mut workload.state, &writes, &ctx);
        let wall = start.elapsed();
        (wall, cpu_seconds().zip(cpu).map(|(b, a)| b - a))
    };
    run(&mut workload, CHUNK); // warm-up
    let (mut wall, mut cpu) = (Duration::ZERO, Some(0.0));
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK);
        left -= k;
        let (w, c) = run(&mut workload, k);
        wall += w;
        cpu = cpu.zip(c).map(|(a, b)| a + b);
    }
    let per_second = |secs: f64| n as f64 / secs;
    match cpu {
        Some(cpu) if cpu > 0.0 => println!(
            "{name}: {n} writes, {:.0} writes/s (wall), {:.0} writes/s (CPU time)",
            per_second(wall.as_secs_f64()),
            per_second(cpu)
        ),
        _ => println!(
            "{name}: {n} writes, {:.0} writes/s (wall)",
            per_second(wall.as_secs_f64())
        ),
    }
}

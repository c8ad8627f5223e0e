//! The resolve benchmark's workload without criterion, for profilers and quick comparisons.
//!
//! `cargo run --release -p processors --example resolve_profile -- [MIX] [WRITES] [batch]` creates the
//! documents of `benches/resolve.rs` (`BENCH_DOCS`, default 10,000), runs `WRITES` (default
//! 100,000) writes of `MIX` (`patch`, `set`, `mixed` or `patch_stale`; default `patch`) and
//! prints writes per second by wall clock and, on Linux, by the process's CPU time (steadier on a
//! shared machine). With `batch`, each chunk of 1,000 writes is resolved as one batch
//! (`workload::apply_writes_batched`, with read-ahead), as the `resolve_batch` bench group does.
//! Only `workload::apply_writes*` is the measured work, so callgrind can count it
//! alone: `valgrind --tool=callgrind --toggle-collect='*apply_writes*' <binary> patch 10000`
//! (it also runs one warm-up chunk, so divide by `WRITES + 1000`). It also prints the heap
//! allocations per write of the measured work (a counting wrapper around the allocator). With
//! `--features mimalloc` the allocator is mimalloc instead of the system's.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use processors::{DiffContext, Limits};

#[path = "../benches/workload/mod.rs"]
mod workload;

use workload::{apply_writes, apply_writes_batched, Mix, Workload, CHUNK};

/// The allocator being measured: mimalloc with `--features mimalloc`, else the system's.
#[cfg(feature = "mimalloc")]
const INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(not(feature = "mimalloc"))]
const INNER: std::alloc::System = std::alloc::System;

/// [`INNER`], counting allocations (this program is single-threaded, so a plain load and store
/// suffice: a few instructions per allocation).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on to `INNER` unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.store(ALLOCATIONS.load(Relaxed) + 1, Relaxed);
        unsafe { INNER.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { INNER.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.store(ALLOCATIONS.load(Relaxed) + 1, Relaxed);
        unsafe { INNER.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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
    let batched = args.get(3).is_some_and(|a| a == "batch");
    let apply = if batched {
        apply_writes_batched
    } else {
        apply_writes
    };
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
        let allocations = ALLOCATIONS.load(Relaxed);
        let start = Instant::now();
        apply(&mut workload.state, &writes, &ctx);
        let wall = start.elapsed();
        let allocations = ALLOCATIONS.load(Relaxed) - allocations;
        (
            wall,
            cpu_seconds().zip(cpu).map(|(b, a)| b - a),
            allocations,
        )
    };
    run(&mut workload, CHUNK); // warm-up
    let (mut wall, mut cpu, mut allocations) = (Duration::ZERO, Some(0.0), 0);
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK);
        left -= k;
        let (w, c, a) = run(&mut workload, k);
        wall += w;
        cpu = cpu.zip(c).map(|(a, b)| a + b);
        allocations += a;
    }
    let label = if batched {
        format!("{name} batch")
    } else {
        name.to_string()
    };
    let per_write = allocations as f64 / n as f64;
    let per_second = |secs: f64| n as f64 / secs;
    match cpu {
        Some(cpu) if cpu > 0.0 => println!(
            "{label}: {n} writes, {:.0} writes/s (wall), {:.0} writes/s (CPU time), \
             {per_write:.1} allocations/write",
            per_second(wall.as_secs_f64()),
            per_second(cpu)
        ),
        _ => println!(
            "{label}: {n} writes, {:.0} writes/s (wall), {per_write:.1} allocations/write",
            per_second(wall.as_secs_f64())
        ),
    }
}

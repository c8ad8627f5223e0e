//! The resolve benchmark's workload without criterion, for profilers and quick comparisons.
//!
//! `cargo run --release -p processors --example resolve_profile -- [MIX] [WRITES] [MODE]`
//! creates the documents of `benches/resolve.rs` (`BENCH_DOCS`, default 10,000), runs `WRITES`
//! (default 100,000) writes of `MIX` (`patch`, `set`, `mixed`, `patch_stale` or `create`; default `patch`)
//! and prints writes per second: by wall clock, by the process's CPU time on Linux (steadier on a
//! shared machine), and the median of the 1,000-write chunks. It also prints the heap
//! allocations per write of the measured work (a counting wrapper around the allocator).
//!
//! `MODE` is `single` (the default: `compute_diff` and `resolve_lww` write by write, as the
//! `resolve` bench group), `batch` (each chunk through `resolve_batch` with read-ahead, as the
//! `resolve_batch` group) or `both`: both, each with its own documents, chunk by chunk in turn
//! in one process, so that a busy machine slows both alike (compare the medians).
//!
//! Only `workload::apply_writes*` is the measured work, so callgrind can count it alone:
//! `valgrind --tool=callgrind --toggle-collect='*apply_writes*' <binary> patch 10000` (it also
//! runs one warm-up chunk, so divide by `WRITES + 1000`). With `--features mimalloc` the
//! allocator is mimalloc instead of the system's.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use processors::{DiffContext, Limits, MemState, Write};

#[path = "../benches/workload/mod.rs"]
mod workload;

use workload::{apply_writes, apply_writes_batched, Mix, Workload, CHUNK};

/// The allocator being measured: mimalloc with `--features mimalloc`, else the system's.
#[cfg(feature = "mimalloc")]
const INNER: mialloc::MiMalloc = mialloc::MiMalloc;
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

/// One way of applying writes, with its own documents and what it measured.
struct Runner {
    label: String,
    apply: fn(&mut MemState, Vec<Write>, &DiffContext<'_>),
    workload: Workload,
    wall: Duration,
    cpu: Option<f64>,
    allocations: u64,
    /// Wall time of each measured chunk.
    chunks: Vec<Duration>,
}

impl Runner {
    fn new(label: String, batched: bool, mix: Mix) -> Self {
        Runner {
            label,
            apply: if batched {
                apply_writes_batched
            } else {
                apply_writes
            },
            workload: Workload::new(mix),
            wall: Duration::ZERO,
            cpu: Some(0.0),
            allocations: 0,
            chunks: Vec::new(),
        }
    }

    /// Applies `n` new writes with clocks from `clock` on; `measured` adds them to the figures.
    fn run(&mut self, n: usize, clock: u64, limits: &Limits, measured: bool) {
        let writes = self.workload.writes(n, clock);
        let ctx = DiffContext {
            limits,
            received_at_ms: clock + n as u64,
            max_skew_ms: 60_000,
        };
        let cpu = cpu_seconds();
        let allocations = ALLOCATIONS.load(Relaxed);
        let start = Instant::now();
        (self.apply)(&mut self.workload.state, writes, &ctx);
        let wall = start.elapsed();
        let allocations = ALLOCATIONS.load(Relaxed) - allocations;
        if measured {
            self.wall += wall;
            self.chunks.push(wall);
            self.cpu = self
                .cpu
                .zip(cpu_seconds().zip(cpu))
                .map(|(t, (b, a))| t + b - a);
            self.allocations += allocations;
        }
    }

    fn report(&mut self, n: usize) {
        let per_second = |secs: f64| n as f64 / secs;
        self.chunks.sort();
        let median = self.chunks[self.chunks.len() / 2].as_secs_f64() / CHUNK as f64;
        let cpu = match self.cpu {
            Some(cpu) if cpu > 0.0 => format!(", {:.0} writes/s (CPU time)", per_second(cpu)),
            _ => String::new(),
        };
        println!(
            "{}: {n} writes, {:.0} writes/s (wall){cpu}, {:.0} writes/s (median chunk), \
             {:.1} allocations/write",
            self.label,
            per_second(self.wall.as_secs_f64()),
            1.0 / median,
            self.allocations as f64 / n as f64
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map_or("patch", String::as_str);
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let Some(mix) = Mix::named(name) else {
        eprintln!("unknown mix {name:?}: patch, set, mixed or patch_stale");
        std::process::exit(2);
    };
    let batched: &[bool] = match args.get(3).map(String::as_str) {
        None | Some("single") => &[false],
        Some("batch") => &[true],
        Some("both") => &[false, true],
        Some(other) => {
            eprintln!("unknown mode {other:?}: single, batch or both");
            std::process::exit(2);
        }
    };
    let mut runners: Vec<Runner> = batched
        .iter()
        .map(|&b| Runner::new(format!("{name}{}", if b { " batch" } else { "" }), b, mix))
        .collect();
    let limits = Limits::default();
    let mut clock = 10u64;
    for runner in &mut runners {
        runner.run(CHUNK, clock, &limits, false); // warm-up
    }
    clock += CHUNK as u64;
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK);
        left -= k;
        // Alternate which goes first, so both meet the machine's moods alike.
        let first = (left / CHUNK) % runners.len();
        for i in 0..runners.len() {
            let r = (first + i) % runners.len();
            runners[r].run(k, clock, &limits, true);
        }
        clock += k as u64;
    }
    for runner in &mut runners {
        runner.report(n);
    }
}

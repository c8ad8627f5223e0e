//! The resolve benchmark's workload without criterion, for profilers and quick comparisons.
//!
//! `cargo run --release -p processors --example resolve_profile -- [MIX] [WRITES] [MODE]`
//! creates the documents of `benches/resolve.rs` (`BENCH_DOCS`, default 10,000), runs `WRITES`
//! (default 100,000) writes of `MIX` (`patch`, `set`, `mixed`, `patch_stale` or `create`; default `patch`)
//! and prints writes per second: by wall clock, by the measuring thread's CPU time (steadier on
//! a shared machine), and the median of the 1,000-write chunks. It also prints the heap
//! allocations per write of the measured work (a counting wrapper around the allocator).
//! Writes are generated outside the measurement right before they are applied: 16 at a time
//! one at a time (`PROFILE_MADE=N` for another count), a whole chunk for batches.
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

use workload::{apply_writes, apply_writes_batched, Mix, Workload, CHUNK, HOT};

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

/// CPU time of this thread in seconds (`CLOCK_THREAD_CPUTIME_ID`), if the clock can be read.
fn cpu_seconds() -> Option<f64> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec; the call writes only into it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    (rc == 0).then_some(t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9)
}

/// One way of applying writes, with its own documents and what it measured.
struct Runner {
    label: String,
    apply: fn(&mut MemState, Vec<Write>, &DiffContext<'_>),
    /// Writes generated at a time, right before they are applied.
    made: usize,
    workload: Workload,
    wall: Duration,
    cpu: Option<f64>,
    allocations: u64,
    /// Wall time of each measured chunk.
    chunks: Vec<Duration>,
}

impl Runner {
    fn new(label: String, batched: bool, mix: Mix, made: Option<usize>) -> Self {
        Runner {
            label,
            apply: if batched {
                apply_writes_batched
            } else {
                apply_writes
            },
            made: made.unwrap_or(if batched { CHUNK } else { HOT }),
            workload: Workload::new(mix),
            wall: Duration::ZERO,
            cpu: Some(0.0),
            allocations: 0,
            chunks: Vec::new(),
        }
    }

    /// Applies `n` new writes with clocks from `clock` on, generated [`Runner::made`] at a
    /// time; `measured` adds them to the figures (as one chunk).
    fn run(&mut self, n: usize, clock: u64, limits: &Limits, measured: bool) {
        let ctx = DiffContext {
            limits,
            received_at_ms: clock + n as u64,
            max_skew_ms: 60_000,
        };
        let (mut wall, mut cpu, mut allocations) = (Duration::ZERO, Some(0.0), 0);
        let mut done = 0;
        while done < n {
            let k = (n - done).min(self.made);
            let writes = self.workload.writes(k, clock + done as u64);
            let cpu_before = cpu_seconds();
            let allocations_before = ALLOCATIONS.load(Relaxed);
            let start = Instant::now();
            (self.apply)(&mut self.workload.state, writes, &ctx);
            wall += start.elapsed();
            allocations += ALLOCATIONS.load(Relaxed) - allocations_before;
            cpu = cpu
                .zip(cpu_seconds().zip(cpu_before))
                .map(|(t, (b, a))| t + b - a);
            done += k;
        }
        if measured {
            self.wall += wall;
            self.chunks.push(wall);
            self.cpu = self.cpu.zip(cpu).map(|(t, c)| t + c);
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
    // `PROFILE_MADE=1000` generates one-at-a-time writes 1,000 at a time, as before 2026-12-04.
    let made = std::env::var("PROFILE_MADE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&m| m > 0);
    let mut runners: Vec<Runner> = batched
        .iter()
        .map(|&b| {
            Runner::new(
                format!("{name}{}", if b { " batch" } else { "" }),
                b,
                mix,
                made,
            )
        })
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

//! Throughput of the core: `compute_diff` + `resolve_lww` over an in-memory [`MemState`].
//!
//! 10,000 realistic documents (10–50 leaf fields, about a third of them nested one or two levels
//! deep; set `BENCH_DOCS` for another count) are created first; the measured writes then go to
//! random documents:
//!
//! - `patch`: merge patches changing 1–5 fields (the common case);
//! - `set`: full-document replaces (every field rewritten, so most values change);
//! - `mixed`: 90 % patches, 8 % sets, 2 % deletes (a deleted document is revived by the next write);
//! - `patch_stale`: `patch`, but every write claims to have seen only version 1 and comes from
//!   another device than the fields' last writer, so almost every write reports
//!   `stale_base_version` conflicts (the cost of conflict reporting).
//!
//! Writes are generated in chunks of 1,000 outside the measurement, so they are in cache as
//! right after decoding, while the documents they hit are not. Every write gets a fresh,
//! increasing HLC, so each one wins, as in steady state. Run with
//! `cargo bench -p processors --bench resolve`; `thrpt` is writes per second on one core. The
//! workload lives in `benches/workload/`; `examples/resolve_profile.rs` runs it without criterion,
//! for profilers (see `docs/BENCHMARKS.md`).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use processors::{DiffContext, Limits};

mod workload;

use workload::{apply_writes, Mix, Workload, CHUNK};

fn run(c: &mut Criterion, name: &str, mix: Mix) {
    let mut workload = Workload::new(mix);
    let limits = Limits::default();
    let mut clock = 10u64;
    let mut group = c.benchmark_group("resolve");
    group.throughput(Throughput::Elements(1));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            while left > 0 {
                let n = left.min(CHUNK);
                left -= n;
                let writes = workload.writes(n, clock);
                clock += n as u64;
                let ctx = DiffContext {
                    limits: &limits,
                    received_at_ms: clock,
                    max_skew_ms: 60_000,
                };
                let start = Instant::now();
                apply_writes(&mut workload.state, &writes, &ctx);
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    for name in ["patch", "set", "mixed", "patch_stale"] {
        run(c, name, Mix::named(name).expect("a known mix"));
    }
}

criterion_group! {
    name = resolve;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = benches
}
criterion_main!(resolve);

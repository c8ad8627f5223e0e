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
//! - `create`: full sets of new documents (the first write of each; half of the pipeline
//!   benchmark's records). Every write adds a document, so the state grows as the bench runs.
//!
//! Group `resolve` resolves each write as it comes (`compute_diff`, then `resolve_lww`); group
//! `resolve_batch` runs each chunk of 1,000 writes as a pipeline batch would: `compute_diff` of
//! every write, then `resolve_batch`, which reads the next documents' state ahead.
//!
//! Writes are generated outside the measurement: for group `resolve` 16 at a time
//! (`workload::HOT`), so each is in the caches when it is resolved, as right after decoding,
//! while the documents they hit are not; for group `resolve_batch` a whole batch of 1,000 at a
//! time, so many of its writes have left the L2 cache by the time they are resolved. The measured work consumes
//! them, as the pipeline does, so dropping what is left of each write is measured too. Every write gets a fresh,
//! increasing HLC, so each one wins, as in steady state. Run with
//! `cargo bench -p processors --bench resolve` (with `--features mimalloc`, mimalloc is the
//! allocator); `thrpt` is writes per second on one core. The
//! workload lives in `benches/workload/`; `examples/resolve_profile.rs` runs it without criterion,
//! for profilers (see `docs/BENCHMARKS.md`).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use processors::{DiffContext, Limits};

mod workload;

/// With `--features mimalloc`, the benchmark allocates with mimalloc instead of the system's
/// allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mialloc::MiMalloc = mialloc::MiMalloc;

use workload::{apply_writes, apply_writes_batched, Mix, Workload, CHUNK, HOT};

/// How a chunk of writes is applied: one at a time, or as one batch.
type Apply = fn(&mut processors::MemState, Vec<processors::Write>, &DiffContext<'_>);

/// Runs `apply` over writes generated `made` at a time.
fn run(c: &mut Criterion, group: &str, name: &str, mix: Mix, apply: Apply, made: usize) {
    // Made when the benchmark first runs: one left out by a filter makes no documents (making
    // and dropping them would leave the allocator's heap different for the next one).
    let mut workload: Option<Workload> = None;
    let limits = Limits::default();
    let mut clock = 10u64;
    let mut group = c.benchmark_group(group);
    group.throughput(Throughput::Elements(1));
    group.bench_function(name, |b| {
        let workload = workload.get_or_insert_with(|| Workload::new(mix));
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            while left > 0 {
                let n = left.min(made);
                left -= n;
                let writes = workload.writes(n, clock);
                clock += n as u64;
                let ctx = DiffContext {
                    limits: &limits,
                    received_at_ms: clock,
                    max_skew_ms: 60_000,
                };
                let start = Instant::now();
                apply(&mut workload.state, writes, &ctx);
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    for name in ["patch", "set", "mixed", "patch_stale", "create"] {
        let mix = Mix::named(name).expect("a known mix");
        run(c, "resolve", name, mix, apply_writes, HOT);
        run(c, "resolve_batch", name, mix, apply_writes_batched, CHUNK);
    }
}

criterion_group! {
    name = resolve;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = benches
}
criterion_main!(resolve);

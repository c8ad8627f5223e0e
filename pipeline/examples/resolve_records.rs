//! The resolver's per-record work without Kafka (issue 4): what `Resolver::process_batch` does
//! with the records of `data.changed` apart from consuming and producing them, over the workload
//! of `resolver_bench`, on one thread:
//!
//! 1. per record, [`decide`] (decode, route, diff, resolve against the task's sled state through
//!    an [`Overlay`]), then the JSON of its `sync.events` and `conflict.detected` records;
//! 2. per batch and partition, the changelog records of the changed state, written to sled as
//!    the resolver writes them (`state::store::write_records`; the same bytes it produces to the
//!    changelog).
//!
//! Kafka's share of the cost (librdkafka's threads, copying records into the producer, the
//! broker) is not here: this is the part SyncFlow's own code decides, measured without the noise
//! of a broker on the same two cores.
//!
//! ```text
//! cargo build --release -p pipeline --example resolve_records
//! target/release/examples/resolve_records [--events 100000] [--batch 5000] [--seed 42]
//! valgrind --tool=callgrind --toggle-collect='*process_records*' \
//!     target/release/examples/resolve_records --events 20000        # instructions / events
//! ```
//!
//! It prints records/s and CPU µs per record (this process's CPU time, which includes sled's
//! background thread), and the records' mix. Only `process_records` is the measured work.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use clap::Parser;
use pipeline::partition::partition_for;
use pipeline::resolver::{decide, Decision, InputRecord};
use state::{Overlay, TaskStore};

/// The allocator of the `syncflow` binary.
#[global_allocator]
static GLOBAL: mialloc::MiMalloc = mialloc::MiMalloc;

#[path = "bench_workload/mod.rs"]
mod bench_workload;

use bench_workload::{now_ms, Workload};

#[derive(Parser)]
#[command(about = "The resolver's per-record work without Kafka: CPU per record")]
struct Args {
    /// Records to generate and process (measured).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Records processed before the measured ones (not measured): later records find more
    /// documents to patch.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Records per batch (the resolver's `resolver.batch_max`).
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Partitions of `data.changed` (one state tree each).
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Workload seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// One generated `data.changed` record.
struct Record {
    key: String,
    payload: Vec<u8>,
    partition: i32,
}

/// What the measured work produced, so that nothing is optimised away and the run can be checked.
#[derive(Default)]
struct Produced {
    events: u64,
    conflicts: u64,
    rejected: u64,
    output_bytes: u64,
    changelog_records: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.batch > 0 && args.partitions > 0,
        "--batch and --partitions must be positive"
    );
    let mut workload = Workload::new(args.seed);
    let mut generate = |range: std::ops::Range<usize>| -> Vec<Record> {
        range
            .map(|i| {
                let (key, payload) = workload.next(&format!("rec-{i}"));
                let partition = partition_for(key.as_bytes(), args.partitions);
                Record {
                    key,
                    payload,
                    partition,
                }
            })
            .collect()
    };
    let warmup = generate(0..args.warmup);
    let records = generate(args.warmup..args.warmup + args.events);
    let store = TaskStore::temporary()?;
    let tasks = Tasks {
        trees: (0..args.partitions)
            .map(|p| store.task(p).map(|t| (p, t)))
            .collect::<Result<_, _>>()?,
        partitions: args.partitions,
        limits: processors::Limits::default(),
    };
    let mut produced = Produced::default();
    for batch in warmup.chunks(args.batch) {
        run_batch(&tasks, batch, &mut produced)?;
    }

    let mut produced = Produced::default();
    let cpu = cpu_seconds();
    let start = Instant::now();
    for batch in records.chunks(args.batch) {
        process_records(&tasks, batch, &mut produced)?;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu).map(|(b, a)| b - a);

    let n = records.len() as f64;
    let count = |op: &str| {
        let tag = format!("\"op\":\"{op}\"");
        records
            .iter()
            .filter(|r| String::from_utf8_lossy(&r.payload).contains(&tag))
            .count()
    };
    let bytes: usize = records.iter().map(|r| r.payload.len()).sum();
    println!(
        "records:  {} measured after {} not measured ({} sets, {} patches, {} deletes; avg {} B), \
         batches of {}, {} partitions",
        records.len(),
        warmup.len(),
        count("set"),
        count("patch"),
        count("delete"),
        bytes / records.len().max(1),
        args.batch,
        args.partitions
    );
    println!(
        "produced: {} sync.events, {} conflicts, {} rejected, {:.1} MB of event JSON, {} changelog records",
        produced.events,
        produced.conflicts,
        produced.rejected,
        produced.output_bytes as f64 / 1e6,
        produced.changelog_records
    );
    match cpu {
        Some(cpu) if cpu > 0.0 => println!(
            "speed:    {:.0} records/s (wall), {:.0} records/s (CPU time), {:.1} µs CPU per record",
            n / wall,
            n / cpu,
            cpu * 1e6 / n
        ),
        _ => println!("speed:    {:.0} records/s (wall)", n / wall),
    }
    Ok(())
}

/// What the resolver's tasks work with: a state tree per partition and the limits.
struct Tasks {
    trees: BTreeMap<i32, state::sled::Tree>,
    partitions: i32,
    limits: processors::Limits,
}

/// The measured work: [`run_batch`] (a separate function, so that callgrind's
/// `--toggle-collect` counts only the measured batches).
#[inline(never)]
fn process_records(tasks: &Tasks, batch: &[Record], produced: &mut Produced) -> anyhow::Result<()> {
    run_batch(tasks, batch, produced)
}

/// One batch, as `process_batch` runs it (each partition's records in order), without Kafka.
#[inline(never)]
fn run_batch(tasks: &Tasks, batch: &[Record], produced: &mut Produced) -> anyhow::Result<()> {
    let mut by_partition: BTreeMap<i32, Vec<&Record>> = BTreeMap::new();
    for r in batch {
        by_partition.entry(r.partition).or_default().push(r);
    }
    let now = now_ms();
    for (p, records) in by_partition {
        let tree = &tasks.trees[&p];
        let mut overlay = Overlay::new(tree);
        for r in records {
            let input = InputRecord {
                key: Some(r.key.as_bytes()),
                payload: &r.payload,
                partition: p,
                timestamp_ms: now,
                control_error: None,
            };
            match decide(
                &mut overlay,
                &input,
                tasks.partitions,
                &tasks.limits,
                60_000,
            )? {
                Decision::Applied { applied, .. } => {
                    if let Some(event) = &applied.change {
                        let json = serde_json::to_vec(event)?;
                        produced.events += 1;
                        produced.output_bytes += black_box(json).len() as u64;
                    }
                    for conflict in &applied.conflicts {
                        let json = serde_json::to_vec(conflict)?;
                        produced.conflicts += 1;
                        produced.output_bytes += black_box(json).len() as u64;
                    }
                }
                Decision::Rejected(_) => produced.rejected += 1,
                Decision::Forward { .. } | Decision::Nothing => {}
            }
        }
        let pairs = overlay.changelog_records();
        produced.changelog_records += pairs.len() as u64;
        state::store::write_records(tree, pairs, None)?;
    }
    Ok(())
}

/// User + system CPU time of this process in seconds, where `/proc` has it (10 ms ticks).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

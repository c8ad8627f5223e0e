//! Throughput of the core: `compute_diff` + `resolve_lww` over an in-memory [`MemState`].
//!
//! 10,000 realistic documents (10–50 leaf fields, about a third of them nested one or two levels
//! deep) are created first; the measured writes are then
//!
//! - `patch`: merge patches changing 1–5 fields of a random document (the common case);
//! - `set`: full-document replaces of a random document with 1–5 fields changed;
//! - `mixed`: 90 % patches, 8 % sets, 2 % deletes (a deleted document is revived by the next write).
//!
//! Every write gets a fresh, increasing HLC, so each one wins and changes the document, as in
//! steady-state production. Run with `cargo bench -p processors --bench resolve`; the
//! `thrpt` line is writes per second on one core.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use processors::{compute_diff, resolve_lww, DiffContext, Hlc, Limits, MemState, Write, WriteOp};
use serde_json::{json, Map, Value};

fn docs() -> usize {
    std::env::var("BENCH_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}
const WRITES: usize = 50_000;
const DEVICES: usize = 8;

/// A small deterministic generator (xorshift64*), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One leaf of the document shape: its path and how to make a value for it.
#[derive(Clone)]
struct Field {
    path: Vec<String>,
    kind: u8,
}

fn value(rng: &mut Rng, kind: u8) -> Value {
    match kind {
        0 => json!(rng.below(1_000_000)),
        1 => json!(format!("value-{}", rng.below(100_000))),
        2 => json!(rng.below(2) == 0),
        3 => json!(rng.below(1000) as f64 / 7.0),
        _ => json!([
            rng.below(100),
            rng.below(100),
            format!("tag{}", rng.below(10))
        ]),
    }
}

/// A shape of 10–50 leaves, about a third nested under `profile`, `address` or `stats.daily`.
fn shape(rng: &mut Rng) -> Vec<Field> {
    let n = 10 + rng.below(41);
    (0..n)
        .map(|i| {
            let name = format!("field_{i}");
            let path = match rng.below(9) {
                0 => vec!["profile".to_string(), name],
                1 => vec!["address".to_string(), name],
                2 => vec!["stats".to_string(), "daily".to_string(), name],
                _ => vec![name],
            };
            Field {
                path,
                kind: rng.below(5) as u8,
            }
        })
        .collect()
}

fn insert(obj: &mut Map<String, Value>, path: &[String], v: Value) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut cur = obj;
    for p in parents {
        cur = cur
            .entry(p.clone())
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .expect("shape nests objects only");
    }
    cur.insert(last.clone(), v);
}

fn full_doc(rng: &mut Rng, fields: &[Field]) -> Map<String, Value> {
    let mut doc = Map::new();
    for f in fields {
        insert(&mut doc, &f.path, value(rng, f.kind));
    }
    doc
}

fn partial_patch(rng: &mut Rng, fields: &[Field]) -> Map<String, Value> {
    let mut patch = Map::new();
    for _ in 0..1 + rng.below(5) {
        let f = &fields[rng.below(fields.len())];
        insert(&mut patch, &f.path, value(rng, f.kind));
    }
    patch
}

fn write(i: usize, doc: usize, op: WriteOp, base_version: Option<u64>) -> Write {
    Write {
        v: 1,
        event_id: format!("evt-{i:08}"),
        tenant: "acme".into(),
        bucket: "todos".into(),
        doc_id: format!("doc-{doc:05}"),
        device_id: format!("device-{}", i % DEVICES),
        hlc: None,
        base_version,
        op,
    }
}

struct Workload {
    state: MemState,
    writes: Vec<Write>,
}

/// Creates the documents, then pre-builds the measured writes (`set_pct`/`delete_pct` per 100).
fn workload(set_pct: usize, delete_pct: usize, base_version: Option<u64>) -> Workload {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let shapes: Vec<Vec<Field>> = (0..docs()).map(|_| shape(&mut rng)).collect();
    let limits = Limits::default();
    let mut state = MemState::default();
    for (d, fields) in shapes.iter().enumerate() {
        let mut w = write(
            d,
            d,
            WriteOp::Set {
                doc: full_doc(&mut rng, fields),
            },
            None,
        );
        w.hlc = Some(Hlc::new(1, 0));
        let ctx = DiffContext {
            limits: &limits,
            received_at_ms: 1,
            max_skew_ms: 60_000,
        };
        let change = compute_diff(&w, &ctx).unwrap().unwrap();
        resolve_lww(&mut state, &change).unwrap();
    }
    let writes = (0..WRITES)
        .map(|i| {
            let d = rng.below(docs());
            let fields = &shapes[d];
            let roll = rng.below(100);
            let op = if roll < delete_pct {
                WriteOp::Delete
            } else if roll < delete_pct + set_pct {
                WriteOp::Set {
                    doc: full_doc(&mut rng, fields),
                }
            } else {
                WriteOp::Patch {
                    patch: partial_patch(&mut rng, fields),
                }
            };
            write(docs() + i, d, op, base_version)
        })
        .collect();
    Workload { state, writes }
}

fn run(c: &mut Criterion, name: &str, set_pct: usize, delete_pct: usize, base: Option<u64>) {
    let Workload {
        mut state,
        mut writes,
    } = workload(set_pct, delete_pct, base);
    let limits = Limits::default();
    let mut clock = 10u64;
    let mut next = 0usize;
    let mut group = c.benchmark_group("resolve");
    group.throughput(Throughput::Elements(1));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                // A fresh clock per write (a field store, negligible): every write is the newest.
                clock += 1;
                let w = &mut writes[next];
                next = (next + 1) % WRITES;
                w.hlc = Some(Hlc::new(clock, 0));
                let ctx = DiffContext {
                    limits: &limits,
                    received_at_ms: clock,
                    max_skew_ms: 60_000,
                };
                if let Some(change) = compute_diff(black_box(w), &ctx).unwrap() {
                    black_box(resolve_lww(&mut state, &change).unwrap());
                }
            }
            start.elapsed()
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    run(c, "patch", 0, 0, None);
    run(c, "set", 100, 0, None);
    run(c, "mixed", 8, 2, None);
    // Every write claims to have seen only version 1 and comes from another device than the
    // field's last writer: almost every patch reports `stale_base_version` conflicts.
    run(c, "patch_stale", 0, 0, Some(1));
}

criterion_group! {
    name = resolve;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = benches
}
criterion_main!(resolve);

//! The workload of `benches/resolve.rs`, shared with `examples/resolve_profile.rs`: realistic
//! documents and a deterministic generator of writes to them. See the bench for what it models.

use std::hint::black_box;

use processors::{
    compute_diff, resolve_batch, resolve_lww, DiffContext, Hlc, Limits, MemState, Write, WriteOp,
};
use serde_json::{json, Map, Value};

/// Documents to create: `BENCH_DOCS`, default 10,000.
pub fn docs() -> usize {
    std::env::var("BENCH_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}
/// Writes per measured chunk (and per batch of the `resolve_batch` group, generated at once).
pub const CHUNK: usize = 1_000;
/// Writes generated at a time, outside the measurement, for one-at-a-time resolving: few enough
/// that each write is still in the CPU caches when it is resolved, as a write the pipeline has
/// just decoded from its record is. (A chunk of 1,000 made up front was partly evicted from the
/// 1 MB L2 by the documents the writes before it touched.)
pub const HOT: usize = 16;
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

/// The kind of writes a benchmark measures.
#[derive(Clone, Copy)]
pub struct Mix {
    /// Percent of full-document sets.
    pub set_pct: usize,
    /// Percent of deletes.
    pub delete_pct: usize,
    /// The `base_version` every write claims.
    pub base_version: Option<u64>,
    /// Percent of writes that are full sets of a new document (the first write of each
    /// document; half of the pipeline benchmark's records). The state grows by one document each.
    pub create_pct: usize,
}

impl Mix {
    /// The mixes of `benches/resolve.rs`, by name.
    pub fn named(name: &str) -> Option<Mix> {
        let mix = |set_pct, delete_pct, base_version| Mix {
            set_pct,
            delete_pct,
            base_version,
            create_pct: 0,
        };
        match name {
            "patch" => Some(mix(0, 0, None)),
            "set" => Some(mix(100, 0, None)),
            "mixed" => Some(mix(8, 2, None)),
            "patch_stale" => Some(mix(0, 0, Some(1))),
            "create" => Some(Mix {
                create_pct: 100,
                ..mix(0, 0, None)
            }),
            _ => None,
        }
    }
}

/// The documents and a generator of writes to them.
pub struct Workload {
    rng: Rng,
    shapes: Vec<Vec<Field>>,
    /// The documents' state.
    pub state: MemState,
    mix: Mix,
    next_id: usize,
    /// The next new document's number (`create`).
    next_doc: usize,
}

impl Workload {
    /// Creates every document with a full set.
    pub fn new(mix: Mix) -> Self {
        let mut rng = Rng(0x5EED_1234_ABCD_0001);
        let shapes: Vec<Vec<Field>> = (0..docs()).map(|_| shape(&mut rng)).collect();
        let limits = Limits::default();
        let ctx = DiffContext {
            limits: &limits,
            received_at_ms: 1,
            max_skew_ms: 60_000,
        };
        let mut state = MemState::default();
        for (d, fields) in shapes.iter().enumerate() {
            let doc = full_doc(&mut rng, fields);
            let mut w = write(d, d, WriteOp::Set { doc }, None);
            w.hlc = Some(Hlc::new(1, 0));
            let change = compute_diff(w, &ctx).unwrap().unwrap();
            resolve_lww(&mut state, change).unwrap();
        }
        let next_id = shapes.len();
        Self {
            rng,
            shapes,
            state,
            mix,
            next_id,
            next_doc: next_id,
        }
    }

    /// The next `n` writes, with clocks from `clock` on.
    pub fn writes(&mut self, n: usize, clock: u64) -> Vec<Write> {
        (0..n)
            .map(|k| {
                let mut d = self.rng.below(self.shapes.len());
                let fields = &self.shapes[d];
                let roll = self.rng.below(100);
                let op = if roll < self.mix.create_pct {
                    // A new document with an existing document's shape.
                    d = self.next_doc;
                    self.next_doc += 1;
                    WriteOp::Set {
                        doc: full_doc(&mut self.rng, fields),
                    }
                } else if roll < self.mix.create_pct + self.mix.delete_pct {
                    WriteOp::Delete
                } else if roll < self.mix.create_pct + self.mix.delete_pct + self.mix.set_pct {
                    WriteOp::Set {
                        doc: full_doc(&mut self.rng, fields),
                    }
                } else {
                    WriteOp::Patch {
                        patch: partial_patch(&mut self.rng, fields),
                    }
                };
                self.next_id += 1;
                let mut w = write(self.next_id, d, op, self.mix.base_version);
                w.hlc = Some(Hlc::new(clock + k as u64, 0));
                w
            })
            .collect()
    }
}

/// What is measured: `compute_diff` and `resolve_lww` of each write, in order. Both consume
/// what they are given, as in the pipeline, so dropping what is left of each write is measured
/// too.
#[inline(never)]
pub fn apply_writes(state: &mut MemState, writes: Vec<Write>, ctx: &DiffContext<'_>) {
    for w in writes {
        if let Some(change) = compute_diff(black_box(w), ctx).unwrap() {
            black_box(resolve_lww(state, change).unwrap());
        }
    }
}

/// The same work as [`apply_writes`] as a pipeline batch could run it: [`resolve_batch`] over the
/// change sets of the writes, computed as its read-ahead asks for them.
#[inline(never)]
pub fn apply_writes_batched(state: &mut MemState, writes: Vec<Write>, ctx: &DiffContext<'_>) {
    let changes = writes
        .into_iter()
        .filter_map(|w| compute_diff(black_box(w), ctx).unwrap());
    resolve_batch(state, changes, |applied| {
        black_box(applied);
    })
    .unwrap();
}

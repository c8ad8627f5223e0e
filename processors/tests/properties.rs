//! Property tests of the resolution core against simple, independent models.
//!
//! Random small sets of writes (set / merge patch / delete) to a few documents of two buckets, from
//! a few devices, with clocks from a tiny range (so ties and equal wall times are common) and field
//! paths from a three-letter alphabet nested up to three deep (so a scalar `a` meets `a.b`).
//!
//! - [`sequential_oracle`]: the documents you get by applying the distinct writes one after the
//!   other in `(hlc, device, event id)` order with plain RFC 7396 merge-patch semantics, plus the
//!   deviations documented in `docs/CONFLICTS.md`. The core's final documents must equal it for
//!   every arrival order, with duplicates.
//! - [`reference_conflicts`]: the conflict rules restated over the history of arrived writes
//!   (not over registers). For a fixed arrival order the core must report exactly these.
//! - Diffs: the emitted `SyncEvent`s rebuild the final documents; `seq` is gap-free per bucket.
//! - No input panics: arbitrary JSON and bytes go through decode → diff → resolve.
//! - `resolve_batch` over any split into batches gives exactly what `resolve_lww` gives one by one.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Map, Value};

mod common;

use common::json_text;
use processors::value::{same_opt, same_value};

use processors::{
    compute_diff, decode_write, resolve_batch, resolve_lww, Applied, BucketKey, ConflictEvent,
    ConflictRule, ConflictSide, DiffContext, DocKey, Hlc, Limits, MemState, SideOp, SyncEvent,
    Write, WriteOp,
};

type Path = Vec<String>;
/// The resolution order, restated independently of `processors::Stamp`.
type Order = (Hlc, String, String);

const KEYS: [&str; 3] = ["a", "b", "c"];
const RECEIVED_AT_MS: u64 = 1_000;

/// `cases` per property unless `PROPTEST_CASES` asks for more (e.g. a long soak run).
fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

fn limits() -> Limits {
    Limits::default()
}

fn ctx(limits: &Limits) -> DiffContext<'_> {
    // Every generated clock is far below the skew bound: nothing is clamped here.
    DiffContext {
        limits,
        received_at_ms: RECEIVED_AT_MS,
        max_skew_ms: 60_000,
    }
}

fn order(w: &Write) -> Order {
    (
        w.hlc.expect("generated writes carry a clock"),
        w.device_id.clone(),
        w.event_id.clone(),
    )
}

fn doc_key(w: &Write) -> DocKey {
    w.doc_key()
}

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0..3i64).prop_map(Value::from),
        1 => Just(json!("x")),
        1 => Just(json!(true)),
        1 => Just(json!([1, {"k": 2}])),
        1 => Just(json!({})),
        // Equal as numbers, different values (often enough that a patch flips a sign).
        2 => Just(json!(0.0)),
        2 => Just(json!(-0.0)),
    ]
}

/// An object whose paths are at most `depth` deep; `nulls` adds merge-patch removals.
fn object(depth: u32, nulls: bool) -> BoxedStrategy<Map<String, Value>> {
    let leaf = if nulls {
        prop_oneof![4 => scalar(), 2 => Just(Value::Null)].boxed()
    } else {
        scalar().boxed()
    };
    let value = if depth <= 1 {
        leaf
    } else {
        prop_oneof![3 => leaf, 2 => object(depth - 1, nulls).prop_map(Value::Object)].boxed()
    };
    prop::collection::btree_map(prop::sample::select(KEYS.to_vec()), value, 0..=3)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
        .boxed()
}

fn op() -> impl Strategy<Value = WriteOp> {
    prop_oneof![
        2 => object(3, false).prop_map(|doc| WriteOp::Set { doc }),
        4 => object(3, true).prop_map(|patch| WriteOp::Patch { patch }),
        1 => Just(WriteOp::Delete),
    ]
}

/// One write; `event_id` is filled in from its index so every distinct write has its own.
fn write() -> impl Strategy<Value = Write> {
    (
        0..2usize,
        0..2usize,
        0..3usize,
        (0..4u64, 0..2u32),
        prop::option::weighted(0.7, 0..5u64),
        op(),
    )
        .prop_map(
            |(bucket, doc, device, (wall, counter), base_version, op)| Write {
                v: 1,
                event_id: String::new(),
                tenant: "t".into(),
                bucket: format!("b{bucket}"),
                doc_id: format!("d{doc}"),
                device_id: ["A", "B", "C"][device].into(),
                hlc: Some(Hlc::new(wall, counter)),
                base_version,
                op,
            },
        )
}

/// Distinct writes with unique event ids.
fn writes(max: usize) -> impl Strategy<Value = Vec<Write>> {
    prop::collection::vec(write(), 1..max).prop_map(|mut ws| {
        for (i, w) in ws.iter_mut().enumerate() {
            w.event_id = format!("e{i:02}");
        }
        ws
    })
}

/// The distinct writes plus some retransmitted copies, in a random arrival order.
fn arrivals(distinct: Vec<Write>, dups: Vec<Index>) -> impl Strategy<Value = Vec<Write>> {
    let mut all = distinct.clone();
    all.extend(dups.iter().map(|d| d.get(&distinct).clone()));
    Just(all).prop_shuffle()
}

fn scenario(max: usize) -> impl Strategy<Value = Vec<Write>> {
    (writes(max), prop::collection::vec(any::<Index>(), 0..4))
        .prop_flat_map(|(distinct, dups)| arrivals(distinct, dups))
}

// ---------------------------------------------------------------------------------------------
// Running the core
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Run {
    state: MemState,
    events: Vec<SyncEvent>,
    /// Conflicts with the arrival index of the write that revealed them.
    conflicts: Vec<(usize, ConflictEvent)>,
}

fn run(arrivals: &[Write]) -> Run {
    let limits = limits();
    let mut out = Run::default();
    for (i, w) in arrivals.iter().enumerate() {
        let change = match compute_diff(w.clone(), &ctx(&limits)) {
            Ok(Some(change)) => change,
            Ok(None) => continue,
            Err(r) => panic!("a generated write was rejected: {r}"),
        };
        let applied = resolve_lww(&mut out.state, change).unwrap();
        if let Some(change) = &applied.change {
            assert_eq!(change.event_id, w.event_id);
        }
        out.events.extend(applied.change);
        out.conflicts
            .extend(applied.conflicts.into_iter().map(|c| (i, c)));
    }
    out
}

/// Documents as JSON texts (which, unlike `==`, tell 0.0 from -0.0), by key.
fn text(docs: &BTreeMap<DocKey, Option<Map<String, Value>>>) -> BTreeMap<DocKey, String> {
    docs.iter()
        .map(|(k, d)| (k.clone(), json_text(d)))
        .collect()
}

fn final_docs(state: &MemState) -> BTreeMap<DocKey, Option<Map<String, Value>>> {
    state
        .docs
        .iter()
        .map(|(k, d)| (k.clone(), d.document()))
        .filter(|(_, d)| d.is_some())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The sequential oracle: RFC 7396 in timestamp order, with the documented deviations
// ---------------------------------------------------------------------------------------------

/// Whether a merge patch does anything: empty objects in a patch are ignored (deviation 1).
fn has_ops(patch: &Map<String, Value>) -> bool {
    patch.values().any(|v| match v {
        Value::Object(inner) => has_ops(inner),
        _ => true,
    })
}

/// Whether a merge patch sets at least one value (only such a patch creates a missing document).
fn has_sets(patch: &Map<String, Value>) -> bool {
    patch.values().any(|v| match v {
        Value::Null => false,
        Value::Object(inner) => has_sets(inner),
        _ => true,
    })
}

/// RFC 7396 `MergePatch`, except that an object the patch descends into and leaves empty is
/// removed (deviation 2: objects exist only through their fields), and patch objects with no
/// effect are skipped (deviation 1).
fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => {
                if !has_ops(inner) {
                    continue;
                }
                if !matches!(target.get(key), Some(Value::Object(_))) {
                    target.insert(key.clone(), Value::Object(Map::new()));
                }
                let Some(Value::Object(child)) = target.get_mut(key) else {
                    unreachable!("just made an object")
                };
                merge(child, inner);
                if child.is_empty() {
                    target.remove(key);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

fn apply_sequential(doc: &mut Option<Map<String, Value>>, op: &WriteOp) {
    match op {
        WriteOp::Set { doc: new } => *doc = Some(new.clone()),
        WriteOp::Delete => *doc = None,
        WriteOp::Patch { patch } if has_ops(patch) => match doc {
            Some(d) => merge(d, patch),
            // A patch on a missing document starts from `{}`, but only when it sets something
            // (deviation 3: a patch that only removes fields does not create the document).
            None if has_sets(patch) => {
                let mut d = Map::new();
                merge(&mut d, patch);
                *doc = Some(d);
            }
            None => {}
        },
        WriteOp::Patch { .. } => {}
    }
}

/// Every document after applying the distinct writes in `(hlc, device, event id)` order.
fn sequential_oracle(writes: &[Write]) -> BTreeMap<DocKey, Option<Map<String, Value>>> {
    let mut distinct: BTreeMap<Order, &Write> = BTreeMap::new();
    for w in writes {
        distinct.insert(order(w), w);
    }
    let mut docs: BTreeMap<DocKey, Option<Map<String, Value>>> = BTreeMap::new();
    for w in distinct.values() {
        apply_sequential(docs.entry(doc_key(w)).or_default(), &w.op);
    }
    docs.retain(|_, d| d.is_some());
    docs
}

// ---------------------------------------------------------------------------------------------
// The conflict reference: the rules of docs/CONFLICTS.md over the history of arrived writes
// ---------------------------------------------------------------------------------------------

fn on_chain(a: &[String], b: &[String]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

/// What a write names: field paths with a value (set) or without (removal).
struct Named {
    fields: Vec<(Path, Option<Value>)>,
    /// A delete or a full-document set: every other field goes too.
    clear: Option<SideOp>,
    /// Whether the write creates the document (a set, or a patch that sets something).
    upsert: bool,
}

fn leaves(
    obj: &Map<String, Value>,
    prefix: &mut Path,
    out: &mut Vec<(Path, Option<Value>)>,
    patch: bool,
) {
    for (k, v) in obj {
        prefix.push(k.clone());
        match v {
            Value::Object(inner) if !inner.is_empty() => leaves(inner, prefix, out, patch),
            Value::Object(_) if patch => {}
            Value::Null if patch => out.push((prefix.clone(), None)),
            other => out.push((prefix.clone(), Some(other.clone()))),
        }
        prefix.pop();
    }
}

/// `None` for a write that changes nothing expressible (a patch of empty objects only).
fn named(w: &Write) -> Option<Named> {
    let mut fields = Vec::new();
    match &w.op {
        WriteOp::Set { doc } => {
            leaves(doc, &mut Vec::new(), &mut fields, false);
            Some(Named {
                fields,
                clear: Some(SideOp::Unset),
                upsert: true,
            })
        }
        WriteOp::Patch { patch } => {
            leaves(patch, &mut Vec::new(), &mut fields, true);
            let upsert = fields.iter().any(|(_, v)| v.is_some());
            (!fields.is_empty()).then_some(Named {
                fields,
                clear: None,
                upsert,
            })
        }
        WriteOp::Delete => Some(Named {
            fields,
            clear: Some(SideOp::Delete),
            upsert: false,
        }),
    }
}

/// A document as leaves, each with the index of the write that put it there.
#[derive(Clone, Default, PartialEq)]
struct LeafDoc {
    exists: bool,
    leaves: BTreeMap<Path, (Value, usize)>,
}

impl LeafDoc {
    /// Existence and the visible leaves as JSON texts (which, unlike `==`, tell 0.0 from
    /// -0.0, as the core does: see `processors::value::same_value`).
    fn visible(&self) -> (bool, BTreeMap<&Path, String>) {
        let leaves = self
            .leaves
            .iter()
            .map(|(p, (v, _))| (p, json_text(v)))
            .collect();
        (self.exists, leaves)
    }
}

/// The leaf form of the sequential model: a set replaces every leaf, a field write removes
/// every leaf on its root-to-leaf chain and then adds its own, a delete removes everything.
fn leaf_model(arrivals: &[Write], mut writes: Vec<usize>) -> LeafDoc {
    writes.sort_by_key(|&i| order(&arrivals[i]));
    let mut doc = LeafDoc::default();
    for i in writes {
        let Some(named) = named(&arrivals[i]) else {
            continue;
        };
        if named.clear.is_some() {
            doc.leaves.clear();
            doc.exists = false;
        }
        for (path, value) in named.fields {
            doc.leaves.retain(|p, _| !on_chain(p, &path));
            if let Some(v) = value {
                doc.leaves.insert(path, (v, i));
            }
        }
        doc.exists |= named.upsert;
    }
    doc
}

fn side(w: &Write, op: SideOp, value: Option<Value>, via: Option<&Path>) -> ConflictSide {
    ConflictSide {
        event_id: w.event_id.clone(),
        device_id: w.device_id.clone(),
        hlc: w.hlc.unwrap(),
        op,
        value,
        via_field: via.map(|p| p.join(".")),
    }
}

fn field_side(w: &Write, value: &Option<Value>, via: Option<&Path>) -> ConflictSide {
    let op = if value.is_some() {
        SideOp::Set
    } else {
        SideOp::Unset
    };
    side(w, op, value.clone(), via)
}

/// Writing the same thing is agreement: two removals, or the same value on the same field.
fn agree(a: &ConflictSide, b: &ConflictSide) -> bool {
    match (a.op == SideOp::Set, b.op == SideOp::Set) {
        (false, false) => true,
        (true, true) => same_opt(a.value.as_ref(), b.value.as_ref()) && a.via_field == b.via_field,
        _ => false,
    }
}

#[derive(Default)]
struct RefDoc {
    seen: Vec<usize>,
    newest_by_device: HashMap<String, (Hlc, String)>,
    version: u64,
    /// Per visible field, the version at which its value last changed.
    last_change: BTreeMap<Path, u64>,
    current: LeafDoc,
}

/// The conflicts the rules predict for this arrival order, with the arrival index of the write
/// that revealed each. `arrivals` may repeat writes (same event id = the same write).
fn reference_conflicts(arrivals: &[Write]) -> Vec<(usize, ConflictEvent)> {
    let mut docs: BTreeMap<DocKey, RefDoc> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, w) in arrivals.iter().enumerate() {
        let Some(named_w) = named(w) else {
            continue;
        };
        let doc = docs.entry(doc_key(w)).or_default();
        // Retransmission rule: not newer than the newest write already seen from its device.
        let mine = (w.hlc.unwrap(), w.event_id.clone());
        let retransmission = doc
            .newest_by_device
            .get(&w.device_id)
            .is_some_and(|newest| mine <= *newest);
        if !retransmission {
            doc.newest_by_device.insert(w.device_id.clone(), mine);
        }
        if doc.seen.iter().any(|&j| arrivals[j].event_id == w.event_id) {
            continue; // the same write again changes nothing
        }
        let before = doc.current.clone();
        doc.seen.push(i);
        let after = leaf_model(arrivals, doc.seen.clone());
        if after.visible() != before.visible() {
            doc.version += 1;
        }
        let last_change = doc.last_change.clone();
        doc.last_change = after
            .leaves
            .iter()
            .map(|(p, (v, _))| {
                let same = before
                    .leaves
                    .get(p)
                    .is_some_and(|(old, _)| same_value(old, v));
                (p.clone(), if same { last_change[p] } else { doc.version })
            })
            .collect();
        doc.current = after.clone();
        if retransmission {
            continue;
        }

        let me = order(w);
        let newer: Vec<usize> = doc
            .seen
            .iter()
            .copied()
            .filter(|&j| order(&arrivals[j]) > me)
            .collect();
        let conflict = |field: &Path, rule, winner: ConflictSide, loser: ConflictSide| {
            (!agree(&winner, &loser)).then(|| ConflictEvent {
                v: 1,
                tenant: w.tenant.clone(),
                bucket: w.bucket.clone(),
                doc_id: w.doc_id.clone(),
                field: field.join("."),
                rule,
                winner,
                loser,
                detected_at_event: w.event_id.clone(),
                version: doc.version,
            })
        };

        // 1. Fields the write names but lost: one `lww_timestamp` conflict each, against the
        //    newest write that beat it (on the field's chain, or by clearing the document).
        for (path, value) in &named_w.fields {
            let won = match value {
                Some(_) => after.leaves.get(path).is_some_and(|(_, o)| *o == i),
                None => newer.iter().all(|&j| {
                    let x = named(&arrivals[j]).unwrap();
                    x.clear.is_none() && x.fields.iter().all(|(q, _)| q != path)
                }),
            };
            if won {
                continue;
            }
            let beater = newer
                .iter()
                .copied()
                .filter(|&j| {
                    let x = named(&arrivals[j]).unwrap();
                    x.clear.is_some() || x.fields.iter().any(|(q, _)| on_chain(q, path))
                })
                .max_by_key(|&j| order(&arrivals[j]))
                .expect("a write that lost was beaten by something");
            let x = named(&arrivals[beater]).unwrap();
            let winner = match x
                .fields
                .iter()
                .filter(|(q, _)| on_chain(q, path))
                .max_by(|a, b| a.0.cmp(&b.0))
            {
                Some((q, v)) => field_side(&arrivals[beater], v, (q != path).then_some(q)),
                None => side(&arrivals[beater], x.clear.unwrap(), None, None),
            };
            let loser = field_side(w, value, None);
            out.extend(conflict(path, ConflictRule::LwwTimestamp, winner, loser).map(|c| (i, c)));
        }

        // 2. Visible fields the write replaced or removed, when they came from another device's
        //    write and the writer had not seen the value (`base_version` older than the version
        //    at which the field's value last changed).
        for (path, (value, owner)) in &before.leaves {
            let replaced = after.leaves.get(path).is_none_or(|(_, o)| *o == i);
            let y = &arrivals[*owner];
            let unseen = w.base_version.is_some_and(|b| b < last_change[path]);
            if !replaced || y.device_id == w.device_id || !unseen {
                continue;
            }
            let via = named_w
                .fields
                .iter()
                .filter(|(q, _)| on_chain(q, path))
                .min_by(|a, b| a.0.cmp(&b.0));
            let winner = match via {
                Some((q, v)) => field_side(w, v, (q != path).then_some(q)),
                None => side(w, named_w.clear.unwrap(), None, None),
            };
            let loser = field_side(y, &Some(value.clone()), None);
            out.extend(
                conflict(path, ConflictRule::StaleBaseVersion, winner, loser).map(|c| (i, c)),
            );
        }

        // 3. A delete or full set that could not remove a newer visible field it did not name.
        if let Some(clear) = named_w.clear {
            for (path, (value, owner)) in &before.leaves {
                let y = &arrivals[*owner];
                let near_named = named_w.fields.iter().any(|(q, _)| on_chain(q, path));
                if near_named || order(y) < me {
                    continue;
                }
                let winner = field_side(y, &Some(value.clone()), None);
                let loser = side(w, clear, None, None);
                out.extend(
                    conflict(path, ConflictRule::LwwTimestamp, winner, loser).map(|c| (i, c)),
                );
            }
        }
    }
    out
}

fn sorted(mut c: Vec<(usize, ConflictEvent)>) -> Vec<(usize, ConflictEvent)> {
    c.sort_by(|a, b| {
        (a.0, &a.1.doc_id, &a.1.bucket, &a.1.field).cmp(&(
            b.0,
            &b.1.doc_id,
            &b.1.bucket,
            &b.1.field,
        ))
    });
    c
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    /// Per-field LWW equals applying the writes one after the other in timestamp order.
    #[test]
    fn final_documents_equal_the_sequential_oracle(arrivals in scenario(10)) {
        let run = run(&arrivals);
        prop_assert_eq!(text(&final_docs(&run.state)), text(&sequential_oracle(&arrivals)));
    }

    /// Any two arrival orders, with any duplicates, converge to the same state.
    #[test]
    fn arrival_order_and_duplicates_do_not_matter(
        (a, b) in (writes(10), prop::collection::vec(any::<Index>(), 0..4), prop::collection::vec(any::<Index>(), 0..4))
            .prop_flat_map(|(w, d1, d2)| (arrivals(w.clone(), d1), arrivals(w, d2)))
    ) {
        let (ra, rb) = (run(&a), run(&b));
        prop_assert_eq!(text(&final_docs(&ra.state)), text(&final_docs(&rb.state)));
        // Stronger: the registers and document-level stamps converge too.
        let regs = |s: &MemState| -> BTreeMap<_, _> {
            s.docs.iter().map(|(k, d)| {
                let r: Vec<_> = d.registers.iter().map(|(p, r)| (p.clone(), r.value.clone(), r.stamp.clone())).collect();
                (k.clone(), (r, d.deleted_at.clone(), d.replaced_at.clone(), d.upserted_at.clone()))
            }).collect()
        };
        prop_assert_eq!(regs(&ra.state), regs(&rb.state));
        // Replaying the whole stream again changes nothing and reports nothing.
        let mut again = a.clone();
        again.extend(a.iter().cloned());
        let rr = run(&again);
        prop_assert_eq!(rr.events.len(), ra.events.len());
        prop_assert_eq!(rr.conflicts.len(), ra.conflicts.len());
    }

    /// The emitted diffs rebuild the final documents; `seq` is 1..=n per bucket and each
    /// document's version goes 1, 2, 3, ...
    #[test]
    fn sync_events_rebuild_the_documents(arrivals in scenario(12)) {
        let run = run(&arrivals);
        let mut views: BTreeMap<DocKey, Option<Map<String, Value>>> = BTreeMap::new();
        let mut seqs: BTreeMap<BucketKey, Vec<u64>> = BTreeMap::new();
        let mut versions: BTreeMap<DocKey, Vec<u64>> = BTreeMap::new();
        for e in &run.events {
            let bucket = BucketKey { tenant: e.tenant.clone(), bucket: e.bucket.clone() };
            let key = DocKey { bucket: bucket.clone(), doc_id: e.doc_id.clone() };
            seqs.entry(bucket).or_default().push(e.seq);
            versions.entry(key.clone()).or_default().push(e.version);
            let view = views.entry(key).or_default();
            let created = view.is_none() && !e.deleted;
            // Events carry only real changes.
            prop_assert!(created || e.deleted || !e.set.is_empty() || !e.unset.is_empty());
            if e.deleted {
                prop_assert!(e.set.is_empty());
                prop_assert!(view.is_some(), "a delete event for a document that did not exist");
                *view = None;
            } else {
                e.apply_to(view.get_or_insert_with(Map::new));
            }
        }
        views.retain(|_, v| v.is_some());
        prop_assert_eq!(text(&views), text(&final_docs(&run.state)));
        for s in seqs.values() {
            prop_assert_eq!(s.clone(), (1..=s.len() as u64).collect::<Vec<_>>());
        }
        for (key, v) in &versions {
            prop_assert_eq!(v.clone(), (1..=v.len() as u64).collect::<Vec<_>>());
            prop_assert_eq!(run.state.docs[key].version, v.len() as u64);
        }
        let last: BTreeMap<&BucketKey, u64> = run.state.seqs.iter().map(|(b, s)| (b, *s)).collect();
        for (b, s) in &seqs {
            prop_assert_eq!(last.get(b).copied(), Some(s.len() as u64));
        }
    }

    /// The conflicts reported for an arrival order are exactly those the rules predict.
    #[test]
    fn conflicts_follow_the_rules(arrivals in scenario(10)) {
        let run = run(&arrivals);
        prop_assert_eq!(sorted(run.conflicts), sorted(reference_conflicts(&arrivals)));
    }

    /// Writes from one device never conflict with each other.
    #[test]
    fn one_device_never_conflicts(mut arrivals in scenario(10)) {
        for w in &mut arrivals {
            w.device_id = "solo".into();
        }
        prop_assert!(run(&arrivals).conflicts.is_empty());
    }

    /// Resolving in batches (whose read-ahead sees the same document several times) gives the
    /// same results, in the same order, and the same state as resolving one change at a time.
    #[test]
    fn batches_resolve_like_single_changes(
        arrivals in scenario(12),
        cuts in prop::collection::vec(any::<Index>(), 0..4),
    ) {
        let limits = limits();
        let changes: Vec<_> = arrivals
            .iter()
            .filter_map(|w| compute_diff(w.clone(), &ctx(&limits)).unwrap())
            .collect();
        let mut single = MemState::default();
        let one_by_one: Vec<Applied> = changes
            .iter()
            .map(|c| resolve_lww(&mut single, c.clone()).unwrap())
            .collect();
        let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(changes.len() + 1)).collect();
        ends.push(changes.len());
        ends.sort_unstable();
        let (mut batched, mut in_batches, mut start) = (MemState::default(), Vec::new(), 0);
        for end in ends {
            let batch = changes[start..end].to_vec();
            resolve_batch(&mut batched, batch, |a| in_batches.push(a)).unwrap();
            start = end;
        }
        prop_assert_eq!(in_batches, one_by_one);
        prop_assert_eq!(&batched.docs, &single.docs);
        prop_assert_eq!(&batched.seqs, &single.seqs);
    }

    /// Both leaf-level models agree with each other (a check of the test's own oracles).
    #[test]
    fn the_two_oracles_agree(arrivals in scenario(10)) {
        let rfc = sequential_oracle(&arrivals);
        let mut by_doc: BTreeMap<DocKey, Vec<usize>> = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        for (i, w) in arrivals.iter().enumerate() {
            if seen.insert(w.event_id.clone()) {
                by_doc.entry(doc_key(w)).or_default().push(i);
            }
        }
        let leaf: BTreeMap<DocKey, Option<Map<String, Value>>> = by_doc
            .into_iter()
            .map(|(k, ws)| {
                let d = leaf_model(&arrivals, ws);
                let doc = d.exists.then(|| {
                    let mut m = Map::new();
                    for (p, (v, _)) in &d.leaves {
                        set_path(&mut m, p, v.clone());
                    }
                    m
                });
                (k, doc)
            })
            .filter(|(_, d)| d.is_some())
            .collect();
        prop_assert_eq!(leaf, rfc);
    }
}

fn set_path(doc: &mut Map<String, Value>, path: &[String], value: Value) {
    let (last, parents) = path.split_last().unwrap();
    let mut cur = doc;
    for p in parents {
        cur = cur
            .entry(p.clone())
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .unwrap();
    }
    cur.insert(last.clone(), value);
}

// ---------------------------------------------------------------------------------------------
// No input panics
// ---------------------------------------------------------------------------------------------

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "", ".", "$x", "a.b", "\0", "set", "patch", "delete", "1:0", "t", "b"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    ".{0,6}",
                    prop::sample::select(vec!["a", "b", "$a", "a.b", ""]).prop_map(String::from)
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A `data.changed`-shaped object where any field may be missing, mistyped or odd.
fn write_like() -> impl Strategy<Value = Value> {
    let field = |good: Value| prop_oneof![3 => Just(Some(good)), 1 => any_json().prop_map(Some), 1 => Just(None)];
    (
        field(json!(1)),
        field(json!("e1")),
        field(json!("t")),
        field(json!("b")),
        field(json!("d")),
        field(json!("dev")),
        prop_oneof![
            Just(Some(json!("5:1"))),
            Just(Some(json!("99999999999999:0"))),
            any_json().prop_map(Some),
            Just(None)
        ],
        prop_oneof![Just(Some(json!(3))), any_json().prop_map(Some), Just(None)],
        prop::sample::select(vec!["set", "patch", "delete", "nope"]),
        any_json(),
    )
        .prop_map(|(v, e, t, b, d, dev, hlc, base, op, body)| {
            let mut m = Map::new();
            for (k, val) in [
                ("v", v),
                ("event_id", e),
                ("tenant", t),
                ("bucket", b),
                ("doc_id", d),
                ("device_id", dev),
                ("hlc", hlc),
                ("base_version", base),
            ] {
                if let Some(val) = val {
                    m.insert(k.into(), val);
                }
            }
            m.insert("op".into(), json!(op));
            match op {
                "set" => {
                    m.insert("doc".into(), body);
                }
                "patch" => {
                    m.insert("patch".into(), body);
                }
                _ => {}
            }
            Value::Object(m)
        })
}

/// Decode → diff → resolve never panics; a rejection always has a code and a message.
fn feed(state: &mut MemState, key: Option<&[u8]>, bytes: &[u8], limits: &Limits) {
    let ctx = DiffContext {
        limits,
        received_at_ms: 1_000,
        max_skew_ms: 100,
    };
    let result = decode_write(key, bytes).and_then(|w| compute_diff(w, &ctx));
    match result {
        Ok(Some(change)) => {
            let applied = resolve_lww(state, change).unwrap();
            if let Some(e) = applied.change {
                // Whatever was accepted serialises and parses back. (Not always to an equal
                // value: without serde_json's `float_roundtrip` feature, parsing some floats is
                // off by one ulp.)
                let text = serde_json::to_string(&e).unwrap();
                let back: SyncEvent = serde_json::from_str(&text).unwrap();
                assert_eq!(
                    (back.version, back.seq, back.set.len()),
                    (e.version, e.seq, e.set.len())
                );
            }
        }
        Ok(None) => {}
        Err(r) => {
            assert!(
                !r.message.trim().is_empty(),
                "empty message for {:?}",
                r.code
            );
            assert!(!r.code.as_str().is_empty());
            assert!(r.to_string().starts_with(r.code.as_str()));
        }
    }
}

proptest! {
    #![proptest_config(config(384))]

    #[test]
    fn arbitrary_json_never_panics(values in prop::collection::vec(any_json(), 1..4)) {
        let limits = Limits { max_depth: 3, max_fields: 8, max_doc_bytes: 200, ..Limits::default() };
        let mut state = MemState::default();
        for v in &values {
            feed(&mut state, None, &serde_json::to_vec(v).unwrap(), &limits);
        }
    }

    #[test]
    fn write_shaped_json_never_panics(values in prop::collection::vec(write_like(), 1..6), keyed in any::<bool>()) {
        let limits = Limits { max_depth: 3, max_fields: 8, max_doc_bytes: 200, ..Limits::default() };
        let mut state = MemState::default();
        for v in &values {
            let key: Option<&[u8]> = keyed.then_some(b"t/b");
            feed(&mut state, key, &serde_json::to_vec(v).unwrap(), &limits);
        }
        for doc in state.docs.values() {
            let _ = doc.document();
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), key in prop::option::of(prop::collection::vec(any::<u8>(), 0..8))) {
        let mut state = MemState::default();
        feed(&mut state, key.as_deref(), &bytes, &Limits::default());
    }
}

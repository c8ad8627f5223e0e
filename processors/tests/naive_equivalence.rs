//! The optimised `apply_change` equals the straightforward formulation of the model.
//!
//! `naive` below is the resolver as first written (before the performance work): it clones the
//! document, recomputes every visible leaf before and after the write, and diffs them. The
//! optimised core only looks at the fields a patch can affect and moves registers instead of
//! cloning them. Both must produce the same `Applied` and the same `DocState`, byte for byte,
//! for any sequence of changes, including misbehaving clients reusing an event id.

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use processors::{compute_diff, ChangeOp, DiffContext, DocState, Hlc, Limits, Write, WriteOp};

mod common;

use common::json_text as text;

mod naive {
    #![allow(clippy::all)]

    use std::cmp::max;
    use std::collections::BTreeMap;
    use std::ops::Bound;

    use serde_json::{Map, Value};

    use processors::events::EVENT_FORMAT_VERSION;
    use processors::path::{dotted, is_prefix, FieldPath};
    use processors::resolve::MAX_DEVICES_PER_DOC;
    use processors::value::{same_opt, same_value};
    use processors::{
        Applied, ChangeOp, ChangeSet, ConflictEvent, ConflictRule, ConflictSide, DocState,
        Register, SideOp, Stamp, SyncEvent,
    };

    fn side_new(stamp: &Stamp, op: SideOp, value: Option<Value>) -> ConflictSide {
        ConflictSide {
            event_id: stamp.event_id.clone(),
            device_id: stamp.device_id.clone(),
            hlc: stamp.hlc,
            op,
            value,
            via_field: None,
        }
    }

    fn cleared_at(doc: &DocState) -> Option<&Stamp> {
        max(doc.deleted_at.as_deref(), doc.replaced_at.as_deref())
    }

    fn newer_on_chain<'a>(
        doc: &'a DocState,
        path: &FieldPath,
        than: &Stamp,
    ) -> Option<(&'a FieldPath, &'a Register)> {
        let ancestors = (0..path.len()).filter_map(|i| doc.registers.get_key_value(&path[..i]));
        let descendants = doc
            .registers
            .range::<FieldPath, _>((Bound::Excluded(path), Bound::Unbounded))
            .take_while(|(p, _)| is_prefix(path, p));
        ancestors
            .chain(descendants)
            .filter(|(_, r)| *r.stamp > *than)
            .max_by(|a, b| a.1.stamp.cmp(&b.1.stamp))
    }

    pub fn visible_leaves(doc: &DocState) -> BTreeMap<FieldPath, Value> {
        let cleared = cleared_at(doc);
        doc.registers
            .iter()
            .filter(|(p, r)| {
                r.value.is_some()
                    && cleared.is_none_or(|c| *r.stamp >= *c)
                    && newer_on_chain(doc, p, &r.stamp).is_none()
            })
            .filter_map(|(p, r)| r.value.clone().map(|v| (p.clone(), v)))
            .collect()
    }

    fn compact(doc: &mut DocState) {
        if let Some(cleared) = cleared_at(doc).cloned() {
            doc.registers.retain(|_, r| *r.stamp >= cleared);
        }
    }

    fn note_device(doc: &mut DocState, stamp: &Stamp) -> bool {
        let incoming = (stamp.hlc, stamp.event_id.clone());
        let replay = match doc.devices.get(&stamp.device_id) {
            Some(last) => incoming <= *last,
            None => false,
        };
        if !replay {
            doc.devices.insert(stamp.device_id.clone(), incoming);
            if doc.devices.len() > MAX_DEVICES_PER_DOC {
                let oldest = doc
                    .devices
                    .iter()
                    .min_by(|a, b| a.1.cmp(b.1))
                    .map(|(d, _)| d.clone());
                if let Some(d) = oldest {
                    doc.devices.remove(&d);
                }
            }
        }
        replay
    }

    fn keep_max(slot: &mut Option<std::sync::Arc<Stamp>>, stamp: &Stamp) {
        if slot.as_deref() < Some(stamp) {
            *slot = Some(std::sync::Arc::new(stamp.clone()));
        }
    }

    fn register_side(path: &FieldPath, at: &FieldPath, r: &Register) -> ConflictSide {
        let op = if r.value.is_some() {
            SideOp::Set
        } else {
            SideOp::Unset
        };
        let mut side = side_new(&r.stamp, op, r.value.clone());
        if at != path {
            side.via_field = Some(dotted(at));
        }
        side
    }

    /// Applies one change set to a document's state. Pure; `seq` of the returned change is 0.
    pub fn apply_change(doc: &mut DocState, change: &ChangeSet) -> Applied {
        let stamp: &Stamp = &change.stamp;
        // The device's newest write again (same event id, whatever its clock): nothing.
        if doc
            .devices
            .get(&stamp.device_id)
            .is_some_and(|last| last.1 == stamp.event_id)
        {
            return Applied {
                retransmission: true,
                ..Applied::default()
            };
        }
        let retransmission = note_device(doc, stamp);
        let before_doc = doc.clone();
        let before = visible_leaves(doc);
        let before_exists = doc.exists();

        // Paths the write names, with the value it gives them.
        let mut touched: Vec<(FieldPath, Option<Value>)> = Vec::new();
        // What the write does to fields it does not name: a delete deletes, a full set unsets.
        let mut side_op = SideOp::Delete;
        match &change.op {
            ChangeOp::Fields {
                replace,
                set,
                unset,
            } => {
                side_op = SideOp::Unset;
                touched.extend(set.iter().map(|(p, v)| (p.clone(), Some(v.clone()))));
                touched.extend(unset.iter().map(|p| (p.clone(), None)));
                if *replace {
                    keep_max(&mut doc.replaced_at, stamp);
                }
                if *replace || !set.is_empty() {
                    keep_max(&mut doc.upserted_at, stamp);
                }
                for (path, value) in &touched {
                    let newer = doc.registers.get(path).is_none_or(|r| *r.stamp < *stamp);
                    if newer {
                        let register = Register {
                            value: value.clone(),
                            stamp: std::sync::Arc::new(stamp.clone()),
                            changed_version: doc.version,
                        };
                        doc.registers.insert(path.clone(), register);
                    }
                }
            }
            ChangeOp::Delete => keep_max(&mut doc.deleted_at, stamp),
        }
        compact(doc);
        let after = visible_leaves(doc);
        let after_exists = doc.exists();

        let mut applied = Applied {
            retransmission,
            ..Applied::default()
        };
        if !same_leaves(&before, &after) || before_exists != after_exists {
            doc.version += 1;
            doc.hlc = Some(stamp.hlc);
            for r in doc.registers.values_mut().filter(|r| *r.stamp == *stamp) {
                r.changed_version = doc.version;
            }
            let set: Map<String, Value> = after
                .iter()
                .filter(|(p, v)| !before.get(*p).is_some_and(|b| same_value(b, v)))
                .map(|(p, v)| (dotted(p), v.clone()))
                .collect();
            let unset = before
                .keys()
                .filter(|p| !after.contains_key(*p))
                .map(|p| dotted(p))
                .collect();
            applied.change = Some(SyncEvent {
                v: EVENT_FORMAT_VERSION,
                tenant: change.key.bucket.tenant.clone(),
                bucket: change.key.bucket.bucket.clone(),
                doc_id: change.key.doc_id.clone(),
                version: doc.version,
                seq: 0,
                hlc: stamp.hlc,
                event_id: stamp.event_id.clone(),
                device_id: stamp.device_id.clone(),
                deleted: !after_exists,
                set: if after_exists {
                    set.into()
                } else {
                    Default::default()
                },
                unset: if after_exists {
                    unset
                } else {
                    before.keys().map(|p| dotted(p)).collect()
                },
                clamped_from: change.clamped_from,
            });
        }
        // Same-value rewrites keep the field's last change (see `Register::changed_version`).
        for (p, v) in &after {
            if let Some(r) = doc.registers.get_mut(p) {
                if *r.stamp == *stamp && before.get(p).is_some_and(|b| same_value(b, v)) {
                    if let Some(prev) = before_doc.registers.get(p) {
                        if *prev.stamp != *stamp {
                            r.changed_version = prev.changed_version;
                        }
                    }
                }
            }
        }
        if !retransmission {
            applied.conflicts =
                detect_conflicts(&before_doc, &before, doc, &after, change, side_op, &touched);
        }
        applied
    }

    /// Whether two leaf maps hold the same paths with the same values (`same_value`).
    fn same_leaves(a: &BTreeMap<FieldPath, Value>, b: &BTreeMap<FieldPath, Value>) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((p, v), (q, w))| p == q && same_value(v, w))
    }

    /// Writing the same thing is agreement, not a conflict: two removals, or the same value on the
    /// same field (a value on an ancestor or descendant field is a different document).
    fn agree(a: &ConflictSide, b: &ConflictSide) -> bool {
        match (a.op == SideOp::Set, b.op == SideOp::Set) {
            (false, false) => true,
            (true, true) => {
                same_opt(a.value.as_ref(), b.value.as_ref()) && a.via_field == b.via_field
            }
            _ => false,
        }
    }

    /// Conflicts of `change` with what the document held, at most one per field. See
    /// `docs/CONFLICTS.md`:
    ///
    /// 1. each field the write names but lost: `lww_timestamp`, against the newest write that beat
    ///    it (on the field, an ancestor or descendant, or by deleting/replacing the document);
    /// 2. each visible field the write replaced or removed (by naming it, an ancestor or descendant,
    ///    or by deleting/replacing the document) whose value came from another device's write that
    ///    the writer had not seen (`base_version` below that write's version): `stale_base_version`;
    /// 3. each visible field a delete or full set did not name and could not remove because it is
    ///    newer: `lww_timestamp`.
    fn detect_conflicts(
        before_doc: &DocState,
        before: &BTreeMap<FieldPath, Value>,
        doc: &DocState,
        after: &BTreeMap<FieldPath, Value>,
        change: &ChangeSet,
        side_op: SideOp,
        touched: &[(FieldPath, Option<Value>)],
    ) -> Vec<ConflictEvent> {
        let stamp: &Stamp = &change.stamp;
        let mut out = Vec::new();
        let mut report = |field: &FieldPath, rule, winner: ConflictSide, loser: ConflictSide| {
            if agree(&winner, &loser) || winner.device_id == loser.device_id {
                return;
            }
            out.push(ConflictEvent {
                v: EVENT_FORMAT_VERSION,
                tenant: change.key.bucket.tenant.clone(),
                bucket: change.key.bucket.bucket.clone(),
                doc_id: change.key.doc_id.clone(),
                field: dotted(field),
                rule,
                winner,
                loser,
                detected_at_event: stamp.event_id.clone(),
                version: doc.version,
            });
        };
        // The side a document-level stamp (delete or replace) plays on a field.
        let doc_side = |s: &Stamp| {
            let op = if doc.deleted_at.as_deref() == Some(s) {
                SideOp::Delete
            } else {
                SideOp::Unset
            };
            side_new(s, op, None)
        };
        let incoming_side = |path: &FieldPath, value: &Option<Value>, at: &FieldPath| {
            let op = if value.is_some() {
                SideOp::Set
            } else {
                SideOp::Unset
            };
            let mut side = side_new(stamp, op, value.clone());
            if at != path {
                side.via_field = Some(dotted(at));
            }
            side
        };

        // 1. Named fields the write lost.
        for (path, value) in touched {
            let holds = doc.registers.get(path).is_some_and(|r| *r.stamp == *stamp);
            let hidden_by = newer_on_chain(doc, path, stamp);
            if holds && (value.is_none() || hidden_by.is_none()) {
                continue;
            }
            let at_path = doc
                .registers
                .get_key_value(path)
                .filter(|(_, r)| *r.stamp > *stamp);
            let by_register = [at_path, hidden_by]
                .into_iter()
                .flatten()
                .max_by(|a, b| a.1.stamp.cmp(&b.1.stamp));
            let by_doc = cleared_at(doc).filter(|c| *c > stamp);
            let winner = match (by_register, by_doc) {
                (Some((_, r)), Some(c)) if c > &r.stamp => doc_side(c),
                (Some((at, r)), _) => register_side(path, at, r),
                (None, Some(c)) => doc_side(c),
                (None, None) => continue,
            };
            report(
                path,
                ConflictRule::LwwTimestamp,
                winner,
                incoming_side(path, value, path),
            );
        }

        // 2. Visible fields the write replaced or removed without having seen them.
        for (path, _) in before.iter() {
            let Some(prev) = before_doc.registers.get(path) else {
                continue;
            };
            let replaced = !after.contains_key(path)
                || doc.registers.get(path).is_some_and(|r| *r.stamp == *stamp);
            let unseen = prev.stamp.device_id != stamp.device_id
                && change
                    .base_version
                    .is_some_and(|b| b < prev.changed_version);
            if !replaced || !unseen || *prev.stamp >= *stamp {
                continue;
            }
            let via = touched
                .iter()
                .filter(|(p, _)| is_prefix(p, path) || is_prefix(path, p))
                .min_by(|a, b| a.0.cmp(&b.0));
            let winner = match via {
                Some((at, value)) => incoming_side(path, value, at),
                None => side_new(stamp, side_op, None),
            };
            report(
                path,
                ConflictRule::StaleBaseVersion,
                winner,
                register_side(path, path, prev),
            );
        }

        // 3. Fields a delete or a full-document set could not remove implicitly.
        let implicit = match &change.op {
            ChangeOp::Delete => true,
            ChangeOp::Fields { replace, .. } => *replace,
        };
        if implicit {
            for (path, _) in before.iter() {
                let named = touched
                    .iter()
                    .any(|(n, _)| is_prefix(n, path) || is_prefix(path, n));
                let Some(reg) = doc.registers.get(path) else {
                    continue;
                };
                if !named && after.contains_key(path) && *reg.stamp > *stamp {
                    let winner = register_side(path, path, reg);
                    report(
                        path,
                        ConflictRule::LwwTimestamp,
                        winner,
                        side_new(stamp, side_op, None),
                    );
                }
            }
        }
        out
    }
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0..3i64).prop_map(Value::from),
        1 => Just(json!("x")),
        1 => Just(json!({})),
        // Equal as numbers, different values.
        1 => Just(json!(0.0)),
        1 => Just(json!(-0.0)),
    ]
}

fn object(depth: u32, nulls: bool) -> BoxedStrategy<Map<String, Value>> {
    let leaf = if nulls {
        prop_oneof![3 => scalar(), 2 => Just(Value::Null)].boxed()
    } else {
        scalar().boxed()
    };
    let value = if depth <= 1 {
        leaf
    } else {
        prop_oneof![3 => leaf, 2 => object(depth - 1, nulls).prop_map(Value::Object)].boxed()
    };
    prop::collection::btree_map(prop::sample::select(vec!["a", "b", "c"]), value, 0..=3)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
        .boxed()
}

/// Writes to one document; event ids come from a tiny set, so a "misbehaving client" reusing an
/// id (same stamp, different content) happens too.
fn write() -> impl Strategy<Value = Write> {
    let op = prop_oneof![
        2 => object(3, false).prop_map(|doc| WriteOp::Set { doc }),
        4 => object(3, true).prop_map(|patch| WriteOp::Patch { patch }),
        1 => Just(WriteOp::Delete),
    ];
    (
        0..3usize,
        0..4u32,
        (0..4u64, 0..2u32),
        prop::option::of(0..6u64),
        op,
    )
        .prop_map(|(device, event, (wall, counter), base_version, op)| Write {
            v: 1,
            event_id: format!("e{event}"),
            tenant: "t".into(),
            bucket: "b".into(),
            doc_id: "d".into(),
            device_id: ["A", "B", "C"][device].into(),
            hlc: Some(Hlc::new(wall, counter)),
            base_version,
            op,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        if std::env::var_os("PROPTEST_CASES").is_some() { ProptestConfig::default().cases } else { 768 }
    ))]

    #[test]
    fn optimised_apply_change_equals_the_naive_one(writes in prop::collection::vec(write(), 1..14)) {
        let limits = Limits::default();
        let ctx = DiffContext { limits: &limits, received_at_ms: 1_000, max_skew_ms: 60_000 };
        let (mut fast, mut slow) = (DocState::default(), DocState::default());
        for w in &writes {
            let Some(change) = compute_diff(w.clone(), &ctx).unwrap() else { continue };
            let a = processors::apply_change(&mut fast, change.clone());
            let b = naive::apply_change(&mut slow, &change);
            prop_assert_eq!(&a, &b);
            // `==` takes 0.0 for -0.0; their texts tell them apart.
            prop_assert_eq!(text(&a.change), text(&b.change));
            prop_assert_eq!(&fast, &slow);
            prop_assert_eq!(text(&fast.document()), text(&slow.document()));
            prop_assert_eq!(fast.visible_leaves(), naive::visible_leaves(&slow));
        }
    }

    /// A change set's leaves come in the body's order, which is path order here but not where
    /// serde_json keeps insertion order (the pipeline's build): any order gives the same result,
    /// up to the order of the conflicts a write reveals.
    #[test]
    fn the_order_of_a_change_sets_paths_does_not_matter(
        writes in prop::collection::vec(write(), 1..14),
        turn in any::<usize>(),
    ) {
        let limits = Limits::default();
        let ctx = DiffContext { limits: &limits, received_at_ms: 1_000, max_skew_ms: 60_000 };
        let (mut in_order, mut shuffled) = (DocState::default(), DocState::default());
        for w in &writes {
            let Some(change) = compute_diff(w.clone(), &ctx).unwrap() else { continue };
            let mut other = change.clone();
            if let ChangeOp::Fields { set, unset, .. } = &mut other.op {
                set.reverse();
                let n = set.len().max(1);
                set.rotate_left(turn % n);
                unset.reverse();
            }
            let mut a = processors::apply_change(&mut in_order, change);
            let mut b = processors::apply_change(&mut shuffled, other);
            for applied in [&mut a, &mut b] {
                applied.conflicts.sort_by(|x, y| x.field.cmp(&y.field));
            }
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&in_order, &shuffled);
        }
    }
}

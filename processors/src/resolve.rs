//! `resolve_lww`: the stateful stage. Per-field Last-Write-Wins over a small state interface.
//!
//! # The model
//!
//! A document's state ([`DocState`]) is a set of **registers**, one per field path that any write
//! touched: the value (or none, for a removal), the write's [`Stamp`] and the document version at
//! which it last changed. Three document-level stamps complete it: the newest delete, the newest
//! full-document replace and the newest write that created or set anything.
//!
//! Applying a write keeps, per path, the register with the greater stamp. Every part of the state
//! is such a maximum, so the state after any set of writes is the same whatever their order and
//! however often each arrives: replicas converge.
//!
//! The visible document is a pure function of the state: a register with a value is visible when
//! it is not older than the newest delete or replace, and no register on its root-to-leaf chain (an
//! ancestor or a descendant path) is newer. A document exists when its newest create/set is newer
//! than its newest delete. Events carry the difference between the visible documents before and
//! after a write; nothing is emitted when they are equal.

use std::cmp::max;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::diff::{ChangeOp, ChangeSet, Stamp};
use crate::events::{
    ConflictEvent, ConflictRule, ConflictSide, SideOp, SyncEvent, EVENT_FORMAT_VERSION,
};
use crate::hlc::Hlc;
use crate::path::{dotted, is_prefix, nest, FieldPath};
use crate::write::{BucketKey, DocKey};

/// Most devices remembered per document for retransmission detection; the oldest are forgotten.
pub const MAX_DEVICES_PER_DOC: usize = 256;

/// One field's register.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Register {
    /// The value, or `None` when the field was removed.
    pub value: Option<Value>,
    /// The write that set it.
    pub stamp: Stamp,
    /// The document version after that write.
    pub changed_version: u64,
}

/// Everything the resolver keeps about one document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DocState {
    /// Current document version (0 = never existed).
    pub version: u64,
    /// Bucket sequence number of the last change (0 = none).
    pub seq: u64,
    /// Clock of the last change.
    pub hlc: Option<Hlc>,
    /// One register per touched field path.
    pub registers: BTreeMap<FieldPath, Register>,
    /// The newest delete.
    pub deleted_at: Option<Stamp>,
    /// The newest full-document replace.
    pub replaced_at: Option<Stamp>,
    /// The newest write that set a field or replaced the document.
    pub upserted_at: Option<Stamp>,
    /// Per device, the newest `(hlc, event id)` applied: older ones are retransmissions.
    pub devices: BTreeMap<String, (Hlc, String)>,
}

impl DocState {
    /// The stamp below which registers are invisible (newest delete or replace).
    pub fn cleared_at(&self) -> Option<&Stamp> {
        max(self.deleted_at.as_ref(), self.replaced_at.as_ref())
    }

    /// Whether the document exists.
    pub fn exists(&self) -> bool {
        self.upserted_at.as_ref() > self.deleted_at.as_ref()
    }

    /// The newest register on `path`'s chain (ancestors, descendants) with a stamp above `than`.
    fn newer_on_chain(&self, path: &FieldPath, than: &Stamp) -> Option<(&FieldPath, &Register)> {
        let ancestors = (0..path.len()).filter_map(|i| self.registers.get_key_value(&path[..i]));
        let descendants = self
            .registers
            .range::<FieldPath, _>((Bound::Excluded(path), Bound::Unbounded))
            .take_while(|(p, _)| is_prefix(path, p));
        ancestors
            .chain(descendants)
            .filter(|(_, r)| r.stamp > *than)
            .max_by(|a, b| a.1.stamp.cmp(&b.1.stamp))
    }

    /// The visible leaves by path.
    pub fn visible_leaves(&self) -> BTreeMap<FieldPath, Value> {
        let cleared = self.cleared_at();
        self.registers
            .iter()
            .filter(|(p, r)| {
                r.value.is_some()
                    && cleared.is_none_or(|c| r.stamp >= *c)
                    && self.newer_on_chain(p, &r.stamp).is_none()
            })
            .filter_map(|(p, r)| r.value.clone().map(|v| (p.clone(), v)))
            .collect()
    }

    /// The visible document, or `None` when it does not exist.
    pub fn document(&self) -> Option<Map<String, Value>> {
        self.exists().then(|| nest(self.visible_leaves().iter()))
    }

    /// Drops registers that can never be visible again (older than the newest delete/replace).
    fn compact(&mut self) {
        if let Some(cleared) = self.cleared_at().cloned() {
            self.registers.retain(|_, r| r.stamp >= cleared);
        }
    }

    /// Records the write in the per-device table; true when it is a retransmission.
    fn note_device(&mut self, stamp: &Stamp) -> bool {
        let incoming = (stamp.hlc, stamp.event_id.clone());
        let replay = match self.devices.get(&stamp.device_id) {
            Some(last) => incoming <= *last,
            None => false,
        };
        if !replay {
            self.devices.insert(stamp.device_id.clone(), incoming);
            if self.devices.len() > MAX_DEVICES_PER_DOC {
                let oldest = self
                    .devices
                    .iter()
                    .min_by(|a, b| a.1.cmp(b.1))
                    .map(|(d, _)| d.clone());
                if let Some(d) = oldest {
                    self.devices.remove(&d);
                }
            }
        }
        replay
    }
}

/// The output of applying one change to one document.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Applied {
    /// The visible change, if any (without `seq`, which the bucket assigns).
    pub change: Option<SyncEvent>,
    /// Conflicts revealed by this write.
    pub conflicts: Vec<ConflictEvent>,
    /// True when the write was recognised as a retransmission (no conflicts are reported).
    pub retransmission: bool,
}

fn keep_max(slot: &mut Option<Stamp>, stamp: &Stamp) {
    if slot.as_ref() < Some(stamp) {
        *slot = Some(stamp.clone());
    }
}

fn register_side(path: &FieldPath, at: &FieldPath, r: &Register) -> ConflictSide {
    let op = if r.value.is_some() {
        SideOp::Set
    } else {
        SideOp::Unset
    };
    let mut side = ConflictSide::new(&r.stamp, op, r.value.clone());
    if at != path {
        side.via_field = Some(dotted(at));
    }
    side
}

/// Applies one change set to a document's state. Pure; `seq` of the returned change is 0.
pub fn apply_change(doc: &mut DocState, change: &ChangeSet) -> Applied {
    let stamp = &change.stamp;
    let retransmission = doc.note_device(stamp);
    let before_doc = doc.clone();
    let before = doc.visible_leaves();
    let before_exists = doc.exists();

    // Paths the write names, with the value it gives them.
    let mut touched: Vec<(FieldPath, Option<Value>)> = Vec::new();
    let mut side_op = SideOp::Delete;
    match &change.op {
        ChangeOp::Fields {
            replace,
            set,
            unset,
        } => {
            side_op = SideOp::Set;
            touched.extend(set.iter().map(|(p, v)| (p.clone(), Some(v.clone()))));
            touched.extend(unset.iter().map(|p| (p.clone(), None)));
            if *replace {
                keep_max(&mut doc.replaced_at, stamp);
            }
            if *replace || !set.is_empty() {
                keep_max(&mut doc.upserted_at, stamp);
            }
            for (path, value) in &touched {
                let newer = doc.registers.get(path).is_none_or(|r| r.stamp < *stamp);
                if newer {
                    let register = Register {
                        value: value.clone(),
                        stamp: stamp.clone(),
                        changed_version: doc.version,
                    };
                    doc.registers.insert(path.clone(), register);
                }
            }
        }
        ChangeOp::Delete => keep_max(&mut doc.deleted_at, stamp),
    }
    doc.compact();
    let after = doc.visible_leaves();
    let after_exists = doc.exists();

    let mut applied = Applied {
        retransmission,
        ..Applied::default()
    };
    if before != after || before_exists != after_exists {
        doc.version += 1;
        doc.hlc = Some(stamp.hlc);
        for r in doc.registers.values_mut().filter(|r| r.stamp == *stamp) {
            r.changed_version = doc.version;
        }
        let set: Map<String, Value> = after
            .iter()
            .filter(|(p, v)| before.get(*p) != Some(*v))
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
            set: if after_exists { set } else { Map::new() },
            unset: if after_exists {
                unset
            } else {
                before.keys().map(|p| dotted(p)).collect()
            },
            clamped_from: change.clamped_from,
        });
    }
    if !retransmission {
        applied.conflicts = detect_conflicts(&before_doc, &before, doc, &after, change, side_op, &touched);
    }
    applied
}

/// Conflicts of `change` with what the document held, one per field. See `docs/CONFLICTS.md`.
fn detect_conflicts(
    before_doc: &DocState,
    before: &BTreeMap<FieldPath, Value>,
    doc: &DocState,
    after: &BTreeMap<FieldPath, Value>,
    change: &ChangeSet,
    side_op: SideOp,
    touched: &[(FieldPath, Option<Value>)],
) -> Vec<ConflictEvent> {
    let stamp = &change.stamp;
    let mut out = Vec::new();
    let mut report = |field: &FieldPath, rule, winner: ConflictSide, loser: ConflictSide| {
        // Writing the same value is agreement, not a conflict.
        if winner.value == loser.value && (winner.op == SideOp::Set) == (loser.op == SideOp::Set)
        {
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
        let op = if doc.deleted_at.as_ref() == Some(s) {
            SideOp::Delete
        } else {
            SideOp::Unset
        };
        ConflictSide::new(s, op, None)
    };
    // Did the register the write replaced come from a write it had not seen?
    let stale = |prev: &Register| {
        prev.stamp.device_id != stamp.device_id
            && change.base_version.is_some_and(|b| b < prev.changed_version)
    };

    let mut named: Vec<&FieldPath> = Vec::new();
    for (path, value) in touched {
        named.push(path);
        let incoming_op = if value.is_some() { SideOp::Set } else { SideOp::Unset };
        let incoming = ConflictSide::new(stamp, incoming_op, value.clone());
        let holds = doc.registers.get(path).filter(|r| r.stamp == *stamp);
        let hidden_by = doc.newer_on_chain(path, stamp);
        match holds {
            Some(_) if value.is_none() || hidden_by.is_none() => {
                // The write won this field.
                if let Some(prev) = before_doc.registers.get(path) {
                    let was_visible = before.contains_key(path);
                    if prev.stamp != *stamp && was_visible && stale(prev) {
                        let loser = register_side(path, path, prev);
                        report(path, ConflictRule::StaleBaseVersion, incoming, loser);
                    }
                }
            }
            _ => {
                // The write lost this field: find the newest thing that beat it.
                let at_path = doc
                    .registers
                    .get_key_value(path)
                    .filter(|(_, r)| r.stamp > *stamp);
                let by_register = [at_path, hidden_by]
                    .into_iter()
                    .flatten()
                    .max_by(|a, b| a.1.stamp.cmp(&b.1.stamp));
                let by_doc = doc.cleared_at().filter(|c| *c > stamp);
                let winner = match (by_register, by_doc) {
                    (Some((at, r)), Some(c)) if c > &r.stamp => {
                        let _ = at;
                        doc_side(c)
                    }
                    (Some((at, r)), _) => register_side(path, at, r),
                    (None, Some(c)) => doc_side(c),
                    (None, None) => continue,
                };
                report(path, ConflictRule::LwwTimestamp, winner, incoming);
            }
        }
    }

    // Fields a delete or a full-document replace removes implicitly.
    let implicit = match &change.op {
        ChangeOp::Delete => true,
        ChangeOp::Fields { replace, .. } => *replace,
    };
    if implicit {
        let implicit_op = if side_op == SideOp::Delete {
            SideOp::Delete
        } else {
            SideOp::Unset
        };
        for (path, _) in before.iter() {
            if named.iter().any(|n| is_prefix(n, path) || is_prefix(path, n)) {
                continue;
            }
            let Some(reg) = doc.registers.get(path).or_else(|| before_doc.registers.get(path)) else {
                continue;
            };
            let incoming = ConflictSide::new(stamp, implicit_op, None);
            if after.contains_key(path) && reg.stamp > *stamp {
                let winner = register_side(path, path, reg);
                report(path, ConflictRule::LwwTimestamp, winner, incoming);
            } else if !after.contains_key(path) && reg.stamp < *stamp && stale(reg) {
                let loser = register_side(path, path, reg);
                report(path, ConflictRule::StaleBaseVersion, incoming, loser);
            }
        }
    }
    out
}

/// What the resolver reads and writes. The runtime implements it over sled with an overlay.
pub trait ResolveState {
    /// The store's error.
    type Error;
    /// A document's state.
    fn load_doc(&mut self, key: &DocKey) -> Result<Option<DocState>, Self::Error>;
    /// Stores a document's state.
    fn store_doc(&mut self, key: &DocKey, doc: DocState) -> Result<(), Self::Error>;
    /// The bucket's last sequence number (0 before the first change).
    fn last_seq(&mut self, bucket: &BucketKey) -> Result<u64, Self::Error>;
    /// Stores the bucket's last sequence number.
    fn store_last_seq(&mut self, bucket: &BucketKey, seq: u64) -> Result<(), Self::Error>;
}

/// Resolves one change set against the state: per-field LWW, a bucket sequence number for the
/// visible change, and the conflicts it revealed.
pub fn resolve_lww<S: ResolveState>(state: &mut S, change: &ChangeSet) -> Result<Applied, S::Error> {
    let mut doc = state.load_doc(&change.key)?.unwrap_or_default();
    let mut applied = apply_change(&mut doc, change);
    if let Some(event) = applied.change.as_mut() {
        let seq = state.last_seq(&change.key.bucket)? + 1;
        state.store_last_seq(&change.key.bucket, seq)?;
        event.seq = seq;
        doc.seq = seq;
    }
    state.store_doc(&change.key, doc)?;
    Ok(applied)
}

/// An in-memory [`ResolveState`], for tests, benchmarks and tools.
#[derive(Debug, Clone, Default)]
pub struct MemState {
    /// Documents by key.
    pub docs: BTreeMap<DocKey, DocState>,
    /// Last sequence number by bucket.
    pub seqs: BTreeMap<BucketKey, u64>,
}

impl ResolveState for MemState {
    type Error = Infallible;
    fn load_doc(&mut self, key: &DocKey) -> Result<Option<DocState>, Infallible> {
        Ok(self.docs.get(key).cloned())
    }
    fn store_doc(&mut self, key: &DocKey, doc: DocState) -> Result<(), Infallible> {
        self.docs.insert(key.clone(), doc);
        Ok(())
    }
    fn last_seq(&mut self, bucket: &BucketKey) -> Result<u64, Infallible> {
        Ok(self.seqs.get(bucket).copied().unwrap_or(0))
    }
    fn store_last_seq(&mut self, bucket: &BucketKey, seq: u64) -> Result<(), Infallible> {
        self.seqs.insert(bucket.clone(), seq);
        Ok(())
    }
}

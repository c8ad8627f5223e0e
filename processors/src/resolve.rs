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
//!
//! The visible document equals applying the distinct writes one after the other in stamp order
//! (a full set replaces, a merge patch merges, a delete removes), with the merge-patch details of
//! `docs/CONFLICTS.md`; `tests/properties.rs` checks it against exactly that sequential model.
//! The conflict rules are listed on `detect_conflicts` and explained in `docs/CONFLICTS.md`.

use std::borrow::Cow;
use std::cmp::max;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::ops::Bound;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::diff::{ChangeOp, ChangeSet, Stamp};
use crate::events::{
    ConflictEvent, ConflictRule, ConflictSide, SideOp, SyncEvent, EVENT_FORMAT_VERSION,
};
use crate::hlc::Hlc;
use crate::path::{dotted, is_prefix, set_path, FieldPath};
use crate::write::{BucketKey, DocKey};

/// Most devices remembered per document for retransmission detection; the oldest are forgotten.
pub const MAX_DEVICES_PER_DOC: usize = 256;

/// One field's register.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Register {
    /// The value, or `None` when the field was removed.
    pub value: Option<Value>,
    /// The write that set it. Shared by every register one write sets (it serialises as a plain
    /// [`Stamp`]).
    #[serde(with = "shared_stamp")]
    pub stamp: Arc<Stamp>,
    /// The document version at which the field's value last changed: the version after the
    /// write that set it, or, when that write rewrote the value the field already had, the
    /// version the value dates from.
    pub changed_version: u64,
}

/// Serde for an [`Arc<Stamp>`], exactly as for the [`Stamp`] itself.
mod shared_stamp {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::diff::Stamp;

    pub fn serialize<S: Serializer>(stamp: &Arc<Stamp>, s: S) -> Result<S::Ok, S::Error> {
        Stamp::serialize(stamp, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Stamp>, D::Error> {
        Stamp::deserialize(d).map(Arc::new)
    }
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
            .filter(|(_, r)| *r.stamp > *than)
            .max_by(|a, b| a.1.stamp.cmp(&b.1.stamp))
    }

    /// The visible registers, in path order.
    fn visible(&self) -> impl Iterator<Item = (&FieldPath, &Register)> {
        let cleared = self.cleared_at();
        sweep(self.registers.iter())
            .into_iter()
            .filter(move |e| e.visible(cleared))
            .map(|e| (e.path, e.reg))
    }

    /// The visible leaves by path.
    pub fn visible_leaves(&self) -> BTreeMap<FieldPath, Value> {
        self.visible()
            .filter_map(|(p, r)| r.value.clone().map(|v| (p.clone(), v)))
            .collect()
    }

    /// The visible document, or `None` when it does not exist.
    pub fn document(&self) -> Option<Map<String, Value>> {
        self.exists().then(|| {
            let mut doc = Map::new();
            for (path, r) in self.visible() {
                if let Some(v) = &r.value {
                    set_path(&mut doc, path, v.clone());
                }
            }
            doc
        })
    }

    /// Records the write in the per-device table; true when it is a retransmission.
    fn note_device(&mut self, stamp: &Stamp) -> bool {
        if let Some(last) = self.devices.get_mut(&stamp.device_id) {
            if (stamp.hlc, stamp.event_id.as_str()) <= (last.0, last.1.as_str()) {
                return true;
            }
            last.0 = stamp.hlc;
            last.1.clone_from(&stamp.event_id);
            return false;
        }
        let incoming = (stamp.hlc, stamp.event_id.clone());
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
        false
    }
}

/// A register as seen by [`sweep`]: whether a newer register sits on its root-to-leaf chain.
struct Entry<'a> {
    path: &'a FieldPath,
    reg: &'a Register,
    hidden: bool,
}

impl Entry<'_> {
    /// Visible: has a value, not older than the newest delete/replace, not hidden on its chain.
    fn visible(&self, cleared: Option<&Stamp>) -> bool {
        self.reg.value.is_some() && !self.hidden && cleared.is_none_or(|c| *self.reg.stamp >= *c)
    }
}

/// Finds, in one pass, which registers have a newer register among their ancestors or
/// descendants. `registers` must come in path order and contain, with each register, every
/// register on its chain (the whole map, or whole top-level subtrees of it).
///
/// Descendants sort right after their ancestor, so the ancestors of the current path are exactly
/// the open entries on a stack; an entry's descendants are all seen by the time it is closed.
fn sweep<'a>(registers: impl Iterator<Item = (&'a FieldPath, &'a Register)>) -> Vec<Entry<'a>> {
    struct Open<'a> {
        index: usize,
        path: &'a FieldPath,
        stamp: &'a Stamp,
        /// Newest stamp among this entry and its ancestors.
        chain_max: &'a Stamp,
        /// Newest stamp among its descendants seen so far.
        below_max: Option<&'a Stamp>,
    }
    fn close<'a>(entries: &mut [Entry<'a>], stack: &mut Vec<Open<'a>>) {
        let Some(open) = stack.pop() else { return };
        if open.below_max.is_some_and(|b| b > open.stamp) {
            entries[open.index].hidden = true;
        }
        let subtree_max = max(open.below_max, Some(open.stamp));
        if let Some(parent) = stack.last_mut() {
            parent.below_max = max(parent.below_max, subtree_max);
        }
    }

    let mut entries: Vec<Entry<'a>> = Vec::new();
    let mut stack: Vec<Open<'a>> = Vec::new();
    for (path, reg) in registers {
        while stack.last().is_some_and(|top| !is_prefix(top.path, path)) {
            close(&mut entries, &mut stack);
        }
        let above = stack.last().map(|top| top.chain_max);
        entries.push(Entry {
            path,
            reg,
            hidden: above.is_some_and(|a| *a > *reg.stamp),
        });
        stack.push(Open {
            index: entries.len() - 1,
            path,
            stamp: &reg.stamp,
            chain_max: max(above, Some(&reg.stamp)).unwrap_or(&reg.stamp),
            below_max: None,
        });
    }
    while !stack.is_empty() {
        close(&mut entries, &mut stack);
    }
    entries
}

fn find<'a, 'e>(entries: &'e [Entry<'a>], path: &[String]) -> Option<&'e Entry<'a>> {
    entries
        .binary_search_by(|e| e.path.as_slice().cmp(path))
        .ok()
        .map(|i| &entries[i])
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
    match slot {
        Some(s) if *s < *stamp => {
            // Reuses the strings' buffers (a derived `clone_from` would not).
            s.hlc = stamp.hlc;
            s.device_id.clone_from(&stamp.device_id);
            s.event_id.clone_from(&stamp.event_id);
        }
        Some(_) => {}
        None => *slot = Some(stamp.clone()),
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

/// The registers of the top-level fields in `keys` (sorted, distinct), in path order: every
/// chain through a field a patch names lies inside them.
fn subtrees<'a>(
    registers: &'a BTreeMap<FieldPath, Register>,
    keys: &'a [&'a String],
) -> impl Iterator<Item = (&'a FieldPath, &'a Register)> {
    keys.iter().flat_map(move |key| {
        let start: &[String] = std::slice::from_ref(*key);
        registers
            .range::<[String], _>((Bound::Included(start), Bound::Unbounded))
            .take_while(move |(p, _)| p.first() == Some(*key))
    })
}

/// `current` with the registers in `displaced` (sorted by path; `None` = absent) put back.
fn overlay<'a>(
    current: impl Iterator<Item = (&'a FieldPath, &'a Register)>,
    displaced: &'a [(Cow<'a, FieldPath>, Option<Register>)],
) -> Vec<(&'a FieldPath, &'a Register)> {
    let mut out = Vec::new();
    let mut old = displaced.iter().peekable();
    for (path, reg) in current {
        while let Some((p, r)) = old.next_if(|(p, _)| **p < *path) {
            out.extend(r.as_ref().map(|r| (&**p, r)));
        }
        match old.next_if(|(p, _)| **p == *path) {
            Some((_, r)) => out.extend(r.as_ref().map(|r| (path, r))),
            None => out.push((path, reg)),
        }
    }
    out.extend(old.filter_map(|(p, r)| r.as_ref().map(|r| (&**p, r))));
    out
}

/// Applies one change set to a document's state. Pure; `seq` of the returned change is 0.
///
/// The state after a change is the model of the module docs. To stay fast on large documents a
/// merge patch to an existing document only looks at the top-level fields it names (nothing else
/// can change), and registers are moved rather than cloned; `tests/naive_equivalence.rs` checks
/// this against the straightforward formulation.
pub fn apply_change(doc: &mut DocState, change: &ChangeSet) -> Applied {
    let stamp = &change.stamp;
    let retransmission = doc.note_device(stamp);
    let before_exists = doc.exists();

    // Paths the write names, with the value it gives them; what it does to fields it does not
    // name (a delete deletes, a full set unsets).
    let (replace, set, unset): (bool, &[(FieldPath, Value)], &[FieldPath]) = match &change.op {
        ChangeOp::Fields {
            replace,
            set,
            unset,
        } => (*replace, set, unset),
        ChangeOp::Delete => (false, &[], &[]),
    };
    let touched: Vec<(&FieldPath, Option<&Value>)> = set
        .iter()
        .map(|(p, v)| (p, Some(v)))
        .chain(unset.iter().map(|p| (p, None)))
        .collect();
    let side_op = if matches!(change.op, ChangeOp::Delete) {
        SideOp::Delete
    } else {
        SideOp::Unset
    };
    let clears = replace || matches!(change.op, ChangeOp::Delete);
    // Every register this write sets shares one copy of its stamp.
    let shared = std::cell::OnceCell::new();
    let new_register = |value: Option<&Value>, version: u64| Register {
        value: value.cloned(),
        stamp: Arc::clone(shared.get_or_init(|| Arc::new(stamp.clone()))),
        changed_version: version,
    };

    let mut sorted: Vec<&FieldPath> = touched.iter().map(|(p, _)| *p).collect();
    sorted.sort_unstable();
    let simple_paths = sorted.windows(2).all(|w| w[0] != w[1])
        && sorted.first().is_none_or(|p| !p.is_empty())
        && doc
            .registers
            .first_key_value()
            .is_none_or(|(p, _)| !p.is_empty());

    let version = doc.version;
    let before_cleared: Option<Stamp>;
    // The registers the write replaced or removed (`None`: there was none), in path order.
    let mut displaced: Vec<(Cow<'_, FieldPath>, Option<Register>)> = Vec::new();
    let mut keys: Vec<&String> = Vec::new();
    let patch_in_place = !clears && before_exists && simple_paths;
    if patch_in_place {
        // A merge patch to an existing document: only the named paths' registers change. The
        // ones they replace are kept aside to see the document as it was.
        if !set.is_empty() {
            keep_max(&mut doc.upserted_at, stamp);
        }
        let too_old = doc.cleared_at().is_some_and(|c| stamp < c);
        for (path, value) in &touched {
            if too_old {
                // Older than the newest delete/replace: it can never be visible, and neither can
                // an older register at its path.
                if doc.registers.get(*path).is_some_and(|r| *r.stamp >= *stamp) {
                    continue;
                }
                displaced.push((Cow::Borrowed(*path), doc.registers.remove(*path)));
                continue;
            }
            match doc.registers.get_mut(*path) {
                Some(r) if *r.stamp >= *stamp => {}
                Some(r) => displaced.push((
                    Cow::Borrowed(*path),
                    Some(std::mem::replace(r, new_register(*value, version))),
                )),
                None => {
                    doc.registers
                        .insert((*path).clone(), new_register(*value, version));
                    displaced.push((Cow::Borrowed(*path), None));
                }
            }
        }
        displaced.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        keys = sorted.iter().map(|p| &p[0]).collect();
        keys.dedup();
        before_cleared = None;
    } else {
        // Everything else: rebuild the registers in one merge pass, moving them; the ones the
        // write replaced or removed are kept aside to see the document as it was.
        let old_registers = std::mem::take(&mut doc.registers);
        before_cleared = doc.cleared_at().cloned();
        match &change.op {
            ChangeOp::Delete => keep_max(&mut doc.deleted_at, stamp),
            ChangeOp::Fields { .. } => {
                if replace {
                    keep_max(&mut doc.replaced_at, stamp);
                }
                if replace || !set.is_empty() {
                    keep_max(&mut doc.upserted_at, stamp);
                }
            }
        }
        let cleared = max(doc.deleted_at.as_ref(), doc.replaced_at.as_ref());
        let live = |s: &Stamp| cleared.is_none_or(|c| s >= c);
        // Merge the surviving registers with the write's, both in path order. (A hand-made
        // change naming a path twice: the first entry wins.)
        let mut named: Vec<(&FieldPath, Option<&Value>)> = if live(stamp) {
            touched.clone()
        } else {
            Vec::new()
        };
        named.sort_by(|a, b| a.0.cmp(b.0));
        named.dedup_by(|later, first| later.0 == first.0);
        let mut merged: Vec<(FieldPath, Register)> =
            Vec::with_capacity(old_registers.len() + named.len());
        let mut named = named.into_iter().peekable();
        for (path, reg) in old_registers {
            while let Some((p, v)) = named.next_if(|(p, _)| **p < path) {
                merged.push((p.clone(), new_register(v, version)));
                displaced.push((Cow::Borrowed(p), None));
            }
            match named.next_if(|(p, _)| **p == path) {
                Some((p, v)) if *reg.stamp < *stamp => {
                    merged.push((path, new_register(v, version)));
                    displaced.push((Cow::Borrowed(p), Some(reg)));
                }
                _ if live(&reg.stamp) => merged.push((path, reg)),
                _ => displaced.push((Cow::Owned(path), Some(reg))),
            }
        }
        for (p, v) in named {
            merged.push((p.clone(), new_register(v, version)));
            displaced.push((Cow::Borrowed(p), None));
        }
        doc.registers = merged.into_iter().collect();
    }

    // The visible leaves before and after, over the part of the document that can differ.
    let (before, after) = if patch_in_place {
        let now: Vec<_> = subtrees(&doc.registers, &keys).collect();
        let region = overlay(now.iter().copied(), &displaced);
        (sweep(region.into_iter()), sweep(now.into_iter()))
    } else {
        let region = overlay(doc.registers.iter(), &displaced);
        (sweep(region.into_iter()), sweep(doc.registers.iter()))
    };
    let before_cleared = if patch_in_place {
        doc.cleared_at()
    } else {
        before_cleared.as_ref()
    };
    let before: Vec<&Entry> = before
        .iter()
        .filter(|e| e.visible(before_cleared))
        .collect();
    let after_cleared = doc.cleared_at();
    let after_visible: Vec<&Entry> = after.iter().filter(|e| e.visible(after_cleared)).collect();
    let after_exists = doc.exists();

    // The diff: both lists are in path order.
    let mut set_out = Map::new();
    let mut unset_out: Vec<String> = Vec::new();
    let mut unchanged: Vec<(&FieldPath, u64)> = Vec::new();
    {
        let (mut i, mut j) = (0, 0);
        while i < before.len() || j < after_visible.len() {
            let order = match (before.get(i), after_visible.get(j)) {
                (Some(b), Some(a)) => b.path.cmp(a.path),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    unset_out.push(dotted(before[i].path));
                    i += 1;
                }
                std::cmp::Ordering::Equal => {
                    let (b, a) = (before[i], after_visible[j]);
                    if b.reg.value != a.reg.value {
                        set_out.insert(dotted(a.path), a.reg.value.clone().unwrap_or_default());
                    } else if *a.reg.stamp == *stamp && *b.reg.stamp != *stamp {
                        // Rewritten with the same value: the field's last change stays where it
                        // was (what `stale_base_version` compares against).
                        let at = sorted.binary_search(&a.path).map(|k| sorted[k]);
                        if let Ok(path) = at {
                            unchanged.push((path, b.reg.changed_version));
                        }
                    }
                    i += 1;
                    j += 1;
                }
                std::cmp::Ordering::Greater => {
                    let a = after_visible[j];
                    set_out.insert(dotted(a.path), a.reg.value.clone().unwrap_or_default());
                    j += 1;
                }
            }
        }
    }
    let changed = !set_out.is_empty() || !unset_out.is_empty() || before_exists != after_exists;
    let new_version = version + u64::from(changed);

    let mut applied = Applied {
        retransmission,
        ..Applied::default()
    };
    if changed {
        applied.change = Some(SyncEvent {
            v: EVENT_FORMAT_VERSION,
            tenant: change.key.bucket.tenant.clone(),
            bucket: change.key.bucket.bucket.clone(),
            doc_id: change.key.doc_id.clone(),
            version: new_version,
            seq: 0,
            hlc: stamp.hlc,
            event_id: stamp.event_id.clone(),
            device_id: stamp.device_id.clone(),
            deleted: !after_exists,
            set: if after_exists { set_out } else { Map::new() },
            unset: if after_exists {
                unset_out
            } else {
                before.iter().map(|e| dotted(e.path)).collect()
            },
            clamped_from: change.clamped_from,
        });
    }
    if !retransmission {
        let view = ConflictView {
            doc,
            version: new_version,
            before: &before,
            after_all: &after,
            after_visible: &after_visible,
        };
        applied.conflicts = detect_conflicts(&view, change, side_op, &touched);
    }

    if changed {
        doc.version = new_version;
        doc.hlc = Some(stamp.hlc);
        // Only this write's registers can carry its stamp, unless the same stamp was applied
        // before (a retransmission, or a device forgotten from the table).
        if patch_in_place && !retransmission && doc.devices.len() < MAX_DEVICES_PER_DOC {
            for (path, _) in &touched {
                if let Some(r) = doc.registers.get_mut(*path).filter(|r| *r.stamp == *stamp) {
                    r.changed_version = new_version;
                }
            }
        } else {
            for r in doc.registers.values_mut().filter(|r| *r.stamp == *stamp) {
                r.changed_version = new_version;
            }
        }
    }
    for (path, since) in unchanged {
        if let Some(r) = doc.registers.get_mut(path) {
            r.changed_version = since;
        }
    }
    applied
}

struct ConflictView<'v, 'a> {
    /// The document after the write.
    doc: &'v DocState,
    /// Its version after the write.
    version: u64,
    /// The visible registers before the write (over the part that can differ), in path order.
    before: &'v [&'v Entry<'a>],
    /// Every register after the write, over the same part, in path order.
    after_all: &'v [Entry<'a>],
    /// The visible ones among them.
    after_visible: &'v [&'v Entry<'a>],
}

/// Writing the same thing is agreement, not a conflict: two removals, or the same value on the
/// same field (a value on an ancestor or descendant field is a different document).
fn agree(a: &ConflictSide, b: &ConflictSide) -> bool {
    match (a.op == SideOp::Set, b.op == SideOp::Set) {
        (false, false) => true,
        (true, true) => a.value == b.value && a.via_field == b.via_field,
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
    view: &ConflictView<'_, '_>,
    change: &ChangeSet,
    side_op: SideOp,
    touched: &[(&FieldPath, Option<&Value>)],
) -> Vec<ConflictEvent> {
    let doc = view.doc;
    let stamp = &change.stamp;
    let is_visible_after = |path: &FieldPath| {
        view.after_visible
            .binary_search_by(|e| e.path.cmp(path))
            .is_ok()
    };
    let mut out = Vec::new();
    let mut report = |field: &FieldPath, rule, winner: ConflictSide, loser: ConflictSide| {
        if agree(&winner, &loser) {
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
            version: view.version,
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
    let incoming_side = |path: &FieldPath, value: Option<&Value>, at: &FieldPath| {
        let op = if value.is_some() {
            SideOp::Set
        } else {
            SideOp::Unset
        };
        let mut side = ConflictSide::new(stamp, op, value.cloned());
        if at != path {
            side.via_field = Some(dotted(at));
        }
        side
    };

    // Each named path's register after the write, found in one merge pass (both in path order).
    let mut by_path: Vec<usize> = (0..touched.len()).collect();
    by_path.sort_by(|&a, &b| touched[a].0.cmp(touched[b].0));
    let mut found: Vec<Option<&Entry>> = vec![None; touched.len()];
    let mut cursor = 0;
    for k in by_path {
        let path = touched[k].0;
        while view.after_all.get(cursor).is_some_and(|e| e.path < path) {
            cursor += 1;
        }
        found[k] = view.after_all.get(cursor).filter(|e| e.path == path);
    }

    // 1. Named fields the write lost.
    for (&(path, value), entry) in touched.iter().zip(found) {
        let entry = entry.filter(|e| *e.reg.stamp == *stamp);
        if entry.is_some_and(|e| value.is_none() || !e.hidden) {
            continue;
        }
        let hidden_by = doc.newer_on_chain(path, stamp);
        let at_path = doc
            .registers
            .get_key_value(path)
            .filter(|(_, r)| *r.stamp > *stamp);
        let by_register = [at_path, hidden_by]
            .into_iter()
            .flatten()
            .max_by(|a, b| a.1.stamp.cmp(&b.1.stamp));
        let by_doc = doc.cleared_at().filter(|c| *c > stamp);
        let winner = match (by_register, by_doc) {
            (Some((_, r)), Some(c)) if *c > *r.stamp => doc_side(c),
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
    for prev in view.before {
        let path = prev.path;
        let unseen = change
            .base_version
            .is_some_and(|b| b < prev.reg.changed_version)
            && prev.reg.stamp.device_id != stamp.device_id;
        if !unseen || *prev.reg.stamp >= *stamp {
            continue;
        }
        let replaced = !is_visible_after(path)
            || find(view.after_all, path).is_some_and(|e| *e.reg.stamp == *stamp);
        if !replaced {
            continue;
        }
        let via = touched
            .iter()
            .filter(|(p, _)| is_prefix(p, path) || is_prefix(path, p))
            .min_by(|a, b| a.0.cmp(b.0));
        let winner = match via {
            Some(&(at, value)) => incoming_side(path, value, at),
            None => ConflictSide::new(stamp, side_op, None),
        };
        report(
            path,
            ConflictRule::StaleBaseVersion,
            winner,
            register_side(path, path, prev.reg),
        );
    }

    // 3. Fields a delete or a full-document set could not remove implicitly.
    let implicit = match &change.op {
        ChangeOp::Delete => true,
        ChangeOp::Fields { replace, .. } => *replace,
    };
    if implicit {
        let mut cursor = 0;
        for prev in view.before {
            let path = prev.path;
            while view.after_all.get(cursor).is_some_and(|e| e.path < path) {
                cursor += 1;
            }
            let now = view.after_all.get(cursor).filter(|e| e.path == path);
            let Some(now) = now.filter(|e| *e.reg.stamp > *stamp) else {
                continue;
            };
            let named = touched
                .iter()
                .any(|(n, _)| is_prefix(n, path) || is_prefix(path, n));
            if !named && is_visible_after(path) {
                let winner = register_side(path, path, now.reg);
                let loser = ConflictSide::new(stamp, side_op, None);
                report(path, ConflictRule::LwwTimestamp, winner, loser);
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
    /// A document's state, to be updated: [`resolve_lww`] stores it back with
    /// [`ResolveState::store_doc`] right after (when neither call fails), so a store may hand over
    /// its own copy instead of cloning it. Defaults to [`ResolveState::load_doc`].
    fn take_doc(&mut self, key: &DocKey) -> Result<Option<DocState>, Self::Error> {
        self.load_doc(key)
    }
    /// Stores a document's state.
    fn store_doc(&mut self, key: &DocKey, doc: DocState) -> Result<(), Self::Error>;
    /// The bucket's last sequence number (0 before the first change).
    fn last_seq(&mut self, bucket: &BucketKey) -> Result<u64, Self::Error>;
    /// Stores the bucket's last sequence number.
    fn store_last_seq(&mut self, bucket: &BucketKey, seq: u64) -> Result<(), Self::Error>;
}

/// Resolves one change set against the state: per-field LWW, a bucket sequence number for the
/// visible change, and the conflicts it revealed.
pub fn resolve_lww<S: ResolveState>(
    state: &mut S,
    change: &ChangeSet,
) -> Result<Applied, S::Error> {
    let mut doc = state.take_doc(&change.key)?.unwrap_or_default();
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
    /// Documents by key (unordered: sort the keys for a stable order).
    pub docs: HashMap<DocKey, DocState>,
    /// Last sequence number by bucket.
    pub seqs: BTreeMap<BucketKey, u64>,
}

impl ResolveState for MemState {
    type Error = Infallible;
    fn load_doc(&mut self, key: &DocKey) -> Result<Option<DocState>, Infallible> {
        Ok(self.docs.get(key).cloned())
    }
    /// Moves the document out, leaving an empty state until [`ResolveState::store_doc`].
    fn take_doc(&mut self, key: &DocKey) -> Result<Option<DocState>, Infallible> {
        Ok(self.docs.get_mut(key).map(std::mem::take))
    }
    fn store_doc(&mut self, key: &DocKey, doc: DocState) -> Result<(), Infallible> {
        match self.docs.get_mut(key) {
            Some(slot) => *slot = doc,
            None => {
                self.docs.insert(key.clone(), doc);
            }
        }
        Ok(())
    }
    fn last_seq(&mut self, bucket: &BucketKey) -> Result<u64, Infallible> {
        Ok(self.seqs.get(bucket).copied().unwrap_or(0))
    }
    fn store_last_seq(&mut self, bucket: &BucketKey, seq: u64) -> Result<(), Infallible> {
        match self.seqs.get_mut(bucket) {
            Some(slot) => *slot = seq,
            None => {
                self.seqs.insert(bucket.clone(), seq);
            }
        }
        Ok(())
    }
}

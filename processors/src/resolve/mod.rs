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
//!
//! # Where things are
//!
//! - [`DocState`] (`doc.rs`), its [`Registers`] (`registers.rs`), a flat map in path order, and
//!   its [`Devices`] (`devices.rs`); both search dense keys (`path_key.rs`, `sort_key.rs`) before
//!   strings;
//! - `fast.rs`: the common write (a merge patch that wins on fields standing alone on their
//!   chains), done directly; the rest below is the general way;
//! - `plan.rs`: what a write does to the registers, worked out before anything changes;
//! - `sweep.rs`: which registers are visible, in one pass;
//! - `conflicts.rs`: the conflict rules;
//! - [`MemState`] (`mem.rs`): an in-memory [`ResolveState`];
//! - `prefetch.rs`: the read-ahead of [`resolve_batch`].

mod conflicts;
mod devices;
mod doc;
mod fast;
mod mem;
mod path_key;
mod plan;
mod prefetch;
pub mod registers;
mod sort_key;
mod sweep;

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::Value;
use smallvec::SmallVec;

use crate::diff::{ChangeOp, ChangeSet, Stamp};
use crate::events::{ConflictEvent, SetFields, SideOp, SyncEvent, EVENT_FORMAT_VERSION};
use crate::path::dotted;
use crate::reject::{RejectCode, Rejection};
use crate::value::same_opt;
use crate::write::{BucketKey, DocKey};

use conflicts::{detect_conflicts, ConflictView};
use path_key::{cmp_paths, PathKey};
use plan::{
    after_entries, before_entries, commit, plan_patch, plan_rebuild, Edits, Indexed, Named, Owned,
    Region,
};
use sweep::{mark_visible, Entries, Entry};

pub use devices::{Devices, Seen};
use doc::FromDevice;
pub use doc::{DocState, StoredBound, MAX_DEVICES_PER_DOC};
pub use mem::MemState;
pub use prefetch::Prefetch;
pub use registers::{Register, Registers};

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

/// Keeps the newer of `slot` and `stamp` in `slot` (sharing `stamp`, not copying it).
fn keep_max(slot: &mut Option<Arc<Stamp>>, stamp: &Arc<Stamp>) {
    if slot.as_deref().is_none_or(|s| s < &**stamp) {
        *slot = Some(Arc::clone(stamp));
    }
}

/// Applies one change set to a document's state. Pure; `seq` of the returned change is 0.
///
/// The state after a change is the model of the module docs. To stay fast the write is worked out
/// before the state changes, and a merge patch to an existing document only looks at the chains
/// of the paths it names (nothing else can change): the registers before and after are compared
/// only there, and the write's registers are stored once its outputs are known.
/// `tests/naive_equivalence.rs` checks this against the straightforward formulation.
///
/// The change set is consumed: its paths and values move into the registers it stores.
pub fn apply_change(doc: &mut DocState, mut change: ChangeSet) -> Applied {
    let op = std::mem::replace(&mut change.op, ChangeOp::Delete);
    with_key(apply_op(doc, &change, op), change.key)
}

/// `applied` with its change's tenant, bucket and document id, moved out of `key` (the write's
/// own strings, not copies of them).
fn with_key(mut applied: Applied, key: DocKey) -> Applied {
    if let Some(event) = applied.change.as_mut() {
        event.tenant = key.bucket.tenant;
        event.bucket = key.bucket.bucket;
        event.doc_id = key.doc_id;
    }
    applied
}

/// [`apply_change`] of `change` with its op `op`, taken out of it (`change.op` is not read). The
/// change it returns has no tenant, bucket or document id yet: see [`with_key`].
fn apply_op(doc: &mut DocState, change: &ChangeSet, op: ChangeOp) -> Applied {
    let stamp: &Stamp = &change.stamp;
    // Ask for the tables searched below all at once, so their cache misses overlap instead of
    // each search step waiting for the one before (a hint: nothing changes).
    prefetch::tables(doc);
    let retransmission = match doc.note_device(stamp) {
        FromDevice::Repeat => {
            return Applied {
                retransmission: true,
                ..Applied::default()
            }
        }
        FromDevice::Retransmission => true,
        FromDevice::Newer => false,
    };
    let before_exists = doc.exists();

    // Paths the write names, with the value it gives them; what it does to fields it does not
    // name (a delete deletes, a full set unsets).
    let is_delete = matches!(op, ChangeOp::Delete);
    let (replace, owned) = match op {
        ChangeOp::Fields {
            replace,
            set,
            unset,
        } => (replace, Owned { set, unset }),
        ChangeOp::Delete => (
            false,
            Owned {
                set: Vec::new(),
                unset: Vec::new(),
            },
        ),
    };
    // The common case, when it is one, directly (see `fast.rs`). Only this write's registers
    // may carry its stamp for it: not a retransmission, nor a write of a device forgotten from
    // a full table.
    let owned = if !(replace || is_delete)
        && before_exists
        && !retransmission
        && doc.devices.len() < MAX_DEVICES_PER_DOC
    {
        match fast::patch_in_place(doc, change, owned) {
            Ok(applied) => return applied,
            Err(owned) => owned,
        }
    } else {
        owned
    };
    let (set, unset) = (&owned.set, &owned.unset);
    // The named paths in the change set's order (its sets, then its unsets), which edits refer
    // to, and their keys.
    let named: SmallVec<[Named<'_>; 8]> = set
        .iter()
        .map(|(p, v)| (p, Some(v)))
        .chain(unset.iter().map(|p| (p, None)))
        .collect();
    let keys: SmallVec<[PathKey; 8]> = named.iter().map(|(p, _)| PathKey::of(p)).collect();
    let side_op = if is_delete {
        SideOp::Delete
    } else {
        SideOp::Unset
    };
    let version = doc.version;

    let mut sorted: SmallVec<[Indexed<'_>; 8]> = named
        .iter()
        .enumerate()
        .map(|(i, &(p, v))| (p, v, i, keys[i]))
        .collect();
    // By key (a change set's leaves come in the body's order, which need not be path order); of
    // a path named twice, the first stays first.
    let order = |a: &Indexed<'_>, b: &Indexed<'_>| cmp_paths(a.3, a.0, b.3, b.0);
    sorted.sort_unstable_by(|a, b| order(a, b).then(a.2.cmp(&b.2)));
    let repeated = sorted
        .windows(2)
        .filter(|w| order(&w[0], &w[1]).is_eq())
        .count();
    let distinct_named = sorted.len() - repeated;
    let simple_paths = repeated == 0
        && sorted.first().is_none_or(|(p, ..)| !p.is_empty())
        && doc
            .registers
            .first_key_value()
            .is_none_or(|(p, _)| !p.is_empty());
    let in_place = !(replace || is_delete) && before_exists && simple_paths;

    // The edits, the region of the registers that can change visibility, and that region as it
    // is (swept against the newest delete/replace before the write) and as it will be.
    let (mut edits, mut region) = (Edits::new(), Region::new());
    let (mut before, mut after) = (Entries::new(), Entries::new());
    if in_place {
        // A merge patch to an existing document: only the named paths' registers change.
        if !set.is_empty() {
            keep_max(&mut doc.upserted_at, &change.stamp);
        }
        let too_old = doc.cleared_at().is_some_and(|c| stamp < c);
        plan_patch(
            &doc.registers,
            &sorted,
            stamp,
            too_old,
            &mut edits,
            &mut region,
        );
        before_entries(&doc.registers, &region, &mut before);
        mark_visible(&mut before, doc.cleared_at());
    } else {
        // Everything else: all registers, and those older than a newer delete/replace go.
        region.push(0..doc.registers.len());
        before_entries(&doc.registers, &region, &mut before);
        mark_visible(&mut before, doc.cleared_at());
        if is_delete {
            keep_max(&mut doc.deleted_at, &change.stamp);
        } else {
            if replace {
                keep_max(&mut doc.replaced_at, &change.stamp);
            }
            if replace || !set.is_empty() {
                keep_max(&mut doc.upserted_at, &change.stamp);
            }
        }
        let cleared = doc.cleared_at();
        let live = |s: &Stamp| cleared.is_none_or(|c| s >= c);
        // A hand-made change naming a path twice: the first entry wins.
        if live(stamp) {
            sorted.dedup_by(|later, first| order(later, first).is_eq());
        } else {
            sorted.clear();
        }
        plan_rebuild(&doc.registers, &sorted, stamp, live, &mut edits);
    }
    // The write's own stamp when it is the newest delete/replace, so its registers compare with
    // it by address.
    let after_cleared = doc.cleared_at().map(|c| if c == stamp { stamp } else { c });
    after_entries(
        &doc.registers,
        &region,
        &edits,
        (&named, &keys),
        (stamp, version),
        &mut after,
    );
    mark_visible(&mut after, after_cleared);
    let after_exists = doc.exists();

    let VisibleDiff {
        set: set_out,
        unset: unset_out,
        unchanged,
    } = visible_diff(&before, &after, stamp);
    let changed = !set_out.is_empty() || !unset_out.is_empty() || before_exists != after_exists;
    let new_version = version + u64::from(changed);

    let mut applied = Applied {
        retransmission,
        ..Applied::default()
    };
    if changed {
        applied.change = Some(if after_exists {
            change_event(change, new_version, set_out, unset_out)
        } else {
            let gone = before.iter().filter(|e| e.visible);
            let mut event = change_event(change, new_version, Vec::new(), Vec::new());
            event.deleted = true;
            event.unset = gone.map(|e| dotted(e.path)).collect();
            event
        });
    }
    if !retransmission {
        let stored = edits.iter().filter(|e| e.stores()).count();
        let view = ConflictView {
            deleted_at: doc.deleted_at.as_deref(),
            cleared_at: after_cleared,
            version: new_version,
            before: &before,
            after: &after,
            implicit: replace || is_delete,
            all_named_won: stored == distinct_named
                && after
                    .iter()
                    .filter(|e| e.fresh.is_some())
                    .all(|e| e.value.is_none() || !e.hidden),
        };
        // A full set reports the fields it lost in path order, whatever the order of its body
        // (a merge patch in the order it names them).
        let mut by_path: SmallVec<[Named<'_>; 8]> = SmallVec::new();
        if replace && !view.all_named_won {
            by_path.extend(named.iter().copied());
            by_path.sort_by(|a, b| a.0.cmp(b.0));
        }
        let reported = if by_path.is_empty() { &named } else { &by_path };
        applied.conflicts = detect_conflicts(&view, change, side_op, reported.iter().copied());
    }
    // Nothing borrows the change set's paths and values from here on: they can move.
    drop((before, after, sorted, named));

    if changed {
        doc.version = new_version;
        doc.hlc = Some(stamp.hlc);
        // Only this write's registers can carry its stamp, unless the same stamp was applied
        // before (a retransmission, or a device forgotten from the table).
        let applied_before =
            !in_place || retransmission || doc.devices.len() >= MAX_DEVICES_PER_DOC;
        if applied_before {
            for r in doc.registers.values_mut().filter(|r| *r.stamp == *stamp) {
                r.changed_version = new_version;
            }
        }
    }
    // The write's registers date from this version, unless their value did not change.
    let since = if changed { new_version } else { version };
    commit(
        &mut doc.registers,
        &edits,
        (owned, &keys),
        &change.stamp,
        since,
        &unchanged,
    );
    applied
}

/// The visible change `change` made, bringing its document to `version`: the fields it `set`
/// and `unset` (distinct dotted paths, in path order). It has no tenant, bucket or document id
/// yet (see [`with_key`]) and no sequence number.
fn change_event(
    change: &ChangeSet,
    version: u64,
    set: Vec<(String, Value)>,
    unset: Vec<String>,
) -> SyncEvent {
    SyncEvent {
        v: EVENT_FORMAT_VERSION,
        tenant: String::new(),
        bucket: String::new(),
        doc_id: String::new(),
        version,
        seq: 0,
        hlc: change.stamp.hlc,
        event_id: change.stamp.event_id.clone(),
        device_id: change.stamp.device_id.clone(),
        deleted: false,
        set: SetFields::from_distinct(set),
        unset,
        clamped_from: change.clamped_from,
    }
}

/// How the visible registers differ before and after a write.
struct VisibleDiff {
    /// Fields whose value changed or that appeared, by dotted path.
    set: Vec<(String, Value)>,
    /// Fields that disappeared, by dotted path, in path order.
    unset: Vec<String>,
    /// The write's registers that rewrote the value their field already had, as
    /// `(edit, version the value dates from)`: they keep that version (what
    /// `stale_base_version` compares against).
    unchanged: SmallVec<[(usize, u64); 8]>,
}

/// The diff of the visible entries of `before` and `after` (both in path order) for the write
/// with `stamp`.
fn visible_diff(before: &[Entry<'_>], after: &[Entry<'_>], stamp: &Stamp) -> VisibleDiff {
    let mut diff = VisibleDiff {
        set: Vec::new(),
        unset: Vec::new(),
        unchanged: SmallVec::new(),
    };
    let mut was = before.iter().filter(|e| e.visible).peekable();
    let mut now = after.iter().filter(|e| e.visible).peekable();
    loop {
        let order = match (was.peek(), now.peek()) {
            (Some(b), Some(a)) => cmp_paths(b.key, b.path, a.key, a.path),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => return diff,
        };
        match order {
            Ordering::Less => {
                let b = was.next().expect("peeked");
                diff.unset.push(dotted(b.path));
            }
            Ordering::Equal => {
                let (b, a) = (was.next().expect("peeked"), now.next().expect("peeked"));
                if !same_opt(b.value, a.value) {
                    let value = a.value.cloned().unwrap_or_default();
                    diff.set.push((dotted(a.path), value));
                } else if let Some(k) = a.fresh.filter(|_| *b.stamp != *stamp) {
                    diff.unchanged.push((k, b.changed_version));
                }
            }
            Ordering::Greater => {
                let a = now.next().expect("peeked");
                diff.set
                    .push((dotted(a.path), a.value.cloned().unwrap_or_default()));
            }
        }
    }
}

/// What the resolver reads and writes. The runtime implements it over sled with an overlay.
pub trait ResolveState {
    /// The store's error.
    type Error;
    /// A document's state.
    fn load_doc(&mut self, key: &DocKey) -> Result<Option<DocState>, Self::Error>;
    /// A document's state, to be updated: the default [`ResolveState::update_doc`] stores it back
    /// with [`ResolveState::store_doc`] right after (when neither call fails), so a store may hand
    /// over its own copy instead of cloning it. Defaults to [`ResolveState::load_doc`].
    fn take_doc(&mut self, key: &DocKey) -> Result<Option<DocState>, Self::Error> {
        self.load_doc(key)
    }
    /// Stores a document's state.
    fn store_doc(&mut self, key: &DocKey, doc: DocState) -> Result<(), Self::Error>;
    /// Runs `f` on a document's state (an empty one when there is none) and stores the result:
    /// what [`resolve_lww`] does with each write's document. Defaults to
    /// [`ResolveState::take_doc`], `f`, [`ResolveState::store_doc`]; a store that can change the
    /// state where it lies may do that instead.
    fn update_doc<R>(
        &mut self,
        key: &DocKey,
        f: impl FnOnce(&mut DocState) -> R,
    ) -> Result<R, Self::Error> {
        let mut doc = self.take_doc(key)?.unwrap_or_default();
        let out = f(&mut doc);
        self.store_doc(key, doc)?;
        Ok(out)
    }
    /// A hint that `change` is resolved soon: a store may start bringing its document's state
    /// into memory or the CPU caches. [`resolve_batch`] gives each change
    /// [`Prefetch::Tables`] some writes ahead and [`Prefetch::Registers`] closer; a store that
    /// holds documents in memory can pass them to [`DocState::prefetch`]. Never changes what is
    /// stored. Defaults to nothing.
    fn prefetch(&mut self, change: &ChangeSet, stage: Prefetch) {
        let _ = (change, stage);
    }
    /// The bucket's last sequence number (0 before the first change).
    fn last_seq(&mut self, bucket: &BucketKey) -> Result<u64, Self::Error>;
    /// Stores the bucket's last sequence number.
    fn store_last_seq(&mut self, bucket: &BucketKey, seq: u64) -> Result<(), Self::Error>;
}

/// How many changes ahead [`resolve_batch`] asks for [`Prefetch::Tables`].
const TABLES_AHEAD: usize = 8;
/// How many changes ahead [`resolve_batch`] asks for [`Prefetch::Registers`].
const REGISTERS_AHEAD: usize = 3;

/// Resolves change sets in order, exactly as [`resolve_lww`] on each one after the other, and
/// hands each result to `each`, while telling the state which documents
/// come next ([`ResolveState::prefetch`]) so that fetching them overlaps with resolving the ones
/// before. On an error the changes before the failing one have been applied and handed over, as
/// in such a loop; the rest are dropped.
///
/// `changes` is read only 9 changes ahead of the one being resolved, so it can be
/// lazy (`compute_diff` over a batch of records): then few change sets are alive at a time, and
/// each result can be serialised and dropped before the next change is made, as without
/// batching. (Collecting a thousand results before dropping them made a batch of patches 2–3×
/// slower in the benchmark; computing sixteen change sets before resolving them cost 10 % more
/// instructions in glibc's allocator.)
pub fn resolve_batch<S: ResolveState>(
    state: &mut S,
    changes: impl IntoIterator<Item = ChangeSet>,
    mut each: impl FnMut(Applied),
) -> Result<(), S::Error> {
    let mut changes = changes.into_iter();
    // The next changes, each told to the state as it comes in.
    let mut window: VecDeque<ChangeSet> = VecDeque::with_capacity(TABLES_AHEAD + 1);
    let mut fill = |window: &mut VecDeque<ChangeSet>, state: &mut S| {
        while window.len() <= TABLES_AHEAD {
            let Some(next) = changes.next() else { break };
            state.prefetch(&next, Prefetch::Tables);
            window.push_back(next);
        }
    };
    fill(&mut window, state);
    for c in window.iter().take(REGISTERS_AHEAD) {
        state.prefetch(c, Prefetch::Registers);
    }
    while let Some(change) = window.pop_front() {
        if let Some(c) = window.get(REGISTERS_AHEAD - 1) {
            state.prefetch(c, Prefetch::Registers);
        }
        each(resolve_lww(state, change)?);
        fill(&mut window, state);
    }
    Ok(())
}

/// [`resolve_lww`], refusing a write that would make its document's stored state larger than
/// `max_bytes` bytes as `measure` counts them (the store's encoding), and larger than it was:
/// then nothing changes. (A document already over the limit, from before it or from a lower
/// one, still takes the writes that do not grow it: removals, a smaller replace.)
///
/// Measuring costs an encoding, so a document is measured only when its
/// [`DocState::stored_bound`] plus what the write may add passes `max_bytes`; otherwise the
/// bound grows by that much. A document's state grows with every field any write gave it, so
/// without a limit a few large patches could make one past what the state's log (Kafka) or the
/// view's database takes, and its partition would stop.
pub fn resolve_lww_bounded<S: ResolveState>(
    state: &mut S,
    mut change: ChangeSet,
    max_bytes: usize,
    measure: impl Fn(&DocState) -> usize,
) -> Result<Result<Applied, Rejection>, S::Error> {
    let seq = state.last_seq(&change.key.bucket)? + 1;
    let growth = growth_bound(&change);
    let op = std::mem::replace(&mut change.op, ChangeOp::Delete);
    let apply = |doc: &mut DocState| apply_numbered(doc, &change, op, seq);
    let outcome = state.update_doc(&change.key, |doc| {
        let bound = doc.stored_bound.0.saturating_add(growth);
        if bound <= max_bytes {
            let applied = apply(doc);
            doc.stored_bound.0 = bound;
            return Ok(applied);
        }
        // Near the limit: the write goes on a copy, kept only if it fits.
        let mut trial = doc.clone();
        let applied = apply(&mut trial);
        let size = measure(&trial);
        if size > max_bytes && size > measure(doc) {
            return Err(Rejection::new(
                RejectCode::TooLarge,
                format!(
                    "the document would take {size} bytes stored, over limits.max_state_bytes ({max_bytes}): remove fields from it, or keep large data in more documents"
                ),
            ));
        }
        trial.stored_bound.0 = size;
        *doc = trial;
        Ok(applied)
    })?;
    if outcome.as_ref().is_ok_and(|a| a.change.is_some()) {
        state.store_last_seq(&change.key.bucket, seq)?;
    }
    Ok(outcome.map(|applied| with_key(applied, change.key)))
}

/// [`apply_op`], giving a visible change (and the document) the bucket sequence number `seq`.
fn apply_numbered(doc: &mut DocState, change: &ChangeSet, op: ChangeOp, seq: u64) -> Applied {
    let mut applied = apply_op(doc, change, op);
    if let Some(event) = applied.change.as_mut() {
        event.seq = seq;
        doc.seq = seq;
    }
    applied
}

/// An upper bound of what applying `change` adds to its document's stored state, in bytes: its
/// paths and values with room for their encoding, a register's fixed part per path, and the
/// write's stamp in each place it can be stored (the stamp table, the device table, the newest
/// set and the newest replace or delete), with room for wider numbers.
fn growth_bound(change: &ChangeSet) -> usize {
    fn path(p: &[String]) -> usize {
        64 + p.iter().map(|s| s.len() + 10).sum::<usize>()
    }
    fn value(v: &Value) -> usize {
        10 + match v {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(value).sum(),
            Value::Object(members) => members.iter().map(|(k, v)| k.len() + 10 + value(v)).sum(),
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        }
    }
    let stamp = 4 * (change.stamp.device_id.len() + change.stamp.event_id.len() + 20) + 32;
    stamp
        + match &change.op {
            ChangeOp::Fields { set, unset, .. } => {
                set.iter().map(|(p, v)| path(p) + value(v)).sum::<usize>()
                    + unset.iter().map(|p| path(p)).sum::<usize>()
            }
            ChangeOp::Delete => 0,
        }
}

/// Resolves one change set against the state: per-field LWW, a bucket sequence number for the
/// visible change, and the conflicts it revealed. The change set is consumed (see
/// [`apply_change`]).
pub fn resolve_lww<S: ResolveState>(
    state: &mut S,
    mut change: ChangeSet,
) -> Result<Applied, S::Error> {
    let seq = state.last_seq(&change.key.bucket)? + 1;
    let op = std::mem::replace(&mut change.op, ChangeOp::Delete);
    let applied = state.update_doc(&change.key, |doc| apply_numbered(doc, &change, op, seq))?;
    if applied.change.is_some() {
        state.store_last_seq(&change.key.bucket, seq)?;
    }
    Ok(with_key(applied, change.key))
}

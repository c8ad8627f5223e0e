//! The common write, done directly: a merge patch to an existing document that wins on every
//! field it names, where each of those fields already has a register and stands alone on its
//! chain (no register on an ancestor or descendant path).
//!
//! Then a field is visible before the write when its register has a value and is not older
//! than the newest delete or replace, and after it when the write gives it a value, so the
//! visible change is a comparison per named field, and the write's registers replace the old
//! ones where they lie. Everything else goes the general way of [`super::apply_op`] (the
//! module docs' model): [`patch_in_place`] works out whether it applies before it changes
//! anything. `tests/naive_equivalence.rs` and `tests/properties.rs` check both ways against
//! the models.

use std::sync::Arc;

use serde_json::Value;
use smallvec::SmallVec;

use crate::diff::{ChangeSet, Stamp};
use crate::path::into_dotted;
use crate::value::same_value;

use super::doc::DocState;
use super::path_key::PathKey;
use super::plan::Owned;
use super::prefetch;
use super::{change_event, keep_max, Applied};

/// Most paths a patch may name to be done here; longer ones go the general way (so the work
/// done before a fallback stays small).
const MOST_NAMED: usize = 8;

/// One named field: where its register is, and which of the write's paths it is (its sets,
/// then its unsets).
#[derive(Clone, Copy)]
struct Found {
    at: usize,
    named: usize,
}

/// What a named field shows before and after the write.
#[derive(Clone, Copy)]
enum Shows {
    /// The same value: it keeps the version it dates from.
    Kept(u64),
    /// A new or changed value.
    Set,
    /// Shown before, removed now.
    Unset,
    /// Removed, and not shown before either.
    Hidden,
}

/// Applies `owned` (the sets and unsets of the merge patch `change`, taken out of it) to `doc`
/// when the write is the common case of the module docs, or hands `owned` back untouched.
///
/// The caller has checked that the document exists, that the write is not a retransmission,
/// and that the device table is not full (else older registers may carry the write's stamp).
pub(super) fn patch_in_place(
    doc: &mut DocState,
    change: &ChangeSet,
    mut owned: Owned,
) -> Result<Applied, Owned> {
    let stamp: &Stamp = &change.stamp;
    let named_count = owned.set.len() + owned.unset.len();
    if named_count == 0 || named_count > MOST_NAMED {
        return Err(owned);
    }
    if doc.cleared_at().is_some_and(|c| stamp < c) {
        return Err(owned);
    }
    // A writer that has not seen the latest version may have overwritten a change it did not
    // see (`stale_base_version`): such writes are checked the general way. (A field's value
    // never dates from after the document's version, so a writer that saw it cannot.)
    if change.base_version.is_some_and(|b| b < doc.version) {
        return Err(owned);
    }
    let Some(found) = find_named(doc, stamp, &owned) else {
        return Err(owned);
    };
    // The write goes this way, and moves no register: index them for the next one (built once,
    // then kept while the document's fields stay the same). A patch that adds a field goes the
    // general way, which would drop the index at once, so it builds none.
    doc.registers.index_paths();
    let cleared = doc.cleared_at();
    let entries = doc.registers.as_slice();
    // What the `base_version` check above relies on. Only a damaged state breaks it (a field
    // changed after the document's version); the general way then still finds the conflict.
    if change.base_version.is_some()
        && found
            .iter()
            .any(|f| entries[f.at].1.changed_version > doc.version)
    {
        return Err(owned);
    }
    let live = |s: &Stamp| cleared.is_none_or(|c| s >= c);

    // What each named field shows before and after, in path order (the registers' order).
    let mut shows: SmallVec<[Shows; MOST_NAMED]> = SmallVec::with_capacity(found.len());
    let (mut sets, mut unsets) = (0, 0);
    for f in found.iter() {
        let ((_, after), reg) = (owned.named(f.named), &entries[f.at].1);
        let before = reg.value.as_ref().filter(|_| live(&reg.stamp));
        let shown = match (before, after) {
            (Some(b), Some(a)) if same_value(b, a) => Shows::Kept(reg.changed_version),
            (_, Some(_)) => Shows::Set,
            (Some(_), None) => Shows::Unset,
            (None, None) => Shows::Hidden,
        };
        sets += usize::from(matches!(shown, Shows::Set));
        unsets += usize::from(matches!(shown, Shows::Unset));
        shows.push(shown);
    }

    // Nothing below can fail: the state changes.
    if !owned.set.is_empty() {
        keep_max(&mut doc.upserted_at, &change.stamp);
    }
    let changed = sets + unsets > 0;
    let version = doc.version + u64::from(changed);
    // The visible change, in path order, by the write's own paths (in the caches, unlike the
    // registers'; moved: a top-level field's name is its dotted path) and copies of its values
    // (which move into the registers).
    let mut set_out: Vec<(String, Value)> = Vec::with_capacity(sets);
    let mut unset_out: Vec<String> = Vec::with_capacity(unsets);
    let entries = doc.registers.as_mut_slice();
    for (f, shows) in found.iter().zip(shows) {
        let reg = &mut entries[f.at].1;
        let (path, value) = owned.take(f.named);
        match (shows, &value) {
            (Shows::Set, Some(v)) => set_out.push((into_dotted(path), v.clone())),
            (Shows::Unset, _) => unset_out.push(into_dotted(path)),
            _ => {}
        }
        reg.value = value;
        reg.stamp = Arc::clone(&change.stamp);
        // A value rewritten as it was keeps the version it dates from.
        reg.changed_version = match shows {
            Shows::Kept(since) => since,
            _ => version,
        };
    }
    if !changed {
        return Ok(Applied::default());
    }
    doc.version = version;
    doc.hlc = Some(stamp.hlc);
    Ok(Applied {
        change: Some(change_event(change, version, set_out, unset_out)),
        ..Applied::default()
    })
}

/// The register of every path `owned` names, in path order, when each has one that is older
/// than `stamp` and alone on its chain, and no path is named twice; else `None`.
fn find_named(
    doc: &DocState,
    stamp: &Stamp,
    owned: &Owned,
) -> Option<SmallVec<[Found; MOST_NAMED]>> {
    let registers = &doc.registers;
    // A register at the root path would be every field's ancestor.
    if registers
        .first_key_value()
        .is_some_and(|(p, _)| p.is_empty())
    {
        return None;
    }
    let entries = registers.as_slice();
    let paths = owned
        .set
        .iter()
        .map(|(p, _)| p)
        .chain(owned.unset.iter())
        .enumerate();
    let mut found: SmallVec<[Found; MOST_NAMED]> = SmallVec::new();
    for (named, path) in paths {
        if path.is_empty() {
            return None;
        }
        let key = PathKey::of(path);
        let at = registers.find(key, path)?;
        // Alone on its chain: nothing above it, nothing under it but itself.
        if registers.on_chain(at, key, path) {
            return None;
        }
        // Asked for now, the registers' stamps and values arrive together, not one by one.
        prefetch::register(&entries[at].1);
        found.push(Found { at, named });
    }
    if found.iter().any(|f| *entries[f.at].1.stamp >= *stamp) {
        return None;
    }
    // The stamps are in now: ask for their strings, which the last register to let go of a
    // stamp frees (a free writes to the block), so those writes do not wait for memory.
    for f in &found {
        prefetch::stamp_strings(&entries[f.at].1.stamp);
    }
    // Registers are in path order, so their places order the paths; a place found twice is a
    // path named twice.
    found.sort_unstable_by_key(|f| f.at);
    if found.windows(2).any(|w| w[0].at == w[1].at) {
        return None;
    }
    Some(found)
}

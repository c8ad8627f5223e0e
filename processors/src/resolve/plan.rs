//! What one write does to a document's registers, worked out before anything changes.
//!
//! [`plan_patch`] and [`plan_rebuild`] list the [`Edit`]s; [`before_entries`] and
//! [`after_entries`] are the registers of the region that can change visibility, as they are and
//! as they will be; [`commit`] applies the edits once the write's outputs are known, moving the
//! write's paths and values into its registers. Until then the write's new registers exist only
//! as entries borrowing them.

use std::ops::Range;
use std::sync::Arc;

use serde_json::Value;
use smallvec::SmallVec;

use crate::diff::Stamp;
use crate::path::FieldPath;

use super::path_key::PathKey;
use super::prefetch;
use super::registers::{Register, Registers};
use super::sweep::{Entries, Entry};

/// A path the write names, with the value it gives it (`None`: removes it).
pub(super) type Named<'c> = (&'c FieldPath, Option<&'c Value>);

/// A [`Named`] path with its place among the paths the change set names (its sets, then its
/// unsets: what an [`Edit`] refers to, and where [`commit`] takes the path and value from) and
/// its key.
pub(super) type Indexed<'c> = (&'c FieldPath, Option<&'c Value>, usize, PathKey);

/// The edits of one write, in path order.
pub(super) type Edits = SmallVec<[Edit; 8]>;

/// Index ranges of the registers, in order.
pub(super) type Region = SmallVec<[Range<usize>; 4]>;

/// One change to the registers. `at` is a position in the registers before the write; `named`
/// the place of the write's path among those it names (see [`Indexed`]).
#[derive(Debug, Clone, Copy)]
pub(super) enum Edit {
    /// The write's register for its `named` path replaces the one at `at`.
    Replace { at: usize, named: usize },
    /// The write's register for its `named` path, new, goes in before the one at `at`.
    Insert { at: usize, named: usize },
    /// The register at `at` goes: it can never be visible again.
    Remove { at: usize },
}

impl Edit {
    fn at(&self) -> usize {
        match self {
            Edit::Replace { at, .. } | Edit::Insert { at, .. } | Edit::Remove { at } => *at,
        }
    }

    /// Whether the edit stores one of the write's registers.
    pub fn stores(&self) -> bool {
        !matches!(self, Edit::Remove { .. })
    }
}

/// The edits of a merge patch to an existing document (no delete or replace): only the named
/// paths change. `sorted` is in path order with distinct, non-empty paths. Adds the edits and
/// the region: index ranges, in order, holding every chain through a named path.
///
/// A named path with no register on any of its ancestors needs only its own subtree (itself and
/// its descendants); otherwise its whole top-level subtree is taken, as an ancestor's visibility
/// depends on all of its descendants.
pub(super) fn plan_patch(
    registers: &Registers,
    sorted: &[Indexed<'_>],
    stamp: &Stamp,
    too_old: bool,
    edits: &mut Edits,
    region: &mut Region,
) {
    let entries = registers.as_slice();
    // Every named register first, each hinted into the caches as it is found: the stamps and
    // values compared below then arrive together instead of one after another.
    let searched: SmallVec<[(PathKey, Result<usize, usize>); 8]> = sorted
        .iter()
        .map(|&(path, _, _, key)| {
            let found = registers.search(key, path);
            if let Ok(at) = found {
                prefetch::register(&entries[at].1);
            }
            (key, found)
        })
        .collect();
    let mut searched = searched.iter().copied();
    let mut rest = sorted;
    while let Some(((first, ..), _)) = rest.split_first() {
        let top = &first[..1];
        let group = rest.iter().take_while(|(p, ..)| p[0] == top[0]).count();
        let (group_start, mut whole) = (region.len(), false);
        for &(path, _, named, _) in &rest[..group] {
            let (key, found) = searched.next().expect("one search per named path");
            match found {
                Ok(at) if *entries[at].1.stamp >= *stamp => {}
                // Older than the newest delete/replace: it can never be visible, and neither can
                // an older register at its path.
                Ok(at) if too_old => edits.push(Edit::Remove { at }),
                Ok(at) => edits.push(Edit::Replace { at, named }),
                Err(_) if too_old => {}
                Err(at) => edits.push(Edit::Insert { at, named }),
            }
            whole = whole || registers.has_ancestor(path);
            if !whole {
                // Subtrees of paths in order are nested or disjoint, and in order.
                let start = found.unwrap_or_else(|at| at);
                let range = start..start + registers.count_under(start, key, path);
                let in_group = region.len() > group_start;
                match region.last_mut() {
                    Some(last) if in_group && range.start < last.end => {
                        last.end = last.end.max(range.end);
                    }
                    _ => region.push(range),
                }
            }
        }
        if whole {
            region.truncate(group_start);
            region.push(registers.subtree(top));
        }
        rest = &rest[group..];
    }
}

/// The edits of any other write, over all registers: the named paths (in path order, distinct;
/// empty when the write is itself cleared) take the write's registers where they are newer, and
/// registers that are no longer `live` (older than the newest delete or replace) go.
pub(super) fn plan_rebuild(
    registers: &Registers,
    named: &[Indexed<'_>],
    stamp: &Stamp,
    live: impl Fn(&Stamp) -> bool,
    edits: &mut Edits,
) {
    let entries = registers.as_slice();
    let mut named = named.iter().peekable();
    for (at, (path, reg)) in entries.iter().enumerate() {
        while let Some(&(_, _, n, _)) = named.next_if(|(p, ..)| *p < path) {
            edits.push(Edit::Insert { at, named: n });
        }
        match named.next_if(|(p, ..)| *p == path) {
            Some(&(_, _, n, _)) if *reg.stamp < *stamp => {
                edits.push(Edit::Replace { at, named: n })
            }
            _ if live(&reg.stamp) => {}
            _ => edits.push(Edit::Remove { at }),
        }
    }
    for &(_, _, n, _) in named {
        edits.push(Edit::Insert {
            at: entries.len(),
            named: n,
        });
    }
}

/// The registers of `region`, as they are.
pub(super) fn before_entries<'a>(
    registers: &'a Registers,
    region: &[Range<usize>],
    out: &mut Entries<'a>,
) {
    let (keys, entries) = (registers.keys_slice(), registers.as_slice());
    for range in region {
        let pairs = keys[range.clone()].iter().zip(&entries[range.clone()]);
        out.extend(pairs.map(|(k, (p, r))| Entry::new(*k, p, r)));
    }
}

/// The registers of `region` as they will be after `edits` by the write with `stamp` on a
/// document at `version`, whose named paths are `named` (in the change set's order) with keys
/// `named_keys`; each of the write's registers carries the index of its edit.
pub(super) fn after_entries<'a>(
    registers: &'a Registers,
    region: &[Range<usize>],
    edits: &[Edit],
    (named, named_keys): (&[Named<'a>], &[PathKey]),
    (stamp, version): (&'a Stamp, u64),
    out: &mut Entries<'a>,
) {
    let written = |index: usize, key: PathKey, path: &'a FieldPath, value| Entry {
        key,
        path,
        value,
        stamp,
        changed_version: version,
        fresh: Some(index),
        hidden: false,
        visible: false,
    };
    let (keys, entries) = (registers.keys_slice(), registers.as_slice());
    let mut edits = edits.iter().copied().enumerate().peekable();
    for range in region {
        for at in range.start..=range.end {
            // The write's new paths that go in before index `at`.
            while let Some((k, Edit::Insert { named: n, .. })) =
                edits.next_if(|(_, e)| e.at() == at && matches!(e, Edit::Insert { .. }))
            {
                let (path, value) = named[n];
                out.push(written(k, named_keys[n], path, value));
            }
            if at == range.end {
                break;
            }
            let key = keys[at];
            match edits.next_if(|(_, e)| e.at() == at) {
                Some((k, Edit::Replace { named: n, .. })) => {
                    let (path, value) = named[n];
                    out.push(written(k, key, path, value));
                }
                Some((_, Edit::Remove { .. })) => {}
                _ => out.push(Entry::new(key, &entries[at].0, &entries[at].1)),
            }
        }
    }
    debug_assert!(edits.next().is_none(), "edits lie inside the region");
}

/// The paths a write names and their values, owned: [`commit`] moves them into the registers.
pub(super) struct Owned {
    /// The leaves it sets.
    pub set: Vec<(FieldPath, Value)>,
    /// The fields it removes.
    pub unset: Vec<FieldPath>,
}

impl Owned {
    /// The `named`th path and its value (see [`Indexed`]).
    pub fn named(&self, named: usize) -> Named<'_> {
        match named.checked_sub(self.set.len()) {
            None => {
                let (path, value) = &self.set[named];
                (path, Some(value))
            }
            Some(i) => (&self.unset[i], None),
        }
    }

    /// Takes out the path and value of the `named`th path (see [`Indexed`]), leaving empty ones.
    pub fn take(&mut self, named: usize) -> (FieldPath, Option<Value>) {
        match named.checked_sub(self.set.len()) {
            None => {
                let (path, value) = std::mem::take(&mut self.set[named]);
                (path, Some(value))
            }
            Some(i) => (std::mem::take(&mut self.unset[i]), None),
        }
    }
}

/// Applies `edits` (in path order) to the registers, moving the write's paths and values out of
/// `owned` into them (`keys` are the keys of its named paths): the write's registers share
/// `stamp` (the change set's own copy) and date from `since`, or from the version given in
/// `unchanged` (by edit index, in order) when the write rewrote the value a field already had.
pub(super) fn commit(
    registers: &mut Registers,
    edits: &[Edit],
    (mut owned, keys): (Owned, &[PathKey]),
    stamp: &Arc<Stamp>,
    since: u64,
    unchanged: &[(usize, u64)],
) {
    if !edits.iter().any(Edit::stores) {
        if !edits.is_empty() {
            rebuild(registers, edits, keys, |_, _| {
                unreachable!("no register is stored")
            });
        }
        return;
    }
    let mut unchanged = unchanged.iter().peekable();
    let mut version_of = |k: usize| {
        unchanged
            .next_if(|(i, _)| *i == k)
            .map_or(since, |(_, v)| *v)
    };
    if edits.iter().all(|e| matches!(e, Edit::Replace { .. })) {
        // The common case: no register comes or goes, so they change where they are.
        let entries = registers.as_mut_slice();
        for (k, edit) in edits.iter().enumerate() {
            if let Edit::Replace { at, named } = *edit {
                let reg = &mut entries[at].1;
                reg.value = owned.take(named).1;
                reg.stamp = Arc::clone(stamp);
                reg.changed_version = version_of(k);
            }
        }
        return;
    }
    rebuild(registers, edits, keys, |k, named| {
        let (path, value) = owned.take(named);
        let register = Register {
            value,
            stamp: Arc::clone(stamp),
            changed_version: version_of(k),
        };
        (path, register)
    });
}

/// Applies edits that insert or remove registers, in one pass; `make(k, named)` makes the path
/// and register of edit `k`, which stores the write's `named`th path (with key `keys[named]`).
fn rebuild(
    registers: &mut Registers,
    edits: &[Edit],
    keys: &[PathKey],
    mut make: impl FnMut(usize, usize) -> (FieldPath, Register),
) {
    let (old_keys, old) = registers.take_parts();
    let inserts = edits
        .iter()
        .filter(|e| matches!(e, Edit::Insert { .. }))
        .count();
    let mut new_keys = Vec::with_capacity(old.len() + inserts);
    let mut out = Vec::with_capacity(old.len() + inserts);
    let mut edits = edits.iter().copied().enumerate().peekable();
    let len = old.len();
    let mut old = old_keys.into_iter().zip(old);
    for at in 0..=len {
        while let Some((k, Edit::Insert { named, .. })) =
            edits.next_if(|(_, e)| e.at() == at && matches!(e, Edit::Insert { .. }))
        {
            let (path, register) = make(k, named);
            new_keys.push(keys[named]);
            out.push((path, register));
        }
        let Some((key, (path, reg))) = old.next() else {
            break;
        };
        match edits.next_if(|(_, e)| e.at() == at) {
            Some((k, Edit::Replace { named, .. })) => {
                new_keys.push(key);
                out.push((path, make(k, named).1));
            }
            Some((_, Edit::Remove { .. })) => {}
            _ => {
                new_keys.push(key);
                out.push((path, reg));
            }
        }
    }
    *registers = Registers::from_parts(new_keys, out);
}

//! Which registers are visible: one pass over registers in path order.

use std::cmp::{max, Ordering};

use serde_json::Value;
use smallvec::SmallVec;

use crate::diff::Stamp;
use crate::path::FieldPath;

use super::path_key::{cmp_paths, is_prefix_keyed, PathKey};
use super::registers::Register;

/// Entries of one write's region; most writes fit without a heap allocation.
pub(super) type Entries<'a> = SmallVec<[Entry<'a>; 16]>;

/// A register as the resolver sees it while applying a write: one that exists, or one the write
/// is adding (which borrows the write's value and stamp until it is stored).
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry<'a> {
    /// The key of its path.
    pub key: PathKey,
    /// Its path.
    pub path: &'a FieldPath,
    /// Its value (`None`: the field was removed).
    pub value: Option<&'a Value>,
    /// The write that set it.
    pub stamp: &'a Stamp,
    /// See [`Register::changed_version`].
    pub changed_version: u64,
    /// For a register the write is adding, the index of its edit (see `super::plan`).
    pub fresh: Option<usize>,
    /// Set by [`mark_visible`]: a newer register sits on its root-to-leaf chain.
    pub hidden: bool,
    /// Set by [`mark_visible`]: it has a value, is not older than the newest delete or replace,
    /// and is not hidden.
    pub visible: bool,
}

impl<'a> Entry<'a> {
    /// An existing register, not yet swept; `key` is the key of `path`.
    pub fn new(key: PathKey, path: &'a FieldPath, reg: &'a Register) -> Self {
        debug_assert_eq!(key, PathKey::of(path));
        Self {
            key,
            path,
            value: reg.value.as_ref(),
            stamp: &reg.stamp,
            changed_version: reg.changed_version,
            fresh: None,
            hidden: false,
            visible: false,
        }
    }

    /// Whether this entry's path is `other`'s or one of its ancestors.
    pub fn is_prefix_of(&self, other: &Entry<'_>) -> bool {
        is_prefix_keyed(self.key, self.path, other.key, other.path)
    }
}

/// Where `path` (with key `key`) is in `entries` (in path order), or where it would go.
pub(super) fn search(entries: &[Entry<'_>], key: PathKey, path: &[String]) -> Result<usize, usize> {
    entries.binary_search_by(|e| cmp_paths(e.key, e.path, key, path))
}

/// The entry at `path` in `entries` (in path order).
pub(super) fn find<'e, 'a>(entries: &'e [Entry<'a>], path: &[String]) -> Option<&'e Entry<'a>> {
    let i = search(entries, PathKey::of(path), path).ok()?;
    Some(&entries[i])
}

/// Finds entries for paths asked in path order, in one pass over the entries.
pub(super) struct Cursor<'e, 'a> {
    entries: &'e [Entry<'a>],
    next: usize,
}

impl<'e, 'a> Cursor<'e, 'a> {
    /// A cursor at the start of `entries` (in path order).
    pub fn new(entries: &'e [Entry<'a>]) -> Self {
        Self { entries, next: 0 }
    }

    /// The entry at `path` (with key `key`); paths must be asked in order.
    pub fn find(&mut self, key: PathKey, path: &[String]) -> Option<&'e Entry<'a>> {
        let order = |e: &Entry<'_>| cmp_paths(e.key, e.path, key, path);
        while self
            .entries
            .get(self.next)
            .is_some_and(|e| order(e) == Ordering::Less)
        {
            self.next += 1;
        }
        let entries = self.entries;
        entries
            .get(self.next)
            .filter(|e| order(e) == Ordering::Equal)
    }
}

/// Sets `hidden` and `visible` on every entry. `entries` must be in path order and contain, with
/// each register, every register on its chain (all registers, or whole top-level subtrees).
///
/// Descendants sort right after their ancestor, so the open ancestors of the current entry form
/// a stack; an entry's descendants are all seen by the time it is closed. Only entries with
/// descendants are pushed, so a document without nested registers needs no stack at all.
pub(super) fn mark_visible(entries: &mut [Entry<'_>], cleared: Option<&Stamp>) {
    struct Open<'a> {
        index: usize,
        stamp: &'a Stamp,
        /// Newest stamp among this entry and its ancestors.
        chain_max: &'a Stamp,
        /// Newest stamp among its descendants seen so far.
        below_max: Option<&'a Stamp>,
    }
    fn close(entries: &mut [Entry<'_>], stack: &mut SmallVec<[Open<'_>; 4]>) {
        let Some(open) = stack.pop() else { return };
        if open.below_max.is_some_and(|b| b > open.stamp) {
            entries[open.index].hidden = true;
        }
        let subtree_max = max(open.below_max, Some(open.stamp));
        if let Some(parent) = stack.last_mut() {
            parent.below_max = max(parent.below_max, subtree_max);
        }
    }

    let mut stack: SmallVec<[Open<'_>; 4]> = SmallVec::new();
    for i in 0..entries.len() {
        let entry = entries[i];
        while stack
            .last()
            .is_some_and(|top| !entries[top.index].is_prefix_of(&entry))
        {
            close(entries, &mut stack);
        }
        let stamp = entry.stamp;
        let above = stack.last().map(|top| top.chain_max);
        entries[i].hidden = above.is_some_and(|a| a > stamp);
        let has_descendants = entries
            .get(i + 1)
            .is_some_and(|next| entry.is_prefix_of(next));
        if has_descendants {
            stack.push(Open {
                index: i,
                stamp,
                chain_max: above.map_or(stamp, |a| max(a, stamp)),
                below_max: None,
            });
        } else if let Some(parent) = stack.last_mut() {
            parent.below_max = max(parent.below_max, Some(stamp));
        }
    }
    while !stack.is_empty() {
        close(entries, &mut stack);
    }
    // Registers of one write share a stamp and usually sit together: compare each stamp once.
    let mut last: Option<(&Stamp, bool)> = None;
    for e in entries {
        let live = match (cleared, last) {
            (None, _) => true,
            (Some(_), Some((s, live))) if std::ptr::eq(s, e.stamp) => live,
            (Some(c), _) => {
                let live = std::ptr::eq(e.stamp, c) || *e.stamp >= *c;
                last = Some((e.stamp, live));
                live
            }
        };
        e.visible = e.value.is_some() && !e.hidden && live;
    }
}

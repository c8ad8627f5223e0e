//! [`Registers`]: a document's registers, one per field path, kept in path order.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::ops::{Bound, Range, RangeBounds};
use std::sync::Arc;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::diff::Stamp;
use crate::path::FieldPath;

use super::path_key::{cmp_paths, is_prefix_keyed, PathKey};

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

/// Serde for an `Option<Arc<Stamp>>`, exactly as for an `Option<Stamp>`.
pub(crate) mod shared_stamp_opt {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::diff::Stamp;

    pub fn serialize<S: Serializer>(stamp: &Option<Arc<Stamp>>, s: S) -> Result<S::Ok, S::Error> {
        stamp.as_deref().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<Stamp>>, D::Error> {
        Ok(Option::<Stamp>::deserialize(d)?.map(Arc::new))
    }
}

/// A document's registers by field path, in path order: a map kept as one sorted vector.
///
/// A document has tens of fields, not thousands. One contiguous block is cheaper to search,
/// iterate and copy than tree nodes, and a path's descendants are the entries right after it
/// (see [`crate::path::FieldPath`]), so a top-level field's subtree is one slice. Beside the
/// entries sits a dense array of 32-byte keys of their paths (`PathKey`): searches and chain
/// tests read that array, and look at the path strings themselves (each behind two pointers)
/// only for paths too long for their keys to decide. The methods mirror `BTreeMap`'s where they
/// overlap; unlike `BTreeMap::range`, [`Registers::range`] never panics (an empty or inverted
/// range yields nothing).
///
/// Most documents have no register on another's ancestor path (no chain: every register is a
/// leaf, as after a full set). A flag says when that is known, so [`Registers::on_chain`]
/// answers without a search.
///
/// A patch looks its registers up by exact path, and a binary search reads several of the
/// keys' cache lines for each: [`Registers::index_paths`] builds a small hash index of the
/// keys (two bytes a slot), so [`Registers::find`] reads an index line and the one key.
#[derive(Clone, Default)]
pub struct Registers {
    /// `keys[i]` is the key of `entries[i]`'s path.
    keys: Vec<PathKey>,
    /// Sorted by path, paths distinct.
    entries: Vec<(FieldPath, Register)>,
    /// False only when no register's path is a proper prefix of another's. Exact when the
    /// registers are built whole; an insert that makes a chain sets it, a removal leaves it.
    chained: bool,
    /// Empty, or every entry's position plus one by its key's hash: open addressing with
    /// linear probing, a power of two of slots, at most half full, 0 for a free slot. Emptied by
    /// any change that adds, removes or moves an entry; built by [`Registers::index_paths`].
    slots: Vec<u16>,
}

/// Equal registers are equal whatever their flag (a hint about them, not part of them).
impl PartialEq for Registers {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl Registers {
    /// No registers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of registers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there is no register.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Where `path` is (`Ok`), or where it would go (`Err`).
    pub(crate) fn position(&self, path: &[String]) -> Result<usize, usize> {
        self.search(PathKey::of(path), path)
    }

    /// [`Registers::position`] of `path`, whose key is `key`.
    pub(crate) fn search(&self, key: PathKey, path: &[String]) -> Result<usize, usize> {
        let (mut lo, mut hi) = (0, self.keys.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match cmp_paths(self.keys[mid], &self.entries[mid].0, key, path) {
                Ordering::Less => lo = mid + 1,
                Ordering::Greater => hi = mid,
                Ordering::Equal => return Ok(mid),
            }
        }
        Err(lo)
    }

    /// Where `path`, whose key is `key`, is: as [`Registers::position`]'s `Ok`, through the
    /// index when it is built ([`Registers::index_paths`]), else by a search.
    pub(crate) fn find(&self, key: PathKey, path: &[String]) -> Option<usize> {
        if self.slots.is_empty() {
            return self.search(key, path).ok();
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            let at = usize::from(self.slots[i]).checked_sub(1)?;
            if self.keys[at] == key && (key.is_exact() || self.entries[at].0 == path) {
                return Some(at);
            }
            i = (i + 1) & mask;
        }
    }

    /// The slot where probing for `key` starts (the index is built).
    fn home(&self, key: PathKey) -> usize {
        let bits = self.slots.len().trailing_zeros();
        (key.hash() >> (64 - bits)) as usize
    }

    /// Builds the index [`Registers::find`] reads, unless it is built (or there are too many
    /// registers for its two-byte slots: then `find` searches).
    pub(crate) fn index_paths(&mut self) {
        let n = self.entries.len();
        if !self.slots.is_empty() || n == 0 || n >= usize::from(u16::MAX) {
            return;
        }
        let len = (2 * n).next_power_of_two().max(4);
        self.slots.resize(len, 0);
        let mask = len - 1;
        for at in 0..n {
            let mut i = self.home(self.keys[at]);
            while self.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            // `at < n < u16::MAX`.
            self.slots[i] = at as u16 + 1;
        }
    }

    /// The index's slots (empty when it is not built), for hints.
    pub(crate) fn slots_slice(&self) -> &[u16] {
        &self.slots
    }

    /// The register at `path`.
    pub fn get(&self, path: &[String]) -> Option<&Register> {
        self.get_key_value(path).map(|(_, r)| r)
    }

    /// The stored path and register at `path`.
    pub fn get_key_value(&self, path: &[String]) -> Option<(&FieldPath, &Register)> {
        let i = self.position(path).ok()?;
        let (p, r) = &self.entries[i];
        Some((p, r))
    }

    /// The register at `path`, to change.
    pub fn get_mut(&mut self, path: &[String]) -> Option<&mut Register> {
        let i = self.position(path).ok()?;
        Some(&mut self.entries[i].1)
    }

    /// True when there is a register at `path`.
    pub fn contains_key(&self, path: &[String]) -> bool {
        self.position(path).is_ok()
    }

    /// Sets the register at `path`, returning the one it replaces.
    pub fn insert(&mut self, path: FieldPath, register: Register) -> Option<Register> {
        match self.position(&path) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, register)),
            Err(i) => {
                self.slots.clear();
                self.keys.insert(i, PathKey::of(&path));
                self.entries.insert(i, (path, register));
                // A chain through the new path shows next to it: its descendants come right
                // after it, and a register on one of its ancestors is the one before it, unless
                // a descendant of that ancestor is in between (then there already is a chain).
                self.chained = self.chained || (i > 0 && self.linked(i - 1)) || self.linked(i);
                None
            }
        }
    }

    /// Removes the register at `path`.
    pub fn remove(&mut self, path: &[String]) -> Option<Register> {
        let i = self.position(path).ok()?;
        self.slots.clear();
        self.keys.remove(i);
        Some(self.entries.remove(i).1)
    }

    /// Keeps only the registers for which `keep` returns true.
    pub fn retain(&mut self, mut keep: impl FnMut(&FieldPath, &mut Register) -> bool) {
        self.slots.clear();
        let kept: Vec<bool> = self.entries.iter_mut().map(|(p, r)| keep(p, r)).collect();
        let mut flags = kept.iter().copied();
        self.keys.retain(|_| flags.next().unwrap_or(false));
        let mut flags = kept.iter().copied();
        self.entries.retain(|_| flags.next().unwrap_or(false));
    }

    /// The first register in path order.
    pub fn first_key_value(&self) -> Option<(&FieldPath, &Register)> {
        self.entries.first().map(|(p, r)| (p, r))
    }

    /// Every register, in path order.
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.entries.iter())
    }

    /// Every path, in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &FieldPath> + ExactSizeIterator {
        self.entries.iter().map(|(p, _)| p)
    }

    /// Every register, in path order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &Register> + ExactSizeIterator {
        self.entries.iter().map(|(_, r)| r)
    }

    /// Every register, in path order, to change.
    pub fn values_mut(
        &mut self,
    ) -> impl DoubleEndedIterator<Item = &mut Register> + ExactSizeIterator {
        self.entries.iter_mut().map(|(_, r)| r)
    }

    /// The registers whose paths lie in `range`, in path order.
    pub fn range<T, R>(&self, range: R) -> Iter<'_>
    where
        T: Ord + ?Sized,
        FieldPath: Borrow<T>,
        R: RangeBounds<T>,
    {
        let index = |bound: Bound<&T>, past_equal: bool| match bound {
            Bound::Unbounded if past_equal => self.entries.len(),
            Bound::Unbounded => 0,
            Bound::Included(b) => self
                .entries
                .partition_point(|(p, _)| p.borrow() < b || (past_equal && p.borrow() == b)),
            Bound::Excluded(b) => self
                .entries
                .partition_point(|(p, _)| p.borrow() < b || (!past_equal && p.borrow() == b)),
        };
        let start = index(range.start_bound(), false);
        let end = index(range.end_bound(), true).max(start);
        Iter(self.entries[start..end].iter())
    }

    /// The entries, in path order.
    pub(crate) fn as_slice(&self) -> &[(FieldPath, Register)] {
        &self.entries
    }

    /// The keys of the entries' paths, in path order.
    pub(crate) fn keys_slice(&self) -> &[PathKey] {
        &self.keys
    }

    /// The entries, in path order, to change registers in place (not paths).
    pub(crate) fn as_mut_slice(&mut self) -> &mut [(FieldPath, Register)] {
        &mut self.entries
    }

    /// The index range of the registers under the top-level field `top` (a one-segment path):
    /// `top` itself and its descendants.
    pub(crate) fn subtree(&self, top: &[String]) -> Range<usize> {
        debug_assert_eq!(top.len(), 1);
        let key = PathKey::of(top);
        let start = self.search(key, top).unwrap_or_else(|i| i);
        start..start + self.count_under(start, key, top)
    }

    /// Whether a register sits on a descendant of `path`, whose key is `key` and whose
    /// register is at `at` (descendants sort right after their ancestor).
    pub(crate) fn has_descendant(&self, at: usize, key: PathKey, path: &[String]) -> bool {
        self.keys
            .get(at + 1)
            .is_some_and(|k| is_prefix_keyed(key, path, *k, &self.entries[at + 1].0))
    }

    /// Whether a register sits on one of `path`'s proper ancestors (the root path aside).
    pub(crate) fn has_ancestor(&self, path: &[String]) -> bool {
        (1..path.len()).any(|i| self.position(&path[..i]).is_ok())
    }

    /// Whether the register at `at`, of `path` with key `key`, is on a chain: a register sits
    /// on one of its proper ancestors (the root path aside) or on a descendant. Without a chain
    /// in the document, no search.
    pub(crate) fn on_chain(&self, at: usize, key: PathKey, path: &[String]) -> bool {
        self.chained && (self.has_ancestor(path) || self.has_descendant(at, key, path))
    }

    /// Whether the path of the register at `a` is a prefix of the next one's.
    fn linked(&self, a: usize) -> bool {
        self.has_descendant(a, self.keys[a], &self.entries[a].0)
    }

    /// These registers with their flag set exactly: whether some register's path is a proper
    /// prefix of another's (reading each pair of neighbours: descendants come right after).
    fn with_chains_found(mut self) -> Self {
        self.chained = (0..self.entries.len()).any(|a| self.linked(a));
        self
    }

    /// How many registers from index `start` on are `path` (with key `key`) or its descendants.
    pub(crate) fn count_under(&self, start: usize, key: PathKey, path: &[String]) -> usize {
        let keys = self.keys.get(start..).unwrap_or_default();
        // The register at `start` is usually `path` itself (its key equal and exact).
        let skip = usize::from(keys.first() == Some(&key) && key.is_exact());
        skip + keys[skip..]
            .iter()
            .zip(&self.entries[start + skip..])
            .take_while(|(k, (p, _))| is_prefix_keyed(key, path, **k, p))
            .count()
    }

    /// Takes every entry out, with its key, leaving none.
    pub(crate) fn take_parts(&mut self) -> (Vec<PathKey>, Vec<(FieldPath, Register)>) {
        self.chained = false;
        self.slots.clear();
        (
            std::mem::take(&mut self.keys),
            std::mem::take(&mut self.entries),
        )
    }

    /// Registers from entries already in path order with distinct paths, with their keys.
    pub(crate) fn from_parts(keys: Vec<PathKey>, entries: Vec<(FieldPath, Register)>) -> Self {
        debug_assert!(entries.windows(2).all(|w| w[0].0 < w[1].0));
        debug_assert!(keys
            .iter()
            .zip(&entries)
            .all(|(k, (p, _))| *k == PathKey::of(p)));
        Self {
            keys,
            entries,
            chained: false,
            slots: Vec::new(),
        }
        .with_chains_found()
    }
}

/// An iterator over [`Registers`] in path order.
#[derive(Clone, Debug)]
pub struct Iter<'a>(std::slice::Iter<'a, (FieldPath, Register)>);

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a FieldPath, &'a Register);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(p, r)| (p, r))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|(p, r)| (p, r))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a Registers {
    type Item = (&'a FieldPath, &'a Register);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl IntoIterator for Registers {
    type Item = (FieldPath, Register);
    type IntoIter = std::vec::IntoIter<(FieldPath, Register)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

/// Later entries win over earlier ones with the same path, as for `BTreeMap`.
impl FromIterator<(FieldPath, Register)> for Registers {
    fn from_iter<I: IntoIterator<Item = (FieldPath, Register)>>(iter: I) -> Self {
        let mut entries: Vec<(FieldPath, Register)> = iter.into_iter().collect();
        if !entries.windows(2).all(|w| w[0].0 < w[1].0) {
            // Stable: equal paths keep their order, so the last one is the later entry.
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut deduped: Vec<(FieldPath, Register)> = Vec::with_capacity(entries.len());
            for entry in entries {
                match deduped.last_mut() {
                    Some(last) if last.0 == entry.0 => *last = entry,
                    _ => deduped.push(entry),
                }
            }
            entries = deduped;
        }
        let keys = entries.iter().map(|(p, _)| PathKey::of(p)).collect();
        Self::from_parts(keys, entries)
    }
}

impl fmt::Debug for Registers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Serialises as a map from path to register, as a `BTreeMap` would.
impl Serialize for Registers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.entries.len()))?;
        for (p, r) in &self.entries {
            map.serialize_entry(p, r)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Registers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapVisitor;
        impl<'de> Visitor<'de> for MapVisitor {
            type Value = Registers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from field path to register")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Registers, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
                while let Some(entry) = map.next_entry::<FieldPath, Register>()? {
                    entries.push(entry);
                }
                Ok(entries.into_iter().collect())
            }
        }
        d.deserialize_map(MapVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use std::collections::BTreeMap;

    fn path(dotted: &str) -> FieldPath {
        dotted.split('.').map(str::to_owned).collect()
    }

    fn reg(n: u64) -> Register {
        Register {
            value: Some(Value::from(n)),
            stamp: Arc::new(Stamp {
                hlc: Hlc::new(n, 0),
                device_id: "d".into(),
                event_id: format!("e{n}"),
            }),
            changed_version: n,
        }
    }

    /// Paths that make chains with each other, and the root path.
    fn chain_paths() -> Vec<FieldPath> {
        let mut paths: Vec<FieldPath> = ["a", "a.b", "a.b.c", "a.c", "b", "b.a", "ab", "a.b.d"]
            .into_iter()
            .map(path)
            .collect();
        paths.push(Vec::new());
        paths
    }

    proptest::proptest! {
        /// `on_chain` answers as a plain look at every register would, through inserts,
        /// removals and rebuilds: the flag that spares the search is never wrong.
        #[test]
        fn on_chain_matches_a_plain_look(
            ops in proptest::collection::vec((proptest::bool::ANY, 0..9usize), 0..24)
        ) {
            let paths = chain_paths();
            let mut flat = Registers::new();
            for (n, (insert, p)) in ops.into_iter().enumerate() {
                let p = paths[p].clone();
                if insert {
                    flat.insert(p, reg(n as u64));
                } else {
                    flat.remove(&p);
                }
                let rebuilt: Registers = flat.iter().map(|(p, r)| (p.clone(), r.clone())).collect();
                for r in [&flat, &rebuilt] {
                    for (at, q) in r.keys().enumerate() {
                        let plain = r.keys().any(|k| {
                            k != q && (k.starts_with(q) || (!k.is_empty() && q.starts_with(k)))
                        });
                        proptest::prop_assert_eq!(r.on_chain(at, PathKey::of(q), q), plain);
                    }
                }
            }
        }
    }

    proptest::proptest! {
        /// `find` finds what a search finds, through the index once it is built and by a
        /// search when it is not, whatever inserts, removals and rebuilds came before.
        #[test]
        fn find_matches_a_search(
            ops in proptest::collection::vec((0..3u8, 0..9usize), 0..32)
        ) {
            let paths = chain_paths();
            let mut flat = Registers::new();
            for (n, (op, p)) in ops.into_iter().enumerate() {
                let p = paths[p].clone();
                match op {
                    0 => drop(flat.insert(p, reg(n as u64))),
                    1 => drop(flat.remove(&p)),
                    _ => flat.index_paths(),
                }
                let mut rebuilt: Registers =
                    flat.iter().map(|(p, r)| (p.clone(), r.clone())).collect();
                rebuilt.index_paths();
                let long = path("a.very-long-field-name.that-goes-past.the-key");
                for r in [&flat, &rebuilt] {
                    for q in paths.iter().chain([&long]) {
                        let key = PathKey::of(q);
                        proptest::prop_assert_eq!(r.find(key, q), r.position(q).ok());
                    }
                }
            }
        }

        /// Paths longer than a key holds, sharing their first 31 bytes: the index tells them
        /// apart by the paths themselves.
        #[test]
        fn find_tells_long_paths_apart(tails in proptest::collection::vec(0..6u8, 1..12)) {
            let stem = "s".repeat(40);
            let mut flat = Registers::new();
            for (n, t) in tails.iter().enumerate() {
                flat.insert(vec![stem.clone(), format!("t{t}")], reg(n as u64));
            }
            flat.index_paths();
            for t in 0..7u8 {
                let q = vec![stem.clone(), format!("t{t}")];
                proptest::prop_assert_eq!(flat.find(PathKey::of(&q), &q), flat.position(&q).ok());
            }
        }
    }

    /// The same operations on `Registers` and on a `BTreeMap` give the same results.
    #[test]
    fn behaves_like_a_btree_map() {
        let paths = ["b", "a.x", "a", "c.d.e", "a.x.y", "a0", "c", "b", "a.x"];
        let (mut flat, mut tree) = (Registers::new(), BTreeMap::new());
        for (n, p) in paths.iter().enumerate() {
            assert_eq!(
                flat.insert(path(p), reg(n as u64)),
                tree.insert(path(p), reg(n as u64))
            );
        }
        let same = |flat: &Registers, tree: &BTreeMap<FieldPath, Register>| {
            assert!(flat.iter().eq(tree.iter()));
            assert_eq!(flat.len(), tree.len());
        };
        same(&flat, &tree);
        for p in ["a", "a.x", "zz", "a.x.y.z", "c.d"] {
            let p = path(p);
            assert_eq!(flat.get_key_value(&p), tree.get_key_value(&p));
            let from = (Bound::Excluded(&p), Bound::Unbounded);
            assert!(flat
                .range::<FieldPath, _>(from)
                .eq(tree.range::<FieldPath, _>(from)));
            let upto = (Bound::Unbounded, Bound::Included(&p));
            assert!(flat
                .range::<FieldPath, _>(upto)
                .eq(tree.range::<FieldPath, _>(upto)));
        }
        assert_eq!(flat.subtree(&path("a")), 0..3);
        assert_eq!(flat.subtree(&path("c")), 5..7);
        assert_eq!(flat.subtree(&path("x")), 7..7);
        assert_eq!(flat.remove(&path("a.x")), tree.remove(&path("a.x")));
        flat.retain(|p, _| p.len() < 3);
        tree.retain(|p, _| p.len() < 3);
        same(&flat, &tree);
        let rebuilt: Registers = tree.clone().into_iter().chain(tree.clone()).collect();
        same(&rebuilt, &tree);
        assert_eq!(format!("{rebuilt:?}"), format!("{tree:?}"));
    }
}

//! [`DocMap`]: the documents of a [`super::MemState`] by key, with an index small enough to stay
//! in the CPU caches.
//!
//! A hash map that keeps each key and state in its own slot spreads 10,000 documents over
//! megabytes, so finding one misses the caches before anything of the document is read. Here
//! the index is a table of 8-byte slots (a hash tag and a position), and the documents lie in
//! one dense vector. Finding a document reads one index line and then the document itself, and
//! each of the two can be hinted into the caches on its own ([`DocMap::hint_slot`],
//! [`DocMap::hint_entry`]), so a batch can fetch the next documents while it resolves this one.

use std::fmt;
use std::hash::BuildHasher;
use std::ops::Index;

use rustc_hash::FxBuildHasher;

use crate::write::DocKey;

use super::doc::DocState;
use super::prefetch;

/// Fewest index slots.
const MIN_SLOTS: usize = 8;

/// Spreads every bit of the key's hash into the top bits, which pick the slot and the tag.
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// Documents by key (unordered: sort the keys for a stable order), like a
/// `HashMap<DocKey, DocState>`.
///
/// Keys hash with FxHash, which is fast but not resistant to chosen keys. At most 2³¹
/// documents.
#[derive(Clone, Default)]
pub struct DocMap {
    /// Open addressing with linear probing, at most half full (none when there is no
    /// document). A slot is 0 when empty, or the top 32 bits of its key's hash (the tag) above
    /// the entry's position plus one. The top bits of the tag are the slot the key starts
    /// probing from, so the index grows and shrinks without hashing any key again.
    slots: Vec<u64>,
    /// The documents, in no particular order.
    entries: Vec<(DocKey, DocState)>,
}

/// A key's hash, as the index uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocHash(u64);

impl DocHash {
    /// The hash of `key`.
    pub fn of(key: &DocKey) -> Self {
        Self(FxBuildHasher.hash_one(key).wrapping_mul(MIX))
    }

    fn tag(self) -> u64 {
        self.0 >> 32
    }
}

impl DocMap {
    /// No documents.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of documents.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there is no document.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// The slot where probing for a key with tag `tag` starts.
    fn home(&self, tag: u64) -> usize {
        // The top bits of the tag: `slots.len()` is a power of two at most 2³².
        let bits = self.slots.len().trailing_zeros();
        (tag >> (32 - bits)) as usize & self.mask()
    }

    /// The slots from `key`'s home that may hold it, as (slot, entry position), up to the first
    /// empty slot.
    fn probe(&self, hash: DocHash) -> impl Iterator<Item = (usize, usize)> + '_ {
        let (tag, mask) = (hash.tag(), self.mask());
        let start = if self.slots.is_empty() {
            0
        } else {
            self.home(tag)
        };
        (0..self.slots.len())
            .map(move |i| (start + i) & mask)
            .map_while(move |at| {
                let slot = self.slots[at];
                (slot != 0).then_some((at, slot))
            })
            .filter(move |(_, slot)| slot >> 32 == tag)
            .map(|(at, slot)| (at, (slot as u32 - 1) as usize))
    }

    /// The slot and entry position of `key`.
    fn find(&self, key: &DocKey, hash: DocHash) -> Option<(usize, usize)> {
        self.probe(hash).find(|&(_, i)| self.entries[i].0 == *key)
    }

    /// The state of `key`.
    pub fn get(&self, key: &DocKey) -> Option<&DocState> {
        let (_, i) = self.find(key, DocHash::of(key))?;
        Some(&self.entries[i].1)
    }

    /// The state of `key`, to change.
    pub fn get_mut(&mut self, key: &DocKey) -> Option<&mut DocState> {
        let (_, i) = self.find(key, DocHash::of(key))?;
        Some(&mut self.entries[i].1)
    }

    /// True when `key` has a state.
    pub fn contains_key(&self, key: &DocKey) -> bool {
        self.get(key).is_some()
    }

    /// Stores `doc` as `key`'s state; returns the state it replaces.
    pub fn insert(&mut self, key: DocKey, doc: DocState) -> Option<DocState> {
        let hash = DocHash::of(&key);
        if let Some((_, i)) = self.find(&key, hash) {
            return Some(std::mem::replace(&mut self.entries[i].1, doc));
        }
        if (self.entries.len() + 1) * 2 > self.slots.len() {
            self.resize(
                ((self.entries.len() + 1) * 2)
                    .next_power_of_two()
                    .max(MIN_SLOTS),
            );
        }
        let position = self.entries.len();
        self.entries.push((key, doc));
        self.place(hash.tag(), position);
        None
    }

    /// Removes `key`'s state and returns it.
    pub fn remove(&mut self, key: &DocKey) -> Option<DocState> {
        let (at, i) = self.find(key, DocHash::of(key))?;
        self.unplace(at);
        let (_, doc) = self.entries.swap_remove(i);
        // The last entry moved into `i`: point its slot there.
        if i < self.entries.len() {
            let moved = self.entries.len();
            let hash = DocHash::of(&self.entries[i].0);
            let mask = self.mask();
            let mut at = self.home(hash.tag());
            while self.slots[at] != slot_of(hash.tag(), moved) {
                at = (at + 1) & mask;
            }
            self.slots[at] = slot_of(hash.tag(), i);
        }
        if self.entries.is_empty() {
            self.slots = Vec::new();
        }
        Some(doc)
    }

    /// Every key and state, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&DocKey, &DocState)> + '_ {
        self.entries.iter().map(|(k, d)| (k, d))
    }

    /// Every key, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &DocKey> + '_ {
        self.entries.iter().map(|(k, _)| k)
    }

    /// Every state, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &DocState> + '_ {
        self.entries.iter().map(|(_, d)| d)
    }

    /// Every state, to change, in no particular order.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut DocState> + '_ {
        self.entries.iter_mut().map(|(_, d)| d)
    }

    /// Hints the index line where a key with hash `hash` is looked up into the CPU caches.
    pub fn hint_slot(&self, hash: DocHash) {
        if !self.slots.is_empty() {
            prefetch::object(&self.slots[self.home(hash.tag())]);
        }
    }

    /// Hints the key and state of the first document whose tag is `hash`'s into the CPU caches
    /// (reads the index, which [`DocMap::hint_slot`] brought in).
    pub fn hint_entry(&self, hash: DocHash) {
        if let Some((_, i)) = self.probe(hash).next() {
            prefetch::object(&self.entries[i]);
        }
    }

    /// The key and state of the first document whose tag is `hash`'s: the document whose hash it
    /// is, if it has a state, unless two keys share a tag (about one in 2³² pairs). For hints,
    /// which need not be right, not for reading a document.
    pub fn by_hash(&self, hash: DocHash) -> Option<(&DocKey, &DocState)> {
        let (_, i) = self.probe(hash).next()?;
        let (k, d) = &self.entries[i];
        Some((k, d))
    }

    /// Rebuilds the index with `len` slots (a power of two).
    fn resize(&mut self, len: usize) {
        assert!(
            len.trailing_zeros() <= 32,
            "a DocMap holds at most 2^31 documents"
        );
        let old = std::mem::replace(&mut self.slots, vec![0; len]);
        for slot in old.into_iter().filter(|&s| s != 0) {
            self.put(slot);
        }
    }

    /// Puts entry `position` into the first free slot from its tag's home.
    fn place(&mut self, tag: u64, position: usize) {
        self.put(slot_of(tag, position));
    }

    fn put(&mut self, slot: u64) {
        let mask = self.mask();
        let mut at = self.home(slot >> 32);
        while self.slots[at] != 0 {
            at = (at + 1) & mask;
        }
        self.slots[at] = slot;
    }

    /// Empties slot `at`, moving back later slots of its run whose home allows it, so that every
    /// key stays reachable from its home without passing an empty slot.
    fn unplace(&mut self, mut at: usize) {
        let mask = self.mask();
        let mut next = (at + 1) & mask;
        while self.slots[next] != 0 {
            let home = self.home(self.slots[next] >> 32);
            // `next` may move to `at` when its home is not in the cyclic range (at, next].
            if (next.wrapping_sub(home) & mask) >= (next.wrapping_sub(at) & mask) {
                self.slots[at] = self.slots[next];
                at = next;
            }
            next = (next + 1) & mask;
        }
        self.slots[at] = 0;
    }
}

/// The slot for entry `position` of a key with tag `tag`.
fn slot_of(tag: u64, position: usize) -> u64 {
    (tag << 32) | (position as u64 + 1)
}

impl Index<&DocKey> for DocMap {
    type Output = DocState;

    /// The state of `key`; panics when it has none, like a `HashMap`.
    fn index(&self, key: &DocKey) -> &DocState {
        self.get(key).expect("no state for this document")
    }
}

/// Equal when both hold the same keys with equal states, in any order.
impl PartialEq for DocMap {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(k, d)| other.get(k) == Some(d))
    }
}

impl fmt::Debug for DocMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<(DocKey, DocState)> for DocMap {
    fn from_iter<I: IntoIterator<Item = (DocKey, DocState)>>(iter: I) -> Self {
        let mut map = Self::new();
        map.extend(iter);
        map
    }
}

impl Extend<(DocKey, DocState)> for DocMap {
    fn extend<I: IntoIterator<Item = (DocKey, DocState)>>(&mut self, iter: I) {
        for (k, d) in iter {
            self.insert(k, d);
        }
    }
}

impl<'a> IntoIterator for &'a DocMap {
    type Item = (&'a DocKey, &'a DocState);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (DocKey, DocState)>,
        fn(&'a (DocKey, DocState)) -> (&'a DocKey, &'a DocState),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, d)| (k, d))
    }
}

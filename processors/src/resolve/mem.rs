//! [`MemState`]: an in-memory [`ResolveState`].

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;

use rustc_hash::FxBuildHasher;

use crate::write::{BucketKey, DocKey};

use super::{DocState, Prefetch, ResolveState};
use crate::diff::ChangeSet;

/// An in-memory [`ResolveState`], for tests, benchmarks and tools.
///
/// Its maps hash with FxHash, which is fast but not resistant to chosen keys: do not serve
/// untrusted tenants from it.
#[derive(Debug, Clone, Default)]
pub struct MemState {
    /// Documents by key (unordered: sort the keys for a stable order).
    pub docs: HashMap<DocKey, DocState, FxBuildHasher>,
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
    /// Changes the document where it lies (one lookup, no copy).
    fn update_doc<R>(
        &mut self,
        key: &DocKey,
        f: impl FnOnce(&mut DocState) -> R,
    ) -> Result<R, Infallible> {
        if let Some(doc) = self.docs.get_mut(key) {
            return Ok(f(doc));
        }
        let mut doc = DocState::default();
        let out = f(&mut doc);
        self.docs.insert(key.clone(), doc);
        Ok(out)
    }
    /// Looks the document up and hints its state into the CPU caches.
    fn prefetch(&mut self, change: &ChangeSet, stage: Prefetch) {
        if let Some(doc) = self.docs.get(&change.key) {
            doc.prefetch(change, stage);
        }
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

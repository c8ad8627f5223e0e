//! # state — SyncFlow's sled-backed state stores
//!
//! - [`codec`]: the versioned binary encoding of a document's resolver state (bincode behind one
//!   module, with a format byte so it can change);
//! - [`checkpoint`]: checkpoint snapshot files and manifests (checksummed, atomically published);
//! - [`store`]: one sled tree per task (input partition), its key layout, and [`store::Overlay`],
//!   the in-memory overlay a batch computes against before it is written atomically.
//!
//! sled is treated as a cache of the changelog topic: it is never ahead of Kafka, and it can always
//! be rebuilt from the changelog.

pub mod checkpoint;
pub mod codec;
pub mod store;

pub use store::{Overlay, StateError, TaskStore};

/// A task's sled tree.
pub type TaskTree = sled::Tree;

pub use sled;

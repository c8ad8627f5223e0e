//! # processors — SyncFlow's pure domain core
//!
//! Everything that decides what a write means lives here, with no Kafka, MongoDB or tokio:
//!
//! - [`write`](mod@write): the `data.changed` event ([`Write`]) and [`decode_write`] from raw bytes;
//! - [`limits`]: naming rules and configurable document limits;
//! - [`reject`]: machine-readable reasons a write is refused ([`Rejection`]);
//! - [`hlc`]: hybrid logical clocks and the skew bound;
//! - [`path`]: field paths, flattening and nesting of documents;
//! - [`diff`]: the stateless stage, [`compute_diff`] (write → [`ChangeSet`]), and
//!   [`decode_change`] (a record's bytes → [`ChangeSet`] in one pass, for the common case);
//! - [`resolve`]: the stateful stage, [`resolve_lww`] (per-field Last-Write-Wins over
//!   [`ResolveState`]), with conflict detection;
//! - [`events`]: what the resolver emits, [`SyncEvent`] and [`ConflictEvent`];
//! - [`value`]: when two JSON values count as the same ([`value::same_value`]).
//!
//! The rules are explained for app developers in `docs/CONFLICTS.md`.

pub mod diff;
pub mod events;
pub mod hlc;
pub mod limits;
pub mod path;
pub mod reject;
pub mod resolve;
mod set_fields;
pub mod value;
pub mod write;

pub use diff::{compute_diff, decode_change, ChangeOp, ChangeSet, DiffContext, Stamp};
pub use events::{ConflictEvent, ConflictRule, ConflictSide, SetFields, SideOp, SyncEvent};
pub use hlc::{Hlc, HlcClock};
pub use limits::Limits;
pub use reject::{RejectCode, Rejection};
pub use resolve::{
    apply_change, resolve_batch, resolve_lww, resolve_lww_bounded, Applied, Devices, DocState,
    MemState, Prefetch, Register, Registers, ResolveState, StoredBound,
};
pub use write::{decode_write, BucketKey, DocKey, Write, WriteOp};

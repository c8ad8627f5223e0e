//! Read-ahead for [`super::resolve_batch`]: hints that bring a document's state into the CPU
//! caches a few writes before the write that needs it, so the misses of several documents
//! overlap instead of each write waiting for its own.
//!
//! A hint changes nothing: the functions here only read pointers and issue prefetch
//! instructions (none on targets without one).

use crate::diff::ChangeSet;
use crate::diff::{ChangeOp, Stamp};

use super::doc::DocState;

/// How far along the read-ahead of one document is; see [`super::ResolveState::prefetch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// Far ahead: find the document and bring in its tables (registers, keys, devices).
    Tables,
    /// Close ahead, once the tables are in: bring in what the write will read through them
    /// (the named registers' stamps and old values, the device's entry, the document stamps).
    Registers,
}

const LINE: usize = 64;

/// Hints that the cache line holding `p` will be read soon.
#[inline(always)]
fn line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: `sse` is part of the x86_64 baseline, and a prefetch is only a hint: it reads
        // no memory the program sees and never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Hints every cache line of `len` bytes from `p`.
#[inline(always)]
fn bytes(p: *const u8, len: usize) {
    let mut at = 0;
    while at < len {
        line(p.wrapping_add(at));
        at += LINE;
    }
    if len > 0 {
        line(p.wrapping_add(len - 1));
    }
}

/// Hints a value of type `T` and nothing it points to.
#[inline(always)]
fn object<T>(v: &T) {
    bytes((v as *const T).cast(), size_of::<T>());
}

/// Hints the elements of a slice.
#[inline(always)]
fn slice<T>(s: &[T]) {
    bytes(s.as_ptr().cast(), size_of_val(s));
}

/// Hints a string's bytes.
#[inline(always)]
fn text(s: &str) {
    if !s.is_empty() {
        line(s.as_ptr());
    }
}

/// Hints a stamp's strings (read or rewritten in place by a newer stamp).
fn stamp_strings(s: &Stamp) {
    text(&s.device_id);
    text(&s.event_id);
}

/// Stage [`Prefetch::Tables`] for a document found in a store.
pub(super) fn tables(doc: &DocState) {
    object(doc);
    slice(doc.registers.keys_slice());
    slice(doc.registers.as_slice());
    let (keys, entries) = doc.devices.parts();
    slice(keys);
    slice(entries);
}

/// Stage [`Prefetch::Registers`] for `change` to `doc`.
pub(super) fn registers(doc: &DocState, change: &ChangeSet) {
    for s in [&doc.upserted_at, &doc.deleted_at, &doc.replaced_at]
        .into_iter()
        .flatten()
    {
        stamp_strings(s);
    }
    if let Some(seen) = doc.devices.get(&change.stamp.device_id) {
        text(&seen.1);
    }
    let ChangeOp::Fields { set, unset, .. } = &change.op else {
        return;
    };
    let named = set.iter().map(|(p, _)| p).chain(unset);
    for reg in named.filter_map(|p| doc.registers.get(p)) {
        object(&*reg.stamp);
        match &reg.value {
            Some(serde_json::Value::String(s)) => text(s),
            Some(serde_json::Value::Array(a)) => slice(a),
            _ => {}
        }
    }
}

//! Read-ahead for [`super::resolve_batch`]: hints that bring a document's state into the CPU
//! caches a few writes before the write that needs it, so the misses of several documents
//! overlap instead of each write waiting for its own.
//!
//! A hint changes nothing: the functions here only read pointers and issue prefetch
//! instructions (none on targets without one).

use std::sync::Arc;

use serde_json::Value;

use crate::diff::{ChangeOp, ChangeSet, Stamp};

use super::doc::DocState;
use super::path_key::PathKey;
use super::registers::Register;

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

/// Most paths a patch names for [`Prefetch::Registers`] to search for each one's register.
const SEARCHED: usize = 8;

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

/// Hints a shared stamp with the reference counts before it (replacing a register changes them;
/// that they sit right before the value is how `std` lays out an `Arc` today, and a hint that
/// misses costs nothing but the hint).
#[inline(always)]
fn shared(stamp: &Arc<Stamp>) {
    let counts = 2 * size_of::<usize>();
    let start: *const u8 = Arc::as_ptr(stamp).cast();
    bytes(start.wrapping_sub(counts), counts + size_of::<Stamp>());
}

/// Hints a string's bytes.
#[inline(always)]
fn text(s: &str) {
    if !s.is_empty() {
        line(s.as_ptr());
    }
}

/// Hints a stamp's strings (read, or written to by freeing them with the stamp).
pub(super) fn stamp_strings(s: &Stamp) {
    text(&s.device_id);
    text(&s.event_id);
}

/// Hints what replacing `reg` reads and writes: its stamp (with the reference counts) and its
/// value's contents.
#[inline(always)]
pub(super) fn register(reg: &Register) {
    shared(&reg.stamp);
    value(reg.value.as_ref());
}

/// Stage [`Prefetch::Tables`] for a document found in a store.
pub(super) fn tables(doc: &DocState) {
    object(doc);
    // First what is read first: the device table.
    let (index, entries) = doc.devices.parts();
    slice(index);
    slice(entries);
    // The document stamps, which a write compares with its own and replaces (with their counts).
    for s in [&doc.upserted_at, &doc.deleted_at, &doc.replaced_at]
        .into_iter()
        .flatten()
    {
        shared(s);
    }
    slice(doc.registers.slots_slice());
    slice(doc.registers.keys_slice());
    slice(doc.registers.as_slice());
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
    // A delete or full set sweeps every register, and a long patch finds its registers anyway:
    // walking the table is then cheaper than a search per path.
    let named = match &change.op {
        ChangeOp::Fields {
            replace: false,
            set,
            unset,
        } if set.len() + unset.len() <= SEARCHED => set.iter().map(|(p, _)| p).chain(unset),
        _ => {
            let mut last = std::ptr::null();
            for (_, reg) in doc.registers.as_slice() {
                if !std::ptr::eq(Arc::as_ptr(&reg.stamp), last) {
                    last = Arc::as_ptr(&reg.stamp);
                    shared(&reg.stamp);
                }
                value(reg.value.as_ref());
            }
            return;
        }
    };
    // The keys alone find the register, or one whose path shares the key's 31 bytes: as good
    // for a hint, and cheaper than the exact search.
    let (keys, entries) = (doc.registers.keys_slice(), doc.registers.as_slice());
    for path in named {
        let key = PathKey::of(path);
        let at = keys.partition_point(|k| *k < key);
        if keys.get(at) == Some(&key) {
            let reg = &entries[at].1;
            shared(&reg.stamp);
            value(reg.value.as_ref());
        }
    }
}

/// Hints where a register's value keeps its contents (strings and arrays).
fn value(v: Option<&Value>) {
    match v {
        Some(Value::String(s)) => text(s),
        Some(Value::Array(a)) => slice(a),
        _ => {}
    }
}

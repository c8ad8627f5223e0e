//! A damaged state record cannot make [`state::codec::decode_doc`] set aside memory out of
//! proportion to the record before refusing it.
//!
//! Each list length is checked against the bytes left, but values nest: a record of arrays
//! inside arrays, each claiming every byte after it, once reserved the whole claim at every
//! level (about 32 bytes per claimed element, 129 levels deep), gigabytes for a record of a
//! megabyte. This binary counts what is allocated through its own global allocator, so it holds
//! this one test: another running beside it would count too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use state::codec::{decode_doc, CodecError};

/// The system allocator, counting the bytes allocated and the most ever allocated at once.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grown(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::SeqCst) + bytes;
    PEAK.fetch_max(live, Ordering::SeqCst);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grown(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
            grown(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Size of the crafted record: about what Kafka lets through.
const RECORD_BYTES: usize = 1 << 20;
/// Levels of arrays: one more than the decoder reads (it refuses the deepest).
const LEVELS: usize = 130;

/// A format-3 record of one register whose value is `LEVELS` arrays, each inside the one
/// before and each claiming as many elements as there are bytes after its length (the most the
/// length check lets through), then zeros up to [`RECORD_BYTES`].
fn nested_arrays_claiming_everything() -> Vec<u8> {
    // Format 3; version 0, seq 0, no clock; no stamps; one register, its path empty, a value.
    let mut record = vec![3, 0, 0, 0, 0, 1, 0, 1];
    for _ in 0..LEVELS {
        // The array tag, then its length in bincode's 4-byte form.
        let left = RECORD_BYTES - record.len() - 6;
        record.push(6);
        record.push(252);
        record.extend_from_slice(&u32::try_from(left).unwrap().to_le_bytes());
    }
    record.resize(RECORD_BYTES, 0);
    record
}

#[test]
fn nested_lengths_are_refused_without_reserving_what_they_claim() {
    let record = nested_arrays_claiming_everything();
    let started = Instant::now();
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let read = decode_doc(&record);
    let reserved = PEAK.load(Ordering::SeqCst) - before;
    assert!(
        matches!(read, Err(CodecError::Corrupt(_))),
        "refused as corrupt: {read:?}"
    );
    assert!(
        reserved < 16 << 20,
        "{} MiB set aside for a record of 1 MiB",
        reserved >> 20
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

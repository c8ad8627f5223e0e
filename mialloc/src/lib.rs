//! mimalloc as a global allocator, calling its plain entry points where the alignment allows.
//!
//! `mimalloc::MiMalloc` passes every request to `mi_malloc_aligned`, whose general path costs
//! about 40 instructions more per allocation than `mi_malloc`. Every mimalloc block is aligned
//! to at least a word (8 bytes on 64-bit targets: block sizes are multiples of it), so requests
//! aligned to 8 or less can use `mi_malloc`, `mi_zalloc` and `mi_realloc`; the others still go
//! through the aligned functions.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has.
const WORD: usize = size_of::<usize>();

/// mimalloc, through its plain entry points for word-aligned requests.
pub struct MiMalloc;

// SAFETY: every block comes from mimalloc and goes back to it; a block from `mi_malloc` is
// aligned to at least `WORD`, and only requests aligned to at most `WORD` are served by it.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if layout.align() <= WORD {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if layout.align() <= WORD {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe {
            if layout.align() <= WORD {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

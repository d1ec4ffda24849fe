//! A counting allocator for the tests that measure memory (tests/transport.rs,
//! tests/ends_footprint.rs): every call goes to the system allocator unchanged; the bytes live on
//! the calling thread, and their peak, are counted. A test crate installs it with
//! `#[global_allocator] static ALLOC: counting::Counting = counting::Counting;`.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The allocator.
pub struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// Bytes live on this thread now (allocated here minus freed here).
pub fn live() -> isize {
    LIVE.with(Cell::get)
}

/// Start measuring a peak from now; returns the bytes live now.
pub fn start_peak() -> isize {
    let base = live();
    PEAK.with(|p| p.set(base));
    base
}

/// The most bytes live on this thread since [`start_peak`].
pub fn peak() -> isize {
    PEAK.with(Cell::get)
}

fn count(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

// SAFETY: every call is passed to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new) };
        if !p.is_null() {
            count(new as isize - layout.size() as isize);
        }
        p
    }
}

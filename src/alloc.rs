//! The daemon's global allocator: mimalloc, called the way glibc's `malloc` is called for
//! everything that needs no more than the alignment every mimalloc block has.
//!
//! The `mimalloc` crate's allocator passes every request to `mi_malloc_aligned`, even with an
//! alignment of 1 or 8. In mimalloc 3 that takes the fast path only while the size class's
//! current page has a free block; when it has none, a request whose size class is not a
//! power of two is *over-allocated* (size + alignment − 1, the next class up) instead of
//! opening a new page of its own class. Cached entries (their `Arc`s, keys of any length)
//! then drift into larger classes: about 40 bytes more per cached object in
//! `bench/run.sh --only memory`. Every mimalloc block is aligned to at least 8 bytes (block
//! sizes are whole words, pages start aligned), so requests up to that alignment go to
//! `mi_malloc` and only larger alignments to the aligned entry points — as Rust's own
//! `System` allocator does with glibc.
//!
//! It also tunes mimalloc for a long-running server ([`tune`]): pages freed by a burst (the
//! buffers of connections that closed, the old tables of maps that grew) go back to the OS
//! [`PURGE_DELAY_MS`] after they become free instead of a second. mimalloc has no thread of
//! its own and only purges when it is called, so a daemon that has gone idle would keep that
//! memory; [`collect_periodically`] calls it every [`COLLECT_EVERY`] (measured: ~7 MiB
//! returned after loading 100,000 objects).

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::time::Duration;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has, whatever its size (one machine word).
const MIN_ALIGN: usize = std::mem::size_of::<usize>();

/// How long mimalloc waits before returning freed pages to the OS (its default is 1,000 ms).
pub const PURGE_DELAY_MS: i64 = 100;

/// `mi_option_purge_delay`, which `libmimalloc-sys` does not name: its place in mimalloc 3's
/// `mi_option_e` (`include/mimalloc.h`), right after `mi_option_deprecated_eager_commit_delay`
/// (14, which the crate names `mi_option_eager_commit_delay`).
const OPTION_PURGE_DELAY: mi::mi_option_t = 15;

/// mimalloc as the global allocator (see the module doc).
pub struct Allocator;

// SAFETY: every method forwards to the mimalloc function with the same contract: `mi_malloc`,
// `mi_zalloc` and `mi_realloc` return blocks aligned to at least `MIN_ALIGN` whatever the
// size, so they serve any layout whose alignment is at most that; larger alignments use the
// `_aligned` variants, which honour any power-of-two alignment. `mi_free` frees blocks from
// either family.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MIN_ALIGN {
            mi::mi_malloc(layout.size()) as *mut u8
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MIN_ALIGN {
            mi::mi_zalloc(layout.size()) as *mut u8
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr as *mut c_void);
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MIN_ALIGN {
            mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
        } else {
            mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
        }
    }
}

/// Sets mimalloc's options for a long-running server; call once at start-up, before the
/// runtime starts. Freed pages go back to the OS [`PURGE_DELAY_MS`] after they become free.
/// (Transparent huge pages are left off at build time — the `no_thp` feature — so a cache of
/// small objects is not charged for whole 2 MiB pages it barely touches.)
pub fn tune() {
    // SAFETY: setting an option is a plain store into mimalloc's option table.
    unsafe { mi::mi_option_set(OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) };
}

/// How often [`collect_periodically`] returns freed memory.
pub const COLLECT_EVERY: Duration = Duration::from_millis(500);

/// Returns to the OS the pages this thread's heap freed and those whose purge delay passed
/// (mimalloc's `mi_collect(false)`: no forced purge, full pages not visited).
pub fn collect() {
    // SAFETY: `mi_collect` only walks mimalloc's own structures for the calling thread.
    unsafe { mi::mi_collect(false) };
}

/// Calls [`collect`] every `every`, forever (on whichever runtime thread runs it; the
/// purge of freed pages is process-wide). It visits only that thread's pages that are not
/// full, and the arena's pending purges.
pub async fn collect_periodically(every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every alignment up to a page, sizes across the small, medium and large classes:
    /// blocks come back aligned, writable, and survive `realloc` with their contents.
    #[test]
    fn blocks_are_aligned_and_keep_their_contents() {
        let a = Allocator;
        for align in [1usize, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1usize, 7, 24, 100, 191, 1024, 1141, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    std::ptr::write_bytes(p, 0xab, size);
                    let q = a.realloc(p, layout, size * 3);
                    assert!(!q.is_null());
                    assert_eq!(q as usize % align, 0, "realloc size {size} align {align}");
                    assert!((0..size).all(|i| *q.add(i) == 0xab));
                    a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
                    let z = a.alloc_zeroed(layout);
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}

//! The memory allocator's settings and upkeep: mimalloc, the binary's global allocator.
//!
//! NOTE: mimalloc gives freed memory back to the system lazily, when the thread that owns it
//! allocates or frees again after the purge delay; memory freed by another thread (a request's
//! log record, freed by the flusher) waits for its owner. A worker that went idle after a burst
//! kept what the burst took: 128 MiB ten seconds after a 10 s run at 256 connections, against
//! 19 MiB idle. So each worker and the store's preparer call [`tidy`] about once a second
//! ([`TIDY_EVERY`]), and the store's committer after each commit: 25 MiB ten seconds after,
//! and a peak of 65 MiB rather than 90-180, at the same throughput.

use std::ffi::{c_int, c_long};
use std::time::{Duration, Instant};

// Linked in whole: the binary's allocator, and the functions below.
use mimalloc as _;

unsafe extern "C" {
    fn mi_option_set_default(option: c_int, value: c_long);
    fn mi_collect(force: bool);
}

/// `mi_option_t` values (mimalloc 2).
const MI_OPTION_PURGE_DELAY: c_int = 15;

/// How long mimalloc keeps freed memory before giving it back to the system, unless
/// `MIMALLOC_PURGE_DELAY` says otherwise. Its default, 10 ms, returns the memory of every
/// finished request at once and takes it back (with page faults) for the next: under steady
/// load the resident size swung by 14 MiB within a minute, and at 256 connections throughput
/// fell by nearly a third. A second smooths that to the load's real need and saves the faults.
const PURGE_DELAY_MS: c_long = 1000;

/// Sets mimalloc's defaults before the first thread is started; the environment still
/// overrides them.
pub fn tune() {
    // SAFETY: mimalloc (linked in by the `mimalloc` crate) defines this function; it checks the
    // option's range and only stores the value.
    unsafe { mi_option_set_default(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) }
}

/// Turns transparent huge pages off for this process (the binary does it as it loads, before
/// anything is allocated).
///
/// mimalloc reserves its arenas with `madvise(MADV_HUGEPAGE)`, so on a system whose THP setting
/// is `madvise` (the common default) every 2 MiB of heap touched at all is resident whole: an
/// idle gateway held 44 MiB, 32 of them huge pages it barely used; with them off, 17 MiB. A
/// gateway's heap is small and churns, so the TLB misses huge pages would save do not show in
/// its throughput (`scripts/bench.sh`).
pub fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Collects what other threads freed of the calling thread's memory and gives back to the
/// system what is free (a walk over the thread's pages: tens of microseconds).
pub fn tidy() {
    // SAFETY: defined by mimalloc; acts on the calling thread's heap and the shared arenas.
    unsafe { mi_collect(true) }
}

/// How often a thread that allocates much calls [`tidy`]. More often gives back memory the
/// thread's next round of work takes again, with a page fault for every page: the store's
/// preparer, tidying after each batch (25 a second at 45,000 requests a second), faulted
/// 6,000 pages a second back in, and the store's CPU per request was a sixth higher.
pub const TIDY_EVERY: Duration = Duration::from_secs(1);

/// For a thread with a loop of its own, after each round of work: [`tidy`] if the last time
/// (`last`, updated) was [`TIDY_EVERY`] ago or more; otherwise only collects what other threads
/// freed of its memory, for its next round, giving nothing back before mimalloc's purge delay.
pub fn tidy_when_due(last: &mut Instant) {
    if last.elapsed() >= TIDY_EVERY {
        tidy();
        *last = Instant::now();
    } else {
        // SAFETY: as in `tidy`.
        unsafe { mi_collect(false) }
    }
}

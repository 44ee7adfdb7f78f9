//! Data kept in shards by worker thread, so that threads do not contend for one lock: each
//! thread takes its own shard index once, and threads beyond [`SHARDS`] share them.

use std::sync::atomic::{AtomicUsize, Ordering};

/// How many shards such data has.
pub const SHARDS: usize = 16;

/// The calling thread's shard.
pub fn of_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

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

/// One `T` per shard, each on cache lines of its own. Shards side by side in a plain array
/// share lines (two `Mutex<Vec<_>>` fit in one), so a thread locking its own shard took the
/// line from the thread working on the next: false sharing, on every request (counting an
/// attempt on two threads at once, `metrics::tests::accounting_cost`: 520 ns, 423 padded).
pub struct Sharded<T>([Padded<T>; SHARDS]);

/// 128 bytes: x86-64 fetches lines in pairs, and some ARM cores have lines of 128.
#[repr(align(128))]
struct Padded<T>(T);

impl<T> Sharded<T> {
    /// Each shard made by `make`.
    pub fn new(mut make: impl FnMut() -> T) -> Self {
        Sharded(std::array::from_fn(|_| Padded(make())))
    }

    /// The calling thread's shard.
    pub fn mine(&self) -> &T {
        &self.0[of_thread()].0
    }

    /// Every shard, in order, for the readers that add them up or drain them.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|p| &p.0)
    }
}

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Sharded::new(T::default)
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Sharded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_on_lines_of_their_own() {
        let s: Sharded<std::sync::Mutex<Vec<u8>>> = Sharded::default();
        let at: Vec<usize> = s.iter().map(|m| m as *const _ as usize).collect();
        assert!(at.iter().all(|a| a % 128 == 0), "{at:?}");
        assert!(at.windows(2).all(|w| w[1] - w[0] >= 128), "{at:?}");
        assert!(std::ptr::eq(s.mine(), s.iter().nth(of_thread()).unwrap()));
    }
}

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

/// A count that threads raise and lower on their own shard (no line moves between cores when
/// two threads count at once), read as the sum of the shards. A shard may wrap below zero (a
/// count raised on one thread and lowered on another): the sum, in wrapping arithmetic, is
/// exact all the same.
#[derive(Debug, Default)]
pub struct Counter(Sharded<AtomicUsize>);

impl Counter {
    /// Adds one.
    pub fn raise(&self) {
        self.0.mine().fetch_add(1, Ordering::AcqRel);
    }

    /// Takes one away.
    pub fn lower(&self) {
        self.0.mine().fetch_sub(1, Ordering::AcqRel);
    }

    /// The count now.
    pub fn sum(&self) -> usize {
        self.0
            .iter()
            .fold(0usize, |sum, n| sum.wrapping_add(n.load(Ordering::Acquire)))
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

    #[test]
    fn a_count_lowered_on_another_thread_still_sums_right() {
        let count = std::sync::Arc::new(Counter::default());
        count.raise();
        count.raise();
        let other = count.clone();
        std::thread::spawn(move || other.lower()).join().unwrap();
        assert_eq!(count.sum(), 1);
        count.lower();
        assert_eq!(count.sum(), 0);
    }
}

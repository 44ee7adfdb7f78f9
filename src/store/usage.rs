//! Usage per key × model × day: requests, successes, failures by class, and prompt, output and
//! thought tokens (from `usageMetadata`, in streams too).
//!
//! The request path adds each event to in-memory counts at once (a short lock on its worker
//! thread's shard, never a queue that could fill); the store's flusher takes the counts and adds
//! them to redb every [`SAVE_EVERY`], or less often when a save holds many rows. Memory is
//! bounded by the keys × models × days seen in the last few saves ([`Usage::drain`]).

/// How often counts are saved. Each save rewrites one row per key × model × day counted since
/// the last: with a row per request (a pool of thousands of keys, taken in turn), saving as
/// often as the logs (every 250 ms) made a request cost 40 µs of CPU with 1,000 keys against
/// 28 with 10. What is not saved yet is still shown (see [`Usage::pending_of_day`]), and
/// saved at shutdown.
pub const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// The rows a save may rewrite every [`SAVE_EVERY`] (about 20 ms of the store's CPU): a save of
/// more puts the next one off in proportion, up to [`SAVE_AT_LEAST_EVERY`]. With 100,000 keys
/// taken in turn every key has a row at each save, and saving them every 5 seconds cost each
/// request 1.3 µs of CPU. Saves then rewrite about 2,000 rows a second at most, whatever the
/// pool's size; what a crash may lose is at most the wait before the next save.
const ROWS_A_SAVE: usize = 10_000;
/// The longest a save of many rows puts the next one off.
const SAVE_AT_LEAST_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::shard::Sharded;
pub use crate::translate::usage::Tokens;

/// What happened to one attempt.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    pub key_id: &'a str,
    pub model: &'a str,
    /// Days since the epoch (UTC).
    pub day: u32,
    /// `None`: a success; else the error class.
    pub failure: Option<&'static str>,
    pub tokens: Tokens,
}

/// One key × model × day, as stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub successes: u64,
    pub failures: BTreeMap<String, u64>,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub thought_tokens: u64,
}

impl Counts {
    /// Adds one attempt: `failure` is its error class (`None`: a success).
    pub fn add(&mut self, failure: Option<&str>, tokens: Tokens) {
        self.requests += 1;
        match failure {
            None => self.successes += 1,
            Some(class) => *self.failures.entry(class.to_owned()).or_default() += 1,
        }
        // Token counts are the upstream's to say, any number: they saturate.
        self.prompt_tokens = self.prompt_tokens.saturating_add(tokens.prompt);
        self.output_tokens = self.output_tokens.saturating_add(tokens.output);
        self.thought_tokens = self.thought_tokens.saturating_add(tokens.thoughts);
    }

    pub fn merge(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.successes += other.successes;
        for (class, n) in &other.failures {
            *self.failures.entry(class.clone()).or_default() += n;
        }
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.thought_tokens = self.thought_tokens.saturating_add(other.thought_tokens);
    }
}

/// Counts taken for a save: one per stored row ([`row`]), in the rows' order, each row once.
pub type Tally = Vec<(String, Counts)>;

/// The stored row of `key_id`'s counts of `model` on `day`: the day first, zero-padded, so
/// that a day's rows are a range of the table ([`crate::store::Store::usage_of_day`]).
pub fn row(day: u32, key_id: &str, model: &str) -> String {
    format!("{day:06}|{key_id}|{model}")
}

/// The prefix of `day`'s rows.
pub fn day_prefix(day: u32) -> String {
    format!("{day:06}|")
}

/// A shard's counts by key id, then (model, day) in a short list (a key serves few models a
/// day): looked up with borrowed names, so that counting an attempt allocates nothing once its
/// key and model have been seen. A map per key of maps per model took about twice the memory
/// with a pool of 100,000 keys. Hashed with foldhash, as the metrics' maps are (seeded; the
/// ids are the operator's).
type Shard = HashMap<Box<str>, Vec<Counted>, foldhash::fast::RandomState>;

/// Most models × days a key counts apart between two saves; the rest are counted as
/// [`OTHER_MODEL`].
const MODELS_A_KEY: usize = 64;
const OTHER_MODEL: &str = "other";

/// One model × day of a key's counts.
struct Counted {
    model: Box<str>,
    day: u32,
    counts: Counts,
}

/// Counts not yet saved, by (day, key id, model), in shards by worker thread.
pub struct Usage {
    shards: Sharded<Mutex<Shard>>,
    /// Each shard's map as the last drain left it: its entries kept, their counts zero. The
    /// next drain swaps it in, so that the keys counted since go on counting without a new
    /// entry or the map growing again (with 100,000 keys in turn, a map emptied at each save
    /// was rebuilt by the request path: a rehash, and fresh pages faulted in, a key at a
    /// time).
    spares: Sharded<Mutex<Shard>>,
    /// When [`Usage::drain_due`] takes the counts next (ms since the epoch).
    due_ms: std::sync::atomic::AtomicU64,
}

impl Default for Usage {
    fn default() -> Self {
        Usage {
            shards: Sharded::default(),
            spares: Sharded::default(),
            due_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Usage {
    /// Adds an event to the counts.
    pub fn record(&self, e: Event) {
        let mut shard = self.shards.mine().lock().unwrap_or_else(|e| e.into_inner());
        let counted = match shard.get_mut(e.key_id) {
            Some(counted) => counted,
            None => shard.entry(e.key_id.into()).or_default(),
        };
        let find = |counted: &[Counted], model: &str| {
            counted
                .iter()
                .position(|c| c.day == e.day && *c.model == *model)
        };
        // The model is the client's to name: past a key's first few, each counts as "other".
        let at = find(counted, e.model).unwrap_or_else(|| {
            let model = if counted.len() < MODELS_A_KEY {
                e.model
            } else {
                OTHER_MODEL
            };
            find(counted, model).unwrap_or_else(|| {
                counted.push(Counted {
                    model: model.into(),
                    day: e.day,
                    counts: Counts::default(),
                });
                counted.len() - 1
            })
        });
        counted[at].counts.add(e.failure, e.tokens);
    }

    /// The counts of `day` not yet saved (taken by [`Usage::drain`]), by key id, every model
    /// added up: what the store's counts lack until the next save.
    pub fn pending_of_day(&self, day: u32) -> HashMap<String, Counts> {
        let mut out: HashMap<String, Counts> = HashMap::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (key_id, counted) in shard.iter() {
                // Entries a drain left in place count nothing till they count again.
                let of_day = counted
                    .iter()
                    .filter(|c| c.day == day && c.counts.requests > 0);
                for c in of_day {
                    out.entry(key_id.to_string()).or_default().merge(&c.counts);
                }
            }
        }
        out
    }

    /// [`Usage::drain`] when due (or whenever `force`); else nothing. The next is due
    /// [`SAVE_EVERY`] after, or later in proportion to the rows taken past [`ROWS_A_SAVE`].
    pub fn drain_due(&self, now_ms: u64, force: bool) -> Tally {
        use std::sync::atomic::Ordering::Relaxed;
        if !force && now_ms < self.due_ms.load(Relaxed) {
            return Tally::new();
        }
        let tally = self.drain();
        let saves = tally.len().div_ceil(ROWS_A_SAVE).max(1) as u64;
        let wait_ms = (SAVE_EVERY.as_millis() as u64)
            .saturating_mul(saves)
            .min(SAVE_AT_LEAST_EVERY.as_millis() as u64);
        self.due_ms.store(now_ms.saturating_add(wait_ms), Relaxed);
        tally
    }

    /// Everything counted since the last call, added up by row (day, key id, model), in the
    /// rows' order (a save then reads and rewrites each page of the table once). An entry
    /// that counted nothing since its map was last drained is forgotten: memory is bounded by
    /// what was counted in the last three intervals.
    pub fn drain(&self) -> Tally {
        fn lock(m: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
            m.lock().unwrap_or_else(|e| e.into_inner())
        }
        let mut out = Tally::new();
        for (shard, spare) in self.shards.iter().zip(self.spares.iter()) {
            let mut taken = std::mem::take(&mut *lock(spare));
            // The shard's lock is held for a swap only (see `LogQueue::take`).
            std::mem::swap(&mut *lock(shard), &mut taken);
            taken.retain(|key_id, counted| {
                counted.retain_mut(|c| {
                    if c.counts.requests == 0 {
                        return false;
                    }
                    out.push((row(c.day, key_id, &c.model), std::mem::take(&mut c.counts)));
                    true
                });
                !counted.is_empty()
            });
            *lock(spare) = taken;
        }
        // A key counted on several worker threads has a row from each shard.
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1.merge(&later.1);
            }
            same
        });
        out
    }
}

/// Usage of `day` by key id: what `store` saved, with what `pending` holds not saved yet.
pub fn of_day(
    store: Option<&crate::store::Store>,
    pending: &Usage,
    day: u32,
) -> HashMap<String, Counts> {
    let mut usage = store
        .and_then(|s| s.usage_of_day(day).ok())
        .unwrap_or_default();
    for (key, counts) in pending.pending_of_day(day) {
        usage.entry(key).or_default().merge(&counts);
    }
    usage
}

/// Days since the epoch for `now_ms`.
pub fn day_of(now_ms: u64) -> u32 {
    (now_ms / 86_400_000) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts one successful attempt without tokens.
    fn success(u: &Usage, key_id: &str, model: &str, day: u32) {
        u.record(Event {
            key_id,
            model,
            day,
            failure: None,
            tokens: Tokens::default(),
        });
    }

    /// The counts of one row of a tally; each row is there once, in order.
    fn counted<'a>(tally: &'a Tally, day: u32, key_id: &str, model: &str) -> &'a Counts {
        assert!(tally.windows(2).all(|w| w[0].0 < w[1].0), "in order, once");
        let row = row(day, key_id, model);
        let found = tally.iter().find(|(r, _)| *r == row);
        &found.unwrap_or_else(|| panic!("no row {row}")).1
    }

    #[test]
    fn counts_are_drained_when_due_or_forced() {
        let u = Usage::default();
        let count = |key_id| success(&u, key_id, "a", 1);
        let every = SAVE_EVERY.as_millis() as u64;
        count("k1");
        assert_eq!(u.drain_due(every, false).len(), 1, "due at first");
        count("k2");
        assert!(u.drain_due(every + 1, false).is_empty(), "not due yet");
        assert_eq!(u.drain_due(every + 2, true).len(), 1, "forced");
        count("k3");
        assert!(u.drain_due(2 * every, false).is_empty());
        assert_eq!(u.drain_due(2 * every + 2, false).len(), 1);
    }

    #[test]
    fn a_save_of_many_rows_puts_the_next_off_in_proportion() {
        let u = Usage::default();
        let every = SAVE_EVERY.as_millis() as u64;
        let count = |keys: usize| {
            for k in 0..keys {
                success(&u, &format!("k{k}"), "a", 1);
            }
        };
        // Three saves' worth of rows: the next is due three intervals on.
        count(2 * ROWS_A_SAVE + 1);
        assert_eq!(u.drain_due(0, false).len(), 2 * ROWS_A_SAVE + 1);
        count(1);
        assert!(u.drain_due(3 * every - 1, false).is_empty());
        assert_eq!(u.drain_due(3 * every, false).len(), 1);
        // One row: the usual interval again.
        count(1);
        assert!(u.drain_due(4 * every - 1, false).is_empty());
        assert_eq!(u.drain_due(4 * every, false).len(), 1);
        // However many rows, the wait is bounded; a forced drain (shutdown) takes all at once.
        count(100 * ROWS_A_SAVE);
        assert_eq!(u.drain_due(4 * every, true).len(), 100 * ROWS_A_SAVE);
        count(1);
        let longest = 4 * every + SAVE_AT_LEAST_EVERY.as_millis() as u64;
        assert!(u.drain_due(longest - 1, false).is_empty());
        assert_eq!(u.drain_due(longest, false).len(), 1);
    }

    #[test]
    fn counts_not_yet_saved_are_seen_until_they_are_taken() {
        let u = Usage::default();
        for (key, model, day) in [
            ("k1", "a", 7),
            ("k1", "b", 7),
            ("k2", "a", 7),
            ("k1", "a", 8),
        ] {
            success(&u, key, model, day);
        }
        let pending = u.pending_of_day(7);
        assert_eq!(pending["k1"].requests, 2, "both models of day 7");
        assert_eq!(pending["k2"].requests, 1);
        assert_eq!(u.pending_of_day(8)["k1"].requests, 1);
        assert_eq!(of_day(None, &u, 7)["k1"].requests, 2);
        assert_eq!(u.drain().len(), 4);
        assert!(u.pending_of_day(7).is_empty());
    }

    #[test]
    fn events_add_up_per_key_model_and_day() {
        let u = Usage::default();
        for failure in [None, None, Some("rate_limited")] {
            u.record(Event {
                key_id: "k1",
                model: "m",
                day: 7,
                failure,
                tokens: Tokens {
                    prompt: 1,
                    output: 2,
                    thoughts: 0,
                    cached: 0,
                },
            });
        }
        for (key_id, model, day) in [("k2", "m", 7), ("k1", "n", 7), ("k1", "m", 8)] {
            success(&u, key_id, model, day);
        }
        let counts = u.drain();
        assert_eq!(counts.len(), 4);
        for other in [(7, "k2", "m"), (7, "k1", "n"), (8, "k1", "m")] {
            let c = counted(&counts, other.0, other.1, other.2);
            assert_eq!((c.requests, c.successes), (1, 1), "{other:?}");
        }
        let c = counted(&counts, 7, "k1", "m");
        assert_eq!(
            (
                c.requests,
                c.successes,
                c.failures["rate_limited"],
                c.output_tokens
            ),
            (3, 2, 1, 6)
        );
        assert!(u.drain().is_empty());
    }

    #[test]
    fn a_drained_entry_counts_on_in_place_and_is_forgotten_once_idle() {
        let u = Usage::default();
        let count = |key_id| success(&u, key_id, "m", 7);
        let entries = || -> usize {
            let shards = u.shards.iter().chain(u.spares.iter());
            shards.map(|s| s.lock().unwrap().len()).sum()
        };
        count("k1");
        count("k2");
        assert_eq!(u.drain().len(), 2);
        count("k1");
        let counts = u.drain();
        assert_eq!(counts.len(), 1, "k2 counted nothing since");
        assert_eq!(counted(&counts, 7, "k1", "m").requests, 1);
        assert!(entries() > 0, "entries kept, to count on in place");
        assert!(
            u.pending_of_day(7).is_empty(),
            "k1's kept entry counts nothing"
        );
        count("k1");
        assert_eq!(u.pending_of_day(7)["k1"].requests, 1);
        assert_eq!(u.drain().len(), 1);
        assert!(u.drain().is_empty());
        assert!(u.drain().is_empty());
        assert_eq!(entries(), 0);
    }

    #[test]
    fn a_key_counted_on_several_threads_is_one_row() {
        let u = Usage::default();
        std::thread::scope(|s| {
            for model in ["m", "m", "n"] {
                // Each thread takes a shard of its own.
                s.spawn(|| success(&u, "k1", model, 7));
            }
        });
        let counts = u.drain();
        assert_eq!(counts.len(), 2);
        assert_eq!(counted(&counts, 7, "k1", "m").requests, 2);
        assert_eq!(counted(&counts, 7, "k1", "n").requests, 1);
    }

    #[test]
    fn a_client_naming_endless_models_costs_a_key_a_bounded_list() {
        let u = Usage::default();
        let names: Vec<String> = (0..1000).map(|i| format!("made-up-{i}")).collect();
        for model in &names {
            success(&u, "k1", model, 7);
        }
        let counts = u.drain();
        assert_eq!(counts.len(), MODELS_A_KEY + 1);
        let other = counted(&counts, 7, "k1", OTHER_MODEL);
        assert_eq!(other.requests, 1000 - MODELS_A_KEY as u64);
    }
}

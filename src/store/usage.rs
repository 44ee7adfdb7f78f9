//! Usage per key × model × day: requests, successes, failures by class, and prompt, output and
//! thought tokens (from `usageMetadata`, in streams too).
//!
//! The request path adds each event to in-memory counts at once (a short lock on its worker
//! thread's shard, never a queue that could fill); the store's flusher takes the counts and adds
//! them to redb every [`SAVE_EVERY`]. Memory is bounded by the keys × models × days seen since.

/// How often counts are saved. Each save rewrites one row per key × model × day counted since
/// the last: with a row per request (a pool of thousands of keys, taken in turn), saving as
/// often as the logs (every 250 ms) made a request cost 40 µs of CPU with 1,000 keys against
/// 28 with 10. What is not saved yet is still shown (see [`Usage::pending_of_day`]), and
/// saved at shutdown.
pub const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::shard::{self, SHARDS};
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

type Tally = HashMap<(u32, String, String), Counts>;

/// A shard's counts by key id, then model, then day: looked up with borrowed names, so that
/// counting an attempt allocates nothing once its key and model have been seen.
type Shard = HashMap<String, HashMap<String, HashMap<u32, Counts>>>;

/// Counts not yet saved, by (day, key id, model), in shards by worker thread.
pub struct Usage {
    shards: [Mutex<Shard>; SHARDS],
    /// When [`Usage::drain_due`] last took the counts (ms since the epoch).
    drained_ms: std::sync::atomic::AtomicU64,
}

impl Default for Usage {
    fn default() -> Self {
        Usage {
            shards: std::array::from_fn(|_| Mutex::default()),
            drained_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Usage {
    /// Adds an event to the counts.
    pub fn record(&self, e: Event) {
        let mut shard = self.shards[shard::of_thread()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let models = match shard.get_mut(e.key_id) {
            Some(models) => models,
            None => shard.entry(e.key_id.to_owned()).or_default(),
        };
        let days = match models.get_mut(e.model) {
            Some(days) => days,
            None => models.entry(e.model.to_owned()).or_default(),
        };
        days.entry(e.day).or_default().add(e.failure, e.tokens);
    }

    /// The counts of `day` not yet saved (taken by [`Usage::drain`]), by key id, every model
    /// added up: what the store's counts lack until the next save.
    pub fn pending_of_day(&self, day: u32) -> HashMap<String, Counts> {
        let mut out: HashMap<String, Counts> = HashMap::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (key_id, models) in shard.iter() {
                for c in models.values().filter_map(|days| days.get(&day)) {
                    out.entry(key_id.clone()).or_default().merge(c);
                }
            }
        }
        out
    }

    /// [`Usage::drain`] when [`SAVE_EVERY`] has passed since it last did (or whenever
    /// `force`); else nothing.
    pub fn drain_due(&self, now_ms: u64, force: bool) -> Tally {
        use std::sync::atomic::Ordering::Relaxed;
        let since = now_ms.saturating_sub(self.drained_ms.load(Relaxed));
        if !force && since < SAVE_EVERY.as_millis() as u64 {
            return Tally::new();
        }
        self.drained_ms.store(now_ms, Relaxed);
        self.drain()
    }

    /// Everything counted since the last call, added up by (day, key id, model).
    pub fn drain(&self) -> Tally {
        let mut out = Tally::new();
        for shard in &self.shards {
            // The lock is held for a swap only (see `LogQueue::take`).
            let taken = std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()));
            for (key_id, models) in taken {
                for (model, days) in models {
                    for (day, c) in days {
                        out.entry((day, key_id.clone(), model.clone()))
                            .or_default()
                            .merge(&c);
                    }
                }
            }
        }
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

    #[test]
    fn counts_are_drained_when_due_or_forced() {
        let u = Usage::default();
        let count = |key_id| {
            u.record(Event {
                key_id,
                model: "a",
                day: 1,
                failure: None,
                tokens: Tokens::default(),
            })
        };
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
    fn counts_not_yet_saved_are_seen_until_they_are_taken() {
        let u = Usage::default();
        for (key, model, day) in [
            ("k1", "a", 7),
            ("k1", "b", 7),
            ("k2", "a", 7),
            ("k1", "a", 8),
        ] {
            u.record(Event {
                key_id: key,
                model,
                day,
                failure: None,
                tokens: Tokens::default(),
            });
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
            u.record(Event {
                key_id,
                model,
                day,
                failure: None,
                tokens: Tokens::default(),
            });
        }
        let counts = u.drain();
        assert_eq!(counts.len(), 4);
        for other in [(7, "k2", "m"), (7, "k1", "n"), (8, "k1", "m")] {
            let c = &counts[&(other.0, other.1.to_owned(), other.2.to_owned())];
            assert_eq!((c.requests, c.successes), (1, 1), "{other:?}");
        }
        let c = &counts[&(7, "k1".to_owned(), "m".to_owned())];
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
}

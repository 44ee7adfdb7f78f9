//! Usage per key × model × day: requests, successes, failures by class, and prompt, output and
//! thought tokens (from `usageMetadata`, in streams too).
//!
//! The request path adds each event to in-memory counts at once (a short lock on its worker
//! thread's shard, never a queue that could fill); the store's flusher takes the counts and adds
//! them to redb once a second. Memory is bounded by the keys × models × days seen since.

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex};

use memchr::memmem::FinderRev;
use serde::{Deserialize, Serialize};

use crate::shard::{self, SHARDS};

/// Tokens one answer used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub output: u64,
    pub thoughts: u64,
}

/// What happened to one attempt.
#[derive(Debug, Clone)]
pub struct Event {
    pub key_id: String,
    pub model: String,
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
        self.prompt_tokens += tokens.prompt;
        self.output_tokens += tokens.output;
        self.thought_tokens += tokens.thoughts;
    }

    pub fn merge(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.successes += other.successes;
        for (class, n) in &other.failures {
            *self.failures.entry(class.clone()).or_default() += n;
        }
        self.prompt_tokens += other.prompt_tokens;
        self.output_tokens += other.output_tokens;
        self.thought_tokens += other.thought_tokens;
    }
}

type Tally = HashMap<(u32, String, String), Counts>;

/// Counts not yet saved, by (day, key id, model), in shards by worker thread.
pub struct Usage {
    shards: [Mutex<Tally>; SHARDS],
}

impl Default for Usage {
    fn default() -> Self {
        Usage {
            shards: std::array::from_fn(|_| Mutex::default()),
        }
    }
}

impl Usage {
    /// Adds an event to the counts.
    pub fn record(&self, e: Event) {
        let Event {
            key_id,
            model,
            day,
            failure,
            tokens,
        } = e;
        let mut tally = self.shards[shard::of_thread()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tally
            .entry((day, key_id, model))
            .or_default()
            .add(failure, tokens);
    }

    /// Everything counted since the last call, added up by (day, key id, model).
    pub fn drain(&self) -> Tally {
        let mut out = Tally::new();
        for shard in &self.shards {
            // The lock is held for a swap only (see `LogQueue::take`).
            let taken = std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()));
            for (k, c) in taken {
                out.entry(k).or_default().merge(&c);
            }
        }
        out
    }
}

/// Days since the epoch for `now_ms`.
pub fn day_of(now_ms: u64) -> u32 {
    (now_ms / 86_400_000) as u32
}

/// Finds `usageMetadata` in a piece of a Gemini answer (a whole body or a stream event) and
/// reads its token counts. Gemini sends cumulative counts, so the last one seen is the answer's.
pub fn tokens_in(bytes: &[u8]) -> Option<Tokens> {
    /// Only the counts: every other field is skipped unread.
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Counts {
        #[serde(default)]
        prompt_token_count: u64,
        #[serde(default)]
        candidates_token_count: u64,
        #[serde(default)]
        thoughts_token_count: u64,
    }
    // Built once: building a searcher costs more than searching a short answer.
    static USAGE: LazyLock<FinderRev<'static>> =
        LazyLock::new(|| FinderRev::new(b"\"usageMetadata\""));
    let at = USAGE.rfind(bytes)?;
    let rest = &bytes[at + b"\"usageMetadata\"".len()..];
    let colon = memchr::memchr(b':', rest)?;
    let mut values = serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<Counts>();
    let counts = values.next()?.ok()?;
    Some(Tokens {
        prompt: counts.prompt_token_count,
        output: counts.candidates_token_count,
        thoughts: counts.thoughts_token_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_from_the_last_usage_metadata() {
        let chunk = br#"data: {"candidates":[],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":5,"thoughtsTokenCount":2,"totalTokenCount":10}}

"#;
        assert_eq!(
            tokens_in(chunk),
            Some(Tokens {
                prompt: 3,
                output: 5,
                thoughts: 2
            })
        );
        assert_eq!(tokens_in(b"data: {\"candidates\":[]}"), None);
    }

    #[test]
    fn events_add_up_per_key_model_and_day() {
        let u = Usage::default();
        for failure in [None, None, Some("rate_limited")] {
            u.record(Event {
                key_id: "k1".into(),
                model: "m".into(),
                day: 7,
                failure,
                tokens: Tokens {
                    prompt: 1,
                    output: 2,
                    thoughts: 0,
                },
            });
        }
        let counts = u.drain();
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

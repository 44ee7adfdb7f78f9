//! Usage per key × model × day: requests, successes, failures by class, and prompt, output and
//! thought tokens (from `usageMetadata`, in streams too).
//!
//! The request path adds each event to in-memory counts at once (a short lock on its worker
//! thread's shard, never a queue that could fill); the store's flusher takes the counts and adds
//! them to redb once a second. Memory is bounded by the keys × models × days seen since.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

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

/// Days since the epoch for `now_ms`.
pub fn day_of(now_ms: u64) -> u32 {
    (now_ms / 86_400_000) as u32
}

/// Finds `usageMetadata` in a piece of a Gemini answer (a whole body or a stream event) and
/// reads its token counts. Gemini sends cumulative counts, so the last one seen is the answer's.
///
/// NOTE: this runs on every answer, so the object is scanned in place rather than parsed: a
/// serde parse, skipping the fields it does not want, cost 2% of the request path.
pub fn tokens_in(bytes: &[u8]) -> Option<Tokens> {
    const NAME: &[u8] = b"\"usageMetadata\"";
    // The name's `M`, found from the end by memrchr: it is rare in an answer, and the counts
    // come last, so this reads a few bytes where a substring searcher hashed the whole answer.
    const M: usize = 6;
    let mut end = bytes.len();
    while let Some(m) = memchr::memrchr(b'M', &bytes[..end]) {
        if m >= M && bytes[m - M..].starts_with(NAME) {
            return counts_of(&bytes[m - M + NAME.len()..]);
        }
        end = m;
    }
    None
}

/// The counts of the object after `: ` at the start of `bytes`; `None` unless it is a whole
/// object whose counts are whole numbers.
fn counts_of(bytes: &[u8]) -> Option<Tokens> {
    let ws = |mut i: usize| {
        while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let mut i = ws(0);
    if bytes.get(i) != Some(&b':') {
        return None;
    }
    i = ws(i + 1);
    if bytes.get(i) != Some(&b'{') {
        return None;
    }
    let mut tokens = Tokens::default();
    let mut depth = 0usize;
    // At depth 1, whether the next string is a member's name.
    let mut name_next = false;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => {
                let start = i + 1;
                let end = start + string_len(&bytes[start..])?;
                i = end + 1;
                if depth == 1 && name_next {
                    name_next = false;
                    let count = match &bytes[start..end] {
                        b"promptTokenCount" => &mut tokens.prompt,
                        b"candidatesTokenCount" => &mut tokens.output,
                        b"thoughtsTokenCount" => &mut tokens.thoughts,
                        _ => continue,
                    };
                    i = ws(i);
                    if bytes.get(i) != Some(&b':') {
                        return None;
                    }
                    i = ws(i + 1);
                    let digits = bytes[i..].iter().take_while(|b| b.is_ascii_digit()).count();
                    *count = std::str::from_utf8(&bytes[i..i + digits])
                        .ok()?
                        .parse()
                        .ok()?;
                    i += digits;
                }
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                name_next = depth == 1;
            }
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(tokens);
                }
            }
            b',' => name_next = depth == 1,
            _ => {}
        }
        i += 1;
    }
    None
}

/// The length of the JSON string whose opening quote precedes `bytes`, up to its closing quote.
fn string_len(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        match *bytes.get(i)? {
            b'"' => return Some(i),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
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

    /// What a full JSON parse of the last `usageMetadata` object reads.
    fn parsed(bytes: &[u8]) -> Option<Tokens> {
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
        let at = memchr::memmem::rfind(bytes, b"\"usageMetadata\"")?;
        let rest = &bytes[at + b"\"usageMetadata\"".len()..];
        let colon = memchr::memchr(b':', rest)?;
        let mut values =
            serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<Counts>();
        let c = values.next()?.ok()?;
        Some(Tokens {
            prompt: c.prompt_token_count,
            output: c.candidates_token_count,
            thoughts: c.thoughts_token_count,
        })
    }

    #[test]
    fn the_scan_reads_what_a_json_parse_reads() {
        let cases: &[&str] = &[
            r#"{"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":5,"totalTokenCount":8}}"#,
            r#"{"usageMetadata" : { "promptTokenCount" : 12 , "thoughtsTokenCount":4,
                "promptTokensDetails":[{"modality":"TEXT","tokenCount":12}],
                "candidatesTokensDetails":[{"modality":"TEXT","promptTokenCount":99}],
                "note":"a \"promptTokenCount\": 7, } ] {","candidatesTokenCount":6}}"#,
            r#"{"usageMetadata":{"toolUsePromptTokenCount":9,"promptTokenCount":1}}"#,
            r#"{"usageMetadata":{}}"#,
            r#"{"usageMetadata":{"promptTokenCount":null}}"#,
            r#"{"usageMetadata":{"promptTokenCount":"3"}}"#,
            r#"{"usageMetadata":{"promptTokenCount":-3}}"#,
            r#"{"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":"#,
            r#"{"usageMetadata":{"promptTokenCount":3"#,
            r#"{"usageMetadata":7}"#,
            r#"{"usageMetadata""#,
            r#"data: {"usageMetadata":{"promptTokenCount":1}}

data: {"usageMetadata":{"promptTokenCount":2,"candidatesTokenCount":18446744073709551615}}"#,
            r#"{"usageMetadata":{"candidatesTokenCount":18446744073709551616}}"#,
            // Other `M`s, before and after the name, and one too near the start to be it.
            r#"M{"text":"Mm usageMetadataM","usageMetadata":{"promptTokenCount":4},"x":"MMusage M"}"#,
            r#""usageMetadata":{"promptTokenCount":5}"#,
            "M",
        ];
        for case in cases {
            assert_eq!(
                tokens_in(case.as_bytes()),
                parsed(case.as_bytes()),
                "{case}"
            );
        }
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

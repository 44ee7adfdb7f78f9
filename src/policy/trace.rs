//! What the plugins did for one request, and what each hook costs.
//!
//! A [`Trace`] is kept only for a request that asked for one with the admin token
//! (`x-gemgate-trace: 1`, `x-gemgate-admin`), for a dry run and for a plugin test: each hook
//! that ran, what it returned and how long it took, the keys considered and why each was
//! passed over. [`HookTiming`] is kept for every hook call, traced or not: a histogram of its
//! durations, for `gemgate_plugin_duration_seconds` and the plugins page's percentiles.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlua::Value;
use serde::Serialize;

/// Upper bounds of the plugin duration histogram's buckets, in seconds: 2 µs … 50 ms (a hook
/// call's time limit defaults to 50 ms).
pub const BUCKETS: [f64; 14] = [
    2e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
];

/// The durations of one plugin's one hook, since the start.
#[derive(Debug, Default)]
pub struct HookTiming(crate::metrics::Buckets<{ BUCKETS.len() + 1 }>);

impl HookTiming {
    pub fn observe(&self, d: Duration) {
        self.0.observe(&BUCKETS, d);
    }

    /// Calls per bucket (the last is `+Inf`), and the sum of their durations in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        self.0.snapshot()
    }

    /// The `q` quantile (0 < q < 1) in seconds, by linear interpolation within its bucket
    /// (`None` before the first call). Past the last bound it says the last bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let (counts, _) = self.snapshot();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut below = 0u64;
        for (i, &n) in counts.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(&upper) = BUCKETS.get(i) else {
                    return BUCKETS.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
                let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                return Some(lower + (upper - lower) * within);
            }
            below += n;
        }
        BUCKETS.last().copied()
    }
}

/// Every hook's timing, by (plugin, hook); kept across reloads. A VM takes the `Arc` of each
/// of its hooks when it is built, so a call only adds to atomics.
#[derive(Debug, Default)]
pub struct Timings {
    by_hook: Mutex<BTreeMap<(String, &'static str), Arc<HookTiming>>>,
}

/// At most this many (plugin, hook) pairs are timed: plugins come and go with reloads.
const TIMED_MAX: usize = 1024;

impl Timings {
    /// The timing of `hook` of `plugin` (a shared one past [`TIMED_MAX`] pairs).
    pub fn of(&self, plugin: &str, hook: &'static str) -> Arc<HookTiming> {
        let mut by_hook = self.by_hook.lock().unwrap_or_else(|e| e.into_inner());
        let key = if by_hook.len() >= TIMED_MAX && !by_hook.contains_key(&(plugin.into(), hook)) {
            ("other".to_owned(), "other")
        } else {
            (plugin.to_owned(), hook)
        };
        by_hook.entry(key).or_default().clone()
    }

    /// `(plugin, hook, timing)`, in name order.
    pub fn snapshot(&self) -> Vec<(String, &'static str, Arc<HookTiming>)> {
        let by_hook = self.by_hook.lock().unwrap_or_else(|e| e.into_inner());
        by_hook
            .iter()
            .map(|((p, h), t)| (p.clone(), *h, t.clone()))
            .collect()
    }
}

/// One hook call of a traced request.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Step {
    pub plugin: String,
    pub hook: &'static str,
    /// What it returned, in short: `nil`, `deny 403: …`, `rewrite model=…`, a key id, `error: …`.
    pub result: String,
    pub us: u64,
}

/// A key the choice looked at, and what became of it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeyNote {
    pub id: String,
    /// `chosen`, `usable`, or why it was passed over (`disabled`, `cooling …`, `tried`, …).
    pub why: String,
}

/// What the plugins did for one request.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Trace {
    pub steps: Vec<Step>,
    /// The keys of the last choice, in the order they were looked at.
    pub keys: Vec<KeyNote>,
    /// How many keys the last choice had past those listed in `keys`.
    #[serde(skip_serializing_if = "is_zero")]
    pub more_keys: usize,
    /// The key chosen last, and who chose it (`built-in` or the plugin).
    pub key: Option<String>,
    pub chosen_by: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Steps kept at most per trace (a stream's `on_response` and retries add some).
const STEPS_MAX: usize = 64;
/// Keys listed at most per choice.
pub const KEYS_MAX: usize = 32;
/// Longest result kept per step, and reason per key.
const RESULT_MAX: usize = 160;
/// Longest `x-gemgate-trace` header value.
const HEADER_MAX: usize = 2048;

impl Trace {
    pub fn step(&mut self, plugin: &str, hook: &'static str, result: String, took: Duration) {
        if self.steps.len() < STEPS_MAX {
            self.steps.push(Step {
                plugin: plugin.to_owned(),
                hook,
                result: clip(result, RESULT_MAX),
                us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            });
        }
    }

    /// Notes the keys of a choice (replacing an earlier attempt's) and the key chosen.
    pub fn choice(&mut self, mut keys: Vec<KeyNote>, more: usize, key: Option<&str>, by: &str) {
        keys.truncate(KEYS_MAX);
        for k in &mut keys {
            // A reason may be a plugin's own words (`gemgate.disable(reason)`).
            k.why = clip(std::mem::take(&mut k.why), RESULT_MAX);
        }
        self.keys = keys;
        self.more_keys = more;
        self.key = key.map(str::to_owned);
        self.chosen_by = key.map(|_| by.to_owned());
    }

    /// The trace on one line, for the `x-gemgate-trace` header: `plugin.hook=result(µs)`
    /// steps, then `key=…` and the keys passed over, `;`-separated; only visible ASCII and
    /// spaces, and at most [`HEADER_MAX`] bytes.
    pub fn header(&self) -> String {
        let mut out = String::new();
        for s in &self.steps {
            let _ = write!(out, "{}.{}={}({}us); ", s.plugin, s.hook, s.result, s.us);
        }
        if let Some(key) = &self.key {
            let by = self.chosen_by.as_deref().unwrap_or("built-in");
            let _ = write!(out, "key={key} by {by}; ");
        }
        let skipped: Vec<String> = self
            .keys
            .iter()
            .filter(|k| k.why != "chosen" && k.why != "usable")
            .map(|k| format!("{} {}", k.id, k.why))
            .collect();
        if !skipped.is_empty() {
            let _ = write!(out, "skipped: {}; ", skipped.join(", "));
        }
        let out: String = out
            .trim_end_matches([';', ' '])
            .chars()
            .map(|c| {
                if c == ' ' || c.is_ascii_graphic() {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        clip(out, HEADER_MAX)
    }
}

/// The keys of `pool` a choice for `model` looked at (the first [`KEYS_MAX`]), each with why it
/// was passed over, or `chosen` / `usable`; and how many more there were.
pub fn key_notes(
    pool: &crate::keys::KeyPool,
    model: &str,
    tried: &[usize],
    tokens: u64,
    now_ms: u64,
    chosen: Option<usize>,
) -> (Vec<KeyNote>, usize) {
    let n = pool.keys().len();
    let notes = (0..n.min(KEYS_MAX))
        .map(|i| KeyNote {
            id: pool.get(i).spec.id.clone(),
            why: if chosen == Some(i) {
                "chosen".into()
            } else {
                pool.passed_over(i, model, tried, tokens, now_ms)
                    .unwrap_or_else(|| "usable".into())
            },
        })
        .collect();
    (notes, n.saturating_sub(KEYS_MAX))
}

/// `s` cut to at most `max` bytes, on a character boundary, with `…` when cut.
fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max.saturating_sub(3);
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push_str("...");
    }
    s
}

/// A hook's return value, in short, for a trace step.
pub fn summarize(value: &Value) -> String {
    match value {
        Value::Nil => "nil".into(),
        Value::String(s) => format!("{:?}", s.to_string_lossy()),
        Value::Table(t) => {
            let field = |k: &str| -> String {
                match t.raw_get::<Value>(k) {
                    Ok(Value::String(s)) => s.to_string_lossy(),
                    Ok(Value::Integer(n)) => n.to_string(),
                    Ok(Value::Number(n)) => n.to_string(),
                    _ => String::new(),
                }
            };
            match field("decision").as_str() {
                "deny" => format!("deny {}: {}", field("status"), field("message")),
                "rewrite" => {
                    let mut parts = vec!["rewrite".to_owned()];
                    if let Ok(Value::String(m)) = t.raw_get::<Value>("model") {
                        parts.push(format!("model={}", m.to_string_lossy()));
                    }
                    for k in [
                        "headers",
                        "generation_config",
                        "generation_config_defaults",
                        "tools",
                    ] {
                        if !matches!(t.raw_get::<Value>(k), Ok(Value::Nil) | Err(_)) {
                            parts.push(k.to_owned());
                        }
                    }
                    parts.join(" ")
                }
                "cool" => format!("cool {}s", field("seconds")),
                "disable" => format!("disable: {}", field("reason")),
                "" => format!("list of {}", t.raw_len()),
                other => other.to_owned(),
            }
        }
        other => other.type_name().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let t = HookTiming::default();
        assert_eq!(t.quantile(0.5), None);
        for _ in 0..99 {
            t.observe(Duration::from_micros(3)); // 2..5 µs
        }
        t.observe(Duration::from_millis(3)); // 2.5..5 ms
        let p50 = t.quantile(0.5).unwrap();
        assert!((2e-6..=5e-6).contains(&p50), "{p50}");
        let p99 = t.quantile(0.99).unwrap();
        assert!(p99 <= 5e-6, "{p99}");
        let p999 = t.quantile(0.999).unwrap();
        assert!((2.5e-3..=5e-3).contains(&p999), "{p999}");
        t.observe(Duration::from_secs(2));
        assert_eq!(t.quantile(1.0), Some(5e-2), "past the last bound");
        let (counts, sum) = t.snapshot();
        assert_eq!(counts.iter().sum::<u64>(), 101);
        assert!(sum > 2.0);
    }

    #[test]
    fn the_header_is_one_bounded_line_of_ascii() {
        let mut t = Trace::default();
        t.step(
            "model_alias",
            "on_request",
            "rewrite model=gemini-2.5-flash".into(),
            Duration::from_micros(12),
        );
        t.step(
            "evil",
            "on_request",
            "deny 403: é\r\nx".into(),
            Duration::ZERO,
        );
        t.choice(
            vec![
                KeyNote {
                    id: "k1".into(),
                    why: "disabled".into(),
                },
                KeyNote {
                    id: "k2".into(),
                    why: "chosen".into(),
                },
            ],
            0,
            Some("k2"),
            "round_robin",
        );
        let h = t.header();
        assert_eq!(
            h,
            "model_alias.on_request=rewrite model=gemini-2.5-flash(12us); \
             evil.on_request=deny 403: ???x(0us); key=k2 by round_robin; skipped: k1 disabled"
        );
        assert!(http::HeaderValue::from_str(&h).is_ok());
        for i in 0..200 {
            t.step("p", "on_log", "x".repeat(500), Duration::ZERO);
            assert!(t.steps.len() <= STEPS_MAX, "{i}");
        }
        assert!(t.steps.iter().all(|s| s.result.len() <= RESULT_MAX));
        assert!(t.header().len() <= HEADER_MAX);
    }

    #[test]
    fn timings_are_bounded_in_number() {
        let timings = Timings::default();
        for i in 0..TIMED_MAX + 10 {
            timings
                .of(&format!("p{i}"), "on_request")
                .observe(Duration::ZERO);
        }
        let all = timings.snapshot();
        assert_eq!(all.len(), TIMED_MAX + 1);
        assert!(all.iter().any(|(p, h, _)| p == "other" && *h == "other"));
    }
}

//! Prometheus metrics (`GET /metrics`): what the request path counts, and the exposition in the
//! Prometheus text format 0.0.4 or OpenMetrics 1.0.
//!
//! Counting is cheap: counts live in shards by worker thread (a short lock on the thread's own
//! shard, keys of interned `&'static str` labels, no allocation once a label set was seen), and
//! histograms are arrays of atomics. Figures kept elsewhere (the pool by state, refusals,
//! plugin failures, the fleet's link) are read at scrape time and handed in as a [`Scrape`].
//!
//! Label values are bounded: `model` is a known model family's id or `other` (and at most
//! [`MAX_MODELS`] ids), `key` a key id from the config (never the secret), `route` and `class`
//! fixed names. No client-chosen string becomes a label.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use crate::shard::Sharded;

/// Distinct `model` label values at most; past it, `other`.
pub const MAX_MODELS: usize = 256;
/// Distinct `key` label values at most; past it, `other`.
const MAX_KEYS: usize = 100_000;

/// Upper bounds of the latency histograms' buckets, in seconds: 1 ms … 300 s.
const BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// The API a request came through (the `route` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Route {
    Gemini,
    OpenAi,
    OpenAiPassthrough,
    /// Anthropic's Messages API.
    Anthropic,
    Files,
    /// The Interactions API.
    Interactions,
    /// The Batch API (batch jobs and their results).
    Batch,
    /// The Live API (sessions and ephemeral tokens).
    Live,
    Admin,
    Other,
}

impl Route {
    const ALL: [Route; 10] = [
        Route::Gemini,
        Route::OpenAi,
        Route::OpenAiPassthrough,
        Route::Anthropic,
        Route::Files,
        Route::Interactions,
        Route::Batch,
        Route::Live,
        Route::Admin,
        Route::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Gemini => "gemini",
            Route::OpenAi => "openai",
            Route::OpenAiPassthrough => "openai_passthrough",
            Route::Anthropic => "anthropic",
            Route::Files => "files",
            Route::Interactions => "interactions",
            Route::Batch => "batch",
            Route::Live => "live",
            Route::Admin => "admin",
            Route::Other => "other",
        }
    }
}

/// A histogram's counts: observations by bucket of some bounds (`N` is their number and one,
/// the last bucket being `+Inf`), and their sum. Counted in shards by worker thread, each on
/// cache lines of its own: every request observes two or three, and workers sharing one
/// histogram's counters passed their cache lines to and fro on each.
#[derive(Debug)]
pub struct Buckets<const N: usize> {
    shards: Sharded<BucketShard<N>>,
}

#[derive(Debug)]
struct BucketShard<const N: usize> {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    counts: [AtomicU64; N],
    sum_nanos: AtomicU64,
}

impl<const N: usize> Default for Buckets<N> {
    fn default() -> Self {
        Buckets {
            shards: Sharded::new(|| BucketShard {
                counts: std::array::from_fn(|_| AtomicU64::new(0)),
                sum_nanos: AtomicU64::new(0),
            }),
        }
    }
}

impl<const N: usize> Buckets<N> {
    /// Counts `d` in the first bucket of `bounds` (seconds, `N - 1` of them) it is within.
    pub fn observe(&self, bounds: &[f64], d: Duration) {
        let s = d.as_secs_f64();
        let i = bounds.iter().position(|b| s <= *b).unwrap_or(N - 1);
        let shard = self.shards.mine();
        shard.counts[i.min(N - 1)].fetch_add(1, Relaxed);
        shard
            .sum_nanos
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Observations per bucket (the last is `+Inf`), and their sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut counts = vec![0; N];
        let mut nanos = 0u64;
        for shard in self.shards.iter() {
            for (c, n) in counts.iter_mut().zip(&shard.counts) {
                *c += n.load(Relaxed);
            }
            nanos = nanos.saturating_add(shard.sum_nanos.load(Relaxed));
        }
        (counts, nanos as f64 / 1e9)
    }
}

/// A latency histogram of the requests (`BUCKETS`).
#[derive(Debug, Default)]
struct Histogram(Buckets<{ BUCKETS.len() + 1 }>);

impl Histogram {
    fn observe(&self, d: Duration) {
        self.0.observe(&BUCKETS, d);
    }

    fn snapshot(&self) -> (Vec<u64>, f64) {
        self.0.snapshot()
    }
}

/// The request path's maps, keyed by interned labels and key ids: foldhash (seeded) rather than
/// SipHash. Counting an attempt here and in the usage counts took 213 ns with 1,000 keys and
/// 709 with 100,000; 137 and 542 with foldhash in both (`accounting_cost`, below).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Counts kept by one shard.
#[derive(Debug, Default)]
struct Shard {
    /// (route, model, status code) → requests.
    requests: Map<(Route, &'static str, u16), u64>,
    /// (key, model, class) → upstream attempts.
    attempts: Map<(&'static str, &'static str, &'static str), u64>,
    /// model → prompt, output, thought, cached tokens.
    tokens: Map<&'static str, [u64; 4]>,
}

/// Label values seen, interned: a label set is a tuple of `&'static str` (bounded, so the
/// leak is too).
#[derive(Debug)]
struct Interned {
    models: Labels,
    keys: Labels,
}

impl Default for Interned {
    fn default() -> Self {
        Interned {
            models: Labels::new(MAX_MODELS),
            keys: Labels::new(MAX_KEYS),
        }
    }
}

/// One label's interned values: every one in `all`, and in `near` each shard's first ones,
/// which its thread reads without touching what the other threads share: two workers taking
/// a read lock of `all` for each attempt passed its cache line to and fro (counting an attempt
/// with 10 keys, `accounting_cost`: 423 ns on each of two threads at once, 217 with `near`).
#[derive(Debug)]
struct Labels {
    all: RwLock<Map<Box<str>, &'static str>>,
    max: usize,
    near: Sharded<Mutex<std::collections::HashSet<&'static str, foldhash::fast::RandomState>>>,
}

/// Values a shard keeps near at most, the first it interns (the models a request names; a
/// key's label is interned once and kept with the key: [`Metrics::key_label`]). Others are
/// found in `all` (emptying a full `near` to fill it again would cost an allocation each).
const NEAR: usize = 1024;

impl Labels {
    fn new(max: usize) -> Labels {
        Labels {
            all: RwLock::default(),
            max,
            near: Sharded::default(),
        }
    }

    /// `s` interned, or `other` once `max` values are.
    fn intern(&self, s: &str) -> &'static str {
        let mut near = self.near.mine().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = near.get(s) {
            return v;
        }
        let Some(v) = self.intern_all(s) else {
            return "other";
        };
        if near.len() < NEAR {
            near.insert(v);
        }
        v
    }

    /// `s` interned in `all`; `None` once `max` values are.
    fn intern_all(&self, s: &str) -> Option<&'static str> {
        if let Some(v) = self.all.read().unwrap_or_else(|e| e.into_inner()).get(s) {
            return Some(v);
        }
        let mut all = self.all.write().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = all.get(s) {
            return Some(v);
        }
        if all.len() >= self.max {
            return None;
        }
        let leaked: &'static str = Box::leak(s.into());
        all.insert(s.into(), leaked);
        Some(leaked)
    }
}

/// Whether `model` is the id of a model family Google serves (the `model` label's values).
fn known_model(model: &str) -> bool {
    const FAMILIES: &[&str] = &[
        "gemini-",
        "gemma-",
        "imagen-",
        "veo-",
        "text-embedding-",
        "embedding-",
        "learnlm-",
        "lyria-",
        "aqa",
    ];
    model.len() <= 64
        && model
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && FAMILIES.iter().any(|f| model.starts_with(f))
}

/// The metrics the request path counts.
#[derive(Debug, Default)]
pub struct Metrics {
    shards: Sharded<Mutex<Shard>>,
    duration: [Histogram; Route::ALL.len()],
    ttfb: [Histogram; Route::ALL.len()],
    upstream: Histogram,
    retries: AtomicU64,
    /// Requests refused by a declared limit.
    limited: AtomicU64,
    /// Requests refused because every project was at a quota limit or cooling.
    quota: AtomicU64,
    /// Requests refused during a storm.
    storm: AtomicU64,
    /// (scope, reason) → cooldowns.
    cooldowns: Mutex<Map<(&'static str, &'static str), u64>>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    interned: Interned,
}

/// One finished request, as counted.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub route: Route,
    pub model: &'a str,
    pub status: u16,
    pub duration: Duration,
    pub ttfb: Option<Duration>,
}

/// One upstream attempt, as counted.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// The key's label, from [`Metrics::key_label`]; `None` when key labels are off.
    pub key: Option<&'static str>,
    pub model: &'a str,
    /// `ok`, or the error class.
    pub class: &'static str,
    pub duration: Duration,
    /// Prompt, output, thought and cached tokens of a success.
    pub tokens: [u64; 4],
}

/// One plugin hook's call durations: calls per bucket (not cumulative; the last is `+Inf`) of
/// `bounds`, in seconds, and their sum.
#[derive(Debug, Default)]
pub struct HookDurations {
    pub plugin: String,
    pub hook: &'static str,
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum_s: f64,
}

/// Figures read at scrape time from where they are kept.
#[derive(Debug, Default)]
pub struct Scrape {
    /// Keys active, cooling, disabled.
    pub keys: [usize; 3],
    pub connections: usize,
    /// (reason, count): requests refused before they were a client's.
    pub rejected: Vec<(&'static str, u64)>,
    pub log_records_dropped: u64,
    /// (plugin, hook, failures).
    pub plugin_errors: Vec<(String, String, u64)>,
    /// Each plugin hook's call durations.
    pub plugin_durations: Vec<HookDurations>,
    /// `Some(up)` in a fleet.
    pub cluster_up: Option<bool>,
    /// Whether a storm is on, and how many began.
    pub storm: (bool, u64),
}

impl Metrics {
    fn model_label(&self, model: &str) -> &'static str {
        let bare = crate::config::model_name(model);
        if bare.is_empty() {
            return "none";
        }
        if !known_model(bare) {
            return "other";
        }
        self.interned.models.intern(bare)
    }

    fn shard(&self) -> std::sync::MutexGuard<'_, Shard> {
        self.shards.mine().lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a finished request.
    pub fn request(&self, r: Request<'_>) {
        let model = self.model_label(r.model);
        *self
            .shard()
            .requests
            .entry((r.route, model, r.status))
            .or_default() += 1;
        let i = r.route as usize;
        self.duration[i].observe(r.duration);
        if let Some(t) = r.ttfb {
            self.ttfb[i].observe(t);
        }
    }

    /// Key `id`'s `key` label: interned, or `other` once [`MAX_KEYS`] are. A caller keeps it
    /// with the key (`KeyState::metric_label`) rather than look it up for each attempt.
    pub fn key_label(&self, id: &str) -> &'static str {
        self.interned.keys.intern_all(id).unwrap_or("other")
    }

    /// Counts an upstream attempt (and the tokens of a success).
    pub fn attempt(&self, a: Attempt<'_>) {
        let model = self.model_label(a.model);
        let key = a.key.unwrap_or_default();
        {
            let mut shard = self.shard();
            *shard.attempts.entry((key, model, a.class)).or_default() += 1;
            if a.tokens != [0; 4] {
                let t = shard.tokens.entry(model).or_default();
                for (sum, n) in t.iter_mut().zip(a.tokens) {
                    *sum = sum.saturating_add(n);
                }
            }
        }
        self.upstream.observe(a.duration);
    }

    /// Counts a request refused by a declared limit.
    pub fn limited(&self) {
        self.limited.fetch_add(1, Relaxed);
    }

    /// Counts a request refused because no project had room (its quota limits, cooldowns).
    pub fn quota_refused(&self) {
        self.quota.fetch_add(1, Relaxed);
    }

    /// Counts a request refused during a storm.
    pub fn storm_refused(&self) {
        self.storm.fetch_add(1, Relaxed);
    }

    /// Counts a retry on another key.
    pub fn retry(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    /// Counts a cooldown of `scope` for `reason`.
    pub fn cooldown(&self, scope: &'static str, reason: &'static str) {
        *self
            .cooldowns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((scope, reason))
            .or_default() += 1;
    }

    /// Counts a reload.
    pub fn reload(&self, ok: bool) {
        let counter = if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        };
        counter.fetch_add(1, Relaxed);
    }

    /// The exposition: Prometheus text 0.0.4, or OpenMetrics 1.0 (`openmetrics`).
    pub fn render(&self, scrape: &Scrape, openmetrics: bool) -> String {
        let mut out = Exposition::new(openmetrics);
        let totals = self.totals();
        self.write_requests(&mut out, &totals);
        self.write_upstream(&mut out, &totals);
        self.write_state(&mut out, scrape);
        out.finish()
    }

    /// Every shard's counts added up.
    fn totals(&self) -> Shard {
        let mut all = Shard::default();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (k, n) in &shard.requests {
                *all.requests.entry(*k).or_default() += n;
            }
            for (k, n) in &shard.attempts {
                *all.attempts.entry(*k).or_default() += n;
            }
            for (m, t) in &shard.tokens {
                let sum = all.tokens.entry(m).or_default();
                for (s, n) in sum.iter_mut().zip(t) {
                    *s += n;
                }
            }
        }
        all
    }

    /// Requests, and their latency and time to first byte.
    fn write_requests(&self, out: &mut Exposition, totals: &Shard) {
        out.family(
            "gemgate_requests",
            "counter",
            "Requests answered, by route, model and status.",
        );
        for ((route, model, code), n) in sorted(&totals.requests) {
            let code = code.to_string();
            let labels = [("route", route.as_str()), ("model", model), ("code", &code)];
            out.sample("_total", &labels, n as f64);
        }
        for (name, help, hists) in [
            (
                "gemgate_request_duration_seconds",
                "Time from a request's arrival to its answer's end.",
                &self.duration,
            ),
            (
                "gemgate_time_to_first_byte_seconds",
                "Time from a request's arrival to its answer's first byte.",
                &self.ttfb,
            ),
        ] {
            out.family(name, "histogram", help);
            for route in Route::ALL {
                out.histogram(&[("route", route.as_str())], &hists[route as usize]);
            }
        }
    }

    /// Attempts at Google, their duration, tokens, retries and cooldowns.
    fn write_upstream(&self, out: &mut Exposition, totals: &Shard) {
        out.family(
            "gemgate_upstream_attempts",
            "counter",
            "Attempts sent to Google, by key, model and outcome.",
        );
        for ((key, model, class), n) in sorted(&totals.attempts) {
            let labels = [("key", key), ("model", model), ("class", class)];
            // Without key labels, the key is "".
            let labels = if key.is_empty() {
                &labels[1..]
            } else {
                &labels[..]
            };
            out.sample("_total", labels, n as f64);
        }
        out.family(
            "gemgate_upstream_duration_seconds",
            "histogram",
            "Time of one attempt at Google.",
        );
        out.histogram(&[], &self.upstream);
        out.family(
            "gemgate_tokens",
            "counter",
            "Tokens Google reported, by model and kind.",
        );
        for (model, t) in sorted(&totals.tokens) {
            for (kind, n) in ["prompt", "output", "thoughts", "cached"].iter().zip(t) {
                out.sample("_total", &[("model", model), ("kind", kind)], n as f64);
            }
        }
        out.counter(
            "gemgate_retries",
            "Attempts retried on another key.",
            &self.retries,
        );
        out.family(
            "gemgate_cooldowns",
            "counter",
            "Cooldowns started, by scope and reason.",
        );
        let cooldowns = self.cooldowns.lock().unwrap_or_else(|e| e.into_inner());
        for ((scope, reason), n) in sorted(&cooldowns) {
            out.sample("_total", &[("scope", scope), ("reason", reason)], n as f64);
        }
    }

    /// The pool, refusals, plugins, reloads, logs, connections, the build and the fleet.
    fn write_state(&self, out: &mut Exposition, scrape: &Scrape) {
        out.family("gemgate_keys", "gauge", "Keys of the pool, by state.");
        for (state, n) in ["active", "cooling", "disabled"].iter().zip(scrape.keys) {
            out.sample("", &[("state", state)], n as f64);
        }
        out.family(
            "gemgate_rejected_requests",
            "counter",
            "Requests refused: before they were a client's, over a declared limit (limited), with every project at its quota or cooling (quota), or during a storm (storm).",
        );
        let ours = [
            ("limited", self.limited.load(Relaxed)),
            ("quota", self.quota.load(Relaxed)),
            ("storm", self.storm.load(Relaxed)),
        ];
        for (reason, n) in scrape.rejected.iter().chain(&ours) {
            out.sample("_total", &[("reason", reason)], *n as f64);
        }
        out.family(
            "gemgate_storm_active",
            "gauge",
            "1 while Google throttles this instance's address (bare 429s from several projects).",
        );
        out.sample("", &[], if scrape.storm.0 { 1.0 } else { 0.0 });
        out.family("gemgate_storms", "counter", "Storms since the start.");
        out.sample("_total", &[], scrape.storm.1 as f64);
        out.family(
            "gemgate_plugin_errors",
            "counter",
            "Plugin hook failures, by plugin and hook.",
        );
        for (plugin, hook, n) in &scrape.plugin_errors {
            out.sample("_total", &[("plugin", plugin), ("hook", hook)], *n as f64);
        }
        out.family(
            "gemgate_plugin_duration_seconds",
            "histogram",
            "Time of one plugin hook call, by plugin and hook.",
        );
        for d in &scrape.plugin_durations {
            let labels = [("plugin", d.plugin.as_str()), ("hook", d.hook)];
            out.buckets(&labels, d.bounds, &d.counts, d.sum_s);
        }
        out.family("gemgate_reloads", "counter", "Reloads, by result.");
        for (result, n) in [("ok", &self.reloads_ok), ("error", &self.reloads_failed)] {
            out.sample("_total", &[("result", result)], n.load(Relaxed) as f64);
        }
        out.family(
            "gemgate_log_records_dropped",
            "counter",
            "Log records dropped (queue full or data file at its limit).",
        );
        out.sample("_total", &[], scrape.log_records_dropped as f64);
        out.family(
            "gemgate_connections",
            "gauge",
            "Client connections open now.",
        );
        out.sample("", &[], scrape.connections as f64);
        out.family(
            "gemgate_build_info",
            "gauge",
            "Always 1: the version serving.",
        );
        out.sample("", &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
        if let Some(up) = scrape.cluster_up {
            out.family(
                "gemgate_cluster_up",
                "gauge",
                "1 while the fleet's Redis answers in time.",
            );
            out.sample("", &[], if up { 1.0 } else { 0.0 });
        }
    }
}

/// A map's entries in label order (a stable exposition).
fn sorted<K: Ord + Copy, V: Copy>(map: &Map<K, V>) -> Vec<(K, V)> {
    let mut rows: Vec<(K, V)> = map.iter().map(|(k, v)| (*k, *v)).collect();
    rows.sort_by_key(|row| row.0);
    rows
}

/// Writes one exposition: families, each with its samples.
struct Exposition {
    out: String,
    openmetrics: bool,
    /// The family being written.
    name: &'static str,
}

impl Exposition {
    fn new(openmetrics: bool) -> Exposition {
        Exposition {
            out: String::with_capacity(16 * 1024),
            openmetrics,
            name: "",
        }
    }

    fn family(&mut self, name: &'static str, kind: &'static str, help: &str) {
        self.name = name;
        // Prometheus 0.0.4 names a counter's family by its samples' name (with `_total`);
        // OpenMetrics by the name without it.
        let shown = if kind == "counter" && !self.openmetrics {
            format!("{name}_total")
        } else {
            name.to_owned()
        };
        let _ = writeln!(self.out, "# HELP {shown} {help}");
        let _ = writeln!(self.out, "# TYPE {shown} {kind}");
    }

    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(self.name);
        self.out.push_str(suffix);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family of one unlabelled counter.
    fn counter(&mut self, name: &'static str, help: &str, value: &AtomicU64) {
        self.family(name, "counter", help);
        self.sample("_total", &[], value.load(Relaxed) as f64);
    }

    fn histogram(&mut self, labels: &[(&str, &str)], h: &Histogram) {
        let (counts, sum) = h.snapshot();
        self.buckets(labels, &BUCKETS, &counts, sum);
    }

    /// A histogram's samples from its calls per bucket of `bounds` (the last count is `+Inf`).
    fn buckets(&mut self, labels: &[(&str, &str)], bounds: &[f64], counts: &[u64], sum: f64) {
        let mut cumulative = 0;
        for (bound, n) in bounds
            .iter()
            .map(|b| b.to_string())
            .chain(["+Inf".to_owned()])
            .zip(counts)
        {
            cumulative += n;
            let mut with_le = labels.to_vec();
            with_le.push(("le", &bound));
            self.sample("_bucket", &with_le, cumulative as f64);
        }
        self.sample("_sum", labels, sum);
        self.sample("_count", labels, cumulative as f64);
    }

    fn finish(mut self) -> String {
        if self.openmetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }
}

/// The content type of [`Metrics::render`]'s output.
pub fn content_type(openmetrics: bool) -> &'static str {
    if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_in_both_formats_with_bounded_labels() {
        let m = Metrics::default();
        for model in [
            "gemini-2.5-flash",
            "models/gemini-2.5-flash",
            "x\"}\n evil",
            "",
        ] {
            m.request(Request {
                route: Route::Gemini,
                model,
                status: 200,
                duration: Duration::from_millis(30),
                ttfb: Some(Duration::from_millis(3)),
            });
        }
        m.attempt(Attempt {
            key: Some(m.key_label("k123")),
            model: "gemini-2.5-flash",
            class: "ok",
            duration: Duration::from_millis(20),
            tokens: [5, 7, 0, 0],
        });
        let text = m.render(&Scrape::default(), false);
        assert!(
            text.contains(
                r#"gemgate_requests_total{route="gemini",model="gemini-2.5-flash",code="200"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"gemgate_requests_total{route="gemini",model="other",code="200"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"model="none""#));
        assert!(!text.contains("evil"));
        assert!(text.contains("# TYPE gemgate_requests_total counter"));
        assert!(
            text.contains(r#"gemgate_request_duration_seconds_bucket{route="gemini",le="0.05"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"gemgate_request_duration_seconds_bucket{route="gemini",le="0.025"} 0"#
            )
        );
        assert!(text.contains(r#"gemgate_request_duration_seconds_count{route="gemini"} 4"#));
        assert!(text.contains(r#"gemgate_tokens_total{model="gemini-2.5-flash",kind="output"} 7"#));
        assert!(text.contains(
            r#"gemgate_upstream_attempts_total{key="k123",model="gemini-2.5-flash",class="ok"} 1"#
        ));
        assert!(!text.contains("# EOF"));
        let open = m.render(&Scrape::default(), true);
        assert!(open.contains("# TYPE gemgate_requests counter"));
        assert!(open.ends_with("# EOF\n"));
        // A client cannot grow the model label past its bound.
        for i in 0..(MAX_MODELS + 50) {
            m.request(Request {
                route: Route::Gemini,
                model: &format!("gemini-x-{i}"),
                status: 200,
                duration: Duration::ZERO,
                ttfb: None,
            });
        }
        let text = m.render(&Scrape::default(), false);
        let models: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("gemgate_requests_total{"))
            .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
            .collect();
        assert!(models.len() <= MAX_MODELS + 2, "{}", models.len());
    }

    /// What counting an attempt costs (its metrics and its usage counts) with 10, 1,000 and
    /// 100,000 keys taken in turn, each counted once before: the per-key lookups that grow
    /// with the pool; on one thread, then on two at once (as two workers do: what they share
    /// moves between their cores). Run with
    /// `cargo test --release --lib -- --ignored --nocapture accounting_cost`.
    #[test]
    #[ignore]
    fn accounting_cost() {
        use crate::store::usage::{Event, Usage};
        for n in [10, 1_000, 100_000] {
            let ids: Vec<String> = (0..n).map(|i| format!("bench-pool-{i:07}")).collect();
            let (m, usage) = (Metrics::default(), Usage::default());
            // Each key's label is interned once and kept with the key, as the request path does.
            let keys: Vec<(&str, &'static str)> = ids
                .iter()
                .map(|id| (id.as_str(), m.key_label(id)))
                .collect();
            let count = |&(id, label): &(&str, &'static str)| {
                m.attempt(Attempt {
                    key: Some(label),
                    model: "gemini-2.5-flash",
                    class: "ok",
                    duration: Duration::from_millis(20),
                    tokens: [5, 7, 0, 0],
                });
                usage.record(Event {
                    key_id: id,
                    model: "gemini-2.5-flash",
                    day: 20_000,
                    failure: None,
                    tokens: crate::translate::usage::Tokens::default(),
                });
            };
            let rounds = 1_000_000;
            let run = |first: usize| {
                let t = std::time::Instant::now();
                for r in 0..rounds {
                    count(&keys[(first + r) % n]);
                }
                t.elapsed().as_nanos() as f64 / rounds as f64
            };
            keys.iter().for_each(count);
            let alone = run(0);
            let both = std::thread::scope(|s| {
                let other = s.spawn(|| run(n / 2));
                (run(0) + other.join().unwrap()) / 2.0
            });
            println!(
                "{n:>7} keys: {alone:>5.0} ns per attempt on one thread, {both:>5.0} on each of two \
                 (metrics and usage counts)"
            );
        }
    }
}

//! The dashboard's figures: per-minute totals of the last day, fed from the request-log
//! records as the store's flusher drains them, so the request path pays nothing for them.
//!
//! Each minute keeps its request, success and token counts, errors by class, and latency and
//! time-to-first-byte histograms (log-spaced buckets, about 12% wide), from which any window's
//! percentiles are read. At start the last day is rebuilt from the request log.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::store::logs::{Record, Surface};

/// Minutes kept: one day.
const MINUTES: usize = 24 * 60;
/// Histogram buckets: bucket `i` holds values up to `FIRST_MS * GROWTH^i` ms.
const BUCKETS: usize = 160;
const FIRST_MS: f64 = 0.05;
const GROWTH: f64 = 1.12;

struct Minute {
    /// Minutes since the epoch this slot holds (slots are reused a day later).
    at: u64,
    requests: u64,
    successes: u64,
    prompt_tokens: u64,
    output_tokens: u64,
    errors: BTreeMap<String, u64>,
    /// Requests by surface, in [`Surface::ALL`]'s order.
    surfaces: [u64; Surface::ALL.len()],
    latency: [u32; BUCKETS],
    ttfb: [u32; BUCKETS],
}

impl Minute {
    fn new(at: u64) -> Minute {
        Minute {
            at,
            requests: 0,
            successes: 0,
            prompt_tokens: 0,
            output_tokens: 0,
            errors: BTreeMap::new(),
            surfaces: [0; Surface::ALL.len()],
            latency: [0; BUCKETS],
            ttfb: [0; BUCKETS],
        }
    }
}

/// The last day of traffic, minute by minute.
///
/// A minute's slot is made when the minute has its first request: a slot holds 1.4 KiB, most
/// of it histograms, and a day of them made up front was 2 MiB of a fresh gateway's memory.
pub struct Metrics {
    minutes: Mutex<Vec<Option<Box<Minute>>>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            minutes: Mutex::new(std::iter::repeat_with(|| None).take(MINUTES).collect()),
        }
    }
}

/// One point of a chart: a span of minutes.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Point {
    /// Start of the span, ms since the epoch.
    pub at_ms: u64,
    pub requests: u64,
    pub errors: u64,
    /// Median and 99th percentile latency of the span, ms (0 when it had no request).
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// A window's totals.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Summary {
    pub requests: u64,
    pub successes: u64,
    pub requests_per_minute: f64,
    /// Successes over requests, 0–100 (100 when there was no request).
    pub success_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub ttfb_p50_ms: f64,
    pub ttfb_p99_ms: f64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// Errors by class, most frequent first.
    pub errors: Vec<(String, u64)>,
    /// Requests by surface (`interactive`, `batch`, `live`), those with any.
    pub surfaces: Vec<(&'static str, u64)>,
    /// The window cut into spans for charts.
    pub points: Vec<Point>,
}

fn bucket(ms: f64) -> usize {
    if ms <= FIRST_MS {
        return 0;
    }
    (((ms / FIRST_MS).ln() / GROWTH.ln()).ceil() as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, ms.
fn bucket_ms(i: usize) -> f64 {
    FIRST_MS * GROWTH.powi(i as i32)
}

fn percentile(hist: &[u64; BUCKETS], q: f64) -> f64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in hist.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return (bucket_ms(i) * 100.0).round() / 100.0;
        }
    }
    bucket_ms(BUCKETS - 1)
}

impl Metrics {
    /// Counts records (from the log queue, or the log at start).
    pub fn add(&self, records: &[Record]) {
        let mut minutes = self.minutes.lock().unwrap_or_else(|e| e.into_inner());
        for r in records {
            let at = r.ts_ms / 60_000;
            let slot = minutes[(at % MINUTES as u64) as usize]
                .get_or_insert_with(|| Box::new(Minute::new(at)));
            if slot.at != at {
                if slot.at > at {
                    continue; // older than a day
                }
                **slot = Minute::new(at);
            }
            slot.requests += 1;
            slot.surfaces[Surface::of(&r.action, &r.model) as usize] += 1;
            if r.failed() {
                let class = r
                    .class
                    .clone()
                    .unwrap_or_else(|| format!("http_{}", r.status));
                *slot.errors.entry(class).or_default() += 1;
            } else {
                slot.successes += 1;
            }
            slot.prompt_tokens = slot.prompt_tokens.saturating_add(r.prompt_tokens);
            slot.output_tokens = slot
                .output_tokens
                .saturating_add(r.output_tokens.saturating_add(r.thought_tokens));
            slot.latency[bucket(r.latency_ms)] += 1;
            if let Some(t) = r.ttfb_ms {
                slot.ttfb[bucket(t)] += 1;
            }
        }
    }

    /// The last `minutes` minutes before `now_ms`, cut into `points` spans.
    pub fn summary(&self, now_ms: u64, minutes: u64, points: u64) -> Summary {
        let now = now_ms / 60_000;
        let first = now + 1 - minutes.min(MINUTES as u64);
        let span = (minutes / points.max(1)).max(1);
        let slots = self.minutes.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = Summary::default();
        let mut latency = [0u64; BUCKETS];
        let mut ttfb = [0u64; BUCKETS];
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        let mut surfaces = [0u64; Surface::ALL.len()];
        let mut point_hist = [0u64; BUCKETS];
        let mut point = Point::default();
        for (n, at) in (first..=now).enumerate() {
            if (n as u64).is_multiple_of(span) {
                if n > 0 {
                    s.points.push(finish_point(point, &point_hist));
                }
                point = Point {
                    at_ms: at * 60_000,
                    ..Point::default()
                };
                point_hist = [0; BUCKETS];
            }
            let m = match slots[(at % MINUTES as u64) as usize].as_deref() {
                Some(m) if m.at == at => m,
                _ => continue,
            };
            s.requests += m.requests;
            s.successes += m.successes;
            s.prompt_tokens = s.prompt_tokens.saturating_add(m.prompt_tokens);
            s.output_tokens = s.output_tokens.saturating_add(m.output_tokens);
            point.requests += m.requests;
            point.errors += m.requests - m.successes;
            for (total, n) in surfaces.iter_mut().zip(m.surfaces) {
                *total += n;
            }
            for (class, n) in &m.errors {
                *errors.entry(class.clone()).or_default() += n;
            }
            for i in 0..BUCKETS {
                latency[i] += u64::from(m.latency[i]);
                ttfb[i] += u64::from(m.ttfb[i]);
                point_hist[i] += u64::from(m.latency[i]);
            }
        }
        s.points.push(finish_point(point, &point_hist));
        s.requests_per_minute = (s.requests as f64 * 100.0 / minutes.max(1) as f64).round() / 100.0;
        s.success_rate = if s.requests == 0 {
            100.0
        } else {
            (s.successes as f64 * 1000.0 / s.requests as f64).round() / 10.0
        };
        s.p50_ms = percentile(&latency, 0.5);
        s.p99_ms = percentile(&latency, 0.99);
        s.ttfb_p50_ms = percentile(&ttfb, 0.5);
        s.ttfb_p99_ms = percentile(&ttfb, 0.99);
        s.errors = errors.into_iter().collect();
        s.surfaces = Surface::ALL
            .into_iter()
            .zip(surfaces)
            .filter(|(_, n)| *n > 0)
            .map(|(surface, n)| (surface.as_str(), n))
            .collect();
        s.errors.sort_by_key(|e| std::cmp::Reverse(e.1));
        s
    }
}

fn finish_point(mut p: Point, hist: &[u64; BUCKETS]) -> Point {
    p.p50_ms = percentile(hist, 0.5);
    p.p99_ms = percentile(hist, 0.99);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ts_ms: u64, status: u16, latency_ms: f64) -> Record {
        Record {
            ts_ms,
            status,
            latency_ms,
            ttfb_ms: Some(latency_ms / 2.0),
            class: (status >= 400).then(|| "rate_limited".to_owned()),
            prompt_tokens: 3,
            output_tokens: 5,
            ..Record::default()
        }
    }

    #[test]
    fn requests_are_told_apart_by_surface() {
        let m = Metrics::default();
        let now = 1_800_000_000_000u64;
        let of = |action: &str, model: &str| Record {
            action: action.into(),
            model: model.into(),
            ..record(now, 200, 1.0)
        };
        m.add(&[
            of("generateContent", "gemini-2.5-flash"),
            of("interactions.create", "gemini-2.5-flash"),
            of("batchGenerateContent", "batch/gemini-2.5-flash"),
            of("batches.get", ""),
            of("files.download", ""),
            of("live.connect", "live"),
            of("auth_tokens.create", "live"),
        ]);
        let hour = m.summary(now, 60, 12);
        assert_eq!(
            hour.surfaces,
            vec![("interactive", 2), ("batch", 3), ("live", 2)]
        );
    }

    #[test]
    fn windows_count_rates_percentiles_and_errors() {
        let m = Metrics::default();
        let now = 1_800_000_000_000u64;
        let mut records: Vec<Record> = (0..99).map(|i| record(now - i * 1000, 200, 10.0)).collect();
        records.push(record(now - 5_000, 429, 1000.0));
        // Two hours ago: in the day, not in the hour.
        records.push(record(now - 7_200_000, 200, 10.0));
        m.add(&records);
        let hour = m.summary(now, 60, 12);
        assert_eq!((hour.requests, hour.successes), (100, 99));
        assert_eq!(hour.success_rate, 99.0);
        assert!((9.0..=11.5).contains(&hour.p50_ms), "{}", hour.p50_ms);
        assert!((9.0..=11.5).contains(&hour.p99_ms), "{}", hour.p99_ms);
        assert_eq!(hour.errors, vec![("rate_limited".to_owned(), 1)]);
        assert_eq!(hour.surfaces, vec![("interactive", 100)]);
        assert_eq!(hour.prompt_tokens, 300);
        assert_eq!(hour.points.len(), 12);
        assert_eq!(hour.points.iter().map(|p| p.requests).sum::<u64>(), 100);
        let day = m.summary(now, 1440, 48);
        assert_eq!(day.requests, 101);
        // A record older than what a slot holds now is not counted.
        m.add(&[record(now - 86_400_000 * 2, 200, 1.0)]);
        assert_eq!(m.summary(now, 1440, 48).requests, 101);
    }

    #[test]
    fn a_minute_is_made_by_its_first_request() {
        let m = Metrics::default();
        let made = |m: &Metrics| {
            let slots = m.minutes.lock().unwrap();
            slots.iter().filter(|slot| slot.is_some()).count()
        };
        assert_eq!(made(&m), 0);
        let now = 1_800_000_000_000u64;
        m.add(&[record(now, 200, 1.0), record(now + 1, 200, 1.0)]);
        assert_eq!(made(&m), 1);
        // A day later the slot is reused, not added to.
        m.add(&[record(now + 86_400_000, 200, 1.0)]);
        assert_eq!(made(&m), 1);
        assert_eq!(m.summary(now + 86_400_000, 60, 1).requests, 1);
    }

    #[test]
    fn buckets_are_monotonic_and_tight() {
        for ms in [0.01, 0.2, 1.0, 17.0, 950.0, 60_000.0] {
            let b = bucket(ms);
            assert!(bucket_ms(b) >= ms.min(bucket_ms(BUCKETS - 1)));
            assert!(b == 0 || bucket_ms(b - 1) < ms);
        }
    }
}

//! How fast the request log answers with a million rows: writes 1,000,000 records (100 keys,
//! 5 models, 3% failures over 30 days) into a fresh redb file, then times the admin API's
//! queries. Run by `scripts/bench-logs.sh`.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use gemgate::store::logs::{self, Log, Query, Record};

fn main() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let store = gemgate::store::Store::open(dir.path(), u64::MAX / 2).expect("a store");
    let seq = AtomicU64::new(0);
    let rows: u64 = std::env::var("ROWS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1_000_000);
    let start_ms: u64 = 1_790_000_000_000;
    let span_ms: u64 = 30 * 86_400_000;
    let started = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..rows {
        let failed = i % 33 == 0;
        batch.push(Record {
            ts_ms: start_ms + i * span_ms / rows,
            id: format!("{i:016x}"),
            client: Some("bench".into()),
            model: format!("gemini-model-{}", i % 5),
            action: "generateContent".into(),
            key_id: Some(format!("k{:012x}", i % 100)),
            status: if failed { 429 } else { 200 },
            class: failed.then(|| "rate_limited".to_owned()),
            attempts: 1,
            latency_ms: 12.5,
            upstream_message: failed.then(|| "Resource has been exhausted".to_owned()),
            ..Record::default()
        });
        if batch.len() == 10_000 {
            logs::write(store.db(), &batch, &seq).expect("a write");
            batch.clear();
        }
    }
    logs::write(store.db(), &batch, &seq).expect("a write");
    let size = std::fs::metadata(dir.path().join("gemgate.redb")).map_or(0, |m| m.len());
    println!(
        "wrote {rows} rows in {:.1} s ({} MiB)",
        started.elapsed().as_secs_f64(),
        size >> 20
    );
    let day = 86_400_000;
    let queries: Vec<(&str, Log, Query)> = vec![
        (
            "newest 50",
            Log::Requests,
            Query {
                limit: 50,
                ..Query::default()
            },
        ),
        (
            "one key, newest 50",
            Log::Requests,
            Query {
                key_id: Some("k00000000002a".into()),
                limit: 50,
                ..Query::default()
            },
        ),
        (
            "one model, one day",
            Log::Requests,
            Query {
                model: Some("gemini-model-3".into()),
                from_ms: Some(start_ms + 10 * day),
                to_ms: Some(start_ms + 11 * day),
                limit: 50,
                ..Query::default()
            },
        ),
        (
            "status 429, newest 50",
            Log::Requests,
            Query {
                status: Some(429),
                limit: 50,
                ..Query::default()
            },
        ),
        (
            "errors by class, one day",
            Log::Errors,
            Query {
                class: Some("rate_limited".into()),
                from_ms: Some(start_ms + 20 * day),
                to_ms: Some(start_ms + 21 * day),
                limit: 50,
                ..Query::default()
            },
        ),
        (
            "errors of one key",
            Log::Errors,
            Query {
                key_id: Some("k000000000000".into()),
                limit: 50,
                ..Query::default()
            },
        ),
    ];
    for (name, log, q) in queries {
        let t = Instant::now();
        let (page, _) = logs::query(store.db(), log, &q).expect("a query");
        println!(
            "{name:<28} {:>6} rows  {:>8.2} ms",
            page.len(),
            t.elapsed().as_secs_f64() * 1000.0
        );
    }
}

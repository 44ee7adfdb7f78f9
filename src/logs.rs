//! The request log and the error log, in redb.
//!
//! Each finished request becomes a [`Record`], queued in memory (a full queue drops the oldest
//! record and counts the drop: the request path never waits) and committed by the store's
//! flusher. Every request goes to the request log; a failed one also to the error log, with
//! the upstream's status and message (and the request body, if `ERROR_LOG_RECORD_REQUEST_BODY`).
//!
//! Rows are keyed by (time, sequence); index tables by key, model, status and error class hold
//! (value, time, sequence), so a query on any of them reads only the rows it returns.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::store::StoreError;

/// Records queued at most before the oldest are dropped.
const QUEUE: usize = 100_000;

/// One finished request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub ts_ms: u64,
    pub id: String,
    pub client: Option<String>,
    pub model: String,
    pub action: String,
    pub key_id: Option<String>,
    pub status: u16,
    pub class: Option<String>,
    pub attempts: u32,
    pub latency_ms: f64,
    pub ttfb_ms: Option<f64>,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub thought_tokens: u64,
    /// Error log only: Google's status and message.
    pub upstream_status: Option<u16>,
    pub upstream_message: Option<String>,
    /// Error log only, and only with `ERROR_LOG_RECORD_REQUEST_BODY`.
    pub request_body: Option<String>,
}

impl Record {
    pub fn failed(&self) -> bool {
        self.status >= 400 || self.class.is_some()
    }
}

/// The queue between the request path and the flusher.
#[derive(Default)]
pub struct LogQueue {
    queue: Mutex<VecDeque<Record>>,
    dropped: AtomicU64,
}

impl LogQueue {
    /// Queues a record; past the limit the oldest one is dropped.
    pub fn push(&self, r: Record) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= QUEUE {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(r);
    }

    pub fn take(&self) -> Vec<Record> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.drain(..).collect()
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Which log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    Requests,
    Errors,
}

impl Log {
    /// Its name in paths: `requests` or `errors`.
    pub fn name(self) -> &'static str {
        match self {
            Log::Requests => "requests",
            Log::Errors => "errors",
        }
    }

    pub fn from_name(name: &str) -> Option<Log> {
        match name {
            "requests" => Some(Log::Requests),
            "errors" => Some(Log::Errors),
            _ => None,
        }
    }
}

/// A row's name: (time in ms, sequence).
pub type Row = (u64, u64);

/// One page of a log: the rows, and where the next page starts.
pub type Page = (Vec<(Row, Record)>, Option<Row>);
type Index = (&'static str, u64, u64);

struct Tables {
    rows: TableDefinition<'static, Row, &'static [u8]>,
    by_key: TableDefinition<'static, Index, ()>,
    by_model: TableDefinition<'static, Index, ()>,
    by_class: TableDefinition<'static, Index, ()>,
    by_status: TableDefinition<'static, (u16, u64, u64), ()>,
}

const REQUESTS: Tables = Tables {
    rows: TableDefinition::new("requests"),
    by_key: TableDefinition::new("requests_by_key"),
    by_model: TableDefinition::new("requests_by_model"),
    by_class: TableDefinition::new("requests_by_class"),
    by_status: TableDefinition::new("requests_by_status"),
};
const ERRORS: Tables = Tables {
    rows: TableDefinition::new("errors"),
    by_key: TableDefinition::new("errors_by_key"),
    by_model: TableDefinition::new("errors_by_model"),
    by_class: TableDefinition::new("errors_by_class"),
    by_status: TableDefinition::new("errors_by_status"),
};

fn tables(log: Log) -> &'static Tables {
    match log {
        Log::Requests => &REQUESTS,
        Log::Errors => &ERRORS,
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// A query on one log: newest first.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    pub key_id: Option<String>,
    pub model: Option<String>,
    pub status: Option<u16>,
    pub class: Option<String>,
    pub limit: usize,
    /// Continue after this row (the `next` of the previous page).
    pub before: Option<(u64, u64)>,
}

/// Writes records to both logs, with their indexes, in one transaction. `seq` numbers rows
/// within a millisecond.
pub fn write(db: &Database, records: &[Record], seq: &AtomicU64) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let tx = db.begin_write().map_err(io)?;
    {
        // Each table is opened once per batch: opening one costs more than a row.
        let mut requests = Open::new(&tx, Log::Requests)?;
        let mut errors = Open::new(&tx, Log::Errors)?;
        for r in records {
            let row = (r.ts_ms, seq.fetch_add(1, Ordering::Relaxed));
            let bytes = serde_json::to_vec(r).map_err(io)?;
            requests.insert(r, row, &strip_error_fields(&bytes, r))?;
            if r.failed() {
                errors.insert(r, row, &bytes)?;
            }
        }
    }
    tx.commit().map_err(io)
}

/// The tables of one log, open in a write transaction.
struct Open<'tx> {
    rows: redb::Table<'tx, Row, &'static [u8]>,
    by_key: redb::Table<'tx, Index, ()>,
    by_model: redb::Table<'tx, Index, ()>,
    by_class: redb::Table<'tx, Index, ()>,
    by_status: redb::Table<'tx, (u16, u64, u64), ()>,
}

impl<'tx> Open<'tx> {
    fn new(tx: &'tx redb::WriteTransaction, log: Log) -> Result<Open<'tx>, StoreError> {
        let t = tables(log);
        Ok(Open {
            rows: tx.open_table(t.rows).map_err(io)?,
            by_key: tx.open_table(t.by_key).map_err(io)?,
            by_model: tx.open_table(t.by_model).map_err(io)?,
            by_class: tx.open_table(t.by_class).map_err(io)?,
            by_status: tx.open_table(t.by_status).map_err(io)?,
        })
    }

    fn insert(&mut self, r: &Record, row: Row, bytes: &[u8]) -> Result<(), StoreError> {
        self.rows.insert(row, bytes).map_err(io)?;
        if let Some(k) = &r.key_id {
            self.by_key
                .insert((k.as_str(), row.0, row.1), ())
                .map_err(io)?;
        }
        self.by_model
            .insert((r.model.as_str(), row.0, row.1), ())
            .map_err(io)?;
        if let Some(c) = &r.class {
            self.by_class
                .insert((c.as_str(), row.0, row.1), ())
                .map_err(io)?;
        }
        self.by_status
            .insert((r.status, row.0, row.1), ())
            .map_err(io)?;
        Ok(())
    }
}

/// The request log keeps no upstream message or body.
fn strip_error_fields(bytes: &[u8], r: &Record) -> Vec<u8> {
    if r.request_body.is_none() && r.upstream_message.is_none() {
        return bytes.to_vec();
    }
    let lean = Record {
        request_body: None,
        upstream_message: None,
        ..r.clone()
    };
    serde_json::to_vec(&lean).unwrap_or_default()
}

/// Creates the tables (on a new file).
pub fn create(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    for t in [&REQUESTS, &ERRORS] {
        tx.open_table(t.rows).map_err(io)?;
        tx.open_table(t.by_key).map_err(io)?;
        tx.open_table(t.by_model).map_err(io)?;
        tx.open_table(t.by_class).map_err(io)?;
        tx.open_table(t.by_status).map_err(io)?;
    }
    Ok(())
}

/// Rows of `log` matching `q`, newest first, and the cursor of the next page. The most
/// selective index the query names is walked newest first; each row it yields is checked
/// against the other filters, and the walk stops as soon as the page is full.
pub fn query(db: &Database, log: Log, q: &Query) -> Result<Page, StoreError> {
    let t = tables(log);
    let tx = db.begin_read().map_err(io)?;
    let rows = tx.open_table(t.rows).map_err(io)?;
    let from = q.from_ms.unwrap_or(0);
    let to = q.to_ms.unwrap_or(u64::MAX);
    let upper: Row = match q.before {
        Some(b) if b < (to, u64::MAX) => b,
        _ => (to, u64::MAX),
    };
    let limit = q.limit.clamp(1, 1000);
    let mut out: Vec<(Row, Record)> = Vec::new();
    let mut next = None;
    // Takes one candidate row; `false` ends the walk.
    let mut take = |row: Row| -> Result<bool, StoreError> {
        let Some(value) = rows.get(row).map_err(io)? else {
            return Ok(true);
        };
        let Ok(r) = serde_json::from_slice::<Record>(value.value()) else {
            return Ok(true);
        };
        let matches = q
            .key_id
            .as_ref()
            .is_none_or(|k| r.key_id.as_ref() == Some(k))
            && q.model.as_ref().is_none_or(|m| &r.model == m)
            && q.class.as_ref().is_none_or(|c| r.class.as_ref() == Some(c))
            && q.status.is_none_or(|s| r.status == s);
        if !matches {
            return Ok(true);
        }
        if out.len() == limit {
            next = out.last().map(|(row, _)| *row);
            return Ok(false);
        }
        out.push((row, r));
        Ok(true)
    };
    // Each branch walks one table's range newest first, as rows.
    if let Some((def, value)) = [
        (t.by_key, q.key_id.as_deref()),
        (t.by_class, q.class.as_deref()),
        (t.by_model, q.model.as_deref()),
    ]
    .into_iter()
    .find_map(|(def, v)| Some((def, v?)))
    {
        walk_index!(tx, def, value, from, upper, &mut take);
    } else if let Some(s) = q.status {
        walk_index!(tx, t.by_status, s, from, upper, &mut take);
    } else {
        let all = tx.open_table(t.rows).map_err(io)?;
        let range = all.range((from, 0)..upper);
        walk(
            range.map_err(io)?.rev().map(|e| e.map(|(k, _)| k.value())),
            &mut take,
        )?;
    }
    Ok((out, next))
}

/// Feeds rows to `take` until it says stop.
/// Walks the rows index `$def` names for `$value`, from `$from` up to row `$upper`, newest
/// first. (A macro: the indexes' keys differ in their first element's type.)
macro_rules! walk_index {
    ($tx:expr, $def:expr, $value:expr, $from:expr, $upper:expr, $take:expr) => {{
        let idx = $tx.open_table($def).map_err(io)?;
        let range = idx
            .range(($value, $from, 0)..($value, $upper.0, $upper.1))
            .map_err(io)?;
        walk(
            range
                .rev()
                .map(|e| e.map(|(k, _)| (k.value().1, k.value().2))),
            $take,
        )?;
    }};
}
use walk_index;

fn walk(
    rows: impl Iterator<Item = Result<Row, redb::StorageError>>,
    take: &mut dyn FnMut(Row) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    for row in rows {
        if !take(row.map_err(io)?)? {
            break;
        }
    }
    Ok(())
}

/// Every record of `log` from `from_ms` on, oldest first, in batches of up to `batch`.
pub fn since(
    db: &Database,
    log: Log,
    from_ms: u64,
    batch: usize,
    each: &mut dyn FnMut(Vec<Record>),
) -> Result<(), StoreError> {
    let tx = db.begin_read().map_err(io)?;
    let rows = tx.open_table(tables(log).rows).map_err(io)?;
    let mut out = Vec::with_capacity(batch);
    for entry in rows.range((from_ms, 0)..).map_err(io)? {
        let (_, v) = entry.map_err(io)?;
        if let Ok(r) = serde_json::from_slice(v.value()) {
            out.push(r);
        }
        if out.len() >= batch {
            each(std::mem::take(&mut out));
        }
    }
    if !out.is_empty() {
        each(out);
    }
    Ok(())
}

/// One row, by its (time, sequence).
pub fn get(db: &Database, log: Log, row: Row) -> Result<Option<Record>, StoreError> {
    let tx = db.begin_read().map_err(io)?;
    let rows = tx.open_table(tables(log).rows).map_err(io)?;
    Ok(rows
        .get(row)
        .map_err(io)?
        .and_then(|v| serde_json::from_slice(v.value()).ok()))
}

/// Deletes the rows older than `before_ms` (with their index entries), or the given rows.
pub fn delete(
    db: &Database,
    log: Log,
    before_ms: Option<u64>,
    rows: &[Row],
) -> Result<usize, StoreError> {
    let t = tables(log);
    let tx = db.begin_write().map_err(io)?;
    let mut deleted = 0;
    {
        let mut table = tx.open_table(t.rows).map_err(io)?;
        let mut victims: Vec<(Row, Record)> = Vec::new();
        if let Some(cutoff) = before_ms {
            for e in table.range((0, 0)..(cutoff, 0)).map_err(io)? {
                let (k, v) = e.map_err(io)?;
                if let Ok(r) = serde_json::from_slice::<Record>(v.value()) {
                    victims.push((k.value(), r));
                }
            }
        }
        for &row in rows {
            if let Some(v) = table.get(row).map_err(io)? {
                if let Ok(r) = serde_json::from_slice::<Record>(v.value()) {
                    victims.push((row, r));
                }
            }
        }
        let mut by_key = tx.open_table(t.by_key).map_err(io)?;
        let mut by_model = tx.open_table(t.by_model).map_err(io)?;
        let mut by_class = tx.open_table(t.by_class).map_err(io)?;
        let mut by_status = tx.open_table(t.by_status).map_err(io)?;
        for (row, r) in victims {
            if table.remove(row).map_err(io)?.is_some() {
                deleted += 1;
            }
            if let Some(k) = &r.key_id {
                by_key.remove((k.as_str(), row.0, row.1)).map_err(io)?;
            }
            by_model
                .remove((r.model.as_str(), row.0, row.1))
                .map_err(io)?;
            if let Some(c) = &r.class {
                by_class.remove((c.as_str(), row.0, row.1)).map_err(io)?;
            }
            by_status.remove((r.status, row.0, row.1)).map_err(io)?;
        }
    }
    tx.commit().map_err(io)?;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ts: u64, status: u16, key: &str, class: Option<&str>) -> Record {
        Record {
            ts_ms: ts,
            id: format!("r{ts}"),
            model: "m".into(),
            key_id: Some(key.into()),
            status,
            class: class.map(str::to_owned),
            upstream_message: class.map(|_| "quota".to_owned()),
            ..Record::default()
        }
    }

    #[test]
    fn write_query_page_and_retire() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        {
            let tx = db.begin_write().unwrap();
            create(&tx).unwrap();
            tx.commit().unwrap();
        }
        let seq = AtomicU64::new(0);
        let mut records = Vec::new();
        for i in 0..30 {
            let failed = i % 3 == 0;
            records.push(record(
                1000 + i,
                if failed { 429 } else { 200 },
                if i % 2 == 0 { "k1" } else { "k2" },
                failed.then_some("rate_limited"),
            ));
        }
        write(&db, &records, &seq).unwrap();

        let q = Query {
            limit: 4,
            ..Query::default()
        };
        let (page, next) = query(&db, Log::Requests, &q).unwrap();
        assert_eq!(
            page.iter().map(|(_, r)| r.ts_ms).collect::<Vec<_>>(),
            [1029, 1028, 1027, 1026]
        );
        let (page, _) = query(
            &db,
            Log::Requests,
            &Query {
                before: next,
                ..q.clone()
            },
        )
        .unwrap();
        assert_eq!(page[0].1.ts_ms, 1025);

        let errors = Query {
            key_id: Some("k1".into()),
            limit: 100,
            ..Query::default()
        };
        let (page, _) = query(&db, Log::Errors, &errors).unwrap();
        assert_eq!(page.len(), 5, "errors of k1: 0, 6, 12, 18, 24");
        assert_eq!(page[0].1.upstream_message.as_deref(), Some("quota"));
        let (page, _) = query(
            &db,
            Log::Requests,
            &Query {
                status: Some(429),
                from_ms: Some(1020),
                limit: 100,
                ..Query::default()
            },
        )
        .unwrap();
        assert_eq!(
            page.iter().map(|(_, r)| r.ts_ms).collect::<Vec<_>>(),
            [1027, 1024, 1021]
        );
        assert!(
            page.iter().all(|(_, r)| r.upstream_message.is_none()),
            "the request log is lean"
        );

        assert_eq!(delete(&db, Log::Requests, Some(1010), &[]).unwrap(), 10);
        let (page, _) = query(
            &db,
            Log::Requests,
            &Query {
                key_id: Some("k2".into()),
                limit: 100,
                ..Query::default()
            },
        )
        .unwrap();
        assert_eq!(page.len(), 10);
    }
}

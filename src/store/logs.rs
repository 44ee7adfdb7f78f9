//! The request log and the error log, in redb.
//!
//! Each finished request becomes a [`Record`], queued in memory ([`LogQueue`]: a full queue
//! drops the oldest records and counts the drop: the request path never waits) and committed by
//! the store's flusher. Every request goes to the request log; a failed one also to the error
//! log, with the upstream's status and message (and the request body, if
//! `ERROR_LOG_RECORD_REQUEST_BODY`).
//!
//! A record is named by its row, (time, sequence). Records are stored in blocks of up to
//! 256 (`BLOCK`): one redb row per block, keyed by its first row, holding its records in row order;
//! blocks never overlap. The blocks one flush writes form a group, and index tables by model,
//! status and error class hold (value, group) → the group's blocks that have the value, so a
//! query on any of them reads only the blocks that can match. A request costs the flusher one
//! JSON encoding and a share of one insert, rather than five B-tree inserts, and an index costs
//! an entry per distinct value per flush rather than per block: a pool of a thousand keys used
//! in turn gave every block 200-odd key entries, one B-tree insert per request, which took the
//! store's thread from 4% to 17% of gemgate's CPU.
//!
//! Keys are too many for that: with a pool of 100,000 keys taken in turn, nearly every request
//! of a flush has a key of its own, and an entry per key per flush, spread over the whole index,
//! made each flush rewrite most of the index's pages: 4 KB written to disk per request, and the
//! store's thread 30% of gemgate's CPU. A block has a key filter instead ([`key_filter`]): the
//! hashes of its keys, a row of a few hundred bytes written at the end of its table. A query by
//! key reads the filters newest first, and only the blocks whose filter has the key's hash.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};

use crate::store::StoreError;
pub use crate::store::queue::LogQueue;

/// Most of a request body the error log keeps.
pub const BODY_KEPT: usize = 64 * 1024;

/// Records per block, at most.
const BLOCK: usize = 256;
/// Bytes per block, at most (a single larger record has a block of its own): a block is one
/// stored value, and values this size reuse the space old ones leave.
const BLOCK_BYTES: usize = 192 * 1024;
/// The `meta` entry that holds the bytes of every stored block, of both logs.
const LOG_BYTES: &str = "log_bytes";

/// The surfaces of Google's API whose quotas are kept apart, and whose traffic is told apart
/// (dashboard, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Surface {
    /// Calls answered at once: `generateContent`, interactions, files, …
    #[default]
    Interactive,
    /// Batch jobs and their results.
    Batch,
    /// Live sessions and their ephemeral tokens.
    Live,
}

impl Surface {
    pub const ALL: [Surface; 3] = [Surface::Interactive, Surface::Batch, Surface::Live];

    pub fn as_str(self) -> &'static str {
        match self {
            Surface::Interactive => "interactive",
            Surface::Batch => "batch",
            Surface::Live => "live",
        }
    }

    /// The surface of a call with this action and model (as logged).
    pub fn of(action: &str, model: &str) -> Surface {
        if action.starts_with("batches")
            || action == "files.download"
            || model.starts_with("batch/")
        {
            Surface::Batch
        } else if action.starts_with("live") || action.starts_with("auth_tokens") {
            Surface::Live
        } else {
            Surface::Interactive
        }
    }
}

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
    /// Error log only, and only with `ERROR_LOG_RECORD_REQUEST_BODY` (its first
    /// [`BODY_KEPT`] bytes).
    pub request_body: Option<String>,
    /// Left out of the request log by `logs.request_sample`; the error log keeps every
    /// failed request, and the dashboard counts every request.
    #[serde(skip)]
    pub unsampled: bool,
    /// The model the client asked for, when an alias made it `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked_model: Option<String>,
    /// The fleet instance that served it (`None`: a single instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// What the plugins did, for a request that asked for a trace with the admin token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<serde_json::Value>,
}

impl Record {
    pub fn failed(&self) -> bool {
        self.status >= 400 || self.class.is_some()
    }

    /// The record as stored: serde's JSON for it, byte for byte (the queries match on it), but
    /// written field by field: serde_json escapes every key too, and this runs for every
    /// request. `lean` leaves out the error-log-only fields, as the request log keeps them.
    fn json(&self, lean: bool) -> Vec<u8> {
        fn num(out: &mut Vec<u8>, key: &str, n: impl itoa::Integer) {
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        }
        fn value(out: &mut Vec<u8>, key: &str, v: &(impl Serialize + ?Sized)) {
            out.extend_from_slice(key.as_bytes());
            // Writing a string or a float into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, v);
        }
        // A plain request's record is 350-450 bytes: room for it at once, without a regrowth.
        let mut out = Vec::with_capacity(512);
        num(&mut out, "{\"ts_ms\":", self.ts_ms);
        value(&mut out, ",\"id\":", &self.id);
        value(&mut out, ",\"client\":", &self.client);
        value(&mut out, ",\"model\":", &self.model);
        value(&mut out, ",\"action\":", &self.action);
        value(&mut out, ",\"key_id\":", &self.key_id);
        num(&mut out, ",\"status\":", self.status);
        value(&mut out, ",\"class\":", &self.class);
        num(&mut out, ",\"attempts\":", self.attempts);
        value(&mut out, ",\"latency_ms\":", &self.latency_ms);
        value(&mut out, ",\"ttfb_ms\":", &self.ttfb_ms);
        num(&mut out, ",\"prompt_tokens\":", self.prompt_tokens);
        num(&mut out, ",\"output_tokens\":", self.output_tokens);
        num(&mut out, ",\"thought_tokens\":", self.thought_tokens);
        value(&mut out, ",\"upstream_status\":", &self.upstream_status);
        let none = None::<String>;
        let (message, body) = if lean {
            (&none, &none)
        } else {
            (&self.upstream_message, &self.request_body)
        };
        value(&mut out, ",\"upstream_message\":", message);
        value(&mut out, ",\"request_body\":", body);
        if let Some(asked) = &self.asked_model {
            value(&mut out, ",\"asked_model\":", asked);
        }
        if let Some(instance) = &self.instance {
            value(&mut out, ",\"instance\":", instance);
        }
        if let Some(trace) = &self.trace {
            value(&mut out, ",\"trace\":", trace);
        }
        out.push(b'}');
        out
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
/// An index entry: (value, the group's first block); its value is the group's blocks that have
/// the value ([`rows_bytes`]).
type Index = (&'static str, u64, u64);
type StatusIndex = (u16, u64, u64);

struct Tables {
    blocks: TableDefinition<'static, Row, &'static [u8]>,
    /// A group's first block → its last block and its values ([`group_row`]).
    groups: TableDefinition<'static, Row, &'static [u8]>,
    /// A block's first row → its key filter ([`key_filter`]).
    key_filters: TableDefinition<'static, Row, &'static [u8]>,
    by_model: TableDefinition<'static, Index, &'static [u8]>,
    by_class: TableDefinition<'static, Index, &'static [u8]>,
    by_status: TableDefinition<'static, StatusIndex, &'static [u8]>,
}

const REQUESTS: Tables = Tables {
    blocks: TableDefinition::new("request_log"),
    groups: TableDefinition::new("request_log_groups"),
    key_filters: TableDefinition::new("request_log_key_filters"),
    by_model: TableDefinition::new("request_log_model_groups"),
    by_class: TableDefinition::new("request_log_class_groups"),
    by_status: TableDefinition::new("request_log_status_groups"),
};
const ERRORS: Tables = Tables {
    blocks: TableDefinition::new("error_log"),
    groups: TableDefinition::new("error_log_groups"),
    key_filters: TableDefinition::new("error_log_key_filters"),
    by_model: TableDefinition::new("error_log_model_groups"),
    by_class: TableDefinition::new("error_log_class_groups"),
    by_status: TableDefinition::new("error_log_status_groups"),
};

/// Data layout 3 indexed keys as it does models, in these tables; [`create`] reindexes.
const KEY_GROUPS: [(Log, &str); 2] = [
    (Log::Requests, "request_log_key_groups"),
    (Log::Errors, "error_log_key_groups"),
];

/// Data layout 2 indexed every block on its own, in these tables; [`create`] reindexes.
const BLOCK_INDEXES: [(Log, [&str; 4]); 2] = [
    (
        Log::Requests,
        [
            "request_log_by_key",
            "request_log_by_model",
            "request_log_by_class",
            "request_log_by_status",
        ],
    ),
    (
        Log::Errors,
        [
            "error_log_by_key",
            "error_log_by_model",
            "error_log_by_class",
            "error_log_by_status",
        ],
    ),
];

/// Data layout 1 kept one row per record, under these names; [`create`] converts them.
const OLD_ROWS: [(Log, TableDefinition<'static, Row, &'static [u8]>); 2] = [
    (Log::Requests, TableDefinition::new("requests")),
    (Log::Errors, TableDefinition::new("errors")),
];
const OLD_INDEXES: [&str; 8] = [
    "requests_by_key",
    "requests_by_model",
    "requests_by_class",
    "requests_by_status",
    "errors_by_key",
    "errors_by_model",
    "errors_by_class",
    "errors_by_status",
];

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

impl Query {
    fn matches(&self, r: &Record) -> bool {
        self.key_id
            .as_ref()
            .is_none_or(|k| r.key_id.as_ref() == Some(k))
            && self.model.as_ref().is_none_or(|m| &r.model == m)
            && self
                .class
                .as_ref()
                .is_none_or(|c| r.class.as_ref() == Some(c))
            && self.status.is_none_or(|s| r.status == s)
    }
}

/// A block's bytes: its last row, then each record as (time, sequence, length, JSON), the
/// records compressed (zstd) when that makes them smaller, as it nearly always does: records
/// repeat their field names, models and keys, and a block of them shrinks about tenfold. A
/// compressed block's time has its top bit set, and the records' plain length follows the
/// last row.
fn encode<'a>(entries: impl Iterator<Item = (Row, &'a [u8])> + Clone) -> Vec<u8> {
    let size: usize = entries.clone().map(|(_, json)| 20 + json.len()).sum();
    let mut out = Vec::with_capacity(16 + size);
    let last = entries.clone().last().map_or((0, 0), |(row, _)| row);
    out.extend_from_slice(&last.0.to_le_bytes());
    out.extend_from_slice(&last.1.to_le_bytes());
    for (row, json) in entries {
        out.extend_from_slice(&row.0.to_le_bytes());
        out.extend_from_slice(&row.1.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(json);
    }
    let records = &out[16..];
    // One compressor per thread: making one allocates and clears its tables, for every block.
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let packed = COMPRESSOR.with_borrow_mut(|c| {
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(COMPRESSION_LEVEL)?);
        }
        c.as_mut().map_or(Ok(Vec::new()), |c| c.compress(records))
    });
    match packed {
        Ok(packed) if packed.len() + 4 < records.len() => {
            let mut block = Vec::with_capacity(20 + packed.len());
            block.extend_from_slice(&(last.0 | COMPRESSED).to_le_bytes());
            block.extend_from_slice(&last.1.to_le_bytes());
            block.extend_from_slice(&(records.len() as u32).to_le_bytes());
            block.extend_from_slice(&packed);
            block
        }
        _ => out,
    }
}

/// zstd's level for log blocks: its fastest, which still shrinks them about tenfold.
const COMPRESSION_LEVEL: i32 = 1;
/// The top bit of a block's time: its records are compressed.
const COMPRESSED: u64 = 1 << 63;

/// A stored block as [`decode`] reads it: as it is, or with its records decompressed (a block
/// that does not decompress keeps its last row and no records).
fn unpack(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let Some(time) = u64_at(bytes, 0).filter(|t| t & COMPRESSED != 0) else {
        return std::borrow::Cow::Borrowed(bytes);
    };
    let mut plain = Vec::new();
    plain.extend_from_slice(&(time & !COMPRESSED).to_le_bytes());
    plain.extend_from_slice(bytes.get(8..16).unwrap_or(&[0; 8]));
    let length = bytes
        .get(16..20)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
    // The length was written by gemgate; bounded all the same, as anything read back is.
    match zstd::bulk::decompress(bytes.get(20..).unwrap_or_default(), length.min(MAX_PLAIN)) {
        Ok(records) => plain.extend_from_slice(&records),
        Err(e) => tracing::warn!("a log block does not decompress, its records are skipped: {e}"),
    }
    std::borrow::Cow::Owned(plain)
}

/// The largest a block's records may be once decompressed.
const MAX_PLAIN: usize = 64 << 20;

/// A block's records, in row order (a damaged tail is left out); `bytes` as [`unpack`] gives
/// them.
fn decode(bytes: &[u8]) -> Vec<(Row, &[u8])> {
    let mut out = Vec::new();
    let mut at = 16;
    while let (Some(ts), Some(seq), Some(len)) = (
        u64_at(bytes, at),
        u64_at(bytes, at + 8),
        bytes
            .get(at + 16..at + 20)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize),
    ) {
        let Some(json) = bytes.get(at + 20..at + 20 + len) else {
            break;
        };
        out.push(((ts, seq), json));
        at += 20 + len;
    }
    out
}

/// A block's last row (compressed or not).
fn last_row(bytes: &[u8]) -> Row {
    (
        u64_at(bytes, 0).map_or(0, |t| t & !COMPRESSED),
        u64_at(bytes, 8).unwrap_or(0),
    )
}

/// The little-endian `u64` at `i`, if `bytes` reach that far.
fn u64_at(bytes: &[u8], i: usize) -> Option<u64> {
    bytes
        .get(i..i + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
}

/// Writes records to both logs in one transaction. `seq` numbers rows within a millisecond.
pub fn write(db: &Database, records: &[Record], seq: &AtomicU64) -> Result<(), StoreError> {
    let encoded: Vec<Encoded> = records.iter().map(Encoded::of).collect();
    write_encoded(db, records, &encoded, seq)
}

/// A record as the logs store it: its JSON for the error log, and for the request log, which
/// keeps no upstream message or body, a leaner one when they differ.
pub struct Encoded {
    full: Vec<u8>,
    lean: Option<Vec<u8>>,
}

impl Encoded {
    /// What each log keeps of `r`: nothing for a success the request log samples out (an
    /// operator samples to spare the flusher's CPU), the lean form for the request log only
    /// when it is kept there.
    pub fn of(r: &Record) -> Encoded {
        if r.unsampled && !r.failed() {
            return Encoded {
                full: Vec::new(),
                lean: None,
            };
        }
        let full = r.json(false);
        let differs = r.upstream_message.is_some() || r.request_body.is_some();
        let lean = (!r.unsampled && differs).then(|| r.json(true));
        Encoded { full, lean }
    }

    fn lean(&self) -> &[u8] {
        self.lean.as_deref().unwrap_or(&self.full)
    }

    /// What storing it takes, at most.
    pub fn bytes(&self) -> usize {
        if self.full.is_empty() {
            return 0;
        }
        20 + self.full.len() + self.lean.as_ref().map_or(0, Vec::len)
    }
}

/// [`write`], with the records encoded already (`encoded[i]` is `records[i]`'s).
pub fn write_encoded(
    db: &Database,
    records: &[Record],
    encoded: &[Encoded],
    seq: &AtomicU64,
) -> Result<(), StoreError> {
    let sampled: Vec<usize> = (0..records.len())
        .filter(|&i| !records[i].unsampled)
        .collect();
    let failed: Vec<usize> = (0..records.len())
        .filter(|&i| records[i].failed())
        .collect();
    // Successes all sampled out: nothing to write (not even an empty commit, synced to disk).
    if sampled.is_empty() && failed.is_empty() {
        return Ok(());
    }
    let tx = db.begin_write().map_err(io)?;
    let mut requests = Open::new(&tx, Log::Requests)?;
    let mut errors = Open::new(&tx, Log::Errors)?;
    // A record has the same row in both logs. Rows only grow, whatever the clock or the
    // queue's order did: blocks never overlap.
    let mut floor = requests.last_row()?.max(errors.last_row()?);
    let rows: Vec<Row> = records
        .iter()
        .map(|r| {
            let mut row = (r.ts_ms, seq.fetch_add(1, Ordering::Relaxed));
            if row <= floor {
                row = (floor.0, floor.1 + 1);
            }
            floor = row;
            row
        })
        .collect();
    requests.put_group(&sampled, |i| (rows[i], encoded[i].lean(), &records[i]))?;
    errors.put_group(&failed, |i| (rows[i], &encoded[i].full[..], &records[i]))?;
    let grown = requests.grown + errors.grown;
    drop((requests, errors));
    account(&tx, grown)?;
    tx.commit().map_err(io)
}

/// How many of `records` (indices, `size` giving each one's JSON length) the next block takes:
/// at most `most`, and at most [`BLOCK_BYTES`] (but at least one).
fn block_len(records: &[usize], size: impl Fn(usize) -> usize, most: usize) -> usize {
    let mut bytes = 0;
    let fits = records.iter().take(most).take_while(|&&i| {
        bytes += 20 + size(i);
        bytes <= BLOCK_BYTES
    });
    fits.count().max(1).min(records.len())
}

/// redb stores a block in a page of 4 KiB times a power of two, with about this much of its
/// own beside the value.
const PAGE_OVERHEAD: f64 = 128.0;
/// How full a block may make its page by estimate: blocks vary, and one that spills past a
/// page takes one twice the size.
const PAGE_FILL: f64 = 0.94;
/// Least share of its page a block of [`BLOCK`] records must fill; below it, blocks are cut
/// to fill the page below.
const MIN_FILL: f64 = 0.8;

thread_local! {
    /// What a record of each log took in the blocks this thread wrote last (compressed bytes;
    /// 0: none yet). The store's committer writes the logs.
    static PER_RECORD: std::cell::Cell<[f64; 2]> = const { std::cell::Cell::new([0.0; 2]) };
}

/// Records for the next block of `log`: [`BLOCK`], or fewer if that many would fill their
/// redb page (a power of two of 4 KiB) poorly or nearly spill past it: then as many as nearly
/// fill the page below. With 100,000 keys, 256 records compressed to 8.7 KB and took pages of
/// 16: 44% of the log's bytes were padding.
fn records_per_block(log: Log) -> usize {
    let per = PER_RECORD.get()[log as usize];
    if per <= 0.0 {
        return BLOCK;
    }
    let full = per * BLOCK as f64 + PAGE_OVERHEAD;
    let page = (full as usize).next_power_of_two().max(4096) as f64;
    if (MIN_FILL..=PAGE_FILL).contains(&(full / page)) || page <= 4096.0 {
        return BLOCK;
    }
    let below = page / 2.0 * PAGE_FILL - PAGE_OVERHEAD;
    ((below / per) as usize).clamp(1, BLOCK)
}

/// Notes what a block of `records` records of `log` compressed to (`bytes`), for
/// [`records_per_block`]. Blocks too small to tell (a flush's last) are left out.
fn observe_block(log: Log, records: usize, bytes: usize) {
    if records < BLOCK / 8 {
        return;
    }
    let mut per = PER_RECORD.get();
    let now = bytes as f64 / records as f64;
    let last = &mut per[log as usize];
    *last = if *last > 0.0 {
        (*last + now) / 2.0
    } else {
        now
    };
    PER_RECORD.set(per);
}

/// Adds `grown` (negative: what was removed) to the bytes of stored blocks.
fn account(tx: &redb::WriteTransaction, grown: i64) -> Result<(), StoreError> {
    if grown == 0 {
        return Ok(());
    }
    let mut meta = tx.open_table(crate::store::META).map_err(io)?;
    let now = meta.get(LOG_BYTES).map_err(io)?.map_or(0, |v| v.value());
    let next = now.saturating_add_signed(grown);
    meta.insert(LOG_BYTES, next).map_err(io)?;
    Ok(())
}

/// The bytes of every stored block, of both logs (what [`trim`] keeps under a budget).
pub fn stored_bytes(db: &Database) -> Result<u64, StoreError> {
    let tx = db.begin_read().map_err(io)?;
    let meta = tx.open_table(crate::store::META).map_err(io)?;
    Ok(meta.get(LOG_BYTES).map_err(io)?.map_or(0, |v| v.value()))
}

/// Deletes the oldest blocks of either log (the older first) until `at_least` bytes are gone;
/// returns the records deleted.
pub fn trim(db: &Database, at_least: u64) -> Result<usize, StoreError> {
    let tx = db.begin_write().map_err(io)?;
    let mut deleted = 0;
    let grown;
    {
        let mut requests = Open::new(&tx, Log::Requests)?;
        let mut errors = Open::new(&tx, Log::Errors)?;
        loop {
            if requests.grown + errors.grown <= -(at_least.min(i64::MAX as u64) as i64) {
                break;
            }
            let oldest = |o: &Open| -> Result<Option<Row>, StoreError> {
                Ok(o.blocks.first().map_err(io)?.map(|(k, _)| k.value()))
            };
            let open = match (oldest(&requests)?, oldest(&errors)?) {
                (Some(r), Some(e)) if e < r => &mut errors,
                (Some(_), _) => &mut requests,
                (None, Some(_)) => &mut errors,
                (None, None) => break,
            };
            let Some(key) = open.blocks.first().map_err(io)?.map(|(k, _)| k.value()) else {
                break;
            };
            if let Some(gone) = open.remove_block(key)? {
                deleted += decode(&unpack(gone.value())).len();
            }
        }
        requests.retire_groups()?;
        errors.retire_groups()?;
        grown = requests.grown + errors.grown;
    }
    account(&tx, grown)?;
    tx.commit().map_err(io)?;
    Ok(deleted)
}

/// The tables of one log, open in a write transaction.
struct Open<'tx> {
    log: Log,
    /// Bytes of blocks added less bytes of blocks removed, in this transaction.
    grown: i64,
    blocks: redb::Table<'tx, Row, &'static [u8]>,
    groups: redb::Table<'tx, Row, &'static [u8]>,
    key_filters: redb::Table<'tx, Row, &'static [u8]>,
    by_model: redb::Table<'tx, Index, &'static [u8]>,
    by_class: redb::Table<'tx, Index, &'static [u8]>,
    by_status: redb::Table<'tx, StatusIndex, &'static [u8]>,
}

/// The index entries of a group of blocks: for each value, the blocks that have it.
#[derive(Default)]
struct Postings<'a> {
    models: BTreeMap<&'a str, Vec<Row>>,
    classes: BTreeMap<&'a str, Vec<Row>>,
    statuses: BTreeMap<u16, Vec<Row>>,
    /// The group's first and last block.
    span: Option<(Row, Row)>,
}

impl<'a> Postings<'a> {
    /// Adds block `block`, which holds `records` (blocks are added in row order).
    fn add(&mut self, block: Row, records: impl Iterator<Item = &'a Record>) {
        fn post<V: Ord>(map: &mut BTreeMap<V, Vec<Row>>, value: V, block: Row) {
            let blocks = map.entry(value).or_default();
            if blocks.last() != Some(&block) {
                blocks.push(block);
            }
        }
        for r in records {
            post(&mut self.models, r.model.as_str(), block);
            if let Some(c) = &r.class {
                post(&mut self.classes, c.as_str(), block);
            }
            post(&mut self.statuses, r.status, block);
        }
        self.span = Some((self.span.map_or(block, |(first, _)| first), block));
    }

    fn of(block: Row, records: impl Iterator<Item = &'a Record>) -> Postings<'a> {
        let mut p = Postings::default();
        p.add(block, records);
        p
    }
}

/// Rows as an index entry stores them: 16 bytes each.
fn rows_bytes(rows: &[Row]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * rows.len());
    for row in rows {
        out.extend_from_slice(&row.0.to_le_bytes());
        out.extend_from_slice(&row.1.to_le_bytes());
    }
    out
}

fn rows_of(bytes: &[u8]) -> Vec<Row> {
    bytes
        .chunks_exact(16)
        .filter_map(|c| Some((u64_at(c, 0)?, u64_at(c, 8)?)))
        .collect()
}

/// A key's hash in a key filter: FNV-1a, fixed, as it is stored.
fn key_hash(key: &str) -> u32 {
    key.bytes().fold(0x811c_9dc5, |h: u32, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A block's key filter: the hashes ([`key_hash`]) of the keys its records have, each once,
/// sorted (`u32`, little-endian). Keys that share a hash find each other's blocks too: the
/// query checks every record it reads.
fn key_filter<'r>(records: impl Iterator<Item = &'r Record>) -> Vec<u8> {
    let mut hashes: Vec<u32> = records
        .filter_map(|r| r.key_id.as_deref().map(key_hash))
        .collect();
    hashes.sort_unstable();
    hashes.dedup();
    hashes.iter().flat_map(|h| h.to_le_bytes()).collect()
}

/// Whether key filter `filter` has `key`'s hash, by a binary search of its sorted hashes (a
/// damaged filter is read as far as it goes).
fn filter_has(filter: &[u8], key: &str) -> bool {
    let (hashes, _) = filter.as_chunks::<4>();
    hashes
        .binary_search_by_key(&key_hash(key), |h| u32::from_le_bytes(*h))
        .is_ok()
}

/// The tags of a group's values in its row (0 was a key's, in data layout 3).
const MODEL: u8 = 1;
const CLASS: u8 = 2;
const STATUS: u8 = 3;

/// A group's row: its last block, then each value it has entries for, as (tag, length as
/// `u16`, bytes); a status is its two bytes. Read back to delete the entries with the group.
fn group_row(last: Row, p: &Postings) -> Vec<u8> {
    let mut out = rows_bytes(&[last]);
    let mut put = |tag: u8, bytes: &[u8]| {
        // Keys, models and classes are gemgate's own short names; a longer one is cut.
        let bytes = &bytes[..bytes.len().min(u16::MAX as usize)];
        out.push(tag);
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    p.models.keys().for_each(|m| put(MODEL, m.as_bytes()));
    p.classes.keys().for_each(|c| put(CLASS, c.as_bytes()));
    p.statuses
        .keys()
        .for_each(|s| put(STATUS, &s.to_le_bytes()));
    out
}

/// A group's row read back: its last block and its (tag, value) pairs.
fn group_values(bytes: &[u8]) -> (Row, Vec<(u8, &[u8])>) {
    let last = rows_of(bytes.get(..16).unwrap_or_default())
        .first()
        .copied()
        .unwrap_or((0, 0));
    let mut values = Vec::new();
    let mut at = 16;
    while let (Some(&tag), Some(len)) = (bytes.get(at), bytes.get(at + 1..at + 3)) {
        let len = u16::from_le_bytes([len[0], len[1]]) as usize;
        let Some(value) = bytes.get(at + 3..at + 3 + len) else {
            break;
        };
        values.push((tag, value));
        at += 3 + len;
    }
    (last, values)
}

/// Inserts the index entry of each value `postings` has, named by `entry(value)`.
fn insert_all<'k, K: redb::Key + 'static, V: Copy>(
    table: &mut redb::Table<K, &'static [u8]>,
    postings: &BTreeMap<V, Vec<Row>>,
    entry: impl Fn(V) -> K::SelfType<'k>,
) -> Result<(), StoreError> {
    for (value, blocks) in postings {
        let blocks = rows_bytes(blocks);
        table.insert(entry(*value), blocks.as_slice()).map_err(io)?;
    }
    Ok(())
}

/// Takes `gone` out of the blocks of index entry `entry`, and puts `new` in (a block rewritten
/// under a new first row); an entry left with no block goes.
fn relist<'k, K: redb::Key + 'static>(
    table: &mut redb::Table<K, &'static [u8]>,
    entry: K::SelfType<'k>,
    gone: Row,
    new: Option<Row>,
) -> Result<(), StoreError>
where
    K::SelfType<'k>: Copy,
{
    let Some(mut rows) = table.get(entry).map_err(io)?.map(|v| rows_of(v.value())) else {
        return Ok(());
    };
    rows.retain(|r| *r != gone);
    rows.extend(new);
    rows.sort_unstable();
    rows.dedup();
    if rows.is_empty() {
        table.remove(entry).map_err(io)?;
    } else {
        table
            .insert(entry, rows_bytes(&rows).as_slice())
            .map_err(io)?;
    }
    Ok(())
}

impl<'tx> Open<'tx> {
    fn new(tx: &'tx redb::WriteTransaction, log: Log) -> Result<Open<'tx>, StoreError> {
        let t = tables(log);
        Ok(Open {
            log,
            grown: 0,
            blocks: tx.open_table(t.blocks).map_err(io)?,
            groups: tx.open_table(t.groups).map_err(io)?,
            key_filters: tx.open_table(t.key_filters).map_err(io)?,
            by_model: tx.open_table(t.by_model).map_err(io)?,
            by_class: tx.open_table(t.by_class).map_err(io)?,
            by_status: tx.open_table(t.by_status).map_err(io)?,
        })
    }

    /// The last row written, or (0, 0).
    fn last_row(&self) -> Result<Row, StoreError> {
        Ok(self
            .blocks
            .last()
            .map_err(io)?
            .map_or((0, 0), |(_, v)| last_row(v.value())))
    }

    /// Stores records (in row order) as one block, and adds it to `group`, whose entries
    /// [`Open::index`] writes. Returns the block's bytes.
    fn put_block<'r>(
        &mut self,
        entries: impl Iterator<Item = (Row, &'r [u8], &'r Record)> + Clone,
        group: &mut Postings<'r>,
    ) -> Result<usize, StoreError> {
        let Some((key, ..)) = entries.clone().next() else {
            return Ok(0);
        };
        let bytes = encode(entries.clone().map(|(row, json, _)| (row, json)));
        self.blocks.insert(key, bytes.as_slice()).map_err(io)?;
        self.grown += bytes.len() as i64;
        self.put_filter(key, entries.clone().map(|(.., r)| r))?;
        group.add(key, entries.map(|(.., r)| r));
        Ok(bytes.len())
    }

    /// Writes the key filter of block `key`, which holds `records`.
    fn put_filter<'r>(
        &mut self,
        key: Row,
        records: impl Iterator<Item = &'r Record>,
    ) -> Result<(), StoreError> {
        let filter = key_filter(records);
        self.key_filters
            .insert(key, filter.as_slice())
            .map_err(io)?;
        Ok(())
    }

    /// Removes block `key` with its key filter; returns its bytes (read in place: a caller
    /// that only removes it copies nothing).
    fn remove_block(
        &mut self,
        key: Row,
    ) -> Result<Option<redb::AccessGuard<'_, &'static [u8]>>, StoreError> {
        self.key_filters.remove(key).map_err(io)?;
        let gone = self.blocks.remove(key).map_err(io)?;
        self.grown -= gone.as_ref().map_or(0, |v| v.value().len()) as i64;
        Ok(gone)
    }

    /// Stores records `chosen` (in row order; `entry(i)` is record `i`'s row, JSON and
    /// record) as blocks sized to fill their pages ([`records_per_block`]), and indexes them
    /// as one group.
    fn put_group<'r>(
        &mut self,
        chosen: &[usize],
        entry: impl Fn(usize) -> (Row, &'r [u8], &'r Record),
    ) -> Result<(), StoreError> {
        let mut group = Postings::default();
        let mut rest = chosen;
        while !rest.is_empty() {
            let most = records_per_block(self.log);
            let n = block_len(rest, |i| entry(i).1.len(), most);
            let (block, after) = rest.split_at(n);
            let bytes = self.put_block(block.iter().map(|&i| entry(i)), &mut group)?;
            observe_block(self.log, n, bytes);
            rest = after;
            // NOTE: a block costs about a quarter millisecond of CPU (compressed, then written
            // into the tree), and the flusher's committer runs at normal priority. Written in
            // one go, a quarter second's records at 10,000 requests a second held a core for
            // 2-3 ms, and a request thread woken on that core waited for all of it (the
            // scheduler lets a running thread finish its time slice): most of gemgate's p99 at
            // one connection (0.9-1.0 ms; 0.6 with this). A thread waiting for the core has it
            // between blocks. The write lock stays held meanwhile: the only request that waits
            // for it is a Responses API call storing its answer, a little longer.
            std::thread::yield_now();
        }
        self.index(group)
    }

    /// Writes the index entries of the blocks `group` has, as one group.
    fn index(&mut self, group: Postings) -> Result<(), StoreError> {
        let Some((first, last)) = group.span else {
            return Ok(());
        };
        let (t, s) = (first.0, first.1);
        insert_all(&mut self.by_model, &group.models, |m| (m, t, s))?;
        insert_all(&mut self.by_class, &group.classes, |c| (c, t, s))?;
        insert_all(&mut self.by_status, &group.statuses, |status| {
            (status, t, s)
        })?;
        let row = group_row(last, &group);
        self.groups.insert(first, row.as_slice()).map_err(io)?;
        Ok(())
    }

    /// Replaces block `key`, whose records are `old`, by the records `kept` (a new block
    /// named by its first row; none: the block goes), and mends its group's entries.
    fn rewrite_block<'r>(
        &mut self,
        key: Row,
        old: impl Iterator<Item = &'r Record>,
        kept: impl Iterator<Item = (Row, &'r [u8], &'r Record)> + Clone,
    ) -> Result<(), StoreError> {
        self.remove_block(key)?;
        let mut now = Postings::default();
        self.put_block(kept, &mut now)?;
        let new = now.span.map(|(first, _)| first);
        if new == Some(key) {
            // Same name: its entries still find it (values it lost are checked by the query).
            return Ok(());
        }
        let group = self.groups.range(..=key).map_err(io)?.next_back();
        let Some((group, row)) = group
            .transpose()
            .map_err(io)?
            .map(|(k, v)| (k.value(), v.value().to_vec()))
        else {
            return Ok(());
        };
        let (t, s) = group;
        let before = Postings::of(key, old);
        let moved = |has: bool| new.filter(|_| has);
        for m in before.models.keys() {
            let has = now.models.contains_key(m);
            relist(&mut self.by_model, (*m, t, s), key, moved(has))?;
        }
        for c in before.classes.keys() {
            let has = now.classes.contains_key(c);
            relist(&mut self.by_class, (*c, t, s), key, moved(has))?;
        }
        for st in before.statuses.keys() {
            let has = now.statuses.contains_key(st);
            relist(&mut self.by_status, (*st, t, s), key, moved(has))?;
        }
        // The group's last block moved on: its entries go only once that one is gone too.
        if let Some(new) = new.filter(|_| group_values(&row).0 == key) {
            let mut row = row;
            row[..16].copy_from_slice(&rows_bytes(&[new]));
            self.groups.insert(group, row.as_slice()).map_err(io)?;
        }
        Ok(())
    }

    /// Deletes the groups none of whose blocks are left, with their index entries.
    fn retire_groups(&mut self) -> Result<(), StoreError> {
        let first_block = self.blocks.first().map_err(io)?.map(|(k, _)| k.value());
        loop {
            let oldest = self.groups.first().map_err(io)?;
            let Some((group, row)) = oldest.map(|(k, v)| (k.value(), v.value().to_vec())) else {
                return Ok(());
            };
            let (last, values) = group_values(&row);
            if first_block.is_some_and(|first| last >= first) {
                return Ok(());
            }
            let (t, s) = group;
            for (tag, value) in values {
                let text = std::str::from_utf8(value).unwrap_or_default();
                match tag {
                    MODEL => self.by_model.remove((text, t, s)).map_err(io)?,
                    CLASS => self.by_class.remove((text, t, s)).map_err(io)?,
                    STATUS => {
                        let status = u16::from_le_bytes(value.try_into().unwrap_or_default());
                        self.by_status.remove((status, t, s)).map_err(io)?
                    }
                    _ => None,
                };
            }
            self.groups.remove(group).map_err(io)?;
        }
    }

    /// Indexes every block anew, groups of [`REINDEX_GROUP`] blocks at a time (data layout 2
    /// indexed each block on its own).
    fn reindex(&mut self) -> Result<(), StoreError> {
        let mut from = (0, 0);
        loop {
            let chunk: Vec<(Row, Vec<u8>)> = self
                .blocks
                .range(from..)
                .map_err(io)?
                .take(REINDEX_GROUP)
                .map(|e| e.map(|(k, v)| (k.value(), v.value().to_vec())))
                .collect::<Result<_, _>>()
                .map_err(io)?;
            let Some(&(last, _)) = chunk.last() else {
                return Ok(());
            };
            let parsed: Vec<(Row, Vec<Record>)> = chunk
                .iter()
                .map(|(key, bytes)| {
                    let records = decode(&unpack(bytes))
                        .into_iter()
                        .filter_map(|(_, json)| serde_json::from_slice(json).ok())
                        .collect();
                    (*key, records)
                })
                .collect();
            let mut group = Postings::default();
            for (key, records) in &parsed {
                self.put_filter(*key, records.iter())?;
                group.add(*key, records.iter());
            }
            self.index(group)?;
            from = (last.0, last.1 + 1);
        }
    }
}

/// Blocks per group when a data file of layout 2 is reindexed.
const REINDEX_GROUP: usize = 64;

/// Creates the tables, and converts the one-row-per-record tables of data layout 1, the
/// block-by-block indexes of layout 2 and the key entries of layout 3.
pub fn create(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    for t in [&REQUESTS, &ERRORS] {
        tx.open_table(t.blocks).map_err(io)?;
        tx.open_table(t.groups).map_err(io)?;
        tx.open_table(t.key_filters).map_err(io)?;
        tx.open_table(t.by_model).map_err(io)?;
        tx.open_table(t.by_class).map_err(io)?;
        tx.open_table(t.by_status).map_err(io)?;
    }
    let existing: BTreeSet<String> = tx
        .list_tables()
        .map_err(io)?
        .map(|t| t.name().to_owned())
        .collect();
    reindex_key_groups(tx, &existing)?;
    for (log, names) in BLOCK_INDEXES {
        if !names.iter().any(|n| existing.contains(*n)) {
            continue;
        }
        tracing::info!(
            log = log.name(),
            "indexing the log by groups of blocks (data layout 3), once"
        );
        Open::new(tx, log)?.reindex()?;
        for name in names.into_iter().filter(|n| existing.contains(*n)) {
            // Deleting a table needs only its name, whatever its key type.
            tx.delete_table(TableDefinition::<&str, ()>::new(name))
                .map_err(io)?;
        }
    }
    for (log, old) in OLD_ROWS {
        if !existing.contains(old.name()) {
            continue;
        }
        {
            let table = tx.open_table(old).map_err(io)?;
            let mut open = Open::new(tx, log)?;
            let mut batch: Vec<(Row, Vec<u8>, Record)> = Vec::with_capacity(BLOCK);
            let mut put = |batch: &mut Vec<(Row, Vec<u8>, Record)>| {
                let mut group = Postings::default();
                open.put_block(
                    batch.iter().map(|(row, j, r)| (*row, &j[..], r)),
                    &mut group,
                )?;
                open.index(group)?;
                batch.clear();
                Ok::<_, StoreError>(())
            };
            for e in table.iter().map_err(io)? {
                let (k, v) = e.map_err(io)?;
                if let Ok(r) = serde_json::from_slice::<Record>(v.value()) {
                    batch.push((k.value(), v.value().to_vec(), r));
                }
                if batch.len() == BLOCK {
                    put(&mut batch)?;
                }
            }
            put(&mut batch)?;
        }
        tx.delete_table(old).map_err(io)?;
    }
    for name in OLD_INDEXES.into_iter().filter(|n| existing.contains(*n)) {
        // Deleting a table needs only its name, whatever its key type.
        tx.delete_table(TableDefinition::<&str, ()>::new(name))
            .map_err(io)?;
    }
    // A file from before the blocks' bytes were counted: count them once.
    let mut meta = tx.open_table(crate::store::META).map_err(io)?;
    if meta.get(LOG_BYTES).map_err(io)?.is_none() {
        let mut total = 0u64;
        for t in [&REQUESTS, &ERRORS] {
            for e in tx.open_table(t.blocks).map_err(io)?.iter().map_err(io)? {
                total += e.map_err(io)?.1.value().len() as u64;
            }
        }
        meta.insert(LOG_BYTES, total).map_err(io)?;
    }
    Ok(())
}

/// Indexes anew the logs whose keys data layout 3 indexed by entries (`existing`: the file's
/// tables).
fn reindex_key_groups(
    tx: &redb::WriteTransaction,
    existing: &BTreeSet<String>,
) -> Result<(), StoreError> {
    for (log, old) in KEY_GROUPS
        .into_iter()
        .filter(|(_, old)| existing.contains(*old))
    {
        tracing::info!(
            log = log.name(),
            "indexing the log's keys by key filters (data layout 4), once"
        );
        let t = tables(log);
        tx.delete_table(t.groups).map_err(io)?;
        tx.delete_table(t.key_filters).map_err(io)?;
        tx.delete_table(t.by_model).map_err(io)?;
        tx.delete_table(t.by_class).map_err(io)?;
        tx.delete_table(t.by_status).map_err(io)?;
        // Deleting a table needs only its name, whatever its key type.
        tx.delete_table(TableDefinition::<&str, ()>::new(old))
            .map_err(io)?;
        Open::new(tx, log)?.reindex()?;
    }
    Ok(())
}

/// Rows of `log` matching `q`, newest first, and the cursor of the next page. The most
/// selective index the query names is walked newest first; each block it yields is read
/// newest first and its records checked against the filters, and the walk stops as soon as
/// the page is full (or the records are older than `from_ms`).
pub fn query(db: &Database, log: Log, q: &Query) -> Result<Page, StoreError> {
    let t = tables(log);
    let tx = db.begin_read().map_err(io)?;
    let blocks = tx.open_table(t.blocks).map_err(io)?;
    let from = q.from_ms.unwrap_or(0);
    let to = q.to_ms.unwrap_or(u64::MAX);
    let upper: Row = match q.before {
        Some(b) if b < (to, u64::MAX) => b,
        _ => (to, u64::MAX),
    };
    let limit = q.limit.clamp(1, 1000);
    let mut out: Vec<(Row, Record)> = Vec::new();
    let mut next = None;
    // A record whose JSON does not even contain the values asked for is not parsed (values
    // that JSON would escape are left to the parsed check).
    let needles: Vec<memchr::memmem::Finder> = [&q.key_id, &q.model, &q.class]
        .into_iter()
        .flatten()
        .filter(|v| v.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'))
        .map(|v| memchr::memmem::Finder::new(v.as_bytes()))
        .collect();
    // Reads one block newest first; `false` ends the walk.
    let mut take = |key: Row| -> Result<bool, StoreError> {
        let Some(value) = blocks.get(key).map_err(io)? else {
            return Ok(true);
        };
        for (row, json) in decode(&unpack(value.value())).into_iter().rev() {
            if row >= upper {
                continue;
            }
            if row.0 < from {
                return Ok(false);
            }
            if needles.iter().any(|n| n.find(json).is_none()) {
                continue;
            }
            let Ok(r) = serde_json::from_slice::<Record>(json) else {
                continue;
            };
            if !q.matches(&r) {
                continue;
            }
            if out.len() == limit {
                next = out.last().map(|(row, _)| *row);
                return Ok(false);
            }
            out.push((row, r));
        }
        Ok(true)
    };
    walk_matching(&tx, t, q, upper, &mut take)?;
    Ok((out, next))
}

/// Feeds `take` the blocks that may hold records matching `q`, before `upper`, newest first:
/// from the most selective index `q` names, or every block.
fn walk_matching(
    tx: &redb::ReadTransaction,
    t: &Tables,
    q: &Query,
    upper: Row,
    take: &mut dyn FnMut(Row) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    if let Some(key) = q.key_id.as_deref() {
        let filters = tx.open_table(t.key_filters).map_err(io)?;
        let range = filters.range(..upper).map_err(io)?;
        let has = |(block, filter): (redb::AccessGuard<Row>, redb::AccessGuard<&[u8]>)| {
            let has = filter_has(filter.value(), key);
            has.then(|| block.value()).into_iter().collect()
        };
        walk(range.rev().map(|e| e.map(has)), upper, take)?;
    } else if let Some((def, value)) = [
        (t.by_class, q.class.as_deref()),
        (t.by_model, q.model.as_deref()),
    ]
    .into_iter()
    .find_map(|(def, v)| Some((def, v?)))
    {
        walk_index!(tx, def, value, upper, take);
    } else if let Some(s) = q.status {
        walk_index!(tx, t.by_status, s, upper, take);
    } else {
        let blocks = tx.open_table(t.blocks).map_err(io)?;
        let range = blocks.range(..upper).map_err(io)?;
        walk(
            range.rev().map(|e| e.map(|(k, _)| vec![k.value()])),
            upper,
            take,
        )?;
    }
    Ok(())
}

/// Walks the blocks index `$def` names for `$value`, up to row `$upper`, newest first. (A
/// macro: the indexes' keys differ in their first element's type.)
macro_rules! walk_index {
    ($tx:expr, $def:expr, $value:expr, $upper:expr, $take:expr) => {{
        let idx = $tx.open_table($def).map_err(io)?;
        let range = idx
            .range(($value, 0, 0)..($value, $upper.0, $upper.1))
            .map_err(io)?;
        walk(
            range
                .rev()
                .map(|e| e.map(|(_, rows)| rows_of(rows.value()))),
            $upper,
            $take,
        )?;
    }};
}
use walk_index;

/// Feeds blocks before `upper` to `take`, newest first, until it says stop; `groups` are
/// groups' blocks, newest group first (groups never overlap).
fn walk(
    groups: impl Iterator<Item = Result<Vec<Row>, redb::StorageError>>,
    upper: Row,
    take: &mut dyn FnMut(Row) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    for blocks in groups {
        let mut blocks = blocks.map_err(io)?;
        blocks.sort_unstable_by(|a, b| b.cmp(a));
        for key in blocks.into_iter().filter(|b| *b < upper) {
            if !take(key)? {
                return Ok(());
            }
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
    let blocks = tx.open_table(tables(log).blocks).map_err(io)?;
    // The block holding `from_ms` may start before it.
    let start = block_of(&blocks, (from_ms, 0))?.unwrap_or((from_ms, 0));
    let mut out = Vec::with_capacity(batch);
    for entry in blocks.range(start..).map_err(io)? {
        let (_, v) = entry.map_err(io)?;
        for (row, json) in decode(&unpack(v.value())) {
            if row.0 < from_ms {
                continue;
            }
            if let Ok(r) = serde_json::from_slice(json) {
                out.push(r);
            }
            if out.len() >= batch {
                each(std::mem::take(&mut out));
            }
        }
    }
    if !out.is_empty() {
        each(out);
    }
    Ok(())
}

/// The key of the block that holds `row`, if any.
fn block_of(
    blocks: &impl ReadableTable<Row, &'static [u8]>,
    row: Row,
) -> Result<Option<Row>, StoreError> {
    Ok(blocks
        .range(..=row)
        .map_err(io)?
        .next_back()
        .transpose()
        .map_err(io)?
        .map(|(k, _)| k.value()))
}

/// One row, by its (time, sequence).
pub fn get(db: &Database, log: Log, row: Row) -> Result<Option<Record>, StoreError> {
    let tx = db.begin_read().map_err(io)?;
    let blocks = tx.open_table(tables(log).blocks).map_err(io)?;
    let Some(key) = block_of(&blocks, row)? else {
        return Ok(None);
    };
    let Some(value) = blocks.get(key).map_err(io)? else {
        return Ok(None);
    };
    Ok(decode(&unpack(value.value()))
        .into_iter()
        .find(|(r, _)| *r == row)
        .and_then(|(_, json)| serde_json::from_slice(json).ok()))
}

/// Deletes the rows older than `before_ms`, and the given rows; returns how many went.
pub fn delete(
    db: &Database,
    log: Log,
    before_ms: Option<u64>,
    rows: &[Row],
) -> Result<usize, StoreError> {
    let tx = db.begin_write().map_err(io)?;
    let mut deleted = 0;
    let grown;
    {
        let mut open = Open::new(&tx, log)?;
        // The blocks to rewrite, each with the rows named in it.
        let mut touched: BTreeMap<Row, BTreeSet<Row>> = BTreeMap::new();
        if let Some(cutoff) = before_ms {
            for e in open.blocks.range(..(cutoff, 0)).map_err(io)? {
                touched.entry(e.map_err(io)?.0.value()).or_default();
            }
        }
        for &row in rows {
            if let Some(key) = block_of(&open.blocks, row)? {
                touched.entry(key).or_default().insert(row);
            }
        }
        for (key, named) in touched {
            let Some(bytes) = open
                .blocks
                .get(key)
                .map_err(io)?
                .map(|v| v.value().to_vec())
            else {
                continue;
            };
            let plain = unpack(&bytes);
            let records: Vec<(Row, &[u8], Record)> = decode(&plain)
                .into_iter()
                .filter_map(|(row, json)| Some((row, json, serde_json::from_slice(json).ok()?)))
                .collect();
            let goes = |row: &Row| named.contains(row) || before_ms.is_some_and(|c| row.0 < c);
            let gone = records.iter().filter(|(row, ..)| goes(row)).count();
            if gone == 0 {
                continue;
            }
            deleted += gone;
            open.rewrite_block(
                key,
                records.iter().map(|(.., r)| r),
                records
                    .iter()
                    .filter(|(row, ..)| !goes(row))
                    .map(|(row, json, r)| (*row, *json, r)),
            )?;
        }
        open.retire_groups()?;
        grown = open.grown;
    }
    account(&tx, grown)?;
    tx.commit().map_err(io)?;
    Ok(deleted)
}

#[cfg(test)]
impl Record {
    /// A record with every field set, odd characters in its strings (tests).
    pub(crate) fn every_field() -> Record {
        Record {
            ts_ms: u64::MAX,
            id: "r-\"1\"\\\n\u{1}é😀".into(),
            client: Some("team a".into()),
            model: "gemini-2.5-flash".into(),
            action: "generateContent".into(),
            key_id: Some("k1".into()),
            status: 429,
            class: Some("rate_limited".into()),
            attempts: 3,
            latency_ms: 12.345_678,
            ttfb_ms: Some(0.1),
            prompt_tokens: 7,
            output_tokens: 0,
            thought_tokens: 1 << 40,
            upstream_status: Some(429),
            upstream_message: Some("Quota exceeded\t".into()),
            request_body: Some("{\"contents\":[]}".into()),
            unsampled: false,
            asked_model: Some("gpt-4o".into()),
            instance: Some("pod-1:8000".into()),
            trace: Some(serde_json::json!({ "steps": [{ "plugin": "p", "us": 3 }], "key": "k1" })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;

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

    /// A request as a busy gateway logs it: realistic ids, models, keys and timings.
    fn realistic(n: u64) -> Record {
        Record {
            ts_ms: 1_796_000_000_000 + n * 3,
            id: format!("{:016x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            client: Some(format!("team-{}", n % 7)),
            model: ["gemini-2.5-flash", "gemini-2.5-pro", "gemini-3-pro-preview"][n as usize % 3]
                .into(),
            action: "generateContent".into(),
            key_id: Some(format!("k-{:08x}", n % 40)),
            status: if n.is_multiple_of(50) { 429 } else { 200 },
            attempts: 1,
            latency_ms: 100.0 + (n % 997) as f64 * 1.37,
            ttfb_ms: Some(90.0 + (n % 991) as f64 * 1.11),
            prompt_tokens: 200 + n % 1000,
            output_tokens: 50 + n % 700,
            thought_tokens: n % 300,
            ..Record::default()
        }
    }

    #[test]
    fn blocks_are_compressed_and_read_back_as_written() {
        let records: Vec<Record> = (0..256).map(realistic).collect();
        let json: Vec<Vec<u8>> = records.iter().map(|r| r.json(true)).collect();
        let rows: Vec<Row> = records.iter().map(|r| (r.ts_ms, 0)).collect();
        let entries = || rows.iter().copied().zip(json.iter().map(Vec::as_slice));
        let block = encode(entries());
        let plain: usize = json.iter().map(|j| 20 + j.len()).sum();
        // A tenfold saving, give or take.
        assert!(block.len() * 6 < plain, "{} of {plain} bytes", block.len());
        assert_eq!(last_row(&block), *rows.last().unwrap());
        assert_eq!(decode(&unpack(&block)), entries().collect::<Vec<_>>());
        // Blocks written before compression read as they did.
        let mut old = Vec::new();
        old.extend_from_slice(&rows[255].0.to_le_bytes());
        old.extend_from_slice(&0u64.to_le_bytes());
        for (row, j) in entries() {
            old.extend_from_slice(&row.0.to_le_bytes());
            old.extend_from_slice(&row.1.to_le_bytes());
            old.extend_from_slice(&(j.len() as u32).to_le_bytes());
            old.extend_from_slice(j);
        }
        assert_eq!(last_row(&old), rows[255]);
        assert_eq!(decode(&unpack(&old)), entries().collect::<Vec<_>>());
        // A damaged block keeps its last row and yields no records, rather than failing.
        let mut damaged = block.clone();
        damaged.truncate(40);
        assert_eq!(last_row(&damaged), rows[255]);
        assert!(decode(&unpack(&damaged)).is_empty());
        // A single record too small to gain is stored as it is.
        let tiny = encode(std::iter::once(((5, 0), &b"{}"[..])));
        assert_eq!(decode(&unpack(&tiny)), vec![((5, 0), &b"{}"[..])]);
    }

    #[test]
    fn a_logged_request_costs_well_under_a_hundred_bytes_stored() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("logs.redb")).unwrap();
        let seq = AtomicU64::new(0);
        let n = 20_000u64;
        for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
            let records: Vec<Record> = chunk.iter().map(|&i| realistic(i)).collect();
            write(&db, &records, &seq).unwrap();
        }
        let stored = stored_bytes(&db).unwrap();
        assert!(stored / n < 60, "{} bytes per record", stored / n);
        // Queries still find what they ask for.
        let page = query(
            &db,
            Log::Errors,
            &Query {
                limit: 1000,
                ..Query::default()
            },
        )
        .unwrap();
        assert_eq!(page.0.len(), (n / 50) as usize);
    }

    #[test]
    fn blocks_are_cut_to_fill_the_pages_they_take() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(dir.path());
        let seq = AtomicU64::new(0);
        // Keys of a pool of 100,000 taken in turn: records compress less, and 256 of them
        // spill past a page of 8 KiB.
        let spread = |n: u64| Record {
            key_id: Some(format!("k{:012x}", n.wrapping_mul(0x9e37_79b9) % 100_000)),
            ..realistic(n)
        };
        let sizes = |from: Row| -> Vec<(usize, usize)> {
            let tx = db.begin_read().unwrap();
            let blocks = tx.open_table(REQUESTS.blocks).unwrap();
            let range = blocks.range(from..).unwrap();
            range
                .map(|e| {
                    let v = e.unwrap().1;
                    (decode(&unpack(v.value())).len(), v.value().len())
                })
                .collect()
        };
        PER_RECORD.set([0.0; 2]);
        let all: Vec<Record> = (0..4096).map(spread).collect();
        write(&db, &all, &seq).unwrap();
        let sizes = sizes((0, 0));
        // The first block, before anything was known, spilled past a page of 8 KiB; the
        // rest (but the last, what was left) fill one.
        assert!(sizes[0].0 == BLOCK && sizes[0].1 > 8192, "{sizes:?}");
        let cut = &sizes[1..sizes.len() - 1];
        assert!(
            cut.iter()
                .all(|&(n, bytes)| n < BLOCK && bytes + 128 <= 8192 && bytes > 7000),
            "{sizes:?}"
        );
        assert_eq!(sizes.iter().map(|&(n, _)| n).sum::<usize>(), 4096);
        // Records that compress well fill blocks of BLOCK as before.
        PER_RECORD.set([29.0, 0.0]);
        assert_eq!(records_per_block(Log::Requests), BLOCK);
        PER_RECORD.set([34.0, 0.0]);
        let n = records_per_block(Log::Requests);
        assert!((200..BLOCK).contains(&n), "{n}");
    }

    #[test]
    fn a_record_is_stored_as_serde_writes_it() {
        let full = Record::every_field();
        let odd = Record {
            latency_ms: f64::NAN,
            ttfb_ms: Some(f64::INFINITY),
            ..Record::default()
        };
        for r in [full.clone(), odd, Record::default()] {
            assert_eq!(r.json(false), serde_json::to_vec(&r).unwrap());
        }
        let lean = Record {
            upstream_message: None,
            request_body: None,
            ..full.clone()
        };
        assert_eq!(full.json(true), serde_json::to_vec(&lean).unwrap());
        let back: Record = serde_json::from_slice(&full.json(false)).unwrap();
        assert_eq!(back, full);
    }

    #[test]
    fn records_sampled_out_are_stored_only_when_they_failed() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(dir.path());
        let out = |r: Record| Record {
            unsampled: true,
            ..r
        };
        let records = [
            out(record(1, 200, "k1", None)),
            out(record(2, 429, "k1", Some("rate_limited"))),
            record(3, 200, "k2", None),
            record(4, 429, "k2", Some("rate_limited")),
        ];
        // A success sampled out is encoded for neither log.
        let encoded: Vec<Encoded> = records.iter().map(Encoded::of).collect();
        assert_eq!(encoded[0].bytes(), 0);
        assert!(encoded[1].lean.is_none(), "not for the request log");
        assert!(encoded[3].lean.is_some());
        write_encoded(&db, &records, &encoded, &AtomicU64::new(0)).unwrap();
        let ts = |log| {
            let page = page_of(&db, log, None, 10);
            page.iter().map(|(_, r)| r.ts_ms).collect::<Vec<_>>()
        };
        assert_eq!(ts(Log::Requests), [4, 3]);
        assert_eq!(ts(Log::Errors), [4, 2]);
        let kept = page_of(&db, Log::Errors, None, 10);
        assert_eq!(kept[1].1.upstream_message.as_deref(), Some("quota"));
    }

    /// The first page of `log`'s records (of key `key`, if given).
    fn page_of(db: &Database, log: Log, key: Option<&str>, limit: usize) -> Vec<(Row, Record)> {
        let q = Query {
            key_id: key.map(str::to_owned),
            limit,
            ..Query::default()
        };
        query(db, log, &q).unwrap().0
    }

    /// The first page of the request log's records (of key `key`, if given).
    fn requests_of(db: &Database, key: Option<&str>, limit: usize) -> Vec<(Row, Record)> {
        page_of(db, Log::Requests, key, limit)
    }

    /// Creates the tables, converting what an older layout left.
    fn open_tables(db: &Database) {
        let tx = db.begin_write().unwrap();
        create(&tx).unwrap();
        tx.commit().unwrap();
    }

    fn new_db(dir: &std::path::Path) -> Database {
        let db = Database::create(dir.join("t.redb")).unwrap();
        open_tables(&db);
        db
    }

    /// How many entries a log's index tables hold: (groups, key filters, models, classes,
    /// statuses).
    fn entries(db: &Database, log: Log) -> [u64; 5] {
        let t = tables(log);
        let tx = db.begin_read().unwrap();
        [
            tx.open_table(t.groups).unwrap().len().unwrap(),
            tx.open_table(t.key_filters).unwrap().len().unwrap(),
            tx.open_table(t.by_model).unwrap().len().unwrap(),
            tx.open_table(t.by_class).unwrap().len().unwrap(),
            tx.open_table(t.by_status).unwrap().len().unwrap(),
        ]
    }

    #[test]
    fn a_flush_indexes_each_value_once_however_many_blocks_have_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(dir.path());
        let seq = AtomicU64::new(0);
        // A thousand keys in turn: every block has a quarter of them.
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
        let all: Vec<Record> = (0..4096u64)
            .map(|i| record(1_000 + i, 200, &keys[(i % 1000) as usize], None))
            .collect();
        write(&db, &all[..2048], &seq).unwrap();
        write(&db, &all[2048..], &seq).unwrap();
        // Two flushes of 8 blocks each: an entry per model and status each, not one per block,
        // and a key filter per block, not an entry per key.
        assert_eq!(entries(&db, Log::Requests), [2, 16, 2, 0, 2]);
        assert_eq!(entries(&db, Log::Errors), [0; 5]);
        // A key's records, newest first, across both flushes' blocks.
        let found = requests_of(&db, Some("k7"), 100);
        let want: Vec<u64> = (0..4096u64).rev().filter(|i| i % 1000 == 7).collect();
        assert_eq!(
            found
                .iter()
                .map(|(row, _)| row.0 - 1_000)
                .collect::<Vec<_>>(),
            want
        );

        // Trimming the first flush's blocks retires its entries; the second keeps its own.
        let first_flush: u64 = {
            let tx = db.begin_read().unwrap();
            let blocks = tx.open_table(REQUESTS.blocks).unwrap();
            blocks
                .range(..(1_000 + 2048, 0))
                .unwrap()
                .map(|e| e.unwrap().1.value().len() as u64)
                .sum()
        };
        assert_eq!(trim(&db, first_flush).unwrap(), 2048);
        assert_eq!(entries(&db, Log::Requests), [1, 8, 1, 0, 1]);
        assert_eq!(requests_of(&db, Some("k7"), 100).len(), 2);
        trim(&db, u64::MAX).unwrap();
        assert_eq!(entries(&db, Log::Requests), [0; 5]);
        assert!(requests_of(&db, Some("k7"), 100).is_empty());
    }

    #[test]
    fn a_block_rewritten_under_a_new_name_is_still_found_by_its_values() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(dir.path());
        let seq = AtomicU64::new(0);
        let all: Vec<Record> = (0..600u64)
            .map(|i| record(1_000 + i, 200, ["a", "b"][(i % 2) as usize], None))
            .collect();
        write(&db, &all, &seq).unwrap();
        // The first row of every block goes (and with it the block's name), then the rest of
        // the first block: the flush's last block is renamed, its first is gone.
        let firsts: Vec<Row> = {
            let tx = db.begin_read().unwrap();
            let blocks = tx.open_table(REQUESTS.blocks).unwrap();
            blocks
                .iter()
                .unwrap()
                .map(|e| e.unwrap().0.value())
                .collect()
        };
        assert_eq!(firsts.len(), 3);
        assert_eq!(delete(&db, Log::Requests, None, &firsts).unwrap(), 3);
        // The blocks' first rows (0, 256, 512) were all "a" records.
        assert_eq!(requests_of(&db, Some("a"), 1000).len(), 297);
        assert_eq!(requests_of(&db, Some("b"), 1000).len(), 300);
        assert_eq!(delete(&db, Log::Requests, Some(1_256), &[]).unwrap(), 255);
        assert_eq!(requests_of(&db, None, 1000).len(), 342);
        assert_eq!(
            requests_of(&db, Some("a"), 1000).len() + requests_of(&db, Some("b"), 1000).len(),
            342
        );
        // Once every block that was written with the group is gone, so is the group.
        delete(&db, Log::Requests, Some(u64::MAX), &[]).unwrap();
        assert_eq!(entries(&db, Log::Requests), [0; 5]);
    }

    #[test]
    fn layout_2_block_indexes_are_rebuilt_as_groups() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(dir.path());
        let seq = AtomicU64::new(0);
        let all: Vec<Record> = (0..1000u64)
            .map(|i| {
                record(
                    1_000 + i,
                    429,
                    ["k1", "k2", "k3"][(i % 3) as usize],
                    Some("rate_limited"),
                )
            })
            .collect();
        write(&db, &all, &seq).unwrap();
        // As layout 2 left it: its per-block tables, no groups.
        {
            let tx = db.begin_write().unwrap();
            for t in [&REQUESTS, &ERRORS] {
                tx.delete_table(t.groups).unwrap();
                tx.delete_table(t.key_filters).unwrap();
                tx.delete_table(t.by_model).unwrap();
                tx.delete_table(t.by_class).unwrap();
                tx.delete_table(t.by_status).unwrap();
            }
            for (_, names) in BLOCK_INDEXES {
                let def = TableDefinition::<Index, ()>::new(names[0]);
                tx.open_table(def)
                    .unwrap()
                    .insert(("k1", 1_000, 0), ())
                    .unwrap();
            }
            tx.commit().unwrap();
        }
        open_tables(&db);
        assert_eq!(entries(&db, Log::Requests), [1, 4, 1, 1, 1]);
        for log in [Log::Requests, Log::Errors] {
            assert_eq!(page_of(&db, log, Some("k2"), 1000).len(), 333);
        }
        let tx = db.begin_read().unwrap();
        let names: Vec<String> = tx
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with("_by_key")), "{names:?}");
    }

    #[test]
    fn layout_3_key_entries_are_rebuilt_as_key_filters() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(dir.path());
        let seq = AtomicU64::new(0);
        let all: Vec<Record> = (0..1000u64)
            .map(|i| {
                record(
                    1_000 + i,
                    500,
                    ["k1", "k2"][(i % 2) as usize],
                    Some("upstream"),
                )
            })
            .collect();
        write(&db, &all[..600], &seq).unwrap();
        write(&db, &all[600..], &seq).unwrap();
        // As layout 3 left it: an entry per key per group, no key filters.
        {
            let tx = db.begin_write().unwrap();
            for ((_, old), t) in KEY_GROUPS.into_iter().zip([&REQUESTS, &ERRORS]) {
                tx.delete_table(t.key_filters).unwrap();
                let def = TableDefinition::<Index, &[u8]>::new(old);
                let mut table = tx.open_table(def).unwrap();
                table
                    .insert(("k1", 1_000, 0), rows_bytes(&[(1_000, 0)]).as_slice())
                    .unwrap();
            }
            tx.commit().unwrap();
        }
        open_tables(&db);
        // Reindexed in groups of up to 64 blocks: the 5 blocks are one group now, each with
        // its key filter.
        assert_eq!(entries(&db, Log::Requests), [1, 5, 1, 1, 1]);
        for log in [Log::Requests, Log::Errors] {
            for key in ["k1", "k2"] {
                assert_eq!(page_of(&db, log, Some(key), 1000).len(), 500);
            }
        }
        let tx = db.begin_read().unwrap();
        let mut names = tx.list_tables().unwrap().map(|t| t.name().to_owned());
        assert!(!names.any(|n| n.ends_with("_key_groups")));
    }

    #[test]
    fn a_key_filter_holds_its_blocks_keys_once_and_survives_damage() {
        let record = |key: Option<&str>| Record {
            key_id: key.map(str::to_owned),
            ..Record::default()
        };
        let records = [
            record(Some("b")),
            record(None),
            record(Some("a")),
            record(Some("b")),
        ];
        let filter = key_filter(records.iter());
        assert_eq!(filter.len(), 2 * 4, "a and b, once each");
        assert!(filter_has(&filter, "a") && filter_has(&filter, "b"));
        assert!(!filter_has(&filter, "c"));
        // A filter read back damaged has fewer keys, never panics.
        for cut in 0..filter.len() {
            let _ = filter_has(&filter[..cut], "a");
        }
        assert!(!filter_has(&filter[..3], "a"));
    }

    #[test]
    fn blocks_page_filter_get_and_delete_across_their_edges() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(dir.path());
        let seq = AtomicU64::new(0);
        // Three writes, the middle one out of time order: rows still only grow.
        let all: Vec<Record> = (0..1000u64)
            .map(|i| {
                record(
                    10_000 + i,
                    if i % 7 == 0 { 503 } else { 200 },
                    ["k1", "k2", "k3"][(i % 3) as usize],
                    (i % 7 == 0).then_some("upstream"),
                )
            })
            .collect();
        write(&db, &all[..400], &seq).unwrap();
        let mut late = all[400..700].to_vec();
        late[0].ts_ms = 5;
        write(&db, &late, &seq).unwrap();
        write(&db, &all[700..], &seq).unwrap();

        // Every page of k2's records, newest first, is every k2 record once.
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let q = Query {
                key_id: Some("k2".into()),
                limit: 97,
                before,
                ..Query::default()
            };
            let (page, next) = query(&db, Log::Requests, &q).unwrap();
            seen.extend(page.iter().map(|(row, r)| (*row, r.id.clone())));
            match next {
                Some(n) => before = Some(n),
                None => break,
            }
        }
        let want: Vec<String> = all
            .iter()
            .rev()
            .filter(|r| r.key_id.as_deref() == Some("k2"))
            .map(|r| r.id.clone())
            .collect();
        assert_eq!(
            seen.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>(),
            want
        );
        assert!(seen.windows(2).all(|w| w[0].0 > w[1].0), "newest first");

        // One row by name, from the middle of a block.
        let (row, id) = seen[100].clone();
        assert_eq!(get(&db, Log::Requests, row).unwrap().unwrap().id, id);
        // Errors by status, and a time range that starts inside a block.
        let q = Query {
            status: Some(503),
            from_ms: Some(10_900),
            limit: 1000,
            ..Query::default()
        };
        let (page, _) = query(&db, Log::Errors, &q).unwrap();
        assert_eq!(
            page.len(),
            all[900..].iter().filter(|r| r.status == 503).count()
        );
        let mut since_count = 0;
        since(&db, Log::Requests, 10_500, 64, &mut |b| {
            since_count += b.len()
        })
        .unwrap();
        assert_eq!(since_count, 500);

        // Deleting named rows rewrites their blocks; the rest stays where it was.
        let doomed: Vec<Row> = seen[..50].iter().map(|(row, _)| *row).collect();
        assert_eq!(delete(&db, Log::Requests, None, &doomed).unwrap(), 50);
        assert!(get(&db, Log::Requests, doomed[10]).unwrap().is_none());
        assert_eq!(get(&db, Log::Requests, row).unwrap().unwrap().id, id);
        let page = requests_of(&db, Some("k2"), 1000);
        assert_eq!(page.len(), want.len() - 50);
        // Retention cuts through a block.
        // Rows are named by when they were written: the late record (time 5) went in after
        // 10_399 and is kept.
        assert_eq!(delete(&db, Log::Requests, Some(10_100), &[]).unwrap(), 100);
        let page = requests_of(&db, None, 1000);
        assert_eq!(page.len(), 1000 - 50 - 100);
    }

    #[test]
    fn layout_1_rows_are_converted_into_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let old = record(1234, 429, "k1", Some("rate_limited"));
        {
            let tx = db.begin_write().unwrap();
            for (_, def) in OLD_ROWS {
                let mut t = tx.open_table(def).unwrap();
                t.insert((1234, 7), serde_json::to_vec(&old).unwrap().as_slice())
                    .unwrap();
            }
            let mut idx = tx
                .open_table(TableDefinition::<Index, ()>::new("requests_by_key"))
                .unwrap();
            idx.insert(("k1", 1234, 7), ()).unwrap();
            drop(idx);
            tx.commit().unwrap();
        }
        let tx = db.begin_write().unwrap();
        create(&tx).unwrap();
        tx.commit().unwrap();
        for log in [Log::Requests, Log::Errors] {
            let (page, _) = query(
                &db,
                log,
                &Query {
                    key_id: Some("k1".into()),
                    limit: 10,
                    ..Query::default()
                },
            )
            .unwrap();
            assert_eq!(page, vec![((1234, 7), old.clone())]);
        }
        let tx = db.begin_read().unwrap();
        let names: Vec<String> = tx
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .collect();
        assert!(
            !names
                .iter()
                .any(|n| n == "requests" || n == "requests_by_key"),
            "{names:?}"
        );
        // New records follow the converted ones.
        write(&db, &[record(2000, 200, "k1", None)], &AtomicU64::new(0)).unwrap();
        let page = requests_of(&db, None, 10);
        assert_eq!(
            page.iter().map(|(_, r)| r.ts_ms).collect::<Vec<_>>(),
            [2000, 1234]
        );
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
        let page = requests_of(&db, Some("k2"), 100);
        assert_eq!(page.len(), 10);
    }
}

//! Durable state in one redb file under the data folder: each key's health (disabled flag and
//! reason, per-model cooldowns, consecutive failures, last error), restored at start.
//!
//! The request path never touches the file. A key whose state changes marks itself dirty; a
//! background thread writes the dirty keys in one transaction every [`FLUSH_EVERY`], and once
//! more on shutdown, so a crash loses at most the last second (see `app::flusher`). Kept
//! Responses API answers wait for that flush too, readable meanwhile ([`responses`]).
//!
//! Beside key state the file holds the request and error logs ([`logs`]) and the usage counts
//! ([`usage`]); [`metrics`] keeps the dashboard's figures in memory.

pub mod logs;
pub mod metrics;
mod queue;
pub mod responses;
pub mod usage;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use std::collections::HashMap;

use crate::keys::{Cooldown, KeyRegistry, KeyState};
use crate::store::usage::Counts;

/// The layout version this gemgate writes; older files are migrated, newer ones refused.
/// 2: the logs are stored in blocks of records (layout 1 had a row per record).
/// 3: the logs' indexes have an entry per value per group of blocks (2: per block).
/// 4: the logs' keys are indexed by a key filter per block (3: an entry per key per group).
pub const SCHEMA_VERSION: u64 = 4;
/// redb's page cache: enough for the indexes the admin pages walk. Kept small: it fills as
/// the logs grow, and is memory the gateway holds for pages it rarely reads again (the
/// kernel's page cache keeps the file's hot pages anyway).
const CACHE_BYTES: usize = 4 * 1024 * 1024;
/// How often dirty key state, usage and logs are committed. What waits in memory for a flush
/// is what a busy gateway holds: at 30,000 requests a second, a second of log records took its
/// peak to 160-180 MiB; a quarter second, to 80-110 MiB, at the same throughput.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// Layout version and counters: `schema_version`, `log_bytes` (see `logs`).
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Key id → [`SavedKey`] as JSON.
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("key_state");
/// File id → `key id|expiry ms|client` (the Files API: which key and client own each file;
/// files saved before clients were kept have no `|client`).
const FILES: TableDefinition<&str, &str> = TableDefinition::new("files");
/// A fleet's last known state that Redis alone would otherwise hold: `edits` → the fleet's
/// admin edits, sealed with the fleet secret (see `fleet`).
const FLEET: TableDefinition<&str, &[u8]> = TableDefinition::new("fleet");
/// `DDDDDD|key id|model` (days since the epoch, zero-padded) → [`Counts`] as JSON.
const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage");

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error(
        "{path} was written by a newer gemgate (data layout {found}, this one knows up to {SCHEMA_VERSION}); use that version or move the file away"
    )]
    Newer { path: PathBuf, found: u64 },
    #[error("{0}")]
    Io(String),
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// One key's health as stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SavedKey {
    pub disabled: bool,
    pub disabled_reason: Option<String>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub cooldowns: Vec<SavedCooldown>,
    /// How many times it was enabled by hand (see `KeyState::merge`); 0 in older files.
    #[serde(default)]
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SavedCooldown {
    pub model: String,
    pub until_ms: u64,
    pub class: String,
    /// `key_model` in older files.
    #[serde(default)]
    pub scope: String,
    /// The quota id Google named (none in older files).
    #[serde(default)]
    pub quota: String,
}

/// The redb file.
pub struct Store {
    db: Database,
    path: PathBuf,
    /// Numbers log rows within a millisecond.
    log_seq: AtomicU64,
    /// Log records deleted to keep the file within its size limit.
    pub trimmed: AtomicU64,
    /// When that was last said in the log.
    trim_said_ms: AtomicU64,
    /// When the last flush ended (ms since the epoch).
    flushed_ms: AtomicU64,
    /// Held from taking the dirty keys' snapshots to saving them: of two flushes (the
    /// committer's and the last one at shutdown), the one that looked later writes later.
    saving_keys: std::sync::Mutex<()>,
    /// The data file's cap (`storage.max_bytes`), as last given.
    max_bytes: AtomicU64,
    /// Kept responses not yet written: the next flush writes them.
    queued_responses: responses::Queued,
}

impl Store {
    /// Opens (or creates) `data_dir/gemgate.redb` (the folder readable by its owner alone),
    /// migrating an older layout forward. A file past `max_bytes` (+5%), from before the cap
    /// or from a larger one, has its oldest log blocks deleted and is compacted.
    pub fn open(data_dir: &Path, max_bytes: u64) -> Result<Store, StoreError> {
        let path = data_dir.join("gemgate.redb");
        let open_err = |m: String| StoreError::Open {
            path: path.clone(),
            message: m,
        };
        private_dir(data_dir).map_err(|e| open_err(e.to_string()))?;
        // NOTE: redb's page cache defaults to 1 GiB, and a busy request log fills it: the
        // gateway then holds hundreds of MiB for pages it rarely reads again.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| open_err(e.to_string()))?;
        let mut store = Store {
            db,
            path: path.clone(),
            log_seq: AtomicU64::new(0),
            trimmed: AtomicU64::new(0),
            trim_said_ms: AtomicU64::new(0),
            flushed_ms: AtomicU64::new(crate::clock::now_ms()),
            saving_keys: std::sync::Mutex::new(()),
            max_bytes: AtomicU64::new(max_bytes),
            queued_responses: responses::Queued::default(),
        };
        store.migrate()?;
        if store.file_bytes() > over_cap(max_bytes) {
            tracing::warn!(
                bytes = store.file_bytes(),
                max_bytes,
                "the data file is past server.max_data_bytes: deleting its oldest log blocks and compacting it"
            );
            store.keep_within(max_bytes);
            store
                .db
                .compact()
                .map_err(|e| open_err(format!("cannot compact: {e}")))?;
        }
        Ok(store)
    }

    /// Calls `each` with the records of `log` from `from_ms` on, oldest first, `batch` at a
    /// time.
    pub fn log_since(
        &self,
        log: logs::Log,
        from_ms: u64,
        batch: usize,
        each: &mut dyn FnMut(Vec<logs::Record>),
    ) -> Result<(), StoreError> {
        logs::since(&self.db, log, from_ms, batch, each)
    }

    /// When the last flush was written (milliseconds since the epoch).
    pub fn flushed_ms(&self) -> u64 {
        self.flushed_ms.load(Ordering::Relaxed)
    }

    /// The data file's cap, as last given (at opening, or to [`Store::keep_within`]).
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.load(Ordering::Relaxed)
    }

    /// The data file's size.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Keeps the data file within `max_bytes` (+5%) by deleting the oldest log blocks (key
    /// state and usage are never deleted).
    ///
    /// redb never shrinks its file, but reuses what deletions free; it grows it by doubling.
    /// So the logs are kept to 40% of the room the file may take (freed pages are reused in
    /// blocks of powers of two, which may waste up to half of them), trimmed to 30% when they
    /// pass it; and the room is the file's present size once doubling it would pass the cap.
    pub fn keep_within(&self, max_bytes: u64) {
        self.make_room(max_bytes, 0);
    }

    /// The room the logs may take in a file capped at `max_bytes` (see [`Store::keep_within`]).
    fn log_room(&self, max_bytes: u64) -> u64 {
        let file = self.file_bytes();
        let room = if file.saturating_mul(2) > over_cap(max_bytes) {
            file.clamp(1, max_bytes)
        } else {
            max_bytes
        };
        room / 10 * 4
    }

    /// [`Store::keep_within`], with room for `incoming` more bytes of log blocks.
    fn make_room(&self, max_bytes: u64, incoming: u64) {
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
        let budget = self.log_room(max_bytes);
        let stored = match crate::store::logs::stored_bytes(&self.db) {
            Ok(n) => n,
            Err(e) => return tracing::error!("cannot read the logs' size: {e}"),
        };
        if stored + incoming <= budget {
            return;
        }
        let keep = (budget / 4 * 3).saturating_sub(incoming);
        match crate::store::logs::trim(&self.db, stored.saturating_sub(keep)) {
            Ok(records) => {
                let total = self.trimmed.fetch_add(records as u64, Ordering::Relaxed);
                // Said once a minute at most: a busy gateway trims every second.
                let now = crate::clock::now_ms();
                let last = self.trim_said_ms.load(Ordering::Relaxed);
                if now >= last + 60_000
                    && self
                        .trim_said_ms
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::info!(
                        records = total + records as u64,
                        max_bytes,
                        "the data file is at its size limit: the oldest log records are deleted"
                    );
                }
            }
            Err(e) => tracing::error!("cannot delete old log records: {e}"),
        }
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        {
            let mut meta = tx.open_table(META).map_err(io)?;
            let found = meta
                .get("schema_version")
                .map_err(io)?
                .map(|v| v.value())
                .unwrap_or(0);
            if found > SCHEMA_VERSION {
                return Err(StoreError::Newer {
                    path: self.path.clone(),
                    found,
                });
            }
            // Version 0 is a new file. From 1, `logs::create` converts the logs' tables.
            meta.insert("schema_version", SCHEMA_VERSION).map_err(io)?;
            tx.open_table(KEYS).map_err(io)?;
            tx.open_table(USAGE).map_err(io)?;
            tx.open_table(FILES).map_err(io)?;
        }
        crate::store::logs::create(&tx)?;
        tx.commit().map_err(io)
    }

    /// Saves fleet state `name` (see [`FLEET`]).
    pub fn save_fleet(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        tx.open_table(FLEET)
            .map_err(io)?
            .insert(name, value)
            .map_err(io)?;
        tx.commit().map_err(io)
    }

    /// Fleet state `name`, if saved.
    pub fn load_fleet(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let table = match tx.open_table(FLEET) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        Ok(table.get(name).map_err(io)?.map(|v| v.value().to_vec()))
    }

    /// Records who owns a file (`None`: the file is gone).
    pub fn save_file(
        &self,
        id: &str,
        record: Option<&crate::keys::owners::FileRecord>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        {
            let mut table = tx.open_table(FILES).map_err(io)?;
            match record {
                Some(r) => {
                    let mut value = format!("{}|{}", r.owner.key, r.expires_ms);
                    if let Some(client) = &r.owner.client {
                        value.push('|');
                        value.push_str(client);
                    }
                    table.insert(id, value.as_str()).map_err(io)?;
                }
                None => {
                    table.remove(id).map_err(io)?;
                }
            }
        }
        tx.commit().map_err(io)
    }

    /// Deletes the records of these files (or other resources), in one transaction.
    pub fn forget_files(&self, ids: &[String]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        {
            let mut table = tx.open_table(FILES).map_err(io)?;
            for id in ids {
                table.remove(id.as_str()).map_err(io)?;
            }
        }
        tx.commit().map_err(io)
    }

    /// Every file saved. Files saved before their clients were kept have no client.
    pub fn load_files(&self) -> Result<Vec<(String, crate::keys::owners::FileRecord)>, StoreError> {
        use crate::keys::owners::{FileRecord, Owner};
        let tx = self.db.begin_read().map_err(io)?;
        let table = tx.open_table(FILES).map_err(io)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(io)? {
            let (id, v) = row.map_err(io)?;
            let mut parts = v.value().splitn(3, '|');
            let (Some(key), Some(expires)) = (parts.next(), parts.next()) else {
                continue;
            };
            out.push((
                id.value().to_owned(),
                FileRecord {
                    owner: Owner {
                        key: key.to_owned(),
                        client: parts.next().map(str::to_owned),
                    },
                    expires_ms: expires.parse().unwrap_or(0),
                },
            ));
        }
        Ok(out)
    }

    /// The database, for the log queries.
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Adds usage to the stored counts, in one transaction.
    pub fn add_usage(&self, usage: &usage::Tally) -> Result<(), StoreError> {
        if usage.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(io)?;
        {
            let mut table = tx.open_table(USAGE).map_err(io)?;
            // The rows come in the table's order (`Usage::drain`): each page is read and
            // rewritten once, where rows in a hash map's order (100,000 keys counted since the
            // last save) came to a page at a time from all over the table, past redb's cache.
            for (row, add) in usage {
                let mut counts: Counts = table
                    .get(row.as_str())
                    .map_err(io)?
                    .and_then(|v| serde_json::from_slice(v.value()).ok())
                    .unwrap_or_default();
                counts.merge(add);
                let bytes = serde_json::to_vec(&counts).map_err(io)?;
                table.insert(row.as_str(), bytes.as_slice()).map_err(io)?;
            }
        }
        tx.commit().map_err(io)
    }

    /// Usage of `day` by key id, all models added up.
    pub fn usage_of_day(&self, day: u32) -> Result<HashMap<String, Counts>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let table = tx.open_table(USAGE).map_err(io)?;
        let prefix = usage::day_prefix(day);
        let mut out: HashMap<String, Counts> = HashMap::new();
        for row in table.range(prefix.as_str()..).map_err(io)? {
            let (k, v) = row.map_err(io)?;
            let Some(rest) = k.value().strip_prefix(&prefix) else {
                break;
            };
            let key = rest.split('|').next().unwrap_or_default().to_owned();
            if let Ok(c) = serde_json::from_slice::<Counts>(v.value()) {
                out.entry(key).or_default().merge(&c);
            }
        }
        Ok(out)
    }

    /// Every saved key state.
    pub fn load_keys(&self) -> Result<Vec<(String, SavedKey)>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let table = tx.open_table(KEYS).map_err(io)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(io)? {
            let (id, value) = row.map_err(io)?;
            match serde_json::from_slice::<SavedKey>(value.value()) {
                Ok(saved) => out.push((id.value().to_owned(), saved)),
                Err(e) => tracing::warn!(key = id.value(), "ignoring unreadable key state: {e}"),
            }
        }
        Ok(out)
    }

    /// Writes these key states in one transaction.
    pub fn save_keys(&self, keys: &[(String, SavedKey)]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(io)?;
        {
            let mut table = tx.open_table(KEYS).map_err(io)?;
            for (id, saved) in keys {
                let bytes = serde_json::to_vec(saved).map_err(io)?;
                table.insert(id.as_str(), bytes.as_slice()).map_err(io)?;
            }
        }
        tx.commit().map_err(io)
    }
}

/// The size a data file capped at `max_bytes` may reach: 5% more.
fn over_cap(max_bytes: u64) -> u64 {
    max_bytes.saturating_add(max_bytes / 20)
}

/// Creates `dir` (and its parents) if needed, readable by its owner alone: it holds the key
/// state and the logs. A folder gemgate does not own (a mounted volume) keeps its mode, and
/// the log says so.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
            tracing::warn!(dir = %dir.display(), "cannot make the data folder private (0700): {e}");
        }
    }
    Ok(())
}

/// A key's state as it is to be saved (expired cooldowns dropped).
pub fn snapshot(state: &KeyState, now_ms: u64) -> SavedKey {
    let detail = state.detail();
    SavedKey {
        disabled: state.is_disabled(),
        disabled_reason: detail.disabled_reason,
        consecutive_failures: state.consecutive_failures(),
        last_error: detail.last_error,
        epoch: state.epoch(),
        cooldowns: state
            .cooldowns(now_ms)
            .into_iter()
            .map(|c| SavedCooldown {
                model: c.model.into(),
                until_ms: c.until_ms,
                class: c.class.to_owned(),
                scope: c.scope.to_owned(),
                quota: c.quota.into(),
            })
            .collect(),
    }
}

/// Puts saved state back into the registry (cooldowns that have ended are skipped).
pub fn restore(registry: &KeyRegistry, saved: Vec<(String, SavedKey)>, now_ms: u64) -> usize {
    let mut restored = 0;
    for (id, s) in saved {
        let cooldowns: Vec<Cooldown> = s
            .cooldowns
            .iter()
            .filter(|c| c.until_ms > now_ms)
            .map(|c| Cooldown {
                model: c.model.as_str().into(),
                until_ms: c.until_ms,
                class: class_name(&c.class),
                scope: match c.scope.as_str() {
                    "project_model" => "project_model",
                    "project" => "project",
                    _ => "key_model",
                },
                quota: c.quota.as_str().into(),
            })
            .collect();
        if !s.disabled && cooldowns.is_empty() && s.consecutive_failures == 0 && s.epoch == 0 {
            continue;
        }
        registry.state(&id).restore(
            s.disabled,
            s.disabled_reason,
            s.consecutive_failures,
            s.last_error,
            cooldowns,
            s.epoch,
        );
        restored += 1;
    }
    restored
}

/// The static name of a stored error class.
fn class_name(stored: &str) -> &'static str {
    const NAMES: &[&str] = &[
        "rate_limited",
        "daily_quota",
        "policy",
        "key_invalid",
        "key_forbidden",
        "upstream_error",
        "timeout",
        "network",
        "forbidden",
        "client_error",
    ];
    NAMES
        .iter()
        .find(|n| **n == stored)
        .copied()
        .unwrap_or("rate_limited")
}

/// Deletes log rows older than `AUTO_DELETE_*_DAYS`, where enabled.
pub fn retire_logs(store: &Store, logs: &crate::config::LogsSection) {
    let now = crate::clock::now_ms();
    for (log, enabled, days) in [
        (
            crate::store::logs::Log::Errors,
            logs.auto_delete_error_logs_enabled,
            logs.auto_delete_error_logs_days,
        ),
        (
            crate::store::logs::Log::Requests,
            logs.auto_delete_request_logs_enabled,
            logs.auto_delete_request_logs_days,
        ),
    ] {
        if !enabled {
            continue;
        }
        let cutoff = now.saturating_sub(u64::from(days) * 86_400_000);
        match crate::store::logs::delete(&store.db, log, Some(cutoff), &[]) {
            Ok(0) => {}
            Ok(n) => tracing::info!(?log, rows = n, days, "old log rows deleted"),
            Err(e) => tracing::error!(?log, "cannot delete old log rows: {e}"),
        }
    }
}

/// One flush's worth of changes, taken from the request path and encoded, ready to write.
/// Key state is not in it: a batch can wait (the preparer runs at idle priority, and the
/// committer may take a newer batch meanwhile), and an older snapshot must never be written
/// over a newer one, so the keys are looked at when the batch is written.
pub struct Batch {
    usage: usage::Tally,
    records: Vec<crate::store::logs::Record>,
    encoded: Vec<crate::store::logs::Encoded>,
}

impl Batch {
    /// A batch of the queued `records` and `usage`, encoded (the CPU work of a flush).
    pub fn new(records: Vec<crate::store::logs::Record>, usage: usage::Tally) -> Batch {
        let encoded = records
            .iter()
            .map(crate::store::logs::Encoded::of)
            .collect();
        Batch {
            usage,
            records,
            encoded,
        }
    }

    /// The log records it holds.
    pub fn records(&self) -> usize {
        self.records.len()
    }

    /// Writes the batch: the dirty keys' state as it is now, usage, then the log records, in
    /// steps of a quarter of the logs' room, each made room for first (a burst larger than the
    /// room left would otherwise grow the file before any trimming could free space).
    pub fn commit(self, store: &Store, registry: &KeyRegistry, max_bytes: u64) {
        {
            let _saving = store.saving_keys.lock().unwrap_or_else(|e| e.into_inner());
            let dirty = registry.take_dirty();
            let now = crate::clock::now_ms();
            let keys: Vec<(String, SavedKey)> = dirty
                .iter()
                .map(|(id, state)| (id.clone(), snapshot(state, now)))
                .collect();
            if let Err(e) = store.save_keys(&keys) {
                tracing::error!("cannot save key state: {e}");
                for (_, state) in dirty {
                    state.mark_dirty();
                }
            }
        }
        if let Err(e) = store.add_usage(&self.usage) {
            tracing::error!("cannot save usage counts: {e}");
        }
        let step = (store.log_room(max_bytes) / 4).max(64 * 1024);
        let mut at = 0;
        while at < self.records.len() {
            let mut bytes = 0;
            let n = self.encoded[at..]
                .iter()
                .take_while(|e| {
                    bytes += e.bytes() as u64;
                    bytes <= step
                })
                .count()
                .max(1);
            let end = at + n;
            let incoming = self.encoded[at..end].iter().map(|e| e.bytes() as u64).sum();
            store.make_room(max_bytes, incoming);
            let written = crate::store::logs::write_encoded(
                &store.db,
                &self.records[at..end],
                &self.encoded[at..end],
                &store.log_seq,
            );
            if let Err(e) = written {
                tracing::error!("cannot save log records: {e}");
            }
            at = end;
        }
        if let Err(e) = store.write_queued_responses() {
            tracing::error!("cannot keep responses: {e}");
        }
        store
            .flushed_ms
            .store(crate::clock::now_ms(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_state_round_trips_and_newer_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 30).unwrap();
        let saved = SavedKey {
            disabled: true,
            disabled_reason: Some("key_invalid after 3 consecutive failures".into()),
            consecutive_failures: 3,
            last_error: Some("key_invalid: API key not valid".into()),
            cooldowns: vec![SavedCooldown {
                model: "m".into(),
                until_ms: u64::MAX / 2,
                class: "daily_quota".into(),
                scope: "project_model".into(),
                quota: "GenerateRequestsPerMinutePerProjectPerModel".into(),
            }],
            epoch: 2,
        };
        store.save_keys(&[("k1".into(), saved.clone())]).unwrap();
        drop(store);
        let store = Store::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(
            store.load_keys().unwrap(),
            vec![("k1".into(), saved.clone())]
        );

        let registry = KeyRegistry::default();
        assert_eq!(restore(&registry, store.load_keys().unwrap(), 0), 1);
        let state = registry.state("k1");
        assert!(state.is_disabled());
        assert!(state.cooling_until("m", 1).is_some());
        assert_eq!(snapshot(&state, 0), saved);

        {
            let tx = store.db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("schema_version", SCHEMA_VERSION + 1)
                .unwrap();
            tx.commit().unwrap();
        }
        drop(store);
        let err = Store::open(dir.path(), 1 << 30).err().unwrap();
        assert!(err.to_string().contains("newer gemgate"), "{err}");
    }

    #[test]
    fn the_logs_keep_the_file_under_its_cap() {
        for cap in [16u64 << 20] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), cap).unwrap();
            store
                .save_keys(&[("k1".into(), SavedKey::default())])
                .unwrap();
            let queue = crate::store::logs::LogQueue::default();
            let registry = KeyRegistry::default();
            let mut largest = 0;
            // Three times the cap in error records with 48 KB bodies, a megabyte a flush.
            for round in 0..cap / (1 << 20) * 3 {
                for i in 0..20 {
                    queue.push(crate::store::logs::Record {
                        ts_ms: 1_000_000 + round * 100 + i,
                        status: 400,
                        request_body: Some("x".repeat(48 * 1024)),
                        ..Default::default()
                    });
                }
                Batch::new(queue.take(usize::MAX), Vec::new()).commit(&store, &registry, cap);
                largest = largest.max(store.file_bytes());
            }
            assert!(
                largest <= over_cap(cap),
                "{largest} bytes for a cap of {cap}"
            );
            let (rows, _) = crate::store::logs::query(
                &store.db,
                crate::store::logs::Log::Errors,
                &crate::store::logs::Query {
                    limit: 1000,
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(!rows.is_empty() && rows.len() < 1000, "{}", rows.len());
            assert_eq!(
                rows[0].1.ts_ms,
                1_000_000 + (cap / (1 << 20) * 3 - 1) * 100 + 19,
                "the newest stay"
            );
            assert_eq!(store.load_keys().unwrap().len(), 1, "key state stays");
        }
    }
}

//! The seam for shared state: everything that every instance of a fleet must agree on goes
//! through [`SharedState`]: key health and cooldowns, usage counters, which key owns a
//! resource, plugin counters, the wrong-credential throttles, admin sessions, and admin edits
//! of the config (keys and settings).
//!
//! [`Local`] keeps it in this process (the key registry's atomics, the usage shards, the
//! file-owner table), saved to the redb file by the flusher. `fleet::Fleet` shares it through
//! Redis over a `Local` view (plugin counters and the throttles stay per instance there),
//! without touching the request path, which names only this trait.
//!
//! Reads that run on every request (which keys are usable now) stay on the key pool's local
//! state: an implementation keeps that state current (it is where `Local` writes).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::session::Sessions;
use crate::config;
use crate::keys::owners::{FileOwners, FileRecord, Owner};
use crate::keys::taxonomy::{ErrorClass, Quota};
use crate::keys::{KeyPool, Penalty};
use crate::policy::counters::{CounterStore, Counters};
use crate::store::Store;
pub use crate::store::responses::StoredResponse;
use crate::store::usage::{Event, Tokens, Usage, day_of};

/// One attempt's failure, as key health records it.
#[derive(Debug, Clone, Copy)]
pub struct KeyFailure<'a> {
    pub model: &'a str,
    pub class: ErrorClass,
    pub message: &'a str,
    pub now_ms: u64,
    /// The quota the answer named (whose it was), and the project it named.
    pub quota: &'a Quota,
}

/// What one attempt used, for the usage counters.
#[derive(Debug, Clone, Copy)]
pub struct Used<'a> {
    pub key_id: &'a str,
    pub model: &'a str,
    /// `None`: a success.
    pub failure: Option<ErrorClass>,
    /// The tokens a success reported.
    pub tokens: Tokens,
    pub now_ms: u64,
}

/// One request counted against a declared limit (see `policy::DeclaredLimit`).
#[derive(Debug, Clone, Copy)]
pub struct LimitCheck<'a> {
    /// The plugin that declared it.
    pub plugin: &'a str,
    /// Whom it counts (the client's name).
    pub subject: &'a str,
    /// Requests allowed per window.
    pub max: u64,
    pub window_s: u64,
    pub now_ms: u64,
}

impl LimitCheck<'_> {
    /// Which window `now_ms` falls in: windows are aligned to the clock, so that every
    /// instance of a fleet counts in the same one.
    pub fn window(&self) -> u64 {
        self.now_ms / 1000 / self.window_s.max(1)
    }

    /// Seconds until the current window ends (at least 1).
    pub fn retry_after_s(&self) -> u64 {
        let w = self.window_s.max(1);
        (w - (self.now_ms / 1000) % w).max(1)
    }
}

/// One request counted against its project's quota limit for a model (see `keys::quota`).
#[derive(Debug, Clone, Copy)]
pub struct QuotaCheck<'a> {
    /// The project's windows' name (`key:<id>` for a key's own).
    pub project: &'a str,
    pub model: &'a str,
    pub limit: crate::config::quota::Limit,
    /// Estimated input tokens.
    pub tokens: u64,
    pub now_ms: u64,
}

/// A counted request moved to the second its attempt ended in, with its tokens as the answer
/// said them.
#[derive(Debug, Clone, Copy)]
pub struct QuotaSettle<'a> {
    pub project: &'a str,
    pub model: &'a str,
    pub from_second: u64,
    pub to_second: u64,
    /// The tokens it was counted with, and those it is counted with now.
    pub estimate: u64,
    pub tokens: u64,
}

/// Where a request is counted against its project's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaVerdict {
    /// Here, against this share of the limit (1: all of it; in a fleet whose Redis is away,
    /// one instance's share).
    Here { share: u32 },
    /// The fleet counted it: it fits.
    Admitted,
    /// The fleet counted nothing: the project is at the limit until then (ms).
    Denied { at_ms: u64 },
}

/// Whether a request may go on under a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Over the limit: the window ends in this many seconds.
    Denied {
        retry_after_s: u64,
    },
}

/// Why an admin edit of the config was not made.
#[derive(Debug)]
pub enum EditError {
    /// Not now: a fleet's Redis is away (answered 503).
    Unavailable(String),
    Failed(String),
}

impl EditError {
    pub fn status(&self) -> u16 {
        match self {
            EditError::Unavailable(_) => 503,
            EditError::Failed(_) => 500,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            EditError::Unavailable(m) | EditError::Failed(m) => m,
        }
    }
}

impl From<String> for EditError {
    fn from(message: String) -> Self {
        EditError::Failed(message)
    }
}

impl From<&str> for EditError {
    fn from(message: &str) -> Self {
        EditError::Failed(message.to_owned())
    }
}

/// A future the request path awaits (only [`SharedState::admit`]).
pub type Pending<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What every instance of a fleet must agree on (see the module's documentation).
pub trait SharedState: Send + Sync {
    /// Counts one request against a declared limit; called only for requests a limit applies
    /// to. A fleet counts it atomically in Redis, never against a copy; while Redis is away or
    /// slow, against this instance's share of the limit.
    fn admit<'a>(&'a self, check: LimitCheck<'a>) -> Pending<'a, Admission>;

    /// Counts one request against its project's quota limit. A single instance counts it in
    /// its own windows; a fleet in Redis's, shared, while Redis answers in time.
    fn admit_quota<'a>(&'a self, check: QuotaCheck<'a>) -> Pending<'a, QuotaVerdict> {
        let _ = check;
        Box::pin(std::future::ready(QuotaVerdict::Here { share: 1 }))
    }

    /// A request the fleet counted ended its attempt (see `keys::quota::Ticket::settle`).
    fn settle_quota(&self, settle: QuotaSettle<'_>) {
        let _ = settle;
    }

    /// The fleet's state as `/health`, the admin page and the admin API show it (`None`: a
    /// single instance).
    fn fleet_status(&self) -> Option<serde_json::Value> {
        None
    }

    /// Today's usage of the whole fleet by key id (`None`: a single instance, whose own
    /// store has it).
    fn fleet_usage_today(&self) -> Option<HashMap<String, crate::store::usage::Counts>> {
        None
    }

    /// The settings (`section.field`) the fleet's admin edits set over this instance's file.
    fn fleet_settings(&self) -> Vec<String> {
        Vec::new()
    }

    /// An attempt with key `index` of `pool` succeeded.
    fn key_succeeded(&self, pool: &KeyPool, index: usize);

    /// An attempt with key `index` of `pool` failed: applies the error taxonomy's verdict and
    /// says what it did to the key.
    fn key_failed(&self, pool: &KeyPool, index: usize, failure: KeyFailure<'_>) -> Penalty;

    /// Cools key `index` of `pool` for `model` for `seconds` (a plugin's verdict).
    fn cool_key(&self, pool: &KeyPool, index: usize, model: &str, seconds: f64, now_ms: u64);

    /// Takes key `index` of `pool` out of service (a plugin's verdict).
    fn disable_key(&self, pool: &KeyPool, index: usize, reason: &str);

    /// Counts one attempt in the usage counters (key × model × day).
    fn count_usage(&self, used: Used<'_>);

    /// Whether any file is on record (when none is, no request can name one).
    fn holds_files(&self) -> bool;

    /// File `id` (`files/abc` or `abc`), if uploaded through gemgate and not expired.
    fn file(&self, id: &str) -> Option<FileRecord>;

    /// `client`'s live files, grouped by the key that holds them.
    fn files_of(&self, client: &str) -> HashMap<String, Vec<String>>;

    /// Records a file uploaded through gemgate.
    fn add_file(&self, id: String, record: FileRecord);

    /// Forgets a deleted file.
    fn remove_file(&self, id: &str);

    /// Who started upload `upload_id`.
    fn upload(&self, upload_id: &str) -> Option<Owner>;

    /// Records who started an upload (its later commands go with the same key).
    fn start_upload(&self, upload_id: String, owner: Owner);

    /// Forgets a finished upload.
    fn finish_upload(&self, upload_id: &str);

    /// Kept response `id` of the Responses API, if it is kept and not expired (see
    /// `store::responses`).
    fn response<'a>(&'a self, id: &'a str) -> Pending<'a, Option<StoredResponse>>;

    /// Keeps (or with `None`, forgets) response `id`; done when the future is.
    fn save_response<'a>(&'a self, id: &'a str, stored: Option<StoredResponse>) -> Pending<'a, ()>;

    /// A wrong client token from `ip`: how long that address must wait, once past the free
    /// tries.
    fn client_failed(&self, ip: Option<IpAddr>) -> Option<Duration>;

    /// A right client token from `ip`.
    fn client_succeeded(&self, ip: Option<IpAddr>);

    /// A wrong admin token from `ip`: how long that address must wait, once past the free
    /// tries.
    fn admin_failed(&self, ip: Option<IpAddr>) -> Option<Duration>;

    /// A right admin token from `ip`.
    fn admin_succeeded(&self, ip: Option<IpAddr>);

    /// Opens an admin session for the holder of `admin_token`: (id, CSRF token).
    fn open_session(&self, admin_token: &str) -> (String, String);

    /// The CSRF token of live session `id`, if it was opened with today's `admin_token`.
    fn session_csrf(&self, id: &str, admin_token: &str) -> Option<String>;

    /// Ends session `id`.
    fn close_session(&self, id: &str);

    /// The plugins' counters (`gemgate.counter`), kept across reloads.
    fn counters(&self) -> Arc<dyn CounterStore>;

    /// Applies an admin edit to the config every instance serves (the file at `path` here):
    /// `change` gets its text (the shipped defaults when there is none) and gives the new
    /// text, or `None` to leave it. Returns whether it wrote. This instance sends one edit at
    /// a time (the admin API holds `State::edits` from the edit to its reload).
    fn edit_config(
        &self,
        path: &Path,
        change: &mut dyn FnMut(&str) -> Result<Option<String>, String>,
    ) -> Result<bool, EditError>;
}

/// Shared state kept in this process, saved to the redb file (when there is one).
pub struct Local {
    pub usage: Arc<Usage>,
    pub files: Arc<FileOwners>,
    /// Admin sessions and the wrong-credential throttles.
    pub sessions: Arc<Sessions>,
    pub counters: Arc<Counters>,
    pub store: Option<Arc<Store>>,
}

impl SharedState for Local {
    fn admit<'a>(&'a self, check: LimitCheck<'a>) -> Pending<'a, Admission> {
        Box::pin(std::future::ready(self.admit_here(check)))
    }

    fn response<'a>(&'a self, id: &'a str) -> Pending<'a, Option<StoredResponse>> {
        let found = self.store.as_ref().and_then(|store| {
            store
                .load_response(id, crate::clock::now_ms())
                .unwrap_or_else(|e| {
                    tracing::error!(response = %id, "cannot read a kept response: {e}");
                    None
                })
        });
        Box::pin(std::future::ready(found))
    }

    fn save_response<'a>(&'a self, id: &'a str, stored: Option<StoredResponse>) -> Pending<'a, ()> {
        let Some(store) = self.store.clone() else {
            return Box::pin(std::future::ready(()));
        };
        if !store.queue_response(id, stored.as_ref()) {
            return Box::pin(std::future::ready(()));
        }
        // The flusher is behind: this call writes the queue, off the worker thread.
        Box::pin(async move {
            let written = tokio::task::spawn_blocking(move || store.write_queued_responses()).await;
            if let Ok(Err(e)) = written {
                tracing::error!("cannot keep responses: {e}");
            }
        })
    }

    fn key_succeeded(&self, pool: &KeyPool, index: usize) {
        pool.record_success(index);
    }

    fn key_failed(&self, pool: &KeyPool, index: usize, f: KeyFailure<'_>) -> Penalty {
        pool.record_failure_of(index, f.model, f.class, f.message, f.now_ms, f.quota)
    }

    fn cool_key(&self, pool: &KeyPool, index: usize, model: &str, seconds: f64, now_ms: u64) {
        pool.cool(index, model, seconds, now_ms);
    }

    fn disable_key(&self, pool: &KeyPool, index: usize, reason: &str) {
        pool.get(index).state.disable(format!("policy: {reason}"));
    }

    fn count_usage(&self, used: Used<'_>) {
        self.usage.record(Event {
            key_id: used.key_id,
            model: used.model,
            day: day_of(used.now_ms),
            failure: used.failure.map(ErrorClass::as_str),
            tokens: used.tokens,
        });
    }

    fn holds_files(&self) -> bool {
        !self.files.is_empty()
    }

    fn file(&self, id: &str) -> Option<FileRecord> {
        self.files.file(id)
    }

    fn files_of(&self, client: &str) -> HashMap<String, Vec<String>> {
        self.files.of_client(client)
    }

    fn add_file(&self, id: String, record: FileRecord) {
        self.files.insert(id.clone(), record.clone());
        self.save_file(id, Some(record));
    }

    fn remove_file(&self, id: &str) {
        self.files.remove(id);
        self.save_file(id.to_owned(), None);
    }

    fn upload(&self, upload_id: &str) -> Option<Owner> {
        self.files.upload(upload_id)
    }

    fn start_upload(&self, upload_id: String, owner: Owner) {
        self.files.start_upload(upload_id, owner);
    }

    fn finish_upload(&self, upload_id: &str) {
        self.files.finish_upload(upload_id);
    }

    fn client_failed(&self, ip: Option<IpAddr>) -> Option<Duration> {
        self.sessions.client_failures.failed(ip)
    }

    fn client_succeeded(&self, ip: Option<IpAddr>) {
        self.sessions.client_failures.succeeded(ip);
    }

    fn admin_failed(&self, ip: Option<IpAddr>) -> Option<Duration> {
        self.sessions.admin_failures.failed(ip)
    }

    fn admin_succeeded(&self, ip: Option<IpAddr>) {
        self.sessions.admin_failures.succeeded(ip);
    }

    fn open_session(&self, admin_token: &str) -> (String, String) {
        self.sessions.open(admin_token)
    }

    fn session_csrf(&self, id: &str, admin_token: &str) -> Option<String> {
        self.sessions.check(id, admin_token)
    }

    fn close_session(&self, id: &str) {
        self.sessions.close(id);
    }

    fn counters(&self) -> Arc<dyn CounterStore> {
        self.counters.clone()
    }

    fn edit_config(
        &self,
        path: &Path,
        change: &mut dyn FnMut(&str) -> Result<Option<String>, String>,
    ) -> Result<bool, EditError> {
        let text = config::edit::read_or_defaults(path)?;
        match change(&text)? {
            Some(new_text) => Ok(config::edit::write_atomic(path, &new_text).map(|()| true)?),
            None => Ok(false),
        }
    }
}

impl Local {
    /// Counts `check` in this process's counters: exact for one instance (and a fleet's
    /// fallback while Redis is away, with its share of the limit).
    pub fn admit_here(&self, check: LimitCheck<'_>) -> Admission {
        use crate::policy::counters::CounterStore;
        let store = format!("limits/{}", check.plugin);
        let name = format!("{}@{}", check.subject, check.window());
        let slot = match self.counters.slot(&store, &name, check.now_ms) {
            Ok(slot) => slot,
            Err(why) => {
                tracing::warn!(plugin = check.plugin, "limit not counted: {why}");
                return Admission::Admitted;
            }
        };
        let used = slot.incr(1, Some(check.window_s as f64 + 1.0), &|| check.now_ms);
        if used as u64 > check.max {
            Admission::Denied {
                retry_after_s: check.retry_after_s(),
            }
        } else {
            Admission::Admitted
        }
    }

    /// Records a file (or its deletion) in the store, off the request path.
    pub(crate) fn save_file(&self, id: String, record: Option<FileRecord>) {
        let Some(store) = self.store.clone() else {
            return;
        };
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.save_file(&id, record.as_ref()) {
                tracing::error!(file = %id, "cannot save the file's owner: {e}");
            }
        });
    }
}

//! A fleet: several gemgate instances behind one load balancer, sharing through Redis (or
//! Valkey) what a client would notice them disagreeing on.
//!
//! [`Fleet`] is the Redis implementation of [`SharedState`]. It keeps [`Local`] as its view and
//! serves every read from it: the request path never waits on Redis, except for one round
//! trip per declared limit that applies to the request ([`SharedState::admit`]). What changes here is written to Redis
//! off the request path by the link task ([`link`]), and what changes elsewhere arrives on
//! the fleet's channel and is merged into the view:
//!
//! | shared                  | in Redis                                  | how it arrives      |
//! |-------------------------|-------------------------------------------|---------------------|
//! | key health              | `keys` hash, merged by a script           | channel, full sync  |
//! | usage, today            | `usage:{day}:{instance}` (absolute)       | read every 3 s      |
//! | declared limits         | `limit:{plugin}:{client}:{window}`        | counted in Redis    |
//! | projects' quota windows | `quota:{project}:{model}` (see [`quota`]) | counted in Redis    |
//! | files                   | `files` hash                              | channel, full sync  |
//! | uploads, sessions       | `uploads`, `sessions` hashes, sealed, by  | channel (sealed),   |
//! |                         | the digest of their id (a credential)     | full sync           |
//! | admin edits (sealed)    | `edits` hash, under the `edits-lock`      | channel, then read  |
//! | members                 | `members` hash (heartbeats)               | read every second   |
//!
//! Every name starts with `gemgate:{<fleet>}:v1:`: the fleet's name (several fleets may share
//! one Redis; the braces keep a fleet in one Redis Cluster slot) and the layout's version, so
//! a rolling upgrade to another layout never reads this one.
//!
//! Redis away or slow: every instance serves on its view, says so (`/health`, the admin
//! page), and counts declared limits locally with its share of them; while Redis is away it
//! refuses admin edits (none may apply on one instance only) and holds its other changes. When Redis answers again (or comes back empty), a
//! full sync pushes this view and pulls the fleet's: a disabled key stays disabled, the later
//! end of a cooldown wins, usage is written again whole.

mod link;
mod quota;
mod seal;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};

use crate::app::State;
use crate::app::shared::{
    Admission, EditError, KeyFailure, LimitCheck, Local, Pending, QuotaCheck, QuotaSettle,
    QuotaVerdict, SharedState, StoredResponse, Used,
};
use crate::clock::now_ms;
use crate::config::ClusterConfig;
use crate::config::edit::FleetEdits;
use crate::keys::owners::{FileRecord, Owner};
use crate::keys::{KeyPool, KeyRegistry, Penalty};
use crate::policy::counters::CounterStore;
use crate::store::usage::Counts;

/// The longest wait for Redis on the request path (a declared limit's count): past it, the
/// instance counts the limit itself.
const LIMIT_WAIT: Duration = Duration::from_millis(100);
/// How long a kept response is waited for from Redis (read or written).
const RESPONSE_WAIT: Duration = Duration::from_secs(1);
/// How long a deleted response's tombstone stays: longer than any retention gemgate keeps.
const RESPONSE_TOMBSTONE: Duration = Duration::from_secs(400 * 86_400);
/// How long an admin edit waits for the fleet's lock and Redis: longer than the lock's own
/// wait and a command's timeout together, so no lock is taken after the edit gave up.
const EDIT_WAIT: Duration = Duration::from_secs(9);
/// A heartbeat slower than this marks Redis slow.
const SLOW: Duration = Duration::from_millis(100);
/// A member whose heartbeat is older is no longer counted.
const MEMBER_LIVE_MS: u64 = 10_000;
/// Additions (files, uploads, sessions) waiting for the link task at most; past it they wait
/// for the next full sync. Removals always wait: a sync cannot redo them.
const QUEUE: usize = 10_000;

/// Redis key names of one fleet.
pub(crate) struct Names {
    prefix: String,
}

impl Names {
    fn new(fleet: &str) -> Names {
        Names {
            prefix: format!("gemgate:{{{fleet}}}:v1:"),
        }
    }

    fn of(&self, part: &str) -> String {
        format!("{}{part}", self.prefix)
    }
}

/// A change made here that the link task writes to Redis and announces.
#[derive(Debug, Clone)]
enum Op {
    File(String, Option<FileWire>),
    Upload(String, Option<UploadWire>),
    Session(String, Option<SessionWire>),
}

impl Op {
    /// Whether it adds (rather than removes) something.
    fn adds(&self) -> bool {
        match self {
            Op::File(_, r) => r.is_some(),
            Op::Upload(_, u) => u.is_some(),
            Op::Session(_, s) => s.is_some(),
        }
    }
}

/// A file's owner as the fleet keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileWire {
    key: String,
    client: Option<String>,
    expires_ms: u64,
}

impl FileWire {
    fn of(r: &FileRecord) -> FileWire {
        FileWire {
            key: r.owner.key.clone(),
            client: r.owner.client.clone(),
            expires_ms: r.expires_ms,
        }
    }

    fn record(self) -> FileRecord {
        FileRecord {
            owner: Owner {
                key: self.key,
                client: self.client,
            },
            expires_ms: self.expires_ms,
        }
    }
}

/// An upload in progress as the fleet keeps it (sealed: its id is a credential).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UploadWire {
    id: String,
    key: String,
    client: Option<String>,
    started_ms: u64,
}

/// An admin session as the fleet keeps it (sealed).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionWire {
    id: String,
    csrf: String,
    /// Hex SHA-256 of the admin token it was opened with.
    admin: String,
    expires_ms: u64,
}

/// One instance as the members hash shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub instance: String,
    pub version: String,
    pub generation: u64,
    pub heartbeat_ms: u64,
    pub started_ms: u64,
}

/// How this instance's link to Redis is.
#[derive(Debug, Clone, Default)]
struct Link {
    up: bool,
    slow: bool,
    /// When it last changed between up and down.
    since_ms: u64,
    last_error: Option<String>,
    last_sync_ms: Option<u64>,
}

/// A member of a fleet (see the module's documentation).
pub struct Fleet {
    local: Local,
    registry: Arc<KeyRegistry>,
    names: Names,
    instance: String,
    seal: seal::Seal,
    client: redis::Client,
    redis_shown: String,
    /// The connection while Redis answers.
    conn: ArcSwapOption<MultiplexedConnection>,
    link: Mutex<Link>,
    ops: tokio::sync::mpsc::UnboundedSender<Op>,
    /// Changes queued for the link task now.
    queued: AtomicUsize,
    /// Additions dropped because the queue was full: the next heartbeat syncs in full.
    dropped: AtomicU64,
    resync: AtomicBool,
    /// The last heartbeat was slow (see [`SLOW`]): limits are counted here meanwhile.
    slow: AtomicBool,
    /// The fleet's admin edits, laid over the config file by every reload.
    edits: Arc<ArcSwap<FleetEdits>>,
    /// The live members at the last heartbeat (at least 1: this one).
    members_seen: AtomicUsize,
    members: ArcSwap<Vec<Member>>,
    /// Today's usage of the fleet by key id, as last read.
    usage: ArcSwapOption<(u32, HashMap<String, Counts>)>,
    state: OnceLock<Weak<State>>,
    runtime: tokio::runtime::Handle,
    started_ms: u64,
}

impl Fleet {
    /// Joins the fleet `cluster` names, over the view `local` (whose key states are in
    /// `registry`), applying the fleet's edits to `edits`. The link to Redis runs on a thread
    /// of its own; until it is up, the instance serves on its view.
    pub fn start(
        cluster: &ClusterConfig,
        local: Local,
        registry: Arc<KeyRegistry>,
        edits: Arc<ArcSwap<FleetEdits>>,
        listen: SocketAddr,
    ) -> Result<Arc<Fleet>, String> {
        let client = redis::Client::open(cluster.redis_url.expose())
            .map_err(|e| format!("cluster.redis_url: {e}"))?;
        let instance = cluster
            .instance
            .clone()
            .unwrap_or_else(|| format!("{}:{}", host_name(), listen.port()));
        let (ops, queue) = tokio::sync::mpsc::unbounded_channel();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (fleet_tx, fleet_rx) = std::sync::mpsc::channel::<Arc<Fleet>>();
        std::thread::Builder::new()
            .name("gemgate-fleet".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                let Ok(fleet) = fleet_rx.recv() else { return };
                runtime.block_on(link::run(fleet, queue));
            })
            .map_err(|e| format!("cannot start the fleet's thread: {e}"))?;
        let runtime = handle_rx
            .recv()
            .map_err(|_| "the fleet's thread ended".to_owned())??;
        let fleet = Arc::new(Fleet {
            local,
            registry,
            names: Names::new(&cluster.name),
            instance,
            seal: seal::Seal::new(cluster.secret.expose()),
            client,
            redis_shown: cluster.redis_shown(),
            conn: ArcSwapOption::empty(),
            link: Mutex::new(Link {
                since_ms: now_ms(),
                ..Link::default()
            }),
            ops,
            queued: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            resync: Default::default(),
            slow: Default::default(),
            edits,
            members_seen: AtomicUsize::new(1),
            members: ArcSwap::default(),
            usage: ArcSwapOption::empty(),
            state: OnceLock::new(),
            runtime,
            started_ms: now_ms(),
        });
        fleet.restore_edits();
        let _ = fleet_tx.send(fleet.clone());
        tracing::info!(
            instance = %fleet.instance,
            fleet = %cluster.name,
            redis = %fleet.redis_shown,
            "joining the fleet"
        );
        Ok(fleet)
    }

    /// The fleet's edits as this instance last saw them (saved in its store), so that they
    /// apply from the first generation, and survive Redis losing them while no instance ran.
    fn restore_edits(&self) {
        let Some(store) = &self.local.store else {
            return;
        };
        match store.load_fleet("edits") {
            Ok(Some(sealed)) => match self.open_edits(&sealed) {
                Ok(edits) => self.edits.store(Arc::new(edits)),
                Err(e) => tracing::error!("fleet: the saved fleet edits: {e}"),
            },
            Ok(None) => {}
            Err(e) => tracing::error!("fleet: cannot read the saved fleet edits: {e}"),
        }
    }

    /// Saves the fleet's edits in this instance's store (off the caller's thread).
    fn save_edits(&self, edits: &FleetEdits) {
        let Some(store) = self.local.store.clone() else {
            return;
        };
        let Ok(plain) = serde_json::to_vec(edits) else {
            return;
        };
        let sealed = self.seal.seal(&self.names.of("edits"), &plain);
        self.runtime.spawn_blocking(move || {
            if let Err(e) = store.save_fleet("edits", &sealed) {
                tracing::error!("fleet: cannot save the fleet's edits: {e}");
            }
        });
    }

    /// This instance's id in the fleet.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Gives the fleet the running state: it reloads it when the fleet's edits change, and
    /// shows its generation to the other members.
    pub fn attach(&self, state: &Arc<State>) {
        let _ = self.state.set(Arc::downgrade(state));
        // The fleet's edits may have arrived before the state they apply to.
        if !self.edits.load().is_empty()
            && let Err(e) = crate::app::reload::reload(state)
        {
            tracing::error!(
                "fleet: the fleet's admin edits do not load here: {}",
                e.message
            );
        }
    }

    /// Whether the link to Redis is up now.
    pub fn is_up(&self) -> bool {
        self.conn.load().is_some()
    }

    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a change for the link task. While Redis is away the link keeps them (removals
    /// above all: a logout during an outage must not be undone by the sync that follows).
    fn queue(&self, op: Op) {
        if op.adds() && self.queued.load(Ordering::Relaxed) >= QUEUE {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.resync.store(true, Ordering::Relaxed);
            return;
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.ops.send(op).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Runs `work` on the fleet's runtime and waits for it (at most `within`): for the admin
    /// edits, which run on a blocking thread.
    fn wait_for<T: Send + 'static>(
        &self,
        within: Duration,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let _ = tx.send(work.await);
        });
        rx.recv_timeout(within)
            .map_err(|_| "the fleet's Redis did not answer in time".to_owned())
    }

    /// Kept response `id` as Redis has it: `None` when Redis did not answer (or has no entry),
    /// `Some(None)` for a deleted one.
    async fn response_in_redis(&self, id: &str) -> Option<Option<StoredResponse>> {
        let mut conn = (*self.conn.load_full()?).clone();
        let name = self.names.of(&format!("response:{id}"));
        let mut get = redis::cmd("GET");
        get.arg(&name);
        let read = get.query_async::<Option<Vec<u8>>>(&mut conn);
        let sealed = tokio::time::timeout(RESPONSE_WAIT, read)
            .await
            .ok()?
            .ok()??;
        let plain = self.seal.open(&name, &sealed).ok()?;
        serde_json::from_slice(&plain).ok()
    }

    /// Counts `check` in Redis: `None` when Redis did not answer in time.
    async fn admit_in_redis(&self, check: &LimitCheck<'_>) -> Option<Admission> {
        if self.count_here() {
            return None;
        }
        let mut conn = (*self.conn.load_full()?).clone();
        let name = self.names.of(&format!(
            "limit:{}:{}:{}",
            check.plugin,
            check.subject,
            check.window()
        ));
        let mut count = link::LIMIT.key(name);
        count.arg(check.window_s + 5);
        let used: redis::RedisResult<u64> =
            tokio::time::timeout(LIMIT_WAIT, count.invoke_async(&mut conn))
                .await
                .ok()?;
        match used {
            Ok(used) if used > check.max => Some(Admission::Denied {
                retry_after_s: check.retry_after_s(),
            }),
            Ok(_) => Some(Admission::Admitted),
            Err(e) => {
                tracing::debug!("fleet: a limit was counted locally: {e}");
                None
            }
        }
    }

    /// An admin edit of the fleet's config: read, changed and written under the fleet's edit
    /// lock, then announced. Refused while Redis is away.
    fn edit_fleet(
        &self,
        path: &Path,
        change: &mut dyn FnMut(&str) -> Result<Option<String>, String>,
    ) -> Result<bool, EditError> {
        let away = || {
            EditError::Unavailable(
                "the fleet's Redis is unreachable: admin edits wait until it answers again, so \
                 that none applies on one instance only"
                    .to_owned(),
            )
        };
        let conn = self.conn.load_full().ok_or_else(away)?;
        let names = (self.names.of("edits-lock"), self.names.of("edits"));
        let token = crate::app::session::random_token();
        let (lock, edits_name) = names.clone();
        let mut c = (*conn).clone();
        let lock_token = token.clone();
        let current: Option<Vec<u8>> = self
            .wait_for(EDIT_WAIT, async move {
                link::lock_and_read(&mut c, &lock, &edits_name, &lock_token).await
            })
            .map_err(EditError::Unavailable)?
            .map_err(|e| EditError::Unavailable(format!("the fleet's Redis: {e}")))?;
        // Whatever happens from here, the lock is released below.
        let mut edit = || -> Result<Option<FleetEdits>, String> {
            let mut edits = match &current {
                Some(sealed) => self.open_edits(sealed)?,
                None => FleetEdits::default(),
            };
            let base = crate::config::edit::read_or_defaults(path)?;
            let before = edits.apply(&base)?;
            match change(&before)? {
                Some(after) => {
                    edits.record(&before, &after)?;
                    edits.version += 1;
                    Ok(Some(edits))
                }
                None => Ok(None),
            }
        };
        let outcome = edit();
        let (lock, edits_name) = names;
        let channel = self.names.of("events");
        let mut c = (*conn).clone();
        let sealed = match &outcome {
            Ok(Some(edits)) => serde_json::to_vec(edits)
                .ok()
                .map(|plain| (self.seal.seal(&edits_name, &plain), edits.version)),
            _ => None,
        };
        let written = self
            .wait_for(EDIT_WAIT, async move {
                link::write_and_unlock(&mut c, &lock, &edits_name, &channel, &token, sealed).await
            })
            .map_err(|_| {
                EditError::Unavailable(
                    "the fleet's Redis did not confirm the edit in time: it may still apply \
                     (see the keys or settings page in a moment)"
                        .to_owned(),
                )
            })?
            .map_err(|e| EditError::Unavailable(format!("the fleet's Redis: {e}")))?;
        match outcome? {
            Some(edits) => {
                if !written {
                    return Err(EditError::Unavailable(
                        "the fleet's edit lock expired before the edit was saved: \
                                nothing was changed, try again"
                            .to_owned(),
                    ));
                }
                self.save_edits(&edits);
                self.edits.store(Arc::new(edits));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn open_edits(&self, sealed: &[u8]) -> Result<FleetEdits, String> {
        let plain = self.seal.open(&self.names.of("edits"), sealed).map_err(|e| {
            format!("the fleet's edits cannot be read ({e}): is GEMGATE_CLUSTER_SECRET the same on every instance?")
        })?;
        serde_json::from_slice(&plain).map_err(|e| format!("the fleet's edits: {e}"))
    }

    /// The fleet's edits changed (`edits`): applies them here with a reload, unless this
    /// instance has a newer copy.
    fn take_edits(&self, edits: FleetEdits) {
        let current = self.edits.load();
        if **current == edits || edits.version < current.version {
            return;
        }
        self.save_edits(&edits);
        self.edits.store(Arc::new(edits));
        let Some(state) = self.state.get().and_then(Weak::upgrade) else {
            return;
        };
        tokio::task::spawn_blocking(move || {
            // The same lock as an edit made here: the reload comes after it.
            let _one_at_a_time = state.edits.lock().unwrap_or_else(|e| e.into_inner());
            match crate::app::reload::reload(&state) {
                Ok(generation) => {
                    tracing::info!(generation, "fleet: applied the fleet's admin edits")
                }
                Err(e) => tracing::error!(
                    "fleet: the fleet's admin edits do not load here: {}",
                    e.message
                ),
            }
        });
    }

    /// The live members at the last heartbeat (at least 1: this one).
    fn members_live(&self) -> usize {
        self.members_seen.load(Ordering::Relaxed).max(1)
    }

    /// Whether a declared limit should be counted here rather than wait on Redis: it is away,
    /// or was slow at the last heartbeat.
    fn count_here(&self) -> bool {
        self.slow.load(Ordering::Relaxed) || !self.is_up()
    }

    fn status_json(&self) -> serde_json::Value {
        let link = self.link().clone();
        let now = now_ms();
        let members: Vec<serde_json::Value> = self
            .members
            .load()
            .iter()
            .map(|m| {
                serde_json::json!({
                    "instance": m.instance,
                    "version": m.version,
                    "generation": m.generation,
                    "heartbeat_ms": m.heartbeat_ms,
                    "heartbeat_age_s": now.saturating_sub(m.heartbeat_ms) / 1000,
                    "live": now.saturating_sub(m.heartbeat_ms) < MEMBER_LIVE_MS,
                    "started_ms": m.started_ms,
                    "this": m.instance == self.instance,
                })
            })
            .collect();
        serde_json::json!({
            "instance": self.instance,
            "redis": self.redis_shown,
            "status": match (link.up, link.slow) {
                (true, false) => "ok",
                (true, true) => "slow",
                (false, _) => "unreachable",
            },
            "degraded": !link.up || link.slow,
            "since_ms": link.since_ms,
            "last_error": link.last_error,
            "last_sync_ms": link.last_sync_ms,
            "members_live": self.members_seen.load(Ordering::Relaxed),
            "members": members,
            "dropped_changes": self.dropped.load(Ordering::Relaxed),
        })
    }
}

impl SharedState for Fleet {
    fn admit<'a>(&'a self, check: LimitCheck<'a>) -> Pending<'a, Admission> {
        Box::pin(async move {
            if let Some(admission) = self.admit_in_redis(&check).await {
                return admission;
            }
            // Redis away or slow: this instance's share of the limit, counted here.
            let members = self.members_live() as u64;
            self.local.admit_here(LimitCheck {
                max: check.max.div_ceil(members),
                ..check
            })
        })
    }

    fn admit_quota<'a>(&'a self, check: QuotaCheck<'a>) -> Pending<'a, QuotaVerdict> {
        Box::pin(async move { self.admit_quota_shared(&check).await })
    }

    /// Redis's copy (sealed) when it answers: a response kept or deleted by any instance;
    /// this instance's own when Redis is away, or has none (kept while it was away).
    fn response<'a>(&'a self, id: &'a str) -> Pending<'a, Option<StoredResponse>> {
        Box::pin(async move {
            match self.response_in_redis(id).await {
                Some(Some(kept)) => Some(kept).filter(|k| k.expires_ms > now_ms()),
                // A tombstone: deleted.
                Some(None) => None,
                None => self.local.response(id).await,
            }
        })
    }

    fn save_response<'a>(&'a self, id: &'a str, stored: Option<StoredResponse>) -> Pending<'a, ()> {
        Box::pin(async move {
            self.local.save_response(id, stored.clone()).await;
            let Some(conn) = self.conn.load_full() else {
                return; // Redis away: this instance alone keeps it.
            };
            let mut conn = (*conn).clone();
            let name = self.names.of(&format!("response:{id}"));
            // A deletion leaves a tombstone (`null`), so no instance's own copy comes back.
            let plain = serde_json::to_vec(&stored).expect("a response serialises");
            let ttl = match &stored {
                Some(kept) => kept
                    .expires_ms
                    .saturating_sub(now_ms())
                    .div_ceil(1000)
                    .max(1),
                None => RESPONSE_TOMBSTONE.as_secs(),
            };
            let mut cmd = redis::cmd("SET");
            cmd.arg(&name)
                .arg(self.seal.seal(&name, &plain))
                .arg("EX")
                .arg(ttl);
            let sent = tokio::time::timeout(RESPONSE_WAIT, cmd.query_async::<()>(&mut conn)).await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::warn!(response = %id, "fleet: a kept response was not shared (Redis did not answer)");
            }
        })
    }

    fn settle_quota(&self, settle: QuotaSettle<'_>) {
        self.settle_quota_shared(&settle);
    }

    fn fleet_status(&self) -> Option<serde_json::Value> {
        Some(self.status_json())
    }

    fn fleet_usage_today(&self) -> Option<HashMap<String, Counts>> {
        let today = crate::store::usage::day_of(now_ms());
        let usage = self.usage.load_full()?;
        (usage.0 == today).then(|| usage.1.clone())
    }

    fn fleet_settings(&self) -> Vec<String> {
        self.edits.load().settings.keys().cloned().collect()
    }

    fn key_succeeded(&self, pool: &KeyPool, index: usize) {
        self.local.key_succeeded(pool, index);
    }

    fn key_failed(&self, pool: &KeyPool, index: usize, failure: KeyFailure<'_>) -> Penalty {
        self.local.key_failed(pool, index, failure)
    }

    fn cool_key(&self, pool: &KeyPool, index: usize, model: &str, seconds: f64, now_ms: u64) {
        self.local.cool_key(pool, index, model, seconds, now_ms);
    }

    fn disable_key(&self, pool: &KeyPool, index: usize, reason: &str) {
        self.local.disable_key(pool, index, reason);
    }

    fn count_usage(&self, used: Used<'_>) {
        self.local.count_usage(used);
    }

    fn holds_files(&self) -> bool {
        self.local.holds_files()
    }

    fn file(&self, id: &str) -> Option<FileRecord> {
        self.local.file(id)
    }

    fn files_of(&self, client: &str) -> HashMap<String, Vec<String>> {
        self.local.files_of(client)
    }

    fn add_file(&self, id: String, record: FileRecord) {
        self.queue(Op::File(id.clone(), Some(FileWire::of(&record))));
        self.local.add_file(id, record);
    }

    fn remove_file(&self, id: &str) {
        self.queue(Op::File(id.to_owned(), None));
        self.local.remove_file(id);
    }

    fn upload(&self, upload_id: &str) -> Option<Owner> {
        self.local.upload(upload_id)
    }

    fn start_upload(&self, upload_id: String, owner: Owner) {
        let wire = UploadWire {
            id: upload_id.clone(),
            key: owner.key.clone(),
            client: owner.client.clone(),
            started_ms: now_ms(),
        };
        self.queue(Op::Upload(upload_id.clone(), Some(wire)));
        self.local.start_upload(upload_id, owner);
    }

    fn finish_upload(&self, upload_id: &str) {
        self.queue(Op::Upload(upload_id.to_owned(), None));
        self.local.finish_upload(upload_id);
    }

    fn client_failed(&self, ip: Option<IpAddr>) -> Option<Duration> {
        self.local.client_failed(ip)
    }

    fn client_succeeded(&self, ip: Option<IpAddr>) {
        self.local.client_succeeded(ip);
    }

    fn admin_failed(&self, ip: Option<IpAddr>) -> Option<Duration> {
        self.local.admin_failed(ip)
    }

    fn admin_succeeded(&self, ip: Option<IpAddr>) {
        self.local.admin_succeeded(ip);
    }

    fn open_session(&self, admin_token: &str) -> (String, String) {
        let (id, csrf) = self.local.open_session(admin_token);
        let wire = SessionWire {
            id: id.clone(),
            csrf: csrf.clone(),
            admin: hex(&crate::app::session::digest(admin_token)),
            expires_ms: now_ms() + crate::app::session::TTL.as_millis() as u64,
        };
        self.queue(Op::Session(id.clone(), Some(wire)));
        (id, csrf)
    }

    fn session_csrf(&self, id: &str, admin_token: &str) -> Option<String> {
        self.local.session_csrf(id, admin_token)
    }

    fn close_session(&self, id: &str) {
        self.queue(Op::Session(id.to_owned(), None));
        self.local.close_session(id);
    }

    fn counters(&self) -> Arc<dyn CounterStore> {
        self.local.counters()
    }

    fn edit_config(
        &self,
        path: &Path,
        change: &mut dyn FnMut(&str) -> Result<Option<String>, String>,
    ) -> Result<bool, EditError> {
        self.edit_fleet(path, change)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// This machine's host name (`localhost` when it has none).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_owned(),
        _ => "localhost".to_owned(),
    }
}

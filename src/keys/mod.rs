//! The key pool: which Gemini API keys exist, which may be used now, and what each failure
//! does to a key.
//!
//! Key *state* (failure counts, cooldowns, the disabled flag) is kept in [`KeyState`], owned by
//! the [`KeyRegistry`] by stable key id, so a config reload that rebuilds the pool never forgets
//! a cooldown. The request path touches only atomics and lock-free snapshots; the mutex in
//! [`KeyState`] is taken only when a key fails.

pub mod owners;
pub mod quota;
pub mod ready;
pub mod storm;
pub mod taxonomy;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::clock;
use crate::config::KeySpec;
use crate::config::quota::{Limit, QuotaLimits};
use quota::{Moment, ProjectWindows, Ticket};
use ready::{Candidates, Ready};
use taxonomy::{ErrorClass, KeyVerdict, Quota, Scope};

/// A (key, model) cooldown after a quota answer.
#[derive(Debug, Clone)]
pub struct Cooldown {
    /// The model whose quota ran out (`""` for calls without a model, `*` for every model).
    pub model: Box<str>,
    pub until_ms: u64,
    pub class: &'static str,
    /// Whose quota it was (`Scope::as_str`): this key's, or its project's.
    pub scope: &'static str,
    /// The quota Google named (`QuotaFailure`'s quota id; empty: none).
    pub quota: Box<str>,
}

/// A model of `cooldown_model` cools calls of `model`.
fn covers(cooldown_model: &str, model: &str) -> bool {
    cooldown_model == model || cooldown_model == "*"
}

/// A key's health as a fleet shares it (JSON in Redis, merged there by the same rules as
/// [`KeyState::merge`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyHealth {
    pub epoch: u64,
    pub disabled: bool,
    #[serde(default)]
    pub reason: String,
    /// Cooldowns by model: (end in ms since the epoch, error class).
    #[serde(default)]
    pub cool: std::collections::BTreeMap<String, (u64, String)>,
}

/// Why a key is disabled, and its last error.
#[derive(Debug, Clone, Default)]
pub struct KeyDetail {
    pub disabled_reason: Option<String>,
    pub last_error: Option<String>,
    /// The project Google named in the key's last quota or permission answer
    /// (`projects/123`).
    pub consumer: Option<String>,
}

/// The health of one key. Survives config reloads.
#[derive(Debug, Default)]
pub struct KeyState {
    consecutive_failures: AtomicU32,
    disabled: AtomicBool,
    in_flight: AtomicU32,
    successes: AtomicU64,
    failures: AtomicU64,
    last_used_ms: AtomicU64,
    /// The latest end of any cooldown: past it, the key cools for nothing, and the snapshot
    /// need not be read.
    cooling_until_max: AtomicU64,
    cooldowns: ArcSwap<Vec<Cooldown>>,
    detail: Mutex<KeyDetail>,
    /// Changed since the store last saved it.
    dirty: AtomicBool,
    /// Changed since the fleet last shared it (see [`KeyHealth`]).
    unshared: AtomicBool,
    /// How many times the key was enabled by hand: a fleet's later enable wins over an
    /// earlier disable (see [`KeyState::merge`]).
    epoch: AtomicU64,
    /// When the last probe confirming a 403 key fault started (see [`KeyState::claim_probe`]).
    last_probe_ms: AtomicU64,
    /// The registry's lists of changed keys, and this key's id in them (`None`: a state of
    /// its own, as tests make).
    listed: Option<(Arc<str>, Arc<Changed>)>,
    /// The key's `key` label in `/metrics`, interned on its first attempt: looking its id up
    /// for each attempt missed the cache in a pool of 100,000 keys taken in turn.
    metric_label: std::sync::OnceLock<&'static str>,
}

/// The ids of the keys whose state changed since the store saved it, and since the fleet
/// shared it: each key at most once (it is listed when its flag is set). Taking them does not
/// walk every key: with 100,000 keys, walking them at each of the store's four saves a second
/// took more CPU than the saves.
#[derive(Debug, Default)]
struct Changed {
    unsaved: Mutex<Vec<Arc<str>>>,
    unshared: Mutex<Vec<Arc<str>>>,
}

/// Least time between two probes confirming a key's 403s: a client that keeps provoking them
/// cannot make gemgate spend the key's quota on probes.
const PROBE_GAP_MS: u64 = 60_000;

impl KeyState {
    /// Asks the store to save this key's state.
    pub fn mark_dirty(&self) {
        let unsaved = !self.dirty.swap(true, Relaxed);
        let unshared = !self.unshared.swap(true, Relaxed);
        let Some((id, changed)) = &self.listed else {
            return;
        };
        for (list, newly) in [(&changed.unsaved, unsaved), (&changed.unshared, unshared)] {
            if newly {
                list.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(id.clone());
            }
        }
    }

    /// What a fleet shares of this key's health at `now_ms`.
    pub fn health(&self, now_ms: u64) -> KeyHealth {
        let detail = self.detail();
        KeyHealth {
            epoch: self.epoch.load(Relaxed),
            disabled: self.is_disabled(),
            reason: detail.disabled_reason.unwrap_or_default(),
            cool: self
                .cooldowns(now_ms)
                .into_iter()
                .map(|c| (c.model.into(), (c.until_ms, c.class.to_owned())))
                .collect(),
        }
    }

    /// Takes in what another instance of the fleet knows: a later epoch (an enable by hand
    /// there) replaces this state; the same epoch adds to it (disabled anywhere is disabled
    /// here, the later end of a cooldown wins); an earlier one is stale. Returns whether this
    /// state changed. What is merged in is not shared back (it came from the fleet).
    pub fn merge(&self, remote: &KeyHealth, now_ms: u64) -> bool {
        let mut changed = false;
        let mut epoch = self.epoch.load(Relaxed);
        while remote.epoch != epoch {
            if remote.epoch < epoch {
                return false;
            }
            // Raised only if no enable here came in between (that one is later still).
            match self
                .epoch
                .compare_exchange(epoch, remote.epoch, Relaxed, Relaxed)
            {
                Ok(_) => {
                    self.reset();
                    changed = true;
                    break;
                }
                Err(now) => epoch = now,
            }
        }
        if remote.disabled && !self.is_disabled() {
            ready::key_removed();
            self.disabled.store(true, Relaxed);
            self.detail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .disabled_reason = Some(remote.reason.clone());
            changed = true;
        }
        for (model, (until_ms, class)) in &remote.cool {
            if *until_ms > now_ms
                && self
                    .cooling_until(model, now_ms)
                    .is_none_or(|u| u < *until_ms)
            {
                self.put_cooldown(
                    Cooldown {
                        model: model.as_str().into(),
                        until_ms: *until_ms,
                        class: taxonomy::class_name(class),
                        scope: Scope::KeyModel.as_str(),
                        quota: "".into(),
                    },
                    now_ms,
                );
                changed = true;
            }
        }
        if changed {
            // Saved to the store, but not shared again.
            self.dirty.store(true, Relaxed);
        }
        changed
    }

    /// Puts saved state back (at start, from the store).
    pub fn restore(
        &self,
        disabled: bool,
        disabled_reason: Option<String>,
        consecutive_failures: u32,
        last_error: Option<String>,
        cooldowns: Vec<Cooldown>,
        epoch: u64,
    ) {
        ready::key_returned();
        for c in &cooldowns {
            ready::model_cooled(&c.model);
        }
        self.epoch.store(epoch, Relaxed);
        self.disabled.store(disabled, Relaxed);
        self.consecutive_failures
            .store(consecutive_failures, Relaxed);
        let latest = cooldowns.iter().map(|c| c.until_ms).max().unwrap_or(0);
        self.cooling_until_max.store(latest, Relaxed);
        self.cooldowns.store(Arc::new(cooldowns));
        let mut detail = self.detail.lock().unwrap_or_else(|e| e.into_inner());
        detail.disabled_reason = disabled_reason;
        detail.last_error = last_error;
    }

    /// How many times the key was enabled by hand (see [`KeyState::merge`]).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Relaxed)
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Relaxed)
    }

    /// The key's `key` label in `/metrics`: `intern` gives it the first time.
    pub fn metric_label(&self, intern: impl FnOnce() -> &'static str) -> &'static str {
        self.metric_label.get_or_init(intern)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    pub fn successes(&self) -> u64 {
        self.successes.load(Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }

    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Relaxed)
    }

    pub fn detail(&self) -> KeyDetail {
        self.detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The end of this key's cooldown for `model`, if it is cooling at `now_ms`.
    pub fn cooling_until(&self, model: &str, now_ms: u64) -> Option<u64> {
        self.with_cooldown(model, now_ms, |c| c.until_ms)
    }

    /// The cooldown that keeps the key from `model` at `now_ms` (the one ending last).
    pub fn cooldown_for(&self, model: &str, now_ms: u64) -> Option<Cooldown> {
        self.with_cooldown(model, now_ms, Cooldown::clone)
    }

    /// `read` of the cooldown for `model` ending last, if one runs at `now_ms`.
    fn with_cooldown<T>(
        &self,
        model: &str,
        now_ms: u64,
        read: impl FnOnce(&Cooldown) -> T,
    ) -> Option<T> {
        if self.cooling_until_max.load(Relaxed) <= now_ms {
            return None;
        }
        self.cooldowns
            .load()
            .iter()
            .filter(|c| covers(&c.model, model) && c.until_ms > now_ms)
            .max_by_key(|c| c.until_ms)
            .map(read)
    }

    /// Every cooldown still running at `now_ms`.
    pub fn cooldowns(&self, now_ms: u64) -> Vec<Cooldown> {
        self.cooldowns
            .load()
            .iter()
            .filter(|c| c.until_ms > now_ms)
            .cloned()
            .collect()
    }

    /// Cools the key for `model` until `until_ms`; an existing longer cooldown (a daily quota
    /// answered by a concurrent request) is kept.
    fn cool(&self, model: &str, until_ms: u64, class: &'static str, now_ms: u64) {
        self.mark_dirty();
        self.put_cooldown(
            Cooldown {
                model: model.into(),
                until_ms,
                class,
                scope: Scope::KeyModel.as_str(),
                quota: "".into(),
            },
            now_ms,
        );
    }

    /// Puts `cooldown` in (without marking the state changed); an existing longer cooldown
    /// for its model (a daily quota answered by a concurrent request) is kept.
    fn put_cooldown(&self, cooldown: Cooldown, now_ms: u64) {
        ready::model_cooled(&cooldown.model);
        self.cooling_until_max.fetch_max(cooldown.until_ms, Relaxed);
        self.cooldowns.rcu(|old| {
            let mut next: Vec<Cooldown> = old
                .iter()
                .filter(|c| c.until_ms > now_ms)
                .cloned()
                .collect();
            match next.iter_mut().find(|c| c.model == cooldown.model) {
                Some(c) if c.until_ms >= cooldown.until_ms => {}
                Some(c) => *c = cooldown.clone(),
                None => next.push(cooldown.clone()),
            }
            next
        });
    }

    /// Ends the key's cooldown for `model` if a bare 429 (no quota named) caused it: it was
    /// a storm's, not the key's.
    pub fn lift_bare_cooldown(&self, model: &str, now_ms: u64) {
        let bare =
            |c: &Cooldown| &*c.model == model && c.quota.is_empty() && c.class == "rate_limited";
        if !self.cooldowns.load().iter().any(bare) {
            return;
        }
        self.cooldowns.rcu(|old| {
            old.iter()
                .filter(|c| c.until_ms > now_ms && !bare(c))
                .cloned()
                .collect::<Vec<_>>()
        });
        self.mark_dirty();
        ready::key_returned();
    }

    fn record_success(&self) {
        self.successes.fetch_add(1, Relaxed);
        // Avoid a store (and a cache-line bounce) when there is nothing to reset.
        if self.consecutive_failures.load(Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
            self.mark_dirty();
        }
    }

    /// Marks the key disabled with `reason`.
    pub fn disable(&self, reason: impl Into<String>) {
        self.mark_dirty();
        ready::key_removed();
        self.disabled.store(true, Relaxed);
        self.detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .disabled_reason = Some(reason.into());
    }

    /// Claims the probe that confirms a 403 key fault: `false` while another ran less than a
    /// minute ago.
    pub fn claim_probe(&self, now_ms: u64) -> bool {
        let last = self.last_probe_ms.load(Relaxed);
        (last == 0 || now_ms >= last.saturating_add(PROBE_GAP_MS))
            && self
                .last_probe_ms
                .compare_exchange(last, now_ms, Relaxed, Relaxed)
                .is_ok()
    }

    /// Forgets the key's consecutive failures (a probe found it healthy).
    pub fn clear_failures(&self) {
        if self.consecutive_failures.swap(0, Relaxed) != 0 {
            self.mark_dirty();
        }
    }

    /// Returns a disabled or cooling key to the pool.
    pub fn enable(&self) {
        self.mark_dirty();
        self.epoch.fetch_add(1, Relaxed);
        self.reset();
    }

    /// Not disabled, no failures, no cooldowns.
    fn reset(&self) {
        ready::key_returned();
        self.disabled.store(false, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        self.cooldowns.store(Arc::new(Vec::new()));
        self.cooling_until_max.store(0, Relaxed);
        self.detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .disabled_reason = None;
    }
}

/// Key state by stable key id, kept across reloads for the life of the process.
#[derive(Debug, Default)]
pub struct KeyRegistry {
    states: Mutex<HashMap<String, Arc<KeyState>>>,
    changed: Arc<Changed>,
    /// Each project's quota windows, by project name (`key:<id>` for a key's own).
    windows: Mutex<HashMap<String, Arc<ProjectWindows>>>,
}

impl KeyRegistry {
    /// The quota windows of project `name`, made on first sight.
    pub fn windows(&self, name: &str) -> Arc<ProjectWindows> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows.entry(name.to_owned()).or_default().clone()
    }

    /// The state of key `id`, created on first sight.
    pub fn state(&self, id: &str) -> Arc<KeyState> {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let state = states.entry(id.to_owned()).or_insert_with(|| {
            Arc::new(KeyState {
                listed: Some((id.into(), self.changed.clone())),
                ..KeyState::default()
            })
        });
        state.clone()
    }

    /// The keys whose state changed since the last call, marked clean.
    pub fn take_dirty(&self) -> Vec<(String, Arc<KeyState>)> {
        self.take(&self.changed.unsaved, |s| &s.dirty)
    }

    /// The keys whose state changed since a fleet last shared it, marked shared.
    pub fn take_unshared(&self) -> Vec<(String, Arc<KeyState>)> {
        self.take(&self.changed.unshared, |s| &s.unshared)
    }

    /// Every key ever seen.
    pub fn all(&self) -> Vec<(String, Arc<KeyState>)> {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states
            .iter()
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect()
    }

    fn take(
        &self,
        list: &Mutex<Vec<Arc<str>>>,
        flag: impl Fn(&KeyState) -> &AtomicBool,
    ) -> Vec<(String, Arc<KeyState>)> {
        let ids = std::mem::take(&mut *list.lock().unwrap_or_else(|e| e.into_inner()));
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter()
            .filter_map(|id| Some((id, states.get(&**id)?)))
            .filter(|(_, s)| flag(s).swap(false, Relaxed))
            .map(|(id, s)| (id.to_string(), s.clone()))
            .collect()
    }
}

/// One key of the current pool.
#[derive(Debug)]
pub struct Key {
    pub spec: KeySpec,
    pub state: Arc<KeyState>,
    /// The secret as a ready `x-goog-api-key` value (marked sensitive).
    pub header: http::HeaderValue,
}

impl Key {
    /// `active`, `cooling` (for some model) or `disabled`, at `now_ms`.
    pub fn state_name(&self, now_ms: u64) -> &'static str {
        if self.state.is_disabled() {
            "disabled"
        } else if self.state.cooldowns(now_ms).is_empty() {
            "active"
        } else {
            "cooling"
        }
    }
}

/// What a failed attempt did to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Penalty {
    /// Nothing: the key is not to blame.
    None,
    /// One more consecutive key fault, short of `MAX_FAILURES`.
    Counted,
    /// Cooling for the model.
    Cooled,
    Disabled,
    /// A 403 key fault at `MAX_FAILURES`, or a 403 that may be the key's: disable the key
    /// only if a probe confirms it (see `app::checks::confirm`).
    Confirm,
}

/// The outcome of looking for a key.
#[derive(Debug, PartialEq)]
pub enum Pick {
    /// Use the key at this index.
    Key(usize),
    /// The pool has no key at all.
    Empty,
    /// The one key that may serve (it holds the resource the request is about) is out: key
    /// `key` (its id) is cooling until `until_ms`, or disabled (`None`) for `why`.
    Held {
        key: String,
        why: String,
        until_ms: Option<u64>,
    },
    /// Every key is disabled, cooling for this model, at its project's limit, or already
    /// tried for this request. `retry_at_ms` is the earliest time one may serve again.
    Exhausted {
        retry_at_ms: Option<u64>,
        cooling: usize,
        disabled: usize,
        /// Whether keys were left out because their projects are at a limit.
        limited: bool,
    },
}

/// A Cloud project of the pool: keys that share one quota. A key without a project is a
/// project of its own, named by the key's id.
#[derive(Debug)]
pub struct Project {
    /// The name its quota windows go by (also in a fleet's Redis): the project's name, or
    /// `key:<id>` for a key's own.
    pub windows_name: Box<str>,
    pub name: Box<str>,
    /// Whether the config names it (else it is a key's own).
    pub named: bool,
    pub tier: Option<Box<str>>,
    /// Pool indices of its keys.
    pub keys: Vec<u32>,
    pub windows: Arc<ProjectWindows>,
}

/// The keys of one configuration generation.
#[derive(Debug)]
pub struct KeyPool {
    keys: Vec<Key>,
    by_id: HashMap<String, usize, foldhash::fast::RandomState>,
    projects: Vec<Project>,
    /// Each key's project (an index into `projects`).
    project_of: Vec<u32>,
    quota: QuotaLimits,
    /// The models some project of the pool has a limit for: other models skip quota work.
    limited_models: std::collections::HashSet<String, foldhash::fast::RandomState>,
    /// The usable keys by model (see [`ready`]); read without a lock by every request.
    ready: ArcSwap<HashMap<Box<str>, Arc<Ready>, foldhash::fast::RandomState>>,
    /// Where the choice by headroom starts looking, turning with each choice.
    turn: AtomicU64,
    max_failures: u32,
    /// The Vertex AI express keys (`kind = "vertex_express"`), which only some calls may use.
    vertex: Vec<usize>,
}

/// Holds a key "in flight" until dropped.
#[derive(Debug)]
pub struct Lease {
    state: Arc<KeyState>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Relaxed);
    }
}

/// How many usable keys the choice by headroom compares.
const HEADROOM_CHOICES: usize = 4;

impl KeyPool {
    pub fn new(
        specs: &[KeySpec],
        registry: &KeyRegistry,
        max_failures: u32,
        quota: &QuotaLimits,
    ) -> KeyPool {
        let keys = specs
            .iter()
            .map(|spec| {
                let mut header = http::HeaderValue::from_str(spec.secret.expose())
                    .expect("config validation keeps keys to visible ASCII");
                header.set_sensitive(true);
                Key {
                    spec: spec.clone(),
                    state: registry.state(&spec.id),
                    header,
                }
            })
            .collect();
        let by_id = specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let (projects, project_of) = projects(specs, registry);
        let limited_models = quota
            .limited_models(projects.iter().filter_map(|p| p.tier.as_deref()))
            .into_iter()
            .collect();
        KeyPool {
            keys,
            by_id,
            projects,
            project_of,
            quota: quota.clone(),
            limited_models,
            ready: ArcSwap::default(),
            turn: AtomicU64::new(0),
            max_failures: max_failures.max(1),
            vertex: (0..specs.len()).filter(|&i| specs[i].vertex).collect(),
        }
    }

    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The indices of the Vertex AI express keys.
    pub fn vertex_keys(&self) -> &[usize] {
        &self.vertex
    }

    pub fn get(&self, index: usize) -> &Key {
        &self.keys[index]
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The index of the key with this id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// The projects of the pool, keys without one each their own.
    pub fn projects(&self) -> &[Project] {
        &self.projects
    }

    /// Key `index`'s project.
    pub fn project(&self, index: usize) -> &Project {
        &self.projects[self.project_of[index] as usize]
    }

    /// Whether key `index` may serve `model` at `now_ms` (disabled and cooling keys may not;
    /// see [`KeyPool::room`] for its project's limits).
    pub fn usable(&self, index: usize, model: &str, now_ms: u64) -> bool {
        let state = &self.keys[index].state;
        !state.is_disabled() && state.cooling_until(model, now_ms).is_none()
    }

    /// Why key `index` would be passed over for an attempt of about `tokens` input tokens of
    /// `model` at `now_ms` (`None`: it may serve), for a trace of the choice.
    pub fn passed_over(
        &self,
        index: usize,
        model: &str,
        tried: &[usize],
        tokens: u64,
        now_ms: u64,
    ) -> Option<String> {
        let state = &self.keys[index].state;
        if tried.contains(&index) {
            return Some("tried".into());
        }
        if state.is_disabled() {
            let reason = state.detail().disabled_reason.unwrap_or_default();
            return Some(format!("disabled ({reason})"));
        }
        if let Some(c) = state.cooldown_for(model, now_ms) {
            let left_s = c.until_ms.saturating_sub(now_ms).div_ceil(1000);
            return Some(format!("cooling {left_s}s after {} ({})", c.class, c.scope));
        }
        if let Err(at) = self.room(index, model, tokens, now_ms) {
            let left_s = at.saturating_sub(now_ms).div_ceil(1000);
            return Some(format!("project at its limit for {left_s}s"));
        }
        None
    }

    /// Key `index`'s project's limit for `model`, if it has one.
    pub fn limit(&self, index: usize, model: &str) -> Option<Limit> {
        if self.limited_models.is_empty() || !self.limited_models.contains(model) {
            return None;
        }
        self.quota.limit(self.project(index).tier.as_deref(), model)
    }

    /// What is left of key `index`'s project's limit for `model` at `now_ms`: from 0 (at the
    /// limit) to 1 (unused, or no limit).
    pub fn headroom(&self, index: usize, model: &str, now_ms: u64) -> f64 {
        match self.limit(index, model) {
            Some(limit) => {
                let windows = &self.project(index).windows;
                windows.headroom(model, &limit, Moment::of(now_ms))
            }
            None => 1.0,
        }
    }

    /// Whether key `index`'s project may send one more request of `model` of about `tokens`
    /// input tokens now: `Err` with the time it may.
    pub fn room(&self, index: usize, model: &str, tokens: u64, now_ms: u64) -> Result<(), u64> {
        match self.limit(index, model) {
            Some(limit) => {
                let windows = &self.project(index).windows;
                windows
                    .free_at(model, &limit, tokens, Moment::of(now_ms))
                    .map_or(Ok(()), Err)
            }
            None => Ok(()),
        }
    }

    /// Counts a request of about `tokens` input tokens for `model` against key `index`'s
    /// project, whose limit is shared by `share` instances (1: this one alone); `Ok(None)`:
    /// nothing limits it; `Err`: it does not fit until then.
    pub fn admit(
        &self,
        index: usize,
        model: &str,
        tokens: u64,
        share: u32,
        now_ms: u64,
    ) -> Result<Option<Ticket>, u64> {
        match self.limit(index, model) {
            Some(limit) => self
                .project(index)
                .windows
                .admit(model, &limit.share(share), tokens, Moment::of(now_ms))
                .map(Some),
            None => Ok(None),
        }
    }

    /// The keys usable for `model`, as of a moment at most a little before `now_ms`.
    fn ready(&self, model: &str, now_ms: u64) -> Arc<Ready> {
        self.ready_list(model, now_ms, false)
    }

    /// [`KeyPool::ready`], made again if a key dropped out since (`exact`): for the counts of
    /// an answer saying no key is usable.
    fn ready_list(&self, model: &str, now_ms: u64, exact: bool) -> Arc<Ready> {
        let list = ready::list_for(model);
        if let Some(r) = self
            .ready
            .load()
            .get(list)
            .filter(|r| r.fresh(now_ms) && (!exact || r.exact()))
        {
            return r.clone();
        }
        // Two requests may both make it; the later one's stays.
        let made = Arc::new(self.make_ready(list, now_ms));
        self.ready.rcu(|lists| {
            let mut next = HashMap::clone(lists);
            next.insert(list.into(), made.clone());
            next
        });
        made
    }

    /// One pass over the pool: the keys usable for `model` (a list's model) at `now_ms`.
    fn make_ready(&self, model: &str, now_ms: u64) -> Ready {
        let (mut keys, mut retry_at_ms, mut cooling, mut disabled) = (Vec::new(), None, 0, 0);
        for (i, key) in self.keys.iter().enumerate() {
            if key.state.is_disabled() {
                disabled += 1;
            } else if let Some(until) = key.state.cooling_until(model, now_ms) {
                cooling += 1;
                retry_at_ms = Some(retry_at_ms.map_or(until, |r: u64| r.min(until)));
            } else {
                keys.push(i as u32);
            }
        }
        Ready::new(keys, retry_at_ms, cooling, disabled, now_ms)
    }

    /// The built-in choice: the first usable key for `model` not in `tried`, in config order;
    /// when projects have limits for `model`, of the next few usable keys in turn the one
    /// whose project has the most headroom. Keys whose projects are at a limit are passed
    /// over. (Round-robin and the other strategies are plugins.)
    pub fn pick(&self, model: &str, tried: &[usize], tokens: u64, now_ms: u64) -> Pick {
        if self.keys.is_empty() {
            return Pick::Empty;
        }
        let ready = self.ready(model, now_ms);
        if let Some(at) = ready.full_until(now_ms) {
            return exhausted_of(&ready, Some(at));
        }
        let limited = !self.limited_models.is_empty() && self.limited_models.contains(model);
        let n = ready.keys.len();
        let start = if limited && n > 0 {
            (self.turn.fetch_add(1, Relaxed) % n as u64) as usize
        } else {
            0
        };
        let mut best: Option<(usize, f64)> = None;
        let (mut compared, mut full_until, mut partial) = (0, None::<u64>, false);
        for step in 0..n {
            let i = ready.keys[(start + step) % n] as usize;
            if tried.contains(&i) {
                partial = true;
                continue;
            }
            if !self.usable(i, model, now_ms) {
                continue;
            }
            if !limited {
                return Pick::Key(i);
            }
            if let Err(at) = self.room(i, model, tokens, now_ms) {
                full_until = Some(full_until.map_or(at, |f| f.min(at)));
                // Full for a request of any size, not only for one as large as this: then
                // the next requests need not look again before it frees.
                partial |= self.room(i, model, 0, now_ms).is_ok();
                continue;
            }
            let h = self.headroom(i, model, now_ms);
            if best.is_none_or(|(_, b)| h > b) {
                best = Some((i, h));
            }
            compared += 1;
            if compared == HEADROOM_CHOICES {
                break;
            }
        }
        if let Some((i, _)) = best {
            return Pick::Key(i);
        }
        if let Some(at) = full_until
            && !partial
        {
            ready.set_full_until(at);
        }
        exhausted_of(&self.ready_list(model, now_ms, true), full_until)
    }

    /// The keys a `select_key` plugin chooses from for `model`: those usable when the list
    /// was made, less `tried`, in config order. Made without a pass over the pool.
    pub fn candidates(&self, model: &str, tried: &[usize], now_ms: u64) -> Candidates {
        Candidates::new(self.ready(model, now_ms).keys.clone(), tried)
    }

    /// The earliest end of a cooldown for `model` of any key (for a 429's `Retry-After`).
    pub fn retry_at(&self, model: &str, now_ms: u64) -> Option<u64> {
        self.ready(model, now_ms).retry_at_ms
    }

    /// Why no key can serve `model`; `limited_until`: keys were passed over because their
    /// projects are at a limit until then.
    pub fn exhausted(&self, model: &str, limited_until: Option<u64>, now_ms: u64) -> Pick {
        exhausted_of(&self.ready_list(model, now_ms, true), limited_until)
    }

    /// Marks key `index` in use until the lease is dropped.
    pub fn lease(&self, index: usize, now_ms: u64) -> Lease {
        let state = self.keys[index].state.clone();
        state.in_flight.fetch_add(1, Relaxed);
        state.last_used_ms.store(now_ms, Relaxed);
        Lease { state }
    }

    /// Cools key `index` for `model` for `seconds` (a plugin's `gemgate.cool`).
    pub fn cool(&self, index: usize, model: &str, seconds: f64, now_ms: u64) {
        // At most a year: an end of 1e14 ms or more would not survive the fleet's JSON.
        let until = now_ms.saturating_add((seconds.min(366.0 * 86_400.0) * 1000.0) as u64);
        self.keys[index].state.cool(model, until, "policy", now_ms);
    }

    pub fn record_success(&self, index: usize) {
        self.keys[index].state.record_success();
    }

    /// Applies the taxonomy's verdict for a failed attempt of key `index` on `model`.
    /// Returns what was done.
    pub fn record_failure(
        &self,
        index: usize,
        model: &str,
        class: ErrorClass,
        message: &str,
        now_ms: u64,
    ) -> Penalty {
        self.record_failure_of(index, model, class, message, now_ms, &Quota::default())
    }

    /// [`KeyPool::record_failure`] for an answer naming `quota`: a project's quota cools
    /// every key of the key's project (for `model`, or for every model); the project Google
    /// names is noted for the key.
    pub fn record_failure_of(
        &self,
        index: usize,
        model: &str,
        class: ErrorClass,
        message: &str,
        now_ms: u64,
        quota: &Quota,
    ) -> Penalty {
        let key = &self.keys[index];
        let state = &key.state;
        state.failures.fetch_add(1, Relaxed);
        let verdict = class.verdict();
        if verdict != KeyVerdict::NoPenalty || quota.consumer.is_some() {
            let mut detail = state.detail.lock().unwrap_or_else(|e| e.into_inner());
            if verdict != KeyVerdict::NoPenalty {
                detail.last_error = Some(format!("{}: {}", class.as_str(), truncate(message, 300)));
            }
            if let Some(c) = &quota.consumer {
                detail.consumer = Some(c.to_string());
            }
        }
        match verdict {
            KeyVerdict::Fault | KeyVerdict::Suspect => {
                state.mark_dirty();
                let count = state.consecutive_failures.fetch_add(1, Relaxed) + 1;
                if count < self.max_failures || state.is_disabled() {
                    return Penalty::Counted;
                }
                if verdict == KeyVerdict::Suspect {
                    return if state.claim_probe(now_ms) {
                        Penalty::Confirm
                    } else {
                        Penalty::Counted
                    };
                }
                state.disable(format!(
                    "{} after {count} consecutive failures",
                    class.as_str()
                ));
                tracing::warn!(key = %key.spec.id, label = %key.spec.label, class = class.as_str(), "key disabled");
                Penalty::Disabled
            }
            KeyVerdict::CoolFor(d) => {
                let until = now_ms.saturating_add(d.as_millis() as u64);
                self.cool_for_quota(index, model, until, class, quota, now_ms);
                Penalty::Cooled
            }
            KeyVerdict::CoolUntilDailyReset => {
                let until = clock::next_pacific_midnight_ms(now_ms);
                self.cool_for_quota(index, model, until, class, quota, now_ms);
                Penalty::Cooled
            }
            KeyVerdict::Probe if state.claim_probe(now_ms) => Penalty::Confirm,
            KeyVerdict::Probe | KeyVerdict::NoPenalty => Penalty::None,
        }
    }
}

impl KeyPool {
    /// Cools key `index` after a quota answer of `scope`, and with a project's quota every
    /// key of its project (a key without a project is its own).
    fn cool_for_quota(
        &self,
        index: usize,
        model: &str,
        until: u64,
        class: ErrorClass,
        quota: &Quota,
        now_ms: u64,
    ) {
        let scope = quota.scope;
        let project = self.project(index);
        let alone = [index as u32];
        let (members, scope) = match scope {
            Scope::KeyModel => (&alone[..], scope),
            // A key's own project is the key alone.
            _ if !project.named => (&alone[..], Scope::KeyModel),
            _ => (project.keys.as_slice(), scope),
        };
        let cooldown = Cooldown {
            model: if scope == Scope::Project { "*" } else { model }.into(),
            until_ms: until,
            class: class.as_str(),
            scope: scope.as_str(),
            quota: quota.id.clone(),
        };
        for &i in members {
            let state = &self.keys[i as usize].state;
            state.mark_dirty();
            state.put_cooldown(cooldown.clone(), now_ms);
        }
    }
}

/// Why no key of `ready` can serve; `limited_until`: keys were passed over because their
/// projects are at a limit, the first of which frees then.
fn exhausted_of(ready: &Ready, limited_until: Option<u64>) -> Pick {
    let retry_at_ms = match (ready.retry_at_ms, limited_until) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Pick::Exhausted {
        retry_at_ms,
        cooling: ready.cooling,
        disabled: ready.disabled,
        limited: limited_until.is_some(),
    }
}

/// The projects of `specs` (a key without one is its own) and each key's project.
fn projects(specs: &[KeySpec], registry: &KeyRegistry) -> (Vec<Project>, Vec<u32>) {
    let mut projects: Vec<Project> = Vec::new();
    let mut by_name: HashMap<&str, u32, foldhash::fast::RandomState> = HashMap::default();
    let mut project_of = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let at = match spec.project.as_deref() {
            Some(name) => *by_name.entry(name).or_insert_with(|| {
                projects.push(Project {
                    windows_name: name.into(),
                    name: name.into(),
                    named: true,
                    tier: spec.tier.as_deref().map(Into::into),
                    keys: Vec::new(),
                    windows: registry.windows(name),
                });
                projects.len() as u32 - 1
            }),
            None => {
                let windows_name = format!("key:{}", spec.id);
                projects.push(Project {
                    windows: registry.windows(&windows_name),
                    windows_name: windows_name.into(),
                    name: spec.id.as_str().into(),
                    named: false,
                    tier: spec.tier.as_deref().map(Into::into),
                    keys: Vec::new(),
                });
                projects.len() as u32 - 1
            }
        };
        let project = &mut projects[at as usize];
        project.keys.push(i as u32);
        // A key naming no tier has its project's (config validation keeps them to one).
        if project.tier.is_none() {
            project.tier = spec.tier.as_deref().map(Into::into);
        }
        project_of.push(at);
    }
    (projects, project_of)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Seconds from `now_ms` until `until_ms`, rounded up, at least 1.
pub fn seconds_until(until_ms: u64, now_ms: u64) -> u64 {
    Duration::from_millis(until_ms.saturating_sub(now_ms))
        .as_secs_f64()
        .ceil()
        .max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, stable_id};

    #[test]
    fn changed_keys_are_taken_once_each_for_the_store_and_the_fleet_apart() {
        let registry = KeyRegistry::default();
        let [a, _b, c] = ["a", "b", "c"].map(|id| registry.state(id));
        a.disable("test");
        a.mark_dirty();
        c.mark_dirty();
        let ids = |taken: Vec<(String, Arc<KeyState>)>| {
            let mut ids: Vec<String> = taken.into_iter().map(|(id, _)| id).collect();
            ids.sort();
            ids
        };
        assert_eq!(ids(registry.take_dirty()), ["a", "c"]);
        assert!(registry.take_dirty().is_empty());
        // The fleet's list is its own: the store taking its keys did not take them.
        assert_eq!(ids(registry.take_unshared()), ["a", "c"]);
        // Changed again after being taken: listed again, once however often it changes.
        c.mark_dirty();
        c.mark_dirty();
        assert_eq!(registry.changed.unsaved.lock().unwrap().len(), 1);
        assert_eq!(ids(registry.take_dirty()), ["c"]);
        assert_eq!(ids(registry.take_unshared()), ["c"]);
    }

    /// A pool of `projects` projects of `per_project` keys each, limited by `quota` (TOML of
    /// `[quota]`).
    fn projects_pool(projects: usize, per_project: usize, quota: &str) -> KeyPool {
        let quota = QuotaLimits::resolve(&toml::from_str(quota).unwrap()).unwrap();
        let specs = specs(projects * per_project, |i| {
            Some(format!("p{}", i / per_project))
        });
        KeyPool::new(&specs, &KeyRegistry::default(), 3, &quota)
    }

    /// `n` keys, key `i` in project `project(i)`.
    fn specs(n: usize, project: impl Fn(usize) -> Option<String>) -> Vec<KeySpec> {
        (0..n)
            .map(|i| {
                let secret = format!("key-{i}");
                KeySpec {
                    id: stable_id("k", &secret),
                    secret: Secret::new(secret.clone()),
                    label: secret,
                    tags: vec![],
                    weight: 1,
                    source: Default::default(),
                    project: project(i),
                    tier: None,
                    vertex: false,
                }
            })
            .collect()
    }

    /// Google's daily quota, simulated over three days with an injected clock: requests
    /// offered at 1.5 times the pool's daily capacity, in bursts. gemgate never sends a project
    /// over its daily limit, and serves the whole capacity of every day.
    #[test]
    fn three_simulated_days_of_daily_limits_get_no_429_and_the_whole_capacity() {
        const RPD: u32 = 20;
        let p = projects_pool(3, 2, "[limits.m]\nrpm = 5\nrpd = 20");
        // Google's side: each project's requests of each Pacific day.
        let mut google: HashMap<(usize, u64), u32> = HashMap::new();
        let start = clock::next_pacific_midnight_ms(1_800_000_000_000);
        let days = 3;
        let (mut served, mut refused_upstream) = (0u32, 0u32);
        let capacity = 3 * RPD * days;
        for burst in 0..days * 6 {
            // 15 requests every 4 hours: 90 a day, 1.5 times the 60 the projects allow.
            let now = start + u64::from(burst) * 4 * 3_600_000;
            for _ in 0..15 {
                let Pick::Key(i) = p.pick("m", &[], 10, now) else {
                    continue;
                };
                if p.admit(i, "m", 10, 1, now).is_err() {
                    continue;
                }
                let day = clock::next_pacific_midnight_ms(now);
                let used = google.entry((p.project_of[i] as usize, day)).or_default();
                if *used >= RPD {
                    refused_upstream += 1;
                } else {
                    *used += 1;
                    served += 1;
                }
            }
        }
        assert_eq!(refused_upstream, 0);
        assert_eq!(served, capacity, "every day's capacity, no more");
        assert!(google.values().all(|&n| n == RPD), "{google:?}");
    }

    /// A client naming models at random makes no list of its own for each: only models that
    /// had a cooldown get one.
    #[test]
    fn random_model_names_make_no_new_lists() {
        let p = pool(3, 3);
        for i in 0..10_000 {
            assert_eq!(p.pick(&format!("random-{i}"), &[], 0, 1_000), Pick::Key(0));
        }
        assert_eq!(
            p.ready.load().len(),
            1,
            "one list for every model without cooldowns"
        );
        p.record_failure(
            0,
            "cooled-model",
            ErrorClass::RateLimited {
                retry_after: Duration::from_secs(10),
            },
            "",
            1_000,
        );
        assert_eq!(p.pick("cooled-model", &[], 0, 1_000), Pick::Key(1));
        assert_eq!(p.ready.load().len(), 2);
    }

    /// What choosing a key costs at 10, 1,000 and 100,000 keys: the list of usable keys, the
    /// choice by headroom, the admission. Run with
    /// `cargo test --release --lib -- --ignored --nocapture choice_cost`.
    #[test]
    #[ignore]
    fn choice_cost() {
        for n in [10, 1_000, 100_000] {
            let p = projects_pool(n / 2, 2, "[limits.m]\nrpm = 1000000000");
            let cooled = projects_pool(n / 2, 2, "[limits.m]\nrpm = 1000000000");
            // Nine keys in ten cooling for the model.
            for i in (0..n).filter(|i| i % 10 != 0) {
                cooled.cool(i, "m", 3_600.0, 1_000);
            }
            for (name, pool) in [("all usable", &p), ("9 of 10 cooling", &cooled)] {
                let rounds = 200_000;
                let t = std::time::Instant::now();
                for r in 0..rounds {
                    let now = 10_000 + r as u64 / 100;
                    if let Pick::Key(i) = pool.pick("m", &[], 100, now) {
                        let _ = std::hint::black_box(pool.admit(i, "m", 100, 1, now));
                    }
                    std::hint::black_box(pool.candidates("m", &[], now));
                }
                let ns = t.elapsed().as_nanos() as f64 / rounds as f64;
                println!(
                    "{n:>7} keys, {name:<16}: {ns:>6.0} ns per request (choice, admission, plugin list)"
                );
            }
        }
    }

    fn pool(n: usize, max_failures: u32) -> KeyPool {
        let specs = specs(n, |_| None);
        KeyPool::new(
            &specs,
            &KeyRegistry::default(),
            max_failures,
            &QuotaLimits::default(),
        )
    }

    #[test]
    fn the_built_in_choice_skips_tried_and_unusable_keys() {
        let p = pool(3, 1);
        assert_eq!(p.pick("m", &[], 0, 0), Pick::Key(0));
        assert_eq!(p.pick("m", &[0], 0, 0), Pick::Key(1));
        p.record_failure(1, "m", ErrorClass::KeyInvalid, "bad", 0);
        assert_eq!(p.pick("m", &[0], 0, 0), Pick::Key(2));
        // The plugins' list leaves a key out once it is made again (a little later).
        let c = p.candidates("m", &[], 1_000);
        assert_eq!((c.len(), c.get(0), c.get(1)), (2, Some(0), Some(2)));
        assert_eq!(p.pick("m", &[0, 1], 0, 0), Pick::Key(2));
        assert!(matches!(
            p.pick("m", &[0, 1, 2], 0, 0),
            Pick::Exhausted { .. }
        ));
    }

    #[test]
    fn cooldown_is_per_model() {
        let p = pool(1, 3);
        p.record_failure(
            0,
            "flash",
            ErrorClass::RateLimited {
                retry_after: Duration::from_secs(10),
            },
            "",
            1_000,
        );
        assert_eq!(
            p.pick("flash", &[], 0, 2_000),
            Pick::Exhausted {
                retry_at_ms: Some(11_000),
                cooling: 1,
                disabled: 0,
                limited: false
            }
        );
        assert_eq!(p.pick("pro", &[], 0, 2_000), Pick::Key(0));
        assert_eq!(p.pick("flash", &[], 0, 11_000), Pick::Key(0));
    }

    #[test]
    fn a_short_cooldown_never_shortens_a_long_one() {
        let p = pool(1, 3);
        p.record_failure(0, "m", ErrorClass::DailyQuota, "", 0);
        let daily = p.get(0).state.cooling_until("m", 1).unwrap();
        p.record_failure(
            0,
            "m",
            ErrorClass::RateLimited {
                retry_after: Duration::from_secs(5),
            },
            "",
            0,
        );
        assert_eq!(p.get(0).state.cooling_until("m", 1), Some(daily));
    }

    #[test]
    fn consecutive_faults_disable_and_success_resets() {
        let p = pool(1, 2);
        p.record_failure(0, "m", ErrorClass::KeyInvalid, "bad", 0);
        p.record_success(0);
        p.record_failure(0, "m", ErrorClass::KeyInvalid, "bad", 0);
        assert!(!p.get(0).state.is_disabled());
        p.record_failure(0, "m", ErrorClass::KeyInvalid, "bad", 0);
        assert!(p.get(0).state.is_disabled());
        p.record_failure(0, "m", ErrorClass::Upstream, "503", 0);
        assert_eq!(
            p.get(0).state.consecutive_failures(),
            2,
            "5xx is no key fault"
        );
    }

    #[test]
    fn a_403_key_fault_asks_for_a_probe_at_most_once_a_minute() {
        let p = pool(1, 2);
        let forbidden = |now| p.record_failure(0, "m", ErrorClass::KeyForbidden, "no", now);
        assert_eq!(forbidden(1_000), Penalty::Counted);
        assert_eq!(forbidden(1_000), Penalty::Confirm);
        assert_eq!(forbidden(2_000), Penalty::Counted, "a probe runs already");
        assert!(!p.get(0).state.is_disabled(), "only a probe disables");
        assert_eq!(forbidden(61_000), Penalty::Confirm);
        p.get(0).state.clear_failures();
        assert_eq!(p.get(0).state.consecutive_failures(), 0);
    }

    #[test]
    fn state_survives_a_rebuilt_pool() {
        let registry = KeyRegistry::default();
        let spec = KeySpec {
            id: "k1".into(),
            secret: Secret::new("s"),
            label: "s".into(),
            tags: vec![],
            weight: 1,
            source: Default::default(),
            project: None,
            tier: None,
            vertex: false,
        };
        let first = KeyPool::new(
            std::slice::from_ref(&spec),
            &registry,
            1,
            &QuotaLimits::default(),
        );
        first.record_failure(0, "m", ErrorClass::KeyInvalid, "", 0);
        let second = KeyPool::new(&[spec], &registry, 1, &QuotaLimits::default());
        assert!(second.get(0).state.is_disabled());
    }

    #[test]
    fn a_fleet_merges_key_health_by_epoch_then_adds() {
        let now = 1_000_000;
        let here = KeyState::default();
        here.cool("m", now + 5_000, "rate_limited", now);
        // The same epoch adds up: disabled anywhere is disabled here; the later end wins.
        let mut remote = KeyHealth {
            epoch: 0,
            disabled: true,
            reason: "key_invalid after 3 consecutive failures".into(),
            cool: [
                ("m".to_owned(), (now + 2_000, "rate_limited".to_owned())),
                ("n".to_owned(), (now + 9_000, "daily_quota".to_owned())),
            ]
            .into(),
        };
        assert!(here.merge(&remote, now));
        assert!(here.is_disabled());
        assert_eq!(
            here.cooling_until("m", now),
            Some(now + 5_000),
            "kept the later end"
        );
        assert_eq!(here.cooling_until("n", now), Some(now + 9_000));
        assert_eq!(
            here.cooldowns(now)
                .iter()
                .find(|c| &*c.model == "n")
                .unwrap()
                .class,
            "daily_quota"
        );
        // What came from the fleet is saved, not shared back.
        assert!(here.dirty.load(Relaxed));
        assert!(
            here.unshared.swap(false, Relaxed),
            "the cool() above was local"
        );
        assert!(!here.merge(&remote, now), "nothing new");
        assert!(!here.unshared.load(Relaxed));
        // An older epoch (an instance that has not seen the enable yet) changes nothing.
        here.enable();
        assert_eq!(here.health(now).epoch, 1);
        assert!(!here.merge(&remote, now));
        assert!(!here.is_disabled());
        // A later epoch (an enable elsewhere) replaces the state, then adds its own.
        here.disable("operator");
        remote.epoch = 2;
        remote.disabled = false;
        remote.cool.clear();
        assert!(here.merge(&remote, now));
        assert!(!here.is_disabled());
        assert!(here.cooldowns(now).is_empty());
        assert_eq!(
            here.health(now),
            KeyHealth {
                epoch: 2,
                ..KeyHealth::default()
            }
        );
        // Expired cooldowns and unknown classes from a newer version stay harmless.
        remote
            .cool
            .insert("m".into(), (now - 1, "rate_limited".into()));
        remote
            .cool
            .insert("x".into(), (now + 1_000, "something_new".into()));
        here.merge(&remote, now);
        assert_eq!(here.cooling_until("m", now), None);
        assert_eq!(here.cooldowns(now)[0].class, "fleet");
    }
}

//! The key pool: which Gemini API keys exist, which may be used now, and what each failure
//! does to a key.
//!
//! Key *state* (failure counts, cooldowns, the disabled flag) is kept in [`KeyState`], owned by
//! the [`KeyRegistry`] by stable key id, so a config reload that rebuilds the pool never forgets
//! a cooldown. The request path touches only atomics and lock-free snapshots; the mutex in
//! [`KeyState`] is taken only when a key fails.

pub mod owners;
pub mod taxonomy;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::clock;
use crate::config::KeySpec;
use taxonomy::{ErrorClass, KeyVerdict, Scope};

/// A (key, model) cooldown after a quota answer.
#[derive(Debug, Clone)]
pub struct Cooldown {
    /// The model whose quota ran out (`""` for calls without a model, `*` for every model).
    pub model: Box<str>,
    pub until_ms: u64,
    pub class: &'static str,
    /// Whose quota it was (`Scope::as_str`): this key's, or its project's.
    pub scope: &'static str,
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
}

/// Least time between two probes confirming a key's 403s: a client that keeps provoking them
/// cannot make gemgate spend the key's quota on probes.
const PROBE_GAP_MS: u64 = 60_000;

impl KeyState {
    /// Asks the store to save this key's state.
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Relaxed);
        self.unshared.store(true, Relaxed);
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
                    model,
                    *until_ms,
                    taxonomy::class_name(class),
                    "key_model",
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
        if self.cooling_until_max.load(Relaxed) <= now_ms {
            return None;
        }
        self.cooldowns
            .load()
            .iter()
            .filter(|c| covers(&c.model, model) && c.until_ms > now_ms)
            .map(|c| c.until_ms)
            .max()
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
        self.cool_scoped(model, until_ms, class, Scope::KeyModel, now_ms);
    }

    /// [`KeyState::cool`] for a quota of `scope`.
    fn cool_scoped(
        &self,
        model: &str,
        until_ms: u64,
        class: &'static str,
        scope: Scope,
        now_ms: u64,
    ) {
        self.mark_dirty();
        self.put_cooldown(model, until_ms, class, scope.as_str(), now_ms);
    }

    /// [`KeyState::cool`] without marking the state changed.
    fn put_cooldown(
        &self,
        model: &str,
        until_ms: u64,
        class: &'static str,
        scope: &'static str,
        now_ms: u64,
    ) {
        self.cooling_until_max.fetch_max(until_ms, Relaxed);
        self.cooldowns.rcu(|old| {
            let mut next: Vec<Cooldown> = old
                .iter()
                .filter(|c| c.until_ms > now_ms)
                .cloned()
                .collect();
            match next.iter_mut().find(|c| &*c.model == model) {
                Some(c) if c.until_ms >= until_ms => {}
                Some(c) => {
                    *c = Cooldown {
                        model: model.into(),
                        until_ms,
                        class,
                        scope,
                    }
                }
                None => next.push(Cooldown {
                    model: model.into(),
                    until_ms,
                    class,
                    scope,
                }),
            }
            next
        });
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
}

impl KeyRegistry {
    /// The state of key `id`, created on first sight.
    pub fn state(&self, id: &str) -> Arc<KeyState> {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.entry(id.to_owned()).or_default().clone()
    }

    /// The keys whose state changed since the last call, marked clean.
    pub fn take_dirty(&self) -> Vec<(String, Arc<KeyState>)> {
        self.take(|s| &s.dirty)
    }

    /// The keys whose state changed since a fleet last shared it, marked shared.
    pub fn take_unshared(&self) -> Vec<(String, Arc<KeyState>)> {
        self.take(|s| &s.unshared)
    }

    /// Every key ever seen.
    pub fn all(&self) -> Vec<(String, Arc<KeyState>)> {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states
            .iter()
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect()
    }

    fn take(&self, flag: impl Fn(&KeyState) -> &AtomicBool) -> Vec<(String, Arc<KeyState>)> {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states
            .iter()
            .filter(|(_, s)| flag(s).swap(false, Relaxed))
            .map(|(id, s)| (id.clone(), s.clone()))
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
    /// Every key is disabled, cooling for this model, or already tried for this request.
    /// `retry_at_ms` is the earliest cooldown end, if any key is cooling.
    Exhausted {
        retry_at_ms: Option<u64>,
        cooling: usize,
        disabled: usize,
    },
}

/// The keys of one configuration generation.
#[derive(Debug)]
pub struct KeyPool {
    keys: Vec<Key>,
    by_id: HashMap<String, usize, foldhash::fast::RandomState>,
    /// The keys of each project named in the config (a key without one is its own project).
    projects: HashMap<String, Vec<usize>, foldhash::fast::RandomState>,
    max_failures: u32,
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

impl KeyPool {
    pub fn new(specs: &[KeySpec], registry: &KeyRegistry, max_failures: u32) -> KeyPool {
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
        let mut projects: HashMap<String, Vec<usize>, foldhash::fast::RandomState> =
            HashMap::default();
        for (i, spec) in specs.iter().enumerate() {
            if let Some(p) = &spec.project {
                projects.entry(p.clone()).or_default().push(i);
            }
        }
        KeyPool {
            keys,
            by_id,
            projects,
            max_failures: max_failures.max(1),
        }
    }

    pub fn keys(&self) -> &[Key] {
        &self.keys
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

    /// Whether key `index` may serve `model` at `now_ms`.
    pub fn usable(&self, index: usize, model: &str, now_ms: u64) -> bool {
        let state = &self.keys[index].state;
        !state.is_disabled() && state.cooling_until(model, now_ms).is_none()
    }

    /// The built-in choice: the first usable key for `model` not in `tried`, in config order.
    /// (Round-robin and the other strategies are plugins.)
    pub fn pick(&self, model: &str, tried: &[usize], now_ms: u64) -> Pick {
        if self.keys.is_empty() {
            return Pick::Empty;
        }
        match (0..self.keys.len()).find(|&i| !tried.contains(&i) && self.usable(i, model, now_ms)) {
            Some(index) => Pick::Key(index),
            None => self.exhausted(model, now_ms),
        }
    }

    /// Every key that may serve `model` now and is not in `tried`, in config order.
    pub fn candidates(&self, model: &str, tried: &[usize], now_ms: u64) -> Vec<u32> {
        (0..self.keys.len())
            .filter(|&i| !tried.contains(&i) && self.usable(i, model, now_ms))
            .map(|i| i as u32)
            .collect()
    }

    /// Why no key can serve `model`.
    pub fn exhausted(&self, model: &str, now_ms: u64) -> Pick {
        let (retry_at_ms, cooling, disabled) = self.unavailable(model, now_ms);
        Pick::Exhausted {
            retry_at_ms,
            cooling,
            disabled,
        }
    }

    /// Why keys cannot serve `model` now: the earliest cooldown end, how many keys are
    /// cooling, and how many are disabled.
    pub fn unavailable(&self, model: &str, now_ms: u64) -> (Option<u64>, usize, usize) {
        let (mut retry_at_ms, mut cooling, mut disabled) = (None::<u64>, 0, 0);
        for key in &self.keys {
            if key.state.is_disabled() {
                disabled += 1;
            } else if let Some(until) = key.state.cooling_until(model, now_ms) {
                cooling += 1;
                retry_at_ms = Some(retry_at_ms.map_or(until, |r| r.min(until)));
            }
        }
        (retry_at_ms, cooling, disabled)
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
        self.record_failure_of(index, model, class, message, now_ms, Scope::KeyModel)
    }

    /// [`KeyPool::record_failure`] for a quota answer of `scope`: a project's quota cools
    /// every key of the key's project (for `model`, or for every model).
    pub fn record_failure_of(
        &self,
        index: usize,
        model: &str,
        class: ErrorClass,
        message: &str,
        now_ms: u64,
        scope: Scope,
    ) -> Penalty {
        let key = &self.keys[index];
        let state = &key.state;
        state.failures.fetch_add(1, Relaxed);
        let verdict = class.verdict();
        if verdict != KeyVerdict::NoPenalty {
            state
                .detail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .last_error = Some(format!("{}: {}", class.as_str(), truncate(message, 300)));
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
                self.cool_for_quota(index, model, until, class, scope, now_ms);
                Penalty::Cooled
            }
            KeyVerdict::CoolUntilDailyReset => {
                let until = clock::next_pacific_midnight_ms(now_ms);
                self.cool_for_quota(index, model, until, class, scope, now_ms);
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
        scope: Scope,
        now_ms: u64,
    ) {
        let key = &self.keys[index];
        let members = match (scope, &key.spec.project) {
            (Scope::KeyModel, _) | (_, None) => std::slice::from_ref(&index),
            (_, Some(p)) => self
                .projects
                .get(p)
                .map_or(std::slice::from_ref(&index), Vec::as_slice),
        };
        let model = if scope == Scope::Project { "*" } else { model };
        let scope = if key.spec.project.is_none() {
            Scope::KeyModel
        } else {
            scope
        };
        for &i in members {
            self.keys[i]
                .state
                .cool_scoped(model, until, class.as_str(), scope, now_ms);
        }
    }
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

    fn pool(n: usize, max_failures: u32) -> KeyPool {
        let specs: Vec<KeySpec> = (0..n)
            .map(|i| {
                let secret = format!("key-{i}");
                KeySpec {
                    id: stable_id("k", &secret),
                    secret: Secret::new(secret.clone()),
                    label: secret,
                    tags: vec![],
                    weight: 1,
                    source: Default::default(),
                    project: None,
                    tier: None,
                }
            })
            .collect();
        KeyPool::new(&specs, &KeyRegistry::default(), max_failures)
    }

    #[test]
    fn the_built_in_choice_skips_tried_and_unusable_keys() {
        let p = pool(3, 1);
        assert_eq!(p.pick("m", &[], 0), Pick::Key(0));
        assert_eq!(p.pick("m", &[0], 0), Pick::Key(1));
        p.record_failure(1, "m", ErrorClass::KeyInvalid, "bad", 0);
        assert_eq!(p.pick("m", &[0], 0), Pick::Key(2));
        assert_eq!(p.candidates("m", &[], 0), vec![0, 2]);
        assert_eq!(p.pick("m", &[0, 1], 0), Pick::Key(2));
        assert!(matches!(p.pick("m", &[0, 1, 2], 0), Pick::Exhausted { .. }));
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
            p.pick("flash", &[], 2_000),
            Pick::Exhausted {
                retry_at_ms: Some(11_000),
                cooling: 1,
                disabled: 0
            }
        );
        assert_eq!(p.pick("pro", &[], 2_000), Pick::Key(0));
        assert_eq!(p.pick("flash", &[], 11_000), Pick::Key(0));
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
        };
        let first = KeyPool::new(std::slice::from_ref(&spec), &registry, 1);
        first.record_failure(0, "m", ErrorClass::KeyInvalid, "", 0);
        let second = KeyPool::new(&[spec], &registry, 1);
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

//! Storms: Google throttling gemgate's own address, not a project's quota.
//!
//! A bare 429 (no `QuotaFailure`, no `RetryInfo`) says nothing about a key. When such answers
//! come from [`STORM_PROJECTS`] projects or more within [`STORM_WINDOW_MS`], the caller is
//! being throttled as a whole: gemgate backs off globally instead of cooling every key of the
//! pool for a minute. During a storm clients get 429 with `Retry-After`, at most one request a
//! second goes upstream as a probe, bare 429s cool no key (the cooldowns of the answers that
//! revealed the storm are lifted), and the first answer that is not a bare 429 ends it.
//!
//! The throttle is of one address, so each instance of a fleet keeps its own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::KeyState;

/// How many projects answering bare 429s make a storm…
pub const STORM_PROJECTS: usize = 3;
/// …within this time.
pub const STORM_WINDOW_MS: u64 = 2_000;
/// Least time between two probes during a storm.
pub const PROBE_EVERY_MS: u64 = 1_000;
/// Keys a storm remembers as struck (so that probes try others first).
const MAX_STRUCK: usize = 4_096;

/// A bare 429 seen recently: when, from which project, and the cooldown it caused.
struct Seen {
    at_ms: u64,
    project: Box<str>,
    key_id: Box<str>,
    key: Arc<KeyState>,
    model: Box<str>,
}

/// What a bare 429 is, in the light of the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bare {
    /// Not (yet) a storm: a 429 of the key, cooled as usual.
    Alone,
    /// It made a storm begin (the cooldowns of the bare 429s before it have been lifted).
    Began,
    /// A storm is on.
    During,
}

/// The storm detector and, during a storm, the probe gate. Lives as long as the process.
#[derive(Default)]
pub struct Storms {
    active: AtomicBool,
    /// When a storm began (ms), while it lasts.
    since_ms: AtomicU64,
    /// When the next probe may go.
    next_probe_ms: AtomicU64,
    /// Storms so far.
    count: AtomicU64,
    recent: Mutex<VecDeque<Seen>>,
    /// Ids of the keys that answered a bare 429 during the storm: probes try the others
    /// first, so that keys broken on their own cannot keep a storm going.
    struck: Mutex<Vec<Box<str>>>,
}

/// How a request may go upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// No storm.
    Normal,
    /// During a storm: this request is the second's probe.
    Probe,
}

impl std::fmt::Debug for Storms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storms")
            .field("active", &self.active())
            .field("count", &self.count())
            .finish()
    }
}

impl Storms {
    pub fn active(&self) -> bool {
        self.active.load(Relaxed)
    }

    /// When the storm going on began.
    pub fn since_ms(&self) -> Option<u64> {
        self.active().then(|| self.since_ms.load(Relaxed))
    }

    /// When the next probe may go (during a storm).
    pub fn next_probe_ms(&self) -> u64 {
        self.next_probe_ms.load(Relaxed)
    }

    /// How many storms began since the start.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Whether a request may go upstream at `now_ms`: always outside a storm; during one, one
    /// request a second (the probe). `Err`: milliseconds until the next probe may go.
    pub fn admit(&self, now_ms: u64) -> Result<Pass, u64> {
        if !self.active() {
            return Ok(Pass::Normal);
        }
        let next = self.next_probe_ms.load(Relaxed);
        if now_ms >= next
            && self
                .next_probe_ms
                .compare_exchange(next, now_ms + PROBE_EVERY_MS, Relaxed, Relaxed)
                .is_ok()
        {
            return Ok(Pass::Probe);
        }
        Err(self
            .next_probe_ms
            .load(Relaxed)
            .saturating_sub(now_ms)
            .max(1))
    }

    /// Notes a bare 429 of `key` (of `project`) for `model` at `now_ms`, and says what it is.
    pub fn bare_429(
        &self,
        project: &str,
        key: (&str, &Arc<KeyState>),
        model: &str,
        now_ms: u64,
    ) -> Bare {
        let (key_id, key) = key;
        if self.active() {
            let mut struck = self.struck.lock().unwrap_or_else(|e| e.into_inner());
            if struck.len() < MAX_STRUCK && !struck.iter().any(|k| &**k == key_id) {
                struck.push(key_id.into());
            }
            return Bare::During;
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        while recent
            .front()
            .is_some_and(|s| s.at_ms + STORM_WINDOW_MS < now_ms)
        {
            recent.pop_front();
        }
        recent.push_back(Seen {
            at_ms: now_ms,
            project: project.into(),
            key_id: key_id.into(),
            key: key.clone(),
            model: model.into(),
        });
        let mut projects: Vec<&str> = recent.iter().map(|s| &*s.project).collect();
        projects.sort_unstable();
        projects.dedup();
        let projects = projects.len();
        if projects < STORM_PROJECTS {
            // Bounded: a storm begins before many projects have answered.
            if recent.len() > 4 * STORM_PROJECTS {
                recent.pop_front();
            }
            return Bare::Alone;
        }
        let mut struck = self.struck.lock().unwrap_or_else(|e| e.into_inner());
        struck.clear();
        for seen in recent.drain(..) {
            seen.key.lift_bare_cooldown(&seen.model, now_ms);
            if !struck.contains(&seen.key_id) {
                struck.push(seen.key_id);
            }
        }
        drop(struck);
        self.since_ms.store(now_ms, Relaxed);
        self.next_probe_ms.store(now_ms + PROBE_EVERY_MS, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.active.store(true, Relaxed);
        tracing::warn!(
            projects,
            "storm: Google answers bare 429s to several projects at once; backing off globally, no key is blamed"
        );
        Bare::Began
    }

    /// The keys that answered bare 429s during this storm (for a probe to pass over).
    pub fn struck(&self) -> Vec<Box<str>> {
        self.struck
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets the struck keys: every key has been probed, each may be tried again.
    pub fn forget_struck(&self) {
        self.struck
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// An answer that is not a bare 429 came back: a storm going on is over.
    pub fn calm(&self, now_ms: u64) {
        // Read first: every answer calls this, and a swap would write the flag's line on
        // every one, moving it between the cores serving them.
        if self.active.load(Relaxed) && self.active.swap(false, Relaxed) {
            self.forget_struck();
            let took = now_ms.saturating_sub(self.since_ms.load(Relaxed));
            tracing::warn!(took_ms = took, "storm over: serving normally");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_projects_within_two_seconds_make_a_storm_that_lifts_their_cooldowns() {
        let storms = Storms::default();
        let keys: Vec<Arc<KeyState>> = (0..4).map(|_| Arc::default()).collect();
        let t = 1_000_000;
        for k in &keys {
            k.cool("m", t + 60_000, "rate_limited", t);
        }
        assert_eq!(storms.bare_429("p1", ("k0", &keys[0]), "m", t), Bare::Alone);
        assert_eq!(
            storms.bare_429("p1", ("k1", &keys[1]), "m", t + 100),
            Bare::Alone,
            "one project"
        );
        // Too late for the first to count.
        assert_eq!(
            storms.bare_429("p2", ("k2", &keys[2]), "m", t + 2_500),
            Bare::Alone
        );
        assert_eq!(storms.admit(t + 2_500), Ok(Pass::Normal));
        assert_eq!(
            storms.bare_429("p1", ("k1", &keys[1]), "m", t + 2_600),
            Bare::Alone
        );
        assert_eq!(
            storms.bare_429("p3", ("k3", &keys[3]), "m", t + 3_000),
            Bare::Began
        );
        assert!(storms.active() && storms.count() == 1);
        assert_eq!(keys[1].cooling_until("m", t + 3_000), None, "lifted");
        assert_eq!(keys[2].cooling_until("m", t + 3_000), None, "lifted");
        assert_eq!(keys[3].cooling_until("m", t + 3_000), None, "lifted");
        assert!(
            keys[0].cooling_until("m", t + 3_000).is_some(),
            "not in the storm"
        );
        // One probe a second.
        assert_eq!(storms.admit(t + 3_500), Err(500));
        assert_eq!(storms.admit(t + 4_000), Ok(Pass::Probe));
        assert!(storms.admit(t + 4_001).is_err());
        assert_eq!(
            storms.bare_429("p9", ("k0", &keys[0]), "m", t + 4_100),
            Bare::During
        );
        let struck: Vec<String> = storms.struck().iter().map(|k| k.to_string()).collect();
        assert_eq!(struck, ["k2", "k1", "k3", "k0"], "probes try others first");
        storms.calm(t + 5_000);
        assert!(!storms.active() && storms.struck().is_empty());
        assert_eq!(storms.admit(t + 5_000), Ok(Pass::Normal));
    }
}

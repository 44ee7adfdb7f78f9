//! Which keys may serve a model, kept between requests so that choosing a key costs the same
//! in a pool of ten keys as in one of a hundred thousand.
//!
//! A [`Ready`] list is made by one pass over the pool and shared by the requests that follow:
//! it holds the keys neither disabled nor cooling for the model when it was made. Keys that
//! drop out later are passed over when met (every choice checks the key it takes); the list is
//! made again when a key may have come back (an enable, a fleet's merge, the end of the
//! earliest cooldown it left out), and at most every [`STALE_MS`] while keys keep dropping out.
//!
//! Lists exist for the models that have had a cooldown, and one for every other model: a
//! client naming models at random makes no new list.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;

/// Bumped when a key may have become usable again (enabled, reset, merged, restored).
static RETURNED: AtomicU64 = AtomicU64::new(0);
/// Bumped when a key stopped being usable (cooled, disabled).
static REMOVED: AtomicU64 = AtomicU64::new(0);
/// The models some key has cooled for (a list of their own is kept for each).
/// Read by every request, changed when a model first cools: read without a lock.
static COOLED: LazyLock<ArcSwap<HashSet<Box<str>>>> = LazyLock::new(ArcSwap::default);
/// More models than this with cooldowns (only a plugin's `gemgate.cool` can make that many)
/// share the list of every other model, and the per-key check keeps the choice right.
const MAX_COOLED_MODELS: usize = 256;
/// How long a list may serve while keys drop out of it.
const STALE_MS: u64 = 250;

/// The model name of the list for models no key has cooled for: it matches only cooldowns of
/// every model (`*`), and no client can send it.
pub const ANY_MODEL: &str = "\0any";

pub fn key_returned() {
    RETURNED.fetch_add(1, Relaxed);
}

pub fn key_removed() {
    REMOVED.fetch_add(1, Relaxed);
}

/// Notes that keys cool for `model`: it gets a list of its own.
pub fn model_cooled(model: &str) {
    key_removed();
    if model == "*" {
        return;
    }
    let known = |c: &HashSet<Box<str>>| c.contains(model) || c.len() >= MAX_COOLED_MODELS;
    if known(&COOLED.load()) {
        return;
    }
    COOLED.rcu(|cooled| {
        let mut next = HashSet::clone(cooled);
        if !known(&next) {
            next.insert(model.into());
        }
        next
    });
}

/// The list `model` is served from: its own, or [`ANY_MODEL`]'s.
pub fn list_for(model: &str) -> &str {
    let cooled = COOLED.load();
    if !cooled.is_empty() && cooled.contains(model) {
        model
    } else {
        ANY_MODEL
    }
}

/// The keys usable for one model when the list was made, with what was found about the rest.
#[derive(Debug)]
pub struct Ready {
    /// Pool indices, in config order.
    pub keys: Arc<[u32]>,
    /// The earliest end of a cooldown that kept a key out.
    pub retry_at_ms: Option<u64>,
    pub cooling: usize,
    pub disabled: usize,
    made_ms: u64,
    returned: u64,
    removed: u64,
    /// Until then, every key of the list was found at its project's limit (no need to look
    /// again before).
    full_until_ms: AtomicU64,
}

impl Ready {
    /// A list of `keys`, made at `now_ms`.
    pub fn new(
        keys: Vec<u32>,
        retry_at_ms: Option<u64>,
        cooling: usize,
        disabled: usize,
        now_ms: u64,
    ) -> Ready {
        Ready {
            keys: keys.into(),
            retry_at_ms,
            cooling,
            disabled,
            made_ms: now_ms,
            returned: RETURNED.load(Relaxed),
            removed: REMOVED.load(Relaxed),
            full_until_ms: AtomicU64::new(0),
        }
    }

    /// Whether the list still serves at `now_ms`, or must be made again.
    pub fn fresh(&self, now_ms: u64) -> bool {
        self.returned == RETURNED.load(Relaxed)
            && self.retry_at_ms.is_none_or(|at| now_ms < at)
            && (self.removed == REMOVED.load(Relaxed)
                || now_ms < self.made_ms.saturating_add(STALE_MS))
    }

    /// Whether no key dropped out or came back since the list was made.
    pub fn exact(&self) -> bool {
        self.returned == RETURNED.load(Relaxed) && self.removed == REMOVED.load(Relaxed)
    }

    /// Until when every key of the list is at its project's limit (0: not known to be).
    pub fn full_until(&self, now_ms: u64) -> Option<u64> {
        Some(self.full_until_ms.load(Relaxed)).filter(|&at| at > now_ms)
    }

    pub fn set_full_until(&self, at_ms: u64) {
        self.full_until_ms.store(at_ms, Relaxed);
    }
}

/// The candidates of one attempt: a [`Ready`] list less the keys the request already tried.
/// Entries may have dropped out since the list was made; [`KeyPool::usable`] tells.
///
/// [`KeyPool::usable`]: super::KeyPool::usable
#[derive(Debug, Clone, Default)]
pub struct Candidates {
    keys: Arc<[u32]>,
    /// Positions in `keys` of the tried keys, sorted.
    tried: Vec<usize>,
}

impl Candidates {
    pub fn new(keys: Arc<[u32]>, tried: &[usize]) -> Candidates {
        let mut at: Vec<usize> = tried
            .iter()
            .filter_map(|&i| keys.binary_search(&(i as u32)).ok())
            .collect();
        at.sort_unstable();
        at.dedup();
        Candidates { keys, tried: at }
    }

    pub fn len(&self) -> usize {
        self.keys.len() - self.tried.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pool index of the `n`th candidate (from 0).
    pub fn get(&self, n: usize) -> Option<u32> {
        let mut at = n;
        for &t in &self.tried {
            if t <= at {
                at += 1;
            } else {
                break;
            }
        }
        self.keys.get(at).copied()
    }

    /// The position (as for [`Candidates::get`]) of the first candidate whose pool index is at
    /// least `index`, wrapping around to the first.
    pub fn at_or_after(&self, index: u32) -> usize {
        let mut at = self.keys.partition_point(|&i| i < index);
        while self.tried.binary_search(&at).is_ok() {
            at += 1;
        }
        if at >= self.keys.len() {
            return 0;
        }
        at - self.tried.iter().filter(|&&t| t < at).count()
    }

    /// Whether pool index `index` is a candidate.
    pub fn contains(&self, index: usize) -> bool {
        self.keys
            .binary_search(&(index as u32))
            .is_ok_and(|at| self.tried.binary_search(&at).is_err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_leave_out_the_tried_keys() {
        let c = Candidates::new(vec![1, 3, 4, 7, 9].into(), &[4, 2, 9]);
        assert_eq!(c.len(), 3);
        let all: Vec<u32> = (0..c.len()).filter_map(|n| c.get(n)).collect();
        assert_eq!(all, vec![1, 3, 7]);
        assert_eq!(c.get(3), None);
        assert_eq!(c.at_or_after(0), 0);
        assert_eq!(c.at_or_after(4), 2, "4 was tried: 7 is next");
        assert_eq!(c.at_or_after(8), 0, "past the last: wraps around");
        assert!(c.contains(7) && !c.contains(4) && !c.contains(2));
    }
}

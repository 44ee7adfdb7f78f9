//! Proactive quota: each project's requests and input tokens per model in sliding windows, so
//! that gemgate sends no project over a limit it knows (`[quota]`, see `config::quota`).
//!
//! A window counts in one-second buckets and forgets a bucket 61 seconds after it began, so it
//! never forgets a request less than a minute old: whatever window Google keeps, a project
//! admitted here is under its limit there. Tokens are estimated from the request's size when it
//! is admitted and corrected to `usageMetadata.promptTokenCount` when the answer says it.
//!
//! The windows of a project live as long as the process (a reload keeps them, like key state)
//! and exist only for the models a project was asked for. They count seconds on a clock that
//! a step of the wall clock does not move (see [`Moment`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::clock;
use crate::config::quota::Limit;

/// Seconds a bucket is remembered: one more than a minute, so that a request is never
/// forgotten before a full minute has passed.
pub const SPAN_S: u64 = 61;
const BUCKETS: usize = SPAN_S as usize;

/// A moment as the windows read it. A window's minute is counted on the steady clock: the wall
/// clock as it read at the first quota decision, advanced by the monotonic clock. A step of
/// the wall clock (NTP correcting a large error, a virtual machine restored from a snapshot)
/// does not move it; counted on the wall clock, a step forward would empty every window at once
/// and gemgate would send a minute's worth of requests Google still counts, a step back would
/// freeze them. The Pacific day, and every time the windows hand back, are the wall clock's.
#[derive(Debug, Clone, Copy)]
pub struct Moment {
    wall_ms: u64,
    steady_ms: u64,
}

impl Moment {
    /// The wall-clock time `wall_ms`, a moment ago at most (the time a decision was taken).
    ///
    /// A decision reads the wall clock once and asks for its moment for every key it weighs
    /// (the choice by headroom, a plugin's `next`): the steps are read once per reading, the
    /// thread remembering the last.
    pub fn of(wall_ms: u64) -> Moment {
        thread_local! {
            static LAST: std::cell::Cell<Option<(u64, i64)>> = const { std::cell::Cell::new(None) };
        }
        let steps = LAST.with(|last| match last.get() {
            Some((at, steps)) if at == wall_ms => steps,
            _ => {
                let steps = clock::wall_steps_ms();
                last.set(Some((wall_ms, steps)));
                steps
            }
        });
        Moment::stepped(wall_ms, steps)
    }

    /// `wall_ms` on a wall clock stepped by `steps_ms` since the process began.
    fn stepped(wall_ms: u64, steps_ms: i64) -> Moment {
        Moment {
            wall_ms,
            steady_ms: wall_ms.saturating_add_signed(steps_ms.saturating_neg()),
        }
    }

    /// The wall-clock time of steady time `steady_ms`.
    fn wall(self, steady_ms: u64) -> u64 {
        steady_ms
            .saturating_add(self.wall_ms)
            .saturating_sub(self.steady_ms)
    }

    fn second(self) -> u64 {
        self.steady_ms / 1000
    }
}

/// One second's admissions.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    second: u64,
    requests: u32,
    tokens: u64,
}

/// A project's counts for one model.
#[derive(Debug, Default)]
struct Counts {
    buckets: Vec<Bucket>,
    /// Sums over the live buckets.
    requests: u32,
    tokens: u64,
    /// The Pacific day counted in `day_requests`: the end of that day, in ms.
    day_ends_ms: u64,
    day_requests: u32,
}

impl Counts {
    /// Forgets the buckets of seconds that fell out of the window at `now`, and yesterday.
    fn advance(&mut self, now: Moment) {
        if self.buckets.is_empty() {
            self.buckets = vec![Bucket::default(); BUCKETS];
        }
        let now_s = now.second();
        for b in &mut self.buckets {
            if (b.requests != 0 || b.tokens != 0) && b.second + SPAN_S <= now_s {
                self.requests -= b.requests;
                self.tokens -= b.tokens;
                *b = Bucket::default();
            }
        }
        if now.wall_ms >= self.day_ends_ms {
            self.day_ends_ms = clock::next_pacific_midnight_ms(now.wall_ms);
            self.day_requests = 0;
        }
    }

    /// The earliest time at which `requests` more requests and `tokens` more tokens fit the
    /// window under `limit` (`None`: they fit now).
    fn fits_at(&self, limit: &Limit, requests: u32, tokens: u64, now: Moment) -> Option<u64> {
        if limit
            .rpd
            .is_some_and(|max| self.day_requests + requests > max)
        {
            return Some(self.day_ends_ms);
        }
        let over_requests = limit
            .rpm
            .map_or(0, |max| (self.requests + requests).saturating_sub(max));
        // A request larger than the whole limit waits for an empty window, then goes alone.
        let over_tokens = limit.tpm.map_or(0, |max| {
            (self.tokens + tokens).saturating_sub(max.max(tokens))
        });
        if over_requests == 0 && over_tokens == 0 {
            return None;
        }
        let mut by_age: Vec<&Bucket> = self.buckets.iter().filter(|b| b.requests > 0).collect();
        by_age.sort_unstable_by_key(|b| b.second);
        let (mut freed_requests, mut freed_tokens) = (0u32, 0u64);
        for b in by_age {
            freed_requests += b.requests;
            freed_tokens += b.tokens;
            if freed_requests >= over_requests && freed_tokens >= over_tokens {
                return Some(now.wall((b.second + SPAN_S) * 1000));
            }
        }
        Some(now.wall_ms + SPAN_S * 1000)
    }

    /// The bucket of second `now_s`, made anew if it held another second (which
    /// [`Counts::advance`] has emptied, unless the clock went back: its counts then leave the
    /// sums with it, which must always be the buckets' sums).
    fn bucket(&mut self, now_s: u64) -> &mut Bucket {
        let b = &mut self.buckets[(now_s % SPAN_S) as usize];
        if b.second != now_s {
            self.requests -= b.requests;
            self.tokens -= b.tokens;
            *b = Bucket {
                second: now_s,
                ..Bucket::default()
            };
        }
        b
    }
}

/// The windows of one project, by model.
#[derive(Debug, Default)]
pub struct ProjectWindows {
    by_model: Mutex<HashMap<Box<str>, Counts, foldhash::fast::RandomState>>,
}

/// A request admitted under a limit: what to correct when its answer tells its tokens.
#[derive(Debug)]
pub struct Ticket {
    windows: Arc<ProjectWindows>,
    model: Box<str>,
    /// The second it was counted in, on the steady clock (the windows') and on the wall clock.
    second: u64,
    wall_second: u64,
    estimate: u64,
}

impl Ticket {
    /// The wall-clock second it was counted in (the fleet's windows count in those).
    pub fn wall_second(&self) -> u64 {
        self.wall_second
    }

    /// The input tokens it was counted with.
    pub fn estimate(&self) -> u64 {
        self.estimate
    }

    /// The attempt is over at `now`: the request moves to the second it ended in (Google
    /// saw it before that, so the window keeps it at least a minute after Google counted it,
    /// however long it took to get there), with the input tokens the answer reported (`None`:
    /// the estimate stays).
    pub fn settle(&self, prompt_tokens: Option<u64>, now: Moment) {
        let tokens = prompt_tokens.unwrap_or(self.estimate);
        if now.second() == self.second && tokens == self.estimate {
            return; // nothing moves
        }
        let mut by_model = self.windows.lock();
        let Some(counts) = by_model.get_mut(&self.model) else {
            return;
        };
        counts.advance(now);
        let old = &mut counts.buckets[(self.second % SPAN_S) as usize];
        if old.second == self.second && old.requests > 0 {
            let tokens = self.estimate.min(old.tokens);
            old.requests -= 1;
            old.tokens -= tokens;
            counts.requests -= 1;
            counts.tokens -= tokens;
        }
        let new = counts.bucket(now.second());
        new.requests += 1;
        new.tokens += tokens;
        counts.requests += 1;
        counts.tokens += tokens;
    }
}

impl ProjectWindows {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Counts, foldhash::fast::RandomState>> {
        self.by_model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one request of `tokens` estimated input tokens for `model` if it fits `limit`
    /// at `now`; else the time at which it would. The check and the count are one step
    /// under the lock: two requests at once cannot both take the last place.
    pub fn admit(
        self: &Arc<Self>,
        model: &str,
        limit: &Limit,
        tokens: u64,
        now: Moment,
    ) -> Result<Ticket, u64> {
        self.count_if(model, tokens, now, |counts| {
            counts.fits_at(limit, 1, tokens, now)
        })
    }

    /// Counts one request of `tokens` estimated input tokens for `model` at `now`, without a
    /// limit (the fleet admitted it).
    pub fn count(self: &Arc<Self>, model: &str, tokens: u64, now: Moment) -> Ticket {
        match self.count_if(model, tokens, now, |_| None) {
            Ok(ticket) => ticket,
            Err(_) => unreachable!("counted without a limit"),
        }
    }

    /// Counts the request unless `full` says when it would fit instead.
    fn count_if(
        self: &Arc<Self>,
        model: &str,
        tokens: u64,
        now: Moment,
        full: impl FnOnce(&Counts) -> Option<u64>,
    ) -> Result<Ticket, u64> {
        let mut by_model = self.lock();
        let counts = match by_model.get_mut(model) {
            Some(c) => c,
            None => by_model.entry(model.into()).or_default(),
        };
        counts.advance(now);
        if let Some(at) = full(counts) {
            return Err(at.max(now.wall_ms + 1));
        }
        let now_s = now.second();
        let b = counts.bucket(now_s);
        b.requests += 1;
        b.tokens += tokens;
        counts.requests += 1;
        counts.tokens += tokens;
        counts.day_requests += 1;
        Ok(Ticket {
            windows: self.clone(),
            model: model.into(),
            second: now_s,
            wall_second: now.wall_ms / 1000,
            estimate: tokens,
        })
    }

    /// What is left of `limit` for `model` at `now`, from 0 (at the limit) to 1 (unused): the
    /// smallest share left of any of its figures.
    pub fn headroom(&self, model: &str, limit: &Limit, now: Moment) -> f64 {
        let mut by_model = self.lock();
        let Some(counts) = by_model.get_mut(model) else {
            return 1.0;
        };
        counts.advance(now);
        let share = |used: u64, max: Option<u64>| {
            max.map_or(1.0, |max| 1.0 - (used as f64 / max as f64).min(1.0))
        };
        share(counts.requests.into(), limit.rpm.map(u64::from))
            .min(share(counts.tokens, limit.tpm))
            .min(share(counts.day_requests.into(), limit.rpd.map(u64::from)))
    }

    /// When one more request of `model` of `tokens` input tokens fits `limit` (`None`: now).
    pub fn free_at(&self, model: &str, limit: &Limit, tokens: u64, now: Moment) -> Option<u64> {
        let mut by_model = self.lock();
        let counts = by_model.get_mut(model)?;
        counts.advance(now);
        counts.fits_at(limit, 1, tokens, now)
    }

    /// Requests and tokens in the window, and requests today, for `model` (the admin page).
    pub fn used(&self, model: &str, now: Moment) -> (u32, u64, u32) {
        let mut by_model = self.lock();
        let Some(counts) = by_model.get_mut(model) else {
            return (0, 0, 0);
        };
        counts.advance(now);
        (counts.requests, counts.tokens, counts.day_requests)
    }
}

/// The input tokens of a request estimated from its body's size: about four bytes a token,
/// the JSON around the text included, so rather more than fewer.
pub fn estimate_tokens(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000;

    /// `ms` on a wall clock never stepped.
    fn m(ms: u64) -> Moment {
        Moment::stepped(ms, 0)
    }

    fn limit(rpm: Option<u32>, tpm: Option<u64>, rpd: Option<u32>) -> Limit {
        Limit { rpm, tpm, rpd }
    }

    #[test]
    fn requests_wait_a_full_minute_for_their_place() {
        let w = Arc::new(ProjectWindows::default());
        let l = limit(Some(2), None, None);
        w.admit("m", &l, 0, m(T0)).unwrap();
        w.admit("m", &l, 0, m(T0 + 30_000)).unwrap();
        let at = w.admit("m", &l, 0, m(T0 + 30_500)).unwrap_err();
        assert!((T0 + 60_000..=T0 + 61_000).contains(&at), "{}", at - T0);
        assert!(w.admit("other", &l, 0, m(T0 + 30_500)).is_ok(), "per model");
        assert!(
            w.admit("m", &l, 0, m(T0 + 59_999)).is_err(),
            "not before a minute"
        );
        assert!(w.admit("m", &l, 0, m(at)).is_ok());
        assert_eq!(w.headroom("m", &l, m(at)), 0.0);
        assert_eq!(w.used("m", m(at)).0, 2);
    }

    /// Requests at the same moment on several threads never take more places than there are.
    #[test]
    fn concurrent_admissions_never_exceed_the_limit() {
        let w = Arc::new(ProjectWindows::default());
        let l = limit(Some(100), None, None);
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..50)
                            .filter(|_| w.admit("m", &l, 0, m(T0)).is_ok())
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 100);
    }

    #[test]
    fn tokens_are_estimated_then_corrected() {
        let w = Arc::new(ProjectWindows::default());
        let l = limit(None, Some(1_000), None);
        let t = w.admit("m", &l, 900, m(T0)).unwrap();
        assert!(w.admit("m", &l, 200, m(T0 + 10)).is_err());
        t.settle(Some(100), m(T0 + 15));
        assert_eq!(w.used("m", m(T0 + 20)).1, 100);
        assert!(w.admit("m", &l, 200, m(T0 + 20)).is_ok());
        assert!((w.headroom("m", &l, m(T0 + 20)) - 0.7).abs() < 1e-9);
        // A request larger than the limit goes alone once the window is empty.
        let at = w.admit("m", &l, 5_000, m(T0 + 30)).unwrap_err();
        assert!(w.admit("m", &l, 5_000, m(at)).is_ok());
    }

    /// A request Google saw late (a slow connection, a long stream) is kept a minute after its
    /// attempt ended, not after it was admitted.
    #[test]
    fn a_request_is_kept_a_minute_after_its_attempt_ended() {
        let w = Arc::new(ProjectWindows::default());
        let l = limit(Some(1), None, None);
        let t = w.admit("m", &l, 0, m(T0)).unwrap();
        t.settle(None, m(T0 + 5_000));
        assert!(
            w.admit("m", &l, 0, m(T0 + 61_500)).is_err(),
            "Google may still count it"
        );
        assert!(w.admit("m", &l, 0, m(T0 + 66_000)).is_ok());
        assert_eq!(w.used("m", m(T0 + 66_000)).2, 2, "counted once a day each");
    }

    /// The wall clock set forward two minutes empties no window, set back freezes none, and
    /// the times handed back are the wall clock's.
    #[test]
    fn a_step_of_the_wall_clock_moves_no_window() {
        let w = Arc::new(ProjectWindows::default());
        let l = limit(Some(1), None, None);
        w.admit("m", &l, 0, m(T0)).unwrap();
        // One second later, the wall clock reads two minutes more.
        let forward = Moment::stepped(T0 + 121_000, 120_000);
        let at = w.admit("m", &l, 0, forward).unwrap_err();
        assert_eq!(
            at,
            T0 + 120_000 + 61_000,
            "the place frees a minute after it was taken"
        );
        assert_eq!(w.used("m", forward).0, 1);
        assert!(w.admit("m", &l, 0, Moment::stepped(at, 120_000)).is_ok());

        let w = Arc::new(ProjectWindows::default());
        w.admit("m", &l, 0, m(T0)).unwrap();
        // Set back an hour: the window still empties a minute on.
        let back = |ms| Moment::stepped(ms - 3_600_000, -3_600_000);
        assert!(w.admit("m", &l, 0, back(T0 + 30_000)).is_err());
        assert!(w.admit("m", &l, 0, back(T0 + 61_000)).is_ok());
        assert_eq!(w.used("m", back(T0 + 61_000)).0, 1);
    }

    /// Should the windows' clock ever go back a minute or more, a second's slot taken anew
    /// takes its old counts off the sums: the window empties as its buckets do.
    #[test]
    fn a_clock_gone_back_leaves_no_count_behind() {
        let w = Arc::new(ProjectWindows::default());
        let l = limit(Some(2), None, None);
        w.admit("m", &l, 0, m(T0 + 61_000)).unwrap();
        w.admit("m", &l, 0, m(T0)).unwrap();
        assert_eq!(
            w.used("m", m(T0)).0,
            1,
            "the later second's slot was taken anew"
        );
        assert_eq!(w.used("m", m(T0 + 61_000)).0, 0);
    }

    #[test]
    fn a_daily_limit_waits_for_midnight_pacific() {
        let w = Arc::new(ProjectWindows::default());
        let l = limit(None, None, Some(1));
        w.admit("m", &l, 0, m(T0)).unwrap();
        let at = w.admit("m", &l, 0, m(T0 + 120_000)).unwrap_err();
        assert_eq!(at, clock::next_pacific_midnight_ms(T0));
        assert!(w.admit("m", &l, 0, m(at)).is_ok(), "a new day");
        assert_eq!(
            w.free_at("m", &l, 0, m(at + 1)),
            Some(clock::next_pacific_midnight_ms(at))
        );
    }
}

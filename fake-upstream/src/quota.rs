//! The quota model: Google's per-project limits, shared by the keys of a project and kept per
//! (project, model): requests per minute (`rpm`), input tokens per minute (`tpm`), both over an
//! exact sliding 60-second window, and requests per day (`rpd`, the Pacific day, as Google
//! counts it). Over a limit a call answers Google's 429 (`QuotaFailure`, `Help`, `RetryInfo`
//! for per-minute limits, `ErrorInfo`). A refused call is not counted.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Body, google_error};

const MINUTE: Duration = Duration::from_secs(60);
/// Calls this close together share one entry of a window, so a window holds at most 60,000.
const GRAIN: Duration = Duration::from_millis(1);

/// Projects and their limits. As JSON: `{"projects": {"p1": {...}}, "models": [...],
/// "throttle": bool}`, every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaModel {
    /// Projects by name.
    pub projects: BTreeMap<String, QuotaProject>,
    /// The models limited; empty: every model. Each model has its own windows.
    pub models: Vec<String>,
    /// Turns the global throttle on or off as the model is set; `None` leaves it as it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle: Option<bool>,
}

/// One Cloud project: its keys and its limits (`None`: unlimited).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaProject {
    pub keys: Vec<String>,
    /// The project number `ErrorInfo` names (`projects/<number>`); by default 1000 plus the
    /// project's index in name order.
    pub number: Option<u64>,
    /// Requests per minute, per model.
    pub rpm: Option<u64>,
    /// Input (prompt) tokens per minute, per model.
    pub tpm: Option<u64>,
    /// Requests per Pacific day, per model.
    pub rpd: Option<u64>,
    /// Suffix of the quota ids (`…PerModel-FreeTier`); empty: none. By default `FreeTier`.
    pub tier: String,
}

impl Default for QuotaProject {
    fn default() -> Self {
        QuotaProject {
            keys: Vec::new(),
            number: None,
            rpm: None,
            tpm: None,
            rpd: None,
            tier: "FreeTier".to_owned(),
        }
    }
}

/// What the quota model let through and refused (`GET /_fake/quota`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaStats {
    /// Per project, since the quota model was set (or the fake reset).
    pub projects: BTreeMap<String, ProjectQuotaStats>,
    /// Calls admitted, all projects together.
    pub admitted: u64,
    /// Calls refused with a quota 429, all projects together.
    pub limited: u64,
    /// Calls answered a bare 429 by the global throttle, any key.
    pub throttled: u64,
    /// Whether the global throttle is on.
    pub throttle: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectQuotaStats {
    pub number: u64,
    /// Calls admitted (counted against the limits).
    pub admitted: u64,
    /// Calls refused with a quota 429.
    pub limited: u64,
}

/// The quota model at run time.
#[derive(Debug, Default)]
pub(crate) struct Quota {
    projects: Vec<Project>,
    by_key: HashMap<String, usize>,
    models: HashSet<String>,
    /// Per (project index, model); only models the fake serves get here, so it stays bounded.
    windows: HashMap<(usize, String), Window>,
}

#[derive(Debug)]
struct Project {
    name: String,
    number: u64,
    rpm: Option<u64>,
    tpm: Option<u64>,
    rpd: Option<u64>,
    tier: String,
    admitted: u64,
    limited: u64,
}

#[derive(Debug, Default)]
struct Window {
    requests: Slide,
    tokens: Slide,
    day: i64,
    today: u64,
}

/// Amounts over the last 60 seconds, oldest first.
#[derive(Debug, Default)]
struct Slide {
    entries: VecDeque<(Instant, u64)>,
    sum: u64,
}

impl Slide {
    fn expire(&mut self, now: Instant) {
        while let Some(&(t, n)) = self.entries.front() {
            if now.saturating_duration_since(t) < MINUTE {
                break;
            }
            self.entries.pop_front();
            self.sum -= n;
        }
    }

    fn add(&mut self, now: Instant, n: u64) {
        if n == 0 {
            return;
        }
        self.sum += n;
        if let Some(last) = self.entries.back_mut()
            && now.saturating_duration_since(last.0) < GRAIN
        {
            last.1 += n;
            return;
        }
        self.entries.push_back((now, n));
    }

    /// Whole seconds (at least 1) until `need` more fit under `limit`; 60 if never.
    fn wait(&self, now: Instant, need: u64, limit: u64) -> u64 {
        if need > limit {
            return 60;
        }
        let excess = (self.sum + need).saturating_sub(limit);
        let mut freed = 0;
        for &(t, n) in &self.entries {
            freed += n;
            if freed >= excess {
                let left = (t + MINUTE).saturating_duration_since(now);
                return left.as_secs_f64().ceil().max(1.0) as u64;
            }
        }
        60
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    PerDay,
    PerMinute,
    TokensPerMinute,
}

/// A call refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub limit: Limit,
    pub value: u64,
    /// `RetryInfo.retryDelay`, for per-minute limits.
    pub retry_s: Option<u64>,
    pub number: u64,
    pub tier: String,
    pub model: String,
}

impl Quota {
    pub(crate) fn new(model: &QuotaModel) -> Result<Quota, String> {
        let mut quota = Quota {
            models: model.models.iter().cloned().collect(),
            ..Quota::default()
        };
        for (i, (name, p)) in model.projects.iter().enumerate() {
            for key in &p.keys {
                if let Some(other) = quota.by_key.insert(key.clone(), i) {
                    return Err(format!(
                        "key {key:?} is in projects {:?} and {name:?}",
                        quota.projects.get(other).map_or(name, |p| &p.name)
                    ));
                }
            }
            quota.projects.push(Project {
                name: name.clone(),
                number: p.number.unwrap_or(1000 + i as u64),
                rpm: p.rpm,
                tpm: p.tpm,
                rpd: p.rpd,
                tier: p.tier.clone(),
                admitted: 0,
                limited: 0,
            });
        }
        Ok(quota)
    }

    /// Admits (and counts) a call of `key` to `model` with `tokens` prompt tokens, or says which
    /// limit refuses it. Keys outside every project, and models not limited, always pass.
    pub(crate) fn check(
        &mut self,
        key: &str,
        model: &str,
        tokens: u64,
        now: Instant,
        day: i64,
    ) -> Result<(), Refusal> {
        let Some(&i) = self.by_key.get(key) else {
            return Ok(());
        };
        if !self.models.is_empty() && !self.models.contains(model) {
            return Ok(());
        }
        let project = &mut self.projects[i];
        let window = self.windows.entry((i, model.to_owned())).or_default();
        window.requests.expire(now);
        window.tokens.expire(now);
        if window.day != day {
            window.day = day;
            window.today = 0;
        }
        let refused = if let Some(rpd) = project.rpd.filter(|&l| window.today >= l) {
            Some((Limit::PerDay, rpd, None))
        } else if let Some(rpm) = project.rpm.filter(|&l| window.requests.sum + 1 > l) {
            Some((
                Limit::PerMinute,
                rpm,
                Some(window.requests.wait(now, 1, rpm)),
            ))
        } else if let Some(tpm) = project.tpm.filter(|&l| window.tokens.sum + tokens > l) {
            Some((
                Limit::TokensPerMinute,
                tpm,
                Some(window.tokens.wait(now, tokens, tpm)),
            ))
        } else {
            None
        };
        if let Some((limit, value, retry_s)) = refused {
            project.limited += 1;
            return Err(Refusal {
                limit,
                value,
                retry_s,
                number: project.number,
                tier: project.tier.clone(),
                model: model.to_owned(),
            });
        }
        project.admitted += 1;
        window.today += 1;
        if project.rpm.is_some() {
            window.requests.add(now, 1);
        }
        if project.tpm.is_some() {
            window.tokens.add(now, tokens);
        }
        Ok(())
    }

    /// The name of the project `key` is in, if any.
    pub(crate) fn project_of(&self, key: &str) -> Option<&str> {
        let &i = self.by_key.get(key)?;
        Some(&self.projects[i].name)
    }

    pub(crate) fn stats(&self) -> BTreeMap<String, ProjectQuotaStats> {
        self.projects
            .iter()
            .map(|p| {
                let stats = ProjectQuotaStats {
                    number: p.number,
                    admitted: p.admitted,
                    limited: p.limited,
                };
                (p.name.clone(), stats)
            })
            .collect()
    }

    /// Forgets every call: empty windows, zero counts.
    pub(crate) fn clear_counts(&mut self) {
        self.windows.clear();
        for p in &mut self.projects {
            p.admitted = 0;
            p.limited = 0;
        }
    }
}

/// Google's answer to a call over a limit.
pub(crate) fn refusal_response(r: &Refusal) -> http::Response<Body> {
    let (metric, id) = match r.limit {
        Limit::PerDay => ("requests", "GenerateRequestsPerDayPerProjectPerModel"),
        Limit::PerMinute => ("requests", "GenerateRequestsPerMinutePerProjectPerModel"),
        Limit::TokensPerMinute => (
            "input_token_count",
            "GenerateContentInputTokensPerModelPerMinute",
        ),
    };
    let metric = format!("generativelanguage.googleapis.com/generate_content_free_tier_{metric}");
    let id = if r.tier.is_empty() {
        id.to_owned()
    } else {
        format!("{id}-{}", r.tier)
    };
    let value = r.value.to_string();
    let mut details = vec![
        json!({
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{
                "quotaMetric": metric,
                "quotaId": id,
                "quotaDimensions": { "location": "global", "model": r.model },
                "quotaValue": value,
            }]
        }),
        json!({
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [{
                "description": "Learn more about Gemini API quotas",
                "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
            }]
        }),
    ];
    if let Some(s) = r.retry_s {
        details.push(json!({
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": format!("{s}s"),
        }));
    }
    details.push(json!({
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "RATE_LIMIT_EXCEEDED",
        "domain": "googleapis.com",
        "metadata": {
            "consumer": format!("projects/{}", r.number),
            "service": "generativelanguage.googleapis.com",
            "quota_metric": metric,
            "quota_limit": id,
            "quota_limit_value": value,
            "quota_location": "global",
        }
    }));
    google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
        Value::Array(details),
    )
}

/// Today's Pacific day (America/Los_Angeles, US daylight-saving rules), as days since
/// 1970-01-01: the day Google's per-day quotas count in.
pub(crate) fn pacific_day_now() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    pacific_day(unix)
}

fn pacific_day(unix: i64) -> i64 {
    const HOUR: i64 = 3600;
    const DAY: i64 = 86_400;
    let year = year_of(unix.div_euclid(DAY));
    let sunday_from = |month, day| {
        let d = days_from_civil(year, month, day);
        // 1970-01-01 was a Thursday; 0 is Sunday.
        d + (7 - (d + 4).rem_euclid(7)) % 7
    };
    // Daylight time runs from the second Sunday of March, 02:00 PST (10:00 UTC), to the first
    // Sunday of November, 02:00 PDT (09:00 UTC).
    let start = sunday_from(3, 8) * DAY + 10 * HOUR;
    let end = sunday_from(11, 1) * DAY + 9 * HOUR;
    let offset = if (start..end).contains(&unix) { 7 } else { 8 };
    (unix - offset * HOUR).div_euclid(DAY)
}

fn year_of(days: i64) -> i64 {
    let mut y = 1970 + days.div_euclid(365);
    while days_from_civil(y, 1, 1) > days {
        y -= 1;
    }
    while days_from_civil(y + 1, 1, 1) <= days {
        y += 1;
    }
    y
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(rpm: Option<u64>, tpm: Option<u64>, rpd: Option<u64>) -> Quota {
        let project = QuotaProject {
            keys: vec!["k1".into(), "k2".into()],
            rpm,
            tpm,
            rpd,
            ..QuotaProject::default()
        };
        Quota::new(&QuotaModel {
            projects: [("p1".to_owned(), project)].into(),
            models: vec!["m".into()],
            throttle: None,
        })
        .unwrap()
    }

    #[test]
    fn sliding_minute_of_requests() {
        let mut q = model(Some(2), None, None);
        let t0 = Instant::now();
        assert!(q.check("k1", "m", 5, t0, 0).is_ok());
        assert!(
            q.check("k2", "m", 5, t0 + Duration::from_secs(20), 0)
                .is_ok()
        );
        let r = q
            .check("k1", "m", 5, t0 + Duration::from_millis(30_500), 0)
            .unwrap_err();
        assert_eq!(r.limit, Limit::PerMinute);
        // The first call leaves the window at t0 + 60 s: 29.5 s later, rounded up.
        assert_eq!(r.retry_s, Some(30));
        // Other models, and keys outside the project, are not limited.
        assert!(q.check("k1", "other", 5, t0, 0).is_ok());
        assert!(q.check("k9", "m", 5, t0, 0).is_ok());
        // The refused call was not counted: one slot frees at t0 + 60 s.
        assert!(q.check("k1", "m", 5, t0 + MINUTE, 0).is_ok());
        assert!(q.check("k1", "m", 5, t0 + MINUTE, 0).is_err());
        let stats = &q.stats()["p1"];
        assert_eq!((stats.admitted, stats.limited, stats.number), (3, 2, 1000));
        assert!(q.windows.values().all(|w| w.requests.entries.len() <= 2));
    }

    #[test]
    fn tokens_and_days() {
        let mut q = model(None, Some(10), Some(3));
        let t0 = Instant::now();
        assert!(q.check("k1", "m", 6, t0, 0).is_ok());
        let r = q
            .check("k1", "m", 6, t0 + Duration::from_secs(1), 0)
            .unwrap_err();
        assert_eq!(
            (r.limit, r.value, r.retry_s),
            (Limit::TokensPerMinute, 10, Some(59))
        );
        assert!(
            q.check("k1", "m", 4, t0 + Duration::from_secs(1), 0)
                .is_ok()
        );
        // More than the limit in one call never fits.
        let r = q.check("k1", "m", 11, t0 + MINUTE * 2, 0).unwrap_err();
        assert_eq!(r.retry_s, Some(60));
        assert!(q.check("k1", "m", 1, t0 + MINUTE * 2, 0).is_ok());
        let r = q.check("k1", "m", 1, t0 + MINUTE * 3, 0).unwrap_err();
        assert_eq!((r.limit, r.retry_s), (Limit::PerDay, None));
        assert!(q.check("k1", "m", 1, t0 + MINUTE * 3, 1).is_ok());
    }

    #[test]
    fn a_key_in_two_projects_is_refused() {
        let p = QuotaProject {
            keys: vec!["k".into()],
            ..QuotaProject::default()
        };
        let m = QuotaModel {
            projects: [("a".to_owned(), p.clone()), ("b".to_owned(), p)].into(),
            ..QuotaModel::default()
        };
        assert!(Quota::new(&m).is_err());
    }

    #[test]
    fn pacific_days() {
        let at = |y, m, d, h: i64| days_from_civil(y, m, d) * 86_400 + h * 3600;
        // Winter: UTC-8.
        assert_eq!(
            pacific_day(at(2024, 1, 15, 7)),
            days_from_civil(2024, 1, 14)
        );
        assert_eq!(
            pacific_day(at(2024, 1, 15, 8)),
            days_from_civil(2024, 1, 15)
        );
        // Summer: UTC-7.
        assert_eq!(pacific_day(at(2024, 7, 1, 6)), days_from_civil(2024, 6, 30));
        assert_eq!(pacific_day(at(2024, 7, 1, 7)), days_from_civil(2024, 7, 1));
        // 2024's switches: March 10 and November 3.
        assert_eq!(
            pacific_day(at(2024, 3, 10, 9)),
            days_from_civil(2024, 3, 10)
        );
        assert_eq!(
            pacific_day(at(2024, 3, 11, 7)),
            days_from_civil(2024, 3, 11)
        );
        assert_eq!(
            pacific_day(at(2024, 11, 3, 7)),
            days_from_civil(2024, 11, 3)
        );
        assert_eq!(
            pacific_day(at(2024, 11, 4, 7)),
            days_from_civil(2024, 11, 3)
        );
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(year_of(days_from_civil(2000, 12, 31)), 2000);
        assert_eq!(year_of(days_from_civil(2001, 1, 1)), 2001);
    }
}

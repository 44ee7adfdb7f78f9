//! Google's cached contents (`/v1beta/cachedContents`): create, list, get, update (the
//! expiration only) and delete, and their use by `generateContent`'s `cachedContent`.
//!
//! A cache belongs to the Cloud project of the key that created it: its quota-model project
//! when the key is in one, else the key alone. Any call about a cache of another project, as
//! about an unknown or expired one, answers Google's 403 with no `ErrorInfo`. The fake keeps
//! only each cache's metadata and token count (never its contents), at most [`MAX_CACHES`]
//! of them (the oldest dropped first, after the expired ones).

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Method, Response, StatusCode};
use serde_json::{Value, json};

use super::quota::days_from_civil;
use super::{Body, FakeState, MODELS, google_error, json_response, parts_text, words};

/// The most caches the fake keeps.
pub const MAX_CACHES: usize = 10_000;
const NANOS: i128 = 1_000_000_000;
/// Google's default time to live: one hour.
const DEFAULT_TTL: i128 = 3600 * NANOS;
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
/// Google's limit on `displayName`, in characters.
const MAX_DISPLAY_NAME: usize = 128;

/// Who a cache belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owner {
    /// A project of the quota model, by name.
    Project(String),
    /// A key in no project.
    Key(String),
}

#[derive(Debug)]
struct Cache {
    seq: u64,
    /// The key that created it.
    key: String,
    owner: Owner,
    /// `models/…`.
    model: String,
    display_name: Option<String>,
    /// Nanoseconds since the Unix epoch.
    create: i128,
    update: i128,
    expire: i128,
    tokens: usize,
}

impl Cache {
    fn json(&self, id: &str) -> Value {
        let mut v = json!({
            "name": format!("cachedContents/{id}"),
            "model": self.model,
            "createTime": rfc3339(self.create),
            "updateTime": rfc3339(self.update),
            "expireTime": rfc3339(self.expire),
            "usageMetadata": { "totalTokenCount": self.tokens },
        });
        if let Some(name) = &self.display_name {
            v["displayName"] = json!(name);
        }
        v
    }
}

/// The caches, by id and in creation order.
#[derive(Debug, Default)]
pub(crate) struct Caches {
    by_id: HashMap<String, Cache>,
    /// Creation number → id.
    order: BTreeMap<u64, String>,
    next: u64,
}

impl Caches {
    /// The cache `id`, unless it expired (then it is forgotten).
    fn live(&mut self, id: &str, now: i128) -> Option<&mut Cache> {
        if self.by_id.get(id)?.expire <= now {
            self.remove(id);
            return None;
        }
        self.by_id.get_mut(id)
    }

    /// The cache `id` if `owner`'s and live.
    fn owned(&mut self, id: &str, owner: &Owner, now: i128) -> Option<&mut Cache> {
        self.live(id, now).filter(|c| c.owner == *owner)
    }

    fn remove(&mut self, id: &str) -> Option<Cache> {
        let cache = self.by_id.remove(id)?;
        self.order.remove(&cache.seq);
        Some(cache)
    }

    /// Stores a new cache under a fresh id; makes room first by forgetting the expired
    /// caches, then the oldest.
    fn insert(&mut self, mut cache: Cache, now: i128) -> String {
        if self.by_id.len() >= MAX_CACHES {
            let expired: Vec<String> = self
                .by_id
                .iter()
                .filter(|(_, c)| c.expire <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                self.remove(&id);
            }
            while self.by_id.len() >= MAX_CACHES {
                let Some((_, id)) = self.order.pop_first() else {
                    break;
                };
                self.by_id.remove(&id);
            }
        }
        let id = loop {
            let id = format!("{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff);
            if !self.by_id.contains_key(&id) {
                break id;
            }
        };
        cache.seq = self.next;
        self.next += 1;
        self.order.insert(cache.seq, id.clone());
        self.by_id.insert(id.clone(), cache);
        id
    }

    /// The key that created cache `id` (`cachedContents/…` or the bare id), while it lives.
    pub(crate) fn creator(&mut self, name: &str, now: i128) -> Option<String> {
        let id = name.strip_prefix("cachedContents/").unwrap_or(name);
        self.live(id, now).map(|c| c.key.clone())
    }

    /// How many caches the fake holds (expired ones not yet forgotten included).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_id.len()
    }
}

/// Now, in nanoseconds since the Unix epoch.
pub(crate) fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Google's answer about a cache that is unknown, expired or another project's.
fn denied() -> Response<Body> {
    google_error(
        403,
        "PERMISSION_DENIED",
        "CachedContent not found (or permission denied)",
        Value::Null,
    )
}

pub(crate) fn invalid(message: &str) -> Response<Body> {
    google_error(400, "INVALID_ARGUMENT", message, Value::Null)
}

pub(crate) fn parse_body(body: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err("Invalid JSON payload received. Expected an object.".to_owned()),
        Err(e) => Err(format!("Invalid JSON payload received. {e}")),
    }
}

/// A field of a JSON object, `null` counting as absent.
pub(crate) fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.get(name).filter(|f| !f.is_null())
}

/// Every call on `/v1beta/cachedContents[/{id}]` (`id` empty for the collection).
pub(crate) fn call(
    state: &FakeState,
    key: &str,
    method: &Method,
    id: &str,
    query: &str,
    body: &[u8],
) -> Response<Body> {
    let owner = state.owner_of(key);
    let now = now_ns();
    if id.contains('/') {
        return google_error(
            404,
            "NOT_FOUND",
            &format!("/v1beta/cachedContents/{id} is not found"),
            Value::Null,
        );
    }
    match (id.is_empty(), method) {
        (true, &Method::POST) => create(state, key, owner, body, now),
        (true, &Method::GET) => list(state, &owner, query, now),
        (false, &Method::GET) => {
            let mut caches = state.caches.lock().unwrap();
            match caches.owned(id, &owner, now) {
                Some(cache) => json_response(StatusCode::OK, &cache.json(id)),
                None => denied(),
            }
        }
        (false, &Method::PATCH) => patch(state, &owner, id, query, body, now),
        (false, &Method::DELETE) => {
            let mut caches = state.caches.lock().unwrap();
            if caches.owned(id, &owner, now).is_none() {
                return denied();
            }
            caches.remove(id);
            json_response(StatusCode::OK, &json!({}))
        }
        _ => google_error(405, "UNIMPLEMENTED", "Method not allowed", Value::Null),
    }
}

/// The words of the texts of `contents` and `systemInstruction`: the cache's tokens.
fn token_count(request: &Value) -> usize {
    let contents = field(request, "contents")
        .and_then(Value::as_array)
        .map_or(0, |c| c.iter().map(|c| words(&parts_text(c))).sum());
    let system = field(request, "systemInstruction").map_or(0, |s| words(&parts_text(s)));
    contents + system
}

fn create(state: &FakeState, key: &str, owner: Owner, body: &[u8], now: i128) -> Response<Body> {
    let request = match parse_body(body) {
        Ok(v) => v,
        Err(message) => return invalid(&message),
    };
    let Some(model) = field(&request, "model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
    else {
        return invalid(
            "* CreateCachedContentRequest.cached_content.model: model is not specified\n",
        );
    };
    let bare = model.strip_prefix("models/").unwrap_or(model);
    if !MODELS.iter().any(|(n, ..)| *n == bare) {
        return google_error(
            404,
            "NOT_FOUND",
            &format!(
                "models/{bare} is not found for API version v1beta, or is not supported for createCachedContent. Call ListModels to see the list of available models and their supported methods."
            ),
            Value::Null,
        );
    }
    let display_name = match field(&request, "displayName") {
        None => None,
        Some(Value::String(s)) if s.chars().count() <= MAX_DISPLAY_NAME => Some(s.clone()),
        Some(Value::String(_)) => {
            return invalid(&format!(
                "CachedContent.display_name is longer than {MAX_DISPLAY_NAME} characters."
            ));
        }
        Some(_) => return invalid("Invalid JSON payload received. displayName is not a string."),
    };
    match field(&request, "contents") {
        None | Some(Value::Array(_)) => {}
        Some(_) => return invalid("Invalid JSON payload received. contents is not a list."),
    }
    let expire = match expiration(&request, now) {
        Ok(e) => e.unwrap_or(now + DEFAULT_TTL),
        Err(message) => return invalid(&message),
    };
    // A file belongs to the key that uploaded it, as at Google.
    let contents = field(&request, "contents")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    if let Some(refused) = super::foreign_file(state, key, contents) {
        return refused;
    }
    let cache = Cache {
        seq: 0,
        key: key.to_owned(),
        owner,
        model: format!("models/{bare}"),
        display_name,
        create: now,
        update: now,
        expire,
        tokens: token_count(&request),
    };
    let mut caches = state.caches.lock().unwrap();
    let id = caches.insert(cache, now);
    json_response(StatusCode::OK, &caches.by_id[&id].json(&id))
}

fn list(state: &FakeState, owner: &Owner, query: &str, now: i128) -> Response<Body> {
    let size = match super::query_value(query, "pageSize").map(str::parse::<i64>) {
        None | Some(Ok(0)) => DEFAULT_PAGE_SIZE,
        Some(Ok(n)) if n > 0 => (n as usize).min(MAX_PAGE_SIZE),
        Some(_) => return invalid("pageSize must not be negative."),
    };
    let start = match super::query_value(query, "pageToken").filter(|t| !t.is_empty()) {
        None => 0,
        Some(token) => match token.parse::<u64>() {
            Ok(n) => n,
            Err(_) => return invalid("Invalid page token."),
        },
    };
    let caches = state.caches.lock().unwrap();
    let mut page: Vec<(u64, Value)> = caches
        .order
        .range(start..)
        .filter_map(|(&seq, id)| {
            let cache = &caches.by_id[id];
            (cache.owner == *owner && cache.expire > now).then(|| (seq, cache.json(id)))
        })
        .take(size + 1)
        .collect();
    let mut body = json!({});
    if page.len() > size {
        let (next, _) = page.pop().expect("more than size");
        body["nextPageToken"] = json!(next.to_string());
    }
    if !page.is_empty() {
        body["cachedContents"] = page.into_iter().map(|(_, v)| v).collect();
    }
    json_response(StatusCode::OK, &body)
}

fn patch(
    state: &FakeState,
    owner: &Owner,
    id: &str,
    query: &str,
    body: &[u8],
    now: i128,
) -> Response<Body> {
    let request = match parse_body(body) {
        Ok(v) => v,
        Err(message) => return invalid(&message),
    };
    if state.caches.lock().unwrap().owned(id, owner, now).is_none() {
        return denied();
    }
    // The fields to update: the mask's, or else the expiration the body names.
    let mask = super::query_value(query, "updateMask")
        .or_else(|| super::query_value(query, "update_mask"))
        .unwrap_or_default()
        .replace("%2C", ",")
        .replace("%2c", ",");
    let mut fields: Vec<&str> = Vec::new();
    for f in mask.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        match f {
            "ttl" => fields.push("ttl"),
            "expireTime" | "expire_time" => fields.push("expireTime"),
            other => {
                return invalid(&format!(
                    "Field {other} of CachedContent cannot be updated: only its expiration (ttl or expireTime) can."
                ));
            }
        }
    }
    if mask.is_empty() {
        fields = ["ttl", "expireTime"]
            .into_iter()
            .filter(|f| field(&request, f).is_some())
            .collect();
    }
    fields.dedup();
    let [name] = fields[..] else {
        return invalid("The update mask must name the expiration once: ttl or expireTime.");
    };
    if field(&request, name).is_none() {
        return invalid(&format!(
            "The update mask names {name}, which the CachedContent does not set."
        ));
    }
    let only = json!({ name: request[name] });
    let expire = match expiration(&only, now) {
        Ok(e) => e.expect("one field set"),
        Err(message) => return invalid(&message),
    };
    let mut caches = state.caches.lock().unwrap();
    // Looked up again: it may have gone while the lock was free.
    let Some(cache) = caches.owned(id, owner, now) else {
        return denied();
    };
    cache.expire = expire;
    cache.update = now;
    json_response(StatusCode::OK, &cache.json(id))
}

/// The expiration a body sets (`ttl` or `expireTime`), if any.
fn expiration(request: &Value, now: i128) -> Result<Option<i128>, String> {
    let expire = match (field(request, "ttl"), field(request, "expireTime")) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(
                "CachedContent.expiration: only one of ttl and expireTime may be set.".to_owned(),
            );
        }
        (Some(ttl), None) => {
            let Some(ttl) = ttl.as_str().and_then(parse_duration) else {
                return Err(format!(
                    "Invalid value at 'cached_content.ttl' ({ttl}): a duration in seconds, such as \"300s\"."
                ));
            };
            now + ttl
        }
        (None, Some(at)) => {
            let Some(at) = at.as_str().and_then(parse_rfc3339) else {
                return Err(format!(
                    "Invalid value at 'cached_content.expire_time' ({at}): an RFC 3339 time, such as \"2025-01-01T00:00:00Z\"."
                ));
            };
            at
        }
    };
    if expire <= now {
        return Err("CachedContent.expiration must be in the future.".to_owned());
    }
    if expire >= days_from_civil(10_000, 1, 1) as i128 * 86_400 * NANOS {
        return Err("CachedContent.expiration is too far in the future.".to_owned());
    }
    Ok(Some(expire))
}

/// The tokens of the cache a `generateContent` request names in `cachedContent` (0 if none),
/// or Google's answer if it is not the caller's project's live cache.
pub(crate) fn tokens_for(
    state: &FakeState,
    key: &str,
    request: &Value,
) -> Result<usize, Box<Response<Body>>> {
    let Some(name) = field(request, "cachedContent") else {
        return Ok(0);
    };
    let Some(name) = name.as_str() else {
        return Err(Box::new(invalid(
            "Invalid JSON payload received. cachedContent is not a string.",
        )));
    };
    let owner = state.owner_of(key);
    let id = name
        .strip_prefix("cachedContents/")
        .ok_or_else(|| Box::new(denied()))?;
    let mut caches = state.caches.lock().unwrap();
    caches
        .owned(id, &owner, now_ns())
        .map(|c| c.tokens)
        .ok_or_else(|| Box::new(denied()))
}

/// `d` (nanoseconds since the Unix epoch) as RFC 3339 in UTC, with 0, 3, 6 or 9 fractional
/// digits as protobuf's JSON writes timestamps: `2025-01-02T03:04:05.250Z`.
pub(crate) fn rfc3339(ns: i128) -> String {
    let secs = ns.div_euclid(NANOS) as i64;
    let nanos = ns.rem_euclid(NANOS) as u32;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    let frac = match nanos {
        0 => String::new(),
        n if n % 1_000_000 == 0 => format!(".{:03}", n / 1_000_000),
        n if n % 1_000 == 0 => format!(".{:06}", n / 1_000),
        n => format!(".{n:09}"),
    };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{frac}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// An RFC 3339 time (`2025-01-02T03:04:05Z`, fractional seconds and a `±hh:mm` offset
/// allowed) in nanoseconds since the Unix epoch.
pub(crate) fn parse_rfc3339(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let digits = b.get(from..from + len)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    let sep = |at: usize, ok: &[u8]| b.get(at).is_some_and(|c| ok.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (h, mi, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&mo) || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    if civil_from_days(days) != (y, mo, d) {
        return None;
    }
    let mut at = 19;
    let mut nanos: i128 = 0;
    if sep(at, b".") {
        at += 1;
        let digits = b[at..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        let frac = num(at, digits)?;
        nanos = i128::from(frac) * 10i128.pow(9 - digits as u32);
        at += digits;
    }
    let offset = match b.get(at..)? {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), ..] if b.len() == at + 6 && sep(at + 3, b":") => {
            let (oh, om) = (num(at + 1, 2)?, num(at + 4, 2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let minutes = oh * 60 + om;
            if *sign == b'+' { minutes } else { -minutes }
        }
        _ => return None,
    };
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset * 60;
    Some(i128::from(secs) * NANOS + nanos)
}

/// A protobuf JSON duration (`300s`, `1.5s`) in nanoseconds; `None` if malformed or negative.
pub(crate) fn parse_duration(s: &str) -> Option<i128> {
    let s = s.strip_suffix('s')?;
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty()
        || whole.len() > 12
        || frac.len() > 9
        || !whole
            .bytes()
            .chain(frac.bytes())
            .all(|c| c.is_ascii_digit())
        || (s.contains('.') && frac.is_empty())
    {
        return None;
    }
    let whole: i128 = whole.parse().ok()?;
    let frac: i128 = if frac.is_empty() {
        0
    } else {
        frac.parse::<i128>().ok()? * 10i128.pow(9 - frac.len() as u32)
    };
    Some(whole * NANOS + frac)
}

/// The proleptic Gregorian date of a day since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(1_795_683_680_123_000_000),
            "2026-11-26T09:01:20.123Z"
        );
        assert_eq!(
            rfc3339(1_795_683_680_123_456_000),
            "2026-11-26T09:01:20.123456Z"
        );
        assert_eq!(
            rfc3339(1_795_683_680_123_456_789),
            "2026-11-26T09:01:20.123456789Z"
        );
        assert_eq!(rfc3339(-NANOS), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(951_782_400 * NANOS), "2000-02-29T00:00:00Z");
        for t in [
            "2026-11-26T09:01:20.123Z",
            "2000-02-29T00:00:00Z",
            "2024-12-31T23:59:59.000000001Z",
        ] {
            assert_eq!(parse_rfc3339(t).map(rfc3339).as_deref(), Some(t));
        }
        assert_eq!(parse_rfc3339("1970-01-01T01:00:01+01:00"), Some(NANOS));
        assert_eq!(parse_rfc3339("1969-12-31T23:00:01-01:00"), Some(NANOS));
        assert_eq!(
            parse_rfc3339("2026-11-26T09:01:20.5Z"),
            Some(1_795_683_680_500_000_000)
        );
        for bad in [
            "",
            "yesterday",
            "2026-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00.Z",
            "2026-01-01T00:00:00+0100",
            "2026-01-01T00:00:00Zjunk",
            "+026-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        for days in [-800_000, -1, 0, 1, 11_016, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300s"), Some(300 * NANOS));
        assert_eq!(parse_duration("1.5s"), Some(1_500_000_000));
        assert_eq!(parse_duration("0.000000001s"), Some(1));
        for bad in [
            "",
            "s",
            "300",
            "-1s",
            "1.s",
            ".5s",
            "1.0000000001s",
            "5m",
            "1e3s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    fn cache(owner: &str, expire: i128) -> Cache {
        Cache {
            seq: 0,
            key: owner.to_owned(),
            owner: Owner::Key(owner.to_owned()),
            model: "models/m".to_owned(),
            display_name: None,
            create: 0,
            update: 0,
            expire,
            tokens: 1,
        }
    }

    #[test]
    fn the_store_is_bounded() {
        let mut caches = Caches::default();
        let first = caches.insert(cache("a", 10), 0);
        let second = caches.insert(cache("a", 1_000), 0);
        for _ in 2..MAX_CACHES {
            caches.insert(cache("b", 1_000), 0);
        }
        assert_eq!(caches.len(), MAX_CACHES);
        // Full: the oldest goes first.
        caches.insert(cache("c", 1_000), 0);
        assert_eq!(caches.len(), MAX_CACHES);
        assert!(caches.creator(&first, 0).is_none());
        assert_eq!(caches.creator(&second, 0).as_deref(), Some("a"));
        // Expired ones go before the oldest live one.
        let third = caches.order.values().nth(1).cloned().unwrap();
        caches.by_id.get_mut(&third).unwrap().expire = 5;
        caches.insert(cache("c", 1_000), 100);
        assert_eq!(caches.len(), MAX_CACHES);
        assert_eq!(caches.creator(&second, 100).as_deref(), Some("a"));
        assert!(caches.creator(&third, 0).is_none());
        assert_eq!(caches.order.len(), caches.by_id.len());
        // An expired cache is forgotten when asked about.
        assert!(
            caches
                .creator(&format!("cachedContents/{second}"), 1_000)
                .is_none()
        );
        assert_eq!(caches.len(), MAX_CACHES - 1);
    }
}

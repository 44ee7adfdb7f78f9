//! What an upstream error means for the key that got it, and for the request.
//!
//! This is the README's table, in code. It reads the status *and* the body: a 400 is a dead key
//! when Google's `ErrorInfo.reason` says `API_KEY_INVALID`, and the client's mistake otherwise;
//! a 403 is the key's fault only when its reason blames the key or its project. Google answers
//! 403 for many client mistakes too (a file, cached content or project the key cannot see), and
//! counting those against keys would let any client disable the whole pool with one request.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

/// The class of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ErrorClass {
    /// The key is invalid or expired (400 `API_KEY_INVALID`).
    KeyInvalid,
    /// A 403 whose `ErrorInfo.reason` blames the key or its project ([`KEY_FAULT_REASONS`]).
    /// It disables the key only once a probe with a neutral request confirms it.
    KeyForbidden,
    /// A per-minute (or unspecified) quota of this key's project for this model.
    RateLimited { retry_after: Duration },
    /// A per-day quota: it resets at midnight Pacific time.
    DailyQuota,
    /// Google's fault (500, 503, 504, other 5xx): no penalty.
    Upstream,
    /// No answer in time.
    Timeout,
    /// Connecting, sending or reading failed.
    Network,
    /// Any other 403: most often the client's (a file, cached content or project the key
    /// cannot see), so passed through with no retry and no penalty; but Google also says no
    /// reason when it refuses a key reported as leaked, so the key is probed with a neutral
    /// call (at most once a minute) and disabled if that is refused too.
    Forbidden,
    /// The client's request is wrong (other 4xx): passed through, no retry, no penalty.
    Client,
}

/// What the attempt loop does with a failed attempt's key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyVerdict {
    /// Count one consecutive key fault (disable at `MAX_FAILURES`).
    Fault,
    /// Count one consecutive key fault; at `MAX_FAILURES`, disable only if a probe confirms it.
    Suspect,
    /// Cool the key for this model for this long.
    CoolFor(Duration),
    /// Cool the key for this model until the next daily quota reset.
    CoolUntilDailyReset,
    /// The key is not to blame for this request, but a probe with a neutral call may show
    /// it is broken.
    Probe,
    /// The key is not to blame.
    NoPenalty,
}

/// The `&'static` name of a class named by `name` (as another instance of a fleet wrote it):
/// one of [`ErrorClass::as_str`], `policy`, or `fleet` for any other.
pub fn class_name(name: &str) -> &'static str {
    const NAMES: &[&str] = &[
        "key_invalid",
        "key_forbidden",
        "rate_limited",
        "daily_quota",
        "upstream_error",
        "timeout",
        "network",
        "forbidden",
        "client_error",
        "policy",
    ];
    NAMES
        .iter()
        .find(|n| **n == name)
        .copied()
        .unwrap_or("fleet")
}

impl ErrorClass {
    /// A short stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::KeyInvalid => "key_invalid",
            ErrorClass::KeyForbidden => "key_forbidden",
            ErrorClass::RateLimited { .. } => "rate_limited",
            ErrorClass::DailyQuota => "daily_quota",
            ErrorClass::Upstream => "upstream_error",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Network => "network",
            ErrorClass::Forbidden => "forbidden",
            ErrorClass::Client => "client_error",
        }
    }

    /// Whether another key may succeed where this one failed.
    pub fn retryable(self) -> bool {
        !matches!(self, ErrorClass::Client | ErrorClass::Forbidden)
    }

    pub fn verdict(self) -> KeyVerdict {
        match self {
            ErrorClass::KeyInvalid => KeyVerdict::Fault,
            ErrorClass::KeyForbidden => KeyVerdict::Suspect,
            ErrorClass::Forbidden => KeyVerdict::Probe,
            ErrorClass::RateLimited { retry_after } => KeyVerdict::CoolFor(retry_after),
            ErrorClass::DailyQuota => KeyVerdict::CoolUntilDailyReset,
            ErrorClass::Upstream
            | ErrorClass::Timeout
            | ErrorClass::Network
            | ErrorClass::Client => KeyVerdict::NoPenalty,
        }
    }
}

/// The `ErrorInfo.reason`s of a 403 that blame the key or its project; any other 403 is the
/// client's error.
pub const KEY_FAULT_REASONS: &[&str] = &[
    "API_KEY_INVALID",
    "API_KEY_EXPIRED",
    "API_KEY_SERVICE_BLOCKED",
    "API_KEY_IP_ADDRESS_BLOCKED",
    "CONSUMER_SUSPENDED",
    "SERVICE_DISABLED",
];

/// The cooldown after a 429 that does not say how long to wait.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(60);

#[derive(Deserialize, Default)]
struct Envelope {
    #[serde(default)]
    error: ErrorBody,
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<Detail>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Detail {
    #[serde(rename = "@type", default)]
    kind: String,
    #[serde(default)]
    metadata: std::collections::HashMap<String, serde_json::Value>,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    violations: Vec<Violation>,
    #[serde(default)]
    retry_delay: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Violation {
    #[serde(default)]
    quota_id: String,
}

/// Whom a quota answer's cooldown is for, by the quota Google names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// The key, for the model (a per-key limit, or a 429 that names no quota).
    #[default]
    KeyModel,
    /// Every key of the key's project, for the model (`…PerProjectPerModel…`).
    ProjectModel,
    /// Every key of the project, for every model (a per-project limit of no model: spend).
    Project,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::KeyModel => "key_model",
            Scope::ProjectModel => "project_model",
            Scope::Project => "project",
        }
    }
}

/// What a quota answer (or a 403) says about the quota and the key's project.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Quota {
    /// Whose quota ran out, by the quota Google names.
    pub scope: Scope,
    /// The first `QuotaFailure.violations[].quotaId` (empty: none named).
    pub id: Box<str>,
    /// The project Google says the key belongs to (`ErrorInfo.metadata.consumer`,
    /// `projects/123`).
    pub consumer: Option<Box<str>>,
}

/// The scope of one quota id: a limit per user (or key) is the key's; one per model is the
/// project's for that model; any other named limit (spend) is the project's for every model.
fn scope_of(id: &str) -> Scope {
    if id.contains("PerUser") || id.contains("PerKey") {
        Scope::KeyModel
    } else if id.contains("PerModel") {
        Scope::ProjectModel
    } else {
        Scope::Project
    }
}

/// The quota an error answer names: its scope (the widest of its violations'), its first
/// quota id, and the project it names.
pub fn quota_of(body: &[u8]) -> Quota {
    let parsed: Envelope = serde_json::from_slice(body).unwrap_or_default();
    let details = &parsed.error.details;
    let ids = || {
        details
            .iter()
            .flat_map(|d| &d.violations)
            .map(|v| v.quota_id.as_str())
            .filter(|id| !id.is_empty())
    };
    let scope = ids().map(scope_of).fold(None, |wide, s| match (wide, s) {
        (Some(Scope::Project), _) | (_, Scope::Project) => Some(Scope::Project),
        (Some(Scope::ProjectModel), _) | (_, Scope::ProjectModel) => Some(Scope::ProjectModel),
        _ => Some(Scope::KeyModel),
    });
    let consumer = details
        .iter()
        .filter_map(|d| d.metadata.get("consumer")?.as_str())
        .find(|c| c.starts_with("projects/") && c.len() <= 64)
        .map(Into::into);
    Quota {
        scope: scope.unwrap_or_default(),
        id: ids()
            .next()
            .map(|id| id.chars().take(128).collect::<String>().into())
            .unwrap_or_default(),
        consumer,
    }
}

/// Whether an answer is a bare 429: no `QuotaFailure`, no `RetryInfo`, nothing that names
/// a quota (Google throttling the caller, not a project's quota).
pub fn is_bare_429(status: u16, body: &[u8]) -> bool {
    if status != 429 {
        return false;
    }
    let parsed: Envelope = serde_json::from_slice(body).unwrap_or_default();
    parsed
        .error
        .details
        .iter()
        .all(|d| d.violations.is_empty() && d.retry_delay.is_none())
}

/// Classifies an upstream answer with an error status from its status and body.
pub fn classify(status: u16, body: &[u8]) -> ErrorClass {
    let parsed: Envelope = serde_json::from_slice(body).unwrap_or_default();
    let err = parsed.error;
    let reason = |r: &str| err.details.iter().any(|d| d.reason == r);
    match status {
        400 if reason("API_KEY_INVALID")
            || err.message.contains("API key expired")
            || err.message.contains("API key not valid") =>
        {
            ErrorClass::KeyInvalid
        }
        403 if KEY_FAULT_REASONS.iter().any(|r| reason(r)) => ErrorClass::KeyForbidden,
        403 => ErrorClass::Forbidden,
        429 => {
            let daily = err
                .details
                .iter()
                .flat_map(|d| &d.violations)
                .any(|v| v.quota_id.contains("PerDay"));
            if daily {
                return ErrorClass::DailyQuota;
            }
            let retry_after = err
                .details
                .iter()
                .filter(|d| d.kind.ends_with("RetryInfo"))
                .find_map(|d| d.retry_delay.as_deref().and_then(parse_duration))
                .unwrap_or(DEFAULT_RETRY_DELAY);
            ErrorClass::RateLimited { retry_after }
        }
        408 => ErrorClass::Timeout,
        s if s >= 500 => ErrorClass::Upstream,
        // 401 included: Google answers it when the call itself needs other credentials
        // ("API keys are not supported by this API"), whatever the key.
        _ => ErrorClass::Client,
    }
}

/// Google's `error.message`.
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: Envelope = serde_json::from_slice(body).ok()?;
    Some(v.error.message).filter(|m| !m.is_empty())
}

/// Replaces every occurrence of `secret` in an upstream error body with its masked form:
/// Google sometimes names the key in its message.
pub fn redact(body: Bytes, secret: &str) -> Bytes {
    if secret.is_empty() || memchr::memmem::find(&body, secret.as_bytes()).is_none() {
        return body;
    }
    let masked = crate::config::mask(secret);
    Bytes::from(String::from_utf8_lossy(&body).replace(secret, &masked))
}

/// Parses a protobuf JSON duration such as `"47s"` or `"1.5s"`.
fn parse_duration(s: &str) -> Option<Duration> {
    let secs: f64 = s.trim().strip_suffix('s')?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_design_table() {
        let invalid = br#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#;
        assert_eq!(classify(400, invalid), ErrorClass::KeyInvalid);
        let bad_request = br#"{"error":{"code":400,"message":"* GenerateContentRequest.contents: contents is not specified\n","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(classify(400, bad_request), ErrorClass::Client);
        assert_eq!(classify(404, b"{}"), ErrorClass::Client);
        assert_eq!(classify(401, b"{}"), ErrorClass::Client);
        let suspended = br#"{"error":{"code":403,"message":"Permission denied","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"CONSUMER_SUSPENDED"}]}}"#;
        assert_eq!(classify(403, suspended), ErrorClass::KeyForbidden);
        let foreign_file = br#"{"error":{"code":403,"message":"You do not have permission to access the File abc or it may not exist.","status":"PERMISSION_DENIED"}}"#;
        assert_eq!(classify(403, foreign_file), ErrorClass::Forbidden);
        let other_reason = br#"{"error":{"code":403,"status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"IAM_PERMISSION_DENIED"}]}}"#;
        assert_eq!(classify(403, other_reason), ErrorClass::Forbidden);
        let leaked = br#"{"error":{"code":403,"message":"Your API key was reported as leaked. Please use another API key.","status":"PERMISSION_DENIED"}}"#;
        assert_eq!(classify(403, leaked), ErrorClass::Forbidden);
        for r in KEY_FAULT_REASONS {
            let body = format!(r#"{{"error":{{"code":403,"details":[{{"reason":"{r}"}}]}}}}"#);
            assert_eq!(
                classify(403, body.as_bytes()),
                ErrorClass::KeyForbidden,
                "{r}"
            );
        }
        let minute = br#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"47s"}]}}"#;
        assert_eq!(
            classify(429, minute),
            ErrorClass::RateLimited {
                retry_after: Duration::from_secs(47)
            }
        );
        let day = br#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]}}"#;
        assert_eq!(classify(429, day), ErrorClass::DailyQuota);
        let bare = br#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#;
        assert_eq!(
            classify(429, bare),
            ErrorClass::RateLimited {
                retry_after: DEFAULT_RETRY_DELAY
            }
        );
        for s in [500, 503, 504] {
            assert_eq!(classify(s, b"not json"), ErrorClass::Upstream);
        }
    }

    #[test]
    fn secrets_are_redacted_from_error_bodies() {
        let key = "AIzaSyABCDEFGHIJKLMNOPQRSTUVWXYZ0123456";
        let body = Bytes::from(format!("Consumer 'api_key:{key}' has been suspended."));
        let out = redact(body, key);
        assert_eq!(
            &out[..],
            "Consumer 'api_key:AIzaSy…3456' has been suspended.".as_bytes()
        );
    }

    #[test]
    fn only_key_faults_penalise_and_only_client_errors_stop() {
        assert_eq!(ErrorClass::KeyInvalid.verdict(), KeyVerdict::Fault);
        assert_eq!(ErrorClass::Upstream.verdict(), KeyVerdict::NoPenalty);
        assert!(!ErrorClass::Client.retryable());
        assert!(!ErrorClass::Forbidden.retryable());
        assert_eq!(ErrorClass::Forbidden.verdict(), KeyVerdict::Probe);
        assert!(ErrorClass::Network.retryable());
    }

    #[test]
    fn a_quota_answer_says_whose_quota_it_was() {
        let with = |id: &str| {
            format!(
                r#"{{"error":{{"code":429,"details":[{{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{{"quotaId":"{id}"}}]}}]}}}}"#
            )
        };
        let scope = |id: &str| quota_of(with(id).as_bytes()).scope;
        assert_eq!(
            scope("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
            Scope::ProjectModel
        );
        assert_eq!(
            scope("GenerateRequestsPerDayPerProjectPerModel"),
            Scope::ProjectModel
        );
        assert_eq!(scope("GenerateContentSpendPerProject"), Scope::Project);
        assert_eq!(scope("GenerateRequestsPerMinutePerUser"), Scope::KeyModel);
        assert_eq!(
            scope("GenerateContentInputTokensPerModelPerMinute-FreeTier"),
            Scope::ProjectModel
        );
        assert_eq!(quota_of(br#"{"error":{"code":429}}"#), Quota::default());
        assert_eq!(quota_of(b"not json").scope, Scope::KeyModel);
        let named = br#"{"error":{"code":429,"details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"RATE_LIMIT_EXCEEDED","metadata":{"consumer":"projects/1042","service":"generativelanguage.googleapis.com"}}]}}"#;
        let q = quota_of(named);
        assert_eq!(
            (&*q.id, q.consumer.as_deref()),
            (
                "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                Some("projects/1042")
            )
        );
        assert!(is_bare_429(
            429,
            br#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED"}}"#
        ));
        assert!(is_bare_429(429, b"<html>Too Many Requests</html>"));
        assert!(!is_bare_429(429, named));
        assert!(!is_bare_429(503, b""));
    }
}

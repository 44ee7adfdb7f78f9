//! What the plugin chain would do with one request: the dry run of the admin API and the
//! `gemgate.test.run` of plugin tests share it.
//!
//! A [`Scenario`] describes a request (and, for a test, a pool of made-up keys); [`simulate`]
//! runs the policy's hooks on it as the request path would — the declared limits it falls
//! under, `on_request`, the key choice with `select_key`, `filter_models` over a model list,
//! `on_response` / `on_error` over an attempt's outcome — and answers a [`Verdict`], with the
//! trace of every hook. Nothing is sent upstream, and nothing is counted against a limit.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::engine::{AttemptDecision, AttemptInfo, Denial, Policy, RequestInfo, Shared};
use super::trace::{KeyNote, Trace, key_notes};
use crate::config::{KeySpec, Secret};
use crate::keys::{KeyPool, KeyRegistry, Lease, Pick};

/// At most this many headers, keys, models, requests in flight: a scenario comes from an admin
/// or a test file, but is still bounded.
const MAX_HEADERS: usize = 100;
pub const MAX_KEYS: usize = 1000;
const MAX_IN_FLIGHT: u64 = 10_000;
const MAX_MODELS: usize = 10_000;
const MAX_NAME: usize = 256;

/// A request to run the plugins on, and for a test, the pool to run them against.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    pub request: ScenarioRequest,
    /// The keys (a test's own; a dry run uses the live pool and refuses this).
    pub pool: Option<Vec<ScenarioKey>>,
    /// A model list to pass through `filter_models` (as Google lists them: `{ name = … }`).
    pub models: Option<Vec<serde_json::Value>>,
    /// An attempt's outcome to pass to `on_response` (a 2xx `status`) or `on_error`.
    pub attempt: Option<ScenarioAttempt>,
    /// Test only: `[plugins.<name>]` replaced, each whole (`enabled = true` switches a plugin
    /// on).
    pub plugins: BTreeMap<String, toml::Table>,
    /// Test only: settings of `gemgate.settings` replaced, each whole (`filtered_models`,
    /// `model_aliases`, …).
    pub settings: Option<serde_json::Map<String, serde_json::Value>>,
    /// Test only: run only these plugins (each switched on); the others are switched off.
    pub only: Option<Vec<String>>,
    /// How many times the request is made, one after the other (at most [`MAX_TIMES`]): the
    /// verdict is the last one's. Counters (`gemgate.counter`) and the limits plugins declare
    /// count across them, as for one client's requests within a minute.
    pub times: Option<u32>,
}

/// The most requests one scenario makes.
pub const MAX_TIMES: u32 = 1000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScenarioRequest {
    /// `"gemini"` or `"openai"`.
    pub protocol: String,
    pub model: String,
    pub action: String,
    pub stream: bool,
    pub method: String,
    /// Made from the model and action when unset.
    pub path: Option<String>,
    pub headers: BTreeMap<String, String>,
    /// The Gemini request body: given back as `body` with the rewrite applied.
    pub body: Option<serde_json::Value>,
    /// The client token's name.
    pub client: String,
    pub id: String,
}

impl Default for ScenarioRequest {
    fn default() -> Self {
        ScenarioRequest {
            protocol: "gemini".into(),
            model: "gemini-2.5-flash".into(),
            action: "generateContent".into(),
            stream: false,
            method: "POST".into(),
            path: None,
            headers: BTreeMap::new(),
            body: None,
            client: "test".into(),
            id: "dry-run".into(),
        }
    }
}

/// A made-up key of a test's pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScenarioKey {
    pub id: String,
    pub label: String,
    pub tags: Vec<String>,
    pub weight: u32,
    pub project: Option<String>,
    pub tier: Option<String>,
    /// `"active"`, `"disabled"` or `"cooling"`.
    pub state: String,
    /// How long a `"cooling"` key cools, and for which model (`"*"`: every model).
    pub cooldown_s: f64,
    pub cooldown_model: String,
    /// Requests it is serving now (what `least_loaded` reads).
    pub in_flight: u32,
}

impl Default for ScenarioKey {
    fn default() -> Self {
        ScenarioKey {
            id: String::new(),
            label: String::new(),
            tags: Vec::new(),
            weight: 1,
            project: None,
            tier: None,
            state: "active".into(),
            cooldown_s: 60.0,
            cooldown_model: "*".into(),
            in_flight: 0,
        }
    }
}

/// An attempt's outcome for `on_response` / `on_error`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScenarioAttempt {
    pub status: u16,
    /// The error taxonomy's class (`"ok"` for a success): `rate_limited`, `quota_exhausted`,
    /// `invalid_key`, `server_error`, …
    pub class: String,
    pub message: String,
    pub retry_delay_s: Option<f64>,
    /// The key that served it (the chosen one when unset).
    pub key_id: Option<String>,
    pub attempt: u32,
}

impl Default for ScenarioAttempt {
    fn default() -> Self {
        ScenarioAttempt {
            status: 200,
            class: "ok".into(),
            message: String::new(),
            retry_delay_s: None,
            key_id: None,
            attempt: 1,
        }
    }
}

/// What the plugin chain did with a scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    /// The refusal (a plugin's `gemgate.deny`, a failing plugin under `on_error = "deny"`, or a
    /// rewrite the body does not take).
    pub denied: Option<Denied>,
    /// The model sent upstream.
    pub model: String,
    /// What `on_request` plugins changed.
    pub rewrite: Option<RewriteView>,
    /// The request body with the rewrite applied (when the scenario has one).
    pub body: Option<serde_json::Value>,
    /// The limits plugins declare that the call counts against.
    pub limits: Vec<LimitView>,
    /// The key chosen, and by whom (a plugin's name or `built-in`).
    pub key: Option<String>,
    pub chosen_by: Option<String>,
    /// Why no key was chosen.
    pub no_key: Option<String>,
    /// The keys considered, each with what became of it.
    pub keys: Vec<KeyNote>,
    /// The model list after `filter_models`.
    pub models: Option<Vec<serde_json::Value>>,
    /// What `on_response` / `on_error` decided: `retry`, `cool`, `disable`, or none.
    pub decision: Option<DecisionView>,
    pub trace: Trace,
}

#[derive(Debug, Clone, Serialize)]
pub struct Denied {
    pub status: u16,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RewriteView {
    pub model: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub generation_config: Option<serde_json::Value>,
    pub generation_config_defaults: Option<serde_json::Value>,
    pub tools: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LimitView {
    pub plugin: String,
    pub per_minute: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecisionView {
    pub decision: &'static str,
    pub seconds: Option<f64>,
    pub reason: Option<String>,
}

/// A scenario that cannot be run as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadScenario(pub String);

/// A pool of made-up keys, in the states `keys` give them, and the leases that hold their
/// `in_flight` counts (drop them after the run).
pub fn test_pool(
    keys: &[ScenarioKey],
    quota: &crate::config::quota::QuotaLimits,
) -> Result<(Arc<KeyPool>, Vec<Lease>), BadScenario> {
    if keys.len() > MAX_KEYS {
        return Err(BadScenario(format!("a pool has at most {MAX_KEYS} keys")));
    }
    if keys.iter().map(|k| u64::from(k.in_flight)).sum::<u64>() > MAX_IN_FLIGHT {
        return Err(BadScenario(format!(
            "a pool has at most {MAX_IN_FLIGHT} requests in flight"
        )));
    }
    let mut specs = Vec::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        let id = if k.id.is_empty() {
            format!("k{}", i + 1)
        } else {
            k.id.clone()
        };
        if id.len() > MAX_NAME || specs.iter().any(|s: &KeySpec| s.id == id) {
            return Err(BadScenario(format!(
                "key id {id:?} is too long or not unique"
            )));
        }
        specs.push(KeySpec {
            secret: Secret::new(format!("test-secret-{id}")),
            id,
            label: k.label.clone(),
            tags: k.tags.clone(),
            weight: k.weight,
            source: Default::default(),
            project: k.project.clone(),
            tier: k.tier.clone(),
            vertex: false,
        });
    }
    let pool = Arc::new(KeyPool::new(&specs, &KeyRegistry::default(), 3, quota));
    let now = crate::clock::now_ms();
    let mut leases = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        match k.state.as_str() {
            "active" => {}
            "disabled" => pool.get(i).state.disable("disabled by the test"),
            "cooling" => pool.cool(i, &k.cooldown_model, k.cooldown_s.max(0.001), now),
            other => {
                return Err(BadScenario(format!(
                    "key state {other:?}: use \"active\", \"disabled\" or \"cooling\""
                )));
            }
        }
        for _ in 0..k.in_flight {
            leases.push(pool.lease(i, now));
        }
    }
    Ok((pool, leases))
}

/// Runs `policy`'s hooks on `scenario`, against the policy's pool, as many times as it says,
/// until `deadline` (each hook call is under the policy's own limits).
pub fn simulate(
    policy: &Policy,
    scenario: &Scenario,
    deadline: std::time::Instant,
) -> Result<Verdict, BadScenario> {
    let times = scenario.times.unwrap_or(1);
    if !(1..=MAX_TIMES).contains(&times) {
        return Err(BadScenario(format!("times is 1 to {MAX_TIMES}")));
    }
    let mut counted = BTreeMap::new();
    let mut verdict = simulate_once(policy, scenario, &mut counted)?;
    for done in 1..times {
        if std::time::Instant::now() > deadline {
            return Err(BadScenario(format!(
                "the scenario ran out of time after {done} of {times} requests"
            )));
        }
        verdict = simulate_once(policy, scenario, &mut counted)?;
    }
    Ok(verdict)
}

/// One pass of [`simulate`]; `counted` holds the calls each declared limit has counted.
fn simulate_once(
    policy: &Policy,
    scenario: &Scenario,
    counted: &mut BTreeMap<String, u64>,
) -> Result<Verdict, BadScenario> {
    let req = &scenario.request;
    check_request(req)?;
    let mut shared = Shared::traced();
    let mut verdict = Verdict {
        model: req.model.clone(),
        limits: policy
            .limits_for(&req.model)
            .map(|l| LimitView {
                plugin: l.plugin.clone(),
                per_minute: l.limit.rpm_for(&req.client),
            })
            .collect(),
        ..Verdict::default()
    };
    verdict.denied = over_limit(&verdict.limits, counted, &req.client);
    if verdict.denied.is_none() {
        on_request(policy, req, &mut verdict, &mut shared)?;
    }
    if verdict.denied.is_none() {
        choose(policy, &mut verdict, req, &mut shared);
        if let Some(models) = &scenario.models {
            if models.len() > MAX_MODELS {
                return Err(BadScenario(format!("at most {MAX_MODELS} models")));
            }
            match policy.filter_models(models.clone(), &req.client, &req.id, &mut shared) {
                Ok(list) => verdict.models = Some(list),
                Err(d) => verdict.denied = Some(d.into()),
            }
        }
        if let Some(attempt) = &scenario.attempt {
            after_attempt(policy, &mut verdict, req, attempt, &mut shared)?;
        }
    }
    verdict.trace = shared.with_trace(Trace::clone).unwrap_or_default();
    Ok(verdict)
}

/// The declared limits, counted as the request path counts them (before `on_request`): the
/// refusal of the first one past its rate.
fn over_limit(
    limits: &[LimitView],
    counted: &mut BTreeMap<String, u64>,
    client: &str,
) -> Option<Denied> {
    for limit in limits {
        let n = counted.entry(limit.plugin.clone()).or_default();
        *n += 1;
        if *n > limit.per_minute {
            return Some(Denied {
                status: 429,
                message: format!(
                    "rate limit: {} requests per minute for {client}",
                    limit.per_minute
                ),
            });
        }
    }
    None
}

/// `on_request` over the scenario's request: its refusal, or the rewrite (and the body with
/// it) in `verdict`.
fn on_request(
    policy: &Policy,
    req: &ScenarioRequest,
    verdict: &mut Verdict,
    shared: &mut Shared,
) -> Result<(), BadScenario> {
    if !policy.has_on_request(&req.model) {
        verdict.body.clone_from(&req.body);
        return Ok(());
    }
    let headers = header_map(&req.headers)?;
    let path = req.path.clone().unwrap_or_else(|| {
        if req.model.is_empty() {
            "/v1beta/models".into()
        } else {
            format!("/v1beta/models/{}:{}", req.model, req.action)
        }
    });
    let protocol = match req.protocol.as_str() {
        "gemini" => "gemini",
        "openai" => "openai",
        other => {
            return Err(BadScenario(format!(
                "protocol {other:?}: use \"gemini\" or \"openai\""
            )));
        }
    };
    let info = RequestInfo {
        id: &req.id,
        method: &req.method,
        path: &path,
        protocol,
        model: &req.model,
        action: &req.action,
        stream: req.stream,
        client: &req.client,
        headers: &headers,
    };
    let rewrite = match policy.on_request(&info, shared) {
        Ok(rewrite) => rewrite,
        Err(d) => {
            verdict.denied = Some(d.into());
            return Ok(());
        }
    };
    if let Some(m) = &rewrite.model {
        verdict.model.clone_from(m);
    }
    if let Some(body) = &req.body {
        let mut body = body.clone();
        match rewrite.apply(&mut body) {
            Ok(()) => verdict.body = Some(body),
            Err(m) => {
                verdict.denied = Some(Denied {
                    status: 400,
                    message: m.into(),
                });
            }
        }
    }
    if rewrite.model.is_some() || !rewrite.headers.is_empty() || rewrite.touches_body() {
        verdict.rewrite = Some(RewriteView {
            headers: rewrite
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            model: rewrite.model,
            generation_config: rewrite.generation_config,
            generation_config_defaults: rewrite.generation_config_defaults,
            tools: rewrite.tools,
        });
    }
    Ok(())
}

impl From<Denial> for Denied {
    fn from(d: Denial) -> Denied {
        Denied {
            status: d.status,
            message: d.message,
        }
    }
}

/// The key choice for the scenario's (rewritten) model: `select_key` plugins, else the
/// built-in rule.
fn choose(policy: &Policy, verdict: &mut Verdict, req: &ScenarioRequest, shared: &mut Shared) {
    let pool = policy.pool();
    let model = verdict.model.clone();
    if model.is_empty() {
        return;
    }
    let now = crate::clock::now_ms();
    let candidates = pool.candidates(&model, &[], now);
    let mut by = "built-in".to_owned();
    let mut chosen = None;
    if policy.has_select_key(&model) && !candidates.is_empty() {
        match policy.select_key(&model, candidates, &req.client, &req.id, now, shared) {
            // As the request path takes a plugin's choice: open, its project not at a limit.
            Ok(Some((i, plugin)))
                if pool.usable(i, &model, now) && pool.room(i, &model, 0, now).is_ok() =>
            {
                chosen = Some(i);
                by = plugin.to_string();
            }
            Ok(_) => {}
            Err(d) => {
                verdict.denied = Some(d.into());
                return;
            }
        }
    }
    if chosen.is_none() {
        match pool.pick(&model, &[], 0, now) {
            Pick::Key(i) => chosen = Some(i),
            Pick::Empty => verdict.no_key = Some("the pool has no keys".into()),
            Pick::Held { why, .. } => verdict.no_key = Some(why),
            Pick::Exhausted {
                cooling, disabled, ..
            } => {
                verdict.no_key = Some(format!(
                    "no key can serve {model}: {cooling} cooling, {disabled} disabled"
                ));
            }
        }
    }
    let (notes, more) = key_notes(pool, &model, &[], 0, now, chosen);
    let id = chosen.map(|i| pool.get(i).spec.id.clone());
    shared.trace(|t| t.choice(notes.clone(), more, id.as_deref(), &by));
    verdict.keys = notes;
    if let Some(id) = id {
        verdict.key = Some(id);
        verdict.chosen_by = Some(by);
    }
}

/// `on_response` / `on_error` over the scenario's attempt.
fn after_attempt(
    policy: &Policy,
    verdict: &mut Verdict,
    req: &ScenarioRequest,
    attempt: &ScenarioAttempt,
    shared: &mut Shared,
) -> Result<(), BadScenario> {
    let success = (200..300).contains(&attempt.status);
    if !policy.has_attempt_hook(success, &verdict.model) {
        return Ok(());
    }
    let key_id = attempt
        .key_id
        .clone()
        .or_else(|| verdict.key.clone())
        .unwrap_or_default();
    let class = if success {
        "ok"
    } else {
        attempt.class.as_str()
    };
    let info = AttemptInfo {
        id: &req.id,
        client: &req.client,
        model: &verdict.model,
        status: attempt.status,
        class,
        key_id: &key_id,
        attempt: attempt.attempt.max(1),
        retry_delay_s: attempt.retry_delay_s,
        message: &attempt.message,
    };
    match policy.after_attempt(&info, shared) {
        Ok(decision) => {
            verdict.decision = decision.map(|d| match d {
                AttemptDecision::Retry => DecisionView {
                    decision: "retry",
                    seconds: None,
                    reason: None,
                },
                AttemptDecision::Cool(s) => DecisionView {
                    decision: "cool",
                    seconds: Some(s),
                    reason: None,
                },
                AttemptDecision::Disable(r) => DecisionView {
                    decision: "disable",
                    seconds: None,
                    reason: Some(r),
                },
            });
        }
        Err(d) => verdict.denied = Some(d.into()),
    }
    Ok(())
}

fn check_request(req: &ScenarioRequest) -> Result<(), BadScenario> {
    for (what, s) in [
        ("model", &req.model),
        ("action", &req.action),
        ("client", &req.client),
        ("id", &req.id),
        ("method", &req.method),
    ] {
        if s.len() > MAX_NAME {
            return Err(BadScenario(format!(
                "request.{what} is longer than {MAX_NAME} bytes"
            )));
        }
    }
    if req.headers.len() > MAX_HEADERS {
        return Err(BadScenario(format!(
            "request.headers has more than {MAX_HEADERS} headers"
        )));
    }
    Ok(())
}

fn header_map(headers: &BTreeMap<String, String>) -> Result<http::HeaderMap, BadScenario> {
    let mut map = http::HeaderMap::new();
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| BadScenario(format!("request.headers: {name:?} is not a header name")))?;
        let value = http::HeaderValue::from_str(value).map_err(|_| {
            BadScenario(format!("request.headers: the value of {name} is not valid"))
        })?;
        map.insert(name, value);
    }
    Ok(map)
}

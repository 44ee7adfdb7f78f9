//! A fake Gemini API for tests, benchmarks and offline demos.
//!
//! It serves the shapes of Google's REST API (models, generateContent, streamGenerateContent in
//! SSE and JSON-array form, countTokens, embedContent, batchEmbedContents, Imagen `:predict`,
//! the Files API, cached contents, and the OpenAI-compatible chat completions in brief) and
//! answers from the request, so a test can check what came back. Each API key behaves as
//! its prefix says ([`Behaviour::from_key`]), or as set at run time through `POST
//! /_fake/behaviour`. It counts requests and TCP connections per key, and keeps the last
//! requests it received (`GET /_fake/stats`, `GET /_fake/requests`).
//!
//! Per-request controls, as request headers: `x-fake-chunks: N` (stream chunks),
//! `x-fake-delay-ms: N` (pause between chunks), `x-fake-hold: NAME` (hold the last chunk until
//! `POST /_fake/release/NAME`), `x-fake-error: STATUS REASON` (answer with that error and
//! `ErrorInfo.reason`).
//!
//! An optional quota model ([`QuotaModel`]; [`FakeState::set_quota`], `POST /_fake/quota`, or
//! the binary's `--quota-file`) puts keys in Cloud projects and limits each (project, model) as
//! Google does: requests per minute and input tokens per minute over a sliding 60-second
//! window, requests per Pacific day. generateContent, streamGenerateContent, embedContent and
//! batchEmbedContents calls over a limit answer Google's quota 429 (`QuotaFailure`, `Help`,
//! `RetryInfo` for per-minute limits, `ErrorInfo` naming `projects/<number>`); keys in no
//! project are unlimited. A global throttle ([`FakeState::set_throttle`], `POST
//! /_fake/throttle`) answers every such call of every key a bare 429. `GET /_fake/quota` (and
//! [`FakeState::quota_stats`]) counts the calls admitted and refused per project.
//!
//! Cached contents (`POST`/`GET /v1beta/cachedContents`, `GET`/`PATCH`/`DELETE
//! /v1beta/cachedContents/{id}`, and `generateContent`'s `"cachedContent":
//! "cachedContents/<id>"`, which adds `usageMetadata.cachedContentTokenCount`) belong, as at
//! Google, to the Cloud project of the key that created them: its quota-model project, or the
//! key alone if it is in none. A call about a cache of another project, or an unknown or
//! expired one, answers 403 `PERMISSION_DENIED` with no `ErrorInfo`. At most [`MAX_CACHES`]
//! are kept; [`FakeState::cache_owner`] names the key that created one. Files belong to the
//! key that uploaded them (their bytes are kept, up to [`MAX_FILE_BYTES`] each, for batch
//! inputs and `GET [/download]/v1beta/files/{id}:download`, which any key of the uploader's
//! project may use). [`FakeState::reset`] keeps both.
//!
//! Interactions (`POST /v1beta/interactions`, whole or streamed, `GET`/`DELETE
//! /v1beta/interactions/{id}`, `POST …/{id}/cancel`; see the `interactions` module) and batches
//! (`POST /v1beta/models/{m}:batchGenerateContent`, `GET /v1beta/batches[/{id}]`, `POST
//! …/{id}:cancel`, `DELETE …/{id}`) belong to projects as cached contents do, with the same
//! 403 for another project's; at most [`MAX_INTERACTIONS`] and [`MAX_BATCHES`] are kept
//! ([`FakeState::interaction_owner`], [`FakeState::batch_owner`]). `POST
//! /v1alpha/auth_tokens` mints ephemeral tokens ([`FakeState::auth_token_owner`]) for the Live
//! API's WebSocket (`…/ws/google.ai.generativelanguage.{version}.GenerativeService.
//! BidiGenerateContent[Constrained]`), which echoes texts; its upgrade answers a key's
//! behaviour as any call does. [`FakeState::reset`] forgets interactions, batches and tokens.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

mod batches;
mod cache;
mod interactions;
mod live;
mod quota;
mod store;

pub use batches::{MAX_BATCHES, MAX_FILE_BYTES, MAX_KEPT_BYTES};
pub use cache::MAX_CACHES;
pub use interactions::{BREAK, MAX_INTERACTIONS};
pub use live::{MAX_AUTH_TOKENS, MAX_MESSAGE, MAX_SESSION};
pub use quota::{ProjectQuotaStats, QuotaModel, QuotaProject, QuotaStats};

type Body = BoxBody<Bytes, std::io::Error>;

/// How a key answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    Valid,
    /// 400 `API_KEY_INVALID`.
    Invalid,
    /// 403 `PERMISSION_DENIED` (consumer suspended), naming the key as Google does.
    Suspended,
    /// 403 `PERMISSION_DENIED` for a key reported as leaked: no `ErrorInfo`, as Google sends it.
    Leaked,
    /// 429 with a per-minute `QuotaFailure` and a `RetryInfo`.
    MinuteExhausted,
    /// 429 with a per-day `QuotaFailure`.
    DayExhausted,
    /// 429 with no details.
    Bare429,
    /// 503 a fraction of the time (`FakeConfig::flaky_rate`).
    Flaky,
    /// 503 always.
    Overloaded,
    /// 500 always.
    Internal,
    /// 504 always.
    Deadline,
    /// Answers after `FakeConfig::slow`.
    Slow,
    /// Streams break off half-way.
    CutStream,
}

impl Behaviour {
    /// The behaviour a key's prefix names: `invalid-…`, `suspended-…`, `leaked-…`, `minute-…`, `day-…`,
    /// `bare429-…`, `flaky-…`, `overloaded-…`, `internal-…`, `deadline-…`, `slow-…`, `cut-…`;
    /// anything else is valid.
    pub fn from_key(key: &str) -> Behaviour {
        let prefix = key.split(['-', '_']).next().unwrap_or_default();
        match prefix {
            "invalid" => Behaviour::Invalid,
            "suspended" => Behaviour::Suspended,
            "leaked" => Behaviour::Leaked,
            "minute" => Behaviour::MinuteExhausted,
            "day" => Behaviour::DayExhausted,
            "bare429" => Behaviour::Bare429,
            "flaky" => Behaviour::Flaky,
            "overloaded" => Behaviour::Overloaded,
            "internal" => Behaviour::Internal,
            "deadline" => Behaviour::Deadline,
            "slow" => Behaviour::Slow,
            "cut" => Behaviour::CutStream,
            _ => Behaviour::Valid,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Models per page when the client does not ask for a page size.
    pub page_size: usize,
    /// Chunks per streamed answer.
    pub chunks: usize,
    /// Pause between streamed chunks.
    pub chunk_delay: Duration,
    pub flaky_rate: f64,
    pub slow: Duration,
    /// The `RetryInfo.retryDelay` of per-minute quota errors, in seconds.
    pub retry_delay_s: u64,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            page_size: 5,
            chunks: 3,
            chunk_delay: Duration::ZERO,
            flaky_rate: 0.5,
            slow: Duration::from_secs(2),
            retry_delay_s: 47,
        }
    }
}

/// What one key saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeyStats {
    pub requests: u64,
    /// TCP connections that carried at least one request with this key.
    pub connections: u64,
}

/// One request as the fake received it.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub key: Option<String>,
    #[serde(skip)]
    pub body: Bytes,
    pub body_len: usize,
}

/// The fake's shared state; tests read it directly.
#[derive(Debug, Default)]
pub struct FakeState {
    pub config: FakeConfig,
    overrides: Mutex<HashMap<String, Behaviour>>,
    keys: Mutex<HashMap<String, KeyStats>>,
    connections: AtomicU64,
    received: Mutex<VecDeque<Received>>,
    holds: Mutex<HashMap<String, Arc<Notify>>>,
    /// Bumped to close every open connection (as a server closing idle keep-alives does).
    closer: Mutex<Option<tokio::sync::watch::Sender<u64>>>,
    /// Files API: upload id → (key, display name, mime type); file id → (key, metadata).
    uploads: Mutex<HashMap<String, (String, String, String)>>,
    files: Mutex<HashMap<String, (String, Value)>>,
    /// The bytes of files (and of uploads in progress).
    file_bytes: Mutex<batches::FileBytes>,
    /// Cached contents, owned by projects.
    caches: Mutex<cache::Caches>,
    /// Interactions, owned by projects.
    interactions: Mutex<interactions::Interactions>,
    /// Batches, owned by projects.
    batches: Mutex<batches::Batches>,
    /// Ephemeral tokens → the keys that minted them.
    auth_tokens: Mutex<live::AuthTokens>,
    /// `interactions/<id>` and `batches/<id>` → the key that created it, deleted or not.
    creators: Mutex<store::Store<String, MAX_CREATORS>>,
    quota: Mutex<quota::Quota>,
    throttle: AtomicBool,
    throttled: AtomicU64,
}

const KEEP_RECEIVED: usize = 64;
/// The most creators of interactions and batches remembered.
const MAX_CREATORS: usize = MAX_INTERACTIONS + MAX_BATCHES;
/// The largest body a control call (`/_fake/…`, image hosts aside) may carry.
const CONTROL_BODY_LIMIT: usize = 1 << 20;

impl FakeState {
    pub fn new(config: FakeConfig) -> FakeState {
        FakeState {
            config,
            ..FakeState::default()
        }
    }

    pub fn behaviour(&self, key: &str) -> Behaviour {
        self.overrides
            .lock()
            .unwrap()
            .get(key)
            .copied()
            .unwrap_or_else(|| Behaviour::from_key(key))
    }

    pub fn set_behaviour(&self, key: &str, b: Behaviour) {
        self.overrides.lock().unwrap().insert(key.to_owned(), b);
    }

    pub fn key_stats(&self, key: &str) -> KeyStats {
        self.keys
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    /// Requests per key.
    pub fn requests_by_key(&self) -> HashMap<String, u64> {
        self.keys
            .lock()
            .unwrap()
            .iter()
            .map(|(k, s)| (k.clone(), s.requests))
            .collect()
    }

    pub fn total_requests(&self) -> u64 {
        self.keys.lock().unwrap().values().map(|s| s.requests).sum()
    }

    /// TCP connections accepted (control calls included).
    pub fn connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }

    /// The last requests received, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().iter().cloned().collect()
    }

    pub fn last_received(&self) -> Option<Received> {
        self.received.lock().unwrap().back().cloned()
    }

    /// Lets a held stream send its last chunk.
    pub fn release(&self, name: &str) {
        self.hold(name).notify_one();
    }

    /// Forgets behaviours set at run time, counts and received requests, interactions, batches
    /// and ephemeral tokens; keeps the quota model but empties its windows and counts, and
    /// turns the throttle off. Files (their bytes too) and cached contents stay.
    pub fn reset(&self) {
        self.interactions.lock().unwrap().clear();
        self.batches.lock().unwrap().clear();
        self.auth_tokens.lock().unwrap().clear();
        self.creators.lock().unwrap().clear();
        self.overrides.lock().unwrap().clear();
        self.keys.lock().unwrap().clear();
        self.received.lock().unwrap().clear();
        self.connections.store(0, Relaxed);
        self.quota.lock().unwrap().clear_counts();
        self.throttle.store(false, Relaxed);
        self.throttled.store(0, Relaxed);
    }

    /// Replaces the quota model (its windows and counts start empty) and, if it says so, turns
    /// the throttle on or off. `QuotaModel::default()` lifts every limit. Refused if a key is in
    /// two projects.
    pub fn set_quota(&self, model: QuotaModel) -> Result<(), String> {
        let quota = quota::Quota::new(&model)?;
        *self.quota.lock().unwrap() = quota;
        if let Some(on) = model.throttle {
            self.set_throttle(on);
        }
        Ok(())
    }

    /// While on, every generate or embed call of every key answers a bare 429.
    pub fn set_throttle(&self, on: bool) {
        self.throttle.store(on, Relaxed);
    }

    /// Calls admitted and refused per project, and calls throttled.
    pub fn quota_stats(&self) -> QuotaStats {
        let projects = self.quota.lock().unwrap().stats();
        QuotaStats {
            admitted: projects.values().map(|p| p.admitted).sum(),
            limited: projects.values().map(|p| p.limited).sum(),
            projects,
            throttled: self.throttled.load(Relaxed),
            throttle: self.throttle.load(Relaxed),
        }
    }

    /// Counts a call of `key` to `model` with `tokens` prompt tokens against its project's
    /// limits; the quota 429 if a limit refuses it.
    fn admit(&self, key: &str, model: &str, tokens: usize) -> Option<Response<Body>> {
        let day = quota::pacific_day_now();
        let mut quota = self.quota.lock().unwrap();
        let now = std::time::Instant::now();
        let refused = quota.check(key, model, tokens as u64, now, day).err()?;
        drop(quota);
        Some(quota::refusal_response(&refused))
    }

    /// The key that created cached content `name` (`cachedContents/<id>` or `<id>`), while the
    /// cache lives.
    pub fn cache_owner(&self, name: &str) -> Option<String> {
        self.caches.lock().unwrap().creator(name, cache::now_ns())
    }

    /// The key that created interaction `id` (`v1_…` or `interactions/v1_…`): remembered
    /// after the interaction is deleted or cancelled, until [`FakeState::reset`] (at most
    /// `MAX_INTERACTIONS + MAX_BATCHES` creators of interactions and batches, the oldest
    /// forgotten first). Interactions created with `"store": false` have none.
    pub fn interaction_owner(&self, id: &str) -> Option<String> {
        let id = id.strip_prefix("interactions/").unwrap_or(id);
        self.creator(&format!("interactions/{id}"))
    }

    /// The key that created batch `name` (`batches/<id>` or `<id>`), remembered as
    /// [`FakeState::interaction_owner`] remembers.
    pub fn batch_owner(&self, name: &str) -> Option<String> {
        let id = name.strip_prefix("batches/").unwrap_or(name);
        self.creator(&format!("batches/{id}"))
    }

    /// The key that minted ephemeral token `name` (`auth_tokens/<id>` or `<id>`), until
    /// [`FakeState::reset`].
    pub fn auth_token_owner(&self, name: &str) -> Option<String> {
        let tokens = self.auth_tokens.lock().unwrap();
        match name.strip_prefix("auth_tokens/") {
            Some(_) => tokens.get(name).cloned(),
            None => tokens.get(&format!("auth_tokens/{name}")).cloned(),
        }
    }

    /// [`FakeState::auth_token_owner`], by another name.
    pub fn token_owner(&self, name: &str) -> Option<String> {
        self.auth_token_owner(name)
    }

    fn creator(&self, name: &str) -> Option<String> {
        self.creators.lock().unwrap().get(name).cloned()
    }

    /// Remembers that `key` created `name` (`interactions/<id>`, `batches/<id>`).
    fn created(&self, name: String, key: &str) {
        self.creators.lock().unwrap().insert(name, key.to_owned());
    }

    /// Whether the global throttle refuses a call (then counted).
    fn throttled(&self) -> bool {
        let on = self.throttle.load(Relaxed);
        if on {
            self.throttled.fetch_add(1, Relaxed);
        }
        on
    }

    /// The owner of what `key` creates: its quota-model project, or else the key itself.
    fn owner_of(&self, key: &str) -> cache::Owner {
        match self.quota.lock().unwrap().project_of(key) {
            Some(project) => cache::Owner::Project(project.to_owned()),
            None => cache::Owner::Key(key.to_owned()),
        }
    }

    /// Closes every open connection, idle or not.
    pub fn drop_connections(&self) {
        if let Some(tx) = self.closer.lock().unwrap().as_ref() {
            tx.send_modify(|n| *n += 1);
        }
    }

    fn closed_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        let mut closer = self.closer.lock().unwrap();
        closer
            .get_or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    fn hold(&self, name: &str) -> Arc<Notify> {
        self.holds
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    fn count(&self, key: &str, new_on_connection: bool) {
        let mut keys = self.keys.lock().unwrap();
        let stats = keys.entry(key.to_owned()).or_default();
        stats.requests += 1;
        if new_on_connection {
            stats.connections += 1;
        }
    }
}

/// A running fake upstream.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeUpstream {
    /// Starts on an ephemeral loopback port.
    pub async fn start(config: FakeConfig) -> std::io::Result<FakeUpstream> {
        Self::bind("127.0.0.1:0".parse().expect("literal address"), config).await
    }

    /// Listens on `addr` with an accept queue as deep as a real frontend's: with the default
    /// (128), a gateway opening a few hundred upstream connections at once overflowed it, and
    /// every connection the kernel dropped waited a second for its SYN to be sent again.
    pub async fn bind(addr: SocketAddr, config: FakeConfig) -> std::io::Result<FakeUpstream> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(4096)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(FakeState::new(config));
        let task = tokio::spawn(serve(listener, state.clone()));
        Ok(FakeUpstream { addr, state, task })
    }

    /// The `BASE_URL` that points gemgate here.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1beta", self.addr)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<FakeState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        state.connections.fetch_add(1, Relaxed);
        let state = state.clone();
        let state_closer = state.clone();
        tokio::spawn(async move {
            let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
            let service = service_fn(move |req| {
                let (state, seen) = (state.clone(), seen.clone());
                async move { Ok::<_, Infallible>(handle(state, seen, req).await) }
            });
            let mut closed = state_closer.closed_signal();
            // HTTP/1.1, or HTTP/2 when the connection opens with its preface.
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = closed.changed() => {}
            }
        });
    }
}

/// The host a request was sent to: its `Host` field (HTTP/1.1), or its URI's (HTTP/2).
fn authority(parts: &http::request::Parts) -> String {
    match parts.headers.get("host").and_then(|v| v.to_str().ok()) {
        Some(host) => host.to_owned(),
        None => parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default(),
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(
            Full::new(body.into())
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("valid response")
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    full(status, "application/json; charset=UTF-8", v.to_string())
}

/// Google's error envelope.
fn google_error(code: u16, status: &str, message: &str, details: Value) -> Response<Body> {
    let mut error = json!({ "code": code, "message": message, "status": status });
    if !details.is_null() {
        error["details"] = details;
    }
    json_response(
        StatusCode::from_u16(code).expect("valid status"),
        &json!({ "error": error }),
    )
}

fn quota_error(per: &str, model: &str, retry_delay_s: Option<u64>) -> Response<Body> {
    let mut details = vec![json!({
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": format!("GenerateRequestsPer{per}PerProjectPerModel-FreeTier"),
            "quotaDimensions": { "location": "global", "model": model },
            "quotaValue": "10"
        }]
    })];
    if let Some(s) = retry_delay_s {
        details.push(json!({ "@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": format!("{s}s") }));
    }
    google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
        Value::Array(details),
    )
}

const MODELS: &[(&str, &str, &[&str])] = &[
    (
        "gemini-3-pro-preview",
        "Gemini 3 Pro Preview",
        &["generateContent", "countTokens"],
    ),
    (
        "gemini-3-flash-preview",
        "Gemini 3 Flash Preview",
        &["generateContent", "countTokens"],
    ),
    (
        "gemini-2.5-flash",
        "Gemini 2.5 Flash",
        &["generateContent", "countTokens"],
    ),
    (
        "gemini-2.5-pro",
        "Gemini 2.5 Pro",
        &["generateContent", "countTokens"],
    ),
    (
        "gemini-2.5-flash-lite",
        "Gemini 2.5 Flash-Lite",
        &["generateContent", "countTokens"],
    ),
    (
        "gemini-2.0-flash",
        "Gemini 2.0 Flash",
        &["generateContent", "countTokens"],
    ),
    (
        "gemini-2.0-flash-exp",
        "Gemini 2.0 Flash Experimental",
        &["generateContent", "countTokens"],
    ),
    (
        "gemini-1.5-flash",
        "Gemini 1.5 Flash",
        &["generateContent", "countTokens"],
    ),
    (
        "gemini-1.5-pro",
        "Gemini 1.5 Pro",
        &["generateContent", "countTokens"],
    ),
    (
        "gemini-2.5-flash-preview-tts",
        "Gemini 2.5 Flash TTS",
        &["generateContent"],
    ),
    (
        "gemma-3-27b-it",
        "Gemma 3 27B",
        &["generateContent", "countTokens"],
    ),
    (
        "text-embedding-004",
        "Text Embedding 004",
        &["embedContent", "batchEmbedContents"],
    ),
    (
        "gemini-embedding-001",
        "Gemini Embedding 001",
        &["embedContent", "batchEmbedContents"],
    ),
    ("imagen-3.0-generate-002", "Imagen 3.0", &["predict"]),
    (
        "gemini-2.5-flash-preview-tts",
        "Gemini 2.5 Flash TTS",
        &["generateContent"],
    ),
];

fn model_json(name: &str, display: &str, methods: &[&str]) -> Value {
    json!({
        "name": format!("models/{name}"),
        "version": "001",
        "displayName": display,
        "inputTokenLimit": 1_048_576,
        "outputTokenLimit": 65_536,
        "supportedGenerationMethods": methods,
        "thinking": name.starts_with("gemini-2.5"),
    })
}

fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// What is not under `models/` or `cachedContents/`, in any of `v1`, `v1beta`, `v1alpha`.
enum Extra<'a> {
    /// `interactions[/…]`: what follows `interactions/`, or "".
    Interactions(&'a str),
    /// `batches[/…]`: what follows `batches/`, or "".
    Batches(&'a str),
    AuthTokens,
    /// The Live API's WebSocket, constrained (ephemeral tokens) or not.
    Live,
}

fn extra_route(path: &str) -> Option<Extra<'_>> {
    if live::ws_kind(path).is_some() {
        return Some(Extra::Live);
    }
    let rest = ["/v1beta/", "/v1/", "/v1alpha/"]
        .iter()
        .find_map(|p| path.strip_prefix(p))?;
    let sub = |name: &str| match rest.strip_prefix(name)? {
        "" => Some(""),
        r => r.strip_prefix('/'),
    };
    if let Some(r) = sub("interactions") {
        return Some(Extra::Interactions(r));
    }
    if let Some(r) = sub("batches") {
        return Some(Extra::Batches(r));
    }
    (rest == "auth_tokens").then_some(Extra::AuthTokens)
}

async fn handle(
    state: Arc<FakeState>,
    seen: Arc<Mutex<HashSet<String>>>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let ws = live::ws_kind(req.uri().path());
    let on_upgrade = ws.map(|_| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let control =
        parts.uri.path().starts_with("/_fake/") && !parts.uri.path().starts_with("/_fake/upload/");
    let body = if control {
        match http_body_util::Limited::new(body, CONTROL_BODY_LIMIT)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return full(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "text/plain",
                    "body too large",
                );
            }
            Err(_) => return full(StatusCode::BAD_REQUEST, "text/plain", "unreadable body"),
        }
    } else {
        match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return full(StatusCode::BAD_REQUEST, "text/plain", "unreadable body"),
        }
    };
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    if let Some(control) = path.strip_prefix("/_fake/") {
        if let Some(host) = control.strip_prefix("upload/") {
            return image_host(&state, host, &parts, &query, &body);
        }
        if control.starts_with("files/") {
            let png =
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, TINY_PNG_BASE64)
                    .unwrap_or_default();
            return full(StatusCode::OK, "image/png", png);
        }
        return control_call(&state, &parts.method, control, &body);
    }
    // The constrained Live API takes an ephemeral token, which stands for the key that minted it.
    let token = (ws == Some(true)).then(|| live::token_of(&parts.headers, &query));
    let key = match &token {
        Some(token) => token.as_deref().and_then(|t| state.auth_token_owner(t)),
        None => parts
            .headers
            .get("x-goog-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| query_value(&query, "key").map(str::to_owned))
            .or_else(|| {
                // Google's OpenAI-compatible API takes the key as a bearer token.
                let auth = parts.headers.get("authorization")?.to_str().ok()?;
                auth.strip_prefix("Bearer ").map(str::to_owned)
            }),
    };
    {
        let mut received = state.received.lock().unwrap();
        if received.len() == KEEP_RECEIVED {
            received.pop_front();
        }
        received.push_back(Received {
            version: format!("{:?}", parts.version),
            method: parts.method.to_string(),
            path: path.clone(),
            query: query.clone(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            key: key.clone(),
            body_len: body.len(),
            body: body.clone(),
        });
    }
    let Some(key) = key else {
        if token.is_some() {
            return google_error(
                403,
                "PERMISSION_DENIED",
                "The auth token is not valid, or it expired.",
                Value::Null,
            );
        }
        return google_error(
            403,
            "PERMISSION_DENIED",
            "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
            Value::Null,
        );
    };
    let first_on_connection = seen.lock().unwrap().insert(key.clone());
    state.count(&key, first_on_connection);

    let authority = authority(&parts);
    if path == "/upload/v1beta/files" {
        return upload(&state, &key, &parts.headers, &query, &body, &authority);
    }
    // Downloads: `/download/v1beta/files/{id}:download` and `/v1beta/files/{id}:download`.
    if let Some(id) = path
        .strip_prefix("/download/v1beta/files/")
        .or_else(|| path.strip_prefix("/v1beta/files/"))
        .and_then(|r| r.strip_suffix(":download"))
    {
        if parts.method != http::Method::GET {
            return google_error(405, "UNIMPLEMENTED", "Method not allowed", Value::Null);
        }
        return batches::download(&state, &key, id);
    }
    if let Some(rest) = path.strip_prefix("/v1beta/files") {
        return files_call(&state, &key, &parts.method, rest.trim_start_matches('/'));
    }

    let extra = extra_route(&path);
    // Vertex AI express mode: `/v1/publishers/google/models/{model}:{action}`, the same calls.
    let vertex = path
        .strip_prefix("/v1/publishers/google/")
        .filter(|r| r.starts_with("models/"));
    let rest = match (&extra, vertex.or_else(|| path.strip_prefix("/v1beta/"))) {
        (Some(_), _) => "",
        (None, Some(rest)) => rest,
        (None, None) => {
            return google_error(
                404,
                "NOT_FOUND",
                &format!("{path} is not found"),
                Value::Null,
            );
        }
    };
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let Some(call) = rest.strip_prefix("openai/") {
        if state.behaviour(&key) == Behaviour::Invalid {
            return openai_error(400, "API key not valid. Please pass a valid API key.");
        }
        return openai_compat(call, &body);
    }
    // `cachedContents` or `cachedContents/{id}`: the id, or "" for the collection.
    let cache_id = rest.strip_prefix("cachedContents").and_then(|r| match r {
        "" => Some(""),
        r => r.strip_prefix('/'),
    });
    let (model, action) = match rest.strip_prefix("models/") {
        _ if cache_id.is_some() || extra.is_some() => (String::new(), None),
        Some(name) => match name.split_once(':') {
            Some((m, a)) => (m.to_owned(), Some(a.to_owned())),
            None => (name.to_owned(), None),
        },
        None if rest == "models" => (String::new(), None),
        None => {
            return google_error(
                404,
                "NOT_FOUND",
                &format!("{path} is not found"),
                Value::Null,
            );
        }
    };

    if let Some(refused) = fake_error(&parts.headers) {
        return refused;
    }
    // The global throttle answers every generate or embed call, whatever the key.
    let limited_call = matches!(
        action.as_deref(),
        Some("generateContent" | "streamGenerateContent" | "embedContent" | "batchEmbedContents")
    );
    if limited_call && state.throttled() {
        return bare_429();
    }
    if let Some(refused) = key_refusal(&state, &key, &model).await {
        return refused;
    }
    let behaviour = state.behaviour(&key);

    match extra {
        Some(Extra::Live) => return live::upgrade(state.clone(), &parts, on_upgrade),
        Some(Extra::AuthTokens) => return live::mint(&state, &key, &parts.method, &body),
        Some(Extra::Interactions(rest)) => {
            return interactions::call(&state, &key, &parts.method, rest, &query, &body);
        }
        Some(Extra::Batches(rest)) => {
            return batches::call(&state, &key, &parts.method, rest, &query);
        }
        None => {}
    }

    if let Some(id) = cache_id {
        return cache::call(&state, &key, &parts.method, id, &query, &body);
    }
    if model.is_empty() {
        return list_models(&state, &query);
    }
    let Some(&(name, display, methods)) = MODELS.iter().find(|(n, ..)| *n == model) else {
        let what = action.as_deref().unwrap_or("generateContent");
        return google_error(
            404,
            "NOT_FOUND",
            &format!(
                "models/{model} is not found for API version v1beta, or is not supported for {what}. Call ListModels to see the list of available models and their supported methods."
            ),
            Value::Null,
        );
    };
    let Some(action) = action else {
        return json_response(StatusCode::OK, &model_json(name, display, methods));
    };
    if parts.method != http::Method::POST {
        return google_error(405, "UNIMPLEMENTED", "Method not allowed", Value::Null);
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return google_error(
                400,
                "INVALID_ARGUMENT",
                &format!("Invalid JSON payload received. {e}"),
                Value::Null,
            );
        }
    };
    match action.as_str() {
        "generateContent" | "streamGenerateContent" => {
            let Some(contents) = request
                .get("contents")
                .and_then(Value::as_array)
                .filter(|c| !c.is_empty())
            else {
                return google_error(
                    400,
                    "INVALID_ARGUMENT",
                    "* GenerateContentRequest.contents: contents is not specified\n",
                    Value::Null,
                );
            };
            if let Some(refused) = foreign_file(&state, &key, contents) {
                return refused;
            }
            if let Some(refused) = gemini_3_rules(&model, &request, contents) {
                return refused;
            }
            // A cache belongs to the project of the key that created it, as at Google.
            let cached = match cache::tokens_for(&state, &key, &request) {
                Ok(n) => n,
                Err(refused) => return *refused,
            };
            let prompt = last_text(contents);
            if let Some(refused) = state.admit(&key, &model, words(&prompt)) {
                return refused;
            }
            let usage = Usage {
                prompt: words(&prompt) + cached,
                cached,
            };
            if let Some(call) = function_call(&request, contents) {
                let mut resp = content_response(&model, "", true, usage, 1);
                resp["candidates"][0]["content"]["parts"] = json!([call]);
                if action == "generateContent" {
                    return json_response(StatusCode::OK, &resp);
                }
                return full(
                    StatusCode::OK,
                    "text/event-stream",
                    format!("data: {resp}\r\n\r\n"),
                );
            }
            let wants_audio = request
                .pointer("/generationConfig/responseModalities")
                .and_then(Value::as_array)
                .is_some_and(|m| m.iter().any(|v| v == "AUDIO"));
            if wants_audio {
                // 0.05 s of a 24 kHz, 16-bit sawtooth.
                let pcm: Vec<u8> = (0..1200u32)
                    .flat_map(|i| (((i % 24) as i16 - 12) * 1000).to_le_bytes())
                    .collect();
                let data = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pcm);
                let mut resp = content_response(&model, "", true, usage, 0);
                resp["candidates"][0]["content"]["parts"] = json!([{
                    "inlineData": { "mimeType": "audio/L16;codec=pcm;rate=24000", "data": data }
                }]);
                return json_response(StatusCode::OK, &resp);
            }
            let answer = format!("echo: {prompt}");
            if action == "generateContent" {
                let resp = content_response(&model, &answer, true, usage, words(&answer));
                return json_response(StatusCode::OK, &resp);
            }
            let chunks = header("x-fake-chunks")
                .map_or(state.config.chunks, |n| n as usize)
                .max(1);
            let delay =
                header("x-fake-delay-ms").map_or(state.config.chunk_delay, Duration::from_millis);
            let hold = parts
                .headers
                .get("x-fake-hold")
                .and_then(|v| v.to_str().ok())
                .map(|n| state.hold(n));
            let sse = query_value(&query, "alt") == Some("sse");
            let cut = behaviour == Behaviour::CutStream;
            stream_response(model, usage, answer, chunks, delay, hold, sse, cut)
        }
        "countTokens" => {
            // `contents`, or a whole `generateContentRequest`, as Google takes either.
            let n = request
                .get("contents")
                .or_else(|| request.pointer("/generateContentRequest/contents"))
                .and_then(Value::as_array)
                .map_or(0, |c| {
                    c.iter().map(|c| words(&parts_text(c))).sum::<usize>()
                });
            json_response(StatusCode::OK, &json!({ "totalTokens": n }))
        }
        "embedContent" => {
            let dims = request
                .get("outputDimensionality")
                .and_then(Value::as_u64)
                .unwrap_or(8) as usize;
            let text = request.get("content").map(parts_text).unwrap_or_default();
            if let Some(refused) = state.admit(&key, &model, words(&text)) {
                return refused;
            }
            json_response(
                StatusCode::OK,
                &json!({ "embedding": { "values": embedding(&text, dims) } }),
            )
        }
        "batchEmbedContents" => {
            let Some(requests) = request.get("requests").and_then(Value::as_array) else {
                return google_error(
                    400,
                    "INVALID_ARGUMENT",
                    "* BatchEmbedContentsRequest.requests: requests is not specified\n",
                    Value::Null,
                );
            };
            let tokens = requests
                .iter()
                .map(|r| words(&r.get("content").map(parts_text).unwrap_or_default()))
                .sum();
            if let Some(refused) = state.admit(&key, &model, tokens) {
                return refused;
            }
            let embeddings: Vec<Value> = requests
                .iter()
                .map(|r| {
                    let dims = r.get("outputDimensionality").and_then(Value::as_u64).unwrap_or(8) as usize;
                    json!({ "values": embedding(&r.get("content").map(parts_text).unwrap_or_default(), dims) })
                })
                .collect();
            json_response(StatusCode::OK, &json!({ "embeddings": embeddings }))
        }
        "batchGenerateContent" => batches::create(&state, &key, &model, &request),
        "predict" => {
            let n = request
                .pointer("/parameters/sampleCount")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .clamp(1, 8);
            let predictions: Vec<Value> = (0..n)
                .map(|_| json!({ "bytesBase64Encoded": TINY_PNG_BASE64, "mimeType": "image/png" }))
                .collect();
            json_response(StatusCode::OK, &json!({ "predictions": predictions }))
        }
        other => google_error(
            404,
            "NOT_FOUND",
            &format!("Method {other} is not found"),
            Value::Null,
        ),
    }
}

/// `x-fake-error: 403 REASON` answers this one request with that error (ErrorInfo reason
/// included), whatever the key: a key fault the request provokes, not the key. A status
/// that is not one (outside 100–999) reads as 400.
fn fake_error(headers: &http::HeaderMap) -> Option<Response<Body>> {
    let (code, reason) = headers
        .get("x-fake-error")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))?;
    let code: u16 = code
        .parse()
        .ok()
        .filter(|c| (100..1000).contains(c))
        .unwrap_or(400);
    let status = grpc_status(code);
    Some(google_error(
        code,
        status,
        &format!("refused: {reason}"),
        json!([{ "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "googleapis.com" }]),
    ))
}

/// What the behaviour of `key` answers a call about `model` with (`None`: serve it, after
/// the slow key's pause).
async fn key_refusal(state: &FakeState, key: &str, model: &str) -> Option<Response<Body>> {
    let refusal = match state.behaviour(key) {
        Behaviour::Invalid => google_error(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            json!([{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com", "metadata": { "service": "generativelanguage.googleapis.com" }
            }]),
        ),
        Behaviour::Leaked => google_error(
            403,
            "PERMISSION_DENIED",
            "Your API key was reported as leaked. Please use another API key.",
            json!([]),
        ),
        Behaviour::Suspended => google_error(
            403,
            "PERMISSION_DENIED",
            &format!("Permission denied: Consumer 'api_key:{key}' has been suspended."),
            json!([{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "CONSUMER_SUSPENDED", "domain": "googleapis.com"
            }]),
        ),
        Behaviour::MinuteExhausted => {
            quota_error("Minute", model, Some(state.config.retry_delay_s))
        }
        Behaviour::DayExhausted => quota_error("Day", model, None),
        Behaviour::Bare429 => bare_429(),
        Behaviour::Overloaded => overloaded(),
        Behaviour::Internal => google_error(
            500,
            "INTERNAL",
            "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
            Value::Null,
        ),
        Behaviour::Deadline => google_error(
            504,
            "DEADLINE_EXCEEDED",
            "Deadline expired before operation could complete.",
            Value::Null,
        ),
        Behaviour::Flaky if fastrand::f64() < state.config.flaky_rate => overloaded(),
        Behaviour::Slow => {
            tokio::time::sleep(state.config.slow).await;
            return None;
        }
        _ => return None,
    };
    Some(refusal)
}

/// A streamed body that sends `frames`, then breaks the connection off (no end of stream).
fn broken_stream(frames: Vec<Bytes>) -> Response<Body> {
    let (tx, rx) = mpsc::channel(frames.len().max(1));
    tokio::spawn(async move {
        for frame in frames {
            if tx.send(Ok(frame)).await.is_err() {
                return;
            }
        }
        // Let hyper write out what was sent before breaking the connection off.
        while tx.capacity() < tx.max_capacity() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = tx
            .send(Err(std::io::Error::other("broken on purpose")))
            .await;
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .body(BodyExt::boxed(ChannelBody(rx)))
        .expect("valid response")
}

/// A 429 with no details, as Google answers when it sheds load.
fn bare_429() -> Response<Body> {
    google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "Resource has been exhausted (e.g. check quota).",
        Value::Null,
    )
}

fn overloaded() -> Response<Body> {
    google_error(
        503,
        "UNAVAILABLE",
        "The model is overloaded. Please try again later.",
        Value::Null,
    )
}

/// A 1×1 transparent PNG.
const TINY_PNG_BASE64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

fn list_models(state: &FakeState, query: &str) -> Response<Body> {
    let size = query_value(query, "pageSize")
        .and_then(|s| s.parse().ok())
        .unwrap_or(state.config.page_size)
        .clamp(1, 1000);
    let start: usize = query_value(query, "pageToken")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let page: Vec<Value> = MODELS
        .iter()
        .skip(start)
        .take(size)
        .map(|(n, d, m)| model_json(n, d, m))
        .collect();
    let mut body = json!({ "models": page });
    if start + size < MODELS.len() {
        body["nextPageToken"] = json!((start + size).to_string());
    }
    json_response(StatusCode::OK, &body)
}

fn parts_text(content: &Value) -> String {
    content
        .get("parts")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn last_text(contents: &[Value]) -> String {
    let Some(last) = contents.last() else {
        return String::new();
    };
    // A function's result is answered by echoing it.
    let results: Vec<String> = last["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("functionResponse"))
        .map(|r| {
            format!(
                "{} returned {}",
                r["name"].as_str().unwrap_or("?"),
                r["response"]
            )
        })
        .collect();
    if results.is_empty() {
        parts_text(last)
    } else {
        results.join("; ")
    }
}

/// The `fileData.fileUri`s of a request's contents.
fn file_uris(contents: &[Value]) -> Vec<String> {
    contents
        .iter()
        .filter_map(|c| c["parts"].as_array())
        .flatten()
        .filter_map(|p| p.pointer("/fileData/fileUri")?.as_str().map(str::to_owned))
        .collect()
}

/// Google's 403 if `contents` name a file (`fileData.fileUri`) that is not `key`'s: a file
/// belongs to the key that uploaded it, as at Google.
fn foreign_file(state: &FakeState, key: &str, contents: &[Value]) -> Option<Response<Body>> {
    let files = state.files.lock().unwrap();
    file_uris(contents).into_iter().find_map(|uri| {
        let id = uri.rsplit("/files/").next().unwrap_or_default();
        let owned = files.get(id).is_some_and(|(k, _)| k == key);
        (!owned).then(|| {
            google_error(
                403,
                "PERMISSION_DENIED",
                &format!("You do not have permission to access the File {id} or it may not exist."),
                Value::Null,
            )
        })
    })
}

/// The resumable upload protocol of the Files API: `start` answers with an upload URL (on this
/// server); `upload, finalize` with the same key stores the file.
fn upload(
    state: &FakeState,
    key: &str,
    headers: &http::HeaderMap,
    query: &str,
    body: &[u8],
    authority: &str,
) -> Response<Body> {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let command = header("x-goog-upload-command");
    if command == "start" {
        let id = format!("up{:08x}", fastrand::u32(..));
        let meta: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let name = meta
            .pointer("/file/display_name")
            .or_else(|| meta.pointer("/file/displayName"))
            .and_then(Value::as_str)
            .unwrap_or("file")
            .to_owned();
        let mime = header("x-goog-upload-header-content-type").to_owned();
        state
            .uploads
            .lock()
            .unwrap()
            .insert(id.clone(), (key.to_owned(), name, mime));
        let mut resp = full(StatusCode::OK, "text/plain", Bytes::new());
        let url = format!(
            "http://{authority}/upload/v1beta/files?upload_id={id}&upload_protocol=resumable"
        );
        resp.headers_mut()
            .insert("x-goog-upload-url", url.parse().expect("a header value"));
        resp.headers_mut().insert(
            "x-goog-upload-status",
            http::HeaderValue::from_static("active"),
        );
        return resp;
    }
    let Some(id) = query_value(query, "upload_id") else {
        return google_error(400, "INVALID_ARGUMENT", "no upload_id", Value::Null);
    };
    let Some((owner, name, mime)) = state.uploads.lock().unwrap().get(id).cloned() else {
        return google_error(404, "NOT_FOUND", "no such upload", Value::Null);
    };
    if owner != key {
        return google_error(
            403,
            "PERMISSION_DENIED",
            "The upload belongs to another API key.",
            Value::Null,
        );
    }
    // As Google does, say whether the upload is still open or done.
    if !command.contains("finalize") {
        if command.contains("upload") {
            state.file_bytes.lock().unwrap().append(id, body);
        }
        let mut resp = json_response(StatusCode::OK, &json!({}));
        resp.headers_mut().insert(
            "x-goog-upload-status",
            http::HeaderValue::from_static("active"),
        );
        return resp;
    }
    let (size, data) = state.file_bytes.lock().unwrap().finish(id, body);
    let file_id = format!("f{:08x}", fastrand::u32(..));
    let file = json!({
        "name": format!("files/{file_id}"),
        "displayName": name,
        "mimeType": mime,
        "sizeBytes": size.to_string(),
        "uri": format!("http://{authority}/v1beta/files/{file_id}"),
        "state": "ACTIVE",
        "expirationTime": "2099-01-01T00:00:00Z",
    });
    if let Some(data) = data {
        state.file_bytes.lock().unwrap().keep(&file_id, data);
    }
    state
        .files
        .lock()
        .unwrap()
        .insert(file_id, (key.to_owned(), file.clone()));
    let mut resp = json_response(StatusCode::OK, &json!({ "file": file }));
    resp.headers_mut().insert(
        "x-goog-upload-status",
        http::HeaderValue::from_static("final"),
    );
    resp
}

/// `GET files`, `GET files/{id}`, `DELETE files/{id}`: each key sees only its own files.
fn files_call(state: &FakeState, key: &str, method: &http::Method, id: &str) -> Response<Body> {
    let mut files = state.files.lock().unwrap();
    if id.is_empty() {
        let mine: Vec<Value> = files
            .values()
            .filter(|(k, _)| k == key)
            .map(|(_, f)| f.clone())
            .collect();
        return json_response(StatusCode::OK, &json!({ "files": mine }));
    }
    let owned = files.get(id).is_some_and(|(k, _)| k == key);
    if !owned {
        return google_error(
            403,
            "PERMISSION_DENIED",
            &format!("You do not have permission to access the File {id} or it may not exist."),
            Value::Null,
        );
    }
    if *method == http::Method::DELETE {
        files.remove(id);
        state.file_bytes.lock().unwrap().forget(id);
        return json_response(StatusCode::OK, &json!({}));
    }
    json_response(StatusCode::OK, &files[id].1)
}

/// With function declarations and a user turn that is not a function's result, the model calls
/// the first declared function with `{"query": <the prompt>}` (and a base64 thought signature,
/// as Google sends one).
fn function_call(request: &Value, contents: &[Value]) -> Option<Value> {
    let decl = request.pointer("/tools/0/functionDeclarations/0")?;
    let last = contents.last()?;
    let answering = last["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p.get("functionResponse").is_some());
    if answering
        || request.pointer("/toolConfig/functionCallingConfig/mode") == Some(&json!("NONE"))
    {
        return None;
    }
    Some(json!({
        "functionCall": { "name": decl["name"], "args": { "query": parts_text(last) } },
        "thoughtSignature": "ZmFrZS1zaWduYXR1cmU=",
    }))
}

fn openai_error(status: u16, message: &str) -> Response<Body> {
    let body =
        json!([{ "error": { "code": status, "message": message, "status": "INVALID_ARGUMENT" } }]);
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        &body,
    )
}

/// What Gemini 3 refuses that older models take: a model turn whose first function call lost
/// its thought signature, and a thinking config with both a level and a budget.
fn gemini_3_rules(model: &str, request: &Value, contents: &[Value]) -> Option<Response<Body>> {
    let thinking = request.pointer("/generationConfig/thinkingConfig");
    if thinking
        .is_some_and(|t| t.get("thinkingLevel").is_some() && t.get("thinkingBudget").is_some())
    {
        return Some(google_error(
            400,
            "INVALID_ARGUMENT",
            "You can only set only one of thinking budget and thinking level.",
            Value::Null,
        ));
    }
    if !model.starts_with("gemini-3") {
        return None;
    }
    for (i, turn) in contents.iter().enumerate() {
        if turn["role"] != "model" {
            continue;
        }
        let first_call = turn["parts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p.get("functionCall").is_some());
        if first_call.is_some_and(|p| p.get("thoughtSignature").is_none()) {
            return Some(google_error(
                400,
                "INVALID_ARGUMENT",
                &format!(
                    "Function call is missing a thought_signature in functionCall parts. This is required for tools to work correctly, and missing thought_signature may lead to degraded model performance. Additional data, function call `default_api:f` , position {}. Please refer to https://ai.google.dev/gemini-api/docs/thought-signatures for more details.",
                    i + 1
                ),
                Value::Null,
            ));
        }
    }
    None
}

/// Google's OpenAI-compatible API (`/v1beta/openai/...`), in brief: models and chat
/// completions (whole or streamed), answering `echo: <last user text>`.
fn openai_compat(call: &str, body: &[u8]) -> Response<Body> {
    match call {
        "models" => json_response(
            StatusCode::OK,
            &json!({ "object": "list", "data": MODELS.iter().map(|(n, ..)| json!({ "id": format!("models/{n}"), "object": "model", "owned_by": "google" })).collect::<Vec<_>>() }),
        ),
        "chat/completions" => {
            let Ok(req) = serde_json::from_slice::<Value>(body) else {
                return openai_error(400, "Invalid JSON payload received.");
            };
            let model = req["model"].as_str().unwrap_or_default().to_owned();
            let prompt = req["messages"]
                .as_array()
                .and_then(|m| m.last())
                .and_then(|m| m["content"].as_str())
                .unwrap_or_default();
            let answer = format!("echo: {prompt}");
            if req["stream"].as_bool() == Some(true) {
                let mut out = String::new();
                for (i, word) in answer.split_inclusive(' ').enumerate() {
                    let finish = if i + 1 == answer.split_inclusive(' ').count() {
                        json!("stop")
                    } else {
                        Value::Null
                    };
                    let chunk = json!({ "id": "fake-chat", "object": "chat.completion.chunk", "model": model, "choices": [{ "index": 0, "delta": { "role": "assistant", "content": word }, "finish_reason": finish }] });
                    out.push_str(&format!("data: {chunk}\n\n"));
                }
                out.push_str("data: [DONE]\n\n");
                return full(StatusCode::OK, "text/event-stream", out);
            }
            json_response(
                StatusCode::OK,
                &json!({ "id": "fake-chat", "object": "chat.completion", "model": model, "created": 0,
                         "choices": [{ "index": 0, "message": { "role": "assistant", "content": answer }, "finish_reason": "stop" }],
                         "usage": { "prompt_tokens": words(prompt), "completion_tokens": words(&answer), "total_tokens": words(prompt) + words(&answer) } }),
            )
        }
        _ => openai_error(404, &format!("openai/{call} is not found")),
    }
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

fn embedding(text: &str, dims: usize) -> Vec<f64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    (0..dims.min(4096))
        .map(|i| {
            let x = h.rotate_left(i as u32 % 64) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            ((x % 2000) as f64 / 1000.0) - 1.0
        })
        .collect()
}

/// The prompt's tokens of a generation: all of them, and those of them a cache served.
#[derive(Debug, Clone, Copy)]
struct Usage {
    prompt: usize,
    cached: usize,
}

fn content_response(model: &str, text: &str, last: bool, usage: Usage, out_tokens: usize) -> Value {
    let mut candidate =
        json!({ "content": { "role": "model", "parts": [{ "text": text }] }, "index": 0 });
    let mut resp = json!({ "candidates": [], "modelVersion": model, "responseId": format!("fake-{:08x}", fastrand::u32(..)) });
    if last {
        candidate["finishReason"] = json!("STOP");
        resp["usageMetadata"] = json!({
            "promptTokenCount": usage.prompt,
            "candidatesTokenCount": out_tokens,
            "totalTokenCount": usage.prompt + out_tokens,
        });
        if usage.cached > 0 {
            resp["usageMetadata"]["cachedContentTokenCount"] = json!(usage.cached);
        }
    }
    resp["candidates"] = json!([candidate]);
    resp
}

/// A streamed body fed through a channel; an `Err` item breaks the connection off.
struct ChannelBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(Frame::data)))
    }
}

#[allow(clippy::too_many_arguments)]
fn stream_response(
    model: String,
    usage: Usage,
    answer: String,
    chunks: usize,
    delay: Duration,
    hold: Option<Arc<Notify>>,
    sse: bool,
    cut: bool,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let chars: Vec<char> = answer.chars().collect();
        let per = chars.len().div_ceil(chunks).max(1);
        let pieces: Vec<String> = chars.chunks(per).map(|c| c.iter().collect()).collect();
        let n = pieces.len();
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if cut && i >= n / 2 {
                // Let hyper write out what was sent before breaking the connection off.
                while tx.capacity() < tx.max_capacity() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tx.send(Err(std::io::Error::other("cut"))).await;
                return;
            }
            let last = i + 1 == n;
            if last && let Some(hold) = &hold {
                let _ = tokio::time::timeout(Duration::from_secs(30), hold.notified()).await;
            }
            let event = content_response(&model, piece, last, usage, words(&answer)).to_string();
            let frame = match (sse, i, last) {
                (true, ..) => format!("data: {event}\r\n\r\n"),
                (false, 0, true) => format!("[{event}]"),
                (false, 0, false) => format!("[{event}"),
                (false, _, true) => format!(",\r\n{event}]"),
                (false, _, false) => format!(",\r\n{event}"),
            };
            if tx.send(Ok(Bytes::from(frame))).await.is_err() {
                return;
            }
        }
    });
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/json; charset=UTF-8"
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content_type)
        .body(BodyExt::boxed(ChannelBody(rx)))
        .expect("valid response")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetThrottle {
    on: bool,
}

/// `POST /_fake/quota`: a body with only `throttle` turns the throttle on or off; any other
/// body replaces the quota model (`{}` lifts every limit).
fn post_quota(state: &FakeState, body: &[u8]) -> Result<(), String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let Some(fields) = value.as_object() else {
        return Err("the body is not a JSON object".to_owned());
    };
    let model: QuotaModel = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    match model.throttle {
        Some(on) if fields.len() == 1 => {
            state.set_throttle(on);
            Ok(())
        }
        _ => state.set_quota(model),
    }
}

#[derive(Deserialize)]
struct SetBehaviour {
    key: String,
    behaviour: Behaviour,
}

/// Fake image hosts, each answering in its real counterpart's shape: `smms` (SM.MS, token in
/// `Authorization`), `picgo` (PicGo, `X-API-Key`), `imgbed` (Cloudflare ImgBed, `authCode` in
/// the query). Uploads are counted in the stats as key `upload:<host>`.
fn image_host(
    state: &FakeState,
    host: &str,
    parts: &http::request::Parts,
    query: &str,
    body: &[u8],
) -> Response<Body> {
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let authority = authority(parts);
    let field_present = |field: &str| {
        let needle = format!("name=\"{field}\"");
        memchr::memmem::find(body, needle.as_bytes()).is_some()
    };
    state.count(&format!("upload:{host}"), false);
    let n = fastrand::u32(..);
    let url = format!("http://{authority}/_fake/files/{n:08x}.png");
    match host {
        "smms" if header("authorization") == "smms-token" && field_present("smfile") => {
            json_response(
                StatusCode::OK,
                &json!({ "success": true, "code": "success", "data": { "url": url } }),
            )
        }
        "picgo" if header("x-api-key") == "picgo-key" && field_present("source") => json_response(
            StatusCode::OK,
            &json!({ "status_code": 200, "image": { "url": url } }),
        ),
        "imgbed"
            if query_value(query, "authCode") == Some("imgbed-code") && field_present("file") =>
        {
            json_response(
                StatusCode::OK,
                &json!([{ "src": format!("/_fake/files/{n:08x}.png") }]),
            )
        }
        _ => json_response(
            StatusCode::UNAUTHORIZED,
            &json!({ "success": false, "message": "bad credentials or form" }),
        ),
    }
}

fn control_call(
    state: &FakeState,
    method: &http::Method,
    call: &str,
    body: &[u8],
) -> Response<Body> {
    match (method.as_str(), call) {
        ("GET", "stats") => {
            let keys = state.keys.lock().unwrap().clone();
            json_response(
                StatusCode::OK,
                &json!({ "connections": state.connections(), "keys": keys }),
            )
        }
        ("GET", "requests") => json_response(StatusCode::OK, &json!(state.received())),
        ("POST", "behaviour") => match serde_json::from_slice::<SetBehaviour>(body) {
            Ok(b) => {
                state.set_behaviour(&b.key, b.behaviour);
                json_response(StatusCode::OK, &json!({ "ok": true }))
            }
            Err(e) => json_response(StatusCode::BAD_REQUEST, &json!({ "error": e.to_string() })),
        },
        ("GET", "quota") => json_response(StatusCode::OK, &json!(state.quota_stats())),
        ("POST", "quota") => match post_quota(state, body) {
            Ok(()) => json_response(StatusCode::OK, &json!({ "ok": true })),
            Err(e) => json_response(StatusCode::BAD_REQUEST, &json!({ "error": e })),
        },
        ("POST", "throttle") => match serde_json::from_slice::<SetThrottle>(body) {
            Ok(t) => {
                state.set_throttle(t.on);
                json_response(StatusCode::OK, &json!({ "ok": true }))
            }
            Err(e) => json_response(StatusCode::BAD_REQUEST, &json!({ "error": e.to_string() })),
        },
        ("POST", "reset") => {
            state.reset();
            json_response(StatusCode::OK, &json!({ "ok": true }))
        }
        ("POST", name) if name.starts_with("release/") => {
            state.release(&name["release/".len()..]);
            json_response(StatusCode::OK, &json!({ "ok": true }))
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({ "error": "unknown control call" }),
        ),
    }
}

/// The `status` word Google's error bodies carry for an HTTP status.
fn grpc_status(http: u16) -> &'static str {
    match http {
        400 | 413 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 | 501 => "UNIMPLEMENTED",
        408 | 504 => "DEADLINE_EXCEEDED",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        502 | 503 => "UNAVAILABLE",
        _ => "INTERNAL",
    }
}

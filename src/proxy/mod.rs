//! The request path of a routed call: authenticate, ask the `on_request` plugins, read the
//! body, then gemgate's own attempt loop (`attempt`) over pooled upstream connections,
//! relaying the answer chunk by chunk (`relay`). The native API is here; the OpenAI routes
//! are `openai`, the Files API `files`.
//!
//! Handlers take the request's `Exchange` (its record); everything below them reads its
//! `Meta` and returns what it did.
//!
//! The attempt loop is ours rather than pingora's `ProxyHttp` retry because a retry decision
//! needs the error's *body* (DESIGN.md, "Errors from Gemini"), and a retry must resend a body of
//! any size.

mod answer;
mod anthropic;
mod attempt;
mod batches;
pub mod caches;
pub mod calls;
pub mod exchange;
pub mod files;
mod interactions;
pub(crate) mod live;
mod openai;
mod owned;
mod relay;
mod request;
mod responses;

use crate::app::shared::{Admission, LimitCheck};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora::connectors::TransportConnector;
use pingora::http::RequestHeader;
use pingora::protocols::http::ServerSession;

pub(crate) use answer::{response_header, response_parts_with_room, send, send_gate, write_full};
use exchange::{Class, Exchange, Meta, X_GEMGATE_ADMIN, X_GEMGATE_TRACE};
use relay::{Raw, Reframe, SseEvents};
use request::{client_query, rewrite_body, rewrite_value, upstream_header};
pub(crate) use request::{encode_query_value, read_body};

use crate::app::{Generation, State};
use crate::clock::now_ms;
use crate::http::auth;
use crate::http::peer::Peer;
use crate::http::reply::{GateError, Protocol};
use crate::keys::taxonomy::ErrorClass;
use crate::keys::{KeyPool, seconds_until};
use crate::policy::engine::{Denial, RequestInfo, Rewrite};
pub(crate) use crate::store::logs::Surface;
use calls::NativeCall;

/// Header names gemgate reads or writes on every request, made once instead of parsed per use.
pub(crate) const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");
/// How long an oversized request body is drained after its 413.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request target (path and query) gemgate reads; longer ones get 414.
pub(crate) const MAX_TARGET: usize = 8 * 1024;
/// Upper bound on model-list pages walked for one request.
const MAX_MODEL_PAGES: usize = 50;

/// The actions a Vertex AI express key serves (`models/{model}:{action}`).
fn vertex_serves(action: &str) -> bool {
    matches!(
        action,
        "generateContent" | "streamGenerateContent" | "countTokens" | "embedContent"
    )
}

impl Generation {
    /// Where key `key` is called: Vertex AI's base URL for a Vertex AI express key.
    fn target_of(&self, key: &crate::keys::Key) -> &Arc<crate::upstream::Target> {
        match &self.vertex {
            Some(vertex) if key.spec.vertex => vertex,
            _ => &self.target,
        }
    }

    /// The keys an upstream request may use: `PAID_KEY` for paid calls when it is set, else
    /// the pool.
    fn pool_for(&self, req: &UpstreamRequest) -> &KeyPool {
        match &self.paid {
            Some(paid) if req.paid => paid,
            _ => &self.pool,
        }
    }
}

/// gemgate's HTTP application, served by the worker threads (see `server::workers`).
pub struct Gateway {
    pub(crate) state: Arc<State>,
    connector: TransportConnector,
    /// For side calls (image hosts, image URLs).
    side: reqwest::Client,
    /// Serves `/metrics`, `/health` and `/ready` alone (`metrics.listen`).
    pub(crate) metrics_only: bool,
    /// Live sessions open, by client.
    live_sessions: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// Whether the downstream connection may serve another request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Reuse,
    Close,
}

/// A failed attempt that sent nothing to the client.
#[derive(Debug)]
pub(crate) struct Failure {
    class: ErrorClass,
    /// The upstream's status, or 0 when there was no answer.
    status: u16,
    /// `RetryInfo.retryDelay` of a 429, for plugins.
    retry_delay_s: Option<f64>,
    /// Whose quota a 429 was (`QuotaFailure.violations[].quotaId`).
    quota: crate::keys::taxonomy::Quota,
    body: Bytes,
    content_type: Option<HeaderValue>,
    message: String,
}

/// How an attempt loop ended.
pub(crate) enum Finished {
    /// The answer went to the client.
    Relayed(Outcome),
    /// The answer was collected for gemgate to process (model lists).
    Collected(Bytes),
    /// Nothing was sent: answer with this.
    Refused(Refusal),
}

pub(crate) enum Refusal {
    Gate(GateError),
    Upstream(Box<Failure>),
}

/// Makes each attempt's [`Reframe`] for a relayed answer (a retried attempt starts afresh).
type MakeReframe = Box<dyn Fn(&Meta) -> Box<dyn Reframe> + Send + Sync>;

/// One request to the upstream, ready to be sent with any key.
pub(crate) struct UpstreamRequest {
    header: RequestHeader,
    body: Bytes,
    model: String,
    /// How a relayed answer reaches the client.
    reframe: MakeReframe,
    /// The key goes as `Authorization: Bearer` (Google's OpenAI-compatible API) rather than
    /// `x-goog-api-key`.
    bearer: bool,
    /// Made with `PAID_KEY` (image generation), when it is set.
    paid: bool,
    /// Only this key may serve it (the Files API: a file belongs to the key that uploaded it).
    pinned: Option<usize>,
    /// Which of Google's surfaces it is for: batch jobs have their own quotas, and their 429s
    /// never cool a key for interactive traffic.
    surface: Surface,
    /// Sending it twice does no harm. A create (a batch, an interaction, a token) is not: one
    /// that timed out may have been made, and is not tried again on another key.
    idempotent: bool,
    /// A Vertex AI express key may serve it (a generation, a token count, an embedding of a
    /// model: `{base}/models/{model}:{action}`); no other call ever gets one.
    vertex_ok: bool,
}

/// The answer as it comes, or for a stream (`sse`: of server-sent events) reframed on event
/// boundaries.
fn framing(stream: bool, sse: bool) -> MakeReframe {
    if sse {
        Box::new(|meta: &Meta| Box::new(SseEvents::new(meta.protocol)) as Box<dyn Reframe>)
    } else {
        Box::new(move |_: &Meta| Box::new(Raw::new(stream)) as Box<dyn Reframe>)
    }
}

impl UpstreamRequest {
    /// A request relayed as it is, on the pool: no model, no stream, the key as
    /// `x-goog-api-key`.
    fn new(header: RequestHeader, body: Bytes) -> UpstreamRequest {
        UpstreamRequest {
            header,
            body,
            model: String::new(),
            reframe: framing(false, false),
            bearer: false,
            paid: false,
            pinned: None,
            surface: Surface::Interactive,
            idempotent: true,
            vertex_ok: false,
        }
    }
}

impl Gateway {
    /// `side` makes gemgate's side calls (image hosts, image URLs): see [`crate::upstream::side_client`].
    pub fn new(state: Arc<State>, side: reqwest::Client) -> Gateway {
        Gateway {
            state,
            // Only makes new connections: idle ones are kept by `Target`.
            connector: TransportConnector::new(None),
            side,
            metrics_only: false,
            live_sessions: Arc::default(),
        }
    }

    /// The gateway of the metrics listener (`metrics.listen`): `/metrics`, `/health` and
    /// `/ready`, nothing else.
    pub fn metrics_only(state: Arc<State>, side: reqwest::Client) -> Gateway {
        Gateway {
            metrics_only: true,
            ..Gateway::new(state, side)
        }
    }

    fn side_client(&self) -> &reqwest::Client {
        &self.side
    }

    /// The checks every proxied call passes first: a key pool, the client's token, the method.
    /// Returns the client's name.
    fn admit(
        &self,
        generation: &Generation,
        s: &ServerSession,
        method: http::Method,
        meta: &mut Meta,
    ) -> Result<(), Refusal> {
        let req = s.req_header();
        if generation.pool.is_empty() {
            return Err(Refusal::Gate(GateError::new(
                503,
                "no Gemini API key is configured: set API_KEYS (or [keys] api_keys in gemgate.toml)",
            )));
        }
        let client = self.authenticate(generation, req, &meta.peer)?.to_owned();
        if req.method != method {
            return Err(Refusal::Gate(GateError::new(
                405,
                format!("{} is not allowed here; use {method}", req.method),
            )));
        }
        meta.client = Some(client);
        if req.headers.contains_key(X_GEMGATE_TRACE) {
            self.trace_if_asked(generation, req, meta)?;
        }
        Ok(())
    }

    /// Traces the plugins' decisions for a client's request that asks (`x-gemgate-trace: 1`)
    /// with the admin token (`x-gemgate-admin`). A wrong admin token is refused and counted as
    /// one (see `session::login`); a client token alone never gets a trace.
    fn trace_if_asked(
        &self,
        generation: &Generation,
        req: &RequestHeader,
        meta: &mut Meta,
    ) -> Result<(), Refusal> {
        let asked = req
            .headers
            .get(X_GEMGATE_TRACE)
            .is_some_and(|v| v.as_bytes() == b"1");
        let presented = req
            .headers
            .get(X_GEMGATE_ADMIN)
            .map(|v| v.to_str().unwrap_or_default());
        let (true, Some(presented), Some(token)) =
            (asked, presented, generation.config.auth_token.as_ref())
        else {
            return Ok(());
        };
        let shared = &*self.state.lasting.shared;
        crate::app::session::login(shared, presented, token.expose(), meta.peer.ip)
            .map_err(Refusal::Gate)?;
        meta.trace_plugins();
        Ok(())
    }

    /// Checks the client's token; returns its name. Wrong tokens are counted per client
    /// address: past a few, the answer is 429 with the time to wait (a right token always
    /// passes).
    fn authenticate<'g>(
        &self,
        generation: &'g Generation,
        req: &RequestHeader,
        peer: &Peer,
    ) -> Result<&'g str, Refusal> {
        let deny = |m: &str| Refusal::Gate(GateError::new(401, m));
        if generation.tokens.is_empty() {
            return Err(deny(
                "no client token is configured on this gateway: set ALLOWED_TOKENS",
            ));
        }
        let presented = auth::credential(
            req.uri.query(),
            // Anthropic's clients send theirs as `x-api-key`.
            req.headers
                .get(X_GOOG_API_KEY)
                .or_else(|| req.headers.get("x-api-key"))
                .map(HeaderValue::as_bytes),
            req.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes),
        )
        .ok_or_else(|| deny("missing API key: pass your gemgate token as ?key=, x-goog-api-key or Authorization: Bearer"))?;
        if let Some(name) = generation.tokens.check(&presented) {
            self.state.lasting.shared.client_succeeded(peer.ip);
            return Ok(name);
        }
        Err(self.wrong_credential(
            peer,
            "API key not valid. Please pass a valid gemgate token.",
        ))
    }

    /// The answer to a wrong credential (a client token, an ephemeral token), counted for the
    /// client's address: 401 with `why`, or past a few, 429 with the time to wait.
    fn wrong_credential(&self, peer: &Peer, why: &str) -> Refusal {
        match self.state.lasting.shared.client_failed(peer.ip) {
            Some(wait) => Refusal::Gate(
                GateError::new(
                    429,
                    "too many wrong API keys from this address: wait before trying again",
                )
                .retry_after(Some(wait.as_secs().max(1))),
            ),
            None => Refusal::Gate(GateError::new(401, why)),
        }
    }

    /// The plugins' verdict on a call of `action` on `model`: first the limits they declare
    /// (counted across the fleet), then their `on_request` hooks.
    async fn on_request(
        &self,
        generation: &Generation,
        s: &ServerSession,
        model: &str,
        action: &str,
        stream: bool,
        meta: &Meta,
    ) -> Result<Rewrite, Refusal> {
        for declared in generation.policy.limits_for(model) {
            let client = meta.client();
            let max = declared.limit.rpm_for(client);
            let check = LimitCheck {
                plugin: &declared.plugin,
                subject: client,
                max,
                window_s: 60,
                now_ms: now_ms(),
            };
            if let Admission::Denied { retry_after_s } =
                self.state.lasting.shared.admit(check).await
            {
                self.state.lasting.prometheus.limited();
                let message = format!("rate limit: {max} requests per minute for {client}");
                return Err(Refusal::Gate(
                    GateError::new(429, message).retry_after(Some(retry_after_s)),
                ));
            }
        }
        if !generation.policy.has_on_request(model) {
            return Ok(Rewrite::default());
        }
        let req = s.req_header();
        let info = RequestInfo {
            id: &meta.id,
            method: req.method.as_str(),
            path: req.uri.path(),
            protocol: meta.protocol.as_str(),
            model,
            action,
            stream,
            client: meta.client(),
            headers: &req.headers,
        };
        let rewrite = meta
            .with_shared(|shared| generation.policy.on_request(&info, shared))
            .map_err(denied)?;
        // An alias (or any other rename): the logs keep the name the client asked for.
        if rewrite.model.as_deref().is_some_and(|m| m != model) {
            let _ = meta.asked_model.set(model.to_owned());
        }
        Ok(rewrite)
    }

    /// A Gemini-native call: checks, then the attempt loop.
    pub(crate) async fn native(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        call: NativeCall,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        self.admit(generation, s, call.method(), &mut x.meta)?;
        let rewrite = self
            .on_request(
                generation,
                s,
                call.model(),
                call.action(),
                call.is_stream(),
                &x.meta,
            )
            .await?;
        let model = rewrite.model.as_deref().unwrap_or(call.model()).to_owned();
        x.model.clone_from(&model);
        let query = client_query(s);
        let sse = call.is_stream() && auth::query_param(&query, "alt").is_some_and(|v| v == "sse");
        let base = &generation.target.base.path;
        let mut body = if call.method() == http::Method::POST {
            read_body(s, generation.config.max_body_bytes).await?
        } else {
            Bytes::new()
        };
        if generation.config.file.logs.error_log_record_request_body {
            x.body = Some(body.clone());
        }
        if rewrite.touches_body() && call.method() == http::Method::POST {
            body = rewrite_body(&body, &rewrite)?;
        }
        let path = match &call {
            NativeCall::ListModels => format!("{base}/models"),
            NativeCall::GetModel { .. } => format!("{base}/models/{model}"),
            // Built by concat: this runs on every call, and `format!` costs twice as much.
            NativeCall::Action { action, .. } => [base, "/models/", &model, ":", action].concat(),
        };
        // NOTE: built in a block of its own: a local that was ever borrowed keeps its room in
        // the future until its scope ends, and this one (352 bytes) is moved out at once.
        let header = {
            let mut header = upstream_header(generation, s.req_header(), &path, &query)?;
            for (name, value) in rewrite.headers {
                let _ = header.insert_header(name, value);
            }
            header
        };
        let pinned = self.file_pin(generation, &body, x.meta.client.as_deref())?;
        let mut up = UpstreamRequest {
            vertex_ok: vertex_serves(call.action()),
            pinned,
            model,
            reframe: framing(call.is_stream(), sse),
            ..UpstreamRequest::new(header, body)
        };
        if call == NativeCall::ListModels && auth::query_param(&query, "pageToken").is_none() {
            // Boxed, as the other calls below that are not a model's answer: the future of
            // every request (each open stream's included) is as large as its largest branch.
            let models = Box::pin(self.all_models(generation, &mut up, &path, x)).await?;
            let body = serde_json::json!({ "models": models });
            return Ok(send(s, x, 200, crate::translate::json_bytes(&body)).await);
        }
        if call == NativeCall::ListModels {
            let page = Box::pin(self.collect(generation, &up, x)).await?;
            let page = filter_page(generation, page, &x.meta)?;
            return Ok(send(s, x, 200, page).await);
        }
        if matches!(
            call.action(),
            "batchGenerateContent" | "asyncBatchEmbedContent"
        ) {
            return Box::pin(self.create_batch(generation, s, up, x)).await;
        }
        self.relay_or_send(generation, &up, s, x).await
    }

    /// The attempt loop for an answer relayed to the client as it comes.
    async fn relay_or_send(
        &self,
        generation: &Generation,
        up: &UpstreamRequest,
        s: &mut ServerSession,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let (finished, tried) = self.attempts(generation, up, Some(s), &x.meta).await;
        x.record(tried);
        match finished {
            Finished::Relayed(outcome) => Ok(outcome),
            Finished::Collected(body) => Ok(send(s, x, 200, body).await),
            Finished::Refused(r) => Err(r),
        }
    }

    /// Every page of `GET models`, merged, through the `filter_models` plugins.
    async fn all_models(
        &self,
        generation: &Generation,
        up: &mut UpstreamRequest,
        path: &str,
        x: &mut Exchange,
    ) -> Result<Vec<serde_json::Value>, Refusal> {
        let mut models = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_MODEL_PAGES {
            let mut target = format!("{path}?pageSize=1000");
            if let Some(t) = &token {
                target.push_str("&pageToken=");
                target.push_str(t);
            }
            up.header.set_raw_path(target.as_bytes()).map_err(|_| {
                Refusal::Gate(GateError::new(502, "invalid page token from upstream"))
            })?;
            let page = self.collect(generation, up, x).await?;
            let mut page: serde_json::Value = serde_json::from_slice(&page).map_err(|e| {
                Refusal::Gate(GateError::new(
                    502,
                    format!("the upstream's model list is not JSON: {e}"),
                ))
            })?;
            if let Some(serde_json::Value::Array(list)) =
                page.get_mut("models").map(serde_json::Value::take)
            {
                models.extend(list);
            }
            token = page
                .get("nextPageToken")
                .and_then(|t| t.as_str())
                .filter(|t| !t.is_empty())
                .map(encode_query_value);
            if token.is_none() {
                break;
            }
        }
        filter_models(generation, models, &x.meta)
    }

    /// The attempt loop for an answer gemgate processes itself (model lists).
    async fn collect(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        x: &mut Exchange,
    ) -> Result<Bytes, Refusal> {
        let (finished, tried) = self.attempts(generation, req, None, &x.meta).await;
        x.record(tried);
        match finished {
            Finished::Collected(body) => Ok(body),
            Finished::Refused(r) => Err(r),
            // Without a client session nothing can have been relayed.
            Finished::Relayed(_) => Err(Refusal::Gate(GateError::new(500, "nothing to collect"))),
        }
    }

    /// Answers a refused request: gemgate's own error, or the upstream's, as Google sent it.
    pub(crate) async fn refuse(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        x: &mut Exchange,
        refusal: Refusal,
    ) -> Outcome {
        if let Refusal::Upstream(f) = &refusal {
            x.upstream = Some((f.status, f.message.clone()));
        }
        match refusal {
            Refusal::Gate(e) => send_gate(s, x, &e).await,
            // OpenAI and Anthropic clients get Google's status and message in their shape.
            Refusal::Upstream(f)
                if matches!(x.meta.protocol, Protocol::OpenAi | Protocol::Anthropic)
                    && f.status != 0
                    && !f.body.is_empty() =>
            {
                x.class = Some(Class::Upstream(f.class));
                // Google answers 404 to a model call when the model is not one it serves.
                let mut e = match f.status {
                    404 => GateError::model_not_found(f.message.clone()),
                    status => GateError::new(status, f.message.clone()),
                };
                if f.status == 429 {
                    let now = now_ms();
                    e = e.retry_after(
                        generation
                            .pool
                            .retry_at(&x.model, now)
                            .map(|at| seconds_until(at, now)),
                    );
                }
                send_gate(s, x, &e).await
            }
            Refusal::Upstream(f) if f.status != 0 && !f.body.is_empty() => {
                x.class = Some(Class::Upstream(f.class));
                let mut h = response_header(f.status, x);
                let ct = f
                    .content_type
                    .unwrap_or(HeaderValue::from_static("application/json; charset=UTF-8"));
                let _ = h.insert_header(header::CONTENT_TYPE, ct);
                if f.status == 429 {
                    let now = now_ms();
                    if let Some(at) = generation.pool.retry_at(&x.model, now) {
                        let _ = h.insert_header(header::RETRY_AFTER, seconds_until(at, now));
                    }
                }
                write_full(s, h, f.body).await
            }
            Refusal::Upstream(f) => {
                x.class = Some(Class::Upstream(f.class));
                let e = match f.class {
                    ErrorClass::Timeout => GateError::new(
                        504,
                        format!("the Gemini API did not answer in time ({})", f.message),
                    ),
                    _ if f.status != 0 => GateError::new(f.status, f.message),
                    _ => GateError::new(502, format!("cannot reach the Gemini API: {}", f.message)),
                };
                send_gate(s, x, &e).await
            }
        }
    }
}

/// A policy refusal as the client's error. A plugin refuses with 404 a model it will not
/// serve (`model_filter`): the one resource of a request a policy judges.
fn denied(d: Denial) -> Refusal {
    Refusal::Gate(match d.status {
        404 => GateError::model_not_found(d.message),
        status => GateError::new(status, d.message),
    })
}

/// The model list as `filter_models` plugins leave it.
fn filter_models(
    generation: &Generation,
    models: Vec<serde_json::Value>,
    meta: &Meta,
) -> Result<Vec<serde_json::Value>, Refusal> {
    if !generation.policy.has_filter_models() {
        return Ok(models);
    }
    meta.with_shared(|shared| {
        generation
            .policy
            .filter_models(models, meta.client(), &meta.id, shared)
    })
    .map_err(denied)
}

/// One page of a model list (a request with `pageToken`), through `filter_models`.
fn filter_page(generation: &Generation, page: Bytes, meta: &Meta) -> Result<Bytes, Refusal> {
    if !generation.policy.has_filter_models() {
        return Ok(page);
    }
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&page) else {
        return Ok(page);
    };
    let Some(serde_json::Value::Array(models)) = v.get_mut("models").map(serde_json::Value::take)
    else {
        return Ok(page);
    };
    v["models"] = serde_json::Value::Array(filter_models(generation, models, meta)?);
    Ok(crate::translate::json_bytes(&v))
}

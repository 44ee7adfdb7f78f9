//! The request path: route, authenticate, read the body, then gemgate's own attempt loop over
//! pingora's pooled upstream sessions, relaying the answer chunk by chunk.
//!
//! The attempt loop is ours rather than pingora's `ProxyHttp` retry because a retry decision
//! needs the error's *body* (DESIGN.md, "Errors from Gemini"), and a retry must resend a body of
//! any size.

pub mod files;
mod openai;
pub mod route;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use pingora::ErrorType;
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;

use crate::app::{Generation, State};
use crate::clock::now_ms;
use crate::http::reply::{GateError, Protocol};
use crate::http::{auth, peer, sse, wire};
use crate::keys::seconds_until;
use crate::keys::taxonomy::{ErrorClass, classify, error_message, redact};
use crate::keys::{KeyPool, Penalty, Pick};
use crate::policy::engine::{
    AttemptDecision, AttemptInfo, Denial, RequestInfo, Rewrite, Shared as PluginShared,
};
use crate::upstream::head;
use crate::upstream::headers::{HELD_BACK, connection_listed, is_hop_by_hop, skip_request_header};
use crate::upstream::{self, Target};
use route::NativeCall;

/// Header names gemgate reads or writes on every request, made once instead of parsed per use.
pub(crate) const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Largest upstream error body read for classification and relay.
const ERROR_BODY_LIMIT: usize = 256 * 1024;
/// Largest upstream answer gemgate buffers itself (model lists).
const COLLECT_LIMIT: usize = 64 * 1024 * 1024;
/// How long an oversized request body is drained after its 413.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the next piece of a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// After this long, a request body must have come at `MIN_BODY_RATE` bytes a second.
const BODY_GRACE: Duration = Duration::from_secs(10);
const MIN_BODY_RATE: f64 = 1024.0;
/// Longest request target (path and query) gemgate reads; longer ones get 414.
pub(crate) const MAX_TARGET: usize = 8 * 1024;
/// Upper bound on model-list pages walked for one request.
const MAX_MODEL_PAGES: usize = 50;

impl Generation {
    /// The keys an upstream request may use: `PAID_KEY` for paid calls when it is set, else
    /// the pool.
    fn pool_for(&self, req: &UpstreamRequest) -> &KeyPool {
        match &self.paid {
            Some(paid) if req.paid => paid,
            _ => &self.pool,
        }
    }
}

/// gemgate's HTTP application, served by the worker threads (see [`workers`]).
pub struct Gateway {
    pub(crate) state: Arc<State>,
    connector: TransportConnector,
    /// For side calls (image hosts, image URLs).
    side: reqwest::Client,
}

/// Whether the downstream connection may serve another request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Reuse,
    Close,
}

/// What one request did, for its log line.
pub(crate) struct Exchange {
    pub(crate) id: String,
    pub(crate) started: Instant,
    pub(crate) client: Option<String>,
    pub(crate) model: String,
    pub(crate) action: String,
    pub(crate) key: Option<String>,
    pub(crate) attempts: u32,
    pub(crate) status: u16,
    pub(crate) class: Option<&'static str>,
    pub(crate) ttfb: Option<Duration>,
    /// Tokens the answer reported (`usageMetadata`).
    pub(crate) tokens: crate::store::usage::Tokens,
    /// For the error log: Google's status and message of a refused request.
    pub(crate) upstream: Option<(u16, String)>,
    /// For the error log, with `ERROR_LOG_RECORD_REQUEST_BODY`: the request body.
    pub(crate) body: Option<Bytes>,
    /// The upstream's `x-goog-upload-*` headers of a collected answer (the Files API).
    pub(crate) upload_headers: Vec<(String, String)>,
    /// The request came from a browser page (it has an `Origin`): answers carry CORS headers.
    pub(crate) cors: bool,
    /// What plugins share within this request (`ctx.shared`).
    pub(crate) shared: PluginShared,
    /// The API the client speaks: errors are answered in its shape.
    pub(crate) protocol: Protocol,
    /// Who sent the request.
    pub(crate) peer: peer::Peer,
}

/// A failed attempt that sent nothing to the client.
#[derive(Debug)]
pub(crate) struct Failure {
    class: ErrorClass,
    /// The upstream's status, or 0 when there was no answer.
    status: u16,
    /// `RetryInfo.retryDelay` of a 429, for plugins.
    retry_delay_s: Option<f64>,
    body: Bytes,
    content_type: Option<HeaderValue>,
    message: String,
}

/// How an attempt loop ended.
enum Finished {
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

/// One request to the upstream, ready to be sent with any key.
struct UpstreamRequest {
    header: RequestHeader,
    body: Bytes,
    model: String,
    /// `streamGenerateContent`: never buffered, no content-length.
    stream: bool,
    /// Server-sent events (`alt=sse`): relayed on event boundaries.
    sse: bool,
    /// The key goes as `Authorization: Bearer` (Google's OpenAI-compatible API) rather than
    /// `x-goog-api-key`.
    bearer: bool,
    /// The stream is translated into OpenAI chat chunks on its way to the client.
    chat: Option<openai::ChatStreamSpec>,
    /// Made with `PAID_KEY` (image generation), when it is set.
    paid: bool,
    /// Only this key may serve it (the Files API: a file belongs to the key that uploaded it).
    pinned: Option<usize>,
}

impl UpstreamRequest {
    /// A request relayed as it is, on the pool: no model, no stream, the key as
    /// `x-goog-api-key`.
    fn new(header: RequestHeader, body: Bytes) -> UpstreamRequest {
        UpstreamRequest {
            header,
            body,
            model: String::new(),
            stream: false,
            sse: false,
            bearer: false,
            chat: None,
            paid: false,
            pinned: None,
        }
    }
}

impl Gateway {
    /// `side` makes gemgate's side calls (image hosts, image URLs): see [`side_client`].
    pub fn new(state: Arc<State>, side: reqwest::Client) -> Gateway {
        Gateway {
            state,
            // Only makes new connections: idle ones are kept by `Target`.
            connector: TransportConnector::new(None),
            side,
        }
    }

    fn side_client(&self) -> &reqwest::Client {
        &self.side
    }

    /// The checks every proxied call passes first: a key pool, the client's token, the method.
    fn admit(
        &self,
        generation: &Generation,
        s: &ServerSession,
        method: http::Method,
        x: &mut Exchange,
    ) -> Result<(), Refusal> {
        let req = s.req_header();
        if generation.pool.is_empty() {
            return Err(Refusal::Gate(GateError::new(
                503,
                "no Gemini API key is configured: set API_KEYS (or [keys] api_keys in gemgate.toml)",
            )));
        }
        x.client = Some(self.authenticate(generation, req, &x.peer)?.to_owned());
        if req.method != method {
            return Err(Refusal::Gate(GateError::new(
                405,
                format!("{} is not allowed here; use {method}", req.method),
            )));
        }
        Ok(())
    }

    /// Checks the client's token; returns its name. Wrong tokens are counted per client
    /// address: past a few, the answer is 429 with the time to wait (a right token always
    /// passes).
    fn authenticate<'g>(
        &self,
        generation: &'g Generation,
        req: &RequestHeader,
        peer: &peer::Peer,
    ) -> Result<&'g str, Refusal> {
        let deny = |m: &str| Refusal::Gate(GateError::new(401, m));
        if generation.tokens.is_empty() {
            return Err(deny(
                "no client token is configured on this gateway: set ALLOWED_TOKENS",
            ));
        }
        let presented = auth::credential(
            req.uri.query(),
            req.headers.get(X_GOOG_API_KEY).map(HeaderValue::as_bytes),
            req.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes),
        )
        .ok_or_else(|| deny("missing API key: pass your gemgate token as ?key=, x-goog-api-key or Authorization: Bearer"))?;
        let throttle = &self.state.lasting.sessions.client_failures;
        if let Some(name) = generation.tokens.check(&presented) {
            throttle.succeeded(peer.ip);
            return Ok(name);
        }
        match throttle.failed(peer.ip) {
            Some(wait) => Err(Refusal::Gate(
                GateError::new(
                    429,
                    "too many wrong API keys from this address: wait before trying again",
                )
                .retry_after(Some(wait.as_secs().max(1))),
            )),
            None => Err(deny(
                "API key not valid. Please pass a valid gemgate token.",
            )),
        }
    }

    /// The `on_request` plugins' verdict on a call of `action` on `model`.
    fn on_request(
        &self,
        generation: &Generation,
        s: &ServerSession,
        model: &str,
        action: &str,
        stream: bool,
        x: &mut Exchange,
    ) -> Result<Rewrite, Refusal> {
        if !generation.policy.has_on_request(model) {
            return Ok(Rewrite::default());
        }
        let req = s.req_header();
        let info = RequestInfo {
            id: &x.id,
            method: req.method.as_str(),
            path: req.uri.path(),
            protocol: x.protocol.as_str(),
            model,
            action,
            stream,
            client: x.client.as_deref().unwrap_or_default(),
            headers: &req.headers,
        };
        generation
            .policy
            .on_request(&info, &mut x.shared)
            .map_err(denied)
    }

    /// A Gemini-native call: checks, then the attempt loop.
    pub(crate) async fn native(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        call: NativeCall,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        self.admit(generation, s, call.method(), x)?;
        let rewrite = self.on_request(
            generation,
            s,
            call.model(),
            call.action(),
            call.is_stream(),
            x,
        )?;
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
        let mut header = upstream_header(generation, s.req_header(), &path, &query)?;
        for (name, value) in rewrite.headers {
            let _ = header.insert_header(name, value);
        }
        let pinned = self.file_pin(generation, &body, x.client.as_deref())?;
        let mut up = UpstreamRequest {
            pinned,
            model,
            stream: call.is_stream(),
            sse,
            ..UpstreamRequest::new(header, body)
        };
        if call == NativeCall::ListModels && auth::query_param(&query, "pageToken").is_none() {
            let models = self.all_models(generation, &mut up, &path, x).await?;
            let body = serde_json::json!({ "models": models });
            return Ok(send(s, x, 200, Bytes::from(body.to_string())).await);
        }
        if call == NativeCall::ListModels {
            let page = self.collect(generation, &up, x).await?;
            let page = filter_page(generation, page, x)?;
            return Ok(send(s, x, 200, page).await);
        }
        match self.attempts(generation, &up, Some(s), x).await {
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
        filter_models(generation, models, x)
    }

    /// The attempt loop for an answer gemgate processes itself (model lists).
    async fn collect(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        x: &mut Exchange,
    ) -> Result<Bytes, Refusal> {
        match self.attempts(generation, req, None, x).await {
            Finished::Collected(body) => Ok(body),
            Finished::Refused(r) => Err(r),
            // Without a client session nothing can have been relayed.
            Finished::Relayed(_) => Err(Refusal::Gate(GateError::new(500, "nothing to collect"))),
        }
    }

    /// The attempt loop: up to `MAX_RETRIES` attempts, each on a different usable key.
    async fn attempts(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        mut client: Option<&mut ServerSession>,
        x: &mut Exchange,
    ) -> Finished {
        let max = generation.config.max_retries as usize;
        let mut tried: Vec<usize> = Vec::with_capacity(max);
        let mut last: Option<Failure> = None;
        while tried.len() < max {
            let now = now_ms();
            let pick = match self.choose_key(generation, req, &tried, now, x) {
                Ok(pick) => pick,
                Err(d) => return Finished::Refused(denied(d)),
            };
            let index = match pick {
                Pick::Key(index) => index,
                Pick::Empty => {
                    return Finished::Refused(Refusal::Gate(GateError::new(
                        503,
                        "no Gemini API key is configured",
                    )));
                }
                Pick::Exhausted {
                    retry_at_ms,
                    cooling,
                    disabled,
                } => match last {
                    Some(f) => return Finished::Refused(Refusal::Upstream(Box::new(f))),
                    None => {
                        let what = if req.model.is_empty() {
                            String::new()
                        } else {
                            format!(" for {}", req.model)
                        };
                        // OpenAI clients expect a rate limit as 429; Gemini clients get 503.
                        let status = if x.protocol == Protocol::OpenAi && cooling > 0 {
                            429
                        } else {
                            503
                        };
                        let e = GateError::new(status, format!("no usable Gemini API key{what}: {cooling} cooling down after quota errors, {disabled} disabled"))
                            .retry_after(retry_at_ms.map(|at| seconds_until(at, now)));
                        return Finished::Refused(Refusal::Gate(e));
                    }
                },
            };
            tried.push(index);
            let key = generation.pool_for(req).get(index);
            x.attempts += 1;
            x.key = Some(key.spec.id.clone());
            let _lease = generation.pool_for(req).lease(index, now);
            match self
                .attempt(generation, req, index, client.as_deref_mut(), x)
                .await
            {
                Ok(finished) => return finished,
                Err(failure) => {
                    self.count_usage(generation, req, index, Some(failure.class.as_str()), x);
                    let penalty = generation.pool_for(req).record_failure(
                        index,
                        &req.model,
                        failure.class,
                        &failure.message,
                        now_ms(),
                    );
                    if penalty == Penalty::Confirm {
                        crate::app::checks::confirm(self.state.clone(), key.spec.id.clone());
                    }
                    tracing::debug!(id = %x.id, key = %key.spec.id, attempt = x.attempts, status = failure.status, class = failure.class.as_str(), ?penalty, message = %failure.message, "attempt failed");
                    x.class = Some(failure.class.as_str());
                    let mut retry = failure.class.retryable();
                    if generation.policy.has_attempt_hook(false, &req.model) {
                        match self.after_attempt(generation, index, req, &failure, x) {
                            Ok(Some(AttemptDecision::Retry)) => retry = true,
                            Ok(_) => {}
                            Err(d) => return Finished::Refused(denied(d)),
                        }
                    }
                    if !retry {
                        return Finished::Refused(Refusal::Upstream(Box::new(failure)));
                    }
                    last = Some(failure);
                }
            }
        }
        match last {
            Some(f) => Finished::Refused(Refusal::Upstream(Box::new(f))),
            None => Finished::Refused(Refusal::Gate(GateError::new(
                503,
                "no attempt was possible",
            ))),
        }
    }

    /// Queues one attempt's usage (`failure`: its error class; `None` for a success, with the
    /// tokens the answer reported).
    fn count_usage(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        index: usize,
        failure: Option<&'static str>,
        x: &Exchange,
    ) {
        self.state.lasting.usage.record(crate::store::usage::Event {
            key_id: &generation.pool_for(req).get(index).spec.id,
            model: &req.model,
            day: crate::store::usage::day_of(now_ms()),
            failure,
            tokens: if failure.is_none() {
                x.tokens
            } else {
                Default::default()
            },
        });
    }

    /// The key for the next attempt: the first `select_key` plugin that names one, else the
    /// built-in choice.
    fn choose_key(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        tried: &[usize],
        now: u64,
        x: &mut Exchange,
    ) -> Result<Pick, Denial> {
        let pool = generation.pool_for(req);
        if let Some(i) = req.pinned {
            return Ok(if !tried.contains(&i) && pool.usable(i, &req.model, now) {
                Pick::Key(i)
            } else {
                pool.exhausted(&req.model, now)
            });
        }
        if req.paid || !generation.policy.has_select_key(&req.model) || pool.is_empty() {
            return Ok(pool.pick(&req.model, tried, now));
        }
        let candidates = pool.candidates(&req.model, tried, now);
        let Some(&first) = candidates.first() else {
            return Ok(pool.exhausted(&req.model, now));
        };
        let client = x.client.as_deref().unwrap_or_default();
        let chosen =
            generation
                .policy
                .select_key(&req.model, candidates, client, &x.id, &mut x.shared)?;
        Ok(Pick::Key(chosen.unwrap_or(first as usize)))
    }

    /// Tells `on_response` / `on_error` plugins how an attempt went and applies what they
    /// decide about its key. `outcome` is the failure, or for a success (2xx `status`) only
    /// the status.
    fn after_attempt(
        &self,
        generation: &Generation,
        index: usize,
        req: &UpstreamRequest,
        outcome: &Failure,
        x: &mut Exchange,
    ) -> Result<Option<AttemptDecision>, Denial> {
        let pool = generation.pool_for(req);
        let model = req.model.as_str();
        let key = pool.get(index);
        let client = x.client.clone().unwrap_or_default();
        let success = (200..300).contains(&outcome.status);
        let info = AttemptInfo {
            id: &x.id,
            client: &client,
            model,
            status: outcome.status,
            class: if success {
                "ok"
            } else {
                outcome.class.as_str()
            },
            key_id: &key.spec.id,
            attempt: x.attempts,
            retry_delay_s: outcome.retry_delay_s,
            message: &outcome.message,
        };
        let decision = generation.policy.after_attempt(&info, &mut x.shared)?;
        match &decision {
            Some(AttemptDecision::Cool(seconds)) => {
                pool.cool(index, model, *seconds, now_ms());
            }
            Some(AttemptDecision::Disable(reason)) => {
                tracing::warn!(key = %key.spec.id, reason = %reason, "key disabled by a plugin");
                key.state.disable(format!("policy: {reason}"));
            }
            _ => {}
        }
        Ok(decision)
    }

    /// One attempt with key `index`. `Err` means nothing reached the client and the caller may
    /// try another key.
    async fn attempt(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        index: usize,
        client: Option<&mut ServerSession>,
        x: &mut Exchange,
    ) -> Result<Finished, Failure> {
        let key = generation.pool_for(req).get(index);
        let route = generation.target.route(&key.spec.id);
        let peer = generation
            .target
            .peer(route)
            .await
            .map_err(|m| Failure::network(ErrorClass::Network, m))?;
        let credential = if req.bearer {
            head::Credential::Bearer(key.spec.secret.expose())
        } else {
            head::Credential::GoogApiKey(key.header.as_bytes())
        };
        let forwarding = generation
            .target
            .forwarding(route)
            .map(|proxy| head::Forwarding {
                authority: generation.target.base.authority.as_str(),
                authorization: proxy.proxy_authorization(),
            });
        let head = head::request_head(&req.header, req.body.len(), credential, forwarding);
        let mut reuse_idle = true;
        let mut up = loop {
            let (conn, reused) = generation
                .target
                .connection(&self.connector, &peer, route, reuse_idle)
                .await
                .map_err(Failure::from_pingora)?;
            match send_request(conn, &peer, &head, &req.body, generation.config.timeout).await {
                Ok(up) => break up,
                // An idle connection the server closed meanwhile: not the key's fault, and not an
                // attempt. The other idle ones are likely closed too (an upstream restart, an
                // idle timeout): drop them all and try once more on a new connection.
                Err(e) if reused && e.etype() != &ErrorType::ReadTimedout => {
                    generation.target.drop_idle(route);
                    reuse_idle = false;
                }
                Err(e) => return Err(Failure::from_pingora(e)),
            }
        };
        let status = up.response_header().map_or(0, |h| h.status.as_u16());
        if status == 407 {
            if let Some(proxy) = generation.target.forwarding(route) {
                // The proxy's refusal, not Google's answer: a network failure, no key's fault.
                return Err(Failure::network(
                    ErrorClass::Network,
                    format!("proxy {}: 407 Proxy Authentication Required", proxy.display),
                ));
            }
        }
        if !(200..300).contains(&status) {
            let (body, _) = read_to_end(&mut up, ERROR_BODY_LIMIT).await;
            let content_type = up
                .response_header()
                .and_then(|h| h.headers.get(header::CONTENT_TYPE).cloned());
            generation.target.release(up, route).await;
            let body = redact(body, key.spec.secret.expose());
            let class = classify(status, &body);
            return Err(Failure {
                class,
                retry_delay_s: match class {
                    ErrorClass::RateLimited { retry_after } => Some(retry_after.as_secs_f64()),
                    _ => None,
                },
                status,
                message: error_message(&body).unwrap_or_else(|| format!("HTTP {status}")),
                body,
                content_type,
            });
        }
        generation.pool_for(req).record_success(index);
        x.status = status;
        x.class = None;
        if generation.policy.has_attempt_hook(true, &req.model) {
            let ok = Failure::network(ErrorClass::Upstream, "");
            match self.after_attempt(generation, index, req, &Failure { status, ..ok }, x) {
                Ok(Some(AttemptDecision::Retry)) => {
                    // The answer is dropped with its connection.
                    return Err(Failure::network(
                        ErrorClass::Upstream,
                        "a plugin asked for another key",
                    ));
                }
                Ok(_) => {}
                Err(d) => {
                    generation.target.release(up, route).await;
                    return Ok(Finished::Refused(denied(d)));
                }
            }
        }
        let result = match client {
            None => {
                if let Some(h) = up.response_header() {
                    x.upload_headers = h
                        .headers
                        .iter()
                        .filter(|(n, _)| n.as_str().starts_with("x-goog-upload-"))
                        .filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_owned())))
                        .collect();
                }
                let (body, complete) = read_to_end(&mut up, COLLECT_LIMIT).await;
                if !complete {
                    return Err(Failure::network(
                        ErrorClass::Network,
                        "the upstream's answer broke off",
                    ));
                }
                if let Some(t) = crate::store::usage::tokens_in(&body) {
                    x.tokens = t;
                }
                Ok(Finished::Collected(body))
            }
            Some(s) => relay(s, &mut up, req, x).await,
        };
        generation.target.release(up, route).await;
        if result.is_ok() {
            self.count_usage(generation, req, index, None, x);
        }
        result
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
            // OpenAI clients get Google's status and message in OpenAI's shape.
            Refusal::Upstream(f)
                if x.protocol == Protocol::OpenAi && f.status != 0 && !f.body.is_empty() =>
            {
                x.class = Some(f.class.as_str());
                let mut e = GateError::new(f.status, f.message.clone());
                if f.status == 429 {
                    let now = now_ms();
                    e = e.retry_after(
                        generation
                            .pool
                            .unavailable(&x.model, now)
                            .0
                            .map(|at| seconds_until(at, now)),
                    );
                }
                send_gate(s, x, &e).await
            }
            Refusal::Upstream(f) if f.status != 0 && !f.body.is_empty() => {
                x.class = Some(f.class.as_str());
                let mut h = response_header(f.status, x);
                let ct = f
                    .content_type
                    .unwrap_or(HeaderValue::from_static("application/json; charset=UTF-8"));
                let _ = h.insert_header(header::CONTENT_TYPE, ct);
                if f.status == 429 {
                    let now = now_ms();
                    if let (Some(at), ..) = generation.pool.unavailable(&x.model, now) {
                        let _ = h.insert_header(header::RETRY_AFTER, seconds_until(at, now));
                    }
                }
                write_full(s, h, f.body).await
            }
            Refusal::Upstream(f) => {
                x.class = Some(f.class.as_str());
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

impl Failure {
    fn network(class: ErrorClass, message: impl Into<String>) -> Failure {
        Failure {
            class,
            status: 0,
            retry_delay_s: None,
            body: Bytes::new(),
            content_type: None,
            message: message.into(),
        }
    }

    fn from_pingora(e: Box<pingora::Error>) -> Failure {
        let class = match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => ErrorClass::Timeout,
            _ => ErrorClass::Network,
        };
        match (e.etype(), &e.context) {
            // Our own tunnel's words (see `egress`) say it all.
            (ErrorType::ConnectProxyFailure, Some(why)) => Failure::network(class, why.as_str()),
            _ => Failure::network(class, e.to_string().trim()),
        }
    }
}

/// 16 random hex digits: the id of a request that brought none.
pub(crate) fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u64(..);
    (0..16)
        .map(|i| char::from(HEX[(n >> (60 - 4 * i)) as usize & 0xf]))
        .collect()
}

impl Exchange {
    pub(crate) fn new(req: &RequestHeader) -> Exchange {
        let id = req
            .headers
            .get(X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
            .map_or_else(new_request_id, str::to_owned);
        Exchange {
            id,
            started: Instant::now(),
            client: None,
            model: String::new(),
            action: String::new(),
            key: None,
            attempts: 0,
            status: 0,
            class: None,
            ttfb: None,
            tokens: Default::default(),
            upstream: None,
            body: None,
            upload_headers: Vec::new(),
            cors: req.headers.contains_key(header::ORIGIN),
            peer: peer::Peer::default(),
            shared: PluginShared::default(),
            protocol: Protocol::Gemini,
        }
    }

    /// The finished request's row for the request and error logs. Its strings move into the
    /// record rather than being copied: this runs for every request.
    pub(crate) fn into_record(self, unsampled: bool) -> crate::store::logs::Record {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let failed = self.status >= 400 || self.class.is_some();
        let (upstream_status, upstream_message) = self.upstream.unzip();
        crate::store::logs::Record {
            ts_ms: now_ms(),
            id: self.id,
            client: self.client,
            model: self.model,
            action: self.action,
            key_id: self.key,
            status: self.status,
            class: self.class.map(str::to_owned),
            attempts: self.attempts,
            latency_ms: ms(self.started.elapsed()),
            ttfb_ms: self.ttfb.map(ms),
            prompt_tokens: self.tokens.prompt,
            output_tokens: self.tokens.output,
            thought_tokens: self.tokens.thoughts,
            upstream_status,
            upstream_message,
            // Only failed requests go to the error log, the only one that keeps bodies.
            request_body: self.body.filter(|_| failed).map(|b| {
                let kept = &b[..b.len().min(crate::store::logs::BODY_KEPT)];
                String::from_utf8_lossy(kept).into_owned()
            }),
            unsampled,
        }
    }

    /// The finished request's record, as `on_log` plugins get it.
    pub(crate) fn entry(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "client": self.client,
            "model": self.model,
            "action": self.action,
            "key_id": self.key,
            "status": self.status,
            "class": self.class,
            "attempts": self.attempts,
            "latency_ms": self.started.elapsed().as_secs_f64() * 1000.0,
            "ttfb_ms": self.ttfb.map(|d| d.as_secs_f64() * 1000.0),
        })
    }

    pub(crate) fn log(&self) {
        if self.action == "health" {
            tracing::debug!(target: "gemgate::access", id = %self.id, status = self.status, "health");
            return;
        }
        if !tracing::enabled!(target: "gemgate::access", tracing::Level::INFO) {
            return;
        }
        // One pre-formatted message rather than eleven tracing fields: field-by-field
        // formatting cost more than all of gemgate's own request handling.
        let mut line = String::with_capacity(224);
        let mut field = |name: &str, value: &str| {
            line.push_str(name);
            line.push('=');
            line.push_str(if value.is_empty() { "-" } else { value });
            line.push(' ');
        };
        field("id", &self.id);
        field("client", self.client.as_deref().unwrap_or("-"));
        field("model", &self.model);
        field("action", &self.action);
        field("key", self.key.as_deref().unwrap_or("-"));
        field("status", itoa::Buffer::new().format(self.status));
        field("class", self.class.unwrap_or("-"));
        field("attempts", itoa::Buffer::new().format(self.attempts));
        line.push_str("latency_ms=");
        push_millis(&mut line, Some(self.started.elapsed()));
        line.push_str(" ttfb_ms=");
        push_millis(&mut line, self.ttfb);
        tracing::info!(target: "gemgate::access", "{line}");
    }
}

/// Appends milliseconds with two decimals (`12.34`), or `-`.
fn push_millis(out: &mut String, d: Option<Duration>) {
    let Some(d) = d else {
        out.push('-');
        return;
    };
    let hundredths = d.as_micros() / 10;
    out.push_str(itoa::Buffer::new().format(hundredths / 100));
    out.push('.');
    let frac = (hundredths % 100) as u8;
    out.push((b'0' + frac / 10) as char);
    out.push((b'0' + frac % 10) as char);
}

/// Reads the whole request body, refusing it with 413 past `limit`.
pub(crate) async fn read_body(s: &mut ServerSession, limit: u64) -> Result<Bytes, Refusal> {
    // The rest of the body is read and discarded after answering (for a bounded time: see
    // `serve_request`), so the client is not cut off mid-upload and gets to read the 413.
    let too_large = || {
        Refusal::Gate(GateError::new(
            413,
            format!("request body is larger than the limit of {limit} bytes"),
        ))
    };
    let declared = s
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let expects_continue = s
        .req_header()
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        let _ = s.write_continue_response().await;
    }
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let started = Instant::now();
    let mut got: u64 = 0;
    loop {
        // A body that trickles in holds a connection (and, for long, a worker's memory): each
        // read must come within BODY_READ_TIMEOUT, and past BODY_GRACE the body must have come
        // at MIN_BODY_RATE on average.
        let slow = |s: &mut ServerSession| {
            // The rest of the body is not waited for.
            s.set_keepalive(None);
            Refusal::Gate(GateError::new(408, "the request body arrives too slowly"))
        };
        let Ok(read) = tokio::time::timeout(BODY_READ_TIMEOUT, s.read_request_body()).await else {
            return Err(slow(s));
        };
        match read {
            Ok(Some(chunk)) => {
                got += chunk.len() as u64;
                let elapsed = started.elapsed();
                if elapsed > BODY_GRACE && (got as f64) < MIN_BODY_RATE * elapsed.as_secs_f64() {
                    return Err(slow(s));
                }
                let have = first.as_ref().map_or(0, Bytes::len) + buf.len();
                if (have + chunk.len()) as u64 > limit {
                    return Err(too_large());
                }
                match first.take() {
                    None if buf.is_empty() => first = Some(chunk),
                    Some(f) => {
                        buf.extend_from_slice(&f);
                        buf.extend_from_slice(&chunk);
                    }
                    None => buf.extend_from_slice(&chunk),
                }
            }
            Ok(None) => break,
            Err(e) => {
                s.set_keepalive(None);
                return Err(Refusal::Gate(GateError::new(
                    400,
                    format!("cannot read the request body: {e}"),
                )));
            }
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// The upstream request header without a key: built once per request; each attempt adds its key
/// (see [`head::request_head`], which also gives the body's length).
///
/// NOTE: built as `http` parts, not with pingora's `insert_header`, which turns every name into
/// its title-cased bytes and parses it back, allocating twice for a name outside the standard
/// set, even for a header that keeps no case.
fn upstream_header(
    generation: &Generation,
    client: &RequestHeader,
    path: &str,
    query: &str,
) -> Result<RequestHeader, Refusal> {
    let mut target = String::with_capacity(path.len() + 1 + query.len());
    target.push_str(path);
    if !query.is_empty() {
        target.push('?');
        target.push_str(query);
    }
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = client.method.clone();
    parts.uri = http::Uri::from_maybe_shared(Bytes::from(target))
        .map_err(|_| Refusal::Gate(GateError::new(400, "the request path cannot be forwarded")))?;
    let headers = &mut parts.headers;
    headers.reserve(client.headers.len() + 1 + generation.config.custom_headers.len());
    if let Some(host) = &generation.target.host {
        headers.insert(header::HOST, host.clone());
    }
    let listed = connection_listed(&client.headers);
    let forward = &generation.config.forward_headers;
    for (name, value) in &client.headers {
        let n = name.as_str();
        let held_back = HELD_BACK.contains(&n) && !forward.contains(name);
        if !(skip_request_header(n) || held_back || listed.iter().any(|l| l == n)) {
            headers.append(name.clone(), value.clone());
        }
    }
    for (name, value) in &generation.config.custom_headers {
        headers.insert(name.clone(), value.clone());
    }
    Ok(RequestHeader::from(parts))
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters).
pub(crate) fn encode_query_value(value: &str) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const RESERVED: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    utf8_percent_encode(value, RESERVED).to_string()
}

/// The request's query string without the client's `key=` credential: what goes upstream.
fn client_query(s: &ServerSession) -> String {
    s.req_header()
        .uri
        .query()
        .map(strip_key_param)
        .unwrap_or_default()
}

/// Removes the client's `key` credential from a query string, in any spelling Google might
/// read as `key` (`%6Bey`, `KEY`, `key` without a value).
fn strip_key_param(query: &str) -> String {
    query
        .split('&')
        .filter(|p| {
            let name = p.split_once('=').map_or(*p, |(name, _)| name);
            !p.is_empty() && !auth::form_decode(name).trim().eq_ignore_ascii_case("key")
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Sends a request's head and body on `conn` (in one write when they fit one), then reads the
/// answer's header with pingora's client; each step within `timeout`.
async fn send_request(
    mut conn: Stream,
    peer: &HttpPeer,
    head: &[u8],
    body: &[u8],
    timeout: Duration,
) -> pingora::Result<HttpSession> {
    use tokio::io::AsyncWriteExt;
    let write = async {
        conn.write_all(head).await?;
        conn.write_all(body).await?;
        conn.flush().await
    };
    tokio::time::timeout(timeout, write)
        .await
        .map_err(|_| {
            pingora::Error::explain(
                ErrorType::WriteTimedout,
                "while writing the request (timeout)",
            )
        })?
        .map_err(|e| {
            pingora::Error::because(ErrorType::WriteError, "while writing the request", e)
        })?;
    let mut up = Target::session(conn, peer);
    up.set_read_timeout(Some(timeout));
    up.read_response_header().await?;
    Ok(up)
}

/// Reads an upstream body up to `limit` bytes; the flag says whether it was read to its end.
async fn read_to_end(up: &mut HttpSession, limit: usize) -> (Bytes, bool) {
    let mut buf = BytesMut::new();
    loop {
        match up.read_response_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return (buf.freeze(), false);
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return (buf.freeze(), true),
            Err(_) => return (buf.freeze(), false),
        }
    }
}

/// Relays a 2xx answer to the client as it arrives. Nothing is written to the client until the
/// first chunk is in hand, so an upstream that fails before that is retried on another key.
async fn relay(
    s: &mut ServerSession,
    up: &mut HttpSession,
    req: &UpstreamRequest,
    x: &mut Exchange,
) -> Result<Finished, Failure> {
    let upstream = up.response_header().expect("the response header was read");
    let mut head = response_parts(upstream.status.as_u16(), x);
    // A translated stream is gemgate's own answer: none of Google's headers apply to it.
    let mut chat = req.chat.as_ref().map(|c| c.start(&x.id));
    if chat.is_some() {
        let h = &mut head.headers;
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    let listed = connection_listed(&upstream.headers);
    for (name, value) in upstream.headers.iter().filter(|_| chat.is_none()) {
        let n = name.as_str();
        let hop = is_hop_by_hop(n) || listed.iter().any(|l| l == n);
        if !(hop
            || req.stream && n == "content-length"
            || n == "x-request-id"
            || x.cors && n.starts_with("access-control-"))
        {
            head.headers.append(name.clone(), value.clone());
        }
    }
    let has_body = !matches!(upstream.status.as_u16(), 204 | 304);
    // NOTE: pingora falls back to a close-delimited body when a response has neither length
    // nor chunking; say chunked so the connection stays reusable. (HTTP/1.0 clients get the
    // close-delimited body.) pingora flushes a chunked answer's header at once, and each chunk
    // after it: the chunk that follows the header at once, or the end that follows the last
    // chunk at once, can share its send (see `wire::Gathered`).
    let chunked = has_body
        && head.headers.get(header::CONTENT_LENGTH).is_none()
        && s.req_header().version == http::Version::HTTP_11;
    if chunked {
        head.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let mut head = Some(ResponseHeader::from(head));
    let mut framer = req.sse.then(sse::EventFramer::default);
    let mut batches = upstream::BodyBatches::default();
    loop {
        match batches.next(up).await {
            Ok(Some(chunk)) => {
                let ready = match &mut framer {
                    Some(f) => f.push(chunk),
                    None => chunk,
                };
                if let Some(t) = crate::store::usage::tokens_in(&ready) {
                    x.tokens = t;
                }
                let pieces: Vec<(Bytes, Duration)> = match &mut chat {
                    Some(c) => c
                        .push_paced(&ready)
                        .into_iter()
                        .map(|p| (Bytes::from(p.event), p.pause))
                        .collect(),
                    None => vec![(ready, Duration::ZERO)],
                };
                // The upstream is done: the end of the answer follows at once, so this batch
                // can wait for it and leave in the same send.
                let last = chunked && batches.ended() && chat.is_none();
                for (event, pause) in pieces {
                    if event.is_empty() {
                        continue;
                    }
                    if !start_answer(s, &mut head, chunked, x).await {
                        return Ok(Finished::Relayed(Outcome::Close));
                    }
                    if last {
                        wire::Gathered::hold_flush_of(s.stream());
                    }
                    if s.write_response_body(event, false).await.is_err() {
                        x.class = Some("client_gone");
                        return Ok(Finished::Relayed(Outcome::Close));
                    }
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
            Ok(None) => {
                let mut rest = framer
                    .as_mut()
                    .map(sse::EventFramer::finish)
                    .unwrap_or_default();
                if let Some(t) = crate::store::usage::tokens_in(&rest) {
                    x.tokens = t;
                }
                if let Some(c) = &mut chat {
                    let translated = c.push(&rest);
                    if head.is_some() && translated.is_empty() {
                        return Err(Failure::network(
                            ErrorClass::Network,
                            "the upstream ended the stream before sending anything",
                        ));
                    }
                    rest = Bytes::from(translated + &c.finish());
                }
                if head.is_some() && req.stream && rest.is_empty() {
                    return Err(Failure::network(
                        ErrorClass::Network,
                        "the upstream ended the stream before sending anything",
                    ));
                }
                if !start_answer(s, &mut head, chunked, x).await {
                    return Ok(Finished::Relayed(Outcome::Close));
                }
                let done = s.write_response_body(rest, true).await;
                return Ok(Finished::Relayed(if done.is_ok() {
                    Outcome::Reuse
                } else {
                    Outcome::Close
                }));
            }
            Err(e) => {
                if head.is_some() {
                    return Err(Failure::from_pingora(e));
                }
                // Bytes have gone out: never start the answer again. SSE clients get an error
                // event and a clean end; other clients see the connection break off.
                x.class = Some("stream_interrupted");
                tracing::warn!(id = %x.id, "upstream stream interrupted: {}", e.to_string().trim());
                if !req.sse {
                    return Ok(Finished::Relayed(Outcome::Close));
                }
                let event = GateError::new(
                    502,
                    format!(
                        "the upstream stream was interrupted: {}",
                        e.etype().as_str()
                    ),
                );
                let mut data = BytesMut::from(&b"data: "[..]);
                data.extend_from_slice(&event.body(x.protocol));
                data.extend_from_slice(b"\r\n\r\n");
                if chat.is_some() {
                    data.extend_from_slice(b"data: [DONE]\n\n");
                }
                let done = s.write_response_body(data.freeze(), true).await;
                return Ok(Finished::Relayed(if done.is_ok() {
                    Outcome::Reuse
                } else {
                    Outcome::Close
                }));
            }
        }
    }
}

/// Writes the answer's header, if it has not gone yet, with its time to first byte; `false`:
/// the client is gone. A chunked answer's header waits for the chunk that follows it at once.
async fn start_answer(
    s: &mut ServerSession,
    head: &mut Option<ResponseHeader>,
    chunked: bool,
    x: &mut Exchange,
) -> bool {
    let Some(h) = head.take() else {
        return true;
    };
    x.ttfb = Some(x.started.elapsed());
    if chunked {
        wire::Gathered::hold_flush_of(s.stream());
    }
    s.write_response_header(Box::new(h)).await.is_ok()
}

pub(crate) fn response_header(status: u16, x: &mut Exchange) -> ResponseHeader {
    ResponseHeader::from(response_parts(status, x))
}

/// The start of every answer: `status`, the request id and, for a browser's call, CORS.
///
/// NOTE: filled as `http` parts, then made a [`ResponseHeader`]: see [`upstream_header`].
pub(crate) fn response_parts(status: u16, x: &mut Exchange) -> http::response::Parts {
    x.status = status;
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = http::StatusCode::from_u16(status).expect("valid status");
    let h = &mut parts.headers;
    h.reserve(8);
    if let Ok(id) = HeaderValue::from_str(&x.id) {
        h.insert(X_REQUEST_ID, id);
    }
    if x.cors {
        // Browser-based clients call gemgate from their own origin, as they could gemini-balance.
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-request-id, retry-after"),
        );
    }
    parts
}

pub(crate) async fn send_gate(s: &mut ServerSession, x: &mut Exchange, e: &GateError) -> Outcome {
    let mut h = response_header(e.status, x);
    let _ = h.insert_header(header::CONTENT_TYPE, "application/json; charset=UTF-8");
    if let Some(secs) = e.retry_after_s {
        let _ = h.insert_header(header::RETRY_AFTER, secs);
    }
    write_full(s, h, e.body(x.protocol)).await
}

pub(crate) async fn send(
    s: &mut ServerSession,
    x: &mut Exchange,
    status: u16,
    json: Bytes,
) -> Outcome {
    let mut h = response_parts(status, x);
    h.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    write_full(s, ResponseHeader::from(h), json).await
}

pub(crate) async fn write_full(
    s: &mut ServerSession,
    mut h: ResponseHeader,
    body: Bytes,
) -> Outcome {
    let _ = h.insert_header(header::CONTENT_LENGTH, body.len());
    if s.write_response_header(Box::new(h)).await.is_err()
        || s.write_response_body(body, true).await.is_err()
    {
        return Outcome::Close;
    }
    Outcome::Reuse
}

/// A policy refusal as the client's error.
fn denied(d: Denial) -> Refusal {
    Refusal::Gate(GateError::new(d.status, d.message))
}

/// The model list as `filter_models` plugins leave it.
fn filter_models(
    generation: &Generation,
    models: Vec<serde_json::Value>,
    x: &mut Exchange,
) -> Result<Vec<serde_json::Value>, Refusal> {
    if !generation.policy.has_filter_models() {
        return Ok(models);
    }
    let client = x.client.clone().unwrap_or_default();
    generation
        .policy
        .filter_models(models, &client, &x.id, &mut x.shared)
        .map_err(denied)
}

/// One page of a model list (a request with `pageToken`), through `filter_models`.
fn filter_page(generation: &Generation, page: Bytes, x: &mut Exchange) -> Result<Bytes, Refusal> {
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
    v["models"] = serde_json::Value::Array(filter_models(generation, models, x)?);
    Ok(Bytes::from(v.to_string()))
}

/// Applies a plugin rewrite to a JSON request body.
fn rewrite_body(body: &[u8], rewrite: &Rewrite) -> Result<Bytes, Refusal> {
    let mut v: serde_json::Value = serde_json::from_slice(body).map_err(|_| {
        Refusal::Gate(GateError::new(
            400,
            "the request body must be a JSON object",
        ))
    })?;
    rewrite_value(&mut v, rewrite)?;
    Ok(Bytes::from(
        serde_json::to_vec(&v).expect("a JSON value serialises"),
    ))
}

/// Applies a plugin rewrite (`generation_config`, `generation_config_defaults`, `tools`) to a
/// Gemini request.
fn rewrite_value(v: &mut serde_json::Value, rewrite: &Rewrite) -> Result<(), Refusal> {
    if !rewrite.touches_body() {
        return Ok(());
    }
    let bad = |m: &str| Refusal::Gate(GateError::new(400, m));
    let obj = v
        .as_object_mut()
        .ok_or_else(|| bad("the request body must be a JSON object"))?;
    if rewrite.generation_config.is_some() || rewrite.generation_config_defaults.is_some() {
        let slot = obj
            .entry("generationConfig")
            .or_insert_with(|| serde_json::json!({}));
        if let Some(defaults) = &rewrite.generation_config_defaults {
            let mut merged = defaults.clone();
            crate::policy::engine::merge(&mut merged, slot.take());
            *slot = merged;
        }
        if let Some(over) = &rewrite.generation_config {
            crate::policy::engine::merge(slot, over.clone());
        }
    }
    if !rewrite.tools.is_empty() {
        let tools = obj.entry("tools").or_insert_with(|| serde_json::json!([]));
        let list = tools
            .as_array_mut()
            .ok_or_else(|| bad("`tools` in the request body must be a list"))?;
        for tool in &rewrite.tools {
            // A tool of the same kind (`googleSearch`, `codeExecution`, …) is not added twice.
            let kind = tool.as_object().and_then(|t| t.keys().next());
            let present = list.iter().any(|t| {
                t.as_object()
                    .is_some_and(|t| kind.is_some_and(|k| t.contains_key(k)))
            });
            if !present {
                list.push(tool.clone());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_request_ids_are_16_random_hex_digits() {
        fastrand::seed(7);
        let n = fastrand::u64(..);
        fastrand::seed(7);
        assert_eq!(new_request_id(), format!("{n:016x}"));
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn millis_have_two_decimals() {
        let millis = |d| {
            let mut out = String::new();
            push_millis(&mut out, d);
            out
        };
        assert_eq!(millis(Some(Duration::from_micros(1_234_567))), "1234.56");
        assert_eq!(millis(Some(Duration::from_micros(5))), "0.00");
        assert_eq!(millis(None), "-");
    }

    #[test]
    fn page_tokens_are_encoded() {
        assert_eq!(encode_query_value("ab/c=+d"), "ab%2Fc%3D%2Bd");
        assert_eq!(encode_query_value("a-b.c_d~é"), "a-b.c_d~%C3%A9");
    }

    #[test]
    fn key_param_is_stripped() {
        assert_eq!(strip_key_param("alt=sse&key=sk-1"), "alt=sse");
        assert_eq!(strip_key_param("key=sk-1"), "");
        for spelling in [
            "%6Bey=sk-1",
            "%6b%65%79=sk-1",
            "KEY=sk-1",
            "Key=sk-1",
            "key",
            "key%20=x",
        ] {
            assert_eq!(
                strip_key_param(&format!("a=1&{spelling}")),
                "a=1",
                "{spelling}"
            );
        }
        assert_eq!(
            strip_key_param("pageSize=5&monkey=1"),
            "pageSize=5&monkey=1"
        );
    }
}

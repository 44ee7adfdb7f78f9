//! The listening side: worker threads with their own listening sockets, connections and their
//! keep-alive loop, and the dispatch of each request to the proxy or the admin UI.

mod access;
pub mod route;
pub mod workers;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;

use crate::admin::pages;
use crate::app::Generation;
use crate::http::auth;
use crate::http::peer;
use crate::http::reply::{GateError, Protocol};
use crate::proxy::exchange::{Exchange, Kind};
use crate::proxy::{
    DRAIN_TIMEOUT, Gateway, MAX_TARGET, Outcome, X_GOOG_API_KEY, response_header, send, send_gate,
    write_full,
};
use route::Route;

impl Gateway {
    /// Serves one request, then hands its record to `on_log` plugins.
    async fn handle(&self, s: &mut ServerSession, x: &mut Exchange) -> Outcome {
        let generation = self.state.serving();
        let outcome = self.serve(&generation, s, x).await;
        x.answered();
        let hooked = matches!(x.kind, Kind::Call | Kind::Admin);
        if hooked && generation.policy.has_on_log(&x.model) {
            let entry = x.entry();
            let meta = &x.meta;
            meta.with_shared(|shared| {
                generation
                    .policy
                    .on_log(&entry, meta.client(), &meta.id, shared)
            });
        }
        outcome
    }

    /// Checks what every request must pass (its target's length), routes it, and answers.
    async fn serve(
        &self,
        generation: &Arc<Generation>,
        s: &mut ServerSession,
        x: &mut Exchange,
    ) -> Outcome {
        // A client that stops reading must not hold a request (and its key) forever.
        s.set_write_timeout(Some(generation.config.timeout));
        if s.req_header().method == http::Method::OPTIONS {
            return preflight(s, x).await;
        }
        x.meta.peer = peer::Peer::of(s, &generation.config.trusted_proxies);
        let path = s.req_header().uri.path().to_owned();
        let req = s.req_header();
        if req.raw_path().len() > MAX_TARGET {
            x.meta.protocol = route::protocol_of(&path);
            let e = GateError::new(
                414,
                format!("the request target is longer than {MAX_TARGET} bytes"),
            );
            return send_gate(s, x, &e).await;
        }
        let goog_credential = req.headers.contains_key(X_GOOG_API_KEY)
            || req
                .uri
                .query()
                .is_some_and(|q| auth::query_param(q, "key").is_some());
        let route = route::route(&path, goog_credential);
        if self.metrics_only && !matches!(route, Route::Metrics | Route::Health | Route::Ready) {
            let e = GateError::new(
                404,
                "this listener serves /metrics, /health and /ready alone",
            );
            return send_gate(s, x, &e).await;
        }
        match route {
            Route::Health => {
                x.own(Kind::Health, "health");
                let body = self.liveness(generation);
                send(s, x, 200, Bytes::from(body)).await
            }
            Route::Metrics => {
                x.own(Kind::Admin, "metrics");
                self.metrics(generation, s, x).await
            }
            Route::Ready => {
                x.own(Kind::Health, "ready");
                let (status, body) = self.readiness(generation);
                send(s, x, status, Bytes::from(body.to_string())).await
            }
            Route::NotFound => {
                x.meta.protocol = route::protocol_of(&path);
                let e = GateError::new(404, "gemgate does not serve this path");
                send_gate(s, x, &e).await
            }
            Route::Invalid(why) => {
                x.meta.protocol = route::protocol_of(&path);
                send_gate(s, x, &GateError::new(400, why)).await
            }
            Route::Page(page) => {
                x.own(Kind::Admin, "admin");
                let answer = Box::pin(self.page(generation, s, page, &x.meta.peer)).await;
                send_page(s, x, answer).await
            }
            Route::Admin(call) => {
                x.own(Kind::Admin, "admin");
                // Rare routes are boxed: their state stays out of every request's future.
                match Box::pin(self.admin(generation, s, call, &x.meta.peer)).await {
                    Ok(body) => send(s, x, 200, body).await,
                    Err(e) => send_gate(s, x, &e).await,
                }
            }
            route => self.call(generation, s, x, route).await,
        }
    }

    /// `/health`'s body: liveness, 200 while the process serves, a fleet's Redis away or not.
    fn liveness(&self, generation: &Generation) -> String {
        let keys = generation.pool.keys().len();
        match self.state.lasting.shared.fleet_status() {
            None => format!(r#"{{"status":"ok","keys":{keys}}}"#),
            Some(fleet) => serde_json::json!({
                "status": "ok",
                "keys": keys,
                "fleet": {
                    "instance": fleet["instance"],
                    "redis": fleet["status"],
                    "degraded": fleet["degraded"],
                    "members_live": fleet["members_live"],
                },
            })
            .to_string(),
        }
    }

    /// `GET /metrics`: the exposition, in OpenMetrics when the client asks for it.
    async fn metrics(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        x: &mut Exchange,
    ) -> Outcome {
        let config = &generation.config.file.metrics;
        if !config.enabled {
            let e = GateError::new(404, "metrics are off (metrics.enabled)");
            return send_gate(s, x, &e).await;
        }
        if !config.public {
            let req = s.req_header();
            let presented = req
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let refused = match (generation.config.auth_token.as_ref(), presented) {
                (None, _) => Some(GateError::new(
                    403,
                    "metrics need AUTH_TOKEN (or GEMGATE_METRICS_PUBLIC=true)",
                )),
                (Some(_), None) => Some(GateError::new(
                    401,
                    "send Authorization: Bearer <AUTH_TOKEN> for the metrics",
                )),
                (Some(token), Some(p)) => crate::app::session::login(
                    &*self.state.lasting.shared,
                    p,
                    token.expose(),
                    x.meta.peer.ip,
                )
                .err(),
            };
            if let Some(e) = refused {
                return send_gate(s, x, &e).await;
            }
        }
        let openmetrics = s
            .req_header()
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/openmetrics-text"));
        let body = self
            .state
            .lasting
            .prometheus
            .render(&self.scrape(generation), openmetrics);
        x.status = 200;
        let mut h = response_header(200, x);
        let _ = h.insert_header(
            header::CONTENT_TYPE,
            crate::metrics::content_type(openmetrics),
        );
        write_full(s, h, Bytes::from(body)).await
    }

    /// Exports a finished client request's span, with its attempts' spans.
    fn trace(&self, x: &Exchange) {
        use crate::traces::{Span, Value};
        let (Some(tracer), Some(ctx)) = (&self.state.lasting.tracer, x.meta.trace) else {
            return;
        };
        if x.kind != Kind::Call {
            return;
        }
        let now = crate::traces::now_ns();
        let start = now.saturating_sub(x.meta.started.elapsed().as_nanos() as u64);
        let end = start.saturating_add(x.latency().as_nanos() as u64);
        let operation = operation_of(&x.action);
        let mut attributes = vec![
            ("gen_ai.operation.name", Value::Str(operation.to_owned())),
            ("gen_ai.provider.name", Value::Str("gcp.gemini".to_owned())),
            ("gen_ai.request.model", Value::Str(x.model.clone())),
            ("http.response.status_code", Value::Int(i64::from(x.status))),
            ("gemgate.request_id", Value::Str(x.meta.id.clone())),
            ("gemgate.attempts", Value::Int(i64::from(x.attempts))),
        ];
        if let Some(client) = &x.meta.client {
            attributes.push(("gemgate.client", Value::Str(client.clone())));
        }
        if x.tokens.prompt > 0 || x.tokens.output > 0 {
            attributes.push((
                "gen_ai.usage.input_tokens",
                Value::Int(x.tokens.prompt as i64),
            ));
            attributes.push((
                "gen_ai.usage.output_tokens",
                Value::Int(x.tokens.output as i64),
            ));
        }
        if let Some(class) = x.class {
            attributes.push(("error.type", Value::Str(class.as_str().to_owned())));
        }
        let request = Span {
            trace_id: ctx.trace_id,
            span_id: ctx.span_id,
            parent: ctx.parent,
            name: format!("{operation} {}", x.model).trim_end().to_owned(),
            server: true,
            start_ns: start,
            end_ns: end,
            attributes,
            error: x.status >= 500,
        };
        let attempts = std::mem::take(&mut *x.meta.spans.lock().unwrap_or_else(|e| e.into_inner()));
        tracer.record(std::iter::once(request).chain(attempts));
    }

    /// Keeps a finished call's record in the request log.
    fn push_log(&self, x: Exchange) {
        if x.kind != Kind::Call {
            return;
        }
        // Only a known client's requests reach the logs and their indexes: anyone can send
        // the others, and would fill the disk with strings of their choosing.
        match x.meta.client {
            Some(_) => {
                let sample = self.state.current.load().config.file.logs.request_sample;
                // A traced request is always kept: its trace is what was asked for.
                let unsampled = !x.meta.traced && sample < 1.0 && fastrand::f64() >= sample;
                let instance = self.state.lasting.instance.as_deref();
                self.state
                    .lasting
                    .logs
                    .push(x.into_record(unsampled, instance));
            }
            None => self.state.refused.count_request(x.status),
        }
    }

    /// Counts a finished request for `/metrics`.
    fn count(&self, x: &Exchange) {
        use crate::metrics::Route as R;
        use crate::store::logs::Surface;
        if x.kind == Kind::Health || !self.state.current.load().config.file.metrics.enabled {
            return;
        }
        let route = match (x.kind, x.meta.protocol) {
            (Kind::Admin, _) => R::Admin,
            (Kind::Preflight, _) => R::Other,
            (_, _) if x.action.is_empty() => R::Other,
            (_, _) if x.action.starts_with("interactions") => R::Interactions,
            (_, _) if Surface::of(&x.action, &x.model) == Surface::Batch => R::Batch,
            (_, _) if Surface::of(&x.action, &x.model) == Surface::Live => R::Live,
            (_, _) if x.action.starts_with("files") => R::Files,
            (_, Protocol::Gemini) => R::Gemini,
            (_, Protocol::OpenAi) => R::OpenAi,
            (_, Protocol::GoogleOpenAi) => R::OpenAiPassthrough,
            (_, Protocol::Anthropic) => R::Anthropic,
        };
        self.state
            .lasting
            .prometheus
            .request(crate::metrics::Request {
                route,
                model: &x.model,
                status: x.status,
                duration: x.latency(),
                ttfb: x.ttfb,
            });
    }

    /// The figures `/metrics` reads where they are kept.
    fn scrape(&self, generation: &Generation) -> crate::metrics::Scrape {
        let now = crate::clock::now_ms();
        let mut keys = [0; 3];
        for key in generation.pool.keys() {
            let i = match key.state_name(now) {
                "active" => 0,
                "cooling" => 1,
                _ => 2,
            };
            keys[i] += 1;
        }
        crate::metrics::Scrape {
            keys,
            connections: self.state.open_connections.load(Ordering::Relaxed),
            rejected: self.state.refused.counts().to_vec(),
            log_records_dropped: self.state.lasting.logs.dropped(),
            plugin_errors: generation.policy.stats.snapshot().into_iter().collect(),
            plugin_durations: generation
                .policy
                .stats
                .timings
                .snapshot()
                .into_iter()
                .map(|(plugin, hook, t)| {
                    let (counts, sum_s) = t.snapshot();
                    crate::metrics::HookDurations {
                        plugin,
                        hook,
                        bounds: &crate::policy::trace::BUCKETS,
                        counts,
                        sum_s,
                    }
                })
                .collect(),
            cluster_up: self
                .state
                .lasting
                .shared
                .fleet_status()
                .map(|f| f["status"] == "ok"),
            storm: (
                self.state.lasting.storms.active(),
                self.state.lasting.storms.count(),
            ),
        }
    }

    /// Whether this instance should get traffic (`/ready`): not while it drains after SIGTERM,
    /// nor without a key that could serve (none configured, or every one disabled). A key
    /// cooling down for one model still serves others: it counts as usable.
    fn readiness(&self, generation: &Generation) -> (u16, serde_json::Value) {
        let keys = generation.pool.keys();
        let usable = keys.iter().filter(|k| !k.state.is_disabled()).count();
        let why = if self.state.draining.load(Ordering::Acquire) {
            Some("draining: the instance is shutting down")
        } else if keys.is_empty() {
            Some("no Gemini API key is configured")
        } else if usable == 0 {
            Some("every Gemini API key is disabled")
        } else {
            None
        };
        let mut body =
            serde_json::json!({ "ready": why.is_none(), "keys": keys.len(), "usable": usable });
        match why {
            None => (200, body),
            Some(why) => {
                body["why"] = why.into();
                (503, body)
            }
        }
    }

    /// A client's call: proxied, or refused in the client's protocol.
    async fn call(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        x: &mut Exchange,
        route: Route,
    ) -> Outcome {
        let answered = match route {
            Route::Native(call) => {
                x.model = call.model().to_owned();
                x.action = call.action().to_owned();
                self.native(generation, s, call, x).await
            }
            Route::OpenAi(call) => {
                x.meta.protocol = Protocol::OpenAi;
                x.action = call.action().to_owned();
                Box::pin(self.openai(generation, s, call, x)).await
            }
            Route::Responses(id) => {
                x.meta.protocol = Protocol::OpenAi;
                x.action = "responses".into();
                Box::pin(self.responses(generation, s, id, x)).await
            }
            Route::Anthropic(call) => {
                x.meta.protocol = Protocol::Anthropic;
                x.action = call.action().to_owned();
                Box::pin(self.anthropic(generation, s, call, x)).await
            }
            Route::Upload => Box::pin(self.file_upload(generation, s, x)).await,
            Route::Files(id) => {
                x.action = "files".into();
                Box::pin(self.files(generation, s, id, x)).await
            }
            Route::Caches(id) => {
                x.action = "cachedContents".into();
                Box::pin(self.caches(generation, s, id, x)).await
            }
            Route::Interactions(id, verb) => {
                Box::pin(self.interactions(generation, s, id, verb, x)).await
            }
            Route::Batches(id, verb) => Box::pin(self.batches(generation, s, id, verb, x)).await,
            Route::Download(id) => Box::pin(self.download(generation, s, &id, x)).await,
            Route::AuthTokens => Box::pin(self.auth_tokens(generation, s, x)).await,
            Route::Live {
                version,
                constrained,
            } => Box::pin(self.live(generation, s, &version, constrained, x)).await,
            Route::GoogleOpenAi(rest) => {
                x.meta.protocol = Protocol::GoogleOpenAi;
                x.action = format!("openai/{rest}");
                Box::pin(self.google_openai(generation, s, &rest, x)).await
            }
            Route::Health
            | Route::Ready
            | Route::Metrics
            | Route::NotFound
            | Route::Invalid(_)
            | Route::Page(_)
            | Route::Admin(_) => {
                unreachable!("answered by `serve`")
            }
        };
        match answered {
            Ok(outcome) => outcome,
            Err(refusal) => self.refuse(generation, s, x, refusal).await,
        }
    }
}

impl Gateway {
    /// Serves the next request of an HTTP/1 connection, and gives the connection back when it
    /// can carry another one.
    ///
    /// NOTE: the worker's own keep-alive loop calls this rather than pingora's
    /// `HttpServerApp::process_new_http`, whose boxed future (about 12 KB, copied onto the heap
    /// for every request) cost more than reading the request.
    #[allow(clippy::manual_async_fn)] // See the NOTE in its body.
    pub(crate) fn serve_request(
        &self,
        mut s: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> impl Future<Output = Option<Stream>> {
        // NOTE: not an `async fn`, which moves its arguments into locals of its own: its future
        // held the session (680 bytes) twice, for the whole request.
        async move {
            // Set before reading (the wait for this request) and again after it, in case the
            // shutdown began meanwhile (whether the connection stays open after the answer).
            let keepalive = || (!*shutdown.borrow()).then_some(workers::KEEPALIVE.as_secs());
            s.set_keepalive(keepalive());
            match tokio::time::timeout(self.header_timeout(), s.read_request()).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return None,
                Ok(Err(e)) => {
                    tracing::debug!("bad request from client: {e}");
                    self.state.refused.malformed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Err(_) => {
                    tracing::debug!("a request head did not arrive in time");
                    self.state.refused.slow.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
            s.set_keepalive(keepalive());
            // A body left unread by an early answer is drained for a bounded time only.
            s.set_total_drain_timeout(Some(DRAIN_TIMEOUT));
            // NOTE: by default pingora closes a connection answered before its request body was
            // read, so a client still uploading gets a broken pipe instead of our 413 or 401.
            s.set_close_on_response_before_downstream_finish(false);
            let _in_flight = InFlight::enter(&self.state.in_flight);
            let mut x = Exchange::new(s.req_header());
            if self.state.lasting.tracer.is_some() {
                let parent = s.req_header().headers.get("traceparent");
                x.meta.trace = Some(crate::traces::Context::of(
                    parent.and_then(|v| v.to_str().ok()),
                ));
            }
            let outcome = self.handle(&mut s, &mut x).await;
            let tunnel = x.tunnel.take().map(|t| (t, x.meta.id.clone()));
            x.log();
            self.count(&x);
            self.trace(&x);
            self.push_log(x);
            if let Some((tunnel, id)) = tunnel {
                // A Live session, logged above as its handshake; its end has a line of its own.
                let started = std::time::Instant::now();
                let ended = tunnel.join(s, shutdown).await;
                let seconds = started.elapsed().as_secs();
                tracing::info!(id = %id, sent = ended.sent, received = ended.received, seconds, why = ended.why, "live session ended");
                return None;
            }
            if outcome == Outcome::Close {
                return None;
            }
            match s.finish().await {
                Ok(reusable) => reusable.map(|r| r.into_parts().0),
                Err(_) => None,
            }
        }
    }

    /// How long a client has to send a request head (`server.header_timeout_s`).
    pub(crate) fn header_timeout(&self) -> Duration {
        self.state.current.load().config.header_timeout
    }
}

/// Counts a request in flight until dropped, however the request ends.
struct InFlight<'a>(&'a crate::shard::Counter);

impl<'a> InFlight<'a> {
    fn enter(count: &'a crate::shard::Counter) -> Self {
        count.raise();
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.lower();
    }
}

/// The GenAI conventions' `gen_ai.operation.name` of an action.
fn operation_of(action: &str) -> &str {
    match action {
        "generateContent" | "streamGenerateContent" | "chat" | "chat.completions" => {
            "generate_content"
        }
        "embedContent" | "batchEmbedContents" | "embeddings" => "embeddings",
        "" => "request",
        other => other,
    }
}

/// Answers a CORS preflight: any origin may call with the methods and headers it asks for.
async fn preflight(s: &mut ServerSession, x: &mut Exchange) -> Outcome {
    x.own(Kind::Preflight, "preflight");
    let asked = s
        .req_header()
        .headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned();
    let mut h = response_header(204, x);
    let _ = h.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*");
    let _ = h.insert_header(header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS");
    let allow = asked.unwrap_or(HeaderValue::from_static(
        "authorization, content-type, x-goog-api-key",
    ));
    let _ = h.insert_header(header::ACCESS_CONTROL_ALLOW_HEADERS, allow);
    let _ = h.insert_header(header::ACCESS_CONTROL_MAX_AGE, "86400");
    write_full(s, h, Bytes::new()).await
}

async fn send_page(s: &mut ServerSession, x: &mut Exchange, a: pages::PageAnswer) -> Outcome {
    // Pages are for the gateway's own origin: no CORS.
    x.meta.cors = false;
    let mut h = response_header(a.status, x);
    let _ = h.insert_header(header::CONTENT_TYPE, a.content_type);
    for (name, value) in pages::PAGE_HEADERS {
        let _ = h.insert_header(*name, *value);
    }
    for (name, value) in a.headers {
        let _ = h.append_header(name, value);
    }
    write_full(s, h, a.body).await
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use futures_util::StreamExt;
    use std::net::IpAddr;
    use std::path::Path;
    use std::sync::Mutex;

    use gemgate_fake_upstream::{FakeConfig, FakeUpstream};

    use super::*;
    use crate::app::shared::{
        Admission, KeyFailure, LimitCheck, Local, Pending, SharedState, Used,
    };
    use crate::app::{Lasting, State, reload::Source};
    use crate::keys::owners::{FileRecord, Owner};
    use crate::keys::{KeyPool, Penalty};
    use crate::policy::counters::{CounterSlot, CounterStore};

    const ADMIN: &str = "admin-test-token-0123456789";

    /// Plugin counters that note each lookup by name in `COUNTED`, then count as `Local`'s.
    struct RecordingCounters(Arc<dyn CounterStore>);

    static COUNTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

    impl CounterStore for RecordingCounters {
        fn slot(
            &self,
            plugin: &str,
            name: &str,
            now_ms: u64,
        ) -> Result<Arc<dyn CounterSlot>, &'static str> {
            COUNTED
                .lock()
                .unwrap()
                .push(format!("counter {plugin} {name}"));
            self.0.slot(plugin, name, now_ms)
        }
        fn get(&self, plugin: &str, name: &str, now_ms: u64) -> i64 {
            self.0.get(plugin, name, now_ms)
        }
    }

    /// Shared state that records every call, then does what [`Local`] does.
    struct Recording {
        local: Local,
        calls: Mutex<Vec<String>>,
    }

    impl Recording {
        fn note(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }
    }

    impl SharedState for Recording {
        fn admit<'a>(&'a self, check: LimitCheck<'a>) -> Pending<'a, Admission> {
            self.note(format!("admit {} {}", check.plugin, check.subject));
            self.local.admit(check)
        }
        fn key_succeeded(&self, pool: &KeyPool, index: usize) {
            self.note(format!("key_succeeded {}", pool.get(index).spec.id));
            self.local.key_succeeded(pool, index);
        }
        fn key_failed(&self, pool: &KeyPool, index: usize, f: KeyFailure<'_>) -> Penalty {
            let id = &pool.get(index).spec.id;
            self.note(format!("key_failed {id} {} {}", f.model, f.class.as_str()));
            self.local.key_failed(pool, index, f)
        }
        fn cool_key(&self, pool: &KeyPool, index: usize, model: &str, seconds: f64, now: u64) {
            self.note(format!("cool_key {}", pool.get(index).spec.id));
            self.local.cool_key(pool, index, model, seconds, now);
        }
        fn disable_key(&self, pool: &KeyPool, index: usize, reason: &str) {
            self.note(format!("disable_key {}", pool.get(index).spec.id));
            self.local.disable_key(pool, index, reason);
        }
        fn count_usage(&self, used: Used<'_>) {
            let outcome = used.failure.map_or("ok", |c| c.as_str());
            self.note(format!("count_usage {} {outcome}", used.key_id));
            self.local.count_usage(used);
        }
        fn holds_files(&self) -> bool {
            self.local.holds_files()
        }
        fn response<'a>(
            &'a self,
            id: &'a str,
        ) -> Pending<'a, Option<crate::app::shared::StoredResponse>> {
            self.local.response(id)
        }
        fn save_response<'a>(
            &'a self,
            id: &'a str,
            stored: Option<crate::app::shared::StoredResponse>,
        ) -> Pending<'a, ()> {
            self.note(format!("save_response {id}"));
            self.local.save_response(id, stored)
        }
        fn file(&self, id: &str) -> Option<FileRecord> {
            self.local.file(id)
        }
        fn files_of(&self, client: &str) -> HashMap<String, Vec<String>> {
            self.local.files_of(client)
        }
        fn add_file(&self, id: String, record: FileRecord) {
            self.note(format!("add_file {id}"));
            self.local.add_file(id, record);
        }
        fn remove_file(&self, id: &str) {
            self.note(format!("remove_file {id}"));
            self.local.remove_file(id);
        }
        fn upload(&self, upload_id: &str) -> Option<Owner> {
            self.local.upload(upload_id)
        }
        fn start_upload(&self, upload_id: String, owner: Owner) {
            self.note("start_upload".into());
            self.local.start_upload(upload_id, owner);
        }
        fn finish_upload(&self, upload_id: &str) {
            self.local.finish_upload(upload_id);
        }
        fn client_failed(&self, ip: Option<IpAddr>) -> Option<Duration> {
            self.note("client_failed".into());
            self.local.client_failed(ip)
        }
        fn client_succeeded(&self, ip: Option<IpAddr>) {
            self.note("client_succeeded".into());
            self.local.client_succeeded(ip);
        }
        fn admin_failed(&self, ip: Option<IpAddr>) -> Option<Duration> {
            self.note("admin_failed".into());
            self.local.admin_failed(ip)
        }
        fn admin_succeeded(&self, ip: Option<IpAddr>) {
            self.note("admin_succeeded".into());
            self.local.admin_succeeded(ip);
        }
        fn open_session(&self, admin_token: &str) -> (String, String) {
            self.note("open_session".into());
            self.local.open_session(admin_token)
        }
        fn session_csrf(&self, id: &str, admin_token: &str) -> Option<String> {
            self.local.session_csrf(id, admin_token)
        }
        fn close_session(&self, id: &str) {
            self.local.close_session(id);
        }
        fn counters(&self) -> Arc<dyn CounterStore> {
            Arc::new(RecordingCounters(self.local.counters()))
        }
        fn edit_config(
            &self,
            path: &Path,
            change: &mut dyn FnMut(&str) -> Result<Option<String>, String>,
        ) -> Result<bool, crate::app::shared::EditError> {
            self.note("edit_config".into());
            self.local.edit_config(path, change)
        }
    }

    /// A gateway over `lasting`, served in this process on a loopback port (no flusher: what
    /// the request path queues stays queued), configured by the file `config` (`None`: the
    /// built-in defaults) and `vars`; with its state.
    async fn serve_in_process(
        config: Option<&Path>,
        vars: &[(&str, &str)],
        lasting: Lasting,
    ) -> (std::net::SocketAddr, Arc<State>) {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let text = config.map_or(String::new(), |p| std::fs::read_to_string(p).unwrap());
        let config_path = config.map_or("gemgate.toml".into(), Path::to_path_buf);
        let config = crate::config::from_str(&text, "test", &vars).unwrap();
        let source = Source::new(config_path, true);
        let state = State::new(config, source, lasting).unwrap();
        let gateway = Arc::new(Gateway::new(state.clone(), crate::upstream::side_client()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _stop = stop;
            while let Ok((tcp, _)) = listener.accept().await {
                let stream = Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
                tokio::spawn(workers::serve(
                    gateway.clone(),
                    stream,
                    None,
                    shutdown.clone(),
                ));
            }
        });
        (addr, state)
    }

    /// Past the log queue's room, the oldest records are dropped, and the reload status (the
    /// admin API) counts them: 1,100 failed calls whose 64 KiB bodies the error log keeps
    /// fill its 64 MiB while no flusher takes them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_past_the_log_queue_are_dropped_and_counted() {
        let fake = FakeUpstream::bind(([127, 0, 0, 1], 0).into(), FakeConfig::default())
            .await
            .unwrap();
        let base_url = fake.base_url();
        let vars = [
            ("API_KEYS", "good-1"),
            ("ALLOWED_TOKENS", "sk-test"),
            ("AUTH_TOKEN", "admin-test-token-0123456789"),
            ("BASE_URL", base_url.as_str()),
            ("ERROR_LOG_RECORD_REQUEST_BODY", "true"),
        ];
        let (addr, state) = serve_in_process(None, &vars, Lasting::default()).await;
        let url = format!("http://{addr}/v1beta/models/gemini-2.5-flash:generateContent");
        let body = format!(
            r#"{{"contents":[{{"parts":[{{"text":"{}"}}]}}]}}"#,
            "x".repeat(64 * 1024)
        );
        let client = reqwest::Client::new();
        let calls = (0..1_100).map(|_| {
            client
                .post(&url)
                .header("x-goog-api-key", "sk-test")
                .header("x-fake-error", "400 INVALID_ARGUMENT")
                .body(body.clone())
                .send()
        });
        let mut pending = futures_util::stream::iter(calls).buffer_unordered(8);
        while let Some(answer) = pending.next().await {
            assert_eq!(answer.unwrap().status(), 400);
        }
        // A request's record is queued after its answer went out: wait for the last ones.
        let logs = &state.lasting.logs;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while logs.queued() as u64 + logs.dropped() < 1_100 {
            assert!(std::time::Instant::now() < deadline, "records never queued");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let status: serde_json::Value = client
            .get(format!("http://{addr}/admin/api/reload"))
            .bearer_auth("admin-test-token-0123456789")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let dropped = status["dropped"]["log_records"].as_u64().unwrap();
        assert!((50..=100).contains(&dropped), "{status}");
        assert_eq!(
            status["dropped"]["trimmed_for_size"], 0,
            "no data file here"
        );
        // Taking them moves the records each worker thread was packing into the queue, which
        // may drop one more each.
        let kept = state.lasting.logs.take(usize::MAX);
        let dropped = state.lasting.logs.dropped();
        assert!((50..=100).contains(&dropped), "{dropped}");
        assert_eq!(
            kept.len() as u64 + dropped,
            1_100,
            "every record kept or counted"
        );
    }

    /// While the instance drains after SIGTERM, `/ready` takes it out of rotation; `/health`
    /// still says it is alive.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_draining_instance_is_alive_but_not_ready() {
        let vars = [("API_KEYS", "good-1"), ("ALLOWED_TOKENS", "sk-test")];
        let (addr, state) = serve_in_process(None, &vars, Lasting::default()).await;
        let get = |path: &'static str| reqwest::get(format!("http://{addr}{path}"));
        assert_eq!(get("/ready").await.unwrap().status(), 200);
        state.draining.store(true, Ordering::Release);
        let ready = get("/ready").await.unwrap();
        assert_eq!(ready.status(), 503);
        let body: serde_json::Value = ready.json().await.unwrap();
        assert_eq!(
            body["why"], "draining: the instance is shutting down",
            "{body}"
        );
        assert_eq!(get("/health").await.unwrap().status(), 200);
    }

    /// `/ready` is open to anyone, like `/health`: a flood of probes with junk queries and
    /// bodies costs no log row, no refusal count and no key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ready_probes_leave_no_trace() {
        let vars = [("API_KEYS", "good-1"), ("ALLOWED_TOKENS", "sk-test")];
        let (addr, state) = serve_in_process(None, &vars, Lasting::default()).await;
        let client = reqwest::Client::new();
        for i in 0..500 {
            let answer = client
                .post(format!("http://{addr}/ready?key=x&junk={}", "j".repeat(i)))
                .body("x".repeat(4096))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200);
        }
        assert!(
            state.lasting.logs.take(usize::MAX).is_empty(),
            "probes are not logged"
        );
        assert_eq!(state.refused.json()["malformed"], 0);
        assert_eq!(state.refused.json()["unauthenticated"], 0);
    }

    /// The request path and the admin UI change what a fleet shares only through
    /// `SharedState`: a gateway built over a recording implementation sees every key failure,
    /// success, usage count and token check of real requests, an admin login's session and an
    /// admin edit of the keys, and its key pool and config file reflect them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_request_path_changes_shared_state_through_its_interface() {
        let fake = FakeUpstream::bind(([127, 0, 0, 1], 0).into(), FakeConfig::default())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gemgate.toml");
        std::fs::write(
            &file,
            format!(
                "[upstream]\nbase_url = \"{}\"\n[keys]\napi_keys = [\"minute-a\", \"ok-b\"]\n\
                 [auth]\nallowed_tokens = [\"sk-test\"]\nauth_token = \"{ADMIN}\"\n",
                fake.base_url()
            ),
        )
        .unwrap();
        let lasting = Lasting::default();
        let recording = Arc::new(Recording {
            local: lasting.local(),
            calls: Mutex::default(),
        });
        let lasting = Lasting {
            shared: recording.clone(),
            ..lasting
        };
        let (addr, state) = serve_in_process(Some(&file), &[], lasting).await;

        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let url = format!("http://{addr}/v1beta/models/gemini-2.5-flash:generateContent");
        let call = |token: &'static str| {
            client
                .post(&url)
                .header("x-goog-api-key", token)
                .body(r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#)
                .send()
        };
        assert_eq!(call("sk-wrong").await.unwrap().status(), 401);
        // The minute- key answers 429 and cools, and its call is retried on the other key:
        // calls go on until a plugin's key choice has reached it (the first, by default).
        for _ in 0..20 {
            assert_eq!(call("sk-test").await.unwrap().status(), 200);
            let calls = recording.calls.lock().unwrap();
            if calls.iter().any(|c| c.starts_with("key_failed")) {
                break;
            }
        }
        // A call's usage is counted once its answer is out: wait for the last count.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let login = client
            .post(format!("http://{addr}/admin/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={ADMIN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(login.status(), 303);
        let new_key = format!("AIzaSy{}", "k".repeat(33));
        let added = client
            .post(format!("http://{addr}/admin/api/keys"))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({ "text": new_key }))
            .send()
            .await
            .unwrap();
        assert_eq!(added.status(), 200, "{:?}", added.text().await);
        assert!(std::fs::read_to_string(&file).unwrap().contains(&new_key));
        let generation = state.current.load();
        let pool = &generation.pool;
        let index = |secret: &str| {
            (0..pool.keys().len())
                .find(|&i| pool.get(i).spec.secret.expose() == secret)
                .unwrap()
        };
        let (minute, ok) = (index("minute-a"), index("ok-b"));
        let (minute_id, ok_id) = (&pool.get(minute).spec.id, &pool.get(ok).spec.id);
        let calls = recording.calls.lock().unwrap().clone();
        for expected in [
            "client_failed".to_owned(),
            "client_succeeded".to_owned(),
            "admin_succeeded".to_owned(),
            "open_session".to_owned(),
            "edit_config".to_owned(),
            format!("key_failed {minute_id} gemini-2.5-flash rate_limited"),
            format!("count_usage {minute_id} rate_limited"),
            format!("key_succeeded {ok_id}"),
            format!("count_usage {ok_id} ok"),
        ] {
            assert!(calls.contains(&expected), "{expected} in {calls:?}");
        }
        assert!(
            !calls.contains(&format!("key_succeeded {minute_id}")),
            "{calls:?}"
        );
        // The shipped round_robin plugin keeps its cursor in the shared counters.
        let counted = COUNTED.lock().unwrap().clone();
        assert!(
            counted.contains(&"counter round_robin cursor".to_owned()),
            "{counted:?}"
        );
        assert!(
            pool.get(minute)
                .state
                .cooling_until("gemini-2.5-flash", crate::clock::now_ms())
                .is_some(),
            "the failure reached the key's state"
        );
    }
}

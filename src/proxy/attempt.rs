//! The attempt loop: each attempt picks a usable key (or a `select_key` plugin does), sends
//! the request on a pooled upstream connection, and either relays or collects a 2xx answer or
//! returns the failure; the loop decides from the failure's class (and `on_error` plugins)
//! whether another key may try. Attempts return what happened; nothing is written back into
//! the request's record.

use bytes::{Bytes, BytesMut};
use http::header;
use pingora::ErrorType;
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::upstreams::peer::HttpPeer;
use std::borrow::Cow;
use std::time::Duration;

use super::exchange::{Class, Meta, Tried};
use super::relay::relay;
use super::{Failure, Finished, Gateway, Refusal, UpstreamRequest, denied};
use crate::app::Generation;
use crate::app::shared::{KeyFailure, QuotaCheck, QuotaSettle, QuotaVerdict, Used};
use crate::clock::now_ms;
use crate::http::reply::GateError;
use crate::keys::quota::{Moment, Ticket, estimate_tokens};
use crate::keys::storm::{Bare, PROBE_EVERY_MS, Pass};
use crate::keys::taxonomy::is_bare_429;
use crate::keys::taxonomy::{ErrorClass, classify, error_message, redact};
use crate::keys::{KeyPool, Penalty, Pick, seconds_until};
use crate::policy::engine::{AttemptDecision, AttemptInfo, Denial};
use crate::policy::trace::key_notes;
use crate::translate::usage::{Tokens, tokens_in};
use crate::upstream::http2::{self, Called};
use crate::upstream::response::Response;
use crate::upstream::{Target, head};

/// Largest upstream error body read for classification and relay.
const ERROR_BODY_LIMIT: usize = 256 * 1024;
/// A request counted against its project's limit.
pub(super) struct Admitted {
    ticket: Ticket,
    /// Counted in the fleet's window too.
    fleet: bool,
}

/// How many keys one attempt passes over when their projects turn out full as it takes them
/// (each such key was open a moment before: another request took the last place).
const MAX_PASSED: usize = 8;
/// Largest upstream answer gemgate buffers itself (model lists).
const COLLECT_LIMIT: usize = 64 * 1024 * 1024;

/// What `on_response` plugins made of a 2xx answer.
enum Verdict {
    Use,
    AnotherKey,
    Refuse(Denial),
}

impl Gateway {
    /// The attempt loop: up to `MAX_RETRIES` attempts, each on a different usable key. With
    /// a `client` the answer is relayed to it, else collected.
    pub(super) async fn attempts(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        mut client: Option<&mut ServerSession>,
        meta: &Meta,
    ) -> (Finished, Tried) {
        let max = generation.config.max_retries as usize;
        let mut tried = Tried::default();
        let mut used: Vec<usize> = Vec::with_capacity(max);
        let mut last: Option<Failure> = None;
        let tokens = estimate_tokens(req.body.len());
        while used.len() < max {
            let now = now_ms();
            let avoid = match self.state.lasting.storms.admit(now) {
                Err(wait_ms) => return (self.storm_refusal(wait_ms), tried),
                Ok(Pass::Normal) => Cow::Borrowed(&used[..]),
                // A probe passes over the keys that answered bare 429s in this storm: keys
                // broken on their own cannot keep it going.
                Ok(Pass::Probe) => Cow::Owned(self.struck_and(generation.pool_for(req), &used)),
            };
            let avoid = without_vertex(generation.pool_for(req), req, avoid);
            let admitted = self
                .admitted_key(generation, req, &avoid, tokens, meta)
                .await;
            let (index, ticket) = match admitted {
                Ok(Ok(admitted)) => admitted,
                Ok(Err(pick)) => return (self.exhausted(pick, last, req, now), tried),
                Err(d) => return (Finished::Refused(denied(d)), tried),
            };
            used.push(index);
            let pool = generation.pool_for(req);
            let key = pool.get(index);
            tried.attempts += 1;
            tried.key = Some(key.spec.id.clone());
            let _lease = pool.lease(index, now);
            let started = std::time::Instant::now();
            let outcome = self
                .attempt(
                    generation,
                    req,
                    index,
                    client.as_deref_mut(),
                    meta,
                    tried.attempts,
                )
                .await;
            let took = started.elapsed();
            if let Some(ticket) = &ticket {
                self.settle(generation.pool_for(req), index, req, ticket, &outcome);
            }
            self.count_attempt(generation, req, index, &outcome, took, tried.attempts);
            trace_attempt(generation, req, index, &outcome, took, meta);
            let failure = match outcome {
                Ok((finished, done)) => {
                    let tried = Tried {
                        attempts: tried.attempts,
                        key: tried.key,
                        ..done
                    };
                    return (finished, tried);
                }
                Err(failure) => failure,
            };
            tried.class = Some(Class::Upstream(failure.class));
            match self.after_failure(generation, req, index, failure, meta, tried.attempts) {
                Ok(failure) => last = Some(failure),
                Err(finished) => return (finished, tried),
            }
        }
        let finished = match last {
            Some(f) => Finished::Refused(Refusal::Upstream(Box::new(f))),
            None => Finished::Refused(Refusal::Gate(GateError::new(
                503,
                "no attempt was possible",
            ))),
        };
        (finished, tried)
    }

    /// Counts an attempt (its `attempt`th) for `/metrics`.
    fn count_attempt(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        index: usize,
        outcome: &Result<(Finished, Tried), Failure>,
        took: std::time::Duration,
        attempt: u32,
    ) {
        let config = &generation.config.file.metrics;
        if !config.enabled {
            return;
        }
        let metrics = &self.state.lasting.prometheus;
        if attempt > 1 {
            metrics.retry();
        }
        let (class, tokens) = match outcome {
            Ok((_, done)) => {
                let t = done.tokens.unwrap_or_default();
                let class = match done.class {
                    Some(Class::Upstream(c)) => c.as_str(),
                    _ => "ok",
                };
                (class, [t.prompt, t.output, t.thoughts, t.cached])
            }
            Err(failure) => (failure.class.as_str(), [0; 4]),
        };
        let key = generation.pool_for(req).get(index);
        let label = config
            .key_labels
            .then(|| key.state.metric_label(|| metrics.key_label(&key.spec.id)));
        metrics.attempt(crate::metrics::Attempt {
            key: label,
            model: &req.model,
            class,
            duration: took,
            tokens,
        });
    }

    /// Records a failed attempt (usage, key health, `on_error` plugins); `Ok`: another key may
    /// try, `Err`: the loop ends with this.
    pub(super) fn after_failure(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        index: usize,
        failure: Failure,
        meta: &Meta,
        attempt: u32,
    ) -> Result<Failure, Finished> {
        let shared = &self.state.lasting.shared;
        let pool = generation.pool_for(req);
        let key = pool.get(index);
        self.count_usage(generation, req, index, Some(failure.class), None);
        // A batch job's quota is its own: its 429s cool the key for the batch model alone
        // (`batch/{model}`; nothing for a call about a batch), never for interactive traffic.
        let batch_quota = req.surface == super::Surface::Batch
            && matches!(
                failure.class,
                ErrorClass::RateLimited { .. } | ErrorClass::DailyQuota
            );
        if !batch_quota && self.in_a_storm(pool, index, req, &failure) {
            return Err(self.storm_refusal(PROBE_EVERY_MS));
        }
        let forced;
        let quota = if batch_quota {
            forced = crate::keys::taxonomy::Quota {
                scope: crate::keys::taxonomy::Scope::KeyModel,
                ..failure.quota.clone()
            };
            &forced
        } else {
            &failure.quota
        };
        let penalty = if batch_quota && req.model.is_empty() {
            Penalty::None
        } else {
            shared.key_failed(
                pool,
                index,
                KeyFailure {
                    model: &req.model,
                    class: failure.class,
                    message: &failure.message,
                    now_ms: now_ms(),
                    quota,
                },
            )
        };
        if penalty == Penalty::Cooled {
            self.state.lasting.prometheus.cooldown(
                cooldown_scope(key, failure.quota.scope),
                failure.class.as_str(),
            );
        }
        if penalty == Penalty::Confirm {
            crate::app::checks::confirm(self.state.clone(), key.spec.id.clone());
        }
        tracing::debug!(id = %meta.id, key = %key.spec.id, attempt, status = failure.status, class = failure.class.as_str(), ?penalty, message = %failure.message, "attempt failed");
        // A create that timed out may have been made: another key would make a second.
        let mut retry =
            failure.class.retryable() && (req.idempotent || failure.class != ErrorClass::Timeout);
        if generation.policy.has_attempt_hook(false, &req.model) {
            match self.after_attempt(generation, index, req, &failure, meta, attempt) {
                Ok(Some(AttemptDecision::Retry)) => retry = true,
                Ok(_) => {}
                Err(d) => return Err(Finished::Refused(denied(d))),
            }
        }
        if !retry {
            return Err(Finished::Refused(Refusal::Upstream(Box::new(failure))));
        }
        Ok(failure)
    }

    /// Tells the storm detector of an answer: `true` when it is a bare 429 of a storm (which
    /// blames no key and ends the request).
    fn in_a_storm(
        &self,
        pool: &crate::keys::KeyPool,
        index: usize,
        req: &UpstreamRequest,
        failure: &Failure,
    ) -> bool {
        let storms = &self.state.lasting.storms;
        let now = now_ms();
        if !is_bare_429(failure.status, &failure.body) {
            if (200..500).contains(&failure.status) {
                storms.calm(now);
            }
            return false;
        }
        let project = &pool.project(index).name;
        let key = pool.get(index);
        storms.bare_429(project, (&key.spec.id, &key.state), &req.model, now) != Bare::Alone
    }

    /// `used` and the keys of `pool` a storm struck; when that is every key, the storm forgets
    /// them and the probe may take any.
    fn struck_and(&self, pool: &KeyPool, used: &[usize]) -> Vec<usize> {
        let storms = &self.state.lasting.storms;
        let mut avoid = used.to_vec();
        avoid.extend(storms.struck().iter().filter_map(|id| pool.index_of(id)));
        if avoid.len() >= pool.keys().len() {
            storms.forget_struck();
            avoid.truncate(used.len());
        }
        avoid
    }

    /// The answer while Google throttles this instance: 429, retry once the next probe may go.
    fn storm_refusal(&self, wait_ms: u64) -> Finished {
        self.state.lasting.prometheus.storm_refused();
        let e = GateError::new(
            429,
            "the Gemini API is throttling this gateway as a whole (bare 429s for several projects at once); gemgate sends one request a second until it stops",
        )
        .retry_after(Some(wait_ms.div_ceil(1000).max(1)));
        Finished::Refused(Refusal::Gate(e))
    }

    /// Counts one attempt's usage (`failure`: its error class; `None` for a success, with the
    /// tokens the answer reported).
    pub(super) fn count_usage(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        index: usize,
        failure: Option<ErrorClass>,
        tokens: Option<Tokens>,
    ) {
        self.state.lasting.shared.count_usage(Used {
            key_id: &generation.pool_for(req).get(index).spec.id,
            model: &req.model,
            failure,
            tokens: tokens.unwrap_or_default(),
            now_ms: now_ms(),
        });
    }

    /// The key for the next attempt, counted against its project's limits: the choice of
    /// [`Gateway::choose_key`], or while that one's project turns out to be full (another
    /// request took the last place), the built-in choice among the others.
    pub(super) async fn admitted_key(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        used: &[usize],
        tokens: u64,
        meta: &Meta,
    ) -> Result<Result<(usize, Option<Admitted>), Pick>, Denial> {
        let pool = generation.pool_for(req);
        let now = now_ms();
        let mut pick = self.choose_key(generation, req, used, tokens, now, meta)?;
        // Made only when a key's project turns out full (most requests take the first key).
        let mut passed: Vec<usize> = Vec::new();
        let mut limited_until: Option<u64> = None;
        loop {
            let Pick::Key(index) = pick else {
                return Ok(Err(with_limit(pick, limited_until)));
            };
            match self.count_quota(pool, index, &req.model, tokens, now).await {
                Ok(admitted) => return Ok(Ok((index, admitted))),
                Err(at) => {
                    limited_until = Some(limited_until.map_or(at, |l| l.min(at)));
                    if passed.is_empty() {
                        passed.extend_from_slice(used);
                    }
                    passed.push(index);
                }
            }
            if req.pinned.is_some() || passed.len() >= used.len() + MAX_PASSED {
                return Ok(Err(pool.exhausted(&req.model, limited_until, now)));
            }
            pick = pool.pick(&req.model, &passed, tokens, now);
        }
    }

    /// Counts a request of key `index` against its project's limit for `model`: in the fleet's
    /// shared window when there is one, and in this instance's (which its choices read).
    /// `Ok(None)`: no limit applies; `Err`: the project is full until then.
    async fn count_quota(
        &self,
        pool: &KeyPool,
        index: usize,
        model: &str,
        tokens: u64,
        now: u64,
    ) -> Result<Option<Admitted>, u64> {
        let Some(limit) = pool.limit(index, model) else {
            return Ok(None);
        };
        let project = pool.project(index);
        let check = QuotaCheck {
            project: &project.windows_name,
            model,
            limit,
            tokens,
            now_ms: now,
        };
        match self.state.lasting.shared.admit_quota(check).await {
            QuotaVerdict::Here { share } => pool.admit(index, model, tokens, share, now).map(|t| {
                t.map(|ticket| Admitted {
                    ticket,
                    fleet: false,
                })
            }),
            QuotaVerdict::Admitted => Ok(Some(Admitted {
                ticket: project.windows.count(model, tokens, Moment::of(now)),
                fleet: true,
            })),
            QuotaVerdict::Denied { at_ms } => Err(at_ms),
        }
    }

    /// Ends a counted request's attempt: it moves to the second the attempt ended in, with
    /// the answer's input tokens when it said them (see [`Ticket::settle`]); in the fleet's
    /// window too when the fleet counted it.
    fn settle(
        &self,
        pool: &KeyPool,
        index: usize,
        req: &UpstreamRequest,
        admitted: &Admitted,
        outcome: &Result<(Finished, Tried), Failure>,
    ) {
        let prompt_tokens = match outcome {
            Ok((_, done)) => done.tokens.map(|t| t.prompt),
            Err(_) => None,
        };
        let now = now_ms();
        let ticket = &admitted.ticket;
        ticket.settle(prompt_tokens, Moment::of(now));
        if admitted.fleet {
            self.state.lasting.shared.settle_quota(QuotaSettle {
                project: &pool.project(index).windows_name,
                model: &req.model,
                from_second: ticket.wall_second(),
                to_second: now / 1000,
                estimate: ticket.estimate(),
                tokens: prompt_tokens.unwrap_or(ticket.estimate()),
            });
        }
    }

    /// The key for the next attempt: the first `select_key` plugin that names one still open
    /// (usable, its project not at a limit), else the built-in choice.
    fn choose_key(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        tried: &[usize],
        tokens: u64,
        now: u64,
        meta: &Meta,
    ) -> Result<Pick, Denial> {
        let pool = generation.pool_for(req);
        if let Some(i) = req.pinned {
            let key = pool.get(i);
            let held = |why: String, until_ms| Pick::Held {
                key: key.spec.id.clone(),
                why,
                until_ms,
            };
            return Ok(if tried.contains(&i) {
                pool.exhausted(&req.model, None, now)
            } else if key.state.is_disabled() {
                let reason = key.state.detail().disabled_reason.unwrap_or_default();
                held(format!("disabled ({reason})"), None)
            } else if let Some(c) = key.state.cooldown_for(&req.model, now) {
                let why = format!("cooling down after {} ({} scope)", c.class, c.scope);
                held(why, Some(c.until_ms))
            } else {
                Pick::Key(i)
            });
        }
        let built_in = || {
            let pick = pool.pick(&req.model, tried, tokens, now);
            let chosen = picked(&pick).map(|i| (i, "built-in"));
            trace_choice(meta, pool, &req.model, tried, tokens, now, chosen);
            Ok(pick)
        };
        if req.paid || !generation.policy.has_select_key(&req.model) || pool.is_empty() {
            return built_in();
        }
        let candidates = pool.candidates(&req.model, tried, now);
        if candidates.is_empty() {
            return built_in();
        }
        let chosen = meta.with_shared(|shared| {
            generation.policy.select_key(
                &req.model,
                candidates,
                meta.client(),
                &meta.id,
                now,
                shared,
            )
        })?;
        let (pick, by) = match chosen {
            Some((i, plugin))
                if pool.usable(i, &req.model, now)
                    && pool.room(i, &req.model, tokens, now).is_ok() =>
            {
                (Pick::Key(i), Some(plugin))
            }
            // No choice, or one that dropped out since the plugin's list was made.
            _ => (pool.pick(&req.model, tried, tokens, now), None),
        };
        let chosen = picked(&pick).map(|i| (i, by.as_deref().unwrap_or("built-in")));
        trace_choice(meta, pool, &req.model, tried, tokens, now, chosen);
        Ok(pick)
    }

    /// Tells `on_response` / `on_error` plugins how attempt number `attempt` went and applies
    /// what they decide about its key. `outcome` is the failure, or for a success (2xx
    /// `status`) only the status.
    fn after_attempt(
        &self,
        generation: &Generation,
        index: usize,
        req: &UpstreamRequest,
        outcome: &Failure,
        meta: &Meta,
        attempt: u32,
    ) -> Result<Option<AttemptDecision>, Denial> {
        let pool = generation.pool_for(req);
        let model = req.model.as_str();
        let key = pool.get(index);
        let success = (200..300).contains(&outcome.status);
        let info = AttemptInfo {
            id: &meta.id,
            client: meta.client(),
            model,
            status: outcome.status,
            class: if success {
                "ok"
            } else {
                outcome.class.as_str()
            },
            key_id: &key.spec.id,
            attempt,
            retry_delay_s: outcome.retry_delay_s,
            message: &outcome.message,
        };
        let decision = meta.with_shared(|shared| generation.policy.after_attempt(&info, shared))?;
        let shared = &self.state.lasting.shared;
        match &decision {
            Some(AttemptDecision::Cool(seconds)) => {
                shared.cool_key(pool, index, model, *seconds, now_ms());
                self.state
                    .lasting
                    .prometheus
                    .cooldown("key_model", "policy");
            }
            Some(AttemptDecision::Disable(reason)) => {
                tracing::warn!(key = %key.spec.id, reason = %reason, "key disabled by a plugin");
                shared.disable_key(pool, index, reason);
            }
            _ => {}
        }
        Ok(decision)
    }

    /// Sends the request with key `index` and reads the answer's head; `Err`: the upstream
    /// could not be reached or answered with an error (nothing reached the client).
    async fn exchange_head(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        index: usize,
    ) -> Result<(Response, usize), Failure> {
        let key = generation.pool_for(req).get(index);
        let target = generation.target_of(key);
        let vertex_header = match &generation.vertex {
            Some(vertex) if key.spec.vertex => {
                let header = vertex_header(generation, vertex, req).ok_or_else(|| {
                    Failure::network(ErrorClass::Client, "not a call a Vertex AI key serves")
                })?;
                Some(header)
            }
            _ => None,
        };
        let header = vertex_header.as_ref().unwrap_or(&req.header);
        let route = target.route(&key.spec.id);
        let peer = target
            .peer(route)
            .await
            .map_err(|m| Failure::network(ErrorClass::Network, m))?;
        let credential = if req.bearer {
            head::Credential::Bearer(key.spec.secret.expose())
        } else {
            head::Credential::GoogApiKey(key.header.as_bytes())
        };
        let out = Outgoing {
            header,
            body: &req.body,
            credential,
            timeout: generation.config.timeout,
        };
        let mut up = self.send(target, &peer, route, out).await?;
        let status = up.status();
        if status == 407
            && let Some(proxy) = target.forwarding(route)
        {
            // The proxy's refusal, not Google's answer: a network failure, no key's fault.
            return Err(Failure::network(
                ErrorClass::Network,
                format!("proxy {}: 407 Proxy Authentication Required", proxy.display),
            ));
        }
        if !(200..300).contains(&status) {
            let (body, _) = read_to_end(&mut up, ERROR_BODY_LIMIT).await;
            let content_type = up.head().headers.get(header::CONTENT_TYPE).cloned();
            target.release(up, route);
            return Err(Failure::of_answer(
                status,
                body,
                content_type,
                key.spec.secret.expose(),
            ));
        }
        Ok((up, route))
    }

    /// Sends `out` over `route` (over HTTP/2 when the route speaks it) and reads the answer's
    /// head.
    async fn send(
        &self,
        target: &Target,
        peer: &HttpPeer,
        route: usize,
        out: Outgoing<'_>,
    ) -> Result<Response, Failure> {
        let mut opened = None;
        if let Some(pool) = target.http2(route) {
            let call = http2::Call {
                head: http2::request_head(&target.base, out.header, out.body.len(), out.credential)
                    .map_err(Failure::from_pingora)?,
                body: out.body,
            };
            // Boxed: opening a connection and its handshake make a large future, which would
            // otherwise take room in every request's task for its whole life.
            let called = Box::pin(pool.call(&self.connector, peer, call, out.timeout)).await;
            match called.map_err(Failure::from_pingora)? {
                Called::Answer(up) => return Ok(up),
                // The upstream declined HTTP/2: this connection and every call after it speak
                // HTTP/1.1.
                Called::Declined(stream) => opened = Some(stream),
            }
        }
        let forwarding = target.forwarding(route).map(|proxy| head::Forwarding {
            authority: target.base.authority.as_str(),
            authorization: proxy.proxy_authorization(),
        });
        let head = head::request_head(out.header, out.body.len(), out.credential, forwarding);
        let call = Http1Call {
            head: &head,
            body: out.body,
            head_request: out.header.method == http::Method::HEAD,
            timeout: out.timeout,
        };
        self.send_http1(target, peer, route, call, opened).await
    }

    /// Sends `call` over HTTP/1.1 on `opened` if given (a connection just opened), else on an
    /// idle connection or a new one, and reads the answer's head.
    async fn send_http1(
        &self,
        target: &Target,
        peer: &HttpPeer,
        route: usize,
        call: Http1Call<'_>,
        mut opened: Option<pingora::protocols::Stream>,
    ) -> Result<Response, Failure> {
        let mut reuse_idle = true;
        loop {
            let (conn, reused) = match opened.take() {
                Some(stream) => (stream, false),
                None => target
                    .connection(&self.connector, peer, route, reuse_idle)
                    .await
                    .map_err(Failure::from_pingora)?,
            };
            match send_request(conn, &call).await {
                Ok(up) => return Ok(up),
                // An idle connection the server closed meanwhile: not the key's fault, and not an
                // attempt. The other idle ones are likely closed too (an upstream restart, an
                // idle timeout): drop them all and try once more on a new connection.
                Err(e) if reused && e.etype() != &ErrorType::ReadTimedout => {
                    target.drop_idle(route);
                    reuse_idle = false;
                }
                Err(e) => return Err(Failure::from_pingora(e)),
            }
        }
    }

    /// One attempt with key `index`: how it ended, and what it did (status, tokens, time to
    /// first byte, how a relayed answer broke off). `Err` means nothing reached the client and
    /// the caller may try another key.
    async fn attempt(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        index: usize,
        client: Option<&mut ServerSession>,
        meta: &Meta,
        attempt: u32,
    ) -> Result<(Finished, Tried), Failure> {
        let (mut up, route) = self.exchange_head(generation, req, index).await?;
        // Its connection goes back to the pool it came from (Vertex AI's for its keys).
        let target = generation.target_of(generation.pool_for(req).get(index));
        let status = up.status();
        // (Asked first: every answer comes here, and reading the clock for nothing costs.)
        if self.state.lasting.storms.active() {
            self.state.lasting.storms.calm(now_ms());
        }
        self.state
            .lasting
            .shared
            .key_succeeded(generation.pool_for(req), index);
        let mut done = Tried {
            status: Some(status),
            ..Tried::default()
        };
        match self.on_success(generation, req, index, status, meta, attempt) {
            Verdict::Use => {}
            Verdict::AnotherKey => {
                // The answer is dropped with its connection.
                return Err(Failure::network(
                    ErrorClass::Upstream,
                    "a plugin asked for another key",
                ));
            }
            Verdict::Refuse(d) => {
                target.release(up, route);
                return Ok((Finished::Refused(denied(d)), done));
            }
        }
        let finished = match client {
            None => {
                done.upload_headers = upload_headers(&up);
                let (body, complete) = read_to_end(&mut up, COLLECT_LIMIT).await;
                if !complete {
                    return Err(Failure::network(
                        ErrorClass::Network,
                        "the upstream's answer broke off",
                    ));
                }
                done.tokens = tokens_in(&body);
                Finished::Collected(body)
            }
            Some(s) => {
                let mut reframe = (req.reframe)(meta);
                let relayed = relay(s, &mut up, reframe.as_mut(), meta).await;
                let relayed = match relayed {
                    Ok(relayed) => relayed,
                    Err(failure) => {
                        target.release(up, route);
                        return Err(failure);
                    }
                };
                done.tokens = Some(relayed.tokens).filter(|t| *t != Tokens::default());
                done.ttfb = relayed.ttfb;
                done.class = relayed.broke;
                Finished::Relayed(relayed.outcome)
            }
        };
        target.release(up, route);
        self.count_usage(generation, req, index, None, done.tokens);
        Ok((finished, done))
    }
}

impl Gateway {
    /// The loop's end when no key is left to try: the last failure as the upstream sent it, or
    /// why no key was usable.
    pub(super) fn exhausted(
        &self,
        pick: Pick,
        last: Option<Failure>,
        req: &UpstreamRequest,
        now: u64,
    ) -> Finished {
        let (retry_at_ms, cooling, disabled, limited) = match pick {
            Pick::Exhausted {
                retry_at_ms,
                cooling,
                disabled,
                limited,
            } => (retry_at_ms, cooling, disabled, limited),
            Pick::Held { key, why, until_ms } => return held(&key, &why, until_ms, now),
            Pick::Key(_) | Pick::Empty => {
                return Finished::Refused(Refusal::Gate(GateError::new(
                    503,
                    "no Gemini API key is configured",
                )));
            }
        };
        if let Some(f) = last {
            return Finished::Refused(Refusal::Upstream(Box::new(f)));
        }
        let what = if req.model.is_empty() {
            String::new()
        } else {
            format!(" for {}", req.model)
        };
        let limits = if limited {
            ", the others' projects at their quota limits"
        } else {
            ""
        };
        // Keys that will serve again make a rate limit (429, with when); only a pool with no
        // enabled key at all is unavailable (503).
        let status = if cooling > 0 || limited {
            self.state.lasting.prometheus.quota_refused();
            429
        } else {
            503
        };
        let e = GateError::new(
            status,
            format!(
                "no usable Gemini API key{what}: {cooling} cooling down after quota errors, {disabled} disabled{limits}"
            ),
        )
        .retry_after(retry_at_ms.map(|at| seconds_until(at, now)));
        Finished::Refused(Refusal::Gate(e))
    }

    /// Tells `on_response` plugins of a 2xx answer; returns what they made of it.
    fn on_success(
        &self,
        generation: &Generation,
        req: &UpstreamRequest,
        index: usize,
        status: u16,
        meta: &Meta,
        attempt: u32,
    ) -> Verdict {
        if !generation.policy.has_attempt_hook(true, &req.model) {
            return Verdict::Use;
        }
        let ok = Failure {
            status,
            ..Failure::network(ErrorClass::Upstream, "")
        };
        match self.after_attempt(generation, index, req, &ok, meta, attempt) {
            Ok(Some(AttemptDecision::Retry)) => Verdict::AnotherKey,
            Ok(_) => Verdict::Use,
            Err(d) => Verdict::Refuse(d),
        }
    }
}

/// The answer when the key that holds a request's resource (a file, a cached content) is
/// out: 503 naming the key and why, with `Retry-After` — the end of its cooldown, or a
/// minute for a disabled key (an operator or a key check may bring it back). Another key
/// would only get Google's 403.
/// The request as a Vertex AI express key sends it: `{base}/models/{model}:{action}` becomes
/// `{vertex base}/publishers/google/models/{model}:{action}`, to Vertex's host (`None`: not a
/// call of that shape).
fn vertex_header(
    generation: &Generation,
    vertex: &crate::upstream::Target,
    req: &UpstreamRequest,
) -> Option<pingora::http::RequestHeader> {
    let mut header = req.header.clone();
    let target = String::from_utf8_lossy(header.raw_path()).into_owned();
    let rest = target
        .strip_prefix(&generation.target.base.path)?
        .strip_prefix("/models/")?;
    let path = format!("{}/publishers/google/models/{rest}", vertex.base.path);
    header.set_raw_path(path.as_bytes()).ok()?;
    if let Some(host) = &vertex.host {
        let _ = header.insert_header(header::HOST, host.clone());
    }
    Some(header)
}

/// `avoid` and, for a call a Vertex AI express key cannot serve, every such key.
pub(super) fn without_vertex<'a>(
    pool: &KeyPool,
    req: &UpstreamRequest,
    avoid: Cow<'a, [usize]>,
) -> Cow<'a, [usize]> {
    if req.vertex_ok || pool.vertex_keys().is_empty() {
        return avoid;
    }
    let mut all = avoid.into_owned();
    all.extend_from_slice(pool.vertex_keys());
    Cow::Owned(all)
}

fn held(key: &str, why: &str, until_ms: Option<u64>, now: u64) -> Finished {
    let retry = until_ms.map_or(60, |until| seconds_until(until, now));
    let e = GateError::new(
        503,
        format!("what this request is about belongs to key {key}, which is {why}: no other key can reach it"),
    )
    .retry_after(Some(retry));
    Finished::Refused(Refusal::Gate(e))
}

/// `pick` with `limited_until` (keys passed over because their projects are full) folded in.
fn with_limit(pick: Pick, limited_until: Option<u64>) -> Pick {
    match (pick, limited_until) {
        (
            Pick::Exhausted {
                retry_at_ms,
                cooling,
                disabled,
                ..
            },
            Some(l),
        ) => Pick::Exhausted {
            retry_at_ms: Some(retry_at_ms.map_or(l, |r| r.min(l))),
            cooling,
            disabled,
            limited: true,
        },
        (pick, _) => pick,
    }
}

/// The upstream's `x-goog-upload-*` headers (the Files API's upload protocol).
fn upload_headers(up: &Response) -> Vec<(String, String)> {
    up.head()
        .headers
        .iter()
        .filter(|(n, _)| n.as_str().starts_with("x-goog-upload-"))
        .filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_owned())))
        .collect()
}

impl Failure {
    pub(crate) fn network(class: ErrorClass, message: impl Into<String>) -> Failure {
        Failure {
            class,
            status: 0,
            retry_delay_s: None,
            quota: Default::default(),
            body: Bytes::new(),
            content_type: None,
            message: message.into(),
        }
    }

    /// The upstream's error answer, classified; the key's secret is cut from its body.
    pub(super) fn of_answer(
        status: u16,
        body: Bytes,
        content_type: Option<http::HeaderValue>,
        secret: &str,
    ) -> Failure {
        let body = redact(body, secret);
        let class = classify(status, &body);
        Failure {
            class,
            quota: if matches!(status, 403 | 429) {
                crate::keys::taxonomy::quota_of(&body)
            } else {
                Default::default()
            },
            retry_delay_s: match class {
                ErrorClass::RateLimited { retry_after } => Some(retry_after.as_secs_f64()),
                _ => None,
            },
            status,
            message: error_message(&body).unwrap_or_else(|| format!("HTTP {status}")),
            body,
            content_type,
        }
    }

    pub(crate) fn from_pingora(e: Box<pingora::Error>) -> Failure {
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

/// A request to send upstream with one attempt's key.
struct Outgoing<'a> {
    header: &'a pingora::http::RequestHeader,
    body: &'a Bytes,
    credential: head::Credential<'a>,
    /// How long each step may take.
    timeout: Duration,
}

/// A request as it goes over HTTP/1.1.
struct Http1Call<'a> {
    /// Its head as written on the wire.
    head: &'a [u8],
    body: &'a [u8],
    head_request: bool,
    /// How long each step may take.
    timeout: Duration,
}

/// Sends a request's head and body on `conn` (in one write when they fit one), then reads the
/// answer's head; each step within the call's timeout.
async fn send_request(mut conn: Stream, call: &Http1Call<'_>) -> pingora::Result<Response> {
    use tokio::io::AsyncWriteExt;
    let Http1Call {
        head,
        body,
        head_request,
        timeout,
    } = *call;
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
    Response::read(conn, head_request, timeout).await
}

/// Reads an upstream body up to `limit` bytes; the flag says whether it was read to its end.
async fn read_to_end(up: &mut Response, limit: usize) -> (Bytes, bool) {
    let mut buf = BytesMut::new();
    loop {
        match up.body().await {
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

/// Keeps an attempt's span for the request's trace (when traces are exported).
fn trace_attempt(
    generation: &Generation,
    req: &UpstreamRequest,
    index: usize,
    outcome: &Result<(Finished, Tried), Failure>,
    took: std::time::Duration,
    meta: &Meta,
) {
    use crate::traces::{Span, Value};
    let Some(ctx) = meta.trace else {
        return;
    };
    let end = crate::traces::now_ns();
    let (class, status) = match outcome {
        Ok((_, done)) => (
            match done.class {
                Some(Class::Upstream(c)) => c.as_str(),
                _ => "ok",
            },
            done.status,
        ),
        Err(f) => (f.class.as_str(), Some(f.status)),
    };
    let mut attributes = vec![
        (
            "gemgate.key_id",
            Value::Str(generation.pool_for(req).get(index).spec.id.clone()),
        ),
        ("gen_ai.request.model", Value::Str(req.model.clone())),
        ("gemgate.attempt.class", Value::Str(class.to_owned())),
    ];
    if let Some(status) = status {
        attributes.push(("http.response.status_code", Value::Int(i64::from(status))));
    }
    if class != "ok" {
        attributes.push(("error.type", Value::Str(class.to_owned())));
    }
    let span = Span {
        trace_id: ctx.trace_id,
        span_id: crate::traces::random(),
        parent: Some(ctx.span_id),
        name: format!("attempt {}", req.model),
        server: false,
        start_ns: end.saturating_sub(took.as_nanos() as u64),
        end_ns: end,
        attributes,
        error: class != "ok",
    };
    meta.spans
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(span);
}

/// The scope a quota answer's cooldown took for `key` (a key without a project is its own).
fn cooldown_scope(key: &crate::keys::Key, scope: crate::keys::taxonomy::Scope) -> &'static str {
    if key.spec.project.is_none() {
        crate::keys::taxonomy::Scope::KeyModel.as_str()
    } else {
        scope.as_str()
    }
}

/// The key a pick took, if it took one.
fn picked(pick: &Pick) -> Option<usize> {
    match pick {
        Pick::Key(i) => Some(*i),
        _ => None,
    }
}

/// Notes, for a traced request, the keys an attempt's choice looked at, and the one it took
/// (with who chose it: a plugin, or `built-in`).
fn trace_choice(
    meta: &Meta,
    pool: &KeyPool,
    model: &str,
    tried: &[usize],
    tokens: u64,
    now: u64,
    chosen: Option<(usize, &str)>,
) {
    if !meta.traced {
        return;
    }
    meta.with_shared(|shared| {
        shared.trace(|t| {
            let index = chosen.map(|(i, _)| i);
            let (notes, more) = key_notes(pool, model, tried, tokens, now, index);
            let id = index.map(|i| pool.get(i).spec.id.as_str());
            t.choice(notes, more, id, chosen.map_or("", |(_, by)| by));
        })
    });
}

//! The listening side: worker threads with their own listening sockets, connections and their
//! keep-alive loop, and the dispatch of each request to the proxy or the admin UI.

pub mod workers;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
use crate::proxy::route::{self, Route};
use crate::proxy::{
    DRAIN_TIMEOUT, Exchange, Gateway, MAX_TARGET, Outcome, X_GOOG_API_KEY, response_header, send,
    send_gate, write_full,
};

impl Gateway {
    async fn handle(&self, s: &mut ServerSession, x: &mut Exchange) -> Outcome {
        let generation = self.state.current.load_full();
        let outcome = self.serve(&generation, s, x).await;
        if generation.policy.has_on_log(&x.model) && x.action != "health" && x.action != "preflight"
        {
            let entry = x.entry();
            let client = x.client.clone().unwrap_or_default();
            generation
                .policy
                .on_log(&entry, &client, &x.id, &mut x.shared);
        }
        outcome
    }

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
        x.peer = peer::Peer::of(s, &generation.config.trusted_proxies);
        let path = s.req_header().uri.path().to_owned();
        let req = s.req_header();
        if req.raw_path().len() > MAX_TARGET {
            x.protocol = route::protocol_of(&path);
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
        match route::route(&path, goog_credential) {
            Route::Health => {
                x.action = "health".into();
                let body = format!(
                    r#"{{"status":"ok","keys":{}}}"#,
                    generation.pool.keys().len()
                );
                send(s, x, 200, Bytes::from(body)).await
            }
            Route::NotFound => {
                x.protocol = route::protocol_of(&path);
                let e = GateError::new(404, "gemgate does not serve this path");
                send_gate(s, x, &e).await
            }
            Route::Invalid(why) => {
                x.protocol = route::protocol_of(&path);
                send_gate(s, x, &GateError::new(400, why)).await
            }
            Route::Page(page) => {
                x.action = "admin".into();
                let answer = Box::pin(self.page(generation, s, page, &x.peer)).await;
                send_page(s, x, answer).await
            }
            Route::Admin(call) => {
                x.action = "admin".into();
                // Rare routes are boxed: their state stays out of every request's future.
                match Box::pin(self.admin(generation, s, call, &x.peer)).await {
                    Ok(body) => send(s, x, 200, body).await,
                    Err(e) => send_gate(s, x, &e).await,
                }
            }
            Route::Native(call) => {
                x.model = call.model().to_owned();
                x.action = call.action().to_owned();
                match self.native(generation, s, call, x).await {
                    Ok(outcome) => outcome,
                    Err(refusal) => self.refuse(generation, s, x, refusal).await,
                }
            }
            Route::OpenAi(call) => {
                x.protocol = Protocol::OpenAi;
                x.action = call.action().to_owned();
                match Box::pin(self.openai(generation, s, call, x)).await {
                    Ok(outcome) => outcome,
                    Err(refusal) => self.refuse(generation, s, x, refusal).await,
                }
            }
            Route::Upload => match Box::pin(self.file_upload(generation, s, x)).await {
                Ok(outcome) => outcome,
                Err(refusal) => self.refuse(generation, s, x, refusal).await,
            },
            Route::Files(id) => {
                x.action = "files".into();
                match Box::pin(self.files(generation, s, id, x)).await {
                    Ok(outcome) => outcome,
                    Err(refusal) => self.refuse(generation, s, x, refusal).await,
                }
            }
            Route::GoogleOpenAi(rest) => {
                x.protocol = Protocol::GoogleOpenAi;
                x.action = format!("openai/{rest}");
                match Box::pin(self.google_openai(generation, s, &rest, x)).await {
                    Ok(outcome) => outcome,
                    Err(refusal) => self.refuse(generation, s, x, refusal).await,
                }
            }
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
    pub(crate) async fn serve_request(
        &self,
        mut s: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
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
        let outcome = self.handle(&mut s, &mut x).await;
        x.log();
        if !matches!(x.action.as_str(), "health" | "preflight" | "admin") {
            // Only a known client's requests reach the logs and their indexes: anyone can send
            // the others, and would fill the disk with strings of their choosing.
            match x.client {
                Some(_) => {
                    let sample = self.state.current.load().config.file.logs.request_sample;
                    let unsampled = sample < 1.0 && fastrand::f64() >= sample;
                    self.state.lasting.logs.push(x.into_record(unsampled));
                }
                None => self.state.refused.count_request(x.status),
            }
        }
        if outcome == Outcome::Close {
            return None;
        }
        match s.finish().await {
            Ok(reusable) => reusable.map(|r| r.into_parts().0),
            Err(_) => None,
        }
    }

    /// How long a client has to send a request head (`server.header_timeout_s`).
    pub(crate) fn header_timeout(&self) -> Duration {
        self.state.current.load().config.header_timeout
    }
}

/// Counts a request in flight until dropped, however the request ends.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers a CORS preflight: any origin may call with the methods and headers it asks for.
async fn preflight(s: &mut ServerSession, x: &mut Exchange) -> Outcome {
    x.action = "preflight".into();
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
    x.cors = false;
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

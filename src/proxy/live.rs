//! The Live API: a WebSocket (`/ws/google.ai.generativelanguage.{version}.GenerativeService.
//! BidiGenerateContent`) carrying a session's audio and text both ways, and ephemeral tokens
//! (`POST /v1alpha/auth_tokens`) that let a browser open one without a key.
//!
//! A session gets its key at the upgrade, the way any request does (the `select_key` plugins,
//! cooldowns, the quota model's limits, accounted under the model `live`); a key whose upgrade
//! fails is cooled or disabled as its answer says and the next key tried. Once Google switched
//! protocols, the session stays on its key: the client's connection and Google's are joined
//! and their bytes copied both ways as they come, through fixed buffers, until either side
//! closes. gemgate does not read the frames.
//!
//! An ephemeral token is minted by Google on a pool key and handed back as it is: it is Google's
//! credential, valid only in that key's project. gemgate records it with its key and client
//! (the owner registry, kind `Token`), and relays a session opened with it
//! (`…BidiGenerateContentConstrained`, `Authorization: Token auth_tokens/…`) on that key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header;
use pingora::http::ResponseHeader;
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    Exchange, Failure, Finished, Gateway, Generation, Outcome, Refusal, Surface, UpstreamRequest,
    X_GOOG_API_KEY, read_body, send, upstream_header,
};
use crate::clock::{now_ms, parse_rfc3339};
use crate::http::reply::GateError;
use crate::keys::owners::Kind;
use crate::keys::taxonomy::ErrorClass;
use crate::upstream::head;

/// The model name Live sessions are accounted under (the session's own model is in its first
/// frame, which gemgate does not read): `[quota.limits.live]` limits sessions per minute.
pub const LIVE_MODEL: &str = "live";
/// Longest upgrade answer head read from Google.
const MAX_HEAD: usize = 16 * 1024;
/// Longest refusal body read from Google.
const MAX_REFUSAL: usize = 64 * 1024;
/// Each direction's copy buffer.
const BUFFER: usize = 16 * 1024;
/// The longest a session is relayed. Google ends its own long before (a connection lasts
/// minutes; a client resumes the session on a new one).
const LONGEST_SESSION: Duration = Duration::from_secs(3600);
/// Google's default lifetime of an ephemeral token, and its longest.
const TOKEN_DEFAULT_MS: u64 = 30 * 60_000;
const TOKEN_LONGEST_MS: u64 = 20 * 3_600_000;
/// The client headers of a WebSocket handshake that go on to Google.
const HANDSHAKE: [&str; 4] = [
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
];
/// Google's answer headers of an accepted handshake that go back to the client.
const ACCEPTED: [&str; 3] = [
    "sec-websocket-accept",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
];

/// A session whose handshake both sides accepted: joined by the server once the client's
/// request is done with (see [`Tunnel::join`]).
pub(crate) struct Tunnel {
    upstream: Stream,
    /// What Google sent after its handshake answer, for the client first.
    early: Bytes,
    /// Counts the session among its key's requests in flight.
    _lease: crate::keys::Lease,
    /// Counts it among its client's sessions.
    slot: Option<LiveSlot>,
}

/// The upstream path of a Live call: the base URL's origin and any path before its version.
fn ws_path(generation: &Generation, version: &str, constrained: bool) -> String {
    let method = if constrained {
        "BidiGenerateContentConstrained"
    } else {
        "BidiGenerateContent"
    };
    format!(
        "{}/ws/google.ai.generativelanguage.{version}.GenerativeService.{method}",
        base_prefix(&generation.target.base.path)
    )
}

/// The base URL's path without its last segment (the API version): `/v1beta` → ``.
fn base_prefix(base: &str) -> &str {
    base.rfind('/').map_or("", |i| &base[..i])
}

/// The ephemeral token a Constrained call presents (`Authorization: Token auth_tokens/…`, or
/// the token as `x-goog-api-key`, `?access_token=` or `?key=`).
fn presented_token(s: &ServerSession) -> Option<String> {
    let req = s.req_header();
    let header = |name| req.headers.get(name).and_then(|v| v.to_str().ok());
    let query = req.uri.query().unwrap_or_default();
    let param = |name| crate::http::auth::query_param(query, name).map(|v| v.into_owned());
    let token = |t: &str| {
        let t = t.trim();
        (t.starts_with("auth_tokens/") && t.len() <= 512).then(|| t.to_owned())
    };
    header(header::AUTHORIZATION)
        .and_then(|a| token(a.strip_prefix("Token ")?))
        .or_else(|| token(header(X_GOOG_API_KEY)?))
        .or_else(|| token(&param("access_token")?))
        .or_else(|| token(&param("key")?))
}

impl Gateway {
    /// `POST /v1alpha/auth_tokens`: minted by Google on a pool key; the token is recorded with
    /// that key and the client, until it expires.
    pub(crate) async fn auth_tokens(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        self.admit(generation, s, http::Method::POST, &mut x.meta)?;
        x.action = "auth_tokens.create".into();
        let rewrite = self
            .on_request(
                generation,
                s,
                LIVE_MODEL,
                "auth_tokens.create",
                false,
                &x.meta,
            )
            .await?;
        let body = read_body(s, generation.config.max_body_bytes).await?;
        let expire_time = |json: &[u8]| {
            serde_json::from_slice::<serde_json::Value>(json)
                .ok()
                .and_then(|v| v["expireTime"].as_str().and_then(parse_rfc3339))
        };
        let asked = expire_time(&body);
        let path = format!(
            "{}/v1alpha/auth_tokens",
            base_prefix(&generation.target.base.path)
        );
        let mut header = upstream_header(generation, s.req_header(), &path, "")?;
        for (name, value) in rewrite.headers {
            let _ = header.insert_header(name, value);
        }
        let up = UpstreamRequest {
            model: LIVE_MODEL.into(),
            surface: Surface::Live,
            idempotent: false,
            ..UpstreamRequest::new(header, body)
        };
        x.model = LIVE_MODEL.into();
        let answer = self.collect(generation, &up, x).await?;
        let name = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["name"].as_str().map(str::to_owned));
        if let Some(name) = name.filter(|n| n.starts_with("auth_tokens/")) {
            // Google's word on the expiry, else what the client asked for, at most Google's
            // longest.
            let longest = now_ms() + TOKEN_LONGEST_MS;
            let expires = expire_time(&answer).or(asked).map(|e| e.min(longest));
            self.record_owned(
                Kind::Token,
                &name,
                self.owner_of(x),
                expires,
                TOKEN_DEFAULT_MS,
            );
        }
        Ok(send(s, x, 200, answer).await)
    }

    /// The Live API's WebSocket upgrade: a key is chosen and Google's handshake made with it
    /// (the next key when one fails); once both sides switched protocols, the tunnel is left
    /// in `x` for the server to join after the answer head went out.
    pub(crate) async fn live(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        version: &str,
        constrained: bool,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        x.action = "live.connect".into();
        x.model = LIVE_MODEL.into();
        let token = self.live_credential(generation, s, constrained, x)?;
        check_upgrade(s.req_header())?;
        let slot = self.live_slot(generation, x.meta.client())?;
        let rewrite = self
            .on_request(generation, s, LIVE_MODEL, "live.connect", true, &x.meta)
            .await?;
        let path = ws_path(generation, version, constrained);
        let mut header = upstream_header(generation, s.req_header(), &path, "")?;
        for (name, value) in rewrite.headers {
            let _ = header.insert_header(name, value);
        }
        for name in HANDSHAKE {
            if let Some(v) = s.req_header().headers.get(name) {
                let _ = header.insert_header(name, v.clone());
            }
        }
        let _ = header.insert_header(header::CONNECTION, "Upgrade");
        let _ = header.insert_header(header::UPGRADE, "websocket");
        let up = UpstreamRequest {
            model: LIVE_MODEL.into(),
            surface: Surface::Live,
            pinned: token.as_ref().map(|(_, index)| *index),
            ..UpstreamRequest::new(header, Bytes::new())
        };
        let token = token.map(|(t, _)| t);
        let (index, answer, mut tunnel) = self
            .live_attempts(generation, &up, token.as_deref(), x)
            .await?;
        tunnel.slot = Some(slot);
        let mut head = ResponseHeader::build(101, Some(6)).map_err(internal)?;
        let _ = head.insert_header(header::UPGRADE, "websocket");
        let _ = head.insert_header(header::CONNECTION, "Upgrade");
        for (name, value) in answer {
            let _ = head.insert_header(name, value);
        }
        x.status = 101;
        x.ttfb = Some(x.meta.started.elapsed());
        s.write_response_header(Box::new(head))
            .await
            .map_err(|e| Refusal::Gate(GateError::new(502, format!("the client left: {e}"))))?;
        tracing::info!(id = %x.meta.id, key = %generation.pool.get(index).spec.id, "live session opened");
        x.tunnel = Some(tunnel);
        Ok(Outcome::Close)
    }

    /// Who opens a session: a client by its token, or (`constrained`) the client of the
    /// ephemeral token presented, which is returned with its key's index.
    fn live_credential(
        &self,
        generation: &Generation,
        s: &ServerSession,
        constrained: bool,
        x: &mut Exchange,
    ) -> Result<Option<(String, usize)>, Refusal> {
        if !constrained {
            self.admit(generation, s, http::Method::GET, &mut x.meta)?;
            return Ok(None);
        }
        let token = presented_token(s).ok_or_else(|| {
            Refusal::Gate(GateError::new(
                401,
                "a Constrained Live session needs an ephemeral token (Authorization: Token auth_tokens/…)",
            ))
        })?;
        let record = self
            .state
            .lasting
            .shared
            .file(&Kind::Token.record_id(&token))
            .filter(|r| r.owner.client.is_some())
            .ok_or_else(|| {
                self.wrong_credential(
                    &x.meta.peer,
                    "this ephemeral token was not made through this gateway, or has expired",
                )
            })?;
        x.meta.client = record.owner.client;
        let index = super::owned::owner_key(generation, &record.owner.key, Kind::Token)?;
        Ok(Some((token, index)))
    }

    /// A place for one more Live session of `client`, held until the session ends; 429 when
    /// the client has `server.live_sessions_per_client` open on this instance.
    fn live_slot(&self, generation: &Generation, client: &str) -> Result<LiveSlot, Refusal> {
        let max = generation.config.live_sessions_per_client;
        let mut open = self.live_sessions.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(client.to_owned()).or_default();
        if *n >= max {
            return Err(Refusal::Gate(
                GateError::new(
                    429,
                    format!("{max} Live sessions of this client are open: close one first"),
                )
                .retry_after(Some(1)),
            ));
        }
        *n += 1;
        Ok(LiveSlot {
            sessions: self.live_sessions.clone(),
            client: client.to_owned(),
        })
    }

    /// Google's handshake on one key after another until one accepts: the key's index, the
    /// handshake headers for the client, and the open tunnel. A session opened with an
    /// ephemeral token has its key, and a refusal of the token says nothing of the key.
    async fn live_attempts(
        &self,
        generation: &Generation,
        up: &UpstreamRequest,
        token: Option<&str>,
        x: &mut Exchange,
    ) -> Result<(usize, Vec<(String, String)>, Tunnel), Refusal> {
        let max = generation.config.max_retries as usize;
        let mut used: Vec<usize> = Vec::with_capacity(max);
        let mut last = None;
        while used.len() < max {
            let now = now_ms();
            let pool = generation.pool_for(up);
            let avoid = super::attempt::without_vertex(pool, up, std::borrow::Cow::Borrowed(&used));
            let admitted = self.admitted_key(generation, up, &avoid, 0, &x.meta).await;
            let index = match admitted {
                Ok(Ok((index, _ticket))) => index,
                Ok(Err(pick)) => {
                    return Err(match self.exhausted(pick, last, up, now) {
                        Finished::Refused(r) => r,
                        _ => internal("no key"),
                    });
                }
                Err(d) => return Err(super::denied(d)),
            };
            used.push(index);
            let pool = generation.pool_for(up);
            x.attempts += 1;
            x.key = Some(pool.get(index).spec.id.clone());
            let lease = pool.lease(index, now);
            let failure = match self.handshake(generation, up, index, token).await {
                Ok((answer, upstream, early)) => {
                    self.state.lasting.shared.key_succeeded(pool, index);
                    self.count_usage(generation, up, index, None, None);
                    let tunnel = Tunnel {
                        upstream,
                        early,
                        _lease: lease,
                        slot: None,
                    };
                    return Ok((index, answer, tunnel));
                }
                Err(failure) if token.is_some() => {
                    return Err(Refusal::Upstream(Box::new(failure)));
                }
                Err(failure) => failure,
            };
            let attempt = x.attempts;
            match self.after_failure(generation, up, index, failure, &x.meta, attempt) {
                Ok(failure) => last = Some(failure),
                Err(Finished::Refused(r)) => return Err(r),
                Err(_) => return Err(internal("the handshake ended oddly")),
            }
        }
        Err(match last {
            Some(f) => Refusal::Upstream(Box::new(f)),
            None => Refusal::Gate(GateError::new(503, "no attempt was possible")),
        })
    }

    /// Google's WebSocket handshake with key `index` (or the ephemeral `token`): the headers of
    /// its acceptance, the connection, and any bytes that came after the acceptance's head.
    async fn handshake(
        &self,
        generation: &Generation,
        up: &UpstreamRequest,
        index: usize,
        token: Option<&str>,
    ) -> Result<(Vec<(String, String)>, Stream, Bytes), Failure> {
        let key = generation.pool_for(up).get(index);
        let target = &generation.target;
        let route = target.route(&key.spec.id);
        let peer = target
            .peer(route)
            .await
            .map_err(|m| Failure::network(ErrorClass::Network, m))?;
        let (mut conn, _) = target
            .connection(&self.connector, &peer, route, false)
            .await
            .map_err(Failure::from_pingora)?;
        let credential = match token {
            Some(token) => head::Credential::Token(token),
            None => head::Credential::GoogApiKey(key.header.as_bytes()),
        };
        let forwarding = target.forwarding(route).map(|proxy| head::Forwarding {
            authority: target.base.authority.as_str(),
            authorization: proxy.proxy_authorization(),
        });
        let head = head::request_head(&up.header, 0, credential, forwarding);
        let timeout = generation.config.timeout;
        let io = async {
            conn.write_all(&head).await?;
            conn.flush().await?;
            read_head(&mut conn).await
        };
        let (status, headers, rest) = tokio::time::timeout(timeout, io)
            .await
            .map_err(|_| Failure::network(ErrorClass::Timeout, "no handshake answer in time"))?
            .map_err(|e| Failure::network(ErrorClass::Network, format!("handshake: {e}")))?;
        if status == 101 {
            let answer = headers
                .into_iter()
                .filter(|(n, _)| ACCEPTED.contains(&n.as_str()))
                .collect();
            return Ok((answer, conn, rest));
        }
        let body = refusal_body(&mut conn, &headers, rest).await;
        let content_type = headers
            .iter()
            .find(|(n, _)| n == "content-type")
            .and_then(|(_, v)| http::HeaderValue::from_str(v).ok());
        Err(Failure::of_answer(
            status,
            body,
            content_type,
            key.spec.secret.expose(),
        ))
    }
}

/// Refuses what is not a WebSocket handshake gemgate can relay: a `GET` over HTTP/1.1 asking to
/// upgrade to `websocket`, with no body.
fn check_upgrade(req: &pingora::http::RequestHeader) -> Result<(), Refusal> {
    let has = |name, token: &[u8]| {
        req.headers.get_all(name).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
        })
    };
    let body = req
        .headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || req.headers.contains_key(header::TRANSFER_ENCODING);
    let handshake = req.method == http::Method::GET
        && req.version == http::Version::HTTP_11
        && has(header::CONNECTION, b"upgrade")
        && has(header::UPGRADE, b"websocket")
        && !body;
    if handshake {
        Ok(())
    } else {
        Err(Refusal::Gate(GateError::new(
            400,
            "this is the Live API's WebSocket: connect with a WebSocket client (GET, HTTP/1.1, Upgrade: websocket)",
        )))
    }
}

/// The body of Google's refusal of a handshake: what came with its head, and what follows up to
/// its length (at most [`MAX_REFUSAL`] bytes, for at most 5 seconds).
async fn refusal_body(conn: &mut Stream, headers: &[(String, String)], rest: Bytes) -> Bytes {
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(MAX_REFUSAL)
        .min(MAX_REFUSAL);
    let mut body = BytesMut::from(&rest[..rest.len().min(length)]);
    let read = async {
        let mut buf = [0u8; 4096];
        while body.len() < length {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n.min(length - body.len())]);
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    body.freeze()
}

/// Holds one of a client's Live sessions (see `Gateway::live_slot`).
pub(crate) struct LiveSlot {
    sessions: Arc<Mutex<HashMap<String, usize>>>,
    client: String,
}

impl Drop for LiveSlot {
    fn drop(&mut self) {
        let mut open = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// How a joined session ended.
pub(crate) struct Ended {
    /// Bytes from the client to Google, and from Google to the client.
    pub sent: u64,
    pub received: u64,
    pub why: &'static str,
}

impl Tunnel {
    /// Joins the client's connection and Google's until either side closes (the session is
    /// over: the other side is closed too), the instance shuts down, or the session has lasted
    /// [`LONGEST_SESSION`].
    pub async fn join(self, client: ServerSession, shutdown: &ShutdownWatch) -> Ended {
        let mut ended = Ended {
            sent: 0,
            received: 0,
            why: "",
        };
        let ServerSession::H1(session) = client else {
            ended.why = "not HTTP/1";
            return ended;
        };
        let mut client = session.into_inner();
        let mut upstream = self.upstream;
        if client.write_all(&self.early).await.is_err() || client.flush().await.is_err() {
            ended.why = "the client left";
            return ended;
        }
        let (mut client_in, mut client_out) = tokio::io::split(client);
        let (mut google_in, mut google_out) = tokio::io::split(upstream);
        let mut shutdown = shutdown.clone();
        ended.why = tokio::select! {
            _ = pump(&mut client_in, &mut google_out, &mut ended.sent) => "the client closed",
            _ = pump(&mut google_in, &mut client_out, &mut ended.received) => "Google closed",
            _ = shutdown.changed() => "the instance shuts down",
            _ = tokio::time::sleep(LONGEST_SESSION) => "the session lasted the longest allowed",
        };
        upstream = google_in.unsplit(google_out);
        let mut client = client_in.unsplit(client_out);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = client.shutdown().await;
            let _ = upstream.shutdown().await;
        })
        .await;
        ended
    }
}

/// Copies `from` to `to` as it comes, counting the bytes, until `from` ends or either fails.
async fn pump(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    count: &mut u64,
) {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
            return;
        }
        *count += n as u64;
    }
}

/// Reads an HTTP/1 answer head (at most [`MAX_HEAD`] bytes): its status, its headers (names in
/// lower case), and the bytes read past it.
async fn read_head(conn: &mut Stream) -> std::io::Result<(u16, Vec<(String, String)>, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut answer = httparse::Response::new(&mut headers);
        match answer.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = answer.code.unwrap_or(0);
                let headers = answer
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                return Ok((status, headers, buf.split_off(len).freeze()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(std::io::Error::other("the answer head is too long"));
            }
            Err(e) => return Err(std::io::Error::other(format!("bad answer head: {e}"))),
        }
        if conn.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::other("closed before answering"));
        }
    }
}

fn internal(what: impl std::fmt::Display) -> Refusal {
    Refusal::Gate(GateError::new(500, format!("internal error: {what}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_cut_from_the_base_path() {
        assert_eq!(base_prefix("/v1beta"), "");
        assert_eq!(base_prefix("/proxy/gemini/v1beta"), "/proxy/gemini");
        assert_eq!(base_prefix(""), "");
    }
}

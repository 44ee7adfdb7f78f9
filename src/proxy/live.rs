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

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header;
use pingora::http::ResponseHeader;
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    Exchange, Failure, Finished, Gateway, Generation, Outcome, Refusal, Surface, UpstreamRequest,
    X_GOOG_API_KEY, read_body, send, upstream_header,
};
use crate::clock::{now_ms, parse_rfc3339};
use crate::http::reply::GateError;
use crate::keys::owners::Kind;
use crate::keys::taxonomy::ErrorClass;

/// The model name Live sessions are accounted under (the session's own model is in its first
/// frame, which gemgate does not read): `[quota.limits.live]` limits sessions per minute.
pub const LIVE_MODEL: &str = "live";
/// Longest upgrade answer head read from Google.
const MAX_HEAD: usize = 16 * 1024;
/// Longest refusal body read from Google.
const MAX_REFUSAL: usize = 64 * 1024;
/// Each direction's copy buffer.
const BUFFER: usize = 16 * 1024;
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
    header(header::AUTHORIZATION)
        .and_then(|a| a.strip_prefix("Token "))
        .map(str::to_owned)
        .or_else(|| header(X_GOOG_API_KEY).map(str::to_owned))
        .or_else(|| crate::http::auth::query_param(query, "access_token").map(|v| v.into_owned()))
        .or_else(|| crate::http::auth::query_param(query, "key").map(|v| v.into_owned()))
        .map(|t| t.trim().to_owned())
        .filter(|t| t.starts_with("auth_tokens/") && t.len() <= 512)
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
        x.meta.client = Some(self.admit(generation, s, http::Method::POST, &x.meta.peer)?);
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
        let expires = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["expireTime"].as_str().and_then(parse_rfc3339));
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
            ..UpstreamRequest::new(header, body)
        };
        x.model = LIVE_MODEL.into();
        let answer = self.collect(generation, &up, x).await?;
        let name = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["name"].as_str().map(str::to_owned));
        if let Some(name) = name.filter(|n| n.starts_with("auth_tokens/")) {
            let longest = now_ms() + TOKEN_LONGEST_MS;
            let expires = expires.map(|e| e.min(longest));
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
        let upgrade = s
            .req_header()
            .headers
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        if s.req_header().method != http::Method::GET || !upgrade {
            return Err(Refusal::Gate(GateError::new(
                400,
                "this is the Live API's WebSocket: connect with a WebSocket client",
            )));
        }
        self.on_request(generation, s, LIVE_MODEL, "live.connect", true, &x.meta)
            .await?;
        let path = ws_path(generation, version, constrained);
        let mut header = upstream_header(generation, s.req_header(), &path, "")?;
        for name in HANDSHAKE {
            if let Some(v) = s.req_header().headers.get(name) {
                let _ = header.insert_header(name, v.clone());
            }
        }
        let mut up = UpstreamRequest {
            model: LIVE_MODEL.into(),
            surface: Surface::Live,
            ..UpstreamRequest::new(header, Bytes::new())
        };
        if let Some(token) = &token {
            let client = x.meta.client.clone();
            up.pinned = Some(
                self.owned(generation, Kind::Token, token, client.as_deref())?
                    .1,
            );
        }
        let (index, answer, tunnel) = self
            .live_attempts(generation, &up, token.as_deref(), x)
            .await?;
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
    /// ephemeral token presented, which is returned.
    fn live_credential(
        &self,
        generation: &Generation,
        s: &ServerSession,
        constrained: bool,
        x: &mut Exchange,
    ) -> Result<Option<String>, Refusal> {
        if !constrained {
            x.meta.client = Some(self.admit(generation, s, http::Method::GET, &x.meta.peer)?);
            return Ok(None);
        }
        let refuse = |m: &str| Refusal::Gate(GateError::new(401, m));
        let token = presented_token(s).ok_or_else(|| {
            refuse("a Constrained Live session needs an ephemeral token (Authorization: Token auth_tokens/…)")
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
        Ok(Some(token))
    }

    /// Google's handshake on one key after another until one accepts: the key's index, the
    /// handshake headers for the client, and the open tunnel.
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
            let admitted = self.admitted_key(generation, up, &used, 0, &x.meta).await;
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
            let key = pool.get(index);
            x.attempts += 1;
            x.key = Some(key.spec.id.clone());
            let lease = pool.lease(index, now);
            match self.handshake(generation, up, index, token).await {
                Ok((answer, upstream, early)) => {
                    self.state.lasting.shared.key_succeeded(pool, index);
                    self.count_usage(generation, up, index, None, None);
                    let tunnel = Tunnel {
                        upstream,
                        early,
                        _lease: lease,
                    };
                    return Ok((index, answer, tunnel));
                }
                Err(failure) => {
                    let attempt = x.attempts;
                    match self.after_failure(generation, up, index, failure, &x.meta, attempt) {
                        Ok(failure) => last = Some(failure),
                        Err(Finished::Refused(r)) => return Err(r),
                        Err(_) => return Err(internal("the handshake ended oddly")),
                    }
                }
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
        let head = handshake_head(&up.header, &target.base.authority, key, token);
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
        let content_type = headers
            .iter()
            .find(|(n, _)| n == "content-type")
            .and_then(|(_, v)| http::HeaderValue::from_str(v).ok());
        Err(Failure::of_answer(
            status,
            body.freeze(),
            content_type,
            key.spec.secret.expose(),
        ))
    }
}

impl Tunnel {
    /// Joins the client's connection and Google's until either side closes; returns the bytes
    /// copied each way (client to Google, Google to client).
    pub async fn join(self, client: ServerSession) -> (u64, u64) {
        let ServerSession::H1(session) = client else {
            return (0, 0);
        };
        let mut client = session.into_inner();
        let mut upstream = self.upstream;
        if !self.early.is_empty() && client.write_all(&self.early).await.is_err() {
            return (0, 0);
        }
        if client.flush().await.is_err() {
            return (0, 0);
        }
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUFFER, BUFFER)
            .await
            .unwrap_or((0, 0))
    }
}

/// The upgrade request to Google: the client's handshake headers, the key (or the ephemeral
/// token, as Google's SDK sends it).
fn handshake_head(
    header: &pingora::http::RequestHeader,
    authority: &str,
    key: &crate::keys::Key,
    token: Option<&str>,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(header.raw_path());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(authority.as_bytes());
    head.extend_from_slice(b"\r\nconnection: Upgrade\r\nupgrade: websocket\r\n");
    for name in HANDSHAKE {
        if let Some(v) = header.headers.get(name) {
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(v.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
    }
    match token {
        Some(token) => {
            head.extend_from_slice(b"authorization: Token ");
            head.extend_from_slice(token.as_bytes());
        }
        None => {
            head.extend_from_slice(b"x-goog-api-key: ");
            head.extend_from_slice(key.header.as_bytes());
        }
    }
    head.extend_from_slice(b"\r\n\r\n");
    head
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

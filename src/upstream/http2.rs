//! Calls to the upstream over HTTP/2 (`upstream.http2`): many on one connection.
//!
//! Over HTTP/1.1 every call in flight holds a connection of its own, so a gateway holding
//! 10,000 open streams holds 20,000 descriptors (the clients' and the upstream's). Over HTTP/2
//! a connection carries up to [`MAX_STREAMS`] calls (fewer if the upstream says so), and the
//! upstream side costs a descriptor per sixteen streams.
//!
//! As with HTTP/1.1 connections, each worker thread keeps its own connections per route (a
//! connection stays registered with the runtime that opened it). A call takes the first of
//! them with room for another stream, or opens a new one; of the connections that carry
//! nothing, one is kept, for [`IDLE_TIMEOUT`] at most. Over TLS, HTTP/2 is offered in the
//! handshake and an upstream that declines it is spoken to in HTTP/1.1 from then on; over plain
//! HTTP it is spoken with prior knowledge.
//!
//! Flow control bounds what an answer may have in flight unread: [`STREAM_WINDOW`] per call,
//! [`CONNECTION_WINDOW`] per connection. What a call has read is given back to the upstream as
//! it is handed on, so a client that reads slowly slows its own call down, no other.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Version};
use pingora::connectors::TransportConnector;
use pingora::protocols::{ALPN, Stream};
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::{Error, ErrorType, Result};

use super::IDLE_TIMEOUT;
use super::head::Credential;
use super::response::{Head, Response};
use crate::config::BaseUrl;
use crate::shard::Sharded;

/// The most calls one connection carries.
///
/// NOTE: far under what upstreams allow (Google: 100), for fairness: at 5,000 client
/// connections of saturating load (`wrk`, 2 cores), with 100 calls a connection 1.3% of calls
/// waited over 2 s (p99 1.7 s; over HTTP/1.1, 0.40 s); with 32, p99 0.83 s; with 16, 0.43 s
/// and none over 2 s, at 35,000 req/s against HTTP/1.1's 25,000. Handing its connection's
/// task more work per poll (tokio's budget lifted) did not help. An open stream costs 15.4
/// KiB at 10,000 with 16 (14.1 with 100): a connection's buffers are shared by fewer.
pub const MAX_STREAMS: usize = 16;
/// The most of one answer in flight, unread.
const STREAM_WINDOW: u32 = 256 * 1024;
/// The most of all a connection's answers in flight, unread: room for every stream's window,
/// so that calls whose clients stop reading cannot hold up the others on their connection.
const CONNECTION_WINDOW: u32 = MAX_STREAMS as u32 * STREAM_WINDOW;
/// The largest answer head (as over HTTP/1.1).
const MAX_HEAD: u32 = 64 * 1024;

/// Request fields that belong to an HTTP/1.1 connection, not to a call (RFC 9113, 8.2.2), or
/// that gemgate sets itself.
const LEFT_OUT: [HeaderName; 8] = [
    header::HOST,
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::CONTENT_LENGTH,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
];

/// One connection's state, shared by the calls it carries.
#[derive(Default)]
struct Shared {
    /// Calls under way on it.
    open: AtomicUsize,
    /// When its last call ended (ms since the epoch).
    idle_since_ms: AtomicU64,
    /// Its driver ended, or a call on it failed: it takes no new call.
    closed: AtomicBool,
}

/// One connection.
struct Conn {
    send: h2::client::SendRequest<Bytes>,
    shared: Arc<Shared>,
}

impl Conn {
    /// How many calls it may carry at once.
    fn room(&self) -> usize {
        self.send.current_max_send_streams().min(MAX_STREAMS)
    }
}

/// A call's hold on its connection, let go when its answer is.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.idle_since_ms.store(crate::clock::now_ms(), Relaxed);
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// The HTTP/2 connections of one route.
#[derive(Default)]
pub struct Pool {
    conns: Sharded<Mutex<Vec<Conn>>>,
    /// Held while a connection opens: calls that arrive together and find no room wait for
    /// it rather than each opening its own.
    opening: Sharded<tokio::sync::Mutex<()>>,
    /// The upstream declined HTTP/2 in a TLS handshake: calls go over HTTP/1.1.
    declined: AtomicBool,
}

/// What a call over HTTP/2 came to.
pub enum Called {
    Answer(Response),
    /// The upstream declined HTTP/2: the connection it opened, ready for HTTP/1.1.
    Declined(Stream),
}

/// A connection just opened.
enum Opened {
    /// Over HTTP/2, carrying one call (its slot).
    Http2(h2::client::SendRequest<Bytes>, Slot),
    /// The upstream declined HTTP/2: ready for HTTP/1.1.
    Declined(Stream),
}

/// A call: its request head (without a body) and its body.
pub struct Call<'a> {
    pub head: Request<()>,
    pub body: &'a Bytes,
}

impl Pool {
    /// Whether calls over this route go over HTTP/2 (it was not declined).
    pub fn speaks(&self) -> bool {
        !self.declined.load(Relaxed)
    }

    /// Makes `call` on a connection with room for it (a new one if none has), and reads the
    /// answer's head; each step within `timeout`. A call that fails on a connection that was
    /// already open is made once more on a new one (the upstream may have closed it).
    pub async fn call(
        &self,
        connector: &TransportConnector,
        peer: &HttpPeer,
        call: Call<'_>,
        timeout: Duration,
    ) -> Result<Called> {
        let mut retrying = false;
        if let Some((send, slot)) = self.take() {
            let shared = slot.0.clone();
            match exchange(send, slot, &call, timeout).await {
                Err(e) if e.etype() != &ErrorType::ReadTimedout => {
                    // Closing or gone (a GOAWAY, a reset connection): no new call goes on it.
                    shared.closed.store(true, Relaxed);
                    retrying = true;
                }
                answered => return answered.map(Called::Answer),
            }
        }
        // Waiting for another call's connection is bounded by how long opening one may take
        // (an upstream that does not answer would otherwise line every call up behind it).
        let wait = peer.options.total_connection_timeout.unwrap_or(timeout);
        let opening = tokio::time::timeout(wait, self.opening.mine().lock())
            .await
            .ok();
        if !retrying && let Some((send, slot)) = self.take() {
            drop(opening);
            return exchange(send, slot, &call, timeout)
                .await
                .map(Called::Answer);
        }
        let opened = self.open(connector, peer, timeout).await;
        drop(opening);
        let (send, slot) = match opened? {
            Opened::Http2(send, slot) => (send, slot),
            Opened::Declined(stream) => return Ok(Called::Declined(stream)),
        };
        exchange(send, slot, &call, timeout)
            .await
            .map(Called::Answer)
    }

    /// A connection of this thread's with room for another call, counted as carrying it.
    /// Connections that closed are let go, and every connection carrying nothing but one, and
    /// that one too once it has carried nothing for [`IDLE_TIMEOUT`] (as idle HTTP/1.1
    /// connections are: an upstream or a middlebox may have dropped it unsaid).
    fn take(&self) -> Option<(h2::client::SendRequest<Bytes>, Slot)> {
        let mut conns = self.conns.mine().lock().unwrap_or_else(|e| e.into_inner());
        let stale = crate::clock::now_ms().saturating_sub(IDLE_TIMEOUT.as_millis() as u64);
        let mut idle_kept = false;
        conns.retain(|c| {
            let s = &c.shared;
            if s.closed.load(Relaxed) {
                return false;
            }
            if s.open.load(Relaxed) > 0 {
                return true;
            }
            let keep = !idle_kept && s.idle_since_ms.load(Relaxed) > stale;
            idle_kept |= keep;
            keep
        });
        let conn = conns
            .iter()
            .find(|c| c.shared.open.load(Relaxed) < c.room())?;
        conn.shared.open.fetch_add(1, Relaxed);
        Some((conn.send.clone(), Slot(conn.shared.clone())))
    }

    /// Opens a connection and adds it to this thread's, counted as carrying one call, unless
    /// the upstream declines HTTP/2.
    async fn open(
        &self,
        connector: &TransportConnector,
        peer: &HttpPeer,
        timeout: Duration,
    ) -> Result<Opened> {
        let mut offer = peer.clone();
        offer.options.alpn = ALPN::H2H1;
        // Boxed, as over HTTP/1.1: connecting is a large future.
        let stream = Box::pin(connector.new_stream(&offer)).await?;
        if peer.tls() && stream.selected_alpn_proto() != Some(ALPN::H2) {
            tracing::warn!("the upstream declined HTTP/2: calls to it go over HTTP/1.1");
            self.declined.store(true, Relaxed);
            return Ok(Opened::Declined(super::for_http1(stream)));
        }
        let handshake = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEAD)
            .enable_push(false)
            .handshake::<_, Bytes>(stream);
        let (send, connection) = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| Error::explain(ErrorType::ConnectTimedout, "HTTP/2 handshake (timeout)"))?
            .map_err(|e| h2_error(ErrorType::ConnectError, "HTTP/2 handshake", e))?;
        let shared = Arc::new(Shared::default());
        let ended = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("an upstream HTTP/2 connection ended: {e}");
            }
            ended.closed.store(true, Relaxed);
        });
        let slot = self.adopt(send.clone(), shared);
        Ok(Opened::Http2(send, slot))
    }

    /// Adds a connection to this thread's, counted as carrying one call.
    fn adopt(&self, send: h2::client::SendRequest<Bytes>, shared: Arc<Shared>) -> Slot {
        shared.open.fetch_add(1, Relaxed);
        let slot = Slot(shared.clone());
        self.conns
            .mine()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Conn { send, shared });
        slot
    }
}

/// Sends `call` on `send` and waits for the answer's head.
async fn exchange(
    send: h2::client::SendRequest<Bytes>,
    slot: Slot,
    call: &Call<'_>,
    timeout: Duration,
) -> Result<Response> {
    let exchange = async {
        let mut send = send
            .ready()
            .await
            .map_err(|e| h2_error(ErrorType::WriteError, "while writing the request", e))?;
        let (answer, mut body) = send
            .send_request(call.head.clone(), call.body.is_empty())
            .map_err(|e| h2_error(ErrorType::WriteError, "while writing the request", e))?;
        if !call.body.is_empty() {
            // Sent as the upstream's window allows; the body is bounded (the request's limit)
            // and already in memory.
            body.send_data(call.body.clone(), true)
                .map_err(|e| h2_error(ErrorType::WriteError, "while writing the request", e))?;
        }
        answer
            .await
            .map_err(|e| h2_error(ErrorType::ReadError, "while reading the answer's head", e))
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| {
            Error::explain(ErrorType::ReadTimedout, "while reading the answer's head")
        })??;
    let (parts, recv) = answer.into_parts();
    let head = Head {
        status: parts.status,
        version: Version::HTTP_2,
        headers: parts.headers,
    };
    Ok(Response::of_h2(head, Body { recv, _slot: slot }, timeout))
}

/// An answer's body, arriving on its stream.
pub struct Body {
    recv: h2::RecvStream,
    _slot: Slot,
}

impl Body {
    /// The next piece of the body; `None` once it has ended. Cancel-safe.
    pub(super) async fn next(&mut self, timeout: Duration) -> Result<Option<Bytes>> {
        const WHEN: &str = "while reading the answer's body";
        loop {
            let piece = match tokio::time::timeout(timeout, self.recv.data()).await {
                Err(_) => return Err(Error::explain(ErrorType::ReadTimedout, WHEN)),
                Ok(None) => return Ok(None),
                Ok(Some(piece)) => piece.map_err(|e| h2_error(ErrorType::ReadError, WHEN, e))?,
            };
            if piece.is_empty() {
                continue;
            }
            // The upstream may send as much again: this piece is handed on.
            let _ = self.recv.flow_control().release_capacity(piece.len());
            return Ok(Some(piece));
        }
    }
}

/// The head of a call to `base` over HTTP/2: `header`'s method, path and fields (less those of
/// [`LEFT_OUT`], and the one the key goes in), the body's length and the attempt's key.
pub fn request_head(
    base: &BaseUrl,
    header: &pingora::http::RequestHeader,
    body_len: usize,
    credential: Credential<'_>,
) -> Result<Request<()>> {
    let invalid = |what: &str| Error::explain(ErrorType::InvalidHTTPHeader, what.to_string());
    let path = header
        .uri
        .path_and_query()
        .cloned()
        .ok_or_else(|| invalid("a request without a path"))?;
    let uri = http::Uri::builder()
        .scheme(if base.tls { "https" } else { "http" })
        .authority(base.authority.as_str())
        .path_and_query(path)
        .build()
        .map_err(|_| invalid("the upstream's address is not a valid authority"))?;
    let own = HeaderName::from_static(credential.name());
    let (scheme, secret) = credential.value();
    let mut key = HeaderValue::from_maybe_shared(Bytes::from([scheme.as_bytes(), secret].concat()))
        .map_err(|_| invalid("a key that is not a valid header value"))?;
    // Never in HPACK's table, where a later field's size could tell it.
    key.set_sensitive(true);
    let mut head = Request::new(());
    *head.method_mut() = header.method.clone();
    *head.uri_mut() = uri;
    *head.version_mut() = Version::HTTP_2;
    let fields = head.headers_mut();
    for (name, value) in &header.headers {
        if *name != own && !LEFT_OUT.contains(name) {
            fields.append(name.clone(), value.clone());
        }
    }
    if body_len > 0 || header.method == Method::POST {
        fields.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    }
    fields.insert(own, key);
    Ok(head)
}

/// An HTTP/2 failure as the call's error; one that gemgate's side raised against what the
/// upstream sent says what is the likely cause.
fn h2_error(etype: ErrorType, when: &'static str, e: h2::Error) -> Box<Error> {
    let malformed = [h2::Reason::PROTOCOL_ERROR, h2::Reason::FRAME_SIZE_ERROR];
    if !e.is_remote() && e.reason().is_some_and(|r| malformed.contains(&r)) {
        let why = format!(
            "{when} over HTTP/2: {e} (does the upstream speak HTTP/2? GEMGATE_UPSTREAM_HTTP2 is on)"
        );
        return Error::explain(etype, why);
    }
    Error::because(etype, format!("{when} over HTTP/2"), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(tls: bool) -> BaseUrl {
        BaseUrl {
            tls,
            host: "upstream.test".into(),
            port: if tls { 443 } else { 8080 },
            path: "/v1beta".into(),
            authority: if tls {
                "upstream.test".into()
            } else {
                "upstream.test:8080".into()
            },
        }
    }

    /// A connection over an in-memory pipe to an HTTP/2 server that accepts and drops calls.
    async fn connection() -> h2::client::SendRequest<Bytes> {
        let (near, far) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut server = h2::server::handshake(far).await.unwrap();
            while let Some(Ok(_call)) = server.accept().await {}
        });
        let (send, connection) = h2::client::handshake(near).await.unwrap();
        tokio::spawn(connection);
        send
    }

    #[tokio::test]
    async fn calls_share_a_connection_and_idle_ones_are_let_go() {
        let pool = Pool::default();
        assert!(pool.take().is_none(), "no connection yet");
        let first = pool.adopt(connection().await, Arc::default());
        // Room for another call: the same connection.
        let (_, second) = pool.take().expect("room on the connection");
        assert!(Arc::ptr_eq(&first.0, &second.0));
        assert_eq!(first.0.open.load(Relaxed), 2);
        drop((first, second));
        // Carrying nothing, it stays (one such is kept) until it has idled past the timeout.
        let (_, again) = pool.take().expect("an idle connection is kept");
        drop(again);
        let shared = pool.conns.mine().lock().unwrap()[0].shared.clone();
        let long_ago = crate::clock::now_ms() - IDLE_TIMEOUT.as_millis() as u64 - 1;
        shared.idle_since_ms.store(long_ago, Relaxed);
        assert!(
            pool.take().is_none(),
            "a connection idle past the timeout is let go"
        );
        assert!(pool.conns.mine().lock().unwrap().is_empty());
        // Closed connections are let go too, and full ones are passed over.
        let closed = pool.adopt(connection().await, Arc::default());
        closed.0.closed.store(true, Relaxed);
        let full = pool.adopt(connection().await, Arc::default());
        full.0.open.store(MAX_STREAMS, Relaxed);
        assert!(pool.take().is_none());
        assert_eq!(pool.conns.mine().lock().unwrap().len(), 1);
    }

    #[test]
    fn a_call_head_carries_the_key_and_none_of_the_connections_fields() {
        let mut header = pingora::http::RequestHeader::build(
            "POST",
            b"/v1beta/models/m:generateContent?alt=sse",
            None,
        )
        .unwrap();
        for (name, value) in [
            ("host", "client.example"),
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("content-length", "999"),
            ("x-goog-api-key", "the client's own"),
            ("content-type", "application/json"),
        ] {
            header.append_header(name, value).unwrap();
        }
        let head = request_head(
            &base(false),
            &header,
            12,
            Credential::GoogApiKey(b"AIzaKEY"),
        )
        .unwrap();
        assert_eq!(
            head.uri().to_string(),
            "http://upstream.test:8080/v1beta/models/m:generateContent?alt=sse"
        );
        assert_eq!(head.method(), Method::POST);
        let fields = head.headers();
        let names: Vec<&str> = fields.keys().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            ["content-type", "content-length", "x-goog-api-key"],
            "{fields:?}"
        );
        assert_eq!(fields["content-length"], "12");
        assert_eq!(fields["x-goog-api-key"], "AIzaKEY");
        assert!(fields["x-goog-api-key"].is_sensitive());

        let header = pingora::http::RequestHeader::build("GET", b"/v1beta/models", None).unwrap();
        let head = request_head(&base(true), &header, 0, Credential::Bearer("s3")).unwrap();
        assert_eq!(
            head.uri().to_string(),
            "https://upstream.test/v1beta/models"
        );
        assert!(head.headers().get("content-length").is_none());
        assert_eq!(head.headers()["authorization"], "Bearer s3");
    }
}

//! Relaying a 2xx answer to the client as it arrives, reshaped on its way by a [`Reframe`]: the
//! bytes as they come ([`Raw`]), whole server-sent events ([`SseEvents`]), or another
//! protocol's chunks (`openai::ChatChunks`). The relay itself knows no protocol.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;

use super::{Class, Failure, Meta, Outcome, response_parts_with_room};
use crate::http::reply::{GateError, Protocol};
use crate::http::sse::EventFramer;
use crate::http::wire;
use crate::keys::taxonomy::ErrorClass;
use crate::translate::usage::{Tokens, tokens_in};
use crate::upstream::BodyBatches;
use crate::upstream::headers::{connection_listed, is_hop_by_hop};
use crate::upstream::response::Response;

/// One piece of an answer for the client, and how long to wait after writing it (pacing).
pub(crate) struct Piece {
    pub bytes: Bytes,
    pub pause: Duration,
}

impl Piece {
    pub fn now(bytes: Bytes) -> Piece {
        Piece {
            bytes,
            pause: Duration::ZERO,
        }
    }
}

/// How an answer's bytes are reshaped between the upstream and the client.
pub(crate) trait Reframe: Send {
    /// The content type of an answer the reframer makes its own (none of the upstream's
    /// headers apply to it), or `None` to relay the upstream's headers.
    fn own_content_type(&self) -> Option<&'static str> {
        None
    }

    /// Whether the answer is a stream: it goes without a length, and one that ends before
    /// anything could be relayed is a failed attempt.
    fn is_stream(&self) -> bool;

    /// Reshapes one chunk from the upstream into pieces for the client (maybe none yet).
    fn push(&mut self, chunk: Bytes, out: &mut Vec<Piece>);

    /// The end of the answer once the upstream's has ended; `None` when a stream brought
    /// nothing at all to relay.
    fn finish(&mut self) -> Option<Bytes>;

    /// The last words for a client whose stream broke off after bytes went out (then the
    /// answer ends cleanly), or `None` to close the connection.
    fn interrupted(&mut self, error: &GateError) -> Option<Bytes>;

    /// The token counts the answer reported (its last `usageMetadata`).
    fn tokens(&self) -> Tokens;
}

/// The answer as it comes.
pub(crate) struct Raw {
    stream: bool,
    produced: bool,
    tokens: Tokens,
}

impl Raw {
    pub fn new(stream: bool) -> Raw {
        Raw {
            stream,
            produced: false,
            tokens: Tokens::default(),
        }
    }
}

impl Reframe for Raw {
    fn is_stream(&self) -> bool {
        self.stream
    }

    fn push(&mut self, chunk: Bytes, out: &mut Vec<Piece>) {
        if let Some(t) = tokens_in(&chunk) {
            self.tokens = t;
        }
        if !chunk.is_empty() {
            self.produced = true;
            out.push(Piece::now(chunk));
        }
    }

    fn finish(&mut self) -> Option<Bytes> {
        (self.produced || !self.stream).then(Bytes::new)
    }

    fn interrupted(&mut self, _: &GateError) -> Option<Bytes> {
        None
    }

    fn tokens(&self) -> Tokens {
        self.tokens
    }
}

/// A translation of Gemini's server-sent events into another protocol's, fed whole events.
pub(crate) trait StreamTranslator: Send {
    /// Whole Gemini events → the client's events they make (maybe none).
    fn push(&mut self, events: &[u8]) -> String;
    /// The events that end the client's stream.
    fn finish(&mut self) -> String;
    /// The events that end a stream broken off by `error`.
    fn interrupted(&mut self, error: &GateError) -> String;
}

/// A stream translated event by event ([`StreamTranslator`]), the events framed by
/// [`SseEvents`].
pub(crate) struct Translated<T> {
    events: SseEvents,
    stream: T,
    produced: bool,
}

impl<T: StreamTranslator> Translated<T> {
    /// `protocol` shapes the error event of a stream broken before the translation began.
    pub fn new(protocol: Protocol, stream: T) -> Self {
        Translated {
            events: SseEvents::new(protocol),
            stream,
            produced: false,
        }
    }
}

impl<T: StreamTranslator> Reframe for Translated<T> {
    fn own_content_type(&self) -> Option<&'static str> {
        Some("text/event-stream")
    }

    fn is_stream(&self) -> bool {
        true
    }

    fn push(&mut self, chunk: Bytes, out: &mut Vec<Piece>) {
        let events = self.events.events(chunk);
        let translated = self.stream.push(&events);
        if !translated.is_empty() {
            self.produced = true;
            out.push(Piece::now(Bytes::from(translated)));
        }
    }

    fn finish(&mut self) -> Option<Bytes> {
        let rest = self.events.rest();
        let translated = self.stream.push(&rest);
        if !self.produced && translated.is_empty() {
            return None;
        }
        Some(Bytes::from(translated + &self.stream.finish()))
    }

    fn interrupted(&mut self, error: &GateError) -> Option<Bytes> {
        Some(Bytes::from(self.stream.interrupted(error)))
    }

    fn tokens(&self) -> Tokens {
        self.events.tokens()
    }
}

/// Server-sent events, relayed whole: a client never holds half an event.
pub(crate) struct SseEvents {
    framer: EventFramer,
    /// The shape of the error event of an interrupted stream.
    protocol: Protocol,
    produced: bool,
    tokens: Tokens,
}

impl SseEvents {
    pub fn new(protocol: Protocol) -> SseEvents {
        SseEvents {
            framer: EventFramer::default(),
            protocol,
            produced: false,
            tokens: Tokens::default(),
        }
    }

    /// The complete events of `chunk` (held back: a trailing partial one), with their tokens
    /// counted.
    pub fn events(&mut self, chunk: Bytes) -> Bytes {
        let ready = self.framer.push(chunk);
        self.count(&ready);
        ready
    }

    /// What is left once the upstream ended, with its tokens counted.
    pub fn rest(&mut self) -> Bytes {
        let rest = self.framer.finish();
        self.count(&rest);
        rest
    }

    /// An error event in the client's protocol.
    pub fn error_event(&self, error: &GateError) -> BytesMut {
        let mut data = BytesMut::from(&b"data: "[..]);
        data.extend_from_slice(&error.body(self.protocol));
        data.extend_from_slice(b"\r\n\r\n");
        data
    }

    fn count(&mut self, events: &[u8]) {
        if let Some(t) = tokens_in(events) {
            self.tokens = t;
        }
    }
}

impl Reframe for SseEvents {
    fn is_stream(&self) -> bool {
        true
    }

    fn push(&mut self, chunk: Bytes, out: &mut Vec<Piece>) {
        let ready = self.events(chunk);
        if !ready.is_empty() {
            self.produced = true;
            out.push(Piece::now(ready));
        }
    }

    fn finish(&mut self) -> Option<Bytes> {
        let rest = self.rest();
        (self.produced || !rest.is_empty()).then_some(rest)
    }

    fn interrupted(&mut self, error: &GateError) -> Option<Bytes> {
        Some(self.error_event(error).freeze())
    }

    fn tokens(&self) -> Tokens {
        self.tokens
    }
}

/// How a relayed answer went.
pub(crate) struct Relayed {
    pub outcome: Outcome,
    /// When the answer's head went out.
    pub ttfb: Option<Duration>,
    /// The answer broke off after bytes went out: the client left, or the upstream's stream
    /// was interrupted.
    pub broke: Option<Class>,
    pub tokens: Tokens,
}

/// An answer on its way to the client: its head until the first piece goes out with it.
struct Answer<'a> {
    s: &'a mut ServerSession,
    meta: &'a Meta,
    head: Option<ResponseHeader>,
    chunked: bool,
    ttfb: Option<Duration>,
}

impl Answer<'_> {
    /// Writes the answer's head, if it has not gone yet, noting the time to first byte;
    /// `false`: the client is gone. A chunked answer's head waits for the chunk that follows
    /// it at once.
    async fn start(&mut self) -> bool {
        let Some(h) = self.head.take() else {
            return true;
        };
        self.ttfb = Some(self.meta.started.elapsed());
        if self.chunked {
            wire::Gathered::hold_flush_of(self.s.stream());
        }
        self.s.write_response_header(Box::new(h)).await.is_ok()
    }

    fn started(&self) -> bool {
        self.head.is_none()
    }

    /// Writes the last bytes and ends the answer.
    async fn end(&mut self, last: Bytes) -> Outcome {
        match self.s.write_response_body(last, true).await {
            Ok(_) => Outcome::Reuse,
            Err(_) => Outcome::Close,
        }
    }
}

/// Relays a 2xx answer to the client as it arrives, through `reframe`. Nothing is written to
/// the client until the first piece is in hand, so an upstream that fails before that is
/// retried on another key (`Err`).
pub(crate) async fn relay(
    s: &mut ServerSession,
    up: &mut Response,
    reframe: &mut dyn Reframe,
    meta: &Meta,
) -> Result<Relayed, Failure> {
    let upstream = up.head();
    let status = upstream.status.as_u16();
    let own = reframe.own_content_type();
    // The fields added below: a content type and cache control, or the upstream's; and the
    // transfer coding.
    let room = if own.is_some() {
        2
    } else {
        upstream.headers.len()
    } + 1;
    let mut head = response_parts_with_room(status, meta, room);
    match own {
        Some(content_type) => {
            let h = &mut head.headers;
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        }
        None => relayed_headers(
            &upstream.headers,
            reframe.is_stream(),
            meta.cors,
            &mut head.headers,
        ),
    }
    up.forget_headers();
    let has_body = !matches!(status, 204 | 304);
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
    let mut answer = Answer {
        s,
        meta,
        head: Some(ResponseHeader::from(head)),
        chunked,
        ttfb: None,
    };
    let (outcome, broke) = pump(&mut answer, up, reframe, own.is_none()).await?;
    Ok(Relayed {
        outcome,
        ttfb: answer.ttfb,
        broke,
        tokens: reframe.tokens(),
    })
}

/// The upstream's headers that go on to the client.
fn relayed_headers(
    upstream: &http::HeaderMap,
    stream: bool,
    cors: bool,
    out: &mut http::HeaderMap,
) {
    let listed = connection_listed(upstream);
    for (name, value) in upstream.iter() {
        let n = name.as_str();
        let hop = is_hop_by_hop(n) || listed.iter().any(|l| l == n);
        if !(hop
            || stream && n == "content-length"
            || n == "x-request-id"
            || cors && n.starts_with("access-control-"))
        {
            out.append(name.clone(), value.clone());
        }
    }
}

/// Moves the answer from the upstream to the client until either ends. `immediate`: pieces go
/// out as they come (no reframer's trailer follows the upstream's end), so the last batch can
/// share its send with the end of the answer.
async fn pump(
    answer: &mut Answer<'_>,
    up: &mut Response,
    reframe: &mut dyn Reframe,
    immediate: bool,
) -> Result<(Outcome, Option<Class>), Failure> {
    let mut batches = BodyBatches::default();
    let mut pieces = Vec::new();
    loop {
        match batches.next(up).await {
            Ok(Some(chunk)) => {
                reframe.push(chunk, &mut pieces);
                // The upstream is done: the end of the answer follows at once, so this batch
                // can wait for it and leave in the same send.
                let last = answer.chunked && batches.ended() && immediate;
                for piece in pieces.drain(..) {
                    if !answer.start().await {
                        return Ok((Outcome::Close, None));
                    }
                    if last {
                        wire::Gathered::hold_flush_of(answer.s.stream());
                    }
                    if answer
                        .s
                        .write_response_body(piece.bytes, false)
                        .await
                        .is_err()
                    {
                        return Ok((Outcome::Close, Some(Class::ClientGone)));
                    }
                    if !piece.pause.is_zero() {
                        tokio::time::sleep(piece.pause).await;
                    }
                }
            }
            Ok(None) => {
                let Some(rest) = reframe.finish() else {
                    return Err(Failure::network(
                        ErrorClass::Network,
                        "the upstream ended the stream before sending anything",
                    ));
                };
                if !answer.start().await {
                    return Ok((Outcome::Close, None));
                }
                return Ok((answer.end(rest).await, None));
            }
            Err(e) if !answer.started() => return Err(Failure::from_pingora(e)),
            Err(e) => {
                // Bytes have gone out: never start the answer again.
                tracing::warn!(id = %answer.meta.id, "upstream stream interrupted: {}", e.to_string().trim());
                let error = GateError::new(
                    502,
                    format!(
                        "the upstream stream was interrupted: {}",
                        e.etype().as_str()
                    ),
                );
                let outcome = match reframe.interrupted(&error) {
                    Some(last) => answer.end(last).await,
                    None => Outcome::Close,
                };
                return Ok((outcome, Some(Class::StreamInterrupted)));
            }
        }
    }
}

//! An upstream's answer: its head, then its body as it arrives. An HTTP/1.1 answer is read here
//! from its connection; an HTTP/2 one comes on its stream (see [`super::http2`]).
//!
//! NOTE: answers were read with pingora's HTTP/1 client until it showed as the largest cost of
//! an open stream: it allocates a 64 KiB body buffer for every answer (heaptrack, 2,000 held
//! streams: 64 of the ~90 KiB allocated per stream), keeps the head's 4 KiB read buffer for the
//! answer's life, and copies every body chunk out of its buffer. Here the buffer grows with
//! what arrives (2 KiB first, doubling while reads fill it, up to 64 KiB), is let go while a
//! read waits with nothing in it, and body pieces are handed on as slices of it, without a
//! copy.
//!
//! Framing follows RFC 9112, section 6.3. An answer whose framing is ambiguous (both
//! `Transfer-Encoding` and `Content-Length`) or ends with the connection is read, but its
//! connection is never reused; one whose framing is invalid (lengths that disagree, a bad chunk
//! size) is an error. Every part of an answer that is not body (the head, a chunk-size line,
//! trailers) is bounded.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Version};
use pingora::protocols::Stream;
use pingora::{Error, ErrorType, Result};
use tokio::io::AsyncReadExt;
use tokio_util::io::poll_read_buf;

use super::headers::connection_listed;

/// The largest answer head.
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in one head (as pingora allowed).
const MAX_FIELDS: usize = 256;
/// The most informational (1xx) heads before the final one.
const MAX_INFORMATIONAL: usize = 8;
/// The longest chunk-size line (the size and its extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The largest trailer section.
const MAX_TRAILERS: usize = 16 * 1024;
/// The first read's room, and the most one read may take.
const FIRST_READ: usize = 2 * 1024;
const MAX_READ: usize = 64 * 1024;
/// A read gets fresh room when less than this is left (pieces handed on keep theirs).
const MIN_ROOM: usize = 1024;

/// An answer's head.
#[derive(Debug, Default)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
}

/// Where the body's reading stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Body {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    /// The body ends when the connection does.
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    /// Next: a chunk-size line.
    Size,
    /// This many bytes of the chunk's data are still to come.
    Data(u64),
    /// Next: the CRLF that ends a chunk's data.
    DataEnd,
    /// In the trailer section, this many bytes into it.
    Trailers(usize),
}

/// An answer being read from an upstream connection.
pub struct Response {
    head: Head,
    /// How long one read may wait.
    timeout: Duration,
    from: Source,
}

/// Where an answer's body comes from.
enum Source {
    H1(H1),
    /// A stream of an HTTP/2 connection, which other calls share.
    H2(super::http2::Body),
}

/// An HTTP/1.1 connection an answer is read from.
struct H1 {
    stream: Stream,
    /// Bytes read and not yet handed on.
    buf: BytesMut,
    /// The room the next read gets when the buffer is full.
    read_size: usize,
    body: Body,
    /// Whether the connection may carry another request once the body is read.
    reusable: bool,
}

impl Response {
    /// Reads the head of the answer to a request already written on `stream` (informational
    /// heads are skipped); `head_request` says whether it was a `HEAD` request (an answer
    /// without a body, whatever its head says). Each read waits at most `timeout`.
    pub async fn read(stream: Stream, head_request: bool, timeout: Duration) -> Result<Response> {
        let mut r = H1 {
            stream,
            buf: BytesMut::new(),
            read_size: FIRST_READ,
            body: Body::Done,
            reusable: false,
        };
        let mut informational = 0;
        loop {
            if let Some((len, head)) = parse_head(&r.buf)? {
                r.buf.advance(len);
                match head.status.as_u16() {
                    101 => {
                        return Err(Error::explain(
                            ErrorType::InvalidHTTPHeader,
                            "the upstream switched protocols unasked (101)",
                        ));
                    }
                    100..=199 if informational < MAX_INFORMATIONAL => informational += 1,
                    100..=199 => {
                        return Err(Error::explain(
                            ErrorType::InvalidHTTPHeader,
                            "too many informational (1xx) answers",
                        ));
                    }
                    _ => {
                        r.frame(&head, head_request)?;
                        return Ok(Response {
                            head,
                            timeout,
                            from: Source::H1(r),
                        });
                    }
                }
                continue;
            }
            if r.buf.len() >= MAX_HEAD {
                return Err(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    format!("the answer's head is over {MAX_HEAD} bytes"),
                ));
            }
            if r.fill(timeout, "while reading the answer's head").await? == 0 {
                return Err(Error::explain(
                    ErrorType::ConnectionClosed,
                    "the upstream closed the connection before answering",
                ));
            }
        }
    }

    /// An answer whose head came on an HTTP/2 stream, its body to be read from `body`.
    pub(super) fn of_h2(head: Head, body: super::http2::Body, timeout: Duration) -> Response {
        Response {
            head,
            timeout,
            from: Source::H2(body),
        }
    }

    /// The answer's head.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Lets the head's header fields go: a relay has taken what it needs of them, and a
    /// streamed answer may stay open for minutes.
    pub fn forget_headers(&mut self) {
        self.head.headers = HeaderMap::new();
    }

    /// The answer's status code.
    pub fn status(&self) -> u16 {
        self.head.status.as_u16()
    }

    /// The next piece of the body as it arrives; `None` once the body has ended.
    ///
    /// Cancel-safe: a call dropped while it waits loses nothing, the next one goes on.
    pub async fn body(&mut self) -> Result<Option<Bytes>> {
        match &mut self.from {
            Source::H1(h1) => h1.body(self.timeout).await,
            Source::H2(h2) => h2.next(self.timeout).await,
        }
    }

    /// The connection back, if it is HTTP/1.1, the whole answer was read and it may carry
    /// another request. (An HTTP/2 connection stays with its pool.)
    pub fn reuse(self) -> Option<Stream> {
        match self.from {
            Source::H1(h1) => {
                (h1.body == Body::Done && h1.reusable && h1.buf.is_empty()).then_some(h1.stream)
            }
            Source::H2(_) => None,
        }
    }
}

impl H1 {
    async fn body(&mut self, timeout: Duration) -> Result<Option<Bytes>> {
        loop {
            if let Some(piece) = self.take()? {
                return Ok(Some(piece));
            }
            if self.body == Body::Done {
                return Ok(None);
            }
            if self
                .fill(timeout, "while reading the answer's body")
                .await?
                == 0
            {
                if self.body == Body::UntilClose {
                    self.body = Body::Done;
                    return Ok(None);
                }
                return Err(Error::explain(
                    ErrorType::ConnectionClosed,
                    "the upstream closed the connection before the answer's end",
                ));
            }
        }
    }

    /// Settles how the body after `head` is framed, and whether the connection stays open.
    fn frame(&mut self, head: &Head, head_request: bool) -> Result<()> {
        let h = &head.headers;
        let listed = |token: &str| connection_listed(h).iter().any(|t| t == token);
        self.reusable = match head.version {
            Version::HTTP_11 => !listed("close"),
            _ => listed("keep-alive"),
        };
        let status = head.status.as_u16();
        self.body = if head_request || status == 204 || status == 304 {
            Body::Done
        } else if h.contains_key(header::TRANSFER_ENCODING) {
            // A length beside a transfer coding is ignored, and the connection not trusted
            // with another request (it is how requests are smuggled).
            if h.contains_key(header::CONTENT_LENGTH) {
                self.reusable = false;
            }
            if last_coding_is_chunked(h) {
                Body::Chunked(Chunk::Size)
            } else {
                self.reusable = false;
                Body::UntilClose
            }
        } else if h.contains_key(header::CONTENT_LENGTH) {
            match content_length(h)? {
                0 => Body::Done,
                n => Body::Length(n),
            }
        } else {
            self.reusable = false;
            Body::UntilClose
        };
        Ok(())
    }

    /// Reads what has arrived into the buffer (waiting for something to arrive): the number
    /// of bytes read, 0 at the connection's end.
    ///
    /// An empty buffer is let go while the read waits: a stream's answer spends most of its
    /// life waiting for its next event, and keeps no buffer meanwhile. Room is made again on
    /// each poll, which costs an allocation once per wait.
    async fn fill(&mut self, timeout: Duration, when: &'static str) -> Result<usize> {
        let read = std::future::poll_fn(|cx| {
            if self.buf.capacity() - self.buf.len() < MIN_ROOM {
                self.buf.reserve(self.read_size);
            }
            // The buffer may have more room than asked for (it grows as a vector does).
            let room = (self.buf.capacity() - self.buf.len()).min(self.read_size);
            let mut limited = std::pin::pin!((&mut self.stream).take(room as u64));
            let poll = poll_read_buf(limited.as_mut(), cx, &mut self.buf);
            if poll.is_pending() && self.buf.is_empty() {
                self.buf = BytesMut::new();
            }
            poll.map_ok(|n| (n, room))
        });
        let (n, room) = match tokio::time::timeout(timeout, read).await {
            Ok(read) => read.map_err(|e| Error::because(ErrorType::ReadError, when, e))?,
            Err(_) => return Err(Error::explain(ErrorType::ReadTimedout, when)),
        };
        if n == room {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        }
        Ok(n)
    }

    /// The next piece of the body among the bytes already read, if there is one.
    fn take(&mut self) -> Result<Option<Bytes>> {
        loop {
            match self.body {
                Body::Done => return Ok(None),
                Body::UntilClose if self.buf.is_empty() => return Ok(None),
                Body::UntilClose => return Ok(Some(self.buf.split().freeze())),
                Body::Length(_) if self.buf.is_empty() => return Ok(None),
                Body::Length(left) => {
                    let (piece, left) = self.split_off(left);
                    self.body = if left == 0 {
                        Body::Done
                    } else {
                        Body::Length(left)
                    };
                    return Ok(Some(piece));
                }
                Body::Chunked(chunk) => match self.step(chunk)? {
                    Step::Piece(piece) => return Ok(Some(piece)),
                    Step::More => return Ok(None),
                    Step::Next => {}
                },
            }
        }
    }

    /// Up to `left` of the buffered bytes (there are some), and how many are left to come.
    fn split_off(&mut self, left: u64) -> (Bytes, u64) {
        let n = usize::try_from(left).map_or(self.buf.len(), |l| l.min(self.buf.len()));
        (self.buf.split_to(n).freeze(), left - n as u64)
    }

    /// One step through a chunked body, in state `chunk`.
    fn step(&mut self, chunk: Chunk) -> Result<Step> {
        match chunk {
            Chunk::Size => match httparse::parse_chunk_size(&self.buf) {
                Ok(httparse::Status::Complete((len, size))) => {
                    self.buf.advance(len);
                    self.body = Body::Chunked(if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    });
                    Ok(Step::Next)
                }
                Ok(httparse::Status::Partial) if self.buf.len() > MAX_CHUNK_LINE => {
                    Err(invalid_chunk("a chunk-size line is too long"))
                }
                Ok(httparse::Status::Partial) => Ok(Step::More),
                Err(_) => Err(invalid_chunk("an invalid chunk size")),
            },
            Chunk::Data(_) if self.buf.is_empty() => Ok(Step::More),
            Chunk::Data(left) => {
                let (piece, left) = self.split_off(left);
                self.body = Body::Chunked(if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                });
                Ok(Step::Piece(piece))
            }
            Chunk::DataEnd if self.buf.len() < 2 => Ok(Step::More),
            Chunk::DataEnd if self.buf.starts_with(b"\r\n") => {
                self.buf.advance(2);
                self.body = Body::Chunked(Chunk::Size);
                Ok(Step::Next)
            }
            Chunk::DataEnd => Err(invalid_chunk("a chunk's data runs past its size")),
            Chunk::Trailers(seen) => {
                let Some(at) = memchr::memmem::find(&self.buf, b"\r\n") else {
                    if seen + self.buf.len() > MAX_TRAILERS {
                        return Err(invalid_chunk("the trailers are too long"));
                    }
                    return Ok(Step::More);
                };
                self.buf.advance(at + 2);
                self.body = if at == 0 {
                    Body::Done
                } else if seen + at + 2 > MAX_TRAILERS {
                    return Err(invalid_chunk("the trailers are too long"));
                } else {
                    Body::Chunked(Chunk::Trailers(seen + at + 2))
                };
                Ok(Step::Next)
            }
        }
    }
}

/// What one step through a chunked body came to.
enum Step {
    Piece(Bytes),
    /// More bytes must arrive first.
    More,
    /// The state moved on; step again.
    Next,
}

fn invalid_chunk(why: &'static str) -> Box<Error> {
    Error::explain(ErrorType::InvalidHTTPHeader, why)
}

/// The head at the start of `buf` and its length, or `None` if it has not all arrived.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Head)>> {
    // Left uninitialised: httparse writes the fields it parses, where filling 256 empty ones
    // (8 KiB) for every answer showed in profiles.
    let mut fields = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_FIELDS];
    let mut parsed = httparse::Response::new(&mut []);
    let mut parser = httparse::ParserConfig::default();
    parser.allow_spaces_after_header_name_in_responses(true);
    parser.allow_obsolete_multiline_headers_in_responses(true);
    let len = match parser.parse_response_with_uninit_headers(&mut parsed, buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid_head(format!("an invalid answer head: {e}"))),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| invalid_head("an invalid status code".into()))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| invalid_head(format!("an invalid header name {:?}", field.name)))?;
        let value = field_value(field.value)
            .ok_or_else(|| invalid_head(format!("an invalid value of header {name}")))?;
        headers.append(name, value);
    }
    Ok(Some((
        len,
        Head {
            status,
            version,
            headers,
        },
    )))
}

/// A field's value; an obsolete folded value (RFC 9112, 5.2) has its line breaks replaced by
/// spaces.
fn field_value(raw: &[u8]) -> Option<HeaderValue> {
    if !raw.contains(&b'\n') {
        return HeaderValue::from_bytes(raw).ok();
    }
    let unfolded: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b })
        .collect();
    HeaderValue::from_bytes(&unfolded).ok()
}

fn invalid_head(why: String) -> Box<Error> {
    Error::explain(ErrorType::InvalidHTTPHeader, why)
}

/// Whether the last transfer coding the answer names is `chunked`.
fn last_coding_is_chunked(h: &HeaderMap) -> bool {
    h.get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The body's length from `Content-Length`: every value (fields may repeat, or list values)
/// must be the same number.
fn content_length(h: &HeaderMap) -> Result<u64> {
    let mut length = None;
    for value in h.get_all(header::CONTENT_LENGTH) {
        for v in value.as_bytes().split(|&b| b == b',') {
            let v = v.trim_ascii();
            let n = (!v.is_empty() && v.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| invalid_head("an invalid Content-Length".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid_head("Content-Length values that differ".into()));
            }
            length = Some(n);
        }
    }
    length.ok_or_else(|| invalid_head("an invalid Content-Length".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    const WAIT: Duration = Duration::from_secs(5);

    /// A connection whose far end the test writes the answer on.
    async fn pair() -> (Stream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap());
        let (near, far) = tokio::join!(near, listener.accept());
        let far = far.unwrap().0;
        // Each of the far end's writes leaves at once.
        far.set_nodelay(true).unwrap();
        let near = pingora::protocols::l4::stream::Stream::from(near.unwrap());
        (Box::new(near), far)
    }

    /// Reads the answer the far end sends in `parts` (each a write of its own, the far end
    /// closing after them if `close`): the answer, its body, and whether the connection came
    /// back for reuse.
    async fn answer(
        parts: &[&[u8]],
        close: bool,
        head_request: bool,
    ) -> Result<(u16, HeaderMap, Vec<u8>, bool)> {
        let (near, mut far) = pair().await;
        let owned: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for part in owned {
                far.write_all(&part).await.unwrap();
                far.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            if close {
                drop(far);
                None
            } else {
                Some(far)
            }
        });
        let mut r = Response::read(near, head_request, WAIT).await?;
        let mut body = Vec::new();
        while let Some(piece) = r.body().await? {
            assert!(!piece.is_empty());
            body.extend_from_slice(&piece);
        }
        let _far = writer.await.unwrap();
        let (status, headers) = (r.status(), r.head().headers.clone());
        Ok((status, headers, body, r.reuse().is_some()))
    }

    /// The bytes of `whole`, one write per byte.
    fn bytewise(whole: &[u8]) -> Vec<&[u8]> {
        whole.chunks(1).collect()
    }

    #[tokio::test]
    async fn a_length_delimited_answer_is_read_whole_and_its_connection_comes_back() {
        let (status, headers, body, reusable) = answer(
            &[b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\nhello", b" world"],
            false,
            false,
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(body, b"hello world");
        assert!(reusable);
    }

    #[tokio::test]
    async fn a_chunked_answer_is_decoded_whatever_way_its_bytes_arrive() {
        let whole = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;name=value\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for parts in [vec![&whole[..]], bytewise(whole)] {
            let (status, _, body, reusable) = answer(&parts, false, false).await.unwrap();
            assert_eq!(status, 200);
            assert_eq!(body, b"hello 0123456789");
            assert!(reusable);
        }
    }

    #[tokio::test]
    async fn an_answer_without_framing_ends_with_its_connection_and_is_not_reused() {
        let (_, _, body, reusable) =
            answer(&[b"HTTP/1.1 200 OK\r\n\r\nall", b" of it"], true, false)
                .await
                .unwrap();
        assert_eq!(body, b"all of it");
        assert!(!reusable);
    }

    #[tokio::test]
    async fn informational_heads_are_skipped_and_bodiless_answers_have_no_body() {
        let (status, _, body, reusable) = answer(
            &[
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
            ],
            false,
            false,
        )
        .await
        .unwrap();
        assert_eq!((status, body.len(), reusable), (204, 0, true));
        // A HEAD request's answer has no body, whatever length it announces.
        let (status, _, body, reusable) = answer(
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"],
            false,
            true,
        )
        .await
        .unwrap();
        assert_eq!((status, body.len(), reusable), (200, 0, true));
    }

    #[tokio::test]
    async fn connections_the_answer_closes_or_frames_ambiguously_are_not_reused() {
        for head in [
            &b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nok"[..],
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            // Bytes after the answer's end: the next answer would start out of step.
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
        ] {
            let (_, _, body, reusable) = answer(&[head], false, false).await.unwrap();
            assert_eq!(body, b"ok");
            assert!(!reusable, "{}", String::from_utf8_lossy(head));
        }
        let (_, _, _, reusable) = answer(
            &[b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"],
            false,
            false,
        )
        .await
        .unwrap();
        assert!(reusable);
    }

    #[tokio::test]
    async fn malformed_answers_are_errors() {
        let cases: &[(&[u8], bool)] = &[
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
                false,
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n", false),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokay\r\n",
                false,
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
                false,
            ),
            (b"HTTP/1.1 2000 OK\r\n\r\n", false),
            (b"not http at all\r\n\r\n", false),
            // Cut short: before the head ends, within a length, within a chunk.
            (b"HTTP/1.1 200 OK\r\nContent-", true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", true),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                true,
            ),
        ];
        for (bytes, close) in cases {
            let got = answer(&[bytes], *close, false).await;
            assert!(got.is_err(), "{}", String::from_utf8_lossy(bytes));
        }
    }

    #[tokio::test]
    async fn every_part_that_is_not_body_is_bounded() {
        let huge_field = format!("HTTP/1.1 200 OK\r\nx-big: {}\r\n", "a".repeat(MAX_HEAD));
        let many_fields = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "x-f: 1\r\n".repeat(MAX_FIELDS + 1)
        );
        let chunk_line = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;{}",
            "e".repeat(MAX_CHUNK_LINE + 1)
        );
        let trailers = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n{}",
            "x-t: 1\r\n".repeat(MAX_TRAILERS / 8 + 1)
        );
        let informational = "HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_INFORMATIONAL + 1);
        for bytes in [huge_field, many_fields, chunk_line, trailers, informational] {
            // The far end keeps the connection open: the reader must give up on its own.
            let got = answer(&[bytes.as_bytes()], false, false).await;
            let e = got.expect_err(&bytes[..60.min(bytes.len())]);
            assert_eq!(e.etype(), &ErrorType::InvalidHTTPHeader);
        }
    }

    #[tokio::test]
    async fn a_silent_upstream_times_out() {
        let (near, _far) = pair().await;
        let e = Response::read(near, false, Duration::from_millis(50))
            .await
            .err()
            .unwrap();
        assert_eq!(e.etype(), &ErrorType::ReadTimedout);
        // And within a body: each read waits at most the timeout.
        let (near, mut far) = pair().await;
        far.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
            .await
            .unwrap();
        let mut r = Response::read(near, false, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(&r.body().await.unwrap().unwrap()[..], b"ab");
        let e = r.body().await.unwrap_err();
        assert_eq!(e.etype(), &ErrorType::ReadTimedout);
    }

    #[tokio::test]
    async fn a_waiting_body_read_holds_no_buffer_and_given_up_loses_nothing() {
        let (near, mut far) = pair().await;
        far.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
            .await
            .unwrap();
        let mut r = Response::read(near, false, WAIT).await.unwrap();
        assert_eq!(&r.body().await.unwrap().unwrap()[..], b"ab");
        // Nothing more has arrived: a read polled once and dropped.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(std::pin::pin!(r.body()).poll(&mut cx).is_pending());
        assert_eq!(
            buffered(&r),
            0,
            "a stream waiting for its next event keeps no buffer"
        );
        far.write_all(b"c\r\n0\r\n\r\n").await.unwrap();
        assert_eq!(&r.body().await.unwrap().unwrap()[..], b"c");
        assert!(r.body().await.unwrap().is_none());
        assert!(r.reuse().is_some());
    }

    /// The room an HTTP/1.1 answer's read buffer holds.
    fn buffered(r: &Response) -> usize {
        match &r.from {
            Source::H1(h1) => h1.buf.capacity(),
            Source::H2(_) => unreachable!("an HTTP/1.1 answer"),
        }
    }

    #[tokio::test]
    async fn reads_start_small_and_grow_with_a_large_body() {
        let (near, mut far) = pair().await;
        let size = 1024 * 1024;
        let writer = tokio::spawn(async move {
            far.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n").as_bytes())
                .await
                .unwrap();
            far.write_all(&vec![b'x'; size]).await.unwrap();
            far
        });
        let mut r = Response::read(near, false, WAIT).await.unwrap();
        // Waiting for the body, the answer holds no more than the first read's room.
        assert!(buffered(&r) <= FIRST_READ, "{}", buffered(&r));
        let (mut total, mut largest) = (0, 0);
        while let Some(piece) = r.body().await.unwrap() {
            total += piece.len();
            largest = largest.max(piece.len());
        }
        assert_eq!(total, size);
        assert!(largest <= MAX_READ && largest > FIRST_READ, "{largest}");
        drop(writer.await.unwrap());
    }
}

//! Writing gemgate's own answers: the head every answer starts with (status, request id,
//! CORS), JSON bodies and errors in the client's protocol.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;

use super::Outcome;
use super::exchange::{Exchange, Meta, X_GEMGATE_TRACE, X_REQUEST_ID};
use crate::http::reply::GateError;
use crate::policy::trace::Trace;

/// The head of an answer with `status`, recorded as the request's status.
pub(crate) fn response_header(status: u16, x: &mut Exchange) -> ResponseHeader {
    x.status = status;
    ResponseHeader::from(response_parts(status, &x.meta))
}

/// The start of every answer: `status`, the request id and, for a browser's call, CORS.
///
/// NOTE: filled as `http` parts, then made a [`ResponseHeader`]: see
/// `request::upstream_header`.
pub(crate) fn response_parts(status: u16, meta: &Meta) -> http::response::Parts {
    response_parts_with_room(status, meta, 4)
}

/// [`response_parts`] with room for `room` more fields. pingora keeps an answer's head for as
/// long as the answer lasts (a stream's for minutes), and a map never shrinks: a relay that
/// knows how many fields it adds makes room for those.
pub(crate) fn response_parts_with_room(
    status: u16,
    meta: &Meta,
    room: usize,
) -> http::response::Parts {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = http::StatusCode::from_u16(status).expect("valid status");
    let h = &mut parts.headers;
    h.reserve(1 + usize::from(meta.traced) + if meta.cors { 2 } else { 0 } + room);
    if let Ok(id) = HeaderValue::from_str(&meta.id) {
        h.insert(X_REQUEST_ID, id);
    }
    if meta.traced
        && let Some(trace) = meta.with_shared(|s| s.with_trace(Trace::header))
        && let Ok(v) = HeaderValue::from_str(&trace)
    {
        h.insert(X_GEMGATE_TRACE, v);
    }
    if meta.cors {
        // Browser-based clients call gemgate from their own origin, as they could gemini-balance.
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-request-id, retry-after, x-gemgate-trace"),
        );
    }
    parts
}

/// Answers with gemgate's own error, in the client's protocol.
pub(crate) async fn send_gate(s: &mut ServerSession, x: &mut Exchange, e: &GateError) -> Outcome {
    let mut h = response_header(e.status, x);
    let _ = h.insert_header(header::CONTENT_TYPE, "application/json; charset=UTF-8");
    if let Some(secs) = e.retry_after_s {
        let _ = h.insert_header(header::RETRY_AFTER, secs);
    }
    write_full(s, h, e.body(x.meta.protocol)).await
}

/// Answers with a JSON body.
pub(crate) async fn send(
    s: &mut ServerSession,
    x: &mut Exchange,
    status: u16,
    json: Bytes,
) -> Outcome {
    x.status = status;
    let mut h = response_parts(status, &x.meta);
    h.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    write_full(s, ResponseHeader::from(h), json).await
}

/// Writes a whole answer, with its length.
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

//! The request on its way in and up: reading the client's body within its limits, the upstream
//! request's header and query, and plugin rewrites of a Gemini request body.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header;
use pingora::http::RequestHeader;
use pingora::protocols::http::ServerSession;

use super::Refusal;
use crate::app::Generation;
use crate::http::auth;
use crate::http::reply::GateError;
use crate::policy::engine::Rewrite;
use crate::upstream::headers::{HELD_BACK, connection_listed, skip_request_header};

/// Longest wait for the next piece of a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// After this long, a request body must have come at `MIN_BODY_RATE` bytes a second.
const BODY_GRACE: Duration = Duration::from_secs(10);
const MIN_BODY_RATE: f64 = 1024.0;

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
    // When the body's first bytes came, read only for a body that takes more than one read.
    let mut started: Option<Instant> = None;
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
                // The whole body came (most often with the head): nothing more to read.
                if s.is_body_done() {
                    break;
                }
                let elapsed = started.get_or_insert_with(Instant::now).elapsed();
                if elapsed > BODY_GRACE && (got as f64) < MIN_BODY_RATE * elapsed.as_secs_f64() {
                    return Err(slow(s));
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
pub(super) fn upstream_header(
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
    let listed = connection_listed(&client.headers);
    let forward = &generation.config.forward_headers;
    let forwarded = || {
        client.headers.iter().filter(|(name, _)| {
            let n = name.as_str();
            let held_back = HELD_BACK.contains(&n) && !forward.contains(name);
            !(skip_request_header(n) || held_back || listed.iter().any(|l| l == n))
        })
    };
    // Room for what it will hold, counted first: a map never shrinks, and this one lives as
    // long as the request (a stream's for minutes); room for every client field (the key, the
    // length and hop-by-hop ones are left out) took a map twice the size.
    let headers = &mut parts.headers;
    headers.reserve(forwarded().count() + 1 + generation.config.custom_headers.len());
    if let Some(host) = &generation.target.host {
        headers.insert(header::HOST, host.clone());
    }
    for (name, value) in forwarded() {
        headers.append(name.clone(), value.clone());
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
pub(super) fn client_query(s: &ServerSession) -> String {
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

/// Applies a plugin rewrite to a JSON request body.
pub(super) fn rewrite_body(body: &[u8], rewrite: &Rewrite) -> Result<Bytes, Refusal> {
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
pub(super) fn rewrite_value(v: &mut serde_json::Value, rewrite: &Rewrite) -> Result<(), Refusal> {
    rewrite
        .apply(v)
        .map_err(|m| Refusal::Gate(GateError::new(400, m)))
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! Which headers pass between client and upstream: hop-by-hop headers never do, credentials
//! and framing belong to gemgate, and a few headers Google would act on are held back unless
//! the operator forwards them.

use http::header;

/// Headers that describe one connection, not the message: never relayed either way.
pub fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The headers a message's `Connection` header names: they describe that one connection, and
/// are never relayed (RFC 9110, 7.6.1). Lowercased; empty without a `Connection` header.
pub fn connection_listed(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect()
}

/// Client headers Google would act on that gemgate holds back unless `upstream.forward_headers`
/// names them: `x-goog-user-project` bills and authorises another Cloud project (and Google
/// answers 403 for one the key cannot use), and the method overrides turn a POST into another
/// call.
pub const HELD_BACK: &[&str] = &[
    "x-goog-user-project",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Hop-by-hop and credential headers: never forwarded upstream.
pub fn skip_request_header(name: &str) -> bool {
    is_hop_by_hop(name)
        || matches!(
            name,
            "host"
            | "proxy-authorization"
            | "expect"
            | "content-length"
            | "authorization"
            | "x-goog-api-key"
            // Anthropic clients send their (gemgate) token here.
            | "x-api-key"
            | "cookie"
            // gemgate's own: the admin token and the trace request.
            | "x-gemgate-admin"
            | "x-gemgate-trace"
            // The answer must stay readable by gemgate (error classification, usage).
            | "accept-encoding"
        )
}

/// Headers a plugin's rewrite may not set: the upstream's credential and the message framing
/// belong to gemgate.
pub fn is_protected_header(name: &str) -> bool {
    skip_request_header(name)
}

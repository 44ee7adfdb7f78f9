//! The head of a request to Google as it goes on the wire ([`request_head`]): gemgate writes
//! it itself, head then body, flushed once.

use pingora::http::RequestHeader;

/// How an attempt's key goes upstream.
#[derive(Clone, Copy)]
pub enum Credential<'a> {
    /// `x-goog-api-key: <value>`: the native API.
    GoogApiKey(&'a [u8]),
    /// `Authorization: Bearer <secret>`: Google's OpenAI-compatible API.
    Bearer(&'a str),
    /// `Authorization: Token <token>`: a Live session opened with an ephemeral token.
    Token(&'a str),
}

impl<'a> Credential<'a> {
    /// The field the key goes in.
    pub fn name(&self) -> &'static str {
        match self {
            Credential::GoogApiKey(_) => "x-goog-api-key",
            Credential::Bearer(_) | Credential::Token(_) => "authorization",
        }
    }

    /// The field's value in two parts: its scheme (none for a bare key) and the secret.
    pub fn value(&self) -> (&'static str, &'a [u8]) {
        match *self {
            Credential::GoogApiKey(key) => ("", key),
            Credential::Bearer(secret) => ("Bearer ", secret.as_bytes()),
            Credential::Token(token) => ("Token ", token.as_bytes()),
        }
    }
}

/// An HTTP proxy that forwards plain-HTTP requests: it is sent the target in absolute form.
#[derive(Clone, Copy)]
pub struct Forwarding<'a> {
    /// The upstream's `host[:port]`.
    pub authority: &'a str,
    /// The proxy's `Proxy-Authorization` value, if it wants one.
    pub authorization: Option<&'a str>,
}

/// The head of an upstream request (request line, header lines, blank line) as it goes on the
/// wire: `header`'s method, target and fields, the length of its `body_len`-byte body, the
/// attempt's key, and through a forwarding proxy the absolute target and the proxy's
/// credentials. Fields named like the ones added here are left out (a plugin's
/// `x-goog-api-key` cannot ride along with the key). The target is a parsed URI's (every way of
/// setting it parses it), so it holds no byte a request line may not carry.
///
/// NOTE: pingora's client takes a boxed [`RequestHeader`] and serializes it itself: that took a
/// copy of the whole header (its map and every value) for every attempt, since pingora keeps
/// the one it writes. The head is made straight from the request's one header instead.
pub fn request_head(
    header: &RequestHeader,
    body_len: usize,
    credential: Credential<'_>,
    forwarding: Option<Forwarding<'_>>,
) -> Vec<u8> {
    let target = header.raw_path();
    let mut head = Vec::with_capacity(256 + target.len() + header.headers.len() * 48);
    head.extend_from_slice(header.method.as_str().as_bytes());
    head.push(b' ');
    if let Some(f) = forwarding {
        head.extend_from_slice(b"http://");
        head.extend_from_slice(f.authority.as_bytes());
    }
    head.extend_from_slice(target);
    head.extend_from_slice(b" HTTP/1.1\r\n");
    let own = credential.name();
    let proxy_auth = forwarding.and_then(|f| f.authorization);
    for (name, value) in &header.headers {
        let name = name.as_str();
        if name == own
            || name == "content-length"
            || (proxy_auth.is_some() && name == "proxy-authorization")
        {
            continue;
        }
        field(&mut head, name, &[value.as_bytes()]);
    }
    // A POST always says how long its body is, even when it has none.
    if body_len > 0 || header.method == http::Method::POST {
        let mut n = itoa::Buffer::new();
        field(
            &mut head,
            "content-length",
            &[n.format(body_len).as_bytes()],
        );
    }
    let (scheme, secret) = credential.value();
    field(&mut head, own, &[scheme.as_bytes(), secret]);
    if let Some(auth) = proxy_auth {
        field(&mut head, "proxy-authorization", &[auth.as_bytes()]);
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Writes field `name` with its value, given in parts.
fn field(head: &mut Vec<u8>, name: &str, value: &[&[u8]]) {
    head.extend_from_slice(name.as_bytes());
    head.extend_from_slice(b": ");
    value.iter().for_each(|part| head.extend_from_slice(part));
    head.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(method: &str, target: &str, fields: &[(&str, &str)]) -> RequestHeader {
        let mut h = RequestHeader::build_no_case(method, target.as_bytes(), None).unwrap();
        for (name, value) in fields {
            h.append_header(name.to_string(), *value).unwrap();
        }
        h
    }

    fn head(
        h: &RequestHeader,
        body_len: usize,
        credential: Credential<'_>,
        forwarding: Option<Forwarding<'_>>,
    ) -> String {
        String::from_utf8(request_head(h, body_len, credential, forwarding)).unwrap()
    }

    #[test]
    fn a_request_head_carries_the_fields_the_key_and_the_body_length() {
        let h = header(
            "POST",
            "/v1beta/models/m:generateContent?alt=sse",
            &[
                ("host", "up.example"),
                ("content-type", "application/json"),
                ("x-custom", "1"),
                // Set by a plugin: the attempt's own key and length replace them.
                ("x-goog-api-key", "plugin-key"),
                ("content-length", "999"),
            ],
        );
        assert_eq!(
            head(&h, 42, Credential::GoogApiKey(b"AIza-1"), None),
            "POST /v1beta/models/m:generateContent?alt=sse HTTP/1.1\r\n\
             host: up.example\r\ncontent-type: application/json\r\nx-custom: 1\r\n\
             content-length: 42\r\nx-goog-api-key: AIza-1\r\n\r\n"
        );
        // An empty POST still says so; a GET without a body says nothing.
        assert!(head(&h, 0, Credential::GoogApiKey(b"k"), None).contains("content-length: 0\r\n"));
        let get = header(
            "GET",
            "/v1beta/models",
            &[("authorization", "Bearer client")],
        );
        assert_eq!(
            head(&get, 0, Credential::Bearer("AIza-2"), None),
            "GET /v1beta/models HTTP/1.1\r\nauthorization: Bearer AIza-2\r\n\r\n"
        );
    }

    #[test]
    fn through_a_forwarding_proxy_the_target_is_absolute_and_the_proxy_gets_its_credentials() {
        let h = header(
            "GET",
            "/v1beta/models",
            &[("proxy-authorization", "Basic client")],
        );
        let proxy = Forwarding {
            authority: "up.example:8080",
            authorization: Some("Basic cHJveHk="),
        };
        assert_eq!(
            head(&h, 0, Credential::GoogApiKey(b"k"), Some(proxy)),
            "GET http://up.example:8080/v1beta/models HTTP/1.1\r\nx-goog-api-key: k\r\n\
             proxy-authorization: Basic cHJveHk=\r\n\r\n"
        );
    }
}

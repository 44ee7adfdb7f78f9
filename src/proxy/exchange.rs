//! One request as the request path sees it: who asked and how to answer them (`Meta`), and
//! the record of what was done for it (`Exchange`), which becomes its access line and log
//! row (see `server::access`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName};
use pingora::http::RequestHeader;

use crate::http::peer::Peer;
use crate::http::reply::Protocol;
use crate::keys::taxonomy::ErrorClass;
use crate::policy::engine::Shared as PluginShared;
use crate::translate::usage::Tokens;

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Asks for a trace of the plugins' decisions (with [`X_GEMGATE_ADMIN`]); the answer's header
/// of the same name carries it.
pub(crate) const X_GEMGATE_TRACE: HeaderName = HeaderName::from_static("x-gemgate-trace");
pub(crate) const X_GEMGATE_ADMIN: HeaderName = HeaderName::from_static("x-gemgate-admin");

/// Who asked, and how to answer them: set while the request is routed and authenticated, then
/// only read.
pub(crate) struct Meta {
    pub id: String,
    pub started: Instant,
    /// The client token's name, once authenticated.
    pub client: Option<String>,
    /// The API the client speaks: errors are answered in its shape.
    pub protocol: Protocol,
    /// Who sent the request.
    pub peer: Peer,
    /// The request came from a browser page (it has an `Origin`): answers carry CORS headers.
    pub cors: bool,
    /// What plugins share within this request (`ctx.shared`): each hook call takes it for
    /// the length of the call. It holds the request's plugin trace, when one was asked for.
    pub shared: Mutex<PluginShared>,
    /// Whether the plugins' decisions are traced (`x-gemgate-trace` with the admin token).
    pub traced: bool,
    /// The request's place in a trace, when traces are exported.
    pub trace: Option<crate::traces::Context>,
    /// Its finished attempts' spans, until the request's own span ends.
    pub spans: Mutex<Vec<crate::traces::Span>>,
    /// The model the client asked for, when a plugin (an alias) made it another.
    pub asked_model: std::sync::OnceLock<String>,
}

impl Meta {
    /// The client's name, or `""` before authentication.
    pub fn client(&self) -> &str {
        self.client.as_deref().unwrap_or_default()
    }

    /// From now on, the plugins' decisions for this request are traced.
    pub fn trace_plugins(&mut self) {
        self.shared = Mutex::new(PluginShared::traced());
        self.traced = true;
    }

    /// Runs `f` over what plugins share within this request.
    pub fn with_shared<T>(&self, f: impl FnOnce(&mut PluginShared) -> T) -> T {
        f(&mut self.shared.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// What kind of request this was: it decides what is logged and which hooks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `GET /health`: never logged but at debug level.
    Health,
    /// A CORS preflight.
    Preflight,
    /// An admin page or admin API call: not a client's request.
    Admin,
    /// A client's call, proxied.
    Call,
}

/// Why a request ended other than with a clean answer, for its log line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Class {
    /// The upstream's error, or the failure to reach it, by the error taxonomy.
    Upstream(ErrorClass),
    /// The client went away while its answer was being written.
    ClientGone,
    /// The upstream's stream broke off after bytes had gone to the client.
    StreamInterrupted,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Upstream(class) => class.as_str(),
            Class::ClientGone => "client_gone",
            Class::StreamInterrupted => "stream_interrupted",
        }
    }
}

/// What the attempt loop did, returned to the request's handler for its record.
#[derive(Debug, Default)]
pub(crate) struct Tried {
    pub attempts: u32,
    /// The key of the last attempt.
    pub key: Option<String>,
    /// The class of the last failed attempt, or how a relayed answer broke off.
    pub class: Option<Class>,
    /// The status of the upstream's answer that was used.
    pub status: Option<u16>,
    /// Tokens the answer reported (`usageMetadata`).
    pub tokens: Option<Tokens>,
    /// When the answer's head went to the client.
    pub ttfb: Option<Duration>,
    /// The upstream's `x-goog-upload-*` headers of a collected answer (the Files API).
    pub upload_headers: Vec<(String, String)>,
}

/// What one request did, for its log line.
pub(crate) struct Exchange {
    pub meta: Meta,
    pub kind: Kind,
    pub model: String,
    pub action: String,
    pub key: Option<String>,
    pub attempts: u32,
    pub status: u16,
    pub class: Option<Class>,
    pub ttfb: Option<Duration>,
    /// Tokens the answer reported (`usageMetadata`).
    pub tokens: Tokens,
    /// For the error log: Google's status and message of a refused request.
    pub upstream: Option<(u16, String)>,
    /// For the error log, with `ERROR_LOG_RECORD_REQUEST_BODY`: the request body.
    pub body: Option<Bytes>,
    /// The upstream's `x-goog-upload-*` headers of a collected answer (the Files API).
    pub upload_headers: Vec<(String, String)>,
    /// A Live session whose handshake both sides accepted, for the server to join.
    pub tunnel: Option<super::live::Tunnel>,
    /// How long the request took to answer, read once when it was ([`Exchange::answered`]):
    /// the access line, the metrics, the log record and `on_log` say the same.
    latency: Option<Duration>,
}

/// 16 random hex digits: the id of a request that brought none.
pub(crate) fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u64(..);
    (0..16)
        .map(|i| char::from(HEX[(n >> (60 - 4 * i)) as usize & 0xf]))
        .collect()
}

impl Exchange {
    pub fn new(req: &RequestHeader) -> Exchange {
        let id = req
            .headers
            .get(X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
            .map_or_else(new_request_id, str::to_owned);
        Exchange {
            meta: Meta {
                id,
                started: Instant::now(),
                client: None,
                protocol: Protocol::Gemini,
                peer: Peer::default(),
                cors: req.headers.contains_key(header::ORIGIN),
                shared: Mutex::default(),
                traced: false,
                trace: None,
                spans: Mutex::default(),
                asked_model: std::sync::OnceLock::new(),
            },
            kind: Kind::Call,
            model: String::new(),
            action: String::new(),
            key: None,
            attempts: 0,
            status: 0,
            class: None,
            ttfb: None,
            tokens: Tokens::default(),
            upstream: None,
            body: None,
            upload_headers: Vec::new(),
            tunnel: None,
            latency: None,
        }
    }

    /// Notes that the request was answered: its latency is now.
    pub fn answered(&mut self) {
        self.latency = Some(self.meta.started.elapsed());
    }

    /// How long the request took to answer (until now, if it was not yet).
    pub fn latency(&self) -> Duration {
        self.latency.unwrap_or_else(|| self.meta.started.elapsed())
    }

    /// Marks the request as one of gemgate's own (health, preflight, admin), logged as `action`.
    pub fn own(&mut self, kind: Kind, action: &str) {
        self.kind = kind;
        self.action = action.to_owned();
    }

    /// Takes in what an attempt loop did.
    pub fn record(&mut self, tried: Tried) {
        self.attempts += tried.attempts;
        if tried.key.is_some() {
            self.key = tried.key;
        }
        self.class = tried.class;
        if let Some(status) = tried.status {
            self.status = status;
        }
        if let Some(tokens) = tried.tokens {
            self.tokens = tokens;
        }
        if tried.ttfb.is_some() {
            self.ttfb = tried.ttfb;
        }
        if !tried.upload_headers.is_empty() {
            self.upload_headers = tried.upload_headers;
        }
    }

    /// The finished request's record, as `on_log` plugins get it.
    pub fn entry(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.meta.id,
            "client": self.meta.client,
            "model": self.model,
            "action": self.action,
            "key_id": self.key,
            "status": self.status,
            "class": self.class.map(Class::as_str),
            "attempts": self.attempts,
            "latency_ms": self.latency().as_secs_f64() * 1000.0,
            "ttfb_ms": self.ttfb.map(|d| d.as_secs_f64() * 1000.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_request_ids_are_16_random_hex_digits() {
        fastrand::seed(7);
        let n = fastrand::u64(..);
        fastrand::seed(7);
        assert_eq!(new_request_id(), format!("{n:016x}"));
        assert_ne!(new_request_id(), new_request_id());
    }
}

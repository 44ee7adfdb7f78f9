//! The Live API: ephemeral auth tokens (`POST /v1alpha/auth_tokens`) and the WebSocket of
//! `…/ws/google.ai.generativelanguage.{version}.GenerativeService.BidiGenerateContent` (the
//! key in `x-goog-api-key` or `?key=`) or `…BidiGenerateContentConstrained` (an ephemeral
//! token this fake minted, in `Authorization: Token auth_tokens/…`, `x-goog-api-key` or
//! `?access_token=`), echoing each text it is sent.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use super::store::{Store, random_id};
use super::{Body, FakeState, full, google_error, json_response};

/// The most ephemeral tokens the fake remembers.
pub const MAX_AUTH_TOKENS: usize = 10_000;
/// The largest WebSocket message (and frame) a session accepts.
pub const MAX_MESSAGE: usize = 1 << 20;
/// The longest a session lasts.
pub const MAX_SESSION: Duration = Duration::from_secs(600);

/// Token name (`auth_tokens/…`) → the key that minted it.
pub(crate) type AuthTokens = Store<String, MAX_AUTH_TOKENS>;

/// Whether `path` is the Live API's WebSocket: `Some(true)` for the constrained one (ephemeral
/// tokens), `Some(false)` for the one keys use.
pub(crate) fn ws_kind(path: &str) -> Option<bool> {
    let (_, tail) = path.rsplit_once("/ws/")?;
    let rest = tail.strip_prefix("google.ai.generativelanguage.")?;
    let (version, method) = rest.split_once(".GenerativeService.")?;
    if !matches!(version, "v1" | "v1beta" | "v1alpha") {
        return None;
    }
    match method {
        "BidiGenerateContent" => Some(false),
        "BidiGenerateContentConstrained" => Some(true),
        _ => None,
    }
}

/// The ephemeral token a request to the constrained WebSocket carries, as `auth_tokens/…`.
pub(crate) fn token_of(headers: &http::HeaderMap, query: &str) -> Option<String> {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let token = header("authorization")
        .and_then(|a| a.strip_prefix("Token "))
        .or_else(|| header("x-goog-api-key"))
        .or_else(|| super::query_value(query, "access_token"))?
        .trim();
    if token.is_empty() {
        return None;
    }
    Some(if token.starts_with("auth_tokens/") {
        token.to_owned()
    } else {
        format!("auth_tokens/{token}")
    })
}

/// `POST /{version}/auth_tokens`: mints a token for `key`, whatever constraints the body sets.
pub(crate) fn mint(
    state: &FakeState,
    key: &str,
    method: &http::Method,
    body: &[u8],
) -> Response<Body> {
    if method != http::Method::POST {
        return google_error(405, "UNIMPLEMENTED", "Method not allowed", Value::Null);
    }
    if !body.is_empty()
        && let Err(message) = super::cache::parse_body(body)
    {
        return super::cache::invalid(&message);
    }
    let name = format!("auth_tokens/{}", random_id(24, fastrand::alphanumeric));
    state
        .auth_tokens
        .lock()
        .unwrap()
        .insert(name.clone(), key.to_owned());
    json_response(StatusCode::OK, &json!({ "name": name }))
}

/// Answers the WebSocket handshake of `key` (its behaviour and `x-fake-error` already
/// applied) and runs the session once hyper hands the connection over.
pub(crate) fn upgrade(
    state: Arc<FakeState>,
    parts: &http::request::Parts,
    on_upgrade: Option<OnUpgrade>,
) -> Response<Body> {
    let header = |n: &str| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let has = |n: &str, token: &str| {
        header(n)
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if parts.method != http::Method::GET {
        return google_error(405, "UNIMPLEMENTED", "Method not allowed", Value::Null);
    }
    let ws_key = header("sec-websocket-key");
    let (Some(on_upgrade), true) = (
        on_upgrade,
        has("upgrade", "websocket")
            && has("connection", "upgrade")
            && header("sec-websocket-version") == "13"
            && !ws_key.is_empty(),
    ) else {
        return google_error(
            400,
            "INVALID_ARGUMENT",
            "The request is not a WebSocket handshake.",
            Value::Null,
        );
    };
    let accept = derive_accept_key(ws_key.as_bytes());
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            session(state, TokioIo::new(upgraded)).await;
        }
    });
    let mut resp = full(StatusCode::SWITCHING_PROTOCOLS, "text/plain", "");
    let headers = resp.headers_mut();
    headers.remove("content-type");
    headers.insert("upgrade", http::HeaderValue::from_static("websocket"));
    headers.insert("connection", http::HeaderValue::from_static("Upgrade"));
    headers.insert(
        "sec-websocket-accept",
        accept.parse().expect("a header value"),
    );
    resp
}

async fn session<S>(state: Arc<FakeState>, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let mut closed = state.closed_signal();
    let deadline = tokio::time::Instant::now() + MAX_SESSION;
    loop {
        let message = tokio::select! {
            m = ws.next() => m,
            _ = tokio::time::sleep_until(deadline) => {
                let _ = close(&mut ws, CloseCode::Normal, "session time limit reached").await;
                return;
            }
            _ = closed.changed() => return,
        };
        let data = match message {
            Some(Ok(Message::Text(t))) => Bytes::from(t),
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Ping(_))) => {
                // tungstenite queued the pong: send it now.
                if ws.flush().await.is_err() {
                    return;
                }
                continue;
            }
            // tungstenite answers a close; the next read ends the stream.
            Some(Ok(_)) => continue,
            Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(_))) => {
                let _ = close(&mut ws, CloseCode::Size, "message too big").await;
                return;
            }
            Some(Err(_)) | None => return,
        };
        let Ok(Value::Object(message)) = serde_json::from_slice::<Value>(&data) else {
            let _ = close(
                &mut ws,
                CloseCode::Invalid,
                "Invalid JSON payload received.",
            )
            .await;
            return;
        };
        for reply in replies(&Value::Object(message)) {
            if ws.send(Message::text(reply.to_string())).await.is_err() {
                return;
            }
        }
    }
}

async fn close<S>(
    ws: &mut WebSocketStream<S>,
    code: CloseCode,
    reason: &str,
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
    .await
}

/// What the session answers a client message with.
fn replies(message: &Value) -> Vec<Value> {
    let either = |a: &str, b: &str| message.get(a).or_else(|| message.get(b));
    if message.get("setup").is_some() {
        let id = random_id(16, fastrand::alphanumeric);
        return vec![json!({ "setupComplete": { "sessionId": id } })];
    }
    let mut texts: Vec<&str> = Vec::new();
    if let Some(content) = either("clientContent", "client_content") {
        for turn in content["turns"].as_array().into_iter().flatten() {
            for part in turn["parts"].as_array().into_iter().flatten() {
                if let Some(t) = part["text"].as_str() {
                    texts.push(t);
                }
            }
        }
    }
    if let Some(input) = either("realtimeInput", "realtime_input")
        && let Some(t) = input["text"].as_str()
    {
        texts.push(t);
    }
    if texts.is_empty() {
        return Vec::new();
    }
    let text = format!("echo: {}", texts.join(" "));
    vec![
        json!({ "serverContent": { "modelTurn": { "role": "model", "parts": [{ "text": text }] } } }),
        json!({ "serverContent": { "turnComplete": true } }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let p = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";
        assert_eq!(ws_kind(p), Some(false));
        assert_eq!(
            ws_kind(
                "/x/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContentConstrained"
            ),
            Some(true)
        );
        assert_eq!(
            ws_kind("/ws/google.ai.generativelanguage.v2.GenerativeService.BidiGenerateContent"),
            None
        );
        assert_eq!(ws_kind("/v1beta/models"), None);
    }

    #[test]
    fn echoes() {
        let r = replies(
            &json!({ "client_content": { "turns": [{ "role": "user", "parts": [{ "text": "a" }, { "text": "b" }] }], "turn_complete": true } }),
        );
        assert_eq!(
            r[0]["serverContent"]["modelTurn"]["parts"][0]["text"],
            "echo: a b"
        );
        assert_eq!(r[1]["serverContent"]["turnComplete"], true);
        let r = replies(&json!({ "realtimeInput": { "text": "hi" } }));
        assert_eq!(
            r[0]["serverContent"]["modelTurn"]["parts"][0]["text"],
            "echo: hi"
        );
        assert!(replies(&json!({ "realtimeInput": { "audio": {} } })).is_empty());
        let r = replies(&json!({ "setup": { "model": "models/x" } }));
        assert_eq!(
            r[0]["setupComplete"]["sessionId"].as_str().unwrap().len(),
            16
        );
    }
}

//! Ephemeral tokens and the Live API's WebSocket, on loopback.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use gemgate_fake_upstream::{FakeConfig, FakeUpstream, MAX_MESSAGE};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{WebSocketStream, client_async};

mod common;
use common::call;

const LIVE: &str = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";
const CONSTRAINED: &str =
    "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContentConstrained";

type Ws = WebSocketStream<TcpStream>;

/// Opens the WebSocket at `path` with `headers`: the session, or the HTTP refusal (status,
/// JSON body).
async fn connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Result<Ws, (u16, Value)> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    let stream = TcpStream::connect(addr).await.unwrap();
    match client_async(request, stream).await {
        Ok((ws, response)) => {
            assert_eq!(response.status(), 101);
            assert!(response.headers().get("sec-websocket-extensions").is_none());
            Ok(ws)
        }
        Err(Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            Err((
                response.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ))
        }
        Err(e) => panic!("{e}"),
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next JSON message (text frames only, as the fake sends).
async fn receive(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Binary(_) => panic!("a binary frame"),
            _ => continue,
        }
    }
}

/// A setup and one turn, checked.
async fn converse(ws: &mut Ws, text: &str) {
    send(
        ws,
        json!({ "setup": { "model": "models/gemini-live-2.5-flash-preview" } }),
    )
    .await;
    let setup = receive(ws).await;
    assert!(
        !setup["setupComplete"]["sessionId"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    send(
        ws,
        json!({ "clientContent": { "turns": [{ "role": "user", "parts": [{ "text": text }] }], "turnComplete": true } }),
    )
    .await;
    assert_eq!(
        receive(ws).await,
        json!({ "serverContent": { "modelTurn": { "role": "model", "parts": [{ "text": format!("echo: {text}") }] } } })
    );
    assert_eq!(
        receive(ws).await,
        json!({ "serverContent": { "turnComplete": true } })
    );
}

#[tokio::test]
async fn a_session_echoes() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let addr = fake.addr;
    let mut ws = connect(addr, LIVE, &[("x-goog-api-key", "k1")])
        .await
        .unwrap();
    converse(&mut ws, "hello live").await;
    // snake_case, realtime input, binary frames.
    let text = json!({ "realtime_input": { "text": "typed" } }).to_string();
    ws.send(Message::binary(text.into_bytes())).await.unwrap();
    assert_eq!(
        receive(&mut ws).await["serverContent"]["modelTurn"]["parts"][0]["text"],
        "echo: typed"
    );
    assert_eq!(
        receive(&mut ws).await["serverContent"]["turnComplete"],
        true
    );
    // Pings are answered.
    ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"p"),
        other => panic!("{other:?}"),
    }
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}

    // The key in the query; the upgrade counted as one of its requests.
    let mut ws = connect(addr, &format!("/prefix{LIVE}?key=k2"), &[])
        .await
        .unwrap();
    converse(&mut ws, "again").await;
    let counts = fake.state.requests_by_key();
    assert_eq!(counts.get("k1"), Some(&1));
    assert_eq!(counts.get("k2"), Some(&1));
    let last = fake.state.last_received().unwrap();
    assert_eq!(last.path, format!("/prefix{LIVE}"));
    assert_eq!(last.key.as_deref(), Some("k2"));

    // Not JSON: the session closes with 1007.
    ws.send(Message::text("not json")).await.unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Invalid),
        other => panic!("{other:?}"),
    }

    // Too big: closed with 1009, or the connection dropped.
    let mut ws = connect(addr, LIVE, &[("x-goog-api-key", "k1")])
        .await
        .unwrap();
    let big = "x".repeat(MAX_MESSAGE + 1);
    let _ = ws.send(Message::text(big)).await;
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Size),
        Some(Ok(other)) => panic!("{other:?}"),
        Some(Err(_)) | None => {}
    }
}

#[tokio::test]
async fn ephemeral_tokens_open_the_constrained_socket() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let addr = fake.addr;
    let body = json!({ "uses": 1, "expireTime": "2099-01-01T00:00:00Z", "bidiGenerateContentSetup": { "model": "models/x" } });
    let mut names = Vec::new();
    for version in ["v1alpha", "v1beta", "v1"] {
        let path = format!("/{version}/auth_tokens");
        let (status, token) = call(addr, "POST", &path, Some("k1"), &body.to_string()).await;
        assert_eq!(status, 200, "{token}");
        let name = token["name"].as_str().unwrap().to_owned();
        let id = name.strip_prefix("auth_tokens/").unwrap();
        assert_eq!(id.len(), 24);
        assert!(id.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(token.as_object().unwrap().len(), 1);
        assert_eq!(fake.state.auth_token_owner(&name).as_deref(), Some("k1"));
        assert_eq!(fake.state.token_owner(id).as_deref(), Some("k1"));
        names.push(name);
    }
    let (status, _) = call(addr, "POST", "/v1alpha/auth_tokens", Some("k1"), "nope").await;
    assert_eq!(status, 400);
    let (status, _) = call(
        addr,
        "POST",
        "/v1alpha/auth_tokens",
        Some("invalid-k"),
        "{}",
    )
    .await;
    assert_eq!(status, 400);

    // As the SDK sends it: `Authorization: Token …`, and the token as the key too.
    let token = format!("Token {}", names[0]);
    let mut ws = connect(
        addr,
        CONSTRAINED,
        &[("authorization", &token), ("x-goog-api-key", &names[0])],
    )
    .await
    .unwrap();
    converse(&mut ws, "ephemeral").await;
    // The session counts as a request of the key that minted the token.
    assert_eq!(fake.state.requests_by_key().get("k1"), Some(&5));
    assert_eq!(
        fake.state.last_received().unwrap().key.as_deref(),
        Some("k1")
    );
    let mut ws = connect(
        addr,
        &format!("{CONSTRAINED}?access_token={}", names[1]),
        &[],
    )
    .await
    .unwrap();
    converse(&mut ws, "by query").await;

    // An unknown token, or a key, is refused without ErrorInfo and without an upgrade.
    for (name, value) in [
        ("authorization", "Token auth_tokens/forged"),
        ("x-goog-api-key", "k1"),
    ] {
        let (status, error) = connect(addr, CONSTRAINED, &[(name, value)])
            .await
            .err()
            .unwrap();
        assert_eq!(status, 403);
        assert_eq!(error["error"]["status"], "PERMISSION_DENIED");
        assert!(error["error"].get("details").is_none(), "{error}");
    }
    // Reset forgets tokens.
    fake.state.reset();
    let (status, _) = connect(addr, CONSTRAINED, &[("authorization", &token)])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 403);
}

#[tokio::test]
async fn key_behaviours_refuse_the_upgrade() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let addr = fake.addr;
    let (status, error) = connect(addr, LIVE, &[("x-goog-api-key", "invalid-1")])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 400);
    assert_eq!(error["error"]["details"][0]["reason"], "API_KEY_INVALID");
    let (status, error) = connect(addr, LIVE, &[("x-goog-api-key", "minute-1")])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 429);
    assert_eq!(
        error["error"]["details"][0]["@type"],
        "type.googleapis.com/google.rpc.QuotaFailure"
    );
    let (status, _) = connect(addr, LIVE, &[("x-goog-api-key", "suspended-1")])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 403);
    let (status, error) = connect(
        addr,
        LIVE,
        &[
            ("x-goog-api-key", "k"),
            ("x-fake-error", "403 SERVICE_DISABLED"),
        ],
    )
    .await
    .err()
    .unwrap();
    assert_eq!(status, 403);
    assert_eq!(error["error"]["details"][0]["reason"], "SERVICE_DISABLED");
    // A minted token stands for its key's behaviour.
    let (_, token) = call(addr, "POST", "/v1alpha/auth_tokens", Some("k9"), "{}").await;
    fake.state
        .set_behaviour("k9", gemgate_fake_upstream::Behaviour::Overloaded);
    let auth = format!("Token {}", token["name"].as_str().unwrap());
    let (status, _) = connect(addr, CONSTRAINED, &[("authorization", &auth)])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 503);
    // A plain GET is not a handshake.
    let (status, _) = call(addr, "GET", LIVE, Some("k"), "").await;
    assert_eq!(status, 400);
    // Closing every connection ends sessions too.
    let mut ws = connect(addr, LIVE, &[("x-goog-api-key", "k")])
        .await
        .unwrap();
    converse(&mut ws, "before").await;
    fake.state.drop_connections();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(ended.is_ok());
}

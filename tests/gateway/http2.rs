//! Calls to the upstream over HTTP/2 (`GEMGATE_UPSTREAM_HTTP2`).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use crate::streaming::{STREAM_SSE, sse_events, stream};

/// A gemgate that calls its upstream over HTTP/2.
fn http2_gate() -> GateBuilder {
    gate().env("GEMGATE_UPSTREAM_HTTP2", "true")
}

fn streamed_text(text: &str) -> String {
    sse_events(text).iter().map(answer_text).collect()
}

#[tokio::test]
async fn many_open_streams_share_a_few_upstream_connections() {
    let fake = fake().await;
    let gate = http2_gate().upstream(&fake, &["good-1"]).start().await;
    let (status, _, v) = post(&gate, GENERATE, &ask("over two")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(answer_text(&v), "echo: over two");
    let seen = fake.state.last_received().unwrap();
    assert_eq!(seen.version, "HTTP/2.0");
    let field = |name: &str| seen.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    assert_eq!(field("x-goog-api-key").map(String::as_str), Some("good-1"));
    assert!(field("connection").is_none() && field("host").is_none());

    // More streams than one connection carries, all open at once.
    const STREAMS: usize = 150;
    let (before, connections_before) = (fake.state.total_requests(), fake.state.connections());
    let held: Vec<_> = (0..STREAMS)
        .map(|i| {
            let url = gate.url(STREAM_SSE);
            tokio::spawn(async move {
                let resp = client()
                    .post(url)
                    .header("x-goog-api-key", TOKEN)
                    .header("x-fake-hold", format!("h2-{i}"))
                    .json(&ask(&format!("stream {i}")))
                    .send()
                    .await
                    .ok()?;
                Some((resp.status().as_u16(), resp.text().await.ok()?))
            })
        })
        .collect();
    for _ in 0..500 {
        if fake.state.total_requests() >= before + STREAMS as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.state.total_requests(), before + STREAMS as u64);
    let opened = fake.state.connections() - connections_before;
    // Two worker threads, each with its own connections of up to 16 streams (over HTTP/1.1,
    // a connection each).
    assert!(
        opened <= 12,
        "{STREAMS} streams took {opened} new connections"
    );

    // Meanwhile another call is answered.
    let (status, _, v) = post(&gate, GENERATE, &ask("meanwhile")).await;
    assert_eq!(status, 200, "{v}");

    for i in 0..STREAMS {
        fake.state.release(&format!("h2-{i}"));
    }
    for (i, task) in held.into_iter().enumerate() {
        let (status, text) = task.await.unwrap().expect("a stream broke off");
        assert_eq!(status, 200, "{text}");
        assert_eq!(streamed_text(&text), format!("echo: stream {i}"));
    }
}

#[tokio::test]
async fn an_upstream_that_declines_http2_in_its_tls_handshake_is_called_over_http11() {
    let fake = fake().await;
    // A gemgate serving HTTPS, which offers HTTP/1.1 only, is the other's upstream.
    let front = gate().upstream(&fake, &["good-1"]).tls().start().await;
    let gate = http2_gate()
        .env("BASE_URL", &front.url("/v1beta"))
        .env("API_KEYS", &format!("[\"{TOKEN}\"]"))
        .env("SSL_CERT_FILE", &test_ca())
        .start()
        .await;
    for text in ["first", "second"] {
        let (status, _, v) = post(&gate, GENERATE, &ask(text)).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(answer_text(&v), format!("echo: {text}"));
    }
    gate.wait_log("declined HTTP/2").await;
    assert_eq!(fake.state.last_received().unwrap().version, "HTTP/1.1");
}

#[tokio::test]
async fn a_plain_upstream_that_does_not_speak_http2_is_a_clear_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    let gate = http2_gate()
        .env("BASE_URL", &format!("http://{addr}/v1beta"))
        .env("API_KEYS", "[\"k-1\",\"k-2\"]")
        .start()
        .await;
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        post(&gate, GENERATE, &ask("anyone")),
    )
    .await
    .expect("the call hung");
    let (status, _, v) = answer;
    assert_eq!(status, 502, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("does the upstream speak HTTP/2?"), "{v}");
    server.abort();
}

#[tokio::test]
async fn failures_over_http2_are_told_apart_as_over_http11() {
    let quota_fake = fake().await;
    let quota_gate = http2_gate()
        .upstream(&quota_fake, &["minute-1", "good-2"])
        .start()
        .await;
    // A key at its quota: its error body is read and classified, and the call goes on another.
    let (status, _, v) = post(&quota_gate, GENERATE, &ask("once")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(answer_text(&v), "echo: once");
    assert_eq!(quota_fake.state.key_stats("minute-1").requests, 1);
    assert_eq!(quota_fake.state.key_stats("good-2").requests, 1);

    // A stream the upstream breaks off after its first chunks ends with an error event, never
    // as if it were whole, and is not started again on another key.
    let cut_fake = fake().await;
    let cut_gate = http2_gate()
        .upstream(&cut_fake, &["cut-1", "good-2"])
        .start()
        .await;
    let (status, text) = stream(&cut_gate, STREAM_SSE, 4, "a b c d e f g h").await;
    assert_eq!(status, 200);
    let events = sse_events(&text);
    let (last, data) = events.split_last().unwrap();
    assert_eq!(data.len(), 2, "the two chunks sent before the cut: {text}");
    assert_eq!(last["error"]["code"], 502, "{text}");
    assert_eq!(cut_fake.state.key_stats("good-2").requests, 0);
}

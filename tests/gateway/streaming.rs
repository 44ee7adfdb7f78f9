//! Streaming, connection pooling, limits, timeouts and shutdown.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::common::*;

pub(crate) const STREAM_SSE: &str = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";

pub(crate) fn sse_events(text: &str) -> Vec<Value> {
    text.split("\r\n\r\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| serde_json::from_str(e.trim().strip_prefix("data: ").unwrap()).unwrap())
        .collect()
}

/// A streamed call the fake answers in `chunks` chunks: its status and its body as read.
pub(crate) async fn stream(gate: &Gate, path: &str, chunks: u32, text: &str) -> (u16, String) {
    let resp = client()
        .post(gate.url(path))
        .header("x-goog-api-key", TOKEN)
        .header("x-fake-chunks", chunks.to_string())
        .json(&ask(text))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (
        status,
        resp.text()
            .await
            .unwrap_or_else(|e| format!("<broken: {e}>")),
    )
}

#[tokio::test]
async fn each_chunk_reaches_the_client_as_it_arrives() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let resp = client()
        .post(gate.url(STREAM_SSE))
        .header("x-goog-api-key", TOKEN)
        .header("x-fake-chunks", "3")
        .header("x-fake-hold", "flush-test")
        .json(&ask("one two three four five six"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    // The upstream holds its last chunk back; the first must arrive anyway.
    let first = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("first event was buffered")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    fake.state.release("flush-test");
    let mut all = first.to_vec();
    while let Some(chunk) = body.next().await {
        all.extend_from_slice(&chunk.unwrap());
    }
    let events = sse_events(&String::from_utf8(all).unwrap());
    assert_eq!(events.len(), 3);
    assert_eq!(
        events.iter().map(answer_text).collect::<String>(),
        "echo: one two three four five six"
    );
    assert_eq!(events[2]["candidates"][0]["finishReason"], "STOP");
}

#[tokio::test]
async fn a_stream_that_fails_before_its_first_byte_is_retried() {
    let fake = fake().await;
    // cut-1 breaks off before sending anything when asked for one chunk.
    let gate = gate().upstream(&fake, &["cut-1", "good-2"]).start().await;
    let (status, text) = stream(&gate, STREAM_SSE, 1, "hello there").await;
    assert_eq!(status, 200);
    let events = sse_events(&text);
    assert_eq!(
        events.iter().map(answer_text).collect::<String>(),
        "echo: hello there"
    );
    assert_eq!(fake.state.key_stats("cut-1").requests, 1);
    assert_eq!(fake.state.key_stats("good-2").requests, 1);
}

#[tokio::test]
async fn a_stream_that_breaks_after_bytes_went_out_ends_with_an_error_event() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["cut-1", "good-2"]).start().await;
    let (status, text) = stream(&gate, STREAM_SSE, 4, "a b c d e f g h").await;
    assert_eq!(status, 200);
    let events = sse_events(&text);
    let (last, data) = events.split_last().unwrap();
    assert_eq!(data.len(), 2, "the two chunks sent before the cut: {text}");
    assert_eq!(last["error"]["code"], 502, "{text}");
    // Never started again on another key: the client never sees text twice.
    assert_eq!(fake.state.key_stats("good-2").requests, 0);
    let text_seen: String = data.iter().map(answer_text).collect();
    assert!("echo: a b c d e f g h".starts_with(&text_seen));
}

#[tokio::test]
async fn a_json_array_stream_that_breaks_is_cut_off_not_restarted() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["cut-1", "good-2"]).start().await;
    let (status, text) = stream(
        &gate,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        4,
        "a b c d",
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        text.starts_with("<broken"),
        "the client must see the break: {text}"
    );
    assert_eq!(fake.state.key_stats("good-2").requests, 0);
}

#[tokio::test]
async fn upstream_connections_are_pooled() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1", "good-2"]).start().await;
    let c = client();
    for i in 0..200 {
        let path = if i % 2 == 0 { GENERATE } else { STREAM_SSE };
        let resp = c
            .post(gate.url(path))
            .header("x-goog-api-key", TOKEN)
            .json(&ask("hi"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    assert_eq!(fake.state.total_requests(), 200);
    let connections = fake.state.connections();
    assert!(
        connections <= 6,
        "200 sequential requests opened {connections} upstream connections"
    );
}

#[tokio::test]
async fn a_pooled_connection_closed_by_the_upstream_is_replaced_quietly() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("MAX_RETRIES", "1")
        .env("MAX_FAILURES", "1")
        .start()
        .await;
    let (status, _, _) = post(&gate, GENERATE, &ask("one")).await;
    assert_eq!(status, 200);
    fake.state.drop_connections();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let (status, _, v) = post(&gate, GENERATE, &ask("two")).await;
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(fake.state.key_stats("good-1").requests, 4);
    let logs = gate.wait_log("attempts=1").await;
    assert!(!logs.contains("attempts=2"));
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_MAX_BODY_BYTES", "65536")
        .start()
        .await;
    let (status, _, v) = post(&gate, GENERATE, &ask(&"x".repeat(70_000))).await;
    assert_eq!(status, 413);
    assert_eq!(v["error"]["code"], 413);
    // Without a content-length too (chunked upload).
    let chunks =
        futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>(vec![b' '; 8192])));
    let resp = client()
        .post(gate.url(GENERATE))
        .header("x-goog-api-key", TOKEN)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(fake.state.total_requests(), 0);
    let (status, _, _) = post(&gate, GENERATE, &ask("small")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn upstream_timeouts_get_504() {
    let fake = fake_with(FakeConfig {
        slow: Duration::from_secs(3),
        ..FakeConfig::default()
    })
    .await;
    let gate = gate()
        .upstream(&fake, &["slow-1"])
        .env("TIME_OUT", "0.5")
        .env("MAX_RETRIES", "1")
        .start()
        .await;
    let started = Instant::now();
    let (status, _, v) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["status"], "DEADLINE_EXCEEDED");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn an_unreachable_upstream_gets_502() {
    let closed = free_addr();
    let gate = gate()
        .env("BASE_URL", &format!("http://{closed}/v1beta"))
        .env("API_KEYS", "good-1,good-2")
        .start()
        .await;
    let (status, _, v) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 502, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot reach"),
        "{v}"
    );
}

/// Starts an SSE request whose last chunk the fake holds back until `release(hold)`; returns
/// once the upstream has it. The task yields the answer's text, or `None` if it broke off.
async fn held_stream(
    gate: &Gate,
    fake: &FakeUpstream,
    hold: &'static str,
    text: &'static str,
) -> tokio::task::JoinHandle<Option<String>> {
    let before = fake.state.total_requests();
    let url = gate.url(STREAM_SSE);
    let task = tokio::spawn(async move {
        let resp = client()
            .post(url)
            .header("x-goog-api-key", TOKEN)
            .header("x-fake-hold", hold)
            .json(&ask(text))
            .send()
            .await
            .ok()?;
        resp.text().await.ok()
    });
    while fake.state.total_requests() == before {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task
}

#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish() {
    let fake = fake().await;
    let mut gate = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_GRACE_PERIOD_SECONDS", "20")
        .start()
        .await;
    let in_flight = held_stream(&gate, &fake, "term-test", "still here").await;
    // A connection kept alive and idle between requests is closed at the signal.
    let mut idle = raw(&gate, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let answer = answered(&mut idle, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.signal("TERM");
    let (closed, got) = closed_within(&mut idle, Duration::from_secs(5)).await;
    assert!(
        closed && got.is_empty(),
        "an idle connection outlived the signal: {got:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        tokio::net::TcpStream::connect(gate.addr).await.is_err(),
        "still accepting after SIGTERM"
    );
    fake.state.release("term-test");
    let text = in_flight
        .await
        .unwrap()
        .expect("the stream in flight was cut");
    assert_eq!(
        sse_events(&text)
            .iter()
            .map(answer_text)
            .collect::<String>(),
        "echo: still here"
    );
    let started = Instant::now();
    assert_eq!(gate.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exit waited for the whole grace period"
    );
}

#[tokio::test]
async fn a_failed_tls_handshake_is_a_clear_502() {
    // An https BASE_URL whose server speaks plain HTTP: the TLS path runs and fails cleanly.
    let fake = fake().await;
    let gate = gate()
        .env("BASE_URL", &format!("https://{}/v1beta", fake.addr))
        .env("API_KEYS", "good-1")
        .start()
        .await;
    let (status, _, v) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["status"], "UNAVAILABLE");
}

#[tokio::test]
async fn sigterm_waits_no_longer_than_the_grace_period() {
    let fake = fake().await;
    let mut gate = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_GRACE_PERIOD_SECONDS", "1")
        .start()
        .await;
    let _stuck = held_stream(&gate, &fake, "never-released", "a b c").await;
    let started = Instant::now();
    gate.signal("TERM");
    assert_eq!(gate.wait_exit(Duration::from_secs(10)).await, Some(0));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "exited after {took:?}"
    );
}

#[tokio::test]
async fn log_level_sets_what_is_logged() {
    let fake = fake().await;
    // The control: at the default level, the call's access line is written.
    let chatty = gate().upstream(&fake, &["good-1"]).start().await;
    assert_eq!(post(&chatty, GENERATE, &ask("hi")).await.0, 200);
    chatty.wait_log("gemgate::access").await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("LOG_LEVEL", "WARNING")
        .start()
        .await;
    let (status, _, _) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!gate.logs().contains("gemgate::access"), "{}", gate.logs());
}

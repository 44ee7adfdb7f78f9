//! The Interactions API and its ownership by Cloud projects, through HTTP on loopback.

use std::net::SocketAddr;

use gemgate_fake_upstream::{FakeConfig, FakeUpstream};
use serde_json::{Value, json};

mod common;
use common::{call, exchange, raw_call};

fn denied() -> Value {
    json!({ "error": {
        "code": 403,
        "message": "Interaction not found (or permission denied)",
        "status": "PERMISSION_DENIED",
    } })
}

async fn create(addr: SocketAddr, key: &str, body: Value) -> (u16, Value) {
    call(
        addr,
        "POST",
        "/v1beta/interactions",
        Some(key),
        &body.to_string(),
    )
    .await
}

/// The events of an SSE body: (`event:` line, data), and whether `[DONE]` ended it.
fn events(body: &str) -> (Vec<(String, Value)>, bool) {
    let mut out = Vec::new();
    let mut done = false;
    for block in body.split("\n\n").filter(|b| !b.is_empty()) {
        if block == "data: [DONE]" {
            done = true;
            continue;
        }
        let (kind, data) = block.split_once('\n').unwrap();
        let kind = kind.strip_prefix("event: ").unwrap().to_owned();
        let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["event_type"], kind.as_str(), "{block}");
        out.push((kind, data));
    }
    (out, done)
}

#[tokio::test]
async fn an_interaction_belongs_to_its_project() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let addr = fake.addr;
    let quota = json!({ "projects": { "p1": { "keys": ["k1", "k2"] }, "p2": { "keys": ["k4"] } } });
    assert_eq!(
        call(addr, "POST", "/_fake/quota", None, &quota.to_string())
            .await
            .0,
        200
    );

    let (status, first) = create(
        addr,
        "k1",
        json!({ "model": "gemini-2.5-flash", "input": "hello there" }),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    let id = first["id"].as_str().unwrap().to_owned();
    let tail = id.strip_prefix("v1_").unwrap();
    assert_eq!(tail.len(), 20);
    assert!(tail.bytes().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(first["status"], "completed");
    assert_eq!(first["model"], "gemini-2.5-flash");
    assert!(first["created"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        first["steps"],
        json!([{ "type": "model_output", "content": [{ "type": "text", "text": "echo: hello there" }] }])
    );
    assert_eq!(
        first["usage"],
        json!({ "total_input_tokens": 2, "total_output_tokens": 3, "total_tokens": 5 })
    );
    assert!(first.get("previous_interaction_id").is_none());
    assert_eq!(fake.state.interaction_owner(&id).as_deref(), Some("k1"));

    // Turns and content blocks: every text is echoed; the project's other key may follow up.
    let (status, second) = create(
        addr,
        "k2",
        json!({
            "agent": "deep-research-pro-preview-12-2025",
            "input": [{ "role": "user", "content": [{ "type": "text", "text": "one" }, { "type": "text", "text": "two" }] }],
            "previous_interaction_id": id,
        }),
    )
    .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["agent"], "deep-research-pro-preview-12-2025");
    assert!(second.get("model").is_none());
    assert_eq!(second["previous_interaction_id"], id.as_str());
    assert_eq!(second["steps"][0]["content"][0]["text"], "echo: one two");

    // Another project's key, or a key in none, is refused, without ErrorInfo.
    let path = format!("/v1beta/interactions/{id}");
    for key in ["k3", "k4"] {
        let (status, body) = raw_call(addr, "GET", &path, Some(key), "").await;
        assert_eq!(status, 403);
        assert!(!body.contains("ErrorInfo"), "{body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), denied());
        let follow =
            json!({ "model": "gemini-2.5-flash", "input": "x", "previous_interaction_id": id });
        assert_eq!(create(addr, key, follow).await, (403, denied()));
        for (method, p) in [("POST", format!("{path}/cancel")), ("DELETE", path.clone())] {
            assert_eq!(call(addr, method, &p, Some(key), "").await, (403, denied()));
        }
    }
    let unknown =
        json!({ "model": "gemini-2.5-flash", "input": "x", "previous_interaction_id": "v1_nope" });
    assert_eq!(create(addr, "k1", unknown).await, (403, denied()));

    // Get, in v1alpha too.
    let (status, got) = call(addr, "GET", &path, Some("k2"), "").await;
    assert_eq!((status, &got), (200, &first));
    let alpha = format!("/v1alpha/interactions/{id}");
    assert_eq!(
        call(addr, "GET", &alpha, Some("k1"), "").await,
        (200, first)
    );

    // In the background: in progress (no outputs yet), finished at the first get.
    let (status, bg) = create(
        addr,
        "k1",
        json!({ "model": "gemini-2.5-flash", "input": "slowly", "background": true }),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(bg["status"], "in_progress");
    assert!(bg.get("steps").is_none());
    let bg_path = format!("/v1beta/interactions/{}", bg["id"].as_str().unwrap());
    let (_, got) = call(addr, "GET", &bg_path, Some("k1"), "").await;
    assert_eq!(got["status"], "completed");
    assert_eq!(got["steps"][0]["content"][0]["text"], "echo: slowly");

    // Cancel, then delete.
    let (status, cancelled) = call(addr, "POST", &format!("{path}/cancel"), Some("k1"), "").await;
    assert_eq!(status, 200);
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["id"], id.as_str());
    assert_eq!(
        call(addr, "DELETE", &path, Some("k2"), "").await,
        (200, json!({}))
    );
    assert_eq!(
        call(addr, "GET", &path, Some("k1"), "").await,
        (403, denied())
    );
    // Its creator is remembered still.
    assert_eq!(fake.state.interaction_owner(&id).as_deref(), Some("k1"));

    // Not stored: answered, then unknown.
    let (_, unstored) = create(
        addr,
        "k1",
        json!({ "model": "gemini-2.5-flash", "input": "x", "store": false }),
    )
    .await;
    let p = format!("/v1beta/interactions/{}", unstored["id"].as_str().unwrap());
    assert_eq!(call(addr, "GET", &p, Some("k1"), "").await, (403, denied()));
    assert!(
        fake.state
            .interaction_owner(unstored["id"].as_str().unwrap())
            .is_none()
    );

    // Reset forgets interactions.
    let second_id = second["id"].as_str().unwrap();
    assert_eq!(
        fake.state.interaction_owner(second_id).as_deref(),
        Some("k2")
    );
    fake.state.reset();
    assert!(fake.state.interaction_owner(second_id).is_none());
    assert!(fake.state.interaction_owner(&id).is_none());
}

#[tokio::test]
async fn bad_creations_are_refused() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let addr = fake.addr;
    for body in [
        "not json",
        "[]",
        r#"{"input":"x"}"#,
        r#"{"model":"gemini-2.5-flash"}"#,
        r#"{"model":"gemini-2.5-flash","agent":"a","input":"x"}"#,
        r#"{"model":7,"input":"x"}"#,
        r#"{"model":"gemini-2.5-flash","input":"x","stream":"yes"}"#,
        r#"{"model":"gemini-2.5-flash","input":"x","previous_interaction_id":""}"#,
    ] {
        let (status, error) = call(addr, "POST", "/v1beta/interactions", Some("k"), body).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["status"], "INVALID_ARGUMENT");
    }
    let (status, _) = create(addr, "k", json!({ "model": "no-such-model", "input": "x" })).await;
    assert_eq!(status, 404);
    // Keys behave as their prefix says.
    let (status, error) = create(
        addr,
        "invalid-1",
        json!({ "model": "gemini-2.5-flash", "input": "x" }),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(error["error"]["details"][0]["reason"], "API_KEY_INVALID");
    let (status, _) = create(
        addr,
        "minute-1",
        json!({ "model": "gemini-2.5-flash", "input": "x" }),
    )
    .await;
    assert_eq!(status, 429);
    let (status, _) = call(addr, "GET", "/v1beta/interactions/v1_x/y", Some("k"), "").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn streams_break_and_resume() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let addr = fake.addr;
    let body = json!({ "model": "gemini-2.5-flash", "input": "stream me along", "stream": true });
    let whole = exchange(
        addr,
        "POST",
        "/v1beta/interactions",
        &[("x-goog-api-key", "k1")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.header("content-type"), Some("text/event-stream"));
    let (evs, done) = events(&whole.body);
    assert!(done);
    let kinds: Vec<&str> = evs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "interaction.created",
            "step.start",
            "step.delta",
            "step.delta",
            "step.delta",
            "step.delta",
            "step.stop",
            "interaction.completed"
        ]
    );
    for (i, (_, e)) in evs.iter().enumerate() {
        assert_eq!(e["event_id"], format!("e{}", i + 1).as_str());
    }
    let id = evs[0].1["interaction"]["id"].as_str().unwrap().to_owned();
    assert_eq!(evs[0].1["interaction"]["status"], "in_progress");
    assert_eq!(
        evs[1].1["step"],
        json!({ "type": "model_output", "content": [] })
    );
    let text: String = evs
        .iter()
        .filter(|(k, _)| k == "step.delta")
        .map(|(_, e)| {
            assert_eq!(e["index"], 0);
            assert_eq!(e["delta"]["type"], "text");
            e["delta"]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, "echo: stream me along");
    assert_eq!(evs[6].1["index"], 0);
    let completed = &evs[7].1["interaction"];
    assert_eq!(completed["id"], id.as_str());
    assert_eq!(completed["status"], "completed");
    assert_eq!(
        completed["steps"][0]["content"][0]["text"],
        "echo: stream me along"
    );

    // `[break]`: the stream stops after its first delta, the connection broken off.
    let body = json!({ "model": "gemini-2.5-flash", "input": "[break] keep going please", "stream": true });
    let broken = exchange(
        addr,
        "POST",
        "/v1beta/interactions",
        &[("x-goog-api-key", "k1")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(broken.status, 200);
    assert!(!broken.complete, "{}", broken.body);
    let (evs, done) = events(&broken.body);
    assert!(!done);
    let kinds: Vec<&str> = evs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["interaction.created", "step.start", "step.delta"]);
    let id = evs[0].1["interaction"]["id"].as_str().unwrap().to_owned();

    // It is stored whole: its events again after e3, then `[DONE]`.
    let path = format!("/v1beta/interactions/{id}?stream=true&last_event_id=e3");
    let rest = exchange(addr, "GET", &path, &[("x-goog-api-key", "k1")], b"").await;
    assert_eq!(rest.status, 200);
    let (evs, done) = events(&rest.body);
    assert!(done);
    assert_eq!(evs[0].1["event_id"], "e4");
    assert_eq!(evs.last().unwrap().0, "interaction.completed");
    let text: String = evs
        .iter()
        .filter_map(|(_, e)| e["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "[break] keep going please");
    // All of them without last_event_id; the whole interaction without stream.
    let path = format!("/v1beta/interactions/{id}?stream=true");
    let all = exchange(addr, "GET", &path, &[("x-goog-api-key", "k1")], b"").await;
    assert_eq!(events(&all.body).0.len(), 9);
    let (status, got) = call(
        addr,
        "GET",
        &format!("/v1beta/interactions/{id}"),
        Some("k1"),
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        got["steps"][0]["content"][0]["text"],
        "echo: [break] keep going please"
    );
    // Another key's resumption is refused.
    let path = format!("/v1beta/interactions/{id}?stream=true&last_event_id=e3");
    let (status, _) = call(addr, "GET", &path, Some("k2"), "").await;
    assert_eq!(status, 403);
    let path = format!("/v1beta/interactions/{id}?stream=true&last_event_id=bogus");
    let (status, _) = call(addr, "GET", &path, Some("k1"), "").await;
    assert_eq!(status, 400);
}

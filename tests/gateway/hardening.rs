//! What a hostile client can do with nothing but a client token: each test tries one attack.

use std::time::{Duration, Instant};

use crate::common::*;

/// The state of every key, by key id, from the admin API.
async fn key_states(gate: &Gate) -> Vec<(String, String)> {
    let (status, v) = admin(reqwest::Method::GET, gate, "/admin/api/keys", None).await;
    assert_eq!(status, 200, "{v}");
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_str().unwrap().to_owned(),
                k["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A JSON schema whose `$defs` entry names itself from eight properties: inlined without a
/// bound it is more nodes than memory holds.
fn schema_bomb() -> Value {
    let props: serde_json::Map<String, Value> = (0..8)
        .map(|i| (format!("p{i}"), json!({ "$ref": "#/$defs/Node" })))
        .collect();
    json!({
        "type": "object",
        "properties": { "root": { "$ref": "#/$defs/Node" } },
        "$defs": { "Node": { "type": "object", "properties": props } }
    })
}

#[tokio::test]
async fn a_self_referring_schema_is_refused_at_once() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let bomb = schema_bomb();
    assert!(
        bomb.to_string().len() < 1024,
        "the attack is one small request"
    );
    let chat = |format: Value, tools: Value| {
        json!({
            "model": "gemini-2.5-flash",
            "messages": [{ "role": "user", "content": "hi" }],
            "response_format": format,
            "tools": tools,
        })
    };
    let in_format = chat(
        json!({ "type": "json_schema", "json_schema": { "name": "x", "schema": bomb } }),
        json!([]),
    );
    let in_tool = chat(
        Value::Null,
        json!([{ "type": "function", "function": { "name": "f", "parameters": bomb } }]),
    );
    for (body, param) in [
        (in_format, "response_format.json_schema.schema"),
        (in_tool, "tools[0].function.parameters"),
    ] {
        let started = Instant::now();
        let resp = client()
            .post(gate.url("/v1/chat/completions"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answered at once"
        );
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("itself"),
            "{v}"
        );
    }
    assert_eq!(fake.state.total_requests(), 0, "nothing went upstream");
    // The gateway is still there, and serves.
    let (status, ..) = post(&gate, GENERATE, &ask("still here")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_schema_that_expands_past_its_budget_is_refused() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    // No cycle: each level names the next eight times, 8^7 nodes once inlined.
    let mut defs = serde_json::Map::new();
    for level in 0..7 {
        let props: serde_json::Map<String, Value> = (0..8)
            .map(|i| {
                let next = json!({ "$ref": format!("#/$defs/L{}", level + 1) });
                (format!("p{i}"), next)
            })
            .collect();
        defs.insert(format!("L{level}"), json!({ "properties": props }));
    }
    defs.insert("L7".into(), json!({ "type": "string" }));
    let body = json!({
        "model": "gemini-2.5-flash",
        "messages": [{ "role": "user", "content": "hi" }],
        "response_format": { "type": "json_schema", "json_schema": { "name": "x",
            "schema": { "$ref": "#/$defs/L0", "$defs": defs } } },
    });
    let resp = client()
        .post(gate.url("/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("nodes"),
        "{v}"
    );
}

#[tokio::test]
async fn a_403_for_a_file_the_key_cannot_see_is_the_clients_error() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "good-2", "good-3"])
        .env("MAX_FAILURES", "1")
        .admin()
        .start()
        .await;
    let body = json!({ "contents": [{ "role": "user", "parts": [
        { "text": "what is in it?" },
        { "fileData": { "mimeType": "text/plain",
            "fileUri": "https://generativelanguage.googleapis.com/v1beta/files/nobodys" } }
    ] }] });
    for _ in 0..3 {
        let (status, _, v) = post(&gate, GENERATE, &body).await;
        assert_eq!(status, 403, "Google's answer, passed through: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("permission"),
            "{v}"
        );
    }
    assert_eq!(
        fake.state.total_requests(),
        3,
        "never retried on another key"
    );
    assert!(
        key_states(&gate).await.iter().all(|(_, s)| s == "active"),
        "no key was blamed"
    );
    let (status, ..) = post(&gate, GENERATE, &ask("others are served")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_key_blaming_403_disables_a_key_only_when_a_probe_confirms_it() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "suspended-2"])
        .env("MAX_FAILURES", "1")
        .admin()
        .start()
        .await;
    // A request that provokes a key-blaming 403 on every key it is sent with.
    let resp = client()
        .post(gate.url(GENERATE))
        .header("x-goog-api-key", TOKEN)
        .header("x-fake-error", "403 SERVICE_DISABLED")
        .json(&ask("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // Each key is probed with a neutral call: the good one answers and stays, the suspended
    // one is refused again and goes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let states = key_states(&gate).await;
        let disabled: Vec<&str> = states
            .iter()
            .filter(|(_, s)| s == "disabled")
            .map(|(id, _)| id.as_str())
            .collect();
        if disabled.len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no probe decided: {states:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, v) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    let suspended = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == "disabled")
        .unwrap();
    assert!(
        suspended["disabled_reason"]
            .as_str()
            .unwrap()
            .contains("confirmed by a probe"),
        "{suspended}"
    );
    assert!(!v.to_string().contains("suspended-2"), "no secret: {v}");
    let (status, ..) = post(&gate, GENERATE, &ask("the good key serves")).await;
    assert_eq!(status, 200);
}

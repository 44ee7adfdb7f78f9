//! Every client speaks to it: Gemini 3 through the OpenAI API (thought signatures, thinking
//! levels) and model aliases for every protocol.

use serde_json::{Value, json};

use crate::common::*;

/// Gemini 3 tool calls with the `openai` SDK through three turns and a stream: the fake, like
/// Google, refuses a model turn whose call lost its signature, so every turn passing means the
/// signatures went back; a client that dropped them gets Google's placeholder, and the log
/// says so.
#[tokio::test]
async fn gemini_3_tool_calls_keep_their_signatures_with_the_openai_sdk() {
    let Some((fake, gate, report)) = run_sdk("openai_gemini3.py").await else {
        return;
    };
    assert!(
        report.contains("ok   dropped signature still works"),
        "{report}"
    );
    gate.wait_log("sent Google's placeholder").await;
    // reasoning_effort went as a level, never with a budget.
    let thinking: Vec<Value> = fake
        .state
        .received()
        .into_iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .filter_map(|b| b.pointer("/generationConfig/thinkingConfig").cloned())
        .collect();
    assert!(!thinking.is_empty());
    assert!(
        thinking
            .iter()
            .all(|t| t["thinkingLevel"] == "low" && t.get("thinkingBudget").is_none()),
        "{thinking:?}"
    );
}

/// `[models] aliases` (here `MODEL_ALIASES`): an exact alias and a pattern reach Google as their
/// models, over the native and the OpenAI APIs; model lists show the exact ones; the logs keep
/// the name the client asked for.
#[tokio::test]
async fn model_aliases_work_for_every_protocol() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env(
            "MODEL_ALIASES",
            r#"{"gpt-4o": "gemini-2.5-flash", "claude-*": "gemini-2.5-pro", "claude-haiku-*": "gemini-2.5-flash-lite"}"#,
        )
        .admin()
        .start()
        .await;
    let chat = |model: &'static str| {
        client()
            .post(gate.url("/v1/chat/completions"))
            .bearer_auth(TOKEN)
            .json(&json!({ "model": model, "messages": [{ "role": "user", "content": "hi" }] }))
            .send()
    };
    for (asked, sent) in [
        ("gpt-4o", "gemini-2.5-flash"),
        ("claude-sonnet-4-5", "gemini-2.5-pro"),
        ("claude-haiku-4-5", "gemini-2.5-flash-lite"),
    ] {
        let resp = chat(asked).await.unwrap();
        assert_eq!(resp.status(), 200, "{asked}");
        let path = fake.state.last_received().unwrap().path;
        assert!(
            path.contains(&format!("/models/{sent}:")),
            "{asked}: {path}"
        );
        gate.wait_log(&format!("model={sent} asked_model={asked} "))
            .await;
    }
    let resp = client()
        .post(gate.url("/v1beta/models/gpt-4o:generateContent"))
        .header("x-goog-api-key", TOKEN)
        .json(&ask("native"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        fake.state
            .last_received()
            .unwrap()
            .path
            .contains("/models/gemini-2.5-flash:")
    );
    let models: Value = client()
        .get(gate.url("/v1/models"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"gpt-4o") && ids.contains(&"gemini-2.5-flash"),
        "{ids:?}"
    );
    // The request log keeps both names.
    wait_logged(&gate, 5).await;
    let (_, logs) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/logs/requests?limit=10",
        None,
    )
    .await;
    assert!(
        logs.to_string().contains(r#""asked_model":"gpt-4o""#),
        "{logs}"
    );
}

/// Anthropic's Messages API with the `anthropic` SDK: plain, streamed, tools through two turns
/// (on Gemini 3 too, whose signatures the SDK's own content blocks carry back), count_tokens,
/// and a wrong token answered in Anthropic's shape.
#[tokio::test]
async fn the_anthropic_python_sdk_works_end_to_end() {
    let Some((fake, gate, report)) = run_sdk("anthropic_client.py").await else {
        return;
    };
    assert!(report.contains("ok   wrong token"), "{report}");
    // The token came as `x-api-key`, and none went on to Google.
    for r in fake.state.received() {
        assert!(
            !r.headers.iter().any(|(k, _)| k == "x-api-key"),
            "{:?}",
            r.headers
        );
    }
    assert!(
        !gate.logs().contains("sent Google's placeholder"),
        "the signatures came back"
    );
}

/// Anthropic clients get Anthropic's errors: a bad request names what is wrong, in
/// `{"type":"error","error":{"type":…}}`.
#[tokio::test]
async fn anthropic_errors_have_anthropic_shape() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    for (body, status, kind) in [
        (
            json!({ "model": "gemini-2.5-flash", "messages": [{ "role": "user", "content": "x" }] }),
            400,
            "invalid_request_error",
        ),
        (
            json!({ "model": "gemini-2.5-flash", "max_tokens": 5, "messages": [] }),
            400,
            "invalid_request_error",
        ),
        (
            json!({ "model": "no-such-model", "max_tokens": 5, "messages": [{ "role": "user", "content": "x" }] }),
            404,
            "not_found_error",
        ),
    ] {
        let resp = client()
            .post(gate.url("/v1/messages"))
            .header("x-api-key", TOKEN)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
    }
}

/// OpenAI's Responses API with the `openai` SDK: plain, streamed, tools, a conversation
/// continued with `previous_response_id` (its history reaching Google), retrieve, delete, and
/// another client's id answered 404.
#[tokio::test]
async fn the_responses_api_works_with_the_openai_sdk() {
    let Some(python) = needed_env("GEMGATE_SDK_PYTHON") else {
        return;
    };
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "good-2"])
        .env(
            "ALLOWED_TOKENS",
            &format!(r#"["{TOKEN}", "sk-other-client"]"#),
        )
        .start()
        .await;
    let url = gate.url("");
    let env = [
        ("GEMGATE_URL", url.as_str()),
        ("GEMGATE_TOKEN", TOKEN),
        ("GEMGATE_OTHER_TOKEN", "sk-other-client"),
    ];
    let report = run_python(&python, "sdk/openai_responses.py", &env, &gate).await;
    assert!(report.contains("ok   deleted"), "{report}");
    // The last turn of the conversation reached Google with everything before it.
    let turn = fake
        .state
        .received()
        .into_iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .find(|b| b.to_string().contains("turn 2"))
        .unwrap();
    let history = turn["contents"].to_string();
    for earlier in [
        "weather in Paris",
        "sunny",
        "turn 0",
        "turn 1",
        "echo: turn 1",
    ] {
        assert!(history.contains(earlier), "{earlier}: {history}");
    }
}

/// A kept response's id is gemgate's own, not the request id a client may choose: two clients
/// sending the same `X-Request-Id` keep two responses, each its own; a conversation larger
/// than a request may be is refused.
#[tokio::test]
async fn kept_responses_cannot_be_taken_over() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env(
            "ALLOWED_TOKENS",
            &format!(r#"["{TOKEN}", "sk-other-client"]"#),
        )
        .env("GEMGATE_MAX_BODY_BYTES", "4000")
        .start()
        .await;
    let create = |token: &'static str, body: Value| {
        client()
            .post(gate.url("/v1/responses"))
            .bearer_auth(token)
            .header("x-request-id", "chosen-by-the-client")
            .json(&body)
            .send()
    };
    let mut ids = Vec::new();
    for token in [TOKEN, "sk-other-client"] {
        let v: Value = create(
            token,
            json!({ "model": "gemini-2.5-flash", "input": token }),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    assert_ne!(ids[0], ids[1]);
    assert!(!ids[0].contains("chosen-by-the-client"), "{ids:?}");
    let mine: Value = client()
        .get(gate.url(&format!("/v1/responses/{}", ids[0])))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        mine["output"][0]["content"][0]["text"],
        format!("echo: {TOKEN}")
    );
    // Each turn is small; together they outgrow what one request may carry.
    let mut previous = ids[0].clone();
    let mut last = 200;
    for n in 0..40 {
        let text = format!("turn {n} {}", "x".repeat(200));
        let resp = create(
            TOKEN,
            json!({ "model": "gemini-2.5-flash", "input": text, "previous_response_id": previous }),
        )
        .await
        .unwrap();
        last = resp.status().as_u16();
        if last != 200 {
            break;
        }
        let v: Value = resp.json().await.unwrap();
        previous = v["id"].as_str().unwrap().to_owned();
    }
    assert_eq!(last, 413, "the conversation kept growing");
}

/// Keys of kind `vertex_express` are called at `VERTEX_BASE_URL/publishers/google/models/…` for
/// generation, token counts and embeddings, native and translated; the calls they cannot serve
/// (model lists, files, cached contents, interactions, Google's OpenAI API) never get one.
#[tokio::test]
async fn vertex_express_keys_serve_generation_alone() {
    let fake = fake().await;
    let vertex_base = fake.base_url().replace("/v1beta", "/v1");
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .env("VERTEX_BASE_URL", &vertex_base)
        .toml(
            "[keys]\napi_keys = [\"gemini-1\", { key = \"vertex-2\", kind = \"vertex_express\" }]\n",
        )
        .start()
        .await;
    let native = |action: &'static str, body: Value| {
        client()
            .post(gate.url(&format!("/v1beta/models/gemini-2.5-flash:{action}")))
            .header("x-goog-api-key", TOKEN)
            .json(&body)
            .send()
    };
    for _ in 0..3 {
        for (action, body) in [
            ("generateContent", ask("hi")),
            ("countTokens", ask("count me")),
            (
                "embedContent",
                json!({ "content": { "parts": [{ "text": "embed" }] } }),
            ),
        ] {
            assert_eq!(
                native(action, body).await.unwrap().status(),
                200,
                "{action}"
            );
        }
        let chat = client()
            .post(gate.url("/v1/chat/completions"))
            .bearer_auth(TOKEN)
            .json(&json!({ "model": "gemini-2.5-flash", "messages": [{ "role": "user", "content": "hi" }] }))
            .send()
            .await
            .unwrap();
        assert_eq!(chat.status(), 200);
    }
    let by_vertex: Vec<String> = fake
        .state
        .received()
        .into_iter()
        .filter(|r| r.key.as_deref() == Some("vertex-2"))
        .map(|r| r.path)
        .collect();
    assert!(by_vertex.len() >= 4, "{by_vertex:?}");
    assert!(
        by_vertex
            .iter()
            .all(|p| p.starts_with("/v1/publishers/google/models/gemini-2.5-flash:")),
        "{by_vertex:?}"
    );
    // The calls a Vertex AI key cannot serve go to the Gemini API key, every time.
    let before = fake.state.received().len();
    for _ in 0..4 {
        for (method, path, body) in [
            (reqwest::Method::GET, "/v1beta/models", None),
            (reqwest::Method::GET, "/v1beta/files", None),
            (
                reqwest::Method::POST,
                "/v1beta/interactions",
                Some(json!({ "model": "gemini-2.5-flash", "input": "hi" })),
            ),
        ] {
            let mut req = client()
                .request(method, gate.url(path))
                .header("x-goog-api-key", TOKEN);
            if let Some(b) = body {
                req = req.json(&b);
            }
            assert!(req.send().await.unwrap().status().is_success(), "{path}");
        }
    }
    let others = &fake.state.received()[before..];
    assert!(!others.is_empty());
    assert!(
        others.iter().all(|r| r.key.as_deref() == Some("gemini-1")),
        "{:?}",
        others.iter().map(|r| (&r.path, &r.key)).collect::<Vec<_>>()
    );
}

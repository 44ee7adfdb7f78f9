//! Native calls, auth, model filtering, request ids and logs.

use crate::common::*;
use serde_json::{Value, json};

fn model_names(list: &Value) -> Vec<String> {
    list["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect()
}

/// A model the model_suffixes plugin derives (`-search`, `-image`, `-non-thinking`).
fn is_derived(name: &str) -> bool {
    ["-search", "-image", "-non-thinking"]
        .iter()
        .any(|s| name.ends_with(s))
}

#[tokio::test]
async fn every_native_call_on_both_prefixes() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    for prefix in ["/v1beta", "/gemini/v1beta"] {
        let (status, models) = get(&gate, &format!("{prefix}/models")).await;
        assert_eq!(status, 200);
        let names = model_names(&models);
        assert_eq!(
            names.iter().filter(|n| !is_derived(n)).count(),
            15,
            "all pages of the fake (5 per page)"
        );
        // The model_suffixes plugin lists the derived models of SEARCH_MODELS.
        assert!(names.contains(&"models/gemini-2.5-flash-search".to_owned()));
        assert!(models.get("nextPageToken").is_none());

        let (status, model) = get(&gate, &format!("{prefix}/models/gemini-2.5-pro")).await;
        assert_eq!(
            (status, model["name"].as_str()),
            (200, Some("models/gemini-2.5-pro"))
        );

        let (status, _, v) = post(
            &gate,
            &format!("{prefix}/models/gemini-2.5-flash:generateContent"),
            &ask("one two"),
        )
        .await;
        assert_eq!((status, answer_text(&v)), (200, "echo: one two".to_owned()));

        let (status, _, v) = post(
            &gate,
            &format!("{prefix}/models/gemini-2.5-flash:countTokens"),
            &ask("one two three"),
        )
        .await;
        assert_eq!((status, v["totalTokens"].as_u64()), (200, Some(3)));

        let embed = json!({ "content": { "parts": [{ "text": "x" }] }, "outputDimensionality": 4 });
        let (status, _, v) = post(
            &gate,
            &format!("{prefix}/models/text-embedding-004:embedContent"),
            &embed,
        )
        .await;
        assert_eq!(
            (status, v["embedding"]["values"].as_array().map(Vec::len)),
            (200, Some(4))
        );

        let batch = json!({ "requests": [
            { "model": "models/text-embedding-004", "content": { "parts": [{ "text": "a" }] } },
            { "model": "models/text-embedding-004", "content": { "parts": [{ "text": "b" }] } }
        ]});
        let (status, _, v) = post(
            &gate,
            &format!("{prefix}/models/text-embedding-004:batchEmbedContents"),
            &batch,
        )
        .await;
        assert_eq!(
            (status, v["embeddings"].as_array().map(Vec::len)),
            (200, Some(2))
        );

        let predict = json!({ "instances": [{ "prompt": "a cat" }], "parameters": { "sampleCount": 2, "aspectRatio": "1:1" } });
        let (status, _, v) = post(
            &gate,
            &format!("{prefix}/models/imagen-3.0-generate-002:predict"),
            &predict,
        )
        .await;
        assert_eq!(
            (status, v["predictions"].as_array().map(Vec::len)),
            (200, Some(2))
        );

        for alt in ["?alt=sse", ""] {
            let resp = client()
                .post(gate.url(&format!(
                    "{prefix}/models/gemini-2.5-flash:streamGenerateContent{alt}"
                )))
                .header("x-goog-api-key", TOKEN)
                .json(&ask("a b c d"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let text = resp.text().await.unwrap();
            let events: Vec<Value> = if alt.is_empty() {
                serde_json::from_str(&text).unwrap()
            } else {
                text.split("\r\n\r\n")
                    .filter(|e| !e.is_empty())
                    .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
                    .collect()
            };
            assert_eq!(events.len(), 3);
            assert_eq!(
                events.iter().map(answer_text).collect::<String>(),
                "echo: a b c d"
            );
        }
    }
}

#[tokio::test]
async fn bodies_and_answers_pass_through_untouched() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    // A cache the key made at Google directly (gemgate has no record of it).
    let cache: Value = client()
        .post(format!("{}/cachedContents?key=good-1", fake.base_url()))
        .json(&json!({ "model": "models/gemini-2.5-flash" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cache = cache["name"].as_str().unwrap();
    // Odd spacing, unknown fields, and the client's own settings all reach Google as sent.
    let body = format!(
        "{{ \"contents\":[{{\"role\":\"user\",\"parts\":[{{\"text\":\"hi\"}}]}}],\n  \"cachedContent\":\"{cache}\", \"toolConfig\":{{\"functionCallingConfig\":{{\"mode\":\"ANY\"}}}},\"safetySettings\":[{{\"category\":\"HARM_CATEGORY_HARASSMENT\",\"threshold\":\"OFF\"}}],\"futureField\":[1,2,3] }}"
    );
    let resp = client()
        .post(gate.url(&format!("{GENERATE}?key={TOKEN}")))
        .header("content-type", "application/json")
        .header("x-custom-client-header", "kept")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = fake.state.last_received().unwrap();
    assert_eq!(&got.body[..], body.as_bytes());
    assert_eq!(got.key.as_deref(), Some("good-1"));
    assert!(
        !got.query.contains("key="),
        "client credential leaked in query: {}",
        got.query
    );
    let header = |n: &str| {
        got.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("x-goog-api-key").as_deref(), Some("good-1"));
    assert_eq!(header("authorization"), None);
    assert_eq!(header("x-custom-client-header").as_deref(), Some("kept"));
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["modelVersion"], "gemini-2.5-flash");
    assert_eq!(answer["usageMetadata"]["promptTokenCount"], 1);
}

#[tokio::test]
async fn client_tokens_in_all_three_places() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let c = client();
    let ok = [
        c.post(gate.url(&format!("{GENERATE}?key={TOKEN}"))),
        c.post(gate.url(GENERATE)).header("x-goog-api-key", TOKEN),
        c.post(gate.url(GENERATE)).bearer_auth(TOKEN),
    ];
    for req in ok {
        assert_eq!(req.json(&ask("hi")).send().await.unwrap().status(), 200);
    }
    for req in [
        c.post(gate.url(GENERATE)),
        c.post(gate.url(GENERATE)).bearer_auth("sk-wrong"),
        c.post(gate.url(&format!("{GENERATE}?key=good-1"))),
    ] {
        let resp = req.json(&ask("hi")).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], 401);
        assert_eq!(v["error"]["status"], "UNAUTHENTICATED");
    }
    // Every upstream request carried a pool key, never the client's token.
    for r in fake.state.received() {
        assert_eq!(r.key.as_deref(), Some("good-1"));
        assert!(r.headers.iter().all(|(_, v)| !v.contains(TOKEN)));
    }
    assert_eq!(fake.state.received().len(), 3);
}

#[tokio::test]
async fn filtered_models_are_hidden_and_refused() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("FILTERED_MODELS", r#"["gemini-1.5-pro","gemini-2.5-pro"]"#)
        .start()
        .await;
    let (_, models) = get(&gate, "/v1beta/models").await;
    let names = model_names(&models);
    assert_eq!(names.iter().filter(|n| !is_derived(n)).count(), 13);
    for gone in [
        "models/gemini-2.5-pro",
        "models/gemini-1.5-pro",
        "models/gemini-2.5-pro-search",
    ] {
        assert!(!names.contains(&gone.to_owned()), "{gone} in {names:?}");
    }
    let before = fake.state.total_requests();
    let (status, _, v) = post(
        &gate,
        "/v1beta/models/gemini-2.5-pro:generateContent",
        &ask("hi"),
    )
    .await;
    assert_eq!(status, 404);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gemini-2.5-pro")
    );
    let (status, _) = get(&gate, "/v1beta/models/gemini-1.5-pro").await;
    assert_eq!(status, 404);
    assert_eq!(
        fake.state.total_requests(),
        before,
        "refused before reaching Google"
    );
}

#[tokio::test]
async fn request_ids_and_one_log_line_per_request() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-secret-key-1234567890"])
        .env("ALLOWED_TOKENS", r#"[{"name":"alice","token":"sk-alice"}]"#)
        .start()
        .await;
    let resp = client()
        .post(gate.url(GENERATE))
        .bearer_auth("sk-alice")
        .header("x-request-id", "req-abc-123")
        .json(&ask("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-abc-123");
    let resp = client()
        .post(gate.url(GENERATE))
        .bearer_auth("sk-alice")
        .json(&ask("hi"))
        .send()
        .await
        .unwrap();
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(generated.len() >= 16);
    let logs = gate.wait_log(&generated).await;
    let line = logs.lines().find(|l| l.contains("req-abc-123")).unwrap();
    for part in [
        "client=alice",
        "model=gemini-2.5-flash",
        "status=200",
        "attempts=1",
        "latency_ms=",
        "key=k",
    ] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
    assert!(
        !logs.contains("good-secret-key-1234567890"),
        "a key secret reached the log"
    );
    assert!(!logs.contains("sk-alice"), "a client token reached the log");
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let (status, v) = get(&gate, "/v1beta/tunedModels").await;
    assert_eq!((status, v["error"]["code"].as_u64()), (404, Some(404)));
    let (status, v) = get(&gate, GENERATE).await;
    assert_eq!((status, v["error"]["code"].as_u64()), (405, Some(405)));
}

#[tokio::test]
async fn browser_clients_get_cors() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let c = client();
    let pre = c
        .request(reqwest::Method::OPTIONS, gate.url(GENERATE))
        .header("origin", "https://chat.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "x-goog-api-key, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 204);
    assert_eq!(pre.headers()["access-control-allow-origin"], "*");
    assert_eq!(
        pre.headers()["access-control-allow-headers"],
        "x-goog-api-key, content-type"
    );
    let resp = c
        .post(gate.url(GENERATE))
        .header("origin", "https://chat.example")
        .header("x-goog-api-key", TOKEN)
        .json(&ask("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    assert_eq!(
        fake.state.total_requests(),
        1,
        "the preflight never reaches Google"
    );
}

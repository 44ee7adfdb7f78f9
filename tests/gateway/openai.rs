//! The OpenAI-compatible API: `/v1` and `/hf/v1` translated, `/openai/v1` passed through.

use crate::common::*;

const CHAT: &str = "/v1/chat/completions";

async fn chat(gate: &Gate, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = client()
        .post(gate.url(CHAT))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap())
}

/// The `data:` events of an SSE body, `[DONE]` kept as a string.
fn events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or(Value::String(d.to_owned())))
        .collect()
}

fn last_body(fake: &FakeUpstream) -> Value {
    serde_json::from_slice(&fake.state.last_received().unwrap().body).unwrap()
}

#[tokio::test]
async fn chat_completions_translate_both_ways() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let (status, _, v) = chat(
        &gate,
        &json!({
            "model": "gemini-2.5-flash",
            "messages": [
                { "role": "system", "content": "be brief" },
                { "role": "user", "content": "hello there" }
            ]
        }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello there");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["total_tokens"], 5);
    let seen = fake.state.last_received().unwrap();
    assert_eq!(seen.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(seen.key.as_deref(), Some("good-1"));
    // Exactly what the client said, nothing more.
    assert_eq!(
        last_body(&fake),
        json!({
            "contents": [{ "role": "user", "parts": [{ "text": "hello there" }] }],
            "systemInstruction": { "parts": [{ "text": "be brief" }] }
        })
    );

    // /hf/v1 is the same API.
    let resp = client()
        .post(gate.url("/hf/v1/chat/completions"))
        .header("x-goog-api-key", TOKEN)
        .json(&json!({ "model": "gemini-2.5-pro", "messages": [{ "role": "user", "content": "x" }], "max_tokens": 9, "stop": ["a", "b"], "response_format": { "type": "json_object" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        last_body(&fake)["generationConfig"],
        json!({ "maxOutputTokens": 9, "stopSequences": ["a", "b"], "responseMimeType": "application/json" })
    );
}

#[tokio::test]
async fn streams_arrive_as_chat_chunks() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let resp = client()
        .post(gate.url(CHAT))
        .bearer_auth(TOKEN)
        .json(&json!({
            "model": "gemini-2.5-flash",
            "stream": true,
            "stream_options": { "include_usage": true },
            "messages": [{ "role": "user", "content": "one two three four" }]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let events = events(&text);
    assert_eq!(events.last(), Some(&json!("[DONE]")), "{text}");
    let chunks = &events[..events.len() - 1];
    let ids: Vec<&Value> = chunks.iter().map(|c| &c["id"]).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "one id: {text}");
    let roles = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"].get("role").is_some())
        .count();
    assert_eq!(roles, 1, "role only in the first delta: {text}");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "echo: one two three four");
    let finishes: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("stop")]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn tool_calls_round_trip_with_their_signature() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let tools = json!([{ "type": "function", "function": {
        "name": "lookup", "description": "look it up",
        "parameters": { "type": "object", "additionalProperties": false,
                        "properties": { "query": { "type": "string" } }, "required": ["query"] } } }]);
    let (status, _, v) = chat(
        &gate,
        &json!({ "model": "gemini-2.5-flash", "tools": tools, "tool_choice": "auto",
                 "messages": [{ "role": "user", "content": "weather in Paris" }] }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "lookup");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({ "query": "weather in Paris" }));
    let sent = last_body(&fake);
    assert_eq!(
        sent["tools"][0]["functionDeclarations"][0]["parameters"],
        json!({ "type": "object", "properties": { "query": { "type": "string" } }, "required": ["query"] }),
        "the schema is cleaned of what Gemini rejects"
    );
    assert_eq!(sent["toolConfig"]["functionCallingConfig"]["mode"], "AUTO");

    let (status, _, v) = chat(
        &gate,
        &json!({ "model": "gemini-2.5-flash", "tools": tools,
                 "messages": [
                    { "role": "user", "content": "weather in Paris" },
                    { "role": "assistant", "content": null, "tool_calls": [call] },
                    { "role": "tool", "tool_call_id": call["id"], "content": "{\"sky\":\"clear\"}" }
                 ] }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "echo: lookup returned {\"sky\":\"clear\"}"
    );
    let sent = last_body(&fake);
    assert_eq!(
        sent["contents"][1]["parts"][0]["thoughtSignature"],
        "ZmFrZS1zaWduYXR1cmU="
    );
    assert_eq!(
        sent["contents"][2]["parts"][0]["functionResponse"],
        json!({ "name": "lookup", "response": { "sky": "clear" } })
    );

    // Streamed, the call arrives as one indexed tool-call delta.
    let resp = client()
        .post(gate.url(CHAT))
        .bearer_auth(TOKEN)
        .json(
            &json!({ "model": "gemini-2.5-flash", "tools": tools, "stream": true,
                        "messages": [{ "role": "user", "content": "x" }] }),
        )
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    let events = events(&text);
    let delta = &events[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(delta["index"], 0, "{text}");
    assert_eq!(delta["function"]["name"], "lookup");
    assert_eq!(events[0]["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn vision_embeddings_and_models() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("FILTERED_MODELS", "gemini-2.5-pro")
        .start()
        .await;
    let (status, _, v) = chat(
        &gate,
        &json!({ "model": "gemini-2.5-flash", "messages": [{ "role": "user", "content": [
            { "type": "text", "text": "what is it" },
            { "type": "image_url", "image_url": { "url": "data:image/png;base64,iVBORw0KGgo=" } }
        ] }] }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        last_body(&fake)["contents"][0]["parts"][1],
        json!({ "inlineData": { "mimeType": "image/png", "data": "iVBORw0KGgo=" } })
    );

    let resp = client()
        .post(gate.url("/v1/embeddings"))
        .bearer_auth(TOKEN)
        .json(&json!({ "model": "text-embedding-004", "input": ["a", "b"], "dimensions": 4 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["embedding"].as_array().unwrap().len(), 4);
    assert_eq!(
        fake.state.last_received().unwrap().path,
        "/v1beta/models/text-embedding-004:batchEmbedContents"
    );

    let resp = client()
        .get(gate.url("/v1/models"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"gemini-2.5-flash") && ids.contains(&"gemini-2.5-flash-search"));
    assert!(!ids.contains(&"gemini-2.5-pro"), "{ids:?}");
}

#[tokio::test]
async fn errors_come_in_openai_shape() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let resp = client()
        .post(gate.url(CHAT))
        .bearer_auth("wrong")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");

    let (status, _, v) = chat(
        &gate,
        &json!({ "model": "gemini-2.5-flash", "messages": [], "stream": true }),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["param"], "messages");

    let (status, _, v) = chat(
        &gate,
        &json!({ "model": "no-such-model", "messages": [{ "role": "user", "content": "x" }] }),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-model")
    );
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    // A 404 about anything but a model has no code: a missing path, a missing kept response.
    for path in ["/v1/no-such-thing", "/v1/responses/resp_0123456789ab"] {
        let resp = client()
            .get(gate.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{path}: {v}");
        assert_eq!(v["error"]["code"], Value::Null, "{path}: {v}");
    }
    // A model the operator filters out is a model not found, as Google's own 404 is.
    let filtering = crate::common::gate()
        .upstream(&fake, &["good-1"])
        .env("FILTERED_MODELS", "gemini-2.5-pro")
        .start()
        .await;
    let (status, _, v) = chat(
        &filtering,
        &json!({ "model": "gemini-2.5-pro", "messages": [{ "role": "user", "content": "x" }] }),
    )
    .await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (404, &json!("model_not_found")),
        "{v}"
    );

    // minute-1 answers 429 and cools: then every key is cooling.
    let gate = crate::common::gate()
        .upstream(&fake, &["minute-1"])
        .start()
        .await;
    let body =
        json!({ "model": "gemini-2.5-flash", "messages": [{ "role": "user", "content": "x" }] });
    let (status, headers, v) = chat(&gate, &body).await;
    assert_eq!(status, 429, "{v}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(v["error"]["type"], "rate_limit_exceeded");
    let (status, headers, v) = chat(&gate, &body).await;
    assert_eq!(status, 429, "every key cooling: {v}");
    assert!(headers.contains_key("retry-after"));
    assert!(v["error"]["message"].as_str().unwrap().contains("cooling"));
}

#[tokio::test]
async fn googles_openai_api_is_passed_through_with_a_pool_key() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let resp = client()
        .post(gate.url("/openai/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(&json!({ "model": "gemini-2.5-flash", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hi");
    let seen = fake.state.last_received().unwrap();
    assert_eq!(seen.path, "/v1beta/openai/chat/completions");
    let auth: Vec<&String> = seen
        .headers
        .iter()
        .filter(|(k, _)| k == "authorization")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        auth,
        ["Bearer good-1"],
        "a pool key, never the client's token"
    );

    let resp = client()
        .post(gate.url("/openai/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(&json!({ "model": "gemini-2.5-flash", "stream": true, "messages": [{ "role": "user", "content": "a b c" }] }))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let content: String = events(&text)
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "echo: a b c");
}

#[tokio::test]
async fn operator_settings_are_the_only_additions() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env(
            "SAFETY_SETTINGS",
            r#"[{"category":"HARM_CATEGORY_HARASSMENT","threshold":"BLOCK_NONE"}]"#,
        )
        .env("TOOLS_CODE_EXECUTION_ENABLED", "true")
        .env("URL_CONTEXT_ENABLED", "true")
        .env("URL_CONTEXT_MODELS", "gemini-2.5-flash")
        .start()
        .await;
    let (status, _, v) = chat(
        &gate,
        &json!({ "model": "gemini-2.5-flash", "messages": [{ "role": "user", "content": "x" }] }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let sent = last_body(&fake);
    assert_eq!(
        sent["safetySettings"],
        json!([{ "category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE" }])
    );
    assert_eq!(
        sent["tools"],
        json!([{ "codeExecution": {} }, { "urlContext": {} }])
    );
    // Native calls reach Google as sent.
    post(&gate, GENERATE, &ask("x")).await;
    assert_eq!(last_body(&fake), ask("x"));
}

#[tokio::test]
async fn fake_streams_keep_the_client_waiting_then_answer() {
    let fake = fake_with(FakeConfig {
        slow: std::time::Duration::from_millis(450),
        ..FakeConfig::default()
    })
    .await;
    let gate = gate()
        .upstream(&fake, &["slow-1"])
        .env("FAKE_STREAM_ENABLED", "true")
        .env("FAKE_STREAM_EMPTY_DATA_INTERVAL_SECONDS", "0.1")
        .start()
        .await;
    let resp = client()
        .post(gate.url(CHAT))
        .bearer_auth(TOKEN)
        .json(&json!({ "model": "gemini-2.5-flash", "stream": true,
                        "messages": [{ "role": "user", "content": "slow one" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let events = events(&text);
    let keepalives = events
        .iter()
        .filter(|e| e["choices"][0]["delta"]["content"] == "")
        .count();
    assert!(keepalives >= 2, "{text}");
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "echo: slow one");
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    let roles = events
        .iter()
        .filter(|e| e["choices"][0]["delta"].get("role").is_some())
        .count();
    assert_eq!(roles, 1, "{text}");
    assert_eq!(
        fake.state.last_received().unwrap().path,
        "/v1beta/models/gemini-2.5-flash:generateContent",
        "served by a whole call"
    );
}

#[tokio::test]
async fn the_stream_optimizer_repaces_text() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("STREAM_OPTIMIZER_ENABLED", "true")
        .env("STREAM_MIN_DELAY", "0.001")
        .env("STREAM_MAX_DELAY", "0.002")
        .env("STREAM_SHORT_TEXT_THRESHOLD", "3")
        .env("STREAM_LONG_TEXT_THRESHOLD", "8")
        .env("STREAM_CHUNK_SIZE", "2")
        .start()
        .await;
    let resp = client()
        .post(gate.url(CHAT))
        .bearer_auth(TOKEN)
        .header("x-fake-chunks", "2")
        .json(&json!({ "model": "gemini-2.5-flash", "stream": true,
                        "messages": [{ "role": "user", "content": "alpha beta gamma delta" }] }))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    let pieces: Vec<String> = events(&text)
        .iter()
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(pieces.concat(), "echo: alpha beta gamma delta");
    assert!(
        pieces.len() >= 10,
        "two upstream chunks re-sent in small pieces: {pieces:?}"
    );
    assert!(pieces.iter().all(|p| p.chars().count() <= 2), "{pieces:?}");
}

#[tokio::test]
async fn images_are_generated_with_the_paid_key_and_uploaded() {
    let fake = fake().await;
    let hosts = [
        (
            "smms",
            vec![
                ("GEMGATE_SMMS_URL", "/_fake/upload/smms"),
                ("SMMS_SECRET_TOKEN", "smms-token"),
            ],
        ),
        (
            "picgo",
            vec![
                ("GEMGATE_PICGO_URL", "/_fake/upload/picgo"),
                ("PICGO_API_KEY", "picgo-key"),
            ],
        ),
        (
            "cloudflare_imgbed",
            vec![
                ("CLOUDFLARE_IMGBED_URL", "/_fake/upload/imgbed"),
                ("CLOUDFLARE_IMGBED_AUTH_CODE", "imgbed-code"),
            ],
        ),
    ];
    for (provider, settings) in hosts {
        let mut builder = gate()
            .upstream(&fake, &["good-1"])
            .env("PAID_KEY", "good-paid")
            .env("UPLOAD_PROVIDER", provider);
        for (name, value) in settings {
            let value = if value.starts_with('/') {
                format!("{}{value}", fake.base_url().trim_end_matches("/v1beta"))
            } else {
                value.to_owned()
            };
            builder = builder.env(name, &value);
        }
        let gate = builder.start().await;
        let resp = client()
            .post(gate.url("/v1/images/generations"))
            .bearer_auth(TOKEN)
            .json(&json!({ "prompt": "a red square", "n": 2, "size": "1024x1792" }))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert_eq!(status, 200, "{provider}: {v}");
        let urls: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["url"].as_str().unwrap())
            .collect();
        assert_eq!(urls.len(), 2, "{provider}: {v}");
        let image = client().get(urls[0]).send().await.unwrap();
        assert_eq!(image.headers()["content-type"], "image/png", "{provider}");
        let host = if provider == "cloudflare_imgbed" {
            "imgbed"
        } else {
            provider
        };
        assert_eq!(
            fake.state.key_stats(&format!("upload:{host}")).requests,
            2,
            "{provider}"
        );
    }
    let seen: Vec<_> = fake
        .state
        .received()
        .into_iter()
        .filter(|r| r.path.ends_with(":predict"))
        .collect();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|r| r.key.as_deref() == Some("good-paid")));
    let body: Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(
        body,
        json!({ "instances": [{ "prompt": "a red square" }], "parameters": { "sampleCount": 2, "aspectRatio": "9:16" } })
    );

    // b64_json needs no host; a size Imagen has no ratio for is the client's error.
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let resp = client()
        .post(gate.url("/v1/images/generations"))
        .bearer_auth(TOKEN)
        .json(&json!({ "prompt": "x", "response_format": "b64_json" }))
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["data"][0]["b64_json"]
            .as_str()
            .unwrap()
            .starts_with("iVBOR")
    );
    let resp = client()
        .post(gate.url("/v1/images/generations"))
        .bearer_auth(TOKEN)
        .json(&json!({ "prompt": "x", "size": "512x512" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "size");
}

#[tokio::test]
async fn speech_comes_back_as_wav() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("TTS_VOICE_NAME", "Kore")
        .start()
        .await;
    let resp = client()
        .post(gate.url("/v1/audio/speech"))
        .bearer_auth(TOKEN)
        .json(&json!({ "model": "tts-1", "input": "hello there", "voice": "alloy" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "audio/wav");
    let wav = resp.bytes().await.unwrap();
    assert_eq!(&wav[..4], b"RIFF");
    assert_eq!(&wav[8..12], b"WAVE");
    assert_eq!(u32::from_le_bytes(wav[24..28].try_into().unwrap()), 24_000);
    assert_eq!(wav.len(), 44 + 2400);
    let sent = last_body(&fake);
    assert_eq!(
        fake.state.last_received().unwrap().path,
        "/v1beta/models/gemini-2.5-flash-preview-tts:generateContent"
    );
    assert_eq!(
        sent["generationConfig"]["speechConfig"]["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"],
        "Kore"
    );
}

#[tokio::test]
async fn image_urls_are_fetched_and_inlined() {
    let fake = fake().await;
    // The fake is on loopback, which gemgate fetches from only when the operator allows it.
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_FETCH_ALLOW", "127.0.0.1")
        .start()
        .await;
    let origin = fake.base_url().trim_end_matches("/v1beta").to_owned();
    let (status, _, v) = chat(
        &gate,
        &json!({ "model": "gemini-2.5-flash", "messages": [{ "role": "user", "content": [
            { "type": "text", "text": "what is it" },
            { "type": "image_url", "image_url": { "url": format!("{origin}/_fake/files/cat.png") } }
        ] }] }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let part = &last_body(&fake)["contents"][0]["parts"][1]["inlineData"];
    assert_eq!(part["mimeType"], "image/png");
    assert!(
        part["data"].as_str().unwrap().starts_with("iVBOR"),
        "{part}"
    );

    // An image that cannot be fetched is the client's error, and says which.
    let before = fake.state.received().len();
    let missing = format!("{origin}/_fake/nothing-here.png");
    let (status, _, v) = chat(
        &gate,
        &json!({ "model": "gemini-2.5-flash", "messages": [{ "role": "user", "content": [
            { "type": "image_url", "image_url": { "url": missing } }
        ] }] }),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing-here.png")
    );
    assert_eq!(fake.state.received().len(), before, "no Gemini call");
}

#[tokio::test]
async fn model_suffix_plugins_apply_to_openai_clients() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let (status, _, v) = chat(
        &gate,
        &json!({ "model": "gemini-2.5-flash-search", "messages": [{ "role": "user", "content": "news" }] }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        fake.state.last_received().unwrap().path,
        "/v1beta/models/gemini-2.5-flash:generateContent"
    );
    assert_eq!(last_body(&fake)["tools"], json!([{ "googleSearch": {} }]));
}

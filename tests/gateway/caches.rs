//! Cached contents: pinned to the key that made them, the client's own, and clear answers when
//! their key is gone.

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::*;

async fn call(
    gate: &Gate,
    method: Method,
    token: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client()
        .request(method, gate.url(path))
        .header("x-goog-api-key", token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A cache whose key is disabled answers 503 naming the key (with `Retry-After`), one whose key
/// left the pool 410 naming it — never another key's 403; an id that is not a cache name is
/// not routed at all.
#[tokio::test]
async fn a_cache_whose_key_left_the_pool_is_gone() {
    let fake = fake().await;
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .toml("[keys]\napi_keys = [\"only-key-1\", \"other-key-2\"]\n")
        .env(
            "ALLOWED_TOKENS",
            &format!(r#"["{TOKEN}", "sk-other-client"]"#),
        )
        .admin()
        .start()
        .await;
    let (status, cache) = call(
        &gate,
        Method::POST,
        TOKEN,
        "/v1beta/cachedContents",
        Some(json!({ "model": "models/gemini-2.5-flash", "contents": [{ "role": "user", "parts": [{ "text": "shared" }] }] })),
    )
    .await;
    assert_eq!(status, 200, "{cache}");
    let name = cache["name"].as_str().unwrap().to_owned();
    let path = format!("/v1beta/{name}");
    assert_eq!(call(&gate, Method::GET, TOKEN, &path, None).await.0, 200);
    let (status, v) = call(&gate, Method::GET, "sk-other-client", &path, None).await;
    assert_eq!(status, 404, "another client's: {v}");
    let (_, v) = admin(
        Method::GET,
        &gate,
        "/admin/api/resources?kind=cachedContents",
        None,
    )
    .await;
    assert_eq!(v["resources"][0]["id"], name.as_str(), "{v}");
    let (_, v) = admin(Method::GET, &gate, "/admin/api/resources?kind=files", None).await;
    assert_eq!(v["resources"], json!([]), "caches are not files: {v}");
    // Its key disabled: 503 naming the key and why, with Retry-After; never another key.
    let id = gemgate::config::stable_id("k", "only-key-1");
    let disable = format!("/admin/api/keys/{id}/disable");
    assert_eq!(admin(Method::POST, &gate, &disable, None).await.0, 200);
    let resp = client()
        .get(gate.url(&path))
        .header("x-goog-api-key", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "60");
    let v: Value = resp.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(&id) && message.contains("disabled"), "{v}");
    let enable = format!("/admin/api/keys/{id}/enable");
    assert_eq!(admin(Method::POST, &gate, &enable, None).await.0, 200);
    assert_eq!(call(&gate, Method::GET, TOKEN, &path, None).await.0, 200);
    // The operator removes the key: the cache cannot be reached any more.
    let before = gate.reload_status().await;
    let (status, v) = admin(
        Method::DELETE,
        &gate,
        &format!("/admin/api/keys/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    gate.wait_reloads(&before).await;
    let (status, v) = call(&gate, Method::GET, TOKEN, &path, None).await;
    assert_eq!(status, 410, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(&id), "{v}");
    let (status, _) = call(
        &gate,
        Method::GET,
        TOKEN,
        "/v1beta/cachedContents/..%2Fx",
        None,
    )
    .await;
    assert_eq!(status, 404);
}

/// A client that spreads caches over many keys cannot make one list cost more than a bounded
/// number of upstream calls.
#[tokio::test]
async fn a_cache_list_makes_a_bounded_number_of_upstream_calls() {
    let fake = fake().await;
    let keys: Vec<String> = (0..40).map(|i| format!("spread-{i:02}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let gate = gate()
        .upstream(&fake, &refs)
        .shipped_plugins()
        .start()
        .await;
    let create = json!({ "model": "models/gemini-2.5-flash" });
    for _ in 0..40 {
        let (status, v) = call(
            &gate,
            Method::POST,
            TOKEN,
            "/v1beta/cachedContents",
            Some(create.clone()),
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }
    let holders = refs
        .iter()
        .filter(|k| fake.state.key_stats(k).requests > 0)
        .count();
    assert!(
        holders > 32,
        "round robin spread the caches over {holders} keys"
    );
    let before = fake.state.total_requests();
    let (status, v) = call(&gate, Method::GET, TOKEN, "/v1beta/cachedContents", None).await;
    assert_eq!(status, 200, "{v}");
    let calls = fake.state.total_requests() - before;
    assert_eq!(calls, 32, "one list, at most 32 upstream calls");
    assert_eq!(v["cachedContents"].as_array().unwrap().len(), 32);
}

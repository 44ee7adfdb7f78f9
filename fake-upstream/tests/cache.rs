//! Cached contents and their ownership by Cloud projects, through HTTP on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use gemgate_fake_upstream::{FakeConfig, FakeUpstream};
use serde_json::{Value, json};

mod common;
use common::{call, raw_call};

async fn generate(addr: SocketAddr, key: &str, cache: &str, prompt: &str) -> (u16, Value) {
    let body = json!({
        "contents": [{ "role": "user", "parts": [{ "text": prompt }] }],
        "cachedContent": cache,
    });
    let path = "/v1beta/models/gemini-2.5-flash:generateContent";
    call(addr, "POST", path, Some(key), &body.to_string()).await
}

/// Google's answer about a cache that is unknown, expired or another project's.
fn denied() -> Value {
    json!({ "error": {
        "code": 403,
        "message": "CachedContent not found (or permission denied)",
        "status": "PERMISSION_DENIED",
    } })
}

/// An RFC 3339 UTC time (`…Z`) in seconds since the Unix epoch.
fn seconds(t: &Value) -> f64 {
    let t = t.as_str().unwrap();
    let t = t.strip_suffix('Z').unwrap();
    let (date, time) = t.split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|n| n.parse().unwrap()).collect();
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let days = 365 * y + y / 4 - y / 100 + y / 400 + (153 * m + 2) / 5 + d[2] - 1 - 719_468;
    let hms: Vec<f64> = time.split(':').map(|n| n.parse().unwrap()).collect();
    days as f64 * 86_400.0 + hms[0] * 3600.0 + hms[1] * 60.0 + hms[2]
}

fn names(list: &Value) -> Vec<String> {
    list["cachedContents"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_cache_belongs_to_its_project() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let addr = fake.addr;
    let quota = json!({ "projects": { "p1": { "keys": ["k1", "k2"] }, "p2": { "keys": ["k4"] } } });
    let (status, _) = call(addr, "POST", "/_fake/quota", None, &quota.to_string()).await;
    assert_eq!(status, 200);

    // Create with k1: six words, with the system instruction.
    let create = json!({
        "model": "models/gemini-2.5-flash",
        "displayName": "doc",
        "contents": [{ "role": "user", "parts": [{ "text": "one two three" }, { "text": "four" }] }],
        "systemInstruction": { "parts": [{ "text": "be brief" }] },
        "ttl": "300s",
    });
    let (status, cache) = call(
        addr,
        "POST",
        "/v1beta/cachedContents",
        Some("k1"),
        &create.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{cache}");
    let name = cache["name"].as_str().unwrap().to_owned();
    let id = name.strip_prefix("cachedContents/").unwrap().to_owned();
    assert_eq!(id.len(), 12);
    assert!(
        id.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    );
    assert_eq!(cache["model"], "models/gemini-2.5-flash");
    assert_eq!(cache["displayName"], "doc");
    assert_eq!(cache["usageMetadata"], json!({ "totalTokenCount": 6 }));
    assert_eq!(cache["createTime"], cache["updateTime"]);
    for t in ["createTime", "updateTime", "expireTime"] {
        assert!(cache[t].as_str().unwrap().ends_with('Z'), "{cache}");
    }
    let ttl = seconds(&cache["expireTime"]) - seconds(&cache["createTime"]);
    assert!((ttl - 300.0).abs() < 0.001, "{cache}");
    assert!(cache.get("contents").is_none());
    assert_eq!(fake.state.cache_owner(&name).as_deref(), Some("k1"));
    assert_eq!(fake.state.cache_owner(&id).as_deref(), Some("k1"));

    // The project's other key sees it; keys of another project, or of none, do not.
    let path = format!("/v1beta/{name}");
    let (status, got) = call(addr, "GET", &path, Some("k2"), "").await;
    assert_eq!((status, &got), (200, &cache));
    let (status, got) = call(addr, "GET", &format!("{path}?key=k1"), None, "").await;
    assert_eq!((status, &got), (200, &cache));
    for key in ["k3", "k4"] {
        let (status, body) = raw_call(addr, "GET", &path, Some(key), "").await;
        assert_eq!(status, 403);
        assert!(!body.contains("ErrorInfo"), "{body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), denied());
    }
    let (status, got) = call(
        addr,
        "GET",
        "/v1beta/cachedContents/0123456789ab",
        Some("k1"),
        "",
    )
    .await;
    assert_eq!((status, got), (403, denied()));

    // Lists: each key sees its project's caches only.
    let minimal = json!({ "model": "models/gemini-2.5-flash" }).to_string();
    let (_, by_k2) = call(addr, "POST", "/v1beta/cachedContents", Some("k2"), &minimal).await;
    let (_, by_k3) = call(addr, "POST", "/v1beta/cachedContents", Some("k3"), &minimal).await;
    assert!(by_k2.get("displayName").is_none());
    assert_eq!(by_k2["usageMetadata"]["totalTokenCount"], 0);
    let ttl = seconds(&by_k3["expireTime"]) - seconds(&by_k3["createTime"]);
    assert!((ttl - 3600.0).abs() < 0.001, "{by_k3}");
    let by_k2 = by_k2["name"].as_str().unwrap().to_owned();
    let by_k3 = by_k3["name"].as_str().unwrap().to_owned();
    let (status, list) = call(addr, "GET", "/v1beta/cachedContents", Some("k1"), "").await;
    assert_eq!(status, 200);
    assert_eq!(names(&list), [name.as_str(), by_k2.as_str()]);
    assert!(list.get("nextPageToken").is_none());
    assert_eq!(list["cachedContents"][0], cache);
    let (_, list) = call(addr, "GET", "/v1beta/cachedContents", Some("k3"), "").await;
    assert_eq!(names(&list), [by_k3.as_str()]);
    let (status, list) = call(addr, "GET", "/v1beta/cachedContents", Some("k4"), "").await;
    assert_eq!((status, list), (200, json!({})));
    // Pages.
    let (_, page) = call(
        addr,
        "GET",
        "/v1beta/cachedContents?pageSize=1",
        Some("k2"),
        "",
    )
    .await;
    assert_eq!(names(&page), [name.as_str()]);
    let token = page["nextPageToken"].as_str().unwrap();
    let (_, page) = call(
        addr,
        "GET",
        &format!("/v1beta/cachedContents?pageSize=1&pageToken={token}"),
        Some("k2"),
        "",
    )
    .await;
    assert_eq!(names(&page), [by_k2.as_str()]);
    assert!(page.get("nextPageToken").is_none(), "{page}");

    // Update the expiration.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (status, patched) = call(
        addr,
        "PATCH",
        &format!("{path}?updateMask=ttl"),
        Some("k2"),
        r#"{"ttl": "600s"}"#,
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["createTime"], cache["createTime"]);
    assert!(seconds(&patched["updateTime"]) > seconds(&cache["updateTime"]));
    let ttl = seconds(&patched["expireTime"]) - seconds(&patched["updateTime"]);
    assert!((ttl - 600.0).abs() < 0.001, "{patched}");
    let (_, got) = call(addr, "GET", &path, Some("k1"), "").await;
    assert_eq!(got, patched);
    let (status, patched) = call(
        addr,
        "PATCH",
        &format!("{path}?updateMask=expireTime&key=k1"),
        None,
        r#"{"expireTime": "2099-01-02T03:04:05.5+01:00"}"#,
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["expireTime"], "2099-01-02T02:04:05.500Z");
    for (query, body) in [
        ("?updateMask=ttl", r#"{"ttl": "ten minutes"}"#),
        (
            "?updateMask=ttl",
            r#"{"expireTime": "2099-01-01T00:00:00Z"}"#,
        ),
        ("?updateMask=displayName", r#"{"displayName": "x"}"#),
        ("", r#"{"ttl": "-5s"}"#),
        ("", r#"{"expireTime": "2001-01-01T00:00:00Z"}"#),
        ("", "{}"),
    ] {
        let (status, error) =
            call(addr, "PATCH", &format!("{path}{query}"), Some("k1"), body).await;
        assert_eq!(status, 400, "{query} {body}: {error}");
        assert_eq!(error["error"]["status"], "INVALID_ARGUMENT");
    }
    let (status, got) = call(
        addr,
        "PATCH",
        &format!("{path}?updateMask=ttl"),
        Some("k3"),
        r#"{"ttl": "600s"}"#,
    )
    .await;
    assert_eq!((status, got), (403, denied()));

    // Generation naming the cache.
    let (status, got) = generate(addr, "k3", &name, "hello there").await;
    assert_eq!((status, got), (403, denied()));
    let (status, answer) = generate(addr, "k1", &name, "hello there").await;
    assert_eq!(status, 200, "{answer}");
    let usage = &answer["usageMetadata"];
    assert_eq!(usage["cachedContentTokenCount"], 6);
    assert_eq!(usage["promptTokenCount"], 8);
    assert_eq!(
        usage["totalTokenCount"],
        8 + usage["candidatesTokenCount"].as_u64().unwrap()
    );
    let (_, plain) = generate(addr, "k3", &by_k3, "hello there").await;
    assert!(
        plain["usageMetadata"]
            .get("cachedContentTokenCount")
            .is_none()
    );
    assert_eq!(plain["usageMetadata"]["promptTokenCount"], 2);
    let stream = json!({
        "contents": [{ "role": "user", "parts": [{ "text": "hi" }] }],
        "cachedContent": name,
    })
    .to_string();
    let (status, body) = raw_call(
        addr,
        "POST",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        Some("k2"),
        &stream,
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains(r#""cachedContentTokenCount":6"#), "{body}");
    assert!(body.contains(r#""promptTokenCount":7"#), "{body}");
    let (status, body) = raw_call(
        addr,
        "POST",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        Some("k4"),
        &stream,
    )
    .await;
    assert_eq!(status, 403);
    assert!(body.contains("CachedContent not found"), "{body}");
    let (status, got) = generate(addr, "k1", "cachedContents/0123456789ab", "hi").await;
    assert_eq!((status, got), (403, denied()));

    // Delete.
    let (status, got) = call(addr, "DELETE", &path, Some("k4"), "").await;
    assert_eq!((status, got), (403, denied()));
    let (status, got) = call(addr, "DELETE", &path, Some("k2"), "").await;
    assert_eq!((status, got), (200, json!({})));
    assert_eq!(fake.state.cache_owner(&name), None);
    for key in ["k1", "k2"] {
        let (status, got) = call(addr, "GET", &path, Some(key), "").await;
        assert_eq!((status, got), (403, denied()));
    }
    let (status, got) = call(addr, "DELETE", &path, Some("k1"), "").await;
    assert_eq!((status, got), (403, denied()));
    let (status, got) = generate(addr, "k1", &name, "hi").await;
    assert_eq!((status, got), (403, denied()));
    let (_, list) = call(addr, "GET", "/v1beta/cachedContents", Some("k1"), "").await;
    assert_eq!(names(&list), [by_k2]);

    // Every call was counted for its key.
    assert_eq!(fake.state.key_stats("k3").requests, 6);
    assert_eq!(fake.state.key_stats("k4").requests, 4);
}

#[tokio::test]
async fn bad_creations_are_refused() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let long = "x".repeat(129);
    for (body, status) in [
        ("not json".to_owned(), 400),
        ("[]".to_owned(), 400),
        (json!({ "contents": [] }).to_string(), 400),
        (json!({ "model": "" }).to_string(), 400),
        (json!({ "model": 5 }).to_string(), 400),
        (json!({ "model": "models/no-such-model" }).to_string(), 404),
        (
            json!({ "model": "models/gemini-2.5-flash", "ttl": "300" }).to_string(),
            400,
        ),
        (
            json!({ "model": "models/gemini-2.5-flash", "ttl": "0s" }).to_string(),
            400,
        ),
        (
            json!({ "model": "models/gemini-2.5-flash", "ttl": "300s", "expireTime": "2099-01-01T00:00:00Z" }).to_string(),
            400,
        ),
        (
            json!({ "model": "models/gemini-2.5-flash", "expireTime": "tomorrow" }).to_string(),
            400,
        ),
        (
            json!({ "model": "models/gemini-2.5-flash", "displayName": long }).to_string(),
            400,
        ),
        (
            json!({ "model": "models/gemini-2.5-flash", "contents": "hi" }).to_string(),
            400,
        ),
    ] {
        let (got, error) = call(
            fake.addr,
            "POST",
            "/v1beta/cachedContents",
            Some("k"),
            &body,
        )
        .await;
        assert_eq!(got, status, "{body}: {error}");
        let expected = if status == 400 {
            "INVALID_ARGUMENT"
        } else {
            "NOT_FOUND"
        };
        assert_eq!(error["error"]["status"], expected, "{body}");
    }
    let (status, error) = call(
        fake.addr,
        "POST",
        "/v1beta/cachedContents",
        Some("k"),
        &json!({ "model": "models/gemini-2.5-flash", "contents": [{ "parts": [{ "fileData": { "fileUri": "http://x/v1beta/files/fnope" } }] }] }).to_string(),
    )
    .await;
    assert_eq!(status, 403);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("File fnope")
    );
    // A bare model name and an explicit expireTime are accepted.
    let (status, cache) = call(
        fake.addr,
        "POST",
        "/v1beta/cachedContents",
        Some("k"),
        &json!({ "model": "gemini-2.5-pro", "expireTime": "2099-06-01T00:00:00Z" }).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{cache}");
    assert_eq!(cache["model"], "models/gemini-2.5-pro");
    assert_eq!(cache["expireTime"], "2099-06-01T00:00:00Z");
    // Other methods and deeper paths.
    let (status, _) = call(fake.addr, "PUT", "/v1beta/cachedContents", Some("k"), "").await;
    assert_eq!(status, 405);
    let path = format!("/v1beta/{}/x", cache["name"].as_str().unwrap());
    let (status, _) = call(fake.addr, "GET", &path, Some("k"), "").await;
    assert_eq!(status, 404);
    let (status, _) = call(
        fake.addr,
        "GET",
        "/v1beta/cachedContents?pageToken=zz",
        Some("k"),
        "",
    )
    .await;
    assert_eq!(status, 400);
    // A key's behaviour applies here too; a call without a key is refused.
    let (status, error) = call(
        fake.addr,
        "GET",
        "/v1beta/cachedContents",
        Some("invalid-1"),
        "",
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        error["error"]["details"][0]["reason"], "API_KEY_INVALID",
        "{error}"
    );
    let (status, _) = call(fake.addr, "GET", "/v1beta/cachedContents", None, "").await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn an_expired_cache_is_gone() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let body = json!({ "model": "models/gemini-2.5-flash", "ttl": "0.3s",
                       "contents": [{ "parts": [{ "text": "a b" }] }] });
    let (status, cache) = call(
        fake.addr,
        "POST",
        "/v1beta/cachedContents",
        Some("k"),
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{cache}");
    let name = cache["name"].as_str().unwrap().to_owned();
    let path = format!("/v1beta/{name}");
    assert_eq!(call(fake.addr, "GET", &path, Some("k"), "").await.0, 200);
    assert_eq!(generate(fake.addr, "k", &name, "hi").await.0, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(fake.state.cache_owner(&name), None);
    for (method, body) in [("GET", ""), ("PATCH", r#"{"ttl": "60s"}"#), ("DELETE", "")] {
        let (status, got) = call(fake.addr, method, &path, Some("k"), body).await;
        assert_eq!((status, got), (403, denied()), "{method}");
    }
    assert_eq!(generate(fake.addr, "k", &name, "hi").await, (403, denied()));
    let (_, list) = call(fake.addr, "GET", "/v1beta/cachedContents", Some("k"), "").await;
    assert_eq!(list, json!({}));
}

//! The quota model and the global throttle, through HTTP on loopback.

use std::net::SocketAddr;

use gemgate_fake_upstream::{FakeConfig, FakeUpstream, QuotaModel, QuotaProject};
use serde_json::{Value, json};

mod common;
use common::call;

async fn generate(addr: SocketAddr, key: &str, model: &str, prompt: &str) -> (u16, Value) {
    let body = json!({ "contents": [{ "role": "user", "parts": [{ "text": prompt }] }] });
    let path = format!("/v1beta/models/{model}:generateContent");
    call(addr, "POST", &path, Some(key), &body.to_string()).await
}

fn detail<'a>(error: &'a Value, kind: &str) -> &'a Value {
    let kind = format!("type.googleapis.com/google.rpc.{kind}");
    error["error"]["details"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["@type"] == kind.as_str()))
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn a_project_shares_its_per_minute_quota() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let quota = json!({
        "projects": { "p1": { "keys": ["k1", "k2"], "number": 4242, "rpm": 3 } },
        "models": ["gemini-2.5-flash"]
    });
    let (status, _) = call(fake.addr, "POST", "/_fake/quota", None, &quota.to_string()).await;
    assert_eq!(status, 200);

    for key in ["k1", "k2", "k1"] {
        assert_eq!(
            generate(fake.addr, key, "gemini-2.5-flash", "one two three")
                .await
                .0,
            200
        );
    }
    let (status, error) = generate(fake.addr, "k2", "gemini-2.5-flash", "one").await;
    assert_eq!(status, 429);
    assert_eq!(error["error"]["status"], "RESOURCE_EXHAUSTED");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("You exceeded your current quota")
    );
    let violation = &detail(&error, "QuotaFailure")["violations"][0];
    assert_eq!(
        violation["quotaId"],
        "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    );
    assert_eq!(
        violation["quotaMetric"],
        "generativelanguage.googleapis.com/generate_content_free_tier_requests"
    );
    assert_eq!(
        violation["quotaDimensions"],
        json!({ "location": "global", "model": "gemini-2.5-flash" })
    );
    assert_eq!(violation["quotaValue"], "3");
    let delay = detail(&error, "RetryInfo")["retryDelay"].as_str().unwrap();
    let seconds: u64 = delay.strip_suffix('s').unwrap().parse().unwrap();
    assert!((1..=60).contains(&seconds), "{delay}");
    assert!(detail(&error, "Help")["links"][0]["url"].is_string());
    let info = detail(&error, "ErrorInfo");
    assert_eq!(info["reason"], "RATE_LIMIT_EXCEEDED");
    assert_eq!(info["metadata"]["consumer"], "projects/4242");
    assert_eq!(info["metadata"]["quota_location"], "global");

    // Other models, other calls, and keys outside every project are not limited.
    assert_eq!(
        generate(fake.addr, "k1", "gemini-2.5-pro", "hi").await.0,
        200
    );
    let count = json!({ "contents": [{ "parts": [{ "text": "hi" }] }] }).to_string();
    let (status, _) = call(
        fake.addr,
        "POST",
        "/v1beta/models/gemini-2.5-flash:countTokens",
        Some("k1"),
        &count,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        call(fake.addr, "GET", "/v1beta/models", Some("k1"), "")
            .await
            .0,
        200
    );
    for _ in 0..5 {
        assert_eq!(
            generate(fake.addr, "outsider", "gemini-2.5-flash", "hi")
                .await
                .0,
            200
        );
    }

    let (status, stats) = call(fake.addr, "GET", "/_fake/quota", None, "").await;
    assert_eq!(status, 200);
    assert_eq!(stats["projects"]["p1"]["admitted"], 3);
    assert_eq!(stats["projects"]["p1"]["limited"], 1);
    assert_eq!(stats["throttled"], 0);
    let stats = fake.state.quota_stats();
    assert_eq!((stats.admitted, stats.limited), (3, 1));
    assert_eq!(stats.projects["p1"].number, 4242);
}

#[tokio::test]
async fn token_and_day_limits_through_the_rust_api() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let project = QuotaProject {
        keys: vec!["k".into()],
        tpm: Some(5),
        rpd: Some(3),
        tier: String::new(),
        ..QuotaProject::default()
    };
    fake.state
        .set_quota(QuotaModel {
            projects: [("p".to_owned(), project)].into(),
            ..QuotaModel::default()
        })
        .unwrap();

    assert_eq!(
        generate(fake.addr, "k", "gemini-2.5-flash", "a b c")
            .await
            .0,
        200
    );
    let (status, error) = generate(fake.addr, "k", "gemini-2.5-flash", "d e f").await;
    assert_eq!(status, 429);
    let violation = &detail(&error, "QuotaFailure")["violations"][0];
    assert_eq!(
        violation["quotaId"],
        "GenerateContentInputTokensPerModelPerMinute"
    );
    assert_eq!(
        violation["quotaMetric"],
        "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count"
    );
    assert_eq!(
        detail(&error, "ErrorInfo")["metadata"]["consumer"],
        "projects/1000"
    );
    // Embeddings count too; each model has its own windows.
    let embed = json!({ "content": { "parts": [{ "text": "x y" }] } }).to_string();
    let (status, _) = call(
        fake.addr,
        "POST",
        "/v1beta/models/gemini-2.5-flash:embedContent",
        Some("k"),
        &embed,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        fake.addr,
        "POST",
        "/v1beta/models/text-embedding-004:embedContent",
        Some("k"),
        &embed,
    )
    .await;
    assert_eq!(status, 200);
    // Three calls to gemini-2.5-flash admitted today: the fourth is refused by the day, with
    // no RetryInfo.
    let (status, error) = generate(fake.addr, "k", "gemini-2.5-flash", "").await;
    assert_eq!(status, 200, "{error}");
    let (status, error) = generate(fake.addr, "k", "gemini-2.5-flash", "").await;
    assert_eq!(status, 429);
    assert_eq!(
        detail(&error, "QuotaFailure")["violations"][0]["quotaId"],
        "GenerateRequestsPerDayPerProjectPerModel"
    );
    assert!(detail(&error, "RetryInfo").is_null());
    let stats = fake.state.quota_stats();
    assert_eq!(
        (stats.projects["p"].admitted, stats.projects["p"].limited),
        (4, 2)
    );
}

#[tokio::test]
async fn the_throttle_answers_every_key_a_bare_429() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let quota = json!({ "projects": { "p1": { "keys": ["k1"], "rpm": 100 } } }).to_string();
    assert_eq!(
        call(fake.addr, "POST", "/_fake/quota", None, &quota)
            .await
            .0,
        200
    );
    assert_eq!(
        call(
            fake.addr,
            "POST",
            "/_fake/throttle",
            None,
            r#"{"on": true}"#
        )
        .await
        .0,
        200
    );
    for key in ["k1", "outsider"] {
        let (status, error) = generate(fake.addr, key, "gemini-2.5-flash", "hi").await;
        assert_eq!(status, 429);
        assert_eq!(error["error"]["status"], "RESOURCE_EXHAUSTED");
        assert!(error["error"].get("details").is_none(), "{error}");
    }
    assert_eq!(
        call(fake.addr, "GET", "/v1beta/models", Some("k1"), "")
            .await
            .0,
        200
    );
    // `{"throttle": false}` alone turns it off and keeps the model.
    let (status, _) = call(
        fake.addr,
        "POST",
        "/_fake/quota",
        None,
        r#"{"throttle": false}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        generate(fake.addr, "k1", "gemini-2.5-flash", "hi").await.0,
        200
    );
    fake.state.set_throttle(true);
    assert_eq!(
        generate(fake.addr, "k1", "gemini-2.5-flash", "hi").await.0,
        429
    );
    let (_, stats) = call(fake.addr, "GET", "/_fake/quota", None, "").await;
    assert_eq!(stats["throttled"], 3);
    assert_eq!(stats["throttle"], true);
    assert_eq!(stats["projects"]["p1"]["admitted"], 1);
}

#[tokio::test]
async fn bad_quota_bodies_are_refused() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    for body in [
        "not json",
        "[]",
        r#"{"projects": {"p": {"keys": ["k"], "rpm": "ten"}}}"#,
        r#"{"projects": {"p": {"keys": ["k"], "rmp": 10}}}"#,
        r#"{"projects": {"a": {"keys": ["k"]}, "b": {"keys": ["k"]}}}"#,
    ] {
        assert_eq!(
            call(fake.addr, "POST", "/_fake/quota", None, body).await.0,
            400,
            "{body}"
        );
    }
    assert_eq!(
        call(fake.addr, "POST", "/_fake/throttle", None, "{}")
            .await
            .0,
        400
    );
    let huge = format!("{{\"models\": [\"{}\"]}}", "m".repeat((1 << 20) + 16));
    assert_eq!(
        call(fake.addr, "POST", "/_fake/quota", None, &huge).await.0,
        413
    );
}

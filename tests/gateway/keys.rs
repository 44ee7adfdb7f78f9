//! The key pool and DESIGN.md's error taxonomy, row by row.

use std::collections::HashMap;

use crate::common::*;

/// Sends `n` generateContent requests for `model`; all must succeed.
async fn succeed(gate: &Gate, model: &str, n: usize) {
    for _ in 0..n {
        let (status, _, v) = post(
            gate,
            &format!("/v1beta/models/{model}:generateContent"),
            &ask("hi"),
        )
        .await;
        assert_eq!(status, 200, "{v}\n{}", gate.logs());
    }
}

#[tokio::test]
async fn round_robin_spreads_requests() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "good-2", "good-3"])
        .start()
        .await;
    succeed(&gate, "gemini-2.5-flash", 9).await;
    for key in ["good-1", "good-2", "good-3"] {
        assert_eq!(fake.state.key_stats(key).requests, 3, "{key}");
    }
}

#[tokio::test]
async fn round_robin_takes_the_usable_keys_evenly() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "invalid-2", "minute-3", "good-4"])
        .env("MAX_FAILURES", "1")
        .start()
        .await;
    // The first calls take the invalid key out and cool the minute-limited one.
    succeed(&gate, "gemini-2.5-flash", 4).await;
    assert_eq!(fake.state.key_stats("invalid-2").requests, 1);
    assert_eq!(fake.state.key_stats("minute-3").requests, 1);
    // The keys that are out do not hand their turns to the keys after them.
    fake.state.reset();
    succeed(&gate, "gemini-2.5-flash", 10).await;
    assert_eq!(
        fake.state.requests_by_key(),
        HashMap::from([("good-1".to_owned(), 5), ("good-4".to_owned(), 5)])
    );
}

#[tokio::test]
async fn invalid_keys_are_retried_elsewhere_then_disabled() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["invalid-1", "good-2"])
        .env("MAX_FAILURES", "2")
        .start()
        .await;
    succeed(&gate, "gemini-2.5-flash", 8).await;
    // Two consecutive key faults disable it: it is never tried again, for any model.
    assert_eq!(fake.state.key_stats("invalid-1").requests, 2);
    succeed(&gate, "gemini-2.5-pro", 4).await;
    assert_eq!(fake.state.key_stats("invalid-1").requests, 2);
    assert_eq!(fake.state.key_stats("good-2").requests, 12);
}

#[tokio::test]
async fn a_success_resets_the_failure_count() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["flip-1"])
        .env("MAX_FAILURES", "2")
        .env("MAX_RETRIES", "1")
        .start()
        .await;
    // Faults that never come twice in a row never disable the key.
    for (behaviour, expect) in [
        (Behaviour::Invalid, 400),
        (Behaviour::Valid, 200),
        (Behaviour::Invalid, 400),
        (Behaviour::Valid, 200),
    ] {
        fake.state.set_behaviour("flip-1", behaviour);
        let (status, _, _) = post(&gate, GENERATE, &ask("hi")).await;
        assert_eq!(status, expect);
    }
    // Two in a row do.
    fake.state.set_behaviour("flip-1", Behaviour::Invalid);
    for expect in [400, 400, 503] {
        let (status, _, _) = post(&gate, GENERATE, &ask("hi")).await;
        assert_eq!(status, expect);
    }
    assert_eq!(fake.state.key_stats("flip-1").requests, 6);
}

#[tokio::test]
async fn suspended_keys_are_disabled_and_never_echoed() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["suspended-AIzaSyVerySecretKey0001"])
        .env("MAX_FAILURES", "1")
        .start()
        .await;
    let (status, _, v) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 403, "Google's status after the last attempt");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("has been suspended"),
        "Google's message is kept: {message}"
    );
    assert!(
        !v.to_string().contains("VerySecretKey0001"),
        "the key was echoed: {v}"
    );
    // A probe confirms the 403 was the key's fault, and the key is disabled: no key is usable.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let v = loop {
        let (status, _, v) = post(&gate, GENERATE, &ask("hi")).await;
        if status == 503 {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "never disabled: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 disabled"),
        "{v}"
    );
    let probes = fake
        .state
        .received()
        .iter()
        .filter(|r| r.path.contains("gemini-2.5-flash-lite"))
        .count();
    assert_eq!(probes, 1, "one probe with TEST_MODEL");
}

#[tokio::test]
async fn minute_quota_cools_the_key_for_that_model_only() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["minute-1", "good-2"])
        .start()
        .await;
    succeed(&gate, "gemini-2.5-flash", 6).await;
    assert_eq!(
        fake.state.key_stats("minute-1").requests,
        1,
        "cooling for gemini-2.5-flash"
    );
    // Another model's quota is separate: the key is tried for it.
    succeed(&gate, "gemini-2.5-pro", 2).await;
    assert_eq!(fake.state.key_stats("minute-1").requests, 2);
    // MAX_FAILURES does not count quota answers: the key is cooling, not disabled.
    assert!(!gate.logs().contains("key disabled"));
}

#[tokio::test]
async fn every_key_cooling_answers_429_with_retry_after() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["minute-1"]).start().await;
    let (status, headers, v) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 429, "the last upstream status: {v}");
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    let (status, headers2, v) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(
        status, 429,
        "gemgate's own: the key serves again later: {v}"
    );
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    for h in [&headers, &headers2] {
        let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(
            (40..=47).contains(&retry),
            "Retry-After {retry} should follow RetryInfo's 47s"
        );
    }
    assert_eq!(fake.state.key_stats("minute-1").requests, 1);
}

#[tokio::test]
async fn daily_quota_cools_until_midnight_pacific() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["day-1"]).start().await;
    let (status, _, _) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 429);
    let (status, headers, _) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 429);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        retry > 60 && retry <= 25 * 3600,
        "Retry-After {retry}s should reach the next Pacific midnight"
    );
}

#[tokio::test]
async fn bare_429_cools_for_a_minute() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["bare429-1"]).start().await;
    post(&gate, GENERATE, &ask("hi")).await;
    let (status, headers, _) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 429);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((55..=60).contains(&retry), "{retry}");
}

#[tokio::test]
async fn server_errors_retry_without_penalty() {
    let fake = fake().await;
    let gate = gate()
        .upstream(
            &fake,
            &["overloaded-1", "internal-2", "deadline-3", "good-4"],
        )
        .env("MAX_FAILURES", "1")
        .env("MAX_RETRIES", "4")
        .start()
        .await;
    succeed(&gate, "gemini-2.5-flash", 6).await;
    // Every request starts on key 1 and walks the pool: 500, 503 and 504 are Google's fault,
    // so with MAX_FAILURES=1 a single penalty would have taken a key out.
    for key in ["overloaded-1", "internal-2", "deadline-3", "good-4"] {
        assert_eq!(
            fake.state.key_stats(key).requests,
            6,
            "{key}: {:?}",
            fake.state.requests_by_key()
        );
    }
}

#[tokio::test]
async fn the_last_failure_reaches_the_client_as_google_sent_it() {
    let fake = fake().await;
    let keys = [
        "overloaded-1",
        "overloaded-2",
        "overloaded-3",
        "overloaded-4",
        "overloaded-5",
    ];
    let gate = gate()
        .upstream(&fake, &keys)
        .env("MAX_RETRIES", "3")
        .start()
        .await;
    let (status, _, v) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 503);
    assert_eq!(
        v["error"]["message"],
        "The model is overloaded. Please try again later."
    );
    assert_eq!(
        fake.state.total_requests(),
        3,
        "MAX_RETRIES bounds the attempts"
    );
}

#[tokio::test]
async fn client_errors_pass_straight_through() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "good-2"])
        .env("MAX_FAILURES", "1")
        .start()
        .await;
    let (status, _, v) = post(&gate, GENERATE, &json!({ "contents": [] })).await;
    assert_eq!(status, 400);
    assert_eq!(
        v["error"]["message"],
        "* GenerateContentRequest.contents: contents is not specified\n"
    );
    let (status, _, v) = post(
        &gate,
        "/v1beta/models/gemini-9-ultra:generateContent",
        &ask("hi"),
    )
    .await;
    assert_eq!(status, 404);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("models/gemini-9-ultra is not found")
    );
    assert_eq!(fake.state.total_requests(), 2, "no retry");
    // No penalty: with MAX_FAILURES=1 a single penalty would have disabled a key.
    succeed(&gate, "gemini-2.5-flash", 4).await;
    assert_eq!(fake.state.key_stats("good-1").requests, 3);
    assert_eq!(fake.state.key_stats("good-2").requests, 3);
}

#[tokio::test]
async fn large_bodies_are_resent_whole_on_retry() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["overloaded-1", "good-2"])
        .start()
        .await;
    let big = "x".repeat(1536 * 1024);
    let (status, _, v) = post(&gate, GENERATE, &ask(&big)).await;
    assert_eq!(status, 200);
    assert_eq!(answer_text(&v).len(), big.len() + "echo: ".len());
    let received = fake.state.received();
    assert_eq!(received.len(), 2, "one failed attempt, one retry");
    assert_eq!(received[0].key.as_deref(), Some("overloaded-1"));
    assert!(received[0].body_len > 1536 * 1024);
    assert_eq!(received[0].body, received[1].body);
}

#[tokio::test]
async fn timeouts_retry_elsewhere_without_penalty() {
    let fake = fake_with(FakeConfig {
        slow: std::time::Duration::from_secs(3),
        ..FakeConfig::default()
    })
    .await;
    let gate = gate()
        .upstream(&fake, &["slow-1", "good-2"])
        .env("TIME_OUT", "0.5")
        .env("MAX_FAILURES", "1")
        .start()
        .await;
    succeed(&gate, "gemini-2.5-flash", 3).await;
    // Round-robin starts every request on slow-1: it stays in the pool.
    assert_eq!(
        fake.state.key_stats("slow-1").requests,
        3,
        "a timeout is no key fault"
    );
}

#[tokio::test]
async fn flaky_keys_keep_serving() {
    // Every call to a flaky key fails with 503 (no chance involved): Google's fault, no key's.
    let fake = fake_with(FakeConfig {
        flaky_rate: 1.0,
        ..FakeConfig::default()
    })
    .await;
    let gate = gate()
        .upstream(&fake, &["flaky-1", "flaky-2", "good-3"])
        .env("MAX_FAILURES", "1")
        .admin()
        .start()
        .await;
    succeed(&gate, "gemini-2.5-flash", 12).await;
    for key in ["flaky-1", "flaky-2"] {
        let stats = fake.state.key_stats(key);
        assert!(stats.requests >= 4, "{key} keeps its turns: {stats:?}");
    }
    let states: Vec<String> = key_states(&gate)
        .await
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    assert_eq!(
        states, ["active"; 3],
        "503s disable nothing, even at MAX_FAILURES=1"
    );
}

/// A 429 of a per-project quota cools every key of that project for that model, at once: the
/// same request's next attempt goes to another project.
#[tokio::test]
async fn a_per_project_quota_cools_the_whole_project() {
    let fake = fake().await;
    let toml = r#"
[keys]
api_keys = [
  { key = "minute-p1-a", project = "p1", tier = "free" },
  { key = "good-p1-b", project = "p1", tier = "free" },
  { key = "good-p2-c", project = "p2" },
]
"#;
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .toml(toml)
        .admin()
        .start()
        .await;
    // Until the minute key has been tried once (the fake's 429 names
    // GenerateRequestsPerMinutePerProjectPerModel).
    for _ in 0..6 {
        let (status, _, v) = post(&gate, GENERATE, &ask("hi")).await;
        assert_eq!(status, 200, "{v}");
        if fake.state.key_stats("minute-p1-a").requests > 0 {
            break;
        }
    }
    assert_eq!(fake.state.key_stats("minute-p1-a").requests, 1);
    let (_, v) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    let key = |secret: &str| {
        let id = gemgate::config::stable_id("k", secret);
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id.as_str())
            .unwrap()
            .clone()
    };
    let b = key("good-p1-b");
    assert_eq!(b["state"], "cooling", "{b}");
    assert_eq!(b["cooldowns"][0]["scope"], "project_model", "{b}");
    assert_eq!(b["cooldowns"][0]["model"], "gemini-2.5-flash");
    assert_eq!(
        (b["project"].as_str(), b["tier"].as_str()),
        (Some("p1"), Some("free"))
    );
    assert_eq!(key("good-p2-c")["state"], "active");
    // The cooldown is for that model alone; its calls go to project p2 alone.
    assert_eq!(b["cooldowns"].as_array().unwrap().len(), 1, "{b}");
    let before = fake.state.key_stats("good-p1-b").requests;
    for _ in 0..4 {
        let (status, _, v) = post(&gate, GENERATE, &ask("hi")).await;
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(fake.state.key_stats("good-p1-b").requests, before);
    assert_eq!(fake.state.key_stats("minute-p1-a").requests, 1);
}

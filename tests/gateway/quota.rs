//! Quota intelligence: proactive per-project limits, storms, and what plugins see of them,
//! against a fake upstream that keeps Google's per-project quota model.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gemgate_fake_upstream::{QuotaModel, QuotaProject};
use serde_json::{Value, json};

use crate::common::*;
use crate::metrics::scrape;

/// The fake's projects: each name with its keys and requests per minute.
fn quota_model(projects: &[(&str, &[&str], u64)]) -> QuotaModel {
    QuotaModel {
        projects: projects
            .iter()
            .map(|(name, keys, rpm)| {
                let p = QuotaProject {
                    keys: keys.iter().map(|k| k.to_string()).collect(),
                    rpm: Some(*rpm),
                    ..QuotaProject::default()
                };
                (name.to_string(), p)
            })
            .collect::<BTreeMap<_, _>>(),
        models: vec!["gemini-2.5-flash".into()],
        throttle: None,
    }
}

/// With the limits configured, gemgate sends no project over them: the client gets gemgate's
/// own 429 (in its protocol's shape, with `Retry-After`) and Google never answers one.
#[tokio::test]
async fn proactive_limits_keep_every_project_under_its_quota() {
    let fake = fake().await;
    fake.state
        .set_quota(quota_model(&[
            ("p1", &["a-1", "a-2"], 3),
            ("p2", &["b-1"], 3),
        ]))
        .unwrap();
    let toml = r#"
[keys]
api_keys = [
  { key = "a-1", project = "p1" },
  { key = "a-2", project = "p1" },
  { key = "b-1", project = "p2" },
]
[quota.limits."gemini-2.5-flash"]
rpm = 3
"#;
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .toml(toml)
        .admin()
        .start()
        .await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(post(&gate, GENERATE, &ask("hi")).await.0);
    }
    assert_eq!(statuses, vec![200; 6], "two projects of 3 a minute");
    let (status, headers, v) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("projects at their quota limits"),
        "{v}"
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((50..=61).contains(&retry), "Retry-After {retry}");
    // The OpenAI protocol gets its own shape.
    let resp = client()
        .post(gate.url("/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(&json!({ "model": "gemini-2.5-flash", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");
    // Google never had to refuse one; both projects were used to their limit.
    let stats = fake.state.quota_stats();
    assert_eq!(stats.limited, 0, "{stats:?}");
    assert_eq!(stats.projects["p1"].admitted, 3);
    assert_eq!(stats.projects["p2"].admitted, 3);
    // Another model has no limit.
    let pro = "/v1beta/models/gemini-2.5-pro:generateContent";
    assert_eq!(post(&gate, pro, &ask("hi")).await.0, 200);
    // No key is blamed: all are active.
    for (_, state) in key_states(&gate).await {
        assert_eq!(state, "active");
    }
}

/// A limit counts tokens too: a request larger than what is left of a project's tokens per
/// minute goes to a project with room.
#[tokio::test]
async fn token_limits_send_a_large_request_where_it_fits() {
    let fake = fake().await;
    let toml = r#"
[keys]
api_keys = [{ key = "a-1", project = "p1" }, { key = "b-1", project = "p2" }]
[quota.limits."gemini-2.5-flash"]
tpm = 3000
"#;
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .toml(toml)
        .start()
        .await;
    let big = ask(&"word ".repeat(2000)); // about 2,500 tokens by its size
    assert_eq!(post(&gate, GENERATE, &big).await.0, 200);
    assert_eq!(post(&gate, GENERATE, &big).await.0, 200);
    let (status, headers, v) = post(&gate, GENERATE, &big).await;
    assert_eq!(status, 429, "both projects are full: {v}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(fake.state.key_stats("a-1").requests, 1);
    assert_eq!(fake.state.key_stats("b-1").requests, 1);
    // Small requests: the answers' token counts replaced the estimates (2,000 words each),
    // so 1,000 tokens are left in each project.
    assert_eq!(post(&gate, GENERATE, &ask("hi")).await.0, 200);
}

/// Bare 429s from three projects at once are Google throttling gemgate: a global backoff with
/// one probe a second, no key cooled or disabled, normal service soon after it ends.
#[tokio::test]
async fn a_storm_backs_off_globally_and_blames_no_key() {
    let fake = fake().await;
    let keys = ["s-1", "s-2", "s-3", "s-4"];
    let gate = gate()
        .upstream(&fake, &keys)
        .env("MAX_RETRIES", "4")
        .env("MAX_FAILURES", "1")
        .admin()
        .start()
        .await;
    assert_eq!(post(&gate, GENERATE, &ask("hi")).await.0, 200);
    fake.state.set_throttle(true);
    let (status, headers, v) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(headers["retry-after"], "1");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("throttling"),
        "{v}"
    );
    assert_eq!(
        fake.state.quota_stats().throttled,
        3,
        "three projects, then the storm"
    );
    // During the storm: gemgate's own 429s, and at most one probe a second upstream.
    let started = Instant::now();
    let mut refused = 0;
    while started.elapsed() < Duration::from_millis(2_500) {
        let (status, headers, _) = post(&gate, GENERATE, &ask("hi")).await;
        assert_eq!(status, 429);
        assert!(headers.contains_key("retry-after"));
        refused += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused > 20);
    let probes = fake.state.quota_stats().throttled - 3;
    assert!((1..=4).contains(&probes), "{probes} probes in 2.5 s");
    for (_, state) in key_states(&gate).await {
        assert_eq!(state, "active", "no key is cooled or disabled by a storm");
    }
    let (_, v) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    assert_eq!(v["storm"]["active"], true, "{v}");
    for key in v["keys"].as_array().unwrap() {
        let c = key["cooldowns"].as_array().unwrap();
        assert_eq!(c.len(), 1, "{key}");
        assert_eq!(
            (c[0]["scope"].as_str(), c[0]["class"].as_str()),
            (Some("global"), Some("storm"))
        );
    }
    let (_, _, metrics) = scrape(&gate, Some(ADMIN), None).await;
    assert!(metrics.contains("gemgate_storm_active 1"), "{metrics}");
    assert!(metrics.contains("gemgate_storms_total 1"), "{metrics}");
    assert!(metrics.contains(r#"gemgate_rejected_requests_total{reason="storm"}"#));
    // The storm ends: service within three seconds.
    fake.state.set_throttle(false);
    let ended = Instant::now();
    loop {
        if post(&gate, GENERATE, &ask("hi")).await.0 == 200 {
            break;
        }
        assert!(ended.elapsed() < Duration::from_secs(3), "still refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, _, metrics) = scrape(&gate, Some(ADMIN), None).await;
    assert!(metrics.contains("gemgate_storm_active 0"), "{metrics}");
}

/// Three keys that answer bare 429s on their own look like a storm, but cannot keep one going:
/// the probes try the other keys first, and the first good answer ends it.
#[tokio::test]
async fn keys_broken_on_their_own_cannot_keep_a_storm_going() {
    let fake = fake().await;
    let keys = ["bare429-1", "bare429-2", "bare429-3", "good-4"];
    let gate = gate()
        .upstream(&fake, &keys)
        .env("MAX_RETRIES", "3")
        .start()
        .await;
    let (status, _, _) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 429, "three projects' bare 429s: a storm");
    let started = Instant::now();
    loop {
        if post(&gate, GENERATE, &ask("hi")).await.0 == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the storm never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fake.state.key_stats("good-4").requests,
        1,
        "the first probe"
    );
    for k in &keys[..3] {
        assert_eq!(
            fake.state.key_stats(k).requests,
            1,
            "{k} was not probed again"
        );
    }
}

/// Bare 429s of one project alone are that key's: it cools as before, and no storm begins.
#[tokio::test]
async fn bare_429s_of_one_project_are_no_storm() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["bare429-1", "good-2"])
        .start()
        .await;
    for _ in 0..3 {
        assert_eq!(post(&gate, GENERATE, &ask("hi")).await.0, 200);
    }
    assert_eq!(fake.state.key_stats("bare429-1").requests, 1, "cooled");
}

/// `select_key` sees each key's project, tier, headroom, whether it is at its limit and its
/// cooldown's scope; the shipped `least_loaded` plugin schedules by headroom.
#[tokio::test]
async fn plugins_see_projects_tiers_and_headroom() {
    let fake = fake().await;
    let toml = r#"
[keys]
api_keys = [
  { key = "a-1", project = "p1", tier = "free" },
  { key = "b-1", project = "p2" },
]
[quota.limits."gemini-2.5-flash"]
rpm = 4
[plugins.least_loaded]
enabled = true
"#;
    let probe = r#"
return {
  name = "probe",
  priority = 100,
  select_key = function(pool)
    local seen = {}
    for i = 1, #pool do
      local k = pool[i]
      seen[#seen + 1] = string.format("%s/%s/%s/%.2f/%s/%s", k.project, tostring(k.tier),
        k.id, k.headroom, tostring(k.at_limit), tostring(k.cooldown_scope))
    end
    error("seen " .. table.concat(seen, " "))
  end,
}
"#;
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .toml(toml)
        .shipped_plugins()
        .plugin("probe", probe)
        .start()
        .await;
    for _ in 0..5 {
        assert_eq!(post(&gate, GENERATE, &ask("hi")).await.0, 200);
    }
    // least_loaded (after the probe fails) spread them by headroom: 2 and 3.
    let (a, b) = (
        fake.state.key_stats("a-1").requests,
        fake.state.key_stats("b-1").requests,
    );
    assert_eq!((a.min(b), a + b), (2, 5));
    let a = gemgate::config::stable_id("k", "a-1");
    let logs = gate.wait_log(&format!("p1/free/{a}/0.50/false/nil")).await;
    let b = gemgate::config::stable_id("k", "b-1");
    assert!(logs.contains(&format!("/nil/{b}/")), "{logs}");
}

//! The official Python SDKs against gemgate: `openai` (tests/sdk/openai_client.py) and
//! Google's `google-genai` (tests/sdk/genai_client.py).
//!
//! `scripts/test.sh` installs both into a virtual environment and names its interpreter in
//! `GEMGATE_SDK_PYTHON`; without it a bare `cargo test` says so and skips them, and under
//! `CI=true` they fail (see [`needed_env`]).

use crate::common::*;

/// Runs `script` against a fresh gemgate; returns its report, or `None` when skipped.
async fn run_sdk_script(script: &str) -> Option<String> {
    run_sdk(script).await.map(|(.., report)| report)
}

#[tokio::test]
async fn the_openai_python_sdk_works_end_to_end() {
    if let Some(report) = run_sdk_script("openai_client.py").await {
        assert!(report.contains("ok   google's openai api"), "{report}");
    }
}

#[tokio::test]
async fn the_google_genai_sdk_works_end_to_end() {
    if let Some(report) = run_sdk_script("genai_client.py").await {
        assert!(report.contains("ok   wrong token"), "{report}");
    }
}

/// Cached contents with the `google-genai` SDK, on keys of three projects behind round robin:
/// the cache is made on one key, and every later call about it — twelve generations naming
/// it, four lookups, an update, the deletion — goes with that key alone (the fake answers 403
/// for a cache of another project); another client gets 404 and sees none.
#[tokio::test]
async fn cached_contents_stay_on_the_key_that_made_them() {
    let Some(python) = needed_env("GEMGATE_SDK_PYTHON") else {
        return;
    };
    let fake = fake().await;
    let keys = ["cache-1", "cache-2", "cache-3"];
    let projects = keys.iter().enumerate().map(|(i, k)| {
        let p = gemgate_fake_upstream::QuotaProject {
            keys: vec![k.to_string()],
            ..Default::default()
        };
        (format!("p{i}"), p)
    });
    fake.state
        .set_quota(gemgate_fake_upstream::QuotaModel {
            projects: projects.collect(),
            ..Default::default()
        })
        .unwrap();
    let gate = gate()
        .upstream(&fake, &keys)
        .env(
            "ALLOWED_TOKENS",
            &format!(r#"["{TOKEN}", "sk-other-client"]"#),
        )
        .shipped_plugins()
        .start()
        .await;
    let url = gate.url("");
    let env = [
        ("GEMGATE_URL", url.as_str()),
        ("GEMGATE_TOKEN", TOKEN),
        ("GEMGATE_OTHER_TOKEN", "sk-other-client"),
    ];
    let report = run_python(&python, "sdk/genai_caches.py", &env, &gate).await;
    assert!(report.contains("ok   deleted"), "{report}");
    // One key made the cache and served every call about it; the others served none.
    let used: Vec<(&str, u64)> = keys
        .iter()
        .map(|k| (*k, fake.state.key_stats(k).requests))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(used.len(), 1, "{used:?}: {report}");
    assert!(used[0].1 >= 19, "{used:?}");
}

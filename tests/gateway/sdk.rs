//! The official Python SDKs against gemgate: `openai` (tests/sdk/openai_client.py) and
//! Google's `google-genai` (tests/sdk/genai_client.py).
//!
//! `scripts/test.sh` installs both into a virtual environment and names its interpreter in
//! `GEMGATE_SDK_PYTHON`; without it a bare `cargo test` says so and skips them, and under
//! `CI=true` they fail (see [`needed_env`]).

use crate::common::*;

/// Runs `script` against a fresh gemgate; returns its report, or `None` when skipped.
async fn run_sdk_script(script: &str) -> Option<String> {
    let python = needed_env("GEMGATE_SDK_PYTHON")?;
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1", "good-2"]).start().await;
    let url = gate.url("");
    let env = [("GEMGATE_URL", url.as_str()), ("GEMGATE_TOKEN", TOKEN)];
    let report = run_python(&python, &format!("sdk/{script}"), &env, &gate).await;
    Some(report)
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

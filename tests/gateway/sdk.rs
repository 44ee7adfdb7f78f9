//! The official Python SDKs against gemgate: `openai` (tests/sdk/openai_client.py) and
//! Google's `google-genai` (tests/sdk/genai_client.py).
//!
//! `scripts/test.sh` installs both into a virtual environment and names its interpreter in
//! `GEMGATE_SDK_PYTHON`; without it (a bare `cargo test`), these tests say so and pass.

use crate::common::*;

/// Runs `script` against a fresh gemgate; returns its report, or `None` when skipped.
async fn run_sdk_script(script: &str) -> Option<String> {
    let Ok(python) = std::env::var("GEMGATE_SDK_PYTHON") else {
        eprintln!("skipped: GEMGATE_SDK_PYTHON is not set (scripts/test.sh sets it)");
        return None;
    };
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1", "good-2"]).start().await;
    let path = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(python)
        .arg(path)
        .env("GEMGATE_URL", gate.url(""))
        .env("GEMGATE_TOKEN", TOKEN)
        .output()
        .await
        .expect("run the SDK script");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}\ngemgate:\n{}", gate.logs());
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

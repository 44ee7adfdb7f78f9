//! The official `openai` Python SDK against gemgate (tests/sdk/openai_client.py).
//!
//! `scripts/test.sh` installs the SDK into a virtual environment and names its interpreter in
//! `GEMGATE_SDK_PYTHON`; without it (a bare `cargo test`), this test says so and passes.

use crate::common::*;

#[tokio::test]
async fn the_openai_python_sdk_works_end_to_end() {
    let Ok(python) = std::env::var("GEMGATE_SDK_PYTHON") else {
        eprintln!("skipped: GEMGATE_SDK_PYTHON is not set (scripts/test.sh sets it)");
        return;
    };
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1", "good-2"]).start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_client.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
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
    assert!(report.contains("ok   google's openai api"), "{report}");
}

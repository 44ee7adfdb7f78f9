//! The admin page in headless Chromium (tests/browser/admin.py, Playwright): log in, import two
//! keys by pasting text, see them masked, disable one, change a setting and see it applied,
//! edit a plugin (a failed check, then a save) and dry-run a request.
//!
//! `scripts/test.sh` installs Chromium and Playwright and names the interpreter in
//! `GEMGATE_BROWSER_PYTHON`; without it a bare `cargo test` says so and skips it, and under
//! `CI=true` it fails (see [`needed_env`]).
//! The screenshots are kept in `target/browser-shots/`.

use crate::common::*;

#[tokio::test]
async fn an_operator_runs_the_gateway_from_the_admin_page_in_a_real_browser() {
    let Some(python) = needed_env("GEMGATE_BROWSER_PYTHON") else {
        return;
    };
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &[])
        .without_env("API_KEYS")
        .admin()
        .toml("[keys]\napi_keys = []\n")
        .shipped_plugins()
        .start()
        .await;
    let shots = format!("{}/target/browser-shots", env!("CARGO_MANIFEST_DIR"));
    let url = gate.url("");
    let env = [
        ("GEMGATE_URL", url.as_str()),
        ("GEMGATE_ADMIN_TOKEN", ADMIN),
        ("GEMGATE_SHOTS", shots.as_str()),
    ];
    let report = run_python(&python, "browser/admin.py", &env, &gate).await;
    assert!(report.contains("browser test passed"), "{report}");

    // What the browser did is what the gateway now is.
    let (_, keys) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    assert_eq!(keys["total"], 2, "{keys}");
    assert_eq!(keys["counts"]["disabled"], 1, "{keys}");
    let config = std::fs::read_to_string(gate.config_path()).unwrap();
    assert!(config.contains("max_failures = 7"), "{config}");
    let plugin = std::fs::read_to_string(gate.dir.path().join("plugins/round_robin.lua")).unwrap();
    assert!(plugin.contains("-- edited in the browser"), "{plugin}");
    for shot in [
        "01-login",
        "08-plugin-check-failed",
        "09-plugin-saved",
        "10-dry-run",
        "03-keys-imported",
        "04-key-disabled",
        "06-settings-saved",
    ] {
        let png = std::fs::read(format!("{shots}/{shot}.png")).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{shot}");
    }
}

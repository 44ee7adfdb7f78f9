//! Start-up, configuration and the `check` command.

use std::process::Command;

use crate::common::*;

#[tokio::test]
async fn starts_with_no_keys_and_says_so() {
    let gate = gate().without_env("ALLOWED_TOKENS").start().await;
    let resp = client().get(gate.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (status, _, body) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 503);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no Gemini API key is configured"),
        "{message}"
    );
    assert_eq!(body["error"]["status"], "UNAVAILABLE");
}

#[tokio::test]
async fn shipped_config_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_gemgate"))
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/conf/gemgate.toml"),
        ])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
}

#[tokio::test]
async fn check_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("[upstream]\nmax_retries = \"three\"\n", &[], "max_retries"),
        ("[upstream]\nmax_retrys = 3\n", &[], "max_retrys"),
        ("[server]\nlisten = \"localhost\"\n", &[], "server.listen"),
        ("", &[("BASE_URL", "ftp://example.com")], "BASE_URL"),
        ("", &[("MAX_FAILURES", "lots")], "MAX_FAILURES"),
        (
            "",
            &[("MODEL_ALIASES", r#"{"gpt 4o": "gemini-2.5-flash"}"#)],
            "models.aliases",
        ),
    ];
    for (text, env, field) in cases {
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_gemgate"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .current_dir(dir.path())
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text:?} {env:?} was accepted");
        assert!(
            stderr.contains(field),
            "error for {text:?} {env:?} does not name {field}: {stderr}"
        );
    }
}

#[tokio::test]
async fn settings_come_from_env_then_dotenv_then_file() {
    let fake = fake().await;
    // The file says one thing, .env another, the environment wins over both.
    let gate = gate()
        .without_env("ALLOWED_TOKENS")
        .toml("[auth]\nallowed_tokens = [\"sk-file\"]\n[upstream]\nmax_retries = 1\n")
        .dotenv(&format!(
            "API_KEYS=good-1,good-2\nBASE_URL={}\nALLOWED_TOKENS=[\"sk-dotenv\"]\nMAX_RETRIES=1\n",
            fake.base_url()
        ))
        .env("ALLOWED_TOKENS", "sk-env")
        .start()
        .await;
    let call = |token: &'static str| {
        let url = gate.url(GENERATE);
        async move {
            client()
                .post(url)
                .header("x-goog-api-key", token)
                .json(&ask("hi"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(call("sk-env").await, 200, "{}", gate.logs());
    assert_eq!(call("sk-dotenv").await, 401);
    assert_eq!(call("sk-file").await, 401);
    // API_KEYS from .env (comma-separated) reached the pool.
    assert_eq!(
        fake.state.key_stats("good-1").requests + fake.state.key_stats("good-2").requests,
        1
    );
}

#[tokio::test]
async fn a_busy_listen_address_fails_fast_and_says_so() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_gemgate"))
        .env_clear()
        .env("GEMGATE_LISTEN", &addr)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cannot listen on") && text.contains(&addr),
        "{text}"
    );
}

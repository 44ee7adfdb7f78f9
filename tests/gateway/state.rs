//! Key health survives restarts, crashes included (redb under GEMGATE_DATA_DIR).

use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn disabled_and_cooling_keys_stay_out_after_a_restart() {
    let fake = fake().await;
    let mut gate = gate()
        .upstream(&fake, &["invalid-1", "minute-2", "good-3"])
        .env("MAX_FAILURES", "1")
        .start()
        .await;
    assert_eq!(post(&gate, GENERATE, &ask("x")).await.0, 200);
    assert_eq!(
        fake.state.total_requests(),
        3,
        "invalid-1, minute-2, then good-3"
    );

    gate.restart("TERM").await;
    fake.state.reset();
    for _ in 0..3 {
        assert_eq!(post(&gate, GENERATE, &ask("x")).await.0, 200);
    }
    assert_eq!(
        fake.state.requests_by_key().keys().collect::<Vec<_>>(),
        ["good-3"],
        "the disabled key and the cooling key were not tried:\n{}",
        gate.logs()
    );
    assert!(
        gate.logs().contains("key state restored keys=2"),
        "{}",
        gate.logs()
    );
    // The cooldown is per model: another model may use minute-2 at once.
    post(
        &gate,
        "/v1beta/models/gemini-2.5-pro:generateContent",
        &ask("x"),
    )
    .await;
    assert_eq!(fake.state.key_stats("minute-2").requests, 1);
}

#[tokio::test]
async fn a_crash_loses_at_most_the_last_second() {
    let fake = fake().await;
    let mut gate = gate()
        .upstream(&fake, &["invalid-1", "good-2"])
        .env("MAX_FAILURES", "1")
        .admin()
        .start()
        .await;
    assert_eq!(post(&gate, GENERATE, &ask("x")).await.0, 200);
    // Let the flusher commit, then crash with traffic in flight.
    wait_logged(&gate, 1).await;
    let url = gate.url(GENERATE);
    let load = tokio::spawn(async move {
        for _ in 0..200 {
            let _ = client()
                .post(&url)
                .header("x-goog-api-key", TOKEN)
                .json(&ask("load"))
                .send()
                .await;
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.restart("KILL").await;
    load.abort();
    fake.state.reset();
    for _ in 0..3 {
        assert_eq!(post(&gate, GENERATE, &ask("x")).await.0, 200);
    }
    assert_eq!(
        fake.state.key_stats("invalid-1").requests,
        0,
        "still disabled after kill -9:\n{}",
        gate.logs()
    );
}

/// Kept Responses API answers wait in memory for the next flush: one kept just before a
/// restart is written on the way out, and one kept a flush before a `kill -9` survives it.
#[tokio::test]
async fn kept_responses_survive_a_restart_and_a_crash_after_a_flush() {
    async fn keep(gate: &Gate, text: &str) -> String {
        let body = serde_json::json!({ "model": "gemini-2.5-flash", "input": text });
        let (status, _, v) = post(gate, "/v1/responses", &body).await;
        assert_eq!(status, 200, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }
    /// Asserts that response `id` is kept, with the answer to `text`.
    async fn expect_kept(gate: &Gate, id: &str, text: &str) {
        let (status, v) = get(gate, &format!("/v1/responses/{id}")).await;
        assert_eq!(
            (status, &v["output"][0]["content"][0]["text"]),
            (200, &serde_json::json!(format!("echo: {text}"))),
            "{}",
            gate.logs()
        );
    }
    let fake = fake().await;
    let mut gate = gate().upstream(&fake, &["good-1"]).start().await;
    let before_term = keep(&gate, "kept before a restart").await;
    // Readable at once, before any flush.
    expect_kept(&gate, &before_term, "kept before a restart").await;
    gate.restart("TERM").await;
    expect_kept(&gate, &before_term, "kept before a restart").await;
    let before_kill = keep(&gate, "kept before a crash").await;
    // Four flushes a second: a second later it is on the disk.
    tokio::time::sleep(Duration::from_secs(1)).await;
    gate.restart("KILL").await;
    expect_kept(&gate, &before_kill, "kept before a crash").await;
}

#[tokio::test]
async fn a_data_file_from_a_newer_gemgate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = gemgate::store::Store::open(dir.path(), 1 << 30).unwrap();
        drop(store);
        let db = redb::Database::open(dir.path().join("gemgate.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut meta = tx
                .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
                .unwrap();
            meta.insert("schema_version", 999).unwrap();
        }
        tx.commit().unwrap();
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gemgate"))
        .current_dir(dir.path())
        .env_clear()
        .env("GEMGATE_LISTEN", free_addr().to_string())
        .env("GEMGATE_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("newer gemgate"), "{text}");
}

#[tokio::test]
async fn disabled_keys_are_probed_and_return_when_healthy() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["invalid-1", "good-2"])
        .env("MAX_FAILURES", "1")
        // About a second between checks.
        .env("CHECK_INTERVAL_HOURS", "0.0003")
        .env("TEST_MODEL", "gemini-2.5-flash")
        .start()
        .await;
    assert_eq!(post(&gate, GENERATE, &ask("x")).await.0, 200);
    let logs = gate.wait_log("check: key still failing").await;
    assert!(logs.contains("class=key_invalid"), "{logs}");

    // The key is fixed (say, billing was restored): the next check brings it back.
    fake.state.set_behaviour("invalid-1", Behaviour::Valid);
    gate.wait_log("back in the pool").await;
    fake.state.reset();
    for _ in 0..2 {
        post(&gate, GENERATE, &ask("x")).await;
    }
    assert!(fake.state.key_stats("invalid-1").requests >= 1);
    // Probes are not client traffic: no access log line for them (lines are written in the
    // background: give them a moment).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let access_lines = gate
        .logs()
        .lines()
        .filter(|l| l.contains("gemgate::access"))
        .count();
    assert_eq!(access_lines, 3, "{}", gate.logs());
}

/// `/health` is liveness and `/ready` readiness: an instance without a key that could serve
/// is alive but not ready, and becomes ready again when a key returns.
#[tokio::test]
async fn readiness_follows_the_usable_keys_while_liveness_stays() {
    let fake = fake().await;
    let no_keys = gate().start().await;
    assert_eq!(get(&no_keys, "/health").await.0, 200);
    let (status, v) = get(&no_keys, "/ready").await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["why"], "no Gemini API key is configured");

    let gate = gate()
        .upstream(&fake, &["invalid-1"])
        .env("MAX_FAILURES", "1")
        .admin()
        .start()
        .await;
    let (status, v) = get(&gate, "/ready").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({ "ready": true, "keys": 1, "usable": 1 }));
    // Google calls the key invalid: it is disabled, and the instance is no longer ready.
    assert_ne!(post(&gate, GENERATE, &ask("hi")).await.0, 200);
    let (status, v) = get(&gate, "/ready").await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["why"], "every Gemini API key is disabled");
    assert_eq!(v["usable"], 0);
    assert_eq!(get(&gate, "/health").await.0, 200, "still alive");
    // The operator enables it again: ready.
    let (id, state) = key_states(&gate).await.remove(0);
    assert_eq!(state, "disabled");
    let (status, _) = admin(
        reqwest::Method::POST,
        &gate,
        &format!("/admin/api/keys/{id}/enable"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(get(&gate, "/ready").await.0, 200);
}

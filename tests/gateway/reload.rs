//! Hot reload: config and plugin changes apply live, broken files change nothing, requests
//! keep their generation, key state survives.

use std::time::{Duration, Instant};

use crate::common::*;

fn keys_toml(keys: &[&str]) -> String {
    format!(
        "[keys]\napi_keys = {}\n",
        serde_json::to_string(keys).unwrap()
    )
}

#[tokio::test]
async fn a_saved_config_applies_within_a_second() {
    let fake = fake().await;
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .toml(&keys_toml(&["good-1"]))
        .admin()
        .start()
        .await;
    let status = gate.reload_status().await;
    assert_eq!(status["generation"], 1);
    assert!(
        status["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "round_robin" && p["file"] == "built-in:round_robin.lua")
    );
    let pro = "/v1beta/models/gemini-2.5-pro:generateContent";
    assert_eq!(post(&gate, pro, &ask("x")).await.0, 200);

    let saved = Instant::now();
    gate.save(
        "gemgate.toml",
        &format!(
            "{}[models]\nfiltered = [\"gemini-2.5-pro\"]\n",
            keys_toml(&["good-1", "good-2"])
        ),
    );
    // Poll the effect itself, not the admin API.
    loop {
        let (status, _, _) = post(&gate, pro, &ask("x")).await;
        if status == 404 {
            break;
        }
        assert!(
            saved.elapsed() < Duration::from_secs(1),
            "not applied within 1 s:\n{}",
            gate.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = gate.reload_status().await;
    assert_eq!(status["generation"], 2, "{status}");
    assert_eq!(status["reload"]["last_result"], "ok");
    // The added key joined the pool.
    fake.state.reset();
    for _ in 0..4 {
        post(&gate, GENERATE, &ask("x")).await;
    }
    assert_eq!(fake.state.key_stats("good-2").requests, 2);
}

#[tokio::test]
async fn a_broken_file_changes_nothing_and_says_where() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .admin()
        .plugin(
            "deny_pro",
            "return { name = 'deny_pro', on_request = function(req) if req.model == 'gemini-2.5-pro' then return gemgate.deny(403, 'no pro') end end }",
        )
        .start()
        .await;
    let pro = "/v1beta/models/gemini-2.5-pro:generateContent";
    assert_eq!(post(&gate, pro, &ask("x")).await.0, 403);

    // A syntax error.
    let before = gate.reload_status().await;
    gate.save(
        "plugins/deny_pro.lua",
        "return {\n  name = 'deny_pro',\n  on_request = function(req) if then end,\n}\n",
    );
    let status = gate.wait_reloads(&before).await;
    assert_eq!(status["generation"], 1, "{status}");
    assert_eq!(status["reload"]["last_result"], "error");
    let error = &status["reload"]["last_error"];
    assert!(
        error["file"]
            .as_str()
            .unwrap()
            .ends_with("plugins/deny_pro.lua"),
        "{error}"
    );
    assert_eq!(error["line"], 3, "{error}");
    assert_eq!(
        post(&gate, pro, &ask("x")).await.0,
        403,
        "the old plugin serves on"
    );

    // An init that fails.
    let before = gate.reload_status().await;
    gate.save(
        "plugins/deny_pro.lua",
        "return {\n  name = 'deny_pro',\n  init = function(conf)\n    error('needs a list')\n  end,\n}\n",
    );
    let status = gate.wait_reloads(&before).await;
    assert_eq!(status["reload"]["last_result"], "error");
    assert_eq!(status["reload"]["last_error"]["line"], 4, "{status}");
    assert!(
        status["reload"]["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs a list")
    );

    // An invalid config.
    let before = gate.reload_status().await;
    gate.save("gemgate.toml", "[upstream]\nmax_retries = 0\n");
    let status = gate.wait_reloads(&before).await;
    assert_eq!(status["reload"]["last_result"], "error");
    assert!(
        status["reload"]["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("upstream.max_retries")
    );
    assert_eq!(post(&gate, pro, &ask("x")).await.0, 403);
    assert!(gate.logs().contains("reload rejected"));

    // Fixed: the next save applies.
    let before = gate.reload_status().await;
    gate.save("gemgate.toml", "");
    gate.save(
        "plugins/deny_pro.lua",
        "return { name = 'deny_pro', on_request = function(req) if req.model == 'gemini-2.5-pro' then return gemgate.deny(418, 'teapot') end end }",
    );
    let status = gate.wait_reloads(&before).await;
    let status = if status["reload"]["last_result"] == "ok"
        && status["plugins"].to_string().contains("deny_pro")
    {
        status
    } else {
        gate.wait_reloads(&status).await
    };
    assert_eq!(status["reload"]["last_result"], "ok", "{status}");
    assert_eq!(post(&gate, pro, &ask("x")).await.0, 418);
}

#[tokio::test]
async fn a_stream_in_flight_finishes_on_the_generation_it_started_with() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .admin()
        .plugin("a", "return { name = 'a' }")
        .start()
        .await;
    let before = fake.state.total_requests();
    let url = gate.url("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse");
    let stream = tokio::spawn(async move {
        let resp = client()
            .post(url)
            .header("x-goog-api-key", TOKEN)
            .header("x-fake-hold", "reload-test")
            .header("x-fake-chunks", "4")
            .json(&ask("one two three four"))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    });
    while fake.state.total_requests() == before {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = gate.reload_status().await;
    gate.save(
        "plugins/a.lua",
        "return { name = 'a', on_request = function() return gemgate.deny(503, 'closed') end }",
    );
    gate.save("gemgate.toml", "[upstream]\nmax_retries = 2\n");
    gate.wait_reloads(&status).await;
    assert_eq!(
        post(&gate, GENERATE, &ask("x")).await.0,
        503,
        "new requests: new plugins"
    );
    fake.state.release("reload-test");
    let (status, text) = stream.await.unwrap();
    assert_eq!(status, 200);
    let events = text.matches("data: ").count();
    assert_eq!(events, 4, "{text}");
    assert!(!text.contains("error"), "{text}");
}

#[tokio::test]
async fn key_state_survives_reloads_and_restart_settings_are_reported() {
    let fake = fake().await;
    let toml = |extra: &str| {
        format!(
            "{}[keys]\napi_keys = [\"invalid-1\", \"minute-2\", \"good-3\"]\nmax_failures = 1\n",
            extra
        )
    };
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .toml(&toml(""))
        .admin()
        .start()
        .await;
    assert_eq!(post(&gate, GENERATE, &ask("x")).await.0, 200);
    assert_eq!(fake.state.total_requests(), 3);

    let before = gate.reload_status().await;
    gate.save("gemgate.toml", &toml("[server]\ngrace_period_s = 5\n"));
    let status = gate.wait_reloads(&before).await;
    assert_eq!(status["reload"]["last_result"], "ok");
    assert!(
        status["reload"]["restart_needed"]
            .to_string()
            .contains("server.grace_period_s")
    );
    // The disabled and the cooling key stay out.
    fake.state.reset();
    for _ in 0..3 {
        assert_eq!(post(&gate, GENERATE, &ask("x")).await.0, 200);
    }
    assert_eq!(fake.state.key_stats("good-3").requests, 3);
    assert_eq!(fake.state.total_requests(), 3);
}

#[tokio::test]
async fn the_admin_reload_api_needs_the_admin_token() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).admin().start().await;
    for token in [None, Some(TOKEN), Some("wrong")] {
        let mut req = client().get(gate.url("/admin/api/reload"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{token:?}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["status"], "UNAUTHENTICATED");
    }
    let resp = client()
        .post(gate.url("/admin/api/reload"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["generation"], 2, "{v}");

    let off = crate::common::gate()
        .upstream(&fake, &["good-1"])
        .start()
        .await;
    let resp = client()
        .get(off.url("/admin/api/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "no AUTH_TOKEN: the admin API is off");
}

#[tokio::test]
async fn templates_reload_like_plugins() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).admin().start().await;
    let status = gate.reload_status().await;
    let file_of = |status: &Value, name: &str| -> String {
        status["templates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["file"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(file_of(&status, "keys"), "built-in:keys.hbs", "{status}");

    // A templates folder appears beside the config: it is noticed, then watched; a page it
    // holds replaces the built-in one, the others stay built in.
    std::fs::create_dir(gate.dir.path().join("templates")).unwrap();
    let status = gate.wait_reloads(&status).await;
    gate.save("templates/keys.hbs", "<h1>{{title}}</h1>\n");
    let status = gate.wait_reloads(&status).await;
    assert!(
        file_of(&status, "keys").ends_with("templates/keys.hbs"),
        "{status}"
    );
    assert_eq!(
        file_of(&status, "layout"),
        "built-in:layout.hbs",
        "{status}"
    );

    gate.save(
        "templates/keys.hbs",
        "<h1>{{title}}</h1>\n{{#if x}}\nunclosed\n",
    );
    let status = gate.wait_reloads(&status).await;
    assert_eq!(status["reload"]["last_result"], "error", "{status}");
    let error = &status["reload"]["last_error"];
    assert!(
        error["file"]
            .as_str()
            .unwrap()
            .ends_with("templates/keys.hbs"),
        "{error}"
    );
    assert!(error["line"].as_u64().is_some(), "{error}");
    assert_eq!(status["generation"], 3, "unchanged");
    assert_eq!(post(&gate, GENERATE, &ask("x")).await.0, 200);
}

/// A Kubernetes ConfigMap volume: `gemgate.toml` is a link to `..data/gemgate.toml`, and an
/// update points `..data` at a new folder (a new link renamed over it); no event names the
/// config file itself.
#[cfg(unix)]
#[tokio::test]
async fn a_config_map_update_is_a_reload() {
    use std::os::unix::fs::symlink;
    let fake = fake().await;
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .toml(&keys_toml(&["good-1"]))
        .admin()
        .start()
        .await;
    let dir = gate.dir.path();
    let mount = |version: &str, keys: &[&str]| {
        let folder = dir.join(format!("..{version}"));
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("gemgate.toml"), keys_toml(keys)).unwrap();
        symlink(format!("..{version}"), dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    };
    mount("2026_12_04_1", &["good-1"]);
    symlink("..data/gemgate.toml", dir.join("gemgate.toml.link")).unwrap();
    std::fs::rename(dir.join("gemgate.toml.link"), dir.join("gemgate.toml")).unwrap();
    // Let the reloads of this set-up pass.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(key_states(&gate).await.len(), 1);

    mount("2026_12_04_2", &["good-1", "good-2"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while key_states(&gate).await.len() != 2 {
        assert!(Instant::now() < deadline, "no reload:\n{}", gate.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gate.reload_status().await["reload"]["last_result"], "ok");
}

//! Lua policy plugins: the hooks, the shipped plugins, the sandbox and failures.

use crate::common::*;

/// The body the fake upstream last received, as JSON.
fn last_body(fake: &FakeUpstream) -> Value {
    serde_json::from_slice(&fake.state.last_received().unwrap().body).unwrap()
}

fn last_path(fake: &FakeUpstream) -> String {
    fake.state.last_received().unwrap().path
}

#[tokio::test]
async fn hooks_deny_rewrite_and_choose_the_key() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "good-2", "good-3"])
        .plugin(
            "policy",
            r#"
return {
  name = "policy",
  priority = 10,
  on_request = function(req, ctx)
    if req.model == "forbidden" then return gemgate.deny(451, "not for " .. req.client) end
    if req.model == "alias" then
      ctx.shared.aliased = true
      return gemgate.rewrite {
        model = "gemini-2.5-flash",
        headers = { ["x-team"] = req.headers["x-client-team"] or "none" },
      }
    end
  end,
  select_key = function(pool, ctx)
    -- the last usable key, and only for aliased requests
    if ctx.shared.aliased then return pool[#pool].id end
  end,
}
"#,
        )
        .start()
        .await;
    let (status, _, v) = post(&gate, "/v1beta/models/forbidden:generateContent", &ask("x")).await;
    assert_eq!(status, 451);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("not for token-"),
        "{v}"
    );
    assert_eq!(fake.state.total_requests(), 0);

    let resp = client()
        .post(gate.url("/v1beta/models/alias:generateContent"))
        .header("x-goog-api-key", TOKEN)
        .header("x-client-team", "blue")
        .json(&ask("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = fake.state.last_received().unwrap();
    assert_eq!(seen.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(seen.key.as_deref(), Some("good-3"));
    assert!(
        seen.headers
            .iter()
            .any(|(k, v)| k == "x-team" && v == "blue")
    );
    // No select_key answer: the built-in choice, the first usable key.
    post(&gate, GENERATE, &ask("x")).await;
    assert_eq!(
        fake.state.last_received().unwrap().key.as_deref(),
        Some("good-1")
    );
}

#[tokio::test]
async fn plugins_run_only_for_the_models_they_name() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "good-2", "good-3"])
        .plugin(
            "pro_policy",
            r#"
local plugin = {
  name = "pro_policy",
  models = { "gemini-2.5-pro*" },
  on_request = function(req, ctx)
    if req.model:find("preview") then return gemgate.deny(403, "no previews of " .. req.model) end
  end,
  select_key = function(pool, ctx) return pool[#pool].id end,
}
return plugin
"#,
        )
        .plugin(
            "from_settings",
            r#"
local plugin = { name = "from_settings" }
function plugin.init(conf) plugin.models = conf.models end
function plugin.on_request(req, ctx) return gemgate.deny(402, "blocked by settings") end
return plugin
"#,
        )
        .toml("[plugins.from_settings]\nmodels = [\"gemini-2.0-*\"]\n")
        .admin()
        .start()
        .await;
    let call = |model: &str| format!("/v1beta/models/{model}:generateContent");
    // Not named by either plugin: the built-in choice, the first usable key.
    assert_eq!(
        post(&gate, &call("gemini-2.5-flash"), &ask("x")).await.0,
        200
    );
    assert_eq!(
        fake.state.last_received().unwrap().key.as_deref(),
        Some("good-1")
    );
    // Named by pro_policy: its select_key picks the last key.
    assert_eq!(post(&gate, &call("gemini-2.5-pro"), &ask("x")).await.0, 200);
    assert_eq!(
        fake.state.last_received().unwrap().key.as_deref(),
        Some("good-3")
    );
    let (status, _, v) = post(&gate, &call("gemini-2.5-pro-preview"), &ask("x")).await;
    assert_eq!(status, 403, "{v}");
    // `init` named the models from the plugin's settings.
    let (status, _, v) = post(&gate, &call("gemini-2.0-flash"), &ask("x")).await;
    assert_eq!(status, 402, "{v}");
    let status = gate.reload_status().await;
    let plugins = status["plugins"].as_array().unwrap();
    let named = |name: &str| plugins.iter().find(|p| p["name"] == name).unwrap()["models"].clone();
    assert_eq!(named("pro_policy"), serde_json::json!(["gemini-2.5-pro*"]));
    assert_eq!(named("from_settings"), serde_json::json!(["gemini-2.0-*"]));
}

#[tokio::test]
async fn the_shipped_suffix_and_thinking_plugins_rewrite_requests() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("SEARCH_MODELS", r#"["gemini-2.5-flash"]"#)
        .env("IMAGE_MODELS", r#"["gemini-2.0-flash-exp"]"#)
        .env("THINKING_BUDGET_MAP", r#"{"gemini-2.5-pro": 1024}"#)
        .start()
        .await;
    let (status, _, _) = post(
        &gate,
        "/v1beta/models/gemini-2.5-flash-search:generateContent",
        &ask("news"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        last_path(&fake),
        "/v1beta/models/gemini-2.5-flash:generateContent"
    );
    let body = last_body(&fake);
    assert_eq!(body["tools"], json!([{ "googleSearch": {} }]));
    assert_eq!(
        body["contents"],
        ask("news")["contents"],
        "the rest is kept"
    );

    post(
        &gate,
        "/v1beta/models/gemini-2.0-flash-exp-image:generateContent",
        &ask("draw"),
    )
    .await;
    assert_eq!(
        last_body(&fake)["generationConfig"]["responseModalities"],
        json!(["Text", "Image"])
    );

    let mut own = ask("think");
    own["generationConfig"] =
        json!({ "temperature": 0.5, "thinkingConfig": { "includeThoughts": true } });
    let resp = client()
        .post(gate.url("/v1beta/models/gemini-2.5-pro-non-thinking:streamGenerateContent?alt=sse"))
        .header("x-goog-api-key", TOKEN)
        .json(&own)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    let body = last_body(&fake);
    assert_eq!(
        last_path(&fake),
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent"
    );
    assert_eq!(
        body["generationConfig"],
        json!({ "temperature": 0.5, "thinkingConfig": { "includeThoughts": true, "thinkingBudget": 0 } })
    );

    // THINKING_BUDGET_MAP fills in a budget the client did not give, and keeps one it did.
    post(
        &gate,
        "/v1beta/models/gemini-2.5-pro:generateContent",
        &ask("x"),
    )
    .await;
    assert_eq!(
        last_body(&fake)["generationConfig"]["thinkingConfig"]["thinkingBudget"],
        1024
    );
    let mut own = ask("x");
    own["generationConfig"] = json!({ "thinkingConfig": { "thinkingBudget": 7 } });
    post(&gate, "/v1beta/models/gemini-2.5-pro:generateContent", &own).await;
    assert_eq!(
        last_body(&fake)["generationConfig"]["thinkingConfig"]["thinkingBudget"],
        7
    );

    // -search only for SEARCH_MODELS: otherwise the name goes to Google as it is.
    post(
        &gate,
        "/v1beta/models/gemini-2.5-pro-search:generateContent",
        &ask("x"),
    )
    .await;
    assert_eq!(
        last_path(&fake),
        "/v1beta/models/gemini-2.5-pro-search:generateContent"
    );
    // A request no plugin touches reaches Google byte for byte.
    let raw = r#"{"contents": [{"parts":[{"text":"as is"}]}],  "x": 1}"#;
    let resp = client()
        .post(gate.url(GENERATE))
        .header("x-goog-api-key", TOKEN)
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        &fake.state.last_received().unwrap().body[..],
        raw.as_bytes()
    );
}

#[tokio::test]
async fn round_robin_is_a_plugin_and_removing_a_file_removes_its_behaviour() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "good-2"])
        .env("FILTERED_MODELS", r#"["gemini-2.5-pro"]"#)
        .admin()
        .shipped_plugins()
        .start()
        .await;
    for _ in 0..4 {
        post(&gate, GENERATE, &ask("x")).await;
    }
    assert_eq!(fake.state.key_stats("good-1").requests, 2);
    assert_eq!(fake.state.key_stats("good-2").requests, 2);
    let pro = "/v1beta/models/gemini-2.5-pro:generateContent";
    assert_eq!(post(&gate, pro, &ask("x")).await.0, 404);

    let before = gate.reload_status().await;
    gate.remove("plugins/round_robin.lua");
    gate.wait_reloads(&before).await;
    let before = gate.reload_status().await;
    gate.remove("plugins/model_filter.lua");
    let status = gate.wait_reloads(&before).await;
    assert_eq!(status["reload"]["last_result"], "ok", "{status}");
    fake.state.reset();
    for _ in 0..4 {
        post(&gate, GENERATE, &ask("x")).await;
    }
    assert_eq!(
        fake.state.key_stats("good-1").requests,
        4,
        "the built-in choice"
    );
    assert_eq!(post(&gate, pro, &ask("x")).await.0, 200);
}

#[tokio::test]
async fn failing_plugins_fall_back_are_counted_and_named() {
    let fake = fake().await;
    let broken = r#"
return {
  name = "broken",
  priority = 5,
  on_request = function(req, ctx)
    if req.model == "loop" then while true do end end
    if req.model == "bomb" then local t = {} for i = 1, 1e9 do t[i] = string.rep("x", 4096) .. i end end
    local oops = nil
    return oops.field
  end,
  select_key = function(pool, ctx) return "k-not-in-the-pool" end,
  filter_models = function(models, ctx) return 42 end,
}
"#;
    let gate = gate()
        .upstream(&fake, &["good-1", "good-2"])
        .admin()
        .plugin("broken", broken)
        .start()
        .await;
    for model in ["gemini-2.5-flash", "loop", "bomb"] {
        let (status, _, v) = post(
            &gate,
            &format!("/v1beta/models/{model}:generateContent"),
            &ask("x"),
        )
        .await;
        assert!(status == 200 || status == 404, "{model}: {status} {v}");
    }
    assert_eq!(get(&gate, "/v1beta/models").await.0, 200);
    let logs = gate.wait_log("instruction budget").await;
    assert!(logs.contains("plugins/broken.lua:9:"), "{logs}");
    assert!(
        logs.contains("k-not-in-the-pool is not in the pool"),
        "{logs}"
    );
    let status = gate.reload_status().await;
    let count = |hook: &str| {
        status["plugin_errors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["plugin"] == "broken" && e["hook"] == hook)
            .map_or(0, |e| e["count"].as_u64().unwrap())
    };
    // Three calls and the model list: every on_request and select_key failed.
    assert_eq!(count("on_request"), 4, "{status}");
    assert_eq!(count("select_key"), 4, "{status}");
    assert_eq!(count("filter_models"), 1, "{status}");
    // The gateway kept serving, on the built-in choice.
    assert_eq!(fake.state.key_stats("good-2").requests, 0);
}

#[tokio::test]
async fn on_error_deny_refuses_with_500() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .toml("[policy]\non_error = \"deny\"\n")
        .plugin(
            "broken",
            "return { name = 'broken', on_request = function() error('no') end }",
        )
        .start()
        .await;
    let (status, _, v) = post(&gate, GENERATE, &ask("x")).await;
    assert_eq!(status, 500);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("broken failed in on_request")
    );
    assert_eq!(fake.state.total_requests(), 0);
}

#[tokio::test]
async fn attempt_hooks_can_retry_cool_and_disable() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["invalid-1", "minute-2", "good-3"])
        .env("MAX_FAILURES", "100")
        .plugin(
            "strict",
            r#"
return {
  name = "strict",
  on_error = function(err, ctx)
    if err.class == "key_invalid" then return gemgate.disable("invalid, says " .. err.key_id) end
    if err.class == "rate_limited" then return gemgate.cool(3600) end
  end,
  on_response = function(resp, ctx)
    if resp.status ~= 200 then return gemgate.retry() end
  end,
}
"#,
        )
        .start()
        .await;
    assert_eq!(post(&gate, GENERATE, &ask("x")).await.0, 200);
    // invalid-1 disabled at once (not after 100 failures), minute-2 cooling for an hour.
    fake.state.reset();
    for _ in 0..3 {
        assert_eq!(post(&gate, GENERATE, &ask("x")).await.0, 200);
    }
    assert_eq!(fake.state.key_stats("good-3").requests, 3);
    assert_eq!(fake.state.total_requests(), 3);
}

#[tokio::test]
async fn plugin_config_switches_priority_and_schema() {
    let fake = fake().await;
    let pin = |name: &str, key: &str| {
        format!(
            "return {{ name = '{name}', priority = 1, schema = {{ note = 'string' }}, \
             select_key = function(pool) for i = 1, #pool do if pool[i].label == '{key}' then return pool[i].id end end end }}"
        )
    };
    let toml = "[keys]\napi_keys = [{ key = \"good-1\", label = \"one\" }, { key = \"good-2\", label = \"two\" }]\n\
                [plugins.pin_two]\npriority = 50\nnote = \"wins by priority\"\n\
                [plugins.pin_one]\nenabled = true\n";
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .toml(toml)
        .plugin("pin_one", &pin("pin_one", "one"))
        .plugin("pin_two", &pin("pin_two", "two"))
        .admin()
        .start()
        .await;
    post(&gate, GENERATE, &ask("x")).await;
    assert_eq!(
        fake.state.last_received().unwrap().key.as_deref(),
        Some("good-2")
    );

    let before = gate.reload_status().await;
    gate.save(
        "gemgate.toml",
        &toml.replace("priority = 50", "enabled = false"),
    );
    gate.wait_reloads(&before).await;
    post(&gate, GENERATE, &ask("x")).await;
    assert_eq!(
        fake.state.last_received().unwrap().key.as_deref(),
        Some("good-1")
    );

    // A setting the plugin's schema does not know is refused, and changes nothing.
    let before = gate.reload_status().await;
    gate.save("gemgate.toml", &toml.replace("note =", "nope ="));
    let status = gate.wait_reloads(&before).await;
    assert_eq!(status["reload"]["last_result"], "error");
    assert!(
        status["reload"]["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("nope: not a setting of this plugin")
    );
    post(&gate, GENERATE, &ask("x")).await;
    assert_eq!(
        fake.state.last_received().unwrap().key.as_deref(),
        Some("good-1")
    );
}

#[tokio::test]
async fn scripts_see_key_ids_never_secrets() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-secret-AAAA1111", "good-secret-BBBB2222"])
        .plugin(
            "spy",
            r#"
return {
  name = "spy",
  select_key = function(pool, ctx)
    local seen = {}
    for i, key in ipairs(pool) do seen[i] = gemgate.json.encode(key) end
    gemgate.log.info("pool " .. table.concat(seen, " "))
  end,
}
"#,
        )
        .start()
        .await;
    post(&gate, GENERATE, &ask("x")).await;
    let logs = gate.wait_log("pool {").await;
    assert!(
        !logs.contains("AAAA1111") && !logs.contains("BBBB2222"),
        "{logs}"
    );
    assert!(
        logs.contains("\\\"position\\\":2") || logs.contains("\"position\":2"),
        "{logs}"
    );
}

#[tokio::test]
async fn pool_from_counts_positions_and_pool_next_and_next_id_take_usable_keys_in_turn() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "invalid-2", "good-3"])
        .env("MAX_FAILURES", "1")
        .plugin(
            "spy",
            r#"
return {
  name = "spy",
  select_key = function(pool)
    -- The first attempt takes invalid-2, which is then out.
    if #pool == pool:size() then return pool[2].id end
    local seen = {}
    for _, p in ipairs({ -1, 0, 1, 3, 4, 5, 3 * pool:size() + 2 }) do
      seen[#seen + 1] = pool:from(p).position
    end
    gemgate.log.info("positions " .. table.concat(seen, ","))
    -- A round robin over the candidates only: invalid-2 is out and takes no turn.
    local cursor, turns = gemgate.counter("spy"), {}
    for _ = 1, 5 do
      turns[#turns + 1] = pool:next(cursor).position
    end
    gemgate.log.info("turns " .. table.concat(turns, ",") .. " at " .. cursor:get())
    -- `next_id` walks as `next` does, each on a counter of its own.
    local by_id, by_table, same = gemgate.counter("ids"), gemgate.counter("tables"), 0
    for _ = 1, 5 do
      if pool:next_id(by_id) == pool:next(by_table).id then same = same + 1 end
    end
    gemgate.log.info("ids " .. same .. " alike at " .. by_id:get() .. "=" .. by_table:get())
    -- Not a counter: the plugin's error (the built-in choice applies).
    pool:next_id({})
  end,
}
"#,
        )
        .start()
        .await;
    assert_eq!(post(&gate, GENERATE, &ask("x")).await.0, 200);
    gate.wait_log("positions 3,3,1,3,1,3,3").await;
    gate.wait_log("turns 1,3,1,3,1 at 7").await;
    gate.wait_log("ids 5 alike at 7=7").await;
    gate.wait_log("bad argument").await;
}

#[tokio::test]
async fn sticky_keys_stay_with_their_client() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "good-2", "good-3", "good-4"])
        .env("ALLOWED_TOKENS", "tok-a,tok-b,tok-c")
        .toml("[plugins.sticky_key]\nenabled = true\n")
        .start()
        .await;
    for token in ["tok-a", "tok-b", "tok-c"] {
        fake.state.reset();
        for _ in 0..5 {
            assert_eq!(post_as(&gate, token, GENERATE, &ask("x")).await.0, 200);
        }
        let by_key = fake.state.requests_by_key();
        assert_eq!(by_key.len(), 1, "{token}: {by_key:?}");
    }
}

#[tokio::test]
async fn weighted_tags_follow_the_weights() {
    let fake = fake().await;
    let toml = "[keys]\napi_keys = [\n { key = \"good-paid\", tags = [\"paid\"], weight = 3 },\n \
                { key = \"good-free\", tags = [\"free\"] },\n { key = \"good-off\", tags = [\"off\"] },\n]\n\
                [plugins.weighted_tags]\nenabled = true\ntags = { off = 0 }\n";
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .toml(toml)
        .start()
        .await;
    for _ in 0..80 {
        post(&gate, GENERATE, &ask("x")).await;
    }
    let paid = fake.state.key_stats("good-paid").requests;
    let free = fake.state.key_stats("good-free").requests;
    assert_eq!(fake.state.key_stats("good-off").requests, 0);
    assert_eq!(paid + free, 80);
    // 3:1 expected (60:20); far outside is a broken weighting, not bad luck.
    assert!((40..=75).contains(&paid), "paid {paid}, free {free}");
}

#[tokio::test]
async fn allowlists_and_rate_limits_per_client() {
    let fake = fake().await;
    let toml = "[auth]\nallowed_tokens = [{ name = \"alice\", token = \"tok-alice\" }, { name = \"bob\", token = \"tok-bob\" }]\n\
                [plugins.model_allowlist]\nenabled = true\nclients = { alice = [\"gemini-2.5-flash\"] }\n\
                [plugins.rate_limit]\nenabled = true\nrequests_per_minute = 100\nclients = { bob = 3 }\n";
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .without_env("ALLOWED_TOKENS")
        .toml(toml)
        .start()
        .await;
    let call = |token: &'static str, model: &'static str| {
        let gate = &gate;
        async move {
            let path = format!("/v1beta/models/{model}:generateContent");
            let (status, _, v) = post_as(gate, token, &path, &ask("x")).await;
            (status, v)
        }
    };
    assert_eq!(call("tok-alice", "gemini-2.5-flash").await.0, 200);
    let (status, v) = call("tok-alice", "gemini-2.5-pro").await;
    assert_eq!(status, 403);
    assert_eq!(
        v["error"]["message"],
        "client alice may not use gemini-2.5-pro"
    );
    let (_, list) = get_as(&gate, "tok-alice", "/v1beta/models").await;
    let names: Vec<&str> = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["models/gemini-2.5-flash", "models/gemini-2.5-flash-search"]
    );
    assert_eq!(
        call("tok-alice", "gemini-2.5-flash-search").await.0,
        200,
        "derived models follow their base"
    );

    for _ in 0..3 {
        assert_eq!(call("tok-bob", "gemini-2.5-pro").await.0, 200);
    }
    let (status, v) = call("tok-bob", "gemini-2.5-pro").await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    assert_eq!(
        call("tok-alice", "gemini-2.5-flash").await.0,
        200,
        "alice has her own count"
    );
}

#[tokio::test]
async fn check_compiles_every_plugin() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gemgate.toml"), "").unwrap();
    std::fs::create_dir(dir.path().join("plugins")).unwrap();
    std::fs::write(
        dir.path().join("plugins/typo.lua"),
        "return {\n  name = 'typo',\n  on_request = function(req) return req. end,\n}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gemgate"))
        .arg("check")
        .arg("--config")
        .arg(dir.path().join("gemgate.toml"))
        .current_dir(dir.path())
        .env_clear()
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("plugins/typo.lua:3:"), "{err}");

    std::fs::remove_file(dir.path().join("plugins/typo.lua")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gemgate"))
        .arg("check")
        .arg("--config")
        .arg(dir.path().join("gemgate.toml"))
        .current_dir(dir.path())
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("plugins OK"));
}

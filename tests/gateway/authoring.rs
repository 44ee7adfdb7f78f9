//! Policy authoring: plugin tests from the command line and on reload, the decision trace, the
//! dry run, each hook's cost, and editing a plugin from the admin page.

use std::process::Command;

use reqwest::Method;

use crate::common::*;

const PASSING: &str = r#"
test("gpt-4o is an alias", function()
  local r = run { request = { model = "gpt-4o" }, settings = { model_aliases = { ["gpt-4o"] = "gemini-2.5-flash" } } }
  expect.eq(r.model, "gemini-2.5-flash")
end)
"#;

const FAILING: &str = "test(\"a wrong expectation\", function()\n  local r = run {}\n  expect.key(r, \"no-such-key\")\nend)\n";

/// `gemgate` with `args`, in `dir`: exit code and standard output.
fn gemgate(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gemgate"))
        .args(args)
        .current_dir(dir)
        .env_remove("API_KEYS")
        .env_remove("AUTH_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn plugin_tests_run_from_the_command_line_like_a_test_runner() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    for (name, code) in shipped_plugins() {
        std::fs::write(plugins.join(format!("{name}.lua")), code).unwrap();
    }
    std::fs::write(plugins.join("alias_test.lua"), PASSING).unwrap();
    // The shipped tests and one of ours, all passing.
    let (code, out, err) = gemgate(dir.path(), &["plugin", "test", "plugins"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("plugins/alias_test.lua\n  ok    gpt-4o is an alias"),
        "{out}"
    );
    assert!(out.trim_end().ends_with(" passed, 0 failed"), "{out}");
    // A failing test: its file and line, the count, and exit code 1.
    std::fs::write(plugins.join("wrong_test.lua"), FAILING).unwrap();
    let (code, out, _) = gemgate(dir.path(), &["plugin", "test", "plugins"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL  a wrong expectation"), "{out}");
    assert!(
        out.contains("plugins/wrong_test.lua:3: expected key \"no-such-key\""),
        "{out}"
    );
    assert!(out.trim_end().ends_with(" passed, 1 failed"), "{out}");
    // `check` runs them only when asked; without a plugins folder beside it, the built-in
    // plugins' tests run.
    let (code, out, _) = gemgate(dir.path(), &["check"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = gemgate(dir.path(), &["check", "--with-tests"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("1 failed"), "{out}");
    let empty = tempfile::tempdir().unwrap();
    let (code, out, _) = gemgate(empty.path(), &["plugin", "test"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("built-in:round_robin_test.lua"), "{out}");
    // A plugin that does not load is the suite's failure, not a test's.
    std::fs::write(plugins.join("broken.lua"), "return {").unwrap();
    let (code, _, err) = gemgate(dir.path(), &["plugin", "test", "plugins"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("broken.lua:1:"), "{err}");
}

#[tokio::test]
async fn with_require_tests_a_reload_refuses_plugins_whose_tests_fail() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["key-1"])
        .shipped_plugins()
        .plugin("alias_test", PASSING)
        .toml("[policy]\nrequire_tests = true\n")
        .admin()
        .start()
        .await;
    let before = gate.reload_status().await;
    gate.save("plugins/wrong_test.lua", FAILING);
    let status = gate.wait_reloads(&before).await;
    assert_eq!(status["reload"]["last_result"], "error", "{status}");
    let error = &status["reload"]["last_error"];
    assert!(
        error["file"].as_str().unwrap().ends_with("wrong_test.lua"),
        "{status}"
    );
    assert_eq!(error["line"], 3, "{status}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("1 of 38 plugin tests failed"),
        "{status}"
    );
    assert_eq!(status["generation"], before["generation"], "still serving");
    let (status, _, _) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 200);
    // Mended, the reload goes through.
    let before = gate.reload_status().await;
    gate.remove("plugins/wrong_test.lua");
    let status = gate.wait_reloads(&before).await;
    assert_eq!(status["reload"]["last_result"], "ok", "{status}");
}

/// A plugin that refuses one model and picks the pool's last usable key.
const POLICY: &str = r#"
return {
  name = "policy",
  priority = 10,
  on_request = function(req)
    if req.model == "gemini-1.0-pro" then return gemgate.deny(410, "retired") end
  end,
  select_key = function(pool) return pool[#pool].id end,
}
"#;

async fn traced_gate() -> (FakeUpstream, Gate) {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["key-1", "key-2", "key-3"])
        .plugin("policy", POLICY)
        .admin()
        .start()
        .await;
    (fake, gate)
}

async fn traced(gate: &Gate, model: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client()
        .post(gate.url(&format!("/v1beta/models/{model}:generateContent")))
        .header("x-goog-api-key", TOKEN)
        .json(&ask("hi"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn a_trace_is_given_only_with_the_admin_token_and_names_hooks_and_keys() {
    let (fake, gate) = traced_gate().await;
    let (_, list) = admin(Method::GET, &gate, "/admin/api/keys", None).await;
    let first = list["keys"][0]["id"].as_str().unwrap().to_owned();
    let last = list["keys"][2]["id"].as_str().unwrap().to_owned();
    admin(
        Method::POST,
        &gate,
        &format!("/admin/api/keys/{first}/disable"),
        None,
    )
    .await;
    let asked = [("x-gemgate-trace", "1"), ("x-gemgate-admin", ADMIN)];
    let resp = traced(&gate, "gemini-2.5-flash", &asked).await;
    assert_eq!(resp.status(), 200);
    let trace = resp.headers()["x-gemgate-trace"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        trace.contains("policy.on_request=nil(") && trace.contains("policy.select_key="),
        "{trace}"
    );
    assert!(trace.contains(&format!("key={last} by policy")), "{trace}");
    assert!(
        trace.contains(&format!("skipped: {first} disabled")),
        "{trace}"
    );
    // Neither header reaches Google.
    let sent = fake.state.last_received().unwrap();
    assert!(
        sent.headers
            .iter()
            .all(|(n, _)| !n.starts_with("x-gemgate")),
        "{:?}",
        sent.headers
    );
    // A refusal carries its trace too.
    let resp = traced(&gate, "gemini-1.0-pro", &asked).await;
    assert_eq!(resp.status(), 410);
    let trace = resp.headers()["x-gemgate-trace"].to_str().unwrap();
    assert!(
        trace.contains("policy.on_request=deny 410: retired"),
        "{trace}"
    );
    // Without the admin token, or not asked for: no trace.
    for headers in [
        &[("x-gemgate-trace", "1")][..],
        &[("x-gemgate-trace", "0"), ("x-gemgate-admin", ADMIN)][..],
    ] {
        let resp = traced(&gate, "gemini-2.5-flash", headers).await;
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers().get("x-gemgate-trace").is_none(),
            "{headers:?}"
        );
    }
    // A wrong admin token (a client's own token among them) is refused as the admin API
    // refuses it, and counted: it cannot be guessed by watching for the header.
    for wrong in ["wrong", TOKEN] {
        let resp = traced(
            &gate,
            "gemini-2.5-flash",
            &[("x-gemgate-trace", "1"), ("x-gemgate-admin", wrong)],
        )
        .await;
        assert_eq!(resp.status(), 401, "{wrong}");
        assert!(resp.headers().get("x-gemgate-trace").is_none());
    }
    // Nor does the admin token stand for a client's.
    let resp = client()
        .post(gate.url(GENERATE))
        .header("x-gemgate-trace", "1")
        .header("x-gemgate-admin", ADMIN)
        .json(&ask("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("x-gemgate-trace").is_none());
    // The traced request's log entry has the trace, and its page shows it.
    wait_logged(&gate, 6).await;
    let (_, logs) = admin(Method::GET, &gate, "/admin/api/logs/requests", None).await;
    let rows = logs["rows"].as_array().unwrap();
    let with_trace: Vec<&Value> = rows
        .iter()
        .filter(|r| !r["record"]["trace"].is_null())
        .collect();
    assert_eq!(with_trace.len(), 2, "{logs}");
    let traced_ok = with_trace
        .iter()
        .find(|r| r["record"]["status"] == 200)
        .unwrap();
    let record = &traced_ok["record"]["trace"];
    assert_eq!(record["key"], last.as_str(), "{record}");
    assert_eq!(record["chosen_by"], "policy");
    assert_eq!(record["steps"][0]["plugin"], "policy");
    assert!(record["steps"][0]["us"].as_u64().is_some());
    assert!(
        record["keys"][0]["why"]
            .as_str()
            .unwrap()
            .starts_with("disabled"),
        "{record}"
    );
    let row = traced_ok["row"].as_str().unwrap();
    let page = admin_page(&gate, &format!("/admin/logs/requests/{row}")).await;
    assert!(page.contains("Plugin trace"), "{page}");
    assert!(page.contains("chosen by policy"), "{page}");
}

#[tokio::test]
async fn a_dry_run_answers_what_the_chain_would_do_without_calling_google() {
    let (fake, gate) = traced_gate().await;
    let calls = fake.state.received().len();
    let (status, v) = admin(
        Method::POST,
        &gate,
        "/admin/api/policy/dry-run",
        Some(serde_json::json!({ "request": { "model": "gemini-2.5-flash", "client": "alice" } })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["chosen_by"], "policy", "{v}");
    assert_eq!(v["keys"].as_array().unwrap().len(), 3);
    assert_eq!(v["keys"][2]["why"], "chosen", "{v}");
    assert_eq!(v["trace"]["steps"][0]["hook"], "on_request");
    let (status, v) = admin(
        Method::POST,
        &gate,
        "/admin/api/policy/dry-run",
        Some(serde_json::json!({ "request": { "model": "gemini-1.0-pro" } })),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["denied"]["status"], 410, "{v}");
    assert!(v["key"].is_null());
    // The request alone will do.
    let (status, v) = admin(
        Method::POST,
        &gate,
        "/admin/api/policy/dry-run",
        Some(serde_json::json!({ "model": "gemini-1.0-pro" })),
    )
    .await;
    assert_eq!(
        (status, v["denied"]["status"].clone()),
        (200, 410.into()),
        "{v}"
    );
    assert_eq!(fake.state.received().len(), calls, "nothing went upstream");
    // Abuse: not the admin, a made-up pool, an unknown field, a huge model name.
    let resp = client()
        .post(gate.url("/admin/api/policy/dry-run"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "request": {} }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    for (body, says) in [
        (serde_json::json!({ "pool": [{ "id": "x" }] }), "live pool"),
        (serde_json::json!({ "requests": {} }), "unknown field"),
        (
            serde_json::json!({ "request": { "model": "m".repeat(1000) } }),
            "longer than",
        ),
    ] {
        let (status, v) = admin(Method::POST, &gate, "/admin/api/policy/dry-run", Some(body)).await;
        assert_eq!(status, 400, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
}

#[tokio::test]
async fn each_hooks_cost_is_in_the_metrics_and_on_the_plugins_page() {
    let (_fake, gate) = traced_gate().await;
    for _ in 0..5 {
        let (status, _, _) = post(&gate, GENERATE, &ask("hi")).await;
        assert_eq!(status, 200);
    }
    let metrics = metrics_text(&gate).await;
    let count = metrics
        .lines()
        .find(|l| {
            l.starts_with(
                "gemgate_plugin_duration_seconds_count{plugin=\"policy\",hook=\"select_key\"}",
            )
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(count.ends_with(" 5"), "{count}");
    assert!(metrics.contains(
        "gemgate_plugin_duration_seconds_bucket{plugin=\"policy\",hook=\"on_request\",le=\"+Inf\"} 5"
    ));
    let (_, v) = admin(Method::GET, &gate, "/admin/api/reload", None).await;
    let timing = v["plugin_timings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["hook"] == "select_key")
        .unwrap()
        .clone();
    assert_eq!(timing["calls"], 5, "{v}");
    assert!(timing["p99_us"].as_f64().unwrap() >= timing["p50_us"].as_f64().unwrap());
    let page = admin_page(&gate, "/admin/plugins").await;
    assert!(page.contains("What each hook costs"), "{page}");
    assert!(
        page.contains("<td><code>select_key</code></td><td class=\"num\">5</td>"),
        "{page}"
    );
}

#[tokio::test]
async fn the_plugins_page_opens_checks_and_saves_a_plugin_with_the_session() {
    let (_fake, gate) = traced_gate().await;
    let (cookie, csrf) = admin_login(&gate).await;
    let call = |method: Method, path: &str, body: Option<Value>, csrf: Option<&str>| {
        let mut req = no_redirects()
            .request(method, gate.url(path))
            .header("cookie", &cookie);
        if let Some(c) = csrf {
            req = req.header("x-csrf-token", c);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or_default())
        }
    };
    let page = admin_page(&gate, "/admin/plugins").await;
    assert!(page.contains("id=\"editor-code\"") && page.contains("id=\"dry-run\""));
    assert!(!page.contains("src=\"http"), "no script from elsewhere");
    let (status, v) = call(Method::GET, "/admin/api/plugins/policy", None, None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["code"], POLICY);
    assert_eq!(v["editable"], true);
    // A check of a broken edit: the line, and nothing written.
    let broken = "return {\n  name = 'policy',\n  on_request = function( end,\n}\n";
    let (status, v) = call(
        Method::POST,
        "/admin/api/plugins/policy/check",
        Some(serde_json::json!({ "code": broken })),
        Some(&csrf),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["loads"].clone(), v["line"].clone()),
        (false.into(), 3.into()),
        "{v}"
    );
    let (status, v) = call(
        Method::PUT,
        "/admin/api/plugins/policy",
        Some(serde_json::json!({ "code": broken })),
        Some(&csrf),
    )
    .await;
    assert_eq!((status, v["saved"].clone()), (200, false.into()), "{v}");
    let on_disk = std::fs::read_to_string(gate.dir.path().join("plugins/policy.lua")).unwrap();
    assert_eq!(on_disk, POLICY);
    // Without the CSRF token: refused.
    let good = POLICY.replace("\"retired\"", "\"gone\"");
    let (status, _) = call(
        Method::PUT,
        "/admin/api/plugins/policy",
        Some(serde_json::json!({ "code": good })),
        None,
    )
    .await;
    assert_eq!(status, 403);
    // A good edit is written and served at once.
    let (status, v) = call(
        Method::PUT,
        "/admin/api/plugins/policy",
        Some(serde_json::json!({ "code": good })),
        Some(&csrf),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["saved"], true, "{v}");
    assert_eq!(v["reload"]["ok"], true, "{v}");
    let on_disk = std::fs::read_to_string(gate.dir.path().join("plugins/policy.lua")).unwrap();
    assert_eq!(on_disk, good);
    let (status, _, v) = post(
        &gate,
        "/v1beta/models/gemini-1.0-pro:generateContent",
        &ask("hi"),
    )
    .await;
    assert_eq!(status, 410);
    assert!(v.to_string().contains("gone"), "{v}");
    // Names that are not a plugin file's, and a file too large.
    for path in [
        "/admin/api/plugins/..%2Fgemgate",
        "/admin/api/plugins/Policy",
        "/admin/api/plugins/a.b",
        "/admin/api/plugins/",
    ] {
        let (status, _) = call(Method::GET, path, None, None).await;
        assert_eq!(status, 404, "{path}");
    }
    let (status, _) = call(
        Method::PUT,
        "/admin/api/plugins/huge",
        Some(serde_json::json!({ "code": "x".repeat(300 * 1024) })),
        Some(&csrf),
    )
    .await;
    assert_eq!(status, 413);
}

#[tokio::test]
async fn the_built_in_plugins_are_read_only() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["key-1"]).admin().start().await;
    let (status, v) = admin(Method::GET, &gate, "/admin/api/plugins/round_robin", None).await;
    assert_eq!(status, 200);
    assert_eq!(v["editable"], false);
    assert!(v["code"].as_str().unwrap().contains("round_robin"));
    let (status, v) = admin(
        Method::PUT,
        &gate,
        "/admin/api/plugins/round_robin",
        Some(serde_json::json!({ "code": "return {}" })),
    )
    .await;
    assert_eq!(status, 409, "{v}");
}

/// Two calls a client, counted in a plugin counter.
const BUDGET: &str = r#"
return {
  name = "budget",
  on_request = function(req)
    if gemgate.counter("c:" .. req.client):incr() > 2 then return gemgate.deny(429, "budget") end
  end,
}
"#;

#[tokio::test]
async fn a_dry_run_sees_the_live_counters_and_changes_none() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["key-1"])
        .plugin("budget", BUDGET)
        .admin()
        .start()
        .await;
    let (status, _, _) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 200);
    wait_logged(&gate, 1).await;
    let (_, logs) = admin(Method::GET, &gate, "/admin/api/logs/requests", None).await;
    let client = logs["rows"][0]["record"]["client"]
        .as_str()
        .unwrap()
        .to_owned();
    let dry = || {
        admin(
            Method::POST,
            &gate,
            "/admin/api/policy/dry-run",
            Some(serde_json::json!({ "request": { "client": client } })),
        )
    };
    for _ in 0..3 {
        let (status, v) = dry().await;
        assert_eq!((status, v["denied"].clone()), (200, Value::Null), "{v}");
    }
    // The dry runs counted nothing: the second call is still within the budget.
    let (status, _, _) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 200);
    let (_, v) = dry().await;
    assert_eq!(
        v["denied"]["status"], 429,
        "the third would be refused: {v}"
    );
}

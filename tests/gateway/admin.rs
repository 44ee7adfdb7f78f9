//! The admin JSON API for keys: list, verify, reset, enable, disable; admin token on every route.

use crate::common::*;

#[tokio::test]
async fn keys_are_listed_masked_with_their_state() {
    let fake = fake().await;
    let gate = gate()
        .upstream(
            &fake,
            &[
                "invalid-AAAAAAAAAAAAAAAAAAAA1",
                "minute-BBBBBBBBBBBBBBBBBBB2",
                "good-CCCCCCCCCCCCCCCCCCCC3",
            ],
        )
        .env("MAX_FAILURES", "1")
        .admin()
        .start()
        .await;
    assert_eq!(post(&gate, GENERATE, &ask("x")).await.0, 200);
    let (status, v) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    assert_eq!(status, 200, "{v}");
    let text = v.to_string();
    for secret in [
        "AAAAAAAAAAAAAAAAAAAA1",
        "BBBBBBBBBBBBBBBBBBB2",
        "CCCCCCCCCCCCCCCCCCCC3",
    ] {
        assert!(!text.contains(secret), "a secret in clear: {text}");
    }
    assert_eq!(v["total"], 3);
    assert_eq!(
        v["counts"],
        json!({ "active": 1, "cooling": 1, "disabled": 1 })
    );
    let states: Vec<&str> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["disabled", "cooling", "active"]);
    assert_eq!(v["keys"][1]["cooldowns"][0]["model"], "gemini-2.5-flash");
    assert_eq!(v["keys"][0]["key"], "…AAA1");

    let (_, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/keys?state=cooling&per_page=1",
        None,
    )
    .await;
    assert_eq!(v["total"], 1);
    assert_eq!(v["keys"][0]["state"], "cooling");
}

#[tokio::test]
async fn keys_can_be_verified_reset_disabled_and_enabled() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["invalid-1", "good-2"])
        .env("MAX_FAILURES", "1")
        .env("TEST_MODEL", "gemini-2.5-flash")
        .admin()
        .start()
        .await;
    post(&gate, GENERATE, &ask("x")).await;
    let (_, list) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    let bad = list["keys"][0]["id"].as_str().unwrap().to_owned();
    let good = list["keys"][1]["id"].as_str().unwrap().to_owned();

    let (status, v) = admin(
        reqwest::Method::POST,
        &gate,
        &format!("/admin/api/keys/{bad}/verify"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        (v["ok"].clone(), v["class"].clone()),
        (json!(false), json!("key_invalid"))
    );

    fake.state.set_behaviour("invalid-1", Behaviour::Valid);
    let (_, v) = admin(reqwest::Method::POST, &gate, "/admin/api/keys/verify", None).await;
    assert_eq!(
        v["results"],
        json!([{ "id": bad, "ok": true }]),
        "all disabled keys, now fine"
    );

    let (_, v) = admin(
        reqwest::Method::POST,
        &gate,
        &format!("/admin/api/keys/{good}/disable"),
        None,
    )
    .await;
    assert_eq!(v["state"], "disabled");
    fake.state.reset();
    post(&gate, GENERATE, &ask("x")).await;
    post(&gate, GENERATE, &ask("x")).await;
    assert_eq!(
        fake.state.key_stats("good-2").requests,
        0,
        "disabled by the operator"
    );
    let (_, v) = admin(
        reqwest::Method::POST,
        &gate,
        &format!("/admin/api/keys/{good}/enable"),
        None,
    )
    .await;
    assert_eq!(v["state"], "active");
    let (status, _) = admin(
        reqwest::Method::POST,
        &gate,
        "/admin/api/keys/k000000000000/reset",
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn every_admin_route_needs_the_admin_token() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).admin().start().await;
    let routes = [
        (reqwest::Method::GET, "/admin/api/reload"),
        (reqwest::Method::POST, "/admin/api/reload"),
        (reqwest::Method::GET, "/admin/api/keys"),
        (reqwest::Method::POST, "/admin/api/keys/verify"),
        (reqwest::Method::POST, "/admin/api/keys/k000000000000/reset"),
        (
            reqwest::Method::POST,
            "/admin/api/keys/k000000000000/disable",
        ),
        (reqwest::Method::GET, "/admin/api/logs/requests"),
        (reqwest::Method::GET, "/admin/api/logs/errors/1-1"),
        (reqwest::Method::DELETE, "/admin/api/logs/errors?all=true"),
    ];
    for (method, path) in &routes {
        let resp = client()
            .request(method.clone(), gate.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{method} {path}");
    }
    // A client token is no admin token, and guessing is slowed down like failed logins.
    for (i, (method, path)) in routes.iter().enumerate() {
        let resp = client()
            .request(method.clone(), gate.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        if i < 3 {
            assert_eq!(resp.status(), 401, "{method} {path}");
        } else {
            assert_eq!(resp.status(), 429, "{method} {path}");
            assert!(resp.headers().contains_key("retry-after"));
        }
    }
}

#[tokio::test]
async fn usage_is_counted_per_key_and_saved() {
    let fake = fake().await;
    let mut gate = gate()
        .upstream(&fake, &["minute-1", "good-2"])
        .admin()
        .start()
        .await;
    // minute-1 fails once (then cools), good-2 serves both calls.
    assert_eq!(post(&gate, GENERATE, &ask("one two three")).await.0, 200);
    let resp = client()
        .post(gate.url("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"))
        .header("x-goog-api-key", TOKEN)
        .json(&ask("four five"))
        .send()
        .await
        .unwrap();
    resp.text().await.unwrap();
    // Saved while running, and kept across a restart.
    wait_logged(&gate, 2).await;
    gate.restart("TERM").await;
    let (_, v) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    let usage = |i: usize| v["keys"][i]["usage_today"].clone();
    assert_eq!(usage(0)["requests"], 1, "{v}");
    assert_eq!(usage(0)["failures"]["rate_limited"], 1);
    let good = usage(1);
    assert_eq!(
        (good["requests"].clone(), good["successes"].clone()),
        (json!(2), json!(2)),
        "{v}"
    );
    // Prompt tokens 3 + 2, output tokens 5 ("echo: one two three") + 3 ("echo: four five").
    assert_eq!(good["prompt_tokens"], 5, "{good}");
    assert_eq!(good["output_tokens"], 7, "{good}");
}

#[tokio::test]
async fn request_and_error_logs_are_kept_queried_and_deleted() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["minute-1", "good-2"])
        .env("MAX_RETRIES", "1")
        .env("ERROR_LOG_RECORD_REQUEST_BODY", "true")
        .admin()
        .start()
        .await;
    // minute-1 first: 429 (one attempt only), then good-2 serves the rest.
    assert_eq!(post(&gate, GENERATE, &ask("first")).await.0, 429);
    for text in ["second", "third"] {
        assert_eq!(post(&gate, GENERATE, &ask(text)).await.0, 200);
    }
    wait_logged(&gate, 3).await;

    let (status, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/logs/requests",
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{v}");
    assert_eq!(rows[2]["record"]["status"], 429, "newest first");
    assert!(
        rows[2]["record"]["request_body"].is_null(),
        "the request log keeps no bodies"
    );

    let (_, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/logs/requests?status=200&limit=1",
        None,
    )
    .await;
    assert_eq!(v["rows"].as_array().unwrap().len(), 1);
    let next = v["next"].as_str().unwrap().to_owned();
    let (_, v) = admin(
        reqwest::Method::GET,
        &gate,
        &format!("/admin/api/logs/requests?status=200&limit=1&before={next}"),
        None,
    )
    .await;
    assert_eq!(v["rows"].as_array().unwrap().len(), 1);
    assert!(v["next"].is_null());

    let (_, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/logs/errors?class=rate_limited",
        None,
    )
    .await;
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v}");
    let row = rows[0]["row"].as_str().unwrap().to_owned();
    let (status, v) = admin(
        reqwest::Method::GET,
        &gate,
        &format!("/admin/api/logs/errors/{row}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let r = &v["record"];
    assert_eq!(r["upstream_status"], 429);
    assert!(
        r["upstream_message"].as_str().unwrap().contains("quota"),
        "{r}"
    );
    assert!(r["request_body"].as_str().unwrap().contains("first"), "{r}");

    let (_, v) = admin(
        reqwest::Method::DELETE,
        &gate,
        "/admin/api/logs/errors",
        Some(json!({ "rows": [row] })),
    )
    .await;
    assert_eq!(v["deleted"], 1);
    let (_, v) = admin(
        reqwest::Method::DELETE,
        &gate,
        "/admin/api/logs/requests?all=true",
        None,
    )
    .await;
    assert_eq!(v["deleted"], 3);
    let (_, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/logs/requests",
        None,
    )
    .await;
    assert_eq!(v["rows"], json!([]));
}

#[tokio::test]
async fn keys_are_added_and_deleted_through_the_config_file() {
    let fake = fake().await;
    let key = |c: char| format!("AIzaSy{}", c.to_string().repeat(33));
    let (env_key, file_key, new1, new2) = (key('E'), key('F'), key('G'), key('H'));
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .env("API_KEYS", &env_key)
        .toml(&format!("# keep me\n[keys]\napi_keys = [\"{file_key}\"]\n"))
        .admin()
        .start()
        .await;
    let (_, v) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    let sources: Vec<&str> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["source"].as_str().unwrap())
        .collect();
    assert_eq!(
        sources,
        ["file", "env"],
        "the pool is the union of file and environment"
    );

    let text = format!("new ones: {new1}\n{new2}, and an old one {file_key}");
    let (status, v) = admin(
        reqwest::Method::POST,
        &gate,
        "/admin/api/keys",
        Some(json!({ "text": text })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["added"].as_array().unwrap().len(), 2);
    assert_eq!(v["duplicates"].as_array().unwrap().len(), 1);
    assert!(!v.to_string().contains(&new1), "masked");
    let (_, v) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    assert_eq!(v["total"], 4);
    let file = std::fs::read_to_string(gate.config_path()).unwrap();
    assert!(
        file.contains("# keep me") && file.contains(&new1) && file.contains(&new2),
        "{file}"
    );
    assert!(
        !file.contains(&env_key),
        "environment keys stay in the environment"
    );

    let ids: Vec<String> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect();
    let (status, v) = admin(
        reqwest::Method::DELETE,
        &gate,
        &format!("/admin/api/keys/{}", ids[0]),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        !std::fs::read_to_string(gate.config_path())
            .unwrap()
            .contains(&file_key)
    );
    let (status, v) = admin(
        reqwest::Method::DELETE,
        &gate,
        &format!("/admin/api/keys/{}", ids[3]),
        None,
    )
    .await;
    assert_eq!(status, 409, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("API_KEYS"));
    let (_, v) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    assert_eq!(v["total"], 3);
    // Each edit reloaded once: the file watcher knows the config is as the edit's reload read it.
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert_eq!(gate.reload_status().await["generation"], 3);
}

/// The id of the key listed with `masked` in a key list.
fn id_of(list: &Value, masked: &str) -> String {
    list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == masked)
        .unwrap_or_else(|| panic!("no key {masked}: {list}"))["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A `PATCH /admin/api/keys/{id}` with `body`.
async fn place(gate: &Gate, id: &str, body: Value) -> (u16, Value) {
    admin(
        reqwest::Method::PATCH,
        gate,
        &format!("/admin/api/keys/{id}"),
        Some(body),
    )
    .await
}

#[tokio::test]
async fn a_keys_project_and_tier_are_set_through_the_config_file_and_the_pool_shows_its_projects() {
    let fake = fake().await;
    let key = |c: char| format!("AIzaSy{}", c.to_string().repeat(33));
    let (a, b, c, env_key) = (key('A'), key('B'), key('C'), key('E'));
    let toml = format!(
        "# keep me\n[keys]\napi_keys = [\n  \"{a}\", # the first\n  {{ key = \"{b}\", label = \"bee\", tags = [\"x\"], weight = 2 }},\n  \"{c}\",\n]\n"
    );
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .env("API_KEYS", &env_key)
        .toml(&toml)
        .admin()
        .start()
        .await;
    let (_, list) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    let masked = |k: &str| format!("{}…{}", &k[..6], &k[k.len() - 4..]);
    let (id_a, id_b, id_c, id_env) = (
        id_of(&list, &masked(&a)),
        id_of(&list, &masked(&b)),
        id_of(&list, &masked(&c)),
        id_of(&list, &masked(&env_key)),
    );
    assert_eq!(
        list["projects"],
        json!([{ "name": null, "named": false, "tier": null, "keys": 4, "active": 4, "cooling": 0, "disabled": 0 }])
    );
    assert_eq!(list["tiers"], json!(["free", "tier1"]));

    let (status, v) = place(&gate, &id_a, json!({ "project": "p1", "tier": "free" })).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["project"].clone(), v["tier"].clone()),
        (json!("p1"), json!("free"))
    );
    // The tier left out stays as it is (none); label, tags and weight stay.
    let (status, v) = place(&gate, &id_b, json!({ "project": "p1" })).await;
    assert_eq!(status, 200, "{v}");
    let file = std::fs::read_to_string(gate.config_path()).unwrap();
    assert!(
        file.contains("# keep me") && file.contains("# the first"),
        "{file}"
    );
    assert!(
        file.contains(&format!(
            "{{ key = \"{a}\", project = \"p1\", tier = \"free\" }}"
        )),
        "{file}"
    );
    assert!(
        file.contains(&format!(
            "{{ key = \"{b}\", label = \"bee\", tags = [\"x\"], weight = 2, project = \"p1\" }}"
        )),
        "{file}"
    );

    // The reload applied it: the keys and the pool's projects say so.
    let (_, list) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    let listed = |id: &str| {
        list["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(
        (
            listed(&id_a)["project"].clone(),
            listed(&id_a)["tier"].clone()
        ),
        (json!("p1"), json!("free"))
    );
    let b_now = listed(&id_b);
    assert_eq!(
        (b_now["project"].clone(), b_now["tier"].clone()),
        (json!("p1"), Value::Null)
    );
    assert_eq!(
        (b_now["label"].clone(), b_now["weight"].clone()),
        (json!("bee"), json!(2))
    );
    assert_eq!(
        list["projects"],
        json!([
            { "name": "p1", "named": true, "tier": "free", "keys": 2, "active": 2, "cooling": 0, "disabled": 0 },
            { "name": null, "named": false, "tier": null, "keys": 2, "active": 2, "cooling": 0, "disabled": 0 },
        ])
    );
    // A project has one tier: another tier in p1 is refused, and the file stays as it was.
    let before = std::fs::read_to_string(gate.config_path()).unwrap();
    let (status, v) = place(&gate, &id_c, json!({ "project": "p1", "tier": "tier1" })).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("different tiers (free and tier1)"),
        "{v}"
    );
    assert_eq!(std::fs::read_to_string(gate.config_path()).unwrap(), before);
    // Filtered by project, and the keys without one.
    let (_, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/keys?project=p1",
        None,
    )
    .await;
    assert_eq!(v["total"], 2, "{v}");
    let (_, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/keys?project=",
        None,
    )
    .await;
    let ids: Vec<&str> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id_c.as_str(), id_env.as_str()]);

    // null clears: the key is its own project again.
    let (status, v) = place(&gate, &id_a, json!({ "project": null, "tier": null })).await;
    assert_eq!(status, 200, "{v}");
    let (_, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/keys?project=p1",
        None,
    )
    .await;
    assert_eq!(v["total"], 1, "{v}");
    assert_eq!(v["keys"][0]["id"], json!(id_b));
    let file = std::fs::read_to_string(gate.config_path()).unwrap();
    assert!(file.contains(&format!("{{ key = \"{a}\" }}")), "{file}");
    assert!(
        !file.contains(&env_key),
        "the environment's key stays there"
    );
}

#[tokio::test]
async fn placing_a_key_refuses_unknown_tiers_keys_and_names_and_environment_keys() {
    let fake = fake().await;
    let (file_key, env_key) = (
        "file-key-AAAAAAAAAAAAAAAAAAAA1",
        "env-key-BBBBBBBBBBBBBBBBBBBBB2",
    );
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .env("API_KEYS", env_key)
        .toml(&format!(
            "[keys]\napi_keys = [\"{file_key}\"]\n[quota.tiers.gold.limits.\"gemini-2.5-flash\"]\nrpm = 5\n"
        ))
        .admin()
        .start()
        .await;
    let (_, list) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    assert_eq!(list["tiers"], json!(["free", "gold", "tier1"]));
    let file_id = list["keys"][0]["id"].as_str().unwrap().to_owned();
    let env_id = list["keys"][1]["id"].as_str().unwrap().to_owned();
    let before = std::fs::read_to_string(gate.config_path()).unwrap();
    let mut answers = String::new();

    let (status, v) = place(&gate, &file_id, json!({ "tier": "platinum" })).await;
    assert_eq!(status, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("tier \"platinum\" is not defined")
            && message.contains("free, gold, tier1"),
        "{message}"
    );
    answers.push_str(&v.to_string());
    let (status, v) = place(&gate, "k000000000000", json!({ "project": "p1" })).await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = place(&gate, &env_id, json!({ "project": "p1" })).await;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("API_KEYS"),
        "{v}"
    );
    answers.push_str(&v.to_string());
    // Names with a control character or over 128 characters, wrong types and shapes.
    let long = "p".repeat(200);
    for body in [
        json!({ "project": "p1\u{1}x" }),
        json!({ "project": "line\nbreak" }),
        json!({ "project": long }),
        json!({ "tier": "t".repeat(129) }),
        json!({ "project": 42 }),
        json!({ "project": ["p1"] }),
        json!({ "project": "p1", "key": "AIzaSy-sneaky" }),
        json!({}),
        json!(["p1"]),
    ] {
        let (status, v) = place(&gate, &file_id, body.clone()).await;
        assert_eq!(status, 400, "{body}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            !message.contains(&long) && !message.contains('\u{1}'),
            "{message}"
        );
        answers.push_str(&v.to_string());
    }
    let resp = client()
        .patch(gate.url(&format!("/admin/api/keys/{file_id}")))
        .bearer_auth(ADMIN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // Without the admin token, nothing.
    let resp = client()
        .patch(gate.url(&format!("/admin/api/keys/{file_id}")))
        .json(&json!({ "project": "p1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        std::fs::read_to_string(gate.config_path()).unwrap(),
        before,
        "no refused edit touched the file"
    );
    for secret in [file_key, env_key] {
        assert!(!answers.contains(secret), "an answer shows {secret}");
    }
    // A configured tier is a tier.
    let (status, v) = place(
        &gate,
        &file_id,
        json!({ "project": " p9 ", "tier": "gold" }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["project"].clone(), v["tier"].clone()),
        (json!("p9"), json!("gold"))
    );
}

#[tokio::test]
async fn keys_google_counts_in_one_project_are_suggested_to_share_one() {
    use gemgate_fake_upstream::{QuotaModel, QuotaProject};
    let fake = fake().await;
    let p1 = QuotaProject {
        keys: vec!["a-1".into(), "a-2".into()],
        number: Some(1042),
        rpm: Some(1),
        ..Default::default()
    };
    fake.state
        .set_quota(QuotaModel {
            projects: [("p1".into(), p1)].into(),
            models: vec!["gemini-2.5-flash".into()],
            throttle: None,
        })
        .unwrap();
    // gemgate is not told that a-1 and a-2 share a project; b-1 is a project of its own.
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .toml("[keys]\napi_keys = [\"a-1\", \"a-2\", \"b-1\"]\n")
        .admin()
        .start()
        .await;
    let learned = |list: &Value| -> Vec<String> {
        list["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["learned_project"] == "projects/1042")
            .map(|k| k["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut list = Value::Null;
    for _ in 0..10 {
        post(&gate, GENERATE, &ask("hi")).await;
        list = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None)
            .await
            .1;
        if learned(&list).len() == 2 {
            break;
        }
    }
    let mut both = learned(&list);
    both.sort();
    assert_eq!(
        both.len(),
        2,
        "both p1 keys answered a 429 naming their project: {list}"
    );
    let suggestions = list["suggestions"].as_array().unwrap();
    assert_eq!(suggestions.len(), 1, "{list}");
    let s = &suggestions[0];
    assert_eq!(s["consumer"], "projects/1042");
    let mut ids: Vec<String> = serde_json::from_value(s["keys"].clone()).unwrap();
    ids.sort();
    assert_eq!(ids, both);
    let message = s["message"].as_str().unwrap();
    assert!(
        message.contains("2 keys answer for projects/1042") && message.contains("one project"),
        "{message}"
    );
    // The keys page shows it, as text.
    let html = admin_page(&gate, "/admin/keys").await;
    assert!(
        html.contains("id=\"suggestions\"") && html.contains("2 keys answer for projects/1042"),
        "{html}"
    );
    // gemgate regrouped nothing on its own; once the operator does, the suggestion is gone.
    let (_, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/keys?project=",
        None,
    )
    .await;
    assert_eq!(v["total"], 3);
    for id in &both {
        let (status, v) = place(&gate, id, json!({ "project": "p1", "tier": "free" })).await;
        assert_eq!(status, 200, "{v}");
    }
    let (_, v) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    assert_eq!(v["suggestions"], json!([]), "{v}");
    assert_eq!(v["projects"][0]["name"], "p1");
    assert_eq!(v["projects"][0]["keys"], 2);
}

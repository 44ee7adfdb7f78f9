//! The admin web pages: login and sessions, the auth of every page and admin API route, CSRF,
//! masking, and each page's content (keys with 10,000 keys, settings saves, logs, plugins).

use std::time::Instant;

use reqwest::{Method, StatusCode};

use crate::common::*;
use crate::common::{no_redirects as browser, session_page as page};

const KEY_A: &str = "AIzaSyAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
const KEY_B: &str = "AIzaSyBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";

/// Posts `form` to `path` as a browser would, with the session cookie `cookie` (may be empty).
async fn submit(gate: &Gate, path: &str, cookie: &str, form: &[(&str, &str)]) -> reqwest::Response {
    browser()
        .post(gate.url(path))
        .header("cookie", cookie)
        .form(form)
        .send()
        .await
        .unwrap()
}

/// A logged-in session: its cookie header and CSRF token.
struct Session {
    cookie: String,
    csrf: String,
}

async fn login(gate: &Gate) -> Session {
    let resp = submit(
        gate,
        "/admin/login",
        "",
        &[("token", ADMIN), ("next", "/admin/keys")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/admin/keys");
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    for flag in ["HttpOnly", "SameSite=Strict", "Max-Age=", "Path=/"] {
        assert!(set.contains(flag), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    let page = page(gate, &cookie, "/admin").await.1;
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();
    assert_eq!(csrf.len(), 64);
    Session { cookie, csrf }
}

async fn admin_gate(keys: &[&str]) -> (FakeUpstream, Gate) {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &[]).without_env("API_KEYS").admin();
    let text = format!(
        "[keys]\napi_keys = {}\n",
        serde_json::to_string(keys).unwrap()
    );
    (fake, gate.toml(&text).start().await)
}

const PAGES: &[&str] = &[
    "/admin",
    "/admin/keys",
    "/admin/settings",
    "/admin/logs",
    "/admin/logs?log=requests",
    "/admin/plugins",
];

/// Every admin API route, with a method it serves.
const API: &[(&str, &str)] = &[
    ("GET", "/admin/api/reload"),
    ("POST", "/admin/api/reload"),
    ("GET", "/admin/api/keys"),
    ("POST", "/admin/api/keys"),
    ("POST", "/admin/api/keys/verify"),
    ("POST", "/admin/api/keys/bulk"),
    ("POST", "/admin/api/keys/k0123456789ab/disable"),
    ("DELETE", "/admin/api/keys/k0123456789ab"),
    ("PATCH", "/admin/api/keys/k0123456789ab"),
    ("GET", "/admin/api/logs/errors"),
    ("DELETE", "/admin/api/logs/requests"),
    ("GET", "/admin/api/logs/errors/1-1"),
];

#[tokio::test]
async fn every_page_and_api_route_refuses_without_a_session_or_the_admin_token() {
    let (_fake, gate) = admin_gate(&[KEY_A]).await;
    for path in PAGES {
        let resp = browser().get(gate.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{path}");
        let to = resp.headers()["location"].to_str().unwrap();
        assert!(to.starts_with("/admin/login?next="), "{path} → {to}");
        // A made-up cookie opens nothing (wrong bearer tokens: see the admin API's tests).
        let resp = browser()
            .get(gate.url(path))
            .header("cookie", "gemgate_admin=0000")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{path}");
    }
    for (path, method) in [("/admin/settings", "POST"), ("/admin/logout", "POST")] {
        let resp = browser()
            .request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                gate.url(path),
            )
            .form(&[("x", "1")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    for (method, path) in API {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let resp = browser().request(m, gate.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        let v: Value = resp.json().await.unwrap();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("/admin/login"), "{v}");
    }
    // The bearer admin token and a session both open every page.
    let session = login(&gate).await;
    for path in PAGES {
        let resp = browser()
            .get(gate.url(path))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(page(&gate, &session.cookie, path).await.0, 200, "{path}");
    }
    // Static files need no login, and no page loads anything from elsewhere.
    for path in ["/admin/static/admin.css", "/admin/static/admin.js"] {
        let resp = browser().get(gate.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
    let (_, html) = page(&gate, &session.cookie, "/admin").await;
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );
    let resp = browser().get(gate.url("/admin")).send().await.unwrap();
    let csp = resp.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
}

#[tokio::test]
async fn logins_are_throttled_sessions_end_at_logout_and_without_auth_token_the_page_is_off() {
    let (_fake, gate) = admin_gate(&[KEY_A]).await;
    let (status, html) = page(&gate, "", "/admin/login").await;
    assert_eq!(status, 200);
    assert!(html.contains("type=\"password\""));
    for _ in 0..3 {
        let resp = submit(&gate, "/admin/login", "", &[("token", TOKEN)]).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(resp.headers().get("set-cookie").is_none());
    }
    // From now on, each wrong token waits; the right one never does.
    let resp = submit(&gate, "/admin/login", "", &[("token", TOKEN)]).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    let session = login(&gate).await;
    assert_eq!(page(&gate, &session.cookie, "/admin/keys").await.0, 200);
    // gemini-balance's login form (`POST /auth`, field `auth_token`) works too.
    let resp = submit(&gate, "/auth", "", &[("auth_token", ADMIN)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(
        resp.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .starts_with("gemgate_admin=")
    );

    // Logging out needs the CSRF token, then ends the session.
    let resp = submit(&gate, "/admin/logout", &session.cookie, &[("x", "1")]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = submit(
        &gate,
        "/admin/logout",
        &session.cookie,
        &[("_csrf", session.csrf.as_str())],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(
        resp.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    assert_eq!(page(&gate, &session.cookie, "/admin/keys").await.0, 303);

    // Without AUTH_TOKEN there is no admin page, and the login page says why.
    let fake = fake().await;
    let off = gate_without_admin(&fake).await;
    let (status, html) = page(&off, "", "/admin/login").await;
    assert_eq!(status, 403);
    assert!(html.contains("AUTH_TOKEN"), "{html}");
    let resp = browser()
        .get(off.url("/admin/api/keys"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

async fn gate_without_admin(fake: &FakeUpstream) -> Gate {
    gate().upstream(fake, &["k"]).start().await
}

#[tokio::test]
async fn session_requests_that_change_state_need_the_csrf_token_and_the_same_origin() {
    let (_fake, gate) = admin_gate(&[KEY_A, KEY_B]).await;
    let session = login(&gate).await;
    let (_, keys) = admin(Method::GET, &gate, "/admin/api/keys", None).await;
    let id = keys["keys"][0]["id"].as_str().unwrap().to_owned();
    let path = format!("/admin/api/keys/{id}/disable");
    let post = |csrf: Option<&str>, origin: Option<&str>| {
        let mut req = browser()
            .post(gate.url(&path))
            .header("cookie", &session.cookie);
        if let Some(c) = csrf {
            req = req.header("x-csrf-token", c);
        }
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };
    assert_eq!(
        post(None, None).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post(Some("0".repeat(64).as_str()), None)
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post(Some(&session.csrf), Some("https://evil.example"))
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    let own = format!("http://{}", gate.addr);
    let resp = post(Some(&session.csrf), Some(&own)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, keys) = admin(Method::GET, &gate, "/admin/api/keys?state=disabled", None).await;
    assert_eq!(keys["total"], 1, "{keys}");
}

#[tokio::test]
async fn no_page_shows_a_secret_and_gemini_balance_paths_lead_to_the_pages() {
    let (fake, gate) = admin_gate(&[KEY_A, KEY_B]).await;
    // Something in every log, including an upstream message that names a key.
    fake.state.set_behaviour(KEY_B, Behaviour::Invalid);
    for _ in 0..3 {
        post(
            &gate,
            "/v1beta/models/gemini-2.0-flash:generateContent",
            &ask("hi"),
        )
        .await;
    }
    wait_logged(&gate, 3).await;
    let session = login(&gate).await;
    let mut all = String::new();
    for path in PAGES {
        let (status, html) = page(&gate, &session.cookie, path).await;
        assert_eq!(status, 200, "{path}");
        all.push_str(&html);
    }
    for secret in [KEY_A, KEY_B, ADMIN, TOKEN] {
        assert!(!all.contains(secret), "a page shows {secret}");
    }
    assert!(all.contains("AIzaSy…AAAA") && all.contains("AIzaSy…BBBB"));
    for (from, to) in [
        ("/keys_status", "/admin/keys"),
        ("/keys", "/admin/keys"),
        ("/config", "/admin/settings"),
        ("/logs", "/admin/logs"),
    ] {
        let resp = browser().get(gate.url(from)).send().await.unwrap();
        assert!(resp.status().is_redirection(), "{from}");
        assert_eq!(resp.headers()["location"], to, "{from}");
    }
}

#[tokio::test]
async fn the_key_page_pages_filters_and_searches_ten_thousand_keys() {
    let keys: Vec<String> = (0..10_000).map(|i| format!("AIzaSy{i:033}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let (_fake, gate) = admin_gate(&refs).await;
    let session = login(&gate).await;
    let started = Instant::now();
    let (status, html) = page(&gate, &session.cookie, "/admin/keys").await;
    let took = started.elapsed();
    assert_eq!(status, 200);
    eprintln!("key page with 10,000 keys: {took:?}");
    assert!(
        html.contains("10000 keys · page 1 of 200"),
        "{}",
        &html[..2000.min(html.len())]
    );
    assert_eq!(html.matches("<tr data-id=").count(), 50);
    let (_, html) = page(&gate, &session.cookie, "/admin/keys?page=200").await;
    assert!(html.contains("page 200 of 200"));
    let (_, html) = page(&gate, &session.cookie, "/admin/keys?state=disabled").await;
    assert!(html.contains("No key matches."));
    // Search by id.
    let (_, listed) = admin(
        Method::GET,
        &gate,
        "/admin/api/keys?per_page=1&page=1234",
        None,
    )
    .await;
    let id = listed["keys"][0]["id"].as_str().unwrap().to_owned();
    let (_, html) = page(&gate, &session.cookie, &format!("/admin/keys?q={id}")).await;
    assert!(
        html.contains("1 keys · page 1 of 1") && html.contains(&id),
        "{id}"
    );
}

#[tokio::test]
async fn the_key_page_groups_keys_by_project_and_sets_a_keys_project_with_the_sessions_csrf_token()
{
    let (_fake, gate) = admin_gate(&[KEY_A, KEY_B]).await;
    let session = login(&gate).await;
    let (_, keys) = admin(Method::GET, &gate, "/admin/api/keys", None).await;
    let id = keys["keys"][0]["id"].as_str().unwrap().to_owned();
    let patch = |csrf: Option<&str>, body: Value| {
        let mut req = browser()
            .patch(gate.url(&format!("/admin/api/keys/{id}")))
            .header("cookie", &session.cookie)
            .json(&body);
        if let Some(c) = csrf {
            req = req.header("x-csrf-token", c);
        }
        req.send()
    };
    let body = json!({ "project": "team-<b>one</b>", "tier": "tier1" });
    let resp = patch(None, body.clone()).await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::FORBIDDEN,
        "the CSRF token is needed"
    );
    let resp = patch(Some(&session.csrf), body).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let (status, html) = page(&gate, &session.cookie, "/admin/keys").await;
    assert_eq!(status, 200);
    // The pool by project (names escaped), each a link that filters on it.
    assert!(html.contains("<table id=\"projects\">"), "{html}");
    assert!(
        html.contains("team-&lt;b&gt;one&lt;/b&gt;") && !html.contains("<b>one</b>"),
        "{html}"
    );
    assert!(
        html.contains(
            "&amp;project&#x3D;team-%3Cb%3Eone%3C%2Fb%3E&amp;page&#x3D;1\">team-&lt;b&gt;"
        ),
        "{html}"
    );
    assert!(html.contains("without a project"), "{html}");
    // Each key row has its project, and a button for the dialog, which offers the tiers.
    assert!(html.contains("data-act=\"place\""), "{html}");
    assert!(
        html.contains("<dialog id=\"place-dialog\"")
            && html.contains("<option value=\"tier1\">tier1</option>"),
        "{html}"
    );
    assert!(!html.contains("id=\"suggestions\""), "nothing to suggest");
    let (_, html) = page(
        &gate,
        &session.cookie,
        "/admin/keys?project=team-%3Cb%3Eone%3C%2Fb%3E",
    )
    .await;
    assert!(
        html.contains("1 keys · page 1 of 1") && html.contains(&id),
        "{html}"
    );
    assert!(
        html.contains("<input type=\"hidden\" name=\"project\""),
        "the filter form keeps the project: {html}"
    );
    let (_, html) = page(&gate, &session.cookie, "/admin/keys?project=").await;
    assert!(
        html.contains("1 keys · page 1 of 1") && !html.contains(&id),
        "{html}"
    );
    assert!(html.contains("the keys without a project"), "{html}");
    for secret in [KEY_A, KEY_B] {
        assert!(!html.contains(secret));
    }
}

#[tokio::test]
async fn settings_show_sources_save_through_reload_and_refuse_bad_values_next_to_their_field() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &[])
        .without_env("API_KEYS")
        .admin()
        .env("TIME_OUT", "42")
        .toml(&format!(
            "[keys]\napi_keys = [\"{KEY_A}\"]\n[upstream]\nmax_retries = 2\n"
        ))
        .start()
        .await;
    let session = login(&gate).await;
    let (status, html) = page(&gate, &session.cookie, "/admin/settings").await;
    assert_eq!(status, 200);
    for group in [
        "Keys and tokens",
        "Models",
        "Thinking and search",
        "Images",
        "Streaming",
        "Retries and checks",
        "Logs",
    ] {
        assert!(
            html.contains(&format!("<legend>{group}</legend>")),
            "{group}"
        );
    }
    let field = |env: &str| field_of(&html, env);
    assert!(field("MAX_RETRIES").contains("file") && field("MAX_RETRIES").contains("value=\"2\""));
    assert!(field("TIME_OUT").contains("environment") && field("TIME_OUT").contains("disabled"));
    assert!(field("MAX_FAILURES").contains("default"));
    assert!(field("AUTH_TOKEN").contains("…cret") && !html.contains(ADMIN));

    let save = |pairs: Vec<(&'static str, String)>| {
        let mut form = pairs;
        form.push(("_csrf", session.csrf.clone()));
        browser()
            .post(gate.url("/admin/settings"))
            .header("cookie", &session.cookie)
            .form(&form)
            .send()
    };
    // A bad value: shown beside its field, nothing written.
    let before = std::fs::read_to_string(gate.config_path()).unwrap();
    let resp = save(vec![
        ("upstream.max_retries", "0".into()),
        ("auth.auth_token", String::new()),
    ])
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let html = resp.text().await.unwrap();
    let bad = html
        .split("id=\"setting-MAX_RETRIES\"")
        .nth(1)
        .unwrap()
        .split("</div>")
        .next()
        .unwrap();
    assert!(
        bad.contains("must be at least 1") && bad.contains("value=\"0\""),
        "{bad}"
    );
    assert_eq!(std::fs::read_to_string(gate.config_path()).unwrap(), before);

    // A good one: written, reloaded, live; the secret left empty is kept.
    let status = gate.reload_status().await;
    let resp = save(vec![
        ("upstream.max_retries", "4".into()),
        ("auth.auth_token", String::new()),
    ])
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    gate.wait_reloads(&status).await;
    let after = std::fs::read_to_string(gate.config_path()).unwrap();
    assert!(
        after.contains("max_retries = 4") && !after.contains("auth_token"),
        "{after}"
    );
    let (_, html) = page(
        &gate,
        &session.cookie,
        "/admin/settings?saved=upstream.max_retries",
    )
    .await;
    assert!(html.contains("id=\"saved\""));
    assert!(field_of(&html, "MAX_RETRIES").contains("value=\"4\""));
    // The session still works: the admin token did not change.
    assert_eq!(page(&gate, &session.cookie, "/admin/keys").await.0, 200);
}

fn field_of(html: &str, env: &str) -> String {
    html.split(&format!("id=\"setting-{env}\""))
        .nth(1)
        .and_then(|r| r.split("</div>").next())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn logs_plugins_and_dashboard_pages_show_what_happened() {
    let (fake, gate) = admin_gate(&[KEY_A, KEY_B]).await;
    fake.state.set_behaviour(KEY_A, Behaviour::Invalid);
    fake.state.set_behaviour(KEY_B, Behaviour::Invalid);
    let (status, _, _) = post(
        &gate,
        "/v1beta/models/gemini-2.0-flash:generateContent",
        &ask("hi"),
    )
    .await;
    assert_eq!(status, 400);
    wait_logged(&gate, 1).await;
    let session = login(&gate).await;

    let (_, html) = page(
        &gate,
        &session.cookie,
        "/admin/logs?log=errors&model=gemini-2.0-flash",
    )
    .await;
    let row = html
        .split("href=\"/admin/logs/errors/")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("an error row")
        .to_owned();
    assert!(html.contains("key_invalid"), "{html}");
    let (status, detail) = page(&gate, &session.cookie, &format!("/admin/logs/errors/{row}")).await;
    assert_eq!(status, 200);
    assert!(detail.contains("API key not valid"), "{detail}");
    let (_, none) = page(
        &gate,
        &session.cookie,
        "/admin/logs?log=errors&model=other-model",
    )
    .await;
    assert!(none.contains("No entries."));

    let (_, html) = page(&gate, &session.cookie, "/admin/plugins").await;
    for name in [
        "round_robin",
        "model_filter",
        "select_key",
        "id=\"generation\"",
    ] {
        assert!(html.contains(name), "{name}");
    }

    let (_, html) = page(&gate, &session.cookie, "/admin").await;
    assert!(
        html.contains("<svg") && html.contains("key_invalid"),
        "{html}"
    );
    assert!(html.contains("2 active · 0 cooling · 0 disabled"), "{html}");
}

//! What a hostile client can do with nothing but a client token: each test tries one attack.

use std::time::{Duration, Instant};

use crate::common::*;

/// A JSON schema whose `$defs` entry names itself from eight properties: inlined without a
/// bound it is more nodes than memory holds.
fn schema_bomb() -> Value {
    let props: serde_json::Map<String, Value> = (0..8)
        .map(|i| (format!("p{i}"), json!({ "$ref": "#/$defs/Node" })))
        .collect();
    json!({
        "type": "object",
        "properties": { "root": { "$ref": "#/$defs/Node" } },
        "$defs": { "Node": { "type": "object", "properties": props } }
    })
}

#[tokio::test]
async fn a_self_referring_schema_is_refused_at_once() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let bomb = schema_bomb();
    assert!(
        bomb.to_string().len() < 1024,
        "the attack is one small request"
    );
    let chat = |format: Value, tools: Value| {
        json!({
            "model": "gemini-2.5-flash",
            "messages": [{ "role": "user", "content": "hi" }],
            "response_format": format,
            "tools": tools,
        })
    };
    let in_format = chat(
        json!({ "type": "json_schema", "json_schema": { "name": "x", "schema": bomb } }),
        json!([]),
    );
    let in_tool = chat(
        Value::Null,
        json!([{ "type": "function", "function": { "name": "f", "parameters": bomb } }]),
    );
    for (body, param) in [
        (in_format, "response_format.json_schema.schema"),
        (in_tool, "tools[0].function.parameters"),
    ] {
        let started = Instant::now();
        let resp = client()
            .post(gate.url("/v1/chat/completions"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answered at once"
        );
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("itself"),
            "{v}"
        );
    }
    assert_eq!(fake.state.total_requests(), 0, "nothing went upstream");
    // The gateway is still there, and serves.
    let (status, ..) = post(&gate, GENERATE, &ask("still here")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_schema_that_expands_past_its_budget_is_refused() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    // No cycle: each level names the next eight times, 8^7 nodes once inlined.
    let mut defs = serde_json::Map::new();
    for level in 0..7 {
        let props: serde_json::Map<String, Value> = (0..8)
            .map(|i| {
                let next = json!({ "$ref": format!("#/$defs/L{}", level + 1) });
                (format!("p{i}"), next)
            })
            .collect();
        defs.insert(format!("L{level}"), json!({ "properties": props }));
    }
    defs.insert("L7".into(), json!({ "type": "string" }));
    let body = json!({
        "model": "gemini-2.5-flash",
        "messages": [{ "role": "user", "content": "hi" }],
        "response_format": { "type": "json_schema", "json_schema": { "name": "x",
            "schema": { "$ref": "#/$defs/L0", "$defs": defs } } },
    });
    let resp = client()
        .post(gate.url("/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("nodes"),
        "{v}"
    );

    // Few nodes but long strings: each tool's 64 KiB description is inlined 8 times (512 KiB a
    // tool). The tools of one request share one budget: four pass, eight do not.
    let tool = |i: usize| {
        let props: serde_json::Map<String, Value> = (0..8)
            .map(|p| (format!("p{p}"), json!({ "$ref": "#/$defs/Long" })))
            .collect();
        json!({ "type": "function", "function": { "name": format!("f{i}"), "parameters": {
            "type": "object", "properties": props,
            "$defs": { "Long": { "type": "string", "description": "x".repeat(64 << 10) } } } } })
    };
    let ask_with = |tools: usize| {
        json!({
            "model": "gemini-2.5-flash",
            "messages": [{ "role": "user", "content": "hi" }],
            "tools": (0..tools).map(tool).collect::<Vec<_>>(),
        })
    };
    let chat = |body: Value| {
        client()
            .post(gate.url("/v1/chat/completions"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
    };
    assert_eq!(chat(ask_with(4)).await.unwrap().status(), 200);
    let resp = chat(ask_with(8)).await.unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("bytes"),
        "{v}"
    );
}

#[tokio::test]
async fn a_403_for_a_file_the_key_cannot_see_is_the_clients_error() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "good-2", "good-3"])
        .env("MAX_FAILURES", "1")
        .admin()
        .start()
        .await;
    let body = json!({ "contents": [{ "role": "user", "parts": [
        { "text": "what is in it?" },
        { "fileData": { "mimeType": "text/plain",
            "fileUri": "https://generativelanguage.googleapis.com/v1beta/files/nobodys" } }
    ] }] });
    for _ in 0..3 {
        let (status, _, v) = post(&gate, GENERATE, &body).await;
        assert_eq!(status, 403, "Google's answer, passed through: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("permission"),
            "{v}"
        );
    }
    let naming = |fake: &FakeUpstream| {
        fake.state
            .received()
            .iter()
            .filter(|r| memchr::memmem::find(&r.body, b"nobodys").is_some())
            .count()
    };
    assert_eq!(naming(&fake), 3, "never retried on another key");
    // Each key that got the 403 is probed with a neutral call, which it answers: no key is
    // blamed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.state.total_requests() < 6 {
        assert!(Instant::now() < deadline, "the keys were probed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        key_states(&gate).await.iter().all(|(_, s)| s == "active"),
        "no key was blamed"
    );
    let (status, ..) = post(&gate, GENERATE, &ask("others are served")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_key_blaming_403_disables_a_key_only_when_a_probe_confirms_it() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "suspended-2"])
        .env("MAX_FAILURES", "1")
        .admin()
        .start()
        .await;
    // A request that provokes a key-blaming 403 on every key it is sent with.
    let resp = client()
        .post(gate.url(GENERATE))
        .header("x-goog-api-key", TOKEN)
        .header("x-fake-error", "403 SERVICE_DISABLED")
        .json(&ask("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // Each key is probed with a neutral call: the good one answers and stays, the suspended
    // one is refused again and goes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let states = key_states(&gate).await;
        let disabled: Vec<&str> = states
            .iter()
            .filter(|(_, s)| s == "disabled")
            .map(|(id, _)| id.as_str())
            .collect();
        if disabled.len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no probe decided: {states:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, v) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    let suspended = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == "disabled")
        .unwrap();
    assert!(
        suspended["disabled_reason"]
            .as_str()
            .unwrap()
            .contains("confirmed by a probe"),
        "{suspended}"
    );
    assert!(!v.to_string().contains("suspended-2"), "no secret: {v}");
    let (status, ..) = post(&gate, GENERATE, &ask("the good key serves")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_key_reported_as_leaked_is_probed_and_disabled() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "leaked-2"])
        .admin()
        .start()
        .await;
    // Google's 403 for a leaked key says no reason: the request that met it gets it as it
    // came, but the key's probe is refused too, and the key goes.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(post(&gate, GENERATE, &ask("hi")).await.0);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 403]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let states = key_states(&gate).await;
        if states.iter().any(|(_, s)| s == "disabled") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leaked key stays: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..4 {
        assert_eq!(post(&gate, GENERATE, &ask("hi")).await.0, 200);
    }
}

/// A one-answer HTTP server on `ip` (a loopback address): every request gets `answer`, and
/// the requests it saw are counted.
struct Tiny {
    addr: std::net::SocketAddr,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Tiny {
    async fn start(ip: &str, answer: Vec<u8>) -> Tiny {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut conn, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = conn.write_all(&answer).await;
                });
            }
        });
        Tiny { addr, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// An HTTP/1.1 answer with `status`, `headers` and `body`, closing the connection.
fn http_answer(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A chat request with one image URL.
fn chat_with_image(url: &str) -> Value {
    json!({
        "model": "gemini-2.5-flash",
        "messages": [{ "role": "user", "content": [
            { "type": "text", "text": "what is this?" },
            { "type": "image_url", "image_url": { "url": url } }
        ] }]
    })
}

async fn chat(gate: &Gate, body: &Value) -> (u16, Value) {
    let resp = client()
        .post(gate.url("/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn image_urls_at_inner_addresses_are_never_fetched() {
    let fake = fake().await;
    let secret = Tiny::start(
        "127.0.0.1",
        http_answer("200 OK", &[("content-type", "image/png")], b"INNER-SECRET"),
    )
    .await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let port = secret.addr.port();
    for url in [
        format!("http://127.0.0.1:{port}/x.png"),
        format!("http://127.1:{port}/x.png"),
        format!("http://2130706433:{port}/x.png"),
        format!("http://0x7f.0.0.1:{port}/x.png"),
        format!("http://[::ffff:127.0.0.1]:{port}/x.png"),
        format!("http://localhost:{port}/x.png"),
        // Never connected to: refused for their address alone.
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/x.png".to_owned(),
        "http://[fd00::1]/x.png".to_owned(),
    ] {
        let (status, v) = chat(&gate, &chat_with_image(&url)).await;
        assert_eq!(status, 400, "{url}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("public addresses"), "{url}: {message}");
    }
    assert_eq!(secret.hits(), 0, "no request reached the inner server");
    assert_eq!(fake.state.total_requests(), 0);
}

#[tokio::test]
async fn allowed_addresses_are_fetched_but_redirects_are_checked_again() {
    let fake = fake().await;
    // 127.0.0.2 is loopback too, but not in the allowlist.
    let inner = Tiny::start("127.0.0.2", http_answer("200 OK", &[], b"INNER")).await;
    let to_inner = format!("http://{}/secret.png", inner.addr);
    let redirect = Tiny::start(
        "127.0.0.1",
        http_answer("302 Found", &[("location", &to_inner)], b""),
    )
    .await;
    let png = Tiny::start(
        "127.0.0.1",
        http_answer("200 OK", &[("content-type", "image/png")], b"\x89PNG-bytes"),
    )
    .await;
    let not_found = Tiny::start(
        "127.0.0.1",
        http_answer("404 Not Found", &[], b"INNER-SECRET-PAGE"),
    )
    .await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_FETCH_ALLOW", "127.0.0.1/32")
        .start()
        .await;
    let (status, v) = chat(
        &gate,
        &chat_with_image(&format!("http://{}/ok.png", png.addr)),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let sent: Value = serde_json::from_slice(&fake.state.last_received().unwrap().body).unwrap();
    assert_eq!(
        sent["contents"][0]["parts"][1]["inlineData"]["mimeType"], "image/png",
        "{sent}"
    );

    let (status, v) = chat(
        &gate,
        &chat_with_image(&format!("http://{}/r.png", redirect.addr)),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(redirect.hits(), 1);
    assert_eq!(
        inner.hits(),
        0,
        "the redirect to an inner address was not followed"
    );

    let (status, v) = chat(
        &gate,
        &chat_with_image(&format!("http://{}/x.png", not_found.addr)),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    // The client's own URL is named (its port may hold "404"); what answered there is not.
    let text = v.to_string().replace(&not_found.addr.to_string(), "ADDR");
    assert!(
        !text.contains("INNER-SECRET") && !text.contains("404") && !text.contains("Not Found"),
        "{text}"
    );
}

#[tokio::test]
async fn fetched_bytes_have_a_budget_and_fetching_can_be_off() {
    let fake = fake().await;
    let big = Tiny::start(
        "127.0.0.1",
        http_answer("200 OK", &[("content-type", "image/png")], &[7u8; 4000]),
    )
    .await;
    let url = format!("http://{}/big.png", big.addr);
    let budgeted = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_FETCH_ALLOW", "127.0.0.1")
        .env("GEMGATE_FETCH_MAX_BYTES", "6000")
        .start()
        .await;
    // One file fits; two of them pass the request's budget.
    let (status, v) = chat(&budgeted, &chat_with_image(&url)).await;
    assert_eq!(status, 200, "{v}");
    let mut two = chat_with_image(&url);
    two["messages"][0]["content"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "type": "image_url", "image_url": { "url": url } }));
    let (status, v) = chat(&budgeted, &two).await;
    assert_eq!(status, 413, "{v}");

    let off = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_FETCH_ENABLED", "false")
        .start()
        .await;
    let (status, v) = chat(&off, &chat_with_image("https://images.example.com/x.png")).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not fetch"),
        "{v}"
    );
}

/// `GET /admin/api/reload`'s count of refused requests of `kind`.
async fn refused(gate: &Gate, kind: &str) -> u64 {
    gate.reload_status().await["refused"][kind]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn unauthenticated_and_malformed_requests_are_counted_never_logged() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).admin().start().await;
    let (status, ..) = post(&gate, GENERATE, &ask("a client's request")).await;
    assert_eq!(status, 200);
    let (status, ..) = post_as(&gate, "sk-wrong", GENERATE, &ask("x")).await;
    assert_eq!(status, 401);
    let resp = client()
        .post(gate.url(GENERATE))
        .json(&ask("no token"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // A model name past 128 bytes, in each protocol's shape.
    let long = "m".repeat(129);
    let (status, _, v) = post(
        &gate,
        &format!("/v1beta/models/{long}:generateContent"),
        &ask("x"),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT", "{v}");
    let resp = client()
        .post(gate.url("/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(&json!({ "model": long, "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "model", "{v}");
    // A target past 8 KiB.
    let resp = client()
        .get(gate.url(&format!("/v1beta/models?x={}", "a".repeat(9000))))
        .header("x-goog-api-key", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 414);
    let resp = client()
        .get(gate.url("/no/such/path"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // Only the client's requests are logged: the one that worked and the chat with a long
    // model name (a known client's mistake).
    wait_logged(&gate, 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/logs/requests",
        None,
    )
    .await;
    let rows = v["rows"].as_array().unwrap();
    assert!(rows.len() <= 2, "{v}");
    assert!(
        rows.iter().all(|r| r["record"]["client"].is_string()),
        "only a known client's requests: {v}"
    );
    let (_, errors) = admin(reqwest::Method::GET, &gate, "/admin/api/logs/errors", None).await;
    assert!(!errors.to_string().contains("mmmmmmmm"), "{errors}");
    assert_eq!(refused(&gate, "unauthenticated").await, 2);
    assert!(refused(&gate, "malformed").await >= 3);
}

#[tokio::test]
async fn wrong_client_tokens_are_throttled_per_address_but_a_right_one_passes() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).admin().start().await;
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let (status, ..) = post_as(&gate, "sk-guess", GENERATE, &ask("x")).await;
        statuses.push(status);
    }
    assert_eq!(&statuses[..10], &[401; 10]);
    assert_eq!(&statuses[10..], &[429, 429], "then each guess waits");
    let resp = client()
        .post(gate.url(GENERATE))
        .header("x-goog-api-key", "sk-guess")
        .json(&ask("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let (status, ..) = post(&gate, GENERATE, &ask("the right token")).await;
    assert_eq!(
        status, 200,
        "a right token passes while the address is throttled"
    );

    // The admin's right token passes too, while wrong ones from the same address wait.
    for _ in 0..5 {
        let resp = client()
            .get(gate.url("/admin/api/keys"))
            .bearer_auth("not-the-admin")
            .send()
            .await
            .unwrap();
        assert!(matches!(resp.status().as_u16(), 401 | 429));
    }
    let (status, _) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn forwarding_headers_count_only_from_trusted_proxies() {
    let fake = fake().await;
    let wrong_admin = |gate: &Gate, forwarded_for: String| {
        client()
            .get(gate.url("/admin/api/keys"))
            .bearer_auth("not-the-admin")
            .header("x-forwarded-for", forwarded_for)
            .send()
    };
    // Untrusted: a client cannot spread its guesses over addresses of its choosing.
    let direct = gate().upstream(&fake, &["good-1"]).admin().start().await;
    let mut last = 0;
    for i in 0..5 {
        last = wrong_admin(&direct, format!("198.51.100.{i}"))
            .await
            .unwrap()
            .status()
            .as_u16();
    }
    assert_eq!(last, 429, "counted under the connection's address");
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = no_redirects
        .post(direct.url("/admin/login"))
        .header("x-forwarded-proto", "https")
        .form(&[("token", ADMIN)])
        .send()
        .await
        .unwrap();
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.starts_with("gemgate_admin=") && !cookie.contains("Secure"),
        "{cookie}"
    );

    // Behind a trusted proxy, each forwarded client has its own count, and https is believed.
    let proxied = gate()
        .upstream(&fake, &["good-1"])
        .admin()
        .env("GEMGATE_TRUSTED_PROXIES", "127.0.0.1")
        .start()
        .await;
    for i in 0..5 {
        let status = wrong_admin(&proxied, format!("6.6.6.6, 198.51.100.{i}"))
            .await
            .unwrap()
            .status();
        assert_eq!(status, 401, "client {i} has failed once");
    }
    let login = no_redirects
        .post(proxied.url("/admin/login"))
        .header("x-forwarded-proto", "https")
        .form(&[("token", ADMIN)])
        .send()
        .await
        .unwrap();
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.starts_with("__Host-gemgate_admin=") && cookie.contains("Secure"),
        "{cookie}"
    );
}

#[test]
fn an_admin_token_that_is_also_a_client_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gemgate"))
        .current_dir(dir.path())
        .env_clear()
        .env("GEMGATE_LISTEN", "127.0.0.1:0")
        .env("GEMGATE_DATA_DIR", dir.path().join("data"))
        .env("ALLOWED_TOKENS", "sk-one,sk-shared")
        .env("AUTH_TOKEN", "sk-shared")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("AUTH_TOKEN") && !stderr.contains("sk-shared"),
        "{stderr}"
    );
}

#[tokio::test]
async fn policy_sees_every_call_it_could_refuse() {
    let fake = fake().await;
    let deny_all = r#"return { name = "deny_all", on_request = function(req)
        return gemgate.deny(403, "no " .. req.action .. " for " .. req.client) end }"#;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .plugin("deny_all", deny_all)
        .start()
        .await;
    // The pass-through refuses a call whose model it cannot tell, rather than pass it unchecked.
    for body in [json!({ "messages": [] }), json!({ "model": "../x" })] {
        let resp = client()
            .post(gate.url("/openai/v1/chat/completions"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
    }
    let resp = client()
        .post(gate.url("/openai/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // The Files and upload routes go through on_request.
    let (status, v) = get(&gate, "/v1beta/files").await;
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("files.list"),
        "{v}"
    );
    let resp = client()
        .post(gate.url("/upload/v1beta/files"))
        .header("x-goog-api-key", TOKEN)
        .header("x-goog-upload-command", "start")
        .json(&json!({ "file": {} }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(fake.state.total_requests(), 0);
}

#[tokio::test]
async fn upstream_requests_carry_only_what_google_should_see() {
    let fake = fake().await;
    let plain = gate().upstream(&fake, &["good-1"]).start().await;
    let send = |query: &'static str| {
        client()
            .post(plain.url(&format!("{GENERATE}?{query}")))
            .header("x-goog-api-key", TOKEN)
            .header("connection", "keep-alive, x-secret-hop")
            .header("x-secret-hop", "for the next hop only")
            .header("x-goog-user-project", "someone-elses-project")
            .header("x-http-method-override", "DELETE")
            .header("x-kept", "yes")
            .json(&ask("hi"))
            .send()
    };
    for query in ["%6Bey=sk-test-token", "KEY=sk-test-token&alt=json", "key"] {
        assert_eq!(send(query).await.unwrap().status(), 200);
        let seen = fake.state.last_received().unwrap();
        assert!(
            !seen.query.to_ascii_lowercase().contains("key")
                && !seen.query.contains("6B")
                && !seen.query.contains("6b"),
            "{query} -> {}",
            seen.query
        );
        let names: Vec<&str> = seen.headers.iter().map(|(n, _)| n.as_str()).collect();
        for hidden in [
            "x-secret-hop",
            "x-goog-user-project",
            "x-http-method-override",
        ] {
            assert!(
                !names.contains(&hidden),
                "{hidden} went upstream: {names:?}"
            );
        }
        assert!(names.contains(&"x-kept"));
        assert_eq!(seen.key.as_deref(), Some("good-1"));
    }

    let allowing = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_FORWARD_HEADERS", "x-goog-user-project")
        .start()
        .await;
    let resp = client()
        .post(allowing.url(GENERATE))
        .header("x-goog-api-key", TOKEN)
        .header("x-goog-user-project", "my-project")
        .json(&ask("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = fake.state.last_received().unwrap();
    assert!(
        seen.headers
            .iter()
            .any(|(n, v)| n == "x-goog-user-project" && v == "my-project")
    );
}

#[tokio::test]
async fn plugins_never_see_the_clients_credentials_nor_escape_their_budget() {
    let fake = fake().await;
    let echo = r#"return { name = "echo", on_request = function(req)
        if req.model == "gemini-2.5-pro" then
          local function spin() while true do end end
          while true do pcall(spin) end
        end
        local names = {}
        for name, value in pairs(req.headers) do names[#names + 1] = name .. "=" .. value end
        table.sort(names)
        return gemgate.deny(418, table.concat(names, ";")) end }"#;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .plugin("echo", echo)
        .start()
        .await;
    let resp = client()
        .post(gate.url(GENERATE))
        .header("x-goog-api-key", TOKEN)
        .header("authorization", "Bearer also-secret")
        .header("x-api-key", "secret-3")
        .header("cookie", "session=secret-4")
        .header("x-visible", "yes")
        .json(&ask("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 418);
    let v: Value = resp.json().await.unwrap();
    let seen = v["error"]["message"].as_str().unwrap();
    assert!(seen.contains("x-visible=yes"), "{seen}");
    for secret in [
        TOKEN,
        "also-secret",
        "secret-3",
        "secret-4",
        "authorization",
        "cookie",
    ] {
        assert!(!seen.contains(secret), "{secret} in {seen}");
    }
    // A plugin that catches its budget's error in a loop is still stopped: the request goes
    // on with the built-in behaviour.
    let started = Instant::now();
    let (status, ..) = post(
        &gate,
        "/v1beta/models/gemini-2.5-pro:generateContent",
        &ask("hi"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn slow_heads_and_bodies_are_cut_off() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_HEADER_TIMEOUT_SECONDS", "1")
        .admin()
        .start()
        .await;
    // A head sent byte by byte, forever: closed once its second is up.
    let started = Instant::now();
    let mut conn = raw(
        &gate,
        "POST /v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\n",
    )
    .await;
    let mut closed = false;
    for _ in 0..40 {
        use tokio::io::AsyncWriteExt;
        if conn.write_all(b"x").await.is_err() {
            closed = true;
            break;
        }
        if closed_within(&mut conn, Duration::from_millis(100)).await.0 {
            closed = true;
            break;
        }
    }
    assert!(closed, "the trickling head was never cut off");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
    // A new connection that sends nothing is closed too.
    let mut silent = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await.0);
    assert!(refused(&gate, "slow").await >= 1);
    let (status, ..) = post(&gate, GENERATE, &ask("a whole head")).await;
    assert_eq!(status, 200);
    // A connection kept alive waits for its next request past the head timeout (the
    // keep-alive's wait is longer), and each request has the head timeout anew.
    use tokio::io::AsyncWriteExt;
    let health = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut kept = raw(&gate, health).await;
    for round in 0..3 {
        let answer = answered(&mut kept, Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{round}: {answer:?}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        kept.write_all(health.as_bytes()).await.unwrap();
    }
    let answer = answered(&mut kept, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // Then a head begun and left unfinished on it is cut off as on a new connection.
    kept.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut kept, Duration::from_secs(5)).await.0);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_trickling_body_gets_408() {
    use tokio::io::AsyncWriteExt;
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let mut conn = raw(
        &gate,
        &format!(
            "POST {GENERATE} HTTP/1.1\r\nHost: x\r\nx-goog-api-key: {TOKEN}\r\ncontent-length: 1000000\r\n\r\n"
        ),
    )
    .await;
    // 100 bytes a second: under the 1 KiB a second a body must average after 10 seconds.
    let started = Instant::now();
    let mut answer = String::new();
    while started.elapsed() < Duration::from_secs(25) {
        if conn.write_all(&[b' '; 100]).await.is_err() {
            break;
        }
        let (closed, got) = closed_within(&mut conn, Duration::from_secs(1)).await;
        answer.push_str(&got);
        if closed || !got.is_empty() {
            break;
        }
    }
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "{took:?}"
    );
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_accept() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_MAX_CONNECTIONS", "4")
        .admin()
        .start()
        .await;
    // Each held connection is answered once and kept alive: an answer proves it was accepted
    // and counted (a connection still in the kernel's backlog would not be).
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut conn = raw(&gate, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let answer = answered(&mut conn, Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        held.push(conn);
    }
    let mut extra = raw(&gate, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (closed, got) = closed_within(&mut extra, Duration::from_secs(5)).await;
    assert!(closed && got.is_empty(), "closed unanswered: {got:?}");
    drop(held);
    // With the held ones gone, the gateway serves again (the admin call is a connection too).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = client()
            .get(gate.url("/admin/api/reload"))
            .bearer_auth(ADMIN)
            .send()
            .await;
        if let Ok(resp) = resp {
            let v: Value = resp.json().await.unwrap();
            assert!(v["refused"]["connections"].as_u64().unwrap() >= 1, "{v}");
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_thousand_half_sent_requests_do_not_slow_anyone_else() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).start().await;
    let http = client();
    let p99 = |mut times: Vec<Duration>| {
        times.sort();
        times[times.len() * 99 / 100]
    };
    let measure = || async {
        let mut times = Vec::new();
        for _ in 0..300 {
            let started = Instant::now();
            let resp = http
                .post(gate.url(GENERATE))
                .header("x-goog-api-key", TOKEN)
                .json(&ask("hi"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.bytes().await.unwrap();
            times.push(started.elapsed());
        }
        times
    };
    measure().await; // warm: the first calls open connections
    let unloaded = p99(measure().await);
    let mut half_sent = Vec::new();
    for i in 0..1000 {
        let head = format!(
            "POST /v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\nHost: x\r\nX-N: {i}\r\n"
        );
        half_sent.push(raw(&gate, &head).await);
    }
    // Let the gateway take them all in first: the item is about requests held open, not about
    // the moment a thousand connections arrive at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = p99(measure().await);
    eprintln!("p99 unloaded {unloaded:?}, with 1000 half-sent requests {loaded:?}");
    // Twice the unloaded p99, with a generous floor: the suite runs many gateways at once,
    // and a test's p99 moves with them (the figures seen are printed).
    assert!(
        loaded <= (unloaded * 2).max(Duration::from_millis(250)),
        "p99 unloaded {unloaded:?}, loaded {loaded:?}"
    );
    drop(half_sent);
}

/// gemgate's resident memory, from /proc.
fn rss_kib(gate: &Gate) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", gate.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_client_that_stops_reading_a_stream_meets_a_write_timeout() {
    use tokio::io::AsyncWriteExt;
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("TIME_OUT", "10")
        .admin()
        .start()
        .await;
    // A 6 MB answer in 20 events (more than the sockets' buffers hold), to a client with a
    // tiny receive window that reads nothing.
    let body = ask(&"a".repeat(6 << 20)).to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(gate.addr).await.unwrap();
    let head = format!(
        "POST /v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse HTTP/1.1\r\nHost: x\r\nx-goog-api-key: {TOKEN}\r\nx-fake-chunks: 20\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    let before = rss_kib(&gate);
    // The request ends on its own: the client is gone as far as gemgate is concerned.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = admin(
            reqwest::Method::GET,
            &gate,
            "/admin/api/logs/requests?class=client_gone",
            None,
        )
        .await;
        if !v["rows"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the stalled stream never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let grown = rss_kib(&gate).saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "gemgate grew by {grown} KiB for one stalled stream"
    );
    drop(conn);
}

#[tokio::test]
async fn the_data_file_stays_under_its_cap_and_keeps_key_state() {
    let fake = fake().await;
    let cap: u64 = 16 << 20;
    let gate = gate()
        .upstream(&fake, &["good-1", "invalid-2"])
        .env("GEMGATE_MAX_DATA_BYTES", &cap.to_string())
        .env("ERROR_LOG_RECORD_REQUEST_BODY", "true")
        .env("MAX_FAILURES", "1")
        .admin()
        .start()
        .await;
    // Key state to keep: the invalid key is disabled by the first request it serves.
    for _ in 0..2 {
        post(&gate, GENERATE, &ask("hi")).await;
    }
    let file = gate.dir.path().join("data/gemgate.redb");
    let size = || std::fs::metadata(&file).map_or(0, |m| m.len());
    // Each failed request keeps 48 KB of its body in the error log: 19 MB in all, random so
    // that the log's compression cannot make it small.
    let mut largest = 0;
    for i in 0..400 {
        let padding: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(48 * 1024)
            .collect();
        let bad = json!({ "padding": padding });
        let (status, ..) = post(&gate, GENERATE, &bad).await;
        assert_eq!(status, 400);
        if i % 20 == 0 {
            largest = largest.max(size());
        }
    }
    // The flusher writes (and trims) once a second.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        largest = largest.max(size());
    }
    eprintln!("the data file reached {largest} bytes at most, for a cap of {cap}");
    assert!(
        largest <= cap + cap / 20,
        "the data file reached {largest} bytes, over {cap} + 5%"
    );
    let (_, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/logs/errors?limit=1000",
        None,
    )
    .await;
    let kept = v["rows"].as_array().unwrap().len();
    assert!(kept > 0 && kept < 400, "the oldest went first: {kept} kept");
    let states = key_states(&gate).await;
    assert!(
        states.iter().any(|(_, s)| s == "disabled"),
        "key state is never what goes: {states:?}"
    );
}

#[tokio::test]
async fn request_logging_can_be_sampled_or_off_and_the_dashboard_counts_everything() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_REQUEST_LOG_SAMPLE", "0")
        .admin()
        .start()
        .await;
    for _ in 0..12 {
        assert_eq!(post(&gate, GENERATE, &ask("hi")).await.0, 200);
    }
    let (status, ..) = post(&gate, GENERATE, &json!({ "no": "contents" })).await;
    assert_eq!(status, 400);
    // The failed one is in the error log; the request log keeps nothing.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = admin(reqwest::Method::GET, &gate, "/admin/api/logs/errors", None).await;
        if !v["rows"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failed request was never logged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/logs/requests",
        None,
    )
    .await;
    assert_eq!(v["rows"], json!([]), "{v}");
    let html = admin_page(&gate, "/admin").await;
    assert!(
        html.contains("13 in the last hour"),
        "the dashboard counts every request"
    );
}

#[tokio::test]
async fn no_secret_reaches_an_answer_or_the_log() {
    let fake = fake().await;
    let key = "suspended-AIzaSyQuiteSecretKeyMaterial000";
    let gate = gate()
        .upstream(&fake, &["good-AIzaSyAnotherSecretKeyMaterial111", key])
        .env("MAX_FAILURES", "1")
        .env("UPLOAD_PROVIDER", "cloudflare_imgbed")
        // Nothing listens there: the upload fails, and its error must not show the URL.
        .env("CLOUDFLARE_IMGBED_URL", "http://127.0.0.1:9/upload")
        .env("CLOUDFLARE_IMGBED_AUTH_CODE", "imgbed-secret-code")
        .env(
            "CUSTOM_HEADERS",
            r#"{"x-custom-secret": "custom-secret-value"}"#,
        )
        .admin()
        .start()
        .await;
    let mut answers = String::new();
    for _ in 0..3 {
        let (_, _, v) = post(&gate, GENERATE, &ask("hi")).await;
        answers.push_str(&v.to_string());
    }
    let resp = client()
        .post(gate.url("/v1/images/generations"))
        .bearer_auth(TOKEN)
        .json(&json!({ "prompt": "a cat", "response_format": "url" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    answers.push_str(&resp.text().await.unwrap());
    // The key-blaming 403 is confirmed by a probe, whose message is kept with the key.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for path in [
        "/admin/api/keys",
        "/admin/api/logs/errors",
        "/admin/api/reload",
    ] {
        answers.push_str(
            &admin(reqwest::Method::GET, &gate, path, None)
                .await
                .1
                .to_string(),
        );
    }
    for page in ["/admin/settings", "/admin/keys"] {
        answers.push_str(&admin_page(&gate, page).await);
    }
    let logs = gate.logs();
    for secret in [
        "QuiteSecretKeyMaterial",
        "AnotherSecretKeyMaterial",
        "imgbed-secret-code",
        "custom-secret-value",
        TOKEN,
        ADMIN,
    ] {
        assert!(!answers.contains(secret), "{secret} in an answer");
        assert!(!logs.contains(secret), "{secret} in the log:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_older_than_the_last_flush() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let fake = fake().await;
    let mut gate = gate()
        .upstream(&fake, &["good-1", "good-2", "invalid-3", "minute-4"])
        .env("MAX_FAILURES", "1")
        .admin()
        .start()
        .await;
    // Key state that the load changes early: one key disabled, one cooling.
    for _ in 0..4 {
        assert_eq!(post(&gate, GENERATE, &ask("x")).await.0, 200);
    }
    let changed_at = Instant::now();
    let completed: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (url, completed, stop, next) = (
            gate.url(GENERATE),
            completed.clone(),
            stop.clone(),
            next.clone(),
        );
        load.push(tokio::spawn(async move {
            let http = client();
            while !stop.load(Ordering::Relaxed) {
                let id = format!("load-{}", next.fetch_add(1, Ordering::Relaxed));
                let sent = http
                    .post(&url)
                    .header("x-goog-api-key", TOKEN)
                    .header("x-request-id", &id)
                    .json(&ask("load"))
                    .send()
                    .await;
                let Ok(resp) = sent else { continue };
                if resp.status() == 200 && resp.bytes().await.is_ok() {
                    completed.lock().unwrap().push((id, Instant::now()));
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    gate.signal("KILL");
    let killed_at = Instant::now();
    stop.store(true, Ordering::Relaxed);
    for task in load {
        let _ = task.await;
    }
    gate.wait_exit(Duration::from_secs(10)).await;
    gate.start_again().await;

    // The data file opened cleanly, with the key state from before the last flush.
    assert!(changed_at + Duration::from_secs(2) < killed_at);
    let states = key_states(&gate).await;
    let disabled = states.iter().filter(|(_, s)| s == "disabled").count();
    let cooling = states.iter().filter(|(_, s)| s == "cooling").count();
    assert_eq!((disabled, cooling), (1, 1), "{states:?}");

    // Every answer completed more than a flush before the kill is in the request log: the
    // flusher runs every second (and a stand-in when it is half a second late on a busy
    // machine), and a flush takes its own time.
    let mut logged = std::collections::HashSet::new();
    let mut before = String::new();
    loop {
        let path = format!("/admin/api/logs/requests?limit=1000{before}");
        let (_, v) = admin(reqwest::Method::GET, &gate, &path, None).await;
        for row in v["rows"].as_array().unwrap() {
            logged.insert(row["record"]["id"].as_str().unwrap().to_owned());
        }
        match v["next"].as_str() {
            Some(next) => before = format!("&before={next}"),
            None => break,
        }
    }
    let completed = completed.lock().unwrap();
    assert!(completed.len() > 50, "the load ran: {}", completed.len());
    // A generous margin over the second a flush takes on a quiet machine (this suite runs
    // many gateways at once); the figure seen is printed.
    let window = Duration::from_millis(3500);
    let missing: Vec<(&String, Duration)> = completed
        .iter()
        .filter(|(id, _)| !logged.contains(id))
        .map(|(id, at)| (id, killed_at.saturating_duration_since(*at)))
        .collect();
    let oldest_missing = missing
        .iter()
        .map(|(_, age)| *age)
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} answers completed, {} logged, {} missing, the oldest missing {oldest_missing:?} before the kill",
        completed.len(),
        logged.len(),
        missing.len()
    );
    assert!(
        oldest_missing <= window,
        "an answer completed {oldest_missing:?} before the kill is not in the log"
    );
}

#[tokio::test]
async fn page_numbers_at_the_edge_of_arithmetic_are_answered() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).admin().start().await;
    let max = u64::MAX;
    for path in [
        format!("/admin/api/keys?page={max}&per_page={max}"),
        format!("/admin/keys?page={max}&per_page={max}"),
        format!("/admin/api/logs/requests?limit={max}&before={max}"),
        format!("/admin/api/logs/errors?from={max}&to={max}"),
    ] {
        let resp = client()
            .get(gate.url(&path))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert!(
            resp.status() == 200 || resp.status() == 400,
            "{path}: {}",
            resp.status()
        );
    }
    assert_eq!(post(&gate, GENERATE, &ask("still here")).await.0, 200);
}

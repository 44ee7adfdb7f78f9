//! Gemini's newer surfaces — Interactions, Batch, the Live API and its ephemeral tokens — each
//! resource pinned to the key whose project made it, driven by Google's own SDK and by hand.

use std::net::SocketAddr;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

const OTHER: &str = "sk-other-client";

/// A fake whose keys each hold a Cloud project of their own, and a gemgate in front of them
/// for two clients.
async fn projects_and_gate(
    keys: &[&str],
    tls: bool,
) -> (gemgate_fake_upstream::FakeUpstream, Gate) {
    let fake = fake().await;
    let projects = keys.iter().enumerate().map(|(i, k)| {
        let p = gemgate_fake_upstream::QuotaProject {
            keys: vec![k.to_string()],
            ..Default::default()
        };
        (format!("p{i}"), p)
    });
    fake.state
        .set_quota(gemgate_fake_upstream::QuotaModel {
            projects: projects.collect(),
            ..Default::default()
        })
        .unwrap();
    let mut builder = gate()
        .upstream(&fake, keys)
        .env("ALLOWED_TOKENS", &format!(r#"["{TOKEN}", "{OTHER}"]"#))
        .shipped_plugins()
        .admin();
    if tls {
        builder = builder.tls();
    }
    (fake, builder.start().await)
}

/// Runs an SDK script against a gemgate (over TLS with `tls`, the script trusting the test
/// authority) in front of a fake whose keys each hold a project of their own; `None` when the
/// SDK is not installed (outside `scripts/test.sh`).
async fn sdk_run(
    script: &str,
    keys: &[&str],
    tls: bool,
) -> Option<(gemgate_fake_upstream::FakeUpstream, Gate, String)> {
    let python = needed_env("GEMGATE_SDK_PYTHON")?;
    let (fake, gate) = projects_and_gate(keys, tls).await;
    let (url, ca) = (gate.url(""), test_ca());
    let env = [
        ("GEMGATE_URL", url.as_str()),
        ("GEMGATE_TOKEN", TOKEN),
        ("GEMGATE_OTHER_TOKEN", OTHER),
        ("SSL_CERT_FILE", ca.as_str()),
    ];
    let report = run_python(&python, script, &env, &gate).await;
    Some((fake, gate, report))
}

/// How many requests each key served, for the keys that served any.
fn served(fake: &gemgate_fake_upstream::FakeUpstream, keys: &[&str]) -> Vec<(String, u64)> {
    keys.iter()
        .map(|k| (k.to_string(), fake.state.key_stats(k).requests))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Every request the fake received about a resource (`…/interactions/ID…`, `…/batches/ID…`)
/// came with the key that made it.
fn each_call_on_its_owner(
    fake: &gemgate_fake_upstream::FakeUpstream,
    collection: &str,
    owner: impl Fn(&str) -> Option<String>,
) -> usize {
    let mut checked = 0;
    for r in fake.state.received() {
        // A call on one (`…/interactions/ID`), or a follow-up naming one.
        let follows = serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|v| v["previous_interaction_id"].as_str().map(str::to_owned));
        let on_one = r.path.split(&format!("/{collection}/")).nth(1);
        let id = match (on_one, &follows) {
            (Some(rest), _) => rest.split(['/', ':']).next().unwrap_or_default(),
            (None, Some(previous)) => previous.as_str(),
            (None, None) => continue,
        };
        let holder = owner(id).unwrap_or_else(|| panic!("{collection}/{id} has no owner"));
        assert_eq!(
            r.key.as_deref(),
            Some(holder.as_str()),
            "{} {}",
            r.method,
            r.path
        );
        checked += 1;
    }
    checked
}

#[tokio::test]
async fn interactions_follow_the_key_that_made_them_with_the_sdk() {
    let keys = ["talk-1", "talk-2", "talk-3"];
    let Some((fake, _gate, report)) = sdk_run("sdk/genai_interactions.py", &keys, false).await
    else {
        return;
    };
    assert!(report.contains("ok   deleted"), "{report}");
    // Round robin spread the new interactions; every call about one went to its key.
    assert!(served(&fake, &keys).len() > 1, "{:?}", served(&fake, &keys));
    let checked =
        each_call_on_its_owner(&fake, "interactions", |id| fake.state.interaction_owner(id));
    assert!(
        checked >= 17,
        "{checked} calls about interactions: {report}"
    );
}

#[tokio::test]
async fn batches_and_their_results_stay_on_their_key_with_the_sdk() {
    let keys = ["batch-1", "batch-2", "batch-3"];
    let Some((fake, gate, report)) = sdk_run("sdk/genai_batches.py", &keys, false).await else {
        return;
    };
    assert!(report.contains("ok   deleted"), "{report}");
    let checked = each_call_on_its_owner(&fake, "batches", |id| fake.state.batch_owner(id));
    assert!(checked >= 8, "{checked} calls about batches: {report}");
    // The results file was downloaded three times, each with the batch's key.
    let downloads: Vec<_> = fake
        .state
        .received()
        .into_iter()
        .filter(|r| r.path.ends_with(":download"))
        .collect();
    assert_eq!(downloads.len(), 3, "{report}");
    let holders: std::collections::HashSet<_> = downloads.iter().map(|r| r.key.clone()).collect();
    assert_eq!(holders.len(), 1, "{holders:?}");
    // Batch traffic is counted apart.
    let metrics = metrics_text(&gate).await;
    assert!(metrics.contains(r#"route="batch""#), "{metrics}");
}

#[tokio::test]
async fn live_sessions_and_ephemeral_tokens_with_the_sdk() {
    let keys = ["live-1", "live-2", "live-3"];
    let Some((fake, gate, report)) = sdk_run("sdk/genai_live.py", &keys, true).await else {
        return;
    };
    assert!(report.contains("ok   forged token refused"), "{report}");
    // Six sessions spread over the keys, each one upgrade; the ephemeral token's session went
    // with the key that minted it.
    let upgrades: Vec<_> = fake
        .state
        .received()
        .into_iter()
        .filter(|r| r.path.contains("/ws/"))
        .collect();
    assert_eq!(upgrades.len(), 7, "{report}");
    let token = report
        .lines()
        .find_map(|l| l.strip_prefix("token "))
        .unwrap()
        .trim();
    let minted = fake
        .state
        .received()
        .into_iter()
        .find(|r| r.path.ends_with("/auth_tokens"))
        .and_then(|r| r.key)
        .unwrap();
    assert_eq!(
        fake.state.token_owner(token).as_deref(),
        Some(minted.as_str())
    );
    // The browser's session went with the token's key.
    let constrained: Vec<_> = upgrades
        .iter()
        .filter(|r| r.path.ends_with("Constrained"))
        .collect();
    assert_eq!(constrained.len(), 1, "{report}");
    assert_eq!(constrained[0].key.as_deref(), Some(minted.as_str()));
    let (_, v) = admin(
        Method::GET,
        &gate,
        "/admin/api/resources?kind=auth_tokens",
        None,
    )
    .await;
    // The token is a credential: kept, shown and logged only as a hash of it.
    let listed = v["resources"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{v}");
    assert!(
        listed[0]["id"]
            .as_str()
            .unwrap()
            .starts_with("auth_tokens/"),
        "{v}"
    );
    let secret = token.trim_start_matches("auth_tokens/");
    assert!(!v.to_string().contains(secret), "{v}");
    assert!(!gate.logs().contains(secret), "the token is in the log");
    assert!(served(&fake, &keys).len() > 1, "{:?}", served(&fake, &keys));
}

/// A minimal WebSocket client: the upgrade, masked text frames out, frames in.
struct Ws(TcpStream);

impl Ws {
    /// Opens `path` on `addr` with `headers`: the socket after a 101, or the refusal's status and
    /// body.
    async fn open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Ws, (u16, String)> {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let mut head = format!(
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n"
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") {
            assert_eq!(conn.read(&mut byte).await.unwrap(), 1, "closed mid-head");
            answer.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status: u16 = text[9..12].parse().unwrap();
        if status == 101 {
            assert!(
                text.to_ascii_lowercase()
                    .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
                "{text}"
            );
            return Ok(Ws(conn));
        }
        let length = text
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body).await.unwrap();
        Err((status, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn send(&mut self, text: &str) {
        let mask = [7u8, 1, 9, 3];
        let mut frame = vec![0x81];
        let len = text.len();
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        frame.extend_from_slice(&mask);
        frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.0.write_all(&frame).await.unwrap();
    }

    /// The next text or binary message, as JSON; `None` once closed.
    async fn recv(&mut self) -> Option<Value> {
        loop {
            let mut head = [0u8; 2];
            self.0.read_exact(&mut head).await.ok()?;
            let mut len = (head[1] & 0x7f) as usize;
            if len == 126 {
                let mut ext = [0u8; 2];
                self.0.read_exact(&mut ext).await.ok()?;
                len = u16::from_be_bytes(ext) as usize;
            } else if len == 127 {
                let mut ext = [0u8; 8];
                self.0.read_exact(&mut ext).await.ok()?;
                len = u64::from_be_bytes(ext) as usize;
            }
            let mut payload = vec![0u8; len];
            self.0.read_exact(&mut payload).await.ok()?;
            match head[0] & 0x0f {
                1 | 2 => return serde_json::from_slice(&payload).ok(),
                8 => return None,
                _ => continue,
            }
        }
    }
}

const LIVE: &str = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";

/// A Live session's setup.
async fn setup(ws: &mut Ws) {
    ws.send(r#"{"setup":{"model":"models/gemini-live-2.5-flash-preview"}}"#)
        .await;
    let setup = ws.recv().await.unwrap();
    assert!(setup.get("setupComplete").is_some(), "{setup}");
}

/// One turn of a Live session: a text, its echo, the turn's end.
async fn one_turn(ws: &mut Ws, text: &str) {
    let turn = json!({ "client_content": { "turns": [{ "role": "user", "parts": [{ "text": text }] }], "turnComplete": true } });
    ws.send(&turn.to_string()).await;
    let echo = ws.recv().await.unwrap();
    assert_eq!(
        echo.pointer("/serverContent/modelTurn/parts/0/text"),
        Some(&json!(format!("echo: {text}"))),
        "{echo}"
    );
    let end = ws.recv().await.unwrap();
    assert_eq!(end["serverContent"]["turnComplete"], true, "{end}");
}

/// A key whose upgrade Google refuses is passed over for the next (and pays for it, as for any
/// request); an open session stays on its key however many turns it takes.
#[tokio::test]
async fn a_refused_upgrade_moves_to_the_next_key_and_a_session_stays_on_its_own() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["invalid-live-1", "good-live-2"])
        .admin()
        .start()
        .await;
    let auth = [("x-goog-api-key", TOKEN)];
    for n in 0..4 {
        let mut ws = Ws::open(gate.addr, LIVE, &auth).await.unwrap();
        setup(&mut ws).await;
        for t in 0..3 {
            one_turn(&mut ws, &format!("session {n} turn {t}")).await;
        }
    }
    assert_eq!(fake.state.key_stats("good-live-2").requests, 4);
    assert!(fake.state.key_stats("invalid-live-1").requests >= 1);
    // Other spellings of the client token, and the /gemini prefix and v1alpha twin.
    for (path, headers) in [
        (format!("{LIVE}?key={TOKEN}"), vec![]),
        (
            format!("/gemini/{}", LIVE.replace("v1beta", "v1alpha")),
            vec![("authorization", format!("Bearer {TOKEN}"))],
        ),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut ws = Ws::open(gate.addr, &path, &headers).await.unwrap();
        setup(&mut ws).await;
        one_turn(&mut ws, "again").await;
    }
}

/// What a client cannot do: open a session without a token or with another's ephemeral token,
/// speak plain HTTP to the WebSocket path, reach another client's interaction; a batch's 429
/// cools no key, while an interactive one does.
#[tokio::test]
async fn the_new_surfaces_refuse_what_they_should() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["minute-quota-1", "good-2"])
        .env("ALLOWED_TOKENS", &format!(r#"["{TOKEN}", "{OTHER}"]"#))
        .admin()
        .start()
        .await;
    let refused = |r: Result<Ws, (u16, String)>| match r {
        Ok(_) => panic!("opened"),
        Err(e) => e,
    };
    let (status, body) = refused(Ws::open(gate.addr, LIVE, &[]).await);
    assert_eq!(status, 401, "{body}");
    let (status, body) = refused(Ws::open(gate.addr, LIVE, &[("x-goog-api-key", "wrong")]).await);
    assert_eq!(status, 401, "{body}");
    let constrained = LIVE.replace("BidiGenerateContent", "BidiGenerateContentConstrained");
    let (status, body) = refused(
        Ws::open(
            gate.addr,
            &constrained,
            &[("authorization", "Token auth_tokens/forged")],
        )
        .await,
    );
    assert_eq!(status, 401, "{body}");
    let plain = client()
        .get(gate.url(LIVE))
        .header("x-goog-api-key", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 400);
    assert_eq!(fake.state.total_requests(), 0, "nothing reached Google");

    // Batches on a key out of interactive quota: its 429 cools nothing.
    let batch = json!({ "batch": { "inputConfig": { "requests": { "requests": [
        { "request": { "contents": [{ "parts": [{ "text": "b" }] }] } }
    ] } } } });
    for _ in 0..4 {
        let resp = client()
            .post(gate.url("/v1beta/models/gemini-2.5-flash:batchGenerateContent"))
            .header("x-goog-api-key", TOKEN)
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // The key out of quota cooled for batches of the model alone (the next batches went
    // straight to the other key), not for the model's interactive calls.
    assert_eq!(fake.state.key_stats("minute-quota-1").requests, 1);
    let cooldowns = |v: &Value| -> Vec<String> {
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|k| k["cooldowns"].as_array().unwrap().clone())
            .map(|c| c["model"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, keys) = admin(Method::GET, &gate, "/admin/api/keys", None).await;
    assert_eq!(cooldowns(&keys), ["batch/gemini-2.5-flash"], "{keys}");
    // An interaction is its client's alone.
    let create = json!({ "model": "gemini-2.5-flash", "input": "mine" });
    let made: Value = client()
        .post(gate.url("/v1beta/interactions"))
        .header("x-goog-api-key", TOKEN)
        .json(&create)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = made["id"].as_str().unwrap_or_else(|| panic!("{made}"));
    let path = format!("/v1beta/interactions/{id}");
    for (method, token, expect) in [
        (Method::GET, OTHER, 404),
        (Method::DELETE, OTHER, 404),
        (Method::GET, TOKEN, 200),
    ] {
        let resp = client()
            .request(method.clone(), gate.url(&path))
            .header("x-goog-api-key", token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), expect, "{method} by {token}");
    }
    let follow =
        json!({ "model": "gemini-2.5-flash", "input": "x", "previous_interaction_id": id });
    let resp = client()
        .post(gate.url("/v1beta/interactions"))
        .header("x-goog-api-key", OTHER)
        .json(&follow)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // An interactive call's 429 does cool it.
    for _ in 0..2 {
        let resp = client()
            .post(gate.url("/v1beta/models/gemini-2.5-flash:generateContent"))
            .header("x-goog-api-key", TOKEN)
            .json(&json!({ "contents": [{ "parts": [{ "text": "hi" }] }] }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let (_, keys) = admin(Method::GET, &gate, "/admin/api/keys", None).await;
    assert!(
        cooldowns(&keys).contains(&"gemini-2.5-flash".to_owned()),
        "{keys}"
    );
}

/// Live sessions and batch jobs count against limits of their own (`live`, `batch/{model}`),
/// apart from the model's interactive limit and from each other.
#[tokio::test]
async fn live_sessions_and_batches_have_limits_of_their_own() {
    let fake = fake().await;
    let toml = r#"
[keys]
api_keys = [{ key = "only-1", project = "p1" }]
[quota.limits.live]
rpm = 2
[quota.limits."batch/gemini-2.5-flash"]
rpm = 1
[quota.limits."gemini-2.5-flash"]
rpm = 100
"#;
    let gate = gate()
        .env("BASE_URL", &fake.base_url())
        .toml(toml)
        .start()
        .await;
    let auth = [("x-goog-api-key", TOKEN)];
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut ws = Ws::open(gate.addr, LIVE, &auth).await.unwrap();
        setup(&mut ws).await;
        open.push(ws);
    }
    let Err((status, body)) = Ws::open(gate.addr, LIVE, &auth).await else {
        panic!("a third session in the minute opened");
    };
    assert_eq!(status, 429, "{body}");
    let batch = json!({ "batch": { "inputConfig": { "requests": { "requests": [
        { "request": { "contents": [{ "parts": [{ "text": "b" }] }] } }
    ] } } } });
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let resp = client()
            .post(gate.url("/v1beta/models/gemini-2.5-flash:batchGenerateContent"))
            .header("x-goog-api-key", TOKEN)
            .json(&batch)
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [200, 429]);
    // Interactive traffic still flows: its limit is its own.
    for _ in 0..3 {
        let resp = client()
            .post(gate.url("/v1beta/models/gemini-2.5-flash:generateContent"))
            .header("x-goog-api-key", TOKEN)
            .json(&ask("still here"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // The sessions opened before are untouched.
    for (n, ws) in open.iter_mut().enumerate() {
        one_turn(ws, &format!("open {n}")).await;
    }
}

/// The owner registry outlives a restart; an interaction whose key is disabled answers 503
/// naming it (with `Retry-After`), one whose key left the pool 410 — never another key's 403.
#[tokio::test]
async fn pinned_resources_outlive_a_restart_and_answer_for_their_key() {
    let fake = fake().await;
    let mut gate = gate()
        .env("BASE_URL", &fake.base_url())
        .toml("[keys]\napi_keys = [\"kept-1\", \"other-2\"]\n")
        .admin()
        .start()
        .await;
    let post = |gate: &Gate, body: Value| {
        client()
            .post(gate.url("/v1beta/interactions"))
            .header("x-goog-api-key", TOKEN)
            .json(&body)
            .send()
    };
    let made: Value = post(
        &gate,
        json!({ "model": "gemini-2.5-flash", "input": "remember me" }),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = made["id"].as_str().unwrap().to_owned();
    let owner = fake.state.interaction_owner(&id).unwrap();
    gate.restart("TERM").await;
    let path = format!("/v1beta/interactions/{id}");
    let get = || {
        client()
            .get(gate.url(&path))
            .header("x-goog-api-key", TOKEN)
            .send()
    };
    for _ in 0..4 {
        assert_eq!(get().await.unwrap().status(), 200);
    }
    let followed: Value = post(
        &gate,
        json!({ "model": "gemini-2.5-flash", "input": "and then", "previous_interaction_id": id }),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        fake.state
            .interaction_owner(followed["id"].as_str().unwrap()),
        Some(owner.clone())
    );
    let key_id = gemgate::config::stable_id("k", &owner);
    let disable = format!("/admin/api/keys/{key_id}/disable");
    assert_eq!(admin(Method::POST, &gate, &disable, None).await.0, 200);
    let resp = get().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains(&key_id),
        "{v}"
    );
    let before = gate.reload_status().await;
    let remove = format!("/admin/api/keys/{key_id}");
    assert_eq!(admin(Method::DELETE, &gate, &remove, None).await.0, 200);
    gate.wait_reloads(&before).await;
    let resp = get().await.unwrap();
    assert_eq!(resp.status(), 410);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains(&key_id),
        "{v}"
    );
}

/// A client holds at most `server.live_sessions_per_client` sessions at once; a session ends
/// for both sides when either closes, and its place is free again.
#[tokio::test]
async fn live_sessions_are_bounded_and_end_with_either_side() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["only-1"])
        .env("GEMGATE_LIVE_SESSIONS_PER_CLIENT", "2")
        .start()
        .await;
    let auth = [("x-goog-api-key", TOKEN)];
    let mut first = Ws::open(gate.addr, LIVE, &auth).await.unwrap();
    let mut second = Ws::open(gate.addr, LIVE, &auth).await.unwrap();
    setup(&mut first).await;
    setup(&mut second).await;
    let Err((status, body)) = Ws::open(gate.addr, LIVE, &auth).await else {
        panic!("a third session opened");
    };
    assert_eq!(status, 429, "{body}");
    // Google ends the sessions: the clients' connections end too, though they say nothing.
    fake.state.drop_connections();
    for ws in [&mut first, &mut second] {
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), ws.recv()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
    }
    // Their places are free again (the slot is given back as the session is torn down).
    let mut again = None;
    for _ in 0..100 {
        if let Ok(ws) = Ws::open(gate.addr, LIVE, &auth).await {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut again = again.expect("no session opened after the others ended");
    setup(&mut again).await;
    one_turn(&mut again, "after").await;
    gate.wait_log("live session ended").await;

    // What is not a handshake gemgate can relay is refused before any key is used.
    let before = fake.state.total_requests();
    for head in [
        format!(
            "GET {LIVE} HTTP/1.0\r\nupgrade: websocket\r\nconnection: upgrade\r\nx-goog-api-key: {TOKEN}\r\n\r\n"
        ),
        format!(
            "POST {LIVE} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\nx-goog-api-key: {TOKEN}\r\ncontent-length: 2\r\n\r\n{{}}"
        ),
        // Not `Connection: upgrade`.
        format!(
            "GET {LIVE} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nx-goog-api-key: {TOKEN}\r\n\r\n"
        ),
        // A body on the handshake.
        format!(
            "GET {LIVE} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\nx-goog-api-key: {TOKEN}\r\ncontent-length: 2\r\n\r\n{{}}"
        ),
    ] {
        let mut conn = TcpStream::connect(gate.addr).await.unwrap();
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = [0u8; 12];
        conn.read_exact(&mut answer).await.unwrap();
        // 400, or 405 for the POST.
        assert!(
            answer.ends_with(b" 400") || head.starts_with("POST") && answer.ends_with(b" 405"),
            "{}: {head}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(fake.state.total_requests(), before);
    // Google's OpenAI-compatible files and batches are not passed through to a random key.
    for path in ["/openai/v1/files", "/openai/v1/batches/b1"] {
        let resp = client()
            .get(gate.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{path}");
    }
    assert_eq!(fake.state.total_requests(), before);
}

/// Policy applies to the new surfaces as to any call: plugins see an interaction's model or
/// agent (and may refuse it), a Live session's upgrade, and may not rewrite what gemgate sends
/// unchanged.
#[tokio::test]
async fn plugins_see_interactions_and_live_sessions() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .plugin(
            "policy",
            r#"
return {
  name = "policy",
  priority = 10,
  on_request = function(req, ctx)
    if req.model == "deep-research-pro" then return gemgate.deny(403, "no agents for " .. req.client) end
    if req.action == "live.connect" and req.headers["x-team"] == "none" then
      return gemgate.deny(451, "no live sessions for this team")
    end
    if req.model == "rewritten" then return gemgate.rewrite { model = "gemini-2.5-flash" } end
  end,
}
"#,
        )
        .start()
        .await;
    let create = |body: Value| {
        client()
            .post(gate.url("/v1beta/interactions"))
            .header("x-goog-api-key", TOKEN)
            .json(&body)
            .send()
    };
    let resp = create(json!({ "agent": "deep-research-pro", "input": "x", "background": true }))
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = create(json!({ "model": "rewritten", "input": "x" }))
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    let resp = create(json!({ "model": "gemini-2.5-flash", "input": "fine" }))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let refused = Ws::open(
        gate.addr,
        LIVE,
        &[("x-goog-api-key", TOKEN), ("x-team", "none")],
    )
    .await;
    assert!(matches!(refused, Err((451, _))));
    let mut ws = Ws::open(gate.addr, LIVE, &[("x-goog-api-key", TOKEN)])
        .await
        .unwrap();
    setup(&mut ws).await;
    assert_eq!(
        fake.state.total_requests(),
        2,
        "one interaction, one session"
    );
}

/// With a certificate the listener speaks HTTPS alone: a request over TLS is served, plain
/// HTTP and a handshake that never comes are closed (and counted as refused connections).
#[tokio::test]
async fn the_listener_speaks_tls_with_a_certificate() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).tls().start().await;
    assert!(gate.url("").starts_with("https://"));
    let resp = client()
        .post(gate.url("/v1beta/models/gemini-2.5-flash:generateContent"))
        .header("x-goog-api-key", TOKEN)
        .json(&ask("over tls"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut plain = TcpStream::connect(gate.addr).await.unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        plain.read_to_end(&mut answer),
    )
    .await;
    assert!(read.is_ok(), "the plain connection was not closed");
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "plain HTTP was served"
    );
}

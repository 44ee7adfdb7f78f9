//! `GET /metrics`: who may read it, what it counts, and that no secret or client-chosen string
//! reaches it.

use crate::common::*;

pub async fn scrape(
    gate: &Gate,
    bearer: Option<&str>,
    accept: Option<&str>,
) -> (u16, String, String) {
    let mut req = client().get(gate.url("/metrics"));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let kind = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, kind, resp.text().await.unwrap())
}

/// Waits until the exposition at `url` shows `sample`: a request is counted once its answer
/// has gone out, so a scrape right after the answer may come first.
async fn counted(url: &str, sample: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = client()
            .get(url)
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains(sample) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never counted {sample}:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The value of the sample that starts with `prefix` (a name and its labels).
fn value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{text}"))
}

#[tokio::test]
async fn metrics_need_the_admin_token_and_count_requests_attempts_and_tokens() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["minute-key-0001", "good-secret-key-0002"])
        .admin()
        .start()
        .await;
    assert_eq!(scrape(&gate, None, None).await.0, 401);
    assert_eq!(scrape(&gate, Some("wrong"), None).await.0, 401);

    for _ in 0..3 {
        let (status, _, v) = post(&gate, GENERATE, &ask("hi")).await;
        assert_eq!(status, 200, "{v}");
    }
    // A model name of the client's choosing never becomes a label.
    let junk = "/v1beta/models/evil-label-AIzaSyJUNK:generateContent";
    post(&gate, junk, &ask("hi")).await;
    let (status, _, _) = post_as(&gate, "sk-wrong", GENERATE, &ask("hi")).await;
    assert_eq!(status, 401);

    for sample in [
        r#"gemgate_requests_total{route="gemini",model="other",code="#,
        r#"gemgate_rejected_requests_total{reason="unauthenticated"} 1"#,
    ] {
        counted(&gate.url("/metrics"), sample).await;
    }
    let (status, kind, text) = scrape(&gate, Some(ADMIN), None).await;
    assert_eq!(status, 200);
    assert_eq!(kind, "text/plain; version=0.0.4; charset=utf-8");
    assert_eq!(
        value(
            &text,
            r#"gemgate_requests_total{route="gemini",model="gemini-2.5-flash",code="200"}"#
        ),
        3.0
    );
    assert!(text.contains(r#"model="other""#), "{text}");
    assert!(!text.contains("evil"), "{text}");
    let key = gemgate::config::stable_id("k", "minute-key-0001");
    assert_eq!(
        value(
            &text,
            &format!(
                r#"gemgate_upstream_attempts_total{{key="{key}",model="gemini-2.5-flash",class="rate_limited"}}"#
            )
        ),
        1.0
    );
    assert!(value(&text, "gemgate_retries_total") >= 1.0);
    assert!(
        value(
            &text,
            r#"gemgate_tokens_total{model="gemini-2.5-flash",kind="output"}"#
        ) > 0.0
    );
    assert_eq!(value(&text, r#"gemgate_keys{state="cooling"}"#), 1.0);
    assert_eq!(value(&text, r#"gemgate_keys{state="active"}"#), 1.0);
    // One for gemini-2.5-flash, and one for the junk model if its call went to that key.
    assert!(
        value(
            &text,
            r#"gemgate_cooldowns_total{scope="key_model",reason="rate_limited"}"#
        ) >= 1.0
    );
    assert_eq!(
        value(
            &text,
            r#"gemgate_rejected_requests_total{reason="unauthenticated"}"#
        ),
        1.0
    );
    assert!(
        value(
            &text,
            r#"gemgate_request_duration_seconds_count{route="gemini"}"#
        ) >= 3.0
    );
    assert!(
        value(
            &text,
            r#"gemgate_request_duration_seconds_bucket{route="gemini",le="+Inf"}"#
        ) >= 3.0
    );
    assert_eq!(
        value(
            &text,
            &format!(
                r#"gemgate_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert!(text.contains("# TYPE gemgate_requests_total counter"));
    for secret in [
        "minute-key-0001",
        "good-secret-key-0002",
        TOKEN,
        ADMIN,
        "sk-wrong",
    ] {
        assert!(!text.contains(secret), "{secret} is in the metrics");
    }

    let (status, kind, open) = scrape(
        &gate,
        Some(ADMIN),
        Some("application/openmetrics-text; version=1.0.0"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert!(open.contains("# TYPE gemgate_requests counter"));
    assert!(open.ends_with("# EOF\n"));
}

#[tokio::test]
async fn metrics_are_off_without_an_admin_token_unless_public() {
    let fake = fake().await;
    let closed = gate().upstream(&fake, &["good-1"]).start().await;
    assert_eq!(scrape(&closed, None, None).await.0, 403);
    let public = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_METRICS_PUBLIC", "true")
        .start()
        .await;
    let (status, _, text) = scrape(&public, None, None).await;
    assert_eq!(status, 200);
    assert!(text.contains("gemgate_build_info"));
    let off = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_METRICS_ENABLED", "false")
        .env("GEMGATE_METRICS_PUBLIC", "true")
        .start()
        .await;
    assert_eq!(scrape(&off, None, None).await.0, 404);
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_access_fields() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("LOG_FORMAT", "json")
        .start()
        .await;
    let (status, _, v) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 200, "{v}");
    // A client's request id with quotes and backslashes stays inside its string.
    let resp = client()
        .post(gate.url(GENERATE))
        .header("x-goog-api-key", TOKEN)
        .header("x-request-id", r#"forged"},"level":"x\"#)
        .json(&ask("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let logs = gate.wait_log("\"target\":\"gemgate::access\"").await;
    let line = logs
        .lines()
        .find(|l| l.contains("\"target\":\"gemgate::access\""))
        .unwrap();
    let access: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(access["status"], 200, "{access}");
    assert_eq!(access["model"], "gemini-2.5-flash");
    assert_eq!(access["level"], "INFO");
    assert_eq!(access["message"], "request");
    assert!(access["latency_ms"].is_f64() && access["time"].as_str().unwrap().ends_with('Z'));
    for line in gate.logs().lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for field in ["time", "level", "target", "message"] {
            assert!(v.get(field).is_some(), "{field} missing: {line}");
        }
    }
}

/// Every `gemgate_…` metric name in `text`.
fn names_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("gemgate_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        out.insert(text[start..end].to_owned());
        i = end;
    }
    out
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_name_only_metrics_that_exist() {
    let fake = fake().await;
    // A fleet member whose Redis never answers: `gemgate_cluster_up` is there, at 0.
    let port = free_addr().port();
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_METRICS_PUBLIC", "true")
        .env("GEMGATE_REDIS_URL", &format!("redis://127.0.0.1:{port}"))
        .env("GEMGATE_CLUSTER_SECRET", "a-fleet-secret-of-some-length")
        .start()
        .await;
    post(&gate, GENERATE, &ask("hi")).await;
    let (_, _, exposition) = scrape(&gate, None, None).await;
    // Every family is declared, with or without samples yet.
    let mut served = std::collections::BTreeSet::new();
    for line in exposition.lines() {
        let mut parts = line.split(' ');
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        {
            served.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    served.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    assert!(served.contains("gemgate_cluster_up"), "{exposition}");

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard = std::fs::read_to_string(root.join("conf/grafana/gemgate.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("valid JSON");
    let mut exprs = String::new();
    for panel in parsed["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push_str(target["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    let alerts = std::fs::read_to_string(root.join("conf/prometheus/alerts.yml")).unwrap();
    for (file, text) in [("dashboard", &exprs), ("alerts", &alerts)] {
        let named = names_in(text);
        assert!(named.len() >= 5, "{file} names {named:?}");
        for name in named {
            assert!(
                served.contains(&name),
                "{file} names {name}, which /metrics does not serve"
            );
        }
    }
    for family in [
        "gemgate_keys",
        "gemgate_requests_total",
        "gemgate_time_to_first_byte_seconds_bucket",
        "gemgate_tokens_total",
        "gemgate_cooldowns_total",
    ] {
        assert!(exprs.contains(family), "the dashboard shows no {family}");
    }

    let Some(promtool) = needed_env("GEMGATE_PROMTOOL") else {
        return;
    };
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(root.join("conf/prometheus/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small OTLP/HTTP receiver on loopback: the bodies of the requests it got.
async fn otlp_receiver() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let bodies = got.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    assert!(
                        head.contains("content-type: application/x-protobuf"),
                        "{head}"
                    );
                    assert!(head.starts_with("post /v1/traces "), "{head}");
                    bodies
                        .lock()
                        .unwrap()
                        .push(buf[end + 4..end + 4 + len].to_vec());
                    buf.drain(..end + 4 + len);
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                }
            });
        }
    });
    (addr, got)
}

#[tokio::test]
async fn each_request_is_a_span_with_its_attempts_exported_over_otlp() {
    let (collector, bodies) = otlp_receiver().await;
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["minute-key-0001", "good-key-0002"])
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            &format!("http://{collector}"),
        )
        .start()
        .await;
    // The minute key's 429 and a retry: two attempts, whichever key goes first.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    for _ in 0..2 {
        let resp = client()
            .post(gate.url(GENERATE))
            .header("x-goog-api-key", TOKEN)
            .header("traceparent", format!("00-{trace}-{parent}-01"))
            .json(&ask("hi"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let bytes = |hex: &str| -> Vec<u8> {
        (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let all = loop {
        let all: Vec<u8> = bodies.lock().unwrap().concat();
        let has = |needle: &[u8]| all.windows(needle.len()).any(|w| w == needle);
        if has(b"gen_ai.request.model") && has(b"rate_limited") {
            break all;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no spans arrived:\n{}",
            gate.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let has = |needle: &[u8]| all.windows(needle.len()).any(|w| w == needle);
    assert!(has(&bytes(trace)), "the client's trace is continued");
    assert!(has(&bytes(parent)), "the client's span is the parent");
    for attribute in [
        &b"gen_ai.usage.input_tokens"[..],
        b"gen_ai.operation.name",
        b"generate_content",
        b"gemgate.key_id",
        b"service.name",
    ] {
        assert!(has(attribute), "{}", String::from_utf8_lossy(attribute));
    }
    let key = gemgate::config::stable_id("k", "minute-key-0001");
    assert!(has(key.as_bytes()));
    for secret in ["minute-key-0001", "good-key-0002", TOKEN] {
        assert!(!has(secret.as_bytes()), "{secret} was exported");
    }
}

#[tokio::test]
async fn a_metrics_listener_of_its_own_serves_the_metrics_alone() {
    let fake = fake().await;
    let metrics_addr = free_addr();
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .admin()
        .env("GEMGATE_METRICS_LISTEN", &metrics_addr.to_string())
        .start()
        .await;
    let (status, _, v) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 200, "{v}");
    let at = |path: &str| format!("http://{metrics_addr}{path}");
    counted(&at("/metrics"), "gemgate_requests_total{").await;
    let resp = client()
        .get(at("/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains(
            r#"gemgate_requests_total{route="gemini",model="gemini-2.5-flash",code="200"} 1"#
        ),
        "{text}"
    );
    let resp = client().get(at("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 401, "the same rule as on the main port");
    for path in [GENERATE, "/v1beta/models", "/admin/api/keys"] {
        let resp = client()
            .post(at(path))
            .header("x-goog-api-key", TOKEN)
            .bearer_auth(ADMIN)
            .json(&ask("hi"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{path}");
    }
    let resp = client().get(at("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn guessing_the_metrics_token_is_throttled_like_the_admin_api() {
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1"]).admin().start().await;
    let mut statuses = Vec::new();
    for i in 0..6 {
        statuses.push(scrape(&gate, Some(&format!("guess-{i}")), None).await.0);
    }
    assert_eq!(&statuses[..3], &[401, 401, 401], "{statuses:?}");
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");
    // The right token always passes (a guesser cannot lock the operator out).
    let (status, _, body) = scrape(&gate, Some(ADMIN), None).await;
    assert_eq!(status, 200);
    assert!(!body.contains("guess-"), "a presented token was echoed");
}

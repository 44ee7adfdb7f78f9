//! A fleet: several gemgate processes sharing their state through a real `redis-server` (each
//! test its own, on a free port, persistence off). `scripts/test.sh` installs Redis when it is
//! missing and names it in `GEMGATE_REDIS_SERVER`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use gemgate_fake_upstream::FakeUpstream;
use reqwest::Method;
use serde_json::{Value, json};

use crate::common::*;

const SECRET: &str = "fleet-secret-for-tests-0123456789";
const NEW_KEY: &str = "AIzaSyFLEETFLEETFLEETFLEETFLEETFLEET123";

/// A `redis-server` of its own, stopped when dropped.
struct Redis {
    bin: String,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    /// Starts one, or `None` when `GEMGATE_REDIS_SERVER` is not set (a bare `cargo test`).
    async fn start() -> Option<Redis> {
        let bin = needed_env("GEMGATE_REDIS_SERVER")?;
        let mut redis = Redis {
            bin,
            port: free_addr().port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        redis.spawn().await;
        Some(redis)
    }

    async fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            // `DEBUG SLEEP` makes Redis slow on demand.
            .args(["--enable-debug-command", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.cmd(&["PING"]).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills it (state lost: persistence is off).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut conn = tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| redis::RedisError::from(std::io::Error::other("timeout")))??;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }

    /// Every string stored in this Redis (names, fields, values), as bytes.
    async fn everything(&self) -> Vec<Vec<u8>> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let names: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut out = Vec::new();
        for name in names {
            out.push(name.clone().into_bytes());
            let kind: String = redis::cmd("TYPE")
                .arg(&name)
                .query_async(&mut conn)
                .await
                .unwrap();
            match kind.as_str() {
                "hash" => {
                    let all: Vec<Vec<u8>> = redis::cmd("HGETALL")
                        .arg(&name)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    out.extend(all);
                }
                "string" => {
                    let v: Vec<u8> = redis::cmd("GET")
                        .arg(&name)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    out.push(v);
                }
                "set" => {
                    let v: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
                        .arg(&name)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    out.extend(v);
                }
                _ => {}
            }
        }
        out
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A member `instance` of the fleet on `redis`, over `fake` with `keys`.
fn member(fake: &FakeUpstream, redis: &Redis, instance: &str, keys: &[&str]) -> GateBuilder {
    gate()
        .upstream(fake, keys)
        .admin()
        .env("GEMGATE_REDIS_URL", &redis.url())
        .env("GEMGATE_CLUSTER_SECRET", SECRET)
        .env("GEMGATE_CLUSTER", "test-fleet")
        .env("GEMGATE_INSTANCE", instance)
}

/// Members `a` and `b`, once they see each other.
async fn pair(fake: &FakeUpstream, redis: &Redis, keys: &[&str]) -> (Gate, Gate) {
    let a = member(fake, redis, "a", keys).start().await;
    let b = member(fake, redis, "b", keys).start().await;
    joined(&[&a, &b]).await;
    (a, b)
}

/// Polls `check` until it holds (at most `within`); returns how long it took.
async fn within<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < within {
        if check().await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not within {within:?}");
}

async fn state_of(gate: &Gate, key_id: &str) -> Option<String> {
    key_states(gate)
        .await
        .into_iter()
        .find(|(id, _)| id == key_id)
        .map(|(_, state)| state)
}

/// The id gemgate gives the key `secret`.
fn key_id(secret: &str) -> String {
    gemgate::config::stable_id("k", secret)
}

/// The requests of today the fleet counted, over every key, as `gate`'s admin API shows.
async fn fleet_requests(gate: &Gate) -> u64 {
    let (_, v) = admin(Method::GET, gate, "/admin/api/keys", None).await;
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["usage_today"]["requests"].as_u64().unwrap_or(0))
        .sum()
}

async fn health(gate: &Gate) -> Value {
    let resp = client().get(gate.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "liveness stays 200");
    resp.json().await.unwrap()
}

/// Waits until both members see each other with Redis up.
async fn joined(gates: &[&Gate]) {
    for gate in gates {
        within(Duration::from_secs(10), "the fleet formed", || async {
            let h = health(gate).await;
            h["fleet"]["redis"] == "ok"
                && h["fleet"]["members_live"].as_u64() == Some(gates.len() as u64)
        })
        .await;
    }
}

#[tokio::test]
async fn a_cooldown_and_a_disabled_key_reach_every_instance() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let fake = fake().await;
    let keys = ["minute-1", "good-2", "good-3"];
    let (a, b) = pair(&fake, &redis, &keys).await;
    let minute = key_id("minute-1");

    // A's 429 cools the key for that model on A...
    for _ in 0..10 {
        let (status, _, v) = post(&a, GENERATE, &ask("hi")).await;
        assert_eq!(status, 200, "{v}");
        if fake.state.key_stats("minute-1").requests > 0 {
            break;
        }
    }
    assert_eq!(fake.state.key_stats("minute-1").requests, 1);
    // ...and on B within a second.
    let took = within(Duration::from_secs(5), "B sees the cooldown", || async {
        state_of(&b, &minute).await.as_deref() == Some("cooling")
    })
    .await;
    eprintln!("cooldown reached B in {took:?}");
    for _ in 0..6 {
        let (status, _, v) = post(&b, GENERATE, &ask("hi")).await;
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(
        fake.state.key_stats("minute-1").requests,
        1,
        "B sent the key A saw exhausted"
    );

    // A key disabled on A is never tried by B.
    let good2 = key_id("good-2");
    let (status, v) = admin(
        Method::POST,
        &a,
        &format!("/admin/api/keys/{good2}/disable"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let took = within(
        Duration::from_secs(5),
        "B sees the disabled key",
        || async { state_of(&b, &good2).await.as_deref() == Some("disabled") },
    )
    .await;
    eprintln!("the disabled key reached B in {took:?}");
    let before = fake.state.key_stats("good-2").requests;
    for _ in 0..8 {
        let (status, _, v) = post(&b, GENERATE, &ask("hi")).await;
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(
        fake.state.key_stats("good-2").requests,
        before,
        "B tried the disabled key"
    );
    let (_, v) = admin(Method::GET, &b, "/admin/api/keys", None).await;
    let shown = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == good2.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        shown["disabled_reason"], "disabled by an operator",
        "{shown}"
    );

    // Enabled again on B: A takes it back.
    let (status, _) = admin(
        Method::POST,
        &b,
        &format!("/admin/api/keys/{good2}/enable"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    within(Duration::from_secs(5), "A sees the key enabled", || async {
        state_of(&a, &good2).await.as_deref() == Some("active")
    })
    .await;

    // Usage is the fleet's on either admin page: every attempt either instance made.
    let attempts = fake.state.total_requests();
    for gate in [&a, &b] {
        within(Duration::from_secs(10), "fleet usage totals", || async {
            fleet_requests(gate).await == attempts
        })
        .await;
    }
    // Log rows say which instance served them.
    wait_logged(&b, 1).await;
    let (_, v) = admin(Method::GET, &b, "/admin/api/logs/requests", None).await;
    assert_eq!(v["rows"][0]["record"]["instance"], "b", "{v}");
}

#[tokio::test]
async fn a_rate_limit_holds_across_three_instances() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let fake = fake().await;
    let toml = "[plugins.rate_limit]\nenabled = true\nrequests_per_minute = 10\n";
    let keys = ["good-1"];
    let a = member(&fake, &redis, "a", &keys).toml(toml).start().await;
    let b = member(&fake, &redis, "b", &keys).toml(toml).start().await;
    let c = member(&fake, &redis, "c", &keys).toml(toml).start().await;
    joined(&[&a, &b, &c]).await;
    // Windows are aligned to the minute: start well inside one.
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if second > 45 {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
    let gates = [&a, &b, &c];
    let answers = futures_util::future::join_all((0..30).map(|i| {
        let gate = gates[i % 3];
        async move { post(gate, GENERATE, &ask("hi")).await }
    }))
    .await;
    let admitted = answers.iter().filter(|(s, _, _)| *s == 200).count();
    let limited: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 429).collect();
    assert_eq!(
        admitted, 10,
        "the fleet admitted {admitted} of a limit of 10"
    );
    assert_eq!(limited.len(), 20);
    let (_, headers, v) = limited[0];
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("10 requests per minute"),
        "{v}"
    );
    assert_eq!(fake.state.total_requests(), 10);
    // Counted as refused, over a limit, on the instances that refused them.
    let mut limited = 0.0;
    for gate in gates {
        let resp = client()
            .get(gate.url("/metrics"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        let text = resp.text().await.unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with(r#"gemgate_rejected_requests_total{reason="limited"}"#))
            .unwrap_or_else(|| panic!("{text}"));
        limited += line.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    }
    assert_eq!(limited, 20.0);
}

/// Projects' quota windows are counted in Redis: two instances together send no project over
/// its limit, and neither gets an upstream 429.
#[tokio::test]
async fn a_projects_quota_holds_across_the_fleet() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let fake = fake().await;
    let model = gemgate_fake_upstream::QuotaModel {
        projects: [(
            "p1".to_owned(),
            gemgate_fake_upstream::QuotaProject {
                keys: vec!["q-1".into(), "q-2".into()],
                rpm: Some(5),
                ..Default::default()
            },
        )]
        .into(),
        ..Default::default()
    };
    fake.state.set_quota(model).unwrap();
    let toml = r#"
[keys]
api_keys = [{ key = "q-1", project = "p1" }, { key = "q-2", project = "p1" }]
[quota.limits."gemini-2.5-flash"]
rpm = 5
"#;
    let a = member(&fake, &redis, "a", &[]).toml(toml).start().await;
    let b = member(&fake, &redis, "b", &[]).toml(toml).start().await;
    joined(&[&a, &b]).await;
    let mut statuses = Vec::new();
    for i in 0..8 {
        let gate = if i % 2 == 0 { &a } else { &b };
        statuses.push(post(gate, GENERATE, &ask("hi")).await.0);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    let stats = fake.state.quota_stats();
    assert_eq!((stats.admitted, stats.limited), (5, 0), "{stats:?}");
}

#[tokio::test]
async fn admin_edits_and_sessions_apply_on_every_instance_and_secrets_stay_sealed() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let fake = fake().await;
    let keys = ["good-1"];
    let (a, b) = pair(&fake, &redis, &keys).await;

    // A key pasted on A's admin API serves on B within a second; A's file is untouched.
    let (status, v) = admin(
        Method::POST,
        &a,
        "/admin/api/keys",
        Some(json!({ "text": NEW_KEY })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let took = within(Duration::from_secs(5), "B has the new key", || async {
        key_states(&b).await.len() == 2
    })
    .await;
    eprintln!("the admin edit reached B in {took:?}");
    assert!(
        !std::fs::read_to_string(a.config_path())
            .unwrap_or_default()
            .contains(NEW_KEY)
    );
    // Deleted on B: gone on A.
    let new_id = key_id(NEW_KEY);
    let (status, v) = admin(
        Method::DELETE,
        &b,
        &format!("/admin/api/keys/{new_id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    within(Duration::from_secs(5), "A lost the deleted key", || async {
        key_states(&a).await.len() == 1
    })
    .await;

    // A login on A is valid on B; logging out on A ends it on B.
    let (cookie, csrf) = admin_login(&a).await;
    within(Duration::from_secs(5), "B takes A's session", || async {
        with_cookie(&b, &cookie, "/admin/api/fleet").await == 200
    })
    .await;
    let (_, page) = session_page(&a, &cookie, "/admin").await;
    assert!(
        page.contains("Fleet: this is a"),
        "the dashboard shows the fleet"
    );
    let (_, fleet) = admin(Method::GET, &b, "/admin/api/fleet", None).await;
    let members: Vec<&str> = fleet["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["instance"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["a", "b"], "{fleet}");
    assert_eq!(fleet["members"][0]["version"], env!("CARGO_PKG_VERSION"));
    logout(&a, &cookie, &csrf).await;
    within(Duration::from_secs(5), "B ends the session", || async {
        with_cookie(&b, &cookie, "/admin/api/fleet").await == 401
    })
    .await;

    // Nothing secret is in Redis in clear: not a key, not the admin token, not a session.
    let session_id = cookie.split('=').nth(1).unwrap().to_owned();
    for stored in redis.everything().await {
        let text = String::from_utf8_lossy(&stored);
        for secret in [NEW_KEY, ADMIN, SECRET, session_id.as_str(), csrf.as_str()] {
            assert!(
                !text.contains(secret),
                "{secret} is in Redis in clear: {text}"
            );
        }
    }
}

#[tokio::test]
async fn redis_killed_mid_load_and_restarted_empty_loses_nothing() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let fake = fake().await;
    let keys = ["good-1", "good-2", "good-3"];
    let (a, b) = pair(&fake, &redis, &keys).await;
    let good3 = key_id("good-3");
    let (cookie, csrf) = admin_login(&a).await;
    within(Duration::from_secs(5), "B takes A's session", || async {
        with_cookie(&b, &cookie, "/admin/api/fleet").await == 200
    })
    .await;

    // Load on both while Redis dies: no request fails because of it.
    let load = |gate: Arc<Gate>| async move {
        let mut served = 0u64;
        for _ in 0..60 {
            let (status, _, v) = post(&gate, GENERATE, &ask("hi")).await;
            assert_eq!(status, 200, "{v}");
            served += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        served
    };
    let (a, b) = (Arc::new(a), Arc::new(b));
    let loads = tokio::spawn({
        let (a, b) = (a.clone(), b.clone());
        async move { tokio::join!(load(a), load(b)) }
    });
    let (a, b) = (&*a, &*b);
    tokio::time::sleep(Duration::from_millis(400)).await;
    redis.kill();
    within(Duration::from_secs(5), "A says Redis is away", || async {
        let h = health(a).await;
        h["fleet"]["degraded"] == true && h["fleet"]["redis"] == "unreachable"
    })
    .await;
    // During the outage: a key disabled on A, and an admin edit refused (none may apply on
    // one instance only).
    let (status, v) = admin(
        Method::POST,
        a,
        &format!("/admin/api/keys/{good3}/disable"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = admin(
        Method::POST,
        a,
        "/admin/api/keys",
        Some(json!({ "text": NEW_KEY })),
    )
    .await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{v}"
    );
    let (status, v) = admin(Method::GET, a, "/admin/api/fleet", None).await;
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("unreachable")),
        "{v}"
    );
    // A logout during the outage: no sync afterwards may bring the session back.
    logout(a, &cookie, &csrf).await;
    let (served_a, served_b) = loads.await.unwrap();

    // Redis back, empty: within five seconds the fleet has it all again.
    let back = Instant::now();
    redis.spawn().await;
    within(
        Duration::from_secs(15),
        "B learns the key disabled during the outage",
        || async { state_of(b, &good3).await.as_deref() == Some("disabled") },
    )
    .await;
    assert_eq!(fake.state.total_requests(), served_a + served_b);
    let took = within(Duration::from_secs(15), "usage totals re-added", || async {
        fleet_requests(b).await == served_a + served_b
    })
    .await;
    eprintln!(
        "converged {:?} after Redis came back ({took:?} for usage)",
        back.elapsed()
    );
    for gate in [a, b] {
        let h = health(gate).await;
        assert_eq!(h["fleet"]["redis"], "ok", "{h}");
        assert_eq!(with_cookie(gate, &cookie, "/admin/api/fleet").await, 401);
    }
    // Edits work again and reach the other instance.
    let (status, v) = admin(
        Method::POST,
        a,
        "/admin/api/keys",
        Some(json!({ "text": NEW_KEY })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    within(
        Duration::from_secs(5),
        "B has the key added after the outage",
        || async { key_states(b).await.len() == 4 },
    )
    .await;
}

#[tokio::test]
async fn a_slow_redis_never_holds_a_request_up() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let fake = fake().await;
    let toml = "[plugins.rate_limit]\nenabled = true\nrequests_per_minute = 1000\n";
    let a = member(&fake, &redis, "a", &["good-1"])
        .toml(toml)
        .start()
        .await;
    joined(&[&a]).await;
    // Redis stops answering for three seconds.
    let url = redis.url();
    let sleeper = tokio::spawn(async move {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: redis::RedisResult<()> = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(3)
            .query_async(&mut conn)
            .await;
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    for _ in 0..10 {
        let asked = Instant::now();
        let (status, _, v) = post(&a, GENERATE, &ask("hi")).await;
        assert_eq!(status, 200, "{v}");
        // The limit's count waits 100 ms for Redis at most, then counts here.
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    within(
        Duration::from_secs(5),
        "the instance says Redis is slow or away",
        || async { health(&a).await["fleet"]["degraded"] == true },
    )
    .await;
    sleeper.await.unwrap();
    within(
        Duration::from_secs(10),
        "Redis answers in time again",
        || async { health(&a).await["fleet"]["redis"] == "ok" },
    )
    .await;
}

#[tokio::test]
async fn a_fleet_needs_its_secret_and_a_redis_url_it_can_read() {
    let fake = fake().await;
    for (url, secret, says) in [
        ("redis://127.0.0.1:1/0", "", "cluster.secret"),
        ("redis://127.0.0.1:1/0", "short", "cluster.secret"),
        ("http://127.0.0.1:1", SECRET, "cluster.redis_url"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_gemgate"))
            .arg("check")
            .current_dir(dir.path())
            .env_clear()
            .env("BASE_URL", fake.base_url())
            .env("GEMGATE_REDIS_URL", url)
            .env("GEMGATE_CLUSTER_SECRET", secret)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(!err.contains("short"), "the secret was shown: {err}");
    }
}

#[tokio::test]
async fn an_instance_without_redis_serves_and_says_so() {
    // A fleet member whose Redis never answers still serves every request.
    let fake = fake().await;
    let port = free_addr().port();
    let gate = gate()
        .upstream(&fake, &["good-1"])
        .env(
            "GEMGATE_REDIS_URL",
            &format!("redis://:hunter2-password@127.0.0.1:{port}"),
        )
        .env("GEMGATE_CLUSTER_SECRET", SECRET)
        .start()
        .await;
    let (status, _, v) = post(&gate, GENERATE, &ask("hi")).await;
    assert_eq!(status, 200, "{v}");
    let h = health(&gate).await;
    assert_eq!(h["fleet"]["redis"], "unreachable", "{h}");
    assert!(gate.logs().contains("Redis unreachable"), "{}", gate.logs());
    assert!(
        !gate.logs().contains("hunter2"),
        "the Redis password reached the log"
    );
    let resp = client().get(gate.url("/ready")).send().await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "Redis away does not take an instance out of rotation"
    );
}

async fn logout(gate: &Gate, cookie: &str, csrf: &str) {
    let resp = no_redirects()
        .post(gate.url("/admin/logout"))
        .header("cookie", cookie)
        .form(&[("_csrf", csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
}

/// The status of a GET of `path` with the session `cookie`.
async fn with_cookie(gate: &Gate, cookie: &str, path: &str) -> u16 {
    no_redirects()
        .get(gate.url(path))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_file_uploaded_through_one_instance_is_served_by_another_with_its_key() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let fake = fake().await;
    let keys = ["good-1", "good-2", "good-3"];
    let (a, b) = pair(&fake, &redis, &keys).await;
    let content = b"fleet notes";
    let resp = client()
        .post(a.url("/upload/v1beta/files"))
        .header("x-goog-api-key", TOKEN)
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .header(
            "x-goog-upload-header-content-length",
            content.len().to_string(),
        )
        .header("x-goog-upload-header-content-type", "text/plain")
        .json(&json!({ "file": { "display_name": "notes" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let owner = fake.state.last_received().unwrap().key.unwrap();
    // The load balancer sends the rest of the upload to B.
    let upload_url = resp.headers()["x-goog-upload-url"].to_str().unwrap();
    let on_b = upload_url.replace(&a.addr.to_string(), &b.addr.to_string());
    // The upload's id is its own credential: never in Redis in clear.
    let upload_id = upload_url.split("upload_id=").nth(1).unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stored = redis.everything().await;
        if stored
            .iter()
            .any(|v| String::from_utf8_lossy(v).contains("uploads"))
        {
            for v in &stored {
                assert!(
                    !String::from_utf8_lossy(v).contains(&upload_id),
                    "the upload id is in Redis in clear"
                );
            }
            break;
        }
        assert!(Instant::now() < deadline, "the upload never reached Redis");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let finish = || {
        client()
            .post(&on_b)
            .header("x-goog-api-key", TOKEN)
            .header("x-goog-upload-command", "upload, finalize")
            .header("x-goog-upload-offset", "0")
            .body(content.to_vec())
            .send()
    };
    let mut resp = finish().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while resp.status() == 404 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
        resp = finish().await.unwrap();
    }
    assert_eq!(resp.status(), 200);
    assert_eq!(
        fake.state.last_received().unwrap().key.as_deref(),
        Some(owner.as_str())
    );
    let file: Value = resp.json().await.unwrap();
    let name = file["file"]["name"].as_str().unwrap().to_owned();
    let uri = file["file"]["uri"].as_str().unwrap().to_owned();

    // A, which never saw the upload finish, sends every call naming the file with its key.
    within(Duration::from_secs(5), "A knows the file", || async {
        get(&a, &format!("/v1beta/{name}")).await.0 == 200
    })
    .await;
    for _ in 0..3 {
        let body = json!({ "contents": [{ "role": "user", "parts": [
            { "fileData": { "fileUri": uri, "mimeType": "text/plain" } },
            { "text": "summarise" }
        ] }] });
        let (status, _, v) = post(&a, GENERATE, &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            fake.state.last_received().unwrap().key.as_deref(),
            Some(owner.as_str())
        );
    }
    // Deleted through A: B forgets it.
    let resp = client()
        .delete(a.url(&format!("/v1beta/{name}")))
        .header("x-goog-api-key", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    within(
        Duration::from_secs(5),
        "B forgets the deleted file",
        || async { get(&b, &format!("/v1beta/{name}")).await.0 == 404 },
    )
    .await;
}

#[tokio::test]
async fn admin_edits_outlive_redis_losing_them_while_every_instance_is_down() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let fake = fake().await;
    let keys = ["good-1"];
    let mut a = member(&fake, &redis, "a", &keys).start().await;
    let mut b = member(&fake, &redis, "b", &keys).start().await;
    joined(&[&a, &b]).await;
    let (status, v) = admin(
        Method::POST,
        &a,
        "/admin/api/keys",
        Some(json!({ "text": NEW_KEY })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    within(Duration::from_secs(5), "B has the new key", || async {
        key_states(&b).await.len() == 2
    })
    .await;
    // Every instance stops, and Redis loses everything.
    for gate in [&mut a, &mut b] {
        gate.signal("TERM");
        assert_eq!(gate.wait_exit(Duration::from_secs(10)).await, Some(0));
    }
    redis.kill();
    redis.spawn().await;
    // B comes back with the edit it saved, and gives it back to the fleet.
    b.start_again().await;
    assert_eq!(key_states(&b).await.len(), 2, "{}", b.logs());
    a.start_again().await;
    within(Duration::from_secs(5), "A has the edit again", || async {
        key_states(&a).await.len() == 2
    })
    .await;
}

/// A Responses API conversation made on one instance is continued, fetched and deleted on
/// another: kept responses travel through Redis, sealed (the conversation is never there in
/// clear).
#[tokio::test]
async fn a_response_kept_by_one_instance_is_continued_on_another() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let fake = fake().await;
    let keys = ["good-1", "good-2"];
    let (a, b) = pair(&fake, &redis, &keys).await;
    let create = |gate: &Gate, body: Value| {
        client()
            .post(gate.url("/v1/responses"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
    };
    let first: Value = create(
        &a,
        json!({ "model": "gemini-2.5-flash", "input": "a secret plan" }),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = first["id"].as_str().unwrap().to_owned();
    let resp = create(
        &b,
        json!({ "model": "gemini-2.5-flash", "input": "go on", "previous_response_id": id }),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let next: Value = resp.json().await.unwrap();
    assert_eq!(
        next["output"][0]["content"][0]["text"], "echo: go on",
        "{next}"
    );
    let sent = fake.state.last_received().unwrap();
    assert!(
        String::from_utf8_lossy(&sent.body).contains("a secret plan"),
        "B sent the conversation A kept"
    );
    for v in redis.everything().await {
        assert!(
            !String::from_utf8_lossy(&v).contains("a secret plan"),
            "a conversation is in Redis in clear"
        );
    }
    let path = format!("/v1/responses/{id}");
    let got = client()
        .get(b.url(&path))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let gone = client()
        .delete(b.url(&path))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 200);
    let resp = create(
        &a,
        json!({ "model": "gemini-2.5-flash", "input": "again", "previous_response_id": id }),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 404, "deleted on B, gone on A too");
}

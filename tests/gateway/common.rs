//! Test harness: the fake Gemini upstream in-process, gemgate as a child process (started as a
//! user would start it), both on loopback ports.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use gemgate_fake_upstream::{Behaviour, FakeConfig, FakeUpstream};
pub use serde_json::{Value, json};

pub const TOKEN: &str = "sk-test-token";
/// The admin token tests set as `AUTH_TOKEN` when they use the admin API.
pub const ADMIN: &str = "admin-test-secret";

/// A gemgate process with its own working directory.
pub struct Gate {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    env: Vec<(String, String)>,
    /// Where `GET /health` is asked: the listener, or with TLS the plain metrics listener.
    health: SocketAddr,
    tls: bool,
}

const TLS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");

/// The test certificate (for `127.0.0.1` and `localhost`) and its key.
pub fn tls_files() -> (String, String) {
    (format!("{TLS_DIR}/cert.pem"), format!("{TLS_DIR}/key.pem"))
}

/// The authority that signed the test certificate, which clients trust.
pub fn test_ca() -> String {
    format!("{TLS_DIR}/ca.pem")
}

/// How to start gemgate: config text, environment, and an optional `.env` file.
pub struct GateBuilder {
    toml: String,
    env: Vec<(String, String)>,
    dotenv: Option<String>,
    /// Files of `plugins/` beside the config: (name without `.lua`, code).
    plugins: Option<Vec<(String, String)>>,
}

pub fn gate() -> GateBuilder {
    GateBuilder {
        toml: String::new(),
        env: vec![("ALLOWED_TOKENS".into(), TOKEN.into())],
        dotenv: None,
        plugins: None,
    }
}

/// The plugins shipped in the repository's `plugins/`.
pub fn shipped_plugins() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "lua") {
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            out.push((name, std::fs::read_to_string(&path).unwrap()));
        }
    }
    out
}

impl GateBuilder {
    /// Points gemgate at `fake` with these keys.
    pub fn upstream(self, fake: &FakeUpstream, keys: &[&str]) -> Self {
        self.env("BASE_URL", &fake.base_url())
            .env("API_KEYS", &serde_json::to_string(keys).unwrap())
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.into(), value.into()));
        self
    }

    pub fn without_env(mut self, name: &str) -> Self {
        self.env.retain(|(k, _)| k != name);
        self
    }

    pub fn toml(mut self, text: &str) -> Self {
        self.toml = text.into();
        self
    }

    pub fn dotenv(mut self, text: &str) -> Self {
        self.dotenv = Some(text.into());
        self
    }

    /// Gives gemgate a `plugins/` folder beside its config, holding the shipped plugins.
    pub fn shipped_plugins(mut self) -> Self {
        self.plugins = Some(shipped_plugins());
        self
    }

    /// Adds a plugin file to the `plugins/` folder (which otherwise starts empty).
    pub fn plugin(mut self, name: &str, code: &str) -> Self {
        self.plugins
            .get_or_insert_with(Vec::new)
            .push((name.into(), code.into()));
        self
    }

    /// Serves HTTPS with the test certificate ([`tls_files`]), and the metrics (and
    /// `/health`) on a plain listener of their own.
    pub fn tls(self) -> Self {
        let (cert, key) = tls_files();
        self.env("GEMGATE_TLS_CERT_FILE", &cert)
            .env("GEMGATE_TLS_KEY_FILE", &key)
            .env("GEMGATE_METRICS_LISTEN", &free_addr().to_string())
    }

    /// Turns the admin API on with [`ADMIN`].
    pub fn admin(self) -> Self {
        self.env("AUTH_TOKEN", ADMIN)
    }

    pub async fn start(self) -> Gate {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gemgate.toml"), &self.toml).unwrap();
        if let Some(text) = &self.dotenv {
            std::fs::write(dir.path().join(".env"), text).unwrap();
        }
        if let Some(plugins) = &self.plugins {
            std::fs::create_dir(dir.path().join("plugins")).unwrap();
            for (name, code) in plugins {
                std::fs::write(dir.path().join(format!("plugins/{name}.lua")), code).unwrap();
            }
        }
        let addr = free_addr();
        let metrics = self
            .env
            .iter()
            .find(|(k, _)| k == "GEMGATE_METRICS_LISTEN")
            .and_then(|(_, v)| v.parse().ok());
        let tls = self.env.iter().any(|(k, _)| k == "GEMGATE_TLS_CERT_FILE");
        let mut gate = Gate {
            addr,
            dir,
            child: None,
            env: self.env,
            health: metrics.filter(|_| tls).unwrap_or(addr),
            tls,
        };
        gate.spawn().await;
        gate
    }
}

/// A free loopback port for a gemgate, never the same one twice in this process.
///
/// Ports come from below the kernel's ephemeral range (32768 and up by default), so no other
/// listener bound to port 0 (a fake upstream, a test proxy) can take a port between its release
/// here and gemgate binding it; and two gemgates told the same port would both listen on it
/// (pingora sets `SO_REUSEPORT`) and answer each other's requests.
pub fn free_addr() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 500) as u16 * 20,
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        assert!(port < 32_000, "ran out of test ports");
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr().unwrap();
        }
    }
}

/// Whether a gemgate on `addr` answers `GET /health` with HTTP.
///
/// A bare TCP connect is not proof: a connect to a port nobody listens on yet can connect to
/// itself (when the kernel happens to pick the same port as its own source port), and the
/// test's first request would then find no listener.
async fn answers_health(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
        conn.write_all(b"GET /health HTTP/1.1\r\nHost: gemgate\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 12];
        conn.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

impl Gate {
    /// Starts the gemgate process (appending to its log) and waits until it listens.
    async fn spawn(&mut self) {
        let dir = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("gemgate.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gemgate"))
            .arg("--config")
            .arg(dir.join("gemgate.toml"))
            .current_dir(dir)
            .env_clear()
            .env("GEMGATE_LISTEN", self.addr.to_string())
            .env("GEMGATE_THREADS", "2")
            .env("GEMGATE_DATA_DIR", dir.join("data"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start gemgate");
        self.child = Some(child);
        self.wait_ready().await;
    }

    /// Stops gemgate with `signal` (`TERM`, or `KILL` for a crash) and starts it again on the
    /// same folder, data and port.
    pub async fn restart(&mut self, signal: &str) {
        self.signal(signal);
        self.wait_exit(Duration::from_secs(10)).await;
        self.spawn().await;
    }

    /// Starts gemgate again on the same folder, data and port, after it exited.
    pub async fn start_again(&mut self) {
        self.spawn().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("gemgate exited early ({status}):\n{}", self.logs());
            }
            if answers_health(self.health).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("gemgate did not start listening:\n{}", self.logs());
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{}", self.addr, path)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gemgate.log")).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (log lines are written asynchronously).
    pub async fn wait_log(&self, needle: &str) -> String {
        for _ in 0..100 {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("log never showed {needle:?}:\n{}", self.logs());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("gemgate did not exit within {within:?}:\n{}", self.logs());
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gemgate.toml")
    }

    /// Saves `text` as the file `rel` of gemgate's folder the way editors do: written to a
    /// temporary file, then renamed over the old one.
    pub fn save(&self, rel: &str, text: &str) {
        let path = self.dir.path().join(rel);
        let tmp = path.with_extension("swp~");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    pub fn remove(&self, rel: &str) {
        std::fs::remove_file(self.dir.path().join(rel)).unwrap();
    }

    /// `GET /admin/api/reload` (needs [`GateBuilder::admin`]).
    pub async fn reload_status(&self) -> Value {
        let resp = client()
            .get(self.url("/admin/api/reload"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    /// Waits until the reload count reaches `n` (successful or not); returns the status.
    pub async fn wait_reloads(&self, since: &Value) -> Value {
        let before = since["reload"]["last_reload_ms"].clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let status = self.reload_status().await;
            if status["reload"]["last_reload_ms"] != before {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no reload happened:\n{}", self.logs());
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failing test shows what gemgate saw, whatever the assertion printed.
        if std::thread::panicking() {
            eprintln!("--- gemgate's log ({}) ---\n{}", self.addr, self.logs());
        }
    }
}

pub fn client() -> reqwest::Client {
    let ca = std::fs::read(test_ca()).unwrap();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap()
}

/// A generateContent body asking for `text`.
pub fn ask(text: &str) -> Value {
    json!({ "contents": [{ "role": "user", "parts": [{ "text": text }] }] })
}

/// The answer text of a generateContent response.
pub fn answer_text(v: &Value) -> String {
    v["candidates"][0]["content"]["parts"]
        .as_array()
        .map(|parts| parts.iter().filter_map(|p| p["text"].as_str()).collect())
        .unwrap_or_default()
}

pub async fn fake() -> FakeUpstream {
    FakeUpstream::start(FakeConfig::default()).await.unwrap()
}

pub async fn fake_with(config: FakeConfig) -> FakeUpstream {
    FakeUpstream::start(config).await.unwrap()
}

/// POSTs `body` to `path` with the test token; returns status, headers and parsed JSON.
pub async fn post(
    gate: &Gate,
    path: &str,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    post_as(gate, TOKEN, path, body).await
}

/// [`post`] with another client token.
pub async fn post_as(
    gate: &Gate,
    token: &str,
    path: &str,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = client()
        .post(gate.url(path))
        .header("x-goog-api-key", token)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, headers, v)
}

pub async fn get(gate: &Gate, path: &str) -> (u16, Value) {
    get_as(gate, TOKEN, path).await
}

/// [`get`] with another client token.
pub async fn get_as(gate: &Gate, token: &str, path: &str) -> (u16, Value) {
    let resp = client()
        .get(gate.url(path))
        .header("x-goog-api-key", token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")),
    )
}

pub const GENERATE: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

/// An admin API call with the admin token ([`ADMIN`]): the status and the JSON answer.
pub async fn admin(
    method: reqwest::Method,
    gate: &Gate,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client().request(method, gate.url(path)).bearer_auth(ADMIN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// `/metrics`, asked for with the admin token ([`ADMIN`]).
pub async fn metrics_text(gate: &Gate) -> String {
    let resp = client()
        .get(gate.url("/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await;
    resp.unwrap().text().await.unwrap()
}

/// An admin page's HTML, asked for with the admin token ([`ADMIN`]).
pub async fn admin_page(gate: &Gate, path: &str) -> String {
    let resp = client().get(gate.url(path)).bearer_auth(ADMIN).send().await;
    resp.unwrap().text().await.unwrap()
}

/// Waits until the request log shows `n` requests (gemgate started with [`GateBuilder::admin`]).
/// The store's flusher writes them within a second on an idle machine; it runs at idle
/// priority, so a busy one may take longer. A readable row also means the key state and usage
/// its request changed are saved (see `store::flush`).
pub async fn wait_logged(gate: &Gate, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = admin(reqwest::Method::GET, gate, "/admin/api/logs/requests", None).await;
        let rows = v["rows"].as_array().map_or(0, Vec::len);
        if rows >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{rows} of {n} requests logged: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `tests/sdk/{script}` with the SDKs' interpreter (`GEMGATE_SDK_PYTHON`) against a
/// fresh gemgate on two good keys (`GEMGATE_URL`, `GEMGATE_TOKEN`): the fake, the gateway
/// (still up, to look at) and the script's report, or `None` when skipped (see [`needed_env`]).
pub async fn run_sdk(script: &str) -> Option<(FakeUpstream, Gate, String)> {
    let python = needed_env("GEMGATE_SDK_PYTHON")?;
    let fake = fake().await;
    let gate = gate().upstream(&fake, &["good-1", "good-2"]).start().await;
    let url = gate.url("");
    let env = [("GEMGATE_URL", url.as_str()), ("GEMGATE_TOKEN", TOKEN)];
    let report = run_python(&python, &format!("sdk/{script}"), &env, &gate).await;
    Some((fake, gate, report))
}

/// Runs `tests/{script}` with `python` and `env` beside `gate` and asserts it succeeded: its
/// output (stdout, then stderr).
pub async fn run_python(python: &str, script: &str, env: &[(&str, &str)], gate: &Gate) -> String {
    let path = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(python)
        .arg(path)
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}\ngemgate:\n{}", gate.logs());
    report
}

/// The value of `name`, which `scripts/test.sh` sets for the tests that need more than Rust
/// (the Python SDKs, a browser). Without it a bare `cargo test` skips such a test and says so;
/// under `CI=true` (or `1`) a missing environment fails the test rather than letting it pass
/// without having run.
pub fn needed_env(name: &str) -> Option<String> {
    if let Ok(value) = std::env::var(name) {
        return Some(value);
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "{name} is not set and CI is: run the tests with scripts/test.sh"
    );
    eprintln!("skipped: {name} is not set (scripts/test.sh sets it)");
    None
}

/// The state of every key, by key id, from the admin API.
pub async fn key_states(gate: &Gate) -> Vec<(String, String)> {
    let (status, v) = admin(reqwest::Method::GET, gate, "/admin/api/keys", None).await;
    assert_eq!(status, 200, "{v}");
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_str().unwrap().to_owned(),
                k["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The status and HTML of admin page `path`, with the session cookie `cookie` (may be empty).
pub async fn session_page(gate: &Gate, cookie: &str, path: &str) -> (u16, String) {
    let resp = no_redirects()
        .get(gate.url(path))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// A client that shows redirects instead of following them, as the admin login answers.
pub fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Logs in to `gate`'s admin page: the session cookie and its CSRF token.
pub async fn admin_login(gate: &Gate) -> (String, String) {
    let resp = no_redirects()
        .post(gate.url("/admin/login"))
        .form(&[("token", ADMIN)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let cookie = resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let (_, page) = session_page(gate, &cookie, "/admin").await;
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();
    (cookie, csrf)
}

/// A raw connection to `gate` that has sent `head` (often only part of one).
pub async fn raw(gate: &Gate, head: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    conn
}

/// Reads until the connection closes (or `within` passes): whether it closed, and what came.
pub async fn closed_within(conn: &mut tokio::net::TcpStream, within: Duration) -> (bool, String) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return (false, String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(0)) | Ok(Err(_)) => return (true, String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one small JSON answer on a connection that stays open (its body ends in `}`).
pub async fn answered(conn: &mut tokio::net::TcpStream, within: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    while !got.ends_with(b"}") {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

//! `PROXIES` and `CUSTOM_HEADERS`: upstream calls through HTTP and SOCKS5 proxies on loopback,
//! one proxy per key with the consistency hash, and the custom headers on every call.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

/// A small proxy on loopback that speaks HTTP `CONNECT`, plain HTTP forwarding and SOCKS5
/// (told apart by the first byte), counts its tunnels and notes the API keys it carried.
struct TestProxy {
    addr: SocketAddr,
    tunnels: Arc<AtomicU64>,
    keys: Arc<Mutex<BTreeSet<String>>>,
    /// `Proxy-Authorization` / SOCKS5 user:password it insists on, if any.
    task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    async fn start(credentials: Option<(&str, &str)>) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(AtomicU64::new(0));
        let keys = Arc::new(Mutex::new(BTreeSet::new()));
        let credentials = credentials.map(|(u, p)| (u.to_owned(), p.to_owned()));
        let (t, k) = (tunnels.clone(), keys.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (t, k, credentials) = (t.clone(), k.clone(), credentials.clone());
                tokio::spawn(async move {
                    let _ = serve(client, t, k, credentials).await;
                });
            }
        });
        TestProxy {
            addr,
            tunnels,
            keys,
            task,
        }
    }

    fn keys(&self) -> BTreeSet<String> {
        self.keys.lock().unwrap().clone()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut client: TcpStream,
    tunnels: Arc<AtomicU64>,
    keys: Arc<Mutex<BTreeSet<String>>>,
    credentials: Option<(String, String)>,
) -> std::io::Result<()> {
    let mut first = [0u8; 1];
    client.peek(&mut first).await?;
    let (upstream, pending) = if first[0] == 5 {
        (socks5(&mut client, &credentials).await?, Vec::new())
    } else {
        let head = read_head(&mut client).await?;
        let text = String::from_utf8_lossy(&head).to_string();
        let line = text.lines().next().unwrap_or_default().to_owned();
        if let Some((user, pass)) = &credentials {
            let expected = format!(
                "proxy-authorization: basic {}",
                base64_encode(format!("{user}:{pass}").as_bytes())
            );
            if !text
                .to_ascii_lowercase()
                .contains(&expected.to_ascii_lowercase())
            {
                client
                    .write_all(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n",
                    )
                    .await?;
                return Ok(());
            }
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default();
        let target = parts.next().unwrap_or_default().to_owned();
        if method == "CONNECT" {
            let upstream = TcpStream::connect(&target).await?;
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            (upstream, Vec::new())
        } else {
            // Plain forwarding (an http:// URL): the request goes on as it came.
            let authority = target
                .strip_prefix("http://")
                .and_then(|r| r.split('/').next())
                .unwrap_or_default()
                .to_owned();
            (TcpStream::connect(&authority).await?, head)
        }
    };
    tunnels.fetch_add(1, Ordering::SeqCst);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = async move {
        let mut seen = pending;
        let mut buf = vec![0u8; 64 * 1024];
        note_keys(&seen, &keys);
        uw.write_all(&seen).await?;
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return uw.shutdown().await;
            }
            seen.clear();
            seen.extend_from_slice(&buf[..n]);
            note_keys(&seen, &keys);
            uw.write_all(&buf[..n]).await?;
        }
    };
    let down = tokio::io::copy(&mut ur, &mut cw);
    let _ = tokio::join!(up, down);
    Ok(())
}

/// Notes every `x-goog-api-key` value in a chunk of a request.
fn note_keys(bytes: &[u8], keys: &Mutex<BTreeSet<String>>) {
    let text = String::from_utf8_lossy(bytes);
    for line in text.split("\r\n") {
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("x-goog-api-key:") {
            let start = line.len() - v.len();
            keys.lock().unwrap().insert(line[start..].trim().to_owned());
        }
    }
}

async fn read_head(client: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        if client.read(&mut byte).await? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    Ok(head)
}

async fn socks5(
    client: &mut TcpStream,
    credentials: &Option<(String, String)>,
) -> std::io::Result<TcpStream> {
    let refuse = || std::io::Error::other("refused");
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    let mut methods = vec![0u8; usize::from(head[1])];
    client.read_exact(&mut methods).await?;
    if let Some((user, pass)) = credentials {
        if !methods.contains(&2) {
            client.write_all(&[5, 0xff]).await?;
            return Err(refuse());
        }
        client.write_all(&[5, 2]).await?;
        let mut v = [0u8; 2];
        client.read_exact(&mut v).await?;
        let mut u = vec![0u8; usize::from(v[1])];
        client.read_exact(&mut u).await?;
        let mut l = [0u8; 1];
        client.read_exact(&mut l).await?;
        let mut p = vec![0u8; usize::from(l[0])];
        client.read_exact(&mut p).await?;
        let ok = u == user.as_bytes() && p == pass.as_bytes();
        client.write_all(&[1, if ok { 0 } else { 1 }]).await?;
        if !ok {
            return Err(refuse());
        }
    } else {
        client.write_all(&[5, 0]).await?;
    }
    let mut ask = [0u8; 4];
    client.read_exact(&mut ask).await?;
    let host = match ask[3] {
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await?;
            std::net::Ipv4Addr::from(ip).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0])];
            client.read_exact(&mut name).await?;
            String::from_utf8_lossy(&name).into_owned()
        }
        _ => return Err(refuse()),
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port).await?;
    let upstream = TcpStream::connect((host.as_str(), u16::from_be_bytes(port))).await?;
    client.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).await?;
    Ok(upstream)
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn ask_ok(gate: &Gate, n: usize) {
    for i in 0..n {
        let (status, _, v) = post(
            gate,
            "/v1beta/models/gemini-2.0-flash:generateContent",
            &ask(&format!("hello {i}")),
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }
}

#[tokio::test]
async fn calls_go_through_an_http_proxy_with_credentials_and_reuse_its_tunnels() {
    let fake = fake().await;
    let proxy = TestProxy::start(Some(("me", "p@ss"))).await;
    let gate = gate()
        .upstream(&fake, &["key-a", "key-b"])
        .env("LOG_LEVEL", "debug")
        .env(
            "PROXIES",
            &format!(r#"["http://me:p%40ss@{}"]"#, proxy.addr),
        )
        .start()
        .await;
    ask_ok(&gate, 50).await;
    assert_eq!(
        proxy.keys(),
        BTreeSet::from(["key-a".to_owned(), "key-b".to_owned()])
    );
    let tunnels = proxy.tunnels.load(Ordering::SeqCst);
    assert!(
        (1..=4).contains(&tunnels),
        "50 calls opened {tunnels} tunnels"
    );
    // The password never reaches the log.
    assert!(!gate.logs().contains("p@ss") && !gate.logs().contains("p%40ss"));
}

#[tokio::test]
async fn each_key_keeps_its_socks5_proxy_across_restarts() {
    let fake = fake().await;
    let (p1, p2) = (TestProxy::start(None).await, TestProxy::start(None).await);
    let keys: Vec<String> = (0..8).map(|i| format!("key-{i}")).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut gate = gate()
        .upstream(&fake, &key_refs)
        .env(
            "PROXIES",
            &format!("socks5://{},socks5h://{}", p1.addr, p2.addr),
        )
        .start()
        .await;
    ask_ok(&gate, 40).await;
    let (a, b) = (p1.keys(), p2.keys());
    assert!(
        a.is_disjoint(&b),
        "a key went through both proxies: {a:?} {b:?}"
    );
    assert_eq!(a.len() + b.len(), 8, "{a:?} {b:?}");
    assert!(
        !a.is_empty() && !b.is_empty(),
        "the hash spread nothing: {a:?} {b:?}"
    );

    gate.restart("TERM").await;
    p1.keys.lock().unwrap().clear();
    p2.keys.lock().unwrap().clear();
    ask_ok(&gate, 40).await;
    assert_eq!(
        (p1.keys(), p2.keys()),
        (a, b),
        "keys changed proxy on restart"
    );
}

#[tokio::test]
async fn without_the_hash_proxies_take_turns_and_a_dead_proxy_is_retried_elsewhere() {
    let fake = fake().await;
    let (p1, p2) = (TestProxy::start(None).await, TestProxy::start(None).await);
    let dead = free_addr();
    let gate = gate()
        .upstream(&fake, &["key-a", "key-b"])
        .env("LOG_LEVEL", "debug")
        .env(
            "PROXIES",
            &format!("socks5://{},http://{},http://{dead}", p1.addr, p2.addr),
        )
        .env("PROXIES_USE_CONSISTENCY_HASH_BY_API_KEY", "false")
        .env("MAX_RETRIES", "3")
        .start()
        .await;
    ask_ok(&gate, 12).await;
    // Every call succeeded although a third of the attempts met the dead proxy: those were
    // retried on the other key over the next proxy in turn.
    assert!(!p1.keys().is_empty() && !p2.keys().is_empty());
    // The failed attempts name the dead proxy (the log is written in the background).
    gate.wait_log(&dead.to_string()).await;
}

#[tokio::test]
async fn a_proxy_that_refuses_gives_a_clear_502_and_no_key_penalty() {
    let fake = fake().await;
    let proxy = TestProxy::start(Some(("me", "right"))).await;
    let gate = gate()
        .upstream(&fake, &["key-a"])
        .admin()
        .env("PROXIES", &format!("http://me:wrong@{}", proxy.addr))
        .env("MAX_FAILURES", "1")
        .start()
        .await;
    let (status, _, v) = post(
        &gate,
        "/v1beta/models/gemini-2.0-flash:generateContent",
        &ask("hi"),
    )
    .await;
    assert_eq!(status, 502, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("407"), "{v}");
    assert!(!message.contains("wrong"), "the password leaked: {v}");
    assert_eq!(fake.state.total_requests(), 0);
    let (_, keys) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    assert_eq!(keys["keys"][0]["state"], "active", "{keys}");
}

#[tokio::test]
async fn a_bad_proxy_url_is_refused_by_check_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gemgate.toml");
    std::fs::write(&config, "").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gemgate"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .current_dir(dir.path())
        .env("PROXIES", "https://proxy.example:443")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("proxies") && text.contains("https://"),
        "{text}"
    );
}

#[tokio::test]
async fn custom_headers_reach_every_upstream_call_and_key_checks_use_the_proxy() {
    let fake = fake().await;
    let proxy = TestProxy::start(None).await;
    let gate = gate()
        .upstream(&fake, &["key-a"])
        .admin()
        .env("CUSTOM_HEADERS", r#"{"x-team": "blue", "x-trace": "on"}"#)
        .env("PROXIES", &format!("http://{}", proxy.addr))
        .start()
        .await;
    ask_ok(&gate, 1).await;
    let (_, keys) = admin(reqwest::Method::GET, &gate, "/admin/api/keys", None).await;
    let id = keys["keys"][0]["id"].clone();
    let (status, v) = admin(
        reqwest::Method::POST,
        &gate,
        "/admin/api/keys/verify",
        Some(json!({ "ids": [id] })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["results"][0]["ok"], true, "{v}");
    let received = fake.state.received();
    assert!(received.len() >= 2, "{received:?}");
    for r in &received {
        let headers: HashMap<&str, &str> = r
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            headers.get("x-team"),
            Some(&"blue"),
            "{} {:?}",
            r.path,
            r.headers
        );
        assert_eq!(
            headers.get("x-trace"),
            Some(&"on"),
            "{} {:?}",
            r.path,
            r.headers
        );
    }
    // Both the call and the check went through the proxy.
    assert!(proxy.tunnels.load(Ordering::SeqCst) >= 2);
}

//! Upstream proxies (`PROXIES`): HTTP `CONNECT` and SOCKS5 tunnels.
//!
//! A [`Tunnel`] is pingora's custom L4 connector (`PeerOptions::custom_l4`): pingora asks it for
//! a byte stream to the upstream, and it answers with a TCP connection to the proxy on which the
//! tunnel is already open. TLS, keep-alive and gemgate's idle pool then work over it unchanged.
//!
//! Which proxy a call takes is [`pick`]: with `PROXIES_USE_CONSISTENCY_HASH_BY_API_KEY` every key
//! always takes the same one (a hash of the key's stable id, the same across restarts and
//! machines), else the proxies take turns.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::{Error, ErrorType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_socks::TargetAddr;
use tokio_socks::tcp::Socks5Stream;

use crate::config::net::{ProxyScheme, ProxyUrl};

/// Largest answer to `CONNECT` read before the tunnel is given up.
const CONNECT_ANSWER_LIMIT: usize = 8 * 1024;

/// One configured proxy, and the upstream it opens tunnels to.
pub struct Tunnel {
    scheme: ProxyScheme,
    host: String,
    port: u16,
    /// User name and password, when the URL has them.
    auth: Option<(String, String)>,
    /// `Basic …` of `auth`, for an HTTP proxy.
    proxy_auth: Option<String>,
    /// `host:port` of the upstream, as a `CONNECT` names it.
    authority: String,
    /// The proxy's URL without its password, for logs and errors.
    pub display: String,
    /// The full URL, for side calls (key checks) that go through the same proxy.
    pub url: String,
    target_host: String,
    target_port: u16,
    /// The upstream speaks plain HTTP: an `http://` proxy is then asked the usual way, with
    /// absolute request targets, rather than to open a tunnel (many proxies open `CONNECT`
    /// tunnels only to port 443).
    plain: bool,
    timeout: Duration,
}

impl Tunnel {
    /// A tunnel through `url` (`http://[user:pass@]host:port`, `socks5://…`, `socks5h://…`) to
    /// `target_host:target_port`.
    pub fn new(
        url: &str,
        target_host: &str,
        target_port: u16,
        timeout: Duration,
    ) -> Result<Tunnel, String> {
        let ProxyUrl {
            scheme,
            host,
            port,
            auth,
            display,
            url,
        } = ProxyUrl::parse(url)?;
        let proxy_auth = auth.as_ref().map(|(user, pass)| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            format!("Basic {token}")
        });
        let authority = if target_host.contains(':') {
            format!("[{target_host}]:{target_port}")
        } else {
            format!("{target_host}:{target_port}")
        };
        Ok(Tunnel {
            scheme,
            host,
            port,
            auth,
            proxy_auth,
            authority,
            display,
            url,
            target_host: target_host.to_owned(),
            target_port,
            plain: false,
            timeout,
        })
    }

    /// Says whether the upstream speaks plain HTTP (see `plain`).
    pub fn with_plain_upstream(mut self, plain: bool) -> Tunnel {
        self.plain = plain;
        self
    }

    /// Whether requests go to this proxy as they are (absolute targets) instead of through a
    /// tunnel: an `http://` proxy in front of a plain-HTTP upstream.
    pub fn forwards(&self) -> bool {
        self.plain && self.scheme == ProxyScheme::Http
    }

    /// The `Proxy-Authorization` value of a forwarding proxy with credentials.
    pub fn proxy_authorization(&self) -> Option<&str> {
        self.proxy_auth.as_deref()
    }

    /// Whether the proxy itself looks up the upstream's name (`http://`, `socks5h://`).
    pub fn resolves_remotely(&self) -> bool {
        !matches!(self.scheme, ProxyScheme::Socks5 { remote_dns: false })
    }

    /// Opens a tunnel to the upstream, whose address pingora resolved as `resolved`.
    async fn open(&self, resolved: Option<SocketAddr>) -> Result<TcpStream, String> {
        let mut tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot reach the proxy: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match self.scheme {
            ProxyScheme::Http if self.plain => {}
            ProxyScheme::Http => self.connect_http(&mut tcp).await?,
            ProxyScheme::Socks5 { remote_dns } => {
                let target = match resolved {
                    Some(addr) if !remote_dns => TargetAddr::Ip(addr),
                    _ => TargetAddr::Domain(Cow::Borrowed(&self.target_host), self.target_port),
                };
                self.connect_socks5(&mut tcp, target).await?;
            }
        }
        Ok(tcp)
    }

    async fn connect_http(&self, tcp: &mut TcpStream) -> Result<(), String> {
        let authority = &self.authority;
        let mut ask = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(auth) = self.proxy_authorization() {
            ask.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        ask.push_str("\r\n");
        tcp.write_all(ask.as_bytes()).await.map_err(write_error)?;
        // The upstream says nothing before it is asked: the answer's head is all there is to
        // read on success. A refusal may carry a body after its head.
        let mut answer = Vec::with_capacity(256);
        let mut chunk = [0u8; 1024];
        while memchr::memmem::find(&answer, b"\r\n\r\n").is_none() {
            if answer.len() > CONNECT_ANSWER_LIMIT {
                return Err("the proxy's answer to CONNECT is too long".into());
            }
            let n = tcp.read(&mut chunk).await.map_err(read_error)?;
            if n == 0 {
                return Err("the proxy closed the connection during CONNECT".into());
            }
            answer.extend_from_slice(&chunk[..n]);
        }
        let line = answer.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let status = line.split_whitespace().nth(1).unwrap_or_default();
        if status.len() == 3 && status.starts_with('2') {
            if !answer.ends_with(b"\r\n\r\n") {
                return Err("the proxy sent data before the tunnel was open".into());
            }
            Ok(())
        } else {
            Err(format!("the proxy refused CONNECT: {}", line.trim()))
        }
    }

    /// Runs the SOCKS5 handshake (tokio-socks) over the open connection to the proxy: the
    /// greeting, the user name and password when the URL has them, then `CONNECT` to `target`.
    async fn connect_socks5(
        &self,
        tcp: &mut TcpStream,
        target: TargetAddr<'_>,
    ) -> Result<(), String> {
        if let TargetAddr::Domain(host, _) = &target
            && host.len() > 255
        {
            return Err(format!("{host} is too long a name for SOCKS5"));
        }
        let handshake = match &self.auth {
            Some((user, pass)) => {
                Socks5Stream::connect_with_password_and_socket(tcp, target, user, pass).await
            }
            None => Socks5Stream::connect_with_socket(tcp, target).await,
        };
        handshake.map(drop).map_err(socks5_error)
    }
}

impl std::fmt::Debug for Tunnel {
    /// Without the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tunnel({} to {}:{})",
            self.display, self.target_host, self.target_port
        )
    }
}

#[async_trait]
impl L4Connect for Tunnel {
    async fn connect(&self, addr: &PeerAddr) -> pingora::Result<Stream> {
        let resolved = addr.as_inet().copied();
        match tokio::time::timeout(self.timeout, self.open(resolved)).await {
            Ok(Ok(tcp)) => Ok(tcp.into()),
            Ok(Err(why)) => Err(Error::explain(
                ErrorType::ConnectProxyFailure,
                format!("proxy {}: {why}", self.display),
            )),
            Err(_) => Err(Error::explain(
                ErrorType::ConnectTimedout,
                format!(
                    "proxy {}: no tunnel within {:?}",
                    self.display, self.timeout
                ),
            )),
        }
    }
}

/// Which of `count` proxies a call with the key of stable id `key_id` takes: the same one
/// every time when `by_key`, else the next in turn.
pub fn pick(count: usize, by_key: bool, key_id: &str, turn: &AtomicUsize) -> usize {
    if count <= 1 {
        return 0;
    }
    if by_key {
        (fnv1a(key_id.as_bytes()) % count as u64) as usize
    } else {
        turn.fetch_add(1, Ordering::Relaxed) % count
    }
}

/// FNV-1a, 64 bits: tiny, and the same on every run and machine (unlike std's `RandomState`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A failed SOCKS5 handshake, said as the other tunnel errors are (no variant holds the
/// credentials, so none is ever quoted).
fn socks5_error(e: tokio_socks::Error) -> String {
    use tokio_socks::Error as E;
    let refused = |why: &str| format!("the SOCKS5 proxy could not connect: {why}");
    match e {
        E::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the proxy closed the connection during the SOCKS5 handshake".into()
        }
        E::Io(e) => format!("cannot talk to the proxy: {e}"),
        E::InvalidResponseVersion => "the proxy does not speak SOCKS5".into(),
        E::NoAcceptableAuthMethods => {
            "the SOCKS5 proxy accepts none of our authentication methods".into()
        }
        E::AuthorizationRequired => {
            "the SOCKS5 proxy asks for a user name and password, and the URL has none".into()
        }
        E::PasswordAuthFailure(_) => "the SOCKS5 proxy refused the user name and password".into(),
        // The URL's user name and password are at most 255 bytes: the password is empty.
        E::InvalidAuthValues(_) => {
            "the SOCKS5 proxy URL has a user name but no password: SOCKS5 sends both".into()
        }
        E::GeneralSocksServerFailure => refused("general failure"),
        E::ConnectionNotAllowedByRuleset => refused("not allowed by its rules"),
        E::NetworkUnreachable => refused("network unreachable"),
        E::HostUnreachable => refused("host unreachable"),
        E::ConnectionRefused => refused("connection refused"),
        E::TtlExpired => refused("TTL expired"),
        E::CommandNotSupported => refused("command not supported"),
        E::AddressTypeNotSupported => refused("address type not supported"),
        // tokio-socks says this for an unknown reply code as well as an unknown method.
        E::UnknownAuthMethod => {
            "the SOCKS5 proxy answered with an unknown method or reply code".into()
        }
        E::InvalidReservedByte | E::UnknownAddressType | E::InvalidTargetAddress(_) => {
            format!("the SOCKS5 proxy sent a malformed reply: {e}")
        }
        other => format!("the SOCKS5 handshake failed: {other}"),
    }
}

fn write_error(e: std::io::Error) -> String {
    format!("cannot write to the proxy: {e}")
}

fn read_error(e: std::io::Error) -> String {
    format!("cannot read from the proxy: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_with_credentials_masked() {
        let t = Tunnel::new(
            "http://user:p%40ss@127.0.0.1:3128",
            "generativelanguage.googleapis.com",
            443,
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(t.scheme, ProxyScheme::Http);
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 3128));
        assert_eq!(t.auth, Some(("user".into(), "p@ss".into())));
        assert_eq!(t.display, "http://user:***@127.0.0.1:3128");
        let t = Tunnel::new("socks5h://[::1]", "h", 443, Duration::from_secs(1)).unwrap();
        assert_eq!(t.scheme, ProxyScheme::Socks5 { remote_dns: true });
        assert_eq!((t.host.as_str(), t.port), ("::1", 1080));
        assert!(
            ProxyUrl::parse("https://proxy:443")
                .unwrap_err()
                .contains("https://")
        );
        assert!(ProxyUrl::parse("proxy:8080").is_err());
    }

    /// A one-shot proxy on loopback: reads the CONNECT head, answers `answer`, returns the head.
    async fn fake_proxy(answer: &'static [u8]) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            s.write_all(answer).await.unwrap();
            String::from_utf8(head).unwrap()
        });
        (port, task)
    }

    #[tokio::test]
    async fn connect_opens_a_tunnel_with_credentials_and_reports_refusals() {
        let (port, head) = fake_proxy(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
        let url = format!("http://me:secret@127.0.0.1:{port}");
        let t = Tunnel::new(
            &url,
            "generativelanguage.googleapis.com",
            443,
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(!t.forwards());
        t.open(None).await.unwrap();
        let head = head.await.unwrap();
        assert!(
            head.starts_with("CONNECT generativelanguage.googleapis.com:443 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("Proxy-Authorization: Basic bWU6c2VjcmV0\r\n"),
            "{head}"
        );

        let (port, _) = fake_proxy(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 5\r\n\r\nnope!",
        )
        .await;
        let t = Tunnel::new(
            &format!("http://127.0.0.1:{port}"),
            "h",
            443,
            Duration::from_secs(5),
        )
        .unwrap();
        let e = t.open(None).await.unwrap_err();
        assert!(e.contains("407"), "{e}");
    }

    /// What a fake SOCKS5 proxy does, step by step: read that many bytes, send that answer.
    type Steps = Vec<(usize, &'static [u8])>;

    /// A one-shot SOCKS5 proxy on loopback that follows `steps`; returns all it read.
    async fn fake_socks5(steps: Steps) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for (len, answer) in steps {
                let mut ask = vec![0u8; len];
                s.read_exact(&mut ask).await.unwrap();
                seen.extend_from_slice(&ask);
                s.write_all(answer).await.unwrap();
            }
            seen
        });
        (port, task)
    }

    fn socks5_tunnel(url: &str, target_host: &str) -> Tunnel {
        Tunnel::new(url, target_host, 443, Duration::from_secs(5)).unwrap()
    }

    #[tokio::test]
    async fn socks5h_sends_the_name_with_credentials_and_opens_the_tunnel() {
        let name = "generativelanguage.googleapis.com";
        let (port, seen) = fake_socks5(vec![
            (4, &[5, 2]),
            (3 + 2 + 6, &[1, 0]),
            (5 + name.len() + 2, &[5, 0, 0, 1, 127, 0, 0, 1, 0, 80]),
            (0, b"hello"),
        ])
        .await;
        let t = socks5_tunnel(&format!("socks5h://me:secret@127.0.0.1:{port}"), name);
        // The proxy resolves the name even when pingora resolved it too.
        let mut tcp = t
            .open(Some("127.0.0.9:443".parse().unwrap()))
            .await
            .unwrap();
        let mut first = [0u8; 5];
        tcp.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hello", "the handshake read past its reply");
        let mut expected = vec![5, 2, 0, 2, 1, 2, b'm', b'e', 6];
        expected.extend_from_slice(b"secret");
        expected.extend_from_slice(&[5, 1, 0, 3, name.len() as u8]);
        expected.extend_from_slice(name.as_bytes());
        expected.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(seen.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn socks5_connects_by_the_address_resolved_here() {
        let (port, seen) = fake_socks5(vec![
            (3, &[5, 0]),
            (10, &[5, 0, 0, 3, 4, b'a', b'b', b'c', b'd', 0, 80]),
            (0, b"hello"),
        ])
        .await;
        let t = socks5_tunnel(&format!("socks5://127.0.0.1:{port}"), "h.example");
        let mut tcp = t
            .open(Some("127.0.0.9:443".parse().unwrap()))
            .await
            .unwrap();
        let mut first = [0u8; 5];
        tcp.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hello");
        let seen = seen.await.unwrap();
        assert_eq!(seen, [5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 9, 1, 187]);
    }

    #[tokio::test]
    async fn socks5_failures_say_what_went_wrong_without_the_password() {
        let cases: [(&str, Steps, &str); 6] = [
            (
                "me:secret@",
                vec![(4, &[5, 2]), (11, &[1, 1])],
                "refused the user name and password",
            ),
            (
                "",
                vec![(3, &[5, 0]), (10, &[5, 5, 0, 1, 0, 0, 0, 0, 0, 0])],
                "could not connect: connection refused",
            ),
            (
                "",
                vec![(3, &[5, 0xff])],
                "accepts none of our authentication",
            ),
            ("", vec![(3, &[5, 2])], "asks for a user name and password"),
            ("", vec![(3, &[4, 0])], "does not speak SOCKS5"),
            ("secret@", vec![], "no password"),
        ];
        for (credentials, steps, wanted) in cases {
            let (port, _) = fake_socks5(steps).await;
            let url = format!("socks5://{credentials}127.0.0.1:{port}");
            let t = socks5_tunnel(&url, "h.example");
            let e = t
                .open(Some("127.0.0.9:443".parse().unwrap()))
                .await
                .unwrap_err();
            assert!(e.contains(wanted), "{credentials}: {e}");
            assert!(!e.contains("secret"), "the password leaked: {e}");
        }
        let long = "a".repeat(256);
        let (port, _) = fake_socks5(vec![]).await;
        let t = socks5_tunnel(&format!("socks5h://127.0.0.1:{port}"), &long);
        let e = t.open(None).await.unwrap_err();
        assert!(e.contains("too long a name for SOCKS5"), "{e}");
    }

    #[test]
    fn the_key_hash_is_stable_and_spreads() {
        // Fixed values: a key must keep its proxy across restarts and versions.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let turn = AtomicUsize::new(0);
        let picks: Vec<usize> = (0..100)
            .map(|i| pick(3, true, &format!("key{i}"), &turn))
            .collect();
        for p in 0..3 {
            assert!(picks.iter().filter(|x| **x == p).count() > 15, "{picks:?}");
        }
        assert_eq!(pick(3, true, "key7", &turn), picks[7]);
        assert_eq!(turn.load(Ordering::Relaxed), 0);
        let turns: Vec<usize> = (0..4).map(|_| pick(3, false, "k", &turn)).collect();
        assert_eq!(turns, [0, 1, 2, 0]);
    }
}

//! Fetching the URLs clients name (image and file URLs in chat requests), which gemgate inlines
//! into the request to Google.
//!
//! A URL from a client is a request the client makes *from gemgate's network*: left open, it
//! reads loopback services, the cloud's metadata endpoint or the private network, and the model
//! reads the answer back to the client. So by default only public unicast addresses are
//! fetched, checked on the address each connection actually uses: the resolver drops every
//! other address a name resolves to (no rebinding between a check and the connection), and
//! addresses written into a URL (`127.1`, `2130706433`, `[::ffff:127.0.0.1]`, which the URL
//! parser normalises) are checked before the request and at every redirect. `fetch.allow`
//! opens blocks or host names an operator needs; `fetch.enabled = false` turns fetching off.
//!
//! One request's fetches share a byte budget (`fetch.max_bytes`), each file is at most the body
//! limit, and an error says only which URL failed and why in gemgate's words: never what
//! answered at the address.
//!
//! URLs the operator configures (image hosts, `BASE_URL`, proxies) are not filtered: they go
//! through the other side-call clients.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::config::FetchConfig;
use crate::config::net::Allowed;

/// URLs one request may name, at most.
pub const MAX_URLS: usize = 16;
/// Redirects followed per URL, at most.
const MAX_REDIRECTS: usize = 3;
/// How long one fetch may take, from connecting to the last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a URL an error message repeats.
const SHOWN_URL: usize = 120;

/// Why a URL was not fetched, as the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// Fetching is switched off.
    Off,
    TooMany,
    /// Not http(s), or its address is not public (nor allowed).
    Refused(String),
    /// Past the per-file limit or the request's budget.
    TooLarge(String, u64),
    /// It could not be fetched (what answered, if anything, is not said).
    Failed(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Off => write!(
                f,
                "this gateway does not fetch URLs (fetch.enabled is off): send the file as a data: URL"
            ),
            FetchError::TooMany => write!(f, "at most {MAX_URLS} image or file URLs per request"),
            FetchError::Refused(url) => write!(
                f,
                "cannot fetch {url}: gemgate fetches only http(s) URLs at public addresses (or ones the operator allows)"
            ),
            FetchError::TooLarge(url, limit) => write!(
                f,
                "cannot fetch {url}: the files of one request may hold at most {limit} bytes"
            ),
            FetchError::Failed(url) => write!(f, "cannot fetch {url}"),
        }
    }
}

/// The refusal the resolver and the redirect policy raise inside reqwest; found again in the
/// error's source chain.
#[derive(Debug)]
struct NotAllowed;

impl std::fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the address is not allowed")
    }
}

impl std::error::Error for NotAllowed {}

/// The client that fetches URLs clients give, with its rules.
pub struct Fetcher {
    /// `None`: fetching is off.
    client: Option<reqwest::Client>,
    allow: Arc<[Allowed]>,
    max_bytes: u64,
}

impl Fetcher {
    pub fn new(config: &FetchConfig) -> Fetcher {
        let allow: Arc<[Allowed]> = config.allow.clone().into();
        let client = config.enabled.then(|| {
            let redirects = allow.clone();
            reqwest::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .connect_timeout(Duration::from_secs(10))
                // An environment proxy would resolve names where gemgate cannot check them.
                .no_proxy()
                .dns_resolver(Arc::new(PublicOnly {
                    allow: allow.clone(),
                }))
                .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                    if attempt.previous().len() >= MAX_REDIRECTS {
                        attempt.error("too many redirects")
                    } else if url_allowed(attempt.url(), &redirects) {
                        attempt.follow()
                    } else {
                        attempt.error(NotAllowed)
                    }
                }))
                .build()
                .expect("an HTTP client with these settings")
        });
        Fetcher {
            client,
            allow,
            max_bytes: config.max_bytes,
        }
    }

    /// Fetches `urls`, all at once, each at most `file_limit` bytes and all of them at most
    /// `fetch.max_bytes`; returns each file's mime type and base64 data, in order.
    pub async fn fetch_all(
        &self,
        urls: Vec<String>,
        file_limit: u64,
    ) -> Result<Vec<(String, String)>, FetchError> {
        let Some(client) = &self.client else {
            return Err(FetchError::Off);
        };
        if urls.len() > MAX_URLS {
            return Err(FetchError::TooMany);
        }
        let budget = Arc::new(AtomicU64::new(self.max_bytes));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, url) in urls.into_iter().enumerate() {
            let one = One {
                client: client.clone(),
                allow: self.allow.clone(),
                budget: budget.clone(),
                limit: file_limit.min(self.max_bytes),
            };
            tasks.spawn(async move { (i, one.fetch(&url).await) });
        }
        let mut files = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let (i, result) =
                done.map_err(|_| FetchError::Failed("one of the request's URLs".into()))?;
            let (mime, bytes) = result?;
            let data = base64::engine::general_purpose::STANDARD.encode(bytes);
            files.push((i, mime, data));
        }
        files.sort_by_key(|(i, ..)| *i);
        Ok(files.into_iter().map(|(_, m, d)| (m, d)).collect())
    }
}

/// One URL's fetch.
struct One {
    client: reqwest::Client,
    allow: Arc<[Allowed]>,
    /// What the request may still fetch, over all its URLs.
    budget: Arc<AtomicU64>,
    /// What this file may hold.
    limit: u64,
}

impl One {
    async fn fetch(&self, raw: &str) -> Result<(String, Vec<u8>), FetchError> {
        let shown: String = raw.chars().take(SHOWN_URL).collect();
        let url = Url::parse(raw).map_err(|_| FetchError::Refused(shown.clone()))?;
        if !url_allowed(&url, &self.allow) {
            return Err(FetchError::Refused(shown));
        }
        let failed = |e: reqwest::Error| {
            if refused(&e) {
                FetchError::Refused(shown.clone())
            } else {
                tracing::debug!(url = %shown, "fetch failed: {}", e.without_url());
                FetchError::Failed(shown.clone())
            }
        };
        let mut resp = self.client.get(url).send().await.map_err(failed)?;
        if !resp.status().is_success() {
            tracing::debug!(url = %shown, status = %resp.status(), "fetch refused by the server");
            return Err(FetchError::Failed(shown));
        }
        let too_large = || FetchError::TooLarge(shown.clone(), self.limit);
        if resp.content_length().is_some_and(|n| n > self.limit) {
            return Err(too_large());
        }
        let mime = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
            .filter(|m| !m.is_empty() && m != "application/octet-stream")
            .unwrap_or_else(|| guess_mime(raw).to_owned());
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(failed)? {
            let n = chunk.len() as u64;
            let within_budget = self
                .budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    left.checked_sub(n)
                })
                .is_ok();
            if !within_budget || bytes.len() as u64 + n > self.limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok((mime, bytes))
    }
}

/// Whether reqwest's error is the resolver's or the redirect policy's refusal.
fn refused(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<NotAllowed>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Whether `url` may be fetched as far as its text says: http(s), and an address written in it
/// public or allowed. Names are checked by [`PublicOnly`] when they resolve.
fn url_allowed(url: &Url, allow: &[Allowed]) -> bool {
    if !matches!(url.scheme(), "http" | "https") {
        return false;
    }
    match url.host() {
        Some(url::Host::Ipv4(ip)) => permitted(IpAddr::V4(ip), allow),
        Some(url::Host::Ipv6(ip)) => permitted(IpAddr::V6(ip), allow),
        Some(url::Host::Domain(_)) => true,
        None => false,
    }
}

/// Whether a connection to `ip` is allowed.
fn permitted(ip: IpAddr, allow: &[Allowed]) -> bool {
    is_public(ip) || allow.iter().any(|a| a.allows_ip(ip))
}

/// Whether `ip` is a public unicast address: not loopback, private, link-local, shared
/// (CGNAT), multicast, reserved or documentation space, in IPv4 or IPv6 (an IPv4-mapped or
/// 6to4 address is judged by the IPv4 address in it).
pub fn is_public(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(a == 0
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19)))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let global = s[0] & 0xe000 == 0x2000;
            let documentation = s[0] == 0x2001 && s[1] == 0x0db8;
            let teredo = s[0] == 0x2001 && s[1] == 0;
            if s[0] == 0x2002 {
                // 6to4: the IPv4 address it carries decides.
                let v4 = std::net::Ipv4Addr::new(
                    (s[1] >> 8) as u8,
                    s[1] as u8,
                    (s[2] >> 8) as u8,
                    s[2] as u8,
                );
                return is_public(IpAddr::V4(v4));
            }
            global && !documentation && !teredo
        }
    }
}

/// The resolver of the fetching client: a name resolves only to the addresses that may be
/// fetched (all of them for a name in `fetch.allow`), and to an error when none is left.
struct PublicOnly {
    allow: Arc<[Allowed]>,
}

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let named = allow.iter().any(|a| a.allows_name(&host));
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| named || permitted(a.ip(), &allow))
                .collect();
            if addrs.is_empty() {
                return Err(Box::new(NotAllowed) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// A mime type from a URL's extension, for servers that do not say.
fn guess_mime(url: &str) -> &'static str {
    let path = url
        .split(['?', '#'])
        .next()
        .unwrap_or(url)
        .to_ascii_lowercase();
    match path.rsplit('.').next() {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("pdf") => "application/pdf",
        Some("mp3") => "audio/mp3",
        Some("wav") => "audio/wav",
        _ => "image/png",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_public_unicast_addresses_are_public() {
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "2607:f8b0:4004:800::200e",
            "2002:0808:0808::1",
        ] {
            assert!(is_public(ip(public)), "{public}");
        }
        for inner in [
            "127.0.0.1",
            "127.8.9.10",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.0.8",
            "198.18.0.1",
            "192.0.2.1",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "2001:db8::1",
            "2001:0:4136:e378::1",
            "2002:7f00:0001::1",
            "64:ff9b::7f00:1",
            "::127.0.0.1",
        ] {
            assert!(!is_public(ip(inner)), "{inner}");
        }
    }

    #[test]
    fn addresses_written_in_urls_are_checked_in_every_spelling() {
        let none: Vec<Allowed> = Vec::new();
        for url in [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f.0.0.1/",
            "http://0177.0.0.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1:8080/x.png",
            "file:///etc/passwd",
            "ftp://8.8.8.8/x",
        ] {
            assert!(!url_allowed(&Url::parse(url).unwrap(), &none), "{url}");
        }
        for url in ["https://8.8.8.8/x.png", "https://images.example.com/x.png"] {
            assert!(url_allowed(&Url::parse(url).unwrap(), &none), "{url}");
        }
        let allow = vec![Allowed::parse("127.0.0.0/8").unwrap()];
        assert!(url_allowed(&Url::parse("http://127.1/").unwrap(), &allow));
    }
}

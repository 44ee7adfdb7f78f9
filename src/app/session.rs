//! Admin sessions: who may use the admin pages and API, and the guards around them.
//!
//! - A login with the admin token (`AUTH_TOKEN`) opens a session: a random id in a cookie that
//!   is `HttpOnly`, `SameSite=Strict`, `Secure` over https (then named `__Host-gemgate_admin`),
//!   and expires ([`TTL`]). Logging out, or changing `AUTH_TOKEN`, ends it.
//! - A state-changing request on a session must also carry the session's CSRF token (the
//!   `x-csrf-token` header, or a `_csrf` form field), and a cross-site `Origin` is refused.
//!   `Authorization: Bearer <AUTH_TOKEN>` needs neither: a browser never sends it by itself.
//! - Failed logins, wrong bearer tokens and wrong client tokens are counted per client address
//!   ([`Throttle`]): past a few, each further wrong one is answered 429 with a growing wait. A
//!   right credential always passes, so an attacker sharing an address (a reverse proxy's) with
//!   the operator cannot lock the operator out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use http::header;
use pingora::http::RequestHeader;
use sha2::{Digest, Sha256};

use super::shared::SharedState;
use crate::http::auth::same_secret;
use crate::http::peer::Peer;
use crate::http::reply::GateError;

/// The session cookie's name over plain http.
pub const COOKIE: &str = "gemgate_admin";
/// Its name over https: browsers keep a `__Host-` cookie only if it is `Secure`, for this host
/// alone and the whole site, so no sibling subdomain can plant or read one.
pub const HOST_COOKIE: &str = "__Host-gemgate_admin";
/// How long a session lasts.
pub const TTL: Duration = Duration::from_secs(8 * 3600);
/// Most sessions kept at once; the oldest go first.
const MAX_SESSIONS: usize = 1000;
/// Wrong admin credentials allowed per address before waits start.
pub const ADMIN_FREE_FAILURES: u32 = 3;
/// Wrong client tokens allowed per address before waits start.
pub const CLIENT_FREE_FAILURES: u32 = 10;
/// Longest wait imposed after failures.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Failures are forgotten after this long without one.
const FAILURE_MEMORY: Duration = Duration::from_secs(900);
/// Client addresses whose failures are remembered at once.
const MAX_TRACKED: usize = 10_000;

struct Session {
    expires: Instant,
    csrf: String,
    /// Hash of the admin token the session was opened with.
    admin: [u8; 32],
}

struct Failures {
    count: u32,
    last: Instant,
}

/// Wrong credentials counted per client address (an IPv6 client per /64, the block one
/// subscriber holds): after `free` of them, each further one is answered with a wait twice as
/// long as the last (up to 5 minutes). Bounded in memory: when full, the older half of the
/// addresses is forgotten at once, so a flood from many addresses costs a constant amount of
/// work per failure.
pub struct Throttle {
    free: u32,
    failures: RwLock<HashMap<IpAddr, Failures>>,
    /// Whether any address has failures: a right credential then takes no lock.
    any: AtomicBool,
}

impl Throttle {
    pub fn new(free: u32) -> Throttle {
        Throttle {
            free,
            failures: RwLock::default(),
            any: AtomicBool::new(false),
        }
    }

    /// Counts a wrong credential from `ip`: `Some(wait)` once past the free ones, the time the
    /// client is told to wait.
    pub fn failed(&self, ip: Option<IpAddr>) -> Option<Duration> {
        let ip = counted_as(ip?);
        let mut failures = self.failures.write().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_TRACKED && !failures.contains_key(&ip) {
            forget_older_half(&mut failures);
        }
        let f = failures.entry(ip).or_insert(Failures {
            count: 0,
            last: Instant::now(),
        });
        if f.last.elapsed() >= FAILURE_MEMORY {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = Instant::now();
        self.any.store(true, Ordering::Relaxed);
        let over = f.count.checked_sub(self.free + 1)?;
        Some(Duration::from_secs(1u64 << over.min(9)).min(MAX_WAIT))
    }

    /// A right credential from `ip`: its failures are forgotten. Addresses without failures
    /// (nearly every request) share a read lock.
    pub fn succeeded(&self, ip: Option<IpAddr>) {
        let Some(ip) = ip.filter(|_| self.any.load(Ordering::Relaxed)) else {
            return;
        };
        let ip = counted_as(ip);
        let read = self.failures.read().unwrap_or_else(|e| e.into_inner());
        if !read.contains_key(&ip) {
            return;
        }
        drop(read);
        let mut failures = self.failures.write().unwrap_or_else(|e| e.into_inner());
        failures.remove(&ip);
        if failures.is_empty() {
            self.any.store(false, Ordering::Relaxed);
        }
    }
}

/// The address failures are counted under: an IPv4 address (also when written IPv4-mapped),
/// or an IPv6 address's /64.
fn counted_as(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// Forgets the addresses whose last failure is older than the median (and any past
/// `FAILURE_MEMORY`): linear work that frees half the room.
fn forget_older_half(failures: &mut HashMap<IpAddr, Failures>) {
    failures.retain(|_, f| f.last.elapsed() < FAILURE_MEMORY);
    if failures.len() < MAX_TRACKED / 2 {
        return;
    }
    let mut lasts: Vec<Instant> = failures.values().map(|f| f.last).collect();
    let middle = lasts.len() / 2;
    let (_, median, _) = lasts.select_nth_unstable(middle);
    let median = *median;
    failures.retain(|_, f| f.last > median);
}

/// Open sessions and recent wrong credentials; they outlive reloads.
pub struct Sessions {
    live: Mutex<HashMap<String, Session>>,
    /// Wrong admin tokens (logins and bearer tokens).
    pub admin_failures: Throttle,
    /// Wrong client tokens on the proxy routes.
    pub client_failures: Throttle,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            live: Mutex::default(),
            admin_failures: Throttle::new(ADMIN_FREE_FAILURES),
            client_failures: Throttle::new(CLIENT_FREE_FAILURES),
        }
    }
}

/// How a request proved it may use the admin routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admin {
    /// `Authorization: Bearer <AUTH_TOKEN>`.
    Bearer,
    /// A session cookie; its id and CSRF token.
    Session { id: String, csrf: String },
}

impl Admin {
    /// The CSRF token pages embed (empty for bearer callers, who need none).
    pub fn csrf(&self) -> &str {
        match self {
            Admin::Bearer => "",
            Admin::Session { csrf, .. } => csrf,
        }
    }
}

/// The SHA-256 of a token: what a session keeps of the admin token it was opened with.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// 32 random bytes, hex-encoded.
pub fn random_token() -> String {
    random_hex::<32>()
}

/// `N` bytes from the system's random source, hex-encoded.
pub fn random_hex<const N: usize>() -> String {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes).expect("the system's random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    /// Opens a session for the holder of `admin_token`: (id, CSRF token).
    pub fn open(&self, admin_token: &str) -> (String, String) {
        let (id, csrf) = (random_token(), random_token());
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        live.retain(|_, s| s.expires > now);
        if live.len() >= MAX_SESSIONS
            && let Some(oldest) = live
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            live.remove(&oldest);
        }
        live.insert(
            id.clone(),
            Session {
                expires: now + TTL,
                csrf: csrf.clone(),
                admin: digest(admin_token),
            },
        );
        (id, csrf)
    }

    /// The CSRF token of live session `id`, if it was opened with today's `admin_token`.
    pub fn check(&self, id: &str, admin_token: &str) -> Option<String> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let s = live.get(id)?;
        if s.expires <= Instant::now() || s.admin != digest(admin_token) {
            live.remove(id);
            return None;
        }
        Some(s.csrf.clone())
    }

    /// A session opened elsewhere in the fleet: `admin` is the digest of the admin token it
    /// was opened with; it lives `left` longer.
    pub fn adopt(&self, id: String, csrf: String, admin: [u8; 32], left: Duration) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.len() >= MAX_SESSIONS && !live.contains_key(&id) {
            return;
        }
        live.insert(
            id,
            Session {
                expires: Instant::now() + left.min(TTL),
                csrf,
                admin,
            },
        );
    }

    /// Every live session: (id, CSRF token, admin token digest, time left).
    pub fn all(&self) -> Vec<(String, String, [u8; 32], Duration)> {
        let now = Instant::now();
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.iter()
            .filter(|(_, s)| s.expires > now)
            .map(|(id, s)| (id.clone(), s.csrf.clone(), s.admin, s.expires - now))
            .collect()
    }

    pub fn close(&self, id: &str) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// A login attempt with `presented` from `ip`: `Ok` for the admin token, else the error (401,
/// or 429 with the wait once past the free failures).
pub fn login(
    shared: &dyn SharedState,
    presented: &str,
    admin_token: &str,
    ip: Option<IpAddr>,
) -> Result<(), GateError> {
    if same_secret(presented.trim(), admin_token) {
        shared.admin_succeeded(ip);
        return Ok(());
    }
    tracing::warn!(client = ?ip, "admin: a wrong admin token");
    match shared.admin_failed(ip) {
        Some(wait) => Err(GateError::new(
            429,
            "too many wrong admin tokens from this address: wait before trying again",
        )
        .retry_after(Some(wait.as_secs().max(1)))),
        None => Err(GateError::new(
            401,
            "that is not the admin token (AUTH_TOKEN)",
        )),
    }
}

/// Who `req` is, for the admin routes. Errors: 403 when the admin routes are off, 401
/// without valid credentials (429 after too many wrong bearer tokens from `peer`'s address),
/// 403 for a state-changing session request from another site.
///
/// A session's CSRF token is checked by [`Admin::check_csrf`], once the body that may
/// carry it is read: a body is read only after this has passed.
pub fn identify(
    shared: &dyn SharedState,
    req: &RequestHeader,
    peer: &Peer,
    admin_token: Option<&str>,
) -> Result<Admin, GateError> {
    let Some(admin_token) = admin_token else {
        return Err(GateError::new(
            403,
            "the admin page and API are off: set AUTH_TOKEN to turn them on",
        ));
    };
    let bearer = req
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(presented) = bearer {
        match login(shared, presented, admin_token, peer.ip) {
            Ok(()) => return Ok(Admin::Bearer),
            // A wrong bearer token with a session cookie is still the session's request.
            Err(e) if e.status == 429 || session_id(req).is_none() => return Err(e),
            Err(_) => {}
        }
    }
    let Some(id) = session_id(req) else {
        return Err(GateError::new(
            401,
            "log in at /admin/login, or send Authorization: Bearer <AUTH_TOKEN>",
        ));
    };
    let Some(csrf) = shared.session_csrf(id, admin_token) else {
        return Err(GateError::new(
            401,
            "the admin session has ended: log in again at /admin/login",
        ));
    };
    if changes_state(req) && !same_origin(req, peer) {
        return Err(GateError::new(403, "a cross-site admin request is refused"));
    }
    Ok(Admin::Session {
        id: id.to_owned(),
        csrf,
    })
}

impl Admin {
    /// For a session's state-changing request: whether it carries the session's CSRF token
    /// (the `x-csrf-token` header, or `form_csrf`, the body's `_csrf` field).
    pub fn check_csrf(
        &self,
        req: &RequestHeader,
        form_csrf: Option<&str>,
    ) -> Result<(), GateError> {
        let Admin::Session { csrf, .. } = self else {
            return Ok(());
        };
        if !changes_state(req) {
            return Ok(());
        }
        let presented = req
            .headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .or(form_csrf)
            .unwrap_or_default();
        if same_secret(presented, csrf) {
            Ok(())
        } else {
            Err(GateError::new(
                403,
                "this admin request lacks its CSRF token (x-csrf-token): reload the page",
            ))
        }
    }
}

/// Whether a request may change something (anything but a read).
fn changes_state(req: &RequestHeader) -> bool {
    !matches!(
        req.method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    )
}

/// The session id a request carries, under either cookie name.
fn session_id(req: &RequestHeader) -> Option<&str> {
    cookie(req, HOST_COOKIE).or_else(|| cookie(req, COOKIE))
}

/// Whether the request's `Origin` (when it has one) is this host: the `Host` the request names,
/// or the `X-Forwarded-Host` of a trusted proxy in front.
fn same_origin(req: &RequestHeader, peer: &Peer) -> bool {
    let Some(origin) = req
        .headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return true;
    };
    let host = req
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or(origin);
    let matches = |h: &str| !h.is_empty() && origin_host.eq_ignore_ascii_case(h);
    matches(host) || peer.forwarded_host.as_deref().is_some_and(matches)
}

/// The value of cookie `name`.
pub fn cookie<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The `Set-Cookie` value that opens session `id` (`None`: that ends it); `secure` for a
/// request that came over https.
pub fn set_cookie(id: Option<&str>, secure: bool) -> String {
    let (name, secure) = if secure {
        (HOST_COOKIE, "; Secure")
    } else {
        (COOKIE, "")
    };
    match id {
        Some(id) => format!(
            "{name}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            TTL.as_secs()
        ),
        None => format!("{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, b"/admin/api/keys", None).unwrap();
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    fn peer(ip: &str) -> Peer {
        Peer {
            ip: Some(ip.parse().unwrap()),
            ..Peer::default()
        }
    }

    #[test]
    fn sessions_need_their_csrf_token_to_change_anything() {
        let s = crate::app::Lasting::default().local();
        let nobody = Peer::default();
        let (id, csrf) = s.open_session("root");
        let cookie = format!("other=1; {COOKIE}={id}");
        let get = req("GET", &[("cookie", &cookie)]);
        assert!(matches!(
            identify(&s, &get, &nobody, Some("root")),
            Ok(Admin::Session { .. })
        ));
        let post = req("POST", &[("cookie", &cookie), ("host", "gw:8000")]);
        let admin = identify(&s, &post, &nobody, Some("root")).unwrap();
        assert_eq!(admin.check_csrf(&post, None).unwrap_err().status, 403);
        assert!(admin.check_csrf(&post, Some(&csrf)).is_ok());
        let cross = req(
            "POST",
            &[
                ("cookie", &cookie),
                ("host", "gw:8000"),
                ("origin", "https://evil.example"),
                ("x-csrf-token", &csrf),
            ],
        );
        assert_eq!(
            identify(&s, &cross, &nobody, Some("root"))
                .unwrap_err()
                .status,
            403
        );
        // A trusted proxy's X-Forwarded-Host is this gateway too.
        let proxied = Peer {
            forwarded_host: Some("evil.example".into()),
            ..Peer::default()
        };
        assert!(identify(&s, &cross, &proxied, Some("root")).is_ok());
        // A new AUTH_TOKEN ends every session; no AUTH_TOKEN turns the routes off.
        assert_eq!(
            identify(&s, &get, &nobody, Some("new")).unwrap_err().status,
            401
        );
        assert_eq!(identify(&s, &get, &nobody, None).unwrap_err().status, 403);
        let bearer = req("DELETE", &[("authorization", "Bearer root")]);
        let admin = identify(&s, &bearer, &nobody, Some("root")).unwrap();
        assert_eq!(admin, Admin::Bearer);
        assert!(admin.check_csrf(&bearer, None).is_ok());
        s.close_session(&id);
        assert!(s.session_csrf(&id, "root").is_none());
        let host = req(
            "GET",
            &[(
                "cookie",
                &format!("{HOST_COOKIE}={}", s.open_session("root").0),
            )],
        );
        assert!(identify(&s, &host, &nobody, Some("root")).is_ok());
    }

    #[test]
    fn wrong_tokens_wait_longer_and_longer_but_the_right_one_always_passes() {
        let s = crate::app::Lasting::default().local();
        let ip = peer("10.0.0.1");
        for _ in 0..ADMIN_FREE_FAILURES {
            assert_eq!(login(&s, "nope", "root", ip.ip).unwrap_err().status, 401);
        }
        let first = login(&s, "nope", "root", ip.ip).unwrap_err();
        assert_eq!((first.status, first.retry_after_s), (429, Some(1)));
        let second = login(&s, "nope", "root", ip.ip).unwrap_err();
        assert_eq!(second.retry_after_s, Some(2));
        assert!(login(&s, "nope", "root", peer("10.0.0.2").ip).is_err());
        assert_eq!(
            login(&s, "nope", "root", peer("10.0.0.2").ip)
                .unwrap_err()
                .status,
            401,
            "another address has its own count"
        );
        // Throttled, the right token still passes, and clears the count.
        assert!(login(&s, "root", "root", ip.ip).is_ok());
        assert_eq!(login(&s, "nope", "root", ip.ip).unwrap_err().status, 401);
        // Wrong bearer tokens are attempts too.
        let other = peer("10.0.0.3");
        let wrong = req("GET", &[("authorization", "Bearer nope")]);
        for _ in 0..ADMIN_FREE_FAILURES {
            assert_eq!(
                identify(&s, &wrong, &other, Some("root"))
                    .unwrap_err()
                    .status,
                401
            );
        }
        let e = identify(&s, &wrong, &other, Some("root")).unwrap_err();
        assert_eq!((e.status, e.retry_after_s.is_some()), (429, true));
        let right = req("GET", &[("authorization", "Bearer root")]);
        assert_eq!(
            identify(&s, &right, &other, Some("root")).unwrap(),
            Admin::Bearer
        );
    }

    #[test]
    fn the_throttle_forgets_the_older_half_when_full() {
        let t = Throttle::new(0);
        let v4 = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(i));
        for i in 0..MAX_TRACKED as u32 + 5 {
            assert!(t.failed(Some(v4(i))).is_some());
        }
        let failures = t.failures.read().unwrap();
        assert!(failures.len() <= MAX_TRACKED / 2 + 5, "{}", failures.len());
        assert!(
            failures.contains_key(&v4(MAX_TRACKED as u32 + 4)),
            "the newest stay"
        );
    }

    #[test]
    fn an_ipv6_client_is_counted_per_64() {
        let t = Throttle::new(1);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(t.failed(Some(a)), None);
        assert!(t.failed(Some(b)).is_some(), "the same /64");
        assert_eq!(t.failed(Some(other)), None, "another /64");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let plain: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(t.failed(Some(mapped)), None);
        assert!(
            t.failed(Some(plain)).is_some(),
            "one address, two spellings"
        );
        t.succeeded(Some(plain));
        assert_eq!(t.failed(Some(mapped)), None, "forgotten on success");
    }

    #[test]
    fn cookies_are_strict_and_host_bound_over_https() {
        let c = set_cookie(Some("abc"), true);
        for part in [
            "__Host-gemgate_admin=abc",
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Max-Age=28800",
            "Path=/",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!c.contains("Domain"));
        let plain = set_cookie(Some("abc"), false);
        assert!(plain.starts_with("gemgate_admin=abc") && !plain.contains("Secure"));
        assert!(set_cookie(None, false).contains("Max-Age=0"));
    }
}

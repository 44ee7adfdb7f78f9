//! Admin sessions: who may use the admin pages and API, and the guards around them.
//!
//! - A login with the admin token (`AUTH_TOKEN`) opens a session: a random id in a cookie that
//!   is `HttpOnly`, `SameSite=Strict`, `Secure` over TLS, and expires ([`TTL`]). Logging out,
//!   or changing `AUTH_TOKEN`, ends it.
//! - A state-changing request on a session must also carry the session's CSRF token (the
//!   `x-csrf-token` header, or a `_csrf` form field), and a cross-site `Origin` is refused.
//!   `Authorization: Bearer <AUTH_TOKEN>` needs neither: a browser never sends it by itself.
//! - Failed logins, and wrong bearer tokens, are slowed down per client address
//!   ([`Sessions::login_attempt`]). Behind a reverse proxy every client shares its address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header;
use pingora::http::RequestHeader;
use sha2::{Digest, Sha256};

use super::auth::same_secret;
use crate::proxy::reply::GateError;

/// The session cookie's name.
pub const COOKIE: &str = "gemgate_admin";
/// How long a session lasts.
pub const TTL: Duration = Duration::from_secs(8 * 3600);
/// Most sessions kept at once; the oldest go first.
const MAX_SESSIONS: usize = 1000;
/// Failed logins allowed before waits start.
const FREE_FAILURES: u32 = 3;
/// Longest wait imposed after failed logins.
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

/// Open sessions and recent failed logins; they outlive reloads.
#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
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

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// 32 random bytes, hex-encoded.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
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
        if live.len() >= MAX_SESSIONS {
            if let Some(oldest) = live
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                live.remove(&oldest);
            }
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

    pub fn close(&self, id: &str) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Takes one login attempt for `ip` (a login form, or an admin bearer token): `Err` with how
    /// long to wait when too many failed lately. The attempt counts as a failure until
    /// [`Sessions::login_succeeded`] says otherwise, so attempts sent together are all counted.
    pub fn login_attempt(&self, ip: Option<IpAddr>) -> Result<(), Duration> {
        let Some(ip) = ip else { return Ok(()) };
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = failures.get(&ip) {
            if f.count >= FREE_FAILURES && f.last.elapsed() < FAILURE_MEMORY {
                let wait =
                    Duration::from_secs(1u64 << (f.count - FREE_FAILURES).min(9)).min(MAX_WAIT);
                if let Some(left) = wait.checked_sub(f.last.elapsed()) {
                    return Err(left);
                }
            }
        }
        if failures.len() >= MAX_TRACKED {
            failures.retain(|_, f| f.last.elapsed() < FAILURE_MEMORY);
            if failures.len() >= MAX_TRACKED {
                let oldest = failures
                    .iter()
                    .min_by_key(|(_, f)| f.last)
                    .map(|(ip, _)| *ip);
                if let Some(oldest) = oldest {
                    failures.remove(&oldest);
                }
            }
        }
        let f = failures.entry(ip).or_insert(Failures {
            count: 0,
            last: Instant::now(),
        });
        if f.last.elapsed() >= FAILURE_MEMORY {
            f.count = 0;
        }
        f.count += 1;
        f.last = Instant::now();
        Ok(())
    }

    pub fn login_succeeded(&self, ip: Option<IpAddr>) {
        if let Some(ip) = ip {
            self.failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&ip);
        }
    }

    /// Who `req` is, for the admin routes. `form_csrf` is a `_csrf` form field, if the body
    /// had one. Errors: 403 when the admin routes are off, 401 without valid credentials,
    /// 403 for a state-changing session request without its CSRF token or from another site.
    ///
    /// A bearer token is a login attempt of `ip`: wrong ones are throttled like the login form's.
    pub fn identify(
        &self,
        req: &RequestHeader,
        ip: Option<IpAddr>,
        admin_token: Option<&str>,
        form_csrf: Option<&str>,
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
            if let Err(wait) = self.login_attempt(ip) {
                let mut e = GateError::new(
                    429,
                    "too many wrong admin tokens from this address: wait before trying again",
                );
                e.retry_after_s = Some(wait.as_secs().max(1));
                return Err(e);
            }
            if same_secret(presented.trim(), admin_token) {
                self.login_succeeded(ip);
                return Ok(Admin::Bearer);
            }
        }
        let Some(id) = cookie(req, COOKIE) else {
            return Err(GateError::new(
                401,
                "log in at /admin/login, or send Authorization: Bearer <AUTH_TOKEN>",
            ));
        };
        let Some(csrf) = self.check(id, admin_token) else {
            return Err(GateError::new(
                401,
                "the admin session has ended: log in again at /admin/login",
            ));
        };
        if !matches!(
            req.method,
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        ) {
            if !same_origin(req) {
                return Err(GateError::new(403, "a cross-site admin request is refused"));
            }
            let presented = req
                .headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .or(form_csrf)
                .unwrap_or_default();
            if !same_secret(presented, &csrf) {
                return Err(GateError::new(
                    403,
                    "this admin request lacks its CSRF token (x-csrf-token): reload the page",
                ));
            }
        }
        Ok(Admin::Session {
            id: id.to_owned(),
            csrf,
        })
    }
}

/// Whether the request's `Origin` (when it has one) is this host.
fn same_origin(req: &RequestHeader) -> bool {
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
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
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

/// The `Set-Cookie` value that opens session `id` (`None`: that ends it).
pub fn set_cookie(id: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match id {
        Some(id) => format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            TTL.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
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

    #[test]
    fn sessions_need_their_csrf_token_to_change_anything() {
        let s = Sessions::default();
        let (id, csrf) = s.open("root");
        let cookie = format!("other=1; {COOKIE}={id}");
        let get = req("GET", &[("cookie", &cookie)]);
        assert!(matches!(
            s.identify(&get, None, Some("root"), None),
            Ok(Admin::Session { .. })
        ));
        let post = req("POST", &[("cookie", &cookie), ("host", "gw:8000")]);
        assert_eq!(
            s.identify(&post, None, Some("root"), None)
                .unwrap_err()
                .status,
            403
        );
        assert!(s.identify(&post, None, Some("root"), Some(&csrf)).is_ok());
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
            s.identify(&cross, None, Some("root"), None)
                .unwrap_err()
                .status,
            403
        );
        // A new AUTH_TOKEN ends every session; no AUTH_TOKEN turns the routes off.
        assert_eq!(
            s.identify(&get, None, Some("new"), None)
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(s.identify(&get, None, None, None).unwrap_err().status, 403);
        let bearer = req("DELETE", &[("authorization", "Bearer root")]);
        assert_eq!(
            s.identify(&bearer, None, Some("root"), None).unwrap(),
            Admin::Bearer
        );
        s.close(&id);
        assert!(s.check(&id, "root").is_none());
    }

    #[test]
    fn failed_logins_wait_longer_and_longer() {
        let s = Sessions::default();
        let ip = Some("10.0.0.1".parse().unwrap());
        for _ in 0..FREE_FAILURES {
            assert_eq!(s.login_attempt(ip), Ok(()));
        }
        let first = s.login_attempt(ip).unwrap_err();
        assert!(first > Duration::ZERO);
        assert_eq!(s.login_attempt(Some("10.0.0.2".parse().unwrap())), Ok(()));
        s.login_succeeded(ip);
        assert_eq!(s.login_attempt(ip), Ok(()));
        // Wrong bearer tokens are attempts too.
        let other = Some("10.0.0.3".parse().unwrap());
        let wrong = req("GET", &[("authorization", "Bearer nope")]);
        for _ in 0..FREE_FAILURES {
            assert_eq!(
                s.identify(&wrong, other, Some("root"), None)
                    .unwrap_err()
                    .status,
                401
            );
        }
        let e = s.identify(&wrong, other, Some("root"), None).unwrap_err();
        assert_eq!((e.status, e.retry_after_s.is_some()), (429, true));
    }

    #[test]
    fn cookies_are_strict() {
        let c = set_cookie(Some("abc"), true);
        for part in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Max-Age=28800",
            "Path=/",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!set_cookie(Some("abc"), false).contains("Secure"));
        assert!(set_cookie(None, false).contains("Max-Age=0"));
    }
}

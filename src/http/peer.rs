//! Who a request came from: the connection's address, or what a trusted reverse proxy in front
//! says about its client (`X-Forwarded-For`, `-Proto`, `-Host`).
//!
//! Forwarding headers are believed only when the connection comes from one of
//! `server.trusted_proxies` (none by default): anyone else could write them, and would then
//! choose the address its failed logins are counted under, or the scheme and host of the links
//! gemgate hands out.

use std::net::IpAddr;

use pingora::protocols::http::ServerSession;

use crate::config::net::{Cidr, in_any};

/// What gemgate knows of a request's client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// The client's address: the connection's, or the one a trusted proxy forwarded for.
    pub ip: Option<IpAddr>,
    /// The client reached gemgate over TLS (directly, or at a trusted proxy that says so).
    pub https: bool,
    /// The host the client asked a trusted proxy for (`X-Forwarded-Host`).
    pub forwarded_host: Option<String>,
    /// The request came through a trusted proxy.
    pub proxied: bool,
}

impl Peer {
    pub fn of(s: &ServerSession, trusted: &[Cidr]) -> Peer {
        let ip = s
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_canonical());
        let tls = s.digest().is_some_and(|d| d.ssl_digest.is_some());
        if trusted.is_empty() {
            return Peer::from_parts(ip, tls, trusted, "", "", "");
        }
        let headers = &s.req_header().headers;
        let header = |name: &str| {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(",")
        };
        Peer::from_parts(
            ip,
            tls,
            trusted,
            &header("x-forwarded-for"),
            &header("x-forwarded-proto"),
            &header("x-forwarded-host"),
        )
    }

    fn from_parts(
        ip: Option<IpAddr>,
        tls: bool,
        trusted: &[Cidr],
        forwarded_for: &str,
        proto: &str,
        host: &str,
    ) -> Peer {
        let proxied = ip.is_some_and(|ip| in_any(trusted, ip));
        if !proxied {
            return Peer {
                ip,
                https: tls,
                forwarded_host: None,
                proxied: false,
            };
        }
        // The client is the last address not one of our proxies, walking back from the one
        // that connected: addresses before it are whatever the client itself wrote. An entry
        // that is no address (nor an address and port) ends the walk: past it, nothing can be
        // believed, and the client is the nearest hop known.
        let mut client = ip;
        for hop in forwarded_for.rsplit(',').map(str::trim) {
            let Some(hop) = hop_address(hop) else { break };
            client = Some(hop);
            if !in_any(trusted, hop) {
                break;
            }
        }
        // The proxy that connected wrote the last value (or the only one, if it overwrites
        // them); values before it came from further away, maybe from the client.
        let last = |list: &str| {
            list.rsplit(',')
                .map(str::trim)
                .find(|v| !v.is_empty())
                .map(str::to_owned)
        };
        Peer {
            ip: client,
            https: tls || last(proto).is_some_and(|p| p.eq_ignore_ascii_case("https")),
            forwarded_host: last(host).filter(|h| valid_authority(h)),
            proxied: true,
        }
    }
}

/// One `X-Forwarded-For` entry's address: `1.2.3.4`, `2001:db8::1`, or either with a port
/// (`1.2.3.4:5678`, `[2001:db8::1]:443`), as some load balancers write them.
fn hop_address(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

/// Whether `s` is a plain `host[:port]`: no user, path, or anything else a link could smuggle.
pub fn valid_authority(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let direct = Peer::from_parts(
            ip("203.0.113.9"),
            false,
            &trusted,
            "1.2.3.4",
            "https",
            "evil.example",
        );
        assert_eq!(direct.ip, ip("203.0.113.9"));
        assert!(!direct.https && direct.forwarded_host.is_none() && !direct.proxied);

        let via = Peer::from_parts(
            ip("10.0.0.2"),
            false,
            &trusted,
            "6.6.6.6, 198.51.100.7, 10.0.0.3",
            "http,https",
            "evil.example, gemini.example.com",
        );
        assert_eq!(via.ip, ip("198.51.100.7"), "the last address not a proxy");
        assert!(via.https && via.proxied, "the connecting proxy's value");
        assert_eq!(via.forwarded_host.as_deref(), Some("gemini.example.com"));

        // Entries with ports are addresses too; an entry that is none ends the walk rather
        // than letting the client's own entries count.
        let ported = Peer::from_parts(
            ip("10.0.0.2"),
            false,
            &trusted,
            "6.6.6.6, 198.51.100.7:5678, [::ffff:10.0.0.4]:80, 10.0.0.3:443",
            "",
            "",
        );
        assert_eq!(ported.ip, ip("198.51.100.7"));
        let garbled = Peer::from_parts(
            ip("10.0.0.2"),
            false,
            &trusted,
            "6.6.6.6, unknown, 10.0.0.3",
            "",
            "",
        );
        assert_eq!(garbled.ip, ip("10.0.0.3"), "the nearest hop known");

        let bad_host = Peer::from_parts(ip("10.0.0.2"), false, &trusted, "", "", "evil.example/x?");
        assert_eq!(bad_host.ip, ip("10.0.0.2"));
        assert!(bad_host.forwarded_host.is_none());
    }
}

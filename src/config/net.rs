//! Address rules from the config: CIDR blocks (`server.trusted_proxies`), the allowlist of
//! URL fetching (`fetch.allow`: blocks, addresses, host names) and upstream proxy URLs
//! (`PROXIES`).

use std::net::IpAddr;

/// An address block: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or a bare address (a block of one).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("{s:?} is not an address or an address block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        // A block written IPv4-mapped (`::ffff:10.0.0.0/104`) is that IPv4 block: the
        // addresses it is matched against are made IPv4 too.
        match net.to_canonical() {
            IpAddr::V4(v4) if net.is_ipv6() => {
                let prefix = prefix.checked_sub(96).ok_or_else(|| {
                    format!("{s:?}: a block of IPv4-mapped addresses needs a prefix of 96 to 128")
                })?;
                Ok(Cidr {
                    net: IpAddr::V4(v4),
                    prefix,
                })
            }
            _ => Ok(Cidr { net, prefix }),
        }
    }

    /// Whether `ip` is in the block. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is its
    /// IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `bits` bits of `a` and `b` are equal.
fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = usize::from(bits);
    let (whole, rest) = (bits / 8, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

/// Whether `ip` is in any of `blocks`.
pub fn in_any(blocks: &[Cidr], ip: IpAddr) -> bool {
    blocks.iter().any(|b| b.contains(ip))
}

/// One `fetch.allow` entry: an address block, or a host name (`images.internal`, or
/// `*.internal` for every name under it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    Block(Cidr),
    Host(String),
}

impl Allowed {
    pub fn parse(s: &str) -> Result<Allowed, String> {
        let s = s.trim();
        if let Ok(block) = Cidr::parse(s) {
            return Ok(Allowed::Block(block));
        }
        let name = s.strip_prefix("*.").unwrap_or(s);
        let valid = !name.is_empty()
            && name.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!(
                "{s:?} is neither an address block (10.0.0.0/8) nor a host name (images.internal, *.internal)"
            ));
        }
        Ok(Allowed::Host(s.to_ascii_lowercase()))
    }

    /// Whether this entry allows host `name` (a name, not an address).
    pub fn allows_name(&self, name: &str) -> bool {
        let Allowed::Host(rule) = self else {
            return false;
        };
        let name = name.trim_end_matches('.');
        match rule.strip_prefix("*.") {
            Some(suffix) => name.len().checked_sub(suffix.len() + 1).is_some_and(|at| {
                name.as_bytes()[at] == b'.' && name[at + 1..].eq_ignore_ascii_case(suffix)
            }),
            None => name.eq_ignore_ascii_case(rule),
        }
    }

    /// Whether this entry allows address `ip`.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        matches!(self, Allowed::Block(b) if b.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_contain_their_addresses() {
        let b = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(b.contains(ip("10.200.3.4")));
        assert!(b.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        assert!(!b.contains(ip("11.0.0.1")));
        let one = Cidr::parse("192.168.1.5").unwrap();
        assert!(one.contains(ip("192.168.1.5")) && !one.contains(ip("192.168.1.6")));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let odd = Cidr::parse("172.16.0.0/12").unwrap();
        assert!(odd.contains(ip("172.31.255.255")) && !odd.contains(ip("172.32.0.0")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        let mapped = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert!(mapped.contains(ip("10.9.9.9")) && mapped.contains(ip("::ffff:10.1.1.1")));
        assert!(!mapped.contains(ip("11.0.0.1")));
        assert!(
            Cidr::parse("::ffff:127.0.0.1")
                .unwrap()
                .contains(ip("127.0.0.1"))
        );
        for bad in [
            "10.0.0.0/33",
            "nope",
            "10.0.0.0/x",
            "::/129",
            "::ffff:0.0.0.0/95",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_rules_match_names() {
        let exact = Allowed::parse("Images.Internal").unwrap();
        assert!(exact.allows_name("images.internal") && !exact.allows_name("x.images.internal"));
        let under = Allowed::parse("*.corp.example").unwrap();
        assert!(under.allows_name("a.corp.example") && under.allows_name("b.a.corp.example"));
        assert!(!under.allows_name("corp.example") && !under.allows_name("evilcorp.example"));
        assert!(Allowed::parse("a b").is_err());
        assert!(
            Allowed::parse("10.0.0.0/8")
                .unwrap()
                .allows_ip(ip("10.1.1.1"))
        );
    }
}

/// How an upstream proxy is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyScheme {
    /// `http://`: `CONNECT host:port`.
    Http,
    /// `socks5://`: the upstream's address is resolved here. `socks5h://`: by the proxy.
    Socks5 { remote_dns: bool },
}

/// One `PROXIES` entry, parsed: `http://[user:pass@]host:port`, `socks5://…`, `socks5h://…`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub scheme: ProxyScheme,
    pub host: String,
    pub port: u16,
    /// User name and password (percent-decoded), when the URL has them.
    pub auth: Option<(String, String)>,
    /// The URL without its password, for logs, errors and pages.
    pub display: String,
    /// The URL as configured, for side calls that go through the same proxy.
    pub url: String,
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

impl ProxyUrl {
    /// Parses a proxy URL. Errors never quote the URL: it may hold a password.
    pub fn parse(url: &str) -> Result<ProxyUrl, String> {
        let parsed = url::Url::parse(url).map_err(|e| {
            format!(
                "a proxy is not a valid URL ({e}); the form is scheme://[user:password@]host:port"
            )
        })?;
        let scheme = match parsed.scheme() {
            "http" => ProxyScheme::Http,
            "socks5" => ProxyScheme::Socks5 { remote_dns: false },
            "socks5h" => ProxyScheme::Socks5 { remote_dns: true },
            other => {
                return Err(format!(
                    "{other}:// proxies are not supported: use http://, socks5:// or socks5h:// \
                     (the tunnel to Google is TLS either way)"
                ));
            }
        };
        let host = parsed
            .host_str()
            .ok_or("a proxy URL names no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = parsed.port().unwrap_or(match scheme {
            ProxyScheme::Http => 80,
            ProxyScheme::Socks5 { .. } => 1080,
        });
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let user = decode(parsed.username());
        let auth =
            (!user.is_empty()).then(|| (user, decode(parsed.password().unwrap_or_default())));
        if let Some((user, pass)) = &auth
            && matches!(scheme, ProxyScheme::Socks5 { .. })
            && (user.len() > 255 || pass.len() > 255)
        {
            return Err("a SOCKS5 user name or password is at most 255 bytes".into());
        }
        Ok(ProxyUrl {
            scheme,
            host,
            port,
            auth,
            display: shown_url(&parsed),
            url: url.to_owned(),
        })
    }
}

/// A proxy URL as logs, errors and pages show it: without its password (or a user name
/// alone, which is often a token).
pub fn shown_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    if url.password().is_some() {
        let _ = shown.set_password(Some("***"));
    } else if !url.username().is_empty() {
        let _ = shown.set_username("***");
    }
    shown.as_str().trim_end_matches('/').to_owned()
}

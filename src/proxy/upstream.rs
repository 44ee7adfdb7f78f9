//! The upstream side: where `BASE_URL` points, resolved without blocking, and the shape of one
//! request to it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;

use crate::config::{BaseUrl, Config};

/// How long a DNS answer is used before it is looked up again (in the background).
const DNS_TTL: Duration = Duration::from_secs(60);
/// How long an idle pooled upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

struct Resolved {
    peer: Arc<HttpPeer>,
    at: Instant,
}

/// The upstream endpoint of one configuration: its URL and a cached, ready-to-use peer.
pub struct Target {
    pub base: BaseUrl,
    connect_timeout: Duration,
    resolved: ArcSwapOption<Resolved>,
}

impl Target {
    pub fn new(config: &Config) -> Target {
        let target = Target {
            base: config.base_url.clone(),
            connect_timeout: config.connect_timeout,
            resolved: ArcSwapOption::empty(),
        };
        if let Ok(ip) = target.base.host.parse::<IpAddr>() {
            target.store(SocketAddr::new(ip, target.base.port));
        }
        target
    }

    fn store(&self, addr: SocketAddr) -> Arc<HttpPeer> {
        let mut peer = HttpPeer::new(addr, self.base.tls, self.base.host.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.connect_timeout);
        o.total_connection_timeout = Some(self.connect_timeout * 2);
        o.idle_timeout = Some(IDLE_TIMEOUT);
        o.alpn = ALPN::H1;
        o.tcp_keepalive = Some(pingora::protocols::TcpKeepalive {
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            count: 3,
            #[cfg(target_os = "linux")]
            user_timeout: Duration::ZERO,
        });
        let peer = Arc::new(peer);
        self.resolved.store(Some(Arc::new(Resolved {
            peer: peer.clone(),
            at: Instant::now(),
        })));
        peer
    }

    /// The peer to connect to. A host name is looked up asynchronously and cached; a stale
    /// answer is used while a fresh one is fetched in the background.
    pub async fn peer(self: &Arc<Self>) -> Result<Arc<HttpPeer>, String> {
        let literal = self.base.host.parse::<IpAddr>().is_ok();
        if let Some(r) = self.resolved.load().as_ref() {
            if literal || r.at.elapsed() < DNS_TTL {
                return Ok(r.peer.clone());
            }
            // Stale: refresh in the background, use what we have now.
            self.resolved.store(Some(Arc::new(Resolved {
                peer: r.peer.clone(),
                at: Instant::now(),
            })));
            let this = self.clone();
            tokio::spawn(async move {
                let _ = this.lookup().await;
            });
            return Ok(r.peer.clone());
        }
        self.lookup().await
    }

    async fn lookup(&self) -> Result<Arc<HttpPeer>, String> {
        let host = (self.base.host.as_str(), self.base.port);
        let addr = tokio::net::lookup_host(host)
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.base.host))?
            .next()
            .ok_or_else(|| format!("{} has no address", self.base.host))?;
        Ok(self.store(addr))
    }
}

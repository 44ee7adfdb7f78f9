//! The upstream side: where `BASE_URL` points, resolved without blocking, and the shape of one
//! request to it.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1::client::HttpSession as Http1Session;
use pingora::protocols::{Stream, ALPN};
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

/// The upstream endpoint of one configuration: its URL, a cached, ready-to-use peer, and its
/// idle keep-alive connections.
pub struct Target {
    pub base: BaseUrl,
    connect_timeout: Duration,
    resolved: ArcSwapOption<Resolved>,
    /// Idle connections, most recently used last.
    ///
    /// NOTE: pingora's connector pool spawns a watcher task and a timer for every connection
    /// it takes back, and wakes it again on reuse: that cost more CPU per request than all of
    /// gemgate's own work. A plain stack is enough here: there is one upstream per generation,
    /// a connection found closed on reuse is retried on a fresh one (see `Gateway::attempt`),
    /// and connections idle past `IDLE_TIMEOUT` are dropped.
    idle: Mutex<Vec<(Stream, Instant)>>,
    pool_size: usize,
}

impl Target {
    pub fn new(config: &Config) -> Target {
        let target = Target {
            base: config.base_url.clone(),
            connect_timeout: config.connect_timeout,
            resolved: ArcSwapOption::empty(),
            idle: Mutex::new(Vec::new()),
            pool_size: config.pool_size.max(1),
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

impl Target {
    /// An upstream session: an idle connection if there is one and `reuse_idle` allows it
    /// (then `true`), else a new one.
    pub async fn session(
        &self,
        connector: &Connector,
        peer: &HttpPeer,
        reuse_idle: bool,
    ) -> pingora::Result<(HttpSession, bool)> {
        if reuse_idle {
            while let Some((stream, since)) =
                self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
            {
                // One idle past IDLE_TIMEOUT is dropped (closed) and the next one tried.
                if since.elapsed() < IDLE_TIMEOUT {
                    let session = Http1Session::new_with_options(stream, peer);
                    return Ok((HttpSession::H1(session), true));
                }
            }
        }
        connector.get_http_session(peer).await
    }

    /// Closes every idle connection.
    pub fn drop_idle(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Takes a session back once its answer was read to the end; anything else is closed.
    pub async fn release(&self, session: HttpSession) {
        let HttpSession::H1(mut h1) = session else {
            return;
        };
        h1.respect_keepalive();
        let Some(stream) = h1.reuse().await else {
            return;
        };
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle
            .first()
            .is_some_and(|(_, since)| since.elapsed() >= IDLE_TIMEOUT)
        {
            idle.remove(0);
        }
        if idle.len() < self.pool_size {
            idle.push((stream, Instant::now()));
        }
    }
}

/// Largest batch of already-received body chunks sent to the client in one write.
const BATCH_LIMIT: usize = 64 * 1024;

/// Reads an upstream body in batches: the next chunk (waiting for it), together with every
/// chunk that has already arrived. Relaying a batch takes one write where relaying its chunks
/// one by one would take several; nothing waits that could have been sent.
#[derive(Default)]
pub struct BodyBatches {
    ended: bool,
    error: Option<Box<pingora::Error>>,
}

impl BodyBatches {
    pub async fn next(&mut self, up: &mut HttpSession) -> pingora::Result<Option<Bytes>> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.ended {
            return Ok(None);
        }
        let Some(first) = up.read_response_body().await? else {
            return Ok(None);
        };
        let mut batch: Option<BytesMut> = None;
        while batch.as_ref().map_or(first.len(), BytesMut::len) < BATCH_LIMIT {
            // NOTE: reading is cancel-safe (pingora's own proxy selects over it), so a read
            // that is not ready yet is simply dropped.
            match poll_once(up.read_response_body()) {
                None => break,
                Some(Ok(Some(more))) => batch
                    .get_or_insert_with(|| BytesMut::from(&first[..]))
                    .extend_from_slice(&more),
                Some(Ok(None)) => {
                    self.ended = true;
                    break;
                }
                Some(Err(e)) => {
                    self.error = Some(e);
                    break;
                }
            }
        }
        Ok(Some(batch.map_or(first, BytesMut::freeze)))
    }
}

/// Polls a future once: its output if it is ready now.
fn poll_once<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let fut = std::pin::pin!(fut);
    match fut.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

//! The upstream side: where `BASE_URL` points, resolved without blocking, the routes to it
//! (direct, or one per `PROXIES` entry), and the shape of one request to it.

pub mod egress;
pub mod fetch;
pub mod head;
pub mod headers;
pub mod http2;
pub mod response;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use pingora::connectors::TransportConnector;
use pingora::protocols::{ALPN, Stream};
use pingora::upstreams::peer::HttpPeer;

use crate::config::{BaseUrl, Config};
use crate::shard::Sharded;
use egress::Tunnel;
use response::Response;

/// How long a DNS answer is used before it is looked up again (in the background).
const DNS_TTL: Duration = Duration::from_secs(60);
/// How long an idle pooled upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a side call (an image host, an image URL, a key check) may take.
const SIDE_CALL_TIMEOUT: Duration = Duration::from_secs(30);

struct Resolved {
    /// One peer per route.
    peers: Vec<Arc<HttpPeer>>,
    at: Instant,
}

/// One way to the upstream: straight, or through one proxy. Each keeps its own idle
/// connections, since a connection through one proxy cannot serve a call meant for another.
struct Route {
    tunnel: Option<Arc<Tunnel>>,
    /// Idle connections, most recently used last.
    ///
    /// NOTE: pingora's connector pool spawns a watcher task and a timer for every connection
    /// it takes back, and wakes it again on reuse: that cost more CPU per request than all of
    /// gemgate's own work. A plain stack is enough here: a connection found closed on reuse is
    /// retried on a fresh one (see `Gateway::attempt`), and connections idle past
    /// `IDLE_TIMEOUT` are dropped.
    ///
    /// One stack per worker thread ([`shard`]): each worker thread runs its own runtime, and a
    /// connection stays registered with the runtime that opened it; taken up by another
    /// thread, every read and write of it would cost a cross-thread wake-up.
    idle: Sharded<Mutex<Vec<(Stream, Instant)>>>,
    /// Its HTTP/2 connections, when calls go over HTTP/2 (`upstream.http2`; never through a
    /// proxy that forwards plain HTTP).
    http2: Option<http2::Pool>,
    /// For side calls (key checks) over the same route.
    client: reqwest::Client,
}

/// The upstream endpoint of one configuration: its URL, its routes, and a cached,
/// ready-to-use peer per route.
pub struct Target {
    pub base: BaseUrl,
    /// The `Host` value of every upstream request (`base.authority`).
    pub host: Option<http::HeaderValue>,
    connect_timeout: Duration,
    resolved: ArcSwapOption<Resolved>,
    routes: Vec<Route>,
    /// `PROXIES_USE_CONSISTENCY_HASH_BY_API_KEY`.
    by_key: bool,
    turn: AtomicUsize,
    pool_size: usize,
    /// `upstream.http2`.
    http2: bool,
}

impl Target {
    /// The target of `config`. Its proxies were checked by the config's validation.
    pub fn new(config: &Config) -> Target {
        Target::of(config, &config.base_url)
    }

    /// The target at `base` (the base URL, or the Vertex AI one) with `config`'s proxies and
    /// timeouts.
    pub fn of(config: &Config, base: &crate::config::BaseUrl) -> Target {
        let up = &config.file.upstream;
        let routes: Vec<Route> = if up.proxies.is_empty() {
            vec![Route::new(None, up.http2)]
        } else {
            up.proxies
                .iter()
                .filter_map(|url| {
                    let tunnel = Tunnel::new(url, &base.host, base.port, config.connect_timeout);
                    match tunnel {
                        Ok(t) => Some(Route::new(
                            Some(Arc::new(t.with_plain_upstream(!base.tls))),
                            up.http2,
                        )),
                        Err(e) => {
                            tracing::error!("PROXIES entry left out: {e}");
                            None
                        }
                    }
                })
                .collect()
        };
        let target = Target {
            base: base.clone(),
            host: http::HeaderValue::from_str(&base.authority).ok(),
            connect_timeout: config.connect_timeout,
            resolved: ArcSwapOption::empty(),
            routes,
            by_key: up.proxies_use_consistency_hash_by_api_key,
            turn: AtomicUsize::new(0),
            pool_size: config.pool_size.max(1),
            http2: up.http2,
        };
        if let Ok(ip) = target.base.host.parse::<IpAddr>() {
            target.store(SocketAddr::new(ip, target.base.port));
        }
        target
    }

    /// Whether `config` would make the same target (so its connections can be kept).
    pub fn serves(&self, config: &Config, base: &crate::config::BaseUrl) -> bool {
        let up = &config.file.upstream;
        self.base == *base
            && self.connect_timeout == config.connect_timeout
            && self.pool_size == config.pool_size.max(1)
            && self.http2 == up.http2
            && self.by_key == up.proxies_use_consistency_hash_by_api_key
            && self.routes.len() == up.proxies.len().max(1)
            && self
                .routes
                .iter()
                .map(|r| r.tunnel.as_ref().map(|t| t.url.as_str()))
                .eq(up
                    .proxies
                    .iter()
                    .map(|p| Some(p.as_str()))
                    .chain(up.proxies.is_empty().then_some(None)))
    }

    /// The route a call with the key of stable id `key_id` takes.
    pub fn route(&self, key_id: &str) -> usize {
        egress::pick(self.routes.len(), self.by_key, key_id, &self.turn)
    }

    /// The proxy of `route` when it forwards requests as they are (see `Tunnel::forwards`):
    /// their targets must then be absolute.
    pub fn forwarding(&self, route: usize) -> Option<&Tunnel> {
        self.routes[route]
            .tunnel
            .as_deref()
            .filter(|t| t.forwards())
    }

    /// The HTTP/2 connections of `route`, when its calls go over HTTP/2.
    pub fn http2(&self, route: usize) -> Option<&http2::Pool> {
        self.routes[route].http2.as_ref().filter(|p| p.speaks())
    }

    /// An HTTP client for side calls (key checks) that go the way `route` goes.
    pub fn side_client(&self, route: usize) -> &reqwest::Client {
        &self.routes[route].client
    }

    fn store(&self, addr: SocketAddr) -> Vec<Arc<HttpPeer>> {
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
        let peers: Vec<Arc<HttpPeer>> = self
            .routes
            .iter()
            .map(|route| {
                let mut peer = peer.clone();
                if let Some(tunnel) = &route.tunnel {
                    peer.options.custom_l4 = Some(
                        tunnel.clone() as Arc<dyn pingora::connectors::L4Connect + Send + Sync>
                    );
                }
                Arc::new(peer)
            })
            .collect();
        self.resolved.store(Some(Arc::new(Resolved {
            peers: peers.clone(),
            at: Instant::now(),
        })));
        peers
    }

    /// The peer to connect to over `route`. A host name is looked up asynchronously and
    /// cached; a stale answer is used while a fresh one is fetched in the background.
    pub async fn peer(self: &Arc<Self>, route: usize) -> Result<Arc<HttpPeer>, String> {
        let literal = self.base.host.parse::<IpAddr>().is_ok();
        if let Some(r) = self.resolved.load().as_ref() {
            if literal || r.at.elapsed() < DNS_TTL {
                return Ok(r.peers[route].clone());
            }
            // Stale: refresh in the background, use what we have now.
            self.resolved.store(Some(Arc::new(Resolved {
                peers: r.peers.clone(),
                at: Instant::now(),
            })));
            let this = self.clone();
            tokio::spawn(async move {
                let _ = this.lookup().await;
            });
            return Ok(r.peers[route].clone());
        }
        Ok(self.lookup().await?[route].clone())
    }

    async fn lookup(&self) -> Result<Vec<Arc<HttpPeer>>, String> {
        let host = (self.base.host.as_str(), self.base.port);
        let found = tokio::net::lookup_host(host)
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.base.host))
            .and_then(|mut addrs| {
                addrs
                    .next()
                    .ok_or_else(|| format!("{} has no address", self.base.host))
            });
        match found {
            Ok(addr) => Ok(self.store(addr)),
            // Proxies that look the name up themselves need no answer here (only the
            // machines behind them may be able to resolve it): the address is never used.
            Err(_)
                if self
                    .routes
                    .iter()
                    .all(|r| r.tunnel.as_ref().is_some_and(|t| t.resolves_remotely())) =>
            {
                Ok(self.store(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), self.base.port)))
            }
            Err(e) => Err(e),
        }
    }
}

impl Route {
    fn new(tunnel: Option<Arc<Tunnel>>, http2: bool) -> Route {
        let mut client = side_client_builder();
        if let Some(t) = &tunnel {
            match reqwest::Proxy::all(&t.url) {
                Ok(proxy) => client = client.proxy(proxy),
                Err(e) => {
                    tracing::error!(proxy = %t.display, "key checks cannot use this proxy: {e}")
                }
            }
        }
        let forwards = tunnel.as_ref().is_some_and(|t| t.forwards());
        Route {
            tunnel,
            idle: Sharded::default(),
            http2: (http2 && !forwards).then(http2::Pool::default),
            client: client.build().expect("an HTTP client with these settings"),
        }
    }
}

impl Target {
    /// A connection over `route`: an idle one if there is one and `reuse_idle` allows it (then
    /// `true`), else a new one.
    pub async fn connection(
        &self,
        connector: &TransportConnector,
        peer: &HttpPeer,
        route: usize,
        reuse_idle: bool,
    ) -> pingora::Result<(Stream, bool)> {
        if reuse_idle {
            let idle = self.routes[route].idle.mine();
            while let Some((stream, since)) = idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                // One idle past IDLE_TIMEOUT is dropped (closed) and the next one tried.
                if since.elapsed() < IDLE_TIMEOUT {
                    return Ok((stream, true));
                }
            }
        }
        // Boxed: connecting (TCP, TLS) is an 8 KB future, and every future that awaits this
        // one would hold that much for as long as its request lasts, connecting or not — each
        // open stream's task with it. Reusing an idle connection allocates nothing.
        let stream = Box::pin(connector.new_stream(peer)).await?;
        Ok((for_http1(stream), false))
    }

    /// Closes every idle connection of `route`.
    pub fn drop_idle(&self, route: usize) {
        for idle in self.routes[route].idle.iter() {
            idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Takes the connection of an answer from `route` back once the answer was read to its
    /// end and the connection may carry another request; anything else is closed.
    pub fn release(&self, response: Response, route: usize) {
        let Some(stream) = response.reuse() else {
            return;
        };
        let mut idle = self.routes[route]
            .idle
            .mine()
            .lock()
            .unwrap_or_else(|e| e.into_inner());
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

/// A new upstream connection made ready to carry HTTP/1.1 calls: a request's head and body
/// leave in one send (see [`crate::http::wire::Gathered`]).
fn for_http1(stream: Stream) -> Stream {
    Box::new(crate::http::wire::Gathered::new(stream))
}

/// The HTTP client for side calls (image hosts, image URLs, key checks): bounded in time, few
/// redirects.
pub fn side_client() -> reqwest::Client {
    side_client_builder()
        .build()
        .expect("an HTTP client with these settings")
}

/// The settings every side-call client shares.
fn side_client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(SIDE_CALL_TIMEOUT)
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::limited(3))
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
    /// Whether the upstream's body has ended with the batch last returned.
    pub fn ended(&self) -> bool {
        self.ended && self.error.is_none()
    }

    pub async fn next(&mut self, up: &mut Response) -> pingora::Result<Option<Bytes>> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.ended {
            return Ok(None);
        }
        let Some(first) = up.body().await? else {
            return Ok(None);
        };
        let mut batch: Option<BytesMut> = None;
        while batch.as_ref().map_or(first.len(), BytesMut::len) < BATCH_LIMIT {
            // NOTE: reading is cancel-safe, so a read that is not ready yet is simply dropped.
            match poll_once(up.body()) {
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

//! The listening side: one accept loop per worker thread.
//!
//! NOTE: pingora's listening service accepts on one thread and hands each connection to a worker
//! thread chosen at random, while the socket stays registered with the accepting thread's
//! reactor. Every readiness of such a connection then wakes two threads (an `eventfd` write and
//! a context switch per request). Here each worker thread has its own listening socket on the
//! address (`SO_REUSEPORT`: the kernel spreads new connections over them, as nginx's
//! `reuseport` does) and serves the connections it accepts itself, from start to end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::listener::Listener;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service;
use tokio::net::TcpSocket;

use pingora::listeners::tls::Acceptor;

use crate::http::wire::Gathered;
use crate::proxy::Gateway;

/// Pending connections a worker's socket queues before the kernel refuses more.
const BACKLOG: u32 = 65535;

/// One worker thread: its own listening socket, its own connections.
pub struct Worker {
    name: String,
    listen: SocketAddr,
    /// Bound by [`bind_all`]; listening from the worker's start.
    socket: Option<TcpSocket>,
    app: Arc<Gateway>,
    /// Its connections speak TLS (`server.tls_cert_file`).
    tls: Option<Arc<Acceptor>>,
}

impl Worker {
    /// Worker `index` of the gateway `app`, to listen with `socket`, one of those [`bind_all`]
    /// bound on `listen`.
    pub fn new(index: usize, listen: SocketAddr, socket: TcpSocket, app: Arc<Gateway>) -> Worker {
        Worker {
            name: format!("gemgate-{index}"),
            listen,
            socket: Some(socket),
            app,
            tls: None,
        }
    }

    /// The worker's connections speak TLS with `acceptor`.
    pub fn with_tls(mut self, acceptor: Option<Arc<Acceptor>>) -> Worker {
        self.tls = acceptor;
        self
    }
}

/// A socket bound to `addr`, not listening. `shared`: other sockets with the flag may bind
/// the same address (`SO_REUSEPORT`); without it, any socket already there is an error.
fn bound(addr: SocketAddr, shared: bool) -> std::io::Result<TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(shared)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Binds the sockets of `workers` workers on `addr`, before anything starts: an operator hears
/// at once that the address is taken. Returns the address (port 0 resolved to the one port
/// every worker shares) and the sockets.
///
/// A first, unshared socket checks that nothing is on the address, another gemgate among
/// them, which the shared ones would otherwise split the traffic with. No socket listens
/// until its worker starts accepting: a connection the kernel took on a socket that then
/// closed would be reset.
pub fn bind_all(addr: SocketAddr, workers: usize) -> std::io::Result<(SocketAddr, Vec<TcpSocket>)> {
    let addr = bound(addr, false)?.local_addr()?;
    let sockets = (0..workers.max(1))
        .map(|_| bound(addr, true))
        .collect::<std::io::Result<_>>()?;
    Ok((addr, sockets))
}

/// How long a kept-alive connection may wait for its next request.
pub(super) const KEEPALIVE: Duration = Duration::from_secs(75);

/// Serves one connection, request after request, until it closes.
///
/// Each request has `server.header_timeout_s` from its first byte to the end of its head (a
/// client sending a head byte by byte holds a connection no longer than that); the wait for
/// that first byte is the keep-alive's (the head timeout's for a new connection).
pub(super) async fn serve(
    app: Arc<Gateway>,
    mut stream: Box<L4Stream>,
    tls: Option<Arc<Acceptor>>,
    shutdown: ShutdownWatch,
) {
    if let Err(e) = stream.set_nodelay() {
        tracing::debug!("TCP_NODELAY: {e}");
    }
    let accepted = crate::config::tls::accept(tls.as_deref(), stream, app.header_timeout()).await;
    let stream = match accepted {
        Ok(stream) => stream,
        Err(why) => {
            // Counted as a refused connection: a broken client, a scanner, or a slowloris.
            let refused = &app.state.refused;
            let counter = match why {
                crate::config::tls::Refused::Handshake => &refused.malformed,
                crate::config::tls::Refused::Slow => &refused.slow,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let mut conn = Box::new(Gathered::new(stream));
    // One timer and one wait for the shutdown for the connection's life, the timer reset for
    // each request: made anew for every request, they took locks in tokio's timer wheel and in
    // the shutdown's list of waiters, twice a request. (A later deadline moves without a lock.)
    let idle = tokio::time::sleep(app.header_timeout());
    let mut stop = shutdown.clone();
    let stopped = stop.changed();
    tokio::pin!(idle, stopped);
    loop {
        let first = tokio::select! {
            biased;
            arrived = conn.arrival() => match arrived {
                Ok(first) if !first.is_empty() => first,
                _ => return,
            },
            () = &mut idle => return,
            // An idle connection ends with the shutdown; one mid-request finishes first.
            _ = &mut stopped => return,
        };
        // NOTE: made in a block of its own: a local that was ever borrowed keeps its room in
        // the future until its scope ends, and the session (680 bytes) moves on at once.
        let session = {
            let mut session = ServerSession::new_http1(conn);
            session.set_pipelined_prefix(first);
            session
        };
        let Some(stream) = app.serve_request(session, &shutdown).await else {
            return;
        };
        // The connection is the `Gathered` made above, handed back by pingora's session.
        match stream.into_any().downcast::<Gathered>() {
            Ok(gathered) => conn = gathered,
            Err(_) => return,
        }
        idle.as_mut().reset(tokio::time::Instant::now() + KEEPALIVE);
    }
}

/// Counts an open client connection until dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gateway {
    /// Counts a new client connection, or `None` when `server.max_connections` are open (the
    /// refusal is counted).
    fn open_connection(&self) -> Option<Open> {
        let max = self.state.current.load().config.max_connections;
        let open = &self.state.open_connections;
        let counted = open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !counted {
            self.state
                .refused
                .connections
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Open(open.clone()))
    }
}

#[async_trait]
impl Service for Worker {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        mut shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let listening = match self.socket.take() {
            Some(socket) => socket.listen(BACKLOG),
            None => Err(std::io::Error::other("the worker was started twice")),
        };
        let listener = match listening {
            Ok(l) => Listener::from(l),
            Err(e) => {
                // The address was bound at start (`bind_all`), so this is rare; the other
                // workers' sockets take the connections this one would have had.
                tracing::error!("{}: cannot listen on {}: {e}", self.name, self.listen);
                return;
            }
        };
        let mut tidy = tokio::time::interval(crate::alloc::TIDY_EVERY);
        loop {
            tokio::select! {
                _ = tidy.tick() => crate::alloc::tidy(),
                accepted = listener.accept() => match accepted {
                    Ok(stream) => {
                        // Past the cap, a new connection is closed at once: the ones open are
                        // served, and memory and descriptors stay bounded.
                        let Some(open) = self.app.open_connection() else {
                            drop(stream);
                            continue;
                        };
                        let app = self.app.clone();
                        let shutdown = shutdown.clone();
                        let tls = self.tls.clone();
                        // Boxed at once: the connection's task would otherwise hold the
                        // socket's state (376 bytes) in each future that takes it along, for
                        // the connection's life, long after the TLS layer or the gathering
                        // writer took it over.
                        let stream = Box::new(stream);
                        tokio::spawn(async move {
                            let _open = open;
                            serve(app, stream, tls, shutdown).await;
                        });
                    }
                    Err(e) => {
                        tracing::error!("accept on {}: {e}", self.listen);
                        // Out of file descriptors: accept would fail again at once.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }
}

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
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::listener::Listener;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service;

use super::wire::Gathered;
use super::Gateway;

/// Pending connections a worker's socket queues before the kernel refuses more.
const BACKLOG: u32 = 65535;

/// One worker thread: its own listening socket, its own connections.
pub struct Worker {
    name: String,
    listen: SocketAddr,
    app: Arc<Gateway>,
}

impl Worker {
    /// Worker `index` of the gateway `app`, listening on `listen`.
    pub fn new(index: usize, listen: SocketAddr, app: Arc<Gateway>) -> Worker {
        Worker {
            name: format!("gemgate-{index}"),
            listen,
            app,
        }
    }
}

/// A socket bound to `addr`, not yet listening.
fn bound(addr: SocketAddr, shared: bool) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(shared)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// A listening socket on `addr` that other workers' sockets share.
fn bind(addr: SocketAddr) -> std::io::Result<Listener> {
    Ok(Listener::from(bound(addr, true)?.listen(BACKLOG)?))
}

/// Checks that `addr` is free before any worker starts, and resolves port 0 to the one port
/// every worker then shares.
///
/// The socket is bound, never listening: a connection that reached a listening probe would be
/// reset when the probe closes. It does not share the port either, so another process already
/// listening there (another gemgate among them) is an error here rather than a silent split of
/// the traffic.
pub fn probe(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    bound(addr, false)?.local_addr()
}

/// Serves one connection, request after request, until it closes.
async fn serve(app: Arc<Gateway>, mut stream: L4Stream, shutdown: ShutdownWatch) {
    if let Err(e) = stream.set_nodelay() {
        tracing::debug!("TCP_NODELAY: {e}");
    }
    let mut next: Option<Stream> = Some(Box::new(Gathered::new(Box::new(stream))));
    while let Some(stream) = next {
        next = app
            .serve_request(ServerSession::new_http1(stream), &shutdown)
            .await;
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
        let listener = match bind(self.listen) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot listen on {}: {e}", self.listen);
                crate::telemetry::flush();
                std::process::exit(1);
            }
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(stream) => {
                        tokio::spawn(serve(self.app.clone(), stream, shutdown.clone()));
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

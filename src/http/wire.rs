//! A connection's outgoing bytes, gathered so that one message leaves in one send: client
//! connections and upstream connections alike.
//!
//! NOTE: pingora writes an HTTP header, then the body, and flushes after each; on an accepted
//! connection made outside its listener it has no write buffer at all. Left alone, every answer
//! to a client would be two sends (two segments, two wake-ups of the reader), or need
//! `TCP_CORK` around them (two more system calls). [`Gathered`] keeps small writes until a
//! flush, and can be told to let one flush pass ([`Gathered::hold_next_flush`]), so header and
//! body go out in one `writev`.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes are gathered up to this many bytes; a larger one is sent at once, together with
/// what was gathered before it.
const GATHER_LIMIT: usize = 16 * 1024;
/// The room gathering starts with.
const FIRST_GATHER: usize = 2 * 1024;

/// A stream whose writes are kept until a flush (or until [`GATHER_LIMIT`] bytes).
#[derive(Debug)]
pub struct Gathered {
    inner: Stream,
    pending: Vec<u8>,
    /// How many of the next flushes send nothing: more of the same message follows at once.
    hold: AtomicU32,
}

impl Gathered {
    pub fn new(inner: Stream) -> Gathered {
        Gathered {
            inner,
            pending: Vec::new(),
            hold: AtomicU32::new(0),
        }
    }

    /// Waits for the client's next bytes (the start of its next request) and returns them, in
    /// a buffer of their size: none when the connection closed first. The wait for a request
    /// to begin (keep-alive idleness) is then timed apart from the wait for its head to end.
    ///
    /// The bytes go to the request's session as the start of its parse buffer
    /// (`set_pipelined_prefix`), which then grows only as the head needs: pingora's own
    /// starts at 4 KiB and is kept for as long as the request lasts (a stream held open).
    pub async fn arrival(&mut self) -> io::Result<BytesMut> {
        use tokio::io::AsyncReadExt;
        std::future::poll_fn(|cx| self.poll_send_pending(cx)).await?;
        // Read into the waiting task's own memory (its future is larger for other reasons):
        // a connection waiting for its next request keeps no buffer on the heap.
        let mut first = [0u8; 1024];
        let n = self.inner.read(&mut first).await?;
        Ok(BytesMut::from(&first[..n]))
    }

    /// Lets the next flush pass without sending (one more each call), for a writer (pingora's
    /// HTTP sessions) that flushes a header before the body it writes at once. The flush after
    /// the body sends both.
    pub fn hold_next_flush(&self) {
        self.hold.fetch_add(1, Ordering::Relaxed);
    }

    /// [`Gathered::hold_next_flush`] on `stream`, if it is a [`Gathered`].
    pub fn hold_flush_of(stream: Option<&Stream>) {
        if let Some(g) = stream.and_then(Gathered::of) {
            g.hold_next_flush();
        }
    }

    /// `stream`'s [`Gathered`] layer, if it has one.
    pub fn of(stream: &Stream) -> Option<&Gathered> {
        stream.as_any().downcast_ref::<Gathered>()
    }

    /// Sends everything gathered so far.
    fn poll_send_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        // Sent: the buffer goes too. A connection that waits (a stream held open, a client
        // between requests, an upstream connection idle in its pool) keeps none.
        self.pending = Vec::new();
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Gathered {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Whoever reads next waits for an answer to what was written: nothing may stay
        // gathered (or held) then, whatever the writer's flushes did.
        this.hold.store(0, Ordering::Relaxed);
        ready!(this.poll_send_pending(cx))?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gathered {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.len() + buf.len() <= GATHER_LIMIT {
            if this.pending.capacity() == 0 {
                // Room for a typical message's head and body at once.
                this.pending.reserve(FIRST_GATHER.max(buf.len()));
            }
            this.pending.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        // Too big to gather: send what is pending and `buf` together.
        while !this.pending.is_empty() {
            let parts = [IoSlice::new(&this.pending), IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &parts))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n <= this.pending.len() {
                this.pending.drain(..n);
            } else {
                let of_buf = n - this.pending.len();
                this.pending.clear();
                return Poll::Ready(Ok(of_buf));
            }
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let held = this.hold.load(Ordering::Relaxed);
        if held > 0 {
            this.hold.store(held - 1, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_send_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Gathered {
    async fn shutdown(&mut self) {
        let _ = std::future::poll_fn(|cx| self.poll_send_pending(cx)).await;
        self.inner.shutdown().await
    }
}

impl UniqueID for Gathered {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Gathered {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Gathered {
    /// None: gemgate reads no connection timings, and pingora asks for them (a list made on the
    /// heap) with every request's session on a client connection.
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Gathered {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Gathered {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Gathered {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A [`Gathered`] writer and the raw socket at the other end.
    async fn pair() -> (Gathered, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (near, far) = tokio::join!(near, listener.accept());
        let near = pingora::protocols::l4::stream::Stream::from(near.unwrap());
        (Gathered::new(Box::new(near)), far.unwrap().0)
    }

    /// What arrives at `far` within 50 ms.
    async fn arrived(far: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = vec![0; 64 * 1024];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(50), far.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn writes_wait_for_a_flush_and_a_held_flush_waits_for_the_next() {
        let (mut near, mut far) = pair().await;
        near.write_all(b"header\r\n\r\n").await.unwrap();
        assert!(arrived(&mut far).await.is_empty(), "gathered until a flush");
        near.hold_next_flush();
        near.flush().await.unwrap();
        assert!(
            arrived(&mut far).await.is_empty(),
            "the held flush sent nothing"
        );
        near.write_all(b"body").await.unwrap();
        near.flush().await.unwrap();
        assert_eq!(arrived(&mut far).await, b"header\r\n\r\nbody");
    }

    #[tokio::test]
    async fn a_connection_keeps_no_buffer_once_its_writes_are_sent() {
        let (mut near, mut far) = pair().await;
        near.write_all(&[b'x'; 3000]).await.unwrap();
        assert!(near.pending.capacity() >= 3000);
        near.flush().await.unwrap();
        assert_eq!(arrived(&mut far).await.len(), 3000);
        // A stream held open, or a connection waiting for its next request, holds nothing.
        assert_eq!(near.pending.capacity(), 0);
    }

    #[tokio::test]
    async fn arrival_returns_the_first_bytes_in_a_buffer_of_their_size() {
        let (mut near, mut far) = pair().await;
        far.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let first = near.arrival().await.unwrap();
        assert_eq!(&first[..], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(first.capacity(), first.len());
        // More than one read's worth: the rest stays on the connection for the next read.
        far.write_all(&[b'x'; 3000]).await.unwrap();
        assert_eq!(near.arrival().await.unwrap().len(), 1024);
        let mut rest = [0u8; 3000 - 1024];
        near.read_exact(&mut rest).await.unwrap();
        drop(far);
        assert!(
            near.arrival().await.unwrap().is_empty(),
            "closed before a request"
        );
    }

    #[tokio::test]
    async fn reading_sends_what_was_gathered_or_held_first() {
        let (mut near, mut far) = pair().await;
        near.hold_next_flush();
        near.hold_next_flush();
        near.write_all(b"question").await.unwrap();
        near.flush().await.unwrap();
        assert!(arrived(&mut far).await.is_empty());
        let answer = tokio::spawn(async move {
            let mut buf = [0u8; 6];
            near.read_exact(&mut buf).await.unwrap();
            (near, buf)
        });
        assert_eq!(arrived(&mut far).await, b"question");
        far.write_all(b"answer").await.unwrap();
        let (mut near, buf) = answer.await.unwrap();
        assert_eq!(&buf, b"answer");
        near.write_all(b"next").await.unwrap();
        near.flush().await.unwrap();
        assert_eq!(
            arrived(&mut far).await,
            b"next",
            "reading dropped the second hold"
        );
    }

    #[tokio::test]
    async fn a_large_write_goes_out_at_once_after_what_was_gathered() {
        let (mut near, mut far) = pair().await;
        let big: Vec<u8> = (0..3 * GATHER_LIMIT).map(|i| (i % 251) as u8).collect();
        near.write_all(b"head:").await.unwrap();
        near.write_all(&big).await.unwrap();
        let mut want = b"head:".to_vec();
        want.extend_from_slice(&big);
        let got = arrived(&mut far).await;
        assert_eq!(got.len(), want.len(), "sent without a flush");
        assert_eq!(got, want);
        near.write_all(b"tail").await.unwrap();
        AsyncWriteExt::shutdown(&mut near).await.unwrap();
        assert_eq!(
            arrived(&mut far).await,
            b"tail",
            "shutdown sends what is left"
        );
    }
}

//! Closing a downstream connection without resetting it.
//!
//! A socket closed with bytes it has not read sends RST instead of FIN, and a client whose
//! request was among those bytes cannot tell whether it was served (nor, on some stacks, read
//! the answer it was sent just before). So whenever the proxy closes first — `connection:
//! close`, drain, idle timeout, a refused connection — it sends FIN, then reads and discards
//! until the client closes too, a time limit passes or enough bytes came (RFC 9112 §9.6, what
//! nginx calls a lingering close). The client then sees a connection closed before any answer
//! to what it sent last, which it may safely send again.
//!
//! The HTTP/1.1 fast path and the refusal path call [`linger`] themselves; a connection hyper
//! serves is wrapped in [`Lingering`], which finishes the close in a task of its own when hyper
//! drops it after shutting it down.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

/// How long a connection the proxy closed waits for the client's own close.
pub const LINGER: Duration = Duration::from_secs(2);

/// Most bytes a lingering close reads before it gives up on the client.
const MAX_DISCARD: usize = 64 << 10;

/// Sends FIN, then reads and discards until the client closes, `within` passes or
/// [`MAX_DISCARD`] bytes came.
pub async fn linger<T: AsyncRead + AsyncWrite + Unpin>(mut io: T, within: Duration) {
    if io.shutdown().await.is_ok() {
        discard(&mut io, within).await;
    }
}

async fn discard<T: AsyncRead + Unpin>(io: &mut T, within: Duration) {
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(within, async {
        let mut total = 0usize;
        while let Ok(n) = io.read(&mut sink).await {
            total += n;
            if n == 0 || total > MAX_DISCARD {
                break;
            }
        }
    })
    .await;
}

/// A connection the proxy serves and may hand to another task.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// What a lingering close holds until it ends.
pub trait Guard: Send + Unpin + 'static {}
impl<G: Send + Unpin + 'static> Guard for G {}

/// A connection that, dropped after it was shut down (FIN sent) but before the client closed
/// its side, lingers in a task of its own, keeping `guard` (the connection's slot, so that it
/// still counts as open) until then.
pub struct Lingering<T: Io, G: Guard> {
    /// `None` only once dropped.
    io: Option<T>,
    guard: Option<G>,
    shut: bool,
    client_closed: bool,
}

impl<T: Io, G: Guard> Lingering<T, G> {
    pub fn new(io: T, guard: G) -> Self {
        Self {
            io: Some(io),
            guard: Some(guard),
            shut: false,
            client_closed: false,
        }
    }

    fn io(&mut self) -> Pin<&mut T> {
        Pin::new(self.io.as_mut().expect("present until dropped"))
    }
}

impl<T: Io, G: Guard> Drop for Lingering<T, G> {
    fn drop(&mut self) {
        if !self.shut || self.client_closed {
            return;
        }
        let (Some(mut io), guard) = (self.io.take(), self.guard.take()) else {
            return;
        };
        // Outside a runtime (the process is ending) the socket just closes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                discard(&mut io, LINGER).await;
                drop(guard);
            });
        }
    }
}

impl<T: Io, G: Guard> AsyncRead for Lingering<T, G> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let room = buf.remaining();
        let polled = this.io().poll_read(cx, buf);
        if room > 0 && buf.remaining() == room && matches!(polled, Poll::Ready(Ok(()))) {
            this.client_closed = true;
        }
        polled
    }
}

impl<T: Io, G: Guard> AsyncWrite for Lingering<T, G> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = this.io().poll_shutdown(cx);
        if matches!(polled, Poll::Ready(Ok(()))) {
            this.shut = true;
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (client, listener.accept().await.unwrap().0)
    }

    /// The guard's receiver: `Ok(false)` while held, `Ok(true)` once dropped.
    fn released(rx: &mut oneshot::Receiver<()>) -> bool {
        matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed))
    }

    async fn until_released(rx: oneshot::Receiver<()>) {
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("the guard is dropped once the client closed")
            .unwrap_err();
    }

    #[tokio::test]
    async fn a_shut_connection_dropped_before_the_client_closed_lingers_with_its_guard() {
        let (mut client, server) = pair().await;
        let (tx, mut rx) = oneshot::channel::<()>();
        let mut server = Lingering::new(server, tx);
        // Sent as the proxy decided to close: never read by it.
        client
            .write_all(b"GET /next HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        assert!(!released(&mut rx), "the lingering close holds the guard");

        let mut buf = [0u8; 16];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0, "FIN, not RST");
        client.write_all(b"more").await.unwrap();
        client.shutdown().await.unwrap();
        until_released(rx).await;
        assert!(client.take_error().unwrap().is_none(), "no reset");
    }

    #[tokio::test]
    async fn closes_the_client_started_or_without_a_shutdown_do_not_linger() {
        // The client closed first: nothing can be lost, the guard goes at once.
        let (mut client, server) = pair().await;
        let (tx, mut rx) = oneshot::channel::<()>();
        let mut server = Lingering::new(server, tx);
        client.shutdown().await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        server.shutdown().await.unwrap();
        drop(server);
        assert!(released(&mut rx));

        // Dropped without a shutdown (a silent connection timed out): closed at once.
        let (_client, server) = pair().await;
        let (tx, mut rx) = oneshot::channel::<()>();
        drop(Lingering::new(server, tx));
        assert!(released(&mut rx));
    }

    #[tokio::test]
    async fn linger_gives_up_on_a_client_that_keeps_sending() {
        let (mut client, server) = pair().await;
        let closed = tokio::spawn(linger(server, Duration::from_secs(30)));
        // Far past what a lingering close reads: it stops reading and closes.
        let chunk = vec![b'x'; 16 << 10];
        let mut sent = 0usize;
        let wrote = tokio::time::timeout(Duration::from_secs(10), async {
            while client.write_all(&chunk).await.is_ok() {
                sent += chunk.len();
                if sent > 64 * MAX_DISCARD {
                    break;
                }
            }
        });
        wrote.await.expect("writes end in time");
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the linger ends well before its time limit")
            .unwrap();
    }
}

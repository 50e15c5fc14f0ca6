//! The upstream connector: hyper's `HttpConnector` (with the service's connect timeout) plus
//! the bulkhead's `max_connections`: each open connection holds a slot until it closes, and a
//! connect beyond the cap fails at once, which the request path answers with 503 `overflow`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::timeout::BoxError;

/// A connect refused because the service is at its connection cap.
#[derive(Debug, thiserror::Error)]
#[error("at the limit of {0} connections (overflow)")]
pub struct TooManyConnections(pub u32);

#[derive(Debug, Clone)]
pub struct Connector {
    inner: HttpConnector,
    open: Arc<AtomicU32>,
    max: Option<u32>,
}

impl Connector {
    pub fn new(inner: HttpConnector, max: Option<u32>) -> Self {
        Self {
            inner,
            open: Arc::default(),
            max,
        }
    }
}

/// A connection's place under the cap, given back when the connection is dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

type ConnectFuture = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.inner, cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> ConnectFuture {
        let slot = match self.max {
            None => None,
            Some(max) => {
                if self
                    .open
                    .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
                    .is_err()
                {
                    return Box::pin(std::future::ready(Err(TooManyConnections(max).into())));
                }
                Some(Slot(self.open.clone()))
            }
        };
        let connecting = self.inner.call(dst);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(Conn::over(io.into_inner(), slot, false))
        })
    }
}

/// A connection (TCP, or TLS over it for TLS origination) that gives its slot back when it
/// closes.
#[derive(Debug)]
pub struct Conn<S = TcpStream> {
    io: TokioIo<S>,
    /// ALPN chose HTTP/2 (TLS only).
    h2: bool,
    _slot: Option<Slot>,
}

impl Conn {
    /// The socket and its slot, for a client that speaks on the socket itself.
    pub fn into_parts(self) -> (TcpStream, Option<Slot>) {
        (self.io.into_inner(), self._slot)
    }
}

impl<S> Conn<S> {
    /// A connection over `stream` that holds `slot`; `h2` when ALPN chose HTTP/2.
    pub fn over(stream: S, slot: Option<Slot>, h2: bool) -> Self {
        Self {
            io: TokioIo::new(stream),
            h2,
            _slot: slot,
        }
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Connection for Conn<tokio_rustls::client::TlsStream<TcpStream>> {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> Read for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> Write for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

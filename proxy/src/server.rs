//! Accept loops: one per listener, serving HTTP/1.1 and HTTP/2 prior knowledge (h2c) on the
//! same port, with graceful shutdown.
//!
//! Every connection is admitted against its listener's [`crate::limits`] and served by
//! [`crate::connection`]. On shutdown a listener stops accepting at once; connections in
//! progress are asked to finish (HTTP/1 closes after the current response, HTTP/2 sends
//! GOAWAY) and are given a grace period before the runtime drops them.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::body::DownstreamBody;
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::service::Service;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::counting::CountingIo;
use crate::limits::{ListenerLimits, ServerLimits, Slot};

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Tells every accept loop to stop. Dropping it has the same effect.
#[derive(Debug)]
pub struct Shutdown(watch::Sender<bool>);

/// The receiving side of [`Shutdown`], one per task that must stop.
#[derive(Debug, Clone)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (Self, ShutdownSignal) {
        let (tx, rx) = watch::channel(false);
        (Self(tx), ShutdownSignal(rx))
    }

    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl ShutdownSignal {
    /// Resolves once shutdown has been triggered (or its sender dropped).
    pub async fn wait(&mut self) {
        // An error means the sender is gone, which also means shut down.
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether shutdown has been triggered (or its sender dropped), without waiting.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }
}

/// Serves `service` under the default limits, uncounted (the admin listener).
pub async fn serve<S, B>(
    name: &'static str,
    listener: TcpListener,
    service: S,
    signal: ShutdownSignal,
    grace: Duration,
) where
    S: Service<Request<DownstreamBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let limits = ListenerLimits::new(
        name,
        ServerLimits::default(),
        Default::default(),
        Default::default(),
    );
    serve_limited(listener, service, signal, grace, limits).await;
}

/// Serves `service` on every connection `listener` accepts until `signal` fires, then drains;
/// under `limits`, counting connections, their bytes and every limit hit.
pub async fn serve_limited<S, B>(
    listener: TcpListener,
    service: S,
    signal: ShutdownSignal,
    grace: Duration,
    limits: Arc<ListenerLimits>,
) where
    S: Service<Request<DownstreamBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let builder = Arc::new(limits.limits.builder());
    let conn_signal = signal.clone();
    accept_loop(listener, limits, signal, grace, move |stream, peer, slot| {
        let io = CountingIo::new(stream, &slot.listener().conn);
        let (builder, service, signal) = (builder.clone(), service.clone(), conn_signal.clone());
        async move {
            let name = slot.listener().name;
            if let Err(error) = crate::connection::serve(&builder, io, service, slot, signal).await
            {
                tracing::debug!(listener = name, %peer, %error, "connection ended with an error");
            }
        }
    })
    .await;
}

/// The accept loop of every traffic listener: admits each connection under `limits` (over the
/// cap it is refused there), sets TCP_NODELAY (proxied requests are small and
/// latency-sensitive), and runs `handle` in the connection's own task, so a slow client (TLS
/// handshake, protocol detection) never holds up accepting. On `signal` it stops accepting and
/// waits up to `grace` for the listener's open connections to finish.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limits: Arc<ListenerLimits>,
    mut signal: ShutdownSignal,
    grace: Duration,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some((stream, slot)) = limits.admit(stream) else { continue };
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(handle(stream, peer, slot));
                }
                Err(error) => {
                    tracing::warn!(listener = limits.name, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            () = signal.wait() => break,
        }
    }
    drop(listener);
    limits.drain(grace).await;
}

//! Accept loops: one per listener, serving HTTP/1.1 and HTTP/2 prior knowledge (h2c) on the
//! same port, with graceful shutdown.
//!
//! On shutdown a listener stops accepting at once; connections in progress are asked to finish
//! (HTTP/1 closes after the current response, HTTP/2 sends GOAWAY) and are given a grace period
//! before the runtime drops them.

use std::error::Error as StdError;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::counting::CountingIo;
use crate::metrics::ConnCounters;

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
}

/// Serves `service` on every connection `listener` accepts until `signal` fires, then drains.
pub async fn serve<S, B>(
    name: &'static str,
    listener: TcpListener,
    service: S,
    signal: ShutdownSignal,
    grace: Duration,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    serve_counted(
        name,
        listener,
        service,
        signal,
        grace,
        ConnCounters::default(),
    )
    .await;
}

/// [`serve`], counting connections opened and closed and their bytes into `counters`.
pub async fn serve_counted<S, B>(
    name: &'static str,
    listener: TcpListener,
    service: S,
    mut signal: ShutdownSignal,
    grace: Duration,
    counters: ConnCounters,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The timer enables HTTP/1's header read timeout, so a silent client cannot hold a
    // connection forever before sending a request.
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Proxied requests are latency-sensitive and small; don't batch them.
                    let _ = stream.set_nodelay(true);
                    counters.opened.inc();
                    let stream = CountingIo::new(stream, &counters);
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), service.clone())
                        .into_owned();
                    let conn = graceful.watch(conn);
                    let closed = counters.closed.clone();
                    tokio::spawn(async move {
                        if let Err(error) = conn.await {
                            tracing::debug!(listener = name, %peer, %error, "connection ended with an error");
                        }
                        closed.inc();
                    });
                }
                Err(error) => {
                    tracing::warn!(listener = name, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            () = signal.wait() => break,
        }
    }

    drop(listener);
    let open = graceful.count();
    if open > 0 {
        tracing::info!(listener = name, connections = open, "draining connections");
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(listener = name, grace = ?grace, "grace period over, dropping the remaining connections");
        }
    }
}

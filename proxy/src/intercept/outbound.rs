//! The outbound listener in transparent mode: every accepted connection is either the app
//! using the proxy explicitly (connected to the listener itself) or one iptables captured.
//! Captured connections to a mesh service are detected and, when HTTP, routed with their
//! original destination attached; everything else passes through as opaque TCP to where it
//! was going (Istio's PassthroughCluster).

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use super::detect::{Detected, detect};
use super::original_dst::was_redirected;
use super::{OriginalDst, Transparent, tcp};
use crate::counting::CountingIo;
use crate::forward::Forwarder;
use crate::metrics::ConnCounters;
use crate::server::ShutdownSignal;
use crate::state::ProxyState;

const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// What each captured connection needs.
#[derive(Clone)]
pub struct Outbound {
    pub state: Arc<ProxyState>,
    pub fwd: Forwarder,
    pub transparent: Transparent,
    /// HTTP connections (`listener="outbound"`).
    pub http: ConnCounters,
    /// Opaque and passthrough connections (`listener="passthrough"`).
    pub opaque: ConnCounters,
}

/// Serves `listener` until `signal`, then drains like [`crate::server::serve`].
pub async fn serve(
    listener: TcpListener,
    ctx: Outbound,
    mut signal: ShutdownSignal,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let (ctx, builder, watcher) = (ctx.clone(), builder.clone(), graceful.watcher());
                    // Detection waits on the client: never in the accept loop.
                    tokio::spawn(async move {
                        connection(stream, ctx, &builder, watcher).await;
                        tracing::trace!(%peer, "outbound connection done");
                    });
                }
                Err(error) => {
                    tracing::warn!(listener = "outbound", %error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            () = signal.wait() => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(listener = "outbound", grace = ?grace, "grace period over, dropping the remaining connections");
        }
    }
}

async fn connection(
    stream: TcpStream,
    ctx: Outbound,
    builder: &auto::Builder<TokioExecutor>,
    graceful: hyper_util::server::graceful::Watcher,
) {
    let orig = was_redirected(&stream);
    let http = match orig {
        // The app talks to the proxy explicitly (Host names the service).
        None => true,
        Some(dest) if !ctx.state.load().table.knows_address(&dest) => {
            tracing::debug!(%dest, "passthrough: not a mesh destination");
            false
        }
        Some(dest) if ctx.transparent.is_opaque(dest.port()) => false,
        Some(dest) => match detect(&stream, ctx.transparent.detect_timeout).await {
            Ok(found) => {
                match found {
                    Detected::Tls if tracing::enabled!(tracing::Level::DEBUG) => {
                        let sni =
                            super::detect::peek_sni(&stream, ctx.transparent.detect_timeout).await;
                        tracing::debug!(%dest, ?sni, "TLS from the app: passed through");
                    }
                    Detected::Http1Upgrade => {
                        tracing::debug!(%dest, "HTTP upgrade: passed through")
                    }
                    _ => {}
                }
                found.is_http()
            }
            Err(error) => {
                tracing::debug!(%dest, %error, "detection failed");
                return;
            }
        },
    };
    match (http, orig) {
        (false, Some(dest)) => {
            ctx.opaque.opened.inc();
            tcp::proxy(stream, dest, &ctx.opaque).await;
            ctx.opaque.closed.inc();
        }
        _ => {
            ctx.http.opened.inc();
            let io = TokioIo::new(CountingIo::new(stream, &ctx.http));
            let fwd = ctx.fwd.clone();
            let service = service_fn(move |mut req| {
                if let Some(dest) = orig {
                    req.extensions_mut().insert(OriginalDst(dest));
                }
                let fwd = fwd.clone();
                async move { Ok::<_, std::convert::Infallible>(fwd.serve(req).await) }
            });
            let conn = builder.serve_connection(io, service).into_owned();
            if let Err(error) = graceful.watch(conn).await {
                tracing::debug!(listener = "outbound", %error, "connection ended with an error");
            }
            ctx.http.closed.inc();
        }
    }
}

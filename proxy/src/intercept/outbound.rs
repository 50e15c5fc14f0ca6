//! The outbound listener in transparent mode: every accepted connection is either the app
//! using the proxy explicitly (connected to the listener itself) or one iptables captured.
//! Captured connections to a mesh service are detected and, when HTTP, routed with their
//! original destination attached; everything else is opaque TCP: over mTLS to the
//! destination's sidecar when its service has an identity, else passed through to where it
//! was going (Istio's PassthroughCluster) — or, with `--outbound-traffic-policy
//! registry-only`, closed (BlackHoleCluster) when that is outside the mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};

use super::detect::{Detected, detect};
use super::original_dst::was_redirected;
use super::{OriginalDst, Transparent, tcp};
use crate::counting::CountingIo;
use crate::forward::Forwarder;
use crate::limits::{ListenerLimits, Slot};
use crate::metrics::ConnCounters;
use crate::server::{self, ShutdownSignal};
use crate::state::ProxyState;

/// What each captured connection needs.
#[derive(Clone)]
pub struct Outbound {
    pub state: Arc<ProxyState>,
    pub fwd: Forwarder,
    pub transparent: Transparent,
    /// Opaque and passthrough connections (`listener="passthrough"`).
    pub opaque: ConnCounters,
    /// Opaque connections sent over mTLS to a mesh destination (`listener="mesh_tcp"`).
    pub tunnels: ConnCounters,
    /// Connections closed by `registry_only` (`listener="blackhole"`, Istio's
    /// BlackHoleCluster).
    pub blackhole: ConnCounters,
}

/// Serves `listener` until `signal` under `limits` (shared with the IPv6 listener, so the
/// connection budget is the port's), then drains like [`crate::server::serve_limited`].
pub async fn serve(
    listener: TcpListener,
    ctx: Outbound,
    signal: ShutdownSignal,
    grace: Duration,
    limits: Arc<ListenerLimits>,
) {
    let builder = Arc::new(limits.limits.builder());
    let conn_signal = signal.clone();
    server::accept_loop(
        listener,
        limits,
        signal,
        grace,
        move |stream, peer, slot| {
            let (ctx, builder, signal) = (ctx.clone(), builder.clone(), conn_signal.clone());
            async move {
                connection(stream, ctx, &builder, slot, signal).await;
                tracing::trace!(%peer, "outbound connection done");
            }
        },
    )
    .await;
}

/// One accepted connection; `slot` is its place under the listener's connection limit, held
/// until it closes (opaque ones included).
async fn connection(
    stream: TcpStream,
    ctx: Outbound,
    builder: &auto::Builder<TokioExecutor>,
    slot: Slot,
    signal: ShutdownSignal,
) {
    let orig = was_redirected(&stream);
    let http = match orig {
        // The app talks to the proxy explicitly (Host names the service).
        None => true,
        Some(dest) if !ctx.state.load().table.knows_address(&dest) => {
            if ctx.transparent.registry_only {
                // Closed without a byte read or sent: the app sees its connection end.
                ctx.blackhole.opened.inc();
                ctx.blackhole.closed.inc();
                tracing::debug!(%dest, "blackhole: not a mesh destination (registry-only)");
                return;
            }
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
            // A virtual IP stands for its service: the connection goes to one of its endpoints.
            let dest = ctx
                .state
                .load()
                .table
                .endpoint_behind(&dest)
                .unwrap_or(dest);
            opaque(stream, dest, &ctx).await;
        }
        _ => {
            let io = CountingIo::new(stream, &slot.listener().conn);
            let fwd = ctx.fwd.clone();
            let service = service_fn(move |mut req| {
                if let Some(dest) = orig {
                    req.extensions_mut().insert(OriginalDst(dest));
                }
                let fwd = fwd.clone();
                async move { Ok::<_, std::convert::Infallible>(fwd.serve(req).await) }
            });
            if let Err(error) = crate::connection::serve(builder, io, service, slot, signal).await {
                tracing::debug!(listener = "outbound", %error, "connection ended with an error");
            }
        }
    }
}

/// Opaque TCP to `dest`: over mTLS to its sidecar when its service has an identity, else as
/// it is.
async fn opaque(stream: TcpStream, dest: SocketAddr, ctx: &Outbound) {
    match tunnel_to(ctx, &dest) {
        Some(mtls) => {
            let counters = &ctx.tunnels;
            counters.opened.inc();
            match mtls.client.tunnel(dest, &mtls.identity).await {
                Ok(tls) => tcp::copy(stream, tls, &dest, counters).await,
                Err(error) => tracing::debug!(%dest, %error, "opaque TCP over mTLS failed"),
            }
            counters.closed.inc();
        }
        None => {
            ctx.opaque.opened.inc();
            tcp::proxy(stream, dest, &ctx.opaque).await;
            ctx.opaque.closed.inc();
        }
    }
}

/// How opaque TCP to `dest` goes over mTLS, when it does: `dest` is an endpoint of a service
/// with an identity and this proxy has one.
fn tunnel_to(ctx: &Outbound, dest: &SocketAddr) -> Option<crate::resilience::call::Mtls> {
    let snapshot = ctx.state.load();
    ctx.fwd
        .mtls(&snapshot.security, snapshot.table.service_at(dest)?)
}

//! The inbound listener's security: peer authentication at accept time, then per request the
//! identity headers, JWT authentication and authorization, before the request is forwarded
//! to the local app.
//!
//! With an identity the listener peeks at the first byte of every connection: `0x16` (a TLS
//! handshake record) means mTLS, anything else plaintext, which the service's peer
//! authentication mode accepts (PERMISSIVE, DISABLE) or refuses (STRICT). The caller's SPIFFE
//! ID and the TLS version go to the app as [`PEER_IDENTITY_HEADER`] and [`TLS_HEADER`]; copies
//! of them sent by anyone else are removed, so the app can trust them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::header::HeaderValue;
use http::{Request, Response, Version};
use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use weft_proto::security::PeerAuthMode;

use crate::body::ProxyBody;
use crate::counting::CountingIo;
use crate::error::{ProxyError, is_grpc};
use crate::forward::Forwarder;
use crate::identity::Identity;
use crate::identity::mesh::{APP_PROTOCOL_HEADER, MESH_SNI};
use crate::identity::verify::{ALPN_TCP, server_config, spiffe_id_of};
use crate::intercept::detect::{Detected, detect, peek_sni};
use crate::intercept::original_dst::was_redirected;
use crate::intercept::{Transparent, tcp};
use crate::limits::{ListenerLimits, Slot};
use crate::metrics::ConnCounters;
use crate::policy::{AuthzStats, RequestAttrs};
use crate::resilience::ResilienceError;
use crate::server::{self, ShutdownSignal};
use crate::state::ProxyState;

/// The caller's SPIFFE ID, set by the inbound proxy for mTLS callers.
pub const PEER_IDENTITY_HEADER: &str = "x-weft-peer-identity";
/// The negotiated TLS version (`TLSv1_3`), set by the inbound proxy for mTLS callers.
pub const TLS_HEADER: &str = "x-weft-tls";

/// How long a new connection may stay silent before its first byte decides TLS or not.
const PEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// A downstream TCP connection, its bytes counted into the listener's metrics.
type Conn = CountingIo<TcpStream>;

/// What the inbound side knows about one connection.
#[derive(Debug, Default)]
pub struct Peer {
    pub identity: Option<HeaderValue>,
    pub principal: Option<String>,
    pub tls: Option<&'static str>,
    pub port: u16,
}

/// The per-request checks of the inbound side. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Guard {
    state: Arc<ProxyState>,
    /// The service this proxy fronts: whose policies apply.
    service: Arc<str>,
    fwd: Forwarder,
    /// Opaque TCP from sidecars over mTLS (`listener="inbound_mesh_tcp"`).
    tunnels: ConnCounters,
}

impl Guard {
    pub fn new(
        state: Arc<ProxyState>,
        service: &str,
        fwd: Forwarder,
        tunnels: ConnCounters,
    ) -> Self {
        Self {
            state,
            service: Arc::from(service),
            fwd,
            tunnels,
        }
    }

    /// The same guard forwarding to another local app address (transparent mode).
    pub fn for_app(&self, app: http::uri::Authority) -> Self {
        Self {
            state: self.state.clone(),
            service: self.service.clone(),
            fwd: self.fwd.for_app(app),
            tunnels: self.tunnels.clone(),
        }
    }

    /// An opaque TCP stream from a sidecar (mTLS, ALPN `weft-tcp`): authorized on who calls
    /// and the port, then copied to the app as it is.
    async fn tunnel<S>(&self, tls: S, principal: Option<&str>, port: u16) -> Result<(), BoxError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let policy = self.state.load().security.service(&self.service);
        if let Some(Err(denied)) = policy.map(|p| p.authorize_connection(principal, port)) {
            self.stats().denied.fetch_add(1, Ordering::Relaxed);
            return Err(format!(
                "opaque TCP from {} to port {port} denied by policy {:?}",
                principal.unwrap_or("(no identity)"),
                denied.policy
            )
            .into());
        }
        self.stats().allowed.fetch_add(1, Ordering::Relaxed);
        let app = self
            .fwd
            .app()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
            .ok_or("opaque TCP over mTLS needs the app at an IP address (--app-addr)")?;
        self.tunnels.opened.inc();
        tcp::proxy(tls, app, &self.tunnels).await;
        self.tunnels.closed.inc();
        Ok(())
    }

    fn stats(&self) -> &AuthzStats {
        &self.state.security.authz
    }

    /// [`Self::check_and_forward`], observed like every other request (denials included).
    pub async fn handle(
        &self,
        mut req: Request<crate::body::DownstreamBody>,
        peer: &Peer,
    ) -> Response<crate::observe::ObservedBody> {
        let obs = self.fwd.observe(&mut req);
        let mut meta = crate::observe::RequestMeta::default();
        let resp = self.check_and_forward(req, peer, &mut meta).await;
        obs.respond(resp, meta)
    }

    /// Strips spoofable headers, authenticates, authorizes, then forwards.
    async fn check_and_forward(
        &self,
        mut req: Request<crate::body::DownstreamBody>,
        peer: &Peer,
        meta: &mut crate::observe::RequestMeta,
    ) -> Response<ProxyBody> {
        let headers = req.headers_mut();
        headers.remove(PEER_IDENTITY_HEADER);
        headers.remove(TLS_HEADER);
        // Only a sidecar (over mTLS) may say the app spoke HTTP/1.1.
        if headers
            .remove(APP_PROTOCOL_HEADER)
            .is_some_and(|v| v == "http1")
            && peer.tls.is_some()
        {
            *req.version_mut() = Version::HTTP_11;
        }
        let grpc = is_grpc(req.headers());
        let version = req.version();
        let policy = self.state.load().security.service(&self.service);
        if let Some(policy) = &policy {
            let claims = match &policy.jwt {
                Some(jwt) => match jwt.verify(req.headers()).await {
                    Ok(claims) => Some(claims),
                    Err(e) => {
                        self.stats().unauthenticated.fetch_add(1, Ordering::Relaxed);
                        let err = ProxyError::Unauthenticated(e);
                        meta.reason = Some(err.reason());
                        return err.to_response(grpc, version);
                    }
                },
                None => None,
            };
            let attrs = RequestAttrs {
                principal: peer.principal.as_deref(),
                path: req.uri().path(),
                method: req.method(),
                port: peer.port,
                claims: claims.as_ref(),
            };
            if let Err(denied) = policy.authorize(&attrs) {
                self.stats().denied.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(policy = denied.policy, principal = ?peer.principal, path = req.uri().path(), "request denied");
                meta.reason = Some("denied");
                return ProxyError::Denied {
                    policy: denied.policy,
                }
                .to_response(grpc, version);
            }
        }
        self.stats().allowed.fetch_add(1, Ordering::Relaxed);
        let headers = req.headers_mut();
        if let Some(id) = &peer.identity {
            headers.insert(PEER_IDENTITY_HEADER, id.clone());
        }
        if let Some(tls) = peer.tls {
            headers.insert(TLS_HEADER, HeaderValue::from_static(tls));
        }
        // After the identity header is set: a limit per caller keys on the verified one.
        if let Some(bucket) = policy.as_ref().and_then(|p| p.rate_limit.as_ref())
            && let Err(wait) = bucket.try_take(req.headers())
        {
            let err = ProxyError::from(ResilienceError::RateLimited {
                limit: format!("service {} (inbound)", self.service),
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            });
            meta.reason = Some(err.reason());
            return err.to_response(grpc, version);
        }
        self.fwd.handle_with(req, meta).await
    }

    fn peer_mode(&self, port: u16) -> PeerAuthMode {
        self.state
            .load()
            .security
            .service(&self.service)
            .map_or(PeerAuthMode::Permissive, |p| p.peer_mode(port))
    }
}

/// Transparent mode on the inbound listener: captured connections go to the app port they
/// were sent to; opaque ones are copied as TCP.
#[derive(Debug, Clone)]
pub struct Captured {
    pub transparent: Transparent,
    /// Whether connections made to the listener itself (not captured) go to `--app-addr`.
    pub has_app_addr: bool,
    /// Opaque inbound connections (`listener="inbound_passthrough"`).
    pub opaque: ConnCounters,
}

/// Serves the inbound listener with mTLS (when `identity` is given) and the guard, under
/// `limits`, until `signal`; then drains like [`crate::server::serve_limited`].
pub async fn serve(
    listener: TcpListener,
    guard: Guard,
    identity: Option<Arc<Identity>>,
    captured: Option<Captured>,
    signal: ShutdownSignal,
    grace: Duration,
    limits: Arc<ListenerLimits>,
) {
    let port = listener.local_addr().map_or(0, |a| a.port());
    let acceptor = identity.map(|id| TlsAcceptor::from(server_config(id)));
    let builder = Arc::new(limits.limits.builder());
    let conn_signal = signal.clone();
    server::accept_loop(listener, limits, signal, grace, move |stream, peer, slot| {
        let (guard, acceptor, builder, signal, captured) = (
            guard.clone(),
            acceptor.clone(),
            builder.clone(),
            conn_signal.clone(),
            captured.clone(),
        );
        async move {
            let (stream, guard, port) = match &captured {
                Some(captured) => match capture(stream, port, guard, captured, acceptor.is_some())
                    .await
                {
                    Ok(Some(next)) => next,
                    Ok(None) => return,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "captured inbound connection refused or failed");
                        return;
                    }
                },
                None => (stream, guard, port),
            };
            // Counted from here: opaque connections have their own counters.
            let stream = CountingIo::new(stream, &slot.listener().conn);
            // Boxed once per connection (TLS, HTTP and tunnel states side by side are large);
            // requests are served inside without further boxing.
            let serve = Box::pin(connection(
                stream, port, guard, acceptor, &builder, slot, signal,
            ));
            if let Err(error) = serve.await {
                tracing::debug!(%peer, %error, "inbound connection refused or failed");
            }
        }
    })
    .await;
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Transparent mode, before TLS and HTTP: a captured connection's original port is the app's;
/// plaintext on opaque ports and non-HTTP, non-TLS bytes are copied to the app as TCP (unless
/// peer authentication is STRICT). `mesh`: this proxy terminates mTLS, so a sidecar's
/// ClientHello is looked for on opaque ports too. Returns what the usual path serves, or
/// `None` when the connection was handled here.
async fn capture(
    stream: TcpStream,
    port: u16,
    guard: Guard,
    captured: &Captured,
    mesh: bool,
) -> Result<Option<(TcpStream, Guard, u16)>, BoxError> {
    let Some(orig) = was_redirected(&stream) else {
        if captured.has_app_addr {
            return Ok(Some((stream, guard, port)));
        }
        return Err("not a captured connection and no --app-addr to send it to".into());
    };
    let port = orig.port();
    let loopback = if orig.is_ipv4() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    };
    let app = SocketAddr::new(loopback, port);
    let t = &captured.transparent;
    let mode = guard.peer_mode(port);
    let opaque = if t.is_opaque(port) && (!mesh || mode == PeerAuthMode::Disable) {
        // Server-first protocols: nothing to wait for.
        true
    } else if t.is_opaque(port) && mode == PeerAuthMode::Strict {
        // Only a sidecar's mTLS is accepted here: no detection, the TLS path decides.
        false
    } else {
        match detect(&stream, t.detect_timeout).await? {
            // A sidecar says MESH_SNI (HTTP or, by ALPN, opaque TCP over mTLS); on other
            // ports a hello without SNI goes to the mTLS path too, any other name is the
            // app's own TLS, passed through.
            Detected::Tls => {
                let sni = peek_sni(&stream, t.detect_timeout).await;
                match sni.as_deref() {
                    Some(MESH_SNI) => false,
                    None => t.is_opaque(port),
                    Some(_) => true,
                }
            }
            // On a declared-opaque port a plaintext client (the server speaks first) waited
            // out the detection; it is not HTTP whatever it sends.
            _ if t.is_opaque(port) => true,
            found => !found.is_http(),
        }
    };
    if opaque {
        if mode == PeerAuthMode::Strict {
            guard
                .stats()
                .plaintext_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err("opaque plaintext refused: peer authentication is STRICT".into());
        }
        captured.opaque.opened.inc();
        tcp::proxy(stream, app, &captured.opaque).await;
        captured.opaque.closed.inc();
        return Ok(None);
    }
    let authority = app
        .to_string()
        .parse()
        .expect("a socket address is a valid authority");
    Ok(Some((stream, guard.for_app(authority), port)))
}

async fn connection(
    stream: Conn,
    port: u16,
    guard: Guard,
    acceptor: Option<TlsAcceptor>,
    builder: &auto::Builder<TokioExecutor>,
    slot: Slot,
    signal: ShutdownSignal,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let plain = Peer {
        port,
        ..Peer::default()
    };
    let Some(acceptor) = acceptor else {
        return serve_conn(stream, plain, guard, builder, slot, signal).await;
    };
    let mode = guard.peer_mode(port);
    let is_tls = if mode == PeerAuthMode::Disable {
        false
    } else {
        let mut first = [0u8; 1];
        let n = tokio::time::timeout(PEEK_TIMEOUT, stream.get_ref().peek(&mut first)).await??;
        n == 1 && first[0] == 0x16
    };
    if !is_tls {
        if mode == PeerAuthMode::Strict {
            guard
                .stats()
                .plaintext_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err("plaintext refused: peer authentication is STRICT".into());
        }
        return serve_conn(stream, plain, guard, builder, slot, signal).await;
    }
    let tls = tokio::time::timeout(PEEK_TIMEOUT, acceptor.accept(stream)).await??;
    let conn = tls.get_ref().1;
    let principal = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(spiffe_id_of);
    if conn.alpn_protocol() == Some(ALPN_TCP) {
        // `slot` is held until the stream ends, as for every other connection.
        return guard.tunnel(tls, principal.as_deref(), port).await;
    }
    let peer = Peer {
        identity: principal
            .as_deref()
            .and_then(|p| HeaderValue::from_str(p).ok()),
        principal,
        tls: conn.protocol_version().map(|v| match v {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1_3",
            _ => "other",
        }),
        port,
    };
    serve_conn(tls, peer, guard, builder, slot, signal).await
}

async fn serve_conn<I>(
    io: I,
    peer: Peer,
    guard: Guard,
    builder: &auto::Builder<TokioExecutor>,
    slot: Slot,
    signal: ShutdownSignal,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = Arc::new(peer);
    let service = service_fn(move |req| {
        let (guard, peer) = (guard.clone(), peer.clone());
        async move { Ok::<_, std::convert::Infallible>(guard.handle(req, &peer).await) }
    });
    crate::connection::serve(builder, io, service, slot, signal).await
}

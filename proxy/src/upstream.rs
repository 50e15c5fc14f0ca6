//! Upstream connection pools and the one function that sends a request to an endpoint.
//!
//! Per service, two pools: HTTP/1.1 keep-alive connections in the proxy's own
//! [`Http1Pool`](crate::pool::Http1Pool) (the hot path), and HTTP/2 with prior knowledge (h2c)
//! in a `hyper_util` legacy client, which multiplexes requests over one connection per
//! endpoint.

use std::error::Error as StdError;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use weft_proto::model::Protocol;

use crate::body::ProxyBody;
use crate::origination::TlsConnector;
use crate::pool::{Http1Pool, UpstreamBody};
use crate::resilience::connector::{Connector, TooManyConnections};
use crate::resilience::registry::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, PoolKey};
use crate::resilience::replay::RequestBody;

/// How a request failed on the upstream side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to upstream {endpoint} failed: {cause}")]
    Connect { endpoint: String, cause: String },
    #[error("connect to upstream {endpoint} timed out: {cause}")]
    ConnectTimeout { endpoint: String, cause: String },
    #[error("no new connection to upstream {endpoint}: {cause}")]
    ConnectionLimit { endpoint: String, cause: String },
    #[error("upstream {endpoint} failed the request: {cause}")]
    Reset { endpoint: String, cause: String },
}

/// The protocol to speak to one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

impl UpstreamProtocol {
    /// A service's protocol, with `auto` resolved to what the downstream spoke.
    pub fn resolve(protocol: Protocol, downstream: Version) -> Self {
        match protocol {
            Protocol::Http1 => Self::Http1,
            Protocol::Http2 | Protocol::Grpc => Self::Http2,
            Protocol::Auto if downstream == Version::HTTP_2 => Self::Http2,
            Protocol::Auto => Self::Http1,
        }
    }
}

/// The shared upstream clients. Cheap to clone (the pools are behind `Arc`s).
#[derive(Clone)]
pub struct Upstream {
    http1: Http1Pool,
    http2: Client<Connector, RequestBody>,
    /// TLS origination: every request of the service goes here instead.
    https: Option<Https>,
}

#[derive(Clone)]
struct Https {
    client: Client<TlsConnector, RequestBody>,
    /// For upgraded connections, which bypass the pool.
    connector: TlsConnector,
    h2: bool,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    pub fn new() -> Self {
        Self::with_policy(PoolKey {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: None,
            tls: None,
        })
    }

    /// Pools with a service's connect timeout and idle timeout.
    pub fn with_policy(key: PoolKey) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(key.connect_timeout));
        // One connection cap shared by both pools of the service.
        let connector = Connector::new(connector, key.max_connections);
        let client = |h2: bool| {
            let mut b = Client::builder(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(key.idle_timeout)
                // The proxy keeps the Host the client sent; never invent one from the endpoint.
                .set_host(false)
                .http2_only(h2);
            b
        };
        let https = key.tls.as_ref().map(|tls| {
            let tls_connector = TlsConnector::new(connector.clone(), tls, key.connect_timeout);
            Https {
                client: client(tls.h2).build(tls_connector.clone()),
                connector: tls_connector,
                h2: tls.h2,
            }
        });
        Self {
            http2: client(true).build(connector.clone()),
            http1: Http1Pool::new(connector, key.idle_timeout),
            https,
        }
    }

    /// The TLS connector of a service with TLS origination, for upgraded connections.
    pub fn tls(&self) -> Option<&TlsConnector> {
        self.https.as_ref().map(|h| &h.connector)
    }

    /// Sends `req` to `endpoint` and returns the upstream's response, bodies streamed both ways.
    pub async fn forward(
        &self,
        req: Request<RequestBody>,
        endpoint: Authority,
        protocol: UpstreamProtocol,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let resp = self.send(req, endpoint, protocol).await?;
        Ok(resp.map(ProxyBody::Upstream))
    }

    /// [`Upstream::forward`] with the upstream's body as it is.
    ///
    /// The request is prepared before the future is made: the future holds it once (see
    /// `Forwarder::serve`).
    pub fn send(
        &self,
        req: Request<RequestBody>,
        endpoint: Authority,
        protocol: UpstreamProtocol,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, UpstreamError>> {
        let downstream_version = req.version();
        let wire = match (&self.https, protocol) {
            (Some(h), _) => Wire::Tls { h2: h.h2 },
            (None, UpstreamProtocol::Http1) => Wire::Http1,
            (None, UpstreamProtocol::Http2) => Wire::H2c,
        };
        let req = prepare(req, &endpoint, wire);
        async move {
            let mut resp = if wire == Wire::Http1 {
                // The HTTP/1.1 client never puts hop-by-hop fields in the map.
                self.http1.send(endpoint, req).await?
            } else {
                // `Wire::Tls` exactly when the service originates TLS.
                let pending = match &self.https {
                    Some(h) => h.client.request(req),
                    None => self.http2.request(req),
                };
                let mut resp = pending
                    .await
                    .map_err(|e| classify(&e, endpoint.as_str()))?
                    .map(UpstreamBody::new);
                strip_hop_by_hop(resp.headers_mut());
                resp
            };
            // hyper frames the response for the downstream connection; the version says which.
            *resp.version_mut() = downstream_version;
            Ok(resp)
        }
    }
}

/// How a request goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// The proxy's own HTTP/1.1 pool.
    Http1,
    /// HTTP/2 with prior knowledge.
    H2c,
    /// TLS origination, HTTP/2 or HTTP/1.1 inside.
    Tls { h2: bool },
}

/// `req` as it goes to `endpoint`: the client's authority kept as Host, hop-by-hop headers
/// removed, the URI in the form the protocol's client wants.
fn prepare(req: Request<RequestBody>, endpoint: &Authority, wire: Wire) -> Request<RequestBody> {
    let (mut parts, body) = req.into_parts();
    authority_to_host(&mut parts);
    strip_hop_by_hop(&mut parts.headers);
    match wire {
        Wire::Tls { h2 } => {
            parts.uri = origin_uri(&parts.uri, Scheme::HTTPS, endpoint.clone());
            parts.version = if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            };
        }
        Wire::Http1 => {
            // Origin-form on the wire; the endpoint is the connection, not the URI.
            parts.uri = Uri::from(
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            );
            parts.version = Version::HTTP_11;
        }
        Wire::H2c => {
            parts.uri = origin_uri(&parts.uri, Scheme::HTTP, endpoint.clone());
            parts.version = Version::HTTP_2;
        }
    }
    Request::from_parts(parts, body)
}

fn classify(err: &hyper_util::client::legacy::Error, endpoint: &str) -> UpstreamError {
    let endpoint = endpoint.to_owned();
    let cause = root_cause(err);
    if err.is_connect() && in_chain::<TooManyConnections>(err) {
        UpstreamError::ConnectionLimit { endpoint, cause }
    } else if err.is_connect() && timed_out(err) {
        UpstreamError::ConnectTimeout { endpoint, cause }
    } else if err.is_connect() {
        UpstreamError::Connect { endpoint, cause }
    } else {
        UpstreamError::Reset { endpoint, cause }
    }
}

fn in_chain<E: StdError + 'static>(err: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<E>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// Whether an `io::ErrorKind::TimedOut` (the connector's connect timeout) is in the chain.
pub(crate) fn timed_out(err: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// The innermost error's message (e.g. `Connection refused (os error 111)`), prefixed by the
/// outer ones that add something, so a reader sees the OS error without a debug dump.
pub(crate) fn root_cause(err: &(dyn StdError + 'static)) -> String {
    let mut messages: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let msg = e.to_string();
        if !msg.is_empty() && messages.last() != Some(&msg) {
            messages.push(msg);
        }
        next = e.source();
    }
    // The outermost message of a legacy client error is generic ("client error (Connect)").
    if messages.len() > 1 {
        messages.remove(0);
    }
    messages.join(": ")
}

/// `uri`'s path and query (`/` when it has none) under `scheme` and `authority`: the URI a
/// request is sent upstream with.
pub fn origin_uri(uri: &Uri, scheme: Scheme, authority: Authority) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).expect("scheme, authority and path make a valid URI")
}

/// Keeps the authority the client asked for: the URI is about to be rewritten to the endpoint,
/// so an authority carried there (HTTP/2 `:authority`, HTTP/1 absolute-form, which RFC 9112
/// §3.2.2 says wins over Host) moves into Host.
pub(crate) fn authority_to_host(parts: &mut http::request::Parts) {
    if let Some(value) = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, value);
    }
}

/// Headers that describe one connection, not the message, and so never cross a proxy
/// (RFC 9110 §7.6.1), plus any header the `Connection` header names. `te` is handled apart:
/// `te: trailers` is end-to-end and gRPC needs it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names, no hashing, then remove only what is there: this runs twice
    // per request, and most responses carry `Connection: keep-alive` (profiled: removing
    // every hop-by-hop name blindly was ~5% of a request).
    let mut found = 0u8;
    for name in headers.keys() {
        found |= hop_bit(name);
    }
    if found == 0 {
        return;
    }
    // `Connection` may name more hop-by-hop headers (rare: no allocation unless it does).
    let mut named = Vec::new();
    if found & HOP_CONNECTION != 0 {
        for value in headers.get_all(header::CONNECTION) {
            for token in value.to_str().unwrap_or("").split(',') {
                let token = token.trim();
                if token.is_empty()
                    || token.eq_ignore_ascii_case("close")
                    || token.eq_ignore_ascii_case("keep-alive")
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes())
                    && hop_bit(&name) == 0
                {
                    named.push(name);
                }
            }
        }
    }
    for name in named {
        headers.remove(name);
    }
    let trailers = found & HOP_TE != 0
        && headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
    for (bit, name) in [
        (HOP_CONNECTION, header::CONNECTION),
        (HOP_TRANSFER_ENCODING, header::TRANSFER_ENCODING),
        (HOP_UPGRADE, header::UPGRADE),
        (HOP_TE, header::TE),
        (HOP_KEEP_ALIVE, KEEP_ALIVE),
        (HOP_PROXY_CONNECTION, PROXY_CONNECTION),
        (HOP_EXPECT, header::EXPECT),
    ] {
        if found & bit != 0 {
            headers.remove(name);
        }
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const HOP_CONNECTION: u8 = 1;
const HOP_TRANSFER_ENCODING: u8 = 2;
const HOP_UPGRADE: u8 = 4;
const HOP_TE: u8 = 8;
const HOP_KEEP_ALIVE: u8 = 16;
const HOP_PROXY_CONNECTION: u8 = 32;
const HOP_EXPECT: u8 = 64;

/// Which hop-by-hop header `name` is (a bit), 0 for an end-to-end one.
fn hop_bit(name: &HeaderName) -> u8 {
    if *name == header::CONNECTION {
        HOP_CONNECTION
    } else if *name == header::TRANSFER_ENCODING {
        HOP_TRANSFER_ENCODING
    } else if *name == header::UPGRADE {
        HOP_UPGRADE
    } else if *name == header::TE {
        HOP_TE
    } else if name.as_str() == "keep-alive" {
        HOP_KEEP_ALIVE
    } else if name.as_str() == "proxy-connection" {
        HOP_PROXY_CONNECTION
    } else if *name == header::EXPECT {
        // Not hop-by-hop by RFC, but answered here: the proxy's server side sends the client
        // `100 Continue` when the body is first read (hyper does). Forwarded, it has the
        // upstream send its own 100, which the HTTP/1.1 client would take for an early final
        // answer and stop sending the body the upstream waits for (as Envoy, by default).
        HOP_EXPECT
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_but_te_trailers_stays() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("expect", "100-continue"),
            ("x-private", "1"),
            ("te", "gzip, trailers"),
            ("x-kept", "yes"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(h["te"], "trailers");

        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn auto_follows_the_downstream() {
        use UpstreamProtocol::*;
        assert_eq!(
            UpstreamProtocol::resolve(Protocol::Auto, Version::HTTP_2),
            Http2
        );
        assert_eq!(
            UpstreamProtocol::resolve(Protocol::Auto, Version::HTTP_11),
            Http1
        );
        assert_eq!(
            UpstreamProtocol::resolve(Protocol::Grpc, Version::HTTP_11),
            Http2
        );
        assert_eq!(
            UpstreamProtocol::resolve(Protocol::Http1, Version::HTTP_2),
            Http1
        );
    }
}

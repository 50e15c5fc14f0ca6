//! The outbound side of mesh mTLS: HTTP/2 over TLS 1.3 to the destination's sidecar, one
//! multiplexed connection per (expected identity, endpoint), whatever the app spoke; and, for
//! opaque TCP, one TLS connection per app connection (ALPN `weft-tcp`, [`MeshClient::tunnel`]).
//!
//! The pool is keyed by the identity too, so a connection verified for one SPIFFE ID is never
//! reused for a destination that expects another. The original authority travels as
//! `:authority`; when the app spoke HTTP/1.1 the request carries [`APP_PROTOCOL_HEADER`] so the
//! inbound side can hand the app HTTP/1.1 again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pool::UpstreamBody;
use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Version};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::Identity;
use super::verify::{ALPN_H2, ALPN_TCP, ALPN_UPGRADE, client_config};
use crate::body::ProxyBody;
use crate::resilience::replay::RequestBody;
use crate::upstream::{UpstreamError, origin_uri, strip_hop_by_hop};

/// Tells the inbound sidecar which protocol the calling app spoke (only `http1` is sent).
pub const APP_PROTOCOL_HEADER: &str = "x-weft-app-protocol";

/// The SNI every sidecar sends to another: the inbound side tells mesh mTLS from an app's own
/// TLS by it.
pub const MESH_SNI: &str = "weft.mesh";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

type Key = (Arc<str>, Authority);
/// A client config per expected identity and ALPN protocol.
type ConfigKey = (Arc<str>, &'static [&'static [u8]]);

/// Shared by every outbound request; cheap to clone.
#[derive(Clone)]
pub struct MeshClient {
    identity: Arc<Identity>,
    conns: Arc<Mutex<HashMap<Key, SendRequest<RequestBody>>>>,
    configs: Arc<Mutex<HashMap<ConfigKey, Arc<ClientConfig>>>>,
}

impl std::fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClient").finish_non_exhaustive()
    }
}

impl MeshClient {
    pub fn new(identity: Arc<Identity>) -> Self {
        Self {
            identity,
            conns: Arc::default(),
            configs: Arc::default(),
        }
    }

    /// Sends `req` to the sidecar at `endpoint`, which must prove it is `expected`.
    pub async fn forward(
        &self,
        req: Request<crate::body::DownstreamBody>,
        endpoint: Authority,
        expected: Arc<str>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let resp = self.send(req.map(Into::into), endpoint, expected).await?;
        Ok(resp.map(ProxyBody::Upstream))
    }

    /// One attempt over mTLS, body streamed or replayed: what the resilience layer calls for a
    /// destination that has an identity.
    ///
    /// The request is rewritten before the future is made, which then holds it once (see
    /// `Forwarder::serve`).
    pub fn send(
        &self,
        req: Request<RequestBody>,
        endpoint: Authority,
        expected: Arc<str>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, UpstreamError>> {
        let downstream_version = req.version();
        let (mut parts, body) = req.into_parts();
        // HTTP/2 carries the authority as `:authority`; take it from Host when the app spoke
        // HTTP/1.1.
        let authority = parts.uri.authority().cloned().or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse().ok())
        });
        parts.headers.remove(header::HOST);
        strip_hop_by_hop(&mut parts.headers);
        if downstream_version != Version::HTTP_2 {
            parts
                .headers
                .insert(APP_PROTOCOL_HEADER, HeaderValue::from_static("http1"));
        }
        parts.uri = origin_uri(
            &parts.uri,
            Scheme::HTTPS,
            authority.unwrap_or_else(|| endpoint.clone()),
        );
        parts.version = Version::HTTP_2;
        let mut req = Request::from_parts(parts, body);
        let key: Key = (expected, endpoint);
        async move {
            // One retry when a pooled connection turned out to be closing before it took the
            // request (the request is handed back unsent, so nothing is replayed).
            for _ in 0..2 {
                let mut sender = self.sender(&key).await?;
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        let (mut parts, body) = resp.into_parts();
                        strip_hop_by_hop(&mut parts.headers);
                        parts.version = downstream_version;
                        return Ok(Response::from_parts(parts, UpstreamBody::new(body)));
                    }
                    Err(mut e) => {
                        self.forget(&key);
                        match e.take_message() {
                            Some(unsent) => req = unsent,
                            None => {
                                return Err(UpstreamError::Reset {
                                    endpoint: key.1.to_string(),
                                    cause: e.into_error().to_string(),
                                });
                            }
                        }
                    }
                }
            }
            Err(UpstreamError::Reset {
                endpoint: key.1.to_string(),
                cause: "connection closed before the request was sent".into(),
            })
        }
    }

    fn forget(&self, key: &Key) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    async fn sender(&self, key: &Key) -> Result<SendRequest<RequestBody>, UpstreamError> {
        {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            match conns.get(key) {
                Some(s) if !s.is_closed() => return Ok(s.clone()),
                Some(_) => {
                    conns.remove(key);
                }
                None => {}
            }
        }
        // Boxed: the TLS and HTTP/2 handshakes make a future of kilobytes, and every request's
        // future would otherwise carry (and move) that space although connecting is rare.
        let mut sender = Box::pin(self.connect(key)).await?;
        let _ = sender.ready().await;
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), sender.clone());
        Ok(sender)
    }

    fn config(&self, expected: &Arc<str>, alpn: &'static [&'static [u8]]) -> Arc<ClientConfig> {
        let mut configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        configs
            .entry((expected.clone(), alpn))
            .or_insert_with(|| client_config(self.identity.clone(), expected.clone(), alpn))
            .clone()
    }

    /// An mTLS connection to the sidecar in front of `dest` (which must prove it is
    /// `expected`) carrying one opaque TCP stream to `dest`'s port; not pooled.
    pub async fn tunnel(
        &self,
        dest: std::net::SocketAddr,
        expected: &Arc<str>,
    ) -> Result<TlsStream<TcpStream>, UpstreamError> {
        self.dedicated(dest, expected, &[ALPN_TCP]).await
    }

    /// An mTLS connection of its own to the sidecar in front of `dest` for one HTTP/1.1
    /// upgrade request: HTTP/1.1 (served as HTTP there), or an opaque stream to `dest`'s port
    /// with a sidecar that does not take HTTP/1.1 (the request then reaches the app as it is).
    pub async fn upgrade(
        &self,
        dest: std::net::SocketAddr,
        expected: &Arc<str>,
    ) -> Result<TlsStream<TcpStream>, UpstreamError> {
        self.dedicated(dest, expected, ALPN_UPGRADE).await
    }

    async fn dedicated(
        &self,
        dest: std::net::SocketAddr,
        expected: &Arc<str>,
        alpn: &'static [&'static [u8]],
    ) -> Result<TlsStream<TcpStream>, UpstreamError> {
        let endpoint = dest.to_string();
        tokio::time::timeout(CONNECT_TIMEOUT, self.handshake(&endpoint, expected, alpn))
            .await
            .map_err(|_| UpstreamError::Connect {
                endpoint,
                cause: format!("timed out after {CONNECT_TIMEOUT:?}"),
            })?
    }

    /// TCP connect and TLS handshake with `addr`, whose sidecar must prove it is `expected`
    /// and agree to one of `alpn`.
    async fn handshake(
        &self,
        addr: &str,
        expected: &Arc<str>,
        alpn: &'static [&'static [u8]],
    ) -> Result<TlsStream<TcpStream>, UpstreamError> {
        let fail = |cause: String| UpstreamError::Connect {
            endpoint: addr.to_owned(),
            cause,
        };
        let connector = TlsConnector::from(self.config(expected, alpn));
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        // The name is not checked (the SPIFFE ID is); it only fills SNI.
        let name = ServerName::try_from(MESH_SNI).expect("a valid DNS name");
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("mTLS handshake (expecting {expected}): {e}")))?;
        if !tls
            .get_ref()
            .1
            .alpn_protocol()
            .is_some_and(|p| alpn.contains(&p))
        {
            let offered: Vec<_> = alpn.iter().map(|p| String::from_utf8_lossy(p)).collect();
            return Err(fail(format!(
                "the peer did not negotiate {}",
                offered.join(" or ")
            )));
        }
        Ok(tls)
    }

    async fn connect(
        &self,
        (expected, endpoint): &Key,
    ) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let fail = |cause: String| UpstreamError::Connect {
            endpoint: endpoint.to_string(),
            cause,
        };
        let addr = format!("{}:{}", endpoint.host(), endpoint.port_u16().unwrap_or(443));
        let connect = async {
            let tls = self.handshake(&addr, expected, &[ALPN_H2]).await?;
            let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|e| fail(format!("HTTP/2 handshake: {e}")))?;
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                if let Err(error) = conn.await {
                    tracing::debug!(%endpoint, %error, "mesh connection ended with an error");
                }
            });
            Ok(sender)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| fail(format!("timed out after {CONNECT_TIMEOUT:?}")))?
    }
}

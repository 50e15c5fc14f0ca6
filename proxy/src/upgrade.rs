//! HTTP/1.1 upgrades (WebSocket) through the proxy's listeners: the request goes to one
//! endpoint on a connection of its own, keeping its `Connection: upgrade` and `Upgrade`
//! fields; a `101` answer joins the client's connection and that one into one byte stream,
//! any other answer is an ordinary response. No retries (an upgrade is not replayable).
//!
//! To a destination with an identity the connection is mTLS to its sidecar with ALPN
//! `http/1.1` (HTTP/2 between sidecars cannot carry an HTTP/1.1 upgrade): that sidecar serves
//! the request as HTTP (authorization with its HTTP rules, the caller's identity to the app),
//! then splices in its turn. A sidecar from before that answers with the opaque-stream ALPN,
//! which carries the same request bytes straight to its app.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::body::{DownstreamBody, ProxyBody};
use crate::h1::has_token;
use crate::pool::UpstreamBody;
use crate::resilience::call::Mtls;
use crate::upstream::{UpstreamError, strip_hop_by_hop};

/// Connect, handshake and the upstream's answer to the upgrade request, together.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP/1.1 request asking to switch protocols.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"upgrade"))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Sends the upgrade request `req` to `endpoint` (over mTLS when `mtls`, over TLS origination
/// when `tls`) and returns its answer;
/// after a `101` the two connections are spliced in a task of their own.
pub async fn forward(
    mut req: Request<DownstreamBody>,
    endpoint: Authority,
    mtls: Option<&Mtls>,
    tls: Option<&crate::origination::TlsConnector>,
) -> Result<Response<ProxyBody>, UpstreamError> {
    let downstream = hyper::upgrade::on(&mut req);
    let fail = |cause: String| UpstreamError::Reset {
        endpoint: endpoint.to_string(),
        cause,
    };
    let handshake = async {
        let io: Box<dyn Io> = match mtls {
            Some(m) => {
                let addr = endpoint
                    .as_str()
                    .parse()
                    .map_err(|_| UpstreamError::Connect {
                        endpoint: endpoint.to_string(),
                        cause: "an upgrade over mTLS needs an IP endpoint".into(),
                    })?;
                Box::new(m.client.upgrade(addr, &m.identity).await?)
            }
            None => {
                let tcp = TcpStream::connect(endpoint.as_str()).await.map_err(|e| {
                    UpstreamError::Connect {
                        endpoint: endpoint.to_string(),
                        cause: e.to_string(),
                    }
                })?;
                let _ = tcp.set_nodelay(true);
                match tls {
                    None => Box::new(tcp),
                    Some(t) => Box::new(t.handshake(tcp, endpoint.host()).await.map_err(|e| {
                        UpstreamError::Connect {
                            endpoint: endpoint.to_string(),
                            cause: e.to_string(),
                        }
                    })?),
                }
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| fail(format!("HTTP/1.1 handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                tracing::debug!(%error, "upgrade connection ended with an error");
            }
        });
        sender
            .send_request(prepare(req, &endpoint))
            .await
            .map_err(|e| fail(e.to_string()))
    };
    let mut resp = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| {
            fail(format!(
                "no answer to the upgrade within {HANDSHAKE_TIMEOUT:?}"
            ))
        })??;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(resp.map(|b| ProxyBody::Upstream(UpstreamBody::new(b))));
    }
    let upstream = hyper::upgrade::on(&mut resp);
    let target = endpoint.clone();
    tokio::spawn(async move {
        match tokio::join!(downstream, upstream) {
            (Ok(down), Ok(up)) => {
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                if let Err(error) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                    tracing::debug!(endpoint = %target, %error, "upgraded connection ended");
                }
            }
            (down, up) => tracing::debug!(
                endpoint = %target,
                downstream = ?down.err(),
                upstream = ?up.err(),
                "upgrade not completed"
            ),
        }
    });
    Ok(resp.map(|_| ProxyBody::empty()))
}

/// The request as the endpoint gets it: origin-form, `Host` kept (or taken from an
/// absolute-form URI), hop-by-hop fields dropped but for the upgrade's own.
fn prepare(req: Request<DownstreamBody>, endpoint: &Authority) -> Request<DownstreamBody> {
    let (mut parts, body) = req.into_parts();
    crate::upstream::authority_to_host(&mut parts);
    if !parts.headers.contains_key(header::HOST)
        && let Ok(host) = HeaderValue::from_str(endpoint.as_str())
    {
        parts.headers.insert(header::HOST, host);
    }
    // The proxy's one hop-by-hop rule, then the two fields this hop exists for, back.
    let upgrade = parts.headers.remove(header::UPGRADE);
    strip_hop_by_hop(&mut parts.headers);
    if let Some(upgrade) = upgrade {
        parts.headers.insert(header::UPGRADE, upgrade);
    }
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
    Request::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http11_requests_with_both_fields_upgrade() {
        let req = |version, connection: &str, upgrade: Option<&str>| {
            let mut b = Request::builder()
                .version(version)
                .header("connection", connection);
            if let Some(u) = upgrade {
                b = b.header("upgrade", u);
            }
            b.body(()).unwrap()
        };
        assert!(is_upgrade(&req(
            Version::HTTP_11,
            "keep-alive, Upgrade",
            Some("websocket")
        )));
        assert!(!is_upgrade(&req(
            Version::HTTP_11,
            "keep-alive",
            Some("websocket")
        )));
        assert!(!is_upgrade(&req(Version::HTTP_11, "upgrade", None)));
        assert!(!is_upgrade(&req(
            Version::HTTP_10,
            "upgrade",
            Some("websocket")
        )));
    }

    #[test]
    fn the_upgrade_fields_stay_and_the_uri_is_origin_form() {
        let req = Request::builder()
            .uri("http://ws.example:8080/chat?room=1")
            .header("connection", "Upgrade, keep-alive")
            .header("upgrade", "websocket")
            .header("keep-alive", "timeout=5")
            .header("expect", "100-continue")
            .header("sec-websocket-key", "k")
            .body(DownstreamBody::Empty)
            .unwrap();
        let out = prepare(req, &Authority::from_static("10.0.0.1:80"));
        assert_eq!(out.uri(), "/chat?room=1");
        let h = out.headers();
        assert_eq!(h["host"], "ws.example:8080");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "k");
        assert!(!h.contains_key("keep-alive") && !h.contains_key("expect"));
    }
}

//! TLS origination: the app speaks plain HTTP to its sidecar, the sidecar speaks TLS to the
//! service's endpoints (an external HTTPS API, say), verifying their certificate for the
//! configured server name against the configured CAs. The model and its validation are in
//! [`weft_proto::upstream_tls`].
//!
//! The connections live in the service's `hyper_util` client (pooled, HTTP/1.1 or, for an
//! `http2`/`grpc` service, HTTP/2 by ALPN), built from a [`TlsKey`] that is part of the
//! service's pool key: a config push that changes neither the settings nor the CA file's
//! contents keeps the warm connections; a rotated CA file gets new ones.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use weft_proto::model::Protocol;
use weft_proto::upstream_tls::UpstreamTls;

use crate::resilience::connector::{Conn, Connector};
use crate::resilience::timeout::BoxError;

const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// What a service's TLS client is built from; compared on every config push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsKey {
    /// `None`: each endpoint's own host.
    sni: Option<ServerName<'static>>,
    roots: Arc<Roots>,
    /// HTTP/2 (ALPN `h2`) for `http2` and `grpc` services, else HTTP/1.1.
    pub h2: bool,
}

impl TlsKey {
    /// Reads the CA file; the error names the file and the reason (the proxy NACKs with it).
    pub fn load(tls: &UpstreamTls, protocol: Protocol) -> Result<Self, String> {
        let roots = roots(tls.ca_file_or_default())?;
        let sni = tls
            .sni
            .as_deref()
            .map(|s| {
                ServerName::try_from(s.to_owned())
                    .map_err(|_| format!("{s:?} is not a server name"))
            })
            .transpose()?;
        Ok(Self {
            sni,
            roots,
            h2: matches!(protocol, Protocol::Http2 | Protocol::Grpc),
        })
    }

    fn client_config(&self) -> Arc<ClientConfig> {
        let mut cfg =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports TLS 1.2 and 1.3")
                .with_root_certificates(self.roots.store.clone())
                .with_no_client_auth();
        cfg.alpn_protocols = vec![if self.h2 { ALPN_H2 } else { ALPN_HTTP1 }.to_vec()];
        Arc::new(cfg)
    }
}

/// A CA file's certificates (what a [`TlsKey`] compares) and the trust store made of them (what
/// every client config of the services naming the file shares).
#[derive(Debug)]
struct Roots {
    certs: Vec<CertificateDer<'static>>,
    store: Arc<rustls::RootCertStore>,
}

impl PartialEq for Roots {
    fn eq(&self, other: &Self) -> bool {
        self.certs == other.certs
    }
}

impl Eq for Roots {}

/// The certificates of a CA file, parsed once per file contents and shared by every service
/// that names the file: the system bundle is ~140 certificates, and a config push re-reads it.
fn roots(file: &str) -> Result<Arc<Roots>, String> {
    type Cache = HashMap<String, (Vec<u8>, Arc<Roots>)>;
    static CACHE: Mutex<Option<Cache>> = Mutex::new(None);
    let pem = std::fs::read(file).map_err(|e| format!("cannot read CA file {file}: {e}"))?;
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some((bytes, roots)) = cache.get(file)
        && *bytes == pem
    {
        return Ok(roots.clone());
    }
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("CA file {file}: {e}"))?;
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs.iter().cloned());
    if added == 0 {
        return Err(format!("CA file {file} has no usable CA certificate"));
    }
    let roots = Arc::new(Roots {
        certs,
        store: Arc::new(store),
    });
    cache.insert(file.to_owned(), (pem, roots.clone()));
    Ok(roots)
}

/// Connects over the service's TCP connector (its connect timeout and connection cap), then
/// makes the TLS handshake within the same timeout.
#[derive(Clone)]
pub struct TlsConnector {
    tcp: Connector,
    tls: tokio_rustls::TlsConnector,
    sni: Option<ServerName<'static>>,
    timeout: Duration,
}

impl TlsConnector {
    pub fn new(tcp: Connector, key: &TlsKey, timeout: Duration) -> Self {
        Self {
            tcp,
            tls: tokio_rustls::TlsConnector::from(key.client_config()),
            sni: key.sni.clone(),
            timeout,
        }
    }

    /// The TLS handshake on `tcp`, a connection to `host` (verified as the server name unless
    /// the policy gives one), within the connect timeout. Also for upgraded connections, which
    /// bypass the pool.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        host: &str,
    ) -> Result<TlsStream<TcpStream>, OriginationError> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let sni = match &self.sni {
            Some(sni) => sni.clone(),
            None => ServerName::try_from(host.to_owned())
                .map_err(|_| OriginationError::NoServerName(host.to_owned()))?,
        };
        let server = sni.to_str().into_owned();
        match tokio::time::timeout(self.timeout, self.tls.connect(sni, tcp)).await {
            Err(_) => Err(OriginationError::Timeout(server)),
            Ok(Err(cause)) => Err(OriginationError::Handshake { server, cause }),
            Ok(Ok(stream)) => Ok(stream),
        }
    }
}

/// Why a TLS connection could not be made; the text is what the caller's 503 carries.
#[derive(Debug, thiserror::Error)]
pub enum OriginationError {
    #[error("{0:?} cannot be verified: set policy.tls.sni")]
    NoServerName(String),
    // `cause`, not `source`: the message carries it already, and error chains are printed.
    #[error("TLS handshake with {server} failed: {cause}")]
    Handshake { server: String, cause: io::Error },
    #[error("TLS handshake with {0} timed out")]
    Timeout(String),
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TlsConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.tcp, cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let host = dst.host().unwrap_or_default().to_owned();
        // The TCP connector takes plain `http` URIs: TLS is this connector's business.
        let mut tcp_dst = dst.into_parts();
        tcp_dst.scheme = Some(http::uri::Scheme::HTTP);
        let connecting = match Uri::from_parts(tcp_dst) {
            Ok(uri) => self.tcp.call(uri),
            Err(e) => return Box::pin(std::future::ready(Err(e.into()))),
        };
        let this = self.clone();
        Box::pin(async move {
            let (tcp, slot) = connecting.await?.into_parts();
            let stream = this.handshake(tcp, &host).await?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
            Ok(Conn::over(stream, slot, h2))
        })
    }
}

/// A TLS connection to an endpoint; gives its connection slot back when it closes.
pub type TlsConn = Conn<TlsStream<TcpStream>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(ca_file: &std::path::Path) -> UpstreamTls {
        UpstreamTls {
            sni: Some("api.example".into()),
            ca_file: Some(ca_file.to_str().unwrap().into()),
        }
    }

    /// A self-signed certificate for `name`, PEM.
    fn self_signed(name: &str) -> String {
        rcgen::CertificateParams::new(vec![name.into()])
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem()
    }

    #[test]
    fn the_ca_file_is_read_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = self_signed("ca.example");
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, &ca).unwrap();
        let key = TlsKey::load(&tls(&good), Protocol::Grpc).unwrap();
        assert!(key.h2);
        assert_eq!(key.roots.certs.len(), 1);
        assert_eq!(key.roots.store.len(), 1);
        let again = TlsKey::load(&tls(&good), Protocol::Grpc).unwrap();
        assert_eq!(key, again, "same file, same key");
        assert!(Arc::ptr_eq(&key.roots, &again.roots), "parsed once, shared");
        // A rotated file (other contents, same path) makes another key.
        let rotated = dir.path().join("rotated.pem");
        std::fs::write(&rotated, &ca).unwrap();
        let before = TlsKey::load(&tls(&rotated), Protocol::Grpc).unwrap();
        std::fs::write(&rotated, self_signed("ca2.example")).unwrap();
        let after = TlsKey::load(&tls(&rotated), Protocol::Grpc).unwrap();
        assert_ne!(before, after, "new contents, new key");
        assert!(!TlsKey::load(&tls(&good), Protocol::Auto).unwrap().h2);

        let missing = dir.path().join("nope.pem");
        let err = TlsKey::load(&tls(&missing), Protocol::Auto).unwrap_err();
        assert!(
            err.starts_with(&format!("cannot read CA file {}", missing.display())),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = TlsKey::load(&tls(&empty), Protocol::Auto).unwrap_err();
        assert!(err.contains("has no usable CA certificate"), "{err}");
    }
}

//! rustls glue for mesh mTLS: TLS 1.3 only, ring provider, ALPN h2 (HTTP) or weft-tcp
//! (an opaque TCP stream), no session resumption
//! (every connection verifies the peer's current certificate).
//!
//! Certificates carry no DNS names, only a SPIFFE ID in a URI SAN, so verification is done
//! here with webpki: the chain must lead to a root of the *current* trust bundle, be valid now,
//! and — on the client side — name exactly the identity the config expects for the
//! destination. The resolvers hand out the current certificate. Both read the
//! [`Identity`]'s `ArcSwap` on every handshake, which is what makes rotation seamless.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error,
    PeerIncompatible, ServerConfig, SignatureScheme,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::Identity;

/// The ALPN protocol sidecars speak to each other for HTTP (of any version the apps spoke).
pub const ALPN_H2: &[u8] = b"h2";
/// The ALPN protocol of an opaque TCP stream between sidecars: after the handshake the
/// connection carries the app's bytes as they are, to the port the client app dialled.
pub const ALPN_TCP: &[u8] = b"weft-tcp";
/// HTTP/1.1 between sidecars, for what HTTP/2 cannot carry: an upgrade (WebSocket). The
/// receiving sidecar serves it as HTTP (authorization, identity headers), then splices.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// What the inbound side takes, in its order of preference, which decides (rustls picks the
/// first of the server's that the client offers): a client offering HTTP/1.1 and the opaque
/// stream gets HTTP/1.1.
const SERVER_ALPN: &[&[u8]] = &[ALPN_H2, ALPN_HTTP1, ALPN_TCP];

/// What a sidecar offers for an upgrade: HTTP/1.1, or (a sidecar from before HTTP/1.1 between
/// sidecars) an opaque stream, which carries the same request bytes to the app.
pub const ALPN_UPGRADE: &[&[u8]] = &[ALPN_HTTP1, ALPN_TCP];

/// The SPIFFE ID in a certificate's URI SAN, if it has exactly one `spiffe://` URI.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = X509Certificate::from_der(cert).ok()?;
    let san = x509.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some((*uri).to_owned()),
        _ => None,
    });
    let id = ids.next()?;
    ids.next().is_none().then_some(id)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algs() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Verifies `end_entity` against the current bundle; returns its SPIFFE ID.
fn verify_chain(
    identity: &Identity,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<String, Error> {
    let creds = identity
        .current()
        .ok_or_else(|| Error::General("no trust bundle yet".into()))?;
    let cert = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    cert.verify_for_usage(
        algs().all,
        &creds.roots,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(|e| {
        Error::InvalidCertificate(match e {
            webpki::Error::CertExpired { .. } => CertificateError::Expired,
            webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
            webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
            other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
        })
    })?;
    spiffe_id_of(end_entity)
        .ok_or_else(|| Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
}

/// Client side: the server must be `expected`.
#[derive(Debug)]
struct ServerVerifier {
    identity: Arc<Identity>,
    expected: Arc<str>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let got = verify_chain(
            &self.identity,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if got != *self.expected {
            tracing::warn!(expected = %self.expected, got, "peer presented the wrong identity");
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algs().supported_schemes()
    }
}

/// Server side: any identity of the trust domain's bundle; who it is goes to the app.
#[derive(Debug)]
struct ClientVerifier {
    identity: Arc<Identity>,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify_chain(
            &self.identity,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )
        .inspect_err(|e| tracing::debug!(error = %e, "client certificate refused"))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algs().supported_schemes()
    }
}

/// Hands out the current certificate, on both sides.
#[derive(Debug)]
struct Resolver {
    identity: Arc<Identity>,
}

impl Resolver {
    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.identity.current().map(|c| c.key.clone())
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        self.identity.is_ready()
    }
}

/// The inbound listener's TLS config: client certificates required.
pub fn server_config(identity: Arc<Identity>) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(ClientVerifier {
            identity: identity.clone(),
        }))
        .with_cert_resolver(Arc::new(Resolver { identity }));
    cfg.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Arc::new(cfg)
}

/// The config for connections to a destination whose sidecars must be `expected`, offering
/// the ALPN protocols `alpn` (`[ALPN_H2]`, `[ALPN_TCP]` or [`ALPN_UPGRADE`]).
pub fn client_config(
    identity: Arc<Identity>,
    expected: Arc<str>,
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            identity: identity.clone(),
            expected,
        }))
        .with_client_cert_resolver(Arc::new(Resolver { identity }));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    use super::*;

    /// The ALPN protocol a client offering `client` gets from a server taking `server`, over a
    /// real (in-memory) TLS 1.3 handshake.
    fn negotiated(server: &[&[u8]], client: &[&[u8]]) -> Option<Vec<u8>> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![MESH_NAME.into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut scfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        scfg.alpn_protocols = server.iter().map(|p| p.to_vec()).collect();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let mut ccfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        ccfg.alpn_protocols = client.iter().map(|p| p.to_vec()).collect();
        let name = ServerName::try_from(MESH_NAME).unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(ccfg), name).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(scfg)).unwrap();
        let mut buf = Vec::new();
        for _ in 0..8 {
            buf.clear();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            buf.clear();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
            if !c.is_handshaking() && !s.is_handshaking() {
                return c.alpn_protocol().map(<[u8]>::to_vec);
            }
        }
        panic!("the handshake did not finish");
    }

    const MESH_NAME: &str = "weft.mesh";

    #[test]
    fn an_upgrade_gets_http1_and_a_sidecar_from_before_it_the_opaque_stream() {
        assert_eq!(
            negotiated(SERVER_ALPN, ALPN_UPGRADE).as_deref(),
            Some(ALPN_HTTP1)
        );
        // An inbound side that knows only HTTP/2 and opaque streams.
        let before: &[&[u8]] = &[ALPN_H2, ALPN_TCP];
        assert_eq!(negotiated(before, ALPN_UPGRADE).as_deref(), Some(ALPN_TCP));
        // What the other connections offer is unchanged by the new protocol.
        assert_eq!(
            negotiated(SERVER_ALPN, &[ALPN_H2]).as_deref(),
            Some(ALPN_H2)
        );
        assert_eq!(
            negotiated(SERVER_ALPN, &[ALPN_TCP]).as_deref(),
            Some(ALPN_TCP)
        );
    }
}

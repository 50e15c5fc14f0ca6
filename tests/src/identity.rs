//! Harness for the identity tests: an app that echoes the request headers it received, a
//! static JSON server (JWKS), bootstrap tokens from the control plane, a mesh of sidecars with
//! workload identities, and a raw rustls + HTTP/2 client that presents whatever certificate a
//! test gives it (none, self-signed, another CA's, expired, the mesh CA's).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::http::{HttpClient, Reply};
use crate::procs::{ControlPlane, Proxy, ProxyOpts};

/// An HTTP app answering every request with a JSON object of what it received: `headers`
/// (name → value), `version` and `path`.
pub struct HeaderApp {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HeaderApp {
    pub async fn start() -> HeaderApp {
        Self::serve(|req: &Request<Incoming>| {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
                    )
                })
                .collect();
            serde_json::json!({
                "headers": headers,
                "version": format!("{:?}", req.version()),
                "path": req.uri().path(),
            })
            .to_string()
        })
        .await
    }

    /// Serves a fixed body (e.g. a JWKS document) on every path.
    pub async fn fixed(body: String) -> HeaderApp {
        Self::serve(move |_| body.clone()).await
    }

    /// Serves the body `f` makes of each request, as JSON.
    pub async fn serve(
        f: impl Fn(&Request<Incoming>) -> String + Send + Sync + 'static,
    ) -> HeaderApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("app addr");
        let f = Arc::new(f);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let f = f.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |mut req: Request<Incoming>| {
                        if req.uri().path() == ECHO_UPGRADE_PATH {
                            return std::future::ready(Ok::<_, Infallible>(echo_upgrade(&mut req)));
                        }
                        let body = f(&req);
                        std::future::ready(Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .expect("response"),
                        ))
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        HeaderApp { addr, task }
    }
}

/// The path where a [`HeaderApp`] switches protocols for an upgrade request, then echoes every
/// byte; the `101` carries the identity header it received as `x-seen-peer-identity`.
pub const ECHO_UPGRADE_PATH: &str = "/ws/echo";

fn echo_upgrade(req: &mut Request<Incoming>) -> Response<Full<Bytes>> {
    let seen = req
        .headers()
        .get("x-weft-peer-identity")
        .cloned()
        .unwrap_or_else(|| http::HeaderValue::from_static("-"));
    let upgraded = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgraded.await {
            let mut io = TokioIo::new(upgraded);
            let (mut r, mut w) = tokio::io::split(&mut io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    Response::builder()
        .status(http::StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("x-seen-peer-identity", seen)
        .body(Full::new(Bytes::new()))
        .expect("response")
}

impl Drop for HeaderApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTPS server outside the mesh (an external API): a certificate for `name` signed by a CA
/// of its own (`ca_pem`), its validity ended an hour ago when `expired`. Answers every request
/// with JSON `{sni, host, path, version}` (`sni`: the server name the client sent) and echoes
/// upgrades on [`ECHO_UPGRADE_PATH`] as [`HeaderApp`] does. ALPN h2 and http/1.1.
pub struct HttpsApp {
    pub addr: SocketAddr,
    pub ca_pem: String,
    task: JoinHandle<()>,
}

impl HttpsApp {
    pub async fn start(name: &str, expired: bool) -> HttpsApp {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(vec![]).expect("ca params");
        // A name of its own: two test CAs must not look like one with a bad signature.
        static CAS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = CAS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA {n}"));
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("key");
        let mut leaf = CertificateParams::new(vec![name.to_owned()]).expect("leaf params");
        let now = SystemTime::now();
        let (from, until) = if expired {
            (
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
        } else {
            (
                now - Duration::from_secs(60),
                now + Duration::from_secs(3600),
            )
        };
        (leaf.not_before, leaf.not_after) = (from.into(), until.into());
        let leaf = leaf.signed_by(&key, &issuer).expect("leaf");
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server cert");
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind https");
        let addr = listener.local_addr().expect("https addr");
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().unwrap_or("").to_owned();
                    let svc = service_fn(move |mut req: Request<Incoming>| {
                        if req.uri().path() == ECHO_UPGRADE_PATH {
                            return std::future::ready(Ok::<_, Infallible>(echo_upgrade(&mut req)));
                        }
                        let body = serde_json::json!({
                            "sni": sni,
                            "host": req.headers().get("host").and_then(|h| h.to_str().ok()),
                            "path": req.uri().path(),
                            "version": format!("{:?}", req.version()),
                        });
                        std::future::ready(Ok(Response::new(Full::new(Bytes::from(
                            body.to_string(),
                        )))))
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        HttpsApp {
            addr,
            ca_pem: ca_cert.pem(),
            task,
        }
    }
}

impl Drop for HttpsApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A bootstrap token for `ns/sa` from the control plane's admin API, written to a file.
pub async fn token_file(cp: &ControlPlane, dir: &Path, ns: &str, sa: &str) -> String {
    let (status, body) = HttpClient::http1()
        .post_json(
            cp.admin,
            "/api/v1/identity/token",
            &serde_json::json!({"namespace": ns, "service_account": sa}),
        )
        .await
        .expect("token request");
    assert!(status.is_success(), "token for {ns}/{sa}: {status} {body}");
    let path = dir.join(format!("{ns}-{sa}.token"));
    std::fs::write(&path, body["token"].as_str().expect("token")).expect("write token");
    path.display().to_string()
}

/// Starts a sidecar with a workload identity (`ns/sa`); returns once it is ready, i.e. has a
/// config and a certificate.
pub async fn identity_proxy(
    cp: &ControlPlane,
    dir: &Path,
    name: &str,
    service: &str,
    (ns, sa): (&str, &str),
    app: Option<SocketAddr>,
) -> Proxy {
    let token = token_file(cp, dir, ns, sa).await;
    Proxy::start(
        dir,
        name,
        ProxyOpts {
            control_plane: Some(cp.grpc),
            app_addr: app,
            service: service.into(),
            extra_args: vec![
                "--namespace".into(),
                ns.into(),
                "--service-account".into(),
                sa.into(),
                "--identity-token-file".into(),
                token,
            ],
            ..ProxyOpts::default()
        },
    )
    .await
}

/// A mesh with `reviews` at `endpoint` and `security` (YAML, indented for a service) on it.
pub fn reviews_mesh(endpoint: SocketAddr, security: &str) -> String {
    format!(
        r#"services:
  - name: reviews
    endpoints: [{{address: "{endpoint}"}}]
    security:
{security}
routes:
  - name: reviews
    hosts: [reviews]
    rules:
      - backends: [{{service: reviews}}]
"#
    )
}

/// The mesh CA's root key and certificate, as the control plane persisted them in its state
/// dir — a test uses them to mint certificates the CA would never issue (e.g. expired ones).
pub fn mesh_ca(state_dir: &Path) -> Issuer<'static, KeyPair> {
    let cert = std::fs::read_to_string(state_dir.join("ca/root.pem")).expect("root.pem");
    let key = std::fs::read_to_string(state_dir.join("ca/root-key.pem")).expect("root-key.pem");
    Issuer::from_ca_cert_pem(&cert, KeyPair::from_pem(&key).expect("key")).expect("issuer")
}

/// Which client certificate a [`tls_client`] presents.
pub enum ClientCert<'a> {
    None,
    SelfSigned,
    /// Signed by a CA the mesh does not trust.
    OtherCa,
    /// Signed by `issuer`, for `spiffe_id`, valid from..until (relative to now).
    SignedBy {
        issuer: &'a Issuer<'static, KeyPair>,
        spiffe_id: &'a str,
        expired: bool,
    },
}

fn leaf(spiffe_id: &str, expired: bool) -> (CertificateParams, KeyPair) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("uri"))];
    let now = SystemTime::now();
    if expired {
        p.not_before = (now - Duration::from_secs(7200)).into();
        p.not_after = (now - Duration::from_secs(3600)).into();
    } else {
        p.not_before = (now - Duration::from_secs(60)).into();
        p.not_after = (now + Duration::from_secs(3600)).into();
    }
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    (p, key)
}

/// A TLS 1.3 client config with ALPN h2 that presents `cert` and accepts any server (the
/// server side is not under test here).
pub fn tls_client(cert: ClientCert<'_>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let id = "spiffe://weft.local/ns/default/sa/tester";
    let chain = match cert {
        ClientCert::None => None,
        ClientCert::SelfSigned => {
            let (p, key) = leaf(id, false);
            Some((p.self_signed(&key).expect("self-signed"), key))
        }
        ClientCert::OtherCa => {
            let ca_key = KeyPair::generate().expect("key");
            let mut ca = CertificateParams::default();
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let issuer = Issuer::new(ca, ca_key);
            let (p, key) = leaf(id, false);
            Some((p.signed_by(&key, &issuer).expect("signed"), key))
        }
        ClientCert::SignedBy {
            issuer,
            spiffe_id,
            expired,
        } => {
            let (p, key) = leaf(spiffe_id, expired);
            Some((p.signed_by(&key, issuer).expect("signed"), key))
        }
    };
    let mut cfg = match chain {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("client cert"),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// GET over TLS + HTTP/2 to `addr` with `cfg`. Returns the negotiated reply, or the error of
/// whichever step failed (handshake, HTTP/2 preface, request).
pub async fn tls_get(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    authority: &str,
    path: &str,
) -> anyhow::Result<Reply> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("weft.mesh")?.to_owned();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(format!("https://{authority}{path}"))
        .body(http_body_util::Empty::<Bytes>::new())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await??;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    })
}

#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

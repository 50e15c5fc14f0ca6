//! The sidecar injector's HTTPS endpoint: `POST /inject` with an AdmissionReview v1 body,
//! answered by [`crate::inject::review`], over TLS (the Kubernetes API server only calls
//! webhooks over HTTPS).
//!
//! The serving certificate comes from `--webhook-cert`/`--webhook-key` (PEM files, e.g. a
//! cert-manager Secret mounted into the pod), or, without them, is issued at start by the
//! control plane's own CA for the service's DNS names (`--webhook-host`); the
//! MutatingWebhookConfiguration's `caBundle` is then the CA bundle
//! (`GET /api/v1/identity/bundle` on the admin port).
//!
//! Hostile input: bodies are capped at [`MAX_BODY_BYTES`] (413 beyond), a body that is not
//! an AdmissionReview gets 400 with the reason as `{"error": ...}`, a review whose pod cannot
//! be injected gets an AdmissionReview that refuses it with the reason; nothing panics the
//! server (a panic would only end that one connection's task).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::ca::{Ca, CaError};
use crate::inject::{self, InjectConfig, review};
use crate::shutdown::Shutdown;

/// The path the MutatingWebhookConfiguration calls (`deploy/base/webhook.yaml`).
pub const PATH: &str = "/inject";
/// Largest AdmissionReview accepted. A pod is bounded by etcd's 1.5 MiB request limit; the
/// review wraps it (object, oldObject) with some slack.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Time a client has for the TLS handshake and for each request head.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The DNS names the default serving certificate is issued for: the `weft-control` Service in
/// `weft-system`, as the API server dials it, plus loopback for tests and port-forwards.
pub fn default_hosts() -> Vec<String> {
    [
        "weft-control",
        "weft-control.weft-system",
        "weft-control.weft-system.svc",
        "weft-control.weft-system.svc.cluster.local",
        "localhost",
        "127.0.0.1",
    ]
    .map(String::from)
    .to_vec()
}

/// The `weft-control` flags of the webhook listener.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Address of the sidecar injector's HTTPS endpoint (POST /inject); "off" to not serve it.
    #[arg(long, value_name = "ADDR|off", default_value = "127.0.0.1:15017", value_parser = parse_addr)]
    pub webhook_addr: MaybeAddr,
    /// Serving certificate chain of the endpoint (PEM); without it the CA issues one for
    /// --webhook-host.
    #[arg(long, value_name = "FILE", requires = "webhook_key")]
    pub webhook_cert: Option<PathBuf>,
    /// Private key of --webhook-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "webhook_cert")]
    pub webhook_key: Option<PathBuf>,
    /// DNS name or IP of the CA-issued serving certificate; repeatable. Default: the
    /// weft-control Service's names in weft-system, localhost and 127.0.0.1.
    #[arg(long = "webhook-host", value_name = "NAME")]
    pub webhook_hosts: Vec<String>,
    /// Image of the proxy container the injector adds.
    #[arg(long, value_name = "IMAGE", default_value = inject::DEFAULT_PROXY_IMAGE, value_parser = parse_image)]
    pub inject_proxy_image: String,
    /// Image of the init container the injector adds (weft-proxy and the iptables tools).
    #[arg(long, value_name = "IMAGE", default_value = inject::DEFAULT_INIT_IMAGE, value_parser = parse_image)]
    pub inject_init_image: String,
    /// The control plane's gRPC address as injected proxies dial it (http:// or https://).
    #[arg(long, value_name = "URL", default_value = inject::DEFAULT_CONTROL_PLANE, value_parser = parse_control_plane)]
    pub inject_control_plane: String,
    /// Inject the legacy sidecar (first container and a postStart hook) unless a pod asks for a
    /// native one; for clusters without native sidecars (Kubernetes < 1.29).
    #[arg(long)]
    pub inject_legacy_sidecar: bool,
    /// UID the injected proxy runs as; the init container exempts its traffic from capture.
    #[arg(long, value_name = "UID", default_value_t = inject::DEFAULT_PROXY_UID, value_parser = parse_uid)]
    pub inject_proxy_uid: u32,
}

fn parse_image(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!("{s:?} is not an image reference"));
    }
    Ok(s.to_owned())
}

fn parse_control_plane(s: &str) -> Result<String, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(s.to_owned()),
        _ => Err(format!("{s:?}: give http://HOST:PORT or https://HOST:PORT")),
    }
}

fn parse_uid(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("0 is root: the proxy's traffic must be told apart from the app's".into()),
        Ok(uid) => Ok(uid),
        Err(e) => Err(format!("{s:?} is not a UID: {e}")),
    }
}

impl WebhookArgs {
    pub fn options(&self) -> Option<WebhookOptions> {
        Some(WebhookOptions {
            addr: self.webhook_addr.0?,
            cert: self.webhook_cert.clone(),
            key: self.webhook_key.clone(),
            hosts: if self.webhook_hosts.is_empty() {
                default_hosts()
            } else {
                self.webhook_hosts.clone()
            },
            inject: InjectConfig {
                proxy_image: self.inject_proxy_image.clone(),
                init_image: self.inject_init_image.clone(),
                control_plane: self.inject_control_plane.clone(),
                native_sidecar: !self.inject_legacy_sidecar,
                proxy_uid: self.inject_proxy_uid,
            },
        })
    }
}

/// An address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaybeAddr(pub Option<SocketAddr>);

fn parse_addr(s: &str) -> Result<MaybeAddr, String> {
    if s == "off" {
        return Ok(MaybeAddr(None));
    }
    s.parse()
        .map(|a| MaybeAddr(Some(a)))
        .map_err(|e| format!("expected ADDR (e.g. 0.0.0.0:15017) or off: {e}"))
}

/// How the webhook listener is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookOptions {
    pub addr: SocketAddr,
    /// Serving certificate chain and key (PEM); both or neither.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Names of the certificate issued by the CA when no files are given.
    pub hosts: Vec<String>,
    pub inject: InjectConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot read the webhook {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the webhook {what} {path} holds no usable PEM {what}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("webhook serving certificate from the CA: {0}")]
    Issue(#[from] CaError),
    #[error("webhook TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The TLS configuration of the endpoint: from the files, or issued by `ca`.
pub fn tls_config(
    opts: &WebhookOptions,
    ca: &Ca,
) -> Result<Arc<rustls::ServerConfig>, WebhookError> {
    let (chain, key) = match (&opts.cert, &opts.key) {
        (Some(cert), Some(key)) => (read(cert, "certificate")?, read(key, "key")?),
        _ => {
            let id = ca.spiffe_id("weft-system", "weft-control");
            ca.issue_server(&id, &opts.hosts)?
        }
    };
    let pem_err = |what, path: &Option<PathBuf>, reason: String| WebhookError::Pem {
        what,
        path: path.clone().unwrap_or_else(|| "(issued by the CA)".into()),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err("certificate", &opts.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err(
            "certificate",
            &opts.cert,
            "no CERTIFICATE block".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| pem_err("key", &opts.key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read(path: &PathBuf, what: &'static str) -> Result<String, WebhookError> {
    std::fs::read_to_string(path).map_err(|source| WebhookError::Read {
        what,
        path: path.clone(),
        source,
    })
}

/// Serves the endpoint on `listener` until `shutdown`. Connections in progress at shutdown
/// are dropped with the runtime (an admission call is retried by the API server).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    inject: InjectConfig,
    shutdown: Shutdown,
) {
    let acceptor = TlsAcceptor::from(tls);
    let inject = Arc::new(inject);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => return,
        };
        let (acceptor, builder, inject) = (acceptor.clone(), builder.clone(), inject.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    return tracing::debug!(%peer, %error, "webhook TLS handshake failed");
                }
                Err(_) => return tracing::debug!(%peer, "webhook TLS handshake timed out"),
            };
            let service = service_fn(move |req| {
                let inject = inject.clone();
                async move { Ok::<_, Infallible>(handle(req, &inject).await) }
            });
            if let Err(error) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, %error, "webhook connection ended with an error");
            }
        });
    }
}

/// One request: `POST /inject` with an AdmissionReview, anything else an error that names
/// what was wrong.
pub async fn handle(req: Request<Incoming>, inject: &InjectConfig) -> Response<Full<Bytes>> {
    if req.uri().path() != PATH {
        return error(
            StatusCode::NOT_FOUND,
            format!("no such path; the injector is POST {PATH}"),
        );
    }
    if req.method() != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, format!("{PATH} takes POST"));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("AdmissionReview larger than {MAX_BODY_BYTES} bytes"),
            );
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            );
        }
    };
    match review(&body, inject) {
        Ok(answer) => json(StatusCode::OK, &answer),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

fn error(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        webhook: WebhookArgs,
    }

    fn inject(args: &[&str]) -> Result<InjectConfig, String> {
        let argv = std::iter::once("weft-control").chain(args.iter().copied());
        let flags = Flags::try_parse_from(argv).map_err(|e| e.to_string())?;
        Ok(flags.webhook.options().expect("the webhook is on").inject)
    }

    #[test]
    fn what_the_injector_adds_is_set_by_flags() {
        assert_eq!(inject(&[]).unwrap(), InjectConfig::default());
        let cfg = inject(&[
            "--inject-proxy-image=registry.example/weft-proxy:1.2",
            "--inject-init-image=registry.example/weft-init:1.2",
            "--inject-control-plane=https://weft-control.mesh.svc:15010",
            "--inject-legacy-sidecar",
            "--inject-proxy-uid=2000",
        ])
        .unwrap();
        assert_eq!(
            cfg,
            InjectConfig {
                proxy_image: "registry.example/weft-proxy:1.2".into(),
                init_image: "registry.example/weft-init:1.2".into(),
                control_plane: "https://weft-control.mesh.svc:15010".into(),
                native_sidecar: false,
                proxy_uid: 2000,
            }
        );
        for (flag, reason) in [
            ("--inject-proxy-image=", "not an image reference"),
            ("--inject-init-image=a b", "not an image reference"),
            (
                "--inject-control-plane=weft-control:15010",
                "give http://HOST:PORT",
            ),
            ("--inject-control-plane=ftp://x:1", "give http://HOST:PORT"),
            ("--inject-proxy-uid=0", "0 is root"),
        ] {
            let err = inject(&[flag]).unwrap_err();
            let name = flag.split('=').next().unwrap();
            assert!(err.contains(name) && err.contains(reason), "{flag}: {err}");
        }
    }
}

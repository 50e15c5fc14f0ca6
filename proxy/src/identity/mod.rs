//! Workload identity: this proxy's SPIFFE certificate, obtained from the control plane's CA and
//! renewed before it expires.
//!
//! The key pair is generated here, in memory, and never leaves the process: the control plane
//! only ever sees a CSR and the bootstrap token that proves which service account we are. The
//! current [`Credentials`] (certificate chain, key, trust bundle) sit in an `ArcSwap`; every
//! TLS handshake reads them afresh ([`verify`]), so a renewal or a new root applies to new
//! connections at once while established ones keep the credentials they started with.

pub mod mesh;
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rustls::pki_types::TrustAnchor;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use serde_json::json;
use weft_proto::identity_pb::CertifyRequest;
use weft_proto::identity_pb::identity_service_client::IdentityServiceClient;

/// First retry delay after a failed certification; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const CERTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// Roots to verify an `https://` control plane with (`--control-plane-ca`); set once at start.
static CONTROL_PLANE_CA: std::sync::OnceLock<tonic::transport::Certificate> =
    std::sync::OnceLock::new();

pub fn set_control_plane_ca(pem: String) {
    let _ = CONTROL_PLANE_CA.set(tonic::transport::Certificate::from_pem(pem));
}

/// `endpoint` with TLS when its URL is `https://`: the control plane must present a
/// certificate from `--control-plane-ca`.
pub fn control_plane_tls(
    endpoint: tonic::transport::Endpoint,
) -> Result<tonic::transport::Endpoint, String> {
    if endpoint.uri().scheme_str() != Some("https") {
        return Ok(endpoint);
    }
    let ca = CONTROL_PLANE_CA
        .get()
        .ok_or("an https:// control plane needs --control-plane-ca")?;
    let host = endpoint.uri().host().unwrap_or("localhost").to_owned();
    endpoint
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(ca.clone())
                .domain_name(host),
        )
        .map_err(|e| format!("control plane TLS: {e}"))
}

/// How this proxy obtains its identity (`--service-account` and friends).
#[derive(Debug, Clone)]
pub struct IdentityOptions {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    pub token_file: PathBuf,
    /// The control planes to ask, in order (the config-stream URLs).
    pub control_plane: Vec<String>,
}

impl IdentityOptions {
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read the identity token {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("Certify at {address} failed: {reason}")]
    Certify { address: String, reason: String },
    #[error("the CA's answer is unusable: {0}")]
    Answer(String),
}

/// One generation of credentials: immutable, swapped as a whole.
pub struct Credentials {
    pub spiffe_id: String,
    pub key: Arc<CertifiedKey>,
    pub roots: Vec<TrustAnchor<'static>>,
    pub not_after_unix_ms: u64,
    pub issued_at_unix_ms: u64,
    /// Bumped on every renewal; `/config` shows it.
    pub generation: u64,
    bundle_pem: Vec<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after_unix_ms", &self.not_after_unix_ms)
            .finish_non_exhaustive()
    }
}

/// Shared by the TLS configs (read on every handshake), the renewal task (write) and the admin
/// port (read).
#[derive(Debug, Default)]
pub struct Identity {
    current: ArcSwapOption<Credentials>,
    renewals: AtomicU64,
    failures: AtomicU64,
}

impl Identity {
    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let c = self.current.load();
        json!({
            "spiffe_id": c.as_ref().map(|c| c.spiffe_id.clone()),
            "not_after_unix_ms": c.as_ref().map(|c| c.not_after_unix_ms),
            "issued_at_unix_ms": c.as_ref().map(|c| c.issued_at_unix_ms),
            "generation": c.as_ref().map_or(0, |c| c.generation),
            "trust_roots": c.as_ref().map_or(0, |c| c.roots.len()),
            "renewals": self.renewals.load(Ordering::Relaxed),
            "failures": self.failures.load(Ordering::Relaxed),
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Keeps `identity` certified: certify now, then again at half the lifetime, with exponential
/// backoff on failure. Runs until the task is dropped.
pub async fn run(opts: IdentityOptions, identity: Arc<Identity>) {
    let mut backoff = MIN_BACKOFF;
    let mut attempt = 0usize;
    loop {
        let address = &opts.control_plane[attempt % opts.control_plane.len()];
        match certify(&opts, address, identity.current().as_deref()).await {
            Ok(creds) => {
                let lifetime = creds
                    .not_after_unix_ms
                    .saturating_sub(creds.issued_at_unix_ms);
                let roots_changed = identity
                    .current()
                    .is_some_and(|old| old.bundle_pem != creds.bundle_pem);
                tracing::info!(
                    spiffe_id = creds.spiffe_id,
                    not_after_unix_ms = creds.not_after_unix_ms,
                    generation = creds.generation,
                    roots_changed,
                    "workload certificate installed"
                );
                identity.current.store(Some(Arc::new(creds)));
                identity.renewals.fetch_add(1, Ordering::Relaxed);
                backoff = MIN_BACKOFF;
                tokio::time::sleep(Duration::from_millis(lifetime / 2)).await;
            }
            Err(error) => {
                identity.failures.fetch_add(1, Ordering::Relaxed);
                attempt += 1;
                tracing::warn!(%error, retry_in = ?backoff, "cannot get a workload certificate");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn certify(
    opts: &IdentityOptions,
    address: &str,
    previous: Option<&Credentials>,
) -> Result<Credentials, IdentityError> {
    // Read every time: the token file may be rotated (a projected token is).
    let token =
        std::fs::read_to_string(&opts.token_file).map_err(|source| IdentityError::Token {
            path: opts.token_file.clone(),
            source,
        })?;
    let spiffe_id = opts.spiffe_id();
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.as_str().try_into()?)];
    let csr_pem = params.serialize_request(&key)?.pem()?;

    let err = |reason: String| IdentityError::Certify {
        address: address.to_owned(),
        reason,
    };
    let call = async {
        let endpoint = tonic::transport::Endpoint::from_shared(address.to_owned())
            .map_err(|e| err(e.to_string()))?;
        let channel = control_plane_tls(endpoint)
            .map_err(err)?
            .connect()
            .await
            .map_err(|e| err(format!("{e:?}")))?;
        let mut client = IdentityServiceClient::new(channel);
        client
            .certify(CertifyRequest {
                csr_pem,
                token: token.trim().to_owned(),
            })
            .await
            .map_err(|s| err(format!("{:?}: {}", s.code(), s.message())))
    };
    let answer = tokio::time::timeout(CERTIFY_TIMEOUT, call)
        .await
        .map_err(|_| err(format!("no answer within {CERTIFY_TIMEOUT:?}")))??
        .into_inner();

    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(answer.cert_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| IdentityError::Answer(format!("certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(IdentityError::Answer("empty certificate chain".into()));
    }
    let mut roots = Vec::new();
    for pem in &answer.trust_bundle_pem {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| IdentityError::Answer(format!("trust bundle: {e}")))?;
        let anchor = webpki::anchor_from_trusted_cert(&der)
            .map_err(|e| IdentityError::Answer(format!("trust bundle: {e}")))?
            .to_owned();
        roots.push(anchor);
    }
    if roots.is_empty() {
        return Err(IdentityError::Answer("empty trust bundle".into()));
    }
    let got = verify::spiffe_id_of(&chain[0]);
    if got.as_deref() != Some(spiffe_id.as_str()) {
        return Err(IdentityError::Answer(format!(
            "certificate is for {got:?}, asked for {spiffe_id:?}"
        )));
    }
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|e| IdentityError::Answer(format!("key: {e}")))?;
    Ok(Credentials {
        spiffe_id,
        key: Arc::new(CertifiedKey::new(chain, signing)),
        roots,
        not_after_unix_ms: answer.not_after_unix_ms,
        issued_at_unix_ms: now_ms(),
        generation: previous.map_or(1, |p| p.generation + 1),
        bundle_pem: answer.trust_bundle_pem,
    })
}

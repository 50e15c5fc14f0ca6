//! `weft.identity.v1.IdentityService/Certify`: a proxy proves who it is and gets a workload
//! certificate for exactly that identity.
//!
//! The proof is checked by an [`Authenticator`]: [`BootstrapTokens`], a token per (namespace,
//! service account) that the control plane derives with an HMAC over a secret only it holds
//! (`weftctl token` prints one); and with `--kubernetes` also the pod's projected
//! service-account token, which the API server reviews ([`crate::tokenreview`]). [`Proofs`]
//! tells the two apart by their shape.

use std::path::Path;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use base64::Engine as _;
use futures_util::future::BoxFuture;
use ring::hmac;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use weft_proto::identity_pb::identity_service_server::{IdentityService, IdentityServiceServer};
use weft_proto::identity_pb::{CertifyRequest, CertifyResponse};

use crate::ca::{Ca, CaError, unix_ms};

/// Who a proof says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadId {
    pub namespace: String,
    pub service_account: String,
}

/// Why a proof was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

/// Checks a proof of identity.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<WorkloadId, AuthError>>;
}

/// The proofs a control plane takes: bootstrap tokens always, service-account tokens when it
/// has an API server to review them.
#[derive(Debug, Clone)]
pub struct Proofs {
    pub bootstrap: Arc<BootstrapTokens>,
    pub review: Option<crate::tokenreview::TokenReviewer>,
}

impl Authenticator for Proofs {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<WorkloadId, AuthError>> {
        if token.trim().starts_with(TOKEN_PREFIX) {
            return self.bootstrap.authenticate(token);
        }
        match &self.review {
            Some(review) => Box::pin(review.review(token)),
            None => Box::pin(std::future::ready(Err(AuthError(
                "not a weft bootstrap token (weft1:…); service-account tokens are reviewed only \
                 with --kubernetes"
                    .into(),
            )))),
        }
    }
}

/// Tokens `weft1:<namespace>:<service-account>:<base64url HMAC-SHA256>` under a secret kept in
/// etcd (`<prefix>/ca/token-secret`, one for every replica), else in
/// `--state-dir/ca/token-secret`, else in memory.
pub struct BootstrapTokens {
    key: hmac::Key,
}

impl std::fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootstrapTokens { .. }")
    }
}

const TOKEN_PREFIX: &str = "weft1";

impl BootstrapTokens {
    pub fn open(state_dir: Option<&Path>) -> Result<Self, CaError> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let path = state_dir.map(|d| d.join("ca/token-secret"));
        let secret = match &path {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(p).map_err(|source| CaError::Read {
                    path: p.clone(),
                    source,
                })?;
                b64.decode(text.trim()).map_err(|e| CaError::Invalid {
                    what: p.display().to_string(),
                    reason: e.to_string(),
                })?
            }
            _ => {
                let s = Self::new_secret()?;
                if let Some(p) = &path {
                    let err = |source| CaError::Write {
                        path: p.clone(),
                        source,
                    };
                    std::fs::create_dir_all(p.parent().expect("joined path")).map_err(err)?;
                    std::fs::write(p, b64.encode(&s)).map_err(err)?;
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::PermissionsExt as _;
                        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                            .map_err(err)?;
                    }
                }
                s
            }
        };
        Ok(Self::from_secret(&secret))
    }

    /// Tokens under `secret` (shared by every replica through etcd).
    pub fn from_secret(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// 32 random bytes for a new secret.
    pub fn new_secret() -> Result<Vec<u8>, CaError> {
        let mut s = vec![0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s).map_err(|_| {
            CaError::Invalid {
                what: "token secret".into(),
                reason: "the OS random source failed".into(),
            }
        })?;
        Ok(s)
    }

    fn message(namespace: &str, service_account: &str) -> String {
        format!("{TOKEN_PREFIX}:{namespace}:{service_account}")
    }

    /// The token for one service account.
    pub fn issue(&self, namespace: &str, service_account: &str) -> Result<String, AuthError> {
        for (what, v) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if v.is_empty() || v.contains([':', '/']) || !v.is_ascii() {
                return Err(AuthError(format!("invalid {what} {v:?}")));
            }
        }
        let msg = Self::message(namespace, service_account);
        let tag = hmac::sign(&self.key, msg.as_bytes());
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        Ok(format!("{msg}:{}", b64.encode(tag.as_ref())))
    }
}

impl Authenticator for BootstrapTokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<WorkloadId, AuthError>> {
        Box::pin(std::future::ready(self.verify(token)))
    }
}

impl BootstrapTokens {
    fn verify(&self, token: &str) -> Result<WorkloadId, AuthError> {
        let bad = || AuthError("invalid bootstrap token".into());
        let (msg, tag) = token.trim().rsplit_once(':').ok_or_else(bad)?;
        let mut parts = msg.split(':');
        let (Some(TOKEN_PREFIX), Some(ns), Some(sa), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| bad())?;
        hmac::verify(&self.key, msg.as_bytes(), &tag).map_err(|_| bad())?;
        Ok(WorkloadId {
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
        })
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct CertifyServer {
    ca: Arc<Ca>,
    auth: Arc<dyn Authenticator>,
}

impl std::fmt::Debug for CertifyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifyServer")
            .field("ca", &self.ca)
            .finish()
    }
}

impl CertifyServer {
    pub fn new(ca: Arc<Ca>, auth: Arc<dyn Authenticator>) -> Self {
        Self { ca, auth }
    }

    pub fn into_service(self) -> IdentityServiceServer<Self> {
        IdentityServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl IdentityService for CertifyServer {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let req = request.into_inner();
        let who = self
            .auth
            .authenticate(&req.token)
            .await
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let spiffe_id = self.ca.spiffe_id(&who.namespace, &who.service_account);
        let issued = self.ca.sign_csr(&req.csr_pem, &spiffe_id).map_err(|e| {
            tracing::warn!(%spiffe_id, error = %e, "certificate request refused");
            Status::permission_denied(e.to_string())
        })?;
        tracing::debug!(%spiffe_id, "certificate issued");
        Ok(Response::new(CertifyResponse {
            cert_chain_pem: issued.chain_pem,
            trust_bundle_pem: self.ca.bundle_pem().to_vec(),
            not_after_unix_ms: unix_ms(issued.not_after),
            spiffe_id,
        }))
    }
}

/// `POST /api/v1/identity/token` body (the admin port is loopback-only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRequest {
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub spiffe_id: String,
}

#[derive(Clone)]
struct TokenState {
    tokens: Arc<BootstrapTokens>,
    ca: Arc<Ca>,
}

/// Admin routes: issue bootstrap tokens, read the trust bundle.
pub fn admin_router(ca: Arc<Ca>, tokens: Arc<BootstrapTokens>) -> Router {
    Router::new()
        .route("/api/v1/identity/token", post(issue_token))
        .route(
            "/api/v1/identity/bundle",
            axum::routing::get(
                |State(s): State<TokenState>| async move { s.ca.bundle_pem().concat() },
            ),
        )
        .with_state(TokenState { tokens, ca })
}

async fn issue_token(
    State(s): State<TokenState>,
    body: axum::body::Bytes,
) -> Result<Json<TokenResponse>, (StatusCode, Json<serde_json::Value>)> {
    let bad = |m: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": m})),
        )
    };
    let req: TokenRequest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("invalid body: {e}")))?;
    let token = s
        .tokens
        .issue(&req.namespace, &req.service_account)
        .map_err(|e| bad(e.to_string()))?;
    Ok(Json(TokenResponse {
        token,
        spiffe_id: s.ca.spiffe_id(&req.namespace, &req.service_account),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_prove_exactly_their_service_account() {
        let t = BootstrapTokens::open(None).unwrap();
        let token = t.issue("default", "reviews").unwrap();
        assert_eq!(
            t.verify(&token).unwrap(),
            WorkloadId {
                namespace: "default".into(),
                service_account: "reviews".into()
            }
        );
        let forged = token.replace(":reviews:", ":admin:");
        assert!(t.verify(&forged).is_err());
        let other = BootstrapTokens::open(None).unwrap();
        assert!(other.verify(&token).is_err(), "another secret");
        assert!(t.issue("a:b", "x").is_err());
    }
}

//! JWT request authentication: `Authorization: Bearer <token>` checked against a service's
//! issuer, audiences and JWKS (inline, or fetched once per config version from a loopback URL
//! and refetched when a token names a key it does not have). The verified claims feed
//! authorization rules (`claims: {group: [admins]}`).

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};
use serde_json::{Map, Value};
use tokio::sync::RwLock;
use weft_proto::security::JwtRule;

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS bigger than this is refused.
const MAX_JWKS_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("no bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
    #[error("cannot get the JWKS: {0}")]
    Jwks(String),
    #[error("JWT config: {0}")]
    Config(String),
}

impl JwtError {
    /// The value of `x-weft-reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Missing => "jwt_missing",
            JwtError::Invalid(_) => "jwt_invalid",
            JwtError::Expired => "jwt_expired",
            JwtError::Jwks(_) | JwtError::Config(_) => "jwks_unavailable",
        }
    }
}

#[derive(Debug)]
pub struct JwtVerifier {
    issuer: String,
    audiences: Vec<String>,
    uri: Option<String>,
    /// `None` until fetched (uri) — inline sets are parsed at compile time.
    keys: RwLock<Option<JwkSet>>,
}

impl JwtVerifier {
    pub fn new(rule: &JwtRule) -> Result<Self, JwtError> {
        let keys = match &rule.jwks {
            Some(text) => Some(
                serde_json::from_str::<JwkSet>(text)
                    .map_err(|e| JwtError::Config(format!("jwks is not a JWKS document: {e}")))?,
            ),
            None => None,
        };
        Ok(Self {
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.clone(),
            uri: rule.jwks_uri.clone(),
            keys: RwLock::new(keys),
        })
    }

    /// Verifies the request's bearer token; returns its claims.
    pub async fn verify(&self, headers: &HeaderMap) -> Result<Map<String, Value>, JwtError> {
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(JwtError::Missing)?;
        let header = decode_header(token).map_err(|e| JwtError::Invalid(e.to_string()))?;
        let key = match self.find_key(header.kid.as_deref()).await? {
            Some(k) => k,
            // A key we do not know may be newly rotated in: refetch once.
            None if self.uri.is_some() => {
                self.fetch().await?;
                self.find_key(header.kid.as_deref())
                    .await?
                    .ok_or_else(|| JwtError::Invalid("unknown signing key".into()))?
            }
            None => return Err(JwtError::Invalid("unknown signing key".into())),
        };
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
        }
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "iss"]);
        let data =
            decode::<Map<String, Value>>(token, &key, &validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => JwtError::Expired,
                _ => JwtError::Invalid(e.to_string()),
            })?;
        Ok(data.claims)
    }

    async fn find_key(&self, kid: Option<&str>) -> Result<Option<DecodingKey>, JwtError> {
        if self.keys.read().await.is_none() {
            self.fetch().await?;
        }
        let keys = self.keys.read().await;
        let Some(set) = keys.as_ref() else {
            return Ok(None);
        };
        let jwk = match kid {
            Some(kid) => set.find(kid),
            None if set.keys.len() == 1 => set.keys.first(),
            None => None,
        };
        jwk.map(|j| {
            DecodingKey::from_jwk(j).map_err(|e| JwtError::Invalid(format!("JWKS key: {e}")))
        })
        .transpose()
    }

    async fn fetch(&self) -> Result<(), JwtError> {
        let Some(uri) = &self.uri else {
            return Ok(());
        };
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let get = async {
            let parsed: http::Uri = uri
                .parse()
                .map_err(|e| JwtError::Jwks(format!("{uri}: {e}")))?;
            let resp = client
                .get(parsed)
                .await
                .map_err(|e| JwtError::Jwks(format!("{uri}: {e}")))?;
            if !resp.status().is_success() {
                return Err(JwtError::Jwks(format!("{uri}: HTTP {}", resp.status())));
            }
            let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| JwtError::Jwks(format!("{uri}: {e}")))?
                .to_bytes();
            serde_json::from_slice::<JwkSet>(&body)
                .map_err(|e| JwtError::Jwks(format!("{uri}: not a JWKS document: {e}")))
        };
        let set = tokio::time::timeout(FETCH_TIMEOUT, get)
            .await
            .map_err(|_| JwtError::Jwks(format!("{uri}: timed out")))??;
        *self.keys.write().await = Some(set);
        Ok(())
    }
}

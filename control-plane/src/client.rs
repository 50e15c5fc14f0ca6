//! `weftctl`'s HTTP client for the admin JSON API: a small hyper-util client over plain HTTP,
//! typed with the shapes in [`crate::api`].
//!
//! Errors are written for the terminal: a refused connection names the server URL and how to
//! point `weftctl` elsewhere; a non-2xx answer carries the server's own `error` text.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use crate::api;

/// Upper bound on one request, connection included, so `weftctl` never hangs.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "cannot connect to weft-control at {server}: {reason} (is it running? point weftctl at it with --server or WEFT_SERVER)"
    )]
    Connect { server: String, reason: String },
    #[error("request to {server} failed: {reason}")]
    Request { server: String, reason: String },
    #[error("weft-control at {server} did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout { server: String },
    /// A non-2xx answer; `message` is the server's `error` text.
    #[error("{message}")]
    Server { status: StatusCode, message: String },
    #[error("unexpected answer from {server}: {reason}")]
    Decode { server: String, reason: String },
}

/// A client for one control plane's admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// `http://host:port` plus an optional path prefix, without a trailing `/`.
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// `server` is the admin API's base URL, e.g. `http://127.0.0.1:15014`.
    pub fn new(server: &str) -> Result<Self, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: server.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = server
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(invalid(
                    "https is not supported; the admin API speaks plain HTTP",
                ));
            }
            _ => return Err(invalid("expected http://HOST:PORT")),
        }
        if uri.authority().is_none() {
            return Err(invalid("expected http://HOST:PORT"));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            base: server.trim_end_matches('/').to_owned(),
            http,
        })
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    /// `GET /api/v1/status`, as raw JSON (for `-o json`, which must print all fields, also
    /// ones this build does not know).
    pub async fn status_json(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/api/v1/status").await
    }

    pub async fn status(&self) -> Result<api::Status, ClientError> {
        self.get("/api/v1/status").await
    }

    pub async fn routes(&self) -> Result<api::Routes, ClientError> {
        self.get("/api/v1/routes").await
    }

    pub async fn config(&self) -> Result<api::Config, ClientError> {
        self.get("/api/v1/config").await
    }

    pub async fn set_weights(
        &self,
        route: &str,
        req: &api::SetWeightsRequest,
    ) -> Result<api::SetWeightsResponse, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| self.decode(e))?;
        let path = format!("/api/v1/routes/{}/weights", encode_segment(route));
        self.send(Method::POST, &path, "application/json", body.into())
            .await
    }

    /// `POST /api/v1/apply` with mesh YAML.
    pub async fn apply(&self, yaml: String) -> Result<api::ApplyResponse, ClientError> {
        self.send(
            Method::POST,
            "/api/v1/apply",
            "application/yaml",
            yaml.into(),
        )
        .await
    }

    /// Any POST with a body, decoded as `T`.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<T, ClientError> {
        self.send(Method::POST, path, content_type, body).await
    }

    /// `POST /api/v1/identity/token`: a bootstrap token for one service account.
    pub async fn token(
        &self,
        req: &crate::certify::TokenRequest,
    ) -> Result<crate::certify::TokenResponse, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| self.decode(e))?;
        self.send(
            Method::POST,
            "/api/v1/identity/token",
            "application/json",
            body.into(),
        )
        .await
    }

    /// Any GET, decoded as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(Method::GET, path, "", Bytes::new()).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::ACCEPT, "application/json");
        if !content_type.is_empty() {
            req = req.header(header::CONTENT_TYPE, content_type);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| ClientError::InvalidUrl {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| self.transport(&e))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Request {
                    server: self.base.clone(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok::<_, ClientError>((status, body))
        };
        let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                server: self.base.clone(),
            })??;
        if !status.is_success() {
            let message = match serde_json::from_slice::<api::ErrorBody>(&body) {
                Ok(e) => e.error,
                Err(_) if body.is_empty() => format!("{url}: HTTP {status}"),
                Err(_) => format!(
                    "{url}: HTTP {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                ),
            };
            return Err(ClientError::Server { status, message });
        }
        serde_json::from_slice(&body).map_err(|e| self.decode(e))
    }

    fn transport(&self, e: &hyper_util::client::legacy::Error) -> ClientError {
        // The innermost cause is the useful one ("Connection refused (os error 111)").
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            reason = s.to_string();
            source = s.source();
        }
        if e.is_connect() {
            ClientError::Connect {
                server: self.base.clone(),
                reason,
            }
        } else {
            ClientError::Request {
                server: self.base.clone(),
                reason,
            }
        }
    }

    fn decode(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Decode {
            server: self.base.clone(),
            reason: e.to_string(),
        }
    }
}

/// Percent-encodes a path segment (route names are DNS-like, but be safe with anything).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_the_server_url() {
        assert!(AdminClient::new("http://127.0.0.1:15014/").is_ok());
        let err = AdminClient::new("https://x:1").unwrap_err().to_string();
        assert!(err.contains("https is not supported"), "{err}");
        assert!(AdminClient::new("127.0.0.1:15014").is_err());
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
    }

    #[tokio::test]
    async fn refused_connection_names_the_server() {
        // Bind then drop: the port is very likely closed now.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let client = AdminClient::new(&format!("http://{addr}")).unwrap();
        let err = client.status().await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&format!("http://{addr}")), "{err}");
    }
}

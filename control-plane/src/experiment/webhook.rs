//! Experiment webhooks: `POST` a JSON document to the hook's URL; a 2xx answer means go.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use weft_proto::experiment::Webhook;

/// Used when a hook sets no timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Calls webhooks; cheap to clone.
#[derive(Debug, Clone)]
pub struct Caller {
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Caller {
    fn default() -> Self {
        Self::new()
    }
}

impl Caller {
    pub fn new() -> Self {
        Self {
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// `Ok` on a 2xx answer; otherwise why not, naming the hook.
    pub async fn call(&self, hook: &Webhook, payload: &serde_json::Value) -> Result<(), String> {
        let fail = |why: String| format!("webhook {:?} ({}): {why}", hook.name, hook.url);
        let req = Request::builder()
            .method(Method::POST)
            .uri(&hook.url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload.to_string())))
            .map_err(|e| fail(e.to_string()))?;
        let timeout = hook.timeout.map_or(DEFAULT_TIMEOUT, |t| t.as_duration());
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, String>((status, body))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => Err(fail(format!("no answer within {timeout:?}"))),
            Ok(Err(e)) => Err(fail(e)),
            Ok(Ok((status, _))) if status.is_success() => Ok(()),
            Ok(Ok((status, body))) => Err(fail(format!(
                "answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
            ))),
        }
    }
}

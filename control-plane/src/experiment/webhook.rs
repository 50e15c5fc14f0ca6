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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::post;
    use weft_proto::experiment::WebhookKind;
    use weft_proto::model::Millis;

    fn hook(url: String, timeout: Option<Millis>) -> Webhook {
        Webhook {
            name: "gate".into(),
            kind: WebhookKind::PreStep,
            url,
            timeout,
        }
    }

    #[tokio::test]
    async fn two_hundreds_go_anything_else_names_the_hook() {
        let app = Router::new()
            .route(
                "/ok",
                post(|body: String| async move {
                    assert!(body.contains("\"experiment\""), "{body}");
                    StatusCode::NO_CONTENT
                }),
            )
            .route("/no", post(|| async { (StatusCode::CONFLICT, "not yet") }))
            .route(
                "/slow",
                post(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    StatusCode::OK
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let caller = Caller::new();
        let payload = serde_json::json!({"experiment": "e"});
        let url = |p: &str| format!("http://{addr}{p}");
        caller
            .call(&hook(url("/ok"), None), &payload)
            .await
            .unwrap();
        let err = caller
            .call(&hook(url("/no"), None), &payload)
            .await
            .unwrap_err();
        assert!(
            err.contains("webhook \"gate\"") && err.contains("409"),
            "{err}"
        );
        assert!(err.contains("not yet"), "{err}");
        let err = caller
            .call(&hook(url("/slow"), Some(Millis(100))), &payload)
            .await
            .unwrap_err();
        assert!(err.contains("no answer within"), "{err}");
        server.abort();
    }
}

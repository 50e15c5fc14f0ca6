//! The admin listener: `/ready`, `/live` and `/config`.
//!
//! Tiny on purpose: a match on method and path over the shared [`ProxyState`]. It reads the
//! running snapshot like a request does, so it never blocks the data path.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::state::ProxyState;

/// Serves one admin request.
pub async fn handle<B>(
    state: Arc<ProxyState>,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(respond(&state, req.method(), req.uri().path()))
}

fn respond(state: &ProxyState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match path {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" if state.is_ready() => text(StatusCode::OK, "ready\n"),
        "/ready" if !state.security.is_ready() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no workload certificate yet\n",
        ),
        "/ready" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no config yet\n",
        ),
        "/config" => config(state),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn config(state: &ProxyState) -> Response<Full<Bytes>> {
    let snapshot = state.load_full();
    let status = state.status();
    let body = json!({
        "version": snapshot.version,
        "source": snapshot.source.map(|s| s.as_str()),
        "applied_at_unix_ms": snapshot.applied_at_unix_ms,
        "config": snapshot.source.map(|_| &snapshot.config),
        "last_nack": status.last_nack.map(|n| json!({"version": n.version, "error": n.error})),
        "control_plane": {
            "connected": status.connected,
            "address": status.address,
        },
        "identity": state.security.to_json(),
    });
    let mut bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
    bytes.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Source;
    use http_body_util::BodyExt;
    use weft_proto::validate::Limits;
    use weft_proto::{parse_yaml, to_resources};

    async fn get(state: &ProxyState, path: &str) -> (StatusCode, String) {
        let resp = respond(state, &Method::GET, path);
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn ready_after_first_config_and_config_json() {
        let state = ProxyState::new(Limits::default());
        assert_eq!(get(&state, "/live").await.0, StatusCode::OK);
        let (status, body) = get(&state, "/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("not ready: no config yet"));
        assert_eq!(get(&state, "/nope").await.0, StatusCode::NOT_FOUND);

        let yaml = "services: [{name: a, endpoints: [{address: \"127.0.0.1:1\"}]}]\nroutes: []\n";
        let res = to_resources(&parse_yaml("m", yaml, &Limits::default()).unwrap());
        state.apply(&res, 7, Source::File).unwrap();
        state.record_nack(8, "bad".into());
        assert_eq!(
            get(&state, "/ready").await,
            (StatusCode::OK, "ready\n".into())
        );

        let (_, body) = get(&state, "/config").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["version"], 7);
        assert_eq!(v["source"], "file");
        assert_eq!(v["config"]["services"][0]["name"], "a");
        assert_eq!(v["last_nack"], json!({"version": 8, "error": "bad"}));
        assert_eq!(
            v["control_plane"],
            json!({"connected": false, "address": null})
        );
        assert!(v["applied_at_unix_ms"].as_u64().unwrap() > 0);
    }
}

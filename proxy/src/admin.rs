//! The admin listener: `/metrics`, `/config`, `/ready`, `/live`, `/log-level` and `/drain`.
//!
//! Tiny on purpose: a match on method and path over the shared [`ProxyState`] and
//! [`Telemetry`]. It reads the running snapshot like a request does, so it never blocks the
//! data path.
//!
//! - `GET /metrics`: Prometheus (OpenMetrics text) exposition of every proxy metric.
//! - `GET /log-level`: the running log filter; `POST /log-level` with a filter in the body
//!   (EnvFilter syntax, e.g. `info,weft_proxy=debug`) replaces it.
//! - `POST /drain`: `/ready` turns 503 at once, the traffic listeners stop accepting and their
//!   connections finish in-flight requests (HTTP/1 closes after the response, HTTP/2 sends
//!   GOAWAY); the admin port stays up until the process is stopped.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::body::DownstreamBody;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use serde_json::json;

use crate::log_level;
use crate::observe::Telemetry;
use crate::server::Shutdown;
use crate::state::ProxyState;

/// Largest `POST /log-level` body accepted.
const MAX_BODY: usize = 4096;

/// What the admin port serves from.
#[derive(Debug)]
pub struct Admin {
    pub state: Arc<ProxyState>,
    pub telemetry: Arc<Telemetry>,
    /// Stops the traffic listeners (not the admin port) on `POST /drain`.
    drain: Option<Arc<Shutdown>>,
    draining: AtomicBool,
    /// The app's original probes, served as `/app-health/<container>/<probe>`.
    probes: Option<Arc<crate::health::AppProbes>>,
}

impl Admin {
    pub fn new(
        state: Arc<ProxyState>,
        telemetry: Arc<Telemetry>,
        drain: Option<Arc<Shutdown>>,
    ) -> Self {
        Self {
            state,
            telemetry,
            drain,
            draining: AtomicBool::new(false),
            probes: None,
        }
    }

    /// Serves the app's rewritten probes (see [`crate::health`]).
    pub fn with_probes(mut self, probes: Option<Arc<crate::health::AppProbes>>) -> Self {
        self.probes = probes;
        self
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts a graceful drain (idempotent).
    pub fn start_drain(&self) {
        if !self.draining.swap(true, Ordering::Relaxed) {
            tracing::info!("drain requested: not ready, traffic listeners stop accepting");
            if let Some(drain) = &self.drain {
                drain.trigger();
            }
        }
    }
}

/// Serves one admin request.
pub async fn handle(
    admin: Arc<Admin>,
    req: Request<DownstreamBody>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    if parts.method == Method::POST && parts.uri.path() == "/log-level" {
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return Ok(text(
                    StatusCode::BAD_REQUEST,
                    "body too large or unreadable\n",
                ));
            }
        };
        return Ok(set_log_level(&body));
    }
    if let (Some(probes), Some(name)) =
        (&admin.probes, parts.uri.path().strip_prefix("/app-health/"))
    {
        let (status, body) = probes.check(name).await;
        return Ok(owned_text(status, body));
    }
    Ok(respond(&admin, &parts.method, parts.uri.path()))
}

fn respond(admin: &Admin, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let state = &admin.state;
    if method == Method::POST && path == "/drain" {
        admin.start_drain();
        return text(StatusCode::OK, "draining\n");
    }
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match path {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" if admin.is_draining() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
        }
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
        "/metrics" => metrics(admin),
        "/log-level" => match log_level::current() {
            Some(filter) => owned_text(StatusCode::OK, format!("{filter}\n")),
            None => text(
                StatusCode::NOT_FOUND,
                "the log filter is not reloadable in this process\n",
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn set_log_level(body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(filter) = std::str::from_utf8(body) else {
        return text(StatusCode::BAD_REQUEST, "the filter must be UTF-8 text\n");
    };
    match log_level::set(filter) {
        Ok(now) => owned_text(StatusCode::OK, format!("{now}\n")),
        Err(e @ log_level::LogLevelError::Invalid { .. }) => {
            owned_text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
        Err(e) => owned_text(StatusCode::NOT_IMPLEMENTED, format!("{e}\n")),
    }
}

fn metrics(admin: &Admin) -> Response<Full<Bytes>> {
    let t = &admin.telemetry;
    // Gauges that mirror state are set at scrape time: nothing to update on the hot path.
    let snapshot = admin.state.load();
    t.metrics
        .set_config(snapshot.version, snapshot.applied_at_unix_ms);
    if snapshot.source == Some(crate::state::Source::ControlPlane) {
        // Every streamed version applied is ACKed right away.
        t.metrics
            .set_last_ack(i64::try_from(snapshot.applied_at_unix_ms / 1000).unwrap_or(0));
    }
    drop(snapshot);
    if let Some(tracer) = &t.tracer {
        t.metrics
            .trace_queue
            .set(i64::try_from(tracer.queue_len()).unwrap_or(i64::MAX));
    }
    let mut resp = Response::new(Full::new(Bytes::from(t.metrics.encode())));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    resp
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
    plain(status, Bytes::from_static(body.as_bytes()))
}

fn owned_text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    plain(status, Bytes::from(body))
}

fn plain(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
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

    async fn get(admin: &Admin, path: &str) -> (StatusCode, String) {
        call(admin, &Method::GET, path).await
    }

    async fn call(admin: &Admin, method: &Method, path: &str) -> (StatusCode, String) {
        let resp = respond(admin, method, path);
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn ready_after_first_config_and_config_json() {
        let (shutdown, mut signal) = Shutdown::new();
        let admin = Admin::new(
            Arc::new(ProxyState::new(Limits::default())),
            crate::observe::Telemetry::disabled(),
            Some(Arc::new(shutdown)),
        );
        let state = &admin.state;
        assert_eq!(get(&admin, "/live").await.0, StatusCode::OK);
        let (status, body) = get(&admin, "/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("not ready: no config yet"));
        assert_eq!(get(&admin, "/nope").await.0, StatusCode::NOT_FOUND);

        let yaml = "services: [{name: a, endpoints: [{address: \"127.0.0.1:1\"}]}]\nroutes: []\n";
        let res = to_resources(&parse_yaml("m", yaml, &Limits::default()).unwrap());
        state.apply(&res, 7, Source::File).unwrap();
        state.record_nack(8, "bad".into());
        assert_eq!(
            get(&admin, "/ready").await,
            (StatusCode::OK, "ready\n".into())
        );

        let (_, body) = get(&admin, "/config").await;
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

        let (status, body) = get(&admin, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("weft_proxy_config_version 7\n"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");

        // Drain: not ready any more, and the traffic listeners are told to stop.
        assert_eq!(
            call(&admin, &Method::POST, "/drain").await.0,
            StatusCode::OK
        );
        let (status, body) = get(&admin, "/ready").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
        );
        tokio::time::timeout(std::time::Duration::from_secs(1), signal.wait())
            .await
            .expect("drain triggers the listeners' shutdown");
    }
}

//! The admin JSON API (`--admin-addr`), used by `weftctl`: status, routes and config reads,
//! weight changes and whole-config applies, plus `/ready` and `/live`.
//!
//! Every error is `{"error": "..."}` with 400 (the request is wrong), 404 (unknown route or
//! endpoint) or 500 (the control plane failed, e.g. the store); bodies are parsed by hand so
//! a bad body always gets a 400 with the parser's reason, whatever its content type.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use weft_proto::ops::OpError;
use weft_proto::{Limits, parse_yaml};

use crate::api;
use crate::registry::{Registry, RegistryError};
use crate::roster::Roster;
use crate::shutdown::Shutdown;

/// The source name `apply` errors are reported against (`apply:12: ...`).
pub const APPLY_SOURCE: &str = "apply";

/// Serves the admin API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    roster: Option<Roster>,
    extra: Router,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    axum::serve(listener, router(registry, roster).merge(extra))
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

/// `roster`: replicas on etcd list every replica's proxies in the status.
pub fn router(registry: Registry, roster: Option<Roster>) -> Router {
    let status = move |State(registry): State<Registry>| async move {
        Json(match &roster {
            Some(roster) => Box::pin(roster.status(&registry)).await,
            None => registry.status(),
        })
    };
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/routes", get(routes))
        .route("/api/v1/config", get(config))
        .route("/api/v1/routes/{route}/weights", post(set_weights))
        .route("/api/v1/apply", post(apply))
        .route("/metrics", get(metrics))
        .route("/ready", get(ok))
        .route("/live", get(ok))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(registry)
}

/// An error answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The target is owned elsewhere (a discovered route: its HTTPRoute).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
}

impl From<RegistryError> for AdminError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Op(OpError::UnknownRoute(_)) => AdminError::NotFound(e.to_string()),
            RegistryError::Op(_) | RegistryError::Invalid(_) => {
                AdminError::BadRequest(e.to_string())
            }
            RegistryError::Store { .. } => AdminError::Internal(e.to_string()),
            RegistryError::Discovered { .. } => AdminError::Conflict(e.to_string()),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let code = match &self {
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if code.is_server_error() {
            tracing::error!(error = %self, "admin request failed");
        }
        let body = api::ErrorBody {
            error: self.to_string(),
        };
        (code, Json(body)).into_response()
    }
}

async fn metrics(State(registry): State<Registry>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        registry.encode_metrics(),
    )
        .into_response()
}

async fn ok() -> &'static str {
    "ok\n"
}

async fn routes(State(registry): State<Registry>) -> Json<api::Routes> {
    let current = registry.current();
    Json(api::Routes {
        version: current.version,
        routes: current.config.routes.clone(),
    })
}

async fn config(State(registry): State<Registry>) -> Json<api::Config> {
    let current = registry.current();
    Json(api::Config {
        version: current.version,
        config: current.config.clone(),
    })
}

async fn set_weights(
    State(registry): State<Registry>,
    route: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Json<api::SetWeightsResponse>, AdminError> {
    let Path(route) = route.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let req: api::SetWeightsRequest = serde_json::from_slice(&body)
        .map_err(|e| AdminError::BadRequest(format!("invalid request body: {e}")))?;
    let weights: Vec<(String, u32)> = req.weights.into_iter().collect();
    let (outcome, rule) = registry.set_weights(&route, req.rule, &weights).await?;
    Ok(Json(api::SetWeightsResponse {
        version: outcome.version,
        route,
        rule,
    }))
}

async fn apply(
    State(registry): State<Registry>,
    body: Bytes,
) -> Result<Json<api::ApplyResponse>, AdminError> {
    let text = std::str::from_utf8(&body)
        .map_err(|e| AdminError::BadRequest(format!("body is not UTF-8 YAML text: {e}")))?;
    let config = parse_yaml(APPLY_SOURCE, text, &Limits::default())
        .map_err(|e| AdminError::BadRequest(e.to_string()))?;
    let outcome = registry.apply(config).await?;
    Ok(Json(api::ApplyResponse {
        version: outcome.version,
        unchanged: !outcome.changed,
    }))
}

async fn not_found(method: Method, uri: Uri) -> AdminError {
    AdminError::NotFound(format!("no such endpoint: {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let body = api::ErrorBody {
        error: format!("method {method} is not allowed on {}", uri.path()),
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

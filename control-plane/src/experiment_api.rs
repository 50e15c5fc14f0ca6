//! The experiments part of the admin JSON API (merged into [`crate::admin`]'s router):
//!
//! | method, path | what |
//! |---|---|
//! | `GET /api/v1/experiments` | `{"experiments": [status…]}` |
//! | `GET /api/v1/experiments/{name}` | one status: record, plan, events, live window |
//! | `POST /api/v1/experiments` | body = one experiment spec (YAML or JSON) → started |
//! | `POST /api/v1/experiments/{name}/{pause,resume,abort,promote}` | operator commands |

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use weft_proto::experiment::ExperimentSpec;

use crate::admin::AdminError;
use crate::experiment::{Engine, ExperimentError, Status};
use crate::registry::RegistryError;

/// Experiments listed by `GET /api/v1/experiments`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct List {
    pub experiments: Vec<Status>,
}

pub fn router(engine: Engine) -> Router {
    Router::new()
        .route("/api/v1/experiments", get(list).post(start))
        .route("/api/v1/experiments/{name}", get(one))
        .route("/api/v1/experiments/{name}/{action}", post(command))
        .with_state(engine)
}

impl From<ExperimentError> for AdminError {
    fn from(e: ExperimentError) -> Self {
        match e {
            ExperimentError::NotFound(_) => AdminError::NotFound(e.to_string()),
            ExperimentError::Invalid(_) => AdminError::BadRequest(e.to_string()),
            ExperimentError::Registry(r @ RegistryError::Store { .. }) => {
                AdminError::Internal(r.to_string())
            }
            ExperimentError::Registry(r @ RegistryError::Discovered { .. }) => {
                AdminError::Conflict(r.to_string())
            }
            ExperimentError::Registry(r) => AdminError::BadRequest(r.to_string()),
        }
    }
}

async fn list(State(engine): State<Engine>) -> Json<List> {
    Json(List {
        experiments: engine.list(),
    })
}

async fn one(
    State(engine): State<Engine>,
    Path(name): Path<String>,
) -> Result<Json<Status>, AdminError> {
    Ok(Json(engine.status(&name)?))
}

async fn start(State(engine): State<Engine>, body: Bytes) -> Result<Json<Status>, AdminError> {
    // YAML is a superset of JSON: one parser takes both.
    let text = std::str::from_utf8(&body)
        .map_err(|e| AdminError::BadRequest(format!("body is not UTF-8 text: {e}")))?;
    let spec: ExperimentSpec = serde_yaml_ng::from_str(text)
        .map_err(|e| AdminError::BadRequest(format!("invalid experiment: {e}")))?;
    Ok(Json(engine.start(spec).await?))
}

async fn command(
    State(engine): State<Engine>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Json<Status>, AdminError> {
    Ok(Json(engine.command(&name, &action).await?))
}

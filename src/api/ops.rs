//! Operational routes: liveness, readiness, metrics, the model list, and
//! JSON answers for unknown routes and methods.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};

use super::AppState;
use super::error::ApiError;
use super::wire::{ModelCard, ModelList};

/// How long the engine loop may go without turning before `/health` fails.
/// Long enough for one big prefill step on a CPU.
const MAX_ENGINE_SILENCE: Duration = Duration::from_secs(60);

/// Liveness: the process is up and the engine loop turns.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.engine.is_healthy(MAX_ENGINE_SILENCE) {
        Json(serde_json::json!({"status": "ok"})).into_response()
    } else {
        ApiError::engine_unavailable().into_response()
    }
}

/// Readiness: the model is loaded and the server is not draining.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.engine.is_draining() {
        ApiError::draining().into_response()
    } else if !state.engine.is_healthy(MAX_ENGINE_SILENCE) {
        ApiError::engine_unavailable().into_response()
    } else {
        Json(serde_json::json!({"status": "ready"})).into_response()
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.model_name.clone(),
            object: "model",
            created: state.created,
            owned_by: "mamba-serve",
            max_model_len: state.max_model_len(),
        }],
    })
}

pub async fn not_found() -> Response {
    ApiError::not_found("no such route").into_response()
}

pub async fn method_not_allowed() -> Response {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", Some("method_not_allowed"), "method not allowed on this route")
        .into_response()
}

//! The HTTP API: the only module that knows HTTP. Routes, middleware (auth,
//! request ids, replica header, CORS, limits, metrics), wire types, SSE, and
//! the mapping of every error to a status and OpenAI's error JSON.

mod chat;
mod completions;
pub mod error;
pub mod extract;
pub mod generation;
mod middleware;
mod native;
mod ops;
pub mod server;
mod sse;
pub mod wire;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::config::ServerSettings;
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::tokenizer::Tokenizer;
use crate::validate::Validator;

pub use error::ApiError;

/// What every handler can reach. Built once at start-up.
pub struct AppState {
    pub engine: EngineHandle,
    pub validator: Validator,
    pub tokenizer: Arc<Tokenizer>,
    pub server: ServerSettings,
    /// The name `/v1/models` lists and requests may give.
    pub model_name: String,
    /// Unix time the server started (the model's `created`).
    pub created: u64,
    pub metrics: Arc<Metrics>,
    /// Sent in `X-Replica`.
    pub replica: String,
}

impl AppState {
    /// Checks the `model` a request names: absent means the served one.
    pub fn check_model(&self, model: Option<&str>) -> Result<String, ApiError> {
        match model {
            None | Some("") => Ok(self.model_name.clone()),
            Some(m) if m == self.model_name => Ok(self.model_name.clone()),
            Some(m) => Err(ApiError::model_not_found(m)),
        }
    }

    /// The longest sequence (prompt plus generation) this server accepts.
    pub fn max_model_len(&self) -> usize {
        self.validator.limits().max_total_tokens
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A response id: a prefix and 24 hex digits.
pub fn response_id(prefix: &str) -> String {
    let r = crate::backend::rng::fresh_u64();
    format!("{prefix}-{r:016x}{:08x}", (r >> 17) as u32)
}

/// The router with every route and layer, without a socket (tests drive it
/// directly).
pub fn router(state: Arc<AppState>) -> Router {
    let inference = Router::new()
        .route("/v1/completions", post(completions::handle))
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/models", get(ops::models))
        .route("/generate", post(native::generate))
        .route("/generate_stream", post(native::generate_stream))
        .route("/tokenize", post(native::tokenize))
        .route("/detokenize", post(native::detokenize))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), middleware::require_api_key));
    let open = Router::new().route("/health", get(ops::health)).route("/ready", get(ops::ready)).route("/metrics", get(ops::metrics));
    let read_timeout = Duration::from_secs(state.server.request_read_timeout_secs);
    let router = inference
        .merge(open)
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.server.max_body_bytes))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(read_timeout))
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::observe))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(middleware::panic_response));
    let router = match middleware::cors(&state.server.cors_allow_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(state)
}

//! Layers every request passes: API keys, request ids, the replica header,
//! metrics and logs, panics turned into 500 JSON, CORS.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::{ApiError, AppState};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const REPLICA: HeaderName = HeaderName::from_static("x-replica");

/// Constant-time comparison of two byte strings (time depends only on the
/// length of `a`).
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// Refuses requests without a configured API key, before the body is read.
pub async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let keys = &state.server.api_keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    // Compare against every key so the time does not say which matched.
    let ok = keys.iter().fold(false, |acc, k| acc | same(k.as_bytes(), given.as_bytes()));
    if ok { next.run(req).await } else { ApiError::unauthorized().into_response() }
}

fn new_request_id() -> String {
    super::response_id("req")
}

/// Largest total size of request headers accepted (431 above it).
const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Request id in and out, replica header, request metrics and one log line
/// per request (no prompt text).
pub async fn observe(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let header_bytes: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if header_bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            Some("headers_too_large"),
            format!("request headers are larger than {MAX_HEADER_BYTES} bytes"),
        )
        .into_response();
    }
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert(REQUEST_ID, v);
    }
    let endpoint = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let mut res = next.run(req).await;
    let status = res.status().as_u16();
    state.metrics.count_request(&endpoint, status);
    let headers = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID, v);
    }
    if let Ok(v) = HeaderValue::from_str(&state.replica) {
        headers.insert(REPLICA, v);
    }
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if status >= 500 {
        tracing::warn!(request_id = %id, %method, endpoint, status, ms, "request");
    } else {
        tracing::info!(request_id = %id, %method, endpoint, status, ms, "request");
    }
    res
}

/// A panic in a handler becomes a 500 with OpenAI error JSON; the server
/// keeps serving.
pub fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    let detail =
        err.downcast_ref::<String>().map(String::as_str).or_else(|| err.downcast_ref::<&str>().copied()).unwrap_or("unknown panic");
    tracing::error!(detail, "handler panicked");
    ApiError::internal("internal error while handling the request").into_response()
}

/// CORS from `server.cors_allow_origins`: none configured, no layer.
pub fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(CorsLayer::new().allow_origin(allow).allow_methods([Method::GET, Method::POST, Method::OPTIONS]).allow_headers([
        header::AUTHORIZATION,
        header::CONTENT_TYPE,
        REQUEST_ID,
    ]))
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn key_comparison() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"Secret"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"secret", b""));
        assert!(!same(b"", b"x"));
    }
}

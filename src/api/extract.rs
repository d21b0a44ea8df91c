//! The JSON body extractor: content type (415), size (413), syntax and
//! schema (400 naming the field), all as OpenAI error JSON.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A request body parsed as `T`, strictly.
pub struct JsonBody<T>(pub T);

/// The field a serde error points at, if it names one.
fn field_of(path: &str, message: &str) -> Option<String> {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        return rest.split('`').next().map(str::to_owned);
    }
    if let Some(rest) = message.strip_prefix("duplicate field `") {
        return rest.split('`').next().map(str::to_owned);
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        return rest.split('`').next().map(str::to_owned);
    }
    let first = path.split(['.', '[']).next().unwrap_or("");
    (!first.is_empty() && first != ".").then(|| first.to_string())
}

/// Parses `bytes` as `T`, turning every failure into a 400 that names the
/// field when there is one.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad_request("the request body is empty; send a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        let base = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        let (message, param) = if inner.is_syntax() || inner.is_eof() {
            (format!("the request body is not valid JSON: {msg}"), None)
        } else {
            let param = field_of(&path, &base);
            let message = match &param {
                Some(p) if base.starts_with("unknown field") => format!("unknown field `{p}` in the request body"),
                Some(p) => format!("invalid `{p}`: {base}"),
                None => format!("invalid request body: {base}"),
            };
            (message, param)
        };
        let mut err = ApiError::bad_request(message);
        err.param = param;
        err
    })?;
    de.end().map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    Ok(value)
}

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if mime != "application/json" && !(mime.starts_with("application/") && mime.ends_with("+json")) {
            let got = if ct.is_empty() { "none".to_string() } else { format!("`{ct}`") };
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                Some("unsupported_media_type"),
                format!("expected `Content-Type: application/json`, got {got}"),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            // A body that did not arrive in time surfaces as a buffering
            // error whose cause is the timeout layer's.
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            let mut timed_out = false;
            while let Some(c) = cause {
                timed_out |= c.is::<tower_http::timeout::TimeoutError>();
                cause = c.source();
            }
            let status = if timed_out { StatusCode::REQUEST_TIMEOUT } else { status };
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    "invalid_request_error",
                    Some("request_too_large"),
                    "the request body is larger than this server accepts",
                )
            } else if status == StatusCode::REQUEST_TIMEOUT {
                ApiError::new(status, "invalid_request_error", Some("request_timeout"), "the request body was not received in time")
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
        })?;
        parse(&bytes).map(JsonBody)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::wire::CompletionRequest;

    fn param_of(body: &str) -> Option<String> {
        parse::<CompletionRequest>(body.as_bytes()).expect_err("refused").param
    }

    #[test]
    fn unknown_duplicate_and_mistyped_fields_are_named() {
        assert_eq!(param_of(r#"{"prompt": "a", "foo": 1}"#).as_deref(), Some("foo"));
        assert_eq!(param_of(r#"{"prompt": "a", "prompt": "b"}"#).as_deref(), Some("prompt"));
        assert_eq!(param_of(r#"{"prompt": "a", "temperature": "hot"}"#).as_deref(), Some("temperature"));
        assert_eq!(param_of(r#"{"prompt": "a", "max_tokens": 1.5}"#).as_deref(), Some("max_tokens"));
        assert_eq!(param_of(r#"{"prompt": "a", "max_tokens": -1}"#).as_deref(), Some("max_tokens"));
        assert_eq!(param_of(r#"{"prompt": "a", "stream": "yes"}"#).as_deref(), Some("stream"));
        assert_eq!(param_of(r#"{"prompt": "a", "seed": 1180591620717411303424}"#).as_deref(), Some("seed"));
    }

    #[test]
    fn syntax_errors_have_no_param() {
        for body in [r#"{"prompt":"hi","#, "[1, 2]", r#"{"prompt": "a"} trailing"#, r#"{"prompt": NaN}"#, r#"{"x": 1e400}"#, "\"\\ud800\""]
        {
            let e = parse::<CompletionRequest>(body.as_bytes()).expect_err("refused");
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
        }
        let e = parse::<CompletionRequest>(b"").expect_err("refused");
        assert!(e.message.contains("empty"));
        let e = parse::<CompletionRequest>(&[b'{', b'"', 0xff, 0xfe, b'"', b'}']).expect_err("refused");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}

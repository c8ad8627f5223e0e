//! One error type for every HTTP answer that is not a success: a status, a machine-readable code
//! and a message. Details of internal failures are logged, never shown.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// An API error, rendered as `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or breaks a rule.
    #[error("{message}")]
    BadRequest {
        /// Machine-readable code.
        code: &'static str,
        /// What is wrong.
        message: String,
    },
    /// 401: no valid token.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the token does not grant this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: nothing there (or nothing the token may see).
    #[error("{0}")]
    NotFound(String),
    /// 409: a unique name is taken, or a single-use thing was used.
    #[error("{message}")]
    Conflict {
        /// Machine-readable code.
        code: &'static str,
        /// What is taken.
        message: String,
    },
    /// 429: over a rate limit; retry after the given seconds.
    #[error("{message}")]
    TooManyRequests {
        /// Which limit.
        message: String,
        /// Seconds until a retry can succeed (`Retry-After`).
        retry_after_secs: u64,
    },
    /// 429: the user or tenant holds as many WebSocket connections open on this node as it
    /// may; waiting does not help, closing one does.
    #[error("{0}")]
    TooManyConnections(String),
    /// 410: the cursor is too old (behind the tombstone horizon) or of another epoch: resync.
    #[error("{0}")]
    ResyncRequired(String),
    /// 408: the request body did not arrive in time.
    #[error("{0}")]
    Timeout(String),
    /// 413: the body is too large.
    #[error("{0}")]
    TooLarge(String),
    /// 503: a backing service (Kafka, MongoDB) is unavailable; retry later.
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    /// A 400 with a code and message.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// A 503 for a backing service that failed: `detail` (driver and server messages, which can
    /// name internal hosts) is logged here; the client is told only which service to wait for.
    pub fn backend(service: &str, detail: impl std::fmt::Display) -> Self {
        tracing::warn!(service, error = %detail, "backing service failed");
        ApiError::Unavailable(format!("{service} is unavailable; retry later"))
    }

    /// The 429 of a refused request.
    pub fn limited(l: crate::ratelimit::Limited) -> Self {
        ApiError::TooManyRequests {
            message: format!("rate limit reached; retry in {} s", l.retry_after_secs()),
            retry_after_secs: l.retry_after_secs(),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            ApiError::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::TooManyConnections(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_connections")
            }
            ApiError::ResyncRequired(_) => (StatusCode::GONE, "resync_required"),
            ApiError::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }
}

impl From<crate::auth::sessions::StoreError> for ApiError {
    fn from(e: crate::auth::sessions::StoreError) -> Self {
        ApiError::backend("the session store", e)
    }
}

impl From<crate::connections::Refused> for ApiError {
    fn from(e: crate::connections::Refused) -> Self {
        match e {
            crate::connections::Refused::Node(_) | crate::connections::Refused::Pending(_) => {
                ApiError::Unavailable(e.to_string())
            }
            _ => ApiError::TooManyConnections(e.to_string()),
        }
    }
}

impl From<crate::view::ViewError> for ApiError {
    fn from(e: crate::view::ViewError) -> Self {
        ApiError::backend("the view database", e)
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        match e {
            crate::auth::AuthError::Unavailable(_) => ApiError::backend("the session store", e),
            _ => ApiError::Unauthorized(e.to_string()),
        }
    }
}

impl From<processors::Rejection> for ApiError {
    fn from(r: processors::Rejection) -> Self {
        match r.code {
            processors::RejectCode::TooLarge => ApiError::TooLarge(r.message),
            code => ApiError::BadRequest {
                code: code.as_str(),
                message: r.message,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        if status.is_server_error() {
            tracing::warn!(%status, error = %self, "request failed");
        }
        let body = json!({"error": {"code": code, "message": self.to_string()}});
        let mut response = (status, Json(body)).into_response();
        if let ApiError::TooManyRequests {
            retry_after_secs, ..
        } = self
        {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(retry_after_secs),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

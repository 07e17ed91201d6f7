//! OpenAI-style error answers: `{"error": {"message", "type", "param", "code"}}` with the HTTP
//! status the `openai` clients map to their exception types (400 BadRequestError, 404
//! NotFoundError, 429 RateLimitError, 500 InternalServerError, 503 …).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (a full queue).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    pub fn model_not_found(asked: &str, served: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{asked}` does not exist; this server serves `{served}`"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    /// The queue is full: 429 while requests wait for batch slots, 503 while they wait for KV
    /// cache blocks (the server is out of memory for more); both with `Retry-After`.
    pub fn queue_full(max_queue: usize, out_of_blocks: bool) -> ApiError {
        let (status, kind, why) = if out_of_blocks {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "and the KV cache is out of blocks (--max-batch-tokens)",
            )
        } else {
            (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "--max-queue")
        };
        ApiError {
            status,
            message: format!("The server's queue is full ({max_queue} waiting requests, {why}); retry later"),
            kind,
            param: None,
            code: Some("queue_full"),
            retry_after: Some(1),
        }
    }

    pub fn unavailable() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "The server is shutting down".into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// An answer with `status` and no field to blame: how the connection layer answers a body
    /// too large (413), too slow (408) or cut by shutdown (503), and how any other non-JSON
    /// error (405 from the router) is rewritten as an error object.
    pub fn status(status: StatusCode, message: impl Into<String>) -> ApiError {
        let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        r
    }
}

/// Unknown routes answer 404 as an error object too.
pub async fn no_route() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "No such route; see GET /v1/models, POST /v1/chat/completions, POST /v1/completions".into(),
        kind: "invalid_request_error",
        param: None,
        code: None,
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_says_when_to_retry() {
        for (blocks, status) in
            [(false, StatusCode::TOO_MANY_REQUESTS), (true, StatusCode::SERVICE_UNAVAILABLE)]
        {
            let r = ApiError::queue_full(8, blocks).into_response();
            assert_eq!(r.status(), status);
            assert_eq!(r.headers()[axum::http::header::RETRY_AFTER], "1");
        }
        let r = ApiError::bad_request("x", None).into_response();
        assert!(r.headers().get(axum::http::header::RETRY_AFTER).is_none());
    }
}

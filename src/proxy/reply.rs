//! Errors gemgate itself answers, in the Gemini API's error shape.

use bytes::Bytes;

/// An error answered by gemgate (not relayed from Google).
#[derive(Debug, Clone)]
pub struct GateError {
    pub status: u16,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after_s: Option<u64>,
}

impl GateError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        GateError {
            status,
            message: message.into(),
            retry_after_s: None,
        }
    }

    pub fn retry_after(mut self, seconds: Option<u64>) -> Self {
        self.retry_after_s = seconds;
        self
    }

    /// `{"error":{"code":…,"message":…,"status":…}}`, as Google writes it.
    pub fn gemini_body(&self) -> Bytes {
        let body = serde_json::json!({
            "error": { "code": self.status, "message": self.message, "status": grpc_status(self.status) }
        });
        Bytes::from(body.to_string())
    }
}

/// The canonical gRPC status name Google pairs with an HTTP status.
pub fn grpc_status(http: u16) -> &'static str {
    match http {
        400 | 413 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 => "UNIMPLEMENTED",
        408 | 504 => "DEADLINE_EXCEEDED",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        501 => "UNIMPLEMENTED",
        502 | 503 => "UNAVAILABLE",
        _ => "INTERNAL",
    }
}

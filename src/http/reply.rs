//! Errors gemgate itself answers, in the shape of the protocol the client speaks (Gemini, or
//! OpenAI through `translate::openai`).

use bytes::Bytes;

/// Which API a client speaks: errors are answered in its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Google's native API (`/v1beta`).
    Gemini,
    /// OpenAI's API, translated by gemgate (`/v1`, `/hf/v1`).
    OpenAi,
    /// Google's own OpenAI-compatible API, passed through (`/openai/v1`).
    GoogleOpenAi,
    /// Anthropic's Messages API, translated by gemgate (`/v1/messages`).
    Anthropic,
}

impl Protocol {
    /// The name plugins see in `req.protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Gemini => "gemini",
            Protocol::OpenAi | Protocol::GoogleOpenAi => "openai",
            Protocol::Anthropic => "anthropic",
        }
    }
}

/// An error answered by gemgate (not relayed from Google).
#[derive(Debug, Clone)]
pub struct GateError {
    pub status: u16,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after_s: Option<u64>,
    /// The request field at fault (OpenAI's `param`).
    pub param: Option<String>,
    /// OpenAI's machine-readable `code`, where the cause has one its status does not say
    /// (`model_not_found` for a 404 about a model, not for a missing path or resource).
    pub code: Option<&'static str>,
}

impl GateError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        GateError {
            status,
            message: message.into(),
            retry_after_s: None,
            param: None,
            code: None,
        }
    }

    /// A 404 for a model the client named that cannot be served: OpenAI's `model_not_found`.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        GateError {
            code: Some("model_not_found"),
            ..GateError::new(404, message)
        }
    }

    /// A 400 naming the request field at fault.
    pub fn bad_request(e: crate::translate::openai::BadRequest) -> Self {
        GateError {
            param: e.param,
            ..GateError::new(400, e.message)
        }
    }

    /// The body in the client's protocol.
    pub fn body(&self, protocol: Protocol) -> Bytes {
        match protocol {
            Protocol::Gemini => self.gemini_body(),
            Protocol::OpenAi | Protocol::GoogleOpenAi => Bytes::from(
                crate::translate::openai::error_body(
                    self.status,
                    &self.message,
                    self.param.as_deref(),
                    self.code,
                )
                .to_string(),
            ),
            Protocol::Anthropic => {
                let kind = crate::translate::anthropic::error_type(self.status);
                let body = serde_json::json!({
                    "type": "error",
                    "error": { "type": kind, "message": self.message },
                });
                Bytes::from(crate::translate::json_text(&body))
            }
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
        Bytes::from(crate::translate::json_text(&body))
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

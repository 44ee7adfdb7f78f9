//! The OpenAI-compatible API: requests translated to Gemini's native calls and answers
//! translated back, for whole answers and for streams.
//!
//! Everything here is pure data transformation on JSON values, so it is tested without
//! sockets; `proxy` runs the translated calls over the same key pool and attempt loop as native
//! calls.

pub mod chat;
pub mod embeddings;
pub mod images;
pub mod responses;
pub mod schema;
pub mod speech;

use serde_json::{Value, json};

/// A request the client got wrong: answered with 400 naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    pub param: Option<String>,
    pub message: String,
}

impl BadRequest {
    pub fn new(param: &str, message: impl Into<String>) -> BadRequest {
        BadRequest {
            param: Some(param.to_owned()),
            message: message.into(),
        }
    }
}

/// OpenAI's error body: `{"error":{"message","type","param","code"}}`. `code` is the cause's
/// own (`model_not_found`), else the one OpenAI gives the status, if any: a 404 has none of its
/// own, since a missing path or response is not a missing model.
pub fn error_body(
    status: u16,
    message: &str,
    param: Option<&str>,
    code: Option<&'static str>,
) -> Value {
    let (kind, by_status) = match status {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        403 => ("permission_error", None),
        429 => ("rate_limit_exceeded", Some("rate_limit_exceeded")),
        500..=599 => ("api_error", None),
        _ => ("invalid_request_error", None),
    };
    let code = code.or(by_status);
    json!({ "error": { "message": message, "type": kind, "param": param, "code": code } })
}

/// The models list in OpenAI's shape, from Gemini's model entries.
pub fn models_list(models: &[Value]) -> Value {
    let data: Vec<Value> = models
        .iter()
        .filter_map(|m| m.get("name")?.as_str())
        .map(|name| {
            json!({
                "id": name.strip_prefix("models/").unwrap_or(name),
                "object": "model",
                "created": 0,
                "owned_by": "google",
            })
        })
        .collect();
    json!({ "object": "list", "data": data })
}

/// `gemini-2.5-flash` from `models/gemini-2.5-flash` or `gemini-2.5-flash`; an empty or
/// ill-formed model is the client's error.
pub fn model_of(body: &Value) -> Result<String, BadRequest> {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| BadRequest::new("model", "`model` is required"))?;
    let model = model.trim().strip_prefix("models/").unwrap_or(model.trim());
    if model.len() > 128 {
        return Err(BadRequest::new(
            "model",
            "a model name is at most 128 bytes",
        ));
    }
    let valid = model.starts_with(|c: char| c.is_ascii_alphanumeric())
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if !valid {
        return Err(BadRequest::new(
            "model",
            format!("{model:?} is not a model name"),
        ));
    }
    Ok(model.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_and_errors_have_openai_shapes() {
        let list = models_list(&[json!({"name": "models/gemini-2.5-flash"})]);
        assert_eq!(list["data"][0]["id"], "gemini-2.5-flash");
        assert_eq!(list["object"], "list");
        let e = error_body(401, "no", None, None);
        assert_eq!(e["error"]["code"], "invalid_api_key");
        assert!(model_of(&json!({"model": "../x"})).is_err());
        assert_eq!(
            model_of(&json!({"model": "models/gemini-2.5-pro"})).unwrap(),
            "gemini-2.5-pro"
        );
    }
}

//! `POST /v1/embeddings` → `embedContent` (one input) or `batchEmbedContents` (many).

use base64::Engine as _;
use serde_json::{Value, json};

use super::BadRequest;

/// A translated embeddings request.
#[derive(Debug)]
pub struct EmbeddingsCall {
    pub model: String,
    /// `embedContent` or `batchEmbedContents`.
    pub action: &'static str,
    pub body: Value,
    pub base64: bool,
}

pub fn request(body: &Value) -> Result<EmbeddingsCall, BadRequest> {
    let model = super::model_of(body)?;
    let inputs: Vec<&str> = match body.get("input") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|i| {
                i.as_str().ok_or_else(|| {
                    BadRequest::new("input", "`input` must be a string or a list of strings")
                })
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(BadRequest::new(
                "input",
                "`input` must be a string or a non-empty list of strings",
            ));
        }
    };
    let dimensions = match body.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(d) => Some(
            d.as_u64()
                .filter(|d| *d > 0)
                .ok_or_else(|| BadRequest::new("dimensions", "must be a positive integer"))?,
        ),
    };
    let base64 = match body.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(BadRequest::new(
                "encoding_format",
                format!("{other:?} is not float or base64"),
            ));
        }
    };
    let one = |text: &str| {
        let mut req = json!({
            "model": format!("models/{model}"),
            "content": { "parts": [{ "text": text }] },
        });
        if let Some(d) = dimensions {
            req["outputDimensionality"] = json!(d);
        }
        req
    };
    let (action, body) = if inputs.len() == 1 {
        ("embedContent", one(inputs[0]))
    } else {
        (
            "batchEmbedContents",
            json!({ "requests": inputs.iter().map(|t| one(t)).collect::<Vec<_>>() }),
        )
    };
    Ok(EmbeddingsCall {
        model,
        action,
        body,
        base64,
    })
}

/// Gemini's answer (`embedding` or `embeddings`) in OpenAI's list shape.
pub fn response(call: &EmbeddingsCall, answer: &Value) -> Value {
    let vectors: Vec<&Value> = match answer.get("embeddings").and_then(Value::as_array) {
        Some(list) => list.iter().collect(),
        None => answer.get("embedding").into_iter().collect(),
    };
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let values: Vec<f64> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|v| v.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            let embedding = if call.base64 {
                let bytes: Vec<u8> = values
                    .iter()
                    .flat_map(|f| (*f as f32).to_le_bytes())
                    .collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(values)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": call.model,
        "usage": { "prompt_tokens": 0, "total_tokens": 0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_input_or_many() {
        let call = request(&json!({"model": "text-embedding-004", "input": "hi", "dimensions": 3}))
            .unwrap();
        assert_eq!(call.action, "embedContent");
        assert_eq!(call.body["outputDimensionality"], 3);
        let call =
            request(&json!({"model": "m", "input": ["a", "b"], "encoding_format": "base64"}))
                .unwrap();
        assert_eq!(call.action, "batchEmbedContents");
        assert_eq!(call.body["requests"].as_array().unwrap().len(), 2);
        let out = response(
            &call,
            &json!({"embeddings": [{"values": [1.0]}, {"values": [0.5]}]}),
        );
        assert_eq!(out["data"][1]["index"], 1);
        assert_eq!(out["data"][0]["embedding"], "AACAPw==");
        assert!(request(&json!({"model": "m", "input": [1, 2]})).is_err());
    }
}

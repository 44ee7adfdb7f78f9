//! Reading the parts of a Gemini answer, for the translations that turn them into another
//! protocol's blocks or items.

use serde_json::Value;

/// What one part of a candidate says.
pub enum Said<'a> {
    Thought {
        text: &'a str,
        signature: Option<&'a str>,
    },
    Text(String),
    Call {
        name: &'a str,
        args: Option<&'a Value>,
        signature: Option<&'a str>,
    },
}

/// An image, a piece of code or its result as markdown text (`None`: another kind of part).
/// The translated protocols' answers have no place of their own for them.
pub fn markdown_of(p: &Value) -> Option<String> {
    let text = if let Some(data) = p.get("inlineData") {
        let mime = data
            .get("mimeType")
            .and_then(Value::as_str)
            .unwrap_or("image/png");
        let b64 = data.get("data").and_then(Value::as_str).unwrap_or_default();
        format!("\n\n![image](data:{mime};base64,{b64})\n\n")
    } else if let Some(code) = p.get("executableCode") {
        let lang = code
            .get("language")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let src = code.get("code").and_then(Value::as_str).unwrap_or_default();
        format!("\n```{lang}\n{src}\n```\n")
    } else if let Some(result) = p.get("codeExecutionResult") {
        let out = result
            .get("output")
            .and_then(Value::as_str)
            .unwrap_or_default();
        format!("\n```\n{out}\n```\n")
    } else {
        return None;
    };
    Some(text)
}

/// Reads the parts of one candidate: thoughts (with their signature), text (images and code
/// as markdown), and calls.
pub fn read_parts(candidate: &Value) -> Vec<Said<'_>> {
    let parts = candidate
        .pointer("/content/parts")
        .and_then(Value::as_array);
    parts
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let signature = p
                .get("thoughtSignature")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            if let Some(call) = p.get("functionCall") {
                return Some(Said::Call {
                    name: call.get("name").and_then(Value::as_str).unwrap_or_default(),
                    args: call.get("args").filter(|a| !a.is_null()),
                    signature,
                });
            }
            let text = p.get("text").and_then(Value::as_str);
            if p.get("thought").and_then(Value::as_bool) == Some(true) {
                let text = text.unwrap_or_default();
                return (!text.is_empty() || signature.is_some())
                    .then_some(Said::Thought { text, signature });
            }
            let text = match text {
                Some(text) => text.to_owned(),
                None => markdown_of(p)?,
            };
            (!text.is_empty()).then_some(Said::Text(text))
        })
        .collect()
}

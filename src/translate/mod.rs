//! Other protocols to and from Gemini's, as pure functions over request and answer bodies:
//! no I/O, no state.

pub mod anthropic;
pub mod openai;
pub mod parts;
pub mod usage;

use serde_json::Value;

/// A JSON value (or anything serialisable) as text, by serde_json's writer: several times cheaper than `Value`'s
/// `Display` (`to_string()`, `format!("{v}")`), which goes through a formatter for every token.
pub fn json_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("a JSON value serialises")
}

/// The same as bytes, for an answer's body.
pub fn json_bytes(v: &impl serde::Serialize) -> bytes::Bytes {
    bytes::Bytes::from(serde_json::to_vec(v).expect("a JSON value serialises"))
}

/// Each JSON object of complete Gemini server-sent events (`data: {json}` lines, CRLF or LF;
/// anything else is passed over), until `each` answers `false`.
pub fn each_event(events: &[u8], mut each: impl FnMut(&Value) -> bool) {
    let text = String::from_utf8_lossy(events);
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let Ok(answer @ Value::Object(_)) = serde_json::from_str::<Value>(data.trim()) else {
            continue;
        };
        if !each(&answer) {
            break;
        }
    }
}

/// Appends one server-sent event, `event: {name}` (when named) and `data: {data}`.
pub fn push_event(out: &mut String, name: Option<&str>, data: &Value) {
    if let Some(name) = name {
        out.push_str("event: ");
        out.push_str(name);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(&json_text(data));
    out.push_str("\n\n");
}

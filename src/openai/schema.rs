//! JSON Schemas from OpenAI clients, cleaned of what Gemini's `responseSchema` and function
//! `parameters` reject.

use serde_json::{Map, Value};

/// Keywords Gemini's schema subset does not accept.
const REJECTED: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "definitions",
    "additionalProperties",
    "unevaluatedProperties",
    "patternProperties",
    "strict",
    "examples",
    "default",
    "const",
    "title",
];

/// Returns `schema` with rejected keywords removed at every level, `$ref`s to `$defs` inlined,
/// and `"type": ["x", "null"]` turned into `"type": "x", "nullable": true`.
pub fn clean(schema: &Value) -> Value {
    let defs = schema
        .get("$defs")
        .or_else(|| schema.get("definitions"))
        .cloned()
        .unwrap_or(Value::Null);
    clean_with(schema, &defs, 0)
}

fn clean_with(v: &Value, defs: &Value, depth: usize) -> Value {
    if depth > 32 {
        return Value::Object(Map::new());
    }
    match v {
        Value::Object(m) => {
            if let Some(target) = m.get("$ref").and_then(Value::as_str) {
                let name = target.rsplit('/').next().unwrap_or_default();
                if let Some(def) = defs.get(name) {
                    return clean_with(def, defs, depth + 1);
                }
            }
            let mut out = Map::new();
            for (k, v) in m {
                if REJECTED.contains(&k.as_str()) || k == "$ref" {
                    continue;
                }
                if k == "type" {
                    if let Value::Array(types) = v {
                        let real: Vec<&Value> = types
                            .iter()
                            .filter(|t| t.as_str() != Some("null"))
                            .collect();
                        if real.len() < types.len() {
                            out.insert("nullable".into(), Value::Bool(true));
                        }
                        if let Some(first) = real.first() {
                            out.insert("type".into(), (*first).clone());
                        }
                        continue;
                    }
                }
                // `properties` maps names to schemas: clean each, keep every name.
                if k == "properties" {
                    if let Value::Object(props) = v {
                        let cleaned = props
                            .iter()
                            .map(|(name, s)| (name.clone(), clean_with(s, defs, depth + 1)))
                            .collect();
                        out.insert(k.clone(), Value::Object(cleaned));
                        continue;
                    }
                }
                out.insert(k.clone(), clean_with(v, defs, depth + 1));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| clean_with(i, defs, depth + 1))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rejected_keywords_go_and_refs_are_inlined() {
        let s = json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "title": { "type": ["string", "null"], "default": "x" },
                "point": { "$ref": "#/$defs/Point" }
            },
            "$defs": { "Point": { "type": "object", "properties": { "x": { "type": "number" } }, "additionalProperties": false } },
            "required": ["title"]
        });
        assert_eq!(
            clean(&s),
            json!({
                "type": "object",
                "properties": {
                    "title": { "type": "string", "nullable": true },
                    "point": { "type": "object", "properties": { "x": { "type": "number" } } }
                },
                "required": ["title"]
            })
        );
    }
}

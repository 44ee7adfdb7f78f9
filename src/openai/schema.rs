//! JSON Schemas from OpenAI clients, cleaned of what Gemini's `responseSchema` and function
//! `parameters` reject.
//!
//! A schema is client input and `$ref` makes it a graph: a `$defs` entry that names itself
//! from a few properties expands, inlined, to more nodes than memory holds (1 KB of JSON was
//! enough to abort the process). Cleaning therefore refuses `$ref` cycles outright and works
//! within a budget of output nodes and nesting depth; past either, the client gets a 400.

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

/// Most JSON values one cleaned schema may hold, `$ref`s inlined. Real tool schemas have tens
/// to a few hundred.
pub const MAX_NODES: usize = 20_000;
/// Deepest nesting of a cleaned schema, counting every object and list on the way down.
pub const MAX_DEPTH: usize = 64;

/// Why a schema cannot be cleaned: the client's error, said plainly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaError {
    /// `$ref` to a definition that is being expanded already.
    Cycle(String),
    TooLarge,
    TooDeep,
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SchemaError::Cycle(name) => write!(
                f,
                "the schema's $ref to {name:?} refers back to itself; Gemini takes no recursive schemas"
            ),
            SchemaError::TooLarge => write!(
                f,
                "the schema expands (with its $refs inlined) to more than {MAX_NODES} nodes"
            ),
            SchemaError::TooDeep => write!(f, "the schema nests deeper than {MAX_DEPTH} levels"),
        }
    }
}

/// Returns `schema` with rejected keywords removed at every level, `$ref`s to `$defs` inlined,
/// and `"type": ["x", "null"]` turned into `"type": "x", "nullable": true`.
pub fn clean(schema: &Value) -> Result<Value, SchemaError> {
    let defs = schema.get("$defs").or_else(|| schema.get("definitions"));
    let mut walk = Walk {
        defs,
        expanding: Vec::new(),
        nodes: 0,
    };
    walk.clean(schema, 0)
}

/// One cleaning: the definitions `$ref`s point into, the ones being expanded now, and the
/// nodes made so far.
struct Walk<'a> {
    defs: Option<&'a Value>,
    expanding: Vec<&'a str>,
    nodes: usize,
}

impl<'a> Walk<'a> {
    fn clean(&mut self, v: &'a Value, depth: usize) -> Result<Value, SchemaError> {
        if depth > MAX_DEPTH {
            return Err(SchemaError::TooDeep);
        }
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(SchemaError::TooLarge);
        }
        match v {
            Value::Object(m) => {
                if let Some(target) = m.get("$ref").and_then(Value::as_str) {
                    let name = target.rsplit('/').next().unwrap_or_default();
                    if let Some(def) = self.defs.and_then(|d| d.get(name)) {
                        if self.expanding.contains(&name) {
                            return Err(SchemaError::Cycle(name.to_owned()));
                        }
                        self.expanding.push(name);
                        let inlined = self.clean(def, depth + 1);
                        self.expanding.pop();
                        return inlined;
                    }
                }
                let mut out = Map::new();
                for (k, v) in m {
                    if REJECTED.contains(&k.as_str()) || k == "$ref" {
                        continue;
                    }
                    if let ("type", Value::Array(types)) = (k.as_str(), v) {
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
                    // `properties` maps names to schemas: clean each, keep every name.
                    if let ("properties", Value::Object(props)) = (k.as_str(), v) {
                        let mut cleaned = Map::new();
                        for (name, s) in props {
                            cleaned.insert(name.clone(), self.clean(s, depth + 1)?);
                        }
                        out.insert(k.clone(), Value::Object(cleaned));
                        continue;
                    }
                    out.insert(k.clone(), self.clean(v, depth + 1)?);
                }
                Ok(Value::Object(out))
            }
            Value::Array(items) => items
                .iter()
                .map(|i| self.clean(i, depth + 1))
                .collect::<Result<_, _>>()
                .map(Value::Array),
            other => Ok(other.clone()),
        }
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
                "point": { "$ref": "#/$defs/Point" },
                "again": { "$ref": "#/$defs/Point" }
            },
            "$defs": { "Point": { "type": "object", "properties": { "x": { "type": "number" } }, "additionalProperties": false } },
            "required": ["title"]
        });
        let point = json!({ "type": "object", "properties": { "x": { "type": "number" } } });
        assert_eq!(
            clean(&s).unwrap(),
            json!({
                "type": "object",
                "properties": {
                    "title": { "type": "string", "nullable": true },
                    "point": point,
                    "again": point
                },
                "required": ["title"]
            })
        );
    }

    #[test]
    fn cycles_are_refused() {
        let direct = json!({ "$ref": "#/$defs/A", "$defs": { "A": { "properties": { "a": { "$ref": "#/$defs/A" } } } } });
        assert_eq!(clean(&direct), Err(SchemaError::Cycle("A".into())));
        let mutual = json!({ "$ref": "#/$defs/A", "$defs": {
            "A": { "items": { "$ref": "#/$defs/B" } },
            "B": { "items": { "$ref": "#/$defs/A" } } } });
        assert_eq!(clean(&mutual), Err(SchemaError::Cycle("A".into())));
    }

    #[test]
    fn expansion_and_nesting_are_bounded() {
        // Each level refers to the next eight times: 8^6 nodes once inlined, from a few
        // hundred bytes.
        let mut defs = serde_json::Map::new();
        for level in 0..6 {
            let next = json!({ "$ref": format!("#/$defs/L{}", level + 1) });
            let props: serde_json::Map<String, Value> =
                (0..8).map(|i| (format!("p{i}"), next.clone())).collect();
            defs.insert(format!("L{level}"), json!({ "properties": props }));
        }
        defs.insert("L6".into(), json!({ "type": "string" }));
        let wide = json!({ "$ref": "#/$defs/L0", "$defs": defs });
        assert_eq!(clean(&wide), Err(SchemaError::TooLarge));

        let mut deep = json!({ "type": "string" });
        for _ in 0..MAX_DEPTH {
            deep = json!({ "items": deep });
        }
        assert_eq!(clean(&deep), Err(SchemaError::TooDeep));
    }
}

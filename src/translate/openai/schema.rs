//! JSON Schemas from OpenAI clients, cleaned of what Gemini's `responseSchema` and function
//! `parameters` reject.
//!
//! A schema is client input and `$ref` makes it a graph: a `$defs` entry that names itself
//! from a few properties expands, inlined, to more nodes than memory holds (1 KB of JSON was
//! enough to abort the process). Cleaning therefore refuses `$ref` cycles outright and works
//! within a budget of output nodes, output bytes and nesting depth, one budget for all the
//! schemas of a request (its tools and its response format); past it, the client gets a 400.

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

/// Most JSON values the cleaned schemas of one request may hold, `$ref`s inlined. Real tool
/// schemas have tens to a few hundred each.
pub const MAX_NODES: usize = 50_000;
/// Most bytes of names and strings the cleaned schemas of one request may hold: a long
/// description reached through many `$ref`s is copied once for each.
pub const MAX_BYTES: usize = 4 << 20;
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
                "the request's schemas expand (with their $refs inlined) to more than \
                 {MAX_NODES} nodes or {MAX_BYTES} bytes"
            ),
            SchemaError::TooDeep => write!(f, "the schema nests deeper than {MAX_DEPTH} levels"),
        }
    }
}

/// What is left for cleaning the schemas of one request.
#[derive(Debug)]
pub struct Budget {
    nodes: usize,
    bytes: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            nodes: MAX_NODES,
            bytes: MAX_BYTES,
        }
    }
}

impl Budget {
    /// Spends `nodes` values of `bytes` bytes, or says the budget is gone.
    fn spend(&mut self, nodes: usize, bytes: usize) -> Result<(), SchemaError> {
        match (self.nodes.checked_sub(nodes), self.bytes.checked_sub(bytes)) {
            (Some(nodes), Some(bytes)) => {
                self.nodes = nodes;
                self.bytes = bytes;
                Ok(())
            }
            _ => Err(SchemaError::TooLarge),
        }
    }
}

/// Returns `schema` with rejected keywords removed at every level, `$ref`s to `$defs` inlined,
/// and `"type": ["x", "null"]` turned into `"type": "x", "nullable": true`, spending `budget`.
pub fn clean(schema: &Value, budget: &mut Budget) -> Result<Value, SchemaError> {
    let defs = schema.get("$defs").or_else(|| schema.get("definitions"));
    let mut walk = Walk {
        defs,
        expanding: Vec::new(),
        budget,
    };
    walk.clean(schema, 0)
}

/// One cleaning: the definitions `$ref`s point into, the ones being expanded now, and what is
/// left to spend.
struct Walk<'a, 'b> {
    defs: Option<&'a Value>,
    expanding: Vec<&'a str>,
    budget: &'b mut Budget,
}

impl<'a> Walk<'a, '_> {
    fn clean(&mut self, v: &'a Value, depth: usize) -> Result<Value, SchemaError> {
        if depth > MAX_DEPTH {
            return Err(SchemaError::TooDeep);
        }
        // A string costs its length, any other value a few bytes; member names are counted
        // below, with their values.
        self.budget.spend(
            1,
            match v {
                Value::String(s) => s.len(),
                _ => 8,
            },
        )?;
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
                            self.budget.spend(0, name.len())?;
                            cleaned.insert(name.clone(), self.clean(s, depth + 1)?);
                        }
                        out.insert(k.clone(), Value::Object(cleaned));
                        continue;
                    }
                    self.budget.spend(0, k.len())?;
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

    fn clean(schema: &Value) -> Result<Value, SchemaError> {
        super::clean(schema, &mut Budget::default())
    }

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

    #[test]
    fn long_strings_copied_through_refs_spend_the_byte_budget() {
        // 64 KiB of description reached through 8 × 8 `$ref`s: 4 MiB once inlined, from a
        // body of 64 KiB and a few hundred nodes.
        let leaf = json!({ "type": "string", "description": "x".repeat(64 << 10) });
        let eight = |next: &str| {
            let props: serde_json::Map<String, Value> = (0..8)
                .map(|i| {
                    (
                        format!("p{i}"),
                        json!({ "$ref": format!("#/$defs/{next}") }),
                    )
                })
                .collect();
            json!({ "properties": props })
        };
        let wide = json!({ "$ref": "#/$defs/A", "$defs": { "A": eight("B"), "B": eight("C"), "C": leaf } });
        assert_eq!(clean(&wide), Err(SchemaError::TooLarge));
    }

    #[test]
    fn one_budget_serves_all_the_schemas_of_a_request() {
        let half = json!({ "description": "x".repeat(MAX_BYTES / 2) });
        let mut budget = Budget::default();
        assert!(super::clean(&half, &mut budget).is_ok());
        assert_eq!(super::clean(&half, &mut budget), Err(SchemaError::TooLarge));
    }
}

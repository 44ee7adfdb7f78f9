//! What `on_request` plugins ask to change in a request, and how the change is made.

use http::{HeaderName, HeaderValue};

/// The changes `on_request` plugins asked for, merged in priority order.
#[derive(Debug, Default)]
pub struct Rewrite {
    pub model: Option<String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Merged over the request's `generationConfig` (the plugin wins).
    pub generation_config: Option<serde_json::Value>,
    /// Merged under the request's `generationConfig` (the client wins).
    pub generation_config_defaults: Option<serde_json::Value>,
    /// Added to the request's `tools` (a tool of the same kind is not added twice).
    pub tools: Vec<serde_json::Value>,
}

impl Rewrite {
    /// Whether the request body must change.
    pub fn touches_body(&self) -> bool {
        self.generation_config.is_some()
            || self.generation_config_defaults.is_some()
            || !self.tools.is_empty()
    }

    /// Applies the body's part of the rewrite (`generation_config`,
    /// `generation_config_defaults`, `tools`) to a Gemini request; the error is the client's.
    pub fn apply(&self, v: &mut serde_json::Value) -> Result<(), &'static str> {
        if !self.touches_body() {
            return Ok(());
        }
        let obj = v
            .as_object_mut()
            .ok_or("the request body must be a JSON object")?;
        if self.generation_config.is_some() || self.generation_config_defaults.is_some() {
            let slot = obj
                .entry("generationConfig")
                .or_insert_with(|| serde_json::json!({}));
            if let Some(defaults) = &self.generation_config_defaults {
                let client = slot.take();
                let mut merged = defaults.clone();
                merge(&mut merged, client.clone());
                *slot = merged;
                one_thinking_setting(slot, &client);
            }
            if let Some(over) = &self.generation_config {
                merge(slot, over.clone());
                one_thinking_setting(slot, over);
            }
        }
        if !self.tools.is_empty() {
            let tools = obj.entry("tools").or_insert_with(|| serde_json::json!([]));
            let list = tools
                .as_array_mut()
                .ok_or("`tools` in the request body must be a list")?;
            for tool in &self.tools {
                // A tool of the same kind (`googleSearch`, `codeExecution`, …) is not added twice.
                let kind = tool.as_object().and_then(|t| t.keys().next());
                let present = list.iter().any(|t| {
                    t.as_object()
                        .is_some_and(|t| kind.is_some_and(|k| t.contains_key(k)))
                });
                if !present {
                    list.push(tool.clone());
                }
            }
        }
        Ok(())
    }
}

/// Merges `over` into `base`, objects field by field, `over` winning.
pub fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Google refuses a `thinkingConfig` with both a `thinkingLevel` (Gemini 3) and a
/// `thinkingBudget`: when a merge made both, the one `kept` (the client's config, or a
/// plugin's override) set stays.
fn one_thinking_setting(config: &mut serde_json::Value, kept: &serde_json::Value) {
    let Some(thinking) = config
        .get_mut("thinkingConfig")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return;
    };
    if thinking.contains_key("thinkingLevel") && thinking.contains_key("thinkingBudget") {
        let keep_level = kept.pointer("/thinkingConfig/thinkingLevel").is_some();
        thinking.remove(if keep_level {
            "thinkingBudget"
        } else {
            "thinkingLevel"
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thinking_config_never_has_both_a_level_and_a_budget() {
        let level = serde_json::json!({ "thinkingConfig": { "thinkingLevel": "high" } });
        let budget = serde_json::json!({ "thinkingConfig": { "thinkingBudget": 1024 } });
        let mut merged = budget.clone();
        merge(&mut merged, level.clone());
        one_thinking_setting(&mut merged, &level);
        assert_eq!(merged, level, "the client's level over a default budget");
        let mut merged = level.clone();
        merge(&mut merged, budget.clone());
        one_thinking_setting(&mut merged, &budget);
        assert_eq!(
            merged, budget,
            "an override's budget over the client's level"
        );
    }
}

//! OpenAI's Responses API (`POST /v1/responses`) ⇄ `generateContent` /
//! `streamGenerateContent`.
//!
//! The request keeps everything the client said that Gemini has a place for and adds nothing of
//! its own; the conversation before a `previous_response_id` comes from gemgate's store, as
//! Responses items, and goes first. The answer keeps every part of the first candidate as output
//! items: thoughts as a `reasoning` item, text as an assistant `message`, each call as a
//! `function_call`. A call's thought signature goes out in the item's
//! `extra_content.google.thought_signature` (where chat completions put it), so a client that
//! sends the output back as input, as Responses clients do, returns it on the right call.
//! Streams are translated event by event as they arrive.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::chat::{
    data_url_part, declaration, function_calling_config, gemini_tools, keep_google_settings, push,
    stand_in_signatures, thinking_config,
};
use super::{BadRequest, model_of, schema};
use crate::translate::parts::{Said, read_parts};

/// A translated Responses request.
#[derive(Debug)]
pub struct ResponsesCall {
    pub model: String,
    pub stream: bool,
    /// `store` (default true): gemgate keeps the response and its conversation.
    pub store: bool,
    pub previous_response_id: Option<String>,
    /// The generateContent body (the history's turns first, then this request's input).
    pub body: Value,
    /// This request's input as Responses items (a string input becomes one user message item),
    /// to be stored with the output for later `previous_response_id` calls.
    pub input_items: Vec<Value>,
    /// Function calls that came back without their thought signature, sent with Google's
    /// placeholder in its place (Gemini 3 refuses a model turn's call without one).
    pub placeholder_signatures: usize,
}

/// Longest `previous_response_id` taken: gemgate's ids are far shorter.
const MAX_RESPONSE_ID: usize = 128;

/// Translates a Responses request into a Gemini request. `history` is the stored conversation
/// before this request (Responses items, oldest first: earlier inputs and outputs), empty
/// without `previous_response_id`.
pub fn request(body: &Value, history: &[Value]) -> Result<ResponsesCall, BadRequest> {
    let obj = body
        .as_object()
        .ok_or_else(|| BadRequest::new("body", "the request body must be a JSON object"))?;
    let model = model_of(body)?;
    let previous_response_id = previous_response_id(obj)?;
    let input_items = input_items(obj.get("input"))?;

    let mut turns = Turns::default();
    if let Some(instructions) = instructions(obj)? {
        turns.system.push(json!({ "text": instructions }));
    }
    for item in history {
        // Stored items were the client's once and were read then; if one cannot be read now,
        // the conversation it belongs to is what the client must change.
        turns.add(item, "history").map_err(|e| {
            BadRequest::new(
                "previous_response_id",
                format!("the stored conversation cannot be sent on: {}", e.message),
            )
        })?;
    }
    match obj.get("input") {
        Some(Value::String(_)) => turns.add(&input_items[0], "input")?,
        _ => {
            for (i, item) in input_items.iter().enumerate() {
                turns.add(item, &format!("input[{i}]"))?;
            }
        }
    }
    if turns.contents.is_empty() {
        return Err(BadRequest::new(
            "input",
            "`input` needs at least one user or assistant message",
        ));
    }
    let placeholders = stand_in_signatures(&model, &mut turns.contents);

    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(turns.contents));
    if !turns.system.is_empty() {
        out.insert("systemInstruction".into(), json!({ "parts": turns.system }));
    }
    // One budget for every schema of the request: many tools cannot multiply it.
    let mut budget = schema::Budget::default();
    let config = generation_config(obj, &model, &mut budget)?;
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    let tools = tools(obj.get("tools"), &mut budget)?;
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = obj.get("tool_choice").filter(|c| !c.is_null()) {
        out.insert(
            "toolConfig".into(),
            json!({ "functionCallingConfig": tool_choice(choice)? }),
        );
    }
    keep_google_settings(body, obj, &mut out);
    Ok(ResponsesCall {
        model,
        stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
        store: obj.get("store").and_then(Value::as_bool).unwrap_or(true),
        previous_response_id,
        body: Value::Object(out),
        input_items,
        placeholder_signatures: placeholders,
    })
}

/// `previous_response_id`, if the client sent one.
fn previous_response_id(obj: &Map<String, Value>) -> Result<Option<String>, BadRequest> {
    match obj.get("previous_response_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_RESPONSE_ID => {
            Ok(Some(id.clone()))
        }
        Some(_) => Err(BadRequest::new(
            "previous_response_id",
            format!("must be a response id: a string of 1 to {MAX_RESPONSE_ID} bytes"),
        )),
    }
}

/// `input` as Responses items: a string is one user message.
fn input_items(input: Option<&Value>) -> Result<Vec<Value>, BadRequest> {
    match input {
        Some(Value::String(s)) => Ok(vec![json!({
            "type": "message",
            "role": "user",
            "content": [{ "type": "input_text", "text": s }],
        })]),
        Some(Value::Array(items)) => Ok(items.clone()),
        None | Some(Value::Null) => Err(BadRequest::new("input", "`input` is required")),
        Some(_) => Err(BadRequest::new(
            "input",
            "must be a string or a list of input items",
        )),
    }
}

/// `instructions`: a string, put first in the system instruction.
fn instructions(obj: &Map<String, Value>) -> Result<Option<&str>, BadRequest> {
    match obj.get("instructions") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str()).filter(|s| !s.is_empty())),
        Some(_) => Err(BadRequest::new("instructions", "must be a string")),
    }
}

/// The items of a conversation as Gemini sees them.
#[derive(Default)]
struct Turns {
    /// The parts of the system instruction.
    system: Vec<Value>,
    /// The user and model turns.
    contents: Vec<Value>,
    /// Call ids → function names, for `function_call_output` items (which name only the id).
    call_names: HashMap<String, String>,
    /// The signature of a `reasoning` item, for the function call after it.
    signature: Option<Value>,
}

impl Turns {
    /// Adds one item, `field` naming it in errors: a message to the system instruction or as a
    /// turn of its role, a call to a model turn, a call's output to a user turn.
    fn add(&mut self, item: &Value, field: &str) -> Result<(), BadRequest> {
        if !item.is_object() {
            return Err(BadRequest::new(field, "every input item must be an object"));
        }
        match item.get("type").and_then(Value::as_str) {
            None | Some("message") => self.message(item, field),
            Some("function_call") => {
                let part = self.function_call(item, field)?;
                push(&mut self.contents, "model", vec![part]);
                Ok(())
            }
            Some("function_call_output") => {
                self.signature = None;
                let parts = self.function_response(item, field)?;
                push(&mut self.contents, "user", parts);
                Ok(())
            }
            // Its summary and encrypted content are not Gemini's to read; only a signature
            // that gemgate put there goes back, on the call after it.
            Some("reasoning") => {
                if let Some(sig) = signature_of(item) {
                    self.signature = Some(sig.clone());
                }
                Ok(())
            }
            Some(other) => Err(BadRequest::new(
                &format!("{field}.type"),
                format!(
                    "item type {other:?} is not supported: send message, function_call, \
                     function_call_output or reasoning items"
                ),
            )),
        }
    }

    /// A message item (`type` `message`, or just a role and content).
    fn message(&mut self, item: &Value, field: &str) -> Result<(), BadRequest> {
        let role = item.get("role").and_then(Value::as_str).ok_or_else(|| {
            BadRequest::new(&format!("{field}.role"), "every message needs a role")
        })?;
        let parts = parts(item.get("content"), &format!("{field}.content"))?;
        match role {
            "system" | "developer" => self.system.extend(parts),
            "user" => {
                self.signature = None;
                push(&mut self.contents, "user", parts);
            }
            "assistant" => push(&mut self.contents, "model", parts),
            other => {
                return Err(BadRequest::new(
                    &format!("{field}.role"),
                    format!("unknown role {other:?}: user, assistant, system or developer"),
                ));
            }
        }
        Ok(())
    }

    /// A `function_call` item as a `functionCall` part, with its signature (its own, or the
    /// reasoning item's before it); remembers its name for its output.
    fn function_call(&mut self, item: &Value, field: &str) -> Result<Value, BadRequest> {
        let call_id = item.get("call_id").and_then(Value::as_str).ok_or_else(|| {
            BadRequest::new(
                &format!("{field}.call_id"),
                "a function call needs its call_id",
            )
        })?;
        let name = item.get("name").and_then(Value::as_str).ok_or_else(|| {
            BadRequest::new(&format!("{field}.name"), "a function call needs its name")
        })?;
        let bad_args = || {
            BadRequest::new(
                &format!("{field}.arguments"),
                "must be a JSON object, as a string",
            )
        };
        let args = match item.get("arguments") {
            None | Some(Value::Null) => json!({}),
            Some(Value::String(s)) if s.trim().is_empty() => json!({}),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(v @ Value::Object(_)) => v,
                _ => return Err(bad_args()),
            },
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => return Err(bad_args()),
        };
        self.call_names.insert(call_id.to_owned(), name.to_owned());
        let mut part = json!({ "functionCall": { "name": name, "args": args } });
        let carried = self.signature.take();
        if let Some(sig) = signature_of(item).cloned().or(carried) {
            part["thoughtSignature"] = sig;
        }
        Ok(part)
    }

    /// A `function_call_output` item as a `functionResponse` part named after the call it
    /// answers, then the images and files of its output as parts of their own.
    fn function_response(&self, item: &Value, field: &str) -> Result<Vec<Value>, BadRequest> {
        let id_field = format!("{field}.call_id");
        let call_id = item.get("call_id").and_then(Value::as_str).ok_or_else(|| {
            BadRequest::new(&id_field, "a function call output needs its call_id")
        })?;
        let name = self.call_names.get(call_id).ok_or_else(|| {
            BadRequest::new(
                &id_field,
                format!("{call_id:?} names no function_call of this conversation"),
            )
        })?;
        let output_field = format!("{field}.output");
        let mut text = String::new();
        let mut media = Vec::new();
        match item.get("output") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Array(list)) => {
                for (k, p) in list.iter().enumerate() {
                    let part = part(p, &format!("{output_field}[{k}]"))?;
                    match part.get("text").and_then(Value::as_str) {
                        Some(t) => text.push_str(t),
                        None => media.push(part),
                    }
                }
            }
            Some(_) => {
                return Err(BadRequest::new(
                    &output_field,
                    "must be a string or a list of content parts",
                ));
            }
        }
        let response = match serde_json::from_str::<Value>(&text) {
            Ok(v @ Value::Object(_)) => v,
            _ => json!({ "result": text }),
        };
        let mut parts = vec![json!({ "functionResponse": { "name": name, "response": response } })];
        parts.extend(media);
        Ok(parts)
    }
}

/// The thought signature an item carries (in `extra_content.google.thought_signature`).
fn signature_of(item: &Value) -> Option<&Value> {
    item.pointer("/extra_content/google/thought_signature")
        .filter(|s| s.as_str().is_some_and(|s| !s.is_empty()))
}

/// A message's content as Gemini parts: a string, or a list of content parts. Empty text
/// is left out (Gemini refuses an empty text part).
fn parts(content: Option<&Value>, field: &str) -> Result<Vec<Value>, BadRequest> {
    match content {
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![json!({ "text": s })]),
        Some(Value::Array(list)) => {
            let mut parts = Vec::new();
            for (j, p) in list.iter().enumerate() {
                let part = part(p, &format!("{field}[{j}]"))?;
                if part.get("text").is_none_or(|t| t != "") {
                    parts.push(part);
                }
            }
            Ok(parts)
        }
        _ => Err(BadRequest::new(
            field,
            "must be a string or a list of content parts",
        )),
    }
}

/// One content part (`input_text`, `output_text`, `refusal`, `input_image`, `input_file`) as a
/// Gemini part. Images and files by URL become `fileData` that gemgate fetches, as for chat
/// requests (see `chat::remote_files`); uploaded files (`file_id`) are not gemgate's to read.
fn part(p: &Value, field: &str) -> Result<Value, BadRequest> {
    let kind = p.get("type").and_then(Value::as_str).ok_or_else(|| {
        BadRequest::new(&format!("{field}.type"), "every content part needs a type")
    })?;
    let get = |key: &str| p.get(key).and_then(Value::as_str);
    let no_file_id = |key: &str| {
        BadRequest::new(
            &format!("{field}.file_id"),
            format!("file_id is not supported: send the file in {key}"),
        )
    };
    match kind {
        "input_text" | "output_text" => {
            let text = get("text").ok_or_else(|| {
                BadRequest::new(&format!("{field}.text"), "a text part needs its text")
            })?;
            Ok(json!({ "text": text }))
        }
        "refusal" => Ok(json!({ "text": get("refusal").unwrap_or_default() })),
        "input_image" => match get("image_url") {
            Some(url) => data_url_part(url, &format!("{field}.image_url")),
            None if p.get("file_id").is_some_and(|f| !f.is_null()) => {
                Err(no_file_id("image_url (a URL or a data: URL)"))
            }
            None => Err(BadRequest::new(
                &format!("{field}.image_url"),
                "an image needs its image_url: a URL or a data: URL",
            )),
        },
        "input_file" => {
            if let Some(data) = get("file_data") {
                file_data(data, get("filename"), &format!("{field}.file_data"))
            } else if let Some(url) = get("file_url") {
                data_url_part(url, &format!("{field}.file_url"))
            } else if p.get("file_id").is_some_and(|f| !f.is_null()) {
                Err(no_file_id("file_data (a data: URL)"))
            } else {
                Err(BadRequest::new(
                    &format!("{field}.file_data"),
                    "a file needs its file_data: a data: URL",
                ))
            }
        }
        other => Err(BadRequest::new(
            &format!("{field}.type"),
            format!("unknown content part type {other:?}"),
        )),
    }
}

/// An `input_file`'s `file_data` as `inlineData`: a base64 data: URL, or bare base64 of a file
/// whose name says it is a PDF.
fn file_data(data: &str, filename: Option<&str>, field: &str) -> Result<Value, BadRequest> {
    if data.starts_with("data:") {
        return data_url_part(data, field);
    }
    let pdf = filename.is_some_and(|n| n.to_ascii_lowercase().ends_with(".pdf"));
    if pdf {
        return Ok(json!({ "inlineData": { "mimeType": "application/pdf", "data": data } }));
    }
    Err(BadRequest::new(
        field,
        "must be a base64 data: URL (data:<media type>;base64,<data>)",
    ))
}

/// Sampling, output format and reasoning → `generationConfig`; only what the client sent.
fn generation_config(
    obj: &Map<String, Value>,
    model: &str,
    budget: &mut schema::Budget,
) -> Result<Map<String, Value>, BadRequest> {
    let mut c = Map::new();
    for (from, to) in [("temperature", "temperature"), ("top_p", "topP")] {
        match obj.get(from) {
            None | Some(Value::Null) => {}
            Some(v) if v.is_number() => {
                c.insert(to.into(), v.clone());
            }
            Some(_) => return Err(BadRequest::new(from, "must be a number")),
        }
    }
    match obj.get("max_output_tokens") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64().is_some_and(|n| n >= 1) => {
            c.insert("maxOutputTokens".into(), v.clone());
        }
        Some(_) => {
            return Err(BadRequest::new(
                "max_output_tokens",
                "must be a whole number of at least 1",
            ));
        }
    }
    if let Some(format) = obj
        .get("text")
        .and_then(|t| t.get("format"))
        .filter(|f| !f.is_null())
    {
        text_format(format, budget, &mut c)?;
    }
    if let Some(reasoning) = obj.get("reasoning").filter(|r| !r.is_null())
        && let Some(config) = reasoning_config(reasoning, model)?
    {
        c.insert("thinkingConfig".into(), config);
    }
    Ok(c)
}

/// `text.format` → `responseMimeType` and `responseSchema`.
fn text_format(
    format: &Value,
    budget: &mut schema::Budget,
    c: &mut Map<String, Value>,
) -> Result<(), BadRequest> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => {}
        Some("json_object") => {
            c.insert("responseMimeType".into(), json!("application/json"));
        }
        Some("json_schema") => {
            c.insert("responseMimeType".into(), json!("application/json"));
            if let Some(s) = format.get("schema").filter(|s| !s.is_null()) {
                let cleaned = schema::clean(s, budget)
                    .map_err(|e| BadRequest::new("text.format.schema", e.to_string()))?;
                c.insert("responseSchema".into(), cleaned);
            }
        }
        _ => {
            return Err(BadRequest::new(
                "text.format.type",
                "must be text, json_object or json_schema",
            ));
        }
    }
    Ok(())
}

/// `reasoning` → `thinkingConfig`: `effort` as chat's `reasoning_effort` (a level for Gemini 3,
/// a budget before); a `summary` asked for without an effort asks for the thoughts.
fn reasoning_config(reasoning: &Value, model: &str) -> Result<Option<Value>, BadRequest> {
    match reasoning.get("effort") {
        None | Some(Value::Null) => {}
        Some(Value::String(effort)) => {
            return thinking_config(effort, model)
                .map(Some)
                .map_err(|e| BadRequest::new("reasoning.effort", e.message));
        }
        Some(_) => {
            return Err(BadRequest::new(
                "reasoning.effort",
                "must be none, minimal, low, medium or high",
            ));
        }
    }
    let summary = reasoning.get("summary").filter(|s| !s.is_null());
    Ok(summary.map(|_| json!({ "includeThoughts": true })))
}

/// `tools` → Gemini's tools: function tools as function declarations (their schemas cleaned
/// within the request's budget), OpenAI's web search as Google Search.
fn tools(tools: Option<&Value>, budget: &mut schema::Budget) -> Result<Vec<Value>, BadRequest> {
    let list = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(BadRequest::new("tools", "must be a list of tools")),
    };
    let mut decls = Vec::new();
    let mut search = false;
    for (i, t) in list.iter().enumerate() {
        match t.get("type").and_then(Value::as_str) {
            Some("function") => decls.push(declaration(
                t,
                &format!("tools[{i}]"),
                "parameters",
                budget,
            )?),
            Some(kind) if kind == "web_search" || kind.starts_with("web_search_") => search = true,
            kind => {
                return Err(BadRequest::new(
                    &format!("tools[{i}].type"),
                    format!(
                        "{} is not supported: send function tools, or web_search (Google Search)",
                        kind.map_or_else(
                            || "a tool without a type".to_owned(),
                            |k| format!("{k:?}")
                        )
                    ),
                ));
            }
        }
    }
    Ok(gemini_tools(decls, search))
}

/// `tool_choice` → Gemini's `functionCallingConfig`: a mode as chat's (`none`, `auto`,
/// `required`), one function (`{"type": "function", "name"}`), or `allowed_tools`.
fn tool_choice(choice: &Value) -> Result<Value, BadRequest> {
    let Value::Object(o) = choice else {
        return function_calling_config(choice);
    };
    match o.get("type").and_then(Value::as_str) {
        Some("function") => {
            let name = o.get("name").and_then(Value::as_str).ok_or_else(|| {
                BadRequest::new(
                    "tool_choice.name",
                    "a function tool choice names the function",
                )
            })?;
            Ok(json!({ "mode": "ANY", "allowedFunctionNames": [name] }))
        }
        Some("allowed_tools") => {
            let names: Vec<&str> = o
                .get("tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
                .filter_map(|t| t.get("name").and_then(Value::as_str))
                .collect();
            // Gemini restricts the functions only when one must be called.
            match o.get("mode").and_then(Value::as_str) {
                Some("required") => Ok(json!({ "mode": "ANY", "allowedFunctionNames": names })),
                Some("auto") | None => Ok(json!({ "mode": "AUTO" })),
                Some(_) => Err(BadRequest::new(
                    "tool_choice.mode",
                    "must be auto or required",
                )),
            }
        }
        _ => Err(BadRequest::new(
            "tool_choice.type",
            "must be none, auto, required, a function or allowed_tools",
        )),
    }
}

/// Adds what a part says to the output items: a thought joins the reasoning item before it,
/// text the message before it, and a call is an item of its own. Items are numbered by their
/// place in the output. Returns whether the part continued the last item.
fn add_item(output: &mut Vec<Value>, said: &Said, id: &str) -> bool {
    let n = output.len();
    let last = output.last_mut();
    match said {
        Said::Thought { text, signature } => {
            if let Some(last) = last.filter(|l| l["type"] == "reasoning") {
                append(&mut last["summary"][0]["text"], text);
                if let Some(sig) = signature {
                    last["extra_content"] = json!({ "google": { "thought_signature": sig } });
                }
                return true;
            }
            let mut item = json!({
                "type": "reasoning",
                "id": format!("rs_{id}_{n}"),
                "summary": [{ "type": "summary_text", "text": text }],
            });
            if let Some(sig) = signature {
                item["extra_content"] = json!({ "google": { "thought_signature": sig } });
            }
            output.push(item);
            false
        }
        Said::Text(text) => {
            if let Some(last) = last.filter(|l| l["type"] == "message") {
                append(&mut last["content"][0]["text"], text);
                return true;
            }
            output.push(json!({
                "type": "message",
                "id": format!("msg_{id}_{n}"),
                "status": "completed",
                "role": "assistant",
                "content": [{ "type": "output_text", "text": text, "annotations": [] }],
            }));
            false
        }
        Said::Call {
            name,
            args,
            signature,
        } => {
            let mut item = json!({
                "type": "function_call",
                "id": format!("fc_{id}_{n}"),
                "call_id": format!("call_{id}_{n}"),
                "name": name,
                "arguments": args.map_or_else(|| "{}".to_owned(), |a| a.to_string()),
                "status": "completed",
            });
            if let Some(sig) = signature {
                item["extra_content"] = json!({ "google": { "thought_signature": sig } });
            }
            output.push(item);
            false
        }
    }
}

/// Appends `more` to the string `text`.
fn append(text: &mut Value, more: &str) {
    if let Value::String(s) = text {
        s.push_str(more);
    }
}

/// Whether a finish reason is Gemini's refusal to go on.
fn is_filtered(finish: &str) -> bool {
    matches!(
        finish,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY"
    )
}

/// Why a response ended early (`incomplete_details.reason`), from Gemini's finish reason;
/// `None` when it ended as it should.
fn incomplete_reason(finish: Option<&str>) -> Option<&'static str> {
    match finish {
        Some("MAX_TOKENS") => Some("max_output_tokens"),
        Some(f) if is_filtered(f) => Some("content_filter"),
        _ => None,
    }
}

/// Gemini's `usageMetadata` as the Responses `usage` (zeros without it): the prompt's tokens
/// include the cached ones, thought tokens are output tokens.
fn usage(meta: Option<&Value>) -> Value {
    let n = |k: &str| {
        meta.and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let input = n("promptTokenCount");
    let thoughts = n("thoughtsTokenCount");
    // The upstream's numbers, whatever they are: added without overflowing.
    let output = n("candidatesTokenCount").saturating_add(thoughts);
    json!({
        "input_tokens": input,
        "input_tokens_details": { "cached_tokens": n("cachedContentTokenCount") },
        "output_tokens": output,
        "output_tokens_details": { "reasoning_tokens": thoughts },
        "total_tokens": n("totalTokenCount").max(input.saturating_add(output)),
    })
}

/// A Response object: gemgate's own fields typed, and what the client asked for echoed as
/// OpenAI echoes it. Serialised as it is (no map of values is built for an answer).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ResponseObject {
    /// `resp_{id}`.
    pub id: String,
    object: &'static str,
    created_at: u64,
    /// `in_progress`, `completed`, `incomplete` or `failed`.
    status: &'static str,
    error: Option<Value>,
    incomplete_details: Option<Value>,
    instructions: Value,
    max_output_tokens: Value,
    model: String,
    /// The output items.
    pub output: Vec<Value>,
    parallel_tool_calls: Value,
    previous_response_id: Value,
    reasoning: Value,
    store: Value,
    temperature: Value,
    text: Value,
    tool_choice: Value,
    tools: Value,
    top_p: Value,
    usage: Option<Value>,
    metadata: Value,
}

impl ResponseObject {
    /// A response in progress, without output, answering `request` (the client's body).
    fn in_progress(request: &Value, model: &str, id: &str, created: u64) -> Self {
        let given = |k: &str| request.get(k).filter(|v| !v.is_null()).cloned();
        let or_null = |k: &str| given(k).unwrap_or(Value::Null);
        ResponseObject {
            id: format!("resp_{id}"),
            object: "response",
            created_at: created,
            status: "in_progress",
            error: None,
            incomplete_details: None,
            instructions: or_null("instructions"),
            max_output_tokens: or_null("max_output_tokens"),
            model: model.to_owned(),
            output: Vec::new(),
            parallel_tool_calls: given("parallel_tool_calls").unwrap_or(Value::Bool(true)),
            previous_response_id: or_null("previous_response_id"),
            reasoning: given("reasoning")
                .unwrap_or_else(|| json!({ "effort": null, "summary": null })),
            store: given("store").unwrap_or(Value::Bool(true)),
            temperature: or_null("temperature"),
            text: given("text").unwrap_or_else(|| json!({ "format": { "type": "text" } })),
            tool_choice: given("tool_choice").unwrap_or_else(|| json!("auto")),
            tools: given("tools").unwrap_or_else(|| json!([])),
            top_p: or_null("top_p"),
            usage: None,
            metadata: given("metadata").unwrap_or_else(|| json!({})),
        }
    }

    /// This response ended: `completed`, or `incomplete` with the reason.
    fn concluded(self, incomplete: Option<&str>, output: Vec<Value>, usage: Value) -> Self {
        ResponseObject {
            status: if incomplete.is_some() {
                "incomplete"
            } else {
                "completed"
            },
            incomplete_details: incomplete.map(|r| json!({ "reason": r })),
            output,
            usage: Some(usage),
            ..self
        }
    }
}

/// A whole `generateContent` answer → a Response object. `request` is the client's body
/// (echoed as OpenAI does); `id` is gemgate's request id.
pub fn response(
    answer: &Value,
    request: &Value,
    model: &str,
    id: &str,
    created: u64,
) -> ResponseObject {
    let mut output = Vec::new();
    let incomplete = match answer.pointer("/candidates/0") {
        Some(c) => {
            for said in read_parts(c) {
                add_item(&mut output, &said, id);
            }
            incomplete_reason(c.get("finishReason").and_then(Value::as_str))
        }
        // No candidate: Gemini blocked the prompt (`promptFeedback.blockReason`).
        None => Some("content_filter"),
    };
    ResponseObject::in_progress(request, model, id, created).concluded(
        incomplete,
        output,
        usage(answer.get("usageMetadata")),
    )
}

/// An item as `response.output_item.added` shows it: nothing said yet.
fn started(item: &Value) -> Value {
    let mut item = item.clone();
    match item["type"].as_str() {
        Some("message") => {
            item["status"] = json!("in_progress");
            item["content"] = json!([]);
        }
        Some("reasoning") => item["summary"] = json!([]),
        Some("function_call") => {
            item["status"] = json!("in_progress");
            item["arguments"] = json!("");
        }
        _ => {}
    }
    item
}

/// Translates a `streamGenerateContent?alt=sse` stream into the Responses API's server-sent
/// events: `response.created` and `response.in_progress`, each output item's
/// `response.output_item.added`, its parts and deltas and `response.output_item.done`, then
/// `response.completed` (or `response.incomplete`); every event numbered in order.
#[derive(Debug)]
pub struct ResponseStream {
    /// gemgate's request id.
    id: String,
    /// The response so far, without its output (which is in `output`).
    response: ResponseObject,
    /// The output items so far; the last may be open.
    output: Vec<Value>,
    /// The index of the open item: text or thoughts may continue it.
    open: Option<usize>,
    /// The latest `usageMetadata` (Gemini's counts are cumulative).
    usage: Option<Value>,
    /// The next event's `sequence_number`.
    sequence: u64,
    /// `response.created` has been sent.
    started: bool,
    /// The last event has been sent: the stream says nothing more.
    done: bool,
    /// The response as it ended, completed or incomplete.
    completed: Option<ResponseObject>,
}

impl ResponseStream {
    /// A stream answering `request` (the client's body, echoed in the response).
    pub fn new(request: &Value, model: &str, id: &str, created: u64) -> Self {
        ResponseStream {
            id: id.to_owned(),
            response: ResponseObject::in_progress(request, model, id, created),
            output: Vec::new(),
            open: None,
            usage: None,
            sequence: 0,
            started: false,
            done: false,
            completed: None,
        }
    }

    /// Gemini SSE events (whole `data: {json}` events, CRLF or LF; anything else is ignored) →
    /// Responses SSE events, the first call starting with `response.created` and
    /// `response.in_progress`. Nothing once the response has ended.
    pub fn push(&mut self, events: &[u8]) -> String {
        let mut out = String::new();
        if self.done {
            return out;
        }
        self.start(&mut out);
        crate::translate::each_event(events, |answer| {
            self.event(answer, &mut out);
            !self.done
        });
        out
    }

    /// The stream's end: closes what is open, then `response.completed` unless Gemini's finish
    /// reason ended the response already (an answer that just ended is complete).
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        if !self.done {
            self.end(None, &mut out);
        }
        out
    }

    /// `response.failed`: the response so far with status `failed` and `error: {code,
    /// message}`. Nothing once the response has ended.
    pub fn failed(&mut self, code: &str, message: &str) -> String {
        let mut out = String::new();
        if self.done {
            return out;
        }
        self.start(&mut out);
        let mut output = self.output.clone();
        // An item cut off mid-way did not complete.
        if let Some(open) = self.open.and_then(|i| output.get_mut(i))
            && open.get("status").is_some()
        {
            open["status"] = json!("incomplete");
        }
        let r = ResponseObject {
            status: "failed",
            error: Some(json!({ "code": code, "message": message })),
            output,
            usage: self.usage.as_ref().map(|u| usage(Some(u))),
            ..self.response.clone()
        };
        self.emit(
            json!({ "type": "response.failed", "response": r }),
            &mut out,
        );
        self.done = true;
        out
    }

    /// The Response object as it ended (completed or incomplete), once it has; `None` while
    /// it streams and after `response.failed`.
    pub fn completed(&self) -> Option<&ResponseObject> {
        self.completed.as_ref()
    }

    /// Writes one event, numbered, named after its data's `type`.
    fn emit(&mut self, mut data: Value, out: &mut String) {
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        let name = data["type"].as_str().unwrap_or_default();
        crate::translate::push_event(out, Some(name), &data);
    }

    /// `response.created` and `response.in_progress`, once.
    fn start(&mut self, out: &mut String) {
        if self.started {
            return;
        }
        self.started = true;
        for kind in ["response.created", "response.in_progress"] {
            let r = self.response.clone();
            self.emit(json!({ "type": kind, "response": r }), out);
        }
    }

    /// One Gemini event → the Responses events it makes.
    fn event(&mut self, answer: &Value, out: &mut String) {
        if let Some(u) = answer.get("usageMetadata") {
            self.usage = Some(u.clone());
        }
        let Some(c) = answer.pointer("/candidates/0") else {
            if answer.pointer("/promptFeedback/blockReason").is_some() {
                self.end(Some("content_filter"), out);
            }
            return;
        };
        for said in read_parts(c) {
            self.said(&said, out);
        }
        if let Some(finish) = c.get("finishReason").and_then(Value::as_str) {
            self.end(incomplete_reason(Some(finish)), out);
        }
    }

    /// What one part says: text and thoughts continue the open item of their kind, else the
    /// open item is closed and a new one opened; a call is an item of its own, opened and
    /// closed at once.
    fn said(&mut self, said: &Said, out: &mut String) {
        // The last item is the open one, or a call (which nothing continues): what `add_item`
        // continues is open.
        let index = self.output.len();
        let index = if add_item(&mut self.output, said, &self.id) {
            index - 1
        } else {
            self.close(out);
            self.open(index, out);
            index
        };
        let item_id = self.output[index]["id"].clone();
        match said {
            Said::Thought { text, .. } => {
                if !text.is_empty() {
                    self.emit(
                        json!({
                            "type": "response.reasoning_summary_text.delta",
                            "item_id": item_id,
                            "output_index": index,
                            "summary_index": 0,
                            "delta": text,
                        }),
                        out,
                    );
                }
            }
            Said::Text(text) => self.emit(
                json!({
                    "type": "response.output_text.delta",
                    "item_id": item_id,
                    "output_index": index,
                    "content_index": 0,
                    "delta": text,
                    "logprobs": [],
                }),
                out,
            ),
            Said::Call { .. } => {
                let arguments = self.output[index]["arguments"].clone();
                self.emit(
                    json!({
                        "type": "response.function_call_arguments.delta",
                        "item_id": item_id,
                        "output_index": index,
                        "delta": arguments,
                    }),
                    out,
                );
                self.close(out);
            }
        }
    }

    /// Opens output item `index` (just added): `response.output_item.added`, and the empty
    /// part a message or a reasoning summary starts with.
    fn open(&mut self, index: usize, out: &mut String) {
        self.open = Some(index);
        let item = started(&self.output[index]);
        let item_id = item["id"].clone();
        let kind = item["type"].as_str().unwrap_or_default().to_owned();
        self.emit(
            json!({ "type": "response.output_item.added", "output_index": index, "item": item }),
            out,
        );
        match kind.as_str() {
            "message" => self.emit(
                json!({
                    "type": "response.content_part.added",
                    "item_id": item_id,
                    "output_index": index,
                    "content_index": 0,
                    "part": { "type": "output_text", "text": "", "annotations": [] },
                }),
                out,
            ),
            "reasoning" => self.emit(
                json!({
                    "type": "response.reasoning_summary_part.added",
                    "item_id": item_id,
                    "output_index": index,
                    "summary_index": 0,
                    "part": { "type": "summary_text", "text": "" },
                }),
                out,
            ),
            _ => {}
        }
    }

    /// Closes the open item, if any: its text's or arguments' `done`, its part's, then
    /// `response.output_item.done` with the whole item.
    fn close(&mut self, out: &mut String) {
        let Some(index) = self.open.take() else {
            return;
        };
        let item = self.output[index].clone();
        let item_id = item["id"].clone();
        match item["type"].as_str() {
            Some("message") => {
                let part = item["content"][0].clone();
                self.emit(
                    json!({
                        "type": "response.output_text.done",
                        "item_id": item_id,
                        "output_index": index,
                        "content_index": 0,
                        "text": part["text"],
                        "logprobs": [],
                    }),
                    out,
                );
                self.emit(
                    json!({
                        "type": "response.content_part.done",
                        "item_id": item_id,
                        "output_index": index,
                        "content_index": 0,
                        "part": part,
                    }),
                    out,
                );
            }
            Some("reasoning") => {
                let part = item["summary"][0].clone();
                self.emit(
                    json!({
                        "type": "response.reasoning_summary_text.done",
                        "item_id": item_id,
                        "output_index": index,
                        "summary_index": 0,
                        "text": part["text"],
                    }),
                    out,
                );
                self.emit(
                    json!({
                        "type": "response.reasoning_summary_part.done",
                        "item_id": item_id,
                        "output_index": index,
                        "summary_index": 0,
                        "part": part,
                    }),
                    out,
                );
            }
            Some("function_call") => self.emit(
                json!({
                    "type": "response.function_call_arguments.done",
                    "item_id": item_id,
                    "output_index": index,
                    "arguments": item["arguments"],
                }),
                out,
            ),
            _ => {}
        }
        self.emit(
            json!({ "type": "response.output_item.done", "output_index": index, "item": item }),
            out,
        );
    }

    /// The response's end: what is open closed, then `response.completed`, or
    /// `response.incomplete` with the reason it ended early.
    fn end(&mut self, incomplete: Option<&str>, out: &mut String) {
        self.start(out);
        self.close(out);
        let r = self.response.clone().concluded(
            incomplete,
            self.output.clone(),
            usage(self.usage.as_ref()),
        );
        let kind = if incomplete.is_some() {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.emit(json!({ "type": kind, "response": r.clone() }), out);
        self.completed = Some(r);
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole answer's Response object, as JSON.
    fn answered(answer: &Value, request: &Value, model: &str, id: &str, created: u64) -> Value {
        serde_json::to_value(response(answer, request, model, id, created)).unwrap()
    }

    /// The stream's completed response, as JSON.
    fn completed(s: &ResponseStream) -> Option<Value> {
        s.completed().map(|r| serde_json::to_value(r).unwrap())
    }
    use crate::translate::openai::chat::PLACEHOLDER_SIGNATURE;

    /// A request for `model` with `input` and whatever `extra` adds.
    fn ask(model: &str, input: Value, extra: Value) -> Value {
        let mut body = json!({ "model": model, "input": input });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    }

    /// The field a bad request names.
    fn field(body: Value) -> String {
        request(&body, &[]).unwrap_err().param.unwrap()
    }

    /// A stream's output as its events' data, checking each event's framing and name.
    fn events(out: &str) -> Vec<Value> {
        assert!(out.is_empty() || out.ends_with("\n\n"), "{out:?}");
        out.split_terminator("\n\n")
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap();
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(data["type"], name, "{e}");
                data
            })
            .collect()
    }

    /// The events' types.
    fn types(events: &[Value]) -> Vec<&str> {
        events.iter().map(|e| e["type"].as_str().unwrap()).collect()
    }

    /// One Gemini stream event of `parts`, with `extra` fields on its candidate and `rest` at
    /// the top.
    fn gemini_event(parts: Value, candidate: Value, rest: Value) -> Vec<u8> {
        let mut c = json!({ "content": { "role": "model", "parts": parts } });
        for (k, v) in candidate.as_object().unwrap() {
            c[k] = v.clone();
        }
        let mut e = json!({ "candidates": [c] });
        for (k, v) in rest.as_object().unwrap() {
            e[k] = v.clone();
        }
        format!("data: {e}\r\n\r\n").into_bytes()
    }

    #[test]
    fn a_string_input_is_one_user_message() {
        let call = request(&ask("models/gemini-2.5-flash", json!("hi"), json!({})), &[]).unwrap();
        assert_eq!(call.model, "gemini-2.5-flash");
        assert!(!call.stream && call.store);
        assert_eq!(call.previous_response_id, None);
        assert_eq!(call.placeholder_signatures, 0);
        // Nothing is added that the client did not send.
        assert_eq!(
            call.body,
            json!({ "contents": [{ "role": "user", "parts": [{ "text": "hi" }] }] })
        );
        assert_eq!(
            call.input_items,
            vec![
                json!({ "type": "message", "role": "user", "content": [{ "type": "input_text", "text": "hi" }] })
            ]
        );
        let call = request(
            &ask(
                "m",
                json!("hi"),
                json!({ "stream": true, "store": false, "previous_response_id": "resp_1" }),
            ),
            &[],
        )
        .unwrap();
        assert!(call.stream && !call.store);
        assert_eq!(call.previous_response_id.as_deref(), Some("resp_1"));
    }

    #[test]
    fn items_of_every_role_and_instructions() {
        let input = json!([
            { "role": "system", "content": "be brief" },
            { "type": "message", "role": "developer", "content": [{ "type": "input_text", "text": "use metric" }] },
            { "role": "user", "content": "how tall?" },
            { "type": "message", "role": "user", "content": [{ "type": "input_text", "text": "the tower" }] },
            { "type": "message", "id": "msg_x_0", "status": "completed", "role": "assistant",
              "content": [{ "type": "output_text", "text": "330 m", "annotations": [] }] },
            { "role": "user", "content": "thanks" }
        ]);
        let call = request(
            &ask(
                "m",
                input.clone(),
                json!({ "instructions": "you are a guide" }),
            ),
            &[],
        )
        .unwrap();
        assert_eq!(
            call.body,
            json!({
                "contents": [
                    { "role": "user", "parts": [{ "text": "how tall?" }, { "text": "the tower" }] },
                    { "role": "model", "parts": [{ "text": "330 m" }] },
                    { "role": "user", "parts": [{ "text": "thanks" }] }
                ],
                "systemInstruction": { "parts": [
                    { "text": "you are a guide" }, { "text": "be brief" }, { "text": "use metric" }
                ] }
            })
        );
        assert_eq!(call.input_items, input.as_array().unwrap().clone());
    }

    #[test]
    fn images_and_files_become_inline_data_or_file_data() {
        let call = request(
            &ask(
                "m",
                json!([{ "role": "user", "content": [
                    { "type": "input_text", "text": "compare" },
                    { "type": "input_image", "image_url": "https://example.com/a.png", "detail": "auto" },
                    { "type": "input_image", "image_url": "data:image/jpeg;base64,QUJD" },
                    { "type": "input_file", "filename": "x.pdf", "file_data": "data:application/pdf;base64,JVBE" },
                    { "type": "input_file", "filename": "y.pdf", "file_data": "JVBF" }
                ]}]),
                json!({}),
            ),
            &[],
        )
        .unwrap();
        assert_eq!(
            call.body["contents"][0]["parts"],
            json!([
                { "text": "compare" },
                { "fileData": { "fileUri": "https://example.com/a.png" } },
                { "inlineData": { "mimeType": "image/jpeg", "data": "QUJD" } },
                { "inlineData": { "mimeType": "application/pdf", "data": "JVBE" } },
                { "inlineData": { "mimeType": "application/pdf", "data": "JVBF" } }
            ])
        );
        // gemgate fetches the URL as for chat requests.
        assert_eq!(
            super::super::chat::remote_files(&call.body),
            ["https://example.com/a.png"]
        );
    }

    #[test]
    fn tools_tool_choice_and_text_format() {
        let body = ask(
            "m",
            json!("weather?"),
            json!({
                "tools": [
                    { "type": "function", "name": "weather", "description": "the weather", "strict": true,
                      "parameters": { "type": "object", "additionalProperties": false,
                                      "properties": { "city": { "type": ["string", "null"] } }, "required": ["city"] } },
                    { "type": "web_search_preview" }
                ],
                "tool_choice": "required",
                "text": { "format": { "type": "json_schema", "name": "w", "strict": true,
                          "schema": { "type": "object", "additionalProperties": false, "properties": { "t": { "type": "number" } } } } },
                "max_output_tokens": 100, "temperature": 0.5, "top_p": 0.9,
                "parallel_tool_calls": true, "metadata": { "k": "v" }, "truncation": "auto"
            }),
        );
        let call = request(&body, &[]).unwrap();
        let b = &call.body;
        assert_eq!(
            b["tools"],
            json!([
                { "functionDeclarations": [{ "name": "weather", "description": "the weather", "parameters": {
                    "type": "object", "properties": { "city": { "type": "string", "nullable": true } }, "required": ["city"] } }] },
                { "googleSearch": {} }
            ])
        );
        assert_eq!(
            b["toolConfig"],
            json!({ "functionCallingConfig": { "mode": "ANY" } })
        );
        assert_eq!(
            b["generationConfig"],
            json!({
                "temperature": 0.5, "topP": 0.9, "maxOutputTokens": 100,
                "responseMimeType": "application/json",
                "responseSchema": { "type": "object", "properties": { "t": { "type": "number" } } }
            })
        );

        let config = |choice: Value| {
            request(&ask("m", json!("x"), json!({ "tool_choice": choice })), &[])
                .unwrap()
                .body["toolConfig"]["functionCallingConfig"]
                .clone()
        };
        assert_eq!(config(json!("auto")), json!({ "mode": "AUTO" }));
        assert_eq!(config(json!("none")), json!({ "mode": "NONE" }));
        assert_eq!(
            config(json!({ "type": "function", "name": "weather" })),
            json!({ "mode": "ANY", "allowedFunctionNames": ["weather"] })
        );
        assert_eq!(
            config(json!({ "type": "allowed_tools", "mode": "required",
                           "tools": [{ "type": "function", "name": "a" }, { "type": "function", "name": "b" }] })),
            json!({ "mode": "ANY", "allowedFunctionNames": ["a", "b"] })
        );

        let format = |format: Value| {
            request(
                &ask("m", json!("x"), json!({ "text": { "format": format } })),
                &[],
            )
            .unwrap()
            .body
            .get("generationConfig")
            .cloned()
        };
        assert_eq!(
            format(json!({ "type": "json_object" })),
            Some(json!({ "responseMimeType": "application/json" }))
        );
        assert_eq!(format(json!({ "type": "text" })), None);
        let search = request(
            &ask(
                "m",
                json!("x"),
                json!({ "tools": [{ "type": "web_search" }] }),
            ),
            &[],
        )
        .unwrap();
        assert_eq!(search.body["tools"], json!([{ "googleSearch": {} }]));
    }

    #[test]
    fn reasoning_effort_is_a_budget_before_gemini_3_and_a_level_in_it() {
        let thinking = |model: &str, reasoning: Value| {
            request(
                &ask(model, json!("x"), json!({ "reasoning": reasoning })),
                &[],
            )
            .unwrap()
            .body
            .pointer("/generationConfig/thinkingConfig")
            .cloned()
        };
        assert_eq!(
            thinking("gemini-2.5-flash", json!({ "effort": "low" })),
            Some(json!({ "thinkingBudget": 1024, "includeThoughts": true }))
        );
        assert_eq!(
            thinking("gemini-2.5-flash", json!({ "effort": "minimal" })),
            Some(json!({ "thinkingBudget": 0, "includeThoughts": false }))
        );
        assert_eq!(
            thinking(
                "gemini-3-pro-preview",
                json!({ "effort": "medium", "summary": "auto" })
            ),
            Some(json!({ "thinkingLevel": "high", "includeThoughts": true }))
        );
        assert_eq!(
            thinking("gemini-3-flash-preview", json!({ "effort": "minimal" })),
            Some(json!({ "thinkingLevel": "minimal", "includeThoughts": true }))
        );
        assert_eq!(
            thinking("gemini-2.5-pro", json!({ "summary": "detailed" })),
            Some(json!({ "includeThoughts": true }))
        );
        assert_eq!(thinking("gemini-2.5-pro", json!({ "effort": null })), None);
        assert_eq!(
            field(ask(
                "gemini-3-pro-preview",
                json!("x"),
                json!({ "reasoning": { "effort": "max" } })
            )),
            "reasoning.effort"
        );
    }

    /// A Gemini answer: a thought, text, then two parallel calls (the first signed).
    fn thinking_answer() -> Value {
        json!({
            "candidates": [{
                "content": { "role": "model", "parts": [
                    { "text": "Let me think", "thought": true },
                    { "text": " about it.", "thought": true },
                    { "text": "Checking " },
                    { "text": "both." },
                    { "functionCall": { "name": "weather", "args": { "city": "Paris" } }, "thoughtSignature": "sig1" },
                    { "functionCall": { "name": "time", "args": { "tz": "CET" } } }
                ]},
                "finishReason": "STOP"
            }],
            "usageMetadata": { "promptTokenCount": 20, "cachedContentTokenCount": 8, "candidatesTokenCount": 10,
                               "thoughtsTokenCount": 5, "totalTokenCount": 35 }
        })
    }

    #[test]
    fn an_answer_is_a_response_of_reasoning_text_and_calls() {
        let req = json!({ "model": "gemini-2.5-flash", "input": "weather?", "instructions": "be brief",
                          "temperature": 0.3, "tools": [{ "type": "function", "name": "weather" }],
                          "reasoning": { "effort": "low" }, "metadata": { "k": "v" } });
        let r = answered(&thinking_answer(), &req, "gemini-2.5-flash", "r1", 1700);
        assert_eq!(
            r,
            json!({
                "id": "resp_r1",
                "object": "response",
                "created_at": 1700,
                "status": "completed",
                "error": null,
                "incomplete_details": null,
                "instructions": "be brief",
                "max_output_tokens": null,
                "model": "gemini-2.5-flash",
                "output": [
                    { "type": "reasoning", "id": "rs_r1_0",
                      "summary": [{ "type": "summary_text", "text": "Let me think about it." }] },
                    { "type": "message", "id": "msg_r1_1", "status": "completed", "role": "assistant",
                      "content": [{ "type": "output_text", "text": "Checking both.", "annotations": [] }] },
                    { "type": "function_call", "id": "fc_r1_2", "call_id": "call_r1_2", "name": "weather",
                      "arguments": "{\"city\":\"Paris\"}", "status": "completed",
                      "extra_content": { "google": { "thought_signature": "sig1" } } },
                    { "type": "function_call", "id": "fc_r1_3", "call_id": "call_r1_3", "name": "time",
                      "arguments": "{\"tz\":\"CET\"}", "status": "completed" }
                ],
                "parallel_tool_calls": true,
                "previous_response_id": null,
                "reasoning": { "effort": "low" },
                "store": true,
                "temperature": 0.3,
                "text": { "format": { "type": "text" } },
                "tool_choice": "auto",
                "tools": [{ "type": "function", "name": "weather" }],
                "top_p": null,
                "usage": {
                    "input_tokens": 20, "input_tokens_details": { "cached_tokens": 8 },
                    "output_tokens": 15, "output_tokens_details": { "reasoning_tokens": 5 },
                    "total_tokens": 35
                },
                "metadata": { "k": "v" }
            })
        );
    }

    #[test]
    fn cut_off_and_blocked_answers_are_incomplete() {
        let req = json!({ "model": "m", "input": "x", "max_output_tokens": 5 });
        let cut = json!({ "candidates": [{ "content": { "parts": [{ "text": "Once upon" }] }, "finishReason": "MAX_TOKENS" }] });
        let r = answered(&cut, &req, "m", "r2", 1);
        assert_eq!(r["status"], "incomplete");
        assert_eq!(
            r["incomplete_details"],
            json!({ "reason": "max_output_tokens" })
        );
        assert_eq!(r["output"][0]["content"][0]["text"], "Once upon");
        assert_eq!(r["max_output_tokens"], 5);
        assert_eq!(r["usage"]["total_tokens"], 0);

        let blocked = json!({ "promptFeedback": { "blockReason": "SAFETY" }, "usageMetadata": { "promptTokenCount": 4 } });
        let r = answered(&blocked, &req, "m", "r3", 1);
        assert_eq!(r["status"], "incomplete");
        assert_eq!(
            r["incomplete_details"],
            json!({ "reason": "content_filter" })
        );
        assert_eq!(r["output"], json!([]));
        assert_eq!(r["usage"]["input_tokens"], 4);

        let unsafe_ = json!({ "candidates": [{ "finishReason": "SAFETY" }] });
        let r = answered(&unsafe_, &req, "m", "r4", 1);
        assert_eq!(r["incomplete_details"]["reason"], "content_filter");
        assert_eq!(r["output"], json!([]));
    }

    #[test]
    fn calls_and_outputs_go_back_through_history_with_names_and_signatures() {
        // The first response, stored with its input, is the history of the next request.
        let first = request(&ask("gemini-2.5-flash", json!("weather?"), json!({})), &[]).unwrap();
        let answer = answered(&thinking_answer(), &json!({}), "gemini-2.5-flash", "r1", 1);
        let mut history = first.input_items.clone();
        history.extend(answer["output"].as_array().unwrap().clone());
        let input = json!([
            { "type": "function_call_output", "call_id": "call_r1_2", "output": "{\"temp\":21}" },
            { "type": "function_call_output", "call_id": "call_r1_3", "output": [
                { "type": "input_text", "text": "14:00" },
                { "type": "input_image", "image_url": "data:image/png;base64,AAAA" }
            ]}
        ]);
        let call = request(
            &ask(
                "gemini-2.5-flash",
                input,
                json!({ "previous_response_id": "resp_r1" }),
            ),
            &history,
        )
        .unwrap();
        assert_eq!(
            call.body["contents"],
            json!([
                { "role": "user", "parts": [{ "text": "weather?" }] },
                { "role": "model", "parts": [
                    { "text": "Checking both." },
                    { "functionCall": { "name": "weather", "args": { "city": "Paris" } }, "thoughtSignature": "sig1" },
                    { "functionCall": { "name": "time", "args": { "tz": "CET" } } }
                ]},
                { "role": "user", "parts": [
                    { "functionResponse": { "name": "weather", "response": { "temp": 21 } } },
                    { "functionResponse": { "name": "time", "response": { "result": "14:00" } } },
                    { "inlineData": { "mimeType": "image/png", "data": "AAAA" } }
                ]}
            ])
        );
        assert_eq!(call.placeholder_signatures, 0);

        // Calls and their outputs in the same input; a reasoning item's signature goes to the
        // call after it (the call's own goes first).
        let input = json!([
            { "role": "user", "content": "go" },
            { "type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "not ours",
              "extra_content": { "google": { "thought_signature": "from_reasoning" } } },
            { "type": "function_call", "call_id": "a", "name": "f", "arguments": "" },
            { "type": "function_call", "call_id": "b", "name": "g", "arguments": "{\"x\":1}",
              "extra_content": { "google": { "thought_signature": "own" } } },
            { "type": "function_call_output", "call_id": "b", "output": "7" },
            { "type": "function_call_output", "call_id": "a", "output": "ok" }
        ]);
        let call = request(&ask("gemini-2.5-flash", input, json!({})), &[]).unwrap();
        let c = &call.body["contents"];
        assert_eq!(c[1]["parts"][0]["thoughtSignature"], "from_reasoning");
        assert_eq!(
            c[1]["parts"][0]["functionCall"],
            json!({ "name": "f", "args": {} })
        );
        assert_eq!(c[1]["parts"][1]["thoughtSignature"], "own");
        assert_eq!(
            c[2]["parts"][0]["functionResponse"],
            json!({ "name": "g", "response": { "result": "7" } })
        );
        assert_eq!(c[2]["parts"][1]["functionResponse"]["name"], "f");
    }

    #[test]
    fn gemini_3_calls_without_a_signature_get_the_placeholder() {
        let input = |signed: bool| {
            let mut call =
                json!({ "type": "function_call", "call_id": "a", "name": "f", "arguments": "{}" });
            if signed {
                call["extra_content"] = json!({ "google": { "thought_signature": "s" } });
            }
            json!([
                { "role": "user", "content": "go" },
                call,
                { "type": "function_call", "call_id": "b", "name": "f", "arguments": "{}" },
                { "type": "function_call_output", "call_id": "a", "output": "1" },
                { "type": "function_call_output", "call_id": "b", "output": "2" },
                { "type": "function_call", "call_id": "c", "name": "f", "arguments": "{}" },
                { "type": "function_call_output", "call_id": "c", "output": "3" }
            ])
        };
        let call = request(&ask("gemini-3-pro-preview", input(false), json!({})), &[]).unwrap();
        let c = &call.body["contents"];
        assert_eq!(c[1]["parts"][0]["thoughtSignature"], PLACEHOLDER_SIGNATURE);
        assert_eq!(
            c[1]["parts"][1].get("thoughtSignature"),
            None,
            "only the first of parallel calls"
        );
        assert_eq!(c[3]["parts"][0]["thoughtSignature"], PLACEHOLDER_SIGNATURE);
        assert_eq!(call.placeholder_signatures, 2);
        let kept = request(&ask("gemini-3-pro-preview", input(true), json!({})), &[]).unwrap();
        assert_eq!(
            kept.body["contents"][1]["parts"][0]["thoughtSignature"],
            "s"
        );
        assert_eq!(kept.placeholder_signatures, 1);
        // Older models need none: nothing is made up for them.
        let older = request(&ask("gemini-2.5-flash", input(false), json!({})), &[]).unwrap();
        assert_eq!(older.placeholder_signatures, 0);
        assert_eq!(
            older.body["contents"][1]["parts"][0].get("thoughtSignature"),
            None
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        let msg = |content: Value| json!([{ "role": "user", "content": content }]);
        for (body, expected) in [
            (json!({ "input": "x" }), "model"),
            (json!({ "model": "m" }), "input"),
            (ask("m", json!(5), json!({})), "input"),
            (ask("m", json!([]), json!({})), "input"),
            (
                ask(
                    "m",
                    json!([{ "role": "system", "content": "only a system message" }]),
                    json!({}),
                ),
                "input",
            ),
            (ask("m", json!(["x"]), json!({})), "input[0]"),
            (
                ask("m", json!([{ "content": "x" }]), json!({})),
                "input[0].role",
            ),
            (
                ask("m", json!([{ "role": "tool", "content": "x" }]), json!({})),
                "input[0].role",
            ),
            (
                ask("m", json!([{ "role": "user", "content": 3 }]), json!({})),
                "input[0].content",
            ),
            (
                ask(
                    "m",
                    json!([{ "type": "item_reference", "id": "x" }]),
                    json!({}),
                ),
                "input[0].type",
            ),
            (
                ask("m", msg(json!([{ "text": "x" }])), json!({})),
                "input[0].content[0].type",
            ),
            (
                ask("m", msg(json!([{ "type": "input_audio" }])), json!({})),
                "input[0].content[0].type",
            ),
            (
                ask("m", msg(json!([{ "type": "input_text" }])), json!({})),
                "input[0].content[0].text",
            ),
            (
                ask(
                    "m",
                    json!(["hi", { "role": "user", "content": [{ "type": "input_text", "text": "a" },
                    { "type": "input_image", "image_url": "ftp://x" }] }]),
                    json!({}),
                ),
                "input[0]",
            ),
            (
                ask(
                    "m",
                    json!([{ "role": "user", "content": "a" }, { "role": "user", "content": "b" },
                    { "role": "user", "content": [{ "type": "input_text", "text": "a" },
                    { "type": "input_image", "image_url": "ftp://x" }] }]),
                    json!({}),
                ),
                "input[2].content[1].image_url",
            ),
            (
                ask(
                    "m",
                    msg(json!([{ "type": "input_image", "file_id": "file-1" }])),
                    json!({}),
                ),
                "input[0].content[0].file_id",
            ),
            (
                ask("m", msg(json!([{ "type": "input_image" }])), json!({})),
                "input[0].content[0].image_url",
            ),
            (
                ask(
                    "m",
                    msg(json!([{ "type": "input_file", "file_id": "file-1" }])),
                    json!({}),
                ),
                "input[0].content[0].file_id",
            ),
            (
                ask(
                    "m",
                    msg(
                        json!([{ "type": "input_file", "file_data": "JVBE", "filename": "a.bin" }]),
                    ),
                    json!({}),
                ),
                "input[0].content[0].file_data",
            ),
            (
                ask(
                    "m",
                    json!([{ "type": "function_call", "name": "f" }]),
                    json!({}),
                ),
                "input[0].call_id",
            ),
            (
                ask(
                    "m",
                    json!([{ "type": "function_call", "call_id": "a" }]),
                    json!({}),
                ),
                "input[0].name",
            ),
            (
                ask(
                    "m",
                    json!([{ "type": "function_call", "call_id": "a", "name": "f", "arguments": "[1]" }]),
                    json!({}),
                ),
                "input[0].arguments",
            ),
            (
                ask(
                    "m",
                    json!([{ "type": "function_call_output", "call_id": "nope", "output": "1" }]),
                    json!({}),
                ),
                "input[0].call_id",
            ),
            (
                ask(
                    "m",
                    json!([{ "type": "function_call", "call_id": "a", "name": "f" },
                             { "type": "function_call_output", "call_id": "a", "output": 1 }]),
                    json!({}),
                ),
                "input[1].output",
            ),
            (
                ask("m", json!("x"), json!({ "instructions": 1 })),
                "instructions",
            ),
            (
                ask("m", json!("x"), json!({ "temperature": "hot" })),
                "temperature",
            ),
            (
                ask("m", json!("x"), json!({ "max_output_tokens": 0 })),
                "max_output_tokens",
            ),
            (
                ask(
                    "m",
                    json!("x"),
                    json!({ "previous_response_id": "r".repeat(129) }),
                ),
                "previous_response_id",
            ),
            (
                ask("m", json!("x"), json!({ "previous_response_id": 5 })),
                "previous_response_id",
            ),
            (ask("m", json!("x"), json!({ "tools": {} })), "tools"),
            (
                ask(
                    "m",
                    json!("x"),
                    json!({ "tools": [{ "type": "file_search" }] }),
                ),
                "tools[0].type",
            ),
            (
                ask(
                    "m",
                    json!("x"),
                    json!({ "tools": [{ "type": "function", "function": { "name": "f" } }] }),
                ),
                "tools[0].name",
            ),
            (
                ask(
                    "m",
                    json!("x"),
                    json!({ "tools": [{ "type": "web_search" }, { "type": "function", "name": "f",
                "parameters": { "$ref": "#/$defs/a", "$defs": { "a": { "$ref": "#/$defs/a" } } } }] }),
                ),
                "tools[1].parameters",
            ),
            (
                ask("m", json!("x"), json!({ "tool_choice": "always" })),
                "tool_choice",
            ),
            (
                ask(
                    "m",
                    json!("x"),
                    json!({ "tool_choice": { "type": "function" } }),
                ),
                "tool_choice.name",
            ),
            (
                ask(
                    "m",
                    json!("x"),
                    json!({ "tool_choice": { "type": "web_search_preview" } }),
                ),
                "tool_choice.type",
            ),
            (
                ask(
                    "m",
                    json!("x"),
                    json!({ "text": { "format": { "type": "xml" } } }),
                ),
                "text.format.type",
            ),
            (
                ask("m", json!("x"), json!({ "reasoning": { "effort": 3 } })),
                "reasoning.effort",
            ),
        ] {
            assert_eq!(field(body.clone()), expected, "{body}");
        }
        // A bad stored conversation names the id that brought it.
        let e = request(
            &ask("m", json!("x"), json!({ "previous_response_id": "resp_1" })),
            &[json!(7)],
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("previous_response_id"));
        assert!(request(&json!([]), &[]).is_err());
    }

    #[test]
    fn a_stream_continues_text_then_calls_a_function_then_completes() {
        let req = json!({ "model": "gemini-2.5-flash", "input": "weather?", "stream": true });
        let mut s = ResponseStream::new(&req, "gemini-2.5-flash", "s1", 9);
        // Two Gemini events in one push, with a comment line to ignore.
        let mut first = b": keepalive\r\n\r\n".to_vec();
        first.extend(gemini_event(
            json!([{ "text": "Hmm", "thought": true }]),
            json!({}),
            json!({}),
        ));
        first.extend(gemini_event(
            json!([{ "text": "Let me " }]),
            json!({}),
            json!({}),
        ));
        let mut out = s.push(&first);
        out += &s.push(&gemini_event(
            json!([{ "text": "check." }]),
            json!({}),
            json!({}),
        ));
        assert_eq!(completed(&s), None);
        out += &s.push(&gemini_event(
            json!([{ "functionCall": { "name": "weather", "args": { "city": "Paris" } }, "thoughtSignature": "sig" }]),
            json!({ "finishReason": "STOP" }),
            json!({ "usageMetadata": { "promptTokenCount": 9, "candidatesTokenCount": 6, "thoughtsTokenCount": 3 } }),
        ));
        assert_eq!(
            s.finish(),
            "",
            "the finish reason ended the response already"
        );
        assert_eq!(
            s.push(&gemini_event(
                json!([{ "text": "late" }]),
                json!({}),
                json!({})
            )),
            ""
        );
        assert_eq!(s.failed("x", "y"), "");

        let got = events(&out);
        assert_eq!(
            types(&got),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.reasoning_summary_part.added",
                "response.reasoning_summary_text.delta",
                "response.reasoning_summary_text.done",
                "response.reasoning_summary_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (n, e) in got.iter().enumerate() {
            assert_eq!(e["sequence_number"], n, "{e}");
        }
        // Every event of an item names it by its id and place.
        for e in &got[2..19] {
            let index = e["output_index"].as_u64().unwrap() as usize;
            let id = e.get("item_id").unwrap_or(&e["item"]["id"]);
            assert_eq!(id, ["rs_s1_0", "msg_s1_1", "fc_s1_2"][index], "{e}");
        }
        assert_eq!(got[0]["response"]["status"], "in_progress");
        assert_eq!(got[0]["response"]["output"], json!([]));
        assert_eq!(got[0]["response"]["id"], "resp_s1");
        assert_eq!(
            got[2]["item"],
            json!({ "type": "reasoning", "id": "rs_s1_0", "summary": [] })
        );
        assert_eq!(
            got[8]["item"],
            json!({ "type": "message", "id": "msg_s1_1", "status": "in_progress", "role": "assistant", "content": [] })
        );
        assert_eq!(
            got[9]["part"],
            json!({ "type": "output_text", "text": "", "annotations": [] })
        );
        assert_eq!(got[10]["delta"], "Let me ");
        assert_eq!(got[10]["content_index"], 0);
        assert_eq!(got[11]["delta"], "check.");
        assert_eq!(got[12]["text"], "Let me check.");
        assert_eq!(got[14]["item"]["status"], "completed");
        assert_eq!(got[14]["item"]["content"][0]["text"], "Let me check.");
        assert_eq!(got[15]["item"]["arguments"], "");
        assert_eq!(got[15]["item"]["status"], "in_progress");
        assert_eq!(got[16]["delta"], "{\"city\":\"Paris\"}");
        assert_eq!(got[17]["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(
            got[18]["item"],
            json!({ "type": "function_call", "id": "fc_s1_2", "call_id": "call_s1_2", "name": "weather",
                    "arguments": "{\"city\":\"Paris\"}", "status": "completed",
                    "extra_content": { "google": { "thought_signature": "sig" } } })
        );
        let done = &got[19]["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["usage"]["output_tokens"], 9);
        assert_eq!(done["usage"]["total_tokens"], 18);
        assert_eq!(
            done["output"],
            json!([got[7]["item"], got[14]["item"], got[18]["item"]])
        );
        assert_eq!(completed(&s).as_ref(), Some(done));

        // The same answer whole is the same response.
        let whole = json!({
            "candidates": [{ "content": { "parts": [
                { "text": "Hmm", "thought": true }, { "text": "Let me " }, { "text": "check." },
                { "functionCall": { "name": "weather", "args": { "city": "Paris" } }, "thoughtSignature": "sig" }
            ]}, "finishReason": "STOP" }],
            "usageMetadata": { "promptTokenCount": 9, "candidatesTokenCount": 6, "thoughtsTokenCount": 3 }
        });
        assert_eq!(&answered(&whole, &req, "gemini-2.5-flash", "s1", 9), done);
    }

    #[test]
    fn a_stream_without_a_finish_reason_completes_at_finish() {
        let mut s = ResponseStream::new(&json!({}), "m", "s2", 1);
        let out = s.push(&gemini_event(
            json!([{ "text": "Hi" }]),
            json!({}),
            json!({ "usageMetadata": { "promptTokenCount": 2, "candidatesTokenCount": 1 } }),
        ));
        assert_eq!(
            types(&events(&out)),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
            ]
        );
        let end = events(&s.finish());
        assert_eq!(
            types(&end),
            [
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert_eq!(end[0]["sequence_number"], 5, "numbered on from the pushes");
        assert_eq!(end[3]["response"]["usage"]["total_tokens"], 3);
        assert_eq!(s.finish(), "", "finished once");
        assert_eq!(
            completed(&s).unwrap()["output"][0]["content"][0]["text"],
            "Hi"
        );

        // A stream with no events at all still makes a whole response.
        let mut empty = ResponseStream::new(&json!({}), "m", "s3", 1);
        assert_eq!(
            types(&events(&empty.finish())),
            [
                "response.created",
                "response.in_progress",
                "response.completed"
            ]
        );
        assert_eq!(completed(&empty).unwrap()["output"], json!([]));
    }

    #[test]
    fn cut_off_and_blocked_streams_are_incomplete() {
        let mut s = ResponseStream::new(&json!({}), "m", "s4", 1);
        let out = s.push(&gemini_event(
            json!([{ "text": "Once" }]),
            json!({ "finishReason": "MAX_TOKENS" }),
            json!({}),
        ));
        let got = events(&out);
        let last = got.last().unwrap();
        assert_eq!(last["type"], "response.incomplete");
        assert_eq!(last["response"]["status"], "incomplete");
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        assert_eq!(completed(&s).as_ref(), Some(&last["response"]));

        let mut s = ResponseStream::new(&json!({}), "m", "s5", 1);
        let out =
            s.push(b"data: {\"promptFeedback\":{\"blockReason\":\"PROHIBITED_CONTENT\"}}\n\n");
        let got = events(&out);
        assert_eq!(
            types(&got),
            [
                "response.created",
                "response.in_progress",
                "response.incomplete"
            ]
        );
        assert_eq!(
            got[2]["response"]["incomplete_details"]["reason"],
            "content_filter"
        );
    }

    #[test]
    fn a_failed_stream_says_why_and_ends() {
        let mut s = ResponseStream::new(&json!({ "instructions": "x" }), "m", "s6", 1);
        let mut out = s.push(&gemini_event(
            json!([{ "text": "Hi" }]),
            json!({}),
            json!({}),
        ));
        out += &s.failed("server_error", "Gemini went away");
        let got = events(&out);
        let last = got.last().unwrap();
        assert_eq!(last["type"], "response.failed");
        assert_eq!(last["sequence_number"], got.len() - 1);
        let r = &last["response"];
        assert_eq!(r["status"], "failed");
        assert_eq!(
            r["error"],
            json!({ "code": "server_error", "message": "Gemini went away" })
        );
        assert_eq!(r["instructions"], "x");
        assert_eq!(r["output"][0]["status"], "incomplete", "cut off mid-way");
        assert_eq!(r["output"][0]["content"][0]["text"], "Hi");
        assert_eq!(completed(&s), None);
        assert_eq!(s.finish(), "");
        assert_eq!(
            s.push(&gemini_event(
                json!([{ "text": "more" }]),
                json!({}),
                json!({})
            )),
            ""
        );

        // Failing before anything arrived still starts the stream.
        let mut s = ResponseStream::new(&json!({}), "m", "s7", 1);
        assert_eq!(
            types(&events(&s.failed("rate_limit_exceeded", "no keys"))),
            [
                "response.created",
                "response.in_progress",
                "response.failed"
            ]
        );
    }
}

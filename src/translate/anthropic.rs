//! Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) ⇄
//! `generateContent` / `streamGenerateContent` / `countTokens`.
//!
//! The request keeps everything the client said that Gemini has a place for and adds nothing of
//! its own; the answer keeps every part of the first candidate. A thought signature goes out as
//! the `signature` of a `thinking` block (an empty one, just before the `tool_use` it belongs
//! to), so a client that sends the content back, as Anthropic's clients do, returns it on the
//! right call. Streams are translated event by event as they arrive.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::openai::chat::{declaration, gemini_tools, is_gemini_3, push, stand_in_signatures};
use super::openai::{BadRequest, model_of, schema};
use super::parts::{Said, read_parts};
use super::usage::Tokens;

/// A translated Messages request.
#[derive(Debug)]
pub struct MessagesCall {
    pub model: String,
    pub stream: bool,
    /// The `generateContent` body.
    pub body: Value,
    /// Tool calls that came back without their thought signature, sent with Google's
    /// placeholder in its place (Gemini 3 refuses a model turn's call without one).
    pub placeholder_signatures: usize,
}

/// Translates an Anthropic Messages request into a Gemini request.
pub fn request(body: &Value) -> Result<MessagesCall, BadRequest> {
    let obj = object(body)?;
    let model = model_of(body)?;
    let max_tokens = obj
        .get("max_tokens")
        .and_then(Value::as_u64)
        .filter(|n| *n >= 1)
        .ok_or_else(|| {
            BadRequest::new(
                "max_tokens",
                "`max_tokens` is required: a whole number of at least 1",
            )
        })?;
    let (mut out, placeholders) = translate(obj, &model)?;
    let config = out.entry("generationConfig").or_insert_with(|| json!({}));
    config["maxOutputTokens"] = json!(max_tokens);
    Ok(MessagesCall {
        model,
        stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
        body: Value::Object(out),
        placeholder_signatures: placeholders,
    })
}

/// `POST /v1/messages/count_tokens` → the body of Gemini's `models/{m}:countTokens`
/// (`{"generateContentRequest": {"model", "contents", "systemInstruction", "tools"}}`), and
/// the model.
pub fn count_tokens_request(body: &Value) -> Result<(String, Value), BadRequest> {
    let obj = object(body)?;
    let model = model_of(body)?;
    let (mut out, _) = translate(obj, &model)?;
    let mut inner = Map::new();
    inner.insert("model".into(), json!(format!("models/{model}")));
    for key in ["contents", "systemInstruction", "tools"] {
        if let Some(v) = out.remove(key) {
            inner.insert(key.into(), v);
        }
    }
    Ok((model, json!({ "generateContentRequest": inner })))
}

/// Gemini's countTokens answer → `{"input_tokens": N}`.
pub fn count_tokens_response(answer: &Value) -> Value {
    let n = answer
        .get("totalTokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    json!({ "input_tokens": n })
}

/// The body as an object, or the client's error.
fn object(body: &Value) -> Result<&Map<String, Value>, BadRequest> {
    body.as_object()
        .ok_or_else(|| BadRequest::new("body", "the request body must be a JSON object"))
}

/// What Messages requests and token counts share: everything but `max_tokens` and `stream`.
/// Returns the Gemini body and how many placeholder signatures it holds.
fn translate(
    obj: &Map<String, Value>,
    model: &str,
) -> Result<(Map<String, Value>, usize), BadRequest> {
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| BadRequest::new("messages", "`messages` must be a non-empty list"))?;
    let mut turns = Turns::default();
    for (i, m) in messages.iter().enumerate() {
        turns.add(i, m)?;
    }
    if turns.contents.is_empty() {
        return Err(BadRequest::new(
            "messages",
            "`messages` needs at least one message with content",
        ));
    }
    let placeholders = stand_in_signatures(model, &mut turns.contents);

    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(turns.contents));
    let system = system_parts(obj.get("system"))?;
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({ "parts": system }));
    }
    let config = generation_config(obj, model)?;
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    let tools = tools(obj.get("tools"))?;
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = obj.get("tool_choice").filter(|c| !c.is_null()) {
        out.insert(
            "toolConfig".into(),
            json!({ "functionCallingConfig": function_calling_config(choice)? }),
        );
    }
    Ok((out, placeholders))
}

/// The messages of a Messages request as Gemini's turns.
#[derive(Default)]
struct Turns {
    /// The user and model turns.
    contents: Vec<Value>,
    /// `tool_use` ids → tool names, for `tool_result` blocks (which name only the id).
    call_names: HashMap<String, String>,
}

impl Turns {
    /// Adds message `i` as a turn of its role, joining a turn of the same role before it.
    fn add(&mut self, i: usize, m: &Value) -> Result<(), BadRequest> {
        let at = |field: &str| format!("messages[{i}].{field}");
        let role = match m.get("role").and_then(Value::as_str) {
            Some("user") => "user",
            Some("assistant") => "model",
            Some(other) => {
                return Err(BadRequest::new(
                    &at("role"),
                    format!("unknown role {other:?}: a message is the user's or the assistant's"),
                ));
            }
            None => return Err(BadRequest::new(&at("role"), "every message needs a role")),
        };
        let field = at("content");
        let parts = match m.get("content") {
            Some(Value::String(s)) => vec![json!({ "text": s })],
            Some(Value::Array(blocks)) => self.blocks(blocks, &field)?,
            _ => {
                return Err(BadRequest::new(
                    &field,
                    "must be a string or a list of content blocks",
                ));
            }
        };
        push(&mut self.contents, role, parts);
        Ok(())
    }

    /// A message's content blocks as parts. A `thinking` block's signature goes on the
    /// `tool_use` after it; its text is not sent (Gemini takes back signatures, not thoughts).
    fn blocks(&mut self, blocks: &[Value], field: &str) -> Result<Vec<Value>, BadRequest> {
        let mut parts = Vec::new();
        let mut signature: Option<&str> = None;
        for (j, b) in blocks.iter().enumerate() {
            let field = format!("{field}[{j}]");
            let kind = b.get("type").and_then(Value::as_str).ok_or_else(|| {
                BadRequest::new(&format!("{field}.type"), "every content block needs a type")
            })?;
            match kind {
                "text" => parts.push(json!({ "text": text(b, &field)? })),
                "image" | "document" => parts.push(source(b, kind, &field)?),
                "tool_use" => {
                    let mut part = self.function_call(b, &field)?;
                    if let Some(sig) = signature.take() {
                        part["thoughtSignature"] = json!(sig);
                    }
                    parts.push(part);
                }
                "tool_result" => parts.extend(self.function_response(b, &field)?),
                "thinking" => {
                    if let Some(sig) = b
                        .get("signature")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                    {
                        signature = Some(sig);
                    }
                }
                "redacted_thinking" => {}
                other => {
                    return Err(BadRequest::new(
                        &format!("{field}.type"),
                        format!("unknown content block type {other:?}"),
                    ));
                }
            }
        }
        Ok(parts)
    }

    /// A `tool_use` block as a `functionCall` part; remembers its name for its result.
    fn function_call(&mut self, b: &Value, field: &str) -> Result<Value, BadRequest> {
        let id = b.get("id").and_then(Value::as_str).ok_or_else(|| {
            BadRequest::new(&format!("{field}.id"), "a tool_use block needs its id")
        })?;
        let name = b.get("name").and_then(Value::as_str).ok_or_else(|| {
            BadRequest::new(
                &format!("{field}.name"),
                "a tool_use block needs the tool's name",
            )
        })?;
        let args = match b.get("input") {
            None | Some(Value::Null) => json!({}),
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => {
                return Err(BadRequest::new(
                    &format!("{field}.input"),
                    "must be a JSON object",
                ));
            }
        };
        self.call_names.insert(id.to_owned(), name.to_owned());
        Ok(json!({ "functionCall": { "name": name, "args": args } }))
    }

    /// A `tool_result` block as a `functionResponse` part named after the call it answers,
    /// then the images and documents of its content as parts of their own.
    fn function_response(&self, b: &Value, field: &str) -> Result<Vec<Value>, BadRequest> {
        let id_field = format!("{field}.tool_use_id");
        let id = b
            .get("tool_use_id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                BadRequest::new(
                    &id_field,
                    "a tool_result block needs the tool_use_id it answers",
                )
            })?;
        let name = self.call_names.get(id).ok_or_else(|| {
            BadRequest::new(
                &id_field,
                format!("{id:?} names no tool_use of an earlier message"),
            )
        })?;
        let content_field = format!("{field}.content");
        let mut texts = Vec::new();
        let mut media = Vec::new();
        match b.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => texts.push(s.as_str()),
            Some(Value::Array(blocks)) => {
                for (k, c) in blocks.iter().enumerate() {
                    let field = format!("{content_field}[{k}]");
                    match c.get("type").and_then(Value::as_str) {
                        Some("text") => texts.push(text(c, &field)?),
                        Some(kind @ ("image" | "document")) => media.push(source(c, kind, &field)?),
                        _ => {
                            return Err(BadRequest::new(
                                &format!("{field}.type"),
                                "a tool result holds text, image and document blocks",
                            ));
                        }
                    }
                }
            }
            Some(_) => {
                return Err(BadRequest::new(
                    &content_field,
                    "must be a string or a list of content blocks",
                ));
            }
        }
        let text = texts.join("\n");
        let response = if b.get("is_error").and_then(Value::as_bool) == Some(true) {
            json!({ "error": text })
        } else {
            match serde_json::from_str::<Value>(&text) {
                Ok(v @ Value::Object(_)) => v,
                _ => json!({ "result": text }),
            }
        };
        let mut parts = vec![json!({ "functionResponse": { "name": name, "response": response } })];
        parts.extend(media);
        Ok(parts)
    }
}

/// A block's `text`, which it must have.
fn text<'a>(b: &'a Value, field: &str) -> Result<&'a str, BadRequest> {
    b.get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| BadRequest::new(&format!("{field}.text"), "a text block needs its text"))
}

/// An `image` or `document` block's `source` as a part: base64 data → `inlineData`, a URL →
/// `fileData` (gemgate fetches http(s) URLs as for OpenAI requests: see
/// `chat::remote_files`), a document's plain text → a text part.
fn source(b: &Value, kind: &str, field: &str) -> Result<Value, BadRequest> {
    let field = format!("{field}.source");
    let bad = |message: &str| BadRequest::new(&field, message);
    let s = b
        .get("source")
        .filter(|s| s.is_object())
        .ok_or_else(|| bad("an image or document block needs a source object"))?;
    let get = |key: &str| s.get(key).and_then(Value::as_str);
    match get("type") {
        Some("base64") => {
            let mime =
                get("media_type").ok_or_else(|| bad("a base64 source needs its media_type"))?;
            let data = get("data").ok_or_else(|| bad("a base64 source needs its data"))?;
            Ok(json!({ "inlineData": { "mimeType": mime, "data": data } }))
        }
        Some("url") => {
            let url = get("url")
                .filter(|u| {
                    ["http://", "https://", "gs://"]
                        .iter()
                        .any(|p| u.starts_with(p))
                })
                .ok_or_else(|| bad("a url source needs an http(s) url"))?;
            let mut file = json!({ "fileUri": url });
            // Anthropic takes only PDFs as documents by URL.
            let pdf = (kind == "document").then_some("application/pdf");
            if let Some(mime) = mime_of(url).or(pdf) {
                file["mimeType"] = json!(mime);
            }
            Ok(json!({ "fileData": file }))
        }
        Some("text") if kind == "document" => {
            let data = get("data").ok_or_else(|| bad("a text source needs its data"))?;
            Ok(json!({ "text": data }))
        }
        Some(other) => Err(bad(&format!(
            "source type {other:?} is not supported: send base64 data or a url"
        ))),
        None => Err(bad("a source needs a type: base64 or url")),
    }
}

/// The media type a URL's file name says, if it says one.
fn mime_of(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let name = path.rsplit('/').next().unwrap_or(path);
    let (_, ext) = name.rsplit_once('.')?;
    Some(match ext.to_ascii_lowercase().as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "pdf" => "application/pdf",
        _ => return None,
    })
}

/// `system`: a string or a list of text blocks → the parts of the system instruction.
fn system_parts(system: Option<&Value>) -> Result<Vec<Value>, BadRequest> {
    match system {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![json!({ "text": s })]),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let field = format!("system[{i}]");
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => Ok(json!({ "text": text(b, &field)? })),
                    _ => Err(BadRequest::new(
                        &format!("{field}.type"),
                        "system blocks are text blocks",
                    )),
                }
            })
            .collect(),
        Some(_) => Err(BadRequest::new(
            "system",
            "must be a string or a list of text blocks",
        )),
    }
}

/// Sampling, stop sequences and thinking → `generationConfig`; only what the client sent
/// (`max_tokens` is added by [`request`]).
fn generation_config(
    obj: &Map<String, Value>,
    model: &str,
) -> Result<Map<String, Value>, BadRequest> {
    let mut c = Map::new();
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("top_k", "topK"),
    ] {
        match obj.get(from) {
            None | Some(Value::Null) => {}
            Some(v) if v.is_number() => {
                c.insert(to.into(), v.clone());
            }
            Some(_) => return Err(BadRequest::new(from, "must be a number")),
        }
    }
    match obj.get("stop_sequences") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) if list.iter().all(Value::is_string) => {
            if !list.is_empty() {
                c.insert("stopSequences".into(), Value::Array(list.clone()));
            }
        }
        Some(_) => {
            return Err(BadRequest::new(
                "stop_sequences",
                "must be a list of strings",
            ));
        }
    }
    if let Some(thinking) = obj.get("thinking").filter(|t| !t.is_null())
        && let Some(config) = thinking_config(thinking, model)?
    {
        c.insert("thinkingConfig".into(), config);
    }
    Ok(c)
}

/// `thinking` → `thinkingConfig`: a `thinkingLevel` for Gemini 3 (low under 8192 tokens of
/// budget, else high; it cannot be turned off, so `disabled` says nothing), a `thinkingBudget`
/// for the others; never both.
fn thinking_config(thinking: &Value, model: &str) -> Result<Option<Value>, BadRequest> {
    match thinking.get("type").and_then(Value::as_str) {
        Some("enabled") => {
            let budget = thinking
                .get("budget_tokens")
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    BadRequest::new(
                        "thinking.budget_tokens",
                        "thinking that is enabled needs budget_tokens: a whole number",
                    )
                })?;
            Ok(Some(if is_gemini_3(model) {
                let level = if budget < 8192 { "low" } else { "high" };
                json!({ "thinkingLevel": level, "includeThoughts": true })
            } else {
                json!({ "thinkingBudget": budget, "includeThoughts": true })
            }))
        }
        Some("disabled") if is_gemini_3(model) => Ok(None),
        Some("disabled") => Ok(Some(json!({ "thinkingBudget": 0 }))),
        _ => Err(BadRequest::new(
            "thinking.type",
            "must be enabled or disabled",
        )),
    }
}

/// `tools` → Gemini's tools: client tools as function declarations (their schemas cleaned
/// within one budget for the request), Anthropic's web search as Google Search.
fn tools(tools: Option<&Value>) -> Result<Vec<Value>, BadRequest> {
    let list = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(BadRequest::new("tools", "must be a list of tools")),
    };
    let mut budget = schema::Budget::default();
    let mut decls = Vec::new();
    let mut search = false;
    for (i, t) in list.iter().enumerate() {
        match t.get("type") {
            None | Some(Value::Null) => decls.push(declaration(
                t,
                &format!("tools[{i}]"),
                "input_schema",
                &mut budget,
            )?),
            Some(Value::String(kind)) if kind == "custom" => {
                decls.push(declaration(
                    t,
                    &format!("tools[{i}]"),
                    "input_schema",
                    &mut budget,
                )?);
            }
            Some(Value::String(kind)) if kind.starts_with("web_search_") => search = true,
            Some(kind) => {
                return Err(BadRequest::new(
                    &format!("tools[{i}].type"),
                    format!(
                        "{kind} is a tool Anthropic runs: of those, Gemini runs only web_search"
                    ),
                ));
            }
        }
    }
    Ok(gemini_tools(decls, search))
}

/// `tool_choice` → Gemini's `functionCallingConfig`.
fn function_calling_config(choice: &Value) -> Result<Value, BadRequest> {
    Ok(match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!({ "mode": "AUTO" }),
        Some("any") => json!({ "mode": "ANY" }),
        Some("none") => json!({ "mode": "NONE" }),
        Some("tool") => {
            let name = choice.get("name").and_then(Value::as_str).ok_or_else(|| {
                BadRequest::new(
                    "tool_choice.name",
                    "a tool choice of type tool names the tool",
                )
            })?;
            json!({ "mode": "ANY", "allowedFunctionNames": [name] })
        }
        _ => {
            return Err(BadRequest::new(
                "tool_choice.type",
                "must be auto, any, tool or none",
            ));
        }
    })
}

/// Anthropic's error `type` for an HTTP status (400 and other 4xx: `invalid_request_error`;
/// 500 and other 5xx: `api_error`).
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// Gemini's `finishReason` (none: the answer just ended) → Anthropic's `stop_reason`.
fn stop_reason(finish: Option<&str>, called_tools: bool) -> &'static str {
    match finish {
        Some("MAX_TOKENS") => "max_tokens",
        Some(
            "SAFETY" | "RECITATION" | "PROHIBITED_CONTENT" | "BLOCKLIST" | "SPII" | "IMAGE_SAFETY",
        ) => "refusal",
        _ if called_tools => "tool_use",
        _ => "end_turn",
    }
}

/// The token counts of an answer's `usageMetadata`, if it has one.
fn tokens_of(answer: &Value) -> Option<Tokens> {
    let u = answer.get("usageMetadata")?;
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    Some(Tokens {
        prompt: n("promptTokenCount"),
        output: n("candidatesTokenCount"),
        thoughts: n("thoughtsTokenCount"),
        cached: n("cachedContentTokenCount"),
    })
}

/// Token counts as Anthropic's `usage`. Anthropic counts cache reads apart from
/// `input_tokens` (the prompt is their sum), Gemini's `promptTokenCount` includes them; thought
/// tokens are output tokens.
fn usage(t: &Tokens) -> Value {
    let mut u = json!({
        "input_tokens": t.prompt.saturating_sub(t.cached),
        "output_tokens": t.output.saturating_add(t.thoughts),
    });
    if t.cached > 0 {
        u["cache_read_input_tokens"] = json!(t.cached);
    }
    u
}

/// The id of the `n`th tool call of answer `id`.
fn tool_id(id: &str, n: usize) -> String {
    format!("toolu_{id}_{n}")
}

/// A whole `generateContent` answer as an Anthropic `message`; `id` is gemgate's request id.
pub fn response(answer: &Value, model: &str, id: &str) -> Value {
    let mut content: Vec<Value> = Vec::new();
    let mut calls = 0;
    let stop = match answer.pointer("/candidates/0") {
        Some(c) => {
            for said in read_parts(c) {
                add_block(&mut content, said, id, &mut calls);
            }
            let finish = c.get("finishReason").and_then(Value::as_str);
            stop_reason(finish, calls > 0)
        }
        // No candidate: Gemini blocked the prompt (`promptFeedback.blockReason`).
        None => "refusal",
    };
    json!({
        "id": format!("msg_{id}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": usage(&tokens_of(answer).unwrap_or_default()),
    })
}

/// Adds what a part says to a message's content: text joins the text block before it, a
/// thought the thinking block before it (unless that one is signed already), and a signed call
/// comes after an empty thinking block that carries its signature.
fn add_block(content: &mut Vec<Value>, said: Said, id: &str, calls: &mut usize) {
    match said {
        Said::Thought { text, signature } => {
            if let Some(last) = content.last_mut()
                && last["type"] == "thinking"
                && last["signature"] == ""
                && let Some(so_far) = last["thinking"].as_str()
            {
                last["thinking"] = json!(format!("{so_far}{text}"));
                if let Some(sig) = signature {
                    last["signature"] = json!(sig);
                }
                return;
            }
            content.push(json!({
                "type": "thinking",
                "thinking": text,
                "signature": signature.unwrap_or_default(),
            }));
        }
        Said::Text(text) => {
            if let Some(last) = content.last_mut()
                && last["type"] == "text"
                && let Some(so_far) = last["text"].as_str()
            {
                last["text"] = json!(format!("{so_far}{text}"));
                return;
            }
            content.push(json!({ "type": "text", "text": text }));
        }
        Said::Call {
            name,
            args,
            signature,
        } => {
            if let Some(sig) = signature {
                content.push(json!({ "type": "thinking", "thinking": "", "signature": sig }));
            }
            content.push(json!({
                "type": "tool_use",
                "id": tool_id(id, *calls),
                "name": name,
                "input": args.cloned().unwrap_or_else(|| json!({})),
            }));
            *calls += 1;
        }
    }
}

/// The kinds of content block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    Thinking,
    ToolUse,
}

/// A thinking block as a stream starts it.
fn empty_thinking() -> Value {
    json!({ "type": "thinking", "thinking": "", "signature": "" })
}

/// One server-sent event of Anthropic's: named after its data's `type`.
fn sse(data: Value) -> String {
    let mut event = String::new();
    let name = data["type"].as_str().unwrap_or("message");
    crate::translate::push_event(&mut event, Some(name), &data);
    event
}

/// Translates a `streamGenerateContent?alt=sse` stream into Anthropic's server-sent events:
/// `message_start`, each content block's `content_block_start`, deltas and
/// `content_block_stop`, then `message_delta` (the stop reason and output tokens) and
/// `message_stop`.
#[derive(Debug)]
pub struct MessageStream {
    /// gemgate's request id.
    id: String,
    model: String,
    /// `message_start` has been sent.
    started: bool,
    /// The open content block, and its index.
    open: Option<(Block, usize)>,
    /// Content blocks opened so far.
    blocks: usize,
    /// Tool calls so far.
    calls: usize,
    tokens: Tokens,
    /// `message_stop` has been sent: the stream says nothing more.
    done: bool,
}

impl MessageStream {
    pub fn new(model: &str, id: &str) -> Self {
        MessageStream {
            id: id.to_owned(),
            model: model.to_owned(),
            started: false,
            open: None,
            blocks: 0,
            calls: 0,
            tokens: Tokens::default(),
            done: false,
        }
    }

    /// Complete SSE events from Gemini (`data: {json}` lines; anything else is ignored) → the
    /// Anthropic events they make. Nothing once the message has stopped.
    pub fn push(&mut self, events: &[u8]) -> String {
        let mut out = String::new();
        if self.done {
            return out;
        }
        crate::translate::each_event(events, |answer| {
            self.event(answer, &mut out);
            !self.done
        });
        out
    }

    /// The stream's end: closes what is open, then `message_delta` and `message_stop` unless
    /// Gemini's finish reason sent them already (an answer that just ended ended its turn).
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        if !self.done {
            self.end(stop_reason(None, self.calls > 0), &mut out);
        }
        out
    }

    /// A `ping` event, to keep the connection busy.
    pub fn ping(&self) -> String {
        "event: ping\ndata: {\"type\": \"ping\"}\n\n".to_owned()
    }

    /// An `error` event of type `kind` (see [`error_type`]).
    pub fn error(&self, kind: &str, message: &str) -> String {
        sse(json!({ "type": "error", "error": { "type": kind, "message": message } }))
    }

    /// One Gemini event → the Anthropic events it makes.
    fn event(&mut self, answer: &Value, out: &mut String) {
        if let Some(t) = tokens_of(answer) {
            self.tokens = t;
        }
        self.start(out);
        let Some(c) = answer.pointer("/candidates/0") else {
            if answer.pointer("/promptFeedback/blockReason").is_some() {
                self.end("refusal", out);
            }
            return;
        };
        for said in read_parts(c) {
            self.said(said, out);
        }
        if let Some(finish) = c.get("finishReason").and_then(Value::as_str) {
            self.end(stop_reason(Some(finish), self.calls > 0), out);
        }
    }

    /// `message_start`, once: the message without content, and the prompt's tokens.
    fn start(&mut self, out: &mut String) {
        if self.started {
            return;
        }
        self.started = true;
        let mut usage = usage(&self.tokens);
        usage["output_tokens"] = json!(0);
        out.push_str(&sse(json!({
            "type": "message_start",
            "message": {
                "id": format!("msg_{}", self.id),
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": usage,
            },
        })));
        // Anthropic's streams say `ping` early on; clients wait for nothing in it.
        out.push_str(&self.ping());
    }

    /// What one part says: text and thoughts continue an open block of their kind; a call is
    /// a block of its own, after a signed empty thinking block when it carries a signature.
    fn said(&mut self, said: Said, out: &mut String) {
        match said {
            Said::Text(text) => {
                if !self.is_open(Block::Text) {
                    self.open(Block::Text, json!({ "type": "text", "text": "" }), out);
                }
                self.delta(json!({ "type": "text_delta", "text": text }), out);
            }
            Said::Thought { text, signature } => {
                if !self.is_open(Block::Thinking) {
                    self.open(Block::Thinking, empty_thinking(), out);
                }
                if !text.is_empty() {
                    self.delta(json!({ "type": "thinking_delta", "thinking": text }), out);
                }
                // A signature ends its thinking block, as Anthropic's do.
                if let Some(sig) = signature {
                    self.delta(json!({ "type": "signature_delta", "signature": sig }), out);
                    self.close(out);
                }
            }
            Said::Call {
                name,
                args,
                signature,
            } => {
                if let Some(sig) = signature {
                    self.open(Block::Thinking, empty_thinking(), out);
                    self.delta(json!({ "type": "signature_delta", "signature": sig }), out);
                }
                let id = tool_id(&self.id, self.calls);
                self.calls += 1;
                self.open(
                    Block::ToolUse,
                    json!({ "type": "tool_use", "id": id, "name": name, "input": {} }),
                    out,
                );
                let args = args.map_or_else(|| "{}".to_owned(), Value::to_string);
                self.delta(
                    json!({ "type": "input_json_delta", "partial_json": args }),
                    out,
                );
                self.close(out);
            }
        }
    }

    /// Whether a block of `kind` is open (for the next part to continue).
    fn is_open(&self, kind: Block) -> bool {
        matches!(self.open, Some((k, _)) if k == kind)
    }

    /// Closes the open block and opens `block`, of `kind`.
    fn open(&mut self, kind: Block, block: Value, out: &mut String) {
        self.close(out);
        let index = self.blocks;
        self.blocks += 1;
        self.open = Some((kind, index));
        out.push_str(&sse(json!({
            "type": "content_block_start",
            "index": index,
            "content_block": block,
        })));
    }

    /// A delta of the open block.
    fn delta(&self, delta: Value, out: &mut String) {
        if let Some((_, index)) = self.open {
            out.push_str(&sse(json!({
                "type": "content_block_delta",
                "index": index,
                "delta": delta,
            })));
        }
    }

    /// Closes the open block, if any.
    fn close(&mut self, out: &mut String) {
        if let Some((_, index)) = self.open.take() {
            out.push_str(&sse(
                json!({ "type": "content_block_stop", "index": index }),
            ));
        }
    }

    /// The message's end: whatever is open closed, its stop reason and output tokens, stop.
    fn end(&mut self, stop: &str, out: &mut String) {
        self.start(out);
        self.close(out);
        out.push_str(&sse(json!({
            "type": "message_delta",
            "delta": { "stop_reason": stop, "stop_sequence": null },
            "usage": { "output_tokens": self.tokens.output.saturating_add(self.tokens.thoughts) },
        })));
        out.push_str(&sse(json!({ "type": "message_stop" })));
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::openai::chat::PLACEHOLDER_SIGNATURE;

    /// A request for `model` with `messages` and whatever `extra` adds.
    fn ask(model: &str, messages: Value, extra: Value) -> Value {
        let mut body = json!({ "model": model, "max_tokens": 100, "messages": messages });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    }

    /// The field a bad request names.
    fn field(body: Value) -> String {
        request(&body).unwrap_err().param.unwrap()
    }

    /// A stream's output as (event name, data) pairs, checking each event's framing.
    fn events(out: &str) -> Vec<(String, Value)> {
        assert!(out.is_empty() || out.ends_with("\n\n"), "{out:?}");
        out.split_terminator("\n\n")
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap();
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(data["type"], name, "{e}");
                (name.to_owned(), data)
            })
            .collect()
    }

    #[test]
    fn plain_text_goes_and_comes_back() {
        let call = request(&json!({
            "model": "models/gemini-2.5-flash", "max_tokens": 1024, "stream": true,
            "metadata": { "user_id": "u" }, "service_tier": "auto",
            "messages": [{ "role": "user", "content": "Hello" }]
        }))
        .unwrap();
        assert_eq!(call.model, "gemini-2.5-flash");
        assert!(call.stream);
        assert_eq!(call.placeholder_signatures, 0);
        assert_eq!(
            call.body,
            json!({
                "contents": [{ "role": "user", "parts": [{ "text": "Hello" }] }],
                "generationConfig": { "maxOutputTokens": 1024 }
            })
        );
        let answer = json!({
            "candidates": [{ "content": { "role": "model", "parts": [{ "text": "Hi " }, { "text": "there" }] }, "finishReason": "STOP" }],
            "usageMetadata": { "promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5 }
        });
        assert_eq!(
            response(&answer, "gemini-2.5-flash", "r1"),
            json!({
                "id": "msg_r1", "type": "message", "role": "assistant", "model": "gemini-2.5-flash",
                "content": [{ "type": "text", "text": "Hi there" }],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": { "input_tokens": 3, "output_tokens": 2 }
            })
        );
        let empty = response(
            &json!({ "candidates": [{ "finishReason": "STOP" }] }),
            "m",
            "r",
        );
        assert_eq!(empty["content"], json!([]));
        assert_eq!(
            empty["usage"],
            json!({ "input_tokens": 0, "output_tokens": 0 })
        );
    }

    #[test]
    fn system_is_a_string_or_text_blocks() {
        let hi = json!([{ "role": "user", "content": "hi" }]);
        let call = request(&ask("m", hi.clone(), json!({ "system": "be brief" }))).unwrap();
        assert_eq!(
            call.body["systemInstruction"],
            json!({ "parts": [{ "text": "be brief" }] })
        );
        let call = request(&ask(
            "m",
            hi.clone(),
            json!({ "system": [
                { "type": "text", "text": "one" },
                { "type": "text", "text": "two", "cache_control": { "type": "ephemeral" } }
            ] }),
        ))
        .unwrap();
        assert_eq!(
            call.body["systemInstruction"],
            json!({ "parts": [{ "text": "one" }, { "text": "two" }] })
        );
        let none = request(&ask("m", hi.clone(), json!({ "system": "" }))).unwrap();
        assert!(none.body.get("systemInstruction").is_none());
        assert_eq!(
            field(ask("m", hi.clone(), json!({ "system": 3 }))),
            "system"
        );
        assert_eq!(
            field(ask("m", hi, json!({ "system": [{ "type": "image" }] }))),
            "system[0].type"
        );
    }

    #[test]
    fn images_and_documents_become_inline_data_or_file_data() {
        let call = request(&ask(
            "m",
            json!([{ "role": "user", "content": [
                { "type": "text", "text": "what is this?" },
                { "type": "image", "source": { "type": "base64", "media_type": "image/png", "data": "AAAA" } },
                { "type": "image", "source": { "type": "url", "url": "https://example.com/a/cat.JPG?size=2" } },
                { "type": "image", "source": { "type": "url", "url": "https://example.com/picture" } },
                { "type": "document", "source": { "type": "base64", "media_type": "application/pdf", "data": "JVBE" } },
                { "type": "document", "source": { "type": "url", "url": "https://example.com/paper" } },
                { "type": "document", "source": { "type": "text", "media_type": "text/plain", "data": "plain" } }
            ]}]),
            json!({}),
        ))
        .unwrap();
        assert_eq!(
            call.body["contents"][0]["parts"],
            json!([
                { "text": "what is this?" },
                { "inlineData": { "mimeType": "image/png", "data": "AAAA" } },
                { "fileData": { "fileUri": "https://example.com/a/cat.JPG?size=2", "mimeType": "image/jpeg" } },
                { "fileData": { "fileUri": "https://example.com/picture" } },
                { "inlineData": { "mimeType": "application/pdf", "data": "JVBE" } },
                { "fileData": { "fileUri": "https://example.com/paper", "mimeType": "application/pdf" } },
                { "text": "plain" }
            ])
        );
    }

    /// Two assistant turns of tool calls (the second with two parallel calls) and their
    /// results, as an Anthropic client sends them back; `signed` keeps the thinking blocks
    /// that carry the thought signatures.
    fn two_tool_turns(model: &str, signed: bool) -> Value {
        let thinking = |sig: &str| json!({ "type": "thinking", "thinking": "", "signature": sig });
        let mut first = vec![
            json!({ "type": "text", "text": "Let me look." }),
            json!({ "type": "tool_use", "id": "toolu_a", "name": "weather", "input": { "city": "Paris" } }),
        ];
        let mut second = vec![
            json!({ "type": "tool_use", "id": "toolu_b", "name": "time", "input": {} }),
            json!({ "type": "tool_use", "id": "toolu_c", "name": "weather", "input": { "city": "Rome" } }),
        ];
        if signed {
            first.insert(
                0,
                json!({ "type": "thinking", "thinking": "I should check.", "signature": "" }),
            );
            first.insert(2, thinking("s1"));
            second.insert(0, thinking("s2"));
            second.insert(1, json!({ "type": "redacted_thinking", "data": "xyz" }));
        }
        json!({
            "model": model, "max_tokens": 100,
            "messages": [
                { "role": "user", "content": "Weather in Paris?" },
                { "role": "assistant", "content": first },
                { "role": "user", "content": [
                    { "type": "tool_result", "tool_use_id": "toolu_a", "content": "{\"celsius\": 21}" }
                ]},
                { "role": "assistant", "content": second },
                { "role": "user", "content": [
                    { "type": "tool_result", "tool_use_id": "toolu_b", "content": [{ "type": "text", "text": "noon" }] },
                    { "type": "tool_result", "tool_use_id": "toolu_c", "content": "no network", "is_error": true }
                ]},
                { "role": "user", "content": "And now?" }
            ]
        })
    }

    #[test]
    fn tool_calls_and_results_go_back_with_their_names_and_signatures() {
        let call = request(&two_tool_turns("gemini-2.5-flash", true)).unwrap();
        assert_eq!(call.placeholder_signatures, 0);
        assert_eq!(
            call.body["contents"],
            json!([
                { "role": "user", "parts": [{ "text": "Weather in Paris?" }] },
                { "role": "model", "parts": [
                    { "text": "Let me look." },
                    { "functionCall": { "name": "weather", "args": { "city": "Paris" } }, "thoughtSignature": "s1" }
                ]},
                { "role": "user", "parts": [
                    { "functionResponse": { "name": "weather", "response": { "celsius": 21 } } }
                ]},
                { "role": "model", "parts": [
                    { "functionCall": { "name": "time", "args": {} }, "thoughtSignature": "s2" },
                    { "functionCall": { "name": "weather", "args": { "city": "Rome" } } }
                ]},
                // The results and the next question: one user turn.
                { "role": "user", "parts": [
                    { "functionResponse": { "name": "time", "response": { "result": "noon" } } },
                    { "functionResponse": { "name": "weather", "response": { "error": "no network" } } },
                    { "text": "And now?" }
                ]}
            ])
        );
    }

    #[test]
    fn an_answers_content_sent_back_keeps_its_signatures() {
        let answer = json!({ "candidates": [{ "content": { "parts": [
            { "text": "Checking.", "thought": true },
            { "functionCall": { "name": "look", "args": { "q": 1 } }, "thoughtSignature": "sig-1" },
            { "functionCall": { "name": "look", "args": { "q": 2 } } }
        ]}, "finishReason": "STOP" }] });
        let message = response(&answer, "gemini-3-pro-preview", "r9");
        let call = request(&json!({
            "model": "gemini-3-pro-preview", "max_tokens": 100,
            "messages": [
                { "role": "user", "content": "look twice" },
                { "role": "assistant", "content": message["content"] },
                { "role": "user", "content": [
                    { "type": "tool_result", "tool_use_id": "toolu_r9_0", "content": "one" },
                    { "type": "tool_result", "tool_use_id": "toolu_r9_1", "content": "two" }
                ]}
            ]
        }))
        .unwrap();
        assert_eq!(call.placeholder_signatures, 0);
        assert_eq!(
            call.body["contents"][1]["parts"],
            json!([
                { "functionCall": { "name": "look", "args": { "q": 1 } }, "thoughtSignature": "sig-1" },
                { "functionCall": { "name": "look", "args": { "q": 2 } } }
            ])
        );
        assert_eq!(
            call.body["contents"][2]["parts"][1]["functionResponse"]["name"],
            "look"
        );
    }

    #[test]
    fn gemini_3_calls_without_a_signature_get_the_placeholder() {
        let signature = |call: &MessagesCall, turn: usize, part: usize| {
            call.body["contents"][turn]["parts"][part]["thoughtSignature"].clone()
        };
        let dropped = request(&two_tool_turns("gemini-3-pro-preview", false)).unwrap();
        assert_eq!(dropped.placeholder_signatures, 2);
        // The first call of each model turn, after its text; never the second of parallel calls.
        assert_eq!(signature(&dropped, 1, 0), Value::Null);
        assert_eq!(signature(&dropped, 1, 1), PLACEHOLDER_SIGNATURE);
        assert_eq!(signature(&dropped, 3, 0), PLACEHOLDER_SIGNATURE);
        assert_eq!(signature(&dropped, 3, 1), Value::Null);
        let kept = request(&two_tool_turns("gemini-3-pro-preview", true)).unwrap();
        assert_eq!(kept.placeholder_signatures, 0);
        assert_eq!(signature(&kept, 1, 1), "s1");
        assert_eq!(signature(&kept, 3, 0), "s2");
        // Older models need none: nothing is made up for them.
        let older = request(&two_tool_turns("gemini-2.5-pro", false)).unwrap();
        assert_eq!(older.placeholder_signatures, 0);
        assert_eq!(signature(&older, 1, 1), Value::Null);
    }

    #[test]
    fn tools_and_tool_choice() {
        let hi = json!([{ "role": "user", "content": "hi" }]);
        let tools = json!([
            { "name": "look", "description": "Looks.", "cache_control": { "type": "ephemeral" },
              "input_schema": { "$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                                "properties": { "q": { "type": "string" } }, "additionalProperties": false } },
            { "type": "custom", "name": "plain", "input_schema": { "type": "object", "properties": {} } },
            { "type": "web_search_20250305", "name": "web_search", "max_uses": 3 }
        ]);
        let call = request(&ask("m", hi.clone(), json!({ "tools": tools }))).unwrap();
        assert_eq!(
            call.body["tools"],
            json!([
                { "functionDeclarations": [
                    { "name": "look", "description": "Looks.",
                      "parameters": { "type": "object", "properties": { "q": { "type": "string" } } } },
                    { "name": "plain", "parameters": { "type": "object", "properties": {} } }
                ]},
                { "googleSearch": {} }
            ])
        );
        assert!(call.body.get("toolConfig").is_none());
        for (choice, config) in [
            (json!({ "type": "auto" }), json!({ "mode": "AUTO" })),
            (
                json!({ "type": "any", "disable_parallel_tool_use": true }),
                json!({ "mode": "ANY" }),
            ),
            (json!({ "type": "none" }), json!({ "mode": "NONE" })),
            (
                json!({ "type": "tool", "name": "look" }),
                json!({ "mode": "ANY", "allowedFunctionNames": ["look"] }),
            ),
        ] {
            let call = request(&ask("m", hi.clone(), json!({ "tool_choice": choice }))).unwrap();
            assert_eq!(
                call.body["toolConfig"],
                json!({ "functionCallingConfig": config })
            );
        }
        assert_eq!(
            field(ask(
                "m",
                hi.clone(),
                json!({ "tool_choice": { "type": "tool" } })
            )),
            "tool_choice.name"
        );
        assert_eq!(
            field(ask(
                "m",
                hi.clone(),
                json!({ "tool_choice": { "type": "required" } })
            )),
            "tool_choice.type"
        );
        assert_eq!(
            field(ask(
                "m",
                hi.clone(),
                json!({ "tools": [{ "type": "bash_20250124", "name": "bash" }] })
            )),
            "tools[0].type"
        );
        assert_eq!(
            field(ask(
                "m",
                hi.clone(),
                json!({ "tools": [{ "description": "no name" }] })
            )),
            "tools[0].name"
        );
        let cyclic = json!({ "$defs": { "n": { "type": "object", "properties": { "next": { "$ref": "#/$defs/n" } } } },
                             "$ref": "#/$defs/n" });
        assert_eq!(
            field(ask(
                "m",
                hi,
                json!({ "tools": [{ "name": "x", "input_schema": cyclic }] })
            )),
            "tools[0].input_schema"
        );
    }

    #[test]
    fn thinking_is_a_budget_before_gemini_3_and_a_level_in_it() {
        let thinking = |model: &str, thinking: Value| {
            let call = request(&ask(
                model,
                json!([{ "role": "user", "content": "hi" }]),
                json!({ "thinking": thinking }),
            ))
            .unwrap();
            call.body["generationConfig"].get("thinkingConfig").cloned()
        };
        let enabled = |budget: u64| json!({ "type": "enabled", "budget_tokens": budget });
        let disabled = json!({ "type": "disabled" });
        assert_eq!(
            thinking("gemini-2.5-flash", enabled(2048)),
            Some(json!({ "thinkingBudget": 2048, "includeThoughts": true }))
        );
        assert_eq!(
            thinking("gemini-2.5-flash", disabled.clone()),
            Some(json!({ "thinkingBudget": 0 }))
        );
        assert_eq!(
            thinking("gemini-3-pro-preview", enabled(8191)),
            Some(json!({ "thinkingLevel": "low", "includeThoughts": true }))
        );
        assert_eq!(
            thinking("gemini-3-flash-preview", enabled(8192)),
            Some(json!({ "thinkingLevel": "high", "includeThoughts": true }))
        );
        assert_eq!(thinking("gemini-3-pro-preview", disabled), None);
        let hi = json!([{ "role": "user", "content": "hi" }]);
        assert_eq!(
            field(ask(
                "m",
                hi.clone(),
                json!({ "thinking": { "type": "enabled" } })
            )),
            "thinking.budget_tokens"
        );
        assert_eq!(
            field(ask("m", hi, json!({ "thinking": { "type": "on" } }))),
            "thinking.type"
        );
    }

    #[test]
    fn sampling_and_stop_sequences_go_in_the_generation_config() {
        let call = request(&ask(
            "m",
            json!([
                { "role": "user", "content": "one" },
                { "role": "user", "content": [{ "type": "text", "text": "two" }] },
                { "role": "assistant", "content": "three" }
            ]),
            json!({ "temperature": 0.5, "top_p": 0.9, "top_k": 40, "stop_sequences": ["END", "STOP"] }),
        ))
        .unwrap();
        assert_eq!(
            call.body["generationConfig"],
            json!({ "maxOutputTokens": 100, "temperature": 0.5, "topP": 0.9, "topK": 40,
                    "stopSequences": ["END", "STOP"] })
        );
        // Messages of one role in a row make one turn.
        assert_eq!(
            call.body["contents"],
            json!([
                { "role": "user", "parts": [{ "text": "one" }, { "text": "two" }] },
                { "role": "model", "parts": [{ "text": "three" }] }
            ])
        );
        assert!(!call.stream);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let hi = json!([{ "role": "user", "content": "hi" }]);
        let e = request(&json!({ "model": "m", "messages": hi })).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.contains("max_tokens"), "{}", e.message);
        assert_eq!(
            field(json!({ "model": "m", "max_tokens": 0, "messages": hi })),
            "max_tokens"
        );
        assert_eq!(
            field(json!({ "model": "m", "max_tokens": 1.5, "messages": hi })),
            "max_tokens"
        );
        assert_eq!(field(json!({ "max_tokens": 10, "messages": hi })), "model");
        assert_eq!(field(json!([1])), "body");
        assert_eq!(field(ask("m", json!([]), json!({}))), "messages");
        assert_eq!(field(json!({ "model": "m", "max_tokens": 10 })), "messages");
        assert_eq!(
            field(ask(
                "m",
                json!([{ "role": "user", "content": [] }]),
                json!({})
            )),
            "messages"
        );
        assert_eq!(
            field(ask(
                "m",
                json!([hi[0], { "role": "system", "content": "x" }]),
                json!({})
            )),
            "messages[1].role"
        );
        assert_eq!(
            field(ask("m", json!([{ "content": "x" }]), json!({}))),
            "messages[0].role"
        );
        assert_eq!(
            field(ask(
                "m",
                json!([{ "role": "user", "content": 7 }]),
                json!({})
            )),
            "messages[0].content"
        );
        assert_eq!(
            field(ask(
                "m",
                json!([{ "role": "user", "content": [{ "type": "tool_result", "tool_use_id": "toolu_x", "content": "1" }] }]),
                json!({})
            )),
            "messages[0].content[0].tool_use_id"
        );
        for source in [
            json!(null),
            json!({ "type": "base64", "data": "AAAA" }),
            json!({ "type": "url", "url": "file:///etc/passwd" }),
            json!({ "type": "file", "file_id": "f" }),
            json!({ "media_type": "image/png", "data": "AAAA" }),
        ] {
            assert_eq!(
                field(ask(
                    "m",
                    json!([hi[0], { "role": "user", "content": [
                        { "type": "text", "text": "see" },
                        { "type": "image", "source": source }
                    ]}]),
                    json!({})
                )),
                "messages[1].content[1].source",
                "{source}"
            );
        }
        assert_eq!(
            field(ask(
                "m",
                json!([{ "role": "user", "content": [{ "type": "video" }] }]),
                json!({})
            )),
            "messages[0].content[0].type"
        );
        assert_eq!(
            field(ask(
                "m",
                json!([{ "role": "assistant", "content": [{ "type": "tool_use", "id": "t", "input": {} }] }]),
                json!({})
            )),
            "messages[0].content[0].name"
        );
        assert_eq!(
            field(ask("m", hi.clone(), json!({ "temperature": "hot" }))),
            "temperature"
        );
        assert_eq!(
            field(ask("m", hi, json!({ "stop_sequences": "END" }))),
            "stop_sequences"
        );
    }

    #[test]
    fn answers_keep_thoughts_text_parallel_calls_and_usage() {
        let answer = json!({
            "candidates": [{
                "content": { "role": "model", "parts": [
                    { "text": "Thinking ", "thought": true },
                    { "text": "hard.", "thought": true, "thoughtSignature": "t-sig" },
                    { "text": "I'll check " },
                    { "text": "both." },
                    { "functionCall": { "name": "weather", "args": { "city": "Paris" } }, "thoughtSignature": "c-sig" },
                    { "functionCall": { "name": "weather", "args": { "city": "Rome" } } }
                ]},
                "finishReason": "STOP"
            }],
            "usageMetadata": { "promptTokenCount": 40, "cachedContentTokenCount": 32, "candidatesTokenCount": 10,
                               "thoughtsTokenCount": 5, "totalTokenCount": 55 }
        });
        let r = response(&answer, "gemini-2.5-pro", "abc");
        assert_eq!(
            r["content"],
            json!([
                { "type": "thinking", "thinking": "Thinking hard.", "signature": "t-sig" },
                { "type": "text", "text": "I'll check both." },
                { "type": "thinking", "thinking": "", "signature": "c-sig" },
                { "type": "tool_use", "id": "toolu_abc_0", "name": "weather", "input": { "city": "Paris" } },
                { "type": "tool_use", "id": "toolu_abc_1", "name": "weather", "input": { "city": "Rome" } }
            ])
        );
        assert_eq!(r["stop_reason"], "tool_use");
        assert_eq!(
            r["usage"],
            json!({ "input_tokens": 8, "output_tokens": 15, "cache_read_input_tokens": 32 })
        );
        let cut = json!({ "candidates": [{ "content": { "parts": [{ "text": "Once upon" }] }, "finishReason": "MAX_TOKENS" }] });
        assert_eq!(response(&cut, "m", "x")["stop_reason"], "max_tokens");
    }

    #[test]
    fn blocked_answers_are_refusals() {
        let blocked = json!({
            "promptFeedback": { "blockReason": "SAFETY" },
            "usageMetadata": { "promptTokenCount": 7, "totalTokenCount": 7 }
        });
        let r = response(&blocked, "m", "x");
        assert_eq!(r["content"], json!([]));
        assert_eq!(r["stop_reason"], "refusal");
        assert_eq!(r["usage"], json!({ "input_tokens": 7, "output_tokens": 0 }));
        for reason in [
            "SAFETY",
            "RECITATION",
            "PROHIBITED_CONTENT",
            "BLOCKLIST",
            "SPII",
        ] {
            let stopped = json!({ "candidates": [{ "content": { "parts": [{ "text": "partial" }] }, "finishReason": reason }] });
            let r = response(&stopped, "m", "x");
            assert_eq!(r["stop_reason"], "refusal", "{reason}");
            assert_eq!(r["content"][0]["text"], "partial");
        }
    }

    #[test]
    fn a_stream_continues_text_then_calls_a_tool_then_stops() {
        let mut s = MessageStream::new("gemini-2.5-flash", "s1");
        // Two Gemini events in one push, CRLF-separated, with a comment line to ignore.
        let mut out = s.push(
            b": keepalive\r\n\r\ndata: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"Hmm\",\"thought\":true}]}}],\"usageMetadata\":{\"promptTokenCount\":9}}\r\n\r\n\
              data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"Let me \"}]}}],\"usageMetadata\":{\"promptTokenCount\":9,\"candidatesTokenCount\":1}}\r\n\r\n",
        );
        out += &s.push(b"data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"check.\"}]}}]}\n\n");
        out += &s.push(b"data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"functionCall\":{\"name\":\"look\",\"args\":{\"q\":\"x\"}},\"thoughtSignature\":\"sig\"}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":9,\"candidatesTokenCount\":6,\"thoughtsTokenCount\":3}}\n\n");
        assert!(out.starts_with("event: message_start\ndata: {"), "{out}");
        let tail = s.finish();
        assert_eq!(tail, "", "the finish reason ended the message already");
        assert_eq!(
            s.push(b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"late\"}]}}]}\n\n"),
            ""
        );
        let got: Vec<Value> = events(&out).into_iter().map(|(_, d)| d).collect();
        let expected = vec![
            json!({ "type": "message_start", "message": {
                "id": "msg_s1", "type": "message", "role": "assistant", "model": "gemini-2.5-flash",
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": { "input_tokens": 9, "output_tokens": 0 } } }),
            json!({ "type": "ping" }),
            json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "thinking", "thinking": "", "signature": "" } }),
            json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "thinking_delta", "thinking": "Hmm" } }),
            json!({ "type": "content_block_stop", "index": 0 }),
            json!({ "type": "content_block_start", "index": 1, "content_block": { "type": "text", "text": "" } }),
            json!({ "type": "content_block_delta", "index": 1, "delta": { "type": "text_delta", "text": "Let me " } }),
            json!({ "type": "content_block_delta", "index": 1, "delta": { "type": "text_delta", "text": "check." } }),
            json!({ "type": "content_block_stop", "index": 1 }),
            json!({ "type": "content_block_start", "index": 2, "content_block": { "type": "thinking", "thinking": "", "signature": "" } }),
            json!({ "type": "content_block_delta", "index": 2, "delta": { "type": "signature_delta", "signature": "sig" } }),
            json!({ "type": "content_block_stop", "index": 2 }),
            json!({ "type": "content_block_start", "index": 3, "content_block": { "type": "tool_use", "id": "toolu_s1_0", "name": "look", "input": {} } }),
            json!({ "type": "content_block_delta", "index": 3, "delta": { "type": "input_json_delta", "partial_json": "{\"q\":\"x\"}" } }),
            json!({ "type": "content_block_stop", "index": 3 }),
            json!({ "type": "message_delta", "delta": { "stop_reason": "tool_use", "stop_sequence": null }, "usage": { "output_tokens": 9 } }),
            json!({ "type": "message_stop" }),
        ];
        assert_eq!(got, expected);
    }

    #[test]
    fn a_stream_without_a_finish_reason_ends_its_turn_at_finish() {
        let mut s = MessageStream::new("m", "s2");
        let out = s.push(b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hi\"}]}}],\"usageMetadata\":{\"promptTokenCount\":2,\"candidatesTokenCount\":1}}\n\n");
        let names: Vec<String> = events(&out).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta"
            ]
        );
        let end = s.finish();
        assert_eq!(
            events(&end).into_iter().map(|(_, d)| d).collect::<Vec<_>>(),
            vec![
                json!({ "type": "content_block_stop", "index": 0 }),
                json!({ "type": "message_delta", "delta": { "stop_reason": "end_turn", "stop_sequence": null }, "usage": { "output_tokens": 1 } }),
                json!({ "type": "message_stop" }),
            ]
        );
        assert_eq!(s.finish(), "", "finished once");
        assert_eq!(s.push(b"data: {\"candidates\":[]}\n\n"), "");
        // A stream with no events at all still makes a whole message.
        let mut empty = MessageStream::new("m", "s3");
        let names: Vec<String> = events(&empty.finish())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            ["message_start", "ping", "message_delta", "message_stop"]
        );
    }

    #[test]
    fn a_blocked_stream_is_a_refusal_and_pings_and_errors_have_their_shapes() {
        let mut s = MessageStream::new("m", "s4");
        let out = s.push(b"data: {\"promptFeedback\":{\"blockReason\":\"PROHIBITED_CONTENT\"},\"usageMetadata\":{\"promptTokenCount\":4}}\n\n");
        let got = events(&out);
        assert_eq!(got.len(), 4, "start, ping, delta, stop");
        assert_eq!(got[2].1["delta"]["stop_reason"], "refusal");
        assert_eq!(s.ping(), "event: ping\ndata: {\"type\": \"ping\"}\n\n");
        let e = events(&s.error("overloaded_error", "Overloaded"));
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].1,
            json!({ "type": "error", "error": { "type": "overloaded_error", "message": "Overloaded" } })
        );
    }

    #[test]
    fn token_counts_ask_gemini_with_the_same_translation() {
        let (model, body) = count_tokens_request(&json!({
            "model": "gemini-2.5-flash",
            "system": "be brief",
            "messages": [{ "role": "user", "content": "hi" }],
            "tools": [{ "name": "f", "input_schema": { "type": "object", "properties": {} } }],
            "tool_choice": { "type": "auto" },
            "thinking": { "type": "enabled", "budget_tokens": 2000 }
        }))
        .unwrap();
        assert_eq!(model, "gemini-2.5-flash");
        assert_eq!(
            body,
            json!({ "generateContentRequest": {
                "model": "models/gemini-2.5-flash",
                "contents": [{ "role": "user", "parts": [{ "text": "hi" }] }],
                "systemInstruction": { "parts": [{ "text": "be brief" }] },
                "tools": [{ "functionDeclarations": [{ "name": "f", "parameters": { "type": "object", "properties": {} } }] }]
            } })
        );
        assert_eq!(
            count_tokens_request(&json!({ "model": "m", "messages": [] }))
                .unwrap_err()
                .param
                .as_deref(),
            Some("messages")
        );
        assert_eq!(
            count_tokens_response(&json!({ "totalTokens": 31, "promptTokensDetails": [] })),
            json!({ "input_tokens": 31 })
        );
        assert_eq!(
            count_tokens_response(&json!({})),
            json!({ "input_tokens": 0 })
        );
    }

    #[test]
    fn error_types_follow_the_status() {
        for (status, kind) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (413, "request_too_large"),
            (422, "invalid_request_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
            (529, "overloaded_error"),
        ] {
            assert_eq!(error_type(status), kind, "{status}");
        }
    }
}

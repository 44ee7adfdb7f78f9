//! `POST /v1/chat/completions` ⇄ `generateContent` / `streamGenerateContent`.
//!
//! The request keeps everything the client said and adds nothing of its own; the answer keeps
//! every part of every candidate. Streams are translated event by event as they arrive.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::{BadRequest, schema};

/// Operator settings that shape answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Thoughts go to `reasoning_content` (else they are dropped).
    pub show_thinking: bool,
    /// Grounding sources are appended as markdown links.
    pub show_search_link: bool,
}

/// A translated chat request.
#[derive(Debug)]
pub struct ChatCall {
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// The `generateContent` body.
    pub body: Value,
    /// Tool calls that came back without their thought signature, sent with Google's
    /// placeholder in its place (Gemini 3 refuses a model turn's call without one).
    pub placeholder_signatures: usize,
}

/// Google's documented stand-in for a thought signature a client did not keep.
pub const PLACEHOLDER_SIGNATURE: &str = "skip_thought_signature_validator";

/// Gives each model turn's first call that came back without its thought signature Google's
/// placeholder (Gemini 3 refuses it otherwise; of parallel calls only the first carries one).
/// Returns how many it gave (none for models before Gemini 3, which need no signature).
pub(crate) fn stand_in_signatures(model: &str, contents: &mut [Value]) -> usize {
    if !is_gemini_3(model) {
        return 0;
    }
    let mut given = 0;
    for turn in contents.iter_mut().filter(|t| t["role"] == "model") {
        let first = turn["parts"]
            .as_array_mut()
            .and_then(|p| p.iter_mut().find(|p| p.get("functionCall").is_some()));
        if let Some(first) = first
            && first.get("thoughtSignature").is_none()
        {
            first["thoughtSignature"] = json!(PLACEHOLDER_SIGNATURE);
            given += 1;
        }
    }
    given
}

/// Whether `model` is of the Gemini 3 family: thinking levels, mandatory thought signatures.
pub fn is_gemini_3(model: &str) -> bool {
    model.starts_with("gemini-3")
}

/// Translates an OpenAI chat request into a Gemini request.
pub fn request(body: &Value) -> Result<ChatCall, BadRequest> {
    let obj = body
        .as_object()
        .ok_or_else(|| BadRequest::new("body", "the request body must be a JSON object"))?;
    let model = super::model_of(body)?;
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| BadRequest::new("messages", "`messages` must be a non-empty list"))?;
    let mut turns = Turns::of(messages)?;
    let placeholder_signatures = stand_in_signatures(&model, &mut turns.contents);

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
    let decls = function_declarations(obj, &mut budget)?;
    if !decls.is_empty() {
        out.insert("tools".into(), json!([{ "functionDeclarations": decls }]));
    }
    if let Some(choice) = obj.get("tool_choice") {
        out.insert(
            "toolConfig".into(),
            json!({ "functionCallingConfig": function_calling_config(choice)? }),
        );
    }
    keep_google_settings(body, obj, &mut out);
    Ok(ChatCall {
        model,
        stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        body: Value::Object(out),
        placeholder_signatures,
    })
}

/// The messages of a chat request as Gemini sees them.
#[derive(Default)]
struct Turns {
    /// The parts of the system instruction.
    system: Vec<Value>,
    /// The user and model turns.
    contents: Vec<Value>,
    /// Tool call ids → function names, for `tool` messages (which name only the id).
    call_names: HashMap<String, String>,
}

impl Turns {
    /// Reads every message, in order; there must be at least one user or assistant turn.
    fn of(messages: &[Value]) -> Result<Turns, BadRequest> {
        let mut turns = Turns::default();
        for (i, m) in messages.iter().enumerate() {
            turns.add(i, m)?;
        }
        if turns.contents.is_empty() {
            return Err(BadRequest::new(
                "messages",
                "`messages` needs at least one user or assistant message",
            ));
        }
        Ok(turns)
    }

    /// Adds message `i` where its role says: the system instruction or a turn.
    fn add(&mut self, i: usize, m: &Value) -> Result<(), BadRequest> {
        let at = |field: &str| format!("messages[{i}].{field}");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| BadRequest::new(&at("role"), "every message needs a role"))?;
        match role {
            "system" | "developer" => self.system.extend(parts(m.get("content"), &at("content"))?),
            "user" => push(
                &mut self.contents,
                "user",
                parts(m.get("content"), &at("content"))?,
            ),
            "assistant" => {
                let p = self.assistant_parts(i, m)?;
                push(&mut self.contents, "model", p);
            }
            "tool" | "function" => {
                let p = self.function_response(i, m)?;
                push(&mut self.contents, "user", vec![p]);
            }
            other => {
                return Err(BadRequest::new(
                    &at("role"),
                    format!("unknown role {other:?}"),
                ));
            }
        }
        Ok(())
    }

    /// An assistant message's content and tool calls, as parts.
    fn assistant_parts(&mut self, i: usize, m: &Value) -> Result<Vec<Value>, BadRequest> {
        let mut p = match m.get("content") {
            None | Some(Value::Null) => Vec::new(),
            Some(c) => parts(Some(c), &format!("messages[{i}].content"))?,
        };
        for (j, call) in m
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            p.push(self.function_call(call, &format!("messages[{i}].tool_calls[{j}]"))?);
        }
        Ok(p)
    }

    /// One tool call of an assistant message as a `functionCall` part; remembers its name.
    fn function_call(&mut self, call: &Value, field: &str) -> Result<Value, BadRequest> {
        let f = call
            .get("function")
            .ok_or_else(|| BadRequest::new(field, "needs a function"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| BadRequest::new(field, "needs a function name"))?;
        let args = match f.get("arguments") {
            Some(Value::String(s)) if s.trim().is_empty() => json!({}),
            Some(Value::String(s)) => serde_json::from_str(s)
                .map_err(|_| BadRequest::new(field, "`arguments` must be a JSON object"))?,
            Some(v @ Value::Object(_)) => v.clone(),
            _ => json!({}),
        };
        if let Some(id) = call.get("id").and_then(Value::as_str) {
            self.call_names.insert(id.to_owned(), name.to_owned());
        }
        let mut part = json!({ "functionCall": { "name": name, "args": args } });
        if let Some(sig) = call.pointer("/extra_content/google/thought_signature") {
            part["thoughtSignature"] = sig.clone();
        }
        Ok(part)
    }

    /// A `tool` message as a `functionResponse` part, named after the call it answers.
    fn function_response(&self, i: usize, m: &Value) -> Result<Value, BadRequest> {
        let name = m
            .get("tool_call_id")
            .and_then(Value::as_str)
            .and_then(|id| self.call_names.get(id).cloned())
            .or_else(|| m.get("name").and_then(Value::as_str).map(str::to_owned))
            .ok_or_else(|| {
                BadRequest::new(
                    &format!("messages[{i}].tool_call_id"),
                    "names no tool call of an earlier assistant message",
                )
            })?;
        let text = text_of(m.get("content"));
        let response = match serde_json::from_str::<Value>(&text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(v) => json!({ "result": v }),
            Err(_) => json!({ "result": text }),
        };
        Ok(json!({ "functionResponse": { "name": name, "response": response } }))
    }
}

/// `tools` → Gemini's function declarations; their schemas draw on `budget`.
fn function_declarations(
    obj: &Map<String, Value>,
    budget: &mut schema::Budget,
) -> Result<Vec<Value>, BadRequest> {
    let tools = obj.get("tools").and_then(Value::as_array);
    let mut decls = Vec::new();
    for (i, t) in tools.into_iter().flatten().enumerate() {
        decls.push(function_declaration(i, t, budget)?);
    }
    Ok(decls)
}

/// Tool `i` as a function declaration.
fn function_declaration(
    i: usize,
    t: &Value,
    budget: &mut schema::Budget,
) -> Result<Value, BadRequest> {
    let f = t
        .get("function")
        .ok_or_else(|| BadRequest::new(&format!("tools[{i}]"), "needs a function"))?;
    declaration(f, &format!("tools[{i}].function"), "parameters", budget)
}

/// Gemini's `tools`: the function declarations (when there are any), then Google Search when
/// asked for (as the Messages and Responses APIs can).
pub(crate) fn gemini_tools(decls: Vec<Value>, search: bool) -> Vec<Value> {
    let mut out = Vec::new();
    if !decls.is_empty() {
        out.push(json!({ "functionDeclarations": decls }));
    }
    if search {
        out.push(json!({ "googleSearch": {} }));
    }
    out
}

/// A client's function `f` (its `name`, `description`, and JSON schema under `schema_key`)
/// as a Gemini function declaration; `field` names it in errors (`tools[0]`).
pub(crate) fn declaration(
    f: &Value,
    field: &str,
    schema_key: &str,
    budget: &mut schema::Budget,
) -> Result<Value, BadRequest> {
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| BadRequest::new(&format!("{field}.name"), "is required"))?;
    let mut d = json!({ "name": name });
    if let Some(desc) = f.get("description").filter(|d| !d.is_null()) {
        d["description"] = desc.clone();
    }
    if let Some(s) = f.get(schema_key).filter(|s| !s.is_null()) {
        let field = format!("{field}.{schema_key}");
        d["parameters"] =
            schema::clean(s, budget).map_err(|e| BadRequest::new(&field, e.to_string()))?;
    }
    Ok(d)
}

/// `tool_choice` → Gemini's `functionCallingConfig`.
pub(crate) fn function_calling_config(choice: &Value) -> Result<Value, BadRequest> {
    Ok(match choice {
        Value::String(s) if s == "none" => json!({ "mode": "NONE" }),
        Value::String(s) if s == "auto" => json!({ "mode": "AUTO" }),
        Value::String(s) if s == "required" => json!({ "mode": "ANY" }),
        Value::Object(_) => match choice.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => json!({ "mode": "ANY", "allowedFunctionNames": [name] }),
            None => return Err(BadRequest::new("tool_choice", "needs function.name")),
        },
        _ => {
            return Err(BadRequest::new(
                "tool_choice",
                "must be none, auto, required or a function",
            ));
        }
    })
}

/// Gemini's own settings, which OpenAI clients send as extra body fields (top level, or in
/// `extra_body.google` as Google's OpenAI-compatible API takes them): kept, never dropped.
pub(crate) fn keep_google_settings(
    body: &Value,
    obj: &Map<String, Value>,
    out: &mut Map<String, Value>,
) {
    let google = body.pointer("/extra_body/google");
    for (names, to) in [
        (["safety_settings", "safetySettings"], "safetySettings"),
        (["cached_content", "cachedContent"], "cachedContent"),
    ] {
        let given = names
            .iter()
            .find_map(|n| obj.get(*n).or_else(|| google.and_then(|g| g.get(*n))));
        if let Some(v) = given.filter(|v| !v.is_null()) {
            out.insert(to.into(), v.clone());
        }
    }
    if let Some(thinking) =
        google.and_then(|g| g.get("thinking_config").or_else(|| g.get("thinkingConfig")))
    {
        let config = out.entry("generationConfig").or_insert_with(|| json!({}));
        config["thinkingConfig"] = thinking.clone();
    }
}

/// Appends parts as a turn of `role`, joining a turn of the same role before it (Gemini wants
/// a function's responses together, after the call).
pub(crate) fn push(contents: &mut Vec<Value>, role: &str, parts: Vec<Value>) {
    if parts.is_empty() {
        return;
    }
    if let Some(last) = contents.last_mut()
        && last["role"] == role
        && let Some(p) = last["parts"].as_array_mut()
    {
        p.extend(parts);
        return;
    }
    contents.push(json!({ "role": role, "parts": parts }));
}

/// A message's content as plain text: a string, or its text parts joined.
fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// A message's content as Gemini parts.
fn parts(content: Option<&Value>, field: &str) -> Result<Vec<Value>, BadRequest> {
    match content {
        Some(Value::String(s)) => Ok(vec![json!({ "text": s })]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, p)| part(p, &format!("{field}[{i}]")))
            .collect(),
        Some(Value::Null) | None => Ok(Vec::new()),
        Some(_) => Err(BadRequest::new(
            field,
            "must be a string or a list of parts",
        )),
    }
}

/// One OpenAI content part (`text`, `image_url`, `input_audio`, `file`) as a Gemini part.
fn part(p: &Value, field: &str) -> Result<Value, BadRequest> {
    let kind = p.get("type").and_then(Value::as_str).unwrap_or("text");
    match kind {
        "text" => Ok(json!({ "text": p.get("text").and_then(Value::as_str).unwrap_or_default() })),
        "image_url" => {
            let url = p
                .pointer("/image_url/url")
                .or_else(|| p.get("image_url"))
                .and_then(Value::as_str)
                .ok_or_else(|| BadRequest::new(field, "needs image_url.url"))?;
            data_url_part(url, field)
        }
        "input_audio" => {
            let data = p
                .pointer("/input_audio/data")
                .and_then(Value::as_str)
                .ok_or_else(|| BadRequest::new(field, "needs input_audio.data"))?;
            let format = p
                .pointer("/input_audio/format")
                .and_then(Value::as_str)
                .unwrap_or("wav");
            Ok(json!({ "inlineData": { "mimeType": format!("audio/{format}"), "data": data } }))
        }
        "file" => {
            let data = p
                .pointer("/file/file_data")
                .and_then(Value::as_str)
                .ok_or_else(|| BadRequest::new(field, "needs file.file_data (a data: URL)"))?;
            data_url_part(data, field)
        }
        other => Err(BadRequest::new(
            field,
            format!("unknown content part type {other:?}"),
        )),
    }
}

/// `data:<mime>;base64,<data>` → `inlineData`. Other URLs are refused with a clear message.
pub(crate) fn data_url_part(url: &str, field: &str) -> Result<Value, BadRequest> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| BadRequest::new(field, "a data: URL needs a comma"))?;
        let mime = meta
            .strip_suffix(";base64")
            .ok_or_else(|| BadRequest::new(field, "only base64 data: URLs are supported"))?;
        return Ok(json!({ "inlineData": { "mimeType": mime, "data": data } }));
    }
    // Google reads its own file URIs; other http(s) URLs are fetched by gemgate before the
    // request goes out (see `remote_files`).
    if url.starts_with("gs://") || url.starts_with("http://") || url.starts_with("https://") {
        return Ok(json!({ "fileData": { "fileUri": url } }));
    }
    Err(BadRequest::new(
        field,
        "an image must be a data: URL or an http(s) URL",
    ))
}

/// Whether Google reads this file URI itself (`gs://`, its Files API).
fn google_reads(uri: &str) -> bool {
    uri.starts_with("gs://") || uri.starts_with("https://generativelanguage.googleapis.com/")
}

/// The http(s) URLs of a translated request that gemgate must fetch, in order.
pub fn remote_files(body: &Value) -> Vec<String> {
    body.get("contents")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("parts").and_then(Value::as_array))
        .flatten()
        .filter_map(|p| p.pointer("/fileData/fileUri")?.as_str())
        .filter(|u| !google_reads(u))
        .map(str::to_owned)
        .collect()
}

/// Replaces each fetched URL's part with the file's bytes, in the order of [`remote_files`].
pub fn inline_files(body: &mut Value, fetched: Vec<(String, String)>) {
    let mut fetched = fetched.into_iter();
    let turns = body.get_mut("contents").and_then(Value::as_array_mut);
    for turn in turns.into_iter().flatten() {
        let parts = turn.get_mut("parts").and_then(Value::as_array_mut);
        for part in parts.into_iter().flatten() {
            let remote = part
                .pointer("/fileData/fileUri")
                .and_then(Value::as_str)
                .is_some_and(|u| !google_reads(u));
            if remote && let Some((mime, data)) = fetched.next() {
                *part = json!({ "inlineData": { "mimeType": mime, "data": data } });
            }
        }
    }
}

/// Sampling and output settings → `generationConfig`; only what the client sent.
fn generation_config(
    obj: &Map<String, Value>,
    model: &str,
    budget: &mut schema::Budget,
) -> Result<Map<String, Value>, BadRequest> {
    let mut c = Map::new();
    copy_numbers(obj, &mut c)?;
    if let Some(stop) = stop_sequences(obj)? {
        c.insert("stopSequences".into(), stop);
    }
    if let Some(format) = obj.get("response_format").filter(|f| !f.is_null()) {
        response_format(format, budget, &mut c)?;
    }
    if let Some(effort) = obj.get("reasoning_effort").and_then(Value::as_str) {
        c.insert("thinkingConfig".into(), thinking_config(effort, model)?);
    }
    Ok(c)
}

/// The numeric sampling settings, under Gemini's names.
fn copy_numbers(obj: &Map<String, Value>, c: &mut Map<String, Value>) -> Result<(), BadRequest> {
    let number = |name: &str| -> Result<Option<Value>, BadRequest> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) if v.is_number() => Ok(Some(v.clone())),
            Some(_) => Err(BadRequest::new(name, "must be a number")),
        }
    };
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("top_k", "topK"),
        ("n", "candidateCount"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
        ("max_tokens", "maxOutputTokens"),
        ("max_completion_tokens", "maxOutputTokens"),
    ] {
        if let Some(v) = number(from)? {
            c.insert(to.into(), v);
        }
    }
    Ok(())
}

/// `stop` → `stopSequences` (`None` when the client sent none).
fn stop_sequences(obj: &Map<String, Value>) -> Result<Option<Value>, BadRequest> {
    match obj.get("stop") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(json!([s]))),
        Some(Value::Array(list)) if list.iter().all(Value::is_string) => {
            Ok(Some(Value::Array(list.clone())))
        }
        Some(_) => Err(BadRequest::new(
            "stop",
            "must be a string or a list of strings",
        )),
    }
}

/// `response_format` → `responseMimeType` and `responseSchema`.
fn response_format(
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
            if let Some(s) = format.pointer("/json_schema/schema") {
                let cleaned = schema::clean(s, budget).map_err(|e| {
                    BadRequest::new("response_format.json_schema.schema", e.to_string())
                })?;
                c.insert("responseSchema".into(), cleaned);
            }
        }
        _ => {
            return Err(BadRequest::new(
                "response_format",
                "type must be text, json_object or json_schema",
            ));
        }
    }
    Ok(())
}

/// `reasoning_effort` → `thinkingConfig`: a `thinkingLevel` for the models that take one
/// (Gemini 3: Flash has minimal, low, medium and high, Pro low and high, and neither turns
/// thinking off), a `thinkingBudget` for the others; never both.
pub(crate) fn thinking_config(effort: &str, model: &str) -> Result<Value, BadRequest> {
    if is_gemini_3(model) {
        let flash = model.contains("flash");
        let level = match effort {
            "none" | "minimal" if flash => "minimal",
            "medium" if flash => "medium",
            "none" | "minimal" | "low" => "low",
            "medium" | "high" => "high",
            other => return Err(bad_effort(other)),
        };
        return Ok(json!({ "thinkingLevel": level, "includeThoughts": true }));
    }
    let budget = match effort {
        "none" | "minimal" => 0,
        "low" => 1024,
        "medium" => 8192,
        "high" => 24576,
        other => return Err(bad_effort(other)),
    };
    Ok(json!({ "thinkingBudget": budget, "includeThoughts": budget > 0 }))
}

fn bad_effort(effort: &str) -> BadRequest {
    BadRequest::new(
        "reasoning_effort",
        format!("{effort:?} is not none, minimal, low, medium or high"),
    )
}

/// Gemini's `finishReason` → OpenAI's `finish_reason`.
fn finish_reason(gemini: &str, called_tools: bool) -> &'static str {
    match gemini {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            "content_filter"
        }
        _ if called_tools => "tool_calls",
        _ => "stop",
    }
}

/// What one candidate's parts say, in OpenAI's terms.
#[derive(Default)]
struct Said {
    content: String,
    reasoning: String,
    tool_calls: Vec<Value>,
}

/// Reads the parts of one candidate. `next_call` numbers tool calls across a whole answer.
fn read_parts(candidate: &Value, options: Options, next_call: &mut usize, id: &str) -> Said {
    let mut said = Said::default();
    for p in candidate
        .pointer("/content/parts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(text) = p.get("text").and_then(Value::as_str) {
            if p.get("thought").and_then(Value::as_bool) == Some(true) {
                if options.show_thinking {
                    said.reasoning.push_str(text);
                }
            } else {
                said.content.push_str(text);
            }
        } else if let Some(call) = p.get("functionCall") {
            let mut tc = json!({
                "index": *next_call,
                "id": format!("call_{id}_{}", *next_call),
                "type": "function",
                "function": {
                    "name": call.get("name").cloned().unwrap_or(json!("")),
                    "arguments": call.get("args").map_or("{}".into(), Value::to_string),
                },
            });
            if let Some(sig) = p.get("thoughtSignature") {
                tc["extra_content"] = json!({ "google": { "thought_signature": sig } });
            }
            *next_call += 1;
            said.tool_calls.push(tc);
        } else if let Some(text) = crate::translate::parts::markdown_of(p) {
            said.content.push_str(&text);
        }
    }
    if options.show_search_link {
        said.content.push_str(&sources(candidate));
    }
    said
}

/// Grounding sources as markdown links (empty when the model did not search).
fn sources(candidate: &Value) -> String {
    let links: Vec<String> = candidate
        .pointer("/groundingMetadata/groundingChunks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let web = c.get("web")?;
            let uri = web.get("uri")?.as_str()?;
            let title = web.get("title").and_then(Value::as_str).unwrap_or(uri);
            Some(format!("- [{title}]({uri})"))
        })
        .collect();
    if links.is_empty() {
        String::new()
    } else {
        format!("\n\n**Sources:**\n{}\n", links.join("\n"))
    }
}

/// Gemini's `usageMetadata` as OpenAI's `usage` (thought tokens count as completion tokens).
fn usage(answer: &Value) -> Option<Value> {
    let u = answer.get("usageMetadata")?;
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let prompt = n("promptTokenCount");
    // The upstream's numbers, whatever they are: added without overflowing.
    let completion = n("candidatesTokenCount").saturating_add(n("thoughtsTokenCount"));
    Some(json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": n("totalTokenCount").max(prompt.saturating_add(completion)),
        "completion_tokens_details": { "reasoning_tokens": n("thoughtsTokenCount") },
    }))
}

/// Why Gemini refused the prompt, if it did.
fn blocked(answer: &Value) -> Option<String> {
    let reason = answer.pointer("/promptFeedback/blockReason")?.as_str()?;
    Some(format!("The prompt was blocked by Gemini ({reason})."))
}

/// A whole `generateContent` answer as a `chat.completion`.
pub fn response(answer: &Value, model: &str, id: &str, created: u64, options: Options) -> Value {
    let mut next_call = 0;
    let mut choices: Vec<Value> = answer
        .get("candidates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| {
            let said = read_parts(c, options, &mut next_call, id);
            let called = !said.tool_calls.is_empty();
            let mut message = json!({
                "role": "assistant",
                "content": if said.content.is_empty() && called { Value::Null } else { json!(said.content) },
            });
            if !said.reasoning.is_empty() {
                message["reasoning_content"] = json!(said.reasoning);
            }
            if called {
                message["tool_calls"] = Value::Array(said.tool_calls);
            }
            let reason = c.get("finishReason").and_then(Value::as_str).unwrap_or("STOP");
            json!({
                "index": c.get("index").and_then(Value::as_u64).unwrap_or(i as u64),
                "message": message,
                "finish_reason": finish_reason(reason, called),
                "logprobs": null,
            })
        })
        .collect();
    if choices.is_empty() {
        let why = blocked(answer).unwrap_or_else(|| "Gemini sent no answer.".into());
        choices.push(json!({
            "index": 0,
            "message": { "role": "assistant", "content": null, "refusal": why },
            "finish_reason": "content_filter",
            "logprobs": null,
        }));
    }
    let mut out = json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
    });
    if let Some(u) = usage(answer) {
        out["usage"] = u;
    }
    out
}

/// `STREAM_OPTIMIZER_*`: text that arrives in big pieces is sent on in small ones, evenly
/// paced — short texts character by character, slowly; long ones in `chunk_size` pieces, fast.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    pub min_delay: std::time::Duration,
    pub max_delay: std::time::Duration,
    pub short_text: usize,
    pub long_text: usize,
    pub chunk_size: usize,
}

impl Pacing {
    /// `text` cut into the pieces to send, and the pause after each.
    fn split(&self, text: &str) -> (Vec<String>, std::time::Duration) {
        let chars: Vec<char> = text.chars().collect();
        let n = chars.len();
        let (size, delay) = if n >= self.long_text {
            (self.chunk_size.max(1), self.min_delay)
        } else if n <= self.short_text {
            (1, self.max_delay)
        } else {
            let span = (self.long_text - self.short_text).max(1) as f64;
            let f = (n - self.short_text) as f64 / span;
            (
                1,
                self.max_delay.mul_f64(1.0 - f) + self.min_delay.mul_f64(f),
            )
        };
        (
            chars.chunks(size).map(|c| c.iter().collect()).collect(),
            delay,
        )
    }
}

/// One event to send, and how long to wait after it.
#[derive(Debug, PartialEq)]
pub struct Piece {
    pub event: String,
    pub pause: std::time::Duration,
}

/// What one candidate of a stream event adds to its choice.
struct Delta {
    index: u64,
    fields: Map<String, Value>,
    finish: Option<&'static str>,
}

/// Translates a `streamGenerateContent?alt=sse` stream into `chat.completion.chunk` events.
pub struct ChatStream {
    id: String,
    model: String,
    created: u64,
    options: Options,
    include_usage: bool,
    /// Choices that have had their first delta (which carries the role).
    started: Vec<u64>,
    next_call: usize,
    called_tools: bool,
    finished: bool,
    usage: Option<Value>,
    pacing: Option<Pacing>,
}

impl ChatStream {
    pub fn new(model: &str, id: &str, created: u64, include_usage: bool, options: Options) -> Self {
        ChatStream {
            id: format!("chatcmpl-{id}"),
            model: model.to_owned(),
            created,
            options,
            include_usage,
            started: Vec::new(),
            next_call: 0,
            called_tools: false,
            finished: false,
            usage: None,
            pacing: None,
        }
    }

    /// Re-paces text as `STREAM_OPTIMIZER_*` says (never tool calls or images).
    pub fn paced(mut self, pacing: Option<Pacing>) -> Self {
        self.pacing = pacing;
        self
    }

    /// An empty delta that keeps the connection busy while a fake stream waits for its answer
    /// (`FAKE_STREAM_*`); the first one carries the role.
    pub fn keepalive(&mut self) -> String {
        let mut delta = json!({ "content": "" });
        if !self.started.contains(&0) {
            self.started.push(0);
            delta["role"] = json!("assistant");
        }
        self.chunk(
            json!([{ "index": 0, "delta": delta, "finish_reason": null }]),
            None,
        )
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> String {
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            c["usage"] = u;
        }
        let mut event = String::new();
        crate::translate::push_event(&mut event, None, &c);
        event
    }

    /// Complete SSE events from Gemini → the OpenAI events they make.
    pub fn push(&mut self, events: &[u8]) -> String {
        self.push_paced(events)
            .into_iter()
            .map(|p| p.event)
            .collect()
    }

    /// [`ChatStream::push`], with the pauses the pacing asks for between events.
    pub fn push_paced(&mut self, events: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        let text = String::from_utf8_lossy(events);
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let Ok(answer) = serde_json::from_str::<Value>(data.trim()) else {
                continue;
            };
            self.event(&answer, &mut out);
        }
        out
    }

    /// A whole (non-streamed) answer, as a stream's events.
    pub fn push_answer(&mut self, answer: &Value) -> Vec<Piece> {
        let mut out = Vec::new();
        self.event(answer, &mut out);
        out
    }

    /// One Gemini event → the OpenAI events it makes, added to `pieces`.
    fn event(&mut self, answer: &Value, pieces: &mut Vec<Piece>) {
        if let Some(u) = usage(answer) {
            self.usage = Some(u);
        }
        let candidates = answer.get("candidates").and_then(Value::as_array);
        if candidates.is_none_or(Vec::is_empty) {
            self.refusal(answer, pieces);
            return;
        }
        let mut out = String::new();
        for (i, c) in candidates.into_iter().flatten().enumerate() {
            let delta = self.delta(i, c);
            if delta.fields.is_empty() && delta.finish.is_none() {
                continue;
            }
            self.send(delta, &mut out, pieces);
        }
        if !out.is_empty() {
            pieces.push(Piece {
                event: out,
                pause: std::time::Duration::ZERO,
            });
        }
    }

    /// An event without candidates: a refusal when Gemini blocked the prompt (else an empty
    /// piece).
    fn refusal(&mut self, answer: &Value, pieces: &mut Vec<Piece>) {
        let mut out = String::new();
        if let Some(why) = blocked(answer) {
            self.finished = true;
            out.push_str(&self.chunk(
                json!([{ "index": 0, "delta": { "role": "assistant", "refusal": why }, "finish_reason": "content_filter" }]),
                None,
            ));
        }
        pieces.push(Piece {
            event: out,
            pause: std::time::Duration::ZERO,
        });
    }

    /// What candidate `i` adds to its choice; notes the choice's start, tool calls and finish.
    fn delta(&mut self, i: usize, c: &Value) -> Delta {
        let index = c.get("index").and_then(Value::as_u64).unwrap_or(i as u64);
        let said = read_parts(c, self.options, &mut self.next_call, &self.id);
        let mut fields = Map::new();
        if !self.started.contains(&index) {
            self.started.push(index);
            fields.insert("role".into(), json!("assistant"));
        }
        if !said.content.is_empty() {
            fields.insert("content".into(), json!(said.content));
        }
        if !said.reasoning.is_empty() {
            fields.insert("reasoning_content".into(), json!(said.reasoning));
        }
        if !said.tool_calls.is_empty() {
            self.called_tools = true;
            fields.insert("tool_calls".into(), Value::Array(said.tool_calls));
        }
        let finish = c
            .get("finishReason")
            .and_then(Value::as_str)
            .map(|r| finish_reason(r, self.called_tools));
        if finish.is_some() {
            self.finished = true;
        }
        Delta {
            index,
            fields,
            finish,
        }
    }

    /// Writes a delta's chunk into `out`, or, when its text is paced, its chunks into `pieces`.
    fn send(&self, delta: Delta, out: &mut String, pieces: &mut Vec<Piece>) {
        let text = delta
            .fields
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let paceable = text.as_ref().filter(|t| {
            !delta.fields.contains_key("tool_calls")
                && !t.contains("](data:")
                && t.chars().count() > 1
        });
        match (self.pacing, paceable) {
            (Some(pacing), Some(text)) => self.send_paced(&delta, pacing.split(text), out, pieces),
            _ => out.push_str(&self.chunk(
                json!([{ "index": delta.index, "delta": delta.fields, "finish_reason": delta.finish }]),
                None,
            )),
        }
    }

    /// A delta whose text goes in `units`, one piece each with `pause` between them; the first
    /// carries the rest of the delta and the last its finish reason.
    fn send_paced(
        &self,
        delta: &Delta,
        (units, pause): (Vec<String>, std::time::Duration),
        out: &mut String,
        pieces: &mut Vec<Piece>,
    ) {
        let last = units.len() - 1;
        for (k, unit) in units.into_iter().enumerate() {
            let mut d = if k == 0 {
                delta.fields.clone()
            } else {
                Map::new()
            };
            d.insert("content".into(), json!(unit));
            let f = if k == last { delta.finish } else { None };
            out.push_str(&self.chunk(
                json!([{ "index": delta.index, "delta": d, "finish_reason": f }]),
                None,
            ));
            pieces.push(Piece {
                event: std::mem::take(out),
                pause: if k == last {
                    std::time::Duration::ZERO
                } else {
                    pause
                },
            });
        }
    }

    /// The stream's end: a final chunk if Gemini gave no finish reason, the usage chunk when
    /// asked for, then `[DONE]`.
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        if !self.finished {
            let reason = if self.called_tools {
                "tool_calls"
            } else {
                "stop"
            };
            out.push_str(&self.chunk(
                json!([{ "index": 0, "delta": {}, "finish_reason": reason }]),
                None,
            ));
        }
        if self.include_usage {
            let usage = self.usage.take().unwrap_or(
                json!({ "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0 }),
            );
            out.push_str(&self.chunk(json!([]), Some(usage)));
        }
        out.push_str("data: [DONE]\n\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chat of two assistant turns with tool calls (the second with two parallel calls), as
    /// a client that kept (`kept`) or dropped the thought signatures sends it back.
    fn two_tool_turns(model: &str, kept: bool) -> Value {
        let call = |id: &str, sig: Option<&str>| {
            let mut c = json!({ "id": id, "type": "function", "function": { "name": "f", "arguments": "{}" } });
            if let Some(sig) = sig.filter(|_| kept) {
                c["extra_content"] = json!({ "google": { "thought_signature": sig } });
            }
            c
        };
        json!({
            "model": model,
            "messages": [
                { "role": "user", "content": "go" },
                { "role": "assistant", "content": null, "tool_calls": [call("a", Some("s1"))] },
                { "role": "tool", "tool_call_id": "a", "content": "1" },
                { "role": "assistant", "content": null, "tool_calls": [call("b", Some("s2")), call("c", None)] },
                { "role": "tool", "tool_call_id": "b", "content": "2" },
                { "role": "tool", "tool_call_id": "c", "content": "3" }
            ]
        })
    }

    #[test]
    fn gemini_3_signatures_go_back_and_dropped_ones_are_stood_in_for() {
        let signature = |call: &ChatCall, turn: usize, part: usize| {
            call.body["contents"][turn]["parts"][part]["thoughtSignature"].clone()
        };
        let kept = request(&two_tool_turns("gemini-3-pro-preview", true)).unwrap();
        assert_eq!(signature(&kept, 1, 0), "s1");
        assert_eq!(signature(&kept, 3, 0), "s2");
        assert_eq!(
            signature(&kept, 3, 1),
            Value::Null,
            "only the first of parallel calls"
        );
        assert_eq!(kept.placeholder_signatures, 0);
        let dropped = request(&two_tool_turns("gemini-3-pro-preview", false)).unwrap();
        assert_eq!(signature(&dropped, 1, 0), PLACEHOLDER_SIGNATURE);
        assert_eq!(signature(&dropped, 3, 0), PLACEHOLDER_SIGNATURE);
        assert_eq!(signature(&dropped, 3, 1), Value::Null);
        assert_eq!(dropped.placeholder_signatures, 2);
        // Older models need none: nothing is made up for them.
        let older = request(&two_tool_turns("gemini-2.5-flash", false)).unwrap();
        assert_eq!(signature(&older, 1, 0), Value::Null);
        assert_eq!(older.placeholder_signatures, 0);
    }

    #[test]
    fn reasoning_effort_is_a_level_for_gemini_3_and_a_budget_before() {
        let thinking = |model: &str, effort: &str| {
            let call = request(&json!({
                "model": model, "reasoning_effort": effort,
                "messages": [{ "role": "user", "content": "hi" }]
            }))
            .unwrap();
            call.body["generationConfig"]["thinkingConfig"].clone()
        };
        for (model, effort, level) in [
            ("gemini-3-pro-preview", "low", "low"),
            ("gemini-3-pro-preview", "minimal", "low"),
            ("gemini-3-pro-preview", "medium", "high"),
            ("gemini-3-flash-preview", "minimal", "minimal"),
            ("gemini-3-flash-preview", "medium", "medium"),
            ("gemini-3-flash-preview", "high", "high"),
        ] {
            let t = thinking(model, effort);
            assert_eq!(t["thinkingLevel"], level, "{model} {effort}");
            assert!(t.get("thinkingBudget").is_none(), "never both: {t}");
        }
        let t = thinking("gemini-2.5-flash", "low");
        assert_eq!(t["thinkingBudget"], 1024);
        assert!(t.get("thinkingLevel").is_none(), "{t}");
    }

    #[test]
    fn messages_become_contents() {
        let call = request(&json!({
            "model": "gemini-2.5-flash",
            "messages": [
                { "role": "system", "content": "be brief" },
                { "role": "user", "content": [
                    { "type": "text", "text": "what is this?" },
                    { "type": "image_url", "image_url": { "url": "data:image/png;base64,AAAA" } }
                ]},
                { "role": "assistant", "content": null, "tool_calls": [
                    { "id": "c1", "type": "function", "function": { "name": "look", "arguments": "{\"q\":1}" },
                      "extra_content": { "google": { "thought_signature": "sig" } } }
                ]},
                { "role": "tool", "tool_call_id": "c1", "content": "{\"found\":true}" }
            ],
            "temperature": 0.2, "max_completion_tokens": 50, "stop": "END", "seed": 7,
            "tools": [{ "type": "function", "function": { "name": "look", "parameters": { "type": "object", "additionalProperties": false, "properties": {} } } }],
            "tool_choice": "required",
            "stream": true, "stream_options": { "include_usage": true }
        }))
        .unwrap();
        assert!(call.stream && call.include_usage);
        let b = &call.body;
        assert_eq!(b["systemInstruction"]["parts"][0]["text"], "be brief");
        assert_eq!(
            b["contents"][0]["parts"][1]["inlineData"]["mimeType"],
            "image/png"
        );
        assert_eq!(b["contents"][1]["role"], "model");
        assert_eq!(b["contents"][1]["parts"][0]["functionCall"]["args"]["q"], 1);
        assert_eq!(b["contents"][1]["parts"][0]["thoughtSignature"], "sig");
        assert_eq!(
            b["contents"][2]["parts"][0]["functionResponse"]["name"],
            "look"
        );
        assert_eq!(
            b["generationConfig"],
            json!({ "temperature": 0.2, "maxOutputTokens": 50, "stopSequences": ["END"], "seed": 7 })
        );
        assert_eq!(
            b["tools"][0]["functionDeclarations"][0]["parameters"],
            json!({ "type": "object", "properties": {} })
        );
        assert_eq!(b["toolConfig"]["functionCallingConfig"]["mode"], "ANY");
    }

    #[test]
    fn gemini_settings_sent_as_extra_fields_are_kept() {
        let call = request(&json!({
            "model": "m", "messages": [{ "role": "user", "content": "hi" }],
            "safety_settings": [{ "category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_NONE" }],
            "extra_body": { "google": { "cached_content": "cachedContents/abc", "thinking_config": { "thinkingBudget": 5 } } }
        }))
        .unwrap();
        assert_eq!(call.body["safetySettings"][0]["threshold"], "BLOCK_NONE");
        assert_eq!(call.body["cachedContent"], "cachedContents/abc");
        assert_eq!(
            call.body["generationConfig"]["thinkingConfig"]["thinkingBudget"],
            5
        );
    }

    #[test]
    fn nothing_is_added_that_the_client_did_not_send() {
        let call =
            request(&json!({ "model": "m", "messages": [{ "role": "user", "content": "hi" }] }))
                .unwrap();
        assert_eq!(
            call.body,
            json!({ "contents": [{ "role": "user", "parts": [{ "text": "hi" }] }] })
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        let e =
            request(&json!({ "model": "m", "messages": [{ "role": "robot", "content": "x" }] }))
                .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = request(&json!({ "model": "m", "messages": [{ "role": "user", "content": "x" }], "temperature": "hot" }))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
    }

    #[test]
    fn answers_keep_every_part() {
        let answer = json!({
            "candidates": [{
                "content": { "parts": [
                    { "text": "thinking…", "thought": true },
                    { "text": "Hello" },
                    { "functionCall": { "name": "f", "args": { "a": 1 } }, "thoughtSignature": "s" }
                ]},
                "finishReason": "STOP"
            }],
            "usageMetadata": { "promptTokenCount": 3, "candidatesTokenCount": 2, "thoughtsTokenCount": 4, "totalTokenCount": 9 }
        });
        let options = Options {
            show_thinking: true,
            show_search_link: true,
        };
        let r = response(&answer, "m", "x1", 1, options);
        let m = &r["choices"][0]["message"];
        assert_eq!(m["content"], "Hello");
        assert_eq!(m["reasoning_content"], "thinking…");
        assert_eq!(m["tool_calls"][0]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(
            m["tool_calls"][0]["extra_content"]["google"]["thought_signature"],
            "s"
        );
        assert_eq!(r["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(r["usage"]["completion_tokens"], 6);
        let blocked = response(
            &json!({ "promptFeedback": { "blockReason": "SAFETY" } }),
            "m",
            "x",
            1,
            options,
        );
        assert_eq!(blocked["choices"][0]["finish_reason"], "content_filter");
    }

    #[test]
    fn pacing_cuts_text_but_never_tool_calls() {
        let pacing = Pacing {
            min_delay: std::time::Duration::from_millis(1),
            max_delay: std::time::Duration::from_millis(3),
            short_text: 3,
            long_text: 10,
            chunk_size: 4,
        };
        let mut s = ChatStream::new("m", "x", 1, false, Options::default()).paced(Some(pacing));
        let pieces =
            s.push(b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"abc\"}]}}]}\n\n");
        assert_eq!(
            pieces.matches("data: ").count(),
            3,
            "one event a character: {pieces}"
        );
        let pieces = s.push_paced(b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"abcdefghijkl\"}]},\"finishReason\":\"STOP\"}]}\n\n");
        assert_eq!(pieces.len(), 3, "4-character pieces");
        assert_eq!(pieces[0].pause, std::time::Duration::from_millis(1));
        assert!(pieces[2].event.contains("\"finish_reason\":\"stop\""));
        let pieces = s.push_paced(b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"functionCall\":{\"name\":\"f\",\"args\":{}}}]}}]}\n\n");
        assert_eq!(pieces.len(), 1);
    }

    #[test]
    fn streams_have_one_role_a_finish_and_done() {
        let mut s = ChatStream::new("m", "x", 1, true, Options::default());
        let mut out = s.push(
            b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"He\"}]}}]}\r\n\r\n",
        );
        out.push_str(&s.push(b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"llo\"}]},\"finishReason\":\"MAX_TOKENS\"}],\"usageMetadata\":{\"promptTokenCount\":1,\"candidatesTokenCount\":2}}\n\n"));
        out.push_str(&s.finish());
        let events: Vec<Value> = out
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        assert_eq!(
            events[0]["choices"][0]["delta"],
            json!({ "role": "assistant", "content": "He" })
        );
        assert_eq!(
            events[1]["choices"][0]["delta"],
            json!({ "content": "llo" })
        );
        assert_eq!(events[1]["choices"][0]["finish_reason"], "length");
        assert_eq!(events[2]["usage"]["total_tokens"], 3);
        assert!(out.ends_with("data: [DONE]\n\n"));
        assert!(events.iter().all(|e| e["id"] == "chatcmpl-x"));
    }
}

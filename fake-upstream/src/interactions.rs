//! Google's Interactions API (`/v1beta/interactions`): create (whole, in the background or
//! streamed as server-sent events), get (whole, or its events again from `last_event_id` on),
//! cancel and delete.
//!
//! An interaction belongs, as a cached content does, to the Cloud project of the key that
//! created it (its quota-model project, else the key alone); a call about another project's
//! interaction, or an unknown one, answers Google's 403 with no `ErrorInfo`. The model answers
//! `echo: <the input's text>`. An input whose text contains `[break]` (or a `cut-…` key) makes
//! the created stream break off (the connection reset, no `[DONE]`) after its first
//! `step.delta`; the interaction is stored whole all the same, so that its events can be
//! fetched again.

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use serde_json::{Value, json};

use super::cache::{Owner, field, invalid, now_ns, parse_body, rfc3339};
use super::store::{Owned, Store};
use super::{Body, FakeState, MODELS, full, google_error, json_response, query_value, words};

/// The most interactions the fake keeps.
pub const MAX_INTERACTIONS: usize = 10_000;
/// The knob: an input text containing it breaks the created stream off.
pub const BREAK: &str = "[break]";

#[derive(Debug)]
pub(crate) struct Interaction {
    owner: Owner,
    model: Option<String>,
    agent: Option<String>,
    status: &'static str,
    created: i128,
    updated: i128,
    previous: Option<String>,
    answer: String,
    input_tokens: usize,
    /// A background interaction, finished at its first get.
    pending: bool,
    /// Its stream's events (with `event_type` and `event_id`), as created.
    events: Vec<Value>,
}

impl Owned for Interaction {
    fn owner(&self) -> &Owner {
        &self.owner
    }
}

impl Interaction {
    /// The interaction as Google shows it; its outputs and usage once it is over.
    fn json(&self, id: &str) -> Value {
        let mut v = json!({
            "id": id,
            "status": self.status,
            "created": rfc3339(self.created),
            "updated": rfc3339(self.updated),
        });
        if let Some(model) = &self.model {
            v["model"] = json!(model);
        }
        if let Some(agent) = &self.agent {
            v["agent"] = json!(agent);
        }
        if let Some(previous) = &self.previous {
            v["previous_interaction_id"] = json!(previous);
        }
        if self.status != "in_progress" {
            let output = words(&self.answer);
            v["steps"] = json!([{
                "type": "model_output",
                "content": [{ "type": "text", "text": self.answer }],
            }]);
            v["usage"] = json!({
                "total_input_tokens": self.input_tokens,
                "total_output_tokens": output,
                "total_tokens": self.input_tokens + output,
            });
        }
        v
    }
}

pub(crate) type Interactions = Store<Interaction, MAX_INTERACTIONS>;

/// Google's answer about an interaction that is unknown or another project's.
fn denied() -> Response<Body> {
    google_error(
        403,
        "PERMISSION_DENIED",
        "Interaction not found (or permission denied)",
        Value::Null,
    )
}

/// Every call on `/{version}/interactions[/{id}[/cancel]]` (`rest` empty for the collection).
pub(crate) fn call(
    state: &FakeState,
    key: &str,
    method: &Method,
    rest: &str,
    query: &str,
    body: &[u8],
) -> Response<Body> {
    let owner = state.owner_of(key);
    let (id, cancel) = match rest
        .strip_suffix("/cancel")
        .or_else(|| rest.strip_suffix(":cancel"))
    {
        Some(id) => (id, true),
        None => (rest, false),
    };
    if id.contains(['/', ':']) {
        return google_error(
            404,
            "NOT_FOUND",
            &format!("interactions/{rest} is not found"),
            Value::Null,
        );
    }
    let store = || state.interactions.lock().unwrap();
    match (id.is_empty(), cancel, method) {
        (true, false, &Method::POST) => create(state, key, owner, body),
        (false, false, &Method::GET) => {
            let stream = query_value(query, "stream") == Some("true");
            let mut store = store();
            let Some(interaction) = store.owned(id, &owner) else {
                return denied();
            };
            if interaction.pending {
                interaction.pending = false;
                interaction.status = "completed";
                interaction.updated = now_ns();
            }
            if !stream {
                return json_response(StatusCode::OK, &interaction.json(id));
            }
            let after = match query_value(query, "last_event_id").filter(|e| !e.is_empty()) {
                None => 0,
                Some(e) => match e.strip_prefix('e').and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) => n,
                    None => return invalid(&format!("Invalid last_event_id: {e}")),
                },
            };
            let mut out = String::new();
            for event in interaction.events.iter().skip(after) {
                out.push_str(&sse(event));
            }
            out.push_str("data: [DONE]\n\n");
            full(StatusCode::OK, "text/event-stream", out)
        }
        (false, true, &Method::POST) => {
            let mut store = store();
            let Some(interaction) = store.owned(id, &owner) else {
                return denied();
            };
            interaction.status = "cancelled";
            interaction.pending = false;
            interaction.updated = now_ns();
            json_response(StatusCode::OK, &interaction.json(id))
        }
        (false, false, &Method::DELETE) => {
            let mut store = store();
            if store.owned(id, &owner).is_none() {
                return denied();
            }
            store.remove(id);
            json_response(StatusCode::OK, &json!({}))
        }
        _ => google_error(405, "UNIMPLEMENTED", "Method not allowed", Value::Null),
    }
}

/// The texts an input holds: a string, or content blocks (`{"type":"text","text":…}`) and
/// turns (`{"role":…,"content":…}`), nested as they may be.
fn input_text(input: &Value, out: &mut Vec<String>) {
    match input {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| input_text(i, out)),
        Value::Object(o) => {
            if let Some(Value::String(t)) = o.get("text") {
                out.push(t.clone());
            }
            for nested in ["content", "parts"] {
                if let Some(v) = o.get(nested) {
                    input_text(v, out);
                }
            }
        }
        _ => {}
    }
}

/// A field that must be a boolean if present.
fn flag(request: &Value, name: &str, default: bool) -> Result<bool, Box<Response<Body>>> {
    match field(request, name) {
        None => Ok(default),
        Some(&Value::Bool(b)) => Ok(b),
        Some(_) => Err(Box::new(invalid(&format!(
            "Invalid JSON payload received. {name} is not a boolean."
        )))),
    }
}

/// A field that must be a non-empty string if present.
fn text_field<'a>(request: &'a Value, name: &str) -> Result<Option<&'a str>, Box<Response<Body>>> {
    match field(request, name) {
        None => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.as_str())),
        Some(_) => Err(Box::new(invalid(&format!(
            "Invalid JSON payload received. {name} is not a non-empty string."
        )))),
    }
}

fn create(state: &FakeState, key: &str, owner: Owner, body: &[u8]) -> Response<Body> {
    let request = match parse_body(body) {
        Ok(v) => v,
        Err(message) => return invalid(&message),
    };
    let fields = (|| {
        Ok::<_, Box<Response<Body>>>((
            text_field(&request, "model")?,
            text_field(&request, "agent")?,
            text_field(&request, "previous_interaction_id")?,
            flag(&request, "store", true)?,
            flag(&request, "background", false)?,
            flag(&request, "stream", false)?,
        ))
    })();
    let (model, agent, previous, store, background, stream) = match fields {
        Ok(f) => f,
        Err(refused) => return *refused,
    };
    let (model, agent) = match (model, agent) {
        (None, None) => return invalid("One of model or agent must be set."),
        (Some(_), Some(_)) => return invalid("Only one of model or agent may be set."),
        (model, agent) => (model.map(str::to_owned), agent.map(str::to_owned)),
    };
    if let Some(model) = &model {
        let bare = model.strip_prefix("models/").unwrap_or(model);
        if !MODELS.iter().any(|(n, ..)| *n == bare) {
            return google_error(
                404,
                "NOT_FOUND",
                &format!(
                    "models/{bare} is not found for API version v1beta, or is not supported for interactions."
                ),
                Value::Null,
            );
        }
    }
    let Some(input) = field(&request, "input") else {
        return invalid("input is required.");
    };
    let mut texts = Vec::new();
    input_text(input, &mut texts);
    let text = texts.join(" ");
    if let Some(previous) = previous
        && state
            .interactions
            .lock()
            .unwrap()
            .owned(previous, &owner)
            .is_none()
    {
        return denied();
    }
    if let Some(model) = &model {
        let bare = model.strip_prefix("models/").unwrap_or(model);
        if state.throttled() {
            return super::bare_429();
        }
        if let Some(refused) = state.admit(key, bare, words(&text)) {
            return refused;
        }
    }
    let now = now_ns();
    let id = format!("v1_{}", super::store::random_id(20, fastrand::alphanumeric));
    let mut interaction = Interaction {
        owner,
        model,
        agent,
        status: "completed",
        created: now,
        updated: now,
        previous: previous.map(str::to_owned),
        answer: format!("echo: {text}"),
        input_tokens: words(&text),
        pending: false,
        events: Vec::new(),
    };
    interaction.events = events(&interaction, &id);
    if background && !stream {
        interaction.status = "in_progress";
        interaction.pending = true;
    }
    // `[break]` in the input, or a key whose streams break off (`cut-…`).
    let broken =
        stream && (text.contains(BREAK) || state.behaviour(key) == super::Behaviour::CutStream);
    let answer = if stream {
        let mut frames: Vec<Bytes> = interaction
            .events
            .iter()
            .map(|e| Bytes::from(sse(e)))
            .collect();
        if broken {
            // Up to and including the first delta, then the connection breaks off.
            let first_delta = interaction
                .events
                .iter()
                .position(|e| e["event_type"] == "step.delta")
                .unwrap_or(0);
            frames.truncate(first_delta + 1);
            super::broken_stream(frames)
        } else {
            frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
            full(StatusCode::OK, "text/event-stream", frames.concat())
        }
    } else {
        json_response(StatusCode::OK, &interaction.json(&id))
    };
    if store {
        state.created(format!("interactions/{id}"), key);
        state.interactions.lock().unwrap().insert(id, interaction);
    }
    answer
}

/// The events of an interaction's stream, numbered `e1`, `e2`, …
fn events(interaction: &Interaction, id: &str) -> Vec<Value> {
    let mut done = json!(interaction.json(id));
    done["status"] = json!("completed");
    let mut started = json!({ "id": id, "status": "in_progress" });
    for (name, value) in [("model", &interaction.model), ("agent", &interaction.agent)] {
        if let Some(v) = value {
            started[name] = json!(v);
        }
    }
    let mut events = vec![
        json!({ "event_type": "interaction.created", "interaction": started }),
        json!({ "event_type": "step.start", "index": 0, "step": { "type": "model_output", "content": [] } }),
    ];
    for word in interaction.answer.split_inclusive(' ') {
        events.push(json!({ "event_type": "step.delta", "index": 0, "delta": { "type": "text", "text": word } }));
    }
    events.push(json!({ "event_type": "step.stop", "index": 0 }));
    events.push(json!({ "event_type": "interaction.completed", "interaction": done }));
    for (i, event) in events.iter_mut().enumerate() {
        event["event_id"] = json!(format!("e{}", i + 1));
    }
    events
}

/// One server-sent event.
fn sse(event: &Value) -> String {
    let kind = event["event_type"].as_str().unwrap_or("message");
    format!("event: {kind}\ndata: {event}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_found_anywhere() {
        let input = json!([
            { "role": "user", "content": [{ "type": "text", "text": "one" }, { "type": "image", "data": "x" }] },
            { "role": "model", "content": "two" },
            { "type": "text", "text": "three" },
            7,
        ]);
        let mut out = Vec::new();
        input_text(&input, &mut out);
        assert_eq!(out, ["one", "two", "three"]);
        let mut out = Vec::new();
        input_text(&json!("hello"), &mut out);
        assert_eq!(out, ["hello"]);
    }
}

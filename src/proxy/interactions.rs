//! The Interactions API (`/v1beta/interactions`): create (a model's or an agent's turn, maybe
//! in the background, maybe streamed as server-sent events), get (maybe as a stream resumed
//! after `last_event_id`), cancel and delete.
//!
//! An interaction lives in the Cloud project of the key that created it: gemgate records that
//! key with the client (the owner registry, kind `Interaction`), and sends every later call
//! about it — a get, a resumed stream, a cancel, a follow-up naming it as
//! `previous_interaction_id` — with that key and no other. A broken stream is never restarted
//! on another key: the client resumes it (`GET …?stream=true&last_event_id=…`) on its own key.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pingora::protocols::http::ServerSession;
use serde_json::Value;

use super::calls::{MAX_NAME, Verb};
use super::relay::{Piece, Reframe, SseEvents};
use super::{
    Exchange, Gateway, Generation, Meta, Outcome, Refusal, UpstreamRequest, auth, client_query,
    framing, send,
};
use crate::http::reply::{GateError, Protocol};
use crate::keys::owners::Kind;
use crate::translate::usage::Tokens;

/// How long Google keeps a stored interaction (the paid tier's 55 days; the free tier's is
/// shorter, and a call about an interaction Google dropped gets Google's own answer).
const LIFETIME_MS: u64 = 55 * 24 * 3_600_000;

/// The action of a call and the method its credentials are checked for.
fn action_of(id: Option<&str>, verb: Verb, method: &http::Method) -> (&'static str, http::Method) {
    use http::Method as M;
    match (id, verb, method) {
        (None, _, _) => ("interactions.create", M::POST),
        (Some(_), Verb::Cancel, _) => ("interactions.cancel", M::POST),
        (Some(_), Verb::None, &M::DELETE) => ("interactions.delete", M::DELETE),
        (Some(_), Verb::None, _) => ("interactions.get", M::GET),
    }
}

/// What a create names: its model or agent, whether it streams, whether Google stores it, and
/// the interaction it follows.
struct Create {
    model: String,
    stream: bool,
    store: bool,
    previous: Option<String>,
}

impl Create {
    fn of(body: &[u8]) -> Result<Create, Refusal> {
        let bad = |m: &str| Refusal::Gate(GateError::new(400, m));
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| bad(&format!("the request body is not JSON: {e}")))?;
        if !v.is_object() {
            return Err(bad("the request body must be a JSON object"));
        }
        let name = |field: &str| -> Result<Option<String>, Refusal> {
            match &v[field] {
                Value::Null => Ok(None),
                Value::String(s) if !s.is_empty() && s.len() <= MAX_NAME => {
                    Ok(Some(s.trim_start_matches("models/").to_owned()))
                }
                _ => Err(bad(&format!(
                    "`{field}` must be a name of at most {} bytes",
                    MAX_NAME
                ))),
            }
        };
        let model = match (name("model")?, name("agent")?) {
            (Some(m), None) | (None, Some(m)) => m,
            _ => return Err(bad("name exactly one of `model` and `agent`")),
        };
        Ok(Create {
            model,
            stream: v["stream"] == true,
            store: v["store"] != false,
            previous: name("previous_interaction_id")?,
        })
    }
}

impl Gateway {
    /// `POST /v1beta/interactions` (create, on any key, or the key of the interaction or files
    /// it names); `GET`, `DELETE /v1beta/interactions/{id}` and `POST …/{id}/cancel` with the
    /// key that owns it.
    pub(crate) async fn interactions(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        id: Option<String>,
        verb: Verb,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let method = s.req_header().method.clone();
        let action = action_of(id.as_deref(), verb, &method);
        let path = match (&id, verb) {
            (None, _) => "interactions".to_owned(),
            (Some(id), Verb::None) => format!("interactions/{id}"),
            (Some(id), Verb::Cancel) => format!("interactions/{id}/cancel"),
        };
        let mut up = self.resource_call(generation, s, action, &path, x).await?;
        let client = x.meta.client().to_owned();
        let Some(id) = id else {
            return self.create_interaction(generation, s, up, x).await;
        };
        self.ask_plugins(generation, s, "", false, &mut up, x)
            .await?;
        let query = client_query(s);
        let (_, index) = self.owned(generation, Kind::Interaction, &id, Some(&client))?;
        let stream = method == http::Method::GET
            && auth::query_param(&query, "stream").is_some_and(|v| v == "true");
        let up = UpstreamRequest {
            pinned: Some(index),
            reframe: interaction_events(stream, None),
            ..up
        };
        if stream {
            return self.relay_or_send(generation, &up, s, x).await;
        }
        let answer = self.collect(generation, &up, x).await?;
        if method == http::Method::DELETE {
            self.forget_owned(Kind::Interaction, &id);
        }
        Ok(send(s, x, 200, answer).await)
    }

    /// A create: with the key of the interaction it follows (or of the files it names), else
    /// any; the new interaction is recorded with the key that made it.
    async fn create_interaction(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        mut up: UpstreamRequest,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let create = Create::of(&up.body)?;
        // Policy is per model (or agent): the plugins are asked about the one named.
        self.ask_plugins(generation, s, &create.model, create.stream, &mut up, x)
            .await?;
        let client = x.meta.client.clone();
        up.pinned = match &create.previous {
            Some(previous) => Some(
                self.owned(generation, Kind::Interaction, previous, client.as_deref())?
                    .1,
            ),
            None => self.file_pin(generation, &up.body, client.as_deref())?,
        };
        x.model.clone_from(&create.model);
        up.model = create.model;
        up.idempotent = false;
        let made: Arc<Mutex<Option<String>>> = Arc::default();
        up.reframe = interaction_events(create.stream, Some(made.clone()));
        let outcome = if create.stream {
            self.relay_or_send(generation, &up, s, x).await?
        } else {
            let answer = self.collect(generation, &up, x).await?;
            let id = serde_json::from_slice::<Value>(&answer)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned));
            *made.lock().unwrap_or_else(|e| e.into_inner()) = id;
            send(s, x, 200, answer).await
        };
        let made = made.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (Some(id), true) = (made, create.store) {
            self.record_owned(Kind::Interaction, &id, self.owner_of(x), None, LIFETIME_MS);
        }
        Ok(outcome)
    }
}

/// How an interaction's answer reaches the client: a stream as whole events (noting the new
/// interaction's id in `made` when it is a create), else as it comes.
fn interaction_events(
    stream: bool,
    made: Option<Arc<Mutex<Option<String>>>>,
) -> super::MakeReframe {
    if !stream {
        return framing(false, false);
    }
    Box::new(move |_: &Meta| {
        Box::new(InteractionEvents {
            events: SseEvents::new(Protocol::Gemini),
            made: made.clone(),
            looked: 0,
        }) as Box<dyn Reframe>
    })
}

/// An interaction's server-sent events, relayed whole; the `interaction.created` event that
/// opens a create's stream names the interaction. An interrupted stream ends with the API's own `error` event.
struct InteractionEvents {
    events: SseEvents,
    /// Where the created interaction's id goes (`None` once found, or for a get).
    made: Option<Arc<Mutex<Option<String>>>>,
    /// Pieces looked at for the created event.
    looked: usize,
}

/// Pieces of a stream looked at for the event that names a new interaction.
const LOOK_AT: usize = 4;

impl Reframe for InteractionEvents {
    fn is_stream(&self) -> bool {
        true
    }

    fn push(&mut self, chunk: Bytes, out: &mut Vec<Piece>) {
        let from = out.len();
        self.events.push(chunk, out);
        // The created event comes first: only the first pieces are read.
        if out.len() == from || self.made.is_none() || self.looked >= LOOK_AT {
            return;
        }
        self.looked += out.len() - from;
        if let Some(id) = out[from..].iter().find_map(|p| created_id(&p.bytes))
            && let Some(made) = self.made.take()
        {
            *made.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
        }
    }

    fn finish(&mut self) -> Option<Bytes> {
        self.events.finish()
    }

    fn interrupted(&mut self, error: &GateError) -> Option<Bytes> {
        let event = serde_json::json!({
            "event_type": "error",
            "error": { "code": error.status, "message": error.message },
        });
        Some(Bytes::from(format!("data: {event}\r\n\r\n")))
    }

    fn tokens(&self) -> Tokens {
        self.events.tokens()
    }
}

/// The interaction id an `interaction.created` event among `events` names.
fn created_id(events: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(events).ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|v| {
            v["event_type"] == "interaction.created" || v["event_type"] == "interaction.start"
        })
        .and_then(|v| v.pointer("/interaction/id")?.as_str().map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_created_event_names_the_interaction() {
        let events = b"event: interaction.created\r\ndata: {\"event_type\":\"interaction.created\",\"event_id\":\"e1\",\"interaction\":{\"id\":\"v1_x\",\"status\":\"in_progress\"}}\r\n\r\n";
        assert_eq!(created_id(events).as_deref(), Some("v1_x"));
        assert_eq!(
            created_id(b"data: {\"event_type\":\"step.delta\"}\n\n"),
            None
        );
        assert_eq!(created_id(b"data: [DONE]\n\n"), None);
    }

    #[test]
    fn a_create_names_one_model_or_agent() {
        assert!(Create::of(br#"{"model":"gemini-2.5-flash","input":"hi"}"#).is_ok());
        let c = Create::of(br#"{"agent":"deep-research","background":true,"store":false,"stream":true,"previous_interaction_id":"v1_a"}"#)
            .ok()
            .unwrap();
        assert_eq!(
            (c.model.as_str(), c.stream, c.store, c.previous.as_deref()),
            ("deep-research", true, false, Some("v1_a"))
        );
        for bad in [
            &br#"{"input":"hi"}"#[..],
            br#"{"model":"a","agent":"b"}"#,
            br#"[1]"#,
            br#"{"model":7}"#,
            br#"{"model":"m","previous_interaction_id":""}"#,
        ] {
            assert!(Create::of(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}

//! OpenAI's Responses API (`/v1/responses`, also under `/hf/v1`): a request translated to
//! Gemini's native call by [`crate::translate::openai::responses`], answered whole or as the
//! Responses event stream; `GET` and `DELETE /v1/responses/{id}`.
//!
//! A response the client asks to keep (`store`, the default) is kept with its turn's items
//! and the response it follows, through the shared state (`SharedState::save_response`), so
//! any instance of a fleet continues a conversation (`previous_response_id`) for
//! `responses.retention_days`. Another client's response is answered 404.

use std::sync::{Arc, Mutex};

use pingora::protocols::http::ServerSession;
use serde_json::{Value, json};

use super::exchange::{Exchange, Meta};
use super::openai::{bad, json_answer, json_body};
use super::relay::{Reframe, StreamTranslator, Translated};
use super::{Gateway, Generation, Outcome, Refusal, read_body, send};
use crate::app::session::random_hex;
use crate::app::shared::StoredResponse;
use crate::clock::now_ms;
use crate::http::reply::{GateError, Protocol};
use crate::translate::json_bytes;
use crate::translate::openai::responses::{self, ResponseObject, ResponseStream};

/// Responses a conversation may go back through (`previous_response_id`, then theirs).
const MAX_CHAIN: usize = 100;
/// Looks at a `previous_response_id` not (yet) kept, 50 ms apart, before answering 404.
const FRESH_TRIES: usize = 10;

/// A new kept response's id (without `resp_`): not the request's id, which a client may choose
/// (`X-Request-Id`), but its own and unguessable, 128 bits from the system's random source.
/// The time first (milliseconds, 12 hex digits): kept responses are then added at the end of
/// their table, not all over it (at 32 connections, a call that keeps its answer took a
/// quarter more CPU with ids wholly random).
fn response_id(now_ms: u64) -> String {
    format!("{now_ms:012x}{}", random_hex::<16>())
}

fn no_such_response() -> Refusal {
    Refusal::Gate(GateError::new(
        404,
        "no such response kept through this gateway",
    ))
}

/// A Responses stream whose completed response goes to `done` for keeping.
struct KeptStream {
    stream: ResponseStream,
    done: Arc<Mutex<Option<ResponseObject>>>,
}

impl KeptStream {
    fn note_done(&self) {
        if let Some(completed) = self.stream.completed() {
            *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(completed.clone());
        }
    }
}

impl StreamTranslator for KeptStream {
    fn push(&mut self, events: &[u8]) -> String {
        let out = self.stream.push(events);
        self.note_done();
        out
    }

    fn finish(&mut self) -> String {
        let out = self.stream.finish();
        self.note_done();
        out
    }

    fn interrupted(&mut self, error: &GateError) -> String {
        self.stream.failed("server_error", &error.message)
    }
}

impl Gateway {
    /// `POST /v1/responses`; `GET` or `DELETE /v1/responses/{id}`.
    pub(crate) async fn responses(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        id: Option<String>,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let method = s.req_header().method.clone();
        let checked = match (&id, &method) {
            (Some(_), &http::Method::DELETE) => http::Method::DELETE,
            (Some(_), _) => http::Method::GET,
            (None, _) => http::Method::POST,
        };
        self.admit(generation, s, checked, &mut x.meta)?;
        let client = x.meta.client().to_owned();
        let Some(id) = id else {
            x.action = "responses.create".into();
            return self.create_response(generation, s, x).await;
        };
        let shared = &self.state.lasting.shared;
        let kept = shared
            .response(&id)
            .await
            .filter(|k| k.client == client)
            .ok_or_else(no_such_response)?;
        if method == http::Method::DELETE {
            x.action = "responses.delete".into();
            shared.save_response(&id, None).await;
            let body = json!({ "id": id, "object": "response.deleted", "deleted": true });
            return Ok(send(s, x, 200, json_bytes(&body)).await);
        }
        x.action = "responses.get".into();
        Ok(send(s, x, 200, json_bytes(&kept.response)).await)
    }

    /// The items of the conversation `previous` ends, oldest first: every kept response it
    /// follows must be the client's, and all of them together no larger than a request may be
    /// (`limit` bytes).
    async fn conversation(
        &self,
        previous: &str,
        client: &str,
        limit: u64,
    ) -> Result<Vec<Value>, Refusal> {
        let shared = &self.state.lasting.shared;
        let mut turns = Vec::new();
        let mut bytes = 0u64;
        let mut next = Some(previous.to_owned());
        while let Some(id) = next.take() {
            if turns.len() == MAX_CHAIN {
                return Err(Refusal::Gate(GateError::new(
                    400,
                    format!(
                        "a conversation goes back through at most {MAX_CHAIN} responses: start a new one with the history as input"
                    ),
                )));
            }
            let mut kept = shared.response(&id).await;
            // A streamed response is kept as its stream ends, when its client may already be
            // asking to continue it: the newest one is waited for a little.
            for _ in 0..FRESH_TRIES {
                if kept.is_some() || !turns.is_empty() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                kept = shared.response(&id).await;
            }
            let kept = kept
                .filter(|k| k.client == client)
                .ok_or_else(no_such_response)?;
            next = kept.previous.clone();
            bytes += kept
                .items
                .iter()
                .map(|item| item.to_string().len() as u64)
                .sum::<u64>();
            if bytes > limit {
                return Err(Refusal::Gate(GateError::new(
                    413,
                    format!(
                        "the conversation is larger than the limit of {limit} bytes: start a new one"
                    ),
                )));
            }
            turns.push(kept.items);
        }
        Ok(turns.into_iter().rev().flatten().collect())
    }

    /// A create: translated with its conversation, through the plugins, answered whole or as
    /// a stream, and kept when asked.
    async fn create_response(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let raw = read_body(s, generation.config.max_body_bytes).await?;
        if generation.config.file.logs.error_log_record_request_body {
            x.body = Some(raw.clone());
        }
        let json = json_body(&raw)?;
        let client = x.meta.client().to_owned();
        let previous = json["previous_response_id"].as_str().map(str::to_owned);
        let history = match &previous {
            Some(previous) => {
                let limit = generation.config.max_body_bytes;
                self.conversation(previous, &client, limit).await?
            }
            None => Vec::new(),
        };
        let mut request = responses::request(&json, &history).map_err(bad)?;
        if request.placeholder_signatures > 0 {
            tracing::info!(
                id = %x.meta.id,
                calls = request.placeholder_signatures,
                "tool calls came back without their thought signature: sent Google's placeholder"
            );
        }
        let action = if request.stream {
            "streamGenerateContent"
        } else {
            "generateContent"
        };
        let asked = (request.model.as_str(), action, request.stream);
        let body = std::mem::take(&mut request.body);
        let mut up = self
            .translated_call(generation, s, x, asked, true, body)
            .await?;
        let model = x.model.clone();
        let now = now_ms();
        let created = now / 1000;
        let response_id = response_id(now);
        let (outcome, answered) = if request.stream {
            let done: Arc<Mutex<Option<ResponseObject>>> = Arc::default();
            let (spec, id, kept) = (json.clone(), response_id.clone(), done.clone());
            let shown = model.clone();
            up.reframe = Box::new(move |_: &Meta| {
                let stream = KeptStream {
                    stream: ResponseStream::new(&spec, &shown, &id, created),
                    done: kept.clone(),
                };
                Box::new(Translated::new(Protocol::OpenAi, stream)) as Box<dyn Reframe>
            });
            let outcome = self.relay_or_send(generation, &up, s, x).await?;
            let answered = done.lock().unwrap_or_else(|e| e.into_inner()).take();
            (outcome, answered)
        } else {
            let answer = json_answer(&self.collect(generation, &up, x).await?)?;
            let out = responses::response(&answer, &json, &model, &response_id, created);
            // Kept before it is answered: the client's next call may continue it at once.
            self.keep_response(generation, &request, previous, &client, &out)
                .await;
            return Ok(send(s, x, 200, json_bytes(&out)).await);
        };
        if let Some(out) = answered {
            self.keep_response(generation, &request, previous, &client, &out)
                .await;
        }
        Ok(outcome)
    }

    /// Keeps a response when its request asked for it (`store`).
    async fn keep_response(
        &self,
        generation: &Generation,
        request: &responses::ResponsesCall,
        previous: Option<String>,
        client: &str,
        out: &ResponseObject,
    ) {
        if !request.store {
            return;
        }
        let days = u64::from(generation.config.file.responses.retention_days.max(1));
        let mut items = request.input_items.clone();
        items.extend(out.output.iter().cloned());
        let kept = StoredResponse {
            client: client.to_owned(),
            expires_ms: now_ms() + days * 86_400_000,
            previous,
            items,
            response: serde_json::to_value(out).expect("a response serialises"),
        };
        self.state
            .lasting
            .shared
            .save_response(&out.id, Some(kept))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_ids_begin_with_the_time_and_end_unguessable() {
        let (a, b, later) = (response_id(1), response_id(1), response_id(2));
        assert_eq!(a.len(), 44);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert!(a.starts_with("000000000001"), "{a}");
        assert_ne!(a, b);
        assert!(a < later && b < later);
        // 32 random hex digits: not a repeat of one 64-bit draw.
        assert_ne!(a[12..28], a[28..]);
    }
}

//! Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`), translated to
//! Gemini's native calls by [`crate::translate::anthropic`]: Claude Code and other Anthropic
//! clients pointed at gemgate run over the same key pool, plugins and attempt loop as every
//! call. The client's token may come as `x-api-key`, as Anthropic's clients send it; errors
//! answer in Anthropic's shape (see `http::reply`).

use bytes::Bytes;
use pingora::protocols::http::ServerSession;

use super::calls::AnthropicCall;
use super::exchange::{Exchange, Meta};
use super::openai::{bad, json_answer, json_body};
use super::relay::{Piece, Reframe, SseEvents};
use super::{Gateway, Generation, Outcome, Refusal, read_body, send};
use crate::http::reply::{GateError, Protocol};
use crate::translate::anthropic::{self, MessageStream};
use crate::translate::json_bytes;
use crate::translate::usage::Tokens;

/// An Anthropic message stream made from Gemini's server-sent events as they pass.
struct MessageEvents {
    events: SseEvents,
    stream: MessageStream,
    produced: bool,
}

impl Reframe for MessageEvents {
    fn own_content_type(&self) -> Option<&'static str> {
        Some("text/event-stream")
    }

    fn is_stream(&self) -> bool {
        true
    }

    fn push(&mut self, chunk: Bytes, out: &mut Vec<Piece>) {
        let events = self.events.events(chunk);
        let translated = self.stream.push(&events);
        if !translated.is_empty() {
            self.produced = true;
            out.push(Piece::now(Bytes::from(translated)));
        }
    }

    fn finish(&mut self) -> Option<Bytes> {
        let rest = self.events.rest();
        let translated = self.stream.push(&rest);
        if !self.produced && translated.is_empty() {
            return None;
        }
        Some(Bytes::from(translated + &self.stream.finish()))
    }

    fn interrupted(&mut self, error: &GateError) -> Option<Bytes> {
        let kind = anthropic::error_type(error.status);
        Some(Bytes::from(self.stream.error(kind, &error.message)))
    }

    fn tokens(&self) -> Tokens {
        self.events.tokens()
    }
}

impl Gateway {
    /// `POST /v1/messages` (whole or streamed) and `POST /v1/messages/count_tokens`.
    pub(crate) async fn anthropic(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        call: AnthropicCall,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        x.meta.client = Some(self.admit(generation, s, http::Method::POST, &x.meta.peer)?);
        let raw = read_body(s, generation.config.max_body_bytes).await?;
        if generation.config.file.logs.error_log_record_request_body {
            x.body = Some(raw.clone());
        }
        let json = json_body(&raw)?;
        let (model, body, stream) = match call {
            AnthropicCall::CountTokens => {
                let (model, body) = anthropic::count_tokens_request(&json).map_err(bad)?;
                (model, body, false)
            }
            AnthropicCall::Messages => {
                let request = anthropic::request(&json).map_err(bad)?;
                if request.placeholder_signatures > 0 {
                    tracing::info!(
                        id = %x.meta.id,
                        calls = request.placeholder_signatures,
                        "tool calls came back without their thought signature: sent Google's placeholder"
                    );
                }
                (request.model, request.body, request.stream)
            }
        };
        let action = match (call, stream) {
            (AnthropicCall::CountTokens, _) => "countTokens",
            (_, true) => "streamGenerateContent",
            (_, false) => "generateContent",
        };
        let generate = call == AnthropicCall::Messages;
        let mut up = self
            .translated_call(generation, s, x, (&model, action, stream), generate, body)
            .await?;
        let model = x.model.clone();
        if stream {
            let id = x.meta.id.clone();
            up.reframe = Box::new(move |_: &Meta| {
                Box::new(MessageEvents {
                    events: SseEvents::new(Protocol::Anthropic),
                    stream: MessageStream::new(&model, &id),
                    produced: false,
                }) as Box<dyn Reframe>
            });
            return self.relay_or_send(generation, &up, s, x).await;
        }
        let answer = json_answer(&self.collect(generation, &up, x).await?)?;
        let out = match call {
            AnthropicCall::CountTokens => anthropic::count_tokens_response(&answer),
            AnthropicCall::Messages => anthropic::response(&answer, &model, &x.meta.id),
        };
        Ok(send(s, x, 200, json_bytes(&out)).await)
    }
}

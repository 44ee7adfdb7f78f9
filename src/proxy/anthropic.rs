//! Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`), translated to
//! Gemini's native calls by [`crate::translate::anthropic`]: Claude Code and other Anthropic
//! clients pointed at gemgate run over the same key pool, plugins and attempt loop as every
//! call. The client's token may come as `x-api-key`, as Anthropic's clients send it; errors
//! answer in Anthropic's shape (see `http::reply`).

use pingora::protocols::http::ServerSession;

use super::calls::AnthropicCall;
use super::exchange::{Exchange, Meta};
use super::openai::{bad, json_answer, json_body};
use super::relay::{Reframe, StreamTranslator, Translated};
use super::{Gateway, Generation, Outcome, Refusal, read_body, send};
use crate::http::reply::{GateError, Protocol};
use crate::translate::anthropic::{self, MessageStream};
use crate::translate::json_bytes;

impl StreamTranslator for MessageStream {
    fn push(&mut self, events: &[u8]) -> String {
        MessageStream::push(self, events)
    }

    fn finish(&mut self) -> String {
        MessageStream::finish(self)
    }

    fn interrupted(&mut self, error: &GateError) -> String {
        self.error(anthropic::error_type(error.status), &error.message)
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
        self.admit(generation, s, http::Method::POST, &mut x.meta)?;
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
                Box::new(Translated::new(
                    Protocol::Anthropic,
                    MessageStream::new(&model, &id),
                )) as Box<dyn Reframe>
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

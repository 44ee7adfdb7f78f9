//! The OpenAI-compatible routes: `/v1` and `/hf/v1` (translated to Gemini's native calls by
//! [`crate::translate::openai`]) and `/openai/v1` (Google's own OpenAI-compatible API, passed through).
//! Both run over the same key pool, plugins and attempt loop as native calls.

use std::time::Duration;

use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use serde_json::Value;

use super::calls::OpenAiCall;
use super::exchange::{Exchange, Meta};
use super::relay::{Piece, Reframe, SseEvents};
use super::{
    Gateway, Generation, Outcome, Refusal, UpstreamRequest, client_query, framing, read_body,
    response_header, rewrite_value, send, upstream_header, write_full,
};
use crate::clock::now_ms;
use crate::http::reply::{GateError, Protocol};
use crate::translate::json_bytes;
use crate::translate::openai::{self, chat, embeddings, images, speech};
use crate::translate::usage::Tokens;

/// What a translated stream needs to know before it starts.
struct ChatStreamSpec {
    model: String,
    created: u64,
    include_usage: bool,
    options: chat::Options,
    pacing: Option<chat::Pacing>,
}

impl ChatStreamSpec {
    fn start(&self, id: &str) -> chat::ChatStream {
        chat::ChatStream::new(
            &self.model,
            id,
            self.created,
            self.include_usage,
            self.options,
        )
        .paced(self.pacing)
    }
}

/// An OpenAI chat stream made from Gemini's server-sent events as they pass.
struct ChatChunks {
    events: SseEvents,
    chat: chat::ChatStream,
    produced: bool,
}

impl ChatChunks {
    fn new(spec: &ChatStreamSpec, meta: &Meta) -> ChatChunks {
        ChatChunks {
            events: SseEvents::new(Protocol::OpenAi),
            chat: spec.start(&meta.id),
            produced: false,
        }
    }
}

impl Reframe for ChatChunks {
    fn own_content_type(&self) -> Option<&'static str> {
        Some("text/event-stream")
    }

    fn is_stream(&self) -> bool {
        true
    }

    fn push(&mut self, chunk: Bytes, out: &mut Vec<Piece>) {
        let events = self.events.events(chunk);
        for piece in self.chat.push_paced(&events) {
            if !piece.event.is_empty() {
                self.produced = true;
                out.push(Piece {
                    bytes: Bytes::from(piece.event),
                    pause: piece.pause,
                });
            }
        }
    }

    fn finish(&mut self) -> Option<Bytes> {
        let rest = self.events.rest();
        let translated = self.chat.push(&rest);
        if !self.produced && translated.is_empty() {
            return None;
        }
        Some(Bytes::from(translated + &self.chat.finish()))
    }

    fn interrupted(&mut self, error: &GateError) -> Option<Bytes> {
        let mut data = self.events.error_event(error);
        data.extend_from_slice(b"data: [DONE]\n\n");
        Some(data.freeze())
    }

    fn tokens(&self) -> Tokens {
        self.events.tokens()
    }
}

/// Refuses (413) a translated body that its fetched files made larger than what a client may
/// send.
pub(super) fn within_body_limit(generation: &Generation, body: &[u8]) -> Result<(), Refusal> {
    let limit = generation.config.max_body_bytes;
    if body.len() as u64 > limit {
        return Err(Refusal::Gate(GateError::new(
            413,
            format!("the request with its fetched files is larger than the limit of {limit} bytes"),
        )));
    }
    Ok(())
}

/// Fetches the files a chat request names by URL (within the body limit) and inlines them.
pub(super) async fn inline_remote_files(
    generation: &Generation,
    body: &mut Value,
) -> Result<(), Refusal> {
    let urls = chat::remote_files(body);
    if urls.is_empty() {
        return Ok(());
    }
    let files = generation
        .fetcher
        .fetch_all(urls, generation.config.max_body_bytes)
        .await
        .map_err(|e| {
            let status = match e {
                crate::upstream::fetch::FetchError::TooLarge(..) => 413,
                _ => 400,
            };
            Refusal::Gate(GateError::new(status, e.to_string()))
        })?;
    chat::inline_files(body, files);
    Ok(())
}

/// `STREAM_OPTIMIZER_*` as pacing, when it is on.
fn pacing(generation: &Generation) -> Option<chat::Pacing> {
    let st = &generation.config.file.stream;
    let secs = |s: f64| Duration::from_secs_f64(s.clamp(0.0, 10.0));
    st.optimizer_enabled.then(|| chat::Pacing {
        min_delay: secs(st.min_delay),
        max_delay: secs(st.max_delay),
        short_text: st.short_text_threshold as usize,
        long_text: st.long_text_threshold as usize,
        chunk_size: st.chunk_size as usize,
    })
}

/// A translated call to be answered whole.
struct Whole<'a> {
    model: &'a str,
    action: &'a str,
    body: &'a Value,
    /// With `PAID_KEY`, when it is set.
    paid: bool,
}

/// Parses a JSON request body, or says what is wrong with it.
pub(super) fn json_body(raw: &[u8]) -> Result<Value, Refusal> {
    serde_json::from_slice(raw).map_err(|e| {
        Refusal::Gate(GateError::new(
            400,
            format!("the request body is not valid JSON: {e}"),
        ))
    })
}

pub(super) fn bad(e: openai::BadRequest) -> Refusal {
    Refusal::Gate(GateError::bad_request(e))
}

impl Gateway {
    /// `/v1/...` and `/hf/v1/...`.
    pub(crate) async fn openai(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        call: OpenAiCall,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        self.admit(generation, s, call.method(), &mut x.meta)?;
        match call {
            OpenAiCall::Models => {
                let rewrite = self
                    .on_request(generation, s, "", "models.list", false, &x.meta)
                    .await?;
                let path = format!("{}/models", generation.target.base.path);
                let mut up = self.gemini_call(generation, s, &path, "", Bytes::new(), &rewrite)?;
                let models = self.all_models(generation, &mut up, &path, x).await?;
                let body = openai::models_list(&models).to_string();
                Ok(send(s, x, 200, Bytes::from(body)).await)
            }
            OpenAiCall::Chat => self.chat(generation, s, x).await,
            OpenAiCall::Embeddings => self.embeddings(generation, s, x).await,
            OpenAiCall::Images => self.images(generation, s, x).await,
            OpenAiCall::Speech => self.speech(generation, s, x).await,
        }
    }

    /// `/v1/chat/completions`: translated, through the plugins, then answered whole, as a
    /// translated stream, or as a fake stream.
    async fn chat(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let raw = read_body(s, generation.config.max_body_bytes).await?;
        let mut request = chat::request(&json_body(&raw)?).map_err(bad)?;
        if request.placeholder_signatures > 0 {
            tracing::info!(
                id = %x.meta.id,
                calls = request.placeholder_signatures,
                "tool calls came back without their thought signature: sent Google's placeholder"
            );
        }
        inline_remote_files(generation, &mut request.body).await?;
        let action = if request.stream {
            "streamGenerateContent"
        } else {
            "generateContent"
        };
        x.model.clone_from(&request.model);
        let rewrite = self
            .on_request(
                generation,
                s,
                &request.model,
                action,
                request.stream,
                &x.meta,
            )
            .await?;
        let model = rewrite.model.clone().unwrap_or(request.model);
        x.model.clone_from(&model);
        let mut body = request.body;
        operator_settings(&mut body, &model, generation);
        rewrite_value(&mut body, &rewrite)?;
        let path = format!("{}/models/{model}:{action}", generation.target.base.path);
        let query = if request.stream { "alt=sse" } else { "" };
        let body = Bytes::from(serde_json::to_vec(&body).expect("JSON serialises"));
        within_body_limit(generation, &body)?;
        let pinned = self.file_pin(generation, &body, x.meta.client.as_deref())?;
        let mut up = self.gemini_call(generation, s, &path, query, body, &rewrite)?;
        up.pinned = pinned;
        self.chat_answer(generation, s, x, up, request.stream, request.include_usage)
            .await
    }

    /// Answers a translated chat call: whole, as a translated stream, or as a fake stream.
    async fn chat_answer(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        x: &mut Exchange,
        mut up: UpstreamRequest,
        stream: bool,
        include_usage: bool,
    ) -> Result<Outcome, Refusal> {
        let model = up.model.clone();
        let models = &generation.config.file.models;
        let options = chat::Options {
            show_thinking: models.show_thinking_process,
            show_search_link: models.show_search_link,
        };
        let created = now_ms() / 1000;
        let spec = ChatStreamSpec {
            model: model.clone(),
            created,
            include_usage,
            options,
            pacing: pacing(generation),
        };
        if stream && generation.config.file.stream.fake_stream_enabled {
            // The streaming request went upstream as a whole one (see below): rewrite its path.
            let path = format!(
                "{}/models/{model}:generateContent",
                generation.target.base.path
            );
            up.header
                .set_raw_path(path.as_bytes())
                .map_err(|_| Refusal::Gate(GateError::new(500, "bad upstream path")))?;
            return self.fake_stream(generation, s, &up, spec, x).await;
        }
        if stream {
            up.reframe = Box::new(move |meta: &Meta| {
                Box::new(ChatChunks::new(&spec, meta)) as Box<dyn Reframe>
            });
            return self.relay_or_send(generation, &up, s, x).await;
        }
        let answer = json_answer(&self.collect(generation, &up, x).await?)?;
        let out = chat::response(&answer, &model, &x.meta.id, created, options);
        Ok(send(s, x, 200, json_bytes(&out)).await)
    }

    /// `FAKE_STREAM_ENABLED`: a streaming request answered from a whole `generateContent`
    /// call, with an empty delta every `FAKE_STREAM_EMPTY_DATA_INTERVAL_SECONDS` while it runs.
    async fn fake_stream(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        up: &UpstreamRequest,
        spec: ChatStreamSpec,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let interval = Duration::from_secs_f64(
            generation
                .config
                .file
                .stream
                .fake_stream_empty_data_interval_s
                .clamp(0.1, 600.0),
        );
        let mut stream = spec.start(&x.meta.id);
        let mut head = Some(response_header(200, x));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let answer = {
            let collect = self.collect(generation, up, x);
            tokio::pin!(collect);
            loop {
                tokio::select! {
                    answer = &mut collect => break answer,
                    _ = ticks.tick() => {
                        if let Some(h) = head.take()
                            && write_head(s, h).await.is_err() {
                                return Ok(Outcome::Close);
                            }
                        let event = Bytes::from(stream.keepalive());
                        if s.write_response_body(event, false).await.is_err() {
                            return Ok(Outcome::Close);
                        }
                    }
                }
            }
        };
        self.fake_stream_end(s, x, head, stream, answer).await
    }

    /// The end of a fake stream: the answer as chunks, or an error event when keep-alives
    /// already went out.
    async fn fake_stream_end(
        &self,
        s: &mut ServerSession,
        x: &mut Exchange,
        mut head: Option<ResponseHeader>,
        mut stream: chat::ChatStream,
        answer: Result<Bytes, Refusal>,
    ) -> Result<Outcome, Refusal> {
        let answer = match (answer, &head) {
            // Nothing sent yet: a failure is answered as any other.
            (Err(r), Some(_)) => return Err(r),
            (Err(_), None) => {
                tracing::warn!(id = %x.meta.id, "fake stream: the upstream call failed after keep-alives went out");
                let e = GateError::new(502, "the Gemini API call failed");
                let event = format!(
                    "data: {}\n\ndata: [DONE]\n\n",
                    String::from_utf8_lossy(&e.body(x.meta.protocol))
                );
                let done = s.write_response_body(Bytes::from(event), true).await;
                return Ok(if done.is_ok() {
                    Outcome::Reuse
                } else {
                    Outcome::Close
                });
            }
            (Ok(body), _) => json_answer(&body)?,
        };
        if let Some(h) = head.take() {
            x.ttfb = Some(x.meta.started.elapsed());
            if write_head(s, h).await.is_err() {
                return Ok(Outcome::Close);
            }
        }
        for piece in stream.push_answer(&answer) {
            if s.write_response_body(Bytes::from(piece.event), false)
                .await
                .is_err()
            {
                return Ok(Outcome::Close);
            }
            if !piece.pause.is_zero() {
                tokio::time::sleep(piece.pause).await;
            }
        }
        let done = s
            .write_response_body(Bytes::from(stream.finish()), true)
            .await;
        Ok(if done.is_ok() {
            Outcome::Reuse
        } else {
            Outcome::Close
        })
    }

    async fn embeddings(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let raw = read_body(s, generation.config.max_body_bytes).await?;
        let mut call = embeddings::request(&json_body(&raw)?).map_err(bad)?;
        let whole = Whole {
            model: &call.model,
            action: call.action,
            body: &call.body,
            paid: false,
        };
        let (answer, model) = self.whole(generation, s, whole, x).await?;
        call.model = model;
        let out = embeddings::response(&call, &answer);
        Ok(send(s, x, 200, json_bytes(&out)).await)
    }

    /// Imagen through `:predict`, with `PAID_KEY` when it is set; `url` answers are uploaded to
    /// `UPLOAD_PROVIDER`.
    async fn images(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let raw = read_body(s, generation.config.max_body_bytes).await?;
        let settings = &generation.config.file.images;
        let call = images::request(&json_body(&raw)?, &settings.create_image_model).map_err(bad)?;
        let host = images::Host::parse(&settings.upload_provider);
        if call.want_url && host.is_none() {
            return Err(Refusal::Gate(GateError::new(
                400,
                format!(
                    "response_format url needs an image host: UPLOAD_PROVIDER is {:?}; use smms, picgo or cloudflare_imgbed, or ask for b64_json",
                    settings.upload_provider
                ),
            )));
        }
        let whole = Whole {
            model: &call.model,
            action: "predict",
            body: &call.body,
            paid: true,
        };
        let (answer, _) = self.whole(generation, s, whole, x).await?;
        let mut data = Vec::new();
        for b64 in images::images(&answer) {
            let entry = match host.filter(|_| call.want_url) {
                Some(host) => {
                    serde_json::json!({ "url": self.upload(generation, host, &b64).await? })
                }
                None => serde_json::json!({ "b64_json": b64 }),
            };
            data.push(entry);
        }
        if data.is_empty() {
            return Err(Refusal::Gate(GateError::new(
                502,
                "Imagen returned no image (the prompt may have been filtered)",
            )));
        }
        let out = images::response(now_ms() / 1000, data);
        Ok(send(s, x, 200, json_bytes(&out)).await)
    }

    /// Text to speech with `TTS_MODEL` and `TTS_VOICE_NAME`, answered as WAV (or raw PCM).
    async fn speech(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        use base64::Engine as _;
        let raw = read_body(s, generation.config.max_body_bytes).await?;
        let request = json_body(&raw)?;
        let tts = &generation.config.file.tts;
        let call = speech::request(&request, &tts.model, &tts.voice_name).map_err(bad)?;
        let whole = Whole {
            model: &call.model,
            action: "generateContent",
            body: &call.body,
            paid: false,
        };
        let (answer, _) = self.whole(generation, s, whole, x).await?;
        let (b64, rate) = speech::audio(&answer).ok_or_else(|| {
            Refusal::Gate(GateError::new(502, "the TTS model answered without audio"))
        })?;
        let pcm = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| Refusal::Gate(GateError::new(502, format!("bad audio: {e}"))))?;
        let (audio, mime) = match request.get("response_format").and_then(Value::as_str) {
            Some("pcm") => (pcm, "audio/pcm"),
            _ => (speech::wav(&pcm, rate), "audio/wav"),
        };
        let mut h = response_header(200, x);
        let _ = h.insert_header(header::CONTENT_TYPE, mime);
        Ok(write_full(s, h, Bytes::from(audio)).await)
    }

    /// Uploads one generated image to `host`; returns its URL.
    async fn upload(
        &self,
        generation: &Generation,
        host: images::Host,
        b64: &str,
    ) -> Result<String, Refusal> {
        use base64::Engine as _;
        let fail = |m: String| Refusal::Gate(GateError::new(502, m));
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| fail(format!("Imagen sent an image that is not base64: {e}")))?;
        let settings = &generation.config.file.images;
        let part = reqwest::multipart::Part::bytes(png)
            .file_name(format!("gemgate-{:016x}.png", fastrand::u64(..)))
            .mime_str("image/png")
            .expect("a valid mime type");
        let form = reqwest::multipart::Form::new().part(host.field(), part);
        let (url, request) = match host {
            images::Host::Smms => (
                settings.smms_url.clone(),
                self.side_client()
                    .post(&settings.smms_url)
                    .header(header::AUTHORIZATION, &settings.smms_secret_token),
            ),
            images::Host::Picgo => (
                settings.picgo_url.clone(),
                self.side_client()
                    .post(&settings.picgo_url)
                    .header("x-api-key", &settings.picgo_api_key),
            ),
            images::Host::CloudflareImgbed => {
                let base = &settings.cloudflare_imgbed_url;
                let sep = if base.contains('?') { '&' } else { '?' };
                let url = format!(
                    "{base}{sep}authCode={}",
                    settings.cloudflare_imgbed_auth_code
                );
                (base.clone(), self.side_client().post(url))
            }
        };
        let answer = request
            .multipart(form)
            .send()
            .await
            // Without its URL: a Cloudflare ImgBed URL carries its auth code.
            .map_err(|e| {
                fail(format!(
                    "cannot upload the image to {host:?}: {}",
                    e.without_url()
                ))
            })?;
        let status = answer.status();
        let body: Value = answer.json().await.unwrap_or(Value::Null);
        host.url(&body, &url).ok_or_else(|| {
            // What the host said stays in the log: it is a third party's answer, and may
            // repeat what the upload carried.
            tracing::warn!(?host, %status, "the image host refused the upload: {body}");
            fail(format!(
                "the image host {host:?} refused the upload (HTTP {status})"
            ))
        })
    }

    /// A translated call answered whole: `on_request` plugins for its model, then the attempt
    /// loop; returns Google's JSON answer and the model that served it.
    async fn whole(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        call: Whole<'_>,
        x: &mut Exchange,
    ) -> Result<(Value, String), Refusal> {
        x.model = call.model.to_owned();
        let rewrite = self
            .on_request(generation, s, call.model, call.action, false, &x.meta)
            .await?;
        if let Some(m) = &rewrite.model {
            x.model.clone_from(m);
        }
        let model = x.model.clone();
        let path = format!(
            "{}/models/{model}:{}",
            generation.target.base.path, call.action
        );
        let mut body = call.body.clone();
        rewrite_value(&mut body, &rewrite)?;
        let body = Bytes::from(serde_json::to_vec(&body).expect("JSON serialises"));
        let mut up = self.gemini_call(generation, s, &path, "", body, &rewrite)?;
        up.paid = call.paid;
        let answer = json_answer(&self.collect(generation, &up, x).await?)?;
        Ok((answer, model))
    }

    /// The upstream call of a request translated into Gemini's `body`: the plugins asked
    /// (their model and headers applied), files named by URL fetched, and for a generation
    /// (`generate`) the operator's settings and the plugins' body rewrites added; `x.model` is
    /// the model it goes to.
    pub(super) async fn translated_call(
        &self,
        generation: &Generation,
        s: &ServerSession,
        x: &mut Exchange,
        (model, action, stream): (&str, &str, bool),
        generate: bool,
        mut body: Value,
    ) -> Result<UpstreamRequest, Refusal> {
        x.model = model.to_owned();
        let rewrite = self
            .on_request(generation, s, model, action, stream, &x.meta)
            .await?;
        let model = rewrite.model.clone().unwrap_or_else(|| model.to_owned());
        x.model.clone_from(&model);
        inline_remote_files(generation, &mut body).await?;
        if generate {
            operator_settings(&mut body, &model, generation);
            rewrite_value(&mut body, &rewrite)?;
        }
        let path = format!("{}/models/{model}:{action}", generation.target.base.path);
        let query = if stream { "alt=sse" } else { "" };
        let body = Bytes::from(serde_json::to_vec(&body).expect("JSON serialises"));
        within_body_limit(generation, &body)?;
        let mut up = self.gemini_call(generation, s, &path, query, body, &rewrite)?;
        up.pinned = self.file_pin(generation, &up.body, x.meta.client.as_deref())?;
        Ok(up)
    }

    /// An upstream request for a translated call: `path` and `query` on the Gemini API, `body`
    /// as gemgate made it, with the plugins' headers.
    pub(super) fn gemini_call(
        &self,
        generation: &Generation,
        s: &ServerSession,
        path: &str,
        query: &str,
        body: Bytes,
        rewrite: &crate::policy::engine::Rewrite,
    ) -> Result<UpstreamRequest, Refusal> {
        let mut header = upstream_header(generation, s.req_header(), path, query)?;
        if !body.is_empty() {
            let _ = header.insert_header(header::CONTENT_TYPE, "application/json");
        }
        for (name, value) in &rewrite.headers {
            let _ = header.insert_header(name.clone(), value.clone());
        }
        let action = path.rsplit_once(':').map_or("", |(_, action)| action);
        Ok(UpstreamRequest {
            model: model_in_path(path),
            vertex_ok: super::vertex_serves(action),
            ..UpstreamRequest::new(header, body)
        })
    }

    /// `/openai/v1/{rest}`: passed to `{BASE_URL}/openai/{rest}` with a pool key as
    /// `Authorization: Bearer`; answers and streams come back as Google sends them.
    pub(crate) async fn google_openai(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        rest: &str,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let method = s.req_header().method.clone();
        if method != http::Method::GET && method != http::Method::POST {
            return Err(Refusal::Gate(GateError::new(
                405,
                format!("{method} is not allowed here; use GET or POST"),
            )));
        }
        self.admit(generation, s, method.clone(), &mut x.meta)?;
        let body = if method == http::Method::POST {
            read_body(s, generation.config.max_body_bytes).await?
        } else {
            Bytes::new()
        };
        let parsed: Option<Value> = serde_json::from_slice(&body).ok();
        let model = parsed
            .as_ref()
            .and_then(|v| openai::model_of(v).ok())
            .unwrap_or_default();
        let stream = parsed
            .as_ref()
            .and_then(|v| v.get("stream"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        // Policy is per model: a call whose model gemgate cannot tell would pass unchecked.
        if method == http::Method::POST && model.is_empty() {
            return Err(Refusal::Gate(GateError::bad_request(
                openai::BadRequest::new("model", "the body must be JSON naming a valid `model`"),
            )));
        }
        x.model.clone_from(&model);
        let rewrite = self
            .on_request(generation, s, &model, rest, stream, &x.meta)
            .await?;
        if rewrite.model.is_some() || rewrite.touches_body() {
            return Err(Refusal::Gate(GateError::new(
                500,
                "a plugin rewrote a request to Google's OpenAI-compatible API, which gemgate passes through unchanged",
            )));
        }
        let query = client_query(s);
        let path = format!("{}/openai/{rest}", generation.target.base.path);
        let mut header = upstream_header(generation, s.req_header(), &path, &query)?;
        for (name, value) in rewrite.headers {
            let _ = header.insert_header(name, value);
        }
        let up = UpstreamRequest {
            model,
            reframe: framing(stream, stream),
            bearer: true,
            ..UpstreamRequest::new(header, body)
        };
        self.relay_or_send(generation, &up, s, x).await
    }
}

/// What the operator's settings add to a translated chat request: `SAFETY_SETTINGS`, the code
/// execution tool (`TOOLS_CODE_EXECUTION_ENABLED`, when the client declared no functions, which
/// Gemini does not mix with it) and the URL context tool (`URL_CONTEXT_ENABLED` for
/// `URL_CONTEXT_MODELS`). The client's own values win.
pub(super) fn operator_settings(body: &mut Value, model: &str, generation: &Generation) {
    let m = &generation.config.file.models;
    let Some(obj) = body.as_object_mut() else {
        return;
    };
    if let Some(safety) = &m.safety_settings
        && !obj.contains_key("safetySettings")
        && let Ok(v) = serde_json::to_value(safety)
    {
        obj.insert("safetySettings".into(), v);
    }
    let has_functions = obj.get("tools").is_some_and(|t| {
        t.as_array()
            .is_some_and(|l| l.iter().any(|t| t.get("functionDeclarations").is_some()))
    });
    let mut extra = Vec::new();
    if m.code_execution && !has_functions {
        extra.push(serde_json::json!({ "codeExecution": {} }));
    }
    let url_model = m
        .url_context_models
        .iter()
        .any(|u| crate::config::model_name(u) == model);
    if m.url_context && url_model {
        extra.push(serde_json::json!({ "urlContext": {} }));
    }
    if !extra.is_empty() {
        let tools = obj
            .entry("tools")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Some(list) = tools.as_array_mut() {
            list.extend(extra);
        }
    }
}

/// Sends the head of a translated event stream.
async fn write_head(s: &mut ServerSession, mut h: ResponseHeader) -> pingora::Result<()> {
    let _ = h.insert_header(header::CONTENT_TYPE, "text/event-stream");
    let _ = h.insert_header(header::CACHE_CONTROL, "no-cache");
    if s.req_header().version == http::Version::HTTP_11 {
        let _ = h.insert_header(header::TRANSFER_ENCODING, "chunked");
    }
    s.write_response_header(Box::new(h)).await
}

/// The model a Gemini path names (`…/models/{model}:action`), for per-model cooldowns.
fn model_in_path(path: &str) -> String {
    path.rsplit_once("/models/")
        .map(|(_, rest)| rest.split(':').next().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

/// Google's answer as JSON, or a 502 saying it was not.
pub(super) fn json_answer(body: &[u8]) -> Result<Value, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        Refusal::Gate(GateError::new(
            502,
            format!("the Gemini API answered with something that is not JSON: {e}"),
        ))
    })
}

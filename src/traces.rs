//! Traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, each client request is a span, with one
//! child span per upstream attempt, exported over OTLP/HTTP in protobuf
//! (`{endpoint}/v1/traces`, or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as it is). A client's
//! `traceparent` continues its trace. Attributes follow OpenTelemetry's GenAI conventions where
//! they fit (`gen_ai.request.model`, `gen_ai.usage.input_tokens`, …).
//!
//! Export never blocks a request: finished spans go to a bounded queue (past it they are
//! dropped and counted), and a thread of its own sends them in batches.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Spans waiting for export at most.
const QUEUE: usize = 8192;
/// Spans per export request at most.
const BATCH: usize = 512;
/// How often the queue is sent.
const EVERY: Duration = Duration::from_millis(500);

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// One finished span.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: String,
    /// `true`: a server span (the client's request); `false`: a client span (an attempt).
    pub server: bool,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<(&'static str, Value)>,
    pub error: bool,
}

/// A request's place in a trace: its trace and, when the client sent a `traceparent`, the
/// client's span.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub trace_id: [u8; 16],
    pub parent: Option<[u8; 8]>,
    pub span_id: [u8; 8],
}

impl Context {
    /// The context of a request that sent `traceparent` (W3C: `00-<trace>-<span>-<flags>`),
    /// or a new trace.
    pub fn of(traceparent: Option<&str>) -> Context {
        let parsed = traceparent.and_then(|h| {
            let mut parts = h.trim().split('-');
            let (version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
            if version.len() != 2 || version == "ff" {
                return None;
            }
            let trace: [u8; 16] = unhex(trace)?;
            let span: [u8; 8] = unhex(span)?;
            (trace != [0; 16] && span != [0; 8]).then_some((trace, span))
        });
        match parsed {
            Some((trace_id, parent)) => Context {
                trace_id,
                parent: Some(parent),
                span_id: random(),
            },
            None => Context {
                trace_id: random(),
                parent: None,
                span_id: random(),
            },
        }
    }
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A random id.
pub fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for b in out.iter_mut() {
        *b = fastrand::u8(..);
    }
    if out == [0; N] {
        out[N - 1] = 1;
    }
    out
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

/// The exporter.
pub struct Tracer {
    url: String,
    service: String,
    queue: Mutex<Vec<Span>>,
    dropped: AtomicU64,
}

impl Tracer {
    /// The exporter the environment asks for (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`), started; `None` when neither is set.
    pub fn from_env(vars: &std::collections::BTreeMap<String, String>) -> Option<Arc<Tracer>> {
        let url = match vars.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            Some(u) if !u.trim().is_empty() => u.trim().to_owned(),
            _ => {
                let base = vars.get("OTEL_EXPORTER_OTLP_ENDPOINT")?.trim();
                if base.is_empty() {
                    return None;
                }
                format!("{}/v1/traces", base.trim_end_matches('/'))
            }
        };
        let service = vars
            .get("OTEL_SERVICE_NAME")
            .filter(|s| !s.trim().is_empty())
            .map_or("gemgate".to_owned(), |s| s.trim().to_owned());
        let tracer = Arc::new(Tracer {
            url,
            service,
            queue: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
        });
        tracer.clone().start();
        tracing::info!(url = %tracer.url, "exporting traces over OTLP");
        Some(tracer)
    }

    /// Queues finished spans; never waits.
    pub fn record(&self, spans: impl IntoIterator<Item = Span>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        for span in spans {
            if queue.len() >= QUEUE {
                self.dropped.fetch_add(1, Relaxed);
            } else {
                queue.push(span);
            }
        }
    }

    fn start(self: Arc<Self>) {
        let spawned = std::thread::Builder::new()
            .name("gemgate-traces".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                let client = crate::upstream::side_client();
                runtime.block_on(async move {
                    loop {
                        tokio::time::sleep(EVERY).await;
                        self.send(&client).await;
                    }
                });
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the trace exporter: {e}");
        }
    }

    async fn send(&self, client: &reqwest::Client) {
        loop {
            let batch: Vec<Span> = {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                let n = queue.len().min(BATCH);
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                break;
            }
            let body = encode(&self.service, &batch);
            let sent = client
                .post(&self.url)
                .header("content-type", "application/x-protobuf")
                .timeout(Duration::from_secs(10))
                .body(body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => tracing::warn!(
                    status = r.status().as_u16(),
                    "the trace collector refused spans"
                ),
                Err(e) => {
                    tracing::warn!("cannot send spans: {e}");
                    break;
                }
            }
        }
        let dropped = self.dropped.swap(0, Relaxed);
        if dropped > 0 {
            tracing::warn!(
                spans = dropped,
                "spans dropped: the trace exporter fell behind"
            );
        }
    }
}

/// `ExportTraceServiceRequest` (opentelemetry/proto/collector/trace/v1) holding `spans`.
pub fn encode(service: &str, spans: &[Span]) -> Vec<u8> {
    let mut resource = Vec::new();
    key_value(
        &mut resource,
        1,
        "service.name",
        &Value::Str(service.to_owned()),
    );
    let mut scope = Vec::new();
    bytes_field(&mut scope, 1, b"gemgate");
    bytes_field(&mut scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
    let mut scope_spans = Vec::new();
    bytes_field(&mut scope_spans, 1, &scope);
    for span in spans {
        bytes_field(&mut scope_spans, 2, &encode_span(span));
    }
    let mut resource_spans = Vec::new();
    bytes_field(&mut resource_spans, 1, &resource);
    bytes_field(&mut resource_spans, 2, &scope_spans);
    let mut out = Vec::new();
    bytes_field(&mut out, 1, &resource_spans);
    out
}

fn encode_span(s: &Span) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    bytes_field(&mut out, 1, &s.trace_id);
    bytes_field(&mut out, 2, &s.span_id);
    if let Some(parent) = &s.parent {
        bytes_field(&mut out, 4, parent);
    }
    bytes_field(&mut out, 5, s.name.as_bytes());
    // SpanKind: 2 server, 3 client.
    varint_field(&mut out, 6, if s.server { 2 } else { 3 });
    fixed64_field(&mut out, 7, s.start_ns);
    fixed64_field(&mut out, 8, s.end_ns);
    for (k, v) in &s.attributes {
        key_value(&mut out, 9, k, v);
    }
    // Status: code 2 (error) or 1 (ok).
    let mut status = Vec::new();
    varint_field(&mut status, 3, if s.error { 2 } else { 1 });
    bytes_field(&mut out, 15, &status);
    out
}

fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    let mut any = Vec::new();
    match value {
        Value::Str(s) => bytes_field(&mut any, 1, s.as_bytes()),
        Value::Int(n) => varint_field(&mut any, 3, *n as u64),
    }
    let mut kv = Vec::new();
    bytes_field(&mut kv, 1, key.as_bytes());
    bytes_field(&mut kv, 2, &any);
    bytes_field(out, field, &kv);
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, u64::from(field) << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint_field(out: &mut Vec<u8>, field: u32, n: u64) {
    varint(out, u64::from(field) << 3);
    varint(out, n);
}

fn fixed64_field(out: &mut Vec<u8>, field: u32, n: u64) {
    varint(out, u64::from(field) << 3 | 1);
    out.extend_from_slice(&n.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_continues_a_trace_and_junk_starts_one() {
        let c = Context::of(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        assert_eq!(c.trace_id[..2], [0x4b, 0xf9]);
        assert_eq!(
            c.parent,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        for junk in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f35-00f067aa0ba902b7-01",
            "not a header",
        ] {
            assert_eq!(Context::of(Some(junk)).parent, None, "{junk}");
        }
    }

    #[test]
    fn spans_encode_as_otlp_protobuf() {
        let span = Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: Some([3; 8]),
            name: "generate_content gemini-2.5-flash".into(),
            server: true,
            start_ns: 1,
            end_ns: 2,
            attributes: vec![("gen_ai.usage.input_tokens", Value::Int(300))],
            error: false,
        };
        let body = encode("gemgate", &[span]);
        // resource_spans (1, len) … service.name, the span's ids and names in place.
        assert_eq!(body[0], 0x0a);
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"service.name"));
        assert!(has(&[0x0a, 16, 1, 1, 1]), "trace_id as field 1");
        assert!(has(&[0x22, 8, 3, 3, 3]), "parent_span_id as field 4");
        assert!(has(b"gen_ai.usage.input_tokens"));
        assert!(has(&[0x18, 0xac, 0x02]), "300 as an int_value varint");
        assert!(
            has(&[0x39, 1, 0, 0, 0, 0, 0, 0, 0]),
            "start as fixed64 field 7"
        );
    }
}

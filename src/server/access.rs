//! The access line of every request and its row for the request and error logs.

use std::time::Duration;

use crate::clock::now_ms;
use crate::proxy::exchange::{Class, Exchange, Kind};
use crate::store::logs::{BODY_KEPT, Record};

impl Exchange {
    /// The finished request's row for the request and error logs. Its strings move into the
    /// record rather than being copied: this runs for every request.
    pub(crate) fn into_record(self, unsampled: bool, instance: Option<&str>) -> Record {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let failed = self.status >= 400 || self.class.is_some();
        let latency_ms = ms(self.latency());
        let (upstream_status, upstream_message) = self.upstream.unzip();
        let trace = self
            .meta
            .traced
            .then(|| {
                self.meta
                    .with_shared(|s| s.with_trace(|t| serde_json::to_value(t)))
            })
            .flatten()
            .and_then(Result::ok);
        Record {
            ts_ms: now_ms(),
            id: self.meta.id,
            client: self.meta.client,
            model: self.model,
            action: self.action,
            key_id: self.key,
            status: self.status,
            class: self.class.map(|c| c.as_str().to_owned()),
            attempts: self.attempts,
            latency_ms,
            ttfb_ms: self.ttfb.map(ms),
            prompt_tokens: self.tokens.prompt,
            output_tokens: self.tokens.output,
            thought_tokens: self.tokens.thoughts,
            upstream_status,
            upstream_message,
            // Only failed requests go to the error log, the only one that keeps bodies.
            request_body: self.body.filter(|_| failed).map(|b| {
                let kept = &b[..b.len().min(BODY_KEPT)];
                String::from_utf8_lossy(kept).into_owned()
            }),
            unsampled,
            trace,
            asked_model: self.meta.asked_model.into_inner(),
            instance: instance.map(str::to_owned),
        }
    }

    /// Writes the request's access line (`gemgate::access`).
    pub(crate) fn log(&self) {
        if self.kind == Kind::Health {
            tracing::debug!(target: "gemgate::access", id = %self.meta.id, status = self.status, "health");
            return;
        }
        if !tracing::enabled!(target: "gemgate::access", tracing::Level::INFO) {
            return;
        }
        if crate::telemetry::json() {
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            tracing::info!(
                target: "gemgate::access",
                id = %self.meta.id,
                client = self.meta.client.as_deref(),
                model = %self.model,
                asked_model = self.meta.asked_model.get().map(String::as_str),
                action = %self.action,
                key = self.key.as_deref(),
                status = self.status,
                class = self.class.map(Class::as_str),
                attempts = self.attempts,
                latency_ms = ms(self.latency()),
                ttfb_ms = self.ttfb.map(ms),
                "request"
            );
            return;
        }
        // One pre-formatted message rather than eleven tracing fields: field-by-field
        // formatting cost more than all of gemgate's own request handling.
        let mut line = String::with_capacity(224);
        let mut field = |name: &str, value: &str| {
            line.push_str(name);
            line.push('=');
            line.push_str(if value.is_empty() { "-" } else { value });
            line.push(' ');
        };
        field("id", &self.meta.id);
        field("client", self.meta.client.as_deref().unwrap_or("-"));
        field("model", &self.model);
        if let Some(asked) = self.meta.asked_model.get() {
            field("asked_model", asked);
        }
        field("action", &self.action);
        field("key", self.key.as_deref().unwrap_or("-"));
        field("status", itoa::Buffer::new().format(self.status));
        field("class", self.class.map_or("-", Class::as_str));
        field("attempts", itoa::Buffer::new().format(self.attempts));
        line.push_str("latency_ms=");
        push_millis(&mut line, Some(self.latency()));
        line.push_str(" ttfb_ms=");
        push_millis(&mut line, self.ttfb);
        tracing::info!(target: "gemgate::access", "{line}");
    }
}

/// Appends milliseconds with two decimals (`12.34`), or `-`.
fn push_millis(out: &mut String, d: Option<Duration>) {
    let Some(d) = d else {
        out.push('-');
        return;
    };
    let hundredths = d.as_micros() / 10;
    out.push_str(itoa::Buffer::new().format(hundredths / 100));
    out.push('.');
    let frac = (hundredths % 100) as u8;
    out.push((b'0' + frac / 10) as char);
    out.push((b'0' + frac % 10) as char);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_have_two_decimals() {
        let millis = |d| {
            let mut out = String::new();
            push_millis(&mut out, d);
            out
        };
        assert_eq!(millis(Some(Duration::from_micros(1_234_567))), "1234.56");
        assert_eq!(millis(Some(Duration::from_micros(5))), "0.00");
        assert_eq!(millis(None), "-");
    }
}

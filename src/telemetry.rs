//! Logging: `tracing` to stdout through in-memory buffers, one per thread, that a background
//! thread writes out every few milliseconds. A request never waits for a terminal or a pipe,
//! never wakes another thread per line (a per-line hand-off cost more than the rest of the
//! access log), and never writes memory another worker thread writes (one shared buffer moved
//! its lock and its end between the cores on every line). Each thread's lines come out in
//! their order; lines of different threads within one write-out come thread after thread.
//! Pingora's own `log` lines are picked up too. Lines are text, or with `LOG_FORMAT=json` one
//! JSON object each (time, level, target, message, and every field as a field).

use std::cell::Cell;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// How often buffered lines are written out.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Past this many bytes buffered by one thread (stdout is stuck), its new lines are dropped
/// and counted.
const MAX_BUFFERED_PER_THREAD: usize = 2 * 1024 * 1024;

/// The lines waiting to be written out: each thread appends to a buffer of its own (the
/// request path's threads never touch one another's memory for a line), and the writing thread
/// takes them all.
#[derive(Default)]
struct Shared {
    threads: Mutex<Vec<Arc<Mutex<Vec<u8>>>>>,
    dropped: AtomicU64,
}

static SHARED: std::sync::LazyLock<Shared> = std::sync::LazyLock::new(Shared::default);

thread_local! {
    /// This thread's buffer of lines, registered with [`SHARED`] on the thread's first line.
    static BUFFER: Arc<Mutex<Vec<u8>>> = {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        SHARED.threads.lock().unwrap_or_else(|e| e.into_inner()).push(buffer.clone());
        buffer
    };
}

/// Lines are JSON objects (`LOG_FORMAT=json`).
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether lines are JSON objects: the access line then writes its parts as fields.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

struct BufferedStdout;

/// One event's bytes, appended to its thread's buffer in one piece when dropped.
struct Line {
    bytes: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.bytes.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let kept = BUFFER.try_with(|buffer| {
            let mut buf = buffer.lock().unwrap_or_else(|e| e.into_inner());
            if buf.len() + self.bytes.len() > MAX_BUFFERED_PER_THREAD {
                return false;
            }
            buf.extend_from_slice(&self.bytes);
            true
        });
        // (A line logged as the thread exits finds its buffer gone: it is dropped, counted.)
        if kept != Ok(true) {
            SHARED.dropped.fetch_add(1, Ordering::Relaxed);
        }
        // The thread's next line reuses this buffer, unless a rare huge line grew it.
        if self.bytes.capacity() <= SPARE_CAPACITY {
            self.bytes.clear();
            let bytes = std::mem::take(&mut self.bytes);
            let _ = SPARE.try_with(|spare| spare.set(bytes));
        }
    }
}

/// The largest line buffer kept for reuse.
const SPARE_CAPACITY: usize = 4096;

thread_local! {
    /// A line buffer kept per thread: a line costs no allocation. (A line written while another
    /// is being written on the same thread finds it taken and makes its own.)
    static SPARE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

impl<'a> MakeWriter<'a> for BufferedStdout {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            bytes: SPARE.try_with(Cell::take).unwrap_or_default(),
        }
    }
}

/// Starts logging at `level` (a level name or a tracing filter directive), in JSON lines when
/// `json`.
pub fn init(level: &str, json: bool) {
    let directive = if level.contains(['=', ',']) {
        level.to_owned()
    } else {
        // Pingora is chatty below warn; keep it quiet unless asked by name.
        format!("{level},pingora=warn,pingora_core=warn,pingora_proxy=warn")
    };
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"));
    JSON.store(json, Ordering::Relaxed);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(BufferedStdout);
    let _ = if json {
        builder.with_ansi(false).event_format(Json).try_init()
    } else {
        builder
            .with_ansi(std::io::stdout().is_terminal())
            .event_format(Compact)
            .try_init()
    };
    let _ = std::thread::Builder::new()
        .name("gemgate-log".into())
        .spawn(move || {
            loop {
                std::thread::sleep(FLUSH_EVERY);
                write_out();
            }
        });
}

/// Writes out every thread's buffered lines (each thread's in order; threads one after the
/// other), and forgets the buffers of threads that ended.
fn write_out() {
    let pending: Vec<Vec<u8>> = {
        let mut threads = SHARED.threads.lock().unwrap_or_else(|e| e.into_inner());
        let pending = threads
            .iter()
            .map(|b| std::mem::take(&mut *b.lock().unwrap_or_else(|e| e.into_inner())))
            .filter(|lines| !lines.is_empty())
            .collect();
        // A buffer held here alone belongs to a thread that ended (and was emptied above).
        threads.retain(|b| Arc::strong_count(b) > 1);
        pending
    };
    let mut out = std::io::stdout().lock();
    for lines in &pending {
        let _ = out.write_all(lines);
    }
    let dropped = SHARED.dropped.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        let _ = writeln!(
            out,
            "gemgate: {dropped} log lines dropped: stdout is not keeping up"
        );
    }
    let _ = out.flush();
}

/// Writes out buffered log lines; call before the process exits.
pub fn flush() {
    write_out();
}

/// `2026-11-26T06:46:02.121Z  INFO gemgate::access: message field=value …`, like tracing's
/// default format but cheaper: the date and time are formatted once per second per thread.
struct Compact;

impl<S, N> FormatEvent<S, N> for Compact
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write_time(&mut w)?;
        w.write_str(" ")?;
        let meta = event.metadata();
        w.write_str(match *meta.level() {
            tracing::Level::ERROR => "ERROR ",
            tracing::Level::WARN => " WARN ",
            tracing::Level::INFO => " INFO ",
            tracing::Level::DEBUG => "DEBUG ",
            tracing::Level::TRACE => "TRACE ",
        })?;
        w.write_str(meta.target())?;
        w.write_str(": ")?;
        let _ = ctx; // fields are written by `Fields`, below
        let mut fields = Fields {
            out: NoControl(w.by_ref()),
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writeln!(w)
    }
}

/// `{"time":"2026-11-26T06:46:02.121Z","level":"INFO","target":"gemgate::access",
/// "message":"…","field":value,…}`: one object per line, for Loki, Elasticsearch or Cloud
/// Logging. Numbers and booleans stay JSON numbers and booleans.
struct Json;

impl<S, N> FormatEvent<S, N> for Json
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut time = String::with_capacity(24);
        write_time(&mut time)?;
        let mut object = serde_json::Map::new();
        object.insert("time".into(), time.into());
        object.insert("level".into(), meta.level().as_str().into());
        object.insert("target".into(), meta.target().into());
        let mut fields = JsonFields(object);
        event.record(&mut fields);
        // serde_json escapes every control character: no value can forge a line.
        let line = serde_json::Value::Object(fields.0).to_string();
        w.write_str(&line)?;
        writeln!(w)
    }
}

struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

/// Writes the message, then ` name=value` for each other field. Cheaper than tracing's default
/// field formatter, which escapes every message character by character.
struct Fields<'w> {
    out: NoControl<Writer<'w>>,
    result: std::fmt::Result,
}

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.record_debug(field, &format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        if self.result.is_err() {
            return;
        }
        self.result = if field.name() == "message" {
            write!(self.out, "{value:?}")
        } else {
            write!(self.out, " {}={value:?}", field.name())
        };
    }
}

/// Passes text through, replacing control characters (a client-supplied value must not be able
/// to forge log lines or send terminal escapes).
struct NoControl<W>(W);

impl<W: std::fmt::Write> std::fmt::Write for NoControl<W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if !s.bytes().any(|b| b.is_ascii_control()) {
            return self.0.write_str(s);
        }
        for c in s.chars() {
            if c.is_ascii_control() {
                write!(self.0, "\\x{:02x}", c as u32)?;
            } else {
                self.0.write_char(c)?;
            }
        }
        Ok(())
    }
}

thread_local! {
    static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

/// Writes the time now, `2026-11-26T06:46:02.121Z`; the date and the second are formatted once
/// per second per thread.
fn write_time(w: &mut impl std::fmt::Write) -> std::fmt::Result {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != now.as_secs() || cache.1.is_empty() {
            *cache = (now.as_secs(), crate::clock::utc_seconds(now.as_secs()));
        }
        let ms = now.subsec_millis();
        let digits = [
            b'.',
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
        ];
        w.write_str(&cache.1)?;
        w.write_str(std::str::from_utf8(&digits).expect("ASCII"))
    })
}

#[cfg(test)]
mod tests {
    use std::fmt::Write;

    #[test]
    fn control_characters_are_escaped() {
        let mut out = super::NoControl(String::new());
        write!(out, "a\nb\x1b[31m").unwrap();
        assert_eq!(out.0, "a\\x0ab\\x1b[31m");
    }

    #[test]
    fn utc_seconds_formats_dates() {
        assert_eq!(crate::clock::utc_seconds(0), "1970-01-01T00:00:00");
        assert_eq!(
            crate::clock::utc_seconds(1_795_678_200),
            "2026-11-26T07:30:00"
        );
    }
}

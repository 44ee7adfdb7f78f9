//! Logging: `tracing` to stdout through a non-blocking writer, so a slow terminal or pipe never
//! stalls a request. Pingora's own `log` lines are picked up too.

use std::io::IsTerminal;
use std::sync::Mutex;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Starts logging at `level` (a level name or a tracing filter directive).
pub fn init(level: &str) {
    let directive = if level.contains(['=', ',']) {
        level.to_owned()
    } else {
        // Pingora is chatty below warn; keep it quiet unless asked by name.
        format!("{level},pingora=warn,pingora_core=warn,pingora_proxy=warn")
    };
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stdout().is_terminal())
        .with_target(true)
        .try_init();
    *GUARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
}

/// Writes out buffered log lines; call before the process exits.
pub fn flush() {
    drop(GUARD.lock().unwrap_or_else(|e| e.into_inner()).take());
}

//! Hot reload: watch the config file, the plugins folder and the templates folder; on a change,
//! build a whole new generation and swap it in, or keep the old one and say why.
//!
//! Folders are watched rather than files because editors save by writing a new file and
//! renaming it over the old one. Events are gathered until the folder has been quiet for a
//! moment, so one save (often several events) makes one reload.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use notify::{EventKind, RecursiveMode, Watcher};
use serde::Serialize;

use super::{BuildError, Generation, State};
use crate::clock::now_ms;
use crate::config::edit::FleetEdits;
use crate::config::{self, Config};

/// How long the watched folders must be quiet before a reload starts.
const SETTLE: Duration = Duration::from_millis(120);
/// A stream of events never delays a reload longer than this.
const MAX_SETTLE: Duration = Duration::from_millis(500);

/// Where the config comes from, as given on the command line.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    /// `--config` was given: a missing file is an error, not the embedded defaults.
    pub explicit: bool,
    /// A fleet's admin edits, laid over the file (empty for a single instance).
    pub fleet_edits: Arc<ArcSwap<FleetEdits>>,
}

impl Source {
    /// The config file at `path` (`explicit`: given on the command line).
    pub fn new(path: PathBuf, explicit: bool) -> Source {
        Source {
            path,
            explicit,
            fleet_edits: Arc::default(),
        }
    }

    /// Reads and validates the config (file with the fleet's edits, `.env` of the working
    /// directory, environment).
    pub fn load(&self) -> Result<Config, config::ConfigError> {
        config::load_with(
            &self.path,
            self.explicit,
            &self.vars(),
            &self.fleet_edits.load(),
        )
    }

    /// The environment and the working directory's `.env`, as a reload reads them.
    pub fn vars(&self) -> std::collections::BTreeMap<String, String> {
        config::gather_env(Path::new("."))
    }
}

/// Where a reload failed.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadError {
    pub file: Option<String>,
    pub line: Option<u32>,
    pub message: String,
}

/// The outcome of the last reload, for the logs, `GET /admin/api/reload` and the admin page.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadStatus {
    /// The generation serving now (1 at start).
    pub generation: u64,
    /// When the last reload ran (ms since the epoch); `None`: none since the start.
    pub last_reload_ms: Option<u64>,
    /// The same, as an RFC 3339 UTC time.
    pub last_reload_at: Option<String>,
    pub last_result: Option<&'static str>,
    pub last_error: Option<ReloadError>,
    /// Settings changed in the file that take effect only after a restart.
    pub restart_needed: Vec<&'static str>,
}

/// Builds a new generation from the current files and makes it current. On any error the
/// generation serving now stays, and the error is returned and recorded.
pub fn reload(state: &State) -> Result<u64, ReloadError> {
    // One at a time: an older reload finishing last would otherwise put back an older config.
    let _one_at_a_time = state.reloading.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let current = state.current.load_full();
    // Read before the config is: what this reload sees is this text or a newer one.
    let config_hash = fingerprint(&state.source.path);
    let result = state
        .source
        .load()
        .map_err(|e| config_error(&e, &state.source))
        .and_then(|config| {
            let id = state.next_generation();
            Generation::build(config, id, &state.lasting, Some(&current)).map_err(|e| match e {
                BuildError::Policy(e) => policy_error(&e),
                BuildError::Template(e) => ReloadError {
                    message: e.to_string(),
                    file: Some(e.file),
                    line: e.line.map(|l| l as u32),
                },
            })
        });
    let mut status = state.reload_status();
    let now = now_ms();
    status.last_reload_ms = Some(now);
    status.last_reload_at = Some(crate::clock::rfc3339(now));
    match result {
        Ok(next) => {
            let restart = restart_needed(&current.config, &next.config);
            for setting in &restart {
                tracing::warn!(
                    setting,
                    "this setting changed in the config, but takes effect only after a restart"
                );
            }
            let id = next.id;
            tracing::info!(
                generation = id,
                plugins = %next.policy.enabled().map(|p| p.name.as_str()).collect::<Vec<_>>().join(","),
                keys = next.pool.keys().len(),
                took_ms = started.elapsed().as_millis() as u64,
                "reloaded"
            );
            state.current.store(Arc::new(next));
            state.lasting.prometheus.reload(true);
            state.set_config_fingerprint(config_hash);
            status.generation = id;
            status.last_result = Some("ok");
            status.last_error = None;
            status.restart_needed = restart;
            state.set_reload_status(status);
            Ok(id)
        }
        Err(e) => {
            tracing::error!(
                file = e.file.as_deref().unwrap_or("-"),
                line = e.line.unwrap_or(0),
                "reload rejected, the previous configuration keeps serving: {}",
                e.message
            );
            status.last_result = Some("error");
            state.lasting.prometheus.reload(false);
            status.last_error = Some(e.clone());
            state.set_reload_status(status);
            Err(e)
        }
    }
}

/// Settings a running gateway cannot change.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.listen != new.listen {
        out.push("server.listen (GEMGATE_LISTEN)");
    }
    if old.data_dir != new.data_dir {
        out.push("server.data_dir (GEMGATE_DATA_DIR)");
    }
    if old.threads != new.threads {
        out.push("server.threads (GEMGATE_THREADS)");
    }
    if old.grace_period != new.grace_period {
        out.push("server.grace_period_s (GEMGATE_GRACE_PERIOD_SECONDS)");
    }
    if old.log_level != new.log_level {
        out.push("server.log_level (LOG_LEVEL)");
    }
    if old.file.server.log_format != new.file.server.log_format {
        out.push("server.log_format (LOG_FORMAT)");
    }
    if old.metrics_listen != new.metrics_listen {
        out.push("metrics.listen (GEMGATE_METRICS_LISTEN)");
    }
    if old.cluster != new.cluster {
        out.push("cluster (GEMGATE_REDIS_URL, GEMGATE_CLUSTER, GEMGATE_CLUSTER_SECRET, GEMGATE_INSTANCE)");
    }
    out
}

fn config_error(e: &config::ConfigError, source: &Source) -> ReloadError {
    let message = e.to_string();
    ReloadError {
        file: Some(source.path.display().to_string()),
        line: number_after(&message, "line "),
        message,
    }
}

fn policy_error(e: &crate::policy::PolicyError) -> ReloadError {
    // Lua names the place as `path/to/plugin.lua:LINE:`.
    let located = e.message.split_once(".lua:").and_then(|(before, rest)| {
        let line = rest.split(':').next()?.parse().ok()?;
        // The path is the last word before `.lua:` (mlua may say "syntax error: " first).
        let file = before.rsplit([' ', '\t']).next()?;
        Some((format!("{file}.lua"), line))
    });
    ReloadError {
        file: located
            .as_ref()
            .map(|(f, _)| f.clone())
            .or_else(|| Some(format!("{}.lua", e.plugin))),
        line: located.map(|(_, l)| l),
        message: e.to_string(),
    }
}

/// The number right after the first `marker` in `text`.
fn number_after(text: &str, marker: &str) -> Option<u32> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Starts the watcher thread. Failing to watch is logged, not fatal: the gateway serves on, and
/// `POST /admin/api/reload` still reloads.
pub fn watch(state: Arc<State>) {
    let (tx, rx) = mpsc::channel();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let _ = tx.send(event);
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("cannot watch files, hot reload is off: {e}");
            return;
        }
    };
    // Watched before the listener opens, so that no change made after gemgate answers is
    // missed.
    let mut watched = HashSet::new();
    watch_folders(&mut watcher, &mut watched, &state);
    let spawned = std::thread::Builder::new()
        .name("gemgate-reload".into())
        .spawn(move || {
            while let Ok(event) = rx.recv() {
                if !relevant(&event, &state) {
                    continue;
                }
                let mut only_config = only_the_config(&event, &state);
                // Let the burst of events of one save settle.
                let first = Instant::now();
                while first.elapsed() < MAX_SETTLE {
                    match rx.recv_timeout(SETTLE) {
                        Ok(e) => {
                            if relevant(&e, &state) {
                                only_config &= only_the_config(&e, &state);
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => break,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                // The admin API writes the config and reloads at once: its save needs no
                // second reload here. An edit holds `edits` from its write to the end of its
                // reload, so this waits for an edit under way to say what it read.
                let as_read = {
                    let _edit = state.edits.lock().unwrap_or_else(|e| e.into_inner());
                    fingerprint(&state.source.path) == state.config_fingerprint()
                };
                if only_config && as_read {
                    tracing::debug!("the config file is as the last reload read it");
                    continue;
                }
                // A folder that has just appeared is watched before the reload that reads it
                // is published, so that a file saved into it right after is not missed.
                watch_folders(&mut watcher, &mut watched, &state);
                let _ = reload(&state);
                // The config may name other folders now.
                watch_folders(&mut watcher, &mut watched, &state);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the reload thread, hot reload is off: {e}");
    }
}

/// The folders whose files make a generation: the config file's, the plugins', the templates'.
fn folders(state: &State) -> Vec<PathBuf> {
    let generation = state.current.load();
    let mut dirs = Vec::new();
    if let Some(parent) = state.source.path.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        dirs.push(parent.to_path_buf());
        dirs.push(parent.join("templates"));
    }
    dirs.push(PathBuf::from("templates"));
    dirs.extend(generation.policy.dir().map(Path::to_path_buf));
    dirs.extend(generation.templates.dir.clone());
    // The folders plugins and templates would be read from, once they are created.
    dirs.extend(generation.config.plugin_dir());
    dirs.extend(generation.config.template_dir());
    dirs.into_iter()
        .filter(|d| d.is_dir())
        .filter_map(|d| d.canonicalize().ok())
        .collect()
}

fn watch_folders(
    watcher: &mut notify::RecommendedWatcher,
    watched: &mut HashSet<PathBuf>,
    state: &State,
) {
    for dir in folders(state) {
        if watched.contains(&dir) {
            continue;
        }
        match watcher.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                tracing::debug!(dir = %dir.display(), "watching for changes");
                watched.insert(dir);
            }
            Err(e) => tracing::warn!(dir = %dir.display(), "cannot watch for changes: {e}"),
        }
    }
}

/// Whether the only files of `event` that make a generation are the config file (a save's
/// temporary file does not count).
fn only_the_config(event: &notify::Event, state: &State) -> bool {
    let config_name = state.source.path.file_name();
    event
        .paths
        .iter()
        .filter(|p| relevant_path(p, state))
        .all(|p| p.file_name() == config_name)
}

/// A hash of the config file's bytes (0 when it cannot be read).
fn fingerprint(path: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    match std::fs::read(path) {
        Ok(bytes) => {
            let mut h = std::hash::DefaultHasher::new();
            bytes.hash(&mut h);
            h.finish() | 1
        }
        Err(_) => 0,
    }
}

/// Whether an event touches a file a generation is built from (not logs or data written beside
/// them).
fn relevant(event: &notify::Event, state: &State) -> bool {
    !matches!(event.kind, EventKind::Access(_))
        && event.paths.iter().any(|p| relevant_path(p, state))
}

/// Whether a file of this name can change a generation.
fn relevant_path(p: &Path, state: &State) -> bool {
    let name = p.file_name();
    let ext = p.extension().and_then(|e| e.to_str());
    // `..data`: a Kubernetes ConfigMap volume changes every file at once by pointing this link
    // at a new folder (the files are links through it).
    name == state.source.path.file_name()
        || name.is_some_and(|n| n == ".env" || n == "plugins" || n == "templates" || n == "..data")
        || matches!(ext, Some("lua" | "hbs" | "html" | "css" | "js"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_file_and_line() {
        let e = crate::policy::PolicyError {
            plugin: "x".into(),
            hook: "load".into(),
            message: "plugins/x.lua:7: unexpected symbol near '='".into(),
        };
        let r = policy_error(&e);
        assert_eq!(
            (r.file.as_deref(), r.line),
            (Some("plugins/x.lua"), Some(7))
        );
        let e = crate::policy::PolicyError {
            message: "syntax error: /srv/plugins/x.lua:1: unexpected symbol near 'then'".into(),
            ..e
        };
        let r = policy_error(&e);
        assert_eq!(
            (r.file.as_deref(), r.line),
            (Some("/srv/plugins/x.lua"), Some(1))
        );
        assert_eq!(
            number_after("TOML parse error at line 3, column 5", "line "),
            Some(3)
        );
    }
}

//! The admin API's policy authoring: the dry run, and reading, checking and saving a plugin
//! file from the browser.
//!
//! Saving writes the file atomically into the plugins folder and reloads, as saving it in an
//! editor would; a plugin that does not load is not saved. The folder is this instance's own:
//! in a fleet every instance reads its own files.

use serde_json::{Value, json};

use super::api::bad;
use crate::app::{Generation, reload};
use crate::http::reply::GateError;
use crate::policy::PluginSource;
use crate::policy::engine::Overrides;
use crate::policy::harness::{Scenario, simulate};
use crate::policy::testing::{self, check_edit};
use crate::proxy::Gateway;

/// How long a dry run's requests (`times`) may go on.
const DRY_RUN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest plugin file the admin page saves.
const MAX_SOURCE: usize = 256 * 1024;

impl Gateway {
    /// `POST /admin/api/policy/dry-run`: the request in the body (a scenario without `pool`,
    /// `plugins` or `settings`: it runs against the live pool and config; or the bare request)
    /// through a rehearsal of the live plugins, their counters as the live ones are.
    pub(super) async fn dry_run(
        &self,
        generation: &Generation,
        raw: &[u8],
    ) -> Result<Value, GateError> {
        let mut body: Value = serde_json::from_slice(raw)
            .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
        // `{"model": …}` alone is taken as `{"request": {"model": …}}`.
        if body.get("request").is_none() && body.get("model").is_some_and(Value::is_string) {
            body = json!({ "request": body });
        }
        let scenario: Scenario = serde_json::from_value(body)
            .map_err(|e| bad(format!("the body is not a dry-run request: {e}")))?;
        if scenario.pool.is_some()
            || !scenario.plugins.is_empty()
            || scenario.settings.is_some()
            || scenario.only.is_some()
        {
            return Err(bad(
                "a dry run uses the live pool, plugins and settings: leave out pool, plugins, \
                 settings and only (a plugin test may set them)",
            ));
        }
        let policy = generation.policy.clone();
        let pool = generation.pool.clone();
        // Loading the plugins again is blocking work.
        let verdict = tokio::task::spawn_blocking(move || {
            let live = Overrides {
                live_counters: true,
                ..Overrides::default()
            };
            let rehearsal = policy
                .rehearsal(pool, &live)
                .map_err(|e| GateError::new(500, format!("the plugins do not load: {e}")))?;
            let deadline = std::time::Instant::now() + DRY_RUN_TIME;
            simulate(&rehearsal, &scenario, deadline).map_err(|e| bad(e.to_string()))
        })
        .await
        .map_err(|_| GateError::new(500, "the dry run failed"))??;
        Ok(serde_json::to_value(verdict).unwrap_or_default())
    }

    /// `GET /admin/api/plugins/{name}`: the file's code, as the serving plugins were read (or
    /// from the folder, for a test file).
    pub(super) fn plugin_file(
        &self,
        generation: &Generation,
        name: &str,
    ) -> Result<Value, GateError> {
        let policy = &generation.policy;
        let code = match policy.source(name) {
            Some(s) => s.code.clone(),
            None => testing::test_sources(policy.dir())
                .ok()
                .and_then(|files| files.into_iter().find(|f| f.name == name))
                .map(|f| f.code)
                .ok_or_else(|| {
                    GateError::new(404, format!("there is no plugin file {name}.lua"))
                })?,
        };
        Ok(json!({
            "name": name,
            "code": code,
            "editable": policy.dir().is_some(),
            "file": policy.dir().map(|d| d.join(format!("{name}.lua")).display().to_string()),
            "fleet": self.state.lasting.shared.fleet_status().is_some(),
        }))
    }

    /// `POST /admin/api/plugins/{name}/check`: whether the plugins load with `{"code"}` as
    /// `{name}.lua`, and the folder's tests with it.
    pub(super) async fn check_plugin(
        &self,
        generation: &Generation,
        name: &str,
        raw: &[u8],
    ) -> Result<Value, GateError> {
        let edit = Edit::of(generation, name, raw)?;
        let checked = tokio::task::spawn_blocking(move || edit.check())
            .await
            .map_err(|_| GateError::new(500, "the check failed"))?;
        Ok(serde_json::to_value(checked).unwrap_or_default())
    }

    /// `PUT /admin/api/plugins/{name}` `{"code"}`: checks the file, and if the plugins load with
    /// it (and, with `policy.require_tests`, its tests pass) writes it and reloads.
    pub(super) async fn save_plugin(
        &self,
        generation: &Generation,
        name: &str,
        raw: &[u8],
    ) -> Result<Value, GateError> {
        let edit = Edit::of(generation, name, raw)?;
        let require_tests = generation.config.policy.require_tests;
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            let before = state.reload_status().last_reload_ms;
            let mut answer = {
                // One edit at a time, each checked against the folder as the one before left
                // it: two saves at once cannot make a folder that does not load.
                let _edit = state.edits.lock().unwrap_or_else(|e| e.into_inner());
                let checked = edit.check();
                let mut answer = serde_json::to_value(&checked).unwrap_or_default();
                if !checked.loads || (require_tests && checked.failed > 0) {
                    answer["saved"] = json!(false);
                    return Ok(answer);
                }
                let path = &edit.source.path;
                crate::config::edit::write_atomic(path, &edit.source.code)
                    .map_err(|e| GateError::new(500, e))?;
                tracing::info!(file = %path.display(), "plugin file saved from the admin page");
                answer["saved"] = json!(true);
                answer
            };
            answer["reload"] = reload_after(&state, before);
            Ok(answer)
        })
        .await
        .map_err(|_| GateError::new(500, "saving failed"))?
    }
}

/// The reload that applies a saved file: the watcher's (the usual reload, within a second of
/// the save), or, when none came (the watcher is off), one made here.
fn reload_after(state: &crate::app::State, before: Option<u64>) -> Value {
    let deadline = std::time::Instant::now() + WATCHER_WAIT;
    while std::time::Instant::now() < deadline {
        let status = state.reload_status();
        if status.last_reload_ms != before {
            return json!({
                "ok": status.last_result == Some("ok"),
                "generation": status.generation,
                "error": status.last_error,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    match reload::reload(state) {
        Ok(generation) => json!({ "ok": true, "generation": generation }),
        Err(e) => json!({ "ok": false, "error": e }),
    }
}

/// How long a save waits for the watcher's reload.
const WATCHER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// An edit of the plugin file `{name}.lua`, with what checking it needs.
struct Edit {
    source: PluginSource,
    policy: std::sync::Arc<crate::policy::engine::Policy>,
    quota: crate::config::quota::QuotaLimits,
}

impl Edit {
    /// The body's `{"code"}` as `{name}.lua` of the serving generation's plugins folder.
    fn of(generation: &Generation, name: &str, raw: &[u8]) -> Result<Edit, GateError> {
        Ok(Edit {
            source: edited_source(generation, name, raw)?,
            policy: generation.policy.clone(),
            quota: generation.config.quota.clone(),
        })
    }

    /// Whether the plugins load with it, and the folder's tests (blocking work).
    fn check(&self) -> crate::policy::testing::EditCheck {
        check_edit(&self.policy, &self.quota, &self.source)
    }
}

/// The plugin file `{name}.lua` of the plugins folder with the body's `{"code"}`.
fn edited_source(
    generation: &Generation,
    name: &str,
    raw: &[u8],
) -> Result<PluginSource, GateError> {
    let Some(dir) = generation.policy.dir() else {
        return Err(GateError::new(
            409,
            "the plugins are the ones built into gemgate: set [policy] dir (or make a plugins/ \
             folder beside the config) to edit them",
        ));
    };
    let v: Value =
        serde_json::from_slice(raw).map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    let code = v
        .get("code")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("send the file as {\"code\": \"…\"}"))?;
    if code.len() > MAX_SOURCE {
        return Err(GateError::new(
            413,
            format!("a plugin file has at most {MAX_SOURCE} bytes"),
        ));
    }
    Ok(PluginSource {
        name: name.to_owned(),
        path: dir.join(format!("{name}.lua")),
        code: code.to_owned(),
    })
}

//! The admin JSON API under `/admin/api/`: the reload status, and the key pool (list, by
//! project, with suggestions to group keys; verify, reset, enable, disable; add, delete, and
//! set a key's project and tier in the config file). Every route needs `Authorization: Bearer
//! <AUTH_TOKEN>`; without `AUTH_TOKEN` the API is off. No answer ever carries a key secret:
//! keys show masked.

use std::collections::HashMap;

use bytes::Bytes;
use pingora::protocols::http::ServerSession;
use serde_json::{Value, json};

use super::{AdminCall, KeyAction};
use crate::app::checks::{self, Probe};
use crate::app::shared::EditError;
use crate::app::{Generation, reload, session};
use crate::clock::{now_ms, rfc3339};
use crate::http::auth;
use crate::http::peer::Peer;
use crate::http::reply::GateError;
use crate::keys::Key;
use crate::keys::owners::Kind;
use crate::keys::storm::Storms;
use crate::proxy::{Gateway, Refusal, read_body};
use crate::store::usage::Counts;

/// Largest admin request body.
const ADMIN_BODY_LIMIT: u64 = 1024 * 1024;
/// Keys per page unless asked otherwise, and at most.
const PER_PAGE: usize = 50;
const MAX_PER_PAGE: usize = 1000;

impl Gateway {
    /// Answers an admin call with JSON, or refuses it.
    pub(crate) async fn admin(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        call: AdminCall,
        peer: &Peer,
    ) -> Result<Bytes, GateError> {
        let req = s.req_header();
        let admin_token = generation.config.auth_token.as_ref().map(|t| t.expose());
        session::identify(&*self.state.lasting.shared, req, peer, admin_token)?
            .check_csrf(req, None)?;
        let method = req.method.clone();
        if !admin_allows(&call, &method) {
            return Err(GateError::new(
                405,
                format!("{method} is not allowed on this admin route"),
            ));
        }
        let body = match call {
            AdminCall::Reload => self.reload_call(&method).await,
            AdminCall::Keys if method == http::Method::POST => {
                self.paste_keys(generation, s).await?
            }
            AdminCall::Key { id } if method == http::Method::PATCH => {
                let raw = admin_body(s).await?;
                self.set_key_place(generation, &id, &raw).await?
            }
            AdminCall::Key { id } => self.delete_key(generation, &id).await?,
            AdminCall::BulkKeys => {
                let raw = admin_body(s).await?;
                self.bulk(generation, &raw).await?
            }
            AdminCall::Keys => {
                let query = s.req_header().uri.query().unwrap_or_default().to_owned();
                keys_json(generation, &query, &self.usage_today(), &self.state.lasting.storms)
            }
            AdminCall::VerifyKeys => self.verify_keys(generation, s).await?,
            AdminCall::Logs { log, row } => self.logs_call(s, &method, log, row).await?,
            AdminCall::Resources => {
                let query = s.req_header().uri.query().unwrap_or_default();
                self.resources_json(auth::query_param(query, "kind").as_deref())?
            }
            AdminCall::KeyAction { id, action } => self.key_action(generation, &id, action).await?,
            AdminCall::DryRun => {
                let raw = admin_body(s).await?;
                self.dry_run(generation, &raw).await?
            }
            AdminCall::PluginFile { name } if method == http::Method::GET => {
                self.plugin_file(generation, &name)?
            }
            AdminCall::PluginFile { name } => {
                let raw = admin_body(s).await?;
                self.save_plugin(generation, &name, &raw).await?
            }
            AdminCall::PluginCheck { name } => {
                let raw = admin_body(s).await?;
                self.check_plugin(generation, &name, &raw).await?
            }
            AdminCall::Fleet => self
                .state
                .lasting
                .shared
                .fleet_status()
                .unwrap_or_else(|| json!({ "fleet": null, "note": "a single instance: GEMGATE_REDIS_URL is not set" })),
        };
        Ok(Bytes::from(body.to_string()))
    }

    /// `GET /admin/api/reload`: the reload status; `POST`: reloads first.
    async fn reload_call(&self, method: &http::Method) -> Value {
        if method == http::Method::POST {
            let state = self.state.clone();
            // Reading files and compiling plugins is blocking work.
            let _ = tokio::task::spawn_blocking(move || reload::reload(&state)).await;
        }
        self.reload_json()
    }

    /// `POST /admin/api/keys`: adds the keys pasted as `{"text": "…"}`.
    async fn paste_keys(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
    ) -> Result<Value, GateError> {
        let raw = admin_body(s).await?;
        let v: Value = serde_json::from_slice(&raw)
            .map_err(|e| GateError::new(400, format!("the body is not valid JSON: {e}")))?;
        let text = v
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| GateError::new(400, "paste the keys as {\"text\": \"…\"}"))?;
        self.add_keys(generation, text).await
    }

    /// `POST /admin/api/keys/verify`: probes the keys the body names, or every disabled one.
    async fn verify_keys(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
    ) -> Result<Value, GateError> {
        let raw = admin_body(s).await?;
        let indices = keys_to_verify(generation, ids_to_verify(&raw)?)?;
        let mut results = Vec::new();
        for i in indices {
            results.push(self.verify(generation, generation.pool.get(i)).await);
        }
        Ok(json!({ "results": results }))
    }

    /// `GET /admin/api/logs/…`: a page of a log or one row; `DELETE`: rows of it.
    async fn logs_call(
        &self,
        s: &mut ServerSession,
        method: &http::Method,
        log: crate::store::logs::Log,
        row: Option<(u64, u64)>,
    ) -> Result<Value, GateError> {
        let store = self.log_store()?;
        let query = s.req_header().uri.query().unwrap_or_default().to_owned();
        if method == http::Method::DELETE {
            let raw = admin_body(s).await?;
            return delete_logs(&store, log, &query, &raw);
        }
        logs_json(&store, log, row, &query)
    }

    /// `POST /admin/api/keys/{id}/{action}`: verifies, resets, enables or disables one key.
    async fn key_action(
        &self,
        generation: &Generation,
        id: &str,
        action: KeyAction,
    ) -> Result<Value, GateError> {
        let index = generation
            .pool
            .index_of(id)
            .ok_or_else(|| GateError::new(404, format!("no key {id} in the pool")))?;
        let key = generation.pool.get(index);
        match action {
            KeyAction::Verify => return Ok(self.verify(generation, key).await),
            KeyAction::Reset | KeyAction::Enable => key.state.enable(),
            KeyAction::Disable => key.state.disable("disabled by an operator"),
        }
        tracing::info!(key = %key.spec.id, ?action, "admin: key changed");
        Ok(key_json(key, now_ms(), None))
    }

    /// Adds the keys found in `text` that the pool does not have to the config file, then
    /// reloads.
    async fn add_keys(&self, generation: &Generation, text: &str) -> Result<Value, GateError> {
        let found = crate::config::edit::find_keys(text);
        let (new, known): (Vec<String>, Vec<String>) = found.into_iter().partition(|k| {
            !generation
                .pool
                .keys()
                .iter()
                .any(|p| p.spec.secret.expose() == k)
        });
        if !new.is_empty() {
            let to_add = new.clone();
            self.write_config(move |text| crate::config::edit::add_keys(text, &to_add))
                .await?;
        }
        tracing::info!(
            added = new.len(),
            duplicates = known.len(),
            "admin: keys added"
        );
        Ok(json!({
            "added": new.iter().map(|k| crate::config::mask(k)).collect::<Vec<_>>(),
            "duplicates": known.iter().map(|k| crate::config::mask(k)).collect::<Vec<_>>(),
            "generation": self.state.current.load().id,
        }))
    }

    /// `{"action": "enable"|"disable"|"reset"|"delete", "ids": [...]}`: one action on many keys
    /// (deletions in one config write).
    async fn bulk(&self, generation: &Generation, raw: &[u8]) -> Result<Value, GateError> {
        use crate::config::KeySource;
        let v: Value = serde_json::from_slice(raw)
            .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
        let action = v["action"].as_str().unwrap_or_default();
        let ids: Vec<&str> = v["ids"]
            .as_array()
            .ok_or_else(|| bad("name the keys in {\"ids\": [...]}"))?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let mut missing = Vec::new();
        let mut keys = Vec::new();
        for id in &ids {
            match generation.pool.index_of(id) {
                Some(i) => keys.push(generation.pool.get(i)),
                None => missing.push(*id),
            }
        }
        let mut env_only = Vec::new();
        match action {
            "enable" | "reset" => keys.iter().for_each(|k| k.state.enable()),
            "disable" => keys
                .iter()
                .for_each(|k| k.state.disable("disabled by an operator")),
            "delete" => {
                let (env, file): (Vec<&Key>, Vec<&Key>) =
                    keys.iter().partition(|k| k.spec.source == KeySource::Env);
                env_only = env.iter().map(|k| k.spec.id.clone()).collect();
                keys = file;
                let secrets: Vec<String> = keys
                    .iter()
                    .map(|k| k.spec.secret.expose().to_owned())
                    .collect();
                if !secrets.is_empty() {
                    self.write_config(move |text| {
                        crate::config::edit::remove_keys(text, &secrets).map(|(text, _)| text)
                    })
                    .await?;
                }
            }
            other => {
                return Err(bad(format!(
                    "unknown action {other:?}: use enable, disable, reset or delete"
                )));
            }
        }
        let done: Vec<&str> = keys.iter().map(|k| k.spec.id.as_str()).collect();
        // Deleted from the file, but API_KEYS has them too.
        let still_in_pool: Vec<&str> = keys
            .iter()
            .filter(|k| action == "delete" && k.spec.source == KeySource::Both)
            .map(|k| k.spec.id.as_str())
            .collect();
        tracing::info!(action, keys = done.len(), "admin: bulk key action");
        Ok(json!({
            "action": action,
            "done": done,
            "missing": missing,
            "env_only": env_only,
            "still_in_pool": still_in_pool,
            "generation": self.state.current.load().id,
        }))
    }

    /// Removes a key from the config file, then reloads. A key that only `API_KEYS` gives
    /// cannot be removed here, and the answer says so.
    async fn delete_key(&self, generation: &Generation, id: &str) -> Result<Value, GateError> {
        use crate::config::KeySource;
        let index = generation
            .pool
            .index_of(id)
            .ok_or_else(|| GateError::new(404, format!("no key {id} in the pool")))?;
        let spec = generation.pool.get(index).spec.clone();
        if spec.source == KeySource::Env {
            return Err(GateError::new(
                409,
                format!(
                    "key {id} comes from API_KEYS in the environment: remove it there (and restart)"
                ),
            ));
        }
        let secret = spec.secret.expose().to_owned();
        self.write_config(move |text| {
            crate::config::edit::remove_keys(text, std::slice::from_ref(&secret))
                .map(|(text, _)| text)
        })
        .await?;
        let still = spec.source == KeySource::Both;
        tracing::info!(key = id, "admin: key deleted from the config file");
        Ok(json!({
            "deleted": id,
            "still_in_pool": still,
            "note": if still { "the key is also in API_KEYS: it stays in the pool until it is removed there" } else { "" },
            "generation": self.state.current.load().id,
        }))
    }

    /// `PATCH /admin/api/keys/{id}` with `{"project": "p1" | null, "tier": "free" | null}`:
    /// sets the key's project and tier in the config file (`null` removes one, a field left
    /// out stays as it is), then reloads. A key that only `API_KEYS` gives cannot be placed
    /// here, and the answer says so.
    async fn set_key_place(
        &self,
        generation: &Generation,
        id: &str,
        raw: &[u8],
    ) -> Result<Value, GateError> {
        use crate::config::KeySource;
        use crate::config::edit;
        let index = generation
            .pool
            .index_of(id)
            .ok_or_else(|| GateError::new(404, format!("no key {id} in the pool")))?;
        let spec = &generation.pool.get(index).spec;
        if spec.source == KeySource::Env {
            return Err(GateError::new(
                409,
                format!(
                    "key {id} comes from API_KEYS in the environment, where a key has no \
                     project: add it to the config file to give it one"
                ),
            ));
        }
        let change = PlaceChange::parse(raw, &generation.config.quota)?;
        let secret = spec.secret.expose().to_owned();
        let vars = self.state.source.vars();
        let owned_id = id.to_owned();
        let not_in_file = move || {
            let id = &owned_id;
            GateError::new(
                409,
                format!(
                    "key {id} is not in the config file's keys.api_keys: set its project where it is configured"
                ),
            )
        };
        let place = self
            .edit_config(move |text| {
                let Some(old) = edit::key_place(text, &secret)? else {
                    return Ok((None, Err(not_in_file())));
                };
                let new = change.over(&old);
                if new == old {
                    return Ok((None, Ok(new)));
                }
                let places = std::collections::BTreeMap::from([(secret, new.clone())]);
                let (text, _) = edit::set_key_places(text, &places)?;
                // Refused before it is written (two tiers in one project): a reload would
                // refuse it, and the file would keep it.
                if let Err(e) = crate::config::from_str(&text, "the edited config", &vars) {
                    return Ok((None, Err(bad(e.to_string()))));
                }
                Ok((Some(text), Ok(new)))
            })
            .await??;
        tracing::info!(key = id, project = ?place.project, tier = ?place.tier, "admin: key placed");
        Ok(json!({
            "id": id,
            "project": place.project,
            "tier": place.tier,
            "generation": self.state.current.load().id,
        }))
    }

    /// An edit of the config that writes what `change` makes of its text, then the reload
    /// that applies it.
    pub(super) async fn write_config(
        &self,
        change: impl FnOnce(&str) -> Result<String, String> + Send + 'static,
    ) -> Result<(), GateError> {
        self.edit_config(move |text| change(text).map(|new| (Some(new), ())))
            .await
    }

    /// Runs an edit of the config through the shared state (`change` gets its text and gives
    /// the new text, or `None` to leave it, and the answer), then, when it wrote, the reload
    /// that applies it; off the async workers. Edits and their reloads run one at a time.
    pub(super) async fn edit_config<T: Send + 'static>(
        &self,
        change: impl FnOnce(&str) -> Result<(Option<String>, T), String> + Send + 'static,
    ) -> Result<T, GateError> {
        let state = self.state.clone();
        let done = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = state.edits.lock().unwrap_or_else(|e| e.into_inner());
            let mut change = Some(change);
            let mut answer = None;
            let wrote = state
                .lasting
                .shared
                .edit_config(&state.source.path, &mut |text| {
                    let change = change.take().ok_or("the edit ran twice")?;
                    let (new_text, out) = change(text)?;
                    answer = Some(out);
                    Ok(new_text)
                })?;
            if wrote {
                reload::reload(&state).map_err(|e| EditError::Failed(e.message))?;
            }
            answer.ok_or_else(|| EditError::from("the edit did not run"))
        })
        .await
        .map_err(|e| GateError::new(500, format!("the config edit failed: {e}")))?;
        done.map_err(|e| {
            GateError::new(
                e.status(),
                format!("the config edit failed: {}", e.message()),
            )
        })
    }

    /// Today's usage per key id: the whole fleet's in a fleet, else this instance's (empty
    /// without a store).
    pub(super) fn usage_today(&self) -> HashMap<String, Counts> {
        if let Some(fleet) = self.state.lasting.shared.fleet_usage_today() {
            return fleet;
        }
        let lasting = &self.state.lasting;
        let today = crate::store::usage::day_of(now_ms());
        crate::store::usage::of_day(lasting.store.as_deref(), &lasting.usage, today)
    }

    /// The store that keeps the logs, or the answer for a gateway that keeps none.
    pub(super) fn log_store(&self) -> Result<std::sync::Arc<crate::store::Store>, GateError> {
        self.state
            .lasting
            .store
            .clone()
            .ok_or_else(|| GateError::new(503, "this gateway keeps no logs"))
    }

    pub(super) fn reload_json(&self) -> Value {
        let current = self.state.current.load();
        json!({
            "generation": current.id,
            "reload": self.state.reload_status(),
            "plugins": current.policy.plugins,
            "templates": current.templates.files.iter()
                .map(|(name, file)| json!({ "name": name, "file": file }))
                .collect::<Vec<_>>(),
            // Records dropped because their queue to the data file was full.
            "dropped": {
                "log_records": self.state.lasting.logs.dropped(),
                // Deleted, oldest first, to keep the data file within server.max_data_bytes.
                "trimmed_for_size": self.state.lasting.store.as_ref()
                    .map_or(0, |s| s.trimmed.load(std::sync::atomic::Ordering::Relaxed)),
            },
            // Requests and connections refused before they were a client's (never logged).
            "refused": self.state.refused.json(),
            "plugin_errors": self.state.lasting.stats.snapshot().into_iter()
                .map(|(plugin, hook, count)| json!({ "plugin": plugin, "hook": hook, "count": count }))
                .collect::<Vec<_>>(),
            // Each hook's calls since the start, and their p50 and p99 in microseconds
            // (estimated within the histogram's buckets).
            "plugin_timings": self.state.lasting.stats.timings.snapshot().into_iter()
                .filter_map(|(plugin, hook, t)| {
                    let calls: u64 = t.snapshot().0.iter().sum();
                    let us = |q| t.quantile(q).map(|s| (s * 1e6).round());
                    (calls > 0).then(|| json!({
                        "plugin": plugin, "hook": hook, "calls": calls,
                        "p50_us": us(0.5), "p99_us": us(0.99),
                    }))
                })
                .collect::<Vec<_>>(),
        })
    }

    /// `GET /admin/api/resources?kind=files`: every resource of that kind (`files`,
    /// `cachedContents`, `batches`, `interactions`, `auth_tokens`) clients made through gemgate,
    /// with the key that holds it and the client that owns it (`null` for records from before
    /// owners were kept, which no client sees).
    fn resources_json(&self, kind: Option<&str>) -> Result<Value, GateError> {
        let Some(kind) = kind.and_then(Kind::from_collection) else {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.collection()).collect();
            return Err(bad(format!(
                "name the kind of resource: ?kind= one of {}",
                names.join(", ")
            )));
        };
        let collection = kind.collection();
        let resources: Vec<Value> = self
            .state
            .lasting
            .files
            .all()
            .into_iter()
            .filter_map(|(id, f)| {
                let (of, id) = Kind::of_record(&id);
                (of == kind).then(|| {
                    json!({
                        "id": format!("{collection}/{id}"),
                        "key": f.owner.key,
                        "client": f.owner.client,
                        "expires": rfc3339(f.expires_ms),
                    })
                })
            })
            .collect();
        Ok(json!({ "kind": collection, "resources": resources }))
    }

    /// Probes one key now; a key that answers well is returned to the pool.
    async fn verify(&self, generation: &Generation, key: &Key) -> Value {
        let result = checks::probe(generation, key).await;
        let outcome = match result {
            Probe::Healthy => {
                key.state.enable();
                json!({ "id": key.spec.id, "ok": true })
            }
            Probe::Failing(status, class, message) => json!({
                "id": key.spec.id, "ok": false, "status": status, "class": class.as_str(), "message": message,
            }),
        };
        tracing::info!(key = %key.spec.id, result = %outcome, "admin: key verified");
        outcome
    }
}

/// Whether `method` is one that this admin call answers.
fn admin_allows(call: &AdminCall, method: &http::Method) -> bool {
    match call {
        AdminCall::Reload => method == http::Method::GET || method == http::Method::POST,
        AdminCall::Keys => method == http::Method::GET || method == http::Method::POST,
        AdminCall::Key { .. } => method == http::Method::DELETE || method == http::Method::PATCH,
        AdminCall::VerifyKeys | AdminCall::KeyAction { .. } | AdminCall::BulkKeys => {
            method == http::Method::POST
        }
        AdminCall::Logs { row, .. } => {
            method == http::Method::GET || row.is_none() && method == http::Method::DELETE
        }
        AdminCall::Resources | AdminCall::Fleet => method == http::Method::GET,
        AdminCall::DryRun | AdminCall::PluginCheck { .. } => method == http::Method::POST,
        AdminCall::PluginFile { .. } => method == http::Method::GET || method == http::Method::PUT,
    }
}

/// The key ids in a verify body's `{"ids": [...]}`, or `None` for an empty body.
fn ids_to_verify(raw: &[u8]) -> Result<Option<Vec<String>>, GateError> {
    if raw.is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(raw)
        .map_err(|e| GateError::new(400, format!("the body is not valid JSON: {e}")))?;
    Ok(v.get("ids").and_then(Value::as_array).map(|ids| {
        ids.iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    }))
}

/// The pool indices of the keys named in `wanted`, or of every disabled key without names.
fn keys_to_verify(
    generation: &Generation,
    wanted: Option<Vec<String>>,
) -> Result<Vec<usize>, GateError> {
    match wanted {
        None => Ok((0..generation.pool.keys().len())
            .filter(|&i| generation.pool.get(i).state.is_disabled())
            .collect()),
        Some(ids) => ids
            .iter()
            .map(|id| {
                generation
                    .pool
                    .index_of(id)
                    .ok_or_else(|| GateError::new(404, format!("no key {id}")))
            })
            .collect(),
    }
}

/// What a `PATCH` of a key asks for its place: each field `None` to leave it, `Some(None)`
/// to remove it, `Some(Some(name))` to set it.
struct PlaceChange {
    project: Option<Option<String>>,
    tier: Option<Option<String>>,
}

impl PlaceChange {
    /// `{"project": …, "tier": …}`, each a name (at most 128 characters, none a control
    /// character), `null` or `""` for none, or left out; a tier must be one the config knows.
    fn parse(raw: &[u8], quota: &crate::config::quota::QuotaLimits) -> Result<Self, GateError> {
        const USAGE: &str = "send {\"project\": \"name\" or null, \"tier\": \"name\" or null}";
        let v: Value = serde_json::from_slice(raw)
            .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
        let fields = v.as_object().ok_or_else(|| bad(USAGE))?;
        if fields.keys().any(|k| k != "project" && k != "tier") || fields.is_empty() {
            return Err(bad(USAGE));
        }
        let change = PlaceChange {
            project: place_name(fields, "project")?,
            tier: place_name(fields, "tier")?,
        };
        if let Some(Some(t)) = &change.tier
            && !quota.knows_tier(t)
        {
            return Err(bad(format!(
                "tier {t:?} is not defined: the tiers are {} (define others in [quota.tiers])",
                quota.tier_names().join(", ")
            )));
        }
        Ok(change)
    }

    /// `old` with this change made.
    fn over(&self, old: &crate::config::edit::KeyPlace) -> crate::config::edit::KeyPlace {
        crate::config::edit::KeyPlace {
            project: self.project.clone().unwrap_or_else(|| old.project.clone()),
            tier: self.tier.clone().unwrap_or_else(|| old.tier.clone()),
        }
    }
}

/// Field `name` of a place change (see [`PlaceChange`]); the name is never repeated in an
/// error, which may be any text.
fn place_name(
    fields: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<Option<String>>, GateError> {
    match fields.get(name) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) => match s.trim() {
            "" => Ok(Some(None)),
            n if n.len() <= 128 && !n.chars().any(char::is_control) => Ok(Some(Some(n.to_owned()))),
            _ => Err(bad(format!(
                "a key's {name} has at most 128 characters, none a control character"
            ))),
        },
        Some(_) => Err(bad(format!("{name} is a name (a string) or null"))),
    }
}

/// An admin request's body, bounded.
pub(super) async fn admin_body(s: &mut ServerSession) -> Result<Bytes, GateError> {
    read_body(s, ADMIN_BODY_LIMIT).await.map_err(|r| match r {
        Refusal::Gate(e) => e,
        Refusal::Upstream(_) => GateError::new(400, "cannot read the body"),
    })
}

/// How many keys are in each state.
#[derive(Default)]
pub(super) struct StateCounts {
    active: usize,
    cooling: usize,
    disabled: usize,
}

impl StateCounts {
    pub(super) fn add(&mut self, state: &str) {
        match state {
            "active" => self.active += 1,
            "cooling" => self.cooling += 1,
            _ => self.disabled += 1,
        }
    }

    pub(super) fn json(&self) -> Value {
        json!({ "active": self.active, "cooling": self.cooling, "disabled": self.disabled })
    }
}

/// `active`, `cooling` (for some model) or `disabled`.
/// One key as the admin API shows it: masked, with its health.
fn key_json(key: &Key, now: u64, usage_today: Option<&Counts>) -> Value {
    let s = &key.state;
    let detail = s.detail();
    let cooldowns: Vec<Value> = s
        .cooldowns(now)
        .into_iter()
        .map(|c| json!({ "model": &*c.model, "until": rfc3339(c.until_ms), "class": c.class, "scope": c.scope, "quota_id": (!c.quota.is_empty()).then_some(&*c.quota) }))
        .collect();
    let state = key.state_name(now);
    json!({
        "id": key.spec.id,
        "key": key.spec.secret.masked(),
        "label": key.spec.label,
        "tags": key.spec.tags,
        "weight": key.spec.weight,
        "project": key.spec.project,
        "tier": key.spec.tier,
        "learned_project": detail.consumer,
        "source": key.spec.source,
        "state": state,
        "disabled_reason": detail.disabled_reason,
        "cooldowns": cooldowns,
        "consecutive_failures": s.consecutive_failures(),
        "last_error": detail.last_error,
        "successes": s.successes(),
        "failures": s.failures(),
        "in_flight": s.in_flight(),
        "last_used": (s.last_used_ms() > 0).then(|| rfc3339(s.last_used_ms())),
        "usage_today": usage_today.cloned().unwrap_or_default(),
    })
}

/// `GET /admin/api/keys?page=1&per_page=50&q=text&state=active|cooling|disabled&tag=t&project=p`
/// (`project=` alone: the keys without a project): a page of keys, the pool's counts, its
/// projects, the tiers a key may name, and suggestions to group keys Google counts together.
pub(super) fn keys_json(
    generation: &Generation,
    query: &str,
    usage: &HashMap<String, Counts>,
    storms: &Storms,
) -> Value {
    let param = |name: &str| auth::query_param(query, name).map(|v| v.into_owned());
    let page = param("page")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let per_page = param("per_page")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(PER_PAGE)
        .clamp(1, MAX_PER_PAGE);
    let filter = KeyFilter {
        q: param("q").unwrap_or_default().to_ascii_lowercase(),
        state: param("state").filter(|s| !s.is_empty()),
        tag: param("tag").filter(|t| !t.is_empty()),
        project: param("project").map(|p| Some(p).filter(|p| !p.is_empty())),
    };
    let now = now_ms();
    let pool = &generation.pool;
    let states: Vec<&str> = pool.keys().iter().map(|k| k.state_name(now)).collect();
    let mut counts = StateCounts::default();
    let mut tags = std::collections::BTreeSet::new();
    let mut matching = Vec::new();
    for (key, &state) in pool.keys().iter().zip(&states) {
        counts.add(state);
        tags.extend(key.spec.tags.iter().map(String::as_str));
        if filter.matches(key, state) {
            matching.push(key);
        }
    }
    let total = matching.len();
    // A storm holds every key back: a cooldown of the global scope.
    let storm = storms.active().then(|| {
        json!({ "model": "*", "until": rfc3339(storms.next_probe_ms()), "class": "storm", "scope": "global", "quota_id": null })
    });
    let keys: Vec<Value> = matching
        .into_iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .map(|key| {
            let mut key = key_json(key, now, usage.get(&key.spec.id));
            if let (Some(c), Some(storm)) = (key["cooldowns"].as_array_mut(), &storm) {
                c.push(storm.clone());
            }
            key
        })
        .collect();
    let counts = counts.json();
    json!({
        "total": total, "page": page, "per_page": per_page, "pages": total.div_ceil(per_page).max(1),
        "counts": counts, "tags": tags, "keys": keys,
        "projects": projects_json(pool, &states),
        "tiers": generation.config.quota.tier_names(),
        "suggestions": suggestions(pool),
        "storm": storm_json(storms),
    })
}

/// A storm going on (Google throttling this instance's address), for the keys page, its API
/// and the dashboard.
pub(super) fn storm_json(storms: &Storms) -> Value {
    json!({
        "active": storms.active(),
        "since": storms.since_ms().map(rfc3339),
        "storms": storms.count(),
    })
}

/// Which keys a key list shows.
struct KeyFilter {
    /// Lower case; empty: every key.
    q: String,
    state: Option<String>,
    tag: Option<String>,
    /// `Some(None)`: the keys without a project.
    project: Option<Option<String>>,
}

impl KeyFilter {
    fn matches(&self, key: &Key, state: &str) -> bool {
        let q = &self.q;
        let text_ok = q.is_empty()
            || key.spec.id.contains(q)
            || key.spec.label.to_ascii_lowercase().contains(q)
            || key
                .spec
                .tags
                .iter()
                .any(|t| t.to_ascii_lowercase().contains(q));
        let tag_ok = self
            .tag
            .as_ref()
            .is_none_or(|t| key.spec.tags.iter().any(|k| k == t));
        let project_ok = self.project.as_ref().is_none_or(|p| key.spec.project == *p);
        text_ok && tag_ok && project_ok && self.state.as_ref().is_none_or(|w| w == state)
    }
}

/// The pool by project: each project the config names, with its tier and its keys' states,
/// then one entry (`"name": null`) for all the keys without a project (each its own).
fn projects_json(pool: &crate::keys::KeyPool, states: &[&str]) -> Vec<Value> {
    let summary = |keys: &mut dyn Iterator<Item = usize>| {
        let mut counts = StateCounts::default();
        let mut n = 0;
        for i in keys {
            counts.add(states[i]);
            n += 1;
        }
        (n, counts.json())
    };
    let mut out = Vec::new();
    for p in pool.projects().iter().filter(|p| p.named) {
        let (n, mut v) = summary(&mut p.keys.iter().map(|&i| i as usize));
        v["name"] = json!(p.name);
        v["named"] = json!(true);
        v["tier"] = json!(p.tier);
        v["keys"] = json!(n);
        out.push(v);
    }
    let unnamed = pool.projects().iter().filter(|p| !p.named);
    let (n, mut v) = summary(&mut unnamed.flat_map(|p| p.keys.iter().map(|&i| i as usize)));
    if n > 0 {
        v["name"] = Value::Null;
        v["named"] = json!(false);
        v["tier"] = Value::Null;
        v["keys"] = json!(n);
        out.push(v);
    }
    out
}

/// Suggestions shown at most, and keys named in each.
const MAX_SUGGESTIONS: usize = 20;
const MAX_SUGGESTED_KEYS: usize = 50;

/// Keys Google says belong to one project (the `consumer` of their last 429 or 403) that the
/// config puts in several (a key without a project is one of its own): each such group, with
/// a suggestion to give its keys one project, so that its limits count them together. Most
/// keys first; gemgate never regroups keys on its own.
fn suggestions(pool: &crate::keys::KeyPool) -> Vec<Value> {
    let mut by_consumer: std::collections::BTreeMap<String, Vec<&Key>> = Default::default();
    for key in pool.keys() {
        if let Some(consumer) = key.state.detail().consumer {
            by_consumer.entry(consumer).or_default().push(key);
        }
    }
    let mut found: Vec<(String, Vec<&Key>)> = by_consumer
        .into_iter()
        .filter(|(_, keys)| {
            let first = keys[0].spec.project.as_deref();
            first.is_none() || keys.iter().any(|k| k.spec.project.as_deref() != first)
        })
        .filter(|(_, keys)| keys.len() > 1)
        .collect();
    found.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
    let named: std::collections::HashSet<&str> = found
        .iter()
        .flat_map(|(_, keys)| keys.iter().map(|k| k.spec.id.as_str()))
        .collect();
    let mut out: Vec<Value> = found
        .iter()
        .take(MAX_SUGGESTIONS)
        .map(|(consumer, keys)| suggestion(consumer, keys))
        .collect();
    let room = MAX_SUGGESTIONS.saturating_sub(out.len());
    out.extend(quota_twins(pool, &named).into_iter().take(room));
    out
}

/// Keys the config keeps apart whose cooldowns come from one per-project quota ending within a
/// second of each other: Google answered them as one project (identical 429s at once), though
/// it did not name the project. Keys already suggested by name (`named`) are left out.
fn quota_twins(pool: &crate::keys::KeyPool, named: &std::collections::HashSet<&str>) -> Vec<Value> {
    let now = now_ms();
    // (model, quota id) → (end of the cooldown, key), for keys cooling alone.
    let mut by_quota: std::collections::BTreeMap<(String, String), Vec<(u64, &Key)>> =
        Default::default();
    for key in pool
        .keys()
        .iter()
        .filter(|k| !named.contains(k.spec.id.as_str()))
    {
        for c in key.state.cooldowns(now) {
            if c.scope == "key_model" && c.quota.contains("PerProject") {
                let at = (c.model.to_string(), c.quota.to_string());
                by_quota.entry(at).or_default().push((c.until_ms, key));
            }
        }
    }
    let mut twins = Vec::new();
    for ((model, quota), mut ends) in by_quota {
        ends.sort_by_key(|(until, _)| *until);
        // Runs of ends less than a second apart.
        let mut runs: Vec<Vec<&Key>> = Vec::new();
        let mut last_end = None;
        for (until, key) in ends {
            match (runs.last_mut(), last_end) {
                (Some(run), Some(last)) if until - last <= 1_000 => run.push(key),
                _ => runs.push(vec![key]),
            }
            last_end = Some(until);
        }
        // Only keys the config keeps apart (since grouped, they need no suggestion).
        let apart = |keys: &Vec<&Key>| {
            let mut projects: Vec<&str> = keys
                .iter()
                .map(|k| k.spec.project.as_deref().unwrap_or(&k.spec.id))
                .collect();
            projects.sort_unstable();
            projects.dedup();
            projects.len() > 1
        };
        for keys in runs.into_iter().filter(apart) {
            let message = format!(
                "{} keys answered identical per-project 429s ({quota} for {model}) within a \
                 second: Google counts them as one Cloud project; give them one project so that \
                 its limits count them together",
                keys.len()
            );
            twins.push(json!({
                "consumer": null,
                "quota_id": quota,
                "model": model,
                "keys": keys.iter().take(MAX_SUGGESTED_KEYS).map(|k| k.spec.id.as_str()).collect::<Vec<_>>(),
                "total": keys.len(),
                "project": null,
                "message": message,
            }));
        }
    }
    twins
}

/// One suggestion: the keys Google counts in project `consumer`, and the project to give them
/// (the one most of them have, else the consumer's name).
fn suggestion(consumer: &str, keys: &[&Key]) -> Value {
    let mut named: std::collections::BTreeMap<&str, usize> = Default::default();
    for k in keys {
        if let Some(p) = k.spec.project.as_deref() {
            *named.entry(p).or_default() += 1;
        }
    }
    let alone = keys.iter().filter(|k| k.spec.project.is_none()).count();
    let projects = named.len() + alone;
    let project = named
        .iter()
        .max_by_key(|&(name, n)| (*n, std::cmp::Reverse(*name)))
        .map_or(consumer, |(name, _)| name);
    let without = match alone {
        0 => String::new(),
        1 => " (1 without a project)".to_owned(),
        n => format!(" ({n} without a project)"),
    };
    let message = format!(
        "{} keys answer for {consumer} but are in {projects} configured projects{without}: \
         give them one project (for example {project:?}) so that its limits count them together",
        keys.len()
    );
    json!({
        "consumer": consumer,
        "keys": keys.iter().take(MAX_SUGGESTED_KEYS).map(|k| k.spec.id.as_str()).collect::<Vec<_>>(),
        "total": keys.len(),
        "project": project,
        "message": message,
    })
}

pub(super) fn bad(m: impl Into<String>) -> GateError {
    GateError::new(400, m)
}

fn store_error(e: crate::store::StoreError) -> GateError {
    GateError::new(500, format!("the log store failed: {e}"))
}

fn row_name(row: (u64, u64)) -> String {
    format!("{}-{}", row.0, row.1)
}

/// A page of a log (filters: `from`, `to` (RFC 3339 or ms), `key`, `model`, `status`, `class`,
/// `limit`, `before` (the `next` of the previous page)), or one row.
pub(super) fn logs_json(
    store: &crate::store::Store,
    log: crate::store::logs::Log,
    row: Option<(u64, u64)>,
    query: &str,
) -> Result<Value, GateError> {
    use crate::store::logs;
    if let Some(row) = row {
        let r = logs::get(store.db(), log, row)
            .map_err(store_error)?
            .ok_or_else(|| GateError::new(404, format!("no log row {}", row_name(row))))?;
        return Ok(json!({ "row": row_name(row), "record": r }));
    }
    let param = |name: &str| auth::query_param(query, name).map(|v| v.into_owned());
    let time = |name: &str| -> Result<Option<u64>, GateError> {
        match param(name) {
            None => Ok(None),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .or_else(|| crate::clock::parse_rfc3339(&v))
                .map(Some)
                .ok_or_else(|| bad(format!("{name}: {v:?} is not a time (RFC 3339 or ms)"))),
        }
    };
    let q = logs::Query {
        from_ms: time("from")?,
        to_ms: time("to")?,
        key_id: param("key"),
        model: param("model"),
        status: match param("status") {
            None => None,
            Some(v) => Some(
                v.parse()
                    .map_err(|_| bad(format!("status: {v:?} is not a number")))?,
            ),
        },
        class: param("class"),
        limit: param("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(PER_PAGE),
        before: match param("before") {
            None => None,
            Some(v) => Some(super::parse_row(&v).ok_or_else(|| bad("before: not a row name"))?),
        },
    };
    let (rows, next) = logs::query(store.db(), log, &q).map_err(store_error)?;
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|(row, r)| json!({ "row": row_name(row), "time": rfc3339(r.ts_ms), "record": r }))
        .collect();
    Ok(json!({ "rows": rows, "next": next.map(row_name) }))
}

/// Deletes the rows named in `{"rows": [...]}`, or with `?all=true` every row.
fn delete_logs(
    store: &crate::store::Store,
    log: crate::store::logs::Log,
    query: &str,
    body: &[u8],
) -> Result<Value, GateError> {
    let all = auth::query_param(query, "all").is_some_and(|v| v == "true");
    let rows: Vec<(u64, u64)> = if body.is_empty() {
        Vec::new()
    } else {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
        v.get("rows")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("name the rows to delete in {\"rows\": [...]}, or use ?all=true"))?
            .iter()
            .map(|r| {
                r.as_str()
                    .and_then(super::parse_row)
                    .ok_or_else(|| bad(format!("{r} is not a row name")))
            })
            .collect::<Result<_, _>>()?
    };
    if !all && rows.is_empty() {
        return Err(bad(
            "name the rows to delete in {\"rows\": [...]}, or use ?all=true",
        ));
    }
    let before = all.then_some(u64::MAX);
    let deleted =
        crate::store::logs::delete(store.db(), log, before, &rows).map_err(store_error)?;
    tracing::info!(?log, deleted, "admin: log rows deleted");
    Ok(json!({ "deleted": deleted }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::quota::QuotaLimits;
    use crate::config::{KeySpec, Secret, stable_id};
    use crate::keys::taxonomy::{ErrorClass, Quota, Scope};
    use crate::keys::{KeyPool, KeyRegistry};

    /// Keys without a project that Google answers with identical per-project 429s within a
    /// second are suggested as one project, even when Google names none; one a minute later
    /// is not.
    #[test]
    fn identical_project_429s_at_once_suggest_one_project() {
        let specs: Vec<KeySpec> = (0..3)
            .map(|i| KeySpec {
                id: stable_id("k", &format!("twin-{i}")),
                secret: Secret::new(format!("twin-{i}")),
                label: format!("twin-{i}"),
                tags: vec![],
                weight: 1,
                source: Default::default(),
                project: None,
                tier: None,
                vertex: false,
            })
            .collect();
        let pool = KeyPool::new(&specs, &KeyRegistry::default(), 3, &QuotaLimits::default());
        let quota = Quota {
            scope: Scope::ProjectModel,
            id: "GenerateRequestsPerMinutePerProjectPerModel-FreeTier".into(),
            consumer: None,
        };
        let now = now_ms();
        let limited = |retry_s: u64| ErrorClass::RateLimited {
            retry_after: std::time::Duration::from_secs(retry_s),
        };
        pool.record_failure_of(0, "m", limited(40), "", now, &quota);
        pool.record_failure_of(1, "m", limited(40), "", now + 300, &quota);
        pool.record_failure_of(2, "m", limited(100), "", now, &quota);
        let found = suggestions(&pool);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0]["keys"], json!([specs[0].id, specs[1].id]));
        assert!(
            found[0]["message"]
                .as_str()
                .unwrap()
                .contains("within a second")
        );
    }
}

//! The admin web pages under `/admin`: server-side Handlebars pages over the same data the
//! admin JSON API serves. Actions on the pages call that API (with the session's CSRF token);
//! the login, logout and settings forms post here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use pingora::protocols::http::ServerSession;
use serde_json::{Value, json};

use super::Page;
use super::api::{StateCounts, keys_json};
use crate::app::Generation;
use crate::app::session::{self, Admin};
use crate::clock::{now_ms, rfc3339};
use crate::config::settings::{self, Saved};
use crate::http::auth::{self, form_decode};
use crate::http::peer::Peer;
use crate::http::reply::GateError;
use crate::proxy::{Gateway, encode_query_value, read_body};

/// A refused settings form: what was typed, and the errors by setting path.
type Refused<'a> = (&'a BTreeMap<String, String>, &'a [(String, String)]);

/// Largest form body (read only once the request is known to be the admin's).
const FORM_LIMIT: u64 = 256 * 1024;
/// Largest login form: it is read before anything is known of its sender.
const LOGIN_FORM_LIMIT: u64 = 4 * 1024;
/// A failed login answers no sooner than this.
const FAILED_LOGIN_DELAY: Duration = Duration::from_millis(400);

/// A page's answer.
pub(crate) struct PageAnswer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Bytes,
    pub headers: Vec<(header::HeaderName, String)>,
}

impl PageAnswer {
    fn html(status: u16, body: String) -> PageAnswer {
        PageAnswer {
            status,
            content_type: "text/html; charset=utf-8",
            body: Bytes::from(body),
            headers: Vec::new(),
        }
    }

    fn redirect(status: u16, to: &str) -> PageAnswer {
        PageAnswer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from(format!("see {to}\n")),
            headers: vec![(header::LOCATION, to.to_owned())],
        }
    }

    fn with(mut self, name: header::HeaderName, value: String) -> PageAnswer {
        self.headers.push((name, value));
        self
    }
}

/// The security headers every page carries: nothing inline runs, nothing frames the page.
pub(crate) const PAGE_HEADERS: &[(&str, &str)] = &[
    (
        "content-security-policy",
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
         frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    // Not `no-referrer`: with it, browsers send `Origin: null` on the pages' own form posts.
    ("referrer-policy", "same-origin"),
    ("cache-control", "no-store"),
];

/// A form body (`application/x-www-form-urlencoded`).
fn parse_form(body: &[u8]) -> BTreeMap<String, String> {
    let text = String::from_utf8_lossy(body);
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(k).into_owned(), form_decode(v).into_owned())
        })
        .collect()
}

/// Where a login may send the operator next: an admin page of this gateway, nothing else.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with("/admin") && !n.contains("//") && !n.contains('\\') => n,
        _ => "/admin",
    }
}

fn uptime(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60) {
        (0, 0, m) => format!("{m} min"),
        (0, h, m) => format!("{h} h {m} min"),
        (d, h, _) => format!("{d} d {h} h"),
    }
}

/// Whether `method` is one that this page answers.
fn page_allows(page: &Page, method: &http::Method) -> bool {
    match page {
        Page::Settings => matches!(*method, http::Method::GET | http::Method::POST),
        Page::Logout => method == http::Method::POST,
        _ => method == http::Method::GET,
    }
}

impl Gateway {
    /// Answers an admin page: assets and the login to anyone, the rest to the admin alone.
    pub(crate) async fn page(
        &self,
        generation: &Arc<Generation>,
        s: &mut ServerSession,
        page: Page,
        peer: &Peer,
    ) -> PageAnswer {
        let method = s.req_header().method.clone();
        let path = s.req_header().uri.path().to_owned();
        let admin_token = generation.config.auth_token.as_ref().map(|t| t.expose());
        match page {
            Page::Static(name) => return self.asset(generation, name),
            Page::Moved(to) => return PageAnswer::redirect(301, to),
            Page::Login => return self.login(generation, s, admin_token, peer).await,
            _ => {}
        }
        let admin = match self.page_admin(generation, s, peer, admin_token) {
            Ok(admin) => admin,
            Err(answer) => return answer,
        };
        let form = match self.admin_form(generation, s, &admin).await {
            Ok(form) => form,
            Err(answer) => return answer,
        };
        if !page_allows(&page, &method) {
            return self.error_page(
                generation,
                405,
                &format!("{method} is not allowed on {path}"),
                Some(&admin),
            );
        }
        let query = s.req_header().uri.query().unwrap_or_default().to_owned();
        match page {
            Page::Logout => self.logout(&admin, peer),
            Page::Settings if method == http::Method::POST => {
                self.save_settings(generation, &form, &admin).await
            }
            page => self.view(generation, page, &query, &admin),
        }
    }

    /// `/admin/static/…`: a built-in or template-dir asset.
    fn asset(&self, generation: &Generation, name: &str) -> PageAnswer {
        match generation.templates.asset(name) {
            Some((content_type, text)) => PageAnswer {
                status: 200,
                content_type,
                body: Bytes::from(text.to_owned()),
                headers: vec![(header::CACHE_CONTROL, "no-cache".into())],
            },
            None => self.error_page(generation, 404, &format!("no {name}"), None),
        }
    }

    /// Who asks for a page, or the answer for a stranger (a `GET` is sent to the login).
    fn page_admin(
        &self,
        generation: &Generation,
        s: &ServerSession,
        peer: &Peer,
        admin_token: Option<&str>,
    ) -> Result<Admin, PageAnswer> {
        let who = session::identify(
            &*self.state.lasting.shared,
            s.req_header(),
            peer,
            admin_token,
        );
        match who {
            Ok(a) => Ok(a),
            Err(e) if e.status == 401 && s.req_header().method == http::Method::GET => {
                let next = s
                    .req_header()
                    .uri
                    .path_and_query()
                    .map_or("/admin", |p| p.as_str());
                Err(PageAnswer::redirect(
                    303,
                    &format!("/admin/login?next={}", encode_query_value(next)),
                ))
            }
            Err(e) => Err(self.error_page(generation, e.status, &e.message, None)),
        }
    }

    /// The admin's form (empty but for a `POST`), once its CSRF token is checked.
    async fn admin_form(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        admin: &Admin,
    ) -> Result<BTreeMap<String, String>, PageAnswer> {
        // The form is read only now that the request is known to be the admin's.
        let form = if s.req_header().method == http::Method::POST {
            match read_body(s, FORM_LIMIT).await {
                Ok(b) => parse_form(&b),
                Err(_) => {
                    return Err(self.error_page(generation, 413, "the form is too large", None));
                }
            }
        } else {
            BTreeMap::new()
        };
        if let Err(e) = admin.check_csrf(s.req_header(), form.get("_csrf").map(String::as_str)) {
            return Err(self.error_page(generation, e.status, &e.message, None));
        }
        Ok(form)
    }

    /// `POST /admin/logout`: closes the session and forgets its cookie.
    fn logout(&self, admin: &Admin, peer: &Peer) -> PageAnswer {
        if let Admin::Session { id, .. } = admin {
            self.state.lasting.shared.close_session(id);
        }
        PageAnswer::redirect(303, "/admin/login")
            .with(header::SET_COOKIE, session::set_cookie(None, peer.https))
    }

    /// A page that only shows something (`GET`), rendered in the layout.
    fn view(&self, generation: &Generation, page: Page, query: &str, admin: &Admin) -> PageAnswer {
        let result = match page {
            Page::Dashboard => Ok(self.dashboard(generation)),
            Page::Keys => Ok(self.keys_page(generation, query)),
            Page::Settings => self
                .settings_page(query, None)
                .map(|d| ("settings", "Settings", d)),
            Page::Logs => self.logs_page(query),
            Page::LogRow { log, row } => self.log_row_page(log, row),
            Page::Plugins => Ok(self.plugins_page(generation)),
            Page::Login | Page::Logout | Page::Static(_) | Page::Moved(_) => {
                unreachable!("answered above")
            }
        };
        match result {
            Ok((template, title, data)) => {
                self.render(generation, 200, template, title, data, admin)
            }
            Err(e) => self.error_page(generation, e.status, &e.message, Some(admin)),
        }
    }

    /// Renders `template` with `data` inside the layout.
    fn render(
        &self,
        generation: &Generation,
        status: u16,
        template: &str,
        title: &str,
        mut data: Value,
        admin: &Admin,
    ) -> PageAnswer {
        data["csrf"] = json!(admin.csrf());
        let body = match generation.templates.render(template, &data) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(template, "admin page template failed: {e}");
                return PageAnswer::html(
                    500,
                    format!(
                        "<!doctype html><title>gemgate</title><p>the {template} template failed: {}</p>",
                        handlebars::html_escape(&e)
                    ),
                );
            }
        };
        let frame = json!({
            "title": title,
            "body": body,
            "nav": template,
            "csrf": admin.csrf(),
            "session": matches!(admin, Admin::Session { .. }),
            "version": env!("CARGO_PKG_VERSION"),
            "generation": generation.id,
        });
        match generation.templates.render("layout", &frame) {
            Ok(html) => PageAnswer::html(status, html),
            Err(e) => PageAnswer::html(
                500,
                format!(
                    "<!doctype html><title>gemgate</title><p>the layout template failed: {}</p>",
                    handlebars::html_escape(&e)
                ),
            ),
        }
    }

    fn error_page(
        &self,
        generation: &Generation,
        status: u16,
        message: &str,
        admin: Option<&Admin>,
    ) -> PageAnswer {
        let anonymous = Admin::Bearer;
        let data = json!({ "status": status, "message": message });
        self.render(
            generation,
            status,
            "error",
            "Error",
            data,
            admin.unwrap_or(&anonymous),
        )
    }

    async fn login(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        admin_token: Option<&str>,
        peer: &Peer,
    ) -> PageAnswer {
        let anonymous = Admin::Bearer;
        let query = s.req_header().uri.query().unwrap_or_default().to_owned();
        let next = auth::query_param(&query, "next").map(|n| n.into_owned());
        let Some(admin_token) = admin_token else {
            let data = json!({ "off": true, "next": "", "error": null });
            return self.render(generation, 403, "login", "Log in", data, &anonymous);
        };
        match s.req_header().method {
            http::Method::GET => {
                let data =
                    json!({ "off": false, "next": safe_next(next.as_deref()), "error": null });
                self.render(generation, 200, "login", "Log in", data, &anonymous)
            }
            http::Method::POST => {
                let form = match read_body(s, LOGIN_FORM_LIMIT).await {
                    Ok(b) => parse_form(&b),
                    Err(_) => {
                        return self.error_page(generation, 413, "the form is too large", None);
                    }
                };
                let next = safe_next(form.get("next").map(String::as_str)).to_owned();
                // `auth_token` is the field name of gemini-balance's login form.
                let presented = form
                    .get("token")
                    .or_else(|| form.get("auth_token"))
                    .map(String::as_str)
                    .unwrap_or_default();
                let shared = &*self.state.lasting.shared;
                match session::login(shared, presented, admin_token, peer.ip) {
                    Ok(()) => {
                        let (id, _) = shared.open_session(admin_token);
                        tracing::info!(client = ?peer.ip, "admin: logged in");
                        PageAnswer::redirect(303, &next).with(
                            header::SET_COOKIE,
                            session::set_cookie(Some(&id), peer.https),
                        )
                    }
                    Err(e) if e.status == 429 => {
                        // No faster than a plain wrong token: a throttled guess costs as much.
                        tokio::time::sleep(FAILED_LOGIN_DELAY).await;
                        let secs = e.retry_after_s.unwrap_or(1);
                        let data = json!({ "off": false, "next": next,
                            "error": format!("Too many failed logins: try again in {secs} s.") });
                        self.render(generation, 429, "login", "Log in", data, &anonymous)
                            .with(header::RETRY_AFTER, secs.to_string())
                    }
                    Err(_) => {
                        tokio::time::sleep(FAILED_LOGIN_DELAY).await;
                        let data = json!({ "off": false, "next": next,
                            "error": "That is not the admin token (AUTH_TOKEN)." });
                        self.render(generation, 401, "login", "Log in", data, &anonymous)
                    }
                }
            }
            ref m => self.error_page(
                generation,
                405,
                &format!("{m} is not allowed on /admin/login"),
                None,
            ),
        }
    }

    fn dashboard(&self, generation: &Generation) -> (&'static str, &'static str, Value) {
        let now = now_ms();
        let metrics = &self.state.lasting.metrics;
        let hour = metrics.summary(now, 60, 60);
        let day = metrics.summary(now, 1440, 48);
        let mut counts = StateCounts::default();
        for key in generation.pool.keys() {
            counts.add(key.state_name(now));
        }
        let mut pool = counts.json();
        pool["total"] = json!(generation.pool.keys().len());
        let charts = json!({
            "hour_requests": bar_chart(&hour.points, "requests per minute"),
            "day_requests": bar_chart(&day.points, "requests per 30 minutes"),
            "hour_latency": latency_chart(&hour.points),
            "day_latency": latency_chart(&day.points),
        });
        let data = json!({
            "hour": hour, "day": day, "charts": charts,
            "pool": pool,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime": uptime(self.state.started.elapsed()),
            "generation": generation.id,
            "dropped": self.state.lasting.logs.dropped(),
            "fleet": self.state.lasting.shared.fleet_status(),
            "storm": super::api::storm_json(&self.state.lasting.storms),
        });
        ("dashboard", "Dashboard", data)
    }

    fn keys_page(
        &self,
        generation: &Generation,
        query: &str,
    ) -> (&'static str, &'static str, Value) {
        let mut data = keys_json(
            generation,
            query,
            &self.usage_today(),
            &self.state.lasting.storms,
        );
        let param = |n: &str| {
            auth::query_param(query, n)
                .map(|v| v.into_owned())
                .unwrap_or_default()
        };
        let (q, state, tag) = (param("q"), param("state"), param("tag"));
        // `None`: every project; `Some("")`: the keys without one.
        let project = auth::query_param(query, "project").map(|p| p.into_owned());
        let link = |project: Option<&str>, p: u64| {
            let mut link = format!(
                "/admin/keys?q={}&state={}&tag={}",
                encode_query_value(&q),
                encode_query_value(&state),
                encode_query_value(&tag)
            );
            if let Some(name) = project {
                let _ = write!(link, "&project={}", encode_query_value(name));
            }
            let _ = write!(link, "&page={p}");
            link
        };
        let page = data["page"].as_u64().unwrap_or(1);
        let pages = data["pages"].as_u64().unwrap_or(1);
        data["filter"] = json!({
            "q": q, "state": state, "tag": tag,
            "by_project": project.is_some(),
            "project": project,
            "every_project": link(None, 1),
        });
        data["prev"] = json!((page > 1).then(|| link(project.as_deref(), page - 1)));
        data["next"] = json!((page < pages).then(|| link(project.as_deref(), page + 1)));
        let projects = data["projects"].as_array_mut().map(std::mem::take);
        let (shown, more) = shown_projects(projects.unwrap_or_default(), project.as_deref());
        data["projects"] = json!(
            shown
                .into_iter()
                .map(|mut p| {
                    p["link"] = json!(link(Some(p["name"].as_str().unwrap_or("")), 1));
                    p
                })
                .collect::<Vec<_>>()
        );
        data["projects_more"] = json!(more);
        for k in data["keys"].as_array_mut().into_iter().flatten() {
            k["cooling_text"] = json!(cooling_text(k));
        }
        ("keys", "Keys", data)
    }

    fn settings_page(&self, query: &str, refused: Option<Refused<'_>>) -> Result<Value, GateError> {
        let path = &self.state.source.path;
        let text =
            crate::config::edit::read_or_defaults(path).map_err(|e| GateError::new(500, e))?;
        // In a fleet, the file with the fleet's edits over it: what this instance serves.
        let text = self
            .state
            .source
            .fleet_edits
            .load()
            .apply(&text)
            .map_err(|e| GateError::new(500, e))?;
        let vars = self.state.source.vars();
        let mut groups = settings::describe(&text, &vars, &settings::in_process_env)
            .map_err(|e| GateError::new(500, e.to_string()))?;
        let from_fleet = self.state.lasting.shared.fleet_settings();
        for s in groups.iter_mut().flat_map(|g| g.settings.iter_mut()) {
            if matches!(s.source, "file" | "default") && from_fleet.iter().any(|p| p == s.path) {
                s.source = "fleet";
            }
        }
        let mut general = Vec::new();
        if let Some((form, errors)) = refused {
            for (field, message) in errors {
                let found = groups
                    .iter_mut()
                    .flat_map(|g| g.settings.iter_mut())
                    .find(|s| s.path == field);
                match found {
                    Some(s) => s.error = Some(message.clone()),
                    None => general.push(message.clone()),
                }
            }
            // Show what the operator typed, not what is saved.
            for s in groups.iter_mut().flat_map(|g| g.settings.iter_mut()) {
                if let Some(v) = form.get(s.path)
                    && !s.secret
                {
                    s.value = v.clone();
                }
            }
        }
        let saved = auth::query_param(query, "saved").map(|v| v.into_owned());
        Ok(json!({
            "groups": groups,
            "file": path.display().to_string(),
            "saved": saved,
            "errors": general,
            "refused": refused.is_some(),
        }))
    }

    async fn save_settings(
        &self,
        generation: &Generation,
        form: &BTreeMap<String, String>,
        admin: &Admin,
    ) -> PageAnswer {
        let vars = self.state.source.vars();
        let submitted = form.clone();
        // Read, changed and written as one edit: no other edit slips in between.
        let saved = self
            .edit_config(move |text| {
                Ok(
                    match settings::apply_form(text, &vars, &submitted, &settings::in_process_env) {
                        Saved::Changed(changed, new_text) => {
                            (Some(new_text), Saved::Changed(changed, String::new()))
                        }
                        other => (None, other),
                    },
                )
            })
            .await;
        let saved = match saved {
            Ok(s) => s,
            Err(e) => return self.error_page(generation, e.status, &e.message, Some(admin)),
        };
        match saved {
            Saved::Unchanged => PageAnswer::redirect(303, "/admin/settings?saved=nothing"),
            Saved::Changed(changed, _) => {
                tracing::info!(settings = ?changed, "admin: settings saved");
                let generation = self.state.current.load().id;
                PageAnswer::redirect(
                    303,
                    &format!(
                        "/admin/settings?saved={}&generation={generation}",
                        encode_query_value(&changed.join(","))
                    ),
                )
            }
            Saved::Refused(errors) => match self.settings_page("", Some((form, &errors))) {
                Ok(data) => self.render(generation, 400, "settings", "Settings", data, admin),
                Err(e) => self.error_page(generation, e.status, &e.message, Some(admin)),
            },
        }
    }

    fn logs_page(&self, query: &str) -> Result<(&'static str, &'static str, Value), GateError> {
        let store = self.log_store()?;
        let param = |n: &str| {
            auth::query_param(query, n)
                .map(|v| v.into_owned())
                .unwrap_or_default()
        };
        let log = crate::store::logs::Log::from_name(&param("log"))
            .unwrap_or(crate::store::logs::Log::Errors);
        let log_name = log.name();
        // Empty filters are no filters.
        let api_query: String = query
            .split('&')
            .filter(|p| p.split_once('=').is_some_and(|(_, v)| !v.is_empty()))
            .collect::<Vec<_>>()
            .join("&");
        let mut data = super::api::logs_json(&store, log, None, &api_query)?;
        let filters: Value = ["from", "to", "key", "model", "status", "class"]
            .iter()
            .map(|f| (f.to_string(), json!(param(f))))
            .collect::<serde_json::Map<_, _>>()
            .into();
        if let Some(next) = data["next"].as_str().map(str::to_owned) {
            let mut link = format!("/admin/logs?log={log_name}");
            for f in ["from", "to", "key", "model", "status", "class"] {
                let v = param(f);
                if !v.is_empty() {
                    let _ = write!(link, "&{f}={}", encode_query_value(&v));
                }
            }
            let _ = write!(link, "&before={next}");
            data["next_link"] = json!(link);
        } else {
            data["next_link"] = Value::Null;
        }
        data["log"] = json!(log_name);
        data["errors_log"] = json!(log_name == "errors");
        data["filters"] = filters;
        Ok(("logs", "Logs", data))
    }

    fn log_row_page(
        &self,
        log: crate::store::logs::Log,
        row: (u64, u64),
    ) -> Result<(&'static str, &'static str, Value), GateError> {
        let store = self.log_store()?;
        let mut data = super::api::logs_json(&store, log, Some(row), "")?;
        data["time"] = json!(rfc3339(row.0));
        data["log"] = json!(log.name());
        Ok(("log", "Log entry", data))
    }

    fn plugins_page(&self, generation: &Generation) -> (&'static str, &'static str, Value) {
        let mut data = self.reload_json();
        data["config"] = json!(self.state.source.path.display().to_string());
        // The files the editor opens: every plugin, then every test file.
        let policy = &generation.policy;
        let mut files: Vec<String> = policy.plugins.iter().map(|p| p.name.clone()).collect();
        files.sort();
        files.extend(
            crate::policy::testing::test_sources(policy.dir())
                .unwrap_or_default()
                .into_iter()
                .map(|t| t.name),
        );
        data["files"] = json!(files);
        data["editable"] = json!(policy.dir().is_some());
        data["fleet"] = json!(self.state.lasting.shared.fleet_status().is_some());
        data["templates_dir"] = json!(
            generation
                .templates
                .dir
                .as_ref()
                .map_or("built in".to_owned(), |d| d.display().to_string())
        );
        ("plugins", "Plugins", data)
    }
}

/// Projects the key page lists at most (the API lists every one).
const PAGE_PROJECTS: usize = 100;

/// The projects the key page lists (each with `here` when it is the one filtered on), and how
/// many more there are.
fn shown_projects(mut projects: Vec<Value>, filtered: Option<&str>) -> (Vec<Value>, usize) {
    for p in &mut projects {
        let name = p["name"].as_str().unwrap_or("");
        p["here"] = json!(filtered == Some(name));
    }
    let more = projects.len().saturating_sub(PAGE_PROJECTS);
    // The keys without a project come last: keep them in view.
    if more > 0 && projects.last().is_some_and(|p| p["name"].is_null()) {
        let unnamed = projects.pop();
        projects.truncate(PAGE_PROJECTS - 1);
        projects.extend(unnamed);
    } else {
        projects.truncate(PAGE_PROJECTS);
    }
    (projects, more)
}

/// A key's cooldowns in a line: `model until time (class)` (and the scope when it is wider than
/// the key's own), `; ` between.
fn cooling_text(key: &Value) -> String {
    key["cooldowns"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|c| {
                    let scope = match c["scope"].as_str().unwrap_or("") {
                        "" | "key_model" => "",
                        "project_model" => ", the project's quota",
                        "project" => ", the project's quota for every model",
                        "global" => ", a global back-off",
                        _ => ", wider than the key",
                    };
                    format!(
                        "{} until {} ({}{scope})",
                        c["model"].as_str().unwrap_or(""),
                        c["until"].as_str().unwrap_or(""),
                        c["class"].as_str().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

const CHART_W: f64 = 600.0;
const CHART_H: f64 = 120.0;

/// An SVG bar chart of requests per span, errors stacked in their own colour.
fn bar_chart(points: &[crate::store::metrics::Point], label: &str) -> String {
    let max = points.iter().map(|p| p.requests).max().unwrap_or(0).max(1) as f64;
    let w = CHART_W / points.len().max(1) as f64;
    let mut svg = format!(
        r#"<svg class="chart" viewBox="0 0 {CHART_W} {h}" role="img" aria-label="{label}"><text class="axis" x="2" y="10">{max}</text>"#,
        h = CHART_H + 14.0,
        max = max as u64,
    );
    for (i, p) in points.iter().enumerate() {
        let x = i as f64 * w;
        let ok_h = (p.requests - p.errors) as f64 / max * CHART_H;
        let err_h = p.errors as f64 / max * CHART_H;
        let _ = write!(
            svg,
            r#"<rect class="ok" x="{x:.1}" y="{:.1}" width="{:.1}" height="{ok_h:.1}"><title>{} requests, {} errors</title></rect>"#,
            CHART_H - ok_h,
            (w - 1.0).max(0.5),
            p.requests,
            p.errors
        );
        if p.errors > 0 {
            let _ = write!(
                svg,
                r#"<rect class="err" x="{x:.1}" y="{:.1}" width="{:.1}" height="{err_h:.1}"/>"#,
                CHART_H - ok_h - err_h,
                (w - 1.0).max(0.5)
            );
        }
    }
    let _ = write!(
        svg,
        r#"<text class="axis" x="2" y="{}">{}</text><text class="axis" x="{}" y="{}" text-anchor="end">now</text></svg>"#,
        CHART_H + 12.0,
        points
            .first()
            .map_or(String::new(), |p| rfc3339(p.at_ms)[11..16].to_owned()),
        CHART_W - 2.0,
        CHART_H + 12.0
    );
    svg
}

/// An SVG line chart of p50 and p99 latency per span.
fn latency_chart(points: &[crate::store::metrics::Point]) -> String {
    let max = points.iter().map(|p| p.p99_ms).fold(0.0, f64::max).max(1.0);
    let step = CHART_W / points.len().saturating_sub(1).max(1) as f64;
    let line = |f: &dyn Fn(&crate::store::metrics::Point) -> f64| {
        points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "{:.1},{:.1}",
                    i as f64 * step,
                    CHART_H - f(p) / max * CHART_H
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        r#"<svg class="chart" viewBox="0 0 {CHART_W} {h}" role="img" aria-label="latency"><text class="axis" x="2" y="10">{max:.1} ms</text><polyline class="p99" points="{}"/><polyline class="p50" points="{}"/><text class="axis" x="{}" y="{}" text-anchor="end">p50 (dark), p99 (light)</text></svg>"#,
        line(&|p| p.p99_ms),
        line(&|p| p.p50_ms),
        CHART_W - 2.0,
        CHART_H + 12.0,
        h = CHART_H + 14.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_and_next_stays_on_the_admin_pages() {
        let f = parse_form(b"token=a%2Bb+c&next=%2Fadmin%2Fkeys&empty=");
        assert_eq!(f["token"], "a+b c");
        assert_eq!(f["next"], "/admin/keys");
        assert_eq!(f["empty"], "");
        assert_eq!(form_decode("100%"), "100%");
        assert_eq!(safe_next(Some("/admin/keys?page=2")), "/admin/keys?page=2");
        assert_eq!(safe_next(Some("//evil.example/admin")), "/admin");
        assert_eq!(safe_next(Some("https://evil.example")), "/admin");
        assert_eq!(safe_next(None), "/admin");
    }

    #[test]
    fn charts_are_svg_of_every_point() {
        let points: Vec<crate::store::metrics::Point> = (0..4)
            .map(|i| crate::store::metrics::Point {
                at_ms: 1_800_000_000_000,
                requests: i,
                errors: i / 2,
                p50_ms: 1.0,
                p99_ms: 2.0,
            })
            .collect();
        let svg = bar_chart(&points, "x");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("class=\"ok\"").count(), 4);
        assert_eq!(svg.matches("class=\"err\"").count(), 2);
        assert!(latency_chart(&points).contains("polyline"));
    }
}

//! Routing: which gemgate route a request path names. The calls it finds are the handlers'
//! own types: `proxy::calls` for the proxied APIs, `admin` for the admin API and pages.

use crate::admin::{AdminCall, KeyAction, Page, parse_row};
use crate::http::reply::Protocol;
use crate::proxy::calls::{AnthropicCall, NativeCall, OpenAiCall};

/// The protocol a path belongs to, for errors answered before a request is routed.
pub fn protocol_of(path: &str) -> Protocol {
    match route(path, false) {
        Route::Native(_) | Route::Files(_) | Route::Upload | Route::Download(_) => Protocol::Gemini,
        Route::Anthropic(_) => Protocol::Anthropic,
        _ if path.starts_with("/openai/") => Protocol::GoogleOpenAi,
        _ if path.starts_with("/v1/") || path.starts_with("/hf/v1/") => Protocol::OpenAi,
        _ => Protocol::Gemini,
    }
}

/// What a request asks for, by its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/health`: liveness (the process serves).
    Health,
    /// `/ready`: readiness (this instance should get traffic).
    Ready,
    /// `/metrics`: the Prometheus exposition (the admin token, unless public).
    Metrics,
    Admin(AdminCall),
    OpenAi(OpenAiCall),
    /// `POST /v1/responses` (`None`), `GET` or `DELETE /v1/responses/{id}`: OpenAI's
    /// Responses API.
    Responses(Option<String>),
    /// `POST /v1/messages` and `/v1/messages/count_tokens`: Anthropic's Messages API.
    Anthropic(AnthropicCall),
    /// `/openai/v1/{rest}`: Google's OpenAI-compatible API, passed through.
    GoogleOpenAi(String),
    /// `POST /upload/v1beta/files`: the Files API's resumable upload.
    Upload,
    /// `GET /v1beta/files` (`None`), `GET` or `DELETE /v1beta/files/{id}`.
    Files(Option<String>),
    /// `GET` or `POST /v1beta/cachedContents` (`None`), `GET`, `PATCH` or `DELETE
    /// /v1beta/cachedContents/{id}`.
    Caches(Option<String>),
    /// `POST /v1beta/interactions` (`None`); `GET` or `DELETE /v1beta/interactions/{id}`,
    /// `POST …/{id}/cancel`.
    Interactions(Option<String>, Verb),
    /// `GET /v1beta/batches` (`None`); `GET` or `DELETE /v1beta/batches/{id}`, `POST
    /// …/{id}:cancel`. (A batch is made by `models/{model}:batchGenerateContent`.)
    Batches(Option<String>, Verb),
    /// `GET /download/v1beta/files/{id}:download` or `/v1beta/files/{id}:download`: a file's
    /// bytes (a batch's results).
    Download(String),
    /// `POST /v1alpha/auth_tokens`: an ephemeral token for the Live API.
    AuthTokens,
    /// The Live API's WebSocket, `/ws/google.ai.generativelanguage.{version}.GenerativeService.
    /// BidiGenerateContent[Constrained]`.
    Live {
        version: String,
        constrained: bool,
    },
    Native(NativeCall),
    Page(Page),
    /// A path gemgate does not serve.
    NotFound,
    /// A path gemgate serves, but with a part it refuses: answered 400 with this reason.
    Invalid(&'static str),
}

pub use crate::proxy::calls::{MAX_NAME, Verb};

/// Maps a request path (without the query) to a route.
///
/// `/v1/models…` is both Google's stable API and OpenAI's: a `:action` is Google's, and so is a
/// model list or lookup sent with a Google-style credential (`goog_credential`: an
/// `x-goog-api-key` header or a `key=` parameter); otherwise it is OpenAI's.
pub fn route(path: &str, goog_credential: bool) -> Route {
    match path {
        "/health" => return Route::Health,
        "/ready" => return Route::Ready,
        "/metrics" => return Route::Metrics,
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/v1/")
        && is_google_v1(rest, goog_credential)
    {
        return native_route(rest);
    }
    if let Some(rest) = path.strip_prefix("/gemini/v1/") {
        return native_route(rest);
    }
    if is_upload(path) {
        return Route::Upload;
    }
    if let Some(route) = live_route(path) {
        return route;
    }
    if let Some(rest) = [
        "/download/v1beta/",
        "/gemini/download/v1beta/",
        "/download/v1/",
        "/gemini/download/v1/",
    ]
    .iter()
    .find_map(|p| path.strip_prefix(p))
    {
        return match native_route(rest) {
            route @ Route::Download(_) => route,
            _ => Route::NotFound,
        };
    }
    if let Some(rest) = path
        .strip_prefix("/v1alpha/")
        .or_else(|| path.strip_prefix("/gemini/v1alpha/"))
    {
        return native_route(rest);
    }
    if let Some(route) = openai_route(path) {
        return route;
    }
    if let Some(rest) = path.strip_prefix("/openai/v1/") {
        return google_openai_route(rest);
    }
    if let Some(page) = page_route(path) {
        return Route::Page(page);
    }
    if let Some(call) = path.strip_prefix("/admin/api/") {
        return admin_route(call);
    }
    let rest = path.strip_prefix("/gemini").unwrap_or(path);
    match rest.strip_prefix("/v1beta/") {
        Some(rest) => native_route(rest),
        None => Route::NotFound,
    }
}

/// Whether a `/v1/` path (given without the prefix) is Google's stable API rather than OpenAI's.
fn is_google_v1(rest: &str, goog_credential: bool) -> bool {
    let models = rest.trim_end_matches('/');
    models.starts_with("models/") && (models.contains(':') || goog_credential)
        || models == "models" && goog_credential
        || models == "files"
        || models.starts_with("files/")
        || ["cachedContents", "interactions", "batches", "auth_tokens"]
            .iter()
            .any(|c| {
                models
                    .strip_prefix(c)
                    .is_some_and(|r| r.is_empty() || r.starts_with('/'))
            })
}

/// The Live API's WebSocket paths (`/ws/google.ai.generativelanguage.v1beta.GenerativeService.
/// BidiGenerateContent`, its `v1alpha` and `v1` twins, and `…Constrained` for ephemeral
/// tokens), also under `/gemini`. The SDK joins its base URL and the path with a `/` even when
/// the base URL ends in one: `//ws/…` is the same path.
fn live_route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/gemini").unwrap_or(path);
    let rest = rest
        .trim_start_matches('/')
        .strip_prefix("ws/google.ai.generativelanguage.")?;
    let (version, method) = rest.split_once(".GenerativeService.")?;
    let constrained = match method {
        "BidiGenerateContent" => false,
        "BidiGenerateContentConstrained" => true,
        _ => return Some(Route::NotFound),
    };
    if !matches!(version, "v1" | "v1beta" | "v1alpha") {
        return Some(Route::NotFound);
    }
    Some(Route::Live {
        version: version.to_owned(),
        constrained,
    })
}

/// An id of a resource in a path: letters, digits, `-` and `_`, at most [`MAX_NAME`] bytes.
fn resource_id(id: &str) -> Option<String> {
    let valid = !id.is_empty()
        && id.len() <= MAX_NAME
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then(|| id.to_owned())
}

/// `interactions[/{id}[/cancel]]`, `batches[/{id}[:cancel]]` or `files/{id}:download`, from
/// after the version.
fn owned_route(rest: &str) -> Option<Route> {
    if let Some(id) = rest
        .strip_prefix("files/")
        .and_then(|r| r.strip_suffix(":download"))
    {
        return Some(resource_id(id).map_or(Route::NotFound, Route::Download));
    }
    type Make = fn(Option<String>, Verb) -> Route;
    let kinds: [(&str, char, Make); 2] = [
        ("interactions", '/', Route::Interactions),
        ("batches", ':', Route::Batches),
    ];
    for (name, separator, make) in kinds {
        let Some(tail) = rest.strip_prefix(name) else {
            continue;
        };
        if tail.is_empty() {
            return Some(make(None, Verb::None));
        }
        let one = tail.strip_prefix('/')?;
        let (id, verb) = match one.split_once(separator) {
            None => (one, Verb::None),
            Some((id, "cancel")) => (id, Verb::Cancel),
            Some(_) => return Some(Route::NotFound),
        };
        return Some(resource_id(id).map_or(Route::NotFound, |id| make(Some(id), verb)));
    }
    None
}

/// Whether the path is the Files API's upload.
fn is_upload(path: &str) -> bool {
    matches!(
        path.trim_end_matches('/'),
        "/upload/v1beta/files"
            | "/gemini/upload/v1beta/files"
            | "/upload/v1/files"
            | "/gemini/upload/v1/files"
    )
}

/// The OpenAI-compatible route of a `/v1/` or `/hf/v1/` path (`None` for other paths).
fn openai_route(path: &str) -> Option<Route> {
    for prefix in ["/v1/", "/hf/v1/"] {
        if let Some(rest) = path.strip_prefix(prefix) {
            return Some(match rest.trim_end_matches('/') {
                "chat/completions" => Route::OpenAi(OpenAiCall::Chat),
                "models" => Route::OpenAi(OpenAiCall::Models),
                "embeddings" => Route::OpenAi(OpenAiCall::Embeddings),
                "images/generations" => Route::OpenAi(OpenAiCall::Images),
                "audio/speech" => Route::OpenAi(OpenAiCall::Speech),
                "messages" => Route::Anthropic(AnthropicCall::Messages),
                "responses" => Route::Responses(None),
                one if one.starts_with("responses/") => resource_id(&one["responses/".len()..])
                    .map_or(Route::NotFound, |id| Route::Responses(Some(id))),
                "messages/count_tokens" => Route::Anthropic(AnthropicCall::CountTokens),
                _ => Route::NotFound,
            });
        }
    }
    None
}

/// A path of Google's OpenAI-compatible API, from after `/openai/v1/`: passed through when
/// it is a plain relative path. Its files and batches are not: they live in the project of the
/// key that made them, which only the native APIs keep track of (passed through, they would
/// reach whatever another client left in a random key's project).
fn google_openai_route(rest: &str) -> Route {
    let first = rest.split(['/', ':']).next().unwrap_or_default();
    if matches!(first, "files" | "batches" | "uploads") {
        return Route::Invalid(
            "files and batches of Google's OpenAI-compatible API are not passed through: use the native Files and Batch APIs (/v1beta/files, /v1beta/batches)",
        );
    }
    let valid = !rest.is_empty()
        && rest
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._/:".contains(&b));
    if valid {
        Route::GoogleOpenAi(rest.to_owned())
    } else {
        Route::NotFound
    }
}

/// An admin API call, from the path after `/admin/api/`.
fn admin_route(call: &str) -> Route {
    match call.trim_end_matches('/') {
        "reload" => Route::Admin(AdminCall::Reload),
        "keys" => Route::Admin(AdminCall::Keys),
        "keys/verify" => Route::Admin(AdminCall::VerifyKeys),
        "keys/bulk" => Route::Admin(AdminCall::BulkKeys),
        "resources" => Route::Admin(AdminCall::Resources),
        "fleet" => Route::Admin(AdminCall::Fleet),
        "policy/dry-run" => Route::Admin(AdminCall::DryRun),
        rest if rest.starts_with("plugins/") => plugin_route(&rest["plugins/".len()..]),
        logs if logs.starts_with("logs/") => logs_route(&logs["logs/".len()..]),
        rest if rest.strip_prefix("keys/").is_some_and(is_key_id) => Route::Admin(AdminCall::Key {
            id: rest["keys/".len()..].to_owned(),
        }),
        rest => key_action_route(rest),
    }
}

/// A plugin file's route, from the path after `plugins/`: `{name}` or `{name}/check`, where a
/// name is what a plugin file may be called (no path, no dots).
fn plugin_route(rest: &str) -> Route {
    let (name, check) = match rest.strip_suffix("/check") {
        Some(name) => (name, true),
        None => (rest, false),
    };
    if !crate::policy::is_plugin_name(name) {
        return Route::NotFound;
    }
    let name = name.to_owned();
    Route::Admin(if check {
        AdminCall::PluginCheck { name }
    } else {
        AdminCall::PluginFile { name }
    })
}

/// A log's route, from the path after `logs/`: `{requests|errors}` (a page) or `{log}/{ts}-{seq}`
/// (one row).
fn logs_route(rest: &str) -> Route {
    let mut parts = rest.splitn(2, '/');
    let Some(log) = parts.next().and_then(crate::store::logs::Log::from_name) else {
        return Route::NotFound;
    };
    let row = match parts.next() {
        None => None,
        Some(r) => match parse_row(r) {
            Some(row) => Some(row),
            None => return Route::NotFound,
        },
    };
    Route::Admin(AdminCall::Logs { log, row })
}

/// Whether `id` may be a key id (letters and digits).
fn is_key_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `keys/{id}/{verify|reset|enable|disable}`; anything else is not found.
fn key_action_route(rest: &str) -> Route {
    match rest.strip_prefix("keys/").and_then(|r| r.split_once('/')) {
        Some((id, action)) if is_key_id(id) => {
            let action = match action {
                "verify" => KeyAction::Verify,
                "reset" => KeyAction::Reset,
                "enable" => KeyAction::Enable,
                "disable" => KeyAction::Disable,
                _ => return Route::NotFound,
            };
            Route::Admin(AdminCall::KeyAction {
                id: id.to_owned(),
                action,
            })
        }
        _ => Route::NotFound,
    }
}

/// The admin pages, and gemini-balance's page paths (which move to them).
fn page_route(path: &str) -> Option<Page> {
    let page = match path {
        "/" | "/admin" | "/admin/" => Page::Dashboard,
        // `/auth` is where gemini-balance's login form posts.
        "/admin/login" | "/auth" => Page::Login,
        "/admin/logout" => Page::Logout,
        "/admin/keys" => Page::Keys,
        "/admin/settings" => Page::Settings,
        "/admin/logs" => Page::Logs,
        "/admin/plugins" => Page::Plugins,
        "/admin/static/admin.css" => Page::Static("admin.css"),
        "/admin/static/admin.js" => Page::Static("admin.js"),
        "/keys_status" | "/keys" => Page::Moved("/admin/keys"),
        "/config" => Page::Moved("/admin/settings"),
        "/logs" | "/error_logs" => Page::Moved("/admin/logs"),
        _ => {
            let rest = path.strip_prefix("/admin/logs/")?;
            let (log, row) = rest.split_once('/')?;
            Page::LogRow {
                log: crate::store::logs::Log::from_name(log)?,
                row: parse_row(row)?,
            }
        }
    };
    Some(page)
}

/// A native call, from the path after the API version (`models/…`). Google's stable `v1`
/// calls go to the `BASE_URL` version too, which serves all of them.
fn native_route(rest: &str) -> Route {
    let rest = rest.trim_end_matches('/');
    if let Some(route) = owned_route(rest) {
        return route;
    }
    if rest == "files" {
        return Route::Files(None);
    }
    if let Some(id) = rest.strip_prefix("files/") {
        let valid = !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        return if valid {
            Route::Files(Some(id.to_owned()))
        } else {
            Route::NotFound
        };
    }
    if rest == "auth_tokens" {
        return Route::AuthTokens;
    }
    if rest == "cachedContents" {
        return Route::Caches(None);
    }
    if let Some(id) = rest.strip_prefix("cachedContents/") {
        let valid = !id.is_empty()
            && id.len() <= MAX_NAME
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        return if valid {
            Route::Caches(Some(id.to_owned()))
        } else {
            Route::NotFound
        };
    }
    if rest == "models" {
        return Route::Native(NativeCall::ListModels);
    }
    let Some(name) = rest.strip_prefix("models/") else {
        return Route::NotFound;
    };
    // Some clients escape the colon.
    let name: std::borrow::Cow<str> = if name.contains('%') {
        name.replace("%3A", ":").replace("%3a", ":").into()
    } else {
        name.into()
    };
    let valid = |s: &str| {
        s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    };
    let (model, action) = name.split_once(':').unwrap_or((&name, ""));
    if model.len() > MAX_NAME || action.len() > MAX_NAME {
        return Route::Invalid("a model or action name is at most 128 bytes");
    }
    match name.split_once(':') {
        None if valid(&name) => Route::Native(NativeCall::GetModel {
            model: name.into_owned(),
        }),
        Some((model, action))
            if valid(model)
                && !action.is_empty()
                && action.bytes().all(|b| b.is_ascii_alphabetic()) =>
        {
            Route::Native(NativeCall::Action {
                model: model.to_owned(),
                action: action.to_owned(),
            })
        }
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_of(path: &str) -> Route {
        route(path, false)
    }

    #[test]
    fn google_v1_and_openai_v1_share_a_prefix() {
        assert!(matches!(
            route("/v1/models/gemini-2.5-flash:generateContent", false),
            Route::Native(NativeCall::Action { .. })
        ));
        assert_eq!(
            route("/v1/models", true),
            Route::Native(NativeCall::ListModels)
        );
        assert_eq!(
            route("/v1/models", false),
            Route::OpenAi(OpenAiCall::Models)
        );
        assert!(matches!(
            route("/v1/models/gemini-2.5-pro", true),
            Route::Native(NativeCall::GetModel { .. })
        ));
        assert!(matches!(
            route("/gemini/v1/models/m:countTokens", false),
            Route::Native(NativeCall::Action { .. })
        ));
    }

    #[test]
    fn native_paths() {
        assert_eq!(
            route_of("/v1beta/models"),
            Route::Native(NativeCall::ListModels)
        );
        assert_eq!(
            route_of("/gemini/v1beta/models/"),
            Route::Native(NativeCall::ListModels)
        );
        assert_eq!(
            route_of("/v1beta/models/gemini-2.5-flash"),
            Route::Native(NativeCall::GetModel {
                model: "gemini-2.5-flash".into()
            })
        );
        let call = route_of("/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent");
        assert!(
            matches!(&call, Route::Native(c) if c.is_stream() && c.model() == "gemini-2.5-flash")
        );
        assert_eq!(route_of("/health"), Route::Health);
        assert_eq!(route_of("/ready"), Route::Ready);
        assert_eq!(
            route_of("/v1beta/models/../x:generateContent"),
            Route::NotFound
        );
        assert_eq!(route_of("/v2/models"), Route::NotFound);
        assert_eq!(route_of("/v1beta/models/.."), Route::NotFound);
        assert_eq!(
            route_of("/hf/v1/chat/completions"),
            Route::OpenAi(OpenAiCall::Chat)
        );
        assert_eq!(route_of("/v1/models"), Route::OpenAi(OpenAiCall::Models));
        assert_eq!(
            route_of("/openai/v1/chat/completions"),
            Route::GoogleOpenAi("chat/completions".into())
        );
        assert_eq!(route_of("/openai/v1/../x"), Route::NotFound);
        for held in ["files", "files/f1/content", "batches/b1/cancel", "uploads"] {
            assert!(
                matches!(route_of(&format!("/openai/v1/{held}")), Route::Invalid(_)),
                "{held}"
            );
        }
        assert_eq!(
            route_of("/v1beta/interactions/"),
            Route::Interactions(None, Verb::None)
        );
        assert_eq!(
            route_of("/gemini/v1beta/interactions/v1_abc-D/cancel"),
            Route::Interactions(Some("v1_abc-D".into()), Verb::Cancel)
        );
        assert_eq!(route_of("/v1beta/interactions/a.b"), Route::NotFound);
        assert_eq!(route_of("/v1beta/interactions/a/b"), Route::NotFound);
        assert_eq!(
            route("/v1/batches/b1:cancel", false),
            Route::Batches(Some("b1".into()), Verb::Cancel)
        );
        assert_eq!(route_of("/v1beta/batches/b1:delete"), Route::NotFound);
        assert_eq!(
            route_of("/download/v1beta/files/batch-1:download"),
            Route::Download("batch-1".into())
        );
        assert_eq!(
            route("/v1/files/batch-1:download", false),
            Route::Download("batch-1".into())
        );
        assert_eq!(route_of("/download/v1beta/models"), Route::NotFound);
        assert_eq!(route_of("/v1alpha/auth_tokens"), Route::AuthTokens);
        assert_eq!(
            route_of(
                "//ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContentConstrained"
            ),
            Route::Live {
                version: "v1alpha".into(),
                constrained: true
            }
        );
        assert_eq!(
            route_of("/ws/google.ai.generativelanguage.v9.GenerativeService.BidiGenerateContent"),
            Route::NotFound
        );
        let long = "m".repeat(MAX_NAME + 1);
        for path in [
            format!("/v1beta/models/{long}:generateContent"),
            format!("/v1beta/models/gemini-2.5-flash:{long}"),
            format!("/v1beta/models/{long}"),
        ] {
            assert!(matches!(route_of(&path), Route::Invalid(_)), "{path}");
        }
    }
}

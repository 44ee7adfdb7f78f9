//! The admin UI: the JSON API under `/admin/api` ([`api`]) and the HTML pages ([`pages`]), both
//! behind the admin session (`app::session`).

pub mod api;
pub mod pages;
mod plugins;

/// A route of the admin JSON API (`/admin/api/...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCall {
    /// `GET`: the current generation and the last reload; `POST`: reload now.
    Reload,
    /// `GET /admin/api/keys`: every key with its state (paginated, searchable);
    /// `POST`: add the keys found in `{"text": …}`.
    Keys,
    /// `DELETE /admin/api/keys/{id}`; `PATCH`: set its project and tier
    /// (`{"project": …, "tier": …}`).
    Key { id: String },
    /// `POST /admin/api/keys/verify`: probe the keys named in the body (all disabled ones when
    /// none are named).
    VerifyKeys,
    /// `POST /admin/api/keys/{id}/{verify|reset|enable|disable}`.
    KeyAction { id: String, action: KeyAction },
    /// `POST /admin/api/keys/bulk`: `{"action", "ids"}`, one action on many keys.
    BulkKeys,
    /// `GET /admin/api/resources?kind=files`: every resource clients made through gemgate,
    /// with its owner (those from before owners were kept included).
    Resources,
    /// `GET /admin/api/fleet`: this instance's link to the fleet, and the fleet's members.
    Fleet,
    /// `GET /admin/api/logs/{requests|errors}` (a page), `GET …/{ts}-{seq}` (one row),
    /// `DELETE /admin/api/logs/{requests|errors}` (selected rows, or all).
    Logs {
        log: crate::store::logs::Log,
        row: Option<(u64, u64)>,
    },
    /// `POST /admin/api/policy/dry-run`: what the plugin chain would do with a request, against
    /// the live pool, without calling Google.
    DryRun,
    /// `GET /admin/api/plugins/{name}`: a plugin's (or a `*_test` file's) code; `PUT
    /// {"code"}`: checks and saves it (then reloads).
    PluginFile { name: String },
    /// `POST /admin/api/plugins/{name}/check` `{"code"}`: what saving it would do (the plugins
    /// load, the tests pass), without saving.
    PluginCheck { name: String },
}

/// An admin web page (HTML), or what the pages need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Page {
    Login,
    Logout,
    Dashboard,
    Keys,
    Settings,
    Logs,
    LogRow {
        log: crate::store::logs::Log,
        row: (u64, u64),
    },
    Plugins,
    /// `/admin/static/{admin.css|admin.js}`.
    Static(&'static str),
    /// A gemini-balance page path, and where it lives now.
    Moved(&'static str),
}

/// What an operator can do to one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAction {
    Verify,
    Reset,
    Enable,
    Disable,
}

/// A log row's name, `{ts}-{seq}`.
pub fn parse_row(s: &str) -> Option<(u64, u64)> {
    let (ts, seq) = s.split_once('-')?;
    Some((ts.parse().ok()?, seq.parse().ok()?))
}

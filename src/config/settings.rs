//! The settings page's model: every setting with its value and where the value came from, and
//! the edit that writes a changed setting back to the config file.
//!
//! Settings are the environment variables of [`OVERRIDES`] (gemini-balance's names), grouped
//! for people. A value comes from the environment, the `.env` file, the config file or the
//! default, in that order of precedence; only what the file decides can be changed here.

use std::collections::BTreeMap;

use serde::Serialize;

use super::env::{self, Kind, OVERRIDES};
use super::{ConfigError, edit};

/// The page's groups, in order, and which settings (by TOML path prefix or exact path) go in
/// each. The first match wins.
const GROUPS: &[(&str, &[&str])] = &[
    (
        "Keys and tokens",
        &[
            "keys.api_keys",
            "keys.paid_key",
            "auth.allowed_tokens",
            "auth.auth_token",
        ],
    ),
    (
        "Thinking and search",
        &[
            "models.thinking",
            "models.thinking_budget_map",
            "models.show_thinking_process",
            "models.search",
            "models.show_search_link",
        ],
    ),
    ("Models", &["models."]),
    ("Responses API", &["responses."]),
    ("Images", &["images."]),
    ("Streaming", &["stream."]),
    ("Speech", &["tts."]),
    (
        "Retries and checks",
        &[
            "upstream.max_retries",
            "keys.max_failures",
            "keys.check_interval_hours",
            "keys.test_model",
            "upstream.timeout_s",
        ],
    ),
    ("Upstream", &["upstream."]),
    ("Quota", &["quota."]),
    ("Logs", &["logs."]),
    ("Fetching URLs", &["fetch."]),
    ("Server", &["server.", "policy."]),
    ("Fleet", &["cluster."]),
];

/// Settings whose values are secrets: shown masked, kept unless a new value is typed.
const SECRETS: &[&str] = &[
    "keys.api_keys",
    "keys.paid_key",
    "auth.allowed_tokens",
    "auth.auth_token",
    "images.smms_secret_token",
    "images.picgo_api_key",
    "images.cloudflare_imgbed_auth_code",
    "upstream.proxies",
    "upstream.custom_headers",
    "cluster.redis_url",
    "cluster.secret",
];

/// Settings that take effect only after a restart.
const RESTART: &[&str] = &[
    "server.listen",
    "server.data_dir",
    "server.threads",
    "server.timezone",
    "server.log_format",
    "metrics.listen",
    "cluster.redis_url",
    "cluster.name",
    "cluster.secret",
    "cluster.instance",
];

/// One setting as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Setting {
    pub env: &'static str,
    pub path: &'static str,
    /// `text`, `number`, `bool`, `list` (one per line) or `json`.
    pub input: &'static str,
    /// The value as the form shows it; empty for secrets.
    pub value: String,
    /// What the page shows for a secret: masked, or "not set".
    pub shown: String,
    /// `environment`, `.env`, `file`, `fleet` (an admin edit made in the fleet) or `default`.
    pub source: &'static str,
    pub secret: bool,
    /// Whether the page may change it (not when the environment decides it, nor the keys).
    pub editable: bool,
    pub restart: bool,
    /// The validator's complaint about a value just submitted.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub name: &'static str,
    pub settings: Vec<Setting>,
}

fn group_of(path: &str) -> &'static str {
    GROUPS
        .iter()
        .find(|(_, members)| {
            members
                .iter()
                .any(|m| path == *m || (m.ends_with('.') && path.starts_with(m)))
        })
        .map_or("Server", |(name, _)| name)
}

fn input_of(kind: Kind) -> &'static str {
    match kind {
        Kind::Str => "text",
        Kind::Int | Kind::Float => "number",
        Kind::Bool => "bool",
        Kind::List => "list",
        Kind::Json => "json",
    }
}

fn lookup<'a>(tree: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
    let (section, field) = path.split_once('.')?;
    tree.get(section)?.get(field)
}

/// A value as the form shows it: lists one item per line, tables as JSON.
fn show(v: &toml::Value, kind: Kind) -> String {
    match (v, kind) {
        (toml::Value::String(s), _) => s.clone(),
        (toml::Value::Array(items), Kind::List)
            if items.iter().all(|i| matches!(i, toml::Value::String(_))) =>
        {
            items
                .iter()
                .filter_map(|i| i.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        }
        (toml::Value::Array(_) | toml::Value::Table(_), _) => {
            serde_json::to_string_pretty(&serde_json::to_value(v).unwrap_or_default())
                .unwrap_or_default()
        }
        (other, _) => other.to_string(),
    }
}

/// A secret as the page shows it.
fn masked(v: &toml::Value) -> String {
    let secrets: Vec<String> = match v {
        toml::Value::String(s) if s.is_empty() => return "not set".into(),
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Array(items) => items
            .iter()
            .map(|i| match i {
                toml::Value::String(s) => s.clone(),
                toml::Value::Table(t) => t
                    .get("token")
                    .or_else(|| t.get("key"))
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                _ => String::new(),
            })
            .collect(),
        _ => return "set".into(),
    };
    if secrets.is_empty() {
        return "not set".into();
    }
    let shown: Vec<String> = secrets.iter().map(|s| mask_one(s)).collect();
    shown.join(", ")
}

/// Whether the gateway's own environment sets `name` (rather than `.env`): the `process_env`
/// of [`describe`] and [`apply_form`] outside tests.
pub fn in_process_env(name: &str) -> bool {
    std::env::var_os(name).is_some()
}

/// A proxy URL keeps its host and loses its password; anything else shows 6 + 4 characters.
fn mask_one(s: &str) -> String {
    match reqwest::Url::parse(s) {
        Ok(url) if url.has_host() && s.contains("://") => super::net::shown_url(&url),
        _ => super::mask(s),
    }
}

/// Every setting, grouped, as `text` (the config file, or the defaults) and `vars` (the
/// environment and `.env`) make it now. `process_env` tells the environment from `.env`.
pub fn describe(
    text: &str,
    vars: &BTreeMap<String, String>,
    process_env: &dyn Fn(&str) -> bool,
) -> Result<Vec<Group>, ConfigError> {
    let parse = |e: toml::de::Error| ConfigError::Parse {
        path: "config".into(),
        message: e.to_string(),
    };
    let file_tree: toml::Value = toml::from_str(text).map_err(parse)?;
    let mut tree = file_tree.clone();
    env::apply(&mut tree, vars)?;
    let file: super::FileConfig = tree.try_into().map_err(parse)?;
    // Every field, defaults filled in.
    let effective = toml::Value::try_from(&file).map_err(|e| ConfigError::Parse {
        path: "config".into(),
        message: e.to_string(),
    })?;
    let mut groups: Vec<Group> = GROUPS
        .iter()
        .map(|(name, _)| Group {
            name,
            settings: Vec::new(),
        })
        .collect();
    for &(name, path, kind) in OVERRIDES {
        let source = if vars.contains_key(name) {
            if process_env(name) {
                "environment"
            } else {
                ".env"
            }
        } else if lookup(&file_tree, path).is_some() {
            "file"
        } else {
            "default"
        };
        let value = lookup(&effective, path).cloned();
        let secret = SECRETS.contains(&path);
        let shown = match &value {
            None => String::new(),
            // The key page shows the keys; here only how many there are.
            Some(toml::Value::Array(keys)) if path == "keys.api_keys" => {
                format!("{} keys", keys.len())
            }
            Some(v) if secret => masked(v),
            Some(v) => show(v, kind),
        };
        let setting = Setting {
            env: name,
            path,
            input: input_of(kind),
            value: if secret { String::new() } else { shown.clone() },
            shown: if shown.is_empty() {
                "not set".to_owned()
            } else {
                shown
            },
            source,
            secret,
            // Fleet membership is each instance's own: set where the instance starts.
            editable: path != "keys.api_keys"
                && !path.starts_with("cluster.")
                && !matches!(source, "environment" | ".env"),
            restart: RESTART.contains(&path),
            error: None,
        };
        let group = group_of(path);
        if let Some(g) = groups.iter_mut().find(|g| g.name == group) {
            g.settings.push(setting);
        }
    }
    groups.retain(|g| !g.settings.is_empty());
    Ok(groups)
}

/// A value typed in the form, as TOML (`None`: back to the default).
fn parse_input(raw: &str, kind: Kind) -> Result<Option<toml::Value>, String> {
    let text = raw.trim();
    if text.is_empty() {
        return Ok(None);
    }
    match kind {
        Kind::List if !text.starts_with('[') => Ok(Some(toml::Value::Array(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| toml::Value::String(l.to_owned()))
                .collect(),
        ))),
        _ => env::convert(text, kind).map(Some),
    }
}

/// The outcome of a settings form.
#[derive(Debug)]
pub enum Saved {
    /// These settings changed; the new file text is to be written.
    Changed(Vec<&'static str>, String),
    Unchanged,
    /// Nothing is written: errors by setting path (`""`: not tied to one field).
    Refused(Vec<(String, String)>),
}

/// Applies a submitted settings form to the config `text`: every editable field whose value
/// differs from what [`describe`] shows. Secrets left empty are kept. The result is validated
/// exactly as a reload would validate it.
pub fn apply_form(
    text: &str,
    vars: &BTreeMap<String, String>,
    form: &BTreeMap<String, String>,
    process_env: &dyn Fn(&str) -> bool,
) -> Saved {
    let groups = match describe(text, vars, process_env) {
        Ok(g) => g,
        Err(e) => return Saved::Refused(vec![(String::new(), e.to_string())]),
    };
    let mut errors = Vec::new();
    let mut changed = Vec::new();
    let mut new_text = text.to_owned();
    for setting in groups.iter().flat_map(|g| &g.settings) {
        let Some(raw) = form.get(setting.path) else {
            continue;
        };
        if !setting.editable || (setting.secret && raw.trim().is_empty()) {
            continue;
        }
        if !setting.secret && raw.replace("\r\n", "\n").trim() == setting.value.trim() {
            continue;
        }
        let kind = OVERRIDES
            .iter()
            .find(|(_, p, _)| *p == setting.path)
            .map_or(Kind::Str, |o| o.2);
        match parse_input(raw, kind)
            .and_then(|v| edit::set_setting(&new_text, setting.path, v.as_ref()))
        {
            Ok(t) => {
                new_text = t;
                changed.push(setting.path);
            }
            Err(e) => errors.push((setting.path.to_owned(), e)),
        }
    }
    if errors.is_empty()
        && !changed.is_empty()
        && let Err(e) = super::from_str(&new_text, "the edited config", vars)
    {
        errors.push(blame(&e, &changed));
    }
    if !errors.is_empty() {
        Saved::Refused(errors)
    } else if changed.is_empty() {
        Saved::Unchanged
    } else {
        Saved::Changed(changed, new_text)
    }
}

/// The setting a validation error is about: the field it names, else the one setting changed.
fn blame(e: &ConfigError, changed: &[&'static str]) -> (String, String) {
    let message = e.to_string();
    let paths = OVERRIDES.iter().map(|o| o.1);
    let named = match e {
        ConfigError::Invalid { field, .. } => paths
            .clone()
            .find(|p| field == p || field.ends_with(&format!("({p})"))),
        _ => paths.clone().find(|p| {
            let field = p.split_once('.').map_or(*p, |(_, f)| f);
            message.contains(&format!("`{field}`")) || mentions(&message, p)
        }),
    };
    match named.or(if changed.len() == 1 {
        changed.first().copied()
    } else {
        None
    }) {
        Some(p) => (p.to_owned(), message),
        None => (String::new(), message),
    }
}

/// Whether `text` names `path` as a whole word (`models.thinking` is not in
/// `models.thinking_budget_map`).
fn mentions(text: &str, path: &str) -> bool {
    text.match_indices(path).any(|(at, _)| {
        !text[at + path.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> bool {
        false
    }

    #[test]
    fn settings_show_values_sources_and_masked_secrets() {
        let text =
            "[upstream]\nmax_retries = 5\n[auth]\nauth_token = \"super-secret-admin-token\"\n";
        let vars = BTreeMap::from([("TIME_OUT".to_owned(), "12".to_owned())]);
        let groups = describe(text, &vars, &|n| n == "TIME_OUT").unwrap();
        let all: Vec<&Setting> = groups.iter().flat_map(|g| &g.settings).collect();
        let get = |env: &str| all.iter().find(|s| s.env == env).unwrap();
        assert_eq!(
            (get("MAX_RETRIES").value.as_str(), get("MAX_RETRIES").source),
            ("5", "file")
        );
        assert_eq!(
            (get("TIME_OUT").source, get("TIME_OUT").editable),
            ("environment", false)
        );
        assert_eq!(get("MAX_FAILURES").source, "default");
        let token = get("AUTH_TOKEN");
        assert!(
            token.value.is_empty() && token.shown == "…oken",
            "{token:?}"
        );
        assert_eq!(groups[0].name, "Keys and tokens");
        assert!(!get("API_KEYS").editable);
    }

    #[test]
    fn a_form_changes_what_differs_keeps_secrets_and_names_bad_fields() {
        let text =
            "# mine\n[upstream]\nmax_retries = 5\n[auth]\nauth_token = \"keep-this-admin-token\"\n";
        let vars = BTreeMap::new();
        let form = BTreeMap::from([
            ("upstream.max_retries".to_owned(), "5".to_owned()),
            ("keys.max_failures".to_owned(), "7".to_owned()),
            ("auth.auth_token".to_owned(), "".to_owned()),
            ("models.filtered".to_owned(), "a\r\nb\r\n".to_owned()),
        ]);
        let Saved::Changed(changed, new) = apply_form(text, &vars, &form, &no_env) else {
            panic!("not saved");
        };
        // In the page's order: models come before retries and checks.
        assert_eq!(changed, ["models.filtered", "keys.max_failures"]);
        assert!(
            new.contains("# mine") && new.contains("keep-this-admin-token"),
            "{new}"
        );
        assert!(
            new.contains("max_failures = 7") && new.contains(r#"filtered = ["a", "b"]"#),
            "{new}"
        );

        let bad = BTreeMap::from([("upstream.max_retries".to_owned(), "0".to_owned())]);
        let Saved::Refused(errors) = apply_form(text, &vars, &bad, &no_env) else {
            panic!("accepted");
        };
        assert_eq!(errors[0].0, "upstream.max_retries", "{errors:?}");
        let typo = BTreeMap::from([("keys.max_failures".to_owned(), "many".to_owned())]);
        let Saved::Refused(errors) = apply_form(text, &vars, &typo, &no_env) else {
            panic!("accepted");
        };
        assert_eq!(errors[0].0, "keys.max_failures", "{errors:?}");
        assert!(matches!(
            apply_form(text, &vars, &BTreeMap::new(), &no_env),
            Saved::Unchanged
        ));
    }
}

//! Environment overrides with gemini-balance's variable names.
//!
//! Every setting gemini-balance reads from its environment (or `.env`) maps to one field of the
//! TOML file. The override is applied to the parsed TOML tree *before* it is deserialised, so the
//! same type checks and validation run whatever the source, and an error names the variable.

use std::collections::BTreeMap;

use toml::Value;

use super::ConfigError;

/// How an environment string becomes a TOML value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Str,
    Int,
    Float,
    Bool,
    /// A JSON array, or a comma-separated string.
    List,
    /// A JSON value (object or array), e.g. `THINKING_BUDGET_MAP` or `SAFETY_SETTINGS`.
    Json,
}

/// (variable, TOML path, kind). The TOML path is `section.field`.
pub const OVERRIDES: &[(&str, &str, Kind)] = &[
    // gemgate's own
    ("GEMGATE_LISTEN", "server.listen", Kind::Str),
    ("GEMGATE_DATA_DIR", "server.data_dir", Kind::Str),
    ("GEMGATE_THREADS", "server.threads", Kind::Int),
    ("GEMGATE_MAX_BODY_BYTES", "server.max_body_bytes", Kind::Int),
    (
        "GEMGATE_GRACE_PERIOD_SECONDS",
        "server.grace_period_s",
        Kind::Int,
    ),
    (
        "GEMGATE_MAX_CONNECTIONS",
        "server.max_connections",
        Kind::Int,
    ),
    (
        "GEMGATE_HEADER_TIMEOUT_SECONDS",
        "server.header_timeout_s",
        Kind::Float,
    ),
    (
        "GEMGATE_TRUSTED_PROXIES",
        "server.trusted_proxies",
        Kind::List,
    ),
    ("GEMGATE_PUBLIC_URL", "server.public_url", Kind::Str),
    ("GEMGATE_TLS_CERT_FILE", "server.tls_cert_file", Kind::Str),
    ("GEMGATE_TLS_KEY_FILE", "server.tls_key_file", Kind::Str),
    (
        "GEMGATE_LIVE_SESSIONS_PER_CLIENT",
        "server.live_sessions_per_client",
        Kind::Int,
    ),
    ("GEMGATE_MAX_DATA_BYTES", "server.max_data_bytes", Kind::Int),
    ("GEMGATE_FETCH_ENABLED", "fetch.enabled", Kind::Bool),
    ("GEMGATE_FETCH_ALLOW", "fetch.allow", Kind::List),
    ("GEMGATE_FETCH_MAX_BYTES", "fetch.max_bytes", Kind::Int),
    (
        "GEMGATE_REQUEST_LOG_SAMPLE",
        "logs.request_sample",
        Kind::Float,
    ),
    (
        "GEMGATE_FORWARD_HEADERS",
        "upstream.forward_headers",
        Kind::List,
    ),
    ("GEMGATE_PLUGINS_DIR", "policy.dir", Kind::Str),
    ("GEMGATE_REDIS_URL", "cluster.redis_url", Kind::Str),
    ("GEMGATE_METRICS_ENABLED", "metrics.enabled", Kind::Bool),
    ("GEMGATE_METRICS_PUBLIC", "metrics.public", Kind::Bool),
    (
        "GEMGATE_METRICS_KEY_LABELS",
        "metrics.key_labels",
        Kind::Bool,
    ),
    ("GEMGATE_METRICS_LISTEN", "metrics.listen", Kind::Str),
    ("GEMGATE_QUOTA_LIMITS", "quota.limits", Kind::Json),
    ("GEMGATE_QUOTA_TIERS", "quota.tiers", Kind::Json),
    ("GEMGATE_CLUSTER", "cluster.name", Kind::Str),
    ("GEMGATE_CLUSTER_SECRET", "cluster.secret", Kind::Str),
    ("GEMGATE_INSTANCE", "cluster.instance", Kind::Str),
    ("GEMGATE_TEMPLATES_DIR", "server.templates_dir", Kind::Str),
    ("LOG_LEVEL", "server.log_level", Kind::Str),
    ("LOG_FORMAT", "server.log_format", Kind::Str),
    ("TIMEZONE", "server.timezone", Kind::Str),
    // keys and tokens
    ("API_KEYS", "keys.api_keys", Kind::List),
    ("MAX_FAILURES", "keys.max_failures", Kind::Int),
    (
        "CHECK_INTERVAL_HOURS",
        "keys.check_interval_hours",
        Kind::Float,
    ),
    ("TEST_MODEL", "keys.test_model", Kind::Str),
    ("PAID_KEY", "keys.paid_key", Kind::Str),
    ("ALLOWED_TOKENS", "auth.allowed_tokens", Kind::List),
    ("AUTH_TOKEN", "auth.auth_token", Kind::Str),
    // upstream
    ("BASE_URL", "upstream.base_url", Kind::Str),
    ("VERTEX_BASE_URL", "upstream.vertex_base_url", Kind::Str),
    ("MAX_RETRIES", "upstream.max_retries", Kind::Int),
    ("TIME_OUT", "upstream.timeout_s", Kind::Float),
    ("PROXIES", "upstream.proxies", Kind::List),
    (
        "PROXIES_USE_CONSISTENCY_HASH_BY_API_KEY",
        "upstream.proxies_use_consistency_hash_by_api_key",
        Kind::Bool,
    ),
    ("CUSTOM_HEADERS", "upstream.custom_headers", Kind::Json),
    ("GEMGATE_UPSTREAM_HTTP2", "upstream.http2", Kind::Bool),
    // models
    ("FILTERED_MODELS", "models.filtered", Kind::List),
    ("SEARCH_MODELS", "models.search", Kind::List),
    ("IMAGE_MODELS", "models.image", Kind::List),
    ("THINKING_MODELS", "models.thinking", Kind::List),
    (
        "THINKING_BUDGET_MAP",
        "models.thinking_budget_map",
        Kind::Json,
    ),
    ("MODEL_ALIASES", "models.aliases", Kind::Json),
    (
        "RESPONSES_RETENTION_DAYS",
        "responses.retention_days",
        Kind::Int,
    ),
    ("SHOW_SEARCH_LINK", "models.show_search_link", Kind::Bool),
    (
        "SHOW_THINKING_PROCESS",
        "models.show_thinking_process",
        Kind::Bool,
    ),
    (
        "TOOLS_CODE_EXECUTION_ENABLED",
        "models.code_execution",
        Kind::Bool,
    ),
    ("URL_CONTEXT_ENABLED", "models.url_context", Kind::Bool),
    (
        "URL_CONTEXT_MODELS",
        "models.url_context_models",
        Kind::List,
    ),
    ("SAFETY_SETTINGS", "models.safety_settings", Kind::Json),
    // images
    ("CREATE_IMAGE_MODEL", "images.create_image_model", Kind::Str),
    ("UPLOAD_PROVIDER", "images.upload_provider", Kind::Str),
    ("SMMS_SECRET_TOKEN", "images.smms_secret_token", Kind::Str),
    ("PICGO_API_KEY", "images.picgo_api_key", Kind::Str),
    (
        "CLOUDFLARE_IMGBED_URL",
        "images.cloudflare_imgbed_url",
        Kind::Str,
    ),
    (
        "CLOUDFLARE_IMGBED_AUTH_CODE",
        "images.cloudflare_imgbed_auth_code",
        Kind::Str,
    ),
    ("GEMGATE_SMMS_URL", "images.smms_url", Kind::Str),
    ("GEMGATE_PICGO_URL", "images.picgo_url", Kind::Str),
    // streaming
    (
        "STREAM_OPTIMIZER_ENABLED",
        "stream.optimizer_enabled",
        Kind::Bool,
    ),
    ("STREAM_MIN_DELAY", "stream.min_delay", Kind::Float),
    ("STREAM_MAX_DELAY", "stream.max_delay", Kind::Float),
    (
        "STREAM_SHORT_TEXT_THRESHOLD",
        "stream.short_text_threshold",
        Kind::Int,
    ),
    (
        "STREAM_LONG_TEXT_THRESHOLD",
        "stream.long_text_threshold",
        Kind::Int,
    ),
    ("STREAM_CHUNK_SIZE", "stream.chunk_size", Kind::Int),
    (
        "FAKE_STREAM_ENABLED",
        "stream.fake_stream_enabled",
        Kind::Bool,
    ),
    (
        "FAKE_STREAM_EMPTY_DATA_INTERVAL_SECONDS",
        "stream.fake_stream_empty_data_interval_s",
        Kind::Float,
    ),
    // text to speech
    ("TTS_MODEL", "tts.model", Kind::Str),
    ("TTS_VOICE_NAME", "tts.voice_name", Kind::Str),
    ("TTS_SPEED", "tts.speed", Kind::Str),
    // logs
    (
        "AUTO_DELETE_ERROR_LOGS_ENABLED",
        "logs.auto_delete_error_logs_enabled",
        Kind::Bool,
    ),
    (
        "AUTO_DELETE_ERROR_LOGS_DAYS",
        "logs.auto_delete_error_logs_days",
        Kind::Int,
    ),
    (
        "AUTO_DELETE_REQUEST_LOGS_ENABLED",
        "logs.auto_delete_request_logs_enabled",
        Kind::Bool,
    ),
    (
        "AUTO_DELETE_REQUEST_LOGS_DAYS",
        "logs.auto_delete_request_logs_days",
        Kind::Int,
    ),
    (
        "ERROR_LOG_RECORD_REQUEST_BODY",
        "logs.error_log_record_request_body",
        Kind::Bool,
    ),
];

/// gemini-balance settings that have no meaning here (gemgate keeps its state in redb).
pub const IGNORED: &[&str] = &[
    "DATABASE_TYPE",
    "SQLITE_DATABASE",
    "MYSQL_HOST",
    "MYSQL_SOCKET",
    "MYSQL_PORT",
    "MYSQL_USER",
    "MYSQL_PASSWORD",
    "MYSQL_DATABASE",
];

/// Where a setting's value came from, lowest precedence first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Default,
    File,
    DotEnv,
    Env,
}

/// Applies every known variable found in `vars` to the TOML tree `root`.
/// Returns the TOML paths that were set.
pub fn apply(
    root: &mut Value,
    vars: &BTreeMap<String, String>,
) -> Result<Vec<&'static str>, ConfigError> {
    let mut applied = Vec::new();
    for &(name, path, kind) in OVERRIDES {
        let Some(raw) = vars.get(name) else { continue };
        let value = convert(raw, kind).map_err(|why| ConfigError::Invalid {
            field: format!("{name} ({path})"),
            message: why,
        })?;
        set_path(root, path, value);
        applied.push(path);
    }
    Ok(applied)
}

fn set_path(root: &mut Value, path: &str, value: Value) {
    let (section, field) = path
        .split_once('.')
        .expect("override paths are section.field");
    let table = root.as_table_mut().expect("config root is a table");
    let section = table
        .entry(section)
        .or_insert_with(|| Value::Table(Default::default()));
    if let Value::Table(section) = section {
        section.insert(field.to_owned(), value);
    }
}

pub(crate) fn convert(raw: &str, kind: Kind) -> Result<Value, String> {
    let text = raw.trim();
    match kind {
        Kind::Str => Ok(Value::String(unquote(text).to_owned())),
        Kind::Int => text
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("expected an integer, got {text:?}")),
        Kind::Float => text
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("expected a number, got {text:?}")),
        Kind::Bool => match text.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(Value::Boolean(true)),
            "false" | "0" | "no" | "off" | "" => Ok(Value::Boolean(false)),
            _ => Err(format!("expected true or false, got {text:?}")),
        },
        Kind::List => {
            if text.starts_with('[') {
                let json: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| format!("invalid JSON list: {e}"))?;
                json_to_toml(json)
            } else {
                Ok(Value::Array(
                    text.split(',')
                        .map(|s| unquote(s.trim()))
                        .filter(|s| !s.is_empty())
                        .map(|s| Value::String(s.to_owned()))
                        .collect(),
                ))
            }
        }
        Kind::Json => {
            if text.is_empty() {
                return Err("expected a JSON value, got nothing".into());
            }
            let json: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
            json_to_toml(json)
        }
    }
}

fn unquote(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .or_else(|| s.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
        .unwrap_or(s)
}

fn json_to_toml(json: serde_json::Value) -> Result<Value, String> {
    use serde_json::Value as J;
    Ok(match json {
        J::Null => return Err("null is not a valid value".into()),
        J::Bool(b) => Value::Boolean(b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Float(n.as_f64().unwrap_or_default()),
        },
        J::String(s) => Value::String(s),
        J::Array(items) => Value::Array(
            items
                .into_iter()
                .map(json_to_toml)
                .collect::<Result<_, _>>()?,
        ),
        J::Object(map) => Value::Table(
            map.into_iter()
                .map(|(k, v)| Ok((k, json_to_toml(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_accept_json_and_commas() {
        let json = convert(r#"["a", "b"]"#, Kind::List).unwrap();
        let commas = convert(" a, b ,", Kind::List).unwrap();
        assert_eq!(json, commas);
        assert_eq!(json.as_array().unwrap().len(), 2);
    }

    #[test]
    fn bad_numbers_name_the_variable() {
        let mut root = Value::Table(Default::default());
        let vars = BTreeMap::from([("MAX_RETRIES".to_owned(), "many".to_owned())]);
        let err = apply(&mut root, &vars).unwrap_err().to_string();
        assert!(err.contains("MAX_RETRIES"), "{err}");
    }

    #[test]
    fn json_objects_become_tables() {
        let v = convert(r#"{"gemini-2.5-pro": 1024}"#, Kind::Json).unwrap();
        assert_eq!(v["gemini-2.5-pro"].as_integer(), Some(1024));
    }
}

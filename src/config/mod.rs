//! Configuration: the TOML file format, environment overrides, and the validated runtime
//! [`Config`] the gateway runs on.
//!
//! Precedence, lowest first: built-in defaults, the TOML file, a `.env` file in the working
//! directory, the process environment. The file format ([`FileConfig`]) is kept apart from the
//! runtime config so that every value is checked once, here, and a mistake names its field.

pub mod edit;
pub mod env;
pub mod net;
pub mod quota;
pub mod settings;
pub mod tls;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The configuration shipped in `conf/gemgate.toml`, used when the default path is absent.
pub const EMBEDDED_DEFAULTS: &str = include_str!("../../conf/gemgate.toml");
/// Where `gemgate` looks for its config when `--config` is not given.
pub const DEFAULT_PATH: &str = "conf/gemgate.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(path: &str, message: impl Into<String>) -> ConfigError {
    let field = match env::OVERRIDES.iter().find(|(_, p, _)| *p == path) {
        Some((name, ..)) => format!("{path} ({name})"),
        None => path.to_owned(),
    };
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// A secret (API key or token). Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    pub fn new(s: impl Into<Box<str>>) -> Self {
        Secret(s.into())
    }
    /// The secret in clear. Call only where it is sent on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// First 6 and last 4 characters, the rest hidden: safe for logs and pages.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.masked())
    }
}

/// Masks a secret for display. A Gemini key (39 characters, the first six the same for every
/// key) shows its first 6 and last 4: `AIzaSy…abcd`. Shorter secrets show at most their last 4
/// characters (none below 8), so that a short token never shows most of itself.
pub fn mask(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let (head, tail) = match chars.len() {
        32.. => (6, 4),
        16..32 => (0, 4),
        8..16 => (0, 2),
        _ => (0, 0),
    };
    let mut out: String = chars[..head].iter().collect();
    out.push('…');
    out.extend(&chars[chars.len() - tail..]);
    out
}

/// A short stable identifier derived from a secret, never revealing it.
pub fn stable_id(prefix: &str, secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    let mut id = String::with_capacity(prefix.len() + 12);
    id.push_str(prefix);
    for b in &digest[..6] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

// ---------------------------------------------------------------------------------------------
// The file format
// ---------------------------------------------------------------------------------------------

/// The TOML file, field for field. Unknown fields are errors, so a typo never goes unnoticed.
#[derive(Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub server: ServerSection,
    pub upstream: UpstreamSection,
    pub keys: KeysSection,
    pub auth: AuthSection,
    pub models: ModelsSection,
    pub images: ImagesSection,
    pub stream: StreamSection,
    pub tts: TtsSection,
    pub logs: LogsSection,
    pub fetch: FetchSection,
    pub policy: PolicySection,
    pub cluster: ClusterSection,
    pub metrics: MetricsSection,
    pub quota: quota::QuotaSection,
    pub responses: ResponsesSection,
    /// `[plugins.<name>]`: each plugin's own config (`enabled` and `priority` are gemgate's).
    pub plugins: BTreeMap<String, toml::Table>,
}

/// `[responses]`: OpenAI's Responses API.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResponsesSection {
    /// Days a kept response (`store`, the default) can be fetched, deleted or continued
    /// (`previous_response_id`).
    pub retention_days: u32,
}

impl Default for ResponsesSection {
    fn default() -> Self {
        ResponsesSection { retention_days: 30 }
    }
}

/// `[policy]`: where plugins live and what a failing plugin does.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    /// The plugins folder; relative paths are relative to the config file's folder. Unset:
    /// `plugins/` beside the config file, else `plugins/` in the working directory, else the
    /// plugins built into gemgate.
    pub dir: Option<PathBuf>,
    /// `"fallback"` (a failing plugin is skipped) or `"deny"` (the request gets a 500).
    pub on_error: String,
    /// VM instructions one hook call may run.
    pub instruction_limit: u64,
    /// Wall-clock time one hook call may take.
    pub time_limit_ms: u64,
    /// Memory all plugins of one worker thread's VM may hold.
    pub memory_limit_mb: u64,
    /// Refuse plugins (at start and on reload) whose tests (`*_test.lua`) fail.
    pub require_tests: bool,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            dir: None,
            on_error: "fallback".into(),
            instruction_limit: 1_000_000,
            time_limit_ms: 50,
            memory_limit_mb: 16,
            require_tests: false,
        }
    }
}

/// `[metrics]`: the Prometheus endpoint, `GET /metrics`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Counting at all (off: `/metrics` answers 404).
    pub enabled: bool,
    /// Served without the admin token.
    pub public: bool,
    /// A `key` label on upstream attempts (off for pools of thousands of keys).
    pub key_labels: bool,
    /// Another address serving `/metrics` (and `/health`, `/ready`) alone; empty: none.
    pub listen: String,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            enabled: true,
            public: false,
            key_labels: true,
            listen: String::new(),
        }
    }
}

/// `[cluster]`: membership of a fleet that shares its state through Redis (see `fleet`).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// `redis://[user:password@]host[:port][/db]` or `rediss://…`; empty: a single instance.
    pub redis_url: String,
    /// The fleet's name: several fleets may share one Redis. Default `gemgate`.
    pub name: String,
    /// Encrypts the secrets the fleet keeps in Redis (required with `redis_url`).
    pub secret: String,
    /// This instance's id; default the host name and the listening port.
    pub instance: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub listen: String,
    pub data_dir: PathBuf,
    /// Worker threads; 0 means one per CPU.
    pub threads: usize,
    pub max_body_bytes: u64,
    /// How long in-flight requests may run after SIGTERM.
    pub grace_period_s: u64,
    pub log_level: String,
    /// `text` (the default) or `json`: one JSON object per line.
    pub log_format: String,
    pub timezone: String,
    /// The admin page templates; relative paths are relative to the config file's folder.
    /// Unset: `templates/` beside the config file, else in the working directory, else the
    /// templates built into gemgate.
    pub templates_dir: Option<PathBuf>,
    /// Open client connections at most; past it, new ones are closed at once (and counted).
    pub max_connections: usize,
    /// Seconds a client has to send a whole request head.
    pub header_timeout_s: f64,
    /// The reverse proxies whose `X-Forwarded-For`, `-Proto` and `-Host` are believed
    /// (addresses or blocks); none by default.
    pub trusted_proxies: Vec<String>,
    /// The URL clients reach gemgate at (`https://gemini.example.com`), for the links gemgate
    /// hands out (upload URLs); unset: the scheme and address the request came in on.
    pub public_url: String,
    /// The data file's size limit: past it, the oldest log blocks are deleted (key state and
    /// usage never are).
    pub max_data_bytes: u64,
    /// PEM files of a certificate chain and its private key: with both, the listener speaks
    /// HTTPS (and `wss://` for the Live API, which Google's SDKs reach only over TLS). Read at
    /// start; changing them needs a restart.
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// Live API sessions one client may have open at once on this instance.
    pub live_sessions_per_client: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "0.0.0.0:8000".into(),
            data_dir: "data".into(),
            threads: 0,
            max_body_bytes: 20 * 1024 * 1024,
            grace_period_s: 30,
            log_level: "info".into(),
            log_format: "text".into(),
            timezone: "UTC".into(),
            templates_dir: None,
            max_connections: 20_000,
            header_timeout_s: 30.0,
            trusted_proxies: Vec::new(),
            public_url: String::new(),
            max_data_bytes: 1 << 30,
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            live_sessions_per_client: 10,
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSection {
    pub base_url: String,
    /// Where keys of kind `vertex_express` are called: `{vertex_base_url}/publishers/google/
    /// models/{model}:{action}`.
    pub vertex_base_url: String,
    /// Seconds to wait for the upstream's answer to start, and between two of its reads.
    pub timeout_s: f64,
    pub connect_timeout_s: f64,
    /// Attempts per request, across different keys.
    pub max_retries: u32,
    pub proxies: Vec<String>,
    pub proxies_use_consistency_hash_by_api_key: bool,
    pub custom_headers: BTreeMap<String, String>,
    /// Idle upstream connections kept for reuse, per worker thread and per proxy.
    pub pool_size: usize,
    /// Client headers forwarded to Google although gemgate drops them by default
    /// (`x-goog-user-project`, the method-override headers).
    pub forward_headers: Vec<String>,
    /// Calls go to the upstream over HTTP/2, many on one connection: negotiated by TLS (an
    /// upstream that declines is spoken to in HTTP/1.1), with prior knowledge over plain HTTP
    /// (the upstream must speak HTTP/2). Not through a proxy that forwards plain HTTP.
    pub http2: bool,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        UpstreamSection {
            base_url: "https://generativelanguage.googleapis.com/v1beta".into(),
            vertex_base_url: "https://aiplatform.googleapis.com/v1".into(),
            timeout_s: 300.0,
            connect_timeout_s: 10.0,
            max_retries: 3,
            proxies: Vec::new(),
            proxies_use_consistency_hash_by_api_key: true,
            custom_headers: BTreeMap::new(),
            pool_size: 256,
            forward_headers: Vec::new(),
            http2: false,
        }
    }
}

/// A key is a plain string, or a table that also gives a label, tags and a weight.
#[derive(Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum KeyEntry {
    Plain(String),
    Detailed {
        key: String,
        #[serde(default)]
        label: Option<String>,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(default)]
        weight: Option<u32>,
        /// The Cloud project the key belongs to: its keys share one quota.
        #[serde(default)]
        project: Option<String>,
        /// The project's quota tier (`free`, `tier1`, …).
        #[serde(default)]
        tier: Option<String>,
        /// `gemini` (the default: a Gemini API key) or `vertex_express` (a Vertex AI express
        /// mode key, called at `upstream.vertex_base_url`).
        #[serde(default)]
        kind: Option<String>,
    },
}

impl KeyEntry {
    /// The key itself, trimmed.
    pub fn secret(&self) -> &str {
        match self {
            KeyEntry::Plain(k) | KeyEntry::Detailed { key: k, .. } => k.trim(),
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysSection {
    pub api_keys: Vec<KeyEntry>,
    pub max_failures: u32,
    pub check_interval_hours: f64,
    pub test_model: String,
    pub paid_key: String,
}

impl Default for KeysSection {
    fn default() -> Self {
        KeysSection {
            api_keys: Vec::new(),
            max_failures: 3,
            check_interval_hours: 1.0,
            test_model: "gemini-2.5-flash-lite".into(),
            paid_key: String::new(),
        }
    }
}

/// A client token is a plain string, or a table that also names it.
#[derive(Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum TokenEntry {
    Plain(String),
    Named { name: String, token: String },
}

#[derive(Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    pub allowed_tokens: Vec<TokenEntry>,
    /// The admin token. Never defaults to a client token.
    pub auth_token: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsSection {
    pub filtered: Vec<String>,
    pub search: Vec<String>,
    pub image: Vec<String>,
    pub thinking: Vec<String>,
    pub thinking_budget_map: BTreeMap<String, i64>,
    /// Other names of models (`"gpt-4o" = "gemini-2.5-flash"`, `"claude-*" = …`), which the
    /// shipped `model_alias` plugin applies.
    pub aliases: BTreeMap<String, String>,
    pub show_search_link: bool,
    pub show_thinking_process: bool,
    pub code_execution: bool,
    pub url_context: bool,
    pub url_context_models: Vec<String>,
    pub safety_settings: Option<toml::Value>,
}

impl Default for ModelsSection {
    fn default() -> Self {
        ModelsSection {
            filtered: Vec::new(),
            search: vec!["gemini-2.5-flash".into(), "gemini-2.5-pro".into()],
            image: vec!["gemini-2.0-flash-exp".into()],
            thinking: Vec::new(),
            thinking_budget_map: BTreeMap::new(),
            aliases: BTreeMap::new(),
            show_search_link: true,
            show_thinking_process: true,
            code_execution: false,
            url_context: false,
            url_context_models: Vec::new(),
            safety_settings: None,
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesSection {
    pub create_image_model: String,
    pub upload_provider: String,
    pub smms_secret_token: String,
    pub picgo_api_key: String,
    pub cloudflare_imgbed_url: String,
    pub cloudflare_imgbed_auth_code: String,
    /// The SM.MS upload endpoint (for tests, or a mirror).
    pub smms_url: String,
    /// The PicGo upload endpoint.
    pub picgo_url: String,
}

impl Default for ImagesSection {
    fn default() -> Self {
        ImagesSection {
            create_image_model: "imagen-3.0-generate-002".into(),
            upload_provider: "smms".into(),
            smms_secret_token: String::new(),
            picgo_api_key: String::new(),
            cloudflare_imgbed_url: String::new(),
            cloudflare_imgbed_auth_code: String::new(),
            smms_url: "https://sm.ms/api/v2/upload".into(),
            picgo_url: "https://www.picgo.net/api/1/upload".into(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSection {
    pub optimizer_enabled: bool,
    pub min_delay: f64,
    pub max_delay: f64,
    pub short_text_threshold: u64,
    pub long_text_threshold: u64,
    pub chunk_size: u64,
    pub fake_stream_enabled: bool,
    pub fake_stream_empty_data_interval_s: f64,
}

impl Default for StreamSection {
    fn default() -> Self {
        StreamSection {
            optimizer_enabled: false,
            min_delay: 0.016,
            max_delay: 0.024,
            short_text_threshold: 10,
            long_text_threshold: 50,
            chunk_size: 5,
            fake_stream_enabled: false,
            fake_stream_empty_data_interval_s: 5.0,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtsSection {
    pub model: String,
    pub voice_name: String,
    pub speed: String,
}

impl Default for TtsSection {
    fn default() -> Self {
        TtsSection {
            model: "gemini-2.5-flash-preview-tts".into(),
            voice_name: "Zephyr".into(),
            speed: "normal".into(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsSection {
    pub auto_delete_error_logs_enabled: bool,
    pub auto_delete_error_logs_days: u32,
    pub auto_delete_request_logs_enabled: bool,
    pub auto_delete_request_logs_days: u32,
    pub error_log_record_request_body: bool,
    /// The share of requests the request log keeps (0: none, 1: all); the error log keeps
    /// every failed request, and the dashboard counts every request.
    pub request_sample: f64,
}

impl Default for LogsSection {
    fn default() -> Self {
        LogsSection {
            auto_delete_error_logs_enabled: true,
            auto_delete_error_logs_days: 7,
            auto_delete_request_logs_enabled: true,
            auto_delete_request_logs_days: 30,
            error_log_record_request_body: false,
            request_sample: 1.0,
        }
    }
}

/// `[fetch]`: gemgate fetching URLs a client names (image and file URLs of chat requests).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchSection {
    pub enabled: bool,
    /// Addresses, blocks and host names fetched although they are not public
    /// (`10.1.0.0/16`, `images.internal`, `*.corp.example`).
    pub allow: Vec<String>,
    /// All bytes fetched for one request, at most.
    pub max_bytes: u64,
}

impl Default for FetchSection {
    fn default() -> Self {
        FetchSection {
            enabled: true,
            allow: Vec::new(),
            max_bytes: 20 * 1024 * 1024,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The runtime config
// ---------------------------------------------------------------------------------------------

/// Where upstream requests go, parsed from `BASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// The path prefix without a trailing slash, e.g. `/v1beta`.
    pub path: String,
    /// The `Host` header value: the host, and the port when it is not the scheme's default.
    pub authority: String,
}

impl fmt::Display for BaseUrl {
    /// The URL again: `https://generativelanguage.googleapis.com/v1beta`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.path)
    }
}

impl BaseUrl {
    pub fn parse(raw: &str) -> Result<BaseUrl, String> {
        let uri: http::Uri = raw
            .trim()
            .parse()
            .map_err(|e| format!("not a URL ({e}): {raw:?}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("must start with http:// or https://, got {raw:?}")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("no host in {raw:?}"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(
                "must not carry credentials (user:password@): the pool's keys authenticate".into(),
            );
        }
        if uri.query().is_some() {
            return Err(format!("must not have a query string: {raw:?}"));
        }
        let path = uri.path().trim_end_matches('/').to_owned();
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| host.clone());
        Ok(BaseUrl {
            tls,
            host,
            port,
            path,
            authority,
        })
    }
}

/// One Gemini API key of the pool, as configured.
#[derive(Debug, Clone)]
pub struct KeySpec {
    /// Stable id derived from the secret: `k` + 12 hex digits.
    pub id: String,
    pub secret: Secret,
    pub label: String,
    pub tags: Vec<String>,
    pub weight: u32,
    /// Where the key is configured: the file, the environment (`API_KEYS`), or both.
    pub source: KeySource,
    /// The Cloud project it belongs to (`None`: its own).
    pub project: Option<String>,
    pub tier: Option<String>,
    /// A Vertex AI express mode key (`kind = "vertex_express"`): it serves generation, token
    /// counts and embeddings, at `upstream.vertex_base_url`, and nothing else.
    pub vertex: bool,
}

/// Where a key of the pool comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    #[default]
    File,
    Env,
    Both,
}

/// A client token accepted on the proxy routes.
#[derive(Debug, Clone)]
pub struct ClientToken {
    pub name: String,
    pub secret: Secret,
}

/// What the gateway may fetch of the URLs clients give.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub enabled: bool,
    pub allow: Vec<net::Allowed>,
    pub max_bytes: u64,
}

/// The validated configuration the gateway runs on.
pub struct Config {
    /// The file it was read from (`None`: the embedded defaults).
    pub path: Option<PathBuf>,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub threads: usize,
    pub max_body_bytes: u64,
    pub grace_period: Duration,
    pub log_level: String,
    pub base_url: BaseUrl,
    pub vertex_base_url: BaseUrl,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_retries: u32,
    pub pool_size: usize,
    pub custom_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub keys: Vec<KeySpec>,
    pub max_failures: u32,
    pub tokens: Vec<ClientToken>,
    pub auth_token: Option<Secret>,
    /// `PAID_KEY`: the key for image generation, kept apart from the pool.
    pub paid_key: Option<KeySpec>,
    pub policy: PolicyConfig,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub trusted_proxies: Vec<net::Cidr>,
    /// `server.public_url` without a trailing slash.
    pub public_url: Option<String>,
    /// `server.tls_cert_file` and `server.tls_key_file`, checked to load.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub live_sessions_per_client: usize,
    pub max_data_bytes: u64,
    pub fetch: FetchConfig,
    /// Client headers forwarded although gemgate drops them by default.
    pub forward_headers: Vec<http::HeaderName>,
    /// Set when this instance is a member of a fleet (`[cluster]`).
    pub cluster: Option<ClusterConfig>,
    /// `metrics.listen`: a listener serving the metrics alone.
    pub metrics_listen: Option<SocketAddr>,
    /// `[quota]` over the shipped tiers.
    pub quota: quota::QuotaLimits,
    /// Every section as read, for the features that consume them.
    pub file: FileConfig,
}

/// A fleet membership, validated. Its `Debug` shows neither the secret nor the URL's password.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub redis_url: Secret,
    pub name: String,
    pub secret: Secret,
    /// `None`: the host name and the listening port, found at start.
    pub instance: Option<String>,
}

impl ClusterConfig {
    /// The Redis URL without its password, for logs and pages.
    pub fn redis_shown(&self) -> String {
        match url::Url::parse(self.redis_url.expose()) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("…"));
                }
                u.to_string()
            }
            Err(_) => "(invalid URL)".to_owned(),
        }
    }
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis", &self.redis_shown())
            .field("name", &self.name)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// `[cluster]` checked: a URL Redis accepts, a name usable in Redis key names, and the secret
/// a fleet needs.
fn cluster(section: &ClusterSection) -> Result<Option<ClusterConfig>, ConfigError> {
    let url = section.redis_url.trim();
    if url.is_empty() {
        return Ok(None);
    }
    let parsed = url::Url::parse(url)
        .map_err(|e| invalid("cluster.redis_url", format!("not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "redis" | "rediss") || parsed.host_str().is_none() {
        return Err(invalid(
            "cluster.redis_url",
            "must be redis://host[:port][/db] or rediss://… (TLS)",
        ));
    }
    let name = match section.name.trim() {
        "" => "gemgate".to_owned(),
        n => n.to_owned(),
    };
    let name_ok = name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !name_ok {
        return Err(invalid(
            "cluster.name",
            "at most 64 letters, digits, '-', '_' or '.'",
        ));
    }
    if section.secret.chars().count() < 16 {
        return Err(invalid(
            "cluster.secret",
            "a fleet needs a secret of at least 16 characters (it encrypts the key secrets the \
             fleet keeps in Redis); every instance of the fleet must have the same one",
        ));
    }
    let instance = match section.instance.trim() {
        "" => None,
        i if i.len() <= 128 && !i.chars().any(char::is_control) => Some(i.to_owned()),
        _ => {
            return Err(invalid(
                "cluster.instance",
                "at most 128 characters, none a control character",
            ));
        }
    };
    Ok(Some(ClusterConfig {
        redis_url: Secret::new(url),
        name,
        secret: Secret::new(section.secret.as_str()),
        instance,
    }))
}

/// Shows where the config came from and its shape, never a secret: the file's sections hold
/// keys and tokens in clear.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("path", &self.path)
            .field("listen", &self.listen)
            .field("base_url", &self.base_url.to_string())
            .field("keys", &self.keys.len())
            .field("tokens", &self.tokens.len())
            .field("auth_token", &self.auth_token.is_some())
            .finish_non_exhaustive()
    }
}

/// The variables of the process environment and of `.env`, environment winning.
pub fn gather_env(dotenv_dir: &Path) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    if let Ok(iter) = dotenvy::from_path_iter(dotenv_dir.join(".env")) {
        for (k, v) in iter.flatten() {
            vars.insert(k, v);
        }
    }
    for (k, v) in std::env::vars() {
        vars.insert(k, v);
    }
    vars
}

/// Reads and validates the config at `path` (or the embedded defaults when `path` is the
/// default path and does not exist), with `vars` as environment overrides.
pub fn load(
    path: &Path,
    explicit: bool,
    vars: &BTreeMap<String, String>,
) -> Result<Config, ConfigError> {
    load_with(path, explicit, vars, &edit::FleetEdits::default())
}

/// [`load`], with a fleet's admin `edits` laid over the file.
pub fn load_with(
    path: &Path,
    explicit: bool,
    vars: &BTreeMap<String, String>,
    edits: &edit::FleetEdits,
) -> Result<Config, ConfigError> {
    let (text, source) = match std::fs::read_to_string(path) {
        Ok(text) => (text, Some(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            (EMBEDDED_DEFAULTS.to_owned(), None)
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let shown = source
        .as_ref()
        .map_or("embedded defaults".to_owned(), |p| p.display().to_string());
    let text = edits.apply(&text).map_err(|message| ConfigError::Invalid {
        field: "the fleet's admin edits".to_owned(),
        message,
    })?;
    from_str(&text, &shown, vars).map(|mut c| {
        c.path = source;
        c
    })
}

/// Parses and validates config text; `origin` names it in errors.
pub fn from_str(
    text: &str,
    origin: &str,
    vars: &BTreeMap<String, String>,
) -> Result<Config, ConfigError> {
    let parse_err = |e: toml::de::Error| ConfigError::Parse {
        path: origin.to_owned(),
        message: parse_message(&e, text),
    };
    // Parse the file alone first, so its errors point at its own lines.
    let file_only = toml::from_str::<FileConfig>(text).map_err(parse_err)?;
    let mut tree: toml::Value = toml::from_str(text).map_err(parse_err)?;
    env::apply(&mut tree, vars)?;
    let mut file: FileConfig =
        tree.try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: "environment".to_owned(),
                message: without_values(e.message()),
            })?;
    // The pool is the union of the file's keys and API_KEYS: the environment adds keys, it
    // does not hide the file's (which the admin page edits).
    let file_secrets: HashSet<String> = file_only
        .keys
        .api_keys
        .iter()
        .map(|k| k.secret().to_owned())
        .collect();
    // An empty `API_KEYS=` adds no keys (and hides none).
    let env_secrets: HashSet<String> = if vars.contains_key("API_KEYS") {
        let env_keys = std::mem::take(&mut file.keys.api_keys);
        let secrets = env_keys.iter().map(|k| k.secret().to_owned()).collect();
        file.keys.api_keys = file_only.keys.api_keys.clone();
        file.keys.api_keys.extend(env_keys);
        secrets
    } else {
        HashSet::new()
    };
    let mut config = validate(file)?;
    for k in &mut config.keys {
        let secret = k.secret.expose();
        k.source = match (file_secrets.contains(secret), env_secrets.contains(secret)) {
            (true, true) => KeySource::Both,
            (false, true) => KeySource::Env,
            _ => KeySource::File,
        };
    }
    Ok(config)
}

/// Checks every section, in order, and builds the config the gateway runs on.
fn validate(file: FileConfig) -> Result<Config, ConfigError> {
    let server = &file.server;
    let listen = listen_addr(&server.listen)?;
    let log_level = log_level(&server.log_level)?;
    if !matches!(server.log_format.as_str(), "text" | "json") {
        return Err(invalid("server.log_format", "text or json"));
    }
    check_limits(&file)?;
    check_aliases(&file.models.aliases)?;
    let durations = durations(&file)?;
    let up = &file.upstream;
    let base_url = BaseUrl::parse(&up.base_url).map_err(|m| invalid("upstream.base_url", m))?;
    let vertex_base_url =
        BaseUrl::parse(&up.vertex_base_url).map_err(|m| invalid("upstream.vertex_base_url", m))?;
    check_proxies(&up.proxies)?;
    let (tokens, auth_token) = tokens(&file.auth)?;
    let public_url = public_url(&server.public_url)?;
    let tls = tls_files(server)?;
    let policy = validate_policy(&file.policy)?;
    let custom_headers = custom_headers(up)?;
    let quota = quota::QuotaLimits::resolve(&file.quota).map_err(|m| invalid("quota", m))?;
    let keys = keys(&file.keys)?;
    check_tiers(&keys, &quota)?;
    let trusted_proxies = parse_all(&server.trusted_proxies, net::Cidr::parse)
        .map_err(|m| invalid("server.trusted_proxies", m))?;
    let fetch = fetch_config(&file.fetch)?;
    let forward_headers = forward_headers(&up.forward_headers)?;
    let cluster = cluster(&file.cluster)?;
    let metrics_listen = match file.metrics.listen.trim() {
        "" => None,
        addr => Some(
            addr.parse::<SocketAddr>()
                .map_err(|e| invalid("metrics.listen", format!("not an address: {e}")))?,
        ),
    };
    Ok(Config {
        path: None,
        listen,
        data_dir: server.data_dir.clone(),
        threads: threads(server.threads),
        max_body_bytes: server.max_body_bytes,
        grace_period: Duration::from_secs(server.grace_period_s),
        log_level,
        base_url,
        vertex_base_url,
        timeout: durations.timeout,
        connect_timeout: durations.connect,
        max_retries: up.max_retries,
        pool_size: up.pool_size,
        custom_headers,
        keys,
        max_failures: file.keys.max_failures.max(1),
        tokens,
        auth_token,
        paid_key: paid_key(&file.keys.paid_key),
        policy,
        max_connections: server.max_connections,
        header_timeout: durations.header,
        trusted_proxies,
        public_url,
        tls,
        live_sessions_per_client: server.live_sessions_per_client.max(1),
        max_data_bytes: server.max_data_bytes,
        fetch,
        forward_headers,
        cluster,
        metrics_listen,
        quota,
        file,
    })
}

/// Every tier a key names is shipped or configured (a misspelt tier would silently lift its
/// keys' limits), and the keys of one project that name a tier name the same one (a key
/// naming none has its project's).
fn check_tiers(keys: &[KeySpec], quota: &quota::QuotaLimits) -> Result<(), ConfigError> {
    let mut tiers: HashMap<&str, &str> = HashMap::new();
    for k in keys {
        let (Some(project), Some(tier)) = (k.project.as_deref(), k.tier.as_deref()) else {
            continue;
        };
        match tiers.insert(project, tier) {
            Some(other) if other != tier => {
                return Err(invalid(
                    "keys.api_keys",
                    format!(
                        "the keys of project {project:?} name different tiers ({other} and {tier}): a project has one"
                    ),
                ));
            }
            _ => {}
        }
    }
    match keys
        .iter()
        .filter_map(|k| k.tier.as_deref())
        .find(|t| !quota.knows_tier(t))
    {
        Some(t) => Err(invalid(
            "keys.api_keys",
            format!(
                "tier {t:?} is not defined: the tiers are {} (define others in [quota.tiers])",
                quota.tier_names().join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// `server.listen` as a socket address.
fn listen_addr(listen: &str) -> Result<SocketAddr, ConfigError> {
    listen.parse().map_err(|_| {
        invalid(
            "server.listen",
            format!("expected host:port like 0.0.0.0:8000, got {listen:?}"),
        )
    })
}

/// `server.log_level`, normalized.
fn log_level(level: &str) -> Result<String, ConfigError> {
    normalize_log_level(level)
        .ok_or_else(|| invalid("server.log_level", format!("unknown level {level:?}")))
}

/// Every `upstream.proxies` entry must be a proxy URL.
fn check_proxies(proxies: &[String]) -> Result<(), ConfigError> {
    for proxy in proxies {
        if let Err(why) = net::ProxyUrl::parse(proxy) {
            return Err(invalid("upstream.proxies", why));
        }
    }
    Ok(())
}

/// The TLS certificate and key files, when both are set, once they load.
fn tls_files(server: &ServerSection) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    let (cert, key) = (server.tls_cert_file.trim(), server.tls_key_file.trim());
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => return Ok(None),
        (false, false) => {}
        _ => {
            return Err(invalid(
                "server.tls_cert_file",
                "set both tls_cert_file and tls_key_file, or neither",
            ));
        }
    }
    tls::acceptor(cert, key).map_err(|m| invalid("server.tls_cert_file", m))?;
    Ok(Some((cert.into(), key.into())))
}

/// `server.public_url` without a trailing slash (`None` when unset).
fn public_url(url: &str) -> Result<Option<String>, ConfigError> {
    Ok(match url.trim() {
        "" => None,
        url => Some(
            BaseUrl::parse(url)
                .map_err(|m| invalid("server.public_url", m))?
                .to_string(),
        ),
    })
}

/// `server.threads`, or one per core when it is 0.
fn threads(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        threads
    }
}

/// `PAID_KEY` as a key of its own (`None` when unset).
fn paid_key(key: &str) -> Option<KeySpec> {
    Some(key.trim()).filter(|k| !k.is_empty()).map(|k| KeySpec {
        id: stable_id("k", k),
        secret: Secret::new(k),
        label: "paid".into(),
        tags: vec!["paid".into()],
        weight: 1,
        source: KeySource::File,
        project: None,
        tier: None,
        vertex: false,
    })
}

/// `[fetch]`, its allow list parsed.
fn fetch_config(fetch: &FetchSection) -> Result<FetchConfig, ConfigError> {
    Ok(FetchConfig {
        enabled: fetch.enabled,
        allow: parse_all(&fetch.allow, net::Allowed::parse)
            .map_err(|m| invalid("fetch.allow", m))?,
        max_bytes: fetch.max_bytes,
    })
}

/// `upstream.forward_headers` as header names.
fn forward_headers(names: &[String]) -> Result<Vec<http::HeaderName>, ConfigError> {
    parse_all(names, |name| {
        http::HeaderName::try_from(name.trim().to_ascii_lowercase())
            .map_err(|_| format!("{name:?} is not a header name"))
    })
    .map_err(|m| invalid("upstream.forward_headers", m))
}

/// Each of `items` parsed by `parse`, or the first complaint.
fn parse_all<T>(
    items: &[String],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    items.iter().map(|i| parse(i)).collect()
}

/// The limits and counts that have a floor or a range.
/// Every alias a model name (`*` for any run of characters), every target a model name.
fn check_aliases(aliases: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    let name_ok = |s: &str, wildcard: bool| {
        let s = model_name(s);
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b) || wildcard && b == b'*')
    };
    for (alias, target) in aliases {
        if !name_ok(alias, true) {
            return Err(invalid(
                "models.aliases",
                format!("{alias:?} is not a model name (letters, digits, - . _ and * only)"),
            ));
        }
        if !name_ok(target, false) {
            return Err(invalid(
                "models.aliases",
                format!("{alias:?} stands for {target:?}, which is not a model name"),
            ));
        }
    }
    Ok(())
}

fn check_limits(file: &FileConfig) -> Result<(), ConfigError> {
    let server = &file.server;
    if server.max_body_bytes < 1024 {
        return Err(invalid("server.max_body_bytes", "must be at least 1024"));
    }
    if file.upstream.max_retries == 0 {
        return Err(invalid("upstream.max_retries", "must be at least 1"));
    }
    if server.max_connections == 0 {
        return Err(invalid("server.max_connections", "must be at least 1"));
    }
    // redb's file starts at about 2.5 MiB and grows by doubling: below 16 MiB the step past
    // the cap is more than 5% of it.
    if server.max_data_bytes < 16 << 20 {
        return Err(invalid("server.max_data_bytes", "must be at least 16 MiB"));
    }
    if !(0.0..=1.0).contains(&file.logs.request_sample) {
        return Err(invalid(
            "logs.request_sample",
            "must be a share from 0 (no request log) to 1 (every request)",
        ));
    }
    Ok(())
}

/// The timeouts the runtime config holds as `Duration`s.
struct Durations {
    timeout: Duration,
    connect: Duration,
    header: Duration,
}

/// Every time setting, checked. Durations panic on NaN or infinity, so every float is checked;
/// each has a ceiling too: a deadline a year away is a mistake, and one far enough away
/// overflows the clock it is added to.
fn durations(file: &FileConfig) -> Result<Durations, ConfigError> {
    let seconds = |path: &str, v: f64, max: u64| {
        positive_secs(v)
            .filter(|d| d.as_secs() <= max)
            .ok_or_else(|| {
                invalid(
                    path,
                    format!("must be a positive number of seconds, at most {max}"),
                )
            })
    };
    let within = |path: &str, v: f64, max: f64| {
        if v.is_finite() && (0.0..=max).contains(&v) {
            Ok(())
        } else {
            Err(invalid(
                path,
                format!("must be a number from 0 to {max}, not {v}"),
            ))
        }
    };
    within(
        "keys.check_interval_hours",
        file.keys.check_interval_hours,
        8760.0,
    )?;
    within("stream.min_delay", file.stream.min_delay, 60.0)?;
    within("stream.max_delay", file.stream.max_delay, 60.0)?;
    within(
        "stream.fake_stream_empty_data_interval_s",
        file.stream.fake_stream_empty_data_interval_s,
        3600.0,
    )?;
    if file.server.grace_period_s > 86_400 {
        return Err(invalid(
            "server.grace_period_s",
            "must be at most 86400 seconds",
        ));
    }
    Ok(Durations {
        timeout: seconds("upstream.timeout_s", file.upstream.timeout_s, 86_400)?,
        connect: seconds(
            "upstream.connect_timeout_s",
            file.upstream.connect_timeout_s,
            3600,
        )?,
        header: seconds(
            "server.header_timeout_s",
            file.server.header_timeout_s,
            3600,
        )?,
    })
}

/// `CUSTOM_HEADERS` as header names and values.
fn custom_headers(
    up: &UpstreamSection,
) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, ConfigError> {
    let mut headers = Vec::new();
    for (name, value) in &up.custom_headers {
        let name = http::HeaderName::try_from(name.as_str()).map_err(|_| {
            invalid(
                "upstream.custom_headers",
                format!("{name:?} is not a header name"),
            )
        })?;
        let mut value = http::HeaderValue::try_from(value.as_str()).map_err(|_| {
            invalid(
                "upstream.custom_headers",
                format!("the value of {name} is not a header value"),
            )
        })?;
        // Treated as secrets: `Debug` of a sensitive value prints nothing of it.
        value.set_sensitive(true);
        headers.push((name, value));
    }
    Ok(headers)
}

/// The key pool, each key once.
fn keys(section: &KeysSection) -> Result<Vec<KeySpec>, ConfigError> {
    let mut keys = Vec::new();
    let mut seen = HashSet::new();
    for entry in &section.api_keys {
        let (secret, label, tags, weight, project, tier, vertex) = match entry {
            KeyEntry::Plain(k) => (k.trim(), None, Vec::new(), None, None, None, false),
            KeyEntry::Detailed {
                key,
                label,
                tags,
                weight,
                project,
                tier,
                kind,
            } => (
                key.trim(),
                label.clone(),
                tags.clone(),
                *weight,
                short_name(project.as_deref(), "project")?,
                short_name(tier.as_deref(), "tier")?,
                match kind.as_deref().map(str::trim) {
                    None | Some("" | "gemini") => false,
                    Some("vertex_express") => true,
                    Some(other) => {
                        return Err(invalid(
                            "keys.api_keys",
                            format!("kind {other:?}: a key is of kind gemini or vertex_express"),
                        ));
                    }
                },
            ),
        };
        if secret.is_empty() {
            continue;
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "keys.api_keys",
                format!("key {} has characters an API key cannot have", mask(secret)),
            ));
        }
        if !seen.insert(secret.to_owned()) {
            continue; // the same key twice is one key
        }
        keys.push(KeySpec {
            id: stable_id("k", secret),
            secret: Secret::new(secret),
            label: label.unwrap_or_else(|| mask(secret)),
            tags,
            weight: weight.unwrap_or(1),
            source: KeySource::File,
            project,
            tier,
            vertex,
        });
    }
    Ok(keys)
}

/// A key's `project` or `tier`: at most 128 visible characters (empty: none).
fn short_name(name: Option<&str>, what: &str) -> Result<Option<String>, ConfigError> {
    match name.map(str::trim) {
        None | Some("") => Ok(None),
        Some(n) if n.len() <= 128 && n.chars().all(|c| !c.is_control()) => Ok(Some(n.to_owned())),
        Some(_) => Err(invalid(
            "keys.api_keys",
            format!("a key's {what} has at most 128 characters, none a control character"),
        )),
    }
}

/// The client tokens and the admin token, which may not be one of them.
fn tokens(auth: &AuthSection) -> Result<(Vec<ClientToken>, Option<Secret>), ConfigError> {
    let mut tokens = Vec::new();
    let mut names = HashSet::new();
    for entry in &auth.allowed_tokens {
        let (name, secret) = match entry {
            TokenEntry::Plain(t) => (stable_id("token-", t.trim()), t.trim()),
            TokenEntry::Named { name, token } => (name.clone(), token.trim()),
        };
        if secret.is_empty() {
            continue;
        }
        if !names.insert(name.clone()) {
            return Err(invalid(
                "auth.allowed_tokens",
                format!("the name {name:?} is used twice"),
            ));
        }
        tokens.push(ClientToken {
            name,
            secret: Secret::new(secret),
        });
    }
    let admin = Some(auth.auth_token.trim())
        .filter(|t| !t.is_empty())
        .map(Secret::new);
    // gemini-balance made every client an admin this way; here it is a mistake to refuse.
    if admin
        .as_ref()
        .is_some_and(|a| tokens.iter().any(|t| t.secret == *a))
    {
        return Err(invalid(
            "auth.auth_token",
            "the admin token is also a client token (ALLOWED_TOKENS): every client would be an admin; choose another",
        ));
    }
    Ok((tokens, admin))
}

/// What a plugin failure does to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Skip the failing plugin: the request goes on with the built-in behaviour.
    Fallback,
    /// Refuse the request with a 500.
    Deny,
}

/// The validated `[policy]` section.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub dir: Option<PathBuf>,
    pub on_error: OnError,
    pub limits: Limits,
    pub require_tests: bool,
}

impl Config {
    /// The templates folder in use, found as [`Config::plugin_dir`] finds plugins.
    pub fn template_dir(&self) -> Option<PathBuf> {
        self.find_dir(self.file.server.templates_dir.as_deref(), "templates")
    }

    /// `configured` (relative to the config file's folder), else `name/` beside the config
    /// file, else `name/` in the working directory.
    fn find_dir(&self, configured: Option<&Path>, name: &str) -> Option<PathBuf> {
        let base = self
            .path
            .as_ref()
            .and_then(|p| p.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        if let Some(dir) = configured {
            return Some(base.join(dir));
        }
        [base.join(name), PathBuf::from(name)]
            .into_iter()
            .find(|d| d.is_dir())
    }

    /// The plugins folder in use: `[policy] dir`, else `plugins/` beside the config file, else
    /// `plugins/` in the working directory. `None`: the plugins built into gemgate.
    pub fn plugin_dir(&self) -> Option<PathBuf> {
        self.find_dir(self.policy.dir.as_deref(), "plugins")
    }
}

fn validate_policy(p: &PolicySection) -> Result<PolicyConfig, ConfigError> {
    let on_error = match p.on_error.as_str() {
        "fallback" => OnError::Fallback,
        "deny" => OnError::Deny,
        other => {
            return Err(invalid(
                "policy.on_error",
                format!("expected \"fallback\" or \"deny\", got {other:?}"),
            ));
        }
    };
    if p.instruction_limit < 1000 {
        return Err(invalid("policy.instruction_limit", "must be at least 1000"));
    }
    if p.time_limit_ms == 0 {
        return Err(invalid("policy.time_limit_ms", "must be at least 1"));
    }
    if p.memory_limit_mb == 0 {
        return Err(invalid("policy.memory_limit_mb", "must be at least 1"));
    }
    Ok(PolicyConfig {
        dir: p.dir.clone(),
        require_tests: p.require_tests,
        on_error,
        limits: Limits {
            instructions: p.instruction_limit,
            time: Duration::from_millis(p.time_limit_ms),
            memory_bytes: (p.memory_limit_mb as usize).saturating_mul(1024 * 1024),
        },
    })
}

/// Every file of `dir` named `*.{ext}`, in name order: (name without the extension, path, text).
/// Plugins and templates are read this way.
pub fn read_folder(dir: &Path, ext: &str) -> std::io::Result<Vec<(String, PathBuf, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(ext) || !path.is_file() {
            continue;
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let text = std::fs::read_to_string(&path)?;
        out.push((name, path, text));
    }
    out.sort();
    Ok(out)
}

/// A TOML error as `line L, column C: message`, without the quoted line that toml's own text
/// shows: that line may hold a key or a token.
fn parse_message(e: &toml::de::Error, text: &str) -> String {
    let message = without_values(e.message());
    let Some(span) = e.span() else {
        return message;
    };
    let before = &text.as_bytes()[..span.start.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    match key_at(text, line) {
        Some(key) => format!("line {line}, column {column} ({key}): {message}"),
        None => format!("line {line}, column {column}: {message}"),
    }
}

/// The setting line `line` (from 1) of TOML `text` sets, as `section.key`: its name, never its
/// value.
fn key_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let (key, _) = lines.get(line - 1)?.split_once('=')?;
    let key = key.trim();
    let bare = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    };
    if !bare(key) {
        return None;
    }
    let section = lines[..line - 1]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(['[', ']']).trim())
        .filter(|s| bare(s));
    Some(match section {
        Some(section) => format!("{section}.{key}"),
        None => key.to_owned(),
    })
}

/// A deserialisation message with the string values it quotes left out (`invalid type: string
/// "AIza…", expected …` names the value, which may be a secret).
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message.trim();
    while let Some(at) = rest.find("string \"") {
        let (head, tail) = rest.split_at(at + "string \"".len());
        out.push_str(head);
        out.push_str("…\"");
        rest = tail.split_once('"').map_or("", |(_, after)| after);
    }
    out.push_str(rest);
    out
}

/// `models/gemini-2.5-flash` → `gemini-2.5-flash`.
pub fn model_name(m: &str) -> &str {
    m.trim().strip_prefix("models/").unwrap_or(m.trim())
}

/// `s` seconds as a `Duration`, if it is a positive number a `Duration` can hold.
fn positive_secs(s: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(s).ok().filter(|d| !d.is_zero())
}

/// Accepts gemini-balance's level names (`DEBUG`, `WARNING`, `CRITICAL`, …) and tracing
/// filter directives (`info,gemgate=debug`).
fn normalize_log_level(raw: &str) -> Option<String> {
    let lower = raw.trim().to_ascii_lowercase();
    let level = match lower.as_str() {
        "" => "info",
        "trace" | "debug" | "info" | "warn" | "error" | "off" => lower.as_str(),
        "warning" => "warn",
        "critical" | "fatal" => "error",
        // NOTE: tracing-subscriber's directive parser panics on some non-ASCII text (it
        // slices within a character), and compiles field values as regexes, which takes
        // seconds for a long one: only short, plain ASCII directives reach it.
        _ if raw.contains(['=', ','])
            && raw.trim().len() <= 256
            && raw.trim().bytes().all(|b| b.is_ascii_graphic())
            && tracing_subscriber::EnvFilter::try_new(raw.trim()).is_ok() =>
        {
            return Some(raw.trim().to_owned());
        }
        _ => return None,
    };
    Some(level.to_owned())
}

/// What one plugin hook call may use (`[policy]` limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub instructions: u64,
    pub time: Duration,
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            instructions: 1_000_000,
            time: Duration::from_millis(50),
            memory_bytes: 16 * 1024 * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let c = from_str(EMBEDDED_DEFAULTS, "defaults", &BTreeMap::new()).unwrap();
        assert!(c.keys.is_empty());
        assert_eq!(c.listen.port(), 8000);
        assert_eq!(c.max_retries, 3);
    }

    #[test]
    fn env_wins_over_file() {
        let text = "[upstream]\nmax_retries = 5\n";
        let c = from_str(
            text,
            "t",
            &vars(&[("MAX_RETRIES", "7"), ("API_KEYS", r#"["a1","b2","a1"]"#)]),
        )
        .unwrap();
        assert_eq!(c.max_retries, 7);
        assert_eq!(c.keys.len(), 2, "duplicates are merged");
        assert_ne!(c.keys[0].id, c.keys[1].id);
        assert!(!c.keys[0].id.contains("a1"));
    }

    #[test]
    fn parse_errors_name_the_line_but_never_quote_it() {
        let text = "[auth]\nallowed_tokens = [\"sk-live-SECRET\"]\nauth_token = \"adm-SECRET\n";
        let err = from_str(text, "t", &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
        let err = from_str(
            "[keys]\nmax_failures = \"key-SECRET\"\n",
            "t",
            &BTreeMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("SECRET") && err.contains("line 2"), "{err}");
        assert!(err.contains("keys.max_failures"), "{err}");
        let err = from_str("", "t", &vars(&[("MAX_FAILURES", "x")])).unwrap_err();
        assert!(err.to_string().contains("MAX_FAILURES"), "{err}");
    }

    #[test]
    fn an_empty_api_keys_adds_nothing_and_hides_nothing() {
        let text = "[keys]\napi_keys = [\"file-key-1\"]\n";
        for empty in ["", " ", "[]"] {
            let c = from_str(text, "t", &vars(&[("API_KEYS", empty)])).unwrap();
            assert_eq!(c.keys.len(), 1, "API_KEYS={empty:?}");
            assert_eq!(c.keys[0].source, KeySource::File);
        }
    }

    #[test]
    fn a_key_names_a_known_tier_and_a_project_one_tier() {
        let keys = |entries: &str| format!("[keys]\napi_keys = [{entries}]\n");
        let err = |text: &str| from_str(text, "t", &vars(&[])).unwrap_err().to_string();
        let e = err(&keys(r#"{ key = "k1", tier = "fre" }"#));
        assert!(
            e.contains("\"fre\" is not defined") && e.contains("free, tier1"),
            "{e}"
        );
        let e = err(&keys(
            r#"{ key = "k1", project = "p", tier = "free" }, { key = "k2", project = "p", tier = "tier1" }"#,
        ));
        assert!(e.contains("different tiers (free and tier1)"), "{e}");
        let ok = keys(r#"{ key = "k1", project = "p", tier = "mine" }"#)
            + "[quota.tiers.mine.limits.m]\nrpm = 3\n";
        let c = from_str(&ok, "t", &vars(&[])).unwrap();
        assert_eq!(c.quota.limit(Some("mine"), "m").unwrap().rpm, Some(3));
        let env = vars(&[("GEMGATE_QUOTA_LIMITS", r#"{"m": {"rpm": 2}}"#)]);
        let c = from_str("", "t", &env).unwrap();
        assert_eq!(c.quota.limit(None, "m").unwrap().rpm, Some(2));
    }

    #[test]
    fn durations_and_shares_must_be_finite() {
        for (var, value) in [
            ("CHECK_INTERVAL_HOURS", "inf"),
            ("CHECK_INTERVAL_HOURS", "1e300"),
            ("GEMGATE_GRACE_PERIOD_SECONDS", "99999999999"),
            ("CHECK_INTERVAL_HOURS", "NaN"),
            ("STREAM_MIN_DELAY", "NaN"),
            ("STREAM_MAX_DELAY", "-1"),
            ("FAKE_STREAM_EMPTY_DATA_INTERVAL_SECONDS", "inf"),
            ("TIME_OUT", "NaN"),
            ("TIME_OUT", "1e300"),
            ("GEMGATE_HEADER_TIMEOUT_SECONDS", "0"),
            ("GEMGATE_REQUEST_LOG_SAMPLE", "NaN"),
            ("GEMGATE_REQUEST_LOG_SAMPLE", "2"),
        ] {
            let err = from_str("", "t", &vars(&[(var, value)]));
            assert!(err.is_err(), "{var}={value} was accepted");
        }
    }

    #[test]
    fn the_admin_token_is_never_a_client_token() {
        let err = from_str(
            "",
            "t",
            &vars(&[("ALLOWED_TOKENS", "sk-a,sk-b"), ("AUTH_TOKEN", "sk-b")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("AUTH_TOKEN") && !err.contains("sk-b"), "{err}");
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = from_str("[upstream]\nmax_retrie = 5\n", "t", &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_retrie"), "{err}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let err = from_str("", "t", &vars(&[("BASE_URL", "ftp://x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("BASE_URL"), "{err}");
        let err = from_str("[server]\nlisten = \"nope\"\n", "t", &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.listen"), "{err}");
    }

    #[test]
    fn base_url_keeps_its_path() {
        let b = BaseUrl::parse("http://127.0.0.1:9000/v1beta/").unwrap();
        assert_eq!(
            (b.tls, b.port, b.path.as_str(), b.authority.as_str()),
            (false, 9000, "/v1beta", "127.0.0.1:9000")
        );
        let b = BaseUrl::parse("https://generativelanguage.googleapis.com/v1beta").unwrap();
        assert_eq!((b.tls, b.port), (true, 443));
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("AIzaSyA1234567890abcdefghijklmnopqrstu");
        let shown = format!("{s:?}");
        assert!(!shown.contains("1234567890"), "{shown}");
        assert_eq!(s.masked(), "AIzaSy…rstu");
        assert_eq!(mask("admin-test-secret"), "…cret");
        assert_eq!(mask("sk-short1"), "…t1");
        assert_eq!(mask("pass"), "…");
    }

    #[test]
    fn gemini_balance_log_levels() {
        assert_eq!(normalize_log_level("WARNING").as_deref(), Some("warn"));
        assert_eq!(normalize_log_level("CRITICAL").as_deref(), Some("error"));
        assert!(normalize_log_level("loud!!").is_none());
        assert!(normalize_log_level("x, é=").is_none());
        let slow = format!("a[s{{f={}}}]=info", "x".repeat(8192));
        let started = std::time::Instant::now();
        assert!(normalize_log_level(&slow).is_none());
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
        assert_eq!(
            normalize_log_level("info,gemgate=debug").as_deref(),
            Some("info,gemgate=debug")
        );
    }
}

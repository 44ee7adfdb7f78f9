//! The running application: the state every request reads, rebuilt as a whole on reload
//! ([`Generation`]), what outlives generations ([`Lasting`]: key state, queues, the store,
//! sessions), and the background work that keeps them (reload, recovery checks, the flusher).

pub mod checks;
pub mod flusher;
pub mod reload;
pub mod session;
pub mod shared;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::http::auth::Tokens;
use crate::keys::{KeyPool, KeyRegistry};
use crate::policy::PolicyError;
use crate::policy::counters::Counters;
use crate::policy::engine::{Policy, PolicyStats};
use crate::templates::{TemplateError, Templates};
use crate::upstream::{Target, fetch};
use reload::{ReloadStatus, Source};

/// Everything one configuration makes: swapped whole on reload; each request keeps the one it
/// started with.
pub struct Generation {
    /// Counts up from 1 with every successful reload.
    pub id: u64,
    pub config: Arc<Config>,
    pub pool: Arc<KeyPool>,
    pub tokens: Tokens,
    pub target: Arc<Target>,
    /// Where keys of kind `vertex_express` are called (`None`: the pool has none).
    pub vertex: Option<Arc<Target>>,
    pub policy: Arc<Policy>,
    pub templates: Arc<Templates>,
    /// `PAID_KEY`, alone, for image generation.
    pub paid: Option<KeyPool>,
    /// Fetches the URLs clients name, by `[fetch]`'s rules.
    pub fetcher: fetch::Fetcher,
}

/// Why a generation could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Template(#[from] TemplateError),
}

impl Generation {
    /// Builds generation `id` from `config`: compiles its plugins (running every `init`) and
    /// makes its pool over the key state kept in `parts`. Upstream connections of `previous`
    /// are kept when the upstream did not change.
    pub fn build(
        config: Config,
        id: u64,
        parts: &Lasting,
        previous: Option<&Generation>,
    ) -> Result<Generation, BuildError> {
        let templates = Templates::load(&config)?;
        let pool = Arc::new(KeyPool::new(
            &config.keys,
            &parts.registry,
            config.max_failures,
            &config.quota,
        ));
        let policy = Policy::compile(
            &config,
            id,
            pool.clone(),
            parts.shared.counters(),
            parts.stats.clone(),
        )?;
        if config.policy.require_tests {
            let before = previous.map(|p| &*p.policy);
            crate::policy::testing::require_passing(&policy, &config.quota, before)?;
        }
        let target = match previous {
            Some(p) if p.target.serves(&config, &config.base_url) => p.target.clone(),
            _ => Arc::new(Target::new(&config)),
        };
        // Vertex AI express keys are called at their own base URL, with its own connections.
        let vertex = config.keys.iter().any(|k| k.vertex).then(|| {
            let base = &config.vertex_base_url;
            match previous.and_then(|p| p.vertex.clone()) {
                Some(v) if v.serves(&config, base) => v,
                _ => Arc::new(Target::of(&config, base)),
            }
        });
        Ok(Generation {
            id,
            pool,
            tokens: Tokens::new(&config.tokens),
            target,
            vertex,
            policy: Arc::new(policy),
            templates: Arc::new(templates),
            fetcher: fetch::Fetcher::new(&config.fetch),
            paid: config.paid_key.as_ref().map(|spec| {
                KeyPool::new(
                    std::slice::from_ref(spec),
                    &parts.registry,
                    config.max_failures,
                    &config.quota,
                )
            }),
            config: Arc::new(config),
        })
    }
}

/// What generations are built over and what outlives them: key state, plugin counters and
/// plugin failure counts.
pub struct Lasting {
    pub registry: Arc<KeyRegistry>,
    /// Usage events on their way to the store.
    pub usage: Arc<crate::store::usage::Usage>,
    /// Log records on their way to the store.
    pub logs: Arc<crate::store::logs::LogQueue>,
    /// Which key each upload and uploaded file belongs to.
    pub files: Arc<crate::keys::owners::FileOwners>,
    /// The redb file (`None` in tests that build a gateway without one).
    pub store: Option<Arc<crate::store::Store>>,
    pub counters: Arc<Counters>,
    pub stats: Arc<PolicyStats>,
    /// The dashboard's figures, fed by the store's flusher.
    pub metrics: Arc<crate::store::metrics::Metrics>,
    /// What `GET /metrics` shows.
    pub prometheus: Arc<crate::metrics::Metrics>,
    /// The trace exporter (`OTEL_EXPORTER_OTLP_ENDPOINT`), if any.
    pub tracer: Option<Arc<crate::traces::Tracer>>,
    /// Admin page sessions and the failed-login throttle.
    pub sessions: Arc<session::Sessions>,
    /// What the request path changes that a fleet shares: see [`shared`].
    pub shared: Arc<dyn shared::SharedState>,
    /// This instance's id in its fleet (`None`: a single instance); its log rows carry it.
    pub instance: Option<Arc<str>>,
    /// Storms: Google throttling this instance's address.
    pub storms: Arc<crate::keys::storm::Storms>,
}

impl Lasting {
    /// Everything new, over `store` (`None` in tests that run a gateway without one), with
    /// shared state kept in this process.
    pub fn new(store: Option<Arc<crate::store::Store>>) -> Lasting {
        let local = shared::Local {
            usage: Arc::default(),
            files: Arc::default(),
            sessions: Arc::default(),
            counters: Arc::default(),
            store: store.clone(),
        };
        Lasting {
            registry: Arc::default(),
            usage: local.usage.clone(),
            logs: Arc::default(),
            files: local.files.clone(),
            store,
            counters: local.counters.clone(),
            stats: Arc::default(),
            metrics: Arc::default(),
            prometheus: Arc::default(),
            tracer: None,
            sessions: local.sessions.clone(),
            shared: Arc::new(local),
            instance: None,
            storms: Arc::default(),
        }
    }

    /// Shared state kept in this process, over this `Lasting`'s tables.
    pub fn local(&self) -> shared::Local {
        shared::Local {
            usage: self.usage.clone(),
            files: self.files.clone(),
            sessions: self.sessions.clone(),
            counters: self.counters.clone(),
            store: self.store.clone(),
        }
    }
}

impl Default for Lasting {
    fn default() -> Self {
        Lasting::new(None)
    }
}

/// Requests and connections refused before they became a client's requests: counted, never
/// logged one by one.
#[derive(Debug, Default)]
pub struct Refused {
    /// Without a valid client token (401, or 429 after too many wrong ones).
    pub unauthenticated: AtomicU64,
    /// Not a request gemgate serves: an unknown path, an over-long target or name, a wrong
    /// method.
    pub malformed: AtomicU64,
    /// Closed at accept: `server.max_connections` were open.
    pub connections: AtomicU64,
    /// Closed because the request head or body came too slowly.
    pub slow: AtomicU64,
}

impl Refused {
    /// Counts a request answered with `status` to a client that never showed a valid token.
    pub(crate) fn count_request(&self, status: u16) {
        let counter = match status {
            401 | 429 => &self.unauthenticated,
            _ => &self.malformed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Each count, by name.
    pub fn counts(&self) -> [(&'static str, u64); 4] {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("unauthenticated", n(&self.unauthenticated)),
            ("malformed", n(&self.malformed)),
            ("connections", n(&self.connections)),
            ("slow", n(&self.slow)),
        ]
    }

    pub fn json(&self) -> serde_json::Value {
        let counts = self
            .counts()
            .map(|(name, n)| (name.to_owned(), serde_json::Value::from(n)));
        serde_json::Value::Object(counts.into_iter().collect())
    }
}

/// The gateway's state across generations.
pub struct State {
    pub current: ArcSwap<Generation>,
    pub lasting: Lasting,
    pub source: Source,
    /// What was refused before it became a client's request.
    pub refused: Refused,
    /// Client connections open now (`server.max_connections` at most).
    pub open_connections: Arc<AtomicUsize>,
    /// Requests being served now (counted per worker thread: every request writes it).
    pub(crate) in_flight: crate::shard::Counter,
    generations: AtomicU64,
    /// When the gateway started (the dashboard's uptime).
    pub started: Instant,
    /// A hash of the config file as the last successful reload read it (see `reload`).
    config_fingerprint: AtomicU64,
    /// SIGTERM arrived: the instance drains and is no longer ready for traffic.
    pub draining: std::sync::atomic::AtomicBool,
    /// Held by a reload while it runs: reloads never overlap.
    pub reloading: Mutex<()>,
    /// Held by an admin edit of the config file, from reading it to the reload that applies it.
    pub edits: Mutex<()>,
    reload: Mutex<ReloadStatus>,
}

impl State {
    /// The state of a starting gateway, serving generation 1 built from `config` over
    /// `lasting` (key state restored from the store).
    pub fn new(config: Config, source: Source, lasting: Lasting) -> Result<Arc<State>, BuildError> {
        let first = Generation::build(config, 1, &lasting, None)?;
        Ok(Arc::new(State {
            current: ArcSwap::from_pointee(first),
            lasting,
            source,
            refused: Refused::default(),
            open_connections: Arc::default(),
            in_flight: crate::shard::Counter::default(),
            generations: AtomicU64::new(1),
            started: Instant::now(),
            config_fingerprint: AtomicU64::new(0),
            draining: Default::default(),
            reloading: Mutex::new(()),
            edits: Mutex::new(()),
            reload: Mutex::new(ReloadStatus {
                generation: 1,
                ..ReloadStatus::default()
            }),
        }))
    }

    /// The generation serving now, for a request to hold until it ends: through a handle of
    /// this thread's own.
    ///
    /// NOTE: holding the generation itself (`current.load_full()`) raised and lowered its
    /// count on every request, one word that every worker thread wrote, moved between their
    /// cores twice a request. The thread's handle is counted on the thread alone; a new one is
    /// made when a reload put another generation in place. (An idle thread keeps its handle on
    /// the generation it last served until its next request.)
    #[allow(clippy::redundant_allocation)] // The outer `Arc` is the thread's handle.
    pub fn serving(&self) -> Arc<Arc<Generation>> {
        thread_local! {
            static NEAR: std::cell::RefCell<Option<Arc<Arc<Generation>>>> =
                const { std::cell::RefCell::new(None) };
        }
        let current = self.current.load();
        NEAR.with_borrow_mut(|near| match near {
            Some(handle) if Arc::ptr_eq(handle.as_ref(), &current) => handle.clone(),
            _ => near
                .insert(Arc::new(arc_swap::Guard::into_inner(current)))
                .clone(),
        })
    }

    pub fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub fn config_fingerprint(&self) -> u64 {
        self.config_fingerprint.load(Ordering::Acquire)
    }

    pub fn set_config_fingerprint(&self, hash: u64) {
        self.config_fingerprint.store(hash, Ordering::Release);
    }

    pub fn reload_status(&self) -> ReloadStatus {
        self.reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_reload_status(&self, status: ReloadStatus) {
        *self.reload.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }
}

//! gemgate: a gateway for Google's Gemini API.
//!
//! Clients call gemgate with gemgate's own tokens; gemgate spreads their requests over a pool
//! of Gemini API keys, retries on another key when one is rate-limited or dead, and streams the
//! answers through as they arrive. See `README.md` for the architecture.
//!
//! `main.rs` only parses arguments; [`run`] builds and runs the pingora server from a validated
//! [`config::Config`], so tests and the binary take the same path.

pub mod admin;
pub mod alloc;
pub mod app;
pub mod clock;
pub mod config;
pub mod fleet;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod shard;
pub mod store;
pub mod telemetry;
pub mod templates;
pub mod traces;
pub mod translate;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pingora::server::configuration::ServerConf;
use pingora::server::{ExecutionPhase, Server};

use app::reload::{self, Source};
use app::{BuildError, State};
use config::Config;
use proxy::Gateway;
use server::workers::{self, Worker};

/// Why gemgate could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start: {0}")]
    Store(#[from] store::StoreError),
    #[error("cannot start: {0}")]
    Build(#[from] BuildError),
    #[error("cannot join the fleet: {0}")]
    Fleet(String),
}

impl RunError {
    /// The process's exit status for this error: 1 when the address is taken, 2 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Listen { .. } => 1,
            RunError::Store(_) | RunError::Build(_) | RunError::Fleet(_) => 2,
        }
    }
}

/// One worker per socket bound on `addr`, serving `gateway` (over TLS with `tls`).
fn add_workers(
    server: &mut Server,
    gateway: &Arc<Gateway>,
    addr: std::net::SocketAddr,
    sockets: Vec<tokio::net::TcpSocket>,
    tls: Option<Arc<pingora::listeners::tls::Acceptor>>,
) {
    for (index, socket) in sockets.into_iter().enumerate() {
        let worker = Worker::new(index, addr, socket, gateway.clone()).with_tls(tls.clone());
        server.add_service(worker);
    }
}

/// The listener's TLS acceptor, when `server.tls_cert_file` is set. The files were checked when
/// the configuration was read: only a file changed since can fail here.
fn tls_acceptor(
    config: &Config,
    addr: std::net::SocketAddr,
) -> Result<Option<Arc<pingora::listeners::tls::Acceptor>>, RunError> {
    let Some((cert, key)) = &config.tls else {
        return Ok(None);
    };
    config::tls::acceptor(&cert.to_string_lossy(), &key.to_string_lossy())
        .map(Some)
        .map_err(|m| RunError::Listen {
            addr,
            source: std::io::Error::other(m),
        })
}

/// Runs gemgate until SIGTERM or SIGINT, and returns once it has drained.
///
/// On SIGTERM the listener stops accepting, requests in flight run to their end (at most
/// `grace_period`), the last state is saved, and `run` returns. Changes to the files `source`
/// names (and to the plugins and templates) are applied while it runs.
pub fn run(config: Config, source: Source) -> Result<(), RunError> {
    raise_fd_limit();
    // Every worker's socket is bound before anything else starts (see `bind_all`).
    let (listen_addr, sockets) =
        workers::bind_all(config.listen, config.threads).map_err(|source| RunError::Listen {
            addr: config.listen,
            source,
        })?;
    let metrics_socket = config.metrics_listen.map(bind_metrics).transpose()?;
    let grace = config.grace_period;
    let tls = tls_acceptor(&config, listen_addr)?;
    let conf = server_conf(&config);
    log_start(&config, listen_addr);

    // Key health from the last run: a disabled key stays out, a cooling key waits.
    let store = Arc::new(store::Store::open(&config.data_dir, config.max_data_bytes)?);
    let mut lasting = restored(&store);
    lasting.tracer = traces::Tracer::from_env(&source.vars());
    let fleet = match &config.cluster {
        Some(cluster) => Some(join_fleet(cluster, &mut lasting, &source, listen_addr)?),
        None => None,
    };
    let state = State::new(config, source, lasting)?;
    if let Some(fleet) = &fleet {
        fleet.attach(&state);
    }
    log_plugins(&state);
    app::flusher::start(store.clone(), state.clone());
    reload::watch(state.clone());
    let last_flush = {
        let state = state.clone();
        move || {
            app::flusher::flush(
                &store,
                &state.lasting,
                state.current.load().config.max_data_bytes,
            )
        }
    };

    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let side = upstream::side_client();
    app::checks::start(state.clone());
    let draining = state.clone();
    let workers = sockets.len();
    if let Some((addr, socket)) = metrics_socket {
        let metrics = Arc::new(Gateway::metrics_only(state.clone(), side.clone()));
        server.add_service(Worker::new(workers, addr, socket, metrics));
        tracing::info!(listen = %addr, "serving the metrics on a listener of their own");
    }
    let gateway = Arc::new(Gateway::new(state, side));
    add_workers(&mut server, &gateway, listen_addr, sockets, tls);

    let phases = server.watch_execution_phase();
    // NOTE: pingora's `run` sleeps the whole grace period after SIGTERM, even with nothing in
    // flight. It runs on a thread of its own, and `run` returns as soon as the drain watcher
    // says the last request is done (or the grace period is over).
    let (done, finished) = std::sync::mpsc::channel();
    let drained = done.clone();
    std::thread::Builder::new()
        .name("gemgate-drain".into())
        .spawn(move || {
            wait_drained(phases, &draining, grace);
            last_flush();
            let _ = drained.send(());
        })
        .expect("spawn the drain watcher");
    std::thread::Builder::new()
        .name("gemgate-server".into())
        .spawn(move || {
            server.run(pingora::server::RunArgs::default());
            let _ = done.send(());
        })
        .expect("spawn the server");
    let _ = finished.recv();
    Ok(())
}

/// The metrics listener's socket on `addr` (`metrics.listen`), bound as early as the others.
fn bind_metrics(
    addr: std::net::SocketAddr,
) -> Result<(std::net::SocketAddr, tokio::net::TcpSocket), RunError> {
    let (addr, mut sockets) =
        workers::bind_all(addr, 1).map_err(|source| RunError::Listen { addr, source })?;
    Ok((addr, sockets.remove(0)))
}

/// Makes this instance a member of the fleet `cluster` names: its shared state goes through
/// the fleet from now on.
fn join_fleet(
    cluster: &config::ClusterConfig,
    lasting: &mut app::Lasting,
    source: &Source,
    listen: std::net::SocketAddr,
) -> Result<Arc<fleet::Fleet>, RunError> {
    let fleet = fleet::Fleet::start(
        cluster,
        lasting.local(),
        lasting.registry.clone(),
        source.fleet_edits.clone(),
        listen,
    )
    .map_err(RunError::Fleet)?;
    lasting.shared = fleet.clone();
    lasting.instance = Some(fleet.instance().into());
    Ok(fleet)
}

/// Pingora's settings for `config`.
fn server_conf(config: &Config) -> ServerConf {
    ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(config.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        // Each worker (see `server::workers`) is a service of its own with one thread.
        work_stealing: false,
        // Pingora's own timers (its "fast timeouts") stay in a table until they expire, even
        // when the read they guarded ended long before: with the 300 s upstream timeout, the
        // table grew for five minutes under load (3.7 MB after three, at 250 calls a second).
        // Tokio's timers are freed with their request: every timeout of a second or more is
        // Tokio's.
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        ..ServerConf::default()
    }
}

/// The start's log lines: what serves, and what is missing.
fn log_start(config: &Config, listen_addr: std::net::SocketAddr) {
    tracing::info!(
        listen = %listen_addr,
        keys = config.keys.len(),
        tokens = config.tokens.len(),
        upstream = %config.base_url,
        config = %config.path.as_ref().map_or("embedded defaults".into(), |p| p.display().to_string()),
        "gemgate starting"
    );
    if config.keys.is_empty() {
        tracing::warn!(
            "no Gemini API key is configured: proxy calls will answer 503 until API_KEYS is set"
        );
    }
    if !config.file.upstream.proxies.is_empty() {
        tracing::info!(
            proxies = config.file.upstream.proxies.len(),
            by_key = config.file.upstream.proxies_use_consistency_hash_by_api_key,
            "upstream calls go through PROXIES"
        );
    }
    if config.tokens.is_empty() {
        tracing::warn!(
            "no client token is configured: proxy calls will answer 401 until ALLOWED_TOKENS is set"
        );
    }
}

/// What outlives generations, over `store`, with the key state and file owners it kept.
fn restored(store: &Arc<store::Store>) -> app::Lasting {
    let lasting = app::Lasting::new(Some(store.clone()));
    match store.load_keys() {
        Ok(saved) => {
            let restored = store::restore(&lasting.registry, saved, clock::now_ms());
            if restored > 0 {
                tracing::info!(keys = restored, "key state restored");
            }
        }
        Err(e) => tracing::error!("cannot read saved key state, starting fresh: {e}"),
    }
    match store.load_files() {
        Ok(files) => lasting.files.restore(files),
        Err(e) => tracing::error!("cannot read the saved file owners: {e}"),
    }
    lasting
}

/// Raises the soft limit on open descriptors to the hard limit: every open stream takes two
/// (the client's connection and Google's), and the usual soft limit of 1024 would refuse
/// connections long before `server.max_connections`.
fn raise_fd_limit() {
    #[cfg(unix)]
    // SAFETY: plain system calls with a valid, initialised limit struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("cannot raise the limit on open files");
            }
        }
    }
}

fn log_plugins(state: &State) {
    let generation = state.current.load();
    let names: Vec<&str> = generation
        .policy
        .enabled()
        .map(|p| p.name.as_str())
        .collect();
    tracing::info!(
        dir = %generation.policy.dir().map_or("built-in".into(), |d| d.display().to_string()),
        plugins = %names.join(","),
        "policy plugins loaded"
    );
}

/// Waits for SIGTERM's graceful phase (from then on `/ready` says the instance drains), then
/// until no request is in flight (or the grace period is over).
fn wait_drained(
    mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>,
    state: &State,
    grace: Duration,
) {
    loop {
        match phases.blocking_recv() {
            Ok(ExecutionPhase::GracefulTerminate) => break,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        }
    }
    state.draining.store(true, Ordering::Release);
    let in_flight = &state.in_flight;
    let started = Instant::now();
    // Let the listeners close before counting.
    std::thread::sleep(Duration::from_millis(100));
    while in_flight.sum() > 0 && started.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = in_flight.sum();
    if left > 0 {
        tracing::warn!(
            left,
            "grace period over: exiting with requests still in flight"
        );
    } else {
        tracing::info!("all requests finished: exiting");
    }
}

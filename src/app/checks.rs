//! Probes of keys with a cheap call on `TEST_MODEL`: every `CHECK_INTERVAL_HOURS` disabled keys
//! are probed, and a key that answers well returns to the pool; and a key whose 403s reached
//! `MAX_FAILURES` is probed before it is disabled ([`confirm`]), since a 403 may have been the
//! client's doing.
//!
//! Probes go straight to the upstream, a few at a time, outside the request path: they are not
//! client traffic and change no key's counters but the probed key's health.

use std::sync::Arc;
use std::time::Duration;

use super::{Generation, State};
use crate::keys::Key;
use crate::keys::taxonomy::{ErrorClass, classify, redact};

/// Probes run at most this many at once.
const CONCURRENCY: usize = 4;
/// A probe gets this long to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a probe went.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Healthy,
    /// The upstream's status (0: no answer), the error class and the message (the key masked
    /// where Google named it).
    Failing(u16, ErrorClass, String),
}

/// Calls `TEST_MODEL` once with `key`, the way calls with that key go: through its proxy when
/// `PROXIES` are set, with the `CUSTOM_HEADERS`.
pub async fn probe(generation: &Generation, key: &Key) -> Probe {
    let test_model = crate::config::model_name(&generation.config.file.keys.test_model);
    let url = format!(
        "{}/models/{test_model}:generateContent",
        generation.config.base_url
    );
    let body = serde_json::json!({
        "contents": [{ "role": "user", "parts": [{ "text": "hi" }] }],
        "generationConfig": { "maxOutputTokens": 1 },
    });
    let target = &generation.target;
    let mut call = target
        .side_client(target.route(&key.spec.id))
        .post(url)
        .header("x-goog-api-key", key.header.clone());
    for (name, value) in &generation.config.custom_headers {
        call = call.header(name, value);
    }
    let sent = call.json(&body).timeout(PROBE_TIMEOUT).send().await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            let class = if e.is_timeout() {
                ErrorClass::Timeout
            } else {
                ErrorClass::Network
            };
            return Probe::Failing(0, class, e.without_url().to_string());
        }
    };
    let status = resp.status().as_u16();
    if (200..300).contains(&status) {
        return Probe::Healthy;
    }
    let body = redact(
        resp.bytes().await.unwrap_or_default(),
        key.spec.secret.expose(),
    );
    let message =
        crate::keys::taxonomy::error_message(&body).unwrap_or_else(|| format!("HTTP {status}"));
    Probe::Failing(status, classify(status, &body), message)
}

/// Confirms a key's 403s with a probe (see [`crate::keys::Penalty::Confirm`]): the key is
/// disabled only if the neutral call is refused for the key's sake too; if it succeeds, the
/// 403s were the requests' doing and the key's failures are forgotten.
pub fn confirm(state: Arc<State>, key_id: String) {
    tokio::spawn(async move {
        let generation = state.current.load_full();
        let Some(index) = generation.pool.index_of(&key_id) else {
            return;
        };
        let key = generation.pool.get(index);
        match probe(&generation, key).await {
            Probe::Healthy => {
                key.state.clear_failures();
                tracing::info!(key = %key_id, "a probe found the key healthy: its 403s were not its fault");
            }
            Probe::Failing(
                status,
                class @ (ErrorClass::KeyForbidden | ErrorClass::Forbidden | ErrorClass::KeyInvalid),
                message,
            ) => {
                key.state.disable(format!(
                    "{} (HTTP {status}), confirmed by a probe: {message}",
                    class.as_str()
                ));
                tracing::warn!(key = %key_id, class = class.as_str(), "key disabled: a probe confirmed its 403s");
            }
            Probe::Failing(status, class, message) => {
                tracing::info!(key = %key_id, status, class = class.as_str(), "the probe of a key's 403s was inconclusive: {message}");
            }
        }
    });
}

/// Probes every disabled key of the current pool; returns (recovered, still failing).
pub async fn check_disabled(state: &State) -> (usize, usize) {
    let generation = state.current.load_full();
    let disabled: Vec<usize> = (0..generation.pool.keys().len())
        .filter(|&i| generation.pool.get(i).state.is_disabled())
        .collect();
    let (mut recovered, mut failing) = (0, 0);
    for batch in disabled.chunks(CONCURRENCY) {
        let mut tasks = tokio::task::JoinSet::new();
        for &i in batch {
            let generation = generation.clone();
            tasks.spawn(async move {
                let result = probe(&generation, generation.pool.get(i)).await;
                (i, result)
            });
        }
        while let Some(Ok((i, result))) = tasks.join_next().await {
            let key = generation.pool.get(i);
            match result {
                Probe::Healthy => {
                    key.state.enable();
                    recovered += 1;
                    tracing::info!(key = %key.spec.id, label = %key.spec.label, "check: key answers again, back in the pool");
                }
                Probe::Failing(status, class, message) => {
                    failing += 1;
                    tracing::info!(key = %key.spec.id, label = %key.spec.label, status, class = class.as_str(), "check: key still failing: {message}");
                }
            }
        }
    }
    (recovered, failing)
}

/// Starts the periodic check, if `CHECK_INTERVAL_HOURS` is not 0. The interval is read from
/// the current config each round, so a reload changes it.
pub fn start(state: Arc<State>) {
    let spawned = std::thread::Builder::new()
        .name("gemgate-checks".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot start the key checks: {e}");
                    return;
                }
            };
            runtime.block_on(async move {
                loop {
                    let hours = state.current.load().config.file.keys.check_interval_hours;
                    if hours <= 0.0 {
                        // Off: look again in a minute, in case a reload turns it on.
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        continue;
                    }
                    tokio::time::sleep(Duration::from_secs_f64((hours * 3600.0).max(1.0))).await;
                    let (recovered, failing) = check_disabled(&state).await;
                    if recovered + failing > 0 {
                        tracing::info!(recovered, failing, "check of disabled keys done");
                    }
                }
            });
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the key checks: {e}");
    }
}

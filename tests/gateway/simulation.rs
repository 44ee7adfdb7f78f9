//! The quota simulation: a fake upstream that keeps Google's per-project limits, a bursty
//! client load offered at 1.5 times the pool's capacity, and three gateways side by side:
//!
//! - `round robin`: what gemgate did before it knew projects (keys without projects, each
//!   429 cooling its key alone);
//! - `project cooldowns`: keys in their projects, limits unknown (learning from 429s only);
//! - `proactive limits`: keys in their projects and `[quota.limits]` as Google's.
//!
//! The test runs 75 seconds; `scripts/quota-sim.sh` runs it longer
//! (`GEMGATE_SIM_SECONDS`) and prints the table.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use gemgate_fake_upstream::{FakeUpstream, QuotaModel, QuotaProject};

use crate::common::*;

const PROJECTS: usize = 4;
const KEYS_PER_PROJECT: usize = 2;
const RPM: u64 = 6;
/// A burst every this often; its size makes the load 1.5 times the pool's capacity.
const BURST_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    RoundRobin,
    ProjectCooldowns,
    ProactiveLimits,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::RoundRobin => "round robin",
            Setup::ProjectCooldowns => "project cooldowns",
            Setup::ProactiveLimits => "proactive limits",
        }
    }
}

/// What one run measured.
#[derive(Debug)]
struct Figures {
    setup: Setup,
    offered: u64,
    served: u64,
    upstream_attempts: u64,
    upstream_429s: u64,
    capacity: f64,
}

impl Figures {
    fn share_429(&self) -> f64 {
        self.upstream_429s as f64 / self.upstream_attempts.max(1) as f64
    }

    fn share_of_capacity(&self) -> f64 {
        self.served as f64 / self.capacity
    }

    fn row(&self) -> String {
        format!(
            "| {:<18} | {:>7} | {:>6} | {:>17} | {:>11.1} % | {:>16.1} % |",
            self.setup.name(),
            self.offered,
            self.served,
            self.upstream_attempts,
            100.0 * self.share_429(),
            100.0 * self.share_of_capacity()
        )
    }
}

fn key(project: usize, k: usize) -> String {
    format!("sim-p{project}-k{k}")
}

async fn setup_gateway(setup: Setup, fake: &FakeUpstream) -> Gate {
    let mut model = QuotaModel {
        models: vec!["gemini-2.5-flash".into()],
        ..QuotaModel::default()
    };
    let mut entries = Vec::new();
    for p in 0..PROJECTS {
        let keys: Vec<String> = (0..KEYS_PER_PROJECT).map(|k| key(p, k)).collect();
        for k in &keys {
            entries.push(match setup {
                Setup::RoundRobin => format!("{{ key = \"{k}\" }}"),
                _ => format!("{{ key = \"{k}\", project = \"p{p}\" }}"),
            });
        }
        let project = QuotaProject {
            keys,
            rpm: Some(RPM),
            ..QuotaProject::default()
        };
        model.projects.insert(format!("p{p}"), project);
    }
    fake.state.set_quota(model).unwrap();
    let mut toml = format!("[keys]\napi_keys = [{}]\n", entries.join(", "));
    if setup == Setup::ProactiveLimits {
        toml.push_str(&format!(
            "[quota.limits.\"gemini-2.5-flash\"]\nrpm = {RPM}\n"
        ));
    }
    gate()
        .env("BASE_URL", &fake.base_url())
        .env("MAX_RETRIES", "3")
        .toml(&toml)
        .shipped_plugins()
        .start()
        .await
}

/// Offers bursts for `run` and counts what the clients were served.
async fn offer(gate: &Gate, run: Duration) -> (u64, u64) {
    let capacity_per_burst = (PROJECTS as f64 * RPM as f64) * BURST_EVERY.as_secs_f64() / 60.0;
    let burst = (1.5 * capacity_per_burst).round() as usize;
    let (offered, served) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let mut bursts = Vec::new();
    while started.elapsed() < run {
        for _ in 0..burst {
            let (offered, served) = (offered.clone(), served.clone());
            let url = gate.url(GENERATE);
            bursts.push(tokio::spawn(async move {
                offered.fetch_add(1, Relaxed);
                let resp = client()
                    .post(url)
                    .header("x-goog-api-key", TOKEN)
                    .json(&ask("hi"))
                    .send()
                    .await;
                if resp.is_ok_and(|r| r.status() == 200) {
                    served.fetch_add(1, Relaxed);
                }
            }));
        }
        tokio::time::sleep(BURST_EVERY).await;
    }
    for b in bursts {
        b.await.unwrap();
    }
    (offered.load(Relaxed), served.load(Relaxed))
}

async fn simulate(setup: Setup, run: Duration) -> Figures {
    let fake = fake().await;
    let gate = setup_gateway(setup, &fake).await;
    let (offered, served) = offer(&gate, run).await;
    let stats = fake.state.quota_stats();
    Figures {
        setup,
        offered,
        served,
        upstream_attempts: stats.admitted + stats.limited,
        upstream_429s: stats.limited,
        capacity: PROJECTS as f64 * RPM as f64 * run.as_secs_f64() / 60.0,
    }
}

/// The three setups side by side; with the limits known, almost no upstream 429 and almost
/// all of the capacity served.
#[tokio::test]
async fn with_limits_known_upstream_429s_vanish_and_the_capacity_is_served() {
    let seconds: u64 = std::env::var("GEMGATE_SIM_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(75);
    let run = Duration::from_secs(seconds);
    let (a, b, c) = tokio::join!(
        simulate(Setup::RoundRobin, run),
        simulate(Setup::ProjectCooldowns, run),
        simulate(Setup::ProactiveLimits, run),
    );
    println!(
        "{PROJECTS} projects x {KEYS_PER_PROJECT} keys, {RPM} requests a minute each, {seconds} s, load 1.5x capacity ({:.0} requests)",
        c.capacity
    );
    println!(
        "| setup              | offered | served | upstream attempts | upstream 429s | served of capacity |"
    );
    println!(
        "|--------------------|---------|--------|-------------------|---------------|--------------------|"
    );
    for f in [&a, &b, &c] {
        println!("{}", f.row());
    }
    assert!(c.share_429() <= 0.01, "{c:?}");
    assert!(c.share_of_capacity() >= 0.95, "{c:?}");
    assert!(a.upstream_429s > c.upstream_429s, "{a:?} {c:?}");
}

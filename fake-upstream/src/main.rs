//! `gemgate-fake-upstream`: a fake Gemini API on loopback, for tests, benchmarks and demos.

use std::time::Duration;

use clap::Parser;
use gemgate_fake_upstream::{FakeConfig, FakeUpstream, QuotaModel};

#[derive(Parser)]
#[command(
    version,
    about = "A fake Gemini API: key behaviours by prefix (invalid-, suspended-, leaked-, minute-, day-, flaky-, slow-, cut-…), an optional quota model (keys in projects, per-model rpm/tpm/rpd limits answering Google's 429s; --quota-file or POST /_fake/quota), cached contents, interactions and batches owned by the project of the key that made them, and the Live API's WebSocket (echo)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: std::net::SocketAddr,
    /// Models per page of the model list.
    #[arg(long, default_value_t = 5)]
    page_size: usize,
    /// Chunks per streamed answer.
    #[arg(long, default_value_t = 3)]
    chunks: usize,
    /// Pause between streamed chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Fraction of requests a flaky key answers with 503.
    #[arg(long, default_value_t = 0.5)]
    flaky_rate: f64,
    /// Delay of slow keys, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    slow_ms: u64,
    /// RetryInfo delay of per-minute quota errors, in seconds.
    #[arg(long, default_value_t = 47)]
    retry_delay_s: u64,
    /// A quota model, as JSON: `{"projects": {"p1": {"keys": [..], "number": 1001, "rpm": 10,
    /// "tpm": 250000, "rpd": 250, "tier": "FreeTier"}}, "models": [..], "throttle": false}`.
    #[arg(long, value_name = "PATH")]
    quota_file: Option<std::path::PathBuf>,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let config = FakeConfig {
        page_size: args.page_size,
        chunks: args.chunks,
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        flaky_rate: args.flaky_rate,
        slow: Duration::from_millis(args.slow_ms),
        retry_delay_s: args.retry_delay_s,
    };
    let quota = match &args.quota_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)?;
            let model: QuotaModel = serde_json::from_str(&text).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?;
            Some(model)
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let fake = FakeUpstream::bind(args.listen, config).await?;
        if let Some(model) = quota {
            fake.state
                .set_quota(model)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
        println!("fake Gemini API listening; BASE_URL={}", fake.base_url());
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}

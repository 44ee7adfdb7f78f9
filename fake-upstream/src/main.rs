//! `gemgate-fake-upstream`: a fake Gemini API on loopback, for tests, benchmarks and demos.

use std::time::Duration;

use clap::Parser;
use gemgate_fake_upstream::{FakeConfig, FakeUpstream};

#[derive(Parser)]
#[command(
    version,
    about = "A fake Gemini API: key behaviours by prefix (invalid-, suspended-, leaked-, minute-, day-, flaky-, slow-, cut-…)"
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let fake = FakeUpstream::bind(args.listen, config).await?;
        println!("fake Gemini API listening; BASE_URL={}", fake.base_url());
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}

//! `optout-bench`: see `docs/performance.md`.
//!
//! ```sh
//! cargo build --release --bins
//! OPTOUT_BIN_DIR=target/release target/release/optout-bench --json bench.json
//! ```

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use optout_bench::BenchOptions;

/// Benchmark of optout-sync on a generated org (the real services, RabbitMQ and PostgreSQL, the
/// sandbox for Mailchimp and Salesforce), with a naive Python baseline.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Memberships of the main run, over all audiences.
    #[arg(long, default_value_t = 1_000_000)]
    members: u64,
    /// Mailchimp audiences.
    #[arg(long, default_value_t = 3)]
    audiences: u32,
    /// Generator seed.
    #[arg(long, default_value_t = 8)]
    seed: u64,
    /// Members unsubscribed before the incremental sync (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    incremental: u64,
    /// Unsubscribe webhooks for the latency figures (0 skips them).
    #[arg(long, default_value_t = 1_000)]
    webhooks: u64,
    /// Webhooks per second.
    #[arg(long, default_value_t = 100.0)]
    webhook_rate: f64,
    /// Memberships of the smaller run (initial sync and memory; 0 skips it).
    #[arg(long, default_value_t = 100_000)]
    small_members: u64,
    /// Memberships of the baseline's org.
    #[arg(long, default_value_t = 100_000)]
    baseline_members: u64,
    /// Skip the Python baseline.
    #[arg(long)]
    skip_baseline: bool,
    /// Latency the sandbox adds to every API call in the second comparison with the baseline
    /// (0 skips that comparison).
    #[arg(long, default_value_t = 50)]
    api_latency_ms: u64,
    /// Python with mailchimp-marketing and simple-salesforce (default: the repository's .venv).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Longest wait for one sync, in seconds.
    #[arg(long, default_value_t = 900)]
    sync_timeout_secs: u64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write every child's log to this folder.
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let defaults = BenchOptions::default();
    let options = BenchOptions {
        members: args.members,
        audiences: args.audiences,
        seed: args.seed,
        incremental: args.incremental,
        webhooks: args.webhooks,
        webhook_rate: args.webhook_rate,
        small_members: args.small_members,
        baseline_members: args.baseline_members,
        skip_baseline: args.skip_baseline,
        api_latency_ms: args.api_latency_ms,
        python: args.python.unwrap_or(defaults.python),
        baseline_script: defaults.baseline_script,
        sync_timeout: Duration::from_secs(args.sync_timeout_secs),
        log_dir: args.log_dir,
    };
    let report = match optout_bench::run(&options).await {
        Ok(report) => report,
        Err(error) => {
            eprintln!("optout-bench: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("{report}");
    if let Some(path) = &args.json {
        let written = serde_json::to_vec_pretty(&report)
            .context("encoding the report")
            .and_then(|json| {
                std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
            });
        if let Err(error) = written {
            eprintln!("optout-bench: {error:#}");
            return ExitCode::FAILURE;
        }
    }
    if report.correct() {
        ExitCode::SUCCESS
    } else {
        eprintln!("optout-bench: some records did not reach the expected state (see the table)");
        ExitCode::FAILURE
    }
}

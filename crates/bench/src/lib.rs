//! `optout-bench`: runs the real stack (the sandbox, the three services, RabbitMQ, PostgreSQL)
//! on a generated org and measures what issue #8 asks for: the initial sync, an incremental
//! sync, webhook latency, API calls against their lower bound and peak memory, and the same
//! work done by a naive Python script with the official clients.
//!
//! Stacks come from the end-to-end harness (`optout-e2e`), so a run uses its own queues and
//! schemas and removes them at the end. `docs/performance.md` explains the method and holds the
//! latest figures.

pub mod baseline;
pub mod bounds;
pub mod org;
mod phases;
pub mod report;
pub mod stats;

use std::{path::PathBuf, time::Duration};

use anyhow::Result;

pub use phases::{Calls, MemoryReading, PhaseReport, SizeReport, WebhookReport};
pub use report::{Comparison, Report};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Memberships of the main run (over all audiences).
    pub members: u64,
    /// Mailchimp audiences.
    pub audiences: u32,
    /// Generator seed.
    pub seed: u64,
    /// Members changed (unsubscribed) before the incremental sync; 0 skips it.
    pub incremental: u64,
    /// Unsubscribes sent as webhooks; 0 skips them.
    pub webhooks: u64,
    /// Webhooks per second.
    pub webhook_rate: f64,
    /// Memberships of the second, smaller run (initial sync and memory only); 0 skips it.
    pub small_members: u64,
    /// Memberships of the baseline's org; our figures at that size come from the run of the
    /// same size (one more initial-sync-only run when neither size matches).
    pub baseline_members: u64,
    /// Skip the baseline.
    pub skip_baseline: bool,
    /// Latency the sandbox adds to every Mailchimp and Salesforce call in a second comparison
    /// with the baseline (the first has none); 0 skips it. Real API calls take tens to hundreds
    /// of milliseconds, which the in-process sandbox otherwise leaves out.
    pub api_latency_ms: u64,
    /// The Python interpreter with `mailchimp-marketing` and `simple-salesforce`.
    pub python: PathBuf,
    /// `baseline.py`.
    pub baseline_script: PathBuf,
    /// Longest wait for one sync to go idle.
    pub sync_timeout: Duration,
    /// Where the children's logs go, when set.
    pub log_dir: Option<PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        Self {
            members: 1_000_000,
            audiences: 3,
            seed: 8,
            incremental: 10_000,
            webhooks: 1_000,
            webhook_rate: 100.0,
            small_members: 100_000,
            baseline_members: 100_000,
            skip_baseline: false,
            api_latency_ms: 50,
            python: crate_dir.join("../../.venv/bin/python"),
            baseline_script: crate_dir.join("baseline.py"),
            sync_timeout: Duration::from_secs(900),
            log_dir: None,
        }
    }
}

/// Runs everything the options ask for; the caller prints or checks the report.
pub async fn run(options: &BenchOptions) -> Result<Report> {
    let mut report = Report::new(options);
    let main = phases::run_size(options, options.members, true, 0).await?;
    report.runs.push(main);
    if options.small_members > 0 && options.small_members != options.members {
        let small = phases::run_size(options, options.small_members, false, 0).await?;
        report.runs.push(small);
    }
    if options.skip_baseline || options.baseline_members == 0 {
        return Ok(report);
    }
    let mut latencies = vec![0];
    if options.api_latency_ms > 0 {
        latencies.push(options.api_latency_ms);
    }
    for latency_ms in latencies {
        if !report
            .runs
            .iter()
            .any(|run| run.members == options.baseline_members && run.api_latency_ms == latency_ms)
        {
            let same =
                phases::run_size(options, options.baseline_members, false, latency_ms).await?;
            report.runs.push(same);
        }
        let setup = baseline::BaselineSetup {
            python: options.python.clone(),
            script: options.baseline_script.clone(),
            bin_dir: optout_e2e::target_dir()?,
            timeout: Duration::from_secs(3600),
            latency_ms,
        };
        let baseline = baseline::run(
            &setup,
            options.seed,
            options.audiences,
            options.baseline_members,
        )
        .await?;
        report.compare(baseline);
    }
    Ok(report)
}

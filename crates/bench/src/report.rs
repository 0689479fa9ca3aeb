//! The benchmark's result: JSON for machines, a table for people.

use std::fmt;

use serde::Serialize;

use crate::{BenchOptions, SizeReport, baseline::BaselineReport};

/// Conditions of the run, so figures are never read without them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Conditions {
    /// When it started (UTC, RFC 3339).
    pub started_at: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// 1-minute load average when it started (other work on the machine).
    pub load_average_at_start: String,
    /// Generator seed.
    pub seed: u64,
    /// Mailchimp audiences.
    pub audiences: u32,
    /// Webhooks per second.
    pub webhook_rate: f64,
    /// Where the service binaries were taken from.
    pub bin_dir: String,
}

/// Our initial sync against the baseline on the same org.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Comparison {
    /// Memberships of that org.
    pub members: u64,
    /// Latency the sandbox added to every API call in both runs, ms.
    pub api_latency_ms: u64,
    /// Our initial sync, ms.
    pub ours_wall_ms: u64,
    /// Our Salesforce calls.
    pub ours_salesforce_calls: u64,
    /// Records we wrote.
    pub ours_records_written: u64,
    /// The baseline run.
    pub baseline: BaselineReport,
    /// Baseline wall time / ours.
    pub wall_ratio: f64,
    /// Baseline Salesforce calls / ours.
    pub salesforce_calls_ratio: f64,
}

/// Everything one run of the benchmark measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Conditions.
    pub conditions: Conditions,
    /// One entry per stack size, the main (largest) run first.
    pub runs: Vec<SizeReport>,
    /// The baseline comparisons (without and with API latency), unless skipped.
    pub comparisons: Vec<Comparison>,
}

impl Report {
    /// An empty report with the conditions filled in.
    pub fn new(options: &BenchOptions) -> Self {
        Self {
            conditions: Conditions {
                started_at: chrono::Utc::now().to_rfc3339(),
                cpus: std::thread::available_parallelism().map_or(0, usize::from),
                load_average_at_start: std::fs::read_to_string("/proc/loadavg")
                    .unwrap_or_default()
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
                seed: options.seed,
                audiences: options.audiences,
                webhook_rate: options.webhook_rate,
                bin_dir: optout_e2e::target_dir()
                    .map(|dir| dir.display().to_string())
                    .unwrap_or_default(),
            },
            runs: Vec::new(),
            comparisons: Vec::new(),
        }
    }

    /// Adds the baseline, compared with our initial sync on an org of the same size and under
    /// the same API latency.
    pub fn compare(&mut self, baseline: BaselineReport) {
        let ours = self
            .runs
            .iter()
            .find(|run| {
                run.members == baseline.members && run.api_latency_ms == baseline.latency_ms
            })
            .and_then(|run| run.phases.first());
        let Some(ours) = ours else {
            return;
        };
        #[allow(clippy::cast_precision_loss)]
        let ratio = |theirs: u64, ours: u64| theirs as f64 / (ours.max(1)) as f64;
        self.comparisons.push(Comparison {
            members: baseline.members,
            api_latency_ms: baseline.latency_ms,
            ours_wall_ms: ours.wall_ms,
            ours_salesforce_calls: ours.salesforce.calls,
            ours_records_written: ours.records_written,
            wall_ratio: ratio(baseline.wall_ms, ours.wall_ms),
            salesforce_calls_ratio: ratio(baseline.salesforce_calls, ours.salesforce.calls),
            baseline,
        });
    }

    /// Whether every correctness check passed (records left unchecked, webhooks not written).
    pub fn correct(&self) -> bool {
        self.runs.iter().all(|run| {
            run.phases
                .iter()
                .all(|phase| phase.records_left_unchecked == 0)
                && run.webhooks.as_ref().is_none_or(|webhooks| {
                    webhooks.not_written == 0 && webhooks.accepted == webhooks.sent
                })
        })
    }
}

#[allow(clippy::cast_precision_loss)]
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[allow(clippy::cast_precision_loss)]
fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn mark(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISS" }
}

impl fmt::Display for Report {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let conditions = &self.conditions;
        writeln!(
            out,
            "optout-bench  {}  {} CPUs, load {} at start, seed {}, {} audiences",
            conditions.started_at,
            conditions.cpus,
            conditions.load_average_at_start,
            conditions.seed,
            conditions.audiences
        )?;
        for run in &self.runs {
            writeln!(
                out,
                "\n== {} members ({} people), stack start {:.1} s, API latency {} ms",
                run.members,
                run.people,
                secs(run.stack_start_ms),
                run.api_latency_ms
            )?;
            writeln!(
                out,
                "{:<12} {:>9} {:>9} {:>10} {:>12} {:>14} {:>14} {:>8} {:>12}",
                "phase",
                "changed",
                "wall s",
                "members/s",
                "dirty/to-fix",
                "mailchimp/lb",
                "salesforce/lb",
                "written",
                "wrong"
            )?;
            for phase in &run.phases {
                writeln!(
                    out,
                    "{:<12} {:>9} {:>9.2} {:>10.0} {:>12} {:>14} {:>14} {:>8} {:>12}",
                    phase.name,
                    phase.changed_members,
                    secs(phase.wall_ms),
                    phase.members_per_second,
                    format!("{}/{}", phase.dirty_emails, phase.records_to_change),
                    format!(
                        "{}/{} {}",
                        phase.mailchimp.calls,
                        phase.mailchimp.bound,
                        mark(phase.mailchimp.within_bound)
                    ),
                    format!(
                        "{}/{} {}",
                        phase.salesforce.calls,
                        phase.salesforce.bound,
                        mark(phase.salesforce.within_bound)
                    ),
                    phase.records_written,
                    format!(
                        "{}/{}",
                        phase.records_left_unchecked, phase.records_unchecked
                    )
                )?;
                let endpoints: Vec<String> = phase
                    .salesforce
                    .by_endpoint
                    .iter()
                    .map(|(label, count)| format!("{label} {count}"))
                    .collect();
                writeln!(out, "{:<12} salesforce: {}", "", endpoints.join(", "))?;
            }
            if let Some(webhooks) = &run.webhooks {
                writeln!(
                    out,
                    "webhooks     {} sent at {}/s, {} accepted, {} not written; POST -> Salesforce write p50 {} ms, p99 {} ms, max {} ms (accept p50 {} ms, p99 {} ms); {} Salesforce calls",
                    webhooks.sent,
                    webhooks.rate_per_second,
                    webhooks.accepted,
                    webhooks.not_written,
                    webhooks.p50_ms,
                    webhooks.p99_ms,
                    webhooks.max_ms,
                    webhooks.accept_p50_ms,
                    webhooks.accept_p99_ms,
                    webhooks.salesforce_calls
                )?;
            }
            let memory: Vec<String> = run
                .memory
                .iter()
                .map(|reading| {
                    format!(
                        "{} after {} {:.1} MiB",
                        reading.service,
                        reading.after,
                        mib(reading.vm_hwm_kib)
                    )
                })
                .collect();
            writeln!(out, "peak RSS     {}", memory.join(", "))?;
        }
        for comparison in &self.comparisons {
            let baseline = &comparison.baseline;
            writeln!(
                out,
                "\n== baseline (Python, official clients, record by record) on {} members, API latency {} ms",
                comparison.members, comparison.api_latency_ms
            )?;
            writeln!(
                out,
                "baseline     {:.2} s ({:.2} s paging Mailchimp), {} Mailchimp calls, {} Salesforce calls, {} records updated for {} people",
                secs(baseline.wall_ms),
                secs(baseline.mailchimp_ms),
                baseline.mailchimp_calls,
                baseline.salesforce_calls,
                baseline.records_updated,
                baseline.optout_emails
            )?;
            writeln!(
                out,
                "optout-sync  {:.2} s, {} Salesforce calls, {} records written",
                secs(comparison.ours_wall_ms),
                comparison.ours_salesforce_calls,
                comparison.ours_records_written
            )?;
            writeln!(
                out,
                "ratios       wall time {:.1}x, Salesforce calls {:.1}x (baseline / optout-sync)",
                comparison.wall_ratio, comparison.salesforce_calls_ratio
            )?;
        }
        Ok(())
    }
}

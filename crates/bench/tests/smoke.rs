//! The benchmark in small (20,000 members, debug binaries, as the rest of the suite): it must
//! leave Salesforce right and stay within the API-call bound. It never asserts a time; the
//! figures are printed for whoever runs it.

use std::time::Duration;

use anyhow::{Result, ensure};
use optout_bench::{BenchOptions, Report, baseline};

/// The small run both tests below make.
async fn small_run() -> Result<Report> {
    let options = BenchOptions {
        members: 20_000,
        incremental: 1_000,
        webhooks: 50,
        webhook_rate: 50.0,
        small_members: 0,
        skip_baseline: true,
        sync_timeout: Duration::from_secs(300),
        ..BenchOptions::default()
    };
    let report = optout_bench::run(&options).await?;
    println!("{report}");
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_benchmark_leaves_salesforce_right_within_the_mailchimp_bound() -> Result<()> {
    let report = small_run().await?;
    let run = &report.runs[0];
    ensure!(
        run.members == 20_000 && run.people > 10_000,
        "org: {} people",
        run.people
    );
    ensure!(run.phases.len() == 2, "phases: {}", run.phases.len());
    for phase in &run.phases {
        let name = &phase.name;
        ensure!(
            phase.dirty_emails > 0 && phase.records_to_change > 0,
            "{name}: nothing to do ({} dirty, {} to change), the check would be vacuous",
            phase.dirty_emails,
            phase.records_to_change
        );
        ensure!(
            phase.records_left_unchecked == 0,
            "{name}: {} records of opted-out people left unchecked",
            phase.records_left_unchecked
        );
        ensure!(
            phase.records_unchecked == 0,
            "{name}: {} records of people not opted out were unchecked without opt-in evidence",
            phase.records_unchecked
        );
        // Exactly those: a record written beyond them checked the box of someone the rule does
        // not opt out (a first sync deciding before every audience was read did that).
        ensure!(
            phase.records_written == phase.records_to_change,
            "{name}: {} records written, {} had to change",
            phase.records_written,
            phase.records_to_change
        );
        ensure!(
            phase.mailchimp.within_bound,
            "{name}: {} Mailchimp calls over the bound {}: {:?}",
            phase.mailchimp.calls,
            phase.mailchimp.bound,
            phase.mailchimp.by_endpoint
        );
    }
    let webhooks = run.webhooks.as_ref().expect("webhooks were asked for");
    ensure!(
        webhooks.sent == 50 && webhooks.accepted == 50,
        "webhooks: {} sent, {} accepted",
        webhooks.sent,
        webhooks.accepted
    );
    ensure!(
        webhooks.not_written == 0,
        "{} people unsubscribed by webhook not written to Salesforce",
        webhooks.not_written
    );
    ensure!(
        run.memory.len() == 9 && run.memory.iter().all(|reading| reading.vm_hwm_kib > 0),
        "memory readings: {:?}",
        run.memory
    );
    ensure!(report.correct(), "the report says incorrect");
    Ok(())
}

/// Issue #8's Salesforce bound: reads of the dirty emails in chunks as large as the URL limit
/// allows, writes of ceil(records / 200) or one Bulk API job, + 5% + a few. It holds because the
/// writer writes a first sync's release, and a sync's stream of notifications, in one pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_benchmark_stays_within_the_salesforce_bound() -> Result<()> {
    let report = small_run().await?;
    for phase in &report.runs[0].phases {
        ensure!(
            phase.records_to_change > 0,
            "{}: nothing to write, the bound would be vacuous",
            phase.name
        );
        ensure!(
            phase.salesforce.within_bound,
            "{}: {} Salesforce calls over the bound {} ({:?}): {:?}",
            phase.name,
            phase.salesforce.calls,
            phase.salesforce.bound,
            phase.salesforce_bound,
            phase.salesforce.by_endpoint
        );
    }
    Ok(())
}

/// The Python baseline runs against its own sandbox and does what it claims: pages every member,
/// then one query per object per opted-out person and one update per record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_baseline_pages_everything_and_writes_record_by_record() -> Result<()> {
    let defaults = BenchOptions::default();
    let setup = baseline::BaselineSetup {
        python: defaults.python,
        script: defaults.baseline_script,
        bin_dir: optout_e2e::target_dir()?,
        timeout: Duration::from_secs(120),
        latency_ms: 0,
    };
    let report = baseline::run(&setup, 8, 3, 3_000).await?;
    println!("{report:?}");
    ensure!(report.members_read == 3_000, "read {}", report.members_read);
    ensure!(
        report.mailchimp_calls >= 4,
        "{} Mailchimp calls",
        report.mailchimp_calls
    );
    ensure!(
        report.optout_emails > 0 && report.records_updated > 0,
        "nothing to do: {report:?}"
    );
    let queries = report
        .salesforce_by_endpoint
        .get("GET /query")
        .copied()
        .unwrap_or(0);
    let updates = report
        .salesforce_by_endpoint
        .get("PATCH /sobjects/{object}/{id}")
        .copied()
        .unwrap_or(0);
    ensure!(
        queries == 2 * report.optout_emails,
        "{queries} queries for {} people",
        report.optout_emails
    );
    ensure!(
        updates == report.records_updated,
        "{updates} updates for {} records",
        report.records_updated
    );
    Ok(())
}

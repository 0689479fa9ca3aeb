//! The Salesforce poll: finds records changed since the watermark whose box is unchecked and
//! re-asserts opt-outs through the write path (the seed's "if you manually uncheck ... it will be
//! updated back to checked during the next sync").

use std::collections::BTreeSet;
use std::pin::pin;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::Value;

use crate::Result;
use crate::plan::{self, SfObject};
use crate::writer::{ApplyOptions, Trigger, Writer};

/// What one poll cycle saw and did.
#[derive(Debug, Default)]
pub(crate) struct PollReport {
    pub(crate) scanned: usize,
    pub(crate) changes: usize,
    pub(crate) written: usize,
    /// In a dry run, what would have been written.
    pub(crate) planned: Vec<plan::Change>,
}

/// Sets the watermark of every object that has none to now, without scanning: on a first start
/// the dirty path already covers Mailchimp's opt-outs, and drift before the writer existed is the
/// business of a full reconcile.
pub(crate) async fn initialize_watermarks(writer: &Writer) -> Result<()> {
    for object in &writer.objects {
        if writer.store.watermark(*object).await?.is_none() {
            tracing::info!(%object, "no poll watermark yet, starting from now");
            writer.store.advance_watermark(*object, Utc::now()).await?;
        }
    }
    Ok(())
}

/// One poll cycle over every enabled object. `full` scans from the beginning; `dry_run` logs what
/// would change and stores nothing.
pub(crate) async fn poll_cycle(writer: &Writer, full: bool, dry_run: bool) -> Result<PollReport> {
    let _busy = writer.busy_guard();
    writer.counters.add("poll_cycles", 1);
    let mut report = PollReport::default();
    for object in writer.objects.clone() {
        let since = if full {
            None
        } else {
            match writer.store.watermark(object).await? {
                Some(watermark) => Some(watermark),
                None => {
                    if !dry_run {
                        writer.store.advance_watermark(object, Utc::now()).await?;
                    }
                    continue;
                }
            }
        };
        poll_object(writer, object, since, dry_run, &mut report).await?;
    }
    tracing::info!(
        full,
        dry_run,
        scanned = report.scanned,
        changes = report.changes,
        written = report.written,
        "salesforce poll cycle finished"
    );
    Ok(report)
}

async fn poll_object(
    writer: &Writer,
    object: SfObject,
    since: Option<DateTime<Utc>>,
    dry_run: bool,
    report: &mut PollReport,
) -> Result<()> {
    let soql = plan::poll_query(object, since, writer.person_accounts);
    let options = ApplyOptions {
        trigger: Trigger::SalesforcePoll,
        dry_run,
        opt_out_only: true,
    };
    let mut pages = pin!(writer.salesforce.query_stream::<Value>(soql));
    let mut newest: Option<DateTime<Utc>> = None;
    let mut settled = true;
    while let Some(page) = pages.next().await {
        let rows = page?;
        report.scanned += rows.len();
        writer.counters.add("records_read", rows.len() as u64);
        let mut emails = BTreeSet::new();
        for row in &rows {
            let stamp = row
                .get("SystemModstamp")
                .and_then(Value::as_str)
                .and_then(plan::parse_sf_datetime);
            newest = newest.max(stamp);
            if let Some(record) = plan::parse_record(object, row) {
                emails.insert(record.email);
            }
        }
        let emails: Vec<String> = emails.into_iter().collect();
        let applied = writer.apply_emails(&emails, &options).await?;
        report.changes += applied.changes;
        report.written += applied.written;
        report.planned.extend(applied.planned);
        settled &= applied.retry.is_empty();
    }
    // Records that stayed locked are found again next cycle only if the watermark stays put.
    if settled && !dry_run {
        if let Some(newest) = newest {
            writer.store.advance_watermark(object, newest).await?;
        }
    } else if !settled {
        tracing::warn!(%object, "some records stayed locked; watermark kept for the next cycle");
    }
    Ok(())
}

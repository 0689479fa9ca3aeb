//! `optoutctl sync`: trigger a sync on the fetcher (and the writer's Salesforce poll cycle),
//! wait until the whole pipeline is idle, and summarise what happened from counter differences.

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, Instant},
};

use optout_proto::admin::v1::{GetStatusResponse, TriggerSyncRequest};
use serde::Serialize;

use crate::{
    Error, Result,
    admin::{Fleet, Role, ServiceHandle},
};

/// How to run a sync.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// Revisit every person, not only what changed.
    pub full: bool,
    /// Compute and report, write nothing.
    pub dry_run: bool,
    /// Wait until the pipeline is idle before summarising.
    pub wait: bool,
    /// Give up waiting after this long.
    pub timeout: Duration,
    /// Time between status polls while waiting.
    pub poll_interval: Duration,
    /// How many consecutive idle polls count as idle.
    pub stable_polls: u32,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            full: false,
            dry_run: false,
            wait: true,
            timeout: Duration::from_secs(300),
            poll_interval: Duration::from_millis(200),
            stable_polls: 3,
        }
    }
}

/// The statuses of every process at one moment.
#[derive(Clone, Debug, Default)]
pub struct FleetSnapshot {
    /// `(process name, role, status)` in fleet order.
    pub statuses: Vec<(String, Role, GetStatusResponse)>,
}

impl FleetSnapshot {
    /// Sum of one counter over every replica of a role.
    pub fn counter(&self, role: Role, name: &str) -> i64 {
        self.statuses
            .iter()
            .filter(|(_, status_role, _)| *status_role == role)
            .map(|(_, _, status)| status.counters.get(name).copied().unwrap_or(0))
            .sum()
    }

    /// Depth of every queue any process reports (the first report of a queue wins).
    pub fn queue_depths(&self) -> BTreeMap<String, u64> {
        let mut depths = BTreeMap::new();
        for (_, _, status) in &self.statuses {
            for queue in &status.queues {
                depths.entry(queue.name.clone()).or_insert(queue.messages);
            }
        }
        depths
    }

    /// Why the pipeline is not idle, or `None` when it is.
    pub fn busy_reasons(&self) -> Option<String> {
        let mut reasons = Vec::new();
        for (name, _, status) in &self.statuses {
            if status.busy {
                reasons.push(format!("{name} busy"));
            }
            if status.in_flight > 0 {
                reasons.push(format!("{name} in_flight={}", status.in_flight));
            }
        }
        for (queue, messages) in self.queue_depths() {
            if messages > 0 && !queue.ends_with(".dlq") {
                reasons.push(format!("{queue}={messages}"));
            }
        }
        if reasons.is_empty() {
            None
        } else {
            Some(reasons.join(", "))
        }
    }
}

/// Fetches `GetStatus` from every process in parallel.
pub async fn snapshot(fleet: &Fleet) -> Result<FleetSnapshot> {
    let pending = fleet.services.iter().map(|service| async move {
        let status = service.get_status().await?;
        Ok::<_, Error>((service.name.clone(), service.role, status))
    });
    let statuses = futures::future::try_join_all(pending).await?;
    Ok(FleetSnapshot { statuses })
}

/// Run ids handed out by [`trigger`].
#[derive(Clone, Debug, Default)]
pub struct Triggered {
    /// The fetcher that runs the sync, and its run id.
    pub fetcher: Option<(String, String)>,
    /// The writer that runs the poll cycle, and its run id (None when it offers none).
    pub writer: Option<(String, String)>,
    /// What the writer would change, when a dry run was asked for.
    pub dry_run_report: Option<DryRunView>,
}

/// One change a dry run would make.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DryRunChangeView {
    /// Salesforce record id.
    pub record_id: String,
    /// The email on it.
    pub email: String,
    /// Email Opt Out now.
    pub old_value: bool,
    /// Email Opt Out after a real sync.
    pub new_value: bool,
    /// The rule asking for it.
    pub reason: String,
}

/// What a dry run would change in one object.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DryRunObjectView {
    /// Contact, Lead or PersonAccount.
    pub object: String,
    /// Boxes it would check.
    pub would_check: u64,
    /// Boxes it would uncheck.
    pub would_uncheck: u64,
    /// The first few changes.
    pub examples: Vec<DryRunChangeView>,
}

/// The writer's dry-run report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DryRunView {
    /// Per object in scope.
    pub objects: Vec<DryRunObjectView>,
    /// Records read to compute it.
    pub records_scanned: u64,
}

impl From<optout_proto::admin::v1::DryRunReport> for DryRunView {
    fn from(report: optout_proto::admin::v1::DryRunReport) -> Self {
        Self {
            records_scanned: report.records_scanned,
            objects: report
                .objects
                .into_iter()
                .map(|object| DryRunObjectView {
                    object: object.object,
                    would_check: object.would_check,
                    would_uncheck: object.would_uncheck,
                    examples: object
                        .examples
                        .into_iter()
                        .map(|change| DryRunChangeView {
                            record_id: change.record_id,
                            email: change.email,
                            old_value: change.old_value,
                            new_value: change.new_value,
                            reason: change.reason,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Starts a sync on the first fetcher and a poll cycle on the first writer.
pub async fn trigger(fleet: &Fleet, options: &SyncOptions) -> Result<Triggered> {
    let request = TriggerSyncRequest {
        audience_ids: Vec::new(),
        full: options.full,
        dry_run: options.dry_run,
    };
    let fetcher = fleet.first(Role::Fetcher).ok_or(Error::MissingEndpoint {
        service: "fetcher",
        flag: "--fetcher",
        env: "OPTOUT_FETCHER_ADDR",
    })?;
    let fetcher_run = fetcher.trigger_sync(request.clone()).await?;
    let mut triggered = Triggered {
        fetcher: Some((fetcher.name.clone(), fetcher_run.run_id)),
        writer: None,
        dry_run_report: None,
    };
    // The writer's cycle re-asserts opt-outs that someone unchecked by hand in Salesforce.
    if let Some(writer) = fleet.first(Role::Writer) {
        match writer.trigger_sync(request).await {
            Ok(response) => {
                triggered.dry_run_report = response.dry_run_report.map(DryRunView::from);
                if !response.run_id.is_empty() {
                    triggered.writer = Some((writer.name.clone(), response.run_id));
                }
            }
            // A writer without on-demand cycles still drains its queue; that is enough to wait on.
            Err(Error::Rpc {
                code: tonic::Code::Unimplemented,
                ..
            }) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(triggered)
}

fn run_finished(snapshot: &FleetSnapshot, target: &Option<(String, String)>) -> Option<String> {
    let (name, run_id) = target.as_ref()?;
    let status = snapshot
        .statuses
        .iter()
        .find(|(status_name, _, _)| status_name == name);
    match status {
        Some((_, _, status)) if status.last_run_id == *run_id && status.last_run_finished => None,
        Some((_, _, status)) if status.last_run_id == *run_id => {
            Some(format!("{name} run {run_id} running"))
        }
        Some((_, _, status)) => Some(format!(
            "{name} run {run_id} not started (last run {:?})",
            status.last_run_id
        )),
        None => None,
    }
}

/// Waits until the triggered runs have finished and then the pipeline has been idle (no queued
/// messages outside dead-letter queues, nothing in flight, nobody busy) on `stable_polls`
/// consecutive polls. Returns the last snapshot.
pub async fn wait_idle(
    fleet: &Fleet,
    triggered: &Triggered,
    options: &SyncOptions,
) -> Result<FleetSnapshot> {
    let started = Instant::now();
    let mut stable = 0;
    loop {
        let current = snapshot(fleet).await?;
        let waiting_for = run_finished(&current, &triggered.fetcher)
            .or_else(|| run_finished(&current, &triggered.writer))
            .or_else(|| current.busy_reasons());
        match waiting_for {
            None => {
                stable += 1;
                if stable >= options.stable_polls.max(1) {
                    return Ok(current);
                }
            }
            Some(reason) => {
                stable = 0;
                if started.elapsed() >= options.timeout {
                    return Err(Error::Timeout {
                        what: format!("the pipeline to go idle (last seen: {reason})"),
                        elapsed: started.elapsed(),
                    });
                }
            }
        }
        tokio::time::sleep(options.poll_interval).await;
    }
}

/// What one sync did, from counter differences.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncSummary {
    /// The fetcher's run id.
    pub run_id: String,
    /// The writer's poll-cycle id, when it gave one.
    pub writer_run_id: Option<String>,
    /// Whether the summary was taken after waiting for idle.
    pub waited: bool,
    /// Whether nothing was to be written.
    pub dry_run: bool,
    /// Mailchimp members read by the fetcher.
    pub members_read: i64,
    /// Pages published to `members.changed`.
    pub pages_published: i64,
    /// Messages the evaluator processed.
    pub messages_processed: i64,
    /// Decisions by kind (`opt_out`, `opt_in`, `no_change`).
    pub decisions: BTreeMap<String, i64>,
    /// Emails published to `persons.dirty`.
    pub dirty_published: i64,
    /// Salesforce records read by the writer.
    pub records_read: i64,
    /// Salesforce records written, per object.
    pub written: BTreeMap<String, i64>,
    /// Records the writer failed to write.
    pub write_failures: i64,
    /// Bulk API jobs run.
    pub bulk_jobs: i64,
    /// Messages in each dead-letter queue after the sync.
    pub dead_letters: BTreeMap<String, u64>,
    /// Wall time from trigger to idle, in milliseconds.
    pub elapsed_ms: u64,
    /// What the writer would change (dry runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run_report: Option<DryRunView>,
}

impl SyncSummary {
    /// Builds the summary from the snapshots before and after.
    pub fn from_snapshots(
        before: &FleetSnapshot,
        after: &FleetSnapshot,
        triggered: &Triggered,
        elapsed: Duration,
        waited: bool,
        dry_run: bool,
    ) -> Self {
        let diff = |role: Role, name: &str| -> i64 {
            let mut total = 0;
            for (process, status_role, status) in &after.statuses {
                if *status_role != role {
                    continue;
                }
                let now = status.counters.get(name).copied().unwrap_or(0);
                let earlier = before
                    .statuses
                    .iter()
                    .find(|(earlier_process, _, _)| earlier_process == process)
                    .and_then(|(_, _, earlier)| earlier.counters.get(name).copied())
                    .unwrap_or(0);
                // A restarted process starts its counters from zero again.
                total += if now >= earlier { now - earlier } else { now };
            }
            total
        };
        let decisions = [
            ("opt_out", "decisions_opt_out"),
            ("opt_in", "decisions_opt_in"),
            ("no_change", "decisions_no_change"),
        ]
        .into_iter()
        .map(|(kind, counter)| (kind.to_owned(), diff(Role::Evaluator, counter)))
        .collect();
        let written = [
            ("Contact", "written_contact"),
            ("Lead", "written_lead"),
            ("Account", "written_account"),
        ]
        .into_iter()
        .map(|(object, counter)| (object.to_owned(), diff(Role::Writer, counter)))
        .collect();
        let dead_letters = after
            .queue_depths()
            .into_iter()
            .filter(|(queue, _)| queue.ends_with(".dlq"))
            .collect();
        Self {
            run_id: triggered
                .fetcher
                .as_ref()
                .map(|(_, run)| run.clone())
                .unwrap_or_default(),
            writer_run_id: triggered.writer.as_ref().map(|(_, run)| run.clone()),
            waited,
            dry_run,
            members_read: diff(Role::Fetcher, "members_read"),
            pages_published: diff(Role::Fetcher, "pages_published"),
            messages_processed: diff(Role::Evaluator, "messages_processed"),
            decisions,
            dirty_published: diff(Role::Evaluator, "dirty_published"),
            records_read: diff(Role::Writer, "records_read"),
            written,
            write_failures: diff(Role::Writer, "write_failures"),
            bulk_jobs: diff(Role::Writer, "bulk_jobs"),
            dead_letters,
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            dry_run_report: triggered.dry_run_report.clone(),
        }
    }

    /// Records written over every object.
    pub fn total_written(&self) -> i64 {
        self.written.values().sum()
    }

    /// Messages over every dead-letter queue.
    pub fn total_dead_letters(&self) -> u64 {
        self.dead_letters.values().sum()
    }
}

impl fmt::Display for SyncSummary {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let decision = |kind: &str| self.decisions.get(kind).copied().unwrap_or(0);
        let written = |object: &str| self.written.get(object).copied().unwrap_or(0);
        writeln!(
            formatter,
            "sync {}{}{}",
            self.run_id,
            if self.dry_run { " (dry run)" } else { "" },
            if self.waited {
                ""
            } else {
                " (triggered, not waited for)"
            }
        )?;
        writeln!(
            formatter,
            "  members read        {} ({} pages)",
            self.members_read, self.pages_published
        )?;
        writeln!(
            formatter,
            "  decisions           opt-out {}, opt-in {}, no change {}",
            decision("opt_out"),
            decision("opt_in"),
            decision("no_change")
        )?;
        writeln!(
            formatter,
            "  salesforce read     {} records",
            self.records_read
        )?;
        writeln!(
            formatter,
            "  salesforce written  Contact {}, Lead {}, Account {} (bulk jobs {})",
            written("Contact"),
            written("Lead"),
            written("Account"),
            self.bulk_jobs
        )?;
        writeln!(formatter, "  write failures      {}", self.write_failures)?;
        let nonempty: Vec<String> = self
            .dead_letters
            .iter()
            .filter(|(_, depth)| **depth > 0)
            .map(|(queue, depth)| format!("{queue}={depth}"))
            .collect();
        let dead_letters = if nonempty.is_empty() {
            format!(
                "none ({} dead-letter queues empty)",
                self.dead_letters.len()
            )
        } else {
            nonempty.join(", ")
        };
        writeln!(formatter, "  dead letters        {dead_letters}")?;
        if let Some(report) = &self.dry_run_report {
            writeln!(
                formatter,
                "  dry run             {} records scanned; would change:",
                report.records_scanned
            )?;
            for object in &report.objects {
                writeln!(
                    formatter,
                    "    {:<14} check {}, uncheck {}",
                    object.object, object.would_check, object.would_uncheck
                )?;
                for change in &object.examples {
                    writeln!(
                        formatter,
                        "      {} {} {} -> {} ({})",
                        change.record_id,
                        change.email,
                        change.old_value,
                        change.new_value,
                        change.reason
                    )?;
                }
            }
        }
        write!(
            formatter,
            "  elapsed             {:.1}s",
            Duration::from_millis(self.elapsed_ms).as_secs_f64()
        )
    }
}

/// Snapshot, trigger, (wait), snapshot, summarise.
pub async fn sync(fleet: &Fleet, options: &SyncOptions) -> Result<SyncSummary> {
    let before = snapshot(fleet).await?;
    let started = Instant::now();
    let triggered = trigger(fleet, options).await?;
    let after = if options.wait {
        wait_idle(fleet, &triggered, options).await?
    } else {
        snapshot(fleet).await?
    };
    Ok(SyncSummary::from_snapshots(
        &before,
        &after,
        &triggered,
        started.elapsed(),
        options.wait,
        options.dry_run,
    ))
}

/// The handle of a named process, for callers that track one.
pub fn find<'a>(fleet: &'a Fleet, name: &str) -> Option<&'a ServiceHandle> {
    fleet.services.iter().find(|service| service.name == name)
}

#[cfg(test)]
mod tests {
    use optout_proto::admin::v1::QueueStatus;

    use super::*;

    fn status(
        counters: &[(&str, i64)],
        queues: &[(&str, u64)],
        busy: bool,
        in_flight: u64,
    ) -> GetStatusResponse {
        GetStatusResponse {
            busy,
            in_flight,
            counters: counters
                .iter()
                .map(|(name, value)| ((*name).to_owned(), *value))
                .collect(),
            queues: queues
                .iter()
                .map(|(name, messages)| QueueStatus {
                    name: (*name).to_owned(),
                    messages: *messages,
                    consumers: 1,
                })
                .collect(),
            ..GetStatusResponse::default()
        }
    }

    #[test]
    fn summary_sums_counter_differences_over_replicas() {
        let before = FleetSnapshot {
            statuses: vec![
                (
                    "fetcher".to_owned(),
                    Role::Fetcher,
                    status(&[("members_read", 10)], &[], false, 0),
                ),
                (
                    "salesforce-writer".to_owned(),
                    Role::Writer,
                    status(&[("written_contact", 5)], &[], false, 0),
                ),
                (
                    "salesforce-writer#2".to_owned(),
                    Role::Writer,
                    status(&[("written_contact", 7)], &[], false, 0),
                ),
            ],
        };
        let after = FleetSnapshot {
            statuses: vec![
                (
                    "fetcher".to_owned(),
                    Role::Fetcher,
                    status(&[("members_read", 25)], &[], false, 0),
                ),
                (
                    "salesforce-writer".to_owned(),
                    Role::Writer,
                    status(&[("written_contact", 9)], &[("q.dlq", 2)], false, 0),
                ),
                // Restarted: its counters began again from zero.
                (
                    "salesforce-writer#2".to_owned(),
                    Role::Writer,
                    status(&[("written_contact", 3)], &[], false, 0),
                ),
            ],
        };
        let summary = SyncSummary::from_snapshots(
            &before,
            &after,
            &Triggered::default(),
            Duration::from_millis(1500),
            true,
            false,
        );
        assert_eq!(summary.members_read, 15);
        assert_eq!(summary.written["Contact"], 7);
        assert_eq!(summary.total_dead_letters(), 2);
        assert_eq!(summary.elapsed_ms, 1500);
    }

    #[test]
    fn pipeline_is_busy_while_work_queues_hold_messages_but_not_for_dead_letters() {
        let busy = FleetSnapshot {
            statuses: vec![(
                "rule-evaluator".to_owned(),
                Role::Evaluator,
                status(
                    &[],
                    &[("p.members.changed", 3), ("p.members.changed.dlq", 1)],
                    false,
                    0,
                ),
            )],
        };
        assert_eq!(busy.busy_reasons().as_deref(), Some("p.members.changed=3"));
        let idle = FleetSnapshot {
            statuses: vec![(
                "rule-evaluator".to_owned(),
                Role::Evaluator,
                status(
                    &[],
                    &[("p.members.changed", 0), ("p.members.changed.dlq", 1)],
                    false,
                    0,
                ),
            )],
        };
        assert_eq!(idle.busy_reasons(), None);
        let in_flight = FleetSnapshot {
            statuses: vec![(
                "salesforce-writer".to_owned(),
                Role::Writer,
                status(&[], &[], true, 4),
            )],
        };
        assert_eq!(
            in_flight.busy_reasons().as_deref(),
            Some("salesforce-writer busy, salesforce-writer in_flight=4")
        );
    }
}

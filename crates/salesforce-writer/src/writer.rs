//! The write path shared by the `persons.dirty` consumer and the Salesforce poll: ask the evaluator
//! for the current decisions, read the current field values, write only the differences, audit
//! them, acknowledge applied opt-in evidence, and re-check that no decision moved meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use optout_amqp::{Message, Outcome, Publisher, Topology};
use optout_proto::evaluator::v1::decisions_client::DecisionsClient;
use optout_proto::evaluator::v1::{AckOptInRequest, DecideRequest, PersonDecision};
use optout_proto::queue::v1::PersonsDirty;
use optout_salesforce::{RecordUpdate, SalesforceClient, SaveResult};
use serde_json::Value;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use optout_service::AttachBearer;
use optout_telemetry::grpc::WithTrace;
use tracing::Instrument as _;

use crate::metrics::WriterMetrics;
use crate::plan::{self, COLLECTION_LIMIT, Change, CurrentRecord, ReadPacker, SfObject, Target};
use crate::store::{AuditEntry, Store};
use crate::{Error, Result};

/// Emails per `Decide` call.
const DECIDE_CHUNK: usize = 1000;
/// SOQL reads of one pass in flight at once.
const READ_CONCURRENCY: usize = 4;
/// `Decide` requests of a pass in flight at once.
const DECIDE_CONCURRENCY: usize = 4;
/// Proto full name of the messages this writer publishes.
const PERSONS_DIRTY_TYPE: &str = "optout.queue.v1.PersonsDirty";
/// Extra attempts for records that hit a transient per-record error (row locks).
const RECORD_RETRIES: u32 = 3;

/// The evaluator client with the bearer token attached.
pub(crate) type Decisions = DecisionsClient<InterceptedService<Channel, WithTrace<AttachBearer>>>;

/// The gRPC service name of the evaluator's decisions, for client spans.
const DECISIONS_SERVICE: &str = "optout.evaluator.v1.Decisions";

/// What asked for a write; stored in the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// A `persons.dirty` message (a Mailchimp change seen by the evaluator).
    Mailchimp,
    /// The Salesforce poll found an unchecked record of an opted-out person.
    SalesforcePoll,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Mailchimp => "mailchimp",
            Trigger::SalesforcePoll => "salesforce-poll",
        }
    }
}

/// How one pass of the write path behaves.
#[derive(Clone, Debug)]
pub(crate) struct ApplyOptions {
    pub(crate) trigger: Trigger,
    /// Compute and log, write nothing.
    pub(crate) dry_run: bool,
    /// Act on opt-outs only (the poll never unchecks).
    pub(crate) opt_out_only: bool,
}

/// What a pass must write, and what it needs once written.
#[derive(Debug, Default)]
struct Planned {
    /// Records that differ from their target, by object and id.
    changes: Vec<Change>,
    /// Opt-in targets whose evidence is acknowledged once their records are unchecked.
    opt_ins: Vec<Target>,
}

/// What one pass did.
#[derive(Debug, Default)]
pub(crate) struct ApplyReport {
    /// Emails whose records still failed transiently: their messages are redelivered.
    pub(crate) retry: BTreeSet<String>,
    /// Records that differed from their target.
    pub(crate) changes: usize,
    /// Records written.
    pub(crate) written: usize,
    /// In a dry run, the changes that would have been written.
    pub(crate) planned: Vec<Change>,
}

/// Cumulative counters reported by GetStatus.
#[derive(Debug)]
pub(crate) struct Counters {
    values: BTreeMap<&'static str, AtomicU64>,
}

impl Counters {
    const NAMES: [&'static str; 9] = [
        "records_read",
        "written_contact",
        "written_lead",
        "written_account",
        "write_failures",
        "bulk_jobs",
        "batches",
        "poll_cycles",
        "republished",
    ];

    fn new() -> Self {
        Self {
            values: Self::NAMES
                .iter()
                .map(|name| (*name, AtomicU64::new(0)))
                .collect(),
        }
    }

    pub(crate) fn add(&self, name: &str, amount: u64) {
        if let Some(value) = self.values.get(name) {
            value.fetch_add(amount, Ordering::Relaxed);
        } else {
            debug_assert!(false, "unknown counter {name}");
        }
    }

    pub(crate) fn snapshot(&self) -> HashMap<String, i64> {
        self.values
            .iter()
            .map(|(name, value)| {
                (
                    (*name).to_owned(),
                    i64::try_from(value.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
                )
            })
            .collect()
    }
}

/// Marks the writer busy while alive.
#[derive(Debug)]
pub(crate) struct BusyGuard<'a>(&'a AtomicU64);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How one record's write ended. Boxed texts keep it at two words: a pass holds one per change.
#[derive(Clone, Debug, PartialEq, Eq)]
enum RecordOutcome {
    Written,
    Retryable(Box<str>),
    ConvertedLead,
    Failed(Box<Rejection>),
}

/// Why Salesforce rejected a record for good.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rejection {
    status_code: String,
    message: String,
}

impl RecordOutcome {
    fn from_error(status_code: &str, message: &str) -> Self {
        if status_code == plan::CONVERTED_LEAD {
            RecordOutcome::ConvertedLead
        } else if plan::is_retryable_status(status_code) {
            RecordOutcome::Retryable(format!("{status_code}: {message}").into())
        } else {
            RecordOutcome::Failed(Box::new(Rejection {
                status_code: status_code.to_owned(),
                message: message.to_owned(),
            }))
        }
    }

    fn from_save_result(result: Option<&SaveResult>) -> Self {
        match result {
            None => RecordOutcome::Retryable("no result for record".into()),
            Some(result) if result.success => RecordOutcome::Written,
            Some(result) => match result.errors.first() {
                Some(error) => RecordOutcome::from_error(&error.status_code, &error.message),
                None => RecordOutcome::Failed(Box::new(Rejection {
                    status_code: "UNKNOWN".to_owned(),
                    message: "failed without errors".to_owned(),
                })),
            },
        }
    }
}

/// What one Bulk job settled.
#[derive(Debug)]
struct BulkSettled {
    /// Records Salesforce refused, by index into the pass's changes.
    failed: Vec<(usize, RecordOutcome)>,
    written: Written,
}

/// Which records of a Bulk job were written.
#[derive(Debug)]
enum Written {
    /// Every record the job was given, except the failed ones.
    AllButFailed,
    /// These, by index into the pass's changes.
    Listed(Vec<usize>),
}

impl BulkSettled {
    /// Records the outcomes of the job over `indexes` (its records) in `outcomes`.
    fn apply(self, indexes: &[usize], outcomes: &mut [Option<RecordOutcome>]) {
        match self.written {
            Written::AllButFailed => {
                for index in indexes {
                    outcomes[*index] = Some(RecordOutcome::Written);
                }
            }
            Written::Listed(written) => {
                for index in written {
                    outcomes[index] = Some(RecordOutcome::Written);
                }
            }
        }
        for (index, outcome) in self.failed {
            outcomes[index] = Some(outcome);
        }
    }
}

/// Everything the write path needs.
#[derive(Debug)]
pub(crate) struct Writer {
    pub(crate) salesforce: SalesforceClient,
    pub(crate) decisions: Decisions,
    pub(crate) store: Store,
    /// Publishes on the topic exchange (republishing dirty emails).
    pub(crate) publisher: Publisher,
    /// Publishes on the default exchange, straight into a dead-letter queue by name.
    pub(crate) dlq_publisher: Publisher,
    pub(crate) topology: Topology,
    /// Objects written (PersonAccount only when the org has person accounts).
    pub(crate) objects: Vec<SfObject>,
    pub(crate) person_accounts: bool,
    pub(crate) bulk_threshold: usize,
    pub(crate) counters: Counters,
    pub(crate) metrics: Arc<WriterMetrics>,
    busy: AtomicU64,
    /// Keeps a poll pass from writing while a dirty batch is under way and the other way round:
    /// both may hold the same email (a record edited just before its opt-out arrives), and each
    /// would read the record unchecked and write it, a duplicate write and audit row. Dirty
    /// batches share it (partitions hold disjoint emails); a poll pass takes it alone.
    write_gate: tokio::sync::RwLock<()>,
}

impl Writer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        salesforce: SalesforceClient,
        decisions: Decisions,
        store: Store,
        publisher: Publisher,
        dlq_publisher: Publisher,
        topology: Topology,
        objects: Vec<SfObject>,
        person_accounts: bool,
        bulk_threshold: usize,
        metrics: Arc<WriterMetrics>,
    ) -> Self {
        Self {
            salesforce,
            decisions,
            store,
            publisher,
            dlq_publisher,
            topology,
            objects,
            person_accounts,
            bulk_threshold,
            counters: Counters::new(),
            metrics,
            busy: AtomicU64::new(0),
            write_gate: tokio::sync::RwLock::new(()),
        }
    }

    /// Marks a batch or a poll cycle under way until the guard drops.
    pub(crate) fn busy_guard(&self) -> BusyGuard<'_> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        BusyGuard(&self.busy)
    }

    /// Whether a batch or a poll cycle is under way.
    pub(crate) fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst) > 0
    }

    /// One write pass over dirty emails (normalised, distinct) from Mailchimp changes. The
    /// report's `retry` names the emails whose records stayed locked, whose messages must be
    /// redelivered.
    pub(crate) async fn write_dirty(
        &self,
        emails: Vec<String>,
        trace_ids: Vec<Option<Arc<str>>>,
    ) -> Result<ApplyReport> {
        let _busy = self.busy_guard();
        self.counters.add("batches", 1);
        let options = ApplyOptions {
            trigger: Trigger::Mailchimp,
            dry_run: false,
            opt_out_only: false,
        };
        self.apply(emails, trace_ids, &options).await
    }

    /// Current decisions for `emails`, asked in chunks, a few at once.
    pub(crate) async fn decide(&self, emails: &[String]) -> Result<Vec<PersonDecision>> {
        use futures::TryStreamExt as _;
        let mut decisions = Vec::with_capacity(emails.len());
        let mut chunks = std::pin::pin!(self.decide_chunks(emails));
        while let Some(chunk) = chunks.try_next().await? {
            decisions.extend(chunk);
        }
        Ok(decisions)
    }

    /// The decisions of `emails` a chunk at a time, in order, with a few requests in flight: each
    /// reads its persons and members from PostgreSQL, where a large org is mostly not in memory,
    /// and asked one after another a pass of tens of thousands of emails mostly waits on disk.
    fn decide_chunks<'a>(
        &'a self,
        emails: &'a [String],
    ) -> impl futures::Stream<Item = Result<Vec<PersonDecision>>> + 'a {
        use futures::StreamExt as _;
        futures::stream::iter(emails.chunks(DECIDE_CHUNK))
            .map(move |chunk| async move {
                let response = self
                    .decisions
                    .clone()
                    .decide(DecideRequest {
                        emails: chunk.to_vec(),
                    })
                    .instrument(optout_telemetry::grpc::client_span(
                        DECISIONS_SERVICE,
                        "Decide",
                    ))
                    .await
                    .map_err(|status| Error::Evaluator(Box::new(status)))?;
                Ok(response.into_inner().decisions)
            })
            .buffered(DECIDE_CONCURRENCY)
    }

    /// One pass of the write path over `emails` (already normalised and distinct; sorted when
    /// `trace_ids` is not empty). `trace_ids` holds the trace id of the message that carried each
    /// email, in the order of `emails` (empty when no message did; one message's trace id is
    /// shared by all its emails). Both are dropped once the pass is planned: only the records to
    /// change, each with its message's trace, are kept while they are written.
    pub(crate) async fn apply(
        &self,
        emails: Vec<String>,
        trace_ids: Vec<Option<Arc<str>>>,
        options: &ApplyOptions,
    ) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        if emails.is_empty() {
            return Ok(report);
        }
        // Held until the audit rows are in, so the other path reads what this one wrote.
        let exclusive = options.trigger == Trigger::SalesforcePoll && !options.dry_run;
        let _exclusive_gate = if exclusive {
            Some(self.write_gate.write().await)
        } else {
            None
        };
        let _shared_gate = if exclusive {
            None
        } else {
            Some(self.write_gate.read().await)
        };
        let Planned { changes, opt_ins } =
            self.plan(&emails, &trace_ids, options.opt_out_only).await?;
        drop(emails);
        drop(trace_ids);
        if changes.is_empty() && opt_ins.is_empty() {
            // Nothing must change: no Salesforce call at all.
            return Ok(report);
        }
        report.changes = changes.len();
        if options.dry_run {
            for change in &changes {
                tracing::info!(
                    email = %change.email, object = %change.object, record_id = %change.id,
                    old = change.old, new = change.new, reason = %change.reason,
                    "dry run: would write"
                );
            }
            report.planned = changes;
            return Ok(report);
        }
        // Only opt-outs carry their Mailchimp time (`Target::opted_out_at`).
        let opt_out_times = || {
            changes
                .iter()
                .filter_map(|change| Some((&change.email, change.opted_out_at?)))
        };
        let _in_hand = opt_out_times()
            .map(|(_, time)| time)
            .min()
            .map(|oldest| self.metrics.pass_in_hand(oldest));
        let outcomes = match self.write(&changes).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                // Retried later (messages redelivered, or the next poll); until then the
                // gauge keeps counting these opt-outs.
                for (email, time) in opt_out_times() {
                    self.metrics.still_in_hand(email, time);
                }
                return Err(error);
            }
        };
        // The audit row names the trace holding the Salesforce call that wrote the record. A pass
        // that merged several batches runs in the first one's trace and links the others, so for
        // the rest this is not the trace their Mailchimp change started; the message's own trace
        // is the fallback when the pass has none.
        let write_trace = optout_telemetry::current_trace_id();

        let mut unsettled = BTreeSet::new();
        // Each written email with the decision version its changes were planned from (every
        // change of an email comes from the same decision), for the recheck.
        let mut written_emails = BTreeMap::new();
        for (change, outcome) in changes.iter().zip(&outcomes) {
            match outcome {
                RecordOutcome::Written => {
                    self.counters.add(change.object.written_counter(), 1);
                    self.metrics
                        .written(change.object.sobject(), change.opted_out_at);
                    report.written += 1;
                    written_emails.insert(&*change.email, change.version);
                }
                RecordOutcome::ConvertedLead => {
                    tracing::info!(record_id = %change.id, email = %change.email, "skipped converted lead");
                }
                RecordOutcome::Retryable(reason) => {
                    tracing::warn!(record_id = %change.id, object = %change.object, %reason, "record still failing after retries");
                    self.keep_in_hand(change);
                    unsettled.insert(&*change.email);
                    report.retry.insert(change.email.to_string());
                }
                RecordOutcome::Failed(rejection) => {
                    self.counters.add("write_failures", 1);
                    self.metrics
                        .failed(change.object.sobject(), &rejection.status_code);
                    self.keep_in_hand(change);
                    unsettled.insert(&*change.email);
                    self.dead_letter(change, &rejection.status_code, &rejection.message)
                        .await?;
                }
            }
        }
        for email in written_emails.keys() {
            if !unsettled.contains(email) {
                self.metrics.settled(email);
            }
        }
        // Audit before acknowledging anything, so a crash here replays rather than forgets.
        // Boxed: the closures' borrows would otherwise trip the `Send` check of the pass's future.
        let audit: Box<dyn Iterator<Item = AuditEntry<'_>> + Send + '_> = Box::new(
            changes
                .iter()
                .zip(&outcomes)
                .filter(|(_, outcome)| matches!(outcome, RecordOutcome::Written))
                .map(|(change, _)| AuditEntry {
                    change,
                    trigger: options.trigger.as_str(),
                    trace_id: write_trace.as_deref().or(change.trace_id.as_deref()),
                }),
        );
        self.store.insert_audit(audit).await?;

        for target in &opt_ins {
            if !unsettled.contains(&*target.email) {
                self.ack_opt_in(target).await?;
            }
        }
        self.recheck(&written_emails).await?;
        Ok(report)
    }

    /// Keeps the opt-out of a change the pass could not write on the oldest-unwritten gauge.
    fn keep_in_hand(&self, change: &Change) {
        if let Some(time) = change.opted_out_at {
            self.metrics.still_in_hand(&change.email, time);
        }
    }

    /// The records of `emails` that differ from their decision. Decisions stream in (a thousand
    /// emails per request, a few requests in flight) and each object's reads are packed from
    /// their targets as they come; a read goes out once full and its rows are compared at once.
    /// So a pass holds the targets of a few reads whatever its size (a first sync hands in tens
    /// of thousands of emails, most of them already right in Salesforce), and reads in as few
    /// statements as if it had packed every email at once. Only the records to change are kept
    /// for the whole pass, to be written together.
    async fn plan(
        &self,
        emails: &[String],
        trace_ids: &[Option<Arc<str>>],
        opt_out_only: bool,
    ) -> Result<Planned> {
        use futures::StreamExt as _;
        let mut planned = Planned::default();
        let mut rules = plan::RuleTexts::default();
        let mut packers: Vec<ReadPacker> = self
            .objects
            .iter()
            .map(|object| ReadPacker::new(*object, self.person_accounts))
            .collect();
        let mut decisions = std::pin::pin!(self.decide_chunks(emails));
        let mut waiting: VecDeque<plan::Read> = VecDeque::new();
        let mut reads = futures::stream::FuturesUnordered::new();
        let mut decided = false;
        loop {
            while reads.len() < READ_CONCURRENCY {
                let Some(read) = waiting.pop_front() else {
                    break;
                };
                reads.push(self.read(read));
            }
            if decided && reads.is_empty() {
                break;
            }
            // More decisions only while few reads wait for a slot: what the pass holds stays a
            // few reads' worth of targets. One of the two branches is always enabled: reads are
            // under way, or none wait and the decisions are not all in.
            let decide = !decided && waiting.len() < READ_CONCURRENCY;
            tokio::select! {
                chunk = decisions.next(), if decide => match chunk {
                    Some(chunk) => {
                        let targets = plan::targets_with(&chunk?, opt_out_only, &mut rules);
                        for mut target in targets.into_values() {
                            target.trace_id = message_trace(emails, trace_ids, &target.email);
                            // Acknowledged once the pass has written (or found nothing to
                            // uncheck); such targets are rare.
                            if !target.opted_out && target.evidence_id != 0 {
                                planned.opt_ins.push(target.clone());
                            }
                            let target = Arc::new(target);
                            waiting.extend(packers.iter_mut().filter_map(|packer| packer.push(&target)));
                        }
                    }
                    None => {
                        decided = true;
                        waiting.extend(packers.iter_mut().filter_map(ReadPacker::finish));
                    }
                },
                Some(changes) = reads.next(), if !reads.is_empty() => planned.changes.extend(changes?),
            }
        }
        // Reads hold distinct emails per object, hence distinct records; one order for the pass.
        // Unstable: a stable sort would allocate half the vector again, at the pass's peak.
        planned.changes.sort_unstable_by(|left, right| {
            (left.object, &left.id).cmp(&(right.object, &right.id))
        });
        planned
            .changes
            .dedup_by(|left, right| left.object == right.object && left.id == right.id);
        // Grown by doubling, the vector may hold up to twice its length for the rest of the pass.
        planned.changes.shrink_to_fit();
        Ok(planned)
    }

    /// Reads the current values of one read's records and returns those that differ from their
    /// target; the rows are compared as they come, so a pass never holds every record it read.
    /// Salesforce allows 25 long-running requests per org; a pass keeps `READ_CONCURRENCY` in
    /// flight, as one at a time it would spend most of its time waiting on round trips.
    async fn read(&self, read: plan::Read) -> Result<Vec<Change>> {
        let rows: Vec<Value> = self.salesforce.query(&read.soql).await?;
        self.counters.add("records_read", rows.len() as u64);
        let records: Vec<CurrentRecord> = rows
            .iter()
            .filter_map(|row| plan::parse_record(read.object, row))
            .collect();
        drop(rows);
        Ok(read.diff(&records))
    }

    /// Writes `changes` and returns one outcome per change, retrying transient failures.
    async fn write(&self, changes: &[Change]) -> Result<Vec<RecordOutcome>> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; changes.len()];
        let mut collection = Vec::new();
        let mut bulk = Vec::new();
        for object in SfObject::ALL {
            let indexes: Vec<usize> = changes
                .iter()
                .enumerate()
                .filter(|(_, change)| change.object == object)
                .map(|(index, _)| index)
                .collect();
            if indexes.len() > self.bulk_threshold {
                bulk.push((object, indexes));
            } else {
                collection.extend(indexes);
            }
        }
        // Each object's job at once: a job's time is mostly Salesforce processing it.
        let jobs = bulk
            .iter()
            .map(|(object, indexes)| self.write_bulk(*object, changes, indexes));
        for (settled, (_, indexes)) in futures::future::try_join_all(jobs)
            .await?
            .into_iter()
            .zip(&bulk)
        {
            settled.apply(indexes, &mut outcomes);
        }
        self.write_collection(changes, &collection, &mut outcomes)
            .await?;

        for attempt in 0..RECORD_RETRIES {
            let retry: Vec<usize> = outcomes
                .iter()
                .enumerate()
                .filter(|(_, outcome)| matches!(outcome, Some(RecordOutcome::Retryable(_)) | None))
                .map(|(index, _)| index)
                .collect();
            if retry.is_empty() {
                break;
            }
            let backoff = Duration::from_millis(200 * 4u64.pow(attempt) + fastrand::u64(0..100));
            tracing::info!(
                records = retry.len(),
                ?backoff,
                "retrying records after transient errors"
            );
            tokio::time::sleep(backoff).await;
            self.write_collection(changes, &retry, &mut outcomes)
                .await?;
        }
        Ok(outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| RecordOutcome::Retryable("not processed".into()))
            })
            .collect())
    }

    /// sObject Collections, up to 200 records (mixed objects) per call.
    async fn write_collection(
        &self,
        changes: &[Change],
        indexes: &[usize],
        outcomes: &mut [Option<RecordOutcome>],
    ) -> Result<()> {
        for chunk in indexes.chunks(COLLECTION_LIMIT) {
            let records: Vec<RecordUpdate> = chunk
                .iter()
                .map(|index| record_update(&changes[*index]))
                .collect();
            let results = self.salesforce.update_collection(&records).await?;
            // Results come back in request order, one per record.
            for (position, index) in chunk.iter().enumerate() {
                outcomes[*index] = Some(RecordOutcome::from_save_result(results.get(position)));
            }
        }
        Ok(())
    }

    /// One Bulk API 2.0 update job for `object` over `changes[indexes]` (sorted by id, as
    /// `changes` is); returns what it settled. Records it did not settle are retried through
    /// collections.
    async fn write_bulk(
        &self,
        object: SfObject,
        changes: &[Change],
        indexes: &[usize],
    ) -> Result<BulkSettled> {
        let selected: Vec<&Change> = indexes.iter().map(|index| &changes[*index]).collect();
        let csv = plan::bulk_csv(object, &selected);
        drop(selected);
        tracing::info!(%object, records = indexes.len(), "writing through a bulk job");
        let result = self
            .salesforce
            .bulk_update(object.sobject(), csv, indexes.len() as u64)
            .await?;
        self.counters.add("bulk_jobs", 1);
        // Bulk results are not in input order: match them by record id, by binary search over
        // the job's records rather than through a map as large as the job.
        let row_id = |row: &HashMap<String, String>| -> Option<usize> {
            ["Id", "sf__Id"]
                .iter()
                .filter_map(|column| row.get(*column))
                .find_map(|id| {
                    indexes
                        .binary_search_by(|index| changes[*index].id.as_str().cmp(id))
                        .ok()
                        .map(|position| indexes[position])
                })
        };
        let failed = result
            .failed
            .iter()
            .filter_map(|row| {
                let index = row_id(row)?;
                let (status_code, message) =
                    plan::parse_bulk_error(row.get("sf__Error").map(String::as_str).unwrap_or(""));
                Some((index, RecordOutcome::from_error(&status_code, &message)))
            })
            .collect();
        let written = if result.rest_succeeded {
            // Every row was processed: those not listed as failed were written.
            Written::AllButFailed
        } else {
            // Records in neither list stay unsettled and are retried through collections.
            Written::Listed(result.successful.iter().filter_map(row_id).collect())
        };
        Ok(BulkSettled { failed, written })
    }

    /// Keeps a permanently rejected record, with Salesforce's reason, in its partition's DLQ.
    async fn dead_letter(&self, change: &Change, status_code: &str, message: &str) -> Result<()> {
        let reason = format!(
            "{status_code}: {message} ({} {})",
            change.object.sobject(),
            change.id
        );
        tracing::warn!(email = %change.email, %reason, "salesforce rejected record, dead-lettering");
        let queue = self
            .topology
            .persons_dirty_queue(self.topology.partition_for(&change.email));
        let dead_letter_queue = self.topology.dead_letter_queue(&queue);
        let body = PersonsDirty {
            emails: vec![change.email.to_string()],
            reason: reason.clone(),
        };
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            optout_amqp::REASON_HEADER.into(),
            lapin::types::AMQPValue::LongString(reason.as_str().into()),
        );
        headers.insert(
            optout_amqp::ORIGINAL_ROUTING_KEY_HEADER.into(),
            lapin::types::AMQPValue::LongString(
                self.topology
                    .persons_dirty_routing_key(self.topology.partition_for(&change.email))
                    .as_str()
                    .into(),
            ),
        );
        self.dlq_publisher
            .publish_typed(&dead_letter_queue, PERSONS_DIRTY_TYPE, &body, headers)
            .await?;
        Ok(())
    }

    async fn ack_opt_in(&self, target: &Target) -> Result<()> {
        let response = self
            .decisions
            .clone()
            .ack_opt_in(AckOptInRequest {
                email: target.email.to_string(),
                opt_in_evidence_id: target.evidence_id,
            })
            .instrument(optout_telemetry::grpc::client_span(
                DECISIONS_SERVICE,
                "AckOptIn",
            ))
            .await
            .map_err(|status| Error::Evaluator(Box::new(status)))?;
        if !response.into_inner().cleared {
            tracing::info!(email = %target.email, "newer opt-in evidence arrived meanwhile; it stays pending");
        }
        Ok(())
    }

    /// Asks again for the emails just written: a decision that moved while we wrote (a concurrent
    /// Mailchimp change, or another writer's poll cycle) is republished so it converges.
    async fn recheck(&self, written: &BTreeMap<&str, i64>) -> Result<()> {
        use futures::TryStreamExt as _;
        let mut moved = Vec::new();
        let mut last: Option<String> = None;
        // A group at a time, so the emails asked are copied a group at a time too.
        loop {
            let emails = group_after(written, last.as_deref(), DECIDE_CHUNK * DECIDE_CONCURRENCY);
            let Some(end) = emails.last() else {
                break;
            };
            last = Some(end.clone());
            let mut chunks = std::pin::pin!(self.decide_chunks(&emails));
            while let Some(decisions) = chunks.try_next().await? {
                for decision in decisions {
                    let email = plan::normalize_email(&decision.email);
                    if written
                        .get(email.as_str())
                        .is_some_and(|version| *version != decision.version)
                    {
                        moved.push(email);
                    }
                }
            }
        }
        self.republish(&moved, "decision changed while writing")
            .await
    }

    /// Publishes `emails` back to their `persons.dirty` partitions.
    pub(crate) async fn republish(&self, emails: &[String], reason: &str) -> Result<()> {
        let mut by_partition: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for email in emails {
            by_partition
                .entry(self.topology.partition_for(email))
                .or_default()
                .push(email.clone());
        }
        for (partition, emails) in by_partition {
            tracing::info!(
                partition,
                emails = emails.len(),
                reason,
                "republishing dirty emails"
            );
            self.counters.add("republished", emails.len() as u64);
            let body = PersonsDirty {
                emails,
                reason: reason.to_owned(),
            };
            // Someone changed the decision while we wrote: converge promptly.
            self.publisher
                .publish_typed(
                    &self.topology.persons_dirty_routing_key(partition),
                    PERSONS_DIRTY_TYPE,
                    &body,
                    optout_amqp::urgent_headers(),
                )
                .await?;
        }
        Ok(())
    }
}

/// The emails a batch of dirty notifications asks to write.
pub(crate) type DirtyEmails = BTreeMap<String, Option<Arc<str>>>;

/// What a write pass needs of a batch of dirty notifications, and what the batch keeps of them
/// while it waits for the pass.
#[derive(Debug, Default)]
pub(crate) struct DirtyBatch {
    /// The distinct normalised emails, each with the trace id of the first message that
    /// carried it.
    pub(crate) emails: DirtyEmails,
    /// For each message, in order, a key of each of its emails (see [`email_key`]): enough to
    /// tell which messages hold an email the pass must retry. The decoded messages are dropped
    /// instead of held through the pass: in a first sync's burst they would be one more copy
    /// of every email.
    pub(crate) keys: Vec<Box<[u64]>>,
}

/// Reads a batch of dirty notifications (see [`DirtyBatch`]).
pub(crate) fn dirty_batch(messages: Vec<Message<PersonsDirty>>) -> DirtyBatch {
    let mut batch = DirtyBatch::default();
    for message in messages {
        let trace_id: Option<Arc<str>> = traceparent(&message.headers)
            .and_then(|value| plan::trace_id_from_traceparent(&value))
            .map(Arc::from);
        let mut keys = Vec::with_capacity(message.body.emails.len());
        for email in &message.body.emails {
            let email = plan::normalize_email(email);
            if !email.is_empty() {
                keys.push(email_key(&email));
                batch
                    .emails
                    .entry(email)
                    .or_insert_with(|| trace_id.clone());
            }
        }
        batch.keys.push(keys.into_boxed_slice());
    }
    batch
}

/// A fixed hash of a normalised email. Two emails sharing a key only make a message be
/// redelivered with the other's, which costs a redundant read, never a lost write.
pub(crate) fn email_key(email: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    // `DefaultHasher::new` has fixed keys: the same email gets the same key in every batch.
    let mut hasher = std::hash::DefaultHasher::new();
    email.hash(&mut hasher);
    hasher.finish()
}

/// The trace id of the message that carried `email`, from the pass's sorted `emails` and their
/// `trace_ids`.
fn message_trace(
    emails: &[String],
    trace_ids: &[Option<Arc<str>>],
    email: &str,
) -> Option<Arc<str>> {
    if trace_ids.is_empty() {
        return None;
    }
    let index = emails
        .binary_search_by(|candidate| candidate.as_str().cmp(email))
        .ok()?;
    trace_ids.get(index)?.clone()
}

/// Up to `size` emails of `written` that sort after `after`, in order. A function of its own, so
/// no map iterator is held across the recheck's awaits (which trips the `Send` check of the
/// pass's future).
fn group_after(written: &BTreeMap<&str, i64>, after: Option<&str>, size: usize) -> Vec<String> {
    use std::ops::Bound;
    let start = after.map_or(Bound::Unbounded, Bound::Excluded);
    written
        .range::<&str, _>((start, Bound::Unbounded))
        .take(size)
        .map(|(email, _)| (*email).to_owned())
        .collect()
}

/// What to do with each message once its emails were written: redeliver it when the pass
/// failed (`Err`, its reason) or any of its emails is in the retry set, else acknowledge it.
/// `keys` are the messages' email keys from [`dirty_batch`].
pub(crate) fn outcomes(
    keys: &[Box<[u64]>],
    result: &std::result::Result<Arc<BTreeSet<String>>, String>,
) -> Vec<Outcome> {
    let retry: HashSet<u64> = match result {
        Ok(retry) => retry.iter().map(|email| email_key(email)).collect(),
        Err(_) => HashSet::new(),
    };
    keys.iter()
        .map(|message| match result {
            Err(reason) => Outcome::Retry(reason.clone()),
            Ok(_) if message.iter().any(|key| retry.contains(key)) => {
                Outcome::Retry("salesforce records stayed locked".to_owned())
            }
            Ok(_) => Outcome::Ack,
        })
        .collect()
}

/// The collection update of one change.
fn record_update(change: &Change) -> RecordUpdate {
    let mut fields = serde_json::Map::new();
    fields.insert(
        change.object.opt_out_field().to_owned(),
        Value::Bool(change.new),
    );
    RecordUpdate {
        object: change.object.sobject().to_owned(),
        id: change.id.clone(),
        fields,
    }
}

/// The W3C `traceparent` header of a delivery, if present.
fn traceparent(headers: &lapin::types::FieldTable) -> Option<String> {
    match headers.inner().get("traceparent")? {
        lapin::types::AMQPValue::LongString(value) => {
            Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
        }
        lapin::types::AMQPValue::ShortString(value) => Some(value.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(emails: &[&str]) -> Message<PersonsDirty> {
        Message {
            body: PersonsDirty {
                emails: emails.iter().map(|email| (*email).to_owned()).collect(),
                ..PersonsDirty::default()
            },
            message_id: String::new(),
            redelivered: false,
            headers: lapin::types::FieldTable::default(),
        }
    }

    #[test]
    fn only_the_messages_holding_an_email_to_retry_are_redelivered() {
        let batch = dirty_batch(vec![
            message(&["Ann@Example.com", "bob@example.com"]),
            message(&["cy@example.com"]),
            // A flush carries no email.
            message(&[]),
            message(&[" ANN@example.com "]),
        ]);
        assert_eq!(
            batch.emails.keys().collect::<Vec<_>>(),
            ["ann@example.com", "bob@example.com", "cy@example.com"]
        );
        let retry = Ok(Arc::new(BTreeSet::from(["ann@example.com".to_owned()])));
        let locked = Outcome::Retry("salesforce records stayed locked".to_owned());
        assert_eq!(
            outcomes(&batch.keys, &retry),
            [locked.clone(), Outcome::Ack, Outcome::Ack, locked]
        );
        assert_eq!(
            outcomes(&batch.keys, &Ok(Arc::default())),
            [Outcome::Ack, Outcome::Ack, Outcome::Ack, Outcome::Ack]
        );
        let failed = Outcome::Retry("evaluator down".to_owned());
        assert_eq!(
            outcomes(&batch.keys, &Err("evaluator down".to_owned())),
            [failed.clone(), failed.clone(), failed.clone(), failed]
        );
    }

    #[test]
    fn the_recheck_asks_every_written_email_once_a_group_at_a_time() {
        let emails: Vec<String> = (0..10).map(|index| format!("p{index}@x.com")).collect();
        let written: BTreeMap<&str, i64> = emails.iter().map(|email| (email.as_str(), 1)).collect();
        let mut asked = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let group = group_after(&written, last.as_deref(), 3);
            assert!(group.len() <= 3);
            let Some(end) = group.last() else { break };
            last = Some(end.clone());
            asked.extend(group);
        }
        assert_eq!(asked, emails);
    }
}

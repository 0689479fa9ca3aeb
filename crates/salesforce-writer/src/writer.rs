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
use crate::stage;
use crate::stage::{PassId, StagedChange, Which};
use crate::store::Store;
use crate::{Error, Result};
use futures::stream::BoxStream;

/// Emails per `Decide` call.
const DECIDE_CHUNK: usize = 1000;
/// Staged changes read back per statement.
const STAGE_PAGE: usize = 2000;
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

/// How one record's write ended.
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

    /// The outcome as `pass_changes` stores it.
    fn stored(&self) -> stage::Outcome<'_> {
        let (outcome, status_code, message) = match self {
            RecordOutcome::Written => ("written", None, None),
            RecordOutcome::ConvertedLead => ("converted", None, None),
            RecordOutcome::Retryable(reason) => ("retry", None, Some(&**reason)),
            RecordOutcome::Failed(rejection) => (
                "failed",
                Some(rejection.status_code.as_str()),
                Some(rejection.message.as_str()),
            ),
        };
        stage::Outcome {
            outcome: Some(outcome),
            status_code,
            message,
        }
    }

    /// The outcome of a staged change; one no write settled is still to retry.
    fn of_staged(staged: &StagedChange) -> Self {
        match staged.outcome.as_deref() {
            Some("written") => RecordOutcome::Written,
            Some("converted") => RecordOutcome::ConvertedLead,
            Some("failed") => RecordOutcome::Failed(Box::new(Rejection {
                status_code: staged.status_code.clone().unwrap_or_default(),
                message: staged.message.clone().unwrap_or_default(),
            })),
            Some("retry") => {
                RecordOutcome::Retryable(staged.message.clone().unwrap_or_default().into())
            }
            _ => RecordOutcome::Retryable("not processed".into()),
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

    /// One write pass over the dirty emails staged in `pass` (normalised) from Mailchimp
    /// changes. The report's `retry` names the emails whose records stayed locked, whose
    /// messages must be redelivered.
    pub(crate) async fn write_dirty(&self, pass: PassId) -> Result<ApplyReport> {
        let _busy = self.busy_guard();
        self.counters.add("batches", 1);
        let options = ApplyOptions {
            trigger: Trigger::Mailchimp,
            dry_run: false,
            opt_out_only: false,
        };
        self.apply(pass, &options).await
    }

    /// One pass of the write path over `emails` (normalised), staged in a pass of their own
    /// that is removed at the end.
    pub(crate) async fn apply_emails(
        &self,
        emails: &[String],
        options: &ApplyOptions,
    ) -> Result<ApplyReport> {
        if emails.is_empty() {
            return Ok(ApplyReport::default());
        }
        let pass = self.store.begin_pass().await?;
        let result = async {
            let emails: Vec<(&str, Option<&str>)> =
                emails.iter().map(|email| (email.as_str(), None)).collect();
            self.store.stage_emails(pass, &emails).await?;
            self.apply(pass, options).await
        }
        .await;
        self.end_passes(&[pass]).await;
        result
    }

    /// Stages the emails of one dirty notification of a batch under the batch's own id (begun
    /// at its first email), to be merged into its pass's, and keeps a key of each in `staged`.
    /// Called for each message as the batch fills, so a batch never holds its messages' emails,
    /// only their keys. An email in several messages keeps the trace of the first. No pass is
    /// begun for a batch without emails (flushes only).
    pub(crate) async fn stage_message(
        &self,
        staged: &mut StagedBatch,
        message: Message<PersonsDirty>,
    ) -> Result<()> {
        let (emails, trace_id) = message_emails(message);
        staged
            .keys
            .push(emails.iter().map(|email| email_key(email)).collect());
        if emails.is_empty() {
            return Ok(());
        }
        let batch = match staged.batch {
            Some(batch) => batch,
            None => {
                let batch = self.store.begin_pass().await?;
                staged.batch = Some(batch);
                batch
            }
        };
        staged.emails += emails.len();
        let rows: Vec<(&str, Option<&str>)> = emails
            .iter()
            .map(|email| (email.as_str(), trace_id.as_deref()))
            .collect();
        self.store.stage_emails(batch, &rows).await
    }

    /// Removes the staged rows of `passes`. A failure only leaves them to the sweep of stale
    /// passes.
    pub(crate) async fn end_passes(&self, passes: &[PassId]) {
        if let Err(error) = self.store.end_passes(passes).await {
            tracing::warn!(error = %crate::error_chain(&error), ?passes, "could not remove passes' staged rows");
        }
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
            .map(move |chunk| self.decide_request(chunk.to_vec()))
            .buffered(DECIDE_CONCURRENCY)
    }

    /// The decisions of the emails staged in `pass`, a page of them at a time, with each page
    /// (the emails and their message traces); as [`Self::decide_chunks`].
    fn decide_staged(
        &self,
        pass: PassId,
    ) -> BoxStream<'_, Result<(Vec<PersonDecision>, EmailPage)>> {
        use futures::StreamExt as _;
        futures::stream::try_unfold(None::<String>, move |after| async move {
            let page = self
                .store
                .staged_emails(pass, after.as_deref(), DECIDE_CHUNK)
                .await?;
            let Some((last, _)) = page.last() else {
                return Ok(None);
            };
            let next = Some(last.clone());
            Ok(Some((page, next)))
        })
        .map(move |page: Result<EmailPage>| async move {
            let page = page?;
            let emails = page.iter().map(|(email, _)| email.clone()).collect();
            Ok((self.decide_request(emails).await?, page))
        })
        .buffered(DECIDE_CONCURRENCY)
        // Boxed, as the pass's future would otherwise trip rustc's higher-ranked `Send` check.
        .boxed()
    }

    async fn decide_request(&self, emails: Vec<String>) -> Result<Vec<PersonDecision>> {
        let response = self
            .decisions
            .clone()
            .decide(DecideRequest { emails })
            .instrument(optout_telemetry::grpc::client_span(
                DECISIONS_SERVICE,
                "Decide",
            ))
            .await
            .map_err(|status| Error::Evaluator(Box::new(status)))?;
        Ok(response.into_inner().decisions)
    }

    /// The staged changes of `pass` that are `which`, a page at a time in (object, record id)
    /// order. Rows settled while the pages are read do not move the pages on: each starts after
    /// the last record of the one before.
    fn staged_pages(&self, pass: PassId, which: Which) -> BoxStream<'_, Result<Vec<StagedChange>>> {
        use futures::StreamExt as _;
        futures::stream::try_unfold(None::<(SfObject, String)>, move |after| async move {
            let page = self
                .store
                .staged_changes(
                    pass,
                    which,
                    after.as_ref().map(|(object, id)| (*object, id.as_str())),
                    STAGE_PAGE,
                )
                .await?;
            let Some(last) = page.last() else {
                return Ok(None);
            };
            let next = Some((last.change.object, last.change.id.clone()));
            Ok(Some((page, next)))
        })
        // Boxed, as the pass's future would otherwise trip rustc's higher-ranked `Send` check.
        .boxed()
    }

    /// One pass of the write path over the emails staged in `pass`. The pass reads its emails,
    /// and then its changes, back a page at a time, so it holds a few pages whatever its size.
    /// The caller ends the pass (removes its rows).
    pub(crate) async fn apply(&self, pass: PassId, options: &ApplyOptions) -> Result<ApplyReport> {
        use futures::TryStreamExt as _;
        let mut report = ApplyReport::default();
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
        let started = std::time::Instant::now();
        let opt_ins = self.plan(pass, options.opt_out_only).await?;
        let counts = self.store.staged_counts(pass).await?;
        report.changes = counts.iter().map(|(_, changes)| changes).sum();
        tracing::debug!(
            changes = report.changes,
            elapsed_ms = started.elapsed().as_millis(),
            "pass planned"
        );
        if report.changes == 0 && opt_ins.is_empty() {
            // Nothing must change: no Salesforce call at all.
            return Ok(report);
        }
        if options.dry_run {
            let mut pages = std::pin::pin!(self.staged_pages(pass, Which::All));
            while let Some(page) = pages.try_next().await? {
                for StagedChange { change, .. } in page {
                    tracing::info!(
                        email = %change.email, object = %change.object, record_id = %change.id,
                        old = change.old, new = change.new, reason = %change.reason,
                        "dry run: would write"
                    );
                    report.planned.push(change);
                }
            }
            return Ok(report);
        }
        // Only opt-outs carry their Mailchimp time (`Target::opted_out_at`).
        let _in_hand = self
            .store
            .oldest_opt_out(pass)
            .await?
            .map(|oldest| self.metrics.pass_in_hand(oldest));
        let writing = std::time::Instant::now();
        let written = self.write(pass, &counts).await;
        tracing::debug!(elapsed_ms = writing.elapsed().as_millis(), "pass written");
        if let Err(error) = written {
            // Retried later (messages redelivered, or the next poll); until then the gauge
            // keeps counting these opt-outs.
            if let Err(error) = self.keep_pass_in_hand(pass).await {
                tracing::warn!(error = %crate::error_chain(&error), "could not keep a failed pass's opt-outs on the gauge");
            }
            return Err(error);
        }
        // The audit row names the trace holding the Salesforce call that wrote the record. A pass
        // that merged several batches runs in the first one's trace and links the others, so for
        // the rest this is not the trace their Mailchimp change started; the message's own trace
        // is the fallback when the pass has none.
        let write_trace = optout_telemetry::current_trace_id();

        // The records not written first: their emails stay in hand, to retry or dead-letter.
        let mut unsettled = BTreeSet::new();
        let mut pages = std::pin::pin!(self.staged_pages(pass, Which::NotWritten));
        while let Some(page) = pages.try_next().await? {
            for staged in page {
                let change = &staged.change;
                match RecordOutcome::of_staged(&staged) {
                    RecordOutcome::Written => {}
                    RecordOutcome::ConvertedLead => {
                        tracing::info!(record_id = %change.id, email = %change.email, "skipped converted lead");
                    }
                    RecordOutcome::Retryable(reason) => {
                        tracing::warn!(record_id = %change.id, object = %change.object, %reason, "record still failing after retries");
                        self.keep_in_hand(change);
                        unsettled.insert(change.email.to_string());
                        report.retry.insert(change.email.to_string());
                    }
                    RecordOutcome::Failed(rejection) => {
                        self.counters.add("write_failures", 1);
                        self.metrics
                            .failed(change.object.sobject(), &rejection.status_code);
                        self.keep_in_hand(change);
                        unsettled.insert(change.email.to_string());
                        self.dead_letter(change, &rejection.status_code, &rejection.message)
                            .await?;
                    }
                }
            }
        }
        let mut pages = std::pin::pin!(self.staged_pages(pass, Which::Written));
        while let Some(page) = pages.try_next().await? {
            for StagedChange { change, .. } in page {
                self.counters.add(change.object.written_counter(), 1);
                self.metrics
                    .written(change.object.sobject(), change.opted_out_at);
                report.written += 1;
                if !unsettled.contains(&*change.email) {
                    self.metrics.settled(&change.email);
                }
            }
        }
        // Audit before acknowledging anything, so a crash here replays rather than forgets.
        self.store
            .audit_written(pass, options.trigger.as_str(), write_trace.as_deref())
            .await?;

        for target in &opt_ins {
            if !unsettled.contains(&*target.email) {
                self.ack_opt_in(target).await?;
            }
        }
        self.recheck(pass).await?;
        Ok(report)
    }

    /// Keeps the opt-out of a change the pass could not write on the oldest-unwritten gauge.
    fn keep_in_hand(&self, change: &Change) {
        if let Some(time) = change.opted_out_at {
            self.metrics.still_in_hand(&change.email, time);
        }
    }

    /// Keeps every opt-out of a pass that failed on the gauge.
    async fn keep_pass_in_hand(&self, pass: PassId) -> Result<()> {
        use futures::TryStreamExt as _;
        let mut pages = std::pin::pin!(self.staged_pages(pass, Which::NotWritten));
        while let Some(page) = pages.try_next().await? {
            for staged in &page {
                self.keep_in_hand(&staged.change);
            }
        }
        Ok(())
    }

    /// Stages the records of the emails staged in `pass` that differ from their decision, and
    /// returns the opt-in targets to acknowledge once written. Decisions stream in (a thousand
    /// emails per request, a few requests in flight) and each object's reads are packed from
    /// their targets as they come; a read goes out once full and its rows are compared at once.
    /// So a pass holds the targets of a few reads whatever its size (a first sync hands in tens
    /// of thousands of emails, most of them already right in Salesforce), and reads in as few
    /// statements as if it had packed every email at once.
    async fn plan(&self, pass: PassId, opt_out_only: bool) -> Result<Vec<Target>> {
        use futures::StreamExt as _;
        let mut opt_ins = Vec::new();
        let mut rules = plan::RuleTexts::default();
        let mut packers: Vec<ReadPacker> = self
            .objects
            .iter()
            .map(|object| ReadPacker::new(*object, self.person_accounts))
            .collect();
        let mut decisions = std::pin::pin!(self.decide_staged(pass));
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
                        let (decisions, page) = chunk?;
                        let targets = plan::targets_with(&decisions, opt_out_only, &mut rules);
                        for mut target in targets.into_values() {
                            target.trace_id = page_trace(&page, &target.email);
                            // Acknowledged once the pass has written (or found nothing to
                            // uncheck); such targets are rare.
                            if !target.opted_out && target.evidence_id != 0 {
                                opt_ins.push(target.clone());
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
                Some(changes) = reads.next(), if !reads.is_empty() => {
                    self.store.stage_changes(pass, &changes?).await?;
                }
            }
        }
        Ok(opt_ins)
    }

    /// Reads the current values of one read's records and returns those that differ from their
    /// target; the rows are compared as they come, so a pass never holds every record it read.
    /// Salesforce allows 25 long-running requests per org; a pass keeps `READ_CONCURRENCY` in
    /// flight, as one at a time it would spend most of its time waiting on round trips.
    async fn read(&self, read: plan::Read) -> Result<Vec<Change>> {
        let rows: Vec<plan::RecordRow> = self.salesforce.query(&read.soql).await?;
        self.counters.add("records_read", rows.len() as u64);
        let records: Vec<CurrentRecord> = rows
            .into_iter()
            .filter_map(|row| plan::parse_row(read.object, row))
            .collect();
        Ok(read.diff(&records))
    }

    /// Writes the changes staged in `pass` (`counts` of each object) and records each outcome
    /// there, retrying transient failures.
    async fn write(&self, pass: PassId, counts: &[(SfObject, usize)]) -> Result<()> {
        // Each large object's job at once: a job's time is mostly Salesforce processing it.
        let jobs = counts
            .iter()
            .filter(|(_, changes)| *changes > self.bulk_threshold)
            .map(|(object, changes)| self.write_bulk(pass, *object, *changes));
        futures::future::try_join_all(jobs).await?;
        // The objects too small for a job, and the records a job did not settle.
        self.write_collections(pass, Which::Unsettled).await?;

        for attempt in 0..RECORD_RETRIES {
            let pending = self
                .store
                .staged_changes(pass, Which::Retry, None, 1)
                .await?;
            if pending.is_empty() {
                break;
            }
            let backoff = Duration::from_millis(200 * 4u64.pow(attempt) + fastrand::u64(0..100));
            tracing::info!(?backoff, "retrying records after transient errors");
            tokio::time::sleep(backoff).await;
            self.write_collections(pass, Which::Retry).await?;
        }
        Ok(())
    }

    /// Writes the staged changes that are `which` through sObject Collections, up to 200 records
    /// (mixed objects) per call, and records each outcome.
    async fn write_collections(&self, pass: PassId, which: Which) -> Result<()> {
        use futures::TryStreamExt as _;
        let mut pages = std::pin::pin!(self.staged_pages(pass, which));
        while let Some(page) = pages.try_next().await? {
            for chunk in page.chunks(COLLECTION_LIMIT) {
                let records: Vec<RecordUpdate> = chunk
                    .iter()
                    .map(|staged| record_update(&staged.change))
                    .collect();
                let results = self.salesforce.update_collection(&records).await?;
                // Results come back in request order, one per record.
                let outcomes: Vec<RecordOutcome> = (0..chunk.len())
                    .map(|position| RecordOutcome::from_save_result(results.get(position)))
                    .collect();
                let settled: Vec<_> = chunk
                    .iter()
                    .zip(&outcomes)
                    .map(|(staged, outcome)| {
                        (
                            staged.change.object,
                            staged.change.id.as_str(),
                            outcome.stored(),
                        )
                    })
                    .collect();
                self.store.settle(pass, &settled).await?;
            }
        }
        Ok(())
    }

    /// One Bulk API 2.0 update job over the `changes` staged changes of `object`. Records it
    /// did not settle are written through collections afterwards.
    async fn write_bulk(&self, pass: PassId, object: SfObject, changes: usize) -> Result<()> {
        let mut csv = plan::bulk_csv_header(object, changes);
        let mut after: Option<String> = None;
        loop {
            let rows = self
                .store
                .bulk_rows(pass, object, after.as_deref(), STAGE_PAGE)
                .await?;
            let Some((last, _)) = rows.last() else {
                break;
            };
            after = Some(last.clone());
            for (id, new) in &rows {
                plan::push_bulk_row(&mut csv, id, *new);
            }
        }
        tracing::info!(%object, records = changes, "writing through a bulk job");
        let result = self
            .salesforce
            .bulk_update(object.sobject(), csv, changes as u64)
            .await?;
        self.counters.add("bulk_jobs", 1);
        // The job's input column, or Salesforce's own when the input one is missing.
        let row_id = |row: &HashMap<String, String>| -> Option<String> {
            ["Id", "sf__Id"]
                .iter()
                .filter_map(|column| row.get(*column))
                .find(|id| !id.is_empty())
                .cloned()
        };
        let failed: Vec<(String, RecordOutcome)> = result
            .failed
            .iter()
            .filter_map(|row| {
                let (status_code, message) =
                    plan::parse_bulk_error(row.get("sf__Error").map(String::as_str).unwrap_or(""));
                Some((
                    row_id(row)?,
                    RecordOutcome::from_error(&status_code, &message),
                ))
            })
            .collect();
        let settled: Vec<_> = failed
            .iter()
            .map(|(id, outcome)| (object, id.as_str(), outcome.stored()))
            .collect();
        self.store.settle(pass, &settled).await?;
        if result.rest_succeeded {
            // Every row was processed: those not listed as failed were written.
            self.store.settle_rest_written(pass, object).await?;
        } else {
            // Records in neither list stay unsettled and are written through collections.
            let written = RecordOutcome::Written;
            let ids: Vec<String> = result.successful.iter().filter_map(row_id).collect();
            let settled: Vec<_> = ids
                .iter()
                .map(|id| (object, id.as_str(), written.stored()))
                .collect();
            self.store.settle(pass, &settled).await?;
        }
        Ok(())
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

    /// Asks again for the emails `pass` wrote: a decision that moved while we wrote (a
    /// concurrent Mailchimp change, or another writer's poll cycle) is republished so it
    /// converges. A group of emails at a time, read back from the pass's rows.
    async fn recheck(&self, pass: PassId) -> Result<()> {
        use futures::TryStreamExt as _;
        let mut moved = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let group = self
                .store
                .written_emails(pass, after.as_deref(), DECIDE_CHUNK * DECIDE_CONCURRENCY)
                .await?;
            let Some((last, _)) = group.last() else {
                break;
            };
            after = Some(last.clone());
            let emails: Vec<String> = group.iter().map(|(email, _)| email.clone()).collect();
            let mut chunks = std::pin::pin!(self.decide_chunks(&emails));
            while let Some(decisions) = chunks.try_next().await? {
                for decision in decisions {
                    let email = plan::normalize_email(&decision.email);
                    let planned = group
                        .binary_search_by(|(written, _)| written.as_str().cmp(&email))
                        .ok()
                        .map(|index| group[index].1);
                    if planned.is_some_and(|version| version != decision.version) {
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

/// What a batch of dirty notifications keeps once staged, while it waits for its pass.
#[derive(Debug, Default)]
pub(crate) struct StagedBatch {
    /// Its staged emails; `None` when it held none.
    pub(crate) batch: Option<PassId>,
    /// Emails staged (an email in two messages counts twice).
    pub(crate) emails: usize,
    /// For each message, in order, a key of each of its emails (see [`email_key`]): enough to
    /// tell which messages hold an email the pass must retry, without keeping the emails.
    pub(crate) keys: Vec<Box<[u64]>>,
}

/// The normalised, non-empty emails of one dirty notification (reusing its strings where they
/// are normalised already, as the evaluator sends them), with the trace id of the message.
pub(crate) fn message_emails(message: Message<PersonsDirty>) -> (Vec<String>, Option<Arc<str>>) {
    let trace_id: Option<Arc<str>> = traceparent(&message.headers)
        .and_then(|value| plan::trace_id_from_traceparent(&value))
        .map(Arc::from);
    let emails = message
        .body
        .emails
        .into_iter()
        .map(|email| {
            let normalized = email.is_ascii()
                && email.trim().len() == email.len()
                && !email.bytes().any(|byte| byte.is_ascii_uppercase());
            if normalized {
                email
            } else {
                plan::normalize_email(&email)
            }
        })
        .filter(|email| !email.is_empty())
        .collect();
    (emails, trace_id)
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

/// A page of staged emails, in order, each with the trace id of the message that carried it.
type EmailPage = Vec<(String, Option<Arc<str>>)>;

/// The trace id of the message that carried `email`, from its page.
fn page_trace(page: &EmailPage, email: &str) -> Option<Arc<str>> {
    let index = page
        .binary_search_by(|(candidate, _)| candidate.as_str().cmp(email))
        .ok()?;
    page[index].1.clone()
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
        let messages = vec![
            message(&["Ann@Example.com", "bob@example.com"]),
            message(&["cy@example.com"]),
            // A flush carries no email.
            message(&[]),
            message(&[" ANN@example.com ", "  "]),
        ];
        let (emails, keys): (Vec<Vec<String>>, Vec<Box<[u64]>>) = messages
            .into_iter()
            .map(|message| {
                let (emails, _) = message_emails(message);
                let keys = emails.iter().map(|email| email_key(email)).collect();
                (emails, keys)
            })
            .unzip();
        assert_eq!(
            emails,
            [
                vec!["ann@example.com", "bob@example.com"],
                vec!["cy@example.com"],
                vec![],
                vec!["ann@example.com"]
            ]
        );
        let retry = Ok(Arc::new(BTreeSet::from(["ann@example.com".to_owned()])));
        let locked = Outcome::Retry("salesforce records stayed locked".to_owned());
        assert_eq!(
            outcomes(&keys, &retry),
            [locked.clone(), Outcome::Ack, Outcome::Ack, locked]
        );
        assert_eq!(
            outcomes(&keys, &Ok(Arc::default())),
            [Outcome::Ack, Outcome::Ack, Outcome::Ack, Outcome::Ack]
        );
        let failed = Outcome::Retry("evaluator down".to_owned());
        assert_eq!(
            outcomes(&keys, &Err("evaluator down".to_owned())),
            [failed.clone(), failed.clone(), failed.clone(), failed]
        );
    }

    #[test]
    fn a_message_keeps_its_normalised_emails_and_its_trace() {
        let mut traced = message(&["x@example.com", "MiXeD@Example.COM", "ünï@exämple.com"]);
        traced.headers.insert(
            "traceparent".into(),
            lapin::types::AMQPValue::LongString(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            ),
        );
        let (emails, trace_id) = message_emails(traced);
        assert_eq!(
            emails,
            ["x@example.com", "mixed@example.com", "ünï@exämple.com"]
        );
        assert_eq!(
            trace_id.as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(message_emails(message(&["ÜNÏ@x.com"])).0, ["ünï@x.com"]);
    }

    #[test]
    fn every_record_outcome_reads_back_as_it_was_stored() {
        let change = plan::Change {
            object: SfObject::Lead,
            id: "00Q000000000001AAA".to_owned(),
            email: Arc::from("ann@example.com"),
            old: false,
            new: true,
            reason: Arc::from("rule"),
            version: 1,
            opted_out_at: None,
            trace_id: None,
        };
        for outcome in [
            RecordOutcome::Written,
            RecordOutcome::ConvertedLead,
            RecordOutcome::Retryable("UNABLE_TO_LOCK_ROW: busy".into()),
            RecordOutcome::from_error("FIELD_INTEGRITY_EXCEPTION", "bad value"),
        ] {
            let stored = outcome.stored();
            let staged = StagedChange {
                change: change.clone(),
                outcome: stored.outcome.map(str::to_owned),
                status_code: stored.status_code.map(str::to_owned),
                message: stored.message.map(str::to_owned),
            };
            assert_eq!(RecordOutcome::of_staged(&staged), outcome);
        }
        // A change no write settled is retried, never taken as written.
        let unsettled = StagedChange {
            change,
            outcome: None,
            status_code: None,
            message: None,
        };
        assert_eq!(
            RecordOutcome::of_staged(&unsettled),
            RecordOutcome::Retryable("not processed".into())
        );
    }
}

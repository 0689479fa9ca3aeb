//! Handling `members.changed` batches: apply to the store, then announce dirty persons; the
//! fetcher's first-sync markers, which say when the opt-outs held from a first sync may go; and
//! the ends of its runs, after which the writer is told to write what the run changed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use optout_amqp::{
    Message, Outcome, Publisher, Topology,
    lapin::types::{AMQPValue, FieldTable},
};
use optout_proto::queue::v1::{
    FirstSyncMarker, MemberStatus as ProtoStatus, MembersChanged, PersonsDirty, Source,
    SyncRunDone, first_sync_marker,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use prost::{Message as _, Name as _};
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::{Instrument as _, debug, info_span, warn};

use crate::{
    Result,
    rule::{Decision, MemberStatus, Scope},
    store::{self, FirstSyncPage, Marker, MarkerKind, PersonState, RunPage, Snapshot},
};

/// The proto full name of `PersonsDirty`, for the AMQP `type` property.
const PERSONS_DIRTY_TYPE: &str = "optout.queue.v1.PersonsDirty";
/// Emails per `PersonsDirty` message, keeping messages small.
const DIRTY_CHUNK: usize = 500;
/// Held first-sync opt-outs released per transaction (~100 bytes each in memory). The writer
/// still takes a whole release as one batch: the flush comes only after its last chunk.
const RELEASE_CHUNK: usize = 10_000;

/// Cumulative counters reported by `GetStatus`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    messages_processed: AtomicI64,
    decisions_opt_out: AtomicI64,
    decisions_opt_in: AtomicI64,
    decisions_no_change: AtomicI64,
    dirty_published: AtomicI64,
    messages_dead_lettered: AtomicI64,
    first_sync_markers: AtomicI64,
    /// `SyncRunDone`s recorded, redeliveries included.
    sync_run_ends: AtomicI64,
    /// Runs whose flush went to every `persons.dirty` partition.
    sync_runs_flushed: AtomicI64,
    /// First-sync audiences announced or started and not yet completely read, as of the last
    /// release check (a gauge).
    pub(crate) first_sync_audiences_pending: AtomicI64,
    /// The same decisions as a Prometheus family, `optout_decisions_total{decision}`.
    pub(crate) decisions: Family<DecisionLabels, Counter>,
}

/// The decision label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DecisionLabels {
    decision: &'static str,
}

impl Counters {
    /// Name and value of every counter.
    pub(crate) fn snapshot(&self) -> HashMap<String, i64> {
        [
            ("messages_processed", &self.messages_processed),
            ("decisions_opt_out", &self.decisions_opt_out),
            ("decisions_opt_in", &self.decisions_opt_in),
            ("decisions_no_change", &self.decisions_no_change),
            ("dirty_published", &self.dirty_published),
            ("messages_dead_lettered", &self.messages_dead_lettered),
            ("first_sync_markers", &self.first_sync_markers),
            ("sync_run_ends", &self.sync_run_ends),
            ("sync_runs_flushed", &self.sync_runs_flushed),
            (
                "first_sync_audiences_pending",
                &self.first_sync_audiences_pending,
            ),
        ]
        .into_iter()
        .map(|(name, counter)| (name.to_owned(), counter.load(Ordering::Relaxed)))
        .collect()
    }
}

/// A delivery on `members.changed`, told apart by its AMQP `type`: a page or event, one of the
/// fetcher's first-sync markers, or the end of a run. A delivery without a `type` (or another
/// one) is read as `MembersChanged`, as before markers existed.
#[derive(Clone, Debug)]
pub(crate) enum Inbound {
    /// A page of a sync, or one webhook or API event.
    Members(MembersChanged),
    /// How far a first sync has got.
    Marker(FirstSyncMarker),
    /// A sync run published all its pages.
    RunDone(SyncRunDone),
}

impl optout_amqp::Body for Inbound {
    fn decode_body(message_type: &str, data: &[u8]) -> std::result::Result<Self, String> {
        if message_type == FirstSyncMarker::full_name() {
            return FirstSyncMarker::decode(data)
                .map(Self::Marker)
                .map_err(|error| format!("undecodable protobuf: {error}"));
        }
        if message_type == SyncRunDone::full_name() {
            return SyncRunDone::decode(data)
                .map(Self::RunDone)
                .map_err(|error| format!("undecodable protobuf: {error}"));
        }
        MembersChanged::decode(data)
            .map(Self::Members)
            .map_err(|error| format!("undecodable protobuf: {error}"))
    }
}

/// Applies batches of `members.changed` messages.
#[derive(Debug)]
pub(crate) struct Evaluator {
    pub(crate) pool: PgPool,
    pub(crate) publisher: Publisher,
    pub(crate) topology: Topology,
    pub(crate) scope: Scope,
    pub(crate) counters: Arc<Counters>,
    /// Wakes the release loop once a first-sync page or marker was applied, so a first sync that
    /// just completed releases its opt-outs at once rather than at the next tick.
    pub(crate) first_sync_progress: Arc<Notify>,
}

impl Evaluator {
    /// One outcome per message, in order.
    pub(crate) async fn handle(&self, batch: Vec<Message<Inbound>>) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Ack; batch.len()];
        let mut valid = Vec::with_capacity(batch.len());
        let mut markers = Vec::new();
        let mut run_pages = Vec::new();
        let mut run_ends = Vec::new();
        for (index, message) in batch.iter().enumerate() {
            let checked = match &message.body {
                Inbound::Members(members) => snapshots_of(members).map(|snapshots| {
                    let run_page = run_page(members);
                    valid.push(Valid {
                        index,
                        snapshots,
                        first_sync_page: first_sync_page(members),
                        run_page: run_page.is_some(),
                    });
                    run_pages.extend(run_page.map(|page| (index, page)));
                }),
                Inbound::Marker(marker) => marker_of(marker).map(|marker| {
                    markers.push((index, marker));
                }),
                Inbound::RunDone(done) => run_end_of(done).map(|end| {
                    run_ends.push((index, end));
                }),
            };
            if let Err(reason) = checked {
                warn!(
                    message_id = message.message_id,
                    reason, "rejecting members.changed message"
                );
                self.counters
                    .messages_dead_lettered
                    .fetch_add(1, Ordering::Relaxed);
                outcomes[index] = Outcome::DeadLetter(reason);
            }
        }
        let first_sync_progress =
            !markers.is_empty() || valid.iter().any(|valid| valid.first_sync_page.is_some());
        if !markers.is_empty() {
            let kinds: Vec<Marker> = markers.iter().map(|(_, marker)| marker.clone()).collect();
            match store::record_first_sync_markers(&self.pool, &kinds).await {
                Ok(()) => {
                    self.counters
                        .first_sync_markers
                        .fetch_add(markers.len() as i64, Ordering::Relaxed);
                    debug!(markers = markers.len(), "recorded first-sync markers");
                }
                Err(error) => {
                    let reason = error_chain(&error);
                    warn!(
                        error = reason,
                        "failed to record first-sync markers, requeueing them"
                    );
                    for (index, _) in &markers {
                        outcomes[*index] = Outcome::Retry(reason.clone());
                    }
                }
            }
        }
        if !valid.is_empty() {
            self.handle_members(&valid, &mut outcomes).await;
        }
        if first_sync_progress {
            self.first_sync_progress.notify_one();
        }
        if !run_pages.is_empty() || !run_ends.is_empty() {
            self.count_runs(&run_pages, &run_ends, &mut outcomes).await;
        }
        outcomes
    }

    /// Counts the pages applied (their `persons.dirty` already published) and the run ends of a
    /// batch, then flushes the runs they complete. A page that failed to count only costs its
    /// run the flush (the writer's batch window closes the batch instead), so it is not retried;
    /// a run end that failed to record is.
    async fn count_runs(
        &self,
        run_pages: &[(usize, RunPage)],
        run_ends: &[(usize, (String, i32))],
        outcomes: &mut [Outcome],
    ) {
        let applied: Vec<RunPage> = run_pages
            .iter()
            .filter(|(index, _)| outcomes[*index] == Outcome::Ack)
            .map(|(_, page)| page.clone())
            .collect();
        if let Err(error) = store::record_run_pages(&self.pool, &applied).await {
            warn!(error = %error_chain(&error), "failed to count the pages of sync runs");
        }
        let ends: Vec<(String, i32)> = run_ends.iter().map(|(_, end)| end.clone()).collect();
        match store::record_run_ends(&self.pool, &ends).await {
            Ok(()) => {
                self.counters
                    .sync_run_ends
                    .fetch_add(ends.len() as i64, Ordering::Relaxed);
            }
            Err(error) => {
                let reason = error_chain(&error);
                warn!(
                    error = reason,
                    "failed to record the ends of sync runs, requeueing them"
                );
                for (index, _) in run_ends {
                    outcomes[*index] = Outcome::Retry(reason.clone());
                }
            }
        }
        let runs: BTreeSet<String> = applied
            .into_iter()
            .map(|page| page.run_id)
            .chain(ends.into_iter().map(|(run_id, _)| run_id))
            .collect();
        let runs: Vec<String> = runs.into_iter().collect();
        if let Err(error) = self.flush_runs(&runs).await {
            // Left unflushed: the writer's batch window closes the batch instead.
            warn!(error = %error_chain(&error), "failed to flush completed sync runs");
        }
    }

    /// Sends every `persons.dirty` partition a flush for those of `run_ids` now complete (their
    /// end recorded and every page counted), once per run.
    async fn flush_runs(&self, run_ids: &[String]) -> Result<()> {
        let mut transaction = self.pool.begin().await?;
        let complete = store::take_complete_runs(&mut transaction, run_ids).await?;
        if complete.is_empty() {
            return Ok(());
        }
        self.publish_flush("sync run done").await?;
        transaction.commit().await?;
        self.counters
            .sync_runs_flushed
            .fetch_add(complete.len() as i64, Ordering::Relaxed);
        debug!(runs = ?complete, "flushed completed sync runs");
        Ok(())
    }

    /// An empty `persons.dirty` with the flush header on every partition, after the messages it
    /// closes: each partition's writer batch closes on it rather than when its window runs out.
    async fn publish_flush(&self, reason: &str) -> Result<()> {
        for partition in 0..self.topology.persons_partitions() {
            let message = PersonsDirty {
                emails: Vec::new(),
                reason: reason.to_owned(),
            };
            self.publisher
                .publish_typed(
                    &self.topology.persons_dirty_routing_key(partition),
                    PERSONS_DIRTY_TYPE,
                    &message,
                    optout_amqp::flush_headers(),
                )
                .await?;
        }
        Ok(())
    }

    /// Applies the valid `MembersChanged` of a batch in one transaction, or one by one when that fails
    /// for good, setting their outcomes.
    async fn handle_members(&self, valid: &[Valid], outcomes: &mut [Outcome]) {
        let all: Vec<Snapshot> = valid
            .iter()
            .flat_map(|valid| valid.snapshots.iter().cloned())
            .collect();
        let pages: Vec<FirstSyncPage> = valid
            .iter()
            .filter_map(|valid| valid.first_sync_page.clone())
            .collect();
        let stream = valid.iter().all(|valid| valid.run_page);
        match self.apply(&all, &pages, stream).await {
            Ok(()) => {
                self.counters
                    .messages_processed
                    .fetch_add(valid.len() as i64, Ordering::Relaxed);
            }
            Err(error) if valid.len() > 1 && !error.is_transient() => {
                // One message may be at fault: apply them one by one so only that one is retried.
                warn!(error = %error_chain(&error), "batch failed, applying its messages one by one");
                for valid in valid {
                    let pages: Vec<FirstSyncPage> = valid.first_sync_page.iter().cloned().collect();
                    outcomes[valid.index] =
                        match self.apply(&valid.snapshots, &pages, valid.run_page).await {
                            Ok(()) => {
                                self.counters
                                    .messages_processed
                                    .fetch_add(1, Ordering::Relaxed);
                                Outcome::Ack
                            }
                            Err(error) => Outcome::Retry(error_chain(&error)),
                        };
                }
            }
            Err(error) => {
                let reason = error_chain(&error);
                warn!(error = reason, "batch failed, requeueing it");
                for valid in valid {
                    outcomes[valid.index] = Outcome::Retry(reason.clone());
                }
            }
        }
    }

    /// Commits the snapshots, then publishes `persons.dirty` for every email they touch that is opted out or
    /// carries opt-in evidence. Level-triggered: a redelivery after a crash between commit and publish finds
    /// the same state and publishes again.
    ///
    /// Opt-outs decided from a first sync (poll pages of an audience not yet fully read) are held
    /// instead: audiences are paged independently, so the person's subscribed member in another
    /// audience may not have arrived yet, and checking the box now would invent an opt-out that no
    /// later sync could take back (a first sync is a baseline, never opt-in evidence).
    /// [`Evaluator::release_held`] publishes them once every first-syncing audience has been read.
    /// They are held, and the first-sync `pages` counted, in the transaction that commits the
    /// state.
    ///
    /// `stream`: the snapshots all come from pages of sync runs, whose end the writer will be told
    /// of (see [`Evaluator::flush_runs`]), so its batch may wait for that.
    async fn apply(
        &self,
        snapshots: &[Snapshot],
        pages: &[FirstSyncPage],
        stream: bool,
    ) -> Result<()> {
        let traceparent = current_traceparent();
        let hold = store::FirstSyncHold {
            first_sync: snapshots
                .iter()
                .filter(|snapshot| snapshot.first_sync && snapshot.learned_from == "poll")
                .map(|snapshot| snapshot.email.as_str())
                .collect(),
            pages,
            traceparent: traceparent.as_deref(),
        };
        let store::AppliedBatch { states, held } =
            store::apply_batch(&self.pool, &self.scope, snapshots, &hold).await?;
        let held: HashSet<String> = held.into_iter().collect();
        for state in &states {
            let (counter, decision) = match state.decision {
                Decision::OptOut => (&self.counters.decisions_opt_out, "opt_out"),
                Decision::OptIn => (&self.counters.decisions_opt_in, "opt_in"),
                Decision::NoChange => (&self.counters.decisions_no_change, "no_change"),
            };
            counter.fetch_add(1, Ordering::Relaxed);
            self.counters
                .decisions
                .get_or_create(&DecisionLabels { decision })
                .inc();
        }
        let published: Vec<PersonState> = states
            .into_iter()
            .filter(|state| !held.contains(&state.email))
            .collect();
        // A webhook or a Memberships API call is someone waiting; a poll page is part of a sync,
        // which the writer batches for economy.
        let kind = if snapshots
            .iter()
            .any(|snapshot| snapshot.learned_from != "poll")
        {
            DirtyKind::Urgent
        } else if stream {
            DirtyKind::Stream
        } else {
            DirtyKind::Plain
        };
        self.publish_dirty(&published, kind).await
    }

    async fn publish_dirty(&self, states: &[PersonState], kind: DirtyKind) -> Result<()> {
        let emails: Vec<String> = states
            .iter()
            .filter(|state| state.decision == Decision::OptOut || state.has_evidence)
            .map(|state| state.email.clone())
            .collect();
        self.publish_emails(&emails, kind).await
    }

    /// Publishes the held first-sync opt-outs once no first-syncing audience is pending: every
    /// audience the fetcher announced or started has sent its `Done` marker and every page it
    /// counted there has been applied, so every audience's members are known. Those held longer
    /// than `max_hold` go whatever the first sync is doing. Those no longer opted out are dropped
    /// without a message. Rows are deleted in the transaction that publishes them, committed after
    /// the broker confirmed, so a crash in between leaves them held. Returns how many rows went.
    pub(crate) async fn release_held(&self, max_hold: Duration) -> Result<usize> {
        let pending = store::settle_first_sync_audiences(&self.pool, max_hold).await?;
        self.counters
            .first_sync_audiences_pending
            .store(pending, Ordering::Relaxed);
        let mut released = 0;
        let mut published = 0;
        loop {
            let (taken, sent) = self.release_chunk(max_hold).await?;
            released += taken;
            published += sent;
            if taken < RELEASE_CHUNK {
                break;
            }
        }
        if published > 0 {
            // The release is one burst, now complete: the writer may write it as soon as it is in.
            self.publish_flush("first-sync opt-outs released").await?;
        }
        Ok(released)
    }

    /// Takes up to `RELEASE_CHUNK` releasable opt-outs, publishes those still opted out and
    /// deletes them in one transaction; returns how many were taken and how many published.
    async fn release_chunk(&self, max_hold: Duration) -> Result<(usize, usize)> {
        let mut transaction = self.pool.begin().await?;
        let released = store::take_releasable(&mut transaction, max_hold, RELEASE_CHUNK).await?;
        if released.is_empty() {
            return Ok((0, 0));
        }
        // Each group continues the trace of the sync that held it, so an opt-out's trace still
        // runs from the Mailchimp read to the Salesforce write.
        let mut by_trace: BTreeMap<String, (Option<String>, Vec<String>)> = BTreeMap::new();
        for (email, opted_out, traceparent) in &released {
            if !*opted_out {
                continue;
            }
            let trace_id = traceparent
                .as_deref()
                .and_then(|value| value.split('-').nth(1))
                .unwrap_or_default()
                .to_owned();
            let group = by_trace
                .entry(trace_id)
                .or_insert_with(|| (traceparent.clone(), Vec::new()));
            group.1.push(email.clone());
        }
        let mut published = 0;
        for (traceparent, emails) in by_trace.into_values() {
            let span = info_span!("release first-sync opt-outs", emails = emails.len());
            if let Some(traceparent) = traceparent {
                let mut headers = FieldTable::default();
                headers.insert(
                    "traceparent".into(),
                    AMQPValue::LongString(traceparent.into()),
                );
                optout_telemetry::set_remote_parent(&span, optout_amqp::observe::extract(&headers));
            }
            // A release ends with a flush: the writer's batch may wait for it.
            self.publish_emails(&emails, DirtyKind::Stream)
                .instrument(span)
                .await?;
            published += emails.len();
        }
        transaction.commit().await?;
        debug!(
            released = released.len(),
            published, "released held first-sync opt-outs"
        );
        Ok((released.len(), published))
    }

    /// `persons.dirty` for `emails`, each to its partition, in chunks, with the headers of `kind`.
    async fn publish_emails(&self, emails: &[String], kind: DirtyKind) -> Result<()> {
        let mut partitions: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for email in emails {
            partitions
                .entry(self.topology.partition_for(email))
                .or_default()
                .push(email.clone());
        }
        for (partition, emails) in partitions {
            let routing_key = self.topology.persons_dirty_routing_key(partition);
            for chunk in emails.chunks(DIRTY_CHUNK) {
                let message = PersonsDirty {
                    emails: chunk.to_vec(),
                    reason: "members.changed".to_owned(),
                };
                let headers = match kind {
                    DirtyKind::Urgent => optout_amqp::urgent_headers(),
                    DirtyKind::Stream => optout_amqp::stream_headers(),
                    DirtyKind::Plain => FieldTable::default(),
                };
                self.publisher
                    .publish_typed(&routing_key, PERSONS_DIRTY_TYPE, &message, headers)
                    .await?;
                self.counters
                    .dirty_published
                    .fetch_add(chunk.len() as i64, Ordering::Relaxed);
                debug!(partition, emails = chunk.len(), "published persons.dirty");
            }
        }
        Ok(())
    }
}

/// A valid `MembersChanged` of a batch.
#[derive(Debug)]
struct Valid {
    /// Its position in the batch.
    index: usize,
    snapshots: Vec<Snapshot>,
    /// The first-sync page it counts as, if any.
    first_sync_page: Option<FirstSyncPage>,
    /// Whether it is a page of a sync run, counted towards the run's end.
    run_page: bool,
}

/// How the writer is asked to batch a `persons.dirty` message.
#[derive(Clone, Copy, Debug)]
enum DirtyKind {
    /// Someone waits (a webhook or a Memberships API call): the short window.
    Urgent,
    /// Part of a sync run or a release, which a flush will close.
    Stream,
    /// Neither: the writer's idle window closes its batch.
    Plain,
}

/// The W3C traceparent of the current span, to continue its trace later.
fn current_traceparent() -> Option<String> {
    let mut headers = FieldTable::default();
    optout_amqp::observe::inject(&mut headers);
    match headers.inner().get("traceparent")? {
        AMQPValue::LongString(value) => {
            Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
        }
        _ => None,
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The page a first-sync poll message counts as, if it is one and carries its number.
fn first_sync_page(message: &MembersChanged) -> Option<FirstSyncPage> {
    let counted = message.first_sync
        && message.source == Source::Poll as i32
        && message.page > 0
        && !message.run_id.is_empty();
    counted.then(|| FirstSyncPage {
        audience_id: message.audience_id.trim().to_owned(),
        run_id: message.run_id.clone(),
        page: i32::try_from(message.page).unwrap_or(i32::MAX),
    })
}

/// The run page a poll message counts as, if it carries its run and number.
fn run_page(message: &MembersChanged) -> Option<RunPage> {
    let counted =
        message.source == Source::Poll as i32 && message.page > 0 && !message.run_id.is_empty();
    counted.then(|| RunPage {
        run_id: message.run_id.clone(),
        audience_id: message.audience_id.trim().to_owned(),
        page: i32::try_from(message.page).unwrap_or(i32::MAX),
    })
}

/// Validates the end of a run (run id, pages); the error is the dead-letter reason.
fn run_end_of(done: &SyncRunDone) -> Result<(String, i32), String> {
    if done.run_id.is_empty() {
        return Err("SyncRunDone without run_id".to_owned());
    }
    let pages =
        i32::try_from(done.pages).map_err(|_| format!("SyncRunDone with {} pages", done.pages))?;
    Ok((done.run_id.clone(), pages))
}

/// Validates a first-sync marker; the error is the dead-letter reason.
fn marker_of(marker: &FirstSyncMarker) -> Result<Marker, String> {
    if marker.run_id.is_empty() {
        return Err("first-sync marker without run_id".to_owned());
    }
    let audience = |audience_id: &str| {
        let audience_id = audience_id.trim();
        if audience_id.is_empty() {
            Err("first-sync marker without audience_id".to_owned())
        } else {
            Ok(audience_id.to_owned())
        }
    };
    let kind = match &marker.marker {
        Some(first_sync_marker::Marker::Announced(announced)) => MarkerKind::Announced(
            announced
                .audience_ids
                .iter()
                .map(|audience_id| audience(audience_id))
                .collect::<Result<_, _>>()?,
        ),
        Some(first_sync_marker::Marker::Started(started)) => {
            MarkerKind::Started(audience(&started.audience_id)?)
        }
        Some(first_sync_marker::Marker::Done(done)) => MarkerKind::Done(
            audience(&done.audience_id)?,
            i32::try_from(done.pages)
                .map_err(|_| format!("first-sync marker with {} pages", done.pages))?,
        ),
        None => return Err("first-sync marker of no known kind".to_owned()),
    };
    let run_started_at = marker.run_started_at.as_ref().and_then(|time| {
        DateTime::<Utc>::from_timestamp(time.seconds, u32::try_from(time.nanos).unwrap_or(0))
    });
    Ok(Marker {
        run_id: marker.run_id.clone(),
        run_started_at,
        kind,
    })
}

/// Validates a message and turns it into normalised snapshots; the error is the dead-letter reason.
/// Total over any decoded message (fuzzed in `crates/fuzz-targets`).
pub fn snapshots_of(message: &MembersChanged) -> Result<Vec<Snapshot>, String> {
    let audience_id = message.audience_id.trim();
    if audience_id.is_empty() {
        return Err("members.changed without audience_id".to_owned());
    }
    let learned_from = match Source::try_from(message.source) {
        Ok(Source::Poll) => "poll",
        Ok(Source::Webhook) => "webhook",
        Ok(Source::Api) => "api",
        Ok(Source::Unspecified) | Err(_) => "unknown",
    };
    message
        .members
        .iter()
        .map(|member| {
            let email = store::normalize_email(&member.email);
            if email.is_empty() {
                return Err("member snapshot without email".to_owned());
            }
            let status = match ProtoStatus::try_from(member.status) {
                Ok(ProtoStatus::Subscribed) => MemberStatus::Subscribed,
                Ok(ProtoStatus::Unsubscribed) => MemberStatus::Unsubscribed,
                Ok(ProtoStatus::Cleaned) => MemberStatus::Cleaned,
                Ok(ProtoStatus::Pending) => MemberStatus::Pending,
                Ok(ProtoStatus::Transactional) => MemberStatus::Transactional,
                Ok(ProtoStatus::Archived) => MemberStatus::Archived,
                Ok(ProtoStatus::Deleted) => MemberStatus::Deleted,
                Ok(ProtoStatus::Unspecified) | Err(_) => {
                    return Err(format!(
                        "member snapshot of {email} without a known status ({})",
                        member.status
                    ));
                }
            };
            // A snapshot without last_changed sorts before every stored one: it can create a member, never
            // overwrite a known state.
            let last_changed = member
                .last_changed
                .as_ref()
                .and_then(|time| {
                    DateTime::<Utc>::from_timestamp(
                        time.seconds,
                        u32::try_from(time.nanos).unwrap_or(0),
                    )
                })
                .unwrap_or(DateTime::UNIX_EPOCH);
            Ok(Snapshot {
                email,
                audience_id: audience_id.to_owned(),
                status,
                last_changed,
                learned_from,
                first_sync: message.first_sync,
            }
            .with_stored_precision())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use optout_proto::queue::v1::MemberSnapshot;

    use super::*;

    fn message(members: Vec<MemberSnapshot>) -> MembersChanged {
        MembersChanged {
            audience_id: "aud1".to_owned(),
            source: Source::Webhook as i32,
            members,
            first_sync: false,
            run_id: String::new(),
            page: 0,
        }
    }

    fn snapshot(email: &str, status: ProtoStatus) -> MemberSnapshot {
        MemberSnapshot {
            email: email.to_owned(),
            status: status as i32,
            last_changed: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789,
            }),
        }
    }

    #[test]
    fn normalises_emails_and_truncates_times_to_microseconds() {
        let snapshots = snapshots_of(&message(vec![snapshot(
            "  Jane@Example.COM ",
            ProtoStatus::Unsubscribed,
        )]))
        .expect("valid");
        assert_eq!(snapshots[0].email, "jane@example.com");
        assert_eq!(snapshots[0].status, MemberStatus::Unsubscribed);
        assert_eq!(snapshots[0].learned_from, "webhook");
        assert_eq!(
            snapshots[0].last_changed.timestamp_subsec_nanos(),
            123_456_000
        );
    }

    #[test]
    fn rejects_snapshot_without_status() {
        let result = snapshots_of(&message(vec![snapshot(
            "a@x.com",
            ProtoStatus::Unspecified,
        )]));
        assert!(result.is_err());
    }

    #[test]
    fn rejects_message_without_audience() {
        let mut without_audience = message(vec![]);
        without_audience.audience_id = " ".to_owned();
        assert!(snapshots_of(&without_audience).is_err());
    }

    #[test]
    fn rejects_snapshot_without_email() {
        assert!(snapshots_of(&message(vec![snapshot("  ", ProtoStatus::Subscribed)])).is_err());
    }

    #[test]
    fn counters_report_the_names_other_crates_rely_on() {
        let names = Counters::default().snapshot();
        for name in [
            "messages_processed",
            "decisions_opt_out",
            "decisions_opt_in",
            "decisions_no_change",
            "dirty_published",
        ] {
            assert!(names.contains_key(name), "{name}");
        }
    }
}

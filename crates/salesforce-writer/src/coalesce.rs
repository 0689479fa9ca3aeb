//! One write pass for the dirty batches of every partition this process consumes.
//!
//! Each `persons.dirty` partition has its own consumer (a single-active-consumer queue keeps an
//! email on one writer), so a burst of opt-outs, such as the release of a first sync, reaches a
//! writer as one batch per partition at about the same moment. Written apart, each batch pays its
//! own partly filled SOQL read per object and its own Bulk API job or partly filled collection
//! call: with four partitions, up to four times those calls against the Salesforce daily budget.
//! The coalescer gathers the batches handed in within a short gap, runs one write pass over their
//! union and answers each batch with its own outcome. A partition's consumer waits for its answer
//! before it takes more deliveries, so an email (always in one partition) is in at most one pass
//! at a time and its notifications are still handled in order.
//!
//! A batch stages its emails in PostgreSQL as its messages arrive (`Writer::stage_message`), and
//! the pass merges its batches' rows into its own: while they wait, the batches hold only their
//! messages' email keys, not the emails.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use optout_amqp::{Incoming, Outcome};
use optout_proto::queue::v1::PersonsDirty;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::error_chain;
use crate::stage::PassId;
use crate::writer::{self, Writer};

/// How long a pass waits for a straggling batch after the last one came in, when no consumer
/// of this process holds deliveries it has not handed in. Keeps a pass from starting between
/// two batches of one burst; adds at most this much to a lone webhook's latency.
const GATHER_GAP: Duration = Duration::from_millis(20);

/// How often a pass that waits for a consumer's batch (deliveries taken, not yet handed in)
/// looks again.
const GATHER_STEP: Duration = Duration::from_millis(5);

/// Emails above which a pass starts without waiting for more batches. A pass's memory does not
/// depend on its size (its emails and changes are staged in PostgreSQL), but its Bulk jobs and
/// the time until its batches are answered do.
const PASS_EMAILS: usize = 40_000;

/// How long a pass may wait for batches still forming.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Waits {
    /// Once the pass holds an urgent batch.
    pub(crate) urgent: Duration,
    /// Otherwise: the longest a consumer fills a batch.
    pub(crate) longest: Duration,
}

/// What a batch's consumer gets back: the emails to redeliver, or why the pass failed.
type Answer = Result<Arc<BTreeSet<String>>, String>;

/// One partition batch waiting for a pass.
struct Submission {
    /// Deliveries in the batch.
    messages: u64,
    /// Whether one of them asked to be handled promptly (`URGENT_HEADER`) or ended its stream
    /// (`FLUSH_HEADER`).
    urgent: bool,
    /// The batch's emails, staged under an id of their own (see [`Writer::stage_message`]).
    batch: PassId,
    /// Emails the batch staged (one in two of its messages counts twice).
    emails: usize,
    /// The consumer's `process` span, which the pass continues.
    span: tracing::Span,
    reply: oneshot::Sender<Answer>,
}

/// Hands partition batches to the pass task; cheap to clone, one per consumer.
#[derive(Clone, Debug)]
pub(crate) struct Coalescer {
    writer: Arc<Writer>,
    submissions: mpsc::Sender<Submission>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("batch", &self.batch)
            .field("emails", &self.emails)
            .finish_non_exhaustive()
    }
}

impl Coalescer {
    /// Starts the pass task on `tasks`; it ends once every clone of the returned handle is gone,
    /// after answering what it was handed.
    ///
    /// `in_flight` counts the deliveries the consumers of this process hold (taken and not yet
    /// settled). A pass waits for the batches still forming, so a burst spread over every
    /// partition becomes one pass rather than one per partition: at most `longest_wait` (the
    /// longest a consumer fills a batch), or `urgent_wait` once it holds an urgent batch, so a
    /// webhook never waits for a sync's batch to fill.
    pub(crate) fn spawn(
        writer: Arc<Writer>,
        in_flight: Arc<AtomicU64>,
        waits: Waits,
        tasks: &TaskTracker,
    ) -> Self {
        // One slot per partition is plenty: each consumer has at most one batch waiting.
        let (submissions, receiver) = mpsc::channel(64);
        tasks.spawn(run(Arc::clone(&writer), receiver, in_flight, waits));
        Self {
            writer,
            submissions,
        }
    }

    /// Writes the emails of one partition's batch, together with whatever the other partitions
    /// hand in meanwhile, and says what to do with each message.
    ///
    /// Each message is staged as the consumer takes it, while the batch fills, and dropped: the
    /// batch holds its messages' email keys, never their emails, and the consumer holds a
    /// delivery or two rather than the batch, however large a burst is.
    pub(crate) async fn handle_batch(&self, mut incoming: Incoming<PersonsDirty>) -> Vec<Outcome> {
        let mut urgent = false;
        let mut staged = writer::StagedBatch::default();
        let mut failure = None;
        while let Some(message) = incoming.next().await {
            // A flush ends a sync's stream: the other partitions' batches of it close on their
            // own flushes now, so the pass need not wait out their windows.
            urgent |=
                optout_amqp::is_urgent(&message.headers) || optout_amqp::is_flush(&message.headers);
            if failure.is_some() {
                // Counted, not staged: the whole batch is redelivered.
                staged.keys.push(Box::default());
            } else if let Err(error) = self.writer.stage_message(&mut staged, message).await {
                failure = Some(error_chain(&error));
            }
        }
        let count = staged.keys.len() as u64;
        if let Some(reason) = failure {
            tracing::warn!(error = %reason, "could not stage a batch, its messages will be redelivered");
            if let Some(batch) = staged.batch {
                self.writer.end_passes(&[batch]).await;
            }
            return vec![Outcome::Retry(reason); staged.keys.len()];
        }
        let writer::StagedBatch {
            batch,
            emails,
            keys,
        } = staged;
        let Some(batch) = batch else {
            // Only flushes (or empty notifications): nothing to write, no pass to wait for.
            return writer::outcomes(&keys, &Ok(Arc::default()));
        };
        let (reply, answer) = oneshot::channel();
        let submission = Submission {
            messages: count,
            urgent,
            batch,
            emails,
            span: tracing::Span::current(),
            reply,
        };
        let answer = match self.submissions.send(submission).await {
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| Err("the write pass ended without an answer".to_owned())),
            Err(_) => {
                self.writer.end_passes(&[batch]).await;
                Err("the writer is shutting down".to_owned())
            }
        };
        writer::outcomes(&keys, &answer)
    }
}

async fn run(
    writer: Arc<Writer>,
    mut receiver: mpsc::Receiver<Submission>,
    in_flight: Arc<AtomicU64>,
    waits: Waits,
) {
    while let Some(first) = receiver.recv().await {
        let now = Instant::now();
        let urgent_deadline = now + waits.urgent + GATHER_GAP;
        let mut deadline = if first.urgent {
            urgent_deadline
        } else {
            now + waits.longest + GATHER_GAP
        };
        let mut pass = Gathered::begin(&writer, &first.span).await;
        pass.add(first);
        while pass.emails < PASS_EMAILS {
            // Deliveries held beyond those handed in belong to batches still forming.
            let forming =
                in_flight.load(Ordering::SeqCst) > pass.messages && Instant::now() < deadline;
            let wait = if forming { GATHER_STEP } else { GATHER_GAP };
            match tokio::time::timeout(wait, receiver.recv()).await {
                Ok(Some(submission)) => {
                    if submission.urgent {
                        deadline = deadline.min(Instant::now() + waits.urgent + GATHER_GAP);
                    }
                    pass.add(submission);
                }
                Ok(None) => break,
                Err(_) if forming => {}
                Err(_) => break,
            }
        }
        pass.write(&writer).await;
    }
}

/// A pass being gathered: its batches' emails are staged already, so it holds only their ids
/// and whom to answer.
struct Gathered {
    /// The pass's staged rows, if it could begin one.
    pass: Option<PassId>,
    /// Why the pass cannot be written (its batches are redelivered).
    failure: Option<String>,
    /// The batches' staged emails, merged into the pass's when it starts.
    batches: Vec<PassId>,
    /// Emails handed in (an email in two batches counts twice).
    emails: usize,
    /// Deliveries handed in.
    messages: u64,
    replies: Vec<oneshot::Sender<Answer>>,
    span: tracing::Span,
}

impl Gathered {
    /// Begins a pass. It is a child of the first batch's `process` span, so a trace still runs
    /// unbroken from the Mailchimp change to the Salesforce write; the other batches' spans are
    /// linked.
    async fn begin(writer: &Writer, first: &tracing::Span) -> Self {
        let span =
            tracing::info_span!(parent: first, "write_pass", batches = tracing::field::Empty);
        let (pass, failure) = match writer.store.begin_pass().instrument(span.clone()).await {
            Ok(pass) => (Some(pass), None),
            Err(error) => (None, Some(error_chain(&error))),
        };
        Self {
            pass,
            failure,
            batches: Vec::new(),
            emails: 0,
            messages: 0,
            replies: Vec::new(),
            span,
        }
    }

    fn add(&mut self, submission: Submission) {
        if !self.replies.is_empty() {
            self.span.follows_from(&submission.span);
        }
        self.emails += submission.emails;
        self.messages += submission.messages;
        self.batches.push(submission.batch);
        self.replies.push(submission.reply);
    }

    /// Writes the pass, removes its rows, and answers every batch.
    async fn write(self, writer: &Writer) {
        let Self {
            pass,
            failure,
            batches,
            emails,
            replies,
            span,
            ..
        } = self;
        span.record("batches", replies.len());
        let started = Instant::now();
        let result = match (pass, failure) {
            (Some(pass), None) => async {
                writer.store.merge_batches(pass, &batches).await?;
                writer.write_dirty(pass).await
            }
            .instrument(span.clone())
            .await
            .map_err(|error| error_chain(&error)),
            (_, failure) => Err(failure.unwrap_or_default()),
        };
        let staged: Vec<PassId> = pass.into_iter().chain(batches).collect();
        writer.end_passes(&staged).instrument(span.clone()).await;
        let _entered = span.enter();
        let answer = match result {
            Ok(report) => {
                tracing::info!(
                    emails,
                    batches = replies.len(),
                    changes = report.changes,
                    written = report.written,
                    elapsed_ms = started.elapsed().as_millis(),
                    "write pass done"
                );
                Ok(Arc::new(report.retry))
            }
            Err(error) => {
                tracing::warn!(%error, emails, batches = replies.len(), "write pass failed, its messages will be redelivered");
                Err(error)
            }
        };
        for reply in replies {
            // A consumer that stopped waiting (shutdown) gets its messages redelivered anyway.
            drop(reply.send(answer.clone()));
        }
        optout_service::runtime::release_free_memory();
    }
}

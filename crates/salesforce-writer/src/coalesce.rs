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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use optout_amqp::{Message, Outcome};
use optout_proto::queue::v1::PersonsDirty;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::error_chain;
use crate::writer::{self, Writer};

/// How long a pass waits for a straggling batch after the last one came in, when no consumer
/// of this process holds deliveries it has not handed in. Keeps a pass from starting between
/// two batches of one burst; adds at most this much to a lone webhook's latency.
const GATHER_GAP: Duration = Duration::from_millis(20);

/// How often a pass that waits for a consumer's batch (deliveries taken, not yet handed in)
/// looks again.
const GATHER_STEP: Duration = Duration::from_millis(5);

/// Emails above which a pass starts without waiting for more batches, so the memory of one pass
/// stays bounded whatever the size of the burst.
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
    emails: writer::DirtyEmails,
    /// The consumer's `process` span, which the pass continues.
    span: tracing::Span,
    reply: oneshot::Sender<Answer>,
}

/// Hands partition batches to the pass task; cheap to clone, one per consumer.
#[derive(Clone, Debug)]
pub(crate) struct Coalescer {
    submissions: mpsc::Sender<Submission>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("emails", &self.emails.len())
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
        tasks.spawn(run(writer, receiver, in_flight, waits));
        Self { submissions }
    }

    /// Writes the emails of one partition's batch, together with whatever the other partitions
    /// hand in meanwhile, and says what to do with each message.
    pub(crate) async fn handle_batch(&self, messages: Vec<Message<PersonsDirty>>) -> Vec<Outcome> {
        // A flush ends a sync's stream: the other partitions' batches of it close on their own
        // flushes now, so the pass need not wait out their windows.
        let urgent = messages.iter().any(|message| {
            optout_amqp::is_urgent(&message.headers) || optout_amqp::is_flush(&message.headers)
        });
        let count = messages.len() as u64;
        let writer::DirtyBatch { emails, keys } = writer::dirty_batch(messages);
        if emails.is_empty() {
            // Only flushes (or empty notifications): nothing to write, no pass to wait for.
            return writer::outcomes(&keys, &Ok(Arc::default()));
        }
        let (reply, answer) = oneshot::channel();
        let submission = Submission {
            messages: count,
            urgent,
            emails,
            span: tracing::Span::current(),
            reply,
        };
        let answer = if self.submissions.send(submission).await.is_err() {
            Err("the writer is shutting down".to_owned())
        } else {
            answer
                .await
                .unwrap_or_else(|_| Err("the write pass ended without an answer".to_owned()))
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
        let mut emails = first.emails.len();
        let mut messages = first.messages;
        let mut pass = vec![first];
        while emails < PASS_EMAILS {
            // Deliveries held beyond those handed in belong to batches still forming.
            let forming = in_flight.load(Ordering::SeqCst) > messages && Instant::now() < deadline;
            let wait = if forming { GATHER_STEP } else { GATHER_GAP };
            match tokio::time::timeout(wait, receiver.recv()).await {
                Ok(Some(submission)) => {
                    if submission.urgent {
                        deadline = deadline.min(Instant::now() + waits.urgent + GATHER_GAP);
                    }
                    emails += submission.emails.len();
                    messages += submission.messages;
                    pass.push(submission);
                }
                Ok(None) => break,
                Err(_) if forming => {}
                Err(_) => break,
            }
        }
        write_pass(&writer, pass).await;
    }
}

async fn write_pass(writer: &Writer, pass: Vec<Submission>) {
    // The pass is a child of the first batch's `process` span, so a trace still runs unbroken
    // from the Mailchimp change to the Salesforce write; the other batches' spans are linked.
    let span = match pass.first() {
        Some(first) => tracing::info_span!(parent: &first.span, "write_pass", batches = pass.len()),
        None => return,
    };
    let mut union = writer::DirtyEmails::new();
    let mut replies = Vec::with_capacity(pass.len());
    for (position, submission) in pass.into_iter().enumerate() {
        if position > 0 {
            span.follows_from(&submission.span);
        }
        for (email, trace_id) in submission.emails {
            union.entry(email).or_insert(trace_id);
        }
        replies.push(submission.reply);
    }
    // Sorted, as `apply` looks the trace ids up by position.
    let (emails, trace_ids): (Vec<String>, Vec<_>) = union.into_iter().unzip();
    let count = emails.len();
    let started = Instant::now();
    let answer = match writer.write_dirty(emails, trace_ids).instrument(span).await {
        Ok(report) => {
            tracing::info!(
                emails = count,
                batches = replies.len(),
                changes = report.changes,
                written = report.written,
                elapsed_ms = started.elapsed().as_millis(),
                "write pass done"
            );
            Ok(Arc::new(report.retry))
        }
        Err(error) => {
            tracing::warn!(error = %error_chain(&error), emails = count, batches = replies.len(), "write pass failed, its messages will be redelivered");
            Err(error.to_string())
        }
    };
    for reply in replies {
        // A consumer that stopped waiting (shutdown) gets its messages redelivered anyway.
        drop(reply.send(answer.clone()));
    }
}

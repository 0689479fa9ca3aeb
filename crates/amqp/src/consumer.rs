//! A batching consumer with manual acks, dead-lettering, bounded retries, pause and graceful shutdown.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicQosOptions, ConfirmSelectOptions,
    },
    types::FieldTable,
};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, warn};

use crate::{
    ConsumerMetrics, Error, FIRST_FAILURE_HEADER, ORIGINAL_ROUTING_KEY_HEADER, REASON_HEADER,
    Result, Topology, headers, observe, publisher::publish_confirmed,
};

/// Header naming the queue a message was dead-lettered from.
pub(crate) const QUEUE_HEADER: &str = "x-optout-queue";
/// Header with the time (unix milliseconds) a message was last dead-lettered.
pub(crate) const LAST_FAILURE_HEADER: &str = "x-optout-last-failure";

/// What to do with one message after the handler saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done (side effects committed): acknowledge.
    Ack,
    /// Will never succeed: move to the queue's DLQ with this reason, then acknowledge.
    DeadLetter(String),
    /// Failed for now: requeue after a short backoff. The queue's delivery limit bounds the retries.
    Retry(String),
}

/// A message body the consumer can decode. Every protobuf message is one, decoded whatever the AMQP
/// `type` property says; a consumer of a queue that carries several message types implements it for
/// an enum of them and picks by `type`.
pub trait Body: Sized + Send + 'static {
    /// Decodes `data`, published with the AMQP `type` property `message_type` (empty when absent).
    /// The error is the dead-letter reason.
    fn decode_body(message_type: &str, data: &[u8]) -> std::result::Result<Self, String>;
}

impl<M: prost::Message + Default + Send + 'static> Body for M {
    fn decode_body(_message_type: &str, data: &[u8]) -> std::result::Result<Self, String> {
        M::decode(data).map_err(|error| format!("undecodable protobuf: {error}"))
    }
}

/// One decoded delivery handed to a handler.
#[derive(Clone, Debug)]
pub struct Message<M> {
    /// The decoded protobuf body.
    pub body: M,
    /// The publisher's `message_id` (empty if it set none).
    pub message_id: String,
    /// True when the broker delivered this message before (to us or another consumer).
    pub redelivered: bool,
    /// The AMQP headers, e.g. `traceparent`.
    pub headers: FieldTable,
}

/// How [`consume`] takes deliveries.
#[derive(Clone, Debug)]
pub struct ConsumeOptions {
    /// Unacknowledged deliveries the broker may push ahead (per consumer); at least `max_batch`.
    pub prefetch: u16,
    /// Largest batch handed to the handler.
    pub max_batch: usize,
    /// Longest wait for a batch to fill once its first message arrived.
    pub max_wait: Duration,
    /// While true the consumer is cancelled and takes no deliveries.
    pub paused: watch::Receiver<bool>,
    /// Incremented per delivery taken, decremented once it is acked, dead-lettered or requeued.
    pub in_flight: Arc<AtomicU64>,
    /// Batching for economy rather than latency, for deliveries without [`URGENT_HEADER`](crate::URGENT_HEADER).
    pub bulk: Option<BulkBatching>,
    /// Whether the handler may answer [`Outcome::DeadLetter`], for which the consumer keeps each
    /// delivery's body until it is settled. When false the consumer drops each body as soon as
    /// it is decoded (undecodable ones are still dead-lettered whole, before the handler), so a
    /// batch does not keep its encoded bodies while the handler works: for a burst of large
    /// notifications, a good part of what the batch weighs. A `DeadLetter` answered anyway is
    /// requeued, with a warning, and the queue's delivery limit moves the message, whole, to its
    /// dead-letter queue.
    pub handler_dead_letters: bool,
}

/// How a batch of non-urgent deliveries fills when [`ConsumeOptions::bulk`] is set: it keeps
/// taking deliveries while they keep coming, and closes `idle` after the last one or `max_wait`
/// after the first, or when full. A batch holding an urgent delivery (one with
/// [`URGENT_HEADER`](crate::URGENT_HEADER)) closes [`ConsumeOptions::max_wait`] after that delivery arrived, or
/// earlier by the rules above, so a webhook's latency is unchanged. Any batch closes as soon as it
/// takes a delivery with [`FLUSH_HEADER`](crate::FLUSH_HEADER): the publisher says its stream is complete.
/// A batch holding a delivery with [`STREAM_HEADER`](crate::STREAM_HEADER) ignores `idle` and waits for
/// that flush, up to `max_wait`: a pause inside a sync (a slow page) would otherwise cut it in two
/// batches; `idle` is left for deliveries no flush will follow.
///
/// Why: a sync notifies the consumer in a stream of messages over seconds; handled in short
/// windows, each window pays its own partly filled API calls downstream.
#[derive(Clone, Copy, Debug)]
pub struct BulkBatching {
    /// Quiet time after the last delivery that closes the batch.
    pub idle: Duration,
    /// Longest a batch fills.
    pub max_wait: Duration,
}

/// Whether a delivery's headers pass `check` (one of [`crate::is_flush`], [`crate::is_stream`],
/// [`crate::is_urgent`]).
fn marked(delivery: &Delivery, check: fn(&FieldTable) -> bool) -> bool {
    delivery.properties.headers().as_ref().is_some_and(check)
}

/// When the batch that started at `started` must close, given its last delivery's arrival, the
/// arrival of its first urgent delivery, and whether it holds part of a stream a flush will close.
fn batch_deadline(
    options: &ConsumeOptions,
    started: Instant,
    last: Instant,
    urgent_since: Option<Instant>,
    streaming: bool,
) -> Instant {
    let Some(bulk) = options.bulk else {
        return started + options.max_wait;
    };
    let patient = if streaming {
        started + bulk.max_wait
    } else {
        (last + bulk.idle).min(started + bulk.max_wait)
    };
    match urgent_since {
        Some(urgent) => patient.min(urgent + options.max_wait),
        None => patient,
    }
}

/// Why a consume session ended.
enum SessionEnd {
    Paused,
    Shutdown,
}

/// Consumes `queue` until `shutdown`; hands the handler batches of decoded messages (up to `max_batch`,
/// waiting at most `max_wait` for a batch to fill), then acks / dead-letters / requeues each by its
/// [`Outcome`] (the handler returns one per message, in order). Undecodable bodies go to the DLQ with reason
/// `undecodable protobuf: ...` without reaching the handler. While `paused` is true it takes no deliveries.
/// On shutdown it stops taking deliveries, finishes the batch in hand and returns `Ok(())`.
///
/// Each batch is handled inside a `process {queue}` consumer span that continues the publishers' traces
/// (see [`crate::observe`]).
pub async fn consume<M, F, Fut>(
    connection: &Connection,
    topology: &Topology,
    queue: &str,
    options: ConsumeOptions,
    shutdown: CancellationToken,
    handler: F,
) -> Result<()>
where
    M: Body,
    F: FnMut(Vec<Message<M>>) -> Fut + Send,
    Fut: Future<Output = Vec<Outcome>> + Send + 'static,
{
    consume_with_metrics(
        connection,
        topology,
        queue,
        options,
        ConsumerMetrics::default(),
        shutdown,
        handler,
    )
    .await
}

/// [`consume`], counting outcomes, dead letters and queue lag in `metrics`.
pub async fn consume_with_metrics<M, F, Fut>(
    connection: &Connection,
    topology: &Topology,
    queue: &str,
    options: ConsumeOptions,
    metrics: ConsumerMetrics,
    shutdown: CancellationToken,
    handler: F,
) -> Result<()>
where
    M: Body,
    F: FnMut(Vec<Message<M>>) -> Fut + Send,
    Fut: Future<Output = Vec<Outcome>> + Send + 'static,
{
    let mut handler = Collect(handler);
    consume_batches(
        connection,
        topology,
        queue,
        options,
        metrics,
        shutdown,
        &mut handler,
    )
    .await
}

/// [`consume_with_metrics`] with a handler that takes each message of a batch as it arrives
/// instead of the whole batch once it closed: it is called at a batch's first message, reads the
/// rest from [`Incoming`] while the batch fills, and answers, once [`Incoming::next`] said the
/// batch closed, one [`Outcome`] per message it read, in order. Messages it did not read (it
/// returned early) are requeued.
///
/// Why: a batch can hold hundreds of large messages, arriving over seconds. A handler that works
/// them off as they come (staging them elsewhere, say) never holds the whole batch decoded: the
/// consumer decodes the next delivery only once the handler took the previous message, so at most
/// one message waits for it, and what the broker pushed ahead waits in lapin's buffer, undecoded.
pub async fn consume_incoming<M, F, Fut>(
    connection: &Connection,
    topology: &Topology,
    queue: &str,
    options: ConsumeOptions,
    metrics: ConsumerMetrics,
    shutdown: CancellationToken,
    handler: F,
) -> Result<()>
where
    M: Body,
    F: FnMut(Incoming<M>) -> Fut + Send,
    Fut: Future<Output = Vec<Outcome>> + Send + 'static,
{
    let mut handler = Streaming(handler);
    consume_batches(
        connection,
        topology,
        queue,
        options,
        metrics,
        shutdown,
        &mut handler,
    )
    .await
}

/// The messages of one batch as the consumer takes them, for a handler of [`consume_incoming`].
#[derive(Debug)]
pub struct Incoming<M> {
    receiver: mpsc::Receiver<Message<M>>,
}

impl<M> Incoming<M> {
    /// The batch's next message, once the consumer took it; `None` once the batch closed.
    pub async fn next(&mut self) -> Option<Message<M>> {
        self.receiver.recv().await
    }

    /// Every message of the batch, once it closed.
    pub async fn collect(mut self) -> Vec<Message<M>> {
        let mut messages = Vec::new();
        while let Some(message) = self.next().await {
            messages.push(message);
        }
        messages
    }
}

/// A batch handler of either kind.
trait Handle<M>: Send {
    /// Works on the batch `incoming` delivers; one outcome per message read, in order.
    fn handle(&mut self, incoming: Incoming<M>) -> impl Future<Output = Vec<Outcome>> + Send + '_;
}

/// A handler of whole batches ([`consume_with_metrics`]).
struct Collect<F>(F);

impl<M, F, Fut> Handle<M> for Collect<F>
where
    M: Body,
    F: FnMut(Vec<Message<M>>) -> Fut + Send,
    Fut: Future<Output = Vec<Outcome>> + Send + 'static,
{
    async fn handle(&mut self, incoming: Incoming<M>) -> Vec<Outcome> {
        let batch = incoming.collect().await;
        (self.0)(batch).await
    }
}

/// A handler of messages as they arrive ([`consume_incoming`]).
struct Streaming<F>(F);

impl<M, F, Fut> Handle<M> for Streaming<F>
where
    M: Body,
    F: FnMut(Incoming<M>) -> Fut + Send,
    Fut: Future<Output = Vec<Outcome>> + Send + 'static,
{
    fn handle(&mut self, incoming: Incoming<M>) -> impl Future<Output = Vec<Outcome>> + Send + '_ {
        (self.0)(incoming)
    }
}

async fn consume_batches<M: Body, H: Handle<M>>(
    connection: &Connection,
    topology: &Topology,
    queue: &str,
    options: ConsumeOptions,
    metrics: ConsumerMetrics,
    shutdown: CancellationToken,
    handler: &mut H,
) -> Result<()> {
    let dead_letter_channel = connection
        .create_channel()
        .await
        .map_err(Error::amqp("channel.open", queue))?;
    dead_letter_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(Error::amqp("confirm.select", queue))?;
    let worker = Worker {
        queue,
        dead_letter_queue: topology.dead_letter_queue(queue),
        dead_letter_channel,
        in_flight: options.in_flight.clone(),
        metrics,
        handler_dead_letters: options.handler_dead_letters,
    };
    let mut paused = options.paused.clone();
    let result = consume_sessions(
        connection,
        &worker,
        &options,
        &mut paused,
        &shutdown,
        handler,
    )
    .await;
    // Closed here rather than dropped: lapin closes a dropped channel in the background, where a
    // close racing the service's connection close errors the whole connection.
    close_quietly(&worker.dead_letter_channel).await;
    result
}

/// Runs consume sessions, one per pause, until shutdown or a broker error.
async fn consume_sessions<M: Body, H: Handle<M>>(
    connection: &Connection,
    worker: &Worker<'_>,
    options: &ConsumeOptions,
    paused: &mut watch::Receiver<bool>,
    shutdown: &CancellationToken,
    handler: &mut H,
) -> Result<()> {
    let queue = worker.queue;
    loop {
        if !wait_until_resumed(paused, shutdown).await {
            return Ok(());
        }
        // A channel per session: closing it at the end returns every delivery the broker pushed ahead
        // (prefetched, never handed to us) to the queue, which a bare basic.cancel would leave unacked.
        let channel = connection
            .create_channel()
            .await
            .map_err(Error::amqp("channel.open", queue))?;
        let session = run_session(&channel, worker, options, paused, shutdown, handler).await;
        close_quietly(&channel).await;
        match session? {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Paused => debug!(queue, "consumer paused"),
        }
    }
}

/// Waits while paused. False when shutdown came first.
async fn wait_until_resumed(
    paused: &mut watch::Receiver<bool>,
    shutdown: &CancellationToken,
) -> bool {
    loop {
        if shutdown.is_cancelled() {
            return false;
        }
        if !*paused.borrow_and_update() {
            return true;
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            changed = paused.changed() => {
                if changed.is_err() {
                    // Nobody can resume us any more: stay paused until shutdown.
                    shutdown.cancelled().await;
                    return false;
                }
            }
        }
    }
}

/// Resolves once `paused` is true; never if its sender is gone.
async fn paused_now(paused: &mut watch::Receiver<bool>) {
    loop {
        if *paused.borrow_and_update() {
            return;
        }
        if paused.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn close_quietly(channel: &Channel) {
    if let Err(error) = channel.close(200, "consumer stopped".into()).await {
        debug!(%error, "failed to close consumer channel");
    }
}

async fn run_session<M: Body, H: Handle<M>>(
    channel: &Channel,
    worker: &Worker<'_>,
    options: &ConsumeOptions,
    paused: &mut watch::Receiver<bool>,
    shutdown: &CancellationToken,
    handler: &mut H,
) -> Result<SessionEnd> {
    let queue = worker.queue;
    // Per-consumer prefetch (global: false) bounds the unacked deliveries this consumer holds, so a slow
    // replica does not hoard messages other replicas could take. https://www.rabbitmq.com/docs/consumer-prefetch
    let prefetch = options
        .prefetch
        .max(u16::try_from(options.max_batch).unwrap_or(u16::MAX))
        .max(1);
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .map_err(Error::amqp("basic.qos", queue))?;
    // Unique tag: several replicas (and several consumers of one process) consume the same queue.
    let consumer_tag = format!("{queue}.{}", uuid::Uuid::new_v4());
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            consumer_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("basic.consume", queue))?;
    let max_batch = options.max_batch.max(1);

    loop {
        let first = tokio::select! {
            biased;
            () = shutdown.cancelled() => return cancel(channel, &consumer_tag, SessionEnd::Shutdown).await,
            () = paused_now(paused) => return cancel(channel, &consumer_tag, SessionEnd::Paused).await,
            next = consumer.next() => next_delivery(next, queue)?,
        };
        worker.in_flight.fetch_add(1, Ordering::SeqCst);
        let started = Instant::now();
        let mut last = started;
        let mut urgent_since = marked(&first, crate::is_urgent).then_some(started);
        // A flush says nothing more of its stream is coming: waiting would only add latency.
        let mut flushed = marked(&first, crate::is_flush);
        let mut streaming = marked(&first, crate::is_stream);
        let mut taken = 1;
        let mut batch = Batch::new(queue, handler);
        let mut stop_after_batch = None;
        let mut failure = worker.take(&mut batch, first).await.err();
        while failure.is_none() && taken < max_batch && !flushed && batch.outcomes.is_none() {
            let deadline = batch_deadline(options, started, last, urgent_since, streaming);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    stop_after_batch = Some(SessionEnd::Shutdown);
                    break;
                }
                () = tokio::time::sleep_until(deadline) => break,
                // The handler works on the messages it has while the batch fills.
                outcomes = batch.handling() => batch.outcomes = Some(outcomes),
                next = consumer.next() => match next_delivery(next, queue) {
                    Ok(delivery) => {
                        worker.in_flight.fetch_add(1, Ordering::SeqCst);
                        taken += 1;
                        last = Instant::now();
                        if urgent_since.is_none() && marked(&delivery, crate::is_urgent) {
                            urgent_since = Some(last);
                        }
                        flushed = marked(&delivery, crate::is_flush);
                        streaming |= marked(&delivery, crate::is_stream);
                        failure = worker.take(&mut batch, delivery).await.err();
                    }
                    Err(error) => failure = Some(error),
                },
            }
        }
        worker.finish(batch, shutdown).await?;
        if let Some(error) = failure {
            return Err(error);
        }
        if shutdown.is_cancelled() {
            stop_after_batch = Some(SessionEnd::Shutdown);
        } else if *paused.borrow() {
            stop_after_batch = Some(SessionEnd::Paused);
        }
        if let Some(end) = stop_after_batch {
            return cancel(channel, &consumer_tag, end).await;
        }
    }
}

/// A batch's work while it fills: the decoded messages go to the handler, started at the first,
/// as they arrive.
struct Batch<'h, M, H> {
    /// Until the handler starts.
    handler: Option<&'h mut H>,
    /// Until the handler starts.
    receiver: Option<mpsc::Receiver<Message<M>>>,
    /// Dropped when the batch closes, which tells the handler.
    sender: mpsc::Sender<Message<M>>,
    handling: Option<Pin<Box<dyn Future<Output = Vec<Outcome>> + Send + 'h>>>,
    /// The handler's answer, once it gave it.
    outcomes: Option<Vec<Outcome>>,
    /// The deliveries whose messages went to the handler, in order.
    deliveries: Vec<Delivery>,
    span: observe::ProcessSpan,
}

impl<'h, M: Body, H: Handle<M>> Batch<'h, M, H> {
    fn new(queue: &str, handler: &'h mut H) -> Self {
        // One message waits for the handler at most: the consumer takes the next delivery once
        // the handler took the previous message.
        let (sender, receiver) = mpsc::channel(1);
        Self {
            handler: Some(handler),
            receiver: Some(receiver),
            sender,
            handling: None,
            outcomes: None,
            deliveries: Vec::new(),
            span: observe::ProcessSpan::new(queue),
        }
    }

    /// Hands `message` to the handler (starting it at the batch's first), and waits, working the
    /// handler meanwhile, until it was taken or the handler returned.
    async fn forward(&mut self, message: Message<M>) {
        self.span.add(&message.headers);
        if let (Some(handler), Some(receiver)) = (self.handler.take(), self.receiver.take()) {
            let handling = handler.handle(Incoming { receiver });
            self.handling = Some(Box::pin(handling.instrument(self.span.span().clone())));
        }
        if self.outcomes.is_some() {
            return;
        }
        let Some(handling) = self.handling.as_mut() else {
            return;
        };
        tokio::select! {
            // An error means the handler dropped its `Incoming`: the message will be requeued.
            _ = self.sender.send(message) => {}
            outcomes = handling => self.outcomes = Some(outcomes),
        }
    }

    /// Resolves with the handler's answer; never if it is not working.
    async fn handling(&mut self) -> Vec<Outcome> {
        match (&mut self.handling, &self.outcomes) {
            (Some(handling), None) => handling.await,
            _ => std::future::pending().await,
        }
    }
}

fn next_delivery(next: Option<lapin::Result<Delivery>>, queue: &str) -> Result<Delivery> {
    match next {
        Some(Ok(delivery)) => Ok(delivery),
        Some(Err(source)) => Err(Error::Amqp {
            operation: "basic.deliver",
            target: queue.to_owned(),
            source,
        }),
        None => Err(Error::ConsumerCancelled {
            queue: queue.to_owned(),
        }),
    }
}

/// Stops deliveries to this consumer; whatever was prefetched returns to the queue when the channel closes.
async fn cancel(channel: &Channel, consumer_tag: &str, end: SessionEnd) -> Result<SessionEnd> {
    if let Err(error) = channel
        .basic_cancel(consumer_tag.into(), BasicCancelOptions::default())
        .await
    {
        debug!(%error, consumer_tag, "failed to cancel consumer");
    }
    Ok(end)
}

/// What the per-batch processing needs.
struct Worker<'a> {
    queue: &'a str,
    dead_letter_queue: String,
    dead_letter_channel: Channel,
    in_flight: Arc<AtomicU64>,
    metrics: ConsumerMetrics,
    /// See [`ConsumeOptions::handler_dead_letters`].
    handler_dead_letters: bool,
}

impl Worker<'_> {
    /// Takes one delivery into `batch`: decoded, its message goes to the handler; undecodable,
    /// it goes to the DLQ with its reason.
    async fn take<M: Body, H: Handle<M>>(
        &self,
        batch: &mut Batch<'_, M, H>,
        mut delivery: Delivery,
    ) -> Result<()> {
        let message_type = delivery
            .properties
            .kind()
            .as_ref()
            .map(|kind| kind.as_str())
            .unwrap_or_default();
        let body = match M::decode_body(message_type, delivery.data.as_slice()) {
            Ok(body) => body,
            Err(reason) => return self.dead_letter(&delivery, &reason).await,
        };
        let message = Message {
            body,
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default(),
            redelivered: delivery.redelivered,
            headers: delivery.properties.headers().clone().unwrap_or_default(),
        };
        if !self.handler_dead_letters {
            delivery.data = Vec::new();
        }
        self.metrics.observe_lag(self.queue, &message.headers);
        batch.deliveries.push(delivery);
        batch.forward(message).await;
        Ok(())
    }

    /// Closes `batch`, waits for the handler's answer and settles each delivery by its outcome.
    async fn finish<M: Body, H: Handle<M>>(
        &self,
        batch: Batch<'_, M, H>,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let Batch {
            sender,
            handling,
            outcomes,
            deliveries,
            span,
            ..
        } = batch;
        // The handler's `Incoming` ends once it took what was sent.
        drop(sender);
        let Some(handling) = handling else {
            // Nothing decoded: the handler never started.
            return Ok(());
        };
        let outcomes = match outcomes {
            Some(outcomes) => outcomes,
            None => handling.await,
        };
        span.finish();
        self.settle(outcomes, deliveries, shutdown)
            .instrument(span.span().clone())
            .await
    }

    /// Settles each delivery by its outcome (the handler's answer, one per delivery in order).
    async fn settle(
        &self,
        mut outcomes: Vec<Outcome>,
        deliveries: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let expected = deliveries.len();
        if outcomes.len() != expected {
            warn!(
                queue = self.queue,
                expected,
                returned = outcomes.len(),
                "handler returned the wrong number of outcomes"
            );
        }
        outcomes.resize(
            expected,
            Outcome::Retry("handler returned no outcome".to_owned()),
        );

        let mut retries = Vec::new();
        for (delivery, outcome) in deliveries.into_iter().zip(outcomes) {
            let name = match &outcome {
                Outcome::Ack => "ack",
                Outcome::DeadLetter(_) => "dead_letter",
                Outcome::Retry(_) => "retry",
            };
            self.metrics.settled(self.queue, name);
            match outcome {
                Outcome::Ack => self.ack(&delivery).await?,
                Outcome::DeadLetter(reason) if !self.handler_dead_letters => {
                    warn!(
                        queue = self.queue,
                        %reason,
                        "the handler dead-lettered a message whose body was dropped; requeueing it, the delivery limit will dead-letter it"
                    );
                    retries.push(delivery);
                }
                Outcome::DeadLetter(reason) => self.dead_letter(&delivery, &reason).await?,
                Outcome::Retry(reason) => {
                    debug!(queue = self.queue, %reason, "requeueing message");
                    retries.push(delivery);
                }
            }
        }
        if !retries.is_empty() {
            let backoff = retries.iter().map(retry_backoff).max().unwrap_or_default();
            // Back off before requeueing, since the broker redelivers at once; shutdown cuts it short.
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(backoff) => {}
            }
            for delivery in retries {
                self.requeue(&delivery).await?;
            }
        }
        Ok(())
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let result = delivery.ack(BasicAckOptions::default()).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result.map_err(Error::amqp("basic.ack", self.queue))?;
        Ok(())
    }

    async fn requeue(&self, delivery: &Delivery) -> Result<()> {
        let result = delivery
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result.map_err(Error::amqp("basic.nack", self.queue))?;
        Ok(())
    }

    /// Copies the delivery to the DLQ with the reason in its headers, then acks it. If the copy fails the
    /// delivery is requeued instead, so a message is never dropped.
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        warn!(queue = self.queue, reason, "dead-lettering message");
        self.metrics.dead_lettered(self.queue);
        let properties = dead_letter_properties(
            &delivery.properties,
            self.queue,
            delivery.routing_key.as_str(),
            reason,
        );
        // The default exchange routes by queue name, straight into the DLQ.
        let published = publish_confirmed(
            &self.dead_letter_channel,
            "",
            &self.dead_letter_queue,
            &delivery.data,
            properties,
        )
        .await;
        match published {
            Ok(()) => self.ack(delivery).await,
            Err(error) => {
                warn!(%error, queue = self.queue, "failed to dead-letter message, requeueing it");
                self.requeue(delivery).await
            }
        }
    }
}

/// The original properties with the dead-letter headers added; a previous first failure is kept.
pub(crate) fn dead_letter_properties(
    original: &BasicProperties,
    queue: &str,
    routing_key: &str,
    reason: &str,
) -> BasicProperties {
    let mut table = original.headers().clone().unwrap_or_default();
    let first_failure =
        headers::integer(&table, FIRST_FAILURE_HEADER).unwrap_or_else(headers::now_unix_ms);
    let original_routing_key = headers::string(&table, ORIGINAL_ROUTING_KEY_HEADER)
        .unwrap_or_else(|| routing_key.to_owned());
    headers::insert_string(&mut table, REASON_HEADER, reason);
    headers::insert_string(
        &mut table,
        ORIGINAL_ROUTING_KEY_HEADER,
        &original_routing_key,
    );
    headers::insert_integer(&mut table, FIRST_FAILURE_HEADER, first_failure);
    headers::insert_integer(&mut table, LAST_FAILURE_HEADER, headers::now_unix_ms());
    headers::insert_string(&mut table, QUEUE_HEADER, queue);
    original.clone().with_headers(table).with_delivery_mode(2)
}

/// 100 ms doubling per earlier delivery (quorum queues count them in `x-delivery-count`), at most 5 s.
fn retry_backoff(delivery: &Delivery) -> Duration {
    let deliveries = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|table| headers::integer(table, "x-delivery-count"))
        .unwrap_or(0)
        .clamp(0, 6);
    Duration::from_millis(100u64 << deliveries).min(Duration::from_secs(5))
}

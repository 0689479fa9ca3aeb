//! Tracing and metrics for messages: the W3C trace-context carrier for AMQP headers, the producer and
//! consumer spans (OpenTelemetry messaging conventions: `messaging.system = rabbitmq`,
//! `messaging.operation.type`, `messaging.destination.name`, ...), and the consumer's Prometheus metrics.
//!
//! A consumed batch gets one `process {queue}` span. Its parent is the first message's publisher span,
//! and every other message whose context differs is attached as a span link: one batch may join
//! messages of several traces (several sync runs, or a webhook and a sync), and a span has one parent.
//! In a primary sync every message of the run carries the same trace, so its chain of parents stays
//! unbroken.

use lapin::types::{AMQPValue, FieldTable, LongString};
use optout_telemetry::{
    SpanExt,
    metrics::Registry,
    opentelemetry::propagation::{Extractor, Injector},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
};
use tracing::Span;

use crate::headers;

/// Header with the publish time in unix milliseconds, for the queue-lag histogram.
pub const PUBLISHED_AT_HEADER: &str = "x-optout-published-ms";

/// Writes W3C trace-context entries into AMQP headers.
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0
            .insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    }
}

/// Reads W3C trace-context entries from AMQP headers.
#[derive(Debug)]
pub struct HeaderExtractor<'a>(pub &'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
            AMQPValue::ShortString(value) => Some(value.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|key| key.as_str()).collect()
    }
}

/// Puts the current span's trace context into `headers`.
pub fn inject(headers: &mut FieldTable) {
    optout_telemetry::inject(&mut HeaderInjector(headers));
}

/// The remote context carried by `headers` (empty when there is none).
pub fn extract(headers: &FieldTable) -> optout_telemetry::opentelemetry::Context {
    optout_telemetry::extract(&HeaderExtractor(headers))
}

/// The producer span of one publish.
pub(crate) fn publish_span(exchange: &str, routing_key: &str, message_id: &str) -> Span {
    // The default exchange has no name; the routing key is then the destination queue.
    let destination = if exchange.is_empty() {
        routing_key
    } else {
        exchange
    };
    tracing::info_span!(
        "amqp.publish",
        otel.name = %format_args!("publish {destination}"),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %destination,
        messaging.rabbitmq.destination.routing_key = %routing_key,
        messaging.message.id = %message_id,
    )
}

/// The consumer span of one batch from `queue`, built as its messages arrive: child of the first
/// message's context, linked to the others (see the module documentation).
pub(crate) struct ProcessSpan {
    span: Span,
    /// The remote spans it continues or links, so each is linked once.
    linked: Vec<optout_telemetry::opentelemetry::trace::SpanContext>,
    /// Messages added.
    messages: usize,
}

impl ProcessSpan {
    pub(crate) fn new(queue: &str) -> Self {
        let span = tracing::info_span!(
            "amqp.process",
            otel.name = %format_args!("process {queue}"),
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = %queue,
            messaging.batch.message_count = tracing::field::Empty,
        );
        Self {
            span,
            linked: Vec::new(),
            messages: 0,
        }
    }

    /// Joins the trace of the batch's next message, with these headers: the first message's
    /// context becomes the parent (it is added before the span is first entered, when a parent can
    /// still be set), any other a link.
    pub(crate) fn add(&mut self, headers: &FieldTable) {
        let first = self.messages == 0;
        self.messages += 1;
        let context = extract(headers);
        let Some(remote) = optout_telemetry::remote_span_context(&context) else {
            return;
        };
        if self.linked.contains(&remote) {
            return;
        }
        if first {
            optout_telemetry::set_remote_parent(&self.span, context);
        } else {
            self.span.add_link(remote.clone());
        }
        self.linked.push(remote);
    }

    /// The span, for instrumenting the batch's work.
    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// Records the batch's size once it closed.
    pub(crate) fn finish(&self) {
        self.span
            .record("messaging.batch.message_count", self.messages);
    }
}

/// The queue label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// Queue name.
    pub queue: String,
}

/// Queue and outcome labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Queue name.
    pub queue: String,
    /// `ack`, `dead_letter` or `retry`.
    pub outcome: String,
}

type LagFamily = Family<QueueLabels, Histogram, fn() -> Histogram>;

fn lag_histogram() -> Histogram {
    // 5 ms .. ~80 s
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Metrics of one service's consumers and queues; cheap to clone (clones share the numbers).
#[derive(Clone, Debug)]
pub struct ConsumerMetrics {
    settled: Family<OutcomeLabels, Counter>,
    dead_letters: Family<QueueLabels, Counter>,
    lag: LagFamily,
    depth: Family<QueueLabels, Gauge>,
}

impl Default for ConsumerMetrics {
    fn default() -> Self {
        Self {
            settled: Family::default(),
            dead_letters: Family::default(),
            lag: Family::new_with_constructor(lag_histogram as fn() -> Histogram),
            depth: Family::default(),
        }
    }
}

impl ConsumerMetrics {
    /// Registers `optout_messages_settled_total{queue,outcome}`, `optout_dead_letters_total{queue}`,
    /// `optout_queue_lag_seconds{queue}` (publish to handled) and `optout_queue_messages{queue}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "optout_messages_settled",
            "Consumed messages by queue and outcome (ack, dead_letter, retry)",
            self.settled.clone(),
        );
        registry.register(
            "optout_dead_letters",
            "Messages this service moved to a dead-letter queue",
            self.dead_letters.clone(),
        );
        registry.register(
            "optout_queue_lag_seconds",
            "Time from publishing a message to handling it",
            self.lag.clone(),
        );
        registry.register(
            "optout_queue_messages",
            "Messages waiting in a queue (its dead-letter queue included), read at scrape time",
            self.depth.clone(),
        );
    }

    pub(crate) fn settled(&self, queue: &str, outcome: &str) {
        self.settled
            .get_or_create(&OutcomeLabels {
                queue: queue.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub(crate) fn dead_lettered(&self, queue: &str) {
        self.dead_letters
            .get_or_create(&QueueLabels {
                queue: queue.to_owned(),
            })
            .inc();
    }

    pub(crate) fn observe_lag(&self, queue: &str, headers: &FieldTable) {
        let Some(published) = headers::integer(headers, PUBLISHED_AT_HEADER) else {
            return;
        };
        let lag_ms = (headers::now_unix_ms() - published).max(0);
        self.lag
            .get_or_create(&QueueLabels {
                queue: queue.to_owned(),
            })
            .observe(lag_ms as f64 / 1000.0);
    }

    /// Reads the depth of each of `queues` with a passive declare and updates the gauges; a queue that
    /// cannot be read keeps its last value.
    pub async fn refresh_depths(&self, connection: &lapin::Connection, queues: &[String]) {
        for queue in queues {
            // A passive declare of a missing queue closes its channel, so each gets its own.
            let Ok(channel) = connection.create_channel().await else {
                return;
            };
            if let Ok((messages, _consumers)) = crate::queue_depth(&channel, queue).await {
                self.depth
                    .get_or_create(&QueueLabels {
                        queue: queue.clone(),
                    })
                    .set(i64::try_from(messages).unwrap_or(i64::MAX));
            }
            drop(channel.close(200, "depth read".into()).await);
        }
    }
}

//! RabbitMQ plumbing shared by every optout-sync service: the durable topology, a publisher that waits
//! for broker confirms, a batching consumer with manual acks and dead-lettering, and the dead-letter
//! queue operations behind the admin RPCs.
//!
//! Messages are protobuf bodies (`content_type: application/protobuf`, `type: <proto full name>`).
//! They are notifications, not commands, so at-least-once delivery with duplicates is the contract.

mod consumer;
pub mod dead_letters;
mod headers;
pub mod observe;
mod publisher;
mod topology;

pub use consumer::{
    Body, BulkBatching, ConsumeOptions, Incoming, Message, Outcome, consume, consume_incoming,
    consume_with_metrics,
};
pub use observe::ConsumerMetrics;
pub use publisher::Publisher;
pub use topology::{
    DELIVERY_LIMIT, MEMBERS_CHANGED_ROUTING_KEY, Topology, declare, queue_depth, teardown,
};

/// Re-exported so callers can name lapin types without their own dependency.
pub use lapin;

/// Header naming why a message was dead-lettered by this crate.
pub const REASON_HEADER: &str = "x-optout-reason";
/// Header keeping the routing key a dead-lettered message was first published with.
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-optout-original-routing-key";
/// Header with the time (unix milliseconds) a message first failed.
pub const FIRST_FAILURE_HEADER: &str = "x-optout-first-failure";
/// Boolean header: handle this message promptly (a webhook's consequence), not in the longer
/// batches a sync's stream of messages is gathered into (see [`BulkBatching`]).
pub const URGENT_HEADER: &str = "x-optout-urgent";

/// Boolean header: the stream this message ends is complete (a sync run's last notification),
/// so a batch that holds it closes at once rather than when its window runs out.
pub const FLUSH_HEADER: &str = "x-optout-flush";

/// Boolean header: this message belongs to a stream that a flush will close (a sync run's
/// notifications), so a batch holding it waits for that flush, up to its longest wait, rather than
/// closing at the first pause in the stream.
pub const STREAM_HEADER: &str = "x-optout-stream";

/// Headers with the boolean `flag` set.
fn flag_headers(flag: &str) -> lapin::types::FieldTable {
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(flag.into(), lapin::types::AMQPValue::Boolean(true));
    headers
}

/// Whether `headers` set the boolean `flag`.
fn has_flag(headers: &lapin::types::FieldTable, flag: &str) -> bool {
    matches!(
        headers.inner().get(flag),
        Some(lapin::types::AMQPValue::Boolean(true))
    )
}

/// Headers that mark a message urgent ([`URGENT_HEADER`] true).
pub fn urgent_headers() -> lapin::types::FieldTable {
    flag_headers(URGENT_HEADER)
}

/// Whether `headers` mark a message urgent.
pub fn is_urgent(headers: &lapin::types::FieldTable) -> bool {
    has_flag(headers, URGENT_HEADER)
}

/// Headers that mark a message as part of a flushed stream ([`STREAM_HEADER`] true).
pub fn stream_headers() -> lapin::types::FieldTable {
    flag_headers(STREAM_HEADER)
}

/// Whether `headers` mark a message as part of a flushed stream.
pub fn is_stream(headers: &lapin::types::FieldTable) -> bool {
    has_flag(headers, STREAM_HEADER)
}

/// Headers that mark a message as a flush ([`FLUSH_HEADER`] true).
pub fn flush_headers() -> lapin::types::FieldTable {
    flag_headers(FLUSH_HEADER)
}

/// Whether `headers` mark a message as a flush.
pub fn is_flush(headers: &lapin::types::FieldTable) -> bool {
    has_flag(headers, FLUSH_HEADER)
}

/// The content type of every body this crate publishes.
pub const CONTENT_TYPE: &str = "application/protobuf";

/// Errors of the AMQP layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection to the broker could not be opened.
    #[error("failed to connect to rabbitmq")]
    Connect(#[source] lapin::Error),
    /// The AMQP URL could not be parsed. Its text is left out: it may carry a password.
    #[error("the amqp url is not valid (amqp://user:password@host:port/vhost)")]
    InvalidUrl,
    /// The broker accepted the TCP connection but did not finish the AMQP handshake in time.
    #[error("rabbitmq did not complete the amqp handshake within {0:?}")]
    ConnectTimeout(std::time::Duration),
    /// A protocol operation failed (channel closed, precondition failed, queue missing, ...).
    #[error("amqp {operation} failed on {target}")]
    Amqp {
        /// The AMQP method, e.g. `queue.declare`.
        operation: &'static str,
        /// The exchange, queue or routing key it was applied to.
        target: String,
        /// What lapin reported.
        #[source]
        source: lapin::Error,
    },
    /// The broker refused to take responsibility for a published message.
    #[error("broker nacked message published to {exchange} with routing key {routing_key}")]
    Nacked {
        /// Exchange published to.
        exchange: String,
        /// Routing key used.
        routing_key: String,
    },
    /// The broker cancelled the consumer (e.g. the queue was deleted).
    #[error("broker cancelled the consumer of {queue}")]
    ConsumerCancelled {
        /// The queue consumed.
        queue: String,
    },
    /// The message matched no queue, so nobody would ever have seen it.
    #[error("message published to {exchange} with routing key {routing_key} was unroutable")]
    Unroutable {
        /// Exchange published to.
        exchange: String,
        /// Routing key used.
        routing_key: String,
    },
}

impl Error {
    pub(crate) fn amqp(
        operation: &'static str,
        target: impl Into<String>,
    ) -> impl FnOnce(lapin::Error) -> Self {
        let target = target.into();
        move |source| Self::Amqp {
            operation,
            target,
            source,
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Opens a connection to the broker at `url` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`).
///
/// The URL is never logged or put in errors since it may carry a password.
pub async fn connect(url: &str) -> Result<lapin::Connection> {
    // A wedged broker (or anything else on the port) can accept TCP and never answer the
    // protocol header; lapin would then wait forever. Fail instead, so a service exits to be
    // restarted and a test reports the broker rather than hanging.
    let mut uri: lapin::uri::AMQPUri = url.parse().map_err(|_| Error::InvalidUrl)?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    uri.query.channel_max.get_or_insert(CHANNEL_MAX);
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        lapin::Connection::connect_uri(uri, lapin::ConnectionProperties::default()),
    )
    .await
    .map_err(|_| Error::ConnectTimeout(CONNECT_TIMEOUT))?
    .map_err(Error::Connect)
}

/// The largest frame [`connect`] asks for, unless the URL sets `frame_max`. lapin keeps a receive
/// and a send buffer of 32 frames for the life of a connection, used as rings: zeroed memory that
/// becomes resident page by page as traffic first goes round. At RabbitMQ's default of 128 KiB
/// that is 8 MiB in every service, and at 32 KiB 2 MiB, which a writer that receives little
/// filled in proportion to how long a sync ran: its resident set grew with the org. At 8 KiB
/// the rings are 512 KiB, full after the first few pages whatever the org. A larger message is
/// simply sent in several frames (a page of 1,000 members in about twenty).
pub const FRAME_MAX: u32 = 8 * 1024;

/// The most channels [`connect`] asks for, unless the URL sets `channel_max` (RabbitMQ's default
/// is 2,047). lapin numbers each new channel after the last, wrapping at the maximum, and keeps a
/// little state per number it has used: a service that opens a short-lived channel for every
/// status read (about 20 a second under the benchmark's polls) kept about 400 bytes more for
/// each new number, some 800 KB once the numbers wrapped, so a longer sync showed a higher
/// resident peak. A service holds a few dozen channels at most at once.
pub const CHANNEL_MAX: u16 = 256;

/// How long [`connect`] waits for the AMQP handshake: far beyond a healthy broker's milliseconds,
/// short enough that a hung one is reported well before any test or probe gives up.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A token cancelled when `connection` fails (broker restart, network loss).
///
/// A lapin connection does not come back by itself, and consumers or publishers on a dead one
/// only fail: a service that sees this token cancelled drains and exits non-zero, and its
/// supervisor (Kubernetes, the test harness) starts it again on a fresh connection.
pub fn connection_lost(connection: &lapin::Connection) -> tokio_util::sync::CancellationToken {
    use futures::StreamExt as _;
    let lost = tokio_util::sync::CancellationToken::new();
    let mut events = Box::pin(connection.events_listener());
    let cancel = lost.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(error) = event {
                tracing::error!(%error, "rabbitmq connection lost");
                cancel.cancel();
                return;
            }
        }
    });
    lost
}

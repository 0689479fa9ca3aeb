//! Publishing protobuf messages with publisher confirms.

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::FieldTable,
};

use optout_telemetry::opentelemetry::propagation::Extractor as _;
use tracing::Instrument as _;

use crate::{CONTENT_TYPE, Error, Result, Topology, headers, observe};

/// AMQP delivery mode 2: the broker writes the message to disk before confirming it.
const PERSISTENT: u8 = 2;

/// Publishes protobuf messages on the topology's exchange and waits for the broker's confirm.
///
/// Cheap to clone; clones share one confirm-mode channel. A publish returns only once the broker has taken
/// responsibility for the message (it is on disk in every queue it was routed to), so a caller may then
/// advance a watermark or ack its own input.
#[derive(Clone, Debug)]
pub struct Publisher {
    channel: Channel,
    topology: Topology,
}

impl Publisher {
    /// Opens a channel on `connection` and puts it in confirm mode.
    pub async fn new(connection: &Connection, topology: Topology) -> Result<Self> {
        let channel = connection
            .create_channel()
            .await
            .map_err(Error::amqp("channel.open", "publisher"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(Error::amqp("confirm.select", "publisher"))?;
        Ok(Self { channel, topology })
    }

    /// The topology this publisher publishes on.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Publishes `message` on the exchange with `routing_key` and waits for the confirm.
    ///
    /// Sets `content_type`, `type` (the proto full name), a fresh `message_id`, `timestamp`, persistent
    /// delivery, the W3C `traceparent` of a producer span (a child of the current span) and the publish
    /// time header. A nack or an unroutable message is an error.
    pub async fn publish<M: prost::Message + prost::Name>(
        &self,
        routing_key: &str,
        message: &M,
    ) -> Result<()> {
        self.publish_typed(routing_key, &M::full_name(), message, FieldTable::default())
            .await
    }

    /// Like [`Publisher::publish`], with extra `headers` (e.g. a W3C `traceparent`).
    pub async fn publish_with_headers<M: prost::Message + prost::Name>(
        &self,
        routing_key: &str,
        message: &M,
        headers: FieldTable,
    ) -> Result<()> {
        self.publish_typed(routing_key, &M::full_name(), message, headers)
            .await
    }

    /// Like [`Publisher::publish_with_headers`], naming the proto type explicitly, for message types that do
    /// not implement [`prost::Name`]. `type_name` is the proto full name, e.g. `optout.queue.v1.PersonsDirty`.
    pub async fn publish_typed<M: prost::Message>(
        &self,
        routing_key: &str,
        type_name: &str,
        message: &M,
        headers: FieldTable,
    ) -> Result<()> {
        let mut headers = headers;
        let message_id = uuid::Uuid::new_v4().to_string();
        let span = observe::publish_span(&self.topology.exchange, routing_key, &message_id);
        // The consumer continues the trace of the producer span (unless the caller set a context).
        if observe::HeaderExtractor(&headers)
            .get("traceparent")
            .is_none()
        {
            span.in_scope(|| observe::inject(&mut headers));
        }
        headers::insert_integer(
            &mut headers,
            observe::PUBLISHED_AT_HEADER,
            headers::now_unix_ms(),
        );
        let properties = message_properties(type_name, headers).with_message_id(message_id.into());
        publish_confirmed(
            &self.channel,
            &self.topology.exchange,
            routing_key,
            &message.encode_to_vec(),
            properties,
        )
        .instrument(span)
        .await
    }
}

/// The properties of a freshly published message.
pub(crate) fn message_properties(type_name: &str, headers: FieldTable) -> BasicProperties {
    let timestamp_seconds = u64::try_from(headers::now_unix_ms() / 1000).unwrap_or(0);
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_type(type_name.into())
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_timestamp(timestamp_seconds)
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers)
}

/// Publishes on a confirm-mode `channel` and waits for the broker's verdict.
pub(crate) async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<()> {
    // Mandatory: an unroutable message comes back instead of vanishing, and we report it.
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            options,
            payload,
            properties,
        )
        .await
        .map_err(Error::amqp("basic.publish", routing_key))?
        .await
        .map_err(Error::amqp("basic.publish", routing_key))?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_returned)) => Err(Error::Unroutable {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        }),
        Confirmation::Nack(_) => Err(Error::Nacked {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        }),
    }
}

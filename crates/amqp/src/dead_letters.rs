//! Operations on a work queue's dead-letter queue (`{queue}.dlq`), behind the admin RPCs.
//!
//! Each operation opens its own channel and closes it at the end: messages it took but did not settle
//! then return to the DLQ, whatever happened in between.

use std::collections::HashSet;

use lapin::{
    BasicProperties, Channel, Connection,
    message::BasicGetMessage,
    options::{BasicAckOptions, BasicGetOptions, ConfirmSelectOptions, QueuePurgeOptions},
};

use crate::{
    Error, FIRST_FAILURE_HEADER, ORIGINAL_ROUTING_KEY_HEADER, REASON_HEADER, Result, Topology,
    consumer::{LAST_FAILURE_HEADER, QUEUE_HEADER},
    headers,
    publisher::publish_confirmed,
    queue_depth,
};

/// One message waiting in a dead-letter queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The work queue it failed on.
    pub queue: String,
    /// The publisher's message id.
    pub message_id: String,
    /// Why it was dead-lettered (`undecodable protobuf: ...`, a handler's reason, or the broker's, e.g.
    /// `delivery_limit`).
    pub reason: String,
    /// The routing key it was first published with; replay uses it.
    pub routing_key: String,
    /// The proto full name from the `type` property.
    pub type_name: String,
    /// When it first failed, unix milliseconds.
    pub first_failure_ms: Option<i64>,
    /// When it was last dead-lettered, unix milliseconds.
    pub last_failure_ms: Option<i64>,
    /// How many deliveries failed.
    pub failures: u32,
    /// Size of the body.
    pub body_bytes: u64,
}

async fn open(connection: &Connection, queue: &str) -> Result<Channel> {
    connection
        .create_channel()
        .await
        .map_err(Error::amqp("channel.open", queue))
}

async fn close(channel: &Channel) {
    if let Err(error) = channel
        .close(200, "dead letter operation done".into())
        .await
    {
        tracing::debug!(%error, "failed to close dead letter channel");
    }
}

async fn get(channel: &Channel, dead_letter_queue: &str) -> Result<Option<BasicGetMessage>> {
    channel
        .basic_get(dead_letter_queue.into(), BasicGetOptions { no_ack: false })
        .await
        .map_err(Error::amqp("basic.get", dead_letter_queue))
}

/// Up to `limit` dead letters of `queue` (the work queue, not its DLQ), oldest first. Nothing is removed.
pub async fn list(
    connection: &Connection,
    topology: &Topology,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>> {
    let dead_letter_queue = topology.dead_letter_queue(queue);
    let channel = open(connection, &dead_letter_queue).await?;
    let result = async {
        let mut dead_letters = Vec::new();
        while dead_letters.len() < limit {
            // Taken messages stay unacked on this channel, so the next get returns the next one; closing the
            // channel puts them all back.
            let Some(message) = get(&channel, &dead_letter_queue).await? else {
                break;
            };
            dead_letters.push(describe(queue, &message));
        }
        Ok(dead_letters)
    }
    .await;
    close(&channel).await;
    result
}

/// Republishes dead letters of `queue` onto the exchange with their original routing key, and removes them
/// from the DLQ once the broker confirmed the republish. `all` replays everything; otherwise only the messages
/// whose id is in `message_ids`. Returns how many were replayed.
pub async fn replay(
    connection: &Connection,
    topology: &Topology,
    queue: &str,
    message_ids: &[String],
    all: bool,
) -> Result<u32> {
    let dead_letter_queue = topology.dead_letter_queue(queue);
    let wanted: HashSet<&str> = message_ids.iter().map(String::as_str).collect();
    if !all && wanted.is_empty() {
        return Ok(0);
    }
    let channel = open(connection, &dead_letter_queue).await?;
    let publish_channel = open(connection, &dead_letter_queue).await?;
    let result = async {
        publish_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(Error::amqp("confirm.select", &dead_letter_queue))?;
        // Scan only what was there at the start: a replayed message that fails again at once comes back to the
        // DLQ, and must not be replayed twice in one call.
        let waiting = settled_depth(&channel, &dead_letter_queue).await?;
        let mut replayed = 0u32;
        for _ in 0..waiting {
            let Some(message) = get(&channel, &dead_letter_queue).await? else {
                break;
            };
            let described = describe(queue, &message);
            if !all && !wanted.contains(described.message_id.as_str()) {
                continue;
            }
            publish_confirmed(
                &publish_channel,
                &topology.exchange,
                &described.routing_key,
                &message.delivery.data,
                replay_properties(&message.delivery.properties),
            )
            .await?;
            message
                .delivery
                .ack(BasicAckOptions::default())
                .await
                .map_err(Error::amqp("basic.ack", &dead_letter_queue))?;
            replayed += 1;
        }
        Ok(replayed)
    }
    .await;
    close(&channel).await;
    close(&publish_channel).await;
    result
}

/// The ready messages of `queue`. Dead letters that an earlier `list` or `replay` held unacked are
/// requeued by the broker only after that channel closes, so an empty answer is read again for a
/// short while: `dlq list` then `dlq replay` must not find the queue empty in between.
async fn settled_depth(channel: &lapin::Channel, queue: &str) -> Result<u64> {
    for _ in 0..20 {
        let (waiting, _consumers) = queue_depth(channel, queue).await?;
        if waiting > 0 {
            return Ok(waiting);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(0)
}

/// Deletes every dead letter of `queue`. Returns how many were removed.
pub async fn purge(connection: &Connection, topology: &Topology, queue: &str) -> Result<u32> {
    let dead_letter_queue = topology.dead_letter_queue(queue);
    let channel = open(connection, &dead_letter_queue).await?;
    let result = channel
        .queue_purge(
            dead_letter_queue.as_str().into(),
            QueuePurgeOptions::default(),
        )
        .await
        .map_err(Error::amqp("queue.purge", &dead_letter_queue));
    close(&channel).await;
    result
}

/// Reads what is known about a dead letter from our headers, else from the broker's `x-death`.
fn describe(queue: &str, message: &BasicGetMessage) -> DeadLetter {
    let properties = &message.delivery.properties;
    let table = properties.headers().clone().unwrap_or_default();
    let death = headers::first_death(&table);
    let reason = headers::string(&table, REASON_HEADER)
        .or_else(|| death.and_then(|death| headers::string(death, "reason")))
        .unwrap_or_else(|| "unknown".to_owned());
    let routing_key = headers::string(&table, ORIGINAL_ROUTING_KEY_HEADER)
        .or_else(|| death.and_then(headers::death_routing_key))
        .unwrap_or_else(|| message.delivery.routing_key.as_str().to_owned());
    let failed_queue = headers::string(&table, QUEUE_HEADER)
        .or_else(|| death.and_then(|death| headers::string(death, "queue")))
        .unwrap_or_else(|| queue.to_owned());
    let death_time = death.and_then(headers::death_time_ms);
    let failures = death
        .and_then(|death| headers::integer(death, "count"))
        .or_else(|| headers::integer(&table, "x-delivery-count").map(|earlier| earlier + 1))
        .unwrap_or(1);
    DeadLetter {
        queue: failed_queue,
        message_id: properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default(),
        reason,
        routing_key,
        type_name: properties
            .kind()
            .as_ref()
            .map(|kind| kind.as_str().to_owned())
            .unwrap_or_default(),
        first_failure_ms: headers::integer(&table, FIRST_FAILURE_HEADER).or(death_time),
        last_failure_ms: headers::integer(&table, LAST_FAILURE_HEADER).or(death_time),
        failures: u32::try_from(failures).unwrap_or(u32::MAX),
        body_bytes: message.delivery.data.len() as u64,
    }
}

/// The properties for a replay: the same message id and type, without the failure bookkeeping except the
/// first failure time and the original routing key.
fn replay_properties(original: &BasicProperties) -> BasicProperties {
    let mut table = original.headers().clone().unwrap_or_default();
    let kept: std::collections::BTreeMap<_, _> = table
        .inner()
        .iter()
        .filter(|(key, _)| {
            !matches!(
                key.as_str(),
                "x-death"
                    | "x-delivery-count"
                    | "x-first-death-exchange"
                    | "x-first-death-queue"
                    | "x-first-death-reason"
                    | "x-last-death-exchange"
                    | "x-last-death-queue"
                    | "x-last-death-reason"
            ) && key.as_str() != REASON_HEADER
                && key.as_str() != QUEUE_HEADER
                && key.as_str() != LAST_FAILURE_HEADER
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    table = kept.into();
    original.clone().with_headers(table)
}

//! Names of the exchanges and queues, their idempotent declaration, and email partitioning.

use lapin::{
    Channel, ExchangeKind,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};

use crate::{Error, Result};

/// Routing key of `MembersChanged` messages.
pub const MEMBERS_CHANGED_ROUTING_KEY: &str = "members.changed";

/// How many times a quorum queue delivers a message before dead-lettering it.
///
/// Bounded redelivery: a message that keeps failing (or crashing its consumer) must end up in the DLQ
/// where an operator sees it, not loop forever. See <https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling>.
pub const DELIVERY_LIMIT: i64 = 20;

/// The names of everything this system declares on the broker.
///
/// `exchange` is the full name of the topic exchange as declared. [`Topology::new`] prepends `prefix` to
/// it, so that tests (and side-by-side deployments) with distinct prefixes share nothing on the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Full name of the durable topic exchange, e.g. `optout`.
    pub exchange: String,
    /// Prepended to every queue name: `""` in production, a unique string in tests.
    pub prefix: String,
    /// Number of `persons.dirty.{p}` partitions (4 by default).
    pub persons_partitions: u16,
}

impl Topology {
    /// A topology whose exchange is `{prefix}{exchange}` and whose queues are `{prefix}...`.
    pub fn new(exchange: &str, prefix: &str, persons_partitions: u16) -> Self {
        Self {
            exchange: format!("{prefix}{exchange}"),
            prefix: prefix.to_owned(),
            persons_partitions: persons_partitions.max(1),
        }
    }

    /// The direct exchange dead letters are routed through: `{exchange}.dlx`.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.exchange)
    }

    /// `{prefix}members.changed`.
    pub fn members_changed_queue(&self) -> String {
        format!("{}{MEMBERS_CHANGED_ROUTING_KEY}", self.prefix)
    }

    /// The queue of one partition: `{prefix}persons.dirty.{partition}`.
    pub fn persons_dirty_queue(&self, partition: u16) -> String {
        format!(
            "{}{}",
            self.prefix,
            self.persons_dirty_routing_key(partition)
        )
    }

    /// How many `persons.dirty` partitions there are.
    pub fn persons_partitions(&self) -> u16 {
        self.persons_partitions
    }

    /// Every `{prefix}persons.dirty.{p}` queue, in partition order.
    pub fn persons_dirty_queues(&self) -> Vec<String> {
        (0..self.persons_partitions)
            .map(|partition| self.persons_dirty_queue(partition))
            .collect()
    }

    /// The partition that owns `email`: a stable FNV-1a hash of the normalised (trimmed, lower-cased)
    /// address modulo the partition count, identical in every process and every release.
    pub fn partition_for(&self, email: &str) -> u16 {
        let normalized = email.trim().to_lowercase();
        let hash = fnv1a_64(normalized.as_bytes());
        // The remainder is below persons_partitions, which is a u16.
        (hash % u64::from(self.persons_partitions.max(1))) as u16
    }

    /// `persons.dirty.{partition}`.
    pub fn persons_dirty_routing_key(&self, partition: u16) -> String {
        format!("persons.dirty.{partition}")
    }

    /// `{queue}.dlq`.
    pub fn dead_letter_queue(&self, queue: &str) -> String {
        format!("{queue}.dlq")
    }

    /// Every work queue (not the DLQs), members.changed first.
    pub fn work_queues(&self) -> Vec<String> {
        let mut queues = vec![self.members_changed_queue()];
        queues.extend(self.persons_dirty_queues());
        queues
    }
}

/// FNV-1a, 64 bit: tiny, dependency-free and stable across Rust releases (unlike `DefaultHasher`).
fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Declares the whole topology. Idempotent: every service calls it at start-up, in any order.
///
/// Fails (and the broker closes `channel`) if a queue already exists with different arguments.
pub async fn declare(channel: &Channel, topology: &Topology) -> Result<()> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            topology.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("exchange.declare", &topology.exchange))?;
    let dead_letter_exchange = topology.dead_letter_exchange();
    channel
        .exchange_declare(
            dead_letter_exchange.as_str().into(),
            ExchangeKind::Direct,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("exchange.declare", &dead_letter_exchange))?;

    declare_work_queue(
        channel,
        topology,
        &topology.members_changed_queue(),
        MEMBERS_CHANGED_ROUTING_KEY,
        false,
    )
    .await?;
    for partition in 0..topology.persons_partitions {
        // Single active consumer: however many writer replicas subscribe to a partition, the broker delivers
        // to one of them at a time (the others stand by and take over on cancel or crash). Since an email
        // always hashes to the same partition, one writer owns an email at a time and two writers never race
        // on the same Salesforce record. See https://www.rabbitmq.com/docs/consumers#single-active-consumer
        declare_work_queue(
            channel,
            topology,
            &topology.persons_dirty_queue(partition),
            &topology.persons_dirty_routing_key(partition),
            true,
        )
        .await?;
    }
    Ok(())
}

async fn declare_work_queue(
    channel: &Channel,
    topology: &Topology,
    queue: &str,
    routing_key: &str,
    single_active_consumer: bool,
) -> Result<()> {
    let dead_letter_exchange = topology.dead_letter_exchange();
    let dead_letter_queue = topology.dead_letter_queue(queue);
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };

    // The DLQ has no delivery limit and no dead-letter exchange of its own: listing dead letters takes and
    // returns them, and that must never count towards dropping them.
    let mut dlq_arguments = FieldTable::default();
    dlq_arguments.insert("x-queue-type".into(), long_string("quorum"));
    channel
        .queue_declare(
            dead_letter_queue.as_str().into(),
            durable_queue,
            dlq_arguments,
        )
        .await
        .map_err(Error::amqp("queue.declare", &dead_letter_queue))?;
    channel
        .queue_bind(
            dead_letter_queue.as_str().into(),
            dead_letter_exchange.as_str().into(),
            queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("queue.bind", &dead_letter_queue))?;

    let mut arguments = FieldTable::default();
    // Quorum queues are replicated and durable, and they count deliveries, which bounds redelivery.
    arguments.insert("x-queue-type".into(), long_string("quorum"));
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        long_string(&dead_letter_exchange),
    );
    // Route broker dead letters (delivery limit reached) by queue name, so each lands in its own DLQ; the
    // original routing key stays in the `x-death` header.
    arguments.insert("x-dead-letter-routing-key".into(), long_string(queue));
    // At-least-once dead-lettering: the broker keeps a message until its DLQ confirmed it, so a poison
    // message is never lost on the way to the DLQ. It requires the reject-publish overflow mode.
    // See https://www.rabbitmq.com/docs/quorum-queues#dead-lettering
    arguments.insert(
        "x-dead-letter-strategy".into(),
        long_string("at-least-once"),
    );
    arguments.insert("x-overflow".into(), long_string("reject-publish"));
    if single_active_consumer {
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    channel
        .queue_declare(queue.into(), durable_queue, arguments)
        .await
        .map_err(Error::amqp("queue.declare", queue))?;
    channel
        .queue_bind(
            queue.into(),
            topology.exchange.as_str().into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("queue.bind", queue))?;
    Ok(())
}

/// Deletes every queue, DLQ and exchange of `topology`. Meant for tests that used a unique prefix.
pub async fn teardown(channel: &Channel, topology: &Topology) -> Result<()> {
    for queue in topology.work_queues() {
        let dead_letter_queue = topology.dead_letter_queue(&queue);
        for name in [queue, dead_letter_queue] {
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(Error::amqp("queue.delete", &name))?;
        }
    }
    for exchange in [topology.exchange.clone(), topology.dead_letter_exchange()] {
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .map_err(Error::amqp("exchange.delete", &exchange))?;
    }
    Ok(())
}

/// `(messages ready, consumers)` of `queue`, by a passive declare.
///
/// A missing queue is an error, and the broker then closes `channel`: use a channel dedicated to this.
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<(u64, u32)> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .map_err(Error::amqp("queue.declare", queue))?;
    Ok((
        u64::from(declared.message_count()),
        declared.consumer_count(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_exchange_and_queues() {
        let topology = Topology::new("optout", "t1.", 4);
        assert_eq!(topology.exchange, "t1.optout");
        assert_eq!(topology.dead_letter_exchange(), "t1.optout.dlx");
        assert_eq!(topology.members_changed_queue(), "t1.members.changed");
        assert_eq!(
            topology.persons_dirty_queues(),
            [
                "t1.persons.dirty.0",
                "t1.persons.dirty.1",
                "t1.persons.dirty.2",
                "t1.persons.dirty.3"
            ]
        );
        assert_eq!(topology.persons_dirty_routing_key(2), "persons.dirty.2");
        assert_eq!(
            topology.dead_letter_queue("t1.members.changed"),
            "t1.members.changed.dlq"
        );
    }

    #[test]
    fn partition_ignores_case_and_surrounding_spaces() {
        let topology = Topology::new("optout", "", 4);
        assert_eq!(
            topology.partition_for("  Jane.Doe@Example.COM "),
            topology.partition_for("jane.doe@example.com")
        );
    }

    #[test]
    fn partition_is_stable_across_releases() {
        // Pinned values: changing the hash would move emails between writers during a rolling deploy.
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let topology = Topology::new("optout", "", 4);
        let partitions: Vec<u16> = ["a@x.com", "b@x.com", "c@x.com", "d@x.com"]
            .iter()
            .map(|email| topology.partition_for(email))
            .collect();
        assert!(partitions.iter().all(|partition| *partition < 4));
    }

    #[test]
    fn partition_spreads_emails_over_every_partition() {
        let topology = Topology::new("optout", "", 4);
        let mut counts = [0u32; 4];
        for index in 0..1000 {
            counts[usize::from(topology.partition_for(&format!("person{index}@example.com")))] += 1;
        }
        assert!(counts.iter().all(|count| *count > 150), "{counts:?}");
    }
}

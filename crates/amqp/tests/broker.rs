//! Integration tests against the local RabbitMQ (`amqp://guest:guest@127.0.0.1:5672/%2f`, or `OPTOUT_TEST_AMQP_URL`).
//! Each test uses its own prefix, so its exchange and queues are its own, and deletes them at the end.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use lapin::{BasicProperties, Connection, options::BasicPublishOptions};
use optout_amqp::{
    ConsumeOptions, Message, Outcome, Publisher, Topology, consume, dead_letters, declare,
    queue_depth, teardown,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// A small message type of our own, so these tests do not depend on the service protos.
#[derive(Clone, PartialEq, prost::Message)]
struct Ping {
    #[prost(string, tag = "1")]
    id: String,
}

impl prost::Name for Ping {
    const NAME: &'static str = "Ping";
    const PACKAGE: &'static str = "optout.test.v1";
}

const DEADLINE: Duration = Duration::from_secs(20);

fn amqp_url() -> String {
    std::env::var("OPTOUT_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

struct Broker {
    connection: Arc<Connection>,
    topology: Topology,
}

impl Broker {
    async fn start() -> anyhow::Result<Self> {
        let connection = optout_amqp::connect(&amqp_url())
            .await
            .context("RabbitMQ must run on 127.0.0.1:5672 (guest/guest); start it with `service rabbitmq-server start`")?;
        let prefix = format!("t-{}.", uuid::Uuid::new_v4());
        let topology = Topology::new("optout", &prefix, 2);
        let channel = connection.create_channel().await?;
        declare(&channel, &topology).await?;
        Ok(Self {
            connection: Arc::new(connection),
            topology,
        })
    }

    async fn depth(&self, queue: &str) -> anyhow::Result<(u64, u32)> {
        let channel = self.connection.create_channel().await?;
        let depth = queue_depth(&channel, queue).await?;
        let _ = channel.close(200, "done".into()).await;
        Ok(depth)
    }

    async fn publish_raw(&self, routing_key: &str, body: &[u8]) -> anyhow::Result<()> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_publish(
                self.topology.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_message_id("raw-1".into()),
            )
            .await?
            .await?;
        Ok(())
    }

    /// Waits until `queue`'s dead-letter queue holds `count` messages, and lists them.
    async fn dead_letters(
        &self,
        queue: &str,
        count: usize,
    ) -> anyhow::Result<Vec<dead_letters::DeadLetter>> {
        eventually(&format!("{count} dead letters"), || async {
            Ok(
                dead_letters::list(&self.connection, &self.topology, queue, 10)
                    .await?
                    .len()
                    == count,
            )
        })
        .await?;
        Ok(dead_letters::list(&self.connection, &self.topology, queue, 10).await?)
    }

    async fn teardown(self) -> anyhow::Result<()> {
        let channel = self.connection.create_channel().await?;
        teardown(&channel, &self.topology).await?;
        Ok(())
    }
}

/// A running `consume` whose handler forwards every message to `received` and answers with `answer`.
struct Running {
    shutdown: CancellationToken,
    paused: watch::Sender<bool>,
    in_flight: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<optout_amqp::Result<()>>,
}

impl Running {
    fn start<A>(
        broker: &Broker,
        queue: &str,
        received: mpsc::UnboundedSender<Message<Ping>>,
        answer: A,
    ) -> Self
    where
        A: Fn(&Message<Ping>) -> Outcome + Send + 'static,
    {
        Self::start_with(broker, queue, received, true, answer)
    }

    /// [`Running::start`], saying whether the handler may dead-letter (`handler_dead_letters`).
    fn start_with<A>(
        broker: &Broker,
        queue: &str,
        received: mpsc::UnboundedSender<Message<Ping>>,
        handler_dead_letters: bool,
        answer: A,
    ) -> Self
    where
        A: Fn(&Message<Ping>) -> Outcome + Send + 'static,
    {
        let limits = (10, 5, Duration::from_millis(100));
        let options = (None, handler_dead_letters);
        Self::spawn(broker, queue, limits, options, move |batch| {
            let outcomes: Vec<Outcome> = batch.iter().map(&answer).collect();
            for message in batch {
                let _ = received.send(message);
            }
            outcomes
        })
    }

    /// A bulk-batching consumer of `members.changed` that sends each batch's ids, in order, to
    /// the returned receiver and acknowledges the batch.
    fn start_batches(
        broker: &Broker,
        bulk: optout_amqp::BulkBatching,
    ) -> (Self, mpsc::UnboundedReceiver<Vec<String>>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let queue = broker.topology.members_changed_queue();
        let limits = (100, 100, Duration::from_millis(50));
        let running = Self::spawn(broker, &queue, limits, (Some(bulk), true), move |batch| {
            let ids: Vec<String> = batch
                .iter()
                .map(|message| message.body.id.clone())
                .collect();
            let _ = sender.send(ids);
            vec![Outcome::Ack; batch.len()]
        });
        (running, receiver)
    }

    /// Runs `consume` on `queue` with `(prefetch, max_batch, max_wait)` and `(bulk,
    /// handler_dead_letters)`, answering each batch with `handle`.
    fn spawn<H>(
        broker: &Broker,
        queue: &str,
        (prefetch, max_batch, max_wait): (u16, usize, Duration),
        (bulk, handler_dead_letters): (Option<optout_amqp::BulkBatching>, bool),
        mut handle: H,
    ) -> Self
    where
        H: FnMut(Vec<Message<Ping>>) -> Vec<Outcome> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let (paused, paused_receiver) = watch::channel(false);
        let in_flight = Arc::new(AtomicU64::new(0));
        let options = ConsumeOptions {
            prefetch,
            max_batch,
            max_wait,
            paused: paused_receiver,
            in_flight: in_flight.clone(),
            bulk,
            handler_dead_letters,
        };
        let connection = broker.connection.clone();
        let topology = broker.topology.clone();
        let queue = queue.to_owned();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            consume(
                &connection,
                &topology,
                &queue,
                options,
                token,
                move |batch: Vec<Message<Ping>>| {
                    let outcomes = handle(batch);
                    async move { outcomes }
                },
            )
            .await
        });
        Self {
            shutdown,
            paused,
            in_flight,
            task,
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task).await???;
        assert_eq!(
            self.in_flight.load(Ordering::SeqCst),
            0,
            "every delivery was settled"
        );
        Ok(())
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn recv(
    receiver: &mut mpsc::UnboundedReceiver<Message<Ping>>,
) -> anyhow::Result<Message<Ping>> {
    tokio::time::timeout(DEADLINE, receiver.recv())
        .await
        .context("timed out waiting for a message")?
        .context("consumer stopped")
}

fn ping(id: &str) -> Ping {
    Ping { id: id.to_owned() }
}

#[tokio::test]
async fn published_messages_reach_the_consumer_with_their_properties() -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let publisher = Publisher::new(&broker.connection, broker.topology.clone()).await?;
    for index in 0..7 {
        publisher
            .publish("members.changed", &ping(&format!("m{index}")))
            .await?;
    }
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let running = Running::start(
        &broker,
        &broker.topology.members_changed_queue(),
        sender,
        |_| Outcome::Ack,
    );
    let mut ids = Vec::new();
    for _ in 0..7 {
        let message = recv(&mut receiver).await?;
        assert!(!message.message_id.is_empty());
        assert!(!message.redelivered);
        ids.push(message.body.id);
    }
    ids.sort();
    assert_eq!(ids, ["m0", "m1", "m2", "m3", "m4", "m5", "m6"]);
    let queue = broker.topology.members_changed_queue();
    eventually("the queue to drain", || async {
        Ok(broker.depth(&queue).await?.0 == 0)
    })
    .await?;
    running.stop().await?;
    broker.teardown().await
}

#[tokio::test]
async fn connections_use_small_frames_and_a_larger_message_arrives_whole() -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    assert_eq!(
        broker.connection.configuration().frame_max(),
        optout_amqp::FRAME_MAX
    );
    assert_eq!(
        broker.connection.configuration().channel_max(),
        optout_amqp::CHANNEL_MAX
    );
    let publisher = Publisher::new(&broker.connection, broker.topology.clone()).await?;
    // Six frames' worth, with no repeating pattern a frame boundary could hide a mix-up in.
    let large: String = (0..6 * optout_amqp::FRAME_MAX / 8)
        .map(|index| format!("{:07x},", index.wrapping_mul(2_654_435_761) >> 4))
        .collect();
    publisher.publish("members.changed", &ping(&large)).await?;
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let running = Running::start(
        &broker,
        &broker.topology.members_changed_queue(),
        sender,
        |_| Outcome::Ack,
    );
    let message = recv(&mut receiver).await?;
    assert_eq!(message.body.id.len(), large.len());
    assert!(message.body.id == large, "the body changed on its way");
    running.stop().await?;
    broker.teardown().await
}

#[tokio::test]
async fn an_invalid_url_is_refused_without_showing_it() {
    let error = optout_amqp::connect("amqp://guest:hunter2@127.0.0.1:notaport/%2f")
        .await
        .expect_err("not a url");
    let text = format!("{error:?} {error}");
    assert!(matches!(error, optout_amqp::Error::InvalidUrl), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn publishing_to_an_unbound_routing_key_is_an_error() -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let publisher = Publisher::new(&broker.connection, broker.topology.clone()).await?;
    let result = publisher.publish("nobody.listens", &ping("lost")).await;
    assert!(
        matches!(result, Err(optout_amqp::Error::Unroutable { .. })),
        "{result:?}"
    );
    broker.teardown().await
}

#[tokio::test]
async fn undecodable_body_lands_in_the_dead_letter_queue_with_its_reason() -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let queue = broker.topology.members_changed_queue();
    // A varint whose continuation bits never end: not protobuf.
    broker
        .publish_raw("members.changed", &[0xff, 0xff, 0xff])
        .await?;
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let running = Running::start(&broker, &queue, sender, |_| Outcome::Ack);
    let listed = broker.dead_letters(&queue, 1).await?;
    running.stop().await?;
    assert!(
        receiver.try_recv().is_err(),
        "the handler never saw the undecodable body"
    );

    let dead_letter = &listed[0];
    assert!(
        dead_letter.reason.starts_with("undecodable protobuf"),
        "{dead_letter:?}"
    );
    assert_eq!(dead_letter.routing_key, "members.changed");
    assert_eq!(dead_letter.queue, queue);
    assert_eq!(dead_letter.message_id, "raw-1");
    assert_eq!(dead_letter.body_bytes, 3);
    assert!(dead_letter.first_failure_ms.is_some());
    // Listing leaves the message where it is.
    let dead_letter_queue = broker.topology.dead_letter_queue(&queue);
    eventually("the dead letter to be back", || async {
        Ok(broker.depth(&dead_letter_queue).await?.0 == 1)
    })
    .await?;
    assert_eq!(
        dead_letters::purge(&broker.connection, &broker.topology, &queue).await?,
        1
    );
    assert_eq!(broker.depth(&dead_letter_queue).await?.0, 0);
    broker.teardown().await
}

#[tokio::test]
async fn dead_lettered_message_can_be_replayed_to_its_routing_key() -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let queue = broker.topology.members_changed_queue();
    let publisher = Publisher::new(&broker.connection, broker.topology.clone()).await?;
    publisher
        .publish("members.changed", &ping("poison"))
        .await?;
    publisher.publish("members.changed", &ping("fine")).await?;
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let running = Running::start(&broker, &queue, sender, |message| {
        if message.body.id == "poison" {
            Outcome::DeadLetter("bad member".to_owned())
        } else {
            Outcome::Ack
        }
    });
    recv(&mut receiver).await?;
    recv(&mut receiver).await?;
    running.stop().await?;

    let listed = dead_letters::list(&broker.connection, &broker.topology, &queue, 10).await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].reason, "bad member");
    assert_eq!(listed[0].type_name, "optout.test.v1.Ping");
    let unknown = dead_letters::replay(
        &broker.connection,
        &broker.topology,
        &queue,
        &["nope".to_owned()],
        false,
    )
    .await?;
    assert_eq!(unknown, 0);
    let replayed = dead_letters::replay(
        &broker.connection,
        &broker.topology,
        &queue,
        &[listed[0].message_id.clone()],
        false,
    )
    .await?;
    assert_eq!(replayed, 1);
    let dead_letter_queue = broker.topology.dead_letter_queue(&queue);
    eventually("the replay to move the message", || async {
        Ok(broker.depth(&dead_letter_queue).await?.0 == 0 && broker.depth(&queue).await?.0 == 1)
    })
    .await?;

    let (sender, mut receiver) = mpsc::unbounded_channel();
    let running = Running::start(&broker, &queue, sender, |_| Outcome::Ack);
    let message = recv(&mut receiver).await?;
    assert_eq!(message.body.id, "poison");
    assert_eq!(
        message.message_id, listed[0].message_id,
        "replay keeps the message id"
    );
    running.stop().await?;
    broker.teardown().await
}

#[tokio::test]
async fn a_consumer_that_drops_bodies_dead_letters_undecodable_ones_whole_and_requeues_a_handler_dead_letter()
-> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let queue = broker.topology.members_changed_queue();
    broker
        .publish_raw("members.changed", &[0xff, 0xff, 0xff])
        .await?;
    let publisher = Publisher::new(&broker.connection, broker.topology.clone()).await?;
    publisher
        .publish("members.changed", &ping("poison"))
        .await?;
    let (sender, mut receiver) = mpsc::unbounded_channel();
    // The body was dropped once decoded, so the consumer cannot copy it to the dead-letter
    // queue: it must requeue the message rather than dead-letter an empty body or lose it.
    let running = Running::start_with(&broker, &queue, sender, false, |message| {
        if message.redelivered {
            Outcome::Ack
        } else {
            Outcome::DeadLetter("rejected by the handler".to_owned())
        }
    });
    let first = recv(&mut receiver).await?;
    let second = recv(&mut receiver).await?;
    assert_eq!(
        (first.body.id.as_str(), first.redelivered),
        ("poison", false)
    );
    assert_eq!(
        (second.body.id.as_str(), second.redelivered),
        ("poison", true)
    );
    let listed = broker.dead_letters(&queue, 1).await?;
    running.stop().await?;
    assert!(
        listed[0].reason.starts_with("undecodable protobuf"),
        "{listed:?}"
    );
    assert_eq!(listed[0].body_bytes, 3, "dead-lettered whole");
    assert_eq!(broker.depth(&queue).await?.0, 0);
    broker.teardown().await
}

#[tokio::test]
async fn retried_message_is_requeued_and_redelivered() -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let queue = broker.topology.members_changed_queue();
    let publisher = Publisher::new(&broker.connection, broker.topology.clone()).await?;
    publisher.publish("members.changed", &ping("flaky")).await?;
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let running = Running::start(&broker, &queue, sender, |message| {
        if message.redelivered {
            Outcome::Ack
        } else {
            Outcome::Retry("database unavailable".to_owned())
        }
    });
    let first = recv(&mut receiver).await?;
    let second = recv(&mut receiver).await?;
    assert_eq!(first.body.id, "flaky");
    assert!(!first.redelivered);
    assert_eq!(second.body.id, "flaky");
    assert!(second.redelivered);
    eventually("the queue to drain", || async {
        Ok(broker.depth(&queue).await?.0 == 0)
    })
    .await?;
    running.stop().await?;
    let dead_letter_queue = broker.topology.dead_letter_queue(&queue);
    assert_eq!(broker.depth(&dead_letter_queue).await?.0, 0);
    broker.teardown().await
}

#[tokio::test]
async fn paused_consumer_takes_no_deliveries_until_resumed() -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let queue = broker.topology.members_changed_queue();
    let publisher = Publisher::new(&broker.connection, broker.topology.clone()).await?;
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let running = Running::start(&broker, &queue, sender, |_| Outcome::Ack);
    publisher
        .publish("members.changed", &ping("before"))
        .await?;
    assert_eq!(recv(&mut receiver).await?.body.id, "before");

    running.paused.send(true)?;
    eventually("the consumer to be cancelled", || async {
        Ok(broker.depth(&queue).await?.1 == 0)
    })
    .await?;
    publisher
        .publish("members.changed", &ping("while paused"))
        .await?;
    eventually("the message to wait in the queue", || async {
        Ok(broker.depth(&queue).await? == (1, 0))
    })
    .await?;
    assert!(
        receiver.try_recv().is_err(),
        "nothing delivered while paused"
    );

    running.paused.send(false)?;
    assert_eq!(recv(&mut receiver).await?.body.id, "while paused");
    running.stop().await?;
    broker.teardown().await
}

#[tokio::test]
async fn single_active_consumer_gives_a_partition_to_one_consumer_at_a_time() -> anyhow::Result<()>
{
    let broker = Broker::start().await?;
    let partition_queue = broker.topology.persons_dirty_queue(0);
    let routing_key = broker.topology.persons_dirty_routing_key(0);
    let publisher = Publisher::new(&broker.connection, broker.topology.clone()).await?;
    let (sender, mut receiver) = mpsc::unbounded_channel::<(u8, Message<Ping>)>();
    let start = |consumer: u8| {
        let (forward, mut forwarded) = mpsc::unbounded_channel();
        let sender = sender.clone();
        tokio::spawn(async move {
            while let Some(message) = forwarded.recv().await {
                let _ = sender.send((consumer, message));
            }
        });
        Running::start(&broker, &partition_queue, forward, |_| Outcome::Ack)
    };
    let first = start(1);
    eventually("the first consumer", || async {
        Ok(broker.depth(&partition_queue).await?.1 == 1)
    })
    .await?;
    let second = start(2);
    // The broker counts only the active consumer of a single-active-consumer queue, so the standby cannot be
    // awaited this way; publishing in two rounds gives it ample time to register before the second round.
    let mut consumers = Vec::new();
    for round in 0..2 {
        for index in 0..10 {
            publisher
                .publish(&routing_key, &ping(&format!("p{round}-{index}")))
                .await?;
        }
        for _ in 0..10 {
            let (consumer, _message) = tokio::time::timeout(DEADLINE, receiver.recv())
                .await?
                .context("stopped")?;
            consumers.push(consumer);
        }
    }
    assert_eq!(
        broker.depth(&partition_queue).await?.1,
        1,
        "one active consumer"
    );
    let active = consumers[0];
    assert!(
        consumers.iter().all(|consumer| *consumer == active),
        "one consumer took all: {consumers:?}"
    );

    // When the active consumer goes away, the standby takes over.
    let (active_running, standby_running) = if active == 1 {
        (first, second)
    } else {
        (second, first)
    };
    active_running.stop().await?;
    publisher
        .publish(&routing_key, &ping("after failover"))
        .await?;
    let (consumer, message) = tokio::time::timeout(DEADLINE, receiver.recv())
        .await?
        .context("stopped")?;
    assert_ne!(consumer, active);
    assert_eq!(message.body.id, "after failover");
    standby_running.stop().await?;
    broker.teardown().await
}

#[tokio::test]
async fn consumer_span_continues_the_trace_of_the_publisher_and_is_counted() -> anyhow::Result<()> {
    use tracing::Instrument as _;

    let _telemetry = optout_telemetry::init("amqp-test");
    let broker = Broker::start().await?;
    let publisher = Publisher::new(&broker.connection, broker.topology.clone()).await?;
    let sync_run = tracing::info_span!("sync run");
    let published_trace = async {
        publisher
            .publish("members.changed", &ping("traced"))
            .await?;
        anyhow::Ok(optout_telemetry::current_trace_id())
    }
    .instrument(sync_run)
    .await?
    .context("the publishing span has a trace id")?;

    let metrics = optout_amqp::ConsumerMetrics::default();
    let mut registry = optout_telemetry::metrics::Registry::default();
    metrics.register(&mut registry);
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let (_paused, paused_receiver) = watch::channel(false);
    let options = ConsumeOptions {
        prefetch: 10,
        max_batch: 5,
        max_wait: Duration::from_millis(50),
        paused: paused_receiver,
        in_flight: Arc::new(AtomicU64::new(0)),
        bulk: None,
        handler_dead_letters: true,
    };
    let connection = broker.connection.clone();
    let topology = broker.topology.clone();
    let queue = topology.members_changed_queue();
    let token = shutdown.clone();
    let consumer_metrics = metrics.clone();
    let task = tokio::spawn(async move {
        optout_amqp::consume_with_metrics(
            &connection,
            &topology,
            &queue,
            options,
            consumer_metrics,
            token,
            move |batch: Vec<Message<Ping>>| {
                let _ = sender.send((batch.len(), optout_telemetry::current_trace_id()));
                async move { vec![Outcome::Ack; batch.len()] }
            },
        )
        .await
    });
    let (count, consumer_trace) = tokio::time::timeout(DEADLINE, receiver.recv())
        .await
        .context("timed out waiting for the message")?
        .context("consumer stopped")?;
    assert_eq!(count, 1);
    assert_eq!(consumer_trace.as_deref(), Some(published_trace.as_str()));
    shutdown.cancel();
    task.await??;

    let mut text = String::new();
    optout_telemetry::metrics::prometheus_client::encoding::text::encode(&mut text, &registry)?;
    let queue = broker.topology.members_changed_queue();
    let acked = optout_telemetry::metrics::sample(
        &text,
        "optout_messages_settled_total",
        &[("queue", queue.as_str()), ("outcome", "ack")],
    );
    assert_eq!(acked, Some(1.0), "{text}");
    let lag = optout_telemetry::metrics::sample(
        &text,
        "optout_queue_lag_seconds_count",
        &[("queue", queue.as_str())],
    );
    assert_eq!(lag, Some(1.0), "{text}");
    broker.teardown().await
}

/// Publishes `ping(id)`, with the urgent header when asked.
async fn publish_ping(publisher: &Publisher, id: &str, urgent: bool) -> anyhow::Result<()> {
    let mut headers = lapin::types::FieldTable::default();
    if urgent {
        headers.insert(
            optout_amqp::URGENT_HEADER.into(),
            lapin::types::AMQPValue::Boolean(true),
        );
    }
    publisher
        .publish_typed("members.changed", "optout.test.v1.Ping", &ping(id), headers)
        .await?;
    Ok(())
}

#[tokio::test]
async fn bulk_batching_gathers_a_stream_and_an_urgent_message_closes_its_batch_early()
-> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let publisher = Publisher::new(&broker.connection, broker.topology.clone()).await?;
    // Generous, so a loaded machine never splits the stream below by accident.
    let (running, mut receiver) = Running::start_batches(
        &broker,
        optout_amqp::BulkBatching {
            idle: Duration::from_secs(1),
            max_wait: Duration::from_secs(20),
        },
    );
    // A sync's stream, a message every 20 ms for 300 ms: far longer than `max_wait`, yet one batch.
    for index in 0..15 {
        publish_ping(&publisher, &format!("s{index}"), false).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let batch = next_batch(&mut receiver).await?;
    assert_eq!(batch.len(), 15, "the stream was split: {batch:?}");

    // An urgent message in a stream of others: its batch closes about `max_wait` after it, while
    // the stream goes on for 2 s.
    publish_ping(&publisher, "urgent", true).await?;
    for index in 0..40 {
        publish_ping(&publisher, &format!("t{index}"), false).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = next_batch(&mut receiver).await?;
    assert_eq!(first.first().map(String::as_str), Some("urgent"));
    assert!(
        first.len() < 30,
        "the urgent message waited for the stream: {first:?}"
    );
    let mut seen = first.len();
    while seen < 41 {
        seen += next_batch(&mut receiver).await?.len();
    }
    assert_eq!(seen, 41);
    running.stop().await?;
    broker.teardown().await
}

/// Publishes `ping(id)` as part of a stream a flush will close.
async fn publish_stream_ping(publisher: &Publisher, id: &str) -> anyhow::Result<()> {
    publisher
        .publish_typed(
            "members.changed",
            "optout.test.v1.Ping",
            &ping(id),
            optout_amqp::stream_headers(),
        )
        .await?;
    Ok(())
}

/// Publishes `ping(id)` with the flush header.
async fn publish_flush(publisher: &Publisher, id: &str) -> anyhow::Result<()> {
    publisher
        .publish_typed(
            "members.changed",
            "optout.test.v1.Ping",
            &ping(id),
            optout_amqp::flush_headers(),
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_flush_closes_a_bulk_batch_at_once() -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let publisher = Publisher::new(&broker.connection, broker.topology.clone()).await?;
    // Windows far beyond the test's deadline: only the flush can close these batches in time.
    let (running, mut receiver) = Running::start_batches(
        &broker,
        optout_amqp::BulkBatching {
            idle: DEADLINE * 4,
            max_wait: DEADLINE * 8,
        },
    );
    for index in 0..5 {
        publish_ping(&publisher, &format!("s{index}"), false).await?;
    }
    publish_flush(&publisher, "end1").await?;
    // The next stream starts a new batch, and a flush alone is a batch of its own.
    publish_ping(&publisher, "t0", false).await?;
    publish_flush(&publisher, "end2").await?;
    publish_flush(&publisher, "end3").await?;
    assert_eq!(
        next_batch(&mut receiver).await?,
        ["s0", "s1", "s2", "s3", "s4", "end1"]
    );
    assert_eq!(next_batch(&mut receiver).await?, ["t0", "end2"]);
    assert_eq!(next_batch(&mut receiver).await?, ["end3"]);
    running.stop().await?;
    broker.teardown().await
}

#[tokio::test]
async fn a_stream_batch_waits_past_pauses_for_its_flush() -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let publisher = Publisher::new(&broker.connection, broker.topology.clone()).await?;
    // A short idle window, which the pauses below outlast; a longest wait beyond the deadline.
    let (running, mut receiver) = Running::start_batches(
        &broker,
        optout_amqp::BulkBatching {
            idle: Duration::from_millis(100),
            max_wait: DEADLINE * 8,
        },
    );
    // A stream with pauses of three idle windows: one batch, closed by its flush.
    for index in 0..3 {
        publish_stream_ping(&publisher, &format!("s{index}")).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    publish_flush(&publisher, "end").await?;
    assert_eq!(next_batch(&mut receiver).await?, ["s0", "s1", "s2", "end"]);
    running.stop().await?;
    broker.teardown().await
}

async fn next_batch(
    receiver: &mut mpsc::UnboundedReceiver<Vec<String>>,
) -> anyhow::Result<Vec<String>> {
    tokio::time::timeout(DEADLINE, receiver.recv())
        .await
        .context("timed out waiting for a batch")?
        .context("consumer stopped")
}

#[tokio::test]
async fn an_incoming_handler_takes_each_message_as_it_arrives_and_what_it_leaves_is_requeued()
-> anyhow::Result<()> {
    use std::sync::atomic::AtomicUsize;

    let broker = Broker::start().await?;
    let publisher = Publisher::new(&broker.connection, broker.topology.clone()).await?;
    let (seen, mut seen_receiver) = mpsc::unbounded_channel::<(usize, String)>();
    let batches = Arc::new(AtomicUsize::new(0));
    let shutdown = CancellationToken::new();
    let in_flight = Arc::new(AtomicU64::new(0));
    let options = ConsumeOptions {
        prefetch: 10,
        max_batch: 10,
        max_wait: DEADLINE * 4,
        paused: watch::channel(false).1,
        in_flight: in_flight.clone(),
        // Windows far beyond the test's deadline: only a flush closes a batch in time.
        bulk: Some(optout_amqp::BulkBatching {
            idle: DEADLINE * 4,
            max_wait: DEADLINE * 8,
        }),
        handler_dead_letters: false,
    };
    let connection = broker.connection.clone();
    let topology = broker.topology.clone();
    let queue = topology.members_changed_queue();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        optout_amqp::consume_incoming(
            &connection,
            &topology,
            &queue,
            options,
            optout_amqp::ConsumerMetrics::default(),
            token,
            move |mut incoming: optout_amqp::Incoming<Ping>| {
                let batch = batches.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                async move {
                    let mut outcomes = Vec::new();
                    while let Some(message) = incoming.next().await {
                        let id = message.body.id;
                        outcomes.push(Outcome::Ack);
                        let leave = id == "leave";
                        let _ = seen.send((batch, id));
                        if leave {
                            // Returns before its batch closed, leaving what else it holds.
                            break;
                        }
                    }
                    outcomes
                }
            },
        )
        .await
    });
    let mut next_seen = async || {
        tokio::time::timeout(DEADLINE, seen_receiver.recv())
            .await
            .context("timed out waiting for the handler to see a message")?
            .context("consumer stopped")
    };

    // Each message reaches the handler while its batch is still open: the next one is published
    // only once the handler saw the previous.
    publish_stream_ping(&publisher, "s0").await?;
    assert_eq!(next_seen().await?, (0, "s0".to_owned()));
    publish_stream_ping(&publisher, "s1").await?;
    assert_eq!(next_seen().await?, (0, "s1".to_owned()));
    publish_flush(&publisher, "end").await?;
    assert_eq!(next_seen().await?, (0, "end".to_owned()));

    // A handler that returns early closes its batch; a message it did not read is requeued and
    // comes back in a later batch, whether it reached the batch or not.
    publish_stream_ping(&publisher, "leave").await?;
    publish_flush(&publisher, "after").await?;
    assert_eq!(next_seen().await?, (1, "leave".to_owned()));
    let (batch, id) = next_seen().await?;
    assert_eq!(id, "after");
    assert!(
        batch >= 2,
        "the message the handler left was answered in its batch"
    );

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, task).await???;
    assert_eq!(
        in_flight.load(Ordering::SeqCst),
        0,
        "every delivery was settled"
    );
    let channel = broker.connection.create_channel().await?;
    let queue = broker.topology.members_changed_queue();
    assert_eq!(
        queue_depth(&channel, &queue).await?.0,
        0,
        "every message was acknowledged"
    );
    broker.teardown().await
}

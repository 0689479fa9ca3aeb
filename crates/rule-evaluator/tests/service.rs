//! The evaluator run in-process against the local PostgreSQL and RabbitMQ, each test with its own schema and
//! queue prefix: messages go in on `members.changed`, decisions come out over gRPC and `persons.dirty`.

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use optout_amqp::{
    ConsumeOptions, Message, Outcome, Publisher, Topology,
    lapin::{Connection, types::FieldTable},
};
use optout_proto::{
    admin::v1::{
        GetStatusRequest, ListDeadLettersRequest, PauseRequest, PurgeDeadLettersRequest,
        ReplayDeadLettersRequest, ResumeRequest, TriggerSyncRequest, admin_client::AdminClient,
    },
    evaluator::v1::{
        AckOptInRequest, DecideRequest, Decision, ExplainRequest, PersonDecision,
        decisions_client::DecisionsClient,
    },
    queue::v1::{
        FirstSyncMarker, MemberSnapshot, MemberStatus, MembersChanged, PersonsDirty, Source,
        SyncRunDone, first_sync_marker,
    },
};
use optout_rule_evaluator::Config;
use sqlx::{AssertSqlSafe, Connection as _};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tonic::{
    Request,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const TOKEN: &str = "test-admin-token";
const DEADLINE: Duration = Duration::from_secs(30);

/// One test's broker objects and database schema, shared by the evaluators it starts.
struct World {
    schema: String,
    prefix: String,
    topology: Topology,
    connection: Connection,
    publisher: Publisher,
    dirty: BTreeSet<String>,
    dirty_messages: usize,
    /// Per queue, the emails received on it so far.
    dirty_by_queue: HashMap<String, BTreeSet<String>>,
    /// Each flush received: its queue and the emails that queue had delivered before it.
    flushes: Vec<(String, BTreeSet<String>)>,
    /// The emails received in messages marked as part of a stream a flush will close.
    streamed: BTreeSet<String>,
    dirty_receiver: mpsc::UnboundedReceiver<(String, PersonsDirty, FieldTable)>,
    consumers: CancellationToken,
    connection_for_consumers: Arc<Connection>,
}

/// A running evaluator.
struct Evaluator {
    shutdown: CancellationToken,
    task: JoinHandle<optout_rule_evaluator::Result<()>>,
    channel: Channel,
}

impl World {
    async fn new() -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("t-{id}.");
        let topology = Topology::new("optout", &prefix, 4);
        let connection = optout_amqp::connect(AMQP_URL)
            .await
            .context("RabbitMQ must run on 127.0.0.1:5672 (guest/guest)")?;
        let channel = connection.create_channel().await?;
        optout_amqp::declare(&channel, &topology).await?;
        let publisher = Publisher::new(&connection, topology.clone()).await?;
        // Single-active-consumer quorum queues refuse basic.get, so the test consumes them like a writer would.
        let connection_for_consumers = Arc::new(optout_amqp::connect(AMQP_URL).await?);
        let consumers = CancellationToken::new();
        let (dirty_sender, dirty_receiver) = mpsc::unbounded_channel();
        for queue in topology.persons_dirty_queues() {
            let connection = connection_for_consumers.clone();
            let topology = topology.clone();
            let sender = dirty_sender.clone();
            let stop = consumers.clone();
            let options = ConsumeOptions {
                prefetch: 10,
                max_batch: 10,
                max_wait: Duration::from_millis(10),
                paused: watch::channel(false).1,
                in_flight: Arc::default(),
                bulk: None,
                handler_dead_letters: true,
            };
            tokio::spawn(async move {
                let name = queue.clone();
                optout_amqp::consume(
                    &connection,
                    &topology,
                    &queue,
                    options,
                    stop,
                    move |batch: Vec<Message<PersonsDirty>>| {
                        let outcomes = vec![Outcome::Ack; batch.len()];
                        for message in batch {
                            let _ = sender.send((name.clone(), message.body, message.headers));
                        }
                        async move { outcomes }
                    },
                )
                .await
            });
        }
        Ok(Self {
            schema: format!("t_{id}"),
            prefix,
            topology,
            connection,
            publisher,
            dirty: BTreeSet::new(),
            dirty_messages: 0,
            dirty_by_queue: HashMap::new(),
            flushes: Vec::new(),
            streamed: BTreeSet::new(),
            dirty_receiver,
            consumers,
            connection_for_consumers,
        })
    }

    async fn start(&self) -> anyhow::Result<Evaluator> {
        let config = optout_rule_evaluator::Config::try_parse_from_args([
            "--admin-token",
            TOKEN,
            "--queue-prefix",
            &self.prefix,
            "--database-schema",
            &self.schema,
            "--database-url",
            DATABASE_URL,
            "--amqp-url",
            AMQP_URL,
            "--max-wait-ms",
            "20",
        ])?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(optout_rule_evaluator::serve(
            config,
            listener,
            shutdown.clone(),
        ));
        let channel = Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy();
        let evaluator = Evaluator {
            shutdown,
            task,
            channel,
        };
        evaluator.wait_serving().await?;
        Ok(evaluator)
    }

    async fn publish(&self, message: &MembersChanged) -> anyhow::Result<()> {
        self.publisher
            .publish_typed(
                "members.changed",
                "optout.queue.v1.MembersChanged",
                message,
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Publishes a first-sync marker the way the fetcher does (AMQP type `optout.queue.v1.FirstSyncMarker`).
    async fn publish_marker(
        &self,
        run_id: &str,
        run_started: i64,
        marker: first_sync_marker::Marker,
    ) -> anyhow::Result<()> {
        let message = FirstSyncMarker {
            run_id: run_id.to_owned(),
            run_started_at: Some(prost_types::Timestamp {
                seconds: run_started,
                nanos: 0,
            }),
            marker: Some(marker),
        };
        self.publisher.publish("members.changed", &message).await?;
        Ok(())
    }

    /// Takes every `PersonsDirty` received so far into `dirty`, and every flush into `flushes`.
    fn drain_dirty(&mut self) -> anyhow::Result<()> {
        while let Ok((queue, dirty, headers)) = self.dirty_receiver.try_recv() {
            let seen = self.dirty_by_queue.entry(queue.clone()).or_default();
            if optout_amqp::is_stream(&headers) {
                self.streamed.extend(dirty.emails.iter().cloned());
            }
            if optout_amqp::is_flush(&headers) {
                assert!(dirty.emails.is_empty(), "a flush names no email: {dirty:?}");
                self.flushes.push((queue, seen.clone()));
                continue;
            }
            seen.extend(dirty.emails.iter().cloned());
            for email in &dirty.emails {
                let partition = self.topology.partition_for(email);
                assert_eq!(
                    self.topology.persons_dirty_queue(partition),
                    queue,
                    "{email} on its partition"
                );
            }
            self.dirty.extend(dirty.emails);
            self.dirty_messages += 1;
        }
        Ok(())
    }

    /// Waits until `count` flushes came in.
    async fn wait_flushes(&mut self, count: usize) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.flushes.len() < count {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "timed out waiting for {count} flushes, got {:?}",
                    self.flushes
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.drain_dirty()?;
        }
        Ok(())
    }

    /// Asserts that every flush came after each of `emails` on its queue.
    fn assert_flushed_after(&self, emails: &[&str]) {
        for (queue, seen_before) in &self.flushes {
            for email in emails {
                let partition = self.topology.partition_for(email);
                if &self.topology.persons_dirty_queue(partition) == queue {
                    assert!(
                        seen_before.contains(*email),
                        "{queue}: the flush overtook {email}"
                    );
                }
            }
        }
    }

    async fn wait_dirty(&mut self, email: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !self.dirty.contains(email) {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "timed out waiting for persons.dirty of {email}, got {:?}",
                    self.dirty
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.drain_dirty()?;
        }
        Ok(())
    }

    async fn teardown(self, evaluators: Vec<Evaluator>) -> anyhow::Result<()> {
        for evaluator in evaluators {
            evaluator.stop().await?;
        }
        self.consumers.cancel();
        let _ = &self.connection_for_consumers;
        let channel = self.connection.create_channel().await?;
        optout_amqp::teardown(&channel, &self.topology).await?;
        let mut database = sqlx::PgConnection::connect(DATABASE_URL).await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            r#"DROP SCHEMA IF EXISTS "{}_evaluator" CASCADE"#,
            self.schema
        )))
        .execute(&mut database)
        .await?;
        Ok(())
    }
}

trait ParseArgs: Sized {
    fn try_parse_from_args<const N: usize>(args: [&str; N]) -> anyhow::Result<Self>;
}

impl ParseArgs for Config {
    fn try_parse_from_args<const N: usize>(args: [&str; N]) -> anyhow::Result<Self> {
        use clap::Parser;
        Ok(Config::try_parse_from(
            std::iter::once("optout-rule-evaluator").chain(args),
        )?)
    }
}

fn authorized<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("valid header"),
    );
    request
}

impl Evaluator {
    async fn wait_serving(&self) -> anyhow::Result<()> {
        eventually("health SERVING", || async {
            let mut health = HealthClient::new(self.channel.clone());
            Ok(
                match health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                {
                    Ok(response) => response.into_inner().status == ServingStatus::Serving as i32,
                    Err(_) => false,
                },
            )
        })
        .await
    }

    async fn decide(&self, email: &str) -> anyhow::Result<PersonDecision> {
        let mut client = DecisionsClient::new(self.channel.clone());
        let response = client
            .decide(authorized(DecideRequest {
                emails: vec![email.to_owned()],
            }))
            .await?;
        response
            .into_inner()
            .decisions
            .pop()
            .context("one decision")
    }

    async fn wait_decision(
        &self,
        email: &str,
        decision: Decision,
    ) -> anyhow::Result<PersonDecision> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let current = self.decide(email).await?;
            if current.decision == decision as i32 {
                return Ok(current);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("timed out waiting for {decision:?} of {email}, last {current:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn counters(&self) -> anyhow::Result<HashMap<String, i64>> {
        let mut admin = AdminClient::new(self.channel.clone());
        Ok(admin
            .get_status(authorized(GetStatusRequest {}))
            .await?
            .into_inner()
            .counters)
    }

    async fn wait_processed(&self, at_least: i64) -> anyhow::Result<()> {
        eventually("messages processed", || async {
            Ok(self
                .counters()
                .await?
                .get("messages_processed")
                .copied()
                .unwrap_or(0)
                >= at_least)
        })
        .await
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task).await???;
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

fn changed(
    audience_id: &str,
    first_sync: bool,
    members: &[(&str, MemberStatus, i64)],
) -> MembersChanged {
    MembersChanged {
        audience_id: audience_id.to_owned(),
        source: Source::Poll as i32,
        members: members
            .iter()
            .map(|(email, status, seconds)| MemberSnapshot {
                email: (*email).to_owned(),
                status: *status as i32,
                last_changed: Some(prost_types::Timestamp {
                    seconds: *seconds,
                    nanos: 0,
                }),
            })
            .collect(),
        first_sync,
        run_id: "run-1".to_owned(),
        page: 0,
    }
}

/// Page `page` of `audience_id`'s first sync in `run_id`, as the fetcher publishes it.
fn first_sync_page(
    audience_id: &str,
    run_id: &str,
    page: u32,
    members: &[(&str, MemberStatus, i64)],
) -> MembersChanged {
    MembersChanged {
        run_id: run_id.to_owned(),
        page,
        ..changed(audience_id, true, members)
    }
}

fn announced(audience_ids: &[&str]) -> first_sync_marker::Marker {
    first_sync_marker::Marker::Announced(first_sync_marker::Announced {
        audience_ids: audience_ids.iter().map(|id| (*id).to_owned()).collect(),
    })
}

fn started(audience_id: &str) -> first_sync_marker::Marker {
    first_sync_marker::Marker::Started(first_sync_marker::Started {
        audience_id: audience_id.to_owned(),
    })
}

fn done(audience_id: &str, pages: u32) -> first_sync_marker::Marker {
    first_sync_marker::Marker::Done(first_sync_marker::Done {
        audience_id: audience_id.to_owned(),
        pages,
    })
}

const T1: i64 = 1_700_000_000;
const T2: i64 = T1 + 60;
const T3: i64 = T1 + 120;

#[tokio::test]
async fn person_unsubscribed_everywhere_is_opted_out_and_marked_dirty() -> anyhow::Result<()> {
    let mut world = World::new().await?;
    let evaluator = world.start().await?;

    world
        .publish(&changed(
            "aud1",
            true,
            &[(" Jane.Doe@Example.com", MemberStatus::Unsubscribed, T1)],
        ))
        .await?;
    world
        .publish(&changed(
            "aud2",
            true,
            &[("jane.doe@example.com", MemberStatus::Unsubscribed, T1)],
        ))
        .await?;
    world.wait_dirty("jane.doe@example.com").await?;
    evaluator.wait_processed(2).await?;
    let decision = evaluator
        .wait_decision("JANE.DOE@example.com ", Decision::OptOut)
        .await?;
    assert_eq!(decision.email, "jane.doe@example.com");
    assert!(decision.version >= 1);
    assert_eq!(decision.opt_in_evidence_id, 0);
    assert_eq!(decision.rule, "unsubscribed in every audience in scope");

    let unknown = evaluator.decide("nobody@example.com").await?;
    assert_eq!(
        (unknown.decision, unknown.version),
        (Decision::NoChange as i32, 0)
    );

    let counters = evaluator.counters().await?;
    assert!(counters["decisions_opt_out"] >= 1, "{counters:?}");
    assert!(counters["dirty_published"] >= 1, "{counters:?}");

    // Calls without the token are refused; health needs none.
    let mut client = DecisionsClient::new(evaluator.channel.clone());
    let refused = client.decide(DecideRequest { emails: vec![] }).await;
    assert_eq!(
        refused.err().map(|status| status.code()),
        Some(tonic::Code::Unauthenticated)
    );

    world.teardown(vec![evaluator]).await
}

#[tokio::test]
async fn first_sync_opt_outs_wait_until_every_audience_is_read() -> anyhow::Result<()> {
    let mut world = World::new().await?;
    let evaluator = world.start().await?;
    // First sync of two audiences. Audience 1's first page has both people unsubscribed; audience 2
    // has one of them subscribed: without the hold, that person would be opted out for a moment,
    // the box checked, and the later subscribed member (a baseline, no evidence) could not undo it.
    world
        .publish_marker("run-1", T1, announced(&["aud1", "aud2"]))
        .await?;
    world.publish_marker("run-1", T1, started("aud1")).await?;
    world
        .publish(&first_sync_page(
            "aud1",
            "run-1",
            1,
            &[
                ("both@example.com", MemberStatus::Unsubscribed, T1),
                ("split@example.com", MemberStatus::Unsubscribed, T1),
            ],
        ))
        .await?;
    evaluator.wait_processed(1).await?;
    let counters = evaluator.counters().await?;
    assert_eq!(counters["held_first_sync_opt_outs"], 2, "{counters:?}");
    let mut admin = AdminClient::new(evaluator.channel.clone());
    let status = admin
        .get_status(authorized(GetStatusRequest {}))
        .await?
        .into_inner();
    assert!(status.busy, "held opt-outs are work in progress");

    // Audience 1 says it had two pages, but its second is still on its way; audience 2 is read
    // completely. Audience 1 stays pending, so nothing goes.
    world.publish_marker("run-1", T1, done("aud1", 2)).await?;
    world.publish_marker("run-1", T1, started("aud2")).await?;
    world
        .publish(&first_sync_page(
            "aud2",
            "run-1",
            1,
            &[("split@example.com", MemberStatus::Subscribed, T1)],
        ))
        .await?;
    world.publish_marker("run-1", T1, done("aud2", 1)).await?;
    evaluator.wait_processed(2).await?;
    eventually("audience 2 complete, audience 1 pending", || async {
        let counters = evaluator.counters().await?;
        Ok(counters["first_sync_markers"] == 5 && counters["first_sync_audiences_pending"] == 1)
    })
    .await?;
    // Several release checks (twice a second) must not publish while a counted page is missing.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    world.drain_dirty()?;
    assert!(
        world.dirty.is_empty(),
        "published while a page was missing: {:?}",
        world.dirty
    );
    // Both stay held: whether split@ is still opted out is judged at release.
    assert_eq!(evaluator.counters().await?["held_first_sync_opt_outs"], 2);

    // The last page arrives: released at once, not after a timer.
    let last_page_sent = tokio::time::Instant::now();
    world
        .publish(&first_sync_page(
            "aud1",
            "run-1",
            2,
            &[("late@example.com", MemberStatus::Unsubscribed, T1)],
        ))
        .await?;
    loop {
        world.drain_dirty()?;
        if world.dirty.contains("both@example.com") && world.dirty.contains("late@example.com") {
            break;
        }
        if last_page_sent.elapsed() > Duration::from_secs(1) {
            bail!(
                "held opt-outs not released within a second of the last page: {:?}",
                world.dirty
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually("nothing held or pending", || async {
        let counters = evaluator.counters().await?;
        Ok(counters["held_first_sync_opt_outs"] == 0
            && counters["first_sync_audiences_pending"] == 0)
    })
    .await?;
    // The release is one burst, closed by a flush on every partition.
    world
        .wait_flushes(world.topology.persons_dirty_queues().len())
        .await?;
    world.assert_flushed_after(&["both@example.com", "late@example.com"]);
    assert!(
        world.streamed.contains("both@example.com") && world.streamed.contains("late@example.com"),
        "the release is marked as a stream: {:?}",
        world.streamed
    );
    world.drain_dirty()?;
    assert!(
        !world.dirty.contains("split@example.com"),
        "a person subscribed in another audience was published: {:?}",
        world.dirty
    );
    assert_eq!(
        evaluator.decide("split@example.com").await?.decision,
        Decision::OptIn as i32
    );
    let counters = evaluator.counters().await?;
    assert_eq!(counters["messages_dead_lettered"], 0, "{counters:?}");
    assert!(
        !admin
            .get_status(authorized(GetStatusRequest {}))
            .await?
            .into_inner()
            .busy
    );

    // A late announcement (another replica's run) does not re-open a completed audience, and after
    // the first sync an opt-out is published at once.
    world
        .publish_marker("run-0", T1 - 60, announced(&["aud1", "aud2"]))
        .await?;
    world
        .publish(&changed(
            "aud2",
            false,
            &[("split@example.com", MemberStatus::Unsubscribed, T2)],
        ))
        .await?;
    world.wait_dirty("split@example.com").await?;
    eventually("the late announcement recorded", || async {
        Ok(evaluator.counters().await?["first_sync_markers"] == 6)
    })
    .await?;
    let counters = evaluator.counters().await?;
    assert_eq!(counters["held_first_sync_opt_outs"], 0, "{counters:?}");
    assert_eq!(counters["first_sync_audiences_pending"], 0, "{counters:?}");
    world.teardown(vec![evaluator]).await
}

#[tokio::test]
async fn first_sync_paged_again_after_a_crash_completes_on_the_new_runs_markers()
-> anyhow::Result<()> {
    let mut world = World::new().await?;
    let evaluator = world.start().await?;
    // Run 1 starts audience 1 and dies after its first page: no done marker ever comes.
    world
        .publish_marker("run-1", T1, announced(&["aud1"]))
        .await?;
    world.publish_marker("run-1", T1, started("aud1")).await?;
    world
        .publish(&first_sync_page(
            "aud1",
            "run-1",
            1,
            &[("crash@example.com", MemberStatus::Unsubscribed, T1)],
        ))
        .await?;
    evaluator.wait_processed(1).await?;
    // Run 2 pages it again from the start; its pages arrive twice (a redelivery) and run 1's stale
    // done marker comes late: neither may complete the audience early or late.
    world
        .publish_marker("run-2", T2, announced(&["aud1"]))
        .await?;
    world.publish_marker("run-2", T2, started("aud1")).await?;
    let page_one = first_sync_page(
        "aud1",
        "run-2",
        1,
        &[("crash@example.com", MemberStatus::Unsubscribed, T1)],
    );
    world.publish(&page_one).await?;
    world.publish(&page_one).await?;
    world.publish_marker("run-1", T1, done("aud1", 1)).await?;
    world.publish_marker("run-2", T2, done("aud1", 2)).await?;
    evaluator.wait_processed(3).await?;
    eventually("the markers recorded", || async {
        let counters = evaluator.counters().await?;
        Ok(counters["first_sync_markers"] == 6 && counters["first_sync_audiences_pending"] == 1)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    world.drain_dirty()?;
    assert!(
        world.dirty.is_empty(),
        "released before run 2's second page: {:?}",
        world.dirty
    );

    world
        .publish(&first_sync_page(
            "aud1",
            "run-2",
            2,
            &[("other@example.com", MemberStatus::Subscribed, T1)],
        ))
        .await?;
    world.wait_dirty("crash@example.com").await?;
    eventually("nothing held or pending", || async {
        let counters = evaluator.counters().await?;
        Ok(counters["held_first_sync_opt_outs"] == 0
            && counters["first_sync_audiences_pending"] == 0)
    })
    .await?;
    assert_eq!(evaluator.counters().await?["messages_dead_lettered"], 0);
    world.teardown(vec![evaluator]).await
}

/// Page `page` of `audience_id` in the later (not first) sync `run_id`.
fn run_page(
    audience_id: &str,
    run_id: &str,
    page: u32,
    members: &[(&str, MemberStatus, i64)],
) -> MembersChanged {
    MembersChanged {
        run_id: run_id.to_owned(),
        page,
        ..changed(audience_id, false, members)
    }
}

#[tokio::test]
async fn a_sync_run_is_flushed_to_every_partition_once_all_its_pages_are_applied()
-> anyhow::Result<()> {
    let mut world = World::new().await?;
    let evaluator = world.start().await?;
    let emails: Vec<String> = (0..24).map(|n| format!("p{n}@example.com")).collect();
    let unsubscribed = |range: std::ops::Range<usize>| -> Vec<(&str, MemberStatus, i64)> {
        emails[range]
            .iter()
            .map(|email| (email.as_str(), MemberStatus::Unsubscribed, T1))
            .collect()
    };
    // A run of three pages over two audiences; its end comes before its last page is applied.
    world
        .publish(&run_page("aud1", "run-9", 1, &unsubscribed(0..8)))
        .await?;
    world
        .publish(&run_page("aud2", "run-9", 1, &unsubscribed(8..16)))
        .await?;
    world
        .publisher
        .publish(
            "members.changed",
            &SyncRunDone {
                run_id: "run-9".to_owned(),
                pages: 3,
            },
        )
        .await?;
    evaluator.wait_processed(2).await?;
    eventually("the run's end recorded", || async {
        Ok(evaluator.counters().await?["sync_run_ends"] == 1)
    })
    .await?;
    for email in &emails[..16] {
        world.wait_dirty(email).await?;
    }
    assert_eq!(evaluator.counters().await?["sync_runs_flushed"], 0);
    world.drain_dirty()?;
    assert!(
        world.flushes.is_empty(),
        "flushed with a page missing: {:?}",
        world.flushes
    );

    world
        .publish(&run_page("aud1", "run-9", 2, &unsubscribed(16..24)))
        .await?;
    let partitions = world.topology.persons_dirty_queues().len();
    world.wait_flushes(partitions).await?;
    // Each partition's flush comes after every email of the run on that partition, and those were
    // marked as a stream, so the writer's batch waits for the flush.
    assert_eq!(
        world.streamed,
        emails.iter().cloned().collect::<BTreeSet<_>>(),
        "the run's notifications are marked as a stream"
    );
    let all: Vec<&str> = emails.iter().map(String::as_str).collect();
    world.assert_flushed_after(&all);
    let mut flushed_queues: Vec<String> = world
        .flushes
        .iter()
        .map(|(queue, _)| queue.clone())
        .collect();
    flushed_queues.sort();
    assert_eq!(flushed_queues, world.topology.persons_dirty_queues());
    assert_eq!(evaluator.counters().await?["sync_runs_flushed"], 1);

    // A redelivered end or page does not flush the run again.
    world
        .publisher
        .publish(
            "members.changed",
            &SyncRunDone {
                run_id: "run-9".to_owned(),
                pages: 3,
            },
        )
        .await?;
    world
        .publish(&run_page("aud1", "run-9", 2, &unsubscribed(16..24)))
        .await?;
    evaluator.wait_processed(4).await?;
    eventually("the redelivered end recorded", || async {
        Ok(evaluator.counters().await?["sync_run_ends"] == 2)
    })
    .await?;
    assert_eq!(evaluator.counters().await?["sync_runs_flushed"], 1);
    world.drain_dirty()?;
    assert_eq!(world.flushes.len(), partitions, "{:?}", world.flushes);
    world.teardown(vec![evaluator]).await
}

#[tokio::test]
async fn stale_snapshot_is_ignored() -> anyhow::Result<()> {
    let mut world = World::new().await?;
    let evaluator = world.start().await?;
    world
        .publish(&changed(
            "aud1",
            false,
            &[("stale@example.com", MemberStatus::Unsubscribed, T2)],
        ))
        .await?;
    world.wait_dirty("stale@example.com").await?;
    // Older than what is stored: must not resubscribe.
    world
        .publish(&changed(
            "aud1",
            false,
            &[("stale@example.com", MemberStatus::Subscribed, T1)],
        ))
        .await?;
    evaluator.wait_processed(2).await?;
    let decision = evaluator.decide("stale@example.com").await?;
    assert_eq!(decision.decision, Decision::OptOut as i32);
    assert_eq!(decision.opt_in_evidence_id, 0);

    let mut client = DecisionsClient::new(evaluator.channel.clone());
    let explained = client
        .explain(authorized(ExplainRequest {
            email: "stale@example.com".to_owned(),
        }))
        .await?
        .into_inner();
    assert_eq!(explained.members.len(), 1);
    assert_eq!(explained.members[0].status, "unsubscribed");
    assert_eq!(explained.members[0].learned_from, "poll");
    assert_eq!(
        explained.transitions.len(),
        1,
        "{:?}",
        explained.transitions
    );
    assert_eq!(explained.transitions[0].from_status, "");
    assert_eq!(explained.transitions[0].to_status, "unsubscribed");
    world.teardown(vec![evaluator]).await
}

#[tokio::test]
async fn resubscribe_after_unsubscribe_is_opt_in_evidence_but_a_first_sync_baseline_is_not()
-> anyhow::Result<()> {
    let mut world = World::new().await?;
    let evaluator = world.start().await?;

    // Baseline during the first sync: opt in, but no evidence.
    world
        .publish(&changed(
            "aud1",
            true,
            &[("baseline@example.com", MemberStatus::Subscribed, T1)],
        ))
        .await?;
    evaluator.wait_processed(1).await?;
    let baseline = evaluator
        .wait_decision("baseline@example.com", Decision::OptIn)
        .await?;
    assert_eq!(baseline.opt_in_evidence_id, 0);

    // A new subscribed member after the first sync is evidence.
    world
        .publish(&changed(
            "aud1",
            false,
            &[("newcomer@example.com", MemberStatus::Subscribed, T1)],
        ))
        .await?;
    world.wait_dirty("newcomer@example.com").await?;
    let newcomer = evaluator
        .wait_decision("newcomer@example.com", Decision::OptIn)
        .await?;
    assert_ne!(newcomer.opt_in_evidence_id, 0);

    // Unsubscribe, then Mailchimp sets the member back to subscribed.
    world
        .publish(&changed(
            "aud1",
            false,
            &[("baseline@example.com", MemberStatus::Unsubscribed, T2)],
        ))
        .await?;
    let opted_out = evaluator
        .wait_decision("baseline@example.com", Decision::OptOut)
        .await?;
    world
        .publish(&changed(
            "aud1",
            false,
            &[("baseline@example.com", MemberStatus::Subscribed, T3)],
        ))
        .await?;
    let resubscribed = evaluator
        .wait_decision("baseline@example.com", Decision::OptIn)
        .await?;
    assert_ne!(resubscribed.opt_in_evidence_id, 0);
    assert!(resubscribed.version > opted_out.version);
    world.drain_dirty()?;
    assert!(world.dirty.contains("baseline@example.com"));

    // Acknowledging stale evidence clears nothing; the current one clears it and moves the version.
    let mut client = DecisionsClient::new(evaluator.channel.clone());
    let wrong = client
        .ack_opt_in(authorized(AckOptInRequest {
            email: "baseline@example.com".to_owned(),
            opt_in_evidence_id: resubscribed.opt_in_evidence_id + 1000,
        }))
        .await?
        .into_inner();
    assert!(!wrong.cleared);
    let right = client
        .ack_opt_in(authorized(AckOptInRequest {
            email: "Baseline@Example.com".to_owned(),
            opt_in_evidence_id: resubscribed.opt_in_evidence_id,
        }))
        .await?
        .into_inner();
    assert!(right.cleared);
    let acknowledged = evaluator.decide("baseline@example.com").await?;
    assert_eq!(acknowledged.decision, Decision::OptIn as i32);
    assert_eq!(acknowledged.opt_in_evidence_id, 0);
    assert_eq!(acknowledged.version, resubscribed.version + 1);
    world.teardown(vec![evaluator]).await
}

#[tokio::test]
async fn opt_out_supersedes_pending_opt_in_evidence() -> anyhow::Result<()> {
    let world = World::new().await?;
    let evaluator = world.start().await?;
    world
        .publish(&changed(
            "aud1",
            false,
            &[("flip@example.com", MemberStatus::Subscribed, T1)],
        ))
        .await?;
    let subscribed = evaluator
        .wait_decision("flip@example.com", Decision::OptIn)
        .await?;
    assert_ne!(subscribed.opt_in_evidence_id, 0);
    world
        .publish(&changed(
            "aud1",
            false,
            &[("flip@example.com", MemberStatus::Unsubscribed, T2)],
        ))
        .await?;
    let unsubscribed = evaluator
        .wait_decision("flip@example.com", Decision::OptOut)
        .await?;
    assert_eq!(unsubscribed.opt_in_evidence_id, 0);
    world.teardown(vec![evaluator]).await
}

#[tokio::test]
async fn replaying_the_same_message_is_harmless_and_republishes_dirty() -> anyhow::Result<()> {
    let mut world = World::new().await?;
    let evaluator = world.start().await?;
    let message = changed(
        "aud1",
        false,
        &[
            ("replay@example.com", MemberStatus::Unsubscribed, T1),
            ("other@example.com", MemberStatus::Cleaned, T1),
        ],
    );
    world.publish(&message).await?;
    evaluator.wait_processed(1).await?;
    world.wait_dirty("replay@example.com").await?;
    let first = evaluator.decide("replay@example.com").await?;
    let dirty_messages = world.dirty_messages;

    world.publish(&message).await?;
    evaluator.wait_processed(2).await?;
    let second = evaluator.decide("replay@example.com").await?;
    assert_eq!(first, second, "nothing moved");
    // Level-triggered: the replay announces the opted-out person again.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while world.dirty_messages == dirty_messages {
        if tokio::time::Instant::now() > deadline {
            bail!("the replay published no persons.dirty");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        world.drain_dirty()?;
    }
    assert!(
        !world.dirty.contains("other@example.com"),
        "no change needs no write"
    );

    let mut client = DecisionsClient::new(evaluator.channel.clone());
    let explained = client
        .explain(authorized(ExplainRequest {
            email: "replay@example.com".to_owned(),
        }))
        .await?
        .into_inner();
    assert_eq!(explained.transitions.len(), 1);
    world.teardown(vec![evaluator]).await
}

#[tokio::test]
async fn paused_evaluator_leaves_messages_queued_until_resumed() -> anyhow::Result<()> {
    let world = World::new().await?;
    let evaluator = world.start().await?;
    let mut admin = AdminClient::new(evaluator.channel.clone());
    assert!(
        admin
            .pause(authorized(PauseRequest {}))
            .await?
            .into_inner()
            .paused
    );
    let queue = world.topology.members_changed_queue();
    eventually("the consumer to stop", || async {
        let status = admin
            .clone()
            .get_status(authorized(GetStatusRequest {}))
            .await?
            .into_inner();
        assert!(status.paused);
        Ok(status
            .queues
            .iter()
            .any(|entry| entry.name == queue && entry.consumers == 0))
    })
    .await?;
    world
        .publish(&changed(
            "aud1",
            false,
            &[("paused@example.com", MemberStatus::Unsubscribed, T1)],
        ))
        .await?;
    eventually("the message to wait", || async {
        let status = admin
            .clone()
            .get_status(authorized(GetStatusRequest {}))
            .await?
            .into_inner();
        Ok(status
            .queues
            .iter()
            .any(|entry| entry.name == queue && entry.messages == 1))
    })
    .await?;
    assert_eq!(
        evaluator.decide("paused@example.com").await?.decision,
        Decision::NoChange as i32
    );
    admin.resume(authorized(ResumeRequest {})).await?;
    evaluator
        .wait_decision("paused@example.com", Decision::OptOut)
        .await?;
    world.teardown(vec![evaluator]).await
}

#[tokio::test]
async fn two_evaluators_on_one_schema_converge_on_interleaved_messages() -> anyhow::Result<()> {
    let world = World::new().await?;
    let (first, second) = tokio::try_join!(world.start(), world.start())?;

    // Each email gets three snapshots per audience, published newest-first for half of them, so both replicas
    // see out-of-order and concurrent updates of the same email.
    let statuses = [
        MemberStatus::Subscribed,
        MemberStatus::Unsubscribed,
        MemberStatus::Cleaned,
    ];
    let mut expected = Vec::new();
    let mut messages = Vec::new();
    for person in 0..24usize {
        let email = format!("person{person}@example.com");
        let mut latest = Vec::new();
        for audience in ["aud1", "aud2"] {
            let mut versions: Vec<(MemberStatus, i64)> = (0..3)
                .map(|step| {
                    let status = statuses[(person + step * (audience.len() + person % 2)) % 3];
                    (status, T1 + step as i64 * 60)
                })
                .collect();
            latest.push(versions[2].0);
            if person % 2 == 0 {
                versions.reverse();
            }
            for (status, seconds) in versions {
                messages.push(changed(
                    audience,
                    false,
                    &[(email.as_str(), status, seconds)],
                ));
            }
        }
        let decision = if latest.contains(&MemberStatus::Subscribed) {
            Decision::OptIn
        } else if latest
            .iter()
            .all(|status| *status == MemberStatus::Unsubscribed)
        {
            Decision::OptOut
        } else {
            Decision::NoChange
        };
        expected.push((email, decision));
    }
    // Interleave the emails' messages.
    messages.sort_by_key(|message| {
        message.members[0].email.len()
            + message.members[0]
                .last_changed
                .map_or(0, |t| t.seconds as usize)
                % 7
    });
    for message in &messages {
        world.publish(message).await?;
    }
    let total = messages.len() as i64;
    eventually("both evaluators to process everything", || async {
        let processed = first.counters().await?["messages_processed"]
            + second.counters().await?["messages_processed"];
        Ok(processed >= total)
    })
    .await?;
    let counters = (first.counters().await?, second.counters().await?);
    assert!(
        counters.0["messages_processed"] > 0 && counters.1["messages_processed"] > 0,
        "both replicas took part: {counters:?}"
    );
    for (email, decision) in &expected {
        let from_first = first.decide(email).await?;
        let from_second = second.decide(email).await?;
        assert_eq!(from_first, from_second);
        assert_eq!(
            from_first.decision, *decision as i32,
            "{email}: {from_first:?}"
        );
    }
    world.teardown(vec![first, second]).await
}

#[tokio::test]
async fn invalid_messages_are_dead_lettered_and_managed_over_admin() -> anyhow::Result<()> {
    let world = World::new().await?;
    let evaluator = world.start().await?;
    world
        .publish(&changed(
            "aud1",
            false,
            &[("what@example.com", MemberStatus::Unspecified, T1)],
        ))
        .await?;
    let channel = world.connection.create_channel().await?;
    channel
        .basic_publish(
            world.topology.exchange.as_str().into(),
            "members.changed".into(),
            Default::default(),
            &[0xff, 0xff, 0xff],
            Default::default(),
        )
        .await?
        .await?;
    let mut admin = AdminClient::new(evaluator.channel.clone());
    eventually("two dead letters", || async {
        let listed = admin
            .clone()
            .list_dead_letters(authorized(ListDeadLettersRequest { limit: 10 }))
            .await?;
        Ok(listed.into_inner().dead_letters.len() == 2)
    })
    .await?;
    let listed = admin
        .list_dead_letters(authorized(ListDeadLettersRequest { limit: 10 }))
        .await?
        .into_inner()
        .dead_letters;
    let reasons: Vec<&str> = listed
        .iter()
        .map(|dead_letter| dead_letter.reason.as_str())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|reason| reason.contains("without a known status")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|reason| reason.starts_with("undecodable protobuf")),
        "{reasons:?}"
    );
    assert!(
        listed
            .iter()
            .all(|dead_letter| dead_letter.routing_key == "members.changed")
    );
    assert_eq!(
        evaluator.decide("what@example.com").await?.version,
        0,
        "nothing applied"
    );

    let status = admin
        .get_status(authorized(GetStatusRequest {}))
        .await?
        .into_inner();
    assert_eq!(status.service, "rule-evaluator");
    let dead_letter_queue = world
        .topology
        .dead_letter_queue(&world.topology.members_changed_queue());
    assert!(
        status
            .queues
            .iter()
            .any(|queue| queue.name == dead_letter_queue && queue.messages == 2),
        "{status:?}"
    );
    assert!(
        admin
            .trigger_sync(authorized(TriggerSyncRequest::default()))
            .await?
            .into_inner()
            .run_id
            .is_empty()
    );

    let purged = admin
        .purge_dead_letters(authorized(PurgeDeadLettersRequest {}))
        .await?
        .into_inner();
    assert_eq!(purged.purged, 2);
    world.teardown(vec![evaluator]).await
}

/// `Admin.ReplayDeadLetters` through the generated client: an unknown id replays nothing; the
/// dead letter's own id sends it back to `members.changed`, where the evaluator consumes it again
/// (and, still invalid, dead-letters it again: its failure count grows).
#[tokio::test]
async fn replayed_dead_letters_go_back_to_their_routing_key_and_are_consumed_again()
-> anyhow::Result<()> {
    let world = World::new().await?;
    let evaluator = world.start().await?;
    world
        .publish(&changed(
            "aud1",
            false,
            &[("replay@example.com", MemberStatus::Unspecified, T1)],
        ))
        .await?;
    let admin = AdminClient::new(evaluator.channel.clone());
    let list = || {
        let mut admin = admin.clone();
        async move {
            Ok::<_, anyhow::Error>(
                admin
                    .list_dead_letters(authorized(ListDeadLettersRequest { limit: 10 }))
                    .await?
                    .into_inner()
                    .dead_letters,
            )
        }
    };
    eventually("one dead letter", || async { Ok(list().await?.len() == 1) }).await?;
    let first = list().await?.remove(0);
    assert!(!first.message_id.is_empty(), "{first:?}");
    assert!(first.failures >= 1, "{first:?}");

    let none = admin
        .clone()
        .replay_dead_letters(authorized(ReplayDeadLettersRequest {
            message_ids: vec!["no-such-message".to_owned()],
            all: false,
        }))
        .await?
        .into_inner();
    assert_eq!(none.replayed, 0);
    let replayed = admin
        .clone()
        .replay_dead_letters(authorized(ReplayDeadLettersRequest {
            message_ids: vec![first.message_id.clone()],
            all: false,
        }))
        .await?
        .into_inner();
    assert_eq!(replayed.replayed, 1);
    eventually("the replayed message dead-lettered again", || async {
        Ok(list().await?.iter().any(|dead_letter| {
            dead_letter.message_id == first.message_id && dead_letter.failures > first.failures
        }))
    })
    .await?;
    let again = list().await?;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].routing_key, "members.changed");
    world.teardown(vec![evaluator]).await
}

fn changed_from(
    audience_id: &str,
    source: Source,
    first_sync: bool,
    members: &[(&str, MemberStatus, i64)],
) -> MembersChanged {
    MembersChanged {
        source: source as i32,
        ..changed(audience_id, first_sync, members)
    }
}

#[tokio::test]
async fn explain_shows_members_in_three_audiences_every_transition_and_the_deciding_rule()
-> anyhow::Result<()> {
    let world = World::new().await?;
    let evaluator = world.start().await?;
    let email = "three@example.com";
    let t4 = T3 + 60;
    let steps = [
        // First sync of three audiences: subscribed everywhere (a baseline, no evidence).
        changed_from(
            "aud1",
            Source::Poll,
            true,
            &[(email, MemberStatus::Subscribed, T1)],
        ),
        changed_from(
            "aud2",
            Source::Poll,
            true,
            &[(email, MemberStatus::Subscribed, T1)],
        ),
        changed_from(
            "aud3",
            Source::Poll,
            true,
            &[(email, MemberStatus::Subscribed, T1)],
        ),
        // Unsubscribes: one by webhook, two by the next poll.
        changed_from(
            "aud1",
            Source::Webhook,
            false,
            &[(email, MemberStatus::Unsubscribed, T2)],
        ),
        changed_from(
            "aud2",
            Source::Poll,
            false,
            &[(email, MemberStatus::Unsubscribed, T2)],
        ),
        changed_from(
            "aud3",
            Source::Poll,
            false,
            &[(email, MemberStatus::Unsubscribed, T2)],
        ),
        // Resubscribed in one audience (opt-in evidence), then unsubscribed there again.
        changed_from(
            "aud2",
            Source::Webhook,
            false,
            &[(email, MemberStatus::Subscribed, T3)],
        ),
        changed_from(
            "aud2",
            Source::Poll,
            false,
            &[(email, MemberStatus::Unsubscribed, t4)],
        ),
    ];
    let expected_decisions = [
        Decision::OptIn,
        Decision::OptIn,
        Decision::OptIn,
        Decision::OptIn,
        Decision::OptIn,
        Decision::OptOut,
        Decision::OptIn,
        Decision::OptOut,
    ];
    let mut client = DecisionsClient::new(evaluator.channel.clone());
    for (index, (step, expected)) in steps.iter().zip(expected_decisions).enumerate() {
        world.publish(step).await?;
        evaluator.wait_processed(index as i64 + 1).await?;
        let decision = evaluator.wait_decision(email, expected).await?;
        // Each step is visible in Explain as it happens.
        let explained = client
            .explain(authorized(ExplainRequest {
                email: email.to_owned(),
            }))
            .await?
            .into_inner();
        assert_eq!(
            explained.transitions.len(),
            index + 1,
            "step {index}: {explained:?}"
        );
        assert_eq!(
            explained.decision.as_ref().map(|d| d.decision),
            Some(expected as i32)
        );
        if index == 6 {
            assert_ne!(
                decision.opt_in_evidence_id, 0,
                "resubscribe carries evidence"
            );
        }
    }

    let explained = client
        .explain(authorized(ExplainRequest {
            email: " Three@Example.com ".to_owned(),
        }))
        .await?
        .into_inner();
    let decision = explained.decision.context("a decision")?;
    assert_eq!(decision.decision, Decision::OptOut as i32);
    assert_eq!(
        decision.opt_in_evidence_id, 0,
        "the later unsubscribe cleared the evidence"
    );
    assert!(!decision.rule.is_empty(), "the rule is named");
    let members: Vec<(String, String, String)> = explained
        .members
        .iter()
        .map(|member| {
            (
                member.audience_id.clone(),
                member.status.clone(),
                member.learned_from.clone(),
            )
        })
        .collect();
    assert_eq!(
        members,
        [
            (
                "aud1".to_owned(),
                "unsubscribed".to_owned(),
                "webhook".to_owned()
            ),
            (
                "aud2".to_owned(),
                "unsubscribed".to_owned(),
                "poll".to_owned()
            ),
            (
                "aud3".to_owned(),
                "unsubscribed".to_owned(),
                "poll".to_owned()
            ),
        ]
    );
    assert!(
        explained
            .members
            .iter()
            .all(|member| member.last_changed.is_some())
    );
    let transitions: Vec<(String, String, String, String)> = explained
        .transitions
        .iter()
        .map(|transition| {
            (
                transition.audience_id.clone(),
                transition.from_status.clone(),
                transition.to_status.clone(),
                transition.learned_from.clone(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String, String)> = [
        ("aud1", "", "subscribed", "poll"),
        ("aud2", "", "subscribed", "poll"),
        ("aud3", "", "subscribed", "poll"),
        ("aud1", "subscribed", "unsubscribed", "webhook"),
        ("aud2", "subscribed", "unsubscribed", "poll"),
        ("aud3", "subscribed", "unsubscribed", "poll"),
        ("aud2", "unsubscribed", "subscribed", "webhook"),
        ("aud2", "subscribed", "unsubscribed", "poll"),
    ]
    .iter()
    .map(|(audience, from, to, source)| {
        (
            (*audience).to_owned(),
            (*from).to_owned(),
            (*to).to_owned(),
            (*source).to_owned(),
        )
    })
    .collect();
    assert_eq!(transitions, expected);
    world.teardown(vec![evaluator]).await
}

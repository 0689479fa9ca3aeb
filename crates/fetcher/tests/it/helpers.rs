//! Test harness: an in-process sandbox, a fresh PostgreSQL schema and a unique RabbitMQ topology per test.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use lapin::options::BasicGetOptions;
use optout_amqp::Topology;
use optout_fetcher::{Fetcher, SyncSettings, store};
use optout_mailchimp::{MailchimpClient, MailchimpConfig, MembersQuery};
use optout_proto::queue::v1::{FirstSyncMarker, MembersChanged, SyncRunDone};
use optout_sandbox::{Sandbox, SandboxConfig};
use prost::{Message as _, Name as _};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub(crate) const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub(crate) const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Everything one test needs; [`TestApp::cleanup`] removes the schema and the queues.
/// One message on `members.changed`.
#[derive(Clone, Debug)]
pub(crate) enum Published {
    /// A page of a sync, or an event.
    Members(MembersChanged),
    /// A first-sync marker.
    Marker(FirstSyncMarker),
    /// The end of a run.
    RunDone(SyncRunDone),
}

pub(crate) struct TestApp {
    pub(crate) sandbox: Sandbox,
    pub(crate) pool: PgPool,
    pub(crate) amqp: Arc<lapin::Connection>,
    pub(crate) channel: lapin::Channel,
    pub(crate) topology: Topology,
    pub(crate) client: MailchimpClient,
    pub(crate) unique: String,
    pub(crate) schema_prefix: String,
    pub(crate) shutdown: CancellationToken,
}

impl TestApp {
    pub(crate) async fn start(seed: u64) -> Result<Self> {
        let sandbox = Sandbox::start(SandboxConfig {
            seed,
            audiences: 3,
            members: 3000,
            ..SandboxConfig::default()
        })
        .await
        .context("failed to start the sandbox")?;
        let unique = format!("t{}", uuid::Uuid::new_v4().simple())
            .chars()
            .take(17)
            .collect::<String>();
        let schema_prefix = format!("fetchtest_{unique}");
        let pool = store::connect(DATABASE_URL, &format!("{schema_prefix}_fetcher"), 16).await.context(
            "failed to connect to PostgreSQL at 127.0.0.1:5432 (start it, e.g. `pg_ctlcluster 15 main start`)",
        )?;
        let amqp = optout_amqp::connect(AMQP_URL)
            .await
            .context("failed to connect to RabbitMQ at 127.0.0.1:5672 (start it: `rabbitmq-server -detached`)")?;
        let channel = amqp.create_channel().await?;
        let topology = Topology::new("optout", &format!("{unique}."), 1);
        optout_amqp::declare(&channel, &topology).await?;
        let client = client_for(&sandbox)?;
        Ok(Self {
            sandbox,
            pool,
            amqp: Arc::new(amqp),
            channel,
            topology,
            client,
            unique,
            schema_prefix,
            shutdown: CancellationToken::new(),
        })
    }

    pub(crate) fn settings(&self) -> SyncSettings {
        // Several pages per audience (about 1000 members each), so paging is exercised.
        SyncSettings {
            page_size: 300,
            ..SyncSettings::default()
        }
    }

    pub(crate) fn fetcher(&self) -> Fetcher {
        self.fetcher_with(self.topology.clone(), self.settings())
    }

    pub(crate) fn fetcher_with(&self, topology: Topology, settings: SyncSettings) -> Fetcher {
        Fetcher::new(
            self.pool.clone(),
            self.client.clone(),
            Arc::clone(&self.amqp),
            topology,
            settings,
            self.shutdown.child_token(),
        )
    }

    pub(crate) fn audiences(&self) -> Vec<String> {
        self.sandbox.info().audiences.clone()
    }

    /// Takes every message in the members.changed queue (publishing is confirmed before a run
    /// ends, so the queue is complete when this is called) and returns the pages and events, in
    /// order, leaving out markers.
    pub(crate) async fn drain_members_changed(&self) -> Result<Vec<MembersChanged>> {
        Ok(self
            .drain_published()
            .await?
            .into_iter()
            .filter_map(|published| match published {
                Published::Members(message) => Some(message),
                Published::Marker(_) | Published::RunDone(_) => None,
            })
            .collect())
    }

    /// Every message on `members.changed`, in order, told apart by its AMQP type.
    pub(crate) async fn drain_published(&self) -> Result<Vec<Published>> {
        let queue = self.topology.members_changed_queue();
        let mut messages = Vec::new();
        while let Some(delivery) = self
            .channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await?
        {
            let data = delivery.delivery.data.as_slice();
            let kind = delivery
                .delivery
                .properties
                .kind()
                .as_ref()
                .map(|kind| kind.as_str().to_owned())
                .unwrap_or_default();
            if kind == FirstSyncMarker::full_name() {
                messages.push(Published::Marker(FirstSyncMarker::decode(data)?));
            } else if kind == SyncRunDone::full_name() {
                messages.push(Published::RunDone(SyncRunDone::decode(data)?));
            } else {
                anyhow::ensure!(
                    kind == MembersChanged::full_name(),
                    "unexpected message type {kind:?} on members.changed"
                );
                messages.push(Published::Members(MembersChanged::decode(data)?));
            }
        }
        Ok(messages)
    }

    /// Every member of every audience as (audience, email) -> status, read straight from Mailchimp.
    pub(crate) async fn all_members(
        &self,
    ) -> Result<BTreeMap<(String, String), optout_mailchimp::MemberStatus>> {
        let mut members = BTreeMap::new();
        for audience in self.audiences() {
            let pages: Vec<_> = self
                .client
                .members(
                    &audience,
                    MembersQuery {
                        count: 1000,
                        ..MembersQuery::default()
                    },
                )
                .try_collect()
                .await?;
            for member in pages.into_iter().flat_map(|page| page.members) {
                members.insert(
                    (audience.clone(), member.email_address.clone()),
                    member.status,
                );
            }
        }
        Ok(members)
    }

    pub(crate) async fn cleanup(self) {
        let _ = optout_amqp::teardown(&self.channel, &self.topology).await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {}_fetcher CASCADE",
            self.schema_prefix
        )))
        .execute(&self.pool)
        .await;
        self.pool.close().await;
        self.shutdown.cancel();
        self.sandbox.shutdown().await;
    }
}

pub(crate) fn client_for(sandbox: &Sandbox) -> Result<MailchimpClient> {
    let mut config = MailchimpConfig::new(sandbox.info().mailchimp_api_key.clone());
    config.base_url = Some(sandbox.info().mailchimp_url.clone());
    Ok(MailchimpClient::new(config)?)
}

/// Counts (audience, email) pairs over messages.
pub(crate) fn count_members(messages: &[MembersChanged]) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for message in messages {
        for member in &message.members {
            *counts
                .entry((message.audience_id.clone(), member.email.clone()))
                .or_insert(0) += 1;
        }
    }
    counts
}

/// Polls `condition` every 20 ms until it holds or `deadline` passes.
pub(crate) async fn eventually<F, Fut>(
    deadline: Duration,
    what: &str,
    mut condition: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if condition().await? {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the wall clock is in a later second than `time`: runs start at whole seconds and
/// read members changed strictly before their start.
pub(crate) async fn wait_for_next_second(time: chrono::DateTime<chrono::Utc>) -> Result<()> {
    let second = time.timestamp();
    eventually(Duration::from_secs(3), "the next second", || async move {
        Ok(chrono::Utc::now().timestamp() > second)
    })
    .await
}

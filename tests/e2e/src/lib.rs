//! The end-to-end harness: one [`Stack`] runs the real binaries (the sandbox and replicas of
//! the three services) from the target folder against the local RabbitMQ and PostgreSQL, in a
//! namespace of its own, and offers what a test needs to drive and inspect them.
//!
//! Children are killed when the `Stack` is dropped; [`Stack::shutdown`] also removes the
//! stack's schemas and queues. Set `OPTOUT_E2E_LOG=1` to see every child's log on stderr.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use optout_amqp::{
    Topology,
    lapin::{
        BasicProperties, options::BasicGetOptions, options::BasicPublishOptions, types::AMQPValue,
    },
};
pub use optout_cli::admin::Role;
use optout_cli::{
    admin::{Fleet, FleetEndpoints},
    children::{ChildSpec, RunningChild, find_binary},
    sync::{FleetSnapshot, SyncOptions, SyncSummary, Triggered},
    up::{SandboxOptions, StackSettings, sandbox_spec, service_spec},
};
use optout_mailchimp::{MailchimpClient, MailchimpConfig, MemberStatus, UpsertMember};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

pub mod servers;

/// How long a child may take to announce itself.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// What a [`Stack`] runs.
#[derive(Clone, Debug)]
pub struct StackConfig {
    /// Sandbox generator seed. Random by default: audience ids follow from the seed, and stacks
    /// that share audience ids would contend for the fetcher's per-audience lock, which is
    /// database-wide (it does not include the schema).
    pub seed: u64,
    /// Mailchimp audiences.
    pub audiences: u32,
    /// Generated memberships.
    pub members: u64,
    /// Whether the org has Person Accounts.
    pub person_accounts: bool,
    /// Fetcher replicas.
    pub fetchers: usize,
    /// Rule-evaluator replicas.
    pub evaluators: usize,
    /// Salesforce-writer replicas.
    pub writers: usize,
    /// More environment for every service, e.g. `OPTOUT_OBJECTS=Contact`.
    pub extra_env: Vec<(String, String)>,
    /// When set, every child's logs (stderr) are also written to `<name>.log` in this folder.
    pub log_dir: Option<PathBuf>,
    /// Run the writers with the automated opt-out (`OPTOUT_AUTO_OPTOUT`, `OPTOUT_FETCHER_URL` =
    /// fetcher 0); they then start after the fetchers, whose address they need.
    pub auto_optout: bool,
    /// RabbitMQ for this stack instead of `OPTOUT_AMQP_URL` or the local default (a
    /// [`servers::PrivateRabbit`], say).
    pub amqp_url: Option<String>,
    /// PostgreSQL for this stack instead of `OPTOUT_DATABASE_URL` or the local default.
    pub database_url: Option<String>,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            seed: fastrand::u64(..),
            audiences: 3,
            members: 60,
            person_accounts: false,
            fetchers: 1,
            evaluators: 1,
            writers: 1,
            extra_env: Vec::new(),
            log_dir: None,
            auto_optout: false,
            amqp_url: None,
            database_url: None,
        }
    }
}

/// The folder of the binaries: this test executable lives in `target/<profile>/deps/`.
pub fn target_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("OPTOUT_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("cannot locate the test executable")?;
    let deps = exe.parent().context("test executable has no folder")?;
    let dir = if deps.ends_with("deps") {
        deps.parent().unwrap_or(deps)
    } else {
        deps
    };
    for binary in [
        "optout-sandbox",
        Role::Fetcher.binary(),
        Role::Evaluator.binary(),
        Role::Writer.binary(),
    ] {
        ensure!(
            dir.join(binary).is_file(),
            "{binary} is missing from {}: run `cargo build --bins` first",
            dir.display()
        );
    }
    Ok(dir.to_path_buf())
}

/// Fails with a message that says how to start them when RabbitMQ or PostgreSQL is down.
async fn preflight(settings: &StackSettings) -> Result<()> {
    use sqlx::Connection as _;
    optout_amqp::connect(&settings.amqp_url)
        .await
        .with_context(|| {
            format!(
                "RabbitMQ is not reachable at {} (start it with scripts/services.sh)",
                without_password(&settings.amqp_url)
            )
        })?;
    let connection = sqlx::PgConnection::connect(&settings.database_url)
        .await
        .with_context(|| {
            format!(
                "PostgreSQL is not reachable at {} (start it with scripts/services.sh)",
                without_password(&settings.database_url)
            )
        })?;
    drop(connection.close().await);
    Ok(())
}

/// A URL fit for an error message: the password removed.
fn without_password(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            // Fails only for URLs that cannot carry a password, which then hold none.
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => "(unparsable url)".to_owned(),
    }
}

/// One replica of one service.
#[derive(Debug)]
struct Replica {
    role: Role,
    index: usize,
    name: String,
    env: Vec<(String, String)>,
    /// The address it listens on, kept across restarts so peers can find it again.
    grpc: String,
    child: Option<RunningChild>,
}

/// A running system under test.
#[derive(Debug)]
pub struct Stack {
    config: StackConfig,
    settings: StackSettings,
    dir: PathBuf,
    forward_output: bool,
    sandbox: RunningChild,
    replicas: Vec<Replica>,
    http: reqwest::Client,
    mailchimp: MailchimpClient,
    audiences: Vec<String>,
    base_url: String,
    topology: Topology,
    /// Unix time (whole seconds) of the last Mailchimp change made through the harness.
    last_change_second: Mutex<u64>,
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

fn field(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

impl Stack {
    /// Starts the sandbox, the evaluators, then the fetchers and writers (which need an
    /// evaluator's address).
    pub async fn start(config: StackConfig) -> Result<Self> {
        let dir = target_dir()?;
        let forward_output = std::env::var("OPTOUT_E2E_LOG").is_ok_and(|value| value == "1");
        let mut settings = StackSettings::fresh("e2e");
        if let Some(url) = &config.amqp_url {
            settings.amqp_url.clone_from(url);
        }
        if let Some(url) = &config.database_url {
            settings.database_url.clone_from(url);
        }
        preflight(&settings).await?;
        settings.extra_env.clone_from(&config.extra_env);
        let sandbox_options = SandboxOptions {
            seed: config.seed,
            audiences: config.audiences,
            members: config.members,
            person_accounts: config.person_accounts,
        };
        let sandbox = RunningChild::start(
            &with_log(
                sandbox_spec(&sandbox_options, &dir, forward_output)?,
                config.log_dir.as_deref(),
            ),
            STARTUP_TIMEOUT,
        )
        .await
        .context("starting the sandbox")?;
        let info = sandbox.announcement().clone();
        let mailchimp_url = field(&info, "mailchimp_url");
        let base_url = mailchimp_url.trim_end_matches("/3.0").to_owned();
        let mut mailchimp_config = MailchimpConfig::new(field(&info, "mailchimp_api_key"));
        mailchimp_config.base_url = Some(mailchimp_url);
        let mailchimp =
            MailchimpClient::new(mailchimp_config).context("building the Mailchimp client")?;
        let audiences = info
            .get("audiences")
            .and_then(Value::as_array)
            .map(|ids| {
                ids.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let topology = Topology::new(&settings.exchange, &settings.queue_prefix, 4);
        let mut stack = Self {
            config,
            settings,
            dir,
            forward_output,
            sandbox,
            replicas: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            mailchimp,
            audiences,
            base_url,
            topology,
            last_change_second: Mutex::new(0),
        };
        stack.start_services().await?;
        stack.fleet().await?.wait_ready(STARTUP_TIMEOUT).await?;
        Ok(stack)
    }

    async fn start_services(&mut self) -> Result<()> {
        let info = self.sandbox.announcement().clone();
        let evaluator_env = self.settings.service_env(&info, None);
        let evaluators = (0..self.config.evaluators.max(1))
            .map(|index| self.start_replica(Role::Evaluator, index, evaluator_env.clone()))
            .collect::<Vec<_>>();
        let evaluators = futures::future::try_join_all(evaluators).await?;
        let evaluator_grpc = evaluators[0].grpc.clone();
        let env = self.settings.service_env(&info, Some(&evaluator_grpc));
        let mut others = Vec::new();
        for index in 0..self.config.fetchers.max(1) {
            others.push(self.start_replica(Role::Fetcher, index, env.clone()));
        }
        let mut fetchers = Vec::new();
        let mut writer_env = env.clone();
        if self.config.auto_optout {
            // The fetcher's port is ephemeral: known once it has announced itself.
            fetchers = futures::future::try_join_all(std::mem::take(&mut others)).await?;
            writer_env.push(("OPTOUT_AUTO_OPTOUT".to_owned(), "true".to_owned()));
            writer_env.push((
                "OPTOUT_FETCHER_URL".to_owned(),
                format!("http://{}", fetchers[0].grpc),
            ));
        }
        for index in 0..self.config.writers.max(1) {
            others.push(self.start_replica(Role::Writer, index, writer_env.clone()));
        }
        let others = futures::future::try_join_all(others).await?;
        self.replicas.extend(evaluators);
        self.replicas.extend(fetchers);
        self.replicas.extend(others);
        Ok(())
    }

    async fn start_replica(
        &self,
        role: Role,
        index: usize,
        env: Vec<(String, String)>,
    ) -> Result<Replica> {
        let name = replica_name(role, index);
        let spec = with_log(
            service_spec(
                role,
                name.clone(),
                &self.dir,
                env.clone(),
                self.forward_output,
            )?,
            self.config.log_dir.as_deref(),
        );
        let child = RunningChild::start(&spec, STARTUP_TIMEOUT)
            .await
            .with_context(|| format!("starting {name}"))?;
        let grpc = child.field("grpc");
        ensure!(
            !grpc.is_empty(),
            "{name} announced no grpc address: {}",
            child.announcement()
        );
        Ok(Replica {
            role,
            index,
            name,
            env,
            grpc,
            child: Some(child),
        })
    }

    /// The sandbox's announcement (URLs, credentials, audience ids).
    pub fn sandbox_info(&self) -> &Value {
        self.sandbox.announcement()
    }

    /// The Mailchimp list ids.
    pub fn audiences(&self) -> &[String] {
        &self.audiences
    }

    /// A Mailchimp client on the sandbox.
    pub fn mailchimp(&self) -> &MailchimpClient {
        &self.mailchimp
    }

    /// The queue names of this stack.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The endpoints of the live replicas.
    pub fn endpoints(&self) -> FleetEndpoints {
        let mut endpoints = FleetEndpoints::default();
        for replica in self
            .replicas
            .iter()
            .filter(|replica| replica.child.is_some())
        {
            let address = format!("http://{}", replica.grpc);
            match replica.role {
                Role::Fetcher => endpoints.fetcher.push(address),
                Role::Evaluator => endpoints.evaluator.push(address),
                Role::Writer => endpoints.writer.push(address),
            }
        }
        endpoints
    }

    /// The Prometheus `/metrics` address (`host:port`) each live replica announced.
    pub fn metrics_addresses(&self) -> Vec<(Role, String)> {
        self.replicas
            .iter()
            .filter_map(|replica| {
                let address = replica.child.as_ref()?.field("metrics");
                (!address.is_empty()).then_some((replica.role, address))
            })
            .collect()
    }

    /// A field of a live replica's start-up announcement (`grpc`, `metrics`, and for the fetcher
    /// `http`: webhooks and the Memberships API), or `None` when it is down or announced none.
    pub fn announced(&self, role: Role, index: usize, key: &str) -> Option<String> {
        let replica = self
            .replicas
            .iter()
            .find(|replica| replica.role == role && replica.index == index)?;
        let value = replica.child.as_ref()?.field(key);
        (!value.is_empty()).then_some(value)
    }

    /// Admin clients on every live replica.
    pub async fn fleet(&self) -> Result<Fleet> {
        Ok(Fleet::connect(&self.endpoints(), &self.settings.admin_token).await?)
    }

    /// Fails with the child's stderr tail when any replica or the sandbox has died.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.sandbox.try_wait() {
            return Err(self.sandbox.exited_error(status).into());
        }
        for replica in &mut self.replicas {
            if let Some(child) = replica.child.as_mut()
                && let Some(status) = child.try_wait()
            {
                return Err(child.exited_error(status).into());
            }
        }
        Ok(())
    }

    /// Mailchimp timestamps have whole seconds, and a sync reads members changed *before* its
    /// start: a change in the same second as the start would only be seen by the next sync.
    /// So a sync starts in a later second than the last change made through the harness.
    async fn wait_for_clock_tick(&self) {
        let last = *self
            .last_change_second
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while unix_seconds() <= last {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let to_next_second =
                Duration::from_nanos(1_000_000_000 - u64::from(now.subsec_nanos()));
            tokio::time::sleep(to_next_second + Duration::from_millis(5)).await;
        }
    }

    /// Records that Mailchimp data changed now (called by every harness helper that changes it).
    pub fn note_mailchimp_change(&self) {
        *self
            .last_change_second
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = unix_seconds();
    }

    /// Triggers a sync (fetcher run + writer poll cycle) and waits until the pipeline is idle.
    pub async fn sync_and_wait(&mut self) -> Result<SyncSummary> {
        self.sync_with(&SyncOptions {
            timeout: Duration::from_secs(180),
            ..SyncOptions::default()
        })
        .await
    }

    /// [`Self::sync_and_wait`] with options.
    pub async fn sync_with(&mut self, options: &SyncOptions) -> Result<SyncSummary> {
        self.wait_for_clock_tick().await;
        let fleet = self.fleet().await?;
        let summary = optout_cli::sync::sync(&fleet, options).await;
        self.check_alive()?;
        Ok(summary?)
    }

    /// Waits (without triggering anything) until the pipeline has been idle for 3 polls.
    pub async fn wait_idle(&mut self, timeout: Duration) -> Result<FleetSnapshot> {
        let fleet = self.fleet().await?;
        let options = SyncOptions {
            timeout,
            ..SyncOptions::default()
        };
        let snapshot = optout_cli::sync::wait_idle(&fleet, &Triggered::default(), &options).await;
        self.check_alive()?;
        Ok(snapshot?)
    }

    /// Triggers a fetcher run without waiting; returns its run id.
    pub async fn trigger_sync(&self) -> Result<String> {
        self.wait_for_clock_tick().await;
        let fleet = self.fleet().await?;
        let triggered = optout_cli::sync::trigger(&fleet, &SyncOptions::default()).await?;
        Ok(triggered.fetcher.map(|(_, run)| run).unwrap_or_default())
    }

    /// Triggers a fetcher run alone, without the writer's poll cycle (which a paused writer
    /// refuses); returns its run id.
    pub async fn trigger_fetcher(&self) -> Result<String> {
        self.wait_for_clock_tick().await;
        let fleet = self.fleet().await?;
        let fetcher = fleet.first(Role::Fetcher).context("no fetcher")?;
        let response = fetcher
            .trigger_sync(optout_proto::admin::v1::TriggerSyncRequest::default())
            .await?;
        Ok(response.run_id)
    }

    fn control(&self, path: &[&str]) -> Result<reqwest::Url> {
        let mut url = reqwest::Url::parse(&self.base_url)?;
        {
            let mut segments = url
                .path_segments_mut()
                .map_err(|()| anyhow::anyhow!("bad base url"))?;
            segments.pop_if_empty().push("_sandbox");
            segments.extend(path);
        }
        Ok(url)
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> Result<Value> {
        let response = request
            .send()
            .await
            .with_context(|| format!("{what}: sandbox unreachable"))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        ensure!(
            status.is_success(),
            "{what}: sandbox answered {status}: {body}"
        );
        if body.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&body).with_context(|| format!("{what}: not JSON: {body}"))
    }

    /// Invalidates every Salesforce token the sandbox issued: the next call gets 401
    /// `INVALID_SESSION_ID` and the client must log in again.
    pub async fn expire_salesforce_tokens(&self) -> Result<()> {
        let url = self.control(&["salesforce", "expire-tokens"])?;
        self.send(self.http.post(url), "expire salesforce tokens")
            .await
            .map(drop)
    }

    /// Sets the sandbox org's API usage counter and daily budget; at `used >= max` every call
    /// is refused with `REQUEST_LIMIT_EXCEEDED`, which is not worth retrying.
    pub async fn set_salesforce_api_usage(&self, used: u64, max: u64) -> Result<()> {
        let url = self.control(&["salesforce", "api-usage"])?;
        self.send(
            self.http
                .put(url)
                .json(&json!({ "used": used, "max": max })),
            "set salesforce api usage",
        )
        .await
        .map(drop)
    }

    /// Acts as the member: `unsubscribe` (campaign link), `resubscribe` (signup form) or
    /// `bounce` (hard bounce, cleaned).
    pub async fn member_action(&self, list_id: &str, email: &str, action: &str) -> Result<Value> {
        let url = self.control(&["mailchimp", "lists", list_id, "members", email, action])?;
        let result = self
            .send(
                self.http.post(url),
                &format!("{action} {email} in {list_id}"),
            )
            .await;
        self.note_mailchimp_change();
        result
    }

    /// The member clicks an unsubscribe link.
    pub async fn unsubscribe(&self, list_id: &str, email: &str) -> Result<()> {
        self.member_action(list_id, email, "unsubscribe")
            .await
            .map(drop)
    }

    /// The member signs up again through the audience's form.
    pub async fn resubscribe(&self, list_id: &str, email: &str) -> Result<()> {
        self.member_action(list_id, email, "resubscribe")
            .await
            .map(drop)
    }

    /// The member's address bounces hard.
    pub async fn bounce(&self, list_id: &str, email: &str) -> Result<()> {
        self.member_action(list_id, email, "bounce").await.map(drop)
    }

    /// Adds a subscribed member through the Mailchimp API (PUT, status_if_new subscribed).
    pub async fn add_subscriber(&self, list_id: &str, email: &str) -> Result<()> {
        let request = UpsertMember {
            email_address: email.to_owned(),
            status_if_new: MemberStatus::Subscribed,
            status: None,
            merge_fields: None,
        };
        let result = self.mailchimp.upsert_member(list_id, &request).await;
        self.note_mailchimp_change();
        result.with_context(|| format!("adding {email} to {list_id}"))?;
        Ok(())
    }

    /// The members of an email in every audience, as the sandbox holds them.
    pub async fn mailchimp_members(&self, email: &str) -> Result<Vec<Value>> {
        let mut url = self.control(&["mailchimp", "members"])?;
        url.query_pairs_mut().append_pair("email", email);
        let value = self
            .send(self.http.get(url), &format!("members of {email}"))
            .await?;
        Ok(value
            .get("members")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }

    /// Every Salesforce record carrying the email (all fields).
    pub async fn salesforce_records(&self, email: &str) -> Result<Vec<Value>> {
        let mut url = self.control(&["salesforce", "records"])?;
        url.query_pairs_mut().append_pair("email", email);
        let value = self
            .send(self.http.get(url), &format!("records of {email}"))
            .await?;
        Ok(value.as_array().cloned().unwrap_or_default())
    }

    /// Creates a record as a UI user; returns its id.
    pub async fn create_record(&self, object: &str, fields: Value) -> Result<String> {
        let url = self.control(&["salesforce", "records", object])?;
        let value = self
            .send(
                self.http.post(url).json(&fields),
                &format!("create {object}"),
            )
            .await?;
        let id = field(&value, "id");
        ensure!(!id.is_empty(), "create {object}: no id in {value}");
        Ok(id)
    }

    /// Creates a Contact with the email and opt-out value.
    pub async fn create_contact(&self, email: &str, opted_out: bool) -> Result<String> {
        self.create_record(
            "Contact",
            json!({ "LastName": "E2e", "Email": email, "HasOptedOutOfEmail": opted_out }),
        )
        .await
    }

    /// Creates a Lead with the email and opt-out value.
    pub async fn create_lead(&self, email: &str, opted_out: bool) -> Result<String> {
        self.create_record(
            "Lead",
            json!({ "LastName": "E2e", "Company": "Acme", "Email": email, "HasOptedOutOfEmail": opted_out }),
        )
        .await
    }

    /// Creates a Person Account with the email and opt-out value (needs `person_accounts`).
    pub async fn create_person_account(&self, email: &str, opted_out: bool) -> Result<String> {
        self.create_record(
            "Account",
            json!({ "LastName": "E2e", "PersonEmail": email, "PersonHasOptedOutOfEmail": opted_out }),
        )
        .await
    }

    /// Edits a record as a UI user (bumps SystemModstamp).
    pub async fn edit_record(&self, object: &str, id: &str, fields: Value) -> Result<()> {
        let url = self.control(&["salesforce", "records", object, id])?;
        self.send(
            self.http.patch(url).json(&fields),
            &format!("edit {object} {id}"),
        )
        .await
        .map(drop)
    }

    /// Converts a Lead; returns `{leadId, contactId, accountId}`.
    pub async fn convert_lead(&self, id: &str) -> Result<Value> {
        let url = self.control(&["salesforce", "leads", id, "convert"])?;
        self.send(self.http.post(url), &format!("convert lead {id}"))
            .await
    }

    /// The sandbox's call statistics.
    pub async fn stats(&self) -> Result<Value> {
        let url = self.control(&["stats"])?;
        self.send(self.http.get(url), "stats").await
    }

    /// Replaces the sandbox's fault settings (JSON as served at `/_sandbox/faults`; missing
    /// fields take their defaults, so `{}` clears every fault).
    pub async fn set_faults(&self, faults: Value) -> Result<()> {
        let url = self.control(&["faults"])?;
        self.send(self.http.put(url).json(&faults), "set faults")
            .await
            .map(drop)
    }

    /// Salesforce calls per endpoint label (e.g. `PATCH /composite/sobjects`).
    pub async fn salesforce_calls(&self) -> Result<BTreeMap<String, u64>> {
        let stats = self.stats().await?;
        let calls = stats
            .pointer("/calls/salesforce")
            .and_then(Value::as_object)
            .map(|calls| {
                calls
                    .iter()
                    .map(|(label, count)| (label.clone(), count.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(calls)
    }

    async fn amqp_channel(&self) -> Result<optout_amqp::lapin::Channel> {
        let connection = optout_amqp::connect(&self.settings.amqp_url)
            .await
            .context("connecting to RabbitMQ (is it running? scripts/services.sh starts it)")?;
        Ok(connection.create_channel().await?)
    }

    /// Ready messages in every work queue and dead-letter queue of the stack.
    pub async fn queue_depths(&self) -> Result<BTreeMap<String, u64>> {
        let mut depths = BTreeMap::new();
        for queue in self.topology.work_queues() {
            let dead_letter_queue = self.topology.dead_letter_queue(&queue);
            for name in [queue, dead_letter_queue] {
                // A passive declare of a missing queue closes the channel: one channel each.
                let channel = self.amqp_channel().await?;
                let (messages, _) = optout_amqp::queue_depth(&channel, &name)
                    .await
                    .with_context(|| format!("depth of {name}"))?;
                depths.insert(name, messages);
            }
        }
        Ok(depths)
    }

    /// Publishes raw bytes on the stack's exchange, as a broken producer would.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) -> Result<()> {
        let channel = self.amqp_channel().await?;
        let properties = BasicProperties::default()
            .with_content_type("application/protobuf".into())
            .with_message_id("e2e-garbage".into())
            .with_delivery_mode(2);
        channel
            .basic_publish(
                self.topology.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?
            .await?;
        Ok(())
    }

    /// Takes one message off a queue (acked): its body and headers as strings.
    pub async fn get_message(
        &self,
        queue: &str,
    ) -> Result<Option<(Vec<u8>, BTreeMap<String, String>)>> {
        let channel = self.amqp_channel().await?;
        let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await?
        else {
            return Ok(None);
        };
        let mut headers = BTreeMap::new();
        if let Some(table) = message.delivery.properties.headers() {
            for (key, value) in table.inner() {
                let text = match value {
                    AMQPValue::LongString(text) => text.to_string(),
                    AMQPValue::ShortString(text) => text.to_string(),
                    other => format!("{other:?}"),
                };
                headers.insert(key.to_string(), text);
            }
        }
        Ok(Some((message.delivery.data, headers)))
    }

    fn replica_mut(&mut self, role: Role, index: usize) -> Result<&mut Replica> {
        self.replicas
            .iter_mut()
            .find(|replica| replica.role == role && replica.index == index)
            .with_context(|| format!("no replica {index} of {role}"))
    }

    /// Starts again every replica whose process has exited by itself (as Kubernetes restarts a
    /// crashed container); returns their names. Killed replicas ([`Self::kill`]) are left to
    /// [`Self::restart`].
    pub async fn revive(&mut self) -> Result<Vec<String>> {
        let mut exited = Vec::new();
        for replica in &mut self.replicas {
            if let Some(child) = replica.child.as_mut()
                && child.try_wait().is_some()
            {
                replica.child = None;
                exited.push((replica.role, replica.index, replica.name.clone()));
            }
        }
        let mut names = Vec::new();
        for (role, index, name) in exited {
            self.restart(role, index).await?;
            names.push(name);
        }
        Ok(names)
    }

    /// SIGKILLs one replica.
    pub async fn kill(&mut self, role: Role, index: usize) -> Result<()> {
        let replica = self.replica_mut(role, index)?;
        let Some(mut child) = replica.child.take() else {
            bail!("{} is not running", replica.name)
        };
        child.kill().await?;
        Ok(())
    }

    /// Sends SIGTERM to one replica (what Kubernetes sends) and waits up to `timeout` for it to
    /// exit by itself, without a SIGKILL. Returns its exit status and the tail of its stderr;
    /// [`Self::restart`] starts it again.
    pub async fn terminate(
        &mut self,
        role: Role,
        index: usize,
        timeout: Duration,
    ) -> Result<(std::process::ExitStatus, String)> {
        let replica = self.replica_mut(role, index)?;
        let Some(mut child) = replica.child.take() else {
            bail!("{} is not running", replica.name)
        };
        child.signal(libc::SIGTERM);
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => Ok((status?, child.stderr_tail())),
            Err(_) => {
                let tail = child.stderr_tail();
                drop(child.kill().await);
                bail!(
                    "{} did not exit within {timeout:?} of SIGTERM:\n{tail}",
                    replica.name
                )
            }
        }
    }

    /// Starts a killed replica again, on the same gRPC address.
    pub async fn restart(&mut self, role: Role, index: usize) -> Result<()> {
        let dir = self.dir.clone();
        let forward_output = self.forward_output;
        let log_dir = self.config.log_dir.clone();
        let replica = self.replica_mut(role, index)?;
        ensure!(replica.child.is_none(), "{} is still running", replica.name);
        let mut env = replica.env.clone();
        env.push(("OPTOUT_GRPC_LISTEN".to_owned(), replica.grpc.clone()));
        let spec = with_log(
            service_spec(role, replica.name.clone(), &dir, env, forward_output)?,
            log_dir.as_deref(),
        );
        let mut last_error = None;
        // The old socket may linger for a moment after SIGKILL.
        for _ in 0..5 {
            match RunningChild::start(&spec, STARTUP_TIMEOUT).await {
                Ok(child) => {
                    replica.child = Some(child);
                    let name = replica.name.clone();
                    let endpoint = replica.grpc.clone();
                    let handle = optout_cli::admin::ServiceHandle::connect(
                        name,
                        role,
                        &endpoint,
                        &self.settings.admin_token,
                    )
                    .await?;
                    handle.wait_ready(STARTUP_TIMEOUT).await?;
                    return Ok(());
                }
                Err(error) => {
                    last_error = Some(error);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        Err(
            anyhow::Error::from(last_error.context("restart never attempted")?)
                .context(format!("restarting {}", replica.name)),
        )
    }

    /// Stops every child gently, then removes the stack's schemas and queues.
    pub async fn shutdown(mut self) -> Result<()> {
        let grace = Duration::from_secs(10);
        let stopping = self
            .replicas
            .iter_mut()
            .filter_map(|replica| replica.child.as_mut())
            .map(|child| child.terminate(grace));
        drop(futures::future::join_all(stopping).await);
        drop(self.sandbox.terminate(grace).await);
        remove_namespace(
            &self.settings.amqp_url,
            &self.settings.database_url,
            &self.settings.schema,
            &self.topology,
        )
        .await
    }

    /// The admin token (for tests that call the CLI binary).
    pub fn admin_token(&self) -> &str {
        self.settings.admin_token.expose_secret()
    }

    /// The target folder the binaries are taken from.
    pub fn bin_dir(&self) -> &Path {
        &self.dir
    }

    /// Starts an extra child process from the target folder (e.g. `optoutctl`).
    pub async fn spawn_tool(&self, program: &str, args: &[&str]) -> Result<RunningChild> {
        let spec = ChildSpec {
            name: program.to_owned(),
            program: find_binary(&self.dir, program)?,
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            env: Vec::new(),
            forward_output: self.forward_output,
            log_file: None,
        };
        Ok(RunningChild::start(&spec, STARTUP_TIMEOUT).await?)
    }

    /// [`Self::spawn_tool`] for `optoutctl`, with the stack's addresses and admin token in its
    /// environment (as `optoutctl up` prints them), so the token never shows in its arguments.
    pub async fn spawn_optoutctl(&self, args: &[&str]) -> Result<RunningChild> {
        let endpoints = self.endpoints();
        let env = [
            ("OPTOUT_FETCHER_ADDR", endpoints.fetcher.join(",")),
            ("OPTOUT_EVALUATOR_ADDR", endpoints.evaluator.join(",")),
            ("OPTOUT_WRITER_ADDR", endpoints.writer.join(",")),
            ("OPTOUT_ADMIN_TOKEN", self.admin_token().to_owned()),
        ]
        .map(|(key, value)| (key.to_owned(), value))
        .to_vec();
        let spec = ChildSpec {
            name: "optoutctl".to_owned(),
            program: find_binary(&self.dir, "optoutctl")?,
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            env,
            forward_output: self.forward_output,
            log_file: None,
        };
        Ok(RunningChild::start(&spec, STARTUP_TIMEOUT).await?)
    }

    /// The process id of a live replica, e.g. to read its peak memory in `/proc/PID/status`
    /// (the benchmark in `crates/bench` does).
    pub fn pid(&self, role: Role, index: usize) -> Option<u32> {
        self.replicas
            .iter()
            .find(|replica| replica.role == role && replica.index == index)?
            .child
            .as_ref()?
            .id()
    }
}

/// `spec` writing its logs to `<dir>/<name>.log` too, when there is a `dir`.
fn with_log(mut spec: ChildSpec, dir: Option<&Path>) -> ChildSpec {
    spec.log_file = dir.map(|dir| dir.join(format!("{}.log", spec.name)));
    spec
}

fn replica_name(role: Role, index: usize) -> String {
    if index == 0 {
        role.name().to_owned()
    } else {
        format!("{}#{}", role.name(), index + 1)
    }
}

/// Deletes a stack's queues and exchanges, and drops its schemas (`{schema}_*`).
pub async fn remove_namespace(
    amqp_url: &str,
    database_url: &str,
    schema: &str,
    topology: &Topology,
) -> Result<()> {
    if let Ok(connection) = optout_amqp::connect(amqp_url).await
        && let Ok(channel) = connection.create_channel().await
    {
        drop(optout_amqp::teardown(&channel, topology).await);
    }
    drop_schemas(database_url, schema).await
}

/// Drops every schema named `{base}_*`.
async fn drop_schemas(database_url: &str, base: &str) -> Result<()> {
    use sqlx::Connection as _;
    let mut connection = sqlx::PgConnection::connect(database_url)
        .await
        .context("connecting to PostgreSQL")?;
    let pattern = format!("{}\\_%", base.replace('_', "\\_"));
    let schemas: Vec<(String,)> = sqlx::query_as(
        "SELECT schema_name::text FROM information_schema.schemata WHERE schema_name LIKE $1",
    )
    .bind(pattern)
    .fetch_all(&mut connection)
    .await?;
    for (schema,) in schemas {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        )))
        .execute(&mut connection)
        .await?;
    }
    Ok(())
}

/// The opt-out field of a record: `HasOptedOutOfEmail`, or `PersonHasOptedOutOfEmail` on a
/// Person Account.
pub fn opted_out(record: &Value) -> Option<bool> {
    let object = record
        .pointer("/attributes/type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let key = if object == "Account" {
        "PersonHasOptedOutOfEmail"
    } else {
        "HasOptedOutOfEmail"
    };
    record.get(key).and_then(Value::as_bool)
}

/// `Object/Id` of a record, for messages.
pub fn record_label(record: &Value) -> String {
    format!(
        "{}/{}",
        record
            .pointer("/attributes/type")
            .and_then(Value::as_str)
            .unwrap_or("?"),
        record.get("Id").and_then(Value::as_str).unwrap_or("?")
    )
}

/// Whether a record is a converted Lead.
pub fn is_converted_lead(record: &Value) -> bool {
    record
        .get("IsConverted")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Polls `probe` every 100 ms until it returns `Some`, or fails after `timeout` with the last
/// reason it gave.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Result<T, String>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match probe().await? {
            Ok(value) => return Ok(value),
            Err(reason) => {
                if tokio::time::Instant::now() >= deadline {
                    bail!("{what}: not reached within {timeout:?}: {reason}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

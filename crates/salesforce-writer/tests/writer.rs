//! Integration tests of the writer: the sandbox's Salesforce in-process, real RabbitMQ and
//! PostgreSQL, and a fake Decisions service whose answers each test sets.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use optout_amqp::{Publisher, Topology};
use optout_proto::admin::v1::admin_client::AdminClient;
use optout_proto::admin::v1::{GetStatusRequest, GetStatusResponse, TriggerSyncRequest};
use optout_proto::evaluator::v1::decisions_server::{Decisions, DecisionsServer};
use optout_proto::evaluator::v1::{
    AckOptInRequest, AckOptInResponse, DecideRequest, DecideResponse, Decision, ExplainRequest,
    ExplainResponse, PersonDecision,
};
use optout_proto::queue::v1::PersonsDirty;
use optout_salesforce_writer::Config;
use optout_salesforce_writer::plan::{self, SfObject};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const ADMIN_TOKEN: &str = "test-admin-token";
const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Fake Decisions service
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct FakeDecisions {
    inner: Arc<Mutex<FakeState>>,
}

#[derive(Debug, Default)]
struct FakeState {
    decisions: HashMap<String, PersonDecision>,
    /// Emails whose version moves once, right after the first Decide that returned them.
    move_once: HashMap<String, bool>,
    decide_calls: HashMap<String, u32>,
    acks: Vec<(String, i64)>,
}

impl FakeDecisions {
    fn set(&self, email: &str, decision: Decision, evidence: i64) {
        let mut state = self.inner.lock().expect("fake state");
        let version = state
            .decisions
            .get(email)
            .map_or(1, |previous| previous.version + 1);
        state.decisions.insert(
            email.to_owned(),
            PersonDecision {
                email: email.to_owned(),
                decision: decision as i32,
                version,
                opt_in_evidence_id: evidence,
                rule: format!("test rule {decision:?}"),
                ..PersonDecision::default()
            },
        );
    }

    fn move_version_once(&self, email: &str) {
        self.inner
            .lock()
            .expect("fake state")
            .move_once
            .insert(email.to_owned(), true);
    }

    fn acks(&self) -> Vec<(String, i64)> {
        self.inner.lock().expect("fake state").acks.clone()
    }

    fn decide_calls(&self, email: &str) -> u32 {
        self.inner
            .lock()
            .expect("fake state")
            .decide_calls
            .get(email)
            .copied()
            .unwrap_or(0)
    }
}

#[tonic::async_trait]
impl Decisions for FakeDecisions {
    async fn decide(
        &self,
        request: Request<DecideRequest>,
    ) -> Result<Response<DecideResponse>, Status> {
        let mut state = self.inner.lock().expect("fake state");
        let mut decisions = Vec::new();
        for email in request.into_inner().emails {
            *state.decide_calls.entry(email.clone()).or_default() += 1;
            let decision = state
                .decisions
                .get(&email)
                .cloned()
                .unwrap_or_else(|| PersonDecision {
                    email: email.clone(),
                    decision: Decision::NoChange as i32,
                    version: 0,
                    opt_in_evidence_id: 0,
                    rule: "no members".to_owned(),
                    ..PersonDecision::default()
                });
            decisions.push(decision);
            if state.move_once.get(&email) == Some(&true) {
                state.move_once.insert(email.clone(), false);
                if let Some(stored) = state.decisions.get_mut(&email) {
                    stored.version += 1;
                }
            }
        }
        Ok(Response::new(DecideResponse { decisions }))
    }

    async fn ack_opt_in(
        &self,
        request: Request<AckOptInRequest>,
    ) -> Result<Response<AckOptInResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.inner.lock().expect("fake state");
        state
            .acks
            .push((request.email.clone(), request.opt_in_evidence_id));
        if let Some(stored) = state.decisions.get_mut(&request.email)
            && stored.opt_in_evidence_id == request.opt_in_evidence_id
        {
            stored.opt_in_evidence_id = 0;
        }
        Ok(Response::new(AckOptInResponse { cleared: true }))
    }

    async fn explain(
        &self,
        _request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Bearer;

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let value = format!("Bearer {ADMIN_TOKEN}")
            .parse()
            .map_err(|_| Status::internal("header"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

struct TestApp {
    sandbox: Option<optout_sandbox::Sandbox>,
    http: reqwest::Client,
    control_url: String,
    stats_url: String,
    fake: FakeDecisions,
    admin: AdminClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>,
    writer_address: SocketAddr,
    publisher: Publisher,
    topology: Topology,
    amqp: lapin::Connection,
    database: sqlx::PgPool,
    schema: String,
    shutdown: CancellationToken,
    writer: Option<tokio::task::JoinHandle<optout_salesforce_writer::Result<()>>>,
    fake_stop: CancellationToken,
    config: Config,
}

impl TestApp {
    async fn spawn(person_accounts: bool) -> Result<Self> {
        Self::spawn_with(person_accounts, &[]).await
    }

    async fn spawn_with(person_accounts: bool, extra_args: &[&str]) -> Result<Self> {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let sandbox = optout_sandbox::Sandbox::start(optout_sandbox::SandboxConfig {
            seed: 7,
            audiences: 1,
            members: 0,
            person_accounts,
            ..Default::default()
        })
        .await
        .context("failed to start the sandbox")?;
        let info = sandbox.info().clone();

        let fake = FakeDecisions::default();
        let fake_listener = TcpListener::bind("127.0.0.1:0").await?;
        let fake_address = fake_listener.local_addr()?;
        let fake_stop = CancellationToken::new();
        let fake_stopped = fake_stop.clone();
        let fake_service = fake.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(DecisionsServer::new(fake_service))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(fake_listener),
                    async move { fake_stopped.cancelled().await },
                )
                .await
        });

        let schema_prefix = format!("wtest_{}", &tag[..12]);
        let prefix = format!("wtest-{}.", &tag[..12]);
        let ca_file = info.salesforce_ca_file.display().to_string();
        let evaluator_url = format!("http://{fake_address}");
        let mut args = vec![
            "--salesforce-login-url",
            &info.salesforce_login_url,
            "--salesforce-client-id",
            &info.salesforce_client_id,
            "--salesforce-client-secret",
            &info.salesforce_client_secret,
            "--salesforce-ca-file",
            &ca_file,
            "--evaluator-url",
            &evaluator_url,
            "--amqp-url",
            AMQP_URL,
            "--queue-prefix",
            &prefix,
            "--database-url",
            DATABASE_URL,
            "--database-schema",
            &schema_prefix,
            "--admin-token",
            ADMIN_TOKEN,
            "--poll-interval-secs",
            "0",
            "--batch-wait-ms",
            "100",
        ];
        args.extend_from_slice(extra_args);
        let config = Config::try_parse_from_args(args)?;
        let kept_config = config.clone();
        let topology = config.topology();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let writer_address = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let writer = tokio::spawn(optout_salesforce_writer::serve(
            config,
            listener,
            shutdown.clone(),
        ));

        let admin = connect_admin(writer_address).await?;
        let amqp = optout_amqp::connect(AMQP_URL)
            .await
            .context("RabbitMQ must run at 127.0.0.1:5672 (guest/guest); start it with `rabbitmq-server -detached`")?;
        let database = sqlx::PgPool::connect(DATABASE_URL).await.context(
            "PostgreSQL must run at 127.0.0.1:5432 (trust auth); start it with `pg_ctlcluster`",
        )?;
        let mut app = Self {
            sandbox: Some(sandbox),
            http: reqwest::Client::new(),
            control_url: info.control_url.trim_end_matches('/').to_owned(),
            stats_url: info.stats_url.clone(),
            fake,
            admin,
            writer_address,
            publisher: Publisher::new(&amqp, topology.clone()).await?,
            topology,
            amqp,
            database,
            schema: format!("{schema_prefix}_writer"),
            shutdown,
            writer: Some(writer),
            fake_stop,
            config: kept_config,
        };
        app.wait_until_ready().await?;
        // The publisher was made before the writer declared the topology; that is fine since
        // publishing only needs the exchange, which exists once the writer is ready.
        app.publisher = Publisher::new(&app.amqp, app.topology.clone()).await?;
        Ok(app)
    }

    async fn wait_until_ready(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match self.admin.get_status(GetStatusRequest {}).await {
                Ok(_) => return Ok(()),
                Err(status)
                    if tokio::time::Instant::now() < deadline
                        && status.code() == tonic::Code::Unavailable =>
                {
                    if self
                        .writer
                        .as_ref()
                        .is_some_and(tokio::task::JoinHandle::is_finished)
                    {
                        let result = self.writer.take().context("writer handle")?.await?;
                        bail!("writer stopped during start-up: {result:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => bail!("writer never became ready: {status}"),
            }
        }
    }

    async fn status(&mut self) -> Result<GetStatusResponse> {
        Ok(self
            .admin
            .get_status(GetStatusRequest {})
            .await?
            .into_inner())
    }

    async fn create(&self, object: &str, fields: Value) -> Result<String> {
        let response = self
            .http
            .post(format!("{}/salesforce/records/{object}", self.control_url))
            .json(&fields)
            .send()
            .await?
            .error_for_status()?;
        let body: Value = response.json().await?;
        body.get("id")
            .or_else(|| body.get("Id"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("no id in {body}"))
    }

    async fn records(&self, email: &str) -> Result<Vec<Value>> {
        let response = self
            .http
            .get(format!("{}/salesforce/records", self.control_url))
            .query(&[("email", email)])
            .send()
            .await?
            .error_for_status()?;
        let body: Value = response.json().await?;
        let records = match body {
            Value::Array(records) => records,
            Value::Object(mut object) => match object.remove("records") {
                Some(Value::Array(records)) => records,
                _ => bail!("unexpected records body"),
            },
            _ => bail!("unexpected records body"),
        };
        Ok(records)
    }

    async fn edit(&self, object: &str, id: &str, fields: Value) -> Result<()> {
        self.http
            .patch(format!(
                "{}/salesforce/records/{object}/{id}",
                self.control_url
            ))
            .json(&fields)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    async fn salesforce_calls(&self) -> Result<HashMap<String, u64>> {
        let stats: Value = self
            .http
            .get(&self.stats_url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let calls = stats
            .get("calls")
            .and_then(|calls| calls.get("salesforce"))
            .and_then(Value::as_object)
            .map(|calls| {
                calls
                    .iter()
                    .map(|(key, value)| (key.clone(), value.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(calls)
    }

    async fn publish(&self, emails: &[&str]) -> Result<()> {
        self.publish_with(emails, &lapin::types::FieldTable::default())
            .await
    }

    async fn publish_with(
        &self,
        emails: &[&str],
        headers: &lapin::types::FieldTable,
    ) -> Result<()> {
        let mut by_partition: HashMap<u16, Vec<String>> = HashMap::new();
        for email in emails {
            by_partition
                .entry(self.topology.partition_for(email))
                .or_default()
                .push((*email).to_owned());
        }
        for (partition, emails) in by_partition {
            let body = PersonsDirty {
                emails,
                reason: "test".to_owned(),
            };
            self.publisher
                .publish_typed(
                    &self.topology.persons_dirty_routing_key(partition),
                    "optout.queue.v1.PersonsDirty",
                    &body,
                    headers.clone(),
                )
                .await?;
        }
        Ok(())
    }

    /// The trace ids of `email`'s audit rows.
    async fn audit_trace_ids(&self, email: &str) -> Result<Vec<Option<String>>> {
        Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT trace_id FROM \"{}\".audit_log WHERE email = $1 ORDER BY id",
            self.schema
        )))
        .bind(email)
        .fetch_all(&self.database)
        .await?)
    }

    async fn audit_rows(&self, email: &str) -> Result<Vec<(String, bool, bool, String, String)>> {
        let rows: Vec<(String, bool, bool, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT object, old_value, new_value, reason, \"trigger\" FROM \"{}\".audit_log WHERE email = $1 ORDER BY id",
            self.schema
        )))
        .bind(email)
        .fetch_all(&self.database)
        .await?;
        Ok(rows)
    }

    /// Waits until the writer holds no deliveries and is idle, and the queues are drained.
    async fn wait_idle(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let status = self.status().await?;
            let queued: u64 = status
                .queues
                .iter()
                .filter(|queue| !queue.name.ends_with(".dlq"))
                .map(|queue| queue.messages)
                .sum();
            if status.in_flight == 0 && !status.busy && queued == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("writer never became idle: {status:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        if let Some(writer) = self.writer.take() {
            tokio::time::timeout(DEADLINE, writer)
                .await
                .context("writer did not stop")???;
        }
        self.fake_stop.cancel();
        let channel = self.amqp.create_channel().await?;
        optout_amqp::teardown(&channel, &self.topology).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        )))
        .execute(&self.database)
        .await?;
        if let Some(sandbox) = self.sandbox.take() {
            sandbox.shutdown().await;
        }
        Ok(())
    }
}

async fn connect_admin(
    address: SocketAddr,
) -> Result<AdminClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{address}"))?.connect_lazy();
    Ok(AdminClient::with_interceptor(channel, Bearer))
}

trait ParseArgs: Sized {
    fn try_parse_from_args<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<Self>;
}

impl ParseArgs for Config {
    fn try_parse_from_args<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        use clap::Parser;
        let all = std::iter::once("optout-salesforce-writer").chain(args);
        Ok(Config::try_parse_from(all)?)
    }
}

fn opted_out(record: &Value) -> Option<bool> {
    record
        .get("HasOptedOutOfEmail")
        .or_else(|| record.get("PersonHasOptedOutOfEmail"))
        .and_then(Value::as_bool)
}

fn record_type(record: &Value) -> String {
    record
        .pointer("/attributes/type")
        .or_else(|| record.get("type"))
        .or_else(|| record.get("object"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn is_converted(record: &Value) -> bool {
    record.get("IsConverted").and_then(Value::as_bool) == Some(true)
}

/// Waits until every record of each email is checked (`true`) or unchecked, skipping converted Leads.
async fn wait_for_value(app: &TestApp, emails: &[&str], value: bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    for email in emails {
        loop {
            let records = app.records(email).await?;
            let relevant: Vec<&Value> = records
                .iter()
                .filter(|record| !is_converted(record))
                .collect();
            if !relevant.is_empty()
                && relevant
                    .iter()
                    .all(|record| opted_out(record) == Some(value))
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("records of {email} never reached {value}: {records:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_outs_check_every_contact_and_lead_with_few_calls_and_an_audit_row_each() -> Result<()>
{
    let mut app = TestApp::spawn(false).await?;
    let emails: Vec<String> = (0..250)
        .map(|index| format!("person{index}@example.com"))
        .collect();
    for (index, email) in emails.iter().enumerate() {
        // Mixed case in Salesforce: matching must ignore it.
        let stored = if index % 2 == 0 {
            email.to_uppercase()
        } else {
            email.clone()
        };
        app.create(
            "Contact",
            json!({"LastName": "C", "Email": stored, "HasOptedOutOfEmail": false}),
        )
        .await?;
        app.create(
            "Lead",
            json!({"LastName": "L", "Company": "X", "Email": stored, "HasOptedOutOfEmail": false}),
        )
        .await?;
        app.fake.set(email, Decision::OptOut, 0);
    }
    // A converted Lead must be left alone.
    let converted = app
        .create("Lead", json!({"LastName": "V", "Company": "X", "Email": emails[0], "HasOptedOutOfEmail": false}))
        .await?;
    app.http
        .post(format!(
            "{}/salesforce/leads/{converted}/convert",
            app.control_url
        ))
        .send()
        .await?
        .error_for_status()?;
    // One email's decision moves while it is written: the writer must notice and go round again.
    app.fake.move_version_once(&emails[1]);

    let before = app.salesforce_calls().await?;
    let refs: Vec<&str> = emails.iter().map(String::as_str).collect();
    app.publish(&refs).await?;
    wait_for_value(&app, &refs, true).await?;
    app.wait_idle().await?;
    app.wait_for_no_staged_rows().await?;

    let converted_record = app
        .records(&emails[0])
        .await?
        .into_iter()
        .find(|record| record.get("Id").and_then(Value::as_str) == Some(converted.as_str()))
        .context("converted lead")?;
    assert_eq!(
        opted_out(&converted_record),
        Some(false),
        "converted lead was written"
    );

    let mut changed = 0u64;
    for email in &emails {
        // Converting the Lead made a Contact too, which must be checked like any other.
        let writable = app
            .records(email)
            .await?
            .iter()
            .filter(|record| !is_converted(record))
            .count();
        changed += writable as u64;
        let rows = app.audit_rows(email).await?;
        assert_eq!(rows.len(), writable, "audit rows of {email}: {rows:?}");
        assert!(rows.iter().all(|(_, old, new, reason, trigger)| !old
            && *new
            && trigger == "mailchimp"
            && reason.contains("OptOut")));
    }

    let after = app.salesforce_calls().await?;
    let writes: u64 = after
        .iter()
        .filter(|(endpoint, _)| endpoint.contains("composite") || endpoint.contains("jobs/ingest"))
        .map(|(endpoint, count)| count - before.get(endpoint).copied().unwrap_or(0))
        .sum();
    // The four partitions' batches are written in one pass: full collections of 200 records,
    // one read per object (and one more per object for the email republished after its
    // decision moved, whose records are then already right).
    assert!(
        writes <= changed.div_ceil(200),
        "{writes} write calls for {changed} records: {after:?}"
    );
    let reads = after.get("GET /query").copied().unwrap_or(0)
        - before.get("GET /query").copied().unwrap_or(0);
    assert!(reads <= 4, "{reads} reads for 250 emails: {after:?}");

    let status = app.status().await?;
    let written = status.counters.get("written_contact").copied().unwrap_or(0)
        + status.counters.get("written_lead").copied().unwrap_or(0);
    assert_eq!(written as u64, changed, "counters: {:?}", status.counters);
    assert_eq!(status.counters.get("written_lead"), Some(&250));
    assert_eq!(status.counters.get("write_failures"), Some(&0));
    assert!(
        status.counters.get("republished").copied().unwrap_or(0) >= 1,
        "moved decision not republished"
    );
    assert!(
        app.fake.decide_calls(&emails[1]) >= 3,
        "moved decision not re-decided"
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_ends_a_sync_batch_and_its_partitions_are_written_in_one_pass() -> Result<()> {
    // Sync batch windows far beyond the test's deadline: only the flushes can close the batches.
    let mut app = TestApp::spawn_with(
        false,
        &[
            "--sync-batch-idle-ms",
            "600000",
            "--sync-batch-max-ms",
            "1200000",
        ],
    )
    .await?;
    let emails: Vec<String> = (0..40)
        .map(|index| format!("flush{index}@example.com"))
        .collect();
    for email in &emails {
        app.create(
            "Contact",
            json!({"LastName": "C", "Email": email, "HasOptedOutOfEmail": false}),
        )
        .await?;
        app.fake.set(email, Decision::OptOut, 0);
    }
    let refs: Vec<&str> = emails.iter().map(String::as_str).collect();
    let before = app.salesforce_calls().await?;
    // A sync's notifications (not urgent), then the evaluator's flush on every partition.
    app.publish(&refs).await?;
    for partition in 0..app.topology.persons_partitions() {
        app.publisher
            .publish_typed(
                &app.topology.persons_dirty_routing_key(partition),
                "optout.queue.v1.PersonsDirty",
                &PersonsDirty {
                    emails: Vec::new(),
                    reason: "sync run done".to_owned(),
                },
                optout_amqp::flush_headers(),
            )
            .await?;
    }
    wait_for_value(&app, &refs, true).await?;
    app.wait_idle().await?;
    let after = app.salesforce_calls().await?;
    let reads = after.get("GET /query").copied().unwrap_or(0)
        - before.get("GET /query").copied().unwrap_or(0);
    // One pass over every partition: one read per object (Contact and Lead).
    assert!(reads <= 2, "{reads} reads for one flushed sync: {after:?}");
    let status = app.status().await?;
    assert_eq!(status.counters.get("written_contact"), Some(&40));
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_ins_uncheck_only_with_evidence_and_are_acknowledged() -> Result<()> {
    let mut app = TestApp::spawn(false).await?;
    let (quiet, without, with) = (
        "quiet@example.com",
        "no-evidence@example.com",
        "evidence@example.com",
    );
    for email in [quiet, without, with] {
        app.create(
            "Contact",
            json!({"LastName": "C", "Email": email, "HasOptedOutOfEmail": true}),
        )
        .await?;
        app.create(
            "Lead",
            json!({"LastName": "L", "Company": "X", "Email": email, "HasOptedOutOfEmail": true}),
        )
        .await?;
    }

    // No target at all: the batch is acked without a single Salesforce call.
    app.fake.set(quiet, Decision::NoChange, 0);
    let before = app.salesforce_calls().await?;
    app.publish(&[quiet]).await?;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while app.fake.decide_calls(quiet) == 0 {
        if tokio::time::Instant::now() > deadline {
            bail!("quiet email never decided");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.wait_idle().await?;
    assert_eq!(
        app.salesforce_calls().await?,
        before,
        "a batch without targets called Salesforce"
    );

    app.fake.set(without, Decision::OptIn, 0);
    app.fake.set(with, Decision::OptIn, 77);
    app.publish(&[without, with]).await?;
    wait_for_value(&app, &[with], false).await?;
    app.wait_idle().await?;
    let records = app.records(without).await?;
    assert!(
        records.iter().all(|record| opted_out(record) == Some(true)),
        "unchecked without evidence: {records:?}"
    );
    assert!(app.audit_rows(without).await?.is_empty());
    assert_eq!(app.fake.acks(), [(with.to_owned(), 77)]);
    let rows = app.audit_rows(with).await?;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|(_, old, new, _, _)| *old && !new));
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_uncheck_is_rechecked_by_a_triggered_poll_cycle() -> Result<()> {
    let mut app = TestApp::spawn(false).await?;
    let email = "drift@example.com";
    let contact = app
        .create(
            "Contact",
            json!({"LastName": "C", "Email": email, "HasOptedOutOfEmail": true}),
        )
        .await?;
    let lead = app
        .create(
            "Lead",
            json!({"LastName": "L", "Company": "X", "Email": email, "HasOptedOutOfEmail": true}),
        )
        .await?;
    app.fake.set(email, Decision::OptOut, 0);

    app.edit("Contact", &contact, json!({"HasOptedOutOfEmail": false}))
        .await?;
    let records = app.records(email).await?;
    assert!(
        records
            .iter()
            .any(|record| opted_out(record) == Some(false)),
        "manual uncheck did not apply"
    );

    let run_id = app
        .admin
        .trigger_sync(TriggerSyncRequest {
            full: false,
            dry_run: false,
            ..Default::default()
        })
        .await?;
    let run_id = run_id.into_inner().run_id;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = app.status().await?;
        if status.last_run_id == run_id && status.last_run_finished {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("poll cycle {run_id} never finished: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_value(&app, &[email], true).await?;
    let rows = app.audit_rows(email).await?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, "Contact");
    assert_eq!(rows[0].4, "salesforce-poll");
    let lead_record = app
        .records(email)
        .await?
        .into_iter()
        .find(|record| record.get("Id").and_then(Value::as_str) == Some(lead.as_str()))
        .context("lead")?;
    assert_eq!(record_type(&lead_record), "Lead");
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_needs_the_token_and_health_reports_serving() -> Result<()> {
    let app = TestApp::spawn(false).await?;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", app.writer_address))?
            .connect()
            .await?;
    let refused = AdminClient::new(channel.clone())
        .get_status(GetStatusRequest {})
        .await;
    assert_eq!(
        refused.err().map(|status| status.code()),
        Some(tonic::Code::Unauthenticated)
    );
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_rows_are_retried_and_large_diffs_go_through_bulk_jobs() -> Result<()> {
    let mut app = TestApp::spawn_with(false, &["--bulk-threshold", "20"]).await?;
    let emails: Vec<String> = (0..120)
        .map(|index| format!("locked{index}@example.com"))
        .collect();
    for email in &emails {
        app.create(
            "Contact",
            json!({"LastName": "C", "Email": email, "HasOptedOutOfEmail": false}),
        )
        .await?;
        app.fake.set(email, Decision::OptOut, 0);
    }
    app.http
        .put(format!("{}/faults", app.control_url))
        .json(&json!({"unable_to_lock_row_rate": 0.3}))
        .send()
        .await?
        .error_for_status()?;
    let refs: Vec<&str> = emails.iter().map(String::as_str).collect();
    app.publish(&refs).await?;
    wait_for_value(&app, &refs, true).await?;
    app.wait_idle().await?;
    for email in &emails {
        let rows = app.audit_rows(email).await?;
        assert_eq!(rows.len(), 1, "audit rows of {email}: {rows:?}");
    }
    let status = app.status().await?;
    assert!(
        status.counters.get("bulk_jobs").copied().unwrap_or(0) >= 1,
        "{:?}",
        status.counters
    );
    assert_eq!(status.counters.get("written_contact"), Some(&120));
    assert_eq!(status.counters.get("write_failures"), Some(&0));
    // Passes that retried records and went through bulk jobs remove their rows too.
    app.wait_for_no_staged_rows().await?;
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_writer_removes_the_rows_of_passes_that_died_and_keeps_live_ones() -> Result<()>
{
    let mut app = TestApp::spawn(false).await?;
    // Pass -1 died an hour and a half ago with its process; pass -2 is another replica's, under way.
    for (table, columns, values) in [
        (
            "pass_emails",
            "pass, email, staged_at",
            "($1, 'gone@example.com', now() - interval '90 minutes'), ($2, 'live@example.com', now())",
        ),
        (
            "pass_changes",
            "pass, object, record_id, email, old_value, new_value, reason, version, staged_at",
            "($1, 'Contact', '003000000000001AAA', 'gone@example.com', false, true, 'r', 1, now() - interval '90 minutes'), \
             ($2, 'Contact', '003000000000002AAA', 'live@example.com', false, true, 'r', 1, now())",
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO \"{}\".{table} ({columns}) VALUES {values}",
            app.schema
        )))
        .bind(-1_i64)
        .bind(-2_i64)
        .execute(&app.database)
        .await?;
    }
    app.stop_writer().await?;
    app.restart().await?;
    assert_eq!(
        app.staged_rows(Some(-1)).await?,
        0,
        "a dead pass's rows were kept"
    );
    assert_eq!(
        app.staged_rows(Some(-2)).await?,
        2,
        "a live pass's rows were removed"
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_of_several_decide_requests_reads_in_full_statements_and_writes_once_per_object()
-> Result<()> {
    let mut app = TestApp::spawn_with(false, &["--bulk-threshold", "20"]).await?;
    // 2,300 emails in one pass: three Decide requests, and long addresses, so each object's
    // reads take several statements. Opt-outs whose records need checking, opt-outs already
    // right, opt-ins with evidence, and opt-outs without records, spread over the whole pass.
    let emails: Vec<String> = (0..2300)
        .map(|index| format!("a-long-address-to-fill-statements-{index:04}@example.com"))
        .collect();
    let mut to_check = Vec::new();
    let mut evidence = Vec::new();
    for (index, email) in emails.iter().enumerate() {
        let (checked, decision, evidence_id) = match index % 20 {
            0 => (true, Decision::OptIn, 10_000 + index as i64),
            1 => (true, Decision::OptOut, 0),
            2 => (false, Decision::OptOut, 0),
            _ => {
                app.fake.set(email, Decision::OptOut, 0);
                continue;
            }
        };
        app.create(
            "Contact",
            json!({"LastName": "S", "Email": email, "HasOptedOutOfEmail": checked}),
        )
        .await?;
        app.create(
            "Lead",
            json!({"LastName": "S", "Company": "X", "Email": email, "HasOptedOutOfEmail": checked}),
        )
        .await?;
        app.fake.set(email, decision, evidence_id);
        if evidence_id != 0 {
            evidence.push((email.clone(), evidence_id));
        } else if !checked {
            to_check.push(email.as_str());
        }
    }
    // Every email has a target, so the fewest reads are those of packing all of them at once;
    // packing each Decide answer on its own would end a partly filled statement per object per
    // answer.
    let fewest: usize = [SfObject::Contact, SfObject::Lead]
        .iter()
        .map(|object| plan::read_queries(*object, &emails, false).len())
        .sum();
    let per_answer: usize = emails
        .chunks(1000)
        .flat_map(|chunk| {
            [SfObject::Contact, SfObject::Lead]
                .map(|object| plan::read_queries(object, chunk, false).len())
        })
        .sum();
    assert!(fewest < per_answer, "{fewest} reads against {per_answer}");

    let before = app.salesforce_calls().await?;
    // Without a trace of its own (no exporter here), each audit row names the trace of the
    // message that carried its email: alternate emails come in messages of two traces.
    let traces = [
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "0af7651916cd43dd8448eb211c80319c",
    ];
    let trace_of = |email: &str| {
        let index = emails.iter().position(|candidate| candidate == email);
        traces[index.unwrap_or(0) % 2]
    };
    for (parity, trace_id) in traces.iter().enumerate() {
        let refs: Vec<&str> = emails
            .iter()
            .skip(parity)
            .step_by(2)
            .map(String::as_str)
            .collect();
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "traceparent".into(),
            lapin::types::AMQPValue::LongString(
                format!("00-{trace_id}-00f067aa0ba902b7-01").into(),
            ),
        );
        app.publish_with(&refs, &headers).await?;
    }
    wait_for_value(&app, &to_check, true).await?;
    app.wait_idle().await?;
    let after = app.salesforce_calls().await?;
    let delta = |endpoint: &str| {
        after.get(endpoint).copied().unwrap_or(0) - before.get(endpoint).copied().unwrap_or(0)
    };

    // Written together: one Bulk job per object for the whole pass (230 records each: 115 to
    // check, 115 to uncheck).
    assert_eq!(delta("POST /jobs/ingest"), 2, "calls: {after:?}");
    assert_eq!(delta("PATCH /composite/sobjects"), 0, "calls: {after:?}");
    assert_eq!(delta("GET /query"), fewest as u64, "calls: {after:?}");
    for email in &to_check {
        let rows = app.audit_rows(email).await?;
        assert_eq!(rows.len(), 2, "audit rows of {email}: {rows:?}");
        let trace_id = trace_of(email).to_owned();
        assert_eq!(
            app.audit_trace_ids(email).await?,
            [Some(trace_id.clone()), Some(trace_id)],
            "{email}"
        );
    }
    for (email, _) in &evidence {
        let records = app.records(email).await?;
        assert!(
            records
                .iter()
                .all(|record| opted_out(record) == Some(false)),
            "opt-in of {email} not written: {records:?}"
        );
    }
    // Opt-in evidence of the first answers is acknowledged too, once the pass has written.
    let mut acks = app.fake.acks();
    acks.sort();
    assert_eq!(acks, evidence);
    let status = app.status().await?;
    assert_eq!(
        status.counters.get("written_contact"),
        Some(&(to_check.len() as i64 + evidence.len() as i64))
    );
    assert_eq!(status.counters.get("write_failures"), Some(&0));
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn person_accounts_are_written_through_the_account() -> Result<()> {
    let mut app = TestApp::spawn(true).await?;
    let email = "person@example.com";
    app.create(
        "Account",
        json!({"LastName": "P", "PersonEmail": email, "PersonHasOptedOutOfEmail": false}),
    )
    .await?;
    app.create(
        "Contact",
        json!({"LastName": "C", "Email": email, "HasOptedOutOfEmail": false}),
    )
    .await?;
    app.fake.set(email, Decision::OptOut, 0);
    app.publish(&[email]).await?;
    wait_for_value(&app, &[email], true).await?;
    app.wait_idle().await?;
    let mut objects: Vec<String> = app
        .audit_rows(email)
        .await?
        .into_iter()
        .map(|row| row.0)
        .collect();
    objects.sort();
    assert_eq!(objects, ["Contact", "PersonAccount"]);
    app.stop().await
}

// ---------------------------------------------------------------------------------------------
// Operations: dry run, dead letters, Records, pause/resume, graceful shutdown
// ---------------------------------------------------------------------------------------------

type Records = optout_proto::writer::v1::records_client::RecordsClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

impl TestApp {
    fn records_client(&self) -> Result<Records> {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.writer_address))?
                .connect_lazy();
        Ok(
            optout_proto::writer::v1::records_client::RecordsClient::with_interceptor(
                channel, Bearer,
            ),
        )
    }

    async fn set_faults(&self, faults: Value) -> Result<()> {
        self.http
            .put(format!("{}/faults", self.control_url))
            .json(&faults)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Rows the write passes have staged (`pass_emails` and `pass_changes`), of `pass` alone when
    /// given.
    async fn staged_rows(&self, pass: Option<i64>) -> Result<i64> {
        let mut total = 0;
        for table in ["pass_emails", "pass_changes"] {
            let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM \"{}\".{table} WHERE $1::int8 IS NULL OR pass = $1",
                self.schema
            )))
            .bind(pass)
            .fetch_one(&self.database)
            .await?;
            total += rows;
        }
        Ok(total)
    }

    /// Waits until every pass has removed its staged rows, as each does when it ends.
    async fn wait_for_no_staged_rows(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let rows = self.staged_rows(None).await?;
            if rows == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{rows} staged rows left behind by ended passes");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the writer as SIGTERM would (the signal handler only cancels this token) and waits for it.
    async fn stop_writer(&mut self) -> Result<()> {
        self.shutdown.cancel();
        if let Some(writer) = self.writer.take() {
            tokio::time::timeout(DEADLINE, writer)
                .await
                .context("writer did not stop within the deadline")???;
        }
        Ok(())
    }

    /// Starts a new writer on the same schema and queues.
    async fn restart(&mut self) -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        self.writer_address = listener.local_addr()?;
        self.shutdown = CancellationToken::new();
        self.writer = Some(tokio::spawn(optout_salesforce_writer::serve(
            self.config.clone(),
            listener,
            self.shutdown.clone(),
        )));
        self.admin = connect_admin(self.writer_address).await?;
        self.wait_until_ready().await
    }

    /// Every dead letter of the `persons.dirty` queues, through the Admin API.
    async fn dead_letters(&mut self) -> Result<Vec<optout_proto::admin::v1::DeadLetter>> {
        Ok(self
            .admin
            .list_dead_letters(optout_proto::admin::v1::ListDeadLettersRequest { limit: 0 })
            .await?
            .into_inner()
            .dead_letters)
    }

    /// Messages waiting in the `persons.dirty` queues (not their DLQs), read from the broker directly.
    async fn queued(&self) -> Result<u64> {
        let channel = self.amqp.create_channel().await?;
        let mut total = 0;
        for queue in self.topology.persons_dirty_queues() {
            total += optout_amqp::queue_depth(&channel, &queue).await?.0;
        }
        drop(channel.close(200, "depth read".into()).await);
        Ok(total)
    }

    /// Emails whose every writable record is checked.
    async fn checked(&self, emails: &[String]) -> Result<Vec<String>> {
        let mut checked = Vec::new();
        for email in emails {
            let records = self.records(email).await?;
            if !records.is_empty() && records.iter().all(|record| opted_out(record) == Some(true)) {
                checked.push(email.clone());
            }
        }
        Ok(checked)
    }

    /// Puts a `PersonsDirty` for `email` straight into its partition's dead-letter queue, as the writer does
    /// with a record Salesforce rejects for good.
    async fn dead_letter(&self, email: &str, reason: &str) -> Result<()> {
        let partition = self.topology.partition_for(email);
        let queue = self.topology.persons_dirty_queue(partition);
        let default_exchange = Topology {
            exchange: String::new(),
            ..self.topology.clone()
        };
        let publisher = Publisher::new(&self.amqp, default_exchange).await?;
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            optout_amqp::REASON_HEADER.into(),
            lapin::types::AMQPValue::LongString(reason.into()),
        );
        headers.insert(
            optout_amqp::ORIGINAL_ROUTING_KEY_HEADER.into(),
            lapin::types::AMQPValue::LongString(
                self.topology
                    .persons_dirty_routing_key(partition)
                    .as_str()
                    .into(),
            ),
        );
        publisher
            .publish_typed(
                &self.topology.dead_letter_queue(&queue),
                "optout.queue.v1.PersonsDirty",
                &PersonsDirty {
                    emails: vec![email.to_owned()],
                    reason: "test".to_owned(),
                },
                headers,
            )
            .await?;
        Ok(())
    }

    /// Waits until the last triggered poll cycle finished.
    async fn wait_run_finished(&mut self, run_id: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let status = self.status().await?;
            if status.last_run_id == run_id && status.last_run_finished {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("run {run_id} never finished: {status:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn contacts_and_leads(&self, emails: &[String]) -> Result<()> {
        for email in emails {
            self.create(
                "Contact",
                json!({"LastName": "C", "Email": email, "HasOptedOutOfEmail": false}),
            )
            .await?;
            self.create(
                "Lead",
                json!({"LastName": "L", "Company": "X", "Email": email, "HasOptedOutOfEmail": false}),
            )
            .await?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_reports_what_the_full_reconcile_then_writes_and_writes_nothing() -> Result<()> {
    let mut app = TestApp::spawn(false).await?;
    let people: Vec<String> = (0..3)
        .map(|index| format!("dry{index}@example.com"))
        .collect();
    app.contacts_and_leads(&people).await?;
    for email in &people {
        app.fake.set(email, Decision::OptOut, 0);
    }
    // Subscribed, with evidence: a reconcile never unchecks, so it must not show up in the report either.
    app.create(
        "Contact",
        json!({"LastName": "S", "Email": "subscribed@example.com", "HasOptedOutOfEmail": true}),
    )
    .await?;
    app.fake.set("subscribed@example.com", Decision::OptIn, 5);
    // No decision: nothing to do.
    app.create(
        "Contact",
        json!({"LastName": "N", "Email": "nobody@example.com", "HasOptedOutOfEmail": false}),
    )
    .await?;

    let before = app.salesforce_calls().await?;
    let response = app
        .admin
        .trigger_sync(TriggerSyncRequest {
            audience_ids: vec![],
            full: true,
            dry_run: true,
        })
        .await?
        .into_inner();
    let report = response.dry_run_report.context("no dry-run report")?;
    let counts: Vec<(String, u64, u64)> = report
        .objects
        .iter()
        .map(|object| {
            (
                object.object.clone(),
                object.would_check,
                object.would_uncheck,
            )
        })
        .collect();
    assert_eq!(
        counts,
        [("Contact".to_owned(), 3, 0), ("Lead".to_owned(), 3, 0)],
        "{report:?}"
    );
    assert!(report.records_scanned >= 7, "{report:?}");
    let mut reported: Vec<(String, String)> = report
        .objects
        .iter()
        .flat_map(|object| {
            object.examples.iter().map(|example| {
                assert!(example.new_value && !example.old_value, "{example:?}");
                (object.object.clone(), example.record_id.clone())
            })
        })
        .collect();
    reported.sort();

    // Written nothing: no composite or bulk call, no audit row, every box as it was.
    let after = app.salesforce_calls().await?;
    for (endpoint, count) in &after {
        if endpoint.contains("composite") || endpoint.contains("jobs/ingest") {
            assert_eq!(
                Some(count),
                before.get(endpoint),
                "dry run wrote via {endpoint}"
            );
        }
    }
    for email in &people {
        assert!(app.audit_rows(email).await?.is_empty());
        assert!(
            app.records(email)
                .await?
                .iter()
                .all(|record| opted_out(record) == Some(false))
        );
    }

    // The real full reconcile writes exactly what was reported.
    let run_id = app
        .admin
        .trigger_sync(TriggerSyncRequest {
            audience_ids: vec![],
            full: true,
            dry_run: false,
        })
        .await?
        .into_inner()
        .run_id;
    app.wait_run_finished(&run_id).await?;
    let written: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT object, record_id FROM \"{}\".audit_log ORDER BY object, record_id",
        app.schema
    )))
    .fetch_all(&app.database)
    .await?;
    assert_eq!(written, reported);
    wait_for_value(
        &app,
        &people.iter().map(String::as_str).collect::<Vec<_>>(),
        true,
    )
    .await?;
    assert!(
        app.records("subscribed@example.com")
            .await?
            .iter()
            .all(|record| opted_out(record) == Some(true))
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_notification_is_dead_lettered_whole_and_the_rest_of_its_batch_is_written()
-> Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let mut app = TestApp::spawn(false).await?;
    let email = "after-garbage@example.com";
    app.contacts_and_leads(&[email.to_owned()]).await?;
    app.fake.set(email, Decision::OptOut, 0);
    // Garbage on the email's partition, then its notification, back to back (so most likely
    // one batch). The writer's consumer drops the bodies it decoded (its handler never
    // dead-letters a delivery), but not before it has dead-lettered the one it could not decode.
    let routing_key = app
        .topology
        .persons_dirty_routing_key(app.topology.partition_for(email));
    let garbage: &[u8] = b"\x0a\xff\xff\xff\xff\x0fgarbage";
    let channel = app.amqp.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_publish(
            app.topology.exchange.as_str().into(),
            routing_key.as_str().into(),
            BasicPublishOptions::default(),
            garbage,
            lapin::BasicProperties::default().with_message_id("garbage-1".into()),
        )
        .await?
        .await?;
    app.publish(&[email]).await?;

    wait_for_value(&app, &[email], true).await?;
    app.wait_idle().await?;
    let listed = app.dead_letters().await?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let dead_letter = &listed[0];
    assert!(
        dead_letter.reason.starts_with("undecodable protobuf"),
        "{dead_letter:?}"
    );
    assert_eq!(dead_letter.message_id, "garbage-1");
    assert_eq!(dead_letter.routing_key, routing_key);
    // The whole body, not what was left of it once handed over.
    assert_eq!(dead_letter.body_bytes, garbage.len() as u64);
    assert_eq!(app.queued().await?, 0);
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_replayed_one_or_all_and_purged_ending_in_the_right_state()
-> Result<()> {
    use optout_proto::admin::v1::{
        ListDeadLettersRequest, PurgeDeadLettersRequest, ReplayDeadLettersRequest,
    };
    let mut app = TestApp::spawn(false).await?;
    let emails: Vec<String> = (0..3)
        .map(|index| format!("dlq{index}@example.com"))
        .collect();
    app.contacts_and_leads(&emails).await?;
    for email in &emails {
        app.fake.set(email, Decision::OptOut, 0);
        app.dead_letter(email, "INVALID_FIELD: test rejection")
            .await?;
    }

    let listed = app.dead_letters().await?;
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.iter().all(
        |dead_letter| dead_letter.reason == "INVALID_FIELD: test rejection"
            && dead_letter.routing_key.starts_with("persons.dirty.")
            && dead_letter.queue.contains("persons.dirty.")
    ));
    // Listing takes nothing away, and nothing was written meanwhile.
    assert_eq!(
        app.admin
            .list_dead_letters(ListDeadLettersRequest { limit: 1 })
            .await?
            .into_inner()
            .dead_letters
            .len(),
        1
    );
    assert!(app.checked(&emails).await?.is_empty());

    // Replay one by id: only that person is written.
    let first = listed[0].message_id.clone();
    let replayed = app
        .admin
        .replay_dead_letters(ReplayDeadLettersRequest {
            message_ids: vec![first],
            all: false,
        })
        .await?
        .into_inner()
        .replayed;
    assert_eq!(replayed, 1);
    app.wait_idle().await?;
    let left = app.dead_letters().await?;
    assert_eq!(left.len(), 2);
    assert_eq!(app.checked(&emails).await?.len(), 1);

    // Replay all.
    let replayed = app
        .admin
        .replay_dead_letters(ReplayDeadLettersRequest {
            message_ids: vec![],
            all: true,
        })
        .await?
        .into_inner()
        .replayed;
    assert_eq!(replayed, 2);
    wait_for_value(
        &app,
        &emails.iter().map(String::as_str).collect::<Vec<_>>(),
        true,
    )
    .await?;
    for email in &emails {
        assert_eq!(app.audit_rows(email).await?.len(), 2, "{email}");
    }

    // Purge.
    app.dead_letter("gone@example.com", "poison").await?;
    let purged = app
        .admin
        .purge_dead_letters(PurgeDeadLettersRequest {})
        .await?
        .into_inner()
        .purged;
    assert_eq!(purged, 1);
    assert!(app.dead_letters().await?.is_empty());
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_for_and_audit_trail_show_salesforce_now_and_every_write() -> Result<()> {
    use optout_proto::writer::v1::{AuditTrailRequest, RecordsForRequest};
    let mut app = TestApp::spawn(false).await?;
    let email = "Explained@Example.com";
    let contact = app
        .create(
            "Contact",
            json!({"LastName": "C", "Email": email, "HasOptedOutOfEmail": false}),
        )
        .await?;
    app.create(
        "Lead",
        json!({"LastName": "L", "Company": "X", "Email": email, "HasOptedOutOfEmail": false}),
    )
    .await?;
    app.fake.set("explained@example.com", Decision::OptOut, 0);
    app.publish(&["explained@example.com"]).await?;
    wait_for_value(&app, &["explained@example.com"], true).await?;
    app.wait_idle().await?;

    let mut records = app.records_client()?;
    let found = records
        .records_for(RecordsForRequest {
            email: " EXPLAINED@example.com ".to_owned(),
        })
        .await?
        .into_inner()
        .records;
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found
            .iter()
            .all(|record| record.opted_out && record.email == "explained@example.com")
    );
    let found_contact = found
        .iter()
        .find(|record| record.id == contact)
        .context("contact")?;
    assert_eq!(found_contact.object, "Contact");
    assert_eq!(
        found_contact
            .fields
            .get("HasOptedOutOfEmail")
            .map(String::as_str),
        Some("true")
    );
    assert!(
        found_contact.fields.contains_key("LastModifiedDate"),
        "{found_contact:?}"
    );

    let trail = records
        .audit_trail(AuditTrailRequest {
            email: "explained@example.com".to_owned(),
            limit: 0,
        })
        .await?
        .into_inner()
        .entries;
    assert_eq!(trail.len(), 2, "{trail:?}");
    assert!(trail.iter().all(|entry| !entry.old_value
        && entry.new_value
        && entry.trigger == "mailchimp"
        && entry.written_at.is_some()));

    // The token guards Records like Admin.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", app.writer_address))?
            .connect_lazy();
    let denied = optout_proto::writer::v1::records_client::RecordsClient::new(channel)
        .audit_trail(AuditTrailRequest {
            email: "explained@example.com".to_owned(),
            limit: 0,
        })
        .await
        .expect_err("no token");
    assert_eq!(denied.code(), tonic::Code::Unauthenticated);
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_under_load_stops_writes_and_resuming_finishes_them_once_each() -> Result<()> {
    use optout_proto::admin::v1::{PauseRequest, ResumeRequest};
    // Batches of two: with the default size one batch can take every message at once and be
    // written before the pause lands (seen in CI); this way most of the work is still queued.
    let mut app = TestApp::spawn_with(false, &["--batch-size", "2"]).await?;
    let emails: Vec<String> = (0..120)
        .map(|index| format!("load{index}@example.com"))
        .collect();
    for email in &emails {
        app.create(
            "Contact",
            json!({"LastName": "C", "Email": email, "HasOptedOutOfEmail": false}),
        )
        .await?;
        app.fake.set(email, Decision::OptOut, 0);
    }
    // Slow Salesforce so that work is in flight when the pause lands.
    app.set_faults(json!({"salesforce": {"latency_ms": 40}}))
        .await?;
    for chunk in emails.chunks(4) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        app.publish(&refs).await?;
    }
    // Pause once some, not all, are written.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while app.checked(&emails[..10]).await?.is_empty() {
        if tokio::time::Instant::now() > deadline {
            bail!("nothing was written before the pause");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(app.admin.pause(PauseRequest {}).await?.into_inner().paused);
    // The batch in hand finishes; then nothing more is taken.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = app.status().await?;
        if status.paused && status.in_flight == 0 && !status.busy {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("writer never settled after pause: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written_at_pause = app.checked(&emails).await?.len();
    let queued_at_pause = app.queued().await?;
    // Paused: a few more polls see no progress and the queues keep their messages.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(app.queued().await?, queued_at_pause);
    }
    assert_eq!(app.checked(&emails).await?.len(), written_at_pause);
    assert!(
        queued_at_pause > 0,
        "everything was written before the pause took effect"
    );

    assert!(
        !app.admin
            .resume(ResumeRequest {})
            .await?
            .into_inner()
            .paused
    );
    wait_for_value(
        &app,
        &emails.iter().map(String::as_str).collect::<Vec<_>>(),
        true,
    )
    .await?;
    app.wait_idle().await?;
    for email in &emails {
        assert_eq!(
            app.audit_rows(email).await?.len(),
            1,
            "{email} written more or less than once"
        );
    }
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_messages_in_flight_loses_none_and_redelivers_none_already_applied()
-> Result<()> {
    // Batches of two, so the writer holds only a few deliveries at a time and the shutdown lands
    // with work both in flight and still queued, however fast the machine is.
    let mut app = TestApp::spawn_with(false, &["--batch-size", "2"]).await?;
    let emails: Vec<String> = (0..60)
        .map(|index| format!("term{index}@example.com"))
        .collect();
    for email in &emails {
        app.create(
            "Contact",
            json!({"LastName": "C", "Email": email, "HasOptedOutOfEmail": false}),
        )
        .await?;
        app.fake.set(email, Decision::OptOut, 0);
    }
    app.set_faults(json!({"salesforce": {"latency_ms": 60}}))
        .await?;
    // One message per email, so messages left in the queues and emails written can be matched up.
    for email in &emails {
        app.publish(&[email.as_str()]).await?;
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = app.status().await?;
        if status.in_flight > 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no delivery ever in flight: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.stop_writer().await?;

    let applied = app.checked(&emails).await?;
    let queued = app.queued().await?;
    // Every message is either applied (and acked) or still queued: none lost, none applied and kept.
    assert_eq!(
        applied.len() as u64 + queued,
        emails.len() as u64,
        "{} applied, {queued} still queued",
        applied.len()
    );
    assert!(
        queued > 0,
        "everything finished before the shutdown; the test proves nothing"
    );

    app.restart().await?;
    wait_for_value(
        &app,
        &emails.iter().map(String::as_str).collect::<Vec<_>>(),
        true,
    )
    .await?;
    app.wait_idle().await?;
    for email in &emails {
        assert_eq!(app.audit_rows(email).await?.len(), 1, "{email}");
    }
    app.stop().await
}

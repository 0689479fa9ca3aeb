//! Distributed tracing and metrics across the whole pipeline, in one process: the sandbox, the fetcher,
//! the rule-evaluator and this writer, exporting spans over OTLP/gRPC to a receiver run by the test.
//!
//! One Mailchimp unsubscribe is driven through a primary sync; the test then checks that the sync run
//! is one trace reaching from the fetcher's Mailchimp call to the writer's Salesforce call with an
//! unbroken chain of parents, and that each service's `/metrics` agrees with the sandbox's own counts.
//!
//! All services share this process's tracer provider, so their spans carry one `service.name`; they are
//! told apart by their span names (each is specific to one service). Across processes (`optoutctl up`)
//! each service names itself.
//!
//! Needs RabbitMQ on 127.0.0.1:5672 and PostgreSQL on 127.0.0.1:5432, like the other tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use optout_proto::admin::v1::TriggerSyncRequest;
use optout_proto::admin::v1::admin_client::AdminClient;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const TOKEN: &str = "observability-token";
const DEADLINE: Duration = Duration::from_secs(60);

/// OTLP span kinds.
const KIND_SERVER: i32 = 2;
const KIND_CLIENT: i32 = 3;
const KIND_PRODUCER: i32 = 4;
const KIND_CONSUMER: i32 = 5;

/// An in-process OTLP/gRPC trace receiver keeping every span it is sent.
#[derive(Clone, Debug, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|resource| resource.scope_spans)
            .flat_map(|scope| scope.spans);
        self.spans.lock().expect("spans").extend(spans);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("spans").clone()
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|attribute| attribute.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        AnyValue::StringValue(text) => text.clone(),
        AnyValue::IntValue(number) => number.to_string(),
        AnyValue::BoolValue(flag) => flag.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

async fn eventually<F, Fut, T>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn scrape(http: &reqwest::Client, address: SocketAddr) -> Result<String> {
    Ok(http
        .get(format!("http://{address}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    optout_telemetry::metrics::sample(text, name, labels).unwrap_or(0.0)
}

struct Listeners {
    grpc: TcpListener,
    metrics: TcpListener,
    grpc_address: SocketAddr,
    metrics_address: SocketAddr,
}

async fn listeners() -> Result<Listeners> {
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let metrics = TcpListener::bind("127.0.0.1:0").await?;
    Ok(Listeners {
        grpc_address: grpc.local_addr()?,
        metrics_address: metrics.local_addr()?,
        grpc,
        metrics,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unsubscribe_is_one_trace_across_all_services_and_the_metrics_match_the_sandbox()
-> Result<()> {
    // The OTLP receiver, and telemetry exporting to it (the environment stays untouched).
    let receiver = Receiver::default();
    let otlp_listener = TcpListener::bind("127.0.0.1:0").await?;
    let otlp_address = otlp_listener.local_addr()?;
    let stop = CancellationToken::new();
    let otlp_stop = stop.clone();
    let otlp = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(otlp_listener),
                async move { otlp_stop.cancelled().await },
            ),
    );
    let telemetry = Arc::new(optout_telemetry::init_with(
        optout_telemetry::TelemetryOptions {
            service: "optout-observability-test".to_owned(),
            otlp_endpoint: Some(format!("http://{otlp_address}")),
            batch_delay: Some(Duration::from_millis(100)),
        },
    ));
    assert!(
        telemetry.exporting(),
        "telemetry was initialised before this test"
    );

    // The sandbox, with one Contact for a subscribed member who then unsubscribes.
    let sandbox = optout_sandbox::Sandbox::start(optout_sandbox::SandboxConfig {
        seed: 5,
        audiences: 1,
        members: 40,
        ..optout_sandbox::SandboxConfig::default()
    })
    .await?;
    let info = sandbox.info().clone();
    let http = reqwest::Client::new();
    let audience = info.audiences.first().context("an audience")?.clone();
    let members: Value = http
        .get(format!("{}/lists/{audience}/members", info.mailchimp_url))
        .basic_auth("test", Some(&info.mailchimp_api_key))
        .query(&[("status", "subscribed"), ("count", "1")])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let email = members["members"][0]["email_address"]
        .as_str()
        .context("a subscribed member")?
        .to_owned();
    http.post(format!("{}/salesforce/records/Contact", info.control_url))
        .json(&serde_json::json!({
            "LastName": "Traced", "Email": email, "HasOptedOutOfEmail": false
        }))
        .send()
        .await?
        .error_for_status()?;
    http.post(format!(
        "{}/mailchimp/lists/{audience}/members/{email}/unsubscribe",
        info.control_url
    ))
    .send()
    .await?
    .error_for_status()?;
    // From here on the sandbox counts only what the services do.
    http.post(format!("{}/reset", info.stats_url))
        .send()
        .await?
        .error_for_status()?;

    let tag = uuid::Uuid::new_v4().simple().to_string();
    let schema = format!("obs_{}", &tag[..12]);
    let prefix = format!("obs-{}.", &tag[..12]);
    let shutdown = CancellationToken::new();

    let evaluator_listeners = listeners().await?;
    let evaluator_config = <optout_rule_evaluator::Config as clap::Parser>::try_parse_from([
        "optout-rule-evaluator",
        "--admin-token",
        TOKEN,
        "--queue-prefix",
        &prefix,
        "--database-schema",
        &schema,
        "--database-url",
        DATABASE_URL,
        "--amqp-url",
        AMQP_URL,
        "--max-wait-ms",
        "20",
    ])?;
    let evaluator = tokio::spawn(optout_rule_evaluator::serve_with_metrics(
        evaluator_config,
        evaluator_listeners.grpc,
        evaluator_listeners.metrics,
        shutdown.clone(),
    ));

    let writer_listeners = listeners().await?;
    let evaluator_url = format!("http://{}", evaluator_listeners.grpc_address);
    let ca_file = info.salesforce_ca_file.display().to_string();
    let writer_config = <optout_salesforce_writer::Config as clap::Parser>::try_parse_from([
        "optout-salesforce-writer",
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
        &schema,
        "--admin-token",
        TOKEN,
        "--poll-interval-secs",
        "0",
        "--batch-wait-ms",
        "50",
    ])?;
    let writer = tokio::spawn(optout_salesforce_writer::serve_with_metrics(
        writer_config,
        writer_listeners.grpc,
        writer_listeners.metrics,
        shutdown.clone(),
    ));

    let fetcher_listeners = listeners().await?;
    let fetcher_http = TcpListener::bind("127.0.0.1:0").await?;
    let fetcher_config = <optout_fetcher::Config as clap::Parser>::try_parse_from([
        "optout-fetcher",
        "--mailchimp-api-key",
        &info.mailchimp_api_key,
        "--mailchimp-url",
        &info.mailchimp_url,
        "--amqp-url",
        AMQP_URL,
        "--queue-prefix",
        &prefix,
        "--database-url",
        DATABASE_URL,
        "--database-schema",
        &schema,
        "--admin-token",
        TOKEN,
    ])?;
    let fetcher = tokio::spawn(optout_fetcher::serve_with_listeners(
        fetcher_config,
        fetcher_listeners.grpc,
        fetcher_http,
        fetcher_listeners.metrics,
        shutdown.clone(),
    ));

    // Primary syncs until the unsubscribe reaches Salesforce. Mailchimp filters `last_changed` at whole
    // seconds and a run reads only before its start, so the run that sees the unsubscribe may be the
    // scheduler's first one or a later triggered one; the audit row names its trace.
    let channel =
        Channel::from_shared(format!("http://{}", fetcher_listeners.grpc_address))?.connect_lazy();
    let admin = AdminClient::with_interceptor(channel, |mut request: Request<()>| {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {TOKEN}")
                .parse()
                .map_err(|_| Status::internal("token"))?,
        );
        Ok(request)
    });
    eventually("the contact to be opted out", || {
        let mut admin = admin.clone();
        let http = http.clone();
        let url = format!("{}/salesforce/records", info.control_url);
        let email = email.clone();
        async move {
            // Starts a run, or joins the one under way; refused while the fetcher is starting.
            drop(admin.trigger_sync(TriggerSyncRequest::default()).await);
            let records: Vec<Value> = http
                .get(&url)
                .query(&[("email", email.as_str())])
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let opted_out = records.iter().any(|record| {
                record.get("LastName").and_then(Value::as_str) == Some("Traced")
                    && record.get("HasOptedOutOfEmail").and_then(Value::as_bool) == Some(true)
            });
            Ok(opted_out.then_some(()))
        }
    })
    .await?;

    // Metrics: each service's /metrics against the sandbox's own counts, once everything settled.
    let stats_url = info.stats_url.clone();
    let (writer_metrics, stats) = eventually("writer metrics to match the sandbox", || {
        let http = http.clone();
        let stats_url = stats_url.clone();
        let address = writer_listeners.metrics_address;
        async move {
            let stats: Value = http.get(&stats_url).send().await?.json().await?;
            let text = scrape(&http, address).await?;
            let written = stats["records_written"]["salesforce"]
                .as_f64()
                .unwrap_or(0.0);
            let calls = stats["total_calls"]["salesforce"].as_f64().unwrap_or(0.0);
            // The pass counts its writes before it audits and rechecks them, and keeps its
            // opt-outs on the oldest-unwritten gauge until it ends: a gauge that never goes back
            // to 0 fails this wait.
            let matches = written > 0.0
                && sample(&text, "optout_salesforce_records_written_total", &[]) == written
                && sample(&text, "optout_api_calls_total", &[("api", "salesforce")]) == calls
                && optout_telemetry::metrics::sample(
                    &text,
                    "optout_oldest_unwritten_opt_out_seconds",
                    &[],
                ) == Some(0.0);
            Ok(matches.then_some((text, stats)))
        }
    })
    .await?;
    let written = stats["records_written"]["salesforce"]
        .as_f64()
        .unwrap_or(0.0);
    // Every write of a first sync is an opt-out (no opt-in evidence yet): one latency each.
    assert_eq!(
        sample(&writer_metrics, "optout_opt_out_latency_seconds_count", &[]),
        written,
        "{writer_metrics}"
    );
    assert!(sample(&writer_metrics, "optout_salesforce_api_remaining", &[]) > 0.0);

    let fetcher_metrics = eventually("fetcher metrics to match the sandbox", || {
        let http = http.clone();
        let stats_url = stats_url.clone();
        let address = fetcher_listeners.metrics_address;
        async move {
            let stats: Value = http.get(&stats_url).send().await?.json().await?;
            let text = scrape(&http, address).await?;
            let calls = stats["total_calls"]["mailchimp"].as_f64().unwrap_or(0.0);
            let matches = calls > 0.0
                && sample(&text, "optout_api_calls_total", &[("api", "mailchimp")]) == calls;
            Ok(matches.then_some(text))
        }
    })
    .await?;
    assert!(
        sample(&fetcher_metrics, "optout_members_read_total", &[]) >= 40.0,
        "{fetcher_metrics}"
    );
    let evaluator_metrics = scrape(&http, evaluator_listeners.metrics_address).await?;
    assert!(
        sample(
            &evaluator_metrics,
            "optout_decisions_total",
            &[("decision", "opt_out")]
        ) >= 1.0,
        "{evaluator_metrics}"
    );
    let members_changed = format!("{prefix}members.changed");
    assert!(
        sample(
            &evaluator_metrics,
            "optout_messages_settled_total",
            &[("queue", members_changed.as_str()), ("outcome", "ack")]
        ) >= 1.0,
        "{evaluator_metrics}"
    );

    // Traces: the writer audited the write with its trace id; that trace holds the whole chain.
    let database = sqlx::PgPool::connect(DATABASE_URL).await?;
    let trace_id: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT trace_id FROM {schema}_writer.audit_log WHERE email = lower(trim($1)) AND new_value ORDER BY id LIMIT 1"
    )))
    .bind(&email)
    .fetch_one(&database)
    .await
    .context("the audit row of the opt-out carries a trace id")?;
    let flusher = Arc::clone(&telemetry);
    tokio::task::spawn_blocking(move || flusher.flush()).await?;
    let trace = eventually("the run's spans to be exported", || {
        let receiver = receiver.clone();
        let trace_id = trace_id.clone();
        async move {
            let trace: Vec<Span> = receiver
                .spans()
                .into_iter()
                .filter(|span| hex(&span.trace_id) == trace_id)
                .collect();
            let complete = trace.iter().any(|span| span.name == "sync run")
                && trace
                    .iter()
                    .any(|span| span.name == "PATCH /composite/sobjects");
            Ok(complete.then_some(trace))
        }
    })
    .await?;
    check_trace(&trace, &prefix)?;

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, evaluator)
        .await
        .context("evaluator did not stop")??
        .map_err(|error| anyhow::anyhow!("evaluator: {error}"))?;
    tokio::time::timeout(DEADLINE, writer)
        .await
        .context("writer did not stop")??
        .map_err(|error| anyhow::anyhow!("writer: {error}"))?;
    tokio::time::timeout(DEADLINE, fetcher)
        .await
        .context("fetcher did not stop")??
        .map_err(|error| anyhow::anyhow!("fetcher: {error}"))?;
    stop.cancel();
    otlp.await??;
    sandbox.shutdown().await;

    // Leave no trace on the shared broker and database.
    let connection = optout_amqp::connect(AMQP_URL).await?;
    let channel = connection.create_channel().await?;
    optout_amqp::teardown(&channel, &optout_amqp::Topology::new("optout", &prefix, 4)).await?;
    let database = sqlx::PgPool::connect(DATABASE_URL).await?;
    for service in ["fetcher", "evaluator", "writer"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{schema}_{service}\" CASCADE"
        )))
        .execute(&database)
        .await?;
    }
    Ok(())
}

/// The spans of one sync run: every service's work is there, and every span's parent is in the trace.
fn check_trace(trace: &[Span], prefix: &str) -> Result<()> {
    let by_id: HashMap<Vec<u8>, &Span> = trace
        .iter()
        .map(|span| (span.span_id.clone(), span))
        .collect();
    let describe = |span: &Span| format!("{} ({})", span.name, hex(&span.span_id));
    let names: Vec<String> = trace.iter().map(&describe).collect();
    let find = |what: &str, predicate: &dyn Fn(&Span) -> bool| -> Result<&Span> {
        trace
            .iter()
            .find(|span| predicate(span))
            .with_context(|| format!("no {what} span in the trace: {names:?}"))
    };

    // An unbroken chain: one root (the run), every other parent present.
    let roots: Vec<&Span> = trace
        .iter()
        .filter(|span| span.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root: {names:?}");
    assert_eq!(roots[0].name, "sync run");
    for span in trace {
        if !span.parent_span_id.is_empty() {
            assert!(
                by_id.contains_key(&span.parent_span_id),
                "the parent of {} is missing from the trace: {names:?}",
                describe(span)
            );
        }
    }
    let ancestors = |span: &Span| -> Vec<String> {
        let mut chain = vec![span.name.clone()];
        let mut current = span;
        while let Some(parent) = by_id.get(&current.parent_span_id) {
            chain.push(parent.name.clone());
            current = parent;
        }
        chain
    };

    // Fetcher: the Mailchimp call and the publish.
    let mailchimp = find("mailchimp members", &|span| {
        span.kind == KIND_CLIENT
            && span.name.starts_with("GET /lists/")
            && span.name.ends_with("/members")
    })?;
    assert_eq!(
        attribute(mailchimp, "http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(
        attribute(mailchimp, "http.response.status_code").as_deref(),
        Some("200")
    );
    find("fetcher publish", &|span| {
        span.kind == KIND_PRODUCER
            && attribute(span, "messaging.rabbitmq.destination.routing_key").as_deref()
                == Some("members.changed")
    })?;
    // Evaluator: consumes members.changed, serves Decide.
    let members_changed = format!("process {prefix}members.changed");
    let evaluator_process = find("evaluator consumer", &|span| {
        span.kind == KIND_CONSUMER && span.name == members_changed
    })?;
    assert_eq!(
        attribute(evaluator_process, "messaging.system").as_deref(),
        Some("rabbitmq")
    );
    find("evaluator Decide server", &|span| {
        span.kind == KIND_SERVER && span.name == "optout.evaluator.v1.Decisions/Decide"
    })?;
    // Writer: consumes persons.dirty, calls Decide and Salesforce.
    // One per partition the run's opt-outs went to; the write pass descends from one of them.
    find("writer consumer", &|span| {
        span.kind == KIND_CONSUMER && span.name.contains("persons.dirty.")
    })?;
    let decide = find("writer Decide client", &|span| {
        span.kind == KIND_CLIENT && span.name == "optout.evaluator.v1.Decisions/Decide"
    })?;
    assert_eq!(attribute(decide, "rpc.system").as_deref(), Some("grpc"));
    let salesforce = find("salesforce write", &|span| {
        span.kind == KIND_CLIENT && span.name == "PATCH /composite/sobjects"
    })?;
    assert_eq!(
        attribute(salesforce, "http.request.method").as_deref(),
        Some("PATCH")
    );
    let chain = ancestors(salesforce);
    assert!(
        chain
            .iter()
            .any(|name| name.starts_with(&format!("process {prefix}persons.dirty.")))
            && chain.contains(&evaluator_process.name)
            && chain.last().map(String::as_str) == Some("sync run"),
        "the salesforce write descends from the run through both consumers: {chain:?}"
    );
    Ok(())
}

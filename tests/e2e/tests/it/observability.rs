//! Distributed tracing and metrics across the real processes: the three services export spans over
//! OTLP/gRPC (configured only by the standard `OTEL_*` variables) to a receiver run by the test, and
//! serve Prometheus `/metrics` on the port they announce.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use optout_e2e::{Role, Stack, StackConfig, eventually, opted_out};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::support::email;

const KIND_SERVER: i32 = 2;
const KIND_CLIENT: i32 = 3;
const KIND_CONSUMER: i32 = 5;

/// A span with the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

/// An OTLP/gRPC trace receiver keeping every span it is sent.
#[derive(Clone, Debug, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn string_value(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes
        .iter()
        .find(|attribute| attribute.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    match value {
        AnyValue::StringValue(text) => Some(text.clone()),
        AnyValue::IntValue(number) => Some(number.to_string()),
        _ => None,
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|resource| string_value(&resource.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                received.extend(scope.spans.into_iter().map(|span| Received {
                    service: service.clone(),
                    span,
                }));
            }
        }
        self.spans.lock().expect("spans").extend(received);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// One Mailchimp unsubscribe, through a primary sync, is one trace from the fetcher's Mailchimp call
/// to the writer's Salesforce call, with spans from all three processes and an unbroken chain of
/// parents; the writer's and fetcher's `/metrics` agree with the sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_is_one_trace_across_the_three_processes() -> Result<()> {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let otlp_address = listener.local_addr()?;
    let stop = CancellationToken::new();
    let otlp_stop = stop.clone();
    let otlp = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async move { otlp_stop.cancelled().await },
            ),
    );
    let mut stack = Stack::start(StackConfig {
        audiences: 1,
        members: 30,
        extra_env: vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
                format!("http://{otlp_address}"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
        ],
        ..StackConfig::default()
    })
    .await?;
    let audience = stack.audiences()[0].clone();
    let traced = email("traced");
    stack.add_subscriber(&audience, &traced).await?;
    stack.create_contact(&traced, false).await?;
    stack.sync_and_wait().await?;

    let unsubscribed_at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    stack.unsubscribe(&audience, &traced).await?;
    stack.sync_and_wait().await?;
    let records = stack.salesforce_records(&traced).await?;
    ensure!(
        records.iter().all(|record| opted_out(record) == Some(true)),
        "the unsubscribe reached salesforce: {records:?}"
    );

    // The run after the unsubscribe: its trace holds the Salesforce write.
    let trace = eventually(Duration::from_secs(30), "the run's trace", || {
        let receiver = receiver.clone();
        async move {
            let spans = receiver.spans.lock().expect("spans").clone();
            let roots = spans.iter().filter(|received| {
                received.span.name == "sync run"
                    && received.span.start_time_unix_nano > unsubscribed_at
            });
            for root in roots {
                let trace: Vec<Received> = spans
                    .iter()
                    .filter(|received| received.span.trace_id == root.span.trace_id)
                    .cloned()
                    .collect();
                if trace
                    .iter()
                    .any(|received| received.span.name == "PATCH /composite/sobjects")
                {
                    return Ok(Ok(trace));
                }
            }
            Ok(Err(format!("{} spans so far", spans.len())))
        }
    })
    .await?;
    check_trace(&trace)?;

    // Metrics against the sandbox's own counts.
    let stats = stack.stats().await?;
    let http = reqwest::Client::new();
    let mut texts = HashMap::new();
    for (role, address) in stack.metrics_addresses() {
        let text = http
            .get(format!("http://{address}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        texts.insert(role, text);
    }
    let sample = |role: Role, name: &str, labels: &[(&str, &str)]| {
        texts
            .get(&role)
            .and_then(|text| optout_telemetry::metrics::sample(text, name, labels))
            .unwrap_or(0.0)
    };
    let written = stats["records_written"]["salesforce"]
        .as_f64()
        .unwrap_or(0.0);
    ensure!(written >= 1.0, "the sandbox saw writes: {stats}");
    assert_eq!(
        sample(Role::Writer, "optout_salesforce_records_written_total", &[]),
        written
    );
    assert_eq!(
        sample(
            Role::Writer,
            "optout_api_calls_total",
            &[("api", "salesforce")]
        ),
        stats["total_calls"]["salesforce"].as_f64().unwrap_or(0.0)
    );
    // No opt-in evidence in this run: every write is an opt-out, each timed once.
    assert_eq!(
        sample(Role::Writer, "optout_opt_out_latency_seconds_count", &[]),
        written
    );
    ensure!(sample(Role::Fetcher, "optout_members_read_total", &[]) >= 30.0);
    ensure!(
        sample(
            Role::Fetcher,
            "optout_api_calls_total",
            &[("api", "mailchimp")]
        ) >= 2.0
    );
    ensure!(
        sample(
            Role::Evaluator,
            "optout_decisions_total",
            &[("decision", "opt_out")]
        ) >= 1.0
    );

    stack.shutdown().await?;
    stop.cancel();
    otlp.await??;
    Ok(())
}

fn check_trace(trace: &[Received]) -> Result<()> {
    let by_id: HashMap<&[u8], &Received> = trace
        .iter()
        .map(|received| (received.span.span_id.as_slice(), received))
        .collect();
    let names: Vec<String> = trace
        .iter()
        .map(|received| format!("{}: {}", received.service, received.span.name))
        .collect();
    let find = |service: &str, predicate: &dyn Fn(&Span) -> bool| -> Result<&Received> {
        trace
            .iter()
            .find(|received| received.service == service && predicate(&received.span))
            .with_context(|| format!("no such {service} span in the trace: {names:?}"))
    };
    for received in trace {
        let parent = &received.span.parent_span_id;
        if parent.is_empty() {
            ensure!(
                received.span.name == "sync run",
                "only the run is a root: {names:?}"
            );
        } else {
            ensure!(
                by_id.contains_key(parent.as_slice()),
                "the parent of {} is in the trace: {names:?}",
                received.span.name
            );
        }
    }
    find("fetcher", &|span| span.name == "sync run")?;
    find("fetcher", &|span| {
        span.kind == KIND_CLIENT && span.name.starts_with("GET /lists/")
    })?;
    find("rule-evaluator", &|span| {
        span.kind == KIND_CONSUMER && span.name.ends_with("members.changed")
    })?;
    find("rule-evaluator", &|span| {
        span.kind == KIND_SERVER && span.name == "optout.evaluator.v1.Decisions/Decide"
    })?;
    find("salesforce-writer", &|span| {
        span.kind == KIND_CONSUMER && span.name.contains("persons.dirty.")
    })?;
    find("salesforce-writer", &|span| {
        span.kind == KIND_CLIENT && span.name == "optout.evaluator.v1.Decisions/Decide"
    })?;
    let write = find("salesforce-writer", &|span| {
        span.kind == KIND_CLIENT && span.name == "PATCH /composite/sobjects"
    })?;
    // Walk up from the Salesforce write to the run, through both consumers.
    let mut chain = vec![format!("{}: {}", write.service, write.span.name)];
    let mut current = write;
    while let Some(parent) = by_id.get(current.span.parent_span_id.as_slice()) {
        chain.push(format!("{}: {}", parent.service, parent.span.name));
        current = parent;
    }
    ensure!(
        current.span.name == "sync run"
            && chain
                .iter()
                .any(|name| name.starts_with("rule-evaluator: process"))
            && chain
                .iter()
                .any(|name| name.starts_with("salesforce-writer: process")),
        "the write descends from the run through both consumers: {chain:?}"
    );
    Ok(())
}

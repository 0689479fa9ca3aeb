//! Distributed tracing and metrics across the real processes: the three services export spans over
//! OTLP/gRPC (configured only by the standard `OTEL_*` variables) to a receiver run by the test, and
//! serve Prometheus `/metrics` on the port they announce.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use opentelemetry_proto::tonic::trace::v1::Span;
use optout_e2e::{Role, Stack, StackConfig, opted_out};

use crate::otlp::{Received, Receiver};
use crate::support::email;

const KIND_SERVER: i32 = 2;
const KIND_CLIENT: i32 = 3;
const KIND_CONSUMER: i32 = 5;

/// One Mailchimp unsubscribe, through a primary sync, is one trace from the fetcher's Mailchimp call
/// to the writer's Salesforce call, with spans from all three processes and an unbroken chain of
/// parents; the writer's and fetcher's `/metrics` agree with the sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_is_one_trace_across_the_three_processes() -> Result<()> {
    let otlp = Receiver::start().await?;
    let mut stack = Stack::start(StackConfig {
        audiences: 1,
        members: 30,
        extra_env: otlp.env(),
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
    let trace = otlp
        .complete_trace("PATCH /composite/sobjects", unsubscribed_at)
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

/// One Mailchimp unsubscribe delivered by webhook (no sync run) is one trace: the fetcher's webhook
/// request span is its root, and the writer's Salesforce write descends from it through the
/// fetcher's publish and both consumers. The webhook secret shows in no span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_unsubscribe_is_one_trace_to_the_salesforce_write() -> Result<()> {
    use crate::realtime::{RealtimeKeys, eventually_opted_out, register_webhooks};

    let otlp = Receiver::start().await?;
    let keys = RealtimeKeys::new();
    let mut extra_env = keys.env();
    extra_env.extend(otlp.env());
    let stack = Stack::start(StackConfig {
        audiences: 1,
        members: 30,
        extra_env,
        ..StackConfig::default()
    })
    .await?;
    let audience = stack.audiences()[0].clone();
    let traced = email("webhook-traced");
    // Through the API (source `api`): no webhook for this one, and none is registered yet.
    stack.add_subscriber(&audience, &traced).await?;
    stack.create_contact(&traced, false).await?;
    register_webhooks(&stack, &keys.secret).await?;

    let unsubscribed_at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    stack.unsubscribe(&audience, &traced).await?;
    eventually_opted_out(&stack, &traced, Duration::from_secs(30)).await?;

    let trace = otlp
        .complete_trace("PATCH /composite/sobjects", unsubscribed_at)
        .await?;
    check_webhook_trace(&trace)?;
    for received in &otlp.receiver.spans() {
        let text = format!("{:?}", received.span);
        ensure!(
            !text.contains(&keys.secret),
            "the webhook secret is in a {} span: {}",
            received.service,
            received.span.name
        );
    }

    stack.shutdown().await?;
    Ok(())
}

fn check_webhook_trace(trace: &[Received]) -> Result<()> {
    let by_id: HashMap<&[u8], &Received> = trace
        .iter()
        .map(|received| (received.span.span_id.as_slice(), received))
        .collect();
    let names: Vec<String> = trace
        .iter()
        .map(|received| format!("{}: {}", received.service, received.span.name))
        .collect();
    let roots: Vec<&Received> = trace
        .iter()
        .filter(|received| received.span.parent_span_id.is_empty())
        .collect();
    ensure!(roots.len() == 1, "one root: {names:?}");
    let root = roots[0];
    ensure!(
        root.service == "fetcher"
            && root.span.kind == KIND_SERVER
            && root.span.name == "POST /webhooks/mailchimp/{secret}",
        "the root is the fetcher's webhook request: {names:?}"
    );
    for received in trace {
        let parent = &received.span.parent_span_id;
        ensure!(
            parent.is_empty() || by_id.contains_key(parent.as_slice()),
            "the parent of {}: {} is in the trace: {names:?}",
            received.service,
            received.span.name
        );
    }
    let write = trace
        .iter()
        .find(|received| {
            received.service == "salesforce-writer"
                && received.span.kind == KIND_CLIENT
                && received.span.name == "PATCH /composite/sobjects"
        })
        .with_context(|| format!("no Salesforce write in the trace: {names:?}"))?;
    // Walk up from the Salesforce write to the webhook request.
    let mut chain = vec![format!("{}: {}", write.service, write.span.name)];
    let mut current = write;
    while let Some(parent) = by_id.get(current.span.parent_span_id.as_slice()) {
        chain.push(format!("{}: {}", parent.service, parent.span.name));
        current = parent;
    }
    let position = |prefix: &str| chain.iter().position(|name| name.starts_with(prefix));
    let (Some(writer), Some(evaluator), Some(fetcher)) = (
        position("salesforce-writer: process"),
        position("rule-evaluator: process"),
        position("fetcher: publish"),
    ) else {
        anyhow::bail!("the write descends from the webhook through both consumers: {chain:?}");
    };
    ensure!(
        std::ptr::eq(current, root) && writer < evaluator && evaluator < fetcher,
        "the write descends from the webhook through both consumers: {chain:?}"
    );
    Ok(())
}

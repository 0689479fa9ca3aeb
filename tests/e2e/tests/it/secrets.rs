//! No secret in any log line or exported span: a stack runs with known secret values and debug
//! logging, goes through the paths that touch credentials (log-in, token expiry and refresh,
//! webhook registration and delivery, refused tokens and secrets, the Memberships API), and every
//! service log and span is searched for each secret.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use optout_cli::admin::{Fleet, Role};
use optout_e2e::{Stack, StackConfig, eventually, opted_out};

use crate::otlp::{Received, Receiver};
use crate::support::email;

/// Everything at debug but the HTTP/2 and TLS plumbing (which logs frames, not values): a careless
/// `?secret` in our code or a dependency's connection log would show here.
const RUST_LOG: &str = "debug,h2=info,hyper=info,hyper_util=info,tower=info,rustls=info,tonic=info";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line_or_a_span() -> Result<()> {
    let otlp = Receiver::start().await?;
    let logs = tempfile_dir()?;
    let webhook_secret = format!("whsec{}", optout_cli::up::random_hex(12));
    let api_token = format!("apitok{}", optout_cli::up::random_hex(12));
    let database_password = format!("dbpw{}", optout_cli::up::random_hex(12));
    // The fetcher registers its webhook at start-up, so it must know its public URL before it
    // binds: pick a free port now (the race with another process taking it is harmless here:
    // the stack would fail to start, loudly).
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut env = otlp.env();
    env.extend(
        [
            ("RUST_LOG", RUST_LOG.to_owned()),
            ("OPTOUT_LOG_JSON", "1".to_owned()),
            ("OPTOUT_WEBHOOK_SECRET", webhook_secret.clone()),
            ("OPTOUT_API_TOKEN", api_token.clone()),
            ("OPTOUT_HTTP_LISTEN", format!("127.0.0.1:{http_port}")),
            (
                "OPTOUT_WEBHOOK_PUBLIC_URL",
                format!("http://127.0.0.1:{http_port}"),
            ),
            // Trust authentication ignores the password, so it can be any known value.
            (
                "OPTOUT_DATABASE_URL",
                format!("postgres://postgres:{database_password}@127.0.0.1:5432/postgres"),
            ),
        ]
        .map(|(key, value)| (key.to_owned(), value)),
    );
    let mut stack = Stack::start(StackConfig {
        audiences: 2,
        members: 30,
        extra_env: env,
        log_dir: Some(logs.clone()),
        ..StackConfig::default()
    })
    .await?;
    let info = stack.sandbox_info().clone();
    let secret_field = |key: &str| info[key].as_str().unwrap_or_default().to_owned();
    let secrets = [
        ("admin token", stack.admin_token().to_owned()),
        ("api token", api_token.clone()),
        ("webhook secret", webhook_secret.clone()),
        ("database password", database_password),
        ("mailchimp api key", secret_field("mailchimp_api_key")),
        (
            "salesforce client secret",
            secret_field("salesforce_client_secret"),
        ),
    ];
    for (name, value) in &secrets {
        ensure!(value.len() >= 8, "the {name} is known to the test");
    }

    // A person unsubscribes by webhook (registered by the fetcher at start-up).
    let audience = stack.audiences()[0].clone();
    let by_webhook = email("secret.webhook");
    stack.add_subscriber(&audience, &by_webhook).await?;
    stack.create_contact(&by_webhook, false).await?;
    stack.sync_and_wait().await?;
    stack.unsubscribe(&audience, &by_webhook).await?;
    checked_eventually(&stack, &by_webhook).await?;

    // Salesforce tokens expire mid-run: the writer logs in again with its client secret.
    stack.expire_salesforce_tokens().await?;
    let after_expiry = email("secret.expiry");
    stack.add_subscriber(&audience, &after_expiry).await?;
    stack.create_contact(&after_expiry, false).await?;
    stack.sync_and_wait().await?;
    stack.unsubscribe(&audience, &after_expiry).await?;
    stack.sync_and_wait().await?;
    checked_eventually(&stack, &after_expiry).await?;

    // Refused credentials: a wrong webhook secret, a wrong API token, a wrong admin token.
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{http_port}");
    let wrong_secret = http
        .get(format!("{base}/webhooks/mailchimp/{webhook_secret}x"))
        .send()
        .await?;
    ensure!(wrong_secret.status() == reqwest::StatusCode::NOT_FOUND);
    let lookup = |token: String| {
        http.get(format!("{base}/api/v1/memberships"))
            .query(&[("email", by_webhook.as_str())])
            .bearer_auth(token)
            .send()
    };
    let refused = lookup(format!("{api_token}x")).await?;
    ensure!(refused.status() == reqwest::StatusCode::UNAUTHORIZED);
    ensure!(
        !refused.text().await?.contains(&api_token),
        "a refusal echoes the token"
    );
    ensure!(lookup(api_token.clone()).await?.status().is_success());
    let wrong_admin = format!("{}x", stack.admin_token());
    let fleet = Fleet::connect(&stack.endpoints(), &wrong_admin.clone().into()).await?;
    let refusal = fleet
        .first(Role::Writer)
        .context("a writer")?
        .get_status()
        .await
        .expect_err("a wrong admin token is refused");
    ensure!(
        !refusal.to_string().contains(&wrong_admin),
        "the refusal echoes the token: {refusal}"
    );

    // SIGTERM flushes each service's spans before it exits.
    stack.shutdown().await?;
    let spans = otlp.receiver.spans();
    ensure!(
        spans.iter().any(|received| received.service == "fetcher"
            && received.span.name == "POST /webhooks/mailchimp/{secret}"),
        "the webhook delivery was traced ({} spans)",
        spans.len()
    );
    for service in ["fetcher", "rule-evaluator", "salesforce-writer"] {
        ensure!(
            spans.iter().any(|received| received.service == service),
            "no span from {service} ({} spans)",
            spans.len()
        );
    }
    let log_text = service_logs(&logs)?;
    ensure!(
        log_text.contains("fetcher ready") && log_text.contains("\"trace_id\""),
        "the services' JSON logs were captured"
    );
    let span_text: String = spans.iter().map(span_strings).collect();
    for (name, value) in &secrets {
        ensure!(
            !log_text.contains(value.as_str()),
            "the {name} is in a log line"
        );
        ensure!(
            !span_text.contains(value.as_str()),
            "the {name} is in a span"
        );
    }
    println!(
        "searched {} bytes of logs and {} spans for {} secrets: none found",
        log_text.len(),
        spans.len(),
        secrets.len()
    );
    drop(std::fs::remove_dir_all(&logs));
    Ok(())
}

async fn checked_eventually(stack: &Stack, email: &str) -> Result<()> {
    eventually(Duration::from_secs(60), "the field checked", || async {
        let records = stack.salesforce_records(email).await?;
        Ok(
            if records.iter().all(|record| opted_out(record) == Some(true)) {
                Ok(())
            } else {
                Err(format!("{records:?}"))
            },
        )
    })
    .await
}

/// A fresh folder for the logs of one stack.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("optout-e2e-logs-{}", optout_cli::up::random_hex(6)));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Every service's log, concatenated (the sandbox, which emulates the other side, is not ours).
fn service_logs(dir: &Path) -> Result<String> {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default();
        if name.ends_with(".log") && !name.starts_with("sandbox") {
            text.push_str(&std::fs::read_to_string(&path)?);
        }
    }
    Ok(text)
}

/// Every string a span carries: its name, status message, attributes, events and links, and
/// its resource's attributes.
fn span_strings(received: &Received) -> String {
    let span = &received.span;
    let mut text = format!("{}\n{}\n", received.service, span.name);
    if let Some(status) = &span.status {
        text.push_str(&status.message);
        text.push('\n');
    }
    let mut push = |attributes: &[KeyValue]| {
        for attribute in attributes {
            text.push_str(&attribute.key);
            text.push('=');
            if let Some(value) = &attribute.value {
                push_value(&mut text, value);
            }
            text.push('\n');
        }
    };
    push(&received.resource);
    push(&span.attributes);
    for event in &span.events {
        push(&event.attributes);
    }
    for link in &span.links {
        push(&link.attributes);
    }
    for event in &span.events {
        text.push_str(&event.name);
        text.push('\n');
    }
    text
}

fn push_value(text: &mut String, value: &AnyValue) {
    match &value.value {
        Some(any_value::Value::StringValue(string)) => text.push_str(string),
        Some(any_value::Value::ArrayValue(array)) => {
            for value in &array.values {
                push_value(text, value);
                text.push(',');
            }
        }
        Some(any_value::Value::KvlistValue(list)) => {
            for pair in &list.values {
                text.push_str(&pair.key);
                if let Some(value) = &pair.value {
                    push_value(text, value);
                }
            }
        }
        Some(any_value::Value::BytesValue(bytes)) => text.push_str(&String::from_utf8_lossy(bytes)),
        Some(other) => text.push_str(&format!("{other:?}")),
        None => {}
    }
}

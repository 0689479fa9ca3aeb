//! The service as operators see it: gRPC health, reflection, the authenticated Admin service, and the
//! binary's announcement line, exit codes and graceful shutdown.

use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use optout_fetcher::Config;
use optout_proto::admin::v1::{
    GetStatusRequest, PauseRequest, ResumeRequest, TriggerSyncRequest, admin_client::AdminClient,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{AMQP_URL, DATABASE_URL, TestApp, eventually};

const TOKEN: &str = "test-admin-token";

fn config_for(app: &TestApp) -> Result<Config> {
    let info = app.sandbox.info();
    Ok(Config::try_parse_from([
        "optout-fetcher",
        "--mailchimp-api-key",
        &info.mailchimp_api_key,
        "--mailchimp-url",
        &info.mailchimp_url,
        "--sync-interval-secs",
        "0",
        "--amqp-url",
        AMQP_URL,
        "--exchange",
        "optout",
        "--queue-prefix",
        &app.topology.prefix,
        "--persons-partitions",
        "1",
        "--database-url",
        DATABASE_URL,
        "--database-schema",
        &app.schema_prefix,
        "--admin-token",
        TOKEN,
    ])?)
}

/// Adds `authorization: Bearer <token>`.
#[derive(Clone, Copy)]
struct Bearer(&'static str);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        let value = format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| tonic::Status::internal("bad header"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

type Admin = AdminClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

fn admin(channel: Channel, token: &'static str) -> Admin {
    AdminClient::with_interceptor(channel, Bearer(token))
}

async fn health_status(channel: Channel) -> Result<ServingStatus> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status())
}

#[tokio::test]
async fn admin_service_triggers_syncs_and_reports_status_behind_a_bearer_token() -> Result<()> {
    let app = TestApp::start(21).await?;
    let config = config_for(&app)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(optout_fetcher::serve(config, listener, shutdown.clone()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;

    eventually(Duration::from_secs(30), "health SERVING", || {
        let channel = channel.clone();
        async move { Ok(health_status(channel).await? == ServingStatus::Serving) }
    })
    .await?;

    let denied = admin(channel.clone(), "wrong")
        .get_status(GetStatusRequest {})
        .await
        .expect_err("wrong token");
    assert_eq!(denied.code(), Code::Unauthenticated);
    let unauthenticated = AdminClient::new(channel.clone())
        .get_status(GetStatusRequest {})
        .await
        .expect_err("no token");
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);

    let mut client = admin(channel.clone(), TOKEN);
    let run_id = client
        .trigger_sync(TriggerSyncRequest::default())
        .await?
        .into_inner()
        .run_id;
    ensure!(!run_id.is_empty(), "empty run id");
    eventually(
        Duration::from_secs(60),
        "the triggered run to finish",
        || {
            let mut client = client.clone();
            let run_id = run_id.clone();
            async move {
                let status = client.get_status(GetStatusRequest {}).await?.into_inner();
                Ok(status.last_run_id == run_id && status.last_run_finished)
            }
        },
    )
    .await?;
    let status = client.get_status(GetStatusRequest {}).await?.into_inner();
    assert_eq!(status.service, "fetcher");
    assert!(!status.busy && !status.paused);
    assert_eq!(status.audiences.len(), 3);
    assert!(
        status
            .audiences
            .iter()
            .all(|audience| audience.watermark.is_some() && audience.last_sync.is_some())
    );
    assert!(status.counters["members_read"] > 2000);
    assert_eq!(status.counters["runs_finished"], 1);
    assert!(status.counters["pages_published"] >= 3);

    assert!(client.pause(PauseRequest {}).await?.into_inner().paused);
    let refused = client
        .trigger_sync(TriggerSyncRequest::default())
        .await
        .expect_err("paused");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(refused.message(), "fetcher is paused");
    assert!(!client.resume(ResumeRequest {}).await?.into_inner().paused);

    let dead_letters = client
        .list_dead_letters(optout_proto::admin::v1::ListDeadLettersRequest { limit: 10 })
        .await
        .expect_err("unimplemented");
    assert_eq!(dead_letters.code(), Code::Unimplemented);
    // The fetcher consumes no queue: replay and purge say so too, and name who to ask.
    let replay = client
        .replay_dead_letters(optout_proto::admin::v1::ReplayDeadLettersRequest {
            message_ids: Vec::new(),
            all: true,
        })
        .await
        .expect_err("unimplemented");
    assert_eq!(replay.code(), Code::Unimplemented);
    assert!(replay.message().contains("rule-evaluator"), "{replay:?}");
    let purge = client
        .purge_dead_letters(optout_proto::admin::v1::PurgeDeadLettersRequest {})
        .await
        .expect_err("unimplemented");
    assert_eq!(purge.code(), Code::Unimplemented);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await??
        .context("serve failed")?;
    app.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn binary_announces_its_grpc_address_and_exits_cleanly_on_sigterm() -> Result<()> {
    let app = TestApp::start(22).await?;
    let info = app.sandbox.info();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_optout-fetcher"))
        .env("OPTOUT_MAILCHIMP_API_KEY", &info.mailchimp_api_key)
        .env("OPTOUT_MAILCHIMP_URL", &info.mailchimp_url)
        .env("OPTOUT_SYNC_INTERVAL_SECS", "0")
        .env("OPTOUT_AMQP_URL", AMQP_URL)
        .env("OPTOUT_EXCHANGE", "optout")
        .env("OPTOUT_QUEUE_PREFIX", &app.topology.prefix)
        .env("OPTOUT_PERSONS_PARTITIONS", "1")
        .env("OPTOUT_DATABASE_URL", DATABASE_URL)
        .env("OPTOUT_DATABASE_SCHEMA", &app.schema_prefix)
        .env("OPTOUT_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await??
        .context("no stdout line")?;
    // `{"service":"fetcher","grpc":"ADDR","http":"ADDR"}`, service and grpc first.
    ensure!(
        first.starts_with(r#"{"service":"fetcher","grpc":""#),
        "unexpected announcement {first}"
    );
    let announced: serde_json::Value =
        serde_json::from_str(&first).with_context(|| format!("unexpected announcement {first}"))?;
    let addr = announced["grpc"].as_str().context("grpc address")?;
    let http = announced["http"].as_str().context("http address")?;
    for addr in [addr, http] {
        ensure!(
            addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
            "bad address {addr}"
        );
    }

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    eventually(Duration::from_secs(30), "health SERVING", || {
        let channel = channel.clone();
        async move { Ok(health_status(channel).await? == ServingStatus::Serving) }
    })
    .await?;

    let pid = child.id().context("pid")?;
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    ensure!(killed.success(), "kill -TERM failed");
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    assert!(exit.success(), "exit status {exit:?}");
    app.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn binary_exits_with_code_2_on_bad_configuration() -> Result<()> {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_optout-fetcher"))
        .env_remove("OPTOUT_MAILCHIMP_API_KEY")
        .env_remove("OPTOUT_ADMIN_TOKEN")
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(2));
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_optout-fetcher"))
        .args([
            "--mailchimp-api-key",
            "k-us1",
            "--admin-token",
            "t",
            "--page-size",
            "5000",
        ])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("page size"), "{stderr}");
    Ok(())
}

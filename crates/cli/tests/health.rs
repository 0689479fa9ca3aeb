//! `optoutctl health` against a tiny in-process gRPC server with `grpc.health.v1`.

use std::{net::SocketAddr, process::Output, time::Duration};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::{ServingStatus, server::health_reporter};

/// Serves only the health service on 127.0.0.1:0 with the overall status set to `status`.
async fn start_health_server(
    status: ServingStatus,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (reporter, service) = health_reporter();
    reporter.set_service_status("", status).await;
    tokio::spawn(async move {
        let _ = Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown.cancelled_owned())
            .await;
    });
    Ok(address)
}

async fn optoutctl_health(address: &str) -> anyhow::Result<Output> {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_optoutctl"))
        .args(["health", "--addr", address])
        // Health needs no token and no other address; make sure none leaks in from the caller.
        .env_remove("OPTOUT_ADMIN_TOKEN")
        .env_remove("OPTOUT_FETCHER_ADDR")
        .env_remove("OPTOUT_EVALUATOR_ADDR")
        .env_remove("OPTOUT_WRITER_ADDR")
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run optoutctl")
}

#[tokio::test]
async fn exits_zero_when_the_server_is_serving() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let address = start_health_server(ServingStatus::Serving, shutdown.clone()).await?;
    let output = optoutctl_health(&format!("http://{address}")).await?;
    shutdown.cancel();
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn accepts_a_bare_address_without_scheme() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let address = start_health_server(ServingStatus::Serving, shutdown.clone()).await?;
    let result = optout_cli::health::check(&address.to_string(), Duration::from_secs(3)).await;
    shutdown.cancel();
    assert!(result.is_ok(), "{result:?}");
    Ok(())
}

#[tokio::test]
async fn exits_one_with_a_one_line_reason_when_not_serving() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let address = start_health_server(ServingStatus::NotServing, shutdown.clone()).await?;
    let output = optoutctl_health(&format!("http://{address}")).await?;
    shutdown.cancel();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("NOT_SERVING"), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "stderr: {stderr}");
    Ok(())
}

#[tokio::test]
async fn exits_one_when_nothing_listens() -> anyhow::Result<()> {
    // Take a free port and release it so nothing listens there.
    let address = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let started = std::time::Instant::now();
    let output = optoutctl_health(&format!("http://{address}")).await?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not healthy"), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "stderr: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
    Ok(())
}

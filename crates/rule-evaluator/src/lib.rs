//! The rule-evaluator: member state and the Email Opt Out rule.
//!
//! It consumes `members.changed`, keeps every member's latest status in PostgreSQL (ignoring stale snapshots,
//! so replays are harmless), records status transitions and opt-in evidence, decides per email with
//! [`rule::decide`], and publishes `persons.dirty.{partition}` for emails that are opted out or carry opt-in
//! evidence. It serves `optout.evaluator.v1.Decisions` (Decide, AckOptIn, Explain), `optout.admin.v1.Admin`,
//! health and reflection over gRPC.

pub mod config;
mod error;
mod evaluate;
mod grpc;
pub mod rule;
pub mod store;

use std::{io::Write, net::SocketAddr, sync::Arc, time::Duration};

use optout_amqp::{ConsumeOptions, Message, Publisher, Topology};
use optout_proto::{
    admin::v1::admin_server::AdminServer, evaluator::v1::decisions_server::DecisionsServer,
    queue::v1::MembersChanged,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

pub use config::Config;
pub use error::{Error, Result};
pub use grpc::{BearerAuth, SERVICE_NAME};

use crate::{
    evaluate::Evaluator,
    grpc::{AdminService, DecisionsService, Ready, Shared},
};

/// gRPC names reported by the health service besides `""`.
const SERVICES: [&str; 2] = ["optout.evaluator.v1.Decisions", "optout.admin.v1.Admin"];
/// Longest pause between attempts to reach PostgreSQL and RabbitMQ at start-up.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(10);

/// Binds `config.grpc_listen`, announces `{"service":"rule-evaluator","grpc":"ADDR"}` as the first stdout
/// line and serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    config.validate()?;
    let listener = TcpListener::bind(config.grpc_listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.grpc_listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.grpc_listen,
        source,
    })?;
    announce(addr)?;
    serve(config, listener, shutdown).await
}

fn announce(addr: SocketAddr) -> Result<()> {
    // Written by hand to keep the documented key order (service first).
    let service = serde_json::Value::from(SERVICE_NAME);
    let grpc = serde_json::Value::from(addr.to_string());
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, r#"{{"service":{service},"grpc":{grpc}}}"#).map_err(Error::Announce)?;
    stdout.flush().map_err(Error::Announce)
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    for service in SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// Serves gRPC on `listener` at once (health `NOT_SERVING`), connects to PostgreSQL and RabbitMQ (retrying
/// while they do not answer), then reports `SERVING` and consumes `members.changed` until `shutdown`. At
/// shutdown it reports `NOT_SERVING`, finishes the batch in hand and stops.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    config.validate()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(optout_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let shared = Arc::new(Shared::new());
    let auth = BearerAuth::new(config.admin_token.clone());
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(
        Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(AdminServer::with_interceptor(
                AdminService::new(shared.clone()),
                auth.clone(),
            ))
            .add_service(DecisionsServer::with_interceptor(
                DecisionsService::new(shared.clone()),
                auth,
            ))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                server_stop.clone().cancelled_owned(),
            ),
    );

    let result = consume_until_shutdown(&config, &shared, &health, &shutdown).await;
    set_health(&health, ServingStatus::NotServing).await;
    // RPCs under way finish before the server returns.
    server_stop.cancel();
    let served = server.await;
    result?;
    served??;
    info!("rule-evaluator stopped");
    Ok(())
}

async fn consume_until_shutdown(
    config: &Config,
    shared: &Arc<Shared>,
    health: &HealthReporter,
    shutdown: &CancellationToken,
) -> Result<()> {
    let Some(ready) = connect_with_retry(config, shutdown).await? else {
        return Ok(());
    };
    let connection = ready.connection.clone();
    let topology = ready.topology.clone();
    let publisher = Publisher::new(&connection, topology.clone()).await?;
    let evaluator = Arc::new(Evaluator {
        pool: ready.pool.clone(),
        publisher,
        topology: topology.clone(),
        scope: config.scope(),
        counters: shared.counters.clone(),
    });
    let _ = shared.ready.set(ready);
    set_health(health, ServingStatus::Serving).await;
    info!(
        queue = topology.members_changed_queue(),
        "rule-evaluator serving"
    );

    let options = ConsumeOptions {
        prefetch: config.prefetch,
        max_batch: config.max_batch,
        max_wait: config.max_wait(),
        paused: shared.paused.subscribe(),
        in_flight: shared.in_flight.clone(),
    };
    let queue = topology.members_changed_queue();
    optout_amqp::consume(
        &connection,
        &topology,
        &queue,
        options,
        shutdown.clone(),
        move |batch: Vec<Message<MembersChanged>>| {
            let evaluator = evaluator.clone();
            async move { evaluator.handle(batch).await }
        },
    )
    .await?;
    Ok(())
}

/// Connects to PostgreSQL (creating the schema and migrating) and RabbitMQ (declaring the topology), retrying
/// with backoff while they are unreachable. `None` when shutdown came first.
async fn connect_with_retry(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<Ready>> {
    let mut backoff = Duration::from_millis(250);
    loop {
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            attempt = connect(config) => attempt,
        };
        match attempt {
            Ok(ready) => return Ok(Some(ready)),
            Err(error) if error.is_transient() => {
                warn!(%error, retry_in_ms = backoff.as_millis() as u64, "dependencies not reachable yet");
            }
            Err(error) => return Err(error),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_CONNECT_BACKOFF);
    }
}

async fn connect(config: &Config) -> Result<Ready> {
    use secrecy::ExposeSecret;

    let pool = store::connect(
        &config.database_url,
        &config.evaluator_schema(),
        config.database_max_connections,
    )
    .await?;
    let connection = optout_amqp::connect(config.amqp_url.expose_secret()).await?;
    let topology = Topology::new(
        &config.exchange,
        &config.queue_prefix,
        config.persons_partitions,
    );
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| optout_amqp::Error::Amqp {
            operation: "channel.open",
            target: "topology".to_owned(),
            source,
        })?;
    optout_amqp::declare(&channel, &topology).await?;
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(Ready {
        pool,
        connection: Arc::new(connection),
        topology,
    })
}

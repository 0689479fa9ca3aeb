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

use optout_amqp::{ConsumeOptions, ConsumerMetrics, Message, Publisher, Topology};
use optout_proto::{
    admin::v1::admin_server::AdminServer, evaluator::v1::decisions_server::DecisionsServer,
};
use optout_service::signal::{CLOSE_STEP_LIMIT, close_task};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

pub use config::Config;
pub use error::{Error, Result};
pub use evaluate::snapshots_of;
pub use grpc::{BearerAuth, SERVICE_NAME};

use crate::{
    evaluate::{Evaluator, Inbound},
    grpc::{AdminService, DecisionsService, Ready, Shared},
};

/// gRPC names reported by the health service besides `""`.
const SERVICES: [&str; 2] = ["optout.evaluator.v1.Decisions", "optout.admin.v1.Admin"];
/// Longest pause between attempts to reach PostgreSQL and RabbitMQ at start-up.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(10);

/// Binds `config.grpc_listen`, announces `{"service":"rule-evaluator","grpc":"ADDR"}` as the first stdout
/// line and serves until `shutdown`. With `--migrate-only` it only runs [`migrate`].
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    config.validate()?;
    if config.migrate_only {
        return migrate(&config).await;
    }
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
    let metrics_listener = bind_metrics(&config).await?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(|source| Error::Bind {
            addr: config.metrics_listen,
            source,
        })?;
    announce(addr, metrics_addr)?;
    serve_with_metrics(config, listener, metrics_listener, shutdown).await
}

async fn bind_metrics(config: &Config) -> Result<TcpListener> {
    optout_telemetry::metrics::bind(config.metrics_listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.metrics_listen,
            source,
        })
}

fn announce(addr: SocketAddr, metrics_addr: SocketAddr) -> Result<()> {
    // Written by hand to keep the documented key order (service first).
    let service = serde_json::Value::from(SERVICE_NAME);
    let grpc = serde_json::Value::from(addr.to_string());
    let metrics = serde_json::Value::from(metrics_addr.to_string());
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        r#"{{"service":{service},"grpc":{grpc},"metrics":{metrics}}}"#
    )
    .map_err(Error::Announce)?;
    stdout.flush().map_err(Error::Announce)
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    optout_service::health::set_all(health, &SERVICES, status).await;
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
    let metrics_listener = bind_metrics(&config).await?;
    serve_with_metrics(config, listener, metrics_listener, shutdown).await
}

/// [`serve`], with Prometheus `/metrics` on `metrics_listener`: decisions by kind
/// (`optout_decisions_total{decision}`), consumer outcomes, dead letters, queue lag and depths.
pub async fn serve_with_metrics(
    config: Config,
    listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    config.validate()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(optout_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl before 1.8.8 and many other tools only speak the v1alpha reflection protocol.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(optout_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let shared = Arc::new(Shared::new());
    let auth = BearerAuth::new(config.admin_token.clone());
    let mut builder = Server::builder().trace_fn(optout_telemetry::grpc::server_span);
    if let Some(tls) = optout_service::tls::server_config(&config.grpc_tls)
        .map_err(|error| Error::Config(grpc::error_text(&error)))?
    {
        builder = builder
            .tls_config(tls)
            .map_err(|error| Error::Config(format!("invalid grpc tls configuration: {error}")))?;
    }
    // Health turns NOT_SERVING the moment shutdown starts, while the batch in hand is still finishing, so
    // load balancers stop sending RPCs before the server goes away.
    let health_at_shutdown = health.clone();
    let shutdown_started = shutdown.clone();
    tokio::spawn(async move {
        shutdown_started.cancelled().await;
        set_health(&health_at_shutdown, ServingStatus::NotServing).await;
    });
    let server_stop = CancellationToken::new();
    let consumer_metrics = ConsumerMetrics::default();
    let metrics_server = serve_metrics(
        metrics_listener,
        &shared,
        &consumer_metrics,
        server_stop.clone(),
    );
    let server = tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
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

    let result =
        consume_until_shutdown(&config, &shared, &health, &consumer_metrics, &shutdown).await;
    set_health(&health, ServingStatus::NotServing).await;
    // RPCs under way finish before the server returns.
    server_stop.cancel();
    let served = close_task("grpc server", CLOSE_STEP_LIMIT, server).await;
    if let Some(Ok(Err(error))) =
        close_task("metrics server", CLOSE_STEP_LIMIT, metrics_server).await
    {
        warn!(%error, "metrics server failed");
    }
    result?;
    if let Some(served) = served {
        served??;
    }
    info!("rule-evaluator stopped");
    Ok(())
}

/// Serves `/metrics` until `stop`; queue depths are read from the broker at each scrape.
fn serve_metrics(
    listener: TcpListener,
    shared: &Arc<Shared>,
    consumer_metrics: &ConsumerMetrics,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let mut registry = optout_telemetry::metrics::Registry::default();
    registry.register(
        "optout_decisions",
        "Decisions recomputed by kind (opt_out, opt_in, no_change)",
        shared.counters.decisions.clone(),
    );
    consumer_metrics.register(&mut registry);
    let refresh_shared = shared.clone();
    let refresh_metrics = consumer_metrics.clone();
    let refresh: optout_telemetry::metrics::Refresh = Arc::new(move || {
        let shared = refresh_shared.clone();
        let metrics = refresh_metrics.clone();
        Box::pin(async move {
            if let Some(ready) = shared.ready.get() {
                let queue = ready.topology.members_changed_queue();
                let queues = [ready.topology.dead_letter_queue(&queue), queue];
                metrics.refresh_depths(&ready.connection, &queues).await;
            }
        })
    });
    optout_telemetry::metrics::serve(listener, Arc::new(registry), Some(refresh), stop)
}

async fn consume_until_shutdown(
    config: &Config,
    shared: &Arc<Shared>,
    health: &HealthReporter,
    consumer_metrics: &ConsumerMetrics,
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
        first_sync_progress: Arc::default(),
    });
    let _ = shared.ready.set(ready);
    tokio::spawn(release_held_loop(
        evaluator.clone(),
        shared.paused.subscribe(),
        Duration::from_secs(config.first_sync_max_hold_secs),
        shutdown.clone(),
    ));
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
        // Pages come in whole from the fetcher: nothing gains from waiting longer for them.
        bulk: None,
        // A message the handler finds invalid is dead-lettered with its reason.
        handler_dead_letters: true,
    };
    let queue = topology.members_changed_queue();
    optout_amqp::consume_with_metrics(
        &connection,
        &topology,
        &queue,
        options,
        consumer_metrics.clone(),
        shutdown.clone(),
        move |batch: Vec<Message<Inbound>>| {
            let evaluator = evaluator.clone();
            async move { evaluator.handle(batch).await }
        },
    )
    .await?;
    Ok(())
}

/// How often the sync runs' bookkeeping is swept.
const FORGET_RUNS_EVERY: Duration = Duration::from_secs(600);
/// Age at which a run end or page is forgotten: far beyond any run, so only runs whose end never
/// came (or ends already flushed) go.
const FORGET_RUNS_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Publishes held first-sync opt-outs as they become releasable (see `Evaluator::release_held`):
/// at once when this replica applied a first-sync page or marker, and twice a second for what other
/// replicas applied and for the max hold; paused with the consumer. Also sweeps the bookkeeping of
/// old sync runs.
async fn release_held_loop(
    evaluator: Arc<Evaluator>,
    paused: tokio::sync::watch::Receiver<bool>,
    max_hold: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let progress = evaluator.first_sync_progress.clone();
    let mut forgot_runs_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            () = progress.notified() => {}
        }
        if forgot_runs_at.is_none_or(|at| at.elapsed() >= FORGET_RUNS_EVERY) {
            forgot_runs_at = Some(tokio::time::Instant::now());
            if let Err(error) = store::forget_old_runs(&evaluator.pool, FORGET_RUNS_AFTER).await {
                warn!(%error, "failed to forget old sync runs");
            }
        }
        while !*paused.borrow() && !shutdown.is_cancelled() {
            match evaluator.release_held(max_hold).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) => {
                    // The rows stay held; the next tick tries again.
                    warn!(%error, "failed to release held first-sync opt-outs");
                    break;
                }
            }
        }
    }
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

/// Creates the evaluator's schema and runs its migrations, then closes the pool (`--migrate-only`).
pub async fn migrate(config: &Config) -> Result<()> {
    let pool = store::connect(&config.database_url, &config.evaluator_schema(), 1).await?;
    pool.close().await;
    Ok(())
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

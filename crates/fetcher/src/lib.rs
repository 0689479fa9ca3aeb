//! The fetcher: the Mailchimp side of optout-sync.
//!
//! It polls every in-scope audience for members whose `last_changed` moved since the audience's
//! watermark and publishes each page as one `MembersChanged` on RabbitMQ, moving the watermark only
//! after every page is confirmed. It serves gRPC health, reflection and `optout.admin.v1.Admin`
//! (status, pause/resume, trigger a sync).

pub mod admin;
pub mod config;
mod error;
pub mod form;
pub mod http;
pub mod http_limits;
pub mod import;
pub mod memberships;
pub mod pager;
pub mod realtime;
pub mod realtime_config;
pub mod realtime_wiring;
pub mod store;
pub mod sync;
pub mod webhook;

use std::{io::Write, net::SocketAddr, sync::Arc, time::Duration};

use optout_amqp::Topology;
use optout_mailchimp::{MailchimpClient, MailchimpConfig};
use optout_proto::admin::v1::admin_server::AdminServer;
use optout_service::signal::{CLOSE_STEP_LIMIT, close_step, close_task};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use tokio::{net::TcpListener, sync::OnceCell};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

pub use config::Config;
pub use error::{Error, Result};
pub use sync::{Fetcher, RunReport, RunStatus, SyncRequest, SyncSettings};

use crate::admin::{AdminService, BearerAuth};

/// The gRPC name of the Admin service, for health reporting.
const ADMIN_SERVICE: &str = "optout.admin.v1.Admin";
/// How often the dependencies are re-checked for the health service.
const HEALTH_INTERVAL: Duration = Duration::from_secs(10);

/// Binds `config.grpc_listen`, announces `{"service":"fetcher","grpc":"ADDR"}` as the first stdout
/// line and serves until `shutdown`. With `--migrate-only` it only runs [`migrate`].
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    if config.migrate_only {
        return migrate(&config).await;
    }
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
    let http = realtime_wiring::bind_http(&config).await?;
    let http_addr = http.local_addr().map_err(|source| Error::Bind {
        addr: config.realtime.http_listen,
        source,
    })?;
    let metrics = bind_metrics(&config).await?;
    let metrics_addr = metrics.local_addr().map_err(|source| Error::Bind {
        addr: config.metrics_listen,
        source,
    })?;
    announce(addr, http_addr, metrics_addr)?;
    serve_with_listeners(config, listener, http, metrics, shutdown).await
}

async fn bind_metrics(config: &Config) -> Result<TcpListener> {
    optout_telemetry::metrics::bind(config.metrics_listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.metrics_listen,
            source,
        })
}

fn announce(addr: SocketAddr, http_addr: SocketAddr, metrics_addr: SocketAddr) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        r#"{{"service":"{}","grpc":"{addr}","http":"{http_addr}","metrics":"{metrics_addr}"}}"#,
        admin::SERVICE_NAME
    )
    .map_err(Error::Announce)?;
    stdout.flush().map_err(Error::Announce)
}

/// Serves gRPC on `listener` at once (health `NOT_SERVING`), connects to PostgreSQL, RabbitMQ and
/// Mailchimp (retrying until they answer), then reports `SERVING` and syncs on schedule and on demand
/// until `shutdown`. At shutdown it reports `NOT_SERVING`, lets the page under way be published and
/// stops.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let http = realtime_wiring::bind_http(&config).await?;
    serve_with_http(config, listener, http, shutdown).await
}

/// Like [`serve`], with the HTTP port (webhooks, Memberships API as JSON) on `http`.
pub async fn serve_with_http(
    config: Config,
    listener: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let metrics = bind_metrics(&config).await?;
    serve_with_listeners(config, listener, http, metrics, shutdown).await
}

/// Like [`serve_with_http`], with Prometheus `/metrics` on `metrics`: members read, pages published,
/// runs, and Mailchimp calls by endpoint and status (`optout_api_calls_total{api="mailchimp"}`).
pub async fn serve_with_listeners(
    config: Config,
    listener: TcpListener,
    http: TcpListener,
    metrics: TcpListener,
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
    let slot = Arc::new(OnceCell::new());
    let admin = AdminServer::with_interceptor(
        AdminService::new(Arc::clone(&slot)),
        BearerAuth::new(config.admin_token.clone()),
    );
    let realtime_slot: realtime_wiring::RealtimeSlot = Arc::new(OnceCell::new());
    let memberships = realtime_wiring::memberships_server(&config, &realtime_slot);
    let http_stop = CancellationToken::new();
    let http_server = realtime_wiring::spawn_http(&config, http, &realtime_slot, http_stop.clone());
    let mut builder = Server::builder().trace_fn(optout_telemetry::grpc::server_span);
    if let Some(tls) = optout_service::tls::server_config(&config.grpc_tls)
        .map_err(|error| Error::Config(format!("invalid grpc tls configuration: {error}")))?
    {
        builder = builder
            .tls_config(tls)
            .map_err(|error| Error::Config(format!("invalid grpc tls configuration: {error}")))?;
    }
    let server_stop = CancellationToken::new();
    let api_calls = optout_telemetry::metrics::ApiCalls::default();
    let metrics_server = serve_metrics(metrics, &slot, &api_calls, server_stop.clone());
    let mut server = tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(admin)
            .add_service(memberships)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener),
                server_stop.clone().cancelled_owned(),
            ),
    );

    let connected = tokio::select! {
        connected = connect_with_retry(&config, &api_calls) => Some(connected?),
        () = shutdown.cancelled() => None,
    };
    let Some(resources) = connected else {
        server_stop.cancel();
        realtime_wiring::stop_http(http_stop, http_server).await;
        return join_server(server).await;
    };
    realtime_wiring::start(
        &config,
        &realtime_slot,
        resources.client.clone(),
        resources.pool.clone(),
        Arc::clone(&resources.amqp),
        shutdown.child_token(),
    )?;
    let topology = topology(&config);
    let fetcher = Fetcher::new(
        resources.pool.clone(),
        resources.client,
        Arc::clone(&resources.amqp),
        topology,
        settings(&config),
        shutdown.child_token(),
    );
    // Set exactly once, right here.
    let _ = slot.set(fetcher.clone());
    set_health(&health, ServingStatus::Serving).await;
    info!("fetcher ready");
    fetcher.spawn_scheduler();
    let monitor = tokio::spawn(monitor_health(
        health.clone(),
        resources.pool.clone(),
        Arc::clone(&resources.amqp),
        shutdown.child_token(),
    ));
    let amqp_lost = optout_amqp::connection_lost(&resources.amqp);

    let server_result = tokio::select! {
        () = shutdown.cancelled() => None,
        () = amqp_lost.cancelled() => None,
        result = &mut server => Some(result),
    };
    let lost = amqp_lost.is_cancelled() && !shutdown.is_cancelled();
    info!("fetcher shutting down");
    monitor.abort();
    set_health(&health, ServingStatus::NotServing).await;
    // Cancel the fetcher's runs (a no-op when the shutdown token fired) and let the page under way finish.
    shutdown.cancel();
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    if tokio::time::timeout(grace, fetcher.drain()).await.is_err() {
        warn!(?grace, "sync did not stop within the grace period");
    }
    server_stop.cancel();
    realtime_wiring::stop_http(http_stop, http_server).await;
    if let Some(Ok(Err(error))) =
        close_task("metrics server", CLOSE_STEP_LIMIT, metrics_server).await
    {
        warn!(%error, "metrics server failed");
    }
    let served = match server_result {
        Some(result) => flatten_server(result),
        None => join_server(server).await,
    };
    let closed = close_step(
        "rabbitmq connection",
        CLOSE_STEP_LIMIT,
        resources.amqp.close(200, "fetcher shutting down".into()),
    )
    .await;
    if let Some(Err(error)) = closed {
        warn!(%error, "failed to close the rabbitmq connection");
    }
    close_step("database pool", CLOSE_STEP_LIMIT, resources.pool.close()).await;
    served?;
    if lost {
        return Err(Error::AmqpConnectionLost);
    }
    Ok(())
}

async fn join_server(
    server: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
) -> Result<()> {
    match close_task("grpc server", CLOSE_STEP_LIMIT, server).await {
        Some(result) => flatten_server(result),
        None => Ok(()),
    }
}

fn flatten_server(
    result: std::result::Result<
        std::result::Result<(), tonic::transport::Error>,
        tokio::task::JoinError,
    >,
) -> Result<()> {
    match result {
        Ok(served) => Ok(served?),
        Err(join_error) => {
            warn!(%join_error, "grpc server task ended abnormally");
            Ok(())
        }
    }
}

/// Serves `/metrics` until `stop`: the fetcher's cumulative counters (read at each scrape) and the
/// Mailchimp calls.
fn serve_metrics(
    listener: TcpListener,
    slot: &Arc<OnceCell<Fetcher>>,
    api_calls: &optout_telemetry::metrics::ApiCalls,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let mut registry = optout_telemetry::metrics::Registry::default();
    api_calls.register(&mut registry);
    let slot = Arc::clone(slot);
    let counters = optout_telemetry::metrics::SnapshotCounters::new(Arc::new(move || {
        let Some(fetcher) = slot.get() else {
            return Vec::new();
        };
        fetcher
            .counters()
            .snapshot()
            .into_iter()
            .map(|(name, value)| {
                (
                    format!("optout_{name}"),
                    format!("fetcher {}", name.replace('_', " ")),
                    u64::try_from(value).unwrap_or(0),
                )
            })
            .collect()
    }));
    registry.register_collector(Box::new(counters));
    optout_telemetry::metrics::serve(listener, Arc::new(registry), None, stop)
}

/// The AMQP topology from the configuration.
pub fn topology(config: &Config) -> Topology {
    Topology::new(
        &config.exchange,
        &config.queue_prefix,
        config.persons_partitions,
    )
}

/// The sync settings from the configuration.
pub fn settings(config: &Config) -> SyncSettings {
    SyncSettings {
        audiences: config
            .audiences
            .iter()
            .map(|audience| audience.trim().to_owned())
            .collect(),
        page_size: config.page_size,
        overlap: Duration::from_secs(config.sync_overlap_secs),
        concurrency: config.mailchimp_max_connections,
        interval: config.sync_interval(),
    }
}

/// The Mailchimp client from the configuration.
pub fn mailchimp_client(config: &Config) -> Result<MailchimpClient> {
    let mut mailchimp = MailchimpConfig::new(config.mailchimp_api_key.expose_secret());
    mailchimp.base_url.clone_from(&config.mailchimp_url);
    mailchimp.max_connections = config.mailchimp_max_connections;
    mailchimp.timeout = Duration::from_secs(config.mailchimp_timeout_secs);
    Ok(MailchimpClient::new(mailchimp)?)
}

struct Resources {
    pool: PgPool,
    amqp: Arc<lapin::Connection>,
    client: MailchimpClient,
}

/// Connects to every dependency, retrying with backoff: in a cluster they may start after us.
async fn connect_with_retry(
    config: &Config,
    api_calls: &optout_telemetry::metrics::ApiCalls,
) -> Result<Resources> {
    // A malformed key is a configuration error; retrying cannot fix it.
    let client = mailchimp_client(config)?.with_api_calls(api_calls.clone());
    let mut delay = Duration::from_millis(500);
    loop {
        match connect_once(config, &client).await {
            Ok((pool, amqp)) => return Ok(Resources { pool, amqp, client }),
            Err(error) => {
                warn!(error = %error.chain(), retry_in = ?delay, "dependencies not ready");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(15));
            }
        }
    }
}

/// Creates the fetcher's schema and runs its migrations, then closes the pool (`--migrate-only`).
pub async fn migrate(config: &Config) -> Result<()> {
    let pool = store::connect(
        config.database_url.expose_secret(),
        &config.fetcher_schema(),
        1,
    )
    .await?;
    pool.close().await;
    Ok(())
}

async fn connect_once(
    config: &Config,
    client: &MailchimpClient,
) -> Result<(PgPool, Arc<lapin::Connection>)> {
    let max_connections = u32::try_from(config.mailchimp_max_connections)
        .unwrap_or(u32::MAX)
        .saturating_add(4);
    let pool = store::connect(
        config.database_url.expose_secret(),
        &config.fetcher_schema(),
        max_connections,
    )
    .await?;
    let amqp = optout_amqp::connect(config.amqp_url.expose_secret()).await?;
    let channel = amqp
        .create_channel()
        .await
        .map_err(|source| optout_amqp::Error::Amqp {
            operation: "channel.open",
            target: "topology".to_owned(),
            source,
        })?;
    optout_amqp::declare(&channel, &topology(config)).await?;
    if let Err(error) = channel.close(200, "topology declared".into()).await {
        warn!(%error, "failed to close the topology channel");
    }
    let audiences = client.lists().await?;
    info!(audiences = audiences.len(), "mailchimp reachable");
    Ok((pool, Arc::new(amqp)))
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(ADMIN_SERVICE, status).await;
}

/// Keeps the health status in line with PostgreSQL and RabbitMQ after start-up.
async fn monitor_health(
    health: HealthReporter,
    pool: PgPool,
    amqp: Arc<lapin::Connection>,
    stop: CancellationToken,
) {
    let mut serving = true;
    loop {
        tokio::select! {
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
        let database_ok = sqlx::query("SELECT 1").execute(&pool).await.is_ok();
        let amqp_ok = amqp.status().connected();
        let healthy = database_ok && amqp_ok;
        if healthy != serving {
            if healthy {
                info!("dependencies healthy again");
            } else {
                warn!(
                    database_ok,
                    amqp_ok, "dependency check failed; reporting NOT_SERVING"
                );
            }
            serving = healthy;
            let status = if healthy {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_health(&health, status).await;
        }
    }
}

//! The salesforce-writer: the Salesforce side of optout-sync.
//!
//! It consumes `persons.dirty.{p}`, asks the rule-evaluator for the current decisions, reads the
//! current Email Opt Out values with SOQL, writes only the differences (sObject Collections, or a
//! Bulk API 2.0 job for large diffs), and audits every change. A poll of Salesforce
//! (`SystemModstamp` watermark) re-checks boxes someone unchecked while the person is opted out.
//! Messages are notifications: every pass re-reads the decision and Salesforce, so duplicates and
//! reordering cost at most a redundant read.

mod admin;
pub mod auto_optout;
mod coalesce;
pub mod config;
mod dry_run;
mod metrics;
pub mod plan;
mod poll;
mod records;
mod stage;
mod store;
mod writer;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use optout_amqp::{ConsumeOptions, ConsumerMetrics, Publisher, Topology};
use optout_proto::admin::v1::admin_server::AdminServer;
use optout_proto::evaluator::v1::decisions_client::DecisionsClient;
use optout_proto::queue::v1::PersonsDirty;
use optout_proto::writer::v1::records_server::RecordsServer;
use optout_telemetry::grpc::WithTrace;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Endpoint, Server};
use tonic_health::ServingStatus;

pub use config::Config;

use crate::admin::AdminService;
use crate::plan::SfObject;
use crate::records::RecordsService;
use crate::store::Store;
use crate::writer::Writer;
use optout_service::signal::{CLOSE_STEP_LIMIT, close_step, close_task};
use optout_service::{AttachBearer, RequireBearer};

/// Errors of the writer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// PostgreSQL failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// The schema migrations failed.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A Salesforce call failed.
    #[error("salesforce call failed")]
    Salesforce(#[from] optout_salesforce::Error),
    /// RabbitMQ failed.
    #[error("amqp error")]
    Amqp(#[from] optout_amqp::Error),
    /// The RabbitMQ connection failed after start-up (the process exits to be restarted).
    #[error("the rabbitmq connection was lost")]
    AmqpConnectionLost,
    /// A call to the rule-evaluator failed.
    #[error("evaluator call failed: {0}")]
    Evaluator(Box<tonic::Status>),
    /// A call to the fetcher's Memberships API failed (automated opt-out).
    #[error("fetcher call failed: {0}")]
    Fetcher(Box<tonic::Status>),
    /// The gRPC server failed.
    #[error("grpc server error")]
    Grpc(#[from] tonic::transport::Error),
    /// Binding or writing failed.
    #[error("i/o error")]
    Io(#[from] std::io::Error),
}

/// Result with the writer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// gRPC names reported by the health service besides `""`.
const HEALTH_SERVICES: [&str; 2] = ["optout.admin.v1.Admin", "optout.writer.v1.Records"];

/// Binds `config.grpc_listen`, prints `{"service":"salesforce-writer","grpc":"ADDR"}` as the first
/// stdout line, and serves until `shutdown` (see [`serve`]). With `--migrate-only` it only runs
/// [`migrate`].
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    if config.migrate_only {
        config.validate()?;
        return migrate(&config).await;
    }
    let listener = TcpListener::bind(config.grpc_listen).await?;
    let address = listener.local_addr()?;
    let metrics_listener = optout_telemetry::metrics::bind(config.metrics_listen).await?;
    announce(address, metrics_listener.local_addr()?)?;
    serve_with_metrics(config, listener, metrics_listener, shutdown).await
}

/// Creates the writer's schema and runs its migrations, then closes the pool (`--migrate-only`).
pub async fn migrate(config: &Config) -> Result<()> {
    let store = Store::connect(&config.database_url, &config.writer_schema()).await?;
    store.close().await;
    Ok(())
}

fn announce(address: SocketAddr, metrics: SocketAddr) -> Result<()> {
    use std::io::Write;
    // Written by hand to keep the documented key order (serde_json sorts keys).
    let line =
        format!(r#"{{"service":"salesforce-writer","grpc":"{address}","metrics":"{metrics}"}}"#);
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

/// Runtime state shared by the admin service, the consumers and the poll loop.
#[derive(Debug)]
pub(crate) struct AppState {
    pub(crate) writer: Arc<Writer>,
    pub(crate) amqp: lapin::Connection,
    pub(crate) paused: watch::Sender<bool>,
    pub(crate) in_flight: Arc<AtomicU64>,
    pub(crate) started: Instant,
    last_run: Mutex<(String, bool)>,
    /// One poll cycle at a time per process (the scheduled one or a triggered one).
    poll_lock: tokio::sync::Mutex<()>,
    /// The automated opt-out, when enabled: a triggered poll cycle runs one of its cycles too.
    auto_optout: Option<auto_optout::AutoOptOut>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl AppState {
    /// The id of the last triggered poll cycle and whether it finished.
    pub(crate) fn last_run(&self) -> (String, bool) {
        self.last_run
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_last_run(&self, run_id: &str, finished: bool) {
        *self
            .last_run
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = (run_id.to_owned(), finished);
    }

    /// Runs a dry-run poll cycle to the end and reports what it would write (see [`dry_run`]).
    pub(crate) async fn dry_run_cycle(
        &self,
        full: bool,
    ) -> Result<(String, optout_proto::admin::v1::DryRunReport)> {
        let run_id = uuid::Uuid::new_v4().to_string();
        let _cycle = self.poll_lock.lock().await;
        tracing::info!(%run_id, full, "dry-run poll cycle");
        let report = poll::poll_cycle(&self.writer, full, true).await?;
        Ok((
            run_id,
            dry_run::report(&self.writer.objects, report.planned, report.scanned),
        ))
    }

    /// Starts a poll cycle in the background and returns its run id.
    pub(crate) fn start_poll_cycle(self: &Arc<Self>, full: bool, dry_run: bool) -> String {
        let run_id = uuid::Uuid::new_v4().to_string();
        self.set_last_run(&run_id, false);
        let state = Arc::clone(self);
        let task_run_id = run_id.clone();
        self.tasks.spawn(async move {
            let _cycle = state.poll_lock.lock().await;
            tracing::info!(run_id = %task_run_id, full, dry_run, "triggered salesforce poll cycle");
            if let Err(error) = poll::poll_cycle(&state.writer, full, dry_run).await {
                tracing::warn!(run_id = %task_run_id, error = %error_chain(&error), "triggered poll cycle failed");
            }
            // Without this, `optoutctl sync --wait` would leave boxes checked in Salesforce
            // unsubscribed only at the automated opt-out's own next tick (60 s when polls run on
            // demand only). It writes to Mailchimp, so never in a dry run.
            if let (false, Some(auto)) = (dry_run, &state.auto_optout) {
                let _busy = state.writer.busy_guard();
                if let Err(error) = auto_optout::cycle(&state.writer, auto).await {
                    tracing::warn!(run_id = %task_run_id, error = %error_chain(&error), "triggered automated opt-out cycle failed");
                }
            }
            // Only mark it finished if no newer trigger took its place meanwhile.
            let mut last = state.last_run.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if last.0 == task_run_id {
                last.1 = true;
            }
        });
        run_id
    }
}

/// Serves on `listener` until `shutdown`: gRPC first (health NOT_SERVING), then PostgreSQL,
/// RabbitMQ and Salesforce; SERVING once all three answered. On shutdown it stops taking
/// deliveries, finishes the batch in hand (bounded by the grace period) and returns.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    config.validate()?;
    let metrics_listener = optout_telemetry::metrics::bind(config.metrics_listen).await?;
    serve_with_metrics(config, listener, metrics_listener, shutdown).await
}

/// [`serve`], with Prometheus `/metrics` on `metrics_listener`: records written and failed, the
/// opt-out latency histogram and oldest-unwritten gauge, Salesforce calls and remaining budget,
/// consumer outcomes, dead letters, queue lag and depths.
pub async fn serve_with_metrics(
    config: Config,
    listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    config.validate()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    optout_service::health::set_all(&health, &HEALTH_SERVICES, ServingStatus::NotServing).await;
    let tls = optout_service::tls::server_config(&config.grpc_tls)
        .map_err(|error| Error::Config(error_chain(&error)))?;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(optout_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| Error::Config(format!("reflection: {error}")))?;
    // grpcurl before 1.8.8 and many other tools only speak the v1alpha reflection protocol.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(optout_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|error| Error::Config(format!("reflection: {error}")))?;
    let state_cell: Arc<OnceLock<Arc<AppState>>> = Arc::new(OnceLock::new());
    let admin = AdminServer::with_interceptor(
        AdminService {
            state: Arc::clone(&state_cell),
        },
        RequireBearer::new(config.admin_token.clone()),
    );
    let records = RecordsServer::with_interceptor(
        RecordsService {
            state: Arc::clone(&state_cell),
        },
        RequireBearer::new(config.admin_token.clone()),
    );
    let observability = Observability::default();
    let metrics_stop = CancellationToken::new();
    let metrics_server = serve_metrics(
        metrics_listener,
        &observability,
        &state_cell,
        metrics_stop.clone(),
    );
    let mut builder = Server::builder().trace_fn(optout_telemetry::grpc::server_span);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|error| Error::Config(format!("invalid grpc tls configuration: {error}")))?;
    }
    let grpc_stop = CancellationToken::new();
    let grpc_stopped = grpc_stop.clone();
    let grpc = tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(admin)
            .add_service(records)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async move { grpc_stopped.cancelled().await },
            ),
    );

    let result = start_and_work(&config, &state_cell, &health, &observability, &shutdown).await;
    optout_service::health::set_all(&health, &HEALTH_SERVICES, ServingStatus::NotServing).await;
    grpc_stop.cancel();
    match close_task("grpc server", CLOSE_STEP_LIMIT, grpc).await {
        Some(Ok(Ok(()))) | None => {}
        Some(Ok(Err(error))) => tracing::warn!(%error, "grpc server ended with an error"),
        Some(Err(error)) => tracing::warn!(%error, "grpc server task failed"),
    }
    metrics_stop.cancel();
    if let Some(Ok(Err(error))) =
        close_task("metrics server", CLOSE_STEP_LIMIT, metrics_server).await
    {
        tracing::warn!(%error, "metrics server failed");
    }
    if let Some(state) = state_cell.get() {
        close_step(
            "database pool",
            CLOSE_STEP_LIMIT,
            state.writer.store.close(),
        )
        .await;
        close_step(
            "rabbitmq connection",
            CLOSE_STEP_LIMIT,
            state.amqp.close(200, "shutdown".into()),
        )
        .await;
    }
    result
}

/// The metrics shared by the write path and the consumers.
#[derive(Clone, Debug, Default)]
pub(crate) struct Observability {
    writer: Arc<metrics::WriterMetrics>,
    consumers: ConsumerMetrics,
}

/// Serves `/metrics` until `stop`; the API budget and queue depths are read at each scrape.
fn serve_metrics(
    listener: TcpListener,
    observability: &Observability,
    state_cell: &Arc<OnceLock<Arc<AppState>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let mut registry = optout_telemetry::metrics::Registry::default();
    observability.writer.register(&mut registry);
    observability.consumers.register(&mut registry);
    let observability = observability.clone();
    let state_cell = Arc::clone(state_cell);
    let refresh: optout_telemetry::metrics::Refresh = Arc::new(move || {
        let observability = observability.clone();
        let state_cell = Arc::clone(&state_cell);
        Box::pin(async move {
            let Some(state) = state_cell.get() else {
                return;
            };
            observability
                .writer
                .refresh(state.writer.salesforce.limits());
            let queues: Vec<String> = state
                .writer
                .topology
                .persons_dirty_queues()
                .into_iter()
                .flat_map(|queue| [state.writer.topology.dead_letter_queue(&queue), queue])
                .collect();
            observability
                .consumers
                .refresh_depths(&state.amqp, &queues)
                .await;
        })
    });
    optout_telemetry::metrics::serve(listener, Arc::new(registry), Some(refresh), stop)
}

/// What start-up connects to.
struct Dependencies {
    writer: Arc<Writer>,
    amqp: lapin::Connection,
}

/// Connects PostgreSQL, RabbitMQ and Salesforce, retrying with backoff until they answer (they
/// may start after us under compose or Kubernetes); configuration errors end start-up at once.
async fn connect_with_retry(
    config: &Config,
    observability: &Observability,
    shutdown: &CancellationToken,
) -> Result<Option<Dependencies>> {
    let mut attempt: u32 = 0;
    loop {
        match connect(config, observability).await {
            Ok(dependencies) => return Ok(Some(dependencies)),
            Err(error @ (Error::Config(_) | Error::Migrate(_))) => return Err(error),
            Err(error) => {
                attempt = attempt.saturating_add(1);
                let backoff = Duration::from_millis(500 * 2u64.pow(attempt.min(6)));
                tracing::warn!(error = %error_chain(&error), ?backoff, "dependencies not ready, retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(None),
                    () = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}

async fn connect(config: &Config, observability: &Observability) -> Result<Dependencies> {
    let store = Store::connect(&config.database_url, &config.writer_schema()).await?;
    let topology = config.topology();
    let amqp = optout_amqp::connect(secrecy::ExposeSecret::expose_secret(&config.amqp_url)).await?;
    let channel = amqp
        .create_channel()
        .await
        .map_err(|source| optout_amqp::Error::Amqp {
            operation: "channel.open",
            target: "declare".to_owned(),
            source,
        })?;
    optout_amqp::declare(&channel, &topology).await?;
    drop(channel.close(200, "declared".into()).await);
    let publisher = Publisher::new(&amqp, topology.clone()).await?;
    // The default exchange ("") routes by queue name: this publishes straight into a DLQ.
    let default_exchange = Topology {
        exchange: String::new(),
        ..topology.clone()
    };
    let dlq_publisher = Publisher::new(&amqp, default_exchange).await?;

    let salesforce = optout_salesforce::SalesforceClient::new(config.salesforce_config()?)?
        .with_api_calls(observability.writer.api_calls.clone());
    // Needs a token, so this also proves the credentials work.
    let person_accounts = salesforce.has_person_accounts().await?;
    let objects: Vec<SfObject> = SfObject::ALL
        .into_iter()
        .filter(|object| config.objects.contains(object))
        .filter(|object| *object != SfObject::PersonAccount || person_accounts)
        .collect();
    tracing::info!(person_accounts, objects = ?objects, "salesforce connected");

    let evaluator_token = config
        .evaluator_token
        .clone()
        .unwrap_or_else(|| config.admin_token.clone());
    let evaluator_channel = Endpoint::from_shared(config.evaluator_url.clone())
        .map_err(|error| Error::Config(format!("invalid --evaluator-url: {error}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        // Lazy: the evaluator may start after us; calls fail (and messages retry) until it is up.
        .connect_lazy();
    let decisions =
        DecisionsClient::with_interceptor(
            evaluator_channel,
            WithTrace(AttachBearer::new(&evaluator_token).map_err(|error| {
                Error::Config(format!("invalid OPTOUT_EVALUATOR_TOKEN: {error}"))
            })?),
        );

    let writer = Arc::new(Writer::new(
        salesforce,
        decisions,
        store,
        publisher,
        dlq_publisher,
        topology,
        objects,
        person_accounts,
        config.bulk_threshold,
        Arc::clone(&observability.writer),
    ));
    poll::initialize_watermarks(&writer).await?;
    Ok(Dependencies { writer, amqp })
}

async fn start_and_work(
    config: &Config,
    state_cell: &OnceLock<Arc<AppState>>,
    health: &tonic_health::server::HealthReporter,
    observability: &Observability,
    shutdown: &CancellationToken,
) -> Result<()> {
    let Some(Dependencies { writer, amqp }) =
        connect_with_retry(config, observability, shutdown).await?
    else {
        return Ok(());
    };
    let topology = writer.topology.clone();
    let (paused, _) = watch::channel(false);
    let tasks = TaskTracker::new();
    let auto = auto_optout::AutoOptOut::new(&config.auto_optout, &config.admin_token)?;
    let state = Arc::new(AppState {
        writer: Arc::clone(&writer),
        amqp,
        paused,
        in_flight: Arc::new(AtomicU64::new(0)),
        started: Instant::now(),
        last_run: Mutex::new((String::new(), false)),
        poll_lock: tokio::sync::Mutex::new(()),
        auto_optout: auto.clone(),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
    });
    // Set once; a second call cannot happen since serve() creates the cell.
    drop(state_cell.set(Arc::clone(&state)));

    // Each persons.dirty partition is a single-active-consumer queue and emails are hashed to
    // partitions, so among all writer replicas exactly one handles a given email at a time. That
    // keeps two writers from reading the same record, diffing and writing opposite values in an
    // interleaved order; the version re-check after writing covers the decision moving meanwhile.
    let coalescer = coalesce::Coalescer::spawn(
        Arc::clone(&writer),
        Arc::clone(&state.in_flight),
        coalesce::Waits {
            urgent: config.batch_wait(),
            longest: config.longest_batch_wait(),
        },
        &tasks,
    );
    for queue in topology.persons_dirty_queues() {
        tasks.spawn(consume_partition(
            Arc::clone(&state),
            config.clone(),
            topology.clone(),
            queue,
            observability.consumers.clone(),
            coalescer.clone(),
        ));
    }
    // The pass task ends once the consumers, holding the clones, have stopped.
    drop(coalescer);
    if let Some(auto) = auto {
        let period = config.poll_interval().unwrap_or(Duration::from_secs(60));
        tasks.spawn(auto_optout::run_loop(
            Arc::clone(&writer),
            auto,
            period,
            state.paused.subscribe(),
            shutdown.clone(),
        ));
    }
    if let Some(interval) = config.poll_interval() {
        tasks.spawn(poll_loop(Arc::clone(&state), interval));
    }
    tasks.spawn(health_loop(Arc::clone(&state), health.clone()));
    optout_service::health::set_all(health, &HEALTH_SERVICES, ServingStatus::Serving).await;
    tracing::info!("salesforce-writer serving");

    let amqp_lost = optout_amqp::connection_lost(&state.amqp);
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = amqp_lost.cancelled() => {
            // The consumers would retry on the dead connection forever: stop everything and
            // exit non-zero so the supervisor starts a writer with a fresh connection.
            shutdown.cancel();
        }
    }
    let lost = amqp_lost.is_cancelled();
    tracing::info!("shutting down: no new deliveries, finishing the batch in hand");
    optout_service::health::set_all(health, &HEALTH_SERVICES, ServingStatus::NotServing).await;
    tasks.close();
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            "in-flight work did not finish within the grace period"
        );
    }
    if lost {
        return Err(Error::AmqpConnectionLost);
    }
    Ok(())
}

/// Consumes one partition queue until shutdown, restarting the consumer after broker errors.
async fn consume_partition(
    state: Arc<AppState>,
    config: Config,
    topology: Topology,
    queue: String,
    metrics: ConsumerMetrics,
    coalescer: coalesce::Coalescer,
) {
    let mut failures: u32 = 0;
    loop {
        let options = ConsumeOptions {
            prefetch: u16::try_from(config.batch_size).unwrap_or(u16::MAX),
            max_batch: config.batch_size,
            max_wait: config.batch_wait(),
            paused: state.paused.subscribe(),
            in_flight: Arc::clone(&state.in_flight),
            bulk: config.sync_batching(),
            // Records Salesforce rejects are dead-lettered as notifications of their own (see
            // `Writer::dead_letter`), never as the delivery: the consumer need not keep the
            // bodies of a burst's batches while their pass runs.
            handler_dead_letters: false,
        };
        let coalescer = coalescer.clone();
        let result = optout_amqp::consume_incoming::<PersonsDirty, _, _>(
            &state.amqp,
            &topology,
            &queue,
            options,
            metrics.clone(),
            state.shutdown.clone(),
            move |incoming| {
                let coalescer = coalescer.clone();
                async move { coalescer.handle_batch(incoming).await }
            },
        )
        .await;
        match result {
            Ok(()) => return,
            Err(error) => {
                if state.shutdown.is_cancelled() {
                    return;
                }
                failures = failures.saturating_add(1);
                let backoff = Duration::from_millis(500 * 2u64.pow(failures.min(6)));
                tracing::warn!(%queue, error = %error_chain(&error), ?backoff, "consumer stopped, restarting");
                tokio::select! {
                    () = state.shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}

/// Runs a poll cycle every `interval` while not paused.
async fn poll_loop(state: Arc<AppState>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick fires at once; the watermarks were just initialised, so skip it.
    ticker.tick().await;
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if *state.paused.borrow() {
            continue;
        }
        let _cycle = state.poll_lock.lock().await;
        if let Err(error) = poll::poll_cycle(&state.writer, false, false).await {
            tracing::warn!(error = %error_chain(&error), "salesforce poll cycle failed");
        }
    }
}

/// Reports NOT_SERVING while PostgreSQL or RabbitMQ is unreachable.
async fn health_loop(state: Arc<AppState>, health: tonic_health::server::HealthReporter) {
    let mut serving = true;
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        let database_ok = state.writer.store.ping().await.is_ok();
        let amqp_ok = state.amqp.status().connected();
        let healthy = database_ok && amqp_ok;
        if healthy != serving && !state.shutdown.is_cancelled() {
            tracing::warn!(database_ok, amqp_ok, "health changed");
            let status = if healthy {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            optout_service::health::set_all(&health, &HEALTH_SERVICES, status).await;
            serving = healthy;
        }
    }
}

/// An error with its sources, for one log line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

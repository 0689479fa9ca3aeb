//! One place where every binary sets up its telemetry, so all services log, trace and count alike.
//!
//! - **Logs** go to stderr, because stdout's first line is the machine-readable "I am listening"
//!   announcement that `optoutctl up` and the tests read. `RUST_LOG` filters (default `info`);
//!   `OPTOUT_LOG_JSON=1` switches to one JSON object per line carrying `trace_id` and `span_id`.
//! - **Traces**: `tracing` spans become OpenTelemetry spans. They are exported over OTLP/gRPC when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (the standard
//!   `OTEL_*` variables configure the exporter and the batch processor as in every OpenTelemetry SDK);
//!   otherwise spans still get ids (for logs, audit rows and propagation) but go nowhere.
//! - **Propagation**: W3C trace context through gRPC metadata ([`grpc`]), HTTP headers ([`http`]) and any
//!   other carrier ([`inject`], [`extract`]; the AMQP carrier lives in `optout-amqp`).
//! - **Metrics**: Prometheus text exposition served by [`metrics::serve`].

pub mod grpc;
pub mod http;
mod logs;
pub mod metrics;

use std::{sync::OnceLock, time::Duration};

use opentelemetry::{
    KeyValue,
    propagation::{Extractor, Injector},
    trace::TracerProvider as _,
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// Re-exported so carriers elsewhere name one version of the OpenTelemetry API.
pub use opentelemetry;
/// Re-exported for `set_parent` / `add_link` / `context` on `tracing::Span`.
pub use tracing_opentelemetry::{self, OpenTelemetrySpanExt as SpanExt};

/// How long [`TelemetryHandle::shutdown`] waits for the last spans to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps telemetry alive for the life of the process; call [`TelemetryHandle::shutdown`] last.
#[derive(Debug)]
pub struct TelemetryHandle {
    service: String,
    provider: Option<SdkTracerProvider>,
}

impl TelemetryHandle {
    /// The service name given to [`init`].
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered and stops the exporter, waiting at most five seconds.
    ///
    /// The flush runs on its own thread: the SDK blocks while the gRPC exporter (driven by the tokio
    /// runtime) sends, so it must not occupy the caller's runtime thread unboundedly, and an unreachable
    /// collector must not hold up the exit.
    pub fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let (done, finished) = std::sync::mpsc::channel();
        let flush = std::thread::Builder::new()
            .name("otel-flush".to_owned())
            .spawn(move || {
                let result = provider.shutdown_with_timeout(FLUSH_TIMEOUT);
                drop(done.send(result));
            });
        if flush.is_err() {
            return;
        }
        match finished.recv_timeout(FLUSH_TIMEOUT + Duration::from_millis(500)) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("failed to flush traces: {error}"),
            Err(_) => eprintln!("timed out flushing traces"),
        }
    }
}

/// Explicit settings for [`init_with`], for tests that run services in-process and may not change the
/// environment.
#[derive(Clone, Debug, Default)]
pub struct TelemetryOptions {
    /// `service.name` (unless `OTEL_SERVICE_NAME` is set).
    pub service: String,
    /// OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`; `None` reads the standard variables.
    pub otlp_endpoint: Option<String>,
    /// Batch processor delay; `None` reads `OTEL_BSP_SCHEDULE_DELAY` (default 5 s).
    pub batch_delay: Option<Duration>,
}

impl TelemetryHandle {
    /// Exports every finished span now (blocking; call from `spawn_blocking` in async code).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(error) = provider.force_flush()
        {
            eprintln!("failed to flush traces: {error}");
        }
    }
}

/// The tracer provider of this process, once [`init`] installed one.
static PROVIDER: OnceLock<Option<SdkTracerProvider>> = OnceLock::new();

/// Installs the global subscriber and the W3C trace-context propagator for `service`.
///
/// Safe to call more than once (tests, several services in one process): later calls keep the first
/// subscriber and provider, and only the first handle flushes.
pub fn init(service: &str) -> TelemetryHandle {
    init_with(TelemetryOptions {
        service: service.to_owned(),
        ..TelemetryOptions::default()
    })
}

/// [`init`] with explicit settings.
pub fn init_with(options: TelemetryOptions) -> TelemetryHandle {
    let service = options.service.as_str();
    let mut first = false;
    let provider = PROVIDER
        .get_or_init(|| {
            first = true;
            build_provider(&options)
        })
        .clone();
    if first {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        install_subscriber(service);
    }
    TelemetryHandle {
        service: service.to_owned(),
        provider: if first { provider } else { None },
    }
}

/// Whether the standard variables ask for OTLP export.
fn otlp_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED")
        .is_ok_and(|value| value.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER")
            .is_ok_and(|value| value.eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// `service.name` (from `OTEL_SERVICE_NAME` when set, as the specification says, else `service`),
/// `service.version` and a fresh `service.instance.id`, plus `OTEL_RESOURCE_ATTRIBUTES`.
fn resource(service: &str) -> Resource {
    let mut builder = Resource::builder();
    let named_by_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.trim().is_empty());
    if !named_by_env {
        builder = builder.with_service_name(service.to_owned());
    }
    builder
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", uuid::Uuid::new_v4().to_string()),
        ])
        .build()
}

/// The provider that exports over OTLP, or `None` when export is off.
fn build_provider(options: &TelemetryOptions) -> Option<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor};

    if options.otlp_endpoint.is_none() && !otlp_requested() {
        return None;
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = &options.otlp_endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    // The tonic channel connects lazily, so a collector that starts later is fine.
    match builder.build() {
        Ok(exporter) => {
            // The default builder reads the OTEL_BSP_* variables; an explicit delay overrides them.
            let mut batch = BatchConfigBuilder::default();
            if let Some(delay) = options.batch_delay {
                batch = batch.with_scheduled_delay(delay);
            }
            let processor = BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch.build())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_span_processor(processor)
                    .with_resource(resource(&options.service))
                    .build(),
            )
        }
        Err(error) => {
            eprintln!("otlp exporter disabled: {error}");
            None
        }
    }
}

fn install_subscriber(service: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("OPTOUT_LOG_JSON").is_ok_and(|value| value == "1" || value == "true");
    // Without an exporter spans still get ids: logs and audit rows carry them and they propagate, so a
    // trace stays whole when only some services export.
    let provider = PROVIDER.get().cloned().flatten().unwrap_or_else(|| {
        SdkTracerProvider::builder()
            .with_resource(resource(service))
            .build()
    });
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer(service.to_owned());
    // RUST_LOG tunes the logs only: quieting them must not cut spans out of traces.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .event_format(logs::JsonWithTrace)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    };
    let result = tracing_subscriber::registry()
        .with(otel)
        .with(logs)
        .try_init();
    // Another subscriber already installed (a test's own) is expected, not an error.
    if result.is_ok() {
        let dispatch = tracing::dispatcher::get_default(tracing::Dispatch::downgrade);
        drop(logs::LOG_DISPATCH.set(dispatch));
    }
}

/// Writes the current span's context into `injector` with the global (W3C) propagator.
pub fn inject(injector: &mut dyn Injector) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, injector);
    });
}

/// Reads a remote parent context from `extractor` with the global (W3C) propagator.
pub fn extract(extractor: &dyn Extractor) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(extractor))
}

/// The remote span context in `context`, if it carries a valid one.
pub fn remote_span_context(
    context: &opentelemetry::Context,
) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::TraceContextExt;
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// Makes `span` a child of the remote `parent` when it carries a valid span context. Call it before the
/// span is first entered; a span that already started keeps its parent (logged at debug).
pub fn set_remote_parent(span: &tracing::Span, parent: opentelemetry::Context) {
    if remote_span_context(&parent).is_none() {
        return;
    }
    if let Err(error) = span.set_parent(parent) {
        tracing::debug!(%error, "failed to set remote parent");
    }
}

/// The W3C trace id of the current span (32 hex digits), if it has a valid one.
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

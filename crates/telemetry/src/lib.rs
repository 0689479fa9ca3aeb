//! One place where every binary sets up its logging, so all services log alike.
//!
//! Logs go to stderr, because stdout's first line is the machine-readable "I am listening"
//! announcement that `optoutctl up` and the tests read. `RUST_LOG` filters (default `info`);
//! `OPTOUT_LOG_JSON=1` switches to one JSON object per line, as log collectors on Kubernetes expect.

use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Keeps telemetry alive for the life of the process; call [`TelemetryHandle::shutdown`] last.
#[derive(Debug)]
pub struct TelemetryHandle {
    service: String,
}

impl TelemetryHandle {
    /// The service name given to [`init`].
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Flushes what is buffered. Logging is unbuffered today; exporters added later flush here.
    pub fn shutdown(self) {}
}

/// Installs the global subscriber for `service`. Safe to call more than once (tests): later calls
/// keep the first subscriber.
pub fn init(service: &str) -> TelemetryHandle {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("OPTOUT_LOG_JSON").is_ok_and(|value| value == "1" || value == "true");
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr))
            .try_init()
    } else {
        registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).try_init()
    };
    // A second init in one process (several services in one test) is expected, not an error.
    drop(result);
    TelemetryHandle { service: service.to_owned() }
}

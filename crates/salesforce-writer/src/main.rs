//! `optout-salesforce-writer`: parses the configuration, installs logging, and runs the writer
//! until SIGTERM or SIGINT.

use std::process::ExitCode;
use std::time::Duration;

use optout_salesforce_writer::{Config, Error, error_chain, run};
use optout_service::{EXIT_CONFIG, EXIT_FAILURE};
use tokio_util::sync::CancellationToken;

/// Time on top of the drain's grace period for closing connections and flushing telemetry.
const EXIT_MARGIN: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    optout_service::runtime::run("optout-salesforce-writer", serve())
}

async fn serve() -> ExitCode {
    // Defaults, then `--config FILE`, then OPTOUT_* (and OPTOUT_*_FILE), then flags.
    let config: Config = match optout_service::config::load() {
        Ok(config) => config,
        Err(error) => return error.report("optout-salesforce-writer"),
    };
    if let Err(error) = config.validate() {
        eprintln!("optout-salesforce-writer: {error}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let telemetry = optout_telemetry::init("salesforce-writer");
    let shutdown = CancellationToken::new();
    optout_service::signal::spawn_watcher(
        "optout-salesforce-writer",
        shutdown.clone(),
        Duration::from_secs(config.shutdown_grace_secs) + EXIT_MARGIN,
    );
    let result = run(config, shutdown).await;
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error_chain(&error), "salesforce-writer failed");
            eprintln!("optout-salesforce-writer: {}", error_chain(&error));
            // A setting that only fails once used (an unreadable TLS key) is still a configuration error.
            ExitCode::from(match error {
                Error::Config(_) => EXIT_CONFIG,
                _ => EXIT_FAILURE,
            })
        }
    };
    telemetry.shutdown();
    code
}

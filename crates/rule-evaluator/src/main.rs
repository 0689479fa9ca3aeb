//! `optout-rule-evaluator`: parses the configuration, installs signal handling and runs the service.

use std::process::ExitCode;
use std::time::Duration;

use optout_rule_evaluator::{Config, Error, run};
use optout_service::{EXIT_CONFIG, EXIT_FAILURE};
use tokio_util::sync::CancellationToken;
use tracing::error;

/// Time on top of the drain's grace period for closing connections and flushing telemetry.
const EXIT_MARGIN: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    optout_service::runtime::run("optout-rule-evaluator", serve())
}

async fn serve() -> ExitCode {
    // Defaults, then `--config FILE`, then OPTOUT_* (and OPTOUT_*_FILE), then flags.
    let config: Config = match optout_service::config::load() {
        Ok(config) => config,
        Err(error) => return error.report("optout-rule-evaluator"),
    };
    if let Err(error) = config.validate() {
        eprintln!("optout-rule-evaluator: {error}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let telemetry = optout_telemetry::init("rule-evaluator");
    let shutdown = CancellationToken::new();
    optout_service::signal::spawn_watcher(
        "optout-rule-evaluator",
        shutdown.clone(),
        Duration::from_secs(config.shutdown_grace_secs) + EXIT_MARGIN,
    );
    let result = run(config, shutdown).await;
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let code = match failure {
                Error::Config(_) => EXIT_CONFIG,
                _ => EXIT_FAILURE,
            };
            let chain: Vec<String> = anyhow::Error::new(failure)
                .chain()
                .map(ToString::to_string)
                .collect();
            error!(error = chain.join(": "), "rule-evaluator failed");
            eprintln!("optout-rule-evaluator: {}", chain.join(": "));
            ExitCode::from(code)
        }
    };
    telemetry.shutdown();
    code
}

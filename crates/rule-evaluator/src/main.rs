//! `optout-rule-evaluator`: parses the configuration, installs signal handling and runs the service.

use std::process::ExitCode;

use clap::Parser;
use optout_rule_evaluator::{Config, run};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Exit code for an invalid configuration (sysexits `EX_USAGE`).
const EXIT_USAGE: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(error) = config.validate() {
        eprintln!("optout-rule-evaluator: {error}");
        return ExitCode::from(EXIT_USAGE);
    }
    let telemetry = optout_telemetry::init("rule-evaluator");
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    let result = run(config, shutdown).await;
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let chain: Vec<String> = anyhow::Error::new(failure)
                .chain()
                .map(ToString::to_string)
                .collect();
            error!(error = chain.join(": "), "rule-evaluator failed");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}

/// SIGTERM (what Kubernetes sends) or SIGINT starts a graceful shutdown; a second signal exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    let first = next_signal().await;
    info!(signal = first, "shutting down");
    shutdown.cancel();
    let second = next_signal().await;
    error!(signal = second, "second signal, exiting immediately");
    std::process::exit(130);
}

async fn next_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

//! `optout-salesforce-writer`: parses the configuration, installs logging, and runs the writer
//! until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use optout_salesforce_writer::{Config, error_chain, run};
use tokio_util::sync::CancellationToken;

/// Exit code for an unusable configuration (as clap uses for bad arguments).
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(error) = config.validate() {
        eprintln!("optout-salesforce-writer: {error}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let telemetry = optout_telemetry::init("salesforce-writer");
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    let result = run(config, shutdown).await;
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error_chain(&error), "salesforce-writer failed");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}

/// Cancels `shutdown` on the first SIGTERM (what Kubernetes sends) or SIGINT; a second signal
/// exits at once.
async fn wait_for_signal(shutdown: CancellationToken) {
    let name = signal().await;
    tracing::info!(signal = name, "received signal, draining");
    shutdown.cancel();
    let name = signal().await;
    tracing::warn!(signal = name, "second signal, exiting now");
    std::process::exit(130);
}

#[cfg(unix)]
async fn signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers there is nothing to wait for; never resolve.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}

#[cfg(not(unix))]
async fn signal() -> &'static str {
    drop(tokio::signal::ctrl_c().await);
    "ctrl-c"
}

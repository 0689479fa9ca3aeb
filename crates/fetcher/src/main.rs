//! `optout-fetcher`: parses the configuration, installs logging and signal handling, and runs the fetcher.

use std::process::ExitCode;

use clap::Parser;
use optout_fetcher::Config;
use tokio_util::sync::CancellationToken;

/// Exit code for an unusable configuration (BSD `EX_USAGE` is 64; the brief asks for 2, as clap uses).
const EXIT_BAD_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(error) => {
            // Help and version requests are not errors.
            let code = if error.use_stderr() {
                EXIT_BAD_CONFIG
            } else {
                0
            };
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    if let Err(error) = config.validate() {
        eprintln!("optout-fetcher: {}", error.chain());
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let telemetry = optout_telemetry::init("fetcher");
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    let result = optout_fetcher::run(config, shutdown).await;
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error.chain(), "fetcher failed");
            eprintln!("optout-fetcher: {}", error.chain());
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM (what Kubernetes sends) or SIGINT starts a graceful shutdown; a second signal exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    let name = wait_for_signal().await;
    tracing::info!(signal = name, "shutting down");
    shutdown.cancel();
    let name = wait_for_signal().await;
    tracing::warn!(signal = name, "second signal, exiting now");
    std::process::exit(130);
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can still be killed; never shut down on our own.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}

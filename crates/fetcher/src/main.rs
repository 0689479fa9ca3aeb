//! `optout-fetcher`: parses the configuration, installs logging and signal handling, and runs the fetcher.

use std::process::ExitCode;

use optout_fetcher::Config;
use tokio_util::sync::CancellationToken;

/// Exit code for an unusable configuration (BSD `EX_USAGE` is 64; the brief asks for 2, as clap uses).
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    optout_service::runtime::run("optout-fetcher", serve())
}

async fn serve() -> ExitCode {
    // Defaults, then `--config FILE`, then OPTOUT_* (and OPTOUT_*_FILE), then flags.
    let config: Config = match optout_service::config::load() {
        Ok(config) => config,
        Err(error) => return error.report("optout-fetcher"),
    };
    if let Err(error) = config.validate() {
        eprintln!("optout-fetcher: {}", error.chain());
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let telemetry = optout_telemetry::init("fetcher");
    let shutdown = CancellationToken::new();
    optout_service::signal::spawn_watcher(
        "optout-fetcher",
        shutdown.clone(),
        std::time::Duration::from_secs(config.shutdown_grace_secs + 5),
    );
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

//! SIGTERM (what Kubernetes sends) and SIGINT: the first starts a graceful shutdown by cancelling the root
//! token; a second signal, or the grace period running out, ends the process at once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exit code after a second signal (128 + SIGINT, as shells report an interrupted program).
pub const EXIT_SECOND_SIGNAL: i32 = 130;
/// Exit code when the drain outlived the grace period.
pub const EXIT_GRACE_EXPIRED: i32 = 1;

/// Spawns the watcher: cancels `shutdown` on the first signal, then exits the process on a second signal
/// or once `grace` has passed since the first (so a stuck drain cannot outlive the pod's
/// `terminationGracePeriodSeconds`).
pub fn spawn_watcher(service: &'static str, shutdown: CancellationToken, grace: Duration) {
    tokio::spawn(async move {
        let first = next_signal().await;
        tracing::info!(
            service,
            signal = first,
            grace_secs = grace.as_secs(),
            "shutting down"
        );
        shutdown.cancel();
        tokio::select! {
            second = next_signal() => {
                tracing::warn!(service, signal = second, "second signal, exiting now");
                eprintln!("{service}: second signal ({second}), exiting now");
                std::process::exit(EXIT_SECOND_SIGNAL);
            }
            () = tokio::time::sleep(grace) => {
                tracing::error!(service, grace_secs = grace.as_secs(), "shutdown outlived the grace period, exiting");
                eprintln!("{service}: shutdown outlived the grace period of {}s, exiting", grace.as_secs());
                std::process::exit(EXIT_GRACE_EXPIRED);
            }
        }
    });
}

/// Waits for SIGTERM or SIGINT and names it.
pub async fn next_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers the default dispositions still end the process; never shut down on our own.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}

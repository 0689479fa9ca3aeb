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

/// How long each step of closing down after the drain may take: stopping the gRPC and metrics
/// servers, closing the database pool and the RabbitMQ connection. Each is milliseconds when all
/// is well.
pub const CLOSE_STEP_LIMIT: Duration = Duration::from_secs(5);

/// Runs one step of closing down, giving up after `limit` with a warning naming `step`.
///
/// Why: a closing step can wait on something that no longer answers. A pool close waits for
/// every connection a task still holds (one that outlived the grace period), and lapin's
/// connection close waits for a close-ok that never comes if a late reply errors the connection
/// while it closes. Once the drain is over nothing is left to save, so a step that hangs must not
/// keep the service from returning.
pub async fn close_step<F: std::future::Future>(
    step: &'static str,
    limit: Duration,
    future: F,
) -> Option<F::Output> {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => Some(output),
        Err(_) => {
            tracing::warn!(
                step,
                limit_ms = limit.as_millis() as u64,
                "closing step did not finish in time, going on without it"
            );
            None
        }
    }
}

/// [`close_step`] for a spawned task (a server): the task is aborted when the step is given up,
/// so it cannot go on serving after the service has returned.
pub async fn close_task<T>(
    step: &'static str,
    limit: Duration,
    task: tokio::task::JoinHandle<T>,
) -> Option<Result<T, tokio::task::JoinError>> {
    let abort = task.abort_handle();
    let output = close_step(step, limit, task).await;
    if output.is_none() {
        abort.abort();
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closing_step_that_hangs_is_given_up_after_its_limit() {
        let limit = Duration::from_millis(50);
        let started = tokio::time::Instant::now();
        let output = close_step("hangs", limit, std::future::pending::<()>()).await;
        assert_eq!(output, None);
        assert!(started.elapsed() >= limit);
        assert_eq!(close_step("answers", limit, async { 7 }).await, Some(7));
    }

    #[tokio::test]
    async fn a_task_that_does_not_stop_in_time_is_aborted() {
        let limit = Duration::from_millis(50);
        let task = tokio::spawn(std::future::pending::<()>());
        let watch = task.abort_handle();
        assert!(close_task("hangs", limit, task).await.is_none());
        tokio::time::timeout(Duration::from_secs(5), async {
            while !watch.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the task was aborted");
        let answers = tokio::spawn(async { 7 });
        assert_eq!(
            close_task("answers", limit, answers).await.map(Result::ok),
            Some(Some(7))
        );
    }
}

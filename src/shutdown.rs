//! Shutdown signals.
//!
//! Inside the server, shutdown is a `CancellationToken` that every task
//! listens to (the accept loops, the hub, each session) and a `TaskTracker`
//! that lets `run` wait until every connection has finished its closing
//! handshake. This module only turns the process's signals into the future
//! that `run` takes, so tests can pass any future instead.

/// Completes on the first SIGINT (Ctrl-C) or SIGTERM (`docker stop`,
/// `kill`, systemd). On platforms without SIGTERM, Ctrl-C alone.
///
/// On Unix the handlers are installed by this call, not when the future is
/// first polled: `run` logs its start-up line before it polls the shutdown
/// future, so a supervisor or test that waits for that line and then sends
/// SIGTERM would otherwise, now and then, still meet the default action and
/// kill the process with no closing handshakes and a non-zero status. Call it
/// inside the Tokio runtime, before the server starts.
pub fn signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            tokio::select! {
                _ = until(interrupt, "SIGINT") => {}
                _ = until(terminate, "SIGTERM") => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Waits for one already-installed signal; if it could not be installed,
/// logs that and waits forever, so the other signal still stops the server.
#[cfg(unix)]
async fn until(installed: std::io::Result<tokio::signal::unix::Signal>, name: &str) {
    match installed {
        Ok(mut sig) => {
            sig.recv().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for {name}; only the other signal stops the server");
            std::future::pending::<()>().await;
        }
    }
}

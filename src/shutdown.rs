//! Shutdown signals.
//!
//! Inside the server, shutdown is a `CancellationToken` that every task
//! listens to (the accept loops, the hub, each session) and a `TaskTracker`
//! that lets `run` wait until every connection has finished its closing
//! handshake. This module only turns the process's signals into the future
//! that `run` takes, so tests can pass any future instead.

/// Completes on the first SIGINT (Ctrl-C) or SIGTERM (`docker stop`,
/// `kill`, systemd). On platforms without SIGTERM, Ctrl-C alone.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

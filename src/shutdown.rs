//! Shutdown signals.
//!
//! Inside the server, shutdown is a `CancellationToken` that every task
//! listens to (the accept loops, the hub, each session) and a `TaskTracker`
//! that lets `run` wait until every connection has finished its closing
//! handshake. This module only turns the process's signals into the futures
//! the binary needs, so tests can pass any future to `run` instead.
//!
//! The first SIGINT or SIGTERM starts the graceful shutdown; a second one
//! during it ends the process at once, as an operator pressing Ctrl-C again
//! (or a supervisor that lost patience) expects, whatever `shutdown_grace`
//! says.

/// The process's shutdown signals, installed once.
///
/// On Unix the handlers are installed by [`Signals::install`], not when a
/// future is first polled: `run` logs its start-up line before it polls the
/// shutdown future, so a supervisor or test that waits for that line and
/// then sends SIGTERM would otherwise, now and then, still meet the default
/// action and kill the process with no closing handshakes and a non-zero
/// status. Call it inside the Tokio runtime, before the server starts.
pub struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let installed = |kind, name: &str| match signal(kind) {
                Ok(sig) => Some(sig),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for {name}; only the other signal stops the server");
                    None
                }
            };
            Signals {
                interrupt: installed(SignalKind::interrupt(), "SIGINT"),
                terminate: installed(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        {
            Signals {}
        }
    }

    /// Completes on the next SIGINT (Ctrl-C) or SIGTERM (`docker stop`,
    /// `kill`, systemd) and names it. On platforms without SIGTERM, Ctrl-C
    /// alone.
    pub async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            async fn next(sig: &mut Option<tokio::signal::unix::Signal>) {
                match sig {
                    Some(sig) => {
                        sig.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = next(&mut self.interrupt) => "SIGINT",
                _ = next(&mut self.terminate) => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }

    /// The future `run` takes: completes on the first signal, and from then
    /// on a second signal exits the process at once with status 130.
    pub async fn shutdown(mut self) {
        let first = self.recv().await;
        tracing::info!(
            signal = first,
            "graceful shutdown; a second signal exits at once"
        );
        tokio::spawn(async move {
            let second = self.recv().await;
            eprintln!("hubbub: {second} during shutdown: exiting at once");
            std::process::exit(130);
        });
    }
}

/// Reloads the TLS certificate and key on every SIGHUP, for as long as the
/// process runs: new connections get the new pair, open ones keep theirs,
/// and a reload that fails keeps the old pair and says why.
pub fn reload_on_sighup(tls: std::sync::Arc<crate::tls::Tls>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; the certificate will not be reloaded");
                return;
            }
        };
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match tls.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: reload failed; keeping the previous certificate and key")
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = tls;
}

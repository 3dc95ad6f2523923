//! Accepting TCP connections, shared by both listeners.
//!
//! Accept errors (running out of file descriptors, a connection reset
//! before it was accepted) are usually temporary, so they are logged and
//! retried with a growing pause rather than ending the server.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts from one listener until shutdown.
pub struct Acceptor {
    listener: TcpListener,
    shutdown: CancellationToken,
    backoff: Duration,
}

impl Acceptor {
    pub fn new(listener: TcpListener, shutdown: CancellationToken) -> Self {
        Acceptor {
            listener,
            shutdown,
            backoff: FIRST_BACKOFF,
        }
    }

    /// The next connection, with `TCP_NODELAY` set (chat messages are small
    /// and latency matters more than packet count), or `None` once shutdown
    /// has begun.
    pub async fn next(&mut self) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                r = self.listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    self.backoff = FIRST_BACKOFF;
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer));
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?self.backoff, "accept failed");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(self.backoff) => {}
                    }
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

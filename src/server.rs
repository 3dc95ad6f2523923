//! Binding the listeners and running the server until shutdown.
//!
//! Binding is separate from running so that callers (tests, `main`) learn the
//! real addresses when port 0 was asked for, and so that a port already in
//! use is reported before anything starts.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::auth::{self, Auth};
use crate::clients::PerAddress;
use crate::cluster::{Cluster, ClusterError};
use crate::config::{Config, OriginPolicy};
use crate::gateway::Gateway;
use crate::http;
use crate::log::memory;
use crate::metrics::Metrics;
use crate::origin::OriginCheck;
use crate::page::{Page, PageError};
use crate::room;
use crate::rooms::Rooms;
use crate::tls::{Tls, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: io::Error,
    },
    #[error(transparent)]
    Page(#[from] PageError),
    #[error("cannot read the address of a bound listener: {0}")]
    LocalAddr(io::Error),
    /// The certificate or key cannot be used (a configuration error).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The Redis URL cannot be used (a configuration error).
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A task the server cannot work without ended on its own. The server
    /// shuts down rather than run half-dead behind a green `/healthz`.
    #[error("the {what} stopped unexpectedly ({why}); the server shut down")]
    Crashed { what: &'static str, why: String },
}

/// A server whose listeners are bound but not yet serving.
pub struct Server {
    config: Config,
    tls: Option<Arc<Tls>>,
    page: Page,
    http: TcpListener,
    ws: TcpListener,
    http_addr: SocketAddr,
    ws_addr: SocketAddr,
}

async fn bind_one(addr: SocketAddr, what: &'static str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, what, source })
}

impl Server {
    /// Binds both listeners. Port 0 picks a free port; the real ones are
    /// available from [`Server::http_addr`] and [`Server::ws_addr`].
    pub async fn bind(config: Config) -> Result<Server, Error> {
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(Tls::load(cert, key)?)),
            _ => None,
        };
        let http = bind_one(config.http_addr(), "HTTP").await?;
        let ws = bind_one(config.ws_addr(), "WebSocket").await?;
        let http_addr = http.local_addr().map_err(Error::LocalAddr)?;
        let ws_addr = ws.local_addr().map_err(Error::LocalAddr)?;
        let page = Page::load(
            config.static_dir.as_deref(),
            ws_addr.port(),
            config.public_ws_url.clone(),
            config.max_message_bytes,
            tls.is_some(),
        )?;
        Ok(Server {
            config,
            tls,
            page,
            http,
            ws,
            http_addr,
            ws_addr,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    /// The server's TLS, to reload its certificate (on SIGHUP).
    pub fn tls(&self) -> Option<Arc<Tls>> {
        self.tls.clone()
    }

    /// Serves until `shutdown` completes, then shuts down gracefully: stop
    /// accepting, deliver what the hub already accepted, close every peer
    /// with 1001 and wait up to `shutdown_grace` for the closing handshakes.
    pub async fn run(self, shutdown: impl Future) -> Result<(), Error> {
        let Server {
            config,
            tls,
            page,
            http,
            ws,
            http_addr,
            ws_addr,
        } = self;
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::default());
        let stop = CancellationToken::new();
        let force = CancellationToken::new();
        let tracker = TaskTracker::new();

        let page = Arc::new(page);
        let (crashes, mut crashed) = mpsc::unbounded_channel();
        let watch = Watch {
            stop: stop.clone(),
            crashes,
        };
        let cluster = Cluster::start(
            &config,
            metrics.clone(),
            stop.clone(),
            force.clone(),
            &tracker,
        )?;
        let rooms = Rooms::new(
            config.max_rooms,
            room::Settings {
                send_queue: config.send_queue,
                ping_interval: config.ping_interval,
                max_message_bytes: config.max_message_bytes,
                history: memory::Limits {
                    size: config.history_size,
                    bytes: config.history_bytes,
                    ttl: config.history_ttl,
                },
                history_on_join: config.history_on_join,
                stamp_from: config.auth_mode != auth::Mode::Off
                    || config.jwt_public_key.is_some()
                    || config.jwt_secret.is_some()
                    || config.api_key.is_some(),
                presence_members_max: config.presence_members_max,
            },
            metrics.clone(),
            stop.clone(),
            tracker.clone(),
            cluster,
        );

        let (http_scheme, ws_scheme) = if tls.is_some() {
            ("https", "wss")
        } else {
            ("http", "ws")
        };
        let page_url = format!("{http_scheme}://{}/", display_addr(http_addr));
        let origin = OriginCheck {
            policy: config.allowed_origins.clone(),
            http_port: http_addr.port(),
            bind_host: http_addr.ip(),
        };
        if origin.policy == OriginPolicy::SameHost && origin.trusts_host_header() {
            warn!(
                host = %http_addr.ip(),
                "allowed_origins is unset on a non-loopback bind: browsers are admitted when \
                 their Origin matches the Host they sent, which a DNS-rebinding page controls; \
                 set allowed_origins to the page's public origin"
            );
        }
        let gateway = Arc::new(Gateway {
            config: config.clone(),
            origin,
            rooms,
            auth: Auth::new(
                config.auth_mode,
                match (&config.jwt_secret, &config.jwt_public_key) {
                    (Some(secret), _) => Some(auth::Key::secret(&secret.0)),
                    (None, key) => key.clone(),
                },
                config.private_rooms.clone(),
            ),
            per_address: PerAddress::new(config.max_connections_per_ip),
            tls: tls.clone(),
            metrics: metrics.clone(),
            shutdown: stop.clone(),
            force: force.clone(),
            tracker: tracker.clone(),
            page_url: page_url.clone(),
            sessions: Default::default(),
        });
        let ws_task = watch.spawn("WebSocket listener", gateway.clone().serve(ws));

        let api = config.api_key.as_ref().map(|key| {
            crate::api::Api::new(
                key.0.clone(),
                gateway.rooms.clone(),
                config.max_message_bytes,
                config.redis_url.is_some(),
                (config.rate_limit_per_sec, config.rate_limit_burst),
            )
        });
        let app = http::router(page, metrics.clone(), api);
        let http_task = watch.spawn(
            "HTTP listener",
            http::serve(
                http,
                app,
                http::Door {
                    per_address: PerAddress::new(config.max_connections_per_ip),
                    trusted: config.trusted_proxies.clone(),
                    tls,
                },
                stop.clone(),
                force.clone(),
                tracker.clone(),
            ),
        );

        info!(
            page = %page_url,
            websocket = %format!("{ws_scheme}://{}/", display_addr(ws_addr)),
            "hubbub listening: open {page_url} in a browser",
        );

        let crash = tokio::select! {
            _ = shutdown => None,
            Some(crash) = crashed.recv() => Some(crash),
        };
        if let Some((what, why)) = &crash {
            error!(what, why, "a core task stopped unexpectedly; shutting down");
        }
        info!("shutting down");
        stop.cancel();
        let _ = ws_task.await;
        let _ = http_task.await;

        tracker.close();
        let open = metrics.open_connections();
        if tokio::time::timeout(config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                still_open = metrics.open_connections(),
                "shutdown grace period over, dropping remaining connections"
            );
            force.cancel();
            gateway.abort_sessions();
            tracker.wait().await;
        }
        info!(peers_closed = open, "stopped");
        match crash.or_else(|| crashed.try_recv().ok()) {
            Some((what, why)) => Err(Error::Crashed { what, why }),
            None => Ok(()),
        }
    }
}

/// Runs the server's core tasks (hub, listeners) and reports any that ends
/// before shutdown began, or panics at any time.
struct Watch {
    stop: CancellationToken,
    crashes: mpsc::UnboundedSender<(&'static str, String)>,
}

impl Watch {
    fn spawn<F>(&self, what: &'static str, task: F) -> JoinHandle<()>
    where
        F: Future + Send + 'static,
    {
        let (stop, crashes) = (self.stop.clone(), self.crashes.clone());
        tokio::spawn(async move {
            let why = match AssertUnwindSafe(task).catch_unwind().await {
                Ok(_) if stop.is_cancelled() => return,
                Ok(_) => "it returned before shutdown".to_string(),
                Err(panic) => panic_message(&*panic),
            };
            let _ = crashes.send((what, why));
        })
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    format!("panicked: {text}")
}

/// Binds with `config` and serves until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future) -> Result<(), Error> {
    Server::bind(config).await?.run(shutdown).await
}

/// An address as a person would type it in a browser: an unspecified bind
/// address (0.0.0.0) is shown as 127.0.0.1, which reaches it from this machine.
fn display_addr(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => "127.0.0.1".to_string(),
            SocketAddr::V6(_) => "[::1]".to_string(),
        }
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    format!("{ip}:{}", addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> (Watch, mpsc::UnboundedReceiver<(&'static str, String)>) {
        let (crashes, crashed) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        (Watch { stop, crashes }, crashed)
    }

    #[tokio::test]
    async fn a_core_task_that_panics_or_ends_early_is_reported() {
        let (watch, mut crashed) = watch();
        let _ = watch.spawn("hub", async { panic!("boom") }).await;
        let (what, why) = crashed.recv().await.expect("a report");
        assert_eq!(what, "hub");
        assert!(why.contains("boom"), "{why}");
        let _ = watch.spawn("HTTP listener", async {}).await;
        let (what, why) = crashed.recv().await.expect("a report");
        assert_eq!(what, "HTTP listener");
        assert!(why.contains("before shutdown"), "{why}");
    }

    #[tokio::test]
    async fn a_core_task_that_ends_after_shutdown_began_is_not_a_crash() {
        let (watch, mut crashed) = watch();
        watch.stop.cancel();
        let _ = watch.spawn("hub", async {}).await;
        drop(watch);
        assert!(crashed.recv().await.is_none());
    }
}

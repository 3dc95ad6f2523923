//! The HTTP listener: the chat page (at `/` for the lobby and at
//! `/rooms/<name>` for any room), `/healthz`, `/readyz` and `/metrics`.
//!
//! Routing, methods and status codes are axum's: an unknown path is 404 and a
//! known path with the wrong method is 405 with an `Allow` header. The
//! connections themselves are served by hyper directly rather than through
//! `axum::serve`, for the limits a public listener needs: a cap on open
//! connections, a deadline for request headers (so a slow client cannot hold
//! a connection open for free), and shutdown that ends with the server's.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, Instrument};

use crate::clients::{PerAddress, TrustedProxies};
use crate::listener::Acceptor;
use crate::socket::Stream;
use crate::tls::Tls;

use crate::metrics::Metrics;
use crate::page::Page;

#[derive(Clone)]
struct AppState {
    page: Arc<Page>,
    metrics: Arc<Metrics>,
}

/// The HTTP side serves a page and two tiny endpoints; this many open
/// connections is far beyond any real use and bounds what a flood can cost.
const MAX_HTTP_CONNECTIONS: usize = 1024;

/// The most a request's head (request line and headers) may take on either
/// listener; a larger one is refused with 431. A browser's handshake or page
/// request is a few kilobytes; hyper's own default would take 400 KiB.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;

/// How long a request's headers may take to arrive, and how long an idle
/// keep-alive connection waits for its next request.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the router on `listener` until `shutdown`; each connection then
/// finishes its current request. `force` drops whatever is left.
/// Who may connect to the HTTP listener, and how.
pub struct Door {
    /// Connections per client address.
    pub per_address: Arc<PerAddress>,
    /// Proxies whose connections are not counted per address.
    pub trusted: TrustedProxies,
    /// TLS, when it is on.
    pub tls: Option<Arc<Tls>>,
}

pub async fn serve(
    listener: TcpListener,
    router: Router,
    door: Door,
    shutdown: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    let mut acceptor = Acceptor::new(listener, shutdown.clone());
    while let Some((stream, peer)) = acceptor.next().await {
        // Per address, as on the WebSocket listener (a trusted proxy's
        // connections are not counted: the page and probes are cheap).
        let share = if door.trusted.contains(peer.ip()) {
            None
        } else {
            let Some(share) = door.per_address.take(peer.ip()) else {
                debug!(%peer, "too many HTTP connections from one address, dropped");
                continue;
            };
            Some(share)
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            debug!(%peer, "too many HTTP connections, dropped");
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let (shutdown, force, tls) = (shutdown.clone(), force.clone(), door.tls.clone());
        let connection = async move {
            let stream = match &tls {
                None => Stream::Plain(stream),
                Some(tls) => match tls.accept(stream, HEADER_TIMEOUT).await {
                    Ok(stream) => Stream::Tls(Box::new(stream)),
                    Err(e) => {
                        debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                },
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        r = conn.as_mut() => r,
                        _ = force.cancelled() => Ok(()),
                    }
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "HTTP connection ended with an error");
            }
            drop((permit, share));
        };
        tracker.spawn(connection.instrument(info_span!("http", peer = %peer)));
    }
}

pub fn router(page: Arc<Page>, metrics: Arc<Metrics>, api: Option<crate::api::Api>) -> Router {
    let app = Router::new()
        .route("/", get(index))
        .route("/rooms/{name}", get(room_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(AppState { page, metrics });
    match api {
        Some(api) => app.nest("/api", crate::api::router(api)),
        None => app,
    }
}

/// The page for one room: the same page, which reads the room from its own
/// URL. A name the WebSocket listener would refuse is refused here too.
async fn room_page(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    // axum has percent-decoded the segment; the check is the protocol's.
    if !crate::protocol::valid_room_name(&name) {
        return (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "a room name is 1 to 64 letters, digits, '-', '_' or '.'\n",
        )
            .into_response();
    }
    index(State(state), headers).await
}

async fn index(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let body = state.page.render(host);
    let csp = state.page.content_security_policy(host);
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn healthz() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "ok\n",
    )
}

/// Whether this node should get traffic: a node of a cluster that cannot
/// reach Redis answers 503 (its peers stay connected, but what they send
/// waits in the outbox); `/healthz` stays 200 meanwhile, as the process is
/// fine.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    use std::sync::atomic::Ordering::Relaxed;
    let cluster = &state.metrics.cluster;
    let (status, body) = if cluster.enabled.load(Relaxed) && cluster.connected.load(Relaxed) == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: Redis is unreachable\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "not found\n",
    )
}

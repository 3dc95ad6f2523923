//! The WebSocket listener: accepting connections and the opening handshake.
//!
//! The handshake is an HTTP/1.1 request, so it goes through hyper rather than
//! a hand-written parser. That also gives every refusal a real HTTP response
//! (403 for a foreign origin, 503 when full, 426 for a plain HTTP request)
//! instead of a reset, and hyper's header timeout bounds slow clients. Once
//! hyper has written the 101 response, the TCP stream is taken back out of
//! hyper (with any bytes the client sent early) and handed to tungstenite, so
//! the WebSocket traffic runs on the bare socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

use crate::auth::Auth;
use crate::clients::{PerAddress, Share};
use crate::config::Config;
use crate::listener::Acceptor;
use crate::metrics::{ConnResult, Metrics};
use crate::origin::OriginCheck;
use crate::protocol::{self, Mode};
use crate::room::Membership;
use crate::rooms::{JoinError, Rooms};
use crate::session::{self, SessionContext};
use crate::socket::{Socket, Stream};
use crate::tls::Tls;

/// Refusals of over-capacity connections are themselves bounded, so a flood
/// beyond `max_connections` costs at most this many small tasks; past it, new
/// sockets are closed without a response.
const MAX_PENDING_REJECTIONS: usize = 256;

/// Everything the accept loop and each connection share.
pub struct Gateway {
    pub config: Arc<Config>,
    pub origin: OriginCheck,
    pub rooms: Arc<Rooms>,
    /// Tokens and private rooms.
    pub auth: Auth,
    /// Connections per client address (`max_connections_per_ip`).
    pub per_address: Arc<PerAddress>,
    /// TLS, when `tls_cert` and `tls_key` are set.
    pub tls: Option<Arc<Tls>>,
    pub metrics: Arc<Metrics>,
    /// Starts the graceful path: stop accepting, stop reading, close with 1001.
    pub shutdown: CancellationToken,
    /// Fired when the grace period is over: drop handshakes still running.
    /// Sessions are aborted through their handles instead (see
    /// [`Gateway::abort_sessions`]): a token would add a waiter to every
    /// session and a shared lock to every poll of it.
    pub force: CancellationToken,
    /// Abort handles of the running sessions, by connection id.
    pub sessions: Mutex<HashMap<u64, AbortHandle>>,
    pub tracker: TaskTracker,
    /// The HTTP listener's address as a browser would type it, for the hint
    /// sent to plain HTTP requests that land on the WebSocket port.
    pub page_url: String,
}

impl Gateway {
    /// Accepts connections until shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let limit = Arc::new(Semaphore::new(self.config.max_connections));
        let rejections = Arc::new(Semaphore::new(MAX_PENDING_REJECTIONS));
        let mut next_id: u64 = 0;
        let mut acceptor = Acceptor::new(listener, self.shutdown.clone());
        while let Some((stream, peer)) = acceptor.next().await {
            next_id += 1;
            let id = next_id;
            let span = info_span!("conn", id, peer = %peer);
            // A trusted proxy's clients are counted once its request names
            // them; anyone else is counted from the moment it connects.
            let share = if self.config.trusted_proxies.contains(peer.ip()) {
                None
            } else {
                match self.per_address.take(peer.ip()) {
                    Some(share) => Some(share),
                    None => {
                        self.metrics.connection_result(ConnResult::AddressLimit);
                        self.refuse_at_once(stream, &rejections, TOO_MANY_FROM_ADDRESS, span);
                        continue;
                    }
                }
            };
            match limit.clone().try_acquire_owned() {
                Ok(permit) => {
                    let gw = self.clone();
                    self.tracker.spawn(
                        gw.connection(
                            stream,
                            id,
                            peer,
                            Held {
                                _permit: permit,
                                share,
                            },
                        )
                        .instrument(span),
                    );
                }
                Err(_) => {
                    self.metrics.connection_result(ConnResult::OverCapacity);
                    self.refuse_at_once(stream, &rejections, FULL, span);
                }
            }
        }
        debug!("websocket listener stopped accepting");
    }

    /// The handshake part of a connection. On success the peer gets a task
    /// of its own, so that nothing the handshake needed stays allocated for
    /// the life of the peer. The permit moves with it: it is held for the
    /// whole life of the connection, which is what `max_connections` counts.
    async fn connection(self: Arc<Self>, tcp: TcpStream, id: u64, peer: SocketAddr, held: Held) {
        let ws = tokio::select! {
            _ = self.force.cancelled() => return,
            ws = async {
                let stream = self.secure(tcp).await?;
                self.handshake(stream, id, peer).await
            } => ws,
        };
        let Some((ws, membership, forwarded_share)) = ws else {
            return;
        };
        let held = Held {
            share: held.share.or(forwarded_share),
            ..held
        };
        self.metrics.connection_result(ConnResult::Accepted);
        let span = tracing::Span::current();
        // Registered under the lock before the task can run to its end and
        // unregister itself, so no handle is left behind.
        let mut sessions = self.sessions();
        let task = self.tracker.spawn(
            self.clone()
                .session(ws, membership, id, held)
                .instrument(span),
        );
        sessions.insert(id, task.abort_handle());
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, AbortHandle>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends every session still open: the shutdown grace period is over.
    pub fn abort_sessions(&self) {
        for (_, task) in self.sessions().drain() {
            task.abort();
        }
    }

    /// A connected peer, until it is gone or the shutdown grace runs out.
    ///
    /// A plain function returning an `async move` block rather than an
    /// `async fn`: the block uses the WebSocket where it was captured, while
    /// an `async fn` keeps its arguments and their working copies apart, and
    /// this future is what every idle peer's task is made of.
    #[allow(clippy::manual_async_fn)]
    fn session(
        self: Arc<Self>,
        mut ws: WebSocketStream<Socket>,
        membership: Membership,
        id: u64,
        held: Held,
    ) -> impl std::future::Future<Output = ()> {
        let registered = Registered {
            gateway: self,
            id,
            _held: held,
        };
        let mut joined = Some(membership);
        async move {
            let gateway = &registered.gateway;
            let ctx = SessionContext {
                id,
                config: &gateway.config,
                metrics: &gateway.metrics,
                shutdown: &gateway.shutdown,
            };
            session::run(&mut ws, ctx, &mut joined).await;
        }
    }

    /// Runs the HTTP part of the connection through hyper. Returns the
    /// WebSocket and its place in the room it asked for once the 101
    /// response has been written, or `None` if the request was refused or
    /// the client gave up.
    /// The TLS handshake when TLS is on (within `handshake_timeout`; the
    /// WebSocket handshake after it has what is left); `None` if it failed.
    async fn secure(&self, tcp: TcpStream) -> Option<Stream> {
        let Some(tls) = &self.tls else {
            return Some(Stream::Plain(tcp));
        };
        match tls.accept(tcp, self.config.handshake_timeout).await {
            Ok(stream) => Some(Stream::Tls(Box::new(stream))),
            Err(e) => {
                self.metrics.connection_result(ConnResult::BadRequest);
                debug!(error = %e, "TLS handshake failed");
                None
            }
        }
    }

    async fn handshake(
        &self,
        stream: Stream,
        id: u64,
        peer: SocketAddr,
    ) -> Option<(WebSocketStream<Socket>, Membership, Option<Share>)> {
        let (upgrade_tx, mut upgrade_rx) = mpsc::channel(1);
        let service = hyper::service::service_fn(|req: Request<Incoming>| {
            let response = self.answer_handshake(req, &upgrade_tx, id, peer);
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.handshake_timeout)
            .max_buf_size(crate::http::MAX_HEAD_BYTES)
            // Not keep_alive(false): hyper would then add `close` to the 101
            // response's Connection header, which clients reject. Refusals
            // carry `Connection: close` themselves.
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        match tokio::time::timeout(self.config.handshake_timeout, conn).await {
            Err(_) => {
                self.metrics.connection_result(ConnResult::HandshakeTimeout);
                debug!("handshake not finished in time, dropped");
                return None;
            }
            Ok(Err(e)) if e.is_timeout() => {
                self.metrics.connection_result(ConnResult::HandshakeTimeout);
                debug!("handshake not finished in time, dropped");
                return None;
            }
            Ok(Err(e)) => {
                self.metrics.connection_result(ConnResult::BadRequest);
                debug!(error = %e, "handshake failed");
                return None;
            }
            Ok(Ok(())) => {}
        }
        // No upgrade queued means the request was answered with an error.
        let (on_upgrade, membership, share) = upgrade_rx.try_recv().ok()?;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                debug!(error = %e, "upgrade failed");
                return None;
            }
        };
        let parts = match upgraded.downcast::<TokioIo<Stream>>() {
            Ok(parts) => parts,
            Err(_) => {
                warn!("upgraded connection was not a TCP stream");
                return None;
            }
        };
        let config = ws_config(&self.config);
        let socket = Socket::new(parts.io.into_inner(), &parts.read_buf);
        let ws = WebSocketStream::from_raw_socket(socket, Role::Server, Some(config)).await;
        Some((ws, membership, share))
    }

    /// Decides the response to a handshake request. On success the peer has
    /// joined its room, and the pending upgrade and the membership are passed
    /// out through `upgrade_tx`.
    fn answer_handshake(
        &self,
        mut req: Request<Incoming>,
        upgrade_tx: &mpsc::Sender<Upgrade>,
        id: u64,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let headers = req.headers();
        let has_token = |name: header::HeaderName, token: &str| {
            headers.get_all(name).iter().any(|v| {
                v.to_str()
                    .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                    .unwrap_or(false)
            })
        };
        let is_upgrade =
            has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket");
        let refuse = |status, body: &str| {
            self.metrics.connection_result(ConnResult::BadRequest);
            debug!(%status, reason = body.trim_end(), "handshake refused");
            text(status, body.to_string())
        };
        if !is_upgrade {
            self.metrics.connection_result(ConnResult::BadRequest);
            debug!(method = %req.method(), path = %req.uri().path(), "plain HTTP request on the WebSocket port");
            let mut r = text(
                StatusCode::UPGRADE_REQUIRED,
                format!(
                    "This is hubbub's WebSocket port: connect with a WebSocket client.\n\
                     The chat page is at {}\n",
                    self.page_url
                ),
            );
            r.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            return r;
        }
        if req.method() != Method::GET {
            let mut r = refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket handshake is a GET request\n",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            return r;
        }
        if req.version() != Version::HTTP_11 {
            return refuse(
                StatusCode::BAD_REQUEST,
                "a WebSocket handshake needs HTTP/1.1\n",
            );
        }
        // A body would reach the WebSocket as if it were frames (chunked) or
        // be dropped unread (Content-Length); neither is a handshake.
        let has_body = headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0");
        if has_body {
            return refuse(
                StatusCode::BAD_REQUEST,
                "a WebSocket handshake has no body\n",
            );
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
            != Some(b"13")
        {
            let mut r = refuse(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported Sec-WebSocket-Version; this server speaks version 13\n",
            );
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return r;
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "missing Sec-WebSocket-Key header\n",
            );
        };
        if !valid_key(key.as_bytes()) {
            return refuse(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Key must be 16 bytes in base64\n",
            );
        }
        // An Origin that is not text (non-ASCII bytes) is refused, not
        // treated as absent: absent means "not a browser" and is admitted.
        let origin = match headers.get(header::ORIGIN).map(|v| v.to_str()) {
            None => None,
            Some(Ok(origin)) => Some(origin),
            Some(Err(_)) => return self.forbidden(None, peer),
        };
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        if !self.origin.allows(origin, host) {
            return self.forbidden(origin, peer);
        }
        let target = match protocol::target(req.uri().path(), req.uri().query()) {
            Ok(target) => target,
            Err(refusal) => {
                let status =
                    StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST);
                return refuse(status, &format!("{}\n", refusal.reason));
            }
        };
        let mode = if protocol::asks_for_v1(
            headers
                .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .map(|v| v.as_bytes()),
        ) {
            Mode::V1
        } else {
            Mode::Raw
        };
        let accept = derive_accept_key(key.as_bytes());
        // Through a trusted proxy: count the client its headers name.
        let share = if self.config.trusted_proxies.contains(peer.ip()) {
            let Some(client) = self.config.trusted_proxies.client(peer.ip(), headers) else {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "a request through a proxy must name its client in X-Forwarded-For or Forwarded\n",
                );
            };
            match self.per_address.take(client) {
                Some(share) => Some(share),
                None => {
                    self.metrics.connection_result(ConnResult::AddressLimit);
                    warn!(%client, "refused: max_connections_per_ip reached");
                    return text(
                        StatusCode::TOO_MANY_REQUESTS,
                        TOO_MANY_FROM_ADDRESS.1.into(),
                    );
                }
            }
        } else {
            None
        };
        let verified = match self
            .auth
            .admit(token(req.uri().query(), headers).as_deref(), &target.room)
        {
            Ok(verified) => verified,
            Err(refusal) => {
                self.metrics.connection_result(ConnResult::Unauthorized);
                debug!(room = %target.room, reason = refusal.reason, "refused: token");
                let status =
                    StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::UNAUTHORIZED);
                return refuse(status, &format!("{}\n", refusal.reason));
            }
        };
        let identity = verified.as_ref().map(|v| v.identity.clone());
        let membership = match self
            .rooms
            .join(&target.room, id, mode, target.resume, identity)
        {
            Ok(mut membership) => {
                membership.expires = verified.map(|v| v.expires);
                membership
            }
            Err(JoinError::TooManyRooms) => {
                self.metrics.connection_result(ConnResult::RoomLimit);
                warn!(room = %target.room, "refused: max_rooms reached");
                let mut r = text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many rooms; try again later or join an existing room\n".into(),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                return r;
            }
            Err(JoinError::Closed) => {
                self.metrics.connection_result(ConnResult::OverCapacity);
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server shutting down\n".into(),
                );
            }
        };
        debug!(room = %target.room, ?mode, "joining");
        let _ = upgrade_tx.try_send((hyper::upgrade::on(&mut req), membership, share));
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        if mode == Mode::V1 {
            h.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol::SUBPROTOCOL),
            );
        }
        r
    }

    fn forbidden(&self, origin: Option<&str>, peer: SocketAddr) -> Response<Full<Bytes>> {
        self.metrics.connection_result(ConnResult::ForbiddenOrigin);
        warn!(origin = origin.unwrap_or("(not text)"), %peer, "refused WebSocket from a foreign origin");
        text(
            StatusCode::FORBIDDEN,
            "this origin may not connect; see allowed_origins\n".into(),
        )
    }

    /// Answers a connection that may not go on with `refusal` at once,
    /// in a small task of its own. Refusals are themselves bounded (see
    /// [`MAX_PENDING_REJECTIONS`]); past that, the socket is just closed.
    fn refuse_at_once(
        self: &Arc<Self>,
        stream: TcpStream,
        rejections: &Arc<Semaphore>,
        refusal: Refusal,
        span: tracing::Span,
    ) {
        // Over TLS a plain-text answer would be garbage to the client, and a
        // TLS handshake per refused connection is what a flood would want:
        // the connection is just closed.
        if self.tls.is_some() {
            return;
        }
        let Ok(permit) = rejections.clone().try_acquire_owned() else {
            return;
        };
        let gw = self.clone();
        self.tracker.spawn(
            async move {
                gw.refuse(stream, refusal).await;
                drop(permit);
            }
            .instrument(span),
        );
    }

    async fn refuse(&self, stream: TcpStream, (status, body, retry_after): Refusal) {
        warn!(%status, "refused: {}", body.trim_end());
        let service = hyper::service::service_fn(|_req: Request<Incoming>| async move {
            let mut r = text(status, body.into());
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(retry_after));
            Ok::<_, std::convert::Infallible>(r)
        });
        let limit = self.config.handshake_timeout.min(Duration::from_secs(5));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limit)
            .max_buf_size(crate::http::MAX_HEAD_BYTES)
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), service);
        let _ = tokio::time::timeout(limit, conn).await;
    }
}

/// An immediate refusal: status, body, `Retry-After` seconds.
type Refusal = (StatusCode, &'static str, &'static str);

const FULL: Refusal = (
    StatusCode::SERVICE_UNAVAILABLE,
    "too many connections; try again shortly\n",
    "1",
);

const TOO_MANY_FROM_ADDRESS: Refusal = (
    StatusCode::TOO_MANY_REQUESTS,
    "too many connections from your address; close some and try again\n",
    "5",
);

/// What a connection holds while it lives: its place under
/// `max_connections` and its address's share under `max_connections_per_ip`.
struct Held {
    _permit: OwnedSemaphorePermit,
    share: Option<Share>,
}

/// What a successful handshake hands on: the pending upgrade, the peer's
/// membership of its room, and (through a trusted proxy) its client's share.
type Upgrade = (hyper::upgrade::OnUpgrade, Membership, Option<Share>);

/// A running session's entry in the gateway: its abort handle and its
/// `max_connections` permit. Dropped however the session ends, a panic or
/// an abort included, so neither is ever left behind.
struct Registered {
    gateway: Arc<Gateway>,
    id: u64,
    _held: Held,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.gateway.sessions().remove(&self.id);
    }
}

/// Buffers sized for chat. tungstenite's default read buffer is 128 KiB per
/// peer, allocated up front and zero-filled before every read. With a read
/// buffer size of 0 it instead reserves exactly what the frame being read
/// needs (the header, then the payload), so an idle peer holds no read
/// buffer at all; it then asks for 14 bytes per read, which [`Socket`]
/// serves from one large read of the kernel's. Incoming limits come
/// straight from `max_message_bytes`.
pub fn ws_config(config: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(0)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(64 * 1024 + config.max_message_bytes * 2)
        .max_message_size(Some(config.max_message_bytes))
        .max_frame_size(Some(config.max_message_bytes))
}

/// RFC 6455: the key is a random 16-byte value in base64 (24 characters).
fn valid_key(key: &[u8]) -> bool {
    use base64::Engine;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // One handshake per connection: a refused client starts over.
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The connection token: `?token=` (browsers cannot set headers on a
/// WebSocket) or `Authorization: Bearer`.
fn token(query: Option<&str>, headers: &hyper::HeaderMap) -> Option<String> {
    let from_query = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    from_query.or_else(|| {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string())
    })
}

//! One connected peer, from the finished handshake to the close frame.
//!
//! A session is a single loop over everything that can happen to a peer: a
//! frame arrives, the hub queues a message, the hub kicks the peer, the hub's
//! heartbeat asks for a ping (and an idle check), or the hub stops (the
//! server is shutting down).
//! Whichever comes first is handled, and the outcome decides the close code.
//!
//! One loop in one task, with an unsplit WebSocket and no timer of its own,
//! is deliberate: an idle peer should cost as little memory as possible, and
//! every separate future, lock or timer here would be paid for by every one
//! of tens of thousands of mostly idle peers. The ping schedule is the hub's
//! (one timer for all peers); a session only remembers when it last heard
//! from its peer.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::Config;
use crate::hub::{HubClosed, HubHandle, Kick, Membership, Outgoing, PeerId};
use crate::metrics::Metrics;
use crate::queue::{self, Recv};

type Ws = WebSocketStream<TcpStream>;

/// Most queued messages written before one flush; bounds the time a single
/// write takes before the loop looks at reads, timers and kicks again.
const MAX_BATCH: usize = 64;

/// How long a peer closed for its own fault (oversize, slow, idle...) gets to
/// receive the close frame before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a session borrows from the gateway.
pub struct SessionContext<'a> {
    pub id: PeerId,
    pub config: &'a Config,
    pub hub: &'a HubHandle,
    pub metrics: &'a Metrics,
    pub shutdown: &'a CancellationToken,
}

/// How a session ended: with a close frame of ours, or without one because
/// the peer closed or the connection broke.
enum End {
    Close(CloseFrame),
    Gone,
}

/// Runs the session until the peer is gone. Never returns an error: every
/// way a peer can end is an ordinary outcome, logged here.
pub async fn run(ws: &mut Ws, ctx: SessionContext<'_>) {
    // The steps before and after the loop live in their own boxed futures:
    // a task is as large as its largest state, and only the loop, which is
    // where an idle peer spends its life, should set that size.
    let Some(membership) = Box::pin(start(ws, &ctx)).await else {
        return;
    };
    let Membership { outbound } = membership;
    let end = Serve {
        ws,
        outbound,
        ctx: &ctx,
        last_heard: Instant::now(),
        stopping: false,
        step: Step::Idle,
    }
    .await;
    Box::pin(finish(ws, end, &ctx)).await;
}

/// Registers with the hub, or closes with 1001 if the hub is already gone.
async fn start(ws: &mut Ws, ctx: &SessionContext<'_>) -> Option<Membership> {
    let Ok(membership) = ctx.hub.join(ctx.id).await else {
        let _ = ws.close(Some(going_away())).await;
        return None;
    };
    ctx.metrics.peer_opened();
    info!("peer connected");
    Some(membership)
}

/// Leaves the hub and ends the connection as `end` says.
async fn finish(ws: &mut Ws, end: End, ctx: &SessionContext<'_>) {
    ctx.hub.leave(ctx.id).await;
    ctx.metrics.peer_closed();
    match end {
        End::Close(frame) => {
            info!(code = u16::from(frame.code), reason = %frame.reason, "closing peer");
            let wait = if ctx.shutdown.is_cancelled() {
                ctx.config.shutdown_grace
            } else {
                CLOSE_TIMEOUT
            };
            let _ = tokio::time::timeout(wait, close_handshake(ws, frame)).await;
        }
        End::Gone => {
            // The peer closed or vanished; flush any close reply tungstenite
            // queued for it, but never wait long on a dead socket.
            info!("peer disconnected");
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.flush()).await;
        }
    }
}

/// The session loop: everything that can happen to a connected peer.
///
/// Written out by hand rather than as an `async fn` with `select!`: this is
/// the state every idle peer lives in, and a plain struct holds exactly what
/// it needs (when the peer was last heard from and what it is in the middle
/// of) where the generated state machine kept room for every branch's future
/// at once.
struct Serve<'a, 'c> {
    ws: &'a mut Ws,
    outbound: queue::Receiver,
    ctx: &'a SessionContext<'c>,
    /// Any frame from the peer, pongs included, moves this on; the hub's
    /// heartbeat compares it with `idle_timeout`.
    last_heard: Instant,
    /// Set once the hub stops taking messages (shutdown has begun): stop
    /// reading and only drain what it already queued; it closes the queue
    /// when it is done. Sessions do not watch the shutdown token themselves:
    /// a waiter on it per peer would put one shared lock on every delivery.
    stopping: bool,
    step: Step<'a>,
}

/// What the session is in the middle of.
enum Step<'a> {
    /// Waiting for the next event.
    Idle,
    /// Writing what is queued (starting with `next`), then one flush.
    Writing {
        next: Option<Outgoing>,
        count: u64,
        bytes: u64,
    },
    /// Writing a ping, then a flush.
    Pinging { sent: bool },
    /// Handing a received message to the hub (boxed: it is short-lived and
    /// would otherwise enlarge every idle peer).
    Broadcasting(Pin<Box<dyn Future<Output = Result<(), HubClosed>> + Send + 'a>>),
}

impl<'a, 'c> Serve<'a, 'c> {
    /// Takes one message off the socket, if there is one. `Some` ends the
    /// session.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Option<End>> {
        let frame = ready!(Pin::new(&mut *self.ws).poll_next(cx));
        self.last_heard = Instant::now();
        let message = match frame {
            None => return Poll::Ready(Some(End::Gone)),
            Some(Err(e)) => return Poll::Ready(Some(classify(e))),
            Some(Ok(m)) => m,
        };
        match message {
            Message::Text(_) => {}
            Message::Binary(_) if self.ctx.config.allow_binary => {}
            Message::Binary(_) => {
                return Poll::Ready(Some(End::Close(frame_of(
                    CloseCode::Unsupported,
                    "binary messages are not accepted",
                ))))
            }
            // Any frame at all, pongs included, is a sign of life.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Poll::Ready(None),
            Message::Close(_) => return Poll::Ready(Some(End::Gone)),
        }
        self.ctx.metrics.message_received();
        let hub: &'a HubHandle = self.ctx.hub;
        self.step = Step::Broadcasting(Box::pin(hub.broadcast(message)));
        Poll::Ready(None)
    }

    /// Writes the current batch; `Ready(Ok)` once it is flushed.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let Step::Writing { next, count, bytes } = &mut self.step else {
            return Poll::Ready(Ok(()));
        };
        // A message is taken off the queue only once the socket can take it.
        while let Some(message) = next.take().or_else(|| {
            (*count < MAX_BATCH as u64)
                .then(|| self.outbound.try_recv())
                .flatten()
        }) {
            match Pin::new(&mut *self.ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    *next = Some(message);
                    return Poll::Pending;
                }
            }
            *count += 1;
            *bytes += message.len() as u64;
            Pin::new(&mut *self.ws).start_send(Message::clone(&message))?;
        }
        ready!(Pin::new(&mut *self.ws).poll_flush(cx))?;
        self.ctx.metrics.delivered(*count, *bytes);
        Poll::Ready(Ok(()))
    }

    fn poll_ping(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let Step::Pinging { sent } = &mut self.step else {
            return Poll::Ready(Ok(()));
        };
        if !*sent {
            ready!(Pin::new(&mut *self.ws).poll_ready(cx))?;
            Pin::new(&mut *self.ws).start_send(Message::Ping(Bytes::new()))?;
            *sent = true;
        }
        Pin::new(&mut *self.ws).poll_flush(cx)
    }

    /// The hub's heartbeat: close a peer not heard from for `idle_timeout`
    /// (so it goes at the first beat after that), or ping it.
    fn on_heartbeat(&mut self) -> Option<End> {
        if !self.stopping && self.last_heard.elapsed() >= self.ctx.config.idle_timeout {
            return Some(End::Close(frame_of(CloseCode::Away, "idle timeout")));
        }
        self.step = Step::Pinging { sent: false };
        None
    }
}

impl Future for Serve<'_, '_> {
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let this = self.get_mut();
        loop {
            match &mut this.step {
                Step::Writing { .. } | Step::Pinging { .. } => {
                    // A write can stall on a peer that stopped reading; the
                    // hub's kick must still get through.
                    if let Poll::Ready(kick) = this.outbound.poll_kicked(cx) {
                        return Poll::Ready(End::Close(kick_frame(kick)));
                    }
                    let written = if matches!(this.step, Step::Writing { .. }) {
                        ready!(this.poll_write(cx))
                    } else {
                        ready!(this.poll_ping(cx))
                    };
                    if written.is_err() {
                        return Poll::Ready(End::Gone);
                    }
                    this.step = Step::Idle;
                }
                Step::Broadcasting(send) => {
                    if ready!(send.as_mut().poll(cx)).is_err() {
                        // The hub stopped taking messages: shutdown has begun.
                        this.stopping = true;
                    }
                    this.step = Step::Idle;
                }
                Step::Idle => {
                    // The queue first: delivering to this peer frees hub
                    // capacity; reading from it adds work.
                    match this.outbound.poll_recv(cx) {
                        Poll::Ready(Recv::Message(m)) => {
                            this.step = Step::Writing {
                                next: Some(m),
                                count: 0,
                                bytes: 0,
                            };
                            continue;
                        }
                        Poll::Ready(Recv::Ping) => {
                            if let Some(end) = this.on_heartbeat() {
                                return Poll::Ready(end);
                            }
                            continue;
                        }
                        Poll::Ready(Recv::Closed) => return Poll::Ready(End::Close(going_away())),
                        Poll::Ready(Recv::Kicked(kick)) => {
                            return Poll::Ready(End::Close(kick_frame(kick)))
                        }
                        Poll::Pending => {}
                    }
                    if !this.stopping {
                        if let Poll::Ready(end) = this.poll_read(cx) {
                            match end {
                                Some(end) => return Poll::Ready(end),
                                None => continue,
                            }
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Sends our close frame, then waits for the peer's reply so the closing
/// handshake completes and the peer sees a clean close, not a reset.
async fn close_handshake(ws: &mut Ws, frame: CloseFrame) {
    if ws.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_close() {
            break;
        }
    }
}

/// Maps a read error to the close code the peer has earned.
fn classify(e: WsError) -> End {
    match e {
        WsError::Capacity(_) => End::Close(frame_of(CloseCode::Size, "message too big")),
        WsError::Utf8(_) => End::Close(frame_of(
            CloseCode::Invalid,
            "text message is not valid UTF-8",
        )),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        WsError::Protocol(p) => {
            debug!(error = %p, "protocol error");
            End::Close(frame_of(CloseCode::Protocol, "protocol error"))
        }
        WsError::AttackAttempt => End::Close(frame_of(CloseCode::Policy, "attack attempt")),
        other => {
            debug!(error = %other, "connection error");
            End::Gone
        }
    }
}

fn frame_of(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

fn going_away() -> CloseFrame {
    frame_of(CloseCode::Away, "server shutting down")
}

fn kick_frame(kick: Kick) -> CloseFrame {
    match kick {
        Kick::SlowConsumer => frame_of(
            CloseCode::Policy,
            "slow consumer: send queue full, messages were not being read",
        ),
    }
}

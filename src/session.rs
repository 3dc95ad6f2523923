//! One connected peer, from the finished handshake to the close frame.
//!
//! A session is a single loop over everything that can happen to a peer: a
//! frame arrives, the hub queues a message, the hub kicks the peer, the
//! ping/idle timer fires, or the server starts shutting down. Whichever comes
//! first is handled, and the outcome decides the close code.
//!
//! One loop in one task, with one timer and an unsplit WebSocket, is
//! deliberate: an idle peer should cost as little memory as possible, and
//! every separate future, lock or timer here would be paid for by every one
//! of tens of thousands of mostly idle peers.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use futures_util::{Sink, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::Config;
use crate::hub::{HubHandle, Kick, Membership, Outgoing, PeerId};
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
    let end = serve(ws, membership, &ctx).await;
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

/// The session loop proper.
async fn serve(ws: &mut Ws, membership: Membership, ctx: &SessionContext<'_>) -> End {
    let Membership { outbound } = membership;
    let config = ctx.config;
    // Once the hub stops taking messages (shutdown has begun) we stop
    // reading and only drain what it already queued for us; it closes the
    // queue when it is done. Sessions do not watch the shutdown token
    // themselves: registering a waiter on it every time round the loop would
    // take one lock shared by every peer, once per message delivered.
    let mut stopping = false;

    // One timer serves both the ping schedule and the idle deadline.
    let mut last_heard = Instant::now();
    let mut next_ping = last_heard + config.ping_interval;
    let timer = sleep_until(next_ping.min(last_heard + config.idle_timeout));
    tokio::pin!(timer);

    loop {
        tokio::select! {
            biased;
            next = outbound.recv() => {
                let message = match next {
                    Recv::Message(m) => m,
                    Recv::Closed => return End::Close(going_away()),
                    Recv::Kicked(kick) => return End::Close(kick_frame(kick)),
                };
                // A write can stall on a peer that stopped reading; the
                // hub's kick must still get through.
                let written = tokio::select! {
                    r = write_batch(ws, &outbound, message, ctx.metrics) => r,
                    kick = outbound.kicked() => return End::Close(kick_frame(kick)),
                };
                if written.is_err() {
                    return End::Gone;
                }
            }
            frame = ws.next(), if !stopping => {
                last_heard = Instant::now();
                let message = match frame {
                    None => return End::Gone,
                    Some(Err(e)) => return classify(e),
                    Some(Ok(m)) => m,
                };
                match message {
                    Message::Text(_) => {}
                    Message::Binary(_) if config.allow_binary => {}
                    Message::Binary(_) => {
                        return End::Close(frame_of(
                            CloseCode::Unsupported,
                            "binary messages are not accepted",
                        ))
                    }
                    // Any frame at all, pongs included, is a sign of life.
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                    Message::Close(_) => return End::Gone,
                }
                ctx.metrics.message_received();
                // Boxed, like the ping below: only the wait for the next
                // event should count towards every idle peer's task size.
                if Box::pin(ctx.hub.broadcast(message)).await.is_err() {
                    // The hub stopped taking messages: shutdown has begun.
                    stopping = true;
                }
            }
            // The timer is re-aimed only when it fires: hearing from the
            // peer moves the idle deadline later, never earlier, so a timer
            // that fires early just finds nothing due yet.
            _ = &mut timer => {
                let now = Instant::now();
                if !stopping && now >= last_heard + config.idle_timeout {
                    return End::Close(frame_of(CloseCode::Away, "idle timeout"));
                }
                if now >= next_ping {
                    next_ping = now + config.ping_interval;
                    // Like any write, a ping can stall on a full socket.
                    let sent = tokio::select! {
                        r = Box::pin(ws.send(Message::Ping(Bytes::new()))) => r,
                        kick = outbound.kicked() => return End::Close(kick_frame(kick)),
                    };
                    if sent.is_err() {
                        return End::Gone;
                    }
                }
                timer.as_mut().reset(next_ping.min(last_heard + config.idle_timeout));
            }
        }
    }
}

/// Writes `first` and whatever else is already queued, then flushes once.
///
/// Written against the `Sink` poll methods rather than `feed().await`: a
/// message is taken off the queue only once the socket can take it, so the
/// state kept while a slow socket blocks is one pointer, not a whole
/// `Message` per pending send.
async fn write_batch(
    ws: &mut Ws,
    outbound: &queue::Receiver,
    first: Outgoing,
    metrics: &Metrics,
) -> Result<(), WsError> {
    let mut next = Some(first);
    let (mut count, mut bytes) = (0u64, 0u64);
    poll_fn(|cx| {
        while let Some(message) = next.take().or_else(|| {
            (count < MAX_BATCH as u64)
                .then(|| outbound.try_recv())
                .flatten()
        }) {
            match Pin::new(&mut *ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    next = Some(message);
                    return Poll::Pending;
                }
            }
            count += 1;
            bytes += message.len() as u64;
            Pin::new(&mut *ws).start_send(Message::clone(&message))?;
        }
        Pin::new(&mut *ws).poll_flush(cx)
    })
    .await?;
    metrics.delivered(count, bytes);
    Ok(())
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

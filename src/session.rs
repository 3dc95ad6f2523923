//! One connected peer, from the finished handshake to the close frame.
//!
//! A session reads and writes concurrently inside a single task: the reader
//! hands the peer's messages to the hub and watches for idleness; the writer
//! drains the peer's bounded queue, batching whatever is waiting into one
//! flush, and sends the periodic pings. Whichever ends first decides the
//! close code. Keeping both halves in one task (rather than spawning two)
//! halves the per-peer task overhead, which matters at tens of thousands of
//! mostly idle peers.

use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{interval_at, Instant};
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::Config;
use crate::hub::{HubHandle, Kick, Membership, PeerId};
use crate::metrics::Metrics;

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;
type Stream = SplitStream<WebSocketStream<TcpStream>>;

/// Most queued messages written before one flush; bounds the time a single
/// writer spends before it checks for pings and kicks again.
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

/// Why the reading half stopped.
#[derive(Debug)]
enum ReadEnd {
    /// The server is shutting down: stop taking messages, keep writing.
    Shutdown,
    /// The peer closed, or the connection broke.
    Gone,
    /// Nothing arrived for `idle_timeout`.
    Idle,
    /// The peer broke a rule; close with this code.
    Violation(CloseCode, &'static str),
}

/// Why the writing half stopped.
#[derive(Debug)]
enum WriteEnd {
    /// The hub closed this peer's queue: it is shutting down.
    HubDone,
    Kicked(Kick),
    /// The socket failed.
    Failed,
}

/// Runs the session until the peer is gone. Never returns an error: every
/// way a peer can end is an ordinary outcome, logged here.
pub async fn run(ws: WebSocketStream<TcpStream>, ctx: SessionContext<'_>) {
    let Ok(Membership { outbound, kicked }) = ctx.hub.join(ctx.id).await else {
        // The hub is already gone: the server is shutting down.
        let mut ws = ws;
        let _ = ws.close(Some(going_away())).await;
        return;
    };
    ctx.metrics.peer_opened();
    info!("peer connected");
    let (mut sink, mut stream) = ws.split();
    let mut outbound = outbound;

    let close = {
        let reader = read_loop(&mut stream, &ctx);
        let writer = write_loop(&mut sink, &mut outbound, kicked, &ctx);
        tokio::pin!(reader, writer);
        tokio::select! {
            end = &mut reader => match end {
                // Finish delivering what the hub already accepted; the hub
                // closes the queue when it has nothing more for us.
                ReadEnd::Shutdown => match writer.await {
                    WriteEnd::Failed => None,
                    WriteEnd::Kicked(kick) => Some(kick_frame(kick)),
                    WriteEnd::HubDone => Some(going_away()),
                },
                ReadEnd::Gone => None,
                ReadEnd::Idle => Some(frame(CloseCode::Away, "idle timeout")),
                ReadEnd::Violation(code, why) => Some(frame(code, why)),
            },
            end = &mut writer => match end {
                WriteEnd::Failed => None,
                WriteEnd::Kicked(kick) => Some(kick_frame(kick)),
                WriteEnd::HubDone => Some(going_away()),
            },
        }
    };
    ctx.hub.leave(ctx.id).await;
    ctx.metrics.peer_closed();

    match close {
        Some(frame) => {
            info!(code = u16::from(frame.code), reason = %frame.reason, "closing peer");
            let wait = if ctx.shutdown.is_cancelled() {
                ctx.config.shutdown_grace
            } else {
                CLOSE_TIMEOUT
            };
            let _ =
                tokio::time::timeout(wait, close_handshake(&mut sink, &mut stream, frame)).await;
        }
        None => {
            // The peer closed or vanished; flush any close reply tungstenite
            // queued for it, but never wait long on a dead socket.
            info!("peer disconnected");
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.flush()).await;
        }
    }
}

/// Sends our close frame, then waits for the peer's reply so the closing
/// handshake completes and the peer sees a clean close, not a reset.
async fn close_handshake(sink: &mut Sink, stream: &mut Stream, frame: CloseFrame) {
    if sink.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    while let Some(Ok(msg)) = stream.next().await {
        if msg.is_close() {
            break;
        }
    }
}

async fn read_loop(stream: &mut Stream, ctx: &SessionContext<'_>) -> ReadEnd {
    let idle = ctx.config.idle_timeout;
    loop {
        let next = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => return ReadEnd::Shutdown,
            next = tokio::time::timeout(idle, stream.next()) => next,
        };
        let message = match next {
            Err(_) => return ReadEnd::Idle,
            Ok(None) => return ReadEnd::Gone,
            Ok(Some(Err(e))) => return classify(e),
            Ok(Some(Ok(m))) => m,
        };
        match message {
            Message::Text(_) => {}
            Message::Binary(_) if ctx.config.allow_binary => {}
            Message::Binary(_) => {
                return ReadEnd::Violation(
                    CloseCode::Unsupported,
                    "binary messages are not accepted",
                )
            }
            // Any frame at all, pongs included, counts as a sign of life.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            Message::Close(_) => return ReadEnd::Gone,
        }
        ctx.metrics.message_received();
        if ctx.hub.broadcast(message).await.is_err() {
            return ReadEnd::Shutdown;
        }
    }
}

/// Maps a read error to the close code the peer has earned.
fn classify(e: WsError) -> ReadEnd {
    match e {
        WsError::Capacity(_) => ReadEnd::Violation(CloseCode::Size, "message too big"),
        WsError::Utf8(_) => {
            ReadEnd::Violation(CloseCode::Invalid, "text message is not valid UTF-8")
        }
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => ReadEnd::Gone,
        WsError::Protocol(p) => {
            debug!(error = %p, "protocol error");
            ReadEnd::Violation(CloseCode::Protocol, "protocol error")
        }
        WsError::AttackAttempt => ReadEnd::Violation(CloseCode::Policy, "attack attempt"),
        other => {
            debug!(error = %other, "connection error");
            ReadEnd::Gone
        }
    }
}

async fn write_loop(
    sink: &mut Sink,
    outbound: &mut mpsc::Receiver<Message>,
    kicked: oneshot::Receiver<Kick>,
    ctx: &SessionContext<'_>,
) -> WriteEnd {
    // A kick must be noticed even while a write is stuck on a full socket,
    // so it races every write. A closed kick channel means the hub stopped;
    // the closed queue reports that, so it never ends the race by itself.
    let kicked = async move {
        match kicked.await {
            Ok(kick) => kick,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::pin!(kicked);
    let period = ctx.config.ping_interval;
    let mut ping = interval_at(Instant::now() + period, period);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let step = async {
            tokio::select! {
                m = outbound.recv() => match m {
                    None => Err(WriteEnd::HubDone),
                    Some(m) => write_batch(sink, outbound, m, ctx.metrics).await,
                },
                _ = ping.tick() => sink
                    .send(Message::Ping(Bytes::new()))
                    .await
                    .map_err(|_| WriteEnd::Failed),
            }
        };
        tokio::select! {
            biased;
            kick = &mut kicked => return WriteEnd::Kicked(kick),
            r = step => if let Err(end) = r { return end },
        }
    }
}

/// Writes `first` and whatever else is already queued, then flushes once.
async fn write_batch(
    sink: &mut Sink,
    outbound: &mut mpsc::Receiver<Message>,
    first: Message,
    metrics: &Metrics,
) -> Result<(), WriteEnd> {
    let mut count = 1u64;
    let mut bytes = first.len() as u64;
    sink.feed(first).await.map_err(|_| WriteEnd::Failed)?;
    while count < MAX_BATCH as u64 {
        let Ok(m) = outbound.try_recv() else { break };
        count += 1;
        bytes += m.len() as u64;
        sink.feed(m).await.map_err(|_| WriteEnd::Failed)?;
    }
    sink.flush().await.map_err(|_| WriteEnd::Failed)?;
    metrics.delivered(count, bytes);
    Ok(())
}

fn frame(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

fn going_away() -> CloseFrame {
    frame(CloseCode::Away, "server shutting down")
}

fn kick_frame(kick: Kick) -> CloseFrame {
    match kick {
        Kick::SlowConsumer => frame(
            CloseCode::Policy,
            "slow consumer: send queue full, messages were not being read",
        ),
    }
}

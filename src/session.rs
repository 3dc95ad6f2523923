//! One connected peer, from the finished handshake to the close frame.
//!
//! A session is a single loop over everything that can happen to a peer: a
//! frame arrives, the room queues a message, the room kicks the peer, the
//! room's heartbeat asks for a ping (and an idle check), or the room stops
//! (the server is shutting down). The session does not know which protocol
//! its peer speaks: the room queues what the peer is to get (raw messages or
//! `hubbub.v1` envelopes), and what the peer sends goes to the room as it
//! is.
//! Whichever comes first is handled, and the outcome decides the close code.
//!
//! One loop in one task, with an unsplit WebSocket and no timer of its own,
//! is deliberate: an idle peer should cost as little memory as possible, and
//! every separate future, lock or timer here would be paid for by every one
//! of tens of thousands of mostly idle peers. The ping schedule is the
//! room's (one timer for all its peers); a session only remembers when it
//! last heard from its peer.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use governor::clock::MonotonicClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::{self, Mode};
use crate::queue::{Recv, Signal};
use crate::room::{Handoff, Kick, Membership, Outgoing, PeerId, RoomClosed, RoomHandle};
use crate::socket::Socket;

type Ws = WebSocketStream<Socket>;

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
    pub metrics: &'a Metrics,
    pub shutdown: &'a CancellationToken,
}

/// How a session ended: with a close frame of ours, or without one because
/// the peer closed or the connection broke.
enum End {
    Close(CloseFrame),
    /// The peer broke a rule (a protocol error, bad UTF-8, a message too
    /// big, binary where it is refused): it still gets every message it is
    /// owed, its own included, before it is closed with this frame.
    Broke(CloseFrame),
    Gone,
}

/// Runs the session until the peer is gone, as a member of the room the
/// gateway joined it to. Never returns an error: every way a peer can end is
/// an ordinary outcome, logged here.
///
/// The membership is taken from `joined` (and dropped, which leaves the
/// room) before the closing handshake, so the peer gets nothing more. It is
/// lent rather than moved in: the caller's task holds it either way, and
/// every idle peer would pay for a second copy in this future.
pub async fn run(ws: &mut Ws, ctx: SessionContext<'_>, joined: &mut Option<Membership>) {
    let Some(membership) = joined.as_ref() else {
        return;
    };
    ctx.metrics.peer_opened();
    let counted = Counted(ctx.metrics);
    info!("peer connected");
    let end = Serve {
        ws,
        membership,
        ctx: &ctx,
        last_heard: Instant::now(),
        stopping: false,
        ping_due: false,
        moved: false,
        stalled_beats: 0,
        step: Step::Idle,
        handoff: None,
        broke: None,
        flush_owed: false,
        limit: None,
        expiry: membership
            .expires
            .map(|at| Box::pin(tokio::time::sleep_until(crate::auth::deadline(at)))),
    }
    .await;
    // Leave before the closing handshake: the peer gets nothing more.
    *joined = None;
    drop(counted);
    // Boxed: a task is as large as its largest state, and only the loop,
    // where an idle peer spends its life, should set that size.
    Box::pin(finish(ws, end, &ctx)).await;
}

/// A peer counted in the connections gauge. Dropping it takes it out again,
/// however the session ends, a panic or an abort included (the membership,
/// dropped with the caller's task, leaves the room the same way).
struct Counted<'a>(&'a Metrics);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.peer_closed();
    }
}

/// Ends the connection as `end` says.
async fn finish(ws: &mut Ws, end: End, ctx: &SessionContext<'_>) {
    match end {
        End::Close(frame) | End::Broke(frame) => {
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
///
/// Reading, writing and handing a message to the room go on side by side: a
/// peer whose write is stuck is still read (so its pongs count as signs of
/// life), and a peer waiting for a busy room to take its message still has
/// its own queue written, so it is judged as a slow consumer by how fast it
/// reads, exactly like a peer that only reads. Only one message at a time
/// waits for the room: until it is taken, nothing more is read from the peer.
struct Serve<'a, 'c> {
    ws: &'a mut Ws,
    /// Its queue, its room and its protocol.
    membership: &'a Membership,
    ctx: &'a SessionContext<'c>,
    /// Any frame from the peer, pongs included, moves this on; the room's
    /// heartbeat compares it with `idle_timeout`.
    last_heard: Instant,
    /// Set once the room stops taking messages (shutdown has begun): stop
    /// reading and only drain what it already queued; it closes the queue
    /// when it is done. Sessions do not watch the shutdown token themselves:
    /// a waiter on it per peer would put one shared lock on every delivery.
    stopping: bool,
    /// The heartbeat asked for a ping while a batch was being written; it is
    /// sent once the batch is out.
    ping_due: bool,
    /// The write in progress moved (the socket took something) since the
    /// last heartbeat.
    moved: bool,
    /// Heartbeats in a row that found a write in progress that had not moved.
    stalled_beats: u32,
    step: Step,
    /// A received message the room has not taken yet (it was behind).
    handoff: Option<Handoff<'a>>,
    /// The peer broke a rule: nothing more is read, what it is owed is
    /// written, then it is closed with this frame (boxed: rare, and an idle
    /// peer should not carry room for it).
    broke: Option<Box<CloseFrame>>,
    /// The room has yet to be asked to let this peer go (see
    /// [`crate::room::RoomHandle::flush`]).
    flush_owed: bool,
    /// The peer's message rate limit, made when it first sends (an idle
    /// peer carries none).
    limit: Option<Box<Limit>>,
    /// When its token expires (boxed, and only for peers with a token).
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A peer's message rate: a token bucket (GCRA) of `rate_limit_per_sec`
/// with `rate_limit_burst` at once, and how many messages it had refused
/// lately.
struct Limit {
    bucket: RateLimiter<NotKeyed, InMemoryState, MonotonicClock>,
    refused: u32,
    /// When the current 10-second count of refusals began.
    since: Instant,
}

/// Refusals are counted over this long; more than `rate_limit_burst` of
/// them in one stretch closes the peer.
const REFUSALS_WINDOW: Duration = Duration::from_secs(10);

/// What the rate limit says about one message.
enum Verdict {
    Relay,
    Refuse,
    Close,
}

/// What the session is writing.
enum Step {
    /// Nothing: waiting for the next event.
    Idle,
    /// Writing what is queued (starting with `next`), then one flush.
    Writing {
        next: Option<Outgoing>,
        count: u64,
        bytes: u64,
    },
    /// Writing a ping, then a flush.
    Pinging { sent: bool },
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
                return Poll::Ready(Some(End::Broke(frame_of(
                    CloseCode::Unsupported,
                    "binary messages are not accepted",
                ))))
            }
            // Any frame at all, pongs included, is a sign of life.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Poll::Ready(None),
            Message::Close(_) => return Poll::Ready(Some(End::Gone)),
        }
        match self.rate() {
            Verdict::Relay => {}
            Verdict::Refuse => {
                if self.membership.mode == Mode::V1 {
                    self.membership.outbound.push_own(protocol::error(
                        "rate_limited",
                        "too many messages: this one was not relayed; slow down",
                    ));
                }
                return Poll::Ready(None);
            }
            Verdict::Close => {
                return Poll::Ready(Some(End::Broke(frame_of(
                    CloseCode::Policy,
                    "rate limit exceeded",
                ))))
            }
        }
        self.ctx.metrics.message_received();
        let room: &'a RoomHandle = &self.membership.room;
        match room.broadcast(self.membership.id(), message) {
            Ok(handoff) => self.handoff = handoff,
            // The room stopped taking messages: shutdown has begun.
            Err(RoomClosed) => self.stopping = true,
        }
        Poll::Ready(None)
    }

    /// Applies the rate limit to one received message.
    fn rate(&mut self) -> Verdict {
        let config = self.ctx.config;
        let Some(per_sec) = NonZeroU32::new(config.rate_limit_per_sec) else {
            return Verdict::Relay;
        };
        let limit = self.limit.get_or_insert_with(|| {
            let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(NonZeroU32::MIN);
            let quota = Quota::per_second(per_sec).allow_burst(burst);
            Box::new(Limit {
                bucket: RateLimiter::direct_with_clock(quota, MonotonicClock),
                refused: 0,
                since: Instant::now(),
            })
        });
        if limit.bucket.check().is_ok() {
            return Verdict::Relay;
        }
        self.ctx.metrics.rate_limited();
        if limit.since.elapsed() >= REFUSALS_WINDOW {
            limit.refused = 0;
            limit.since = Instant::now();
        }
        limit.refused += 1;
        if limit.refused > config.rate_limit_burst {
            Verdict::Close
        } else {
            Verdict::Refuse
        }
    }

    /// Notes whether the socket took what was offered: a write that stays
    /// pending across heartbeats is a peer that stopped reading.
    fn track<T>(&mut self, poll: Poll<T>) -> Poll<T> {
        if poll.is_ready() {
            self.moved = true;
        }
        poll
    }

    /// Writes the current batch; `Ready(Ok)` once it is flushed.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let Step::Writing { next, count, bytes } = &mut self.step else {
            return Poll::Ready(Ok(()));
        };
        // A message is taken off the queue only once the socket can take it.
        while let Some(message) = next.take().or_else(|| {
            (*count < MAX_BATCH as u64)
                .then(|| self.membership.outbound.try_recv())
                .flatten()
        }) {
            match Pin::new(&mut *self.ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => self.moved = true,
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
        let (count, bytes) = (*count, *bytes);
        let flushed = Pin::new(&mut *self.ws).poll_flush(cx);
        ready!(self.track(flushed))?;
        self.ctx.metrics.delivered(count, bytes);
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
        let flushed = Pin::new(&mut *self.ws).poll_flush(cx);
        self.track(flushed)
    }

    /// The room's heartbeat: close a peer not heard from for `idle_timeout`
    /// (so it goes at the first beat after that), or one whose writes have
    /// not moved for as long, or ping it.
    fn on_heartbeat(&mut self) -> Option<End> {
        let idle_timeout = self.ctx.config.idle_timeout;
        if self.stopping {
            // Shutdown has its own deadline (the grace period).
        } else if self.last_heard.elapsed() >= idle_timeout {
            return Some(End::Close(frame_of(CloseCode::Away, "idle timeout")));
        } else if matches!(self.step, Step::Idle) || std::mem::take(&mut self.moved) {
            self.stalled_beats = 0;
        } else {
            self.stalled_beats += 1;
            // The stall began after the beat before the first one that saw
            // it, so it has lasted at least (beats - 1) intervals.
            let stalled_for = self
                .ctx
                .config
                .ping_interval
                .saturating_mul(self.stalled_beats - 1);
            if stalled_for >= idle_timeout {
                self.ctx.metrics.slow_consumer_disconnect();
                return Some(End::Close(frame_of(
                    CloseCode::Policy,
                    "slow consumer: nothing could be written for idle_timeout",
                )));
            }
        }
        match self.step {
            Step::Idle => self.step = Step::Pinging { sent: false },
            _ => self.ping_due = true,
        }
        None
    }
}

impl<'a> Future for Serve<'a, '_> {
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let this = self.get_mut();
        if let Some(expiry) = &mut this.expiry {
            if expiry.as_mut().poll(cx).is_ready() {
                // The client reconnects with a fresh token.
                return Poll::Ready(End::Close(frame_of(
                    CloseCode::Library(4001),
                    "token expired",
                )));
            }
        }
        loop {
            if let Some(handoff) = &mut this.handoff {
                if let Poll::Ready(taken) = handoff.as_mut().poll(cx) {
                    this.handoff = None;
                    if taken.is_err() {
                        this.stopping = true;
                    }
                }
            }
            if this.flush_owed && this.handoff.is_none() {
                // After its last message: the room lets go of this peer once
                // that message has gone out to everyone, itself included.
                this.flush_owed = false;
                let room: &'a RoomHandle = &this.membership.room;
                match room.flush(this.ctx.id) {
                    Ok(handoff) => this.handoff = handoff,
                    Err(RoomClosed) => this.stopping = true,
                }
            }
            if matches!(this.step, Step::Idle) {
                // The queue first: delivering to this peer frees room
                // capacity; reading from it adds work.
                match this.membership.outbound.poll_recv(cx) {
                    // After any event, the queue is polled again before the
                    // task sleeps: only a pending poll leaves a waker there.
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
                    Poll::Ready(Recv::Closed) if this.handoff.is_none() && !this.flush_owed => {
                        return Poll::Ready(match this.broke.take() {
                            Some(frame) => End::Close(*frame),
                            None => End::Close(going_away()),
                        })
                    }
                    // The room let go of this peer while one of its messages
                    // was still on the way in: wait for that first.
                    Poll::Ready(Recv::Closed) => {}
                    Poll::Ready(Recv::Kicked(kick)) => {
                        return Poll::Ready(End::Close(kick_frame(kick)))
                    }
                    Poll::Pending => {}
                }
            } else {
                // A write can stall on a peer that stopped reading; the
                // room's kick and heartbeat must still get through.
                match this.membership.outbound.poll_signal(cx) {
                    Poll::Ready(Signal::Kicked(kick)) => {
                        return Poll::Ready(End::Close(kick_frame(kick)))
                    }
                    Poll::Ready(Signal::Ping) => {
                        if let Some(end) = this.on_heartbeat() {
                            return Poll::Ready(end);
                        }
                        continue;
                    }
                    Poll::Pending => {}
                }
            }
            let written = match this.step {
                Step::Idle => Poll::Pending,
                Step::Writing { .. } => this.poll_write(cx),
                Step::Pinging { .. } => this.poll_ping(cx),
            };
            match written {
                Poll::Ready(Err(_)) => return Poll::Ready(End::Gone),
                Poll::Ready(Ok(())) => {
                    this.step = if std::mem::take(&mut this.ping_due) {
                        Step::Pinging { sent: false }
                    } else {
                        Step::Idle
                    };
                    continue;
                }
                Poll::Pending => {}
            }
            if this.handoff.is_none() && !this.stopping && this.broke.is_none() {
                if let Poll::Ready(end) = this.poll_read(cx) {
                    match end {
                        Some(End::Broke(frame)) => {
                            this.broke = Some(Box::new(frame));
                            this.flush_owed = true;
                            continue;
                        }
                        Some(end) => return Poll::Ready(end),
                        None => continue,
                    }
                }
            }
            return Poll::Pending;
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
        // RFC 6455 5.2: a 64-bit length has its top bit clear. tungstenite
        // reports a length with it set as too big; it is a framing error.
        WsError::Capacity(CapacityError::MessageTooLong { size, .. })
            if size as u64 > i64::MAX as u64 =>
        {
            End::Broke(frame_of(CloseCode::Protocol, "invalid frame length"))
        }
        WsError::Capacity(_) => End::Broke(frame_of(CloseCode::Size, "message too big")),
        WsError::Utf8(_) => End::Broke(frame_of(
            CloseCode::Invalid,
            "text message is not valid UTF-8",
        )),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        WsError::Protocol(p) => {
            debug!(error = %p, "protocol error");
            End::Broke(frame_of(CloseCode::Protocol, "protocol error"))
        }
        WsError::AttackAttempt => End::Broke(frame_of(CloseCode::Policy, "attack attempt")),
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
        Kick::Removed => frame_of(CloseCode::Library(4003), "removed"),
        Kick::Unavailable => frame_of(
            CloseCode::Again,
            "the cluster cannot take messages right now; try again later",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Mode;
    use crate::room::{self, Inbox, Member};
    use crate::socket::Socket;
    use std::sync::Arc;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_tungstenite::MaybeTlsStream;

    type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

    /// What a session borrows, kept alive for the whole test. The test plays
    /// the room: it holds the room's inbox and reads it when it chooses.
    struct World {
        config: Config,
        room: RoomHandle,
        metrics: Metrics,
        shutdown: CancellationToken,
    }

    fn world(send_queue: usize, inbound: usize) -> (Arc<World>, Inbox) {
        let (room, inbox) = room::channels(send_queue, inbound);
        let world = Arc::new(World {
            config: Config {
                send_queue,
                ..Config::ephemeral()
            },
            room,
            metrics: Metrics::default(),
            shutdown: CancellationToken::new(),
        });
        (world, inbox)
    }

    /// A server-side WebSocket on loopback and its client end.
    async fn pair() -> (Ws, Client) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let url = format!("ws://{addr}/");
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp))
                .await
                .expect("client handshake")
                .0
        });
        let (tcp, _) = listener.accept().await.expect("accept");
        let ws =
            tokio_tungstenite::accept_async(Socket::new(crate::socket::Stream::Plain(tcp), &[]))
                .await
                .expect("server handshake");
        (ws, client.await.expect("client task"))
    }

    /// A session joined to the test's room, run as its own task.
    async fn peer(world: &Arc<World>, id: PeerId) -> (Client, tokio::task::JoinHandle<()>) {
        let (mut ws, client) = pair().await;
        let mut joined = Some(
            world
                .room
                .join(id, Mode::Raw, None, None)
                .expect("the test's room is open and below its limits, so it takes a peer"),
        );
        let world = world.clone();
        let task = tokio::spawn(async move {
            let ctx = SessionContext {
                id,
                config: &world.config,
                metrics: &world.metrics,
                shutdown: &world.shutdown,
            };
            run(&mut ws, ctx, &mut joined).await;
        });
        (client, task)
    }

    async fn join_of(inbox: &mut Inbox) -> (PeerId, crate::queue::Sender) {
        match inbox.members.recv().await {
            Some(Member::Join { id, outbound, .. }) => (id, outbound),
            _ => panic!("expected a join"),
        }
    }

    async fn next_text(ws: &mut Client) -> String {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
            match next {
                Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// The room is held behind on purpose (the test plays the room and takes
    /// nothing off its inbound channel) while a sender waits to hand it a
    /// message. Sender and reader read at the same speed, so the queue rule
    /// must treat them alike: neither queue may fill up.
    #[tokio::test]
    async fn a_sender_waiting_for_a_busy_room_keeps_draining_its_queue() {
        const SEND_QUEUE: usize = 4;
        let (world, mut inbox) = world(SEND_QUEUE, 1);
        let (mut sender, _s) = peer(&world, 1).await;
        let (mut reader, _r) = peer(&world, 2).await;
        let mut queues = Vec::new();
        for _ in 0..2 {
            queues.push(join_of(&mut inbox).await.1);
        }
        // The room's inbound channel is full from here on.
        assert!(matches!(
            world.room.broadcast(0, Message::text("filler")),
            Ok(None)
        ));
        sender
            .send(Message::text("from the sender"))
            .await
            .expect("send");
        // Wait until the session has read it and is waiting for the room.
        let deadline = Instant::now() + Duration::from_secs(5);
        while world
            .metrics
            .render()
            .contains("hubbub_messages_received_total 0")
        {
            assert!(Instant::now() < deadline, "the session never read it");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for i in 0..SEND_QUEUE * 5 {
            let message: Outgoing = Arc::new(Message::text(format!("m{i}")));
            for (who, queue) in ["sender", "reader"].iter().zip(&queues) {
                assert!(
                    queue.push(message.clone()).is_ok(),
                    "the {who}'s queue filled up at message {i}"
                );
            }
            assert_eq!(next_text(&mut sender).await, format!("m{i}"));
            assert_eq!(next_text(&mut reader).await, format!("m{i}"));
        }
        // Once the room catches up, the waiting message goes in after the filler.
        for want in ["filler", "from the sender"] {
            match inbox.messages.recv().await {
                Some(room::Inbound::Message { message: got, .. }) => {
                    assert_eq!(got.to_text().ok(), Some(want))
                }
                _ => panic!("expected {want:?} for the room"),
            }
        }
    }

    /// However a session ends, a panic included, it leaves the room and the
    /// connections gauge goes back down.
    #[tokio::test]
    async fn a_session_that_panics_still_leaves_the_room() {
        let (world, mut inbox) = world(8, 8);
        let (mut ws, client) = pair().await;
        let mut joined = Some(
            world
                .room
                .join(7, Mode::Raw, None, None)
                .expect("the test's room is open and below its limits, so it takes a peer"),
        );
        let inner = world.clone();
        let task = tokio::spawn(async move {
            let ctx = SessionContext {
                id: 7,
                config: &inner.config,
                metrics: &inner.metrics,
                shutdown: &inner.shutdown,
            };
            let session = run(&mut ws, ctx, &mut joined);
            tokio::pin!(session);
            // Run the session a while, then panic in the middle of it.
            let _ = tokio::time::timeout(Duration::from_millis(200), &mut session).await;
            assert_eq!(inner.metrics.open_connections(), 1);
            panic!("a bug in a session");
        });
        assert_eq!(join_of(&mut inbox).await.0, 7);
        assert!(task.await.is_err_and(|e| e.is_panic()));
        assert!(matches!(
            inbox.members.recv().await,
            Some(Member::Leave { id: 7 })
        ));
        assert_eq!(world.metrics.open_connections(), 0);
        drop(client);
    }
}

//! A peer's outbound queue: bounded, one producer (the hub), one consumer
//! (the peer's session).
//!
//! This takes the place of a `tokio::sync::mpsc` channel plus a `oneshot`
//! for the kick. Those are built for many producers and high contention:
//! cache-padded fields and a pre-allocated block of slots cost about a
//! kilobyte per channel, paid by every idle peer. Here one side only ever
//! pushes and the other only pops, so a small mutex around a `VecDeque` that
//! allocates nothing while empty does the job in under a hundred bytes. The
//! lock is held for a push or a pop, never across an await.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::room::{Kick, Outgoing};

/// Capacity kept by an emptied queue; anything above is released so a burst
/// does not leave every peer holding a large buffer afterwards.
const KEEP_CAPACITY: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// The hub dropped its end: deliver what is queued, then stop.
    Closed,
    /// The hub gave up on this peer: stop at once.
    Kicked(Kick),
}

struct Inner {
    items: VecDeque<Outgoing>,
    state: State,
    /// The hub's heartbeat came by: ping the peer and check it is alive. A
    /// flag rather than a queued item, so an idle peer's queue never needs a
    /// buffer for it.
    ping: bool,
    waker: Option<Waker>,
}

struct Shared {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock, but a poisoned queue is
        // still a valid queue.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The hub's end.
pub struct Sender {
    shared: Arc<Shared>,
}

/// The session's end.
pub struct Receiver {
    shared: Arc<Shared>,
}

/// The queue already holds `capacity` messages.
#[derive(Debug)]
pub struct Full;

/// What the session gets from its queue.
#[derive(Debug)]
pub enum Recv {
    Message(Outgoing),
    /// Time to ping the peer (see [`Sender::ping`]).
    Ping,
    /// The hub is done with this peer and everything queued was delivered.
    Closed,
    Kicked(Kick),
}

pub fn bounded(capacity: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        capacity,
        inner: Mutex::new(Inner {
            items: VecDeque::new(),
            state: State::Open,
            ping: false,
            waker: None,
        }),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

impl Sender {
    /// Queues a message without waiting; fails if the queue is full.
    pub fn push(&self, message: Outgoing) -> Result<(), Full> {
        let mut inner = self.shared.lock();
        if inner.items.len() >= self.shared.capacity {
            return Err(Full);
        }
        inner.items.push_back(message);
        let waker = inner.waker.take();
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Queues a message whatever the queue holds: for what a peer gets as it
    /// joins (`hello` and the history it asked for), which is bounded by
    /// the history size and must not count against the peer as slowness.
    pub fn push_initial(&self, message: Outgoing) {
        let mut inner = self.shared.lock();
        inner.items.push_back(message);
        let waker = inner.waker.take();
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Asks the session to ping its peer (once, however often it is asked
    /// before the session gets to it).
    pub fn ping(&self) {
        let mut inner = self.shared.lock();
        if inner.state != State::Open {
            return;
        }
        inner.ping = true;
        let waker = inner.waker.take();
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Tells the session to stop now; what is still queued is dropped.
    pub fn kick(self, kick: Kick) {
        self.finish(State::Kicked(kick));
    }

    fn finish(&self, state: State) {
        let mut inner = self.shared.lock();
        if inner.state == State::Open {
            inner.state = state;
        }
        inner.ping = false;
        if matches!(inner.state, State::Kicked(_)) {
            inner.items = VecDeque::new();
        }
        let waker = inner.waker.take();
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.finish(State::Closed);
    }
}

impl Receiver {
    /// The next message, or why there will be none.
    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Recv> {
        let mut inner = self.shared.lock();
        if let State::Kicked(kick) = inner.state {
            return Poll::Ready(Recv::Kicked(kick));
        }
        // Before the messages: a peer kept busy must still be checked.
        if std::mem::take(&mut inner.ping) {
            return Poll::Ready(Recv::Ping);
        }
        if let Some(message) = pop(&mut inner) {
            return Poll::Ready(Recv::Message(message));
        }
        if inner.state == State::Closed {
            return Poll::Ready(Recv::Closed);
        }
        register(&mut inner, cx);
        Poll::Pending
    }

    /// Queues a frame of the session's own for its peer (a notice about
    /// something the peer sent), behind what the room queued. Not bounded
    /// by the capacity: the session bounds how many it queues.
    pub fn push_own(&self, message: Outgoing) {
        let mut inner = self.shared.lock();
        if inner.state == State::Open {
            inner.items.push_back(message);
        }
    }

    /// A message that is already queued, if any (never one after a kick).
    pub fn try_recv(&self) -> Option<Outgoing> {
        let mut inner = self.shared.lock();
        if matches!(inner.state, State::Kicked(_)) {
            return None;
        }
        pop(&mut inner)
    }

    /// What needs the session's attention while it is busy writing: a kick
    /// or the heartbeat's ping request, never a message (those wait until
    /// the write in progress is done). It shares the waker slot with
    /// `poll_recv`, which is fine because a session polls both from one task.
    pub fn poll_signal(&self, cx: &mut Context<'_>) -> Poll<Signal> {
        let mut inner = self.shared.lock();
        if let State::Kicked(kick) = inner.state {
            return Poll::Ready(Signal::Kicked(kick));
        }
        if std::mem::take(&mut inner.ping) {
            return Poll::Ready(Signal::Ping);
        }
        register(&mut inner, cx);
        Poll::Pending
    }
}

/// See [`Receiver::poll_signal`].
#[derive(Debug, PartialEq, Eq)]
pub enum Signal {
    Ping,
    Kicked(Kick),
}

fn pop(inner: &mut Inner) -> Option<Outgoing> {
    let message = inner.items.pop_front()?;
    if inner.items.is_empty() && inner.items.capacity() > KEEP_CAPACITY {
        inner.items = VecDeque::new();
    }
    Some(message)
}

fn register(inner: &mut Inner, cx: &mut Context<'_>) {
    match &inner.waker {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => inner.waker = Some(cx.waker().clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio_tungstenite::tungstenite::Message;

    async fn recv(rx: &Receiver) -> Recv {
        poll_fn(|cx| rx.poll_recv(cx)).await
    }

    fn msg(s: &str) -> Outgoing {
        Arc::new(Message::text(s))
    }

    fn text(r: Recv) -> String {
        match r {
            Recv::Message(m) => m.to_text().unwrap_or_default().to_string(),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn delivers_in_order_then_reports_closed() {
        let (tx, rx) = bounded(4);
        assert!(tx.push(msg("a")).is_ok());
        assert!(tx.push(msg("b")).is_ok());
        drop(tx);
        assert_eq!(text(recv(&rx).await), "a");
        assert_eq!(text(recv(&rx).await), "b");
        assert!(matches!(recv(&rx).await, Recv::Closed));
    }

    #[tokio::test]
    async fn refuses_beyond_capacity() {
        let (tx, rx) = bounded(2);
        assert!(tx.push(msg("1")).is_ok());
        assert!(tx.push(msg("2")).is_ok());
        assert!(tx.push(msg("3")).is_err());
        assert_eq!(text(recv(&rx).await), "1");
        assert!(tx.push(msg("3")).is_ok());
    }

    #[tokio::test]
    async fn a_kick_wins_over_queued_messages() {
        let (tx, rx) = bounded(4);
        assert!(tx.push(msg("a")).is_ok());
        tx.kick(Kick::SlowConsumer);
        assert!(matches!(recv(&rx).await, Recv::Kicked(Kick::SlowConsumer)));
        assert!(rx.try_recv().is_none());
        assert_eq!(
            poll_fn(|cx| rx.poll_signal(cx)).await,
            Signal::Kicked(Kick::SlowConsumer)
        );
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken() {
        let (tx, rx) = bounded(4);
        let waiter = tokio::spawn(async move { text(recv(&rx).await) });
        tokio::task::yield_now().await;
        assert!(tx.push(msg("late")).is_ok());
        assert_eq!(waiter.await.ok().as_deref(), Some("late"));
    }

    #[tokio::test]
    async fn a_ping_comes_once_before_queued_messages_and_never_after_the_end() {
        let (tx, rx) = bounded(4);
        assert!(tx.push(msg("a")).is_ok());
        tx.ping();
        tx.ping();
        assert!(matches!(recv(&rx).await, Recv::Ping));
        assert_eq!(text(recv(&rx).await), "a");
        // Asking again wakes a waiting session.
        let waiter = tokio::spawn(async move {
            let first = recv(&rx).await;
            (first, rx)
        });
        tokio::task::yield_now().await;
        tx.ping();
        let Ok((first, rx)) = waiter.await else {
            panic!("the waiting session failed");
        };
        assert!(matches!(first, Recv::Ping));
        // A ping asked for just before the hub lets go is not delivered.
        tx.ping();
        drop(tx);
        assert!(matches!(recv(&rx).await, Recv::Closed));
        // Nor one after a kick.
        let (tx, rx) = bounded(4);
        tx.ping();
        tx.kick(Kick::SlowConsumer);
        assert!(matches!(recv(&rx).await, Recv::Kicked(_)));
        // And an idle queue still holds no buffer.
        let (tx, rx) = bounded(4);
        tx.ping();
        assert!(matches!(recv(&rx).await, Recv::Ping));
        assert_eq!(rx.shared.lock().items.capacity(), 0);
    }

    #[test]
    fn an_emptied_queue_gives_back_a_large_buffer() {
        let (tx, rx) = bounded(1000);
        for _ in 0..100 {
            assert!(tx.push(msg("x")).is_ok());
        }
        while rx.try_recv().is_some() {}
        assert_eq!(rx.shared.lock().items.capacity(), 0);
    }
}

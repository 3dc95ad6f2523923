//! The hub: the one task that knows every peer.
//!
//! All peers' incoming messages go through a single channel into this task,
//! which is what gives every peer the same order: the hub hands each message
//! to every peer's queue before it looks at the next one. The registry is
//! owned by this task alone and changed only by messages, so there is no lock
//! to contend for and nothing to get wrong when peers come and go.
//!
//! The hub never waits on a peer. Each peer has a bounded queue
//! ([`crate::queue`]); when it is full the peer is a slow consumer, is
//! dropped from the registry and kicked through its queue. Messages are
//! `tungstenite::Message` values whose payload is reference-counted `Bytes`,
//! so fanning one message out to N peers copies a pointer N times, not the
//! body.
//!
//! The hub also keeps the ping schedule: every `ping_interval` its heartbeat
//! asks each peer's session to ping and to check its idle deadline, so no
//! peer needs a timer of its own.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::{self, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::queue;

/// Identifies one connection for its whole life, in logs and in the registry.
pub type PeerId = u64;

/// Why the hub dropped a peer on its own initiative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// Its send queue was full: it is not reading fast enough.
    SlowConsumer,
}

/// A message as queued for a peer. The `Arc` keeps queue slots one pointer
/// wide, which keeps every peer's queue allocation small; the payload inside
/// is shared `Bytes` either way.
pub type Outgoing = Arc<Message>;

/// A peer's place in the hub, from `join` until it is dropped.
///
/// Dropping it is how a peer leaves: however its session ends (closed,
/// aborted at the end of the shutdown grace, or unwinding from a panic), the
/// hub hears of it, so no registry entry is left behind.
pub struct Membership {
    /// Messages to write to this peer, in hub order; also says when the hub
    /// kicks the peer or stops.
    pub outbound: queue::Receiver,
    id: PeerId,
    members: mpsc::UnboundedSender<Member>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        // The hub may already be gone (shutdown); then there is nobody to tell.
        let _ = self.members.send(Member::Leave { id: self.id });
    }
}

/// Peers coming and going. A channel of their own, unbounded because each
/// peer sends exactly two (one join, one leave), so it holds at most twice
/// the number of connections, and because a leave must be sendable from a
/// destructor, which cannot wait for room in a bounded channel. Joins and
/// leaves share it so the hub always sees a peer's join before its leave.
enum Member {
    Join { id: PeerId, outbound: queue::Sender },
    Leave { id: PeerId },
}

/// Cheap, cloneable handle for talking to the hub.
#[derive(Clone)]
pub struct HubHandle {
    messages: mpsc::Sender<Message>,
    members: mpsc::UnboundedSender<Member>,
    send_queue: usize,
}

/// The hub has stopped (the server is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the hub has stopped")]
pub struct HubClosed;

/// A message on its way to the hub, when the hub was too far behind to take
/// it at once. Boxed: it exists only while the hub is behind, and an idle
/// peer should not carry room for it.
pub type Handoff<'a> = Pin<Box<dyn Future<Output = Result<(), HubClosed>> + Send + 'a>>;

impl HubHandle {
    /// Registers a peer. From the moment this returns, the peer receives every
    /// message the hub broadcasts after the ones it has already taken.
    pub fn join(&self, id: PeerId) -> Result<Membership, HubClosed> {
        let (outbound_tx, outbound) = queue::bounded(self.send_queue);
        self.members
            .send(Member::Join {
                id,
                outbound: outbound_tx,
            })
            .map_err(|_| HubClosed)?;
        Ok(Membership {
            outbound,
            id,
            members: self.members.clone(),
        })
    }

    /// Offers a message for every peer. `Ok(None)`: the hub has it.
    /// `Ok(Some(handoff))`: the hub is behind; the message goes in when the
    /// returned future completes, and the caller should not read more from
    /// its peer until then (which pushes back on the sender rather than
    /// growing memory) but keep writing to it.
    pub fn broadcast(&self, message: Message) -> Result<Option<Handoff<'_>>, HubClosed> {
        match self.messages.try_send(message) {
            Ok(()) => Ok(None),
            Err(TrySendError::Closed(_)) => Err(HubClosed),
            Err(TrySendError::Full(message)) => Ok(Some(Box::pin(async move {
                self.messages.send(message).await.map_err(|_| HubClosed)
            }))),
        }
    }
}

/// How many messages the hub takes off its channel per wake-up.
const BATCH: usize = 64;

/// Messages waiting for the hub, from all peers together; a generous size
/// keeps bursts from many peers from making readers wait.
const INBOUND: usize = 4096;

/// Makes a hub: the handle peers use, and the hub's task for the caller to
/// spawn (the server watches it). It runs until `shutdown` fires, then delivers every
/// message it has already accepted and drops all peers' queues, which tells
/// each connection to finish writing and close with 1001.
///
/// Every `ping_interval` it also asks every peer to ping (the heartbeat):
/// one timer here instead of one per peer, which every idle peer would
/// carry.
pub fn new(
    send_queue: usize,
    ping_interval: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> (HubHandle, impl Future<Output = ()> + Send + 'static) {
    let (messages, rx) = mpsc::channel(INBOUND);
    let (members, members_rx) = mpsc::unbounded_channel();
    let handle = HubHandle {
        messages,
        members,
        send_queue,
    };
    let task = Hub::default().run(rx, members_rx, ping_interval, metrics, shutdown);
    (handle, task)
}

/// A handle whose hub is the caller: the returned receivers are what the
/// hub task would read. For tests that need the hub to fall behind on
/// purpose or to watch peers join and leave.
#[cfg(test)]
pub(crate) fn detached(
    send_queue: usize,
    inbound: usize,
) -> (HubHandle, mpsc::Receiver<Message>, Members) {
    let (messages, rx) = mpsc::channel(inbound);
    let (members, members_rx) = mpsc::unbounded_channel();
    let handle = HubHandle {
        messages,
        members,
        send_queue,
    };
    (handle, rx, Members(members_rx))
}

/// The join and leave side of a [`detached`] hub.
#[cfg(test)]
pub(crate) struct Members(mpsc::UnboundedReceiver<Member>);

#[cfg(test)]
impl Members {
    /// The next join's peer and its queue's sending end.
    pub(crate) async fn joined(&mut self) -> Option<(PeerId, queue::Sender)> {
        match self.0.recv().await? {
            Member::Join { id, outbound } => Some((id, outbound)),
            Member::Leave { .. } => None,
        }
    }

    /// The next leave's peer.
    pub(crate) async fn left(&mut self) -> Option<PeerId> {
        match self.0.recv().await? {
            Member::Leave { id } => Some(id),
            Member::Join { .. } => None,
        }
    }
}

#[derive(Default)]
struct Hub {
    peers: HashMap<PeerId, queue::Sender>,
}

impl Hub {
    async fn run(
        mut self,
        mut messages: mpsc::Receiver<Message>,
        mut members: mpsc::UnboundedReceiver<Member>,
        ping_interval: Duration,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(BATCH);
        let stop = shutdown.cancelled();
        tokio::pin!(stop);
        let mut heartbeat = time::interval_at(Instant::now() + ping_interval, ping_interval);
        // A late beat is not made up for with a burst of pings.
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    for peer in self.peers.values() {
                        peer.ping();
                    }
                }
                Some(member) = members.recv() => self.member(member),
                n = messages.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.members_so_far(&mut members);
                    for message in batch.drain(..) {
                        self.broadcast(message, &metrics);
                    }
                }
                _ = &mut stop => {
                    // Refuse anything new, but deliver what is already queued.
                    members.close();
                    messages.close();
                    self.members_so_far(&mut members);
                    while let Some(message) = messages.recv().await {
                        self.broadcast(message, &metrics);
                    }
                    break;
                }
            }
        }
        info!(peers = self.peers.len(), "hub stopped");
        // Dropping the registry closes every peer's queue once it is drained.
    }

    /// Takes every join and leave sent so far. Called before a batch of
    /// messages: a peer's join is sent before it can send anything, so this
    /// makes sure a sender is registered in time to receive its own message.
    fn members_so_far(&mut self, members: &mut mpsc::UnboundedReceiver<Member>) {
        while let Ok(member) = members.try_recv() {
            self.member(member);
        }
    }

    fn member(&mut self, member: Member) {
        match member {
            Member::Join { id, outbound } => {
                self.peers.insert(id, outbound);
            }
            Member::Leave { id } => {
                self.peers.remove(&id);
            }
        }
    }

    fn broadcast(&mut self, message: Message, metrics: &Metrics) {
        let message = Arc::new(message);
        let mut kicked: Vec<PeerId> = Vec::new();
        for (id, peer) in &self.peers {
            if peer.push(message.clone()).is_err() {
                kicked.push(*id);
            }
        }
        for id in kicked {
            if let Some(peer) = self.peers.remove(&id) {
                warn!(peer = id, "send queue full, disconnecting slow consumer");
                metrics.slow_consumer_disconnect();
                peer.kick(Kick::SlowConsumer);
            }
        }
    }
}

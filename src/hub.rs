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
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
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

/// What the hub hands out to a peer when it joins.
pub struct Membership {
    /// Messages to write to this peer, in hub order; also says when the hub
    /// kicks the peer or stops.
    pub outbound: queue::Receiver,
}

enum Command {
    Join { id: PeerId, outbound: queue::Sender },
    Leave { id: PeerId },
    Broadcast(Message),
}

/// Cheap, cloneable handle for talking to the hub.
#[derive(Clone)]
pub struct HubHandle {
    commands: mpsc::Sender<Command>,
    send_queue: usize,
}

/// The hub has stopped (the server is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the hub has stopped")]
pub struct HubClosed;

impl HubHandle {
    /// Registers a peer. From the moment this returns, the peer receives every
    /// message the hub broadcasts.
    pub async fn join(&self, id: PeerId) -> Result<Membership, HubClosed> {
        let (outbound_tx, outbound) = queue::bounded(self.send_queue);
        self.commands
            .send(Command::Join {
                id,
                outbound: outbound_tx,
            })
            .await
            .map_err(|_| HubClosed)?;
        Ok(Membership { outbound })
    }

    /// Unregisters a peer. Harmless if it is already gone.
    pub async fn leave(&self, id: PeerId) {
        let _ = self.commands.send(Command::Leave { id }).await;
    }

    /// Queues a message for every peer. Waits only if the hub itself is
    /// behind, which pushes back on the reading peer rather than growing
    /// memory.
    pub async fn broadcast(&self, message: Message) -> Result<(), HubClosed> {
        self.commands
            .send(Command::Broadcast(message))
            .await
            .map_err(|_| HubClosed)
    }
}

/// How many commands the hub takes off its channel per wake-up.
const BATCH: usize = 64;

/// Starts the hub task. It runs until `shutdown` fires, then delivers every
/// message it has already accepted and drops all peers' queues, which tells
/// each connection to finish writing and close with 1001.
///
/// Every `ping_interval` it also asks every peer to ping (the heartbeat):
/// one timer here instead of one per peer, which every idle peer would
/// carry.
pub fn spawn(
    send_queue: usize,
    ping_interval: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> (HubHandle, tokio::task::JoinHandle<()>) {
    // The inbound queue is shared by all peers; a generous size keeps bursts
    // from many peers from making readers wait.
    let (tx, rx) = mpsc::channel(4096);
    let handle = HubHandle {
        commands: tx,
        send_queue,
    };
    let task = tokio::spawn(Hub::default().run(rx, ping_interval, metrics, shutdown));
    (handle, task)
}

#[derive(Default)]
struct Hub {
    peers: HashMap<PeerId, queue::Sender>,
}

impl Hub {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
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
                n = rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    for command in batch.drain(..) {
                        self.handle(command, &metrics);
                    }
                }
                _ = &mut stop => {
                    // Refuse anything new, but deliver what is already queued.
                    rx.close();
                    while let Some(command) = rx.recv().await {
                        self.handle(command, &metrics);
                    }
                    break;
                }
            }
        }
        info!(peers = self.peers.len(), "hub stopped");
        // Dropping the registry closes every peer's queue once it is drained.
    }

    fn handle(&mut self, command: Command, metrics: &Metrics) {
        match command {
            Command::Join { id, outbound } => {
                self.peers.insert(id, outbound);
            }
            Command::Leave { id } => {
                self.peers.remove(&id);
            }
            Command::Broadcast(message) => self.broadcast(message, metrics),
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

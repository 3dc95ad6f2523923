//! A room: the one task that knows every peer of the room and fans each
//! message out to them.
//!
//! All the room's incoming messages go through a single channel into this
//! task, which is what gives every peer of the room the same order: the room
//! hands a message to its log ([`crate::log`]), which gives it its offset,
//! then to every peer's queue, before it looks at the next one. The registry
//! of peers is owned by this task alone and changed only by messages, so
//! there is no lock to contend for and nothing to get wrong when peers come
//! and go. Each room is its own task, so one busy room never delays another
//! and rooms use every core.
//!
//! The room never waits on a peer. Each peer has a bounded queue
//! ([`crate::queue`]); when it is full the peer is a slow consumer, is
//! dropped from the registry and kicked through its queue. A message is
//! shared, never copied per peer: raw peers get the message as received
//! (a reference-counted `Bytes`), `hubbub.v1` peers its envelope, encoded
//! once per message ([`crate::protocol`]).
//!
//! The room also keeps the ping schedule of its peers (every `ping_interval`
//! its heartbeat asks each session to ping and to check its idle deadline,
//! so no peer needs a timer of its own), their presence notices, and the
//! expiry of its history. When it has neither peers nor history it ends
//! ([`crate::rooms`] forgets it).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::oneshot;
use tokio::time::{self, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::auth::Identity;
use crate::log::{memory, Append, Entry, RoomLog, Update};
use crate::metrics::Metrics;
use crate::protocol::{self, Mode, Resume};
use crate::queue;

/// Identifies one connection for its whole life, in logs and in the registry.
pub type PeerId = u64;

/// Why the room dropped a peer on its own initiative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// Its send queue was full: it is not reading fast enough.
    SlowConsumer,
    /// Removed through the HTTP API: closed with 4003.
    Removed,
    /// A raw peer sent a message the room could not take (the cluster's
    /// outbox is full while Redis is unreachable): closed with 1013, Try
    /// Again Later, as it has no other way to learn of it.
    Unavailable,
}

/// A message as queued for a peer. The `Arc` keeps queue slots one pointer
/// wide, which keeps every peer's queue allocation small; the payload inside
/// is shared `Bytes` either way.
pub type Outgoing = Arc<Message>;

/// What every room of the server is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub send_queue: usize,
    pub ping_interval: Duration,
    pub max_message_bytes: usize,
    pub history: memory::Limits,
    pub history_on_join: usize,
    /// Whether `hubbub.v1` message envelopes carry `from` (tokens or the
    /// API are on); without them no sender is ever verified, and envelopes
    /// stay as they were.
    pub stamp_from: bool,
    pub presence_members_max: usize,
}

/// Presence notices go out at most this often per room; changes in between
/// are folded into the next one.
const PRESENCE_EVERY: Duration = Duration::from_secs(1);

/// How many messages the room takes off its channel per wake-up.
const BATCH: usize = 64;

/// Messages waiting for the room, from all its peers together; a generous
/// size keeps bursts from many peers from making readers wait.
const INBOUND: usize = 4096;

/// A peer's place in a room, from its join until it is dropped.
///
/// Dropping it is how a peer leaves: however its session ends (closed,
/// aborted at the end of the shutdown grace, or unwinding from a panic), the
/// room hears of it, so no registry entry is left behind.
pub struct Membership {
    /// Messages to write to this peer, in room order; also says when the
    /// room kicks the peer or stops.
    pub outbound: queue::Receiver,
    /// The room, to send it this peer's messages.
    pub room: RoomHandle,
    /// What the peer's frames look like on the way out.
    pub mode: Mode,
    id: PeerId,
    /// When the peer's token expires, if it joined with one: the session
    /// closes it then with 4001.
    pub expires: Option<std::time::SystemTime>,
}

impl Membership {
    /// The peer's id in its room.
    pub fn id(&self) -> PeerId {
        self.id
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // The room may already be gone (shutdown); then there is nobody to tell.
        let _ = self.room.members.send(Member::Leave { id: self.id });
    }
}

/// Peers coming and going. A channel of their own, unbounded because each
/// peer sends exactly two (one join, one leave), so it holds at most twice
/// the number of connections, and because a leave must be sendable from a
/// destructor, which cannot wait for room in a bounded channel. Joins and
/// leaves share it so the room always sees a peer's join before its leave.
pub(crate) enum Member {
    Join {
        id: PeerId,
        outbound: queue::Sender,
        mode: Mode,
        resume: Option<Resume>,
        identity: Option<Arc<Identity>>,
    },
    Leave {
        id: PeerId,
    },
}

/// What a room's peers send it, in one channel so it keeps their order.
pub(crate) enum Inbound {
    /// A message from peer `from` for every peer.
    Message { from: PeerId, message: Message },
    /// The peer broke a rule and is leaving: once every message it sent
    /// before has gone out, close its queue (it delivers what is queued,
    /// its own copies included, then ends).
    Flush(PeerId),
    /// A request of the HTTP API.
    Api(ApiRequest),
}

/// What the HTTP API asks of a room. Answered once the room's log is
/// ready (a room of a cluster first loads from Redis).
pub enum ApiRequest {
    /// Publish a message like any peer's; answered with where it went.
    Publish {
        message: Message,
        from: Option<Arc<Identity>>,
        reply: oneshot::Sender<Result<Published, RoomClosed>>,
    },
    /// The history after `since` (or the most recent), at most `limit`.
    History {
        since: Option<crate::log::Offset>,
        limit: usize,
        reply: oneshot::Sender<History>,
    },
    /// Close every connection of user `id` in this room with 4003.
    Remove {
        id: String,
        reply: oneshot::Sender<usize>,
    },
}

/// Where the API hears where its message went.
type PublishReply = oneshot::Sender<Result<Published, RoomClosed>>;

/// Where a published message went.
#[derive(Debug, Clone)]
pub struct Published {
    pub epoch: String,
    pub offset: crate::log::Offset,
}

/// A room's history as the API reads it.
pub struct History {
    pub epoch: String,
    pub latest: crate::log::Offset,
    /// Whether `entries` are every message after `since` (always true
    /// without `since`).
    pub complete: bool,
    pub entries: Vec<Entry>,
}

/// Cheap, cloneable handle for talking to a room.
#[derive(Clone)]
pub struct RoomHandle {
    messages: mpsc::Sender<Inbound>,
    members: mpsc::UnboundedSender<Member>,
    send_queue: usize,
    online: Arc<std::sync::atomic::AtomicUsize>,
}

/// The room has stopped (the server is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the room has stopped")]
pub struct RoomClosed;

/// A message on its way to the room, when the room was too far behind to
/// take it at once. Boxed: it exists only while the room is behind, and an
/// idle peer should not carry room for it.
pub type Handoff<'a> = Pin<Box<dyn Future<Output = Result<(), RoomClosed>> + Send + 'a>>;

impl RoomHandle {
    /// Registers a peer. From the moment this returns, the peer receives
    /// every message the room takes after it: for a `hubbub.v1` peer,
    /// `hello` and the history it asked for come first.
    pub fn join(
        &self,
        id: PeerId,
        mode: Mode,
        resume: Option<Resume>,
        identity: Option<Arc<Identity>>,
    ) -> Result<Membership, RoomClosed> {
        let (outbound_tx, outbound) = queue::bounded(self.send_queue);
        self.members
            .send(Member::Join {
                id,
                outbound: outbound_tx,
                mode,
                resume,
                identity,
            })
            .map_err(|_| RoomClosed)?;
        Ok(Membership {
            outbound,
            room: self.clone(),
            mode,
            id,
            expires: None,
        })
    }

    /// Whether the room's task is gone (it ended, or panicked).
    pub fn is_closed(&self) -> bool {
        self.members.is_closed()
    }

    /// Offers a message for every peer. `Ok(None)`: the room has it.
    /// `Ok(Some(handoff))`: the room is behind; the message goes in when the
    /// returned future completes, and the caller should not read more from
    /// its peer until then (which pushes back on the sender rather than
    /// growing memory) but keep writing to it.
    pub fn broadcast(
        &self,
        from: PeerId,
        message: Message,
    ) -> Result<Option<Handoff<'_>>, RoomClosed> {
        self.offer(Inbound::Message { from, message })
    }

    /// Asks the room to let go of peer `id` once everything it sent before
    /// has gone out (see [`Inbound::Flush`]); handed over like a message.
    pub fn flush(&self, id: PeerId) -> Result<Option<Handoff<'_>>, RoomClosed> {
        self.offer(Inbound::Flush(id))
    }

    /// Hands the room a request of the HTTP API, waiting for room in its
    /// channel if it is behind.
    pub async fn api(&self, request: ApiRequest) -> Result<(), RoomClosed> {
        self.messages
            .send(Inbound::Api(request))
            .await
            .map_err(|_| RoomClosed)
    }

    /// Peers of the room (on every node), as it last counted them.
    pub fn online(&self) -> usize {
        self.online.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn offer(&self, inbound: Inbound) -> Result<Option<Handoff<'_>>, RoomClosed> {
        match self.messages.try_send(inbound) {
            Ok(()) => Ok(None),
            Err(TrySendError::Closed(_)) => Err(RoomClosed),
            Err(TrySendError::Full(inbound)) => Ok(Some(Box::pin(async move {
                self.messages.send(inbound).await.map_err(|_| RoomClosed)
            }))),
        }
    }
}

/// The channels a room task reads.
pub(crate) struct Inbox {
    pub messages: mpsc::Receiver<Inbound>,
    pub members: mpsc::UnboundedReceiver<Member>,
    /// Where the room keeps its count of peers for [`RoomHandle::online`].
    pub online: Arc<std::sync::atomic::AtomicUsize>,
}

/// A new room's handle and inbox; the task is started with [`Room::run`].
pub(crate) fn channels(send_queue: usize, inbound: usize) -> (RoomHandle, Inbox) {
    let (messages, messages_rx) = mpsc::channel(inbound);
    let (members, members_rx) = mpsc::unbounded_channel();
    let online = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handle = RoomHandle {
        messages,
        members,
        send_queue,
        online: online.clone(),
    };
    let inbox = Inbox {
        messages: messages_rx,
        members: members_rx,
        online,
    };
    (handle, inbox)
}

/// A new room's handle and inbox with the server's inbound channel size.
pub(crate) fn new_channels(send_queue: usize) -> (RoomHandle, Inbox) {
    channels(send_queue, INBOUND)
}

struct Peer {
    queue: queue::Sender,
    mode: Mode,
    /// Who it is, when its token was verified: stamped on its messages.
    identity: Option<Arc<Identity>>,
}

/// When the next presence notice may go out, and whether one is owed.
struct Presence {
    /// The count the peers were last told.
    told: usize,
    /// The members they were last told.
    told_members: Option<Vec<Arc<Identity>>>,
    next_at: Instant,
    owed: bool,
}

/// What ends a room task's life: the server stopping, or the room having
/// neither peers nor history. For the latter, [`Retire::retire`] decides
/// under the registry's lock, so a join on its way is never lost.
pub(crate) trait Retire: Send + Sync {
    /// Removes the room from the registry unless a member message is
    /// already waiting in `members` (a join that came in meanwhile), which
    /// it returns instead.
    fn retire(&self, name: &str, members: &mut mpsc::UnboundedReceiver<Member>) -> Option<Member>;
}

/// A join that waits for the log to be ready (see [`RoomLog::ready`]).
struct Waiting {
    id: PeerId,
    queue: queue::Sender,
    mode: Mode,
    resume: Option<Resume>,
    identity: Option<Arc<Identity>>,
}

/// A peer that broke a rule and is to be let go once the room's messages
/// it sent before have come back from the log (see [`RoomLog::in_flight`]).
struct Flush {
    id: PeerId,
    mark: u64,
    since: Instant,
}

/// How long a flush waits for its messages to come back before the peer is
/// let go anyway (the log may be unreachable).
const FLUSH_WAIT: Duration = Duration::from_secs(5);

pub(crate) struct Room<L> {
    name: Arc<str>,
    peers: HashMap<PeerId, Peer>,
    /// Joins that wait for the log to be ready.
    waiting: Vec<Waiting>,
    /// API requests that wait for the log to be ready.
    api_waiting: Vec<ApiRequest>,
    /// API publishes on their way to be ordered, by their number.
    publishing: Vec<(u64, Instant, PublishReply)>,
    online_gauge: Arc<std::sync::atomic::AtomicUsize>,
    flushes: Vec<Flush>,
    /// How many of `peers` speak `hubbub.v1`: envelopes are encoded only
    /// when somebody will read them.
    v1_peers: usize,
    log: L,
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    presence: Presence,
}

impl<L: RoomLog> Room<L> {
    pub fn new(name: Arc<str>, log: L, settings: Arc<Settings>, metrics: Arc<Metrics>) -> Self {
        Room {
            name,
            peers: HashMap::new(),
            waiting: Vec::new(),
            api_waiting: Vec::new(),
            publishing: Vec::new(),
            online_gauge: Arc::default(),
            flushes: Vec::new(),
            v1_peers: 0,
            log,
            settings,
            metrics,
            presence: Presence {
                told: 0,
                told_members: None,
                next_at: Instant::now(),
                owed: false,
            },
        }
    }

    /// Runs the room until the server stops or the room has nobody and
    /// nothing left. On shutdown it delivers every message it has already
    /// accepted, then drops all peers' queues, which tells each connection
    /// to finish writing and close with 1001.
    pub async fn run(mut self, inbox: Inbox, retire: Arc<dyn Retire>, shutdown: CancellationToken) {
        let Inbox {
            mut messages,
            mut members,
            online,
        } = inbox;
        self.online_gauge = online;
        // Grows to what the room's traffic needs: a quiet room, which may
        // be most of them, keeps no room for 64 messages.
        let mut batch = Vec::new();
        let stop = shutdown.cancelled();
        tokio::pin!(stop);
        let ping_interval = self.settings.ping_interval;
        let mut heartbeat = time::interval_at(Instant::now() + ping_interval, ping_interval);
        // A late beat is not made up for with a burst of pings.
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // One timer each for presence and history expiry, moved only when
        // their deadline passes, never per message.
        let presence_timer = time::sleep(Duration::ZERO);
        tokio::pin!(presence_timer);
        let expiry_timer = time::sleep(Duration::ZERO);
        tokio::pin!(expiry_timer);
        let mut expiry_armed = false;
        // Entries ordered elsewhere; a log that orders by itself has none.
        let mut feed = self.log.feed();
        loop {
            if !expiry_armed {
                if let Some(at) = self.log.expires_at() {
                    expiry_timer.as_mut().reset(at);
                    expiry_armed = true;
                }
            }
            if self.presence.owed && presence_timer.deadline() != self.presence.next_at {
                presence_timer.as_mut().reset(self.presence.next_at);
            }
            tokio::select! {
                _ = heartbeat.tick() => {
                    for peer in self.peers.values() {
                        peer.queue.ping();
                    }
                    self.release_flushes();
                    self.published(&[]);
                }
                Some(event) = next_event(&mut feed) => {
                    let update = self.log.receive(event, Instant::now());
                    self.update(update);
                }
                Some(member) = members.recv() => self.member(member),
                n = messages.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.members_so_far(&mut members);
                    let (at, now) = (SystemTime::now(), Instant::now());
                    for inbound in batch.drain(..) {
                        self.inbound(inbound, at, now);
                    }
                }
                _ = &mut presence_timer, if self.presence.owed => self.tell_presence(),
                _ = &mut expiry_timer, if expiry_armed => {
                    expiry_armed = false;
                    if self.log.expires_at().is_some_and(|at| at <= Instant::now()) {
                        debug!(room = %self.name, "history expired");
                        self.log.clear();
                    }
                }
                _ = &mut stop => {
                    // Refuse anything new, but deliver what is already queued.
                    members.close();
                    messages.close();
                    self.members_so_far(&mut members);
                    let (at, now) = (SystemTime::now(), Instant::now());
                    while let Some(inbound) = messages.recv().await {
                        self.inbound(inbound, at, now);
                    }
                    // Joins still waiting for a shared log get nothing more.
                    self.waiting.clear();
                    break;
                }
            }
            if self.peers.is_empty()
                && self.waiting.is_empty()
                && self.api_waiting.is_empty()
                && self.publishing.is_empty()
                && self.log.is_empty()
            {
                match retire.retire(&self.name, &mut members) {
                    Some(member) => self.member(member),
                    None => break,
                }
            }
        }
        debug!(room = %self.name, peers = self.peers.len(), "room ended");
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
            Member::Join {
                id,
                outbound,
                mode,
                resume,
                identity,
            } => self.join(id, outbound, mode, resume, identity),
            Member::Leave { id } => {
                if let Some(peer) = self.peers.remove(&id) {
                    self.forget(&peer);
                } else {
                    self.waiting.retain(|w| w.id != id);
                }
            }
        }
    }

    fn join(
        &mut self,
        id: PeerId,
        queue: queue::Sender,
        mode: Mode,
        resume: Option<Resume>,
        identity: Option<Arc<Identity>>,
    ) {
        if !self.log.ready() {
            self.waiting.push(Waiting {
                id,
                queue,
                mode,
                resume,
                identity,
            });
            return;
        }
        if mode == Mode::V1 {
            let epoch = self.log.epoch().to_string();
            let latest = self.log.latest();
            let online = self.online() + 1;
            let resume = resume.as_ref().map(|r| (r.since, r.epoch.as_str()));
            let replay = self.log.replay(resume, self.settings.history_on_join);
            queue.push_initial(protocol::hello(
                &self.name,
                &epoch,
                latest,
                online,
                self.settings.max_message_bytes,
                replay.recovered,
                identity.as_deref(),
            ));
            for entry in replay.entries {
                queue.push_initial(protocol::envelope_of(entry, self.settings.stamp_from));
            }
            self.v1_peers += 1;
        }
        let peer = Peer {
            queue,
            mode,
            identity,
        };
        if let Some(old) = self.peers.insert(id, peer) {
            self.forget(&old);
        }
        self.presence_changed();
    }

    fn api(&mut self, request: ApiRequest, at: SystemTime, now: Instant) {
        match request {
            ApiRequest::Publish {
                message,
                from,
                reply,
            } => match self.log.append(Arc::new(message), from, at, now) {
                Append::Ordered(entry) => {
                    let _ = reply.send(Ok(Published {
                        epoch: self.log.epoch().to_string(),
                        offset: entry.offset,
                    }));
                    self.deliver(entry);
                }
                Append::Sent(Some(seq)) => self.publishing.push((seq, now, reply)),
                // Held back or refused: the caller hears it was not taken.
                Append::Sent(None) | Append::Refused => {
                    self.metrics.unavailable();
                    let _ = reply.send(Err(RoomClosed));
                }
            },
            ApiRequest::History {
                since,
                limit,
                reply,
            } => {
                let epoch = self.log.epoch().to_string();
                let latest = self.log.latest();
                let (complete, entries) = match since.map(|s| self.log.after(s)) {
                    Some(Some(entries)) => (true, entries),
                    Some(None) => (false, self.log.recent(limit)),
                    None => (true, self.log.recent(limit)),
                };
                let entries = entries.into_iter().take(limit).map(|e| e.clone()).collect();
                let _ = reply.send(History {
                    epoch,
                    latest,
                    complete,
                    entries,
                });
            }
            ApiRequest::Remove { id, reply } => {
                let removed = self.remove_user(&id);
                let _ = reply.send(removed);
            }
        }
    }

    /// Closes every connection of user `id` here with 4003; how many.
    fn remove_user(&mut self, id: &str) -> usize {
        let removed: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.identity.as_ref().is_some_and(|i| i.id == id))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in &removed {
            if let Some(peer) = self.peers.remove(pid) {
                self.forget(&peer);
                peer.queue.kick(Kick::Removed);
            }
        }
        removed.len()
    }

    /// Answers the API publishes that came back ordered (and gives up on
    /// those that did not within [`FLUSH_WAIT`]).
    fn published(&mut self, own: &[(u64, crate::log::Offset)]) {
        if self.publishing.is_empty() {
            return;
        }
        let epoch = self.log.epoch().to_string();
        for (seq, since, reply) in std::mem::take(&mut self.publishing) {
            if let Some((_, offset)) = own.iter().find(|(s, _)| *s == seq) {
                let _ = reply.send(Ok(Published {
                    epoch: epoch.clone(),
                    offset: *offset,
                }));
            } else if since.elapsed() < FLUSH_WAIT {
                self.publishing.push((seq, since, reply));
            }
            // Otherwise dropped: the caller hears it was not ordered in time.
        }
    }

    /// Bookkeeping for a peer that is no longer in `peers`.
    fn forget(&mut self, peer: &Peer) {
        if peer.mode == Mode::V1 {
            self.v1_peers -= 1;
        }
        self.presence_changed();
    }

    fn inbound(&mut self, inbound: Inbound, at: SystemTime, now: Instant) {
        match inbound {
            Inbound::Message { from, message } => self.publish(from, message, at, now),
            Inbound::Api(request) => {
                if self.log.ready() {
                    self.api(request, at, now);
                } else {
                    self.api_waiting.push(request);
                }
            }
            Inbound::Flush(id) => match self.log.in_flight() {
                // Its messages are still being ordered: let go of it once
                // they are back and delivered.
                Some(mark) => self.flushes.push(Flush {
                    id,
                    mark,
                    since: Instant::now(),
                }),
                None => self.let_go(id),
            },
        }
    }

    /// Drops a peer's queue sender, which lets it drain, then end.
    fn let_go(&mut self, id: PeerId) {
        if let Some(peer) = self.peers.remove(&id) {
            self.forget(&peer);
        }
        self.waiting.retain(|w| w.id != id);
    }

    /// Lets go of the flushed peers whose messages are back, or that waited
    /// long enough.
    fn release_flushes(&mut self) {
        if self.flushes.is_empty() {
            return;
        }
        let mut flushes = std::mem::take(&mut self.flushes);
        flushes.retain(|f| {
            if self.log.settled(f.mark) || f.since.elapsed() >= FLUSH_WAIT {
                self.let_go(f.id);
                false
            } else {
                true
            }
        });
        self.flushes = flushes;
    }

    /// The verified users in the room, each once, by id: only where
    /// senders can be verified at all, and only up to
    /// `presence_members_max` peers (above it, the count alone).
    fn members(&self, local: Option<Vec<Arc<Identity>>>) -> Option<Vec<Arc<Identity>>> {
        if self.online() > self.settings.presence_members_max {
            return None;
        }
        let mut by_id: std::collections::BTreeMap<String, Arc<Identity>> = Default::default();
        for identity in local?
            .into_iter()
            .chain(self.log.others_members().iter().cloned())
        {
            by_id.entry(identity.id.clone()).or_insert(identity);
        }
        Some(by_id.into_values().collect())
    }

    /// The verified users among this node's peers, each once (`None`
    /// where no sender is ever verified).
    fn local_members(&self) -> Option<Vec<Arc<Identity>>> {
        if !self.settings.stamp_from {
            return None;
        }
        let mut by_id: std::collections::BTreeMap<&str, &Arc<Identity>> = Default::default();
        for identity in self.peers.values().filter_map(|p| p.identity.as_ref()) {
            by_id.entry(&identity.id).or_insert(identity);
        }
        Some(by_id.into_values().cloned().collect())
    }

    /// Peers of the room here and on other nodes.
    fn online(&self) -> usize {
        self.peers.len() + self.log.others_online()
    }

    fn publish(&mut self, from: PeerId, message: Message, at: SystemTime, now: Instant) {
        let identity = self.peers.get(&from).and_then(|p| p.identity.clone());
        match self.log.append(Arc::new(message), identity, at, now) {
            Append::Ordered(entry) => self.deliver(entry),
            Append::Sent(_) => {}
            Append::Refused => self.unavailable(from),
        }
    }

    /// Tells a sender its message was not taken: a `hubbub.v1` peer by an
    /// `error` envelope, a raw peer by closing it with 1013.
    fn unavailable(&mut self, from: PeerId) {
        self.metrics.unavailable();
        let Some(peer) = self.peers.get(&from) else {
            return;
        };
        if peer.mode == Mode::V1 {
            let _ = peer.queue.push(protocol::error(
                "unavailable",
                "the cluster cannot take messages right now; this one was not relayed, try again later",
            ));
        } else if let Some(peer) = self.peers.remove(&from) {
            self.forget(&peer);
            peer.queue.kick(Kick::Unavailable);
        }
    }

    /// Applies what the log took from its feed.
    fn update(&mut self, update: Update) {
        if update.new_epoch && self.v1_peers > 0 {
            let epoch = self.log.epoch().to_string();
            let latest = update
                .entries
                .first()
                .map_or(self.log.latest(), |e| e.offset.saturating_sub(1));
            let hello = protocol::hello(
                &self.name,
                &epoch,
                latest,
                self.online(),
                self.settings.max_message_bytes,
                None,
                None,
            );
            for peer in self.peers.values().filter(|p| p.mode == Mode::V1) {
                let _ = peer.queue.push(hello.clone());
            }
        }
        if update.ready || self.log.ready() {
            for w in std::mem::take(&mut self.waiting) {
                self.join(w.id, w.queue, w.mode, w.resume, w.identity);
            }
        }
        if self.log.ready() && !self.api_waiting.is_empty() {
            let (at, now) = (SystemTime::now(), Instant::now());
            for request in std::mem::take(&mut self.api_waiting) {
                self.api(request, at, now);
            }
        }
        for entry in update.entries {
            self.deliver(entry);
        }
        self.published(&update.own);
        for user in &update.remove {
            self.remove_user(user);
        }
        if update.online_changed {
            self.presence_changed();
        }
        self.release_flushes();
    }

    /// Hands an ordered message to every peer.
    fn deliver(&mut self, entry: Entry) {
        let raw = entry.message.clone();
        let envelope = (self.v1_peers > 0).then(|| {
            let envelope = protocol::message(&entry, self.settings.stamp_from);
            if let Some(kept) = self.log.get_mut(entry.offset) {
                kept.envelope = Some(envelope.clone());
            }
            envelope
        });
        let mut kicked: Vec<PeerId> = Vec::new();
        for (id, peer) in &self.peers {
            let frame = match (&envelope, peer.mode) {
                (Some(envelope), Mode::V1) => envelope.clone(),
                _ => raw.clone(),
            };
            if peer.queue.push(frame).is_err() {
                kicked.push(*id);
            }
        }
        for id in kicked {
            if let Some(peer) = self.peers.remove(&id) {
                warn!(room = %self.name, peer = id, "send queue full, disconnecting slow consumer");
                self.metrics.slow_consumer_disconnect();
                self.forget(&peer);
                peer.queue.kick(Kick::SlowConsumer);
            }
        }
    }

    /// The count changed: tell the `hubbub.v1` peers now, or once a second
    /// has passed since the last notice.
    fn presence_changed(&mut self) {
        self.online_gauge
            .store(self.online(), std::sync::atomic::Ordering::Relaxed);
        if Instant::now() >= self.presence.next_at {
            self.tell_presence();
        } else {
            self.presence.owed = true;
        }
    }

    fn tell_presence(&mut self) {
        self.presence.owed = false;
        let local = self
            .local_members()
            .filter(|m| m.len() <= self.settings.presence_members_max);
        self.log.set_local(self.peers.len(), local.as_deref());
        let online = self.online();
        let members = self.members(local);
        if online == self.presence.told && members == self.presence.told_members {
            return;
        }
        self.presence.told = online;
        self.presence.next_at = Instant::now() + PRESENCE_EVERY;
        let notice = (self.v1_peers > 0).then(|| protocol::presence(online, members.as_deref()));
        self.presence.told_members = members;
        let Some(notice) = notice else {
            return;
        };
        for peer in self.peers.values().filter(|p| p.mode == Mode::V1) {
            // A notice is not worth a slow-consumer kick: a full queue will
            // get the next one.
            let _ = peer.queue.push(notice.clone());
        }
    }
}

/// The next event of a feed, or never when there is none.
async fn next_event<E>(feed: &mut Option<mpsc::UnboundedReceiver<E>>) -> Option<E> {
    match feed {
        Some(feed) => feed.recv().await,
        None => std::future::pending().await,
    }
}

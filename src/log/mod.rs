//! A room's ordered log: what decides each message's offset, and the
//! history that joins and resumes replay.
//!
//! The room task owns its log and goes through [`RoomLog`] only: append a
//! message and learn its offset, read what follows an offset, the epoch.
//! Offsets and epochs are the protocol's own (contiguous integers from 1 per
//! epoch, a string epoch), never positions in a local buffer, so a log kept
//! elsewhere (shared by several nodes) can stand behind the same interface.
//! [`memory::MemoryLog`] is the one this process keeps by itself and
//! orders at once; [`redis::RedisLog`] hands each message to Redis, where
//! every node's messages for the room are put in one order, and gets the
//! ordered entries back through its feed.

pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::auth::Identity;
use crate::room::Outgoing;

/// A message's place in its room: 1, 2, 3, ... within one epoch.
pub type Offset = u64;

/// One message as the log keeps it. Cloning it copies two pointers.
#[derive(Clone)]
pub struct Entry {
    pub offset: Offset,
    /// Server time the room took it, milliseconds since the Unix epoch.
    pub ts: u64,
    /// The message as received, shared with every raw peer.
    pub message: Outgoing,
    /// Its `hubbub.v1` envelope, encoded the first time a peer needs it and
    /// shared by every `hubbub.v1` peer from then on.
    pub envelope: Option<Outgoing>,
    /// Its verified sender; `None` for an anonymous one.
    pub from: Option<Arc<Identity>>,
}

impl Entry {
    pub fn new(offset: Offset, ts: u64, message: Outgoing) -> Entry {
        Entry {
            offset,
            ts,
            message,
            envelope: None,
            from: None,
        }
    }

    /// The same entry, from a verified sender.
    pub fn with_from(mut self, from: Option<Arc<Identity>>) -> Entry {
        self.from = from;
        self
    }

    /// Payload bytes, which is what `history_bytes` counts.
    pub fn payload_len(&self) -> usize {
        self.message.len()
    }
}

/// What a join or resume gets from the log.
pub struct Replay<'a> {
    /// `Some(true)`: every message after the client's offset follows.
    /// `Some(false)`: it asked to resume but they are not all there.
    /// `None`: it did not ask.
    pub recovered: Option<bool>,
    pub entries: Vec<&'a mut Entry>,
}

/// What became of a message handed to the log.
pub enum Append {
    /// Ordered at once (the memory log): deliver it now.
    Ordered(Entry),
    /// On its way to be ordered elsewhere; it comes back through the feed,
    /// like everyone else's. Its number, to know it when it is back (see
    /// [`Update::own`]); `None` while the log holds it back.
    Sent(Option<u64>),
    /// Cannot be taken now (the cluster's outbox is full): the sender is
    /// told, nobody gets it.
    Refused,
}

/// What the room does after the log took something from its feed.
#[derive(Default)]
pub struct Update {
    /// The room's epoch changed under it (its history was lost): the
    /// `hubbub.v1` peers get a new `hello` before `entries`.
    pub new_epoch: bool,
    /// The log is now ready to answer joins (see [`RoomLog::ready`]).
    pub ready: bool,
    /// Newly ordered messages, in order, for every peer.
    pub entries: Vec<Entry>,
    /// The count of peers on other nodes changed.
    pub online_changed: bool,
    /// Messages of this room's own that came back among `entries`: their
    /// number (from [`Append::Sent`]) and the offset they got.
    pub own: Vec<(u64, Offset)>,
    /// Users removed from the room through the API of another node.
    pub remove: Vec<String>,
}

/// The interface a room uses to order and remember its messages.
pub trait RoomLog: Send {
    /// What arrives on the feed (see [`RoomLog::feed`]).
    type Event: Send + 'static;

    /// The current epoch: changes whenever the history starts over.
    fn epoch(&self) -> &str;

    /// The latest offset given out in this epoch (0 before the first).
    fn latest(&self) -> Offset;

    /// Takes a message to be ordered. A log that orders at once gives it
    /// the next offset and remembers it, within the history bounds.
    fn append(
        &mut self,
        message: Outgoing,
        from: Option<Arc<Identity>>,
        at: SystemTime,
        now: Instant,
    ) -> Append;

    /// Where entries ordered elsewhere arrive, taken once by the room task;
    /// `None` for a log that orders everything itself.
    fn feed(&mut self) -> Option<mpsc::UnboundedReceiver<Self::Event>> {
        None
    }

    /// Takes one event from the feed.
    fn receive(&mut self, _event: Self::Event, _now: Instant) -> Update {
        Update::default()
    }

    /// Whether joins can be answered now. A shared log first loads the
    /// room's epoch and history; joins wait until then.
    fn ready(&self) -> bool {
        true
    }

    /// Peers of the room on other nodes.
    fn others_online(&self) -> usize {
        0
    }

    /// Tells the log who the room has here (other nodes count them):
    /// the number of peers and the verified members.
    fn set_local(&mut self, _peers: usize, _members: Option<&[Arc<Identity>]>) {}

    /// Verified members of the room on other nodes.
    fn others_members(&self) -> &[Arc<Identity>] {
        &[]
    }

    /// The last message this room sent to be ordered that has not come back
    /// yet, as a number that [`RoomLog::settled`] understands; `None` when
    /// nothing is on its way.
    fn in_flight(&self) -> Option<u64> {
        None
    }

    /// Whether the message [`RoomLog::in_flight`] named has come back (or is
    /// known to be lost).
    fn settled(&self, _mark: u64) -> bool {
        true
    }

    /// A remembered message, to store its envelope once it is encoded.
    fn get_mut(&mut self, offset: Offset) -> Option<&mut Entry>;

    /// Every remembered message after `after`, or `None` when the log no
    /// longer holds all of them (or `after` is beyond the latest).
    fn after(&mut self, after: Offset) -> Option<Vec<&mut Entry>>;

    /// The `n` most recent remembered messages, oldest first.
    fn recent(&mut self, n: usize) -> Vec<&mut Entry>;

    /// When the history is to be dropped (its last message is older than
    /// `history_ttl` by then); `None` when it holds nothing.
    fn expires_at(&self) -> Option<Instant>;

    /// Drops the whole history (it expired). Offsets go on from where they
    /// were: the epoch is the same, the messages are just no longer there.
    fn clear(&mut self);

    /// Whether it keeps nothing that would be lost with the room task: a
    /// room ends when it has no peers and its log is empty.
    fn is_empty(&self) -> bool;

    /// What a join gets: the messages after the client's offset when they
    /// are all there and the epoch is this one, the recent history otherwise.
    fn replay(&mut self, resume: Option<(Offset, &str)>, recent: usize) -> Replay<'_> {
        let Some((since, epoch)) = resume else {
            return Replay {
                recovered: None,
                entries: self.recent(recent),
            };
        };
        if epoch == self.epoch() {
            // Two calls because the borrow checker cannot see that the
            // first borrow ends when it returns `None`.
            if self.after(since).is_some() {
                let entries = self.after(since).unwrap_or_default();
                return Replay {
                    recovered: Some(true),
                    entries,
                };
            }
        }
        Replay {
            recovered: Some(false),
            entries: self.recent(recent),
        }
    }
}

/// Milliseconds since the Unix epoch, for `ts`.
pub fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

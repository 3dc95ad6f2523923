//! The room log kept in Redis, shared by every node (see [`crate::cluster`]).
//!
//! A message a peer sends goes to the node's outbox and is ordered by Redis;
//! the room delivers it when it comes back through the feed, with every
//! other node's messages, in Redis's order. The log keeps a copy of the
//! room's recent history (a [`MemoryLog`] used as a cache, filled from
//! Redis when the room starts on this node and by every entry since), so
//! joins and resumes are answered without a round trip, and exactly as
//! another node would answer them.
//!
//! The log checks what comes back: an entry of another epoch, or one that
//! skips an offset, makes it load the room again (the entries it missed, or
//! the new epoch); while it loads, entries wait. So every peer gets every
//! offset once and in order, or, when Redis itself no longer has them, a
//! gap the offsets show.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::memory::MemoryLog;
use super::{Append, Entry, Offset, RoomLog, Update};
use crate::auth::Identity;
use crate::cluster::scripts::Loaded;
use crate::cluster::{Cluster, Event, Link, Live};
use crate::room::Outgoing;

pub struct RedisLog {
    cache: MemoryLog,
    link: Link,
    feed: Option<mpsc::UnboundedReceiver<Event>>,
    /// The first load has come back: joins can be answered.
    ready: bool,
    /// A load is on its way; entries wait in `waiting` until it is back.
    loading: bool,
    /// Loaded for the first time, but the joins that waited are not in yet:
    /// entries wait until [`Event::Release`].
    holding: bool,
    waiting: Vec<Live>,
    /// Messages sent before the first load: they go to Redis once it is
    /// back, so they are ordered after the history every waiting join gets,
    /// and a raw sender that joined just now sees its own message.
    held: Vec<(Outgoing, Option<Arc<Identity>>)>,
    others: usize,
    others_members: Vec<Arc<Identity>>,
    /// The number of the last message this room put in the outbox, and the
    /// highest of its own that came back.
    sent: Option<u64>,
    back: u64,
    /// The latest offset Redis reported at the previous check: a room that
    /// has not reached it a check later missed entries.
    expected: Option<Offset>,
}

impl RedisLog {
    /// The log of room `room` on this node; starts loading it at once.
    pub fn new(cluster: &Arc<Cluster>, room: Arc<str>) -> RedisLog {
        let (link, feed) = cluster.link(room.clone());
        cluster.load(room, None, link.feed.clone());
        RedisLog {
            cache: MemoryLog::new(cluster.history()),
            link,
            feed: Some(feed),
            ready: false,
            loading: true,
            holding: false,
            waiting: Vec::new(),
            held: Vec::new(),
            others: 0,
            others_members: Vec::new(),
            sent: None,
            back: 0,
            expected: None,
        }
    }

    /// Loads the room again: what follows `known` in its epoch, or the
    /// room as it is now.
    fn reload(&mut self, known: Option<(String, Offset)>) {
        if self.loading {
            return;
        }
        self.loading = true;
        self.expected = None;
        let cluster = self.link.cluster.clone();
        cluster.load(self.link.room.clone(), known, self.link.feed.clone());
    }

    /// One entry read back. `gaps_allowed`: right after a load, a gap that
    /// the load did not fill cannot be filled, and is delivered as it is.
    fn take_live(&mut self, live: Live, now: Instant, gaps_allowed: bool, out: &mut Update) {
        if self.loading || self.holding {
            self.waiting.push(live);
            return;
        }
        if live.epoch != self.cache.epoch() {
            if gaps_allowed {
                // An entry of an epoch the load did not find: from before it.
                return;
            }
            self.waiting.push(live);
            self.reload(None);
            return;
        }
        let latest = self.cache.latest();
        let offset = live.entry.offset;
        if offset <= latest {
            return;
        }
        if offset > latest + 1 {
            if !gaps_allowed {
                let known = (self.cache.epoch().to_string(), latest);
                self.waiting.push(live);
                self.reload(Some(known));
                return;
            }
            warn!(room = %self.link.room, from = latest + 1, to = offset - 1, "messages lost: Redis no longer has them");
        }
        if let Some(seq) = live.own {
            out.own.push((seq, offset));
        }
        self.keep(live.entry, now, out);
    }

    fn keep(&mut self, entry: Entry, now: Instant, out: &mut Update) {
        self.cache.keep(entry.clone(), now);
        out.entries.push(entry);
    }

    /// The first load: the history every join that waited gets. Entries
    /// that came meanwhile wait for [`Event::Release`].
    fn take_first(&mut self, loaded: Loaded, now: Instant, out: &mut Update) {
        let base = loaded
            .entries
            .first()
            .map_or(loaded.latest, |e| e.offset.saturating_sub(1));
        self.cache.restart(loaded.epoch, base);
        for entry in loaded.entries {
            if entry.offset > self.cache.latest() {
                self.cache.keep(entry, now);
            }
        }
        if loaded.latest > self.cache.latest() {
            self.cache.set_latest(loaded.latest);
        }
        self.ready = true;
        self.holding = true;
        out.ready = true;
        for (message, from) in std::mem::take(&mut self.held) {
            self.send(message, from);
        }
        let _ = self.link.feed.send(Event::Release);
        debug!(room = %self.link.room, epoch = %self.cache.epoch(), latest = self.cache.latest(), "room loaded from Redis");
    }

    /// Puts a message in the outbox: whether it took it.
    fn send(&mut self, message: Outgoing, from: Option<Arc<Identity>>) -> bool {
        match self.link.cluster.publish(&self.link.room, message, from) {
            Some(seq) => {
                self.sent = Some(seq);
                true
            }
            None => false,
        }
    }

    fn take_loaded(&mut self, loaded: Loaded, now: Instant, out: &mut Update) {
        self.loading = false;
        if !self.ready {
            return self.take_first(loaded, now, out);
        }
        if loaded.epoch != self.cache.epoch() || !loaded.after {
            if loaded.epoch != self.cache.epoch() {
                out.new_epoch = true;
                self.link.cluster.metrics().new_epochs.fetch_add(1, Relaxed);
                warn!(room = %self.link.room, epoch = %loaded.epoch, "the room's history was lost in Redis: a new epoch begins");
            }
            if out.new_epoch {
                let base = loaded
                    .entries
                    .first()
                    .map_or(loaded.latest, |e| e.offset.saturating_sub(1));
                self.cache.restart(loaded.epoch.clone(), base);
            }
        }
        for entry in loaded.entries {
            if entry.offset > self.cache.latest() {
                self.keep(entry, now, out);
            }
        }
        for live in std::mem::take(&mut self.waiting) {
            self.take_live(live, now, true, out);
        }
        if loaded.latest > self.cache.latest() && !self.loading {
            // History off, or trimmed: Redis has the offsets but not the
            // messages.
            warn!(room = %self.link.room, from = self.cache.latest() + 1, to = loaded.latest, "messages lost: Redis no longer has them");
            self.cache.set_latest(loaded.latest);
        }
    }

    fn take_check(
        &mut self,
        epoch: String,
        latest: Offset,
        others: (usize, Vec<Arc<Identity>>),
        out: &mut Update,
    ) {
        let (others, members) = others;
        if others != self.others || members != self.others_members {
            self.others = others;
            self.others_members = members;
            out.online_changed = true;
        }
        if self.loading || !self.ready {
            return;
        }
        if epoch != self.cache.epoch() {
            self.reload(None);
            return;
        }
        if let Some(expected) = self.expected {
            if self.cache.latest() < expected {
                warn!(room = %self.link.room, have = self.cache.latest(), redis = expected, "entries did not arrive: loading them");
                let known = (self.cache.epoch().to_string(), self.cache.latest());
                self.reload(Some(known));
                return;
            }
        }
        self.expected = Some(latest);
    }
}

impl RoomLog for RedisLog {
    type Event = Event;

    fn epoch(&self) -> &str {
        self.cache.epoch()
    }

    fn latest(&self) -> Offset {
        self.cache.latest()
    }

    fn append(
        &mut self,
        message: Outgoing,
        from: Option<Arc<Identity>>,
        _at: SystemTime,
        _now: Instant,
    ) -> Append {
        if !self.ready {
            if self.held.len() >= self.link.cluster.outbox_size() {
                return Append::Refused;
            }
            self.held.push((message, from));
            return Append::Sent(None);
        }
        if self.send(message, from) {
            Append::Sent(self.sent)
        } else {
            Append::Refused
        }
    }

    fn feed(&mut self) -> Option<mpsc::UnboundedReceiver<Event>> {
        self.feed.take()
    }

    fn receive(&mut self, event: Event, now: Instant) -> Update {
        let mut out = Update::default();
        match event {
            Event::Live(live) => {
                if let Some(seq) = live.own {
                    self.back = self.back.max(seq);
                }
                self.take_live(live, now, false, &mut out);
            }
            Event::Loaded(loaded) => self.take_loaded(loaded, now, &mut out),
            Event::Remove(user) => out.remove.push(user),
            Event::Release => {
                self.holding = false;
                for live in std::mem::take(&mut self.waiting) {
                    self.take_live(live, now, false, &mut out);
                }
            }
            Event::Checked {
                epoch,
                latest,
                others,
                members,
            } => self.take_check(epoch, latest, (others, members), &mut out),
        }
        out
    }

    fn ready(&self) -> bool {
        self.ready
    }

    fn others_online(&self) -> usize {
        self.others
    }

    fn set_local(&mut self, peers: usize, members: Option<&[Arc<Identity>]>) {
        self.link.local.peers.store(peers, Relaxed);
        let json = match members {
            Some(m) if !m.is_empty() => serde_json::to_string(m).unwrap_or_default(),
            _ => String::new(),
        };
        if let Ok(mut kept) = self.link.local.members.lock() {
            *kept = json;
        }
    }

    fn others_members(&self) -> &[Arc<Identity>] {
        &self.others_members
    }

    fn in_flight(&self) -> Option<u64> {
        self.sent.filter(|&s| s > self.back)
    }

    fn settled(&self, mark: u64) -> bool {
        self.back >= mark
    }

    fn get_mut(&mut self, offset: Offset) -> Option<&mut Entry> {
        self.cache.get_mut(offset)
    }

    fn after(&mut self, after: Offset) -> Option<Vec<&mut Entry>> {
        self.cache.after(after)
    }

    fn recent(&mut self, n: usize) -> Vec<&mut Entry> {
        self.cache.recent(n)
    }

    fn expires_at(&self) -> Option<Instant> {
        self.cache.expires_at()
    }

    fn clear(&mut self) {
        self.cache.clear();
    }

    /// The history lives in Redis: nothing is lost when the room ends here,
    /// once the messages held for the first load are on their way.
    fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

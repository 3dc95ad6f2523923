//! Every room of the server by name: joining one creates it, and a room with
//! neither peers nor history removes itself.
//!
//! A lock rather than a task: the registry is touched once per connection
//! (at the handshake) and once per room's end, never per message, and the
//! handshake needs its answer at once (a join that would create one room
//! more than `max_rooms` is refused with 503 before the 101 goes out).
//! Joining and retiring both happen under the lock, so a room never ends
//! while a join is on its way to it.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error};

use crate::auth::Identity;
use crate::cluster::Cluster;
use crate::log::memory::MemoryLog;
use crate::log::redis::RedisLog;
use crate::log::RoomLog;
use crate::metrics::Metrics;
use crate::protocol::{Mode, Resume};
use crate::room::{self, Member, Membership, PeerId, Retire, Room, RoomHandle, Settings};

/// Why a join was refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("too many rooms; try again later")]
    TooManyRooms,
    #[error("server shutting down")]
    Closed,
}

pub struct Rooms {
    rooms: Mutex<HashMap<Arc<str>, RoomHandle>>,
    max_rooms: usize,
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// The Redis that orders and keeps the rooms, when there are several
    /// nodes; `None`: each room's log is in memory.
    cluster: Option<Arc<Cluster>>,
}

impl Rooms {
    pub fn new(
        max_rooms: usize,
        settings: Settings,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        cluster: Option<Arc<Cluster>>,
    ) -> Arc<Rooms> {
        Arc::new(Rooms {
            rooms: Mutex::new(HashMap::new()),
            max_rooms,
            settings: Arc::new(settings),
            metrics,
            shutdown,
            tracker,
            cluster,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, RoomHandle>> {
        // Nothing panics while holding the lock, but a poisoned map is still
        // a valid map.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins peer `id` to room `name`, creating the room if it does not
    /// exist (or its task is gone).
    pub fn join(
        self: &Arc<Self>,
        name: &str,
        id: PeerId,
        mode: Mode,
        resume: Option<Resume>,
        identity: Option<Arc<Identity>>,
    ) -> Result<Membership, JoinError> {
        // Under the lock, so the room cannot retire between the two.
        let rooms = self.lock();
        let handle = self.get_or_start(rooms, name)?;
        handle
            .join(id, mode, resume, identity)
            .map_err(|_| JoinError::Closed)
    }

    /// Room `name`, started if it does not exist (for the HTTP API: a room
    /// with nobody in it ends again once it has nothing to keep).
    pub fn room(self: &Arc<Self>, name: &str) -> Result<RoomHandle, JoinError> {
        let rooms = self.lock();
        self.get_or_start(rooms, name)
    }

    /// The cluster the rooms are shared through, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Room `name` if it exists.
    pub fn existing(&self, name: &str) -> Option<RoomHandle> {
        self.lock().get(name).filter(|h| !h.is_closed()).cloned()
    }

    /// Every room with its peers, by name.
    pub fn list(&self) -> Vec<(Arc<str>, usize)> {
        let mut out: Vec<(Arc<str>, usize)> = self
            .lock()
            .iter()
            .filter(|(_, h)| !h.is_closed())
            .map(|(name, h)| (name.clone(), h.online()))
            .collect();
        out.sort();
        out
    }

    fn get_or_start(
        self: &Arc<Self>,
        mut rooms: MutexGuard<'_, HashMap<Arc<str>, RoomHandle>>,
        name: &str,
    ) -> Result<RoomHandle, JoinError> {
        if self.shutdown.is_cancelled() {
            return Err(JoinError::Closed);
        }
        Ok(match rooms.get(name) {
            Some(handle) if !handle.is_closed() => handle.clone(),
            existing => {
                if existing.is_none() && rooms.len() >= self.max_rooms {
                    return Err(JoinError::TooManyRooms);
                }
                let handle = self.start(name);
                rooms.insert(name.into(), handle.clone());
                self.metrics.set_rooms(rooms.len());
                handle
            }
        })
    }

    fn start(self: &Arc<Self>, name: &str) -> RoomHandle {
        let name: Arc<str> = name.into();
        match &self.cluster {
            Some(cluster) => self.spawn(name.clone(), RedisLog::new(cluster, name)),
            None => self.spawn(name, MemoryLog::new(self.settings.history)),
        }
    }

    fn spawn<L: RoomLog + 'static>(self: &Arc<Self>, name: Arc<str>, log: L) -> RoomHandle {
        let (handle, inbox) = room::new_channels(self.settings.send_queue);
        let room = Room::new(
            name.clone(),
            log,
            self.settings.clone(),
            self.metrics.clone(),
        );
        let retire: Arc<dyn Retire> = self.clone();
        let run = room.run(inbox, retire, self.shutdown.clone());
        debug!(room = %name, "room created");
        self.tracker.spawn(async move {
            // A room that panics loses its peers (their queues close and they
            // get 1001) but not the server: the next join starts it anew.
            if AssertUnwindSafe(run).catch_unwind().await.is_err() {
                error!(room = %name, "room task panicked; its peers were disconnected");
            }
        });
        handle
    }
}

impl Retire for Rooms {
    fn retire(&self, name: &str, members: &mut mpsc::UnboundedReceiver<Member>) -> Option<Member> {
        let mut rooms = self.lock();
        if let Ok(member) = members.try_recv() {
            return Some(member);
        }
        rooms.remove(name);
        // After a burst of rooms the map would keep room for all of them.
        if rooms.capacity() > 64 && rooms.len() < rooms.capacity() / 4 {
            let keep = rooms.len() * 2;
            rooms.shrink_to(keep);
        }
        self.metrics.set_rooms(rooms.len());
        drop(rooms);
        debug!(room = %name, "room ended: no peers, no history");
        crate::memory::release_freed();
        None
    }
}

//! Several nodes, one chat: the link between this node and the Redis that
//! all nodes share.
//!
//! There is no cluster protocol of hubbub's own. Redis decides each room's
//! order (one Lua script per batch, [`scripts`]) and keeps each room's epoch,
//! offsets and history, so a client can resume on any node. A node delivers
//! to its peers only what it has read back from Redis, so every client on
//! every node sees the same messages with the same offsets.
//!
//! Three tasks per node, each with its own connection, so that a blocking
//! read never holds up a publish (the trap of sharing one multiplexed
//! connection for `XREAD BLOCK`):
//!
//! - the [`publisher`] takes the node's outbox (messages its peers sent,
//!   `outbox_size` at most) in batches and hands each batch to Redis in one
//!   round trip. Through an outage the batch waits and is retried; every
//!   publish carries this node's id and a sequence number, so one whose
//!   reply was lost is not applied twice.
//! - the [`reader`] follows the events stream with `XREAD BLOCK` from the
//!   last entry it saw and hands each entry to the room it belongs to, if
//!   this node hosts it.
//! - the [`watcher`] checks every hosted room once a second: its epoch and
//!   latest offset (a room whose history was lost starts a new epoch; a room
//!   that missed entries loads them), and the peers on other nodes.
//!
//! Each room's side of this is [`crate::log::redis::RedisLog`]. Loads
//! (a room's first join on this node, a gap, a new epoch) run on a fourth
//! connection shared by all rooms, a few at a time.
//!
//! Every command has a deadline ([`RESPONSE_TIMEOUT`]; the blocking read its
//! block time plus that), so a Redis that hangs without closing the
//! connection (`SIGSTOP`) is treated as an outage within
//! [`HUNG_DETECTED_WITHIN`].

pub mod publisher;
pub mod reader;
pub mod scripts;
pub mod watcher;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::Identity;
use crate::config::Config;
use crate::log::memory::{self, Limits};
use crate::log::{Entry, Offset};
use crate::metrics::Metrics;
use crate::room::Outgoing;
use scripts::{Loaded, Scripts};

/// Deadline of every Redis command but the blocking read.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one blocking read waits for new entries.
pub const BLOCK: Duration = Duration::from_secs(1);

/// How often the watcher checks the hosted rooms.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A Redis that stops answering is an outage after at most this long: the
/// blocking read's deadline (block time plus [`RESPONSE_TIMEOUT`]).
pub const HUNG_DETECTED_WITHIN: Duration = Duration::from_secs(3);

/// A node's presence count is forgotten this long after its last check (a
/// node that died).
const PRESENCE_TTL: Duration = Duration::from_secs(5);

/// Loads running at once on the shared connection: a reconnect after an
/// outage makes every room load, and they should not flood Redis at once.
const LOADS_AT_ONCE: usize = 8;

/// Waits between retries after a failure: from the first to the last,
/// doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));

/// Cannot start with this Redis URL.
#[derive(Debug, thiserror::Error)]
#[error("cluster.redis_url: {0}")]
pub struct ClusterError(String);

/// What a room hears from the cluster.
pub enum Event {
    /// An entry read back from the events stream.
    Live(Live),
    /// The answer to a load the room asked for.
    Loaded(Loaded),
    /// Sent by a room's log to itself after its first load, once the joins
    /// that waited for it are in: the entries that came meanwhile go out
    /// now, to them too.
    Release,
    /// A user removed from the room through the API of any node.
    Remove(String),
    /// The watcher's check of the room.
    Checked {
        epoch: String,
        latest: Offset,
        others: usize,
        /// The verified members on other nodes.
        members: Vec<Arc<Identity>>,
    },
}

/// One message as ordered by Redis, read back by the reader.
pub struct Live {
    pub epoch: String,
    pub entry: Entry,
    /// The publish number, when this node published it.
    pub own: Option<u64>,
}

/// A message waiting in the outbox to be ordered.
pub struct Publish {
    pub room: Arc<str>,
    pub seq: u64,
    pub message: Outgoing,
    pub from: Option<Arc<Identity>>,
}

/// A hosted room, as the reader and watcher reach it.
struct Route {
    /// Which room task this is (a room that ended and started again under
    /// the same name is another one).
    id: u64,
    feed: mpsc::UnboundedSender<Event>,
    /// Its peers on this node, for presence.
    local: Arc<Local>,
}

/// A room's presence on this node, as the watcher reports it.
#[derive(Default)]
pub struct Local {
    pub peers: AtomicUsize,
    /// Its verified members as a JSON array (empty: none to list).
    pub members: Mutex<String>,
}

impl Local {
    pub fn members(&self) -> String {
        self.members.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// Which of the node's paths to Redis work; the node is connected when all
/// of them do. The publisher's counts as working until a publish fails
/// (it has nothing to try while the outbox is empty).
struct Health {
    publisher: AtomicBool,
    reader: AtomicBool,
    watcher: AtomicBool,
}

pub struct Cluster {
    client: Client,
    prefix: String,
    node: String,
    history: Limits,
    /// Room metadata lives this long without a message or a check.
    meta_ttl: Duration,
    scripts: Scripts,
    outbox: mpsc::Sender<Publish>,
    outbox_size: usize,
    seq: AtomicU64,
    /// The highest publish number of this node's that the reader has read
    /// back: everything up to it was applied (one publisher applies in
    /// order), so a retry after a lost reply leaves it out. That also
    /// holds when Redis lost its data meanwhile, and with it the record
    /// the publish script checks.
    own_back: AtomicU64,
    routes: Mutex<HashMap<Arc<str>, Route>>,
    next_route: AtomicU64,
    health: Health,
    metrics: Arc<Metrics>,
    /// The connection loads share, made on first use and after a failure.
    loads: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    load_slots: Semaphore,
}

/// A room's link to the cluster, held by its [`crate::log::redis::RedisLog`];
/// dropping it stops the routing of entries to the room.
pub struct Link {
    pub cluster: Arc<Cluster>,
    pub room: Arc<str>,
    pub feed: mpsc::UnboundedSender<Event>,
    pub local: Arc<Local>,
    id: u64,
}

impl Drop for Link {
    fn drop(&mut self) {
        let mut routes = self.cluster.routes();
        if routes.get(&self.room).is_some_and(|r| r.id == self.id) {
            routes.remove(&self.room);
        }
    }
}

impl Cluster {
    /// Starts the node's link to Redis: `None` for a standalone node. Redis
    /// need not be reachable yet: the node starts, reports itself not ready
    /// and connects when it can.
    pub fn start(
        config: &Config,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        force: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Option<Arc<Cluster>>, ClusterError> {
        let Some(url) = &config.redis_url else {
            return Ok(None);
        };
        let client = Client::open(url.as_str()).map_err(|e| ClusterError(e.to_string()))?;
        let node = config.node_id.clone().unwrap_or_else(made_up_node_id);
        let (outbox, outbox_rx) = mpsc::channel(config.outbox_size);
        let history = Limits {
            size: config.history_size,
            bytes: config.history_bytes,
            ttl: config.history_ttl,
        };
        let cluster = Arc::new(Cluster {
            client,
            prefix: config.key_prefix.clone(),
            node,
            history,
            meta_ttl: config.history_ttl.max(Duration::from_secs(30)) + Duration::from_secs(30),
            scripts: Scripts::default(),
            outbox,
            outbox_size: config.outbox_size,
            // Publish numbers only grow, also across restarts of a node
            // with the same id: they start at the clock in microseconds.
            seq: AtomicU64::new(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(1),
            ),
            own_back: AtomicU64::new(0),
            routes: Mutex::new(HashMap::new()),
            next_route: AtomicU64::new(0),
            health: Health {
                publisher: AtomicBool::new(true),
                reader: AtomicBool::new(false),
                watcher: AtomicBool::new(false),
            },
            metrics: metrics.clone(),
            loads: tokio::sync::Mutex::new(None),
            load_slots: Semaphore::new(LOADS_AT_ONCE),
        });
        metrics.cluster.enabled.store(true, Relaxed);
        info!(
            redis = %crate::config::redact(url),
            node = %cluster.node,
            prefix = %cluster.prefix,
            "cluster mode: rooms are ordered and kept in Redis"
        );
        tracker.spawn(publisher::run(
            cluster.clone(),
            outbox_rx,
            stop.clone(),
            force,
        ));
        tracker.spawn(reader::run(cluster.clone(), stop.clone()));
        tracker.spawn(watcher::run(cluster.clone(), stop));
        Ok(Some(cluster))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The cluster's figures in `/metrics`.
    pub fn metrics(&self) -> &crate::metrics::ClusterMetrics {
        &self.metrics.cluster
    }

    pub fn history(&self) -> Limits {
        self.history
    }

    fn routes(&self) -> MutexGuard<'_, HashMap<Arc<str>, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Routes the cluster's entries for `room` to a new room task.
    pub fn link(self: &Arc<Self>, room: Arc<str>) -> (Link, mpsc::UnboundedReceiver<Event>) {
        let (feed, rx) = mpsc::unbounded_channel();
        let id = self.next_route.fetch_add(1, Relaxed);
        let local = Arc::new(Local::default());
        self.routes().insert(
            room.clone(),
            Route {
                id,
                feed: feed.clone(),
                local: local.clone(),
            },
        );
        let link = Link {
            cluster: self.clone(),
            room,
            feed,
            local,
            id,
        };
        (link, rx)
    }

    /// Puts a message in the outbox; its number, or `None` when the outbox
    /// is full.
    pub fn publish(
        &self,
        room: &Arc<str>,
        message: Outgoing,
        from: Option<Arc<Identity>>,
    ) -> Option<u64> {
        let seq = self.seq.fetch_add(1, Relaxed);
        let publish = Publish {
            room: room.clone(),
            seq,
            message,
            from,
        };
        match self.outbox.try_send(publish) {
            Ok(()) => {
                self.metrics
                    .cluster
                    .outbox
                    .store(self.outbox_len() as u64, Relaxed);
                Some(seq)
            }
            Err(_) => None,
        }
    }

    pub fn outbox_size(&self) -> usize {
        self.outbox_size
    }

    fn outbox_len(&self) -> usize {
        self.outbox_size - self.outbox.capacity()
    }

    /// Loads a room in the background, retrying until Redis answers or the
    /// room is gone; the answer arrives on `feed`. `known`: the epoch and
    /// offset the room has, to get exactly what follows.
    pub fn load(
        self: &Arc<Self>,
        room: Arc<str>,
        known: Option<(String, Offset)>,
        feed: mpsc::UnboundedSender<Event>,
    ) {
        let cluster = self.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new();
            loop {
                if feed.is_closed() {
                    return;
                }
                match cluster.load_once(&room, known.as_ref()).await {
                    Ok(loaded) => {
                        if loaded.skipped > 0 {
                            cluster.skipped(loaded.skipped, &room, "room log");
                        }
                        let _ = feed.send(Event::Loaded(loaded));
                        return;
                    }
                    Err(e) => {
                        cluster.metrics.cluster.read_errors.fetch_add(1, Relaxed);
                        warn!(room = %room, error = %e, "cannot load the room from Redis; retrying");
                    }
                }
                backoff.wait().await;
            }
        });
    }

    async fn load_once(
        &self,
        room: &str,
        known: Option<&(String, Offset)>,
    ) -> Result<Loaded, LinkError> {
        let _slot = self.load_slots.acquire().await;
        let mut conn = self.shared_connection().await?;
        let keys = scripts::RoomKeys::new(&self.prefix, room);
        let (epoch, after) = match known {
            Some((epoch, after)) => (epoch.as_str(), *after),
            None => ("", 0),
        };
        let reply: Result<redis::Value, RedisError> = self
            .scripts
            .load
            .key(&keys.meta)
            .key(&keys.log)
            .arg(memory::new_epoch())
            .arg(self.meta_ttl.as_millis() as u64)
            .arg(epoch)
            .arg(after)
            .arg(self.history.size.max(1))
            .invoke_async(&mut conn)
            .await;
        match reply {
            Ok(v) => scripts::loaded(v).ok_or(LinkError::Reply("load")),
            Err(e) => {
                *self.loads.lock().await = None;
                Err(LinkError::Redis(e))
            }
        }
    }

    /// Tells every node to close user `user`'s connections in `room`: an
    /// entry on the events stream, which every node's reader follows.
    pub async fn remove(&self, room: &str, user: &str) -> Result<(), LinkError> {
        let mut conn = self.shared_connection().await?;
        let added: Result<redis::Value, RedisError> = redis::cmd("XADD")
            .arg(self.events_key())
            .arg("MAXLEN")
            .arg("~")
            .arg(scripts::EVENTS_MAX)
            .arg("*")
            .arg("room")
            .arg(room)
            .arg("kind")
            .arg("r")
            .arg("user")
            .arg(user)
            .query_async(&mut conn)
            .await;
        if let Err(e) = added {
            *self.loads.lock().await = None;
            return Err(LinkError::Redis(e));
        }
        Ok(())
    }

    /// Every room with peers on any node, with their count: from the
    /// presence every node reports (see [`watcher`]). Bounded: at most
    /// [`MAX_LISTED`] rooms.
    pub async fn rooms(&self) -> Result<Vec<(String, usize)>, LinkError> {
        let mut conn = self.connect(RESPONSE_TIMEOUT).await?;
        let now: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now_ms = now.0 * 1000 + now.1 / 1000;
        let fresh_after = now_ms.saturating_sub(PRESENCE_TTL.as_millis() as u64);
        let pattern = format!("{}room:*:online", self.prefix);
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 || keys.len() >= MAX_LISTED {
                break;
            }
        }
        keys.truncate(MAX_LISTED);
        let mut rooms = Vec::new();
        for chunk in keys.chunks(500) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("HGETALL").arg(key);
            }
            let replies: Vec<redis::Value> = pipe.ignore_errors().query_async(&mut conn).await?;
            for (key, reply) in chunk.iter().zip(replies) {
                let Some(name) = key
                    .strip_prefix(&format!("{}room:", self.prefix))
                    .and_then(|k| k.strip_suffix(":online"))
                else {
                    continue;
                };
                let online = presence_total(reply, fresh_after);
                if online > 0 && crate::protocol::valid_room_name(name) {
                    rooms.push((name.to_string(), online));
                }
            }
        }
        rooms.sort();
        Ok(rooms)
    }

    /// The connection loads and removals share, made on first use and
    /// again after a failure (which drops it).
    async fn shared_connection(&self) -> Result<MultiplexedConnection, LinkError> {
        let mut shared = self.loads.lock().await;
        if let Some(conn) = &*shared {
            return Ok(conn.clone());
        }
        let conn = self.connect(RESPONSE_TIMEOUT).await?;
        *shared = Some(conn.clone());
        Ok(conn)
    }

    /// A new connection with the node's deadlines.
    async fn connect(&self, response: Duration) -> Result<MultiplexedConnection, LinkError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(response));
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    fn events_key(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// Records whether one of the node's paths works, and the gauge.
    fn set_health(&self, path: &AtomicBool, ok: bool) {
        let was = path.swap(ok, Relaxed);
        let h = &self.health;
        let all = h.publisher.load(Relaxed) && h.reader.load(Relaxed) && h.watcher.load(Relaxed);
        let before = self.metrics.cluster.connected.swap(u64::from(all), Relaxed);
        if before == 1 && !all {
            warn!("lost the connection to Redis: not ready until it is back");
        } else if before == 0 && all {
            info!("connected to Redis: ready");
        }
        let _ = was;
    }

    /// Whether the node reaches Redis on every path (for `/readyz`).
    pub fn connected(&self) -> bool {
        self.metrics.cluster.connected.load(Relaxed) == 1
    }

    fn skipped(&self, n: usize, room: &str, key: &str) {
        self.metrics.cluster.skipped.fetch_add(n as u64, Relaxed);
        warn!(
            room,
            key,
            entries = n,
            "skipped entries that hubbub did not write"
        );
    }
}

/// Why one exchange with Redis failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Redis(#[from] RedisError),
    #[error("no answer within the deadline")]
    Timeout,
    #[error("Redis answered the {0} script with something it does not return")]
    Reply(&'static str),
}

/// Most rooms `GET /api/rooms` lists from Redis.
pub const MAX_LISTED: usize = 100_000;

/// The peers an `online` hash reports, counting only nodes heard from
/// after `fresh_after` (ms); anything not hubbub's counts nothing.
fn presence_total(reply: redis::Value, fresh_after: u64) -> usize {
    let values: Vec<String> = match reply {
        redis::Value::Map(pairs) => pairs.iter().filter_map(|(_, v)| scripts::text(v)).collect(),
        other => match other.into_sequence() {
            // field, value, field, value, ...
            Ok(items) => items
                .iter()
                .skip(1)
                .step_by(2)
                .filter_map(scripts::text)
                .collect(),
            Err(_) => return 0,
        },
    };
    values
        .iter()
        .filter_map(|v| {
            let (peers, at) = v.split_once(':')?;
            let at: u64 = at.parse().ok()?;
            (at >= fresh_after)
                .then(|| peers.parse::<usize>().ok())
                .flatten()
        })
        .sum()
}

/// A node id made up at start: unique per process (host-independent: the
/// clock and a random salt).
fn made_up_node_id() -> String {
    format!("node-{}", memory::new_epoch())
}

/// Waits that grow after each failure.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(BACKOFF.0)
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(BACKOFF.1);
    }

    fn reset(&mut self) {
        self.0 = BACKOFF.0;
    }
}

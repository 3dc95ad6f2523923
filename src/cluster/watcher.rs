//! Checks every room this node hosts, once a second.
//!
//! For each room, one script call (a batch of rooms per round trip) keeps
//! its metadata alive, reports this node's peers, and answers the room's
//! epoch, latest offset and peers on other nodes. A room whose epoch
//! changed (Redis lost its data: restart without persistence, FLUSHALL)
//! starts the new one; a room that is behind the latest offset for two
//! checks in a row has missed entries and loads them. So a node that
//! silently stopped receiving is found within seconds, whatever its
//! connection state says.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;
use tokio::time::{self, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::scripts::{self, RoomKeys};
use super::{Cluster, Event, LinkError, PRESENCE_TTL, RESPONSE_TIMEOUT, WATCH_EVERY};
use crate::log::memory::new_epoch;

/// Rooms per round trip at most.
const CHUNK: usize = 256;

pub async fn run(cluster: Arc<Cluster>, stop: CancellationToken) {
    let mut conn: Option<MultiplexedConnection> = None;
    let mut tick = time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let checked = tokio::select! {
            checked = check(&cluster, &mut conn) => checked,
            _ = stop.cancelled() => return,
        };
        match checked {
            Ok(()) => cluster.set_health(&cluster.health.watcher, true),
            Err(e) => {
                conn = None;
                cluster.metrics.cluster.read_errors.fetch_add(1, Relaxed);
                cluster.set_health(&cluster.health.watcher, false);
                warn!(error = %e, "cannot check the rooms in Redis");
            }
        }
        cluster
            .metrics
            .cluster
            .outbox
            .store(cluster.outbox_len() as u64, Relaxed);
    }
}

/// One check of every hosted room (a `PING` when there is none, so health
/// is known either way).
async fn check(
    cluster: &Cluster,
    conn: &mut Option<MultiplexedConnection>,
) -> Result<(), LinkError> {
    if conn.is_none() {
        *conn = Some(cluster.connect(RESPONSE_TIMEOUT).await?);
    }
    let Some(c) = conn.as_mut() else {
        return Err(LinkError::Timeout);
    };
    type Hosted = (Arc<str>, mpsc::UnboundedSender<Event>, usize, String);
    let rooms: Vec<Hosted> = cluster
        .routes()
        .iter()
        .map(|(name, r)| {
            let peers = r.local.peers.load(Relaxed);
            (name.clone(), r.feed.clone(), peers, r.local.members())
        })
        .collect();
    if rooms.is_empty() {
        let _: String = redis::cmd("PING").query_async(c).await?;
        return Ok(());
    }
    for chunk in rooms.chunks(CHUNK) {
        let mut call = cluster.scripts.touch.prepare_invoke();
        call.arg(cluster.node())
            .arg(cluster.meta_ttl.as_millis() as u64)
            .arg(PRESENCE_TTL.as_millis() as u64);
        for (name, _, peers, members) in chunk {
            let keys = RoomKeys::new(&cluster.prefix, name);
            call.key(keys.meta)
                .key(keys.log)
                .key(keys.online)
                .key(keys.members);
            call.arg(*peers).arg(new_epoch()).arg(members);
        }
        let reply: redis::Value = call.invoke_async(c).await?;
        let answers = scripts::touched(reply).ok_or(LinkError::Reply("touch"))?;
        for ((_, feed, _, _), t) in chunk.iter().zip(answers) {
            let _ = feed.send(Event::Checked {
                epoch: t.epoch,
                latest: t.latest,
                others: t.others,
                members: t.members,
            });
        }
    }
    Ok(())
}

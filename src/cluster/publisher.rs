//! Hands the node's outbox to Redis, a batch per round trip, in order.
//!
//! While Redis is unreachable the batch in hand is retried (with backoff)
//! and the outbox fills behind it; nothing is delivered to anyone before
//! Redis has ordered it, so the order never forks. A retried batch may have
//! been applied already (the reply was lost with the connection): each
//! message's (node, seq) makes the script skip what it applied before.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::scripts::{self, RoomKeys, EVENTS_MAX};
use super::{Backoff, Cluster, LinkError, Publish, RESPONSE_TIMEOUT};
use crate::log::memory::new_epoch;

/// Messages per round trip at most.
const BATCH: usize = 256;

/// Payload bytes per round trip at most (a batch always takes at least one
/// message).
const BATCH_BYTES: usize = 4 << 20;

/// After shutdown began, the outbox counts as drained once it stayed empty
/// this long (rooms hand over their last messages as they stop).
const DRAINED_AFTER: Duration = Duration::from_millis(200);

pub async fn run(
    cluster: Arc<Cluster>,
    mut outbox: mpsc::Receiver<Publish>,
    stop: CancellationToken,
    force: CancellationToken,
) {
    let mut conn: Option<MultiplexedConnection> = None;
    let mut backoff = Backoff::new();
    let mut batch: Vec<Publish> = Vec::with_capacity(BATCH);
    // The rest of a batch cut by BATCH_BYTES.
    let mut carry: Vec<Publish> = Vec::new();
    loop {
        if carry.is_empty() {
            let taken = tokio::select! {
                n = outbox.recv_many(&mut carry, BATCH) => n,
                _ = stop.cancelled(), if !stop.is_cancelled() => continue,
                _ = tokio::time::sleep(DRAINED_AFTER), if stop.is_cancelled() => 0,
            };
            if taken == 0 {
                // Closed, or shutting down with nothing left.
                return;
            }
        }
        let mut bytes = 0;
        let mut rest = carry.drain(..).peekable();
        while let Some(p) =
            rest.next_if(|p| batch.is_empty() || bytes + p.message.len() <= BATCH_BYTES)
        {
            bytes += p.message.len();
            batch.push(p);
        }
        let rest: Vec<Publish> = rest.collect();
        carry = rest;
        loop {
            if force.is_cancelled() {
                warn!(
                    lost = batch.len() + carry.len(),
                    "shutdown grace over: messages not handed to Redis were dropped"
                );
                return;
            }
            // Already read back: applied, whatever became of the reply.
            let back = cluster.own_back.load(Relaxed);
            batch.retain(|p| p.seq > back);
            if batch.is_empty() {
                break;
            }
            match publish(&cluster, &mut conn, &batch).await {
                Ok(()) => {
                    cluster.set_health(&cluster.health.publisher, true);
                    backoff.reset();
                    break;
                }
                Err(e) => {
                    conn = None;
                    cluster.metrics.cluster.publish_errors.fetch_add(1, Relaxed);
                    cluster.set_health(&cluster.health.publisher, false);
                    warn!(error = %e, waiting = batch.len() + cluster.outbox_len(), "cannot hand messages to Redis; retrying");
                    tokio::select! {
                        _ = backoff.wait() => {}
                        _ = force.cancelled() => {}
                    }
                }
            }
        }
        batch.clear();
        cluster
            .metrics
            .cluster
            .outbox
            .store((cluster.outbox_len() + carry.len()) as u64, Relaxed);
    }
}

/// One round trip: the whole batch through the publish script.
async fn publish(
    cluster: &Cluster,
    conn: &mut Option<MultiplexedConnection>,
    batch: &[Publish],
) -> Result<(), LinkError> {
    if conn.is_none() {
        *conn = Some(cluster.connect(RESPONSE_TIMEOUT).await?);
    }
    let Some(c) = conn.as_mut() else {
        return Err(LinkError::Timeout);
    };
    let mut call = cluster.scripts.publish.prepare_invoke();
    call.key(cluster.events_key());
    call.arg(cluster.node())
        .arg(cluster.history.size)
        .arg(cluster.history.ttl.as_millis() as u64)
        .arg(cluster.meta_ttl.as_millis() as u64)
        .arg(EVENTS_MAX);
    for p in batch {
        let Some((kind, data)) = scripts::kind_of(&p.message) else {
            continue;
        };
        let keys = RoomKeys::new(&cluster.prefix, &p.room);
        call.key(keys.meta).key(keys.log).key(keys.seen);
        let (fid, fname) = match &p.from {
            Some(f) => (f.id.as_str(), f.name.as_str()),
            None => ("", ""),
        };
        call.arg(&*p.room)
            .arg(p.seq)
            .arg(kind)
            .arg(data)
            .arg(new_epoch())
            .arg(fid)
            .arg(fname);
    }
    let _: redis::Value = call.invoke_async(c).await?;
    debug!(messages = batch.len(), "handed to Redis");
    Ok(())
}

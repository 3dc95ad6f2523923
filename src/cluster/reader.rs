//! Follows the events stream and hands each entry to its room.
//!
//! One connection of its own, used for nothing but `XREAD BLOCK`, with a
//! deadline longer than the block time: a blocking read on a shared
//! connection would hold up every other command, and a deadline shorter than
//! the block would cut every read. The reader remembers the last entry id it
//! saw and goes on from there after a reconnect, so an outage loses nothing
//! the stream still holds; what it no longer holds each room finds by its
//! offsets and loads from its own history.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::scripts::{self, StreamEntry};
use super::{Backoff, Cluster, Event, LinkError, Live, BLOCK, RESPONSE_TIMEOUT};
use crate::log::Entry;

/// Entries per read at most.
const COUNT: usize = 1024;

pub async fn run(cluster: Arc<Cluster>, stop: CancellationToken) {
    let mut conn: Option<MultiplexedConnection> = None;
    let mut last: Option<String> = None;
    let mut backoff = Backoff::new();
    loop {
        let read = tokio::select! {
            read = read(&cluster, &mut conn, &mut last) => read,
            _ = stop.cancelled() => return,
        };
        match read {
            Ok(()) => {
                cluster.set_health(&cluster.health.reader, true);
                backoff.reset();
            }
            Err(e) => {
                conn = None;
                cluster.metrics.cluster.read_errors.fetch_add(1, Relaxed);
                cluster.set_health(&cluster.health.reader, false);
                warn!(error = %e, "cannot read from Redis; reconnecting");
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

/// One blocking read (connecting first if needed), its entries routed.
async fn read(
    cluster: &Cluster,
    conn: &mut Option<MultiplexedConnection>,
    last: &mut Option<String>,
) -> Result<(), LinkError> {
    if conn.is_none() {
        *conn = Some(cluster.connect(BLOCK + RESPONSE_TIMEOUT).await?);
    }
    let Some(c) = conn.as_mut() else {
        return Err(LinkError::Timeout);
    };
    let key = cluster.events_key();
    let from = match last {
        Some(id) => id.clone(),
        None => {
            // First read: from the stream's newest entry on. Rooms load
            // what came before.
            let id = top(c, &key).await?;
            *last = Some(id.clone());
            id
        }
    };
    let reply: Value = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(COUNT)
        .arg("BLOCK")
        .arg(BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(&key)
        .arg(&from)
        .query_async(c)
        .await?;
    let entries = stream_entries(reply);
    if entries.is_empty() {
        // Nothing new: make sure the stream did not start over below the
        // id we wait for (a stream written anew by someone else), or we
        // would wait for ever.
        let top = top(c, &key).await?;
        if id_less(&top, &from) {
            warn!(from, top, "the events stream starts over below the last entry read; following it from its top");
            *last = Some(top);
        }
        return Ok(());
    }
    if let Some(e) = entries.last() {
        *last = Some(e.id.clone());
    }
    route(cluster, entries);
    Ok(())
}

/// The id of the stream's newest entry, or `0-0` when it has none.
async fn top(c: &mut MultiplexedConnection, key: &str) -> Result<String, LinkError> {
    let reply: Value = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(c)
        .await?;
    Ok(reply
        .into_sequence()
        .ok()
        .and_then(|v| v.into_iter().next())
        .and_then(scripts::stream_entry)
        .map_or_else(|| "0-0".to_string(), |e| e.id))
}

/// Whether stream id `a` comes before `b` (`ms-seq`, compared as numbers).
fn id_less(a: &str, b: &str) -> bool {
    let parse = |id: &str| -> (u64, u64) {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    };
    parse(a) < parse(b)
}

/// The entries of an `XREAD` reply (one stream).
fn stream_entries(reply: Value) -> Vec<StreamEntry> {
    let streams: Vec<Value> = match reply {
        Value::Nil => return Vec::new(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        other => other
            .into_sequence()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|s| s.into_sequence().ok()?.into_iter().nth(1))
            .collect(),
    };
    streams
        .into_iter()
        .flat_map(|entries| entries.into_sequence().unwrap_or_default())
        .filter_map(scripts::stream_entry)
        .collect()
}

/// Hands each entry to its room, if this node hosts it.
fn route(cluster: &Cluster, entries: Vec<StreamEntry>) {
    let mut skipped = 0;
    let mut parsed = Vec::with_capacity(entries.len());
    for e in entries {
        let event = match e.field("kind") {
            Some(b"r") => removal(e),
            _ => live(cluster, e).map(|(room, live)| (room, Event::Live(live))),
        };
        match event {
            Some(x) => parsed.push(x),
            None => skipped += 1,
        }
    }
    if skipped > 0 {
        cluster.skipped(skipped, "-", "events");
    }
    let routes = cluster.routes();
    for (room, event) in parsed {
        if let Some(route) = routes.get(room.as_str()) {
            let _ = route.feed.send(event);
        }
    }
}

/// A removal of a user from a room, for every node (see
/// [`Cluster::remove`]).
fn removal(e: StreamEntry) -> Option<(String, Event)> {
    let room = String::from_utf8(e.field("room")?.to_vec()).ok()?;
    let user = String::from_utf8(e.field("user")?.to_vec()).ok()?;
    Some((room, Event::Remove(user)))
}

/// An events entry as the room it belongs to and its message; `None` for
/// one hubbub did not write.
fn live(cluster: &Cluster, mut e: StreamEntry) -> Option<(String, Live)> {
    let room = String::from_utf8(e.field("room")?.to_vec()).ok()?;
    let epoch = String::from_utf8(e.field("epoch")?.to_vec()).ok()?;
    let offset = e.number("offset")?;
    let ts = e.number("ts")?;
    let seq = e.number("seq");
    let own = (e.field("node")? == cluster.node().as_bytes())
        .then_some(seq)
        .flatten();
    if let Some(seq) = own {
        cluster.own_back.fetch_max(seq, Relaxed);
    }
    let kind = e.field("kind")?.to_vec();
    let from = scripts::sender(&e);
    let data = e.take("data")?;
    let message = scripts::message_of(&kind, data)?;
    if offset == 0 || epoch.is_empty() {
        return None;
    }
    let entry = Entry::new(offset, ts, Arc::new(message)).with_from(from);
    Some((room, Live { epoch, entry, own }))
}

#[cfg(test)]
mod tests {
    use super::id_less;

    #[test]
    fn stream_ids_compare_as_numbers() {
        assert!(id_less("0-0", "1-0"));
        assert!(id_less("9-5", "10-0"));
        assert!(id_less("10-2", "10-10"));
        assert!(!id_less("10-10", "10-10"));
    }
}

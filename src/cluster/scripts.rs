//! The Lua scripts that order, load and check rooms in Redis, and the
//! reading of their replies.
//!
//! Each script runs atomically in Redis, which is what makes the order one:
//! deciding a message's offset, appending it to the room's history and to
//! the stream every node reads happen in one step, so no two nodes can give
//! out the same offset or publish in another order than they numbered
//! (the "increment, then publish" trap). One call carries a whole batch, so
//! Redis round trips per message do not grow with peers, rooms or nodes.
//!
//! Every key is hubbub's, under the configured prefix:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<prefix>events` | stream | every message of every room, for the nodes' readers (trimmed to about [`EVENTS_MAX`]) |
//! | `<prefix>room:<name>:meta` | hash | `epoch`, `offset` (the latest) |
//! | `<prefix>room:<name>:log` | stream | the room's history, entry id `<offset>-1`, trimmed to `history_size`, expiring `history_ttl` after the last message |
//! | `<prefix>room:<name>:seen` | hash | per node, the last publish applied (so a retried batch is not applied twice) |
//! | `<prefix>room:<name>:online` | hash | per node, `<peers>:<ms>` (presence) |
//!
//! Anything else found on these keys (another type, fields hubbub did not
//! write, an epoch that is not one) is treated as no room at all: the room
//! starts a new epoch. The scripts never fail on such data, so one stranger
//! cannot stop a node's outbox.

use std::sync::Arc;

use bytes::Bytes;
use redis::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::auth::Identity;
use crate::log::{Entry, Offset};

/// The events stream is trimmed to about this many entries. A node that
/// falls further behind than this (a long pause) finds the gap from each
/// room's own history instead.
pub const EVENTS_MAX: usize = 10_000;

/// Shared by the scripts: reading a room's epoch and latest offset, and
/// starting a new epoch when there is none (first use, data lost, expired)
/// or what is there is not hubbub's.
const PRELUDE: &str = r#"
local function failed(r)
  return type(r) == 'table' and r.err ~= nil
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function current(meta, log, fresh)
  local m = redis.pcall('HMGET', meta, 'epoch', 'offset')
  if not failed(m) then
    local epoch, offset = m[1], tonumber(m[2])
    if epoch and offset and offset >= 0 and offset == math.floor(offset)
        and #epoch <= 64 and string.match(epoch, '^[%w_%-]+$') then
      return epoch, offset
    end
  end
  redis.call('DEL', meta, log)
  redis.call('HSET', meta, 'epoch', fresh, 'offset', 0)
  return fresh, 0
end
"#;

/// Orders a batch of messages. KEYS: the events stream, then per message
/// its room's meta, log and seen. ARGV: node, history size, history ttl ms,
/// meta ttl ms, events max, then per message room, seq, kind (`t`/`b`),
/// data, a fresh epoch, the verified sender's id and name ('' for none). Returns per message its offset, or 0 when that
/// publish (node, seq) was applied before.
const PUBLISH: &str = r#"
local node, size = ARGV[1], tonumber(ARGV[2])
local ttl, meta_ttl, events_max = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local ts = now_ms()
local out = {}
local n = (#KEYS - 1) / 3
for i = 0, n - 1 do
  local meta, log, seen = KEYS[2 + 3 * i], KEYS[3 + 3 * i], KEYS[4 + 3 * i]
  local a = 6 + 7 * i
  local room, seq, kind, data, fresh = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local sender = {}
  if ARGV[a + 5] ~= '' then
    sender = {'fid', ARGV[a + 5], 'fname', ARGV[a + 6]}
  end
  local last = redis.pcall('HGET', seen, node)
  if failed(last) then
    redis.call('DEL', seen)
    last = false
  end
  last = tonumber(last)
  if last ~= nil and tonumber(seq) <= last then
    out[#out + 1] = 0
  else
    local epoch, offset = current(meta, log, fresh)
    offset = offset + 1
    local o = string.format('%d', offset)
    redis.call('HSET', meta, 'offset', o)
    if size > 0 then
      local id = o .. '-1'
      local r = redis.pcall('XADD', log, 'MAXLEN', size, id, 'ts', ts, 'kind', kind, 'data', data, unpack(sender))
      if failed(r) then
        redis.call('DEL', log)
        redis.call('XADD', log, 'MAXLEN', size, id, 'ts', ts, 'kind', kind, 'data', data, unpack(sender))
      end
      redis.call('PEXPIRE', log, ttl)
    end
    local r = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', events_max, '*', 'room', room,
      'epoch', epoch, 'offset', o, 'ts', ts, 'kind', kind, 'data', data, 'node', node, 'seq', seq,
      unpack(sender))
    if failed(r) then
      redis.call('DEL', KEYS[1])
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', events_max, '*', 'room', room,
        'epoch', epoch, 'offset', o, 'ts', ts, 'kind', kind, 'data', data, 'node', node, 'seq', seq,
        unpack(sender))
    end
    redis.call('HSET', seen, node, seq)
    redis.call('PEXPIRE', seen, meta_ttl)
    redis.call('PEXPIRE', meta, meta_ttl)
    out[#out + 1] = offset
  end
end
return out
"#;

/// Loads a room. KEYS: meta, log. ARGV: a fresh epoch, meta ttl ms, the
/// epoch the caller knows ('' for none), the offset it has, the most recent
/// entries to return otherwise. Returns `{epoch, latest, 'after'|'recent',
/// entries}`: with the known epoch, every entry after the given offset
/// (oldest first); otherwise the most recent ones (newest first).
const LOAD: &str = r#"
local epoch, offset = current(KEYS[1], KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
local how, entries = 'recent', nil
if epoch == ARGV[3] then
  how = 'after'
  entries = redis.pcall('XRANGE', KEYS[2], '(' .. ARGV[4] .. '-1', '+')
else
  entries = redis.pcall('XREVRANGE', KEYS[2], '+', '-', 'COUNT', tonumber(ARGV[5]))
end
if failed(entries) then
  redis.call('DEL', KEYS[2])
  entries = {}
end
return {epoch, offset, how, entries}
"#;

/// Checks the rooms a node hosts and shares its presence. KEYS per room:
/// meta, log, online, members. ARGV: node, meta ttl ms, presence ttl ms,
/// then per room the node's peer count, a fresh epoch and its verified
/// members (a JSON array, or ''). Returns per room `{epoch, latest, peers
/// on other nodes, {their members' JSON arrays}}`.
const TOUCH: &str = r#"
local node, meta_ttl, presence_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local out = {}
for i = 0, #KEYS / 4 - 1 do
  local meta, log, online, members = KEYS[1 + 4 * i], KEYS[2 + 4 * i], KEYS[3 + 4 * i], KEYS[4 + 4 * i]
  local count, fresh, mine = ARGV[4 + 3 * i], ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  local epoch, offset = current(meta, log, fresh)
  redis.call('PEXPIRE', meta, meta_ttl)
  local others = 0
  local lists = {}
  local all = redis.pcall('HGETALL', online)
  if failed(all) then
    redis.call('DEL', online)
    all = {}
  end
  for j = 1, #all, 2 do
    local field, value = all[j], all[j + 1]
    if field ~= node then
      local peers, at = string.match(value, '^(%d+):(%d+)$')
      if peers and tonumber(at) >= now - presence_ttl then
        others = others + tonumber(peers)
        local list = redis.pcall('HGET', members, field)
        if type(list) == 'string' then
          lists[#lists + 1] = list
        end
      else
        redis.call('HDEL', online, field)
        redis.pcall('HDEL', members, field)
      end
    end
  end
  redis.call('HSET', online, node, count .. ':' .. string.format('%d', now))
  redis.call('PEXPIRE', online, presence_ttl * 2)
  if mine ~= '' then
    if failed(redis.pcall('HSET', members, node, mine)) then
      redis.call('DEL', members)
      redis.call('HSET', members, node, mine)
    end
    redis.call('PEXPIRE', members, presence_ttl * 2)
  else
    redis.pcall('HDEL', members, node)
  end
  out[#out + 1] = {epoch, offset, others, lists}
end
return out
"#;

/// The three scripts, each with its SHA1 (sent as EVALSHA; loaded again
/// after a Redis restart by the `redis` crate).
pub struct Scripts {
    pub publish: redis::Script,
    pub load: redis::Script,
    pub touch: redis::Script,
}

impl Default for Scripts {
    fn default() -> Scripts {
        let with_prelude = |body: &str| redis::Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            publish: with_prelude(PUBLISH),
            load: with_prelude(LOAD),
            touch: with_prelude(TOUCH),
        }
    }
}

/// A room's keys.
pub struct RoomKeys {
    pub meta: String,
    pub log: String,
    pub seen: String,
    pub online: String,
    pub members: String,
}

impl RoomKeys {
    pub fn new(prefix: &str, room: &str) -> RoomKeys {
        let base = format!("{prefix}room:{room}");
        RoomKeys {
            meta: format!("{base}:meta"),
            log: format!("{base}:log"),
            seen: format!("{base}:seen"),
            online: format!("{base}:online"),
            members: format!("{base}:members"),
        }
    }
}

/// A message's kind as the scripts store it.
pub fn kind_of(message: &Message) -> Option<(&'static str, &[u8])> {
    match message {
        Message::Text(text) => Some(("t", text.as_bytes())),
        Message::Binary(bytes) => Some(("b", bytes)),
        _ => None,
    }
}

/// A stored message back as a WebSocket message; `None` for anything
/// hubbub would not have stored (an unknown kind, text that is not UTF-8).
pub fn message_of(kind: &[u8], data: Vec<u8>) -> Option<Message> {
    match kind {
        b"t" => String::from_utf8(data).ok().map(Message::text),
        b"b" => Some(Message::Binary(Bytes::from(data))),
        _ => None,
    }
}

pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

pub fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn array(v: Value) -> Option<Vec<Value>> {
    v.into_sequence().ok()
}

/// One stream entry: its id and its fields, by name.
pub struct StreamEntry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl StreamEntry {
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    pub fn take(&mut self, name: &str) -> Option<Vec<u8>> {
        let at = self.fields.iter().position(|(k, _)| k == name.as_bytes())?;
        Some(self.fields.swap_remove(at).1)
    }

    pub fn number(&self, name: &str) -> Option<u64> {
        std::str::from_utf8(self.field(name)?).ok()?.parse().ok()
    }
}

/// A stream entry as Redis answers it: `[id, [field, value, ...]]`.
pub fn stream_entry(v: Value) -> Option<StreamEntry> {
    let mut parts = array(v)?.into_iter();
    let id = text(&parts.next()?)?;
    let flat = parts.next()?;
    let mut fields = Vec::new();
    match flat {
        Value::Map(pairs) => {
            for (k, v) in pairs {
                fields.push((bytes(k)?, bytes(v)?));
            }
        }
        other => {
            let mut items = array(other)?.into_iter();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                fields.push((bytes(k)?, bytes(v)?));
            }
        }
    }
    Some(StreamEntry { id, fields })
}

/// A room log entry back as an [`Entry`]; `None` for one hubbub did not
/// write.
pub fn log_entry(mut e: StreamEntry) -> Option<Entry> {
    let offset: Offset = e.id.strip_suffix("-1")?.parse().ok()?;
    let ts = e.number("ts")?;
    let kind = e.field("kind")?.to_vec();
    let data = e.take("data")?;
    let message = message_of(&kind, data)?;
    Some(Entry::new(offset, ts, Arc::new(message)).with_from(sender(&e)))
}

/// The verified sender an entry carries (`fid`, `fname`), if any.
pub fn sender(e: &StreamEntry) -> Option<Arc<Identity>> {
    let id = String::from_utf8(e.field("fid")?.to_vec()).ok()?;
    let name = String::from_utf8(e.field("fname")?.to_vec()).ok()?;
    Some(Arc::new(Identity { id, name }))
}

/// What the load script answered.
pub struct Loaded {
    pub epoch: String,
    pub latest: Offset,
    /// Oldest first.
    pub entries: Vec<Entry>,
    /// Whether `entries` are those after the offset the caller gave (in its
    /// epoch), rather than the most recent ones.
    pub after: bool,
    /// Entries skipped as not hubbub's.
    pub skipped: usize,
}

pub fn loaded(v: Value) -> Option<Loaded> {
    let mut parts = array(v)?.into_iter();
    let epoch = text(&parts.next()?)?;
    let latest = u64::try_from(int(&parts.next()?)?).ok()?;
    let after = text(&parts.next()?)? == "after";
    let mut skipped = 0;
    let mut entries: Vec<Entry> = array(parts.next()?)?
        .into_iter()
        .filter_map(|e| {
            let entry = stream_entry(e).and_then(log_entry);
            skipped += usize::from(entry.is_none());
            entry
        })
        .collect();
    if !after {
        entries.reverse();
    }
    Some(Loaded {
        epoch,
        latest,
        entries,
        after,
        skipped,
    })
}

/// One room's answer to the touch script.
pub struct Touched {
    pub epoch: String,
    pub latest: Offset,
    pub others: usize,
    /// Verified members on other nodes (lists that are not hubbub's are
    /// skipped).
    pub members: Vec<Arc<Identity>>,
}

pub fn touched(v: Value) -> Option<Vec<Touched>> {
    array(v)?
        .into_iter()
        .map(|room| {
            let mut parts = array(room)?.into_iter();
            Some(Touched {
                epoch: text(&parts.next()?)?,
                latest: u64::try_from(int(&parts.next()?)?).ok()?,
                others: usize::try_from(int(&parts.next()?)?).ok()?,
                members: parts
                    .next()
                    .and_then(array)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(text)
                    .filter_map(|json| serde_json::from_str::<Vec<Identity>>(&json).ok())
                    .flatten()
                    .map(Arc::new)
                    .collect(),
            })
        })
        .collect()
}

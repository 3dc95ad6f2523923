//! The room log kept in this process's memory: the default, nothing to
//! install. Its history dies with the process, so every room's epoch is new
//! at every start (and when a room that had ended is created anew).

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{millis, Append, Entry, Offset, RoomLog};
use crate::room::Outgoing;

/// History bounds, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub size: usize,
    pub bytes: usize,
    pub ttl: Duration,
}

pub struct MemoryLog {
    epoch: String,
    latest: Offset,
    entries: VecDeque<Entry>,
    bytes: usize,
    limits: Limits,
    /// When the last message arrived; the history expires `ttl` after it.
    last_at: Option<Instant>,
}

impl MemoryLog {
    pub fn new(limits: Limits) -> MemoryLog {
        MemoryLog {
            epoch: new_epoch(),
            latest: 0,
            entries: VecDeque::new(),
            bytes: 0,
            limits,
            last_at: None,
        }
    }

    fn evict(&mut self) {
        while self.entries.len() > self.limits.size || self.bytes > self.limits.bytes {
            match self.entries.pop_front() {
                Some(old) => self.bytes -= old.payload_len(),
                None => break,
            }
        }
    }
}

impl MemoryLog {
    /// Remembers an entry ordered elsewhere (the cache of a shared log),
    /// within the history bounds.
    pub fn keep(&mut self, entry: Entry, now: Instant) {
        self.latest = entry.offset;
        self.last_at = Some(now);
        self.bytes += entry.payload_len();
        self.entries.push_back(entry);
        self.evict();
    }

    /// Starts over in `epoch` at `latest`, with nothing remembered.
    pub fn restart(&mut self, epoch: String, latest: Offset) {
        self.epoch = epoch;
        self.latest = latest;
        self.clear();
    }

    /// Moves the latest offset on to one whose messages this log will
    /// never have (they are gone where they were kept).
    pub fn set_latest(&mut self, latest: Offset) {
        self.clear();
        self.latest = latest;
    }

    /// The bounds this log keeps.
    pub fn limits(&self) -> Limits {
        self.limits
    }
}

impl RoomLog for MemoryLog {
    type Event = std::convert::Infallible;

    fn epoch(&self) -> &str {
        &self.epoch
    }

    fn latest(&self) -> Offset {
        self.latest
    }

    fn append(
        &mut self,
        message: Outgoing,
        from: Option<std::sync::Arc<crate::auth::Identity>>,
        at: SystemTime,
        now: Instant,
    ) -> Append {
        let entry = Entry::new(self.latest + 1, millis(at), message).with_from(from);
        self.keep(entry.clone(), now);
        Append::Ordered(entry)
    }

    fn get_mut(&mut self, offset: Offset) -> Option<&mut Entry> {
        let first = self.entries.front()?.offset;
        let index = usize::try_from(offset.checked_sub(first)?).ok()?;
        self.entries.get_mut(index)
    }

    fn after(&mut self, after: Offset) -> Option<Vec<&mut Entry>> {
        if after > self.latest {
            return None;
        }
        let first = self.entries.front().map_or(self.latest + 1, |e| e.offset);
        if after + 1 < first {
            return None;
        }
        let skip = (after + 1 - first) as usize;
        Some(self.entries.iter_mut().skip(skip).collect())
    }

    fn recent(&mut self, n: usize) -> Vec<&mut Entry> {
        let skip = self.entries.len().saturating_sub(n);
        self.entries.iter_mut().skip(skip).collect()
    }

    fn expires_at(&self) -> Option<Instant> {
        if self.entries.is_empty() {
            return None;
        }
        self.last_at.map(|t| t + self.limits.ttl)
    }

    fn clear(&mut self) {
        self.entries = VecDeque::new();
        self.bytes = 0;
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A new epoch: the clock in nanoseconds (it moves on between server
/// starts), a per-process counter (two rooms created in the same
/// nanosecond) and a random salt, in hex.
pub fn new_epoch() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = NEXT.fetch_add(1, Relaxed);
    let salt = RandomState::new().hash_one((nanos, n)) as u32;
    format!("{nanos:x}-{n:x}-{salt:x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio_tungstenite::tungstenite::Message;

    fn log(size: usize, bytes: usize) -> MemoryLog {
        MemoryLog::new(Limits {
            size,
            bytes,
            ttl: Duration::from_secs(60),
        })
    }

    fn add(log: &mut MemoryLog, text: &str) -> Offset {
        match log.append(
            Arc::new(Message::text(text)),
            None,
            SystemTime::now(),
            Instant::now(),
        ) {
            Append::Ordered(entry) => entry.offset,
            _ => panic!("the memory log orders at once"),
        }
    }

    fn texts(entries: Vec<&mut Entry>) -> Vec<String> {
        entries
            .into_iter()
            .map(|e| e.message.to_text().unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn offsets_are_contiguous_from_one() {
        let mut l = log(10, 1000);
        assert_eq!(l.latest(), 0);
        assert_eq!(
            (add(&mut l, "a"), add(&mut l, "b"), add(&mut l, "c")),
            (1, 2, 3)
        );
        assert_eq!(l.latest(), 3);
    }

    #[test]
    fn after_gives_exactly_what_follows_or_nothing() {
        let mut l = log(3, 1000);
        for t in ["a", "b", "c", "d", "e"] {
            add(&mut l, t);
        }
        // History holds 3, 4, 5.
        assert_eq!(l.after(5).map(texts), Some(vec![]));
        assert_eq!(l.after(4).map(texts), Some(vec!["e".to_string()]));
        assert_eq!(
            l.after(2).map(texts),
            Some(vec!["c".to_string(), "d".into(), "e".into()])
        );
        assert!(l.after(1).is_none(), "message 2 is gone");
        assert!(l.after(6).is_none(), "beyond the latest");
        assert_eq!(texts(l.recent(2)), vec!["d".to_string(), "e".into()]);
    }

    #[test]
    fn bytes_bound_the_history() {
        let mut l = log(100, 10);
        for t in ["aaaa", "bbbb", "cccc"] {
            add(&mut l, t);
        }
        assert_eq!(texts(l.recent(10)), vec!["bbbb".to_string(), "cccc".into()]);
        // One message larger than the whole budget is not kept.
        add(&mut l, "0123456789ab");
        assert!(l.recent(10).is_empty());
        assert_eq!(l.latest(), 4);
        assert!(l.after(3).is_none());
    }

    #[test]
    fn history_off_keeps_nothing_but_counts_on() {
        let mut l = log(0, 1000);
        add(&mut l, "a");
        assert_eq!(add(&mut l, "b"), 2);
        assert!(l.is_empty());
        assert_eq!(l.after(2).map(|e| e.len()), Some(0));
        assert!(l.after(1).is_none());
    }

    #[test]
    fn epochs_differ() {
        assert_ne!(log(1, 1).epoch(), log(1, 1).epoch());
    }
}

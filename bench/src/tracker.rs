//! Per-receiver accounting of the messages of every sender: in-order
//! deliveries, gaps (lost, unless they arrive later), late arrivals that fill
//! a gap (reordered) and repeats (duplicates).

/// What one received message turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The next expected sequence number.
    InOrder,
    /// Ahead of the next expected one: the skipped numbers are missing for now.
    Gap { skipped: u64 },
    /// Behind the next expected one, and filling a gap: reordered.
    Late,
    /// Seen before.
    Duplicate,
}

#[derive(Debug, Clone, Default)]
struct SenderState {
    /// One past the highest sequence number seen.
    next: u64,
    /// Sorted, disjoint, half-open ranges of numbers below `next` not seen
    /// yet. Empty unless something was lost or reordered, so the in-order
    /// path never allocates.
    missing: Vec<(u64, u64)>,
}

impl SenderState {
    fn missing_count(&self) -> u64 {
        self.missing.iter().map(|(a, b)| b - a).sum()
    }

    /// Removes `seq` from the missing ranges; returns whether it was missing.
    fn take_missing(&mut self, seq: u64) -> bool {
        // Ranges are sorted: find the one that could hold seq.
        let idx = self.missing.partition_point(|&(_, end)| end <= seq);
        let Some(&(a, b)) = self.missing.get(idx) else {
            return false;
        };
        if seq < a {
            return false;
        }
        if a + 1 == b {
            self.missing.remove(idx);
        } else if seq == a {
            self.missing[idx].0 += 1;
        } else if seq + 1 == b {
            self.missing[idx].1 -= 1;
        } else {
            self.missing[idx].1 = seq;
            self.missing.insert(idx + 1, (seq + 1, b));
        }
        true
    }
}

/// The counts of one receiver, or of many added together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Distinct messages received (duplicates excluded).
    pub unique: u64,
    /// Messages that arrived after a later one of the same sender.
    pub reordered: u64,
    pub duplicates: u64,
    /// Times a sequence number jumped ahead.
    pub gaps: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.unique += o.unique;
        self.reordered += o.reordered;
        self.duplicates += o.duplicates;
        self.gaps += o.gaps;
    }
}

/// Tracks the sequence numbers one receiver saw from each sender.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    senders: Vec<SenderState>,
    counts: Counts,
}

impl SeqTracker {
    /// `senders`: how many senders (ids `0..senders`) this run has.
    pub fn new(senders: usize) -> Self {
        SeqTracker {
            senders: vec![SenderState::default(); senders],
            counts: Counts::default(),
        }
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Records one message. `sender` must be below the count given to `new`.
    pub fn record(&mut self, sender: usize, seq: u64) -> Outcome {
        let st = &mut self.senders[sender];
        let out = if seq == st.next {
            st.next += 1;
            Outcome::InOrder
        } else if seq > st.next {
            let skipped = seq - st.next;
            st.missing.push((st.next, seq));
            st.next = seq + 1;
            self.counts.gaps += 1;
            Outcome::Gap { skipped }
        } else if st.take_missing(seq) {
            self.counts.reordered += 1;
            Outcome::Late
        } else {
            self.counts.duplicates += 1;
            return Outcome::Duplicate;
        };
        self.counts.unique += 1;
        out
    }

    /// Messages this receiver never got, given how many each sender sent:
    /// the holes still open plus whatever came after the last one seen.
    pub fn lost(&self, sent: &[u64]) -> u64 {
        let (gaps, tail) = self.lost_parts(sent);
        gaps + tail
    }

    /// [`SeqTracker::lost`] in two parts: (holes, tail). A hole is a number
    /// skipped while a later one of the same sender arrived (dropped, for a
    /// server that keeps order); the tail is what never arrived after the last
    /// one received (dropped, or still on its way when the run ended).
    pub fn lost_parts(&self, sent: &[u64]) -> (u64, u64) {
        self.senders
            .iter()
            .zip(sent)
            .fold((0, 0), |(g, t), (st, &sent)| {
                (g + st.missing_count(), t + sent.saturating_sub(st.next))
            })
    }

    /// Highest sequence number seen from `sender`, plus one.
    pub fn next_expected(&self, sender: usize) -> u64 {
        self.senders[sender].next
    }
}

/// Deliveries received over deliveries expected (every reader gets every
/// message sent). 1.0 is perfect; `None` when nothing was expected.
pub fn delivery_ratio(received: u64, sent: u64, readers: u64) -> Option<f64> {
    let expected = sent.checked_mul(readers)?;
    if expected == 0 {
        None
    } else {
        Some(received as f64 / expected as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_has_no_loss() {
        let mut t = SeqTracker::new(2);
        for seq in 0..100 {
            assert_eq!(t.record(0, seq), Outcome::InOrder);
            assert_eq!(t.record(1, seq), Outcome::InOrder);
        }
        assert_eq!(
            t.counts(),
            Counts {
                unique: 200,
                ..Counts::default()
            }
        );
        assert_eq!(t.lost(&[100, 100]), 0);
        // A sender that sent more than arrived: the tail is lost.
        assert_eq!(t.lost(&[100, 103]), 3);
        assert_eq!(t.lost_parts(&[100, 103]), (0, 3));
    }

    #[test]
    fn gaps_count_as_lost_until_filled() {
        let mut t = SeqTracker::new(1);
        t.record(0, 0);
        assert_eq!(t.record(0, 5), Outcome::Gap { skipped: 4 }); // 1..5 missing
        assert_eq!(t.lost(&[6]), 4);
        assert_eq!(t.lost_parts(&[8]), (4, 2));
        assert_eq!(t.record(0, 3), Outcome::Late); // split the range
        assert_eq!(t.record(0, 1), Outcome::Late); // front of a range
        assert_eq!(t.record(0, 4), Outcome::Late); // back of a range
        assert_eq!(t.lost(&[6]), 1); // only 2 still missing
        assert_eq!(t.record(0, 2), Outcome::Late); // last one
        assert_eq!(t.lost(&[6]), 0);
        let c = t.counts();
        assert_eq!((c.unique, c.reordered, c.duplicates, c.gaps), (6, 4, 0, 1));
    }

    #[test]
    fn duplicates_are_not_deliveries() {
        let mut t = SeqTracker::new(1);
        t.record(0, 0);
        t.record(0, 1);
        assert_eq!(t.record(0, 1), Outcome::Duplicate);
        assert_eq!(t.record(0, 0), Outcome::Duplicate);
        t.record(0, 4);
        assert_eq!(t.record(0, 4), Outcome::Duplicate);
        assert_eq!(t.record(0, 2), Outcome::Late);
        assert_eq!(t.record(0, 2), Outcome::Duplicate);
        let c = t.counts();
        assert_eq!((c.unique, c.duplicates, c.reordered), (4, 4, 1));
        assert_eq!(t.lost(&[5]), 1); // 3
    }

    #[test]
    fn senders_are_tracked_independently() {
        let mut t = SeqTracker::new(3);
        t.record(0, 0);
        t.record(2, 0);
        t.record(2, 2);
        assert_eq!(t.record(1, 0), Outcome::InOrder);
        assert_eq!(t.lost(&[1, 1, 3]), 1);
        assert_eq!(t.next_expected(2), 3);
        // Nothing seen from a sender that sent 10: all 10 lost.
        assert_eq!(t.lost(&[1, 10, 3]), 10);
    }

    #[test]
    fn many_gaps_bookkeeping_matches_a_set() {
        // Deterministic pseudo-random order with drops and repeats, checked
        // against a plain set-based model.
        let mut t = SeqTracker::new(1);
        let mut seen = std::collections::BTreeSet::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut dups = 0;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let seq = x % 3000;
            if !seen.insert(seq) {
                dups += 1;
            }
            t.record(0, seq);
        }
        let c = t.counts();
        assert_eq!(c.unique, seen.len() as u64);
        assert_eq!(c.duplicates, dups);
        assert_eq!(t.lost(&[3000]), 3000 - seen.len() as u64);
    }

    #[test]
    fn delivery_ratio_arithmetic() {
        assert_eq!(delivery_ratio(1000, 10, 100), Some(1.0));
        assert_eq!(delivery_ratio(950, 10, 100), Some(0.95));
        assert_eq!(delivery_ratio(0, 10, 100), Some(0.0));
        assert_eq!(delivery_ratio(0, 0, 100), None);
        assert_eq!(delivery_ratio(5, 10, 0), None);
        assert_eq!(delivery_ratio(1, u64::MAX, 2), None);
    }
}

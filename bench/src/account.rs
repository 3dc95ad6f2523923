//! What one reading connection makes of every data message it receives:
//! whose message it is, whether it belongs to this connection's room, and
//! for `hubbub.v1` whether the room's offsets arrive without a gap, a
//! repeat or a step back.
//!
//! Raw: each message is one of the tool's payloads; loss, order and
//! duplicates are counted per sender on the payload's sequence numbers
//! ([`SeqTracker`]), against the senders of this connection's room only.
//!
//! `hubbub.v1`: `hello` and `presence` (and any other non-message envelope)
//! are skipped; each `message` carries the room's offset. Offsets must run
//! one by one from the one after `hello`'s `offset` (the room's latest when
//! this client joined; what is at or below it is history replayed on join,
//! counted as `replayed` and not checked). A missing offset is lost (a gap
//! if a later one arrived), one seen twice a duplicate, one arriving after
//! a later one reordered. The payload inside `data` still gives the sender
//! (for its echo and its room), the send time (latency) and the count of
//! this run's distinct messages received.

use hdrhistogram::Histogram;

use crate::conn::Protocol;
use crate::envelope::{self, Envelope};
use crate::frame;
use crate::latency;
use crate::payload::{self, Header};
use crate::tracker::{Counts, Outcome, SeqTracker};

/// What a reader knows of the run.
#[derive(Debug, Clone, Copy)]
pub struct AccountCfg {
    pub protocol: Protocol,
    /// The run tag of this run's messages.
    pub run: u16,
    /// Senders of the run (ids `0..senders`); sender `s` is in room `s % rooms`.
    pub senders: usize,
    /// This connection's room, of `rooms`.
    pub room: u32,
    pub rooms: u32,
    /// Our own sender id, if this connection sends.
    pub me: Option<u32>,
    /// The exact message size of the run, if checked.
    pub size: Option<usize>,
    pub track_latency: bool,
}

/// One reader's accounting.
#[derive(Debug)]
pub struct Account {
    cfg: AccountCfg,
    /// This run's messages, per sender (distinct count, and raw loss/order).
    seq: SeqTracker,
    /// `hubbub.v1`: offsets relative to `base`, as one stream.
    offsets: SeqTracker,
    /// `hubbub.v1`: the first offset that is not history.
    base: Option<u64>,
    hist: Option<Histogram<u32>>,
    /// Messages that are not this run's (another client's chat, a mangled
    /// body, an envelope that is not well-formed JSON).
    pub foreign: u64,
    /// This run's messages from a sender of another room.
    pub misrouted: u64,
    /// `hubbub.v1`: history messages replayed on join (at or below hello's offset).
    pub replayed: u64,
    /// `hubbub.v1`: a message arrived before any `hello`.
    pub message_before_hello: bool,
    v1_duplicates: u64,
    v1_reordered: u64,
    /// Highest own sequence number echoed back, plus one.
    pub confirmed: u64,
    scratch: Vec<u8>,
}

/// A reader's loss, order and delivery counts at the end of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub counts: Counts,
    pub lost_gaps: u64,
    pub lost_tail: u64,
}

impl Account {
    pub fn new(cfg: AccountCfg) -> Account {
        Account {
            cfg,
            seq: SeqTracker::new(cfg.senders),
            offsets: SeqTracker::new(1),
            base: None,
            hist: cfg.track_latency.then(latency::new_conn_histogram),
            foreign: 0,
            misrouted: 0,
            replayed: 0,
            message_before_hello: false,
            v1_duplicates: 0,
            v1_reordered: 0,
            confirmed: 0,
            scratch: Vec::new(),
        }
    }

    /// Distinct messages of this run received so far.
    #[inline]
    pub fn received(&self) -> u64 {
        self.seq.counts().unique
    }

    pub fn histogram(&self) -> Option<&Histogram<u32>> {
        self.hist.as_ref()
    }

    /// Accounts for one data message (a text or binary message, reassembled
    /// if it came in fragments) received at `now_ns`.
    #[inline]
    pub fn on_message(&mut self, opcode: u8, msg: &[u8], now_ns: u64) {
        match self.cfg.protocol {
            Protocol::Raw => self.payload(msg, now_ns, None),
            Protocol::HubbubV1 => self.envelope(opcode, msg, now_ns),
        }
    }

    fn envelope(&mut self, opcode: u8, msg: &[u8], now_ns: u64) {
        if opcode != frame::OP_TEXT {
            self.foreign += 1; // hubbub.v1 servers send JSON text only
            return;
        }
        // Taken out for the call (no allocation), so `data` may borrow it
        // while `self` is updated.
        let mut scratch = std::mem::take(&mut self.scratch);
        match envelope::parse(msg, &mut scratch) {
            Err(_) => self.foreign += 1,
            Ok(Envelope::Other) => {}
            Ok(Envelope::Hello { offset }) => {
                if self.base.is_none() {
                    self.base = Some(offset.saturating_add(1));
                }
            }
            Ok(Envelope::Message { offset, data, .. }) => {
                let base = match self.base {
                    Some(b) => b,
                    None => {
                        self.message_before_hello = true;
                        self.base = Some(offset);
                        offset
                    }
                };
                if offset < base {
                    self.replayed += 1;
                } else {
                    match self.offsets.record(0, offset - base) {
                        Outcome::Duplicate => self.v1_duplicates += 1,
                        o => {
                            let late = o == Outcome::Late;
                            if late {
                                self.v1_reordered += 1;
                            }
                            self.payload(data, now_ns, Some(late));
                        }
                    }
                }
            }
        }
        self.scratch = scratch;
    }

    /// One message body. `offset_late` is `None` for raw, and for
    /// `hubbub.v1` whether its offset already counted as reordered.
    #[inline]
    fn payload(&mut self, body: &[u8], now_ns: u64, offset_late: Option<bool>) {
        let c = &self.cfg;
        match payload::decode(body, c.size) {
            Ok(Header {
                run,
                sender,
                seq,
                ts_ns,
            }) if run == c.run && (sender as usize) < c.senders => {
                if sender % c.rooms != c.room {
                    self.misrouted += 1;
                    return;
                }
                if c.me == Some(sender) && seq >= self.confirmed {
                    self.confirmed = seq + 1;
                }
                match self.seq.record(sender as usize, seq) {
                    Outcome::Duplicate => {
                        // Raw: counted by the tracker. v1: the same message
                        // under a new offset.
                        if offset_late.is_some() {
                            self.v1_duplicates += 1;
                        }
                        return;
                    }
                    Outcome::Late if offset_late == Some(false) => {
                        // Offsets in order but this sender's messages not.
                        self.v1_reordered += 1;
                    }
                    _ => {}
                }
                if let Some(h) = self.hist.as_mut() {
                    latency::record_ns(h, now_ns.saturating_sub(ts_ns));
                }
            }
            _ => self.foreign += 1,
        }
    }

    /// Loss, order and delivery counts given how many messages each sender
    /// (all rooms) sent; only the senders of this reader's room count.
    pub fn summary(&self, sent: &[u64]) -> Summary {
        let c = &self.cfg;
        let in_room: Vec<u64> = sent
            .iter()
            .enumerate()
            .map(|(s, &n)| if s as u32 % c.rooms == c.room { n } else { 0 })
            .collect();
        let seq = self.seq.counts();
        match c.protocol {
            Protocol::Raw => {
                let (lost_gaps, lost_tail) = self.seq.lost_parts(&in_room);
                Summary {
                    counts: seq,
                    lost_gaps,
                    lost_tail,
                }
            }
            Protocol::HubbubV1 => {
                // Offsets never seen below the highest one seen.
                let (holes, _) = self.offsets.lost_parts(&[0]);
                let room_sent: u64 = in_room.iter().sum();
                Summary {
                    counts: Counts {
                        unique: seq.unique,
                        reordered: self.v1_reordered,
                        duplicates: self.v1_duplicates,
                        gaps: self.offsets.counts().gaps,
                    },
                    lost_gaps: holes,
                    lost_tail: room_sent.saturating_sub(seq.unique + holes),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: u16 = 0x1234;

    fn cfg(protocol: Protocol, senders: usize, room: u32, rooms: u32) -> AccountCfg {
        AccountCfg {
            protocol,
            run: RUN,
            senders,
            room,
            rooms,
            me: None,
            size: Some(64),
            track_latency: true,
        }
    }

    fn body(sender: u32, seq: u64) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        payload::encode(
            &mut b,
            &Header {
                run: RUN,
                sender,
                seq,
                ts_ns: 1_000,
            },
        );
        b
    }

    fn raw(a: &mut Account, sender: u32, seq: u64) {
        a.on_message(frame::OP_TEXT, &body(sender, seq), 2_000_000);
    }

    fn env(a: &mut Account, offset: u64, sender: u32, seq: u64) {
        let b = body(sender, seq);
        let s = format!(
            r#"{{"type":"message","offset":{offset},"ts":1,"data":"{}"}}"#,
            std::str::from_utf8(&b).unwrap()
        );
        a.on_message(frame::OP_TEXT, s.as_bytes(), 2_000_000);
    }

    fn hello(a: &mut Account, offset: u64) {
        let s =
            format!(r#"{{"type":"hello","room":"r","epoch":"e","offset":{offset},"online":1}}"#);
        a.on_message(frame::OP_TEXT, s.as_bytes(), 0);
    }

    #[test]
    fn raw_counts_only_the_senders_of_its_room() {
        // 4 senders over 2 rooms: this reader is in room 1 (senders 1 and 3).
        let mut a = Account::new(cfg(Protocol::Raw, 4, 1, 2));
        for seq in 0..10 {
            raw(&mut a, 1, seq);
            if seq != 4 {
                raw(&mut a, 3, seq);
            }
        }
        raw(&mut a, 0, 0); // room 0's message: a routing error
        raw(&mut a, 2, 5);
        a.on_message(frame::OP_TEXT, b"someone chatting", 0);
        assert_eq!(a.received(), 19);
        assert_eq!(a.misrouted, 2);
        assert_eq!(a.foreign, 1);
        // Senders 0 and 2 sent 100 each into the other room: not expected here.
        let s = a.summary(&[100, 10, 100, 12]);
        assert_eq!((s.lost_gaps, s.lost_tail), (1, 2));
        assert_eq!(s.counts.unique, 19);
        assert_eq!(a.histogram().unwrap().len(), 19);
    }

    #[test]
    fn v1_skips_hello_presence_and_replayed_history() {
        let mut a = Account::new(cfg(Protocol::HubbubV1, 2, 0, 1));
        hello(&mut a, 40);
        a.on_message(frame::OP_TEXT, br#"{"type":"presence","online":3}"#, 0);
        // History on join: 39 and 40, someone else's chat.
        a.on_message(
            frame::OP_TEXT,
            br#"{"type":"message","offset":39,"ts":1,"data":"hi"}"#,
            0,
        );
        a.on_message(
            frame::OP_TEXT,
            br#"{"type":"message","offset":40,"ts":1,"data":"there"}"#,
            0,
        );
        for i in 0..10u64 {
            env(&mut a, 41 + 2 * i, 0, i);
            env(&mut a, 42 + 2 * i, 1, i);
        }
        a.on_message(frame::OP_TEXT, br#"{"type":"presence","online":2}"#, 0);
        assert_eq!(a.replayed, 2);
        assert_eq!(a.foreign, 0);
        assert!(!a.message_before_hello);
        let s = a.summary(&[10, 10]);
        assert_eq!(
            s,
            Summary {
                counts: Counts {
                    unique: 20,
                    ..Counts::default()
                },
                lost_gaps: 0,
                lost_tail: 0
            }
        );
        // Two more sent that never arrived: the tail.
        assert_eq!(a.summary(&[11, 11]).lost_tail, 2);
    }

    #[test]
    fn v1_offset_gaps_duplicates_and_reordering() {
        let mut a = Account::new(cfg(Protocol::HubbubV1, 1, 0, 1));
        hello(&mut a, 0);
        env(&mut a, 1, 0, 0);
        env(&mut a, 2, 0, 1);
        env(&mut a, 5, 0, 4); // 3 and 4 missing
        env(&mut a, 5, 0, 4); // same offset again
        env(&mut a, 3, 0, 2); // late: fills one hole
        env(&mut a, 6, 0, 2); // new offset, same message: a duplicate too
        env(&mut a, 8, 0, 6); // 7 missing
        let s = a.summary(&[8]);
        assert_eq!(s.counts.unique, 5); // seq 0, 1, 4, 2, 6
        assert_eq!(s.counts.duplicates, 2);
        assert_eq!(s.counts.reordered, 1);
        assert_eq!(s.counts.gaps, 2);
        assert_eq!(s.lost_gaps, 2); // offsets 4 and 7
        assert_eq!(s.lost_tail, 1); // 8 sent, 5 arrived, 2 in holes
        assert_eq!(a.histogram().unwrap().len(), 5);
    }

    #[test]
    fn v1_offsets_in_order_but_a_sender_reordered() {
        let mut a = Account::new(cfg(Protocol::HubbubV1, 1, 0, 1));
        hello(&mut a, 0);
        env(&mut a, 1, 0, 1);
        env(&mut a, 2, 0, 0);
        let s = a.summary(&[2]);
        assert_eq!(
            (s.counts.unique, s.counts.reordered, s.lost_gaps),
            (2, 1, 0)
        );
    }

    #[test]
    fn v1_first_message_lost_is_a_gap_from_hello() {
        let mut a = Account::new(cfg(Protocol::HubbubV1, 1, 0, 1));
        hello(&mut a, 10);
        env(&mut a, 12, 0, 1); // offset 11 (seq 0) never came
        let s = a.summary(&[2]);
        assert_eq!((s.lost_gaps, s.lost_tail), (1, 0));
    }

    #[test]
    fn v1_without_hello_starts_at_the_first_offset() {
        let mut a = Account::new(cfg(Protocol::HubbubV1, 1, 0, 1));
        env(&mut a, 100, 0, 0);
        env(&mut a, 101, 0, 1);
        assert!(a.message_before_hello);
        assert_eq!(a.summary(&[2]).counts.unique, 2);
    }

    #[test]
    fn v1_bad_envelopes_binary_frames_and_other_rooms() {
        let mut a = Account::new(cfg(Protocol::HubbubV1, 2, 0, 2));
        hello(&mut a, 0);
        a.on_message(frame::OP_TEXT, b"not json", 0);
        a.on_message(frame::OP_BINARY, br#"{"type":"presence","online":1}"#, 0);
        env(&mut a, 1, 0, 0);
        env(&mut a, 2, 1, 0); // sender 1 is in room 1
        assert_eq!((a.foreign, a.misrouted, a.received()), (2, 1, 1));
        // The misrouted message still took an offset of this room: no gap.
        assert_eq!(a.summary(&[1, 1]).lost_gaps, 0);
    }

    #[test]
    fn own_echo_confirms() {
        let mut a = Account::new(AccountCfg {
            me: Some(1),
            ..cfg(Protocol::HubbubV1, 2, 1, 2)
        });
        hello(&mut a, 0);
        env(&mut a, 1, 1, 0);
        env(&mut a, 2, 1, 1);
        assert_eq!(a.confirmed, 2);
        let mut r = Account::new(AccountCfg {
            me: Some(0),
            ..cfg(Protocol::Raw, 1, 0, 1)
        });
        raw(&mut r, 0, 4);
        assert_eq!(r.confirmed, 5);
    }
}

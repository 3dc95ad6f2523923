//! The benchmark message body.
//!
//! Every message the tool sends is plain ASCII text (so it passes servers
//! that relay text only), of an exact requested size, laid out as
//!
//! ```text
//! hb RRRR SSSSSS QQQQQQQQQQ TTTTTTTTTTTTTT ........
//! |  |    |      |          |              `- '.' padding up to the size
//! |  |    |      |          `- send timestamp, ns since the run's epoch (14 hex)
//! |  |    |      `- sequence number of this sender, from 0 (10 hex)
//! |  |    `- sender id (6 hex)
//! |  `- run tag (4 hex): tells this run's messages from anyone else's
//! `- magic
//! ```
//!
//! (without the spaces). All fields are fixed-width lowercase hex, so encoding
//! and decoding touch no allocator and decoding can reject anything that is
//! not exactly one of our messages.

/// Length of the fixed header; the smallest message the tool can send.
pub const HEADER_LEN: usize = 2 + 4 + 6 + 10 + 14;
/// Largest sender id that fits the 6-hex-digit field.
pub const MAX_SENDER: u32 = 0xff_ffff;
/// Largest sequence number that fits the 10-hex-digit field.
pub const MAX_SEQ: u64 = 0xff_ffff_ffff;
/// Largest timestamp (ns) that fits the 14-hex-digit field (about 2.2 years).
pub const MAX_TS: u64 = 0xff_ffff_ffff_ffff;

const MAGIC: &[u8; 2] = b"hb";
const PAD: u8 = b'.';
const HEX: &[u8; 16] = b"0123456789abcdef";

/// What a benchmark message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub run: u16,
    pub sender: u32,
    pub seq: u64,
    pub ts_ns: u64,
}

/// Why a received message was not one of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the header, or not the size this run sends.
    Size,
    /// Wrong magic, a non-hex digit, or a padding byte that is not '.'.
    Format,
}

fn put_hex(out: &mut [u8], mut v: u64) {
    for b in out.iter_mut().rev() {
        *b = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

#[inline]
fn hex_val(c: u8) -> Option<u64> {
    match c {
        b'0'..=b'9' => Some(u64::from(c - b'0')),
        b'a'..=b'f' => Some(u64::from(c - b'a' + 10)),
        _ => None,
    }
}

#[inline]
fn get_hex(s: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for &c in s {
        v = (v << 4) | hex_val(c)?;
    }
    Some(v)
}

/// Writes one message into `out`, which must be exactly the message size
/// (at least [`HEADER_LEN`]). Values wider than their fields are an error of
/// the caller and panic in debug builds; in release they are truncated.
pub fn encode(out: &mut [u8], h: &Header) {
    assert!(out.len() >= HEADER_LEN, "message smaller than the header");
    debug_assert!(h.sender <= MAX_SENDER && h.seq <= MAX_SEQ && h.ts_ns <= MAX_TS);
    out[0..2].copy_from_slice(MAGIC);
    put_hex(&mut out[2..6], u64::from(h.run));
    put_hex(&mut out[6..12], u64::from(h.sender));
    put_hex(&mut out[12..22], h.seq);
    put_hex(&mut out[22..36], h.ts_ns);
    out[HEADER_LEN..].fill(PAD);
}

/// Rewrites only the sequence number and timestamp of a message that was
/// already encoded by [`encode`] (the hot path of a sender).
pub fn restamp(out: &mut [u8], seq: u64, ts_ns: u64) {
    put_hex(&mut out[12..22], seq);
    put_hex(&mut out[22..36], ts_ns);
}

/// Whether every byte is the padding byte. Checked in 256-byte blocks with
/// no early exit inside a block, which the compiler vectorizes: a 60 KB
/// message takes under a microsecond instead of about 17 (a byte-by-byte
/// `any`), per reader, on the tool's one thread.
fn all_padding(s: &[u8]) -> bool {
    s.chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | (b ^ PAD)) == 0)
}

/// Decodes a message. `expect_len`, when given, is the exact size this run
/// sends; anything else is rejected, so truncation or padding by a server
/// cannot go unnoticed.
pub fn decode(msg: &[u8], expect_len: Option<usize>) -> Result<Header, DecodeError> {
    if msg.len() < HEADER_LEN {
        return Err(DecodeError::Size);
    }
    if let Some(n) = expect_len {
        if msg.len() != n {
            return Err(DecodeError::Size);
        }
    }
    if &msg[0..2] != MAGIC {
        return Err(DecodeError::Format);
    }
    let run = get_hex(&msg[2..6]).ok_or(DecodeError::Format)?;
    let sender = get_hex(&msg[6..12]).ok_or(DecodeError::Format)?;
    let seq = get_hex(&msg[12..22]).ok_or(DecodeError::Format)?;
    let ts_ns = get_hex(&msg[22..36]).ok_or(DecodeError::Format)?;
    if !all_padding(&msg[HEADER_LEN..]) {
        return Err(DecodeError::Format);
    }
    Ok(Header {
        run: run as u16,
        sender: sender as u32,
        seq,
        ts_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            run: 0xbeef,
            sender: 4242,
            seq: 123_456_789,
            ts_ns: 98_765_432_101,
        }
    }

    #[test]
    fn round_trip_at_requested_sizes() {
        for size in [HEADER_LEN, 37, 64, 100, 1024, 65536] {
            let mut buf = vec![0u8; size];
            encode(&mut buf, &sample());
            assert_eq!(buf.len(), size);
            assert!(
                std::str::from_utf8(&buf).is_ok(),
                "payload must be valid UTF-8 text"
            );
            assert_eq!(decode(&buf, Some(size)), Ok(sample()));
            assert_eq!(decode(&buf, None), Ok(sample()));
        }
    }

    #[test]
    fn extreme_field_values_round_trip() {
        for h in [
            Header {
                run: 0,
                sender: 0,
                seq: 0,
                ts_ns: 0,
            },
            Header {
                run: u16::MAX,
                sender: MAX_SENDER,
                seq: MAX_SEQ,
                ts_ns: MAX_TS,
            },
        ] {
            let mut buf = [0u8; 64];
            encode(&mut buf, &h);
            assert_eq!(decode(&buf, Some(64)), Ok(h));
        }
    }

    #[test]
    fn restamp_changes_only_seq_and_time() {
        let mut buf = [0u8; 64];
        encode(&mut buf, &sample());
        restamp(&mut buf, 7, 99);
        let h = decode(&buf, Some(64)).unwrap();
        assert_eq!(
            h,
            Header {
                seq: 7,
                ts_ns: 99,
                ..sample()
            }
        );
    }

    #[test]
    fn rejects_wrong_size_and_garbage() {
        let mut buf = [0u8; 64];
        encode(&mut buf, &sample());
        assert_eq!(decode(&buf[..63], Some(64)), Err(DecodeError::Size));
        assert_eq!(decode(&buf[..HEADER_LEN - 1], None), Err(DecodeError::Size));
        assert_eq!(
            decode(b"hello world, I am a person typing in the chat", None),
            Err(DecodeError::Format)
        );
        let mut bad = buf;
        bad[0] = b'x';
        assert_eq!(decode(&bad, Some(64)), Err(DecodeError::Format));
        let mut bad = buf;
        bad[15] = b'G';
        assert_eq!(decode(&bad, Some(64)), Err(DecodeError::Format));
        let mut bad = buf;
        bad[63] = b'!';
        assert_eq!(decode(&bad, Some(64)), Err(DecodeError::Format));
    }

    #[test]
    fn large_messages_reject_one_bad_padding_byte_anywhere() {
        let size = 61_440;
        let mut buf = vec![0u8; size];
        encode(&mut buf, &sample());
        assert_eq!(decode(&buf, Some(size)), Ok(sample()));
        // First padding byte, block edges of the check, the middle, the last byte.
        for at in [
            HEADER_LEN,
            HEADER_LEN + 255,
            HEADER_LEN + 256,
            size / 2,
            size - 1,
        ] {
            let mut bad = buf.clone();
            bad[at] = b'-';
            assert_eq!(
                decode(&bad, Some(size)),
                Err(DecodeError::Format),
                "at {at}"
            );
        }
    }
}

//! A minimal RFC 6455 frame codec for the data path.
//!
//! The opening handshake is done by tungstenite; after it the tool talks to
//! the raw socket: it decodes server frames (normally unmasked) from one
//! reusable buffer per connection, and encodes client frames, which RFC 6455
//! requires to be masked.

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A frame header as parsed from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    /// Bytes taken by the header itself (2 to 14).
    pub header_len: usize,
    pub payload_len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// RSV bits set (no extension was negotiated).
    Reserved,
    /// An opcode RFC 6455 does not define.
    BadOpcode(u8),
    /// A control frame that is fragmented or longer than 125 bytes.
    BadControl,
    /// A 64-bit length with the top bit set.
    BadLength,
    /// The frame is larger than this reader accepts.
    TooBig(u64),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Reserved => write!(f, "frame with reserved bits set"),
            FrameError::BadOpcode(op) => write!(f, "unknown opcode {op:#x}"),
            FrameError::BadControl => write!(f, "fragmented or oversized control frame"),
            FrameError::BadLength => write!(f, "invalid 64-bit frame length"),
            FrameError::TooBig(n) => write!(f, "frame of {n} bytes exceeds the reader's limit"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Parses a frame header from the start of `buf`. `Ok(None)` means more bytes
/// are needed.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    match opcode {
        OP_CONT | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin || (b1 & 0x7f) > 125 {
                return Err(FrameError::BadControl);
            }
        }
        op => return Err(FrameError::BadOpcode(op)),
    }
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7f;
    let (payload_len, mut pos) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n >> 63 != 0 {
                return Err(FrameError::BadLength);
            }
            (n, 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(FrameHeader {
        fin,
        opcode,
        mask,
        header_len: pos,
        payload_len,
    }))
}

/// XORs `data` with the 4-byte masking key (masking and unmasking are the same).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let m = u32::from_ne_bytes(mask);
    let m64 = (u64::from(m) << 32) | u64::from(m);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ m64;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Appends a frame header (FIN set) for a payload of `len` bytes; `masked`
/// sets the mask bit, whose key the caller appends.
fn push_header(out: &mut Vec<u8>, opcode: u8, len: usize, masked: bool) {
    let m = if masked { 0x80 } else { 0 };
    out.push(0x80 | (opcode & 0x0f));
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= 0xffff {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Appends one complete, unmasked frame (FIN set) as a server sends it; the
/// `floor` mode writes these straight to its sockets.
pub fn encode_server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    push_header(out, opcode, payload.len(), false);
    out.extend_from_slice(payload);
}

/// Appends one complete, masked client frame (FIN set) to `out`.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    push_header(out, opcode, payload.len(), true);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// Cheap, non-cryptographic source of masking keys (xorshift64*). RFC 6455
/// asks for unpredictable keys to protect intermediaries from cache
/// poisoning by hostile page scripts; a load generator on loopback has no
/// such adversary, and this keeps the sender path free of syscalls.
#[derive(Debug, Clone)]
pub struct MaskGen(u64);

impl MaskGen {
    pub fn new(seed: u64) -> Self {
        MaskGen(seed | 1)
    }

    pub fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32).to_le_bytes()[..4]
            .try_into()
            .expect("4 bytes")
    }
}

/// One decoded frame, borrowing its (unmasked) payload from the reader.
#[derive(Debug)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// A reusable read buffer with an incremental frame parser.
///
/// Usage: read from the socket into [`FrameReader::spare`], call
/// [`FrameReader::filled`] with the count, then call
/// [`FrameReader::next_frame`] until it returns `Ok(None)`. The buffer
/// starts small and only grows when a single frame is larger than it (up to
/// `max_frame`), so a connection carrying chat-sized messages keeps a small
/// fixed footprint and the receive path does not allocate.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame: usize,
}

impl FrameReader {
    pub fn new(capacity: usize, max_frame: usize) -> Self {
        let capacity = capacity.max(16);
        FrameReader {
            buf: vec![0u8; capacity],
            start: 0,
            end: 0,
            max_frame,
        }
    }

    /// Bytes received but not yet consumed as frames.
    pub fn pending(&self) -> usize {
        self.end - self.start
    }

    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Free space to read into; never empty. Moves a partial frame to the
    /// front first, and grows the buffer when the partial frame needs it.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        // Little room left at the tail: move the partial frame to the front.
        if self.start > 0 && self.buf.len() - self.end < self.buf.len() / 4 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // One frame larger than the whole buffer: grow (rare path). The
            // header is always parsed before this (the buffer holds >= 16
            // bytes), so a frame over `max_frame` is refused, not buffered.
            let cap = self.max_frame.saturating_add(14);
            let new_len = (self.buf.len() * 2).min(cap).max(self.buf.len() + 1);
            self.buf.resize(new_len, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Marks `n` bytes of [`FrameReader::spare`] as filled.
    pub fn filled(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.buf.len());
        self.end += n;
    }

    /// Returns the next complete frame, unmasking it in place if it is
    /// masked. `Ok(None)`: need more bytes.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, FrameError> {
        let avail = &self.buf[self.start..self.end];
        let Some(h) = parse_header(avail)? else {
            return Ok(None);
        };
        if h.payload_len > self.max_frame as u64 {
            return Err(FrameError::TooBig(h.payload_len));
        }
        let total = h.header_len + h.payload_len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let p0 = self.start + h.header_len;
        let p1 = self.start + total;
        self.start = p1;
        let payload = &mut self.buf[p0..p1];
        if let Some(m) = h.mask {
            apply_mask(payload, m);
        }
        Ok(Some(Frame {
            fin: h.fin,
            opcode: h.opcode,
            payload: &self.buf[p0..p1],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds an unmasked server frame.
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let n = payload.len();
        if n < 126 {
            v.push(n as u8);
        } else if n <= 0xffff {
            v.push(126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            v.push(127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn encoder_uses_7_16_and_64_bit_lengths_and_masks() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for (len, hdr_len, len_byte) in [
            (0usize, 6usize, 0u8),
            (125, 6, 125),
            (126, 8, 126),
            (65535, 8, 126),
            (65536, 14, 127),
        ] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode_frame(&mut out, OP_TEXT, &payload, mask);
            assert_eq!(out.len(), hdr_len + len, "len {len}");
            assert_eq!(out[0], 0x81);
            assert_eq!(
                out[1],
                0x80 | len_byte,
                "mask bit and length code for {len}"
            );
            let h = parse_header(&out).unwrap().unwrap();
            assert_eq!(h.header_len, hdr_len);
            assert_eq!(h.payload_len, len as u64);
            assert_eq!(h.mask, Some(mask));
            // On the wire the payload is masked: byte i is payload[i] ^ mask[i % 4].
            for (i, b) in out[hdr_len..].iter().enumerate() {
                assert_eq!(*b, payload[i] ^ mask[i % 4]);
            }
            // The reader unmasks it back.
            let mut r = FrameReader::new(16, 1 << 20);
            let mut fed = 0;
            let frame_payload = loop {
                let sp = r.spare();
                let n = sp.len().min(out.len() - fed);
                sp[..n].copy_from_slice(&out[fed..fed + n]);
                r.filled(n);
                fed += n;
                if let Some(f) = r.next_frame().unwrap() {
                    break f.payload.to_vec();
                }
                assert!(fed < out.len(), "reader did not produce the frame");
            };
            assert_eq!(frame_payload, payload);
        }
    }

    #[test]
    fn mask_is_an_involution_for_all_lengths() {
        let mask = [0xde, 0xad, 0xbe, 0xef];
        for len in 0..40 {
            let orig: Vec<u8> = (0..len as u8).collect();
            let mut d = orig.clone();
            apply_mask(&mut d, mask);
            for (i, b) in d.iter().enumerate() {
                assert_eq!(*b, orig[i] ^ mask[i % 4]);
            }
            apply_mask(&mut d, mask);
            assert_eq!(d, orig);
        }
    }

    #[test]
    fn header_needs_all_its_bytes() {
        let f = server_frame(true, OP_BINARY, &[7u8; 300]); // 16-bit length
        for cut in 0..4 {
            assert_eq!(parse_header(&f[..cut]).unwrap(), None, "cut at {cut}");
        }
        let h = parse_header(&f[..4]).unwrap().unwrap();
        assert_eq!((h.header_len, h.payload_len, h.mask), (4, 300, None));
        let f = server_frame(true, OP_BINARY, &vec![1u8; 70_000]); // 64-bit length
        for cut in 0..10 {
            assert_eq!(parse_header(&f[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(parse_header(&f[..10]).unwrap().unwrap().payload_len, 70_000);
    }

    #[test]
    fn reader_handles_every_split_point() {
        let mut stream = Vec::new();
        stream.extend(server_frame(true, OP_TEXT, b"first"));
        stream.extend(server_frame(true, OP_PING, b"p"));
        stream.extend(server_frame(false, OP_TEXT, b"frag-"));
        stream.extend(server_frame(true, OP_CONT, b"ment"));
        stream.extend(server_frame(true, OP_BINARY, &[9u8; 200]));
        stream.extend(server_frame(true, OP_CLOSE, &[0x03, 0xe8]));
        let expect: Vec<(bool, u8, Vec<u8>)> = vec![
            (true, OP_TEXT, b"first".to_vec()),
            (true, OP_PING, b"p".to_vec()),
            (false, OP_TEXT, b"frag-".to_vec()),
            (true, OP_CONT, b"ment".to_vec()),
            (true, OP_BINARY, vec![9u8; 200]),
            (true, OP_CLOSE, vec![0x03, 0xe8]),
        ];
        // Feed the stream in two pieces split at every possible point, and in
        // 1-byte and 7-byte chunks, through a deliberately small buffer.
        let mut plans: Vec<Vec<usize>> = (0..=stream.len())
            .map(|s| vec![s, stream.len() - s])
            .collect();
        plans.push(vec![1; stream.len()]);
        plans.push({
            let mut v = vec![7; stream.len() / 7];
            v.push(stream.len() % 7);
            v
        });
        for plan in plans {
            let mut r = FrameReader::new(32, 4096);
            let mut got = Vec::new();
            let mut off = 0;
            for chunk in plan {
                let mut left = chunk;
                while left > 0 {
                    let sp = r.spare();
                    let n = sp.len().min(left);
                    sp[..n].copy_from_slice(&stream[off..off + n]);
                    r.filled(n);
                    off += n;
                    left -= n;
                    while let Some(f) = r.next_frame().unwrap() {
                        got.push((f.fin, f.opcode, f.payload.to_vec()));
                    }
                }
            }
            assert_eq!(got, expect);
            assert_eq!(r.pending(), 0);
        }
    }

    #[test]
    fn reader_unmasks_masked_frames_and_rejects_bad_ones() {
        let mut out = Vec::new();
        encode_frame(&mut out, OP_TEXT, b"masked from a peer", [1, 2, 3, 4]);
        let mut r = FrameReader::new(64, 1024);
        r.spare()[..out.len()].copy_from_slice(&out);
        r.filled(out.len());
        assert_eq!(
            r.next_frame().unwrap().unwrap().payload,
            b"masked from a peer"
        );

        assert_eq!(parse_header(&[0xC1, 0x00]), Err(FrameError::Reserved));
        assert_eq!(parse_header(&[0x83, 0x00]), Err(FrameError::BadOpcode(3)));
        assert_eq!(parse_header(&[0x09, 0x00]), Err(FrameError::BadControl)); // fragmented ping
        assert_eq!(
            parse_header(&[0x89, 126, 0, 200]),
            Err(FrameError::BadControl)
        );
        let mut big = vec![0x82, 127];
        big.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(parse_header(&big), Err(FrameError::BadLength));

        let f = server_frame(true, OP_BINARY, &[0u8; 2000]);
        let mut r = FrameReader::new(64, 1000);
        r.spare()[..64].copy_from_slice(&f[..64]);
        r.filled(64);
        assert_eq!(r.next_frame().unwrap_err(), FrameError::TooBig(2000));
    }

    #[test]
    fn reader_takes_60k_frames_in_any_chunking() {
        // 61,440 bytes (the large-message scenario) is a 16-bit length;
        // 65,535 the largest 16-bit one; 65,536 and 70,000 take 64 bits.
        let sizes = [61_440usize, 61_440, 65_535, 65_536, 61_440, 70_000, 61_440];
        let mut stream = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..n).map(|j| ((i * 7 + j) % 251) as u8).collect();
            let f = server_frame(true, OP_TEXT, &payload);
            assert_eq!(
                f[1],
                if n <= 0xffff { 126 } else { 127 },
                "length form of {n}"
            );
            stream.extend(f);
        }
        // Whole reads of all sizes, odd ones so frames and headers straddle them.
        for chunk in [1usize, 3, 1000, 4096, 61_443, 65_536, 200_000] {
            for start_cap in [256usize, 4096] {
                let mut r = FrameReader::new(start_cap, 1 << 20);
                let mut got = Vec::new();
                let mut off = 0;
                while off < stream.len() {
                    let sp = r.spare();
                    let n = sp.len().min(chunk).min(stream.len() - off);
                    sp[..n].copy_from_slice(&stream[off..off + n]);
                    r.filled(n);
                    off += n;
                    while let Some(f) = r.next_frame().unwrap() {
                        assert!(f.fin && f.opcode == OP_TEXT);
                        let i = got.len();
                        assert!(
                            f.payload
                                .iter()
                                .enumerate()
                                .all(|(j, &b)| b == ((i * 7 + j) % 251) as u8),
                            "payload {i} (chunk {chunk}, start {start_cap})"
                        );
                        got.push(f.payload.len());
                    }
                }
                assert_eq!(got, sizes, "chunk {chunk}, start {start_cap}");
                assert_eq!(r.pending(), 0);
                // Grown by doubling to hold the largest frame, no further.
                assert!(r.capacity() >= 70_010 && r.capacity() <= 2 * 70_010);
            }
        }
        // A reader that has only seen 60 KB frames stops growing at 64 KiB.
        let one = server_frame(true, OP_TEXT, &[b'.'; 61_440]);
        let mut r = FrameReader::new(4096, 1 << 20);
        for _ in 0..50 {
            let mut off = 0;
            while off < one.len() {
                let sp = r.spare();
                let n = sp.len().min(one.len() - off);
                sp[..n].copy_from_slice(&one[off..off + n]);
                r.filled(n);
                off += n;
            }
            assert_eq!(r.next_frame().unwrap().unwrap().payload.len(), 61_440);
        }
        assert_eq!(r.capacity(), 65_536);
    }

    #[test]
    fn reader_keeps_its_buffer_when_frames_fit() {
        let f = server_frame(true, OP_TEXT, &[b'x'; 64]);
        let mut r = FrameReader::new(4096, 1 << 20);
        for _ in 0..10_000 {
            let sp = r.spare();
            let n = sp.len().min(f.len());
            sp[..n].copy_from_slice(&f[..n]);
            r.filled(n);
            // Feed the rest when the spare area was short.
            if n < f.len() {
                let sp = r.spare();
                sp[..f.len() - n].copy_from_slice(&f[n..]);
                r.filled(f.len() - n);
            }
            assert_eq!(r.next_frame().unwrap().unwrap().payload.len(), 64);
        }
        assert_eq!(r.capacity(), 4096);
    }

    #[test]
    fn mask_generator_varies() {
        let mut g = MaskGen::new(42);
        let a = g.next_mask();
        let b = g.next_mask();
        assert_ne!(a, b);
    }
}

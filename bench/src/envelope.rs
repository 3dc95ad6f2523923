//! The `hubbub.v1` server envelopes, parsed just far enough for the tool.
//!
//! A `hubbub.v1` server wraps every message in one JSON object per text
//! frame (see `docs/protocol.md`):
//!
//! ```text
//! {"type":"hello","room":"lobby","epoch":"18c2f0a9e3b1d7c4","offset":42,"online":3,...}
//! {"type":"message","offset":43,"ts":1764525600123,"data":"hello"}
//! {"type":"message","offset":44,"ts":1764525600456,"binary":true,"data":"AAEC"}
//! {"type":"presence","online":4}
//! ```
//!
//! The tool needs only `type`, `offset`, `binary` and `data`, on every
//! delivery, so instead of building a JSON tree this is a single pass over
//! the object that keeps those four and skips every other member (any JSON
//! value, nested or not). It is still a real JSON parser for what it reads:
//! members in any order, whitespace anywhere JSON allows it, escaped keys,
//! every string escape (`\uXXXX` and surrogate pairs included), raw control
//! characters and malformed values refused, nothing after the object. The
//! `data` string is only decoded for a `message`: borrowed straight from the
//! frame when it has no escape (the tool's own messages never need one),
//! unescaped or base64-decoded into a caller-owned scratch buffer otherwise.
//! Nothing is allocated per delivery once the scratch buffer has grown.
//!
//! Not checked: that the text is valid UTF-8 (a WebSocket text frame
//! already must be, and the tool's payload decoder refuses anything that is
//! not its own ASCII messages), and duplicate keys (the last one wins).

/// One parsed envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope<'a> {
    /// The first frame: `offset` is the room's latest offset when the client
    /// joined (history and live messages follow it).
    Hello { offset: u64 },
    /// A message of the room with its offset; `data` is the text exactly as
    /// it was sent, or the decoded bytes of a binary message.
    Message {
        offset: u64,
        binary: bool,
        data: &'a [u8],
    },
    /// `presence`, `error` or a type this tool does not know: skipped.
    Other,
}

/// Why a frame is not a well-formed envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not JSON, or not one JSON object.
    Syntax,
    /// No `type` string.
    NoType,
    /// A `hello` or `message` without a usable `offset` (a non-negative
    /// integer that fits 64 bits).
    Offset,
    /// A `message` without a `data` string, or a `binary` that is not a boolean.
    Data,
    /// A binary message whose `data` is not standard base64.
    Base64,
}

impl std::fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EnvelopeError::Syntax => "not a JSON object",
            EnvelopeError::NoType => "no \"type\" string",
            EnvelopeError::Offset => "no usable \"offset\"",
            EnvelopeError::Data => "no \"data\" string or a \"binary\" that is not a boolean",
            EnvelopeError::Base64 => "binary \"data\" that is not base64",
        })
    }
}

impl std::error::Error for EnvelopeError {}

type Res<T> = Result<T, EnvelopeError>;

/// Deepest nesting of skipped values accepted (serde_json's default limit).
const MAX_DEPTH: usize = 128;

/// A JSON string seen in the input: the bytes between its quotes, still
/// escaped, and whether there is any escape in them.
#[derive(Debug, Clone, Copy)]
struct RawStr {
    start: usize,
    end: usize,
    escaped: bool,
}

/// The value of an integer member, or why it was not one.
#[derive(Debug, Clone, Copy)]
enum Int {
    Ok(u64),
    /// A JSON number, but negative, fractional, with an exponent or too large.
    Unusable,
    /// Some other JSON value.
    NotNumber,
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

/// Whether any byte of `c` ends a plain run inside a JSON string: a quote,
/// a backslash or a control character. No early exit, so it vectorizes.
#[inline]
fn chunk_has_special(c: &[u8]) -> bool {
    c.iter().fold(false, |acc, &b| {
        acc | (b == b'"') | (b == b'\\') | (b < 0x20)
    })
}

impl<'a> Parser<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    #[inline]
    fn eat(&mut self, b: u8) -> Res<()> {
        if self.peek() == Some(b) {
            self.i += 1;
            Ok(())
        } else {
            Err(EnvelopeError::Syntax)
        }
    }

    fn literal(&mut self, word: &[u8]) -> Res<()> {
        if self.s[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(EnvelopeError::Syntax)
        }
    }

    /// Skips plain string bytes, 32 at a time while none is special (a
    /// 60 KB message body is scanned at memory speed, not byte by byte).
    #[inline]
    fn skip_plain(&mut self) {
        const CHUNK: usize = 32;
        while self.i + CHUNK <= self.s.len() && !chunk_has_special(&self.s[self.i..self.i + CHUNK])
        {
            self.i += CHUNK;
        }
        while let Some(b) = self.peek() {
            if b == b'"' || b == b'\\' || b < 0x20 {
                break;
            }
            self.i += 1;
        }
    }

    /// A string, the opening quote next. Validates its escapes without
    /// decoding them.
    fn string(&mut self) -> Res<RawStr> {
        self.eat(b'"')?;
        let start = self.i;
        let mut escaped = false;
        loop {
            self.skip_plain();
            match self.peek() {
                Some(b'"') => {
                    let end = self.i;
                    self.i += 1;
                    return Ok(RawStr {
                        start,
                        end,
                        escaped,
                    });
                }
                Some(b'\\') => {
                    escaped = true;
                    self.i += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            let hex = self.s.get(self.i + 1..self.i + 5);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return Err(EnvelopeError::Syntax);
                            }
                            self.i += 5;
                        }
                        _ => return Err(EnvelopeError::Syntax),
                    }
                }
                // A raw control character, or the end of the input.
                _ => return Err(EnvelopeError::Syntax),
            }
        }
    }

    /// A number (JSON grammar); its value if it is a non-negative integer
    /// that fits 64 bits.
    fn number(&mut self) -> Res<Int> {
        let mut usable = true;
        if self.peek() == Some(b'-') {
            self.i += 1;
            usable = false;
        }
        let digits = self.i;
        let mut v: u64 = 0;
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                while let Some(d @ b'0'..=b'9') = self.peek() {
                    match v
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u64::from(d - b'0')))
                    {
                        Some(n) => v = n,
                        None => usable = false,
                    }
                    self.i += 1;
                }
            }
            _ => return Err(EnvelopeError::Syntax),
        }
        debug_assert!(self.i > digits);
        if self.peek() == Some(b'.') {
            usable = false;
            self.i += 1;
            self.digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            usable = false;
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.digits()?;
        }
        Ok(if usable { Int::Ok(v) } else { Int::Unusable })
    }

    /// One or more digits.
    fn digits(&mut self) -> Res<()> {
        let from = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        if self.i == from {
            Err(EnvelopeError::Syntax)
        } else {
            Ok(())
        }
    }

    /// An integer member's value: a number is parsed, anything else skipped.
    fn int(&mut self) -> Res<Int> {
        match self.peek() {
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => {
                self.value(0)?;
                Ok(Int::NotNumber)
            }
        }
    }

    /// Skips any JSON value.
    fn value(&mut self, depth: usize) -> Res<()> {
        if depth > MAX_DEPTH {
            return Err(EnvelopeError::Syntax);
        }
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'-' | b'0'..=b'9') => self.number().map(drop),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'[') => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    self.value(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(EnvelopeError::Syntax),
                    }
                }
            }
            Some(b'{') => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    self.string()?;
                    self.ws();
                    self.eat(b':')?;
                    self.ws();
                    self.value(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(EnvelopeError::Syntax),
                    }
                }
            }
            _ => Err(EnvelopeError::Syntax),
        }
    }
}

/// The four keys the tool reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Type,
    Offset,
    Binary,
    Data,
    Other,
}

fn key_of(k: &[u8]) -> Key {
    match k {
        b"type" => Key::Type,
        b"offset" => Key::Offset,
        b"binary" => Key::Binary,
        b"data" => Key::Data,
        _ => Key::Other,
    }
}

/// Which key an escaped key string spells (rare: servers do not escape keys).
fn key_of_escaped(raw: &[u8]) -> Key {
    let mut buf = Vec::new();
    match unescape_into(raw, &mut buf) {
        Ok(()) => key_of(&buf),
        Err(_) => Key::Other,
    }
}

fn hex4(h: &[u8]) -> u32 {
    h.iter().fold(0u32, |v, &c| {
        (v << 4)
            | match c {
                b'0'..=b'9' => u32::from(c - b'0'),
                b'a'..=b'f' => u32::from(c - b'a' + 10),
                _ => u32::from(c - b'A' + 10),
            }
    })
}

/// Decodes the escapes of a string body (already checked by
/// [`Parser::string`]) into `out`, as UTF-8. A lone surrogate is an error.
fn unescape_into(raw: &[u8], out: &mut Vec<u8>) -> Res<()> {
    out.clear();
    out.reserve(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let Some(p) = raw[i..].iter().position(|&b| b == b'\\') else {
            out.extend_from_slice(&raw[i..]);
            break;
        };
        out.extend_from_slice(&raw[i..i + p]);
        i += p + 1;
        let c = raw[i];
        i += 1;
        let byte = match c {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let hi = hex4(&raw[i..i + 4]);
                i += 4;
                let cp = match hi {
                    0xd800..=0xdbff => {
                        // A high surrogate must be followed by an escaped low one.
                        if raw.get(i..i + 2) != Some(b"\\u") || raw.len() < i + 6 {
                            return Err(EnvelopeError::Syntax);
                        }
                        let lo = hex4(&raw[i + 2..i + 6]);
                        if !(0xdc00..=0xdfff).contains(&lo) {
                            return Err(EnvelopeError::Syntax);
                        }
                        i += 6;
                        0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                    }
                    0xdc00..=0xdfff => return Err(EnvelopeError::Syntax),
                    cp => cp,
                };
                let ch = char::from_u32(cp).ok_or(EnvelopeError::Syntax)?;
                let mut b = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                continue;
            }
            _ => return Err(EnvelopeError::Syntax),
        };
        out.push(byte);
    }
    Ok(())
}

fn b64_val(c: u8) -> Option<u32> {
    Some(u32::from(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    }))
}

/// Decodes standard base64 (RFC 4648 alphabet `+/`) into `out`. Padding
/// with `=` may be present (then the length is a multiple of 4) or left
/// out; unused trailing bits must be zero.
pub fn base64_decode_into(s: &[u8], out: &mut Vec<u8>) -> Result<(), EnvelopeError> {
    out.clear();
    let body = if s.len().is_multiple_of(4) {
        match s {
            [rest @ .., b'=', b'='] => rest,
            [rest @ .., b'='] => rest,
            _ => s,
        }
    } else {
        s
    };
    if body.len() % 4 == 1 {
        return Err(EnvelopeError::Base64);
    }
    out.reserve(body.len() / 4 * 3 + 2);
    let mut chunks = body.chunks_exact(4);
    for c in &mut chunks {
        let mut v = 0u32;
        for &b in c {
            v = (v << 6) | b64_val(b).ok_or(EnvelopeError::Base64)?;
        }
        out.extend_from_slice(&v.to_be_bytes()[1..]);
    }
    let rest = chunks.remainder();
    let mut v = 0u32;
    for &b in rest {
        v = (v << 6) | b64_val(b).ok_or(EnvelopeError::Base64)?;
    }
    match rest.len() {
        0 => {}
        2 => {
            if v & 0xf != 0 {
                return Err(EnvelopeError::Base64);
            }
            out.push((v >> 4) as u8);
        }
        3 => {
            if v & 0x3 != 0 {
                return Err(EnvelopeError::Base64);
            }
            out.extend_from_slice(&((v >> 2) as u16).to_be_bytes());
        }
        _ => unreachable!("length 1 refused above"),
    }
    Ok(())
}

/// Parses one server frame of `hubbub.v1`. `scratch` holds the decoded
/// `data` of a message whose data had escapes or was binary; the returned
/// envelope borrows either `frame` or `scratch`.
pub fn parse<'a>(frame: &'a [u8], scratch: &'a mut Vec<u8>) -> Result<Envelope<'a>, EnvelopeError> {
    if let Some(e) = parse_exact(frame) {
        return Ok(e);
    }
    parse_general(frame, scratch)
}

/// The fast path: a text message written exactly the way hubbub writes it
/// (serde_json, members in declaration order, no whitespace):
/// `{"type":"message","offset":N,"ts":N,"data":"..."}` with no escape in
/// the data. Anything else: `None`, and [`parse_general`] decides; for
/// what it accepts the result is the general parser's (tested).
#[inline]
fn parse_exact(f: &[u8]) -> Option<Envelope<'_>> {
    const HEAD: &[u8] = br#"{"type":"message","offset":"#;
    const TS: &[u8] = br#","ts":"#;
    const DATA: &[u8] = br#","data":""#;
    let rest = f.strip_prefix(HEAD)?;
    let (offset, rest) = exact_uint(rest)?;
    let rest = rest.strip_prefix(TS)?;
    let (_, rest) = exact_uint(rest)?;
    let data_and_end = rest.strip_prefix(DATA)?;
    // The data ends at the first special byte, which must be its closing
    // quote, followed by the end of the object and of the frame.
    let mut p = Parser {
        s: data_and_end,
        i: 0,
    };
    p.skip_plain();
    if &data_and_end[p.i..] != b"\"}" {
        return None;
    }
    Some(Envelope::Message {
        offset,
        binary: false,
        data: &data_and_end[..p.i],
    })
}

/// A JSON integer at the start of `s` that is a valid JSON number on its
/// own (no leading zero) of at most 19 digits (so it fits 64 bits), and
/// the rest of `s` (a fraction or exponent there fails the caller's next
/// match).
#[inline]
fn exact_uint(s: &[u8]) -> Option<(u64, &[u8])> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 19 || (n > 1 && s[0] == b'0') {
        return None;
    }
    let v = s[..n]
        .iter()
        .fold(0u64, |v, &d| v * 10 + u64::from(d - b'0'));
    Some((v, &s[n..]))
}

/// The general parser: any well-formed envelope.
fn parse_general<'a>(
    frame: &'a [u8],
    scratch: &'a mut Vec<u8>,
) -> Result<Envelope<'a>, EnvelopeError> {
    let mut p = Parser { s: frame, i: 0 };
    let mut ty: Option<RawStr> = None;
    let mut offset: Option<Int> = None;
    let mut binary: Option<Option<bool>> = None;
    let mut data: Option<Option<RawStr>> = None;
    p.ws();
    p.eat(b'{')?;
    p.ws();
    if p.peek() == Some(b'}') {
        p.i += 1;
    } else {
        loop {
            p.ws();
            let k = p.string()?;
            let key_raw = &frame[k.start..k.end];
            let key = if k.escaped {
                key_of_escaped(key_raw)
            } else {
                key_of(key_raw)
            };
            p.ws();
            p.eat(b':')?;
            p.ws();
            match key {
                Key::Type => {
                    ty = if p.peek() == Some(b'"') {
                        Some(p.string()?)
                    } else {
                        p.value(0)?;
                        None
                    };
                }
                Key::Offset => offset = Some(p.int()?),
                Key::Binary => {
                    binary = Some(match p.peek() {
                        Some(b't') => p.literal(b"true").map(|()| Some(true))?,
                        Some(b'f') => p.literal(b"false").map(|()| Some(false))?,
                        _ => p.value(0).map(|()| None)?,
                    });
                }
                Key::Data => {
                    data = Some(if p.peek() == Some(b'"') {
                        Some(p.string()?)
                    } else {
                        p.value(0)?;
                        None
                    });
                }
                Key::Other => p.value(0)?,
            }
            p.ws();
            match p.peek() {
                Some(b',') => p.i += 1,
                Some(b'}') => {
                    p.i += 1;
                    break;
                }
                _ => return Err(EnvelopeError::Syntax),
            }
        }
    }
    p.ws();
    if p.i != frame.len() {
        return Err(EnvelopeError::Syntax);
    }

    let ty = ty.ok_or(EnvelopeError::NoType)?;
    let ty_raw = &frame[ty.start..ty.end];
    let mut tmp = Vec::new();
    let ty_bytes: &[u8] = if ty.escaped {
        unescape_into(ty_raw, &mut tmp)?;
        &tmp
    } else {
        ty_raw
    };
    let offset = || match offset {
        Some(Int::Ok(v)) => Ok(v),
        _ => Err(EnvelopeError::Offset),
    };
    match ty_bytes {
        b"hello" => Ok(Envelope::Hello { offset: offset()? }),
        b"message" => {
            let offset = offset()?;
            let binary = match binary {
                None => false,
                Some(Some(b)) => b,
                Some(None) => return Err(EnvelopeError::Data),
            };
            let d = data.flatten().ok_or(EnvelopeError::Data)?;
            let raw = &frame[d.start..d.end];
            let data: &[u8] = if binary {
                if d.escaped {
                    // Base64 has no character that needs escaping, but "\/" is
                    // a legal way to write '/'.
                    let mut text = Vec::new();
                    unescape_into(raw, &mut text)?;
                    base64_decode_into(&text, scratch)?;
                } else {
                    base64_decode_into(raw, scratch)?;
                }
                scratch
            } else if d.escaped {
                unescape_into(raw, scratch)?;
                scratch
            } else {
                raw
            };
            Ok(Envelope::Message {
                offset,
                binary,
                data,
            })
        }
        _ => Ok(Envelope::Other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<(String, Option<u64>, bool, Vec<u8>), EnvelopeError> {
        let mut scratch = Vec::new();
        Ok(match parse(s.as_bytes(), &mut scratch)? {
            Envelope::Hello { offset } => ("hello".into(), Some(offset), false, vec![]),
            Envelope::Message {
                offset,
                binary,
                data,
            } => ("message".into(), Some(offset), binary, data.to_vec()),
            Envelope::Other => ("other".into(), None, false, vec![]),
        })
    }

    fn msg(s: &str) -> (u64, bool, Vec<u8>) {
        match p(s) {
            Ok((t, Some(o), b, d)) if t == "message" => (o, b, d),
            other => panic!("{s}: {other:?}"),
        }
    }

    /// A reference base64 encoder (standard alphabet, padded).
    fn b64(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in data.chunks(3) {
            let v = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for k in 0..4 {
                if k <= c.len() {
                    out.push(A[(v >> (18 - 6 * k) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn the_documented_examples() {
        assert_eq!(
            p(
                r#"{"type":"hello","room":"lobby","epoch":"18c2f0a9e3b1d7c4","offset":42,"online":3,"max_message_bytes":65536}"#
            ),
            Ok(("hello".into(), Some(42), false, vec![]))
        );
        assert_eq!(
            msg(r#"{"type":"message","offset":43,"ts":1764525600123,"data":"hello"}"#),
            (43, false, b"hello".to_vec())
        );
        assert_eq!(
            msg(r#"{"type":"message","offset":44,"ts":1764525600456,"binary":true,"data":"AAEC"}"#),
            (44, true, vec![0, 1, 2])
        );
        assert_eq!(p(r#"{"type":"presence","online":4}"#).unwrap().0, "other");
        assert_eq!(
            p(r#"{"type":"error","code":"rate_limited","message":"slow down"}"#)
                .unwrap()
                .0,
            "other"
        );
        // A hello that says whether a resume recovered everything.
        assert_eq!(
            p(r#"{"type":"hello","room":"a","epoch":"x","offset":0,"online":1,"recovered":false}"#),
            Ok(("hello".into(), Some(0), false, vec![]))
        );
    }

    #[test]
    fn plain_data_is_borrowed_from_the_frame() {
        let f = br#"{"type":"message","offset":7,"data":"hb0001000000000000000000000000000000.."}"#;
        let mut scratch = Vec::new();
        let Ok(Envelope::Message { data, .. }) = parse(f, &mut scratch) else {
            panic!()
        };
        let fr = f.as_ptr_range();
        assert!(fr.contains(&data.as_ptr()), "not copied");
        assert_eq!(data, b"hb0001000000000000000000000000000000..");
    }

    #[test]
    fn members_in_any_order_with_whitespace_and_unknown_fields() {
        let want = (9, false, b"x y".to_vec());
        for s in [
            r#"{"data":"x y","offset":9,"type":"message"}"#,
            r#"{"ts":1,"data":"x y","type":"message","offset":9}"#,
            " \t\r\n{ \"type\" : \"message\" ,\n \"offset\"\t:\t9 , \"data\" : \"x y\" } \n",
            r#"{"type":"message","offset":9,"data":"x y","new":{"nested":[1,-2.5e+3,true,false,null,{"k":"}]\"{"}],"s":"\"data\":\"no\""},"z":[]}"#,
            r#"{"extra":[[[[]]]],"type":"message","binary":false,"offset":9,"data":"x y","e":{}}"#,
            // Escaped keys are still the keys.
            r#"{"\u0074ype":"message","off\u0073et":9,"d\u0061ta":"x y"}"#,
            // An escaped type value.
            r#"{"type":"mess\u0061ge","offset":9,"data":"x y"}"#,
        ] {
            assert_eq!(msg(s), want, "{s}");
        }
    }

    #[test]
    fn every_string_escape() {
        assert_eq!(
            msg(r#"{"type":"message","offset":1,"data":"q\" b\\ s\/ \b\f\n\r\t end"}"#).2,
            b"q\" b\\ s/ \x08\x0c\n\r\t end".to_vec()
        );
        // \u escapes: ASCII, 2- and 3-byte UTF-8, a surrogate pair (U+1F600).
        assert_eq!(
            msg(r#"{"type":"message","offset":1,"data":"\u0041\u00e9\u20AC\ud83d\ude00\u0000"}"#).2,
            "A\u{e9}\u{20ac}\u{1f600}\u{0}".as_bytes().to_vec()
        );
        // Raw UTF-8 passes through untouched.
        assert_eq!(
            msg(r#"{"type":"message","offset":1,"data":"聊天室 ✓"}"#).2,
            "聊天室 ✓".as_bytes().to_vec()
        );
        // Escapes at the very start and end, and a whole escaped payload.
        assert_eq!(
            msg(r#"{"type":"message","offset":1,"data":"\"\""}"#).2,
            b"\"\"".to_vec()
        );
        let payload = "hb00010000010000000000000000000000002e..";
        let escaped: String = payload
            .chars()
            .map(|c| format!("\\u{:04x}", c as u32))
            .collect();
        assert_eq!(
            msg(&format!(
                r#"{{"type":"message","offset":1,"data":"{escaped}"}}"#
            ))
            .2,
            payload.as_bytes()
        );
    }

    #[test]
    fn bad_escapes_and_strings_are_refused() {
        for s in [
            r#"{"type":"message","offset":1,"data":"\x"}"#,
            r#"{"type":"message","offset":1,"data":"\u12"}"#,
            r#"{"type":"message","offset":1,"data":"\u12g4"}"#,
            r#"{"type":"message","offset":1,"data":"\ud83d"}"#, // lone high surrogate
            r#"{"type":"message","offset":1,"data":"\ud83dx"}"#,
            r#"{"type":"message","offset":1,"data":"\ud83d\u0041"}"#, // high + non-low
            r#"{"type":"message","offset":1,"data":"\ude00"}"#,       // lone low surrogate
            "{\"type\":\"message\",\"offset\":1,\"data\":\"a\nb\"}",  // raw control character
            r#"{"type":"message","offset":1,"data":"unterminated}"#,
            r#"{"type":"message","offset":1,"data":"trailing\"#,
        ] {
            assert_eq!(p(s), Err(EnvelopeError::Syntax), "{s}");
        }
    }

    #[test]
    fn binary_data_is_base64_decoded() {
        for n in 0..70usize {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let s = format!(
                r#"{{"type":"message","offset":5,"ts":1,"binary":true,"data":"{}"}}"#,
                b64(&bytes)
            );
            assert_eq!(msg(&s), (5, true, bytes), "{s}");
        }
        // Every byte value, and '/' written as "\/".
        let all: Vec<u8> = (0..=255).collect();
        let enc = b64(&all).replace('/', "\\/");
        assert!(enc.contains("\\/"));
        let s = format!(r#"{{"binary":true,"type":"message","offset":6,"data":"{enc}"}}"#);
        assert_eq!(msg(&s).2, all);
        // Unpadded is accepted too.
        assert_eq!(
            msg(r#"{"type":"message","offset":1,"binary":true,"data":"AAE"}"#).2,
            vec![0, 1]
        );
        for bad in [
            "A", "AAE=A", "A===", "AA=A", "AB==", "AAF=", "AA*A", "AAAA=",
        ] {
            let s = format!(r#"{{"type":"message","offset":1,"binary":true,"data":"{bad}"}}"#);
            assert_eq!(p(&s), Err(EnvelopeError::Base64), "{bad}");
        }
        // "binary": false is text.
        assert_eq!(
            msg(r#"{"type":"message","offset":1,"binary":false,"data":"AAEC"}"#),
            (1, false, b"AAEC".to_vec())
        );
    }

    #[test]
    fn hello_presence_and_unknown_types_are_not_messages() {
        for s in [
            r#"{"type":"presence","online":4}"#,
            r#"{"type":"error","code":"x","message":"y"}"#,
            r#"{"type":"typing","who":{"a":[1,2,{"b":"}"}]},"offset":"not a number"}"#,
            r#"{"type":"Message","offset":1,"data":"case matters"}"#,
            r#"{"online":4,"type":"presence"}"#,
        ] {
            assert_eq!(p(s).unwrap().0, "other", "{s}");
        }
        assert_eq!(
            p(r#"{"online":3,"offset":41,"room":"r","type":"hello","epoch":"e"}"#).unwrap(),
            ("hello".into(), Some(41), false, vec![])
        );
    }

    #[test]
    fn offsets_must_be_non_negative_64_bit_integers() {
        assert_eq!(
            msg(r#"{"type":"message","offset":18446744073709551615,"data":""}"#).0,
            u64::MAX
        );
        assert_eq!(msg(r#"{"type":"message","offset":0,"data":""}"#).0, 0);
        for o in [
            "-1",
            "1.0",
            "1e2",
            "18446744073709551616",
            "\"5\"",
            "null",
            "true",
        ] {
            let s = format!(r#"{{"type":"message","offset":{o},"data":""}}"#);
            assert_eq!(p(&s), Err(EnvelopeError::Offset), "{o}");
            let s = format!(r#"{{"type":"hello","offset":{o}}}"#);
            assert_eq!(p(&s), Err(EnvelopeError::Offset), "{o}");
        }
        assert_eq!(
            p(r#"{"type":"message","data":""}"#),
            Err(EnvelopeError::Offset)
        );
        // Not JSON numbers at all.
        for o in ["01", "+1", "1.", ".5", "1e", "-", "0x10"] {
            let s = format!(r#"{{"type":"message","offset":{o},"data":""}}"#);
            assert_eq!(p(&s), Err(EnvelopeError::Syntax), "{o}");
        }
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        assert_eq!(p(r#"{"offset":1,"data":"x"}"#), Err(EnvelopeError::NoType));
        assert_eq!(
            p(r#"{"type":5,"offset":1,"data":"x"}"#),
            Err(EnvelopeError::NoType)
        );
        assert_eq!(
            p(r#"{"type":"message","offset":1}"#),
            Err(EnvelopeError::Data)
        );
        assert_eq!(
            p(r#"{"type":"message","offset":1,"data":5}"#),
            Err(EnvelopeError::Data)
        );
        assert_eq!(
            p(r#"{"type":"message","offset":1,"data":"x","binary":"yes"}"#),
            Err(EnvelopeError::Data)
        );
        for s in [
            "",
            "   ",
            "[]",
            "\"message\"",
            "{",
            "{}x",
            r#"{"type":"message","offset":1,"data":"x"}{"#,
            r#"{"type":"message","offset":1,"data":"x",}"#,
            r#"{"type":"message","offset":1 "data":"x"}"#,
            r#"{"type":"message","offset":1,"data":"x"]"#,
            r#"{"type":"message","offset":1,"data":"x","k":tru}"#,
            r#"{"type":"message","offset":1,"data":"x","k":[1,]}"#,
            r#"{"type":"message","offset":1,"data":"x","k":{"a"}}"#,
            r#"{type:"message","offset":1,"data":"x"}"#,
            r#"{'type':'message'}"#,
        ] {
            assert_eq!(p(s), Err(EnvelopeError::Syntax), "{s:?}");
        }
        assert_eq!(p("{}"), Err(EnvelopeError::NoType));
        // Nesting far past any real envelope is refused, not a stack overflow.
        let deep = format!(
            r#"{{"type":"presence","x":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(p(&deep), Err(EnvelopeError::Syntax));
        let ok = format!(
            r#"{{"type":"presence","x":{}{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert_eq!(p(&ok).unwrap().0, "other");
    }

    #[test]
    fn long_data_is_scanned_in_chunks_correctly() {
        // Quotes, backslashes and control characters at every position
        // around the 32-byte chunk edges of a long string.
        for len in [31usize, 32, 33, 63, 64, 65, 61_440] {
            let body: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            let s = format!(r#"{{"type":"message","offset":3,"data":"{body}"}}"#);
            assert_eq!(msg(&s).2, body.as_bytes());
            for at in [0, 1, 30, 31, 32, 33, len / 2, len - 1] {
                if at >= len {
                    continue;
                }
                let mut esc = body.clone();
                esc.replace_range(at..at + 1, "\\\"");
                let mut want = body.clone().into_bytes();
                want[at] = b'"';
                let s = format!(r#"{{"type":"message","offset":3,"data":"{esc}"}}"#);
                assert_eq!(msg(&s).2, want, "len {len} at {at}");
                let mut ctl = body.clone();
                ctl.replace_range(at..at + 1, "\u{1}");
                let s = format!(r#"{{"type":"message","offset":3,"data":"{ctl}"}}"#);
                assert_eq!(p(&s), Err(EnvelopeError::Syntax), "len {len} at {at}");
            }
        }
    }

    #[test]
    fn the_fast_path_takes_hubbubs_own_shape_only_and_agrees() {
        let hubbub = |o: &str, ts: &str, data: &str| {
            format!(r#"{{"type":"message","offset":{o},"ts":{ts},"data":"{data}"}}"#)
        };
        let body = "hb00010000020000000003000000000000000004".to_string() + &".".repeat(60);
        for (s, fast) in [
            (hubbub("43", "1764525600123", "hello"), true),
            (hubbub("0", "0", ""), true),
            (hubbub("9999999999999999999", "1", &body), true),
            // 20 digits: the general path decides (this one fits) ...
            (hubbub("18446744073709551615", "1", "x"), false),
            // ... and this one does not.
            (hubbub("18446744073709551616", "1", "x"), false),
            (hubbub("043", "1", "x"), false), // not JSON
            (hubbub("4.5", "1", "x"), false),
            (hubbub("45", "1e3", "x"), false),
            (hubbub("45", "-1", "x"), false),
            (hubbub("45", "1", "a\\\"b"), false),   // an escape
            (hubbub("45", "1", "a\\u0041"), false), // an escape
            (hubbub("45", "1", "a\tb"), false),     // a raw control character: refused
            (hubbub("45", "1", "x") + " ", false),
            (hubbub("45", "1", "x") + "x", false),
            (hubbub("45", "1", "x").replace("\"}", "\",\"z\":1}"), false),
            (
                r#"{"type":"message","offset":45,"ts":1,"binary":true,"data":"AAEC"}"#.into(),
                false,
            ),
            (
                r#"{"type":"message","offset":45,"ts":1,"data":"x""#.into(),
                false,
            ),
            (
                r#"{"type":"message","offset":45,"ts":1,"data":"x"#.into(),
                false,
            ),
            (
                r#"{"type":"message","offset":45,"ts":1,"data":"#.into(),
                false,
            ),
            (r#"{"type":"message","offset":45"#.into(), false),
        ] {
            let b = s.as_bytes();
            assert_eq!(parse_exact(b).is_some(), fast, "{s}");
            let mut s1 = Vec::new();
            let mut s2 = Vec::new();
            assert_eq!(parse(b, &mut s1), parse_general(b, &mut s2), "{s}");
        }
    }

    /// The parser agrees with serde_json on generated envelopes: same
    /// offset and data when serde_json reads a message, a refusal when
    /// serde_json refuses the text.
    #[test]
    fn agrees_with_serde_json() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let pieces = [
            "a",
            "\\\"",
            "\\\\",
            "\\/",
            "\\n",
            "\\u00e9",
            "\\ud83d\\ude00",
            "é",
            " ",
            "\\t",
            "z",
        ];
        let noise = [
            "\"ts\":1764525600123",
            "\"x\":{\"y\":[1,2,{\"z\":\"}\"}]}",
            "\"n\":null",
            "\"f\":-0.5e-3",
            "\"s\":\"\\\"offset\\\":9\"",
            "\"b\":[true,false]",
        ];
        let (mut agreed_ok, mut agreed_err, mut fast) = (0, 0, 0u64);
        for _ in 0..3000 {
            let mut text = String::new();
            for _ in 0..rnd(12) {
                text.push_str(pieces[rnd(pieces.len() as u64) as usize]);
            }
            let offset = rnd(1 << 40);
            let mut members = vec![
                "\"type\":\"message\"".to_string(),
                format!("\"offset\":{offset}"),
                format!("\"data\":\"{text}\""),
            ];
            for _ in 0..rnd(3) {
                members.push(noise[rnd(noise.len() as u64) as usize].to_string());
            }
            let mut s = if rnd(3) == 0 {
                // hubbub's own shape (the fast path, when the data has no escape).
                format!(
                    r#"{{"type":"message","offset":{offset},"ts":{},"data":"{text}"}}"#,
                    rnd(1 << 50)
                )
            } else {
                // Shuffle.
                for i in (1..members.len()).rev() {
                    members.swap(i, rnd(i as u64 + 1) as usize);
                }
                format!("{{{}}}", members.join(","))
            };
            // Sometimes break it.
            if rnd(5) == 0 {
                let mut cut = rnd(s.len() as u64) as usize;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
            }
            let reference: Result<serde_json::Value, _> = serde_json::from_str(&s);
            let mut scratch = Vec::new();
            let mine = parse(s.as_bytes(), &mut scratch);
            let mut scratch2 = Vec::new();
            assert_eq!(mine, parse_general(s.as_bytes(), &mut scratch2), "{s}");
            fast += u64::from(parse_exact(s.as_bytes()).is_some());
            match reference {
                Ok(v) => {
                    let Ok(Envelope::Message {
                        offset: o, data, ..
                    }) = mine
                    else {
                        panic!("{s}: serde_json reads it, we got {mine:?}");
                    };
                    assert_eq!(Some(o), v["offset"].as_u64(), "{s}");
                    assert_eq!(Some(data), v["data"].as_str().map(str::as_bytes), "{s}");
                    agreed_ok += 1;
                }
                Err(_) => {
                    assert!(mine.is_err(), "{s}: serde_json refuses it, we got {mine:?}");
                    agreed_err += 1;
                }
            }
        }
        assert!(
            agreed_ok > 2000 && agreed_err > 300,
            "{agreed_ok} {agreed_err}"
        );
        assert!(fast > 100, "the fast path was taken {fast} times");
    }
}

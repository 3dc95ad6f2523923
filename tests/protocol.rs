//! The WebSocket protocol enforced byte by byte, from a raw TCP client below
//! any WebSocket library: each violation gets the close code RFC 6455
//! prescribes, every message the peer sent before it reaches everyone (the
//! sender included) before the close, and the other peers are unaffected.

mod common;

use common::*;
use hubbub::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client frame with every header bit under the test's control.
struct Frame<'a> {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    payload: &'a [u8],
    /// Announce this length instead of the payload's (the payload is then
    /// not sent at all).
    announce: Option<u64>,
}

impl<'a> Frame<'a> {
    fn new(opcode: u8, payload: &'a [u8]) -> Frame<'a> {
        Frame {
            fin: true,
            rsv: 0,
            opcode,
            masked: true,
            payload,
            announce: None,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = vec![(u8::from(self.fin) << 7) | (self.rsv << 4) | self.opcode];
        let mask_bit = if self.masked { 0x80 } else { 0 };
        let len = self.announce.unwrap_or(self.payload.len() as u64);
        if self.announce.is_some() || len > 65535 {
            out.push(mask_bit | 127);
            out.extend_from_slice(&len.to_be_bytes());
        } else if len > 125 {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | len as u8);
        }
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        if self.masked {
            out.extend_from_slice(&mask);
        }
        if self.announce.is_none() {
            out.extend(self.payload.iter().enumerate().map(|(i, b)| {
                if self.masked {
                    b ^ mask[i % 4]
                } else {
                    *b
                }
            }));
        }
        out
    }
}

/// Reads one server frame: (opcode, payload).
async fn read_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut head))
        .await
        .expect("a frame in time")
        .ok()?;
    let mut len = u64::from(head[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        stream.read_exact(&mut b).await.ok()?;
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        stream.read_exact(&mut b).await.ok()?;
        len = u64::from_be_bytes(b);
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head[0] & 0x0f, payload))
}

/// The data frames the server sent before its close frame, and the close
/// code.
async fn until_close(stream: &mut TcpStream) -> (Vec<String>, Option<u16>) {
    let mut texts = Vec::new();
    while let Some((opcode, payload)) = read_frame(stream).await {
        match opcode {
            0x1 => texts.push(String::from_utf8_lossy(&payload).into_owned()),
            0x8 => {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                return (texts, code);
            }
            _ => {}
        }
    }
    (texts, None)
}

/// Sends "before" then `violation`; checks the sender gets "before" and
/// then close `code`, and a watcher gets "before" and stays.
async fn check(server: &TestServer, name: &str, violation: &[u8], code: u16) {
    check_with(server, name, violation, code, true).await
}

/// As [`check`]; without `sender_copy` the sender's own copy of "before" is
/// not required. That is for violations inside a close frame: once a close
/// frame is read, tungstenite answers it and sends no more data, so what
/// the peer sent just before can reach everyone but the peer itself.
async fn check_with(
    server: &TestServer,
    name: &str,
    violation: &[u8],
    code: u16,
    sender_copy: bool,
) {
    let mut watcher = server.connect().await;
    let mut raw = raw_handshake(server.ws, "").await.expect("handshake");
    let before = format!("before {name}");
    let mut bytes = Frame::new(0x1, before.as_bytes()).bytes();
    bytes.extend_from_slice(violation);
    raw.write_all(&bytes).await.expect("write");
    let (texts, got) = until_close(&mut raw).await;
    if sender_copy || !texts.is_empty() {
        assert_eq!(
            texts,
            vec![before.clone()],
            "{name}: what the sender got first"
        );
    }
    assert_eq!(got, Some(code), "{name}: close code");
    assert_eq!(next_text(&mut watcher).await, before, "{name}: the watcher");
    send_text(&mut watcher, "still here").await;
    assert_eq!(next_text(&mut watcher).await, "still here", "{name}");
}

#[tokio::test]
async fn each_violation_gets_its_close_code_after_what_came_before() {
    let server = TestServer::start(Config {
        max_message_bytes: 1024,
        ..Config::ephemeral()
    })
    .await;
    let unmasked = Frame {
        masked: false,
        ..Frame::new(0x1, b"hi")
    };
    check(&server, "unmasked", &unmasked.bytes(), 1002).await;
    let rsv = Frame {
        rsv: 0b100,
        ..Frame::new(0x1, b"hi")
    };
    check(&server, "reserved bit", &rsv.bytes(), 1002).await;
    check(&server, "opcode 3", &Frame::new(0x3, b"").bytes(), 1002).await;
    check(&server, "opcode 11", &Frame::new(0xB, b"").bytes(), 1002).await;
    let big_ping = vec![b'p'; 126];
    check(
        &server,
        "control over 125",
        &Frame::new(0x9, &big_ping).bytes(),
        1002,
    )
    .await;
    let split_ping = Frame {
        fin: false,
        ..Frame::new(0x9, b"p")
    };
    check(&server, "fragmented control", &split_ping.bytes(), 1002).await;
    check(
        &server,
        "lone continuation",
        &Frame::new(0x0, b"x").bytes(),
        1002,
    )
    .await;
    let mut nested = Frame {
        fin: false,
        ..Frame::new(0x1, b"first half")
    }
    .bytes();
    nested.extend(Frame::new(0x1, b"a new message").bytes());
    check(&server, "data inside a fragmented message", &nested, 1002).await;
    let top_bit = Frame {
        announce: Some(1 << 63),
        ..Frame::new(0x2, b"")
    };
    check(
        &server,
        "64-bit length with the top bit",
        &top_bit.bytes(),
        1002,
    )
    .await;
    let mut split_utf8 = Frame {
        fin: false,
        ..Frame::new(0x1, &[b'a', 0xE2, 0x82])
    }
    .bytes();
    split_utf8.extend(Frame::new(0x0, &[0x28, b'b']).bytes());
    check(&server, "invalid UTF-8 across fragments", &split_utf8, 1007).await;
    for (name, payload) in [
        ("close code 999", 999u16.to_be_bytes().to_vec()),
        ("close code 1005", 1005u16.to_be_bytes().to_vec()),
        ("close code 5000", 5000u16.to_be_bytes().to_vec()),
        ("one-byte close", vec![3]),
    ] {
        check_with(
            &server,
            name,
            &Frame::new(0x8, &payload).bytes(),
            1002,
            false,
        )
        .await;
    }
}

/// A length beyond `max_message_bytes` is refused as soon as it is
/// announced: the server closes with 1009 without waiting for the payload.
#[tokio::test]
async fn an_oversized_length_is_refused_before_its_payload() {
    let server = TestServer::start(Config {
        max_message_bytes: 1024,
        ..Config::ephemeral()
    })
    .await;
    let announced = Frame {
        announce: Some(10 * 1024 * 1024),
        ..Frame::new(0x2, b"")
    };
    check(&server, "oversized announcement", &announced.bytes(), 1009).await;
}

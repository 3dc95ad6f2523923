//! The `hubbub.v1` protocol: what a WebSocket URL asks for (which room,
//! resume from where) and the JSON envelopes the server sends to clients that
//! speak it. `docs/protocol.md` is the reference; the names here are its
//! names.
//!
//! Raw clients (no subprotocol) never see anything from this module but the
//! room chosen by their URL: they get messages exactly as sent.

use base64::Engine as _;
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::log::{Entry, Offset};
use crate::room::Outgoing;
use std::sync::Arc;

/// The subprotocol name a client asks for in `Sec-WebSocket-Protocol`.
pub const SUBPROTOCOL: &str = "hubbub.v1";

/// The room `/` stands for.
pub const LOBBY: &str = "lobby";

/// Longest room name, in characters.
pub const MAX_ROOM_NAME: usize = 64;

/// Longest epoch a client may send back.
const MAX_EPOCH: usize = 64;

/// What a peer's frames look like on the way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Messages exactly as sent, nothing else.
    Raw,
    /// JSON envelopes: hello, message, presence, error.
    V1,
}

/// Where a client asked to resume: after `since`, in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub since: Offset,
    pub epoch: String,
}

/// What a WebSocket URL asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub room: String,
    pub resume: Option<Resume>,
}

/// Why a URL was refused: the HTTP status and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

fn refusal(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// Reads the room and the resume point from a request's path and query.
pub fn target(path: &str, query: Option<&str>) -> Result<Target, Refusal> {
    let room = match path {
        "/" => LOBBY.to_string(),
        _ => {
            let Some(encoded) = path.strip_prefix("/rooms/") else {
                return Err(refusal(404, "no such path: connect to / or /rooms/<name>"));
            };
            room_name(encoded)?
        }
    };
    Ok(Target {
        room,
        resume: resume(query)?,
    })
}

/// A percent-encoded room name, decoded and checked.
pub fn room_name(encoded: &str) -> Result<String, Refusal> {
    let name = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .map_err(|_| refusal(400, "room name is not valid UTF-8 once percent-decoded"))?;
    if !valid_room_name(&name) {
        return Err(refusal(
            400,
            "a room name is 1 to 64 letters, digits, '-', '_' or '.'",
        ));
    }
    Ok(name.into_owned())
}

/// 1 to 64 characters, each a letter or digit of any script, `-`, `_`, `.`.
pub fn valid_room_name(name: &str) -> bool {
    let count = name.chars().count();
    (1..=MAX_ROOM_NAME).contains(&count)
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_epoch(epoch: &str) -> bool {
    (1..=MAX_EPOCH).contains(&epoch.len())
        && epoch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

fn resume(query: Option<&str>) -> Result<Option<Resume>, Refusal> {
    let (mut since, mut epoch) = (None, None);
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "since" => {
                let n = value
                    .parse::<Offset>()
                    .map_err(|_| refusal(400, "since must be a whole number (an offset)"))?;
                since = Some(n);
            }
            "epoch" => {
                if !valid_epoch(&value) {
                    return Err(refusal(
                        400,
                        "epoch must be 1 to 64 letters, digits, '-' or '_' (as hello gave it)",
                    ));
                }
                epoch = Some(value.into_owned());
            }
            // Other parameters (a token, a cache buster) are not ours.
            _ => {}
        }
    }
    match (since, epoch) {
        (Some(since), Some(epoch)) => Ok(Some(Resume { since, epoch })),
        (None, None) => Ok(None),
        _ => Err(refusal(400, "since and epoch go together")),
    }
}

/// Whether a `Sec-WebSocket-Protocol` header value lists `hubbub.v1`.
pub fn asks_for_v1<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> bool {
    values.into_iter().any(|v| {
        std::str::from_utf8(v).is_ok_and(|v| v.split(',').any(|p| p.trim() == SUBPROTOCOL))
    })
}

/// The frame for one envelope.
fn frame(envelope: &impl Serialize) -> Outgoing {
    // Serialising these plain structs cannot fail; an empty object would be
    // the answer if it ever did.
    let json = serde_json::to_string(envelope).unwrap_or_else(|_| "{}".into());
    Arc::new(Message::text(json))
}

#[derive(Serialize)]
struct Hello<'a> {
    r#type: &'static str,
    room: &'a str,
    epoch: &'a str,
    offset: Offset,
    online: usize,
    max_message_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a crate::auth::Identity>,
}

/// The first frame a `hubbub.v1` peer gets. `user`: who its token says it
/// is, when it came with one.
pub fn hello(
    room: &str,
    epoch: &str,
    offset: Offset,
    online: usize,
    max_message_bytes: usize,
    recovered: Option<bool>,
    user: Option<&crate::auth::Identity>,
) -> Outgoing {
    frame(&Hello {
        r#type: "hello",
        room,
        epoch,
        offset,
        online,
        max_message_bytes,
        recovered,
        user,
    })
}

#[derive(Serialize)]
struct Envelope<'a> {
    r#type: &'static str,
    offset: Offset,
    ts: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    binary: bool,
    data: std::borrow::Cow<'a, str>,
    /// `Some(None)` is written `"from":null` (an anonymous sender); `None`
    /// leaves the field out (no sender is ever verified on this server).
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<Option<&'a crate::auth::Identity>>,
}

/// A message's envelope. Encoded once per message and shared. `stamp`:
/// whether it carries `from` (see `room::Settings::stamp_from`).
pub fn message(entry: &Entry, stamp: bool) -> Outgoing {
    let (binary, data) = match &*entry.message {
        Message::Text(text) => (false, std::borrow::Cow::Borrowed(text.as_str())),
        Message::Binary(bytes) => (
            true,
            std::borrow::Cow::Owned(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
        _ => (false, std::borrow::Cow::Borrowed("")),
    };
    frame(&Envelope {
        r#type: "message",
        offset: entry.offset,
        ts: entry.ts,
        binary,
        data,
        from: stamp.then_some(entry.from.as_deref()),
    })
}

/// The envelope of `entry`, encoded the first time it is needed.
pub fn envelope_of(entry: &mut Entry, stamp: bool) -> Outgoing {
    if let Some(envelope) = &entry.envelope {
        return envelope.clone();
    }
    let envelope = message(entry, stamp);
    entry.envelope = Some(envelope.clone());
    envelope
}

#[derive(Serialize)]
struct Presence<'a> {
    r#type: &'static str,
    online: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    members: Option<&'a [std::sync::Arc<crate::auth::Identity>]>,
}

/// A presence notice; `members`: the verified users in the room, each
/// once, when the room is small enough to list them.
pub fn presence(
    online: usize,
    members: Option<&[std::sync::Arc<crate::auth::Identity>]>,
) -> Outgoing {
    frame(&Presence {
        r#type: "presence",
        online,
        members,
    })
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    r#type: &'static str,
    code: &'a str,
    message: &'a str,
}

/// A message refused without closing the connection: `code` is a short
/// snake_case word.
pub fn error(code: &str, message: &str) -> Outgoing {
    frame(&ErrorEnvelope {
        r#type: "error",
        code,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(m: &Outgoing) -> serde_json::Value {
        serde_json::from_str(m.to_text().unwrap_or("")).unwrap_or_default()
    }

    #[test]
    fn paths_name_rooms() {
        assert_eq!(target("/", None).map(|t| t.room), Ok("lobby".into()));
        assert_eq!(
            target("/rooms/lobby", None).map(|t| t.room),
            Ok("lobby".into())
        );
        assert_eq!(
            target("/rooms/%E8%81%8A%E5%A4%A9%E5%AE%A4", None).map(|t| t.room),
            Ok("聊天室".into())
        );
        assert_eq!(
            target("/rooms/a.b-c_d", None).map(|t| t.room),
            Ok("a.b-c_d".into())
        );
        assert_eq!(target("/chat", None).map_err(|r| r.status), Err(404));
        assert_eq!(target("/rooms/", None).map_err(|r| r.status), Err(400));
        assert_eq!(target("/rooms/a%20b", None).map_err(|r| r.status), Err(400));
        assert_eq!(target("/rooms/a/b", None).map_err(|r| r.status), Err(400));
        assert_eq!(target("/rooms/%FF", None).map_err(|r| r.status), Err(400));
        let long = "x".repeat(65);
        assert_eq!(
            target(&format!("/rooms/{long}"), None).map_err(|r| r.status),
            Err(400)
        );
        let longest = "聊".repeat(64);
        assert!(target(&format!("/rooms/{longest}"), None).is_ok());
    }

    #[test]
    fn resume_needs_a_number_and_a_well_formed_epoch() {
        let t = target("/", Some("since=42&epoch=abc-1_f&token=x")).ok();
        assert_eq!(
            t.and_then(|t| t.resume),
            Some(Resume {
                since: 42,
                epoch: "abc-1_f".into()
            })
        );
        for bad in [
            "since=x&epoch=a",
            "since=-1&epoch=a",
            "since=1&epoch=",
            "since=1&epoch=a%20b",
            "since=1",
            "epoch=a",
        ] {
            assert_eq!(
                target("/", Some(bad)).map_err(|r| r.status),
                Err(400),
                "{bad}"
            );
        }
    }

    #[test]
    fn subprotocol_is_found_in_a_list() {
        assert!(asks_for_v1([b"chat, hubbub.v1".as_slice()]));
        assert!(asks_for_v1([b"x".as_slice(), b"hubbub.v1".as_slice()]));
        assert!(!asks_for_v1([b"hubbub.v2".as_slice()]));
    }

    #[test]
    fn envelopes_carry_the_protocol_fields() {
        let h = json(&hello("lobby", "e1", 7, 3, 65536, Some(true), None));
        assert_eq!(h["type"], "hello");
        assert_eq!(h["offset"], 7);
        assert_eq!(h["recovered"], true);
        let h = json(&hello("lobby", "e1", 0, 1, 16, None, None));
        assert!(h.get("recovered").is_none());
        let mut e = Entry::new(5, 1000, Arc::new(Message::text("hi \"there\"\n")));
        let m = json(&envelope_of(&mut e, false));
        assert_eq!(m["data"], "hi \"there\"\n");
        assert_eq!(m["offset"], 5);
        assert_eq!(m["ts"], 1000);
        assert!(m.get("binary").is_none());
        let mut b = Entry::new(6, 1, Arc::new(Message::binary(vec![0u8, 1, 2])));
        let m = json(&envelope_of(&mut b, false));
        assert_eq!(m["binary"], true);
        assert_eq!(m["data"], "AAEC");
        assert_eq!(json(&presence(4, None))["online"], 4);
        assert_eq!(json(&error("rate_limited", "slow"))["code"], "rate_limited");
    }
}

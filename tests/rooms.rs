//! Rooms, history and the `hubbub.v1` protocol over real loopback
//! WebSockets: rooms isolated, raw clients unchanged byte for byte, raw and
//! v1 clients in one room, history bounds, resumes, restarts, bad URLs and
//! `max_rooms`.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hubbub::Config;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

async fn v1(server: &TestServer, path: &str) -> (Ws, Value) {
    let mut ws = connect_to(server.ws, path, true).await.expect("v1 connect");
    let hello = next_envelope(&mut ws, false).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    (ws, hello)
}

async fn raw(server: &TestServer, path: &str) -> Ws {
    connect_to(server.ws, path, false)
        .await
        .expect("raw connect")
}

/// Expects `message` envelopes with these payloads, in order, and returns
/// their offsets.
async fn expect_messages(ws: &mut Ws, payloads: &[&str]) -> Vec<u64> {
    let mut offsets = Vec::new();
    for want in payloads {
        let m = next_envelope(ws, false).await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["data"], *want, "{m}");
        assert!(
            m["ts"].as_u64().is_some_and(|ts| ts > 1_600_000_000_000),
            "{m}"
        );
        offsets.push(m["offset"].as_u64().expect("offset"));
    }
    offsets
}

/// Nothing more arrives for a moment (pings and presence aside).
async fn expect_quiet(ws: &mut Ws) {
    let until = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(next) = tokio::time::timeout_at(until, ws.next()).await {
        match next {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Text(t))) if t.contains("\"presence\"") => {}
            other => panic!("expected nothing, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn rooms_do_not_see_each_others_messages() {
    let server = TestServer::default().await;
    let mut a1 = raw(&server, "/rooms/a").await;
    let mut a2 = raw(&server, "/rooms/a").await;
    let mut b = raw(&server, "/rooms/b").await;
    let mut lobby = raw(&server, "/").await;
    let mut lobby_by_name = raw(&server, "/rooms/lobby").await;
    server.wait_metric("hubbub_connections", 5).await;
    server.wait_metric("hubbub_rooms", 3).await;
    send_text(&mut a1, "for a").await;
    send_text(&mut b, "for b").await;
    send_text(&mut lobby, "for the lobby").await;
    assert_eq!(next_text(&mut a1).await, "for a");
    assert_eq!(next_text(&mut a2).await, "for a");
    assert_eq!(next_text(&mut b).await, "for b");
    assert_eq!(next_text(&mut lobby).await, "for the lobby");
    assert_eq!(next_text(&mut lobby_by_name).await, "for the lobby");
    for ws in [&mut a1, &mut a2, &mut b, &mut lobby, &mut lobby_by_name] {
        expect_quiet(ws).await;
    }
}

/// A raw client gets exactly the frames peers sent, text and binary, and
/// nothing else: no hello, no envelope, no history, no presence.
#[tokio::test]
async fn raw_clients_are_unchanged_in_every_room() {
    let server = TestServer::default().await;
    // History exists before the raw client joins: it must not be replayed.
    let mut early = raw(&server, "/rooms/聊天室").await;
    send_text(&mut early, "before").await;
    assert_eq!(next_text(&mut early).await, "before");
    let mut late = raw(&server, "/rooms/%E8%81%8A%E5%A4%A9%E5%AE%A4").await;
    let (mut v1_peer, _) = v1(&server, "/rooms/聊天室").await;
    let text = "{\"type\":\"message\",\"offset\":1} \u{1F600} <b>bold</b>\n";
    send_text(&mut early, text).await;
    let bytes = vec![0u8, 255, 1, 2, 3];
    early
        .send(Message::binary(bytes.clone()))
        .await
        .expect("send binary");
    for ws in [&mut early, &mut late] {
        assert_eq!(next_data(ws).await, Message::text(text));
        assert_eq!(next_data(ws).await, Message::binary(bytes.clone()));
    }
    expect_quiet(&mut late).await;
    // The v1 peer in the same room got the history, then the same two,
    // enveloped.
    expect_messages(&mut v1_peer, &["before"]).await;
    let m = next_envelope(&mut v1_peer, false).await;
    assert_eq!(m["data"], text);
    let m = next_envelope(&mut v1_peer, false).await;
    assert_eq!(
        (m["binary"].clone(), m["data"].clone()),
        (Value::Bool(true), Value::from("AP8BAgM="))
    );
}

/// Raw and v1 clients chat with each other in one room; every v1 client
/// sees the same offsets, contiguous from 1.
#[tokio::test]
async fn raw_and_v1_clients_share_a_room_and_one_order() {
    let server = TestServer::default().await;
    let (mut x, hello) = v1(&server, "/rooms/mixed").await;
    assert_eq!(hello["room"], "mixed");
    assert_eq!(hello["offset"], 0);
    assert_eq!(hello["online"], 1);
    assert_eq!(hello["max_message_bytes"], 65536);
    assert!(hello.get("recovered").is_none());
    let epoch = hello["epoch"].as_str().expect("epoch").to_string();
    let (mut y, hello_y) = v1(&server, "/rooms/mixed").await;
    assert_eq!(hello_y["epoch"], epoch.as_str());
    assert_eq!(hello_y["online"], 2);
    let mut r = raw(&server, "/rooms/mixed").await;
    send_text(&mut r, "one from raw").await;
    send_text(&mut x, "two from v1").await;
    send_text(&mut y, "three from v1").await;
    let mut texts = Vec::new();
    for _ in 0..3 {
        texts.push(next_text(&mut r).await);
    }
    let order: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ox = expect_messages(&mut x, &order).await;
    let oy = expect_messages(&mut y, &order).await;
    assert_eq!(ox, vec![1, 2, 3]);
    assert_eq!(oy, ox);
}

#[tokio::test]
async fn presence_follows_the_count_at_most_once_a_second() {
    let server = TestServer::default().await;
    let (mut watcher, hello) = v1(&server, "/rooms/p").await;
    assert_eq!(hello["online"], 1);
    // Three quick joins: at most a first notice, then one coalesced one.
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(raw(&server, "/rooms/p").await);
    }
    let mut last = 0;
    let started = tokio::time::Instant::now();
    while last != 4 {
        let p = next_envelope(&mut watcher, true).await;
        assert_eq!(p["type"], "presence", "{p}");
        last = p["online"].as_u64().expect("online");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    drop(others);
    loop {
        let p = next_envelope(&mut watcher, true).await;
        if p["online"] == 1 {
            break;
        }
    }
}

#[tokio::test]
async fn a_join_gets_the_recent_history_within_its_bounds() {
    let server = TestServer::start(Config {
        history_size: 5,
        history_on_join: 3,
        ..Config::ephemeral()
    })
    .await;
    let mut talker = raw(&server, "/rooms/h").await;
    for i in 1..=7 {
        send_text(&mut talker, &format!("m{i}")).await;
        assert_eq!(next_text(&mut talker).await, format!("m{i}"));
    }
    let (mut late, hello) = v1(&server, "/rooms/h").await;
    assert_eq!(hello["offset"], 7);
    assert_eq!(
        expect_messages(&mut late, &["m5", "m6", "m7"]).await,
        vec![5, 6, 7]
    );
    // Resuming from 2 needs 3..7, but only 3..7 is... kept: 3 to 7 is five.
    let epoch = hello["epoch"].as_str().expect("epoch");
    let (mut back, hello) = v1(&server, &format!("/rooms/h?since=2&epoch={epoch}")).await;
    assert_eq!(hello["recovered"], true);
    expect_messages(&mut back, &["m3", "m4", "m5", "m6", "m7"]).await;
    // From 1, message 2 is gone: not recovered, recent history instead.
    let (mut gap, hello) = v1(&server, &format!("/rooms/h?since=1&epoch={epoch}")).await;
    assert_eq!(hello["recovered"], false);
    expect_messages(&mut gap, &["m5", "m6", "m7"]).await;
}

#[tokio::test]
async fn history_bytes_bound_what_is_kept() {
    let server = TestServer::start(Config {
        history_bytes: 10,
        ..Config::ephemeral()
    })
    .await;
    let mut talker = raw(&server, "/rooms/bytes").await;
    for text in ["aaaa", "bbbb", "cccc"] {
        send_text(&mut talker, text).await;
        assert_eq!(next_text(&mut talker).await, text);
    }
    let (mut late, _) = v1(&server, "/rooms/bytes").await;
    expect_messages(&mut late, &["bbbb", "cccc"]).await;
    expect_quiet(&mut late).await;
}

/// History goes `history_ttl` after the last message, and an empty room
/// with no history ends (and its next creation has a new epoch).
#[tokio::test]
async fn history_expires_and_the_empty_room_ends() {
    let server = TestServer::start(Config {
        history_ttl: Duration::from_secs(1),
        ..Config::ephemeral()
    })
    .await;
    let (mut first, hello) = v1(&server, "/rooms/ttl").await;
    let epoch = hello["epoch"].as_str().expect("epoch").to_string();
    send_text(&mut first, "soon gone").await;
    expect_messages(&mut first, &["soon gone"]).await;
    drop(first);
    server.wait_metric("hubbub_connections", 0).await;
    // The room lives on for its history, then ends.
    assert_eq!(server.metric("hubbub_rooms").await, 1);
    server.wait_metric("hubbub_rooms", 0).await;
    let (mut again, hello) = v1(&server, &format!("/rooms/ttl?since=1&epoch={epoch}")).await;
    assert_eq!(hello["recovered"], false);
    assert_ne!(hello["epoch"], epoch.as_str());
    assert_eq!(hello["offset"], 0);
    expect_quiet(&mut again).await;
}

#[tokio::test]
async fn with_history_off_an_empty_room_ends_at_once() {
    let server = TestServer::start(Config {
        history_size: 0,
        ..Config::ephemeral()
    })
    .await;
    let mut a = raw(&server, "/rooms/off").await;
    send_text(&mut a, "x").await;
    assert_eq!(next_text(&mut a).await, "x");
    let (mut b, _) = v1(&server, "/rooms/off").await;
    expect_quiet(&mut b).await;
    drop((a, b));
    server.wait_metric("hubbub_rooms", 0).await;
}

/// A resume gets exactly what was missed, then the live stream, with no gap
/// and no duplicate even while other peers keep sending.
#[tokio::test]
async fn a_resume_fills_the_gap_exactly_while_others_keep_sending() {
    let server = TestServer::default().await;
    let (mut reader, hello) = v1(&server, "/rooms/resume").await;
    let epoch = hello["epoch"].as_str().expect("epoch").to_string();
    let mut talker = raw(&server, "/rooms/resume").await;
    send_text(&mut talker, "m1").await;
    assert_eq!(expect_messages(&mut reader, &["m1"]).await, vec![1]);
    drop(reader);
    // Sent while the reader is away, and while it resumes.
    let sending = tokio::spawn(async move {
        for i in 2..=60 {
            send_text(&mut talker, &format!("m{i}")).await;
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        talker
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (mut back, hello) = v1(&server, &format!("/rooms/resume?since=1&epoch={epoch}")).await;
    assert_eq!(hello["recovered"], true);
    let _talker = sending.await.expect("sender");
    let want: Vec<String> = (2..=60).map(|i| format!("m{i}")).collect();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    let offsets = expect_messages(&mut back, &want).await;
    assert_eq!(offsets, (2..=60).collect::<Vec<u64>>());
    expect_quiet(&mut back).await;
}

/// Each server start is a new epoch: a resume against the old one is not
/// recovered.
#[tokio::test]
async fn a_restart_starts_a_new_epoch() {
    let server = TestServer::default().await;
    let (mut ws, hello) = v1(&server, "/").await;
    let epoch = hello["epoch"].as_str().expect("epoch").to_string();
    send_text(&mut ws, "before the restart").await;
    expect_messages(&mut ws, &["before the restart"]).await;
    drop(ws);
    server.shutdown().await.expect("clean shutdown");
    let server = TestServer::default().await;
    let (_, hello) = v1(&server, &format!("/?since=1&epoch={epoch}")).await;
    assert_eq!(hello["recovered"], false);
    assert_ne!(hello["epoch"], epoch.as_str());
}

#[tokio::test]
async fn bad_paths_names_and_resume_points_are_refused() {
    let server = TestServer::default().await;
    let long = "x".repeat(65);
    for (path, status) in [
        ("/chat", 404),
        ("/rooms", 404),
        ("/rooms/", 400),
        ("/rooms/a%20b", 400),
        ("/rooms/a/b", 400),
        ("/rooms/%FF%FE", 400),
        ("/rooms/%3Cscript%3E", 400),
        (&format!("/rooms/{long}"), 400),
        ("/?since=ten&epoch=abc", 400),
        ("/?since=-1&epoch=abc", 400),
        ("/?since=1&epoch=a%20b", 400),
        ("/?since=1", 400),
        ("/?epoch=abc", 400),
    ] {
        for v1 in [false, true] {
            let got = connect_to(server.ws, path, v1).await;
            assert_eq!(refused_status(got), status, "{path} (v1: {v1})");
        }
    }
    // The page refuses the same names.
    let (status, _, _) = http_get(server.http, "/rooms/a%20b").await;
    assert_eq!(status, 400);
    let (status, _, body) = http_get(server.http, "/rooms/%E8%81%8A").await;
    assert_eq!(status, 200);
    assert!(body.contains("<html"), "{body}");
}

#[tokio::test]
async fn max_rooms_refuses_one_room_more_with_503() {
    let server = TestServer::start(Config {
        max_rooms: 2,
        history_size: 0,
        ..Config::ephemeral()
    })
    .await;
    let a = raw(&server, "/rooms/a").await;
    let _b = raw(&server, "/rooms/b").await;
    assert_eq!(
        refused_status(connect_to(server.ws, "/rooms/c", false).await),
        503
    );
    // Existing rooms still take joins.
    let _a2 = raw(&server, "/rooms/a").await;
    server
        .wait_metric("hubbub_connections_total{result=\"room_limit\"}", 1)
        .await;
    // Once a room ends, a new one fits.
    drop(a);
    drop(_a2);
    server.wait_metric("hubbub_rooms", 1).await;
    let mut c = raw(&server, "/rooms/c").await;
    send_text(&mut c, "in").await;
    assert_eq!(next_text(&mut c).await, "in");
}

//! Broadcast behaviour: every message reaches every peer, in one order.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hubbub::Config;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{Bytes, Message};

#[tokio::test]
async fn three_clients_receive_every_message_in_the_same_order() {
    let server = TestServer::default().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(server.connect().await);
    }
    // Make sure all three are registered before anyone sends.
    server.wait_metric("hubbub_connections", 3).await;

    const PER_CLIENT: usize = 20;
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for (i, ws) in clients.into_iter().enumerate() {
        let (mut tx, mut rx) = ws.split();
        writers.push(tokio::spawn(async move {
            for n in 0..PER_CLIENT {
                tx.send(Message::text(format!("client{i} says {n}")))
                    .await
                    .expect("send");
            }
            tx
        }));
        readers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.len() < 3 * PER_CLIENT {
                let msg = tokio::time::timeout(WAIT, rx.next())
                    .await
                    .expect("message in time")
                    .expect("open")
                    .expect("read");
                if let Message::Text(t) = msg {
                    seen.push(t.to_string());
                }
            }
            seen
        }));
    }
    let mut logs = Vec::new();
    for r in readers {
        logs.push(r.await.expect("reader"));
    }
    // Keep the write halves open until everyone has read everything.
    let mut write_halves = Vec::new();
    for w in writers {
        write_halves.push(w.await.expect("writer"));
    }
    assert_eq!(logs[0], logs[1], "clients 0 and 1 saw different orders");
    assert_eq!(logs[0], logs[2], "clients 0 and 2 saw different orders");
    for i in 0..3 {
        // Each sender's own messages arrive, complete and in the order sent.
        let own: Vec<_> = logs[0]
            .iter()
            .filter(|m| m.starts_with(&format!("client{i} ")))
            .cloned()
            .collect();
        let expected: Vec<_> = (0..PER_CLIENT)
            .map(|n| format!("client{i} says {n}"))
            .collect();
        assert_eq!(own, expected);
    }
    // Hang up (both halves are gone now) so shutdown need not wait for
    // closing handshakes nobody is reading.
    drop(write_halves);
    server.wait_metric("hubbub_connections", 0).await;
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn text_is_relayed_byte_for_byte() {
    let server = TestServer::default().await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    server.wait_metric("hubbub_connections", 2).await;
    let tricky = "  héllo\tworld 🎉\n<b>not html</b> \u{0}\u{200b} ";
    send_text(&mut a, tricky).await;
    assert_eq!(next_text(&mut a).await, tricky);
    assert_eq!(next_text(&mut b).await, tricky);
    let empty = "";
    send_text(&mut b, empty).await;
    assert_eq!(next_text(&mut a).await, empty);
}

#[tokio::test]
async fn binary_messages_are_relayed_as_binary() {
    let server = TestServer::default().await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    server.wait_metric("hubbub_connections", 2).await;
    let payload: Vec<u8> = (0..=255u8).collect();
    a.send(Message::binary(payload.clone()))
        .await
        .expect("send");
    for ws in [&mut a, &mut b] {
        match next_data(ws).await {
            Message::Binary(got) => assert_eq!(got.as_ref(), payload.as_slice()),
            other => panic!("expected binary, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn binary_is_refused_with_1003_when_disabled() {
    let server = TestServer::start(Config {
        allow_binary: false,
        ..Config::ephemeral()
    })
    .await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    server.wait_metric("hubbub_connections", 2).await;
    a.send(Message::binary(vec![1, 2, 3])).await.expect("send");
    let (frame, skipped) = expect_close(&mut a).await;
    assert_eq!(frame.code, CloseCode::Unsupported);
    assert_eq!(skipped, 0, "the binary message must not be relayed");
    // The other peer is untouched and still chats.
    server.wait_metric("hubbub_connections", 1).await;
    send_text(&mut b, "still here").await;
    assert_eq!(next_text(&mut b).await, "still here");
}

#[tokio::test]
async fn oversize_message_closes_the_sender_with_1009() {
    let server = TestServer::start(Config {
        max_message_bytes: 1024,
        ..Config::ephemeral()
    })
    .await;
    let mut big = server.connect().await;
    let mut other = server.connect().await;
    server.wait_metric("hubbub_connections", 2).await;
    // Exactly at the limit is fine.
    let at_limit = "x".repeat(1024);
    send_text(&mut big, &at_limit).await;
    assert_eq!(next_text(&mut other).await, at_limit);
    assert_eq!(next_text(&mut big).await, at_limit);
    // One byte over is not.
    send_text(&mut big, &"y".repeat(1025)).await;
    let (frame, _) = expect_close(&mut big).await;
    assert_eq!(frame.code, CloseCode::Size);
    server.wait_metric("hubbub_connections", 1).await;
    send_text(&mut other, "after").await;
    assert_eq!(next_text(&mut other).await, "after");
}

#[tokio::test]
async fn oversize_fragmented_message_closes_with_1009() {
    let server = TestServer::start(Config {
        max_message_bytes: 1024,
        ..Config::ephemeral()
    })
    .await;
    let mut ws = server.connect().await;
    // Three 600-byte fragments: each frame is under the limit, the message is not.
    let part = Bytes::from(vec![b'a'; 600]);
    ws.send(Message::Frame(Frame::message(
        part.clone(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .expect("first fragment");
    ws.send(Message::Frame(Frame::message(
        part.clone(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .await
    .expect("second fragment");
    let _ = ws
        .send(Message::Frame(Frame::message(
            part,
            OpCode::Data(Data::Continue),
            true,
        )))
        .await;
    let (frame, _) = expect_close(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Size);
}

#[tokio::test]
async fn invalid_utf8_closes_the_sender_with_1007() {
    let server = TestServer::default().await;
    let mut bad = server.connect().await;
    let mut other = server.connect().await;
    server.wait_metric("hubbub_connections", 2).await;
    let invalid = Bytes::from_static(&[0x68, 0x69, 0xff, 0xfe]);
    bad.send(Message::Frame(Frame::message(
        invalid,
        OpCode::Data(Data::Text),
        true,
    )))
    .await
    .expect("send raw frame");
    let (frame, skipped) = expect_close(&mut bad).await;
    assert_eq!(frame.code, CloseCode::Invalid);
    assert_eq!(skipped, 0);
    send_text(&mut other, "fine").await;
    assert_eq!(next_text(&mut other).await, "fine");
    assert_eq!(server.metric("hubbub_messages_received_total").await, 1);
}

#[tokio::test]
async fn healthz_and_metrics_reflect_real_counts() {
    let server = TestServer::default().await;
    let (status, _, body) = http_get(server.http, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    let (status, headers, body) = http_get(server.http, "/metrics").await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap_or_default()
        .starts_with("text/plain"));
    for name in [
        "hubbub_connections",
        "hubbub_messages_received_total",
        "hubbub_deliveries_total",
        "hubbub_bytes_sent_total",
        "hubbub_slow_consumer_disconnects_total",
        "hubbub_connections_total{result=\"accepted\"}",
        "hubbub_connections_total{result=\"over_capacity\"}",
        "hubbub_connections_total{result=\"forbidden_origin\"}",
    ] {
        assert_eq!(metric_value(&body, name), Some(0), "{name} in\n{body}");
    }

    let mut a = server.connect().await;
    let mut b = server.connect().await;
    server.wait_metric("hubbub_connections", 2).await;
    for text in ["one", "two", "three"] {
        send_text(&mut a, text).await;
    }
    for _ in 0..3 {
        next_text(&mut a).await;
        next_text(&mut b).await;
    }
    assert_eq!(server.metric("hubbub_messages_received_total").await, 3);
    server.wait_metric("hubbub_deliveries_total", 6).await;
    server
        .wait_metric("hubbub_bytes_sent_total", 2 * (3 + 3 + 5))
        .await;
    assert_eq!(
        server
            .metric("hubbub_connections_total{result=\"accepted\"}")
            .await,
        2
    );

    let refused = connect(server.ws, Some("http://evil.example")).await;
    assert_eq!(refused_status(refused), 403);
    assert_eq!(
        server
            .metric("hubbub_connections_total{result=\"forbidden_origin\"}")
            .await,
        1
    );

    drop(b);
    server.wait_metric("hubbub_connections", 1).await;
    drop(a);
    server.wait_metric("hubbub_connections", 0).await;
}

#[tokio::test]
async fn http_listener_answers_unknown_paths_and_methods() {
    let server = TestServer::default().await;
    let (status, _, _) = http_get(server.http, "/no-such-page").await;
    assert_eq!(status, 404);
    let (status, _, _) = http_request(server.http, "POST", "/", &[]).await;
    assert_eq!(status, 405);
    let (status, _, _) = http_request(server.http, "DELETE", "/metrics", &[]).await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn page_is_served_and_names_the_websocket_url() {
    let server = TestServer::default().await;
    let (status, headers, body) = http_get(server.http, "/").await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap_or_default()
        .starts_with("text/html"));
    let expected = format!(
        "<meta name=\"hubbub-ws-url\" content=\"ws://127.0.0.1:{}/\">",
        server.ws.port()
    );
    assert!(body.contains(&expected), "page lacks {expected}");
}

#[tokio::test]
async fn static_dir_replaces_the_built_in_page() {
    let dir = std::env::temp_dir().join(format!("hubbub-static-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("client.html"),
        "<!doctype html><title>restyled</title>\
         <meta name=\"hubbub-ws-url\" content=\"__HUBBUB_WS_URL__\">\
         <script>start()</script>",
    )
    .expect("write page");
    let server = TestServer::start(Config {
        static_dir: Some(dir.clone()),
        ..Config::ephemeral()
    })
    .await;
    let (status, headers, body) = http_get(server.http, "/").await;
    assert_eq!(status, 200);
    assert!(body.contains("<title>restyled</title>"), "{body}");
    assert!(body.contains(&format!("ws://127.0.0.1:{}/", server.ws.port())));
    // The CSP admits the custom page's own inline script.
    let csp = headers["content-security-policy"]
        .to_str()
        .unwrap_or_default();
    assert!(csp.contains("'sha256-"), "{csp}");
    let _ = std::fs::remove_dir_all(&dir);
}

//! Graceful shutdown through the library's shutdown future.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use hubbub::Config;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn shutdown_delivers_accepted_messages_then_closes_every_peer_with_1001() {
    let mut server = TestServer::default().await;
    let mut talker = server.connect().await;
    let mut listeners = [server.connect().await, server.connect().await];
    server.wait_metric("hubbub_connections", 3).await;

    // The talker reads its own echoes, so when it has all 100 the hub has
    // accepted and queued all 100 for everyone. The listeners read nothing
    // yet: their copies are still in queues and buffers.
    for i in 0..100 {
        send_text(&mut talker, &format!("msg {i}")).await;
    }
    for i in 0..100 {
        assert_eq!(next_text(&mut talker).await, format!("msg {i}"));
    }
    server.begin_shutdown();

    for ws in listeners.iter_mut() {
        for i in 0..100 {
            assert_eq!(next_text(ws).await, format!("msg {i}"));
        }
        let (frame, extra) = expect_close(ws).await;
        assert_eq!(extra, 0);
        assert_eq!(frame.code, CloseCode::Away);
        assert_eq!(frame.reason.as_str(), "server shutting down");
    }
    let (frame, _) = expect_close(&mut talker).await;
    assert_eq!(frame.code, CloseCode::Away);
    // Reading on completes the closing handshake; then the stream ends.
    for ws in listeners.iter_mut().chain(std::iter::once(&mut talker)) {
        let end = tokio::time::timeout(WAIT, ws.next()).await.expect("ends");
        assert!(
            matches!(end, None | Some(Err(_))),
            "unexpected after close: {end:?}"
        );
    }
    server.shutdown().await.expect("run returns Ok");
}

#[tokio::test]
async fn shutdown_refuses_new_connections() {
    let server = TestServer::default().await;
    let addr = server.ws;
    server.shutdown().await.expect("run returns Ok");
    assert!(
        connect(addr, None).await.is_err(),
        "the listener should be closed"
    );
}

#[tokio::test]
async fn a_peer_that_ignores_the_close_frame_does_not_hold_shutdown_past_the_grace() {
    let server = TestServer::start(Config {
        shutdown_grace: Duration::from_millis(500),
        ..Config::ephemeral()
    })
    .await;
    // Never reads, so it never answers the close frame.
    let _deaf = server.connect().await;
    let mut polite = server.connect().await;
    server.wait_metric("hubbub_connections", 2).await;
    let started = tokio::time::Instant::now();
    let stop = tokio::spawn(server.shutdown());
    let (frame, _) = expect_close(&mut polite).await;
    assert_eq!(frame.code, CloseCode::Away);
    // Complete our side of the handshake.
    while let Ok(Some(Ok(m))) = tokio::time::timeout(WAIT, polite.next()).await {
        assert!(!matches!(m, Message::Text(_)));
    }
    stop.await.expect("join").expect("run returns Ok");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "returned after {took:?}, before the grace"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[tokio::test]
async fn a_peer_stuck_on_a_full_socket_is_dropped_when_the_grace_runs_out() {
    let server = TestServer::start(Config {
        shutdown_grace: Duration::from_millis(500),
        // Large enough that the stuck peer is never kicked as a slow consumer.
        send_queue: 100_000,
        // 300 messages as fast as the server takes them.
        rate_limit_per_sec: 0,
        ..Config::ephemeral()
    })
    .await;
    // Never reads: its socket buffers fill up and the server's write to it
    // blocks with messages still queued.
    let _stuck = server.connect().await;
    let mut talker = server.connect().await;
    server.wait_metric("hubbub_connections", 2).await;
    let body = "z".repeat(60 * 1024);
    for _ in 0..300 {
        send_text(&mut talker, &body).await;
        assert_eq!(next_text(&mut talker).await.len(), body.len());
    }
    assert_eq!(
        server
            .metric("hubbub_slow_consumer_disconnects_total")
            .await,
        0
    );
    let started = tokio::time::Instant::now();
    let stop = tokio::spawn(server.shutdown());
    let (frame, _) = expect_close(&mut talker).await;
    assert_eq!(frame.code, CloseCode::Away);
    drop(talker);
    stop.await.expect("join").expect("run returns Ok");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
}

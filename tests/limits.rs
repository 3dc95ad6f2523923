//! Limits and liveness: slow consumers, capacity, idleness, handshakes,
//! origins and requests that are not WebSocket upgrades.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hubbub::config::OriginPolicy;
use hubbub::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_client_that_never_reads_is_closed_with_1008_and_others_get_everything() {
    let server = TestServer::start(Config {
        send_queue: 64,
        // 2,000 messages as fast as the server takes them.
        rate_limit_per_sec: 0,
        ..Config::ephemeral()
    })
    .await;
    let sender = server.connect().await;
    let mut readers = Vec::new();
    for _ in 0..2 {
        readers.push(server.connect().await);
    }
    let mut stalled = server.connect().await;
    server.wait_metric("hubbub_connections", 4).await;

    // 16 MiB per client in 8 KiB messages: far more than the loopback socket
    // buffers of the stalled client can hold. The sender keeps at most
    // WINDOW messages unconfirmed by its own echo, so the reading clients
    // are never far behind and only the stalled one can fill its queue.
    const COUNT: usize = 2000;
    const WINDOW: usize = 32;
    let body = "m".repeat(8 * 1024);
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let (mut tx, mut echo) = sender.split();
    let echo_window = window.clone();
    let echo_task = tokio::spawn(async move {
        let mut n = 0;
        while n < COUNT {
            match tokio::time::timeout(WAIT, echo.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => {
                    n += 1;
                    echo_window.add_permits(1);
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("sender lost its echo after {n}: {other:?}"),
            }
        }
        n
    });
    let reader_tasks: Vec<_> = readers
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                for i in 0..COUNT {
                    let text = next_text(&mut ws).await;
                    assert!(
                        text.starts_with(&format!("{i:05}:")),
                        "message {i} out of order"
                    );
                }
                ws
            })
        })
        .collect();
    for i in 0..COUNT {
        window.acquire().await.expect("window").forget();
        let text = format!("{i:05}:{body}");
        tx.send(Message::text(text)).await.expect("send");
    }
    assert_eq!(echo_task.await.expect("echo"), COUNT);
    let mut still_open = Vec::new();
    for t in reader_tasks {
        still_open.push(t.await.expect("a reading client lost messages"));
    }
    assert_eq!(
        server
            .metric("hubbub_slow_consumer_disconnects_total")
            .await,
        1
    );
    // The stalled client finally reads: what was already in flight, then 1008.
    let (frame, received) = expect_close(&mut stalled).await;
    assert_eq!(frame.code, CloseCode::Policy);
    assert!(frame.reason.contains("slow consumer"), "{}", frame.reason);
    assert!(received < COUNT, "the stalled client got everything");
    server.wait_metric("hubbub_connections", 3).await;
}

#[tokio::test]
async fn max_connections_plus_one_gets_503_until_someone_leaves() {
    let server = TestServer::start(Config {
        max_connections: 2,
        ..Config::ephemeral()
    })
    .await;
    let a = server.connect().await;
    let _b = server.connect().await;
    let refused = connect(server.ws, None).await;
    assert_eq!(refused_status(refused), 503);
    assert_eq!(
        server
            .metric("hubbub_connections_total{result=\"over_capacity\"}")
            .await,
        1
    );
    drop(a);
    server.wait_metric("hubbub_connections", 1).await;
    // The slot frees when the connection task ends, just after the gauge.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut c = loop {
        match connect(server.ws, None).await {
            Ok(ws) => break ws,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("a freed slot was not reusable: {e}"),
        }
    };
    send_text(&mut c, "in").await;
    assert_eq!(next_text(&mut c).await, "in");
}

#[tokio::test]
async fn a_silent_peer_is_closed_after_idle_timeout() {
    let server = TestServer::start(Config {
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(400),
        ..Config::ephemeral()
    })
    .await;
    // This client never polls its socket, so it never answers a ping.
    let connected = tokio::time::Instant::now();
    let mut silent = server.connect().await;
    server.wait_metric("hubbub_connections", 1).await;
    server.wait_metric("hubbub_connections", 0).await;
    // Checked at the hub's heartbeat: never before idle_timeout.
    assert!(
        connected.elapsed() >= Duration::from_millis(400),
        "closed after only {:?}",
        connected.elapsed()
    );
    let (frame, _) = expect_close(&mut silent).await;
    assert_eq!(frame.code, CloseCode::Away);
    assert_eq!(frame.reason.as_str(), "idle timeout");
}

#[tokio::test]
async fn a_peer_that_only_answers_pings_stays_connected() {
    let server = TestServer::start(Config {
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(400),
        ..Config::ephemeral()
    })
    .await;
    let mut ws = server.connect().await;
    // Reading lets tungstenite answer each ping with a pong.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(next) = tokio::time::timeout_at(until, ws.next()).await {
        match next {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("unexpected while idle: {other:?}"),
        }
    }
    assert!(
        pings >= 3,
        "only {pings} pings in 1.5 s at a 100 ms interval"
    );
    assert_eq!(server.metric("hubbub_connections").await, 1);
    send_text(&mut ws, "still alive").await;
    assert_eq!(next_text(&mut ws).await, "still alive");
}

/// Keeps a client reading (so it answers pings) until the test ends.
fn keep_reading(mut ws: Ws) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} })
}

/// One more client that sends 24 MB to the room (far more than another
/// client's socket buffers hold) and then keeps reading, so it is never idle
/// itself. Call it with one other client connected.
async fn flood_the_room(server: &TestServer) -> tokio::task::JoinHandle<()> {
    let mut talker = server.connect().await;
    server.wait_metric("hubbub_connections", 2).await;
    let body = vec![7u8; 1 << 20];
    for _ in 0..24 {
        talker
            .send(Message::binary(body.clone()))
            .await
            .expect("send");
        next_data(&mut talker).await;
    }
    keep_reading(talker)
}

/// A client that neither reads nor sends is closed for idleness even when
/// room traffic has filled its socket, so its session is stuck in a write.
#[tokio::test]
async fn a_silent_peer_stuck_on_a_full_socket_is_still_closed_for_idleness() {
    let server = TestServer::start(Config {
        ping_interval: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(500),
        max_message_bytes: 1 << 20,
        ..Config::ephemeral()
    })
    .await;
    let _silent = server.connect().await;
    let _talker = flood_the_room(&server).await;
    // Before: still open as long as the room stayed quiet.
    server.wait_metric("hubbub_connections", 1).await;
}

/// A client that keeps sending pongs (so it is never idle) but never reads:
/// its write makes no progress, and it is given up after `idle_timeout`.
#[tokio::test]
async fn a_write_that_makes_no_progress_is_given_up() {
    let server = TestServer::start(Config {
        ping_interval: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(500),
        max_message_bytes: 1 << 20,
        ..Config::ephemeral()
    })
    .await;
    let mut stuck = raw_handshake(server.ws, "").await.expect("handshake");
    let pongs = tokio::spawn(async move {
        let pong = client_frame(0xA, b"");
        for _ in 0..200 {
            if stuck.write_all(&pong).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let _talker = flood_the_room(&server).await;
    server.wait_metric("hubbub_connections", 1).await;
    assert_eq!(
        server
            .metric("hubbub_slow_consumer_disconnects_total")
            .await,
        1
    );
    pongs.abort();
}

/// Reads until the server closes the socket; fails if it stays open.
async fn expect_dropped(mut stream: TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept a stalled handshake open"),
        }
    }
}

#[tokio::test]
async fn a_stalled_handshake_is_dropped() {
    let server = TestServer::start(Config {
        handshake_timeout: Duration::from_millis(300),
        ..Config::ephemeral()
    })
    .await;
    // Says nothing at all.
    let mute = TcpStream::connect(server.ws).await.expect("connect");
    // Starts a request and never finishes it.
    let mut partial = TcpStream::connect(server.ws).await.expect("connect");
    partial
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .expect("write");
    let started = tokio::time::Instant::now();
    expect_dropped(mute).await;
    expect_dropped(partial).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    server
        .wait_metric("hubbub_connections_total{result=\"handshake_timeout\"}", 2)
        .await;
    // Meanwhile a prompt client is fine.
    let mut ws = server.connect().await;
    send_text(&mut ws, "ok").await;
    assert_eq!(next_text(&mut ws).await, "ok");
}

#[tokio::test]
async fn plain_http_on_the_websocket_port_gets_a_4xx() {
    let server = TestServer::default().await;
    let (status, headers, body) = http_get(server.ws, "/").await;
    assert_eq!(status, 426);
    assert_eq!(headers["upgrade"], "websocket");
    assert!(body.contains(&format!("http://{}/", server.http)), "{body}");
    let (status, _, _) = http_request(server.ws, "POST", "/", &[]).await;
    assert!((400..500).contains(&status), "{status}");
    // An upgrade without a key, or with the wrong version.
    let upgrade = [("Connection", "Upgrade"), ("Upgrade", "websocket")];
    let (status, _, _) = http_request(
        server.ws,
        "GET",
        "/",
        &[upgrade[0], upgrade[1], ("Sec-WebSocket-Version", "13")],
    )
    .await;
    assert_eq!(status, 400);
    let (status, headers, _) = http_request(
        server.ws,
        "GET",
        "/",
        &[
            upgrade[0],
            upgrade[1],
            ("Sec-WebSocket-Version", "8"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    .await;
    assert_eq!(status, 426);
    assert_eq!(headers["sec-websocket-version"], "13");
    // Garbage that is not HTTP at all gets hyper's 400, not a hang.
    let mut raw = TcpStream::connect(server.ws).await.expect("connect");
    raw.write_all(b"\x16\x03\x01 definitely not http\r\n\r\n")
        .await
        .expect("write");
    let reply = expect_dropped(raw).await;
    assert!(
        reply.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
}

#[tokio::test]
async fn default_origin_policy_admits_the_page_and_refuses_others() {
    let server = TestServer::default().await;
    let page_origin = format!("http://127.0.0.1:{}", server.http.port());
    let localhost_origin = format!("http://localhost:{}", server.http.port());
    let ws_port_origin = format!("http://127.0.0.1:{}", server.ws.port());

    let mut ws = connect(server.ws, Some(&page_origin))
        .await
        .expect("the page's own origin is admitted");
    send_text(&mut ws, "from the page").await;
    assert_eq!(next_text(&mut ws).await, "from the page");
    connect(server.ws, Some(&localhost_origin))
        .await
        .expect("localhost names the same loopback listener");
    connect(server.ws, None)
        .await
        .expect("non-browser clients send no Origin");

    for foreign in ["http://evil.example", &ws_port_origin, "null"] {
        let refused = connect(server.ws, Some(foreign)).await;
        assert_eq!(refused_status(refused), 403, "{foreign}");
    }
}

#[tokio::test]
async fn allowed_origins_list_and_wildcard() {
    let server = TestServer::start(Config {
        allowed_origins: OriginPolicy::List(vec!["https://chat.example.com".into()]),
        ..Config::ephemeral()
    })
    .await;
    connect(server.ws, Some("https://chat.example.com"))
        .await
        .expect("listed origin");
    let page_origin = format!("http://127.0.0.1:{}", server.http.port());
    assert_eq!(
        refused_status(connect(server.ws, Some(&page_origin)).await),
        403
    );

    let open = TestServer::start(Config {
        allowed_origins: OriginPolicy::Any,
        ..Config::ephemeral()
    })
    .await;
    connect(open.ws, Some("http://anything.example"))
        .await
        .expect("* admits any origin");
}

/// Over its rate a sender's messages are not relayed: a v1 sender gets a
/// `rate_limited` error for each, the room sees only what was allowed, and a
/// sender that keeps going is closed with 1008.
#[tokio::test]
async fn a_sender_over_its_rate_is_refused_then_closed() {
    let server = TestServer::start(Config {
        rate_limit_per_sec: 1,
        rate_limit_burst: 5,
        ..Config::ephemeral()
    })
    .await;
    let mut watcher = connect_to(server.ws, "/rooms/rate", false)
        .await
        .expect("watcher");
    let mut sender = connect_to(server.ws, "/rooms/rate", true)
        .await
        .expect("sender");
    assert_eq!(next_envelope(&mut sender, false).await["type"], "hello");
    for i in 0..8 {
        send_text(&mut sender, &format!("m{i}")).await;
    }
    // The burst of 5 goes through, then refusals (one more may pass if the
    // machine took over a second to send these: the rate is 1 a second).
    let (mut relayed, mut refused) = (0, 0);
    while relayed + refused < 8 {
        let e = next_envelope(&mut sender, false).await;
        match e["type"].as_str() {
            Some("message") => relayed += 1,
            Some("error") => {
                assert_eq!(e["code"], "rate_limited", "{e}");
                refused += 1;
            }
            _ => panic!("unexpected {e}"),
        }
    }
    assert!((5..=6).contains(&relayed), "{relayed} relayed");
    for i in 0..relayed {
        let got = next_text(&mut watcher).await;
        if i < 5 {
            assert_eq!(got, format!("m{i}"));
        }
    }
    assert_eq!(server.metric("hubbub_rate_limited_total").await, refused);
    // Keeping on: more than 5 refusals within 10 s closes it.
    for i in 8..16 {
        send_text(&mut sender, &format!("m{i}")).await;
    }
    let (frame, _) = expect_close(&mut sender).await;
    assert_eq!(frame.code, CloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "rate limit exceeded");
    // The watcher saw nothing over the limit and is still connected.
    send_text(&mut watcher, "still here").await;
    assert_eq!(next_text(&mut watcher).await, "still here");
}

/// With the default limits, one client sending as fast as it can cannot
/// empty a room: it is refused and closed, and readers keep everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooder_is_closed_and_readers_stay() {
    let server = TestServer::default().await;
    let mut readers = Vec::new();
    for _ in 0..20 {
        readers.push(server.connect().await);
    }
    let mut flooder = server.connect().await;
    server.wait_metric("hubbub_connections", 21).await;
    let body = "f".repeat(1024);
    let flood = tokio::spawn(async move {
        for _ in 0..20_000 {
            if flooder.send(Message::text(body.clone())).await.is_err() {
                break;
            }
        }
        flooder
    });
    let mut flooder = flood.await.expect("flooder");
    let (frame, relayed) = expect_close(&mut flooder).await;
    assert_eq!(frame.code, CloseCode::Policy, "{frame:?}");
    // The burst of 100, plus the rate's 50 a second while the flood lasted.
    assert!(relayed <= 150, "{relayed} flood messages relayed");
    // Every reader got the relayed part of the flood and is still here.
    for reader in readers.iter_mut() {
        for _ in 0..relayed {
            next_text(reader).await;
        }
    }
    server.wait_metric("hubbub_connections", 20).await;
    assert_eq!(
        server
            .metric("hubbub_slow_consumer_disconnects_total")
            .await,
        0
    );
}

/// A TCP connection from a chosen loopback address (127.0.0.2 and up are
/// distinct client addresses on Linux).
async fn tcp_from(from: &str, to: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("address"))
        .expect("bind");
    socket.connect(to).await.expect("connect")
}

/// A WebSocket handshake from a chosen address with extra headers; the
/// response's status. Accepted connections are kept in `open`.
async fn status_from(
    open: &mut Vec<TcpStream>,
    from: &str,
    server: &TestServer,
    headers: &[&str],
) -> u16 {
    let mut tcp = tcp_from(from, server.ws).await;
    let mut request = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        server.ws
    );
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut head = vec![0u8; 12];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut head))
        .await
        .expect("an answer in time")
        .expect("read");
    let status = String::from_utf8_lossy(&head[9..12]).parse().unwrap_or(0);
    if status == 101 {
        open.push(tcp);
    }
    status
}

/// Connections that never finish their handshake, from one address, use
/// up that address's share and nobody else's.
#[tokio::test]
async fn one_address_cannot_hold_more_than_its_share() {
    let server = TestServer::start(Config {
        max_connections_per_ip: 3,
        ..Config::ephemeral()
    })
    .await;
    let mut open = Vec::new();
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(tcp_from("127.0.0.1", server.ws).await);
    }
    assert_eq!(status_from(&mut open, "127.0.0.1", &server, &[]).await, 429);
    server
        .wait_metric("hubbub_connections_total{result=\"address_limit\"}", 1)
        .await;
    // Another address is not affected.
    assert_eq!(status_from(&mut open, "127.0.0.2", &server, &[]).await, 101);
    // A freed share is usable again.
    drop(stalled.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match status_from(&mut open, "127.0.0.1", &server, &[]).await {
            101 => break,
            429 if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("got {other}"),
        }
    }
    // The HTTP listener counts the same way: the fourth is closed unanswered.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tcp_from("127.0.0.3", server.http).await);
    }
    let mut fourth = tcp_from("127.0.0.3", server.http).await;
    let _ = fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let got = tokio::time::timeout(WAIT, fourth.read(&mut buf)).await;
    assert!(matches!(got, Ok(Ok(0)) | Ok(Err(_))), "{got:?}");
    let (status, _, _) = http_get(server.http, "/healthz").await;
    assert_eq!(status, 200);
}

/// Behind a trusted proxy each client named by X-Forwarded-For or
/// Forwarded has its own share; anyone else's such headers are ignored.
#[tokio::test]
async fn clients_behind_a_trusted_proxy_are_counted_by_their_own_address() {
    let server = TestServer::start(Config {
        max_connections_per_ip: 2,
        trusted_proxies: hubbub::clients::TrustedProxies(vec!["127.0.0.5/32"
            .parse()
            .expect("net")]),
        ..Config::ephemeral()
    })
    .await;
    let mut open = Vec::new();
    let alice = "X-Forwarded-For: 198.51.100.7";
    let bob = "Forwarded: for=198.51.100.8;proto=http";
    for (from, header, want) in [
        ("127.0.0.5", Some(alice), 101),
        ("127.0.0.5", Some(alice), 101),
        ("127.0.0.5", Some(alice), 429),
        ("127.0.0.5", Some(bob), 101),
        // The proxy itself must name the client.
        ("127.0.0.5", None, 400),
        // From an address that is not a trusted proxy the header means
        // nothing: these are counted as 127.0.0.6, which holds nothing yet.
        ("127.0.0.6", Some(alice), 101),
        ("127.0.0.6", Some(alice), 101),
        ("127.0.0.6", Some(bob), 429),
    ] {
        let headers: Vec<&str> = header.into_iter().collect();
        let got = status_from(&mut open, from, &server, &headers).await;
        assert_eq!(got, want, "from {from} with {header:?}");
    }
}

//! The opening handshake's edges, written byte for byte on raw sockets
//! because a WebSocket library would not send them: bodies, HTTP/1.0, bad
//! keys, origins that are not text, rebound host names.

mod common;

use common::*;
use hubbub::config::OriginPolicy;
use hubbub::Config;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// An upgrade request with `lines` as its headers after the request line.
fn upgrade(version: &str, lines: &[&str], body: &str) -> Vec<u8> {
    let mut r = format!("GET / {version}\r\n");
    for line in lines {
        r.push_str(line);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

fn standard(host: &str) -> Vec<String> {
    vec![
        format!("Host: {host}"),
        "Upgrade: websocket".into(),
        "Connection: Upgrade".into(),
        "Sec-WebSocket-Version: 13".into(),
    ]
}

async fn status_of(server: &TestServer, version: &str, extra: &[&str], body: &str) -> String {
    let host = server.ws.to_string();
    let mut lines: Vec<String> = standard(&host);
    lines.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let head = raw_request(server.ws, &upgrade(version, &refs, body)).await;
    head.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn an_upgrade_with_a_body_is_refused() {
    let server = TestServer::default().await;
    let key = format!("Sec-WebSocket-Key: {KEY}");
    let chunked = status_of(
        &server,
        "HTTP/1.1",
        &[&key, "Transfer-Encoding: chunked"],
        "5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 400"), "{chunked}");
    let sized = status_of(&server, "HTTP/1.1", &[&key, "Content-Length: 5"], "hello").await;
    assert!(sized.starts_with("HTTP/1.1 400"), "{sized}");
    // An explicit empty body is still a handshake.
    let empty = status_of(&server, "HTTP/1.1", &[&key, "Content-Length: 0"], "").await;
    assert!(empty.starts_with("HTTP/1.1 101"), "{empty}");
    server
        .wait_metric("hubbub_connections_total{result=\"bad_request\"}", 2)
        .await;
}

#[tokio::test]
async fn an_http_1_0_upgrade_is_refused_and_counted() {
    let server = TestServer::default().await;
    let key = format!("Sec-WebSocket-Key: {KEY}");
    let status = status_of(&server, "HTTP/1.0", &[&key], "").await;
    assert!(status.contains(" 400"), "{status}");
    server
        .wait_metric("hubbub_connections_total{result=\"bad_request\"}", 1)
        .await;
    assert_eq!(server.metric("hubbub_connections").await, 0);
}

#[tokio::test]
async fn a_missing_empty_or_malformed_key_is_refused() {
    let server = TestServer::default().await;
    for key in [
        None,
        Some(""),
        Some("abc"),
        Some("not base64 at all, 24 ch"),
        Some("AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
    ] {
        let line = key.map(|k| format!("Sec-WebSocket-Key: {k}"));
        let extra: Vec<&str> = line.iter().map(String::as_str).collect();
        let status = status_of(&server, "HTTP/1.1", &extra, "").await;
        assert!(status.starts_with("HTTP/1.1 400"), "key {key:?}: {status}");
    }
}

#[tokio::test]
async fn an_origin_that_is_not_text_is_refused() {
    let server = TestServer::default().await;
    let mut request = Vec::new();
    request.extend_from_slice(b"GET / HTTP/1.1\r\n");
    for line in standard(&server.ws.to_string()) {
        request.extend_from_slice(line.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(format!("Sec-WebSocket-Key: {KEY}\r\n").as_bytes());
    request.extend_from_slice(b"Origin: http://\xff\xfe.example\r\n\r\n");
    let head = raw_request(server.ws, &request).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    server
        .wait_metric("hubbub_connections_total{result=\"forbidden_origin\"}", 1)
        .await;
}

/// DNS rebinding: a page on a site whose name now resolves to 127.0.0.1
/// sends its own name as both Origin and Host. On the default loopback bind
/// only loopback names are the page's own.
#[tokio::test]
async fn a_rebound_host_name_is_refused_on_a_loopback_bind() {
    let server = TestServer::default().await;
    let http_port = server.http.port();
    let ws_port = server.ws.port();
    let mut lines = standard(&format!("evil.example:{ws_port}"));
    lines.push(format!("Sec-WebSocket-Key: {KEY}"));
    lines.push(format!("Origin: http://evil.example:{http_port}"));
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let head = raw_request(server.ws, &upgrade("HTTP/1.1", &refs, "")).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    // The page's real origins still get in.
    for origin in [
        format!("http://127.0.0.1:{http_port}"),
        format!("http://localhost:{http_port}"),
    ] {
        assert!(connect(server.ws, Some(&origin)).await.is_ok(), "{origin}");
    }
}

#[tokio::test]
async fn an_allowlist_entry_with_the_default_port_matches_the_browser_origin() {
    let server = TestServer::start(Config {
        allowed_origins: OriginPolicy::List(vec!["https://chat.example.com".into()]),
        ..Config::ephemeral()
    })
    .await;
    assert!(connect(server.ws, Some("https://chat.example.com"))
        .await
        .is_ok());
    assert!(connect(server.ws, Some("https://chat.example.com:443"))
        .await
        .is_ok());
    assert_eq!(
        refused_status(connect(server.ws, Some("https://chat.example.com:8443")).await),
        403
    );
}

/// Whatever arrives instead of a request, on either listener, gets a 4xx or
/// a closed connection in bounded time, never a panic or a stuck task, and
/// the server goes on serving.
#[tokio::test]
async fn garbage_on_both_listeners_gets_a_4xx_or_a_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(Config {
        handshake_timeout: std::time::Duration::from_secs(2),
        ..Config::ephemeral()
    })
    .await;
    let mut random = Vec::with_capacity(4096);
    let mut x: u32 = 0x2545_f491;
    for _ in 0..4096 {
        // xorshift: varied bytes, the same every run.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        random.push(x as u8);
    }
    let many_headers: String = (0..5000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let huge_header = format!("X-Big: {}\r\n", "a".repeat(100 * 1024));
    let key = format!("Sec-WebSocket-Key: {KEY}\r\n");
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n";
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", random),
        ("a truncated request line", b"GET / HT".to_vec()),
        (
            "a request line alone, then nothing",
            b"GET / HTTP/1.1\r\n".to_vec(),
        ),
        (
            "100 KB of one header",
            format!("GET / HTTP/1.1\r\nHost: x\r\n{upgrade}{key}{huge_header}\r\n").into_bytes(),
        ),
        (
            "5,000 headers",
            format!("GET / HTTP/1.1\r\nHost: x\r\n{upgrade}{key}{many_headers}\r\n").into_bytes(),
        ),
        (
            "Sec-WebSocket-Version 8",
            format!("GET / HTTP/1.1\r\nHost: x\r\n{upgrade}{key}Sec-WebSocket-Version: 8\r\n\r\n")
                .into_bytes(),
        ),
        (
            "no key",
            format!("GET / HTTP/1.1\r\nHost: x\r\n{upgrade}Sec-WebSocket-Version: 13\r\n\r\n")
                .into_bytes(),
        ),
        (
            "a NUL in the method",
            b"G\0T / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
    ];
    // All at once: the HTTP listener's header deadline is 10 s.
    let mut probes = Vec::new();
    for (listener, addr) in [("WebSocket", server.ws), ("HTTP", server.http)] {
        for (what, bytes) in inputs.clone() {
            probes.push(tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
                // The server may close before taking it all; that is an answer too.
                let _ = stream.write_all(&bytes).await;
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let answered = tokio::time::timeout(std::time::Duration::from_secs(15), async {
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                })
                .await;
                assert!(
                    answered.is_ok(),
                    "{listener} listener, {what}: no answer and no close"
                );
                let head = String::from_utf8_lossy(&got);
                if !head.is_empty() {
                    let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                    // On the HTTP listener a well-formed GET / is the page.
                    let well_formed_get = listener == "HTTP"
                        && bytes.starts_with(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade")
                        && bytes.len() < 32 * 1024;
                    let fine = (400..500).contains(&status) || (well_formed_get && status == 200);
                    assert!(
                        fine,
                        "{listener} listener, {what}: {}",
                        head.lines().next().unwrap_or("")
                    );
                }
            }));
        }
    }
    for probe in probes {
        probe.await.expect("probe");
    }
    // Both listeners still serve.
    let (status, _, _) = http_get(server.http, "/healthz").await;
    assert_eq!(status, 200);
    let mut ws = server.connect().await;
    send_text(&mut ws, "still serving").await;
    assert_eq!(next_text(&mut ws).await, "still serving");
}

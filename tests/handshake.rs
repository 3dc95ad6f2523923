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

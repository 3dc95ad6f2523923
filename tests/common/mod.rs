//! Shared helpers for the integration tests: a server on loopback ports
//! chosen by the OS, real WebSocket clients, and a tiny HTTP client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hubbub::{Config, Server};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Upper bound for anything a test waits on; generous so a loaded CI
/// machine does not flake, short enough that a broken server fails fast.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub http: SocketAddr,
    pub ws: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), hubbub::Error>>>,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        let server = Server::bind(config).await.expect("bind test server");
        let (http, ws) = (server.http_addr(), server.ws_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestServer {
            http,
            ws,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn default() -> TestServer {
        TestServer::start(Config::ephemeral()).await
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/", self.ws)
    }

    /// Triggers graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits for `run` to return.
    pub async fn shutdown(mut self) -> Result<(), hubbub::Error> {
        self.begin_shutdown();
        let task = self.task.take().expect("server task");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("server stops in time")
            .expect("server task did not panic")
    }

    pub async fn connect(&self) -> Ws {
        connect(self.ws, None).await.expect("websocket connect")
    }

    pub async fn metric(&self, name: &str) -> u64 {
        let (_, _, body) = http_get(self.http, "/metrics").await;
        metric_value(&body, name).unwrap_or_else(|| panic!("metric {name} not found in:\n{body}"))
    }

    /// Polls `/metrics` until `name` equals `want`, or fails after [`WAIT`].
    pub async fn wait_metric(&self, name: &str, want: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.metric(name).await;
            if got == want {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("metric {name} is {got}, expected {want}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn metric_value(body: &str, name: &str) -> Option<u64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok()).flatten()
    })
}

/// Opens a WebSocket, optionally sending an `Origin` header like a browser.
pub async fn connect(addr: SocketAddr, origin: Option<&str>) -> Result<Ws, tungstenite::Error> {
    let mut request = format!("ws://{addr}/").into_client_request()?;
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", origin.parse().expect("origin header"));
    }
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake answered in time")?;
    Ok(ws)
}

/// The HTTP status a refused handshake got.
pub fn refused_status(result: Result<Ws, tungstenite::Error>) -> u16 {
    match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got error {e}"),
        Ok(_) => panic!("expected an HTTP refusal, but the handshake succeeded"),
    }
}

/// Next data message (text or binary), skipping control frames.
pub async fn next_data(ws: &mut Ws) -> Message {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("stream still open")
            .expect("no read error");
        match msg {
            Message::Text(_) | Message::Binary(_) => return msg,
            Message::Close(frame) => panic!("expected data, got close {frame:?}"),
            _ => continue,
        }
    }
}

pub async fn next_text(ws: &mut Ws) -> String {
    match next_data(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Reads until the server's close frame and returns it, skipping any data
/// still queued ahead of it. Counts the data messages skipped.
pub async fn expect_close(ws: &mut Ws) -> (CloseFrame, usize) {
    let mut skipped = 0;
    loop {
        let next = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close frame in time");
        match next {
            Some(Ok(Message::Close(Some(frame)))) => return (frame, skipped),
            Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
            Some(Ok(Message::Text(_) | Message::Binary(_))) => skipped += 1,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("read error before the close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// A GET over a fresh connection; returns status, headers and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, hyper::HeaderMap, String) {
    http_request(addr, "GET", path, &[]).await
}

pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, String) {
    http_send(addr, method, path, headers, Vec::new()).await
}

/// A WebSocket handshake written by hand on a raw TCP socket, for tests that
/// must send what a WebSocket library would not (or never read at all).
/// Returns the socket once the 101 response has been read, or the response
/// head if the server refused.
pub async fn raw_handshake(addr: SocketAddr, extra_headers: &str) -> Result<TcpStream, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("tcp connect");
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    // Read the response head byte by byte so nothing after it is consumed.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if head.starts_with("HTTP/1.1 101") {
        Ok(stream)
    } else {
        Err(head)
    }
}

/// One masked client frame (FIN set) with the given opcode and payload.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n < 65536 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Writes `request` as it is on a fresh connection and returns the response
/// head (up to the blank line, or whatever came before the server closed).
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("tcp connect");
    stream.write_all(request).await.expect("write request");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            Ok(_) => break,
            Err(_) => panic!("no response in time"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Opens a WebSocket to `path` (with its query) on the server's WebSocket
/// listener, asking for `hubbub.v1` when `v1` is set.
pub async fn connect_to(addr: SocketAddr, path: &str, v1: bool) -> Result<Ws, tungstenite::Error> {
    let mut request = format!("ws://{addr}{path}").into_client_request()?;
    if v1 {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "hubbub.v1".parse().expect("header"),
        );
    }
    let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake answered in time")?;
    let protocol = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().unwrap_or("").to_string());
    assert_eq!(
        protocol.as_deref(),
        v1.then_some("hubbub.v1"),
        "the server must echo hubbub.v1 exactly when it was asked for"
    );
    Ok(ws)
}

/// The next `hubbub.v1` envelope as JSON, skipping `presence` notices unless
/// `presence` is set.
pub async fn next_envelope(ws: &mut Ws, presence: bool) -> serde_json::Value {
    loop {
        let text = next_text(ws).await;
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        if !presence && value["type"] == "presence" {
            continue;
        }
        return value;
    }
}
pub mod redis;

/// A request with a body over a fresh connection; returns status, headers
/// and body.
pub async fn http_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, hyper::HeaderMap, String) {
    let stream = TcpStream::connect(addr).await.expect("tcp connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("Host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(Bytes::from(body)))
        .expect("request");
    let res = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("response in time")
        .expect("response");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

//! Opening connections: TCP (optionally from a chosen 127.0.0.x source
//! address), the WebSocket opening handshake done by tungstenite's client,
//! then the raw socket handed back for the tool's own frame codec.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Uri};

/// What the clients speak: what they ask for in the handshake and how they
/// read what the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// No subprotocol: the server relays each message byte for byte.
    #[default]
    Raw,
    /// `Sec-WebSocket-Protocol: hubbub.v1`: the server wraps each message in
    /// a JSON envelope with its offset in the room (see `docs/protocol.md`).
    HubbubV1,
}

impl Protocol {
    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Raw => "raw",
            Protocol::HubbubV1 => SUBPROTOCOL_V1,
        }
    }

    /// The `Sec-WebSocket-Protocol` the client asks for.
    pub fn subprotocol(self) -> Option<&'static str> {
        match self {
            Protocol::Raw => None,
            Protocol::HubbubV1 => Some(SUBPROTOCOL_V1),
        }
    }
}

pub const SUBPROTOCOL_V1: &str = "hubbub.v1";

/// The room path of room number `room`: `/rooms/bench-<room>`.
pub fn room_path(room: u32) -> String {
    format!("/rooms/bench-{room}")
}

/// Where to connect, parsed once from the `ws://` URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    /// `ws://host:port`, for URLs with another path (rooms).
    origin: String,
    /// `?...` of the URL, or empty.
    query: String,
}

impl Target {
    pub async fn resolve(url: &str) -> anyhow::Result<Target> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("invalid URL {url:?}"))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some("wss") => bail!("wss:// is not supported: benchmark plain ws:// on loopback"),
            _ => bail!("URL must start with ws:// (got {url:?})"),
        }
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("URL has no host: {url:?}"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .next()
            .ok_or_else(|| anyhow!("{host} resolves to no address"))?;
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("URL has no host: {url:?}"))?;
        Ok(Target {
            url: url.to_string(),
            addr,
            origin: format!("ws://{authority}"),
            query: uri.query().map(|q| format!("?{q}")).unwrap_or_default(),
        })
    }

    /// The URL to connect to: the one given, or for a room its path
    /// `/rooms/bench-<room>` on the same host (the query is kept).
    pub fn url_for(&self, room: Option<u32>) -> String {
        match room {
            None => self.url.clone(),
            Some(r) => format!("{}{}{}", self.origin, room_path(r), self.query),
        }
    }
}

/// Picks the local address for connection number `i` when spreading over
/// `source_ips` loopback addresses (127.0.0.1, 127.0.0.2, ...). Each source
/// address has its own range of ephemeral ports.
pub fn source_addr(i: usize, source_ips: usize, target: &SocketAddr) -> Option<SocketAddr> {
    if source_ips <= 1 {
        return None;
    }
    match target.ip() {
        IpAddr::V4(v4) if v4.is_loopback() => {
            let last = 1 + (i % source_ips.min(254)) as u8;
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
                0,
            ))
        }
        _ => None,
    }
}

/// Options for one connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectOpts {
    pub source: Option<SocketAddr>,
    /// SO_RCVBUF for this socket (a client that never reads is then
    /// backed up after this many bytes instead of the kernel default).
    pub recv_buffer: Option<u32>,
    /// Join room `/rooms/bench-<room>` instead of the URL's own path.
    pub room: Option<u32>,
    pub protocol: Protocol,
}

/// Opens one WebSocket connection and returns the raw socket, positioned
/// right after the server's handshake response.
pub async fn connect(
    target: &Target,
    opts: ConnectOpts,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    tokio::time::timeout(timeout, connect_inner(target, opts))
        .await
        .map_err(|_| anyhow!("connect + handshake timed out after {timeout:?}"))?
}

async fn connect_inner(target: &Target, opts: ConnectOpts) -> anyhow::Result<TcpStream> {
    let sock = if target.addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(src) = opts.source {
        sock.bind(src).with_context(|| format!("bind {src}"))?;
    }
    if let Some(n) = opts.recv_buffer {
        sock.set_recv_buffer_size(n)?;
    }
    let stream = sock
        .connect(target.addr)
        .await
        .with_context(|| format!("connect {}", target.addr))?;
    stream.set_nodelay(true)?;
    let url = target.url_for(opts.room);
    let mut req = url
        .as_str()
        .into_client_request()
        .with_context(|| format!("invalid URL {url:?}"))?;
    if let Some(p) = opts.protocol.subprotocol() {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(p));
    }
    let (ws, resp) = match tokio_tungstenite::client_async(req, HeadOnly::new(stream)).await {
        Ok(x) => x,
        Err(e) => {
            use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
            if let (Some(p), WsError::Protocol(ProtocolError::SecWebSocketSubProtocolError(_))) =
                (opts.protocol.subprotocol(), &e)
            {
                bail!(
                    "WebSocket handshake with {url}: the server did not accept subprotocol {p} \
                     (its 101 response has no `Sec-WebSocket-Protocol: {p}`; a server without \
                     hubbub.v1 needs --protocol raw): {e}"
                );
            }
            return Err(anyhow::Error::new(e).context(format!("WebSocket handshake with {url}")));
        }
    };
    debug_assert_eq!(resp.status().as_u16(), 101);
    check_subprotocol(
        opts.protocol,
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .map(HeaderValue::as_bytes),
    )
    .with_context(|| format!("WebSocket handshake with {url}"))?;
    let head_only = ws.into_inner();
    Ok(head_only.into_inner())
}

/// Checks the `Sec-WebSocket-Protocol` of the server's 101 against what
/// was asked for (tungstenite checks it too; this makes the rule explicit
/// and the error plain).
pub fn check_subprotocol(asked: Protocol, echoed: Option<&[u8]>) -> anyhow::Result<()> {
    match (asked.subprotocol(), echoed) {
        (None, None) => Ok(()),
        (Some(p), Some(e)) if e == p.as_bytes() => Ok(()),
        (Some(p), None) => bail!(
            "the server did not accept subprotocol {p} (no Sec-WebSocket-Protocol in its 101)"
        ),
        (Some(p), Some(e)) => bail!(
            "the server answered subprotocol {:?} instead of {p}",
            String::from_utf8_lossy(e)
        ),
        (None, Some(e)) => bail!(
            "the server chose subprotocol {:?} that was not asked for",
            String::from_utf8_lossy(e)
        ),
    }
}

/// Wraps the socket during the handshake so tungstenite is never handed a
/// byte past the end of the server's response head (the blank line).
///
/// tungstenite keeps any bytes it read beyond the response inside its own
/// WebSocket object, and `into_inner()` would drop them: a frame the server
/// sent right after the 101 would be lost, or worse, cut in half. So reads
/// here first peek, and consume only up to the end of the head. This only
/// finds the end of the head; tungstenite parses and checks the response.
pub struct HeadOnly {
    inner: TcpStream,
    /// How many bytes of "\r\n\r\n" the bytes consumed so far end with.
    matched: u8,
    done: bool,
}

impl HeadOnly {
    fn new(inner: TcpStream) -> Self {
        HeadOnly {
            inner,
            matched: 0,
            done: false,
        }
    }

    pub fn into_inner(self) -> TcpStream {
        self.inner
    }
}

/// Scans `data` for the end of an HTTP head given `matched` bytes of the
/// terminator already seen. Returns how many bytes belong to the head (all
/// of them if the end is not there yet) and the new match state (4 = found).
pub fn scan_head_end(data: &[u8], mut matched: u8) -> (usize, u8) {
    const END: &[u8; 4] = b"\r\n\r\n";
    for (i, &b) in data.iter().enumerate() {
        matched = if b == END[matched as usize] {
            matched + 1
        } else if b == b'\r' {
            1
        } else {
            0
        };
        if matched == 4 {
            return (i + 1, 4);
        }
    }
    (data.len(), matched)
}

impl AsyncRead for HeadOnly {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.done {
            // tungstenite stops reading once the head is complete; should it
            // ask again, it would only get what belongs to the frames.
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let mut peek = [0u8; 1024];
        let want = buf.remaining().min(peek.len());
        let mut pb = ReadBuf::new(&mut peek[..want]);
        match this.inner.poll_peek(cx, &mut pb) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(_)) => {}
        }
        let peeked = pb.filled();
        if peeked.is_empty() {
            return Poll::Ready(Ok(())); // EOF
        }
        let (take, matched) = scan_head_end(peeked, this.matched);
        // Consume exactly the bytes just peeked (they are already queued).
        let mut got = 0;
        while got < take {
            let dst = buf.initialize_unfilled_to(take - got);
            match this.inner.try_read(dst) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    buf.advance(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if got == 0 {
            // Peeked bytes not readable yet (should not happen): try again
            // rather than report a zero-byte read, which would mean EOF.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        // Only record the match state for what was really consumed.
        if got == take {
            this.matched = matched;
            this.done = matched == 4;
        } else {
            let consumed = &peeked[..got];
            let (_, m) = scan_head_end(consumed, this.matched);
            this.matched = m;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HeadOnly {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_found_across_chunks() {
        let head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi";
        let head_len = head.len() - 4;
        for split in 0..head.len() {
            let (n1, m1) = scan_head_end(&head[..split], 0);
            if m1 == 4 {
                assert_eq!(n1, head_len);
                continue;
            }
            assert_eq!(n1, split);
            let (n2, m2) = scan_head_end(&head[split..], m1);
            assert_eq!(m2, 4, "split {split}");
            assert_eq!(split + n2, head_len, "split {split}");
        }
        assert_eq!(scan_head_end(b"a\r\n\rb\r\r\n\r\n", 0), (10, 4));
        assert_eq!(scan_head_end(b"no end\r\n", 0), (8, 2));
    }

    #[test]
    fn spreads_sources_only_on_ipv4_loopback() {
        let lo: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        assert_eq!(source_addr(0, 1, &lo), None);
        assert_eq!(
            source_addr(0, 4, &lo).unwrap().ip().to_string(),
            "127.0.0.1"
        );
        assert_eq!(
            source_addr(5, 4, &lo).unwrap().ip().to_string(),
            "127.0.0.2"
        );
        let v6: SocketAddr = "[::1]:8081".parse().unwrap();
        assert_eq!(source_addr(5, 4, &v6), None);
    }

    #[tokio::test]
    async fn room_urls_keep_host_port_and_query() {
        let t = Target::resolve("ws://127.0.0.1:8081/").await.unwrap();
        assert_eq!(t.url_for(None), "ws://127.0.0.1:8081/");
        assert_eq!(t.url_for(Some(7)), "ws://127.0.0.1:8081/rooms/bench-7");
        let t = Target::resolve("ws://127.0.0.1:9/x/y?since=3&epoch=e")
            .await
            .unwrap();
        assert_eq!(t.url_for(None), "ws://127.0.0.1:9/x/y?since=3&epoch=e");
        assert_eq!(
            t.url_for(Some(0)),
            "ws://127.0.0.1:9/rooms/bench-0?since=3&epoch=e"
        );
    }

    #[test]
    fn subprotocol_must_be_echoed_exactly() {
        assert!(check_subprotocol(Protocol::Raw, None).is_ok());
        assert!(check_subprotocol(Protocol::HubbubV1, Some(b"hubbub.v1")).is_ok());
        let e = check_subprotocol(Protocol::HubbubV1, None).unwrap_err();
        assert!(
            e.to_string()
                .contains("did not accept subprotocol hubbub.v1"),
            "{e}"
        );
        assert!(check_subprotocol(Protocol::HubbubV1, Some(b"hubbub.v2")).is_err());
        assert!(check_subprotocol(Protocol::Raw, Some(b"hubbub.v1")).is_err());
        assert_eq!(Protocol::HubbubV1.name(), "hubbub.v1");
        assert_eq!(Protocol::Raw.subprotocol(), None);
    }
}

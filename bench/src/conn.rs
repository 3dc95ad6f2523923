//! Opening connections: TCP (optionally from a chosen 127.0.0.x source
//! address), TLS for `wss://` URLs, the WebSocket opening handshake done by
//! tungstenite's client, then the stream handed back for the tool's own
//! frame codec.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
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

/// Where to connect, parsed once from the `ws://` or `wss://` URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    /// `ws://host:port` (or `wss://`), for URLs with another path (rooms).
    origin: String,
    /// `?...` of the URL, or empty.
    query: String,
    /// `wss://`: the TLS client settings and the name the server is asked for.
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl Target {
    pub async fn resolve(url: &str) -> anyhow::Result<Target> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("invalid URL {url:?}"))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => bail!("URL must start with ws:// or wss:// (got {url:?})"),
        };
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("URL has no host: {url:?}"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tls = if secure {
            let name = ServerName::try_from(host.to_string())
                .with_context(|| format!("{host:?} is not a name TLS can ask for"))?;
            Some((any_certificate_config()?, name))
        } else {
            None
        };
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
            origin: format!("{}://{authority}", if secure { "wss" } else { "ws" }),
            query: uri.query().map(|q| format!("?{q}")).unwrap_or_default(),
            tls,
        })
    }

    /// Whether connections speak TLS (`wss://`).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
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

/// Opens one WebSocket connection and returns the stream, positioned right
/// after the server's handshake response.
pub async fn connect(
    target: &Target,
    opts: ConnectOpts,
    timeout: Duration,
) -> anyhow::Result<Stream> {
    tokio::time::timeout(timeout, connect_inner(target, opts))
        .await
        .map_err(|_| anyhow!("connect + handshake timed out after {timeout:?}"))?
}

async fn connect_inner(target: &Target, opts: ConnectOpts) -> anyhow::Result<Stream> {
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
    let stream = match &target.tls {
        None => Stream::Plain(stream),
        Some((config, name)) => {
            let tls = TlsConnector::from(config.clone())
                .connect(name.clone(), stream)
                .await
                .with_context(|| format!("TLS handshake with {}", target.addr))?;
            Stream::Tls(Box::new(tls))
        }
    };
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
///
/// Over TLS there is no peeking at the plaintext: reads there ask for at
/// most as many bytes as the terminator still needs, which can never go
/// past it, and cost nothing much (rustls hands them out of the record it
/// has already decrypted).
pub struct HeadOnly {
    inner: Stream,
    /// How many bytes of "\r\n\r\n" the bytes consumed so far end with.
    matched: u8,
    done: bool,
}

impl HeadOnly {
    fn new(inner: Stream) -> Self {
        HeadOnly {
            inner,
            matched: 0,
            done: false,
        }
    }

    pub fn into_inner(self) -> Stream {
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
        let tcp = match &mut this.inner {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => {
                let want = buf.remaining().min(usize::from(4 - this.matched));
                let mut small = [0u8; 4];
                let mut sb = ReadBuf::new(&mut small[..want]);
                std::task::ready!(Pin::new(tls.as_mut()).poll_read(cx, &mut sb))?;
                let got = sb.filled();
                let (_, matched) = scan_head_end(got, this.matched);
                this.matched = matched;
                this.done = matched == 4;
                buf.put_slice(got);
                return Poll::Ready(Ok(()));
            }
        };
        let mut peek = [0u8; 1024];
        let want = buf.remaining().min(peek.len());
        let mut pb = ReadBuf::new(&mut peek[..want]);
        match tcp.poll_peek(cx, &mut pb) {
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
            match tcp.try_read(dst) {
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

/// A connection to the server: plain TCP, or TLS over it for `wss://`.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The read side of a [`Stream`], for the connection's reader task.
pub enum ReadHalf {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// The write side of a [`Stream`], shared by the connection's writers.
pub enum WriteHalf {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

impl Stream {
    /// Splits the stream so one task reads while others write. Plain TCP
    /// splits for free; a TLS session is one state for both directions, so
    /// its halves share it behind tokio's lock.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(tcp) => {
                let (r, w) = tcp.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(tls) => {
                let (r, w) = tokio::io::split(*tls);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// TLS client settings for `wss://` that accept any certificate: a load
/// generator on loopback measures the server's TLS, it does not vouch for
/// its identity (the certificate is usually made for the run). Handshake
/// signatures are still checked, so the session's keys are real.
fn any_certificate_config() -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts whatever certificate the server shows (see
/// [`any_certificate_config`]).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
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

    #[tokio::test]
    async fn wss_urls_speak_tls_on_port_443_by_default() {
        let t = Target::resolve("wss://127.0.0.1/").await.unwrap();
        assert!(t.is_tls());
        assert_eq!(t.addr.port(), 443);
        assert_eq!(t.url_for(Some(2)), "wss://127.0.0.1/rooms/bench-2");
        let t = Target::resolve("ws://127.0.0.1/").await.unwrap();
        assert!(!t.is_tls());
        assert_eq!(t.addr.port(), 80);
        assert!(Target::resolve("http://127.0.0.1/").await.is_err());
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

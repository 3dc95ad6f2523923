//! A peer's TCP socket as tungstenite sees it: large reads, no buffer kept
//! while idle.
//!
//! tungstenite reads into a buffer it owns per connection. Asked to keep
//! none while idle (`read_buffer_size = 0`, which an idle peer's memory
//! needs), it reads at most 14 bytes per call, so a 60 KB message took over
//! four thousand `recv` system calls and one client streaming large messages
//! kept a core busy. This wrapper reads from the kernel in large chunks into
//! a buffer shared by every connection on the same worker thread, hands
//! tungstenite what it asked for, and keeps only the rest, in an allocation
//! of exactly that size that is freed as soon as it has been handed over.
//! An idle peer holds no read buffer; a large message costs a few system
//! calls and memory copies instead of thousands of calls.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Size of each worker thread's read buffer: one `recv` takes up to this
/// much, which covers a default-sized (64 KiB) message in one or two calls.
const CHUNK: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
}

/// A peer's connection: plain TCP, or TLS over it.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
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

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
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

/// A connection (or, in tests, any stream) with read-ahead for callers that
/// read in small pieces.
pub struct Socket<S = Stream> {
    tcp: S,
    /// Bytes read from the kernel but not yet asked for; empty (and not
    /// allocated) whenever the caller has caught up.
    ahead: Box<[u8]>,
    /// How much of `ahead` has been handed out.
    taken: usize,
}

impl<S> Socket<S> {
    /// Wraps a stream; `early` is what was read before the wrapper existed
    /// (bytes a client sent right behind its handshake request).
    pub fn new(tcp: S, early: &[u8]) -> Socket<S> {
        Socket {
            tcp,
            ahead: early.into(),
            taken: 0,
        }
    }

    /// Hands out what was read ahead, as much as `buf` takes.
    fn take_ahead(&mut self, buf: &mut ReadBuf<'_>) {
        let rest = &self.ahead[self.taken..];
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.taken += n;
        if self.taken == self.ahead.len() {
            self.ahead = Box::default();
            self.taken = 0;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Socket<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ahead.is_empty() {
            this.take_ahead(buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= CHUNK {
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        }
        SCRATCH.with(|scratch| {
            // Not re-entered: nothing below calls back into a `Socket`.
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                return Pin::new(&mut this.tcp).poll_read(cx, buf);
            };
            let mut chunk = ReadBuf::new(&mut scratch[..]);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut chunk))?;
            let got = chunk.filled();
            let n = got.len().min(buf.remaining());
            buf.put_slice(&got[..n]);
            if n < got.len() {
                this.ahead = got[n..].into();
                this.taken = 0;
            }
            Poll::Ready(Ok(()))
        })
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Socket<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Small reads see every byte in order, the early bytes first, and the
    /// read-ahead is released once it has been handed out.
    /// Counts the reads that reach the stream below.
    struct Counted<S> {
        inner: S,
        reads: usize,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            if buf.filled().len() > before {
                this.reads += 1;
            }
            Poll::Ready(Ok(()))
        }
    }

    /// What tungstenite does with a 60 KB message: 14-byte reads. They must
    /// come from a handful of large reads of the socket, not thousands.
    #[tokio::test]
    async fn a_large_message_read_in_small_pieces_takes_few_socket_reads() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let message = vec![9u8; 60 * 1024];
        client.write_all(&message).await.expect("write");
        let mut socket = Socket::new(
            Counted {
                inner: server,
                reads: 0,
            },
            &[],
        );
        let mut got = 0;
        let mut piece = [0u8; 14];
        while got < message.len() {
            got += socket.read(&mut piece).await.expect("read");
        }
        assert!(
            socket.tcp.reads <= 2,
            "{} socket reads for one 60 KB message",
            socket.tcp.reads
        );
        assert!(socket.ahead.is_empty());
    }

    #[tokio::test]
    async fn small_reads_get_every_byte_and_nothing_is_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.expect("connect");
            tcp.write_all(&sent).await.expect("write");
        });
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut socket = Socket::new(tcp, b"early");
        let mut got = Vec::new();
        let mut piece = [0u8; 14];
        loop {
            let n = socket.read(&mut piece).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&piece[..n]);
        }
        assert_eq!(&got[..5], b"early");
        assert!(got[5..] == data[..], "bytes lost or reordered");
        assert!(socket.ahead.is_empty());
        writer.await.expect("writer");
    }
}

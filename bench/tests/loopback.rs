//! End-to-end runs of the tool against small servers written here with
//! tokio-tungstenite: a broadcast server with one room and no subprotocol,
//! and a rooms server that speaks `hubbub.v1` to clients that ask for it
//! (hello, history, presence, offsets) and can drop, repeat or reorder what
//! it sends. Exact counts, no timing assumptions beyond "a second is plenty
//! on loopback".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use hubbub_bench::conn::Protocol;
use hubbub_bench::run::{self, Common, FanoutCfg, FloodCfg, IdleCfg, SaturateCfg};

#[derive(Clone, Copy, Default)]
struct ServerOpts {
    /// Forward to each connection only the data messages whose per-connection
    /// index i has i % drop_every != drop_every - 1 (0 = forward all).
    drop_every: u64,
    /// A rate limit of sorts: relay only the first `relay_first` data
    /// messages of each connection (0 = all), and close it with 1008 once it
    /// has sent `close_after_refused` more.
    relay_first: u64,
    close_after_refused: u64,
    /// Speak TLS (wss://) with a certificate made for the test.
    tls: bool,
}

/// What a connection runs over: TCP, or TLS over TCP.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A TLS acceptor with a self-signed certificate for 127.0.0.1.
fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![made.cert.der().clone()], key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

struct TestServer {
    addr: SocketAddr,
    pongs: Arc<AtomicU64>,
    /// WebSocket connections accepted.
    accepted: Arc<AtomicU64>,
    /// Data messages received from clients.
    taken: Arc<AtomicU64>,
}

/// A broadcast server: every text/binary message goes to every connection,
/// the sender included, in one global order. Each connection is greeted
/// with a text message and a ping right after the handshake.
async fn start_server(opts: ServerOpts) -> TestServer {
    let (tx, _) = broadcast::channel::<Message>(1 << 16);
    start_server_sharing(opts, tx).await
}

/// A node of a cluster of test servers: every server started with the same
/// `tx` relays what any of them takes to all their connections.
async fn start_server_sharing(opts: ServerOpts, tx: broadcast::Sender<Message>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pongs = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let taken_total = Arc::new(AtomicU64::new(0));
    let p = pongs.clone();
    let (acc, tt) = (accepted.clone(), taken_total.clone());
    let acceptor = opts.tls.then(tls_acceptor);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            let pongs = p.clone();
            let (accepted, taken_total) = (acc.clone(), tt.clone());
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut rx = tx.subscribe();
                let stream: Box<dyn Io> = match acceptor {
                    None => Box::new(stream),
                    Some(a) => match a.accept(stream).await {
                        Ok(tls) => Box::new(tls),
                        Err(_) => return,
                    },
                };
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let (mut sink, mut stream) = ws.split();
                // Greet at once: this lands right behind the 101 response.
                if sink
                    .send(Message::text("hello from the test server"))
                    .await
                    .is_err()
                    || sink
                        .send(Message::Ping(b"are you there".to_vec().into()))
                        .await
                        .is_err()
                {
                    return;
                }
                let mut index = 0u64;
                let mut taken = 0u64;
                loop {
                    tokio::select! {
                        m = stream.next() => match m {
                            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                                taken += 1;
                                taken_total.fetch_add(1, Ordering::Relaxed);
                                if opts.relay_first == 0 || taken <= opts.relay_first {
                                    let _ = tx.send(m);
                                } else if taken - opts.relay_first > opts.close_after_refused {
                                    let close = CloseFrame { code: CloseCode::Policy, reason: "rate limit exceeded".into() };
                                    let _ = sink.send(Message::Close(Some(close))).await;
                                    // Read on until the client's close (or EOF), as a real
                                    // server's closing handshake does: closing a socket
                                    // with unread data resets it, and the reset would
                                    // discard the close frame on its way.
                                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                                        while let Some(Ok(m)) = stream.next().await {
                                            if m.is_close() { break; }
                                        }
                                    }).await;
                                    return;
                                }
                            }
                            Some(Ok(Message::Pong(p))) => {
                                assert_eq!(&p[..], b"are you there");
                                pongs.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => return,
                        },
                        r = rx.recv() => match r {
                            Ok(m) => {
                                index += 1;
                                if opts.drop_every > 0 && index.is_multiple_of(opts.drop_every) {
                                    continue;
                                }
                                if sink.send(m).await.is_err() { return; }
                            }
                            Err(broadcast::error::RecvError::Lagged(n)) => panic!("test server lagged by {n}"),
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                    }
                }
            });
        }
    });
    TestServer {
        addr,
        pongs,
        accepted,
        taken: taken_total,
    }
}

fn common(addr: SocketAddr) -> Common {
    let mut c = Common::new(&format!("ws://{addr}/"));
    c.batch = 4; // several ramp steps
    c.read_buf = 256; // small, so frames straddle reads
    c
}

fn fanout_cfg(clients: usize, senders: usize, messages: u64) -> FanoutCfg {
    FanoutCfg {
        clients,
        senders,
        rate: 100.0,
        size: 64,
        duration: Duration::from_secs(10), // the message limit ends it sooner
        messages: Some(messages),
        slow: 0,
        slow_recv_buffer: None,
        drain: Duration::from_secs(5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_everything_exactly_once() {
    let srv = start_server(ServerOpts::default()).await;
    let cfg = FanoutCfg {
        size: 200,
        ..fanout_cfg(6, 3, 25)
    };
    let r = run::fanout(&common(srv.addr), &cfg).await.unwrap();
    assert_eq!(r.connected, 6);
    assert_eq!(r.sent, Some(75));
    assert_eq!(r.readers, Some(6));
    assert_eq!(r.expected, Some(75 * 6));
    assert_eq!(r.received, Some(75 * 6));
    assert_eq!(r.delivery_ratio, Some(1.0));
    assert_eq!(r.lost, Some(0));
    assert_eq!(r.reordered, Some(0));
    assert_eq!(r.duplicates, Some(0));
    // The greeting each client got right behind the handshake response was
    // read by the tool's own decoder, not swallowed by tungstenite.
    assert_eq!(r.foreign, Some(6));
    assert_eq!(r.latency.unwrap().count, 75 * 6);
    assert_eq!(r.closed_by_server, Some(0));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // Every client answered the server's ping.
    assert_eq!(srv.pongs.load(Ordering::Relaxed), 6);
    // The JSON line carries the same numbers.
    let back: hubbub_bench::report::Report = serde_json::from_str(&r.to_json_line()).unwrap();
    assert_eq!(back.received, Some(450));
}

/// The same over wss://: the tool's TLS client, the handshake head read
/// without swallowing the greeting behind it, exact counts, pings answered.
/// Two test servers sharing one broadcast channel: a two-node cluster.
async fn two_nodes() -> (TestServer, TestServer, Common) {
    let (tx, _) = broadcast::channel::<Message>(1 << 16);
    let a = start_server_sharing(ServerOpts::default(), tx.clone()).await;
    let b = start_server_sharing(ServerOpts::default(), tx).await;
    let mut c = Common::with_urls(&[&format!("ws://{}/", a.addr), &format!("ws://{}/", b.addr)]);
    c.batch = 4;
    c.read_buf = 256;
    (a, b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_and_saturate_spread_over_two_urls() {
    let (a, b, c) = two_nodes().await;
    assert_eq!(c.url_label(), format!("ws://{}/,ws://{}/", a.addr, b.addr));
    // 7 clients, 3 senders: clients 0, 2, 4, 6 on the first URL (senders 0
    // and 2), 1, 3, 5 on the second (sender 1).
    let r = run::fanout(&c, &fanout_cfg(7, 3, 20)).await.unwrap();
    assert_eq!(a.accepted.load(Ordering::Relaxed), 4);
    assert_eq!(b.accepted.load(Ordering::Relaxed), 3);
    assert_eq!(a.taken.load(Ordering::Relaxed), 2 * 20);
    assert_eq!(b.taken.load(Ordering::Relaxed), 20);
    assert_eq!(r.url, c.url_label());
    assert_eq!(r.connected, 7);
    assert_eq!(r.sent, Some(60));
    assert_eq!(r.received, Some(60 * 7));
    assert_eq!(r.delivery_ratio, Some(1.0));
    assert_eq!(r.lost, Some(0));
    assert_eq!(r.duplicates, Some(0));

    // saturate: 6 clients, 2 senders, one sender and two readers per node.
    let (a, b, c) = two_nodes().await;
    let cfg = SaturateCfg {
        clients: 6,
        senders: 2,
        size: 64,
        window: 4,
        max_lag: 200,
        warmup: Duration::from_millis(100),
        duration: Duration::from_millis(300),
        drain: Duration::from_secs(5),
    };
    let r = run::saturate(&c, &cfg).await.unwrap();
    assert_eq!(a.accepted.load(Ordering::Relaxed), 3);
    assert_eq!(b.accepted.load(Ordering::Relaxed), 3);
    let sent = r.sent.unwrap();
    assert!(sent > 0);
    assert!(a.taken.load(Ordering::Relaxed) > 0);
    assert!(b.taken.load(Ordering::Relaxed) > 0);
    assert_eq!(
        a.taken.load(Ordering::Relaxed) + b.taken.load(Ordering::Relaxed),
        sent
    );
    assert_eq!(r.received, Some(sent * 6));
    assert_eq!(r.lost, Some(0));
}

#[tokio::test]
async fn rooms_spread_their_members_over_the_urls() {
    let c = Common::with_urls(&["ws://127.0.0.1:1/", "ws://127.0.0.1:2/"]);
    assert_eq!(
        (0..6).map(|i| c.url_index(i)).collect::<Vec<_>>(),
        [0, 1, 0, 1, 0, 1]
    );
    let mut c = c;
    c.rooms = Some(3);
    // Clients 0..3 are the first members of rooms 0..3, 3..6 the second.
    assert_eq!(
        (0..12).map(|i| c.url_index(i)).collect::<Vec<_>>(),
        [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    );
    assert_eq!(Common::new("ws://127.0.0.1:1/").url_index(5), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_and_saturate_over_wss() {
    let srv = start_server(ServerOpts {
        tls: true,
        ..ServerOpts::default()
    })
    .await;
    let mut c = common(srv.addr);
    c.urls = vec![format!("wss://{}/", srv.addr)];
    let r = run::fanout(&c, &fanout_cfg(4, 2, 30)).await.unwrap();
    assert_eq!(r.url, format!("wss://{}/", srv.addr));
    assert_eq!(r.connected, 4);
    assert_eq!(r.sent, Some(60));
    assert_eq!(r.received, Some(60 * 4));
    assert_eq!(r.delivery_ratio, Some(1.0));
    assert_eq!(
        (r.lost, r.reordered, r.duplicates),
        (Some(0), Some(0), Some(0))
    );
    assert_eq!(r.foreign, Some(4), "the greeting, once per client");
    assert_eq!(srv.pongs.load(Ordering::Relaxed), 4);
    let cfg = SaturateCfg {
        clients: 4,
        senders: 2,
        size: 64,
        window: 8,
        max_lag: 200,
        warmup: Duration::from_millis(100),
        duration: Duration::from_millis(300),
        drain: Duration::from_secs(5),
    };
    let r = run::saturate(&c, &cfg).await.unwrap();
    let sent = r.sent.unwrap();
    assert!(sent > 0);
    assert_eq!(r.received, Some(sent * 4));
    assert_eq!(r.lost, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_counts_exactly_what_a_lossy_server_drops() {
    // The server drops every 7th message it forwards to each connection.
    let srv = start_server(ServerOpts {
        drop_every: 7,
        ..ServerOpts::default()
    })
    .await;
    let r = run::fanout(&common(srv.addr), &fanout_cfg(4, 2, 21))
        .await
        .unwrap();
    // Each connection is offered 42 messages and loses 6 (indices 7, 14, ... 42).
    assert_eq!(r.sent, Some(42));
    assert_eq!(r.lost, Some(4 * 6));
    assert_eq!(r.received, Some(4 * 36));
    assert_eq!(r.delivery_ratio, Some(144.0 / 168.0));
    assert_eq!(r.reordered, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_not_counted_as_readers() {
    let srv = start_server(ServerOpts::default()).await;
    let cfg = FanoutCfg {
        slow: 2,
        ..fanout_cfg(7, 2, 10)
    };
    let r = run::fanout(&common(srv.addr), &cfg).await.unwrap();
    assert_eq!(r.readers, Some(5));
    assert_eq!(r.expected, Some(20 * 5));
    assert_eq!(r.received, Some(20 * 5));
    assert_eq!(r.lost, Some(0));
    assert_eq!(r.slow_closed_by_server, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturate_keeps_counts_consistent() {
    let srv = start_server(ServerOpts::default()).await;
    let cfg = SaturateCfg {
        clients: 4,
        senders: 2,
        size: 64,
        window: 4,
        max_lag: 6,
        warmup: Duration::from_millis(100),
        duration: Duration::from_millis(500),
        drain: Duration::from_secs(5),
    };
    let r = run::saturate(&common(srv.addr), &cfg).await.unwrap();
    let sent = r.sent.unwrap();
    assert!(sent > 0);
    assert_eq!(r.received, Some(sent * 4));
    assert_eq!(r.lost, Some(0));
    assert!(r.deliveries_per_sec.unwrap() > 0.0);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturate_with_60k_messages_reports_mb_in_and_server_cpu() {
    // compare.sh's large-60k shape: one sender, four more readers, 61,440 B.
    let srv = start_server(ServerOpts::default()).await;
    let mut c = common(srv.addr);
    c.server_pid = Some(std::process::id()); // the server runs in this process
    let size = 61_440;
    let cfg = SaturateCfg {
        clients: 5,
        senders: 1,
        size,
        window: 16,
        max_lag: 200,
        warmup: Duration::from_millis(200),
        duration: Duration::from_millis(700),
        drain: Duration::from_secs(5),
    };
    let r = run::saturate(&c, &cfg).await.unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let sent = r.sent.unwrap();
    assert!(sent > 0);
    assert_eq!(r.readers, Some(5));
    assert_eq!(r.received, Some(sent * 5));
    assert_eq!(r.lost, Some(0));
    assert_eq!(r.duplicates, Some(0));
    assert_eq!(r.closed_by_server, Some(0));
    // Only the greeting is foreign: every 60 KB message decoded as ours.
    assert_eq!(r.foreign, Some(5));
    let mb = r.mb_in_per_sec.unwrap();
    assert!(mb > 0.0, "MB/s in: {mb}");
    // MB/s x seconds is a whole number of 61,440-byte messages (10^6 B per MB).
    let msgs = mb * 1e6 * r.measured_secs / size as f64;
    assert!(msgs >= 1.0 && (msgs - msgs.round()).abs() < 1e-6, "{msgs}");
    assert!(msgs.round() as u64 <= sent);
    let cpu = r.server_cpu_secs.expect("server CPU seconds");
    assert!(cpu >= 0.0 && cpu <= 2.5 * r.measured_secs, "{cpu}");
    let t = r.to_table();
    assert!(
        t.contains("MB/s in (10^6 B/s)") && t.contains("CPU s"),
        "{t}"
    );
    let back: hubbub_bench::report::Report = serde_json::from_str(&r.to_json_line()).unwrap();
    // The JSON carries the figures as printed (rounded), not bit for bit.
    let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() <= 0.01 * b.max(1.0));
    assert!(
        close(back.mb_in_per_sec, mb),
        "{:?} vs {mb}",
        back.mb_in_per_sec
    );
    assert!(
        close(back.server_cpu_secs, cpu),
        "{:?} vs {cpu}",
        back.server_cpu_secs
    );
}

/// A server that relays 50 of the flooder's messages and closes it with
/// 1008 after 20 more: the report says exactly that, and that every paced
/// reader got all 50 and stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_reports_what_was_relayed_and_who_was_closed() {
    let srv = start_server(ServerOpts {
        relay_first: 50,
        close_after_refused: 20,
        ..ServerOpts::default()
    })
    .await;
    let cfg = FloodCfg {
        readers: 5,
        size: 64,
        // 256-byte reads hold at most 3 messages: 50 at 200/s take 0.2 s.
        read_rate: 200.0,
        duration: Duration::from_secs(10),
        drain: Duration::from_secs(10),
    };
    let started = std::time::Instant::now();
    let r = run::flood(&common(srv.addr), &cfg).await.unwrap();
    assert_eq!(r.mode, "flood");
    assert_eq!(r.connected, 6);
    assert_eq!(r.readers, Some(5));
    assert!(r.sent.unwrap() >= 70, "{:?}", r.sent);
    assert_eq!(r.relayed, Some(50));
    assert_eq!(r.flooder_closed.as_deref(), Some("1008"));
    assert_eq!(r.expected, Some(250));
    assert_eq!(r.received, Some(250));
    assert_eq!(r.delivery_ratio, Some(1.0));
    assert_eq!(r.reader_ratio_min, Some(1.0));
    assert_eq!(r.readers_complete, Some(5));
    assert_eq!(r.closed_by_server, Some(0));
    assert!(r.close_codes.is_empty(), "{:?}", r.close_codes);
    assert_eq!((r.reordered, r.duplicates), (Some(0), Some(0)));
    // The greeting is not the run's: foreign, one per reader.
    assert_eq!(r.foreign, Some(5));
    // The readers kept their pace (a lower bound only: a slow machine
    // takes longer, never less).
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    let table = r.to_table();
    assert!(table.contains("yes, code 1008"), "{table}");
    assert!(
        table.contains("5 of 5 (lowest delivery ratio 1.000000)"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_holds_connections_and_reads_rss() {
    let srv = start_server(ServerOpts::default()).await;
    let mut c = common(srv.addr);
    c.server_pid = Some(std::process::id()); // the server runs in this process
    c.source_ips = 3; // exercise binding to 127.0.0.2 and 127.0.0.3
    let r = run::idle(
        &c,
        &IdleCfg {
            clients: 30,
            hold: Duration::from_millis(300),
        },
    )
    .await
    .unwrap();
    assert_eq!(r.connected, 30);
    assert_eq!(r.still_open, Some(30));
    assert_eq!(r.closed_by_server, Some(0));
    assert!(r.rss_per_conn_bytes.is_some());
    assert!(r.server_rss_kib_before.unwrap() > 0);
    // Each idle connection answered the greeting ping.
    assert_eq!(srv.pongs.load(Ordering::Relaxed), 30);
}

#[tokio::test]
async fn refuses_a_bad_url_and_a_closed_port() {
    let err = run::fanout(&Common::new("http://127.0.0.1:1/"), &fanout_cfg(2, 1, 1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ws://"), "{err}");
    // Port 1 on loopback: nothing listens there.
    let err = run::fanout(&Common::new("ws://127.0.0.1:1/"), &fanout_cfg(2, 1, 1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("connections failed"), "{err}");
}

// ---------------------------------------------------------------------------
// Rooms and hubbub.v1
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Default)]
struct RoomsOpts {
    /// Messages already in each room when it is created (replayed to every
    /// hubbub.v1 client on join, as hubbub's history is).
    history: u64,
    /// Per connection, of the live messages numbered from 1: drop those
    /// whose number is a multiple of this (0: none) ...
    drop_every: u64,
    /// ... send those twice ...
    dup_every: u64,
    /// ... or hold those back and send them after the next one.
    swap_every: u64,
    /// Write envelopes the unusual but valid way: every character of the
    /// data as a \u escape, members in another order, unknown fields.
    odd_json: bool,
}

/// One room: its latest offset and history, and the live stream.
struct Room {
    state: Mutex<RoomState>,
    tx: broadcast::Sender<(u64, String)>,
}

struct RoomState {
    latest: u64,
    history: Vec<(u64, String)>,
    online: u64,
}

struct RoomsServer {
    addr: SocketAddr,
    /// (path, asked for hubbub.v1) of every accepted connection.
    joins: Arc<Mutex<Vec<(String, bool)>>>,
}

fn json_str(s: &str, odd: bool) -> String {
    if odd {
        let mut out = String::from("\"");
        for c in s.chars() {
            let mut b = [0u16; 2];
            for u in c.encode_utf16(&mut b) {
                out.push_str(&format!("\\u{u:04X}"));
            }
        }
        out.push('"');
        out
    } else {
        serde_json::to_string(s).unwrap()
    }
}

fn message_envelope(offset: u64, text: &str, odd: bool) -> String {
    let ts = 1_764_525_600_123u64;
    if odd {
        format!(
            r#"{{ "ts" : {ts}, "data" : {}, "x":{{"y":[1,"}}\"",{{}}]}}, "offset":{offset},"type":"message" }}"#,
            json_str(text, true)
        )
    } else {
        format!(
            r#"{{"type":"message","offset":{offset},"ts":{ts},"data":{}}}"#,
            json_str(text, false)
        )
    }
}

/// The room a path names: `/` is `lobby`, `/rooms/<name>` is `<name>`.
fn room_of_path(path: &str) -> Option<String> {
    match path {
        "/" => Some("lobby".into()),
        p => p
            .strip_prefix("/rooms/")
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .map(str::to_string),
    }
}

async fn start_rooms_server(opts: RoomsOpts) -> RoomsServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rooms: Arc<Mutex<HashMap<String, Arc<Room>>>> = Arc::default();
    let joins: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let j = joins.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let rooms = rooms.clone();
            let joins = j.clone();
            tokio::spawn(async move {
                let seen: Arc<Mutex<Option<(String, bool)>>> = Arc::default();
                let s2 = seen.clone();
                // tungstenite's callback type fixes the (large) error type.
                #[allow(clippy::result_large_err)]
                let callback = move |req: &Request, mut resp: Response| {
                    let path = req.uri().path().to_string();
                    if room_of_path(&path).is_none() {
                        let mut e = ErrorResponse::new(Some("no such path".into()));
                        *e.status_mut() = StatusCode::NOT_FOUND;
                        return Err(e);
                    }
                    let v1 = req
                        .headers()
                        .get_all("Sec-WebSocket-Protocol")
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .flat_map(|v| v.split(','))
                        .any(|p| p.trim() == "hubbub.v1");
                    if v1 {
                        resp.headers_mut().insert(
                            "Sec-WebSocket-Protocol",
                            HeaderValue::from_static("hubbub.v1"),
                        );
                    }
                    *s2.lock().unwrap() = Some((path, v1));
                    Ok(resp)
                };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                let (path, v1) = seen.lock().unwrap().clone().unwrap();
                joins.lock().unwrap().push((path.clone(), v1));
                let name = room_of_path(&path).unwrap();
                let room = rooms
                    .lock()
                    .unwrap()
                    .entry(name.clone())
                    .or_insert_with(|| {
                        let history: Vec<(u64, String)> = (1..=opts.history)
                            .map(|o| (o, format!("old chat {o} in {name}")))
                            .collect();
                        Arc::new(Room {
                            state: Mutex::new(RoomState {
                                latest: opts.history,
                                history,
                                online: 0,
                            }),
                            tx: broadcast::channel(1 << 16).0,
                        })
                    })
                    .clone();
                // Join: subscribe and snapshot under the lock, so the live
                // stream starts right after `latest`.
                let (mut rx, latest, history, online) = {
                    let mut st = room.state.lock().unwrap();
                    st.online += 1;
                    (
                        room.tx.subscribe(),
                        st.latest,
                        st.history.clone(),
                        st.online,
                    )
                };
                let (mut sink, mut stream) = ws.split();
                if v1 {
                    let mut first = vec![format!(
                        r#"{{"type":"hello","room":{},"epoch":"e1","offset":{latest},"online":{online},"max_message_bytes":65536}}"#,
                        json_str(&name, false)
                    )];
                    first.extend(
                        history
                            .iter()
                            .map(|(o, t)| message_envelope(*o, t, opts.odd_json)),
                    );
                    first.push(format!(r#"{{"type":"presence","online":{online}}}"#));
                    first.push(r#"{"type":"typing","who":{"name":"x","offset":"7"}}"#.into());
                    for m in first {
                        if sink.send(Message::text(m)).await.is_err() {
                            return;
                        }
                    }
                }
                let mut index = 0u64;
                let mut held: Option<Message> = None;
                loop {
                    tokio::select! {
                        m = stream.next() => match m {
                            Some(Ok(Message::Text(t))) => {
                                let mut st = room.state.lock().unwrap();
                                st.latest += 1;
                                let o = st.latest;
                                st.history.push((o, t.to_string()));
                                let _ = room.tx.send((o, t.to_string()));
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => break,
                        },
                        r = rx.recv() => match r {
                            Ok((offset, text)) => {
                                index += 1;
                                if opts.drop_every > 0 && index.is_multiple_of(opts.drop_every) {
                                    continue;
                                }
                                let m = Message::text(if v1 {
                                    message_envelope(offset, &text, opts.odd_json)
                                } else {
                                    text
                                });
                                if opts.swap_every > 0 && index.is_multiple_of(opts.swap_every) {
                                    held = Some(m);
                                    continue;
                                }
                                let times = if opts.dup_every > 0 && index.is_multiple_of(opts.dup_every) { 2 } else { 1 };
                                for _ in 0..times {
                                    if sink.send(m.clone()).await.is_err() { return; }
                                }
                                if let Some(h) = held.take() {
                                    if sink.send(h).await.is_err() { return; }
                                }
                            }
                            Err(e) => panic!("rooms server: {e}"),
                        },
                    }
                }
                room.state.lock().unwrap().online -= 1;
            });
        }
    });
    RoomsServer { addr, joins }
}

fn v1_common(addr: SocketAddr, rooms: Option<usize>) -> Common {
    let mut c = common(addr);
    c.protocol = Protocol::HubbubV1;
    c.rooms = rooms;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_over_rooms_counts_per_room_and_skips_hello_history_presence() {
    for odd_json in [false, true] {
        let srv = start_rooms_server(RoomsOpts {
            history: 4,
            odd_json,
            ..RoomsOpts::default()
        })
        .await;
        // 7 clients over 3 rooms: room 0 has clients 0, 3, 6 and sender 0;
        // room 1 has 1, 4 and sender 1; room 2 has 2, 5 and no sender.
        let cfg = fanout_cfg(7, 2, 15);
        let r = run::fanout(&v1_common(srv.addr, Some(3)), &cfg)
            .await
            .unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.protocol.as_deref(), Some("hubbub.v1"));
        assert_eq!((r.rooms, r.room_paths), (Some(3), true));
        assert_eq!(r.sent, Some(30));
        assert_eq!(r.readers, Some(7));
        assert_eq!(r.expected, Some(15 * 3 + 15 * 2));
        assert_eq!(r.received, Some(75));
        assert_eq!(r.delivery_ratio, Some(1.0));
        assert_eq!(r.lost, Some(0));
        assert_eq!(r.reordered, Some(0));
        assert_eq!(r.duplicates, Some(0));
        assert_eq!(r.misrouted, Some(0));
        // hello, presence and the unknown envelope are skipped; each
        // client's 4 history messages are replayed and skipped.
        assert_eq!(r.foreign, Some(0), "odd_json {odd_json}");
        assert_eq!(r.replayed, Some(7 * 4));
        assert_eq!(r.latency.unwrap().count, 75);
        let mut joins = srv.joins.lock().unwrap().clone();
        joins.sort();
        let want: Vec<(String, bool)> = [0, 0, 0, 1, 1, 2, 2]
            .iter()
            .map(|k| (format!("/rooms/bench-{k}"), true))
            .collect();
        assert_eq!(joins, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_counts_exactly_what_the_server_drops() {
    // No --rooms: everyone in the URL's room (the lobby).
    let srv = start_rooms_server(RoomsOpts {
        drop_every: 5,
        ..RoomsOpts::default()
    })
    .await;
    let cfg = FanoutCfg {
        drain: Duration::from_millis(500),
        ..fanout_cfg(4, 2, 21)
    };
    let r = run::fanout(&v1_common(srv.addr, None), &cfg).await.unwrap();
    // Each connection is offered the room's 42 messages and drops numbers
    // 5, 10, ..., 40: 8 offsets missing between ones that arrived.
    assert_eq!(r.sent, Some(42));
    assert_eq!((r.rooms, r.room_paths), (Some(1), false));
    assert_eq!(r.received, Some(4 * 34));
    assert_eq!(r.lost, Some(4 * 8));
    assert_eq!(r.lost_gaps, Some(4 * 8));
    assert_eq!(r.lost_tail, Some(0));
    assert_eq!(r.reordered, Some(0));
    assert_eq!(r.duplicates, Some(0));
    assert_eq!(r.foreign, Some(0));
    assert!(srv
        .joins
        .lock()
        .unwrap()
        .iter()
        .all(|(p, v1)| p == "/" && *v1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_counts_duplicates_and_reordering_on_offsets() {
    let srv = start_rooms_server(RoomsOpts {
        dup_every: 4,
        ..RoomsOpts::default()
    })
    .await;
    let r = run::fanout(&v1_common(srv.addr, Some(2)), &fanout_cfg(4, 2, 21))
        .await
        .unwrap();
    // Two rooms of 2 readers, 21 messages each; numbers 4, 8, ..., 20 twice.
    assert_eq!(r.expected, Some(2 * 21 * 2));
    assert_eq!(r.received, Some(84));
    assert_eq!(r.duplicates, Some(4 * 5));
    assert_eq!((r.lost, r.reordered), (Some(0), Some(0)));
    assert_eq!(r.latency.unwrap().count, 84, "duplicates are not sampled");

    let srv = start_rooms_server(RoomsOpts {
        swap_every: 4,
        ..RoomsOpts::default()
    })
    .await;
    let r = run::fanout(&v1_common(srv.addr, Some(2)), &fanout_cfg(4, 2, 21))
        .await
        .unwrap();
    // Numbers 4, 8, ..., 20 arrive after the next one.
    assert_eq!(r.received, Some(84));
    assert_eq!(r.reordered, Some(4 * 5));
    assert_eq!((r.lost, r.duplicates), (Some(0), Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_clients_in_rooms() {
    let srv = start_rooms_server(RoomsOpts {
        history: 3, // not sent to raw clients
        ..RoomsOpts::default()
    })
    .await;
    let mut c = common(srv.addr);
    c.rooms = Some(3);
    let r = run::fanout(&c, &fanout_cfg(9, 3, 10)).await.unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.protocol.as_deref(), Some("raw"));
    assert_eq!(r.expected, Some(3 * 10 * 3));
    assert_eq!(r.received, Some(90));
    assert_eq!(
        (r.lost, r.misrouted, r.foreign),
        (Some(0), Some(0), Some(0))
    );
    assert_eq!(r.replayed, Some(0));
    let joins = srv.joins.lock().unwrap().clone();
    assert_eq!(joins.len(), 9);
    assert!(joins
        .iter()
        .all(|(p, v1)| p.starts_with("/rooms/bench-") && !v1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_against_a_server_without_rooms_are_misrouted() {
    // The broadcast server ignores the path: everyone gets everything.
    let srv = start_server(ServerOpts::default()).await;
    let mut c = common(srv.addr);
    c.rooms = Some(2);
    let r = run::fanout(&c, &fanout_cfg(4, 2, 10)).await.unwrap();
    // Rooms 0 and 1 have 2 readers and 1 sender each.
    assert_eq!(r.expected, Some(2 * 10 * 2));
    assert_eq!(r.received, Some(40));
    assert_eq!(r.lost, Some(0));
    assert_eq!(
        r.misrouted,
        Some(40),
        "the other room's 10, at each of 4 readers"
    );
    assert_eq!(r.foreign, Some(4)); // the greetings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_fails_clearly_when_the_server_does_not_speak_it() {
    let srv = start_server(ServerOpts::default()).await;
    let err = run::fanout(&v1_common(srv.addr, None), &fanout_cfg(2, 1, 1))
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("did not accept subprotocol hubbub.v1"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturate_v1_over_rooms() {
    let srv = start_rooms_server(RoomsOpts {
        history: 2,
        ..RoomsOpts::default()
    })
    .await;
    let cfg = SaturateCfg {
        clients: 6,
        senders: 3,
        size: 64,
        window: 4,
        max_lag: 6,
        warmup: Duration::from_millis(100),
        duration: Duration::from_millis(500),
        drain: Duration::from_secs(5),
    };
    let r = run::saturate(&v1_common(srv.addr, Some(3)), &cfg)
        .await
        .unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let sent = r.sent.unwrap();
    assert!(sent > 0);
    // Three rooms of two readers: every message reaches 2.
    assert_eq!(r.expected, Some(sent * 2));
    assert_eq!(r.received, Some(sent * 2));
    assert_eq!(
        (r.lost, r.duplicates, r.reordered),
        (Some(0), Some(0), Some(0))
    );
    assert_eq!(
        (r.foreign, r.misrouted, r.replayed),
        (Some(0), Some(0), Some(6 * 2))
    );
    assert!(r.deliveries_per_sec.unwrap() > 0.0);
    assert!(r.mb_in_per_sec.unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_v1_reads_hello_and_history() {
    let srv = start_rooms_server(RoomsOpts {
        history: 2,
        ..RoomsOpts::default()
    })
    .await;
    let r = run::idle(
        &v1_common(srv.addr, Some(2)),
        &IdleCfg {
            clients: 6,
            hold: Duration::from_millis(300),
        },
    )
    .await
    .unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.connected, r.still_open), (6, Some(6)));
    assert_eq!(r.foreign, Some(0));
    assert_eq!(r.replayed, Some(6 * 2), "history on join, skipped");
    assert_eq!(r.protocol.as_deref(), Some("hubbub.v1"));
    assert_eq!(srv.joins.lock().unwrap().len(), 6);
}

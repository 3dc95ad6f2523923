//! End-to-end runs of the tool against a small broadcast server written
//! here with tokio-tungstenite: exact counts, no timing assumptions beyond
//! "a second is plenty on loopback".

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;

use hubbub_bench::run::{self, Common, FanoutCfg, IdleCfg, SaturateCfg};

#[derive(Clone, Copy, Default)]
struct ServerOpts {
    /// Forward to each connection only the data messages whose per-connection
    /// index i has i % drop_every != drop_every - 1 (0 = forward all).
    drop_every: u64,
}

struct TestServer {
    addr: SocketAddr,
    pongs: Arc<AtomicU64>,
}

/// A broadcast server: every text/binary message goes to every connection,
/// the sender included, in one global order. Each connection is greeted
/// with a text message and a ping right after the handshake.
async fn start_server(opts: ServerOpts) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, _) = broadcast::channel::<Message>(1 << 16);
    let pongs = Arc::new(AtomicU64::new(0));
    let p = pongs.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            let pongs = p.clone();
            tokio::spawn(async move {
                let mut rx = tx.subscribe();
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
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
                loop {
                    tokio::select! {
                        m = stream.next() => match m {
                            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => { let _ = tx.send(m); }
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
    TestServer { addr, pongs }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_counts_exactly_what_a_lossy_server_drops() {
    // The server drops every 7th message it forwards to each connection.
    let srv = start_server(ServerOpts { drop_every: 7 }).await;
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
    assert_eq!(back.mb_in_per_sec, Some(mb));
    assert_eq!(back.server_cpu_secs, Some(cpu));
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

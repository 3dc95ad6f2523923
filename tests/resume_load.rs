//! Resume under load: 100 `hubbub.v1` clients in one room, 5 of them
//! sending 200 messages a second in total, and every second one client
//! drops its connection without a close and resumes with `since`. Over 30
//! seconds every client must see offsets 1..N, contiguous, no duplicate,
//! and the same contents as every other client.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

const CLIENTS: usize = 100;
const SENDERS: usize = 5;
const RATE_PER_SENDER: u64 = 40; // 5 x 40 = 200 messages a second
const RUN: Duration = Duration::from_secs(30);

/// What one client saw, in order: (offset, data).
type Seen = Vec<(u64, String)>;

/// Drops the connection with a TCP reset: no close frame, no FIN.
// tokio deprecates SO_LINGER because a non-zero linger blocks in drop; a
// zero linger resets at once and never blocks.
#[allow(deprecated)]
fn cut(ws: Ws) {
    if let MaybeTlsStream::Plain(tcp) = ws.get_ref() {
        let _ = tcp.set_linger(Some(Duration::ZERO));
    }
    drop(ws);
}

async fn hello(ws: &mut Ws) -> Value {
    let hello = next_envelope(ws, false).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    hello
}

/// One client: reads everything, sends at `rate` messages a second if it is
/// a sender, reconnects with `since` whenever told to, and stops reading
/// once it has seen `until` (set when the senders are done).
async fn client(
    id: usize,
    server: Arc<TestServer>,
    rate: u64,
    mut cut_now: mpsc::Receiver<()>,
    mut sending: watch::Receiver<bool>,
    mut until: watch::Receiver<u64>,
) -> (Seen, u64) {
    let mut ws = connect_to(server.ws, "/rooms/load", true)
        .await
        .expect("connect");
    let first = hello(&mut ws).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_string();
    let mut seen: Seen = Vec::new();
    let mut sent = 0u64;
    let mut resumes = 0u64;
    let period = Duration::from_micros(1_000_000 / rate.max(1));
    let mut tick = tokio::time::interval(period);
    loop {
        let last = seen.last().map_or(0, |(o, _)| *o);
        let target = *until.borrow();
        if target > 0 && last >= target {
            return (seen, resumes);
        }
        tokio::select! {
            _ = tick.tick(), if rate > 0 && *sending.borrow() => {
                sent += 1;
                ws.send(Message::text(format!("c{id}-{sent}"))).await.expect("send");
            }
            Some(()) = cut_now.recv() => {
                cut(ws);
                let path = format!("/rooms/load?since={last}&epoch={epoch}");
                ws = connect_to(server.ws, &path, true).await.expect("reconnect");
                let h = hello(&mut ws).await;
                assert_eq!(h["recovered"], true, "client {id} resuming from {last}: {h}");
                assert_eq!(h["epoch"], epoch.as_str());
                resumes += 1;
            }
            next = tokio::time::timeout(WAIT, ws.next()) => {
                let text = match next {
                    Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
                    Ok(Some(Ok(_))) => continue,
                    other => panic!("client {id}: connection failed: {other:?}"),
                };
                let m: Value = serde_json::from_str(&text).expect("JSON");
                if m["type"] != "message" {
                    continue;
                }
                let offset = m["offset"].as_u64().expect("offset");
                assert_eq!(offset, last + 1, "client {id}: gap or duplicate after {last}");
                seen.push((offset, m["data"].as_str().expect("data").to_string()));
            }
            _ = sending.changed() => {}
            _ = until.changed() => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_sees_every_offset_once_while_clients_keep_dropping() {
    // History for 25 s of traffic: a client the loaded test machine lets
    // fall a few seconds behind still resumes; what is tested is that a
    // resume is exact, not how far back history reaches.
    let server = Arc::new(
        TestServer::start(hubbub::Config {
            history_size: 5000,
            // All 100 clients come from 127.0.0.1, and a cut one reconnects
            // before the server has seen its old connection go.
            max_connections_per_ip: 1000,
            ..hubbub::Config::ephemeral()
        })
        .await,
    );
    let (sending_tx, sending) = watch::channel(true);
    let (until_tx, until) = watch::channel(0u64);
    let mut cutters = Vec::new();
    let mut tasks = Vec::new();
    for id in 0..CLIENTS {
        let (cut_tx, cut_rx) = mpsc::channel(1);
        cutters.push(cut_tx);
        let rate = if id < SENDERS { RATE_PER_SENDER } else { 0 };
        tasks.push(tokio::spawn(client(
            id,
            server.clone(),
            rate,
            cut_rx,
            sending.clone(),
            until.clone(),
        )));
    }
    server
        .wait_metric("hubbub_connections", CLIENTS as u64)
        .await;

    // Every second, one client (senders included, in turn) drops and resumes.
    let started = tokio::time::Instant::now();
    let mut next_cut = 0;
    while started.elapsed() < RUN {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = cutters[(next_cut * 7) % CLIENTS].try_send(());
        next_cut += 1;
    }
    let _ = sending_tx.send(false);
    // Let the last messages reach the room, then read the latest offset.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut probe = connect_to(server.ws, "/rooms/load", true)
        .await
        .expect("probe");
    let latest = hello(&mut probe).await["offset"].as_u64().expect("offset");
    assert!(latest > 5000, "only {latest} messages in {RUN:?}");
    let _ = until_tx.send(latest);

    let mut results = Vec::new();
    for task in tasks {
        let outcome = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("every client finishes")
            .expect("no client failed");
        results.push(outcome);
    }
    let (reference, _) = &results[0];
    let total_resumes: u64 = results.iter().map(|(_, r)| r).sum();
    assert!(total_resumes >= 25, "only {total_resumes} resumes happened");
    for (i, (seen, _)) in results.iter().enumerate() {
        assert_eq!(
            seen.len() as u64,
            latest,
            "client {i} saw {} of {latest}",
            seen.len()
        );
        assert!(
            seen.iter().zip(1..).all(|((o, _), want)| *o == want),
            "client {i}: offsets are not 1..{latest}"
        );
        assert!(
            seen == reference,
            "client {i} saw other contents than client 0"
        );
    }
    // Every message sent is there exactly once.
    let mut datas: Vec<&str> = reference.iter().map(|(_, d)| d.as_str()).collect();
    datas.sort_unstable();
    datas.dedup();
    assert_eq!(datas.len() as u64, latest, "a message appears twice");
}

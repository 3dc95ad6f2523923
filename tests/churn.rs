//! Churn soak: 20,000 connect / send / disconnect cycles while 500 peers
//! stay connected in five rooms. The staying peers must get every message of
//! their room, in one order for all of them; afterwards the connections,
//! rooms and file descriptors are back where they were.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hubbub::Config;
use tokio_tungstenite::tungstenite::Message;

const ROOMS: usize = 5;
const STAYING_PER_ROOM: usize = 100;
const CHURNERS: usize = 20;
const CYCLES_PER_CHURNER: usize = 1000;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_the_staying_peers_whole_and_the_server_as_it_was() {
    let server = Arc::new(
        TestServer::start(Config {
            // Every client here comes from 127.0.0.1.
            max_connections_per_ip: 100_000,
            max_connections: 100_000,
            // Rooms the churners create alone end soon after.
            history_ttl: Duration::from_millis(500),
            ..Config::ephemeral()
        })
        .await,
    );
    let mut readers = Vec::new();
    for room in 0..ROOMS {
        for _ in 0..STAYING_PER_ROOM {
            let ws = connect_to(server.ws, &format!("/rooms/stay-{room}"), false)
                .await
                .expect("staying peer");
            readers.push((room, ws));
        }
    }
    server
        .wait_metric("hubbub_connections", (ROOMS * STAYING_PER_ROOM) as u64)
        .await;
    let fds_before = open_fds();

    // Each churner: connect, send one message, wait for its own echo (so the
    // message is in the room's order), leave; every fifth cycle in a room of
    // its own, which is created and later ends.
    let mut churners = Vec::new();
    for c in 0..CHURNERS {
        let server = server.clone();
        churners.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..CYCLES_PER_CHURNER {
                let (path, room) = if i % 5 == 4 {
                    (format!("/rooms/alone-{c}-{i}"), None)
                } else {
                    let room = (c + i) % ROOMS;
                    (format!("/rooms/stay-{room}"), Some(room))
                };
                let mut ws = connect_to(server.ws, &path, false).await.expect("churner");
                let text = format!("c{c}-{i}");
                ws.send(Message::text(text.clone())).await.expect("send");
                loop {
                    match tokio::time::timeout(WAIT, ws.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => break,
                        Ok(Some(Ok(_))) => continue,
                        other => panic!("churner {c}: no echo of {text}: {other:?}"),
                    }
                }
                let _ = ws.close(None).await;
                if let Some(room) = room {
                    sent.push((room, text));
                }
            }
            sent
        }));
    }
    // The staying peers read all the while.
    let reading: Vec<_> = readers
        .into_iter()
        .map(|(room, mut ws)| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    match tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) => got.push(t.to_string()),
                        Ok(Some(Ok(_))) => {}
                        Err(_) => return (room, got, ws),
                        Ok(other) => panic!("a staying peer was dropped: {other:?}"),
                    }
                }
            })
        })
        .collect();
    let mut sent_to: Vec<HashSet<String>> = vec![HashSet::new(); ROOMS];
    for churner in churners {
        for (room, text) in churner.await.expect("churner finished") {
            sent_to[room].insert(text);
        }
    }
    let mut order: Vec<Option<Vec<String>>> = vec![None; ROOMS];
    let mut keep = Vec::new();
    for reader in reading {
        let (room, got, ws) = reader.await.expect("reader");
        let unique: HashSet<&String> = got.iter().collect();
        assert_eq!(unique.len(), got.len(), "room {room}: a message came twice");
        assert_eq!(
            got.iter().cloned().collect::<HashSet<_>>(),
            sent_to[room],
            "room {room}: a staying peer missed messages"
        );
        match &order[room] {
            None => order[room] = Some(got),
            Some(first) => assert!(first == &got, "room {room}: two peers saw different orders"),
        }
        keep.push(ws);
    }
    let total: usize = sent_to.iter().map(HashSet::len).sum();
    assert_eq!(total, CHURNERS * CYCLES_PER_CHURNER * 4 / 5);

    // Back where it was: the staying peers, their five rooms, the same
    // file descriptors (give or take a few the runtime keeps).
    server
        .wait_metric("hubbub_connections", (ROOMS * STAYING_PER_ROOM) as u64)
        .await;
    server.wait_metric("hubbub_rooms", ROOMS as u64).await;
    let fds_after = open_fds();
    assert!(
        fds_after <= fds_before + 8,
        "file descriptors: {fds_before} before, {fds_after} after"
    );
    drop(keep);
}

//! Several nodes, one chat: hubbub nodes sharing a real `redis-server`
//! (started by each test on its own port), with real WebSocket clients
//! spread over the nodes, through a Redis that is killed, restarted,
//! paused (`SIGSTOP`), flushed and written to by strangers.
//!
//! Needs `redis-server` and `redis-cli` (Debian: `apt-get install -y
//! redis-server redis-tools`); `.ci/run` installs them and runs these.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::redis::Redis;
use common::*;
use futures_util::SinkExt;
use hubbub::Config;
use serde_json::Value;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

fn node_config(redis: &Redis) -> Config {
    Config {
        redis_url: Some(redis.url()),
        rate_limit_per_sec: 0,
        max_connections_per_ip: 10_000,
        ..Config::ephemeral()
    }
}

/// A node's configuration with verified senders (`jwt_secret`, optional
/// tokens) and the HTTP API (`api_key`), each when given.
fn secured_config(redis: &Redis, jwt_secret: Option<&str>, api_key: Option<&str>) -> Config {
    let mut config = node_config(redis);
    if let Some(secret) = jwt_secret {
        config.auth_mode = hubbub::auth::Mode::Optional;
        config.jwt_secret = Some(hubbub::config::Secret(secret.into()));
    }
    config.api_key = api_key.map(|k| hubbub::config::Secret(k.into()));
    config
}

async fn node(redis: &Redis) -> TestServer {
    let server = TestServer::start(node_config(redis)).await;
    wait_ready(&server, true).await;
    server
}

/// Two nodes with the same configuration, both ready.
async fn two_nodes(config: Config) -> (TestServer, TestServer) {
    let a = TestServer::start(config.clone()).await;
    let b = TestServer::start(config).await;
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    (a, b)
}

async fn readyz(server: &TestServer) -> u16 {
    http_get(server.http, "/readyz").await.0
}

/// Waits until `/readyz` says ready (200) or not (503).
async fn wait_ready(server: &TestServer, ready: bool) {
    let want = if ready { 200 } else { 503 };
    let deadline = Instant::now() + WAIT;
    loop {
        let got = readyz(server).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz is {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn v1(addr: SocketAddr, path: &str) -> (Ws, Value) {
    let mut ws = connect_to(addr, path, true).await.expect("v1 connect");
    let hello = next_envelope(&mut ws, false).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    (ws, hello)
}

async fn raw(addr: SocketAddr, path: &str) -> Ws {
    connect_to(addr, path, false).await.expect("raw connect")
}

/// The next `n` messages of a raw client.
async fn raw_messages(ws: &mut Ws, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(next_text(ws).await);
    }
    out
}

/// The next `n` `message` envelopes of a v1 client, as (offset, data);
/// any `hello` in between (a new epoch) is returned as offset 0 with the
/// epoch as data.
async fn v1_messages(ws: &mut Ws, n: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = next_envelope(ws, false).await;
        match e["type"].as_str() {
            Some("message") => out.push((
                e["offset"].as_u64().expect("offset"),
                e["data"].as_str().expect("data").to_string(),
            )),
            Some("hello") => continue,
            _ => panic!("unexpected envelope {e}"),
        }
    }
    out
}

/// A token for `sub` signed with `secret`, valid for ten minutes.
fn token(secret: &str, sub: &str, name: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() + 600)
        .unwrap_or(0);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": sub, "name": name, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token")
}

fn texts(messages: &[(u64, String)]) -> Vec<String> {
    messages.iter().map(|(_, d)| d.clone()).collect()
}

fn assert_contiguous(messages: &[(u64, String)], first: u64) {
    for (i, (offset, data)) in messages.iter().enumerate() {
        assert_eq!(*offset, first + i as u64, "offset of {data:?}");
    }
}

/// Whether `seq` holds `sub` in order (not necessarily next to each other).
fn in_order(seq: &[String], sub: &[String]) -> bool {
    let mut it = seq.iter();
    sub.iter().all(|s| it.any(|x| x == s))
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn three_nodes_are_one_chat_with_one_order() {
    let redis = Redis::start();
    let nodes = [node(&redis).await, node(&redis).await, node(&redis).await];
    let path = "/rooms/together";
    let mut raws = Vec::new();
    let mut v1s = Vec::new();
    let mut first = Vec::new();
    for n in &nodes {
        raws.push(raw(n.ws, path).await);
        let (ws, hello) = v1(n.ws, path).await;
        first.push(hello["offset"].as_u64().expect("offset") + 1);
        v1s.push(ws);
    }
    assert!(
        first.iter().all(|f| *f == 1),
        "a new room starts at offset 0 on every node: {first:?}"
    );
    const EACH: usize = 20;
    let mut sent: Vec<Vec<String>> = Vec::new();
    // Everyone sends at once, interleaved across nodes.
    for i in 0..EACH {
        for (n, ws) in raws.iter_mut().enumerate() {
            send_text(ws, &format!("raw{n}-{i}")).await;
        }
        for (n, ws) in v1s.iter_mut().enumerate() {
            send_text(ws, &format!("v1{n}-{i}")).await;
        }
    }
    for n in 0..3 {
        sent.push((0..EACH).map(|i| format!("raw{n}-{i}")).collect());
        sent.push((0..EACH).map(|i| format!("v1{n}-{i}")).collect());
    }
    let total = EACH * 6;
    let mut orders = Vec::new();
    for ws in &mut raws {
        orders.push(raw_messages(ws, total).await);
    }
    for ws in &mut v1s {
        let got = v1_messages(ws, total).await;
        assert_contiguous(&got, 1);
        orders.push(texts(&got));
    }
    for order in &orders[1..] {
        assert_eq!(
            order, &orders[0],
            "every client on every node sees one order"
        );
    }
    let all: HashSet<&String> = orders[0].iter().collect();
    assert_eq!(all.len(), total, "each message once");
    for s in &sent {
        assert!(
            in_order(&orders[0], s),
            "a sender's messages keep its order"
        );
    }
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn a_client_resumes_on_another_node() {
    let redis = Redis::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let path = "/rooms/roaming";
    let (mut ws, hello) = v1(a.ws, path).await;
    let epoch = hello["epoch"].as_str().expect("epoch").to_string();
    for i in 0..5 {
        send_text(&mut ws, &format!("m{i}")).await;
    }
    let got = v1_messages(&mut ws, 5).await;
    let last = got[4].0;
    drop(ws);
    // Meanwhile, on the other node.
    let mut other = raw(b.ws, path).await;
    // A raw client's join is in once its own message comes back.
    send_text(&mut other, "while away 0").await;
    assert_eq!(next_text(&mut other).await, "while away 0");
    for i in 1..3 {
        send_text(&mut other, &format!("while away {i}")).await;
    }
    raw_messages(&mut other, 2).await;
    let (mut back, hello) = v1(b.ws, &format!("{path}?since={last}&epoch={epoch}")).await;
    assert_eq!(hello["recovered"], true, "{hello}");
    assert_eq!(hello["epoch"], epoch.as_str());
    let replay = v1_messages(&mut back, 3).await;
    assert_contiguous(&replay, last + 1);
    assert_eq!(
        texts(&replay),
        ["while away 0", "while away 1", "while away 2"]
    );
    // And live from there, from either node.
    send_text(&mut other, "live").await;
    assert_eq!(
        v1_messages(&mut back, 1).await,
        [(last + 4, "live".to_string())]
    );
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn presence_counts_peers_on_every_node() {
    let redis = Redis::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let path = "/rooms/who";
    let (mut watcher, _) = v1(a.ws, path).await;
    let _far: Vec<Ws> = vec![raw(b.ws, path).await, raw(b.ws, path).await];
    let deadline = Instant::now() + WAIT;
    loop {
        let e = timeout(WAIT, next_envelope(&mut watcher, true))
            .await
            .expect("a presence notice");
        if e["type"] == "presence" && e["online"] == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "never saw online: 3");
    }
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn an_outage_loses_nothing_and_forks_no_order() {
    let mut redis = Redis::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let path = "/rooms/outage";
    let (mut va, _) = v1(a.ws, path).await;
    let (mut vb, _) = v1(b.ws, path).await;
    let mut ra = raw(a.ws, path).await;
    send_text(&mut va, "before").await;
    assert_eq!(texts(&v1_messages(&mut vb, 1).await), ["before"]);
    assert_eq!(next_text(&mut ra).await, "before");
    v1_messages(&mut va, 1).await;

    redis.kill();
    wait_ready(&a, false).await;
    wait_ready(&b, false).await;
    assert_eq!(
        http_get(a.http, "/healthz").await.0,
        200,
        "alive all the same"
    );
    assert_eq!(a.metric("hubbub_cluster_connected").await, 0);
    // Peers stay connected and keep sending; nothing is delivered before
    // Redis has ordered it.
    let mut sent = Vec::new();
    for i in 0..5 {
        for (name, ws) in [("a", &mut va), ("b", &mut vb)] {
            let text = format!("{name}{i}");
            send_text(ws, &text).await;
            sent.push(text);
        }
    }
    assert!(
        timeout(Duration::from_millis(500), next_text(&mut ra))
            .await
            .is_err(),
        "nothing may be delivered while Redis is away"
    );
    assert!(a.metric("hubbub_cluster_outbox").await + b.metric("hubbub_cluster_outbox").await > 0);

    redis.restart();
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    let got_a = texts(&v1_messages(&mut va, 10).await);
    let got_b = texts(&v1_messages(&mut vb, 10).await);
    let got_raw = raw_messages(&mut ra, 10).await;
    assert_eq!(got_a, got_b, "one order");
    assert_eq!(got_a, got_raw, "one order for raw clients too");
    let set: HashSet<&String> = got_a.iter().collect();
    assert_eq!(set, sent.iter().collect(), "every accepted message, once");
    assert!(
        timeout(Duration::from_millis(700), next_text(&mut ra))
            .await
            .is_err(),
        "and nothing twice"
    );
    assert!(a.metric("hubbub_cluster_publish_errors_total").await > 0);
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn a_hung_redis_is_an_outage_within_the_documented_bound() {
    let mut redis = Redis::start();
    let a = node(&redis).await;
    let path = "/rooms/hung";
    let (mut ws, _) = v1(a.ws, path).await;
    send_text(&mut ws, "one").await;
    v1_messages(&mut ws, 1).await;
    redis.pause();
    let paused = Instant::now();
    wait_ready(&a, false).await;
    let took = paused.elapsed();
    // Documented: within 3 s (one blocking read's deadline); the poll adds
    // its 50 ms and a loaded machine some more.
    assert!(took < Duration::from_secs(6), "noticed after {took:?}");
    send_text(&mut ws, "two").await;
    send_text(&mut ws, "three").await;
    redis.resume();
    wait_ready(&a, true).await;
    let got = v1_messages(&mut ws, 2).await;
    assert_eq!(texts(&got), ["two", "three"]);
    assert_contiguous(&got, 2);
    assert!(timeout(Duration::from_millis(700), next_text(&mut ws))
        .await
        .is_err());
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn redis_losing_its_data_starts_a_new_epoch() {
    let redis = Redis::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let path = "/rooms/amnesia";
    let (mut ws, hello) = v1(a.ws, path).await;
    let epoch = hello["epoch"].as_str().expect("epoch").to_string();
    for i in 0..3 {
        send_text(&mut ws, &format!("old{i}")).await;
    }
    v1_messages(&mut ws, 3).await;
    assert_eq!(redis.cli(&["FLUSHALL"]).trim(), "OK");
    // Within seconds the room notices, and its v1 peers get a new hello.
    let hello = loop {
        let e = timeout(WAIT, next_envelope(&mut ws, false))
            .await
            .expect("a new hello after FLUSHALL");
        if e["type"] == "hello" {
            break e;
        }
    };
    let new_epoch = hello["epoch"].as_str().expect("epoch").to_string();
    assert_ne!(new_epoch, epoch);
    assert_eq!(hello["offset"], 0, "{hello}");
    // A client resuming in the old epoch, on the other node, is told.
    let (mut late, hello) = v1(b.ws, &format!("{path}?since=3&epoch={epoch}")).await;
    assert_eq!(hello["recovered"], false, "{hello}");
    assert_eq!(hello["epoch"], new_epoch.as_str());
    // And the chat goes on, from offset 1 of the new epoch.
    send_text(&mut late, "new").await;
    assert_eq!(v1_messages(&mut ws, 1).await, [(1, "new".to_string())]);
    assert_eq!(v1_messages(&mut late, 1).await, [(1, "new".to_string())]);
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn a_full_outbox_turns_senders_away() {
    let mut redis = Redis::start();
    let a = TestServer::start(Config {
        outbox_size: 3,
        ..node_config(&redis)
    })
    .await;
    wait_ready(&a, true).await;
    let path = "/rooms/full";
    let (mut v, _) = v1(a.ws, path).await;
    let mut r = raw(a.ws, path).await;
    send_text(&mut r, "joined").await;
    assert_eq!(next_text(&mut r).await, "joined");
    v1_messages(&mut v, 1).await;
    redis.kill();
    wait_ready(&a, false).await;
    // Every refusal is an error envelope; nothing is delivered meanwhile.
    async fn refusals(v: &mut Ws) -> usize {
        let mut refused = 0;
        while let Ok(e) = timeout(Duration::from_millis(700), next_envelope(v, false)).await {
            assert_eq!(e["type"], "error", "nothing is delivered meanwhile: {e}");
            assert_eq!(e["code"], "unavailable", "{e}");
            refused += 1;
        }
        refused
    }
    // A burst: the outbox takes 3 and the publisher a batch, the rest are
    // refused at once.
    const BURST: usize = 8;
    for i in 0..BURST {
        send_text(&mut v, &format!("v{i}")).await;
    }
    let mut sent = BURST;
    let mut refused = refusals(&mut v).await;
    assert!(
        (BURST - 6..=BURST - 3).contains(&refused),
        "{refused} of {BURST} refused"
    );
    // If the publisher took its batch only after the burst, the outbox has
    // room again: one more at a time until one is refused. The publisher,
    // retrying the batch in hand, takes nothing more from the outbox, so it
    // stays full.
    loop {
        send_text(&mut v, &format!("v{sent}")).await;
        sent += 1;
        let now = refusals(&mut v).await;
        refused += now;
        if now > 0 {
            break;
        }
        assert!(
            sent < BURST + 8,
            "an outbox of 3 took {} messages",
            sent - refused
        );
    }
    // A raw sender has no envelope: it is closed with 1013.
    let _ = r.send(Message::text("raw while full")).await;
    let (frame, _) = expect_close(&mut r).await;
    assert_eq!(frame.code, CloseCode::Again);
    // What was taken is delivered once Redis is back, once each and in the
    // order sent.
    redis.restart();
    let taken = sent - refused;
    let got: Vec<usize> = texts(&v1_messages(&mut v, taken).await)
        .iter()
        .map(|t| t.trim_start_matches('v').parse().expect("a v<i> message"))
        .collect();
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
    assert_eq!(got.len(), taken, "{got:?}");
    assert_eq!(
        a.metric("hubbub_unavailable_total").await,
        refused as u64 + 1
    );
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn a_restarted_node_loses_nothing() {
    let redis = Redis::start();
    let a = node(&redis).await;
    let path = "/rooms/redeploy";
    let (mut ws, hello) = v1(a.ws, path).await;
    let epoch = hello["epoch"].as_str().expect("epoch").to_string();
    for i in 0..4 {
        send_text(&mut ws, &format!("m{i}")).await;
    }
    v1_messages(&mut ws, 4).await;
    a.shutdown().await.expect("clean shutdown");
    // The node comes back (a redeploy): same Redis, new process.
    let a = node(&redis).await;
    let (mut ws, hello) = v1(a.ws, &format!("{path}?since=2&epoch={epoch}")).await;
    assert_eq!(hello["recovered"], true, "{hello}");
    assert_eq!(hello["offset"], 4);
    assert_eq!(
        v1_messages(&mut ws, 2).await,
        [(3, "m2".to_string()), (4, "m3".to_string())]
    );
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn strangers_on_the_keys_are_skipped() {
    let redis = Redis::start();
    let a = node(&redis).await;
    let path = "/rooms/visited";
    let (mut ws, _) = v1(a.ws, path).await;
    send_text(&mut ws, "first").await;
    v1_messages(&mut ws, 1).await;
    // Entries hubbub did not write, on its own keys.
    redis.cli(&["XADD", "hubbub:events", "*", "hello", "there"]);
    redis.cli(&[
        "XADD",
        "hubbub:events",
        "*",
        "room",
        "visited",
        "epoch",
        "x",
        "offset",
        "zz",
        "kind",
        "t",
        "data",
        "d",
        "ts",
        "1",
    ]);
    redis.cli(&["XADD", "hubbub:room:visited:log", "999999-1", "junk", "1"]);
    redis.cli(&["SET", "hubbub:room:elsewhere:meta", "not a hash"]);
    send_text(&mut ws, "second").await;
    let got = v1_messages(&mut ws, 1).await;
    assert_eq!(texts(&got), ["second"]);
    // A room whose metadata is not hubbub's starts a new epoch and works.
    let (mut other, hello) = v1(a.ws, "/rooms/elsewhere").await;
    assert_eq!(hello["offset"], 0);
    send_text(&mut other, "fine").await;
    assert_eq!(v1_messages(&mut other, 1).await, [(1, "fine".to_string())]);
    // Garbage metadata in a live room: the node starts a new epoch there.
    redis.cli(&["DEL", "hubbub:room:visited:meta"]);
    redis.cli(&["SET", "hubbub:room:visited:meta", "garbage"]);
    send_text(&mut ws, "third").await;
    let got = v1_messages(&mut ws, 1).await;
    assert_eq!(texts(&got), ["third"]);
    assert!(a.metric("hubbub_cluster_skipped_total").await >= 2);
    assert_eq!(readyz(&a).await, 200);
}

/// nginx in front of three nodes, with `deploy/nginx.conf` exactly as the
/// README shows it; only the nodes' addresses and the listening port are
/// this test's own.
struct Nginx {
    child: std::process::Child,
    port: u16,
    _dir: TempDir,
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Nginx {
    fn start(nodes: &[&TestServer]) -> Nginx {
        let root = env!("CARGO_MANIFEST_DIR");
        let conf = std::fs::read_to_string(format!("{root}/deploy/nginx.conf"))
            .expect("deploy/nginx.conf");
        let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README.md");
        assert!(
            readme.contains(&format!("```nginx\n{conf}```")),
            "the README shows deploy/nginx.conf exactly"
        );
        let port = common::redis::free_port();
        let mut conf = conf.replace("listen 8000;", &format!("listen 127.0.0.1:{port};"));
        for (i, n) in nodes.iter().enumerate() {
            let name = format!("node{}", i + 1);
            conf = conf
                .replace(&format!("{name}:8081"), &n.ws.to_string())
                .replace(&format!("{name}:8080"), &n.http.to_string());
        }
        assert!(!conf.contains("node1:"), "every node replaced");
        let dir = std::env::temp_dir().join(format!("hubbub-nginx-{port}"));
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
        let d = dir.display();
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;"
        } else {
            ""
        };
        let full = format!(
            "{user}\nworker_processes 1;\nerror_log {d}/error.log;\nevents {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/tmp;\n proxy_temp_path {d}/tmp;\n \
             fastcgi_temp_path {d}/tmp;\n uwsgi_temp_path {d}/tmp;\n scgi_temp_path {d}/tmp;\n{conf}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), full).expect("write nginx.conf");
        let child = std::process::Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-g")
            .arg(format!("daemon off; pid {d}/nginx.pid;"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nginx ({e}); install it with `apt-get install -y nginx`")
            });
        let nginx = Nginx {
            child,
            port,
            _dir: TempDir(dir),
        };
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(nginx.addr()).is_err() {
            assert!(std::time::Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Nginx {
    /// SIGTERM, not SIGKILL: the master stops its workers, which a killed
    /// master would leave behind holding the port.
    fn drop(&mut self) {
        // SAFETY: a plain kill(2) on the pid of our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the server closes this connection within `within` (it was on a
/// node that stopped); data and control frames before the close are skipped.
async fn closed_within(ws: &mut Ws, within: Duration) -> bool {
    use futures_util::StreamExt;
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return false,
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return true,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

#[tokio::test]
#[ignore = "needs redis-server and nginx"]
async fn behind_nginx_clients_of_a_stopped_node_resume_on_another() {
    let redis = Redis::start();
    let mut nodes = vec![node(&redis).await, node(&redis).await, node(&redis).await];
    let nginx = Nginx::start(&nodes.iter().collect::<Vec<_>>());
    let (status, _, page) = http_get(nginx.addr(), "/rooms/front").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("<html") || page.contains("<!DOCTYPE"),
        "the page through nginx"
    );
    let path = "/rooms/front";
    // nginx takes turns: three clients, one on each node.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (ws, hello) = v1(nginx.addr(), path).await;
        clients.push((ws, hello["epoch"].as_str().expect("epoch").to_string()));
    }
    assert!(
        clients.iter().all(|(_, e)| *e == clients[0].1),
        "one room, one epoch"
    );
    for (i, (ws, _)) in clients.iter_mut().enumerate() {
        send_text(ws, &format!("hi from {i}")).await;
    }
    let mut last = 0;
    for (ws, _) in &mut clients {
        let got = v1_messages(ws, 3).await;
        assert_contiguous(&got, 1);
        last = got[2].0;
    }
    let epoch = clients[0].1.clone();
    // One node goes away (a redeploy): its clients are closed with 1001.
    let stopped = nodes.remove(0);
    stopped.shutdown().await.expect("node stops");
    let mut away = Vec::new();
    let mut stayed = Vec::new();
    for (ws, _) in clients {
        let mut ws = ws;
        if closed_within(&mut ws, Duration::from_secs(2)).await {
            away.push(ws);
        } else {
            stayed.push(ws);
        }
    }
    assert_eq!(away.len(), 1, "one client was on the stopped node");
    send_text(&mut stayed[0], "while you were away").await;
    // It comes back through nginx (which skips the stopped node) and
    // resumes on another node, missing nothing.
    let (mut back, hello) = v1(nginx.addr(), &format!("{path}?since={last}&epoch={epoch}")).await;
    assert_eq!(hello["recovered"], true, "{hello}");
    assert_eq!(
        v1_messages(&mut back, 1).await,
        [(last + 1, "while you were away".to_string())]
    );
    send_text(&mut back, "back").await;
    for ws in &mut stayed {
        let got = v1_messages(ws, 2).await;
        assert_eq!(texts(&got), ["while you were away", "back"]);
    }
}

/// No Redis at all behind the URL: the node starts all the same (not
/// fatal), is alive but not ready, and a v1 client that joins waits for the
/// room rather than being refused or crashing anything.
#[tokio::test]
async fn an_unreachable_redis_at_start_up_is_not_fatal() {
    let port = common::redis::free_port();
    let node = TestServer::start(Config {
        redis_url: Some(format!("redis://127.0.0.1:{port}/")),
        ..Config::ephemeral()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(http_get(node.http, "/healthz").await.0, 200);
    assert_eq!(readyz(&node).await, 503);
    assert_eq!(node.metric("hubbub_cluster_connected").await, 0);
    let mut ws = connect_to(node.ws, "/rooms/later", true)
        .await
        .expect("the handshake succeeds");
    assert!(
        timeout(Duration::from_millis(300), next_text(&mut ws))
            .await
            .is_err(),
        "no hello before the room is loaded"
    );
    node.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn two_deployments_share_one_redis_by_prefix() {
    let redis = Redis::start();
    let a = node(&redis).await;
    let b = TestServer::start(Config {
        key_prefix: "other:".into(),
        ..node_config(&redis)
    })
    .await;
    wait_ready(&b, true).await;
    let (mut wa, _) = v1(a.ws, "/rooms/same").await;
    let (mut wb, _) = v1(b.ws, "/rooms/same").await;
    send_text(&mut wa, "for a").await;
    send_text(&mut wb, "for b").await;
    assert_eq!(v1_messages(&mut wa, 1).await, [(1, "for a".to_string())]);
    assert_eq!(v1_messages(&mut wb, 1).await, [(1, "for b".to_string())]);
    assert!(timeout(Duration::from_millis(500), next_text(&mut wa))
        .await
        .is_err());
    assert!(redis.cli(&["EXISTS", "other:room:same:meta"]).trim() == "1");
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn a_verified_sender_is_stamped_on_every_node() {
    const SECRET: &str = "a cluster test secret, long enough for HS256";
    let redis = Redis::start();
    let (a, b) = two_nodes(secured_config(&redis, Some(SECRET), None)).await;
    let token = token(SECRET, "u9", "Nine");
    let (mut signed, _) = v1(a.ws, &format!("/rooms/id?token={token}")).await;
    let (mut far, _) = v1(b.ws, "/rooms/id").await;
    send_text(&mut signed, "who am I").await;
    send_text(&mut far, "anonymous").await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let e = next_envelope(&mut far, false).await;
        if e["type"] == "message" {
            seen.push((e["data"].clone(), e["from"].clone()));
        }
    }
    seen.sort_by_key(|(d, _)| d.to_string());
    assert_eq!(seen[0].0, "anonymous");
    assert_eq!(seen[0].1, Value::Null);
    assert_eq!(seen[1].1, serde_json::json!({"id": "u9", "name": "Nine"}));
    // And in the history a resume on the other node gets.
    let (mut late, _) = v1(b.ws, "/rooms/id").await;
    let history = [
        next_envelope(&mut late, false).await,
        next_envelope(&mut late, false).await,
    ];
    assert!(
        history.iter().any(|e| e["from"]["name"] == "Nine"),
        "{history:?}"
    );
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn an_api_publish_on_one_node_reaches_peers_on_another() {
    const KEY: &str = "a cluster API key that is long enough";
    let redis = Redis::start();
    let (a, b) = two_nodes(secured_config(&redis, None, Some(KEY))).await;
    let (mut far, hello) = v1(b.ws, "/rooms/alerts").await;
    let bearer = format!("Bearer {KEY}");
    let headers = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ];
    // Node a hosts nobody in this room: it loads it from Redis to publish.
    let (status, _, body) = http_send(
        a.http,
        "POST",
        "/api/rooms/alerts/messages",
        &headers,
        br#"{"data":"disk full","from":{"id":"mon","name":"Monitor"}}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["epoch"], hello["epoch"]);
    assert_eq!(answer["offset"], 1);
    let m = next_envelope(&mut far, false).await;
    assert_eq!(
        (m["data"].as_str(), m["offset"].as_u64()),
        (Some("disk full"), Some(1))
    );
    assert_eq!(m["from"]["name"], "Monitor");
    // The history, read through the other node.
    let (status, _, body) = http_send(
        a.http,
        "GET",
        "/api/rooms/alerts/messages",
        &headers[..1],
        vec![],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let history: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(history["messages"][0]["data"], "disk full");
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn presence_lists_members_from_every_node() {
    const SECRET: &str = "a cluster presence secret, long enough";
    let redis = Redis::start();
    let (a, b) = two_nodes(secured_config(&redis, Some(SECRET), None)).await;
    let token = |sub: &str| token(SECRET, sub, &sub.to_uppercase());
    let (mut alice, _) = v1(a.ws, &format!("/rooms/crew?token={}", token("alice"))).await;
    let (_bob, _) = v1(b.ws, &format!("/rooms/crew?token={}", token("bob"))).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let e = timeout(WAIT, next_envelope(&mut alice, true))
            .await
            .expect("a presence notice");
        if e["type"] == "presence"
            && e["online"] == 2
            && e["members"].as_array().map(Vec::len) == Some(2)
        {
            assert_eq!(
                e["members"],
                serde_json::json!([{"id": "alice", "name": "ALICE"}, {"id": "bob", "name": "BOB"}])
            );
            break;
        }
        assert!(Instant::now() < deadline, "never saw both members: {e}");
    }
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn an_api_removal_on_one_node_closes_the_user_on_another() {
    const SECRET: &str = "a cluster removal secret, long enough";
    const KEY: &str = "a cluster API key that is long enough too";
    let redis = Redis::start();
    let (a, b) = two_nodes(secured_config(&redis, Some(SECRET), Some(KEY))).await;
    let token = token(SECRET, "spam", "S");
    let (mut spammer, _) = v1(b.ws, &format!("/rooms/calm?token={token}")).await;
    let bearer = format!("Bearer {KEY}");
    let (status, _, body) = http_send(
        a.http,
        "DELETE",
        "/api/rooms/calm/users/spam",
        &[("Authorization", bearer.as_str())],
        vec![],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (frame, _) = expect_close(&mut spammer).await;
    assert_eq!(frame.code, CloseCode::Library(4003));
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn the_api_lists_rooms_of_every_node() {
    const KEY: &str = "a cluster API key for listing rooms, long enough";
    let redis = Redis::start();
    let (a, b) = two_nodes(secured_config(&redis, None, Some(KEY))).await;
    let _here = v1(a.ws, "/rooms/on-a").await;
    let _there = (v1(b.ws, "/rooms/on-b").await, v1(b.ws, "/rooms/on-b").await);
    let bearer = format!("Bearer {KEY}");
    let want = serde_json::json!({"rooms": [
        {"name": "on-a", "online": 1},
        {"name": "on-b", "online": 2},
    ]});
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _, body) = http_request(
            a.http,
            "GET",
            "/api/rooms",
            &[("Authorization", bearer.as_str())],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let got: Value = serde_json::from_str(&body).expect("JSON");
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "node a lists {got}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

//! The chat page in a real browser: Debian's headless Chromium, driven through
//! chromedriver with fantoccini, against a hubbub started in this process on
//! loopback.
//!
//! Two browser sessions (two separate profiles, so two people: alice in a
//! light theme, bob in a dark one) plus a plain WebSocket client chat with
//! each other in the lobby; a third (carol) joins later and goes to another
//! room. The page speaks `hubbub.v1` (docs/protocol.md), the plain client
//! the raw relay. The test checks what a person would see: same messages in
//! the same order in both tabs, the room's name and how many are online,
//! HTML shown as text with no script running, the page working under its own
//! Content-Security-Policy, oversize messages refused in the page, a tab
//! whose connection was cut resuming with every message it missed exactly
//! once, a tab opened later showing the history, two rooms not seeing each
//! other's messages, messages typed while disconnected kept and sent after
//! the resume, both tabs coming back by themselves after a restart on the
//! same ports, saying that messages may be missing, and a tab that was away
//! for longer than the history reaches saying so too. It saves
//! `target/browser/two-tabs.png` on the way (and `docs/screenshot.png` too
//! when `HUBBUB_UPDATE_SCREENSHOT=1`).
//!
//! A second, shorter run serves the page over https with a certificate made
//! at test time (rcgen; Chromium started with `--ignore-certificate-errors`
//! since nothing vouches for it): the page connects with `wss://` by itself
//! and two people chat through it.
//!
//! Needs `chromium` and `chromium-driver` (Debian packages), hence ignored by
//! default: `cargo test --test browser -- --include-ignored`.
//! `HUBBUB_CHROMIUM` and `HUBBUB_CHROMEDRIVER` override the binaries' paths.
#![cfg(unix)]

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::header;
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// The whole scenario must finish within this, whatever happens.
const WHOLE_TEST: Duration = Duration::from_secs(300);
/// Bound for one thing to show up in a tab.
const SHOW_UP: Duration = Duration::from_secs(15);
/// Bound for both tabs to be back after a restart (backoff included).
const RECONNECT: Duration = Duration::from_secs(45);
const MAX_MESSAGE_BYTES: usize = 2000;
/// Messages each room keeps: more than the lobby sees before the restart,
/// so a tab opened later gets all of it, and few enough to outrun quickly.
const HISTORY: usize = 25;
/// The viewport of each tab: about a large phone, so the screenshot shows the
/// narrow layout and both tabs fit side by side.
const TAB_SIZE: (u32, u32) = (440, 720);
const ENTER: &str = "\u{E007}";
/// A room other than the lobby, with letters of two scripts, and its name
/// percent-encoded as in its address.
const ROOM: &str = "café-聊天";
const ROOM_PATH: &str = "caf%C3%A9-%E8%81%8A%E5%A4%A9";
const SELECT_ALL: &str = "\u{E009}a\u{E000}";

// ---------------------------------------------------------------------------
// Processes and servers

/// The browser tests run one at a time: two chromedrivers starting
/// Chromiums at once on two cores can miss the session deadline.
static BROWSERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

fn binary(env: &str, default: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| default.to_string())
}

/// chromedriver in its own process group, with the browsers it starts: the
/// whole group is killed when this is dropped, on every path out of the test
/// (panics included).
struct Driver {
    child: Child,
    addr: SocketAddr,
    url: String,
    profiles: Vec<PathBuf>,
    /// Extra Chromium flags for every browser this driver starts.
    browser_args: Vec<String>,
}

impl Driver {
    /// chromedriver logs to `out/<log>`.
    async fn start(out: &Path, log: &str) -> Driver {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let exe = binary("HUBBUB_CHROMEDRIVER", "/usr/bin/chromedriver");
        let child = Command::new(&exe)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", out.join(log).display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {exe}: {e}; install it with \
                     `apt-get install -y chromium chromium-driver`"
                )
            });
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let driver = Driver {
            child,
            addr,
            url: format!("http://127.0.0.1:{port}"),
            profiles: Vec::new(),
            browser_args: Vec::new(),
        };
        poll(
            "chromedriver to listen",
            Duration::from_secs(20),
            || async { TcpStream::connect(addr).await.is_ok() },
        )
        .await;
        driver
    }

    /// A new browser with its own empty profile, as one person's tab.
    async fn tab(&mut self, name: &'static str, dark: bool) -> Tab {
        let c = self.browser(name, dark).await;
        let session = c
            .session_id()
            .await
            .expect("session id")
            .expect("a session");
        Tab {
            name,
            c,
            driver: self.addr,
            session,
        }
    }

    /// A new browser with its own empty profile.
    async fn browser(&mut self, name: &str, dark: bool) -> Client {
        let profile = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("chromium-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).expect("profile dir");
        self.profiles.push(profile.clone());
        let mut args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--hide-scrollbars".into(),
            "--force-device-scale-factor=1".into(),
            "--lang=en-US".into(),
            format!("--window-size={},{}", TAB_SIZE.0, TAB_SIZE.1),
            format!("--user-data-dir={}", profile.display()),
        ];
        if dark {
            // Makes prefers-color-scheme: dark match, as a dark OS theme would.
            args.push("--force-dark-mode".into());
        }
        args.extend(self.browser_args.iter().cloned());
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary("HUBBUB_CHROMIUM", "/usr/bin/chromium"),
                "args": args,
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let c = tokio::time::timeout(
            Duration::from_secs(60),
            ClientBuilder::new(HttpConnector::new())
                .capabilities(caps)
                .connect(&self.url),
        )
        .await
        .expect("browser started in time")
        .expect("new WebDriver session");
        set_viewport(&c, TAB_SIZE.0, TAB_SIZE.1).await;
        c
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let pid = self.child.id();
        // The group holds chromedriver and every Chromium it started.
        if let Ok(pgid) = libc::pid_t::try_from(pid) {
            // SAFETY: plain syscall; the group is the one spawned above.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in &self.profiles {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// hubbub running in this process until stopped.
struct Running {
    http: SocketAddr,
    ws: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), hubbub::Error>>,
}

impl Running {
    /// Binds with `config`, retrying for a while if the ports are still held
    /// by a server that just stopped.
    async fn start(config: hubbub::Config) -> Running {
        let deadline = Instant::now() + Duration::from_secs(10);
        let server = loop {
            match hubbub::Server::bind(config.clone()).await {
                Ok(server) => break server,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("bind: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot bind: {e}"),
            }
        };
        let (http, ws) = (server.http_addr(), server.ws_addr());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            rx.await.ok();
        }));
        Running {
            http,
            ws,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).ok();
        tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("server stopped in time")
            .expect("server task")
            .expect("server run");
    }
}

/// Sizes the window so that the page itself gets `width` x `height` pixels.
async fn set_viewport(c: &Client, width: u32, height: u32) {
    let (mut w, mut h) = (width, height);
    for _ in 0..3 {
        c.set_window_size(w, h).await.expect("window size");
        let inner = c
            .execute("return [innerWidth, innerHeight]", vec![])
            .await
            .expect("viewport");
        let (iw, ih) = (inner[0].as_u64().unwrap(), inner[1].as_u64().unwrap());
        if (iw, ih) == (width as u64, height as u64) {
            return;
        }
        w = (w as i64 + width as i64 - iw as i64).max(100) as u32;
        h = (h as i64 + height as i64 - ih as i64).max(100) as u32;
    }
}

// ---------------------------------------------------------------------------
// Waiting, bounded

async fn poll<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One tab (browser session) and its name for messages.
struct Tab {
    name: &'static str,
    c: Client,
    /// chromedriver and this browser's session there, for DevTools commands.
    driver: SocketAddr,
    session: String,
}

/// What a tab shows for one chat message.
#[derive(Debug, Clone, PartialEq)]
struct Shown {
    nick: String,
    body: String,
    own: bool,
}

impl Tab {
    async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.c
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("[{}] script failed: {e}\n{script}", self.name))
    }

    /// Waits until `predicate` (a JS expression body returning a value) is
    /// truthy. On timeout, saves a screenshot and says what the tab showed.
    async fn wait(&self, what: &str, limit: Duration, predicate: &str) {
        let deadline = Instant::now() + limit;
        let script = format!("return Boolean((() => {{ {predicate} }})());");
        loop {
            if self.js(&script, vec![]).await == Value::Bool(true) {
                return;
            }
            if Instant::now() >= deadline {
                let shot = target_dir()
                    .join("browser")
                    .join(format!("failed-{}.png", self.name));
                if let Ok(png) = self.c.screenshot().await {
                    let _ = std::fs::write(&shot, png);
                }
                let state = self
                    .js(
                        "return [document.getElementById('status').textContent, \
                         document.getElementById('log').innerText.slice(-2000), \
                         document.getElementById('note').textContent]",
                        vec![],
                    )
                    .await;
                panic!(
                    "[{}] timed out after {limit:?} waiting for {what}; tab shows {state}; \
                     screenshot {}",
                    self.name,
                    shot.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One Chrome DevTools Protocol command in this tab, through
    /// chromedriver's `goog/cdp/execute` (WebDriver has no command for
    /// going offline or finding the page's sockets).
    async fn cdp(&self, cmd: &str, params: Value) -> Value {
        let path = format!("/session/{}/goog/cdp/execute", self.session);
        let (ok, v) = post_json(self.driver, &path, &json!({"cmd": cmd, "params": params})).await;
        assert!(ok, "[{}] {cmd} failed: {v}", self.name);
        v["value"].clone()
    }

    /// Makes the browser offline (`navigator.onLine` false, the `offline`
    /// event) or online again, as DevTools' network panel does.
    async fn set_offline(&self, offline: bool) {
        self.cdp(
            "Network.emulateNetworkConditions",
            json!({"offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}),
        )
        .await;
    }

    /// Closes the page's open WebSockets from outside the page: DevTools
    /// finds every `WebSocket` object on the heap, so the page need expose
    /// nothing for the test. Returns how many were open.
    async fn close_sockets(&self) -> u64 {
        let proto = self
            .cdp(
                "Runtime.evaluate",
                json!({"expression": "WebSocket.prototype"}),
            )
            .await;
        let found = self
            .cdp(
                "Runtime.queryObjects",
                json!({"prototypeObjectId": proto["result"]["objectId"]}),
            )
            .await;
        let closed = self
            .cdp(
                "Runtime.callFunctionOn",
                json!({
                    "objectId": found["objects"]["objectId"],
                    "functionDeclaration": "function () { \
                        const open = this.filter(w => w.readyState === WebSocket.OPEN); \
                        open.forEach(w => w.close()); return open.length; }",
                    "returnByValue": true,
                }),
            )
            .await;
        closed["result"]["value"]
            .as_u64()
            .unwrap_or_else(|| panic!("[{}] closing sockets: {closed}", self.name))
    }

    /// The system lines in the list: their text and `data-note`.
    async fn sys_lines(&self) -> Vec<(String, String)> {
        let v = self
            .js(
                "return Array.from(document.querySelectorAll('#log li[data-kind=sys]'), li => \
                 [li.textContent, li.dataset.note || ''])",
                vec![],
            )
            .await;
        v.as_array()
            .expect("array")
            .iter()
            .map(|l| {
                (
                    l[0].as_str().unwrap().to_string(),
                    l[1].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Waits until the header says `n` online.
    async fn wait_online(&self, n: u64) {
        self.wait(
            &format!("{n} online"),
            SHOW_UP,
            &format!(
                "const o = document.getElementById('online'); \
                 return !o.hidden && o.dataset.count === '{n}' && o.textContent === '{n} online'"
            ),
        )
        .await;
    }

    async fn room_shown(&self) -> String {
        self.js(
            "return document.getElementById('room-name').textContent",
            vec![],
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    async fn state(&self) -> String {
        self.js(
            "return document.getElementById('status').dataset.state",
            vec![],
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    async fn wait_state(&self, state: &str, limit: Duration) {
        self.wait(
            &format!("state {state}"),
            limit,
            &format!("return document.getElementById('status').dataset.state === {state:?}"),
        )
        .await;
    }

    async fn messages(&self) -> Vec<Shown> {
        let v = self
            .js(
                "return Array.from(document.querySelectorAll('#log li[data-kind=chat]'), li => \
                 [li.querySelector('.nick').textContent, li.querySelector('.body').textContent, \
                  li.dataset.own === 'true'])",
                vec![],
            )
            .await;
        v.as_array()
            .expect("array")
            .iter()
            .map(|m| Shown {
                nick: m[0].as_str().unwrap().to_string(),
                body: m[1].as_str().unwrap().to_string(),
                own: m[2].as_bool().unwrap(),
            })
            .collect()
    }

    async fn wait_count(&self, n: usize) {
        self.wait(
            &format!("{n} messages"),
            SHOW_UP,
            &format!("return document.querySelectorAll('#log li[data-kind=chat]').length >= {n}"),
        )
        .await;
    }

    /// Types into the message box like a person and presses Enter.
    async fn say(&self, text: &str) {
        let input = self.c.find(Locator::Css("#text")).await.expect("#text");
        input
            .send_keys(&format!("{text}{ENTER}"))
            .await
            .expect("type");
    }

    /// Puts a long text into the message box (typing it key by key would be
    /// slow) and presses Enter.
    async fn paste_and_send(&self, text: &str) {
        self.js(
            "const t = document.getElementById('text'); t.value = arguments[0]; \
             t.dispatchEvent(new Event('input', {bubbles: true})); t.focus();",
            vec![json!(text)],
        )
        .await;
        let input = self.c.find(Locator::Css("#text")).await.expect("#text");
        input.send_keys(ENTER).await.expect("Enter");
    }

    async fn set_nick(&self, nick: &str) {
        let field = self.c.find(Locator::Css("#nick")).await.expect("#nick");
        field.click().await.expect("click nick");
        field
            .send_keys(&format!("{SELECT_ALL}{nick}{ENTER}"))
            .await
            .expect("type nick");
    }

    async fn screenshot(&self) -> Vec<u8> {
        self.c.screenshot().await.expect("screenshot")
    }
}

// ---------------------------------------------------------------------------
// HTTP and plain WebSocket clients

async fn get_page(addr: SocketAddr, path: &str) -> (hyper::HeaderMap, String) {
    tokio::time::timeout(Duration::from_secs(10), async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.expect("GET");
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts.headers, String::from_utf8(body.to_vec()).unwrap())
    })
    .await
    .expect("page served in time")
}

/// A POST of JSON on a fresh connection; whether it succeeded, and the JSON
/// answer.
async fn post_json(addr: SocketAddr, path: &str, body: &Value) -> (bool, Value) {
    tokio::time::timeout(Duration::from_secs(20), async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::post(path)
            .header(header::HOST, addr.to_string())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = sender.send_request(req).await.expect("POST");
        let ok = resp.status().is_success();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (ok, serde_json::from_slice(&body).unwrap_or(Value::Null))
    })
    .await
    .expect("POST answered in time")
}

type Plain = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A raw (no subprotocol) client in the room at `path` (`/` is the lobby).
async fn plain_client(ws: SocketAddr, path: &str) -> Plain {
    let (client, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(format!("ws://{ws}{path}")),
    )
    .await
    .expect("plain client connects in time")
    .expect("plain client connects");
    client
}

async fn plain_next_text(client: &mut Plain) -> String {
    loop {
        let msg = tokio::time::timeout(SHOW_UP, client.next())
            .await
            .expect("plain client receives in time")
            .expect("stream open")
            .expect("frame");
        if let Message::Text(t) = msg {
            return t.to_string();
        }
    }
}

// ---------------------------------------------------------------------------
// The screenshot: both tabs side by side, composed in the browser itself.

async fn side_by_side(c: &Client, shots: [(&[u8], &str); 2]) -> Vec<u8> {
    let original = c.window().await.expect("window");
    let win = c.new_window(false).await.expect("new window");
    c.switch_to_window(win.handle).await.expect("switch");
    c.set_window_size(1200, 1000).await.expect("size");
    c.goto("about:blank").await.expect("blank");
    let b64 = |png: &[u8]| base64::engine::general_purpose::STANDARD.encode(png);
    c.execute(
        r#"
        const [a, capA, b, capB] = arguments;
        document.body.style.cssText = "margin:0;background:#fff";
        const box = document.createElement("div");
        box.id = "shot";
        box.style.cssText = "display:inline-flex;gap:20px;padding:20px;" +
          "background:linear-gradient(135deg,#e9e7ff,#dbeafe);font:600 13px system-ui,sans-serif;color:#3b3f4e";
        for (const [src, cap] of [[a, capA], [b, capB]]) {
          const fig = document.createElement("figure");
          fig.style.cssText = "margin:0;display:flex;flex-direction:column;gap:8px;align-items:center";
          const img = document.createElement("img");
          img.src = "data:image/png;base64," + src;
          img.style.cssText = "display:block;border-radius:10px;box-shadow:0 6px 24px rgba(30,30,80,.25)";
          const fc = document.createElement("figcaption");
          fc.textContent = cap;
          fig.append(img, fc);
          box.append(fig);
        }
        document.body.append(box);
        "#,
        vec![
            json!(b64(shots[0].0)),
            json!(shots[0].1),
            json!(b64(shots[1].0)),
            json!(shots[1].1),
        ],
    )
    .await
    .expect("compose");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c
        .execute(
            "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
            vec![],
        )
        .await
        .expect("images")
        != Value::Bool(true)
    {
        assert!(
            Instant::now() < deadline,
            "composed screenshot never loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let png = c
        .find(Locator::Css("#shot"))
        .await
        .expect("#shot")
        .screenshot()
        .await
        .expect("element screenshot");
    c.close_window().await.expect("close window");
    c.switch_to_window(original).await.expect("switch back");
    png
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium"]
async fn two_tabs_chat_in_a_real_browser() {
    let out = target_dir().join("browser");
    std::fs::create_dir_all(&out).expect("target/browser");
    let _one_at_a_time = BROWSERS.lock().await;
    let mut driver = Driver::start(&out, "chromedriver.log").await;
    tokio::time::timeout(WHOLE_TEST, scenario(&mut driver, &out))
        .await
        .expect("the browser test finished in time");
    // `driver` is dropped here, or while unwinding from a failure above,
    // and takes chromedriver and the browsers with it.
}

/// The page over https, with a certificate made for this run: it connects
/// with wss:// by itself, and two people chat through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromedriver"]
async fn two_tabs_chat_over_https() {
    let out = target_dir().join("browser");
    std::fs::create_dir_all(&out).expect("target/browser");
    let _one_at_a_time = BROWSERS.lock().await;
    let mut driver = Driver::start(&out, "chromedriver-https.log").await;
    // The certificate is self-signed: this browser trusts it as the
    // operator's own would trust a real one.
    driver
        .browser_args
        .push("--ignore-certificate-errors".into());
    tokio::time::timeout(WHOLE_TEST, https_scenario(&mut driver))
        .await
        .expect("the https browser test finished in time");
}

async fn https_scenario(driver: &mut Driver) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("certificate dir");
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("certificate");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).expect("write cert");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key");
    let server = Running::start(hubbub::Config {
        tls_cert: Some(cert),
        tls_key: Some(key),
        ..hubbub::Config::ephemeral()
    })
    .await;
    let page_url = format!("https://{}/", server.http);

    let alice = driver.tab("alice-https", false).await;
    let bob = driver.tab("bob-https", true).await;
    for tab in [&alice, &bob] {
        tab.c
            .goto(&page_url)
            .await
            .expect("open the page over https");
    }
    for tab in [&alice, &bob] {
        tab.wait_state("connected", SHOW_UP).await;
        tab.wait_online(2).await;
        // Served over https, so the page's socket is wss:// to the
        // WebSocket listener (its CSP allows exactly that).
        let protocol = tab.js("return location.protocol", vec![]).await;
        assert_eq!(protocol, "https:", "[{}]", tab.name);
        let sockets = tab
            .cdp(
                "Runtime.evaluate",
                json!({"expression": "WebSocket.prototype"}),
            )
            .await;
        let found = tab
            .cdp(
                "Runtime.queryObjects",
                json!({"prototypeObjectId": sockets["result"]["objectId"]}),
            )
            .await;
        let urls = tab
            .cdp(
                "Runtime.callFunctionOn",
                json!({
                    "objectId": found["objects"]["objectId"],
                    "functionDeclaration": "function () { \
                        return this.filter(w => w.readyState === WebSocket.OPEN).map(w => w.url); }",
                    "returnByValue": true,
                }),
            )
            .await;
        let urls = &urls["result"]["value"];
        assert!(
            urls.as_array().is_some_and(|u| u.len() == 1
                && u[0]
                    .as_str()
                    .is_some_and(|u| u.starts_with(&format!("wss://{}/", server.ws)))),
            "[{}] the page's open sockets: {urls}",
            tab.name
        );
    }
    let (headers, _) = get_page_tls(server.http).await;
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        csp.contains(&format!("connect-src 'self' wss://{}", server.ws)),
        "{csp}"
    );

    alice.say("hello over wss").await;
    bob.say("and back, encrypted").await;
    for tab in [&alice, &bob] {
        tab.wait_count(2).await;
        let bodies: Vec<String> = tab.messages().await.into_iter().map(|m| m.body).collect();
        assert_eq!(
            bodies,
            ["hello over wss", "and back, encrypted"],
            "[{}] messages shown",
            tab.name
        );
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A page opened with `?token=`: it shows the name the server verified
/// instead of the nickname field, its messages carry that name for
/// everyone, and the other tab shows who is in the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromedriver"]
async fn a_signed_in_tab_shows_its_verified_name_and_who_is_here() {
    let out = target_dir().join("browser");
    std::fs::create_dir_all(&out).expect("target/browser");
    let _one_at_a_time = BROWSERS.lock().await;
    let mut driver = Driver::start(&out, "chromedriver-token.log").await;
    tokio::time::timeout(WHOLE_TEST, token_scenario(&mut driver))
        .await
        .expect("the token browser test finished in time");
}

async fn token_scenario(driver: &mut Driver) {
    const SECRET: &str = "the browser test's secret, long enough for HS256";
    let server = Running::start(hubbub::Config {
        auth_mode: hubbub::auth::Mode::Optional,
        jwt_secret: Some(hubbub::config::Secret(SECRET.into())),
        ..hubbub::Config::ephemeral()
    })
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() + 600)
        .unwrap_or(0);
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "u-alice", "name": "Alice Verified", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token");
    let alice = driver.tab("alice-token", false).await;
    let bob = driver.tab("bob-anon", true).await;
    alice
        .c
        .goto(&format!(
            "http://{}/rooms/signed?token={token}",
            server.http
        ))
        .await
        .expect("open the page with a token");
    bob.c
        .goto(&format!("http://{}/rooms/signed", server.http))
        .await
        .expect("open the page");
    for tab in [&alice, &bob] {
        tab.wait_state("connected", SHOW_UP).await;
    }
    alice
        .wait(
            "the verified name in place of the nickname field",
            SHOW_UP,
            "const me = document.getElementById('me'); \
             return !me.hidden && me.textContent === 'Alice Verified' \
               && document.getElementById('nick').hidden;",
        )
        .await;
    bob.wait(
        "Alice among the room's members",
        SHOW_UP,
        "const m = document.getElementById('members'); \
         return !m.hidden && m.textContent.includes('Alice Verified');",
    )
    .await;
    alice.say("signed hello").await;
    for tab in [&alice, &bob] {
        tab.wait_count(1).await;
        let shown = tab.messages().await;
        assert_eq!(shown[0].nick, "Alice Verified", "[{}] {shown:?}", tab.name);
        assert_eq!(shown[0].body, "signed hello", "[{}] {shown:?}", tab.name);
        assert_eq!(
            shown[0].own,
            tab.name == "alice-token",
            "[{}] {shown:?}",
            tab.name
        );
    }
    server.stop().await;
}

/// GET / over TLS, trusting any certificate (the one made for this run).
async fn get_page_tls(addr: SocketAddr) -> (hyper::HeaderMap, String) {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
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

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    tokio::time::timeout(Duration::from_secs(10), async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::get("/")
            .header(header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.expect("GET");
        assert!(resp.status().is_success(), "GET /: {}", resp.status());
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts.headers, String::from_utf8(body.to_vec()).unwrap())
    })
    .await
    .expect("page served in time")
}

async fn scenario(driver: &mut Driver, out: &Path) {
    let config = hubbub::Config {
        max_message_bytes: MAX_MESSAGE_BYTES,
        history_size: HISTORY,
        ..hubbub::Config::ephemeral()
    };
    let server = Running::start(config.clone()).await;
    let page_url = format!("http://{}/", server.http);

    // The page's security headers, as any HTTP client sees them, at `/` and
    // at a room's address.
    for path in ["/", &format!("/rooms/{ROOM_PATH}")] {
        let (headers, _) = get_page(server.http, path).await;
        let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'sha256-"), "{path}: {csp}");
        assert!(csp.contains("style-src 'sha256-"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert!(
            csp.contains(&format!("connect-src 'self' ws://{}", server.ws)),
            "{path}: {csp}"
        );
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }

    let alice = driver.tab("alice", false).await;
    let bob = driver.tab("bob", true).await;
    for tab in [&alice, &bob] {
        tab.c.goto(&page_url).await.expect("open the page");
    }

    // Connected means the inline script ran under the CSP, so its hash is
    // right, and that the hello came (the page says connected only then);
    // the stylesheet applied means the style hash is right too.
    for tab in [&alice, &bob] {
        tab.wait_state("connected", SHOW_UP).await;
        let applied = tab
            .js(
                "return [getComputedStyle(document.body).display, \
                 getComputedStyle(document.getElementById('status')).borderRadius]",
                vec![],
            )
            .await;
        assert_eq!(applied, json!(["flex", "999px"]), "[{}] styles", tab.name);
        assert_eq!(tab.room_shown().await, "lobby", "[{}] room name", tab.name);
        tab.wait_online(2).await;
    }
    // Light and dark themes follow prefers-color-scheme.
    let theme = |tab: &Tab| {
        let c = tab.c.clone();
        async move {
            c.execute(
                "return [matchMedia('(prefers-color-scheme: dark)').matches, \
                 getComputedStyle(document.body).backgroundColor]",
                vec![],
            )
            .await
            .expect("theme")
        }
    };
    let (light, dark) = (theme(&alice).await, theme(&bob).await);
    assert_eq!(light[0], false);
    assert_eq!(dark[0], true);
    assert_ne!(light[1], dark[1], "dark theme changes the background");

    // Nicknames, remembered across a reload.
    alice.set_nick("alice").await;
    bob.set_nick("bob").await;
    for tab in [&alice, &bob] {
        let stored = tab
            .js("return localStorage.getItem('hubbub.nick')", vec![])
            .await;
        assert_eq!(stored, json!(tab.name), "nickname stored");
        let focused = tab.js("return document.activeElement.id", vec![]).await;
        assert_eq!(
            focused, "text",
            "Enter in the name field moves to the message box"
        );
    }
    alice.c.refresh().await.expect("reload");
    alice.wait_state("connected", SHOW_UP).await;
    let nick = alice
        .js("return document.getElementById('nick').value", vec![])
        .await;
    assert_eq!(nick, "alice", "nickname remembered after a reload");
    for tab in [&alice, &bob] {
        tab.wait_online(2).await;
    }

    // A conversation: both tabs and a plain (raw) client in the same room,
    // which sends bare text and a binary message.
    let mut plain = plain_client(server.ws, "/").await;
    // Raw clients count as online too.
    for tab in [&alice, &bob] {
        tab.wait_online(3).await;
    }
    let long = "A long message wraps inside its bubble instead of widening the page: \
                https://example.com/a/very/long/path/without/any/spaces/so/the/browser/\
                has/to/break/it/somewhere/sensible/or/the/layout/would/overflow";
    let conversation: Vec<(&Tab, &str)> = vec![
        (&alice, "hi bob! two tabs, one room"),
        (
            &bob,
            "hey alice, I see you. Same messages, same order, in both tabs.",
        ),
        (&alice, long),
    ];
    let mut expected: Vec<(String, String)> = Vec::new();
    for (i, (tab, text)) in conversation.iter().enumerate() {
        tab.say(text).await;
        expected.push((tab.name.to_string(), text.to_string()));
        for t in [&alice, &bob] {
            t.wait_count(expected.len()).await;
        }
        // The wire format is plain text with the nickname in front.
        assert_eq!(
            plain_next_text(&mut plain).await,
            format!("{}: {text}", tab.name)
        );
        if i == 0 {
            plain
                .send(Message::text("hello from a plain WebSocket client"))
                .await
                .expect("plain send");
            expected.push((
                "(no name)".into(),
                "hello from a plain WebSocket client".into(),
            ));
            assert_eq!(
                plain_next_text(&mut plain).await,
                "hello from a plain WebSocket client"
            );
            // Binary reaches hubbub.v1 clients as base64; the page says
            // what it is rather than showing bytes.
            plain
                .send(Message::binary(vec![0u8, 1, 2]))
                .await
                .expect("plain send");
            expected.push(("(no name)".into(), "[binary, 3 bytes]".into()));
            for t in [&alice, &bob] {
                t.wait_count(expected.len()).await;
            }
        }
    }
    bob.say("nice. stop the server and watch both tabs come back")
        .await;
    expected.push((
        "bob".into(),
        "nice. stop the server and watch both tabs come back".into(),
    ));
    plain_next_text(&mut plain).await;
    for t in [&alice, &bob] {
        t.wait_count(expected.len()).await;
    }
    let (seen_a, seen_b) = (alice.messages().await, bob.messages().await);
    assert_eq!(strip(&seen_a), expected, "alice's tab");
    assert_eq!(
        strip(&seen_b),
        expected,
        "bob's tab: same messages, same order"
    );
    // Own messages are marked, in each tab its own.
    for (tab, seen) in [(&alice, &seen_a), (&bob, &seen_b)] {
        for m in seen.iter() {
            assert_eq!(
                m.own,
                m.nick == tab.name,
                "[{}] own flag of {m:?}",
                tab.name
            );
        }
        assert_eq!(
            tab.js("return document.activeElement.id", vec![]).await,
            "text",
            "[{}] the message box keeps focus",
            tab.name
        );
        // Timestamps (the server's, shown in local time) on every message.
        let stamped = tab
            .js(
                "return Array.from(document.querySelectorAll('#log li[data-kind=chat] time'))\
                 .every(t => Math.abs(Date.parse(t.dateTime) - Date.now()) < 120000 \
                             && /\\d/.test(t.textContent))",
                vec![],
            )
            .await;
        assert_eq!(stamped, true, "[{}] timestamps", tab.name);
        // The long message wraps and nothing overflows sideways.
        let fits = tab
            .js(
                "const log = document.getElementById('log'); \
                 return document.documentElement.scrollWidth <= innerWidth \
                   && log.scrollWidth <= log.clientWidth \
                   && Array.from(log.children).every(li => \
                        li.getBoundingClientRect().right <= log.getBoundingClientRect().right)",
                vec![],
            )
            .await;
        assert_eq!(fits, true, "[{}] no horizontal overflow", tab.name);
    }

    // Mid-conversation screenshot of both tabs.
    let (shot_a, shot_b) = (alice.screenshot().await, bob.screenshot().await);
    let png = side_by_side(
        &alice.c,
        [
            (&shot_a, "Tab 1: alice (light theme)"),
            (&shot_b, "Tab 2: bob (dark theme)"),
        ],
    )
    .await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(out.join("two-tabs.png"), &png).expect("write screenshot");
    std::fs::write(out.join("tab-alice.png"), &shot_a).expect("write screenshot");
    std::fs::write(out.join("tab-bob.png"), &shot_b).expect("write screenshot");
    if std::env::var_os("HUBBUB_UPDATE_SCREENSHOT").is_some_and(|v| v == "1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).expect("docs/");
        std::fs::write(docs.join("screenshot.png"), &png).expect("docs/screenshot.png");
    }

    // HTML is shown as text and never runs: alert() would leave a dialog open
    // and fail every later WebDriver command; the others would set __pwned.
    let payloads = [
        (&alice, "<img src=x onerror=alert(1)>"),
        (
            &bob,
            "<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>",
        ),
    ];
    for (tab, text) in payloads {
        tab.say(text).await;
        expected.push((tab.name.to_string(), text.to_string()));
        plain_next_text(&mut plain).await;
    }
    let bare = "<b>bold?</b><svg onload=\"window.__pwned=3\"></svg>";
    plain.send(Message::text(bare)).await.expect("plain send");
    expected.push(("(no name)".into(), bare.into()));
    plain_next_text(&mut plain).await;
    for t in [&alice, &bob] {
        t.wait_count(expected.len()).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for tab in [&alice, &bob] {
        assert_eq!(strip(&tab.messages().await), expected, "[{}]", tab.name);
        assert_no_markup(tab).await;
    }

    // A message over the server's limit is refused in the page, with a note,
    // and the tab stays connected. "é" is two bytes in UTF-8: the page counts
    // bytes, not characters (1,003 characters, 2,001 bytes with "bob: ").
    let too_big = "é".repeat((MAX_MESSAGE_BYTES - "bob: ".len()) / 2 + 1);
    assert_eq!(
        format!("bob: {too_big}").len(),
        MAX_MESSAGE_BYTES + 1,
        "one byte over"
    );
    bob.paste_and_send(&too_big).await;
    bob.wait(
        "the too-big note",
        SHOW_UP,
        "const n = document.getElementById('note'); return !n.hidden && n.dataset.reason === 'too-big'",
    )
    .await;
    std::fs::write(out.join("too-big-bob.png"), bob.screenshot().await).expect("write");
    let note = bob
        .js(
            "return document.getElementById('note').textContent.replace(/[^0-9a-z ]/gi, '')",
            vec![],
        )
        .await;
    let note = note.as_str().unwrap();
    assert!(
        note.contains("2001 bytes") && note.contains("at most 2000 bytes"),
        "note says how big and what the limit is: {note}"
    );
    let kept = bob
        .js(
            "return [document.getElementById('text').value.length, \
             document.getElementById('bytes').classList.contains('over')]",
            vec![],
        )
        .await;
    assert_eq!(
        kept,
        json!([too_big.chars().count(), true]),
        "text kept, counter red"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for tab in [&alice, &bob] {
        assert_eq!(
            tab.state().await,
            "connected",
            "[{}] still connected",
            tab.name
        );
        assert_eq!(
            tab.messages().await.len(),
            expected.len(),
            "[{}] nothing sent",
            tab.name
        );
    }
    // Exactly at the limit goes through.
    let at_limit = format!(
        "{}x",
        "é".repeat((MAX_MESSAGE_BYTES - "bob: ".len() - 1) / 2)
    );
    assert_eq!(format!("bob: {at_limit}").len(), MAX_MESSAGE_BYTES);
    bob.paste_and_send(&at_limit).await;
    expected.push(("bob".into(), at_limit.clone()));
    assert_eq!(
        plain_next_text(&mut plain).await,
        format!("bob: {at_limit}")
    );
    for t in [&alice, &bob] {
        t.wait_count(expected.len()).await;
    }
    assert_eq!(
        bob.js("return document.getElementById('note').hidden", vec![])
            .await,
        true,
        "note gone once a message fits"
    );
    assert_eq!(bob.state().await, "connected");

    // Autoscroll: a tab scrolled up stays where it is and offers a jump to
    // the new messages; a tab at the bottom follows them.
    let overflowing = alice
        .js(
            "const l = document.getElementById('log'); l.scrollTop = 0; \
             return l.scrollHeight > l.clientHeight + 100",
            vec![],
        )
        .await;
    assert_eq!(overflowing, true, "enough messages to scroll");
    tokio::time::sleep(Duration::from_millis(200)).await;
    plain
        .send(Message::text("anyone scrolled up?"))
        .await
        .expect("plain send");
    expected.push(("(no name)".into(), "anyone scrolled up?".into()));
    plain_next_text(&mut plain).await;
    for t in [&alice, &bob] {
        t.wait_count(expected.len()).await;
    }
    let at_bottom = "const l = document.getElementById('log'); \
                     return l.scrollHeight - l.scrollTop - l.clientHeight < 60";
    let scroll_a = alice
        .js(
            "const l = document.getElementById('log'); \
             return [l.scrollTop, document.getElementById('jump').hidden]",
            vec![],
        )
        .await;
    assert_eq!(
        scroll_a,
        json!([0, false]),
        "alice stays scrolled up, jump offered"
    );
    bob.wait("bob follows new messages", SHOW_UP, at_bottom)
        .await;
    alice
        .c
        .find(Locator::Css("#jump"))
        .await
        .expect("#jump")
        .click()
        .await
        .expect("click jump");
    alice
        .wait("alice jumped to the newest", SHOW_UP, at_bottom)
        .await;

    // Bob's connection is cut: his browser goes offline and the page's
    // socket is closed under it. While he is away alice sends five
    // messages and he types one, which waits. Back online, his tab resumes
    // from the last offset it showed: the five arrive once each, in order,
    // nothing is said to be missing, and his waiting message goes out after
    // them.
    bob.set_offline(true).await;
    assert_eq!(
        bob.close_sockets().await,
        1,
        "bob's page had one open socket"
    );
    bob.wait_state("offline", SHOW_UP).await;
    // alice and the plain client are left.
    alice.wait_online(2).await;
    let missed: Vec<String> = (1..=5)
        .map(|i| format!("missed message {i} of 5, while bob was away"))
        .collect();
    for text in &missed {
        alice.say(text).await;
        expected.push(("alice".into(), text.clone()));
        assert_eq!(plain_next_text(&mut plain).await, format!("alice: {text}"));
    }
    alice.wait_count(expected.len()).await;
    let away = "typed while my connection was cut";
    bob.say(away).await;
    bob.wait(
        "bob's message waiting",
        SHOW_UP,
        "return !document.getElementById('outbox-box').hidden \
           && document.querySelectorAll('#outbox li').length === 1",
    )
    .await;
    let before = bob.messages().await.len();
    assert_eq!(before, expected.len() - missed.len(), "bob saw none yet");
    let sys_before = bob.sys_lines().await.len();
    bob.set_offline(false).await;
    bob.wait_state("connected", RECONNECT).await;
    expected.push(("bob".into(), away.into()));
    assert_eq!(plain_next_text(&mut plain).await, format!("bob: {away}"));
    for t in [&alice, &bob] {
        t.wait_count(expected.len()).await;
        t.wait_online(3).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for tab in [&alice, &bob] {
        assert_eq!(
            strip(&tab.messages().await),
            expected,
            "[{}] after bob's resume: all five once, in order, then bob's",
            tab.name
        );
    }
    let resumed = bob.sys_lines().await.split_off(sys_before);
    assert!(
        resumed
            .iter()
            .any(|(text, _)| text.starts_with("Reconnected. 5 messages")),
        "bob's tab says what it missed follows: {resumed:?}"
    );
    assert!(
        resumed.iter().all(
            |(text, note)| note != "missing" && !text.to_lowercase().contains("may be missing")
        ),
        "nothing is said to be missing: {resumed:?}"
    );
    assert_eq!(
        bob.js(
            "return document.getElementById('outbox-box').hidden",
            vec![]
        )
        .await,
        true,
        "bob's outbox emptied"
    );
    std::fs::write(out.join("resumed-bob.png"), bob.screenshot().await).expect("write");

    // A tab opened later (carol, a third person) shows the room's history:
    // everything so far, in order, none of it hers.
    let carol = driver.tab("carol", false).await;
    carol.c.goto(&page_url).await.expect("open the page");
    carol.wait_state("connected", SHOW_UP).await;
    carol.wait_count(expected.len()).await;
    let history = carol.messages().await;
    assert_eq!(strip(&history), expected, "[carol] the history");
    assert!(history.iter().all(|m| !m.own), "[carol] none of it hers");
    assert_no_markup(&carol).await;
    // alice, bob, carol and the plain client.
    for tab in [&alice, &bob, &carol] {
        tab.wait_online(4).await;
    }
    carol.set_nick("carol").await;

    // Another room: carol types a name that is not one (refused in the
    // page), then a real one with letters of two scripts, and goes there.
    let lobby_url = carol.c.current_url().await.expect("url").to_string();
    let room_field = carol.c.find(Locator::Css("#room")).await.expect("#room");
    room_field
        .send_keys(&format!("no spaces please{ENTER}"))
        .await
        .expect("type a room");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = carol
        .js(
            "const r = document.getElementById('room'); \
             return [location.href, r.validity.valid, r.validationMessage]",
            vec![],
        )
        .await;
    assert_eq!(refused[0], json!(lobby_url), "an invalid name goes nowhere");
    assert_eq!(refused[1], false, "the field says the name is invalid");
    assert!(
        refused[2].as_str().unwrap().contains("letters"),
        "and why: {refused}"
    );
    room_field
        .send_keys(&format!("{SELECT_ALL}{ROOM}{ENTER}"))
        .await
        .expect("type a room");
    carol
        .wait(
            "carol in the other room",
            SHOW_UP,
            &format!("return location.pathname === '/rooms/{ROOM_PATH}'"),
        )
        .await;
    carol.wait_state("connected", SHOW_UP).await;
    assert_eq!(carol.room_shown().await, ROOM, "[carol] room name");
    carol.wait_online(1).await;
    assert_eq!(carol.messages().await, vec![], "a new room has no history");
    for tab in [&alice, &bob] {
        tab.wait_online(3).await;
    }
    // Each room hears only its own: carol and a raw client in hers, alice
    // in the lobby.
    let mut plain_room = plain_client(server.ws, &format!("/rooms/{ROOM_PATH}")).await;
    let in_room = "only for this room";
    carol.say(in_room).await;
    assert_eq!(
        plain_next_text(&mut plain_room).await,
        format!("carol: {in_room}")
    );
    let in_lobby = "only for the lobby";
    alice.say(in_lobby).await;
    expected.push(("alice".into(), in_lobby.into()));
    assert_eq!(
        plain_next_text(&mut plain).await,
        format!("alice: {in_lobby}")
    );
    for t in [&alice, &bob] {
        t.wait_count(expected.len()).await;
    }
    carol.wait_count(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for tab in [&alice, &bob] {
        assert_eq!(
            strip(&tab.messages().await),
            expected,
            "[{}] nothing from the other room",
            tab.name
        );
    }
    assert_eq!(
        strip(&carol.messages().await),
        vec![("carol".to_string(), in_room.to_string())],
        "[carol] nothing from the lobby"
    );
    std::fs::write(out.join("room-carol.png"), carol.screenshot().await).expect("write");
    // Back to the lobby with the browser's back button: the page comes back
    // from the back/forward cache and resumes (or, if the browser did not
    // keep it, loads afresh with the history); either way it shows the
    // lobby's messages, the one sent while carol was away included, once.
    carol.c.back().await.expect("back");
    carol
        .wait(
            "carol back in the lobby",
            SHOW_UP,
            "return location.pathname === '/'",
        )
        .await;
    carol.wait_state("connected", SHOW_UP).await;
    assert_eq!(carol.room_shown().await, "lobby", "[carol] room name");
    carol.wait_count(expected.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        strip(&carol.messages().await),
        expected,
        "[carol] back in the lobby"
    );
    let lines = carol.sys_lines().await;
    assert!(
        lines.iter().all(
            |(text, note)| note != "missing" && !text.to_lowercase().contains("may be missing")
        ),
        "[carol] nothing is said to be missing: {lines:?}"
    );
    for tab in [&alice, &bob, &carol] {
        tab.wait_online(4).await;
    }
    carol.c.close().await.expect("close browser");
    drop(plain_room);
    for tab in [&alice, &bob] {
        tab.wait_online(3).await;
    }

    // Stop the server: both tabs show they are reconnecting, and a message
    // typed meanwhile waits, visibly, instead of being lost.
    let (http_port, ws_port) = (server.http.port(), server.ws.port());
    server.stop().await;
    for tab in [&alice, &bob] {
        tab.wait_state("reconnecting", SHOW_UP).await;
        tab.wait(
            "a countdown",
            SHOW_UP,
            "return /^reconnecting in [0-9]+ s$/.test(document.getElementById('status').textContent)",
        )
        .await;
        tab.wait(
            "the disconnect line",
            SHOW_UP,
            "return Array.from(document.querySelectorAll('#log li[data-kind=sys]'))\
             .some(li => li.textContent.includes('restarting'))",
        )
        .await;
    }
    let queued = "typed while the server was down";
    alice.say(queued).await;
    alice
        .wait(
            "the queued message",
            SHOW_UP,
            "const box = document.getElementById('outbox-box'); \
             return !box.hidden && document.querySelectorAll('#outbox li').length === 1 \
               && document.querySelector('#outbox li').textContent.includes('typed while')",
        )
        .await;
    assert_eq!(alice.messages().await.len(), expected.len(), "not sent yet");
    std::fs::write(out.join("reconnecting-alice.png"), alice.screenshot().await).expect("write");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Restart on the same ports: both tabs come back by themselves. The
    // room's history started over (a new epoch), so each says that messages
    // may be missing. The queued message goes out once alice's tab is back;
    // bob's tab gets it live or from the new history, whichever comes first,
    // and once.
    let server = Running::start(hubbub::Config {
        http_port,
        ws_port,
        ..config
    })
    .await;
    for tab in [&alice, &bob] {
        tab.wait_state("connected", RECONNECT).await;
    }
    alice
        .wait(
            "the queued message delivered",
            SHOW_UP,
            "const box = document.getElementById('outbox-box'); \
             const last = Array.from(document.querySelectorAll('#log li[data-kind=chat]')).pop(); \
             return box.hidden && last.dataset.own === 'true' \
               && last.querySelector('.body').textContent === 'typed while the server was down'",
        )
        .await;
    expected.push(("alice".into(), queued.into()));
    bob.wait_count(expected.len()).await;
    bob.say("and we're back").await;
    expected.push(("bob".into(), "and we're back".into()));
    for tab in [&alice, &bob] {
        tab.wait(
            "the first message after the restart",
            SHOW_UP,
            "const last = Array.from(document.querySelectorAll('#log li[data-kind=chat]')).pop(); \
             return last.querySelector('.body').textContent === \"and we're back\"",
        )
        .await;
        let seen = tab.messages().await;
        assert_eq!(strip(&seen), expected, "[{}] after the restart", tab.name);
        assert_eq!(seen.last().unwrap().own, tab.name == "bob");
        let missing = tab
            .sys_lines()
            .await
            .into_iter()
            .filter(|(text, note)| {
                note == "missing"
                    && text.starts_with("Reconnected.")
                    && text.to_lowercase().contains("some messages may be missing")
            })
            .count();
        assert_eq!(
            missing, 1,
            "[{}] says once that messages may be missing",
            tab.name
        );
    }
    let seen_a = alice.messages().await;
    assert_eq!(
        seen_a[seen_a.len() - 2].body,
        queued,
        "alice's queued message went out before bob's"
    );

    // Bob's connection is cut again, and more is sent meanwhile than the
    // room keeps: his tab cannot get everything it missed, says so, and
    // shows the recent history, each message once.
    assert!(
        expected.len() < HISTORY,
        "the later tab got the whole history"
    );
    let shown_before = strip(&bob.messages().await);
    bob.set_offline(true).await;
    assert_eq!(
        bob.close_sockets().await,
        1,
        "bob's page had one open socket"
    );
    bob.wait_state("offline", SHOW_UP).await;
    let mut plain = plain_client(server.ws, "/").await;
    let flood: Vec<String> = (1..=HISTORY + 5).map(|i| format!("flood {i}")).collect();
    for text in &flood {
        plain
            .send(Message::text(text.as_str()))
            .await
            .expect("plain send");
    }
    for text in &flood {
        assert_eq!(&plain_next_text(&mut plain).await, text);
    }
    alice.wait_count(expected.len() + flood.len()).await;
    let sys_before = bob.sys_lines().await.len();
    bob.set_offline(false).await;
    bob.wait_state("connected", RECONNECT).await;
    let mut want = shown_before.clone();
    want.extend(
        flood[5..]
            .iter()
            .map(|t| ("(no name)".to_string(), t.clone())),
    );
    bob.wait_count(want.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        strip(&bob.messages().await),
        want,
        "[bob] what he had, then the most recent {HISTORY}"
    );
    let lines = bob.sys_lines().await.split_off(sys_before);
    assert_eq!(
        lines
            .iter()
            .filter(|(text, note)| note == "missing"
                && text.to_lowercase().contains("some messages may be missing"))
            .count(),
        1,
        "[bob] says that messages may be missing: {lines:?}"
    );
    std::fs::write(out.join("gap-bob.png"), bob.screenshot().await).expect("write");

    // Phone width: nothing sticks out sideways at 360 px.
    set_viewport(&bob.c, 360, 640).await;
    bob.wait(
        "the newest message in view at phone width",
        SHOW_UP,
        "const l = document.getElementById('log').getBoundingClientRect(); \
         const m = document.querySelector('#log li:last-child').getBoundingClientRect(); \
         return m.bottom <= l.bottom + 1 && m.top >= l.top",
    )
    .await;
    let fits = bob
        .js(
            "return [innerWidth, document.documentElement.scrollWidth <= innerWidth, \
             Array.from(document.querySelectorAll('header *, footer *')) \
               .every(e => e.getBoundingClientRect().right <= innerWidth + 0.5)]",
            vec![],
        )
        .await;
    assert_eq!(fits[1], true, "no horizontal scroll at phone width: {fits}");
    assert_eq!(
        fits[2], true,
        "header and composer fit at phone width: {fits}"
    );
    std::fs::write(out.join("phone-bob.png"), bob.screenshot().await).expect("write");

    // And on a desktop-sized window, for a look at the wide layout.
    set_viewport(&alice.c, 1100, 720).await;
    std::fs::write(out.join("desktop-alice.png"), alice.screenshot().await).expect("write");

    for tab in [alice, bob] {
        tab.c.close().await.expect("close browser");
    }
    server.stop().await;
}

/// Nick and body of each message, for comparing with what was sent.
fn strip(v: &[Shown]) -> Vec<(String, String)> {
    v.iter().map(|m| (m.nick.clone(), m.body.clone())).collect()
}

/// No element from a message's HTML made it into the list, and no script
/// from one ran.
async fn assert_no_markup(tab: &Tab) {
    let clean = tab
        .js(
            "return [document.querySelectorAll('#log img, #log script, #log svg, #log b').length, \
             typeof window.__pwned]",
            vec![],
        )
        .await;
    assert_eq!(
        clean,
        json!([0, "undefined"]),
        "[{}] no markup, no script",
        tab.name
    );
}

//! TLS on both listeners, with certificates made at test time: wss chat end
//! to end, the page over https pointing at wss, a reload (new connections
//! get the new pair, open ones keep theirs, a failed reload changes
//! nothing), and every kind of unusable certificate or key.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hubbub::{Config, Server};
use rustls::crypto::ring;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A directory of its own under the system temp directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("hubbub-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("temp dir");
        Dir(path)
    }
    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write");
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for localhost: (cert PEM, key PEM, DER).
fn certificate() -> (String, String, CertificateDer<'static>) {
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    (
        made.cert.pem(),
        made.signing_key.serialize_pem(),
        made.cert.der().clone(),
    )
}

fn tls_config(cert: &Path, key: &Path) -> Config {
    Config {
        tls_cert: Some(cert.to_path_buf()),
        tls_key: Some(key.to_path_buf()),
        ..Config::ephemeral()
    }
}

/// A client that trusts exactly `root`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    root: &CertificateDer<'static>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = RootCertStore::empty();
    roots.add(root.clone()).expect("root");
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("name");
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

async fn wss(
    addr: std::net::SocketAddr,
    root: &CertificateDer<'static>,
) -> WebSocketStream<TlsStream<TcpStream>> {
    let tls = tls_connect(addr, root).await.expect("TLS handshake");
    let url = format!("wss://localhost:{}/", addr.port());
    tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket handshake over TLS")
        .0
}

async fn chat(
    a: &mut WebSocketStream<TlsStream<TcpStream>>,
    b: &mut WebSocketStream<TlsStream<TcpStream>>,
    text: &str,
) {
    a.send(Message::text(text)).await.expect("send");
    for ws in [a, b] {
        loop {
            match tokio::time::timeout(WAIT, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    assert_eq!(t.as_str(), text);
                    break;
                }
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected {text:?}, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn wss_chat_and_the_page_over_https() {
    let dir = Dir::new();
    let (cert, key, der) = certificate();
    let config = tls_config(&dir.file("cert.pem", &cert), &dir.file("key.pem", &key));
    let server = TestServer::start(config).await;
    let mut a = wss(server.ws, &der).await;
    let mut b = wss(server.ws, &der).await;
    chat(&mut a, &mut b, "over TLS").await;
    // The page, over https, points the browser at wss.
    let mut page = tls_connect(server.http, &der)
        .await
        .expect("TLS to the page");
    page.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut body = Vec::new();
    let _ = tokio::time::timeout(WAIT, page.read_to_end(&mut body)).await;
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.starts_with("HTTP/1.1 200"),
        "{}",
        body.lines().next().unwrap_or("")
    );
    assert!(
        body.contains(&format!("wss://localhost:{}/", server.ws.port())),
        "no wss URL in the page"
    );
    // Plain WebSocket on the TLS port gets nowhere.
    assert!(connect(server.ws, None).await.is_err());
}

#[tokio::test]
async fn a_reload_serves_the_new_pair_and_a_failed_one_keeps_the_old() {
    let dir = Dir::new();
    let (cert_a, key_a, der_a) = certificate();
    let cert = dir.file("cert.pem", &cert_a);
    let key = dir.file("key.pem", &key_a);
    let server = Server::bind(tls_config(&cert, &key)).await.expect("bind");
    let ws = server.ws_addr();
    let tls = server.tls().expect("TLS is on");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let mut old_a = wss(ws, &der_a).await;
    let mut old_b = wss(ws, &der_a).await;

    let (cert_b, key_b, der_b) = certificate();
    std::fs::write(&cert, &cert_b).expect("write");
    std::fs::write(&key, &key_b).expect("write");
    tls.reload().expect("reload");
    // New connections get the new pair; the old one is not trusted by it.
    let _ = wss(ws, &der_b).await;
    assert!(
        tls_connect(ws, &der_a).await.is_err(),
        "the old pair is still served"
    );
    // Connections made before the reload keep chatting.
    chat(&mut old_a, &mut old_b, "still here").await;

    // A reload that fails (garbage, or a key of another certificate)
    // changes nothing.
    std::fs::write(&cert, "not a certificate").expect("write");
    assert!(tls.reload().is_err());
    std::fs::write(&cert, &cert_b).expect("write");
    std::fs::write(&key, &key_a).expect("write");
    assert!(tls.reload().is_err());
    let _ = wss(ws, &der_b).await;
    let _ = stop.send(());
    running.await.expect("join").expect("clean stop");
}

#[tokio::test]
async fn unusable_certificates_and_keys_are_refused_naming_the_file() {
    let dir = Dir::new();
    let (cert, key, _) = certificate();
    let (_, other_key, _) = certificate();
    let good_cert = dir.file("cert.pem", &cert);
    let good_key = dir.file("key.pem", &key);
    let garbage = dir.file("garbage.pem", "-----BEGIN NONSENSE-----\nxyz\n");
    let foreign_key = dir.file("other-key.pem", &other_key);
    let missing = dir.0.join("missing.pem");
    for (cert, key, names) in [
        (&missing, &good_key, "missing.pem"),
        (&good_cert, &missing, "missing.pem"),
        (&garbage, &good_key, "garbage.pem"),
        (&good_cert, &garbage, "garbage.pem"),
        (&good_key, &good_key, "key.pem"),
        (&good_cert, &foreign_key, "other-key.pem"),
    ] {
        let result = Server::bind(tls_config(cert, key)).await;
        let Err(e) = result else {
            panic!("{} with {} was accepted", cert.display(), key.display());
        };
        assert!(matches!(e, hubbub::Error::Tls(_)), "{e}");
        assert!(e.to_string().contains(names), "{e}");
    }
}

/// The binary: an unusable pair is a configuration error (exit 2, naming
/// the file), half a pair too, and SIGHUP reloads the pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_bad_pairs_and_reloads_on_sighup() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_hubbub");
    let dir = Dir::new();
    let (cert_a, key_a, der_a) = certificate();
    let cert = dir.file("cert.pem", &cert_a);
    let key = dir.file("key.pem", &key_a);
    let missing = dir.0.join("nowhere.pem");
    let run = |args: &[&str]| {
        Command::new(bin)
            .args(args)
            .env_remove("HUBBUB_CONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("run hubbub")
    };
    let cert_arg = cert.display().to_string();
    let key_arg = key.display().to_string();
    let missing_arg = missing.display().to_string();
    // (arguments, what the one-line error must name)
    for (args, names) in [
        (
            vec!["--tls-cert", &missing_arg, "--tls-key", &key_arg],
            "nowhere.pem",
        ),
        (vec!["--tls-cert", &cert_arg], "tls_key"),
    ] {
        let out = run(&[args, vec!["--http-port", "0", "--ws-port", "0"]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(names), "{stderr}");
    }

    let mut child = Command::new(bin)
        .args([
            "--tls-cert",
            &cert_arg,
            "--tls-key",
            &key_arg,
            "--http-port",
            "0",
            "--ws-port",
            "0",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let started = line_with(&mut lines, "websocket=").await;
    let port: u16 = started
        .split("websocket=wss://")
        .nth(1)
        .and_then(|rest| rest.split(['/', ' ']).next())
        .and_then(|hostport| hostport.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no wss URL in {started:?}"));
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    // The container health check speaks TLS to it, trusting exactly the
    // configured certificate (which names localhost, not 127.0.0.1).
    let http_port = started
        .split("page=https://")
        .nth(1)
        .and_then(|rest| rest.split(['/', ' ']).next())
        .and_then(|hostport| hostport.rsplit(':').next())
        .unwrap_or_else(|| panic!("no https page URL in {started:?}"))
        .to_string();
    let check = run(&[
        "healthcheck",
        "--tls-cert",
        &cert_arg,
        "--tls-key",
        &key_arg,
        "--http-port",
        &http_port,
    ]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut a = wss(addr, &der_a).await;
    let mut b = wss(addr, &der_a).await;
    let (cert_b, key_b, der_b) = certificate();
    std::fs::write(&cert, &cert_b).expect("write");
    std::fs::write(&key, &key_b).expect("write");
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGHUP);
    }
    line_with(&mut lines, "reloaded").await;
    let _ = wss(addr, &der_b).await;
    chat(&mut a, &mut b, "kept across the reload").await;
    let _ = child.kill();
    let _ = child.wait();
}

/// The next log line that contains `needle`.
async fn line_with(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needle: &str,
) -> String {
    loop {
        let line = tokio::time::timeout(WAIT, lines.recv())
            .await
            .expect("log line in time")
            .expect("hubbub still running");
        if line.contains(needle) {
            return line;
        }
    }
}

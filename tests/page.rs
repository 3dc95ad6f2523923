//! The chat page as served over HTTP, checked without a browser: where it
//! tells the browser to connect, the Content-Security-Policy that lets only
//! its own inline code run (the hashes must match what is served), and that
//! it loads nothing from anywhere else. `tests/browser.rs` checks the same
//! page in a real browser.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use common::TestServer;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{self, HeaderMap};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(10);

struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Response {
    fn header(&self, name: header::HeaderName) -> &str {
        self.headers
            .get(&name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .expect("ASCII header")
    }
}

/// `GET path` with an explicit `Host` header, over a fresh loopback
/// connection.
async fn get(addr: SocketAddr, host: &str, path: &str) -> Response {
    tokio::time::timeout(LIMIT, async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let request = Request::get(path)
            .header(header::HOST, host)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.expect("request");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Response {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8(body.to_vec()).expect("UTF-8 page"),
        }
    })
    .await
    .expect("GET answered in time")
}

/// The content of the `<meta name="..." content="...">` tag.
fn meta<'a>(html: &'a str, name: &str) -> &'a str {
    let tag = format!("<meta name=\"{name}\" content=\"");
    let start = html.find(&tag).unwrap_or_else(|| panic!("no meta {name}")) + tag.len();
    let len = html[start..].find('"').expect("closing quote");
    &html[start..start + len]
}

/// The bodies of every `<tag>` element in the page, for recomputing hashes.
/// Written independently of the server's own scan on purpose.
fn inline_blocks(html: &str, tag: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lower = html.to_ascii_lowercase();
    let mut at = 0;
    while let Some(i) = lower[at..].find(&format!("<{tag}")) {
        let open = at + i;
        let gt = open + lower[open..].find('>').expect("tag end");
        let attrs = &lower[open + tag.len() + 1..gt];
        assert!(
            attrs.trim().is_empty(),
            "<{tag}{attrs}>: the page uses only plain inline blocks"
        );
        let close = gt + lower[gt..].find(&format!("</{tag}>")).expect("close tag");
        out.push(html[gt + 1..close].to_string());
        at = close;
    }
    out
}

fn sha256_source(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The source list of one CSP directive.
fn directive<'a>(csp: &'a str, name: &str) -> Vec<&'a str> {
    csp.split(';')
        .map(str::trim)
        .find_map(|d| {
            let mut words = d.split_whitespace();
            (words.next() == Some(name)).then(|| words.collect())
        })
        .unwrap_or_else(|| panic!("CSP has no {name}: {csp}"))
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn page_names_the_websocket_url_for_the_host_used() {
    let config = hubbub::Config {
        max_message_bytes: 12_345,
        ..hubbub::Config::ephemeral()
    };
    let server = TestServer::start(config).await;
    let (http_port, ws_port) = (server.http.port(), server.ws.port());

    for host in ["127.0.0.1", "localhost", "chat.lan"] {
        let r = get(server.http, &format!("{host}:{http_port}"), "/").await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.header(header::CONTENT_TYPE).starts_with("text/html"));
        let url = format!("ws://{host}:{ws_port}/");
        assert_eq!(meta(&r.body, "hubbub-ws-url"), url, "Host {host}");
        assert_eq!(meta(&r.body, "hubbub-ws-port"), ws_port.to_string());
        assert_eq!(meta(&r.body, "hubbub-max-message-bytes"), "12345");
        assert!(!r.body.contains("__HUBBUB_"), "a placeholder was left");
        let csp = r.header(header::CONTENT_SECURITY_POLICY);
        assert_eq!(
            directive(csp, "connect-src"),
            ["'self'", &format!("ws://{host}:{ws_port}")],
            "connect-src allows exactly the page's origin and its WebSocket"
        );
    }

    // A Host header that is not a plain host name is not echoed into the
    // page: the meta stays empty and the page builds the URL from location.
    let r = get(server.http, "x\"><b>y", "/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(meta(&r.body, "hubbub-ws-url"), "");
    assert!(!r.body.contains("<b>y"));
    server.shutdown().await.expect("server run");
}

#[tokio::test]
async fn csp_allows_exactly_the_inline_code_served() {
    let server = TestServer::start(hubbub::Config::ephemeral()).await;
    let host = format!("127.0.0.1:{}", server.http.port());
    let r = get(server.http, &host, "/").await;
    assert_eq!(r.header(header::X_CONTENT_TYPE_OPTIONS), "nosniff");

    let csp = r.header(header::CONTENT_SECURITY_POLICY);
    assert_eq!(directive(csp, "default-src"), ["'none'"]);
    let scripts = inline_blocks(&r.body, "script");
    let styles = inline_blocks(&r.body, "style");
    assert!(!scripts.is_empty() && !styles.is_empty());
    // The hashes are of what is served (after the per-request substitution),
    // so the browser accepts every block; nothing else is allowed.
    let want = |blocks: &[String]| sorted(blocks.iter().map(|b| sha256_source(b)).collect());
    let got = |name| sorted(directive(csp, name).iter().map(|s| s.to_string()).collect());
    assert_eq!(got("script-src"), want(&scripts), "script-src: {csp}");
    assert_eq!(got("style-src"), want(&styles), "style-src: {csp}");
    for bad in ["'unsafe-inline'", "'unsafe-eval'", "*", "http:", "https:"] {
        assert!(
            !csp.split([' ', ';']).any(|w| w == bad),
            "CSP allows {bad}: {csp}"
        );
    }
    // The substituted values live only in meta tags, not in the code.
    for block in scripts.iter().chain(&styles) {
        assert!(!block.contains("__HUBBUB_"));
    }
    server.shutdown().await.expect("server run");
}

#[tokio::test]
async fn page_is_self_contained() {
    let server = TestServer::start(hubbub::Config::ephemeral()).await;
    let host = format!("127.0.0.1:{}", server.http.port());
    let body = get(server.http, &host, "/").await.body;
    let lower = body.to_ascii_lowercase();

    // Only the markup (outside script and style) can load things or carry
    // attributes the CSP would block.
    let mut markup = lower.clone();
    for tag in ["script", "style"] {
        for block in inline_blocks(&lower, tag) {
            markup = markup.replacen(&block, "", 1);
        }
    }
    for needle in [
        " src=", " href=", "<link", "<iframe", "<object", "<embed", "<img",
    ] {
        assert!(!markup.contains(needle), "page markup has {needle}");
    }
    // The CSP would block inline handlers and style attributes, so the page
    // must not rely on them.
    assert!(!markup.contains(" style="), "style attribute in the markup");
    let handler = markup
        .match_indices(" on")
        .map(|(i, _)| &markup[i + 1..])
        .find(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            rest[name.len()..].starts_with('=')
        });
    assert!(handler.is_none(), "inline event handler: {handler:?}");
    // No external fonts, stylesheets or scripts from the code either.
    for needle in [
        "@import",
        "url(",
        "http://",
        "https://",
        "fetch(",
        "importscripts",
    ] {
        assert!(!lower.contains(needle), "page mentions {needle}");
    }

    // What a person relies on, checked statically here and live in the
    // browser test.
    assert!(lower.contains("<meta name=\"viewport\""), "phone viewport");
    assert!(lower.contains("prefers-color-scheme: dark"), "dark theme");
    assert!(lower.contains("aria-live=\"polite\""), "live region");
    assert!(lower.contains("<label for=\"text\""), "message label");
    assert!(lower.contains("<label for=\"nick\""), "nickname label");
    assert!(
        !lower.contains("innerhtml"),
        "messages are rendered as text"
    );
    server.shutdown().await.expect("server run");
}

#[tokio::test]
async fn public_ws_url_overrides_the_host() {
    let url = "wss://chat.example.com/socket";
    let config = hubbub::Config {
        public_ws_url: Some(url.to_string()),
        ..hubbub::Config::ephemeral()
    };
    let server = TestServer::start(config).await;
    let r = get(
        server.http,
        &format!("127.0.0.1:{}", server.http.port()),
        "/",
    )
    .await;
    assert_eq!(meta(&r.body, "hubbub-ws-url"), url);
    let csp = r.header(header::CONTENT_SECURITY_POLICY);
    assert_eq!(
        directive(csp, "connect-src"),
        ["'self'", "wss://chat.example.com"]
    );
    server.shutdown().await.expect("server run");
}

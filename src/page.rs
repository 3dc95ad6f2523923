//! The chat page and the security headers that go with it.
//!
//! The page is one self-contained HTML file, built into the binary (or read
//! from `static_dir` at start-up). The server fills in three `<meta>` values
//! per request: the WebSocket URL to connect to, the WebSocket port, and the
//! largest message the server accepts. Only meta tags change, never the inline
//! script or style, so their hashes can be computed once and a strict
//! Content-Security-Policy can allow exactly them and nothing else.

use std::path::Path;

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::origin::strip_port;

/// The page built into the binary.
pub const BUILTIN_PAGE: &str = include_str!("../static/client.html");

const WS_URL: &str = "__HUBBUB_WS_URL__";
const WS_PORT: &str = "__HUBBUB_WS_PORT__";
const MAX_MESSAGE_BYTES: &str = "__HUBBUB_MAX_MESSAGE_BYTES__";

#[derive(Debug, thiserror::Error)]
#[error("cannot read the page {path}: {source}")]
pub struct PageError {
    path: String,
    source: std::io::Error,
}

/// The page template plus everything needed to render it for one request.
#[derive(Debug, Clone)]
pub struct Page {
    template: String,
    /// CSP source expressions for the inline scripts and styles.
    script_hashes: Vec<String>,
    style_hashes: Vec<String>,
    ws_port: u16,
    public_ws_url: Option<String>,
    max_message_bytes: usize,
    /// The WebSocket listener speaks TLS: the page connects with `wss://`.
    tls: bool,
}

impl Page {
    pub fn load(
        static_dir: Option<&Path>,
        ws_port: u16,
        public_ws_url: Option<String>,
        max_message_bytes: usize,
        tls: bool,
    ) -> Result<Page, PageError> {
        let template = match static_dir {
            None => BUILTIN_PAGE.to_string(),
            Some(dir) => {
                let path = dir.join("client.html");
                std::fs::read_to_string(&path).map_err(|source| PageError {
                    path: path.display().to_string(),
                    source,
                })?
            }
        };
        Ok(Page {
            script_hashes: inline_hashes(&template, "script"),
            style_hashes: inline_hashes(&template, "style"),
            template,
            ws_port,
            public_ws_url,
            max_message_bytes,
            tls,
        })
    }

    /// The WebSocket URL for a page requested with this `Host` header: the
    /// same host name the browser used, on the WebSocket port. `None` when
    /// the header is missing or not a plain host, in which case the page
    /// works it out from `location` itself.
    pub fn ws_url(&self, host_header: Option<&str>) -> Option<String> {
        if let Some(url) = &self.public_ws_url {
            return Some(url.clone());
        }
        let host = host_name(host_header?)?;
        let scheme = if self.tls { "wss" } else { "ws" };
        Some(format!("{scheme}://{host}:{}/", self.ws_port))
    }

    pub fn render(&self, host_header: Option<&str>) -> String {
        let url = self.ws_url(host_header).unwrap_or_default();
        self.template
            .replace(WS_URL, &escape_attr(&url))
            .replace(WS_PORT, &self.ws_port.to_string())
            .replace(MAX_MESSAGE_BYTES, &self.max_message_bytes.to_string())
    }

    /// A policy that lets only the page's own inline script and style run, and
    /// lets it connect only to its own origin and the WebSocket URL.
    pub fn content_security_policy(&self, host_header: Option<&str>) -> String {
        let mut connect = String::from("'self'");
        match self.ws_url(host_header) {
            Some(url) => {
                connect.push(' ');
                connect.push_str(origin_of(&url));
            }
            // Without a usable Host the page builds the URL from location;
            // allow any port on the page's own host name only via 'self'
            // plus the ws scheme form of it.
            None => connect.push_str(" ws: wss:"),
        }
        let list = |hashes: &[String]| {
            if hashes.is_empty() {
                "'none'".to_string()
            } else {
                hashes.join(" ")
            }
        };
        format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src {connect}; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            list(&self.script_hashes),
            list(&self.style_hashes),
        )
    }
}

/// Hashes of the contents of every inline `<tag>...</tag>` element.
fn inline_hashes(html: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(gt) = after.find('>') else { break };
        let attrs = &after[..gt];
        let body_and_rest = &after[gt + 1..];
        let Some(end) = body_and_rest.find(&close) else {
            break;
        };
        if !attrs.contains("src=") {
            let digest = Sha256::digest(&body_and_rest.as_bytes()[..end]);
            let b64 = base64::engine::general_purpose::STANDARD.encode(digest);
            out.push(format!("'sha256-{b64}'"));
        }
        rest = &body_and_rest[end + close.len()..];
    }
    out
}

/// The host part of a `Host` header, if it is a plain host name or address.
fn host_name(host_header: &str) -> Option<&str> {
    let host = strip_port(host_header);
    let ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    ok.then_some(host)
}

/// `ws://host:8081/path` -> `ws://host:8081`.
fn origin_of(url: &str) -> &str {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

fn escape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_url_follows_the_host_header() {
        let Ok(p) = Page::load(None, 9001, None, 100, false) else {
            panic!("the built-in page loads");
        };
        assert_eq!(
            p.ws_url(Some("chat.lan:8080")).as_deref(),
            Some("ws://chat.lan:9001/")
        );
        assert_eq!(
            p.ws_url(Some("[::1]:8080")).as_deref(),
            Some("ws://[::1]:9001/")
        );
        assert_eq!(p.ws_url(Some("evil\"><script>")), None);
        let Ok(p) = Page::load(
            None,
            9001,
            Some("wss://chat.example.com/ws".into()),
            100,
            false,
        ) else {
            panic!("the built-in page loads");
        };
        assert_eq!(
            p.ws_url(Some("x:1")).as_deref(),
            Some("wss://chat.example.com/ws")
        );
        assert!(p
            .content_security_policy(None)
            .contains("connect-src 'self' wss://chat.example.com;"));
    }

    #[test]
    fn hashes_cover_inline_blocks_only() {
        let html = "<style>a{}</style><script src=\"x.js\"></script><script>go()</script>";
        assert_eq!(inline_hashes(html, "script").len(), 1);
        assert_eq!(inline_hashes(html, "style").len(), 1);
        // sha256("go()") in base64
        let expected = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(b"go()"));
        assert_eq!(
            inline_hashes(html, "script")[0],
            format!("'sha256-{expected}'")
        );
    }

    #[test]
    fn builtin_page_has_the_placeholders() {
        for p in [WS_URL, WS_PORT, MAX_MESSAGE_BYTES] {
            assert!(BUILTIN_PAGE.contains(p), "{p} missing from client.html");
        }
    }
}

//! The `Origin` check made before a WebSocket upgrade.
//!
//! Browsers attach `Origin` to every WebSocket handshake and, unlike HTTP
//! requests, WebSocket connections are not covered by the same-origin policy.
//! Without this check any web page a user visits could open a socket to a
//! hubbub on their machine or network and chat as them.
//!
//! The page is served by the HTTP listener, so a legitimate browser origin is
//! `http://<host>:<http port>`: the same host the browser used for the
//! WebSocket URL, but the HTTP port, not the WebSocket one.

use std::net::IpAddr;

use crate::config::OriginPolicy;

/// What the check needs to know about the running server.
#[derive(Debug, Clone)]
pub struct OriginCheck {
    pub policy: OriginPolicy,
    /// The HTTP listener's real port (after binding port 0).
    pub http_port: u16,
    /// The address both listeners are bound to.
    pub bind_host: IpAddr,
}

impl OriginCheck {
    /// Decides whether a handshake may proceed. `host_header` is the request's
    /// `Host`, i.e. the host name the browser used to reach us.
    pub fn allows(&self, origin: Option<&str>, host_header: Option<&str>) -> bool {
        // Tools such as websocat, scripts and other servers send no Origin;
        // they are not a browser acting on a user's behalf.
        let Some(origin) = origin else {
            return true;
        };
        if self.policy == OriginPolicy::Any {
            return true;
        }
        // Anything that is not a plain http(s) origin ("null" from a
        // sandboxed frame or a file, garbage) matches no rule.
        let Some(origin) = normalise(origin) else {
            return false;
        };
        match &self.policy {
            OriginPolicy::Any => true,
            OriginPolicy::List(list) => list.contains(&origin),
            OriginPolicy::SameHost => self.is_own_origin(&origin, host_header),
        }
    }

    /// Whether the default policy may rely on the `Host` header. On a
    /// loopback bind it may not: a page on any site whose name is rebound
    /// to 127.0.0.1 (DNS rebinding) sends its own name as both Origin and
    /// Host, so only loopback names count as this server's own there.
    pub fn trusts_host_header(&self) -> bool {
        !self.bind_host.is_loopback()
    }

    fn is_own_origin(&self, origin: &str, host_header: Option<&str>) -> bool {
        let Some((host, port)) = split_origin(origin) else {
            return false;
        };
        if port != self.http_port {
            return false;
        }
        let ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        if !self.trusts_host_header() {
            return host == "localhost" || ip.is_some_and(|ip| ip.is_loopback());
        }
        if let Some(request_host) = host_header.map(strip_port) {
            if request_host.eq_ignore_ascii_case(host) {
                return true;
            }
        }
        ip.is_some_and(|ip| ip == self.bind_host || ip.is_loopback()) || host == "localhost"
    }
}

/// An origin in the one form both sides of a comparison use: lower case,
/// no trailing slash, no default port (`https://chat.example.com:443/` ->
/// `https://chat.example.com`). `None` for anything that is not an http or
/// https origin with a host and at most a port.
pub fn normalise(origin: &str) -> Option<String> {
    let lower = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://")?;
    if rest.is_empty()
        || rest
            .chars()
            .any(|c| matches!(c, '/' | '@' | '?' | '#' | '\\') || c.is_whitespace())
    {
        return None;
    }
    let (host, port) = split_origin(&lower)?;
    if host.is_empty() || host == "[]" {
        return None;
    }
    let default = if scheme == "https" { 443 } else { 80 };
    if port == default {
        Some(format!("{scheme}://{host}"))
    } else {
        Some(format!("{scheme}://{host}:{port}"))
    }
}

/// Splits `scheme://host[:port]` into host and port (default port by scheme).
fn split_origin(origin: &str) -> Option<(&str, u16)> {
    let (scheme, rest) = origin.split_once("://")?;
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    if rest.is_empty() || rest.contains('/') {
        return None;
    }
    // IPv6 literal: [::1]:8080
    if let Some(end) = rest.find(']') {
        let host = &rest[..=end];
        return match &rest[end + 1..] {
            "" => Some((host, default_port)),
            p => Some((host, p.strip_prefix(':')?.parse().ok()?)),
        };
    }
    match rest.rsplit_once(':') {
        Some((host, port)) => Some((host, port.parse().ok()?)),
        None => Some((rest, default_port)),
    }
}

/// `example.com:8081` -> `example.com`, `[::1]:8081` -> `[::1]`.
pub(crate) fn strip_port(host: &str) -> &str {
    let host = host.trim();
    if let Some(end) = host.find(']') {
        return &host[..=end];
    }
    match host.rsplit_once(':') {
        Some((h, _)) => h,
        None => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn same_host(bind: IpAddr) -> OriginCheck {
        OriginCheck {
            policy: OriginPolicy::SameHost,
            http_port: 8080,
            bind_host: bind,
        }
    }

    #[test]
    fn default_admits_the_page_origin_and_no_origin() {
        let c = same_host(IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(c.allows(None, Some("127.0.0.1:8081")));
        assert!(c.allows(Some("http://127.0.0.1:8080"), Some("127.0.0.1:8081")));
        assert!(c.allows(Some("http://localhost:8080"), Some("localhost:8081")));
        assert!(!c.allows(Some("http://127.0.0.1:8081"), Some("127.0.0.1:8081")));
        assert!(!c.allows(Some("http://evil.example"), Some("127.0.0.1:8081")));
        assert!(!c.allows(Some("null"), Some("127.0.0.1:8081")));
    }

    #[test]
    fn wildcard_bind_follows_the_host_header() {
        let c = same_host(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert!(c.allows(Some("http://chat.lan:8080"), Some("chat.lan:8081")));
        assert!(!c.allows(Some("http://evil.lan:8080"), Some("chat.lan:8081")));
    }

    #[test]
    fn a_rebound_name_is_not_this_server_on_a_loopback_bind() {
        let c = same_host(IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(!c.allows(Some("http://evil.example:8080"), Some("evil.example:8081")));
        assert!(c.allows(Some("http://[::1]:8080"), Some("[::1]:8081")));
    }

    #[test]
    fn default_ports_are_normalised_on_both_sides() {
        assert_eq!(
            normalise("HTTPS://Chat.Example.com:443/").as_deref(),
            Some("https://chat.example.com")
        );
        assert_eq!(
            normalise("http://chat.example.com:80").as_deref(),
            Some("http://chat.example.com")
        );
        assert_eq!(
            normalise("http://chat.example.com:8080").as_deref(),
            Some("http://chat.example.com:8080")
        );
        assert_eq!(normalise("null"), None);
        assert_eq!(normalise("http://a.b/path"), None);
        assert_eq!(normalise("ftp://a.b"), None);
        assert_eq!(normalise("http://"), None);
        let c = OriginCheck {
            policy: OriginPolicy::List(vec!["https://chat.example.com".into()]),
            http_port: 8080,
            bind_host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        assert!(c.allows(Some("https://chat.example.com"), None));
        assert!(c.allows(Some("https://chat.example.com:443"), None));
        assert!(!c.allows(Some("https://chat.example.com:8443"), None));
    }

    #[test]
    fn ipv6_origins_parse() {
        assert_eq!(split_origin("http://[::1]:8080"), Some(("[::1]", 8080)));
        assert_eq!(split_origin("https://a.b"), Some(("a.b", 443)));
        assert_eq!(strip_port("[::1]:8081"), "[::1]");
    }
}

//! Parsing one configuration value: what each kind of key accepts, and the
//! sane range of each number and duration.
//!
//! Every parser takes the raw value from any layer (a TOML value keeps its
//! type, a flag or environment variable is text) and says in its error what
//! it expected, so the caller only has to add where the value came from.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use super::{LogFormat, OriginPolicy};

/// A raw value from one layer, not yet checked.
#[derive(Debug, Clone)]
pub enum Raw {
    Text(String),
    Int(i64),
    Bool(bool),
    List(Vec<String>),
}

/// How one key's value is read: the parser, and the range it accepts for
/// the documentation.
pub trait Parse {
    type Out;
    fn parse(&self, raw: &Raw) -> Result<Self::Out, String>;
    /// The accepted range, for `--help` and the docs (numbers and durations).
    fn range(&self) -> Option<String> {
        None
    }
}

/// A key whose values have no range: any parse function.
pub struct Plain<F>(pub F);

impl<T, F: Fn(&Raw) -> Result<T, String>> Parse for Plain<F> {
    type Out = T;
    fn parse(&self, raw: &Raw) -> Result<T, String> {
        (self.0)(raw)
    }
}

/// A whole number from `min` to `max`.
pub struct Count {
    pub min: usize,
    pub max: usize,
}

impl Parse for Count {
    type Out = usize;
    fn parse(&self, raw: &Raw) -> Result<usize, String> {
        let n = parse_int(raw)?;
        match usize::try_from(n) {
            Ok(n) if (self.min..=self.max).contains(&n) => Ok(n),
            _ => Err(format!("must be {}, got {n}", self.range_text())),
        }
    }
    fn range(&self) -> Option<String> {
        Some(self.range_text())
    }
}

impl Count {
    fn range_text(&self) -> String {
        format!("from {} to {}", self.min, self.max)
    }
}

impl Count {
    /// The same range, with the value converted (it always fits: the range
    /// says so).
    pub fn map<T>(self, f: fn(usize) -> T) -> Mapped<T> {
        Mapped { count: self, f }
    }
}

/// A [`Count`] whose value is converted, for keys narrower than `usize`.
pub struct Mapped<T> {
    count: Count,
    f: fn(usize) -> T,
}

impl<T> Parse for Mapped<T> {
    type Out = T;
    fn parse(&self, raw: &Raw) -> Result<T, String> {
        self.count.parse(raw).map(self.f)
    }
    fn range(&self) -> Option<String> {
        self.count.range()
    }
}

/// A duration with a unit, from `min` to `max`.
pub struct Span {
    pub min: Duration,
    pub max: Duration,
}

impl Parse for Span {
    type Out = Duration;
    fn parse(&self, raw: &Raw) -> Result<Duration, String> {
        let d = parse_duration(raw)?;
        if d < self.min || d > self.max {
            return Err(format!(
                "must be {}, got {}",
                self.range_text(),
                humantime::format_duration(d)
            ));
        }
        Ok(d)
    }
    fn range(&self) -> Option<String> {
        Some(self.range_text())
    }
}

impl Span {
    fn range_text(&self) -> String {
        format!(
            "from {} to {}",
            humantime::format_duration(self.min),
            humantime::format_duration(self.max)
        )
    }
}

impl fmt::Display for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Raw::Text(s) => write!(f, "{s:?}"),
            Raw::Int(i) => write!(f, "{i}"),
            Raw::Bool(b) => write!(f, "{b}"),
            Raw::List(l) => write!(f, "{l:?}"),
        }
    }
}

pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn expect_text(raw: &Raw, what: &str) -> Result<String, String> {
    match raw {
        Raw::Text(s) => Ok(s.trim().to_string()),
        _ => Err(format!("expected {what}")),
    }
}

fn parse_int(raw: &Raw) -> Result<i64, String> {
    match raw {
        Raw::Int(i) => Ok(*i),
        Raw::Text(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("expected a whole number, got {s:?}")),
        _ => Err("expected a whole number".into()),
    }
}

pub fn parse_host(raw: &Raw) -> Result<IpAddr, String> {
    let s = expect_text(raw, "an IP address")?;
    if s == "localhost" {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("expected an IP address such as 127.0.0.1 or 0.0.0.0, got {s:?}"))
}

pub fn parse_port(raw: &Raw) -> Result<u16, String> {
    let n = parse_int(raw)?;
    u16::try_from(n).map_err(|_| format!("a port is 0 to 65535, got {n}"))
}

pub fn parse_bool(raw: &Raw) -> Result<bool, String> {
    match raw {
        Raw::Bool(b) => Ok(*b),
        Raw::Text(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(format!("expected true or false, got {s:?}")),
        },
        _ => Err("expected true or false".into()),
    }
}

pub fn parse_duration(raw: &Raw) -> Result<Duration, String> {
    let s = match raw {
        Raw::Text(s) => s.trim().to_string(),
        Raw::Int(_) => {
            return Err(
                "expected a duration string with a unit, such as \"25s\" or \"500ms\"".into(),
            )
        }
        _ => return Err("expected a duration such as \"25s\"".into()),
    };
    let d = humantime::parse_duration(&s).map_err(|e| {
        format!("expected a duration such as \"25s\" or \"500ms\", got {s:?} ({e})")
    })?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

pub fn parse_ws_url(raw: &Raw) -> Result<Option<String>, String> {
    let s = expect_text(raw, "a ws:// or wss:// URL")?;
    if s.is_empty() {
        return Ok(None);
    }
    let rest = s
        .strip_prefix("ws://")
        .or_else(|| s.strip_prefix("wss://"))
        .ok_or_else(|| format!("expected a ws:// or wss:// URL, got {s:?}"))?;
    if rest.is_empty() || rest.starts_with('/') || s.chars().any(|c| c.is_whitespace() || c == '"')
    {
        return Err(format!(
            "expected a ws:// or wss:// URL with a host, got {s:?}"
        ));
    }
    Ok(Some(s))
}

pub fn parse_origins(raw: &Raw) -> Result<OriginPolicy, String> {
    let items = match raw {
        Raw::List(items) => items.clone(),
        Raw::Text(s) => split_list(s),
        _ => return Err("expected a list of origins".into()),
    };
    if items.iter().any(|o| o == "*") {
        return Ok(OriginPolicy::Any);
    }
    if items.is_empty() {
        return Ok(OriginPolicy::SameHost);
    }
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match crate::origin::normalise(&item) {
            Some(normal) => out.push(normal),
            None => {
                return Err(format!(
                    "expected origins like \"http://chat.example.com\" or \"*\", got {item:?}"
                ))
            }
        }
    }
    Ok(OriginPolicy::List(out))
}

pub fn parse_proxies(raw: &Raw) -> Result<crate::clients::TrustedProxies, String> {
    let items = match raw {
        Raw::List(items) => items.clone(),
        Raw::Text(s) => split_list(s),
        _ => return Err("expected a list of addresses or CIDR ranges".into()),
    };
    let mut nets = Vec::with_capacity(items.len());
    for item in items {
        let net = item
            .parse::<ipnet::IpNet>()
            .or_else(|_| item.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                format!("expected addresses or CIDR ranges such as \"10.0.0.0/8\" or \"::1\", got {item:?}")
            })?;
        nets.push(net);
    }
    Ok(crate::clients::TrustedProxies(nets))
}

/// A file path; empty means none.
pub fn parse_path(raw: &Raw) -> Result<Option<PathBuf>, String> {
    let s = expect_text(raw, "a file path")?;
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

pub fn parse_static_dir(raw: &Raw) -> Result<Option<PathBuf>, String> {
    let s = expect_text(raw, "a directory path")?;
    if s.is_empty() {
        return Ok(None);
    }
    let dir = PathBuf::from(&s);
    let page = dir.join("client.html");
    if !page.is_file() {
        return Err(format!("{} has no client.html", dir.display()));
    }
    Ok(Some(dir))
}

/// A Redis URL (`redis://[user:password@]host[:port][/db]`); empty means
/// none (standalone). Checked by the `redis` crate's own parser, so what
/// starts is what it will connect with.
pub fn parse_redis_url(raw: &Raw) -> Result<Option<String>, String> {
    let s = expect_text(raw, "a redis:// URL")?;
    if s.is_empty() {
        return Ok(None);
    }
    if !s.starts_with("redis://") && !s.starts_with("redis+unix://") && !s.starts_with("unix://") {
        return Err(format!(
            "expected a redis:// URL (or redis+unix:// for a socket), got {:?}",
            redact(&s)
        ));
    }
    redis::Client::open(s.as_str())
        .map_err(|e| format!("not a usable Redis URL ({:?}): {e}", redact(&s)))?;
    Ok(Some(s))
}

/// A URL with any password in it replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// What may be in a Redis key prefix or node id: printable, no spaces, so
/// keys stay readable in `redis-cli`.
fn key_part(s: &str, what: &str, max: usize) -> Result<(), String> {
    if s.chars().count() > max {
        return Err(format!("{what} is at most {max} characters, got {s:?}"));
    }
    if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{what} may not contain {c:?}, got {s:?}"));
    }
    Ok(())
}

pub fn parse_key_prefix(raw: &Raw) -> Result<String, String> {
    let s = expect_text(raw, "a key prefix")?;
    key_part(&s, "a key prefix", 64)?;
    Ok(s)
}

/// A node id; empty means one made up at start (see `cluster::node_id`).
pub fn parse_node_id(raw: &Raw) -> Result<Option<String>, String> {
    let s = expect_text(raw, "a node id")?;
    key_part(&s, "a node id", 64)?;
    Ok((!s.is_empty()).then_some(s))
}

/// A secret from the configuration: kept out of `Debug` output (and so
/// out of any log of the configuration).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

fn parse_secret(raw: &Raw, what: &str) -> Result<Option<Secret>, String> {
    let s = expect_text(raw, what)?;
    if s.is_empty() {
        return Ok(None);
    }
    if s.len() < 32 {
        // Never the value itself.
        return Err(format!("{what} must be at least 32 bytes, got {}", s.len()));
    }
    Ok(Some(Secret(s)))
}

pub fn parse_jwt_secret(raw: &Raw) -> Result<Option<Secret>, String> {
    parse_secret(raw, "a secret")
}

pub fn parse_api_key(raw: &Raw) -> Result<Option<Secret>, String> {
    parse_secret(raw, "an API key")
}

pub fn parse_auth_mode(raw: &Raw) -> Result<crate::auth::Mode, String> {
    use crate::auth::Mode;
    let s = expect_text(raw, "off, optional or required")?;
    match s.to_ascii_lowercase().as_str() {
        "off" => Ok(Mode::Off),
        "optional" => Ok(Mode::Optional),
        "required" => Ok(Mode::Required),
        _ => Err(format!("expected off, optional or required, got {s:?}")),
    }
}

pub fn parse_public_key(raw: &Raw) -> Result<Option<crate::auth::Key>, String> {
    let s = expect_text(raw, "a PEM file path")?;
    if s.is_empty() {
        return Ok(None);
    }
    crate::auth::Key::public_pem(std::path::Path::new(&s)).map(Some)
}

/// Room name patterns: a room name, or a prefix of one followed by `*`.
pub fn parse_patterns(raw: &Raw) -> Result<crate::auth::Patterns, String> {
    let items = match raw {
        Raw::List(items) => items.clone(),
        Raw::Text(s) => split_list(s),
        _ => return Err("expected a list of room names or prefix* patterns".into()),
    };
    for p in &items {
        let name = p.strip_suffix('*').unwrap_or(p);
        let everything = p == "*";
        if !everything && !crate::protocol::valid_room_name(name) {
            return Err(format!(
                "{p:?} is not a room name or a prefix* pattern (letters, digits, '-', '_', '.')"
            ));
        }
    }
    Ok(crate::auth::Patterns(items))
}

pub fn parse_log_format(raw: &Raw) -> Result<LogFormat, String> {
    let s = expect_text(raw, "\"text\" or \"json\"")?;
    match s.to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("expected \"text\" or \"json\", got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units_and_must_be_positive() {
        assert_eq!(
            parse_duration(&Raw::Text("500ms".into())),
            Ok(Duration::from_millis(500))
        );
        assert!(parse_duration(&Raw::Text("0s".into())).is_err());
        assert!(parse_duration(&Raw::Int(5)).is_err());
        assert!(parse_duration(&Raw::Text("soon".into())).is_err());
    }

    #[test]
    fn ranges_are_enforced_at_both_ends() {
        let count = Count { min: 1, max: 10 };
        assert_eq!(count.parse(&Raw::Int(10)), Ok(10));
        assert!(count.parse(&Raw::Int(0)).is_err());
        assert!(count.parse(&Raw::Int(11)).is_err());
        assert!(count.parse(&Raw::Int(i64::MAX)).is_err());
        assert!(count.parse(&Raw::Int(-1)).is_err());
        let span = Span {
            min: Duration::from_millis(10),
            max: Duration::from_secs(60),
        };
        assert!(span.parse(&Raw::Text("1m".into())).is_ok());
        assert!(span.parse(&Raw::Text("61s".into())).is_err());
        assert!(span.parse(&Raw::Text("1ms".into())).is_err());
        assert!(span
            .parse(&Raw::Text("10000000000000000000s".into()))
            .is_err());
    }

    #[test]
    fn origins_are_normalised() {
        assert_eq!(
            parse_origins(&Raw::List(vec!["HTTP://Chat.Example.com/".into()])),
            Ok(OriginPolicy::List(vec!["http://chat.example.com".into()]))
        );
        assert_eq!(parse_origins(&Raw::Text("*".into())), Ok(OriginPolicy::Any));
        assert!(parse_origins(&Raw::List(vec!["chat.example.com".into()])).is_err());
    }
}

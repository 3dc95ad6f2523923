//! Configuration: one resolved [`Config`] built from four layers.
//!
//! Every key can come from CLI flags, `HUBBUB_*` environment variables, a TOML
//! file or a built-in default, in that order of precedence. Each value keeps a
//! note of where it came from ([`Source`]) so that a bad value is reported
//! against the place the operator has to fix: a flag, an environment variable,
//! or a file with its line number.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use serde::Deserialize;

/// Where one configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File { path: PathBuf, line: usize },
    Env { var: String },
    Flag { name: String },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File { path, line } => write!(f, "{}:{}", path.display(), line),
            Source::Env { var } => write!(f, "environment variable {var}"),
            Source::Flag { name } => write!(f, "flag --{name}"),
        }
    }
}

/// A configuration problem found at start-up. The message always names the
/// source (file and line, variable or flag) and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{at}: key `{key}`: {message}")]
    Invalid {
        at: Source,
        key: &'static str,
        message: String,
    },
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Which browser origins may open a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPolicy {
    /// The HTTP listener's own origin(s), and clients that send no `Origin`.
    SameHost,
    /// Any origin at all (`*`).
    Any,
    /// Exactly these origins (lower-cased, no trailing slash), plus clients
    /// that send no `Origin`.
    List(Vec<String>),
}

/// The fully resolved, validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: IpAddr,
    pub http_port: u16,
    pub ws_port: u16,
    pub public_ws_url: Option<String>,
    pub allowed_origins: OriginPolicy,
    pub static_dir: Option<PathBuf>,
    pub max_connections: usize,
    pub max_message_bytes: usize,
    pub send_queue: usize,
    pub allow_binary: bool,
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            http_port: 8080,
            ws_port: 8081,
            public_ws_url: None,
            allowed_origins: OriginPolicy::SameHost,
            static_dir: None,
            max_connections: 10_000,
            max_message_bytes: 64 * 1024,
            send_queue: 256,
            allow_binary: true,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
            log_format: LogFormat::Text,
        }
    }
}

impl Config {
    /// A configuration for tests and embedding: loopback, both ports chosen
    /// by the OS, everything else default.
    pub fn ephemeral() -> Self {
        Config {
            http_port: 0,
            ws_port: 0,
            ..Config::default()
        }
    }

    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.http_port)
    }

    pub fn ws_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.ws_port)
    }

    /// Resolves the configuration from parsed flags, an environment (a map so
    /// tests need not touch the process environment) and the file named by
    /// `--config` or `HUBBUB_CONFIG`.
    pub fn resolve(flags: &Settings, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        Self::layers(flags, env)?.build(Checks::All)
    }

    /// Like [`Config::resolve`], with every key checked on its own but not
    /// against the others. For `hubbub healthcheck`, which only needs to find
    /// the HTTP listener: `healthcheck --http-port 8081` must not be refused
    /// because the default `ws_port` is 8081 too, when the server it checks
    /// was started with its WebSocket listener elsewhere.
    pub fn resolve_keys(
        flags: &Settings,
        env: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        Self::layers(flags, env)?.build(Checks::KeysOnly)
    }

    fn layers(flags: &Settings, env: &HashMap<String, String>) -> Result<Layers, ConfigError> {
        let mut layers = Layers::default();
        let config_path = flags.config.clone().or_else(|| {
            env.get("HUBBUB_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        if let Some(path) = config_path {
            layers.apply_file(&path)?;
        }
        layers.apply_env(env)?;
        layers.apply_flags(flags);
        Ok(layers)
    }
}

/// Command-line interface. Every configuration key has a flag; any flag left
/// out falls back to the environment, then the file, then the default.
#[derive(Debug, Parser)]
#[command(
    name = "hubbub",
    version,
    about = "A broadcast chat server: every message any peer sends reaches every connected peer.",
    long_about = "A broadcast chat server: every text message any WebSocket peer sends reaches \
every connected peer, the sender included, exactly as received.\n\n\
Settings come from flags, then HUBBUB_* environment variables (HUBBUB_HTTP_PORT, ...), \
then the TOML file given with --config (or HUBBUB_CONFIG), then the defaults. \
Durations are written like \"25s\", \"500ms\" or \"2m\"."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check that a server started with the same settings answers on
    /// /healthz (exit 0 if it does, 1 if not). Meant for container health checks.
    Healthcheck,
}

/// One optional value per configuration key.
#[derive(Debug, Default, Clone, Args)]
pub struct Settings {
    /// TOML configuration file (see config.example.toml) [env: HUBBUB_CONFIG]
    #[arg(long, value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,
    /// Address both listeners bind to [default: 127.0.0.1]
    #[arg(long, value_name = "IP", global = true)]
    pub host: Option<String>,
    /// Port of the HTTP listener (page, /healthz, /metrics); 0 picks a free one [default: 8080]
    #[arg(long, value_name = "PORT", global = true)]
    pub http_port: Option<String>,
    /// Port of the WebSocket listener; 0 picks a free one [default: 8081]
    #[arg(long, value_name = "PORT", global = true)]
    pub ws_port: Option<String>,
    /// WebSocket URL the page connects to, for a reverse proxy or TLS terminator
    /// [default: ws://<page host>:<ws port>/]
    #[arg(long, value_name = "URL", global = true)]
    pub public_ws_url: Option<String>,
    /// Origins allowed to open a WebSocket (exact origins or *); repeat or comma-separate
    /// [default: the HTTP listener's own origin, and clients sending no Origin]
    #[arg(long, value_name = "ORIGIN", value_delimiter = ',', action = ArgAction::Append, global = true)]
    pub allowed_origins: Option<Vec<String>>,
    /// Serve client.html from this directory instead of the built-in page
    #[arg(long, value_name = "DIR", global = true)]
    pub static_dir: Option<PathBuf>,
    /// Most WebSocket connections at once; more are refused with HTTP 503 [default: 10000]
    #[arg(long, value_name = "N", global = true)]
    pub max_connections: Option<String>,
    /// Largest message or frame a peer may send, in bytes; larger closes it with 1009 [default: 65536]
    #[arg(long, value_name = "BYTES", global = true)]
    pub max_message_bytes: Option<String>,
    /// Messages queued per peer before it counts as a slow consumer and is closed with 1008
    /// [default: 256]
    #[arg(long, value_name = "N", global = true)]
    pub send_queue: Option<String>,
    /// Relay binary messages (false closes senders of binary with 1003) [default: true]
    #[arg(long, value_name = "BOOL", global = true)]
    pub allow_binary: Option<String>,
    /// Time a new connection has to finish the WebSocket handshake [default: 10s]
    #[arg(long, value_name = "DURATION", global = true)]
    pub handshake_timeout: Option<String>,
    /// How often the server pings each peer [default: 25s]
    #[arg(long, value_name = "DURATION", global = true)]
    pub ping_interval: Option<String>,
    /// Close a peer from which nothing (not even a pong) arrived for this long, checked at each ping [default: 60s]
    #[arg(long, value_name = "DURATION", global = true)]
    pub idle_timeout: Option<String>,
    /// On shutdown, how long to wait for peers to finish the closing handshake [default: 5s]
    #[arg(long, value_name = "DURATION", global = true)]
    pub shutdown_grace: Option<String>,
    /// Log line format: text or json (RUST_LOG sets the level) [default: text]
    #[arg(long, value_name = "FORMAT", global = true)]
    pub log_format: Option<String>,
}

/// The shape of the TOML file. Every field keeps its span so that a value
/// which parses but makes no sense can still be reported with its line.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    host: Option<toml::Spanned<String>>,
    http_port: Option<toml::Spanned<i64>>,
    ws_port: Option<toml::Spanned<i64>>,
    public_ws_url: Option<toml::Spanned<String>>,
    allowed_origins: Option<toml::Spanned<Vec<String>>>,
    static_dir: Option<toml::Spanned<String>>,
    max_connections: Option<toml::Spanned<i64>>,
    max_message_bytes: Option<toml::Spanned<i64>>,
    send_queue: Option<toml::Spanned<i64>>,
    allow_binary: Option<toml::Spanned<bool>>,
    handshake_timeout: Option<toml::Spanned<String>>,
    ping_interval: Option<toml::Spanned<String>>,
    idle_timeout: Option<toml::Spanned<String>>,
    shutdown_grace: Option<toml::Spanned<String>>,
    log_format: Option<toml::Spanned<String>>,
}

/// A raw value from one layer, not yet checked.
#[derive(Debug, Clone)]
enum Raw {
    Text(String),
    Int(i64),
    Bool(bool),
    List(Vec<String>),
}

/// Every configuration key, in the order they are documented. The
/// environment variable of a key is `HUBBUB_` + the key in upper case.
pub const KEYS: &[&str] = &[
    "host",
    "http_port",
    "ws_port",
    "public_ws_url",
    "allowed_origins",
    "static_dir",
    "max_connections",
    "max_message_bytes",
    "send_queue",
    "allow_binary",
    "handshake_timeout",
    "ping_interval",
    "idle_timeout",
    "shutdown_grace",
    "log_format",
];

/// Whether [`Layers::build`] also checks keys against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checks {
    All,
    KeysOnly,
}

/// The winning raw value of each key; later layers overwrite earlier ones.
#[derive(Default)]
struct Layers {
    values: HashMap<&'static str, (Raw, Source)>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The top-level key whose entry (key through value) covers `offset`. toml's
/// type errors point at the value but do not name its key (`invalid type:
/// string "8080", expected i64`), and the operator should not have to work out
/// which setting that was; `None` if the file does not even parse as TOML.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let table = toml::de::DeTable::parse(text).ok()?;
    table
        .get_ref()
        .iter()
        .find(|(k, v)| k.span().start <= offset && offset < v.span().end.max(k.span().end))
        .map(|(k, _)| k.get_ref().to_string())
}

impl Layers {
    fn set(&mut self, key: &'static str, raw: Raw, source: Source) {
        self.values.insert(key, (raw, source));
    }

    fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: FileConfig = toml::from_str(&text).map_err(|e| {
            let message = e.message().trim_end();
            let at = e
                .span()
                .map(|s| {
                    let key = key_at(&text, s.start)
                        .filter(|k| !message.contains(&format!("`{k}`")))
                        .map(|k| format!("key `{k}`: "))
                        .unwrap_or_default();
                    format!("line {}: {key}", line_of(&text, s.start))
                })
                .unwrap_or_default();
            ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("{at}{message}"),
            }
        })?;
        let source = |span: std::ops::Range<usize>| Source::File {
            path: path.to_path_buf(),
            line: line_of(&text, span.start),
        };
        macro_rules! take {
            ($field:ident, $variant:ident) => {
                if let Some(v) = file.$field {
                    let span = v.span();
                    self.set(
                        stringify!($field),
                        Raw::$variant(v.into_inner()),
                        source(span),
                    );
                }
            };
        }
        take!(host, Text);
        take!(http_port, Int);
        take!(ws_port, Int);
        take!(public_ws_url, Text);
        take!(allowed_origins, List);
        take!(static_dir, Text);
        take!(max_connections, Int);
        take!(max_message_bytes, Int);
        take!(send_queue, Int);
        take!(allow_binary, Bool);
        take!(handshake_timeout, Text);
        take!(ping_interval, Text);
        take!(idle_timeout, Text);
        take!(shutdown_grace, Text);
        take!(log_format, Text);
        Ok(())
    }

    fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        for key in KEYS {
            let var = format!("HUBBUB_{}", key.to_ascii_uppercase());
            if let Some(value) = env.get(&var) {
                let raw = if *key == "allowed_origins" {
                    Raw::List(split_list(value))
                } else {
                    Raw::Text(value.clone())
                };
                self.set(key, raw, Source::Env { var });
            }
        }
        Ok(())
    }

    fn apply_flags(&mut self, flags: &Settings) {
        let mut text = |key: &'static str, value: &Option<String>| {
            if let Some(v) = value {
                self.set(
                    key,
                    Raw::Text(v.clone()),
                    Source::Flag {
                        name: key.replace('_', "-"),
                    },
                );
            }
        };
        text("host", &flags.host);
        text("http_port", &flags.http_port);
        text("ws_port", &flags.ws_port);
        text("public_ws_url", &flags.public_ws_url);
        text("max_connections", &flags.max_connections);
        text("max_message_bytes", &flags.max_message_bytes);
        text("send_queue", &flags.send_queue);
        text("allow_binary", &flags.allow_binary);
        text("handshake_timeout", &flags.handshake_timeout);
        text("ping_interval", &flags.ping_interval);
        text("idle_timeout", &flags.idle_timeout);
        text("shutdown_grace", &flags.shutdown_grace);
        text("log_format", &flags.log_format);
        text(
            "static_dir",
            &flags.static_dir.as_ref().map(|p| p.display().to_string()),
        );
        if let Some(list) = &flags.allowed_origins {
            let items = list.iter().flat_map(|s| split_list(s)).collect();
            self.set(
                "allowed_origins",
                Raw::List(items),
                Source::Flag {
                    name: "allowed-origins".into(),
                },
            );
        }
    }

    fn build(self, checks: Checks) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        let v = &self.values;
        if let Some(x) = get(v, "host", parse_host)? {
            c.host = x;
        }
        if let Some(x) = get(v, "http_port", parse_port)? {
            c.http_port = x;
        }
        if let Some(x) = get(v, "ws_port", parse_port)? {
            c.ws_port = x;
        }
        if let Some(x) = get(v, "public_ws_url", parse_ws_url)? {
            c.public_ws_url = x;
        }
        if let Some(x) = get(v, "allowed_origins", parse_origins)? {
            c.allowed_origins = x;
        }
        if let Some(x) = get(v, "static_dir", parse_static_dir)? {
            c.static_dir = Some(x);
        }
        if let Some(x) = get(v, "max_connections", |r| parse_count(r, 1))? {
            c.max_connections = x;
        }
        if let Some(x) = get(v, "max_message_bytes", |r| parse_count(r, 16))? {
            c.max_message_bytes = x;
        }
        if let Some(x) = get(v, "send_queue", |r| parse_count(r, 1))? {
            c.send_queue = x;
        }
        if let Some(x) = get(v, "allow_binary", parse_bool)? {
            c.allow_binary = x;
        }
        if let Some(x) = get(v, "handshake_timeout", parse_duration)? {
            c.handshake_timeout = x;
        }
        if let Some(x) = get(v, "ping_interval", parse_duration)? {
            c.ping_interval = x;
        }
        if let Some(x) = get(v, "idle_timeout", parse_duration)? {
            c.idle_timeout = x;
        }
        if let Some(x) = get(v, "shutdown_grace", parse_duration)? {
            c.shutdown_grace = x;
        }
        if let Some(x) = get(v, "log_format", parse_log_format)? {
            c.log_format = x;
        }

        if checks == Checks::KeysOnly {
            return Ok(c);
        }
        // Checks that involve two keys are reported against the one the
        // operator set in the higher layer (see `blame`).
        if c.http_port != 0 && c.http_port == c.ws_port {
            let key = blame(v, "http_port", "ws_port");
            let other = if key == "ws_port" {
                "http_port"
            } else {
                "ws_port"
            };
            return Err(invalid(
                v,
                key,
                format!(
                    "the HTTP and WebSocket listeners cannot share {} ({other} is {} too, {})",
                    SocketAddr::new(c.host, c.ws_port),
                    c.ws_port,
                    provenance(v, other)
                ),
            ));
        }
        if c.idle_timeout <= c.ping_interval {
            let key = blame(v, "ping_interval", "idle_timeout");
            let message = if key == "idle_timeout" {
                format!(
                    "must be longer than ping_interval ({}, {})",
                    humantime::format_duration(c.ping_interval),
                    provenance(v, "ping_interval")
                )
            } else {
                format!(
                    "must be shorter than idle_timeout ({}, {})",
                    humantime::format_duration(c.idle_timeout),
                    provenance(v, "idle_timeout")
                )
            };
            return Err(invalid(
                v,
                key,
                format!("{message}, or peers that answer pings would be timed out"),
            ));
        }
        Ok(c)
    }
}

fn source_of(values: &HashMap<&'static str, (Raw, Source)>, key: &str) -> Source {
    values
        .get(key)
        .map(|(_, s)| s.clone())
        .unwrap_or(Source::Default)
}

/// Of two keys whose values conflict, the one to report: the one set in the
/// higher layer (flag over environment over file over default), because that
/// is the setting that moved onto the other, and on a tie `later`. Blaming a
/// key that is still at its default would send the operator looking for a
/// line or flag that does not exist.
fn blame(
    values: &HashMap<&'static str, (Raw, Source)>,
    earlier: &'static str,
    later: &'static str,
) -> &'static str {
    let rank = |key| match source_of(values, key) {
        Source::Default => 0,
        Source::File { .. } => 1,
        Source::Env { .. } => 2,
        Source::Flag { .. } => 3,
    };
    if rank(earlier) > rank(later) {
        earlier
    } else {
        later
    }
}

/// Where the other key of a conflict got its value, for the message.
fn provenance(values: &HashMap<&'static str, (Raw, Source)>, key: &str) -> String {
    match source_of(values, key) {
        Source::Default => "the default".into(),
        at => format!("from {at}"),
    }
}

fn invalid(
    values: &HashMap<&'static str, (Raw, Source)>,
    key: &'static str,
    message: String,
) -> ConfigError {
    ConfigError::Invalid {
        at: source_of(values, key),
        key,
        message,
    }
}

/// Parses one key's winning value, turning a parse failure into an error
/// that names where the value came from.
fn get<T>(
    values: &HashMap<&'static str, (Raw, Source)>,
    key: &'static str,
    parse: impl Fn(&Raw) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    match values.get(key) {
        None => Ok(None),
        Some((raw, source)) => parse(raw)
            .map(Some)
            .map_err(|message| ConfigError::Invalid {
                at: source.clone(),
                key,
                message,
            }),
    }
}

fn split_list(s: &str) -> Vec<String> {
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

fn parse_host(raw: &Raw) -> Result<IpAddr, String> {
    let s = expect_text(raw, "an IP address")?;
    if s == "localhost" {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("expected an IP address such as 127.0.0.1 or 0.0.0.0, got {s:?}"))
}

fn parse_port(raw: &Raw) -> Result<u16, String> {
    let n = parse_int(raw)?;
    u16::try_from(n).map_err(|_| format!("a port is 0 to 65535, got {n}"))
}

fn parse_count(raw: &Raw, min: i64) -> Result<usize, String> {
    let n = parse_int(raw)?;
    if n < min {
        return Err(format!("must be at least {min}, got {n}"));
    }
    usize::try_from(n).map_err(|_| format!("{n} is too large"))
}

fn parse_bool(raw: &Raw) -> Result<bool, String> {
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

fn parse_duration(raw: &Raw) -> Result<Duration, String> {
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

fn parse_ws_url(raw: &Raw) -> Result<Option<String>, String> {
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

fn parse_origins(raw: &Raw) -> Result<OriginPolicy, String> {
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
        let normal = item.trim_end_matches('/').to_ascii_lowercase();
        let host = normal
            .strip_prefix("http://")
            .or_else(|| normal.strip_prefix("https://"));
        match host {
            Some(h) if !h.is_empty() && !h.contains('/') => out.push(normal),
            _ => {
                return Err(format!(
                    "expected origins like \"http://chat.example.com\" or \"*\", got {item:?}"
                ))
            }
        }
    }
    Ok(OriginPolicy::List(out))
}

fn parse_static_dir(raw: &Raw) -> Result<PathBuf, String> {
    let s = expect_text(raw, "a directory path")?;
    let dir = PathBuf::from(&s);
    let page = dir.join("client.html");
    if !page.is_file() {
        return Err(format!("{} has no client.html", dir.display()));
    }
    Ok(dir)
}

fn parse_log_format(raw: &Raw) -> Result<LogFormat, String> {
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
    fn line_numbers_count_from_one() {
        let text = "a = 1\nb = 2\nc = 3\n";
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(line_of(text, 6), 2);
        assert_eq!(line_of(text, 12), 3);
    }

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
    fn origins_are_normalised() {
        assert_eq!(
            parse_origins(&Raw::List(vec!["HTTP://Chat.Example.com/".into()])),
            Ok(OriginPolicy::List(vec!["http://chat.example.com".into()]))
        );
        assert_eq!(parse_origins(&Raw::Text("*".into())), Ok(OriginPolicy::Any));
        assert!(parse_origins(&Raw::List(vec!["chat.example.com".into()])).is_err());
    }
}

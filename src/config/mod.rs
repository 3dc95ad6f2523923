//! Configuration: one resolved [`Config`] built from four layers.
//!
//! Every key can come from CLI flags, `HUBBUB_*` environment variables, a TOML
//! file or a built-in default, in that order of precedence. Each value keeps a
//! note of where it came from ([`Source`]) so that a bad value is reported
//! against the place the operator has to fix: a flag, an environment variable,
//! or a file with its line number.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

mod values;

pub use values::{redact, Secret};

use crate::auth;
use crate::clients::TrustedProxies;
use values::{
    parse_api_key, parse_auth_mode, parse_bool, parse_host, parse_jwt_secret, parse_key_prefix,
    parse_log_format, parse_node_id, parse_origins, parse_path, parse_patterns, parse_port,
    parse_proxies, parse_public_key, parse_redis_url, parse_static_dir, parse_ws_url, split_list,
    Count, Parse, Plain, Raw, Span,
};

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

/// Declares every configuration key once. From each line come the
/// [`Config`] field, its flag (the key in kebab case), its environment
/// variable (`HUBBUB_` + the key in upper case), its TOML field, its built-in
/// default (parsed by the same parser as any other value, so the documented
/// default is the real one) and its `--help` line with default and range.
///
/// Each line: `[section] key: Type [raw kind, flag type] = "default",
/// "VALUE NAME", parser, "help"`, the `[section]` only for keys written
/// under a section of the file. The raw kind is what the TOML file holds (`Text`, `Int`,
/// `Bool` or `List`); flags and variables are text (`String`), lists
/// (`Vec<String>`) repeatable and comma-separated. The flag type is spelled
/// out because clap's derive reads it as written.
macro_rules! keys {
    ($(
        $([$section:ident])? $key:ident: $ty:ty [$raw:ident, $flag:ty] = $default:literal, $value_name:literal, $parse:expr, $help:literal;
    )*) => {
        /// The fully resolved, validated configuration the server runs with.
        #[derive(Debug, Clone)]
        pub struct Config {
            $(pub $key: $ty,)*
        }

        impl Default for Config {
            fn default() -> Self {
                Config {
                    $($key: default_of(stringify!($key), $default, &$parse),)*
                }
            }
        }

        impl Config {
            /// The built-in defaults with every key set in `values` parsed
            /// over them.
            fn from_values(values: &Values) -> Result<Config, ConfigError> {
                let mut c = Config::default();
                $(
                    if let Some(x) = get(values, stringify!($key), &$parse)? {
                        c.$key = x;
                    }
                )*
                Ok(c)
            }
        }

        /// Every configuration key, in the order they are documented.
        pub const KEYS: &[&str] = &[$(stringify!($key)),*];

        /// What each key holds in the TOML file (and whether flags and
        /// variables give it a comma-separated list).
        const KINDS: &[RawKind] = &[$(RawKind::$raw),*];

        /// The file section each key is written under, if any.
        const SECTION_OF: &[Option<&str>] = &[$(section!($($section)?)),*];

        /// One optional value per configuration key. Any flag left out falls
        /// back to the environment, then the file, then the default.
        #[derive(Debug, Default, Clone, Args)]
        pub struct Settings {
            /// TOML configuration file (see config.example.toml) [env: HUBBUB_CONFIG]
            #[arg(long, value_name = "PATH", global = true)]
            pub config: Option<PathBuf>,
            $(
                #[arg(
                    long,
                    value_name = $value_name,
                    global = true,
                    help = help($help, $default, &$parse),
                    value_delimiter = RawKind::$raw.delimiter(),
                )]
                pub $key: Option<$flag>,
            )*
        }

        impl Settings {
            /// The flags given, as raw values.
            fn values(&self) -> Vec<(&'static str, Raw)> {
                let mut out = Vec::new();
                $(
                    if let Some(v) = &self.$key {
                        out.push((stringify!($key), v.raw()));
                    }
                )*
                out
            }
        }

    };
}

/// A key's section as an `Option`, for [`keys!`].
macro_rules! section {
    () => {
        None
    };
    ($section:ident) => {
        Some(stringify!($section))
    };
}

keys! {
    host: IpAddr [Text, String] = "127.0.0.1", "IP", Plain(parse_host),
        "Address both listeners bind to (0.0.0.0 or :: for every interface)";
    http_port: u16 [Int, String] = "8080", "PORT", Plain(parse_port),
        "Port of the HTTP listener (page, /healthz, /metrics); 0 picks a free one";
    ws_port: u16 [Int, String] = "8081", "PORT", Plain(parse_port),
        "Port of the WebSocket listener; 0 picks a free one";
    public_ws_url: Option<String> [Text, String] = "", "URL", Plain(parse_ws_url),
        "WebSocket URL the page connects to, for a reverse proxy or TLS terminator (empty: ws://<page host>:<ws port>/)";
    allowed_origins: OriginPolicy [List, Vec<String>] = "", "ORIGIN", Plain(parse_origins),
        "Origins allowed to open a WebSocket (exact origins or *); repeat or comma-separate (empty: the page's own origin on a loopback bind, and clients sending no Origin)";
    static_dir: Option<PathBuf> [Text, String] = "", "DIR", Plain(parse_static_dir),
        "Serve client.html from this directory instead of the built-in page";
    max_connections: usize [Int, String] = "10000", "N", Count { min: 1, max: 1_000_000 },
        "Most WebSocket connections at once; more are refused with HTTP 503";
    max_message_bytes: usize [Int, String] = "65536", "BYTES", Count { min: 16, max: 16 << 20 },
        "Largest message or frame a peer may send, in bytes; larger closes it with 1009";
    send_queue: usize [Int, String] = "256", "N", Count { min: 1, max: 65_536 },
        "Messages queued per peer before it counts as a slow consumer and is closed with 1008";
    allow_binary: bool [Bool, String] = "true", "BOOL", Plain(parse_bool),
        "Relay binary messages (false closes senders of binary with 1003)";
    handshake_timeout: Duration [Text, String] = "10s", "DURATION", Span { min: MIN_DURATION, max: Duration::from_secs(600) },
        "Time a new connection has to finish the WebSocket handshake";
    ping_interval: Duration [Text, String] = "25s", "DURATION", Span { min: MIN_DURATION, max: Duration::from_secs(3600) },
        "How often the server pings each peer";
    idle_timeout: Duration [Text, String] = "60s", "DURATION", Span { min: MIN_DURATION, max: Duration::from_secs(86_400) },
        "Close a peer from which nothing (not even a pong) arrived for this long, checked at each ping";
    shutdown_grace: Duration [Text, String] = "5s", "DURATION", Span { min: MIN_DURATION, max: Duration::from_secs(3600) },
        "On shutdown, how long to wait for peers to finish the closing handshake";
    max_connections_per_ip: u32 [Int, String] = "100", "N", Count { min: 1, max: 1_000_000 }.map(|n| n as u32),
        "Connections (handshakes in progress included) one client address may hold on each listener; more get HTTP 429 (IPv6: per /64)";
    trusted_proxies: TrustedProxies [List, Vec<String>] = "", "CIDR", Plain(parse_proxies),
        "Proxies (addresses or CIDR ranges) whose X-Forwarded-For or Forwarded header names the client; repeat or comma-separate";
    rate_limit_per_sec: u32 [Int, String] = "50", "N", Count { min: 0, max: 1_000_000 }.map(|n| n as u32),
        "Messages per second each connection may send on average; more are not relayed (0 turns the limit off)";
    rate_limit_burst: u32 [Int, String] = "100", "N", Count { min: 1, max: 1_000_000 }.map(|n| n as u32),
        "Messages a connection may send at once above its rate; more refused than this within 10 s closes it with 1008";
    max_rooms: usize [Int, String] = "10000", "N", Count { min: 1, max: 1_000_000 },
        "Most rooms at once; a join that would create one more is refused with HTTP 503";
    history_size: usize [Int, String] = "100", "N", Count { min: 0, max: 100_000 },
        "Messages each room keeps for hubbub.v1 joins and resumes (0 turns history off)";
    history_bytes: usize [Int, String] = "1048576", "BYTES", Count { min: 0, max: 1 << 30 },
        "Most payload bytes each room's history holds; the oldest messages go first";
    history_ttl: Duration [Text, String] = "10m", "DURATION", Span { min: MIN_DURATION, max: Duration::from_secs(7 * 86_400) },
        "A room's history is dropped this long after its last message (and the room ends if nobody is in it)";
    history_on_join: usize [Int, String] = "50", "N", Count { min: 0, max: 100_000 },
        "Recent messages a hubbub.v1 client gets when it joins without resuming";
    presence_members_max: usize [Int, String] = "100", "N", Count { min: 0, max: 10_000 },
        "Rooms with at most this many peers list their verified members in presence notices; above it, the count only";
    [tls] tls_cert: Option<PathBuf> [Text, String] = "", "PEM", Plain(parse_path),
        "[tls] cert: certificate chain (PEM) for https:// and wss:// on both listeners; with tls_key (SIGHUP reloads both)";
    [tls] tls_key: Option<PathBuf> [Text, String] = "", "PEM", Plain(parse_path),
        "[tls] key: private key (PEM) of tls_cert";
    [cluster] redis_url: Option<String> [Text, String] = "", "URL", Plain(parse_redis_url),
        "[cluster] Redis that several nodes share the room log through (redis://host:port/db; absent: standalone, the log in memory)";
    [cluster] key_prefix: String [Text, String] = "hubbub:", "PREFIX", Plain(parse_key_prefix),
        "[cluster] Prefix of every Redis key hubbub writes, so several deployments can share one Redis";
    [cluster] node_id: Option<String> [Text, String] = "", "ID", Plain(parse_node_id),
        "[cluster] This node's name in the cluster (empty: made unique per process)";
    [cluster] outbox_size: usize [Int, String] = "10000", "N", Count { min: 1, max: 1_000_000 },
        "[cluster] Messages this node holds while Redis is unreachable; beyond it senders get `unavailable` (raw: closed with 1013)";
    [auth] auth_mode: auth::Mode [Text, String] = "off", "MODE", Plain(parse_auth_mode),
        "[auth] mode: off (tokens are not read), optional (checked when given) or required (every connection needs a valid token)";
    [auth] jwt_secret: Option<Secret> [Text, String] = "", "SECRET", Plain(parse_jwt_secret),
        "[auth] HS256 secret that connection tokens are signed with (at least 32 bytes)";
    [auth] jwt_public_key: Option<auth::Key> [Text, String] = "", "PEM", Plain(parse_public_key),
        "[auth] Public key (PEM file) that connection tokens are signed for: RSA (RS256), P-256 (ES256) or Ed25519 (EdDSA)";
    [auth] private_rooms: auth::Patterns [List, Vec<String>] = "", "PATTERN", Plain(parse_patterns),
        "[auth] Rooms (names or prefix*) that only a token allowing them may join, in every mode; repeat or comma-separate";
    [api] api_key: Option<Secret> [Text, String] = "", "KEY", Plain(parse_api_key),
        "[api] key: bearer key of the HTTP API under /api/ (absent: no API; at least 32 bytes)";
    log_format: LogFormat [Text, String] = "text", "FORMAT", Plain(parse_log_format),
        "Log line format: text or json (RUST_LOG sets the level)";
}

/// The file section of a key, if it is written under one.
fn section_of(key: &str) -> Option<&'static str> {
    KEYS.iter()
        .position(|k| *k == key)
        .and_then(|i| SECTION_OF[i])
}

/// A key's name inside its section: `tls_cert` is `cert` under `[tls]`,
/// `redis_url` is `redis_url` under `[cluster]`.
fn inner_name<'a>(key: &'a str, section: &str) -> &'a str {
    key.strip_prefix(section)
        .and_then(|r| r.strip_prefix('_'))
        .unwrap_or(key)
}

/// A key as the file spells it: `send_queue`, `tls.cert` or
/// `cluster.redis_url`.
pub fn file_name(key: &str) -> String {
    match section_of(key) {
        Some(section) => format!("{section}.{}", inner_name(key, section)),
        None => key.to_string(),
    }
}

/// A TOML value as a raw value of the kind its key holds.
fn file_raw(value: &toml::de::DeValue<'_>, kind: RawKind) -> Result<Raw, String> {
    use toml::de::DeValue;
    let found = value.type_str();
    match (kind, value) {
        (RawKind::Text, DeValue::String(s)) => Ok(Raw::Text(s.to_string())),
        (RawKind::Int, DeValue::Integer(i)) => i64::from_str_radix(i.as_str(), i.radix())
            .map(Raw::Int)
            .map_err(|_| format!("{} is out of range", i.as_str())),
        (RawKind::Bool, DeValue::Boolean(b)) => Ok(Raw::Bool(*b)),
        (RawKind::List, DeValue::Array(items)) => items
            .iter()
            .map(|item| match item.get_ref() {
                DeValue::String(s) => Ok(s.to_string()),
                other => Err(format!(
                    "expected a list of strings, found a {}",
                    other.type_str()
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Raw::List),
        (RawKind::Text, _) => Err(format!("expected a string, found {found}")),
        (RawKind::Int, _) => Err(format!("expected a whole number, found {found}")),
        (RawKind::Bool, _) => Err(format!("expected true or false, found {found}")),
        (RawKind::List, _) => Err(format!("expected a list of strings, found {found}")),
    }
}

/// The shortest duration any key takes: below it timers and deadlines stop
/// meaning anything.
const MIN_DURATION: Duration = Duration::from_millis(10);

/// Each key's winning raw value and where it came from.
type Values = HashMap<&'static str, (Raw, Source)>;

/// The kinds of raw value a key can hold in the TOML file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawKind {
    Text,
    Int,
    Bool,
    List,
}

impl RawKind {
    fn delimiter(self) -> Option<char> {
        (self == RawKind::List).then_some(',')
    }
}

/// What clap hands over for one flag: text, or a list for list keys.
trait FlagValue {
    fn raw(&self) -> Raw;
}

impl FlagValue for String {
    fn raw(&self) -> Raw {
        Raw::Text(self.clone())
    }
}

impl FlagValue for Vec<String> {
    fn raw(&self) -> Raw {
        Raw::List(self.iter().flat_map(|s| split_list(s)).collect())
    }
}

/// A key's `--help` line: what it does, its default and its range.
fn help(what: &str, default: &str, parse: &impl Parse) -> String {
    let mut line = what.to_string();
    if !default.is_empty() {
        line.push_str(&format!(" [default: {default}]"));
    }
    if let Some(range) = parse.range() {
        line.push_str(&format!(" [range: {range}]"));
    }
    line
}

/// Parses a built-in default. They are constants of this file, checked by a
/// unit test, so a failure here is a bug in the table above, not input.
fn default_of<P: Parse>(key: &str, default: &str, parse: &P) -> P::Out {
    match parse.parse(&Raw::Text(default.to_string())) {
        Ok(v) => v,
        Err(e) => panic!("built-in default of `{key}` ({default:?}) does not parse: {e}"),
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
                .filter(|v| !v.trim().is_empty())
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

/// Whether [`Layers::build`] also checks keys against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checks {
    All,
    KeysOnly,
}

/// The winning raw value of each key; later layers overwrite earlier ones.
#[derive(Default)]
struct Layers {
    values: Values,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Layers {
    fn set(&mut self, key: &'static str, raw: Raw, source: Source) {
        self.values.insert(key, (raw, source));
    }

    /// Reads the TOML file. Its top level holds the plain keys, the
    /// sections (`[tls]`, `[cluster]`) theirs (see [`file_name`]). Every
    /// value keeps its line for error messages.
    fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let error = |offset: Option<usize>, message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message: match offset {
                Some(at) => format!("line {}: {message}", line_of(&text, at)),
                None => message,
            },
        };
        let document = toml::de::DeTable::parse(&text).map_err(|e| {
            error(
                e.span().map(|s| s.start),
                e.message().trim_end().to_string(),
            )
        })?;
        let mut entries = Vec::new();
        for (name, value) in document.get_ref() {
            match value.get_ref() {
                toml::de::DeValue::Table(table)
                    if SECTION_OF.contains(&Some(name.get_ref().as_ref())) =>
                {
                    for (inner, value) in table {
                        let shown = format!("{}.{}", name.get_ref(), inner.get_ref());
                        entries.push((shown, inner.span().start, value));
                    }
                }
                _ => {
                    let key = name.get_ref().to_string();
                    entries.push((key, name.span().start, value));
                }
            }
        }
        for (shown, at, value) in entries {
            let Some(index) = KEYS.iter().position(|k| file_name(k) == shown) else {
                let known = KEYS
                    .iter()
                    .map(|k| file_name(k))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(error(
                    Some(at),
                    format!("unknown key `{shown}`; the keys are {known}"),
                ));
            };
            let raw = file_raw(value.get_ref(), KINDS[index])
                .map_err(|m| error(Some(value.span().start), format!("key `{shown}`: {m}")))?;
            let source = Source::File {
                path: path.to_path_buf(),
                line: line_of(&text, value.span().start),
            };
            self.set(KEYS[index], raw, source);
        }
        Ok(())
    }

    /// An empty variable counts as unset, for every key: a compose file's
    /// `${VAR}` with VAR unset produces exactly that, and it should leave the
    /// file's value or the default in place, not replace it with nothing.
    fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        for (key, kind) in KEYS.iter().zip(KINDS) {
            let var = format!("HUBBUB_{}", key.to_ascii_uppercase());
            let Some(value) = env.get(&var).filter(|v| !v.trim().is_empty()) else {
                continue;
            };
            let raw = if *kind == RawKind::List {
                Raw::List(split_list(value))
            } else {
                Raw::Text(value.clone())
            };
            self.set(key, raw, Source::Env { var });
        }
        Ok(())
    }

    fn apply_flags(&mut self, flags: &Settings) {
        for (key, raw) in flags.values() {
            let name = key.replace('_', "-");
            self.set(key, raw, Source::Flag { name });
        }
    }

    fn build(self, checks: Checks) -> Result<Config, ConfigError> {
        let v = &self.values;
        let c = Config::from_values(v)?;
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
        if c.tls_cert.is_some() != c.tls_key.is_some() {
            let (set, missing) = if c.tls_cert.is_some() {
                ("tls_cert", "tls_key")
            } else {
                ("tls_key", "tls_cert")
            };
            return Err(invalid(
                v,
                set,
                format!("needs {missing} too: TLS takes a certificate and its key"),
            ));
        }
        if c.jwt_secret.is_some() && c.jwt_public_key.is_some() {
            let key = blame(v, "jwt_secret", "jwt_public_key");
            return Err(invalid(
                v,
                key,
                "set jwt_secret or jwt_public_key, not both: tokens are checked with one algorithm"
                    .into(),
            ));
        }
        if c.auth_mode != auth::Mode::Off && c.jwt_secret.is_none() && c.jwt_public_key.is_none() {
            return Err(invalid(
                v,
                "auth_mode",
                "needs jwt_secret or jwt_public_key to check tokens with".into(),
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

fn source_of(values: &Values, key: &str) -> Source {
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
fn blame(values: &Values, earlier: &'static str, later: &'static str) -> &'static str {
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
fn provenance(values: &Values, key: &str) -> String {
    match source_of(values, key) {
        Source::Default => "the default".into(),
        at => format!("from {at}"),
    }
}

fn invalid(values: &Values, key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid {
        at: source_of(values, key),
        key,
        message,
    }
}

/// Parses one key's winning value, turning a parse failure into an error
/// that names where the value came from.
fn get<P: Parse>(
    values: &Values,
    key: &'static str,
    parse: &P,
) -> Result<Option<P::Out>, ConfigError> {
    match values.get(key) {
        None => Ok(None),
        Some((raw, source)) => parse
            .parse(raw)
            .map(Some)
            .map_err(|message| ConfigError::Invalid {
                at: source.clone(),
                key,
                message,
            }),
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
    fn every_built_in_default_parses() {
        let c = Config::default();
        assert_eq!(c.http_port, 8080);
        assert_eq!(c.allowed_origins, OriginPolicy::SameHost);
        assert_eq!(c.static_dir, None);
    }

    #[test]
    fn help_shows_default_and_range() {
        let h = help("Most connections", "10000", &Count { min: 1, max: 5 });
        assert_eq!(h, "Most connections [default: 10000] [range: from 1 to 5]");
        assert_eq!(help("Page", "", &Plain(parse_static_dir)), "Page");
    }
}

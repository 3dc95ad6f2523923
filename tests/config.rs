//! Configuration: the four layers (flags, then `HUBBUB_*` environment, then
//! the TOML file, then defaults), every key from every layer, and every kind
//! of bad value, with the error naming the place the operator has to fix
//! (file and line, environment variable, or flag) and the key.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use hubbub::config::{Cli, Config, ConfigError, LogFormat, OriginPolicy, Settings, Source};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A unique path under the system temp directory; tests run in parallel.
fn unique_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "hubbub-config-test-{}-{}-{what}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A TOML file that is removed when the test ends, however it ends.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &str) -> TempFile {
        let path = unique_path("hubbub.toml");
        std::fs::write(&path, contents).expect("write temp config file");
        TempFile(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A directory removed when the test ends, optionally holding a client.html.
struct TempDir(PathBuf);

impl TempDir {
    fn new(with_page: bool) -> TempDir {
        let path = unique_path("static");
        std::fs::create_dir_all(&path).expect("create temp dir");
        if with_page {
            std::fs::write(path.join("client.html"), "<!doctype html><title>t</title>")
                .expect("write client.html");
        }
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn flags(args: &[&str]) -> Settings {
    let argv = std::iter::once("hubbub").chain(args.iter().copied());
    match Cli::try_parse_from(argv) {
        Ok(cli) => cli.settings,
        Err(e) => panic!("flags {args:?} should parse: {e}"),
    }
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn resolve(args: &[&str], vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::resolve(&flags(args), &env(vars))
}

#[track_caller]
fn ok(args: &[&str], vars: &[(&str, &str)]) -> Config {
    match resolve(args, vars) {
        Ok(c) => c,
        Err(e) => panic!("flags {args:?} env {vars:?} should resolve, got: {e}"),
    }
}

#[track_caller]
fn err(args: &[&str], vars: &[(&str, &str)]) -> (ConfigError, String) {
    match resolve(args, vars) {
        Ok(c) => panic!("flags {args:?} env {vars:?} should be rejected, got {c:?}"),
        Err(e) => {
            let msg = e.to_string();
            (e, msg)
        }
    }
}

/// Resolves with only `file` as a layer (given by `--config`).
#[track_caller]
fn from_file(contents: &str) -> Config {
    let file = TempFile::new(contents);
    ok(&["--config", &file.arg()], &[])
}

/// Asserts that `contents` as a config file is rejected with a message that
/// names the file, the line and every one of `words` (the key, usually).
#[track_caller]
fn file_error(contents: &str, line: usize, words: &[&str]) -> String {
    let file = TempFile::new(contents);
    let (_, msg) = err(&["--config", &file.arg()], &[]);
    assert!(
        msg.contains(&file.arg()),
        "message should name the file {}: {msg}",
        file.arg()
    );
    let at_line = format!("{}:{line}:", file.arg());
    let line_word = format!("line {line}:");
    assert!(
        msg.contains(&at_line) || msg.contains(&line_word),
        "message should name line {line}: {msg}"
    );
    for w in words {
        assert!(msg.contains(w), "message should mention {w:?}: {msg}");
    }
    msg
}

/// Asserts an `Invalid` error against exactly this key and source.
#[track_caller]
fn assert_invalid(e: &ConfigError, want_key: &str, want_at: &Source) {
    match e {
        ConfigError::Invalid { at, key, .. } => {
            assert_eq!(*key, want_key, "wrong key in {e}");
            assert_eq!(at, want_at, "wrong source in {e}");
        }
        other => panic!("expected an Invalid error for {want_key}, got {other:?}"),
    }
}

fn env_source(var: &str) -> Source {
    Source::Env { var: var.into() }
}

fn flag_source(name: &str) -> Source {
    Source::Flag { name: name.into() }
}

fn file_source(file: &TempFile, line: usize) -> Source {
    Source::File {
        path: file.path().to_path_buf(),
        line,
    }
}

fn same(a: &Config, b: &Config) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

// ---------------------------------------------------------------------------
// Defaults and each layer on its own
// ---------------------------------------------------------------------------

#[test]
fn no_layers_gives_the_documented_defaults() {
    let c = ok(&[], &[]);
    assert_eq!(c.host, IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(c.http_port, 8080);
    assert_eq!(c.ws_port, 8081);
    assert_eq!(c.public_ws_url, None);
    assert_eq!(c.allowed_origins, OriginPolicy::SameHost);
    assert_eq!(c.static_dir, None);
    assert_eq!(c.max_connections, 10_000);
    assert_eq!(c.max_message_bytes, 64 * 1024);
    assert_eq!(c.send_queue, 256);
    assert!(c.allow_binary);
    assert_eq!(c.handshake_timeout, Duration::from_secs(10));
    assert_eq!(c.ping_interval, Duration::from_secs(25));
    assert_eq!(c.idle_timeout, Duration::from_secs(60));
    assert_eq!(c.shutdown_grace, Duration::from_secs(5));
    assert_eq!(c.log_format, LogFormat::Text);
    assert!(same(&c, &Config::default()));
}

#[test]
fn environment_variables_that_are_not_ours_are_ignored() {
    let c = ok(
        &[],
        &[
            ("PATH", "/usr/bin"),
            ("HTTP_PORT", "1"),
            ("HUBBUB", "x"),
            ("hubbub_http_port", "1"),
        ],
    );
    assert!(same(&c, &Config::default()));
}

#[test]
fn every_key_from_the_file() {
    let dir = TempDir::new(true);
    let contents = format!(
        r#"# every key, one per line
host = "0.0.0.0"
http_port = 9000
ws_port = 9001
public_ws_url = "wss://chat.example.com/ws"
allowed_origins = ["https://chat.example.com", "http://localhost:3000"]
static_dir = "{}"
max_connections = 50
max_message_bytes = 1024
send_queue = 8
allow_binary = false
handshake_timeout = "3s"
ping_interval = "500ms"
idle_timeout = "2m"
shutdown_grace = "1500ms"
log_format = "json"
"#,
        dir.arg()
    );
    let c = from_file(&contents);
    assert_eq!(c.host, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    assert_eq!(c.http_port, 9000);
    assert_eq!(c.ws_port, 9001);
    assert_eq!(
        c.public_ws_url.as_deref(),
        Some("wss://chat.example.com/ws")
    );
    assert_eq!(
        c.allowed_origins,
        OriginPolicy::List(vec![
            "https://chat.example.com".into(),
            "http://localhost:3000".into()
        ])
    );
    assert_eq!(c.static_dir.as_deref(), Some(dir.path()));
    assert_eq!(c.max_connections, 50);
    assert_eq!(c.max_message_bytes, 1024);
    assert_eq!(c.send_queue, 8);
    assert!(!c.allow_binary);
    assert_eq!(c.handshake_timeout, Duration::from_secs(3));
    assert_eq!(c.ping_interval, Duration::from_millis(500));
    assert_eq!(c.idle_timeout, Duration::from_secs(120));
    assert_eq!(c.shutdown_grace, Duration::from_millis(1500));
    assert_eq!(c.log_format, LogFormat::Json);
}

#[test]
fn every_key_from_the_environment() {
    let dir = TempDir::new(true);
    let c = ok(
        &[],
        &[
            ("HUBBUB_HOST", "::1"),
            ("HUBBUB_HTTP_PORT", "9100"),
            ("HUBBUB_WS_PORT", "9101"),
            ("HUBBUB_PUBLIC_WS_URL", "ws://proxy.example.com:80/"),
            (
                "HUBBUB_ALLOWED_ORIGINS",
                "https://a.example.com, https://b.example.com",
            ),
            ("HUBBUB_STATIC_DIR", &dir.arg()),
            ("HUBBUB_MAX_CONNECTIONS", "7"),
            ("HUBBUB_MAX_MESSAGE_BYTES", "2048"),
            ("HUBBUB_SEND_QUEUE", "16"),
            ("HUBBUB_ALLOW_BINARY", "false"),
            ("HUBBUB_HANDSHAKE_TIMEOUT", "250ms"),
            ("HUBBUB_PING_INTERVAL", "10s"),
            ("HUBBUB_IDLE_TIMEOUT", "25s"),
            ("HUBBUB_SHUTDOWN_GRACE", "1s"),
            ("HUBBUB_LOG_FORMAT", "json"),
        ],
    );
    assert_eq!(c.host, IpAddr::V6(Ipv6Addr::LOCALHOST));
    assert_eq!(c.http_port, 9100);
    assert_eq!(c.ws_port, 9101);
    assert_eq!(
        c.public_ws_url.as_deref(),
        Some("ws://proxy.example.com:80/")
    );
    assert_eq!(
        c.allowed_origins,
        OriginPolicy::List(vec![
            "https://a.example.com".into(),
            "https://b.example.com".into()
        ])
    );
    assert_eq!(c.static_dir.as_deref(), Some(dir.path()));
    assert_eq!(c.max_connections, 7);
    assert_eq!(c.max_message_bytes, 2048);
    assert_eq!(c.send_queue, 16);
    assert!(!c.allow_binary);
    assert_eq!(c.handshake_timeout, Duration::from_millis(250));
    assert_eq!(c.ping_interval, Duration::from_secs(10));
    assert_eq!(c.idle_timeout, Duration::from_secs(25));
    assert_eq!(c.shutdown_grace, Duration::from_secs(1));
    assert_eq!(c.log_format, LogFormat::Json);
}

#[test]
fn every_key_from_flags() {
    let dir = TempDir::new(true);
    let c = ok(
        &[
            "--host",
            "0.0.0.0",
            "--http-port",
            "0",
            "--ws-port",
            "0",
            "--public-ws-url",
            "wss://example.net/chat",
            "--allowed-origins",
            "*",
            "--static-dir",
            &dir.arg(),
            "--max-connections",
            "3",
            "--max-message-bytes",
            "100",
            "--send-queue",
            "1",
            "--allow-binary",
            "false",
            "--handshake-timeout",
            "1s",
            "--ping-interval",
            "5s",
            "--idle-timeout",
            "90s",
            "--shutdown-grace",
            "100ms",
            "--log-format",
            "json",
        ],
        &[],
    );
    assert_eq!(c.host, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    assert_eq!(c.http_port, 0);
    assert_eq!(c.ws_port, 0);
    assert_eq!(c.public_ws_url.as_deref(), Some("wss://example.net/chat"));
    assert_eq!(c.allowed_origins, OriginPolicy::Any);
    assert_eq!(c.static_dir.as_deref(), Some(dir.path()));
    assert_eq!(c.max_connections, 3);
    assert_eq!(c.max_message_bytes, 100);
    assert_eq!(c.send_queue, 1);
    assert!(!c.allow_binary);
    assert_eq!(c.handshake_timeout, Duration::from_secs(1));
    assert_eq!(c.ping_interval, Duration::from_secs(5));
    assert_eq!(c.idle_timeout, Duration::from_secs(90));
    assert_eq!(c.shutdown_grace, Duration::from_millis(100));
    assert_eq!(c.log_format, LogFormat::Json);
}

#[test]
fn both_ports_zero_is_allowed() {
    let c = ok(&["--http-port", "0", "--ws-port", "0"], &[]);
    assert_eq!((c.http_port, c.ws_port), (0, 0));
}

#[test]
fn booleans_accept_common_spellings() {
    for (text, want) in [
        ("true", true),
        ("TRUE", true),
        ("1", true),
        ("yes", true),
        ("on", true),
        ("false", false),
        ("0", false),
        ("no", false),
        ("Off", false),
    ] {
        assert_eq!(
            ok(&["--allow-binary", text], &[]).allow_binary,
            want,
            "{text}"
        );
        assert_eq!(
            ok(&[], &[("HUBBUB_ALLOW_BINARY", text)]).allow_binary,
            want,
            "{text}"
        );
    }
    assert!(from_file("allow_binary = true\n").allow_binary);
}

#[test]
fn localhost_and_bracketed_ipv6_hosts() {
    assert_eq!(
        ok(&["--host", "localhost"], &[]).host,
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    );
    assert_eq!(
        ok(&["--host", "[::]"], &[]).host,
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    );
}

#[test]
fn durations_take_units() {
    for (text, want) in [
        ("25s", Duration::from_secs(25)),
        ("500ms", Duration::from_millis(500)),
        ("2m", Duration::from_secs(120)),
        ("1m 30s", Duration::from_secs(90)),
        ("1h", Duration::from_secs(3600)),
    ] {
        let c = ok(&["--shutdown-grace", text], &[]);
        assert_eq!(c.shutdown_grace, want, "--shutdown-grace {text}");
        let c = ok(&[], &[("HUBBUB_SHUTDOWN_GRACE", text)]);
        assert_eq!(c.shutdown_grace, want, "HUBBUB_SHUTDOWN_GRACE={text}");
        let c = from_file(&format!("shutdown_grace = \"{text}\"\n"));
        assert_eq!(c.shutdown_grace, want, "shutdown_grace = {text:?}");
    }
}

#[test]
fn an_empty_public_ws_url_means_derive_it() {
    assert_eq!(ok(&["--public-ws-url", ""], &[]).public_ws_url, None);
    // ...and an empty flag clears one from a lower layer (an empty
    // variable counts as unset: see below).
    let file = TempFile::new("public_ws_url = \"wss://example.com/\"\n");
    assert_eq!(
        ok(&["--config", &file.arg(), "--public-ws-url", ""], &[]).public_ws_url,
        None
    );
}

/// Compose's `${VAR}` with VAR unset gives an empty variable: for every key
/// it counts as unset, so the file's value (or the default) stays.
#[test]
fn an_empty_variable_counts_as_unset_for_every_key() {
    let dir = TempDir::new(true);
    let file = TempFile::new(&format!(
        r#"host = "0.0.0.0"
http_port = 9000
ws_port = 9001
public_ws_url = "wss://chat.example.com/ws"
allowed_origins = ["https://chat.example.com"]
static_dir = "{}"
max_connections = 50
max_message_bytes = 1024
send_queue = 8
allow_binary = false
handshake_timeout = "3s"
ping_interval = "500ms"
idle_timeout = "2m"
shutdown_grace = "1500ms"
log_format = "json"
"#,
        dir.arg()
    ));
    let only_file = ok(&["--config", &file.arg()], &[]);
    for key in hubbub::config::KEYS {
        let var = format!("HUBBUB_{}", key.to_ascii_uppercase());
        for empty in ["", "  "] {
            let c = ok(&["--config", &file.arg()], &[(var.as_str(), empty)]);
            assert!(same(&c, &only_file), "{var}={empty:?} changed the config");
        }
    }
    // Nor does an empty HUBBUB_CONFIG name a file, and the defaults stay.
    let c = ok(&[], &[("HUBBUB_CONFIG", ""), ("HUBBUB_HOST", "")]);
    assert!(same(&c, &Config::default()));
}

/// Every number and duration has an upper bound: a value beyond it is a
/// start-up error naming the key, never a panic or a server that runs
/// half-dead (a semaphore too large, a frame reserved whole, a deadline
/// that overflows).
#[test]
fn values_beyond_their_range_are_refused() {
    for (var, value, key) in [
        (
            "HUBBUB_MAX_CONNECTIONS",
            "2305843009213693952",
            "max_connections",
        ),
        ("HUBBUB_MAX_CONNECTIONS", "1000001", "max_connections"),
        (
            "HUBBUB_MAX_MESSAGE_BYTES",
            "1000000000000",
            "max_message_bytes",
        ),
        (
            "HUBBUB_MAX_MESSAGE_BYTES",
            "9223372036854775807",
            "max_message_bytes",
        ),
        ("HUBBUB_SEND_QUEUE", "65537", "send_queue"),
        (
            "HUBBUB_HANDSHAKE_TIMEOUT",
            "10000000000000000000s",
            "handshake_timeout",
        ),
        ("HUBBUB_PING_INTERVAL", "2h", "ping_interval"),
        (
            "HUBBUB_IDLE_TIMEOUT",
            "10000000000000000000s",
            "idle_timeout",
        ),
        ("HUBBUB_SHUTDOWN_GRACE", "1000d", "shutdown_grace"),
        ("HUBBUB_PING_INTERVAL", "1ms", "ping_interval"),
    ] {
        let msg = env_error(var, value, key);
        assert!(msg.contains("must be from"), "{msg}");
    }
    file_error(
        "max_message_bytes = 1000000000000\n",
        1,
        &["key `max_message_bytes`", "from 16 to 16777216"],
    );
}

// ---------------------------------------------------------------------------
// Allowed origins
// ---------------------------------------------------------------------------

#[test]
fn allowed_origins_comma_separated_flag() {
    let c = ok(
        &[
            "--allowed-origins",
            "https://a.example,http://b.example:8080",
        ],
        &[],
    );
    assert_eq!(
        c.allowed_origins,
        OriginPolicy::List(vec![
            "https://a.example".into(),
            "http://b.example:8080".into()
        ])
    );
}

#[test]
fn allowed_origins_repeated_flag_and_mixed() {
    let c = ok(
        &[
            "--allowed-origins",
            "https://a.example",
            "--allowed-origins",
            "https://b.example,https://c.example",
            "--allowed-origins=https://d.example",
        ],
        &[],
    );
    assert_eq!(
        c.allowed_origins,
        OriginPolicy::List(vec![
            "https://a.example".into(),
            "https://b.example".into(),
            "https://c.example".into(),
            "https://d.example".into()
        ])
    );
}

#[test]
fn allowed_origins_are_normalised_and_star_means_any() {
    let c = ok(&["--allowed-origins", "HTTPS://Chat.Example.COM/"], &[]);
    assert_eq!(
        c.allowed_origins,
        OriginPolicy::List(vec!["https://chat.example.com".into()])
    );
    assert_eq!(
        ok(&[], &[("HUBBUB_ALLOWED_ORIGINS", "https://a.example,*")]).allowed_origins,
        OriginPolicy::Any
    );
    assert_eq!(
        from_file("allowed_origins = [\"*\"]\n").allowed_origins,
        OriginPolicy::Any
    );
    // An empty list is the default policy, not "nobody".
    assert_eq!(
        from_file("allowed_origins = []\n").allowed_origins,
        OriginPolicy::SameHost
    );
}

// ---------------------------------------------------------------------------
// Precedence
// ---------------------------------------------------------------------------

/// One key, all four layers: each alone, then each higher layer over the
/// lower ones.
#[track_caller]
fn check_precedence<T: PartialEq + std::fmt::Debug>(
    key: &str,
    get: impl Fn(&Config) -> T,
    default: T,
    file_value: (&str, T),
    env_value: (&str, T),
    flag_value: (&str, T),
) {
    let flag = format!("--{}", key.replace('_', "-"));
    let var = format!("HUBBUB_{}", key.to_ascii_uppercase());
    let file = TempFile::new(&format!(
        "# precedence of {key}\n{key} = {}\n",
        file_value.0
    ));
    let cfg = file.arg();

    assert_eq!(get(&ok(&[], &[])), default, "{key}: default");
    assert_eq!(
        get(&ok(&["--config", &cfg], &[])),
        file_value.1,
        "{key}: file alone"
    );
    assert_eq!(
        get(&ok(&[], &[(&var, env_value.0)])),
        env_value.1,
        "{key}: env alone"
    );
    assert_eq!(
        get(&ok(&[&flag, flag_value.0], &[])),
        flag_value.1,
        "{key}: flag alone"
    );
    assert_eq!(
        get(&ok(&["--config", &cfg], &[(&var, env_value.0)])),
        env_value.1,
        "{key}: env beats file"
    );
    assert_eq!(
        get(&ok(&["--config", &cfg, &flag, flag_value.0], &[])),
        flag_value.1,
        "{key}: flag beats file"
    );
    assert_eq!(
        get(&ok(&[&flag, flag_value.0], &[(&var, env_value.0)])),
        flag_value.1,
        "{key}: flag beats env"
    );
    assert_eq!(
        get(&ok(
            &["--config", &cfg, &flag, flag_value.0],
            &[(&var, env_value.0)]
        )),
        flag_value.1,
        "{key}: flag beats env and file"
    );
}

#[test]
fn precedence_http_port() {
    check_precedence(
        "http_port",
        |c| c.http_port,
        8080,
        ("9001", 9001),
        ("9002", 9002),
        ("9003", 9003),
    );
}

#[test]
fn precedence_send_queue() {
    check_precedence(
        "send_queue",
        |c| c.send_queue,
        256,
        ("10", 10),
        ("20", 20),
        ("30", 30),
    );
}

#[test]
fn precedence_allow_binary() {
    check_precedence(
        "allow_binary",
        |c| c.allow_binary,
        true,
        ("false", false),
        ("true", true),
        ("false", false),
    );
}

#[test]
fn precedence_shutdown_grace() {
    check_precedence(
        "shutdown_grace",
        |c| c.shutdown_grace,
        Duration::from_secs(5),
        ("\"7s\"", Duration::from_secs(7)),
        ("250ms", Duration::from_millis(250)),
        ("1m", Duration::from_secs(60)),
    );
}

#[test]
fn precedence_log_format() {
    check_precedence(
        "log_format",
        |c| c.log_format,
        LogFormat::Text,
        ("\"json\"", LogFormat::Json),
        ("text", LogFormat::Text),
        ("json", LogFormat::Json),
    );
}

#[test]
fn precedence_host() {
    check_precedence(
        "host",
        |c| c.host,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        ("\"0.0.0.0\"", IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        ("::1", IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ("127.0.0.2", IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))),
    );
}

#[test]
fn precedence_allowed_origins() {
    let list = |v: &[&str]| OriginPolicy::List(v.iter().map(|s| s.to_string()).collect());
    check_precedence(
        "allowed_origins",
        |c| c.allowed_origins.clone(),
        OriginPolicy::SameHost,
        (
            "[\"https://file.example\"]",
            list(&["https://file.example"]),
        ),
        (
            "https://env.example,https://env2.example",
            list(&["https://env.example", "https://env2.example"]),
        ),
        ("*", OriginPolicy::Any),
    );
}

#[test]
fn layers_combine_key_by_key() {
    // Each layer supplies a different key; nothing set in a lower layer is
    // lost because a higher layer set some other key.
    let file = TempFile::new("http_port = 9200\nsend_queue = 4\n");
    let c = ok(
        &["--config", &file.arg(), "--send-queue", "5"],
        &[("HUBBUB_WS_PORT", "9201")],
    );
    assert_eq!(c.http_port, 9200);
    assert_eq!(c.ws_port, 9201);
    assert_eq!(c.send_queue, 5);
    assert_eq!(c.max_connections, 10_000);
}

#[test]
fn config_file_from_hubbub_config_and_flag_beats_it() {
    let from_env = TempFile::new("http_port = 9300\n");
    let from_flag = TempFile::new("http_port = 9301\n");
    let c = ok(&[], &[("HUBBUB_CONFIG", &from_env.arg())]);
    assert_eq!(c.http_port, 9300);
    let c = ok(
        &["--config", &from_flag.arg()],
        &[("HUBBUB_CONFIG", &from_env.arg())],
    );
    assert_eq!(c.http_port, 9301);
    // An empty HUBBUB_CONFIG means no file.
    let c = ok(&[], &[("HUBBUB_CONFIG", "")]);
    assert_eq!(c.http_port, 8080);
}

#[test]
fn an_empty_file_is_all_defaults() {
    assert!(same(&from_file(""), &Config::default()));
    assert!(same(
        &from_file("# nothing but a comment\n\n"),
        &Config::default()
    ));
}

// ---------------------------------------------------------------------------
// File errors: file, line and key
// ---------------------------------------------------------------------------

#[test]
fn file_unknown_key() {
    file_error("http_port = 9000\n\ncolour = \"blue\"\n", 3, &["colour"]);
}

#[test]
fn file_unknown_key_that_looks_like_a_flag() {
    file_error(
        "# kebab-case is for flags\nhttp-port = 9000\n",
        2,
        &["http-port"],
    );
}

#[test]
fn file_wrong_type() {
    file_error(
        "host = \"127.0.0.1\"\nhttp_port = \"8080\"\n",
        2,
        &["http_port"],
    );
    file_error("\n\nallow_binary = \"yes\"\n", 3, &["allow_binary"]);
    file_error("send_queue = 1.5\n", 1, &["send_queue"]);
    file_error(
        "\nallowed_origins = \"https://a.example\"\n",
        2,
        &["allowed_origins"],
    );
    file_error("\nlog_format = 1\n", 2, &["log_format"]);
}

#[test]
fn file_syntax_error() {
    file_error("http_port = 9000\nws_port = \n", 2, &[]);
}

#[test]
fn file_bad_duration() {
    file_error(
        "# liveness\nping_interval = \"10s\"\nidle_timeout = \"soon\"\n",
        3,
        &["key `idle_timeout`", "soon"],
    );
    file_error(
        "\nhandshake_timeout = \"10\"\n",
        2,
        &["key `handshake_timeout`"],
    );
}

#[test]
fn file_duration_without_quotes_or_unit() {
    file_error(
        "send_queue = 4\nping_interval = 25\n",
        2,
        &["key `ping_interval`", "string"],
    );
}

#[test]
fn file_timeouts_of_zero() {
    for key in [
        "handshake_timeout",
        "ping_interval",
        "idle_timeout",
        "shutdown_grace",
    ] {
        file_error(
            &format!("# a zero timeout\n\n{key} = \"0s\"\n"),
            3,
            &[&format!("key `{key}`"), "zero"],
        );
    }
    file_error("shutdown_grace = \"0ms\"\n", 1, &["key `shutdown_grace`"]);
}

#[test]
fn file_zero_send_queue_and_max_connections() {
    file_error(
        "http_port = 9000\nsend_queue = 0\n",
        2,
        &["key `send_queue`", "from 1 to 65536"],
    );
    file_error(
        "\n\n\nmax_connections = 0\n",
        4,
        &["key `max_connections`", "from 1 to 1000000"],
    );
    file_error("max_connections = -5\n", 1, &["key `max_connections`"]);
    file_error("\nmax_message_bytes = 0\n", 2, &["key `max_message_bytes`"]);
}

#[test]
fn file_listeners_on_the_same_port() {
    let msg = file_error(
        "host = \"127.0.0.1\"\nhttp_port = 9000\nws_port = 9000\n",
        3,
        &["key `ws_port`", "9000"],
    );
    assert!(msg.contains("127.0.0.1:9000"), "{msg}");
}

#[test]
fn file_http_port_on_the_default_ws_port() {
    // Only http_port was written down, so that is the line to fix; blaming
    // the default of ws_port would send the operator looking for a setting
    // that does not exist.
    file_error(
        "# moved the page\nhttp_port = 8081\n",
        2,
        &["key `http_port`", "8081"],
    );
}

#[test]
fn file_ws_port_on_the_default_http_port() {
    file_error("\nws_port = 8080\n", 2, &["key `ws_port`", "8080"]);
}

#[test]
fn file_idle_timeout_not_longer_than_ping_interval() {
    file_error(
        "ping_interval = \"30s\"\nidle_timeout = \"30s\"\n",
        2,
        &["key `idle_timeout`", "ping_interval"],
    );
    file_error(
        "ping_interval = \"30s\"\n\nidle_timeout = \"10s\"\n",
        3,
        &["key `idle_timeout`"],
    );
}

#[test]
fn file_ping_interval_not_shorter_than_default_idle_timeout() {
    // idle_timeout is the default 60s; the value the operator wrote is
    // ping_interval, on line 2.
    file_error(
        "# slow pings\nping_interval = \"90s\"\n",
        2,
        &["key `ping_interval`", "idle_timeout"],
    );
}

#[test]
fn file_bad_host() {
    file_error(
        "\nhost = \"chat.example.com\"\n",
        2,
        &["key `host`", "chat.example.com"],
    );
    file_error("host = \"127.0.0.256\"\n", 1, &["key `host`"]);
}

#[test]
fn file_port_out_of_range() {
    file_error(
        "http_port = 9000\nws_port = 70000\n",
        2,
        &["key `ws_port`", "70000"],
    );
    file_error("http_port = 65536\n", 1, &["key `http_port`", "65536"]);
    file_error("http_port = -1\n", 1, &["key `http_port`"]);
}

#[test]
fn file_bad_log_format() {
    file_error(
        "\n\nlog_format = \"xml\"\n",
        3,
        &["key `log_format`", "xml"],
    );
}

#[test]
fn file_bad_origin() {
    file_error(
        "allowed_origins = [\n  \"https://ok.example\",\n  \"chat.example.com\",\n]\n",
        1,
        &["key `allowed_origins`", "chat.example.com"],
    );
    file_error(
        "\nallowed_origins = [\"https://a.example/path\"]\n",
        2,
        &["key `allowed_origins`"],
    );
}

#[test]
fn file_bad_public_ws_url() {
    file_error(
        "\npublic_ws_url = \"http://chat.example.com/\"\n",
        2,
        &["key `public_ws_url`", "http://chat.example.com/"],
    );
    file_error("public_ws_url = \"ws://\"\n", 1, &["key `public_ws_url`"]);
}

#[test]
fn file_static_dir_without_client_html() {
    let dir = TempDir::new(false);
    let msg = file_error(
        &format!("# restyled page\nstatic_dir = \"{}\"\n", dir.arg()),
        2,
        &["key `static_dir`", "client.html"],
    );
    assert!(msg.contains(&dir.arg()), "{msg}");
    let missing = unique_path("no-such-dir");
    file_error(
        &format!("static_dir = \"{}\"\n", missing.display()),
        1,
        &["key `static_dir`"],
    );
}

#[test]
fn file_errors_carry_their_source() {
    let file = TempFile::new("\n\nsend_queue = 0\n");
    let (e, _) = err(&["--config", &file.arg()], &[]);
    assert_invalid(&e, "send_queue", &file_source(&file, 3));
}

#[test]
fn missing_config_file() {
    let path = unique_path("missing.toml");
    let arg = path.display().to_string();
    let (e, msg) = err(&["--config", &arg], &[]);
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    assert!(msg.contains(&arg), "message should name the file: {msg}");
    let (e, msg) = err(&[], &[("HUBBUB_CONFIG", &arg)]);
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    assert!(msg.contains(&arg), "message should name the file: {msg}");
}

#[test]
fn a_directory_as_config_file() {
    let dir = TempDir::new(false);
    let (e, msg) = err(&["--config", &dir.arg()], &[]);
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    assert!(msg.contains(&dir.arg()), "{msg}");
}

// ---------------------------------------------------------------------------
// Environment errors name HUBBUB_...
// ---------------------------------------------------------------------------

#[track_caller]
fn env_error(var: &str, value: &str, key: &str) -> String {
    let (e, msg) = err(&[], &[(var, value)]);
    assert_invalid(&e, key, &env_source(var));
    assert!(
        msg.contains(&format!("environment variable {var}")),
        "message should name {var}: {msg}"
    );
    assert!(
        msg.contains(&format!("key `{key}`")),
        "message should name the key {key}: {msg}"
    );
    msg
}

#[test]
fn env_errors_name_the_variable() {
    let dir = TempDir::new(false);
    env_error("HUBBUB_HOST", "not-an-ip", "host");
    env_error("HUBBUB_HTTP_PORT", "eighty", "http_port");
    env_error("HUBBUB_WS_PORT", "65536", "ws_port");
    env_error(
        "HUBBUB_PUBLIC_WS_URL",
        "https://x.example/",
        "public_ws_url",
    );
    env_error(
        "HUBBUB_ALLOWED_ORIGINS",
        "https://a.example,b",
        "allowed_origins",
    );
    env_error("HUBBUB_STATIC_DIR", &dir.arg(), "static_dir");
    env_error("HUBBUB_MAX_CONNECTIONS", "0", "max_connections");
    env_error("HUBBUB_MAX_MESSAGE_BYTES", "-1", "max_message_bytes");
    env_error("HUBBUB_SEND_QUEUE", "0", "send_queue");
    env_error("HUBBUB_ALLOW_BINARY", "maybe", "allow_binary");
    env_error("HUBBUB_HANDSHAKE_TIMEOUT", "0ms", "handshake_timeout");
    env_error("HUBBUB_PING_INTERVAL", "often", "ping_interval");
    env_error("HUBBUB_IDLE_TIMEOUT", "60", "idle_timeout");
    env_error("HUBBUB_SHUTDOWN_GRACE", "0s", "shutdown_grace");
    env_error("HUBBUB_LOG_FORMAT", "yaml", "log_format");
}

#[test]
fn env_cross_key_errors_name_the_variable() {
    let (e, _) = err(
        &[],
        &[("HUBBUB_HTTP_PORT", "9400"), ("HUBBUB_WS_PORT", "9400")],
    );
    assert_invalid(&e, "ws_port", &env_source("HUBBUB_WS_PORT"));
    let (e, msg) = err(&[], &[("HUBBUB_HTTP_PORT", "8081")]);
    assert_invalid(&e, "http_port", &env_source("HUBBUB_HTTP_PORT"));
    assert!(msg.contains("HUBBUB_HTTP_PORT"), "{msg}");
    let (e, _) = err(&[], &[("HUBBUB_IDLE_TIMEOUT", "20s")]);
    assert_invalid(&e, "idle_timeout", &env_source("HUBBUB_IDLE_TIMEOUT"));
    let (e, _) = err(&[], &[("HUBBUB_PING_INTERVAL", "2m")]);
    assert_invalid(&e, "ping_interval", &env_source("HUBBUB_PING_INTERVAL"));
}

// ---------------------------------------------------------------------------
// Flag errors name --...
// ---------------------------------------------------------------------------

#[track_caller]
fn flag_error(args: &[&str], key: &str) -> String {
    let (e, msg) = err(args, &[]);
    let name = key.replace('_', "-");
    assert_invalid(&e, key, &flag_source(&name));
    assert!(
        msg.contains(&format!("flag --{name}")),
        "message should name --{name}: {msg}"
    );
    assert!(
        msg.contains(&format!("key `{key}`")),
        "message should name the key {key}: {msg}"
    );
    msg
}

#[test]
fn flag_errors_name_the_flag() {
    let dir = TempDir::new(false);
    flag_error(&["--host", "localhost.example"], "host");
    flag_error(&["--http-port", "99999"], "http_port");
    flag_error(&["--ws-port=-1"], "ws_port");
    flag_error(&["--public-ws-url", "chat.example.com"], "public_ws_url");
    flag_error(
        &[
            "--allowed-origins",
            "https://a.example",
            "--allowed-origins",
            "ftp://b",
        ],
        "allowed_origins",
    );
    flag_error(&["--static-dir", &dir.arg()], "static_dir");
    flag_error(&["--max-connections", "0"], "max_connections");
    flag_error(&["--max-message-bytes", "lots"], "max_message_bytes");
    flag_error(&["--send-queue", "0"], "send_queue");
    flag_error(&["--allow-binary", "nope"], "allow_binary");
    flag_error(&["--handshake-timeout", "0s"], "handshake_timeout");
    flag_error(&["--ping-interval", "1 fortnight"], "ping_interval");
    flag_error(&["--idle-timeout", "0ms"], "idle_timeout");
    flag_error(&["--shutdown-grace=-1s"], "shutdown_grace");
    flag_error(&["--log-format", "pretty"], "log_format");
}

#[test]
fn flag_cross_key_errors_name_the_flag() {
    let msg = flag_error(&["--http-port", "9500", "--ws-port", "9500"], "ws_port");
    assert!(msg.contains("9500"), "{msg}");
    flag_error(&["--http-port", "8081"], "http_port");
    flag_error(&["--ws-port", "8080"], "ws_port");
    flag_error(
        &["--ping-interval", "10s", "--idle-timeout", "10s"],
        "idle_timeout",
    );
    flag_error(&["--ping-interval", "61s"], "ping_interval");
    flag_error(&["--idle-timeout", "25s"], "idle_timeout");
}

#[test]
fn a_conflict_across_layers_names_the_higher_layer() {
    // The file sets http_port, a flag moves ws_port onto it: the flag is the
    // later (and the more specific) setting.
    let file = TempFile::new("http_port = 9600\n");
    let (e, _) = err(&["--config", &file.arg(), "--ws-port", "9600"], &[]);
    assert_invalid(&e, "ws_port", &flag_source("ws-port"));
    // The file sets ws_port, the environment moves http_port onto it.
    let file = TempFile::new("\nws_port = 9601\n");
    let (e, _) = err(&["--config", &file.arg()], &[("HUBBUB_HTTP_PORT", "9601")]);
    assert_invalid(&e, "http_port", &env_source("HUBBUB_HTTP_PORT"));
    // The file sets idle_timeout, a flag raises ping_interval past it.
    let file = TempFile::new("idle_timeout = \"40s\"\n");
    let (e, _) = err(&["--config", &file.arg(), "--ping-interval", "40s"], &[]);
    assert_invalid(&e, "ping_interval", &flag_source("ping-interval"));
}

#[test]
fn flag_syntax_is_checked_by_clap() {
    let argv = ["hubbub", "--no-such-flag", "1"];
    assert!(Cli::try_parse_from(argv).is_err());
    let argv = ["hubbub", "--http-port"];
    assert!(Cli::try_parse_from(argv).is_err());
}

/// A browser never sends a default port, so an allowlist entry with one is
/// stored without it and still matches.
#[test]
fn allowed_origins_drop_default_ports() {
    let c = ok(
        &[
            "--allowed-origins",
            "https://chat.example.com:443,http://chat.example.com:80,http://a.example:8080",
        ],
        &[],
    );
    assert_eq!(
        c.allowed_origins,
        OriginPolicy::List(vec![
            "https://chat.example.com".into(),
            "http://chat.example.com".into(),
            "http://a.example:8080".into()
        ])
    );
}

//! Fuzz targets for every parser of hubbub's that sees outside input: the
//! configuration file, origins, room names and resume points in WebSocket
//! URLs, forwarding headers and connection tokens. Each must answer (Ok or a clear error) and
//! never panic, whatever it is given.
//!
//! Run by `cargo test` with bolero's random engine: inputs are random bytes
//! and strings, not coverage-guided, and the number of inputs per target is
//! bounded (`BOLERO_RANDOM_ITERATIONS`, default below), so the run stops by
//! itself.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};

use hubbub::clients::TrustedProxies;
use hubbub::config::{Config, OriginPolicy, Settings};
use hubbub::origin::{normalise, OriginCheck};
use hubbub::protocol;
use hyper::header::{HeaderMap, HeaderValue};

/// Inputs per target unless `BOLERO_RANDOM_ITERATIONS` says otherwise.
fn iterations() -> usize {
    std::env::var("BOLERO_RANDOM_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

#[test]
fn origins() {
    let checks = [
        OriginCheck {
            policy: OriginPolicy::SameHost,
            http_port: 8080,
            bind_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        },
        OriginCheck {
            policy: OriginPolicy::SameHost,
            http_port: 8080,
            bind_host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        },
        OriginCheck {
            policy: OriginPolicy::List(vec!["https://chat.example.com".into()]),
            http_port: 8080,
            bind_host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        },
    ];
    bolero::check!()
        .with_iterations(iterations())
        .with_type::<(String, String)>()
        .for_each(|(origin, host)| {
            if let Some(n) = normalise(origin) {
                // A normalised origin is stable.
                assert_eq!(normalise(&n).as_deref(), Some(n.as_str()));
            }
            for check in &checks {
                let _ = check.allows(Some(origin), Some(host));
            }
        });
}

#[test]
fn websocket_urls() {
    bolero::check!()
        .with_iterations(iterations())
        .with_type::<(String, String)>()
        .for_each(|(path, query)| {
            for path in [path.clone(), format!("/rooms/{path}")] {
                if let Ok(target) = protocol::target(&path, Some(query)) {
                    assert!(protocol::valid_room_name(&target.room), "{target:?}");
                }
            }
        });
}

#[test]
fn forwarding_headers() {
    let trusted = TrustedProxies(vec!["10.0.0.0/8".parse().expect("net")]);
    let proxy: IpAddr = "10.0.0.1".parse().expect("ip");
    bolero::check!()
        .with_iterations(iterations())
        .with_type::<(Vec<u8>, Vec<u8>)>()
        .for_each(|(xff, forwarded)| {
            let mut headers = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(xff) {
                headers.insert("x-forwarded-for", v);
            }
            if let Ok(v) = HeaderValue::from_bytes(forwarded) {
                headers.insert("forwarded", v);
            }
            if let Some(client) = trusted.client(proxy, &headers) {
                assert!(!trusted.contains(client), "a proxy named as the client");
            }
        });
}

static FILES: AtomicUsize = AtomicUsize::new(0);

#[test]
fn configuration_files() {
    let path = std::env::temp_dir().join(format!(
        "hubbub-fuzz-{}-{}.toml",
        std::process::id(),
        FILES.fetch_add(1, Ordering::Relaxed)
    ));
    // Random text, and random values under real keys (which reach the
    // value parsers rather than stopping at TOML syntax).
    let keys = hubbub::config::KEYS;
    bolero::check!()
        .with_iterations(iterations() / 10)
        .with_type::<(Vec<u8>, u8, String)>()
        .for_each(|(bytes, key, value)| {
            let key = keys[*key as usize % keys.len()];
            for contents in [
                bytes.clone(),
                format!("{} = {value}\n", hubbub::config::file_name(key)).into_bytes(),
                format!(
                    "{} = \"{}\"\n",
                    hubbub::config::file_name(key),
                    value.escape_default()
                )
                .into_bytes(),
            ] {
                if std::fs::write(&path, &contents).is_err() {
                    return;
                }
                let flags = Settings {
                    config: Some(path.clone()),
                    ..Default::default()
                };
                let _ = Config::resolve(&flags, &HashMap::new());
            }
            // And the same value from a variable.
            let env = HashMap::from([(
                format!("HUBBUB_{}", key.to_ascii_uppercase()),
                value.clone(),
            )]);
            let _ = Config::resolve(&Settings::default(), &env);
        });
    let _ = std::fs::remove_file(&path);
}

/// Connection tokens: random strings, and random headers and claims around
/// a well-formed shape, must be admitted or refused with 401/403, never
/// panic (the token reaches the parser before anything is trusted).
#[test]
fn connection_tokens() {
    use base64::Engine;
    use hubbub::auth::{Auth, Key, Mode, Patterns};
    let auth = Auth::new(
        Mode::Required,
        Some(Key::secret("a fuzzing secret that is long enough to use")),
        Patterns(vec!["private-*".into()]),
    );
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    bolero::check!()
        .with_iterations(iterations())
        .with_type::<(String, String, String, String)>()
        .for_each(|(raw, header, claims, room)| {
            for token in [
                raw.clone(),
                format!("{}.{}.{}", b64(header), b64(claims), b64(raw)),
                format!("{}.{}.", b64(r#"{"alg":"HS256"}"#), b64(claims)),
            ] {
                for room in [room.as_str(), "lobby", "private-x"] {
                    if let Err(refusal) = auth.admit(Some(&token), room) {
                        assert!(matches!(refusal.status, 401 | 403), "{refusal:?}");
                    }
                }
            }
        });
}

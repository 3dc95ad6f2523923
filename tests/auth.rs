//! Signed connection tokens and private rooms, with tokens made at test
//! time: HS256 with a secret, EdDSA with a key pair from rcgen. Every
//! refusal is an HTTP status with a one-line reason that never repeats the
//! token or the secret; a verified sender is stamped on its messages; a
//! token that expires closes its connection with 4001.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::StreamExt;
use hubbub::auth::{Mode, Patterns};
use hubbub::config::Secret;
use hubbub::Config;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

const SECRET: &str = "a test secret that is long enough for HS256 use";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token")
}

fn claims(sub: &str, name: &str) -> Value {
    json!({"sub": sub, "name": name, "exp": now() + 600})
}

fn config(mode: Mode) -> Config {
    Config {
        auth_mode: mode,
        jwt_secret: Some(Secret(SECRET.into())),
        ..Config::ephemeral()
    }
}

/// A handshake's refusal: its status and body.
async fn refused(server: &TestServer, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut request = format!("ws://{}{path}", server.ws)
        .into_client_request()
        .expect("request");
    if let Some(token) = bearer {
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("answered")
    {
        Err(tungstenite::Error::Http(r)) => (
            r.status().as_u16(),
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected a refusal for {path}"),
    }
}

async fn v1(server: &TestServer, path: &str) -> Ws {
    let mut ws = connect_to(server.ws, path, true).await.expect("v1 connect");
    let hello = next_envelope(&mut ws, false).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    ws
}

async fn next_message(ws: &mut Ws) -> Value {
    loop {
        let e = next_envelope(ws, false).await;
        if e["type"] == "message" {
            return e;
        }
    }
}

#[tokio::test]
async fn a_verified_sender_is_stamped_on_its_messages() {
    let server = TestServer::start(config(Mode::Optional)).await;
    let token = hs256(&claims("u-1", "Alice"));
    let mut alice = v1(&server, &format!("/rooms/r?token={token}")).await;
    let mut anon = v1(&server, "/rooms/r").await;
    send_text(&mut alice, "hi").await;
    let m = next_message(&mut anon).await;
    assert_eq!(m["from"], json!({"id": "u-1", "name": "Alice"}), "{m}");
    assert_eq!(next_message(&mut alice).await["from"]["name"], "Alice");
    // An anonymous sender is null; nobody can claim a name by sending one.
    send_text(&mut anon, r#"{"from":{"id":"u-1","name":"Alice"}}"#).await;
    let m = next_message(&mut alice).await;
    assert_eq!(m["from"], Value::Null, "{m}");
    // Raw clients get the message as sent, nothing added.
    let mut raw = connect_to(server.ws, "/rooms/r", false).await.expect("raw");
    send_text(&mut alice, "plain").await;
    assert_eq!(next_text(&mut raw).await, "plain");
}

#[tokio::test]
async fn a_bearer_header_works_like_the_query() {
    let server = TestServer::start(config(Mode::Required)).await;
    let token = hs256(&claims("u-2", "Bob"));
    let mut request = format!("ws://{}/rooms/b", server.ws)
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "hubbub.v1".parse().expect("h"));
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("admitted");
    next_envelope(&mut ws, false).await;
    send_text(&mut ws, "x").await;
    assert_eq!(next_message(&mut ws).await["from"]["id"], "u-2");
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_and_a_reason_that_hides_them() {
    let server = TestServer::start(config(Mode::Required)).await;
    let other_secret = EncodingKey::from_secret(b"another secret entirely, also long enough");
    let t = now();
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing", None, "required"),
        (
            "expired",
            Some(hs256(&json!({"sub": "a", "exp": t - 3600}))),
            "expired",
        ),
        (
            "not yet valid",
            Some(hs256(
                &json!({"sub": "a", "exp": t + 7200, "nbf": t + 3600}),
            )),
            "not valid yet",
        ),
        (
            "wrong signature",
            Some(
                encode(
                    &Header::new(Algorithm::HS256),
                    &json!({"sub": "a", "exp": t + 600}),
                    &other_secret,
                )
                .expect("token"),
            ),
            "signature",
        ),
        (
            "another algorithm",
            Some(
                encode(
                    &Header::new(Algorithm::HS384),
                    &json!({"sub": "a", "exp": t + 600}),
                    &EncodingKey::from_secret(SECRET.as_bytes()),
                )
                .expect("token"),
            ),
            "algorithm",
        ),
        ("alg none", Some(alg_none(t + 600)), "algorithm"),
        ("no exp", Some(hs256(&json!({"sub": "a"}))), "claims"),
        ("no sub", Some(hs256(&json!({"exp": t + 600}))), "claims"),
        (
            "sub not a string",
            Some(hs256(&json!({"sub": 7, "exp": t + 600}))),
            "claims",
        ),
        ("garbage", Some("not.a.token".into()), "malformed"),
    ];
    for (what, token, word) in cases {
        let path = match &token {
            Some(token) => format!("/rooms/x?token={token}"),
            None => "/rooms/x".into(),
        };
        let (status, body) = refused(&server, &path, None).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(body.contains(word), "{what}: {body:?} should say {word:?}");
        assert_eq!(body.trim_end().lines().count(), 1, "{what}: one line");
        assert!(!body.contains(SECRET), "{what}: the secret leaked");
        if let Some(token) = &token {
            assert!(!body.contains(token.as_str()), "{what}: the token leaked");
        }
    }
    assert!(
        server
            .metric("hubbub_connections_total{result=\"unauthorized\"}")
            .await
            >= 10
    );
}

/// A token that says `alg: none`, with no signature.
fn alg_none(exp: u64) -> String {
    use base64::Engine;
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&json!({"sub": "a", "exp": exp}))
    )
}

#[tokio::test]
async fn rooms_outside_the_token_and_private_rooms() {
    let server = TestServer::start(Config {
        private_rooms: Patterns(vec!["private-*".into(), "staff".into()]),
        ..config(Mode::Optional)
    })
    .await;
    let limited = hs256(&json!({"sub": "c", "exp": now() + 600, "rooms": ["team-*", "private-c"]}));
    v1(&server, &format!("/rooms/team-1?token={limited}")).await;
    v1(&server, &format!("/rooms/private-c?token={limited}")).await;
    let (status, body) = refused(&server, &format!("/rooms/lobby?token={limited}"), None).await;
    assert_eq!(
        (status, body.trim()),
        (403, "the token does not allow this room")
    );
    let (status, _) = refused(&server, &format!("/rooms/private-d?token={limited}"), None).await;
    assert_eq!(status, 403);
    // A private room needs a token that names it: no token, or a token
    // without `rooms`, is not enough.
    let (status, body) = refused(&server, "/rooms/staff", None).await;
    assert_eq!(status, 401, "{body}");
    let open = hs256(&claims("d", "D"));
    let (status, _) = refused(&server, &format!("/rooms/staff?token={open}"), None).await;
    assert_eq!(status, 403);
    v1(&server, &format!("/rooms/anything?token={open}")).await;
    v1(&server, "/rooms/public").await;
}

#[tokio::test]
async fn private_rooms_hold_with_auth_off_and_off_changes_nothing() {
    let server = TestServer::start(Config {
        private_rooms: Patterns(vec!["private-*".into()]),
        ..Config::ephemeral()
    })
    .await;
    let (status, body) = refused(&server, "/rooms/private-x", None).await;
    assert_eq!(status, 401, "{body}");
    // Nothing else changes: any token is ignored, envelopes carry no `from`.
    let mut ws = v1(&server, "/rooms/open?token=whatever").await;
    send_text(&mut ws, "same as ever").await;
    let m = next_message(&mut ws).await;
    assert!(m.get("from").is_none(), "{m}");
}

#[tokio::test]
async fn a_token_that_expires_while_connected_closes_with_4001() {
    let server = TestServer::start(config(Mode::Required)).await;
    // Expired 29 s ago: still inside the 30 s leeway, for about a second.
    let token = hs256(&json!({"sub": "e", "exp": now() - 29}));
    let mut ws = connect_to(server.ws, &format!("/rooms/e?token={token}"), false)
        .await
        .expect("admitted within the leeway");
    let started = std::time::Instant::now();
    let frame = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(Some(frame)))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(frame.code, CloseCode::Library(4001));
    assert_eq!(frame.reason.as_str(), "token expired");
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn an_eddsa_public_key_checks_tokens() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let dir = std::env::temp_dir().join(format!("hubbub-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let public = dir.join("public.pem");
    std::fs::write(&public, key.public_key_pem()).expect("write");
    let flags = hubbub::config::Settings {
        jwt_public_key: Some(public.display().to_string()),
        auth_mode: Some("required".into()),
        http_port: Some("0".into()),
        ws_port: Some("0".into()),
        ..Default::default()
    };
    let config = Config::resolve(&flags, &Default::default()).expect("config with a public key");
    let server = TestServer::start(config).await;
    let signing = EncodingKey::from_ed_pem(key.serialize_pem().as_bytes()).expect("signing key");
    let token = encode(
        &Header::new(Algorithm::EdDSA),
        &claims("k", "Kim"),
        &signing,
    )
    .expect("token");
    let mut ws = v1(&server, &format!("/rooms/k?token={token}")).await;
    send_text(&mut ws, "signed").await;
    assert_eq!(next_message(&mut ws).await["from"]["name"], "Kim");
    // An HS256 token made with the public key as its secret (the classic
    // confusion) is refused.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims("k", "Mallory"),
        &EncodingKey::from_secret(key.public_key_pem().as_bytes()),
    )
    .expect("token");
    let (status, _) = refused(&server, &format!("/rooms/k?token={forged}"), None).await;
    assert_eq!(status, 401);
    let _ = std::fs::remove_dir_all(dir);
}

/// The next presence notice that says `online: n`.
async fn presence_with(ws: &mut Ws, n: u64) -> Value {
    loop {
        let e = next_envelope(ws, true).await;
        if e["type"] == "presence" && e["online"] == n {
            return e;
        }
    }
}

#[tokio::test]
async fn presence_lists_verified_members_once_each_in_small_rooms() {
    let server = TestServer::start(Config {
        presence_members_max: 4,
        ..config(Mode::Optional)
    })
    .await;
    let alice = hs256(&claims("a", "Alice"));
    let bob = hs256(&claims("b", "Bob"));
    let mut watcher = v1(&server, &format!("/rooms/p?token={alice}")).await;
    let _tab2 = v1(&server, &format!("/rooms/p?token={alice}")).await;
    let _bob = v1(&server, &format!("/rooms/p?token={bob}")).await;
    let _anon = v1(&server, "/rooms/p").await;
    let p = presence_with(&mut watcher, 4).await;
    assert_eq!(
        p["members"],
        json!([{"id": "a", "name": "Alice"}, {"id": "b", "name": "Bob"}]),
        "{p}"
    );
    // One more peer than presence_members_max: the count only.
    let _fifth = v1(&server, "/rooms/p").await;
    let p = presence_with(&mut watcher, 5).await;
    assert!(p.get("members").is_none(), "{p}");
}

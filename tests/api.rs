//! The HTTP API under `/api/`: the key, publishing into a room (raw and
//! `hubbub.v1` peers and the history get it), reading history, listing
//! rooms, removing a user (4003), every error as JSON with its status, and
//! the OpenAPI document.

mod common;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::StreamExt;
use hubbub::config::Secret;
use hubbub::Config;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "an API key that is long enough to be one";

fn config() -> Config {
    Config {
        api_key: Some(Secret(KEY.into())),
        rate_limit_per_sec: 0,
        ..Config::ephemeral()
    }
}

async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let bearer = format!("Bearer {KEY}");
    let mut headers = vec![("Authorization", bearer.as_str())];
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let (status, _, text) = http_send(addr, method, path, &headers, bytes).await;
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, value)
}

async fn v1(server: &TestServer, path: &str) -> (Ws, Value) {
    let mut ws = connect_to(server.ws, path, true).await.expect("v1 connect");
    let hello = next_envelope(&mut ws, false).await;
    (ws, hello)
}

#[tokio::test]
async fn without_a_key_there_is_no_api() {
    let server = TestServer::default().await;
    let (status, _, _) = http_get(server.http, "/api/rooms").await;
    assert_eq!(status, 404);
    let (status, _, _) = http_get(server.http, "/api/openapi.json").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_key_is_required() {
    let server = TestServer::start(config()).await;
    let (status, headers, body) = http_get(server.http, "/api/rooms").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert!(serde_json::from_str::<Value>(&body).expect("JSON")["error"].is_string());
    let (status, _, _) = http_request(
        server.http,
        "GET",
        "/api/rooms",
        &[("Authorization", "Bearer not the key")],
    )
    .await;
    assert_eq!(status, 401);
    let (status, rooms) = call(server.http, "GET", "/api/rooms", None).await;
    assert_eq!(status, 200);
    assert_eq!(rooms, json!({"rooms": []}));
}

#[tokio::test]
async fn a_published_message_reaches_every_peer_and_the_history() {
    let server = TestServer::start(config()).await;
    let (mut v, hello) = v1(&server, "/rooms/news").await;
    let mut raw = connect_to(server.ws, "/rooms/news", false)
        .await
        .expect("raw");
    let (status, published) = call(
        server.http,
        "POST",
        "/api/rooms/news/messages",
        Some(json!({"data": "build 42 is green", "from": {"id": "ci", "name": "CI bot"}})),
    )
    .await;
    assert_eq!(status, 200, "{published}");
    assert_eq!(published["epoch"], hello["epoch"]);
    assert_eq!(published["offset"], 1);
    assert_eq!(next_text(&mut raw).await, "build 42 is green");
    let m = next_envelope(&mut v, false).await;
    assert_eq!(m["data"], "build 42 is green");
    assert_eq!(m["from"], json!({"id": "ci", "name": "CI bot"}));
    // Without a sender: from is null.
    let (_, p) = call(
        server.http,
        "POST",
        "/api/rooms/news/messages",
        Some(json!({"data": "anon"})),
    )
    .await;
    assert_eq!(p["offset"], 2);
    assert_eq!(next_envelope(&mut v, false).await["from"], Value::Null);
    let (status, history) = call(
        server.http,
        "GET",
        "/api/rooms/news/messages?since=0&limit=10",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(history["latest"], 2);
    assert_eq!(history["complete"], true);
    assert_eq!(history["messages"][0]["data"], "build 42 is green");
    assert_eq!(history["messages"][0]["from"]["name"], "CI bot");
    assert_eq!(history["messages"][1]["from"], Value::Null);
    let (_, h) = call(server.http, "GET", "/api/rooms/news/messages?since=1", None).await;
    assert_eq!(h["messages"].as_array().map(Vec::len), Some(1));
    let (_, rooms) = call(server.http, "GET", "/api/rooms", None).await;
    assert_eq!(rooms["rooms"][0]["name"], "news");
    assert_eq!(rooms["rooms"][0]["online"], 2);
}

#[tokio::test]
async fn every_error_is_json_with_its_status() {
    let server = TestServer::start(Config {
        max_message_bytes: 64,
        ..config()
    })
    .await;
    let bearer = format!("Bearer {KEY}");
    let auth = ("Authorization", bearer.as_str());
    let json_type = ("Content-Type", "application/json");
    // Method, path, headers, body, the status it must get.
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16);
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/api/rooms/r/messages",
            vec![auth, json_type],
            b"{not json".to_vec(),
            400,
        ),
        (
            "POST",
            "/api/rooms/r/messages",
            vec![auth, json_type],
            br#"{"text":"x"}"#.to_vec(),
            422,
        ),
        (
            "POST",
            "/api/rooms/r/messages",
            vec![auth, json_type],
            br#"{"data":5}"#.to_vec(),
            422,
        ),
        (
            "POST",
            "/api/rooms/r/messages",
            vec![auth, json_type],
            br#"{"data":"x","from":{"id":"","name":"n"}}"#.to_vec(),
            422,
        ),
        (
            "POST",
            "/api/rooms/r/messages",
            vec![auth],
            br#"{"data":"x"}"#.to_vec(),
            415,
        ),
        (
            "POST",
            "/api/rooms/r/messages",
            vec![auth, json_type],
            format!(r#"{{"data":"{}"}}"#, "x".repeat(65)).into_bytes(),
            413,
        ),
        (
            "POST",
            "/api/rooms/r/messages",
            vec![auth, json_type],
            format!(r#"{{"data":"{}"}}"#, "x".repeat(100_000)).into_bytes(),
            413,
        ),
        (
            "POST",
            "/api/rooms/bad%20name/messages",
            vec![auth, json_type],
            br#"{"data":"x"}"#.to_vec(),
            400,
        ),
        (
            "GET",
            "/api/rooms/r/messages?limit=0",
            vec![auth],
            vec![],
            400,
        ),
        (
            "GET",
            "/api/rooms/r/messages?since=minus",
            vec![auth],
            vec![],
            400,
        ),
        (
            "GET",
            "/api/rooms/nobody-here/messages",
            vec![auth],
            vec![],
            404,
        ),
        (
            "DELETE",
            "/api/rooms/nobody-here/users/u",
            vec![auth],
            vec![],
            404,
        ),
        ("GET", "/api/nothing", vec![auth], vec![], 404),
    ];
    for (method, path, headers, body, want) in cases {
        let (status, _, text) = http_send(server.http, method, path, &headers, body).await;
        assert_eq!(status, want, "{method} {path}: {text}");
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        assert!(v["error"].is_string(), "{method} {path}: {text}");
    }
}

#[tokio::test]
async fn a_removed_user_is_closed_with_4003() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    const SECRET: &str = "a secret for the remove test, long enough";
    let server = TestServer::start(Config {
        auth_mode: hubbub::auth::Mode::Optional,
        jwt_secret: Some(Secret(SECRET.into())),
        ..config()
    })
    .await;
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() + 600)
        .unwrap_or(0);
    let token = encode(
        &Header::default(),
        &json!({"sub": "troll", "name": "T", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token");
    let (mut troll, _) = v1(&server, &format!("/rooms/mod?token={token}")).await;
    let (mut other, _) = v1(&server, "/rooms/mod").await;
    let (status, removed) = call(server.http, "DELETE", "/api/rooms/mod/users/troll", None).await;
    assert_eq!((status, removed), (200, json!({"removed": 1})));
    let (frame, _) = expect_close(&mut troll).await;
    assert_eq!(frame.code, CloseCode::Library(4003));
    // Everyone else stays.
    send_text(&mut other, "still here").await;
    loop {
        match other.next().await {
            Some(Ok(Message::Text(t))) if t.contains("still here") => break,
            Some(Ok(_)) => continue,
            other => panic!("the other peer lost its connection: {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let server = TestServer::start(config()).await;
    let (status, _, text) = http_get(server.http, "/api/openapi.json").await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&text).expect("JSON");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    for path in [
        "/api/rooms",
        "/api/rooms/{room}/messages",
        "/api/rooms/{room}/users/{id}",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    assert!(doc["paths"]["/api/rooms/{room}/messages"]["post"].is_object());
    assert!(doc["paths"]["/api/rooms/{room}/messages"]["get"].is_object());
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

/// The document says what the handlers enforce (schemathesis found these
/// gaps: `scripts/api-check`): room names and sender fields with their
/// limits, `since` and `limit` as query parameters with their ranges, and
/// the challenge header on 401.
#[tokio::test]
async fn the_openapi_document_states_the_limits_the_handlers_enforce() {
    let server = TestServer::start(config()).await;
    let (_, _, text) = http_get(server.http, "/api/openapi.json").await;
    let doc: Value = serde_json::from_str(&text).expect("JSON");
    let history = &doc["paths"]["/api/rooms/{room}/messages"]["get"];
    let param = |name: &str| {
        history["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no parameter {name}"))
            .clone()
    };
    let room = param("room");
    assert_eq!(room["in"], "path");
    assert_eq!(room["schema"]["minLength"], 1);
    assert_eq!(room["schema"]["maxLength"], 64);
    assert_eq!(room["schema"]["pattern"], r"^[\p{Alpha}\p{N}._-]{1,64}$");
    let since = param("since");
    assert_eq!(
        (since["in"].as_str(), since["required"].as_bool()),
        (Some("query"), Some(false))
    );
    assert_eq!(since["schema"]["maximum"], json!(u64::MAX));
    let limit = param("limit");
    assert_eq!(limit["in"], "query");
    assert_eq!(
        (
            limit["schema"]["minimum"].clone(),
            limit["schema"]["maximum"].clone()
        ),
        (json!(1), json!(1000))
    );
    let sender = &doc["components"]["schemas"]["Sender"]["properties"];
    for field in ["id", "name"] {
        assert_eq!(sender[field]["minLength"], 1, "{field}");
        assert_eq!(sender[field]["maxLength"], 256, "{field}");
    }
    let unauthorized = &doc["paths"]["/api/rooms"]["get"]["responses"]["401"];
    assert!(unauthorized["headers"]["WWW-Authenticate"].is_object());

    // And the handlers agree at the edges the document now gives.
    let long_room = "é".repeat(64);
    for (path, want) in [
        (format!("/api/rooms/{long_room}/messages"), 200),
        (format!("/api/rooms/{long_room}x/messages"), 400),
    ] {
        let (status, _) = call(server.http, "POST", &path, Some(json!({"data": "x"}))).await;
        assert_eq!(status, want, "{path}");
    }
    let name = "n".repeat(256);
    let (status, _) = call(
        server.http,
        "POST",
        "/api/rooms/r/messages",
        Some(json!({"data": "x", "from": {"id": "i", "name": name}})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        server.http,
        "POST",
        "/api/rooms/r/messages",
        Some(json!({"data": "x", "from": {"id": "i", "name": format!("{name}n")}})),
    )
    .await;
    assert_eq!(status, 422);
    for (query, want) in [
        (format!("since={}&limit=1000", u64::MAX), 200),
        ("since=18446744073709551616".to_string(), 400),
        ("limit=1001".to_string(), 400),
    ] {
        let (status, _) = call(
            server.http,
            "GET",
            &format!("/api/rooms/r/messages?{query}"),
            None,
        )
        .await;
        assert_eq!(status, want, "{query}");
    }
}

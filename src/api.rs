//! The HTTP API under `/api/`, on the HTTP listener: a door for
//! applications (a build bot, an alert, a moderator tool) that want to post
//! into a room, read its history or remove a user, without holding a
//! WebSocket open.
//!
//! Off unless `[api] key` is set. Every request but the OpenAPI document
//! needs `Authorization: Bearer <key>`, compared in constant time; the
//! per-connection rate limit (`rate_limit_per_sec`, `rate_limit_burst`)
//! applies to the key as a whole. A message published here goes through
//! the room like any peer's (same order, same history, every node).
//!
//! The OpenAPI document at `/api/openapi.json` is generated from these
//! handlers and types (utoipa), so it cannot drift from them.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use governor::clock::MonotonicClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use utoipa::OpenApi;

use crate::auth::Identity;
use crate::log::Entry;
use crate::protocol::valid_room_name;
use crate::room::{ApiRequest, History, RoomHandle};
use crate::rooms::{JoinError, Rooms};

/// Longest wait for a published message to be ordered (a cluster whose
/// Redis is away).
const ORDER_WAIT: Duration = Duration::from_secs(10);

/// Most messages one history read returns.
const MAX_LIMIT: usize = 1000;

/// What the API needs of the server.
pub struct Api {
    pub key: String,
    pub rooms: Arc<Rooms>,
    pub max_message_bytes: usize,
    /// Whether rooms live in a cluster: a room this node does not host is
    /// loaded from Redis rather than missing.
    pub clustered: bool,
    limit: Option<RateLimiter<NotKeyed, InMemoryState, MonotonicClock>>,
}

impl Api {
    pub fn new(
        key: String,
        rooms: Arc<Rooms>,
        max_message_bytes: usize,
        clustered: bool,
        rate: (u32, u32),
    ) -> Api {
        let limit = NonZeroU32::new(rate.0).map(|per_sec| {
            let burst = NonZeroU32::new(rate.1).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct_with_clock(
                Quota::per_second(per_sec).allow_burst(burst),
                MonotonicClock,
            )
        });
        Api {
            key,
            rooms,
            max_message_bytes,
            clustered,
            limit,
        }
    }
}

type Shared = Arc<Api>;

/// The API's routes, to nest under `/api`.
pub fn router(api: Api) -> Router {
    let body_limit = api.max_message_bytes * 2 + 8192;
    let api = Arc::new(api);
    let guarded = Router::new()
        .route("/rooms", get(list_rooms))
        .route("/rooms/{room}/messages", post(publish).get(read_history))
        .route("/rooms/{room}/users/{id}", delete(remove_user))
        .layer(middleware::from_fn_with_state(api.clone(), guard))
        .layer(DefaultBodyLimit::max(body_limit));
    Router::new()
        .route("/openapi.json", get(openapi))
        .merge(guarded)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such API endpoint") })
        .with_state(api)
}

/// An error as the API answers it: `{"error": "..."}` with its status.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ApiError {
    pub error: String,
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(ApiError {
            error: message.to_string(),
        }),
    )
        .into_response()
}

/// The key, then the rate limit.
async fn guard(
    State(api): State<Shared>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim().as_bytes());
    let ok = given.is_some_and(|k| bool::from(k.ct_eq(api.key.as_bytes())));
    if !ok {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key (Authorization: Bearer <key>)",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    if let Some(limit) = &api.limit {
        if limit.check().is_err() {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests for this key; slow down",
            );
        }
    }
    next.run(request).await
}

fn json_rejection(r: JsonRejection) -> Response {
    let status = match r {
        JsonRejection::JsonDataError(_) => StatusCode::UNPROCESSABLE_ENTITY,
        JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ref other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        _ => StatusCode::BAD_REQUEST,
    };
    error(status, &r.body_text())
}

/// A refusal before the room is asked: its status and message.
type Refusal = (StatusCode, &'static str);

fn refused((status, message): Refusal) -> Response {
    error(status, message)
}

fn room_name(room: &str) -> Result<(), Refusal> {
    if valid_room_name(room) {
        Ok(())
    } else {
        Err((
            StatusCode::BAD_REQUEST,
            "a room name is 1 to 64 letters, digits, '-', '_' or '.'",
        ))
    }
}

/// The room to ask: any room for writing; for reading, an existing one
/// (or, in a cluster, one loaded from Redis).
fn room_for(api: &Api, room: &str, create: bool) -> Result<RoomHandle, Refusal> {
    room_name(room)?;
    if create || api.clustered {
        return api.rooms.room(room).map_err(|e| match e {
            JoinError::TooManyRooms => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many rooms; try again later",
            ),
            JoinError::Closed => (StatusCode::SERVICE_UNAVAILABLE, "server shutting down"),
        });
    }
    api.rooms.existing(room).ok_or((
        StatusCode::NOT_FOUND,
        "no such room (nobody in it and no history)",
    ))
}

/// A verified sender as the API takes and gives it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Sender {
    /// The user's id (1 to 256 characters).
    #[schema(min_length = 1, max_length = 256)]
    pub id: String,
    /// The user's display name (1 to 256 characters).
    #[schema(min_length = 1, max_length = 256)]
    pub name: String,
}

/// A message to publish.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    /// The message text, exactly as peers will receive it.
    pub data: String,
    /// The sender to stamp on it (`from` in `hubbub.v1` envelopes); absent
    /// or null: none.
    #[serde(default)]
    pub from: Option<Sender>,
}

/// Where a published message went.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PublishedBody {
    pub epoch: String,
    pub offset: u64,
}

#[utoipa::path(
    post,
    path = "/api/rooms/{room}/messages",
    params(("room" = String, Path, description = "Room name: 1 to 64 letters, digits, '-', '_' or '.'", min_length = 1, max_length = 64, pattern = r"^[\p{Alpha}\p{N}._-]{1,64}$")),
    request_body = PublishBody,
    responses(
        (status = 200, description = "Published", body = PublishedBody),
        (status = 400, description = "Bad room name or body", body = ApiError),
        (status = 401, description = "Missing or wrong API key", body = ApiError,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 413, description = "Message larger than max_message_bytes", body = ApiError),
        (status = 415, description = "Not JSON", body = ApiError),
        (status = 422, description = "JSON of the wrong shape", body = ApiError),
        (status = 429, description = "Over the key's rate limit", body = ApiError),
        (status = 503, description = "Not ordered in time (a cluster whose Redis is away), or too many rooms", body = ApiError),
    ),
    security(("bearer" = []))
)]
async fn publish(
    State(api): State<Shared>,
    Path(room): Path<String>,
    body: Result<Json<PublishBody>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(r) => return json_rejection(r),
    };
    if body.data.len() > api.max_message_bytes {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "data is larger than max_message_bytes",
        );
    }
    let from = match body.from {
        None => None,
        Some(s) => {
            let fits = |v: &str| (1..=256).contains(&v.chars().count());
            if !fits(&s.id) || !fits(&s.name) {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "from.id and from.name are 1 to 256 characters",
                );
            }
            Some(Arc::new(Identity {
                id: s.id,
                name: s.name,
            }))
        }
    };
    let handle = match room_for(&api, &room, true) {
        Ok(h) => h,
        Err(r) => return refused(r),
    };
    let (reply, answer) = oneshot::channel();
    let request = ApiRequest::Publish {
        message: Message::text(body.data),
        from,
        reply,
    };
    if handle.api(request).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the room stopped; try again",
        );
    }
    match tokio::time::timeout(ORDER_WAIT, answer).await {
        Ok(Ok(Ok(p))) => Json(PublishedBody {
            epoch: p.epoch,
            offset: p.offset,
        })
        .into_response(),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the message could not be ordered in time; try again later",
        ),
    }
}

/// Which history to read.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Only messages after this offset (in the current epoch).
    #[param(format = "uint64", minimum = 0, maximum = 18446744073709551615_usize)]
    pub since: Option<u64>,
    /// At most this many messages, 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000, default = 50)]
    pub limit: Option<usize>,
}

/// One message of a room's history.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MessageBody {
    pub offset: u64,
    /// Server time the room took it, milliseconds since the Unix epoch.
    pub ts: u64,
    /// The text; for a binary message, its bytes in standard base64.
    pub data: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub binary: bool,
    /// The verified sender, or null.
    pub from: Option<StampedSender>,
}

/// A verified sender as history gives it: stamped through this API (see
/// `Sender`) or taken from a peer's token, whose `name` may be empty.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StampedSender {
    #[schema(min_length = 1, max_length = 256)]
    pub id: String,
    #[schema(max_length = 256)]
    pub name: String,
}

/// A room's history.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HistoryBody {
    pub epoch: String,
    /// The room's latest offset.
    pub latest: u64,
    /// Whether `messages` are every message after `since` (false when the
    /// history no longer holds them all: the most recent are given).
    pub complete: bool,
    pub messages: Vec<MessageBody>,
}

fn message_body(e: &Entry) -> MessageBody {
    use base64::Engine;
    let (binary, data) = match &*e.message {
        Message::Text(t) => (false, t.to_string()),
        Message::Binary(b) => (true, base64::engine::general_purpose::STANDARD.encode(b)),
        _ => (false, String::new()),
    };
    MessageBody {
        offset: e.offset,
        ts: e.ts,
        data,
        binary,
        from: e.from.as_ref().map(|f| StampedSender {
            id: f.id.clone(),
            name: f.name.clone(),
        }),
    }
}

#[utoipa::path(
    get,
    path = "/api/rooms/{room}/messages",
    params(("room" = String, Path, description = "Room name: 1 to 64 letters, digits, '-', '_' or '.'", min_length = 1, max_length = 64, pattern = r"^[\p{Alpha}\p{N}._-]{1,64}$"), HistoryQuery),
    responses(
        (status = 200, description = "The room's history", body = HistoryBody),
        (status = 400, description = "Bad room name or query", body = ApiError),
        (status = 401, description = "Missing or wrong API key", body = ApiError,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 404, description = "No such room", body = ApiError),
        (status = 429, description = "Over the key's rate limit", body = ApiError),
        (status = 503, description = "The room could not answer in time", body = ApiError),
    ),
    security(("bearer" = []))
)]
async fn read_history(
    State(api): State<Shared>,
    Path(room): Path<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(r) => return error(StatusCode::BAD_REQUEST, &r.body_text()),
    };
    let limit = query.limit.unwrap_or(50);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return error(StatusCode::BAD_REQUEST, "limit is 1 to 1000");
    }
    let handle = match room_for(&api, &room, false) {
        Ok(h) => h,
        Err(r) => return refused(r),
    };
    let (reply, answer) = oneshot::channel::<History>();
    let request = ApiRequest::History {
        since: query.since,
        limit,
        reply,
    };
    if handle.api(request).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the room stopped; try again",
        );
    }
    match tokio::time::timeout(ORDER_WAIT, answer).await {
        Ok(Ok(h)) => Json(HistoryBody {
            epoch: h.epoch,
            latest: h.latest,
            complete: h.complete,
            messages: h.entries.iter().map(message_body).collect(),
        })
        .into_response(),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the room did not answer in time",
        ),
    }
}

/// One room and the peers in it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RoomBody {
    pub name: String,
    /// Peers in the room, on every node.
    pub online: usize,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RoomsBody {
    /// The rooms with peers, by name: on every node when there are
    /// several (as Redis knows them), else this node's (those with history
    /// and nobody in them included).
    pub rooms: Vec<RoomBody>,
}

#[utoipa::path(
    get,
    path = "/api/rooms",
    responses(
        (status = 200, description = "Rooms with their online counts", body = RoomsBody),
        (status = 401, description = "Missing or wrong API key", body = ApiError,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 429, description = "Over the key's rate limit", body = ApiError),
        (status = 503, description = "A cluster node cannot reach Redis to list every node's rooms", body = ApiError),
    ),
    security(("bearer" = []))
)]
async fn list_rooms(State(api): State<Shared>) -> Response {
    let listed = match api.rooms.cluster() {
        Some(cluster) => match cluster.rooms().await {
            Ok(rooms) => rooms,
            Err(_) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot reach the cluster to list its rooms; try again",
                )
            }
        },
        None => api
            .rooms
            .list()
            .into_iter()
            .map(|(name, online)| (name.to_string(), online))
            .collect(),
    };
    let rooms = listed
        .into_iter()
        .map(|(name, online)| RoomBody { name, online })
        .collect();
    Json(RoomsBody { rooms }).into_response()
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RemovedBody {
    /// Connections of the user closed with 4003.
    pub removed: usize,
}

#[utoipa::path(
    delete,
    path = "/api/rooms/{room}/users/{id}",
    params(
        ("room" = String, Path, description = "Room name: 1 to 64 letters, digits, '-', '_' or '.'", min_length = 1, max_length = 64, pattern = r"^[\p{Alpha}\p{N}._-]{1,64}$"),
        ("id" = String, Path, description = "The user's id (`sub` of their token)", min_length = 1),
    ),
    responses(
        (status = 200, description = "The user's connections in the room were closed with 4003 (`removed` counts this node's; with several nodes, every node closes its own as it hears of it)", body = RemovedBody),
        (status = 400, description = "Bad room name", body = ApiError),
        (status = 401, description = "Missing or wrong API key", body = ApiError,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 404, description = "No such room", body = ApiError),
        (status = 429, description = "Over the key's rate limit", body = ApiError),
        (status = 503, description = "The room could not answer", body = ApiError),
    ),
    security(("bearer" = []))
)]
async fn remove_user(
    State(api): State<Shared>,
    Path((room, id)): Path<(String, String)>,
) -> Response {
    if let Err(r) = room_name(&room) {
        return refused(r);
    }
    if let Some(cluster) = api.rooms.cluster() {
        // Every node closes the user's connections as it reads this.
        if cluster.remove(&room, &id).await.is_err() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot reach the cluster to remove the user everywhere; try again",
            );
        }
        let removed = match api.rooms.existing(&room) {
            Some(handle) => ask_remove(&handle, id).await.unwrap_or(0),
            None => 0,
        };
        return Json(RemovedBody { removed }).into_response();
    }
    let Some(handle) = api.rooms.existing(&room) else {
        return error(StatusCode::NOT_FOUND, "no such room on this node");
    };
    let (reply, answer) = oneshot::channel();
    if handle.api(ApiRequest::Remove { id, reply }).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the room stopped; try again",
        );
    }
    match tokio::time::timeout(ORDER_WAIT, answer).await {
        Ok(Ok(removed)) => Json(RemovedBody { removed }).into_response(),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the room did not answer in time",
        ),
    }
}

/// Asks a room to remove a user's connections: how many it closed.
async fn ask_remove(handle: &RoomHandle, id: String) -> Option<usize> {
    let (reply, answer) = oneshot::channel();
    handle.api(ApiRequest::Remove { id, reply }).await.ok()?;
    tokio::time::timeout(ORDER_WAIT, answer).await.ok()?.ok()
}

#[derive(OpenApi)]
#[openapi(
    info(title = "hubbub HTTP API", description = "Publish into rooms, read their history, list them, remove users."),
    paths(publish, read_history, list_rooms, remove_user),
    components(schemas(ApiError, Sender, StampedSender, PublishBody, PublishedBody, MessageBody, HistoryBody, RoomBody, RoomsBody, RemovedBody)),
    modifiers(&BearerKey)
)]
struct Doc;

/// The API key as the document's security scheme.
struct BearerKey;

impl utoipa::Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document, generated from the handlers above.
pub fn document() -> utoipa::openapi::OpenApi {
    Doc::openapi()
}

async fn openapi() -> Response {
    Json(document()).into_response()
}

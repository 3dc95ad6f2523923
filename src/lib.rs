//! hubbub: a standalone broadcast chat server.
//!
//! Every text message any WebSocket peer sends reaches every peer of its
//! room, the sender included, byte for byte and in the same order for
//! everyone; `hubbub.v1` clients also get offsets, history and resumes.
//!
//! The pieces, one module each, in the order a message meets them
//! (gateway -> session -> room -> log -> room -> queue -> session):
//! - [`config`]: flags, `HUBBUB_*` environment, TOML file, defaults.
//! - [`server`]: binds both listeners and runs everything until shutdown.
//! - [`http`]: the HTTP listener (chat page, `/healthz`, `/readyz`,
//!   `/metrics`).
//! - [`api`]: the HTTP API under `/api/` (publish, history, rooms, remove).
//! - [`listener`]: accepting TCP connections, with backoff on errors.
//! - [`gateway`]: the WebSocket listener and the opening handshake.
//! - [`origin`]: which browser origins may connect.
//! - [`auth`]: signed connection tokens (JWT) and private rooms.
//! - [`clients`]: who a connection comes from (trusted proxies) and how
//!   many connections each address may hold.
//! - [`protocol`]: the `hubbub.v1` protocol: what a WebSocket URL asks for
//!   (room, resume point) and the JSON envelopes.
//! - [`session`]: one connected peer, reading and writing.
//! - [`rooms`]: every room by name; joining creates one.
//! - [`room`]: one room's task, which fans every message out to its peers
//!   and keeps their ping schedule and presence.
//! - [`log`]: a room's ordered log: offsets, epoch, history; in memory, or
//!   in Redis for several nodes.
//! - [`cluster`]: the link between this node and the Redis that several
//!   nodes share (outbox, reader, checks).
//! - [`queue`]: each peer's bounded outbound queue.
//! - [`socket`]: a peer's TCP socket with large reads and no idle buffer.
//! - [`tls`]: TLS on both listeners, with certificate reloads.
//! - [`page`]: the chat page and its Content-Security-Policy.
//! - [`metrics`]: the counters behind `/metrics`.
//! - [`memory`]: giving memory freed by ended rooms back to the system.
//! - [`shutdown`]: turning SIGINT/SIGTERM into the shutdown future.
//! - [`healthcheck`]: the `hubbub healthcheck` client used by containers.

pub mod api;
pub mod auth;
pub mod clients;
pub mod cluster;
pub mod config;
pub mod gateway;
pub mod healthcheck;
pub mod http;
pub mod listener;
pub mod log;
pub mod memory;
pub mod metrics;
pub mod origin;
pub mod page;
pub mod protocol;
pub mod queue;
pub mod room;
pub mod rooms;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod socket;
pub mod tls;

pub use config::Config;
pub use server::{run, Error, Server};

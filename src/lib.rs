//! hubbub: a standalone broadcast chat server.
//!
//! Every text message any WebSocket peer sends reaches every connected peer,
//! the sender included, byte for byte and in the same order for everyone.
//!
//! The pieces, one module each:
//! - [`config`]: flags, `HUBBUB_*` environment, TOML file, defaults.
//! - [`server`]: binds both listeners and runs everything until shutdown.
//! - [`http`]: the HTTP listener (chat page, `/healthz`, `/metrics`).
//! - [`listener`]: accepting TCP connections, with backoff on errors.
//! - [`gateway`]: the WebSocket listener and the opening handshake.
//! - [`origin`]: which browser origins may connect.
//! - [`session`]: one connected peer, reading and writing.
//! - [`hub`]: the task that fans every message out to every peer, and
//!   keeps the ping schedule.
//! - [`queue`]: each peer's bounded outbound queue.
//! - [`socket`]: a peer's TCP socket with large reads and no idle buffer.
//! - [`page`]: the chat page and its Content-Security-Policy.
//! - [`metrics`]: the counters behind `/metrics`.
//! - [`shutdown`]: turning SIGINT/SIGTERM into the shutdown future.
//! - [`healthcheck`]: the `hubbub healthcheck` client used by containers.

pub mod config;
pub mod gateway;
pub mod healthcheck;
pub mod http;
pub mod hub;
pub mod listener;
pub mod metrics;
pub mod origin;
pub mod page;
pub mod queue;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod socket;

pub use config::Config;
pub use server::{run, Error, Server};

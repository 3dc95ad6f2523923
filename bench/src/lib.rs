//! hubbub-bench: a load generator for broadcast WebSocket servers (every
//! message a client sends reaches every connected client, sender included).
//!
//! The modes live in [`run`], and the server-less baseline in [`floor`]; the pieces that decide what the numbers say
//! (message format, frame codec, `hubbub.v1` envelopes, loss/reorder
//! accounting per room, percentiles) are
//! separate modules with their own tests.

pub mod account;
pub mod churn;
pub mod compare;
pub mod conn;
pub mod envelope;
pub mod floor;
pub mod frame;
pub mod latency;
pub mod payload;
pub mod report;
pub mod run;
pub mod sys;
pub mod tracker;

//! Counters behind `GET /metrics`.
//!
//! These are plain relaxed atomics rather than room-owned state: they are
//! bumped from every connection task, read rarely, and a scrape that is a few
//! nanoseconds stale is fine. Writers add per batch, not per byte, so the
//! shared cache lines are touched as little as possible.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a WebSocket connection attempt ended before becoming a peer, or that it
/// became one. Each is a `result` label of `hubbub_connections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnResult {
    Accepted,
    OverCapacity,
    ForbiddenOrigin,
    BadRequest,
    HandshakeTimeout,
    /// The join would have created one room more than `max_rooms`.
    RoomLimit,
    /// Its address already held `max_connections_per_ip`.
    AddressLimit,
    /// No token, a bad one, or one that does not allow the room (401/403).
    Unauthorized,
}

impl ConnResult {
    const ALL: [ConnResult; 8] = [
        ConnResult::Accepted,
        ConnResult::OverCapacity,
        ConnResult::ForbiddenOrigin,
        ConnResult::BadRequest,
        ConnResult::HandshakeTimeout,
        ConnResult::RoomLimit,
        ConnResult::AddressLimit,
        ConnResult::Unauthorized,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ConnResult::Accepted => "accepted",
            ConnResult::OverCapacity => "over_capacity",
            ConnResult::ForbiddenOrigin => "forbidden_origin",
            ConnResult::BadRequest => "bad_request",
            ConnResult::HandshakeTimeout => "handshake_timeout",
            ConnResult::RoomLimit => "room_limit",
            ConnResult::AddressLimit => "address_limit",
            ConnResult::Unauthorized => "unauthorized",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    connections: AtomicU64,
    connections_total: [AtomicU64; 8],
    rooms: AtomicU64,
    messages_received: AtomicU64,
    deliveries: AtomicU64,
    bytes_sent: AtomicU64,
    slow_consumer_disconnects: AtomicU64,
    rate_limited: AtomicU64,
    unavailable: AtomicU64,
    /// The cluster's figures; all zero on a standalone node.
    pub cluster: ClusterMetrics,
}

/// What a node reports of its link to Redis (see [`crate::cluster`]).
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    /// Whether this node runs with Redis at all.
    pub enabled: std::sync::atomic::AtomicBool,
    /// 1 while the node reaches Redis on every path it needs.
    pub connected: AtomicU64,
    pub outbox: AtomicU64,
    pub publish_errors: AtomicU64,
    pub read_errors: AtomicU64,
    /// Entries on hubbub's keys that are not hubbub's, skipped.
    pub skipped: AtomicU64,
    /// Times a room found its epoch changed under it (Redis lost its data).
    pub new_epochs: AtomicU64,
}

impl Metrics {
    pub fn connection_result(&self, result: ConnResult) {
        // Variants are numbered in the order of `ALL`, so the discriminant
        // is the slot.
        self.connections_total[result as usize].fetch_add(1, Relaxed);
    }

    pub fn peer_opened(&self) {
        self.connections.fetch_add(1, Relaxed);
    }

    pub fn peer_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    pub fn message_received(&self) {
        self.messages_received.fetch_add(1, Relaxed);
    }

    pub fn delivered(&self, messages: u64, bytes: u64) {
        self.deliveries.fetch_add(messages, Relaxed);
        self.bytes_sent.fetch_add(bytes, Relaxed);
    }

    pub fn slow_consumer_disconnect(&self) {
        self.slow_consumer_disconnects.fetch_add(1, Relaxed);
    }

    pub fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Relaxed);
    }

    pub fn unavailable(&self) {
        self.unavailable.fetch_add(1, Relaxed);
    }

    pub fn set_rooms(&self, rooms: usize) {
        self.rooms.store(rooms as u64, Relaxed);
    }

    pub fn open_connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }

    /// Renders the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(1024);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "hubbub_connections",
            "gauge",
            "Open WebSocket peers.",
            self.connections.load(Relaxed),
        );
        metric(
            "hubbub_rooms",
            "gauge",
            "Rooms that exist (with peers or history).",
            self.rooms.load(Relaxed),
        );
        metric(
            "hubbub_messages_received_total",
            "counter",
            "Messages received from peers and handed to their room.",
            self.messages_received.load(Relaxed),
        );
        metric(
            "hubbub_deliveries_total",
            "counter",
            "Messages written to peers (one per message per peer).",
            self.deliveries.load(Relaxed),
        );
        metric(
            "hubbub_bytes_sent_total",
            "counter",
            "Payload bytes of messages written to peers.",
            self.bytes_sent.load(Relaxed),
        );
        metric(
            "hubbub_slow_consumer_disconnects_total",
            "counter",
            "Peers closed with 1008 because their send queue was full.",
            self.slow_consumer_disconnects.load(Relaxed),
        );
        metric(
            "hubbub_rate_limited_total",
            "counter",
            "Messages not relayed because their sender was over its rate limit.",
            self.rate_limited.load(Relaxed),
        );
        metric(
            "hubbub_unavailable_total",
            "counter",
            "Messages not taken because the cluster's outbox was full.",
            self.unavailable.load(Relaxed),
        );
        if self.cluster.enabled.load(Relaxed) {
            let c = &self.cluster;
            metric(
                "hubbub_cluster_connected",
                "gauge",
                "1 while this node reaches Redis for publishing, reading and its checks, else 0.",
                c.connected.load(Relaxed),
            );
            metric(
                "hubbub_cluster_outbox",
                "gauge",
                "Messages waiting in this node's outbox to be ordered by Redis.",
                c.outbox.load(Relaxed),
            );
            metric(
                "hubbub_cluster_publish_errors_total",
                "counter",
                "Failed attempts to hand a batch of messages to Redis (each is retried).",
                c.publish_errors.load(Relaxed),
            );
            metric(
                "hubbub_cluster_read_errors_total",
                "counter",
                "Failed reads and checks against Redis.",
                c.read_errors.load(Relaxed),
            );
            metric(
                "hubbub_cluster_skipped_total",
                "counter",
                "Entries found on hubbub's keys that hubbub did not write, logged and skipped.",
                c.skipped.load(Relaxed),
            );
            metric(
                "hubbub_cluster_new_epochs_total",
                "counter",
                "Times a room's epoch changed under it (Redis lost or dropped its data).",
                c.new_epochs.load(Relaxed),
            );
        }
        let _ = writeln!(
            out,
            "# HELP hubbub_connections_total WebSocket connection attempts by outcome.\n\
             # TYPE hubbub_connections_total counter"
        );
        for (r, count) in ConnResult::ALL.iter().zip(&self.connections_total) {
            let _ = writeln!(
                out,
                "hubbub_connections_total{{result=\"{}\"}} {}",
                r.label(),
                count.load(Relaxed)
            );
        }
        out
    }
}

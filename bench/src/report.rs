//! The result of one run: a JSON line for machines, a table for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::latency::LatencySummary;

/// Everything one run measured. Fields that do not apply to a mode are
/// absent from the JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    pub url: String,
    /// What the clients spoke: "raw" or "hubbub.v1" (absent in results
    /// older than the flag: raw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Rooms the clients were spread over (client i in /rooms/bench-<i % rooms>;
    /// 1 = the URL's own path unless --rooms 1 was given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<u64>,
    /// Whether the clients joined /rooms/bench-<i % rooms> (--rooms given)
    /// rather than the URL's own path.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub room_paths: bool,
    /// Connections asked for.
    pub clients: u64,
    /// Connections that completed the handshake.
    pub connected: u64,
    pub connect_failed: u64,
    pub connect_secs: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub senders: Option<u64>,
    /// Clients that connect but never read (fanout --slow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow: Option<u64>,
    /// Clients that read everything (connected minus slow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readers: Option<u64>,
    /// Messages/s each sender was asked to send (fanout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Unconfirmed messages each sender may have in flight (saturate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
    /// Saturate: senders pause while the slowest reader is this many messages behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag: Option<u64>,
    /// Message size, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Length of the measured interval, seconds.
    pub measured_secs: f64,
    /// Messages sent, all senders, whole run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<u64>,
    /// Messages sent per second during the measured interval (all senders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_rate: Option<f64>,
    /// Each sender's messages x the readers of its room, summed (with one
    /// room: sent x readers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<u64>,
    /// Distinct messages received, all readers, whole run (drain included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<u64>,
    /// received / expected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_ratio: Option<f64>,
    /// Deliveries (messages received by readers) per second during the
    /// measured interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliveries_per_sec: Option<f64>,
    /// deliveries_per_sec / readers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliveries_per_sec_per_reader: Option<f64>,
    /// Best one-second window of deliveries within the measured interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_deliveries_per_sec: Option<f64>,
    /// Saturate: what the server took in from the senders during the
    /// measured interval, in MB/s (MB = 10^6 bytes of message payload):
    /// bytes of the senders' confirmed messages (echoed back to them) /
    /// the interval's length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mb_in_per_sec: Option<f64>,
    /// Messages readers never received: per sender's sequence numbers
    /// (raw), or the room's offsets (hubbub.v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
    /// Part of `lost`: numbers skipped while a later one of the same sender arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_gaps: Option<u64>,
    /// Part of `lost`: numbers after the last one received (dropped, or not
    /// delivered by the end of the drain wait).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_tail: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reordered: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<u64>,
    /// Received messages that were not this run's (other traffic, or mangled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreign: Option<u64>,
    /// This run's messages received by a reader of another room than the sender's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub misrouted: Option<u64>,
    /// hubbub.v1: history messages replayed on join (offsets at or below
    /// hello's), skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencySummary>,
    /// Readers (or idle connections) the server closed before the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_by_server: Option<u64>,
    /// Non-reading clients found closed by the server at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_closed_by_server: Option<u64>,
    /// Close codes received, by code ("none" = connection dropped without one).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub close_codes: BTreeMap<String, u64>,
    /// Flood: messages per second each reader reads at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_rate: Option<f64>,
    /// Flood: the flooder's messages the server relayed (the most any
    /// connection received, the flooder's own echoes included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed: Option<u64>,
    /// Flood: the close code the flooder got ("none" = the connection ended
    /// without one); absent if it was still open at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flooder_closed: Option<String>,
    /// Flood: the lowest reader's delivery ratio (received / relayed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reader_ratio_min: Option<f64>,
    /// Flood: readers that received everything relayed (ratio 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readers_complete: Option<u64>,
    /// Idle: connections still open at the end of the hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub still_open: Option<u64>,
    /// This tool's CPU over the measured interval, % of one core.
    pub tool_cpu_pct: f64,
    pub tool_threads: u64,
    /// CPU used by the whole machine over the measured interval, % of one
    /// core (200% = both cores of a 2-core machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_cpu_pct: Option<f64>,
    /// machine - tool - server: anything else that ran meanwhile (noise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_cpu_pct: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_pid: Option<u32>,
    /// The server's CPU over the measured interval, % of one core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu_pct: Option<f64>,
    /// The server's CPU time (user + system, all threads) over the measured
    /// interval, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu_secs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_rss_kib_before: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_rss_kib_after: Option<u64>,
    /// Highest RSS sampled (once a second) during the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_rss_kib_max: Option<u64>,
    /// Idle: (RSS after - RSS before) / connections held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_per_conn_bytes: Option<f64>,
    /// First few errors seen by connections (not counting server closes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Formats a count with thousands separators: 1234567 -> "1,234,567".
pub fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn rate(v: f64) -> String {
    thousands(v.round() as u64)
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> Option<String> {
    v.map(f)
}

impl Report {
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("report serializes")
    }

    /// A two-column, human-readable table.
    pub fn to_table(&self) -> String {
        let mut rows: Vec<(&str, Option<String>)> = Vec::new();
        let title = match (&self.label, &self.server) {
            (Some(l), Some(s)) => format!("{} [{l}] against {s}", self.mode),
            (Some(l), None) => format!("{} [{l}]", self.mode),
            (None, Some(s)) => format!("{} against {s}", self.mode),
            (None, None) => self.mode.clone(),
        };
        rows.push(("url", Some(self.url.clone())));
        rows.push(("protocol", self.protocol.clone()));
        rows.push((
            "rooms",
            self.rooms.map(|n| {
                if self.room_paths {
                    format!(
                        "{} (client i in /rooms/bench-<i mod {}>)",
                        thousands(n),
                        thousands(n)
                    )
                } else {
                    format!("{} (the URL's path)", thousands(n))
                }
            }),
        ));
        rows.push((
            "connections",
            Some(format!(
                "{} of {} in {:.2} s{}",
                thousands(self.connected),
                thousands(self.clients),
                self.connect_secs,
                if self.connect_failed > 0 {
                    format!(" ({} failed)", thousands(self.connect_failed))
                } else {
                    String::new()
                }
            )),
        ));
        rows.push(("senders", opt(self.senders, thousands)));
        rows.push(("readers", opt(self.readers, thousands)));
        rows.push((
            "slow (never read)",
            opt(self.slow.filter(|&s| s > 0), thousands),
        ));
        rows.push(("rate per sender", opt(self.rate, |r| format!("{r} msg/s"))));
        rows.push(("window per sender", opt(self.window, thousands)));
        rows.push((
            "max reader lag",
            opt(self.max_lag, |l| format!("{} messages", thousands(l))),
        ));
        rows.push(("message size", opt(self.size, |s| format!("{s} B"))));
        rows.push((
            "read rate per reader",
            opt(self.read_rate, |r| format!("{r} msg/s at most")),
        ));
        rows.push(("measured", Some(format!("{:.2} s", self.measured_secs))));
        rows.push(("sent", opt(self.sent, thousands)));
        rows.push((
            "send rate",
            opt(self.send_rate, |r| format!("{} msg/s", rate(r))),
        ));
        rows.push((
            "relayed by the server",
            opt(self.relayed, |r| {
                format!("{} of the flooder's messages", thousands(r))
            }),
        ));
        rows.push((
            "flooder closed by server",
            self.relayed.map(|_| {
                self.flooder_closed
                    .as_ref()
                    .map_or("no (still open)".to_string(), |c| format!("yes, code {c}"))
            }),
        ));
        rows.push((
            "readers with everything",
            match (self.readers_complete, self.readers) {
                (Some(c), Some(r)) => Some(format!(
                    "{} of {} (lowest delivery ratio {:.6})",
                    thousands(c),
                    thousands(r),
                    self.reader_ratio_min.unwrap_or(1.0)
                )),
                _ => None,
            },
        ));
        rows.push((
            "received / expected",
            match (self.received, self.expected) {
                (Some(r), Some(e)) => Some(format!("{} / {}", thousands(r), thousands(e))),
                _ => None,
            },
        ));
        rows.push((
            "delivery ratio",
            opt(self.delivery_ratio, |r| format!("{:.6}", r)),
        ));
        rows.push(("deliveries/s", opt(self.deliveries_per_sec, rate)));
        rows.push((
            "deliveries/s per reader",
            opt(self.deliveries_per_sec_per_reader, |r| format!("{r:.1}")),
        ));
        rows.push((
            "peak deliveries/s (1 s)",
            opt(self.peak_deliveries_per_sec, rate),
        ));
        rows.push((
            "MB/s in (10^6 B/s)",
            opt(self.mb_in_per_sec, |m| {
                format!("{m:.2} received by the server from the senders")
            }),
        ));
        rows.push((
            "lost",
            opt(self.lost, |l| match (self.lost_gaps, self.lost_tail) {
                (Some(g), Some(t)) if l > 0 => {
                    format!(
                        "{} ({} in gaps, {} never arrived after the last received)",
                        thousands(l),
                        thousands(g),
                        thousands(t)
                    )
                }
                _ => thousands(l),
            }),
        ));
        rows.push(("reordered", opt(self.reordered, thousands)));
        rows.push(("duplicates", opt(self.duplicates, thousands)));
        rows.push(("foreign", opt(self.foreign.filter(|&f| f > 0), thousands)));
        rows.push((
            "misrouted (other room's)",
            opt(self.misrouted.filter(|&f| f > 0), thousands),
        ));
        rows.push((
            "history replayed (skipped)",
            opt(self.replayed.filter(|&f| f > 0), thousands),
        ));
        if let Some(l) = &self.latency {
            rows.push((
                "latency ms p50/p90/p99",
                Some(format!(
                    "{:.3} / {:.3} / {:.3}",
                    l.p50_ms, l.p90_ms, l.p99_ms
                )),
            ));
            rows.push((
                "latency ms p99.9/max",
                Some(format!("{:.3} / {:.3}", l.p999_ms, l.max_ms)),
            ));
            rows.push((
                "latency ms mean",
                Some(format!("{:.3} ({} samples)", l.mean_ms, thousands(l.count))),
            ));
        }
        rows.push(("closed by server", opt(self.closed_by_server, thousands)));
        rows.push((
            "slow closed by server",
            opt(self.slow_closed_by_server, thousands),
        ));
        if !self.close_codes.is_empty() {
            let codes: Vec<String> = self
                .close_codes
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            rows.push(("close codes", Some(codes.join(", "))));
        }
        rows.push(("still open", opt(self.still_open, thousands)));
        rows.push((
            "tool CPU",
            Some(format!(
                "{:.1}% of a core ({} threads)",
                self.tool_cpu_pct, self.tool_threads
            )),
        ));
        rows.push((
            "server CPU",
            opt(self.server_cpu_pct, |c| {
                let secs = self
                    .server_cpu_secs
                    .map_or(String::new(), |s| format!(", {s:.2} CPU s"));
                format!(
                    "{c:.1}% of a core{secs} (pid {})",
                    self.server_pid.unwrap_or(0)
                )
            }),
        ));
        rows.push((
            "other CPU on the machine",
            opt(self.other_cpu_pct, |c| {
                format!(
                    "{c:.1}% of a core (whole machine {:.1}%)",
                    self.machine_cpu_pct.unwrap_or(0.0)
                )
            }),
        ));
        rows.push((
            "server RSS before/after/max",
            match (self.server_rss_kib_before, self.server_rss_kib_after) {
                (Some(b), Some(a)) => Some(format!(
                    "{} / {} / {} KiB",
                    thousands(b),
                    thousands(a),
                    thousands(self.server_rss_kib_max.unwrap_or(a))
                )),
                _ => None,
            },
        ));
        rows.push((
            "server RSS per connection",
            opt(self.rss_per_conn_bytes, |b| {
                format!("{:.0} B ({:.2} KiB)", b, b / 1024.0)
            }),
        ));
        for e in &self.errors {
            rows.push(("error", Some(e.clone())));
        }
        let width = rows
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k.len())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        let _ = writeln!(out, "== hubbub-bench {title}");
        for (k, v) in rows {
            if let Some(v) = v {
                let _ = writeln!(out, "  {k:<width$}  {v}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn json_round_trip_and_absent_fields() {
        let r = Report {
            mode: "idle".into(),
            url: "ws://127.0.0.1:1/".into(),
            clients: 10,
            connected: 10,
            rss_per_conn_bytes: Some(1500.0),
            ..Report::default()
        };
        let line = r.to_json_line();
        assert!(!line.contains('\n'));
        assert!(
            !line.contains("latency"),
            "absent fields are left out: {line}"
        );
        let back: Report = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
        let t = r.to_table();
        assert!(t.contains("server RSS per connection"));
        assert!(t.contains("1500 B (1.46 KiB)"));
        assert!(!line.contains("room_paths"), "false is left out: {line}");
    }

    #[test]
    fn protocol_and_rooms_in_json_and_table() {
        let r = Report {
            mode: "fanout".into(),
            url: "ws://127.0.0.1:1/".into(),
            protocol: Some("hubbub.v1".into()),
            rooms: Some(10),
            room_paths: true,
            misrouted: Some(0),
            replayed: Some(3),
            ..Report::default()
        };
        let line = r.to_json_line();
        assert!(
            line.contains(r#""protocol":"hubbub.v1","rooms":10,"room_paths":true"#),
            "{line}"
        );
        let back: Report = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
        let t = r.to_table();
        assert!(t.contains("hubbub.v1"), "{t}");
        assert!(
            t.contains("10 (client i in /rooms/bench-<i mod 10>)"),
            "{t}"
        );
        assert!(t.contains("history replayed (skipped)  3"), "{t}");
        assert!(!t.contains("misrouted"), "zero is not shown: {t}");
        let one = Report {
            rooms: Some(1),
            room_paths: false,
            ..r
        };
        assert!(one.to_table().contains("1 (the URL's path)"));
        // A line from before the flags still parses.
        let old: Report =
            serde_json::from_str(r#"{"mode":"idle","url":"u","clients":1,"connected":1,"connect_failed":0,"connect_secs":0.1,"measured_secs":1.0,"tool_cpu_pct":1.0,"tool_threads":1}"#)
                .unwrap();
        assert_eq!(
            (old.protocol, old.rooms, old.room_paths),
            (None, None, false)
        );
    }
}

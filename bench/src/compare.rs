//! Side-by-side table of the JSON lines of several runs: one block per
//! scenario label, one column per server, and how many times better the
//! subject is than the baseline on each metric.

use std::fmt::Write as _;

use crate::report::{thousands, Report};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Better {
    Higher,
    Lower,
    /// Shown, not compared.
    Info,
}

struct Metric {
    name: &'static str,
    better: Better,
    get: fn(&Report) -> Option<f64>,
    fmt: fn(f64) -> String,
}

fn int(v: f64) -> String {
    thousands(v.round() as u64)
}
fn ms3(v: f64) -> String {
    format!("{v:.3}")
}
fn pct1(v: f64) -> String {
    format!("{v:.1}%")
}
fn ratio6(v: f64) -> String {
    format!("{v:.6}")
}
fn kib(v: f64) -> String {
    format!("{v:.2}")
}
fn mib(v: f64) -> String {
    format!("{v:.1}")
}
fn dec2(v: f64) -> String {
    format!("{v:.2}")
}

/// Server CPU milliseconds per MB (10^6 bytes) taken in: the cost of the
/// throughput, comparable between servers that reached different rates.
fn server_cpu_ms_per_mb_in(r: &Report) -> Option<f64> {
    let mb = r.mb_in_per_sec? * r.measured_secs;
    (mb > 0.0).then_some(r.server_cpu_secs? * 1000.0 / mb)
}

fn metrics_for(mode: &str) -> Vec<Metric> {
    let mut m = Vec::new();
    match mode {
        "fanout" | "saturate" => {
            m.push(Metric {
                name: "deliveries/s",
                better: Better::Higher,
                get: |r| r.deliveries_per_sec,
                fmt: int,
            });
            if mode == "saturate" {
                m.push(Metric {
                    name: "peak deliveries/s (1 s)",
                    better: Better::Higher,
                    get: |r| r.peak_deliveries_per_sec,
                    fmt: int,
                });
                m.push(Metric {
                    name: "MB/s in (10^6 B/s)",
                    better: Better::Higher,
                    get: |r| r.mb_in_per_sec,
                    fmt: dec2,
                });
            }
            m.push(Metric {
                name: "delivery ratio",
                better: Better::Info,
                get: |r| r.delivery_ratio,
                fmt: ratio6,
            });
            m.push(Metric {
                name: "lost",
                better: Better::Info,
                get: |r| r.lost.map(|v| v as f64),
                fmt: int,
            });
            m.push(Metric {
                name: "closed by server",
                better: Better::Info,
                get: |r| r.closed_by_server.map(|v| v as f64),
                fmt: int,
            });
            m.push(Metric {
                name: "latency p50 ms",
                better: Better::Lower,
                get: |r| r.latency.map(|l| l.p50_ms),
                fmt: ms3,
            });
            m.push(Metric {
                name: "latency p99 ms",
                better: Better::Lower,
                get: |r| r.latency.map(|l| l.p99_ms),
                fmt: ms3,
            });
            m.push(Metric {
                name: "latency p99.9 ms",
                better: Better::Lower,
                get: |r| r.latency.map(|l| l.p999_ms),
                fmt: ms3,
            });
            m.push(Metric {
                name: "latency max ms",
                better: Better::Lower,
                get: |r| r.latency.map(|l| l.max_ms),
                fmt: ms3,
            });
            m.push(Metric {
                name: "server RSS max MiB",
                better: Better::Lower,
                get: |r| r.server_rss_kib_max.map(|v| v as f64 / 1024.0),
                fmt: mib,
            });
        }
        "flood" => {
            m.push(Metric {
                name: "flooder sent",
                better: Better::Info,
                get: |r| r.sent.map(|v| v as f64),
                fmt: int,
            });
            m.push(Metric {
                name: "relayed",
                better: Better::Info,
                get: |r| r.relayed.map(|v| v as f64),
                fmt: int,
            });
            m.push(Metric {
                name: "flooder close code",
                better: Better::Info,
                get: |r| r.flooder_closed.as_deref().and_then(|c| c.parse().ok()),
                fmt: |v| format!("{v:.0}"),
            });
            m.push(Metric {
                name: "readers closed by server",
                better: Better::Lower,
                get: |r| r.closed_by_server.map(|v| v as f64),
                fmt: int,
            });
            m.push(Metric {
                name: "readers with everything",
                better: Better::Higher,
                get: |r| r.readers_complete.map(|v| v as f64),
                fmt: int,
            });
            m.push(Metric {
                name: "lowest reader delivery ratio",
                better: Better::Higher,
                get: |r| r.reader_ratio_min,
                fmt: ratio6,
            });
            m.push(Metric {
                name: "server RSS max MiB",
                better: Better::Lower,
                get: |r| r.server_rss_kib_max.map(|v| v as f64 / 1024.0),
                fmt: mib,
            });
        }
        "idle" => {
            m.push(Metric {
                name: "still open",
                better: Better::Info,
                get: |r| r.still_open.map(|v| v as f64),
                fmt: int,
            });
            m.push(Metric {
                name: "server RSS KiB/conn",
                better: Better::Lower,
                get: |r| r.rss_per_conn_bytes.map(|b| b / 1024.0),
                fmt: kib,
            });
            m.push(Metric {
                name: "server RSS after MiB",
                better: Better::Lower,
                get: |r| r.server_rss_kib_after.map(|v| v as f64 / 1024.0),
                fmt: mib,
            });
        }
        _ => {}
    }
    m.push(Metric {
        name: "server CPU % of a core",
        better: Better::Info,
        get: |r| r.server_cpu_pct,
        fmt: pct1,
    });
    if mode == "saturate" {
        m.push(Metric {
            name: "server CPU s",
            better: Better::Info,
            get: |r| r.server_cpu_secs,
            fmt: dec2,
        });
        m.push(Metric {
            name: "server CPU ms per MB in",
            better: Better::Lower,
            get: server_cpu_ms_per_mb_in,
            fmt: dec2,
        });
    }
    m.push(Metric {
        name: "tool CPU % of a core",
        better: Better::Info,
        get: |r| Some(r.tool_cpu_pct),
        fmt: pct1,
    });
    m.push(Metric {
        name: "other CPU % (noise)",
        better: Better::Info,
        get: |r| r.other_cpu_pct,
        fmt: pct1,
    });
    m
}

/// How many times better `subject` is than `baseline` (> 1: better).
fn advantage(better: Better, subject: f64, baseline: f64) -> Option<f64> {
    match better {
        Better::Info => None,
        Better::Higher if baseline > 0.0 => Some(subject / baseline),
        Better::Lower if subject > 0.0 => Some(baseline / subject),
        _ => None,
    }
}

/// What the clients spoke and over how many rooms, e.g. "hubbub.v1, 10 rooms".
fn protocol_rooms(r: &Report) -> Option<String> {
    if r.protocol.is_none() && r.rooms.is_none() {
        return None; // a result older than --protocol and --rooms
    }
    let p = r.protocol.as_deref().unwrap_or("raw");
    Some(match r.rooms.unwrap_or(1) {
        1 => format!("{p}, 1 room"),
        n => format!("{p}, {} rooms", thousands(n)),
    })
}

fn server_of(r: &Report) -> String {
    r.server.clone().unwrap_or_else(|| "?".into())
}

fn label_of(r: &Report) -> String {
    r.label.clone().unwrap_or_else(|| r.mode.clone())
}

/// The run of `server` with the same fanout shape as `r` but no slow
/// clients: the twin a slow-consumer run is judged against.
fn no_slow_twin<'a>(runs: &'a [Report], r: &Report) -> Option<&'a Report> {
    runs.iter().find(|o| {
        o.mode == "fanout"
            && o.server == r.server
            && o.slow.unwrap_or(0) == 0
            && o.clients == r.clients
            && o.senders == r.senders
            && o.rate == r.rate
            && o.size == r.size
    })
}

/// Builds the table. `subject` and `baseline` name servers (the `server`
/// field); when `None`, the first two servers seen are used.
pub fn table(runs: &[Report], subject: Option<&str>, baseline: Option<&str>) -> String {
    let mut servers: Vec<String> = Vec::new();
    let mut labels: Vec<String> = Vec::new();
    for r in runs {
        let s = server_of(r);
        if !servers.contains(&s) {
            servers.push(s);
        }
        let l = label_of(r);
        if !labels.contains(&l) {
            labels.push(l);
        }
    }
    let subject = subject
        .map(str::to_string)
        .or_else(|| servers.first().cloned());
    let baseline = baseline.map(str::to_string).or_else(|| {
        servers
            .iter()
            .find(|s| Some(*s) != subject.as_ref())
            .cloned()
    });
    let find = |label: &str, server: &str| {
        runs.iter()
            .rev()
            .find(|r| label_of(r) == label && server_of(r) == server)
    };

    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["scenario".to_string(), "metric".to_string()];
    header.extend(servers.iter().cloned());
    let compare = matches!((&subject, &baseline), (Some(a), Some(b)) if a != b);
    if compare {
        header.push(format!(
            "{} vs {}",
            subject.as_deref().unwrap_or(""),
            baseline.as_deref().unwrap_or("")
        ));
    }
    rows.push(header);

    for label in &labels {
        let Some(first) = servers.iter().find_map(|s| find(label, s)) else {
            continue;
        };
        let mode = first.mode.clone();
        let mut metrics = metrics_for(&mode);
        let slow = first.slow.unwrap_or(0) > 0;
        if slow {
            metrics.insert(
                1,
                Metric {
                    name: "slow clients closed by server",
                    better: Better::Info,
                    get: |r| r.slow_closed_by_server.map(|v| v as f64),
                    fmt: int,
                },
            );
        }
        let mut first_row = true;
        let mut push = |name: String, cells: Vec<String>, adv: String| {
            let mut row = vec![
                if first_row {
                    label.clone()
                } else {
                    String::new()
                },
                name,
            ];
            first_row = false;
            row.extend(cells);
            if compare {
                row.push(adv);
            }
            rows.push(row);
        };
        let setups: Vec<Option<String>> = servers
            .iter()
            .map(|s| find(label, s).and_then(protocol_rooms))
            .collect();
        if setups.iter().any(Option::is_some) {
            let cells = setups
                .into_iter()
                .map(|v| v.unwrap_or_else(|| "-".into()))
                .collect();
            push("protocol, rooms".into(), cells, String::new());
        }
        for m in &metrics {
            let vals: Vec<Option<f64>> = servers
                .iter()
                .map(|s| find(label, s).and_then(|r| (m.get)(r)))
                .collect();
            if vals.iter().all(Option::is_none) {
                continue;
            }
            let cells = vals
                .iter()
                .map(|v| v.map_or("-".into(), |v| (m.fmt)(v)))
                .collect();
            let adv = match (&subject, &baseline) {
                (Some(a), Some(b)) => {
                    let va = find(label, a).and_then(|r| (m.get)(r));
                    let vb = find(label, b).and_then(|r| (m.get)(r));
                    match (va, vb) {
                        (Some(va), Some(vb)) => advantage(m.better, va, vb)
                            .map_or(String::new(), |x| format!("{x:.2}x")),
                        _ => String::new(),
                    }
                }
                _ => String::new(),
            };
            push(m.name.to_string(), cells, adv);
        }
        if slow {
            // Per-reader deliveries/s kept, against the same run with none slow.
            let cells: Vec<String> = servers
                .iter()
                .map(|s| {
                    find(label, s)
                        .and_then(|r| {
                            let twin = no_slow_twin(runs, r)?;
                            let a = r.deliveries_per_sec_per_reader?;
                            let b = twin.deliveries_per_sec_per_reader?;
                            (b > 0.0).then(|| format!("{:.1}%", a / b * 100.0))
                        })
                        .unwrap_or_else(|| "-".into())
                })
                .collect();
            push(
                "deliveries/s per reader vs none slow".into(),
                cells,
                String::new(),
            );
        }
    }

    // Render with padded columns.
    let ncol = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..ncol)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let w = widths[c];
            if c < 2 {
                let _ = write!(line, "{cell:<w$}  ");
            } else {
                let _ = write!(line, "{cell:>w$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
        if i == 0 {
            let total: usize = widths.iter().map(|w| w + 2).sum();
            let _ = writeln!(out, "{}", "-".repeat(total.saturating_sub(2)));
        }
    }
    out
}

/// Parses JSON lines, skipping blank ones.
pub fn parse_lines(text: &str) -> anyhow::Result<Vec<Report>> {
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let r: Report =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?;
        v.push(r);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::LatencySummary;

    fn fanout(server: &str, label: &str, dps: f64, p99: f64, slow: u64) -> Report {
        let readers = 1000 - slow;
        Report {
            mode: "fanout".into(),
            label: Some(label.into()),
            server: Some(server.into()),
            clients: 1000,
            senders: Some(5),
            rate: Some(20.0),
            size: Some(64),
            slow: Some(slow),
            readers: Some(readers),
            deliveries_per_sec: Some(dps),
            deliveries_per_sec_per_reader: Some(dps / readers as f64),
            latency: Some(LatencySummary {
                count: 1,
                mean_ms: p99,
                p50_ms: p99,
                p90_ms: p99,
                p99_ms: p99,
                p999_ms: p99,
                max_ms: p99,
            }),
            ..Report::default()
        }
    }

    #[test]
    fn advantage_direction() {
        assert_eq!(advantage(Better::Higher, 100.0, 10.0), Some(10.0));
        assert_eq!(advantage(Better::Lower, 1.0, 10.0), Some(10.0));
        assert_eq!(advantage(Better::Lower, 0.0, 10.0), None);
        assert_eq!(advantage(Better::Info, 1.0, 2.0), None);
    }

    #[test]
    fn table_has_ratios_and_slow_consumer_share() {
        let runs = vec![
            fanout("hubbub", "fanout-1000", 100_000.0, 1.0, 0),
            fanout("ws", "fanout-1000", 50_000.0, 20.0, 0),
            fanout("hubbub", "slow-50", 95_000.0, 1.0, 50),
            fanout("ws", "slow-50", 40_000.0, 30.0, 50),
        ];
        let t = table(&runs, None, None);
        assert!(t.contains("hubbub vs ws"), "{t}");
        let line = |name: &str, scen: usize| {
            t.lines()
                .filter(|l| l.contains(name))
                .nth(scen)
                .unwrap()
                .to_string()
        };
        let dps = line("deliveries/s ", 0);
        assert!(
            dps.contains("100,000") && dps.contains("50,000") && dps.trim_end().ends_with("2.00x"),
            "{dps}"
        );
        assert!(line("latency p99 ms", 0).trim_end().ends_with("20.00x"));
        // 95,000/950 vs 100,000/1000 = 100%; 40,000/950 vs 50,000/1000 = 84.2%.
        let kept = line("vs none slow", 0);
        assert!(kept.contains("100.0%") && kept.contains("84.2%"), "{kept}");
    }

    #[test]
    fn saturate_rows_show_mb_in_and_server_cpu() {
        let sat = |server: &str, mb: f64, cpu_secs: f64| Report {
            mode: "saturate".into(),
            label: Some("large-60k".into()),
            server: Some(server.into()),
            size: Some(61_440),
            measured_secs: 10.0,
            deliveries_per_sec: Some(mb * 1e6 / 61_440.0 * 5.0),
            mb_in_per_sec: Some(mb),
            server_cpu_pct: Some(cpu_secs * 10.0),
            server_cpu_secs: Some(cpu_secs),
            ..Report::default()
        };
        // hubbub: 400 MB/s for 8 CPU s (2 ms/MB); ws: 100 MB/s for 10 CPU s (10 ms/MB).
        let t = table(
            &[sat("hubbub", 400.0, 8.0), sat("ws", 100.0, 10.0)],
            None,
            None,
        );
        let line = |name: &str| t.lines().find(|l| l.contains(name)).unwrap().to_string();
        let mb = line("MB/s in");
        assert!(
            mb.contains("400.00") && mb.contains("100.00") && mb.trim_end().ends_with("4.00x"),
            "{t}"
        );
        let secs = line("server CPU s ");
        assert!(secs.contains("8.00") && secs.contains("10.00"), "{t}");
        assert!(
            !secs.trim_end().ends_with('x'),
            "CPU seconds are not compared: {t}"
        );
        let per = line("ms per MB in");
        assert!(
            per.contains("2.00") && per.contains("10.00") && per.trim_end().ends_with("5.00x"),
            "{t}"
        );
        // Fanout blocks get none of these rows.
        let f = table(&[fanout("a", "x", 1.0, 1.0, 0)], None, None);
        assert!(!f.contains("MB/s in") && !f.contains("server CPU s"), "{f}");
    }

    #[test]
    fn protocol_and_rooms_are_shown_per_server() {
        let mut v1 = fanout("hubbub", "fanout-1000-rooms", 20_000.0, 1.0, 0);
        v1.protocol = Some("hubbub.v1".into());
        v1.rooms = Some(10);
        v1.room_paths = true;
        // A result from before the flags: no row value.
        let old = fanout("ws", "fanout-1000-rooms", 20_000.0, 1.0, 0);
        let t = table(&[v1.clone(), old], None, None);
        let row = t
            .lines()
            .find(|l| l.contains("protocol, rooms"))
            .unwrap_or_else(|| panic!("{t}"));
        assert!(
            row.contains("hubbub.v1, 10 rooms") && row.trim_end().ends_with('-'),
            "{row}"
        );
        // It survives the JSON line.
        let back = parse_lines(&v1.to_json_line()).unwrap();
        assert_eq!(back[0].protocol.as_deref(), Some("hubbub.v1"));
        assert_eq!((back[0].rooms, back[0].room_paths), (Some(10), true));
        let mut raw = fanout("hubbub", "x", 1.0, 1.0, 0);
        raw.protocol = Some("raw".into());
        raw.rooms = Some(1);
        assert!(table(&[raw], None, None).contains("raw, 1 room"));
        // Blocks of old results get no such row.
        let f = table(&[fanout("a", "x", 1.0, 1.0, 0)], None, None);
        assert!(!f.contains("protocol, rooms"), "{f}");
    }

    #[test]
    fn parses_lines_and_reports_bad_ones() {
        let good = fanout("a", "x", 1.0, 1.0, 0).to_json_line();
        let text = format!("{good}\n\n{good}\n");
        assert_eq!(parse_lines(&text).unwrap().len(), 2);
        assert!(parse_lines("{not json")
            .unwrap_err()
            .to_string()
            .contains("line 1"));
    }
}

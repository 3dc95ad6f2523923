use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use hubbub_bench::conn::Protocol;

use hubbub_bench::floor::{self, FloorCfg};
use hubbub_bench::report::Report;
use hubbub_bench::run::{self, Common, FanoutCfg, FloodCfg, IdleCfg, SaturateCfg};
use hubbub_bench::{churn, compare, sys};

/// Load generator for broadcast WebSocket servers (hubbub or any server that
/// relays every message to every connected client, sender included).
#[derive(Parser, Debug)]
#[command(name = "hubbub-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// N clients; S of them send R msg/s of B bytes for D seconds; every
    /// client reads everything. Reports deliveries/s, delivery ratio, loss,
    /// reordering and latency percentiles.
    Fanout(FanoutArgs),
    /// S senders send as fast as the server takes it, each with at most
    /// --window unconfirmed messages (its own echo confirms one). Reports
    /// the deliveries/s reached and the MB/s the server took in (10^6 B).
    Saturate(SaturateArgs),
    /// Opens N idle connections and holds them; with --server-pid reports
    /// the server's RSS per connection.
    Idle(IdleArgs),
    /// One client sends as fast as it can; N readers read everything at a
    /// modest pace. Reports what the flooder sent, what the server relayed,
    /// whether the flooder was closed, and each reader's delivery ratio
    /// (received / relayed) and close code if it was disconnected.
    Flood(FloodArgs),
    /// The fan-out with no server: T threads write one frame to each of N
    /// loopback sockets R times a second, one thread reads them all. Its
    /// latency is the least any server could show on this machine.
    Floor(FloorArgs),
    /// Creates N rooms (one connection each: send a message, read it back,
    /// close) and leaves them to expire; reports the server's RSS before, at
    /// the peak and after. "Before" comes after a warm-up (--warmup rooms
    /// created and left to expire first); the cold figure is printed too.
    /// Run the server with a short --history-ttl.
    Rooms(RoomsArgs),
    /// Prints a side-by-side table from JSON lines written with --json-out.
    Compare(CompareArgs),
}

#[derive(Args, Debug)]
struct RoomsArgs {
    /// WebSocket base URL of the server.
    #[arg(long, default_value = "ws://127.0.0.1:8081/")]
    url: String,
    /// Server process id, for its RSS.
    #[arg(long)]
    server_pid: u32,
    /// Rooms to create.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    rooms: usize,
    /// Rooms being created at once.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Rooms created and left to expire before "before" is taken, so it
    /// includes what serving the first room costs once (0: none).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Times the N rooms are created and left to expire, one after another.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Seconds to wait for the rooms to expire (longer than the server's
    /// history_ttl).
    #[arg(long, default_value_t = 15.0)]
    settle: f64,
}

/// Where a run's result goes, and the scenario `compare` files it under.
#[derive(Args, Debug, Clone)]
struct OutputArgs {
    /// Print the result as one JSON line on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Append the JSON line to this file (the table stays on stdout).
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Scenario name recorded in the JSON (used by `compare`).
    #[arg(long)]
    label: Option<String>,
}

/// `--protocol`: what the clients speak.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum ProtocolArg {
    /// No subprotocol: messages relayed byte for byte.
    Raw,
    /// Ask for `Sec-WebSocket-Protocol: hubbub.v1` (the 101 must echo it):
    /// skip hello/presence envelopes, check each room's offsets.
    #[value(name = "hubbub.v1")]
    HubbubV1,
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Protocol {
        match p {
            ProtocolArg::Raw => Protocol::Raw,
            ProtocolArg::HubbubV1 => Protocol::HubbubV1,
        }
    }
}

#[derive(Args, Debug, Clone)]
struct CommonArgs {
    /// WebSocket URL of the server: ws://, or wss:// (TLS; any certificate
    /// is accepted: the run measures the server's TLS, not its identity).
    /// Several nodes of one cluster: repeat --url or separate the URLs with
    /// commas; connections go round robin over them (client i to URL
    /// i mod count, or with --rooms N the members of each room in turn), so
    /// senders and readers are spread alike.
    #[arg(
        long,
        value_delimiter = ',',
        num_args = 1,
        default_value = "ws://127.0.0.1:8081/"
    )]
    url: Vec<String>,
    /// What the clients speak: raw (no subprotocol) or hubbub.v1 (JSON
    /// envelopes; loss and order checked on the room's offsets).
    #[arg(long, value_enum, default_value = "raw")]
    protocol: ProtocolArg,
    /// Spread the clients over N rooms: client i joins
    /// /rooms/bench-<i mod N> on the URL's host (each sender in one room;
    /// deliveries expected per room). Without it every client uses the
    /// URL as given (one room).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rooms: Option<u32>,
    /// Server process id: report its CPU and RSS from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    #[command(flatten)]
    out: OutputArgs,
    /// Server name recorded in the JSON (used by `compare`).
    #[arg(long = "server-name")]
    server_name: Option<String>,
    /// Runtime worker threads (1 = single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Connections opened concurrently per ramp step.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Pause between ramp steps, milliseconds.
    #[arg(long, default_value_t = 0)]
    batch_pause_ms: u64,
    /// Seconds allowed for one connection's TCP connect + handshake.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Spread connections over source addresses 127.0.0.1..=127.0.0.N
    /// (0: one per 16,000 connections).
    #[arg(long, default_value_t = 0)]
    source_ips: usize,
    /// Initial read buffer per connection, bytes (grows only for larger frames).
    #[arg(long, default_value_t = 4096)]
    read_buf: usize,
    /// Largest frame accepted from the server, bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_frame: usize,
    /// Never draw the connect progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args, Debug)]
struct FanoutArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Connections (N).
    #[arg(short = 'n', long, default_value_t = 100)]
    clients: usize,
    /// Of which send (S).
    #[arg(short = 's', long, default_value_t = 10)]
    senders: usize,
    /// Messages per second per sender (R).
    #[arg(short = 'r', long, default_value_t = 50.0)]
    rate: f64,
    /// Message size in bytes (B, at least 36).
    #[arg(short = 'b', long, default_value_t = 64)]
    size: usize,
    /// Seconds of sending (D).
    #[arg(short = 'd', long, default_value_t = 10.0)]
    duration: f64,
    /// Stop each sender after this many messages (ends the run early).
    #[arg(long)]
    messages: Option<u64>,
    /// Of the N clients, K connect but never read (slow consumers).
    #[arg(long, default_value_t = 0)]
    slow: usize,
    /// SO_RCVBUF for the slow clients, bytes (default: the kernel's).
    #[arg(long)]
    slow_rcvbuf: Option<u32>,
    /// Seconds to wait for outstanding deliveries after the senders stop.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
}

#[derive(Args, Debug)]
struct SaturateArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[arg(short = 'n', long, default_value_t = 100)]
    clients: usize,
    #[arg(short = 's', long, default_value_t = 10)]
    senders: usize,
    /// Message size in bytes (B, at least 36; large-60k uses 61440).
    #[arg(short = 'b', long, default_value_t = 64)]
    size: usize,
    /// Unconfirmed messages allowed per sender.
    #[arg(short = 'w', long, default_value_t = 16)]
    window: u64,
    /// Senders pause while the slowest reader is this many messages behind
    /// all that was sent (keeps readers from being cut off as slow
    /// consumers by a server with bounded queues; 0 = no limit).
    #[arg(long, default_value_t = 200)]
    max_lag: u64,
    /// Seconds of sending before the measurement starts.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds measured.
    #[arg(short = 'd', long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait for outstanding deliveries after the senders stop.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
}

#[derive(Args, Debug)]
struct FloodArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Readers (N); the flooder is one more connection.
    #[arg(short = 'n', long, default_value_t = 100)]
    readers: usize,
    /// Message size in bytes (B, at least 36).
    #[arg(short = 'b', long, default_value_t = 64)]
    size: usize,
    /// Messages per second each reader reads at most (a person's tab
    /// rendering every message, not a benchmark client).
    #[arg(long, default_value_t = 1000.0)]
    read_rate: f64,
    /// Seconds the flooder sends at most (it stops when the server closes it).
    #[arg(short = 'd', long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait after the flood for the readers to read what was
    /// relayed.
    #[arg(long, default_value_t = 30.0)]
    drain: f64,
}

#[derive(Args, Debug)]
struct IdleArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[arg(short = 'n', long, default_value_t = 10_000)]
    clients: usize,
    /// Seconds to hold the connections before measuring.
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
}

#[derive(Args, Debug)]
struct FloorArgs {
    /// Receiving sockets (N).
    #[arg(short = 'n', long, default_value_t = 1000)]
    clients: usize,
    /// Fan-outs per second, all threads together (R); each goes to all N.
    #[arg(short = 'r', long, default_value_t = 100.0)]
    rate: f64,
    /// Payload bytes per message (B, at least 8).
    #[arg(short = 'b', long, default_value_t = 64)]
    size: usize,
    /// Seconds of sending (D).
    #[arg(short = 'd', long, default_value_t = 10.0)]
    duration: f64,
    /// Sending threads (T), each writing to its share of the sockets.
    #[arg(short = 't', long = "send-threads", default_value_t = 1)]
    send_threads: usize,
    /// Seconds to wait for outstanding deliveries after the last fan-out.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    #[command(flatten)]
    out: OutputArgs,
    /// Name recorded in the JSON's server field (used by `compare`).
    #[arg(long = "server-name", default_value = "floor")]
    server_name: String,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// JSON-lines file(s) written with --json-out.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Server whose advantage is shown (default: the first one seen).
    #[arg(long)]
    subject: Option<String>,
    /// Server compared against (default: the second one seen).
    #[arg(long)]
    baseline: Option<String>,
}

fn secs(v: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("{what} must be a non-negative number of seconds"))
}

fn common_of(a: &CommonArgs) -> anyhow::Result<Common> {
    let urls: Vec<&str> = a.url.iter().map(String::as_str).collect();
    let mut c = Common::with_urls(&urls);
    c.batch = a.batch.max(1);
    c.batch_pause = Duration::from_millis(a.batch_pause_ms);
    c.connect_timeout = secs(a.connect_timeout, "--connect-timeout")?;
    c.source_ips = a.source_ips;
    c.read_buf = a.read_buf.max(64);
    c.max_frame = a.max_frame;
    c.server_pid = a.server_pid;
    c.progress = !a.no_progress && std::io::stderr().is_terminal();
    c.label = a.out.label.clone();
    c.server_name = a.server_name.clone();
    c.threads = a.threads.max(1);
    c.protocol = a.protocol.into();
    c.rooms = a.rooms.map(|n| n as usize);
    if let Some(pid) = a.server_pid {
        if sys::proc_rss_kib(pid).is_none() {
            anyhow::bail!("--server-pid {pid}: no readable /proc/{pid}/status");
        }
    }
    Ok(c)
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    Ok(rt)
}

fn emit(report: &Report, out: &OutputArgs) -> anyhow::Result<()> {
    let line = report.to_json_line();
    if let Some(path) = &out.json_out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{line}")?;
    }
    if out.json {
        eprint!("{}", report.to_table());
        println!("{line}");
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.mode {
        Mode::Fanout(a) => {
            let common = common_of(&a.common)?;
            let cfg = FanoutCfg {
                clients: a.clients,
                senders: a.senders,
                rate: a.rate,
                size: a.size,
                duration: secs(a.duration, "--duration")?,
                messages: a.messages,
                slow: a.slow,
                slow_recv_buffer: a.slow_rcvbuf,
                drain: secs(a.drain, "--drain")?,
            };
            let report = runtime(common.threads)?.block_on(run::fanout(&common, &cfg))?;
            emit(&report, &a.common.out)
        }
        Mode::Saturate(a) => {
            let common = common_of(&a.common)?;
            let cfg = SaturateCfg {
                clients: a.clients,
                senders: a.senders,
                size: a.size,
                window: a.window,
                max_lag: a.max_lag,
                warmup: secs(a.warmup, "--warmup")?,
                duration: secs(a.duration, "--duration")?,
                drain: secs(a.drain, "--drain")?,
            };
            let report = runtime(common.threads)?.block_on(run::saturate(&common, &cfg))?;
            emit(&report, &a.common.out)
        }
        Mode::Flood(a) => {
            let common = common_of(&a.common)?;
            let cfg = FloodCfg {
                readers: a.readers,
                size: a.size,
                read_rate: a.read_rate,
                duration: secs(a.duration, "--duration")?,
                drain: secs(a.drain, "--drain")?,
            };
            let report = runtime(common.threads)?.block_on(run::flood(&common, &cfg))?;
            emit(&report, &a.common.out)
        }
        Mode::Idle(a) => {
            let common = common_of(&a.common)?;
            let cfg = IdleCfg {
                clients: a.clients,
                hold: secs(a.hold, "--hold")?,
            };
            let report = runtime(common.threads)?.block_on(run::idle(&common, &cfg))?;
            emit(&report, &a.common.out)
        }
        Mode::Rooms(a) => {
            sys::raise_nofile_limit().context("raising the open-files limit")?;
            let cfg = churn::ChurnCfg {
                url: a.url,
                rooms: a.rooms,
                warmup: a.warmup,
                rounds: a.rounds,
                concurrency: a.concurrency,
                settle: secs(a.settle, "--settle")?,
                server_pid: a.server_pid,
            };
            let r = runtime(2)?.block_on(churn::run(&cfg))?;
            let rss = |r: churn::Rss| {
                format!(
                    "{} KiB (anonymous {}, file-backed {})",
                    r.total, r.anon, r.file
                )
            };
            println!("== hubbub-bench rooms");
            println!("  server RSS cold              {}", rss(r.cold));
            println!(
                "  after {:>5} warm-up rooms    {} ({:+.1}% of cold)",
                a.warmup,
                rss(r.warm),
                (r.warm.total as f64 - r.cold.total as f64) * 100.0 / r.cold.total as f64
            );
            for (i, round) in r.rounds.iter().enumerate() {
                println!(
                    "  round {}: {} rooms created in {:.1} s",
                    i + 1,
                    a.rooms,
                    round.created_in.as_secs_f64()
                );
                println!("    server RSS before          {}", rss(round.before));
                println!("    server RSS peak            {} KiB", round.peak);
                println!(
                    "    server RSS after expiry    {} ({:+.1}% of before)",
                    rss(round.after),
                    round.after_vs_before()
                );
            }
            Ok(())
        }
        Mode::Floor(a) => {
            sys::raise_nofile_limit().context("raising the open-files limit")?;
            let cfg = FloorCfg {
                clients: a.clients,
                threads: a.send_threads,
                rate: a.rate,
                size: a.size,
                duration: secs(a.duration, "--duration")?,
                drain: secs(a.drain, "--drain")?,
            };
            let mut report = floor::run(&cfg)?;
            report.label = a.out.label.clone();
            report.server = Some(a.server_name);
            emit(&report, &a.out)
        }
        Mode::Compare(a) => {
            let mut runs = Vec::new();
            for f in &a.files {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?;
                runs.extend(
                    compare::parse_lines(&text).with_context(|| format!("in {}", f.display()))?,
                );
            }
            print!(
                "{}",
                compare::table(&runs, a.subject.as_deref(), a.baseline.as_deref())
            );
            Ok(())
        }
    }
}

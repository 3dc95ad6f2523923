//! The three benchmark modes and the connection tasks they share.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Mutex, Notify};
use tokio::task::JoinHandle;

use crate::account::{Account, AccountCfg};
use crate::conn::{self, ConnectOpts, Protocol, ReadHalf, Stream, Target, WriteHalf};
use crate::frame::{self, FrameReader, MaskGen};
use crate::latency;
use crate::payload::{self, Header};
use crate::report::Report;
use crate::sys::{self, CpuMark};
use crate::tracker::{self, Counts};

/// Settings every mode shares.
#[derive(Debug, Clone)]
pub struct Common {
    /// WebSocket URLs of the server, or of several nodes serving the same
    /// clients (a cluster): connections are spread over them, see
    /// [`Common::url_index`].
    pub urls: Vec<String>,
    /// Connections opened concurrently per ramp step.
    pub batch: usize,
    /// Pause between ramp steps.
    pub batch_pause: Duration,
    pub connect_timeout: Duration,
    /// Spread connections over 127.0.0.1..=127.0.0.N (0 = decide from the count).
    pub source_ips: usize,
    /// Initial read buffer per connection, bytes.
    pub read_buf: usize,
    /// Largest frame accepted from the server.
    pub max_frame: usize,
    pub server_pid: Option<u32>,
    pub progress: bool,
    pub label: Option<String>,
    pub server_name: Option<String>,
    /// Worker threads of the runtime (for the report only).
    pub threads: usize,
    /// What the clients speak.
    pub protocol: Protocol,
    /// `Some(n)`: client `i` joins `/rooms/bench-<i % n>`; `None`: every
    /// client uses the URL as given (one room).
    pub rooms: Option<usize>,
}

impl Common {
    pub fn new(url: &str) -> Self {
        Common::with_urls(&[url])
    }

    /// Settings for several nodes' URLs (at least one).
    pub fn with_urls(urls: &[&str]) -> Self {
        Common {
            urls: urls.iter().map(|u| u.to_string()).collect(),
            batch: 100,
            batch_pause: Duration::ZERO,
            connect_timeout: Duration::from_secs(10),
            source_ips: 0,
            read_buf: 4096,
            max_frame: 1 << 20,
            server_pid: None,
            progress: false,
            label: None,
            server_name: None,
            threads: 1,
            protocol: Protocol::Raw,
            rooms: None,
        }
    }

    /// How many rooms the clients are spread over.
    pub fn room_count(&self) -> u32 {
        self.rooms.unwrap_or(1).max(1) as u32
    }

    /// Client `i`'s room number (0 when the URL's path is used).
    pub fn room_of(&self, i: usize) -> u32 {
        (i % self.room_count() as usize) as u32
    }

    /// The URLs as one string: the URL, or several joined by commas.
    pub fn url_label(&self) -> String {
        self.urls.join(",")
    }

    /// Which of `urls` client `i` connects to: round robin over the
    /// members of each room. Client `i` is the `i / rooms`-th member of
    /// room `i % rooms`, and goes to URL `(i / rooms) % urls`; with one room
    /// that is `i % urls`, so the first S clients (the senders) are spread
    /// like the readers. Every room gets members on every URL as long as
    /// it has as many members as there are URLs.
    pub fn url_index(&self, i: usize) -> usize {
        (i / self.room_count() as usize) % self.urls.len().max(1)
    }

    /// Client `i`'s room path to join, if rooms were asked for.
    fn room_path_of(&self, i: usize) -> Option<u32> {
        self.rooms.map(|_| self.room_of(i))
    }
}

#[derive(Debug, Clone)]
pub struct FanoutCfg {
    pub clients: usize,
    pub senders: usize,
    /// Messages per second per sender.
    pub rate: f64,
    pub size: usize,
    pub duration: Duration,
    /// Stop each sender after this many messages (the run may end sooner than `duration`).
    pub messages: Option<u64>,
    /// Clients that connect but never read.
    pub slow: usize,
    /// SO_RCVBUF of the slow clients.
    pub slow_recv_buffer: Option<u32>,
    /// Longest wait for deliveries after the senders stop.
    pub drain: Duration,
}

#[derive(Debug, Clone)]
pub struct SaturateCfg {
    pub clients: usize,
    pub senders: usize,
    pub size: usize,
    pub window: u64,
    /// No sender writes while the slowest reader is this many messages
    /// behind everything sent (0 = no limit).
    pub max_lag: u64,
    pub warmup: Duration,
    pub duration: Duration,
    pub drain: Duration,
}

#[derive(Debug, Clone)]
pub struct IdleCfg {
    pub clients: usize,
    pub hold: Duration,
}

#[derive(Debug, Clone)]
pub struct FloodCfg {
    /// Connections that only read (N); the flooder is one more.
    pub readers: usize,
    pub size: usize,
    /// Messages per second each reader reads at most.
    pub read_rate: f64,
    /// Longest the flooder sends (it stops sooner if the server closes it).
    pub duration: Duration,
    /// Longest wait, after the flood, for the readers to catch up.
    pub drain: Duration,
}

/// Counters one connection shares with the coordinator. Written by one task
/// with plain stores, read by the sampler: no contended read-modify-write.
#[derive(Debug, Default)]
struct Shared {
    /// Distinct messages this connection has received.
    received: AtomicU64,
    /// Messages this connection has sent (senders).
    sent: AtomicU64,
    /// Highest own sequence number echoed back, plus one (senders).
    confirmed: AtomicU64,
    /// Wakes the writer when `confirmed` moves.
    confirm: Notify,
    /// Set when the connection ended for any reason other than our stop.
    closed: AtomicBool,
}

/// What a reader knows of the run.
#[derive(Debug, Clone, Copy)]
struct ReaderCtx {
    epoch: Instant,
    /// The run, this connection's room and sender id, the protocol.
    acct: AccountCfg,
    read_buf: usize,
    max_frame: usize,
    /// Read at most this many messages a second (flood's readers: ordinary
    /// clients that take their time); `None` reads as fast as they come.
    read_rate: Option<f64>,
}

impl ReaderCtx {
    /// A fresh run whose messages carry send timestamps from now on, as the
    /// fanout and saturate modes send them.
    fn timed(common: &Common, senders: usize, size: usize) -> ReaderCtx {
        ReaderCtx {
            epoch: Instant::now(),
            acct: AccountCfg {
                protocol: common.protocol,
                run: run_tag(),
                senders,
                room: 0,
                rooms: common.room_count(),
                me: None,
                size: Some(size),
                track_latency: true,
            },
            read_buf: common.read_buf,
            max_frame: common.max_frame,
            read_rate: None,
        }
    }
}

#[derive(Debug)]
struct ReaderResult {
    acct: Account,
    /// The server ended the connection: close code if it sent one.
    server_closed: Option<Option<u16>>,
    error: Option<String>,
}

type Writer = Arc<Mutex<WriteHalf>>;

fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    t ^ (u64::from(std::process::id()) << 32)
}

async fn write_frame(
    wr: &Writer,
    masks: &mut MaskGen,
    opcode: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    frame::encode_frame(&mut out, opcode, payload, masks.next_mask());
    wr.lock().await.write_all(&out).await
}

/// Reads and accounts for everything the server sends on one connection
/// until `stop` flips, the server closes, or an error.
async fn reader_task(
    mut rd: ReadHalf,
    wr: Writer,
    ctx: ReaderCtx,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> ReaderResult {
    let mut fr = FrameReader::new(ctx.read_buf, ctx.max_frame);
    let mut acct = Account::new(ctx.acct);
    let mut masks = MaskGen::new(seed());
    // Reassembly of fragmented messages (servers rarely fragment; reused).
    let mut frag: Vec<u8> = Vec::new();
    let mut frag_opcode = frame::OP_TEXT;
    let mut in_frag = false;
    let mut server_closed = None;
    let mut error = None;
    // A paced reader's clock starts with the first message it reads.
    let mut paced_since: Option<Instant> = None;

    'outer: loop {
        if *stop.borrow() {
            break;
        }
        let n = tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = rd.read(fr.spare()) => match r {
                Ok(0) => { server_closed = Some(None); break; }
                Ok(n) => n,
                Err(e) => { error = Some(format!("read: {e}")); break; }
            },
        };
        fr.filled(n);
        // One clock reading per read: every message in it arrived together.
        let now = now_ns(ctx.epoch);
        let confirmed_before = acct.confirmed;
        loop {
            let f = match fr.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    error = Some(format!("bad frame from server: {e}"));
                    break 'outer;
                }
            };
            let (opcode, msg): (u8, &[u8]) = match f.opcode {
                frame::OP_TEXT | frame::OP_BINARY if f.fin && !in_frag => (f.opcode, f.payload),
                frame::OP_TEXT | frame::OP_BINARY => {
                    frag.clear();
                    frag.extend_from_slice(f.payload);
                    frag_opcode = f.opcode;
                    in_frag = true;
                    continue;
                }
                frame::OP_CONT if in_frag => {
                    frag.extend_from_slice(f.payload);
                    if !f.fin {
                        continue;
                    }
                    in_frag = false;
                    (frag_opcode, &frag)
                }
                frame::OP_CONT => {
                    error = Some("continuation frame without a start".into());
                    break 'outer;
                }
                frame::OP_PING => {
                    let p = f.payload.to_vec(); // rare: every ping interval
                    if let Err(e) = write_frame(&wr, &mut masks, frame::OP_PONG, &p).await {
                        error = Some(format!("pong: {e}"));
                        break 'outer;
                    }
                    continue;
                }
                frame::OP_PONG => continue,
                frame::OP_CLOSE => {
                    let code = (f.payload.len() >= 2)
                        .then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                    server_closed = Some(code);
                    let reply = code.map(|c| c.to_be_bytes().to_vec()).unwrap_or_default();
                    let _ = write_frame(&wr, &mut masks, frame::OP_CLOSE, &reply).await;
                    break 'outer;
                }
                _ => continue, // parse_header rejects other opcodes
            };
            acct.on_message(opcode, msg, now);
        }
        shared.received.store(acct.received(), Ordering::Relaxed);
        if acct.confirmed != confirmed_before {
            shared.confirmed.store(acct.confirmed, Ordering::Release);
            shared.confirm.notify_one();
        }
        if let Some(rate) = ctx.read_rate {
            // Ahead of its pace: wait before the next read, and let the
            // server hold what comes meanwhile (as a busy client would).
            let got = acct.received();
            if got > 0 {
                let since = *paced_since.get_or_insert_with(Instant::now);
                let due = since + Duration::from_secs_f64(got as f64 / rate);
                tokio::select! {
                    biased;
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep_until(due.into()) => {}
                }
            }
        }
    }
    shared.received.store(acct.received(), Ordering::Relaxed);
    if server_closed.is_some() || error.is_some() {
        shared.closed.store(true, Ordering::Relaxed);
        shared.confirm.notify_one();
    }
    ReaderResult {
        acct,
        server_closed,
        error,
    }
}

/// A sender's message body, ready for `payload::restamp` before each send.
fn sender_body(size: usize, run: u16, id: u32) -> Vec<u8> {
    let mut body = vec![0u8; size];
    payload::encode(
        &mut body,
        &Header {
            run,
            sender: id,
            seq: 0,
            ts_ns: 0,
        },
    );
    body
}

/// Sends `rate` messages/s from `start` until `stop`, or `limit` messages.
#[allow(clippy::too_many_arguments)]
async fn paced_writer(
    wr: Writer,
    id: u32,
    run: u16,
    epoch: Instant,
    size: usize,
    period: Duration,
    start: tokio::time::Instant,
    limit: Option<u64>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<u64, String> {
    let mut body = sender_body(size, run, id);
    let mut out = Vec::with_capacity(size + 16);
    let mut masks = MaskGen::new(seed() ^ u64::from(id));
    let mut tick = tokio::time::interval_at(start, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut seq = 0u64;
    loop {
        if limit.is_some_and(|l| seq >= l) || shared.closed.load(Ordering::Relaxed) {
            break;
        }
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        if *stop.borrow() {
            break;
        }
        payload::restamp(&mut body, seq, now_ns(epoch));
        out.clear();
        frame::encode_frame(&mut out, frame::OP_TEXT, &body, masks.next_mask());
        if let Err(e) = wr.lock().await.write_all(&out).await {
            return Err(format!("send: {e}"));
        }
        seq += 1;
        shared.sent.store(seq, Ordering::Relaxed);
    }
    Ok(seq)
}

/// Saturate's guard against readers falling behind: the senders of a room
/// together may be at most `max_lag` messages ahead of the slowest open
/// reader of that room (a reader receives its room's messages only).
/// Without it a reader the tool serves late would pile up messages in the
/// server until a server with a bounded per-peer queue (as it should have)
/// disconnects it, and the run would measure that instead of throughput.
#[derive(Debug)]
struct LagGate {
    max_lag: u64,
    rooms: Vec<RoomLag>,
    /// Wakes blocked senders when a room's `min_received` moves.
    moved: Notify,
}

#[derive(Debug, Default)]
struct RoomLag {
    /// Messages written by the room's senders.
    sent_total: AtomicU64,
    /// Distinct messages received by the room's slowest open reader.
    min_received: AtomicU64,
}

impl LagGate {
    fn new(max_lag: u64, rooms: u32) -> LagGate {
        LagGate {
            max_lag,
            rooms: (0..rooms.max(1)).map(|_| RoomLag::default()).collect(),
            moved: Notify::new(),
        }
    }

    /// How many more messages a sender of `room` may send now.
    fn allowance(&self, room: u32) -> u64 {
        if self.max_lag == 0 {
            return u64::MAX;
        }
        let r = &self.rooms[room as usize];
        let ahead = r
            .sent_total
            .load(Ordering::Acquire)
            .saturating_sub(r.min_received.load(Ordering::Acquire));
        self.max_lag.saturating_sub(ahead)
    }

    /// Recomputes each room's slowest reader count every millisecond until
    /// `stop`. `readers` are (room, counters).
    async fn watch(
        self: Arc<Self>,
        readers: Vec<(u32, Arc<Shared>)>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last = vec![0u64; self.rooms.len()];
        let mut min = vec![u64::MAX; self.rooms.len()];
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
            }
            min.fill(u64::MAX);
            for (room, r) in &readers {
                if !r.closed.load(Ordering::Relaxed) {
                    let m = &mut min[*room as usize];
                    *m = (*m).min(r.received.load(Ordering::Relaxed));
                }
            }
            let mut moved = false;
            for (i, (&m, l)) in min.iter().zip(last.iter_mut()).enumerate() {
                if m != *l {
                    *l = m;
                    self.rooms[i].min_received.store(m, Ordering::Release);
                    moved = true;
                }
            }
            if moved {
                self.moved.notify_waiters();
            }
        }
    }
}

/// Sends as fast as the server takes messages, keeping at most `window` of
/// this sender's messages unconfirmed (not yet echoed back to it), and
/// within the lag gate.
#[allow(clippy::too_many_arguments)]
async fn windowed_writer(
    wr: Writer,
    id: u32,
    run: u16,
    epoch: Instant,
    size: usize,
    window: u64,
    gate: Arc<LagGate>,
    room: u32,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<u64, String> {
    let mut body = sender_body(size, run, id);
    let mut out = Vec::with_capacity((size + 16) * window as usize);
    let mut masks = MaskGen::new(seed() ^ u64::from(id));
    let mut seq = 0u64;
    loop {
        if *stop.borrow() || shared.closed.load(Ordering::Relaxed) {
            break;
        }
        // Register for both wake-ups before checking, so none is missed.
        let confirmed_moved = shared.confirm.notified();
        let gate_moved = gate.moved.notified();
        tokio::pin!(confirmed_moved, gate_moved);
        confirmed_moved.as_mut().enable();
        gate_moved.as_mut().enable();
        let confirmed = shared.confirmed.load(Ordering::Acquire);
        let in_flight = seq.saturating_sub(confirmed);
        let n = window.saturating_sub(in_flight).min(gate.allowance(room));
        if n > 0 {
            // Send all the window allows in one write.
            out.clear();
            let ts = now_ns(epoch);
            for _ in 0..n {
                payload::restamp(&mut body, seq, ts);
                frame::encode_frame(&mut out, frame::OP_TEXT, &body, masks.next_mask());
                seq += 1;
            }
            gate.rooms[room as usize]
                .sent_total
                .fetch_add(n, Ordering::AcqRel);
            if let Err(e) = wr.lock().await.write_all(&out).await {
                return Err(format!("send: {e}"));
            }
            shared.sent.store(seq, Ordering::Relaxed);
            continue;
        }
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = &mut confirmed_moved => {}
            _ = &mut gate_moved => {}
        }
    }
    Ok(seq)
}

/// One open connection during a run.
struct Client {
    shared: Arc<Shared>,
    writer: Writer,
    reader: Option<JoinHandle<ReaderResult>>,
    /// A slow client keeps its read half unread until the end.
    unread: Option<ReadHalf>,
}

fn progress_bar(show: bool, len: u64, what: &str) -> ProgressBar {
    let pb = if show {
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn source_ips_for(common: &Common, clients: usize) -> usize {
    if common.source_ips > 0 {
        common.source_ips
    } else {
        // About 28k ephemeral ports per source address; keep well below.
        clients.div_ceil(16_000).max(1)
    }
}

/// Resolves every URL of the run, in order.
async fn resolve_targets(common: &Common) -> anyhow::Result<Vec<Target>> {
    if common.urls.is_empty() {
        bail!("no URL to connect to");
    }
    let mut targets = Vec::with_capacity(common.urls.len());
    for url in &common.urls {
        targets.push(Target::resolve(url).await?);
    }
    Ok(targets)
}

/// Opens `count` connections in batches, connection `i` to
/// `targets[common.url_index(i)]`; `opts_for(i)` gives each one's socket
/// options. Returns them in order (None = failed) and the errors.
async fn ramp(
    common: &Common,
    targets: &[Target],
    count: usize,
    opts_for: impl Fn(usize) -> ConnectOpts,
) -> (Vec<Option<Stream>>, Vec<String>, f64) {
    let pb = progress_bar(common.progress, count as u64, "connecting");
    let started = Instant::now();
    let mut out: Vec<Option<Stream>> = Vec::with_capacity(count);
    let mut errors = Vec::new();
    let batch = common.batch.max(1);
    let mut i = 0;
    while i < count {
        let end = (i + batch).min(count);
        let mut set = tokio::task::JoinSet::new();
        for j in i..end {
            let t = targets[common.url_index(j)].clone();
            let opts = opts_for(j);
            let timeout = common.connect_timeout;
            set.spawn(async move { (j, conn::connect(&t, opts, timeout).await) });
        }
        let mut got: Vec<(usize, anyhow::Result<Stream>)> = Vec::with_capacity(end - i);
        while let Some(r) = set.join_next().await {
            match r {
                Ok(x) => got.push(x),
                Err(e) => errors.push(format!("connect task: {e}")),
            }
            pb.inc(1);
        }
        got.sort_by_key(|(j, _)| *j);
        for (_, r) in got {
            match r {
                Ok(s) => out.push(Some(s)),
                Err(e) => {
                    errors.push(format!("{e:#}"));
                    out.push(None);
                }
            }
        }
        i = end;
        if i < count && !common.batch_pause.is_zero() {
            tokio::time::sleep(common.batch_pause).await;
        }
    }
    pb.finish_and_clear();
    (out, errors, started.elapsed().as_secs_f64())
}

/// Samples deliveries and server RSS once a second until `stop`.
struct Sampler {
    handle: JoinHandle<SamplerResult>,
}

#[derive(Debug, Default)]
struct SamplerResult {
    peak_per_sec: f64,
    rss_max: Option<u64>,
}

impl Sampler {
    /// Peak deliveries are counted only while `measuring` is true.
    fn start(
        counters: Vec<Arc<Shared>>,
        server_pid: Option<u32>,
        measuring: Arc<AtomicBool>,
        mut stop: watch::Receiver<bool>,
    ) -> Sampler {
        let handle = tokio::spawn(async move {
            let mut res = SamplerResult {
                rss_max: server_pid.and_then(sys::proc_rss_kib),
                ..Default::default()
            };
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last: Option<(Instant, u64)> = None;
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tick.tick() => {}
                }
                if let Some(pid) = server_pid {
                    if let Some(r) = sys::proc_rss_kib(pid) {
                        res.rss_max = Some(res.rss_max.map_or(r, |m| m.max(r)));
                    }
                }
                let total: u64 = counters
                    .iter()
                    .map(|c| c.received.load(Ordering::Relaxed))
                    .sum();
                let now = Instant::now();
                if measuring.load(Ordering::Relaxed) {
                    if let Some((t, n)) = last {
                        let dt = now.duration_since(t).as_secs_f64();
                        if dt > 0.5 {
                            res.peak_per_sec = res.peak_per_sec.max((total - n) as f64 / dt);
                        }
                    }
                    last = Some((now, total));
                } else {
                    last = None;
                }
            }
            res
        });
        Sampler { handle }
    }
}

fn sum_sent(senders: &[Client]) -> u64 {
    senders
        .iter()
        .map(|c| c.shared.sent.load(Ordering::Relaxed))
        .sum()
}

/// Messages of these senders the server has echoed back to them: what it
/// has taken in from them (and relayed).
fn sum_confirmed(senders: &[Client]) -> u64 {
    senders
        .iter()
        .map(|c| c.shared.confirmed.load(Ordering::Acquire))
        .sum()
}

fn sum_received(clients: &[Arc<Shared>]) -> u64 {
    clients
        .iter()
        .map(|c| c.received.load(Ordering::Relaxed))
        .sum()
}

/// What a finished run collected from its readers.
#[derive(Default)]
struct Collected {
    counts: Counts,
    lost_gaps: u64,
    lost_tail: u64,
    foreign: u64,
    misrouted: u64,
    replayed: u64,
    /// hubbub.v1 readers that got a message before any hello.
    no_hello: u64,
    hist: Option<Histogram<u64>>,
    closed_by_server: u64,
    close_codes: BTreeMap<String, u64>,
    errors: Vec<String>,
}

fn code_key(code: Option<u16>) -> String {
    code.map_or_else(|| "none".to_string(), |c| c.to_string())
}

async fn collect(readers: Vec<JoinHandle<ReaderResult>>, sent: &[u64], latency: bool) -> Collected {
    let mut c = Collected {
        hist: latency.then(latency::new_total_histogram),
        ..Default::default()
    };
    for h in readers {
        match h.await {
            Ok(r) => {
                let a = &r.acct;
                let s = a.summary(sent);
                c.counts += s.counts;
                c.lost_gaps += s.lost_gaps;
                c.lost_tail += s.lost_tail;
                c.foreign += a.foreign;
                c.misrouted += a.misrouted;
                c.replayed += a.replayed;
                c.no_hello += u64::from(a.message_before_hello);
                if let (Some(total), Some(part)) = (c.hist.as_mut(), a.histogram()) {
                    latency::merge_into(total, part);
                }
                if let Some(code) = r.server_closed {
                    c.closed_by_server += 1;
                    *c.close_codes.entry(code_key(code)).or_default() += 1;
                }
                if let Some(e) = r.error {
                    if c.errors.len() < 5 {
                        c.errors.push(e);
                    }
                }
            }
            Err(e) => c.errors.push(format!("reader task: {e}")),
        }
    }
    if c.no_hello > 0 {
        c.errors.push(format!(
            "{} hubbub.v1 readers got a message before any hello (offsets checked from their first message)",
            c.no_hello
        ));
    }
    c
}

/// Reads a client that never read until the server's close (or EOF), or
/// `deadline`: was it disconnected by the server, and with which code?
async fn probe_closed(mut rd: ReadHalf, deadline: tokio::time::Instant) -> Option<Option<u16>> {
    let mut fr = FrameReader::new(64 * 1024, 16 << 20);
    loop {
        let n = match tokio::time::timeout_at(deadline, rd.read(fr.spare())).await {
            Err(_) => return None, // still open
            Ok(Ok(0)) => return Some(None),
            Ok(Err(_)) => return Some(None), // reset by the server
            Ok(Ok(n)) => n,
        };
        fr.filled(n);
        loop {
            match fr.next_frame() {
                Ok(Some(f)) if f.opcode == frame::OP_CLOSE => {
                    let code = (f.payload.len() >= 2)
                        .then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                    return Some(code);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return Some(None),
            }
        }
    }
}

fn run_tag() -> u16 {
    (seed() >> 7) as u16
}

fn base_report(mode: &str, common: &Common, clients: usize) -> Report {
    Report {
        mode: mode.to_string(),
        protocol: Some(common.protocol.name().to_string()),
        rooms: Some(u64::from(common.room_count())),
        room_paths: common.rooms.is_some(),
        label: common.label.clone(),
        server: common.server_name.clone(),
        url: common.url_label(),
        clients: clients as u64,
        tool_threads: common.threads as u64,
        server_pid: common.server_pid,
        server_rss_kib_before: common.server_pid.and_then(sys::proc_rss_kib),
        ..Report::default()
    }
}

/// Connects `clients` sockets and starts their readers; `slow` sockets at
/// the end of the range are left unread.
#[allow(clippy::too_many_arguments)]
async fn connect_clients(
    common: &Common,
    targets: &[Target],
    clients: usize,
    senders: usize,
    slow: usize,
    slow_recv_buffer: Option<u32>,
    ctx: ReaderCtx,
    stop: &watch::Receiver<bool>,
    report: &mut Report,
) -> anyhow::Result<Vec<Client>> {
    let ips = source_ips_for(common, clients);
    let first_slow = clients - slow;
    let (streams, errors, secs) = ramp(common, targets, clients, |i| ConnectOpts {
        source: conn::source_addr(i, ips, &targets[common.url_index(i)].addr),
        recv_buffer: if i >= first_slow {
            slow_recv_buffer
        } else {
            None
        },
        room: common.room_path_of(i),
        protocol: common.protocol,
    })
    .await;
    report.connect_secs = secs;
    report.connected = streams.iter().filter(|s| s.is_some()).count() as u64;
    report.connect_failed = clients as u64 - report.connected;
    if report.connect_failed > 0 {
        bail!(
            "{} of {} connections failed (first error: {})",
            report.connect_failed,
            clients,
            errors.first().map(String::as_str).unwrap_or("?")
        );
    }
    let mut out = Vec::with_capacity(clients);
    for (i, s) in streams.into_iter().enumerate() {
        let (rd, wr) = s.expect("all connected").into_split();
        let shared = Arc::new(Shared::default());
        let writer = Arc::new(Mutex::new(wr));
        let (reader, unread) = if i >= first_slow {
            (None, Some(rd))
        } else {
            let ctx = ReaderCtx {
                acct: AccountCfg {
                    me: (i < senders).then_some(i as u32),
                    room: common.room_of(i),
                    ..ctx.acct
                },
                // A sender reads its echoes as they come.
                read_rate: if i < senders { None } else { ctx.read_rate },
                ..ctx
            };
            let h = tokio::spawn(reader_task(
                rd,
                writer.clone(),
                ctx,
                shared.clone(),
                stop.clone(),
            ));
            (Some(h), None)
        };
        out.push(Client {
            shared,
            writer,
            reader,
            unread,
        });
    }
    Ok(out)
}

fn check_rooms(common: &Common) -> anyhow::Result<()> {
    if let Some(n) = common.rooms {
        if n == 0 || n > u32::MAX as usize {
            bail!("--rooms must be at least 1");
        }
    }
    Ok(())
}

fn check_message_size(size: usize) -> anyhow::Result<()> {
    if size < payload::HEADER_LEN {
        bail!(
            "--size must be at least {} bytes (the message header)",
            payload::HEADER_LEN
        );
    }
    Ok(())
}

/// Deliveries the run should make: each sender's messages times the
/// readers of its room. `reader_rooms` are the rooms of the readers.
fn expected_deliveries(common: &Common, sent: &[u64], reader_rooms: &[u32]) -> u64 {
    let mut per_room = vec![0u64; common.room_count() as usize];
    for &r in reader_rooms {
        per_room[r as usize] += 1;
    }
    sent.iter()
        .enumerate()
        .map(|(s, &n)| n * per_room[common.room_of(s) as usize])
        .sum()
}

/// Waits until the readers have received `want` messages in all, or `limit`.
async fn drain(readers: &[Arc<Shared>], want: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while sum_received(readers) < want && Instant::now() < deadline {
        if readers.iter().all(|r| r.closed.load(Ordering::Relaxed)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn finish_cpu(report: &mut Report, mark: &CpuMark, pid: Option<u32>) {
    let u = mark.since(pid);
    report.tool_cpu_pct = u.tool_pct;
    report.server_cpu_pct = u.server_pct;
    report.server_cpu_secs = u.server_secs;
    report.machine_cpu_pct = u.machine_pct;
    report.other_cpu_pct = u.other_pct;
}

fn fill_deliveries(report: &mut Report, c: &Collected, sent_total: u64, expected: u64) {
    report.sent = Some(sent_total);
    report.expected = Some(expected);
    report.received = Some(c.counts.unique);
    report.delivery_ratio = tracker::delivery_ratio(c.counts.unique, expected, 1);
    report.lost = Some(c.lost_gaps + c.lost_tail);
    report.lost_gaps = Some(c.lost_gaps);
    report.lost_tail = Some(c.lost_tail);
    report.reordered = Some(c.counts.reordered);
    report.duplicates = Some(c.counts.duplicates);
    report.foreign = Some(c.foreign);
    report.misrouted = Some(c.misrouted);
    report.replayed = Some(c.replayed);
    report.latency = c.hist.as_ref().and_then(latency::summarize);
    report.closed_by_server = Some(c.closed_by_server);
    report.close_codes = c.close_codes.clone();
    report.errors.extend(c.errors.iter().cloned());
}

/// `fanout`: N clients, S of them send R msg/s of B bytes for D seconds.
pub async fn fanout(common: &Common, cfg: &FanoutCfg) -> anyhow::Result<Report> {
    check_message_size(cfg.size)?;
    check_rooms(common)?;
    if cfg.senders == 0 || cfg.senders + cfg.slow > cfg.clients {
        bail!("need 1 <= senders and senders + slow <= clients");
    }
    if cfg.senders as u64 > u64::from(payload::MAX_SENDER) + 1 {
        bail!("too many senders");
    }
    if !(cfg.rate > 0.0 && cfg.rate.is_finite()) {
        bail!("--rate must be a positive number of messages per second");
    }
    let _ = sys::raise_nofile_limit();
    let targets = resolve_targets(common).await?;
    let mut report = base_report("fanout", common, cfg.clients);
    report.senders = Some(cfg.senders as u64);
    report.slow = Some(cfg.slow as u64);
    report.rate = Some(cfg.rate);
    report.size = Some(cfg.size as u64);

    let ctx = ReaderCtx::timed(common, cfg.senders, cfg.size);
    let (epoch, run) = (ctx.epoch, ctx.acct.run);
    let (stop_readers_tx, stop_readers) = watch::channel(false);
    let mut clients = connect_clients(
        common,
        &targets,
        cfg.clients,
        cfg.senders,
        cfg.slow,
        cfg.slow_recv_buffer,
        ctx,
        &stop_readers,
        &mut report,
    )
    .await?;
    let readers: Vec<Arc<Shared>> = clients
        .iter()
        .filter(|c| c.reader.is_some())
        .map(|c| c.shared.clone())
        .collect();
    let reader_rooms: Vec<u32> = (0..cfg.clients - cfg.slow)
        .map(|i| common.room_of(i))
        .collect();
    report.readers = Some(readers.len() as u64);

    let (stop_senders_tx, stop_senders) = watch::channel(false);
    let measuring = Arc::new(AtomicBool::new(true));
    let sampler = Sampler::start(
        readers.clone(),
        common.server_pid,
        measuring.clone(),
        stop_readers.clone(),
    );
    let period = Duration::from_secs_f64(1.0 / cfg.rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut writers = Vec::with_capacity(cfg.senders);
    for (i, c) in clients.iter().take(cfg.senders).enumerate() {
        // Stagger the senders evenly over one period.
        let offset = period.mul_f64(i as f64 / cfg.senders as f64);
        writers.push(tokio::spawn(paced_writer(
            c.writer.clone(),
            i as u32,
            run,
            epoch,
            cfg.size,
            period,
            start + offset,
            cfg.messages,
            c.shared.clone(),
            stop_senders.clone(),
        )));
    }
    tokio::time::sleep_until(start).await;
    let cpu = CpuMark::now(common.server_pid);
    let send_start = Instant::now();
    // The measured interval: D seconds, or until every sender hit its limit.
    let deadline = start + cfg.duration;
    while tokio::time::Instant::now() < deadline && !writers.iter().all(|w| w.is_finished()) {
        let step = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::sleep(step.min(Duration::from_millis(5))).await;
    }
    let _ = stop_senders_tx.send(true);
    let measured = send_start.elapsed().as_secs_f64();
    let delivered_in_window = sum_received(&readers);
    measuring.store(false, Ordering::Relaxed);
    finish_cpu(&mut report, &cpu, common.server_pid);
    let sent = join_writers(writers, &clients, &mut report).await;
    let sent_total: u64 = sent.iter().sum();
    let expected = expected_deliveries(common, &sent, &reader_rooms);
    drain(&readers, expected, cfg.drain).await;

    // Slow clients: did the server cut them off?
    let probe_deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let probes: Vec<_> = clients
        .iter_mut()
        .filter_map(|c| c.unread.take())
        .map(|rd| tokio::spawn(probe_closed(rd, probe_deadline)))
        .collect();

    let _ = stop_readers_tx.send(true);
    let handles: Vec<_> = clients.iter_mut().filter_map(|c| c.reader.take()).collect();
    let collected = collect(handles, &sent, true).await;
    let mut slow_closed = 0;
    let mut slow_codes = BTreeMap::new();
    for p in probes {
        if let Ok(Some(code)) = p.await {
            slow_closed += 1;
            *slow_codes
                .entry(format!("slow:{}", code_key(code)))
                .or_default() += 1;
        }
    }
    say_goodbye(clients.iter().map(|c| &c.writer)).await;
    let s = sampler.handle.await.unwrap_or_default();

    let nreaders = readers.len() as u64;
    fill_deliveries(&mut report, &collected, sent_total, expected);
    report.close_codes.extend(slow_codes);
    report.slow_closed_by_server = (cfg.slow > 0).then_some(slow_closed);
    report.measured_secs = measured;
    report.send_rate = Some(sent_total as f64 / measured);
    let dps = delivered_in_window as f64 / measured;
    report.deliveries_per_sec = Some(dps);
    report.deliveries_per_sec_per_reader = (nreaders > 0).then(|| dps / nreaders as f64);
    report.peak_deliveries_per_sec = Some(s.peak_per_sec);
    report.server_rss_kib_after = common.server_pid.and_then(sys::proc_rss_kib);
    report.server_rss_kib_max = max_opt(s.rss_max, report.server_rss_kib_after);
    Ok(report)
}

/// Waits (bounded) for the writers and returns each one's sent count.
async fn join_writers(
    writers: Vec<JoinHandle<Result<u64, String>>>,
    clients: &[Client],
    report: &mut Report,
) -> Vec<u64> {
    let mut sent = Vec::with_capacity(writers.len());
    for (i, w) in writers.into_iter().enumerate() {
        let abort = w.abort_handle();
        match tokio::time::timeout(Duration::from_secs(5), w).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => report.errors.push(format!("sender {i}: {e}")),
            Ok(Err(e)) => report.errors.push(format!("sender {i}: {e}")),
            Err(_) => {
                abort.abort();
                report.errors.push(format!(
                    "sender {i}: still blocked writing 5 s after the stop"
                ));
            }
        }
        // The count of messages fully handed to the socket.
        sent.push(clients[i].shared.sent.load(Ordering::Relaxed));
    }
    sent
}

/// Sends every connection a close frame (1000) and shuts its write side,
/// giving each at most a moment (a server that stopped reading must not
/// hang the tool).
async fn say_goodbye<'a>(writers: impl Iterator<Item = &'a Writer>) {
    let mut masks = MaskGen::new(seed());
    let mut frame_buf = Vec::with_capacity(8);
    for w in writers {
        frame_buf.clear();
        frame::encode_frame(
            &mut frame_buf,
            frame::OP_CLOSE,
            &1000u16.to_be_bytes(),
            masks.next_mask(),
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            let mut g = w.lock().await;
            let _ = g.write_all(&frame_buf).await;
            let _ = g.shutdown().await;
        })
        .await;
    }
}

fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// `saturate`: senders send as fast as the server takes it (bounded window).
pub async fn saturate(common: &Common, cfg: &SaturateCfg) -> anyhow::Result<Report> {
    check_message_size(cfg.size)?;
    check_rooms(common)?;
    if cfg.senders == 0 || cfg.senders > cfg.clients {
        bail!("need 1 <= senders <= clients");
    }
    if cfg.window == 0 {
        bail!("--window must be at least 1");
    }
    let _ = sys::raise_nofile_limit();
    let targets = resolve_targets(common).await?;
    let mut report = base_report("saturate", common, cfg.clients);
    report.senders = Some(cfg.senders as u64);
    report.window = Some(cfg.window);
    report.max_lag = (cfg.max_lag > 0).then_some(cfg.max_lag);
    report.size = Some(cfg.size as u64);

    let ctx = ReaderCtx::timed(common, cfg.senders, cfg.size);
    let (epoch, run) = (ctx.epoch, ctx.acct.run);
    let (stop_readers_tx, stop_readers) = watch::channel(false);
    let mut clients = connect_clients(
        common,
        &targets,
        cfg.clients,
        cfg.senders,
        0,
        None,
        ctx,
        &stop_readers,
        &mut report,
    )
    .await?;
    let readers: Vec<Arc<Shared>> = clients.iter().map(|c| c.shared.clone()).collect();
    let reader_rooms: Vec<u32> = (0..cfg.clients).map(|i| common.room_of(i)).collect();
    report.readers = Some(readers.len() as u64);

    let (stop_senders_tx, stop_senders) = watch::channel(false);
    let measuring = Arc::new(AtomicBool::new(false));
    let sampler = Sampler::start(
        readers.clone(),
        common.server_pid,
        measuring.clone(),
        stop_readers.clone(),
    );
    let gate = Arc::new(LagGate::new(cfg.max_lag, common.room_count()));
    if cfg.max_lag > 0 {
        let by_room = readers
            .iter()
            .enumerate()
            .map(|(i, r)| (common.room_of(i), r.clone()))
            .collect();
        tokio::spawn(gate.clone().watch(by_room, stop_senders.clone()));
    }
    let writers: Vec<_> = clients
        .iter()
        .take(cfg.senders)
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(windowed_writer(
                c.writer.clone(),
                i as u32,
                run,
                epoch,
                cfg.size,
                cfg.window,
                gate.clone(),
                common.room_of(i),
                c.shared.clone(),
                stop_senders.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(cfg.warmup).await;
    let cpu = CpuMark::now(common.server_pid);
    let t0 = Instant::now();
    let r0 = sum_received(&readers);
    let s0 = sum_sent(&clients[..cfg.senders]);
    let c0 = sum_confirmed(&clients[..cfg.senders]);
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(cfg.duration).await;
    let r1 = sum_received(&readers);
    let s1 = sum_sent(&clients[..cfg.senders]);
    let c1 = sum_confirmed(&clients[..cfg.senders]);
    let measured = t0.elapsed().as_secs_f64();
    measuring.store(false, Ordering::Relaxed);
    finish_cpu(&mut report, &cpu, common.server_pid);
    let _ = stop_senders_tx.send(true);
    let sent = join_writers(writers, &clients, &mut report).await;
    let sent_total: u64 = sent.iter().sum();
    let expected = expected_deliveries(common, &sent, &reader_rooms);
    drain(&readers, expected, cfg.drain).await;
    let _ = stop_readers_tx.send(true);
    let handles: Vec<_> = clients.iter_mut().filter_map(|c| c.reader.take()).collect();
    let collected = collect(handles, &sent, true).await;
    say_goodbye(clients.iter().map(|c| &c.writer)).await;
    let s = sampler.handle.await.unwrap_or_default();

    let nreaders = readers.len() as u64;
    fill_deliveries(&mut report, &collected, sent_total, expected);
    report.measured_secs = measured;
    report.send_rate = Some((s1 - s0) as f64 / measured);
    // Payload bytes the server took in from the senders, MB = 10^6 bytes.
    report.mb_in_per_sec = Some((c1 - c0) as f64 * cfg.size as f64 / 1e6 / measured);
    let dps = (r1 - r0) as f64 / measured;
    report.deliveries_per_sec = Some(dps);
    report.deliveries_per_sec_per_reader = (nreaders > 0).then(|| dps / nreaders as f64);
    report.peak_deliveries_per_sec = Some(s.peak_per_sec);
    report.server_rss_kib_after = common.server_pid.and_then(sys::proc_rss_kib);
    report.server_rss_kib_max = max_opt(s.rss_max, report.server_rss_kib_after);
    Ok(report)
}

/// Frames the flooder writes at once: one write of a few KiB per batch.
const FLOOD_BATCH: u64 = 64;

/// Sends as fast as the socket takes it, in batches of [`FLOOD_BATCH`],
/// until `stop`, the server closes the connection (its reader saw the close
/// or a write fails), or `until`. Returns the messages written in whole
/// batches.
#[allow(clippy::too_many_arguments)]
async fn flood_writer(
    wr: Writer,
    run: u16,
    epoch: Instant,
    size: usize,
    until: tokio::time::Instant,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    let mut body = sender_body(size, run, 0);
    let mut out = Vec::with_capacity((size + 16) * FLOOD_BATCH as usize);
    let mut masks = MaskGen::new(seed());
    let mut seq = 0u64;
    while !*stop.borrow() && !shared.closed.load(Ordering::Relaxed) {
        out.clear();
        let ts = now_ns(epoch);
        for i in 0..FLOOD_BATCH {
            payload::restamp(&mut body, seq + i, ts);
            frame::encode_frame(&mut out, frame::OP_TEXT, &body, masks.next_mask());
        }
        let written = tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = tokio::time::sleep_until(until) => break,
            w = async { wr.lock().await.write_all(&out).await } => w,
        };
        if written.is_err() {
            break; // the server closed it: the flood is over
        }
        seq += FLOOD_BATCH;
        shared.sent.store(seq, Ordering::Relaxed);
    }
    seq
}

/// `flood`: one client sends as fast as it can, `readers` ordinary clients
/// read everything at `read_rate` at most. What a broadcast server with
/// per-connection limits should show: the flooder limited (or closed),
/// every reader still connected with everything the server relayed.
pub async fn flood(common: &Common, cfg: &FloodCfg) -> anyhow::Result<Report> {
    check_message_size(cfg.size)?;
    check_rooms(common)?;
    if common.room_count() > 1 {
        bail!("flood runs in one room (the URL's, or --rooms 1)");
    }
    if cfg.readers == 0 {
        bail!("need at least one reader");
    }
    if !(cfg.read_rate > 0.0 && cfg.read_rate.is_finite()) {
        bail!("--read-rate must be a positive number of messages per second");
    }
    let _ = sys::raise_nofile_limit();
    let targets = resolve_targets(common).await?;
    let mut report = base_report("flood", common, cfg.readers + 1);
    report.senders = Some(1);
    report.size = Some(cfg.size as u64);
    report.read_rate = Some(cfg.read_rate);

    let ctx = ReaderCtx {
        read_rate: Some(cfg.read_rate),
        ..ReaderCtx::timed(common, 1, cfg.size)
    };
    let (epoch, run) = (ctx.epoch, ctx.acct.run);
    let (stop_readers_tx, stop_readers) = watch::channel(false);
    // Client 0 is the flooder; 1..=readers read.
    let mut clients = connect_clients(
        common,
        &targets,
        cfg.readers + 1,
        1,
        0,
        None,
        ctx,
        &stop_readers,
        &mut report,
    )
    .await?;
    let everyone: Vec<Arc<Shared>> = clients.iter().map(|c| c.shared.clone()).collect();
    let readers = everyone[1..].to_vec();
    report.readers = Some(readers.len() as u64);

    let (stop_flood_tx, stop_flood) = watch::channel(false);
    let sampler = Sampler::start(
        readers.clone(),
        common.server_pid,
        Arc::new(AtomicBool::new(true)),
        stop_readers.clone(),
    );
    let cpu = CpuMark::now(common.server_pid);
    let t0 = Instant::now();
    let until = tokio::time::Instant::now() + cfg.duration;
    let flooder = tokio::spawn(flood_writer(
        clients[0].writer.clone(),
        run,
        epoch,
        cfg.size,
        until,
        clients[0].shared.clone(),
        stop_flood,
    ));
    let abort = flooder.abort_handle();
    let sent = match tokio::time::timeout(cfg.duration + Duration::from_secs(5), flooder).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => bail!("flooder task: {e}"),
        Err(_) => {
            abort.abort();
            report
                .errors
                .push("flooder: still blocked writing 5 s after the end".into());
            clients[0].shared.sent.load(Ordering::Relaxed)
        }
    };
    let _ = stop_flood_tx.send(true);
    let measured = t0.elapsed().as_secs_f64();
    finish_cpu(&mut report, &cpu, common.server_pid);

    // What the server relayed: the flooder's messages that reached anyone
    // (its own echoes included). Wait for every open reader to have all of
    // them (a paced reader takes relayed / read_rate seconds), once that
    // number is final: no connection has received anything for half a
    // second (longer than a paced reader's pause between two reads).
    let counts = || -> Vec<u64> {
        everyone
            .iter()
            .map(|c| c.received.load(Ordering::Relaxed))
            .collect()
    };
    let deadline = Instant::now() + cfg.drain;
    let (mut last, mut last_moved) = (counts(), Instant::now());
    loop {
        let now = counts();
        if now != last {
            (last, last_moved) = (now, Instant::now());
        }
        let relayed = last.iter().copied().max().unwrap_or(0);
        let behind = readers.iter().any(|r| {
            !r.closed.load(Ordering::Relaxed) && r.received.load(Ordering::Relaxed) < relayed
        });
        let settled = last_moved.elapsed() >= Duration::from_millis(500);
        if (!behind && settled) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_readers_tx.send(true);
    let mut handles: Vec<_> = clients.iter_mut().filter_map(|c| c.reader.take()).collect();
    let flooder_result = handles.remove(0).await;
    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(r) => results.push(r),
            Err(e) => report.errors.push(format!("reader task: {e}")),
        }
    }
    say_goodbye(clients.iter().map(|c| &c.writer)).await;
    let s = sampler.handle.await.unwrap_or_default();

    let relayed = results
        .iter()
        .map(|r| r.acct.received())
        .chain(flooder_result.as_ref().ok().map(|r| r.acct.received()))
        .max()
        .unwrap_or(0);
    match &flooder_result {
        Ok(r) => {
            report.flooder_closed = r.server_closed.map(code_key);
            if let Some(e) = &r.error {
                report.errors.push(format!("flooder: {e}"));
            }
        }
        Err(e) => report.errors.push(format!("flooder reader task: {e}")),
    }
    let mut c = Collected {
        hist: Some(latency::new_total_histogram()),
        ..Collected::default()
    };
    let mut ratios = Vec::with_capacity(results.len());
    for r in &results {
        let got = r.acct.received();
        ratios.push(if relayed == 0 {
            1.0
        } else {
            got as f64 / relayed as f64
        });
        let counts = r.acct.summary(&[0]).counts;
        c.counts += counts;
        c.foreign += r.acct.foreign;
        if let (Some(total), Some(part)) = (c.hist.as_mut(), r.acct.histogram()) {
            latency::merge_into(total, part);
        }
        if let Some(code) = r.server_closed {
            c.closed_by_server += 1;
            *c.close_codes.entry(code_key(code)).or_default() += 1;
        }
        if let Some(e) = &r.error {
            if c.errors.len() < 5 {
                c.errors.push(e.clone());
            }
        }
    }
    let expected = relayed * results.len() as u64;
    report.sent = Some(sent);
    report.send_rate = Some(sent as f64 / measured);
    report.relayed = Some(relayed);
    report.expected = Some(expected);
    report.received = Some(c.counts.unique);
    report.delivery_ratio = tracker::delivery_ratio(c.counts.unique, relayed, results.len() as u64);
    report.reader_ratio_min = ratios.iter().copied().reduce(f64::min);
    report.readers_complete = Some(ratios.iter().filter(|&&r| r >= 1.0).count() as u64);
    report.reordered = Some(c.counts.reordered);
    report.duplicates = Some(c.counts.duplicates);
    report.foreign = Some(c.foreign);
    report.latency = c.hist.as_ref().and_then(latency::summarize);
    report.closed_by_server = Some(c.closed_by_server);
    report.close_codes = c.close_codes;
    report.errors.extend(c.errors);
    report.measured_secs = measured;
    report.server_rss_kib_after = common.server_pid.and_then(sys::proc_rss_kib);
    report.server_rss_kib_max = max_opt(s.rss_max, report.server_rss_kib_after);
    Ok(report)
}

/// `idle`: open N connections, hold them, measure the server's memory.
pub async fn idle(common: &Common, cfg: &IdleCfg) -> anyhow::Result<Report> {
    let limit = sys::raise_nofile_limit().context("raising the open-files limit")?;
    if (cfg.clients as u64) + 64 > limit {
        bail!(
            "{} connections need more file descriptors than the limit of {limit} (raise the hard limit: ulimit -Hn)",
            cfg.clients
        );
    }
    check_rooms(common)?;
    let targets = resolve_targets(common).await?;
    let mut report = base_report("idle", common, cfg.clients);
    // No sender: every data message is foreign, except hubbub.v1's hello
    // and presence envelopes, which are skipped.
    let ctx = ReaderCtx {
        epoch: Instant::now(),
        acct: AccountCfg {
            protocol: common.protocol,
            run: run_tag(),
            senders: 0,
            room: 0,
            rooms: common.room_count(),
            me: None,
            size: None,
            track_latency: false,
        },
        read_buf: common.read_buf,
        max_frame: common.max_frame,
        read_rate: None,
    };
    let (stop_tx, stop) = watch::channel(false);
    let ips = source_ips_for(common, cfg.clients);
    let (streams, errors, secs) = ramp(common, &targets, cfg.clients, |i| ConnectOpts {
        source: conn::source_addr(i, ips, &targets[common.url_index(i)].addr),
        recv_buffer: None,
        room: common.room_path_of(i),
        protocol: common.protocol,
    })
    .await;
    report.connect_secs = secs;
    report.connected = streams.iter().filter(|s| s.is_some()).count() as u64;
    report.connect_failed = cfg.clients as u64 - report.connected;
    report.errors.extend(errors.into_iter().take(3));
    let mut shared = Vec::new();
    let mut handles = Vec::new();
    let mut writers = Vec::new();
    for (i, s) in streams.into_iter().enumerate() {
        let Some(s) = s else { continue };
        let (rd, wr) = s.into_split();
        let sh = Arc::new(Shared::default());
        let w = Arc::new(Mutex::new(wr));
        let ctx = ReaderCtx {
            acct: AccountCfg {
                room: common.room_of(i),
                ..ctx.acct
            },
            ..ctx
        };
        handles.push(tokio::spawn(reader_task(
            rd,
            w.clone(),
            ctx,
            sh.clone(),
            stop.clone(),
        )));
        shared.push(sh);
        writers.push(w);
    }
    let sampler = Sampler::start(
        Vec::new(),
        common.server_pid,
        Arc::new(AtomicBool::new(false)),
        stop.clone(),
    );
    let cpu = CpuMark::now(common.server_pid);
    let t0 = Instant::now();
    tokio::time::sleep(cfg.hold).await;
    report.measured_secs = t0.elapsed().as_secs_f64();
    finish_cpu(&mut report, &cpu, common.server_pid);
    report.server_rss_kib_after = common.server_pid.and_then(sys::proc_rss_kib);
    let open = shared
        .iter()
        .filter(|s| !s.closed.load(Ordering::Relaxed))
        .count() as u64;
    report.still_open = Some(open);
    let _ = stop_tx.send(true);
    let collected = collect(handles, &[], false).await;
    say_goodbye(writers.iter()).await;
    let s = sampler.handle.await.unwrap_or_default();
    report.closed_by_server = Some(collected.closed_by_server);
    report.close_codes = collected.close_codes;
    report.foreign = Some(collected.foreign);
    report.replayed = Some(collected.replayed);
    report.errors.extend(collected.errors);
    report.server_rss_kib_max = max_opt(s.rss_max, report.server_rss_kib_after);
    if let (Some(b), Some(a)) = (report.server_rss_kib_before, report.server_rss_kib_after) {
        if report.connected > 0 {
            report.rss_per_conn_bytes =
                Some((a as f64 - b as f64) * 1024.0 / report.connected as f64);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max_lag: u64, sent: u64, min_received: u64) -> LagGate {
        let g = LagGate::new(max_lag, 1);
        g.rooms[0].sent_total.store(sent, Ordering::Relaxed);
        g.rooms[0]
            .min_received
            .store(min_received, Ordering::Relaxed);
        g
    }

    #[test]
    fn lag_gate_allowance() {
        assert_eq!(gate(200, 0, 0).allowance(0), 200);
        assert_eq!(gate(200, 150, 0).allowance(0), 50);
        assert_eq!(gate(200, 250, 100).allowance(0), 50);
        assert_eq!(gate(200, 300, 100).allowance(0), 0);
        assert_eq!(gate(200, 400, 100).allowance(0), 0, "never negative");
        // No open reader left: nothing to wait for.
        assert_eq!(gate(200, 400, u64::MAX).allowance(0), 200);
        assert_eq!(gate(0, 1_000_000, 0).allowance(0), u64::MAX, "0 = no limit");
    }

    #[tokio::test]
    async fn lag_gate_tracks_the_slowest_open_reader() {
        let readers: Vec<Arc<Shared>> = (0..3).map(|_| Arc::new(Shared::default())).collect();
        readers[0].received.store(50, Ordering::Relaxed);
        readers[1].received.store(10, Ordering::Relaxed);
        readers[2].received.store(70, Ordering::Relaxed);
        let g = Arc::new(gate(100, 120, 0));
        let (tx, rx) = watch::channel(false);
        let moved = g.moved.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        let by_room = readers.iter().map(|r| (0, r.clone())).collect();
        let task = tokio::spawn(g.clone().watch(by_room, rx));
        tokio::time::timeout(Duration::from_secs(5), &mut moved)
            .await
            .unwrap();
        assert_eq!(g.rooms[0].min_received.load(Ordering::Relaxed), 10);
        // 120 sent, slowest at 10: 110 behind.
        assert_eq!(g.allowance(0), 0);
        // The slowest reader is closed by the server: it no longer holds senders back.
        readers[1].closed.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while g.rooms[0].min_received.load(Ordering::Relaxed) != 50 {
            assert!(Instant::now() < deadline, "gate did not move");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(g.allowance(0), 30);
        tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn lag_gate_is_per_room() {
        // Room 0: readers at 5 and 40; room 1: one reader at 90.
        let readers: Vec<(u32, Arc<Shared>)> = [(0, 5), (1, 90), (0, 40)]
            .into_iter()
            .map(|(room, n)| {
                let s = Arc::new(Shared::default());
                s.received.store(n, Ordering::Relaxed);
                (room, s)
            })
            .collect();
        let g = Arc::new(LagGate::new(50, 2));
        g.rooms[0].sent_total.store(50, Ordering::Relaxed);
        g.rooms[1].sent_total.store(100, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(g.clone().watch(readers, rx));
        let deadline = Instant::now() + Duration::from_secs(5);
        while g.rooms[1].min_received.load(Ordering::Relaxed) != 90
            || g.rooms[0].min_received.load(Ordering::Relaxed) != 5
        {
            assert!(Instant::now() < deadline, "gate did not move");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Room 0: 50 sent, slowest at 5 -> 5 more; room 1: 100 sent, at 90 -> 40 more.
        assert_eq!(g.allowance(0), 5);
        assert_eq!(g.allowance(1), 40);
        tx.send(true).unwrap();
        task.await.unwrap();
    }
}

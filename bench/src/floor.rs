//! The fan-out floor: the `fanout` delivery pattern with no server in it.
//!
//! Sender threads write one ready-made frame straight to each of N loopback
//! TCP sockets, R times a second, and one reader thread drains all N with
//! epoll. There is no WebSocket server, no async runtime and no per-peer
//! queue on either side, only the kernel's work for each send and receive.
//! What it reports is therefore the least any broadcast server could show
//! for the same fan-out on this machine: if the floor's p99 is above a
//! latency target, the target is out of reach here for every server, and
//! the distance between a server's figure and the floor is what the server
//! itself costs.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::frame::{self, FrameReader};
use crate::latency;
use crate::report::Report;
use crate::sys::CpuMark;

/// Bytes of the payload that carry the sequence number.
const SEQ_LEN: usize = 8;

#[derive(Debug, Clone)]
pub struct FloorCfg {
    /// Receiving sockets (N).
    pub clients: usize,
    /// Threads sharing the sends; each writes every message to its slice of
    /// the sockets.
    pub threads: usize,
    /// Fan-outs per second (every one goes to all N sockets).
    pub rate: f64,
    /// Payload bytes per message.
    pub size: usize,
    pub duration: Duration,
    /// Longest wait for deliveries after the last fan-out.
    pub drain: Duration,
}

/// One frame as a server would send it: unmasked, FIN set, binary, with
/// the sequence number in the first eight payload bytes.
pub fn server_frame(seq: u64, size: usize) -> Vec<u8> {
    let mut payload = vec![0u8; size.max(SEQ_LEN)];
    payload[..SEQ_LEN].copy_from_slice(&seq.to_le_bytes());
    let mut out = Vec::with_capacity(payload.len() + 10);
    frame::encode_server_frame(&mut out, frame::OP_BINARY, &payload);
    out
}

/// Where the sequence number sits inside a frame built by [`server_frame`].
fn seq_offset(frame: &[u8]) -> usize {
    match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    }
}

/// What the reader saw on all sockets together.
#[derive(Debug, Default)]
struct Received {
    messages: u64,
    /// Messages whose number was not the next one on their socket.
    out_of_order: u64,
    /// Frames that were not ours (never expected).
    foreign: u64,
    hist: Option<hdrhistogram::Histogram<u64>>,
    errors: Vec<String>,
}

/// Opens `n` connected loopback pairs: (sending side, receiving side).
fn pairs(n: usize) -> anyhow::Result<(Vec<TcpStream>, Vec<TcpStream>)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    let mut out = Vec::with_capacity(n);
    let mut inn = Vec::with_capacity(n);
    for i in 0..n {
        let rx = TcpStream::connect(addr).with_context(|| format!("loopback connect {i}"))?;
        let (tx, _) = listener.accept().context("loopback accept")?;
        // As a server would: no Nagle delay on the sending side.
        tx.set_nodelay(true)?;
        // A sender blocked on a socket nobody drains any more (the reader
        // failed) gives up instead of holding the run forever.
        tx.set_write_timeout(Some(Duration::from_secs(10)))?;
        rx.set_nonblocking(true)?;
        out.push(tx);
        inn.push(rx);
    }
    Ok((out, inn))
}

/// Sends message 0..`count` to every socket of `socks`, each at its due time.
fn send_all(
    socks: &mut [TcpStream],
    start: Instant,
    period: Duration,
    count: u64,
    size: usize,
) -> io::Result<()> {
    let mut frame = server_frame(0, size);
    let at = seq_offset(&frame);
    for seq in 0..count {
        let due = start + period.mul_f64(seq as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        frame[at..at + SEQ_LEN].copy_from_slice(&seq.to_le_bytes());
        for s in socks.iter_mut() {
            s.write_all(&frame)?;
        }
    }
    Ok(())
}

/// Drains every socket until all `expected` messages arrived or `deadline`.
/// Latency runs from each message's due time, so a late sender counts too.
fn receive_all(
    socks: &mut [TcpStream],
    start: Instant,
    period: Duration,
    count: u64,
    deadline: Instant,
    size: usize,
) -> anyhow::Result<Received> {
    // SAFETY: epoll_create1 takes no pointers.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error()).context("epoll_create1");
    }
    // Closes the epoll descriptor however this function returns.
    struct Epoll(i32);
    impl Drop for Epoll {
        fn drop(&mut self) {
            // SAFETY: closes a descriptor this function owns.
            unsafe { libc::close(self.0) };
        }
    }
    let ep = Epoll(ep);
    for (i, s) in socks.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: registers a socket we own, with an event struct we pass.
        if unsafe { libc::epoll_ctl(ep.0, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) } != 0 {
            return Err(io::Error::last_os_error()).context("epoll_ctl");
        }
    }
    let expected = count * socks.len() as u64;
    let mut readers: Vec<FrameReader> = (0..socks.len())
        .map(|_| FrameReader::new(512, size.max(SEQ_LEN)))
        .collect();
    let mut next_seq = vec![0u64; socks.len()];
    let mut hist = latency::new_conn_histogram();
    let mut got = Received::default();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut open = socks.len();
    while got.messages < expected && open > 0 && Instant::now() < deadline {
        // SAFETY: the kernel writes at most `events.len()` entries.
        let n = unsafe { libc::epoll_wait(ep.0, events.as_mut_ptr(), events.len() as i32, 100) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("epoll_wait");
        }
        for ev in &events[..n as usize] {
            let i = ev.u64 as usize;
            let fr = &mut readers[i];
            // Level-triggered: one read per wake-up, epoll reports the rest.
            let n = match socks[i].read(fr.spare()) {
                Ok(0) => {
                    got.errors.push(format!("socket {i} closed early"));
                    // SAFETY: removes a socket we registered above.
                    unsafe {
                        libc::epoll_ctl(
                            ep.0,
                            libc::EPOLL_CTL_DEL,
                            socks[i].as_raw_fd(),
                            std::ptr::null_mut(),
                        )
                    };
                    open -= 1;
                    continue;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e).with_context(|| format!("reading socket {i}")),
            };
            fr.filled(n);
            let now = start.elapsed();
            while let Some(f) = fr.next_frame()? {
                let Some(seq) = f
                    .payload
                    .get(..SEQ_LEN)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .filter(|&s| s < count)
                else {
                    got.foreign += 1;
                    continue;
                };
                if seq != next_seq[i] {
                    got.out_of_order += 1;
                }
                next_seq[i] = seq + 1;
                got.messages += 1;
                let due = period.mul_f64(seq as f64);
                latency::record_ns(&mut hist, now.saturating_sub(due).as_nanos() as u64);
            }
        }
    }
    let mut total = latency::new_total_histogram();
    latency::merge_into(&mut total, &hist);
    got.hist = Some(total);
    Ok(got)
}

/// Runs the floor measurement and reports it like a `fanout` run.
pub fn run(cfg: &FloorCfg) -> anyhow::Result<Report> {
    if cfg.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if !(cfg.rate.is_finite() && cfg.rate > 0.0) {
        bail!("--rate must be a positive number of fan-outs per second");
    }
    let threads = cfg.threads.clamp(1, cfg.clients);
    let count = (cfg.duration.as_secs_f64() * cfg.rate).round().max(1.0) as u64;
    let period = Duration::from_secs_f64(1.0 / cfg.rate);

    let connect_start = Instant::now();
    let (mut tx, mut rx) = pairs(cfg.clients)?;
    let connect_secs = connect_start.elapsed().as_secs_f64();

    let start = Instant::now() + Duration::from_millis(100);
    let deadline = start + period.mul_f64(count as f64) + cfg.drain;
    let per_thread = cfg.clients.div_ceil(threads);
    let (sent_ok, got, cpu, measured) = std::thread::scope(|scope| {
        let senders: Vec<_> = tx
            .chunks_mut(per_thread)
            .map(|socks| scope.spawn(move || send_all(socks, start, period, count, cfg.size)))
            .collect();
        let reader = scope.spawn(|| receive_all(&mut rx, start, period, count, deadline, cfg.size));
        if let Some(wait) = start.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let mark = CpuMark::now(None);
        let mut sent_ok: anyhow::Result<()> = Ok(());
        for s in senders {
            match s.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => sent_ok = Err(e).context("sending"),
                Err(_) => sent_ok = Err(anyhow::anyhow!("a sender thread panicked")),
            }
        }
        // `count` fan-outs stand for `count` periods of sending, though the
        // last one is due a period before that ends.
        let measured = start
            .elapsed()
            .max(period.mul_f64(count as f64))
            .as_secs_f64();
        let cpu = mark.since(None);
        let got = reader
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the reader thread panicked")));
        (sent_ok, got, cpu, measured)
    });
    sent_ok?;
    let got = got?;

    let expected = count * cfg.clients as u64;
    let mut report = Report {
        mode: "floor".into(),
        url: "loopback, no server".into(),
        clients: cfg.clients as u64,
        connected: cfg.clients as u64,
        connect_secs,
        readers: Some(cfg.clients as u64),
        size: Some(cfg.size.max(SEQ_LEN) as u64),
        measured_secs: measured,
        sent: Some(count),
        send_rate: Some(count as f64 / measured.max(1e-9)),
        expected: Some(expected),
        received: Some(got.messages),
        delivery_ratio: Some(got.messages as f64 / expected as f64),
        deliveries_per_sec: Some(got.messages as f64 / measured.max(1e-9)),
        deliveries_per_sec_per_reader: Some(
            got.messages as f64 / measured.max(1e-9) / cfg.clients as f64,
        ),
        lost: Some(expected - got.messages.min(expected)),
        reordered: Some(got.out_of_order),
        foreign: Some(got.foreign),
        latency: got.hist.as_ref().and_then(latency::summarize),
        tool_cpu_pct: cpu.tool_pct,
        // The senders plus the reader.
        tool_threads: threads as u64 + 1,
        machine_cpu_pct: cpu.machine_pct,
        other_cpu_pct: cpu.other_pct,
        errors: got.errors.into_iter().take(5).collect(),
        ..Report::default()
    };
    report.senders = Some(threads as u64);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_number_where_the_reader_looks() {
        for size in [8, 64, 125, 126, 4096, 70_000] {
            let f = server_frame(0xdead_beef_0042, size);
            let mut r = FrameReader::new(64, 1 << 20);
            let mut fed = 0;
            let frame = loop {
                let spare = r.spare();
                let n = spare.len().min(f.len() - fed);
                spare[..n].copy_from_slice(&f[fed..fed + n]);
                r.filled(n);
                fed += n;
                if let Some(frame) = r.next_frame().expect("valid frame") {
                    break (frame.opcode, frame.fin, frame.payload.to_vec());
                }
            };
            assert_eq!(frame.0, frame::OP_BINARY);
            assert!(frame.1, "FIN set");
            assert_eq!(frame.2.len(), size);
            assert_eq!(frame.2[..8], 0xdead_beef_0042u64.to_le_bytes());
            let at = seq_offset(&f);
            assert_eq!(
                f[at..at + 8],
                0xdead_beef_0042u64.to_le_bytes(),
                "size {size}"
            );
        }
    }

    #[test]
    fn delivers_every_message_to_every_socket() {
        let cfg = FloorCfg {
            clients: 20,
            threads: 2,
            rate: 100.0,
            size: 64,
            duration: Duration::from_millis(300),
            drain: Duration::from_secs(5),
        };
        let r = run(&cfg).expect("floor run");
        assert_eq!(r.sent, Some(30));
        assert_eq!(r.expected, Some(600));
        assert_eq!(r.received, Some(600));
        assert_eq!(r.lost, Some(0));
        assert_eq!(r.reordered, Some(0));
        assert_eq!(r.foreign, Some(0));
        let lat = r.latency.expect("latency recorded");
        assert_eq!(lat.count, 600);
        assert!(lat.p50_ms <= lat.p99_ms && lat.p99_ms <= lat.max_ms);
        assert_eq!(r.mode, "floor");
    }

    #[test]
    fn refuses_nonsense() {
        let mut cfg = FloorCfg {
            clients: 0,
            threads: 1,
            rate: 10.0,
            size: 64,
            duration: Duration::from_millis(10),
            drain: Duration::from_millis(10),
        };
        assert!(run(&cfg).is_err());
        cfg.clients = 1;
        cfg.rate = 0.0;
        assert!(run(&cfg).is_err());
    }
}

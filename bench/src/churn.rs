//! `rooms`: creates many rooms and leaves them to expire, and reports the
//! server's RSS before, at the peak and after they are gone. A room costs
//! only while it exists; this checks that memory comes back when rooms end.
//!
//! Each room is one connection to `/rooms/churn<r>-<i>` (round r) that
//! sends one message, reads it back (so the room has history) and closes.
//! The server should run with a short `history_ttl`, so the rooms end
//! within `--settle`.
//!
//! "Before" is taken after a warm-up: rooms (by default one) created and
//! left to expire first. A server that has just started has not yet read in from
//! disk the code that serves a connection and a room, nor set up each
//! worker thread's allocator arena and buffers; the first room pays that
//! once, as much as the ten-thousandth, and it is never given back. Both the
//! cold figure and the split of RSS into anonymous memory and file-backed
//! pages (the program's code) are printed, so the warm-up hides nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::sys;

pub struct ChurnCfg {
    /// The server's WebSocket base URL, such as `ws://127.0.0.1:8081/`.
    pub url: String,
    pub rooms: usize,
    /// Rooms created and left to expire before "before" is taken.
    pub warmup: usize,
    /// Times the `rooms` are created and left to expire.
    pub rounds: usize,
    pub concurrency: usize,
    /// How long to wait for the rooms to expire, sampling RSS each second.
    pub settle: Duration,
    pub server_pid: u32,
}

/// The server's resident memory at one moment, KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rss {
    pub total: u64,
    /// Anonymous memory: the heap, stacks.
    pub anon: u64,
    /// File-backed pages: mostly the program's code.
    pub file: u64,
}

/// One round: the rooms created and left to expire.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    pub before: Rss,
    pub peak: u64,
    pub after: Rss,
    pub created_in: Duration,
}

impl Round {
    /// How far RSS after the rooms ended is from where it started, in percent.
    pub fn after_vs_before(&self) -> f64 {
        (self.after.total as f64 - self.before.total as f64) * 100.0 / self.before.total as f64
    }
}

pub struct ChurnReport {
    /// Before anything, on the server as it started.
    pub cold: Rss,
    /// After the warm-up's rooms ended (the same as `cold` without one).
    pub warm: Rss,
    pub rounds: Vec<Round>,
}

async fn one_room(base: &str, addr: &str, name: &str) -> anyhow::Result<()> {
    let url = format!("{base}rooms/{name}");
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut ws, _) = tokio_tungstenite::client_async(&url, tcp)
        .await
        .with_context(|| format!("WebSocket handshake with {url}"))?;
    ws.send(Message::text(format!("room {name}"))).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(_))) => break,
            Some(Ok(_)) => continue,
            other => bail!("room {name}: no echo: {other:?}"),
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

pub async fn run(cfg: &ChurnCfg) -> anyhow::Result<ChurnReport> {
    let base = if cfg.url.ends_with('/') {
        cfg.url.clone()
    } else {
        format!("{}/", cfg.url)
    };
    let addr = base
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .filter(|a| !a.is_empty())
        .with_context(|| format!("{} is not a ws://host:port/ URL", cfg.url))?
        .to_string();
    let cold = rss(cfg)?;
    let warm = if cfg.warmup > 0 {
        round(cfg, &base, &addr, "warmup", cfg.warmup).await?.after
    } else {
        cold
    };
    let mut rounds = Vec::with_capacity(cfg.rounds);
    for r in 0..cfg.rounds {
        let prefix = format!("churn{r}");
        rounds.push(round(cfg, &base, &addr, &prefix, cfg.rooms).await?);
    }
    Ok(ChurnReport { cold, warm, rounds })
}

fn rss(cfg: &ChurnCfg) -> anyhow::Result<Rss> {
    let (total, anon, file) =
        sys::proc_rss_split_kib(cfg.server_pid).context("reading the server's RSS")?;
    Ok(Rss { total, anon, file })
}

/// Creates `rooms` rooms named `<prefix>-<i>` and waits `settle` for them to
/// end, sampling RSS each second.
async fn round(
    cfg: &ChurnCfg,
    base: &str,
    addr: &str,
    prefix: &str,
    rooms: usize,
) -> anyhow::Result<Round> {
    let before = rss(cfg)?;
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(rooms);
    for i in 0..rooms {
        let permit = permits.clone().acquire_owned().await?;
        let (base, addr, name) = (base.to_string(), addr.to_string(), format!("{prefix}-{i}"));
        tasks.push(tokio::spawn(async move {
            let result = one_room(&base, &addr, &name).await;
            drop(permit);
            result
        }));
    }
    for task in tasks {
        task.await??;
    }
    let created_in = started.elapsed();
    let mut peak = rss(cfg)?.total;
    let until = Instant::now() + cfg.settle;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(rss(cfg)?.total);
    }
    Ok(Round {
        before,
        peak,
        after: rss(cfg)?,
        created_in,
    })
}

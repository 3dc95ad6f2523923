//! `rooms`: creates many rooms and leaves them to expire, and reports the
//! server's RSS before, at the peak and after they are gone. A room costs
//! only while it exists; this checks that memory comes back when rooms end.
//!
//! Each room is one connection to `/rooms/churn-<i>` that sends one message,
//! reads it back (so the room has history) and closes. The server should
//! run with a short `history_ttl`, so the rooms end within `--settle`.

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
    pub concurrency: usize,
    /// How long to wait for the rooms to expire, sampling RSS each second.
    pub settle: Duration,
    pub server_pid: u32,
}

/// RSS figures in KiB.
#[derive(Debug, Clone, Copy)]
pub struct ChurnReport {
    pub before: u64,
    pub peak: u64,
    pub after: u64,
    pub created_in: Duration,
}

impl ChurnReport {
    /// How far RSS after the rooms ended is from where it started, in percent.
    pub fn after_vs_before(&self) -> f64 {
        (self.after as f64 - self.before as f64) * 100.0 / self.before as f64
    }
}

async fn one_room(base: &str, addr: &str, i: usize) -> anyhow::Result<()> {
    let url = format!("{base}rooms/churn-{i}");
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut ws, _) = tokio_tungstenite::client_async(&url, tcp)
        .await
        .with_context(|| format!("WebSocket handshake with {url}"))?;
    ws.send(Message::text(format!("room {i}"))).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(_))) => break,
            Some(Ok(_)) => continue,
            other => bail!("room {i}: no echo: {other:?}"),
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

pub async fn run(cfg: &ChurnCfg) -> anyhow::Result<ChurnReport> {
    let rss = || sys::proc_rss_kib(cfg.server_pid).context("reading the server's RSS");
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
    let before = rss()?;
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(cfg.rooms);
    for i in 0..cfg.rooms {
        let permit = permits.clone().acquire_owned().await?;
        let (base, addr) = (base.clone(), addr.clone());
        tasks.push(tokio::spawn(async move {
            let result = one_room(&base, &addr, i).await;
            drop(permit);
            result
        }));
    }
    for task in tasks {
        task.await??;
    }
    let created_in = started.elapsed();
    let mut peak = rss()?;
    let until = Instant::now() + cfg.settle;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(rss()?);
    }
    Ok(ChurnReport {
        before,
        peak,
        after: rss()?,
        created_in,
    })
}

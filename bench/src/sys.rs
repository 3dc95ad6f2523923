//! Process figures from the OS: CPU time of this tool and of the server,
//! the server's resident memory, and the open-files limit.

use std::time::Instant;

/// Raises this process's soft RLIMIT_NOFILE to its hard limit and returns the
/// new soft limit. Idle runs hold thousands of sockets.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// CPU time (user + system) this process has used so far, in seconds.
pub fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime (clock ticks) from the text of /proc/PID/stat. The command
/// name (field 2) is in parentheses and may hold spaces or ')', so fields
/// are counted from the last ')'.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')' come field 3 (state) onwards; utime is field 14, stime 15.
    let mut it = rest.split_ascii_whitespace().skip(14 - 3);
    let utime: u64 = it.next()?.parse().ok()?;
    let stime: u64 = it.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS in KiB from the text of /proc/PID/status.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    parse_status_kib(status, "VmRSS")
}

/// The field `key` (`VmRSS`, `RssAnon`, `RssFile`), in KiB, from the text
/// of /proc/PID/status.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| {
        l.strip_prefix(key)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let mut it = line[key.len() + 1..].split_ascii_whitespace();
    let v: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => Some(v),
        _ => None,
    }
}

/// CPU seconds used so far by process `pid` (all its threads).
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(parse_stat_cpu_ticks(&s)? as f64 / clock_ticks_per_sec())
}

/// Resident set size of process `pid`, KiB.
pub fn proc_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_rss_kib(&s)
}

/// Resident memory of process `pid`, KiB: (RSS, of which anonymous, of
/// which file-backed). File-backed pages are mostly the program's code,
/// read in from disk the first time each part of it runs.
pub fn proc_rss_split_kib(pid: u32) -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((
        parse_status_kib(&s, "VmRSS")?,
        parse_status_kib(&s, "RssAnon")?,
        parse_status_kib(&s, "RssFile")?,
    ))
}

/// Busy time of the whole machine, in clock ticks, from the text of
/// /proc/stat: every column of the "cpu" line except idle and iowait
/// (guest time is already inside user and nice, so it is not added again).
pub fn parse_proc_stat_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let busy: u64 = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    Some(busy)
}

/// CPU seconds the whole machine has been busy (all cores).
pub fn machine_busy_secs() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    Some(parse_proc_stat_busy_ticks(&s)? as f64 / clock_ticks_per_sec())
}

/// A CPU-time reading of this tool, (optionally) the server, and the whole
/// machine, to be compared with a later one.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    at: Instant,
    tool: f64,
    server: Option<f64>,
    machine: Option<f64>,
}

/// CPU use over an interval, in percent of one core (200% = both cores).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuUse {
    pub tool_pct: f64,
    pub server_pct: Option<f64>,
    /// CPU seconds (user + system) the server used over the interval.
    pub server_secs: Option<f64>,
    pub machine_pct: Option<f64>,
    /// machine - tool - server (never below 0): other processes, noise.
    pub other_pct: Option<f64>,
}

impl CpuMark {
    pub fn now(server_pid: Option<u32>) -> Self {
        CpuMark {
            at: Instant::now(),
            tool: self_cpu_secs(),
            server: server_pid.and_then(proc_cpu_secs),
            machine: machine_busy_secs(),
        }
    }

    pub fn since(&self, server_pid: Option<u32>) -> CpuUse {
        let end = CpuMark::now(server_pid);
        let wall = end.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let secs = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some((b - a).max(0.0)),
            _ => None,
        };
        let pct = |s: Option<f64>| s.map(|s| s / wall * 100.0);
        let tool_pct = (end.tool - self.tool) / wall * 100.0;
        let server_secs = secs(self.server, end.server);
        let server_pct = pct(server_secs);
        let machine_pct = pct(secs(self.machine, end.machine));
        CpuUse {
            tool_pct,
            server_pct,
            server_secs,
            machine_pct,
            other_pct: machine_pct.map(|m| (m - tool_pct - server_pct.unwrap_or(0.0)).max(0.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let stat = "4242 (my) weird (srv)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 157 43 0 0 20 0 3 0 99 123456 789 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(200));
        let plain = "1 (node) R 0 1 1 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat_cpu_ticks(plain), Some(11));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_machine_busy_time() {
        let stat = "cpu  100 5 50 1000 20 3 2 1 7 0\ncpu0 50 2 25 500 10 1 1 0 0 0\nintr 1 2 3\n";
        // user+nice+system+irq+softirq+steal, not idle/iowait, not guest again.
        assert_eq!(
            parse_proc_stat_busy_ticks(stat),
            Some(100 + 5 + 50 + 3 + 2 + 1)
        );
        assert_eq!(parse_proc_stat_busy_ticks("intr 1\n"), None);
        assert!(machine_busy_secs().is_some());
    }

    #[test]
    fn parses_vmrss() {
        let status = "Name:\thubbub\nVmPeak:\t  20000 kB\nVmRSS:\t    5120 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss_kib(status), Some(5120));
        assert_eq!(parse_status_rss_kib("Name:\tx\n"), None);
        let status = "VmRSS:\t  7000 kB\nRssAnon:\t  900 kB\nRssFile:\t  6000 kB\n";
        assert_eq!(parse_status_kib(status, "RssAnon"), Some(900));
        assert_eq!(parse_status_kib(status, "RssFile"), Some(6000));
        assert_eq!(parse_status_kib(status, "Rss"), None);
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(proc_rss_kib(pid).unwrap() > 0);
        assert!(proc_cpu_secs(pid).is_some());
        let m = CpuMark::now(Some(pid));
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        let u = m.since(Some(pid));
        assert!(u.tool_pct >= 0.0 && u.server_pct.is_some());
        // The server's seconds and its % describe the same interval.
        let secs = u.server_secs.unwrap();
        assert!(secs >= 0.0);
        assert!(u.server_pct.unwrap() >= 0.0);
        assert!(raise_nofile_limit().unwrap() > 0);
    }
}

//! Latency histograms (microseconds) and their percentile summary.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms hold exactly: 60 s. Larger values are
/// clamped to it (and the true maximum is still kept by hdrhistogram's max).
pub const HIGH_US: u64 = 60_000_000;
/// Significant figures kept (0.1% value resolution).
pub const SIGFIG: u8 = 3;

/// A per-connection histogram: 32-bit counts keep it around 70 KB, so a
/// thousand connections can each own one without sharing or locking.
pub fn new_conn_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, HIGH_US, SIGFIG).expect("valid histogram bounds")
}

pub fn new_total_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGH_US, SIGFIG).expect("valid histogram bounds")
}

/// Records a latency given in nanoseconds (sub-microsecond rounds up to 1 µs).
#[inline]
pub fn record_ns(h: &mut Histogram<u32>, ns: u64) {
    h.saturating_record((ns / 1000).clamp(1, HIGH_US));
}

/// Adds a per-connection histogram into the run total.
pub fn merge_into(total: &mut Histogram<u64>, part: &Histogram<u32>) {
    for v in part.iter_recorded() {
        total.saturating_record_n(v.value_iterated_to(), u64::from(v.count_at_value()));
    }
}

/// Percentiles of one run, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// `None` for an empty histogram (no sample, no percentile).
pub fn summarize(h: &Histogram<u64>) -> Option<LatencySummary> {
    if h.is_empty() {
        return None;
    }
    Some(LatencySummary {
        count: h.len(),
        mean_ms: h.mean() / 1000.0,
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= b * 0.002 + 0.001
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        // 1 ms .. 10 ms in 1 µs steps, spread over several connection
        // histograms and merged, as a run does.
        let mut parts: Vec<_> = (0..3).map(|_| new_conn_histogram()).collect();
        for (i, us) in (1000u64..=10_000).enumerate() {
            record_ns(&mut parts[i % 3], us * 1000);
        }
        let mut total = new_total_histogram();
        for p in &parts {
            merge_into(&mut total, p);
        }
        let s = summarize(&total).unwrap();
        assert_eq!(s.count, 9001);
        assert!(close(s.p50_ms, 5.5), "p50 {}", s.p50_ms);
        assert!(close(s.p90_ms, 9.1), "p90 {}", s.p90_ms);
        assert!(close(s.p99_ms, 9.91), "p99 {}", s.p99_ms);
        assert!(close(s.p999_ms, 9.991), "p99.9 {}", s.p999_ms);
        assert!(close(s.max_ms, 10.0), "max {}", s.max_ms);
        assert!(close(s.mean_ms, 5.5), "mean {}", s.mean_ms);
    }

    #[test]
    fn tail_is_not_hidden_by_the_bulk() {
        let mut h = new_conn_histogram();
        for _ in 0..9990 {
            record_ns(&mut h, 100_000); // 0.1 ms
        }
        for _ in 0..10 {
            record_ns(&mut h, 50_000_000); // 50 ms: the slowest 0.1%
        }
        let mut total = new_total_histogram();
        merge_into(&mut total, &h);
        let s = summarize(&total).unwrap();
        assert!(close(s.p50_ms, 0.1));
        assert!(close(s.p99_ms, 0.1));
        assert!(
            close(s.p999_ms, 0.1),
            "p99.9 is the 9990th value {}",
            s.p999_ms
        );
        assert!(close(s.max_ms, 50.0));
    }

    #[test]
    fn clamps_and_empty() {
        let mut h = new_conn_histogram();
        record_ns(&mut h, 0);
        record_ns(&mut h, 500);
        record_ns(&mut h, u64::MAX);
        assert_eq!(h.len(), 3);
        assert_eq!(h.min(), 1);
        assert!(h.max() >= HIGH_US);
        assert!(summarize(&new_total_histogram()).is_none());
    }
}

//! Measurement helpers: a mergeable latency histogram and `/proc` sampling of a process's
//! resident memory and CPU time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two (2^SUB_BITS); 128 keeps the relative error below 0.8 %.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
const HALF: u64 = SUB / 2;

/// Log-linear histogram of microsecond values. Exact below 128 µs, ≤ 0.8 % error above.
/// Mergeable across worker processes (serialised sparsely).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Histogram {
    /// (bucket, count), only non-zero buckets; kept sorted by bucket.
    buckets: BTreeMap<u32, u64>,
    count: u64,
    sum: u64,
    max: u64,
}

fn bucket_of(v: u64) -> u32 {
    if v < SUB {
        return v as u32;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - (SUB_BITS - 1);
    (u64::from(shift) * HALF + (v >> shift)) as u32
}

/// Representative value (middle) of a bucket.
fn value_of(b: u32) -> u64 {
    let b = u64::from(b);
    if b < SUB {
        return b;
    }
    let shift = b / HALF - 1;
    let mant = b - shift * HALF;
    (mant << shift) + ((1u64 << shift) >> 1)
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        *self.buckets.entry(bucket_of(v)).or_default() += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(v);
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (b, c) in &other.buckets {
            *self.buckets.entry(*b).or_default() += c;
        }
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The cumulative distribution: (value, share of all recorded values ≤ value) per non-empty
    /// bucket, values ascending (the last value is the exact maximum).
    pub fn cdf(&self) -> Vec<(u64, f64)> {
        let mut seen = 0;
        let mut out: Vec<(u64, f64)> = self
            .buckets
            .iter()
            .map(|(b, c)| {
                seen += c;
                (value_of(*b).min(self.max), seen as f64 / self.count as f64)
            })
            .collect();
        if let Some(last) = out.last_mut() {
            last.0 = self.max;
        }
        out
    }

    /// Value at quantile `q` (0..=1): the smallest recorded bucket whose cumulative count reaches
    /// `ceil(q * count)`. Never larger than the exact maximum; the top rank is the exact maximum.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        if rank == self.count {
            return self.max;
        }
        let mut seen = 0;
        for (b, c) in &self.buckets {
            seen += c;
            if seen >= rank {
                return value_of(*b).min(self.max);
            }
        }
        self.max
    }
}

/// One reading of a process's memory and CPU counters.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ProcSample {
    /// `VmRSS` from `/proc/PID/status`, KiB.
    pub rss_kib: u64,
    /// utime + stime from `/proc/PID/stat`, milliseconds.
    pub cpu_ms: u64,
}

impl ProcSample {
    /// The server part of a once-a-second progress line: CPU share since the sample with
    /// `prev_cpu_ms`, `dt` seconds ago, and the RSS now.
    pub fn progress(&self, prev_cpu_ms: u64, dt: f64) -> String {
        format!(
            "  | server cpu {:.0}% rss {:.1} MiB",
            self.cpu_ms.saturating_sub(prev_cpu_ms) as f64 / 10.0 / dt,
            self.rss_kib as f64 / 1024.0
        )
    }
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// utime + stime of `/proc/<pid>/stat` (`pid` may be `"self"`), in milliseconds.
pub fn cpu_ms(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields after ')' start at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 1000 / clock_ticks())
}

/// `VmRSS` of `/proc/<pid>/status`, in KiB.
pub fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn sample(pid: u32) -> Option<ProcSample> {
    let p = pid.to_string();
    Some(ProcSample {
        rss_kib: rss_kib(&p)?,
        cpu_ms: cpu_ms(&p)?,
    })
}

/// `{p50, p99, max}` of a histogram: the compact latency summary of the `chat` and `turn` reports.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl From<&Histogram> for Percentiles {
    fn from(h: &Histogram) -> Self {
        Percentiles {
            p50: h.quantile(0.5),
            p99: h.quantile(0.99),
            max: h.max(),
        }
    }
}

/// The server under test (`--server-pid`) over one measured window: CPU time since the window
/// started and the peak RSS seen by [`ServerMeter::sample`].
#[derive(Debug, Default)]
pub struct ServerMeter {
    pid: Option<u32>,
    start_cpu_ms: u64,
    pub peak_rss_kib: u64,
}

impl ServerMeter {
    /// Fails when a PID is given but its `/proc` entries cannot be read (wrong PID, other user).
    pub fn new(pid: Option<u32>) -> anyhow::Result<ServerMeter> {
        let mut m = ServerMeter {
            pid,
            ..ServerMeter::default()
        };
        if let Some(p) = pid {
            let s = sample(p)
                .ok_or_else(|| anyhow::anyhow!("cannot read /proc/{p}/status and stat"))?;
            m.start_cpu_ms = s.cpu_ms;
            m.peak_rss_kib = s.rss_kib;
        }
        Ok(m)
    }

    /// Starts a new window: CPU is counted from now, the peak RSS restarts.
    pub fn restart(&mut self) {
        self.peak_rss_kib = 0;
        if let Some(s) = self.sample() {
            self.start_cpu_ms = s.cpu_ms;
        }
    }

    pub fn sample(&mut self) -> Option<ProcSample> {
        let s = sample(self.pid?)?;
        self.peak_rss_kib = self.peak_rss_kib.max(s.rss_kib);
        Some(s)
    }

    /// Server CPU seconds since the window started (`None` without `--server-pid`).
    pub fn cpu_secs(&mut self) -> Option<f64> {
        let s = self.sample()?;
        Some(s.cpu_ms.saturating_sub(self.start_cpu_ms) as f64 / 1000.0)
    }

    /// Peak RSS of the window (`None` without `--server-pid`).
    pub fn rss_kib(&self) -> Option<u64> {
        self.pid.map(|_| self.peak_rss_kib)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_accurate() {
        let mut last = 0;
        for v in (0..200_000u64).chain([1 << 20, 123_456_789]) {
            let b = bucket_of(v);
            assert!(b >= last, "{v}");
            last = b;
            let r = value_of(b);
            let err = (r as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err <= 0.008, "{v} -> {r}");
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 10);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.01, "{p50}");
        let p99 = h.quantile(0.99) as f64;
        assert!((p99 - 9900.0).abs() / 9900.0 < 0.01, "{p99}");
        assert_eq!(h.max(), 10_000);
        let mut g = Histogram::default();
        g.record(50_000);
        h.merge(&g);
        assert_eq!(h.count(), 1001);
        assert_eq!(h.quantile(1.0), 50_000);
        let cdf = h.cdf();
        assert_eq!(cdf.last(), Some(&(50_000, 1.0)));
        assert!(cdf.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
    }

    #[test]
    fn self_sampling() {
        assert!(rss_kib("self").unwrap() > 0);
        assert!(cpu_ms("self").is_some());
    }
}

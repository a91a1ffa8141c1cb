//! Process resource figures: CPU time (getrusage) and resident memory (/proc/self/status).

use std::time::Duration;

/// User + system CPU time this process has used so far.
#[allow(unsafe_code)]
pub(crate) fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Current resident set size in MiB (0 where /proc is unavailable).
pub(crate) fn rss_mib() -> f64 {
    status_kb("VmRSS:").map_or(0.0, |kb| kb as f64 / 1024.0)
}

/// Peak resident set size since the last [`reset_peak_rss`], in MiB.
pub(crate) fn peak_rss_mib() -> f64 {
    status_kb("VmHWM:").map_or(0.0, |kb| kb as f64 / 1024.0)
}

/// Resets the kernel's peak-RSS mark so the next [`peak_rss_mib`] covers one scenario only.
pub(crate) fn reset_peak_rss() {
    // "5" resets VmHWM (Linux 4.0+); failing only makes the peak cover a longer span.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

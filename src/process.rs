//! The process's own figures, read from /proc/self for the standard `process_*` metrics:
//! resident memory, CPU time, file descriptors and start time.
//!
//! Plain file reads, no unsafe and no state; it knows nothing of the rest of the server.

use std::fs;
use std::io;

/// Clock ticks per second in /proc's times. The kernel reports them in USER_HZ, which is
/// fixed at 100 on every architecture Linux supports today, whatever the kernel's own HZ.
const USER_HZ: f64 = 100.0;

/// What `process_*` in `/metrics` shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessSample {
    pub resident_memory_bytes: u64,
    /// User and system CPU time of all the process's threads.
    pub cpu_seconds: f64,
    pub open_fds: u64,
    /// The soft limit on open files (RLIMIT_NOFILE); `u64::MAX` when unlimited.
    pub max_fds: u64,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

/// Reads the figures of the calling process.
pub fn sample() -> io::Result<ProcessSample> {
    let stat = fs::read_to_string("/proc/self/stat")?;
    let times = parse_stat(&stat).ok_or_else(|| invalid("/proc/self/stat"))?;
    let boot_time_s =
        parse_boot_time(&fs::read_to_string("/proc/stat")?).ok_or_else(|| invalid("/proc/stat"))?;
    let resident_memory_bytes = parse_vm_rss(&fs::read_to_string("/proc/self/status")?)
        .ok_or_else(|| invalid("/proc/self/status"))?;
    let max_fds = parse_max_open_files(&fs::read_to_string("/proc/self/limits")?)
        .ok_or_else(|| invalid("/proc/self/limits"))?;
    let open_fds = fs::read_dir("/proc/self/fd")?.count() as u64;
    Ok(ProcessSample {
        resident_memory_bytes,
        cpu_seconds: (times.utime_ticks + times.stime_ticks) as f64 / USER_HZ,
        open_fds,
        max_fds,
        start_time_seconds: boot_time_s as f64 + times.start_ticks as f64 / USER_HZ,
    })
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse {what}"))
}

#[derive(Debug, PartialEq, Eq)]
struct StatTimes {
    utime_ticks: u64,
    stime_ticks: u64,
    /// Since boot.
    start_ticks: u64,
}

/// The times in /proc/self/stat. The command name in field 2 may hold spaces and
/// parentheses, so the fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<StatTimes> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state): utime is field 14, stime 15, starttime 22.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |number: usize| fields.get(number - 3)?.parse().ok();
    Some(StatTimes {
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        start_ticks: field(22)?,
    })
}

fn parse_boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn parse_max_open_files(limits: &str) -> Option<u64> {
    let soft = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?;
    match soft {
        "unlimited" => Some(u64::MAX),
        number => number.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "4242 (a (strange) name) S 1 4242 4242 0 -1 4194560 1024 0 0 0 \
                    250 75 0 0 20 0 9 0 123456 104857600 2048 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(StatTimes {
                utime_ticks: 250,
                stime_ticks: 75,
                start_ticks: 123456,
            })
        );
        assert_eq!(parse_stat("4242 (truncated"), None);
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1764580000\nprocesses 9\n"),
            Some(1_764_580_000)
        );
        assert_eq!(
            parse_vm_rss("Name:\tipevents\nVmRSS:\t    6144 kB\n"),
            Some(6144 * 1024)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            65536                524288               files\n";
        assert_eq!(parse_max_open_files(limits), Some(65536));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_max_open_files(unlimited), Some(u64::MAX));
    }

    #[test]
    fn samples_this_process() {
        let sample = sample().expect("/proc/self is readable");
        assert!(sample.resident_memory_bytes > 0);
        assert!(sample.open_fds >= 3, "{sample:?}");
        assert!(sample.max_fds >= sample.open_fds, "{sample:?}");
        assert!(sample.start_time_seconds > 1e9, "{sample:?}");
    }
}

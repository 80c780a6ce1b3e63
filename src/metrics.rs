//! Renders what the server counts: the Prometheus text of `/metrics` and the report printed
//! at shutdown, from plain values in a [`Stats`] that this module owns. The only thing it
//! reads itself is the workers' counters ([`Totals::of`], [`WorkerSample::of`]: relaxed
//! atomics and SO_MEMINFO, through the cluster); it knows nothing of the HTTP handler, the
//! gate or the snapshot thread that the other values come from, and it never asks a worker to
//! stop for it.
//!
//! Another part of the server (a store backend, say) adds families of its own through a
//! [`Source`], which renders them with [`single`] and [`labelled`] when `/metrics` is asked for.

use std::fmt::Write;

use hdrhistogram::Histogram;

use crate::cluster::Cluster;
use crate::process::ProcessSample;
use crate::wire::Reject;
use crate::worker::{Counters, Latencies, WorkerStats};

const NAMESPACE: &str = "ipevents";

/// The quantiles of every latency summary and of the shutdown tables.
const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

/// The version of the compiler that built the server, for `ipevents_build_info`.
const RUSTC_VERSION: &str = env!("IPEVENTS_RUSTC_VERSION");

/// Everything `/metrics` shows, as plain values.
pub struct Stats<'a> {
    pub workers: Vec<WorkerSample>,
    pub totals: Totals,
    /// App entries held by all workers together.
    pub app_entries: usize,
    /// Distinct apps held by at least one worker: what `--max-apps` caps.
    pub apps_distinct: usize,
    /// The snapshot thread's counters, when there is a state file.
    pub snapshots: Option<SnapshotSample>,
    /// The HTTP gate's counters, when there is a gate.
    pub gate: Option<GateSample>,
    /// HTTP requests answered: (route label, status, count).
    pub requests: Vec<(&'static str, u16, u64)>,
    /// The workers' latency families, rendered by [`worker_latency_families`]; `None` when a
    /// worker did not answer in time.
    pub worker_latencies: Option<&'a str>,
    pub query_ns: &'a Histogram<u64>,
    pub reset_ns: &'a Histogram<u64>,
    /// The process's own figures from /proc; `None` when /proc cannot be read.
    pub process: Option<ProcessSample>,
    /// Families rendered by [`Source`]s, appended as they are.
    pub extra: Vec<String>,
    /// Events dropped because the unwritten deltas were at `--max-pending-pairs` (cluster
    /// mode; 0 standalone), a cause of `ipevents_events_dropped_total`.
    pub store_backlog_drops: u64,
}

/// What another part of the server adds to the shutdown report: lines after the totals, and
/// rows of the latency table.
#[derive(Default)]
pub struct ReportExtra {
    pub lines: Vec<String>,
    pub latencies: Vec<(&'static str, Histogram<u64>)>,
}

/// One worker's counters and socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerSample {
    pub id: usize,
    pub received: u64,
    pub ingested: u64,
    /// `None` when the kernel does not report drops (SO_MEMINFO).
    pub kernel_drops: Option<u64>,
    pub recv_errors: u64,
    /// Datagrams the worker read from a busy sibling's socket (work stealing).
    pub stolen: u64,
    /// Events of those it handed back to the socket's worker (key steering).
    pub handed_back: u64,
    /// The receive buffer the kernel granted the worker's socket; `None` when it cannot be
    /// read.
    pub rcvbuf_bytes: Option<usize>,
}

/// The snapshot thread's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotSample {
    pub taken: u64,
    pub failed: u64,
    pub last_apps: u64,
    pub last_duration_ns: u64,
    /// When the last successful snapshot was written, in seconds since the Unix epoch; 0
    /// before the first.
    pub last_success_unix_s: u64,
}

/// The HTTP gate's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GateSample {
    pub open_connections: usize,
    pub accepted: u64,
    /// Refusals by reason: (label, count), every reason listed.
    pub refused: Vec<(&'static str, u64)>,
}

/// Something with metric families of its own to add to `/metrics`.
pub trait Source: Send {
    /// Appends complete families (HELP, TYPE and samples) to `out`.
    fn render(&self, out: &mut String);
}

impl WorkerSample {
    pub fn of(cluster: &Cluster) -> Vec<WorkerSample> {
        cluster
            .workers()
            .iter()
            .map(|worker| {
                let c = &worker.counters;
                WorkerSample {
                    id: worker.id,
                    received: worker.received_from_socket(),
                    ingested: Counters::get(&c.events_ingested),
                    kernel_drops: worker.kernel_drops(),
                    recv_errors: Counters::get(&c.recv_errors),
                    stolen: Counters::get(&c.datagrams_stolen),
                    handed_back: Counters::get(&c.events_handed_back),
                    rcvbuf_bytes: worker.rcvbuf_bytes(),
                }
            })
            .collect()
    }
}

/// Totals over all workers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub received: u64,
    pub ingested: u64,
    pub invalid: [u64; Reject::ALL.len()],
    pub app_cap_drops: u64,
    pub ip_cap_drops: u64,
    pub kernel_drops: u64,
    pub recv_errors: u64,
}

impl Totals {
    pub fn of(cluster: &Cluster) -> Totals {
        let mut totals = Totals::default();
        for worker in cluster.workers() {
            let c = &worker.counters;
            totals.received += worker.received_from_socket();
            totals.ingested += Counters::get(&c.events_ingested);
            for (total, counter) in totals.invalid.iter_mut().zip(&c.invalid) {
                *total += Counters::get(counter);
            }
            totals.app_cap_drops += Counters::get(&c.app_cap_drops);
            totals.ip_cap_drops += Counters::get(&c.ip_cap_drops);
            totals.recv_errors += Counters::get(&c.recv_errors);
            totals.kernel_drops += worker.kernel_drops().unwrap_or(0);
        }
        totals
    }
}

/// The text of `GET /metrics`.
pub fn render(stats: &Stats) -> String {
    let mut out = String::with_capacity(4096);
    let labels = format!(
        "version=\"{}\",rustc=\"{RUSTC_VERSION}\"",
        env!("CARGO_PKG_VERSION")
    );
    family(
        &mut out,
        "build_info",
        "gauge",
        "The server's version and the compiler that built it, as labels; the value is 1.",
    );
    let _ = writeln!(out, "{NAMESPACE}_build_info{{{labels}}} 1");
    let per_worker = |out: &mut String,
                      name: &str,
                      kind: &str,
                      help: &str,
                      value: &dyn Fn(&WorkerSample) -> Option<u64>| {
        family(out, name, kind, help);
        for worker in &stats.workers {
            if let Some(v) = value(worker) {
                let _ = writeln!(out, "{NAMESPACE}_{name}{{worker=\"{}\"}} {v}", worker.id);
            }
        }
    };
    per_worker(
        &mut out,
        "datagrams_received_total",
        "counter",
        "Datagrams read from the worker's UDP socket, by the worker or by a worker that stole \
         them.",
        &|w| Some(w.received),
    );
    per_worker(
        &mut out,
        "events_ingested_total",
        "counter",
        "Valid events counted (UDP and POST).",
        &|w| Some(w.ingested),
    );
    per_worker(
        &mut out,
        "kernel_drops_total",
        "counter",
        "Datagrams the kernel dropped because the socket's receive queue was full (SO_MEMINFO).",
        &|w| w.kernel_drops,
    );
    per_worker(
        &mut out,
        "recv_errors_total",
        "counter",
        "Failed recvmmsg calls.",
        &|w| Some(w.recv_errors),
    );
    per_worker(
        &mut out,
        "datagrams_stolen_total",
        "counter",
        "Datagrams the worker read from a busy worker's socket (work stealing).",
        &|w| Some(w.stolen),
    );
    per_worker(
        &mut out,
        "events_handed_back_total",
        "counter",
        "Stolen events the worker handed back to the socket's worker, whose app it did not \
         hold (app and adaptive steering).",
        &|w| Some(w.handed_back),
    );
    per_worker(
        &mut out,
        "socket_receive_buffer_bytes",
        "gauge",
        "Receive buffer the kernel granted the worker's UDP socket (--rcvbuf, capped by \
         net.core.rmem_max without CAP_NET_ADMIN).",
        &|w| w.rcvbuf_bytes.map(|bytes| bytes as u64),
    );

    let totals = &stats.totals;
    labelled(
        &mut out,
        "datagrams_invalid_total",
        "counter",
        "Datagrams dropped as invalid, by reason.",
        "reason",
        Reject::ALL.map(|r| (r.as_str(), totals.invalid[r.index()])),
    );
    labelled(
        &mut out,
        "events_dropped_total",
        "counter",
        "Valid events not counted: the server was at --max-apps, or (cluster mode) the \
         unwritten deltas were at --max-pending-pairs.",
        "cause",
        [
            ("max_apps", totals.app_cap_drops),
            ("store_backlog", stats.store_backlog_drops),
        ],
    );
    single(
        &mut out,
        "ips_not_stored_total",
        "counter",
        "Events counted whose new IP was not stored because the app was at --max-ips-per-app.",
        totals.ip_cap_drops,
    );
    single(
        &mut out,
        "apps_tracked",
        "gauge",
        "Distinct apps held by at least one worker: what --max-apps caps.",
        stats.apps_distinct,
    );
    single(
        &mut out,
        "app_entries",
        "gauge",
        "App entries held by the workers; an app held by k workers counts k times.",
        stats.app_entries,
    );
    single(
        &mut out,
        "workers",
        "gauge",
        "Ingest workers.",
        stats.workers.len(),
    );

    if let Some(snapshots) = &stats.snapshots {
        snapshot_metrics(&mut out, snapshots);
    }
    if let Some(gate) = &stats.gate {
        gate_metrics(&mut out, gate);
    }
    family(
        &mut out,
        "http_requests_total",
        "counter",
        "HTTP requests answered, by route and status.",
    );
    for (route, status, count) in &stats.requests {
        let _ = writeln!(
            out,
            "{NAMESPACE}_http_requests_total{{route=\"{route}\",code=\"{status}\"}} {count}"
        );
    }

    // Worker histograms come through the command channels; if a worker is slow to answer,
    // the counters above are still worth serving, so the summaries are left out instead.
    if let Some(families) = stats.worker_latencies {
        out.push_str(families);
    }
    summary(
        &mut out,
        "query_latency_seconds",
        "GET /events/{app_sha256} service time.",
        stats.query_ns,
    );
    summary(
        &mut out,
        "reset_latency_seconds",
        "DELETE /events and DELETE /events/{app_sha256} service time.",
        stats.reset_ns,
    );
    if let Some(process) = &stats.process {
        process_metrics(&mut out, process);
    }
    for families in &stats.extra {
        out.push_str(families);
    }
    out
}

/// The standard process families, named as every Prometheus client library names them
/// (without the server's namespace), so that the usual dashboards work.
fn process_metrics(out: &mut String, process: &ProcessSample) {
    let mut standard = |name: &str, kind: &str, help: &str, value: &dyn std::fmt::Display| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    };
    standard(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        &process.resident_memory_bytes,
    );
    standard(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        &format!("{:.2}", process.cpu_seconds),
    );
    standard(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        &process.open_fds,
    );
    standard(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        &process.max_fds,
    );
    standard(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        &format!("{:.2}", process.start_time_seconds),
    );
}

fn gate_metrics(out: &mut String, gate: &GateSample) {
    let help = "Open client connections to the HTTP port.";
    single(
        out,
        "http_connections_open",
        "gauge",
        help,
        gate.open_connections,
    );
    let help = "Client connections accepted.";
    single(
        out,
        "http_connections_total",
        "counter",
        help,
        gate.accepted,
    );
    labelled(
        out,
        "http_refused_total",
        "counter",
        "Requests or connections refused at the gate, by reason.",
        "reason",
        gate.refused.iter().copied(),
    );
}

fn snapshot_metrics(out: &mut String, snapshots: &SnapshotSample) {
    let help = "State file snapshots written while running.";
    single(out, "snapshots_total", "counter", help, snapshots.taken);
    let help = "State file snapshots that failed.";
    single(
        out,
        "snapshot_failures_total",
        "counter",
        help,
        snapshots.failed,
    );
    let help = "Apps in the last snapshot.";
    single(
        out,
        "snapshot_last_apps",
        "gauge",
        help,
        snapshots.last_apps,
    );
    let seconds = snapshots.last_duration_ns as f64 / 1e9;
    let help = "Time the last snapshot took: copy, merge and write.";
    single(
        out,
        "snapshot_last_seconds",
        "gauge",
        help,
        format!("{seconds:.6}"),
    );
    let help = "When the last successful snapshot was written, in seconds since the Unix epoch \
                (0 before the first).";
    single(
        out,
        "snapshot_last_success_timestamp_seconds",
        "gauge",
        help,
        snapshots.last_success_unix_s,
    );
}

/// A metric family with one sample and no labels.
pub fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{NAMESPACE}_{name} {value}");
}

/// A metric family with one sample per value of one label.
pub fn labelled<'a>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, u64)>,
) {
    family(out, name, kind, help);
    for (value, count) in samples {
        let _ = writeln!(out, "{NAMESPACE}_{name}{{{label}=\"{value}\"}} {count}");
    }
}

pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {NAMESPACE}_{name} {help}");
    let _ = writeln!(out, "# TYPE {NAMESPACE}_{name} {kind}");
}

/// The workers' latency families, from their merged histograms. The API renders them when it
/// fetches the histograms (at most once a second), not for every request: their quantiles
/// cost more than the rest of `/metrics`, and a client polling it often (as the benchmark
/// does, every 2 ms) would take that CPU from the workers.
pub fn worker_latency_families(latencies: &Latencies) -> String {
    let mut out = String::new();
    summary(
        &mut out,
        "ingest_latency_seconds",
        "From the kernel's arrival stamp of a batch's newest datagram to the batch applied (sampled once per batch).",
        &latencies.ingest_ns,
    );
    summary(
        &mut out,
        "batch_seconds",
        "Time to receive and apply one recvmmsg batch.",
        &latencies.batch_ns,
    );
    out
}

pub fn summary(out: &mut String, name: &str, help: &str, histogram_ns: &Histogram<u64>) {
    family(out, name, "summary", help);
    // One pass over the histogram for all quantiles, and none for an empty one (every
    // quantile is then 0): each pass walks tens of thousands of buckets.
    let mut values = [0u64; QUANTILES.len()];
    if !histogram_ns.is_empty() {
        for (value, ns) in values
            .iter_mut()
            .zip(histogram_ns.value_at_quantiles(QUANTILES))
        {
            *value = ns;
        }
    }
    for (q, ns) in QUANTILES.iter().zip(values) {
        let seconds = ns as f64 / 1e9;
        let _ = writeln!(out, "{NAMESPACE}_{name}{{quantile=\"{q}\"}} {seconds:.9}");
    }
    let sum_seconds = histogram_ns.mean() * histogram_ns.len() as f64 / 1e9;
    let _ = writeln!(out, "{NAMESPACE}_{name}_sum {sum_seconds:.9}");
    let _ = writeln!(out, "{NAMESPACE}_{name}_count {}", histogram_ns.len());
}

/// Adds up the workers' histograms.
pub fn merge_latencies(stats: &[WorkerStats]) -> Latencies {
    let mut merged = Latencies::new();
    for s in stats {
        merged.add(&s.latencies);
    }
    merged
}

/// The report printed at shutdown: totals, then one percentile table per histogram.
pub fn report(
    totals: &Totals,
    latencies: &Latencies,
    query_ns: &Histogram<u64>,
    reset_ns: &Histogram<u64>,
    extra: &ReportExtra,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "totals: received {}, ingested {}, kernel drops {}, recv errors {}",
        totals.received, totals.ingested, totals.kernel_drops, totals.recv_errors
    );
    let invalid: Vec<String> = Reject::ALL
        .iter()
        .map(|r| format!("{} {}", r.as_str(), totals.invalid[r.index()]))
        .collect();
    let _ = writeln!(out, "invalid: {}", invalid.join(", "));
    let _ = writeln!(
        out,
        "dropped at --max-apps: {}, ips not stored at --max-ips-per-app: {}",
        totals.app_cap_drops, totals.ip_cap_drops
    );
    for line in &extra.lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "{:<10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "latency", "p50", "p90", "p99", "p99.9", "max", "count"
    );
    let own = [
        ("ingest", &latencies.ingest_ns),
        ("batch", &latencies.batch_ns),
        ("query", query_ns),
        ("reset", reset_ns),
    ];
    let others = extra
        .latencies
        .iter()
        .map(|(name, histogram)| (*name, histogram));
    for (name, histogram) in own.into_iter().chain(others) {
        let mut row = format!("{name:<10}");
        for q in QUANTILES {
            let _ = write!(row, " {:>12}", format_ns(histogram.value_at_quantile(q)));
        }
        let _ = write!(
            row,
            " {:>12} {:>12}",
            format_ns(histogram.max()),
            histogram.len()
        );
        let _ = writeln!(out, "{row}");
    }
    out
}

/// A duration in nanoseconds in the unit that keeps it short.
fn format_ns(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns}ns"),
        1_000..=999_999 => format!("{:.1}us", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}ms", ns as f64 / 1e6),
        _ => format!("{:.2}s", ns as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Backend;

    impl Source for Backend {
        fn render(&self, out: &mut String) {
            single(out, "backend_writes_total", "counter", "Writes.", 7);
        }
    }

    #[test]
    fn renders_plain_stats() {
        let histogram = crate::worker::new_histogram();
        let mut extra = String::new();
        Backend.render(&mut extra);
        let stats = Stats {
            workers: vec![WorkerSample {
                id: 0,
                received: 5,
                ingested: 4,
                kernel_drops: None,
                recv_errors: 0,
                stolen: 2,
                handed_back: 1,
                rcvbuf_bytes: Some(4096),
            }],
            totals: Totals {
                received: 5,
                ingested: 4,
                ..Totals::default()
            },
            app_entries: 3,
            apps_distinct: 2,
            snapshots: Some(SnapshotSample {
                last_success_unix_s: 1_764_580_000,
                ..SnapshotSample::default()
            }),
            gate: Some(GateSample {
                open_connections: 2,
                accepted: 3,
                refused: vec![("timeout", 1)],
            }),
            requests: vec![("/metrics", 200, 9)],
            worker_latencies: None,
            query_ns: &histogram,
            reset_ns: &histogram,
            process: None,
            extra: vec![extra],
            store_backlog_drops: 6,
        };
        let text = render(&stats);
        for line in [
            "ipevents_events_dropped_total{cause=\"store_backlog\"} 6",
            "ipevents_datagrams_received_total{worker=\"0\"} 5",
            "ipevents_datagrams_stolen_total{worker=\"0\"} 2",
            "ipevents_events_handed_back_total{worker=\"0\"} 1",
            "ipevents_socket_receive_buffer_bytes{worker=\"0\"} 4096",
            "ipevents_datagrams_invalid_total{reason=\"bad_sha\"} 0",
            "ipevents_apps_tracked 2",
            "ipevents_app_entries 3",
            "ipevents_snapshot_last_success_timestamp_seconds 1764580000",
            "ipevents_http_connections_open 2",
            "ipevents_http_refused_total{reason=\"timeout\"} 1",
            "ipevents_http_requests_total{route=\"/metrics\",code=\"200\"} 9",
            "# TYPE ipevents_backend_writes_total counter",
            "ipevents_backend_writes_total 7",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // A worker whose kernel does not report drops has no drops sample, and nothing from
        // /proc shows without a process sample, nor worker summaries without latencies.
        for absent in [
            "ipevents_kernel_drops_total{",
            "process_",
            "ipevents_batch_seconds",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
    }

    #[test]
    fn formats_durations() {
        for (ns, want) in [
            (0, "0ns"),
            (999, "999ns"),
            (1_000, "1.0us"),
            (12_345, "12.3us"),
            (2_369_535, "2.4ms"),
            (12_345_678_901, "12.35s"),
        ] {
            assert_eq!(format_ns(ns), want);
        }
    }
}

//! Renders what the server counts: the Prometheus text of `/metrics` and the report printed
//! at shutdown. It reads worker counters (relaxed atomics), kernel counters and histograms
//! handed over by the workers; it never asks a worker to stop for it.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;

use crate::cluster::Cluster;
use crate::gate::{GateCounters, Refusal};
use crate::http::Api;
use crate::snapshot::SnapshotCounters;
use crate::wire::Reject;
use crate::worker::{Counters, Latencies, WorkerStats};

const NAMESPACE: &str = "ipevents";

/// The quantiles of every latency summary and of the shutdown tables.
const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

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
            totals.received += Counters::get(&c.datagrams_received);
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
pub fn render(api: &mut Api) -> String {
    let worker_latencies = api.worker_latencies();
    let api = &*api;
    let cluster = api.cluster();
    let mut out = String::with_capacity(4096);
    let per_worker =
        |out: &mut String, name: &str, help: &str, value: &dyn Fn(usize) -> Option<u64>| {
            family(out, name, "counter", help);
            for worker in cluster.workers() {
                if let Some(v) = value(worker.id) {
                    let _ = writeln!(out, "{NAMESPACE}_{name}{{worker=\"{}\"}} {v}", worker.id);
                }
            }
        };
    let workers = cluster.workers();
    per_worker(
        &mut out,
        "datagrams_received_total",
        "Datagrams read from the UDP socket.",
        &|i| Some(Counters::get(&workers[i].counters.datagrams_received)),
    );
    per_worker(
        &mut out,
        "events_ingested_total",
        "Valid events counted (UDP and POST).",
        &|i| Some(Counters::get(&workers[i].counters.events_ingested)),
    );
    per_worker(
        &mut out,
        "kernel_drops_total",
        "Datagrams the kernel dropped because the socket's receive queue was full (SO_MEMINFO).",
        &|i| workers[i].kernel_drops(),
    );
    per_worker(
        &mut out,
        "recv_errors_total",
        "Failed recvmmsg calls.",
        &|i| Some(Counters::get(&workers[i].counters.recv_errors)),
    );

    let totals = Totals::of(cluster);
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
        "Valid events not counted because the server was at --max-apps.",
        "cause",
        [("max_apps", totals.app_cap_drops)],
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
        "App entries held by the workers; an app seen by k workers counts k times.",
        cluster.app_entries(),
    );
    single(
        &mut out,
        "apps_distinct",
        "gauge",
        "Distinct apps held by at least one worker: what --max-apps caps.",
        cluster.apps(),
    );
    single(
        &mut out,
        "workers",
        "gauge",
        "Ingest workers.",
        workers.len(),
    );

    if let Some(snapshots) = &api.snapshots {
        snapshot_metrics(&mut out, snapshots);
    }
    if let Some(gate) = &api.gate {
        gate_metrics(&mut out, gate);
    }
    family(
        &mut out,
        "http_requests_total",
        "counter",
        "HTTP requests answered, by route and status.",
    );
    for ((route, status), count) in &api.requests {
        let _ = writeln!(
            out,
            "{NAMESPACE}_http_requests_total{{route=\"{}\",code=\"{status}\"}} {count}",
            route.label()
        );
    }

    // Worker histograms come through the command channels; if a worker is slow to answer,
    // the counters above are still worth serving, so the summaries are left out instead.
    if let Some(latencies) = &worker_latencies {
        summary(
            &mut out,
            "ingest_latency_seconds",
            "From the kernel receive timestamp to the event applied (sampled once per batch).",
            &latencies.ingest_ns,
        );
        summary(
            &mut out,
            "batch_seconds",
            "Time to receive and apply one recvmmsg batch.",
            &latencies.batch_ns,
        );
    }
    summary(
        &mut out,
        "query_latency_seconds",
        "GET /events/{app_sha256} service time.",
        &api.query_ns,
    );
    summary(
        &mut out,
        "reset_latency_seconds",
        "DELETE /events and DELETE /events/{app_sha256} service time.",
        &api.reset_ns,
    );
    out
}

fn gate_metrics(out: &mut String, gate: &GateCounters) {
    let open = gate.open_connections.load(Ordering::Relaxed);
    let help = "Open client connections to the HTTP port.";
    single(out, "http_connections_open", "gauge", help, open);
    let accepted = gate.accepted.load(Ordering::Relaxed);
    let help = "Client connections accepted.";
    single(out, "http_connections_total", "counter", help, accepted);
    labelled(
        out,
        "http_refused_total",
        "counter",
        "Requests or connections refused at the gate, by reason.",
        "reason",
        Refusal::ALL.map(|r| (r.as_str(), gate.refused(r))),
    );
}

fn snapshot_metrics(out: &mut String, snapshots: &SnapshotCounters) {
    let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let help = "State file snapshots written while running.";
    single(
        out,
        "snapshots_total",
        "counter",
        help,
        get(&snapshots.taken),
    );
    let help = "State file snapshots that failed.";
    single(
        out,
        "snapshot_failures_total",
        "counter",
        help,
        get(&snapshots.failed),
    );
    let help = "Apps in the last snapshot.";
    single(
        out,
        "snapshot_last_apps",
        "gauge",
        help,
        get(&snapshots.last_apps),
    );
    let seconds = get(&snapshots.last_duration_ns) as f64 / 1e9;
    let help = "Time the last snapshot took: copy, merge and write.";
    single(
        out,
        "snapshot_last_seconds",
        "gauge",
        help,
        format!("{seconds:.6}"),
    );
}

/// A metric family with one sample and no labels.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{NAMESPACE}_{name} {value}");
}

/// A metric family with one sample per value of one label.
fn labelled<'a>(
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

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {NAMESPACE}_{name} {help}");
    let _ = writeln!(out, "# TYPE {NAMESPACE}_{name} {kind}");
}

fn summary(out: &mut String, name: &str, help: &str, histogram_ns: &Histogram<u64>) {
    family(out, name, "summary", help);
    for q in QUANTILES {
        let seconds = histogram_ns.value_at_quantile(q) as f64 / 1e9;
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
pub fn report(totals: &Totals, latencies: &Latencies, api: &Api) -> String {
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
    let _ = writeln!(
        out,
        "{:<10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "latency", "p50", "p90", "p99", "p99.9", "max", "count"
    );
    for (name, histogram) in [
        ("ingest", &latencies.ingest_ns),
        ("batch", &latencies.batch_ns),
        ("query", &api.query_ns),
        ("reset", &api.reset_ns),
    ] {
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

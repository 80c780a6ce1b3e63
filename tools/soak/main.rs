//! `soak`: runs the server under mixed load for a set time and checks that it stays correct,
//! bounded and responsive.
//!
//! It starts the server binary on loopback ports, then works in epochs of `--reset-every-s`:
//! each epoch resets the server, churns the set of apps, and sends valid traffic at `--rate`
//! from many source sockets with `--malformed-percent` garbage mixed in, while the main thread
//! queries a random app every `--query-every-ms`. At the end of each epoch it waits for the
//! server to settle and checks every app: exact count (when the kernel dropped nothing), good
//! and bad IPs always. Over the whole run it checks that resident memory stops growing once
//! the working set is reached and that query latency stays under the stated bounds. It prints
//! a summary and exits 1 on any violation, 2 when it cannot run.

#[path = "../loadgen/api.rs"]
mod api;
#[path = "../loadgen/scrape.rs"]
mod scrape;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use api::Api;

/// Hosts of an app's home /28 that it uses (.1 to .14), and bad IPs per app.
const GOOD_IPS: usize = 14;
const BAD_IPS: usize = 2;
const IPS_PER_APP: usize = GOOD_IPS + BAD_IPS;

/// Datagrams per sendmmsg call.
const BATCH: usize = 64;

#[derive(Parser, Debug)]
#[command(
    about = "Soak test: the server under mixed load, checked for correctness, memory and latency"
)]
struct Args {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 60)]
    duration_s: u64,
    /// Valid and malformed datagrams per second, together.
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// Apps per epoch.
    #[arg(long, default_value_t = 500)]
    apps: usize,
    /// Share of the apps replaced by new ones at every epoch, in percent.
    #[arg(long, default_value_t = 50)]
    churn_percent: u8,
    /// Seconds between resets; each reset starts an epoch.
    #[arg(long, default_value_t = 60)]
    reset_every_s: u64,
    /// Milliseconds between queries.
    #[arg(long, default_value_t = 5)]
    query_every_ms: u64,
    /// Share of datagrams that are malformed, in percent.
    #[arg(long, default_value_t = 5)]
    malformed_percent: u8,
    /// Source sockets for the traffic.
    #[arg(long, default_value_t = 8)]
    sockets: usize,
    /// Server workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Bound on the 99th percentile of query latency, in milliseconds.
    #[arg(long, default_value_t = 50)]
    max_query_p99_ms: u64,
    /// Bound on every query's latency, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    max_query_ms: u64,
    /// Allowed growth of peak resident memory from the first epoch to the last, in percent
    /// (plus 4 MiB for allocator noise).
    #[arg(long, default_value_t = 10)]
    max_rss_growth_percent: u64,
    /// The server binary [default: `ipevents` next to this program].
    #[arg(long)]
    server: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// One app of an epoch: its sha and the datagram for each of its IPs.
struct App {
    sha: String,
    block: u32,
    ips: [u32; IPS_PER_APP],
    datagrams: Vec<Vec<u8>>,
}

impl App {
    fn new(rng: &mut SmallRng) -> App {
        let sha: String = (0..32)
            .map(|_| format!("{:02x}", rng.random::<u8>()))
            .collect();
        let block = rng.random::<u32>() & !0xf;
        let mut ips = [0u32; IPS_PER_APP];
        for (i, ip) in ips.iter_mut().enumerate().take(GOOD_IPS) {
            *ip = block + 1 + i as u32;
        }
        for ip in ips.iter_mut().skip(GOOD_IPS) {
            *ip = loop {
                let candidate: u32 = rng.random();
                if candidate.abs_diff(block) > 28 {
                    break candidate;
                }
            };
        }
        let datagrams = ips
            .iter()
            .map(|&ip| ipevents::wire::encode(&sha, ip.into()))
            .collect();
        App {
            sha,
            block,
            ips,
            datagrams,
        }
    }
}

/// What one epoch's sender sent.
#[derive(Default)]
struct Sent {
    valid: u64,
    malformed: u64,
    per_app: Vec<u64>,
    /// Which of each app's IPs were sent at least once, as bits.
    ips_mask: Vec<u16>,
}

/// Sends paced traffic until `stop`, from `sockets` connected sockets.
fn send_epoch(
    apps: &[App],
    to: SocketAddr,
    args: &Args,
    seed: u64,
    stop: &AtomicBool,
) -> std::io::Result<Sent> {
    let sockets: Vec<UdpSocket> = (0..args.sockets.max(1))
        .map(|_| {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            socket.connect(to)?;
            ipevents::socket::set_sndbuf(&socket, 4 << 20)?;
            Ok(socket)
        })
        .collect::<std::io::Result<_>>()?;
    let malformed: Vec<Vec<u8>> = vec![
        vec![0xff; 40],
        ipevents::wire::encode("not a sha", 1),
        ipevents::wire::encode(&apps[0].sha, -1),
        apps[0].datagrams[0][..30].to_vec(),
        vec![],
    ];
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut sent = Sent {
        per_app: vec![0; apps.len()],
        ips_mask: vec![0; apps.len()],
        ..Sent::default()
    };
    let mut batch = ipevents::socket::SendBatch::new(BATCH);
    let batch_interval = Duration::from_secs_f64(BATCH as f64 / args.rate.max(1) as f64);
    let started = Instant::now();
    let mut batches = 0u64;
    let mut picks: Vec<Option<(usize, usize)>> = Vec::with_capacity(BATCH);
    while !stop.load(Ordering::Relaxed) {
        picks.clear();
        let mut slices: Vec<&[u8]> = Vec::with_capacity(BATCH);
        for _ in 0..BATCH {
            if rng.random_range(0..100) < args.malformed_percent {
                slices.push(&malformed[rng.random_range(0..malformed.len())]);
                picks.push(None);
            } else {
                let app = rng.random_range(0..apps.len());
                let ip = rng.random_range(0..IPS_PER_APP);
                slices.push(&apps[app].datagrams[ip]);
                picks.push(Some((app, ip)));
            }
        }
        let socket = &sockets[batches as usize % sockets.len()];
        let mut done = 0;
        while done < slices.len() {
            match batch.send(socket, &slices[done..]) {
                Ok(n) => done += n,
                // The send queue is full for a moment (ENOBUFS): retry the rest.
                Err(_) => thread::sleep(Duration::from_micros(50)),
            }
        }
        for pick in &picks {
            match pick {
                Some((app, ip)) => {
                    sent.valid += 1;
                    sent.per_app[*app] += 1;
                    sent.ips_mask[*app] |= 1 << ip;
                }
                None => sent.malformed += 1,
            }
        }
        batches += 1;
        // Pace against the clock from the start, so a slow moment is made up, not lost.
        let due = started + batch_interval.mul_f64(batches as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    Ok(sent)
}

/// The server process under test.
struct Server {
    child: Child,
    udp: SocketAddr,
    http: SocketAddr,
}

impl Server {
    fn start(binary: &PathBuf, workers: usize) -> Result<Server, String> {
        let mut child = Command::new(binary)
            .args(["--udp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--no-pin"])
            .args(["--workers", &workers.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("start {}: {e}", binary.display()))?;
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let listening = loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening") => break line,
                Some(Ok(_)) => continue,
                _ => {
                    let _ = child.kill();
                    return Err(format!("{} did not start", binary.display()));
                }
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        thread::spawn(move || lines.for_each(drop));
        let field = |key: &str| -> Result<SocketAddr, String> {
            listening
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no {key} in {listening:?}"))
        };
        Ok(Server {
            udp: field("udp=")?,
            http: field("http=")?,
            child,
        })
    }

    fn resident_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()));
        status
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kib| kib * 1024)
    }

    /// SIGTERM, then wait; returns whether it exited 0.
    fn stop(mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        false
    }
}

/// What the run found.
#[derive(Default)]
struct Findings {
    violations: Vec<String>,
    epochs: u64,
    valid_sent: u64,
    malformed_sent: u64,
    apps_checked: u64,
    exact_epochs: u64,
    kernel_drops: u64,
    peak_rss_per_epoch: Vec<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(findings) => {
            if findings.violations.is_empty() {
                println!("soak: PASS");
                ExitCode::SUCCESS
            } else {
                for violation in &findings.violations {
                    println!("violation: {violation}");
                }
                println!("soak: FAIL ({} violations)", findings.violations.len());
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<Findings, String> {
    let binary = match &args.server {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("locate myself: {e}"))?
            .with_file_name("ipevents"),
    };
    if args.apps == 0 {
        return Err("--apps must be at least 1".into());
    }
    let server = Server::start(&binary, args.workers)?;
    let api = Api::new(server.http);
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let mut apps: Vec<App> = (0..args.apps).map(|_| App::new(&mut rng)).collect();
    let mut findings = Findings::default();
    let mut latency_ns = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)
        .expect("constant bounds are valid");
    let run_started = Instant::now();
    let run_end = run_started + Duration::from_secs(args.duration_s);
    println!(
        "soak: {} s at {}/s ({}% malformed), {} apps per epoch, reset every {} s, a query every {} ms; server udp={} http={}",
        args.duration_s, args.rate, args.malformed_percent, args.apps, args.reset_every_s,
        args.query_every_ms, server.udp, server.http
    );

    while Instant::now() < run_end {
        findings.epochs += 1;
        let epoch = findings.epochs;
        api.reset().map_err(|e| e.0)?;
        let base = scrape::scrape(&api).map_err(|e| e.0)?;
        let epoch_end = (Instant::now() + Duration::from_secs(args.reset_every_s)).min(run_end);
        let stop = Arc::new(AtomicBool::new(false));
        let mut peak_rss = 0u64;
        let mut last_counts = vec![0u64; apps.len()];
        let sent = thread::scope(|scope| {
            let sender = {
                let (apps, stop) = (&apps, stop.clone());
                let seed = args.seed ^ epoch;
                scope.spawn(move || send_epoch(apps, server.udp, args, seed, &stop))
            };
            let mut next_rss = Instant::now();
            while Instant::now() < epoch_end {
                if Instant::now() >= next_rss {
                    peak_rss = peak_rss.max(server.resident_bytes());
                    next_rss += Duration::from_secs(1);
                }
                let index = rng.random_range(0..apps.len());
                let started = Instant::now();
                match api.query(&apps[index].sha) {
                    Ok(reply) if reply.status == 200 => {
                        latency_ns.saturating_record(started.elapsed().as_nanos() as u64);
                        match count_of(&reply.body) {
                            Some(count) if count >= last_counts[index] => {
                                last_counts[index] = count
                            }
                            Some(count) => findings.violations.push(format!(
                                "epoch {epoch}: {} went back from {} to {count}",
                                apps[index].sha, last_counts[index]
                            )),
                            None => findings.violations.push(format!(
                                "epoch {epoch}: unreadable answer {}",
                                api::excerpt(&reply.body)
                            )),
                        }
                    }
                    Ok(reply) => findings.violations.push(format!(
                        "epoch {epoch}: query answered {}: {}",
                        reply.status,
                        api::excerpt(&reply.body)
                    )),
                    Err(e) => findings.violations.push(format!("epoch {epoch}: {}", e.0)),
                }
                thread::sleep(Duration::from_millis(args.query_every_ms));
            }
            stop.store(true, Ordering::Relaxed);
            sender.join().expect("the sender does not panic")
        })
        .map_err(|e| format!("send: {e}"))?;
        findings
            .peak_rss_per_epoch
            .push(peak_rss.max(server.resident_bytes()));
        findings.valid_sent += sent.valid;
        findings.malformed_sent += sent.malformed;
        check_epoch(epoch, &api, &base, &apps, &sent, &mut findings)?;
        // Churn: replace a share of the apps for the next epoch.
        let replaced = apps.len() * usize::from(args.churn_percent.min(100)) / 100;
        for app in apps.iter_mut().take(replaced) {
            *app = App::new(&mut rng);
        }
    }

    check_latency(args, &latency_ns, &mut findings);
    check_memory(args, &mut findings);
    let rss_end = server.resident_bytes();
    if !server.stop() {
        findings
            .violations
            .push("the server did not exit 0 on SIGTERM".into());
    }
    println!(
        "epochs {} ({} with exact counts), datagrams sent {} valid + {} malformed, apps checked {}, kernel drops {}",
        findings.epochs, findings.exact_epochs, findings.valid_sent, findings.malformed_sent, findings.apps_checked, findings.kernel_drops
    );
    println!(
        "query latency over {} queries: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        latency_ns.len(),
        latency_ns.value_at_quantile(0.5) as f64 / 1e6,
        latency_ns.value_at_quantile(0.99) as f64 / 1e6,
        latency_ns.value_at_quantile(0.999) as f64 / 1e6,
        latency_ns.max() as f64 / 1e6
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let peaks: Vec<String> = findings
        .peak_rss_per_epoch
        .iter()
        .map(|&b| format!("{:.1}", mib(b)))
        .collect();
    println!(
        "peak resident memory per epoch (MiB): {}; at the end {:.1} MiB",
        peaks.join(", "),
        mib(rss_end)
    );
    Ok(findings)
}

fn count_of(body: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(body).ok()?["count"].as_u64()
}

/// Waits for the server to take everything sent, then checks every app of the epoch.
fn check_epoch(
    epoch: u64,
    api: &Api,
    base: &scrape::ServerCounters,
    apps: &[App],
    sent: &Sent,
    findings: &mut Findings,
) -> Result<(), String> {
    let total = sent.valid + sent.malformed;
    let settled = scrape::settle(api, base, total, Duration::from_secs(10)).map_err(|e| e.0)?;
    let delta = settled.counters.since(base);
    findings.kernel_drops += delta.kernel_drops;
    let exact = settled.settled && delta.kernel_drops == 0 && delta.received == total;
    if exact {
        findings.exact_epochs += 1;
    }
    if delta
        .invalid
        .is_some_and(|invalid| invalid > sent.malformed)
    {
        findings.violations.push(format!(
            "epoch {epoch}: {} invalid datagrams counted, {} sent",
            delta.invalid.unwrap_or(0),
            sent.malformed
        ));
    }
    for (i, app) in apps.iter().enumerate() {
        findings.apps_checked += 1;
        let reply = api.query(&app.sha).map_err(|e| e.0)?;
        let Ok(answer) = serde_json::from_str::<serde_json::Value>(&reply.body) else {
            findings
                .violations
                .push(format!("epoch {epoch}: unreadable answer for {}", app.sha));
            continue;
        };
        let count = answer["count"].as_u64().unwrap_or(u64::MAX);
        let want = sent.per_app[i];
        if (exact && count != want) || count > want {
            findings.violations.push(format!(
                "epoch {epoch}: {} counted {count}, sent {want}",
                app.sha
            ));
        }
        if want == 0 {
            continue;
        }
        let quads = |key: &str| -> BTreeSet<String> {
            answer[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let dotted = |ip: u32| std::net::Ipv4Addr::from(ip).to_string();
        let good: BTreeSet<String> = (1..=14).map(|h| dotted(app.block + h)).collect();
        let sent_bad: BTreeSet<String> = (GOOD_IPS..IPS_PER_APP)
            .filter(|&j| sent.ips_mask[i] & (1 << j) != 0)
            .map(|j| dotted(app.ips[j]))
            .collect();
        // With enough events every good IP is seen; the home block is then certain.
        let good_seen = (0..GOOD_IPS)
            .filter(|&j| sent.ips_mask[i] & (1 << j) != 0)
            .count();
        if good_seen >= 2 && quads("good_ips") != good {
            findings
                .violations
                .push(format!("epoch {epoch}: {} has the wrong good_ips", app.sha));
        }
        if good_seen >= 2 && exact && quads("bad_ips") != sent_bad {
            findings
                .violations
                .push(format!("epoch {epoch}: {} has the wrong bad_ips", app.sha));
        }
    }
    Ok(())
}

fn check_latency(args: &Args, latency_ns: &Histogram<u64>, findings: &mut Findings) {
    let p99_ms = latency_ns.value_at_quantile(0.99) / 1_000_000;
    let max_ms = latency_ns.max() / 1_000_000;
    if latency_ns.is_empty() {
        findings.violations.push("no query was answered".into());
    }
    if p99_ms > args.max_query_p99_ms {
        findings.violations.push(format!(
            "query p99 {p99_ms} ms is over {} ms",
            args.max_query_p99_ms
        ));
    }
    if max_ms > args.max_query_ms {
        findings.violations.push(format!(
            "a query took {max_ms} ms, over {} ms",
            args.max_query_ms
        ));
    }
}

/// Resident memory must stop growing once the working set is reached: the last epoch's peak
/// may exceed the first epoch's by the allowed share only.
fn check_memory(args: &Args, findings: &mut Findings) {
    let (Some(&first), Some(&last)) = (
        findings.peak_rss_per_epoch.first(),
        findings.peak_rss_per_epoch.last(),
    ) else {
        return;
    };
    let allowed = first + first * args.max_rss_growth_percent / 100 + (4 << 20);
    if last > allowed {
        findings.violations.push(format!(
            "resident memory grew from {first} to {last} bytes over {} epochs",
            findings.peak_rss_per_epoch.len()
        ));
    }
}

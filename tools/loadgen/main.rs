//! `loadgen`: a load generator for ipevents that sends millions of datagrams per second over
//! loopback, then checks the server's answers against exactly what the kernel took.
//!
//! A run: build the scenario, reset the server, read its counters, send (paced or not) from
//! several connected sockets and threads, wait for the server to settle, read its counters
//! again, query every app (or a sample) and print a summary. The modules, in that order:
//! [`scenario`], [`api`], [`scrape`], [`send`] with [`progress`] and [`probe`], [`verify`],
//! [`summary`]. A `--send-only` run only sends, and touches no HTTP at all.
//!
//! It refuses any target that is not loopback: it is a load generator and must never hit
//! another host. All socket calls go through `ipevents::socket`; there is no unsafe here.
#![forbid(unsafe_code)]

mod api;
mod probe;
mod progress;
mod scenario;
mod scrape;
mod send;
mod summary;
mod verify;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::api::{Api, ApiError};
use crate::probe::QueryStats;
use crate::progress::{Bound, ProgressView};
use crate::scenario::{ManyApps, Scenario, ScenarioKind, GOOD_HOSTS, MAX_IPS_PER_APP};
use crate::send::{Order, Progress, SendPlan, SendReport, MAX_BATCH};
use crate::summary::{SendSummary, Summary};

/// Datagrams sent when neither `--count` nor `--duration` is given.
const DEFAULT_COUNT: u64 = 1_000_000;

/// No run sends for longer than this, whatever the flags say.
const MAX_DURATION: Duration = Duration::from_secs(600);

/// How long the server may take to catch up after the send phase.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

const DEFAULT_APPS: usize = 10_000;
const DEFAULT_BAD_IPS: usize = 2;

/// Sends IpEvent datagrams to an ipevents server on loopback as fast as asked, then checks
/// its answers. Exit code: 0 all answers right, 1 a wrong answer, 2 usage or connection error.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version)]
struct Args {
    /// UDP address of the server (loopback only).
    #[arg(long, default_value = "127.0.0.1:3001", value_name = "ADDR", value_parser = loopback)]
    udp: SocketAddr,

    /// HTTP address of the server's API (loopback only).
    #[arg(long, default_value = "127.0.0.1:3000", value_name = "ADDR", value_parser = loopback)]
    http: SocketAddr,

    /// `reference`: the reference client's three apps sharing one /28 and 1-10 bad IPs;
    /// `many-apps`: --apps apps, each with its own /28.
    #[arg(long, value_enum, default_value_t = ScenarioKind::Reference)]
    scenario: ScenarioKind,

    /// Apps in the many-apps scenario [default: 10000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    apps: Option<u32>,

    /// Good IPs per app in the many-apps scenario: how many of its /28's 14 hosts are sent
    /// [default: 14]. With one good IP and no bad IP, each app is one (app, ip) pair.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u8).range(1..=14))]
    good_ips: Option<u8>,

    /// Bad IPs per app in the many-apps scenario, each far from its /28 [default: 2].
    #[arg(long, value_name = "B", value_parser = clap::value_parser!(u8).range(0..=50))]
    bad_ips: Option<u8>,

    /// Datagrams to send [default: 1000000 when --duration is not given; with
    /// --each-pair-once, every pair: apps x IPs per app; with --each-pair-times K, K times
    /// that].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,

    /// Stop sending after this many seconds (at most 600); with --count, whichever comes first.
    #[arg(long = "duration", value_name = "SECONDS", value_parser = positive_seconds)]
    duration_s: Option<f64>,

    /// Datagrams per second over all threads, paced per batch; 0 sends as fast as possible.
    #[arg(long = "rate", default_value_t = 0.0, value_name = "R", value_parser = rate)]
    rate_per_s: f64,

    /// Connected source sockets, so that the server's flow-hash steering spreads the load.
    #[arg(long, default_value_t = 8, value_name = "K", value_parser = clap::value_parser!(u16).range(1..=1024))]
    sockets: u16,

    /// Datagrams per sendmmsg call.
    #[arg(long, default_value_t = 64, value_name = "B", value_parser = clap::value_parser!(u16).range(1..=MAX_BATCH as i64))]
    batch: u16,

    /// Sender threads; the sockets and the rate are divided among them.
    #[arg(long, default_value_t = 1, value_name = "T", value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,

    /// Seed for the scenario and the event stream [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,

    /// Do not reset the server (DELETE /events) first.
    #[arg(long)]
    no_reset: bool,

    /// Skip the query phase (for the discard receiver, which has no query API).
    #[arg(long)]
    no_verify: bool,

    /// Check at most this many apps, drawn at random, when there are more.
    #[arg(long, default_value_t = 1000, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    sample: u32,

    /// Print the summary as one JSON object on stdout (the human text goes to stderr).
    #[arg(long)]
    json: bool,

    /// Only send, and print what was sent: no reset, no /metrics, no settling, no queries,
    /// no HTTP at all. For a receiver whose HTTP cannot answer, such as one stopped with
    /// SIGSTOP to queue datagrams in its sockets.
    #[arg(long)]
    send_only: bool,

    /// Send every (app, ip) pair of the many-apps scenario exactly once, app by app, so that
    /// the whole working set is loaded; every app's count is then its number of IPs.
    #[arg(long)]
    each_pair_once: bool,

    /// Send every (app, ip) pair of the many-apps scenario exactly K times, in K passes over
    /// the pairs, each pass app by app; every app's count is then K times its number of IPs.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..),
          conflicts_with = "each_pair_once")]
    each_pair_times: Option<u32>,

    /// While sending, query a random app of the scenario every MS milliseconds from a second
    /// thread and report the latencies (the answers are not checked: the send is changing
    /// them).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=60_000),
          conflicts_with = "send_only")]
    query_every_ms: Option<u64>,
}

/// Accepts only loopback addresses (127.0.0.0/8 and ::1).
fn loopback(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IP address and port"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address: loadgen only sends to 127.0.0.0/8 or ::1"
        ));
    }
    Ok(addr)
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 => Ok(seconds),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

fn rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a rate (0 or more datagrams per second)"
        )),
    }
}

impl Args {
    /// Checks what clap cannot check flag by flag.
    fn validate(&self) -> Result<(), String> {
        if self.threads > self.sockets {
            return Err(format!(
                "--threads {} needs at least as many --sockets (have {})",
                self.threads, self.sockets
            ));
        }
        let many_apps_flag =
            self.apps.is_some() || self.good_ips.is_some() || self.bad_ips.is_some();
        if self.scenario == ScenarioKind::Reference && many_apps_flag {
            return Err(
                "--apps, --good-ips and --bad-ips belong to --scenario many-apps".to_owned(),
            );
        }
        if let Some(times) = self.each_pair_times() {
            let flag = self.each_pair_flag();
            if self.scenario != ScenarioKind::ManyApps {
                return Err(format!("{flag} belongs to --scenario many-apps"));
            }
            let (pairs, sequence) = (self.pairs(), self.sequence());
            if self.count.is_some_and(|count| count > sequence) {
                return Err(format!(
                    "{flag} sends each of the {pairs} (app, ip) pairs {times} time(s), so \
                     --count can be at most {sequence}"
                ));
            }
        }
        Ok(())
    }

    /// How many times each pair is sent: `Some(1)` with `--each-pair-once`, `Some(K)` with
    /// `--each-pair-times K`, `None` for random events.
    fn each_pair_times(&self) -> Option<u32> {
        if self.each_pair_once {
            Some(1)
        } else {
            self.each_pair_times
        }
    }

    /// The flag that asked for every pair, for error messages.
    fn each_pair_flag(&self) -> &'static str {
        if self.each_pair_once {
            "--each-pair-once"
        } else {
            "--each-pair-times"
        }
    }

    /// Datagrams in the whole each-pair sequence: pairs times the passes.
    fn sequence(&self) -> u64 {
        self.pairs() * u64::from(self.each_pair_times().unwrap_or(1))
    }

    /// (app, ip) pairs in the many-apps scenario.
    fn pairs(&self) -> u64 {
        let shape = self.many_apps();
        shape.apps as u64 * (shape.good_ips + shape.bad_ips) as u64
    }

    fn order(&self) -> Order {
        match self.each_pair_times() {
            Some(times) => Order::EachPair { times },
            None => Order::Random,
        }
    }

    fn many_apps(&self) -> ManyApps {
        let shape = ManyApps {
            apps: self.apps.map_or(DEFAULT_APPS, |n| n as usize),
            good_ips: self.good_ips.map_or(GOOD_HOSTS, usize::from),
            bad_ips: self.bad_ips.map_or(DEFAULT_BAD_IPS, usize::from),
        };
        debug_assert!(shape.good_ips + shape.bad_ips <= MAX_IPS_PER_APP);
        shape
    }

    /// The datagram bound: `--count`, or the whole sequence with `--each-pair-once` or
    /// `--each-pair-times`, or the default when no `--duration` is given.
    fn count(&self) -> Option<u64> {
        match (self.count, self.duration_s) {
            (Some(count), _) => Some(count),
            (None, _) if self.each_pair_times().is_some() => Some(self.sequence()),
            (None, None) => Some(DEFAULT_COUNT),
            (None, Some(_)) => None,
        }
    }

    /// The time bound: `--duration`, capped at [`MAX_DURATION`].
    fn duration(&self) -> Duration {
        self.duration_s.map_or(MAX_DURATION, |s| {
            Duration::from_secs_f64(s).min(MAX_DURATION)
        })
    }
}

/// Why a run could not be carried out: exit code 2.
struct Failure(String);

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Failure {
        Failure(error.0)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(message) = args.validate() {
        Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, message)
            .exit();
    }
    let outcome = if args.send_only {
        send_only(&args).map(|_| true)
    } else {
        run(&args).map(|summary| summary.ok())
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(Failure(message)) => {
            eprintln!("loadgen: {message}");
            ExitCode::from(2)
        }
    }
}

/// A `--send-only` run: build the scenario, send, print what was sent.
fn send_only(args: &Args) -> Result<SendSummary, Failure> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = SmallRng::seed_from_u64(seed);
    let scenario = build_scenario(args, &mut rng)?;
    describe_scenario(&scenario, seed);
    let (report, _) = send_phase(args, &scenario, seed)?;
    let elapsed_s = report.elapsed.as_secs_f64();
    let summary = SendSummary {
        scenario: scenario.kind.name(),
        seed,
        apps: scenario.apps(),
        sent: report.sent,
        target_rate_per_s: args.rate_per_s,
        send_rate_per_s: report.sent as f64 / elapsed_s.max(1e-9),
        elapsed_s,
        send_backoffs: report.backoffs,
    };
    print_summary(args.json, &summary.to_text(), &summary.to_json());
    Ok(summary)
}

/// Opens the sockets and sends, with the query probe running alongside when asked.
fn send_phase(
    args: &Args,
    scenario: &Scenario,
    seed: u64,
) -> Result<(SendReport, Option<QueryStats>), Failure> {
    let (sockets, sndbuf_bytes) = send::open_sockets(args.udp, usize::from(args.sockets))
        .map_err(|e| Failure(format!("open udp sockets to {}: {e}", args.udp)))?;
    let plan = SendPlan {
        count: args.count(),
        deadline: Instant::now() + args.duration(),
        rate_per_s: args.rate_per_s,
        batch: usize::from(args.batch),
        threads: usize::from(args.threads),
        seed,
        order: args.order(),
    };
    describe_plan(args, &plan, sndbuf_bytes);
    let progress = Progress::default();
    let mut view = ProgressView::new(match plan.count {
        Some(count) => Bound::Count(count),
        None => Bound::Duration(args.duration()),
    });
    let done = AtomicBool::new(false);
    let (report, queries) = std::thread::scope(|scope| {
        let probe = args.query_every_ms.map(|ms| {
            let (done, http) = (&done, args.http);
            scope.spawn(move || {
                let api = Api::new(http);
                probe::run(&api, scenario, Duration::from_millis(ms), seed, done)
            })
        });
        let report = send::run(scenario, sockets, &plan, &progress, || {
            view.update(progress.sent.load(Ordering::Relaxed))
        });
        done.store(true, Ordering::Relaxed);
        let queries = probe.map(|probe| probe.join().expect("the query probe does not panic"));
        (report, queries)
    });
    view.finish();
    Ok((report.map_err(Failure)?, queries))
}

fn run(args: &Args) -> Result<Summary, Failure> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = SmallRng::seed_from_u64(seed);
    let scenario = build_scenario(args, &mut rng)?;
    describe_scenario(&scenario, seed);

    let api = Api::new(args.http);
    if !args.no_reset {
        api.reset()?;
    }
    let before = scrape::scrape(&api)?;

    let (report, queries) = send_phase(args, &scenario, seed)?;

    let settled = scrape::settle(&api, &before, report.sent, SETTLE_TIMEOUT)?;
    let during = settled.counters.since(&before);
    // Without loss the server must account for every event; with loss, only for some. Events
    // the server received but did not count (at its --max-apps cap) are loss to the checker.
    let lossless = during.received == report.sent
        && during.kernel_drops == 0
        && during
            .ingested
            .is_none_or(|ingested| ingested == during.received);
    if !lossless && !args.no_verify {
        eprintln!(
            "loadgen: the server did not count every datagram sent, so counts are checked as \
             upper bounds and IP lists for what was invented, not for what is missing"
        );
    }
    let verification = if args.no_verify {
        verify::Verification::default()
    } else {
        verify::verify(
            &api,
            &scenario,
            &report.tally,
            lossless,
            args.sample as usize,
            &mut rng,
        )?
    };

    let elapsed_s = report.elapsed.as_secs_f64();
    let lost = report.sent.saturating_sub(during.received);
    let summary = Summary {
        scenario: scenario.kind.name(),
        seed,
        apps: scenario.apps(),
        sent: report.sent,
        received: during.received,
        ingested: during.ingested,
        lost,
        lost_percent: if report.sent == 0 {
            0.0
        } else {
            100.0 * lost as f64 / report.sent as f64
        },
        kernel_drops: during.kernel_drops,
        invalid: during.invalid,
        dropped_at_caps: during.dropped,
        target_rate_per_s: args.rate_per_s,
        send_rate_per_s: report.sent as f64 / elapsed_s.max(1e-9),
        elapsed_s,
        send_backoffs: report.backoffs,
        settled: settled.settled,
        verified: !args.no_verify,
        apps_checked: verification.apps_checked,
        apps_sampled: verification.sampled,
        wrong_answers: verification.wrong_answers,
        queries,
    };
    print_summary(args.json, &summary.to_text(), &summary.to_json());
    Ok(summary)
}

fn build_scenario(args: &Args, rng: &mut SmallRng) -> Result<Scenario, Failure> {
    match args.scenario {
        ScenarioKind::Reference => Scenario::reference(rng),
        ScenarioKind::ManyApps => Scenario::many_apps(rng, args.many_apps()),
    }
    .map_err(Failure)
}

fn describe_scenario(scenario: &Scenario, seed: u64) {
    let quad = |ip: u32| ipevents::wire::dotted_quad(ip);
    let encoding = if scenario.is_preencoded() {
        "pre-encoded"
    } else {
        "encoded per batch"
    };
    match scenario.kind {
        ScenarioKind::Reference => {
            let ips = scenario.ips(0);
            let bad: Vec<String> = (0..ips.len())
                .filter(|&i| !scenario.is_good(i))
                .map(|i| quad(ips[i]))
                .collect();
            eprintln!(
                "loadgen: seed {seed}, scenario reference: 3 apps, home block {}/28, bad IPs {}",
                quad(scenario.block(0)),
                bad.join(", ")
            );
            eprintln!("loadgen: app under test {}", scenario.sha_hex(0));
        }
        ScenarioKind::ManyApps => {
            let ips = scenario.ips_per_app();
            let good = (0..ips).filter(|&i| scenario.is_good(i)).count();
            eprintln!(
                "loadgen: seed {seed}, scenario many-apps: {} apps, {good} good + {} bad IPs each, \
                 {encoding}",
                scenario.apps(),
                ips - good
            );
        }
    }
}

fn describe_plan(args: &Args, plan: &SendPlan, sndbuf_bytes: usize) {
    let bound = match (plan.count, args.duration_s) {
        (Some(count), Some(s)) => format!("{count} datagrams or {s} s, whichever comes first"),
        (Some(count), None) => format!("{count} datagrams"),
        (None, _) => format!("for {:.1} s", args.duration().as_secs_f64()),
    };
    let order = match plan.order {
        Order::Random => String::new(),
        Order::EachPair { times: 1 } => " (each (app, ip) pair once, app by app)".to_owned(),
        Order::EachPair { times } => {
            format!(" (each (app, ip) pair {times} times, in passes app by app)")
        }
    };
    let rate = if plan.rate_per_s > 0.0 {
        format!("at {}/s", progress::si(plan.rate_per_s))
    } else {
        "unpaced".to_owned()
    };
    eprintln!(
        "loadgen: sending {bound}{order} to udp {} {rate}: sockets {}, sndbuf {sndbuf_bytes} \
         bytes, threads {}, batch {}",
        args.udp, args.sockets, plan.threads, plan.batch
    );
    if let Some(ms) = args.query_every_ms {
        eprintln!("loadgen: querying a random app every {ms} ms while sending");
    }
}

/// Prints a summary: the text on stdout, or with `--json` the JSON object on stdout and the
/// text on stderr, so that scripts read one line and people still see the text.
fn print_summary(json: bool, text: &str, json_line: &str) {
    if json {
        eprint!("{text}");
        println!("{json_line}");
    } else {
        print!("{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &str) -> Result<Args, String> {
        let argv = std::iter::once("loadgen").chain(flags.split_whitespace());
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        args.validate()?;
        Ok(args)
    }

    #[test]
    fn each_pair_once_counts_every_pair() {
        let many = "--scenario many-apps --apps 1000 --good-ips 14 --bad-ips 2 --each-pair-once";
        let parsed = args(many).unwrap();
        assert_eq!(parsed.count(), Some(16_000));
        assert_eq!(parsed.order(), Order::EachPair { times: 1 });
        // A duration bounds the run in time, but the count stays every pair.
        let timed = args(&format!("{many} --duration 5")).unwrap();
        assert_eq!(timed.count(), Some(16_000));
        assert_eq!(
            args(&format!("{many} --count 10")).unwrap().count(),
            Some(10)
        );
        assert!(args(&format!("{many} --count 16001"))
            .unwrap_err()
            .contains("at most 16000"));
        assert!(args("--each-pair-once")
            .unwrap_err()
            .contains("belongs to --scenario many-apps"));
        assert_eq!(args("--scenario many-apps").unwrap().order(), Order::Random);
    }

    #[test]
    fn each_pair_times_counts_every_pass() {
        let many = "--scenario many-apps --apps 1000 --good-ips 14 --bad-ips 2";
        for (flags, count, times) in [
            ("--each-pair-times 3", 48_000, 3),
            ("--each-pair-times 1", 16_000, 1),
            ("--each-pair-times 3 --duration 5", 48_000, 3),
            ("--each-pair-times 3 --count 20000", 20_000, 3),
            ("--each-pair-times 3 --count 48000", 48_000, 3),
        ] {
            let parsed = args(&format!("{many} {flags}")).unwrap();
            assert_eq!(parsed.count(), Some(count), "{flags}");
            assert_eq!(parsed.order(), Order::EachPair { times }, "{flags}");
        }
        for (flags, error) in [
            ("--each-pair-times 3 --count 48001", "at most 48000"),
            ("--each-pair-times 0", "0 is not in 1.."),
            (
                "--each-pair-times 2 --each-pair-once",
                "cannot be used with",
            ),
        ] {
            let got = args(&format!("{many} {flags}")).unwrap_err();
            assert!(got.contains(error), "{flags}: {got}");
        }
        assert!(args("--each-pair-times 2")
            .unwrap_err()
            .contains("--each-pair-times belongs to --scenario many-apps"));
    }

    #[test]
    fn one_good_ip_makes_each_app_one_pair() {
        let parsed =
            args("--scenario many-apps --apps 500 --good-ips 1 --bad-ips 0 --each-pair-once")
                .unwrap();
        assert_eq!(parsed.count(), Some(500));
        assert!(args("--scenario many-apps --good-ips 0").is_err());
    }

    #[test]
    fn send_only_takes_no_queries() {
        assert!(args("--send-only --rate 0 --sockets 64 --count 10").is_ok());
        assert!(args("--send-only --query-every-ms 2").is_err());
        assert_eq!(args("--query-every-ms 2").unwrap().query_every_ms, Some(2));
        assert!(args("--query-every-ms 0").is_err());
    }
}

//! Starting and stopping: graceful shutdown with the latency report, and operator mistakes
//! that must end in one clear line and a non-zero exit.

use std::net::{TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use crate::support::{self, run_to_exit, send_events, Reference, Server};

#[test]
fn graceful_shutdown_drains_and_prints_the_histograms() {
    let server = Server::start(&["--workers", "2"]);
    let reference = Reference::new(3);
    send_events(server.udp, &reference.events, 2_000, 2, 3);
    server.answer(&reference.apps[0]);
    server.reset();
    let exit = server.stop();
    assert!(
        exit.status.success(),
        "exit {:?}: {}",
        exit.status,
        exit.stderr
    );
    assert!(
        exit.stdout
            .contains("totals: received 2000, ingested 2000, kernel drops 0"),
        "{}",
        exit.stdout
    );
    assert!(exit.stdout.contains("invalid: empty 0"), "{}", exit.stdout);
    let header = exit
        .stdout
        .lines()
        .find(|l| l.starts_with("latency"))
        .expect("a table header");
    for column in ["p50", "p90", "p99", "p99.9", "max", "count"] {
        assert!(
            header.split_whitespace().any(|c| c == column),
            "no {column} in {header}"
        );
    }
    for row in ["ingest", "batch", "query", "reset"] {
        let line = exit
            .stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no {row} row"));
        let count: u64 = line.split_whitespace().last().unwrap().parse().unwrap();
        assert!(count >= 1, "{row} histogram is empty: {line}");
    }
}

/// Seconds from a duration of the shutdown report: `450ns`, `12.3us`, `1.2ms`, `1.20s`.
fn report_seconds(text: &str) -> f64 {
    let units = [("ns", 1e-9), ("us", 1e-6), ("ms", 1e-3), ("s", 1.0)];
    let (digits, scale) = units
        .iter()
        .find_map(|&(unit, scale)| text.strip_suffix(unit).map(|digits| (digits, scale)))
        .unwrap_or_else(|| panic!("no unit in {text:?}"));
    digits.parse::<f64>().expect("a number") * scale
}

/// Waits until every thread of `pid` is stopped: SIGSTOP takes effect asynchronously.
fn wait_until_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the server's tasks");
        let stopped = tasks.flatten().all(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        });
        if stopped {
            return;
        }
        assert!(Instant::now() < deadline, "the server did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_queue_held_while_the_server_is_stopped_shows_in_the_ingest_latency() {
    // The worker samples only a batch that starts long enough after its last sample, which
    // the first batch after a 300 ms stop always does: its datagrams must show as 300 ms or
    // more.
    let server = Server::start(&["--workers", "1"]);
    let reference = Reference::new(5);
    let wait_for = |events| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.metric("ipevents_events_ingested_total") < events {
            assert!(Instant::now() < deadline, "{events} events never arrived");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Traffic first, so that the held batch does not come first by chance.
    send_events(server.udp, &reference.events, 300, 2, 5);
    wait_for(300);
    server.signal("STOP");
    wait_until_stopped(server.pid());
    // Fewer than a batch: one batch when the worker wakes.
    send_events(server.udp, &reference.events, 60, 2, 6);
    std::thread::sleep(Duration::from_millis(300));
    server.signal("CONT");
    wait_for(360);
    let exit = server.stop();
    let row = exit
        .stdout
        .lines()
        .find(|l| l.starts_with("ingest"))
        .unwrap_or_else(|| panic!("no ingest row: {}", exit.stdout));
    // latency p50 p90 p99 p99.9 max count
    let max = row.split_whitespace().nth(5).expect("a max column");
    assert!(report_seconds(max) >= 0.3, "ingest max {max}: {row}");
}

#[test]
fn operator_mistakes_get_one_line_and_a_failing_exit() {
    let udp_taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let http_taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = udp_taken.local_addr().unwrap().to_string();
    let http = http_taken.local_addr().unwrap().to_string();
    // A state path that is not a file (a directory), and one whose directory does not exist.
    let state_dir =
        std::env::temp_dir().join(format!("ipevents-it-{}-unreadable", std::process::id()));
    std::fs::create_dir_all(&state_dir).unwrap();
    let unreadable = state_dir.to_str().unwrap().to_owned();
    let nowhere = state_dir.join("missing/state").to_str().unwrap().to_owned();
    let loopback = ["--udp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--no-pin"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            [&loopback[..], &["--state", &unreadable]].concat(),
            "it is a directory, not a regular file",
        ),
        (
            [&loopback[..], &["--state", &nowhere]].concat(),
            "cannot write beside it",
        ),
        (
            vec!["--udp", &udp, "--http", "127.0.0.1:0", "--no-pin"],
            "bind udp",
        ),
        (
            vec!["--udp", "127.0.0.1:0", "--http", &http, "--no-pin"],
            "bind http",
        ),
        (
            vec!["--udp", "192.0.2.1:0", "--http", "127.0.0.1:0", "--no-pin"],
            "bind udp 192.0.2.1:0",
        ),
        (
            vec![
                "--workers",
                "1000",
                "--udp",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
            ],
            "--no-pin",
        ),
        (vec!["--workers", "x"], "invalid value"),
        (vec!["--bogus"], "unexpected argument"),
        (vec!["--steering", "round-robin"], "invalid value"),
    ];
    for (args, message) in cases {
        let exit = run_to_exit(&args);
        assert!(!exit.status.success(), "{args:?} should fail");
        assert!(exit.stderr.contains(message), "{args:?}: {}", exit.stderr);
        assert_eq!(exit.stderr.lines().count(), 1, "{args:?}: {}", exit.stderr);
        // A command line the parser refuses is a usage error (2); the others, 1.
        let usage = ["invalid value", "unexpected argument"].contains(&message);
        assert_eq!(
            exit.status.code(),
            Some(if usage { 2 } else { 1 }),
            "{args:?}"
        );
        assert!(
            !exit.stderr.contains("panicked"),
            "{args:?}: {}",
            exit.stderr
        );
    }
    let _ = std::fs::remove_dir_all(&state_dir);
    // A second server on a port the first one holds is refused, not let into its group.
    let first = Server::start(&[]);
    let exit = run_to_exit(&[
        "--udp",
        &first.udp.to_string(),
        "--http",
        "127.0.0.1:0",
        "--no-pin",
    ]);
    assert!(!exit.status.success());
    assert!(
        exit.stderr
            .to_lowercase()
            .contains("address already in use"),
        "{}",
        exit.stderr
    );
    assert_eq!(exit.stderr.lines().count(), 1, "{}", exit.stderr);
}

/// A worker that panics takes the server down with a line naming it, so that a supervisor
/// restarts the whole server instead of it answering with part of the data.
#[test]
fn a_failed_worker_stops_the_server_with_its_reason() {
    let server = Server::start_with_env(
        &["--workers", "2"],
        &[("FAILPOINTS", "worker::handle=panic(injected fault)")],
    );
    // The query reaches every worker; worker 1 panics on it. The answer, if any, is a 503.
    let query = format!(
        "GET /events/{} HTTP/1.1\r\nConnection: close\r\n\r\n",
        "ab".repeat(32)
    );
    let reply = support::try_send_raw(server.http, query.as_bytes()).map(|r| r.status);
    assert!(matches!(reply, Ok(503) | Err(_)), "{reply:?}");
    let exit = server.wait_exit();
    assert_eq!(exit.status.code(), Some(1), "{}", exit.stderr);
    let last = exit.stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("worker 1 failed: injected fault"),
        "{}",
        exit.stderr
    );
    assert!(last.contains("supervisor"), "{last}");
}

/// Logs go through levels (RUST_LOG, `info` by default), and the libraries' own records,
/// tiny_http's among them, show with the library's name.
#[test]
fn logs_have_levels_and_show_the_libraries_records() {
    let quiet = Server::start(&[]);
    let startup = quiet.startup_log.clone();
    let exit = quiet.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    let all = format!("{startup}{}", exit.stderr);
    assert!(!all.contains("tiny_http"), "debug records at info: {all}");
    assert!(all.contains("ipevents: stopping"), "{all}");

    let chatty = Server::start_with_env(&[], &[("RUST_LOG", "debug")]);
    assert!(
        chatty
            .startup_log
            .contains("ipevents: tiny_http: Server listening on"),
        "{}",
        chatty.startup_log
    );
    let exit = chatty.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
}

/// When stderr is the journal (JOURNAL_STREAM names it), each line starts with its syslog
/// priority for journald; when the variable names another stream, lines stay as they are.
#[test]
fn log_lines_carry_syslog_priorities_for_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp = taken.local_addr().unwrap().to_string();
    let path = std::env::temp_dir().join(format!("ipevents-it-{}-journal", std::process::id()));
    for journal in [true, false] {
        let file = std::fs::File::create(&path).unwrap();
        let meta = file.metadata().unwrap();
        let stream = if journal {
            format!("{}:{}", meta.dev(), meta.ino())
        } else {
            format!("{}:{}", meta.dev(), meta.ino() + 1)
        };
        let status = support::server_command()
            .args(["--udp", &udp, "--http", "127.0.0.1:0", "--no-pin"])
            .env("JOURNAL_STREAM", &stream)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(1));
        let logged = std::fs::read_to_string(&path).unwrap();
        let want = if journal {
            "<3>error: bind udp"
        } else {
            "ipevents: error: bind udp"
        };
        assert!(logged.starts_with(want), "{journal}: {logged}");
        assert_eq!(logged.lines().count(), 1, "{logged}");
    }
    let _ = std::fs::remove_file(&path);
}

/// Every flag is explained in --help, with the variable that sets it from the environment.
#[test]
fn help_explains_every_flag() {
    use clap::CommandFactory;
    let exit = run_to_exit(&["--help"]);
    assert!(exit.status.success());
    let help = exit.stdout;
    let command = ipevents::config::Config::command();
    let mut flags = Vec::new();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" || long == "version" {
            continue;
        }
        let flag = format!("--{long}");
        let env = format!("IPEVENTS_{}", long.replace('-', "_").to_uppercase());
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "--help lacks {flag}"
        );
        assert!(arg.get_help().is_some(), "{flag} has no help text");
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some(env.as_str()),
            "{flag} cannot be set from the environment"
        );
        // A variable whose value may hold a password is named without its value.
        assert!(
            help.contains(&format!("[env: {env}=]")) || help.contains(&format!("[env: {env}]")),
            "--help lacks {env}"
        );
        flags.push(flag);
    }
    // The list above comes from the parser; this one says which flags must exist.
    for flag in [
        "--udp",
        "--http",
        "--workers",
        "--steering",
        "--no-pin",
        "--rcvbuf",
        "--batch",
        "--max-apps",
        "--max-ips-per-app",
        "--admin-token-file",
        "--state",
        "--snapshot-interval",
        "--discard-bad-state",
        "--http-max-connections",
        "--http-timeout-ms",
        "--reply-timeout-ms",
    ] {
        assert!(flags.iter().any(|f| f == flag), "no {flag} in {flags:?}");
    }
    for variable in ["IPEVENTS_ADMIN_TOKEN ", "RUST_LOG", "NOTIFY_SOCKET"] {
        assert!(help.contains(variable), "--help lacks {variable}");
    }
}

/// Every flag can come from the environment; the command line wins.
#[test]
fn flags_come_from_the_environment() {
    let env = [
        ("IPEVENTS_UDP", "127.0.0.1:0"),
        ("IPEVENTS_HTTP", "127.0.0.1:0"),
        ("IPEVENTS_NO_PIN", "true"),
        ("IPEVENTS_WORKERS", "2"),
        ("IPEVENTS_STEERING", "hash"),
        ("IPEVENTS_BATCH", "16"),
        ("IPEVENTS_MAX_IPS_PER_APP", "1"),
    ];
    let server = Server::start_exactly(&["--batch", "8"], &env);
    assert!(server.udp.ip().is_loopback() && server.http.ip().is_loopback());
    assert!(
        server.listening.contains("workers=2 steering=hash")
            && server.listening.contains("batch=8"),
        "{}",
        server.listening
    );
    let sha = "ab".repeat(32);
    for ip in [1, 2, 3] {
        let body = ipevents::wire::encode(&sha, ip);
        let headers = [("Content-Type", "application/octet-stream")];
        assert_eq!(
            server.request("POST", "/events", &headers, &body).status,
            204
        );
    }
    // POSTed events go to the workers in turn, so one worker saw two IPs: with
    // --max-ips-per-app 1 from the environment it stored only one of them.
    let answer = server.answer(&sha);
    assert_eq!(answer["count"], 3);
    assert_eq!(answer["ips_truncated"], true, "{answer}");
    let exit = server.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
}

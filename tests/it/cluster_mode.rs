//! Cluster mode, black-box: several real ipevents nodes sharing a real Redis Cluster of
//! redis-server processes on loopback. Each test owns its cluster and its nodes, and uses its
//! own key prefix.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use crate::redis_cluster::{self, RedisCluster, Shape};
use crate::support::{
    check_reference_answer, labelled_metric, run_to_exit_with_env, send_events, wait_until,
    Reference, Sent, Server,
};

/// Flushes in the tests come fast, so that waits are short.
const FLUSH_MS: u64 = 50;

/// Starts a node on `cluster` with key prefix `prefix`, two workers and `extra` flags.
fn node(cluster: &RedisCluster, prefix: &str, extra: &[&str]) -> Server {
    let seeds = cluster.seeds();
    let flush = FLUSH_MS.to_string();
    let mut args = vec![
        "--redis-cluster",
        &seeds,
        "--redis-prefix",
        prefix,
        "--workers",
        "2",
    ];
    if !extra.contains(&"--reply-timeout-ms") {
        args.extend(["--reply-timeout-ms", "1000"]);
    }
    if !extra.contains(&"--flush-interval-ms") {
        args.extend(["--flush-interval-ms", &flush]);
    }
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn count(server: &Server, sha: &str) -> u64 {
    server.answer(sha)["count"].as_u64().expect("a count")
}

/// Waits until `server` counts `want` for `sha`; a 503 (the store is still recovering)
/// means not yet.
#[track_caller]
fn wait_for_count(server: &Server, sha: &str, want: u64) {
    let deadline = Instant::now() + crate::support::DEADLINE;
    loop {
        let response = server.request(
            "GET",
            &format!("/events/{sha}"),
            &[("Accept", "application/json")],
            b"",
        );
        let counted = response.status == 200
            && serde_json::from_slice::<serde_json::Value>(&response.body)
                .is_ok_and(|answer| answer["count"] == want);
        if counted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no count {want} for {sha}; the last answer: {} {}",
            response.status,
            response.text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// What two senders sent, added up per app.
fn combine(parts: &[&BTreeMap<usize, Sent>]) -> BTreeMap<usize, Sent> {
    let mut total: BTreeMap<usize, Sent> = BTreeMap::new();
    for part in parts {
        for (app, sent) in *part {
            let entry = total.entry(*app).or_default();
            entry.count += sent.count;
            entry.ips.extend(sent.ips.iter().copied());
        }
    }
    total
}

/// Sends `counts` (to `a`, to `b`) events of the reference traffic from two sockets each, and
/// waits until both nodes count everything sent; returns what was sent, per app.
fn send_to_both(
    reference: &Reference,
    (a, b): (&Server, &Server),
    counts: (usize, usize),
    seed: u64,
) -> BTreeMap<usize, Sent> {
    let sent_a = send_events(a.udp, &reference.events, counts.0, 2, seed);
    let sent_b = send_events(b.udp, &reference.events, counts.1, 2, seed + 1);
    let total = combine(&[&sent_a, &sent_b]);
    for (app, sent) in &total {
        wait_for_count(a, &reference.apps[*app], sent.count);
        wait_for_count(b, &reference.apps[*app], sent.count);
    }
    total
}

fn post(server: &Server, sha: &str, ip: u32) {
    let response = server.request(
        "POST",
        "/events",
        &[("Content-Type", "application/octet-stream")],
        &ipevents::wire::encode(sha, ip.into()),
    );
    assert_eq!(response.status, 204, "{}", response.text());
}

fn delete(server: &Server, path: &str) {
    let response = server.request("DELETE", path, &[], b"");
    assert_eq!(response.status, 204, "DELETE {path}: {}", response.text());
}

#[test]
fn split_traffic_is_exact_on_every_node() {
    let Some(cluster) = RedisCluster::start("split_traffic", Shape::THREE_PRIMARIES) else {
        return;
    };
    let a = node(&cluster, "split", &[]);
    let b = node(&cluster, "split", &[]);
    let reference = Reference::new(11);
    let sent_a = send_events(a.udp, &reference.events, 3000, 4, 1);
    let sent_b = send_events(b.udp, &reference.events, 2000, 4, 2);
    let total = combine(&[&sent_a, &sent_b]);
    for server in [&a, &b] {
        for (app, sent) in &total {
            let sha = &reference.apps[*app];
            wait_for_count(server, sha, sent.count);
            check_reference_answer(&reference, sent, &server.answer(sha));
        }
    }
    let metrics = a.get("/metrics").text();
    assert_eq!(crate::support::metric(&metrics, "ipevents_store_up"), 1);
    assert!(crate::support::metric(&metrics, "ipevents_store_flushes_total") > 0);
    check_with_promtool(&metrics);
    assert!(crate::support::metric(&metrics, "ipevents_store_pairs_flushed_total") > 0);
    assert_eq!(a.get("/healthz").status, 200);
    let exit = a.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(exit.stdout.contains("store rtt"), "{}", exit.stdout);
}

#[test]
fn a_node_answers_its_own_events_at_once_while_flushes_run() {
    let Some(cluster) = RedisCluster::start("read_your_writes", Shape::THREE_PRIMARIES) else {
        return;
    };
    // Flushes every 10 ms, so that many queries meet a flush in flight.
    let a = node(&cluster, "ryw", &["--flush-interval-ms", "10"]);
    let reference = Reference::new(12);
    let mut total: BTreeMap<usize, Sent> = BTreeMap::new();
    for round in 0..40 {
        let sent = send_events(a.udp, &reference.events, 200, 2, 100 + round);
        total = combine(&[&total, &sent]);
        for (app, sent) in &total {
            let answer = a.answer(&reference.apps[*app]);
            assert_eq!(answer["count"], sent.count, "round {round}, app {app}");
        }
    }
    assert!(crate::support::metric(&a.get("/metrics").text(), "ipevents_store_flushes_total") > 0);
    // Another node sees the same, from the store alone.
    let b = node(&cluster, "ryw", &[]);
    for (app, sent) in &total {
        wait_for_count(&b, &reference.apps[*app], sent.count);
    }
}

#[test]
fn an_event_posted_to_one_node_reaches_the_others() {
    let Some(cluster) = RedisCluster::start("post_across", Shape::THREE_PRIMARIES) else {
        return;
    };
    let a = node(&cluster, "post", &[]);
    let b = node(&cluster, "post", &[]);
    let sha = "ab".repeat(32);
    post(&a, &sha, 0x0a00_0001);
    assert_eq!(
        count(&a, &sha),
        1,
        "read-your-writes on the node that took it"
    );
    wait_for_count(&b, &sha, 1);
    post(&b, &sha, 0x0a00_0002);
    wait_for_count(&a, &sha, 2);
    let answer = b.answer(&sha);
    assert_eq!(answer["good_ips"].as_array().unwrap().len(), 14);
    assert_eq!(answer["bad_ips"], serde_json::json!([]));
}

#[test]
fn delete_all_on_one_node_clears_every_node() {
    let Some(cluster) = RedisCluster::start("delete_all", Shape::THREE_PRIMARIES) else {
        return;
    };
    // A reset waits up to --reply-timeout-ms for the other node's acknowledgement: give a
    // loaded machine room.
    let a = node(&cluster, "delall", &["--reply-timeout-ms", "10000"]);
    let b = node(&cluster, "delall", &["--reply-timeout-ms", "10000"]);
    let reference = Reference::new(13);
    send_to_both(&reference, (&a, &b), (1000, 1000), 1);
    let old_keys = |cluster: &RedisCluster| -> usize {
        cluster
            .nodes
            .iter()
            .filter_map(|node| {
                redis_cluster::cli(node.port, &["--scan", "--pattern", "delall:e0:*"])
            })
            .map(|keys| keys.lines().count())
            .sum()
    };
    assert!(old_keys(&cluster) > 0, "the first epoch's keys are there");
    delete(&a, "/events");
    // Every live node applied the reset before the 204, so what is sent right after it
    // counts, on the other node too (sent to first), and nothing from before is left.
    let again = send_to_both(&reference, (&b, &a), (400, 300), 3);
    for (app, sent) in &again {
        check_reference_answer(&reference, sent, &b.answer(&reference.apps[*app]));
    }
    // The old epoch's keys are deleted in the background.
    wait_until("the old epoch's keys to be swept", || {
        old_keys(&cluster) == 0
    });
    let metrics = a.get("/metrics").text();
    assert_eq!(
        crate::support::metric(&metrics, "ipevents_store_unacknowledged_resets_total"),
        0
    );
}

#[test]
fn delete_one_app_on_one_node_clears_it_on_every_node() {
    let Some(cluster) = RedisCluster::start("delete_app", Shape::THREE_PRIMARIES) else {
        return;
    };
    let a = node(&cluster, "delapp", &["--reply-timeout-ms", "10000"]);
    let b = node(&cluster, "delapp", &["--reply-timeout-ms", "10000"]);
    let reference = Reference::new(14);
    let total = send_to_both(&reference, (&a, &b), (1000, 1000), 1);
    let gone = &reference.apps[0];
    delete(&b, &format!("/events/{gone}"));
    // Events right after the reset count, on both nodes (every live node applied the reset
    // before the 204), and nothing from before returns; the other apps keep their counts.
    post(&a, gone, reference.block_base + 1);
    post(&b, gone, reference.block_base + 2);
    for app in [1, 2] {
        assert_eq!(count(&a, &reference.apps[app]), total[&app].count);
    }
    wait_for_count(&a, gone, 2);
    wait_for_count(&b, gone, 2);
    thread::sleep(Duration::from_millis(4 * FLUSH_MS));
    assert_eq!(count(&a, gone), 2);
    assert_eq!(count(&b, gone), 2);
}

#[test]
fn prefixes_keep_deployments_apart() {
    let Some(cluster) = RedisCluster::start("prefixes", Shape::THREE_PRIMARIES) else {
        return;
    };
    let blue = node(&cluster, "blue", &[]);
    let green = node(&cluster, "green", &[]);
    let sha = "cd".repeat(32);
    for _ in 0..3 {
        post(&blue, &sha, 0x0a00_0001);
    }
    post(&green, &sha, 0x0a00_0001);
    let blue_again = node(&cluster, "blue", &[]);
    wait_for_count(&blue_again, &sha, 3);
    let green_again = node(&cluster, "green", &[]);
    wait_for_count(&green_again, &sha, 1);
    delete(&blue, "/events");
    assert_eq!(count(&blue_again, &sha), 0);
    thread::sleep(Duration::from_millis(4 * FLUSH_MS));
    assert_eq!(count(&green_again, &sha), 1);
    assert_eq!(count(&green, &sha), 1);
}

/// The exact answer an outage must come back to: every event sent to `a` counted once.
fn check_outage(
    cluster: &mut RedisCluster,
    stop: impl FnOnce(&mut RedisCluster, usize),
    resume: impl FnOnce(&mut RedisCluster, usize),
    shape: &str,
) {
    let reference = Reference::new(15);
    let sha = reference.apps[0].clone();
    let a = node(cluster, shape, &[]);
    let before = send_events(a.udp, &reference.events, 900, 2, 1);
    // Once a second node sees it, the first batch is in the store.
    let watcher = node(cluster, shape, &[]);
    wait_for_count(&watcher, &sha, before[&0].count);
    let primary = cluster.primary_of(&sha);
    stop(cluster, primary);
    let during = send_events(a.udp, &reference.events, 900, 2, 2);
    // A query that needs the stopped primary fails with 503 and names the store, in time.
    let started = Instant::now();
    let response = a.request(
        "GET",
        &format!("/events/{sha}"),
        &[("Accept", "application/json")],
        b"",
    );
    let waited = started.elapsed();
    assert_eq!(response.status, 503, "{}", response.text());
    assert!(
        response.text().contains("store unavailable"),
        "{}",
        response.text()
    );
    assert!(
        waited < Duration::from_millis(1000 + 2000),
        "a query waited {waited:?} with --reply-timeout-ms 1000"
    );
    wait_until("/healthz to say the store is unavailable", || {
        let health = a.get("/healthz");
        health.status == 503 && health.text().contains("store unavailable")
    });
    // The outage lasts until a flush has failed on it at least once.
    wait_until("a failed flush", || {
        crate::support::metric(
            &a.get("/metrics").text(),
            "ipevents_store_flush_errors_total",
        ) > 0
    });
    // Ingest goes on.
    let ingested =
        crate::support::metric(&a.get("/metrics").text(), "ipevents_events_ingested_total");
    assert_eq!(ingested, 1800);
    resume(cluster, primary);
    let total = combine(&[&before, &during]);
    wait_for_count(&watcher, &sha, total[&0].count);
    wait_for_count(&a, &sha, total[&0].count);
    check_reference_answer(&reference, &total[&0], &a.answer(&sha));
    // Retried flushes were applied once: the count stays put over more flushes.
    thread::sleep(Duration::from_millis(6 * FLUSH_MS));
    for app in 0..3 {
        assert_eq!(
            count(&watcher, &reference.apps[app]),
            total[&app].count,
            "app {app}"
        );
    }
    assert_eq!(a.get("/healthz").status, 200);
    let metrics = a.get("/metrics").text();
    assert_eq!(crate::support::metric(&metrics, "ipevents_store_up"), 1);
    if shape == "stopped" {
        // A stopped primary still takes the flushes into its socket, and applies them when it
        // resumes, after the node gave up on them: the retries then found them applied. So
        // the idempotent path really ran, and the exact counts above show it counted once.
        assert!(
            crate::support::metric(&metrics, "ipevents_store_duplicate_apps_total") > 0,
            "no retried flush was found applied already"
        );
    }
}

#[test]
fn a_stopped_primary_delays_flushes_but_loses_and_doubles_nothing() {
    let Some(mut cluster) = RedisCluster::start("stopped_primary", Shape::THREE_PRIMARIES) else {
        return;
    };
    check_outage(
        &mut cluster,
        |cluster, primary| cluster.signal(primary, "STOP"),
        |cluster, primary| cluster.signal(primary, "CONT"),
        "stopped",
    );
}

#[test]
fn a_killed_primary_that_comes_back_loses_and_doubles_nothing() {
    let shape = Shape {
        durable: true,
        ..Shape::THREE_PRIMARIES
    };
    let Some(mut cluster) = RedisCluster::start("killed_primary", shape) else {
        return;
    };
    check_outage(
        &mut cluster,
        |cluster, primary| cluster.kill(primary),
        |cluster, primary| {
            cluster.restart(primary);
            cluster.wait_healthy();
        },
        "killed",
    );
}

#[test]
fn with_the_store_down_pending_deltas_stay_within_max_pending_pairs() {
    let Some(cluster) = RedisCluster::start("backlog", Shape::THREE_PRIMARIES) else {
        return;
    };
    let a = node(&cluster, "backlog", &["--max-pending-pairs", "100"]);
    for index in 0..cluster.nodes.len() {
        cluster.signal(index, "STOP");
    }
    // 50 apps with 10 IPs each, every pair once: 500 pairs against room for 100.
    let shas: Vec<String> = (0..50u8).map(|i| format!("{i:02x}").repeat(32)).collect();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(a.udp).unwrap();
    for sha in &shas {
        for ip in 0..10u32 {
            let datagram = ipevents::wire::encode(sha, (0x0a00_0000 + ip).into());
            crate::support::send_datagram(&socket, &datagram);
        }
    }
    let mut dropped = 0;
    wait_until("backlog drops", || {
        let metrics = a.get("/metrics").text();
        dropped = labelled_metric(
            &metrics,
            "ipevents_events_dropped_total",
            "cause=\"store_backlog\"",
        )
        .unwrap_or(0);
        let ingested = crate::support::metric(&metrics, "ipevents_events_ingested_total");
        ingested == 500 && dropped > 0 && {
            // Everything the workers took is pending or dropped, nothing is in a worker.
            let pending = crate::support::metric(&metrics, "ipevents_store_pending_pairs");
            pending + dropped == 500
        }
    });
    let pending = crate::support::metric(&a.get("/metrics").text(), "ipevents_store_pending_pairs");
    assert!(pending <= 100, "{pending} pending pairs");
    assert_eq!(a.get("/healthz").status, 503);
    for index in 0..cluster.nodes.len() {
        cluster.signal(index, "CONT");
    }
    let watcher = node(&cluster, "backlog", &[]);
    wait_until("the kept deltas in the store", || {
        shas.iter().map(|sha| count(&watcher, sha)).sum::<u64>() == 500 - dropped
    });
    for sha in &shas {
        assert!(count(&watcher, sha) <= 10);
    }
}

#[test]
fn the_ip_cap_holds_in_the_store() {
    let Some(cluster) = RedisCluster::start("ip_cap", Shape::THREE_PRIMARIES) else {
        return;
    };
    let a = node(&cluster, "ipcap", &["--max-ips-per-app", "5"]);
    let b = node(&cluster, "ipcap", &["--max-ips-per-app", "5"]);
    let sha = "ef".repeat(32);
    for ip in 0..8u32 {
        post(&a, &sha, 0x0a00_0000 + ip);
        post(&b, &sha, 0x0b00_0000 + ip);
    }
    for server in [&a, &b] {
        wait_for_count(server, &sha, 16);
        let answer = server.answer(&sha);
        let listed = answer["good_ips"].as_array().unwrap().len()
            + answer["bad_ips"].as_array().unwrap().len();
        assert!(listed <= 5 + 14, "{answer}");
        let seen: BTreeSet<String> = answer["bad_ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ip| ip.as_str().unwrap().to_owned())
            .collect();
        assert!(seen.len() <= 5, "{answer}");
        assert_eq!(answer["ips_truncated"], true);
    }
}

#[test]
fn a_failover_to_a_replica_keeps_the_counts() {
    let shape = Shape {
        primaries: 3,
        replicas_per_primary: 1,
        durable: false,
    };
    let Some(mut cluster) = RedisCluster::start("failover", shape) else {
        return;
    };
    let reference = Reference::new(16);
    let sha = reference.apps[0].clone();
    let a = node(&cluster, "failover", &[]);
    let watcher = node(&cluster, "failover", &[]);
    let before = send_events(a.udp, &reference.events, 900, 2, 1);
    wait_for_count(&watcher, &sha, before[&0].count);
    let primary = cluster.primary_of(&sha);
    cluster.kill(primary);
    let during = send_events(a.udp, &reference.events, 900, 2, 2);
    // The replica takes over after --cluster-node-timeout (1 s here) and the vote.
    wait_until("a replica to take over", || {
        cluster
            .try_primary_of(&sha)
            .is_some_and(|now| now != primary)
    });
    cluster.wait_healthy();
    let after = send_events(a.udp, &reference.events, 900, 2, 3);
    let total = combine(&[&before, &during, &after]);
    for (app, sent) in &total {
        wait_for_count(&watcher, &reference.apps[*app], sent.count);
        wait_for_count(&a, &reference.apps[*app], sent.count);
    }
}

#[test]
fn a_node_killed_and_restarted_with_its_id_counts_nothing_twice() {
    let Some(cluster) = RedisCluster::start("node_kill", Shape::THREE_PRIMARIES) else {
        return;
    };
    let reference = Reference::new(17);
    let sha = reference.apps[1].clone();
    let a = node(&cluster, "nodekill", &["--node-id", "edge-1"]);
    let watcher = node(&cluster, "nodekill", &[]);
    let first = send_events(a.udp, &reference.events, 900, 2, 1);
    wait_for_count(&watcher, &sha, first[&1].count);
    let second = send_events(a.udp, &reference.events, 900, 2, 2);
    a.signal("KILL");
    let _ = a.wait_exit();
    let restarted = node(&cluster, "nodekill", &["--node-id", "edge-1"]);
    // What the killed node had not flushed is lost; nothing else is, and nothing doubles.
    let both = combine(&[&first, &second]);
    thread::sleep(Duration::from_millis(6 * FLUSH_MS));
    let kept = count(&watcher, &sha);
    assert!(
        (first[&1].count..=both[&1].count).contains(&kept),
        "kept {kept} of {} flushed and {} sent",
        first[&1].count,
        both[&1].count
    );
    let third = send_events(restarted.udp, &reference.events, 900, 2, 3);
    wait_for_count(&watcher, &sha, kept + third[&1].count);
    wait_for_count(&restarted, &sha, kept + third[&1].count);
    thread::sleep(Duration::from_millis(6 * FLUSH_MS));
    assert_eq!(count(&watcher, &sha), kept + third[&1].count);
}

#[test]
fn sigterm_flushes_everything_pending() {
    let Some(cluster) = RedisCluster::start("sigterm_flush", Shape::THREE_PRIMARIES) else {
        return;
    };
    let reference = Reference::new(18);
    // No flush before the stop: everything is pending when SIGTERM arrives.
    let a = node(&cluster, "term", &["--flush-interval-ms", "60000"]);
    let sent = send_events(a.udp, &reference.events, 3000, 4, 1);
    let watcher = node(&cluster, "term", &[]);
    assert_eq!(count(&watcher, &reference.apps[0]), 0);
    let exit = a.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(
        exit.stderr.contains("flushed every pending delta"),
        "{}",
        exit.stderr
    );
    for (app, sent) in &sent {
        let answer = watcher.answer(&reference.apps[*app]);
        check_reference_answer(&reference, sent, &answer);
    }
}

/// Runs `promtool check metrics` (Debian's prometheus package) on cluster mode's `/metrics`;
/// CI installs it, and without it the check prints one line and is skipped.
fn check_with_promtool(metrics: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        println!("promtool check skipped: install the prometheus package to run it");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A port with nothing listening on it.
fn closed_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

fn start_error(args: &[&str]) -> String {
    start_error_with_env(args, &[])
}

fn start_error_with_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["--udp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--no-pin"];
    all.extend_from_slice(args);
    let started = Instant::now();
    let exit = run_to_exit_with_env(&all, env);
    assert_eq!(exit.status.code(), Some(1), "{}", exit.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let lines: Vec<&str> = exit.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {}", exit.stderr);
    lines[0].to_owned()
}

#[test]
fn start_up_mistakes_in_cluster_mode_get_one_line() {
    let port = closed_port();
    let seed = format!("redis://:hunter2@127.0.0.1:{port}");
    let line = start_error_with_env(&[], &[("IPEVENTS_REDIS_CLUSTER", &seed)]);
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(
        !line.contains("hunter2"),
        "the password is never printed: {line}"
    );
    // On the command line the password would be in the process list for every user to read.
    let line = start_error(&["--redis-cluster", &seed]);
    assert!(line.contains("process list"), "{line}");
    assert!(!line.contains("hunter2"), "{line}");
    let help = run_to_exit_with_env(&["--help"], &[("IPEVENTS_REDIS_CLUSTER", &seed)]);
    assert!(help.status.success());
    assert!(
        !help.stdout.contains("hunter2"),
        "--help shows no value of IPEVENTS_REDIS_CLUSTER"
    );
    let line = start_error(&["--redis-cluster", "http://127.0.0.1:1"]);
    assert!(line.contains("is not redis://HOST:PORT"), "{line}");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let line = start_error(&[
        "--redis-cluster",
        &format!("redis://127.0.0.1:{port}"),
        "--state",
        state.to_str().unwrap(),
    ]);
    assert!(line.contains("--state and --redis-cluster"), "{line}");
    let line = start_error(&[
        "--redis-cluster",
        &format!("redis://127.0.0.1:{port}"),
        "--redis-prefix",
        "a{b}",
    ]);
    assert!(line.contains("--redis-prefix"), "{line}");
}

/// A seed that takes the connection and never answers (a stopped process, a black hole behind
/// a load balancer): the start-up check gives up within its bound, with one line.
#[test]
fn a_seed_that_never_answers_is_refused_at_start() {
    // The kernel completes the handshake for the listener's backlog; nobody reads.
    let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = silent.local_addr().unwrap().port();
    let line = start_error(&[
        "--redis-cluster",
        &format!("redis://127.0.0.1:{port}"),
        "--reply-timeout-ms",
        "1000",
    ]);
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    drop(silent);
}

#[test]
fn a_redis_that_is_not_a_whole_cluster_is_refused_at_start() {
    if !redis_cluster::available("not_a_cluster") {
        return;
    }
    // A lone cluster-enabled node with no slots: reachable, but cluster_state:fail.
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let _lone = redis_cluster::Process(
        std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
            ])
            .arg("--cluster-config-file")
            .arg(dir.path().join("nodes.conf"))
            .arg("--dir")
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server"),
    );
    wait_until("the lone node to answer", || {
        redis_cluster::cli(port, &["PING"]).is_some_and(|out| out.trim() == "PONG")
    });
    let line = start_error(&["--redis-cluster", &format!("redis://127.0.0.1:{port}")]);
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(line.contains("cluster_state:fail"), "{line}");
}

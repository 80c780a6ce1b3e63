//! Adaptive steering, the default: each app on one worker, except hot apps, which the server
//! finds in its own traffic and spreads over every worker; exact counts wherever a datagram
//! lands, and while the set of hot apps changes.

use std::net::UdpSocket;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{self, labelled_metric, Server, DEADLINE};

/// Datagrams sent between two looks at the server.
const ROUND: usize = 10_000;

/// Connected sockets that send to `server`.
fn senders(server: &Server, count: usize) -> Vec<UdpSocket> {
    (0..count)
        .map(|_| {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.connect(server.udp).unwrap();
            socket
        })
        .collect()
}

/// A sha whose steering key (its first 8 hex digits) is its own: `n` in every digit group.
fn sha(n: u32) -> String {
    format!("{n:08x}").repeat(8)
}

/// Datagrams each worker has read, from `/metrics`.
fn received_per_worker(server: &Server) -> [u64; 2] {
    let text = server.get("/metrics").text();
    ["0", "1"].map(|worker| {
        labelled_metric(
            &text,
            "ipevents_datagrams_received_total",
            &format!("worker=\"{worker}\""),
        )
        .unwrap()
    })
}

/// Sends `count` datagrams of `sha` (IPs cycling through 10.0.0.1 to 10.0.0.8) from `socket`,
/// then queries it, which reads every worker's socket empty; returns how many datagrams each
/// worker read meanwhile. Checks that the answer counts every event sent so far.
#[track_caller]
fn send_and_check(server: &Server, socket: &UdpSocket, sha: &str, count: usize, sent: &mut u64) {
    for i in 0..count {
        let ip = 0x0a00_0001 + (i % 8) as i64;
        support::send_datagram(socket, &ipevents::wire::encode(sha, ip));
    }
    *sent += count as u64;
    assert_eq!(server.answer(sha)["count"], *sent, "count of {sha}");
}

/// How many datagrams each worker read while `send` ran (it must end with a query, so that
/// every datagram it sent has been read).
fn landed(server: &Server, send: impl FnOnce()) -> [u64; 2] {
    let before = received_per_worker(server);
    send();
    let after = received_per_worker(server);
    [after[0] - before[0], after[1] - before[1]]
}

/// Polls `/metrics` until `done` holds for the hot-app gauge, calling `traffic` between looks;
/// fails at the deadline.
fn until_hot_apps(server: &Server, done: impl Fn(u64) -> bool, mut traffic: impl FnMut()) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let hot = server.metric("ipevents_steering_hot_apps");
        if done(hot) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{hot} hot apps after {DEADLINE:?}"
        );
        traffic();
    }
}

/// Sends `sha` from `socket`, checking its count after every round, until adaptive steering
/// holds exactly one hot app; returns the events sent.
fn make_hot(server: &Server, socket: &UdpSocket, sha: &str) -> u64 {
    let mut sent = 0;
    until_hot_apps(
        server,
        |hot_apps| hot_apps == 1,
        || send_and_check(server, socket, sha, ROUND, &mut sent),
    );
    sent
}

/// Each app is held by exactly one worker: as many app entries as distinct apps.
#[track_caller]
fn check_each_app_on_one_worker(server: &Server, apps: u64) {
    let text = server.get("/metrics").text();
    let entries = support::metric(&text, "ipevents_app_entries");
    let distinct = support::metric(&text, "ipevents_apps_tracked");
    assert_eq!(
        (entries, distinct),
        (apps, apps),
        "(entries, distinct apps)"
    );
}

#[test]
fn a_hot_app_from_one_socket_is_spread_over_both_workers() {
    let server = Server::start(&["--workers", "2"]);
    assert!(
        server.listening.contains("steering=adaptive"),
        "{}",
        server.listening
    );
    let socket = &senders(&server, 1)[0];
    let hot = sha(0x1234_abcd);
    let mut sent = make_hot(&server, socket, &hot);
    // One connected socket, one app: app steering alone would put all of it on one worker.
    let spread = landed(&server, || {
        send_and_check(&server, socket, &hot, 2_000, &mut sent)
    });
    assert!(spread[0] > 0 && spread[1] > 0, "{spread:?}");
    assert_eq!(spread[0] + spread[1], 2_000);
    // Another app from the same socket still lives on one worker. (100 events are too few to
    // make it hot: the balancer needs 128 samples, one event in 64, in an interval.)
    let cold = sha(0x0000_0042);
    let mut cold_sent = 0;
    let held = landed(&server, || {
        send_and_check(&server, socket, &cold, 100, &mut cold_sent)
    });
    assert!(held.contains(&0) && held.contains(&100), "{held:?}");
    let text = server.get("/metrics").text();
    assert!(support::metric(&text, "ipevents_steering_changes_total") >= 1);
    assert_eq!(
        support::sample(&text, "ipevents_steering_change_failures_total"),
        Some(0)
    );
    assert_eq!(support::metric(&text, "ipevents_kernel_drops_total"), 0);
    assert_eq!(server.answer(&hot)["count"], sent);
    let exit = server.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(
        exit.stderr
            .contains("adaptive steering: 1 hot apps (spread over every worker); added [1234abcd]"),
        "{}",
        exit.stderr
    );
}

#[test]
fn many_apps_are_each_held_by_one_worker() {
    let server = Server::start(&["--workers", "2"]);
    let sockets = senders(&server, 16);
    let apps: Vec<String> = (0..3_000u32)
        .map(|n| sha(n.wrapping_mul(0x9e37_79b9)))
        .collect();
    let events_per_app = 3;
    for round in 0..events_per_app {
        for (i, app) in apps.iter().enumerate() {
            let datagram = ipevents::wire::encode(app, 0x0a00_0001 + round);
            support::send_datagram(&sockets[(i + round as usize) % sockets.len()], &datagram);
        }
    }
    for app in &apps {
        assert_eq!(server.answer(app)["count"], events_per_app, "{app}");
    }
    check_each_app_on_one_worker(&server, apps.len() as u64);
    let text = server.get("/metrics").text();
    assert_eq!(
        support::sample(&text, "ipevents_steering_hot_apps"),
        Some(0)
    );
}

#[test]
fn an_app_turns_hot_then_cools_down_with_exact_counts() {
    let server = Server::start(&["--workers", "2"]);
    let sockets = senders(&server, 8);
    let hot = sha(0xfeed_0001);
    let mut hot_sent = make_hot(&server, &sockets[0], &hot);
    // Now many other apps carry the traffic, and the hot one only 1 event in 50: well below
    // the cool threshold, so it leaves the set after a few intervals. Every round queries it
    // while the set changes.
    let others: Vec<Vec<u8>> = (0..2_000u32)
        .map(|n| ipevents::wire::encode(&sha(0x1000_0000 + n), 0x0a00_0002))
        .collect();
    let mut others_sent = 0usize;
    until_hot_apps(
        &server,
        |hot| hot == 0,
        || {
            for i in 0..ROUND {
                let socket = &sockets[i % sockets.len()];
                if i % 50 == 0 {
                    send_and_check(&server, socket, &hot, 1, &mut hot_sent);
                } else {
                    support::send_datagram(socket, &others[others_sent % others.len()]);
                    others_sent += 1;
                }
            }
        },
    );
    assert!(server.metric("ipevents_steering_changes_total") >= 2);
    // Cool again, the app lives on one worker.
    let held = landed(&server, || {
        send_and_check(&server, &sockets[0], &hot, 100, &mut hot_sent)
    });
    assert!(held.contains(&0) && held.contains(&100), "{held:?}");
    for n in (0..others.len()).step_by(97) {
        let sha = sha(0x1000_0000 + n as u32);
        let want = others_sent / others.len() + usize::from(n < others_sent % others.len());
        assert_eq!(server.answer(&sha)["count"], want, "{sha}");
    }
    assert_eq!(server.metric("ipevents_kernel_drops_total"), 0);
}

/// A set of hot apps survives a stopped server: intervals without samples change nothing.
#[test]
fn the_hot_set_survives_an_idle_server() {
    let server = Server::start(&["--workers", "2"]);
    let socket = &senders(&server, 1)[0];
    let hot = sha(0xabad_cafe);
    let mut sent = make_hot(&server, socket, &hot);
    let changes = server.metric("ipevents_steering_changes_total");
    // Idle for more than the cool intervals (3 s): the server answers queries meanwhile.
    let idle_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < idle_until {
        assert_eq!(server.answer(&hot)["count"], sent);
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.metric("ipevents_steering_hot_apps"), 1);
    assert_eq!(server.metric("ipevents_steering_changes_total"), changes);
    let spread = landed(&server, || {
        send_and_check(&server, socket, &hot, 1_000, &mut sent)
    });
    assert!(spread[0] > 0 && spread[1] > 0, "{spread:?}");
}

/// Other steering modes run no balancer, and show no steering families.
#[test]
fn only_adaptive_steering_with_several_workers_runs_the_balancer() {
    for args in [
        &["--workers", "2", "--steering", "app"][..],
        &["--workers", "1"][..],
    ] {
        let server = Server::start(args);
        let text = server.get("/metrics").text();
        assert!(!text.contains("ipevents_steering_"), "{args:?}");
    }
    let server = Server::start(&["--workers", "2"]);
    let text = server.get("/metrics").text();
    assert_eq!(
        support::sample(&text, "ipevents_steering_hot_apps"),
        Some(0)
    );
    assert!(text.contains("# TYPE ipevents_steering_changes_total counter"));
}

/// An event POSTed over HTTP goes where its app's datagrams go, so that a mix of POSTs and
/// datagrams still stores each app once; counts are exact either way.
#[test]
fn posted_events_go_to_their_apps_worker() {
    let server = Server::start(&["--workers", "2"]);
    let sockets = senders(&server, 4);
    let apps = 40u32;
    for n in 0..apps {
        let datagram = ipevents::wire::encode(&sha(n), 0x0a00_0001);
        support::send_datagram(&sockets[n as usize % sockets.len()], &datagram);
        for ip in [0x0a00_0002u32, 0x0a00_0003] {
            let response = server.request(
                "POST",
                "/events",
                &[("Content-Type", "application/octet-stream")],
                &ipevents::wire::encode(&sha(n), ip.into()),
            );
            assert_eq!(response.status, 204, "{}", response.text());
        }
    }
    for n in 0..apps {
        assert_eq!(server.answer(&sha(n))["count"], 3, "app {n}");
    }
    check_each_app_on_one_worker(&server, u64::from(apps));
}

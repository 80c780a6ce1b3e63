//! UDP ingest: exact counts for the reference traffic under every steering mode, read-your-
//! writes, resets, caps and invalid datagrams.

use std::net::UdpSocket;

use crate::support::{self, labelled_metric, send_events, Reference, Server};

/// The reference client's run: three apps, tens of thousands of events, queried right after
/// the last send with no settling wait, so the counts also prove read-your-writes.
#[test]
fn reference_traffic_is_counted_exactly_under_every_steering() {
    let cases: [(&str, &str, usize); 6] = [
        ("1", "hash", 1),
        ("2", "hash", 16),
        ("2", "cpu", 4),
        ("2", "random", 1),
        ("2", "app", 16),
        ("2", "adaptive", 1),
    ];
    for (seed, (workers, steering, sockets)) in cases.into_iter().enumerate() {
        let server = Server::start(&["--workers", workers, "--steering", steering]);
        let reference = Reference::new(seed as u64);
        let sent = send_events(server.udp, &reference.events, 30_000, sockets, seed as u64);
        for (app, sha) in reference.apps.iter().enumerate() {
            let answer = server.answer(sha);
            support::check_reference_answer(&reference, &sent[&app], &answer);
        }
        let metrics = server.get("/metrics").text();
        assert_eq!(
            support::metric(&metrics, "ipevents_datagrams_received_total"),
            30_000
        );
        assert_eq!(
            support::metric(&metrics, "ipevents_events_ingested_total"),
            30_000
        );
        assert_eq!(support::metric(&metrics, "ipevents_kernel_drops_total"), 0);
        let received = |worker: &str| {
            let label = format!("worker=\"{worker}\"");
            labelled_metric(&metrics, "ipevents_datagrams_received_total", &label).unwrap()
        };
        let tracked = support::metric(&metrics, "ipevents_app_entries");
        match steering {
            // One sender socket still reaches both workers, so each app is on both.
            "random" => {
                assert!(
                    received("0") > 0 && received("1") > 0,
                    "one worker got nothing"
                );
                assert_eq!(tracked, 6);
            }
            // Each app lives on exactly one worker, whichever socket sent it.
            "app" => assert_eq!(tracked, 3),
            // Cold apps on one worker each, hot ones spread over both.
            "adaptive" => assert!((3..=6).contains(&tracked), "{tracked} app entries"),
            _ => {}
        }
    }
}

#[test]
fn reset_clears_everything_including_queued_datagrams() {
    let server = Server::start(&["--workers", "2", "--steering", "random"]);
    let reference = Reference::new(7);
    // Queue datagrams while the server cannot read them, then reset as soon as it resumes.
    server.signal("STOP");
    send_events(server.udp, &reference.events, 5_000, 4, 7);
    server.signal("CONT");
    server.reset();
    // Every queued datagram was read before the reset answered, so none can be counted after.
    assert_eq!(server.metric("ipevents_datagrams_received_total"), 5_000);
    for sha in &reference.apps {
        assert_eq!(
            server.answer(sha),
            serde_json::json!({"count": 0, "good_ips": [], "bad_ips": []})
        );
    }
    assert_eq!(server.metric("ipevents_apps_tracked"), 0);
    // The server counts again from zero.
    let sent = send_events(server.udp, &reference.events, 3_000, 2, 8);
    for (app, sha) in reference.apps.iter().enumerate() {
        support::check_reference_answer(&reference, &sent[&app], &server.answer(sha));
    }
}

#[test]
fn delete_one_app_keeps_the_others() {
    let server = Server::start(&["--workers", "2"]);
    let reference = Reference::new(11);
    let sent = send_events(server.udp, &reference.events, 6_000, 4, 11);
    let response = server.request(
        "DELETE",
        &format!("/events/{}", reference.apps[0]),
        &[],
        b"",
    );
    assert_eq!(response.status, 204);
    assert_eq!(server.answer(&reference.apps[0])["count"], 0);
    for app in 1..3 {
        support::check_reference_answer(
            &reference,
            &sent[&app],
            &server.answer(&reference.apps[app]),
        );
    }
}

#[test]
fn invalid_datagrams_are_counted_by_reason_beside_exact_valid_traffic() {
    let server = Server::start(&["--workers", "2"]);
    let sha = "ab".repeat(32);
    let mut oversized = ipevents::wire::encode(&sha, 1);
    oversized.resize(513, 0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("oversized", oversized),
        ("oversized", vec![0u8; 9000]),
        ("malformed", vec![0xff, 0xff, 0xff]),
        ("malformed", vec![0x0a, 0x7f, b'a']),
        (
            "missing_sha",
            ipevents::wire::encode(&sha, 1)[66..].to_vec(),
        ),
        ("missing_ip", ipevents::wire::encode(&sha, 1)[..66].to_vec()),
        ("bad_sha", ipevents::wire::encode("xyz", 1)),
        ("bad_sha", ipevents::wire::encode(&"g".repeat(64), 1)),
        ("ip_out_of_range", ipevents::wire::encode(&sha, -5)),
        ("ip_out_of_range", ipevents::wire::encode(&sha, 1 << 40)),
    ];
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(server.udp).unwrap();
    let valid = ipevents::wire::encode(&sha, 0x0a00_0001);
    let rounds = 50;
    for _ in 0..rounds {
        for (_, datagram) in &cases {
            support::send_datagram(&socket, datagram);
            support::send_datagram(&socket, &valid);
        }
    }
    let answer = server.answer(&sha);
    assert_eq!(answer["count"], (rounds * cases.len()) as u64);
    assert_eq!(answer["bad_ips"], serde_json::json!([]));
    assert_eq!(answer["good_ips"][0], "10.0.0.1");
    let metrics = server.get("/metrics").text();
    support::check_invalid_counts(&metrics, |reason| {
        (cases.iter().filter(|(r, _)| *r == reason).count() * rounds) as u64
    });
}

#[test]
fn caps_bound_apps_and_ips_and_say_so() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--max-apps",
        "2",
        "--max-ips-per-app",
        "3",
    ]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(server.udp).unwrap();
    let shas: Vec<String> = (1..=3u8).map(|n| format!("{n:02x}").repeat(32)).collect();
    for ip in 1..=5u32 {
        for sha in &shas {
            support::send_datagram(
                &socket,
                &ipevents::wire::encode(sha, (0x0a00_0000 + ip).into()),
            );
        }
    }
    // The first two apps fit; their fourth and fifth IPs are counted but not stored.
    for sha in &shas[..2] {
        let answer = server.answer(sha);
        assert_eq!(answer["count"], 5);
        assert_eq!(answer["ips_truncated"], true);
        assert_eq!(answer["good_ips"][0], "10.0.0.1");
    }
    // The third app arrived past --max-apps: dropped, and counted as dropped.
    assert_eq!(
        server.answer(&shas[2]),
        serde_json::json!({"count": 0, "good_ips": [], "bad_ips": []})
    );
    let metrics = server.get("/metrics").text();
    assert_eq!(
        labelled_metric(
            &metrics,
            "ipevents_events_dropped_total",
            "cause=\"max_apps\""
        ),
        Some(5)
    );
    assert_eq!(
        support::metric(&metrics, "ipevents_ips_not_stored_total"),
        4
    );
    assert_eq!(support::metric(&metrics, "ipevents_apps_tracked"), 2);
    // A reset gives the app budget back.
    server.reset();
    support::send_datagram(&socket, &ipevents::wire::encode(&shas[2], 1));
    assert_eq!(server.answer(&shas[2])["count"], 1);
}

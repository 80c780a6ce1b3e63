//! Issue 11, hardening round two: slow readers, spoofed-app floods, signals, the state path,
//! HTTP edge cases, resets under CPU contention, and the receive buffer's warnings. Each test
//! reproduces what the issue found, against the real binary on loopback.

use std::net::UdpSocket;

use crate::support::{self, labelled_metric, Server};

/// Issue 11, item 2: `--max-apps 100`, two workers, random steering: app A once, 5,000
/// made-up shas, then A 100 times. A is tracked, so none of its events may be dropped,
/// whichever worker the kernel steers them to.
#[test]
fn a_spoofed_app_flood_does_not_drop_a_tracked_apps_events() {
    let server = Server::start(&["--workers", "2", "--max-apps", "100"]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(server.udp).unwrap();
    let victim = "a1".repeat(32);
    let event = ipevents::wire::encode(&victim, 0x0a00_0001);
    support::send_datagram(&socket, &event);
    // A is tracked before the flood: the query reads every worker's socket empty.
    assert_eq!(server.answer(&victim)["count"], 1);
    for n in 0..5_000u32 {
        let spoofed = format!("{n:08x}").repeat(8);
        support::send_datagram(&socket, &ipevents::wire::encode(&spoofed, 1));
    }
    for _ in 0..100 {
        support::send_datagram(&socket, &event);
    }
    assert_eq!(server.answer(&victim)["count"], 101);
    let metrics = server.get("/metrics").text();
    assert_eq!(support::metric(&metrics, "ipevents_kernel_drops_total"), 0);
    assert_eq!(support::metric(&metrics, "ipevents_apps_tracked"), 100);
    assert_eq!(
        labelled_metric(
            &metrics,
            "ipevents_events_dropped_total",
            "cause=\"max_apps\""
        ),
        Some(5_000 - 99)
    );
}

//! Work stealing: a worker whose socket is empty reads batches from a busy worker's socket.
//! One worker is flooded (each batch of its own made to spin for 1 ms, so that it takes at
//! most 64,000 datagrams a second) while the other has nothing; the answers stay exact, and
//! under `app` steering the stolen events go back to the app's own worker, so that stealing
//! adds no app entry.

use std::net::UdpSocket;
use std::thread;
use std::time::Duration;

use crate::support::{self, labelled_metric, sample, Server};

/// Datagrams of the flood: at 1 ms a batch the flooded worker alone takes 160 ms for them.
const FLOOD: usize = 10_000;

/// Sends `FLOOD` datagrams of `sha` from one socket (one flow, so `hash` steering too puts
/// them all on one worker), 100 at a time with a 1 ms pause: about 100,000 a second, beyond
/// what the slowed worker takes alone.
fn flood(server: &Server, sha: &str) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(server.udp).unwrap();
    for i in 0..FLOOD {
        let ip = 0x0a00_0001 + (i % 14) as i64;
        support::send_datagram(&socket, &ipevents::wire::encode(sha, ip));
        if i % 100 == 99 {
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A family's sample for each of two workers.
fn per_worker(text: &str, name: &str) -> [u64; 2] {
    ["0", "1"].map(|worker| {
        labelled_metric(text, name, &format!("worker=\"{worker}\""))
            .unwrap_or_else(|| panic!("no {name} for worker {worker}"))
    })
}

#[test]
fn an_idle_worker_steals_from_a_flooded_one_and_every_answer_stays_exact() {
    // (steering, work stealing on, stolen events go back to the app's worker)
    let cases = [
        ("hash", true, false),
        ("app", true, true),
        ("app", false, false),
    ];
    for (steering, stealing, hands_back) in cases {
        let mut args = vec!["--workers", "2", "--steering", steering];
        if !stealing {
            args.push("--no-work-stealing");
        }
        let server = Server::start_with_env(&args, &[("FAILPOINTS", "worker::batch=delay(1)")]);
        let sha = "5e".repeat(32);
        flood(&server, &sha);
        let case = format!("--steering {steering}, stealing {stealing}");
        // The query drains both sockets first; a datagram the kernel dropped would show here.
        assert_eq!(server.answer(&sha)["count"], FLOOD as u64, "{case}");
        let text = server.get("/metrics").text();
        assert_eq!(
            sample(&text, "ipevents_kernel_drops_total"),
            Some(0),
            "{case}"
        );
        // Every datagram landed on one worker's socket, whoever read it.
        let received = per_worker(&text, "ipevents_datagrams_received_total");
        assert_eq!(
            received.iter().sum::<u64>(),
            FLOOD as u64,
            "{case}: {received:?}"
        );
        assert!(received.contains(&0), "{case}: {received:?}");
        let stolen = per_worker(&text, "ipevents_datagrams_stolen_total");
        let handed_back = per_worker(&text, "ipevents_events_handed_back_total");
        if stealing {
            // The idle worker stole, and only it: from the flooded one's socket.
            let idle = received.iter().position(|&n| n == 0).unwrap();
            assert!(stolen[idle] > 0, "{case}: stolen {stolen:?}");
            assert_eq!(stolen[1 - idle], 0, "{case}: stolen {stolen:?}");
        } else {
            assert_eq!(stolen, [0, 0], "{case}");
        }
        if hands_back {
            // It did not hold the app, so every stolen event went back: one entry.
            assert_eq!(
                handed_back.iter().sum::<u64>(),
                stolen.iter().sum::<u64>(),
                "{case}"
            );
            assert_eq!(support::metric(&text, "ipevents_app_entries"), 1, "{case}");
        } else {
            assert_eq!(handed_back, [0, 0], "{case}");
        }
        // A reset forgets what either worker counted, and the next flood counts from zero.
        server.reset();
        assert_eq!(server.answer(&sha)["count"], 0, "{case}");
        flood(&server, &sha);
        assert_eq!(server.answer(&sha)["count"], FLOOD as u64, "{case}");
    }
}

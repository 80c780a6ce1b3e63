//! Restarts lose nothing: the state file written at shutdown and every snapshot interval,
//! and refused when it is bad.

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{self, run_to_exit, send_events, Reference, Server, DEADLINE};

/// A fresh directory for one test's state file, removed when dropped.
pub struct StateDir(pub PathBuf);

impl StateDir {
    pub fn new(name: &str) -> StateDir {
        let dir = std::env::temp_dir().join(format!("ipevents-it-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        StateDir(dir)
    }

    pub fn file(&self) -> String {
        self.0.join("state").to_str().unwrap().to_owned()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn answers(server: &Server, reference: &Reference) -> Vec<serde_json::Value> {
    reference
        .apps
        .iter()
        .map(|sha| server.answer(sha))
        .collect()
}

#[test]
fn graceful_restart_keeps_exact_answers() {
    let dir = StateDir::new("graceful");
    let state = dir.file();
    let reference = Reference::new(21);
    let server = Server::start(&["--workers", "2", "--state", &state]);
    let sent = send_events(server.udp, &reference.events, 20_000, 4, 21);
    let before = answers(&server, &reference);
    support::check_reference_answer(&reference, &sent[&0], &before[0]);
    let exit = server.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(exit.stderr.contains("wrote 3 apps"), "{}", exit.stderr);

    // A different worker count reads the same file: the file holds merged apps.
    let server = Server::start(&["--workers", "1", "--state", &state]);
    assert_eq!(answers(&server, &reference), before);
    // And the counts go on from there.
    let more = send_events(server.udp, &reference.events, 1_000, 1, 22);
    let count = before[0]["count"].as_u64().unwrap() + more[&0].count;
    assert_eq!(server.answer(&reference.apps[0])["count"], count);
}

#[test]
fn kill_after_a_snapshot_keeps_the_snapshot() {
    let dir = StateDir::new("kill");
    let state = dir.file();
    let reference = Reference::new(31);
    let server = Server::start(&[
        "--workers",
        "2",
        "--state",
        &state,
        "--snapshot-interval",
        "1",
    ]);
    send_events(server.udp, &reference.events, 10_000, 4, 31);
    let before = answers(&server, &reference);
    // Wait for a snapshot that began after the answers above: two more than now.
    let snapshots_then = server.metric("ipevents_snapshots_total");
    let deadline = Instant::now() + DEADLINE;
    while server.metric("ipevents_snapshots_total") < snapshots_then + 2 {
        assert!(Instant::now() < deadline, "no snapshot within {DEADLINE:?}");
        thread::sleep(Duration::from_millis(50));
    }
    server.signal("KILL");
    let exit = server.wait_exit();
    assert!(!exit.status.success());

    let server = Server::start(&["--workers", "2", "--state", &state]);
    assert_eq!(answers(&server, &reference), before);
}

#[test]
fn a_bad_state_file_is_refused_unless_told_to_set_it_aside() {
    let dir = StateDir::new("bad");
    let state = dir.file();
    // A good file to damage.
    let server = Server::start(&["--workers", "1", "--state", &state]);
    send_events(server.udp, &Reference::new(41).events, 500, 1, 41);
    assert!(server.stop().status.success());
    let good = fs::read(&state).unwrap();

    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let mut wrong_version = good.clone();
    wrong_version[8] = 99;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("corrupt", flipped, "checksum"),
        ("truncated", good[..good.len() - 7].to_vec(), "truncated"),
        ("wrong version", wrong_version, "version 99"),
        (
            "not a state file",
            b"{\"count\": 3}".to_vec(),
            "not an ipevents state file",
        ),
    ];
    for (name, bytes, reason) in cases {
        fs::write(&state, &bytes).unwrap();
        let exit = run_to_exit(&[
            "--udp",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--no-pin",
            "--state",
            &state,
        ]);
        assert!(!exit.status.success(), "{name}: started anyway");
        assert!(exit.stderr.contains(reason), "{name}: {}", exit.stderr);
        assert!(
            exit.stderr.contains("--discard-bad-state"),
            "{name}: {}",
            exit.stderr
        );
        assert_eq!(exit.stderr.lines().count(), 1, "{name}: {}", exit.stderr);
        assert_eq!(
            fs::read(&state).unwrap(),
            bytes,
            "{name}: the refused file was changed"
        );

        let server = Server::start(&["--workers", "1", "--state", &state, "--discard-bad-state"]);
        assert_eq!(server.answer(&"ab".repeat(32))["count"], 0);
        drop(server);
        assert!(
            !PathBuf::from(&state).exists(),
            "{name}: the bad file is still in place"
        );
        let aside: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_str().unwrap().contains(".bad-"))
            .collect();
        assert_eq!(aside.len(), 1, "{name}: {aside:?}");
        assert_eq!(
            fs::read(&aside[0]).unwrap(),
            bytes,
            "{name}: the kept file differs"
        );
        fs::remove_file(&aside[0]).unwrap();
    }
}

/// Under adaptive steering (the default) each restored app goes to the worker its datagrams
/// reach, so that a restart does not leave two entries of every app; and a state of many
/// apps, written a shard at a time, reads back whole.
#[test]
fn restored_apps_live_where_their_datagrams_land() {
    let dir = StateDir::new("home");
    let state = dir.file();
    let apps = 2_000u32;
    let sha = |n: u32| format!("{:08x}", n.wrapping_mul(0x9e37_79b9)).repeat(8);
    let send_round = |server: &Server, round: u32| {
        let sockets: Vec<std::net::UdpSocket> = (0..8)
            .map(|_| {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                socket.connect(server.udp).unwrap();
                socket
            })
            .collect();
        for n in 0..apps {
            let datagram = ipevents::wire::encode(&sha(n), i64::from(0x0a00_0001 + round));
            support::send_datagram(&sockets[n as usize % sockets.len()], &datagram);
        }
        server.answer(&sha(0));
    };
    let entries = |server: &Server| {
        let metrics = server.get("/metrics").text();
        (
            support::metric(&metrics, "ipevents_apps_tracked"),
            support::metric(&metrics, "ipevents_app_entries"),
        )
    };
    let server = Server::start(&["--workers", "2", "--state", &state]);
    send_round(&server, 0);
    send_round(&server, 1);
    assert_eq!(entries(&server), (u64::from(apps), u64::from(apps)));
    let exit = server.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(
        exit.stderr.contains(&format!("wrote {apps} apps")),
        "{}",
        exit.stderr
    );

    let server = Server::start(&["--workers", "2", "--state", &state]);
    assert_eq!(entries(&server), (u64::from(apps), u64::from(apps)));
    send_round(&server, 2);
    assert_eq!(entries(&server), (u64::from(apps), u64::from(apps)));
    for n in (0..apps).step_by(97) {
        assert_eq!(server.answer(&sha(n))["count"], 3, "app {n}");
    }
}

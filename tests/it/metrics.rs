//! `/metrics` follows the Prometheus conventions: build info, the standard process families,
//! each socket's granted receive buffer, the time of the last snapshot, and a README entry for
//! every family. (`.ci/run` also runs `promtool check metrics` against a live server.)

use std::thread;
use std::time::{Duration, Instant};

use crate::support::{self, send_events, Reference, Server, DEADLINE};

/// The value of the one sample of `name` (no labels), as a float.
fn gauge(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_follow_the_conventions_and_the_readme_lists_every_family() {
    let dir = std::env::temp_dir().join(format!("ipevents-it-{}-metrics", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state");
    let server = Server::start(&[
        "--workers",
        "2",
        "--state",
        state.to_str().unwrap(),
        "--snapshot-interval",
        "1",
    ]);
    send_events(server.udp, &Reference::new(5).events, 1_000, 2, 5);
    server.answer(&Reference::new(5).apps[0]);
    let deadline = Instant::now() + DEADLINE;
    while server.metric("ipevents_snapshots_total") < 1 {
        assert!(Instant::now() < deadline, "no snapshot within {DEADLINE:?}");
        thread::sleep(Duration::from_millis(50));
    }
    let text = server.get("/metrics").text();

    let version = env!("CARGO_PKG_VERSION");
    assert!(
        text.lines().any(|line| line.starts_with(&format!(
            "ipevents_build_info{{version=\"{version}\",rustc=\""
        )) && line.ends_with("} 1")),
        "{text}"
    );
    // The buffer each socket was granted, as the start-up line reports it.
    let granted = support::field(&server.listening, "rcvbuf_bytes=");
    for worker in 0..2 {
        let label = format!("worker=\"{worker}\"");
        let value = support::labelled_metric(&text, "ipevents_socket_receive_buffer_bytes", &label);
        assert_eq!(value.map(|v| v.to_string()).as_deref(), Some(granted));
    }
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let snapshot_s = gauge(&text, "ipevents_snapshot_last_success_timestamp_seconds");
    let started_s = gauge(&text, "process_start_time_seconds");
    assert!(
        started_s > 1e9 && started_s <= now_s + 1.0,
        "{started_s} {now_s}"
    );
    assert!(
        snapshot_s + 1.0 >= started_s && snapshot_s <= now_s + 1.0,
        "{snapshot_s}"
    );
    assert!(gauge(&text, "process_resident_memory_bytes") > 1e6);
    assert!(gauge(&text, "process_cpu_seconds_total") >= 0.0);
    let open_fds = gauge(&text, "process_open_fds");
    assert!(open_fds >= 3.0 && gauge(&text, "process_max_fds") >= open_fds);

    // Every family has HELP and TYPE, and the README's table names it.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let families: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    assert!(families.len() > 25, "{families:?}");
    for family in &families {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} has no HELP"
        );
        assert!(
            readme.contains(&format!("`{family}`")),
            "the README's metrics table lacks {family}"
        );
    }
    let exit = server.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}

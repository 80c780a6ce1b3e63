//! Running under systemd: the `Type=notify` protocol against a real NOTIFY_SOCKET, and the
//! unit file in `tools/systemd/` (CI also runs `systemd-analyze verify` on it).

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use crate::support::{Server, DEADLINE};

/// A NOTIFY_SOCKET of the test's own: a Unix datagram socket, as systemd binds one.
struct NotifySocket {
    dir: PathBuf,
    socket: UnixDatagram,
}

impl NotifySocket {
    fn bind(name: &str) -> NotifySocket {
        let dir = std::env::temp_dir().join(format!("ipevents-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = UnixDatagram::bind(dir.join("notify")).unwrap();
        socket.set_read_timeout(Some(DEADLINE)).unwrap();
        NotifySocket { dir, socket }
    }

    fn path(&self) -> String {
        self.dir.join("notify").to_str().unwrap().to_owned()
    }

    /// The next message, as `KEY=VALUE` lines.
    fn next(&self) -> Vec<String> {
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .expect("a notification within the deadline");
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn tells_systemd_ready_then_stopping() {
    let notify = NotifySocket::bind("notify");
    let server = Server::start_with_env(&["--workers", "2"], &[("NOTIFY_SOCKET", &notify.path())]);
    let ready = notify.next();
    assert!(ready.iter().any(|l| l == "READY=1"), "{ready:?}");
    let status = format!("STATUS=listening udp={} http={}", server.udp, server.http);
    assert!(ready.contains(&status), "{ready:?}");
    // READY=1 came once the sockets were bound and the workers ran: both answer now.
    assert_eq!(server.get("/healthz").status, 200);
    assert_eq!(server.answer(&"ab".repeat(32))["count"], 0);

    server.signal("TERM");
    let stopping = notify.next();
    assert_eq!(stopping, ["STOPPING=1"]);
    let exit = server.wait_exit();
    assert!(exit.status.success(), "{}", exit.stderr);
}

#[test]
fn without_notify_socket_nothing_changes() {
    let server = Server::start_with_env(&[], &[]);
    assert_eq!(server.get("/healthz").status, 200);
    let exit = server.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(!exit.stderr.contains("systemd"), "{}", exit.stderr);
}

/// The unit asks for what the README promises; `.ci/run` checks it with systemd-analyze.
#[test]
fn the_unit_file_runs_the_server_as_a_notify_service() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tools/systemd/ipevents.service"
    );
    let unit = std::fs::read_to_string(path).unwrap();
    let settings: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    for want in [
        "Type=notify",
        "ExecStart=/usr/local/bin/ipevents",
        "StateDirectory=ipevents ipevents/tmp",
        "Environment=IPEVENTS_STATE=%S/ipevents/state",
        "Environment=TMPDIR=%S/ipevents/tmp",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "LimitNOFILE=65536",
        "Restart=always",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
    ] {
        assert!(settings.contains(&want), "the unit lacks {want}");
    }
    // Every IPEVENTS_* variable the unit sets is one the server reads.
    use clap::CommandFactory;
    let command = ipevents::config::Config::command();
    for line in &settings {
        let Some(assignment) = line.strip_prefix("Environment=") else {
            continue;
        };
        let name = assignment.split('=').next().unwrap();
        if name.starts_with("IPEVENTS_") {
            assert!(
                command
                    .get_arguments()
                    .any(|arg| arg.get_env().is_some_and(|env| env == name)),
                "the server reads no {name}"
            );
        }
    }
}

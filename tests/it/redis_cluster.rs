//! A real Redis Cluster for the cluster-mode tests: redis-server processes in cluster mode on
//! free loopback ports, joined by `redis-cli --cluster create`, stopped by PID when dropped.
//!
//! The tests need Debian's redis-server package. Without it they print one line naming the
//! package and do nothing, unless IPEVENTS_REQUIRE_REDIS is set (CI sets it), where a missing
//! redis-server fails them.

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};

use crate::support::wait_until;

/// How a test's cluster is made.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub primaries: usize,
    pub replicas_per_primary: usize,
    /// Every write fsynced to an append-only file, so that a killed primary restarts with
    /// everything it acknowledged.
    pub durable: bool,
}

impl Shape {
    pub const THREE_PRIMARIES: Shape = Shape {
        primaries: 3,
        replicas_per_primary: 0,
        durable: false,
    };
}

pub struct RedisNode {
    pub port: u16,
    child: Option<Child>,
}

pub struct RedisCluster {
    pub nodes: Vec<RedisNode>,
    dir: tempfile::TempDir,
    shape: Shape,
}

/// Returns whether redis-server can be used; prints the skip line when it cannot.
pub fn available(test: &str) -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        assert!(
            std::env::var_os("IPEVENTS_REQUIRE_REDIS").is_none(),
            "{test}: redis-server is required (IPEVENTS_REQUIRE_REDIS is set) but not installed"
        );
        println!("{test}: skipped: install the redis-server package to run it");
    }
    found
}

/// A port whose cluster bus port (port + 10000) is free too. Ports come from a range below
/// the kernel's ephemeral ports, in turn within this process, so that parallel tests differ.
fn free_port_pair() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 500) as u16 * 16;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % 2000;
        let port = 20_000 + (base - 20_000 + offset) % 10_000;
        let free = |p: u16| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

impl RedisCluster {
    /// Starts and joins a cluster; `None` when redis-server is missing and not required.
    pub fn start(test: &str, shape: Shape) -> Option<RedisCluster> {
        if !available(test) {
            return None;
        }
        let dir = tempfile::tempdir().expect("a directory for the cluster");
        let count = shape.primaries * (1 + shape.replicas_per_primary);
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
            shape,
        };
        for _ in 0..count {
            let port = free_port_pair();
            let child = cluster.spawn_node(port);
            cluster.nodes.push(RedisNode {
                port,
                child: Some(child),
            });
        }
        for node in &cluster.nodes {
            wait_until(&format!("redis-server on {} to answer", node.port), || {
                cli(node.port, &["PING"]).is_some_and(|out| out.trim() == "PONG")
            });
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output = create
            .args([
                "--cluster-replicas",
                &shape.replicas_per_primary.to_string(),
            ])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        cluster.wait_healthy();
        Some(cluster)
    }

    fn spawn_node(&self, port: u16) -> Child {
        let dir = self.dir.path();
        let (appendonly, fsync) = if self.shape.durable {
            ("yes", "always")
        } else {
            ("no", "no")
        };
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(dir.join(format!("nodes-{port}.conf")))
            .args(["--cluster-node-timeout", "1000"])
            // A replica's first sync starts at once instead of after 5 s.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(dir)
            .args([
                "--save",
                "",
                "--appendonly",
                appendonly,
                "--appendfsync",
                fsync,
            ])
            .args(["--appendfilename", &format!("appendonly-{port}.aof")])
            .args(["--appenddirname", &format!("aof-{port}")])
            .args(["--dbfilename", &format!("dump-{port}.rdb")])
            .arg("--logfile")
            .arg(dir.join(format!("redis-{port}.log")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server")
    }

    /// Waits until every running node says `cluster_state:ok`, every slot has a primary,
    /// and every running replica is in sync with its primary (only then can it take over).
    pub fn wait_healthy(&self) {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            wait_until(&format!("cluster_state:ok on {}", node.port), || {
                cli(node.port, &["CLUSTER", "INFO"]).is_some_and(|info| {
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                })
            });
            wait_until(&format!("replication in sync on {}", node.port), || {
                cli(node.port, &["INFO", "replication"]).is_some_and(|info| {
                    info.contains("role:master") || info.contains("master_link_status:up")
                })
            });
        }
    }

    /// `redis://127.0.0.1:PORT` of every node, comma-separated.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("redis://127.0.0.1:{}", node.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node that is primary for `key`'s slot.
    pub fn primary_of(&self, key: &str) -> usize {
        self.try_primary_of(key)
            .unwrap_or_else(|| panic!("no primary owns the slot of {key}"))
    }

    /// Like [`RedisCluster::primary_of`], `None` while no healthy primary owns the slot.
    pub fn try_primary_of(&self, key: &str) -> Option<usize> {
        let slot = self.live_cli(&["CLUSTER", "KEYSLOT", key]);
        let slot: u16 = slot.trim().parse().expect("a slot number");
        let nodes = self.live_cli(&["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let owns = fields[8..].iter().any(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                match (start.parse::<u16>(), end.parse::<u16>()) {
                    (Ok(start), Ok(end)) => (start..=end).contains(&slot),
                    _ => false,
                }
            });
            if owns {
                let port: u16 = fields[1]
                    .split(['@', ','])
                    .next()
                    .and_then(|addr| addr.rsplit_once(':'))
                    .and_then(|(_, port)| port.parse().ok())
                    .expect("a node address");
                return self.nodes.iter().position(|node| node.port == port);
            }
        }
        None
    }

    /// A command on any running node.
    fn live_cli(&self, args: &[&str]) -> String {
        self.nodes
            .iter()
            .filter(|node| node.child.is_some())
            .find_map(|node| cli(node.port, args))
            .expect("a running node answers")
    }

    pub fn pid(&self, index: usize) -> u32 {
        self.nodes[index].child.as_ref().expect("running").id()
    }

    /// Sends `signal` (STOP, CONT, KILL, ...) to node `index`.
    pub fn signal(&self, index: usize, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid(index).to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal}");
    }

    /// Kills node `index` with SIGKILL and reaps it.
    pub fn kill(&mut self, index: usize) {
        let mut child = self.nodes[index].child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts node `index` again on its port, with its cluster config (and its data, when
    /// durable).
    pub fn restart(&mut self, index: usize) {
        let port = self.nodes[index].port;
        let child = self.spawn_node(port);
        self.nodes[index].child = Some(child);
        wait_until(&format!("redis-server on {port} to answer"), || {
            cli(port, &["PING"]).is_some_and(|out| out.trim() == "PONG")
        });
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                // SIGKILL ends a SIGSTOPped process too.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A process a test started, killed by its PID when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `redis-cli -p PORT ARGS...`; `None` when it fails, or takes more than 2 s (a
/// SIGSTOPped server accepts connections but never answers).
pub fn cli(port: u16, args: &[&str]) -> Option<String> {
    let output = Command::new("timeout")
        .args(["2", "redis-cli", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.success() && !text.starts_with("Could not connect")).then_some(text)
}

//! The command line: every flag, its default and its help text.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::socket::Steering;

/// UDP ingest server for app network telemetry: tells each app's home /28 network from the
/// other addresses it connects to (candidate command-and-control servers).
#[derive(Parser, Debug, Clone)]
#[command(version, about, long_about = None)]
pub struct Config {
    /// UDP address the workers receive IpEvent datagrams on (port 0: any free port).
    #[arg(long, default_value = "0.0.0.0:3001", value_name = "ADDR")]
    pub udp: SocketAddr,

    /// HTTP address of the REST API. The API can erase all data, so it listens on loopback
    /// unless told otherwise (e.g. --http 0.0.0.0:3000).
    #[arg(long, default_value = "127.0.0.1:3000", value_name = "ADDR")]
    pub http: SocketAddr,

    /// Ingest workers, each with its own socket and pinned to its own core
    /// [default: one per available core].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,

    /// How the kernel spreads datagrams over the workers' sockets: `hash` keeps each sender
    /// on one worker (SO_REUSEPORT's flow hash), `cpu` sends a datagram to the worker of the
    /// CPU that received it, `random` picks a worker per datagram, `app` sends each app to
    /// one worker by a hash of the sha it reads from the datagram (classic BPF).
    #[arg(long, value_enum, default_value_t = Steering::Random)]
    pub steering: Steering,

    /// Do not pin workers to cores (for shared machines, or more workers than cores).
    #[arg(long)]
    pub no_pin: bool,

    /// Receive buffer per socket, in bytes. Set with SO_RCVBUFFORCE when the process has
    /// CAP_NET_ADMIN, else with SO_RCVBUF, which the kernel caps at net.core.rmem_max.
    #[arg(long, default_value_t = 16 << 20, value_name = "BYTES")]
    pub rcvbuf: usize,

    /// Datagrams received per recvmmsg call.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub batch: u16,

    /// Apps the server has room for on every worker: the workers together hold at most
    /// this many app entries per worker (an app seen by k workers takes k entries); events
    /// for new apps past it are dropped and counted.
    #[arg(long, default_value_t = 1_000_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_apps: u64,

    /// Distinct IPs a worker stores per app; events for new IPs past it still count, and the
    /// answer says "ips_truncated": true.
    #[arg(long, default_value_t = 4096, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_ips_per_app: u64,

    /// Require `Authorization: Bearer TOKEN` on DELETE and POST (GET stays open). Prefer the
    /// environment variable, which does not show in the process list.
    #[arg(
        long,
        env = "IPEVENTS_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// State file: restored on start, written on SIGTERM/SIGINT and every
    /// --snapshot-interval, so a restart keeps the counts.
    #[arg(long, value_name = "PATH")]
    pub state: Option<std::path::PathBuf>,

    /// Seconds between snapshots to --state while running; a crash loses at most this much.
    #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_interval: u64,

    /// When the state file is corrupt, truncated or of another version, move it aside
    /// (PATH.bad-<time>) and start empty instead of refusing to start.
    #[arg(long)]
    pub discard_bad_state: bool,

    /// Open HTTP connections the server holds; one more is answered 503 and closed.
    #[arg(long, default_value_t = 256, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub http_max_connections: u64,

    /// How long an HTTP client may stay idle between requests, and may take to send one
    /// request, in milliseconds; past it the connection is closed (408 mid-request).
    #[arg(long, default_value_t = 10_000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub http_timeout_ms: u64,

    /// How long an HTTP request waits for the workers (and in cluster mode for the store)
    /// before answering 503, in milliseconds.
    #[arg(long, default_value_t = 2000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub reply_timeout_ms: u64,

    /// Cluster mode: seed nodes of the Redis Cluster that holds the fleet's counts,
    /// `redis://HOST:PORT`, comma-separated. A password goes in the URL
    /// (`redis://:PASSWORD@HOST:PORT`) or, better, in IPEVENTS_REDIS_PASSWORD; it is never
    /// printed. Without this flag the server runs standalone.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    pub redis_cluster: Vec<String>,

    /// Cluster mode: this node's name, unique in the fleet; a restart with the same name
    /// continues without counting anything twice [default: host name and UDP port].
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,

    /// Cluster mode: how often the node writes its deltas to the store, in milliseconds; the
    /// bound on how stale another node's view of this node's events is.
    #[arg(long, default_value_t = 200, value_name = "MS", value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub flush_interval_ms: u64,

    /// Cluster mode: the prefix of every key, so that deployments can share one cluster.
    #[arg(long, default_value = "ipevents", value_name = "PREFIX")]
    pub redis_prefix: String,

    /// Cluster mode: distinct (app, ip) deltas the node keeps unwritten while the store is
    /// unreachable (about 100 bytes each); past it, events are dropped and counted.
    #[arg(long, default_value_t = 4_000_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pending_pairs: u64,
}

impl Config {
    pub fn reply_timeout(&self) -> Duration {
        Duration::from_millis(self.reply_timeout_ms)
    }

    pub fn gate_limits(&self) -> crate::gate::GateLimits {
        let timeout = Duration::from_millis(self.http_timeout_ms);
        crate::gate::GateLimits {
            max_connections: usize::try_from(self.http_max_connections).unwrap_or(usize::MAX),
            idle_timeout: timeout,
            request_timeout: timeout,
            upstream_timeout: self.reply_timeout() + Duration::from_secs(5),
            ..crate::gate::GateLimits::default()
        }
    }

    pub fn snapshot_interval(&self) -> Duration {
        Duration::from_secs(self.snapshot_interval)
    }

    /// Whether the counts live in a Redis Cluster.
    pub fn cluster_mode(&self) -> bool {
        !self.redis_cluster.is_empty()
    }

    /// How to reach the store; `udp_port` is the port the node got, for its default name.
    pub fn store_settings(&self, udp_port: u16) -> crate::redis_store::StoreSettings {
        crate::redis_store::StoreSettings {
            seeds: self.redis_cluster.clone(),
            password: std::env::var("IPEVENTS_REDIS_PASSWORD")
                .ok()
                .filter(|p| !p.is_empty()),
            prefix: self.redis_prefix.clone(),
            node_id: self
                .node_id
                .clone()
                .unwrap_or_else(|| default_node_id(udp_port)),
            // A query drains the workers, then makes one read that may be tried twice (a new
            // connection after a broken one), and must answer within --reply-timeout-ms.
            timeout: self.reply_timeout() / 4,
        }
    }

    pub fn node_settings(&self) -> crate::flusher::NodeSettings {
        crate::flusher::NodeSettings {
            flush_interval: Duration::from_millis(self.flush_interval_ms),
            max_pending_pairs: usize::try_from(self.max_pending_pairs).unwrap_or(usize::MAX),
            max_ips_per_app: usize::try_from(self.max_ips_per_app).unwrap_or(usize::MAX),
            shutdown_flush_limit: Duration::from_secs(10),
        }
    }
}

/// The host name and the UDP port, in the characters a node id may hold.
fn default_node_id(udp_port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let host = if host.is_empty() { "node".into() } else { host };
    format!("{host}-{udp_port}")
}

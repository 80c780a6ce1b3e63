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

    /// Distinct apps the server tracks (an app seen by k workers counts once); events for an
    /// app no worker tracks are dropped and counted past it. A tracked app is never dropped.
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

    /// How long an HTTP client may stay idle between requests, may take to send one request,
    /// and may take to read one answer, in milliseconds; past it the connection is closed
    /// (408 mid-request).
    #[arg(long, default_value_t = 10_000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub http_timeout_ms: u64,

    /// How long an HTTP request waits for the workers before answering 503, in milliseconds.
    #[arg(long, default_value_t = 2000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub reply_timeout_ms: u64,
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
            response_timeout: timeout,
            max_response_bytes: crate::gate::response_bytes_for(
                usize::try_from(self.max_ips_per_app).unwrap_or(usize::MAX),
            ),
            ..crate::gate::GateLimits::default()
        }
    }

    pub fn snapshot_interval(&self) -> Duration {
        Duration::from_secs(self.snapshot_interval)
    }
}

//! The command line: every flag, its default and its help text, and what is derived from
//! them. Every flag can also be set from the environment (`--max-apps` from
//! `IPEVENTS_MAX_APPS`, and so on); the admin token comes only from the environment or a file,
//! never from the command line, where any user could read it in the process list.

use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::Parser;

use crate::gate::GateLimits;
use crate::socket::Steering;
use crate::store::Limits;

const ENVIRONMENT_HELP: &str = "Environment:
  Every flag can be set from the IPEVENTS_* variable shown with it; a flag on the command line
  wins. IPEVENTS_ADMIN_TOKEN holds the admin token itself (or see --admin-token-file).
  IPEVENTS_REDIS_PASSWORD holds the Redis Cluster's password (or see --redis-password-file).
  RUST_LOG sets the log level (error, warn, info, debug, trace; default info).
  NOTIFY_SOCKET (set by systemd for Type=notify) receives READY=1 and STOPPING=1.";

/// The variable that holds the admin token itself.
pub const ADMIN_TOKEN_ENV: &str = "IPEVENTS_ADMIN_TOKEN";

/// The variable that holds the Redis Cluster's password itself.
pub const REDIS_PASSWORD_ENV: &str = "IPEVENTS_REDIS_PASSWORD";

/// UDP ingest server for app network telemetry: tells each app's home /28 network from the
/// other addresses it connects to (candidate command-and-control servers).
#[derive(Parser, Debug, Clone)]
#[command(version, about, long_about = None, after_help = ENVIRONMENT_HELP)]
pub struct Config {
    /// UDP address the workers receive IpEvent datagrams on (port 0: any free port).
    #[arg(
        long,
        env = "IPEVENTS_UDP",
        default_value = "0.0.0.0:3001",
        value_name = "ADDR"
    )]
    pub udp: SocketAddr,

    /// HTTP address of the REST API. The API can erase all data, so it listens on loopback
    /// unless told otherwise (e.g. --http 0.0.0.0:3000).
    #[arg(
        long,
        env = "IPEVENTS_HTTP",
        default_value = "127.0.0.1:3000",
        value_name = "ADDR"
    )]
    pub http: SocketAddr,

    /// Ingest workers, each with its own socket and pinned to its own core
    /// [default: one per available core].
    #[arg(long, env = "IPEVENTS_WORKERS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,

    /// How the kernel spreads datagrams over the workers' sockets: `hash` keeps each sender
    /// on one worker (SO_REUSEPORT's flow hash), `cpu` sends a datagram to the worker of the
    /// CPU that received it, `random` picks a worker per datagram, `app` sends each app to
    /// one worker by a hash of the sha it reads from the datagram (classic BPF), `adaptive`
    /// does as `app` but spreads the few hot apps it finds in the traffic (at most 32) over
    /// every worker at random.
    #[arg(long, env = "IPEVENTS_STEERING", value_enum, default_value_t = Steering::Adaptive)]
    pub steering: Steering,

    /// Do not pin workers to cores (for shared machines, or more workers than cores).
    #[arg(long, env = "IPEVENTS_NO_PIN", value_parser = BoolishValueParser::new())]
    pub no_pin: bool,

    /// Do not let a worker whose socket is empty read batches from a busy worker's socket
    /// (work stealing). Stealing drains a backlog on one socket with every core that has
    /// time; under `app` and `adaptive` steering it adds no app entry (a stolen event whose
    /// app the thief does not hold goes back to the socket's worker).
    #[arg(long, env = "IPEVENTS_NO_WORK_STEALING", value_parser = BoolishValueParser::new())]
    pub no_work_stealing: bool,

    /// Receive buffer per socket, in bytes. Set with SO_RCVBUFFORCE when the process has
    /// CAP_NET_ADMIN, else with SO_RCVBUF, which the kernel caps at net.core.rmem_max.
    #[arg(long, env = "IPEVENTS_RCVBUF", default_value_t = 16 << 20, value_name = "BYTES")]
    pub rcvbuf: usize,

    /// Datagrams received per recvmmsg call.
    #[arg(long, env = "IPEVENTS_BATCH", default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub batch: u16,

    /// Distinct apps the server tracks (an app seen by k workers counts once); events for an
    /// app no worker tracks are dropped and counted past it. A tracked app is never dropped.
    #[arg(long, env = "IPEVENTS_MAX_APPS", default_value_t = 1_000_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_apps: u64,

    /// Distinct IPs a worker stores per app; events for new IPs past it still count, and the
    /// answer says "ips_truncated": true.
    #[arg(long, env = "IPEVENTS_MAX_IPS_PER_APP", default_value_t = 4096, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_ips_per_app: u64,

    /// File holding the admin token: DELETE and POST then require `Authorization: Bearer
    /// TOKEN` (GET stays open). Or set IPEVENTS_ADMIN_TOKEN to the token itself; the token is
    /// never taken from the command line, which every user can read.
    #[arg(long, env = "IPEVENTS_ADMIN_TOKEN_FILE", value_name = "PATH")]
    pub admin_token_file: Option<std::path::PathBuf>,

    /// State file: restored on start, written on SIGTERM/SIGINT and every
    /// --snapshot-interval, so a restart keeps the counts.
    #[arg(long, env = "IPEVENTS_STATE", value_name = "PATH")]
    pub state: Option<std::path::PathBuf>,

    /// Seconds between snapshots to --state while running; a crash loses at most this much.
    #[arg(long, env = "IPEVENTS_SNAPSHOT_INTERVAL", default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_interval: u64,

    /// When the state file is corrupt, truncated or of another version, move it aside
    /// (`PATH.bad-<time>`) and start empty instead of refusing to start.
    #[arg(long, env = "IPEVENTS_DISCARD_BAD_STATE", value_parser = BoolishValueParser::new())]
    pub discard_bad_state: bool,

    /// Open HTTP connections the server holds; one more is answered 503 and closed.
    #[arg(long, env = "IPEVENTS_HTTP_MAX_CONNECTIONS", default_value_t = 256, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub http_max_connections: u64,

    /// How long an HTTP client may stay idle between requests, may take to send one request,
    /// and may take to read one answer, in milliseconds; past it the connection is closed
    /// (408 mid-request).
    #[arg(long, env = "IPEVENTS_HTTP_TIMEOUT_MS", default_value_t = 10_000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub http_timeout_ms: u64,

    /// How long an HTTP request waits for the workers (and in cluster mode for the store)
    /// before answering 503, in milliseconds.
    #[arg(long, env = "IPEVENTS_REPLY_TIMEOUT_MS", default_value_t = 2000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub reply_timeout_ms: u64,

    /// Cluster mode: seed nodes of the Redis Cluster that holds the fleet's counts,
    /// `redis://HOST:PORT`, comma-separated. A password goes in IPEVENTS_REDIS_PASSWORD (or
    /// --redis-password-file), or in a URL (`redis://:PASSWORD@HOST:PORT`) set through
    /// IPEVENTS_REDIS_CLUSTER; on the command line, where the process list shows it, a URL
    /// with a password is refused. It is never printed. Without this flag the server runs
    /// standalone.
    #[arg(
        long,
        env = "IPEVENTS_REDIS_CLUSTER",
        hide_env_values = true,
        value_name = "URL[,URL...]",
        value_delimiter = ','
    )]
    pub redis_cluster: Vec<String>,

    /// Cluster mode: this node's name, unique in the fleet; a restart with the same name
    /// continues without counting anything twice [default: host name and UDP port].
    #[arg(long, env = "IPEVENTS_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// Cluster mode: a file holding the Redis Cluster's password (one line), for every node
    /// whose URL carries none. Or set IPEVENTS_REDIS_PASSWORD to the password itself.
    #[arg(long, env = "IPEVENTS_REDIS_PASSWORD_FILE", value_name = "PATH")]
    pub redis_password_file: Option<std::path::PathBuf>,

    /// Cluster mode: how often the node writes its deltas to the store, in milliseconds; the
    /// bound on how stale another node's view of this node's events is.
    #[arg(long, env = "IPEVENTS_FLUSH_INTERVAL_MS", default_value_t = 200, value_name = "MS", value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub flush_interval_ms: u64,

    /// Cluster mode: the prefix of every key, so that deployments can share one cluster.
    #[arg(
        long,
        env = "IPEVENTS_REDIS_PREFIX",
        default_value = "ipevents",
        value_name = "PREFIX"
    )]
    pub redis_prefix: String,

    /// Cluster mode: distinct (app, ip) deltas the node keeps unwritten while the store is
    /// unreachable (about 100 bytes each); past it, events are dropped and counted.
    #[arg(long, env = "IPEVENTS_MAX_PENDING_PAIRS", default_value_t = 4_000_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pending_pairs: u64,
}

impl Config {
    /// The configuration of this process, from its command line and environment. A malformed
    /// command line ends the process with one line and exit status 2 (`--help` and
    /// `--version` print and exit 0, as clap does); a password
    /// written on the command line is refused with one line, because any user can read it in
    /// the process list.
    pub fn from_process() -> Result<Config, String> {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Config::command()
            .try_get_matches()
            .unwrap_or_else(|e| exit_on(e));
        let config = Config::from_arg_matches(&matches).unwrap_or_else(|e| exit_on(e));
        let on_command_line =
            matches.value_source("redis_cluster") == Some(clap::parser::ValueSource::CommandLine);
        if on_command_line
            && config
                .redis_cluster
                .iter()
                .any(|seed| crate::redis_store::seed_has_password(seed))
        {
            return Err(format!(
                "--redis-cluster: a password on the command line is readable in the process \
                 list; put it in {REDIS_PASSWORD_ENV} or --redis-password-file, or the URL in \
                 IPEVENTS_REDIS_CLUSTER"
            ));
        }
        Ok(config)
    }

    /// The admin token, from IPEVENTS_ADMIN_TOKEN or --admin-token-file; `None` leaves the
    /// API open. Errors name the source, never the token.
    pub fn admin_token(&self) -> Result<Option<String>, String> {
        let from_env = std::env::var_os(ADMIN_TOKEN_ENV);
        let token = match (&self.admin_token_file, from_env) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "both {ADMIN_TOKEN_ENV} and --admin-token-file are set: keep one"
                ))
            }
            (None, Some(value)) => value
                .into_string()
                .map_err(|_| format!("{ADMIN_TOKEN_ENV} is not UTF-8"))?,
            (Some(path), None) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("read the admin token file {}: {e}", path.display()))?;
                // A file written with `echo` ends in a newline that is not part of the token.
                text.trim_end_matches(['\n', '\r']).to_owned()
            }
        };
        if token.trim().is_empty() {
            return Err(
                "the admin token is empty: set one, or unset it to leave the API open".to_owned(),
            );
        }
        Ok(Some(token))
    }

    pub fn reply_timeout(&self) -> Duration {
        Duration::from_millis(self.reply_timeout_ms)
    }

    pub fn gate_limits(&self) -> GateLimits {
        let timeout = Duration::from_millis(self.http_timeout_ms);
        GateLimits {
            max_connections: usize::try_from(self.http_max_connections).unwrap_or(usize::MAX),
            idle_timeout: timeout,
            request_timeout: timeout,
            upstream_timeout: self.reply_timeout() + Duration::from_secs(5),
            response_timeout: timeout,
            max_response_bytes: crate::gate::response_bytes_for(
                usize::try_from(self.max_ips_per_app).unwrap_or(usize::MAX),
            ),
            ..GateLimits::default()
        }
    }

    pub fn snapshot_interval(&self) -> Duration {
        Duration::from_secs(self.snapshot_interval)
    }

    /// How long the snapshot thread waits for the workers' copies of one shard (a snapshot
    /// asks for the 256 shards in turn). Workers copy a shard a slice at a time between
    /// batches, which can take long under full load: they get the interval, and at least a
    /// minute.
    pub fn snapshot_reply_timeout(&self) -> Duration {
        self.snapshot_interval().max(Duration::from_secs(60))
    }

    /// Distinct apps the workers may track together: an app seen by k workers takes one unit
    /// of the budget and k entries.
    pub fn max_apps(&self) -> usize {
        usize::try_from(self.max_apps).unwrap_or(usize::MAX)
    }

    /// What each worker's table may hold per app.
    pub fn store_limits(&self) -> Limits {
        Limits {
            max_ips_per_app: usize::try_from(self.max_ips_per_app).unwrap_or(usize::MAX),
        }
    }

    /// Whether the counts live in a Redis Cluster.
    pub fn cluster_mode(&self) -> bool {
        !self.redis_cluster.is_empty()
    }

    /// The store's password, from IPEVENTS_REDIS_PASSWORD or --redis-password-file; `None`
    /// when neither is set. The error is one line that never contains the password.
    pub fn redis_password(&self) -> Result<Option<String>, String> {
        let from_env = std::env::var_os(REDIS_PASSWORD_ENV);
        match (from_env, &self.redis_password_file) {
            (Some(_), Some(_)) => Err(format!(
                "both {REDIS_PASSWORD_ENV} and --redis-password-file are set: keep one"
            )),
            (Some(password), None) => password
                .into_string()
                .map(Some)
                .map_err(|_| format!("{REDIS_PASSWORD_ENV} is not UTF-8")),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|text| Some(text.trim_end_matches(['\r', '\n']).to_owned()))
                .map_err(|e| format!("--redis-password-file {}: {e}", path.display())),
            (None, None) => Ok(None),
        }
        .map(|password| password.filter(|p| !p.is_empty()))
    }

    /// How to reach the store; `udp_port` is the port the node got, for its default name.
    pub fn store_settings(
        &self,
        udp_port: u16,
    ) -> Result<crate::redis_store::StoreSettings, String> {
        Ok(crate::redis_store::StoreSettings {
            seeds: self.redis_cluster.clone(),
            password: self.redis_password()?,
            prefix: self.redis_prefix.clone(),
            node_id: self
                .node_id
                .clone()
                .unwrap_or_else(|| default_node_id(udp_port)),
            // A query drains the workers, then makes one read that may be tried twice (a new
            // connection after a broken one), and must answer within --reply-timeout-ms.
            timeout: self.reply_timeout() / 4,
        })
    }

    pub fn node_settings(&self) -> crate::flusher::NodeSettings {
        crate::flusher::NodeSettings {
            flush_interval: Duration::from_millis(self.flush_interval_ms),
            max_pending_pairs: usize::try_from(self.max_pending_pairs).unwrap_or(usize::MAX),
            max_ips_per_app: usize::try_from(self.max_ips_per_app).unwrap_or(usize::MAX),
            shutdown_flush_limit: Duration::from_secs(10),
            reset_ack_limit: self.reply_timeout(),
        }
    }
}

/// Ends the process on a command line that clap does not take: `--help` and `--version` as
/// clap prints them, a mistake as one line, clap's own first one, and exit status 2.
fn exit_on(error: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        error.exit();
    }
    let text = error.render().to_string();
    let line = text.lines().next().unwrap_or_default();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    log::error!("{line} (see --help)");
    std::process::exit(2);
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

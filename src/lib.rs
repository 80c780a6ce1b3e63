//! ipevents: a thread-per-core UDP ingest server for app network telemetry.
//!
//! Devices send one protobuf `IpEvent` (app sha256, IPv4 address) per UDP datagram. N workers
//! each own one SO_REUSEPORT socket and one table of apps; one HTTP thread answers per-app
//! queries by asking every worker for its partial answer and merging them. The modules, in
//! reading order:
//!
//! - [`wire`]: the datagram format; parse and validate a datagram into an `Event`.
//! - [`store`]: a worker's app table, partial answers, merge and classification.
//! - [`socket`]: socket set-up, recvmmsg/sendmmsg, steering, kernel counters (all the unsafe).
//! - [`worker`]: the per-core mio loop and the commands it takes.
//! - [`cluster`]: fan-out of commands to the workers, with a bounded wait.
//! - [`gate`]: the public HTTP listener, which bounds connections, time and bytes per client.
//! - [`http`]: the REST API.
//! - [`metrics`]: `/metrics` text and the shutdown report.
//! - [`snapshot`]: the state file that carries the counts across restarts.
//! - [`signals`]: the signals the server catches, and what each means.
//! - [`config`] and [`server`]: the command line and the lifecycle.
#![deny(unsafe_code)]

pub mod cluster;
pub mod config;
pub mod gate;
pub mod http;
pub mod metrics;
pub mod server;
pub mod signals;
pub mod snapshot;
pub mod socket;
pub mod store;
pub mod wire;
pub mod worker;

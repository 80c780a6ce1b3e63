//! ipevents: a thread-per-core UDP ingest server for app network telemetry.
//!
//! Devices send one protobuf `IpEvent` (app sha256, IPv4 address) per UDP datagram. N workers
//! each own one SO_REUSEPORT socket and one table of apps; one HTTP thread answers per-app
//! queries by asking every worker for its partial answer and merging them. The modules, in
//! dependency order:
//!
//! - [`log_limit`]: a repeating log line, let through at most once an interval.
//! - [`wire`]: the datagram format; parse and validate a datagram into an `Event`.
//! - [`keyed_hash`]: the tables' keyed hash, and the shards it splits the apps into.
//! - [`key_cache`]: a worker's cache of recent apps' keys, by their sha's digits as received.
//! - [`ip_set`]: one app's IPs and their counts, in the layout that fits their number.
//! - [`store`]: a worker's app table, partial answers, merge and classification.
//! - [`socket`]: socket set-up, recvmmsg/sendmmsg, steering, kernel counters (all the unsafe).
//! - [`sketch`]: a worker's sample of its traffic by steering key, for adaptive steering.
//! - [`process`]: the process's own figures from /proc, for `/metrics`.
//! - [`backlog`]: work stealing: a worker's socket as its siblings see it, and the rules.
//! - [`worker`]: the per-core mio loop and the commands it takes.
//! - [`cluster`]: fan-out of commands to the workers, with a bounded wait.
//! - [`snapshot`]: the state file that carries the counts across restarts.
//! - [`gate`]: the public HTTP listener, which bounds connections, time and bytes per client.
//! - [`metrics`]: `/metrics` text and the shutdown report, from plain values.
//! - [`balancer`]: adaptive steering's thread: finds the hot apps and re-attaches the program.
//! - [`redis_store`]: cluster mode's shared store: key layout, functions, slot routing.
//! - [`flusher`]: cluster mode's node: unflushed deltas, the flusher thread, store queries.
//! - [`backend`]: where answers come from, standalone or cluster mode; the API's one seam.
//! - [`http`]: the REST API.
//! - [`snapshotter`]: restoring the state file at start, and the thread that writes it.
//! - [`signals`]: the signals the server catches, and what each means.
//! - [`config`]: the command line and the values derived from it.
//! - [`server`]: the lifecycle: wires the parts together and sequences start and stop.
//!
//! The order is strict: each module uses only modules listed above it, so there is no import
//! cycle, and a module that needs something from one below it is handed plain data instead.
//! `tests/it/layout.rs` checks it.
#![deny(unsafe_code)]

/// Declares a fieldless enum from one table of `Variant => "label"` rows, and generates from
/// the same table `ALL` (every variant, in declaration order), `as_str` (the label) and
/// `index` (the position in `ALL`), so that a new variant cannot be left out of a list that
/// must name them all.
macro_rules! labelled_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$variant_meta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order: the order `/metrics` and reports list them.
            pub const ALL: [$name; [$($label),+].len()] = [$($name::$variant),+];

            /// The variant's label in `/metrics` and in error bodies.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }

            /// A dense index into per-variant counter arrays: the variant's place in `ALL`.
            pub const fn index(self) -> usize {
                self as usize
            }
        }
    };
}

pub mod log_limit;
pub mod wire;
pub mod keyed_hash;
pub mod key_cache;
pub mod ip_set;
pub mod store;
pub mod socket;
pub mod sketch;
pub mod process;
pub mod backlog;
pub mod worker;
pub mod cluster;
pub mod snapshot;
pub mod gate;
pub mod metrics;
pub mod balancer;
pub mod redis_store;
pub mod flusher;
pub mod backend;
pub mod http;
pub mod snapshotter;
pub mod signals;
pub mod config;
pub mod server;

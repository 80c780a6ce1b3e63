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
//! - [`config`] and [`server`]: the command line and the lifecycle.
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

pub mod cluster;
pub mod config;
pub mod gate;
pub mod http;
pub mod metrics;
pub mod server;
pub mod snapshot;
pub mod socket;
pub mod store;
pub mod wire;
pub mod worker;

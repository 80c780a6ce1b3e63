//! The `ipevents` binary: sets up logging, parses the command line and runs the server until
//! a signal.

use std::io::Write;
use std::process::ExitCode;

use log::Level;

#[cfg(all(feature = "alloc-mimalloc", feature = "alloc-jemalloc"))]
compile_error!("choose one allocator: alloc-mimalloc or alloc-jemalloc");

#[cfg(feature = "alloc-mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "alloc-jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    init_logging();
    let config = match ipevents::config::Config::from_process() {
        Ok(config) => config,
        Err(message) => {
            log::error!("{message}");
            return ExitCode::FAILURE;
        }
    };
    // Reads FAILPOINTS from the environment in builds with the `failpoints` feature (tests).
    #[cfg(feature = "failpoints")]
    let _fail_scenario = fail::FailScenario::setup();
    match ipevents::server::run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            log::error!("{message}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at the level RUST_LOG asks for (`info` by default), one line per record:
/// `ipevents: warning: ...`. When stderr is the journal, each line starts with its syslog
/// priority instead, which journald reads, and names nothing journald already knows.
/// Records from libraries (tiny_http's, say) name the library.
fn init_logging() {
    let journal = stderr_is_the_journal();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |out, record| {
            let level = record.level();
            if journal {
                let priority = match level {
                    Level::Error => 3,
                    Level::Warn => 4,
                    Level::Info => 6,
                    Level::Debug | Level::Trace => 7,
                };
                write!(out, "<{priority}>")?;
            } else {
                write!(out, "ipevents: ")?;
            }
            match level {
                Level::Error => write!(out, "error: ")?,
                Level::Warn => write!(out, "warning: ")?,
                Level::Info | Level::Debug | Level::Trace => {}
            }
            let target = record.target();
            if target != "ipevents" && !target.starts_with("ipevents::") {
                write!(out, "{target}: ")?;
            }
            writeln!(out, "{}", record.args())
        })
        .init();
}

/// Whether stderr is systemd's journal stream: JOURNAL_STREAM names its device and inode, and
/// a child of the service that writes elsewhere inherits the variable but not the stream.
fn stderr_is_the_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    device.parse() == Ok(stderr.dev()) && inode.parse() == Ok(stderr.ino())
}

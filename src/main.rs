//! The `ipevents` binary: parses the command line and runs the server until a signal.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let config = ipevents::config::Config::parse();
    // Reads FAILPOINTS from the environment in builds with the `failpoints` feature (tests).
    #[cfg(feature = "failpoints")]
    let _fail_scenario = fail::FailScenario::setup();
    match ipevents::server::run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ipevents: {message}");
            ExitCode::FAILURE
        }
    }
}

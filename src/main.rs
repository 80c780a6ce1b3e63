//! The `ipevents` binary: parses the command line and runs the server until a signal.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let config = ipevents::config::Config::parse();
    // RUST_LOG chooses the levels; warnings and notices are on by default.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Reads FAILPOINTS from the environment in builds with the `failpoints` feature (tests).
    let _fail_scenario = fail::FailScenario::setup();
    match ipevents::server::run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ipevents: {message}");
            ExitCode::FAILURE
        }
    }
}

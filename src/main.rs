//! The `ipevents` binary: parses the command line and runs the server until a signal.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let config = ipevents::config::Config::parse();
    match ipevents::server::run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ipevents: {message}");
            ExitCode::FAILURE
        }
    }
}

//! The signals the server handles, and what each one means. Every signal here is caught from
//! the start of `run`, before the state file is read, so that none of them can kill the
//! server with its default action and lose what it holds.
//!
//! This module only names and catches signals; the lifecycle code acts on them.

use std::io;
use std::thread;

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};

/// What the server does on a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalAction {
    /// SIGINT, SIGTERM, SIGQUIT: stop gracefully (drain, write the state file, report).
    Stop,
    /// SIGHUP, SIGUSR1: write the state file now (with `--state`; else say so and go on).
    Snapshot,
    /// SIGUSR2: reserved; say so and go on.
    Ignore,
}

/// Every signal the server catches.
pub const HANDLED: [i32; 6] = [SIGINT, SIGTERM, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2];

/// What `signal` means; `None` for a signal the server does not catch.
pub fn action(signal: i32) -> Option<SignalAction> {
    match signal {
        SIGINT | SIGTERM | SIGQUIT => Some(SignalAction::Stop),
        SIGHUP | SIGUSR1 => Some(SignalAction::Snapshot),
        SIGUSR2 => Some(SignalAction::Ignore),
        _ => None,
    }
}

/// The signal's usual name, for log lines.
pub fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGQUIT => "SIGQUIT",
        SIGHUP => "SIGHUP",
        SIGUSR1 => "SIGUSR1",
        SIGUSR2 => "SIGUSR2",
        _ => "signal",
    }
}

/// The handled signals, caught and queued until someone takes them.
pub struct CaughtSignals(signal_hook::iterator::Signals);

impl CaughtSignals {
    /// Catches every signal in [`HANDLED`] from now on.
    pub fn catch() -> io::Result<CaughtSignals> {
        signal_hook::iterator::Signals::new(HANDLED).map(CaughtSignals)
    }

    /// Calls `handle` on a thread of its own for every signal, those caught so far first.
    pub fn forward(mut self, handle: impl Fn(i32) + Send + 'static) -> io::Result<()> {
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || self.0.forever().for_each(handle))?;
        Ok(())
    }
}

/// Calls `handle` on a thread of its own for every SIGINT and SIGTERM: the stop signals of
/// the tools (the discard receiver), which have no state to keep.
pub fn on_stop_signals(handle: impl Fn(i32) + Send + 'static) -> io::Result<()> {
    signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map(CaughtSignals)?
        .forward(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_handled_signal_has_a_meaning_and_a_name() {
        for signal in HANDLED {
            assert!(action(signal).is_some(), "{signal}");
            assert_ne!(name(signal), "signal");
        }
        assert_eq!(action(SIGQUIT), Some(SignalAction::Stop));
        assert_eq!(action(SIGHUP), Some(SignalAction::Snapshot));
        assert_eq!(action(signal_hook::consts::SIGALRM), None);
    }
}

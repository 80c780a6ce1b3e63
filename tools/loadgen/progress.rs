//! Shows the send phase as it runs: a progress bar with the live rate when stderr is a
//! terminal, a plain line every second otherwise (for logs and CI).
//!
//! It only reads the senders' shared counter; it never slows the senders down.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The live rate is measured over windows of about this long.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// What bounds the run, which decides what the bar measures.
#[derive(Clone, Copy, Debug)]
pub enum Bound {
    /// Datagrams: the bar counts them.
    Count(u64),
    /// Time only: the bar counts milliseconds.
    Duration(Duration),
}

/// The progress display of one send phase.
pub struct ProgressView {
    bar: Option<ProgressBar>,
    bound: Bound,
    started: Instant,
    window_started: Instant,
    window_sent: u64,
    rate_per_s: f64,
}

impl ProgressView {
    pub fn new(bound: Bound) -> ProgressView {
        let bar = std::io::stderr().is_terminal().then(|| new_bar(bound));
        let now = Instant::now();
        ProgressView {
            bar,
            bound,
            started: now,
            window_started: now,
            window_sent: 0,
            rate_per_s: 0.0,
        }
    }

    /// Shows `sent` datagrams so far; call it often, it draws at most about ten times a second
    /// and prints a plain line about once a second.
    pub fn update(&mut self, sent: u64) {
        let now = Instant::now();
        let window = now - self.window_started;
        let window_done = window >= RATE_WINDOW;
        if window_done {
            self.rate_per_s = (sent - self.window_sent) as f64 / window.as_secs_f64();
            self.window_started = now;
            self.window_sent = sent;
        }
        let elapsed = now - self.started;
        match &self.bar {
            Some(bar) => {
                match self.bound {
                    Bound::Count(_) => bar.set_position(sent),
                    Bound::Duration(_) => bar.set_position(elapsed.as_millis() as u64),
                }
                bar.set_message(format!("{sent} sent, {}/s", si(self.rate_per_s)));
            }
            None if window_done => eprintln!(
                "loadgen: {sent} sent in {:.1} s ({}/s now)",
                elapsed.as_secs_f64(),
                si(self.rate_per_s)
            ),
            None => {}
        }
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

fn new_bar(bound: Bound) -> ProgressBar {
    let len = match bound {
        Bound::Count(count) => count,
        Bound::Duration(duration) => duration.as_millis() as u64,
    };
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(10));
    let style =
        ProgressStyle::with_template("[{elapsed_precise}] [{wide_bar}] {percent:>3}% {msg}")
            .expect("the template is valid")
            .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// A rate with an SI suffix: 1234567.0 becomes "1.23M".
pub fn si(value: f64) -> String {
    match value {
        v if v >= 1e9 => format!("{:.2}G", v / 1e9),
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn si_suffixes() {
        for (value, want) in [
            (0.0, "0"),
            (999.0, "999"),
            (1_500.0, "1.5k"),
            (1_234_567.0, "1.23M"),
            (2e9, "2.00G"),
        ] {
            assert_eq!(si(value), want);
        }
    }
}

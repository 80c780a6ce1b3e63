//! A log line that may repeat (a failing `recvmmsg`, `accept`, a store that is down), let
//! through at most once an interval, so that a persistent error cannot flood the log.

use std::time::{Duration, Instant};

/// When a repeating log line last went out, and how often it may.
#[derive(Debug)]
pub struct LogLimit {
    every: Duration,
    last: Option<Instant>,
}

impl LogLimit {
    pub const fn every(every: Duration) -> LogLimit {
        LogLimit { every, last: None }
    }

    /// Whether the line may go out now; if so, the interval starts again.
    pub fn ready(&mut self) -> bool {
        let now = Instant::now();
        let ready = self
            .last
            .is_none_or(|last| now.duration_since(last) >= self.every);
        if ready {
            self.last = Some(now);
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_one_line_through_per_interval() {
        let mut limit = LogLimit::every(Duration::from_secs(3600));
        assert!(limit.ready());
        assert!(!limit.ready());
        let mut always = LogLimit::every(Duration::ZERO);
        assert!(always.ready() && always.ready());
    }
}

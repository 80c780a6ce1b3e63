//! The query probe (`--query-every-ms`): while the senders run, one thread asks the server
//! about a random app of the scenario every few milliseconds, over one keep-alive connection,
//! and records how long each answer took.
//!
//! Answers are timed, not checked: the send phase is still changing them. The probe never
//! bursts to catch up with missed ticks, so a slow server is asked less often, not harder.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use crate::api::Api;
use crate::scenario::Scenario;

/// The probe checks whether the send phase is over at least this often while it waits.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// Latencies are recorded in microseconds, up to a minute (the API's timeout is shorter).
const MAX_LATENCY_US: u64 = 60_000_000;

/// Mixed into the run's seed so that the probe's choice of apps differs from the senders'.
const PROBE_SEED: u64 = 0x5eed_0f9e_71e5;

/// Query latencies over one send phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct QueryStats {
    /// Queries answered 200.
    pub count: u64,
    /// Queries that failed or answered anything but 200; not in the latencies.
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl QueryStats {
    /// Summarizes a histogram of latencies in microseconds.
    fn of(latencies_us: &Histogram<u64>, errors: u64) -> QueryStats {
        let ms = |us: u64| us as f64 / 1000.0;
        QueryStats {
            count: latencies_us.len(),
            errors,
            p50_ms: ms(latencies_us.value_at_quantile(0.5)),
            p99_ms: ms(latencies_us.value_at_quantile(0.99)),
            max_ms: ms(latencies_us.max()),
        }
    }
}

/// The next query's due time after one due at `due`: one interval later, or now if the
/// server was so slow that this time has passed already (missed ticks are skipped).
fn next_due(due: Instant, interval: Duration, now: Instant) -> Instant {
    (due + interval).max(now)
}

/// Queries a random app every `interval` until `done` is set; returns the latencies.
pub fn run(
    api: &Api,
    scenario: &Scenario,
    interval: Duration,
    seed: u64,
    done: &AtomicBool,
) -> QueryStats {
    let mut rng = SmallRng::seed_from_u64(seed ^ PROBE_SEED);
    let mut latencies_us = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)
        .expect("the histogram bounds are valid");
    let mut errors = 0;
    let mut due = Instant::now();
    while !done.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < due {
            std::thread::sleep((due - now).min(STOP_CHECK));
            continue;
        }
        let sha = scenario.sha_hex(rng.random_range(0..scenario.apps()));
        let started = Instant::now();
        match api.query(sha) {
            Ok(reply) if reply.status == 200 => {
                let us = started.elapsed().as_micros();
                latencies_us.saturating_record(u64::try_from(us).unwrap_or(u64::MAX).max(1));
            }
            _ => errors += 1,
        }
        due = next_due(due, interval, Instant::now());
    }
    QueryStats::of(&latencies_us, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missed_ticks_are_skipped() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        // On time: one interval after the last due time, not after the query ended.
        assert_eq!(next_due(start, ms(2), start + ms(1)), start + ms(2));
        // Late: right away, without a burst of the ticks that were missed.
        assert_eq!(next_due(start, ms(2), start + ms(7)), start + ms(7));
    }

    fn histogram() -> Histogram<u64> {
        Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap()
    }

    #[test]
    fn stats_in_milliseconds() {
        let mut histogram = histogram();
        for ms in 1..=100 {
            histogram.record(ms * 1000).unwrap();
        }
        let stats = QueryStats::of(&histogram, 2);
        assert_eq!(stats.count, 100);
        assert_eq!(stats.errors, 2);
        // Three significant digits: within 0.1%.
        for (got, want) in [
            (stats.p50_ms, 50.0),
            (stats.p99_ms, 99.0),
            (stats.max_ms, 100.0),
        ] {
            assert!((got - want).abs() <= want * 0.001, "{got} != {want}");
        }
        assert_eq!(QueryStats::of(&self::histogram(), 0), QueryStats::default());
    }
}

//! Reads the server's counters from its `/metrics` text, and waits for the server to settle
//! after the send phase.
//!
//! Parsing is pure and tested on its own; only [`settle`] talks to the server. The same names
//! come from `ipevents` and from the `discard` receiver, which serves only some of them.

use std::time::{Duration, Instant};

use crate::api::{Api, ApiError};

/// How often the server's counters are read while it settles.
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// A received count that has not moved for this long means the server has caught up.
const SETTLE_QUIET: Duration = Duration::from_millis(200);

/// The server's totals over all workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerCounters {
    pub received: u64,
    /// Valid events counted; `None` from a receiver that does not parse (discard).
    pub ingested: Option<u64>,
    pub kernel_drops: u64,
    /// Invalid datagrams over all reasons; `None` from a receiver that does not parse.
    pub invalid: Option<u64>,
    /// Valid events the server did not count because it was at a cap (`--max-apps`).
    pub dropped: Option<u64>,
}

impl ServerCounters {
    /// What happened between `base` and `self`. Saturates, so that a receiver whose counters
    /// were reset in between shows zero rather than wrapping.
    pub fn since(&self, base: &ServerCounters) -> ServerCounters {
        let delta = |now: Option<u64>, then: Option<u64>| match (now, then) {
            (Some(now), then) => Some(now.saturating_sub(then.unwrap_or(0))),
            (None, _) => None,
        };
        ServerCounters {
            received: self.received.saturating_sub(base.received),
            ingested: delta(self.ingested, base.ingested),
            kernel_drops: self.kernel_drops.saturating_sub(base.kernel_drops),
            invalid: delta(self.invalid, base.invalid),
            dropped: delta(self.dropped, base.dropped),
        }
    }
}

/// Sums every sample of one counter family over its labels; `None` when the family is absent.
fn sum_family(text: &str, name: &str) -> Option<u64> {
    let mut total = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here, not continue as a longer name.
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        *total.get_or_insert(0u64) += value;
    }
    total
}

/// Reads the totals from `/metrics` text.
pub fn parse(text: &str) -> Result<ServerCounters, String> {
    let received = sum_family(text, "ipevents_datagrams_received_total")
        .ok_or("/metrics has no ipevents_datagrams_received_total: is this an ipevents server?")?;
    Ok(ServerCounters {
        received,
        ingested: sum_family(text, "ipevents_events_ingested_total"),
        kernel_drops: sum_family(text, "ipevents_kernel_drops_total").unwrap_or(0),
        invalid: sum_family(text, "ipevents_datagrams_invalid_total"),
        dropped: sum_family(text, "ipevents_events_dropped_total"),
    })
}

/// Reads the server's totals now.
pub fn scrape(api: &Api) -> Result<ServerCounters, ApiError> {
    let text = api.metrics()?;
    parse(&text).map_err(ApiError)
}

/// The server's counters once it has caught up with what was sent.
#[derive(Clone, Copy, Debug)]
pub struct Settled {
    pub counters: ServerCounters,
    /// False when the received count was still moving at the deadline.
    pub settled: bool,
}

/// Polls `/metrics` until the server has received `sent` datagrams since `base`, or its
/// received count stops moving for [`SETTLE_QUIET`], or `timeout` passes.
pub fn settle(
    api: &Api,
    base: &ServerCounters,
    sent: u64,
    timeout: Duration,
) -> Result<Settled, ApiError> {
    let deadline = Instant::now() + timeout;
    let mut last = scrape(api)?;
    let mut last_change = Instant::now();
    loop {
        if last.since(base).received >= sent {
            return Ok(Settled {
                counters: last,
                settled: true,
            });
        }
        let now = Instant::now();
        if now - last_change >= SETTLE_QUIET {
            return Ok(Settled {
                counters: last,
                settled: true,
            });
        }
        if now >= deadline {
            return Ok(Settled {
                counters: last,
                settled: false,
            });
        }
        std::thread::sleep(SETTLE_POLL);
        let current = scrape(api)?;
        if current.received != last.received {
            last_change = Instant::now();
        }
        last = current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(text: &str, want: Result<ServerCounters, ()>) {
        assert_eq!(parse(text).map_err(|_| ()), want, "text {text:?}");
    }

    #[test]
    fn parses_server_and_discard_metrics() {
        let server = "\
# HELP ipevents_datagrams_received_total Datagrams read from the UDP socket.
# TYPE ipevents_datagrams_received_total counter
ipevents_datagrams_received_total{worker=\"0\"} 123
ipevents_datagrams_received_total{worker=\"1\"} 77
ipevents_events_ingested_total{worker=\"0\"} 120
ipevents_events_ingested_total{worker=\"1\"} 75
ipevents_kernel_drops_total{worker=\"0\"} 4
ipevents_datagrams_invalid_total{reason=\"bad_sha\"} 3
ipevents_datagrams_invalid_total{reason=\"empty\"} 2
ipevents_events_dropped_total{cause=\"max_apps\"} 6
ipevents_datagrams_received_total_extra 999
ipevents_ingest_latency_seconds{quantile=\"0.5\"} 0.000001
";
        check(
            server,
            Ok(ServerCounters {
                received: 200,
                ingested: Some(195),
                kernel_drops: 4,
                invalid: Some(5),
                dropped: Some(6),
            }),
        );
        let discard = "\
ipevents_datagrams_received_total{worker=\"0\"} 5
ipevents_kernel_drops_total{worker=\"0\"} 1
";
        check(
            discard,
            Ok(ServerCounters {
                received: 5,
                ingested: None,
                kernel_drops: 1,
                invalid: None,
                dropped: None,
            }),
        );
        check("ipevents_datagrams_received_total 9\n", {
            Ok(ServerCounters {
                received: 9,
                ..ServerCounters::default()
            })
        });
        check("", Err(()));
        check("something_else 1\n", Err(()));
    }

    #[test]
    fn deltas_saturate() {
        let before = ServerCounters {
            received: 10,
            ingested: Some(9),
            kernel_drops: 2,
            invalid: None,
            dropped: Some(1),
        };
        let after = ServerCounters {
            received: 4,
            ingested: Some(20),
            kernel_drops: 5,
            invalid: Some(1),
            dropped: Some(1),
        };
        assert_eq!(
            after.since(&before),
            ServerCounters {
                received: 0,
                ingested: Some(11),
                kernel_drops: 3,
                invalid: Some(1),
                dropped: Some(0),
            }
        );
    }
}

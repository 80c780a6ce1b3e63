//! Adaptive steering's thread: about once a [`BALANCE_INTERVAL`] it collects every worker's
//! sample of its traffic, decides which apps are hot ([`HotSet`]), and when that set changes
//! attaches a new steering program that spreads them over every worker.
//!
//! It never touches a worker's table and never sees a datagram: it sends `HeavyHitters`
//! commands and reads the sketches that come back. A program that the kernel refuses is
//! logged and counted, and the old one keeps steering; nothing here stops the server.
//!
//! Counts stay exact through a change: the kernel swaps the group's program atomically, and
//! each datagram goes to exactly one worker, chosen by the old program or the new one. A query
//! adds up every worker's partial answer, so it does not matter which.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};

use crate::cluster::Cluster;
use crate::log_limit::LogLimit;
use crate::metrics;
use crate::sketch::HeavyHitters;
use crate::socket::{self, SteeringKey, MAX_HOT_KEYS};

/// How often the balancer collects the samples and decides.
pub const BALANCE_INTERVAL: Duration = Duration::from_secs(1);

/// Samples an interval needs, all workers together, before it may change the hot set: 128
/// samples are about 8,000 events (one in `sketch::SAMPLE_EVERY`), and a key at the hot
/// threshold of two workers has 16 of them. An idle or stopped server changes nothing, so
/// the hot set outlives a pause.
pub const MIN_SAMPLES: u64 = 128;

/// A key becomes hot when it has at least 1/HOT_SHARE_DIVISOR of a worker's fair share of
/// the samples (1/(4·workers) of them): it would then take a quarter of one worker.
pub const HOT_SHARE_DIVISOR: u64 = 4;

/// A hot key cools down when it has less than 1/COOL_SHARE_DIVISOR of a worker's fair share
/// (half the hot threshold) in [`COOL_INTERVALS`] intervals in a row, each with
/// [`MIN_SAMPLES`]. The gap between the two thresholds keeps a key near one of them from
/// flapping in and out with the noise of sampling.
pub const COOL_SHARE_DIVISOR: u64 = 8;
pub const COOL_INTERVALS: u32 = 3;

/// The hot keys and, for each, the intervals in a row it has spent below the cool threshold.
#[derive(Debug)]
pub struct HotSet {
    workers: u64,
    keys: BTreeMap<SteeringKey, u32>,
}

impl HotSet {
    pub fn new(workers: usize) -> HotSet {
        HotSet {
            workers: workers.max(1) as u64,
            keys: BTreeMap::new(),
        }
    }

    /// The hot keys, in order.
    pub fn keys(&self) -> Vec<SteeringKey> {
        self.keys.keys().copied().collect()
    }

    /// Takes one interval's sketches, one per worker: adds the keys now hot (the heaviest
    /// first, up to [`MAX_HOT_KEYS`]) and drops the ones cool for [`COOL_INTERVALS`].
    pub fn update(&mut self, sketches: &[HeavyHitters]) {
        let samples: u64 = sketches.iter().map(HeavyHitters::samples).sum();
        if samples < MIN_SAMPLES {
            return;
        }
        // A key spread over the workers shows up in each one's sketch: add up the lower bounds.
        let mut counts: BTreeMap<SteeringKey, u64> = BTreeMap::new();
        for (key, count) in sketches.iter().flat_map(HeavyHitters::lower_bounds) {
            *counts.entry(key).or_default() += count;
        }
        let count_of = |key: &SteeringKey| counts.get(key).copied().unwrap_or(0);
        // count / samples >= 1 / (divisor · workers), in integers.
        let at_least = |count: u64, divisor: u64| count * divisor * self.workers >= samples;
        self.keys.retain(|key, cool_intervals| {
            if at_least(count_of(key), COOL_SHARE_DIVISOR) {
                *cool_intervals = 0;
            } else {
                *cool_intervals += 1;
            }
            *cool_intervals < COOL_INTERVALS
        });
        let mut candidates: Vec<(u64, SteeringKey)> = counts
            .iter()
            .filter(|(key, &count)| {
                !self.keys.contains_key(key) && at_least(count, HOT_SHARE_DIVISOR)
            })
            .map(|(&key, &count)| (count, key))
            .collect();
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        let room = MAX_HOT_KEYS - self.keys.len();
        for (_, key) in candidates.into_iter().take(room) {
            self.keys.insert(key, 0);
        }
    }
}

/// The balancer's counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct SteeringCounters {
    /// Keys in the program the kernel runs now.
    pub hot_keys: AtomicU64,
    pub changes: AtomicU64,
    pub change_failures: AtomicU64,
}

/// `/metrics` families of adaptive steering.
pub struct SteeringMetrics(pub Arc<SteeringCounters>);

impl metrics::Source for SteeringMetrics {
    fn render(&self, out: &mut String) {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        metrics::single(
            out,
            "steering_hot_apps",
            "gauge",
            "Hot apps (by the first 8 hex digits of their sha) that adaptive steering spreads \
             over every worker.",
            get(&self.0.hot_keys),
        );
        metrics::single(
            out,
            "steering_changes_total",
            "counter",
            "Steering programs attached because the set of hot apps changed.",
            get(&self.0.changes),
        );
        metrics::single(
            out,
            "steering_change_failures_total",
            "counter",
            "Steering programs the kernel refused; the previous one kept steering.",
            get(&self.0.change_failures),
        );
    }
}

/// How often a repeating failure is logged at most.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The running balancer thread.
pub struct Balancer {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Balancer {
    /// Starts the thread. `socket` is any socket of the group (a duplicate will do), and the
    /// group has one socket per worker of `cluster`.
    pub fn spawn(
        cluster: Cluster,
        socket: UdpSocket,
        counters: Arc<SteeringCounters>,
    ) -> Result<Balancer, String> {
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let thread = thread::Builder::new()
            .name("balancer".into())
            .spawn(move || {
                let workers = cluster.workers().len();
                let mut hot = HotSet::new(workers);
                let mut attached: Vec<SteeringKey> = Vec::new();
                let mut failure_log = LogLimit::every(FAILURE_LOG_INTERVAL);
                let mut log_failure = |message: String| {
                    if failure_log.ready() {
                        log::warn!("{message}");
                    }
                };
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(BALANCE_INTERVAL) {
                    match cluster.heavy_hitters() {
                        Ok(sketches) => hot.update(&sketches),
                        Err(e) => log_failure(format!("adaptive steering: {e}")),
                    }
                    let wanted = hot.keys();
                    if wanted == attached {
                        continue;
                    }
                    // A failed attach is tried again at the next interval.
                    match socket::attach_adaptive_steering(&socket, workers, &wanted) {
                        Ok(()) => {
                            log::info!("adaptive steering: {}", describe(&attached, &wanted));
                            counters.changes.fetch_add(1, Ordering::Relaxed);
                            counters
                                .hot_keys
                                .store(wanted.len() as u64, Ordering::Relaxed);
                            attached = wanted;
                        }
                        Err(e) => {
                            counters.change_failures.fetch_add(1, Ordering::Relaxed);
                            log_failure(format!(
                                "adaptive steering: attach a program for {} hot apps \
                                 (SO_ATTACH_REUSEPORT_CBPF): {e}; the previous one steers on",
                                wanted.len()
                            ));
                        }
                    }
                }
            })
            .map_err(|e| format!("spawn balancer thread: {e}"))?;
        Ok(Balancer { stop, thread })
    }

    /// Stops the thread, after the interval's work in progress.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// One line for a change of the hot set: how many there are, and which came and went, each by
/// its steering key (the first 8 hex digits of the sha).
fn describe(before: &[SteeringKey], after: &[SteeringKey]) -> String {
    let list = |keys: Vec<&SteeringKey>| {
        keys.iter()
            .map(|key| key.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let added = list(after.iter().filter(|k| !before.contains(k)).collect());
    let removed = list(before.iter().filter(|k| !after.contains(k)).collect());
    format!(
        "{} hot apps (spread over every worker); added [{added}], removed [{removed}]",
        after.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One worker's sketch of `samples` samples: each (key, n) n times, and the rest spread
    /// over many keys that never fill a slot.
    fn sketch(heavy: &[(u64, u64)], samples: u64) -> HeavyHitters {
        let mut sketch = HeavyHitters::default();
        for &(key, n) in heavy {
            for _ in 0..n {
                sketch.add(SteeringKey(key));
            }
        }
        let heavy_samples: u64 = heavy.iter().map(|(_, n)| n).sum();
        for n in 0..samples - heavy_samples {
            sketch.add(SteeringKey(1 << 40 | n));
        }
        sketch
    }

    #[test]
    fn keys_turn_hot_and_cool_with_hysteresis() {
        // Two workers: hot from 1/8 of the samples, cool below 1/16 for three intervals.
        // (each worker's sketch per interval, and the hot keys after it)
        type Interval<'a> = (&'a [(&'a [(u64, u64)], u64)], &'a [u64]);
        let intervals: &[Interval] = &[
            // Too few samples: nothing changes, however skewed.
            (&[(&[(1, 100)], 100), (&[], 0)], &[]),
            // 1 has 130 of 1,000 samples, 2 has 110: only 1 is hot.
            (&[(&[(1, 130), (2, 110)], 500), (&[], 500)], &[1]),
            // Spread over both workers, 1 keeps its share.
            (&[(&[(1, 70)], 500), (&[(1, 70)], 500)], &[1]),
            // Between the thresholds (80 of 1,000): 1 stays hot.
            (&[(&[(1, 80)], 500), (&[], 500)], &[1]),
            // Below the cool threshold once and twice: still hot.
            (&[(&[(1, 10)], 500), (&[], 500)], &[1]),
            (&[(&[(1, 10)], 500), (&[], 500)], &[1]),
            // An idle interval changes nothing, and does not count as cool.
            (&[(&[], 0), (&[], 0)], &[1]),
            // Back above the cool threshold: the count starts over.
            (&[(&[(1, 70)], 500), (&[], 500)], &[1]),
            (&[(&[(1, 10)], 500), (&[], 500)], &[1]),
            (&[(&[(1, 10)], 500), (&[], 500)], &[1]),
            // The third cool interval in a row: 1 leaves; 3 and 4 come.
            (&[(&[(1, 10), (3, 200)], 500), (&[(4, 125)], 500)], &[3, 4]),
        ];
        let mut hot = HotSet::new(2);
        for (i, (workers, want)) in intervals.iter().enumerate() {
            let sketches: Vec<HeavyHitters> = workers
                .iter()
                .map(|(heavy, samples)| sketch(heavy, *samples))
                .collect();
            hot.update(&sketches);
            let want: Vec<SteeringKey> = want.iter().map(|&k| SteeringKey(k)).collect();
            assert_eq!(hot.keys(), want, "after interval {i}");
        }
    }

    #[test]
    fn at_most_max_hot_keys_the_heaviest_first() {
        // 64 workers, so that each of 64 keys, with 10 to 41 samples of 1,632, is above the hot
        // share (1/256): the 32 heaviest are taken, from both workers' sketches.
        let mut hot = HotSet::new(64);
        let sketches: Vec<HeavyHitters> = (0..2)
            .map(|half| {
                let keys: Vec<(u64, u64)> = (0..32).map(|k| (half * 32 + k, 10 + k)).collect();
                let samples = keys.iter().map(|(_, n)| n).sum();
                sketch(&keys, samples)
            })
            .collect();
        hot.update(&sketches);
        let want: Vec<SteeringKey> = (16..32).chain(48..64).map(SteeringKey).collect();
        assert_eq!(hot.keys(), want);
    }

    #[test]
    fn describes_a_change_in_one_line() {
        let keys = |ks: &[u64]| ks.iter().map(|&k| SteeringKey(k)).collect::<Vec<_>>();
        let line = describe(
            &keys(&[0x3132_3334_6162_6364]),
            &keys(&[0x6565_6565_3030_3030]),
        );
        assert_eq!(
            line,
            "1 hot apps (spread over every worker); added [eeee0000], removed [1234abcd]"
        );
    }
}

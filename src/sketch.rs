//! What a worker learns about its own traffic for adaptive steering: one valid event in
//! [`SAMPLE_EVERY`], counted by steering key in a small heavy-hitter sketch.
//!
//! It belongs to one worker and is written only by it; the balancer gets a copy through the
//! worker's command channel. Sampling neither allocates nor writes anything shared.

use crate::socket::SteeringKey;
use crate::wire::AppKey;

/// One valid event in this many is sampled: about a nanosecond an event on average, for a
/// few hundred samples a second per worker even at a few tens of thousands of events a
/// second.
pub const SAMPLE_EVERY: usize = 64;

/// Keys the sketch tracks. Space-Saving finds every key with more than 1/SKETCH_SLOTS of the
/// samples, so 32 slots find every key at the hot threshold (a quarter of one worker's fair
/// share) up to 8 workers, and the heaviest ones beyond.
pub const SKETCH_SLOTS: usize = 32;

/// One tracked key: its count and how much of the count may belong to keys it replaced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    key: SteeringKey,
    count: u64,
    error: u64,
}

/// A Space-Saving heavy-hitter sketch (Metwally, Agrawal and El Abbadi, 2005) over
/// [`SKETCH_SLOTS`] slots: a new key, when every slot is taken, replaces the one with the
/// smallest count and inherits that count as its possible error. A key's count minus its
/// error is a lower bound of its samples, and any key with more than a slot's share of the
/// samples is tracked.
#[derive(Clone, Copy, Debug)]
pub struct HeavyHitters {
    slots: [Slot; SKETCH_SLOTS],
    used: usize,
    samples: u64,
}

impl Default for HeavyHitters {
    fn default() -> HeavyHitters {
        HeavyHitters {
            slots: [Slot::default(); SKETCH_SLOTS],
            used: 0,
            samples: 0,
        }
    }
}

impl HeavyHitters {
    /// Counts one sample of `key`: a scan of at most [`SKETCH_SLOTS`] slots.
    pub fn add(&mut self, key: SteeringKey) {
        self.samples += 1;
        if let Some(slot) = self.slots[..self.used].iter_mut().find(|s| s.key == key) {
            slot.count += 1;
        } else if self.used < SKETCH_SLOTS {
            self.slots[self.used] = Slot {
                key,
                count: 1,
                error: 0,
            };
            self.used += 1;
        } else {
            let least = self
                .slots
                .iter_mut()
                .min_by_key(|s| s.count)
                .expect("the sketch has slots");
            *least = Slot {
                key,
                count: least.count + 1,
                error: least.count,
            };
        }
    }

    /// Samples counted, every key's included.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Every tracked key with the samples it had at least (its count less its error).
    pub fn lower_bounds(&self) -> impl Iterator<Item = (SteeringKey, u64)> + '_ {
        self.slots[..self.used]
            .iter()
            .map(|slot| (slot.key, slot.count - slot.error))
    }
}

/// A worker's sampler: the sketch, and where the next sample falls in the event stream.
///
/// The worker parses a batch at a time, and tells the sampler each event it is asked for:
/// the place of the first is [`first_in_batch`](Sampler::first_in_batch), each
/// [`sample`](Sampler::sample) gives the next, and [`end_batch`](Sampler::end_batch) carries
/// the rest over to the next batch. Between two samples the worker only counts.
#[derive(Default)]
pub struct Sampler {
    /// Events of the next batch to pass over before the next sample.
    skip: usize,
    sketch: HeavyHitters,
}

impl Sampler {
    /// The place, among a batch's valid events, of the first one to sample.
    pub fn first_in_batch(&self) -> usize {
        self.skip
    }

    /// Samples the app of the event at place `at` of the batch, the place that
    /// `first_in_batch` or the last `sample` gave; returns the place of the next one: every
    /// [`SAMPLE_EVERY`]th event of the stream is sampled.
    pub fn sample(&mut self, app: &AppKey, at: usize) -> usize {
        self.sketch.add(SteeringKey::of(app));
        at + SAMPLE_EVERY
    }

    /// Ends a batch of `valid` events, whose next sample would have been at place `next`
    /// (at least `valid`: every place before it was sampled).
    pub fn end_batch(&mut self, next: usize, valid: usize) {
        debug_assert!(next >= valid, "a place in the batch was not sampled");
        self.skip = next - valid;
    }

    /// The sketch so far; the sampler starts over with an empty one.
    pub fn take(&mut self) -> HeavyHitters {
        std::mem::take(&mut self.sketch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_key_above_a_slots_share() {
        // (samples of each heavy key, how many light keys, samples of each light key)
        let check = |heavy: &[u64], light_keys: u64, light: u64| {
            let mut sketch = HeavyHitters::default();
            // The light keys come first and between the heavy ones, the order that
            // Space-Saving finds hardest.
            let mut stream = Vec::new();
            for round in 0..light {
                stream.extend((0..light_keys).map(|k| SteeringKey(1_000 + k)));
                for (k, &n) in heavy.iter().enumerate() {
                    let per_round = n / light + u64::from(round < n % light);
                    stream.extend((0..per_round).map(|_| SteeringKey(k as u64)));
                }
            }
            for &key in &stream {
                sketch.add(key);
            }
            assert_eq!(sketch.samples(), stream.len() as u64);
            let bounds: Vec<(SteeringKey, u64)> = sketch.lower_bounds().collect();
            for (k, &n) in heavy.iter().enumerate() {
                let key = SteeringKey(k as u64);
                let found = bounds.iter().find(|(b, _)| *b == key).map(|(_, n)| *n);
                assert!(
                    found.is_some_and(|lower| lower <= n),
                    "key {k} of {n}: {found:?}"
                );
                if n * SKETCH_SLOTS as u64 > 2 * stream.len() as u64 {
                    // Well above a slot's share, the lower bound is more than half the truth.
                    assert!(found.unwrap() * 2 > n, "key {k} of {n}: {found:?}");
                }
            }
        };
        check(&[500], 0, 1);
        check(&[1_000, 300], 1_000, 3);
        check(&[2_000, 2_000, 2_000], 5_000, 2);
        check(&[4_000], 31, 100);
    }

    #[test]
    fn samples_one_event_in_every_sample_every_across_batches() {
        use crate::wire::Event;
        let event = |n: u8| Event {
            app: crate::wire::AppKey([n; 32]),
            ip: 1,
        };
        let events: Vec<Event> = (0..=255).cycle().take(10_000).map(event).collect();
        // What a worker does with a batch of valid events.
        let sample = |sampler: &mut Sampler, batch: &[Event]| {
            let mut at = sampler.first_in_batch();
            while let Some(event) = batch.get(at) {
                at = sampler.sample(&event.app, at);
            }
            sampler.end_batch(at, batch.len());
        };
        let mut whole = Sampler::default();
        sample(&mut whole, &events);
        let mut batched = Sampler::default();
        for batch in events.chunks(37) {
            sample(&mut batched, batch);
        }
        let (whole, batched) = (whole.take(), batched.take());
        assert_eq!(whole.samples(), 10_000_u64.div_ceil(SAMPLE_EVERY as u64));
        assert_eq!(batched.samples(), whole.samples());
        let keys = |sketch: &HeavyHitters| sketch.lower_bounds().collect::<Vec<_>>();
        assert_eq!(keys(&batched), keys(&whole));
        assert_eq!(
            whole.lower_bounds().count(),
            4,
            "every 64th of 256 keys in turn"
        );
        assert_eq!(Sampler::default().take().samples(), 0);
    }
}

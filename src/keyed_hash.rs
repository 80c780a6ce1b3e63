//! The keyed hash of the tables, and the shards it splits the apps into.
//!
//! One [`AppHasher`] serves the whole server: every worker's table and the app register hash
//! an app once, with the same secret, and find its shard from the same bits, so that shard
//! `i` holds the same apps on every worker (a snapshot copies the apps shard by shard and
//! merges them per shard).

use std::hash::{BuildHasher, RandomState};
use std::sync::OnceLock;

use crate::wire::AppKey;

/// The keyed hash of the tables: foldhash (its "quality" variant), seeded from the operating
/// system's randomness, at least 128 bits of secret per hasher.
///
/// Anyone can send any sha, and with `--max-ips-per-app` up to 4096 any IPs, so the hash must
/// not let keys chosen in advance collide. Every 64-bit word of the key is XORed with
/// secret seed material before a full 64 x 64 -> 128-bit multiply whose halves are folded
/// together, so which keys collide depends on seeds an attacker never sees: no answer,
/// metric or log reveals a hash or a table's order (answers are sorted), and every start has
/// its own seed. foldhash does not claim resistance against an attacker who recovers the seed
/// by timing a long-running server; SipHash-1-3 (std's default) resists that better, at
/// several times the cost on 32 bytes (see the README's Performance). The caps
/// (`--max-apps`, `--max-ips-per-app`) bound what any collision could cost.
#[derive(Clone, Debug)]
pub struct KeyedHash(foldhash::quality::SeedableRandomState);

impl KeyedHash {
    pub fn new() -> KeyedHash {
        // std's RandomState draws its keys from the operating system (getrandom); foldhash's
        // own random state draws from addresses and the clock, which is weaker.
        static SHARED_SEED: OnceLock<foldhash::SharedSeed> = OnceLock::new();
        let shared = SHARED_SEED.get_or_init(|| foldhash::SharedSeed::from_u64(os_random_u64()));
        KeyedHash(foldhash::quality::SeedableRandomState::with_seed(
            os_random_u64(),
            shared,
        ))
    }
}

impl Default for KeyedHash {
    fn default() -> KeyedHash {
        KeyedHash::new()
    }
}

impl BuildHasher for KeyedHash {
    type Hasher = foldhash::quality::FoldHasher;

    fn build_hasher(&self) -> Self::Hasher {
        self.0.build_hasher()
    }
}

/// 64 bits from std's `RandomState`, whose keys come from the operating system's randomness.
fn os_random_u64() -> u64 {
    RandomState::new().hash_one(0u64)
}

/// Shards of every app table and of the app register. A shard grows on its own, so growing a
/// table by doubling moves at most a shard's worth of entries at once, never the whole table.
pub const SHARDS: usize = 256;

/// Slots of the map from hash bits to shard: 16 per shard on average.
const SHARD_MAP_SLOTS: usize = 4096;

/// Where the shard map reads the hash: bits 40 to 51. hashbrown takes a bucket from the low
/// bits and its control byte from the top seven, so within a shard these bits are spent, and
/// the bits the shard's own table uses are not.
const SHARD_MAP_SHIFT: u32 = 40;

/// The server-wide keyed hash of apps, and the map from hash to shard.
///
/// The shards get unequal shares of the hash space, from 1 to 2 times the smallest in a
/// geometric progression. A hash table that grows by doubling is between 44% and 88% full
/// (hashbrown's bounds); equal shards would all be at the same point of that range at once,
/// and all double within a short burst, so the whole table would be as empty as its emptiest
/// moment at some sizes. Spread over a factor of two, the shards pass their doubling points one
/// after another: the table's load stays near the average, about 63%, at every size, and its
/// resizes come one shard at a time.
#[derive(Clone, Debug)]
pub struct AppHasher {
    hash: KeyedHash,
    shard_of: Box<[u8; SHARD_MAP_SLOTS]>,
}

impl AppHasher {
    pub fn new() -> AppHasher {
        let mut shard_of = Box::new([0u8; SHARD_MAP_SLOTS]);
        // Shard i takes the slots from (2^(i/SHARDS) - 1) to (2^((i+1)/SHARDS) - 1) of the
        // map, scaled: at least 11 and at most 23 of them.
        let boundary = |i: usize| {
            let share = (i as f64 / SHARDS as f64).exp2() - 1.0;
            (share * SHARD_MAP_SLOTS as f64).round() as usize
        };
        for shard in 0..SHARDS {
            for slot in &mut shard_of[boundary(shard)..boundary(shard + 1)] {
                *slot = shard as u8;
            }
        }
        AppHasher {
            hash: KeyedHash::new(),
            shard_of,
        }
    }

    /// The app's keyed hash: computed once per event, for the shard and the lookup in it.
    #[inline]
    pub fn hash(&self, app: &AppKey) -> u64 {
        self.hash.hash_one(app)
    }

    /// The app's hash and its shard: where the app lives in every table.
    #[inline]
    pub fn locate(&self, app: &AppKey) -> (u64, usize) {
        let hash = self.hash(app);
        (hash, self.shard(hash))
    }

    /// The shard an app of this hash lives in, on every worker and in the register.
    #[inline]
    pub fn shard(&self, hash: u64) -> usize {
        usize::from(self.shard_of[(hash >> SHARD_MAP_SHIFT) as usize % SHARD_MAP_SLOTS])
    }
}

impl Default for AppHasher {
    fn default() -> AppHasher {
        AppHasher::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_gets_between_one_and_two_shares_of_the_smallest() {
        let hasher = AppHasher::new();
        let mut slots = [0usize; SHARDS];
        for &shard in hasher.shard_of.iter() {
            slots[usize::from(shard)] += 1;
        }
        let (least, most) = (slots.iter().min().unwrap(), slots.iter().max().unwrap());
        assert!(*least >= 11, "{slots:?}");
        assert!(*most <= 23 && most * 10 <= least * 21, "{slots:?}");
        // Ascending shares: shard 0 the smallest, the last shard the largest.
        assert_eq!((slots[0], slots[SHARDS - 1]), (*least, *most));
    }

    #[test]
    fn apps_spread_over_the_shards_by_their_shares() {
        let hasher = AppHasher::new();
        let mut apps = [0usize; SHARDS];
        let total = 400_000u32;
        for n in 0..total {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&n.to_le_bytes());
            apps[hasher.shard(hasher.hash(&AppKey(key)))] += 1;
        }
        // The first shard's share is 11 or 12 slots in 4096: about 1,100 apps; the last one's
        // about twice that. Both within 15% of what their slots promise.
        let expect = |shard: usize| {
            let slots = hasher
                .shard_of
                .iter()
                .filter(|&&s| usize::from(s) == shard)
                .count();
            slots as f64 * f64::from(total) / SHARD_MAP_SLOTS as f64
        };
        for shard in [0, SHARDS / 2, SHARDS - 1] {
            let ratio = apps[shard] as f64 / expect(shard);
            assert!((0.85..1.15).contains(&ratio), "shard {shard}: {ratio}");
        }
    }
}

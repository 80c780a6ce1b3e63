//! The apps a worker saw last, by their sha's 64 hex digits as they came in the datagram: an
//! exact-match cache in front of the hex decoder and the keyed hash.
//!
//! A datagram in the layout every client sends (`wire::common_fields`) whose digits are in the
//! cache takes the key and its location (hash and shard) from there, so its digits are neither
//! checked and decoded nor its key hashed again. Every other datagram is parsed by
//! `wire::parse_into` and its key hashed; one in the common layout then puts its digits in
//! their slot, once they decode.
//!
//! Invariants:
//! - a slot always holds 64 hex digits, the key they decode to and that key's location by the
//!   cache's hasher (a new cache's slots all hold the digit `0` 64 times, a real sha);
//! - a datagram's digits are compared with their slot's in full, so [`KeyCache::parse_into`]
//!   gives exactly what `wire::parse_into` and `AppHasher::locate` give, whatever the cache
//!   holds.
//!
//! The slot of a set of digits comes from an unkeyed hash of its first eight. Shas chosen to
//! share a slot, or as many apps as the traffic of a large fleet holds, only make datagrams
//! miss, and a miss costs what every datagram cost without the cache, plus one 64-byte compare
//! and one slot written.

use crate::keyed_hash::AppHasher;
use crate::wire::{self, AppKey, Event, Reject};

/// Slots of a cache, a power of two: 32 KiB per worker.
pub const SLOTS: usize = 256;

/// One set of digits and what they decode to; two cache lines, the digits in the first.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Slot {
    digits: [u8; 64],
    key: AppKey,
    hash: u64,
    shard: usize,
}

const _: () = assert!(
    std::mem::size_of::<Slot>() == 128,
    "a slot is two cache lines"
);

/// Where a parsed event's app is, and whether the cache knew its digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    /// `(hash, shard)`, as `AppHasher::locate` gives it.
    pub at: (u64, usize),
    /// Whether the digits were in the cache: an app seen lately, whose table entry is likely
    /// still in the CPU's caches.
    pub cached: bool,
}

/// A worker's cache of the keys of the apps it saw last. Owned by one thread.
pub struct KeyCache {
    slots: Box<[Slot; SLOTS]>,
    hasher: AppHasher,
}

impl KeyCache {
    /// A cache whose locations are `hasher`'s: it must be the hasher of the table that the
    /// events are applied to.
    pub fn new(hasher: AppHasher) -> KeyCache {
        let digits = [b'0'; 64];
        let key = AppKey::from_hex(&digits).expect("64 zeros are 64 hex digits");
        let (hash, shard) = hasher.locate(&key);
        let slot = Slot {
            digits,
            key,
            hash,
            shard,
        };
        KeyCache {
            slots: Box::new([slot; SLOTS]),
            hasher,
        }
    }

    /// [`wire::parse_into`], and the location of the event's app by the cache's hasher.
    /// Always inlined: it is the worker's parse loop.
    #[inline(always)]
    pub fn parse_into(&mut self, datagram: &[u8], event: &mut Event) -> Result<Located, Reject> {
        let Some(fields) = wire::common_fields(datagram) else {
            wire::parse_into(datagram, event)?;
            return Ok(Located {
                at: self.hasher.locate(&event.app),
                cached: false,
            });
        };
        let slot = &mut self.slots[slot_of(fields.digits)];
        if same_digits(&slot.digits, fields.digits) {
            event.app = slot.key;
            event.ip = fields.ip()?;
            return Ok(Located {
                at: (slot.hash, slot.shard),
                cached: true,
            });
        }
        // A miss: the datagram is parsed as it would be without the cache. An error leaves the
        // slot as it was; an ip out of range with valid digits only costs the next one a miss.
        fields.parse_into(event)?;
        let (hash, shard) = self.hasher.locate(&event.app);
        *slot = Slot {
            digits: *fields.digits,
            key: event.app,
            hash,
            shard,
        };
        Ok(Located {
            at: (hash, shard),
            cached: false,
        })
    }
}

/// The slot of `digits`: the top bits of their first eight bytes times a 64-bit odd constant
/// (Fibonacci hashing), which depend on all eight.
#[inline(always)]
fn slot_of(digits: &[u8; 64]) -> usize {
    let head = u64::from_le_bytes(*digits.first_chunk().expect("64 bytes have a first 8"));
    (head.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOTS.trailing_zeros())) as usize
}

/// Whether two sets of digits are the same: 16 bytes at a time, without a branch per chunk
/// and without the call to `memcmp` that `==` on 64 bytes compiles to.
#[inline(always)]
fn same_digits(a: &[u8; 64], b: &[u8; 64]) -> bool {
    let chunk = |digits: &[u8; 64], at: usize| {
        u128::from_ne_bytes(digits[at..at + 16].try_into().expect("16 bytes"))
    };
    (0..64)
        .step_by(16)
        .fold(0, |differ, at| differ | (chunk(a, at) ^ chunk(b, at)))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SHA: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    /// Parses `datagram` through `cache` and checks it against `wire::parse` and the hasher.
    #[track_caller]
    fn check(cache: &mut KeyCache, datagram: &[u8]) -> Result<Event, Reject> {
        let mut event = Event::UNSET;
        let got = cache.parse_into(datagram, &mut event);
        let want = wire::parse(datagram);
        match (got, want) {
            (Ok(located), Ok(want_event)) => {
                assert_eq!(event, want_event, "datagram {datagram:02x?}");
                assert_eq!(
                    located.at,
                    cache.hasher.locate(&event.app),
                    "location of {event:?}"
                );
            }
            (Err(got), Err(want)) => assert_eq!(got, want, "datagram {datagram:02x?}"),
            (got, want) => panic!("datagram {datagram:02x?}: got {got:?}, want {want:?}"),
        }
        want
    }

    #[test]
    fn a_cached_app_parses_as_the_wire_does() {
        let upper = SHA.to_uppercase();
        let not_hex = format!("{}zz", &SHA[..62]);
        let mut unknown_field_first = vec![0x18, 0x01];
        unknown_field_first.extend(wire::encode(SHA, 7));
        // Each datagram twice in a row: once to fill its slot, once to take it from there.
        let cases: Vec<(Vec<u8>, Result<u32, Reject>)> = vec![
            (wire::encode(SHA, 1), Ok(1)),
            (wire::encode(SHA, 0xffff_ffff), Ok(0xffff_ffff)),
            (wire::encode(SHA, 1 << 32), Err(Reject::IpOutOfRange)),
            (wire::encode(SHA, -1), Err(Reject::IpOutOfRange)),
            (wire::encode(&upper, 2), Ok(2)),
            (wire::encode(&not_hex, 3), Err(Reject::BadSha)),
            (wire::encode(&"0".repeat(64), 4), Ok(4)),
            (unknown_field_first, Ok(7)),
            (Vec::new(), Err(Reject::Empty)),
        ];
        let mut cache = KeyCache::new(AppHasher::new());
        for (datagram, want) in &cases {
            for _ in 0..2 {
                let got = check(&mut cache, datagram).map(|event| event.ip);
                assert_eq!(got, *want, "datagram {datagram:02x?}");
            }
        }
        // The second parse of each came from the cache: the last valid sha of a slot holds
        // it (the upper-case sha took the lower-case one's, whose first digits are the same).
        assert!(holds(&cache, &upper), "{upper} is cached");
        assert!(!holds(&cache, &not_hex), "invalid digits are never cached");
    }

    #[test]
    fn says_whether_the_digits_were_cached() {
        let mut unknown_field_first = vec![0x18, 0x01];
        unknown_field_first.extend(wire::encode(SHA, 7));
        let other = "ab".repeat(32);
        // In order, through one cache: (datagram, whether its digits were cached).
        let cases: Vec<(Vec<u8>, Result<bool, Reject>)> = vec![
            (wire::encode(SHA, 1), Ok(false)),
            (wire::encode(SHA, 2), Ok(true)),
            (wire::encode(&other, 1), Ok(false)),
            (wire::encode(SHA, -1), Err(Reject::IpOutOfRange)),
            (wire::encode(SHA, 3), Ok(true)),
            // Not the common layout: never looked up, whatever the cache holds.
            (unknown_field_first, Ok(false)),
            (wire::encode(&other, 2), Ok(true)),
        ];
        let mut cache = KeyCache::new(AppHasher::new());
        let mut event = Event::UNSET;
        for (datagram, want) in &cases {
            let got = cache.parse_into(datagram, &mut event).map(|l| l.cached);
            assert_eq!(got, *want, "datagram {datagram:02x?}");
        }
    }

    fn holds(cache: &KeyCache, sha: &str) -> bool {
        let digits: &[u8; 64] = sha.as_bytes().try_into().unwrap();
        cache.slots[slot_of(digits)].digits == *digits
    }

    #[test]
    fn a_new_cache_takes_only_real_digits_from_its_empty_slots() {
        // A new cache's slots hold 64 zero digits: 64 zero bytes are not those, 64 '0's are.
        let mut cache = KeyCache::new(AppHasher::new());
        let mut datagram = vec![0x0a, 0x40];
        datagram.extend([0u8; 64]);
        datagram.extend([0x10, 0x01]);
        assert_eq!(check(&mut cache, &datagram), Err(Reject::BadSha));
        let zeros = check(&mut cache, &wire::encode(&"0".repeat(64), 9)).unwrap();
        assert_eq!(zeros.app, AppKey([0; 32]));
    }

    #[test]
    fn apps_that_share_a_slot_take_turns_in_it() {
        let shas: Vec<String> = (0u32..)
            .map(|i| format!("{i:08x}{}", &SHA[8..]))
            .take(4096)
            .collect();
        let first = slot_of(shas[0].as_bytes().try_into().unwrap());
        let sharing: Vec<&String> = shas
            .iter()
            .filter(|sha| slot_of(sha.as_bytes().try_into().unwrap()) == first)
            .take(3)
            .collect();
        assert_eq!(sharing.len(), 3, "4096 heads give three of one slot");
        let mut cache = KeyCache::new(AppHasher::new());
        for round in 0..3u32 {
            for (i, sha) in sharing.iter().enumerate() {
                let ip = round * 3 + i as u32;
                let event = check(&mut cache, &wire::encode(sha, i64::from(ip))).unwrap();
                assert_eq!(event.app, AppKey::from_hex(sha.as_bytes()).unwrap());
                assert_eq!(event.ip, ip);
                assert!(holds(&cache, sha), "{sha} took the slot");
            }
        }
    }

    /// A datagram of one of a few apps, in the common layout or not, or any bytes at all.
    fn datagram() -> impl Strategy<Value = Vec<u8>> {
        let shas = [
            SHA.to_owned(),
            SHA.to_uppercase(),
            "ab".repeat(32),
            format!("{}g", &SHA[..63]),
        ];
        prop_oneof![
            (0..shas.len(), any::<i64>()).prop_map(move |(i, ip)| wire::encode(&shas[i], ip)),
            (0..3usize, 0u32..16).prop_map(|(i, ip)| {
                // The common layout with its ip's varint padded by continuation bytes.
                let mut datagram = wire::encode(&"cd".repeat(32), 0);
                datagram.truncate(67);
                datagram.extend(std::iter::repeat_n(0x80, i));
                datagram.extend([0x80 | ip as u8, 0x00]);
                datagram
            }),
            proptest::collection::vec(any::<u8>(), 0..80),
        ]
    }

    proptest! {
        #[test]
        fn any_run_of_datagrams_parses_as_the_wire_does(
            datagrams in proptest::collection::vec(datagram(), 1..40),
        ) {
            let mut cache = KeyCache::new(AppHasher::new());
            for datagram in &datagrams {
                // `check` compares each result with the wire's.
                let _ = check(&mut cache, datagram);
            }
        }
    }
}

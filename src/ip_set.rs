//! The IPs of one app on one worker, and how many events named each: the unit of memory per
//! (app, ip) pair.
//!
//! Most apps have one IP or a /28's worth, so the set is sized for those: one IP inline, up to
//! `FLAT_SLOTS_MAX` in a flat array searched in order, up to `HASHED_SLOTS_MAX` slots of an
//! open-addressed array, and a hash map beyond. The arrays hold 8 bytes a pair (a `u32` count);
//! a count that would pass `u32::MAX` moves the set to the map, whose counts are `u64`.

use std::collections::HashMap;

use crate::keyed_hash::KeyedHash;

/// Slots of the largest flat array: 16 pairs in 128 bytes, two cache lines, searched in order.
const FLAT_SLOTS_MAX: usize = 16;

/// Slots of the largest open-addressed array, kept at most three quarters full: 48 IPs.
const HASHED_SLOTS_MAX: usize = 64;

/// One IP and its events. A slot whose count is 0 is free: a stored IP has at least one event,
/// so no IP value needs to be reserved. A free slot is always `Slot::default()`, IP 0 with no
/// events, which lets an open-addressed probe compare the IPs alone for any IP but 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    ip: u32,
    events: u32,
}

impl Slot {
    fn is_free(self) -> bool {
        self.events == 0
    }

    /// A slot holding `ip` with `events`; `None` when the count does not fit in a `u32`.
    fn holding(ip: u32, events: u64) -> Option<Slot> {
        debug_assert!(
            events > 0,
            "a slot with no events is free, and free slots hold IP 0"
        );
        let events = u32::try_from(events).ok()?;
        Some(Slot { ip, events })
    }

    /// Adds `events`; false, changing nothing, when the count would pass `u32::MAX`.
    fn add(&mut self, events: u64) -> bool {
        match u32::try_from(u64::from(self.events) + events) {
            Ok(sum) => {
                self.events = sum;
                true
            }
            Err(_) => false,
        }
    }
}

/// The IPs of one app: 16 bytes, since every layout is one slot or one thin pointer.
#[derive(Debug)]
pub enum IpSet {
    /// No IP: an app restored from a state file whose IPs were all left out.
    Empty,
    /// The common app with one IP, in the entry itself.
    One(Slot),
    /// Flat arrays of 2 to `FLAT_SLOTS_MAX` slots: the taken ones first, in arrival order.
    Flat2(Box<[Slot; 2]>),
    Flat4(Box<[Slot; 4]>),
    Flat8(Box<[Slot; 8]>),
    Flat16(Box<[Slot; FLAT_SLOTS_MAX]>),
    /// 32 or 64 slots with linear probing, for apps like the reference client's with a few
    /// dozen IPs: an event finds its IP in one or two probes, in one or two cache lines. The
    /// slot comes from an unkeyed multiplicative hash: the array holds at most 48 IPs, so keys
    /// chosen to collide cost at most a scan of 64 slots, as much as a flat search.
    Hashed32(Box<[Slot; 32]>),
    Hashed64(Box<[Slot; HASHED_SLOTS_MAX]>),
    /// Beyond 48 IPs, or once a count passes `u32::MAX`: a keyed hash map. Boxed, so that the
    /// rare large app does not make every entry as big as a map.
    #[allow(clippy::box_collection)]
    Wide(Box<HashMap<u32, u64, KeyedHash>>),
}

/// What `add` has to do when the set's layout cannot take the IP.
enum Grow {
    /// Move to an array of this many slots: flat up to [`FLAT_SLOTS_MAX`], open-addressed
    /// beyond.
    To(usize),
    /// Move to the map: more IPs than the arrays hold, or a count past `u32::MAX`.
    Wide,
}

impl IpSet {
    /// A set of one IP with `events` events.
    pub fn new(ip: u32, events: u64) -> IpSet {
        if let Some(one) = Slot::holding(ip, events) {
            return IpSet::One(one);
        }
        let mut map = HashMap::with_hasher(KeyedHash::new());
        map.insert(ip, events);
        IpSet::Wide(Box::new(map))
    }

    /// An empty array of `slots` slots, one of the array layouts' sizes.
    fn with_capacity(slots: usize) -> IpSet {
        let free = Slot::default();
        match slots {
            2 => IpSet::Flat2(Box::new([free; 2])),
            4 => IpSet::Flat4(Box::new([free; 4])),
            8 => IpSet::Flat8(Box::new([free; 8])),
            FLAT_SLOTS_MAX => IpSet::Flat16(Box::new([free; FLAT_SLOTS_MAX])),
            32 => IpSet::Hashed32(Box::new([free; 32])),
            HASHED_SLOTS_MAX => IpSet::Hashed64(Box::new([free; HASHED_SLOTS_MAX])),
            _ => unreachable!("no array layout of {slots} slots"),
        }
    }

    /// The slots of an array layout; flat when at most [`FLAT_SLOTS_MAX`] of them.
    fn array(&self) -> Option<&[Slot]> {
        match self {
            IpSet::Flat2(slots) => Some(&slots[..]),
            IpSet::Flat4(slots) => Some(&slots[..]),
            IpSet::Flat8(slots) => Some(&slots[..]),
            IpSet::Flat16(slots) => Some(&slots[..]),
            IpSet::Hashed32(slots) => Some(&slots[..]),
            IpSet::Hashed64(slots) => Some(&slots[..]),
            IpSet::Empty | IpSet::One(_) | IpSet::Wide(_) => None,
        }
    }

    fn array_mut(&mut self) -> Option<&mut [Slot]> {
        match self {
            IpSet::Flat2(slots) => Some(&mut slots[..]),
            IpSet::Flat4(slots) => Some(&mut slots[..]),
            IpSet::Flat8(slots) => Some(&mut slots[..]),
            IpSet::Flat16(slots) => Some(&mut slots[..]),
            IpSet::Hashed32(slots) => Some(&mut slots[..]),
            IpSet::Hashed64(slots) => Some(&mut slots[..]),
            IpSet::Empty | IpSet::One(_) | IpSet::Wide(_) => None,
        }
    }

    /// Distinct IPs held.
    pub fn len(&self) -> usize {
        match self {
            IpSet::Empty => 0,
            IpSet::One(_) => 1,
            IpSet::Wide(map) => map.len(),
            _ => taken(self.array().expect("the other layouts are arrays")),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `events` (at least 1) for `ip`; returns false, changing nothing, when `ip` is new
    /// and the set already holds `max_ips`.
    #[inline(always)]
    pub fn add(&mut self, ip: u32, events: u64, max_ips: usize) -> bool {
        debug_assert!(events > 0);
        // Inline, the common case: an array, searched once, which either takes the event or
        // says which layout the set must move to first.
        let Some(slots) = self.array_mut() else {
            if let IpSet::One(slot) = self {
                if slot.ip == ip && slot.add(events) {
                    return true;
                }
            }
            return self.add_unarrayed(ip, events, max_ips);
        };
        // The search and the count are inline, in the worker's loop; a new IP is added out
        // of line.
        let added = match find(slots, ip) {
            Ok(index) if slots[index].add(events) => Ok(true),
            Ok(_) => Err(Grow::Wide),
            Err(index) => insert(slots, index, ip, events, max_ips),
        };
        match added {
            Ok(stored) => stored,
            Err(grow) => self.grow_and_add(grow, ip, events, max_ips),
        }
    }

    /// `add` for the layouts that are not arrays: none, one IP, or the map.
    #[inline(never)]
    fn add_unarrayed(&mut self, ip: u32, events: u64, max_ips: usize) -> bool {
        let grow = match self {
            IpSet::Empty => {
                if max_ips == 0 {
                    return false;
                }
                *self = IpSet::new(ip, events);
                return true;
            }
            IpSet::One(slot) => {
                if slot.ip == ip {
                    if slot.add(events) {
                        return true;
                    }
                    Grow::Wide
                } else if max_ips <= 1 {
                    return false;
                } else {
                    Grow::To(2)
                }
            }
            IpSet::Wide(map) => {
                if let Some(count) = map.get_mut(&ip) {
                    *count = count.saturating_add(events);
                    return true;
                }
                if map.len() >= max_ips {
                    return false;
                }
                map.insert(ip, events);
                return true;
            }
            _ => unreachable!("arrays are added to by `add`"),
        };
        self.grow_and_add(grow, ip, events, max_ips)
    }

    /// Moves the set to the layout `grow` names, then adds.
    #[inline(never)]
    fn grow_and_add(&mut self, grow: Grow, ip: u32, events: u64, max_ips: usize) -> bool {
        let old = std::mem::replace(self, IpSet::Empty);
        *self = match grow {
            Grow::To(slots) => {
                let mut grown = IpSet::with_capacity(slots);
                let array = grown.array_mut().expect("an array layout");
                for (ip, events) in old.iter_pairs() {
                    let index = find(array, ip).expect_err("the IPs of a set are distinct");
                    array[index] = Slot::holding(ip, events).expect("an array's counts fit in u32");
                }
                grown
            }
            Grow::Wide => {
                let mut map = HashMap::with_capacity_and_hasher(2 * old.len(), KeyedHash::new());
                map.extend(old.iter_pairs());
                IpSet::Wide(Box::new(map))
            }
        };
        self.add(ip, events, max_ips)
    }

    /// Every (ip, events) pair, in no particular order.
    pub fn pairs(&self) -> Vec<(u32, u64)> {
        self.iter_pairs().collect()
    }

    /// [`pairs`](IpSet::pairs), without collecting them.
    fn iter_pairs(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        let (one, array, map) = match self {
            IpSet::Empty => (None, &[][..], None),
            IpSet::One(slot) => (Some(*slot), &[][..], None),
            IpSet::Wide(map) => (None, &[][..], Some(map)),
            _ => (
                None,
                self.array().expect("the other layouts are arrays"),
                None,
            ),
        };
        let slots = one.into_iter().chain(array.iter().copied());
        slots
            .filter(|slot| !slot.is_free())
            .map(|slot| (slot.ip, u64::from(slot.events)))
            .chain(
                map.into_iter()
                    .flat_map(|map| map.iter().map(|(&ip, &events)| (ip, events))),
            )
    }
}

/// Taken slots of an array.
fn taken(slots: &[Slot]) -> usize {
    slots.iter().filter(|slot| !slot.is_free()).count()
}

/// The slot holding `ip` in an array, or the free slot where it would go, searched as the
/// array's length says it is laid out: flat up to [`FLAT_SLOTS_MAX`], open-addressed beyond.
#[inline(always)]
fn find(slots: &[Slot], ip: u32) -> Result<usize, usize> {
    if slots.len() <= FLAT_SLOTS_MAX {
        flat_find(slots, ip)
    } else {
        hashed_find(slots, ip)
    }
}

/// Puts the new `ip` in the free slot `index` that [`find`] gave: `Ok(stored)`, or the layout
/// the set must move to first.
#[inline(never)]
fn insert(
    slots: &mut [Slot],
    index: usize,
    ip: u32,
    events: u64,
    max_ips: usize,
) -> Result<bool, Grow> {
    if slots.len() <= FLAT_SLOTS_MAX {
        insert_flat(slots, index, ip, events, max_ips)
    } else {
        insert_hashed(slots, index, ip, events, max_ips)
    }
}

/// Puts the new `ip` in the free slot `index` of a flat array (its length when it is full).
fn insert_flat(
    slots: &mut [Slot],
    index: usize,
    ip: u32,
    events: u64,
    max_ips: usize,
) -> Result<bool, Grow> {
    // The taken slots come first, so `index` is how many there are.
    if index >= max_ips {
        return Ok(false);
    }
    if index == slots.len() {
        return Err(Grow::To(slots.len() * 2));
    }
    slots[index] = Slot::holding(ip, events).ok_or(Grow::Wide)?;
    Ok(true)
}

/// Puts the new `ip` in the free slot `index` of an open-addressed array, kept at most three
/// quarters full, or says where the set must grow to.
fn insert_hashed(
    slots: &mut [Slot],
    index: usize,
    ip: u32,
    events: u64,
    max_ips: usize,
) -> Result<bool, Grow> {
    let len = taken(slots);
    if len >= max_ips {
        return Ok(false);
    }
    let slot = Slot::holding(ip, events).ok_or(Grow::Wide)?;
    if (len + 1) * 4 <= slots.len() * 3 {
        slots[index] = slot;
        Ok(true)
    } else if slots.len() < HASHED_SLOTS_MAX {
        Err(Grow::To(slots.len() * 2))
    } else {
        Err(Grow::Wide)
    }
}

/// The slot holding `ip` in a flat array, or the first free one (the array's length when it
/// is full).
#[inline]
fn flat_find(slots: &[Slot], ip: u32) -> Result<usize, usize> {
    for (index, slot) in slots.iter().enumerate() {
        if slot.is_free() {
            return Err(index);
        }
        if slot.ip == ip {
            return Ok(index);
        }
    }
    Err(slots.len())
}

/// Bit `i` says that `holds` is true of the `i`th slot; computed without a branch per slot.
#[inline(always)]
fn mask(slots: &[Slot], holds: impl Fn(Slot) -> bool) -> u32 {
    slots
        .iter()
        .enumerate()
        .fold(0, |mask, (i, &slot)| mask | u32::from(holds(slot)) << i)
}

/// Slots an open-addressed probe compares at once: the arrays are split into aligned groups
/// of this many, so a group never wraps around the array's end.
const PROBE_GROUP: usize = 4;

/// The slot holding `ip` in an open-addressed array, or the free slot where it would go. The
/// array is never full, so the probe ends. The probe visits whole groups of [`PROBE_GROUP`]
/// slots, from the home group on, and an IP goes into the first free slot of the first group
/// that has one. Since IPs are never removed, `ip` can only be held before the first group
/// with a free slot, so a group that holds it or a free slot ends the probe, and most probes
/// end in the first group, on one predictable branch.
#[inline(always)]
fn hashed_find(slots: &[Slot], ip: u32) -> Result<usize, usize> {
    // Free slots hold IP 0, so a slot whose IP matches any other IP is taken: the common
    // probe, an IP already held, compares the IPs and nothing else.
    if ip == 0 {
        return hashed_find_zero(slots);
    }
    hashed_probe(slots, ip, |probed| mask(probed, |slot| slot.ip == ip))
}

/// [`hashed_find`] of IP 0, the IP that free slots hold too: a match counts only where the
/// slot is taken.
#[inline(never)]
fn hashed_find_zero(slots: &[Slot]) -> Result<usize, usize> {
    hashed_probe(slots, 0, |probed| {
        mask(probed, |slot| slot.ip == 0 && !slot.is_free())
    })
}

/// The probe of [`hashed_find`] for `ip`, where `found` gives the mask of a group's slots that
/// hold it.
#[inline(always)]
fn hashed_probe(slots: &[Slot], ip: u32, found: impl Fn(&[Slot]) -> u32) -> Result<usize, usize> {
    let groups = slots.len() / PROBE_GROUP;
    // Fibonacci hashing: the top bits of the product, spread evenly even for the runs of
    // consecutive addresses that a home block is made of.
    let bits = groups.trailing_zeros();
    let mut group = (ip.wrapping_mul(0x9e37_79b9) >> (32 - bits)) as usize;
    loop {
        let start = group * PROBE_GROUP;
        let probed = &slots[start..start + PROBE_GROUP];
        let held = found(probed);
        if held != 0 {
            return Ok(start + held.trailing_zeros() as usize);
        }
        let free = mask(probed, Slot::is_free);
        if free != 0 {
            return Err(start + free.trailing_zeros() as usize);
        }
        group = (group + 1) & (groups - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(set: &IpSet) -> Vec<(u32, u64)> {
        let mut pairs = set.pairs();
        pairs.sort_unstable();
        pairs
    }

    fn kind(set: &IpSet) -> &'static str {
        match set {
            IpSet::Empty => "empty",
            IpSet::One(_) => "one",
            IpSet::Flat2(_) | IpSet::Flat4(_) | IpSet::Flat8(_) | IpSet::Flat16(_) => "flat",
            IpSet::Hashed32(_) | IpSet::Hashed64(_) => "hashed",
            IpSet::Wide(_) => "wide",
        }
    }

    #[test]
    fn grows_through_every_layout_without_losing_a_count() {
        // (IPs added, the layout they are kept in)
        let cases = [
            (1, "one"),
            (2, "flat"),
            (16, "flat"),
            (17, "hashed"),
            (24, "hashed"),
            (48, "hashed"),
            (49, "wide"),
            (300, "wide"),
        ];
        for (ips, want) in cases {
            let mut set = IpSet::new(1000, 1);
            for ip in 1000..1000 + ips {
                // Each IP twice: once when new, once when found.
                if ip != 1000 {
                    assert!(set.add(ip, 1, usize::MAX));
                }
                assert!(set.add(ip, 1, usize::MAX));
            }
            assert_eq!(kind(&set), want, "{ips} ips");
            assert_eq!(set.len(), ips as usize);
            let expect: Vec<(u32, u64)> = (1000..1000 + ips).map(|ip| (ip, 2)).collect();
            assert_eq!(sorted(&set), expect, "{ips} ips");
        }
    }

    #[test]
    fn a_new_ip_past_the_cap_changes_nothing() {
        for max_ips in [1, 2, 3, 16, 17, 40, 48, 49, 60] {
            let mut set = IpSet::new(0, 1);
            for ip in 1..max_ips as u32 {
                assert!(set.add(ip, 1, max_ips));
            }
            let before = sorted(&set);
            assert!(!set.add(u32::MAX, 1, max_ips), "cap {max_ips}");
            assert_eq!(sorted(&set), before);
            // A stored IP still counts.
            assert!(set.add(0, 5, max_ips));
            assert_eq!(sorted(&set)[0], (0, 6));
        }
    }

    #[test]
    fn a_count_past_u32_moves_to_the_map_and_stays_exact() {
        let big = u64::from(u32::MAX);
        // From each array layout: (IPs in the set before, the IP whose count overflows).
        for ips in [1u32, 3, 20] {
            let mut set = IpSet::new(7, 1);
            for ip in 8..7 + ips {
                assert!(set.add(ip, 1, usize::MAX));
            }
            assert!(set.add(7, big, usize::MAX));
            assert_eq!(kind(&set), "wide", "{ips} ips");
            assert_eq!(sorted(&set)[0], (7, big + 1));
            assert_eq!(set.len(), ips as usize);
        }
        // A new IP whose first count is already too large for a slot.
        let mut set = IpSet::new(1, 1);
        assert!(set.add(2, big + 5, usize::MAX));
        assert_eq!(sorted(&set), vec![(1, 1), (2, big + 5)]);
        assert_eq!(kind(&IpSet::new(3, big + 1)), "wide");
    }

    #[test]
    fn ip_zero_is_an_ordinary_ip() {
        // In every layout, IP 0 added before and after the others: the IP that free slots
        // hold, so a probe must not take a free slot for it.
        for (others, want) in [(1, "flat"), (20, "hashed"), (40, "hashed"), (60, "wide")] {
            for zero_first in [true, false] {
                let mut set = IpSet::new(1000, 1);
                let add_zero = |set: &mut IpSet| {
                    for _ in 0..3 {
                        assert!(set.add(0, 1, usize::MAX));
                    }
                };
                if zero_first {
                    add_zero(&mut set);
                }
                for ip in 1001..1000 + others {
                    assert!(set.add(ip, 1, usize::MAX));
                }
                if !zero_first {
                    add_zero(&mut set);
                }
                assert_eq!(kind(&set), want, "{others} others");
                let mut expect = vec![(0, 3)];
                expect.extend((1000..1000 + others).map(|ip| (ip, 1)));
                assert_eq!(
                    sorted(&set),
                    expect,
                    "{others} others, zero first: {zero_first}"
                );
            }
        }
    }

    /// IPs whose probes all start in the last group of both open-addressed sizes, so that
    /// they fill it and wrap around to the first.
    fn colliding_ips() -> Vec<u32> {
        let group =
            |ip: u32, groups: u32| ip.wrapping_mul(0x9e37_79b9) >> (32 - groups.trailing_zeros());
        (0..u32::MAX)
            .filter(|&ip| group(ip, 8) == 7 && group(ip, 16) == 15)
            .take(64)
            .collect()
    }

    proptest::proptest! {
        /// Any sequence of adds, colliding IPs among them, under any cap, leaves the set
        /// holding what a map would: each IP's events, and no new IP past the cap.
        #[test]
        fn agrees_with_a_map(
            adds in proptest::collection::vec((0usize..128, proptest::prelude::any::<u32>(), 1u64..4), 0..160),
            max_ips in 1usize..70,
        ) {
            let colliding = colliding_ips();
            let mut model = std::collections::BTreeMap::new();
            let mut set = IpSet::Empty;
            for (pick, random_ip, events) in adds {
                // IP 0 too: the IP that free slots hold.
                let ip = match pick {
                    127 => 0,
                    _ => colliding.get(pick).copied().unwrap_or(random_ip),
                };
                let fits = model.contains_key(&ip) || model.len() < max_ips;
                proptest::prop_assert_eq!(set.add(ip, events, max_ips), fits, "ip {}", ip);
                if fits {
                    *model.entry(ip).or_insert(0) += events;
                }
            }
            let want: Vec<(u32, u64)> = model.into_iter().collect();
            proptest::prop_assert_eq!(sorted(&set), want);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(std::mem::size_of::<Slot>(), 8);
        assert_eq!(std::mem::size_of::<IpSet>(), 16);
    }
}

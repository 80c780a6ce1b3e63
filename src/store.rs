//! Per-worker aggregation: the [`AppTable`] each worker owns, the [`Partial`] answers it
//! gives for one app, and the merge and classification that turn partials into a [`Verdict`].
//!
//! Pure data structures: no I/O, no logging. The only shared state is the [`AppBudget`]: a
//! count of distinct apps and a sharded register of who holds them, touched when a worker
//! has no entry for an app (to create one) and when an entry is freed, never for an event of
//! an app the worker holds.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use smallvec::SmallVec;

use crate::wire::{AppKey, Event};

/// The keyed hash of the worker's tables: foldhash (its "quality" variant), seeded from the
/// operating system's randomness, at least 128 bits of secret per table.
///
/// Anyone can send any sha, and with `--max-ips-per-app` up to 4096 any IPs, so the hash must
/// not let keys chosen in advance collide. Every 64-bit word of the key is XORed with
/// secret seed material before a full 64 x 64 -> 128-bit multiply whose halves are folded
/// together, so which keys collide depends on seeds an attacker never sees: no answer,
/// metric or log reveals a hash or a table's order (answers are sorted), and every table of
/// every start has its own seed. foldhash does not claim resistance against an attacker who
/// recovers the seed by timing a long-running server; SipHash-1-3 (std's default) resists
/// that better, at several times the cost on 32 bytes (see the README's Performance). The
/// caps (`--max-apps`, `--max-ips-per-app`) bound what any collision could cost.
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

/// An app whose distinct IPs fit in this many entries keeps them in a flat vector, searched
/// linearly (at most 192 bytes, three cache lines); this keeps the 16-IP apps of the memory
/// benchmark at 12 bytes a pair.
const FLAT_IPS_MAX: usize = 16;

/// Past [`FLAT_IPS_MAX`], an app's IPs go into an open-addressed table of at most this many
/// slots, kept at most three quarters full; past that, into a hash map.
const HASHED_SLOTS_MAX: usize = 64;

/// One observed IP of an app and how many events named it.
///
/// Packed to 12 bytes: this is the unit of memory per (app, ip) pair, and the padding of an
/// aligned `u64` would cost a quarter more.
#[derive(Clone, Copy, Debug)]
#[repr(C, packed(4))]
struct IpCount {
    ip: u32,
    events: u64,
}

/// The IPs of one app: inline for the common app with one or two IPs, a flat vector up to
/// [`FLAT_IPS_MAX`], an open-addressed table of up to [`HASHED_SLOTS_MAX`] slots, a hash map
/// beyond.
#[derive(Debug)]
enum IpSet {
    Flat(SmallVec<[IpCount; 2]>),
    Hashed(HashedIps),
    // Boxed, so that the rare large app does not make every app's entry as big as a map.
    #[allow(clippy::box_collection)]
    Map(Box<HashMap<u32, u64, KeyedHash>>),
}

/// An app's IPs in a power-of-two number of slots (16 to [`HASHED_SLOTS_MAX`]) with linear
/// probing, for apps like the reference client's with a few dozen IPs: an event finds its IP
/// in one or two probes, in one cache line, where a flat vector would compare a dozen on
/// average. A bit per slot says which slots are taken, so that no IP value is reserved. The
/// slot comes from an unkeyed multiplicative hash: the table holds at most 48 IPs, so keys
/// chosen to collide cost at most a scan of 64 slots, as much as a flat search.
#[derive(Debug)]
struct HashedIps {
    slots: Box<[IpCount]>,
    occupied: u64,
}

impl HashedIps {
    fn with_slots(slots: usize) -> HashedIps {
        debug_assert!(slots.is_power_of_two() && slots <= HASHED_SLOTS_MAX);
        HashedIps {
            slots: vec![IpCount { ip: 0, events: 0 }; slots].into_boxed_slice(),
            occupied: 0,
        }
    }

    fn len(&self) -> usize {
        self.occupied.count_ones() as usize
    }

    /// Whether one more IP would pass three quarters of the slots.
    fn is_full(&self) -> bool {
        (self.len() + 1) * 4 > self.slots.len() * 3
    }

    /// The slot holding `ip`, or the free slot where it would go. The table is never full, so
    /// the probe ends.
    fn find(&self, ip: u32) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        // Fibonacci hashing: the top bits of the product, spread evenly even for the runs of
        // consecutive addresses that a home block is made of.
        let bits = self.slots.len().trailing_zeros();
        let mut slot = (ip.wrapping_mul(0x9e37_79b9) >> (32 - bits)) as usize;
        loop {
            if self.occupied & (1 << slot) == 0 {
                return Err(slot);
            }
            if self.slots[slot].ip == ip {
                return Ok(slot);
            }
            slot = (slot + 1) & mask;
        }
    }

    /// Puts a new IP in its free slot; the caller checked that it is absent and that the
    /// table is not full.
    fn insert_new(&mut self, slot: usize, ip: u32, events: u64) {
        self.slots[slot] = IpCount { ip, events };
        self.occupied |= 1 << slot;
    }

    fn iter(&self) -> impl Iterator<Item = IpCount> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|&(slot, _)| self.occupied & (1 << slot) != 0)
            .map(|(_, &entry)| entry)
    }

    /// The same IPs in a table of `slots` slots.
    fn rehashed(entries: impl Iterator<Item = IpCount>, slots: usize) -> HashedIps {
        let mut table = HashedIps::with_slots(slots);
        for entry in entries {
            match table.find(entry.ip) {
                Err(slot) => table.insert_new(slot, entry.ip, entry.events),
                Ok(_) => unreachable!("the IPs of a set are distinct"),
            }
        }
        table
    }
}

impl IpSet {
    fn len(&self) -> usize {
        match self {
            IpSet::Flat(ips) => ips.len(),
            IpSet::Hashed(ips) => ips.len(),
            IpSet::Map(ips) => ips.len(),
        }
    }

    /// Adds one event for `ip`; returns false, changing nothing, when `ip` is new and the set
    /// already holds `max_ips`.
    fn add(&mut self, ip: u32, events: u64, max_ips: usize) -> bool {
        match self {
            IpSet::Flat(ips) => {
                if let Some(entry) = ips.iter_mut().find(|entry| entry.ip == ip) {
                    entry.events = entry.events.saturating_add(events);
                    return true;
                }
                if ips.len() >= max_ips {
                    return false;
                }
                if ips.len() < FLAT_IPS_MAX {
                    ips.push(IpCount { ip, events });
                    return true;
                }
                let mut table = HashedIps::rehashed(ips.iter().copied(), 2 * FLAT_IPS_MAX);
                let slot = table.find(ip).expect_err("checked absent above");
                table.insert_new(slot, ip, events);
                *self = IpSet::Hashed(table);
                true
            }
            IpSet::Hashed(table) => {
                let slot = match table.find(ip) {
                    Ok(slot) => {
                        let entry = &mut table.slots[slot];
                        entry.events = entry.events.saturating_add(events);
                        return true;
                    }
                    Err(slot) => slot,
                };
                if table.len() >= max_ips {
                    return false;
                }
                if !table.is_full() {
                    table.insert_new(slot, ip, events);
                    return true;
                }
                let slots = table.slots.len() * 2;
                if slots <= HASHED_SLOTS_MAX {
                    let mut grown = HashedIps::rehashed(table.iter(), slots);
                    let slot = grown.find(ip).expect_err("checked absent above");
                    grown.insert_new(slot, ip, events);
                    *table = grown;
                    return true;
                }
                let mut map = HashMap::with_capacity_and_hasher(2 * table.len(), KeyedHash::new());
                map.extend(table.iter().map(|e| (e.ip, e.events)));
                map.insert(ip, events);
                *self = IpSet::Map(Box::new(map));
                true
            }
            IpSet::Map(ips) => {
                if let Some(count) = ips.get_mut(&ip) {
                    *count = count.saturating_add(events);
                    return true;
                }
                if ips.len() >= max_ips {
                    return false;
                }
                ips.insert(ip, events);
                true
            }
        }
    }

    fn to_vec(&self) -> Vec<(u32, u64)> {
        match self {
            IpSet::Flat(ips) => ips.iter().map(|e| (e.ip, e.events)).collect(),
            IpSet::Hashed(ips) => ips.iter().map(|e| (e.ip, e.events)).collect(),
            IpSet::Map(ips) => ips.iter().map(|(&ip, &events)| (ip, events)).collect(),
        }
    }
}

/// What one worker knows about one app.
#[derive(Debug)]
struct AppState {
    events: u64,
    ips: IpSet,
    ips_truncated: bool,
}

/// Caps that bound what the network can make the server hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Distinct IPs one worker stores for one app.
    pub max_ips_per_app: usize,
}

/// Shards of the app register: enough that workers creating entries at the same time rarely
/// meet on one lock.
const REGISTER_SHARDS: usize = 64;

/// The server-wide cap on distinct apps, shared by all workers, and the register of which
/// apps some worker holds an entry for.
///
/// The cap counts apps, not entries: an app seen by k workers takes one unit of the budget and
/// k entries. A worker that has no entry for an app asks the register whether another worker
/// tracks it; if one does, the worker creates its entry whatever the budget, so that an app
/// once tracked never loses an event to the cap, whichever worker the kernel steers it to.
/// The register is touched only on that miss and when an entry is freed; an event for an app
/// the worker already holds touches nothing shared.
#[derive(Debug)]
pub struct AppBudget {
    max_apps: usize,
    /// Distinct apps held by at least one worker.
    apps: AtomicUsize,
    /// App entries held by all workers together: an app seen by k workers counts k times.
    entries: AtomicUsize,
    /// For every tracked app, how many workers hold an entry for it.
    holders: Box<[Mutex<HashMap<AppKey, u32>>]>,
    /// Picks an app's shard; randomly keyed, since anyone can choose the shas.
    shard_hasher: RandomState,
}

impl AppBudget {
    pub fn new(max_apps: usize) -> AppBudget {
        AppBudget {
            max_apps,
            apps: AtomicUsize::new(0),
            entries: AtomicUsize::new(0),
            holders: (0..REGISTER_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            shard_hasher: RandomState::new(),
        }
    }

    /// Distinct apps held by the workers together: what the cap counts.
    pub fn used(&self) -> usize {
        self.apps.load(Ordering::Relaxed)
    }

    /// App entries held by the workers together; an app seen by k workers counts k times.
    pub fn entries(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    /// How many workers hold an entry for `app`. For tests and fuzzing.
    pub fn holders(&self, app: &AppKey) -> u32 {
        self.shard(app).get(app).copied().unwrap_or(0)
    }

    fn shard_index(&self, app: &AppKey) -> usize {
        (self.shard_hasher.hash_one(app) as usize) % REGISTER_SHARDS
    }

    fn shard(&self, app: &AppKey) -> MutexGuard<'_, HashMap<AppKey, u32>> {
        lock(&self.holders[self.shard_index(app)])
    }

    /// Registers one more entry for `app`: always when another worker tracks it already, else
    /// only while fewer than `max_apps` apps are tracked. Returns false when it is refused.
    fn join(&self, app: &AppKey) -> bool {
        let mut shard = self.shard(app);
        if let Some(holders) = shard.get_mut(app) {
            *holders += 1;
            self.entries.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        // Under the shard's lock, so that two workers cannot both create the same app.
        let taken = self
            .apps
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |apps| {
                (apps < self.max_apps).then_some(apps + 1)
            })
            .is_ok();
        if taken {
            shard.insert(*app, 1);
            self.entries.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// Unregisters one entry for `app`; the app leaves the budget with its last entry.
    fn leave(&self, app: &AppKey) {
        let mut shard = self.shard(app);
        self.leave_locked(&mut shard, app);
    }

    /// Unregisters one entry for each of `apps`, taking every shard's lock once, in order,
    /// rather than once per app.
    fn leave_all<'a>(&self, apps: impl Iterator<Item = &'a AppKey>) {
        let mut shards: Vec<_> = self.holders.iter().map(lock).collect();
        for app in apps {
            let index = self.shard_index(app);
            self.leave_locked(&mut shards[index], app);
        }
    }

    fn leave_locked(&self, shard: &mut HashMap<AppKey, u32>, app: &AppKey) {
        let Some(holders) = shard.get_mut(app) else {
            return;
        };
        *holders -= 1;
        self.entries.fetch_sub(1, Ordering::Relaxed);
        if *holders == 0 {
            shard.remove(app);
            self.apps.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Locks a shard of the register. A worker that panicked while holding it left the map
/// consistent (each change is one insert or remove), so a poisoned lock is still used.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What happened to one applied event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Counted, and its IP is stored.
    Stored,
    /// Counted, but its IP is new and the app is at `max_ips_per_app`, so the IP is not kept.
    IpDropped,
    /// Dropped whole: no worker tracks the app and the server is at its app budget.
    AppDropped,
}

/// One worker's map of apps. Owned by exactly one thread.
#[derive(Debug)]
pub struct AppTable {
    apps: HashMap<AppKey, AppState, KeyedHash>,
    limits: Limits,
    budget: std::sync::Arc<AppBudget>,
}

impl AppTable {
    pub fn new(limits: Limits, budget: std::sync::Arc<AppBudget>) -> AppTable {
        AppTable {
            apps: HashMap::with_hasher(KeyedHash::new()),
            limits,
            budget,
        }
    }

    /// Counts one event.
    pub fn apply(&mut self, event: Event) -> Applied {
        let max_ips = self.limits.max_ips_per_app;
        if let Some(state) = self.apps.get_mut(&event.app) {
            state.events = state.events.saturating_add(1);
            if state.ips.add(event.ip, 1, max_ips) {
                return Applied::Stored;
            }
            state.ips_truncated = true;
            return Applied::IpDropped;
        }
        if !self.budget.join(&event.app) {
            return Applied::AppDropped;
        }
        let mut ips = SmallVec::new();
        ips.push(IpCount {
            ip: event.ip,
            events: 1,
        });
        self.apps.insert(
            event.app,
            AppState {
                events: 1,
                ips: IpSet::Flat(ips),
                ips_truncated: false,
            },
        );
        Applied::Stored
    }

    /// This worker's share of what the server knows about `app`.
    pub fn partial(&self, app: &AppKey) -> Partial {
        match self.apps.get(app) {
            None => Partial::default(),
            Some(state) => Partial {
                events: state.events,
                ips: state.ips.to_vec(),
                ips_truncated: state.ips_truncated,
            },
        }
    }

    /// A copy of every app, for the state file.
    pub fn records(&self) -> Vec<AppRecord> {
        self.apps
            .keys()
            .filter_map(|app| self.record(app))
            .collect()
    }

    /// Every app's key, to copy the apps a few at a time.
    pub fn keys(&self) -> Vec<AppKey> {
        self.apps.keys().copied().collect()
    }

    /// A copy of one app, for the state file; `None` when it is gone.
    pub fn record(&self, app: &AppKey) -> Option<AppRecord> {
        self.apps.contains_key(app).then(|| AppRecord {
            app: *app,
            partial: self.partial(app),
        })
    }

    /// Adds an app read from the state file, within the caps; returns false when the app
    /// budget is spent and the app was left out. An app already present is added to.
    pub fn restore(&mut self, record: &AppRecord) -> bool {
        let max_ips = self.limits.max_ips_per_app;
        if !self.apps.contains_key(&record.app) && !self.budget.join(&record.app) {
            return false;
        }
        let state = self.apps.entry(record.app).or_insert_with(|| AppState {
            events: 0,
            ips: IpSet::Flat(SmallVec::new()),
            ips_truncated: false,
        });
        state.events = state.events.saturating_add(record.partial.events);
        state.ips_truncated |= record.partial.ips_truncated;
        for &(ip, events) in &record.partial.ips {
            if !state.ips.add(ip, events, max_ips) {
                state.ips_truncated = true;
            }
        }
        true
    }

    /// Forgets `app`; returns whether it was known.
    pub fn remove(&mut self, app: &AppKey) -> bool {
        let removed = self.apps.remove(app).is_some();
        if removed {
            self.budget.leave(app);
        }
        removed
    }

    /// Hands over every app and leaves this table empty, with the same caps and budget: O(1),
    /// the old table's memory moves with it.
    pub fn take(&mut self) -> AppTable {
        let empty = AppTable::new(self.limits, self.budget.clone());
        std::mem::replace(self, empty)
    }

    /// Every app, consuming the table; the app budget is given back at once.
    pub fn into_records(mut self) -> impl Iterator<Item = AppRecord> {
        let apps = std::mem::take(&mut self.apps);
        self.budget.leave_all(apps.keys());
        apps.into_iter().map(|(app, state)| AppRecord {
            app,
            partial: Partial {
                events: state.events,
                ips: state.ips.to_vec(),
                ips_truncated: state.ips_truncated,
            },
        })
    }

    /// Forgets every app and returns the memory to the allocator.
    pub fn clear(&mut self) {
        self.budget.leave_all(self.apps.keys());
        self.apps = HashMap::with_hasher(KeyedHash::new());
    }

    /// Apps held by this table.
    pub fn len(&self) -> usize {
        self.apps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    /// Checks what must hold after any sequence of events: an app's IPs are distinct and
    /// within the cap, their counts add up to the app's count unless IPs were dropped, and
    /// the shared register holds every app. For tests and fuzzing.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.budget.used() < self.apps.len() {
            return Err(format!(
                "budget {} < {} apps",
                self.budget.used(),
                self.apps.len()
            ));
        }
        for (app, state) in &self.apps {
            if self.budget.holders(app) == 0 {
                return Err(format!("{app:?} is not in the register"));
            }
            let mut ips = state.ips.to_vec();
            let stored = ips.len();
            if stored > self.limits.max_ips_per_app || (stored == 0 && !state.ips_truncated) {
                return Err(format!("{app:?} stores {stored} ips"));
            }
            ips.sort_unstable();
            ips.dedup_by_key(|(ip, _)| *ip);
            if ips.len() != stored {
                return Err(format!("{app:?} stores an ip twice"));
            }
            let ip_events: u64 = ips.iter().map(|&(_, events)| events).sum();
            let consistent = if state.ips_truncated {
                ip_events < state.events
            } else {
                ip_events == state.events
            };
            if !consistent {
                return Err(format!(
                    "{app:?} has {} events but its ips {ip_events} (truncated: {})",
                    state.events, state.ips_truncated
                ));
            }
        }
        Ok(())
    }

    /// Distinct (app, ip) pairs held by this table.
    pub fn pairs(&self) -> usize {
        self.apps.values().map(|state| state.ips.len()).sum()
    }
}

impl Drop for AppTable {
    fn drop(&mut self) {
        self.budget.leave_all(self.apps.keys());
    }
}

/// Events taken from the workers' tables and not yet in the shared store (cluster mode): per
/// app, the sum of what the workers counted. Bounded in (app, ip) pairs by its owner.
#[derive(Clone, Debug, Default)]
pub struct Deltas {
    apps: HashMap<AppKey, Partial>,
    pairs: usize,
}

impl Deltas {
    /// Adds a worker's table, app by app, while the deltas hold at most `max_pairs` pairs;
    /// returns the events of the apps that did not fit, which are dropped.
    pub fn add_table(&mut self, table: AppTable, max_pairs: usize) -> u64 {
        let mut dropped_events = 0u64;
        for record in table.into_records() {
            let mut partial = record.partial;
            partial.ips.sort_unstable();
            // The flusher adds tables under the lock that queries take, so this stays a
            // linear walk: a new app moves in whole, a known one merges two sorted lists.
            match self.apps.entry(record.app) {
                Entry::Vacant(slot) => {
                    if self.pairs + partial.ips.len() > max_pairs {
                        dropped_events = dropped_events.saturating_add(partial.events);
                        continue;
                    }
                    self.pairs += partial.ips.len();
                    slot.insert(partial);
                }
                Entry::Occupied(mut slot) => {
                    let existing = slot.get_mut();
                    let merged = merge_sorted(&existing.ips, &partial.ips);
                    let new_pairs = merged.len() - existing.ips.len();
                    if self.pairs + new_pairs > max_pairs {
                        dropped_events = dropped_events.saturating_add(partial.events);
                        continue;
                    }
                    self.pairs += new_pairs;
                    existing.ips = merged;
                    existing.events = existing.events.saturating_add(partial.events);
                    existing.ips_truncated |= partial.ips_truncated;
                }
            }
        }
        dropped_events
    }

    /// The deltas of one app, IPs in ascending order.
    pub fn get(&self, app: &AppKey) -> Option<&Partial> {
        self.apps.get(app)
    }

    /// Forgets one app; returns whether it was held.
    pub fn remove(&mut self, app: &AppKey) -> bool {
        match self.apps.remove(app) {
            Some(partial) => {
                self.pairs -= partial.ips.len();
                true
            }
            None => false,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&AppKey, &Partial)> {
        self.apps.iter()
    }

    /// Distinct (app, ip) pairs held.
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    pub fn apps(&self) -> usize {
        self.apps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }
}

/// One app's whole state, as the state file holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppRecord {
    pub app: AppKey,
    pub partial: Partial,
}

/// One worker's answer for one app: its event count and its IPs with their event counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Partial {
    pub events: u64,
    pub ips: Vec<(u32, u64)>,
    pub ips_truncated: bool,
}

/// The server's answer for one app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Valid events for the app since the last reset.
    pub count: u64,
    /// The home /28 block's 14 hosts (.1 to .14) in numeric order; empty for an unknown app.
    pub good_ips: Vec<u32>,
    /// Every observed IP outside those 14, in numeric order.
    pub bad_ips: Vec<u32>,
    /// Some IPs were not stored because the app reached `max_ips_per_app` on a worker.
    pub ips_truncated: bool,
}

/// Two lists of (ip, events) in ascending order of IP, added up into one.
fn merge_sorted(a: &[(u32, u64)], b: &[(u32, u64)]) -> Vec<(u32, u64)> {
    let mut merged = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => {
                merged.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                merged.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                merged.push((a[i].0, a[i].1.saturating_add(b[j].1)));
                i += 1;
                j += 1;
            }
        }
    }
    merged.extend_from_slice(&a[i..]);
    merged.extend_from_slice(&b[j..]);
    merged
}

/// Adds up the partial answers of all workers. The sum is commutative, so the result does not
/// depend on which worker saw which event.
pub fn merge_partials(partials: impl IntoIterator<Item = Partial>) -> Partial {
    let mut events = 0u64;
    let mut ips_truncated = false;
    let mut merged: BTreeMap<u32, u64> = BTreeMap::new();
    for partial in partials {
        events = events.saturating_add(partial.events);
        ips_truncated |= partial.ips_truncated;
        for (ip, count) in partial.ips {
            let slot = merged.entry(ip).or_default();
            *slot = slot.saturating_add(count);
        }
    }
    Partial {
        events,
        ips: merged.into_iter().collect(),
        ips_truncated,
    }
}

/// Adds `extra` to `base` as the shared store does: IPs that `base` holds always add up, new
/// ones only while the answer holds fewer than `max_ips`; the events count either way. Both
/// partials' IPs must be in ascending order, as `merge_partials` leaves them.
pub fn add_capped(base: Partial, extra: Partial, max_ips: usize) -> Partial {
    let mut ips_truncated = base.ips_truncated || extra.ips_truncated;
    let mut stored = base.ips.len();
    let mut merged: BTreeMap<u32, u64> = base.ips.into_iter().collect();
    for (ip, events) in extra.ips {
        if let Some(count) = merged.get_mut(&ip) {
            *count = count.saturating_add(events);
        } else if stored < max_ips {
            merged.insert(ip, events);
            stored += 1;
        } else {
            ips_truncated = true;
        }
    }
    Partial {
        events: base.events.saturating_add(extra.events),
        ips: merged.into_iter().collect(),
        ips_truncated,
    }
}

/// Keeps at most `max_ips` of a merged partial's IPs, so that an answer merged from k workers
/// lists no more than one worker may store: the IPs with the most events, ties to the lower
/// address. Says `ips_truncated` when it drops any.
pub fn cap_ips(merged: &mut Partial, max_ips: usize) {
    if merged.ips.len() <= max_ips {
        return;
    }
    merged
        .ips
        .sort_unstable_by_key(|&(ip, events)| (std::cmp::Reverse(events), ip));
    merged.ips.truncate(max_ips);
    merged.ips.sort_unstable();
    merged.ips_truncated = true;
}

/// The /28 block (`ip >> 4`) holding the most distinct IPs; ties go to the block with more
/// events, then to the lower block.
pub fn home_block(ips: &[(u32, u64)]) -> Option<u32> {
    // (distinct ips, events) per block; BTreeMap iterates blocks in ascending order.
    let mut blocks: BTreeMap<u32, (usize, u64)> = BTreeMap::new();
    for &(ip, events) in ips {
        let block = blocks.entry(ip >> 4).or_default();
        block.0 += 1;
        block.1 = block.1.saturating_add(events);
    }
    let mut best: Option<(u32, (usize, u64))> = None;
    for (block, score) in blocks {
        // Strictly greater, so that on a full tie the lower block, seen first, stays.
        if best.is_none_or(|(_, best_score)| score > best_score) {
            best = Some((block, score));
        }
    }
    best.map(|(block, _)| block)
}

/// Classifies a merged partial: the home block's hosts are good, every other IP is bad.
pub fn classify(merged: &Partial) -> Verdict {
    let Some(block) = home_block(&merged.ips) else {
        return Verdict {
            count: merged.events,
            good_ips: Vec::new(),
            bad_ips: Vec::new(),
            ips_truncated: merged.ips_truncated,
        };
    };
    let network = block << 4;
    let good_ips: Vec<u32> = (1..=14).map(|host| network | host).collect();
    let mut bad_ips: Vec<u32> = merged
        .ips
        .iter()
        .map(|&(ip, _)| ip)
        .filter(|ip| !good_ips.contains(ip))
        .collect();
    bad_ips.sort_unstable();
    bad_ips.dedup();
    Verdict {
        count: merged.events,
        good_ips,
        bad_ips,
        ips_truncated: merged.ips_truncated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn app(n: u8) -> AppKey {
        AppKey([n; 32])
    }

    fn ip(a: u8, b: u8, c: u8, d: u8) -> u32 {
        u32::from_be_bytes([a, b, c, d])
    }

    fn table(max_apps: usize, max_ips_per_app: usize) -> AppTable {
        AppTable::new(
            Limits { max_ips_per_app },
            Arc::new(AppBudget::new(max_apps)),
        )
    }

    #[track_caller]
    fn check_block(ips: &[(u32, u64)], want: Option<u32>) {
        assert_eq!(home_block(ips), want, "ips {ips:?}");
    }

    #[test]
    fn home_block_and_tie_breaks() {
        check_block(&[], None);
        check_block(&[(ip(10, 0, 0, 1), 1)], Some(ip(10, 0, 0, 0) >> 4));
        // More distinct IPs wins over more events.
        check_block(
            &[
                (ip(10, 0, 0, 1), 1),
                (ip(10, 0, 0, 2), 1),
                (ip(9, 0, 0, 1), 1000),
            ],
            Some(ip(10, 0, 0, 0) >> 4),
        );
        // Equal distinct IPs: more events wins, even for the higher block.
        check_block(
            &[
                (ip(9, 0, 0, 1), 1),
                (ip(9, 0, 0, 2), 1),
                (ip(10, 0, 0, 1), 1),
                (ip(10, 0, 0, 2), 2),
            ],
            Some(ip(10, 0, 0, 0) >> 4),
        );
        // Full tie: the lower block wins.
        check_block(
            &[(ip(10, 0, 0, 17), 3), (ip(10, 0, 0, 1), 3)],
            Some(ip(10, 0, 0, 0) >> 4),
        );
        // .0 and .15 belong to the block when choosing it.
        check_block(
            &[
                (ip(10, 0, 0, 0), 1),
                (ip(10, 0, 0, 15), 1),
                (ip(10, 0, 0, 16), 1),
            ],
            Some(ip(10, 0, 0, 0) >> 4),
        );
        check_block(&[(u32::MAX, 1)], Some(u32::MAX >> 4));
    }

    #[test]
    fn classification() {
        let merged = Partial {
            events: 9,
            ips: vec![
                (ip(10, 0, 0, 0), 1),
                (ip(10, 0, 0, 1), 1),
                (ip(10, 0, 0, 5), 4),
                (ip(10, 0, 0, 15), 1),
                (ip(1, 2, 3, 4), 2),
            ],
            ips_truncated: false,
        };
        let verdict = classify(&merged);
        assert_eq!(verdict.count, 9);
        assert_eq!(
            verdict.good_ips,
            (1..=14).map(|d| ip(10, 0, 0, d)).collect::<Vec<_>>()
        );
        // The block's own network and broadcast addresses are bad.
        assert_eq!(
            verdict.bad_ips,
            vec![ip(1, 2, 3, 4), ip(10, 0, 0, 0), ip(10, 0, 0, 15)]
        );
        assert_eq!(
            classify(&Partial::default()),
            Verdict {
                count: 0,
                good_ips: vec![],
                bad_ips: vec![],
                ips_truncated: false
            }
        );
    }

    #[test]
    fn merging_adds_counts() {
        let a = Partial {
            events: 3,
            ips: vec![(5, 2), (7, 1)],
            ips_truncated: false,
        };
        let b = Partial {
            events: 2,
            ips: vec![(7, 1), (6, 1)],
            ips_truncated: true,
        };
        assert_eq!(
            merge_partials([a, b, Partial::default()]),
            Partial {
                events: 5,
                ips: vec![(5, 2), (6, 1), (7, 2)],
                ips_truncated: true
            }
        );
    }

    #[test]
    fn a_merged_answer_keeps_at_most_the_cap() {
        let merged = |ips: Vec<(u32, u64)>| Partial {
            events: ips.iter().map(|&(_, events)| events).sum(),
            ips,
            ips_truncated: false,
        };
        let mut under = merged(vec![(1, 1), (2, 1)]);
        cap_ips(&mut under, 2);
        assert_eq!(under, merged(vec![(1, 1), (2, 1)]));
        // The busiest IPs stay, ties to the lower address, in numeric order.
        let mut over = merged(vec![(1, 1), (2, 5), (3, 1), (4, 2), (9, 1)]);
        cap_ips(&mut over, 3);
        assert_eq!(over.ips, vec![(1, 1), (2, 5), (4, 2)]);
        assert_eq!((over.events, over.ips_truncated), (10, true));
    }

    #[test]
    fn ip_cap_counts_the_event_but_not_the_ip() {
        let mut table = table(10, 2);
        let event = |ip| Event { app: app(1), ip };
        assert_eq!(table.apply(event(1)), Applied::Stored);
        assert_eq!(table.apply(event(2)), Applied::Stored);
        assert_eq!(table.apply(event(3)), Applied::IpDropped);
        assert_eq!(table.apply(event(2)), Applied::Stored);
        assert_eq!(table.check_invariants(), Ok(()));
        let partial = table.partial(&app(1));
        assert_eq!(partial.events, 4);
        assert_eq!(partial.ips, vec![(1, 1), (2, 2)]);
        assert!(partial.ips_truncated);
    }

    #[test]
    fn app_budget_is_shared_and_given_back() {
        let budget = Arc::new(AppBudget::new(2));
        let limits = Limits {
            max_ips_per_app: 10,
        };
        let mut first = AppTable::new(limits, budget.clone());
        let mut second = AppTable::new(limits, budget.clone());
        assert_eq!(first.apply(Event { app: app(1), ip: 1 }), Applied::Stored);
        assert_eq!(second.apply(Event { app: app(2), ip: 1 }), Applied::Stored);
        assert_eq!(
            first.apply(Event { app: app(3), ip: 1 }),
            Applied::AppDropped
        );
        // Known apps still count when the budget is spent.
        assert_eq!(first.apply(Event { app: app(1), ip: 2 }), Applied::Stored);
        assert_eq!(budget.used(), 2);
        assert!(second.remove(&app(2)));
        assert!(!second.remove(&app(2)));
        assert_eq!(first.apply(Event { app: app(3), ip: 1 }), Applied::Stored);
        first.clear();
        assert_eq!(budget.used(), 0);
        assert_eq!(first.partial(&app(1)), Partial::default());
    }

    /// Issue 11: with random steering an app's next event lands on a worker that has no entry
    /// for it yet; a flood of made-up apps must not make that worker drop it.
    #[test]
    fn a_tracked_app_keeps_every_event_on_every_worker() {
        let budget = Arc::new(AppBudget::new(100));
        let limits = Limits {
            max_ips_per_app: 10,
        };
        let mut workers = [
            AppTable::new(limits, budget.clone()),
            AppTable::new(limits, budget.clone()),
        ];
        let victim = app(0xaa);
        assert_eq!(
            workers[0].apply(Event { app: victim, ip: 1 }),
            Applied::Stored
        );
        let mut dropped = 0;
        for n in 0..5_000u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&n.to_le_bytes());
            let spoofed = Event {
                app: AppKey(key),
                ip: 1,
            };
            if workers[n as usize % 2].apply(spoofed) == Applied::AppDropped {
                dropped += 1;
            }
        }
        assert_eq!(budget.used(), 100, "the cap counts distinct apps");
        assert_eq!(dropped, 5_000 - 99);
        for n in 0..100 {
            assert_eq!(
                workers[n % 2].apply(Event { app: victim, ip: 2 }),
                Applied::Stored
            );
        }
        let merged = merge_partials(workers.iter().map(|w| w.partial(&victim)));
        assert_eq!(merged.events, 101);
        assert_eq!(budget.holders(&victim), 2);
        assert_eq!(
            budget.used(),
            100,
            "a second entry for a tracked app is free"
        );
        assert_eq!(budget.entries(), 101);
        for worker in &workers {
            assert_eq!(worker.check_invariants(), Ok(()));
        }
        // The app leaves the budget with its last entry only.
        assert!(workers[0].remove(&victim));
        assert_eq!((budget.used(), budget.holders(&victim)), (100, 1));
        workers[1].clear();
        assert_eq!(budget.holders(&victim), 0);
        assert!(budget.used() < 100);
        let [first, second] = workers;
        drop(first);
        drop(second);
        assert_eq!((budget.used(), budget.entries()), (0, 0));
    }

    #[test]
    fn grows_from_flat_to_map_without_losing_counts() {
        let mut table = table(10, 4096);
        for round in 0..3 {
            for i in 0..100u32 {
                table.apply(Event { app: app(1), ip: i });
                if round == 0 {
                    assert_eq!(table.pairs(), i as usize + 1);
                }
            }
        }
        let mut ips = table.partial(&app(1)).ips;
        ips.sort_unstable();
        assert_eq!(ips, (0..100u32).map(|i| (i, 3)).collect::<Vec<_>>());
    }

    #[test]
    fn restores_records_within_the_caps() {
        let mut source = table(10, 100);
        for ip in 0..6u32 {
            source.apply(Event { app: app(1), ip });
            source.apply(Event { app: app(2), ip: 7 });
        }
        let records = source.records();
        let mut copy = table(10, 100);
        for record in &records {
            assert!(copy.restore(record));
        }
        assert_eq!(copy.partial(&app(1)), source.partial(&app(1)));
        assert_eq!(copy.check_invariants(), Ok(()));
        // A smaller cap on restart truncates instead of failing.
        let mut small = table(1, 4);
        assert!(small.restore(&records.iter().find(|r| r.app == app(1)).unwrap().clone()));
        let partial = small.partial(&app(1));
        assert_eq!(
            (partial.events, partial.ips.len(), partial.ips_truncated),
            (6, 4, true)
        );
        assert!(!small.restore(&records.iter().find(|r| r.app == app(2)).unwrap().clone()));
        assert_eq!(small.check_invariants(), Ok(()));
    }

    #[test]
    fn add_capped_keeps_the_base_ips_first() {
        let base = Partial {
            events: 5,
            ips: vec![(9, 3), (20, 2)],
            ips_truncated: false,
        };
        let extra = Partial {
            events: 4,
            ips: vec![(1, 1), (9, 1), (30, 2)],
            ips_truncated: false,
        };
        let cases = [
            (2, vec![(9, 4), (20, 2)], true),
            (3, vec![(1, 1), (9, 4), (20, 2)], true),
            (4, vec![(1, 1), (9, 4), (20, 2), (30, 2)], false),
        ];
        for (max_ips, ips, ips_truncated) in cases {
            let want = Partial {
                events: 9,
                ips,
                ips_truncated,
            };
            assert_eq!(
                add_capped(base.clone(), extra.clone(), max_ips),
                want,
                "max {max_ips}"
            );
        }
    }

    #[test]
    fn deltas_add_tables_within_the_pair_cap() {
        let mut deltas = Deltas::default();
        let mut worker = table(10, 10);
        for ip in [1, 2, 1] {
            worker.apply(Event { app: app(1), ip });
        }
        worker.apply(Event { app: app(2), ip: 7 });
        let taken = worker.take();
        assert!(worker.is_empty());
        assert_eq!(deltas.add_table(taken, 10), 0);
        assert_eq!((deltas.apps(), deltas.pairs()), (2, 3));
        // Known IPs of known apps always fit; a new pair past the cap drops its app's events.
        worker.apply(Event { app: app(1), ip: 2 });
        worker.apply(Event { app: app(3), ip: 1 });
        worker.apply(Event { app: app(3), ip: 2 });
        assert_eq!(deltas.add_table(worker.take(), 3), 2);
        assert_eq!(deltas.pairs(), 3);
        assert_eq!(
            deltas.get(&app(1)),
            Some(&Partial {
                events: 4,
                ips: vec![(1, 2), (2, 2)],
                ips_truncated: false
            })
        );
        assert_eq!(deltas.get(&app(3)), None);
        assert!(deltas.remove(&app(1)));
        assert_eq!((deltas.apps(), deltas.pairs()), (1, 1));
        // Taking and consuming tables gives their app budget back.
        assert_eq!(worker.check_invariants(), Ok(()));
    }

    #[test]
    fn sizes() {
        // The units of memory: a pair, and the per-app state inside a table's slot.
        assert_eq!(std::mem::size_of::<IpCount>(), 12);
        assert_eq!(std::mem::size_of::<AppState>(), 56);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn events() -> impl Strategy<Value = Vec<(u8, u32, usize)>> {
            // (app, ip, worker): few apps and IPs clustered in a few blocks, so blocks compete.
            proptest::collection::vec((0u8..4, 0u32..96, 0usize..4), 0..400)
        }

        proptest! {
            #[test]
            fn any_split_gives_the_same_answer(events in events(), workers in 1usize..5) {
                let mut one = table(usize::MAX, usize::MAX);
                let budget = Arc::new(AppBudget::new(usize::MAX));
                let limits = Limits { max_ips_per_app: usize::MAX };
                let mut split: Vec<AppTable> =
                    (0..workers).map(|_| AppTable::new(limits, budget.clone())).collect();
                for &(a, ip, worker) in &events {
                    let event = Event { app: app(a), ip: 0x0a00_0000 + ip };
                    one.apply(event);
                    split[worker % workers].apply(event);
                }
                prop_assert_eq!(one.check_invariants(), Ok(()));
                for a in 0..4 {
                    let whole = classify(&merge_partials([one.partial(&app(a))]));
                    let parts = classify(&merge_partials(split.iter().map(|t| t.partial(&app(a)))));
                    prop_assert_eq!(whole, parts);
                }
            }

            #[test]
            fn good_ips_are_the_hosts_of_one_block(
                ips in proptest::collection::vec((any::<u32>(), 1u64..5), 1..60)
            ) {
                let merged = merge_partials([Partial { events: 1, ips, ips_truncated: false }]);
                let verdict = classify(&merged);
                prop_assert_eq!(verdict.good_ips.len(), 14);
                let network = verdict.good_ips[0] & !0xf;
                for (host, &good) in (1..=14).zip(&verdict.good_ips) {
                    prop_assert_eq!(good, network | host);
                }
                for (ip, _) in &merged.ips {
                    prop_assert!(verdict.good_ips.contains(ip) != verdict.bad_ips.contains(ip));
                }
                prop_assert!(verdict.bad_ips.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }
}

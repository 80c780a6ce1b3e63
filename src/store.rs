//! Per-worker aggregation: the [`AppTable`] each worker owns, the [`Partial`] answers it
//! gives for one app, and the merge and classification that turn partials into a [`Verdict`].
//!
//! Pure data structures: no I/O, no logging. The only shared state is the [`AppBudget`]: the
//! server-wide [`AppHasher`], a count of distinct apps and a sharded register of who holds
//! them, touched when a worker has no entry for an app (to create one) and when an entry is
//! freed, never for an event of an app the worker holds.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hashbrown::HashTable;

use crate::ip_set::IpSet;
use crate::keyed_hash::{AppHasher, SHARDS};
use crate::wire::{AppKey, Event};

/// Caps that bound what the network can make the server hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Distinct IPs one worker stores for one app.
    pub max_ips_per_app: usize,
}

/// One app in the register, and how many workers hold an entry for it.
#[derive(Debug)]
struct Holders {
    app: AppKey,
    workers: u32,
}

/// The server-wide cap on distinct apps, shared by all workers, the register of which apps
/// some worker holds an entry for, and the hasher every table shares.
///
/// The cap counts apps, not entries: an app seen by k workers takes one unit of the budget and
/// k entries. A worker that has no entry for an app asks the register whether another worker
/// tracks it; if one does, the worker creates its entry whatever the budget, so that an app
/// once tracked never loses an event to the cap, whichever worker the kernel steers it to.
/// The register is touched only on that miss and when an entry is freed; an event for an app
/// the worker already holds touches nothing shared. The register is sharded like the tables,
/// by the same hash, so a worker hashes an app once for both.
#[derive(Debug)]
pub struct AppBudget {
    max_apps: usize,
    hasher: AppHasher,
    /// Distinct apps held by at least one worker.
    apps: AtomicUsize,
    /// App entries held by all workers together: an app seen by k workers counts k times.
    entries: AtomicUsize,
    /// For every tracked app, how many workers hold an entry for it; one lock per shard.
    holders: Box<[Mutex<HashTable<Holders>>]>,
    /// Held through a reset of the tables that share this budget; see [`AppBudget::reset_turn`].
    resetting: Mutex<()>,
}

impl AppBudget {
    pub fn new(max_apps: usize) -> AppBudget {
        AppBudget {
            max_apps,
            hasher: AppHasher::new(),
            apps: AtomicUsize::new(0),
            entries: AtomicUsize::new(0),
            holders: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            resetting: Mutex::new(()),
        }
    }

    /// One reset at a time of the tables that share this budget (in cluster mode the HTTP
    /// thread and the flusher may both reset): two at once could each hold some workers still
    /// while waiting for the others, until their deadlines. Hold the guard from asking the
    /// workers for their tables until they resume.
    pub fn reset_turn(&self) -> MutexGuard<'_, ()> {
        lock(&self.resetting)
    }

    /// The hasher of every table that shares this budget.
    pub fn hasher(&self) -> &AppHasher {
        &self.hasher
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
        let hash = self.hasher.hash(app);
        self.shard(hash)
            .find(hash, |h| h.app == *app)
            .map_or(0, |h| h.workers)
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, HashTable<Holders>> {
        lock(&self.holders[self.hasher.shard(hash)])
    }

    /// Registers one more entry for `app` (of keyed hash `hash`): always when another worker
    /// tracks it already, else only while fewer than `max_apps` apps are tracked. Returns
    /// false when it is refused.
    fn join(&self, app: &AppKey, hash: u64) -> bool {
        let mut shard = self.shard(hash);
        if let Some(holders) = shard.find_mut(hash, |h| h.app == *app) {
            holders.workers += 1;
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
            shard.insert_unique(
                hash,
                Holders {
                    app: *app,
                    workers: 1,
                },
                |h| self.hasher.hash(&h.app),
            );
            self.entries.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// Unregisters one entry for `app`; the app leaves the budget with its last entry.
    fn leave(&self, app: &AppKey, hash: u64) {
        let mut shard = self.shard(hash);
        self.leave_locked(&mut shard, app, hash);
    }

    /// Unregisters one entry for every app of a table's shards, taking each register shard's
    /// lock once, in order, rather than once per app.
    fn leave_all(&self, shards: &[HashTable<AppEntry>]) {
        for (index, apps) in shards.iter().enumerate() {
            if apps.is_empty() {
                continue;
            }
            let mut shard = lock(&self.holders[index]);
            for entry in apps {
                let hash = self.hasher.hash(&entry.app);
                self.leave_locked(&mut shard, &entry.app, hash);
            }
        }
    }

    fn leave_locked(&self, shard: &mut HashTable<Holders>, app: &AppKey, hash: u64) {
        let Ok(mut found) = shard.find_entry(hash, |h| h.app == *app) else {
            return;
        };
        let holders = found.get_mut();
        holders.workers -= 1;
        self.entries.fetch_sub(1, Ordering::Relaxed);
        if holders.workers == 0 {
            found.remove();
            self.apps.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Forgets every app of every worker at once, for a reset: `tables` must be every table
    /// that shares this budget, taken from workers that hold still until this returns. The
    /// tables are left out of the budget (dropping them gives nothing back twice), and what
    /// they and the register held is returned, to be freed off the data path.
    pub fn clear(&self, tables: Vec<AppTable>) -> Freed {
        let mut freed = Freed {
            tables,
            register: Vec::with_capacity(SHARDS),
        };
        for table in &mut freed.tables {
            table.registered = false;
        }
        for shard in self.holders.iter() {
            freed.register.push(std::mem::take(&mut *lock(shard)));
        }
        self.apps.store(0, Ordering::Relaxed);
        self.entries.store(0, Ordering::Relaxed);
        freed
    }
}

/// What a reset took out of the tables and the register: dropping it frees the memory, which
/// for a million apps takes tens of milliseconds, so it is dropped on another thread.
#[derive(Debug)]
pub struct Freed {
    tables: Vec<AppTable>,
    register: Vec<HashTable<Holders>>,
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

/// The top bit of an entry's count says that some of its IPs were not stored.
const IPS_TRUNCATED: u64 = 1 << 63;

/// What one worker knows about one app: 56 bytes, the unit of memory per app in a table.
#[derive(Debug)]
struct AppEntry {
    app: AppKey,
    /// Events counted, below [`IPS_TRUNCATED`]; that bit set when IPs were dropped.
    events_and_flag: u64,
    ips: IpSet,
}

impl AppEntry {
    fn new(app: AppKey, ip: u32, events: u64) -> AppEntry {
        AppEntry {
            app,
            events_and_flag: events.min(IPS_TRUNCATED - 1),
            ips: IpSet::new(ip, events),
        }
    }

    /// An app with no events yet, for a restore to add to.
    fn empty(app: AppKey) -> AppEntry {
        AppEntry {
            app,
            events_and_flag: 0,
            ips: IpSet::Empty,
        }
    }

    fn events(&self) -> u64 {
        self.events_and_flag & !IPS_TRUNCATED
    }

    fn ips_truncated(&self) -> bool {
        self.events_and_flag & IPS_TRUNCATED != 0
    }

    fn add_events(&mut self, events: u64) {
        let flag = self.events_and_flag & IPS_TRUNCATED;
        let sum = self.events().saturating_add(events).min(IPS_TRUNCATED - 1);
        self.events_and_flag = sum | flag;
    }

    fn mark_truncated(&mut self) {
        self.events_and_flag |= IPS_TRUNCATED;
    }

    /// Counts one event to `ip`, storing the IP unless the app is at `max_ips`. Always
    /// inlined: it is the worker's inner loop.
    #[inline(always)]
    fn count(&mut self, ip: u32, max_ips: usize) -> Applied {
        self.add_events(1);
        if self.ips.add(ip, 1, max_ips) {
            return Applied::Stored;
        }
        self.mark_truncated();
        Applied::IpDropped
    }

    fn partial(&self) -> Partial {
        Partial {
            events: self.events(),
            ips: self.ips.pairs(),
            ips_truncated: self.ips_truncated(),
        }
    }
}

/// One worker's apps, in [`SHARDS`] hash tables that each grow on their own. Owned by exactly
/// one thread.
#[derive(Debug)]
pub struct AppTable {
    shards: Box<[HashTable<AppEntry>]>,
    len: usize,
    limits: Limits,
    /// The budget's hasher, copied: the budget's own shares a cache line with counters that
    /// other workers write, and the table reads the hasher on every event.
    hasher: AppHasher,
    budget: Arc<AppBudget>,
    /// Whether the budget counts this table's apps; a reset clears the budget in one step and
    /// then drops the old tables without giving their apps back one by one.
    registered: bool,
}

impl AppTable {
    pub fn new(limits: Limits, budget: Arc<AppBudget>) -> AppTable {
        AppTable {
            shards: (0..SHARDS).map(|_| HashTable::new()).collect(),
            len: 0,
            limits,
            hasher: budget.hasher().clone(),
            budget,
            registered: true,
        }
    }

    /// `app`'s hash and the shard that holds it, for [`apply_located`](AppTable::apply_located).
    #[inline(always)]
    pub fn locate(&self, app: &AppKey) -> (u64, usize) {
        self.hasher.locate(app)
    }

    /// The hasher the table locates its apps by, the budget's: a worker's key cache
    /// (`key_cache`) locates apps by a copy of it.
    pub fn hasher(&self) -> &AppHasher {
        &self.hasher
    }

    /// Counts one event.
    #[inline]
    pub fn apply(&mut self, event: Event) -> Applied {
        let at = self.locate(&event.app);
        self.apply_located(event, at)
    }

    /// [`apply`](AppTable::apply), with the app already located: a worker takes the location
    /// from its key cache, or hashes the app while it parses, and when a batch's apps are not
    /// all cached it locates the rest of the batch before the first of their lookups, so that
    /// those lookups are not each at the head of their own chain of loads. Always inlined: it
    /// is the worker's inner loop, and a call would save and restore six registers for every
    /// event.
    #[inline(always)]
    pub fn apply_located(&mut self, event: Event, (hash, index): (u64, usize)) -> Applied {
        debug_assert_eq!(
            (hash, index),
            self.locate(&event.app),
            "located by another hasher"
        );
        let max_ips = self.limits.max_ips_per_app;
        let hasher = &self.hasher;
        let shard = &mut self.shards[index];
        if let Some(entry) = shard.find_mut(hash, |e| e.app == event.app) {
            return entry.count(event.ip, max_ips);
        }
        if !self.budget.join(&event.app, hash) {
            return Applied::AppDropped;
        }
        shard.insert_unique(hash, AppEntry::new(event.app, event.ip, 1), |e| {
            hasher.hash(&e.app)
        });
        self.len += 1;
        Applied::Stored
    }

    /// Counts one event, its app located at `(hash, index)` as in
    /// [`apply_located`](AppTable::apply_located), if this table already holds the app; `None`,
    /// with nothing changed, when it does not. A worker that reads a sibling's socket under key
    /// steering applies an event here so that stealing adds no app entry (`backlog`).
    pub fn apply_held_located(
        &mut self,
        event: Event,
        (hash, index): (u64, usize),
    ) -> Option<Applied> {
        debug_assert_eq!(
            (hash, index),
            self.locate(&event.app),
            "located by another hasher"
        );
        let max_ips = self.limits.max_ips_per_app;
        let entry = self.shards[index].find_mut(hash, |e| e.app == event.app)?;
        Some(entry.count(event.ip, max_ips))
    }

    fn find(&self, app: &AppKey) -> Option<&AppEntry> {
        let (hash, index) = self.locate(app);
        self.shards[index].find(hash, |e| e.app == *app)
    }

    /// This worker's share of what the server knows about `app`.
    pub fn partial(&self, app: &AppKey) -> Partial {
        self.find(app).map(AppEntry::partial).unwrap_or_default()
    }

    /// A copy of every app of one shard: shard `i` holds the same apps on every worker that
    /// shares the budget, so a snapshot copies and merges the apps one shard at a time.
    pub fn shard_records(&self, shard: usize) -> Vec<AppRecord> {
        self.shards[shard]
            .iter()
            .map(|entry| AppRecord {
                app: entry.app,
                partial: entry.partial(),
            })
            .collect()
    }

    /// The keys of one shard's apps, to copy them a few at a time.
    pub fn shard_keys(&self, shard: usize) -> Vec<AppKey> {
        self.shards[shard].iter().map(|entry| entry.app).collect()
    }

    /// A copy of one app, for the state file; `None` when it is gone.
    pub fn record(&self, app: &AppKey) -> Option<AppRecord> {
        self.find(app).map(|entry| AppRecord {
            app: *app,
            partial: entry.partial(),
        })
    }

    /// Adds an app read from the state file, within the caps; returns false when the app
    /// budget is spent and the app was left out. An app already present is added to.
    pub fn restore(&mut self, record: &AppRecord) -> bool {
        let max_ips = self.limits.max_ips_per_app;
        let (hash, index) = self.locate(&record.app);
        let hasher = &self.hasher;
        let shard = &mut self.shards[index];
        let entry = match shard.entry(hash, |e| e.app == record.app, |e| hasher.hash(&e.app)) {
            hashbrown::hash_table::Entry::Occupied(found) => found.into_mut(),
            hashbrown::hash_table::Entry::Vacant(slot) => {
                if !self.budget.join(&record.app, hash) {
                    return false;
                }
                self.len += 1;
                slot.insert(AppEntry::empty(record.app)).into_mut()
            }
        };
        entry.add_events(record.partial.events);
        if record.partial.ips_truncated {
            entry.mark_truncated();
        }
        for &(ip, events) in &record.partial.ips {
            if events > 0 && !entry.ips.add(ip, events, max_ips) {
                entry.mark_truncated();
            }
        }
        true
    }

    /// Forgets `app`; returns whether it was known.
    pub fn remove(&mut self, app: &AppKey) -> bool {
        let (hash, index) = self.locate(app);
        let shard = &mut self.shards[index];
        let Ok(found) = shard.find_entry(hash, |e| e.app == *app) else {
            return false;
        };
        found.remove();
        self.len -= 1;
        if self.registered {
            self.budget.leave(app, hash);
        }
        true
    }

    /// Hands over every app and leaves this table empty, with the same caps and budget: O(1),
    /// the old table's memory moves with it.
    pub fn take(&mut self) -> AppTable {
        let empty = AppTable::new(self.limits, self.budget.clone());
        std::mem::replace(self, empty)
    }

    /// Every app, consuming the table; the app budget is given back at once.
    pub fn into_records(mut self) -> impl Iterator<Item = AppRecord> {
        if self.registered {
            self.budget.leave_all(&self.shards);
            self.registered = false;
        }
        let shards = std::mem::take(&mut self.shards);
        shards
            .into_vec()
            .into_iter()
            .flatten()
            .map(|entry| AppRecord {
                app: entry.app,
                partial: entry.partial(),
            })
    }

    /// Apps held by this table.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks what must hold after any sequence of events: an app's IPs are distinct and
    /// within the cap, their counts add up to the app's count unless IPs were dropped, each
    /// app is in its shard, and the shared register holds every app. For tests and fuzzing.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.budget.used() < self.len {
            return Err(format!("budget {} < {} apps", self.budget.used(), self.len));
        }
        let held: usize = self.shards.iter().map(HashTable::len).sum();
        if held != self.len {
            return Err(format!("{held} apps held, {} counted", self.len));
        }
        for (index, shard) in self.shards.iter().enumerate() {
            for entry in shard {
                let app = &entry.app;
                if self.locate(app).1 != index {
                    return Err(format!("{app:?} is in shard {index}, not its own"));
                }
                if self.budget.holders(app) == 0 {
                    return Err(format!("{app:?} is not in the register"));
                }
                let mut ips = entry.ips.pairs();
                let stored = ips.len();
                if stored != entry.ips.len()
                    || stored > self.limits.max_ips_per_app
                    || (stored == 0 && !entry.ips_truncated())
                {
                    return Err(format!("{app:?} stores {stored} ips"));
                }
                ips.sort_unstable();
                ips.dedup_by_key(|(ip, _)| *ip);
                if ips.len() != stored {
                    return Err(format!("{app:?} stores an ip twice"));
                }
                let ip_events: u64 = ips.iter().map(|&(_, events)| events).sum();
                let consistent = if entry.ips_truncated() {
                    ip_events <= entry.events()
                } else {
                    ip_events == entry.events()
                };
                if !consistent {
                    return Err(format!(
                        "{app:?} has {} events but its ips {ip_events} (truncated: {})",
                        entry.events(),
                        entry.ips_truncated()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Distinct (app, ip) pairs held by this table.
    pub fn pairs(&self) -> usize {
        self.shards
            .iter()
            .flat_map(|shard| shard.iter())
            .map(|entry| entry.ips.len())
            .sum()
    }
}

impl Drop for AppTable {
    fn drop(&mut self) {
        if self.registered {
            self.budget.leave_all(&self.shards);
        }
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
        drop(first.take());
        assert_eq!(budget.used(), 0);
        assert_eq!(first.partial(&app(1)), Partial::default());
    }

    /// `N` tables sharing one budget of `max_apps`, as a server's workers do.
    fn tables_sharing<const N: usize>(
        max_apps: usize,
        max_ips_per_app: usize,
    ) -> (Arc<AppBudget>, [AppTable; N]) {
        let budget = Arc::new(AppBudget::new(max_apps));
        let limits = Limits { max_ips_per_app };
        let tables = std::array::from_fn(|_| AppTable::new(limits, budget.clone()));
        (budget, tables)
    }

    /// A reset takes every table and clears the register in one step; the old tables then
    /// drop without giving anything back twice, and the new ones count from zero.
    #[test]
    fn clearing_the_budget_forgets_every_table_at_once() {
        let (budget, mut workers) = tables_sharing::<2>(3, 10);
        for n in 0..3 {
            for worker in &mut workers {
                assert_eq!(worker.apply(Event { app: app(n), ip: 1 }), Applied::Stored);
            }
        }
        assert_eq!((budget.used(), budget.entries()), (3, 6));
        let taken = workers.iter_mut().map(AppTable::take).collect();
        let freed = budget.clear(taken);
        assert_eq!((budget.used(), budget.entries()), (0, 0));
        drop(freed);
        assert_eq!((budget.used(), budget.entries()), (0, 0));
        for n in 10..13 {
            assert_eq!(
                workers[0].apply(Event { app: app(n), ip: 1 }),
                Applied::Stored
            );
        }
        assert_eq!(
            workers[1].apply(Event {
                app: app(20),
                ip: 1
            }),
            Applied::AppDropped
        );
        assert_eq!(
            workers[1].apply(Event {
                app: app(10),
                ip: 1
            }),
            Applied::Stored
        );
        for worker in &workers {
            assert_eq!(worker.check_invariants(), Ok(()));
        }
    }

    /// Issue 11: with random steering an app's next event lands on a worker that has no entry
    /// for it yet; a flood of made-up apps must not make that worker drop it.
    #[test]
    fn a_tracked_app_keeps_every_event_on_every_worker() {
        let (budget, mut workers) = tables_sharing::<2>(100, 10);
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
        drop(workers[1].take());
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
        let records: Vec<AppRecord> = (0..SHARDS)
            .flat_map(|shard| source.shard_records(shard))
            .collect();
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
        assert_eq!(worker.budget.used(), 0);
        assert_eq!(worker.check_invariants(), Ok(()));
    }

    #[test]
    fn sizes() {
        // The unit of memory per app inside a table's slot (a pair's is `ip_set`'s).
        assert_eq!(std::mem::size_of::<AppEntry>(), 56);
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

            /// Any interleaving of events over workers (as a steering change moves an app
            /// from one worker to several and back), one-app resets, full resets and caps
            /// keeps every app's answer exact against a model, and the budget counts exactly
            /// the distinct apps and the entries the workers hold.
            #[test]
            fn the_budget_and_the_answers_follow_any_interleaving(
                ops in proptest::collection::vec((0u8..12, 0u8..10, 0u32..40, 0usize..3), 0..500),
                max_apps in 1usize..8,
            ) {
                let budget = Arc::new(AppBudget::new(max_apps));
                let limits = Limits { max_ips_per_app: 20 };
                let mut workers: Vec<AppTable> =
                    (0..3).map(|_| AppTable::new(limits, budget.clone())).collect();
                // The model: per app, its events (the IP cap is 20 and at most 40 IPs are
                // drawn, so a worker may truncate its IPs; its counts never).
                let mut model: BTreeMap<u8, u64> = BTreeMap::new();
                for &(op, a, ip, worker) in &ops {
                    match op {
                        0 => {
                            for table in &mut workers {
                                table.remove(&app(a));
                            }
                            model.remove(&a);
                        }
                        1 => {
                            let taken = workers.iter_mut().map(AppTable::take).collect();
                            drop(budget.clear(taken));
                            model.clear();
                        }
                        _ => {
                            let applied = workers[worker].apply(Event { app: app(a), ip });
                            let tracked = model.contains_key(&a);
                            if applied == Applied::AppDropped {
                                prop_assert!(!tracked && model.len() == max_apps);
                            } else {
                                prop_assert!(tracked || model.len() < max_apps);
                                *model.entry(a).or_default() += 1;
                            }
                        }
                    }
                    prop_assert_eq!(budget.used(), model.len());
                    let entries: usize = workers.iter().map(AppTable::len).sum();
                    prop_assert_eq!(budget.entries(), entries);
                }
                for table in &workers {
                    prop_assert_eq!(table.check_invariants(), Ok(()));
                }
                for a in 0..10 {
                    let merged = merge_partials(workers.iter().map(|t| t.partial(&app(a))));
                    prop_assert_eq!(merged.events, model.get(&a).copied().unwrap_or(0));
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

//! Fuzzes the datagram path a worker runs: `wire::parse`, then `AppTable::apply`.
//!
//! The whole input is one datagram; then the pieces between `DATAGRAM_SPLIT` markers are
//! datagrams of their own, so one input applies several events, and an empty piece (two
//! markers in a row) forgets the app of the last valid event, as `DELETE /events/{sha}` does.
//! For every datagram it checks that:
//!
//! - whatever `parse` accepts, prost's `IpEvent::decode` accepts with the same sha and ip, and
//!   whatever `parse` calls malformed, prost rejects too;
//! - a worker's key cache, which lives across inputs as it does in a worker, parses it as
//!   `parse` does and locates its app as the table's hasher does;
//! - two tables fed the same events, one with a small IP cap and one past the flat vector's
//!   32 entries, return the `Applied` and hold the `Partial` that a plain model predicts, and
//!   pass `check_invariants`;
//! - the app's verdict names either no good IPs or the 14 hosts of one /28.
//!
//! The tables live across inputs, so counts and caps build up as they do in a long-running
//! worker, and are cleared every `CLEAR_EVERY_INPUTS` inputs, which exercises the budget's
//! give-back. A crash that needs that history may not reproduce from its input alone; the
//! pieces exist so that most state a bug needs fits in one input.
#![no_main]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use ipevents::key_cache::KeyCache;
use ipevents::store::{self, AppBudget, AppTable, Applied, Limits, Partial};
use ipevents::wire::{self, AppKey, Event, IpEvent, Reject};
use ipevents_fuzz::DATAGRAM_SPLIT;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// The app budget of each table: small, so that fuzzed shas exhaust it.
const MAX_APPS: usize = 64;
/// An IP cap that fuzzed apps reach within one input.
const SMALL_MAX_IPS: usize = 8;
/// An IP cap past the 32 IPs an app keeps in a flat vector, so the move to a hash map runs.
const LARGE_MAX_IPS: usize = 40;
const CLEAR_EVERY_INPUTS: u64 = 4096;

/// What the tables should hold, kept the obvious way.
#[derive(Default)]
struct Model {
    apps: HashMap<AppKey, ModelApp>,
}

struct ModelApp {
    events: u64,
    /// Distinct IPs and their events in the order they were first seen, at most
    /// `LARGE_MAX_IPS`: a table with a cap of k keeps exactly the first k of them.
    ips: Vec<(u32, u64)>,
    /// An IP beyond the first `LARGE_MAX_IPS` was seen.
    more_ips: bool,
}

impl Model {
    /// What a table with `max_ips` answers to `event`.
    fn expect(&self, event: Event, max_ips: usize) -> Applied {
        let Some(app) = self.apps.get(&event.app) else {
            return if self.apps.len() < MAX_APPS {
                Applied::Stored
            } else {
                Applied::AppDropped
            };
        };
        match app.ips.iter().position(|&(ip, _)| ip == event.ip) {
            Some(index) if index < max_ips => Applied::Stored,
            None if app.ips.len() < max_ips => Applied::Stored,
            _ => Applied::IpDropped,
        }
    }

    fn apply(&mut self, event: Event) {
        if let Some(app) = self.apps.get_mut(&event.app) {
            app.events += 1;
            if let Some(entry) = app.ips.iter_mut().find(|(ip, _)| *ip == event.ip) {
                entry.1 += 1;
            } else if app.ips.len() < LARGE_MAX_IPS {
                app.ips.push((event.ip, 1));
            } else {
                app.more_ips = true;
            }
        } else if self.apps.len() < MAX_APPS {
            let app = ModelApp {
                events: 1,
                ips: vec![(event.ip, 1)],
                more_ips: false,
            };
            self.apps.insert(event.app, app);
        }
    }

    /// The partial a table with `max_ips` gives for `app`, its IPs sorted.
    fn partial(&self, app: &AppKey, max_ips: usize) -> Partial {
        let Some(app) = self.apps.get(app) else {
            return Partial::default();
        };
        let mut ips: Vec<(u32, u64)> = app.ips.iter().take(max_ips).copied().collect();
        ips.sort_unstable();
        Partial {
            events: app.events,
            ips,
            ips_truncated: app.ips.len() > max_ips || app.more_ips,
        }
    }
}

/// A table and the cap it was built with.
struct Table {
    table: AppTable,
    budget: Arc<AppBudget>,
    max_ips: usize,
}

impl Table {
    fn new(max_ips: usize) -> Table {
        let budget = Arc::new(AppBudget::new(MAX_APPS));
        let limits = Limits {
            max_ips_per_app: max_ips,
        };
        Table {
            table: AppTable::new(limits, budget.clone()),
            budget,
            max_ips,
        }
    }

    fn partial(&self, app: &AppKey) -> Partial {
        let mut partial = self.table.partial(app);
        partial.ips.sort_unstable();
        partial
    }
}

struct Harness {
    tables: [Table; 2],
    /// Locates apps by the first table's hasher.
    keys: KeyCache,
    model: Model,
    inputs: u64,
}

impl Harness {
    fn new() -> Harness {
        let tables = [Table::new(SMALL_MAX_IPS), Table::new(LARGE_MAX_IPS)];
        Harness {
            keys: KeyCache::new(tables[0].table.hasher().clone()),
            tables,
            model: Model::default(),
            inputs: 0,
        }
    }

    fn run(&mut self, data: &[u8]) {
        self.inputs += 1;
        if self.inputs.is_multiple_of(CLEAR_EVERY_INPUTS) {
            self.clear();
        }
        self.datagram(data);
        if data.len() > DATAGRAM_SPLIT.len() && contains(data, DATAGRAM_SPLIT) {
            let mut last_app = None;
            for piece in split(data, DATAGRAM_SPLIT) {
                if piece.is_empty() {
                    if let Some(app) = last_app.take() {
                        self.remove(&app);
                    }
                }
                if let Some(app) = self.datagram(piece) {
                    last_app = Some(app);
                }
            }
        }
        for table in &self.tables {
            if let Err(broken) = table.table.check_invariants() {
                panic!("max_ips {}: {broken}", table.max_ips);
            }
            assert_eq!(table.table.len(), self.model.apps.len(), "apps held");
            assert_eq!(table.budget.used(), table.table.len(), "budget in use");
        }
    }

    /// Parses and applies one datagram; returns its app when it was valid.
    fn datagram(&mut self, datagram: &[u8]) -> Option<AppKey> {
        let parsed = wire::parse(datagram);
        check_against_prost(datagram, parsed);
        self.check_key_cache(datagram, parsed);
        let event = parsed.ok()?;
        for table in &mut self.tables {
            let want = self.model.expect(event, table.max_ips);
            let got = table.table.apply(event);
            assert_eq!(got, want, "max_ips {}: applying {event:?}", table.max_ips);
        }
        self.model.apply(event);
        self.check_app(&event.app);
        Some(event.app)
    }

    /// The key cache's parse is the wire's, and its location the table's.
    fn check_key_cache(&mut self, datagram: &[u8], parsed: Result<Event, Reject>) {
        let mut event = Event::UNSET;
        let got = self.keys.parse_into(datagram, &mut event);
        match (got, parsed) {
            (Ok(located), Ok(want)) => {
                assert_eq!(event, want, "the key cache's event");
                assert_eq!(located.at, self.tables[0].table.locate(&event.app), "its location");
            }
            (Err(got), Err(want)) => assert_eq!(got, want, "the key cache's rejection"),
            (got, want) => panic!("the key cache gave {got:?}, parse {want:?}"),
        }
    }

    fn remove(&mut self, app: &AppKey) {
        let known = self.model.apps.remove(app).is_some();
        for table in &mut self.tables {
            assert_eq!(table.table.remove(app), known, "removing {app:?}");
        }
        self.check_app(app);
    }

    fn clear(&mut self) {
        self.model = Model::default();
        for table in &mut self.tables {
            // As a reset does: take the table, clear the budget in one step, drop the old one.
            assert_eq!(table.table.check_invariants(), Ok(()));
            let taken = table.table.take();
            drop(table.budget.clear(vec![taken]));
            assert_eq!(table.budget.used(), 0, "budget after clear");
            assert!(table.table.is_empty());
        }
    }

    fn check_app(&self, app: &AppKey) {
        for table in &self.tables {
            assert_eq!(
                table.partial(app),
                self.model.partial(app, table.max_ips),
                "max_ips {}: partial for {app:?}",
                table.max_ips
            );
        }
        let verdict = store::classify(&store::merge_partials([self.tables[1].partial(app)]));
        if let Some(&first) = verdict.good_ips.first() {
            let network = first & !0xf;
            let hosts: Vec<u32> = (1..=14).map(|host| network | host).collect();
            assert_eq!(verdict.good_ips, hosts, "good ips of {app:?}");
        }
        assert!(
            verdict.bad_ips.windows(2).all(|pair| pair[0] < pair[1]),
            "bad ips of {app:?} are sorted and distinct"
        );
        assert!(
            verdict
                .bad_ips
                .iter()
                .all(|ip| !verdict.good_ips.contains(ip)),
            "an ip of {app:?} is both good and bad"
        );
    }
}

/// `parse` is stricter than prost (it enforces the required fields and their ranges), never
/// looser: what it accepts prost decodes to the same event, and what it finds malformed prost
/// cannot decode.
fn check_against_prost(datagram: &[u8], parsed: Result<Event, Reject>) {
    let decoded = IpEvent::decode(datagram);
    match parsed {
        Ok(event) => {
            let decoded = decoded.expect("prost decodes what parse accepts");
            assert_eq!(decoded.app_sha256.to_lowercase(), event.app.to_hex());
            assert_eq!(decoded.ip, i64::from(event.ip));
        }
        Err(Reject::Malformed) => {
            assert!(decoded.is_err(), "prost decodes what parse calls malformed");
        }
        Err(Reject::Empty) => assert!(datagram.is_empty()),
        Err(Reject::Oversized) => assert!(datagram.len() > wire::MAX_DATAGRAM_BYTES),
        Err(_) => {}
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The pieces of `data` between occurrences of `marker`, empty pieces included.
fn split<'a>(data: &'a [u8], marker: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let current = rest?;
        match current
            .windows(marker.len())
            .position(|window| window == marker)
        {
            Some(at) => {
                rest = Some(&current[at + marker.len()..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

thread_local! {
    static HARNESS: RefCell<Harness> = RefCell::new(Harness::new());
}

fuzz_target!(|data: &[u8]| {
    HARNESS.with(|harness| harness.borrow_mut().run(data));
});

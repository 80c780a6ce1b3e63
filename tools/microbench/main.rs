//! `microbench`: the worker's own cost per datagram, without the kernel: parse and apply
//! (`worker::apply_batch`, the code a worker runs on every batch) over the reference mix and
//! over many apps, and the parts of it measured alone (the hex decode, the app table's hash).
//!
//! The datagrams are encoded once, before timing, the way loadgen encodes them, in batches of
//! the server's default size; every table is warmed with one pass first, so that what is
//! timed is the steady state of a worker that already holds the apps. Each figure is the
//! median of `--runs` passes. Nothing here touches a socket.
#![forbid(unsafe_code)]

#[allow(dead_code)]
#[path = "../loadgen/scenario.rs"]
mod scenario;

use std::hash::{BuildHasher, RandomState};
use std::hint::black_box;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use ipevents::keyed_hash::KeyedHash;
use ipevents::store::{AppBudget, AppTable, Limits};
use ipevents::wire::{self, AppKey};
use ipevents::worker::{self, Tally};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::scenario::{ManyApps, Scenario, GOOD_HOSTS, SLOT_BYTES};

/// Measures the worker's user-space cost per datagram; prints a table, or one JSON object.
#[derive(Parser, Debug)]
#[command(name = "microbench", version)]
struct Args {
    /// Datagrams per timed pass.
    #[arg(long, default_value_t = 2_000_000)]
    datagrams: usize,

    /// Apps of the many-apps mix (14 good and 2 bad IPs each, as loadgen's many-apps).
    #[arg(long, default_value_t = 100_000)]
    apps: usize,

    /// Timed passes per figure; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,

    /// Datagrams per batch, as the server's `--batch`.
    #[arg(long, default_value_t = 64)]
    batch: usize,

    /// KiB of other memory written between two batches, untimed, as the kernel's receive
    /// path does between two `recvmmsg` calls in the server: each batch then starts with the
    /// table's lines out of the first-level cache. 0 keeps every cache warm.
    #[arg(long, default_value_t = 0)]
    evict_kib: usize,

    /// Seed of the traffic.
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Datagrams in traffic order, each in a fixed slot as loadgen encodes them.
struct Traffic {
    slots: Vec<[u8; SLOT_BYTES]>,
    lens: Vec<u8>,
}

impl Traffic {
    /// `count` datagrams of `scenario`, each naming a uniformly drawn app and one of its IPs,
    /// as loadgen's unpaced senders do.
    fn draw(scenario: &Scenario, count: usize, rng: &mut SmallRng) -> Traffic {
        let mut slots = vec![[0u8; SLOT_BYTES]; count];
        let mut lens = Vec::with_capacity(count);
        for slot in &mut slots {
            let app = rng.random_range(0..scenario.apps());
            let ip = rng.random_range(0..scenario.ips_per_app());
            lens.push(scenario.encode(app, ip, slot) as u8);
        }
        Traffic { slots, lens }
    }

    fn datagram(&self, i: usize) -> &[u8] {
        &self.slots[i][..usize::from(self.lens[i])]
    }

    fn len(&self) -> usize {
        self.slots.len()
    }
}

/// Nanoseconds per datagram of parse and apply over `traffic`, median of `runs` passes over a
/// table warmed by one pass.
fn parse_and_apply_ns(traffic: &Traffic, batch: usize, runs: usize, evict_kib: usize) -> f64 {
    let mut table = AppTable::new(
        Limits {
            max_ips_per_app: 4096,
        },
        Arc::new(AppBudget::new(usize::MAX)),
    );
    let mut parser = worker::BatchParser::new(batch, &table);
    let mut other = vec![0u8; evict_kib * 1024];
    let mut pass = |table: &mut AppTable| {
        let mut tally = Tally::default();
        let mut elapsed = std::time::Duration::ZERO;
        let mut started = Instant::now();
        for start in (0..traffic.len()).step_by(batch) {
            let end = (start + batch).min(traffic.len());
            let datagrams = (start..end).map(|i| traffic.datagram(i));
            worker::apply_batch(datagrams, &mut parser, table, &mut tally);
            if !other.is_empty() {
                elapsed += started.elapsed();
                for line in other.chunks_mut(64) {
                    line[0] = line[0].wrapping_add(1);
                }
                black_box(&mut other);
                started = Instant::now();
            }
        }
        elapsed += started.elapsed();
        assert_eq!(
            tally.ingested(),
            traffic.len() as u64,
            "every datagram is valid"
        );
        elapsed.as_nanos() as f64 / traffic.len() as f64
    };
    pass(&mut table);
    median((0..runs).map(|_| pass(&mut table)).collect())
}

/// Nanoseconds per datagram of `wire::parse` alone.
fn parse_ns(traffic: &Traffic, runs: usize) -> f64 {
    median(
        (0..runs)
            .map(|_| {
                let started = Instant::now();
                for i in 0..traffic.len() {
                    let _ = black_box(wire::parse(black_box(traffic.datagram(i))));
                }
                started.elapsed().as_nanos() as f64 / traffic.len() as f64
            })
            .collect(),
    )
}

/// Nanoseconds per key of hashing `keys` with `hasher`.
fn hash_ns(keys: &[AppKey], hasher: &impl BuildHasher, runs: usize) -> f64 {
    median(
        (0..runs)
            .map(|_| {
                let started = Instant::now();
                for key in keys {
                    black_box(hasher.hash_one(black_box(key)));
                }
                started.elapsed().as_nanos() as f64 / keys.len() as f64
            })
            .collect(),
    )
}

/// Nanoseconds per sha of checking and decoding 64 hex digits into 32 bytes with `decode`,
/// which says whether the digits were valid.
fn decode_ns(shas: &[[u8; 64]], decode: impl Fn(&[u8], &mut [u8; 32]) -> bool, runs: usize) -> f64 {
    median(
        (0..runs)
            .map(|_| {
                let started = Instant::now();
                for sha in shas {
                    let mut key = [0u8; 32];
                    black_box(decode(black_box(sha), &mut key));
                    black_box(&key);
                }
                started.elapsed().as_nanos() as f64 / shas.len() as f64
            })
            .collect(),
    )
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.runs == 0 || args.batch == 0 || args.datagrams == 0 || args.apps == 0 {
        eprintln!("microbench: --runs, --batch, --datagrams and --apps must be at least 1");
        return ExitCode::from(2);
    }
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let reference = match Scenario::reference(&mut rng) {
        Ok(scenario) => scenario,
        Err(e) => {
            eprintln!("microbench: {e}");
            return ExitCode::from(2);
        }
    };
    let shape = ManyApps {
        apps: args.apps,
        good_ips: GOOD_HOSTS,
        bad_ips: 2,
    };
    let many = match Scenario::many_apps(&mut rng, shape) {
        Ok(scenario) => scenario,
        Err(e) => {
            eprintln!("microbench: {e}");
            return ExitCode::from(2);
        }
    };
    let reference_traffic = Traffic::draw(&reference, args.datagrams, &mut rng);
    let many_traffic = Traffic::draw(&many, args.datagrams, &mut rng);

    let reference_ns =
        parse_and_apply_ns(&reference_traffic, args.batch, args.runs, args.evict_kib);
    let many_ns = parse_and_apply_ns(&many_traffic, args.batch, args.runs, args.evict_kib);
    let parse_only_ns = parse_ns(&reference_traffic, args.runs);

    let keys: Vec<AppKey> = (0..1_000_000)
        .map(|_| AppKey(std::array::from_fn(|_| rng.random())))
        .collect();
    let siphash_ns = hash_ns(&keys, &RandomState::new(), args.runs);
    let keyed_ns = hash_ns(&keys, &KeyedHash::new(), args.runs);
    let shas: Vec<[u8; 64]> = keys
        .iter()
        .map(|key| key.to_hex().into_bytes().try_into().expect("64 digits"))
        .collect();
    let decode_ns_server = decode_ns(
        &shas,
        |digits, key| AppKey::from_hex(digits).map(|app| *key = app.0).is_some(),
        args.runs,
    );
    let decode_ns_const_hex = decode_ns(
        &shas,
        |digits, key| const_hex::decode_to_slice(digits, key).is_ok(),
        args.runs,
    );
    let decode_ns_faster_hex = decode_ns(
        &shas,
        |digits, key| faster_hex::hex_decode(digits, key).is_ok(),
        args.runs,
    );
    let decode_ns_hex_crate = decode_ns(
        &shas,
        |digits, key| hex::decode_to_slice(digits, key).is_ok(),
        args.runs,
    );

    let ips = reference.ips_per_app();
    let rows = [
        (
            "parse_apply_reference_ns",
            reference_ns,
            format!("parse + apply, reference mix (3 apps, {ips} IPs each)"),
        ),
        (
            "parse_apply_many_apps_ns",
            many_ns,
            format!("parse + apply, many apps ({} apps, 16 IPs each)", args.apps),
        ),
        (
            "parse_ns",
            parse_only_ns,
            "parse alone, reference mix".to_owned(),
        ),
        (
            "hex_decode_ns",
            decode_ns_server,
            "64 hex digits checked and decoded (the server's, hex-simd)".to_owned(),
        ),
        (
            "hex_decode_const_hex_ns",
            decode_ns_const_hex,
            "the same with const-hex".to_owned(),
        ),
        (
            "hex_decode_faster_hex_ns",
            decode_ns_faster_hex,
            "the same with faster-hex".to_owned(),
        ),
        (
            "hex_decode_hex_crate_ns",
            decode_ns_hex_crate,
            "the same with the hex crate".to_owned(),
        ),
        (
            "hash_keyed_ns",
            keyed_ns,
            "hash of a 32-byte key, the table's seeded foldhash".to_owned(),
        ),
        (
            "hash_siphash_ns",
            siphash_ns,
            "the same with std's SipHash-1-3".to_owned(),
        ),
    ];
    if args.json {
        let fields: Vec<String> = rows
            .iter()
            .map(|(name, ns, _)| format!("\"{name}\":{ns:.2}"))
            .collect();
        println!("{{\"reference_ips_per_app\":{ips},{}}}", fields.join(","));
    } else {
        for (_, ns, what) in &rows {
            println!("{ns:>8.2} ns  {what}");
        }
    }
    ExitCode::SUCCESS
}

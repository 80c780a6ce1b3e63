//! The random world of one run: the apps, each app's home /28 and its IPs, and the datagrams
//! that name them.
//!
//! Everything here is drawn from one seeded generator before the first datagram is sent, so
//! `--seed` reproduces the whole run. This module does no I/O. Encoding a datagram writes into
//! a caller's fixed slot and never allocates, because the senders call it per datagram.

use prost::bytes::BufMut;
use prost::encoding::{encode_key, encode_varint, WireType};
use rand::rngs::SmallRng;
use rand::{Rng, RngExt};

/// Hosts of a /28 that count as an app's good IPs: .1 to .14.
pub const GOOD_HOSTS: usize = 14;

/// Bad IPs this close to the block's base would fall inside, or right next to, the home /28,
/// which would make the expected answer ambiguous (the reference client's rule).
const NEAR_BLOCK: u32 = 28;

/// The reference client draws between 1 and this many bad IPs.
const REFERENCE_MAX_BAD: usize = 10;

/// The reference client's run has three apps: the one under test and two others.
const REFERENCE_APPS: usize = 3;

/// IPs per app are tracked in a 64-bit mask, so an app has at most this many.
pub const MAX_IPS_PER_APP: usize = 64;

/// Attempts to draw one bad IP before giving up. A random address is unusable with odds of
/// about one in a million, so the bound is never reached in practice, but it is a bound.
const REDRAWS: usize = 1000;

/// Bytes one encoded datagram may take: key and length (2), the sha (64), key (1), and the IP
/// as a varint of at most 5 bytes, rounded up.
pub const SLOT_BYTES: usize = 80;

/// Pre-encode every datagram when the table takes at most this many bytes; beyond it (many
/// apps) the senders encode into their batch buffers instead.
const PREENCODE_MAX_BYTES: usize = 64 << 20;

/// Which world to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[clap(rename_all = "kebab-case")]
pub enum ScenarioKind {
    /// The reference client's run: three apps sharing one home /28 and 1 to 10 bad IPs.
    Reference,
    /// `--apps` apps, each with its own home /28, `--good-ips` of its hosts and `--bad-ips`
    /// bad IPs.
    ManyApps,
}

impl ScenarioKind {
    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::Reference => "reference",
            ScenarioKind::ManyApps => "many-apps",
        }
    }
}

/// The shape of a many-apps world.
#[derive(Clone, Copy, Debug)]
pub struct ManyApps {
    pub apps: usize,
    pub good_ips: usize,
    pub bad_ips: usize,
}

/// Every app, its home block and its IPs, in flat arrays so that a million apps stay cheap.
pub struct Scenario {
    pub kind: ScenarioKind,
    /// Each app's sha256 as 64 lowercase hex digits.
    shas: Vec<[u8; 64]>,
    /// Each app's home /28, as its network address.
    blocks: Vec<u32>,
    /// `ips_per_app` addresses per app: its good IPs first, then its bad IPs.
    ips: Vec<u32>,
    ips_per_app: usize,
    good_per_app: usize,
    /// Every datagram, encoded once: slot `app * ips_per_app + ip_index`, when small enough.
    preencoded: Option<Preencoded>,
}

/// All datagrams of a small world, each in its own fixed slot.
struct Preencoded {
    slots: Vec<[u8; SLOT_BYTES]>,
    lens: Vec<u8>,
}

impl Scenario {
    /// The reference client's world: a random /28, 1 to 10 bad IPs away from it, and three
    /// random apps; every (app, ip) pair is one event.
    pub fn reference(rng: &mut SmallRng) -> Result<Scenario, String> {
        let block = random_block(rng);
        let good: Vec<u32> = (1..=GOOD_HOSTS as u32).map(|host| block | host).collect();
        let bad_count = rng.random_range(1..=REFERENCE_MAX_BAD);
        let bad = draw_bad_ips(rng, block, bad_count)?;
        let mut scenario = Scenario::empty(ScenarioKind::Reference, good.len(), bad.len());
        for _ in 0..REFERENCE_APPS {
            scenario.push_app(random_sha(rng), block, &good, &bad);
        }
        scenario.preencode();
        Ok(scenario)
    }

    /// `shape.apps` apps, each with its own random /28, `good_ips` of its 14 hosts and
    /// `bad_ips` addresses away from it.
    pub fn many_apps(rng: &mut SmallRng, shape: ManyApps) -> Result<Scenario, String> {
        let mut scenario = Scenario::empty(ScenarioKind::ManyApps, shape.good_ips, shape.bad_ips);
        scenario.shas.reserve_exact(shape.apps);
        scenario.blocks.reserve_exact(shape.apps);
        scenario
            .ips
            .reserve_exact(shape.apps * scenario.ips_per_app);
        let mut good = Vec::with_capacity(GOOD_HOSTS);
        for _ in 0..shape.apps {
            let block = random_block(rng);
            good.clear();
            if shape.good_ips == GOOD_HOSTS {
                good.extend((1..=GOOD_HOSTS as u32).map(|host| block | host));
            } else {
                let hosts = rand::seq::index::sample(rng, GOOD_HOSTS, shape.good_ips);
                good.extend(hosts.iter().map(|i| block | (i as u32 + 1)));
                good.sort_unstable();
            }
            let bad = draw_bad_ips(rng, block, shape.bad_ips)?;
            scenario.push_app(random_sha(rng), block, &good, &bad);
        }
        scenario.preencode();
        Ok(scenario)
    }

    fn empty(kind: ScenarioKind, good_per_app: usize, bad_per_app: usize) -> Scenario {
        Scenario {
            kind,
            shas: Vec::new(),
            blocks: Vec::new(),
            ips: Vec::new(),
            ips_per_app: good_per_app + bad_per_app,
            good_per_app,
            preencoded: None,
        }
    }

    fn push_app(&mut self, sha: [u8; 64], block: u32, good: &[u32], bad: &[u32]) {
        debug_assert_eq!(good.len() + bad.len(), self.ips_per_app);
        self.shas.push(sha);
        self.blocks.push(block);
        self.ips.extend_from_slice(good);
        self.ips.extend_from_slice(bad);
    }

    fn preencode(&mut self) {
        let datagrams = self.ips.len();
        if datagrams * SLOT_BYTES > PREENCODE_MAX_BYTES {
            return;
        }
        let mut slots = vec![[0u8; SLOT_BYTES]; datagrams];
        let mut lens = Vec::with_capacity(datagrams);
        for (i, slot) in slots.iter_mut().enumerate() {
            let app = i / self.ips_per_app;
            let len = encode_event(&self.shas[app], self.ips[i], slot);
            lens.push(len as u8);
        }
        self.preencoded = Some(Preencoded { slots, lens });
    }

    pub fn apps(&self) -> usize {
        self.shas.len()
    }

    pub fn ips_per_app(&self) -> usize {
        self.ips_per_app
    }

    /// Whether the `ip_index`th IP of an app is one of its good IPs.
    pub fn is_good(&self, ip_index: usize) -> bool {
        ip_index < self.good_per_app
    }

    pub fn sha_hex(&self, app: usize) -> &str {
        std::str::from_utf8(&self.shas[app]).expect("shas are ASCII hex")
    }

    /// The network address of the app's home /28.
    pub fn block(&self, app: usize) -> u32 {
        self.blocks[app]
    }

    /// The app's IPs: good ones first, then bad ones.
    pub fn ips(&self, app: usize) -> &[u32] {
        &self.ips[app * self.ips_per_app..(app + 1) * self.ips_per_app]
    }

    pub fn is_preencoded(&self) -> bool {
        self.preencoded.is_some()
    }

    /// The pre-encoded datagram for one (app, ip) pair, if the world was small enough to
    /// pre-encode.
    pub fn preencoded(&self, app: usize, ip_index: usize) -> Option<&[u8]> {
        let table = self.preencoded.as_ref()?;
        let i = app * self.ips_per_app + ip_index;
        Some(&table.slots[i][..usize::from(table.lens[i])])
    }

    /// Encodes the datagram for one (app, ip) pair into `slot`; returns its length.
    pub fn encode(&self, app: usize, ip_index: usize, slot: &mut [u8; SLOT_BYTES]) -> usize {
        encode_event(
            &self.shas[app],
            self.ips[app * self.ips_per_app + ip_index],
            slot,
        )
    }
}

/// A random /28, as its network address.
fn random_block(rng: &mut SmallRng) -> u32 {
    rng.next_u32() & 0xFFFF_FFF0
}

/// 64 lowercase hex digits from the seeded generator, so that `--seed` reproduces the apps.
fn random_sha(rng: &mut SmallRng) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut raw = [0u8; 32];
    rng.fill_bytes(&mut raw);
    let mut hex = [0u8; 64];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(raw) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xF)];
    }
    hex
}

/// Draws `count` addresses more than [`NEAR_BLOCK`] from the block's base, each in a /28 of
/// its own. Distinct /28s keep the expected answer decidable: the home block wins as soon as
/// two of its hosts were sent, because no other block then holds more than one sent IP.
fn draw_bad_ips(rng: &mut SmallRng, block: u32, count: usize) -> Result<Vec<u32>, String> {
    let mut bad: Vec<u32> = Vec::with_capacity(count);
    for _ in 0..count {
        let ip = (0..REDRAWS)
            .map(|_| rng.next_u32())
            .find(|&ip| {
                ip.abs_diff(block) > NEAR_BLOCK && bad.iter().all(|&other| other >> 4 != ip >> 4)
            })
            .ok_or_else(|| format!("could not draw a bad IP away from the block {block:#x}"))?;
        bad.push(ip);
    }
    Ok(bad)
}

/// Writes one `IpEvent{app_sha256, ip}` as protobuf into `slot`, exactly as
/// `ipevents::wire::encode` would, without allocating; returns its length.
pub fn encode_event(sha_hex: &[u8; 64], ip: u32, slot: &mut [u8; SLOT_BYTES]) -> usize {
    let mut out: &mut [u8] = &mut slot[..];
    encode_key(1, WireType::LengthDelimited, &mut out);
    encode_varint(sha_hex.len() as u64, &mut out);
    out.put_slice(sha_hex);
    encode_key(2, WireType::Varint, &mut out);
    // int64 on the wire: a non-negative value is its plain varint.
    encode_varint(u64::from(ip), &mut out);
    SLOT_BYTES - out.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn encoding_matches_the_library() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut slot = [0u8; SLOT_BYTES];
        for ip in [0, 1, 127, 128, 0x0a00_0001, u32::MAX] {
            let sha = random_sha(&mut rng);
            let sha_str = std::str::from_utf8(&sha).unwrap();
            let len = encode_event(&sha, ip, &mut slot);
            assert_eq!(&slot[..len], ipevents::wire::encode(sha_str, ip.into()));
            let event = ipevents::wire::parse(&slot[..len]).unwrap();
            assert_eq!(event.ip, ip);
            assert_eq!(event.app.to_hex(), sha_str);
        }
    }

    #[test]
    fn reference_world() {
        let mut rng = SmallRng::seed_from_u64(1);
        let scenario = Scenario::reference(&mut rng).unwrap();
        assert_eq!(scenario.apps(), 3);
        assert!(scenario.is_preencoded());
        let ips = scenario.ips(0);
        assert!(ips.len() > GOOD_HOSTS && ips.len() <= GOOD_HOSTS + REFERENCE_MAX_BAD);
        for app in 0..3 {
            assert_eq!(scenario.ips(app), ips);
            let block = scenario.block(app);
            for (i, &ip) in ips.iter().enumerate() {
                assert_eq!(scenario.is_good(i), ip >> 4 == block >> 4, "ip {ip:#x}");
            }
        }
    }

    #[test]
    fn many_apps_world() {
        for (good_ips, bad_ips) in [(3, 4), (1, 0), (14, 2)] {
            check_many_apps(ManyApps {
                apps: 500,
                good_ips,
                bad_ips,
            });
        }
    }

    #[track_caller]
    fn check_many_apps(shape: ManyApps) {
        let mut rng = SmallRng::seed_from_u64(2);
        let scenario = Scenario::many_apps(&mut rng, shape).unwrap();
        assert_eq!(scenario.apps(), 500);
        let mut slot = [0u8; SLOT_BYTES];
        for app in 0..scenario.apps() {
            let block = scenario.block(app);
            let ips = scenario.ips(app);
            assert_eq!(ips.len(), shape.good_ips + shape.bad_ips);
            for (i, &ip) in ips.iter().enumerate() {
                if scenario.is_good(i) {
                    assert_eq!(ip >> 4, block >> 4);
                    assert!((1..=14).contains(&(ip & 0xF)));
                } else {
                    assert!(ip.abs_diff(block) > NEAR_BLOCK);
                }
                let len = scenario.encode(app, i, &mut slot);
                assert_eq!(Some(&slot[..len]), scenario.preencoded(app, i));
            }
            let bad_blocks: std::collections::HashSet<u32> =
                ips[shape.good_ips..].iter().map(|ip| ip >> 4).collect();
            assert_eq!(bad_blocks.len(), shape.bad_ips);
        }
    }

    /// Encoding must not be what limits the send rate: it has to be far cheaper than the
    /// ~1 us the kernel spends on a loopback datagram.
    #[test]
    fn encoding_is_cheap() {
        let mut rng = SmallRng::seed_from_u64(3);
        let sha = random_sha(&mut rng);
        let mut slot = [0u8; SLOT_BYTES];
        let rounds = 1_000_000u32;
        let started = std::time::Instant::now();
        let mut total = 0usize;
        for ip in 0..rounds {
            total += encode_event(&sha, std::hint::black_box(ip), &mut slot);
        }
        let ns_per_datagram = started.elapsed().as_nanos() as f64 / f64::from(rounds);
        assert!(total > 0);
        // Generous, so that a debug build on a busy machine passes too.
        assert!(
            ns_per_datagram < 1000.0,
            "{ns_per_datagram} ns per datagram"
        );
    }
}

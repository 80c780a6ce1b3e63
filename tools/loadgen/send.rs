//! The senders: threads that pick events at random, pace themselves against the monotonic
//! clock, and push batches through `sendmmsg` on connected loopback sockets.
//!
//! A datagram counts as sent only once the kernel has taken it; a full send buffer is waited
//! out and the same datagrams are offered again. The per-batch loop does not allocate: every
//! buffer is sized once when the thread starts. What each thread sent is kept in a [`Tally`]
//! of its own, merged when the threads are joined.
//!
//! Events are drawn at random, or, in [`Order::EachPair`], every (app, ip) pair is sent
//! exactly K times, in K passes over the pairs app by app: each thread walks its own
//! contiguous range of the sequence.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ipevents::socket::{self, SendBatch};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::scenario::{Scenario, SLOT_BYTES};

/// The kernel takes at most this many messages per `sendmmsg` call (UIO_MAXIOV).
pub const MAX_BATCH: usize = 1024;

/// Send buffer asked for on every source socket, so that bursts wait in the kernel rather
/// than in back-off sleeps.
pub const SNDBUF_BYTES: usize = 4 << 20;

/// How long to wait before offering datagrams again when the send buffer is full.
const BACKOFF: Duration = Duration::from_micros(50);

/// A kernel that takes no datagram for this long is wedged; waiting longer would not help.
const STALL_LIMIT: Duration = Duration::from_secs(10);

/// A paced sender that falls further behind than this (a stall, a descheduled thread)
/// restarts its schedule from now instead of bursting to catch up: a burst would overflow the
/// receiver's buffer and look like server loss.
const MAX_LAG: Duration = Duration::from_millis(10);

/// A paced batch holds at most about this much time's worth of datagrams, so that low rates
/// are spread out rather than sent in bursts of a whole batch.
const PACED_BATCH_SPAN: Duration = Duration::from_millis(1);

/// What the senders are to do, for all threads together.
#[derive(Clone, Copy, Debug)]
pub struct SendPlan {
    /// Datagrams to send in all, or `None` to send until the deadline.
    pub count: Option<u64>,
    /// No datagram is offered after this instant.
    pub deadline: Instant,
    /// Datagrams per second over all threads; 0 sends as fast as possible.
    pub rate_per_s: f64,
    pub batch: usize,
    pub threads: usize,
    pub seed: u64,
    pub order: Order,
}

/// Which events the senders send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Per datagram, an app uniformly, then one of its IPs uniformly.
    Random,
    /// Every (app, ip) pair `times` times, in `times` passes over the pairs, each pass
    /// app-major: datagram `s` names pair `k = s % pairs`, which is IP `k % ips_per_app` of
    /// app `k / ips_per_app`. The count must not exceed `times` times the number of pairs.
    EachPair { times: u32 },
}

/// What was sent for one app, kept in 16 bytes so that a million apps stay cheap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppSent {
    pub events: u64,
    /// Bit `i` is set when the app's `i`th IP was sent at least once.
    pub ips_mask: u64,
}

/// What the kernel took, per app.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub apps: Vec<AppSent>,
}

impl Tally {
    pub fn new(apps: usize) -> Tally {
        Tally {
            apps: vec![AppSent::default(); apps],
        }
    }

    fn record(&mut self, pick: Pick) {
        let app = &mut self.apps[pick.app as usize];
        app.events += 1;
        app.ips_mask |= 1 << pick.ip_index;
    }

    fn merge(&mut self, other: &Tally) {
        for (mine, theirs) in self.apps.iter_mut().zip(&other.apps) {
            mine.events += theirs.events;
            mine.ips_mask |= theirs.ips_mask;
        }
    }
}

/// Shared between the senders and the thread that shows progress.
#[derive(Debug, Default)]
pub struct Progress {
    /// Datagrams the kernel took so far, over all threads; updated once per batch.
    pub sent: AtomicU64,
    /// Set when a sender failed, so that the others stop early.
    pub stop: AtomicBool,
}

/// The result of the send phase.
#[derive(Debug)]
pub struct SendReport {
    pub sent: u64,
    /// From the start of the first sender to the end of the last.
    pub elapsed: Duration,
    pub tally: Tally,
    /// Times a sender found the send buffer full and waited.
    pub backoffs: u64,
}

/// One thread's share of the work and what it did.
struct ThreadReport {
    sent: u64,
    finished: Instant,
    tally: Tally,
    backoffs: u64,
}

/// One event to send: an app and the index of one of its IPs.
#[derive(Clone, Copy, Debug)]
struct Pick {
    app: u32,
    ip_index: u8,
}

/// Opens `count` UDP sockets on loopback, each connected to `target`, non-blocking, with a
/// large send buffer. Distinct source ports let the server's flow hash spread the load.
pub fn open_sockets(target: SocketAddr, count: usize) -> io::Result<(Vec<UdpSocket>, usize)> {
    let local: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (Ipv6Addr::LOCALHOST, 0).into()
    };
    let mut sockets = Vec::with_capacity(count);
    let mut sndbuf_bytes = usize::MAX;
    for _ in 0..count {
        let socket = UdpSocket::bind(local)?;
        socket.connect(target)?;
        socket.set_nonblocking(true)?;
        sndbuf_bytes = sndbuf_bytes.min(socket::set_sndbuf(&socket, SNDBUF_BYTES)?);
        sockets.push(socket);
    }
    Ok((sockets, sndbuf_bytes))
}

/// Runs the senders to completion on scoped threads, calling `watch` on the calling thread
/// about ten times a second until they are done.
pub fn run(
    scenario: &Scenario,
    sockets: Vec<UdpSocket>,
    plan: &SendPlan,
    progress: &Progress,
    mut watch: impl FnMut(),
) -> Result<SendReport, String> {
    let started = Instant::now();
    let shares = divide_sockets(sockets, plan.threads);
    let results: Vec<Result<ThreadReport, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .into_iter()
            .enumerate()
            .map(|(index, sockets)| {
                let sender = Sender::new(scenario, sockets, plan, index);
                std::thread::Builder::new()
                    .name(format!("sender-{index}"))
                    .spawn_scoped(scope, move || sender.run(plan.deadline, progress))
                    .map_err(|e| {
                        progress.stop.store(true, Ordering::Relaxed);
                        format!("spawn sender thread: {e}")
                    })
            })
            .collect();
        while handles
            .iter()
            .any(|h| h.as_ref().is_ok_and(|h| !h.is_finished()))
        {
            watch();
            std::thread::sleep(Duration::from_millis(100));
        }
        handles
            .into_iter()
            .map(|handle| {
                handle?
                    .join()
                    .unwrap_or_else(|_| Err("a sender thread panicked".to_owned()))
            })
            .collect()
    });
    let mut report = SendReport {
        sent: 0,
        elapsed: Duration::ZERO,
        tally: Tally::new(scenario.apps()),
        backoffs: 0,
    };
    for result in results {
        let thread = result?;
        report.sent += thread.sent;
        report.backoffs += thread.backoffs;
        report.elapsed = report.elapsed.max(thread.finished - started);
        report.tally.merge(&thread.tally);
    }
    Ok(report)
}

/// Deals the sockets out to the threads like cards, so that each thread gets every
/// `threads`th socket.
fn divide_sockets(sockets: Vec<UdpSocket>, threads: usize) -> Vec<Vec<UdpSocket>> {
    let mut shares: Vec<Vec<UdpSocket>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, socket) in sockets.into_iter().enumerate() {
        shares[i % threads].push(socket);
    }
    shares
}

/// Thread `index`'s part of `total` when it is split evenly over `parts` threads.
fn share(total: u64, parts: usize, index: usize) -> u64 {
    let parts = parts as u64;
    total / parts + u64::from((index as u64) < total % parts)
}

/// Where thread `index`'s part of `total` starts when the parts are laid end to end in thread
/// order, so that the threads' ranges of pairs neither overlap nor leave gaps.
fn share_start(total: u64, parts: usize, index: usize) -> u64 {
    let index = index as u64;
    index * (total / parts as u64) + index.min(total % parts as u64)
}

/// The `pair`th (app, ip) pair in app-major order.
fn pair_at(pair: u64, ips_per_app: usize) -> Pick {
    let ips_per_app = ips_per_app as u64;
    Pick {
        app: u32::try_from(pair / ips_per_app).expect("apps are counted in u32"),
        ip_index: (pair % ips_per_app) as u8,
    }
}

/// The `s`th datagram of [`Order::EachPair`]'s sequence: pass `s / pairs`, pair `s % pairs`.
fn sequence_at(s: u64, pairs: u64, ips_per_app: usize) -> Pick {
    pair_at(s % pairs, ips_per_app)
}

/// Keeps a send loop at a steady rate against the monotonic clock. It sleeps only when ahead
/// of schedule, so a sleep that overshoots is made up by the next batches, within
/// [`MAX_LAG`].
struct Pacer {
    rate_per_s: f64,
    start: Instant,
    scheduled: u64,
}

impl Pacer {
    fn new(rate_per_s: f64) -> Pacer {
        Pacer {
            rate_per_s,
            start: Instant::now(),
            scheduled: 0,
        }
    }

    fn is_paced(&self) -> bool {
        self.rate_per_s > 0.0
    }

    /// Waits until `datagrams` more may go out, but never past `deadline`.
    fn wait_turn(&mut self, datagrams: u64, deadline: Instant) {
        if !self.is_paced() {
            return;
        }
        let due = self.start + Duration::from_secs_f64(self.scheduled as f64 / self.rate_per_s);
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due.min(deadline) - now);
        } else if now - due > MAX_LAG {
            self.start = now;
            self.scheduled = 0;
        }
        self.scheduled += datagrams;
    }
}

/// One sender thread's state: its sockets, its buffers, its generator and its tally.
struct Sender<'a> {
    scenario: &'a Scenario,
    sockets: Vec<UdpSocket>,
    /// Datagrams this thread is to send, or `None` for no bound but the deadline.
    count: Option<u64>,
    order: Order,
    /// In [`Order::EachPair`], the first datagram of this thread's range of the sequence.
    first_in_sequence: u64,
    batch_len: usize,
    pacer: Pacer,
    rng: SmallRng,
    send_batch: SendBatch,
    picks: Vec<Pick>,
    /// Encoding buffers, used when the scenario is too large to pre-encode.
    slots: Vec<[u8; SLOT_BYTES]>,
    lens: Vec<usize>,
    tally: Tally,
}

impl<'a> Sender<'a> {
    fn new(
        scenario: &'a Scenario,
        sockets: Vec<UdpSocket>,
        plan: &SendPlan,
        index: usize,
    ) -> Sender<'a> {
        let rate_per_s = plan.rate_per_s / plan.threads as f64;
        let mut batch_len = plan.batch.clamp(1, MAX_BATCH);
        if rate_per_s > 0.0 {
            let per_span = (rate_per_s * PACED_BATCH_SPAN.as_secs_f64()).ceil() as usize;
            batch_len = batch_len.min(per_span.max(1));
        }
        let slots = if scenario.is_preencoded() {
            Vec::new()
        } else {
            vec![[0u8; SLOT_BYTES]; batch_len]
        };
        Sender {
            scenario,
            sockets,
            count: plan.count.map(|count| share(count, plan.threads, index)),
            order: plan.order,
            first_in_sequence: plan
                .count
                .map_or(0, |count| share_start(count, plan.threads, index)),
            batch_len,
            pacer: Pacer::new(rate_per_s),
            // Each thread draws its own stream; seed_from_u64 scrambles neighbouring seeds.
            rng: SmallRng::seed_from_u64(plan.seed.wrapping_add(1 + index as u64)),
            send_batch: SendBatch::new(batch_len),
            picks: Vec::with_capacity(batch_len),
            lens: vec![0; slots.len()],
            slots,
            tally: Tally::new(scenario.apps()),
        }
    }

    fn run(mut self, deadline: Instant, progress: &Progress) -> Result<ThreadReport, String> {
        let mut sent = 0u64;
        let mut backoffs = 0u64;
        let mut next_socket = 0;
        loop {
            let remaining = self.count.map_or(u64::MAX, |count| count - sent);
            if remaining == 0 || progress.stop.load(Ordering::Relaxed) || Instant::now() >= deadline
            {
                break;
            }
            let n = (self.batch_len as u64).min(remaining) as usize;
            self.pacer.wait_turn(n as u64, deadline);
            self.pick(n, sent);
            self.encode();
            let outcome = offer(
                &self.sockets[next_socket],
                &mut self.send_batch,
                self.scenario,
                &self.picks,
                &self.slots,
                &self.lens,
                deadline,
                progress,
            );
            next_socket = (next_socket + 1) % self.sockets.len();
            let taken = match outcome {
                Ok(offered) => {
                    backoffs += offered.backoffs;
                    offered.taken
                }
                Err(e) => {
                    progress.stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            };
            for &pick in &self.picks[..taken] {
                self.tally.record(pick);
            }
            sent += taken as u64;
            progress.sent.fetch_add(taken as u64, Ordering::Relaxed);
        }
        Ok(ThreadReport {
            sent,
            finished: Instant::now(),
            tally: self.tally,
            backoffs,
        })
    }

    /// Chooses the next batch of `n`, after `sent` datagrams so far. At random: an app
    /// uniformly, then one of its IPs uniformly; for the reference scenario, whose apps all
    /// have the same IPs, that is a uniform draw from the list of every (ip, app) pair. Each
    /// pair K times: the next `n` datagrams of this thread's range of the sequence, since only
    /// taken datagrams advance `sent`.
    fn pick(&mut self, n: usize, sent: u64) {
        let apps = self.scenario.apps() as u32;
        let ips = self.scenario.ips_per_app() as u8;
        self.picks.clear();
        if let Order::EachPair { .. } = self.order {
            let pairs = u64::from(apps) * u64::from(ips);
            let first = self.first_in_sequence + sent;
            self.picks
                .extend((first..first + n as u64).map(|s| sequence_at(s, pairs, usize::from(ips))));
            return;
        }
        for _ in 0..n {
            self.picks.push(Pick {
                app: self.rng.random_range(0..apps),
                ip_index: self.rng.random_range(0..ips),
            });
        }
    }

    fn encode(&mut self) {
        if self.scenario.is_preencoded() {
            return;
        }
        for ((pick, slot), len) in self.picks.iter().zip(&mut self.slots).zip(&mut self.lens) {
            *len = self
                .scenario
                .encode(pick.app as usize, usize::from(pick.ip_index), slot);
        }
    }
}

/// How one batch went.
struct Offered {
    /// Datagrams the kernel took: a prefix of the batch.
    taken: usize,
    backoffs: u64,
}

/// Offers a batch to the kernel until it has taken all of it, the deadline passes or another
/// sender failed. A full send buffer (EAGAIN, ENOBUFS) is waited out, not counted as sent.
#[allow(clippy::too_many_arguments)]
fn offer(
    socket: &UdpSocket,
    send_batch: &mut SendBatch,
    scenario: &Scenario,
    picks: &[Pick],
    slots: &[[u8; SLOT_BYTES]],
    lens: &[usize],
    deadline: Instant,
    progress: &Progress,
) -> Result<Offered, String> {
    // A stack array rather than a Vec, because the slices borrow buffers that the next batch
    // overwrites, and the hot loop must not allocate.
    let mut datagrams: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
    for (i, pick) in picks.iter().enumerate() {
        let (app, ip_index) = (pick.app as usize, usize::from(pick.ip_index));
        datagrams[i] = match scenario.preencoded(app, ip_index) {
            Some(datagram) => datagram,
            None => &slots[i][..lens[i]],
        };
    }
    let n = picks.len();
    let mut taken = 0;
    let mut backoffs = 0;
    let mut stalled_since: Option<Instant> = None;
    while taken < n {
        match send_batch.send(socket, &datagrams[taken..n]) {
            Ok(k) if k > 0 => {
                taken += k;
                stalled_since = None;
                continue;
            }
            Ok(_) => {}
            Err(e) if is_backpressure(&e) => {}
            Err(e) => return Err(describe_send_error(socket, &e)),
        }
        backoffs += 1;
        let now = Instant::now();
        if now >= deadline || progress.stop.load(Ordering::Relaxed) {
            break;
        }
        let since = *stalled_since.get_or_insert(now);
        if now - since > STALL_LIMIT {
            return Err(format!(
                "the kernel took no datagram for {} s: the send buffer stays full",
                STALL_LIMIT.as_secs()
            ));
        }
        std::thread::sleep(BACKOFF);
    }
    Ok(Offered { taken, backoffs })
}

/// A full send buffer shows as EAGAIN, or as ENOBUFS when the device queue is full; either
/// way the datagrams were not taken and may be offered again.
fn is_backpressure(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::WouldBlock || error.raw_os_error() == Some(libc::ENOBUFS)
}

fn describe_send_error(socket: &UdpSocket, error: &io::Error) -> String {
    let target = socket
        .peer_addr()
        .map_or_else(|_| "the server".to_owned(), |addr| addr.to_string());
    if error.kind() == io::ErrorKind::ConnectionRefused {
        format!("send udp {target}: connection refused (is the server listening there?)")
    } else {
        format!("send udp {target}: {error}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for (total, parts) in [(10, 3), (0, 2), (1, 4), (1_000_000, 7)] {
            let sum: u64 = (0..parts).map(|i| share(total, parts, i)).sum();
            assert_eq!(sum, total);
        }
        assert_eq!(share(10, 3, 0), 4);
        assert_eq!(share(10, 3, 2), 3);
    }

    #[test]
    fn share_ranges_tile_the_total() {
        for (total, parts) in [(10, 3), (0, 2), (1, 4), (16_000_000, 7), (5, 5)] {
            let mut next = 0;
            for i in 0..parts {
                assert_eq!(share_start(total, parts, i), next, "{total} over {parts}");
                next += share(total, parts, i);
            }
            assert_eq!(next, total);
        }
    }

    #[test]
    fn pairs_are_app_major() {
        let picks: Vec<(u32, u8)> = (0..7)
            .map(|k| pair_at(k, 3))
            .map(|pick| (pick.app, pick.ip_index))
            .collect();
        assert_eq!(
            picks,
            [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
        );
    }

    /// Every pair K times over several threads: each pair of every app is sent exactly K
    /// times, counted pair by pair, whatever the number of threads.
    #[test]
    fn each_pair_times_sends_every_pair_exactly_k_times() {
        for (apps, ips, times, threads) in [
            (50u64, 16usize, 1u64, 3usize),
            (50, 16, 3, 3),
            (7, 4, 2, 1),
            (1, 1, 5, 4),
            (13, 2, 3, 16),
        ] {
            let pairs = apps * ips as u64;
            let total = pairs * times;
            let mut sent = vec![0u64; pairs as usize];
            let mut tally = Tally::new(apps as usize);
            for index in 0..threads {
                let first = share_start(total, threads, index);
                for s in first..first + share(total, threads, index) {
                    let pick = sequence_at(s, pairs, ips);
                    sent[pick.app as usize * ips + usize::from(pick.ip_index)] += 1;
                    tally.record(pick);
                }
            }
            let case = format!("{apps} apps x {ips} ips x {times} over {threads} threads");
            assert!(sent.iter().all(|&n| n == times), "{case}: {sent:?}");
            for app in &tally.apps {
                let want = AppSent {
                    events: ips as u64 * times,
                    ips_mask: (1 << ips) - 1,
                };
                assert_eq!(*app, want, "{case}");
            }
        }
    }

    #[test]
    fn the_sequence_is_passes_over_the_pairs() {
        let picks: Vec<(u32, u8)> = (0..9)
            .map(|s| sequence_at(s, 4, 2))
            .map(|pick| (pick.app, pick.ip_index))
            .collect();
        assert_eq!(
            picks,
            [
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 0)
            ]
        );
    }

    #[test]
    fn tallies_merge() {
        let mut a = Tally::new(2);
        a.record(Pick {
            app: 0,
            ip_index: 3,
        });
        let mut b = Tally::new(2);
        b.record(Pick {
            app: 0,
            ip_index: 63,
        });
        b.record(Pick {
            app: 1,
            ip_index: 0,
        });
        a.merge(&b);
        assert_eq!(
            a.apps,
            vec![
                AppSent {
                    events: 2,
                    ips_mask: 1 << 3 | 1 << 63
                },
                AppSent {
                    events: 1,
                    ips_mask: 1
                }
            ]
        );
    }
}

//! One ingest worker: a pinned thread that owns one UDP socket of the SO_REUSEPORT group and
//! one [`AppTable`], and runs a mio loop over the socket and a [`Waker`].
//!
//! The worker is the only thread that touches its table. Everything else reaches it through
//! the closed [`Command`] enum on its channel, and gets answers on the reply channel that
//! came with the command. On the per-datagram path there is no lock or logging, and no
//! allocation unless the datagram adds to the table (a new app, or a new IP that outgrows an
//! app's inline or flat storage; see `store`): counters are tallied per batch and published
//! with relaxed atomics.

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::backlog::{Backlog, Group, Handbacks};
use crate::key_cache::KeyCache;
use crate::log_limit::LogLimit;
use crate::sketch::{HeavyHitters, Sampler};
use crate::socket::{self, RecvBatch};
use crate::store::{AppRecord, AppTable, Applied, Partial};
use crate::wire::{AppKey, Event, Reject};

const UDP: Token = Token(0);
const WAKER: Token = Token(1);

/// How much of its own CPU time a worker may spend draining the socket before it answers a
/// command. A query counts everything that was queued when it arrived unless the worker is
/// flooded beyond what it can take, and then the bound keeps a flood from starving queries
/// and resets. It is CPU time, not wall-clock time, so that a worker preempted by other
/// processes keeps its budget and still reads its whole queue.
pub const DRAIN_LIMIT: Duration = Duration::from_millis(200);

/// A worker samples the ingest latency on a batch that starts at least this long after its
/// last sample: each sample is an `ioctl` (about 260 ns here), which once a batch cost 4 ns a
/// datagram. A worker at full speed then samples about one batch in ten; and whenever it was
/// away from its socket this long (asleep, answering a command, preempted or stopped), the
/// first batch after is sampled, so a queue held that long always shows.
pub const INGEST_SAMPLE_INTERVAL: Duration = Duration::from_micros(500);

/// A request to a worker. Each carries the sender its answer goes back on.
pub enum Command {
    /// This worker's partial answer for one app, after draining the socket.
    Query { app: AppKey, reply: Sender<Partial> },
    /// Drain the socket, hand over the table, and hold still until `resume` is closed (or
    /// [`RESET_HOLD_LIMIT`] has passed), then carry on with an empty table. Holding still is
    /// what lets the caller clear the shared app register in one step: while every worker
    /// waits, none can create an app that the clearing would wipe from the register.
    ResetAll {
        reply: Sender<AppTable>,
        resume: Receiver<()>,
    },
    /// Drain the socket, then forget one app.
    ResetApp { app: AppKey, reply: Sender<()> },
    /// Count one event that arrived over HTTP.
    Apply {
        event: Event,
        reply: Sender<Applied>,
    },
    /// Copies of the latency histograms.
    Stats { reply: Sender<WorkerStats> },
    /// A copy of one shard's apps (`keyed_hash::SHARDS` of them make the table), for the
    /// state file. The worker copies a slice of apps between batches, so that a large table
    /// does not stall ingestion; the caller does the I/O.
    Snapshot {
        shard: usize,
        reply: Sender<Vec<AppRecord>>,
    },
    /// Hand over the table and carry on with an empty one (cluster mode: the flusher takes
    /// what the worker counted since the last time). O(1) for the worker.
    TakeTable { reply: Sender<AppTable> },
    /// The sample of the traffic since the last time (adaptive steering's balancer); the
    /// worker starts a new one.
    HeavyHitters { reply: Sender<HeavyHitters> },
    /// Drain the socket and stop.
    Shutdown,
}

/// The longest a worker holds still during a reset. The caller closes `resume` microseconds
/// after the last worker replied, so this bounds only a caller that has gone wrong.
pub const RESET_HOLD_LIMIT: Duration = Duration::from_secs(5);

/// Counters the worker publishes for `/metrics`, readable from any thread without a lock.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams this worker read from its own socket.
    pub datagrams_received: AtomicU64,
    pub events_ingested: AtomicU64,
    pub invalid: [AtomicU64; Reject::ALL.len()],
    /// Events dropped whole because the server was at `--max-apps`.
    pub app_cap_drops: AtomicU64,
    /// Events counted, but whose IP was not stored because the app was at
    /// `--max-ips-per-app`.
    pub ip_cap_drops: AtomicU64,
    pub recv_errors: AtomicU64,
    /// Datagrams this worker read from a busy sibling's socket (work stealing); the
    /// sibling's `Backlog` counts them for its socket, and `datagrams_received` does not.
    pub datagrams_stolen: AtomicU64,
    /// Valid events of those that this worker handed back to the socket's owner, whose app
    /// it did not hold (key steering).
    pub events_handed_back: AtomicU64,
}

impl Counters {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Per-batch tallies, kept in registers and published once per batch.
#[derive(Default)]
pub struct Tally {
    /// Datagrams read from the worker's own socket; `stolen` counts those read from a
    /// sibling's.
    received: u64,
    ingested: u64,
    invalid: [u64; Reject::ALL.len()],
    app_cap_drops: u64,
    ip_cap_drops: u64,
    stolen: u64,
    handed_back: u64,
}

impl Tally {
    /// Valid events counted.
    pub fn ingested(&self) -> u64 {
        self.ingested
    }

    fn count(&mut self, applied: Applied) {
        match applied {
            Applied::Stored => self.ingested += 1,
            Applied::IpDropped => {
                self.ingested += 1;
                self.ip_cap_drops += 1;
            }
            Applied::AppDropped => self.app_cap_drops += 1,
        }
    }

    fn publish(&self, counters: &Counters) {
        let add = |counter: &AtomicU64, n: u64| {
            if n != 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&counters.datagrams_received, self.received);
        add(&counters.events_ingested, self.ingested);
        for (counter, &n) in counters.invalid.iter().zip(&self.invalid) {
            add(counter, n);
        }
        add(&counters.app_cap_drops, self.app_cap_drops);
        add(&counters.ip_cap_drops, self.ip_cap_drops);
        add(&counters.datagrams_stolen, self.stolen);
        add(&counters.events_handed_back, self.handed_back);
    }
}

/// Latency histograms, all in nanoseconds.
#[derive(Clone, Debug)]
pub struct Latencies {
    /// From the kernel's arrival stamp of a batch's last (newest) datagram to the batch being
    /// applied (`socket::last_received_at`); sampled on a batch that starts at least
    /// [`INGEST_SAMPLE_INTERVAL`] after the last sample.
    pub ingest_ns: Histogram<u64>,
    /// Time to receive and apply one batch.
    pub batch_ns: Histogram<u64>,
}

impl Latencies {
    pub fn new() -> Latencies {
        Latencies {
            ingest_ns: new_histogram(),
            batch_ns: new_histogram(),
        }
    }

    pub fn add(&mut self, other: &Latencies) {
        // Both sides have the same bounds, so adding cannot fail.
        let _ = self.ingest_ns.add(&other.ingest_ns);
        let _ = self.batch_ns.add(&other.batch_ns);
    }
}

impl Default for Latencies {
    fn default() -> Latencies {
        Latencies::new()
    }
}

/// A histogram of nanoseconds from 1 ns to one minute at three significant digits; values
/// beyond saturate at the top.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant bounds are valid")
}

/// What a worker reports when asked for stats, and when it stops.
#[derive(Clone, Debug)]
pub struct WorkerStats {
    pub latencies: Latencies,
}

/// Apps a worker copies for a snapshot between two batches: about 25 µs of work (512 apps
/// of 8 IPs measured 190 µs), so that ingestion slows down while a snapshot is taken but
/// never stops.
const SNAPSHOT_SLICE_APPS: usize = 64;

/// A shard's snapshot being taken: the keys of its apps when it began, copied a slice at a
/// time. An app created after it began waits for the next snapshot, and one reset away is
/// left out.
struct SnapshotJob {
    keys: Vec<AppKey>,
    next: usize,
    records: Vec<AppRecord>,
    reply: Sender<Vec<AppRecord>>,
}

/// What a worker hands back when it stops: its last stats and its table, for the state file.
pub struct WorkerExit {
    pub stats: WorkerStats,
    pub table: AppTable,
}

/// The other threads' side of a worker.
#[derive(Clone)]
pub struct WorkerHandle {
    pub id: usize,
    commands: Sender<Command>,
    waker: Arc<Waker>,
    pub counters: Arc<Counters>,
    /// The worker's socket as its siblings see it; also read for the kernel counters.
    backlog: Arc<Backlog>,
    /// Every worker's socket, once the group is made: a fan-out that drains holds it.
    group: Option<Arc<Group>>,
}

impl WorkerHandle {
    /// Queues a command and wakes the worker. Fails only when the worker has stopped.
    pub fn send(&self, command: Command) -> io::Result<()> {
        self.commands
            .send(command)
            .map_err(|_| io::Error::other(format!("worker {} has stopped", self.id)))?;
        self.waker.wake()
    }

    /// Datagrams the kernel dropped on this worker's socket because its queue was full.
    pub fn kernel_drops(&self) -> Option<u64> {
        socket::kernel_drops(self.backlog.socket()).ok().flatten()
    }

    /// The receive buffer the kernel granted this worker's socket.
    pub fn rcvbuf_bytes(&self) -> Option<usize> {
        socket::granted_rcvbuf_bytes(self.backlog.socket()).ok()
    }

    /// The worker's socket as its siblings see it, for the [`Group`].
    pub fn backlog(&self) -> Arc<Backlog> {
        self.backlog.clone()
    }

    /// Datagrams read from this worker's socket, by the worker or by a sibling that stole
    /// them: two counters that only grow, so the sum never goes back.
    pub fn received_from_socket(&self) -> u64 {
        Counters::get(&self.counters.datagrams_received) + self.backlog.stolen()
    }

    /// The handle of a worker in `group`, whose fan-outs hold off stealing.
    pub fn with_group(mut self, group: Arc<Group>) -> WorkerHandle {
        self.group = Some(group);
        self
    }

    pub fn group(&self) -> Option<&Arc<Group>> {
        self.group.as_ref()
    }
}

/// A worker before it runs: built on the calling thread so that set-up errors surface there.
pub struct Worker {
    id: usize,
    socket: mio::net::UdpSocket,
    poll: Poll,
    commands: Receiver<Command>,
    table: AppTable,
    batch: RecvBatch,
    /// What the batches are parsed with.
    parser: BatchParser,
    counters: Arc<Counters>,
    latencies: Latencies,
    readable: bool,
    /// When the last batch whose ingest latency was sampled started; `None` before the first.
    ingest_sampled_at: Option<Instant>,
    recv_error_log: LogLimit,
    snapshot: Option<SnapshotJob>,
    /// Every worker's socket, for stealing; `None` until `with_group`, and then no stealing.
    group: Option<Arc<Group>>,
    /// This worker's socket as its siblings see it.
    backlog: Arc<Backlog>,
    /// What siblings read from this worker's socket and handed back.
    handbacks: Handbacks,
    /// The sibling to look at first when this worker next steals.
    next_victim: usize,
}

impl Worker {
    /// Wraps a bound socket; returns the worker and the handle that commands it.
    pub fn new(
        id: usize,
        socket: UdpSocket,
        table: AppTable,
        batch_size: usize,
    ) -> io::Result<(Worker, WorkerHandle)> {
        let handle_socket = socket.try_clone()?;
        let mut socket = mio::net::UdpSocket::from_std(socket);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut socket, UDP, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (commands_tx, commands_rx) = crossbeam_channel::unbounded();
        let (backlog, handbacks) = Backlog::new(handle_socket, waker.clone());
        let backlog = Arc::new(backlog);
        let counters = Arc::new(Counters::default());
        let parser = BatchParser::new(batch_size.max(1), &table);
        let worker = Worker {
            id,
            socket,
            poll,
            commands: commands_rx,
            table,
            batch: RecvBatch::new(batch_size),
            parser,
            counters: counters.clone(),
            latencies: Latencies::new(),
            readable: true,
            ingest_sampled_at: None,
            recv_error_log: LogLimit::every(Duration::from_secs(60)),
            snapshot: None,
            group: None,
            backlog: backlog.clone(),
            handbacks,
            next_victim: id + 1,
        };
        let handle = WorkerHandle {
            id,
            commands: commands_tx,
            waker,
            counters,
            backlog,
            group: None,
        };
        Ok((worker, handle))
    }

    /// Samples the traffic for adaptive steering's `HeavyHitters` command; without it the
    /// command answers an empty sketch.
    pub fn with_sampling(mut self) -> Worker {
        self.parser.sampler = Some(Sampler::default());
        self
    }

    /// Joins the group of every worker's socket (`backlog`): the worker then reads from a busy
    /// sibling's socket when its own is empty, if the group steals.
    pub fn with_group(mut self, group: Arc<Group>) -> Worker {
        self.group = Some(group);
        self
    }

    /// Runs until a `Shutdown` command, or until every handle is gone; returns the final stats
    /// and the table.
    pub fn run(mut self) -> io::Result<WorkerExit> {
        let mut events = Events::with_capacity(8);
        loop {
            // Commands go first: they are rare, and an HTTP client is blocked on each.
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                        self.drain();
                        return Ok(WorkerExit {
                            stats: self.stats(),
                            table: self.table,
                        });
                    }
                    Ok(command) => self.handle(command),
                    Err(TryRecvError::Empty) => break,
                }
            }
            self.apply_handbacks();
            if self.readable {
                self.receive_batch();
                self.copy_snapshot_slice();
                continue;
            }
            if self.snapshot.is_some() {
                // Idle, with a snapshot to finish: copy on instead of sleeping.
                self.copy_snapshot_slice();
                continue;
            }
            if self.steal_batch() {
                // Back to the own socket first: its readiness is edge-triggered, and a
                // datagram that arrived meanwhile raised no event that a poll would see.
                self.readable = true;
                continue;
            }
            // The socket is drained and no command is waiting: sleep until either changes.
            // Readiness is edge-triggered, which is why every receive path reads until
            // WouldBlock before coming back here. A sibling that turns busy after `asleep` is
            // set wakes this worker; one already busy is seen by the check after it
            // (`Group::poll_timeout`).
            self.backlog.set_asleep(true);
            let timeout = self
                .group
                .as_ref()
                .and_then(|group| group.poll_timeout(self.id));
            let polled = self.poll.poll(&mut events, timeout);
            self.backlog.set_asleep(false);
            match polled {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if events.iter().any(|event| event.token() == UDP) {
                self.readable = true;
            }
        }
    }

    fn handle(&mut self, command: Command) {
        // A reply can fail only when the HTTP side gave up waiting; there is nobody to tell.
        match command {
            Command::Query { app, reply } => {
                // Tests make one worker fail on a query to check that the server does not stay
                // half alive. (Not on every command: the start-up round trip must pass.)
                #[cfg(feature = "failpoints")]
                fail::fail_point!("worker::handle", self.id == 1, |_| {});
                self.drain();
                let _ = reply.send(self.table.partial(&app));
            }
            Command::ResetAll { reply, resume } => {
                self.drain();
                // O(1): the old table is freed elsewhere. A caller that gave up drops it here,
                // which gives its apps back to the budget one by one.
                let _ = reply.send(self.table.take());
                let _ = resume.recv_timeout(RESET_HOLD_LIMIT);
            }
            Command::ResetApp { app, reply } => {
                self.drain();
                self.table.remove(&app);
                let _ = reply.send(());
            }
            Command::Apply { event, reply } => {
                let applied = self.table.apply(event);
                let mut tally = Tally::default();
                tally.count(applied);
                tally.publish(&self.counters);
                let _ = reply.send(applied);
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Command::TakeTable { reply } => {
                // A snapshot in progress copies from the new table; cluster mode has none.
                let _ = reply.send(self.table.take());
            }
            Command::HeavyHitters { reply } => {
                let sketch = self.parser.sampler.as_mut().map(Sampler::take);
                let _ = reply.send(sketch.unwrap_or_default());
            }
            Command::Snapshot { shard, reply } => {
                // Copying the keys is the only stall: 32 bytes an app of the shard, about
                // 4,000 keys (125 KB) of a million apps held by one worker. A snapshot still in
                // progress was given up by its caller.
                self.snapshot = Some(SnapshotJob {
                    keys: self.table.shard_keys(shard),
                    next: 0,
                    records: Vec::new(),
                    reply,
                });
            }
            Command::Shutdown => unreachable!("handled by the run loop"),
        }
    }

    /// Copies the next slice of apps of the snapshot in progress, and sends it when complete.
    fn copy_snapshot_slice(&mut self) {
        let Some(job) = &mut self.snapshot else {
            return;
        };
        let end = (job.next + SNAPSHOT_SLICE_APPS).min(job.keys.len());
        for app in &job.keys[job.next..end] {
            job.records.extend(self.table.record(app));
        }
        job.next = end;
        if job.next == job.keys.len() {
            let job = self.snapshot.take().expect("checked above");
            let _ = job.reply.send(job.records);
        }
    }

    fn stats(&self) -> WorkerStats {
        WorkerStats {
            latencies: self.latencies.clone(),
        }
    }

    /// Receives and applies batches until the socket is empty or this thread has spent
    /// [`DRAIN_LIMIT`] of CPU time on it.
    ///
    /// Then it waits for any sibling in the middle of a batch stolen from this socket, and
    /// applies what the siblings handed back: a command that follows counts everything that
    /// was queued when it was asked (`backlog`).
    fn drain(&mut self) {
        let budget = DrainBudget::start();
        self.readable = true;
        while self.readable && budget.left() {
            self.receive_batch();
        }
        self.backlog.wait_for_helpers();
        self.apply_handbacks();
    }

    /// Receives one batch and applies it; clears `readable` once the socket is empty.
    fn receive_batch(&mut self) {
        let started = Instant::now();
        let received = match self.batch.recv(&self.socket) {
            Ok(received) => received,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                self.backlog.mark(false);
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                self.backlog.mark(false);
                self.counters.recv_errors.fetch_add(1, Ordering::Relaxed);
                self.log_recv_error(&e);
                // Let poll decide when to try again rather than spinning on the error.
                self.readable = false;
                return;
            }
        };
        if self.backlog.mark(received == self.batch.capacity()) {
            if let Some(group) = &self.group {
                group.wake_helpers(self.id);
            }
        }
        // Tests slow every batch down here (`delay` spins, using CPU time) to flood a worker
        // beyond what it can take. (Not a stolen batch: a test floods one worker and lets
        // the others steal.)
        #[cfg(feature = "failpoints")]
        fail::fail_point!("worker::batch");
        let mut tally = Tally {
            received: received as u64,
            ..Tally::default()
        };
        let datagrams = (0..received).map(|i| self.batch.datagram(i));
        apply_batch(datagrams, &mut self.parser, &mut self.table, &mut tally);
        self.finish_batch(&tally, started, self.socket.as_raw_fd());
    }

    /// What follows a batch read from `from` that started at `started`: the counters and the
    /// latencies.
    fn finish_batch(&mut self, tally: &Tally, started: Instant, from: RawFd) {
        tally.publish(&self.counters);
        if tally.received + tally.stolen > 0 {
            self.sample_ingest(started, from);
            self.latencies
                .batch_ns
                .saturating_record(as_nanos(started.elapsed()));
        }
    }

    /// Records the ingest latency of a batch read from `from` that started at `started`, if
    /// the last sample is [`INGEST_SAMPLE_INTERVAL`] old.
    fn sample_ingest(&mut self, started: Instant, from: RawFd) {
        let due = self
            .ingest_sampled_at
            .is_none_or(|at| started.duration_since(at) >= INGEST_SAMPLE_INTERVAL);
        if !due {
            return;
        }
        self.ingest_sampled_at = Some(started);
        // The arrival of the batch's last (newest) datagram; an error here only costs the
        // sample.
        if let Ok(Some(received_at)) = socket::last_received_at(&from) {
            let waited = SystemTime::now()
                .duration_since(received_at)
                .unwrap_or_default();
            self.latencies.ingest_ns.saturating_record(as_nanos(waited));
        }
    }

    /// Applies the events that siblings read from this worker's socket and handed back.
    fn apply_handbacks(&mut self) {
        if self.handbacks.is_empty() {
            return;
        }
        let mut tally = Tally::default();
        while let Ok(events) = self.handbacks.try_recv() {
            for event in events {
                tally.count(self.table.apply(event));
            }
        }
        tally.publish(&self.counters);
    }

    /// Hands `foreign` (stolen events of apps this worker does not hold) back to the worker
    /// of `backlog`; counts them here when it has stopped or is held up, which adds entries
    /// but loses nothing.
    fn hand_back(&mut self, backlog: &Backlog, foreign: Vec<Event>, tally: &mut Tally) {
        if foreign.is_empty() {
            return;
        }
        let handed_back = foreign.len() as u64;
        match backlog.hand_back(foreign) {
            Ok(()) => tally.handed_back += handed_back,
            Err(refused) => {
                for event in refused {
                    tally.count(self.table.apply(event));
                }
            }
        }
    }

    /// Reads one batch from a busy sibling's socket, when stealing is on, no command is being
    /// asked and a sibling's last batch was full; returns whether it read any. Under key
    /// steering, the events of apps this worker does not hold go back to the socket's owner.
    fn steal_batch(&mut self) -> bool {
        let Some(group) = self.group.clone() else {
            return false;
        };
        if !group.steals() {
            return false;
        }
        let workers = group.workers();
        for step in 0..workers {
            let victim = (self.next_victim + step) % workers;
            let backlog = group.backlog(victim);
            if victim == self.id || !backlog.is_busy() {
                continue;
            }
            let Some(helping) = group.start_helping(victim) else {
                return false;
            };
            let started = Instant::now();
            let received = match self.batch.recv(backlog.socket()) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    // A socket error is reported to one reader: this one counts and logs it.
                    self.counters.recv_errors.fetch_add(1, Ordering::Relaxed);
                    self.log_recv_error(&e);
                    0
                }
            };
            if received < self.batch.capacity() {
                // Emptied, or nearly: the owner sets it again if its next batch is full.
                backlog.mark(false);
            }
            if received == 0 {
                continue;
            }
            backlog.count_stolen(received as u64);
            let mut tally = Tally {
                stolen: received as u64,
                ..Tally::default()
            };
            let datagrams = (0..received).map(|i| self.batch.datagram(i));
            if group.key_steered() {
                let (_, foreign) =
                    apply_held_batch(datagrams, &mut self.parser, &mut self.table, &mut tally);
                self.hand_back(backlog, foreign, &mut tally);
            } else {
                apply_batch(datagrams, &mut self.parser, &mut self.table, &mut tally);
            }
            drop(helping);
            self.finish_batch(&tally, started, backlog.socket().as_raw_fd());
            self.next_victim = victim + 1;
            return true;
        }
        false
    }

    /// Logs a receive error at most once a minute: a persistent error must not flood the log.
    fn log_recv_error(&mut self, error: &io::Error) {
        if self.recv_error_log.ready() {
            log::error!("worker {}: recvmmsg: {error}", self.id);
        }
    }
}

/// What a worker parses its batches with: the cache of recent apps' keys, the slots of the
/// events it defers, and adaptive steering's sampler when it is on. Allocated once per
/// worker; public for the parse-and-apply benchmark (`tools/microbench`).
pub struct BatchParser {
    keys: KeyCache,
    /// The events of the last batch that waited for its end, each with its app's location.
    deferred: Vec<(Event, (u64, usize))>,
    /// The sample of the traffic that adaptive steering asks for; none for the other modes,
    /// which then pay one compare an event for it.
    sampler: Option<Sampler>,
}

impl BatchParser {
    /// A parser for batches of up to `capacity` datagrams, whose apps are located for
    /// `table`, with no sampler.
    pub fn new(capacity: usize, table: &AppTable) -> BatchParser {
        BatchParser {
            keys: KeyCache::new(table.hasher().clone()),
            deferred: vec![(Event::UNSET, (0, 0)); capacity],
            sampler: None,
        }
    }

    /// Parses each datagram and hands each valid event, its app located, to `sink`, in
    /// order, counting the invalid ones in `tally` and sampling the valid ones for adaptive
    /// steering; returns how many were valid.
    ///
    /// An event is applied as soon as it is parsed while every app of the batch so far was
    /// in the key cache: a recent app, whose entry is likely in the CPU's caches, so little
    /// is gained by waiting. From the first app that was not (and its entry may be in
    /// memory), the rest of the batch is parsed into slots, its apps located, and applied
    /// after the loop: the table's loads of several events are then independent and in
    /// flight together, instead of each one waiting behind the next datagram's parse. Either
    /// way the events are applied in the order they came.
    ///
    /// # Panics
    ///
    /// When there are more `datagrams` than the parser's capacity: a worker's parser holds as
    /// many as its receive batch.
    #[inline(always)]
    fn for_each_event<'a>(
        &mut self,
        datagrams: impl Iterator<Item = &'a [u8]>,
        tally: &mut Tally,
        sink: &mut impl EventSink,
    ) -> usize {
        let mut valid = 0;
        let mut waiting = 0;
        let mut event = Event::UNSET;
        // The place, among this batch's valid events, of the next one to sample; never
        // reached without a sampler.
        let mut sample_at = self
            .sampler
            .as_ref()
            .map_or(usize::MAX, Sampler::first_in_batch);
        for datagram in datagrams {
            match self.keys.parse_into(datagram, &mut event) {
                Ok(located) => {
                    if valid == sample_at {
                        if let Some(sampler) = &mut self.sampler {
                            sample_at = sampler.sample(&event.app, valid);
                        }
                    }
                    if located.cached && waiting == 0 {
                        sink.apply(event, located.at, tally);
                    } else {
                        self.deferred[waiting] = (event, located.at);
                        waiting += 1;
                    }
                    valid += 1;
                }
                Err(reason) => tally.invalid[reason.index()] += 1,
            }
        }
        for &(event, at) in &self.deferred[..waiting] {
            sink.apply(event, at, tally);
        }
        if let Some(sampler) = &mut self.sampler {
            sampler.end_batch(sample_at, valid);
        }
        valid
    }
}

/// Parses a batch of datagrams and applies the valid ones to `table`, in order, counting both
/// in `tally`; returns how many were valid. Nothing is pushed or allocated per datagram but
/// what the table stores; an event that waits for the end of the batch
/// (`BatchParser::for_each_event` says which) is copied into one of the parser's slots.
pub fn apply_batch<'a>(
    datagrams: impl Iterator<Item = &'a [u8]>,
    parser: &mut BatchParser,
    table: &mut AppTable,
    tally: &mut Tally,
) -> usize {
    parser.for_each_event(datagrams, tally, &mut WholeTable(table))
}

/// [`apply_batch`] for a batch stolen under key steering: applies the valid events whose app
/// `table` already holds and returns how many were valid and the others, in order, for the
/// socket's owner.
pub fn apply_held_batch<'a>(
    datagrams: impl Iterator<Item = &'a [u8]>,
    parser: &mut BatchParser,
    table: &mut AppTable,
    tally: &mut Tally,
) -> (usize, Vec<Event>) {
    let mut sink = HeldApps {
        table,
        foreign: Vec::new(),
    };
    let valid = parser.for_each_event(datagrams, tally, &mut sink);
    (valid, sink.foreign)
}

/// Where `BatchParser::for_each_event` hands a batch's valid events. A trait rather than a
/// closure, so that its one method can be always inlined at both places the loop calls it.
trait EventSink {
    fn apply(&mut self, event: Event, at: (u64, usize), tally: &mut Tally);
}

/// Every event counted in the table.
struct WholeTable<'a>(&'a mut AppTable);

impl EventSink for WholeTable<'_> {
    #[inline(always)]
    fn apply(&mut self, event: Event, at: (u64, usize), tally: &mut Tally) {
        tally.count(self.0.apply_located(event, at));
    }
}

/// The events of apps the table holds counted there, the others kept for their worker.
struct HeldApps<'a> {
    table: &'a mut AppTable,
    foreign: Vec<Event>,
}

impl EventSink for HeldApps<'_> {
    #[inline(always)]
    fn apply(&mut self, event: Event, at: (u64, usize), tally: &mut Tally) {
        match self.table.apply_held_located(event, at) {
            Some(applied) => tally.count(applied),
            None => self.foreign.push(event),
        }
    }
}

/// [`DRAIN_LIMIT`] of the worker's own CPU time, measured from when a drain starts; wall-clock
/// time where the thread's CPU clock cannot be read.
///
/// A thread's CPU time grows no faster than the wall clock, so while less than the limit has
/// passed on the wall clock (vDSO, about 20 ns) less has been spent, and the CPU clock (a
/// system call, about 540 ns here) is read only once the wall clock has passed the limit: in
/// a drain that a preempted worker stretched, not once a batch.
struct DrainBudget {
    wall_started: Instant,
    /// The thread's CPU time at the start; `None` when the CPU clock cannot be read.
    cpu_started: Option<Duration>,
}

impl DrainBudget {
    fn start() -> DrainBudget {
        DrainBudget {
            cpu_started: socket::thread_cpu_time().ok(),
            wall_started: Instant::now(),
        }
    }

    fn left(&self) -> bool {
        if self.wall_started.elapsed() < DRAIN_LIMIT {
            return true;
        }
        let Some(started) = self.cpu_started else {
            return false;
        };
        match socket::thread_cpu_time() {
            Ok(now) => now.saturating_sub(started) < DRAIN_LIMIT,
            Err(_) => false,
        }
    }
}

pub fn as_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AppBudget, Limits};
    use crate::wire::{self, AppKey};
    use std::collections::BTreeMap;

    #[test]
    fn a_drain_budget_counts_cpu_time_once_the_wall_clock_passes_the_limit() {
        let long_ago = Instant::now()
            .checked_sub(2 * DRAIN_LIMIT)
            .expect("the clock is past twice the limit");
        // This thread spends the limit in CPU time first, as a flooded worker would.
        let deadline = Instant::now() + 50 * DRAIN_LIMIT;
        let cpu_now = loop {
            let now = socket::thread_cpu_time().expect("Linux has a thread CPU clock");
            if now >= DRAIN_LIMIT || Instant::now() > deadline {
                break now;
            }
        };
        assert!(
            cpu_now >= DRAIN_LIMIT,
            "the thread never spent {DRAIN_LIMIT:?}"
        );
        // (wall-clock start, CPU-time start, whether budget is left)
        let cases = [
            (Instant::now(), Some(cpu_now), true),
            (Instant::now(), None, true),
            // Preempted: the wall clock passed the limit, the thread's CPU time did not.
            (long_ago, Some(cpu_now), true),
            // Spent: the whole limit in CPU time since the start.
            (long_ago, Some(Duration::ZERO), false),
            (long_ago, None, false),
        ];
        for (wall_started, cpu_started, want) in cases {
            let budget = DrainBudget {
                wall_started,
                cpu_started,
            };
            assert_eq!(budget.left(), want, "{cpu_started:?}");
        }
    }

    #[test]
    fn a_batch_applies_exactly_its_valid_datagrams() {
        let shas: Vec<String> = (0..5u8).map(|i| format!("{i:02x}").repeat(32)).collect();
        // 100 datagrams, every seventh one invalid in one of three ways, in receive batches
        // of 40 and a last one of 20; from the second batch on, the apps' keys are cached.
        let mut datagrams = Vec::new();
        let mut want: BTreeMap<(usize, u32), u64> = BTreeMap::new();
        let mut want_invalid = [0u64; Reject::ALL.len()];
        for i in 0..100usize {
            let (app, ip) = (i * 3 % shas.len(), (i % 9) as u32);
            let (datagram, rejected) = match i % 21 {
                6 => (Vec::new(), Some(Reject::Empty)),
                13 => (wire::encode(&shas[app][..63], 1), Some(Reject::BadSha)),
                20 => (wire::encode(&shas[app], -1), Some(Reject::IpOutOfRange)),
                _ => (wire::encode(&shas[app], i64::from(ip)), None),
            };
            match rejected {
                Some(reason) => want_invalid[reason.index()] += 1,
                None => *want.entry((app, ip)).or_default() += 1,
            }
            datagrams.push(datagram);
        }
        let mut table = AppTable::new(
            Limits {
                max_ips_per_app: 64,
            },
            Arc::new(AppBudget::new(usize::MAX)),
        );
        let mut parser = BatchParser::new(40, &table);
        let mut tally = Tally::default();
        let mut valid_total = 0;
        for batch in datagrams.chunks(40) {
            let valid = apply_batch(
                batch.iter().map(Vec::as_slice),
                &mut parser,
                &mut table,
                &mut tally,
            );
            valid_total += valid;
        }
        let valid_want: u64 = want.values().sum();
        assert_eq!(valid_total as u64, valid_want);
        assert_eq!(tally.ingested(), valid_want);
        assert_eq!(tally.invalid, want_invalid);
        for (app, sha) in shas.iter().enumerate() {
            let partial = table.partial(&AppKey::from_hex(sha.as_bytes()).unwrap());
            let mut ips = partial.ips.clone();
            ips.sort_unstable();
            let want_ips: Vec<(u32, u64)> = want
                .iter()
                .filter(|((a, _), _)| *a == app)
                .map(|(&(_, ip), &n)| (ip, n))
                .collect();
            assert_eq!(ips, want_ips, "app {app}");
            assert_eq!(
                partial.events,
                want_ips.iter().map(|&(_, n)| n).sum::<u64>()
            );
        }
    }

    #[test]
    fn events_apply_in_the_order_they_came_cached_or_not() {
        // An app holds two IPs, so which IP is refused says which event was applied first.
        let sha = "ab".repeat(32);
        let mut table = AppTable::new(
            Limits { max_ips_per_app: 2 },
            Arc::new(AppBudget::new(usize::MAX)),
        );
        let mut parser = BatchParser::new(8, &table);
        let mut tally = Tally::default();
        // An unknown field first: not the common layout, so never taken from the key cache.
        let mut uncached = vec![0x18, 0x01];
        uncached.extend(wire::encode(&sha, 2));
        let batches = [
            // The app's digits enter the cache.
            vec![wire::encode(&sha, 1)],
            // A cached event after one that is not, in the same batch: it must wait its turn.
            vec![uncached, wire::encode(&sha, 3)],
        ];
        for batch in &batches {
            apply_batch(
                batch.iter().map(Vec::as_slice),
                &mut parser,
                &mut table,
                &mut tally,
            );
        }
        let mut ips = table
            .partial(&AppKey::from_hex(sha.as_bytes()).unwrap())
            .ips;
        ips.sort_unstable();
        assert_eq!(ips, vec![(1, 1), (2, 1)], "IP 3 came last, past the cap");
        assert_eq!((tally.ingested(), tally.ip_cap_drops), (3, 1));
    }

    proptest::proptest! {
        /// Any run of datagrams of a few apps, cut into batches of any size, with apps in and
        /// out of the key cache, leaves the table as applying the events one by one in order
        /// does. An app holds at most two IPs, so an event applied out of turn would show in
        /// which IPs were kept.
        #[test]
        fn batches_apply_as_the_events_one_by_one(
            picks in proptest::collection::vec((0usize..4, 0u32..4, proptest::bool::ANY), 1..150),
            batch in 1usize..70,
        ) {
            // The same app in lower and in upper case: two sets of digits, one key.
            let shas = ["ab".repeat(32), "cd".repeat(32), "AB".repeat(32)];
            let datagrams: Vec<Vec<u8>> = picks
                .iter()
                .map(|&(app, ip, common)| {
                    let Some(sha) = shas.get(app) else {
                        return Vec::new();
                    };
                    // An unknown field first is not the common layout: never cached.
                    let mut datagram = if common { Vec::new() } else { vec![0x18, 0x01] };
                    datagram.extend(wire::encode(sha, i64::from(ip)));
                    datagram
                })
                .collect();
            let table = || {
                AppTable::new(
                    Limits { max_ips_per_app: 2 },
                    Arc::new(AppBudget::new(usize::MAX)),
                )
            };
            let (mut batched, mut one_by_one) = (table(), table());
            let mut parser = BatchParser::new(batch, &batched);
            let mut tally = Tally::default();
            for chunk in datagrams.chunks(batch) {
                apply_batch(chunk.iter().map(Vec::as_slice), &mut parser, &mut batched, &mut tally);
            }
            let mut valid = 0;
            for datagram in &datagrams {
                if let Ok(event) = wire::parse(datagram) {
                    one_by_one.apply(event);
                    valid += 1;
                }
            }
            proptest::prop_assert_eq!(tally.ingested(), valid);
            for sha in &shas {
                let key = AppKey::from_hex(sha.as_bytes()).unwrap();
                let sorted = |mut partial: Partial| {
                    partial.ips.sort_unstable();
                    partial
                };
                proptest::prop_assert_eq!(
                    sorted(batched.partial(&key)),
                    sorted(one_by_one.partial(&key)),
                    "app {}", sha
                );
            }
        }
    }

    #[test]
    fn a_stolen_batch_counts_only_the_apps_the_thief_holds_and_returns_the_rest() {
        let held = "aa".repeat(32);
        let foreign = "bb".repeat(32);
        let mut table = AppTable::new(
            Limits {
                max_ips_per_app: 64,
            },
            Arc::new(AppBudget::new(usize::MAX)),
        );
        table.apply(Event {
            app: AppKey::from_hex(held.as_bytes()).unwrap(),
            ip: 1,
        });
        // (sha, ip): the held app twice, the other app twice, one invalid datagram.
        let batch = [(&held, 1), (&foreign, 7), (&held, 2), (&foreign, 7)];
        let mut datagrams: Vec<Vec<u8>> = batch
            .iter()
            .map(|&(sha, ip)| wire::encode(sha, ip))
            .collect();
        datagrams.push(Vec::new());
        let mut parser = BatchParser::new(datagrams.len(), &table);
        let mut tally = Tally::default();
        let (valid, returned) = apply_held_batch(
            datagrams.iter().map(Vec::as_slice),
            &mut parser,
            &mut table,
            &mut tally,
        );
        assert_eq!(valid, 4);
        assert_eq!(tally.ingested(), 2);
        assert_eq!(tally.invalid[Reject::Empty.index()], 1);
        let foreign_key = AppKey::from_hex(foreign.as_bytes()).unwrap();
        assert_eq!(
            returned,
            vec![
                Event {
                    app: foreign_key,
                    ip: 7
                };
                2
            ],
            "the other app's events, in order"
        );
        // Nothing of the other app was stored, and the held one counted both.
        assert_eq!(table.len(), 1);
        let mut ips = table
            .partial(&AppKey::from_hex(held.as_bytes()).unwrap())
            .ips;
        ips.sort_unstable();
        assert_eq!(ips, vec![(1, 2), (2, 1)]);
    }
}

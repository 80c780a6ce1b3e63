//! Cluster mode's node side: the deltas this node counted and has not yet written to the
//! shared store, the flusher thread that writes them, and the queries and resets that combine
//! them with the store.
//!
//! A delta of this node is in exactly one place at a time: a worker's table (until the
//! flusher takes the table), `unsent` (taken, not yet written), `sent` (being written, and
//! retried as is until the store acknowledges it), then the store. One mutex,
//! `Node::pending`, orders the moves between those places with the queries: the flusher
//! takes tables and retires flushes under it; a query reads the workers, the pending deltas
//! and the store under it. The write to the store happens outside the lock, so a query tells
//! whether `sent` already reached the store by the flush seq the store keeps per slot and node.
//! The workers never take the lock, and nothing here runs per datagram.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;

use crate::cluster::{Cluster, Unavailable};
use crate::log_limit::LogLimit;
use crate::metrics::{self, ReportExtra};
use crate::redis_store::{
    Changes, FlushSeq, RedisStore, ResetId, StoreError, StoreErrorKind, StoreSettings,
};
use crate::store::{self, AppTable, Deltas, Verdict};
use crate::wire::AppKey;
use crate::worker::{as_nanos, new_histogram};

/// How often a failing store is logged, at most.
const STORE_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How long a sweep of old epochs may run.
const SWEEP_LIMIT: Duration = Duration::from_secs(60);

/// Cluster mode's knobs, from the command line.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub flush_interval: Duration,
    pub max_pending_pairs: usize,
    pub max_ips_per_app: usize,
    /// How long the flush at shutdown may keep trying.
    pub shutdown_flush_limit: Duration,
    /// How long a reset waits for every live node to acknowledge it (`--reply-timeout-ms`).
    pub reset_ack_limit: Duration,
}

/// One write to the store: what the flusher took, numbered, with the reset state it was
/// taken in.
#[derive(Debug)]
struct Flush {
    seq: FlushSeq,
    epoch: u64,
    resets_seen: ResetId,
    deltas: Deltas,
}

/// The deltas that left the workers but are not known to be in the store, and the reset
/// state they belong to.
#[derive(Debug)]
struct Pending {
    /// The reset epoch this node counts in.
    epoch: u64,
    /// The newest per-app reset this node has applied.
    resets_seen: ResetId,
    unsent: Deltas,
    sent: Option<Arc<Flush>>,
    incarnation: u64,
    next_flush: u64,
}

impl Pending {
    fn pairs(&self) -> usize {
        self.unsent.pairs() + self.sent.as_ref().map_or(0, |f| f.deltas.pairs())
    }

    /// Applies what any node reset in the store since this node last looked, in order, to
    /// the workers and the pending deltas; returns whether anything changed. Idempotent.
    fn catch_up(&mut self, changes: &Changes, workers: &Cluster) -> Result<bool, Unavailable> {
        let mut changed = false;
        // An epoch lower than this node's means the store lost its state (a flush of the
        // database, a failover that lost the last reset): that is a reset too.
        if changes.epoch != self.epoch {
            workers.reset_all()?;
            self.unsent = Deltas::default();
            self.sent = None;
            self.epoch = changes.epoch;
            changed = true;
        }
        for &(id, app, epoch) in &changes.app_resets {
            if id <= self.resets_seen {
                continue;
            }
            if epoch > self.epoch {
                // Made after a reset epoch this node has not read yet: it waits for that.
                break;
            }
            // A reset of an older epoch is covered by that epoch's end.
            if epoch == self.epoch {
                workers.reset_app(app)?;
                self.forget_app(&app);
            }
            self.resets_seen = id;
            changed = true;
        }
        Ok(changed)
    }

    fn forget_app(&mut self, app: &AppKey) {
        self.unsent.remove(app);
        if let Some(sent) = &self.sent {
            if sent.deltas.get(app).is_some() {
                // The store refuses the app's share of this flush anyway (it was taken before
                // the reset); a query must not count it either.
                let mut deltas = sent.deltas.clone();
                deltas.remove(app);
                self.sent = Some(Arc::new(Flush { deltas, ..**sent }));
            }
        }
    }

    /// The flush to write now: the one in flight, or else everything unsent, numbered.
    fn next_flush(&mut self) -> Option<Arc<Flush>> {
        if self.sent.is_none() && !self.unsent.is_empty() {
            let seq = FlushSeq {
                incarnation: self.incarnation,
                flush: self.next_flush,
            };
            self.next_flush += 1;
            self.sent = Some(Arc::new(Flush {
                seq,
                epoch: self.epoch,
                resets_seen: self.resets_seen,
                deltas: std::mem::take(&mut self.unsent),
            }));
        }
        self.sent.clone()
    }

    /// The flush `seq` is in the store.
    fn retire(&mut self, seq: FlushSeq) {
        if self.sent.as_ref().is_some_and(|sent| sent.seq == seq) {
            self.sent = None;
        }
    }
}

/// What cluster mode counts, for `/metrics` and the shutdown report.
#[derive(Debug)]
pub struct StoreCounters {
    pub flushes: AtomicU64,
    pub flush_errors: [AtomicU64; StoreErrorKind::ALL.len()],
    /// Store errors of queries and resets, by kind.
    pub request_errors: [AtomicU64; StoreErrorKind::ALL.len()],
    pub apps_flushed: AtomicU64,
    pub pairs_flushed: AtomicU64,
    /// App shares of a retried flush that the store had already applied.
    pub duplicate_apps: AtomicU64,
    /// App shares the store refused because the app was reset after they were taken.
    pub stale_apps: AtomicU64,
    pub pending_pairs: AtomicU64,
    /// Events dropped because the pending deltas were at `--max-pending-pairs`.
    pub backlog_drops: AtomicU64,
    /// Resets answered before every live node had acknowledged them.
    pub unacknowledged_resets: AtomicU64,
    pub store_up: AtomicBool,
    /// Round trips to the store of queries and resets.
    pub round_trip_ns: Mutex<Histogram<u64>>,
    /// Whole flushes: taking the tables, merging and writing.
    pub flush_ns: Mutex<Histogram<u64>>,
}

impl Default for StoreCounters {
    fn default() -> StoreCounters {
        StoreCounters {
            flushes: AtomicU64::new(0),
            flush_errors: Default::default(),
            request_errors: Default::default(),
            apps_flushed: AtomicU64::new(0),
            pairs_flushed: AtomicU64::new(0),
            duplicate_apps: AtomicU64::new(0),
            stale_apps: AtomicU64::new(0),
            pending_pairs: AtomicU64::new(0),
            backlog_drops: AtomicU64::new(0),
            unacknowledged_resets: AtomicU64::new(0),
            store_up: AtomicBool::new(true),
            round_trip_ns: Mutex::new(new_histogram()),
            flush_ns: Mutex::new(new_histogram()),
        }
    }
}

impl StoreCounters {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// A copy of a histogram.
    pub fn histogram(histogram: &Mutex<Histogram<u64>>) -> Histogram<u64> {
        lock(histogram).clone()
    }

    fn record(histogram: &Mutex<Histogram<u64>>, elapsed: Duration) {
        lock(histogram).saturating_record(as_nanos(elapsed));
    }
}

/// The state a node's HTTP thread and flusher share.
#[derive(Debug)]
pub struct Node {
    pending: Mutex<Pending>,
    pub counters: StoreCounters,
    settings: NodeSettings,
    store_error_log: Mutex<LogLimit>,
}

impl Node {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        lock(&self.pending)
    }

    fn publish(&self, pending: &Pending) {
        let pairs = pending.pairs() as u64;
        self.counters.pending_pairs.store(pairs, Ordering::Relaxed);
    }

    /// Logs a store error, at most once per [`STORE_ERROR_LOG_INTERVAL`].
    fn log_store_error(&self, what: &str, error: &StoreError) {
        if lock(&self.store_error_log).ready() {
            log::warn!("{what}: {error}; deltas are kept and retried");
        }
    }
}

fn as_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here panics with the lock held except on a bug; the data stays consistent
    // enough to report and flush.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Everything cluster mode needs, connected and checked: the node state, the flusher, the
/// HTTP thread's view and the janitor's connection.
pub struct Connected {
    pub node: Arc<Node>,
    pub view_store: RedisStore,
    pub flusher_store: RedisStore,
    pub janitor_store: RedisStore,
}

/// Connects to the cluster three times (one connection per thread that uses it), checks it,
/// and registers a new incarnation of this node. The error is one line for the operator.
pub fn connect(settings: &StoreSettings, node: NodeSettings) -> Result<Connected, String> {
    settings.validate()?;
    let connect = || RedisStore::connect(settings).map_err(|e| e.message);
    let mut view_store = connect()?;
    view_store.check()?;
    let incarnation = view_store
        .next_incarnation()
        .map_err(|e| e.message.clone())?;
    let (epoch, resets_seen) = view_store.position().map_err(|e| e.message.clone())?;
    // From now on a reset anywhere waits for this node too.
    view_store
        .acknowledge(epoch, resets_seen, as_millis(node.flush_interval))
        .map_err(|e| e.message.clone())?;
    let pending = Pending {
        epoch,
        resets_seen,
        unsent: Deltas::default(),
        sent: None,
        incarnation,
        next_flush: 0,
    };
    Ok(Connected {
        node: Arc::new(Node {
            pending: Mutex::new(pending),
            counters: StoreCounters::default(),
            settings: node,
            store_error_log: Mutex::new(LogLimit::every(STORE_ERROR_LOG_INTERVAL)),
        }),
        view_store,
        flusher_store: connect()?,
        janitor_store: connect()?,
    })
}

/// The HTTP thread's side of cluster mode.
pub struct StoreView {
    node: Arc<Node>,
    store: RedisStore,
    janitor: Sender<u64>,
}

impl StoreView {
    pub fn new(node: Arc<Node>, store: RedisStore, janitor: Sender<u64>) -> StoreView {
        StoreView {
            node,
            store,
            janitor,
        }
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Whether the store answered the last time this node asked it anything.
    pub fn healthy(&self) -> bool {
        self.node.counters.store_up.load(Ordering::Relaxed)
    }

    /// The fleet's answer for `app`: the store's counts plus this node's deltas that are not
    /// in the store yet, each counted once.
    pub fn query(&mut self, workers: &Cluster, app: AppKey) -> Result<Verdict, Unavailable> {
        let node = self.node.clone();
        let mut pending = node.lock();
        for _ in 0..3 {
            let partials = workers.partials(app)?;
            let (changes, stored) =
                self.request(|store| store.read(pending.resets_seen, pending.epoch, Some(&app)))?;
            if pending.catch_up(&changes, workers)? {
                node.publish(&pending);
                continue;
            }
            let stored = stored.unwrap_or_default();
            let mut local = partials;
            local.extend(pending.unsent.get(&app).cloned());
            if let Some(sent) = &pending.sent {
                if !stored.includes(sent.seq) {
                    local.extend(sent.deltas.get(&app).cloned());
                }
            }
            let merged = store::add_capped(
                stored.partial,
                store::merge_partials(local),
                node.settings.max_ips_per_app,
            );
            return Ok(store::classify(&merged));
        }
        Err(Unavailable(
            "store unavailable: resets kept arriving during the query".into(),
        ))
    }

    /// Forgets every app on every node: a new epoch in the store, then this node's deltas.
    pub fn reset_all(&mut self, workers: &Cluster) -> Result<(), Unavailable> {
        let node = self.node.clone();
        let mut pending = node.lock();
        let epoch = self.request(RedisStore::bump_epoch)?;
        let changes = Changes {
            epoch,
            app_resets: Vec::new(),
        };
        pending.catch_up(&changes, workers)?;
        node.publish(&pending);
        drop(pending);
        let _ = self.janitor.send(epoch);
        self.wait_for_acknowledgements(epoch, ResetId::default());
        Ok(())
    }

    /// Forgets one app on every node: cleared in the store with a tombstone that refuses
    /// older writes, announced in the resets stream, then forgotten here.
    pub fn reset_app(&mut self, workers: &Cluster, app: AppKey) -> Result<(), Unavailable> {
        let node = self.node.clone();
        let mut pending = node.lock();
        let epoch = pending.epoch;
        let id = self.request(|store| store.reset_app(epoch, &app))?;
        // Read this reset back with any before it, so that the workers forget the app now and
        // not again at the next flush, which would lose events sent after the answer.
        let (changes, _) = self.request(|store| store.read(pending.resets_seen, epoch, None))?;
        pending.catch_up(&changes, workers)?;
        node.publish(&pending);
        drop(pending);
        self.wait_for_acknowledgements(epoch, id);
        Ok(())
    }

    /// Waits until every live node has applied the reset that made `epoch` and `reset`, so
    /// that events sent to any node after the answer count; at most `--reply-timeout-ms`. A
    /// node applies resets at the start of each flush, so this takes up to one of its flush
    /// intervals. Past the limit the reset stands anyway (it is in the store, and the slow
    /// node applies it when it can); the answer does not wait longer, and the miss is counted.
    fn wait_for_acknowledgements(&mut self, epoch: u64, reset: ResetId) {
        let deadline = Instant::now() + self.node.settings.reset_ack_limit;
        loop {
            let waiting = match self.request(RedisStore::acknowledgements) {
                Ok((now_ms, acks)) => acks
                    .iter()
                    .filter(|ack| ack.live(now_ms) && !ack.has_applied(epoch, reset))
                    .map(|ack| ack.node.clone())
                    .collect::<Vec<_>>(),
                Err(_) => vec!["the store".to_owned()],
            };
            if waiting.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                self.node
                    .counters
                    .unacknowledged_resets
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "a reset was answered before {} acknowledged it within {} ms",
                    waiting.join(", "),
                    self.node.settings.reset_ack_limit.as_millis()
                );
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn request<T>(
        &mut self,
        operation: impl FnOnce(&mut RedisStore) -> Result<T, StoreError>,
    ) -> Result<T, Unavailable> {
        let started = Instant::now();
        let result = operation(&mut self.store);
        let counters = &self.node.counters;
        StoreCounters::record(&counters.round_trip_ns, started.elapsed());
        match result {
            Ok(value) => {
                counters.store_up.store(true, Ordering::Relaxed);
                Ok(value)
            }
            Err(e) => {
                counters.request_errors[e.kind.index()].fetch_add(1, Ordering::Relaxed);
                counters.store_up.store(false, Ordering::Relaxed);
                Err(Unavailable(format!("store unavailable: {e}")))
            }
        }
    }
}

/// The flusher: every `--flush-interval-ms` it takes the workers' tables and writes them to
/// the store. It is not a worker and not the HTTP thread, so a slow store slows neither.
pub struct Flusher {
    node: Arc<Node>,
    store: RedisStore,
    workers: Cluster,
}

/// A running flusher thread.
pub struct FlusherThread {
    stop: Sender<()>,
    thread: JoinHandle<Flusher>,
}

impl FlusherThread {
    /// Stops the thread after the flush in progress, and hands back the flusher for the last
    /// flush.
    pub fn stop(self) -> Result<Flusher, String> {
        let _ = self.stop.send(());
        self.thread
            .join()
            .map_err(|_| "flusher thread failed".to_owned())
    }
}

impl Flusher {
    pub fn new(node: Arc<Node>, store: RedisStore, workers: Cluster) -> Flusher {
        Flusher {
            node,
            store,
            workers,
        }
    }

    pub fn spawn(self) -> Result<FlusherThread, String> {
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let thread = thread::Builder::new()
            .name("flusher".into())
            .spawn(move || self.run(&stopped))
            .map_err(|e| format!("spawn flusher thread: {e}"))?;
        Ok(FlusherThread { stop, thread })
    }

    fn run(mut self, stopped: &Receiver<()>) -> Flusher {
        let interval = self.node.settings.flush_interval;
        let mut next = Instant::now() + interval;
        loop {
            match stopped.recv_deadline(next) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return self,
            }
            // Intervals run start to start; a flush longer than one starts the next at once.
            next = (next + interval).max(Instant::now());
            self.cycle();
        }
    }

    /// One flush: learn of resets, take the tables, write what is pending.
    fn cycle(&mut self) {
        let started = Instant::now();
        let node = self.node.clone();
        let (seen, epoch) = {
            let pending = node.lock();
            (pending.resets_seen, pending.epoch)
        };
        match self.store.read(seen, epoch, None) {
            Ok((changes, _)) => {
                node.counters.store_up.store(true, Ordering::Relaxed);
                let (epoch, resets_seen) = {
                    let mut pending = node.lock();
                    if let Err(e) = pending.catch_up(&changes, &self.workers) {
                        log::warn!("flusher: applying a reset: {e}");
                        return;
                    }
                    (pending.epoch, pending.resets_seen)
                };
                // Once a reset is applied here, a node waiting for it may answer: events sent
                // to this node from now on count.
                let interval_ms = as_millis(node.settings.flush_interval);
                if let Err(e) = self.store.acknowledge(epoch, resets_seen, interval_ms) {
                    self.failed(&e);
                }
            }
            Err(e) => self.failed(&e),
        }
        let flush = {
            let mut pending = node.lock();
            let tables = match self.workers.take_tables() {
                Ok(tables) => tables,
                Err(e) => {
                    log::warn!("flusher: {e}");
                    return;
                }
            };
            self.add_tables(&mut pending, tables);
            let flush = pending.next_flush();
            node.publish(&pending);
            flush
        };
        let Some(flush) = flush else {
            return;
        };
        if self.write(&flush).is_ok() {
            StoreCounters::record(&node.counters.flush_ns, started.elapsed());
        }
    }

    fn add_tables(&self, pending: &mut Pending, tables: Vec<AppTable>) {
        let max_pairs = self.node.settings.max_pending_pairs;
        for table in tables {
            let room =
                max_pairs.saturating_sub(pending.sent.as_ref().map_or(0, |f| f.deltas.pairs()));
            let dropped = pending.unsent.add_table(table, room);
            if dropped > 0 {
                self.node
                    .counters
                    .backlog_drops
                    .fetch_add(dropped, Ordering::Relaxed);
            }
        }
    }

    /// Writes one flush and retires it; on failure it stays pending for the next try.
    fn write(&mut self, flush: &Flush) -> Result<(), StoreError> {
        let max_ips = self.node.settings.max_ips_per_app;
        let result = self.store.apply(
            flush.epoch,
            flush.seq,
            flush.resets_seen,
            &flush.deltas,
            max_ips,
        );
        let counters = &self.node.counters;
        match result {
            Ok(outcome) => {
                let mut pending = self.node.lock();
                pending.retire(flush.seq);
                self.node.publish(&pending);
                drop(pending);
                let add = |counter: &AtomicU64, n: u64| counter.fetch_add(n, Ordering::Relaxed);
                add(&counters.flushes, 1);
                add(&counters.apps_flushed, outcome.apps);
                add(&counters.pairs_flushed, outcome.pairs);
                add(&counters.duplicate_apps, outcome.duplicate_apps);
                add(&counters.stale_apps, outcome.stale_apps);
                counters.store_up.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.failed(&e);
                Err(e)
            }
        }
    }

    fn failed(&self, error: &StoreError) {
        let counters = &self.node.counters;
        counters.flush_errors[error.kind.index()].fetch_add(1, Ordering::Relaxed);
        counters.store_up.store(false, Ordering::Relaxed);
        self.node.log_store_error("flusher", error);
    }

    /// The last flush, at shutdown: the workers' final tables and everything pending, retried
    /// until written or the shutdown flush limit runs out; the error says how many pairs were
    /// left unwritten.
    pub fn finish(mut self, tables: Vec<AppTable>) -> Result<(), String> {
        let deadline = Instant::now() + self.node.settings.shutdown_flush_limit;
        let node = self.node.clone();
        {
            let mut pending = node.lock();
            self.add_tables(&mut pending, tables);
        }
        loop {
            let flush = node.lock().next_flush();
            let Some(flush) = flush else {
                if let Err(e) = self.store.leave() {
                    log::warn!("leaving the store's list of nodes: {e}");
                }
                return Ok(());
            };
            if self.write(&flush).is_err() {
                if Instant::now() >= deadline {
                    let pairs = node.lock().pairs();
                    return Err(format!(
                        "the store did not take the last {pairs} pending (app, ip) pairs within {} ms",
                        node.settings.shutdown_flush_limit.as_millis()
                    ));
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The janitor: deletes the keys of old epochs in the background, once when a reset asks and
/// once more a while later, for writes that were in flight during the reset.
pub fn spawn_janitor(
    mut store: RedisStore,
    node: &Node,
    start_epoch: u64,
) -> Result<Sender<u64>, String> {
    let (requests, received) = crossbeam_channel::unbounded::<u64>();
    let settle = 2 * node.settings.flush_interval + Duration::from_secs(2);
    thread::Builder::new()
        .name("janitor".into())
        .spawn(move || {
            let mut sweep = |epoch: u64| match store.sweep(epoch, Instant::now() + SWEEP_LIMIT) {
                Ok(0) => {}
                Ok(keys) => log::info!("deleted {keys} keys of epochs before {epoch}"),
                Err(e) => log::warn!("sweeping old epochs: {e}"),
            };
            // What a node that died mid-sweep left behind.
            sweep(start_epoch);
            let mut again: Option<(Instant, u64)> = None;
            loop {
                let wait = again.map_or(Duration::from_secs(3600), |(at, _)| {
                    at.saturating_duration_since(Instant::now())
                });
                match received.recv_timeout(wait) {
                    Ok(epoch) => {
                        sweep(epoch);
                        again = Some((Instant::now() + settle, epoch));
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        if let Some((_, epoch)) = again.take() {
                            sweep(epoch);
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        })
        .map_err(|e| format!("spawn janitor thread: {e}"))?;
    Ok(requests)
}

impl Node {
    /// The epoch this node counts in.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }
}

/// Cluster mode's families in `/metrics`.
pub struct StoreMetrics(pub Arc<Node>);

impl metrics::Source for StoreMetrics {
    fn render(&self, out: &mut String) {
        let counters = &self.0.counters;
        let get = StoreCounters::get;
        let help = "Flushes of this node's deltas that the store took.";
        metrics::single(
            out,
            "store_flushes_total",
            "counter",
            help,
            get(&counters.flushes),
        );
        metrics::labelled(
            out,
            "store_flush_errors_total",
            "counter",
            "Flushes that failed and are retried, by kind of failure.",
            "kind",
            StoreErrorKind::ALL.map(|k| (k.as_str(), get(&counters.flush_errors[k.index()]))),
        );
        metrics::labelled(
            out,
            "store_request_errors_total",
            "counter",
            "Queries and resets that failed because of the store, by kind of failure.",
            "kind",
            StoreErrorKind::ALL.map(|k| (k.as_str(), get(&counters.request_errors[k.index()]))),
        );
        let rows: [(&str, &str, &str, u64); 7] = [
            ("store_apps_flushed_total", "counter", "App deltas written to the store.",
             get(&counters.apps_flushed)),
            ("store_pairs_flushed_total", "counter", "(app, ip) deltas written to the store.",
             get(&counters.pairs_flushed)),
            ("store_duplicate_apps_total", "counter",
             "App deltas of retried flushes that the store had already applied (not counted twice).",
             get(&counters.duplicate_apps)),
            ("store_stale_apps_total", "counter",
             "App deltas the store refused because the app was reset after they were taken.",
             get(&counters.stale_apps)),
            ("store_pending_pairs", "gauge",
             "(app, ip) deltas taken from the workers and not yet in the store.",
             get(&counters.pending_pairs)),
            ("store_unacknowledged_resets_total", "counter",
             "Resets answered before every live node acknowledged them within --reply-timeout-ms.",
             get(&counters.unacknowledged_resets)),
            ("store_up", "gauge",
             "Whether the store answered this node's last request (1) or not (0).",
             u64::from(counters.store_up.load(Ordering::Relaxed))),
        ];
        for (name, kind, help, value) in rows {
            metrics::single(out, name, kind, help, value);
        }
        metrics::summary(
            out,
            "store_round_trip_seconds",
            "Round trip of a query's or a reset's request to the store.",
            &StoreCounters::histogram(&counters.round_trip_ns),
        );
        metrics::summary(
            out,
            "store_flush_seconds",
            "One flush: taking the workers' tables, merging them and writing them.",
            &StoreCounters::histogram(&counters.flush_ns),
        );
    }
}

impl Node {
    /// Cluster mode's lines and latency rows in the shutdown report.
    pub fn report_extra(&self) -> ReportExtra {
        let c = &self.counters;
        let get = StoreCounters::get;
        ReportExtra {
            lines: vec![format!(
                "store: flushes {}, flush errors {}, apps flushed {}, pairs flushed {}, \
                 pending pairs {}, dropped at --max-pending-pairs {}",
                get(&c.flushes),
                c.flush_errors.iter().map(get).sum::<u64>(),
                get(&c.apps_flushed),
                get(&c.pairs_flushed),
                get(&c.pending_pairs),
                get(&c.backlog_drops)
            )],
            latencies: vec![
                ("store rtt", StoreCounters::histogram(&c.round_trip_ns)),
                ("flush", StoreCounters::histogram(&c.flush_ns)),
            ],
        }
    }
}

//! The HTTP side's view of the workers: fans a command out to every worker, waits for the
//! replies within a bounded time, and merges them.
//!
//! It never touches a worker's table: it only sends [`Command`]s and reads the replies that
//! come back on a channel made for that one request, so a late reply to an abandoned request
//! lands in a dropped channel and cannot be mistaken for the answer to a later one.

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::sketch::HeavyHitters;
use crate::socket::Steering;
use crate::store::{self, AppBudget, AppRecord, AppTable, Applied, Partial, Verdict};
use crate::wire::{AppKey, Event};
use crate::worker::{Command, WorkerHandle, WorkerStats};

/// A worker did not answer in time, or has stopped. The HTTP answer is 503.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// All the workers, as one thread sees them (the HTTP thread and the snapshot thread each have
/// their own).
pub struct Cluster {
    workers: Vec<WorkerHandle>,
    budget: Arc<AppBudget>,
    reply_timeout: Duration,
    /// IPs one answer lists at most: `--max-ips-per-app`, for the merged answer too.
    max_ips: usize,
    /// Which worker takes the next event that arrives over HTTP, when no steering says.
    next_apply: Cell<usize>,
    /// The steering of the UDP group: where it gives an app a worker of its own, an event
    /// that arrives over HTTP goes there too, so that it adds no entry.
    steering: Steering,
}

impl Cluster {
    pub fn new(
        workers: Vec<WorkerHandle>,
        budget: Arc<AppBudget>,
        reply_timeout: Duration,
    ) -> Cluster {
        Cluster {
            workers,
            budget,
            reply_timeout,
            max_ips: usize::MAX,
            next_apply: Cell::new(0),
            steering: Steering::Random,
        }
    }

    /// Sends each event that arrives over HTTP to the worker `steering` sends its app's
    /// datagrams to, where it has one.
    pub fn with_steering(mut self, steering: Steering) -> Cluster {
        self.steering = steering;
        self
    }

    /// Caps the IPs of a merged answer at `max_ips`, as each worker caps what it stores.
    pub fn with_max_ips(mut self, max_ips: usize) -> Cluster {
        self.max_ips = max_ips;
        self
    }

    pub fn workers(&self) -> &[WorkerHandle] {
        &self.workers
    }

    /// App entries held by all workers together.
    pub fn app_entries(&self) -> usize {
        self.budget.entries()
    }

    /// Distinct apps held by the workers: what `--max-apps` caps.
    pub fn apps(&self) -> usize {
        self.budget.used()
    }

    /// The server's answer for `app`: every worker's partial answer, merged and classified.
    pub fn query(&self, app: AppKey) -> Result<Verdict, Unavailable> {
        let mut merged = store::merge_partials(self.partials(app)?);
        store::cap_ips(&mut merged, self.max_ips);
        Ok(store::classify(&merged))
    }

    /// Every worker's partial answer for `app`, each after draining its socket.
    pub fn partials(&self, app: AppKey) -> Result<Vec<Partial>, Unavailable> {
        self.ask_all_drained(|reply| Command::Query { app, reply })
    }

    /// Every worker's table, each worker carrying on with an empty one.
    pub fn take_tables(&self) -> Result<Vec<AppTable>, Unavailable> {
        self.ask_all(|reply| Command::TakeTable { reply })
    }

    /// Forgets every app on every worker, including datagrams queued before the reset.
    ///
    /// Each worker drains its socket, hands over its table and holds still; with every table
    /// in hand, the app register is cleared in one step and the workers carry on. The old
    /// tables are freed on the reclaiming thread, so the answer does not wait for a million
    /// apps to be freed one by one.
    pub fn reset_all(&self) -> Result<(), Unavailable> {
        let _turn = self.budget.reset_turn();
        let (resume, hold) = crossbeam_channel::bounded::<()>(0);
        let tables = self.ask_all_drained(|reply| Command::ResetAll {
            reply,
            resume: hold.clone(),
        });
        // A worker that did not answer in time still holds its table, counted in the budget:
        // the tables already handed over then give their apps back one by one as they drop.
        let result = tables.map(|tables| reclaim::free(self.budget.clear(tables)));
        drop(resume);
        result
    }

    /// Forgets one app on every worker.
    pub fn reset_app(&self, app: AppKey) -> Result<(), Unavailable> {
        self.ask_all_drained(|reply| Command::ResetApp { app, reply })
            .map(drop)
    }

    /// Counts one event on one worker (its app's, or each in turn); returns once it is
    /// applied.
    pub fn apply(&self, event: Event) -> Result<Applied, Unavailable> {
        let workers = self.workers.len();
        let index = self
            .steering
            .home_worker(&event.app, workers)
            .unwrap_or_else(|| {
                let index = self.next_apply.get() % workers;
                self.next_apply.set(index.wrapping_add(1));
                index
            });
        let (reply, replies) = crossbeam_channel::bounded(1);
        self.send(&self.workers[index], Command::Apply { event, reply })?;
        replies
            .recv_timeout(self.reply_timeout)
            .map_err(|_| self.late(index))
    }

    /// Every worker's latency histograms and table size.
    pub fn stats(&self) -> Result<Vec<WorkerStats>, Unavailable> {
        self.ask_all(|reply| Command::Stats { reply })
    }

    /// Every worker's sample of its traffic since the last time, for adaptive steering.
    pub fn heavy_hitters(&self) -> Result<Vec<HeavyHitters>, Unavailable> {
        self.ask_all(|reply| Command::HeavyHitters { reply })
    }

    /// A copy of one shard of every worker's apps, for the state file.
    pub fn snapshot_shard(&self, shard: usize) -> Result<Vec<Vec<AppRecord>>, Unavailable> {
        self.ask_all(|reply| Command::Snapshot { shard, reply })
    }

    /// [`ask_all`](Cluster::ask_all) for a command whose answer counts what was queued when
    /// it was asked: no worker steals from another's socket until every reply is in or the
    /// deadline has passed (`backlog`).
    fn ask_all_drained<T>(
        &self,
        command: impl Fn(Sender<T>) -> Command,
    ) -> Result<Vec<T>, Unavailable> {
        let _asking = self
            .workers
            .first()
            .and_then(WorkerHandle::group)
            .map(|group| group.ask());
        self.ask_all(command)
    }

    /// Sends one command to every worker, then collects one reply from each, in worker order,
    /// all within one deadline. The workers work on it in parallel.
    fn ask_all<T>(&self, command: impl Fn(Sender<T>) -> Command) -> Result<Vec<T>, Unavailable> {
        let mut answers = Vec::with_capacity(self.workers.len());
        for worker in &self.workers {
            let (reply, answer) = crossbeam_channel::bounded(1);
            self.send(worker, command(reply))?;
            answers.push(answer);
        }
        let deadline = Instant::now() + self.reply_timeout;
        answers
            .iter()
            .enumerate()
            .map(|(index, answer)| answer.recv_deadline(deadline).map_err(|_| self.late(index)))
            .collect()
    }

    fn send(&self, worker: &WorkerHandle, command: Command) -> Result<(), Unavailable> {
        worker.send(command).map_err(|e| Unavailable(e.to_string()))
    }

    fn late(&self, index: usize) -> Unavailable {
        Unavailable(format!(
            "worker {index} did not answer within {} ms",
            self.reply_timeout.as_millis()
        ))
    }
}

/// The thread that frees what resets took out of the tables, off the data path and the HTTP
/// thread, and then hands the freed memory back to the operating system.
mod reclaim {
    use std::sync::OnceLock;
    use std::thread;

    use crossbeam_channel::Sender;

    use crate::socket;
    use crate::store::Freed;

    /// Frees `freed` on the reclaiming thread (started at the first reset); here when the
    /// thread cannot be started.
    pub fn free(freed: Freed) {
        static RECLAIMER: OnceLock<Option<Sender<Freed>>> = OnceLock::new();
        let reclaimer = RECLAIMER.get_or_init(|| {
            let (sender, freeing) = crossbeam_channel::unbounded::<Freed>();
            let spawned = thread::Builder::new()
                .name("reclaim".into())
                .spawn(move || {
                    let _ = socket::lower_thread_priority();
                    for freed in freeing.iter() {
                        drop(freed);
                        // Once the queue is empty: a burst of resets trims once.
                        if freeing.is_empty() {
                            socket::release_free_memory();
                        }
                    }
                });
            match spawned {
                Ok(_) => Some(sender),
                Err(e) => {
                    log::warn!("cannot start the reclaiming thread ({e}); resets free inline");
                    None
                }
            }
        });
        match reclaimer {
            Some(sender) => {
                if let Err(unsent) = sender.send(freed) {
                    drop(unsent.into_inner());
                }
            }
            None => drop(freed),
        }
    }
}

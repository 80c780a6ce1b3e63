//! Work stealing: a worker whose own socket is empty reads batches from a busy sibling's
//! socket, so that a backlog queued on one socket (uneven steering, or a core that also frees
//! the other cores' receive buffers) is drained by every core that has time.
//!
//! Each worker shares a [`Backlog`] of its socket with the others; the [`Group`] holds them
//! all. Three rules keep the answers exact and the tables as they were:
//!
//! - A worker steals (helps) only while no command whose answer counts the queued datagrams
//!   is being asked of the workers: a query, or a reset of all apps or of one, which the
//!   `Cluster` asks under [`Group::ask`], from before the first command is sent until the
//!   last reply or the deadline. A helper that took a batch before such a command arrived
//!   finishes it before it answers, and the socket's owner waits for its helpers
//!   ([`Backlog::wait_for_helpers`]) and applies what they handed back before it answers; so
//!   every answer counts what was queued when it was asked, as without stealing. The helper
//!   announces itself before it reads `asks`, and the owner reads the helper count after
//!   `asks` was raised, both sequentially consistent: one of them sees the other.
//! - Under key steering (`app`, `adaptive`) stealing creates no app entry: an event whose app
//!   the helper does not already hold goes back to the socket's owner, which applies it. A
//!   hot app that `adaptive` spreads is held by every worker, so it is applied where it was
//!   read.
//! - A worker looks only at siblings whose last batch was full (`busy`), so an idle worker
//!   makes no system call for a sibling that keeps up. A worker that turns busy wakes the
//!   siblings that sleep.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::Waker;

use crate::wire::Event;

/// Batches of handed-back events a socket's owner may have waiting; a sibling does not help
/// an owner that has this many, so that an owner that is held up (answering a command, or
/// descheduled) does not collect an unbounded queue.
pub const HANDBACK_BATCHES: usize = 64;

/// How long a worker with a busy sibling sleeps before it looks again, while a command is
/// being asked of the workers and stealing waits.
pub const STEAL_RETRY: Duration = Duration::from_millis(1);

/// One worker's socket as its siblings see it.
pub struct Backlog {
    /// A duplicate of the owner's socket, for the siblings to read from.
    socket: UdpSocket,
    /// The owner's last batch filled its buffers, so more is probably queued.
    busy: AtomicBool,
    /// The owner is asleep in its poll, or about to be.
    asleep: AtomicBool,
    /// Siblings between taking a batch from this socket and handing its events back.
    helpers: AtomicUsize,
    /// Datagrams that siblings read from this socket.
    stolen: AtomicU64,
    handback: Sender<Vec<Event>>,
    waker: Arc<Waker>,
}

/// The owner's end of its [`Backlog`]: the events that siblings handed back.
pub type Handbacks = Receiver<Vec<Event>>;

impl Backlog {
    /// The shared side of the socket `socket` (a duplicate) of the worker woken by `waker`,
    /// and the receiver of what is handed back to it.
    pub fn new(socket: UdpSocket, waker: Arc<Waker>) -> (Backlog, Handbacks) {
        let (handback, handbacks) = crossbeam_channel::bounded(HANDBACK_BATCHES);
        let backlog = Backlog {
            socket,
            busy: AtomicBool::new(false),
            asleep: AtomicBool::new(false),
            helpers: AtomicUsize::new(0),
            stolen: AtomicU64::new(0),
            handback,
            waker,
        };
        (backlog, handbacks)
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Datagrams that siblings read from this socket so far.
    pub fn stolen(&self) -> u64 {
        self.stolen.load(Ordering::Relaxed)
    }

    /// Counts `datagrams` that a sibling read from this socket.
    pub fn count_stolen(&self, datagrams: u64) {
        self.stolen.fetch_add(datagrams, Ordering::Relaxed);
    }

    /// Whether the owner's last batch was full.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    /// Records whether a batch read from this socket was full; written only on a change, so
    /// that the owner's batches do not keep the flag's cache line moving between cores.
    /// Returns whether the socket just turned busy.
    pub fn mark(&self, full: bool) -> bool {
        if self.busy.load(Ordering::Relaxed) == full {
            return false;
        }
        self.busy.store(full, Ordering::SeqCst);
        full
    }

    /// The owner's side of a command: returns once no sibling is in the middle of a batch
    /// taken from this socket, whose events it may still have to hand back. A helper holds
    /// the count for one batch (microseconds), so this spins and yields.
    pub fn wait_for_helpers(&self) {
        while self.helpers.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
            std::thread::yield_now();
        }
    }

    /// Hands `events` back to the owner and wakes it; gives them back when the owner has
    /// stopped or has [`HANDBACK_BATCHES`] waiting, for the helper to apply itself.
    pub fn hand_back(&self, events: Vec<Event>) -> Result<(), Vec<Event>> {
        match self.handback.try_send(events) {
            Ok(()) => {
                // A failed wake leaves the events for the owner's next turn of its loop.
                let _ = self.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(events) | TrySendError::Disconnected(events)) => Err(events),
        }
    }

    /// The owner is going to sleep (`true`) or is awake (`false`).
    pub fn set_asleep(&self, asleep: bool) {
        self.asleep.store(asleep, Ordering::SeqCst);
    }

    /// Wakes the owner if it sleeps, for it to help a sibling that turned busy.
    fn wake_if_asleep(&self) {
        if self.asleep.load(Ordering::SeqCst) {
            let _ = self.waker.wake();
        }
    }
}

/// A sibling in the middle of a batch taken from a [`Backlog`]; the owner waits for it
/// before it answers a command. Dropping it ends the batch.
pub struct Helping<'a> {
    backlog: &'a Backlog,
}

impl Drop for Helping<'_> {
    fn drop(&mut self) {
        self.backlog.helpers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Every worker's [`Backlog`], in worker order, and whether the workers steal at all.
pub struct Group {
    backlogs: Vec<Arc<Backlog>>,
    /// Fan-outs of a command to the workers in progress.
    asks: AtomicUsize,
    /// Whether the steering gives each app a worker of its own (`app`, `adaptive`), so that
    /// a helper hands back the events of apps it does not hold.
    key_steered: bool,
    enabled: bool,
}

impl Group {
    pub fn new(backlogs: Vec<Arc<Backlog>>, key_steered: bool, enabled: bool) -> Group {
        Group {
            backlogs,
            asks: AtomicUsize::new(0),
            key_steered,
            enabled,
        }
    }

    pub fn backlog(&self, worker: usize) -> &Arc<Backlog> {
        &self.backlogs[worker]
    }

    pub fn workers(&self) -> usize {
        self.backlogs.len()
    }

    /// Whether workers steal: enabled, and more than one worker.
    pub fn steals(&self) -> bool {
        self.enabled && self.backlogs.len() > 1
    }

    pub fn key_steered(&self) -> bool {
        self.key_steered
    }

    /// Held while a command is fanned out to the workers: no worker starts helping until it
    /// is dropped.
    pub fn ask(&self) -> Asking<'_> {
        self.asks.fetch_add(1, Ordering::SeqCst);
        Asking { group: self }
    }

    /// How long `worker` may sleep in its poll, read after it said it goes to sleep: no
    /// limit (`None`) unless a sibling is busy; then not at all, to help it, or
    /// [`STEAL_RETRY`] while a command is asked and no batch may be stolen, so as not to
    /// spin. A sibling that turns busy after this wakes it.
    pub fn poll_timeout(&self, worker: usize) -> Option<Duration> {
        if !self.any_busy_sibling(worker) {
            return None;
        }
        Some(if self.asks.load(Ordering::SeqCst) != 0 {
            STEAL_RETRY
        } else {
            Duration::ZERO
        })
    }

    /// Starts a batch from `worker`'s socket, unless a command is being asked: the caller
    /// reads the batch, then drops what this returns.
    pub fn start_helping(&self, worker: usize) -> Option<Helping<'_>> {
        let backlog = &*self.backlogs[worker];
        backlog.helpers.fetch_add(1, Ordering::SeqCst);
        let helping = Helping { backlog };
        if self.asks.load(Ordering::SeqCst) != 0 {
            return None;
        }
        Some(helping)
    }

    /// `worker`'s socket turned busy: wakes the siblings that sleep, to help it.
    pub fn wake_helpers(&self, worker: usize) {
        if !self.steals() {
            return;
        }
        for (id, backlog) in self.backlogs.iter().enumerate() {
            if id != worker {
                backlog.wake_if_asleep();
            }
        }
    }

    /// Whether any sibling of `worker` is busy.
    fn any_busy_sibling(&self, worker: usize) -> bool {
        self.steals()
            && self
                .backlogs
                .iter()
                .enumerate()
                .any(|(id, backlog)| id != worker && backlog.busy.load(Ordering::SeqCst))
    }
}

/// A fan-out in progress; see [`Group::ask`].
pub struct Asking<'a> {
    group: &'a Group,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.group.asks.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Poll, Token};

    fn group(workers: usize) -> (Group, Vec<Handbacks>, Poll) {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let (backlogs, handbacks) = (0..workers)
            .map(|_| {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                let (backlog, handbacks) = Backlog::new(socket, waker.clone());
                (Arc::new(backlog), handbacks)
            })
            .unzip();
        (Group::new(backlogs, true, true), handbacks, poll)
    }

    #[test]
    fn no_batch_starts_while_a_command_is_asked() {
        let (group, _handbacks, _poll) = group(2);
        let asking = group.ask();
        assert!(group.start_helping(1).is_none());
        // The refused start did not leave a helper behind for the owner to wait for.
        group.backlog(1).wait_for_helpers();
        drop(asking);
        let helping = group.start_helping(1).expect("no command is asked");
        assert_eq!(group.backlog(1).helpers.load(Ordering::SeqCst), 1);
        drop(helping);
        group.backlog(1).wait_for_helpers();
    }

    #[test]
    fn busy_is_written_on_a_change_and_reported_once() {
        let (group, _handbacks, _poll) = group(3);
        let backlog = group.backlog(2);
        // (full batch, turned busy, busy after)
        let cases = [
            (false, false, false),
            (true, true, true),
            (true, false, true),
            (false, false, false),
        ];
        for (full, turned, busy) in cases {
            assert_eq!(backlog.mark(full), turned, "{full}");
            assert_eq!(backlog.is_busy(), busy);
            assert_eq!(group.any_busy_sibling(0), busy);
            assert!(
                !group.any_busy_sibling(2),
                "a worker is not its own sibling"
            );
        }
    }

    #[test]
    fn a_hand_back_is_refused_when_the_owner_has_enough_waiting_or_has_stopped() {
        let (group, mut handbacks, _poll) = group(2);
        let backlog = group.backlog(0);
        for _ in 0..HANDBACK_BATCHES {
            assert!(backlog.hand_back(vec![Event::UNSET]).is_ok());
        }
        assert_eq!(
            backlog.hand_back(vec![Event::UNSET; 3]).unwrap_err().len(),
            3
        );
        assert_eq!(handbacks[0].try_recv().unwrap().len(), 1);
        assert!(backlog.hand_back(vec![Event::UNSET]).is_ok());
        drop(handbacks.remove(0));
        assert!(backlog.hand_back(vec![Event::UNSET]).is_err());
    }

    #[test]
    fn a_worker_sleeps_unbounded_unless_a_sibling_is_busy() {
        let (group, _handbacks, _poll) = group(2);
        // (sibling busy, a command asked, the poll's timeout)
        let cases = [
            (false, false, None),
            (false, true, None),
            (true, false, Some(Duration::ZERO)),
            (true, true, Some(STEAL_RETRY)),
        ];
        for (busy, asked, want) in cases {
            group.backlog(1).mark(busy);
            let asking = asked.then(|| group.ask());
            assert_eq!(group.poll_timeout(0), want, "busy {busy}, asked {asked}");
            assert_eq!(group.poll_timeout(1), None, "worker 0 is never busy");
            drop(asking);
        }
    }

    #[test]
    fn one_worker_or_disabled_does_not_steal() {
        assert!(!group(1).0.steals());
        let (group, _handbacks, _poll) = group(2);
        assert!(group.steals());
        let off = Group::new(group.backlogs.clone(), false, false);
        assert!(!off.steals());
        off.backlog(1).mark(true);
        assert!(!off.any_busy_sibling(0));
    }
}

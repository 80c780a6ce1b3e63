//! The server's lifecycle: bind the sockets, start and pin the workers and the HTTP thread,
//! wait for a signal or a failure, then stop in order and report.
//!
//! Set-up errors come back as one line naming what failed; nothing here runs per datagram.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender};

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::gate::{Gate, GateCounters};
use crate::http::{self, Api};
use crate::metrics::{self, Totals};
use crate::signals::{self, CaughtSignals, SignalAction};
use crate::snapshot::{self, BadState, SnapshotCounters};
use crate::socket::{self, Rcvbuf, Steering};
use crate::store::{AppBudget, AppRecord, AppTable, Limits};
use crate::worker::{Command, Worker, WorkerExit, WorkerStats};
use core_affinity::CoreId;

/// Something the main thread must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// SIGINT, SIGTERM or SIGQUIT: stop gracefully.
    Signal(i32),
    /// A worker thread ended; unless the server is stopping, that is a failure.
    WorkerStopped(usize),
    /// The HTTP thread ended; unless the server is stopping, that is a failure.
    HttpStopped,
}

/// Sends a [`Lifecycle`] message when the thread that holds it ends, by return or by panic.
struct ExitNotice {
    lifecycle: Sender<Lifecycle>,
    message: Lifecycle,
}

impl Drop for ExitNotice {
    fn drop(&mut self) {
        let _ = self.lifecycle.send(self.message);
    }
}

/// A running server.
pub struct Server {
    pub udp_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub rcvbuf: Rcvbuf,
    pub workers: usize,
    /// Apps restored from the state file, and apps left out because of --max-apps.
    pub restored_apps: usize,
    pub unrestored_apps: usize,
    worker_threads: Vec<Option<JoinHandle<io::Result<WorkerExit>>>>,
    snapshotter: Option<Snapshotter>,
    state: Option<PathBuf>,
    http_server: Arc<tiny_http::Server>,
    gate: Option<Gate>,
    /// Holds the API's Unix socket; removed when the server is dropped.
    _private_dir: tempfile::TempDir,
    http_thread: Option<JoinHandle<Api>>,
    stopping: Arc<AtomicBool>,
    lifecycle: Receiver<Lifecycle>,
    lifecycle_tx: Sender<Lifecycle>,
}

/// Calls `handle` on a thread of its own for every SIGINT and SIGTERM.
pub fn on_stop_signals(handle: impl Fn(i32) + Send + 'static) -> io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || signals.forever().for_each(handle))?;
    Ok(())
}

/// How many workers to run, and the cores to pin them to (none when unpinned). More
/// pinned workers than cores is an operator mistake.
pub fn plan_workers(requested: Option<u16>, pin: bool) -> Result<(usize, Vec<CoreId>), String> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let workers = requested.map_or(cores.len().max(1), usize::from);
    if !pin {
        return Ok((workers, Vec::new()));
    }
    if workers > cores.len() {
        return Err(format!(
            "--workers {workers} is more than the {} cores this process may run on: \
             lower it, or add --no-pin to run unpinned",
            cores.len()
        ));
    }
    Ok((workers, cores))
}

/// The UDP side: one socket per worker in one SO_REUSEPORT group, steering attached.
pub struct UdpGroup {
    pub sockets: Vec<UdpSocket>,
    pub addr: SocketAddr,
    pub rcvbuf: Rcvbuf,
}

/// Binds the UDP group and attaches its steering program.
pub fn bind_udp_group(
    addr: SocketAddr,
    workers: usize,
    rcvbuf_bytes: usize,
    steering: Steering,
) -> Result<UdpGroup, String> {
    let (sockets, rcvbuf) = socket::bind_reuseport_group(addr, workers, rcvbuf_bytes)
        .map_err(|e| format!("bind udp {addr}: {e}"))?;
    let addr = sockets[0]
        .local_addr()
        .map_err(|e| format!("udp local address: {e}"))?;
    socket::attach_steering(&sockets[0], steering, workers).map_err(|e| {
        format!("attach {steering} steering (SO_ATTACH_REUSEPORT_CBPF): {e}; use --steering hash")
    })?;
    Ok(UdpGroup {
        sockets,
        addr,
        rcvbuf,
    })
}

/// Binds the HTTP port; returns the listener and the address it got.
pub fn bind_http(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind http {addr}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("http local address: {e}"))?;
    Ok((listener, local))
}

/// An empty admin token would turn every DELETE and POST into a 401 that no client can pass:
/// an operator mistake, refused at start.
fn check_admin_token(token: Option<&str>) -> Result<(), String> {
    match token {
        Some(token) if token.trim().is_empty() => Err("the admin token (--admin-token or \
             IPEVENTS_ADMIN_TOKEN) is empty: set one, or unset it to leave DELETE and POST open"
            .to_owned()),
        _ => Ok(()),
    }
}

/// Binds everything and starts the threads. Errors name the step that failed.
pub fn start(config: &Config) -> Result<Server, String> {
    check_admin_token(config.admin_token.as_deref())?;
    let (workers, cores) = plan_workers(config.workers, !config.no_pin)?;
    let records = load_state(config)?;
    let UdpGroup {
        sockets,
        addr: udp_addr,
        rcvbuf,
    } = bind_udp_group(config.udp, workers, config.rcvbuf, config.steering)?;
    let (listener, http_addr) = bind_http(config.http)?;
    // tiny_http listens on a Unix socket in a directory only this user can enter; the public
    // port belongs to the gate, which bounds what each client can make the server hold.
    let private_dir = tempfile::Builder::new()
        .prefix("ipevents-")
        .tempdir()
        .map_err(|e| format!("create a private directory for the http socket: {e}"))?;
    let api_socket = private_dir.path().join("api.sock");
    let api_listener = std::os::unix::net::UnixListener::bind(&api_socket)
        .map_err(|e| format!("bind {}: {e}", api_socket.display()))?;
    let http_server = tiny_http::Server::from_listener(api_listener, None)
        .map_err(|e| format!("start http server: {e}"))?;
    let gate_counters = Arc::new(GateCounters::default());
    let gate = Gate::start(
        listener,
        api_socket,
        config.gate_limits(),
        gate_counters.clone(),
    )
    .map_err(|e| format!("start http gate on {http_addr}: {e}"))?;

    // The budget counts distinct apps: an app seen by k workers takes one unit and k entries.
    let budget = Arc::new(AppBudget::new(
        usize::try_from(config.max_apps).unwrap_or(usize::MAX),
    ));
    let limits = Limits {
        max_ips_per_app: usize::try_from(config.max_ips_per_app).unwrap_or(usize::MAX),
    };
    let (lifecycle_tx, lifecycle) = crossbeam_channel::unbounded();
    let mut tables: Vec<AppTable> = (0..workers)
        .map(|_| AppTable::new(limits, budget.clone()))
        .collect();
    let restored_apps = records
        .iter()
        .enumerate()
        .filter(|(i, record)| tables[i % workers].restore(record))
        .count();
    let unrestored_apps = records.len() - restored_apps;
    drop(records);
    let mut handles = Vec::with_capacity(workers);
    let mut worker_threads = Vec::with_capacity(workers);
    for ((id, udp), table) in sockets.into_iter().enumerate().zip(tables) {
        let (worker, handle) = Worker::new(id, udp, table, usize::from(config.batch))
            .map_err(|e| format!("set up worker {id}: {e}"))?;
        handles.push(handle);
        let core = cores.get(id).copied();
        let notice = ExitNotice {
            lifecycle: lifecycle_tx.clone(),
            message: Lifecycle::WorkerStopped(id),
        };
        let thread = thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || {
                let _notice = notice;
                if let Some(core) = core {
                    if !core_affinity::set_for_current(core) {
                        eprintln!("warning: worker {id}: could not pin to core {}", core.id);
                    }
                }
                worker.run()
            })
            .map_err(|e| format!("spawn worker {id}: {e}"))?;
        worker_threads.push(Some(thread));
    }

    let snapshot_counters = Arc::new(SnapshotCounters::default());
    let snapshotter = match &config.state {
        Some(path) => Some(Snapshotter::spawn(
            // Workers copy their tables a slice at a time between batches, which takes seconds
            // for millions of apps under load: give them the interval, and at least a minute.
            Cluster::new(
                handles.clone(),
                budget.clone(),
                config
                    .snapshot_interval()
                    .max(std::time::Duration::from_secs(60)),
            ),
            path.clone(),
            config.snapshot_interval(),
            snapshot_counters.clone(),
        )?),
        None => None,
    };
    let cluster = Cluster::new(handles, budget, config.reply_timeout());
    let api = Api::new(cluster.with_max_ips(limits.max_ips_per_app))
        .with_admin_token(config.admin_token.as_deref())
        .with_snapshots(config.state.is_some().then_some(snapshot_counters))
        .with_gate(gate_counters);
    let http_server = Arc::new(http_server);
    let stopping = Arc::new(AtomicBool::new(false));
    let notice = ExitNotice {
        lifecycle: lifecycle_tx.clone(),
        message: Lifecycle::HttpStopped,
    };
    let http_thread = {
        let server = http_server.clone();
        let stopping = stopping.clone();
        thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                let _notice = notice;
                http::serve(&server, api, &stopping)
            })
            .map_err(|e| format!("spawn http thread: {e}"))?
    };

    Ok(Server {
        udp_addr,
        http_addr,
        rcvbuf,
        workers,
        restored_apps,
        unrestored_apps,
        worker_threads,
        snapshotter,
        state: config.state.clone(),
        http_server,
        gate: Some(gate),
        _private_dir: private_dir,
        http_thread: Some(http_thread),
        stopping,
        lifecycle,
        lifecycle_tx,
    })
}

impl Server {
    /// Acts on the caught signals: the ones that stop go to [`Server::wait`], the ones that
    /// ask for a snapshot to the snapshot thread, and the rest are logged.
    pub fn forward_signals(&self, caught: CaughtSignals) -> io::Result<()> {
        let lifecycle = self.lifecycle_tx.clone();
        let snapshots = self.snapshotter.as_ref().map(|s| s.requests.clone());
        caught.forward(move |signal| match signals::action(signal) {
            Some(SignalAction::Stop) => {
                let _ = lifecycle.send(Lifecycle::Signal(signal));
            }
            Some(SignalAction::Snapshot) => match &snapshots {
                Some(requests) => {
                    eprintln!(
                        "ipevents: {}: writing a snapshot now",
                        signals::name(signal)
                    );
                    let _ = requests.try_send(SnapshotRequest::Now);
                }
                None => eprintln!(
                    "ipevents: {}: no --state to write a snapshot to; ignored",
                    signals::name(signal)
                ),
            },
            Some(SignalAction::Ignore) | None => {
                eprintln!("ipevents: {}: ignored", signals::name(signal));
            }
        })
    }

    /// Blocks until something needs the main thread.
    pub fn wait(&self) -> Lifecycle {
        self.lifecycle
            .recv()
            .expect("the server holds a sender, so the channel stays open")
    }

    /// Stops taking requests, lets every worker drain its socket and stop, and returns the
    /// shutdown report.
    pub fn shutdown(mut self) -> Result<String, String> {
        if let Some(gate) = self.gate.take() {
            gate.stop();
        }
        self.stopping.store(true, Ordering::Release);
        self.http_server.unblock();
        let api = self
            .http_thread
            .take()
            .expect("the http thread is joined once")
            .join()
            .map_err(|payload| format!("http thread failed: {}", panic_message(&*payload)))?;
        if let Some(snapshotter) = self.snapshotter.take() {
            snapshotter.stop();
        }
        for worker in api.cluster().workers() {
            let _ = worker.send(Command::Shutdown);
        }
        let mut exits = Vec::with_capacity(self.worker_threads.len());
        for id in 0..self.worker_threads.len() {
            exits.push(self.join_worker(id)?);
        }
        if let Some(path) = &self.state {
            let records = snapshot::merge_records(exits.iter().map(|exit| exit.table.records()));
            snapshot::write(path, &records)
                .map_err(|e| format!("write state file {}: {e}", path.display()))?;
            eprintln!(
                "ipevents: wrote {} apps to {}",
                records.len(),
                path.display()
            );
        }
        let stats: Vec<WorkerStats> = exits.into_iter().map(|exit| exit.stats).collect();
        let totals = Totals::of(api.cluster());
        Ok(metrics::report(
            &totals,
            &metrics::merge_latencies(&stats),
            &api,
        ))
    }

    /// Explains why a thread ended while the server was running.
    pub fn failure(mut self, event: Lifecycle) -> String {
        match event {
            Lifecycle::WorkerStopped(id) => match self.join_worker(id) {
                Ok(_) => format!("worker {id} stopped unexpectedly"),
                Err(e) => e,
            },
            Lifecycle::HttpStopped => match self.http_thread.take().map(JoinHandle::join) {
                Some(Err(payload)) => format!("http thread failed: {}", panic_message(&*payload)),
                _ => "http thread stopped unexpectedly".to_owned(),
            },
            Lifecycle::Signal(signal) => format!("signal {signal}"),
        }
    }

    fn join_worker(&mut self, id: usize) -> Result<WorkerExit, String> {
        let thread = self.worker_threads[id]
            .take()
            .ok_or_else(|| format!("worker {id} was already joined"))?;
        match thread.join() {
            Ok(Ok(exit)) => Ok(exit),
            Ok(Err(e)) => Err(format!("worker {id} failed: {e}")),
            Err(payload) => Err(format!("worker {id} failed: {}", panic_message(&*payload))),
        }
    }
}

/// Reads the state file named by --state, if any. A bad file stops the start unless
/// --discard-bad-state says to move it aside.
fn load_state(config: &Config) -> Result<Vec<AppRecord>, String> {
    let Some(path) = &config.state else {
        return Ok(Vec::new());
    };
    let file =
        snapshot::resolve(path).map_err(|e| format!("state file {}: {e}", path.display()))?;
    // Read first, so that a path that is not a file is refused before anything is written
    // beside it.
    let read = snapshot::read(path);
    if !matches!(read, Err(BadState::NotAFile(_))) {
        check_writable(&file)
            .map_err(|e| format!("state file {}: cannot write beside it: {e}", path.display()))?;
    }
    match read {
        Ok(Some(records)) => Ok(records),
        Ok(None) => {
            eprintln!(
                "ipevents: no state file at {} yet; starting empty",
                path.display()
            );
            Ok(Vec::new())
        }
        Err(BadState::Unreadable(e)) => Err(format!(
            "state file {}: cannot read it: {e}; check its permissions",
            path.display()
        )),
        Err(bad @ BadState::NotAFile(_)) => Err(format!(
            "state file {}: {bad}; give --state the path of a regular file",
            path.display()
        )),
        Err(bad) if config.discard_bad_state => {
            let aside = snapshot::set_aside(path).map_err(|e| {
                format!(
                    "state file {}: {bad}, and moving it aside failed: {e}",
                    path.display()
                )
            })?;
            eprintln!(
                "warning: state file {}: {bad}; moved it to {} and starting empty",
                path.display(),
                aside.display()
            );
            Ok(Vec::new())
        }
        Err(bad) => Err(format!(
            "state file {}: {bad}; repair or move it, or start with --discard-bad-state to set it \
             aside and start empty",
            path.display()
        )),
    }
}

/// Finds out at start, not at the first snapshot, whether the state file's directory takes
/// files.
fn check_writable(path: &Path) -> io::Result<()> {
    let mut probe_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    probe_name.push(".probe");
    let probe = path.with_file_name(probe_name);
    std::fs::File::create(&probe)?;
    std::fs::remove_file(&probe)
}

/// The thread that writes the state file every --snapshot-interval, and when asked. The
/// workers only copy their tables; merging and writing happen here, off the data path.
struct Snapshotter {
    requests: Sender<SnapshotRequest>,
    thread: JoinHandle<()>,
}

/// What the snapshot thread is asked to do besides its periodic snapshot.
enum SnapshotRequest {
    /// Write a snapshot now (SIGHUP, SIGUSR1).
    Now,
    Stop,
}

impl Snapshotter {
    fn spawn(
        cluster: Cluster,
        path: PathBuf,
        interval: std::time::Duration,
        counters: Arc<SnapshotCounters>,
    ) -> Result<Snapshotter, String> {
        let (requests, requested) = crossbeam_channel::bounded(4);
        let thread = thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                // Merging and writing a large state take seconds of CPU; under full load they
                // wait for the workers, not the other way round.
                if let Err(e) = socket::lower_thread_priority() {
                    eprintln!("warning: snapshot thread keeps its priority: {e}");
                }
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout)
                | Ok(SnapshotRequest::Now) = requested.recv_timeout(interval)
                {
                    let started = Instant::now();
                    let written =
                        cluster
                            .snapshot()
                            .map_err(|e| e.to_string())
                            .and_then(|per_worker| {
                                let records = snapshot::merge_records(per_worker);
                                snapshot::write(&path, &records).map_err(|e| e.to_string())?;
                                Ok(records.len())
                            });
                    match written {
                        Ok(apps) => counters.record_success(apps, started.elapsed()),
                        Err(e) => {
                            counters.record_failure();
                            eprintln!("ipevents: snapshot to {} failed: {e}", path.display());
                        }
                    }
                }
            })
            .map_err(|e| format!("spawn snapshot thread: {e}"))?;
        Ok(Snapshotter { requests, thread })
    }

    fn stop(self) {
        let _ = self.requests.send(SnapshotRequest::Stop);
        let _ = self.thread.join();
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "panic".to_owned()
    }
}

/// Runs the server until SIGINT, SIGTERM or SIGQUIT and prints the report; the body of
/// `main`.
pub fn run(config: &Config) -> Result<(), String> {
    // Caught before anything else, so that no signal kills the server while it starts.
    let caught = CaughtSignals::catch().map_err(|e| format!("install signal handlers: {e}"))?;
    let server = start(config)?;
    server
        .forward_signals(caught)
        .map_err(|e| format!("install signal handlers: {e}"))?;
    if let Some(warning) = server.rcvbuf.warning() {
        eprintln!("{warning}");
    }
    if server.restored_apps + server.unrestored_apps > 0 {
        eprintln!(
            "ipevents: restored {} apps from the state file{}",
            server.restored_apps,
            if server.unrestored_apps > 0 {
                format!("; {} left out at --max-apps", server.unrestored_apps)
            } else {
                String::new()
            }
        );
    }
    eprintln!(
        "ipevents: listening udp={} http={} workers={} steering={} rcvbuf_bytes={} batch={}",
        server.udp_addr,
        server.http_addr,
        server.workers,
        config.steering,
        server.rcvbuf.granted_bytes,
        config.batch
    );
    match server.wait() {
        Lifecycle::Signal(_) => {
            eprintln!("ipevents: stopping: draining the sockets");
            let report = server.shutdown()?;
            print!("{report}");
            Ok(())
        }
        event => Err(format!(
            "{}; exiting so that a supervisor can restart the server",
            server.failure(event)
        )),
    }
}

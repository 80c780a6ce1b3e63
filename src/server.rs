//! The server's lifecycle, and only that: it wires the parts together and sequences them.
//! Bind the sockets, restore the state file, start and pin the workers, the gate, the HTTP
//! thread, the snapshot thread and the balancer, tell systemd when it is ready, wait for a
//! signal or a failure, then tell systemd it is stopping, stop in order and report. What the
//! flags mean is `config`'s; the state file's thread is `snapshotter`'s, adaptive steering's
//! is `balancer`'s.
//!
//! Set-up errors come back as one line naming what failed; nothing here runs per datagram.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender};
use sd_notify::NotifyState;

use std::path::PathBuf;

use crate::backend::Backend;
use crate::backlog::Group;
use crate::balancer::{Balancer, SteeringCounters, SteeringMetrics};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::flusher::{self, Flusher, FlusherThread, StoreMetrics, StoreView};
use crate::gate::{Gate, GateCounters};
use crate::http::{self, Api};
use crate::metrics::{self, Totals};
use crate::signals::{self, CaughtSignals, SignalAction};
use crate::snapshot::SnapshotCounters;
use crate::snapshotter::{self, SnapshotRequest, Snapshotter};
use crate::socket::{self, Rcvbuf, Steering};
use crate::store::{AppBudget, AppRecord, AppTable};
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
    /// Cluster mode's name of this node; `None` standalone.
    pub node_id: Option<String>,
    flusher: Option<FlusherThread>,
    /// Apps restored from the state file, and apps left out because of --max-apps.
    pub restored_apps: usize,
    pub unrestored_apps: usize,
    worker_threads: Vec<Option<JoinHandle<io::Result<WorkerExit>>>>,
    snapshotter: Option<Snapshotter>,
    /// Adaptive steering's thread, with more than one worker.
    balancer: Option<Balancer>,
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

/// Binds everything and starts the threads. Errors name the step that failed.
pub fn start(config: &Config) -> Result<Server, String> {
    if config.cluster_mode() && config.state.is_some() {
        return Err(
            "--state and --redis-cluster do not go together: in cluster mode the cluster holds \
             the durable state"
                .into(),
        );
    }
    let admin_token = config.admin_token()?;
    let (workers, cores) = plan_workers(config.workers, !config.no_pin)?;
    let records = match &config.state {
        Some(path) => snapshotter::restore(path, config.discard_bad_state)?,
        None => Vec::new(),
    };
    let UdpGroup {
        sockets,
        addr: udp_addr,
        rcvbuf,
    } = bind_udp_group(config.udp, workers, config.rcvbuf, config.steering)?;
    // The balancer re-attaches the group's program through a duplicate of one of its sockets.
    let steering_socket = match config.steering == Steering::Adaptive && workers > 1 {
        true => Some(
            sockets[0]
                .try_clone()
                .map_err(|e| format!("duplicate the udp socket for adaptive steering: {e}"))?,
        ),
        false => None,
    };
    let (listener, http_addr) = bind_http(config.http)?;
    let store_settings = config.store_settings(udp_addr.port())?;
    let connected = match config.cluster_mode() {
        true => Some(flusher::connect(&store_settings, config.node_settings())?),
        false => None,
    };
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
    let budget = Arc::new(AppBudget::new(config.max_apps()));
    let limits = config.store_limits();
    let (lifecycle_tx, lifecycle) = crossbeam_channel::unbounded();
    let mut tables: Vec<AppTable> = (0..workers)
        .map(|_| AppTable::new(limits, budget.clone()))
        .collect();
    // Each app goes to the worker its datagrams will reach: under app and adaptive steering
    // the one its sha steers to, so that a restart does not leave a second entry for every
    // app; under the others, any worker, in turn.
    let home = |i: usize, record: &AppRecord| {
        config
            .steering
            .home_worker(&record.app, workers)
            .unwrap_or(i % workers)
    };
    let restored_apps = records
        .iter()
        .enumerate()
        .filter(|&(i, record)| tables[home(i, record)].restore(record))
        .count();
    let unrestored_apps = records.len() - restored_apps;
    drop(records);
    let mut built = Vec::with_capacity(workers);
    for ((id, udp), table) in sockets.into_iter().enumerate().zip(tables) {
        let (mut worker, handle) = Worker::new(id, udp, table, usize::from(config.batch))
            .map_err(|e| format!("set up worker {id}: {e}"))?;
        if steering_socket.is_some() {
            worker = worker.with_sampling();
        }
        built.push((worker, handle));
    }
    // Every worker's socket, for the workers to steal from each other (`backlog`).
    let group = Arc::new(Group::new(
        built.iter().map(|(_, handle)| handle.backlog()).collect(),
        config.steering.is_keyed(),
        !config.no_work_stealing,
    ));
    let mut handles = Vec::with_capacity(workers);
    let mut worker_threads = Vec::with_capacity(workers);
    for (id, (worker, handle)) in built.into_iter().enumerate() {
        let worker = worker.with_group(group.clone());
        handles.push(handle.with_group(group.clone()));
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
                        log::warn!("worker {id}: could not pin to core {}", core.id);
                    }
                }
                worker.run()
            })
            .map_err(|e| format!("spawn worker {id}: {e}"))?;
        worker_threads.push(Some(thread));
    }
    // A worker answers commands only from inside its loop, so one round trip to each proves
    // that every worker runs: the readiness that `run` reports to systemd.
    Cluster::new(handles.clone(), budget.clone(), config.reply_timeout())
        .stats()
        .map_err(|e| format!("start the workers: {e}"))?;

    let snapshot_counters = Arc::new(SnapshotCounters::default());
    let snapshotter = match &config.state {
        Some(path) => Some(Snapshotter::spawn(
            Cluster::new(
                handles.clone(),
                budget.clone(),
                config.snapshot_reply_timeout(),
            ),
            path.clone(),
            config.snapshot_interval(),
            snapshot_counters.clone(),
        )?),
        None => None,
    };
    let steering_counters = Arc::new(SteeringCounters::default());
    let balancer = match steering_socket {
        Some(socket) => Some(Balancer::spawn(
            Cluster::new(handles.clone(), budget.clone(), config.reply_timeout()),
            socket,
            steering_counters.clone(),
        )?),
        None => None,
    };
    let workers_view = Cluster::new(handles.clone(), budget.clone(), config.reply_timeout())
        .with_max_ips(limits.max_ips_per_app)
        .with_steering(config.steering);
    let (backend, flusher) = match connected {
        None => (Backend::Standalone(workers_view), None),
        Some(connected) => {
            let epoch = connected.node.epoch();
            let janitor = flusher::spawn_janitor(connected.janitor_store, &connected.node, epoch)?;
            let flusher = Flusher::new(
                connected.node.clone(),
                connected.flusher_store,
                Cluster::new(handles, budget, config.reply_timeout()),
            )
            .spawn()?;
            let view = Box::new(StoreView::new(
                connected.node,
                connected.view_store,
                janitor,
            ));
            let backend = Backend::Shared {
                workers: workers_view,
                view,
            };
            (backend, Some(flusher))
        }
    };
    let store_metrics = backend
        .node()
        .map(|node| Box::new(StoreMetrics(node.clone())) as Box<dyn metrics::Source>);
    let mut api = Api::new(backend)
        .with_admin_token(admin_token.as_deref())
        .with_snapshots(config.state.is_some().then_some(snapshot_counters))
        .with_gate(gate_counters);
    if let Some(source) = store_metrics {
        api = api.with_metric_source(source);
    }
    if balancer.is_some() {
        api = api.with_metric_source(Box::new(SteeringMetrics(steering_counters)));
    }
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
        node_id: config.cluster_mode().then_some(store_settings.node_id),
        flusher,
        restored_apps,
        unrestored_apps,
        worker_threads,
        snapshotter,
        balancer,
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
                    log::info!("{}: writing a snapshot now", signals::name(signal));
                    let _ = requests.try_send(SnapshotRequest::Now);
                }
                None => log::info!(
                    "{}: no --state to write a snapshot to; ignored",
                    signals::name(signal)
                ),
            },
            Some(SignalAction::Ignore) | None => {
                log::info!("{}: ignored", signals::name(signal));
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
        if let Some(balancer) = self.balancer.take() {
            balancer.stop();
        }
        let flusher = self.flusher.take().map(FlusherThread::stop).transpose()?;
        for worker in api.cluster().workers() {
            let _ = worker.send(Command::Shutdown);
        }
        let mut exits = Vec::with_capacity(self.worker_threads.len());
        for id in 0..self.worker_threads.len() {
            exits.push(self.join_worker(id)?);
        }
        if let Some(flusher) = flusher {
            // The workers have drained their sockets; what they hold goes to the store.
            let tables = exits.iter_mut().map(|exit| exit.table.take()).collect();
            flusher.finish(tables)?;
            log::info!("flushed every pending delta to the store");
        }
        if let Some(path) = &self.state {
            let apps = snapshotter::write_state(path, exits.iter().map(|exit| &exit.table))
                .map_err(|e| format!("write state file {}: {e}", path.display()))?;
            log::info!("wrote {apps} apps to {}", path.display());
        }
        let stats: Vec<WorkerStats> = exits.into_iter().map(|exit| exit.stats).collect();
        let totals = Totals::of(api.cluster());
        let extra = api
            .backend()
            .node()
            .map(|node| node.report_extra())
            .unwrap_or_default();
        Ok(metrics::report(
            &totals,
            &metrics::merge_latencies(&stats),
            &api.query_ns,
            &api.reset_ns,
            &extra,
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

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "panic".to_owned()
    }
}

/// Tells systemd how the server is doing, when it runs the server as a `Type=notify` service
/// (NOTIFY_SOCKET is set); otherwise does nothing. A failure to tell it is not worth
/// stopping for: systemd then times the start out by itself.
fn tell_service_manager(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("tell systemd {states:?}: {e}");
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
        log::warn!("{warning}");
    }
    if server.restored_apps + server.unrestored_apps > 0 {
        log::info!(
            "restored {} apps from the state file{}",
            server.restored_apps,
            if server.unrestored_apps > 0 {
                format!("; {} left out at --max-apps", server.unrestored_apps)
            } else {
                String::new()
            }
        );
    }
    let store = match &server.node_id {
        Some(node_id) => format!(
            "store=redis-cluster node_id={node_id} seeds={}",
            config
                .store_settings(server.udp_addr.port())?
                .seeds_display()
        ),
        None => "store=memory".to_owned(),
    };
    log::info!(
        "listening udp={} http={} workers={} steering={} rcvbuf_bytes={} batch={} {store}",
        server.udp_addr,
        server.http_addr,
        server.workers,
        config.steering,
        server.rcvbuf.granted_bytes,
        config.batch
    );
    tell_service_manager(&[
        NotifyState::Ready,
        NotifyState::Status(&format!(
            "listening udp={} http={}",
            server.udp_addr, server.http_addr
        )),
    ]);
    match server.wait() {
        Lifecycle::Signal(_) => {
            tell_service_manager(&[NotifyState::Stopping]);
            log::info!("stopping: draining the sockets");
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

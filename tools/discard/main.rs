//! `discard`: a receiver that reads datagrams and throws them away, to measure what the
//! kernel alone can deliver on this machine, for comparison with the ipevents server.
//!
//! It binds the same SO_REUSEPORT group with the same steering and receive buffers as the
//! server, runs one pinned thread per socket that only `recvmmsg`s and counts, and serves the
//! server's counter names on `/metrics`, so that `loadgen --no-verify` can drive it unchanged.
//! It never parses a datagram. All socket calls go through `ipevents::socket`.
#![forbid(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use clap::Parser;
use crossbeam_channel::Sender;
use ipevents::server::{self, UdpGroup};
use ipevents::signals;
use ipevents::socket::{self, RecvBatch, Steering};
use mio::{Events, Interest, Poll, Token, Waker};

const UDP: Token = Token(0);
const WAKER: Token = Token(1);

/// `recvmmsg` calls one wake-up may make before the thread checks whether it should stop, so
/// that a flood cannot keep it from shutting down.
const DRAIN_BATCHES: usize = 1024;

/// Receives UDP datagrams and discards them, counting per worker; serves the counts on
/// /metrics with ipevents' names.
#[derive(Parser, Debug)]
#[command(name = "discard", version)]
struct Args {
    /// UDP address to receive on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:3001", value_name = "ADDR")]
    udp: SocketAddr,

    /// HTTP address for GET /metrics and DELETE /events.
    #[arg(long, default_value = "127.0.0.1:3000", value_name = "ADDR")]
    http: SocketAddr,

    /// Receiving threads, each with its own socket [default: one per available core].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,

    /// How the kernel spreads datagrams over the sockets (as in ipevents).
    #[arg(long, value_enum, default_value_t = Steering::Random)]
    steering: Steering,

    /// Receive buffer per socket, in bytes (forced past net.core.rmem_max where allowed).
    #[arg(long = "rcvbuf", default_value_t = 16 << 20, value_name = "BYTES")]
    rcvbuf_bytes: usize,

    /// Datagrams received per recvmmsg call.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    batch: u16,

    /// Do not pin the threads to cores.
    #[arg(long)]
    no_pin: bool,
}

/// One thread's count, on a cache line of its own so that the threads do not slow each
/// other down by writing neighbouring counters.
#[derive(Debug, Default)]
#[repr(align(64))]
struct WorkerCounter {
    received: AtomicU64,
}

/// Something the main thread must act on.
#[derive(Debug)]
enum Lifecycle {
    Signal(i32),
    /// A receiving thread ended, which only an error makes it do before a signal.
    WorkerStopped(usize, io::Result<()>),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("discard: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let (workers, cores) = server::plan_workers(args.workers, !args.no_pin)?;
    let UdpGroup {
        sockets,
        addr: udp_addr,
        rcvbuf,
    } = server::bind_udp_group(args.udp, workers, args.rcvbuf_bytes, args.steering)?;
    let (listener, http_addr) = server::bind_http(args.http)?;
    let http = Arc::new(
        tiny_http::Server::from_listener(listener, None)
            .map_err(|e| format!("start http server on {http_addr}: {e}"))?,
    );

    let (lifecycle_tx, lifecycle) = crossbeam_channel::unbounded();
    forward_signals(lifecycle_tx.clone()).map_err(|e| format!("install signal handlers: {e}"))?;

    let counters: Arc<[WorkerCounter]> = (0..workers).map(|_| WorkerCounter::default()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut telemetry = Telemetry::new(counters.clone(), workers);
    let mut wakers = Vec::with_capacity(workers);
    let mut threads = Vec::with_capacity(workers);
    for (id, udp) in sockets.into_iter().enumerate() {
        // The HTTP thread reads the kernel's drop counter through its own handle.
        telemetry.sockets.push(
            udp.try_clone()
                .map_err(|e| format!("clone socket {id}: {e}"))?,
        );
        let poll = Poll::new().map_err(|e| format!("create poll for worker {id}: {e}"))?;
        wakers.push(
            Waker::new(poll.registry(), WAKER)
                .map_err(|e| format!("create waker for worker {id}: {e}"))?,
        );
        let receiver = Receiver {
            id,
            udp,
            poll,
            batch_len: usize::from(args.batch),
            counters: counters.clone(),
            stop: stop.clone(),
        };
        let core = cores.get(id).copied();
        let lifecycle = lifecycle_tx.clone();
        let thread = thread::Builder::new()
            .name(format!("discard-{id}"))
            .spawn(move || {
                if let Some(core) = core {
                    if !core_affinity::set_for_current(core) {
                        eprintln!("warning: worker {id}: could not pin to core {}", core.id);
                    }
                }
                let result = receiver.run();
                let _ = lifecycle.send(Lifecycle::WorkerStopped(id, result));
            })
            .map_err(|e| format!("spawn worker {id}: {e}"))?;
        threads.push(thread);
    }

    let http_thread = {
        let http = http.clone();
        let stop = stop.clone();
        thread::Builder::new()
            .name("http".into())
            .spawn(move || serve(&http, telemetry, &stop))
            .map_err(|e| format!("spawn http thread: {e}"))?
    };

    if rcvbuf.capped() {
        eprintln!(
            "warning: udp receive buffer is {} bytes, not the {} asked: without CAP_NET_ADMIN the \
             kernel caps it at net.core.rmem_max",
            rcvbuf.granted_bytes, rcvbuf.requested_bytes
        );
    }
    eprintln!(
        "discard: listening udp={udp_addr} http={http_addr} workers={workers} steering={} \
         rcvbuf_bytes={} batch={}",
        args.steering, rcvbuf.granted_bytes, args.batch
    );

    let event = lifecycle
        .recv()
        .expect("this thread holds a sender, so the channel stays open");
    if let Lifecycle::Signal(signal) = event {
        eprintln!("discard: stopping on signal {signal}");
    }
    stop.store(true, Ordering::Release);
    for waker in &wakers {
        let _ = waker.wake();
    }
    http.unblock();
    let telemetry = http_thread
        .join()
        .map_err(|_| "http thread panicked".to_owned())?;
    for thread in threads {
        let _ = thread.join();
    }
    let since_reset = telemetry.received();
    println!(
        "discard: received {} datagrams ({since_reset} since the last reset), kernel drops {}",
        telemetry.received_before_reset + since_reset,
        telemetry.kernel_drops()
    );
    match event {
        Lifecycle::Signal(_) => Ok(()),
        Lifecycle::WorkerStopped(id, Err(e)) => Err(format!("worker {id} failed: {e}")),
        Lifecycle::WorkerStopped(id, Ok(())) => Err(format!("worker {id} stopped unexpectedly")),
    }
}

fn forward_signals(lifecycle: Sender<Lifecycle>) -> io::Result<()> {
    signals::on_stop_signals(move |signal| {
        let _ = lifecycle.send(Lifecycle::Signal(signal));
    })
}

/// One receiving thread: a socket of the group, its poll and its counter.
struct Receiver {
    id: usize,
    udp: UdpSocket,
    poll: Poll,
    batch_len: usize,
    counters: Arc<[WorkerCounter]>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn run(mut self) -> io::Result<()> {
        let mut udp = mio::net::UdpSocket::from_std(self.udp);
        self.poll
            .registry()
            .register(&mut udp, UDP, Interest::READABLE)?;
        let counter = &self.counters[self.id].received;
        let mut batch = RecvBatch::new(self.batch_len);
        let mut events = Events::with_capacity(4);
        loop {
            let emptied = drain(&udp, &mut batch, counter)?;
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            // Readiness is edge-triggered: only a socket read down to WouldBlock will signal
            // again, so a socket that still holds datagrams is read again without waiting.
            if !emptied {
                continue;
            }
            match self.poll.poll(&mut events, None) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads and counts datagrams until the socket is empty (returns true) or for
/// [`DRAIN_BATCHES`] calls (returns false).
fn drain(
    udp: &mio::net::UdpSocket,
    batch: &mut RecvBatch,
    counter: &AtomicU64,
) -> io::Result<bool> {
    for _ in 0..DRAIN_BATCHES {
        match batch.recv(udp) {
            Ok(n) => {
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// What the HTTP thread knows: the workers' counters, its own handles on their sockets for
/// the kernel's drop counters, and where the counts stood at the last reset.
struct Telemetry {
    counters: Arc<[WorkerCounter]>,
    sockets: Vec<UdpSocket>,
    /// The kernel's drop counter of each socket at the last reset; it cannot be zeroed.
    drops_at_reset: Vec<u64>,
    /// Datagrams counted before the last reset, for the total printed at exit.
    received_before_reset: u64,
}

impl Telemetry {
    fn new(counters: Arc<[WorkerCounter]>, workers: usize) -> Telemetry {
        Telemetry {
            counters,
            sockets: Vec::with_capacity(workers),
            drops_at_reset: vec![0; workers],
            received_before_reset: 0,
        }
    }

    /// The kernel's drop count of one socket since it was created, when the kernel says.
    fn raw_drops(&self, worker: usize) -> Option<u64> {
        socket::kernel_drops(&self.sockets[worker]).ok().flatten()
    }

    fn drops(&self, worker: usize) -> Option<u64> {
        self.raw_drops(worker)
            .map(|drops| drops.saturating_sub(self.drops_at_reset[worker]))
    }

    /// Datagrams received since the last reset, over all workers.
    fn received(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.received.load(Ordering::Relaxed))
            .sum()
    }

    /// Kernel drops since the last reset, over all workers.
    fn kernel_drops(&self) -> u64 {
        (0..self.sockets.len()).filter_map(|i| self.drops(i)).sum()
    }

    /// Zeroes the counts, as `DELETE /events` does on the server.
    fn reset(&mut self) {
        for (i, counter) in self.counters.iter().enumerate() {
            self.received_before_reset += counter.received.swap(0, Ordering::Relaxed);
            self.drops_at_reset[i] = self.raw_drops(i).unwrap_or(0);
        }
    }

    /// The `/metrics` text: the server's names for the two counters discard has.
    fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(512);
        let _ = writeln!(
            out,
            "# HELP ipevents_datagrams_received_total Datagrams read from the UDP socket \
             (and discarded).\n# TYPE ipevents_datagrams_received_total counter"
        );
        for (i, counter) in self.counters.iter().enumerate() {
            let received = counter.received.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "ipevents_datagrams_received_total{{worker=\"{i}\"}} {received}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP ipevents_kernel_drops_total Datagrams the kernel dropped because the \
             socket's receive queue was full (SO_MEMINFO).\n\
             # TYPE ipevents_kernel_drops_total counter"
        );
        for i in 0..self.sockets.len() {
            if let Some(drops) = self.drops(i) {
                let _ = writeln!(out, "ipevents_kernel_drops_total{{worker=\"{i}\"}} {drops}");
            }
        }
        out
    }
}

/// The routes discard answers; everything else is 404.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Reset,
    NotFound,
}

impl Route {
    fn of(method: &tiny_http::Method, url: &str) -> Route {
        let path = url.split(['?', '#']).next().unwrap_or("");
        match (method, path) {
            (tiny_http::Method::Get, "/metrics") => Route::Metrics,
            (tiny_http::Method::Delete, "/events") => Route::Reset,
            _ => Route::NotFound,
        }
    }
}

/// Answers requests until `stop` is set and the server is unblocked; returns the telemetry
/// for the exit report.
fn serve(http: &tiny_http::Server, mut telemetry: Telemetry, stop: &AtomicBool) -> Telemetry {
    loop {
        let request = match http.recv() {
            Ok(request) => request,
            Err(_) if stop.load(Ordering::Acquire) => return telemetry,
            Err(e) => {
                eprintln!("http: {e}");
                continue;
            }
        };
        let response = match Route::of(request.method(), request.url()) {
            Route::Metrics => tiny_http::Response::from_string(telemetry.render())
                .with_header(header("Content-Type", "text/plain; version=0.0.4")),
            Route::Reset => {
                telemetry.reset();
                tiny_http::Response::from_string("").with_status_code(204)
            }
            Route::NotFound => tiny_http::Response::from_string("not found\n")
                .with_status_code(404)
                .with_header(header("Content-Type", "text/plain")),
        };
        let _ = request.respond(response);
    }
}

fn header(name: &'static str, value: &'static str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name, value).expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiny_http::Method;

    #[test]
    fn routes() {
        for (method, url, want) in [
            (Method::Get, "/metrics", Route::Metrics),
            (Method::Get, "/metrics?x=1", Route::Metrics),
            (Method::Delete, "/events", Route::Reset),
            (Method::Get, "/events", Route::NotFound),
            (Method::Delete, "/events/abc", Route::NotFound),
            (Method::Post, "/metrics", Route::NotFound),
            (Method::Get, "/", Route::NotFound),
        ] {
            assert_eq!(Route::of(&method, url), want, "{method} {url}");
        }
    }

    #[test]
    fn counts_reset_and_render() {
        let (sockets, _) =
            socket::bind_reuseport_group("127.0.0.1:0".parse().unwrap(), 2, 1 << 20).unwrap();
        let counters: Arc<[WorkerCounter]> = (0..2).map(|_| WorkerCounter::default()).collect();
        let mut telemetry = Telemetry::new(counters.clone(), 2);
        telemetry.sockets = sockets;
        counters[0].received.store(5, Ordering::Relaxed);
        counters[1].received.store(7, Ordering::Relaxed);
        let text = telemetry.render();
        assert!(text.contains("ipevents_datagrams_received_total{worker=\"0\"} 5\n"));
        assert!(text.contains("ipevents_datagrams_received_total{worker=\"1\"} 7\n"));
        assert!(text.contains("ipevents_kernel_drops_total{worker=\"1\"} 0\n"));
        telemetry.reset();
        assert_eq!(telemetry.received(), 0);
        assert_eq!(telemetry.received_before_reset, 12);
    }
}

//! The HTTP gate: the public listener in front of tiny_http, which bounds what a client can
//! make the server hold.
//!
//! tiny_http alone gives every connection a thread, waits forever for a slow client, reads a
//! header line of any length, and on a huge `Content-Length` it does not read, allocates that
//! many bytes to discard the body, which aborts the process. The gate accepts the public
//! connections itself and enforces a connection cap, read and write deadlines, and head, body
//! and answer limits; each request that passes is rewritten into a small, well-formed request
//! and forwarded to tiny_http over a private Unix socket. The gate takes tiny_http's whole
//! answer off that socket before it writes any of it to the client, so the API thread never
//! waits on a client; a client that does not read its answer within the deadline loses only
//! its own connection. Requests the gate refuses get a JSON error and the connection is
//! closed.
//!
//! [`parse_head`] and the [`Framer`] hold all of the gate's understanding of HTTP and do no
//! I/O, so that they are tested and fuzzed on byte streams split at any point.
//!
//! The gate never looks at what a request asks for: routing and answers stay with the API.

use crate::log_limit::LogLimit;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The largest request body the server takes (`POST /events` carries one small `IpEvent`).
pub const MAX_BODY_BYTES: usize = 4096;

/// What one client may make the server hold.
#[derive(Clone, Copy, Debug)]
pub struct GateLimits {
    /// Open client connections; one more is answered 503 and closed.
    pub max_connections: usize,
    /// How long a kept-alive connection may stay silent between requests.
    pub idle_timeout: Duration,
    /// How long a client may take to send one whole request, head and body.
    pub request_timeout: Duration,
    /// Bytes of the request line and headers together.
    pub max_head_bytes: usize,
    /// Headers in one request.
    pub max_headers: usize,
    /// Bytes of a request body.
    pub max_body_bytes: usize,
    /// How long the API may take to answer a forwarded request.
    pub upstream_timeout: Duration,
    /// How long a client may take to read one whole answer; past it the connection is closed.
    pub response_timeout: Duration,
    /// Bytes of one answer the gate holds while the client reads it.
    pub max_response_bytes: usize,
}

impl Default for GateLimits {
    fn default() -> GateLimits {
        GateLimits {
            max_connections: 256,
            idle_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_head_bytes: 8 * 1024,
            max_headers: 32,
            max_body_bytes: MAX_BODY_BYTES,
            upstream_timeout: Duration::from_secs(30),
            response_timeout: Duration::from_secs(10),
            max_response_bytes: response_bytes_for(4096),
        }
    }
}

/// The most bytes an answer can take when it lists `max_ips` IPs: 18 bytes a quoted dotted
/// quad with its comma, for them and the 14 good ones, and 1 MiB for everything else (a
/// `/metrics` page with a thousand workers).
pub fn response_bytes_for(max_ips: usize) -> usize {
    (1 << 20) + max_ips.saturating_add(14).saturating_mul(18)
}

labelled_enum! {
    /// Why the gate refused a request or a connection; each has a counter in `/metrics`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Refusal {
        TooManyConnections => "too_many_connections",
        Timeout => "timeout",
        HeadTooLarge => "head_too_large",
        BodyTooLarge => "body_too_large",
        LengthRequired => "length_required",
        Malformed => "malformed",
        /// The client did not read an answer within the deadline: closed, with nothing more
        /// sent.
        SlowReader => "slow_reader",
    }
}

impl Refusal {
    fn status(self) -> (u16, &'static str) {
        match self {
            Refusal::TooManyConnections => (503, "Service Unavailable"),
            Refusal::Timeout => (408, "Request Timeout"),
            Refusal::HeadTooLarge => (431, "Request Header Fields Too Large"),
            Refusal::BodyTooLarge => (413, "Payload Too Large"),
            Refusal::LengthRequired => (411, "Length Required"),
            Refusal::Malformed => (400, "Bad Request"),
            Refusal::SlowReader => (408, "Request Timeout"),
        }
    }

    fn message(self, limits: &GateLimits) -> String {
        match self {
            Refusal::TooManyConnections => {
                format!(
                    "the server holds {} connections already; retry later",
                    limits.max_connections
                )
            }
            Refusal::Timeout => format!(
                "the request did not arrive within {} s",
                limits.request_timeout.as_secs()
            ),
            Refusal::HeadTooLarge => format!(
                "the request line and headers may take at most {} bytes in {} headers",
                limits.max_head_bytes, limits.max_headers
            ),
            Refusal::BodyTooLarge => {
                format!("the body may hold at most {} bytes", limits.max_body_bytes)
            }
            Refusal::LengthRequired => {
                "a body needs a Content-Length; chunked bodies are not accepted".to_owned()
            }
            Refusal::Malformed => "the request is not valid HTTP/1.1".to_owned(),
            Refusal::SlowReader => format!(
                "the answer was not read within {} s",
                limits.response_timeout.as_secs()
            ),
        }
    }
}

/// The gate's counters, readable from any thread.
#[derive(Debug, Default)]
pub struct GateCounters {
    pub open_connections: AtomicUsize,
    pub accepted: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
}

impl GateCounters {
    pub fn refused(&self, refusal: Refusal) -> u64 {
        self.refused[refusal.index()].load(Ordering::Relaxed)
    }

    fn count(&self, refusal: Refusal) {
        self.refused[refusal.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// The running gate.
pub struct Gate {
    local_addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    acceptor: JoinHandle<()>,
}

impl Gate {
    /// Starts accepting on `listener`, forwarding to the API listening at `upstream`.
    pub fn start(
        listener: TcpListener,
        upstream: PathBuf,
        limits: GateLimits,
        counters: Arc<GateCounters>,
    ) -> io::Result<Gate> {
        let local_addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stopping = stopping.clone();
            thread::Builder::new()
                .name("http-gate".into())
                .spawn(move || accept_loop(&listener, &upstream, limits, &counters, &stopping))?
        };
        Ok(Gate {
            local_addr,
            stopping,
            acceptor,
        })
    }

    /// Stops accepting connections. Connections already open end on their own deadlines.
    pub fn stop(self) {
        self.stopping.store(true, Ordering::Release);
        // The acceptor is blocked in accept(); a connection of our own wakes it up.
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
        let _ = self.acceptor.join();
    }
}

fn accept_loop(
    listener: &TcpListener,
    upstream: &std::path::Path,
    limits: GateLimits,
    counters: &Arc<GateCounters>,
    stopping: &AtomicBool,
) {
    let mut accept_error_log = LogLimit::every(Duration::from_secs(60));
    loop {
        let client = listener.accept();
        if stopping.load(Ordering::Acquire) {
            return;
        }
        let client = match client {
            Ok((client, _)) => client,
            Err(e) => {
                // Out of file descriptors, typically: wait a little instead of spinning, and
                // say so at most once a minute.
                if accept_error_log.ready() {
                    log::error!("http: accept: {e}");
                }
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if counters.open_connections.load(Ordering::Relaxed) >= limits.max_connections {
            counters.count(Refusal::TooManyConnections);
            let deadline = Instant::now() + Duration::from_secs(1);
            let _ = refuse(&client, Refusal::TooManyConnections, &limits, deadline);
            continue;
        }
        counters.open_connections.fetch_add(1, Ordering::Relaxed);
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        let open = OpenConnection(counters.clone());
        let upstream = upstream.to_owned();
        let counters = counters.clone();
        let spawned = thread::Builder::new()
            .name("http-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let _open = open;
                let mut connection = Connection {
                    client,
                    upstream_path: upstream,
                    upstream: None,
                    framer: Framer::new(limits),
                    limits,
                };
                if let Err(refusal) = connection.serve() {
                    counters.count(refusal);
                    // A slow reader is not sent an error it would not read either.
                    if refusal != Refusal::SlowReader {
                        let deadline = Instant::now() + limits.response_timeout;
                        let _ = refuse(&connection.client, refusal, &limits, deadline);
                    }
                }
                let _ = connection.client.shutdown(Shutdown::Both);
            });
        if let Err(e) = spawned {
            log::error!("http: spawn a connection thread: {e}");
        }
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection(Arc<GateCounters>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Writes the JSON error for a refusal by `deadline`, asking the client to close.
fn refuse(
    client: &TcpStream,
    refusal: Refusal,
    limits: &GateLimits,
    deadline: Instant,
) -> io::Result<()> {
    let (status, reason) = refusal.status();
    let body = serde_json::json!({ "error": refusal.message(limits) }).to_string();
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    write_by(client, response.as_bytes(), deadline)
}

/// The headers the API reads; every other client header stays at the gate. `http.rs` reads
/// headers only through a lookup that refuses any other name, and a test checks its calls.
pub const FORWARDED_HEADERS: [&str; 4] = ["Host", "Accept", "Content-Type", "Authorization"];

/// What the gate sends a client that asked `Expect: 100-continue`, before it reads the body.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// One request head as the gate understood it: what it will forward, and how to frame it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The target in origin form (`/path?query`); an absolute-form target is reduced to it.
    pub target: String,
    /// The headers the API reads, in the client's order, with the client's names.
    pub headers: Vec<(String, String)>,
    /// Bytes of the request line and headers in the client's stream.
    pub head_len: usize,
    /// Bytes of the body that follows, from Content-Length.
    pub body_len: usize,
    /// The connection ends after this request (HTTP/1.0, or `Connection: close`).
    pub close_after: bool,
    /// The client waits for `100 Continue` before it sends the body.
    pub expect_continue: bool,
}

impl Head {
    /// The small, well-formed head the API gets: the request line, the forwarded headers, a
    /// Host, and the body's length.
    pub fn forwarded(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        if !self
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("Host"))
        {
            out.push_str("Host: ipevents\r\n");
        }
        if self.body_len > 0 || self.method == "POST" {
            out.push_str(&format!("Content-Length: {}\r\n", self.body_len));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// Parses a request head at the start of `bytes`; `Ok(None)` while it is incomplete. Pure:
/// the gate's whole understanding of a request is here, so that it can be tested and fuzzed
/// without a socket.
pub fn parse_head(bytes: &[u8], limits: &GateLimits) -> Result<Option<Head>, Refusal> {
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
        Err(_) => return Err(Refusal::Malformed),
    };
    let method = request.method.ok_or(Refusal::Malformed)?;
    let target = origin_form(request.path.ok_or(Refusal::Malformed)?)?;
    let version = request.version.ok_or(Refusal::Malformed)?;
    let mut body_len: Option<usize> = None;
    let mut close_after = version == 0;
    let mut expect_continue = false;
    let mut forwarded = Vec::new();
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value)
            .ok()
            .filter(|v| v.is_ascii())
            .ok_or(Refusal::Malformed)?;
        let name = header.name;
        if name.eq_ignore_ascii_case("Content-Length") {
            // Digits only: `+5`, `-0`, `5, 5` and an empty value are not lengths (RFC 9110),
            // and two different lengths make the body's end ambiguous.
            let digits = value.trim();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Refusal::Malformed);
            }
            let length: usize = digits.parse().map_err(|_| Refusal::Malformed)?;
            if body_len.is_some_and(|earlier| earlier != length) {
                return Err(Refusal::Malformed);
            }
            body_len = Some(length);
        } else if name.eq_ignore_ascii_case("Transfer-Encoding") {
            return Err(Refusal::LengthRequired);
        } else if name.eq_ignore_ascii_case("Connection") {
            let value = value.to_ascii_lowercase();
            if value.contains("close") {
                close_after = true;
            } else if value.contains("keep-alive") {
                close_after = false;
            }
        } else if name.eq_ignore_ascii_case("Expect") {
            expect_continue = version == 1 && value.trim().eq_ignore_ascii_case("100-continue");
        } else if FORWARDED_HEADERS
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
        {
            forwarded.push((name.to_owned(), value.to_owned()));
        }
    }
    let body_len = body_len.unwrap_or(0);
    Ok(Some(Head {
        method: method.to_owned(),
        target,
        headers: forwarded,
        head_len,
        body_len,
        close_after,
        expect_continue: expect_continue && body_len > 0,
    }))
}

/// The origin form of a request target. An absolute-form target (`http://host/path`), which
/// RFC 9112 says a server must accept, loses its scheme and authority; a target that is not
/// ASCII is refused here rather than by tiny_http, which would close without an answer.
fn origin_form(target: &str) -> Result<String, Refusal> {
    if !target.is_ascii() {
        return Err(Refusal::Malformed);
    }
    let scheme_len = ["http://", "https://"]
        .iter()
        .find(|scheme| {
            target
                .get(..scheme.len())
                .is_some_and(|t| t.eq_ignore_ascii_case(scheme))
        })
        .map(|scheme| scheme.len());
    let Some(scheme_len) = scheme_len else {
        return Ok(target.to_owned());
    };
    let rest = &target[scheme_len..];
    let authority_len = rest.find(['/', '?']).unwrap_or(rest.len());
    if authority_len == 0 {
        return Err(Refusal::Malformed);
    }
    let path = &rest[authority_len..];
    Ok(if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    })
}

/// A request as the gate forwards it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub head: Head,
    /// The rewritten head followed by the client's body.
    pub request: Vec<u8>,
}

/// What the framer needs next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// More bytes from the client, at most [`Framer::room`].
    NeedMore,
    /// Send `CONTINUE` to the client, which waits for it before it sends the body.
    Continue,
    /// A whole request, ready to forward.
    Request(Forward),
}

/// Cuts a client's byte stream into requests. It holds at most one request's worth of bytes:
/// [`Framer::room`] says how much more it may take, and it takes no further than the request
/// it is working on allows. No I/O, so that any split of a stream can be tested.
#[derive(Debug)]
pub struct Framer {
    limits: GateLimits,
    /// Bytes received and not yet forwarded.
    pending: Vec<u8>,
    /// The head of the request being read, once it is complete.
    head: Option<Head>,
    continue_sent: bool,
}

impl Framer {
    pub fn new(limits: GateLimits) -> Framer {
        Framer {
            limits,
            pending: Vec::new(),
            head: None,
            continue_sent: false,
        }
    }

    /// No bytes of a next request have arrived.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// How many more bytes the framer takes now; zero only once it has a step to give.
    pub fn room(&self) -> usize {
        let limit = match &self.head {
            None => self.limits.max_head_bytes,
            Some(head) => head.head_len + head.body_len,
        };
        limit.saturating_sub(self.pending.len())
    }

    /// Adds bytes from the client; the caller gives at most [`Framer::room`].
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// What to do next. A refusal ends the connection.
    pub fn step(&mut self) -> Result<Step, Refusal> {
        if self.head.is_none() {
            if self.pending.is_empty() {
                return Ok(Step::NeedMore);
            }
            match parse_head(&self.pending, &self.limits)? {
                Some(head) if head.body_len > self.limits.max_body_bytes => {
                    return Err(Refusal::BodyTooLarge)
                }
                Some(head) => self.head = Some(head),
                None if self.pending.len() >= self.limits.max_head_bytes => {
                    return Err(Refusal::HeadTooLarge)
                }
                None => return Ok(Step::NeedMore),
            }
        }
        let head = self.head.as_ref().expect("set above");
        let total = head.head_len + head.body_len;
        if self.pending.len() < total {
            if head.expect_continue && !self.continue_sent {
                self.continue_sent = true;
                return Ok(Step::Continue);
            }
            return Ok(Step::NeedMore);
        }
        let head = self.head.take().expect("set above");
        self.continue_sent = false;
        let mut request = head.forwarded();
        request.extend_from_slice(&self.pending[head.head_len..total]);
        self.pending.drain(..total);
        Ok(Step::Request(Forward { head, request }))
    }
}

/// Writes all of `bytes` by `deadline`; a client that does not take them in time is a slow
/// reader, and gets nothing more.
fn write_by(mut stream: &TcpStream, bytes: &[u8], deadline: Instant) -> io::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or(io::ErrorKind::TimedOut)?;
        stream.set_write_timeout(Some(left))?;
        match stream.write(&bytes[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why relaying one request ended the connection.
enum RelayError {
    /// The API did not answer, or answered something the gate cannot relay.
    Upstream,
    /// The client did not take the answer within the deadline.
    SlowReader,
}

struct Connection {
    client: TcpStream,
    upstream_path: PathBuf,
    upstream: Option<UnixStream>,
    framer: Framer,
    limits: GateLimits,
}

impl Connection {
    /// Serves requests until the client closes, goes idle, or is refused.
    fn serve(&mut self) -> Result<(), Refusal> {
        let _ = self.client.set_nodelay(true);
        loop {
            let started = Instant::now();
            let forward = loop {
                match self.framer.step()? {
                    Step::Request(forward) => break forward,
                    Step::Continue => {
                        let deadline = Instant::now() + self.limits.response_timeout;
                        if write_by(&self.client, CONTINUE, deadline).is_err() {
                            return Err(Refusal::SlowReader);
                        }
                    }
                    Step::NeedMore => {
                        if !self.read_more(started)? {
                            return Ok(());
                        }
                    }
                }
            };
            let is_head_method = forward.head.method == "HEAD";
            match self.relay(&forward.request, is_head_method) {
                Ok(()) => {}
                // The API did not answer; nothing sensible can be sent on this connection.
                Err(RelayError::Upstream) => return Ok(()),
                Err(RelayError::SlowReader) => return Err(Refusal::SlowReader),
            }
            if forward.head.close_after {
                return Ok(());
            }
        }
    }

    /// Reads more from the client, as much as the framer takes. Returns false when the client
    /// closed, or stayed silent past the idle timeout with nothing pending.
    fn read_more(&mut self, started: Instant) -> Result<bool, Refusal> {
        let idle = self.framer.is_idle();
        let timeout = if idle {
            self.limits.idle_timeout
        } else {
            self.limits
                .request_timeout
                .checked_sub(started.elapsed())
                .filter(|left| !left.is_zero())
                .ok_or(Refusal::Timeout)?
        };
        let _ = self.client.set_read_timeout(Some(timeout));
        let mut chunk = [0u8; 4096];
        let want = self.framer.room().clamp(1, chunk.len());
        match self.client.read(&mut chunk[..want]) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.framer.push(&chunk[..n]);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if idle {
                    Ok(false)
                } else {
                    Err(Refusal::Timeout)
                }
            }
            Err(_) => Ok(false),
        }
    }

    /// Sends one request to the API, takes its whole answer off the Unix socket, then writes
    /// it to the client by the response deadline. The API thread writes into the socket and
    /// the gate empties it at once, so a client that does not read never blocks the API.
    fn relay(&mut self, request: &[u8], is_head_method: bool) -> Result<(), RelayError> {
        let answer = self
            .fetch(request, is_head_method)
            .map_err(|_| RelayError::Upstream)?;
        let deadline = Instant::now() + self.limits.response_timeout;
        write_by(&self.client, &answer, deadline).map_err(|_| RelayError::SlowReader)
    }

    /// The API's whole answer to `request`, at most `max_response_bytes`.
    fn fetch(&mut self, request: &[u8], is_head_method: bool) -> io::Result<Vec<u8>> {
        let result = self.try_fetch(request, is_head_method);
        if result.is_err() {
            // Whatever is left of that answer must not be taken for the next one.
            self.upstream = None;
        }
        result
    }

    fn try_fetch(&mut self, request: &[u8], is_head_method: bool) -> io::Result<Vec<u8>> {
        let upstream = match &mut self.upstream {
            Some(upstream) => upstream,
            None => {
                let stream = UnixStream::connect(&self.upstream_path)?;
                stream.set_read_timeout(Some(self.limits.upstream_timeout))?;
                stream.set_write_timeout(Some(self.limits.upstream_timeout))?;
                self.upstream.insert(stream)
            }
        };
        upstream.write_all(request)?;
        let mut response = Vec::with_capacity(1024);
        let mut chunk = [0u8; 16 * 1024];
        let (total, upstream_closes) = loop {
            let n = upstream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            response.extend_from_slice(&chunk[..n]);
            if let Some(framing) = response_framing(&response, is_head_method)? {
                break framing;
            }
            if response.len() > 64 * 1024 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "response head too large",
                ));
            }
        };
        if total > self.limits.max_response_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response larger than the gate relays",
            ));
        }
        response.truncate(total);
        while response.len() < total {
            let want = (total - response.len()).min(chunk.len());
            let n = upstream.read(&mut chunk[..want])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            response.extend_from_slice(&chunk[..n]);
        }
        if upstream_closes {
            self.upstream = None;
        }
        Ok(response)
    }
}

/// The length of a whole answer (head and body) and whether the API closes after it, once
/// its head is complete.
fn response_framing(response: &[u8], is_head_method: bool) -> io::Result<Option<(usize, bool)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head_len) = parsed
        .parse(response)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
    else {
        return Ok(None);
    };
    let status = parsed.code.unwrap_or(500);
    let mut body_len = 0usize;
    let mut closes = false;
    for header in parsed.headers.iter() {
        if header.name.eq_ignore_ascii_case("Content-Length") {
            body_len = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
        } else if header.name.eq_ignore_ascii_case("Connection") {
            closes = header.value.eq_ignore_ascii_case(b"close");
        }
    }
    if is_head_method || status == 204 || status == 304 || status < 200 {
        body_len = 0;
    }
    Ok(Some((head_len.saturating_add(body_len), closes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(raw: &[u8], want: Result<Option<(&str, usize, bool)>, Refusal>) {
        let got = parse_head(raw, &GateLimits::default()).map(|head| {
            head.map(|h| {
                (
                    String::from_utf8(h.forwarded()).unwrap(),
                    h.body_len,
                    h.close_after,
                )
            })
        });
        let want = want.map(|o| o.map(|(head, body, close)| (head.to_owned(), body, close)));
        assert_eq!(got, want, "{}", String::from_utf8_lossy(raw));
    }

    #[test]
    fn every_refusal_is_listed_once_in_order() {
        let labels: std::collections::BTreeSet<&str> =
            Refusal::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
        for (i, refusal) in Refusal::ALL.iter().enumerate() {
            assert_eq!(refusal.index(), i, "{refusal:?}");
        }
    }

    #[test]
    fn parses_and_rewrites_heads() {
        check(
            b"GET /events/x HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nX-Junk: 1\r\n\r\n",
            Ok(Some((
                "GET /events/x HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n",
                0,
                false,
            ))),
        );
        check(
            b"POST /events HTTP/1.0\r\nContent-Type: application/octet-stream\r\nContent-Length: 3\r\n\r\nabc",
            Ok(Some((
                "POST /events HTTP/1.1\r\nContent-Type: application/octet-stream\r\nHost: ipevents\r\nContent-Length: 3\r\n\r\n",
                3,
                true,
            ))),
        );
        // TE would let a client ask tiny_http for a chunked answer, which the gate could not
        // relay by its length: it is not forwarded.
        check(
            b"GET /metrics HTTP/1.1\r\nTE: chunked\r\nHost: a\r\n\r\n",
            Ok(Some(("GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", 0, false))),
        );
        check(
            b"DELETE /events HTTP/1.1\r\nConnection: close\r\nExpect: 100-continue\r\n\r\n",
            Ok(Some((
                "DELETE /events HTTP/1.1\r\nHost: ipevents\r\n\r\n",
                0,
                true,
            ))),
        );
        check(b"GET /events/x HTTP/1.1\r\nHost: a\r\n", Ok(None));
        check(
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            Err(Refusal::LengthRequired),
        );
        check(
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            Err(Refusal::Malformed),
        );
        check(
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            Err(Refusal::Malformed),
        );
        check(b"\x00\x01garbage\r\n\r\n", Err(Refusal::Malformed));
        check(
            b"GET / HTTP/1.1\r\nAccept: caf\xc3\xa9\r\n\r\n",
            Err(Refusal::Malformed),
        );
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        check(
            format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(),
            Err(Refusal::HeadTooLarge),
        );
    }

    /// Issue 11, item 5: the edge cases a hostile client found.
    #[test]
    fn edge_cases_of_targets_and_lengths() {
        // A non-ASCII target is refused here; tiny_http would close without an answer.
        check(b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n", Err(Refusal::Malformed));
        // Two different lengths, whichever comes first, and lengths that are not digits.
        for lengths in [["0", "5"], ["5", "0"]] {
            let raw = format!(
                "POST /events HTTP/1.1\r\nContent-Length: {}\r\nContent-Length: {}\r\n\r\n",
                lengths[0], lengths[1]
            );
            check(raw.as_bytes(), Err(Refusal::Malformed));
        }
        for length in [
            "+5",
            "-0",
            "5, 5",
            "",
            " ",
            "0x5",
            "99999999999999999999999",
        ] {
            let raw = format!("POST /events HTTP/1.1\r\nContent-Length: {length}\r\n\r\n");
            check(raw.as_bytes(), Err(Refusal::Malformed));
        }
        // The same length twice is one length.
        check(
            b"POST /events HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
            Ok(Some((
                "POST /events HTTP/1.1\r\nHost: ipevents\r\nContent-Length: 2\r\n\r\n",
                2,
                false,
            ))),
        );
        // Absolute-form targets are reduced to origin form.
        for (target, origin) in [
            ("http://example.com/events/ab?x=1", "/events/ab?x=1"),
            ("HTTPS://example.com:8443/healthz", "/healthz"),
            ("http://example.com", "/"),
            ("http://example.com?q", "/?q"),
            ("/plain", "/plain"),
            ("*", "*"),
        ] {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
            let want = format!("GET {origin} HTTP/1.1\r\nHost: h\r\n\r\n");
            check(raw.as_bytes(), Ok(Some((&want, 0, false))));
        }
        check(b"GET http:///x HTTP/1.1\r\n\r\n", Err(Refusal::Malformed));
    }

    /// Feeds `stream` to a framer in pieces of the given sizes (cycled), as the connection
    /// does; returns every step but `NeedMore`, and the refusal that ended it, if any.
    fn frame(stream: &[u8], pieces: &[usize]) -> (Vec<Step>, Option<Refusal>) {
        let mut framer = Framer::new(GateLimits::default());
        let mut steps = Vec::new();
        let mut offset = 0;
        let mut piece = pieces.iter().copied().cycle();
        loop {
            match framer.step() {
                Err(refusal) => return (steps, Some(refusal)),
                Ok(Step::NeedMore) => {
                    if offset == stream.len() {
                        return (steps, None);
                    }
                    assert!(
                        framer.room() > 0,
                        "the framer asks for more but has no room"
                    );
                    let n = piece
                        .next()
                        .unwrap_or(1)
                        .clamp(1, framer.room())
                        .min(stream.len() - offset);
                    framer.push(&stream[offset..offset + n]);
                    offset += n;
                }
                Ok(step) => steps.push(step),
            }
        }
    }

    fn requests(steps: &[Step]) -> Vec<Forward> {
        steps
            .iter()
            .filter_map(|step| match step {
                Step::Request(forward) => Some(forward.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn frames_pipelined_requests_and_asks_for_the_body() {
        let stream = b"POST /events HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabcGET /healthz HTTP/1.1\r\n\r\n";
        // Split after the first head: the client waits for 100 Continue before the body.
        let head_len = stream.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let (steps, refusal) = frame(stream, &[head_len, 1000]);
        assert_eq!(refusal, None);
        assert_eq!(steps.len(), 3, "{steps:?}");
        assert_eq!(steps[0], Step::Continue);
        let forwarded = requests(&steps);
        assert_eq!(
            forwarded[0].request,
            b"POST /events HTTP/1.1\r\nHost: ipevents\r\nContent-Length: 3\r\n\r\nabc"
        );
        assert_eq!(
            forwarded[1].request,
            b"GET /healthz HTTP/1.1\r\nHost: ipevents\r\n\r\n"
        );
        // Given whole, the body is there already, and no 100 Continue is needed.
        let (steps, _) = frame(stream, &[stream.len()]);
        assert_eq!(requests(&steps), forwarded);
        assert!(!steps.contains(&Step::Continue));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn request() -> impl Strategy<Value = Vec<u8>> {
            let method = prop_oneof![Just("GET"), Just("POST"), Just("DELETE"), Just("HEAD")];
            let target = prop_oneof![
                Just("/healthz".to_owned()),
                Just("http://h/events".to_owned()),
                "/[a-z?=]{0,12}",
            ];
            let body = proptest::collection::vec(any::<u8>(), 0..40);
            let extra = prop_oneof![
                Just(""),
                Just("Expect: 100-continue\r\n"),
                Just("Connection: keep-alive\r\n"),
                Just("X-Other: 1\r\n"),
                Just("Authorization: bearer t\r\n"),
            ];
            (method, target, body, extra).prop_map(|(method, target, body, extra)| {
                let mut raw = format!(
                    "{method} {target} HTTP/1.1\r\nHost: h\r\n{extra}Content-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                raw.extend_from_slice(&body);
                raw
            })
        }

        proptest! {
            /// However a pipelined stream is split, the same requests come out, each once,
            /// each what the gate parsed from exactly its own bytes.
            #[test]
            fn any_split_forwards_the_same_requests(
                stream in proptest::collection::vec(request(), 1..6),
                pieces in proptest::collection::vec(1usize..64, 1..8),
                noise in proptest::collection::vec(any::<u8>(), 0..20),
            ) {
                let mut raw = stream.concat();
                raw.extend_from_slice(&noise);
                let (whole, whole_refusal) = frame(&raw, &[raw.len()]);
                let (split, split_refusal) = frame(&raw, &pieces);
                prop_assert_eq!(requests(&whole), requests(&split));
                prop_assert_eq!(whole_refusal, split_refusal);
                let forwarded = requests(&whole);
                prop_assert!(forwarded.len() >= stream.len());
                for (forward, original) in forwarded.iter().zip(&stream) {
                    let parsed = parse_head(original, &GateLimits::default()).unwrap().unwrap();
                    prop_assert_eq!(&forward.head, &parsed);
                    prop_assert_eq!(parsed.head_len + parsed.body_len, original.len());
                    // The forwarded bytes are one whole request that parses back the same.
                    let again = parse_head(&forward.request, &GateLimits::default())
                        .unwrap()
                        .unwrap();
                    prop_assert_eq!(again.head_len + again.body_len, forward.request.len());
                    prop_assert_eq!(&again.method, &parsed.method);
                    prop_assert_eq!(&again.target, &parsed.target);
                    prop_assert_eq!(
                        &forward.request[again.head_len..],
                        &original[parsed.head_len..]
                    );
                }
            }

            #[test]
            fn framing_never_panics(
                raw in proptest::collection::vec(any::<u8>(), 0..600),
                pieces in proptest::collection::vec(1usize..64, 1..8),
            ) {
                let _ = frame(&raw, &pieces);
            }
        }
    }
}

//! The HTTP gate: the public listener in front of tiny_http, which bounds what a client can
//! make the server hold.
//!
//! tiny_http alone gives every connection a thread, waits forever for a slow client, reads a
//! header line of any length, and on a huge `Content-Length` it does not read, allocates that
//! many bytes to discard the body, which aborts the process. The gate accepts the public
//! connections itself and enforces a connection cap, read deadlines, and head and body limits;
//! each request that passes is rewritten into a small, well-formed request and forwarded to
//! tiny_http over a private Unix socket, and tiny_http's answer is relayed back. Requests
//! the gate refuses get a JSON error and the connection is closed.
//!
//! The gate never looks at what a request asks for: routing and answers stay with the API.

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
        }
    }
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
    let mut last_error_log: Option<Instant> = None;
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
                if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    last_error_log = Some(Instant::now());
                    log::error!("http: accept: {e}");
                }
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if counters.open_connections.load(Ordering::Relaxed) >= limits.max_connections {
            counters.count(Refusal::TooManyConnections);
            let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = refuse(&client, Refusal::TooManyConnections, &limits);
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
                    pending: Vec::new(),
                    limits,
                };
                if let Err(refusal) = connection.serve() {
                    counters.count(refusal);
                    let _ = refuse(&connection.client, refusal, &limits);
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

/// Writes the JSON error for a refusal, asking the client to close.
fn refuse(mut client: &TcpStream, refusal: Refusal, limits: &GateLimits) -> io::Result<()> {
    let (status, reason) = refusal.status();
    let body = serde_json::json!({ "error": refusal.message(limits) }).to_string();
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(response.as_bytes())
}

/// The headers the API reads; every other client header stays at the gate. `http.rs` reads
/// headers only through a lookup that refuses any other name, and a test checks its calls.
pub const FORWARDED_HEADERS: [&str; 4] = ["Host", "Accept", "Content-Type", "Authorization"];

/// A request as the gate forwards it.
struct Forward {
    head: Vec<u8>,
    head_len: usize,
    body_len: usize,
    is_head_method: bool,
    close_after: bool,
}

struct Connection {
    client: TcpStream,
    upstream_path: PathBuf,
    upstream: Option<UnixStream>,
    /// Bytes read from the client and not yet forwarded: at most one request's worth, since
    /// the gate reads no further than the request it is working on allows.
    pending: Vec<u8>,
    limits: GateLimits,
}

impl Connection {
    /// Serves requests until the client closes, goes idle, or is refused.
    fn serve(&mut self) -> Result<(), Refusal> {
        let _ = self.client.set_nodelay(true);
        loop {
            let Some(forward) = self.read_request()? else {
                return Ok(());
            };
            let total = forward.head_len + forward.body_len;
            let mut request = forward.head;
            request.extend_from_slice(&self.pending[forward.head_len..total]);
            self.pending.drain(..total);
            if self.relay(&request, forward.is_head_method).is_err() {
                // The API did not answer; nothing sensible can be sent on this connection.
                return Ok(());
            }
            if forward.close_after {
                return Ok(());
            }
        }
    }

    /// Reads one request. `Ok(None)` when the client closed or stayed idle between requests.
    fn read_request(&mut self) -> Result<Option<Forward>, Refusal> {
        let started = Instant::now();
        let head_len = loop {
            if !self.pending.is_empty() {
                match self.parse_head()? {
                    Some(forward) => break forward,
                    None if self.pending.len() >= self.limits.max_head_bytes => {
                        return Err(Refusal::HeadTooLarge)
                    }
                    None => {}
                }
            }
            if !self.read_more(started, self.limits.max_head_bytes)? {
                return Ok(None);
            }
        };
        let forward = head_len;
        if forward.body_len > self.limits.max_body_bytes {
            return Err(Refusal::BodyTooLarge);
        }
        let total = forward.head_len + forward.body_len;
        while self.pending.len() < total {
            if !self.read_more(started, total)? {
                return Ok(None);
            }
        }
        Ok(Some(forward))
    }

    /// Reads more from the client, never past `limit` pending bytes. Returns false when the
    /// client closed, or stayed silent past the idle timeout with nothing pending.
    fn read_more(&mut self, started: Instant, limit: usize) -> Result<bool, Refusal> {
        let idle = self.pending.is_empty();
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
        let want = limit
            .saturating_sub(self.pending.len())
            .clamp(1, chunk.len());
        match self.client.read(&mut chunk[..want]) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.pending.extend_from_slice(&chunk[..n]);
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

    /// Parses the pending head; `Ok(None)` while it is incomplete.
    fn parse_head(&self) -> Result<Option<Forward>, Refusal> {
        let mut headers = vec![httparse::EMPTY_HEADER; self.limits.max_headers];
        let mut request = httparse::Request::new(&mut headers);
        let head_len = match request.parse(&self.pending) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
            Err(_) => return Err(Refusal::Malformed),
        };
        let method = request.method.ok_or(Refusal::Malformed)?;
        let path = request.path.ok_or(Refusal::Malformed)?;
        let version = request.version.ok_or(Refusal::Malformed)?;
        let mut body_len = 0usize;
        let mut close_after = version == 0;
        let mut forwarded = format!("{method} {path} HTTP/1.1\r\n");
        let mut has_host = false;
        for header in request.headers.iter() {
            let value = std::str::from_utf8(header.value)
                .ok()
                .filter(|v| v.is_ascii())
                .ok_or(Refusal::Malformed)?;
            let name = header.name;
            if name.eq_ignore_ascii_case("Content-Length") {
                let length: usize = value.trim().parse().map_err(|_| Refusal::Malformed)?;
                if body_len != 0 && body_len != length {
                    return Err(Refusal::Malformed);
                }
                body_len = length;
            } else if name.eq_ignore_ascii_case("Transfer-Encoding") {
                return Err(Refusal::LengthRequired);
            } else if name.eq_ignore_ascii_case("Connection") {
                let value = value.to_ascii_lowercase();
                if value.contains("close") {
                    close_after = true;
                } else if value.contains("keep-alive") {
                    close_after = false;
                }
            } else if FORWARDED_HEADERS
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name))
            {
                has_host |= name.eq_ignore_ascii_case("Host");
                forwarded.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        if !has_host {
            forwarded.push_str("Host: ipevents\r\n");
        }
        if body_len > 0 || method == "POST" {
            forwarded.push_str(&format!("Content-Length: {body_len}\r\n"));
        }
        forwarded.push_str("\r\n");
        Ok(Some(Forward {
            head: forwarded.into_bytes(),
            head_len,
            body_len,
            is_head_method: method == "HEAD",
            close_after,
        }))
    }

    /// Sends one request to the API and copies its answer to the client.
    fn relay(&mut self, request: &[u8], is_head_method: bool) -> io::Result<()> {
        let upstream = match &mut self.upstream {
            Some(upstream) => upstream,
            None => {
                let stream = UnixStream::connect(&self.upstream_path)?;
                stream.set_read_timeout(Some(self.limits.upstream_timeout))?;
                self.upstream.insert(stream)
            }
        };
        upstream.write_all(request)?;
        let mut response = Vec::with_capacity(1024);
        let mut chunk = [0u8; 16 * 1024];
        let (head_len, body_len, upstream_closes) = loop {
            let n = upstream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            response.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head_len) = parsed
                .parse(&response)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            {
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
                break (head_len, body_len, closes);
            }
            if response.len() > 64 * 1024 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "response head too large",
                ));
            }
        };
        let mut remaining = (head_len + body_len).saturating_sub(response.len());
        let available = response.len().min(head_len + body_len);
        self.client.write_all(&response[..available])?;
        while remaining > 0 {
            let n = upstream.read(&mut chunk[..remaining.min(16 * 1024)])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.client.write_all(&chunk[..n])?;
            remaining -= n;
        }
        if upstream_closes {
            self.upstream = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(pending: &[u8]) -> Connection {
        // A connected pair stands in for a client; these tests only parse.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        Connection {
            client,
            upstream_path: PathBuf::new(),
            upstream: None,
            pending: pending.to_vec(),
            limits: GateLimits::default(),
        }
    }

    #[track_caller]
    fn check(raw: &[u8], want: Result<Option<(&str, usize, bool)>, Refusal>) {
        let got = connection(raw).parse_head().map(|forward| {
            forward.map(|f| {
                (
                    String::from_utf8(f.head).unwrap(),
                    f.body_len,
                    f.close_after,
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
}

//! Shared helpers: the server as a real process on ephemeral loopback ports, a raw HTTP/1.1
//! client (raw so that tests can send exactly the bytes they mean), metric scraping, and the
//! reference client's traffic.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// How long any wait in the tests may take before it fails the test.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The server binary, running on 127.0.0.1 with ephemeral ports. Dropping it kills it.
pub struct Server {
    child: Option<Child>,
    pub udp: SocketAddr,
    pub http: SocketAddr,
    /// The server's "listening" line, with its bound addresses and settings.
    pub listening: String,
    /// What the server printed to stderr before that line (warnings, restore notes).
    pub startup: Vec<String>,
    /// The same lines as one text, a line each.
    pub startup_log: String,
    stderr: mpsc::Receiver<String>,
    /// Lines read from stderr while waiting for another.
    seen: Vec<String>,
    stdout: Option<thread::JoinHandle<String>>,
}

/// What a stopped server printed, and how it ended.
pub struct Exit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Server {
    /// Starts the server with `args` on top of loopback ephemeral ports and no pinning, and
    /// waits for its "listening" line.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_env(args, &[])
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let loopback = ["--udp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--no-pin"];
        Server::start_exactly(&[&loopback[..], args].concat(), env)
    }

    /// Starts the server with `args` and `env` and nothing else: the caller chooses loopback
    /// addresses itself.
    pub fn start_exactly(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = server_command()
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the server binary");
        let stderr = forward_lines(child.stderr.take().unwrap());
        let mut stdout_pipe = child.stdout.take().unwrap();
        let stdout = thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout_pipe.read_to_string(&mut text);
            text
        });
        let mut server = Server {
            child: Some(child),
            udp: "0.0.0.0:0".parse().unwrap(),
            http: "0.0.0.0:0".parse().unwrap(),
            listening: String::new(),
            startup: Vec::new(),
            startup_log: String::new(),
            stderr,
            seen: Vec::new(),
            stdout: Some(stdout),
        };
        let line = server
            .wait_for_line("ipevents: listening")
            .unwrap_or_else(|seen| panic!("server did not start; it said: {seen}"));
        server.startup = server.seen.drain(..).collect();
        server.startup_log = server
            .startup
            .iter()
            .map(|line| format!("{line}\n"))
            .collect();
        server.udp = field(&line, "udp=").parse().unwrap();
        server.http = field(&line, "http=").parse().unwrap();
        server.listening = line;
        server
    }

    /// Waits for a stderr line containing `needle`; on failure returns what it saw.
    pub fn wait_for_line(&mut self, needle: &str) -> Result<String, String> {
        let deadline = Instant::now() + DEADLINE;
        let first = self.seen.len();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(line) => self.seen.push(line),
                Err(_) => break,
            }
        }
        Err(self.seen[first..].join("\n"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn stop(self) -> Exit {
        self.signal("TERM");
        self.wait_exit()
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(mut self) -> Exit {
        let mut child = self.child.take().unwrap();
        let status = wait_with_deadline(&mut child, "the server");
        let stdout = self.stdout.take().unwrap().join().unwrap();
        let stderr: Vec<String> = self.stderr.try_iter().collect();
        Exit {
            status,
            stdout,
            stderr: stderr.join("\n"),
        }
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        request(self.http, method, path, headers, body)
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    /// `GET /events/{sha}`, asserting a 200 JSON answer.
    pub fn answer(&self, sha: &str) -> serde_json::Value {
        let response = self.request(
            "GET",
            &format!("/events/{sha}"),
            &[("Accept", "application/json")],
            b"",
        );
        assert_eq!(
            response.status,
            200,
            "GET /events/{sha}: {}",
            response.text()
        );
        assert_eq!(response.header("Content-Type"), Some("application/json"));
        serde_json::from_slice(&response.body).expect("JSON body")
    }

    pub fn reset(&self) {
        let response = self.request("DELETE", "/events", &[], b"");
        assert_eq!(response.status, 204, "{}", response.text());
    }

    /// The sum of every sample of metric `name` (all label sets) in `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let response = self.get("/metrics");
        assert_eq!(response.status, 200);
        metric(&response.text(), name)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The server binary with none of the runner's own settings: a test states every
/// `IPEVENTS_*` variable it wants, and the runner's RUST_LOG, NOTIFY_SOCKET or
/// JOURNAL_STREAM (under systemd, say) change nothing.
pub fn server_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ipevents"));
    for (name, _) in std::env::vars_os() {
        let inherited = name.to_str().is_some_and(|name| {
            name.starts_with("IPEVENTS_")
                || ["RUST_LOG", "NOTIFY_SOCKET", "JOURNAL_STREAM", "FAILPOINTS"].contains(&name)
        });
        if inherited {
            command.env_remove(&name);
        }
    }
    command
}

/// Runs the server binary with `args` (no defaults added) and expects it to exit by itself.
pub fn run_to_exit(args: &[&str]) -> Exit {
    run_to_exit_with_env(args, &[])
}

/// Like [`run_to_exit`], with extra environment variables. A server that has not exited
/// within [`DEADLINE`] is killed by its PID and fails the test.
pub fn run_to_exit_with_env(args: &[&str], env: &[(&str, &str)]) -> Exit {
    let mut child = server_command()
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the server binary");
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let status = wait_with_deadline(&mut child, &format!("{args:?}"));
    Exit {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Waits for `child` to exit by itself; past [`DEADLINE`] kills it by its PID and fails the
/// test, naming `what`.
fn wait_with_deadline(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn forward_lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The value of `key=value` in a log line.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// Polls `check` until it holds, failing the test after [`DEADLINE`].
#[track_caller]
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "waited {DEADLINE:?} for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sums the samples of `name` in Prometheus text.
pub fn metric(text: &str, name: &str) -> u64 {
    sample(text, name).unwrap_or(0)
}

/// The sum of `name`'s samples, or `None` when `/metrics` has none: for asserting a zero
/// that a missing or renamed family would otherwise pass.
pub fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            let metric_name = key.split('{').next()?;
            (metric_name == name).then(|| value.parse::<u64>().ok())?
        })
        .reduce(|a, b| a + b)
}

/// The value of the sample of `name` whose labels contain `label`, e.g. `reason="bad_sha"`.
pub fn labelled_metric(text: &str, name: &str, label: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key.starts_with(&format!("{name}{{")) && key.contains(label))
            .then(|| value.parse().ok())?
    })
}

/// Asserts that `/metrics` text counts `want(reason)` invalid datagrams for every reason.
#[track_caller]
pub fn check_invalid_counts(metrics: &str, want: impl Fn(&str) -> u64) {
    for reason in ipevents::wire::Reject::ALL.map(|r| r.as_str()) {
        let label = format!("reason=\"{reason}\"");
        let got = labelled_metric(metrics, "ipevents_datagrams_invalid_total", &label);
        assert_eq!(
            got,
            Some(want(reason)),
            "invalid datagrams with reason {reason}"
        );
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response from a connection that may carry more; returns (status line, body).
pub fn read_response_line(reader: &mut BufReader<TcpStream>) -> (String, String) {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (
        status_line.trim_end().to_owned(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// One HTTP/1.1 request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    send_raw(addr, &raw)
}

/// Writes `raw` bytes to the HTTP port and parses the one response that comes back.
pub fn send_raw(addr: SocketAddr, raw: &[u8]) -> Response {
    try_send_raw(addr, raw).unwrap_or_else(|e| panic!("HTTP exchange with {addr}: {e}"))
}

/// Like [`send_raw`], for tests where the server may close the connection instead.
pub fn try_send_raw(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Response> {
    use std::io::{Error, ErrorKind};
    let bad = |what: String| Error::new(ErrorKind::InvalidData, what);
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    stream.write_all(raw)?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("header {line:?}")))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("Content-Length"))
        .map_or(Ok(0), |(_, v)| {
            v.parse().map_err(|_| bad(format!("length {v:?}")))
        })?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// The reference client's traffic: a home /28, a few bad IPs far from it, three apps, and
/// every (ip, app) pair as one encoded event.
pub struct Reference {
    pub block_base: u32,
    pub bad_ips: Vec<u32>,
    pub apps: Vec<String>,
    /// (app index, ip, encoded datagram).
    pub events: Vec<(usize, u32, Vec<u8>)>,
}

impl Reference {
    pub fn new(seed: u64) -> Reference {
        let mut rng = StdRng::seed_from_u64(seed);
        let block_base = rng.random::<u32>() & !0xf;
        let bad_count = rng.random_range(1..=10);
        let mut bad_ips = Vec::new();
        while bad_ips.len() < bad_count {
            let ip: u32 = rng.random();
            if ip.abs_diff(block_base) > 28 && !bad_ips.contains(&ip) {
                bad_ips.push(ip);
            }
        }
        let apps: Vec<String> = (0..3).map(|_| hex_sha(&mut rng)).collect();
        let good = (1..=14).map(|host| block_base + host);
        let mut events = Vec::new();
        for ip in good.chain(bad_ips.iter().copied()) {
            for (app, sha) in apps.iter().enumerate() {
                events.push((app, ip, ipevents::wire::encode(sha, ip.into())));
            }
        }
        Reference {
            block_base,
            bad_ips,
            apps,
            events,
        }
    }

    pub fn good_quads(&self) -> Vec<String> {
        (1..=14).map(|h| quad(self.block_base + h)).collect()
    }
}

/// What was sent for one app.
#[derive(Default, Debug)]
pub struct Sent {
    pub count: u64,
    pub ips: BTreeSet<u32>,
}

/// Sends `count` events drawn uniformly from `events` (app index, ip, datagram) from
/// `sockets` source sockets in turn; returns what was sent per app.
pub fn send_events(
    to: SocketAddr,
    events: &[(usize, u32, Vec<u8>)],
    count: usize,
    sockets: usize,
    seed: u64,
) -> BTreeMap<usize, Sent> {
    let mut rng = StdRng::seed_from_u64(seed);
    let senders: Vec<UdpSocket> = (0..sockets)
        .map(|_| {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.connect(to).unwrap();
            socket
        })
        .collect();
    let mut sent: BTreeMap<usize, Sent> = BTreeMap::new();
    for i in 0..count {
        let (app, ip, datagram) = &events[rng.random_range(0..events.len())];
        send_datagram(&senders[i % sockets], datagram);
        let entry = sent.entry(*app).or_default();
        entry.count += 1;
        entry.ips.insert(*ip);
    }
    sent
}

/// Sends one datagram, retrying while the kernel has no buffer for it.
pub fn send_datagram(socket: &UdpSocket, datagram: &[u8]) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match socket.send(datagram) {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(105) => {
                // ENOBUFS: the send queue is full for a moment.
                thread::sleep(Duration::from_micros(50));
            }
            Err(e) => panic!("send: {e}"),
        }
    }
}

pub fn hex_sha(rng: &mut impl RngExt) -> String {
    (0..32)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

pub fn quad(ip: u32) -> String {
    std::net::Ipv4Addr::from(ip).to_string()
}

pub fn quads(ips: impl IntoIterator<Item = u32>) -> Vec<String> {
    let mut sorted: Vec<u32> = ips.into_iter().collect();
    sorted.sort_unstable();
    sorted.into_iter().map(quad).collect()
}

/// Asserts that `answer` is what the reference traffic in `sent` must produce for `app`.
#[track_caller]
pub fn check_reference_answer(reference: &Reference, sent: &Sent, answer: &serde_json::Value) {
    assert_eq!(answer["count"], sent.count, "count");
    let good: Vec<String> = serde_json::from_value(answer["good_ips"].clone()).unwrap();
    assert_eq!(good, reference.good_quads(), "good_ips");
    let bad: Vec<String> = serde_json::from_value(answer["bad_ips"].clone()).unwrap();
    let sent_bad = sent
        .ips
        .iter()
        .copied()
        .filter(|ip| reference.bad_ips.contains(ip));
    assert_eq!(bad, quads(sent_bad), "bad_ips");
    assert!(answer.get("ips_truncated").is_none());
}

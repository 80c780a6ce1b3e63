"""A receiver under test (the ipevents server or the discard receiver): start it on loopback
ports, talk to its HTTP API, read what the kernel says about it, stop it.

Every process started here is recorded, so that `stop_all` can end it whatever happens to the
benchmark; nothing here ever signals a process it did not start.
"""

import http.client
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

# The line both receivers print once their sockets are bound.
LISTENING = re.compile(
    r"listening udp=(?P<udp>\S+) http=(?P<http>\S+) .*?rcvbuf_bytes=(?P<rcvbuf>\d+)"
)

# The steering mode on that line, when the receiver prints one.
STEERING = re.compile(r"\bsteering=(?P<steering>\S+)")

# A duration as the server's shutdown report prints it: 450ns, 12.3us, 1.2ms, 1.20s.
DURATION = re.compile(r"^(?P<value>[0-9.]+)(?P<unit>ns|us|ms|s)$")
DURATION_UNIT_S = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}

# The shutdown report's latency table: a row per histogram, these columns after its name.
REPORT_COLUMNS = ("p50", "p90", "p99", "p99.9", "max", "count")

# A receiver has this long to bind its sockets and print the line above.
START_TIMEOUT_S = 30

# A receiver has this long to drain its sockets and exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 60

# Each HTTP request may take this long; the server answers in milliseconds when healthy.
HTTP_TIMEOUT_S = 10

# The clock ticks /proc/PID/stat counts CPU time in.
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")

# Every receiver process started and not yet reaped, for `stop_all`.
_LIVE = set()


class BenchError(Exception):
    """A step could not be carried out; the message says why."""


@dataclass
class Counters:
    """A receiver's totals from /metrics, with the per-worker received counts."""

    received: int = 0
    ingested: int = None
    kernel_drops: int = 0
    apps_tracked: int = None
    app_entries: int = None
    hot_apps: int = None
    received_per_worker: list = field(default_factory=list)

    def since(self, base):
        """What happened between `base` and now (the counters only grow between resets)."""
        minus = lambda a, b: None if a is None else a - (b or 0)
        return Counters(
            received=self.received - base.received,
            ingested=minus(self.ingested, base.ingested),
            kernel_drops=self.kernel_drops - base.kernel_drops,
            apps_tracked=self.apps_tracked,
            app_entries=self.app_entries,
            hot_apps=self.hot_apps,
            received_per_worker=[
                now - then
                for now, then in zip(self.received_per_worker, base.received_per_worker)
            ],
        )


def parse_metrics(text):
    """Reads the counters the benchmark needs from Prometheus text; sums over labels."""
    samples = {}
    per_worker = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_and_labels, _, value = line.rpartition(" ")
        name = name_and_labels.split("{", 1)[0]
        try:
            number = int(value)
        except ValueError:
            continue
        samples[name] = samples.get(name, 0) + number
        if name == "ipevents_datagrams_received_total":
            worker = re.search(r'worker="(\d+)"', name_and_labels)
            if worker:
                per_worker[int(worker.group(1))] = number
    if "ipevents_datagrams_received_total" not in samples:
        raise BenchError("/metrics has no ipevents_datagrams_received_total")
    return Counters(
        received=samples["ipevents_datagrams_received_total"],
        ingested=samples.get("ipevents_events_ingested_total"),
        kernel_drops=samples.get("ipevents_kernel_drops_total", 0),
        apps_tracked=samples.get("ipevents_apps_tracked"),
        app_entries=samples.get("ipevents_app_entries"),
        hot_apps=samples.get("ipevents_steering_hot_apps"),
        received_per_worker=[per_worker[i] for i in sorted(per_worker)],
    )


def samples(text):
    """Every sample of a Prometheus text, summed over labels, by metric name."""
    totals = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            number = float(value)
        except ValueError:
            continue
        name = key.split("{", 1)[0]
        totals[name] = totals.get(name, 0) + number
    return totals


def parse_quantiles(text, name):
    """{quantile: value} of one summary family in Prometheus text, e.g. the seconds of
    `ipevents_batch_seconds{quantile="0.999"}`."""
    quantiles = {}
    pattern = re.compile(re.escape(name) + r'\{quantile="(?P<q>[0-9.]+)"\} (?P<value>\S+)$')
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            quantiles[float(match["q"])] = float(match["value"])
    return quantiles


def parse_duration_s(text):
    """Seconds from a duration of the shutdown report (`12.3us`), or None."""
    match = DURATION.match(text)
    if not match:
        return None
    return float(match["value"]) * DURATION_UNIT_S[match["unit"]]


def parse_report_row(lines, row):
    """{column: value} of one row of the latency table the server prints at shutdown
    (`batch 12.0us ... 3.1ms 4821`): durations in seconds, the count as an int; None when
    the output has no such row."""
    for line in lines:
        fields = line.split()
        if len(fields) != 1 + len(REPORT_COLUMNS) or fields[0] != row:
            continue
        *durations, count = fields[1:]
        seconds = [parse_duration_s(field) for field in durations]
        if None in seconds or not count.isdigit():
            continue
        return dict(zip(REPORT_COLUMNS, [*seconds, int(count)]))
    return None


def proc_stat(pid, thread=None):
    """The fields of /proc/PID/stat, or of one of its threads', after the command name (which
    is in parentheses and may hold spaces): field N of stat(5) is at index N - 3."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with open(path, encoding="utf-8") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def stat_cpu_s(fields):
    """User plus system CPU time in seconds (utime and stime, fields 14 and 15 of stat(5))
    from `proc_stat`'s fields."""
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def thread_named(pid, name):
    """The id of a thread of `pid` called `name`, or None."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm", encoding="utf-8") as comm:
                if comm.read().strip() == name:
                    return int(task)
        except FileNotFoundError:
            continue
    return None


def parse_proc_net_udp(text, port):
    """Sums the receive queues (bytes the kernel charged) and drop counters of every socket
    bound to `port`, from /proc/net/udp text."""
    queued_bytes = drops = sockets = 0
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 13:
            continue
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port != port:
            continue
        queued_bytes += int(fields[4].split(":")[1], 16)
        drops += int(fields[12])
        sockets += 1
    return queued_bytes, drops, sockets


class Http:
    """A keep-alive HTTP client for one receiver; reconnects once when the connection broke."""

    def __init__(self, address):
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.connection = None

    def request(self, method, path):
        for attempt in range(2):
            try:
                if self.connection is None:
                    self.connection = http.client.HTTPConnection(
                        self.host, self.port, timeout=HTTP_TIMEOUT_S
                    )
                self.connection.request(method, path, headers={"Accept": "*/*"})
                response = self.connection.getresponse()
                return response.status, response.read().decode("utf-8", "replace")
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class Receiver:
    """One receiver process on 127.0.0.1 ports chosen by the kernel.

    Use it as a context manager: it starts on entry and is stopped on exit, whatever happened.
    """

    def __init__(self, binary, kind, flags, log_path):
        self.binary = binary
        self.kind = kind
        self.flags = [str(flag) for flag in flags]
        self.log_path = log_path
        self.process = None
        self.udp = self.http_address = None
        self.rcvbuf_bytes = None
        self.steering = None
        self.warnings = []
        self.http = None
        self._lines = []
        self._drains = []
        self._listening = threading.Event()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *_):
        self.stop()

    @property
    def pid(self):
        return self.process.pid

    @property
    def udp_port(self):
        return int(self.udp.rsplit(":", 1)[1])

    def start(self):
        argv = [self.binary, "--udp", "127.0.0.1:0", "--http", "127.0.0.1:0", *self.flags]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        _LIVE.add(self.process)
        # Both pipes are drained on threads of their own, so that a chatty receiver can never
        # block on a full pipe while the benchmark waits on it.
        for stream in (self.process.stderr, self.process.stdout):
            drain = threading.Thread(target=self._drain, args=(stream,), daemon=True)
            drain.start()
            self._drains.append(drain)
        if not self._listening.wait(START_TIMEOUT_S) or self.udp is None:
            self.stop()
            raise BenchError(
                f"{self.kind} did not start: {' '.join(argv)}\n" + "".join(self._lines[-10:])
            )
        self.http = Http(self.http_address)

    def _drain(self, stream):
        with open(self.log_path, "a", encoding="utf-8") as log:
            for raw in stream:
                line = raw.decode("utf-8", "replace")
                log.write(line)
                self._lines.append(line)
                if line.startswith("warning:"):
                    self.warnings.append(line.strip())
                match = LISTENING.search(line)
                if match:
                    self.udp = match["udp"]
                    self.http_address = match["http"]
                    self.rcvbuf_bytes = int(match["rcvbuf"])
                    steering = STEERING.search(line)
                    self.steering = steering["steering"] if steering else None
                    self._listening.set()
        # The process closed its output, most likely by exiting: nobody should wait longer.
        self._listening.set()

    def stop(self):
        """SIGCONT (in case it is stopped), then SIGTERM; SIGKILL if it does not exit."""
        if self.http is not None:
            self.http.close()
        process = self.process
        if process is None or process.poll() is not None:
            _LIVE.discard(process)
        else:
            terminate(process)
        # The process has exited, so its pipes reach their end: read what it printed last
        # (the shutdown report).
        for drain in self._drains:
            drain.join(timeout=STOP_TIMEOUT_S)

    def output(self):
        """Every line the receiver printed so far, stdout and stderr interleaved."""
        return list(self._lines)

    def request_snapshot(self):
        """SIGUSR1: the server writes its state file now (with `--state`)."""
        os.kill(self.pid, signal.SIGUSR1)

    def exited_cleanly(self):
        return self.process is not None and self.process.returncode == 0

    def get(self, path):
        status, body = self.http.request("GET", path)
        if status != 200:
            raise BenchError(f"{self.kind}: GET {path} answered {status}: {body[:200]}")
        return body

    def metrics(self):
        return parse_metrics(self.get("/metrics"))

    def reset(self):
        status, body = self.http.request("DELETE", "/events")
        if status != 204:
            raise BenchError(f"{self.kind}: DELETE /events answered {status}: {body[:200]}")

    def timed_reset_s(self):
        """Times one `DELETE /events` on a fresh connection, as curl would make it."""
        # No proxy: the address is loopback, and an HTTP_PROXY from the environment must not
        # divert the request to another host.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(f"http://{self.http_address}/events", method="DELETE")
        started = time.monotonic()
        try:
            with opener.open(request, timeout=HTTP_TIMEOUT_S) as response:
                response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        elapsed_s = time.monotonic() - started
        if status != 204:
            raise BenchError(f"{self.kind}: DELETE /events answered {status} after "
                             f"{elapsed_s * 1000:.0f} ms")
        return elapsed_s

    def pause(self):
        """SIGSTOP, and waits until every thread is stopped: the signal is asynchronous."""
        os.kill(self.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not all(state == "T" for state in self._thread_states()):
            if time.monotonic() > deadline:
                raise BenchError(f"{self.kind} did not stop within 5 s of SIGSTOP")
            time.sleep(0.001)

    def resume(self):
        os.kill(self.pid, signal.SIGCONT)

    def _thread_states(self):
        states = []
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                states.append(proc_stat(self.pid, task)[0])
            except FileNotFoundError:
                continue
        return states

    def socket_queues(self):
        """(bytes queued, kernel drops, sockets) over the receiver's UDP sockets."""
        with open("/proc/net/udp", encoding="ascii") as table:
            return parse_proc_net_udp(table.read(), self.udp_port)

    def rss_bytes(self):
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise BenchError(f"no VmRSS in /proc/{self.pid}/status")

    def cpu_s(self):
        """User plus system CPU time of the whole process so far, in seconds."""
        return stat_cpu_s(proc_stat(self.pid))


def terminate(process):
    """Continues, stops and reaps a process this benchmark started (SIGTERM, then SIGKILL)."""
    try:
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)
    finally:
        _LIVE.discard(process)


def track(process):
    """Records a process this benchmark started, so that `stop_all` ends it whatever happens."""
    _LIVE.add(process)


def stop_all():
    """Stops every receiver still running; for the benchmark's last `finally`."""
    for process in list(_LIVE):
        if process.poll() is None:
            terminate(process)
        _LIVE.discard(process)

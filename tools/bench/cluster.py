"""Step 6, cluster mode: ipevents nodes sharing a 3-primary Redis Cluster on loopback.

It starts the cluster itself (Debian's redis-server and redis-cli, on free loopback ports),
stops every redis-server by its PID when done, and measures:

- ingest capacity of one node in cluster mode against the same node standalone, in the same
  run (as step 1 measures it), and of two nodes against one;
- store writes per ingested event (one write is one app's delta in one flush) for the
  reference mix and for many apps;
- the rate of distinct (app, ip) pairs one node flushes, with the flusher's and Redis's CPU;
- query latency through the store while the node takes writes.
"""

import shutil
import signal
import socket
import subprocess
import tempfile
import time

import report as fmt
from receiver import BenchError, proc_stat, samples, stat_cpu_s, terminate, thread_named, track
from steps import CAPACITY_RCVBUF_BYTES, LOADGEN_MAX_S, capacity_row, log

REDIS_START_TIMEOUT_S = 20


def redis_available():
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def _free_port_pair():
    """A loopback port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as bus:
                bus.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise BenchError("no free port pair for a redis-server")


def _cli(port, *args):
    done = subprocess.run(["timeout", "5", "redis-cli", "-h", "127.0.0.1", "-p", str(port),
                           *[str(a) for a in args]],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          stdin=subprocess.DEVNULL, check=False)
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


class RedisCluster:
    """Three redis-server primaries in cluster mode, no persistence, on loopback."""

    def __init__(self, log_dir, primaries=3):
        self.dir = tempfile.mkdtemp(prefix="ipevents-bench-redis-")
        self.log_dir = log_dir
        self.ports = [_free_port_pair() for _ in range(primaries)]
        self.processes = []

    def __enter__(self):
        for port in self.ports:
            process = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes",
                 "--cluster-config-file", f"{self.dir}/nodes-{port}.conf",
                 "--dir", self.dir, "--save", "", "--appendonly", "no",
                 "--logfile", str(self.log_dir / f"redis-{port}.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            track(process)
            self.processes.append(process)
        self._wait(lambda port: (_cli(port, "PING") or "").strip() == "PONG", "answer PING")
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in self.ports], "--cluster-yes"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL, check=True, timeout=60)
        self._wait(lambda port: "cluster_state:ok" in (_cli(port, "CLUSTER", "INFO") or ""),
                   "say cluster_state:ok")
        return self

    def __exit__(self, *_):
        for process in self.processes:
            terminate(process)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _wait(self, check, what):
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        for port in self.ports:
            while not check(port):
                if time.monotonic() > deadline:
                    raise BenchError(f"redis-server on {port} did not {what}")
                time.sleep(0.05)

    @property
    def seeds(self):
        return ",".join(f"redis://127.0.0.1:{port}" for port in self.ports)

    def cpu_s(self):
        """CPU time of all the redis-servers so far, in seconds."""
        return sum(stat_cpu_s(proc_stat(process.pid)) for process in self.processes)

    def used_memory_bytes(self):
        total = 0
        for port in self.ports:
            for line in (_cli(port, "INFO", "memory") or "").splitlines():
                if line.startswith("used_memory:"):
                    total += int(line.split(":")[1])
        return total

    def flush_all(self):
        for port in self.ports:
            _cli(port, "FLUSHALL")


def flusher_cpu_s(pid):
    """CPU of the node's flusher thread, found by its name."""
    thread = thread_named(pid, "flusher")
    return 0.0 if thread is None else stat_cpu_s(proc_stat(pid, thread))


def store_totals(receiver):
    return samples(receiver.get("/metrics"))


def wait_flushed(receiver, deadline_s=120):
    """Waits until the node holds no unflushed pairs and its flush count stops moving."""
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        totals = store_totals(receiver)
        current = (totals.get("ipevents_store_pairs_flushed_total"),
                   totals.get("ipevents_store_pending_pairs"))
        if current == last and current[1] == 0:
            return totals
        last = current
        time.sleep(0.5)
    raise BenchError("the node did not finish flushing within the deadline")


def cluster_flags(cluster, prefix):
    return ("--redis-cluster", cluster.seeds, "--redis-prefix", prefix)


def capacity_pair(bench, cluster):
    """Capacity rows for the same node standalone and in cluster mode, same run."""
    workers = bench.settings.cores
    saved = bench.server_flags
    rows = {}
    try:
        rows["standalone"] = capacity_row(bench, "ipevents", workers, "random")
        bench.server_flags = (*saved, *cluster_flags(cluster, "capacity"))
        rows["cluster"] = capacity_row(bench, "ipevents", workers, "random")
    finally:
        bench.server_flags = saved
    return rows


def two_nodes_capacity(bench, cluster):
    """Two nodes of one worker each, stopped while N/2 datagrams are queued at each, then
    resumed together: the aggregate drain rate, against one node of two workers."""
    count = bench.settings.capacity_count
    results = []
    flags = ("--workers", 1, "--steering", "random", "--rcvbuf", CAPACITY_RCVBUF_BYTES,
             *cluster_flags(cluster, "twonodes"))
    with bench.receiver("ipevents", *flags) as a, bench.receiver("ipevents", *flags) as b:
        for _ in range(bench.settings.runs):
            for node in (a, b):
                node.reset()
            bases = [node.metrics() for node in (a, b)]
            for node in (a, b):
                node.pause()
            try:
                for node in (a, b):
                    bench.loadgen.run(node, "--send-only", "--rate", 0, "--sockets", 32,
                                      "--count", count // 2, bound_s=60)
            finally:
                started = time.monotonic()
                for node in (a, b):
                    node.resume()
            target = 2 * (count // 2)
            deadline = started + 60
            while True:
                received = sum(node.metrics().since(base).received
                               for node, base in zip((a, b), bases))
                if received >= target or time.monotonic() > deadline:
                    break
                time.sleep(0.002)
            elapsed = time.monotonic() - started
            results.append(target / elapsed if received >= target else None)
    return fmt.Figure(results)


def writes_per_event(bench, cluster):
    """Store writes (app deltas flushed) per event ingested, for two traffic shapes."""
    settings = bench.settings
    duration_s = 5 if settings.quick else 20
    shapes = [
        ("reference mix, 33,000/s", ("--scenario", "reference", "--rate", 33_000)),
        ("many apps (100,000 apps x 16 IPs), 100,000/s",
         ("--scenario", "many-apps", "--apps", 100_000, "--rate", 100_000)),
    ]
    rows = []
    for name, flags in shapes:
        with bench.receiver("ipevents", "--workers", settings.cores,
                            *cluster_flags(cluster, "writes")) as node:
            base = store_totals(node)
            bench.loadgen.run(node, *flags, "--duration", duration_s, bound_s=duration_s)
            totals = wait_flushed(node)
        ingested = totals["ipevents_events_ingested_total"] - base.get(
            "ipevents_events_ingested_total", 0)
        writes = totals["ipevents_store_apps_flushed_total"] - base.get(
            "ipevents_store_apps_flushed_total", 0)
        flushes = totals["ipevents_store_flushes_total"] - base.get(
            "ipevents_store_flushes_total", 0)
        rows.append(dict(name=name, ingested=ingested, writes=writes, flushes=flushes,
                         per_event=writes / max(ingested, 1)))
        log(f"cluster writes: {name}: {writes:.0f} writes for {ingested:.0f} events")
    return rows


# The flush-rate shapes: (good IPs, bad IPs) per app; 16 pairs an app, and a long-tail app of
# two (loadgen sends at least two good IPs).
FLUSH_SHAPES = ((14, 2), (2, 0))


def flush_rate(bench, cluster):
    """Distinct (app, ip) pairs one node writes per second, every pair sent once as fast as
    the sender goes, with the CPU the flusher and Redis spent on them; per shape."""
    return {shape: flush_rate_of(bench, cluster, *shape) for shape in FLUSH_SHAPES}


def flush_rate_of(bench, cluster, good_ips, bad_ips):
    settings = bench.settings
    pairs_wanted = 320_000 if settings.quick else 3_200_000
    apps = pairs_wanted // (good_ips + bad_ips)
    results = []
    for _ in range(settings.runs):
        cluster.flush_all()
        with bench.receiver("ipevents", "--workers", settings.cores, "--rcvbuf", 256 << 20,
                            "--max-apps", 2_000_000,
                            *cluster_flags(cluster, "flushrate")) as node:
            flusher_before = flusher_cpu_s(node.pid)
            redis_before = cluster.cpu_s()
            started = time.monotonic()
            bench.loadgen.run(node, "--scenario", "many-apps", "--apps", apps,
                              "--good-ips", good_ips, "--bad-ips", bad_ips, "--each-pair-once",
                              "--rate", 0, "--no-verify", bound_s=LOADGEN_MAX_S)
            totals = wait_flushed(node)
            # wait_flushed looks twice, half a second apart, once the last flush is done.
            elapsed = time.monotonic() - started - 0.5
            flusher = flusher_cpu_s(node.pid) - flusher_before
            redis = cluster.cpu_s() - redis_before
            memory = cluster.used_memory_bytes()
        pairs = totals["ipevents_store_pairs_flushed_total"]
        results.append(dict(pairs=pairs, elapsed_s=elapsed, per_s=pairs / elapsed,
                            flusher_cpu_s=flusher, redis_cpu_s=redis,
                            flusher_pairs_per_cpu_s=pairs / max(flusher, 1e-9),
                            redis_pairs_per_cpu_s=pairs / max(redis, 1e-9),
                            redis_bytes_per_app=memory / apps))
        log(f"cluster flush rate, {good_ips + bad_ips} IPs an app: {pairs:.0f} pairs in "
            f"{elapsed:.1f} s; flusher {flusher:.1f} "
            f"CPU s, redis {redis:.1f} CPU s, redis memory {fmt.size(memory)}")
    return results


# Query latency is measured while this many events/s are written: the rate of step 3, which
# keeps this machine's three redis-servers busy, and a fifth of it, which does not.
QUERY_WRITE_RATES = (100_000, 20_000)


def query_latency(bench, cluster):
    """Query latency while events are written, standalone and in cluster mode."""
    settings = bench.settings
    apps = ["--scenario", "many-apps", "--apps", settings.query_apps, "--threads", 2,
            "--sockets", 8]
    modes = [("standalone", (), QUERY_WRITE_RATES[0])]
    modes += [("cluster", cluster_flags(cluster, "queries"), rate) for rate in QUERY_WRITE_RATES]
    rows = {}
    for mode, flags, rate in modes:
        figures = []
        for _ in range(settings.runs):
            with bench.receiver("ipevents", "--workers", settings.cores, *flags) as node:
                bench.loadgen.run(node, *apps, "--count", settings.query_apps * 16,
                                  "--rate", 100_000, bound_s=LOADGEN_MAX_S)
                if flags:
                    wait_flushed(node)
                probed = bench.loadgen.run(node, *apps, "--no-reset", "--no-verify",
                                           "--rate", rate,
                                           "--duration", settings.query_duration_s,
                                           "--query-every-ms", 2,
                                           bound_s=settings.query_duration_s)
            figures.append(probed["queries"])
            log(f"cluster queries {mode} at {rate}/s: p50 {probed['queries']['p50_ms']} ms, "
                f"p99 {probed['queries']['p99_ms']} ms")
        rows[(mode, rate)] = figures
    return rows


def step_cluster(bench):
    if not redis_available():
        bench.note("cluster", "redis-server is not installed (Debian package redis-server): "
                              "the cluster step was skipped")
        return None
    with RedisCluster(bench.logs) as cluster:
        log("cluster: capacity, standalone and cluster mode")
        capacity = capacity_pair(bench, cluster)
        log("cluster: two nodes")
        two_nodes = two_nodes_capacity(bench, cluster)
        log("cluster: store writes per event")
        writes = writes_per_event(bench, cluster)
        log("cluster: flush rate")
        flushes = flush_rate(bench, cluster)
        log("cluster: query latency")
        queries = query_latency(bench, cluster)
    return dict(capacity=capacity, two_nodes=two_nodes, writes=writes, flushes=flushes,
                queries=queries)


def cluster_section(bench, results):
    lines = ["## 6. Cluster mode (3-primary Redis Cluster on loopback)", ""]
    if results is None:
        return lines + ["Skipped: redis-server is not installed."]
    capacity = results["capacity"]
    standalone = fmt.Figure([d.events_per_s for d in capacity["standalone"]])
    clustered = fmt.Figure([d.events_per_s for d in capacity["cluster"]])
    ratio = (clustered.median / standalone.median
             if clustered and standalone else None)
    lines += [
        f"Capacity, {bench.settings.cores} workers, random steering, same run:",
        "",
        fmt.table(["node", "events/s"],
                  [["standalone", standalone.show(fmt.rate)],
                   ["cluster mode", clustered.show(fmt.rate)],
                   ["ratio (medians)", fmt.ratio(ratio) if ratio else "n/a"],
                   ["two cluster nodes of 1 worker, together",
                    results["two_nodes"].show(fmt.rate)]]),
        "",
        "Store writes per ingested event (a write is one app's delta in one flush):",
        "",
        fmt.table(["traffic", "events", "flushes", "writes", "writes per event"],
                  [[row["name"], fmt.count(row["ingested"]), fmt.count(row["flushes"]),
                    fmt.count(row["writes"]), f"{row['per_event']:.5f}"]
                   for row in results["writes"]]),
        "",
    ]
    rows = []
    for (good_ips, bad_ips), flushes in results["flushes"].items():
        figure = lambda key: fmt.Figure([r[key] for r in flushes])
        rows.append([good_ips + bad_ips, figure("pairs").show(fmt.count),
                     figure("per_s").show(fmt.rate),
                     figure("flusher_pairs_per_cpu_s").show(fmt.rate),
                     figure("redis_pairs_per_cpu_s").show(fmt.rate),
                     figure("redis_bytes_per_app").show(fmt.size)])
    lines += [
        "Flushing distinct pairs (every pair sent once, as fast as the sender goes; the "
        "sender, the node and three redis-servers share the cores):",
        "",
        fmt.table(["IPs per app", "pairs", "pairs/s, send start to last flush",
                   "pairs per flusher CPU second", "pairs per Redis CPU second (3 primaries)",
                   "Redis memory per app"], rows),
        "",
    ]
    rows = []
    for (mode, rate), figures in results["queries"].items():
        rows.append([mode, fmt.rate(rate), fmt.Figure([q["p50_ms"] for q in figures]).show(fmt.ms),
                     fmt.Figure([q["p99_ms"] for q in figures]).show(fmt.ms),
                     fmt.Figure([q["count"] for q in figures]).show(fmt.count)])
    lines += [
        "Query latency (one query every 2 ms from loadgen) after 100,000 apps were loaded, "
        "while events are written:",
        "",
        fmt.table(["node", "events/s written", "p50", "p99", "queries"], rows),
    ]
    return lines

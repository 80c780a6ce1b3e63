"""The five measurements. Each step starts the receivers it needs, drives them with loadgen,
and returns plain results; the report is written elsewhere (sections.py).

A step takes the benchmark's `Bench` (binaries, settings, loadgen, notes) as its first
argument. Every receiver is started in a `with` block, so that it is stopped whatever happens.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import report as fmt
from plot import THRESHOLD_PERCENT
from receiver import BenchError

# The largest receive buffer Linux grants: it stores twice the value asked in an int, so it
# clamps any request above INT_MAX / 2. Asking for exactly this avoids a spurious "capped".
CAPACITY_RCVBUF_BYTES = (1 << 30) - 1

# Step 4 loads a million apps; growing the workers' tables takes pauses that a default 16 MiB
# buffer may not cover at full rate. Kernel buffers are not part of the process's RSS.
MEMORY_RCVBUF_BYTES = 256 << 20

# The capacity step polls /metrics after SIGCONT, and gives up after the deadline or when the
# received count has not moved for the stall time. It sleeps half the time the drain's rate so
# far says is left, between these bounds: the end is still seen within 2 ms, but the bulk of a
# drain takes a few dozen polls, not hundreds. Each poll costs the receiver CPU on the cores
# its workers need (about 160 us for the server's /metrics, 66 us for discard's, measured), so
# polling every 2 ms throughout took about 7% of a core from the server under test.
DRAIN_POLL_S = 0.002
DRAIN_POLL_MAX_S = 0.05
DRAIN_DEADLINE_S = 60
DRAIN_STALL_S = 2

# A capacity row whose datagrams do not fit in the buffers is retried this many times, each
# with half as many.
CAPACITY_RETRIES = 3

# The lossless search: start rate, doublings (or halvings) at most, bisection steps, and the
# share of the offered rate below which the sender, not the receiver, is the limit.
SEARCH_START_PER_S = 100_000
SEARCH_MAX_STEPS = 12
SEARCH_BISECTIONS = 4
SENDER_LIMIT_SHARE = 0.95
SEARCH_MIN_PER_S = 1_000

# Step 4's apps: 14 good and 2 bad IPs each, 16 (app, ip) pairs.
GOOD_IPS, BAD_IPS = 14, 2

# A loadgen run bounded by its count rather than its duration may take this long to send
# (loadgen's own limit); it normally takes far less, and the bound only guards against a hang.
LOADGEN_MAX_S = 600

STEERING_MODES = ("hash", "cpu", "random", "app", "adaptive")

# Adaptive steering finds hot apps from its traffic about once a second, and datagrams queued
# while the server is stopped were steered when they arrived: an adaptive row first drains
# once unrecorded (both receivers, alike) and the server's waits this long at most for the
# hot set. The discard receiver has no
# balancer, so its adaptive row runs `random`, which is what adaptive steering makes of the
# reference mix's three hot apps.
HOT_SET_WAIT_S = 10
RECEIVERS = ("ipevents", "discard")


def log(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- Step 1: receiver capacity -------------------------------------------------------------


@dataclass
class Drain:
    """One capacity run: N datagrams queued in a stopped receiver, then drained."""

    count: int
    elapsed_s: float
    # How fast loadgen queued the datagrams into the stopped receiver's sockets.
    sent_per_s: float
    drops: int
    queued_bytes: int
    busiest_share: float
    complete: bool

    @property
    def events_per_s(self):
        return self.count / self.elapsed_s if self.complete and self.drops == 0 else None


def measure_drain(bench, receiver, count, sockets=64, reset=True, cpus=None):
    """Queues `count` datagrams in the stopped receiver from `sockets` source sockets, then
    times how fast it reads them. `reset=False` keeps what the receiver holds (and what its
    steering learnt from it), for a caller that warmed it up; `cpus`, when given, is where
    loadgen may run."""
    if reset:
        receiver.reset()
    base = receiver.metrics()
    summary, queued_bytes, drops = queue_while_stopped(bench, receiver, count, sockets, cpus)
    started = time.monotonic()
    receiver.resume()
    counters, complete = wait_until_received(receiver, base, summary["sent"] - drops, started)
    elapsed_s = time.monotonic() - started
    busiest = max(counters.received_per_worker, default=0)
    return Drain(count=summary["sent"], elapsed_s=elapsed_s,
                 sent_per_s=summary["send_rate_per_s"], drops=drops, queued_bytes=queued_bytes,
                 busiest_share=busiest / max(counters.received, 1), complete=complete)


def queue_while_stopped(bench, receiver, count, sockets=64, cpus=None):
    """Stops the receiver and sends from `sockets` source sockets; returns loadgen's summary,
    the bytes the kernel charged for the queued datagrams and the datagrams it dropped. The
    receiver is left stopped unless something failed."""
    _, drops_before, _ = receiver.socket_queues()
    receiver.pause()
    try:
        summary = bench.loadgen.run(receiver, "--send-only", "--rate", 0, "--sockets", sockets,
                                    "--count", count, bound_s=60, cpus=cpus)
        # The kernel's own view of the sockets, readable while the receiver is stopped.
        queued_bytes, drops_after, _ = receiver.socket_queues()
    except BaseException:
        receiver.resume()
        raise
    return summary, queued_bytes, drops_after - drops_before


def wait_until_received(receiver, base, target, started):
    """Polls /metrics until the receiver has read `target` datagrams since `base`; gives up at
    the deadline or when the count stops moving. Returns the counters and whether it got
    there."""
    received, last_change = -1, started
    while True:
        counters = receiver.metrics().since(base)
        now = time.monotonic()
        if counters.received >= target:
            return counters, True
        if counters.received != received:
            received, last_change = counters.received, now
        if now - started > DRAIN_DEADLINE_S or now - last_change > DRAIN_STALL_S:
            return counters, False
        time.sleep(next_poll_s(counters.received, target, now - started))


def next_poll_s(received, target, elapsed_s):
    """How long to sleep before the next poll of a drain: half the time left at the rate so
    far, between DRAIN_POLL_S and DRAIN_POLL_MAX_S."""
    if received <= 0 or elapsed_s <= 0:
        return DRAIN_POLL_S
    left_s = (target - received) * elapsed_s / received
    return min(DRAIN_POLL_MAX_S, max(DRAIN_POLL_S, left_s / 2))


def wait_for_hot_apps(receiver, deadline_s=HOT_SET_WAIT_S):
    """Polls /metrics until adaptive steering holds a hot app; False at the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if (receiver.metrics().hot_apps or 0) >= 1:
            return True
        time.sleep(0.1)
    return False


def capacity_configs(cores):
    """(workers, steering) rows: one worker once (steering cannot matter), then every mode
    with one worker per core."""
    configs = [(1, "hash")]
    if cores > 1:
        configs += [(cores, mode) for mode in STEERING_MODES]
    return configs


def capacity_row(bench, kind, workers, steering):
    """The runs of one row; lowers N when the buffers cannot hold it."""
    settings = bench.settings
    count = settings.capacity_count
    cpus = queueing_cpus()
    drains = []
    with capacity_receiver(bench, kind, workers, steering) as receiver:
        warm_up(bench, receiver, steering, count, cpus)
        for attempt in range(CAPACITY_RETRIES + 1):
            drain = measure_drain(bench, receiver, count, cpus=cpus)
            if drain.drops == 0 or attempt == CAPACITY_RETRIES:
                break
            bench.note("capacity", f"{kind} W={workers} {steering}: the kernel dropped "
                                   f"{drain.drops} of {count} datagrams, so the buffers were too "
                                   f"small; N lowered to {count // 2} for this row")
            count //= 2
        drains.append(drain)
        for _ in range(settings.runs - 1):
            drains.append(measure_drain(bench, receiver, count, cpus=cpus))
    report_drains(bench, kind, workers, steering, drains)
    return drains


def queueing_cpus():
    """Where loadgen runs while it queues a capacity drain, in every row: the first CPU, where
    each receiver's first worker runs. On loopback a datagram's buffer is allocated on the
    sending CPU, and a worker frees a buffer of its own CPU faster than one of another CPU's:
    left to the scheduler, loadgen's CPU moved one worker's drain rate by some 40% (README,
    Performance) and decided a ratio more than either receiver did."""
    return {min(os.sched_getaffinity(0))}


def capacity_receiver(bench, kind, workers, steering):
    """A receiver of `kind` for a capacity row; with `--calibrate`, the discard receiver in
    the server's seat too. `discard` has no balancer, so its `adaptive` row runs `random`,
    which is what adaptive steering makes of the reference mix's three hot apps."""
    runs_discard = kind == "discard" or bench.calibrating
    flag = "random" if steering == "adaptive" and runs_discard else steering
    binary = bench.binaries["discard"] if runs_discard else None
    return bench.receiver(kind, "--workers", workers, "--steering", flag,
                          "--rcvbuf", CAPACITY_RCVBUF_BYTES, binary=binary)


def warm_up(bench, receiver, steering, count, cpus=None):
    """Checks the receiver's buffers; in an `adaptive` row, drains once unrecorded (both
    receivers, so that the row is measured alike) and waits for the server to find the hot
    apps."""
    bench.check_rcvbuf("capacity", receiver, CAPACITY_RCVBUF_BYTES)
    if steering != "adaptive":
        return
    measure_drain(bench, receiver, count, cpus=cpus)
    waits = receiver.kind == "ipevents" and not bench.calibrating
    if waits and not wait_for_hot_apps(receiver):
        bench.note("capacity", f"adaptive steering found no hot app within "
                               f"{HOT_SET_WAIT_S} s of a warm-up drain")


def report_drains(bench, kind, workers, steering, drains):
    """Notes the drains of a row that lost datagrams or did not finish, and logs the row."""
    for drain in drains:
        if drain.drops:
            bench.note("capacity", f"{kind} W={workers} {steering}: {drain.drops} kernel drops "
                                   "with N datagrams queued: the receive buffer was too small")
        elif not drain.complete:
            bench.note("capacity", f"{kind} W={workers} {steering}: only part of the "
                                   f"{drain.count} datagrams arrived within the deadline")
    shown = fmt.Figure([d.events_per_s for d in drains]).show(fmt.rate)
    log(f"capacity {kind} W={workers} {steering}: {shown} events/s")


def drain_order(runs):
    """The receivers in the order `capacity_pair` drains them: in pairs, the server first in
    the even pairs and `discard` first in the odd ones, so that neither always drains just
    after the other."""
    order = []
    for pair in range(runs):
        order += RECEIVERS if pair % 2 == 0 else RECEIVERS[::-1]
    return order


def capacity_pair(bench, workers, steering):
    """Both receivers' runs of one row, measured in turn (`--paired-drains`): both run at
    once, one idle while the other is filled and drained, their drains alternate
    (`drain_order`), and loadgen runs on the first CPU, where each receiver's first worker
    runs, so that where the kernel frees the datagrams' buffers (on the CPU that allocated
    them, or by an interrupt to it) is the same for every drain. A change in the host's load
    over the row then reaches both receivers alike, where `capacity_row` measures one
    receiver's runs and then the other's. N stays as set: a drain that lost datagrams is
    noted, not retried with fewer. Returns {kind: drains}."""
    count = bench.settings.capacity_count
    cpus = queueing_cpus()
    with capacity_receiver(bench, "ipevents", workers, steering) as server, \
            capacity_receiver(bench, "discard", workers, steering) as discard:
        running = {"ipevents": server, "discard": discard}
        for receiver in running.values():
            warm_up(bench, receiver, steering, count, cpus)
        drains = {kind: [] for kind in RECEIVERS}
        for kind in drain_order(bench.settings.runs):
            drains[kind].append(measure_drain(bench, running[kind], count, cpus=cpus))
    for kind in RECEIVERS:
        report_drains(bench, kind, workers, steering, drains[kind])
    return drains


def step_capacity(bench):
    results = {}
    for workers, steering in capacity_configs(bench.settings.cores):
        if bench.paired_drains:
            for kind, drains in capacity_pair(bench, workers, steering).items():
                results[(kind, workers, steering)] = drains
            continue
        for kind in RECEIVERS:
            results[(kind, workers, steering)] = capacity_row(bench, kind, workers, steering)
    return results


# --- Step 1b: the worker's own cost, without the kernel -------------------------------------


# microbench's figures, in the order the report lists them, with what each measures.
MICRO_ROWS = (
    ("parse_apply_reference_ns", "parse + apply, reference mix"),
    ("parse_apply_many_apps_ns", "parse + apply, many apps"),
    ("parse_ns", "parse alone, reference mix"),
    ("hex_decode_ns", "hex decode of a sha (the server's, hex-simd)"),
    ("hex_decode_const_hex_ns", "hex decode of a sha (const-hex)"),
    ("hex_decode_faster_hex_ns", "hex decode of a sha (faster-hex)"),
    ("hex_decode_hex_crate_ns", "hex decode of a sha (the hex crate)"),
    ("hash_keyed_ns", "hash of a 32-byte key (the table's seeded foldhash)"),
    ("hash_siphash_ns", "hash of a 32-byte key (std's SipHash-1-3)"),
)


def step_micro(bench):
    """Runs `microbench --json` `runs` times; returns {figure name: [ns per run]} and the
    reference app's IPs. Each run is itself the median of microbench's own passes."""
    count = bench.settings.capacity_count * 2
    apps = bench.settings.query_apps
    figures = {name: [] for name, _ in MICRO_ROWS}
    ips = None
    for _ in range(bench.settings.runs):
        argv = [bench.binaries["microbench"], "--json", "--datagrams", str(count),
                "--apps", str(apps), "--seed", str(bench.settings.seed)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=LOADGEN_MAX_S,
                              check=False)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        result = json.loads(done.stdout)
        ips = result["reference_ips_per_app"]
        for name in figures:
            figures[name].append(result[name])
    log("microbench: " + ", ".join(f"{name} {fmt.Figure(values).median:.1f} ns"
                                     for name, values in figures.items()))
    return figures, ips


# --- Step 2: lossless paced rate -----------------------------------------------------------


@dataclass
class Trial:
    receiver: str
    run: int
    offered_per_s: float
    achieved_per_s: float
    loss_percent: float
    threads: int

    @property
    def lossless(self):
        return self.loss_percent <= THRESHOLD_PERCENT

    @property
    def sender_limited(self):
        return self.achieved_per_s < SENDER_LIMIT_SHARE * self.offered_per_s


@dataclass
class Search:
    trials: list = field(default_factory=list)

    def best(self):
        """The highest lossless rate, and whether the sender was the limit: the receiver lost
        nothing at any rate tried and the sender fell short of one, so the receiver's own limit
        is higher than the rate found."""
        reached = [t.offered_per_s for t in self.trials if t.lossless and not t.sender_limited]
        # A sender-limited trial without loss shows the receiver keeping up with what the
        # sender achieved, which may be more than any rate it reached in full.
        reached += [t.achieved_per_s for t in self.trials if t.lossless and t.sender_limited]
        limited = (all(t.lossless for t in self.trials)
                   and any(t.sender_limited for t in self.trials))
        return max(reached, default=None), limited

    def threads(self):
        return max((t.threads for t in self.trials), default=1)


def search_lossless(trial):
    """Finds the highest lossless rate: doubles from the start rate until a trial loses (or
    halves until one does not), then bisects. `trial(rate, threads)` returns a Trial."""
    search = Search()

    def run(rate, threads):
        result = trial(round(rate, -3), threads)
        search.trials.append(result)
        return result

    threads, low, high, rate = 1, None, None, SEARCH_START_PER_S
    for _ in range(SEARCH_MAX_STEPS):
        result = run(rate, threads)
        if result.sender_limited and threads == 1:
            # One sender thread may be what falls short; a second one is tried before the
            # sender is declared the limit.
            threads = 2
            result = run(rate, threads)
        if result.lossless:
            low = rate
        else:
            high = rate
        if result.sender_limited or (low is not None and high is not None):
            break
        rate = rate * 2 if result.lossless else rate / 2
        if rate < SEARCH_MIN_PER_S:
            break
    for _ in range(SEARCH_BISECTIONS):
        if low is None or high is None:
            break
        middle = (low + high) / 2
        if run(middle, threads).lossless:
            low = middle
        else:
            high = middle
    return search


def step_lossless(bench):
    settings = bench.settings
    searches = {kind: [] for kind in RECEIVERS}
    for kind in RECEIVERS:
        for run_index in range(settings.runs):
            with bench.receiver(kind, "--workers", settings.cores) as receiver:
                def trial(rate, threads):
                    return lossless_trial(bench, receiver, kind, run_index, rate, threads)
                search = search_lossless(trial)
            rate, limited = search.best()
            shown = fmt.rate(rate) if rate else "none"
            log(f"lossless {kind} run {run_index + 1}: {shown}/s"
                + (" (sender-limited)" if limited else ""))
            searches[kind].append(search)
    return searches


def lossless_trial(bench, receiver, kind, run_index, rate, threads):
    settings = bench.settings
    # Low rates would take minutes to send the whole count; the duration bounds each trial.
    duration_s = min(settings.search_max_s, 3 * settings.search_count / rate)
    flags = ["--rate", rate, "--count", settings.search_count, "--duration", f"{duration_s:.1f}",
             *sender_flags(threads)]
    if kind == "discard":
        flags.append("--no-verify")
    summary = bench.loadgen.run(receiver, *flags, bound_s=duration_s)
    result = Trial(receiver=kind, run=run_index, offered_per_s=rate,
                   achieved_per_s=summary["send_rate_per_s"],
                   loss_percent=summary["lost_percent"], threads=threads)
    log(f"  trial {kind} {fmt.rate(rate)}/s x{threads}: achieved "
        f"{fmt.rate(result.achieved_per_s)}/s, loss {result.loss_percent:.4f}%")
    return result


# --- Step 3: query latency -----------------------------------------------------------------


def sender_flags(threads):
    """The sender threads the lossless search needed, with a socket or more for each."""
    return ["--threads", threads, "--sockets", max(8, threads)]


def step_queries(bench, lossless_per_s, threads):
    settings = bench.settings
    apps = ["--scenario", "many-apps", "--apps", settings.query_apps, *sender_flags(threads)]
    results = []
    for _ in range(settings.runs):
        with bench.receiver("ipevents", "--workers", settings.cores) as server:
            load = bench.loadgen.run(server, *apps, "--count", settings.query_load_count,
                                     "--rate", lossless_per_s, bound_s=LOADGEN_MAX_S)
            # The same seed draws the same apps, so the queries ask about loaded apps.
            probed = bench.loadgen.run(server, *apps, "--no-reset", "--no-verify",
                                       "--rate", lossless_per_s / 2,
                                       "--duration", settings.query_duration_s,
                                       "--query-every-ms", 2, bound_s=settings.query_duration_s)
        results.append({"load": load, "probed": probed, "queries": probed["queries"]})
        queries = probed["queries"]
        log(f"queries: {queries['count']} during the send, p50 {queries['p50_ms']} ms, "
            f"p99 {queries['p99_ms']} ms, max {queries['max_ms']} ms")
    return results


# --- Step 4: memory ------------------------------------------------------------------------


def timed_reset_or_note(bench, step, server):
    """The time of one `DELETE /events`, or None, noted under `step`, when the server did not
    answer 204 (a reset slower than its reply timeout answers 503): a figure, not a failure
    of the benchmark."""
    try:
        return server.timed_reset_s()
    except BenchError as error:
        bench.note(step, f"{error}; the reset time is n/a")
        return None


def step_memory(bench, lossless_per_s, threads, steering=None):
    """Every pair of `memory_apps` apps once, with the server's default steering or
    `steering`; returns a dict per run."""
    settings = bench.settings
    apps = settings.memory_apps
    pairs = apps * (GOOD_IPS + BAD_IPS)
    steering_flags = ("--steering", steering) if steering else ()
    results = []
    for _ in range(settings.runs):
        with bench.receiver("ipevents", "--workers", settings.cores, "--max-apps", 2_000_000,
                            "--rcvbuf", MEMORY_RCVBUF_BYTES, *steering_flags) as server:
            bench.check_rcvbuf("memory", server, MEMORY_RCVBUF_BYTES)
            base = server.metrics()
            before = server.rss_bytes()
            bench.loadgen.run(server, "--scenario", "many-apps", "--apps", apps,
                              "--good-ips", GOOD_IPS, "--bad-ips", BAD_IPS, "--each-pair-once",
                              "--rate", lossless_per_s, *sender_flags(threads),
                              bound_s=LOADGEN_MAX_S)
            after = server.rss_bytes()
            counters = server.metrics().since(base)
            reset_s = timed_reset_or_note(bench, "memory", server)
            after_reset = server.rss_bytes()
        stored = counters.ingested or 0
        if stored != pairs:
            bench.note("memory", f"the server stored {stored} of the {pairs} pairs sent "
                                 f"({pairs - stored} lost); bytes per pair use the stored count")
        grown = after - before
        results.append(dict(before=before, after=after, after_reset=after_reset,
                            reset_s=reset_s, stored=stored, entries=counters.app_entries,
                            per_pair=grown / max(stored, 1), per_app=grown / apps,
                            steering=server.steering, drops=counters.kernel_drops))
        shown = "n/a" if reset_s is None else f"{reset_s * 1000:.1f} ms"
        log(f"memory: {fmt.size(grown)} for {stored} pairs: {grown / max(stored, 1):.1f} B/pair; "
            f"DELETE /events {shown}")
    return results


# --- Step 5: the reference scenario at the load test's scale -------------------------------


def step_reference(bench):
    settings = bench.settings
    results = []
    for _ in range(settings.runs):
        with bench.receiver("ipevents", "--workers", settings.cores) as server:
            cpu_before, wall_before = server.cpu_s(), time.monotonic()
            summary = bench.loadgen.run(server, "--scenario", "reference", "--rate", 33_000,
                                        "--duration", settings.reference_duration_s,
                                        bound_s=settings.reference_duration_s)
            cpu_s = server.cpu_s() - cpu_before
            wall_s = time.monotonic() - wall_before
        results.append(dict(summary=summary, cpu_percent=100 * cpu_s / wall_s))
        log(f"reference: sent {summary['sent']}, lost {summary['lost']}, "
            f"CPU {100 * cpu_s / wall_s:.1f}% of a core")
    return results
